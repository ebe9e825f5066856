"""Expert-choice routing (Zhou et al. 2022) against NumPy: each expert takes exactly its top-C tokens."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moejax.ops import routing

expert_choice = jax.jit(routing.expert_choice, static_argnames=("capacity",))

T, E, C = 40, 8, 10


def np_softmax(v):
    z = np.exp(v - v.max(axis=-1, keepdims=True))
    return z / z.sum(axis=-1, keepdims=True)


@pytest.fixture
def logits():
    return jnp.asarray(2.0 * np.random.default_rng(0).standard_normal((T, E)), jnp.float32)


def test_each_expert_takes_its_top_c_tokens_by_softmax_score(logits):
    scores = np_softmax(np.float64(logits))
    tokens = np.argsort(-scores.T, axis=1, kind="stable")[:, :C]
    gates = np.take_along_axis(scores.T, tokens, axis=1)

    r = expert_choice(logits, C)

    assert isinstance(r, routing.ExpertChoiceRouting)
    assert r.token_indices.dtype == jnp.int32 and r.token_indices.shape == (E, C)
    np.testing.assert_array_equal(r.token_indices, tokens)
    np.testing.assert_allclose(r.combine_weights, gates, rtol=1e-5)


def test_every_expert_takes_exactly_capacity_distinct_tokens(logits):
    r = expert_choice(logits, C)
    for row in np.asarray(r.token_indices):
        assert len(set(row.tolist())) == C
    np.testing.assert_array_equal(r.metrics["tokens_per_expert"], np.full(E, C))
    assert float(r.metrics["load_cv"]) == 0.0


def test_unrouted_fraction_counts_tokens_no_expert_chose(logits):
    r = expert_choice(logits, C)
    chosen = set(np.asarray(r.token_indices).ravel().tolist())
    np.testing.assert_allclose(r.metrics["unrouted_fraction"], 1.0 - len(chosen) / T)


def test_router_entropy_is_that_of_the_per_token_softmax(logits):
    scores = np_softmax(np.float64(logits))
    entropy = -np.sum(scores * np.log(scores), axis=1).mean()
    np.testing.assert_allclose(expert_choice(logits, C).metrics["router_entropy"], entropy, rtol=1e-5)


def test_capacity_from_factor_is_ceil_of_factor_times_tokens_per_expert():
    assert routing.expert_choice_capacity(40, 8, 2.0) == 10
    assert routing.expert_choice_capacity(41, 8, 1.0) == 6
    assert routing.expert_choice_capacity(10, 2, 8.0) == 10


@pytest.mark.parametrize("capacity", [0, -3, T + 1])
def test_rejects_capacity_out_of_range(logits, capacity):
    with pytest.raises(ValueError, match=r"capacity must be in \[1, 40\]"):
        routing.expert_choice(logits, capacity)


def test_capacity_factor_must_be_positive():
    with pytest.raises(ValueError, match="capacity_factor must be > 0"):
        routing.expert_choice_capacity(40, 8, 0.0)
