"""Expert parallelism: the experts split over the ``expert`` mesh axis, token copies exchanged by all-to-all.

Both functions are pure (arrays in, arrays out) and run under ``jax.shard_map`` over the whole mesh.
Each device holds ``E / ep`` experts (``ep`` = size of the expert axis) and the tokens of its slice
of the batch (split over ``token_axes``, which include the expert axis). Routing has already run
(outside, under GSPMD, so its auxiliary losses are global). With an expert axis of size 1 the same
functions are plain data parallelism: each device dispatches its own tokens to all experts, and
only the weight gradients are reduced (``shard_map``'s transpose sums them over the token axes).

**Dropless** (:func:`dropless_expert_parallel`), per device:

1. ``permute`` sorts the local copies by expert; expert ``e`` lives on expert shard ``e // (E/ep)``,
   so the copies for each shard are contiguous.
2. Copies are packed into a fixed ``[ep, C, D]`` send buffer (row block ``s`` for shard ``s``) and
   exchanged with one ``all_to_all``; the per-expert counts go along in a tiny second one.
3. The receiver orders what it got by expert (each source's rows arrive in expert order, so their
   positions follow from the counts: no sort) and runs the FFN with
   ``gmm(..., group_offset=shard * E/ep)`` on its ``[E/ep, D, F]`` weights. With a ``tensor`` axis
   the hidden dimension F is split too and the output is summed over it (Megatron-style).
4. The reverse ``all_to_all`` returns every output to the slot its copy left from; ``unpermute``
   combines each token's k outputs with its gates (f32).

*Buffer sizing — dropless stays dropless.* ``jax.lax.ragged_all_to_all`` would move only the real
rows, but XLA:CPU does not implement it (jax 0.10.2: "HLO opcode ragged-all-to-all is not
supported"), so the exchange uses fixed buffers. The worst case is every local copy going to one
shard: ``C = T_local * k`` rows per destination, ``ep`` times the average, and a receiver then
holds ``ep * T_local * k`` rows (with their FFN activations). With ``exchange_factor=f`` the
exchange uses ``C = ceil(f * T_local * k / ep)`` rows; if any device's copies for any shard do not
fit (checked with one scalar all-reduce over the mesh), the layer instead exchanges in rounds of
the same ``C`` rows (``lax.cond``): round ``r`` sends rows ``[r C, (r + 1) C)`` of each
destination's copies, as many rounds as the fullest shard needs (at most ``ceil(T_local * k / C)``,
a ``scan`` with a rematerialised body). A copy is never dropped, and the overflow case needs the
memory of one fast exchange, not worst-case buffers (at 32K tokens per device, k = 8, ep = 8 and
D = 2048: 2 GiB send buffers instead of 8 GiB, 0.5M received rows instead of 2M).

**Capacity** (:func:`capacity_expert_parallel`, GShard): each device fills its own ``[E, C, D]``
buffer with ``C = ceil(capacity_factor * T_local * k / E)`` (GShard's per-group capacity),
exchanges it with ``all_to_all`` as ``[ep, E/ep, C, D]``, runs its experts on ``[E/ep, ep * C, D]``
and sends the outputs back. With nothing dropped this equals the single-device layer; under
pressure each device's tokens compete only for their own ``C`` slots.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.sharding import AxisType, PartitionSpec

from moejax.ops import dispatch as dispatch_ops
from moejax.ops.ffn import ExpertFFN
from moejax.ops.gmm import runs_interpreted
from moejax.parallel.mesh import (
    DEFAULT_RULES,
    MeshRoles,
    as_axes,
    current_rules,
    has_explicit_axes,
    rules_for,
)


def _size(mesh, axes: Sequence[str]) -> int:
    return math.prod(mesh.shape[a] for a in axes)


def _resolve_mesh(mesh):
    if mesh is None:
        mesh = jax.sharding.get_abstract_mesh()
        if mesh.empty:
            raise ValueError("expert parallelism needs a mesh: pass mesh= or run under "
                             "moejax.parallel.use_mesh(...)")
    return mesh


def _check_layout(mesh, x_TxD, expert_indices_TxK, experts, expert_axis, token_axes,
                  hidden_axes):
    if x_TxD.ndim != 2 or expert_indices_TxK.ndim != 2 or (
            expert_indices_TxK.shape[0] != x_TxD.shape[0]):
        raise ValueError(
            f"expert parallelism: x must be [T, D] and expert_indices [T, k], got {x_TxD.shape} "
            f"and {expert_indices_TxK.shape}"
        )
    for axis in ((expert_axis,) if expert_axis else ()) + (*token_axes, *hidden_axes):
        if axis not in mesh.axis_names:
            raise ValueError(
                f"expert parallelism: mesh axis {axis!r} is not one of the mesh's axes "
                f"{tuple(mesh.axis_names)}"
            )
    if expert_axis is not None and expert_axis not in token_axes:
        raise ValueError(
            f"expert parallelism: token_axes {token_axes} must include the expert axis "
            f"{expert_axis!r} (tokens are exchanged along it)"
        )
    if set(token_axes) & set(hidden_axes):
        raise ValueError(
            f"expert parallelism: token_axes {token_axes} and hidden_axes {hidden_axes} overlap"
        )
    ep = mesh.shape[expert_axis] if expert_axis is not None else 1
    if not isinstance(experts, ExpertFFN):
        raise ValueError(f"expert parallelism: experts must be a moejax.ops.ffn.ExpertFFN, got "
                         f"{type(experts).__name__}")
    num_experts, _, d_ff = experts.w_in.shape
    if num_experts % ep:
        raise ValueError(
            f"expert parallelism: num_experts = {num_experts} is not divisible by the "
            f"{expert_axis!r} mesh axis of size {ep}"
        )
    token_parts = _size(mesh, token_axes)
    if x_TxD.shape[0] % token_parts:
        raise ValueError(
            f"expert parallelism: {x_TxD.shape[0]} tokens are not divisible by the token mesh axes "
            f"{token_axes} of total size {token_parts} "
            f"({', '.join(f'{a}={mesh.shape[a]}' for a in token_axes)}); make the batch size a "
            f"multiple of {token_parts}"
        )
    hidden_parts = _size(mesh, hidden_axes)
    if d_ff % hidden_parts:
        raise ValueError(
            f"expert parallelism: d_ff = {d_ff} is not divisible by the hidden mesh axes "
            f"{hidden_axes} of total size {hidden_parts}"
        )
    return ep


def _enter(mesh, specs, arrays):
    """The arrays resharded to the ``Explicit`` part of their ``shard_map`` in_specs.

    Under ``Explicit`` axes an array's type carries its sharding and ``shard_map`` requires it to
    match; ``Auto`` axes are resharded by ``shard_map`` itself.
    """
    if not has_explicit_axes(mesh):
        return arrays
    explicit = {a for a, t in zip(mesh.axis_names, mesh.axis_types) if t == AxisType.Explicit}

    def only_explicit(spec):
        dims = []
        for axes in spec:
            kept = tuple(a for a in as_axes(axes) if a in explicit)
            dims.append(None if not kept else kept[0] if len(kept) == 1 else kept)
        return PartitionSpec(*dims)

    return tuple(x if x is None or spec is None else jax.sharding.reshard(x, only_explicit(spec))
                 for x, spec in zip(arrays, specs))


def _varying(x, axes):
    """``x`` marked as varying over ``axes`` (its transpose sums the cotangent over them).

    gmm's custom VJP returns cotangents as varying as the product of both operands, so both must
    carry the same varying axes inside ``shard_map``.
    """
    missing = tuple(a for a in axes if a not in jax.typeof(x).manual_axis_type.varying)
    return jax.lax.pcast(x, missing, to="varying") if missing else x


def _grouped(experts: ExpertFFN, x_RxD, group_sizes_E, group_offset, hidden_axes):
    """This device's experts on its expert-sorted rows; summed over a split hidden dimension."""
    axes = tuple(sorted(jax.typeof(x_RxD).manual_axis_type.varying
                        | jax.typeof(experts.w_in).manual_axis_type.varying))
    x_RxD = _varying(x_RxD, axes)
    experts = jax.tree.map(lambda w: _varying(w, axes), experts)
    y = experts.grouped(x_RxD, group_sizes_E, group_offset)
    return jax.lax.psum(y, hidden_axes) if hidden_axes else y


