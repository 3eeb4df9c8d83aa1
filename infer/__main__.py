"""`python -m infer`: run the Wan2.1 DiT.

Until the sampler lands (issue 5) this runs one DiT forward on random latents, with the tiny preset
or a real checkpoint (`--ckpt_dir`), and reports what it did. Flags follow Wan2.1's generate.py.
"""

from __future__ import annotations

import time

from absl import app, flags, logging

_TASK = flags.DEFINE_enum(
    "task",
    "tiny",
    ["tiny", "t2v-1.3B", "t2v-14B"],
    "Model preset; ignored when --ckpt_dir is given (read from the weights).",
)
_CKPT_DIR = flags.DEFINE_string(
    "ckpt_dir",
    None,
    "A Wan2.1 DiT checkpoint: model directory (original or diffusers layout), .safetensors file, "
    "sharded index JSON, or a directory written by `python -m fpsa_jax.convert`. "
    "Without it, random weights of --task are used.",
)
_SIZE = flags.DEFINE_string(
    "size", "64*48", "Video size as WIDTH*HEIGHT in pixels (multiple of 16)."
)
_FRAME_NUM = flags.DEFINE_integer("frame_num", 5, "Number of video frames, 4k+1.")
_BASE_SEED = flags.DEFINE_integer("base_seed", 0, "Seed of the random latents (and weights).")
_ATTENTION_IMPL = flags.DEFINE_string(
    "attention_impl", "auto", "FPSA operator implementation (auto, xla, reference, cudnn, ...)."
)


def _parse_size(size: str) -> tuple[int, int]:
    try:
        width, height = (int(s) for s in size.split("*"))
    except ValueError:
        raise app.UsageError(
            f"--size must look like 832*480 (WIDTH*HEIGHT), got {size!r}"
        ) from None
    if width <= 0 or height <= 0 or width % 16 or height % 16:
        raise app.UsageError(f"--size {size}: width and height must be positive multiples of 16")
    return width, height


def _load_weights(path: str):
    """A directory written by `python -m fpsa_jax.convert`, else any Wan2.1 DiT checkpoint."""
    from pathlib import Path

    from fpsa_jax.convert import CheckpointError, load_converted, load_wan_checkpoint

    try:
        if (Path(path) / "params").is_dir() and (Path(path) / "config.json").is_file():
            return load_converted(path)
        return load_wan_checkpoint(path)
    except CheckpointError as e:
        raise app.UsageError(f"--ckpt_dir {path}: {e}") from None


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    width, height = _parse_size(_SIZE.value)
    if _FRAME_NUM.value < 1 or (_FRAME_NUM.value - 1) % 4:
        raise app.UsageError(f"--frame_num must be 4k+1 (1, 5, ..., 81), got {_FRAME_NUM.value}")

    import jax
    import jax.numpy as jnp

    from fpsa_jax.config import WanConfig
    from fpsa_jax.model.wan import WanModel, init_params

    key = jax.random.key(_BASE_SEED.value)
    if _CKPT_DIR.value:
        config, params = _load_weights(_CKPT_DIR.value)
        source = _CKPT_DIR.value
    else:
        config = WanConfig.preset(_TASK.value)
        if _TASK.value == "tiny":
            logging.warning(
                "No --ckpt_dir: using RANDOM weights of the tiny preset. The embedded "
                "trained demo model and the sampler arrive in later releases."
            )
        params = init_params(config, key)
        source = f"random {_TASK.value} weights"

    frames = (_FRAME_NUM.value - 1) // 4 + 1
    shape = (1, frames, height // 8, width // 8, config.in_dim)
    k1, k2, k3 = jax.random.split(key, 3)
    latents = jax.random.normal(k1, shape, jnp.float32)
    timesteps = jax.random.uniform(k2, (1,), jnp.float32, 0.0, 1000.0)
    context = jax.random.normal(k3, (1, min(config.text_len, 16), config.text_dim), jnp.float32)

    model = WanModel(config, attention_impl=_ATTENTION_IMPL.value)
    forward = jax.jit(lambda p, x, t, c: model.apply({"params": p}, x, t, c))
    start = time.perf_counter()
    out = jax.block_until_ready(forward(params, latents, timesteps, context))
    first = time.perf_counter() - start
    start = time.perf_counter()
    out = jax.block_until_ready(forward(params, latents, timesteps, context))
    second = time.perf_counter() - start

    grid = (
        shape[1] // config.patch_size[0],
        shape[2] // config.patch_size[1],
        shape[3] // config.patch_size[2],
    )
    print(
        f"DiT forward ({source}): {config.num_params():,} parameters, "
        f"latents {shape} -> token grid {grid} = {grid[0] * grid[1] * grid[2]} tokens"
    )
    print(
        f"  output {out.shape} {out.dtype}, mean {float(out.mean()):+.4f}, "
        f"std {float(out.std()):.4f}, finite: {bool(jnp.isfinite(out).all())}"
    )
    print(f"  time: {first:.2f} s first call (with compilation), {second * 1e3:.1f} ms second")
    if not _CKPT_DIR.value:
        print("  (fresh weights: Wan zero-initialises the output head, so the prediction is zero)")
    print("  (video sampling arrives with the sampler; this run checks the model end to end)")


if __name__ == "__main__":
    app.run(main)
