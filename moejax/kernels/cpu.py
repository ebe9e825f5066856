"""XLA-only grouped matmul (gmm and tgmm) that is fast on the CPU.

``lax.ragged_dot`` lowers on CPU to a product masked over every group (``[g, m, k]`` work); here each
group does only its own rows, in a few large row chunks, so the cost stays close to one dense matmul.

Tiling. Groups are visited one after another (expert-major). A group of ``s`` rows is cut into row
chunks whose sizes come from a static ladder: ``tm`` (``tiling[0]``, default 512), then 8 * step**j
below it (gmm: step 4, so 128, 32, 8; tgmm: step 2, so 256, 128, ..., 8; sizes larger than ``m`` are
dropped). A group takes ``s // tm`` chunks of ``tm`` rows; the rest ``r`` is then, turn by turn, either
closed by one chunk of the smallest size >= ``r`` (when that wastes at most ``_CHUNK_COST_ROWS`` rows,
the fixed cost of one more chunk), or shrunk by as many chunks of the largest size <= ``r`` as fit.
Every chunk is a static-shape matmul; the number of chunks of each size is a dynamic trip count. The
ladder step trades compile time (one loop and one matmul kernel per size) against chunks per group:
gmm's extra chunks are cheap, while each tgmm chunk also reads and writes a ``[k, n]`` accumulator.

Metadata (``ChunkPlan``, on device, static shapes, no host sync): per local group its row range and,
per ladder size ``c``, the number of ``c``-row chunks and the row where they start. The chunks of a
group tile its rows in ladder order; the last chunk is aligned to the group's end, overlapping rows
already done (gmm recomputes the same values there; tgmm masks them out). In gmm a closing chunk is
never larger than its group, so only a group smaller than the smallest size spills over its
neighbours (its single chunk writes through a row mask); tgmm masks every chunk's rows, so its chunks
may spill.

gmm: per group, ``rhs[g]`` is sliced once and every chunk writes ``lhs[chunk] @ rhs[g]`` into the
output with a ``dynamic_update_slice`` (in place in the loop carry). Rows of non-local groups and rows
past ``sum(group_sizes)`` keep the zeros the output starts with.
tgmm: per group, the first chunk's ``lhs[chunk].T @ rhs[chunk]`` starts an f32 accumulator (a
``lax.switch`` on its size), the other chunks add to it, and the group's ``[k, n]`` block is written
once; an empty group writes zeros.

Backward (``moejax.ops.gmm``'s custom VJP): ``dlhs = gmm(dout, rhs, transpose_rhs=not transpose_rhs)``
(the transposed contraction is a ``dot_general`` on ``rhs[g]``, no transposed copy of ``rhs``) and
``drhs = tgmm(lhs, dout)``.

Accumulation is f32 whatever the input dtype; ``interpret`` is ignored, and so are ``tk`` and ``tn``.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

_GMM_DEFAULT_CHUNK = 512
_MIN_CHUNK = 8
# Each ladder size is this many times the next (see the module docstring).
_GMM_LADDER_STEP = 4
_TGMM_LADDER_STEP = 2
# One more chunk costs about as much as this many rows of matmul work (measured on a 2-core x86 VM).
_GMM_CHUNK_COST_ROWS = 16
_TGMM_CHUNK_COST_ROWS = 16
_TGMM_DEFAULT_CHUNK = 512


def chunk_sizes(m: int, tm: int, step: int = _GMM_LADDER_STEP) -> tuple[int, ...]:
    """The ladder of chunk sizes for ``m`` rows, largest first: ``tm``, then 8 * step**j below it."""
    smaller = []
    c = _MIN_CHUNK
    while c < tm:
        smaller.append(c)
        c *= step
    sizes = [c for c in [tm, *reversed(smaller)] if c <= m]
    return tuple(sizes) if sizes else (m,)


class ChunkPlan(NamedTuple):
    """Row chunks of every local group (int32, on device).

    starts_G / ends_G: row range of each local group.
    counts[i]_G: number of chunks of size ``sizes[i]``; firsts[i]_G: the row where they start
    (nominally; the last chunk of a group is moved back to end at ``ends_G``).
    """

    sizes: tuple[int, ...]
    starts_G: jax.Array
    ends_G: jax.Array
    counts: tuple[jax.Array, ...]
    firsts: tuple[jax.Array, ...]


def chunk_plan(group_sizes, group_offset, num_local: int, m: int, tm: int, *,
               step: int = _GMM_LADDER_STEP, cost_rows: int = _GMM_CHUNK_COST_ROWS,
               may_spill: bool = False) -> ChunkPlan:
    """Cuts each local group into ladder-sized row chunks (see the module docstring).

    ``may_spill``: a covering chunk may be larger than its group (its user masks rows out).
    """
    sizes = chunk_sizes(m, tm, step)
    group_sizes = group_sizes.astype(jnp.int32)
    ends_all = jnp.cumsum(group_sizes)
    offset = jnp.asarray(group_offset, jnp.int32)
    sizes_G = jax.lax.dynamic_slice_in_dim(group_sizes, offset, num_local)
    ends_G = jax.lax.dynamic_slice_in_dim(ends_all, offset, num_local)
    starts_G = ends_G - sizes_G

    top = sizes[0]
    counts = [jnp.zeros_like(sizes_G) for _ in sizes]
    counts[0] = sizes_G // top
    rest_G = sizes_G - counts[0] * top
    for turn in range(len(sizes)):
        last = turn == len(sizes) - 1
        cover_G = jnp.full_like(rest_G, top)  # smallest size >= rest
        fit_G = jnp.zeros_like(rest_G)  # largest size <= rest (0: none)
        for c in sizes:
            cover_G = jnp.where(c >= rest_G, c, cover_G)
        for c in reversed(sizes):
            fit_G = jnp.where(c <= rest_G, c, fit_G)
        # A covering chunk is end-aligned inside the group, so it must not be larger than the group:
        # then only groups smaller than the smallest size ever spill over their neighbours.
        cheap = (cover_G - rest_G <= cost_rows) | last
        inside = True if may_spill else cover_G <= sizes_G
        take_cover = (rest_G > 0) & ((fit_G == 0) | (cheap & inside))
        # Otherwise as many ``fit``-row chunks as fit (at the last turn, enough to cover the rest).
        num_fit_G = (rest_G + (fit_G - 1 if last else 0)) // jnp.maximum(fit_G, 1)
        num_fit_G = jnp.where(take_cover, 0, num_fit_G)
        for i, c in enumerate(sizes):
            counts[i] = counts[i] + jnp.where(take_cover & (cover_G == c), 1, 0)
            counts[i] = counts[i] + jnp.where(fit_G == c, num_fit_G, 0)
        rest_G = jnp.where(take_cover, 0, jnp.maximum(rest_G - num_fit_G * fit_G, 0))

    firsts = []
    row_G = starts_G
    for c, count_G in zip(sizes, counts):
        firsts.append(row_G)
        row_G = row_G + count_G * c
    return ChunkPlan(sizes, starts_G, ends_G, tuple(counts), tuple(firsts))


def _operands(lhs, rhs):
    """Both operands in their common dtype, behind a barrier.

    The barrier keeps XLA from sinking a broadcast operand (the cotangent of ``sum(out)`` is one)
    into the loop bodies, where it would be materialised again on every iteration.
    """
    dtype = jnp.promote_types(lhs.dtype, rhs.dtype)
    return jax.lax.optimization_barrier((lhs.astype(dtype), rhs.astype(dtype)))


def _chunk_start(nominal, group_end, c: int, m: int):
    """Start row of a ``c``-row chunk: at ``nominal``, moved back to end at the group's end, in [0, m)."""
    return jnp.clip(jnp.minimum(nominal, group_end - c), 0, m - c)


