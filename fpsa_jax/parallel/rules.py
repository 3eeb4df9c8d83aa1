"""The logical-axis rules table and the helpers that place parameters and activations with it.

Parameters carry logical axis names (`nn.with_logical_partitioning`) and activations logical
constraints (`nn.with_logical_constraint`); `LOGICAL_AXIS_RULES` maps those names to the axes of
the ("data", "fsdp", "seq") mesh, for training and inference alike. Rules are tried in order and a
mesh axis is used at most once per array, so an activation [B, L, dim] named
('batch', 'length', 'embed') becomes P(('data', 'fsdp'), 'seq', None) (batch takes fsdp first),
while a parameter [dim, dim] named ('embed', 'heads') becomes P('fsdp', None): FSDP.

Typical use (an app):

    mesh = make_mesh(data=2, fsdp=-1)
    param_sh = logical_to_mesh_sharding(param_logical_axes(cfg), mesh, shapes=params)
    params = jax.device_put(params, param_sh)          # or shard_params(...)
    with use_sharding(mesh):                           # trace and run under the mesh + rules
        out = jax.jit(step, in_shardings=(param_sh, ...), out_shardings=...)(params, ...)
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Sequence
from typing import Any

import flax.linen as nn
import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

LogicalRules = Sequence[tuple[str, str | tuple[str, ...] | None]]

LOGICAL_AXIS_RULES: tuple[tuple[str, str | tuple[str, ...] | None], ...] = (
    # Examples are split over every data-parallel device: pure data and FSDP replicas alike.
    ("batch", ("data", "fsdp")),
    # Tokens over the sequence axis; self-attention re-shards them to heads (ulysses.py).
    ("length", "seq"),
    # FSDP: parameters are split over the model dimension. Activations never use it (their batch
    # dimension already took 'fsdp'), so the partitioner all-gathers a weight before its matmul.
    ("embed", "fsdp"),
    # No tensor-parallel axis: the mesh has none, and Ulysses' head split lives inside shard_map.
    ("heads", None),
    ("kv", None),
    ("mlp", None),
    # Scanned layers stay whole on each device (nn.scan slices one layer per step).
    ("layers", None),
    # The UMT5 vocabulary: its embedding is already FSDP-sharded over 'embed'.
    ("vocab", None),
)


def unmapped_logical_names(spec_tree: Any, rules: LogicalRules = LOGICAL_AXIS_RULES) -> set[str]:
    """Logical names used in a tree of logical PartitionSpecs that `rules` does not mention."""
    known = {name for name, _ in rules}
    used: set[str] = set()
    for spec in jax.tree.leaves(spec_tree, is_leaf=_is_spec):
        used.update(_names(spec))
    return used - known


def check_rules_cover(spec_tree: Any, rules: LogicalRules = LOGICAL_AXIS_RULES) -> None:
    """Raises ValueError naming the logical names of `spec_tree` that `rules` does not map (Flax
    would silently leave such dimensions replicated)."""
    missing = unmapped_logical_names(spec_tree, rules)
    if missing:
        raise ValueError(
            f"logical axis names {sorted(missing)} have no rule; known: {[n for n, _ in rules]}"
        )


def logical_sharding(
    names: PartitionSpec | Sequence[str | None] | None,
    mesh: Mesh,
    rules: LogicalRules = LOGICAL_AXIS_RULES,
    shape: Sequence[int] | None = None,
) -> NamedSharding:
    """The NamedSharding of one array whose dimensions carry logical `names`.

    Mesh axes that `mesh` lacks are dropped. With `shape`, a dimension whose size is not divisible
    by the product of its mesh axes falls back to replicated on that dimension (e.g. an odd
    output width under fsdp=2), instead of failing at `device_put`.
    """
    mesh_spec = nn.logical_to_mesh_axes(tuple(names) if names is not None else (), rules)
    entries = []
    for i, axes in enumerate(mesh_spec):
        axes = _present_axes(axes, mesh)
        if axes and shape is not None:
            if shape[i] % math.prod(mesh.shape[a] for a in axes):
                axes = ()
        entries.append(None if not axes else axes[0] if len(axes) == 1 else axes)
    return NamedSharding(mesh, PartitionSpec(*entries))


def logical_to_mesh_sharding(
    spec_tree: Any,
    mesh: Mesh,
    rules: LogicalRules = LOGICAL_AXIS_RULES,
    shapes: Any | None = None,
) -> Any:
    """A tree of logical PartitionSpecs (e.g. `param_logical_axes(config)`) -> NamedSharding tree.

    shapes: optional tree of the same structure whose leaves have `.shape` (the arrays themselves,
    or `jax.ShapeDtypeStruct`s); with it, non-divisible dimensions fall back to replicated (see
    `logical_sharding`).
    """
    if shapes is None:
        return jax.tree.map(lambda s: logical_sharding(s, mesh, rules), spec_tree, is_leaf=_is_spec)
    return jax.tree.map(
        lambda s, x: logical_sharding(s, mesh, rules, x.shape), spec_tree, shapes, is_leaf=_is_spec
    )


def shard_params(
    params: Any, mesh: Mesh, logical_specs: Any, rules: LogicalRules = LOGICAL_AXIS_RULES
) -> Any:
    """`params` placed on `mesh` by the rules (`device_put`); non-divisible dims are replicated."""
    return jax.device_put(params, logical_to_mesh_sharding(logical_specs, mesh, rules, params))


@contextlib.contextmanager
def use_sharding(mesh: Mesh, rules: LogicalRules = LOGICAL_AXIS_RULES) -> Iterator[Mesh]:
    """Activates `mesh` (`jax.set_mesh`) and the logical rules (`nn.logical_axis_rules`).

    Inside, the model's `nn.with_logical_constraint`s become sharding constraints and its
    self-attention runs sequence-parallel when the mesh's 'seq' axis is larger than one. Trace
    (first call of) a jitted function inside the context: the Flax rules are Python state, read
    at trace time. Outside any context the same code runs unsharded.
    """
    with jax.set_mesh(mesh), nn.logical_axis_rules(tuple(rules)):
        yield mesh


def _is_spec(x: Any) -> bool:
    return x is None or isinstance(x, PartitionSpec)


def _names(spec: PartitionSpec | None) -> list[str]:
    out: list[str] = []
    for entry in spec or ():
        if isinstance(entry, str):
            out.append(entry)
        elif isinstance(entry, tuple):
            out.extend(e for e in entry if isinstance(e, str))
    return out


def _present_axes(axes: Any, mesh: Mesh) -> tuple[str, ...]:
    if axes is None:
        return ()
    axes = (axes,) if isinstance(axes, str) else tuple(axes)
    return tuple(a for a in axes if a in mesh.axis_names)
