"""What every router returns, the load metrics they share, the common auxiliary losses and input checks.

A token-choice router returns ``Routing(expert_indices [T, k] int32, combine_weights [T, k] float32,
aux_losses, metrics)``; expert choice returns ``ExpertChoiceRouting`` (experts pick tokens). Both are
``typing.NamedTuple``s, hence pytrees that pass through ``jax.jit``, ``jax.grad`` and ``jax.lax.scan``.

``aux_losses`` holds UNWEIGHTED scalar losses; the caller owns their weights. ``metrics`` always holds
``tokens_per_expert`` [E], ``max_load``, ``mean_load``, ``load_cv`` and ``router_entropy`` (see
``routing_metrics``).

Token mask: every router takes an optional ``token_mask`` (bool [T], True = a real token, e.g. not
padding). A masked token gets combine weight exactly 0 (so no dispatcher sends it anywhere), counts
in no ``tokens_per_expert`` and is left out of every mean behind a loss or metric. ``None`` means
every token is real and computes exactly what it did without the argument.
"""

from __future__ import annotations

import operator
from typing import NamedTuple

import jax
import jax.numpy as jnp


class Routing(NamedTuple):
    """Token-choice routing: token ``t`` goes to experts ``expert_indices[t]`` with ``combine_weights[t]``.

    expert_indices: int32 [T, k].
    combine_weights: float32 [T, k]; a slot with weight exactly 0 was not assigned (GShard's dropped
      second expert) and should not take expert capacity.
    aux_losses: dict name -> float32 scalar, unweighted.
    metrics: dict name -> float32 array (``routing_metrics`` keys, plus router-specific ones).
    """

    expert_indices: jax.Array
    combine_weights: jax.Array
    aux_losses: dict[str, jax.Array]
    metrics: dict[str, jax.Array]


class ExpertChoiceRouting(NamedTuple):
    """Expert-choice routing: expert ``e`` processes tokens ``token_indices[e]`` (C of them).

    token_indices: int32 [E, C], distinct tokens per expert; a token may appear under several experts
      or under none.
    combine_weights: float32 [E, C]; the expert's output for ``token_indices[e, c]`` is scaled by
      ``combine_weights[e, c]`` and summed into that token's output.
    aux_losses, metrics: as in ``Routing``.
    """

    token_indices: jax.Array
    combine_weights: jax.Array
    aux_losses: dict[str, jax.Array]
    metrics: dict[str, jax.Array]


def count_tokens_per_expert(
    expert_indices: jax.Array, num_experts: int, *, assigned: jax.Array | None = None
) -> jax.Array:
    """Float32 [E]: how many of the [T, k] assignments go to each expert (``assigned`` masks slots out)."""
    one_hot_TxKxE = jax.nn.one_hot(expert_indices, num_experts, dtype=jnp.float32)
    if assigned is not None:
        one_hot_TxKxE = one_hot_TxKxE * assigned.astype(jnp.float32)[..., None]
    return jnp.sum(one_hot_TxKxE, axis=(0, 1))


def check_token_mask(token_mask, num_tokens: int) -> jax.Array | None:
    """``token_mask`` if it is None or a bool array of shape [T]; else ValueError naming it."""
    if token_mask is None:
        return None
    shape, dtype = jnp.shape(token_mask), jnp.result_type(token_mask)
    if shape != (num_tokens,) or dtype != jnp.bool_:
        raise ValueError(
            f"token_mask must be a bool array of shape [T] = ({num_tokens},) (True = a real token), "
            f"got {dtype} {shape}"
        )
    return token_mask


def mask_assigned(assigned_TxK: jax.Array | None, token_mask_T: jax.Array | None,
                  k: int) -> jax.Array | None:
    """The [T, k] slots that are real assignments: ``assigned_TxK`` and not a masked token's."""
    if token_mask_T is None:
        return assigned_TxK
    num_tokens = token_mask_T.shape[0]
    mask_TxK = jnp.broadcast_to(token_mask_T[:, None], (num_tokens, k))
    return mask_TxK if assigned_TxK is None else assigned_TxK & mask_TxK


def zero_masked(values_Tx: jax.Array, token_mask_T: jax.Array | None) -> jax.Array:
    """``values`` with the rows of masked tokens set to exactly 0 (no gradient flows through them)."""
    if token_mask_T is None:
        return values_Tx
    mask = token_mask_T.reshape(token_mask_T.shape + (1,) * (values_Tx.ndim - 1))
    return jnp.where(mask, values_Tx, jnp.zeros((), values_Tx.dtype))


def masked_mean(values_Tx: jax.Array, token_mask_T: jax.Array | None) -> jax.Array:
    """Mean over the leading (token) axis, over the real tokens only (0 when there are none)."""
    if token_mask_T is None:
        return jnp.mean(values_Tx, axis=0)
    count = jnp.sum(token_mask_T.astype(jnp.float32))
    total = jnp.sum(zero_masked(values_Tx, token_mask_T), axis=0)
    return total / jnp.maximum(count, 1.0)