def gmm(lhs, rhs, group_sizes, group_offset, *, transpose_rhs, preferred_element_type, tiling,
        interpret):
    """``out[rows_i] = lhs[rows_i] @ rhs[i - group_offset]`` for the local groups; other rows 0."""
    del interpret
    m = lhs.shape[0]
    num_local = rhs.shape[0]
    n = rhs.shape[1] if transpose_rhs else rhs.shape[2]
    out_dtype = jnp.dtype(preferred_element_type)
    out_MxN = jnp.zeros((m, n), out_dtype)
    if m == 0 or num_local == 0:
        return out_MxN
    lhs, rhs = _operands(lhs, rhs)
    plan = chunk_plan(group_sizes, group_offset, num_local, m,
                      tiling[0] if tiling else _GMM_DEFAULT_CHUNK)
    dims = (((1,), (1,)) if transpose_rhs else ((1,), (0,)), ((), ()))

    def group_body(g, out_MxN):
        rhs_g = jax.lax.dynamic_index_in_dim(rhs, g, keepdims=False)  # [k, n], or [n, k] transposed
        start, end = plan.starts_G[g], plan.ends_G[g]
        for i, c in enumerate(plan.sizes):
            first = plan.firsts[i][g]

            def chunk(j, c=c, first=first):
                row = _chunk_start(first + j * c, end, c, m)
                x_CxK = jax.lax.dynamic_slice_in_dim(lhs, row, c)
                y_CxN = jax.lax.dot_general(x_CxK, rhs_g, dims, preferred_element_type=jnp.float32)
                return row, y_CxN.astype(out_dtype)

            def write(j, out_MxN, chunk=chunk):
                row, y_CxN = chunk(j)
                return jax.lax.dynamic_update_slice_in_dim(out_MxN, y_CxN, row, 0)

            def write_masked(j, out_MxN, chunk=chunk, c=c):
                row, y_CxN = chunk(j)
                rows_C = row + jnp.arange(c, dtype=jnp.int32)
                mine_C = (rows_C >= start) & (rows_C < end)
                old_CxN = jax.lax.dynamic_slice_in_dim(out_MxN, row, c)
                y_CxN = jnp.where(mine_C[:, None], y_CxN, old_CxN)
                return jax.lax.dynamic_update_slice_in_dim(out_MxN, y_CxN, row, 0)

            count = plan.counts[i][g]
            if c != plan.sizes[-1]:
                out_MxN = jax.lax.fori_loop(0, count, write, out_MxN)
            else:
                # Only a group smaller than the smallest size has a chunk that spills out of it.
                fits = end - start >= c
                out_MxN = jax.lax.fori_loop(0, jnp.where(fits, count, 0), write, out_MxN)
                out_MxN = jax.lax.fori_loop(0, jnp.where(fits, 0, count), write_masked, out_MxN)
        return out_MxN

    return jax.lax.fori_loop(0, num_local, group_body, out_MxN)