def _pack(x_PxD, rows_SxC, valid_SxC):
    """Send buffers: slot ``(s, c)`` holds row ``rows[s, c]`` of ``x`` where valid, else 0."""
    rows_SxC = jnp.minimum(rows_SxC, x_PxD.shape[0] - 1)
    return jnp.where(valid_SxC[..., None], dispatch_ops._rows(x_PxD, rows_SxC),
                     jnp.zeros((), x_PxD.dtype))


def _unpack(y_SxCxD, slot_P, sent_P):
    """Row ``p`` of the result is the flattened slot ``slot[p]`` of ``y`` where sent, else 0."""
    num_shards, capacity, d = y_SxCxD.shape
    y_SCxD = y_SxCxD.reshape(num_shards * capacity, d)
    return jnp.where(sent_P[:, None], dispatch_ops._rows(y_SCxD, slot_P),
                     jnp.zeros((), y_SxCxD.dtype))


# Packing the sorted rows into send buffers and unpacking returned buffers into sorted rows move
# each sent row to exactly one slot and back: each is the other's transpose. As custom VJPs both
# directions are gathers; autodiff of a gather would instead give a scatter-add with repeated
# (clamped) indices, which the TPU compiler sorts and expands into code that grows with the number
# of rows (about 2 MB and 4 s of compile time per buffer at 16K rows of 256 bf16).
@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _move(to_shards, x, rows_SxC, valid_SxC, slot_P, sent_P):
    """``to_shards``: sorted rows [P, D] into send buffers [S, C, D]; else returned buffers back."""
    return _pack(x, rows_SxC, valid_SxC) if to_shards else _unpack(x, slot_P, sent_P)


