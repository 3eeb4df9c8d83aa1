"""Converting Wan2.1 VAE checkpoints to `fpsa_jax.model.vae` parameters.

Two layouts are understood and told apart by their names: the original `Wan2.1_VAE.pth`
(`encoder.conv1`, flat `encoder.downsamples.N` / `decoder.upsamples.N` lists, `residual.0/2/3/6`,
`conv1`/`conv2` for the quant convs) and diffusers' `AutoencoderKLWan` (`vae/` folder with
`config.json`; `conv_in`, `down_blocks.N`, `up_blocks.i.resnets.j`, `quant_conv`). The
architecture is read off the tensor names and shapes; a diffusers `config.json` must agree with
it and supplies the latent statistics.

Transforms: torch Conv3d [O, I, kt, kh, kw] -> [kt, kh, kw, I, O]; Conv2d (the resampling and
attention convs) [O, I, kh, kw] -> [1, kh, kw, I, O]; RMS gamma [C, 1, 1(, 1)] -> [C].
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from fpsa_jax.convert.errors import CheckpointError, format_keys
from fpsa_jax.convert.sources import TensorReader, open_source
from fpsa_jax.convert.tree import set_path
from fpsa_jax.model.vae import WanVAEConfig, init_params

ORIGINAL, DIFFUSERS = "original", "diffusers"
# Name parts that differ between the layouts: (original, diffusers, flax).
_RES_PARTS = (
    ("residual.0", "norm1", "norm1"),
    ("residual.2", "conv1", "conv1"),
    ("residual.3", "norm2", "norm2"),
    ("residual.6", "conv2", "conv2"),
)
_LEAVES = {"weight": "kernel", "bias": "bias", "gamma": "scale"}
# diffusers config.json options of other Wan VAEs (2.2) that this model does not implement.
# Allowed values; a missing key reads as None.
_UNSUPPORTED = {"is_residual": (False, None), "patch_size": (None,), "attn_scales": ([], None)}
# diffusers config.json name -> WanVAEConfig field, checked against the tensors.
_STRUCTURE = {
    "base_dim": "base_dim",
    "z_dim": "z_dim",
    "dim_mult": "dim_mult",
    "num_res_blocks": "num_res_blocks",
    "temperal_downsample": "temporal_downsample",
    "in_channels": "in_channels",
}


@dataclasses.dataclass(frozen=True)
class VAEKey:
    """One tensor: its name in each layout, its flax path, and whether torch holds it as 2-D
    (a Conv2d weight, or the [C, 1, 1] gamma of the image-shaped attention norm)."""

    original: str
    diffusers: str
    flax: tuple[str, ...]
    image: bool = False


def vae_keys(cfg: WanVAEConfig) -> list[VAEKey]:
    """Every tensor of a Wan2.1 VAE of this config, in module order."""
    keys: list[VAEKey] = []

    def add(
        kind: str,
        flax: tuple[str, ...],
        orig: str,
        diff: str,
        *,
        shortcut: bool = False,
        temporal: bool = False,
        image: bool = False,
    ) -> None:
        if kind in ("conv", "norm"):
            for leaf in ("gamma",) if kind == "norm" else ("weight", "bias"):
                keys.append(
                    VAEKey(f"{orig}.{leaf}", f"{diff}.{leaf}", (*flax, _LEAVES[leaf]), image)
                )
        elif kind == "res":
            for o, d, f in _RES_PARTS:
                kind = "norm" if f.startswith("norm") else "conv"
                add(kind, (*flax, f), f"{orig}.{o}", f"{diff}.{d}")
            if shortcut:
                add("conv", (*flax, "shortcut"), f"{orig}.shortcut", f"{diff}.conv_shortcut")
        elif kind == "attn":
            add("norm", (*flax, "norm"), f"{orig}.norm", f"{diff}.norm", image=True)
            add("conv", (*flax, "qkv"), f"{orig}.to_qkv", f"{diff}.to_qkv", image=True)
            add("conv", (*flax, "proj"), f"{orig}.proj", f"{diff}.proj", image=True)
        else:  # resample
            add("conv", (*flax, "conv"), f"{orig}.resample.1", f"{diff}.resample.1", image=True)
            if temporal:
                add("conv", (*flax, "time_conv"), f"{orig}.time_conv", f"{diff}.time_conv")

    def middle(side: str) -> None:
        add("res", (side, "mid", "res_0"), f"{side}.middle.0", f"{side}.mid_block.resnets.0")
        add("attn", (side, "mid", "attn"), f"{side}.middle.1", f"{side}.mid_block.attentions.0")
        add("res", (side, "mid", "res_1"), f"{side}.middle.2", f"{side}.mid_block.resnets.1")

    def head(side: str) -> None:
        add("norm", (side, "norm_out"), f"{side}.head.0", f"{side}.norm_out")
        add("conv", (side, "conv_out"), f"{side}.head.2", f"{side}.conv_out")

    levels = len(cfg.dim_mult)
    add("conv", ("encoder", "conv_in"), "encoder.conv1", "encoder.conv_in")
    n, c = 0, cfg.base_dim
    for i, mult in enumerate(cfg.dim_mult):
        for j in range(cfg.num_res_blocks):
            add(
                "res",
                ("encoder", f"down_{i}_res_{j}"),
                f"encoder.downsamples.{n}",
                f"encoder.down_blocks.{n}",
                shortcut=c != cfg.base_dim * mult,
            )
            n, c = n + 1, cfg.base_dim * mult
        if i < levels - 1:
            add(
                "resample",
                ("encoder", f"down_{i}_resample"),
                f"encoder.downsamples.{n}",
                f"encoder.down_blocks.{n}",
                temporal=cfg.temporal_downsample[i],
            )
            n += 1
    middle("encoder")
    head("encoder")
    add("conv", ("quant_conv",), "conv1", "quant_conv")
    add("conv", ("post_quant_conv",), "conv2", "post_quant_conv")
    mults, temporal = cfg.dim_mult[::-1], cfg.temporal_downsample[::-1]
    add("conv", ("decoder", "conv_in"), "decoder.conv1", "decoder.conv_in")
    middle("decoder")
    n, c = 0, cfg.base_dim * mults[0]
    for i, mult in enumerate(mults):
        for j in range(cfg.num_res_blocks + 1):
            add(
                "res",
                ("decoder", f"up_{i}_res_{j}"),
                f"decoder.upsamples.{n}",
                f"decoder.up_blocks.{i}.resnets.{j}",
                shortcut=c != cfg.base_dim * mult,
            )
            n, c = n + 1, cfg.base_dim * mult
        if i < levels - 1:
            add(
                "resample",
                ("decoder", f"up_{i}_resample"),
                f"decoder.upsamples.{n}",
                f"decoder.up_blocks.{i}.upsamplers.0",
                temporal=temporal[i],
            )
            n, c = n + 1, c // 2
    head("decoder")
    return keys


def load_wan_vae(path: str | Path, dtype: Any = jnp.float32) -> tuple[WanVAEConfig, dict]:
    """Reads a Wan2.1 VAE (`Wan2.1_VAE.pth`, a diffusers `vae/` folder or a pipeline root
    holding one) into (config, params for `fpsa_jax.model.vae.encode/decode`) in `dtype`."""
    path = Path(path).expanduser()
    if path.is_dir() and (path / "vae").is_dir():
        path = path / "vae"
    source = open_source(path)
    with source.reader as reader:
        names = set(reader)
        layout = detect_layout(names, source.description)
        # A config.json describes the weights only in a diffusers `vae/` folder: beside a
        # Wan2.1_VAE.pth it is the DiT's (an original model directory keeps both at its root).
        config_json = source.config_json if layout == DIFFUSERS else None
        config = infer_config(reader, names, layout, config_json)
        entries = vae_keys(config)
        _check_names(names, {getattr(e, layout) for e in entries}, source.description)
        shapes = _flax_shapes(config)
        params: dict[str, Any] = {}
        for e in entries:
            name = getattr(e, layout)
            want = _torch_shape(shapes[e.flax], e)
            if reader.shape(name) != want:
                raise CheckpointError(
                    f"{source.description}: tensor {name!r} has shape "
                    f"{reader.shape(name)}, expected {want} for {_brief(config)}"
                )
            value = _to_flax(np.asarray(reader.read(name)), e)
            set_path(params, e.flax, jnp.asarray(value.astype(np.float32), dtype=dtype))
    return config, params


def detect_layout(names: set[str], description: str) -> str:
    """ORIGINAL or DIFFUSERS, from the name of the encoder's first conv."""
    if "encoder.conv1.weight" in names:
        return ORIGINAL
    if "encoder.conv_in.weight" in names:
        return DIFFUSERS
    raise CheckpointError(
        f"{description} is not a Wan VAE checkpoint: neither "
        "'encoder.conv1.weight' (Wan2.1_VAE.pth) nor 'encoder.conv_in.weight' "
        f"(diffusers) is among its tensors {format_keys(names)}"
    )


