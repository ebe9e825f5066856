"""Token (padding) mask of the MoE layer: a masked token is routed nowhere, outputs 0 and counts in no
loss or metric, so the layer on (x, mask) behaves as the layer on the real tokens alone."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import moejax
import moejax.linen
from moejax import MoEConfig, parallel
from moejax.models.transformer import Transformer, TransformerConfig
from moejax.ops import routing as R

D, F, E = 8, 16, 4
VOCAB = 32
# Real tokens interleaved with masked ones, masked first: no position is special.
MASK_T = np.array([0, 1, 1, 0, 1, 0, 0, 1, 1, 1, 0, 1, 0, 0, 1, 1], bool)


def _layer(**kw):
    kw = dict(dict(d_model=D, d_ff=F, num_experts=E, num_shared_experts=1, expert="glu",
                   activation="silu", gmm_backend="reference"), **kw)
    layer = moejax.MoE(MoEConfig(**kw), rngs=nnx.Rngs(0))
    layer.eval()
    if kw.get("router") == "noisy_top_k":  # zero-initialised gates tie every expert
        layer.router.w_gate[...] = jax.random.normal(jax.random.key(7), (D, E))
    return layer


def _x(num_tokens=MASK_T.size, seed=0):
    return jax.random.normal(jax.random.key(seed), (num_tokens, D), jnp.float32)


def _ids(num_tokens=MASK_T.size):
    return jnp.asarray(np.arange(num_tokens) * 5 % VOCAB, jnp.int32)


@nnx.jit
def _forward(layer, x, call_kw):
    return layer(x, **call_kw)


@nnx.jit
def _loss_and_grads(layer, x, call_kw):
    def loss_fn(model, x):
        y, aux = model(x, **call_kw)
        return jnp.sum(y * jnp.cos(y)) + aux.total_loss, (y, aux)

    (loss, (y, aux)), grads = nnx.value_and_grad(loss_fn, has_aux=True)(layer, x)
    return loss, y, aux, grads


CASES = {
    "top_k1": dict(router="top_k", experts_per_token=1),
    "top_k2": dict(router="top_k", experts_per_token=2),
    "mixtral": dict(router="mixtral", experts_per_token=2),
    "switch": dict(router="switch", experts_per_token=1),
    "noisy_top_k": dict(router="noisy_top_k", experts_per_token=2),
    "deepseek_v3": dict(router="deepseek_v3", experts_per_token=2, routed_scaling_factor=2.5),
    "hash": dict(router="hash", experts_per_token=1, hash_vocab_size=VOCAB),
    "gshard_all": dict(router="gshard", experts_per_token=2, gshard_policy="all"),
    "expert_choice": dict(router="expert_choice", dispatch="capacity", capacity_factor=2.0),
    "top_k2_dense": dict(router="top_k", experts_per_token=2, dispatch="dense"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_masked_layer_equals_the_layer_on_the_real_tokens_alone(case):
    layer = _layer(**CASES[case])
    x, ids, real = _x(), _ids(), jnp.asarray(MASK_T)
    hash_kw = lambda t: dict(token_ids=t) if case == "hash" else {}  # noqa: E731
    loss, y, aux, grads = _loss_and_grads(layer, x, dict(token_mask=real, **hash_kw(ids)))
    ref_loss, ref_y, ref_aux, ref_grads = _loss_and_grads(layer, x[MASK_T], hash_kw(ids[MASK_T]))

    np.testing.assert_allclose(y[MASK_T], ref_y, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(y[~MASK_T], 0.0)
    assert aux.losses.keys() == ref_aux.losses.keys()
    for name in aux.losses:
        np.testing.assert_allclose(aux.losses[name], ref_aux.losses[name], rtol=1e-5, atol=1e-7,
                                   err_msg=name)
    assert aux.metrics.keys() == ref_aux.metrics.keys()
    for name in aux.metrics:
        np.testing.assert_allclose(aux.metrics[name], ref_aux.metrics[name], rtol=1e-5,
                                   atol=1e-6, err_msg=name)
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-5)
    for path, g in nnx.to_flat_state(grads):
        ref_g = dict(nnx.to_flat_state(ref_grads))[path]
        np.testing.assert_allclose(g.get_value(), ref_g.get_value(), rtol=1e-4, atol=1e-6,
                                   err_msg=str(path))


@pytest.mark.parametrize("case", ["deepseek_v3", "expert_choice", "noisy_top_k"])
def test_an_all_true_mask_is_bit_identical_to_no_mask(case):
    layer = _layer(**CASES[case])
    layer.train()
    x = _x().reshape(2, 8, D)
    y0, aux0 = layer(x, rngs=jax.random.key(3))
    y1, aux1 = layer(x, token_mask=jnp.ones((2, 8), bool), rngs=jax.random.key(3))
    np.testing.assert_array_equal(y1, y0)
    for name in aux0.losses:
        np.testing.assert_array_equal(aux1.losses[name], aux0.losses[name], err_msg=name)
    for name in aux0.metrics:
        np.testing.assert_array_equal(aux1.metrics[name], aux0.metrics[name], err_msg=name)


def test_deepseek_sequence_balance_averages_the_real_tokens_of_each_sequence():
    layer = _layer(**CASES["deepseek_v3"])
    lengths = (6, 2, 0, 4)
    x = _x(4 * 6).reshape(4, 6, D)
    mask = np.arange(6)[None, :] < np.array(lengths)[:, None]
    _, aux = _forward(layer, x, dict(token_mask=jnp.asarray(mask)))
    per_sequence = [_forward(layer, x[b:b + 1, :n], {})[1] for b, n in enumerate(lengths) if n]
    expected = np.mean([a.losses["sequence_balance"] for a in per_sequence])
    np.testing.assert_allclose(aux.losses["sequence_balance"], expected, rtol=1e-5)
    expected_load = np.sum([a.metrics["tokens_per_expert"] for a in per_sequence], axis=0)
    np.testing.assert_array_equal(aux.metrics["tokens_per_expert"], expected_load)


def test_deepseek_bias_update_moves_with_the_real_tokens_load_only():
    layer = _layer(**CASES["deepseek_v3"])
    x = _x()
    _, aux = layer(x, token_mask=jnp.asarray(MASK_T))
    _, ref_aux = layer(x[MASK_T])
    layer.update_router_bias(aux.metrics["tokens_per_expert"], 0.1)
    expected = R.update_bias(jnp.zeros((E,)), ref_aux.metrics["tokens_per_expert"], 0.1)
    np.testing.assert_array_equal(layer.router.bias[...], expected)


def test_masked_tokens_take_no_capacity_slot():
    # Capacity exactly fits the busiest expert's real tokens; every masked token is a copy of a real
    # token routed to that expert and comes first, so unmasked they would take all of its slots.
    probe = _layer(router="top_k", experts_per_token=1, dispatch="dropless")
    x = np.array(_x())
    w_router = np.asarray(probe.router.w_router[...])
    experts_T = np.argmax(x @ w_router, axis=-1)
    loads_E = np.bincount(experts_T[MASK_T], minlength=E)
    busiest = int(np.argmax(loads_E))
    x[~MASK_T] = x[MASK_T][experts_T[MASK_T] == busiest][0]
    # C = ceil(capacity_factor * T * k / E) = busiest expert's real load.
    capacity_factor = loads_E[busiest] * E / MASK_T.size
    layer = _layer(router="top_k", experts_per_token=1, dispatch="capacity",
                   capacity_factor=float(capacity_factor))
    x = jnp.asarray(x)

    y, aux = layer(x, token_mask=jnp.asarray(MASK_T))
    ref_y, _ = probe(x[MASK_T])
    assert float(aux.metrics["dropped_fraction"]) == 0.0
    np.testing.assert_allclose(y[MASK_T], ref_y, rtol=1e-5, atol=1e-6)
    _, unmasked_aux = layer(x)
    assert float(unmasked_aux.metrics["dropped_fraction"]) > 0.0


def test_expert_choice_never_picks_a_masked_token_and_leaves_unfillable_slots_empty():
    logits = jax.random.normal(jax.random.key(1), (6, 3))
    mask = jnp.asarray([True, False, False, True, False, False])
    routing = R.expert_choice(logits, 4, token_mask=mask)
    weights = np.asarray(routing.combine_weights)
    tokens = np.asarray(routing.token_indices)
    assert np.all(np.asarray(mask)[tokens[weights != 0]])
    np.testing.assert_array_equal(np.sum(weights != 0, axis=1), [2, 2, 2])
    np.testing.assert_array_equal(routing.metrics["tokens_per_expert"], [2.0, 2.0, 2.0])
    assert float(routing.metrics["unrouted_fraction"]) == 0.0


@pytest.mark.parametrize("router", ["top_k", "gshard", "deepseek_v3"])
def test_every_masked_token_has_zero_weight_and_no_load(router):
    logits = jax.random.normal(jax.random.key(2), (10, E))
    mask = jnp.arange(10) < 3
    fn = {"top_k": lambda **kw: R.top_k(logits, 2, **kw),
          "gshard": lambda **kw: R.gshard(logits, policy="all", **kw),
          "deepseek_v3": lambda **kw: R.deepseek_v3(logits, 2, **kw)}[router]
    routing = fn(token_mask=mask)
    np.testing.assert_array_equal(routing.combine_weights[3:], 0.0)
    assert float(jnp.sum(routing.metrics["tokens_per_expert"])) == 3 * 2


def test_a_fully_masked_batch_gives_zero_output_and_finite_losses():
    layer = _layer(**CASES["mixtral"])
    y, aux = layer(_x(), token_mask=jnp.zeros((MASK_T.size,), bool))
    np.testing.assert_array_equal(y, 0.0)
    for value in (*aux.losses.values(), *aux.metrics.values()):
        assert np.all(np.isfinite(value))
    np.testing.assert_array_equal(aux.metrics["tokens_per_expert"], 0.0)


def test_linen_layer_takes_the_token_mask():
    config = MoEConfig(d_model=D, d_ff=F, num_experts=E, router="mixtral", gmm_backend="reference")
    module = moejax.linen.MoE(config)
    x, mask = _x(), jnp.asarray(MASK_T)
    variables = module.init({"params": jax.random.key(0)}, x, token_mask=mask, deterministic=True)
    y, aux = module.apply(variables, x, token_mask=mask, deterministic=True)
    ref_y, ref_aux = module.apply(variables, x[MASK_T], deterministic=True)
    np.testing.assert_allclose(y[MASK_T], ref_y, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(y[~MASK_T], 0.0)
    np.testing.assert_allclose(aux.total_loss, ref_aux.total_loss, rtol=1e-5)


# --------------------------------------------------------------------------- under a mesh


FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}


def _mesh_step(model, x, mask):
    graphdef, state = nnx.split(model)

    def step(state, x, mask):
        y, aux = nnx.merge(graphdef, state)(x, token_mask=mask)
        return y, aux.losses, aux.metrics

    return jax.jit(step).lower(state, x, mask).compile(FAST_COMPILE)(state, x, mask)


def test_masked_dropless_layer_under_data2_expert4_equals_the_single_device_masked_layer():
    reference = _layer(router="mixtral", experts_per_token=2, dispatch="dropless")
    x = np.asarray(_x(8 * 4, seed=4)).reshape(8, 4, D)
    mask = np.arange(4)[None, :] < np.array([4, 1, 0, 3, 2, 4, 0, 1])[:, None]
    ref_y, ref_losses, ref_metrics = _mesh_step(reference, jnp.asarray(x), jnp.asarray(mask))
    mesh = parallel.make_mesh(data=2, expert=4)
    model = parallel.create_sharded(lambda: moejax.MoE(reference.config, rngs=nnx.Rngs(0)), mesh)
    model.eval()
    placed = jax.tree.map(lambda value, target: jax.device_put(value, target.sharding),
                          nnx.state(reference, nnx.Param), nnx.state(model, nnx.Param))
    nnx.update(model, placed)
    with parallel.use_mesh(mesh):
        batch = parallel.shard_batch({"x": x, "mask": mask}, mesh)
        y, losses, metrics = _mesh_step(model, batch["x"], batch["mask"])
    np.testing.assert_allclose(y, ref_y, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(np.asarray(y)[~mask], 0.0)
    for name in ref_losses:
        np.testing.assert_allclose(losses[name], ref_losses[name], rtol=1e-5, err_msg=name)
    for name in ref_metrics:
        np.testing.assert_allclose(metrics[name], ref_metrics[name], rtol=1e-5, atol=1e-6,
                                   err_msg=name)


def test_masked_tokens_take_no_capacity_slot_on_any_device_of_the_mesh():
    # One identical token everywhere, so every copy goes to the same expert; each device holds one
    # row of 4 tokens, 3 masked ones first, and has capacity C = ceil(1.0 * 4 / 4) = 1.
    layer = _layer(router="top_k", experts_per_token=1, dispatch="capacity", capacity_factor=1.0,
                   num_shared_experts=0)
    x = np.broadcast_to(np.asarray(_x(1)), (8, 4, D)).copy()
    mask = np.broadcast_to(np.arange(4) == 3, (8, 4)).copy()
    mesh = parallel.make_mesh(data=2, expert=4)
    model = parallel.create_sharded(lambda: moejax.MoE(layer.config, rngs=nnx.Rngs(0)), mesh)
    model.eval()
    with parallel.use_mesh(mesh):
        batch = parallel.shard_batch({"x": x, "mask": mask}, mesh)
        y, _, metrics = _mesh_step(model, batch["x"], batch["mask"])
        _, _, unmasked_metrics = _mesh_step(model, batch["x"], jnp.ones((8, 4), bool))
    assert float(metrics["dropped_fraction"]) == 0.0
    assert float(unmasked_metrics["dropped_fraction"]) == 0.75
    ref_y, _ = layer(jnp.asarray(x[:1, 3]))
    np.testing.assert_allclose(np.asarray(y)[:, 3], np.broadcast_to(ref_y, (8, D)), rtol=1e-5,
                               atol=1e-6)


# --------------------------------------------------------------------------- transformer


@functools.cache
def _lm():
    moe = MoEConfig(d_model=16, d_ff=16, num_experts=E, router="expert_choice", dispatch="capacity",
                    capacity_factor=2.0)
    config = TransformerConfig(vocab_size=VOCAB, d_model=16, num_layers=2, num_heads=2, d_ff=16,
                               max_len=8, moe=moe)
    return Transformer(config, rngs=nnx.Rngs(0))


def test_lm_logits_and_moe_losses_at_real_positions_ignore_the_padding_content():
    # Expert choice is not causal: without the mask, the padding would change whom experts pick.
    model = _lm()
    lengths = np.array([5, 3])
    mask = np.arange(8)[None, :] < lengths[:, None]
    rng = np.random.default_rng(0)
    real = rng.integers(3, VOCAB, (2, 8))
    padded_a = np.where(mask, real, 0)
    padded_b = np.where(mask, real, rng.integers(3, VOCAB, (2, 8)))
    logits_a, aux_a = model(jnp.asarray(padded_a), token_mask=jnp.asarray(mask))
    logits_b, aux_b = model(jnp.asarray(padded_b), token_mask=jnp.asarray(mask))
    np.testing.assert_allclose(np.asarray(logits_a)[mask], np.asarray(logits_b)[mask],
                               rtol=1e-5, atol=1e-5)
    for name in aux_a.losses:
        np.testing.assert_allclose(aux_a.losses[name], aux_b.losses[name], rtol=1e-5,
                                   err_msg=name)
    np.testing.assert_array_equal(aux_a.metrics["tokens_per_expert"],
                                  aux_b.metrics["tokens_per_expert"])
    assert float(jnp.sum(aux_a.metrics["tokens_per_expert"][0])) == 2 * mask.sum()


# --------------------------------------------------------------------------- errors


@pytest.mark.parametrize("bad", [jnp.ones((16,), bool), jnp.ones((2, 8), jnp.int32),
                                 jnp.ones((2, 4), bool)])
def test_layer_rejects_a_token_mask_of_the_wrong_shape_or_dtype(bad):
    layer = _layer(**CASES["mixtral"])
    with pytest.raises(ValueError, match=r"token_mask .*\(2, 8\)"):
        layer(_x().reshape(2, 8, D), token_mask=bad)


def test_router_rejects_a_token_mask_of_the_wrong_shape():
    with pytest.raises(ValueError, match=r"token_mask .*\[T\] = \(5,\)"):
        R.mixtral(jnp.zeros((5, E)), token_mask=jnp.ones((4,), bool))


def test_transformer_rejects_a_token_mask_of_the_wrong_shape():
    with pytest.raises(ValueError, match=r"token_mask .*\(2, 8\)"):
        _lm()(jnp.zeros((2, 8), jnp.int32), token_mask=jnp.ones((2, 7), bool))
