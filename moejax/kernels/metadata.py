"""Tile metadata of the block-sparse grouped matmul, shared by every Pallas kernel.

The formulation (one for all backends):

* Rows of ``lhs`` [m, k] are sorted by group: group ``i`` owns rows ``[start_i, end_i)`` with
  ``end_i = start_i + group_sizes[i]``; rows at or past ``sum(group_sizes)`` belong to no group.
* Rows are cut into ``tm``-row tiles. The product is block-diagonal in (row tile, group): a tile meets
  one group, or several when group boundaries fall inside it. Each (group, row tile) pair that meets
  is one *work item*. Only groups ``[group_offset, group_offset + num_local_groups)`` are visited
  (expert sharding: the local ``rhs`` holds those groups only).
* The number of work items is at most ``cdiv(m, tm) + num_local_groups - 1`` (every group boundary
  inside a tile adds one visit). That bound is the static length of the work list; the tail past the
  ``num_work`` active items repeats the last active item, so a kernel's block indices do not change
  there (no extra copies) and the kernel skips the compute with ``w < num_work``.

Everything is computed on device from ``group_sizes`` with static shapes: no host synchronisation.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


class GroupMetadata(NamedTuple):
    """Work list of a block-sparse grouped matmul (all int32, on device).

    group_starts_G / group_ends_G: row range of each *local* group (global row indices).
    work_groups_W: local group id of each work item; work_tiles_W: row-tile id of each work item.
    num_work: number of active work items (scalar); items at or past it repeat the last active one.
    """

    group_starts_G: jax.Array
    group_ends_G: jax.Array
    work_groups_W: jax.Array
    work_tiles_W: jax.Array
    num_work: jax.Array


def max_work_items(m: int, tm: int, num_local_groups: int) -> int:
    return cdiv(m, tm) + num_local_groups - 1


def group_metadata(
    group_sizes: jax.Array,
    m: int,
    tm: int,
    *,
    group_offset: jax.Array | int = 0,
    num_local_groups: int | None = None,
) -> GroupMetadata:
    """Builds the work list for ``m`` rows in ``tm``-row tiles (see the module docstring)."""
    num_groups = group_sizes.shape[0]
    g = num_groups if num_local_groups is None else num_local_groups
    group_sizes = group_sizes.astype(jnp.int32)
    ends_all = jnp.cumsum(group_sizes)
    starts_all = ends_all - group_sizes
    offset = jnp.asarray(group_offset, jnp.int32)
    sizes_G = jax.lax.dynamic_slice_in_dim(group_sizes, offset, g)
    starts_G = jax.lax.dynamic_slice_in_dim(starts_all, offset, g)
    ends_G = starts_G + sizes_G

    num_tiles = cdiv(m, tm)
    first_tile_G = starts_G // tm
    last_tile_G = (ends_G - 1) // tm
    tiles_per_group_G = jnp.where(sizes_G > 0, last_tile_G - first_tile_G + 1, 0)
    cum_G = jnp.cumsum(tiles_per_group_G)
    num_work = cum_G[-1]

    num_items = max_work_items(m, tm, g)
    w_W = jnp.minimum(jnp.arange(num_items, dtype=jnp.int32), jnp.maximum(num_work - 1, 0))
    work_groups_W = jnp.minimum(jnp.searchsorted(cum_G, w_W, side="right"), g - 1).astype(jnp.int32)
    first_item_W = cum_G[work_groups_W] - tiles_per_group_G[work_groups_W]
    work_tiles_W = first_tile_G[work_groups_W] + (w_W - first_item_W)
    work_tiles_W = jnp.clip(work_tiles_W, 0, num_tiles - 1).astype(jnp.int32)
    return GroupMetadata(starts_G, ends_G, work_groups_W, work_tiles_W, num_work.astype(jnp.int32))


def local_row_range(group_sizes: jax.Array, group_offset: jax.Array | int, num_local_groups: int):
    """(first, last) rows owned by the local groups: rows outside ``[first, last)`` are zero in gmm."""
    ends = jnp.cumsum(group_sizes.astype(jnp.int32))
    starts = ends - group_sizes
    offset = jnp.asarray(group_offset, jnp.int32)
    first = starts[offset]
    last = ends[offset + num_local_groups - 1]
    return first, last

