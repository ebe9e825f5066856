"""XLA-only grouped matmul (gmm and tgmm) that is fast on the CPU.

``lax.ragged_dot`` lowers on CPU to a product masked over every group (``[g, m, k]`` work). Here each
group multiplies only its own rows, in a few large row chunks, so the cost stays near one dense
matmul plus one read of each expert's weights.

Tiling (gmm). Groups are visited one after another (expert-major). A group of ``s`` rows is cut into
row chunks whose sizes come from a static ladder: ``tm`` (``tiling[0]``, default 512), then the
powers of two below it down to 8 (sizes larger than ``m`` are dropped). A group takes ``s // tm``
chunks of ``tm`` rows; the rest ``r`` is then, turn by turn, either closed by one chunk of the
smallest size >= ``r`` (when that wastes at most ``_CHUNK_COST_ROWS`` rows, the fixed cost of one
more chunk), or shrunk by as many chunks of the largest size <= ``r`` as fit. Every chunk is a
static-shape matmul; the number of chunks of each size is a dynamic trip count, so nothing depends on
the group sizes at trace time. Each ladder size costs one loop and one matmul kernel to compile.

Metadata (``ChunkPlan``, computed on device with static shapes, no host sync): per local group its
row range and, per ladder size ``c``, the number of ``c``-row chunks and the row where they start.
The chunks of a group tile its rows in ladder order; the last one is aligned to the group's end,
overlapping rows already done (gmm recomputes the same values there). A closing chunk is never
larger than its group, so only a group smaller than 8 rows spills over its neighbours, and only its
single chunk writes through a row mask (read-modify-write); every other chunk is a plain
``dynamic_update_slice``.

gmm: per group, ``rhs[g]`` is sliced once and each chunk writes ``lhs[chunk] @ rhs[g]`` into the
output, which is carried through the loops and updated in place. Rows of non-local groups and rows
past ``sum(group_sizes)`` keep the zeros the output starts with. Those zeros are computed from the
call's operands: XLA merges equal ``jnp.zeros`` of several calls into one buffer and then copies
it for every loop that updates it (on the CPU each call's temporaries are fresh pages, faulted in
on first touch, so every buffer written costs time), and it allocates them no earlier than the
operands exist.

tgmm: a group of ``s`` rows is ``s // tm`` whole chunks of ``tm`` rows (``min(tm, m)``) and one
closing chunk for the other ``r`` rows, of the smallest size >= ``r`` among the multiples of
``_CLOSE_STEP`` (32) below ``tm`` and ``tm`` itself (a group of whole chunks closes with its last
one). The closing chunk ends at the group's end (or starts at row 0) and masks out the rows that are
not the group's remainder (a ``[c, k]`` select, cheap next to the matmul); it is the only masked
chunk, and it starts the group's f32 accumulator (a ``lax.switch`` on its size: no zero fill, and no
add for one-chunk groups). The whole chunks add to it in one loop and the group's ``[k, n]`` block is
written once. Per group that is one matmul more than ``s / tm`` at most, and at most 31 wasted rows.
Empty groups are skipped (an empty group's weights are never read; its block keeps the output's
zeros).

Gathered operands: ``gmm(..., lhs_rows=idx)`` multiplies ``lhs[idx]`` and ``tgmm(...,
lhs_rows=, rhs_rows=)`` takes either operand so, each chunk gathering its rows where it would
slice them. XLA:CPU copies a dynamically sliced matmul operand into a buffer of its own anyway, so
the gather costs that copy and no more, and the gathered ``[m, k]`` operand is never written
(``moejax.ops.dropless`` passes the token rows of the sorted copies this way).

Prologues: ``lhs_fn`` (gmm, tgmm) and ``rhs_fn`` (tgmm) make the operand a row-wise function of
its rows and of the same rows of ``*_extras`` arrays (an activation, a gate scale, an activation's
derivative), applied to each chunk as it is copied: the operand is never written out either.

Rows added to their destinations: with ``out_rows`` (and ``out_scale``, ``num_out_rows``) gmm
returns ``out[out_rows[r]] += out_scale[r] · (lhs @ rhs)[r]`` instead of the ``[m, n]`` product:
each chunk scatter-adds its new rows (from its nominal start, so rows that an end-aligned chunk
computes again are not added twice; the others are sent past the end and dropped). For the MoE
combine (k copies of a token, gate-weighted) and the copies' input gradients, with no ``[m, n]``
buffer written and read back.

Backward (``moejax.ops.gmm``'s custom VJP): ``dlhs = gmm(dout, rhs, transpose_rhs=not
transpose_rhs)``, whose transposed contraction is a ``dot_general`` on ``rhs[g]`` (no transposed
copy of ``rhs``), and ``drhs = tgmm(lhs, dout)``.

Accumulation is f32 whatever the input dtype. ``interpret`` is ignored, and so are ``tk`` and ``tn``.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from moejax.kernels import common

_DEFAULT_CHUNK = 512
_MIN_CHUNK = 8
# One more chunk costs about as much as this many rows of matmul work (measured on a 2-core x86 VM).
_CHUNK_COST_ROWS = 16
# tgmm closes each group with one chunk whose size is a multiple of this (masked past the group).
_CLOSE_STEP = 32


def chunk_sizes(m: int, tm: int) -> tuple[int, ...]:
    """The ladder of chunk sizes for ``m`` rows, largest first: ``tm``, then powers of two below."""
    smaller = []
    c = _MIN_CHUNK
    while c < tm:
        smaller.append(c)
        c *= 2
    sizes = [c for c in [tm, *reversed(smaller)] if c <= m]
    return tuple(sizes) if sizes else (m,)


class LocalGroups(NamedTuple):
    """Row ranges of the local groups (int32, on device): sizes, starts and ends; the groups with
    rows, in order, then padding (``nonempty_G``), and how many there are (``num_nonempty``)."""

    sizes_G: jax.Array
    starts_G: jax.Array
    ends_G: jax.Array
    nonempty_G: jax.Array
    num_nonempty: jax.Array


def _local_groups(group_sizes, group_offset, num_local: int) -> LocalGroups:
    group_sizes = group_sizes.astype(jnp.int32)
    offset = jnp.asarray(group_offset, jnp.int32)
    sizes_G = jax.lax.dynamic_slice_in_dim(group_sizes, offset, num_local)
    ends_G = jax.lax.dynamic_slice_in_dim(jnp.cumsum(group_sizes), offset, num_local)
    has_rows_G = sizes_G > 0
    nonempty_G = jnp.nonzero(has_rows_G, size=num_local, fill_value=0)[0].astype(jnp.int32)
    return LocalGroups(sizes_G, ends_G - sizes_G, ends_G, nonempty_G,
                       jnp.sum(has_rows_G, dtype=jnp.int32))


class ChunkPlan(NamedTuple):
    """Row chunks of every local group (int32, on device).

    starts_G / ends_G: row range of each local group.
    counts[i]_G: number of chunks of size ``sizes[i]``; firsts[i]_G: the row where they start
    (nominally; the last chunk of a group is moved back to end at ``ends_G``).
    nonempty_G: the local groups with rows, in order, then padding; num_nonempty: how many.
    """

    sizes: tuple[int, ...]
    starts_G: jax.Array
    ends_G: jax.Array
    counts: tuple[jax.Array, ...]
    firsts: tuple[jax.Array, ...]
    nonempty_G: jax.Array
    num_nonempty: jax.Array


def chunk_plan(group_sizes, group_offset, num_local: int, m: int, tm: int) -> ChunkPlan:
    """Cuts each local group into gmm's ladder-sized row chunks (see the module docstring)."""
    sizes = chunk_sizes(m, tm)
    groups = _local_groups(group_sizes, group_offset, num_local)
    sizes_G, starts_G = groups.sizes_G, groups.starts_G

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
        # A closing chunk (end-aligned) must not be larger than its group: then only groups smaller
        # than the smallest size spill over their neighbours.
        cheap = (cover_G - rest_G <= _CHUNK_COST_ROWS) | last
        inside = cover_G <= sizes_G
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
    return ChunkPlan(sizes, starts_G, groups.ends_G, tuple(counts), tuple(firsts),
                     groups.nonempty_G, groups.num_nonempty)


