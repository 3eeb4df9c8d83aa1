"""Ulysses sequence parallelism for the FPSA self-attention.

Outside attention the tokens of a video are split over the mesh axis 'seq' ([B, L/s, N, D] per
device). The FPSA operator needs whole sequences (its tiles are 3D boxes of the token grid, and its
FP8 scales are per head over tile groups and over all tokens), so inside `jax.shard_map` one
all-to-all swaps the split from tokens to heads: each device then holds [B, L, N/s, D], every token
in the original row-major (t, h, w) order, runs `fpsa_attention` unchanged on its heads, and a
second all-to-all swaps back. Heads are independent, so the result equals single-device attention.
"""

from __future__ import annotations

import math

import jax
from jax.sharding import AbstractMesh, Mesh, PartitionSpec

from fpsa_jax.attention import FPSAConfig, Impl, fpsa_attention

Array = jax.Array

# Mesh axes that split the batch inside the shard_map (those of the 'batch' rule in rules.py).
BATCH_AXES: tuple[str, ...] = ("data", "fsdp")


def ulysses_attention(
    q: Array,
    k: Array,
    v: Array,
    *,
    grid: tuple[int, int, int],
    config: FPSAConfig | None = None,
    impl: Impl = "auto",
    scale: float | None = None,
    mesh: Mesh | AbstractMesh | None = None,
    axis: str = "seq",
) -> Array:
    """`fpsa_attention` with q, k, v split over tokens on mesh axis `axis`.

    Args:
      q, k, v: [B, L, N, D], L = T * H * W tokens in row-major (t, h, w) order; any layout (the
        shard_map re-shards inputs to [B over ('data', 'fsdp'), L over axis, N, D] if needed).
      grid, config, impl, scale: as in `fpsa_attention`.
      mesh: the mesh; None means the one in context (`jax.set_mesh`, see rules.use_sharding).
      axis: the sequence-parallel mesh axis.

    Returns:
      o: [B, L, N, D] in q's dtype, split over L on `axis` like the input.

    Without a mesh, without `axis` in it, or with `axis` of size 1 this is exactly
    `fpsa_attention`. Otherwise N and L must be divisible by the size s of `axis` (ValueError
    naming the sizes; pad the video or pick another `seq` size). The batch is split over the
    mesh's ('data', 'fsdp') axes too when B is divisible by their product, else replicated over
    them inside the shard_map (correct, but each replica computes the whole batch).
    """
    # With mesh=None, shard_map below also takes the context's mesh (abstract under jit).
    context_mesh = mesh if mesh is not None else jax.sharding.get_abstract_mesh()
    s = sequence_parallel_size(context_mesh, axis)
    if s == 1:
        return fpsa_attention(q, k, v, grid=grid, config=config, impl=impl, scale=scale)
    b, length, n, _ = q.shape
    if n % s:
        raise ValueError(
            f"Ulysses attention splits heads over mesh axis {axis!r} of size {s}, but the "
            f"{n} heads are not divisible by {s}; choose a seq size that divides {n}"
        )
    if length % s:
        raise ValueError(
            f"Ulysses attention splits the L={length} tokens (grid {tuple(grid)}) over mesh axis "
            f"{axis!r} of size {s}, but L is not divisible by {s}; pad the video or choose a seq "
            f"size that divides L"
        )
    batch_axes = _batch_axes(context_mesh, b, exclude=axis)
    spec = PartitionSpec(batch_axes, axis, None, None)

    def local(q, k, v):  # [b', L/s, N, D] each
        q, k, v = (_tokens_to_heads(x, axis) for x in (q, k, v))  # [b', L, N/s, D]
        o = fpsa_attention(q, k, v, grid=grid, config=config, impl=impl, scale=scale)
        return _heads_to_tokens(o, axis)  # [b', L/s, N, D]

    return jax.shard_map(local, mesh=mesh, in_specs=(spec,) * 3, out_specs=spec)(q, k, v)


def sequence_parallel_size(mesh: Mesh | AbstractMesh | None, axis: str = "seq") -> int:
    """Size of `axis` in `mesh` (1 if there is no mesh or no such axis)."""
    if mesh is None or mesh.empty or axis not in mesh.axis_names:
        return 1
    return mesh.shape[axis]


def _tokens_to_heads(x: Array, axis: str) -> Array:
    # [b, L/s, N, D] -> [b, L, N/s, D]: head chunk j goes to device j; token chunks are stacked in
    # device order, which is the original token order (device i held tokens [i L/s, (i+1) L/s)).
    return jax.lax.all_to_all(x, axis, split_axis=2, concat_axis=1, tiled=True)


def _heads_to_tokens(x: Array, axis: str) -> Array:
    # [b, L, N/s, D] -> [b, L/s, N, D], the inverse of _tokens_to_heads.
    return jax.lax.all_to_all(x, axis, split_axis=1, concat_axis=2, tiled=True)


def _batch_axes(mesh: Mesh | AbstractMesh, batch: int, exclude: str) -> tuple[str, ...] | None:
    axes = tuple(a for a in BATCH_AXES if a in mesh.axis_names and a != exclude)
    axes = tuple(a for a in axes if mesh.shape[a] > 1)
    if not axes or batch % math.prod(mesh.shape[a] for a in axes):
        return None
    return axes
