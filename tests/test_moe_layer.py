"""moejax.MoE (NNX) and moejax.linen.MoE: dispatch equivalences, drops, losses, numerics, errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import moejax
import moejax.linen
from moejax import MoEConfig

D, F, E = 8, 16, 4


def _x(shape=(2, 12, D), seed=0, dtype=jnp.float32):
    return jax.random.normal(jax.random.key(seed), shape, dtype)


def _layer(**kw):
    kw = dict(dict(d_model=D, d_ff=F, num_experts=E), **kw)
    return moejax.MoE(MoEConfig(**kw), rngs=nnx.Rngs(0))


def _with_params_of(source, **kw):
    """A layer with another config (dispatch, capacity) but exactly ``source``'s parameters."""
    target = _layer(**kw)
    nnx.update(target, nnx.state(source, nnx.Param))
    return target


def _loss_and_grads(layer, x):
    def loss_fn(model, x):
        y, aux = model(x)
        return jnp.sum(y * jnp.cos(y)) + aux.total_loss, y

    (loss, y), grads = nnx.value_and_grad(loss_fn, argnums=(0, 1), has_aux=True)(layer, x)
    return loss, y, grads


ROUTERS_BY_K = [
    ("top_k", 1), ("top_k", 2), ("top_k", 4), ("mixtral", 2), ("mixtral", 4), ("switch", 1),
    ("noisy_top_k", 2), ("deepseek_v3", 2),
]


