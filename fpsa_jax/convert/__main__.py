"""Converts a PyTorch Wan2.1 DiT checkpoint into an orbax checkpoint + config.json.

python -m fpsa_jax.convert --src /ckpt/Wan2.1-T2V-1.3B --dst /ckpt/wan-1.3b-jax
python -m fpsa_jax.convert --src /ckpt/Wan2.1-T2V-14B --dst /ckpt/wan-14b-fp8 --linear_quant fp8
"""

from __future__ import annotations

import time

from absl import app, flags

from fpsa_jax import cli
from fpsa_jax.convert.checkpoint import read_wan_checkpoint
from fpsa_jax.convert.destination import converted_size, prepare_destination
from fpsa_jax.convert.errors import CheckpointError
from fpsa_jax.convert.export import save_converted
from fpsa_jax.convert.sources import open_source
from fpsa_jax.model.fp8_linear import quantize_linear_weights
from fpsa_jax.outputs import OutputError, stop_on_signals

_SRC = flags.DEFINE_string(
    "src",
    None,
    "Checkpoint to convert: a .safetensors file, a *.safetensors.index.json, a "
    ".pth/.pt file, or a model directory (Wan2.1 repo, diffusers repo root or its transformer/ "
    "folder). Original and diffusers key layouts are detected automatically.",
    required=True,
)
_DST = flags.DEFINE_string(
    "dst",
    None,
    "Output directory, outside --src; receives params/ (orbax) and config.json. Written "
    "atomically through a sibling temp directory (those of killed earlier runs are removed).",
    required=True,
)
_DTYPE = flags.DEFINE_enum(
    "dtype",
    "bfloat16",
    ["bfloat16", "float32", "float16"],
    "Dtype the parameters are stored in; also recorded as the config's param_dtype.",
)
_NUM_HEADS = flags.DEFINE_integer(
    "num_heads",
    None,
    "Attention heads, needed only when the checkpoint has no config.json "
    "beside it and dim is not a multiple of 128 (otherwise dim // 128).",
    lower_bound=1,
)
_LINEAR_QUANT = flags.DEFINE_enum(
    "linear_quant",
    "none",
    ["none", "fp8"],
    "fp8: store the block linears as FP8 (E4M3) kernels + float32 per-output-channel scales "
    "(half the bytes of bf16), for inference with WanConfig.linear_quant='fp8'; the config "
    "records it. Training needs float weights: convert without it.",
)
_OVERWRITE = flags.DEFINE_bool(
    "overwrite",
    False,
    "Replace --dst when it already exists and is not empty; only a converted checkpoint "
    "(config.json and params/) is ever replaced.",
)


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    start = time.perf_counter()
    try:
        with stop_on_signals():  # SIGTERM removes the temp directory as Ctrl-C does
            loaded, config, dst = _convert()
    except (CheckpointError, FileExistsError, OutputError) as e:
        # Errors about the user's files: a message, not a traceback.
        raise SystemExit(f"error: {e}") from e
    c = config
    print(f"read      {loaded.description} ({loaded.layout} key layout)")
    print(
        f"config    dim={c.dim} ffn_dim={c.ffn_dim} heads={c.num_heads} layers={c.num_layers} "
        f"in/out={c.in_dim}/{c.out_dim} text_dim={c.text_dim} patch={c.patch_size} "
        f"qk_norm={c.qk_norm} cross_attn_norm={c.cross_attn_norm}"
    )
    block = "FP8 block linears + float32 scales, the rest " if c.linear_quant == "fp8" else ""
    print(f"params    {c.num_params():,} in {block}{_DTYPE.value}")
    print(f"wrote     {dst} in {time.perf_counter() - start:.1f} s")


def _convert():
    """Checks --dst (apart from --src, replaceable, writable, room for the converted tensors)
    before the long read, then reads, quantizes when --linear_quant fp8 asks, and writes.
    Returns (the checkpoint read, the config written, dst)."""
    with open_source(_SRC.value).reader as reader:  # headers only
        size = converted_size(reader, _DTYPE.value, _LINEAR_QUANT.value)
    dst, removed = prepare_destination(_DST.value, _OVERWRITE.value, src=_SRC.value, size=size)
    if removed:
        print(f"removed {len(removed)} temp folder(s) of killed conversions to {dst}")
    loaded = read_wan_checkpoint(_SRC.value, _DTYPE.value, num_heads=_NUM_HEADS.value)
    config, params = loaded.config, loaded.params
    if _LINEAR_QUANT.value == "fp8":
        config = config.replace(linear_quant="fp8")
        params = quantize_linear_weights(params)
    save_converted(dst, config, params, overwrite=_OVERWRITE.value)
    return loaded, config, dst


if __name__ == "__main__":
    cli.run(main)
