"""Random weights of the right shapes, without running a model's initialisers.

For smoke runs, benchmarks and the placeholder default model: timing and plumbing need real,
non-zero numbers, not trained ones.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

# Below this many parameters the draw runs in NumPy on the host: XLA's CPU compiler takes ~0.2 s
# per random op, so a model with a hundred leaves would spend half a minute compiling. Above it
# (real Wan sizes) NumPy would take minutes and host memory, and the draw runs on the device.
HOST_DRAW_LIMIT = 100_000_000


@functools.partial(jax.jit, static_argnums=(1, 2, 3))
def _device_normal(key: jax.Array, shape: tuple[int, ...], dtype, std: float) -> jax.Array:
    """std * N(0, 1) drawn in float32 and rounded to `dtype` in one fused program (only the
    result is materialised). Drawing in bfloat16 itself would give ~128 distinct values, cut at
    ~2.9 std: a lattice whose FP8 rounding errors no longer average out (benchmarks/RESULTS.md)."""
    return (std * jax.random.normal(key, shape, jnp.float32)).astype(dtype)


def random_weights(init_fn: Callable[[jax.Array], Any], key: jax.Array, std: float = 0.02) -> Any:
    """A pytree shaped like `init_fn(key)`'s output: normal(0, std) leaves, and 1 + normal(0, std)
    for leaves named 'scale' (norm gains), so activations neither vanish nor explode.

    Only `jax.eval_shape(init_fn, key)` runs the model code. Deterministic in `key`.
    """
    shapes = jax.eval_shape(init_fn, key)
    leaves, tree = jax.tree_util.tree_flatten_with_path(shapes)
    total = sum(math.prod(leaf.shape) for _, leaf in leaves)
    keys = jax.random.split(key, len(leaves))
    out = []
    for k, (path, leaf) in zip(keys, leaves, strict=True):
        if total <= HOST_DRAW_LIMIT:
            rng = np.random.default_rng(np.asarray(jax.random.key_data(k)))
            noise = std * rng.standard_normal(leaf.shape, np.float32)
            noise = jax.numpy.asarray(noise, leaf.dtype)
        else:
            noise = _device_normal(k, tuple(leaf.shape), jnp.dtype(leaf.dtype), float(std))
        is_scale = jax.tree_util.keystr(path).endswith("['scale']")
        out.append(noise + 1 if is_scale else noise)
    return jax.tree.unflatten(tree, out)
