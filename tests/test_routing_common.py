"""What all routers share: the registry, the Routing pytree, routing_metrics, CV, and float32 router math."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moejax.ops import routing

T, E = 16, 8


def test_registry_has_the_documented_router_names():
    assert set(routing.ROUTERS) == {
        "softmax", "noisy_top_k", "hierarchical_noisy_top_k", "top_k", "switch", "gshard", "mixtral",
        "expert_choice", "deepseek_v3", "hash",
    }
    assert routing.get_router("switch") is routing.switch
    assert routing.get_router("hash") is routing.hash_route


def test_unknown_router_name_lists_the_known_ones():
    known = r"router must be one of \[.*'deepseek_v3'.*'switch'.*\], got 'swich'"
    with pytest.raises(ValueError, match=known):
        routing.get_router("swich")


def test_routing_metrics_match_numpy():
    rng = np.random.default_rng(0)
    indices = rng.integers(0, E, (T, 2))
    probs = rng.dirichlet(np.ones(E), T)
    probs[0] = np.eye(E)[3]  # 0 log 0 counts as 0
    counts = np.bincount(indices.ravel(), minlength=E).astype(np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        entropy = -np.nansum(probs * np.log(probs), axis=1).mean()

    @jax.jit
    def metrics(indices, probs):
        return routing.routing_metrics(routing.count_tokens_per_expert(indices, E), probs)

    m = metrics(jnp.asarray(indices), jnp.float32(probs))

    np.testing.assert_array_equal(m["tokens_per_expert"], counts)
    np.testing.assert_allclose(m["max_load"], counts.max())
    np.testing.assert_allclose(m["mean_load"], counts.mean())
    np.testing.assert_allclose(m["load_cv"], counts.std(ddof=0) / counts.mean(), rtol=1e-5)
    np.testing.assert_allclose(m["router_entropy"], entropy, rtol=1e-5)


def test_count_tokens_per_expert_skips_unassigned_slots():
    indices = jnp.array([[0, 1], [0, 2], [3, 1]])
    assigned = jnp.array([[True, False], [True, True], [True, False]])
    np.testing.assert_array_equal(
        routing.count_tokens_per_expert(indices, 4, assigned=assigned), [2.0, 0.0, 1.0, 1.0]
    )


def test_cv_squared_uses_population_variance_and_is_zero_for_zero_mean():
    v = np.array([1.0, 2.0, 3.0, 6.0])
    np.testing.assert_allclose(routing.cv_squared(jnp.float32(v)), v.var() / v.mean() ** 2, rtol=1e-6)
    assert float(routing.cv_squared(jnp.zeros(4))) == 0.0


def test_routing_is_a_pytree_that_crosses_jit():
    logits = jnp.float32(np.random.default_rng(1).standard_normal((T, E)))
    r = jax.jit(routing.top_k, static_argnames="k")(logits, 2)
    assert isinstance(r, routing.Routing)
    assert len(jax.tree.leaves(r)) == 2 + len(r.aux_losses) + len(r.metrics)
    assert isinstance(jax.tree.map(lambda a: a, r), routing.Routing)
    assert set(r.aux_losses) == {"load_balancing", "z_loss"}
    assert {"tokens_per_expert", "max_load", "mean_load", "load_cv", "router_entropy"} <= set(r.metrics)


# (router, static keyword arguments); shapes and arguments as in the per-router test files.
LOGITS_ROUTERS = {
    "softmax": (routing.softmax, {}),
    "top_k": (routing.top_k, {"k": 3, "renormalize": True, "norm_p": 2.0}),
    "switch": (routing.switch, {}),
    "gshard": (routing.gshard, {"policy": "all"}),
    "mixtral": (routing.mixtral, {}),
    "expert_choice": (routing.expert_choice, {"capacity": 4}),
    "deepseek_v3": (routing.deepseek_v3, {"k": 2}),
}


@pytest.mark.parametrize("name", sorted(LOGITS_ROUTERS))
def test_bf16_logits_are_routed_in_float32(name):
    fn, kwargs = LOGITS_ROUTERS[name]
    router = jax.jit(fn, static_argnames=tuple(kwargs))
    logits_bf16 = jnp.asarray(np.random.default_rng(2).standard_normal((32, E)), jnp.bfloat16)
    r = router(logits_bf16, **kwargs)
    assert r.combine_weights.dtype == jnp.float32
    for value in (*r.aux_losses.values(), *r.metrics.values()):
        assert value.dtype == jnp.float32
    # Identical to routing the same values given in float32: nothing is computed in bf16.
    jax.tree.map(np.testing.assert_array_equal, r, router(logits_bf16.astype(jnp.float32), **kwargs))
