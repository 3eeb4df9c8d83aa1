"""Measuring self-attention along a sampling run: a Flax method interceptor for `wan_model_fn`.

`attention_probe(measure, report)` returns an interceptor (`wan_model_fn(..., interceptor=...)`)
that, at every self-attention layer of every model call, hands the operator's inputs q, k, v
[B, L, N, D] (`Attention.qkv`: projected, normed, rotated, in the model's dtype) and the layer's
`AttentionCall` to `measure`, a traced function returning a pytree of arrays. Each layer sows the
result; when `WanModel.__call__` returns, the pytree with leaves stacked over layers
[num_layers, ...] goes to `report` on the host through an ordered `jax.debug.callback`, so reports
arrive model call by model call, i.e. step by step of `fpsa_jax.sampling.sample`. What `measure`
computes is extra work in the same compiled program; the model's output is unchanged.

Keep what `measure` returns small where it can be (sums, not activations): it crosses to the
host once per step. Without a mesh only (the inputs of a sequence-parallel layer are shards).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import jax

from fpsa_jax.attention import FPSAConfig, Impl
from fpsa_jax.model.wan import Attention, WanModel

_SOWN = "attention_probe"


@dataclasses.dataclass(frozen=True)
class AttentionCall:
    """One self-attention layer call: its token grid (T, H, W), the operator the model runs
    there (None = dense) and the implementation it runs with."""

    grid: tuple[int, int, int]
    attention: FPSAConfig | None
    impl: Impl


# measure(q, k, v, call) -> pytree of arrays; report(pytree with leaves [num_layers, ...]).
Measure = Callable[[jax.Array, jax.Array, jax.Array, AttentionCall], Any]
Report = Callable[[Any], None]


def attention_probe(measure: Measure, report: Report) -> Callable[..., Any]:
    """An interceptor running `measure` at every self-attention layer and `report` per model
    call (see the module docstring)."""

    def intercept(next_fun, args, kwargs, context):
        module = context.module
        if isinstance(module, WanModel) and context.method_name == "__call__":
            out = next_fun(*args, **kwargs)
            jax.debug.callback(report, _sown(module.variables["intermediates"]), ordered=True)
            return out
        if (
            isinstance(module, Attention)
            and module.grid is not None
            and context.method_name == "qkv"
        ):
            q, k, v = qkv = next_fun(*args, **kwargs)
            call = AttentionCall(module.grid, module.attention, module.attention_impl)
            module.sow("intermediates", _SOWN, measure(q, k, v, call))
            return qkv
        return next_fun(*args, **kwargs)

    return intercept


def _sown(tree: Any) -> Any:
    """The one value sown under _SOWN in the "intermediates" collection (stacked by the scan)."""
    found = []

    def visit(node):
        if isinstance(node, Mapping):
            for key, value in node.items():
                if key == _SOWN:
                    found.extend(value)  # sow keeps a tuple of the values sown
                else:
                    visit(value)

    visit(tree)
    if len(found) != 1:
        raise ValueError(f"expected one sown attention measurement, found {len(found)}")
    return found[0]
