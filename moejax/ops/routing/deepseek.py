"""DeepSeek-V3 routing (DeepSeek-AI 2024, "DeepSeek-V3 Technical Report", section 2.1.2): sigmoid affinities,
auxiliary-loss-free balancing through a per-expert bias on the top-k choice, optional group-limited routing
and the complementary sequence-wise balance loss.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from moejax.ops.routing.common import (
    Routing,
    check_int,
    check_logits,
    check_token_mask,
    count_tokens_per_expert,
    mask_assigned,
    routing_metrics,
    zero_masked,
)


def _limit_to_groups(choice_TxE, num_groups, topk_groups):
    """Masks (to -inf) the experts outside each token's ``topk_groups`` best groups of experts.

    A group's score is the sum of its two highest biased scores (its highest if it has one expert).
    """
    num_tokens, num_experts = choice_TxE.shape
    group_size = num_experts // num_groups
    choice_TxGxS = choice_TxE.reshape(num_tokens, num_groups, group_size)
    best_TxGx2, _ = jax.lax.top_k(choice_TxGxS, min(2, group_size))
    group_scores_TxG = jnp.sum(best_TxGx2, axis=-1)
    _, groups_TxKg = jax.lax.top_k(group_scores_TxG, topk_groups)
    allowed_TxG = jnp.sum(jax.nn.one_hot(groups_TxKg, num_groups, dtype=jnp.float32), axis=1) > 0
    allowed_TxE = jnp.repeat(allowed_TxG, group_size, axis=1)
    return jnp.where(allowed_TxE, choice_TxE, -jnp.inf)


def deepseek_v3(
    logits: jax.Array,
    k: int,
    bias: jax.Array | None = None,
    *,
    routed_scaling_factor: float = 1.0,
    num_groups: int = 1,
    topk_groups: int | None = None,
    sequence_length: int | None = None,
    token_mask: jax.Array | None = None,
) -> Routing:
    """DeepSeek-V3 routing with auxiliary-loss-free load balancing.

      s_{i,t} = Sigmoid(u_t^T e_i)                                                  (eq. 15)
      g'_{i,t} = s_{i,t} if s_{i,t} + b_i in TopK({s_{j,t} + b_j}, K_r) else 0      (eq. 16)
      g_{i,t} = g'_{i,t} / sum_j g'_{j,t}                                            (eq. 13)
    and the combine weights are ``routed_scaling_factor`` * g. The bias b only chooses the experts; the
    gates use the unbiased s. b is not trained by the optimiser: update it between steps with
    ``update_bias`` from ``metrics["tokens_per_expert"]``.

    Group-limited (node-limited) routing, optional: the E experts form ``num_groups`` equal groups, each
    group scored by the sum of its two highest s + b; each token picks only among the experts of its
    ``topk_groups`` best groups.

    ``aux_losses["sequence_balance"]`` (unweighted; alpha belongs to the caller) is the complementary
    sequence-wise balance loss, averaged over sequences:
      L_Bal = sum_i f_i P_i                                                           (eq. 17)
      f_i = E / (K_r L) sum_t 1(expert i chosen for token t)                          (eq. 18)
      s'_{i,t} = s_{i,t} / sum_j s_{j,t},   P_i = (1 / L) sum_t s'_{i,t}              (eq. 19-20)
    over the L tokens of one sequence; 1 at perfect balance. With ``token_mask``, L is each sequence's
    number of real tokens, and sequences without any are left out of the average.

    Args:
      logits: [T, E] floating, u_t^T e_i computed by the caller (float32 math).
      k: K_r, routed experts per token, 1 <= k <= E.
      bias: [E] floating, the balancing bias b; None means zeros. No gradient flows into it.
      routed_scaling_factor: multiplies the normalised gates (DeepSeek-V3 uses 2.5).
      num_groups: number of expert groups; 1 disables group-limited routing. Must divide E.
      topk_groups: groups each token may use, 1 <= topk_groups <= num_groups, with
        k <= topk_groups * E / num_groups; None means all groups.
      sequence_length: L; the T tokens are T / L consecutive sequences of L tokens. None treats all T
        tokens as one sequence (a batch-wise balance loss).
      token_mask: bool [T], True = a real token; None = all tokens. Masked tokens get weight 0 and
        count neither in the loss nor in ``tokens_per_expert`` (so neither in ``update_bias``).

    Returns:
      Routing: ``expert_indices`` [T, k] by descending s + b, ``combine_weights`` [T, k],
      ``aux_losses`` {"sequence_balance"}, ``metrics`` with s' as the router's distribution.
    """
    num_experts = check_logits(logits)
    num_tokens = logits.shape[0]
    k = check_int(k, "k", low=1, high=num_experts)
    if bias is None:
        bias_E = jnp.zeros((num_experts,), jnp.float32)
    else:
        if jnp.shape(bias) != (num_experts,):
            raise ValueError(f"bias must have shape [E] = ({num_experts},), got {jnp.shape(bias)}")
        if not jnp.issubdtype(jnp.result_type(bias), jnp.floating):
            raise ValueError(f"bias must be a floating array, got dtype {jnp.result_type(bias)}")
        bias_E = jax.lax.stop_gradient(bias.astype(jnp.float32))
    num_groups = check_int(num_groups, "num_groups", low=1, high=num_experts)
    if num_experts % num_groups:
        raise ValueError(f"num_groups must divide E = {num_experts}, got {num_groups}")
    topk_groups = num_groups if topk_groups is None else topk_groups
    topk_groups = check_int(topk_groups, "topk_groups", low=1, high=num_groups)
    if k > topk_groups * (num_experts // num_groups):
        raise ValueError(
            f"k must be <= topk_groups * E / num_groups = {topk_groups * (num_experts // num_groups)}, "
            f"got {k}"
        )
    if sequence_length is None:
        sequence_length = num_tokens
    sequence_length = check_int(sequence_length, "sequence_length", low=1)
    if num_tokens % sequence_length:
        raise ValueError(
            f"sequence_length must divide the number of tokens T = {num_tokens}, got {sequence_length}"
        )
    token_mask = check_token_mask(token_mask, num_tokens)

    scores_TxE = jax.nn.sigmoid(logits.astype(jnp.float32))
    choice_TxE = scores_TxE + bias_E[None, :]
    if topk_groups < num_groups:
        choice_TxE = _limit_to_groups(choice_TxE, num_groups, topk_groups)
    _, expert_indices_TxK = jax.lax.top_k(choice_TxE, k)
    chosen_scores_TxK = jnp.take_along_axis(scores_TxE, expert_indices_TxK, axis=-1)
    gates_TxK = chosen_scores_TxK / jnp.sum(chosen_scores_TxK, axis=-1, keepdims=True)

    normalized_TxE = scores_TxE / jnp.sum(scores_TxE, axis=-1, keepdims=True)
    chosen_TxE = jnp.sum(jax.nn.one_hot(expert_indices_TxK, num_experts, dtype=jnp.float32), axis=1)
    num_sequences = num_tokens // sequence_length
    # Each sequence's real tokens (all L without a mask); sequences with none are left out.
    if token_mask is None:
        real_Bx1 = jnp.full((num_sequences, 1), float(sequence_length), jnp.float32)
    else:
        real_Bx1 = jnp.sum(
            token_mask.reshape(num_sequences, sequence_length).astype(jnp.float32), axis=1,
            keepdims=True,
        )
    safe_real_Bx1 = jnp.maximum(real_Bx1, 1.0)

    def per_sequence_mean(values_TxE):
        summed_BxE = jnp.sum(zero_masked(values_TxE, token_mask).reshape(
            num_sequences, sequence_length, num_experts), axis=1)
        return summed_BxE / safe_real_Bx1

    f_BxE = (num_experts / k) * per_sequence_mean(chosen_TxE)
    p_BxE = per_sequence_mean(normalized_TxE)
    has_real_B = real_Bx1[:, 0] > 0
    per_sequence_B = jnp.where(has_real_B, jnp.sum(f_BxE * p_BxE, axis=-1), 0.0)
    sequence_balance = jnp.sum(per_sequence_B) / jnp.maximum(
        jnp.sum(has_real_B.astype(jnp.float32)), 1.0)
    tokens_per_expert_E = count_tokens_per_expert(
        expert_indices_TxK, num_experts, assigned=mask_assigned(None, token_mask, k)
    )
    return Routing(
        expert_indices=expert_indices_TxK.astype(jnp.int32),
        combine_weights=zero_masked(routed_scaling_factor * gates_TxK, token_mask),
        aux_losses={"sequence_balance": sequence_balance},
        metrics=routing_metrics(tokens_per_expert_E, normalized_TxE, token_mask),
    )


def update_bias(bias: jax.Array, tokens_per_expert: jax.Array, rate: float) -> jax.Array:
    """Auxiliary-loss-free bias update (DeepSeek-V3 section 2.1.2, bias update speed gamma = ``rate``):

      b_i <- b_i + rate * sign(mean_j load_j - load_i)

    An overloaded expert's bias drops by ``rate``, an underloaded one's rises by ``rate``. Apply it
    outside the optimiser, e.g. after each step with the step's ``metrics["tokens_per_expert"]``
    (summed over devices). Returns float32 [E].
    """
    if jnp.ndim(bias) != 1 or jnp.shape(bias) != jnp.shape(tokens_per_expert):
        raise ValueError(
            "bias and tokens_per_expert must both have shape [E], got "
            f"{jnp.shape(bias)} and {jnp.shape(tokens_per_expert)}"
        )
    if isinstance(rate, (int, float)) and rate < 0.0:
        raise ValueError(f"rate must be >= 0, got {rate}")
    load_E = tokens_per_expert.astype(jnp.float32)
    return bias.astype(jnp.float32) + rate * jnp.sign(jnp.mean(load_E) - load_E)
