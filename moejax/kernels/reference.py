"""The oracle backend: ``jax.lax.ragged_dot`` (gmm) and a masked product (tgmm).

Exact semantics, any platform, slow on CPU and GPU (``ragged_dot`` lowers to a masked dense product
there). ``group_offset`` is handled by padding the group list with zero "outside" groups.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from moejax.kernels.common import promote_types
from moejax.kernels.metadata import local_row_range


def gmm(lhs, rhs, group_sizes, group_offset, *, transpose_rhs, preferred_element_type, tiling,
        interpret):
    del tiling, interpret

    # lax.ragged_dot has no batching rule for a batched group list: under vmap, one call per item.
    @jax.custom_batching.sequential_vmap
    def one(lhs, rhs, group_sizes, group_offset):
        return _ragged_gmm(lhs, rhs, group_sizes, group_offset, transpose_rhs,
                           preferred_element_type)

    return one(lhs, rhs, group_sizes, group_offset)


def _ragged_gmm(lhs, rhs, group_sizes, group_offset, transpose_rhs, preferred_element_type):
    dtype = promote_types(lhs.dtype, rhs.dtype)
    lhs, rhs = lhs.astype(dtype), rhs.astype(dtype)
    if transpose_rhs:
        rhs = jnp.swapaxes(rhs, 1, 2)
    g, k, n = rhs.shape
    first, last = local_row_range(group_sizes, group_offset, g)
    local = jax.lax.dynamic_slice_in_dim(group_sizes, group_offset, g)
    zeros = jnp.zeros((1, k, n), rhs.dtype)
    rhs_ext = jnp.concatenate([zeros, rhs, zeros], axis=0)
    sizes_ext = jnp.concatenate(
        [first[None], local, (lhs.shape[0] - last)[None]]
    ).astype(jnp.int32)
    return jax.lax.ragged_dot(
        lhs, rhs_ext, sizes_ext, preferred_element_type=preferred_element_type
    ).astype(preferred_element_type)


def tgmm(lhs, rhs, group_sizes, group_offset, *, num_groups, preferred_element_type, tiling,
         interpret):
    del tiling, interpret
    m = lhs.shape[0]
    ends = jnp.cumsum(group_sizes)
    starts = ends - group_sizes
    starts_G = jax.lax.dynamic_slice_in_dim(starts, group_offset, num_groups)
    ends_G = jax.lax.dynamic_slice_in_dim(ends, group_offset, num_groups)
    rows = jnp.arange(m, dtype=jnp.int32)
    mask_MxG = (rows[:, None] >= starts_G[None, :]) & (rows[:, None] < ends_G[None, :])
    out = jnp.einsum(
        "mg,mk,mn->gkn",
        mask_MxG.astype(jnp.float32),
        lhs.astype(jnp.float32),
        rhs.astype(jnp.float32),
        precision=jax.lax.Precision.HIGHEST,
    )
    return out.astype(preferred_element_type)