def infer_config(
    reader: TensorReader, names: set[str], layout: str, config_json: dict[str, Any] | None
) -> WanVAEConfig:
    """The architecture from the tensors (encoder list, conv shapes), checked against a diffusers
    `config.json` when there is one, which also gives the latent mean and std."""
    orig = layout == ORIGINAL
    conv_in = reader.shape("encoder.conv1.weight" if orig else "encoder.conv_in.weight")
    post_quant = "conv2.weight" if orig else "post_quant_conv.weight"
    if post_quant not in names:
        raise CheckpointError(
            f"checkpoint has no {post_quant!r} (the post-quant conv), so it is not a full Wan VAE"
        )
    base_dim = conv_in[0]
    levels: list[list[int]] = [[]]  # output channels of each level's residual blocks
    temporal: list[bool] = []
    for prefix in _encoder_entries(names, orig):
        if f"{prefix}.resample.1.weight" in names:
            temporal.append(f"{prefix}.time_conv.weight" in names)
            levels.append([])
        else:
            conv2 = f"{prefix}.{'residual.6' if orig else 'conv2'}.weight"
            if conv2 not in names:
                raise CheckpointError(
                    f"encoder entry {prefix!r} is neither a residual block "
                    f"nor a resampler (no {conv2!r})"
                )
            levels[-1].append(reader.shape(conv2)[0])
    counts = {len(level) for level in levels}
    if len(counts) != 1 or 0 in counts or any(c % base_dim for lv in levels for c in lv):
        raise CheckpointError(
            f"cannot read a Wan2.1 encoder from the checkpoint: residual "
            f"blocks per level {[len(lv) for lv in levels]}, channels {levels}, "
            f"base dim {base_dim}"
        )
    fields: dict[str, Any] = dict(
        base_dim=base_dim,
        z_dim=reader.shape(post_quant)[0],
        in_channels=conv_in[1],
        dim_mult=tuple(lv[-1] // base_dim for lv in levels),
        num_res_blocks=counts.pop(),
        temporal_downsample=tuple(temporal),
    )
    if config_json is not None:
        for key, allowed in _UNSUPPORTED.items():
            if config_json.get(key) not in allowed:
                raise CheckpointError(
                    f"config.json sets {key} = {config_json[key]!r}: only the "
                    f"Wan2.1 VAE ({key} = {allowed[0]!r}) is supported"
                )
        for key, field in _STRUCTURE.items():
            if key in config_json and _plain(config_json[key]) != _plain(fields[field]):
                raise CheckpointError(
                    f"config.json says {key} = {config_json[key]!r} but the "
                    f"tensors have {fields[field]!r}"
                )
        dec = config_json.get("decoder_base_dim")
        if dec not in (None, base_dim):
            raise CheckpointError(
                f"config.json sets decoder_base_dim = {dec} != base_dim = "
                f"{base_dim}: only the Wan2.1 VAE (same dims) is supported"
            )
        for key in ("latents_mean", "latents_std"):
            if config_json.get(key) is not None:
                fields[key] = tuple(config_json[key])
    try:
        return WanVAEConfig(**fields)
    except ValueError as e:
        raise CheckpointError(f"checkpoint gives an invalid WanVAEConfig: {e}") from e


def _encoder_entries(names: set[str], orig: bool) -> Iterator[str]:
    """Prefixes of the encoder's flat list of residual blocks and resamplers, in order."""
    stem = "encoder.downsamples." if orig else "encoder.down_blocks."
    found = {int(k[len(stem) :].split(".")[0]) for k in names if k.startswith(stem)}
    for n in range(max(found, default=-1) + 1):
        yield f"{stem}{n}"


def _check_names(names: set[str], expected: set[str], description: str) -> None:
    missing, unexpected = expected - names, names - expected
    if missing or unexpected:
        parts = [f"{len(missing)} missing: {format_keys(missing)}"] if missing else []
        parts += [f"{len(unexpected)} unexpected: {format_keys(unexpected)}"] if unexpected else []
        raise CheckpointError(f"{description} does not match a Wan2.1 VAE: " + "; ".join(parts))


def _flax_shapes(config: WanVAEConfig) -> dict[tuple[str, ...], tuple[int, ...]]:
    tree = jax.eval_shape(lambda key: init_params(config, key), jax.random.key(0))
    flat = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {tuple(p.key for p in path): tuple(leaf.shape) for path, leaf in flat}


def _torch_shape(shape: tuple[int, ...], e: VAEKey) -> tuple[int, ...]:
    leaf = e.flax[-1]
    if leaf == "kernel":
        kt, kh, kw, i, o = shape
        return (o, i, kh, kw) if e.image else (o, i, kt, kh, kw)
    if leaf == "scale":
        return (shape[0], 1, 1) if e.image else (shape[0], 1, 1, 1)
    return shape


def _to_flax(x: np.ndarray, e: VAEKey) -> np.ndarray:
    leaf = e.flax[-1]
    if leaf == "kernel":
        return x.transpose(2, 3, 1, 0)[None] if e.image else x.transpose(2, 3, 4, 1, 0)
    return x.reshape(-1) if leaf == "scale" else x


def _plain(v: Any) -> Any:
    return [_plain(x) for x in v] if isinstance(v, list | tuple) else v


def _brief(c: WanVAEConfig) -> str:
    return (
        f"base_dim {c.base_dim}, z_dim {c.z_dim}, dim_mult {list(c.dim_mult)}, "
        f"{c.num_res_blocks} res blocks"
    )