def _operands(lhs, rhs, *extras):
    """Both operands in their common dtype (and the prologues' extra operands), behind a barrier.

    The barrier keeps XLA from sinking a broadcast operand (the cotangent of ``sum(out)`` is one)
    into the loop bodies, where it would be materialised again on every iteration.
    """
    dtype = common.promote_types(lhs.dtype, rhs.dtype)
    return jax.lax.optimization_barrier((lhs.astype(dtype), rhs.astype(dtype), *extras))


def _own_zeros(shape, dtype, *operands):
    """Zeros for a loop to update in place, computed from this call's operands.

    Plain ``jnp.zeros`` of equal shape are one buffer to XLA (common subexpressions are merged),
    and every loop that updates it in place then gets a copy of it: one more output-sized buffer
    written, and faulted in, per call. Zeros computed from the operands stay this call's own, and
    are not allocated before the operands exist.
    """
    return jnp.broadcast_to(common.false_from(*operands).astype(dtype), shape)


def _chunk_start(nominal, group_end, c: int, m: int):
    """Row where a ``c``-row chunk starts: ``nominal``, or earlier to end at the group's end."""
    return jnp.clip(jnp.minimum(nominal, group_end - c), 0, m - c)


def _chunk_rows(x, row, c: int, index=None):
    """Rows ``row .. row + c`` of ``x``, or of ``x[index]`` without building ``x[index]``."""
    if index is None:
        return jax.lax.dynamic_slice_in_dim(x, row, c)
    return x.at[jax.lax.dynamic_slice_in_dim(index, row, c)].get(mode="promise_in_bounds")


