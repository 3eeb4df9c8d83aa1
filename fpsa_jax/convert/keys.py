"""Key tables: diffusers names -> original Wan2.1 names -> our Flax parameter tree.

Everything is expressed in the original layout (`wan/modules/model.py`); diffusers keys are renamed
to it first. Torch shapes use D = dim, F = ffn_dim, P = prod(patch_size).
"""

from __future__ import annotations

import dataclasses
import re
from typing import Literal

import numpy as np

from fpsa_jax.config import WanConfig
from fpsa_jax.convert.errors import CheckpointError
from fpsa_jax.model.fp8_linear import BLOCK_LINEARS

Layout = Literal["original", "diffusers"]
Transform = Literal["copy", "linear", "conv3d", "squeeze0"]

# -- diffusers -> original ------------------------------------------------------------------
# Prefix renames of top-level keys (diffusers' convert_wan_to_diffusers.py, inverted).
_DIFFUSERS_TOP = (
    ("condition_embedder.time_embedder.linear_1.", "time_embedding.0."),
    ("condition_embedder.time_embedder.linear_2.", "time_embedding.2."),
    ("condition_embedder.text_embedder.linear_1.", "text_embedding.0."),
    ("condition_embedder.text_embedder.linear_2.", "text_embedding.2."),
    ("condition_embedder.time_proj.", "time_projection.1."),
    ("proj_out.", "head.head."),
    ("scale_shift_table", "head.modulation"),
    ("patch_embedding.", "patch_embedding."),
)
# Prefix renames inside `blocks.N.`. diffusers' norm2 is the cross-attention LayerNorm, the
# original's norm3 (the parameter-free norms carry no keys in either layout).
_DIFFUSERS_BLOCK = (
    ("scale_shift_table", "modulation"),
    ("norm2.", "norm3."),
    ("ffn.net.0.proj.", "ffn.0."),
    ("ffn.net.2.", "ffn.2."),
) + tuple(
    (f"{d}.{dp}.", f"{o}.{op}.")
    for d, o in (("attn1", "self_attn"), ("attn2", "cross_attn"))
    for dp, op in (
        ("to_q", "q"),
        ("to_k", "k"),
        ("to_v", "v"),
        ("to_out.0", "o"),
        ("norm_q", "norm_q"),
        ("norm_k", "norm_k"),
    )
)
_BLOCK_KEY = re.compile(r"blocks\.(\d+)\.(.+)")

# Keys that only image-to-video (and first-last-frame) models carry.
I2V_MARKERS = {
    "original": re.compile(r"^img_emb\.|\.cross_attn\.(k_img|v_img|norm_k_img)\."),
    "diffusers": re.compile(
        r"^condition_embedder\.image_embedder\.|\.attn2\.(add_k_proj|"
        r"add_v_proj|norm_added_k|norm_added_q)\."
    ),
}
# Keys that only one layout has; used to tell them apart.
_LAYOUT_MARKERS = {
    "original": re.compile(
        r"^(time_embedding|text_embedding|time_projection|head)\.|"
        r"^blocks\.\d+\.(self_attn|cross_attn|modulation)"
    ),
    "diffusers": re.compile(
        r"^(condition_embedder\.|proj_out\.|scale_shift_table$)|"
        r"^blocks\.\d+\.(attn1|attn2|scale_shift_table)"
    ),
}


def detect_layout(names: set[str]) -> Layout | None:
    """'original' or 'diffusers' from the key names; None when neither layout's keys appear."""
    found = [
        layout
        for layout, pattern in _LAYOUT_MARKERS.items()
        if any(pattern.search(n) for n in names)
    ]
    if len(found) == 2:
        raise CheckpointError("checkpoint mixes original Wan2.1 keys and diffusers keys")
    return found[0] if found else None


def diffusers_to_original(name: str) -> str | None:
    """The original name of diffusers key `name`, or None when it has no counterpart."""
    m = _BLOCK_KEY.fullmatch(name)
    table, prefix, rest = (
        (_DIFFUSERS_BLOCK, f"blocks.{m[1]}.", m[2]) if m else (_DIFFUSERS_TOP, "", name)
    )
    for old, new in table:
        if rest.startswith(old):
            return prefix + new + rest[len(old) :]
    return None


# -- original -> our tree ------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Entry:
    """One checkpoint tensor: its place in our tree, how to transform it, its torch shape."""

    path: tuple[str, ...]
    transform: Transform
    torch_shape: tuple[int, ...]


def _linear(path: tuple[str, ...], n_in: int, n_out: int, prefix: str) -> dict[str, Entry]:
    return {
        f"{prefix}.weight": Entry((*path, "kernel"), "linear", (n_out, n_in)),
        f"{prefix}.bias": Entry((*path, "bias"), "copy", (n_out,)),
    }


