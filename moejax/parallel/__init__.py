"""Meshes, logical axis rules, sharded creation and expert parallelism.

See :mod:`moejax.parallel.mesh` for the mesh axes and rules, :mod:`moejax.parallel.expert` for
the expert-parallel dispatch the MoE layer uses under a mesh with an ``expert`` axis.
"""

from moejax.parallel.expert import (
    ExpertParallelLayout,
    capacity_expert_parallel,
    dropless_expert_parallel,
    expert_parallel_layout,
)
from moejax.parallel.mesh import (
    DEFAULT_RULES,
    MESH_AXES,
    MeshRoles,
    active_mesh,
    batch_sharding,
    batch_spec,
    constrain,
    create_sharded,
    current_rules,
    fallback_rules,
    has_explicit_axes,
    logical_to_spec,
    make_mesh,
    rules_for,
    shard_batch,
    state_shardings,
    use_mesh,
)

__all__ = [
    "DEFAULT_RULES",
    "ExpertParallelLayout",
    "MESH_AXES",
    "MeshRoles",
    "active_mesh",
    "batch_sharding",
    "batch_spec",
    "capacity_expert_parallel",
    "constrain",
    "create_sharded",
    "current_rules",
    "dropless_expert_parallel",
    "fallback_rules",
    "expert_parallel_layout",
    "has_explicit_axes",
    "logical_to_spec",
    "make_mesh",
    "rules_for",
    "shard_batch",
    "state_shardings",
    "use_mesh",
]