def tgmm(lhs, rhs, group_sizes, group_offset, *, num_groups, preferred_element_type, tiling,
         interpret):
    """``out[i] = lhs[rows_j].T @ rhs[rows_j]`` with ``j = group_offset + i``; empty group -> 0."""
    del interpret
    m, k = lhs.shape
    n = rhs.shape[1]
    out_dtype = jnp.dtype(preferred_element_type)
    out_GxKxN = jnp.zeros((num_groups, k, n), out_dtype)
    if m == 0:
        return out_GxKxN
    lhs, rhs = _operands(lhs, rhs)
    plan = chunk_plan(group_sizes, group_offset, num_groups, m,
                      tiling[0] if tiling else _TGMM_DEFAULT_CHUNK, step=_TGMM_LADDER_STEP,
                      cost_rows=_TGMM_CHUNK_COST_ROWS, may_spill=True)
    dims = (((0,), (0,)), ((), ()))

    # Index of each group's first chunk size (its largest), len(sizes) for an empty group.
    head_G = jnp.full_like(plan.starts_G, len(plan.sizes))
    for i in reversed(range(len(plan.sizes))):
        head_G = jnp.where(plan.counts[i] > 0, i, head_G)

    def group_body(g, out_GxKxN):
        end, head = plan.ends_G[g], head_G[g]

        def chunk_product(c, nominal):
            row = _chunk_start(nominal, end, c, m)
            rows_C = row + jnp.arange(c, dtype=jnp.int32)
            # Rows before ``nominal`` belong to the previous chunk of this group (end-aligned overlap).
            mine_C = (rows_C >= nominal) & (rows_C < end)
            x_CxK = jax.lax.dynamic_slice_in_dim(lhs, row, c)
            x_CxK = jnp.where(mine_C[:, None], x_CxK, jnp.zeros_like(x_CxK))
            d_CxN = jax.lax.dynamic_slice_in_dim(rhs, row, c)
            return jax.lax.dot_general(x_CxK, d_CxN, dims, preferred_element_type=jnp.float32)

        # The first chunk initialises the accumulator: no zero fill and no add for one-chunk groups.
        heads = [lambda c=c, i=i: chunk_product(c, plan.firsts[i][g])
                 for i, c in enumerate(plan.sizes)]
        acc_KxN = jax.lax.switch(head, heads + [lambda: jnp.zeros((k, n), jnp.float32)])
        for i, c in enumerate(plan.sizes):
            done = (head == i).astype(jnp.int32)
            first = plan.firsts[i][g] + done * c

            def add(j, acc_KxN, c=c, first=first):
                return acc_KxN + chunk_product(c, first + j * c)

            acc_KxN = jax.lax.fori_loop(0, plan.counts[i][g] - done, add, acc_KxN)
        return jax.lax.dynamic_update_index_in_dim(out_GxKxN, acc_KxN.astype(out_dtype), g, 0)

    return jax.lax.fori_loop(0, num_groups, group_body, out_GxKxN)