@pytest.mark.parametrize("router, k", ROUTERS_BY_K)
def test_dropless_equals_unbounded_capacity_equals_dense(router, k):
    base = _layer(router=router, experts_per_token=k, dispatch="dropless")
    base.eval()
    if router == "noisy_top_k":  # zero-initialised gates tie every expert; give them a preference
        base.router.w_gate[...] = jax.random.normal(jax.random.key(7), (D, E))
    x = _x()
    results = []
    for dispatch, cf in (("dropless", 1.0), ("capacity", float(E)), ("dense", 1.0)):
        layer = _with_params_of(base, router=router, experts_per_token=k, dispatch=dispatch,
                                capacity_factor=cf)
        layer.eval()
        results.append(_loss_and_grads(layer, x))
    (l0, y0, g0), *others = results
    for loss, y, grads in others:
        np.testing.assert_allclose(y, y0, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(loss, l0, rtol=1e-5, atol=1e-5)
        flat0, flat = jax.tree.leaves(g0), jax.tree.leaves(grads)
        assert len(flat0) == len(flat)
        for a, b in zip(flat, flat0):
            np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("expert, activation", [("mlp", "gelu"), ("glu", "silu")])
def test_one_expert_top1_is_a_plain_ffn(expert, activation):
    layer = _layer(num_experts=1, experts_per_token=1, router="top_k", expert=expert,
                   activation=activation)
    x = np.asarray(_x((10, D)), np.float64)
    y, _ = layer(jnp.asarray(x, jnp.float32))
    w_in = np.asarray(layer.experts.w_in[...][0], np.float64)
    w_out = np.asarray(layer.experts.w_out[...][0], np.float64)
    h = x @ w_in
    if activation == "gelu":
        from scipy.special import erf
        h = 0.5 * h * (1 + erf(h / np.sqrt(2)))
    else:
        h = h / (1 + np.exp(-h))
    if expert == "glu":
        h = h * (x @ np.asarray(layer.experts.w_up[...][0], np.float64))
    np.testing.assert_allclose(y, h @ w_out, rtol=1e-5, atol=1e-5)


def test_first_come_and_token_major_drop_different_copies_when_k_is_2():
    # Two tokens, both choosing experts (0, 1); capacity 1 per expert.
    indices_TxK = jnp.asarray([[0, 1], [1, 0]], jnp.int32)
    weights_TxK = jnp.full((2, 2), 0.5, jnp.float32)
    first = moejax.ops.dispatch.capacity_dispatch(indices_TxK, weights_TxK, 2, 1, "first_come")
    token = moejax.ops.dispatch.capacity_dispatch(indices_TxK, weights_TxK, 2, 1, "token_major")
    # first_come: both first choices fit, both second choices drop.
    np.testing.assert_array_equal(first.kept_TxK, [[True, False], [True, False]])
    # token_major: token 0 takes both experts, token 1 is dropped entirely.
    np.testing.assert_array_equal(token.kept_TxK, [[True, True], [False, False]])


def _numpy_capacity_kept(indices, weights, num_experts, capacity, order):
    """First-come (choice rank, then token), token-major (token, then choice rank) or
    batch-priority slot filling, simulated in NumPy."""
    t, k = indices.shape
    tokens = list(range(t))
    if order == "token_major":
        fill = [0] * num_experts
        kept = np.zeros((t, k), bool)
        for i in tokens:
            for rank in range(k):
                e = indices[i, rank]
                if fill[e] < capacity:
                    kept[i, rank] = True
                    fill[e] += 1
        return kept
    if order == "batch_priority":
        tokens = sorted(tokens, key=lambda i: -weights[i].max())
    fill = [0] * num_experts
    kept = np.zeros((t, k), bool)
    for rank in range(k):
        for i in tokens:
            e = indices[i, rank]
            if fill[e] < capacity:
                kept[i, rank] = True
                fill[e] += 1
    return kept


@pytest.mark.parametrize("order", ["first_come", "token_major", "batch_priority"])
@pytest.mark.parametrize("k", [1, 2])
def test_capacity_drops_exactly_the_simulated_copies(order, k):
    cf = 0.5
    layer = _layer(router="top_k", experts_per_token=k, dispatch="capacity", capacity_factor=cf,
                   capacity_order=order)
    layer.router.w_router[...] = jax.random.normal(jax.random.key(3), (D, E)) * 2.0
    x = _x((24, D), seed=5)
    y, aux = layer(x)
    routing = moejax.ops.routing.top_k(x @ layer.router.w_router[...], k)
    indices, weights = np.asarray(routing.expert_indices), np.asarray(routing.combine_weights)
    capacity = int(np.ceil(cf * 24 * k / E))
    kept = _numpy_capacity_kept(indices, weights, E, capacity, order)
    assert kept.sum() < kept.size  # the test must exercise drops
    np.testing.assert_allclose(aux.metrics["dropped_fraction"], 1 - kept.mean(), rtol=1e-6)
    dense = _with_params_of(layer, router="top_k", experts_per_token=k, dispatch="dense")
    # Reference output: each kept copy's expert output weighted by its gate, from dense experts.
    per_expert = np.stack([
        np.asarray(dense.experts.dense(x, jax.nn.one_hot(jnp.full((24,), e), E)))
        for e in range(E)
    ])
    want = np.zeros((24, D))
    for t in range(24):
        for r in range(k):
            if kept[t, r]:
                want[t] += weights[t, r] * per_expert[indices[t, r], t]
    np.testing.assert_allclose(y, want, rtol=1e-5, atol=1e-5)
    fully_dropped = ~kept.any(axis=1)
    assert np.all(np.asarray(y)[fully_dropped] == 0)


@pytest.mark.parametrize("case", ["all_to_one_expert", "k_equals_num_experts"])
def test_dropless_drops_nothing_under_adversarial_routing(case):
    k = E if case == "k_equals_num_experts" else 1
    layer = _layer(router="top_k", experts_per_token=k, dispatch="dropless")
    if case == "all_to_one_expert":
        w = np.zeros((D, E), np.float32)
        w[:, 2] = 50.0
        layer.router.w_router[...] = jnp.asarray(w)
        x = jnp.abs(_x((32, D)))  # positive inputs: every token prefers expert 2, others stay empty
    else:
        x = _x((32, D))
    y, aux = layer(x)
    if case == "all_to_one_expert":
        np.testing.assert_array_equal(aux.metrics["tokens_per_expert"], [0, 0, 32, 0])
    assert float(aux.metrics["dropped_fraction"]) == 0.0
    dense = _with_params_of(layer, router="top_k", experts_per_token=k, dispatch="dense")
    y_dense, _ = dense(x)
    np.testing.assert_allclose(y, y_dense, rtol=1e-5, atol=1e-5)
    assert np.all(np.abs(np.asarray(y)).sum(axis=1) > 0)


def test_aux_losses_are_weighted_reach_total_loss_and_train_the_router():
    layer = _layer(router="top_k", experts_per_token=2, load_balancing_weight=0.5,
                   z_loss_weight=0.25)
    x = _x()
    _, aux = layer(x)
    routing = moejax.ops.routing.top_k(x.reshape(-1, D) @ layer.router.w_router[...], 2)
    np.testing.assert_allclose(aux.losses["load_balancing"],
                               0.5 * routing.aux_losses["load_balancing"], rtol=1e-6)
    np.testing.assert_allclose(aux.losses["z_loss"], 0.25 * routing.aux_losses["z_loss"], rtol=1e-6)
    np.testing.assert_allclose(aux.total_loss, aux.losses["load_balancing"] + aux.losses["z_loss"],
                               rtol=1e-6)

    def aux_only(model):
        return model(x)[1].total_loss

    grads = nnx.grad(aux_only)(layer)
    g_router = np.asarray(grads.router.w_router[...])
    assert np.all(np.isfinite(g_router)) and np.abs(g_router).sum() > 0


def test_noisy_top_k_losses_give_gate_and_noise_gradients_in_training():
    layer = _layer(router="noisy_top_k", experts_per_token=2)
    layer.train()
    x = _x()

    def aux_only(model):
        return model(x)[1].total_loss

    grads = nnx.grad(aux_only)(layer)
    for name in ("w_gate", "w_noise"):
        g = np.asarray(getattr(grads.router, name)[...])
        assert np.all(np.isfinite(g)) and np.abs(g).sum() > 0, name


def test_noise_only_in_training():
    layer = _layer(router="noisy_top_k", experts_per_token=2)
    layer.router.w_gate[...] = jax.random.normal(jax.random.key(1), (D, E))
    layer.router.w_noise[...] = jax.random.normal(jax.random.key(2), (D, E))
    x = _x()
    layer.eval()
    a, _ = layer(x)
    b, _ = layer(x)
    np.testing.assert_array_equal(a, b)
    layer.train()
    c, _ = layer(x)
    d, _ = layer(x)
    assert not np.allclose(c, d)


def test_linen_equals_nnx_for_the_same_parameters():
    config = MoEConfig(d_model=D, d_ff=F, num_experts=E, experts_per_token=2, expert="glu",
                       num_shared_experts=1)
    x = _x()
    module = moejax.linen.MoE(config)
    variables = module.init(jax.random.key(0), x)
    y_linen, aux_linen = module.apply(variables, x)
    layer = moejax.MoE(config, rngs=nnx.Rngs(1))
    params = jax.tree.map(
        lambda v: v.value if hasattr(v, "value") else v, variables["params"]["layer"],
        is_leaf=lambda v: hasattr(v, "value"),
    )
    nnx.update(layer, params)
    y_nnx, aux_nnx = layer(x)
    np.testing.assert_allclose(y_linen, y_nnx, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(aux_linen.total_loss, aux_nnx.total_loss, rtol=1e-6)


def test_linen_router_noise_comes_from_the_router_stream():
    config = MoEConfig(d_model=D, d_ff=F, num_experts=E, router="noisy_top_k")
    module = moejax.linen.MoE(config)
    x = _x()
    variables = module.init({"params": jax.random.key(0), "router": jax.random.key(1)}, x)
    a, _ = module.apply(variables, x, rngs={"router": jax.random.key(2)})
    b, _ = module.apply(variables, x, rngs={"router": jax.random.key(2)})
    np.testing.assert_array_equal(a, b)
    e1, _ = module.apply(variables, x, deterministic=True)
    e2, _ = module.apply(variables, x, deterministic=True)
    np.testing.assert_array_equal(e1, e2)


def test_bf16_is_close_to_f32():
    layer32 = _layer(router="mixtral", experts_per_token=2)
    layer16 = _with_params_of(layer32, router="mixtral", experts_per_token=2, dtype=jnp.bfloat16)
    x = _x()
    y32, _ = layer32(x)
    y16, _ = layer16(x)
    assert y16.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(y16, np.float32), y32, rtol=5e-2, atol=5e-2)


def test_works_under_nnx_jit_for_token_and_batch_shapes():
    layer = _layer()

    @nnx.jit
    def forward(model, x):
        return model(x)

    x = _x((3, 5, D))
    y_batched, _ = forward(layer, x)
    y_flat, _ = forward(layer, x.reshape(15, D))
    assert y_batched.shape == (3, 5, D)
    np.testing.assert_allclose(y_batched.reshape(15, D), y_flat, rtol=1e-5, atol=1e-6)


def test_shared_experts_add_an_always_on_ffn():
    layer = _layer(num_shared_experts=2, shared_d_ff=6)
    assert layer.shared.w_in[...].shape == (D, 12)
    x = _x()
    y, _ = layer(x)
    routed_only = _layer()
    nnx.update(routed_only.router, nnx.state(layer.router))
    nnx.update(routed_only.experts, nnx.state(layer.experts))
    y_routed, _ = routed_only(x)
    np.testing.assert_allclose(y - y_routed, layer.shared(x.reshape(-1, D)).reshape(x.shape),
                               rtol=1e-5, atol=1e-5)


def test_remat_gives_the_same_gradients():
    plain = _layer()
    remat = _with_params_of(plain, remat=True)
    x = _x()
    for a, b in zip(jax.tree.leaves(_loss_and_grads(plain, x)),
                    jax.tree.leaves(_loss_and_grads(remat, x))):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)


