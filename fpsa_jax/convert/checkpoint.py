"""`load_wan_checkpoint`: a PyTorch Wan2.1 DiT checkpoint -> (WanConfig, Flax params).

Steps: open the files (`sources`), detect the key layout and rename diffusers keys to the original
ones (`keys`), infer the config from tensor shapes and cross-check it against `config.json`,
validate every key and shape, then convert tensor by tensor into the target dtype.
"""

from __future__ import annotations

import dataclasses
import math
import re
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from fpsa_jax.config import WanConfig
from fpsa_jax.convert import keys as K
from fpsa_jax.convert.errors import CheckpointError, format_keys
from fpsa_jax.convert.sources import TensorReader, open_source
from fpsa_jax.convert.tree import dtype_name, require_shapes, set_path, stack_layers

# Every Wan2.1 model uses 128-channel heads; the fallback when nothing gives num_heads.
_DEFAULT_HEAD_DIM = 128
# Tensors the config is inferred from (original names).
_SHAPE_KEYS = {
    "patch_embedding.weight": 5,  # [D, in_dim, pt, ph, pw]
    "text_embedding.0.weight": 2,  # [D, text_dim]
    "time_embedding.0.weight": 2,  # [D, freq_dim]
    "blocks.0.ffn.0.weight": 2,  # [ffn_dim, D]
    "head.head.weight": 2,  # [out_dim * P, D]
}
# config.json fields (original names / diffusers names) -> WanConfig fields.
_ORIGINAL_JSON = {
    f: f
    for f in (
        "dim",
        "ffn_dim",
        "in_dim",
        "out_dim",
        "text_dim",
        "freq_dim",
        "num_layers",
        "patch_size",
        "qk_norm",
        "cross_attn_norm",
    )
}
_DIFFUSERS_JSON = {
    "in_channels": "in_dim",
    "out_channels": "out_dim",
    "text_dim": "text_dim",
    "freq_dim": "freq_dim",
    "ffn_dim": "ffn_dim",
    "num_layers": "num_layers",
    "patch_size": "patch_size",
    "cross_attn_norm": "cross_attn_norm",
}


@dataclasses.dataclass
class LoadedCheckpoint:
    """What `read_wan_checkpoint` found: config, params, key layout and a description of the
    files read."""

    config: WanConfig
    params: dict[str, Any]
    layout: K.Layout
    description: str


def load_wan_checkpoint(
    path: str | Path, dtype: Any = jnp.bfloat16, *, num_heads: int | None = None
) -> tuple[WanConfig, dict[str, Any]]:
    """Loads a Wan2.1 text-to-video DiT checkpoint as (WanConfig, Flax params).

    Args:
      path: a `.safetensors` file, a sharded `*.safetensors.index.json`, a `.pth`/`.pt` file
        (torch only for the legacy pre-zip format), or a model directory (Wan2.1 repo,
        diffusers repo root or its `transformer/` folder). Original and diffusers key layouts
        are detected from the keys.
      dtype: dtype of the returned parameters (bfloat16, float32 or float16); it also becomes
        the config's `param_dtype`.
      num_heads: used when no `config.json` sits beside the weights; else dim // 128.

    Returns:
      The config inferred from the tensor shapes (cross-checked against `config.json`) and the
      parameter tree of `fpsa_jax.model.wan.WanModel`: nested dicts of jax arrays on the default
      device, created leaf by leaf; `blocks` leaves are stacked with a leading [num_layers] axis.

    Raises:
      CheckpointError: for anything that is not a convertible Wan2.1 T2V DiT; the message names
        the offending files, keys or shapes. Missing paths raise its FileNotFoundError subclass.
    """
    loaded = read_wan_checkpoint(path, dtype, num_heads=num_heads)
    return loaded.config, loaded.params


def read_wan_checkpoint(
    path: str | Path, dtype: Any = jnp.bfloat16, *, num_heads: int | None = None
) -> LoadedCheckpoint:
    """`load_wan_checkpoint` plus what the CLI reports (layout, files read)."""
    target = dtype_name(dtype)
    source = open_source(path)
    with source.reader as reader:
        config, layout, original_to_file = _inspect(source, reader, num_heads, target)
        params = _convert(reader, original_to_file, config, np.dtype(target))
    return LoadedCheckpoint(config, params, layout, source.description)


