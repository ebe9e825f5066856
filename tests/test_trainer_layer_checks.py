"""Checks the trainer relies on below it: MoEConfig refuses values no run can use, and a traced
``group_offset`` out of range gives the same result on every grouped-matmul backend."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moejax.layers.config import MoEConfig
from moejax.ops.gmm import gmm


@pytest.mark.parametrize("field, value, message", [
    ("capacity_factor", float("inf"), "MoEConfig.capacity_factor must be a finite number > 0"),
    ("shared_d_ff", -5, "MoEConfig.shared_d_ff must be None or a positive int"),
    ("load_balancing_weight", float("nan"), "MoEConfig.load_balancing_weight .* finite number"),
    ("routed_scaling_factor", -2.0, "MoEConfig.routed_scaling_factor must be a finite number > 0"),
    ("d_ff", True, "MoEConfig.d_ff must be a positive int, got True"),
    ("router_jitter", float("nan"), "MoEConfig.router_jitter must be in"),
    ("num_shared_experts", 1.5, "MoEConfig.num_shared_experts must be an int"),
])
def test_moe_config_rejects_values_no_layer_can_use(field, value, message):
    with pytest.raises(ValueError, match=message):
        MoEConfig(**{"d_model": 8, "d_ff": 16, "num_experts": 4, field: value})


@pytest.mark.parametrize("offset", [-3, 3, 100])
def test_a_traced_group_offset_out_of_range_is_clamped_alike_on_every_backend(offset):
    rng = np.random.default_rng(0)
    lhs = jnp.asarray(rng.normal(size=(12, 8)), jnp.float32)
    rhs = jnp.asarray(rng.normal(size=(2, 8, 4)), jnp.float32)  # 2 of the 4 groups held here
    sizes = jnp.asarray([3, 4, 2, 3], jnp.int32)

    def run(backend, o):
        return jax.jit(lambda o: gmm(lhs, rhs, sizes, group_offset=o, backend=backend))(
            jnp.int32(o))

    clamped = min(max(offset, 0), 2)
    # NumPy reference: rows of groups [clamped, clamped + 2) times their matrix, others zero.
    starts = np.concatenate([[0], np.cumsum(np.asarray(sizes))])
    want = np.zeros((12, 4), np.float32)
    for local in range(2):
        g = clamped + local
        want[starts[g]:starts[g + 1]] = np.asarray(lhs)[starts[g]:starts[g + 1]] @ np.asarray(
            rhs[local])
    for backend in ("cpu", "reference"):
        np.testing.assert_allclose(run(backend, offset), want, rtol=1e-5, atol=1e-5,
                                   err_msg=backend)


@pytest.mark.parametrize("router, dispatch", [
    ("mixtral", "dropless"), ("switch", "capacity"),
    ("deepseek_v3", "dropless"), ("expert_choice", "capacity"), ("hash", "dropless"),
])
def test_a_batch_without_tokens_gives_an_empty_output_and_zero_finite_aux(router, dispatch):
    from flax import nnx

    from moejax import MoE

    top1 = router in ("switch", "hash")
    config = MoEConfig(d_model=8, d_ff=8, num_experts=4, experts_per_token=1 if top1 else 2,
                       router=router, dispatch=dispatch, hash_vocab_size=16 if router == "hash" else 0,
                       load_balancing_weight=0.01, z_loss_weight=1e-3)
    layer = MoE(config, rngs=nnx.Rngs(0))
    x = jnp.zeros((2, 0, 8), jnp.float32)
    ids = jnp.zeros((2, 0), jnp.int32) if router == "hash" else None
    y, aux = layer(x, token_ids=ids)
    assert y.shape == (2, 0, 8) and y.dtype == jnp.float32
    assert float(aux.total_loss) == 0.0
    for name, value in aux.metrics.items():
        value = np.asarray(value, np.float64)
        assert np.all(np.isfinite(value)) and not np.any(value), name
    if router != "mixtral":
        return
    # Under jit and grad as in training: the gradient is zero, not NaN.
    grads = nnx.grad(lambda m: m(x, token_ids=ids)[1].total_loss)(layer)
    assert all(not np.any(np.asarray(g)) for g in jax.tree.leaves(grads))


@pytest.mark.dtype_promotion("standard")
def test_the_train_step_updates_deepseek_router_biases_under_scanned_layers():
    """scan_layers + DeepSeek-V3: the router biases (non-differentiated state) pass through the
    gradient and the scan, and the step moves them against the load."""
    import ml_collections

    from moejax import parallel
    from moejax.trainer import setup as trainer_setup
    from moejax.trainer import step as trainer_step

    config = ml_collections.ConfigDict(dict(
        seq_len=8, batch_size=2, num_train_steps=2, router_bias_update_rate=0.01,
        model=dict(d_model=16, num_layers=2, num_heads=2, d_ff=32, moe_every=1, scan_layers=True),
        moe=dict(num_experts=4, experts_per_token=2, d_ff=16, router="deepseek_v3",
                 gmm_backend="reference"),
        optimizer=dict(warmup_steps=0), mesh=dict(data=1)))
    devices = jax.devices()[:1]
    setup = trainer_setup(config, mesh=parallel.make_mesh(data=1, devices=devices))
    step = trainer_step.jit_train_step(setup, donate=False)
    tokens = jax.random.randint(jax.random.key(0), (2, 8), 3, 300)
    batch = {"inputs": tokens, "targets": tokens, "weights": jnp.ones((2, 8), jnp.float32)}
    with parallel.use_mesh(setup.mesh, setup.rules):
        state, metrics = step(setup.state, setup.rng_state, batch)
    before = [np.asarray(x) for x in jax.tree.leaves(setup.state["rest"])]
    after = [np.asarray(x) for x in jax.tree.leaves(state["rest"])]
    assert np.isfinite(float(metrics["train_loss"]))
    assert any(b.shape == (2, 4) and not np.array_equal(a, b) for a, b in zip(after, before))
