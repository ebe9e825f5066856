"""Softmax top-k routers (top_k, Switch, GShard, Mixtral), input jitter and batch-priority order, against
NumPy."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from moejax.ops import routing

top_k = jax.jit(routing.top_k, static_argnames=("k", "renormalize", "norm_p"))
switch = jax.jit(routing.switch)
mixtral = jax.jit(routing.mixtral, static_argnames=("k",))
gshard = jax.jit(routing.gshard, static_argnames=("policy",))

T, E = 32, 8


def np_softmax(v):
    z = np.exp(v - v.max(axis=-1, keepdims=True))
    return z / z.sum(axis=-1, keepdims=True)


def np_logsumexp(v):
    m = v.max(axis=-1)
    return m + np.log(np.exp(v - m[:, None]).sum(axis=-1))


def np_top_k(logits, k, renormalize=False, norm_p=1.0):
    """Switch eq. 1-6 generalised to k experts, plus the ST-MoE z-loss (eq. 5)."""
    num_tokens, num_experts = logits.shape
    probs = np_softmax(logits)
    indices = np.argsort(-logits, axis=1, kind="stable")[:, :k]
    gates = np.take_along_axis(probs, indices, axis=1)
    if renormalize:
        gates = gates / (gates**norm_p).sum(axis=1, keepdims=True) ** (1.0 / norm_p)
    counts = np.bincount(indices.reshape(-1), minlength=num_experts)
    f = counts / (num_tokens * k)
    load_balancing = num_experts * np.sum(f * probs.mean(axis=0))
    z = np.mean(np_logsumexp(logits) ** 2)
    return indices, gates, counts, load_balancing, z


def logits_from(seed, shape, scale=2.0):
    return jnp.asarray(scale * np.random.default_rng(seed).standard_normal(shape), jnp.float32)


@settings(max_examples=8)
@given(
    num_tokens=st.integers(1, 40),
    num_experts=st.integers(1, 12),
    data=st.data(),
    seed=st.integers(0, 2**16),
)
def test_top_k_matches_numpy_for_any_shape(num_tokens, num_experts, data, seed):
    k = data.draw(st.integers(1, num_experts), label="k")
    renormalize = data.draw(st.booleans(), label="renormalize")
    logits = logits_from(seed, (num_tokens, num_experts))
    indices, gates, counts, load_balancing, z = np_top_k(np.float64(logits), k, renormalize)

    r = top_k(logits, k, renormalize=renormalize)

    assert r.expert_indices.dtype == jnp.int32 and r.expert_indices.shape == (num_tokens, k)
    np.testing.assert_array_equal(r.expert_indices, indices)
    np.testing.assert_allclose(r.combine_weights, gates, rtol=1e-5, atol=1e-7)
    np.testing.assert_array_equal(r.metrics["tokens_per_expert"], counts)
    np.testing.assert_allclose(r.aux_losses["load_balancing"], load_balancing, rtol=1e-5)
    np.testing.assert_allclose(r.aux_losses["z_loss"], z, rtol=1e-5)


def test_top_k_p_norm_renormalisation_gives_unit_p_norm():
    logits = logits_from(0, (T, E))
    _, gates, *_ = np_top_k(np.float64(logits), 3, renormalize=True, norm_p=2.0)
    r = top_k(logits, 3, renormalize=True, norm_p=2.0)
    np.testing.assert_allclose(r.combine_weights, gates, rtol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(r.combine_weights, axis=1), 1.0, rtol=1e-5)


def test_switch_load_balancing_loss_is_exactly_one_at_perfect_balance():
    # Token t prefers expert t mod E with the same margin: f_i = 1/E and P_i = 1/E for every expert.
    logits = 3.0 * jax.nn.one_hot(jnp.arange(4 * E) % E, E, dtype=jnp.float32)
    r = switch(logits)
    np.testing.assert_array_equal(r.metrics["tokens_per_expert"], np.full(E, 4))
    np.testing.assert_allclose(r.aux_losses["load_balancing"], 1.0, rtol=1e-6)
    assert float(r.metrics["load_cv"]) == 0.0


def test_switch_load_balancing_loss_grows_with_collapse_onto_one_expert():
    logits = jnp.zeros((T, E), jnp.float32).at[:, 0].set(5.0)
    probs = np_softmax(np.float64(logits))
    r = switch(logits)
    np.testing.assert_allclose(r.aux_losses["load_balancing"], E * probs[0, 0], rtol=1e-5)
    assert float(r.aux_losses["load_balancing"]) > 7.0


def test_switch_is_top_1_with_the_chosen_probability_as_gate():
    logits = logits_from(1, (T, E))
    indices, gates, *_ = np_top_k(np.float64(logits), 1)
    r = switch(logits)
    np.testing.assert_array_equal(r.expert_indices, indices)
    np.testing.assert_allclose(r.combine_weights, gates, rtol=1e-5)


def test_z_loss_is_mean_squared_logsumexp():
    logits = jnp.array([[0.0, 0.0], [1.0, 3.0], [-2.0, 4.0]], jnp.float32)
    expected = np.mean(
        [np.log(2.0) ** 2, np.log(np.exp(1.0) + np.exp(3.0)) ** 2, np.log(np.exp(-2.0) + np.exp(4.0)) ** 2]
    )
    np.testing.assert_allclose(routing.z_loss(logits), expected, rtol=1e-6)
    np.testing.assert_allclose(top_k(logits, 1).aux_losses["z_loss"], expected, rtol=1e-6)


def test_mixtral_gates_are_softmax_over_the_top_k_logits():
    logits = np.float64(logits_from(2, (T, E)))
    indices = np.argsort(-logits, axis=1)[:, :2]
    expected = np_softmax(np.take_along_axis(logits, indices, axis=1))
    r = mixtral(jnp.asarray(logits, jnp.float32))
    np.testing.assert_array_equal(r.expert_indices, indices)
    np.testing.assert_allclose(r.combine_weights, expected, rtol=1e-5)


def test_gshard_all_policy_keeps_both_experts_with_pair_normalised_gates():
    logits = np.float64(logits_from(3, (T, E)))
    probs = np_softmax(logits)
    indices = np.argsort(-logits, axis=1)[:, :2]
    pair = np.take_along_axis(probs, indices, axis=1)
    r = gshard(jnp.asarray(logits, jnp.float32), policy="all")
    np.testing.assert_array_equal(r.expert_indices, indices)
    np.testing.assert_allclose(r.combine_weights, pair / pair.sum(1, keepdims=True), rtol=1e-5)
    np.testing.assert_array_equal(r.metrics["tokens_per_expert"], np.bincount(indices.ravel(), minlength=E))


MANY = 20000


def test_gshard_random_policy_keeps_second_expert_with_probability_min_1_2g2():
    logits = np.float64(logits_from(4, (MANY, E), scale=1.5))
    pair = np.sort(np_softmax(logits), axis=1)[:, ::-1][:, :2]
    g2 = pair[:, 1] / pair.sum(1)
    expected = np.mean(np.minimum(1.0, 2.0 * g2))

    r = gshard(jnp.asarray(logits, jnp.float32), policy="random", key=jax.random.key(0))

    kept = np.asarray(r.combine_weights[:, 1]) > 0
    # Bernoulli sampling error of the mean over MANY tokens is at most 0.5 / sqrt(MANY) = 0.0035.
    assert abs(kept.mean() - expected) < 0.015
    np.testing.assert_allclose(np.asarray(r.combine_weights[kept, 1]), g2[kept], rtol=1e-5)
    np.testing.assert_allclose(r.combine_weights[:, 0], pair[:, 0] / pair.sum(1), rtol=1e-5)
    assert float(r.metrics["tokens_per_expert"].sum()) == MANY + kept.sum()


def test_gshard_sampling_policy_draws_second_expert_in_proportion_to_its_probability():
    row = np.log(np.array([0.4, 0.25, 0.15, 0.1, 0.05, 0.05]))
    logits = jnp.asarray(np.tile(row, (MANY, 1)), jnp.float32)

    r = gshard(logits, policy="sampling", key=jax.random.key(1))

    indices = np.asarray(r.expert_indices)
    assert np.all(indices[:, 0] == 0)
    frequencies = np.bincount(indices[:, 1], minlength=6) / MANY
    expected = np.r_[0.0, np.exp(row[1:]) / (1.0 - 0.4)]
    np.testing.assert_allclose(frequencies, expected, atol=0.015)
    gate_of_second = 0.4 / (0.4 + np.exp(row[indices[:, 1]]))
    np.testing.assert_allclose(r.combine_weights[:, 0], gate_of_second, rtol=1e-5)


@pytest.mark.parametrize("policy", ["random", "sampling"])
def test_gshard_random_policies_need_a_key(policy):
    with pytest.raises(ValueError, match="PRNG key"):
        gshard(logits_from(0, (T, E)), policy=policy)


def test_gshard_rejects_unknown_policy_and_single_expert():
    with pytest.raises(ValueError, match="policy must be one of"):
        gshard(logits_from(0, (T, E)), policy="top")
    with pytest.raises(ValueError, match="E >= 2"):
        gshard(logits_from(0, (T, 1)), policy="all")


def test_jitter_multiplies_by_uniform_noise_in_the_band_and_keeps_dtype():
    x = jnp.ones((64, 16), jnp.bfloat16)
    y = routing.jitter(x, jax.random.key(0), 0.1)
    assert y.dtype == jnp.bfloat16 and y.shape == x.shape
    y = np.float32(y)
    assert y.min() >= 0.9 - 1e-2 and y.max() <= 1.1 + 1e-2
    assert y.std() > 0.03
    np.testing.assert_array_equal(routing.jitter(x, jax.random.key(0), 0.0), x)


@pytest.mark.parametrize("eps", [-0.1, 1.0])
def test_jitter_rejects_eps_outside_zero_one(eps):
    with pytest.raises(ValueError, match=r"eps must be in \[0, 1\)"):
        routing.jitter(jnp.ones(4), jax.random.key(0), eps)


def test_batch_priority_order_sorts_tokens_by_max_gate_descending_ties_in_token_order():
    weights = np.array([[0.5, 0.2], [0.9, 0.1], [0.5, 0.4], [0.7, 0.3], [0.1, 0.05]], np.float32)
    np.testing.assert_array_equal(routing.batch_priority_order(weights), [1, 3, 0, 2, 4])
    probs = np_softmax(np.float64(logits_from(5, (T, E))))
    expected = np.argsort(-probs.max(axis=1), kind="stable")
    order = routing.batch_priority_order(jnp.asarray(probs, jnp.float32))
    assert order.dtype == jnp.int32
    np.testing.assert_array_equal(order, expected)


@pytest.mark.parametrize(
    ("logits", "k", "match"),
    [
        (np.zeros((T, E), np.float32), 0, r"k must be in \[1, 8\], got 0"),
        (np.zeros((T, E), np.float32), E + 1, r"k must be in \[1, 8\], got 9"),
        (np.zeros((2, T, E), np.float32), 1, r"logits must have shape \[T, E\]"),
        (np.zeros((E,), np.float32), 1, r"logits must have shape \[T, E\]"),
        (np.zeros((T, E), np.int32), 1, "logits must be a floating array"),
    ],
)
def test_top_k_rejects_bad_input(logits, k, match):
    with pytest.raises(ValueError, match=match):
        top_k(jnp.asarray(logits), k)


def test_top_k_rejects_non_positive_norm_p():
    with pytest.raises(ValueError, match="norm_p must be > 0"):
        top_k(logits_from(0, (T, E)), 2, renormalize=True, norm_p=0.0)


def test_batch_priority_order_rejects_wrong_rank():
    with pytest.raises(ValueError, match=r"scores must have shape \[T, k\]"):
        routing.batch_priority_order(jnp.ones((T,)))
