"""Token dispatch: sending the T·k token copies chosen by a router to their experts and back.

Three modes, all with static shapes and group sizes kept on device:

* **dropless** (MegaBlocks, Gale et al. 2022): :func:`permute` sorts the copies by expert into a
  ``[T·k, D]`` buffer with contiguous groups for :func:`moejax.ops.gmm`; :func:`unpermute` restores
  token order and combines the k expert outputs with the gates (in f32). Both have custom VJPs whose
  backward passes are gathers by the permutation or its inverse instead of the scatter-adds
  autodiff of a gather would produce, and each pass is one gather that XLA fuses with the
  arithmetic around it: no ``[T, k, D]`` intermediate is written (on the CPU, every byte a call
  writes first is a page faulted in afresh).
* **capacity** (GShard / Switch): each expert takes at most ``C`` copies into an ``[E, C, D]`` buffer;
  copies past ``C`` are dropped and contribute 0, the residual connection carries their token.
  Built from index gathers, never from the ``[T, E, C]`` one-hot einsum.
* **dense**: every expert on every token, weighted by the (possibly sparse) gates; see
  :func:`dense_combine_weights`.
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp

from moejax.ops.routing import batch_priority_order

CAPACITY_ORDERS = ("first_come", "token_major", "batch_priority")


# --------------------------------------------------------------------------- permutation helpers


class SortedCopies(NamedTuple):
    """Copies of tokens sorted by expert (stable within an expert).

    order_TK: position p of the sorted list holds copy ``order_TK[p]`` (copy c = token c // k, choice
    c % k). inverse_TK: where copy c sits in the sorted list. group_sizes_E: copies per expert.
    """

    order_TK: jax.Array
    inverse_TK: jax.Array
    group_sizes_E: jax.Array


def _expert_ids(expert_indices_TxK, num_experts, assigned_TxK):
    experts_TK = expert_indices_TxK.reshape(-1).astype(jnp.int32)
    if assigned_TxK is None:
        return experts_TK
    # Unassigned copies go to a virtual expert E: sorted last, past sum(group_sizes), never computed.
    return jnp.where(assigned_TxK.reshape(-1), experts_TK, num_experts)


def sort_copies(expert_indices_TxK: jax.Array, num_experts: int,
                priority_TK: jax.Array | None = None,
                assigned_TxK: jax.Array | None = None) -> SortedCopies:
    """Stable sort of the flattened ``[T·k]`` copies by expert id.

    ``priority_TK`` (optional) is the order in which copies are considered before the stable sort by
    expert: the sorted list then holds, within each expert, copies in priority order.
    ``assigned_TxK`` (optional) marks the copies a router really assigned (GShard may drop a second
    expert); the others are sorted after every group and counted in no group.
    """
    num_tokens, k = expert_indices_TxK.shape
    num_copies = num_tokens * k
    if priority_TK is None and (num_experts + 1) * num_copies <= jnp.iinfo(jnp.int32).max:
        # One int32 key per copy, expert-major then copy index: unique keys, so a plain sort of one
        # array is the stable sort by expert (cheaper than sorting ids and indices together).
        # The keys are laid out choice-major (entry j·T + t for copy t·k + j), the order in which
        # the TPU stores a [T, k] array: flattening [T, k] token-major is a relayout that the TPU
        # compiler emits as code growing with T (about 2 MB and 6 s of compile time at T = 32K,
        # k = 2). The sorted keys, hence the order, are the same.
        experts = _expert_ids(expert_indices_TxK.T, num_experts,
                              None if assigned_TxK is None else assigned_TxK.T)
        entries_KT = jnp.arange(num_copies, dtype=jnp.int32)
        copies_KT = jax.lax.rem(entries_KT, num_tokens) * k + jax.lax.div(entries_KT, num_tokens)
        order_TK = jax.lax.rem(jnp.sort(experts * num_copies + copies_KT), num_copies)
    elif priority_TK is None:
        experts = _expert_ids(expert_indices_TxK, num_experts, assigned_TxK)
        order_TK = jnp.argsort(experts, stable=True).astype(jnp.int32)
    else:
        experts = _expert_ids(expert_indices_TxK, num_experts, assigned_TxK)
        by_expert = jnp.argsort(experts[priority_TK], stable=True)
        order_TK = priority_TK[by_expert].astype(jnp.int32)
    inverse_TK = jnp.zeros((num_copies,), jnp.int32).at[order_TK].set(
        jnp.arange(num_copies, dtype=jnp.int32), unique_indices=True
    )
    # Copies per expert (in whichever order ``experts`` lists them).
    group_sizes_E = jnp.zeros((num_experts,), jnp.int32).at[experts].add(1, mode="drop")
    return SortedCopies(order_TK, inverse_TK, group_sizes_E)


def _rows(x, index):
    """``x[index]`` along the first axis; every index is in range (a permutation or its part)."""
    return x.at[index].get(mode="promise_in_bounds")


def _varying_as_all(*arrays):
    """The arrays made varying over every shard_map axis any of them varies over.

    A custom VJP's cotangents carry the varying axes of everything they are computed from; giving
    the primal inputs those axes first (the transpose of that cast is a psum, done by JAX) keeps
    each cotangent's type equal to its input's.
    """
    axes = set().union(*(jax.typeof(a).manual_axis_type.varying for a in arrays))
    out = []
    for a in arrays:
        missing = tuple(sorted(axes - set(jax.typeof(a).manual_axis_type.varying)))
        out.append(jax.lax.pcast(a, missing, to="varying") if missing else a)
    return out


def _tokens(copies, k: int):
    """Token of each copy index (``copies // k``; indices are >= 0, so no floor correction)."""
    return jax.lax.div(copies, jnp.int32(k))


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _gather_copies(x_TxD, order_TK, inverse_TK, k):
    return _rows(x_TxD, _tokens(order_TK, k))


def _gather_copies_fwd(x_TxD, order_TK, inverse_TK, k):
    return _gather_copies(x_TxD, order_TK, inverse_TK, k), inverse_TK


def _gather_copies_bwd(k, inverse_TK, d_sorted_TKxD):
    # Sorting is a permutation: its transpose is the inverse permutation, a gather. A token's k
    # copies add up: one gather per choice, summed in f32, which XLA fuses into one pass over the
    # output (no [T, k, D] intermediate).
    inverse_TxK = inverse_TK.reshape(-1, k)
    d_TxD = _rows(d_sorted_TKxD, inverse_TxK[:, 0]).astype(jnp.float32)
    for j in range(1, k):
        d_TxD = d_TxD + _rows(d_sorted_TKxD, inverse_TxK[:, j]).astype(jnp.float32)
    return d_TxD.astype(d_sorted_TKxD.dtype), None, None


_gather_copies.defvjp(_gather_copies_fwd, _gather_copies_bwd)


@jax.custom_vjp
def _combine(sorted_y_TKxD, weights_TxK, order_TK, inverse_TK):
    """``y[t] = sum_j weights[t, j] * sorted_y[inverse[t·k + j]]`` in f32, fused (no [T, k, D])."""
    return _weighted_rows(sorted_y_TKxD, weights_TxK, inverse_TK.reshape(weights_TxK.shape))


def _weighted_rows(rows_NxD, weights_TxK, index_TxK):
    """``y[t] = sum_j weights[t, j] * rows[index[t, j]]`` in f32: k row gathers that XLA fuses with
    the multiply-adds into one pass over ``y`` (no [T, k, D] intermediate)."""
    weights_TxK = weights_TxK.astype(jnp.float32)
    y_TxD = weights_TxK[:, :1] * _rows(rows_NxD, index_TxK[:, 0]).astype(jnp.float32)
    for j in range(1, index_TxK.shape[1]):
        y_TxD = y_TxD + weights_TxK[:, j:j + 1] * _rows(rows_NxD, index_TxK[:, j]).astype(jnp.float32)
    return y_TxD


def _row_dots(d_TxD, rows_NxD, index_TxK):
    """``[T, k]``: ``<d[t], rows[index[t, j]]>`` in f32 (the gradient of :func:`_weighted_rows`
    with respect to its weights)."""
    return jnp.stack([jnp.sum(d_TxD * _rows(rows_NxD, index_TxK[:, j]).astype(jnp.float32), axis=-1)
                      for j in range(index_TxK.shape[1])], axis=1)


def _combine_fwd(sorted_y_TKxD, weights_TxK, order_TK, inverse_TK):
    residuals = (sorted_y_TKxD, weights_TxK, order_TK, inverse_TK)
    return _combine(sorted_y_TKxD, weights_TxK, order_TK, inverse_TK), residuals


def _combine_bwd(residuals, d_TxD):
    sorted_y_TKxD, weights_TxK, order_TK, inverse_TK = residuals
    num_tokens, k = weights_TxK.shape
    d_TxD = d_TxD.astype(jnp.float32)
    # Copy c's cotangent is its token's scaled by its weight; sorted row p holds copy order[p]. One
    # gather of that product (XLA fuses the product into the gather: no [T·k, D] intermediate).
    d_copies_TKxD = (weights_TxK.astype(jnp.float32)[:, :, None] * d_TxD[:, None, :]).reshape(
        num_tokens * k, -1)
    d_sorted_TKxD = _rows(d_copies_TKxD, order_TK).astype(sorted_y_TKxD.dtype)
    d_weights_TxK = _row_dots(d_TxD, sorted_y_TKxD, inverse_TK.reshape(num_tokens, k))
    return d_sorted_TKxD, d_weights_TxK.astype(weights_TxK.dtype), None, None


_combine.defvjp(_combine_fwd, _combine_bwd)


# --------------------------------------------------------------------------- dropless


def permute(x_TxD: jax.Array, expert_indices_TxK: jax.Array, num_experts: int,
            assigned_TxK: jax.Array | None = None):
    """Sorts the T·k token copies by expert.

    Returns ``(sorted_x_TKxD, sorted_copies)``: rows of expert e are contiguous, in token order, and
    ``sorted_copies.group_sizes_E`` counts them (on device). No assigned copy is ever dropped;
    unassigned copies (``assigned_TxK`` False) sit after the last group, where gmm gives 0.
    """
    copies = sort_for_dropless(x_TxD, expert_indices_TxK, num_experts, assigned_TxK)
    return permute_sorted(x_TxD, copies, expert_indices_TxK.shape[1]), copies


def sort_for_dropless(x_TxD: jax.Array, expert_indices_TxK: jax.Array, num_experts: int,
                      assigned_TxK: jax.Array | None = None) -> SortedCopies:
    """The sorted copies of :func:`permute` (shapes checked against ``x_TxD``), without the rows:
    for :func:`moejax.ops.dropless.dropless_ffn`, which gathers them itself."""
    _check_indices(x_TxD, expert_indices_TxK)
    with jax.named_scope("sort_copies"):
        return sort_copies(expert_indices_TxK, num_experts, assigned_TxK=assigned_TxK)


def permute_sorted(x_TxD: jax.Array, copies: SortedCopies, k: int) -> jax.Array:
    """The ``[T·k, D]`` rows of :func:`permute` for an order computed elsewhere (``copies``)."""
    with jax.named_scope("permute"):
        x_TxD, order_TK, inverse_TK = _varying_as_all(x_TxD, copies.order_TK, copies.inverse_TK)
        return _gather_copies(x_TxD, order_TK, inverse_TK, k)


def unpermute(sorted_y_TKxD: jax.Array, copies: SortedCopies, combine_weights_TxK: jax.Array,
              out_dtype=None):
    """Inverse of :func:`permute`, combining each token's k expert outputs with its gates in f32."""
    with jax.named_scope("unpermute"):
        y_TxD = _combine(*_varying_as_all(sorted_y_TKxD, combine_weights_TxK, copies.order_TK,
                                          copies.inverse_TK))
        return y_TxD.astype(out_dtype or sorted_y_TKxD.dtype)


# --------------------------------------------------------------------------- capacity


def expert_capacity(num_tokens: int, k: int, num_experts: int, capacity_factor: float) -> int:
    """C = ceil(capacity_factor · T · k / E), at least 1 (an expert always has room for one copy)."""
    if not capacity_factor > 0:
        raise ValueError(f"capacity_factor must be > 0, got {capacity_factor}")
    return max(1, math.ceil(capacity_factor * num_tokens * k / num_experts))


class CapacityDispatch(NamedTuple):
    """Where each copy went in the ``[E, C, D]`` buffer.

    slot_copy_ExC: copy filling each slot (or -1 for an empty slot). position_TxK: slot of each copy
    within its expert; kept_TxK: whether the copy fit (position < C). expert_TxK: each copy's expert.
    """

    slot_copy_ExC: jax.Array
    position_TxK: jax.Array
    kept_TxK: jax.Array
    expert_TxK: jax.Array


def capacity_priority(combine_weights_TxK: jax.Array, order: str = "first_come") -> jax.Array:
    """The order in which copies claim expert slots, as a permutation of the T·k copies.

    ``first_come`` (GShard, Switch): all first choices in token order, then all second choices, ...
    ``token_major`` (MegaBlocks' capacity mode): copies in (token, choice) order, so token t's second
    choice claims its slot before token t+1's first. With k > 1 and drops, the two orders drop
    different copies: ``first_come`` drops late tokens' second choices first, ``token_major`` drops
    whole late tokens.
    ``batch_priority`` (V-MoE, Riquelme et al. 2021): within each choice rank, tokens with larger
    top gate first, so that under pressure the least confident tokens are the ones dropped.
    """
    if order not in CAPACITY_ORDERS:
        raise ValueError(f"capacity order must be one of {CAPACITY_ORDERS}, got {order!r}")
    num_tokens, k = combine_weights_TxK.shape
    if order == "token_major":
        return jnp.arange(num_tokens * k, dtype=jnp.int32)
    tokens_T = jnp.arange(num_tokens, dtype=jnp.int32)
    if order == "batch_priority":
        tokens_T = batch_priority_order(combine_weights_TxK)
    ranks_K = jnp.arange(k, dtype=jnp.int32)
    return (tokens_T[None, :] * k + ranks_K[:, None]).reshape(-1)


def capacity_dispatch(expert_indices_TxK: jax.Array, combine_weights_TxK: jax.Array,
                      num_experts: int, capacity: int, order: str = "first_come",
                      assigned_TxK: jax.Array | None = None) -> CapacityDispatch:
    """Assigns each copy a slot ``< capacity`` of its expert, in priority order; the rest drop.

    Unassigned copies (``assigned_TxK`` False) take no slot and are not counted as kept.
    """
    if capacity <= 0:
        raise ValueError(f"capacity must be > 0, got {capacity}")
    num_tokens, k = expert_indices_TxK.shape
    priority_TK = capacity_priority(combine_weights_TxK, order)
    copies = sort_copies(expert_indices_TxK, num_experts, priority_TK, assigned_TxK)
    starts_E = jnp.cumsum(copies.group_sizes_E) - copies.group_sizes_E
    experts_TK = expert_indices_TxK.reshape(-1)
    position_TK = copies.inverse_TK - starts_E[experts_TK]
    if assigned_TxK is not None:
        position_TK = jnp.where(assigned_TxK.reshape(-1), position_TK, capacity)
    slots_C = jnp.arange(capacity, dtype=jnp.int32)
    sorted_index_ExC = starts_E[:, None] + slots_C[None, :]
    filled_ExC = slots_C[None, :] < copies.group_sizes_E[:, None]
    safe_index_ExC = jnp.clip(sorted_index_ExC, 0, num_tokens * k - 1)
    slot_copy_ExC = jnp.where(filled_ExC, copies.order_TK[safe_index_ExC], -1)
    position_TxK = position_TK.reshape(num_tokens, k)
    return CapacityDispatch(slot_copy_ExC, position_TxK, position_TxK < capacity,
                            expert_indices_TxK.astype(jnp.int32))


def _slots(dispatch: CapacityDispatch) -> jax.Array:
    """Flat slot ``e · C + position`` of each copy in the ``[E·C]`` buffer (clamped for dropped ones)."""
    capacity = dispatch.slot_copy_ExC.shape[1]
    position_TxK = jnp.minimum(dispatch.position_TxK, capacity - 1)
    return dispatch.expert_TxK * capacity + position_TxK.astype(jnp.int32)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _fill_slots(x_TxD, slot_copy_EC, slots_TxK, kept_TxK, k):
    """``buffer[s] = x[token of the copy in slot s]`` (0 for an empty slot): ``[E·C, D]``."""
    rows_ECxD = _rows(x_TxD, _tokens(jnp.maximum(slot_copy_EC, 0), k))
    return jnp.where((slot_copy_EC >= 0)[:, None], rows_ECxD, jnp.zeros((), x_TxD.dtype))


def _fill_slots_fwd(x_TxD, slot_copy_EC, slots_TxK, kept_TxK, k):
    return _fill_slots(x_TxD, slot_copy_EC, slots_TxK, kept_TxK, k), (slots_TxK, kept_TxK)


def _fill_slots_bwd(k, residuals, d_ECxD):
    # The transpose of filling the slots: each token adds the cotangents of its kept copies' slots.
    # One gather per choice, summed in f32 (autodiff would scatter-add rows into [T, D]).
    slots_TxK, kept_TxK = residuals
    d_TxD = None
    for j in range(k):
        part = jnp.where(kept_TxK[:, j:j + 1],
                         _rows(d_ECxD, slots_TxK[:, j]).astype(jnp.float32), 0.0)
        d_TxD = part if d_TxD is None else d_TxD + part
    return d_TxD.astype(d_ECxD.dtype), None, None, None


_fill_slots.defvjp(_fill_slots_fwd, _fill_slots_bwd)


@jax.custom_vjp
def _combine_slots(y_ECxD, weights_TxK, slots_TxK, slot_copy_EC):
    """``y[t] = sum_j weights[t, j] * y_buffer[slots[t, j]]`` in f32 (weights 0 for dropped copies)."""
    return _weighted_rows(y_ECxD, weights_TxK, slots_TxK)


def _combine_slots_fwd(y_ECxD, weights_TxK, slots_TxK, slot_copy_EC):
    residuals = (y_ECxD, weights_TxK, slots_TxK, slot_copy_EC)
    return _combine_slots(y_ECxD, weights_TxK, slots_TxK, slot_copy_EC), residuals


def _combine_slots_bwd(residuals, d_TxD):
    y_ECxD, weights_TxK, slots_TxK, slot_copy_EC = residuals
    k = weights_TxK.shape[1]
    d_TxD = d_TxD.astype(jnp.float32)
    # Slot s holds copy c = slot_copy[s] (or none): its cotangent is c's weight times its token's.
    # A gather by the slots' copies (autodiff would scatter-add rows into [E, C, D]).
    copies_EC = jnp.maximum(slot_copy_EC, 0)
    weight_EC = jnp.where(slot_copy_EC >= 0,
                          _rows(weights_TxK.astype(jnp.float32).reshape(-1), copies_EC), 0.0)
    d_ECxD = weight_EC[:, None] * _rows(d_TxD, _tokens(copies_EC, k))
    d_weights_TxK = _row_dots(d_TxD, y_ECxD, slots_TxK)
    return (d_ECxD.astype(y_ECxD.dtype), d_weights_TxK.astype(weights_TxK.dtype), None, None)


_combine_slots.defvjp(_combine_slots_fwd, _combine_slots_bwd)


def capacity_gather(x_TxD: jax.Array, dispatch: CapacityDispatch, k: int) -> jax.Array:
    """The ``[E, C, D]`` expert input buffer; empty slots are 0.

    Forward and backward are row gathers (the backward of a plain gather would be a row
    scatter-add, which the TPU compiler emits as code growing with the number of rows).
    """
    num_experts, capacity = dispatch.slot_copy_ExC.shape
    slots_TxK = _slots(dispatch)
    x_TxD, slot_copy_EC, slots_TxK, kept_TxK = _varying_as_all(
        x_TxD, dispatch.slot_copy_ExC.reshape(-1), slots_TxK, dispatch.kept_TxK)
    buffer_ECxD = _fill_slots(x_TxD, slot_copy_EC, slots_TxK, kept_TxK, k)
    return buffer_ECxD.reshape(num_experts, capacity, x_TxD.shape[-1])


def capacity_combine(y_ExCxD: jax.Array, dispatch: CapacityDispatch,
                     combine_weights_TxK: jax.Array, out_dtype=None) -> jax.Array:
    """Each token's kept copies' outputs weighted by their gates (f32); dropped copies give 0.

    ``dispatch`` is :func:`capacity_dispatch`'s plan, which holds each copy's expert and slot.
    """
    num_experts, capacity, d = y_ExCxD.shape
    slots_TxK = _slots(dispatch)
    weights_TxK = jnp.where(dispatch.kept_TxK, combine_weights_TxK,
                            jnp.zeros((), combine_weights_TxK.dtype))
    y_ECxD, weights_TxK, slots_TxK, slot_copy_EC = _varying_as_all(
        y_ExCxD.reshape(num_experts * capacity, d), weights_TxK, slots_TxK,
        dispatch.slot_copy_ExC.reshape(-1))
    y_TxD = _combine_slots(y_ECxD, weights_TxK, slots_TxK, slot_copy_EC)
    return y_TxD.astype(out_dtype or y_ExCxD.dtype)


# --------------------------------------------------------------------------- dense


def dense_combine_weights(expert_indices_TxK: jax.Array, combine_weights_TxK: jax.Array,
                          num_experts: int) -> jax.Array:
    """The ``[T, E]`` gate matrix (zeros for experts not chosen) for dense dispatch.

    One-hot gates, not a scatter: elementwise in T, so a batch split over mesh axes (``Explicit``
    ones included) stays split.
    """
    one_hot_TxKxE = jax.nn.one_hot(expert_indices_TxK, num_experts, dtype=jnp.float32)
    return jnp.einsum("tke,tk->te", one_hot_TxKxE, combine_weights_TxK.astype(jnp.float32))


def _check_indices(x_TxD, expert_indices_TxK):
    if x_TxD.ndim != 2:
        raise ValueError(f"tokens must have shape [T, D], got {x_TxD.shape}")
    if expert_indices_TxK.ndim != 2 or expert_indices_TxK.shape[0] != x_TxD.shape[0]:
        raise ValueError(
            f"expert_indices must have shape [T, k] with T = {x_TxD.shape[0]}, "
            f"got {expert_indices_TxK.shape}"
        )