def _operand_rows(x, row, c: int, index, fn, extras, dtype):
    """Rows ``row .. row + c`` of the operand: of ``x`` (or ``x[index]``), passed through the
    prologue ``fn`` with the same rows of each extra operand when there is one."""
    x_C = _chunk_rows(x, row, c, index)
    if fn is None:
        return x_C
    return fn(x_C, *(jax.lax.dynamic_slice_in_dim(e, row, c) for e in extras)).astype(dtype)


def _check_prologue(name, fn, extras, m):
    if extras and fn is None:
        raise ValueError(f"{name}_extras were given without {name}_fn")
    for extra in extras:
        if extra.shape[:1] != (m,):
            raise ValueError(f"each of {name}_extras must have the operand's {m} rows (one per "
                             f"row, sliced with it), got shape {extra.shape}")


def gmm(lhs, rhs, group_sizes, group_offset, *, transpose_rhs, preferred_element_type, tiling,
        interpret, lhs_rows=None, lhs_fn=None, lhs_extras=(), out_rows=None, out_scale=None,
        num_out_rows=None):
    """``out[rows_i] = lhs[rows_i] @ rhs[i - group_offset]`` for the local groups; other rows 0.

    With ``lhs_rows`` (int [m], every index in range) the operand is ``lhs[lhs_rows]``, gathered
    chunk by chunk instead of slice by slice: the ``[m, k]`` operand is never built. With
    ``lhs_fn`` (a row-wise function) it is ``lhs_fn(lhs[rows], *(e[rows] for e in lhs_extras))``,
    computed chunk by chunk (``lhs_extras``: arrays of ``m`` rows, sliced by position), so an
    elementwise prologue such as the activation is never written out either.

    With ``out_rows`` (int [m], each in ``[0, num_out_rows)``) the result is not the ``[m, n]``
    product but its rows added up by destination: ``out[out_rows[r]] += out_scale[r] · prod[r]``
    over the rows ``r`` of the local groups (``out_scale``: [m] or [m, 1], default 1), an
    ``[num_out_rows, n]`` array. Each chunk adds its own rows as it goes, so the product is never
    written out (the combine of the k copies of each token, or their input gradients)."""
    del interpret
    m = lhs.shape[0] if lhs_rows is None else lhs_rows.shape[0]
    _check_prologue("lhs", lhs_fn, lhs_extras, m)
    num_local = rhs.shape[0]
    n = rhs.shape[1] if transpose_rhs else rhs.shape[2]
    out_dtype = jnp.dtype(preferred_element_type)
    out_shape = (m, n)
    if out_rows is not None or out_scale is not None or num_out_rows is not None:
        if out_rows is None or num_out_rows is None or jnp.shape(out_rows) != (m,):
            raise ValueError(f"gmm: out_rows (int [{m}], one per operand row) and num_out_rows go "
                             f"together, got out_rows of shape {jnp.shape(out_rows)} and "
                             f"num_out_rows={num_out_rows}")
        if out_scale is not None and jnp.size(out_scale) != m:
            raise ValueError(f"gmm: out_scale needs one value per operand row ({m}), got shape "
                             f"{jnp.shape(out_scale)}")
        out_shape = (num_out_rows, n)
    varying = (lhs, rhs, group_sizes, lhs_rows, out_rows, out_scale, *lhs_extras)
    if m == 0 or num_local == 0:
        return _varying_like(jnp.zeros(out_shape, out_dtype), *varying)
    lhs, rhs, *lhs_extras = _operands(lhs, rhs, *lhs_extras)
    dtype = rhs.dtype
    out_MxN = _varying_like(_own_zeros(out_shape, out_dtype, lhs, rhs), *varying)
    if out_scale is not None:
        out_scale = jnp.reshape(out_scale, (m, 1)).astype(jnp.float32)
    tm = tiling[0] if tiling else _DEFAULT_CHUNK
    plan = chunk_plan(group_sizes, group_offset, num_local, m, tm)
    dims = (((1,), (1,)) if transpose_rhs else ((1,), (0,)), ((), ()))

    def group_body(g, out_MxN):
        rhs_g = jax.lax.dynamic_index_in_dim(rhs, g, keepdims=False)  # [k, n], or [n, k] transposed
        start, end = plan.starts_G[g], plan.ends_G[g]
        for i, c in enumerate(plan.sizes):
            first = plan.firsts[i][g]

            def chunk(j, c=c, first=first):
                row = _chunk_start(first + j * c, end, c, m)
                x_CxK = _operand_rows(lhs, row, c, lhs_rows, lhs_fn, lhs_extras, dtype)
                y_CxN = jax.lax.dot_general(x_CxK, rhs_g, dims, preferred_element_type=jnp.float32)
                return row, y_CxN

            def write(j, out_MxN, chunk=chunk):
                row, y_CxN = chunk(j)
                return jax.lax.dynamic_update_slice_in_dim(out_MxN, y_CxN.astype(out_dtype), row, 0)

            def write_masked(j, out_MxN, chunk=chunk, c=c):
                row, y_CxN = chunk(j)
                rows_C = row + jnp.arange(c, dtype=jnp.int32)
                mine_C = (rows_C >= start) & (rows_C < end)
                old_CxN = jax.lax.dynamic_slice_in_dim(out_MxN, row, c)
                y_CxN = jnp.where(mine_C[:, None], y_CxN.astype(out_dtype), old_CxN)
                return jax.lax.dynamic_update_slice_in_dim(out_MxN, y_CxN, row, 0)

            def add_rows(j, out_RxN, chunk=chunk, c=c, first=first):
                # The chunk's new rows (from its nominal start, before the group's end) are added
                # to their destinations; the others (done by an earlier chunk, or another group's)
                # go to indices past the end, which the scatter drops.
                row, y_CxN = chunk(j)
                rows_C = row + jnp.arange(c, dtype=jnp.int32)
                mine_C = (rows_C >= first + j * c) & (rows_C < end)
                dest_C = jax.lax.dynamic_slice_in_dim(out_rows, row, c).astype(jnp.int32)
                dest_C = jnp.where(mine_C, dest_C, out_shape[0] + jnp.arange(c, dtype=jnp.int32))
                if out_scale is not None:
                    y_CxN = y_CxN * jax.lax.dynamic_slice_in_dim(out_scale, row, c)
                return out_RxN.at[dest_C].add(y_CxN.astype(out_dtype), mode="drop")

            count = plan.counts[i][g]
            if out_rows is not None:
                out_MxN = jax.lax.fori_loop(0, count, add_rows, out_MxN)
            elif c != plan.sizes[-1]:
                out_MxN = jax.lax.fori_loop(0, count, write, out_MxN)
            else:
                # Only a group smaller than the smallest size has a chunk that spills out of it.
                fits = end - start >= c
                out_MxN = jax.lax.fori_loop(0, jnp.where(fits, count, 0), write, out_MxN)
                out_MxN = jax.lax.fori_loop(0, jnp.where(fits, 0, count), write_masked, out_MxN)
        return out_MxN

    # Empty groups are skipped: their rows do not exist, and their weights are never read.
    return jax.lax.fori_loop(
        0, plan.num_nonempty, lambda i, out_MxN: group_body(plan.nonempty_G[i], out_MxN), out_MxN)


