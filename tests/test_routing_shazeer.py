"""Shazeer et al. 2017 gating (softmax, noisy top-k, hierarchical) against NumPy transcriptions of the
paper's equations."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.stats

from moejax.ops import routing

T, D, E, K = 24, 6, 8, 2

# Jitted once per module: one XLA compilation per shape instead of one per eager op.
softmax = jax.jit(routing.softmax)
noisy_top_k = jax.jit(routing.noisy_top_k, static_argnames=("k", "train", "noise_epsilon"))
hierarchical_noisy_top_k = jax.jit(
    routing.hierarchical_noisy_top_k, static_argnames=("k_primary", "k_secondary", "train")
)


def np_softmax(v):
    z = np.exp(v - v.max(axis=-1, keepdims=True))
    return z / z.sum(axis=-1, keepdims=True)


def np_softplus(v):
    return np.logaddexp(0.0, v)


def np_cv_squared(v):
    v = np.asarray(v, np.float64).reshape(-1)
    return v.var() / v.mean() ** 2


def np_noisy_gate(clean, stddev, noise, k):
    """Eq. 3-5 and 8-10 for rows of logits; stddev None means no noise (hard 0/1 load)."""
    h = clean if stddev is None else clean + noise * stddev
    num_tokens, num_experts = h.shape
    top = np.argsort(-h, axis=1, kind="stable")[:, :k]
    gates = np.zeros_like(h)
    top_gates = np.zeros((num_tokens, k))
    p = np.zeros_like(h)
    for t in range(num_tokens):
        top_gates[t] = np_softmax(h[t, top[t]])
        gates[t, top[t]] = top_gates[t]
        for i in range(num_experts):
            if stddev is None or k == num_experts:
                p[t, i] = float(i in top[t])
            else:
                kth_excluding = np.sort(np.delete(h[t], i))[::-1][k - 1]
                p[t, i] = scipy.stats.norm.cdf((clean[t, i] - kth_excluding) / stddev[t, i])
    return top, top_gates, gates, p


def f64(a):
    return np.asarray(a, np.float64)


def normal(rng, shape, scale=1.0):
    return jnp.asarray(scale * rng.standard_normal(shape), jnp.float32)


@pytest.fixture
def params():
    rng = np.random.default_rng(0)
    return normal(rng, (T, D)), normal(rng, (D, E), 0.5), normal(rng, (D, E), 0.3)


def test_softmax_router_is_every_expert_weighted_by_the_softmax():
    logits = normal(np.random.default_rng(1), (T, E))
    probs = np_softmax(f64(logits))
    r = softmax(logits)
    np.testing.assert_array_equal(r.expert_indices, np.tile(np.arange(E), (T, 1)))
    np.testing.assert_allclose(r.combine_weights, probs, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(r.aux_losses["importance"], np_cv_squared(probs.sum(0)), rtol=1e-4)
    np.testing.assert_allclose(r.metrics["tokens_per_expert"], np.full(E, T))


def test_noisy_top_k_in_training_matches_equations_3_to_10(params):
    x, w_gate, w_noise = params
    key = jax.random.key(7)
    noise = f64(jax.random.normal(key, (T, E), jnp.float32))
    clean = f64(x) @ f64(w_gate)
    stddev = np_softplus(f64(x) @ f64(w_noise))
    top, top_gates, gates, p = np_noisy_gate(clean, stddev, noise, K)

    r = noisy_top_k(x, w_gate, w_noise, K, key=key, train=True)

    np.testing.assert_array_equal(r.expert_indices, top)
    np.testing.assert_allclose(r.combine_weights, top_gates, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(r.metrics["importance"], gates.sum(0), rtol=1e-5)
    np.testing.assert_allclose(r.metrics["load"], p.sum(0), rtol=1e-4)
    np.testing.assert_allclose(r.aux_losses["importance"], np_cv_squared(gates.sum(0)), rtol=1e-4)
    np.testing.assert_allclose(r.aux_losses["load"], np_cv_squared(p.sum(0)), rtol=1e-3)


def test_noise_epsilon_is_added_to_the_noise_stddev(params):
    x, w_gate, w_noise = params
    key = jax.random.key(7)
    noise = f64(jax.random.normal(key, (T, E), jnp.float32))
    stddev = np_softplus(f64(x) @ f64(w_noise)) + 0.01
    _, _, _, p = np_noisy_gate(f64(x) @ f64(w_gate), stddev, noise, K)
    r = noisy_top_k(x, w_gate, w_noise, K, key=key, noise_epsilon=0.01)
    np.testing.assert_allclose(r.metrics["load"], p.sum(0), rtol=1e-4)


def test_noisy_top_k_in_eval_is_softmax_over_the_top_k_clean_logits(params):
    x, w_gate, w_noise = params
    clean = f64(x) @ f64(w_gate)
    top = np.argsort(-clean, axis=1)[:, :K]
    expected = np_softmax(np.take_along_axis(clean, top, axis=1))

    r = noisy_top_k(x, w_gate, w_noise, K, train=False)

    np.testing.assert_array_equal(r.expert_indices, top)
    np.testing.assert_allclose(r.combine_weights, expected, rtol=1e-5, atol=1e-6)
    counts = np.bincount(top.reshape(-1), minlength=E)
    np.testing.assert_allclose(r.metrics["load"], counts)
    np.testing.assert_allclose(r.aux_losses["load"], np_cv_squared(counts), rtol=1e-5)


def test_smooth_load_equals_hard_counts_as_the_noise_stddev_vanishes():
    rng = np.random.default_rng(2)
    x = jnp.abs(normal(rng, (T, D))) + 0.5
    w_gate = normal(rng, (D, E))
    w_noise = jnp.full((D, E), -40.0)  # softplus(x . W_noise) < exp(-120)
    clean = f64(x) @ f64(w_gate)
    counts = np.bincount(np.argsort(-clean, axis=1)[:, :K].reshape(-1), minlength=E)

    r = noisy_top_k(x, w_gate, w_noise, K, key=jax.random.key(3), train=True)

    np.testing.assert_array_equal(r.metrics["load"], counts)
    np.testing.assert_allclose(r.aux_losses["load"], np_cv_squared(counts), rtol=1e-5)


def test_load_loss_has_finite_nonzero_gradients_in_w_gate_and_w_noise(params):
    x, w_gate, w_noise = params

    def load_loss(w_gate, w_noise):
        return noisy_top_k(x, w_gate, w_noise, K, key=jax.random.key(4)).aux_losses["load"]

    g_gate, g_noise = jax.grad(load_loss, argnums=(0, 1))(w_gate, w_noise)
    for g in (g_gate, g_noise):
        assert np.all(np.isfinite(g))
        assert np.linalg.norm(g) > 1e-6


def test_zero_initialised_gate_starts_near_balanced_load():
    x = normal(np.random.default_rng(5), (512, D))
    zeros = jnp.zeros((D, E), jnp.float32)
    r = noisy_top_k(x, zeros, zeros, K, key=jax.random.key(6))
    assert float(r.aux_losses["load"]) < 1e-3
    assert float(r.metrics["load_cv"]) < 0.15


def test_k_equal_to_num_experts_gives_every_expert_full_load(params):
    x, w_gate, w_noise = params
    r = noisy_top_k(x, w_gate, w_noise, E, key=jax.random.key(8))
    np.testing.assert_array_equal(r.metrics["load"], np.full(E, T))
    assert float(r.aux_losses["load"]) == 0.0


def test_noisy_top_k_in_training_without_key_explains_the_noise(params):
    x, w_gate, w_noise = params
    with pytest.raises(ValueError, match="PRNG key.*train=False"):
        noisy_top_k(x, w_gate, w_noise, K)


@pytest.mark.parametrize(
    ("w_gate_shape", "w_noise_shape", "k", "match"),
    [
        ((D, E), (D, E + 1), K, "w_noise must have the shape of w_gate"),
        ((D + 1, E), (D + 1, E), K, r"w_gate must have shape \[D, E\] with D = x.shape\[1\]"),
        ((D, E, 1), (D, E, 1), K, r"w_gate must have shape \[D, E\]"),
        ((D, E), (D, E), 0, r"k must be in \[1, 8\]"),
        ((D, E), (D, E), E + 1, r"k must be in \[1, 8\]"),
    ],
)
def test_noisy_top_k_rejects_bad_parameters(params, w_gate_shape, w_noise_shape, k, match):
    x = params[0]
    with pytest.raises(ValueError, match=match):
        noisy_top_k(x, jnp.zeros(w_gate_shape), jnp.zeros(w_noise_shape), k, train=False)


def test_noisy_top_k_rejects_integer_tokens(params):
    _, w_gate, w_noise = params
    with pytest.raises(ValueError, match="x must be a floating array"):
        noisy_top_k(jnp.ones((T, D), jnp.int32), w_gate, w_noise, K, train=False)


def test_noisy_top_k_on_bf16_tokens_computes_in_float32(params):
    x, w_gate, w_noise = params
    x_bf16 = x.astype(jnp.bfloat16)
    r = noisy_top_k(x_bf16, w_gate, w_noise, K, key=jax.random.key(9))
    r32 = noisy_top_k(x_bf16.astype(jnp.float32), w_gate, w_noise, K, key=jax.random.key(9))
    assert r.combine_weights.dtype == jnp.float32
    assert r.aux_losses["load"].dtype == jnp.float32
    jax.tree.map(np.testing.assert_array_equal, r, r32)


A, B, KP, KS = 3, 4, 2, 2


def np_hierarchical(x, wgp, wnp, wgs, wns, kp, ks, noise_p, noise_s):
    """Appendix B, eq. 12-14, one group at a time."""
    train = noise_p is not None
    num_tokens = x.shape[0]
    clean_p = x @ wgp
    stddev_p = np_softplus(x @ wnp) if train else None
    top_p, top_gates_p, gates_p, p_p = np_noisy_gate(clean_p, stddev_p, noise_p, kp)
    gates = np.zeros((num_tokens, A, B))
    load = np.zeros((A, B))
    tops, top_gates_s = [], []
    for i in range(A):
        clean_s = x @ wgs[i]
        stddev_s = np_softplus(x @ wns[i]) if train else None
        top_s, tg_s, gates_s, p_s = np_noisy_gate(
            clean_s, stddev_s, noise_s[:, i] if train else None, ks
        )
        tops.append(top_s)
        top_gates_s.append(tg_s)
        gates[:, i] = gates_p[:, i : i + 1] * gates_s
        members = gates_p[:, i] > 0
        if members.any():
            load[i] = p_p[:, i].sum() * p_s[members].sum(0) / members.sum()
    indices = np.zeros((num_tokens, kp * ks), np.int64)
    weights = np.zeros((num_tokens, kp * ks))
    for t in range(num_tokens):
        slot = 0
        for a_slot, i in enumerate(top_p[t]):
            for b_slot, j in enumerate(tops[i][t]):
                indices[t, slot] = i * B + j
                weights[t, slot] = top_gates_p[t, a_slot] * top_gates_s[i][t, b_slot]
                slot += 1
    return indices, weights, gates.sum(0), load


@pytest.fixture
def hierarchical_params():
    rng = np.random.default_rng(10)
    return (
        normal(rng, (T, D)),
        normal(rng, (D, A), 0.5),
        normal(rng, (D, A), 0.3),
        normal(rng, (A, D, B), 0.5),
        normal(rng, (A, D, B), 0.3),
    )


@pytest.mark.parametrize("train", [True, False])
def test_hierarchical_gate_matches_equations_12_to_14(hierarchical_params, train):
    x, wgp, wnp, wgs, wns = hierarchical_params
    key = jax.random.key(11)
    if train:
        key_p, key_s = jax.random.split(key)
        noise_p = f64(jax.random.normal(key_p, (T, A), jnp.float32))
        noise_s = f64(jax.random.normal(key_s, (T, A, B), jnp.float32))
    else:
        noise_p = noise_s = None
    indices, weights, importance, load = np_hierarchical(
        *map(f64, hierarchical_params), KP, KS, noise_p, noise_s
    )

    r = hierarchical_noisy_top_k(x, wgp, wnp, wgs, wns, KP, KS, key=key, train=train)

    np.testing.assert_array_equal(r.expert_indices, indices)
    np.testing.assert_allclose(r.combine_weights, weights, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(r.metrics["importance"], importance.reshape(-1), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(r.metrics["load"], load.reshape(-1), rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(r.aux_losses["importance"], np_cv_squared(importance), rtol=1e-4)
    np.testing.assert_allclose(r.aux_losses["load"], np_cv_squared(load), rtol=1e-3)
    np.testing.assert_allclose(r.combine_weights.sum(-1), 1.0, rtol=1e-5)


def test_hierarchical_gate_rejects_mismatched_group_counts(hierarchical_params):
    x, wgp, wnp, wgs, wns = hierarchical_params
    with pytest.raises(ValueError, match=r"w_gate_secondary must have shape \[a, D, b\] with a"):
        hierarchical_noisy_top_k(
            x, wgp, wnp, wgs[:2], wns[:2], KP, KS, train=False
        )
    with pytest.raises(ValueError, match="k_secondary must be in"):
        hierarchical_noisy_top_k(x, wgp, wnp, wgs, wns, KP, B + 1, train=False)