def test_deepseek_bias_update_moves_load_toward_balance():
    layer = _layer(router="deepseek_v3", experts_per_token=1)
    w = np.asarray(jax.random.normal(jax.random.key(4), (D, E))) * 0.5
    w[0, 0] = 3.0  # feature 0 is constant 1 below: expert 0 is strongly preferred
    layer.router.w_router[...] = jnp.asarray(w)
    x = _x((256, D)).at[:, 0].set(1.0)
    forward = nnx.jit(lambda model, x: model(x)[1].metrics)
    first_cv = float(forward(layer, x)["load_cv"])
    for _ in range(60):
        metrics = forward(layer, x)
        layer.update_router_bias(metrics["tokens_per_expert"], rate=0.02)
    final_cv = float(forward(layer, x)["load_cv"])
    assert first_cv > 0.8
    assert final_cv < 0.3 * first_cv


def test_hash_router_needs_token_ids():
    layer = _layer(router="hash", experts_per_token=1, hash_vocab_size=100)
    x = _x()
    with pytest.raises(ValueError, match="token_ids"):
        layer(x)
    ids = jax.random.randint(jax.random.key(0), x.shape[:-1], 0, 100)
    y, aux = layer(x, token_ids=ids)
    table = np.asarray(layer.router.table[...])
    counts = np.bincount(table[np.asarray(ids).reshape(-1)], minlength=E)
    np.testing.assert_array_equal(aux.metrics["tokens_per_expert"], counts)


@pytest.mark.parametrize(
    "kw, match",
    [
        (dict(experts_per_token=5), "experts_per_token = 5 exceeds num_experts = 4"),
        (dict(dispatch="capacity", capacity_factor=0.0), "capacity_factor must be a finite number > 0"),
        (dict(dispatch="sparse"), "dispatch must be one of"),
        (dict(router="nope"), "router must be one of"),
        (dict(expert="moe"), "expert must be one of"),
        (dict(activation="tanhh"), "activation must be one of"),
        (dict(router="expert_choice", dispatch="dropless"), "does not fit dispatch"),
        (dict(router="softmax", dispatch="dense", experts_per_token=2), "must equal num_experts"),
        (dict(d_model=0), "d_model must be a positive int"),
    ],
)
def test_bad_config_names_the_field(kw, match):
    with pytest.raises(ValueError, match=match):
        MoEConfig(**dict(dict(d_model=D, d_ff=F, num_experts=E), **kw))


def test_wrong_feature_size_names_d_model():
    with pytest.raises(ValueError, match=r"\[\.\.\., 8\]"):
        _layer()(jnp.zeros((4, 7)))
