"""DeepSeek-V3 routing (sigmoid affinities, bias-steered choice, group limit, sequence-wise balance loss)
and the auxiliary-loss-free bias update, against NumPy transcriptions of the report's equations."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moejax.ops import routing

deepseek_v3 = jax.jit(
    routing.deepseek_v3,
    static_argnames=("k", "routed_scaling_factor", "num_groups", "topk_groups", "sequence_length"),
)

T, E, K = 32, 8, 2


def np_deepseek_v3(logits, k, bias, scale=1.0, num_groups=1, topk_groups=None, sequence_length=None):
    """Eq. 13-20 of the DeepSeek-V3 report, token by token."""
    num_tokens, num_experts = logits.shape
    s = 1.0 / (1.0 + np.exp(-logits))
    choice = s + bias[None, :]
    if topk_groups is not None:
        size = num_experts // num_groups
        for t in range(num_tokens):
            group_scores = [np.sort(g)[::-1][:2].sum() for g in choice[t].reshape(num_groups, size)]
            keep = np.argsort(group_scores)[::-1][:topk_groups]
            for g in range(num_groups):
                if g not in keep:
                    choice[t, g * size : (g + 1) * size] = -np.inf
    indices = np.argsort(-choice, axis=1, kind="stable")[:, :k]
    chosen = np.take_along_axis(s, indices, axis=1)
    weights = scale * chosen / chosen.sum(axis=1, keepdims=True)
    s_prime = s / s.sum(axis=1, keepdims=True)
    length = sequence_length or num_tokens
    losses = []
    for b in range(num_tokens // length):
        rows = slice(b * length, (b + 1) * length)
        counts = np.bincount(indices[rows].ravel(), minlength=num_experts)
        f = num_experts / (k * length) * counts
        p = s_prime[rows].mean(axis=0)
        losses.append(np.sum(f * p))
    return indices, weights, np.mean(losses), s_prime


def make(seed, shape, scale=1.5):
    return np.random.default_rng(seed).standard_normal(shape) * scale


def test_matches_equations_13_to_20_with_bias_scaling_and_sequences():
    logits, bias = make(0, (T, E)), make(1, (E,), 0.3)
    indices, weights, balance, s_prime = np_deepseek_v3(logits, K, bias, 2.5, sequence_length=8)

    r = deepseek_v3(jnp.float32(logits), K, jnp.float32(bias), routed_scaling_factor=2.5, sequence_length=8)

    np.testing.assert_array_equal(r.expert_indices, indices)
    np.testing.assert_allclose(r.combine_weights, weights, rtol=1e-5)
    np.testing.assert_allclose(r.aux_losses["sequence_balance"], balance, rtol=1e-5)
    entropy = -np.sum(s_prime * np.log(s_prime), axis=1).mean()
    np.testing.assert_allclose(r.metrics["router_entropy"], entropy, rtol=1e-5)


def test_without_sequence_length_the_balance_loss_treats_the_batch_as_one_sequence():
    logits = make(2, (T, E))
    _, _, balance, _ = np_deepseek_v3(logits, K, np.zeros(E))
    r = deepseek_v3(jnp.float32(logits), K)
    np.testing.assert_allclose(r.aux_losses["sequence_balance"], balance, rtol=1e-5)


def test_bias_steers_the_choice_but_gates_use_unbiased_scores():
    logits = make(3, (T, E))
    bias = np.zeros(E)
    bias[E - 1] = 10.0
    r = deepseek_v3(jnp.float32(logits), K, jnp.float32(bias))
    assert np.all(np.asarray(r.expert_indices)[:, 0] == E - 1)
    s = 1.0 / (1.0 + np.exp(-logits))
    chosen = np.take_along_axis(s, np.asarray(r.expert_indices), axis=1)
    np.testing.assert_allclose(r.combine_weights, chosen / chosen.sum(1, keepdims=True), rtol=1e-5)


def test_group_limited_routing_picks_experts_only_from_the_best_groups():
    logits, bias = make(4, (T, E)), make(5, (E,), 0.3)
    indices, weights, *_ = np_deepseek_v3(logits, 3, bias, num_groups=4, topk_groups=2)
    r = deepseek_v3(jnp.float32(logits), 3, jnp.float32(bias), num_groups=4, topk_groups=2)
    np.testing.assert_array_equal(r.expert_indices, indices)
    np.testing.assert_allclose(r.combine_weights, weights, rtol=1e-5)
    groups_used = np.asarray(r.expert_indices) // 2
    assert max(len(set(row)) for row in groups_used.tolist()) <= 2


def test_update_bias_applies_the_sign_rule():
    bias = jnp.array([0.0, 0.5, -0.5, 0.1], jnp.float32)
    load = jnp.array([10.0, 2.0, 4.0, 4.0], jnp.float32)  # mean 5
    np.testing.assert_allclose(routing.update_bias(bias, load, 0.01), [-0.01, 0.51, -0.49, 0.11])
    np.testing.assert_array_equal(routing.update_bias(bias, jnp.full(4, 3.0), 0.01), bias)


def test_bias_updates_move_a_skewed_load_toward_balance():
    skew = np.linspace(1.5, -1.5, E)
    logits = jnp.float32(make(6, (256, E), 0.5) + skew[None, :])

    @jax.jit
    def simulate(bias):
        def step(bias, _):
            r = routing.deepseek_v3(logits, K, bias)
            return routing.update_bias(bias, r.metrics["tokens_per_expert"], 0.01), r.metrics["load_cv"]

        return jax.lax.scan(step, bias, length=200)

    _, load_cv = simulate(jnp.zeros(E, jnp.float32))
    assert float(load_cv[0]) > 0.8
    assert float(load_cv[-20:].max()) < 0.1 * float(load_cv[0])


def test_no_gradient_reaches_the_bias():
    logits = jnp.float32(make(7, (T, E)))

    def loss(bias):
        r = routing.deepseek_v3(logits, K, bias)
        return jnp.sum(r.combine_weights**2) + r.aux_losses["sequence_balance"]

    np.testing.assert_array_equal(jax.jit(jax.grad(loss))(jnp.zeros(E, jnp.float32)), np.zeros(E))


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"k": 0}, r"k must be in \[1, 8\]"),
        ({"bias": np.zeros(E + 1, np.float32)}, r"bias must have shape \[E\] = \(8,\)"),
        ({"bias": np.zeros(E, np.int32)}, "bias must be a floating array"),
        ({"num_groups": 3}, "num_groups must divide E = 8"),
        ({"num_groups": 4, "topk_groups": 5}, r"topk_groups must be in \[1, 4\]"),
        ({"k": 5, "num_groups": 4, "topk_groups": 2}, r"k must be <= topk_groups \* E / num_groups = 4"),
        ({"sequence_length": 5}, "sequence_length must divide the number of tokens T = 32"),
    ],
)
def test_rejects_bad_input(kwargs, match):
    kwargs = {"k": K, **kwargs}
    with pytest.raises(ValueError, match=match):
        routing.deepseek_v3(jnp.zeros((T, E), jnp.float32), **kwargs)


def test_update_bias_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match=r"bias and tokens_per_expert must both have shape \[E\]"):
        routing.update_bias(jnp.zeros(E), jnp.zeros(E + 1), 0.01)
