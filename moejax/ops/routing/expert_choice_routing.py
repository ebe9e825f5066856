"""Expert-choice routing (Zhou et al. 2022, "Mixture-of-Experts with Expert Choice Routing"): each expert
takes its top-C tokens, so every expert is exactly full and no balancing loss is needed.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from moejax.ops.routing.common import (
    ExpertChoiceRouting,
    check_int,
    check_logits,
    check_token_mask,
    masked_mean,
    routing_metrics,
    z_loss,
)


def expert_choice_capacity(num_tokens: int, num_experts: int, capacity_factor: float) -> int:
    """Tokens per expert C = ceil(capacity_factor * T / E), at most T (Zhou et al. 2022: k = n * c / e).

    ``capacity_factor`` is the average number of experts per token.
    """
    num_tokens = check_int(num_tokens, "num_tokens", low=1)
    num_experts = check_int(num_experts, "num_experts", low=1)
    if not capacity_factor > 0.0:
        raise ValueError(f"capacity_factor must be > 0, got {capacity_factor}")
    return min(num_tokens, math.ceil(capacity_factor * num_tokens / num_experts))


def expert_choice_active_capacity(token_mask: jax.Array, num_experts: int,
                                  capacity_factor: float) -> jax.Array:
    """``expert_choice_capacity`` of the real-token count: int32 scalar, traced (float32 math).

    With a token mask, pass it as ``expert_choice(..., active_capacity=...)`` so that padding does not
    raise the number of tokens each expert takes.
    """
    num_experts = check_int(num_experts, "num_experts", low=1)
    if not capacity_factor > 0.0:
        raise ValueError(f"capacity_factor must be > 0, got {capacity_factor}")
    num_real = jnp.sum(token_mask.astype(jnp.int32))
    wanted = jnp.ceil(capacity_factor * num_real.astype(jnp.float32) / num_experts)
    return jnp.minimum(num_real, wanted.astype(jnp.int32))


def expert_choice(
    logits: jax.Array,
    capacity: int,
    *,
    token_mask: jax.Array | None = None,
    active_capacity: jax.Array | int | None = None,
) -> ExpertChoiceRouting:
    """Expert-choice routing, Zhou et al. 2022, section 3.2, eq. 1:

      S = Softmax(X . W_g) in R^{T x E} (softmax over experts, per token);  G, I = TopK(S^T, C).

    Expert e processes tokens ``token_indices[e]`` = I[e] (its C highest-scoring tokens, descending) and
    its output for token I[e, c] is weighted by G[e, c]. A token can be taken by several experts or by
    none (``metrics["unrouted_fraction"]``).

    NOT causal: an expert's choice of a token depends on the scores of every other token in the batch,
    later positions included, so it cannot be used for autoregressive decoding as is.

    Args:
      logits: [T, E] floating (X . W_g from the caller; float32 math).
      capacity: C, tokens per expert, 1 <= C <= T (see ``expert_choice_capacity``): the static
        number of slots.
      token_mask: bool [T], True = a real token; None = all tokens. A masked token is never chosen:
        an expert takes real tokens only, and a slot it cannot fill with one has weight 0. Masked
        tokens are left out of ``z_loss``, ``router_entropy`` and ``unrouted_fraction``.
      active_capacity: int scalar (may be traced), how many of the C slots each expert fills; the
        others get weight 0 and count nowhere. None: all C (capped by the real-token count with a
        mask). See ``expert_choice_active_capacity``.

    Returns:
      ExpertChoiceRouting(token_indices int32 [E, C], combine_weights float32 [E, C],
      aux_losses {"z_loss"}, metrics): ``tokens_per_expert`` is the filled slots per expert (C without
      mask or ``active_capacity``), the router's distribution for ``router_entropy`` is S, plus
      ``unrouted_fraction`` (real tokens no expert chose / real tokens).
    """
    num_experts = check_logits(logits)
    num_tokens = logits.shape[0]
    capacity = check_int(capacity, "capacity", low=1, high=num_tokens)
    token_mask = check_token_mask(token_mask, num_tokens)
    logits_TxE = logits.astype(jnp.float32)
    scores_TxE = jax.nn.softmax(logits_TxE, axis=-1)
    filled = jnp.asarray(capacity if active_capacity is None else active_capacity, jnp.int32)
    if token_mask is not None:
        filled = jnp.minimum(filled, jnp.sum(token_mask.astype(jnp.int32)))
        # Scores lie in [0, 1]: -1 ranks every masked token below every real one.
        choice_TxE = jnp.where(token_mask[:, None], scores_TxE, -1.0)
    else:
        choice_TxE = scores_TxE
    # Chosen on S itself (the paper's TopK(S^T)): per expert the order of tokens is that of S[:, e].
    picked_ExC, token_indices_ExC = jax.lax.top_k(choice_TxE.T, capacity)
    active_ExC = jnp.broadcast_to(jnp.arange(capacity, dtype=jnp.int32)[None, :] < filled,
                                  (num_experts, capacity))
    gates_ExC = jnp.where(active_ExC, picked_ExC, 0.0)
    chosen_T = jnp.zeros((num_tokens,), jnp.float32).at[token_indices_ExC.reshape(-1)].add(
        active_ExC.reshape(-1).astype(jnp.float32))
    tokens_per_expert_E = jnp.sum(active_ExC.astype(jnp.float32), axis=1)
    metrics = routing_metrics(tokens_per_expert_E, scores_TxE, token_mask)
    unrouted_T = (chosen_T == 0.0).astype(jnp.float32)
    metrics["unrouted_fraction"] = masked_mean(unrouted_T, token_mask)
    return ExpertChoiceRouting(
        token_indices=token_indices_ExC.astype(jnp.int32),
        combine_weights=gates_ExC,
        aux_losses={"z_loss": z_loss(logits_TxE, token_mask)},
        metrics=metrics,
    )