def routing_metrics(tokens_per_expert: jax.Array, probs: jax.Array,
                    token_mask: jax.Array | None = None) -> dict[str, jax.Array]:
    """The metrics every router reports.

    Args:
      tokens_per_expert: float32 [E], assignments per expert (``count_tokens_per_expert``).
      probs: [T, E], each row the router's probability distribution over experts for one token.
      token_mask: bool [T] or None; ``router_entropy`` averages over the real tokens only.

    Returns:
      ``tokens_per_expert``; ``max_load`` and ``mean_load`` (max and mean of it); ``load_cv``
      (population std / mean of it, 0 at perfect balance); ``router_entropy`` (mean over tokens of
      -sum_i p_i log p_i, with 0 log 0 = 0). All float32, without gradient. With nothing routed
      (every token masked) ``load_cv`` is 0.
    """
    # Diagnostics only: no gradient (entr has an infinite slope at p = 0).
    load_E = jax.lax.stop_gradient(tokens_per_expert.astype(jnp.float32))
    probs_TxE = jax.lax.stop_gradient(probs.astype(jnp.float32))
    mean_load = jnp.mean(load_E)
    entropy_T = jnp.sum(jax.scipy.special.entr(probs_TxE), axis=-1)
    safe_mean_load = jnp.where(mean_load == 0.0, 1.0, mean_load)
    return {
        "tokens_per_expert": load_E,
        "max_load": jnp.max(load_E),
        "mean_load": mean_load,
        "load_cv": jnp.where(mean_load == 0.0, 0.0, jnp.std(load_E) / safe_mean_load),
        "router_entropy": masked_mean(entropy_T, token_mask),
    }


def cv_squared(values: jax.Array) -> jax.Array:
    """Squared coefficient of variation, population std: (std(v) / mean(v))**2 (Shazeer 2017 eq. 7, 11).

    A zero mean (nothing routed anywhere) gives 0, not NaN, so the loss stays usable as a penalty.
    """
    values = values.astype(jnp.float32).reshape(-1)
    mean = jnp.mean(values)
    safe_mean = jnp.where(mean == 0.0, 1.0, mean)
    return jnp.where(mean == 0.0, 0.0, jnp.var(values) / safe_mean**2)


def load_balancing_loss(probs: jax.Array, tokens_per_expert: jax.Array,
                        token_mask: jax.Array | None = None) -> jax.Array:
    """Switch Transformer eq. 4-6 (generalised to k assignments per token): N * sum_i f_i * P_i.

    f_i is the fraction of all assignments that went to expert i, P_i = mean over tokens of probs[:, i]
    (over the real tokens of ``token_mask``). Equals 1 at perfect balance (f_i = P_i = 1/N); gradients
    flow through P only. Nothing assigned gives 0.
    """
    num_experts = probs.shape[-1]
    total = jnp.sum(tokens_per_expert)
    f_E = tokens_per_expert / jnp.where(total == 0.0, 1.0, total)
    p_E = masked_mean(probs.astype(jnp.float32), token_mask)
    return num_experts * jnp.sum(f_E * p_E)


def z_loss(logits: jax.Array, token_mask: jax.Array | None = None) -> jax.Array:
    """ST-MoE router z-loss (Zoph et al. 2022, eq. 5): mean over tokens of logsumexp(logits_t)**2.

    With ``token_mask`` the mean runs over the real tokens only.
    """
    return masked_mean(jax.nn.logsumexp(logits.astype(jnp.float32), axis=-1) ** 2, token_mask)


def check_int(value, name: str, *, low: int, high: int | None = None) -> int:
    """``value`` as a Python int in [low, high], else ValueError naming ``name``."""
    try:
        value = operator.index(value)
    except TypeError:
        raise ValueError(f"{name} must be a Python int, got {value!r}") from None
    if value < low or (high is not None and value > high):
        bounds = f"in [{low}, {high}]" if high is not None else f">= {low}"
        raise ValueError(f"{name} must be {bounds}, got {value}")
    return value


def check_float_matrix(array, name: str, expected: str) -> None:
    """ValueError naming ``name`` unless ``array`` is a rank-2 floating array; ``expected`` names the axes."""
    shape = jnp.shape(array)
    if len(shape) != 2:
        raise ValueError(f"{name} must have shape {expected} (rank 2), got shape {shape}")
    if not jnp.issubdtype(jnp.result_type(array), jnp.floating):
        raise ValueError(f"{name} must be a floating array, got dtype {jnp.result_type(array)}")


def check_logits(logits) -> int:
    """Validates router logits [T, E] (floating); returns E."""
    check_float_matrix(logits, "logits", "[T, E] = [num_tokens, num_experts]")
    return jnp.shape(logits)[1]


def check_key(key, name: str, why: str) -> None:
    if key is None:
        raise ValueError(f"{name} needs a PRNG key: {why}")
