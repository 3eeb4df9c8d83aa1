"""A linear's output before its epilogue, so that the pass consuming it can apply the epilogue.

The q and k projections feed the attention's RMSNorm (`norms.rms_norm`), whose Triton pass reads
each token's row anyway: handed a `PendingLinear`, it adds the bias (and for FP8 linears applies
both scales) on the way in, instead of XLA writing the finished linear output in a pass of its
own (~0.9 ms per projection at 14B/720p, benchmarks/RESULTS.md).
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp

Array = jax.Array


@flax.struct.dataclass
class PendingLinear:
    """y = epilogue(acc) [..., N] in `dtype`, not yet computed (`value`).

    acc: [..., N] the GEMM's sums; bias: [N] (None: acc is the output itself). Without scales
    (a float linear) y = acc + bias in acc's dtype, as nn.Dense adds it; with scales (an FP8
    linear, `fp8_linear.Fp8Dense`) y = (acc * row_scale * col_scale + bias).astype(dtype) in
    float32, row_scale [..., 1] per token, col_scale [1, N] per output channel.
    """

    acc: Array
    bias: Array | None
    row_scale: Array | None = None
    col_scale: Array | None = None
    dtype: Any = flax.struct.field(pytree_node=False, default=None)

    @property
    def shape(self) -> tuple[int, ...]:
        return self.acc.shape

    def value(self) -> Array:
        """The linear's output, computed exactly as the linear would have."""
        if self.bias is None:
            return self.acc
        if self.row_scale is None:
            return self.acc + self.bias.astype(self.acc.dtype)
        y = self.acc.astype(jnp.float32) * self.row_scale * self.col_scale
        return (y + self.bias.astype(jnp.float32)).astype(self.dtype)


class PendingDense(nn.Dense):
    """nn.Dense (same parameters, same values) returning its output as a `PendingLinear`."""

    @nn.compact
    def __call__(self, inputs: Array) -> PendingLinear:
        kernel = self.param(
            "kernel", self.kernel_init, (inputs.shape[-1], self.features), self.param_dtype
        )
        bias = self.param("bias", self.bias_init, (self.features,), self.param_dtype)
        inputs, kernel, bias = self.promote_dtype(inputs, kernel, bias, dtype=self.dtype)
        acc = jax.lax.dot_general(
            inputs, kernel, (((inputs.ndim - 1,), (0,)), ((), ())), precision=self.precision
        )
        return PendingLinear(acc, bias, dtype=acc.dtype)
