"""Sparsely-gated MoE gating of Shazeer et al. 2017, "Outrageously Large Neural Networks".

- ``softmax``: dense softmax gating, eq. 2.
- ``noisy_top_k``: noisy top-k gating, eq. 3-5, with the importance loss (eq. 6-7) and the smooth load
  estimator and load loss (eq. 8-11).
- ``hierarchical_noisy_top_k``: the two-level hierarchical MoE of appendix B, eq. 12-14.

Equation numbers are the paper's (arXiv:1701.06538). All router math runs in float32. Each takes an
optional ``token_mask`` (bool [T]): masked tokens get combine weights 0 and are left out of the sums
behind Importance and Load and of every metric.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from moejax.ops.routing.common import (
    Routing,
    check_float_matrix,
    check_int,
    check_key,
    check_logits,
    check_token_mask,
    count_tokens_per_expert,
    cv_squared,
    mask_assigned,
    routing_metrics,
    zero_masked,
)

_KEY_REASON = (
    "in training (train=True) the gate adds StandardNormal() * Softplus(x . W_noise) noise to the logits "
    "(Shazeer 2017 eq. 4); pass key=jax.random.key(...) or train=False for the noise-free evaluation gate"
)


def _matmul_f32(x, w):
    return jnp.matmul(
        x.astype(jnp.float32), w.astype(jnp.float32), precision=jax.lax.Precision.HIGHEST
    )


def softmax(logits: jax.Array, *, token_mask: jax.Array | None = None) -> Routing:
    """Dense softmax gating, Shazeer 2017 eq. 2: G_sigma(x) = Softmax(x . W_g).

    Args:
      logits: [T, E] floating, x . W_g computed by the caller.
      token_mask: bool [T], True = a real token; None = all tokens.

    Returns:
      Routing with k = E: ``expert_indices[t] = 0..E-1`` and ``combine_weights[t]`` = the softmax
      probabilities. ``aux_losses["importance"]`` = CV(sum_x G(x))**2 (eq. 6-7).
    """
    num_experts = check_logits(logits)
    num_tokens = logits.shape[0]
    token_mask = check_token_mask(token_mask, num_tokens)
    probs_TxE = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
    expert_indices_TxE = jnp.broadcast_to(
        jnp.arange(num_experts, dtype=jnp.int32)[None, :], (num_tokens, num_experts)
    )
    num_real = num_tokens if token_mask is None else jnp.sum(token_mask.astype(jnp.float32))
    tokens_per_expert_E = jnp.full((num_experts,), 1.0, jnp.float32) * num_real
    gates_TxE = zero_masked(probs_TxE, token_mask)
    return Routing(
        expert_indices=expert_indices_TxE,
        combine_weights=gates_TxE,
        aux_losses={"importance": cv_squared(jnp.sum(gates_TxE, axis=0))},
        metrics=routing_metrics(tokens_per_expert_E, probs_TxE, token_mask),
    )


def _keep_top_k_gate(clean_xE, noise_stddev_xE, noise_xE, k):
    """Noisy top-k gate over the last axis (eq. 3-5, 8-10); leading axes are batch axes.

    ``noise_stddev_xE`` None means evaluation: H = clean logits, and the load counts hard assignments.

    Returns (top_indices [..., k], top_gates [..., k], dense gates G [..., E], P [..., E]) where P(x, i)
    is the probability that expert i is in the top k (eq. 9) in training, the 0/1 indicator in evaluation.
    """
    num_experts = clean_xE.shape[-1]
    if noise_stddev_xE is None:
        h_xE = clean_xE
    else:
        h_xE = clean_xE + noise_xE * noise_stddev_xE
    top_values_xK1, top_indices_xK1 = jax.lax.top_k(h_xE, min(k + 1, num_experts))
    top_indices_xK = top_indices_xK1[..., :k]
    top_gates_xK = jax.nn.softmax(top_values_xK1[..., :k], axis=-1)
    one_hot_xKxE = jax.nn.one_hot(top_indices_xK, num_experts, dtype=jnp.float32)
    gates_xE = jnp.sum(one_hot_xKxE * top_gates_xK[..., None], axis=-2)
    in_top_k_xE = jnp.sum(one_hot_xKxE, axis=-2)
    if noise_stddev_xE is None or k == num_experts:
        return top_indices_xK, top_gates_xK, gates_xE, in_top_k_xE
    # kth_excluding(H(x), k, i): with H_i in the top k, the k-th greatest of the others is the (k+1)-th of
    # H; otherwise it is the k-th of H. Membership comes from top_k's indices, so ties cannot flip it.
    kth_if_in_x1 = top_values_xK1[..., k : k + 1]
    kth_if_out_x1 = top_values_xK1[..., k - 1 : k]
    threshold_xE = jnp.where(in_top_k_xE > 0, kth_if_in_x1, kth_if_out_x1)
    p_xE = jax.scipy.stats.norm.cdf((clean_xE - threshold_xE) / noise_stddev_xE)
    return top_indices_xK, top_gates_xK, gates_xE, p_xE


def _check_noisy_params(x, w_gate, w_noise, gate_name, noise_name, gate_axes, d_axis):
    if jnp.shape(w_gate) != jnp.shape(w_noise):
        raise ValueError(
            f"{noise_name} must have the shape of {gate_name} {jnp.shape(w_gate)}, "
            f"got {jnp.shape(w_noise)}"
        )
    for name, w in ((gate_name, w_gate), (noise_name, w_noise)):
        shape = jnp.shape(w)
        if len(shape) != gate_axes.count(",") + 1:
            raise ValueError(f"{name} must have shape {gate_axes}, got shape {shape}")
        if shape[d_axis] != x.shape[1]:
            raise ValueError(
                f"{name} must have shape {gate_axes} with D = x.shape[1] = {x.shape[1]}, got {shape}"
            )
        if not jnp.issubdtype(jnp.result_type(w), jnp.floating):
            raise ValueError(f"{name} must be a floating array, got dtype {jnp.result_type(w)}")


def _check_noise_epsilon(noise_epsilon):
    if not noise_epsilon >= 0.0:
        raise ValueError(f"noise_epsilon must be >= 0, got {noise_epsilon}")


def noisy_top_k(
    x: jax.Array,
    w_gate: jax.Array,
    w_noise: jax.Array,
    k: int,
    *,
    key: jax.Array | None = None,
    train: bool = True,
    noise_epsilon: float = 0.0,
    token_mask: jax.Array | None = None,
) -> Routing:
    """Noisy top-k gating with importance and load losses (Shazeer 2017, section 2.1 and appendix A).

    H(x)_i = (x . W_g)_i + StandardNormal() * Softplus((x . W_noise)_i)             (eq. 4)
    G(x)   = Softmax(KeepTopK(H(x), k))                                              (eq. 3, 5)

    In evaluation (``train=False``) no noise is drawn: H(x) = x . W_g.

    Losses (unweighted; the paper's w_importance and w_load belong to the caller):
      ``importance`` = CV(Importance(X))**2, Importance(X) = sum_x G(x)                (eq. 6-7)
      ``load``       = CV(Load(X))**2, Load(X)_i = sum_x P(x, i)                       (eq. 10-11)
      P(x, i) = Phi(((x . W_g)_i - kth_excluding(H(x), k, i)) / Softplus((x . W_noise)_i))  (eq. 8-9)
    with CV the coefficient of variation (population std / mean), Phi the standard normal CDF and
    kth_excluding(v, k, i) the k-th greatest component of v excluding component i. P is smooth in
    W_g and W_noise, so the load loss trains both. In evaluation, and when k = E, Load counts the hard
    assignments (every P is 0 or 1).

    Initialisation (appendix A): initialise W_g and W_noise to zeros. The gate then carries no signal
    and only noise of stddev Softplus(0) = log 2, so every expert receives about the same load at the
    start, before the balancing losses have had time to act.

    Args:
      x: [T, D] floating, the tokens (any float dtype; the gate computes in float32).
      w_gate: [D, E] floating, W_g.
      w_noise: [D, E] floating, W_noise (same shape as ``w_gate``).
      k: experts per token, 1 <= k <= E.
      key: PRNG key; required when ``train`` (the noise is
        ``jax.random.normal(key, (T, E), jnp.float32)``).
      train: draw noise and use the smooth load estimator.
      noise_epsilon: added to the noise stddev, Softplus(x . W_noise) + noise_epsilon. 0.0 (default) is
        eq. 4 exactly; the paper's released code uses 1e-2 to keep the stddev away from 0.
      token_mask: bool [T], True = a real token; None = all tokens. The noise is still drawn for
        all T tokens (its shape is static).

    Returns:
      Routing: ``expert_indices`` [T, k] (top-k of H, descending), ``combine_weights`` [T, k]
      (the nonzero entries of G), ``aux_losses`` {"importance", "load"}, ``metrics`` from
      ``routing_metrics`` with G(x) as the router's distribution, plus the vectors behind the losses:
      ``importance`` [E] = Importance(X) and ``load`` [E] = Load(X).
    """
    check_float_matrix(x, "x", "[T, D] = [num_tokens, d_model]")
    _check_noisy_params(x, w_gate, w_noise, "w_gate", "w_noise", "[D, E]", 0)
    num_experts = jnp.shape(w_gate)[1]
    k = check_int(k, "k", low=1, high=num_experts)
    _check_noise_epsilon(noise_epsilon)
    if train:
        check_key(key, "noisy_top_k", _KEY_REASON)
    token_mask = check_token_mask(token_mask, x.shape[0])

    clean_TxE = _matmul_f32(x, w_gate)
    if train:
        noise_stddev_TxE = jax.nn.softplus(_matmul_f32(x, w_noise)) + noise_epsilon
        noise_TxE = jax.random.normal(key, clean_TxE.shape, jnp.float32)
    else:
        noise_stddev_TxE = noise_TxE = None
    top_indices_TxK, top_gates_TxK, gates_TxE, p_TxE = _keep_top_k_gate(
        clean_TxE, noise_stddev_TxE, noise_TxE, k
    )
    importance_E = jnp.sum(zero_masked(gates_TxE, token_mask), axis=0)
    load_E = jnp.sum(zero_masked(p_TxE, token_mask), axis=0)
    assigned_TxK = mask_assigned(None, token_mask, k)
    metrics = routing_metrics(
        count_tokens_per_expert(top_indices_TxK, num_experts, assigned=assigned_TxK), gates_TxE,
        token_mask,
    )
    metrics.update(jax.lax.stop_gradient({"importance": importance_E, "load": load_E}))
    return Routing(
        expert_indices=top_indices_TxK.astype(jnp.int32),
        combine_weights=zero_masked(top_gates_TxK, token_mask),
        aux_losses={"importance": cv_squared(importance_E), "load": cv_squared(load_E)},
        metrics=metrics,
    )


def hierarchical_noisy_top_k(
    x: jax.Array,
    w_gate_primary: jax.Array,
    w_noise_primary: jax.Array,
    w_gate_secondary: jax.Array,
    w_noise_secondary: jax.Array,
    k_primary: int,
    k_secondary: int,
    *,
    key: jax.Array | None = None,
    train: bool = True,
    noise_epsilon: float = 0.0,
    token_mask: jax.Array | None = None,
) -> Routing:
    """Hierarchical noisy top-k gating (Shazeer 2017, appendix B): a groups of b experts, E = a * b.

    A primary noisy top-k gate (``noisy_top_k``'s eq. 3-5) picks ``k_primary`` of the a groups; inside
    each group i a secondary noisy top-k gate G_i picks ``k_secondary`` of its b experts. Expert (i, j)
    is flat expert ``i * b + j`` and gets the gate

      G_H(x)_{i,j} = G_primary(x)_i * G_i(x)_j                                       (eq. 12)

    Losses (unweighted), over the a * b experts:
      ``importance`` = CV(Importance_H(X))**2,
        Importance_H(X)_{i,j} = sum_x G_primary(x)_i * G_i(x)_j                      (eq. 13)
      ``load`` = CV(Load_H(X))**2,
        Load_H(X)_{i,j} = Load_primary(X)_i * Load_i(X^(i))_j / |X^(i)|              (eq. 14)
    where X^(i) is the set of tokens with G_primary(x)_i > 0, Load_primary and Load_i are the eq. 10
    load estimates of the two gates (Load_i summed over X^(i) only), and a group no token reached has
    Load_H = 0.

    Parameter layout (zero initialisation recommended, as for ``noisy_top_k``):
      w_gate_primary, w_noise_primary:     [D, a]      primary gate over groups.
      w_gate_secondary, w_noise_secondary: [a, D, b]   group i's secondary gate is w_*_secondary[i].

    The secondary logits are computed for every group (a [T, a, b] product, the cost of a flat [D, E]
    router), then gathered at the chosen groups.

    Args:
      x: [T, D] floating.
      k_primary: groups per token, 1 <= k_primary <= a.
      k_secondary: experts per chosen group, 1 <= k_secondary <= b.
      key: PRNG key, required when ``train``; ``jax.random.split(key)`` gives the primary and the
        secondary noise keys (``normal(k1, (T, a))``, ``normal(k2, (T, a, b))``).
      train, noise_epsilon, token_mask: as in ``noisy_top_k``.

    Returns:
      Routing with k = k_primary * k_secondary: ``expert_indices[t]`` lists, for each chosen group in
      primary order, its chosen experts in secondary order; ``combine_weights`` the eq. 12 products;
      ``metrics`` adds ``importance`` [E] = Importance_H and ``load`` [E] = Load_H, flattened (i, j).
    """
    check_float_matrix(x, "x", "[T, D] = [num_tokens, d_model]")
    _check_noisy_params(
        x, w_gate_primary, w_noise_primary, "w_gate_primary", "w_noise_primary", "[D, a]", 0
    )
    _check_noisy_params(
        x, w_gate_secondary, w_noise_secondary, "w_gate_secondary", "w_noise_secondary",
        "[a, D, b]", 1,
    )
    num_groups = jnp.shape(w_gate_primary)[1]
    if jnp.shape(w_gate_secondary)[0] != num_groups:
        raise ValueError(
            f"w_gate_secondary must have shape [a, D, b] with a = w_gate_primary.shape[1] = {num_groups},"
            f" got {jnp.shape(w_gate_secondary)}"
        )
    group_size = jnp.shape(w_gate_secondary)[2]
    k_primary = check_int(k_primary, "k_primary", low=1, high=num_groups)
    k_secondary = check_int(k_secondary, "k_secondary", low=1, high=group_size)
    _check_noise_epsilon(noise_epsilon)
    if train:
        check_key(key, "hierarchical_noisy_top_k", _KEY_REASON)
    token_mask = check_token_mask(token_mask, x.shape[0])

    num_tokens = x.shape[0]
    clean_TxA = _matmul_f32(x, w_gate_primary)
    clean_TxAxB = jnp.einsum(
        "td,adb->tab",
        x.astype(jnp.float32),
        w_gate_secondary.astype(jnp.float32),
        precision=jax.lax.Precision.HIGHEST,
    )
    if train:
        key_primary, key_secondary = jax.random.split(key)
        stddev_TxA = jax.nn.softplus(_matmul_f32(x, w_noise_primary)) + noise_epsilon
        stddev_TxAxB = jax.nn.softplus(
            jnp.einsum(
                "td,adb->tab",
                x.astype(jnp.float32),
                w_noise_secondary.astype(jnp.float32),
                precision=jax.lax.Precision.HIGHEST,
            )
        ) + noise_epsilon
        noise_TxA = jax.random.normal(key_primary, clean_TxA.shape, jnp.float32)
        noise_TxAxB = jax.random.normal(key_secondary, clean_TxAxB.shape, jnp.float32)
    else:
        stddev_TxA = stddev_TxAxB = noise_TxA = noise_TxAxB = None

    groups_TxKp, group_gates_TxKp, primary_TxA, p_primary_TxA = _keep_top_k_gate(
        clean_TxA, stddev_TxA, noise_TxA, k_primary
    )
    experts_TxAxKs, expert_gates_TxAxKs, secondary_TxAxB, p_secondary_TxAxB = _keep_top_k_gate(
        clean_TxAxB, stddev_TxAxB, noise_TxAxB, k_secondary
    )

    gates_TxAxB = primary_TxA[:, :, None] * secondary_TxAxB
    importance_AxB = jnp.sum(zero_masked(gates_TxAxB, token_mask), axis=0)
    # Membership from the chosen indices: a chosen group's softmax gate can underflow to exactly 0.
    in_group_TxA = zero_masked(
        jnp.sum(jax.nn.one_hot(groups_TxKp, num_groups, dtype=jnp.float32), axis=1), token_mask
    )
    group_tokens_A = jnp.sum(in_group_TxA, axis=0)
    load_primary_A = jnp.sum(zero_masked(p_primary_TxA, token_mask), axis=0)
    load_secondary_AxB = jnp.sum(in_group_TxA[:, :, None] * p_secondary_TxAxB, axis=0)
    load_AxB = (
        load_primary_A[:, None] * load_secondary_AxB / jnp.maximum(group_tokens_A, 1.0)[:, None]
    )

    chosen_experts_TxKpxKs = jnp.take_along_axis(experts_TxAxKs, groups_TxKp[:, :, None], axis=1)
    chosen_gates_TxKpxKs = jnp.take_along_axis(expert_gates_TxAxKs, groups_TxKp[:, :, None], axis=1)
    k = k_primary * k_secondary
    expert_indices_TxK = (groups_TxKp[:, :, None] * group_size + chosen_experts_TxKpxKs).reshape(
        num_tokens, k
    )
    combine_weights_TxK = (group_gates_TxKp[:, :, None] * chosen_gates_TxKpxKs).reshape(num_tokens, k)
    num_experts = num_groups * group_size
    metrics = routing_metrics(
        count_tokens_per_expert(expert_indices_TxK, num_experts,
                                assigned=mask_assigned(None, token_mask, k)),
        gates_TxAxB.reshape(num_tokens, num_experts),
        token_mask,
    )
    metrics.update(
        jax.lax.stop_gradient({"importance": importance_AxB.reshape(-1), "load": load_AxB.reshape(-1)})
    )
    return Routing(
        expert_indices=expert_indices_TxK.astype(jnp.int32),
        combine_weights=zero_masked(combine_weights_TxK, token_mask),
        aux_losses={"importance": cv_squared(importance_AxB), "load": cv_squared(load_AxB)},
        metrics=metrics,
    )
