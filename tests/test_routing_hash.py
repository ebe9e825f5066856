"""Hash-layer routing (Roller et al. 2021): a fixed, balanced, random token-id -> expert table."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from moejax.ops import routing

hash_route = jax.jit(routing.hash_route, static_argnames=("k", "num_experts"))


@given(vocab_size=st.integers(1, 300), num_experts=st.integers(1, 17), seed=st.integers(0, 2**31))
def test_hash_table_gives_every_expert_floor_or_ceil_of_vocab_over_experts(vocab_size, num_experts, seed):
    table = np.asarray(routing.make_hash_table(vocab_size, num_experts, seed))
    assert table.shape == (vocab_size,) and table.dtype == np.int32
    assert table.min() >= 0 and table.max() < num_experts
    counts = np.bincount(table, minlength=num_experts)
    assert set(counts.tolist()) <= {vocab_size // num_experts, -(-vocab_size // num_experts)}


def test_hash_table_is_fixed_by_its_seed_and_random_across_seeds():
    a = np.asarray(routing.make_hash_table(1000, 8, 0))
    np.testing.assert_array_equal(a, routing.make_hash_table(1000, 8, 0))
    b = np.asarray(routing.make_hash_table(1000, 8, 1))
    assert np.mean(a == b) < 0.3
    # Not a structured assignment such as id mod E.
    assert np.mean(a == np.arange(1000) % 8) < 0.3


def test_hash_route_sends_each_token_to_its_table_expert_with_gate_one():
    table = routing.make_hash_table(50, 4, 3)
    token_ids = jnp.array([0, 7, 7, 49, 12, 3], jnp.int32)
    r = hash_route(token_ids, table, num_experts=4)
    expected = np.asarray(table)[np.asarray(token_ids)]
    np.testing.assert_array_equal(r.expert_indices, expected[:, None])
    np.testing.assert_array_equal(r.combine_weights, np.ones((6, 1)))
    np.testing.assert_array_equal(r.metrics["tokens_per_expert"], np.bincount(expected, minlength=4))
    assert float(r.metrics["router_entropy"]) == 0.0
    assert r.aux_losses == {}


def test_hash_route_with_k_takes_the_next_experts_cyclically_with_gate_one_over_k():
    table = routing.make_hash_table(50, 5, 4)
    token_ids = jnp.arange(50, dtype=jnp.int32)
    r = hash_route(token_ids, table, 3, num_experts=5)
    first = np.asarray(table)
    np.testing.assert_array_equal(r.expert_indices, (first[:, None] + np.arange(3)[None, :]) % 5)
    np.testing.assert_allclose(r.combine_weights, np.full((50, 3), 1 / 3))
    np.testing.assert_array_equal(r.metrics["tokens_per_expert"], np.full(5, 30))


@pytest.mark.parametrize(
    ("token_ids", "table", "k", "match"),
    [
        (np.zeros((2, 3), np.int32), np.zeros(10, np.int32), 1, r"token_ids must be .* of shape \[T\]"),
        (np.zeros(3, np.float32), np.zeros(10, np.int32), 1, "token_ids must be an integer array"),
        (np.zeros(3, np.int32), np.zeros(10, np.float32), 1, r"table must be an integer array .*\[V\]"),
        (np.zeros(3, np.int32), np.zeros(10, np.int32), 5, r"k must be in \[1, 4\]"),
    ],
)
def test_hash_route_rejects_bad_input(token_ids, table, k, match):
    with pytest.raises(ValueError, match=match):
        routing.hash_route(jnp.asarray(token_ids), jnp.asarray(table), k, num_experts=4)


def test_make_hash_table_rejects_non_positive_sizes():
    with pytest.raises(ValueError, match="vocab_size must be >= 1"):
        routing.make_hash_table(0, 4, 0)
    with pytest.raises(ValueError, match="num_experts must be >= 1"):
        routing.make_hash_table(10, 0, 0)