def _move_fwd(to_shards, x, *index):
    return _move(to_shards, x, *index), index


def _move_bwd(to_shards, index, d):
    return (_move(not to_shards, d, *index),) + (None,) * len(index)


_move.defvjp(_move_fwd, _move_bwd)
_to_shards = functools.partial(_move, True)
_from_shards = functools.partial(_move, False)


def _received_copies(recv_counts_SxL, capacity, num_experts, offset):
    """The stable sort by expert of the ``[S·C]`` received rows, computed without a sort.

    Source ``s`` sent ``counts[s, l]`` rows for local expert ``l``, already in expert order, in
    slots ``c < sum_l counts[s, l]``; the other slots are padding. Sorted by (expert, s, c), row
    ``(s, c)`` of local expert ``l`` lands at (rows of experts before ``l``) + (rows of ``l`` from
    sources before ``s``) + (its rank among ``l``'s rows from ``s``); padding follows every group,
    in row order. The same :class:`SortedCopies` as ``sort_copies`` of the rows' expert ids (padding
    as unassigned), without a sort of ``S·C`` keys, which the TPU compiler emits as code that grows
    with the number of rows.
    """
    num_shards, experts_local = recv_counts_SxL.shape
    ends_SxL = jnp.cumsum(recv_counts_SxL, axis=1)
    starts_SxL = ends_SxL - recv_counts_SxL
    totals_S = ends_SxL[:, -1]
    slots_C = jnp.arange(capacity, dtype=jnp.int32)
    # Slot c of source s holds local expert searchsorted(ends[s], c) (experts_local for padding).
    local_SxC = jax.vmap(lambda ends: jnp.searchsorted(ends, slots_C, side="right"))(
        ends_SxL).astype(jnp.int32)
    valid_SxC = slots_C[None, :] < totals_S[:, None]
    per_expert_L = jnp.sum(recv_counts_SxL, axis=0)
    first_L = jnp.cumsum(per_expert_L) - per_expert_L
    earlier_sources_SxL = jnp.cumsum(recv_counts_SxL, axis=0) - recv_counts_SxL
    shift_SxL = first_L[None, :] + earlier_sources_SxL - starts_SxL
    shift_SxC = jnp.take_along_axis(shift_SxL, jnp.minimum(local_SxC, experts_local - 1), axis=1)
    padding_S = capacity - totals_S
    padding_before_S = jnp.cumsum(padding_S) - padding_S
    padding_at_SxC = (jnp.sum(per_expert_L) + padding_before_S[:, None]
                      + slots_C[None, :] - totals_S[:, None])
    inverse_R = jnp.where(valid_SxC, shift_SxC + slots_C[None, :], padding_at_SxC).reshape(-1)
    num_rows = inverse_R.shape[0]
    order_R = jnp.zeros((num_rows,), jnp.int32).at[inverse_R].set(
        jnp.arange(num_rows, dtype=jnp.int32), unique_indices=True)
    group_sizes_E = jax.lax.dynamic_update_slice(
        jnp.zeros((num_experts,), jnp.int32), per_expert_L.astype(jnp.int32), (offset,))
    return dispatch_ops.SortedCopies(order_R, inverse_R, group_sizes_E)


