"""Mesh, logical-axis rules and sequence parallelism (DESIGN.md section 4b)."""

from fpsa_jax.parallel.mesh import MESH_AXES, check_mesh_shape, make_mesh
from fpsa_jax.parallel.rules import (
    LOGICAL_AXIS_RULES,
    check_rules_cover,
    logical_sharding,
    logical_to_mesh_sharding,
    shard_params,
    unmapped_logical_names,
    use_sharding,
)
from fpsa_jax.parallel.ulysses import sequence_parallel_size, ulysses_attention

__all__ = [
    "LOGICAL_AXIS_RULES",
    "MESH_AXES",
    "check_mesh_shape",
    "check_rules_cover",
    "logical_sharding",
    "logical_to_mesh_sharding",
    "make_mesh",
    "sequence_parallel_size",
    "shard_params",
    "ulysses_attention",
    "unmapped_logical_names",
    "use_sharding",
]