def top_level_entries(cfg: WanConfig) -> dict[str, Entry]:
    """Original key -> Entry for everything outside `blocks`."""
    d, p = cfg.dim, cfg.patch_volume
    return {
        "patch_embedding.weight": Entry(
            ("patch_embedding", "kernel"), "conv3d", (d, cfg.in_dim, *cfg.patch_size)
        ),
        "patch_embedding.bias": Entry(("patch_embedding", "bias"), "copy", (d,)),
        **_linear(("text_embedding", "linear_1"), cfg.text_dim, d, "text_embedding.0"),
        **_linear(("text_embedding", "linear_2"), d, d, "text_embedding.2"),
        **_linear(("time_embedding", "linear_1"), cfg.freq_dim, d, "time_embedding.0"),
        **_linear(("time_embedding", "linear_2"), d, d, "time_embedding.2"),
        **_linear(("time_projection",), d, 6 * d, "time_projection.1"),
        "head.modulation": Entry(("head", "modulation"), "squeeze0", (1, 2, d)),
        **_linear(("head", "head"), d, cfg.out_dim * p, "head.head"),
    }


def block_entries(cfg: WanConfig) -> dict[str, Entry]:
    """Key relative to `blocks.N.` -> Entry with the path inside `blocks` (per layer)."""
    d = cfg.dim
    entries = {"modulation": Entry(("modulation",), "squeeze0", (1, 6, d))}
    for attn in ("self_attn", "cross_attn"):
        for proj in "qkvo":
            entries.update(_linear((attn, proj), d, d, f"{attn}.{proj}"))
        if cfg.qk_norm:
            for norm in ("norm_q", "norm_k"):
                entries[f"{attn}.{norm}.weight"] = Entry((attn, norm, "scale"), "copy", (d,))
    if cfg.cross_attn_norm:
        entries["norm3.weight"] = Entry(("cross_attn_norm", "scale"), "copy", (d,))
        entries["norm3.bias"] = Entry(("cross_attn_norm", "bias"), "copy", (d,))
    entries.update(_linear(("ffn", "fc1"), d, cfg.ffn_dim, "ffn.0"))
    entries.update(_linear(("ffn", "fc2"), cfg.ffn_dim, d, "ffn.2"))
    return entries


def expected_keys(cfg: WanConfig) -> dict[str, Entry]:
    """Every original key a checkpoint with `cfg` holds, blocks expanded per layer."""
    keys = dict(top_level_entries(cfg))
    for rel, entry in block_entries(cfg).items():
        keys.update({f"blocks.{i}.{rel}": entry for i in range(cfg.num_layers)})
    return keys


def param_shapes(cfg: WanConfig) -> dict[tuple[str, ...], tuple[int, ...]]:
    """Our tree path -> leaf shape; `blocks` leaves carry the leading [num_layers] axis.

    With `cfg.linear_quant == "fp8"` the block linears also carry their `kernel_scale`
    [num_layers, N] (`fpsa_jax.model.fp8_linear.quantize_linear_weights`).
    """
    shapes = {e.path: _flax_shape(e) for e in top_level_entries(cfg).values()}
    shapes.update(
        {
            ("blocks", *e.path): (cfg.num_layers, *_flax_shape(e))
            for e in block_entries(cfg).values()
        }
    )
    if cfg.linear_quant == "fp8":
        for linear in BLOCK_LINEARS:
            kernel = shapes[("blocks", *linear, "kernel")]
            shapes[("blocks", *linear, "kernel_scale")] = (kernel[0], kernel[2])
    return shapes


def _flax_shape(entry: Entry) -> tuple[int, ...]:
    s = entry.torch_shape
    match entry.transform:
        case "linear":
            return (s[1], s[0])
        case "conv3d":  # [D, C, pt, ph, pw] -> [pt*ph*pw*C, D]
            return (s[1] * s[2] * s[3] * s[4], s[0])
        case "squeeze0":
            return s[1:]
    return s


def apply_transform(x: np.ndarray, transform: Transform) -> np.ndarray:
    """Torch layout -> Flax layout; returns a view where it can (the cast copies later)."""
    match transform:
        case "linear":  # torch Linear weight [out, in] -> kernel [in, out]
            return x.T
        case "conv3d":  # [D, C, pt, ph, pw] -> [pt, ph, pw, C, D] -> [pt*ph*pw*C, D]
            return x.transpose(2, 3, 4, 1, 0).reshape(-1, x.shape[0])
        case "squeeze0":  # modulation [1, k, D] -> [k, D]
            return x[0]
    return x