def _exchange(sorted_x_TKxD, group_sizes_E, capacity, ep, expert_axis, run_experts,
              round_index=None):
    """Sends the expert-sorted copies to their shards, runs the experts there, brings outputs back.

    ``round_index=None``: one exchange, every shard's copies fit in ``capacity`` rows. Otherwise
    only round ``r``'s copies travel: rows ``[r * capacity, (r + 1) * capacity)`` of each
    destination's run of sorted copies (still in expert order); the other rows come back as 0.
    """
    num_copies, d = sorted_x_TKxD.shape
    experts_local = group_sizes_E.shape[0] // ep
    counts_SxL = group_sizes_E.reshape(ep, experts_local)
    send_S = jnp.sum(counts_SxL, axis=1)
    start_S = jnp.cumsum(send_S) - send_S
    slots_C = jnp.arange(capacity, dtype=jnp.int32)
    first = 0 if round_index is None else round_index * capacity
    rows_SxC = start_S[:, None] + first + slots_C[None, :]
    valid_SxC = first + slots_C[None, :] < send_S[:, None]
    # Sorted copy p goes to shard s_p = expert_p // experts_local, slot p - start[s_p] - first.
    rows_P = jnp.arange(num_copies, dtype=jnp.int32)
    expert_P = jnp.searchsorted(jnp.cumsum(group_sizes_E), rows_P, side="right").astype(jnp.int32)
    sent_P = expert_P < group_sizes_E.shape[0]
    shard_P = jnp.minimum(expert_P // experts_local, ep - 1)
    position_P = rows_P - start_S[shard_P] - first
    slot_P = shard_P * capacity + jnp.clip(position_P, 0, capacity - 1)
    if round_index is not None:
        sent_P = sent_P & (position_P >= 0) & (position_P < capacity)
        # This round's rows of each local expert: the overlap of the expert's run with the window.
        ends_SxL = jnp.cumsum(counts_SxL, axis=1)
        counts_SxL = jnp.maximum(jnp.minimum(ends_SxL, first + capacity)
                                 - jnp.maximum(ends_SxL - counts_SxL, first), 0)
    sorted_x_TKxD, *routes = dispatch_ops._varying_as_all(sorted_x_TKxD, rows_SxC, valid_SxC,
                                                          slot_P, sent_P)
    send_SxCxD = _to_shards(sorted_x_TKxD, *routes)
    recv_SxCxD = jax.lax.all_to_all(send_SxCxD, expert_axis, 0, 0, tiled=True)
    recv_counts_SxL = jax.lax.all_to_all(counts_SxL, expert_axis, 0, 0, tiled=True)
    y_SxCxD = run_experts(recv_SxCxD.reshape(ep * capacity, d), recv_counts_SxL,
                          capacity).reshape(ep, capacity, d)
    back_SxCxD = jax.lax.all_to_all(y_SxCxD, expert_axis, 0, 0, tiled=True)
    back_SxCxD, *routes = dispatch_ops._varying_as_all(back_SxCxD, *routes)
    return _from_shards(back_SxCxD, *routes)


def _exchange_in_rounds(sorted_x_TKxD, group_sizes_E, capacity, rounds, num_rounds, ep,
                        expert_axis, run_experts):
    """The exchange of every copy in ``num_rounds`` (<= ``rounds``, the same on every device)
    rounds of ``capacity`` rows per destination: the worst case without worst-case buffers.

    Each sorted copy travels in exactly one round and the others return 0 for it, so the sum over
    the rounds is the single exchange's result (the expert FFN is row by row). The rounds run in a
    ``scan`` whose body is rematerialised: memory stays that of one round, not ``rounds`` times it;
    the backward pass recomputes each round once. Rounds past ``num_rounds`` are skipped.
    """
    def one_round(total, r):
        def run():
            return _exchange(sorted_x_TKxD, group_sizes_E, capacity, ep, expert_axis,
                             run_experts, round_index=r)

        y = jax.lax.cond(r < num_rounds, run, lambda: jnp.zeros_like(total))
        return total + y, None

    dtype = jax.eval_shape(lambda: _exchange(sorted_x_TKxD, group_sizes_E, capacity, ep,
                                             expert_axis, run_experts, round_index=0)).dtype
    total = dispatch_ops._varying_as_all(
        jnp.zeros(sorted_x_TKxD.shape, dtype), sorted_x_TKxD)[0]
    total, _ = jax.lax.scan(jax.checkpoint(one_round), total,
                            jnp.arange(rounds, dtype=jnp.int32))
    return total


def dropless_expert_parallel(
    x_TxD: jax.Array,
    expert_indices_TxK: jax.Array,
    combine_weights_TxK: jax.Array,
    experts: ExpertFFN,
    *,
    assigned_TxK: jax.Array | None = None,
    mesh=None,
    expert_axis: str | None = "expert",
    token_axes: Sequence[str] = ("data", "fsdp", "expert"),
    hidden_axes: Sequence[str] = ("tensor",),
    exchange_factor: float | None = 2.0,
    remat: bool = False,
) -> jax.Array:
    """Dropless MoE FFN with the experts split over ``expert_axis``; returns ``y_TxD`` in f32.

    Same result as ``unpermute(FFN(permute(x)))`` on one device. Global shapes in, global shapes out:
    ``x_TxD`` [T, D] and the routing ``[T, k]`` arrays are split over ``token_axes`` (T must be
    divisible by their product), the weights ``[E, D, F]`` / ``[E, F, D]`` over ``expert_axis``
    (E divisible by its size) and, for F, over ``hidden_axes``. ``experts`` holds the weights and
    how to run them (activation, gmm backend, tiling). ``exchange_factor``: rows per destination in
    the fast exchange as a multiple of the average (``None``: always the worst-case buffers); see
    the module docstring. Weights and x should already be in the compute dtype.

    The ``shard_map`` checks varying mesh axes (``check_vma``) except when the gmm backend is a
    Pallas kernel in interpret mode, which JAX's HLO interpreter cannot run under that check.
    """
    mesh = _resolve_mesh(mesh)
    token_axes = as_axes(token_axes)
    hidden_axes = tuple(a for a in as_axes(hidden_axes) if mesh.shape[a] > 1)
    ep = _check_layout(mesh, x_TxD, expert_indices_TxK, experts, expert_axis, token_axes,
                       hidden_axes)
    if exchange_factor is not None and not exchange_factor > 0:
        raise ValueError(f"exchange_factor must be > 0 or None, got {exchange_factor}")
    num_experts = experts.num_experts
    experts_local = num_experts // ep
    k = expert_indices_TxK.shape[1]
    tokens_local = x_TxD.shape[0] // _size(mesh, token_axes)
    worst = tokens_local * k
    fast = worst if exchange_factor is None else min(
        worst, math.ceil(exchange_factor * worst / ep))
    if assigned_TxK is None:
        assigned_TxK = jnp.ones(expert_indices_TxK.shape, bool)
    all_axes = tuple(mesh.axis_names)

    def local(x_TxD, indices_TxK, weights_TxK, assigned_TxK, w_in, w_up, w_out):
        offset = jnp.zeros((), jnp.int32) if expert_axis is None else (
            jax.lax.axis_index(expert_axis) * experts_local).astype(jnp.int32)

        def run_experts(x_RxD, recv_counts_SxL, capacity):
            copies = _received_copies(recv_counts_SxL, capacity, num_experts, offset)
            sorted_x = dispatch_ops.permute_sorted(x_RxD, copies, 1)
            sorted_y = ffn(local_experts, sorted_x, copies.group_sizes_E, offset)
            ones_Rx1 = jnp.ones((x_RxD.shape[0], 1), jnp.float32)
            return dispatch_ops.unpermute(sorted_y, copies, ones_Rx1, sorted_y.dtype)

        local_experts = experts.with_weights(w_in, w_up, w_out)
        sorted_x, copies = dispatch_ops.permute(x_TxD, indices_TxK, num_experts, assigned_TxK)
        ffn = functools.partial(_grouped, hidden_axes=hidden_axes)
        ffn = jax.checkpoint(ffn) if remat else ffn
        if ep == 1:  # every expert is local: no exchange, no second sort
            sorted_y = ffn(local_experts, sorted_x, copies.group_sizes_E, offset)
            return dispatch_ops.unpermute(sorted_y, copies, weights_TxK, jnp.float32)

        def exchange(capacity):
            return lambda: _exchange(sorted_x, copies.group_sizes_E, capacity, ep, expert_axis,
                                     run_experts)

        if fast == worst:
            sorted_y = exchange(worst)()
        else:
            per_shard_S = jnp.sum(copies.group_sizes_E.reshape(ep, experts_local), axis=1)
            most = jax.lax.pmax(jnp.max(per_shard_S), all_axes)
            num_rounds = (most + fast - 1) // fast

            def in_rounds():
                return _exchange_in_rounds(sorted_x, copies.group_sizes_E, fast,
                                           math.ceil(worst / fast), num_rounds, ep, expert_axis,
                                           run_experts)

            sorted_y = jax.lax.cond(most > fast, in_rounds, exchange(fast))
        return dispatch_ops.unpermute(sorted_y, copies, weights_TxK, jnp.float32)

    tokens = PartitionSpec(token_axes or None)
    hidden = hidden_axes or None
    w_in_spec = PartitionSpec(expert_axis, None, hidden)
    w_out_spec = PartitionSpec(expert_axis, hidden, None)
    in_specs = (tokens, tokens, tokens, tokens, w_in_spec,
                None if experts.w_up is None else w_in_spec, w_out_spec)
    fn = jax.shard_map(
        local, mesh=mesh, in_specs=in_specs, out_specs=tokens,
        check_vma=not runs_interpreted(experts.gmm_backend, experts.gmm_interpret),
    )
    return fn(*_enter(mesh, in_specs, (x_TxD, expert_indices_TxK, combine_weights_TxK,
                                       assigned_TxK, *experts.weights)))


def capacity_expert_parallel(
    x_TxD: jax.Array,
    expert_indices_TxK: jax.Array,
    combine_weights_TxK: jax.Array,
    experts: ExpertFFN,
    *,
    capacity_factor: float,
    capacity_order: str = "first_come",
    assigned_TxK: jax.Array | None = None,
    mesh=None,
    expert_axis: str | None = "expert",
    token_axes: Sequence[str] = ("data", "fsdp", "expert"),
    hidden_axes: Sequence[str] = ("tensor",),
    remat: bool = False,
) -> tuple[jax.Array, jax.Array]:
    """GShard expert parallelism for capacity dispatch; returns ``(y_TxD in f32, dropped_fraction)``.

    Layout and arguments as in :func:`dropless_expert_parallel`. Each device's tokens fill their own
    ``[E, C, D]`` buffer (``C`` from ``capacity_factor`` and the *local* token count); the dropped
    fraction is over all tokens of the mesh.
    """
    mesh = _resolve_mesh(mesh)
    token_axes = as_axes(token_axes)
    hidden_axes = tuple(a for a in as_axes(hidden_axes) if mesh.shape[a] > 1)
    ep = _check_layout(mesh, x_TxD, expert_indices_TxK, experts, expert_axis, token_axes,
                       hidden_axes)
    num_experts = experts.num_experts
    experts_local = num_experts // ep
    k = expert_indices_TxK.shape[1]
    tokens_local = x_TxD.shape[0] // _size(mesh, token_axes)
    capacity = dispatch_ops.expert_capacity(tokens_local, k, num_experts, capacity_factor)
    if assigned_TxK is None:
        assigned_TxK = jnp.ones(expert_indices_TxK.shape, bool)

    def ffn(x_LxRxD, w_in, w_up, w_out):
        y = experts.with_weights(w_in, w_up, w_out).batched(x_LxRxD)
        return jax.lax.psum(y, hidden_axes) if hidden_axes else y

    def local(x_TxD, indices_TxK, weights_TxK, assigned_TxK, w_in, w_up, w_out):
        plan = dispatch_ops.capacity_dispatch(indices_TxK, weights_TxK, num_experts, capacity,
                                              capacity_order, assigned_TxK)
        d = x_TxD.shape[1]
        run = jax.checkpoint(ffn) if remat else ffn
        x_ExCxD = dispatch_ops.capacity_gather(x_TxD, plan, k)
        if ep == 1:  # every expert is local: no exchange
            y_ExCxD = run(x_ExCxD, w_in, w_up, w_out)
        else:
            send = x_ExCxD.reshape(ep, experts_local, capacity, d)
            recv = jax.lax.all_to_all(send, expert_axis, 0, 0, tiled=True)
            x_LxRxD = jnp.swapaxes(recv, 0, 1).reshape(experts_local, ep * capacity, d)
            y_LxRxD = run(x_LxRxD, w_in, w_up, w_out)
            y_back = jnp.swapaxes(y_LxRxD.reshape(experts_local, ep, capacity, d), 0, 1)
            y_ExCxD = jax.lax.all_to_all(y_back, expert_axis, 0, 0, tiled=True).reshape(
                num_experts, capacity, d)
        y_TxD = dispatch_ops.capacity_combine(y_ExCxD, plan, weights_TxK, jnp.float32)
        dropped = jax.lax.psum(jnp.sum(assigned_TxK & ~plan.kept_TxK), token_axes)
        assigned = jax.lax.psum(jnp.sum(assigned_TxK), token_axes)
        return y_TxD, (dropped / jnp.maximum(assigned, 1)).astype(jnp.float32)

    tokens = PartitionSpec(token_axes or None)
    hidden = hidden_axes or None
    w_in_spec = PartitionSpec(expert_axis, None, hidden)
    in_specs = (tokens, tokens, tokens, tokens, w_in_spec,
                None if experts.w_up is None else w_in_spec,
                PartitionSpec(expert_axis, hidden, None))
    fn = jax.shard_map(local, mesh=mesh, in_specs=in_specs, out_specs=(tokens, PartitionSpec()))
    return fn(*_enter(mesh, in_specs, (x_TxD, expert_indices_TxK, combine_weights_TxK,
                                       assigned_TxK, *experts.weights)))


class ExpertParallelLayout(NamedTuple):
    """Mesh axes of an expert-parallel layer: experts over ``expert_axis`` (None: every device holds
    all experts), tokens over ``token_axes``, the hidden dimension F over ``hidden_axes``."""

    expert_axis: str | None
    token_axes: tuple[str, ...]
    hidden_axes: tuple[str, ...]


def expert_parallel_layout(mesh=None, rules=None, *, tokens=None,
                           roles: MeshRoles | None = None) -> ExpertParallelLayout | None:
    """The layout the current mesh gives the MoE layer, or None without a mesh. The host decides:

    * experts: ``roles.expert``, else the mesh axis the ``expert`` rule names (None when the rule
      is missing or names no axis of this mesh: each device then holds all experts);
    * hidden F: ``roles.hidden``, else the ``mlp`` rule's axes;
    * tokens: ``roles.batch``; else, under ``Explicit`` axes, the axes the ``tokens`` array's type
      splits its first dimension over; else the ``batch`` rule's axes (moejax's default ``batch``
      axes present in the mesh when the host's rules have no ``batch``); plus the expert axis.

    Rules are the active ones (Linen ``axis_rules``, ``nnx.logical_axis_rules``) or
    :data:`DEFAULT_RULES`; axes the mesh lacks are ignored. Each device dispatches its own tokens
    (under ``shard_map``): left to the compiler, the dropless sort would run over the global batch.
    """
    mesh = jax.sharding.get_abstract_mesh() if mesh is None else mesh
    if mesh.empty:
        return None
    roles = MeshRoles() if roles is None else roles
    for axis in ((roles.expert,) if roles.expert else ()) + tuple(roles.batch or ()) + tuple(
            roles.hidden or ()):
        if axis not in mesh.axis_names:
            raise ValueError(f"MeshRoles names mesh axis {axis!r}, which is not one of the mesh's "
                             f"axes {tuple(mesh.axis_names)}")
    table = dict(rules_for(mesh, rules))
    expert_axes = (roles.expert,) if roles.expert else as_axes(table.get("expert"))
    if len(expert_axes) > 1:
        raise ValueError(
            f"expert parallelism runs over one mesh axis; the 'expert' rule maps to {expert_axes}"
        )
    expert_axis = expert_axes[0] if expert_axes else None
    hidden = tuple(roles.hidden) if roles.hidden is not None else tuple(
        a for a in as_axes(table.get("mlp")) if a != expert_axis)
    if roles.batch is not None:
        token_axes = tuple(roles.batch)
    elif tokens is not None and has_explicit_axes(mesh):
        token_axes = as_axes(jax.typeof(tokens).sharding.spec[0])
    elif "batch" in table:
        token_axes = as_axes(table["batch"])
    else:
        token_axes = as_axes(dict(rules_for(mesh, DEFAULT_RULES)).get("batch"))
    token_axes = tuple(a for a in token_axes if a not in hidden and a != expert_axis)
    if expert_axis is not None:
        token_axes = token_axes + (expert_axis,)
    return ExpertParallelLayout(expert_axis, token_axes, hidden)
