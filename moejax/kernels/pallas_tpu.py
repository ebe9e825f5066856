"""Block-sparse grouped matmul (gmm) and its transpose (tgmm) as Pallas Mosaic TPU kernels.

Targets TPU v4, v5e, v5p, v6e and v7x (any chip with a Mosaic TPU compiler); ``interpret=True``
runs the same kernels on any platform for testing.

Tiling ``(tm, tk, tn)``, default ``(128, 128, 128)``: ``tm`` rows of ``lhs`` (multiple of 8),
``tk`` columns of ``lhs`` (multiple of 128), ``tn`` columns of the gmm output and of tgmm's ``rhs``
(multiple of 128). A tile larger than its dimension shrinks to the whole dimension (always a legal
Mosaic block). Partial edge tiles are never
padded in HBM: out-of-range rows and output columns are masked or dropped on write, and gmm's last
contraction tile is masked with ``jnp.where`` (out-of-range values may be NaN, and NaN * 0 is NaN).

Metadata (:mod:`moejax.kernels.metadata`): the (local group, row tile) work list
``work_groups_W`` / ``work_tiles_W``, the local groups' row ranges ``group_starts_G`` /
``group_ends_G`` and ``num_work`` are scalar-prefetched into SMEM, where they drive the BlockSpec
index maps and the row masks.

* ``gmm``: grid (n tiles, work items, k tiles), k innermost accumulating into an f32 VMEM scratch.
  Work items of one row tile are consecutive, so the output block stays in VMEM between them and
  each visit writes its own group's rows only. Every row inside the local groups' range belongs to
  one local group; rows outside it (other groups' rows, rows past ``sum(group_sizes)``, tiles never
  visited) are zeroed by a row mask on the result (``metadata.local_row_range``).
* ``tgmm``: grid (k tiles, n tiles, work items), the work items being the reduction: each adds
  ``lhs_tile.T @ rhs_tile``, its rows outside the group set to zero, to a [tk, tn] f32 VMEM
  accumulator that is written to the group's output block at the group's last item. Groups
  without rows are never visited and are zeroed by a mask on the result.

Backward (``moejax.ops.gmm``'s custom VJP):
``dlhs = gmm(dout, rhs, transpose_rhs=not transpose_rhs)`` and ``drhs = tgmm(lhs, dout)``
(``tgmm(dout, lhs)`` when ``transpose_rhs``), both with these kernels.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from moejax.kernels import common, metadata

DEFAULT_TILING = (128, 128, 128)


def _tiles(tiling) -> tuple[int, int, int]:
    if tiling is None:
        return DEFAULT_TILING
    tm, tk, tn = tiling
    if tm % 8 or tk % 128 or tn % 128:
        raise ValueError(
            "pallas_tpu: tiling (tm, tk, tn) must have tm a multiple of 8 and tk, tn multiples "
            f"of 128, got {tuple(tiling)}"
        )
    return tm, tk, tn


def _block(dim: int, tile: int) -> int:
    return dim if dim <= tile else tile


# Mosaic's default scoped VMEM limit on v4 and v5e (the smallest of the chips'). The kernels ask for
# more only when their double-buffered tiles exceed it: at least 32 MiB, at most 128 MiB (the VMEM
# of v5e and v6e); a chip with less VMEM rejects the request at compile time.
_DEFAULT_SCOPED_VMEM = 16 * 2**20
_RAISED_VMEM_MIN = 32 * 2**20
_MAX_VMEM = 128 * 2**20


def vmem_bytes(blocks, scratch) -> int:
    """VMEM a kernel's pipeline holds: two buffers of every ``(shape, dtype)`` block (inputs and
    output), plus the ``(shape, dtype)`` scratch buffers once."""
    size = lambda shape, dtype: math.prod(shape) * jnp.dtype(dtype).itemsize  # noqa: E731
    return 2 * sum(size(*b) for b in blocks) + sum(size(*b) for b in scratch)


def _compiler_params(dimension_semantics, blocks, scratch):
    """Mosaic parameters; ``vmem_limit_bytes`` is raised past the default scoped limit when the
    tiles need it (about 1.25x what they hold, for Mosaic's own temporaries), else left alone."""
    need = vmem_bytes(blocks, scratch)
    limit = None
    if need > _DEFAULT_SCOPED_VMEM:
        limit = min(max(need * 5 // 4 + 2**20, _RAISED_VMEM_MIN), _MAX_VMEM)
    return pltpu.CompilerParams(dimension_semantics=dimension_semantics, vmem_limit_bytes=limit)


def _dot(lhs, rhs, dims):
    """f32-accumulated tile product; f32 inputs keep full f32 precision on the MXU."""
    dtype = common.promote_types(lhs.dtype, rhs.dtype)
    precision = jax.lax.Precision.HIGHEST if dtype == jnp.float32 else None
    return jax.lax.dot_general(
        lhs.astype(dtype), rhs.astype(dtype), (dims, ((), ())),
        precision=precision, preferred_element_type=jnp.float32,
    )


def _rows_in(row0, shape, start, end):
    rows = row0 + jax.lax.broadcasted_iota(jnp.int32, shape, 0)
    return (rows >= start) & (rows < end)


# --------------------------------------------------------------------------- gmm


def _gmm_kernel(groups_ref, tiles_ref, starts_ref, ends_ref, num_work_ref, lhs_ref, rhs_ref,
                out_ref, acc_ref, *, transpose_rhs, k_last_cols):
    w, kk = pl.program_id(1), pl.program_id(2)
    last_k = pl.num_programs(2) - 1
    active = w < num_work_ref[0]
    contract_rhs = 1 if transpose_rhs else 0
    dims = ((1,), (contract_rhs,))

    @pl.when(kk == 0)
    def _():
        acc_ref[...] = jnp.zeros_like(acc_ref)

    def accumulate(mask_k):
        lhs, rhs = lhs_ref[...], rhs_ref[...]
        if mask_k:
            lhs = jnp.where(
                jax.lax.broadcasted_iota(jnp.int32, lhs.shape, 1) < k_last_cols, lhs, 0)
            rhs = jnp.where(
                jax.lax.broadcasted_iota(jnp.int32, rhs.shape, contract_rhs) < k_last_cols, rhs, 0)
        acc_ref[...] += _dot(lhs, rhs, dims)

    if k_last_cols is None:
        pl.when(active)(lambda: accumulate(False))
    else:
        pl.when(active & (kk < last_k))(lambda: accumulate(False))
        pl.when(active & (kk == last_k))(lambda: accumulate(True))

    # The output block stays in VMEM while consecutive items visit its row tile: each item writes
    # its group's rows only. Rows of no local group keep stale values; the caller masks them.
    @pl.when(active & (kk == last_k))
    def _():
        group = groups_ref[w]
        row0 = tiles_ref[w] * acc_ref.shape[0]
        in_group = _rows_in(row0, acc_ref.shape, starts_ref[group], ends_ref[group])
        out_ref[...] = jnp.where(in_group, acc_ref[...].astype(out_ref.dtype), out_ref[...])


def gmm(lhs, rhs, group_sizes, group_offset, *, transpose_rhs, preferred_element_type, tiling,
        interpret):
    """``out[rows_i] = lhs[rows_i] @ rhs[i - group_offset]`` for the local groups, 0 elsewhere."""
    tm, tk, tn = _tiles(tiling)
    m, k = lhs.shape
    g = rhs.shape[0]
    n = rhs.shape[1] if transpose_rhs else rhs.shape[2]
    if m == 0 or n == 0 or k == 0:
        return jnp.zeros((m, n), preferred_element_type)
    tm, tk, tn = _block(m, tm), _block(k, tk), _block(n, tn)
    num_k = metadata.cdiv(k, tk)
    k_last_cols = None if k % tk == 0 else k - (num_k - 1) * tk

    meta = metadata.group_metadata(
        group_sizes, m, tm, group_offset=group_offset, num_local_groups=g)
    num_items = meta.work_groups_W.shape[0]

    if transpose_rhs:
        rhs_spec = pl.BlockSpec(
            (None, tn, tk), lambda j, w, kk, groups, tiles, *_: (groups[w], j, kk))
    else:
        rhs_spec = pl.BlockSpec(
            (None, tk, tn), lambda j, w, kk, groups, tiles, *_: (groups[w], kk, j))

    kernel = functools.partial(
        _gmm_kernel, transpose_rhs=transpose_rhs, k_last_cols=k_last_cols)
    operands = (meta.work_groups_W, meta.work_tiles_W, meta.group_starts_G, meta.group_ends_G,
                meta.num_work.reshape(1), lhs, rhs)
    out = pl.pallas_call(
        kernel,
        out_shape=common.out_struct((m, n), preferred_element_type, *operands),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=5,
            grid=(metadata.cdiv(n, tn), num_items, num_k),
            in_specs=[
                pl.BlockSpec((tm, tk), lambda j, w, kk, groups, tiles, *_: (tiles[w], kk)),
                rhs_spec,
            ],
            out_specs=pl.BlockSpec(
                (tm, tn), lambda j, w, kk, groups, tiles, *_: (tiles[w], j)),
            scratch_shapes=[pltpu.VMEM((tm, tn), jnp.float32)],
        ),
        compiler_params=_compiler_params(
            ("parallel", "arbitrary", "arbitrary"),
            blocks=[((tm, tk), lhs.dtype), ((tk, tn), rhs.dtype), ((tm, tn), preferred_element_type)],
            scratch=[((tm, tn), jnp.float32)]),
        interpret=interpret,
        name="moejax_gmm",
    )(*operands)

    first, last = metadata.local_row_range(group_sizes, group_offset, g)
    rows_Mx1 = jnp.arange(m, dtype=jnp.int32).reshape(m, 1)
    local_Mx1 = (rows_Mx1 >= first) & (rows_Mx1 < last)
    return jnp.where(local_Mx1, out, jnp.zeros((1, 1), out.dtype))


# --------------------------------------------------------------------------- tgmm


def _tgmm_kernel(groups_ref, tiles_ref, starts_ref, ends_ref, num_work_ref, lhs_ref, rhs_ref,
                 out_ref, acc_ref):
    w = pl.program_id(2)
    last_w = pl.num_programs(2) - 1
    group = groups_ref[w]
    first_of_group = (w == 0) | (groups_ref[jnp.maximum(w - 1, 0)] != group)
    last_of_group = (w == last_w) | (groups_ref[jnp.minimum(w + 1, last_w)] != group)

    @pl.when(first_of_group)
    def _():
        acc_ref[...] = jnp.zeros_like(acc_ref)

    @pl.when(w < num_work_ref[0])
    def _():
        lhs, rhs = lhs_ref[...], rhs_ref[...]
        row0 = tiles_ref[w] * lhs.shape[0]
        start, end = starts_ref[group], ends_ref[group]
        # Both operands are masked: rows past the array end may hold NaN.
        lhs = jnp.where(_rows_in(row0, lhs.shape, start, end), lhs, 0)
        rhs = jnp.where(_rows_in(row0, rhs.shape, start, end), rhs, 0)
        acc_ref[...] += _dot(lhs, rhs, ((0,), (0,)))

    @pl.when(last_of_group)
    def _():
        out_ref[...] = acc_ref[...].astype(out_ref.dtype)


def tgmm(lhs, rhs, group_sizes, group_offset, *, num_groups, preferred_element_type, tiling,
         interpret):
    """``out[i] = lhs[rows_(group_offset + i)].T @ rhs[same rows]``; empty groups are zeros."""
    tm, tk, tn = _tiles(tiling)
    m, k = lhs.shape
    n = rhs.shape[1]
    if m == 0 or k == 0 or n == 0:
        return jnp.zeros((num_groups, k, n), preferred_element_type)
    tm, tk, tn = _block(m, tm), _block(k, tk), _block(n, tn)

    meta = metadata.group_metadata(
        group_sizes, m, tm, group_offset=group_offset, num_local_groups=num_groups)
    num_items = meta.work_groups_W.shape[0]

    operands = (meta.work_groups_W, meta.work_tiles_W, meta.group_starts_G, meta.group_ends_G,
                meta.num_work.reshape(1), lhs, rhs)
    out = pl.pallas_call(
        _tgmm_kernel,
        out_shape=common.out_struct((num_groups, k, n), preferred_element_type, *operands),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=5,
            grid=(metadata.cdiv(k, tk), metadata.cdiv(n, tn), num_items),
            in_specs=[
                pl.BlockSpec((tm, tk), lambda i, j, w, groups, tiles, *_: (tiles[w], i)),
                pl.BlockSpec((tm, tn), lambda i, j, w, groups, tiles, *_: (tiles[w], j)),
            ],
            out_specs=pl.BlockSpec(
                (None, tk, tn), lambda i, j, w, groups, tiles, *_: (groups[w], i, j)),
            scratch_shapes=[pltpu.VMEM((tk, tn), jnp.float32)],
        ),
        compiler_params=_compiler_params(
            ("parallel", "parallel", "arbitrary"),
            blocks=[((tm, tk), lhs.dtype), ((tm, tn), rhs.dtype), ((tk, tn), preferred_element_type)],
            scratch=[((tk, tn), jnp.float32)]),
        interpret=interpret,
        name="moejax_tgmm",
    )(*operands)

    nonempty_Gx1x1 = (meta.group_ends_G > meta.group_starts_G).reshape(num_groups, 1, 1)
    return jnp.where(nonempty_Gx1x1, out, jnp.zeros((1, 1, 1), out.dtype))
