"""Softmax top-k routers on precomputed logits: generic ``top_k``, Switch, GShard, Mixtral; input jitter;
batch-prioritised token order.

Every router here takes ``logits`` [T, E] (the caller computes x @ W_router), runs in float32 and returns a
``Routing`` with ``aux_losses`` {"load_balancing", "z_loss"}:

- ``load_balancing`` = N * sum_i f_i * P_i (Switch Transformer eq. 4-6, Fedus et al. 2021), f_i the fraction
  of the assignments that went to expert i, P_i the mean router probability of expert i over tokens;
  1 at perfect balance.
- ``z_loss`` = mean over tokens of logsumexp(logits)**2 (ST-MoE eq. 5, Zoph et al. 2022).

``token_mask`` (bool [T], optional): masked tokens get combine weights 0 and are left out of both
losses and every metric (see ``moejax.ops.routing.common``).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from moejax.ops.routing.common import (
    Routing,
    check_int,
    check_token_mask,
    check_key,
    check_logits,
    count_tokens_per_expert,
    load_balancing_loss,
    mask_assigned,
    routing_metrics,
    z_loss,
    zero_masked,
)

GSHARD_POLICIES = ("all", "sampling", "random")


def _routing(logits_TxE, probs_TxE, expert_indices_TxK, combine_weights_TxK, assigned_TxK=None,
             token_mask_T=None):
    num_experts = probs_TxE.shape[-1]
    assigned_TxK = mask_assigned(assigned_TxK, token_mask_T, expert_indices_TxK.shape[1])
    tokens_per_expert_E = count_tokens_per_expert(
        expert_indices_TxK, num_experts, assigned=assigned_TxK
    )
    return Routing(
        expert_indices=expert_indices_TxK.astype(jnp.int32),
        combine_weights=zero_masked(combine_weights_TxK, token_mask_T),
        aux_losses={
            "load_balancing": load_balancing_loss(probs_TxE, tokens_per_expert_E, token_mask_T),
            "z_loss": z_loss(logits_TxE, token_mask_T),
        },
        metrics=routing_metrics(tokens_per_expert_E, probs_TxE, token_mask_T),
    )


def top_k(
    logits: jax.Array, k: int, *, renormalize: bool = False, norm_p: float = 1.0,
    token_mask: jax.Array | None = None,
) -> Routing:
    """Softmax top-k routing: each token goes to the k experts of highest router probability.

    p(x) = Softmax(logits(x)); the gates are p_i(x) for the k chosen experts (Switch eq. 1-2 for k = 1).
    With ``renormalize`` the gates are divided by their p-norm, (sum_j g_j**norm_p)**(1 / norm_p), so
    for ``norm_p=1`` they sum to 1.

    Args:
      logits: [T, E] floating (any float dtype; the math is float32).
      k: experts per token, 1 <= k <= E.
      renormalize: rescale the k gates to unit ``norm_p``-norm.
      norm_p: the norm's p > 0 (only used with ``renormalize``).
      token_mask: bool [T], True = a real token; None = all tokens.

    Returns:
      Routing: ``expert_indices`` [T, k] by descending probability, ``combine_weights`` [T, k],
      ``aux_losses`` {"load_balancing", "z_loss"}, ``metrics`` with the softmax as the distribution.
    """
    num_experts = check_logits(logits)
    k = check_int(k, "k", low=1, high=num_experts)
    if not norm_p > 0.0:
        raise ValueError(f"norm_p must be > 0, got {norm_p}")
    token_mask = check_token_mask(token_mask, logits.shape[0])
    logits_TxE = logits.astype(jnp.float32)
    probs_TxE = jax.nn.softmax(logits_TxE, axis=-1)
    # Chosen on the logits: probabilities that underflow to 0 would tie and lose the logits' order.
    _, expert_indices_TxK = jax.lax.top_k(logits_TxE, k)
    gates_TxK = jnp.take_along_axis(probs_TxE, expert_indices_TxK, axis=-1)
    if renormalize:
        norm_Tx1 = jnp.sum(gates_TxK**norm_p, axis=-1, keepdims=True) ** (1.0 / norm_p)
        gates_TxK = gates_TxK / norm_Tx1
    return _routing(logits_TxE, probs_TxE, expert_indices_TxK, gates_TxK, token_mask_T=token_mask)


def switch(logits: jax.Array, *, token_mask: jax.Array | None = None) -> Routing:
    """Switch Transformer routing (Fedus et al. 2021, eq. 1-2): top-1, gate = the chosen probability.

    Equals ``top_k(logits, 1)``; its ``load_balancing`` loss is eq. 4-6 exactly.
    """
    return top_k(logits, 1, token_mask=token_mask)


def mixtral(logits: jax.Array, k: int = 2, *, token_mask: jax.Array | None = None) -> Routing:
    """Mixtral routing (Jiang et al. 2024, "Mixtral of Experts", section 2.1): Softmax(TopK(logits)).

    The gates are a softmax over the k chosen logits only, which equals the chosen softmax
    probabilities renormalised to sum 1 (``top_k(logits, k, renormalize=True)``).
    """
    return top_k(logits, k, renormalize=True, token_mask=token_mask)


def gshard(
    logits: jax.Array, *, policy: str = "random", key: jax.Array | None = None,
    token_mask: jax.Array | None = None,
) -> Routing:
    """GShard top-2 gating (Lepikhin et al. 2020, Algorithm 1), with a second-expert policy.

    p = Softmax(logits). The first expert e1 is the argmax of p. The second expert e2 is
      - ``"all"`` and ``"random"``: the second-highest probability;
      - ``"sampling"``: drawn with probability p_j / (1 - p_e1) among j != e1 (sampled in proportion to
        its router probability), via ``jax.random.categorical(key, logits with e1 masked out)``.
    Gates are normalised over the pair: g1 = p_e1 / (p_e1 + p_e2), g2 = p_e2 / (p_e1 + p_e2).
    With ``"random"`` the second expert is kept iff 2 * g2 > u, u ~ U(0, 1) drawn as
    ``jax.random.uniform(key, (T,))`` (so it is kept with probability min(1, 2 * g2)); otherwise its
    combine weight is exactly 0 (g1 is not renormalised, as in Algorithm 1). A zero-weight slot is not
    an assignment: it is left out of ``tokens_per_expert`` and of ``load_balancing``, and a dispatcher
    should not give it expert capacity.

    Args:
      logits: [T, E] floating, E >= 2.
      policy: "all" | "sampling" | "random".
      key: PRNG key, required for "sampling" and "random".
      token_mask: bool [T], True = a real token; None = all tokens.

    Returns:
      Routing with k = 2, ``aux_losses`` {"load_balancing", "z_loss"} (see the module docstring).
    """
    num_experts = check_logits(logits)
    if num_experts < 2:
        raise ValueError(f"gshard routes to 2 experts: logits must have E >= 2, got E = {num_experts}")
    if policy not in GSHARD_POLICIES:
        raise ValueError(f"policy must be one of {GSHARD_POLICIES}, got {policy!r}")
    if policy != "all":
        check_key(key, f"gshard(policy={policy!r})", "the second expert is chosen at random")
    token_mask = check_token_mask(token_mask, logits.shape[0])
    logits_TxE = logits.astype(jnp.float32)
    probs_TxE = jax.nn.softmax(logits_TxE, axis=-1)
    _, top_indices_Tx2 = jax.lax.top_k(logits_TxE, 2)
    first_T = top_indices_Tx2[:, 0]
    if policy == "sampling":
        is_first_TxE = jax.nn.one_hot(first_T, num_experts, dtype=jnp.bool_)
        second_T = jax.random.categorical(key, jnp.where(is_first_TxE, -jnp.inf, logits_TxE), axis=-1)
        expert_indices_Tx2 = jnp.stack([first_T, second_T.astype(first_T.dtype)], axis=-1)
    else:
        expert_indices_Tx2 = top_indices_Tx2
    pair_probs_Tx2 = jnp.take_along_axis(probs_TxE, expert_indices_Tx2, axis=-1)
    gates_Tx2 = pair_probs_Tx2 / jnp.sum(pair_probs_Tx2, axis=-1, keepdims=True)
    assigned_Tx2 = None
    if policy == "random":
        uniform_T = jax.random.uniform(key, (logits_TxE.shape[0],), jnp.float32)
        keep_second_T = 2.0 * gates_Tx2[:, 1] > uniform_T
        assigned_Tx2 = jnp.stack([jnp.ones_like(keep_second_T), keep_second_T], axis=-1)
        gates_Tx2 = jnp.where(assigned_Tx2, gates_Tx2, 0.0)
    return _routing(logits_TxE, probs_TxE, expert_indices_Tx2, gates_Tx2, assigned_Tx2, token_mask)


def jitter(x: jax.Array, key: jax.Array, eps: float) -> jax.Array:
    """Switch Transformer multiplicative input jitter: x * U(1 - eps, 1 + eps), elementwise.

    For training only (skip it in evaluation); apply to the router input before computing the logits
    of any logits router. Returns x's shape and dtype.
    """
    if not 0.0 <= eps < 1.0:
        raise ValueError(f"eps must be in [0, 1), got {eps}")
    noise = jax.random.uniform(key, jnp.shape(x), jnp.float32, 1.0 - eps, 1.0 + eps)
    return (x.astype(jnp.float32) * noise).astype(x.dtype)


def batch_priority_order(scores: jax.Array) -> jax.Array:
    """Batch Prioritized Routing order (Riquelme et al. 2021, V-MoE, section 4.1): int32 [T].

    Tokens sorted by their priority, the largest score of the row (max gate), descending; ties keep
    token order. ``scores`` is [T, k] combine weights or [T, E] router probabilities. A capacity
    dispatcher that fills expert buffers in this order drops the least confident tokens first.
    """
    shape = jnp.shape(scores)
    if len(shape) != 2:
        raise ValueError(
            f"scores must have shape [T, k] (combine weights) or [T, E] (router probabilities), got {shape}"
        )
    priority_T = jnp.max(scores.astype(jnp.float32), axis=-1)
    return jnp.argsort(-priority_T, stable=True).astype(jnp.int32)