def read_wan_config(path: str | Path, *, num_heads: int | None = None) -> WanConfig:
    """The WanConfig `load_wan_checkpoint(path)` would return, from the tensor headers and
    config.json alone (no tensor is read): for checks before a long load. Raises as it does."""
    source = open_source(path)
    with source.reader as reader:
        return _inspect(source, reader, num_heads, "bfloat16")[0]


def _inspect(source, reader, num_heads: int | None, param_dtype: str):
    """(config, key layout, original name -> file name) of an open checkpoint, validated."""
    names = set(reader)
    layout = K.detect_layout(names)
    if layout is None:
        raise CheckpointError(
            f"{source.description} does not look like a Wan2.1 DiT checkpoint: none of its "
            f"{len(names)} keys is a Wan key ({format_keys(names)})"
        )
    _reject_image_to_video(names, layout, source.config_json)
    original_to_file, unknown = _original_names(names, layout)
    shapes = {k: reader.shape(f) for k, f in original_to_file.items()}
    config = infer_config(shapes, source.config_json, num_heads=num_heads, param_dtype=param_dtype)
    _validate(config, original_to_file, unknown, shapes)
    return config, layout, original_to_file


def infer_config(
    shapes: dict[str, tuple[int, ...]],
    config_json: dict[str, Any] | None,
    *,
    num_heads: int | None,
    param_dtype: str,
) -> WanConfig:
    """WanConfig from original-name tensor shapes, cross-checked against `config_json`."""
    require_shapes(shapes, _SHAPE_KEYS, "original names")
    dim, in_dim, *patch = shapes["patch_embedding.weight"]
    head_rows = shapes["head.head.weight"][0]
    if head_rows % math.prod(patch):
        raise CheckpointError(
            f"key 'head.head.weight': {head_rows} output rows is not a "
            f"multiple of the patch volume {math.prod(patch)} (patch {patch})"
        )
    inferred = dict(
        dim=dim,
        in_dim=in_dim,
        patch_size=tuple(patch),
        text_dim=shapes["text_embedding.0.weight"][1],
        freq_dim=shapes["time_embedding.0.weight"][1],
        ffn_dim=shapes["blocks.0.ffn.0.weight"][0],
        out_dim=head_rows // math.prod(patch),
        num_layers=1 + max(int(m[1]) for k in shapes if (m := re.match(r"blocks\.(\d+)\.", k))),
        qk_norm=any(re.fullmatch(r"blocks\.\d+\.self_attn\.norm_q\.weight", k) for k in shapes),
        cross_attn_norm=any(re.fullmatch(r"blocks\.\d+\.norm3\.weight", k) for k in shapes),
    )
    declared, extra = _read_config_json(config_json)
    mismatches = [
        f"{field}: config.json says {declared[field]!r}, the weights say {value!r}"
        for field, value in inferred.items()
        if field in declared and declared[field] != value
    ]
    if mismatches:
        raise CheckpointError(
            "config.json disagrees with the tensor shapes: " + "; ".join(mismatches)
        )
    inferred["num_heads"] = _num_heads(dim, declared.get("num_heads"), num_heads)
    try:
        return WanConfig(**inferred, **extra, dtype="bfloat16", param_dtype=param_dtype)
    except ValueError as e:
        raise CheckpointError(f"the inferred config is invalid: {e}") from e


def _read_config_json(config: dict[str, Any] | None) -> tuple[dict[str, Any], dict[str, Any]]:
    """(values to cross-check, values to take as they are) from an original or diffusers
    config.json; other JSON gives nothing."""
    if not config:
        return {}, {}
    if "num_attention_heads" in config:  # diffusers WanTransformer3DModel
        declared = {
            ours: config[theirs]
            for theirs, ours in _DIFFUSERS_JSON.items()
            if config.get(theirs) is not None
        }
        declared["num_heads"] = config["num_attention_heads"]
        if "attention_head_dim" in config:
            declared["dim"] = config["num_attention_heads"] * config["attention_head_dim"]
    elif "num_heads" in config or "dim" in config:  # original Wan2.1 WanModel
        declared = {
            ours: config[theirs]
            for theirs, ours in _ORIGINAL_JSON.items()
            if config.get(theirs) is not None
        }
        if "num_heads" in config:
            declared["num_heads"] = config["num_heads"]
    else:
        return {}, {}
    if "patch_size" in declared:
        declared["patch_size"] = tuple(declared["patch_size"])
    extra = {f: config[f] for f in ("eps", "text_len") if config.get(f) is not None}
    return declared, extra


