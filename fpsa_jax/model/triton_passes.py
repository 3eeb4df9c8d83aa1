"""Who writes the DiT's fused per-token passes: the jnp definitions ("xla") or a Triton kernel.

Two families use it: the FP8 linears' input quantization (`fp8_linear.quantize_*_tokens`,
`pallas_kernels.triton_row_quant`) and the q/k RMSNorm with its RoPE (`norms.rms_norm`,
`pallas_kernels.triton_rms_rope`). Each pass is defined by its jnp function; the kernel computes
the same values up to the order of float32 sums, in one pass over each row instead of XLA's two
to four.

  "xla"     the jnp definition (any backend, differentiable, shards under a mesh)
  "triton"  the kernel; a ValueError naming the reason where it cannot run
  "auto"    the kernel where it can run, else the jnp definition
"""

from __future__ import annotations

from typing import Literal, get_args

import jax

Writer = Literal["auto", "xla", "triton"]
WRITERS: tuple[str, ...] = get_args(Writer)


def triton_support() -> str | None:
    """None when a Triton row pass can run here (a GPU backend, jax-triton installed, no
    multi-device mesh in context), else a phrase naming why not."""
    if jax.default_backend() != "gpu":
        return f"the backend is {jax.default_backend()}"
    mesh = jax.sharding.get_abstract_mesh()
    if not (mesh.empty or mesh.size == 1):
        return "a multi-device mesh is in context (XLA shards the per-token reductions)"
    try:
        import jax_triton  # noqa: F401
    except ImportError:
        return "jax-triton is not installed"
    return None


def use_triton(writer: str, why_not: str | None, what: str) -> bool:
    """Whether `writer` means the kernel, given `why_not` (None when the kernel can run here).

    Raises ValueError for an unknown writer, or for "triton" where it cannot run (naming `what`
    is written and why)."""
    if writer not in WRITERS:
        raise ValueError(f"unknown {what} writer {writer!r}; valid: {list(WRITERS)}")
    if writer == "xla":
        return False
    if writer == "triton" and why_not is not None:
        raise ValueError(f"{what} writer 'triton' cannot run: {why_not}; writer 'xla' can")
    return why_not is None