def closing_sizes(m: int, tm: int) -> tuple[int, ...]:
    """tgmm's chunk sizes for ``m`` rows, ascending: multiples of ``_CLOSE_STEP`` below ``tm``, then
    ``min(tm, m)`` (the full chunk). Every remainder ``r < tm`` (and ``r <= m``) has a size >= r."""
    full = min(tm, m)
    return tuple(c for c in range(_CLOSE_STEP, full, _CLOSE_STEP)) + (full,)


def tgmm(lhs, rhs, group_sizes, group_offset, *, num_groups, preferred_element_type, tiling,
         interpret, lhs_rows=None, rhs_rows=None, lhs_fn=None, lhs_extras=(), rhs_fn=None,
         rhs_extras=()):
    """``out[i] = lhs[rows_j].T @ rhs[rows_j]`` with ``j = group_offset + i``; empty group -> 0.

    ``lhs_rows`` / ``rhs_rows``, ``lhs_fn`` / ``rhs_fn`` and their extras: as gmm's, for either
    operand (``k``: the last dimension of ``lhs_fn``'s result, which must keep ``lhs``'s)."""
    del interpret
    k = lhs.shape[1]
    m = rhs.shape[0] if rhs_rows is None else rhs_rows.shape[0]
    _check_prologue("lhs", lhs_fn, lhs_extras, m)
    _check_prologue("rhs", rhs_fn, rhs_extras, m)
    n = rhs.shape[1]
    out_dtype = jnp.dtype(preferred_element_type)
    if m == 0:
        return _varying_like(jnp.zeros((num_groups, k, n), out_dtype), lhs, rhs, group_sizes,
                             lhs_rows, rhs_rows)
    num_lhs_extras = len(lhs_extras)
    lhs, rhs, *extras = _operands(lhs, rhs, *lhs_extras, *rhs_extras)
    lhs_extras, rhs_extras = extras[:num_lhs_extras], extras[num_lhs_extras:]
    dtype = rhs.dtype
    out_GxKxN = _varying_like(_own_zeros((num_groups, k, n), out_dtype, lhs, rhs), lhs, rhs,
                              group_sizes, lhs_rows, rhs_rows, *extras)
    tm = tiling[0] if tiling else _DEFAULT_CHUNK
    sizes = closing_sizes(m, tm)
    full = sizes[-1]
    groups = _local_groups(group_sizes, group_offset, num_groups)
    dims = (((0,), (0,)), ((), ()))

    def product(c, row, mine_C=None):
        """``lhs[row:row+c].T @ rhs[row:row+c]`` over the rows of ``mine_C`` (default: all)."""
        x_CxK = _operand_rows(lhs, row, c, lhs_rows, lhs_fn, lhs_extras, dtype)
        if mine_C is not None:
            x_CxK = jnp.where(mine_C[:, None], x_CxK, jnp.zeros_like(x_CxK))
        d_CxN = _operand_rows(rhs, row, c, rhs_rows, rhs_fn, rhs_extras, dtype)
        return jax.lax.dot_general(x_CxK, d_CxN, dims, preferred_element_type=jnp.float32)

    def closing_product(c, nominal, end):
        """The rows ``[nominal, end)`` (at most ``c``) from one ``c``-row slice that may start
        earlier (to end at ``end``, or at row 0) and reach into other groups: rows outside
        ``[nominal, end)`` are masked out."""
        row = _chunk_start(nominal, end, c, m)
        rows_C = row + jnp.arange(c, dtype=jnp.int32)
        return product(c, row, (rows_C >= nominal) & (rows_C < end))

    def group_body(g, out_GxKxN):
        start, end, size = groups.starts_G[g], groups.ends_G[g], groups.sizes_G[g]
        num_full = size // full
        rest = size - num_full * full
        # One chunk closes the group's last ``rest`` rows: the smallest size >= rest. It starts the
        # accumulator (no zero fill, no add); a group of whole chunks starts it with its last one.
        closing = jnp.where(rest > 0, rest, full)
        index = jnp.zeros((), jnp.int32)
        for c in sizes[:-1]:
            index = index + (closing > c).astype(jnp.int32)
        num_full = num_full - (rest == 0).astype(jnp.int32)
        close_from = start + num_full * full
        acc_KxN = jax.lax.switch(
            index, [lambda c=c: closing_product(c, close_from, end) for c in sizes])

        def add(j, acc_KxN):
            return acc_KxN + product(full, start + j * full)

        acc_KxN = jax.lax.fori_loop(0, num_full, add, acc_KxN)
        return jax.lax.dynamic_update_index_in_dim(out_GxKxN, acc_KxN.astype(out_dtype), g, 0)

    # Empty groups keep the zeros the output starts with (their rows do not exist).
    return jax.lax.fori_loop(
        0, groups.num_nonempty, lambda i, out: group_body(groups.nonempty_G[i], out), out_GxKxN)


def _varying_like(x, *operands):
    """``x`` made varying over the shard_map axes its operands (None: absent) vary over (loop
    carries must match)."""
    axes = set()
    for operand in operands:
        if operand is not None:
            axes |= jax.typeof(operand).manual_axis_type.varying
    axes -= set(jax.typeof(x).manual_axis_type.varying)
    return jax.lax.pcast(x, tuple(sorted(axes)), to="varying") if axes else x