def _num_heads(dim: int, from_json: int | None, from_arg: int | None) -> int:
    if from_json is not None and from_arg is not None and from_json != from_arg:
        raise CheckpointError(f"num_heads={from_arg} was passed but config.json says {from_json}")
    if from_json is not None or from_arg is not None:
        return from_json if from_json is not None else from_arg
    if dim % _DEFAULT_HEAD_DIM == 0:
        return dim // _DEFAULT_HEAD_DIM
    raise CheckpointError(
        f"cannot determine num_heads: no config.json beside the weights and dim={dim} is not a "
        f"multiple of the usual head dim {_DEFAULT_HEAD_DIM}: put the model's config.json (it "
        "names num_heads) beside the weights, or convert them with `python -m fpsa_jax.convert "
        "--num_heads N` (load_wan_checkpoint(..., num_heads=N) in Python)"
    )


def _reject_image_to_video(
    names: set[str], layout: K.Layout, config_json: dict[str, Any] | None
) -> None:
    found = [n for n in names if K.I2V_MARKERS[layout].search(n)]
    config_json = config_json or {}
    declared = (
        config_json.get("model_type") in ("i2v", "flf2v")
        or config_json.get("image_dim") is not None
        or config_json.get("added_kv_proj_dim") is not None
    )
    if found or declared:
        what = f"keys {format_keys(found)}" if found else "its config.json"
        raise CheckpointError(
            "image-to-video checkpoints are not supported (only the Wan2.1 "
            f"text-to-video DiT is); this one is I2V by {what}"
        )


def _original_names(names: set[str], layout: K.Layout) -> tuple[dict[str, str], list[str]]:
    """({original name: name in the file}, file names with no original counterpart)."""
    if layout == "original":
        return {n: n for n in names}, []
    mapping, unknown = {}, []
    for n in names:
        original = K.diffusers_to_original(n)
        if original is None:
            unknown.append(n)
        else:
            mapping[original] = n
    return mapping, unknown


def _validate(
    config: WanConfig,
    original_to_file: dict[str, str],
    unknown: list[str],
    shapes: dict[str, tuple[int, ...]],
) -> None:
    expected = K.expected_keys(config)
    problems = []
    missing = expected.keys() - original_to_file.keys()
    if missing:
        problems.append(f"missing keys ({len(missing)}, original names): {format_keys(missing)}")
    unexpected = unknown + [f for k, f in original_to_file.items() if k not in expected]
    if unexpected:
        problems.append(f"unexpected keys ({len(unexpected)}): {format_keys(unexpected)}")
    wrong = {
        original_to_file[k]: (e.torch_shape, shapes[k])
        for k, e in expected.items()
        if k in shapes and shapes[k] != e.torch_shape
    }
    if wrong:
        listed = [
            f"{name!r} expected {exp} found {got}"
            for name, (exp, got) in sorted(wrong.items())[:10]
        ]
        more = f" and {len(wrong) - 10} more" if len(wrong) > 10 else ""
        problems.append(f"wrong shapes ({len(wrong)}): " + ", ".join(listed) + more)
    if problems:
        raise CheckpointError(
            f"checkpoint does not match the inferred config ({_brief(config)}): "
            + "; ".join(problems)
        )


def _brief(c: WanConfig) -> str:
    return (
        f"dim={c.dim}, ffn_dim={c.ffn_dim}, num_layers={c.num_layers}, in_dim={c.in_dim}, "
        f"out_dim={c.out_dim}, text_dim={c.text_dim}, patch={c.patch_size}"
    )


def _convert(
    reader: TensorReader, original_to_file: dict[str, str], config: WanConfig, dtype: np.dtype
) -> dict[str, Any]:
    """Builds the tree leaf by leaf; each stacked `blocks` leaf goes to the device layer by
    layer (`stack_layers`), so host memory holds a few layers beyond the result."""
    params: dict[str, Any] = {}
    for key, entry in K.top_level_entries(config).items():
        leaf = K.apply_transform(reader.read(original_to_file[key]), entry.transform)
        set_path(params, entry.path, jax.device_put(leaf.astype(dtype)))
    for rel, entry in K.block_entries(config).items():
        read = lambda i, rel=rel, entry=entry: K.apply_transform(  # noqa: E731
            reader.read(original_to_file[f"blocks.{i}.{rel}"]), entry.transform
        )
        set_path(params, ("blocks", *entry.path), stack_layers(read, config.num_layers, dtype))
    return params
