"""Every gmm backend under every expert-parallel mesh: the sharded layer equals one device.

The matrix: backend {cpu, reference, pallas_tpu, pallas_gpu} (Pallas in interpret mode) x mesh
{expert=4, data=2 x expert=2, fsdp=2 x expert=2, expert=2 x tensor=2} x dispatch {dropless,
capacity}. The oracle is the unsharded layer on one device with the ``reference`` backend
(``lax.ragged_dot``), so a backend that is wrong on one device fails here too. Also: the compiled
(not interpreted) Pallas kernels inside the expert-parallel ``shard_map`` with ``check_vma=True``,
lowered for TPU and CUDA and compiled by the real TPU compiler for a v5e 2x2 slice.
"""

import functools
import importlib.util

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import moejax
from moejax import parallel
from moejax.ops import gmm

# Tiny shapes: skipping XLA's expensive LLVM passes cuts compile time and changes no result.
FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}
D, F, E, K = 16, 32, 8, 2
BACKENDS = ("cpu", "reference", "pallas_tpu", "pallas_gpu")
MESHES = {
    "expert4": dict(expert=4),
    "data2_expert2": dict(data=2, expert=2),
    "fsdp2_expert2": dict(fsdp=2, expert=2),
    "expert2_tensor2": dict(expert=2, tensor=2),
}


def _config(backend, dispatch, **kw):
    # capacity_factor E: nothing drops, so per-device capacity equals the single-device layer.
    return moejax.MoEConfig(
        d_model=D, d_ff=F, num_experts=E, experts_per_token=K, router="mixtral", expert="glu",
        activation="silu", dispatch=dispatch, capacity_factor=float(E), gmm_backend=backend,
        **kw)


def _x():
    return jax.random.normal(jax.random.key(1), (4, 8, D), jnp.float32)


def _step(graphdef, state, x):
    def loss(state, x):
        y, aux = nnx.merge(graphdef, state)(x)
        y = y.astype(jnp.float32)
        return jnp.sum(y * jnp.cos(y)) + aux.total_loss, y

    return jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)(state, x)


@functools.cache
def _params():
    return nnx.state(moejax.MoE(_config("reference", "dropless"), rngs=nnx.Rngs(0)), nnx.Param)


@functools.cache
def _single_device(dispatch):
    model = moejax.MoE(_config("reference", dispatch), rngs=nnx.Rngs(0))
    nnx.update(model, _params())
    graphdef, state = nnx.split(model)
    device = jax.devices()[0]
    state, x = jax.device_put((state, _x()), device)
    return jax.jit(functools.partial(_step, graphdef))(state, x)


def _sharded(backend, mesh_name, dispatch):
    mesh = parallel.make_mesh(**MESHES[mesh_name], devices=jax.devices()[:4])
    config = _config(backend, dispatch)
    model = parallel.create_sharded(lambda: moejax.MoE(config, rngs=nnx.Rngs(0)), mesh)
    placed = jax.tree.map(lambda value, target: jax.device_put(value, target.sharding),
                          _params(), nnx.state(model, nnx.Param))
    nnx.update(model, placed)
    graphdef, state = nnx.split(model)
    with parallel.use_mesh(mesh):
        x = parallel.shard_batch(np.asarray(_x()), mesh)
        step = jax.jit(functools.partial(_step, graphdef))
        return step.lower(state, x).compile(FAST_COMPILE)(state, x)


@pytest.mark.parametrize("dispatch", ["dropless", "capacity"])
@pytest.mark.parametrize("mesh_name", MESHES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_sharded_layer_equals_the_single_device_layer_for_every_backend(backend, mesh_name,
                                                                         dispatch):
    (loss0, y0), grads0 = _single_device(dispatch)
    (loss, y), grads = _sharded(backend, mesh_name, dispatch)
    np.testing.assert_allclose(np.asarray(y), np.asarray(y0), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(float(loss), float(loss0), rtol=1e-5, atol=1e-5)
    leaves0, leaves = jax.tree.leaves(grads0), jax.tree.leaves(grads)
    assert len(leaves) == len(leaves0)
    for got, want in zip(leaves, leaves0):
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("dispatch", ["dropless", "capacity"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_bf16_sharded_layer_equals_the_single_device_layer_for_every_backend(backend, dispatch):
    """bf16 tokens (the layer computes in the input's dtype) through the exchange and a split F."""
    x = _x().astype(jnp.bfloat16)

    def forward(config, mesh=None):
        model = moejax.MoE(config, rngs=nnx.Rngs(0))
        nnx.update(model, _params())
        if mesh is None:
            return nnx.jit(lambda m, x: m(x)[0])(model, x)
        with parallel.use_mesh(mesh):
            return nnx.jit(lambda m, x: m(x)[0])(model, parallel.shard_batch(x, mesh))

    want = forward(_config("reference", dispatch))
    mesh = parallel.make_mesh(**MESHES["expert2_tensor2"], devices=jax.devices()[:4])
    got = forward(_config(backend, dispatch), mesh)
    assert got.dtype == want.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want, np.float32),
                               rtol=2e-2, atol=2e-2)


# --------------------------------------------------------------------------- compiled kernels


def _sharded_train_step_structs(backend, mesh, **config_kw):
    """Abstract sharded state and batch, and the train step, for a compiled (not interpreted) layer."""
    config = _config(backend, "dropless", gmm_interpret=False, **config_kw)
    with parallel.use_mesh(mesh):
        graphdef, abstract = nnx.split(nnx.eval_shape(lambda: moejax.MoE(config, rngs=nnx.Rngs(0))))
        shardings = parallel.state_shardings(abstract, mesh)
    state = jax.tree.map(lambda v, s: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=s),
                         abstract, shardings)
    x = jax.ShapeDtypeStruct((8, 16, D), config.dtype or jnp.float32, sharding=parallel.batch_sharding(mesh))
    return functools.partial(_step, graphdef), state, x


EXPORT_TARGETS = {
    "pallas_tpu": ("tpu", "tpu_custom_call"),
    "pallas_gpu": ("cuda", "__gpu$xla.gpu.triton"),
}


@pytest.mark.parametrize("backend", EXPORT_TARGETS)
def test_compiled_kernels_lower_inside_the_expert_parallel_shard_map_with_vma_checks(backend):
    platform, custom_call = EXPORT_TARGETS[backend]
    mesh = parallel.make_mesh(expert=4, devices=jax.devices()[:4])
    step, state, x = _sharded_train_step_structs(backend, mesh)
    checks = [jax.export.DisabledSafetyCheck.custom_call(custom_call)]
    with parallel.use_mesh(mesh):
        exported = jax.export.export(jax.jit(step), platforms=[platform],
                                     disabled_checks=checks)(state, x)
    text = exported.mlir_module()
    # Forward and backward: gmm for w_in, w_up, w_out, their dlhs, and tgmm for each weight.
    assert text.count(custom_call) >= 9
    assert "all_to_all" in text


def test_sharded_dropless_layer_compiles_for_a_tpu_v5e_slice_with_the_pallas_kernel():
    if importlib.util.find_spec("libtpu") is None:
        pytest.skip("libtpu (the TPU compiler, a test dependency) is not installed")
    from jax.experimental import topologies

    # Any other failure (libtpu's single-process lock, a compile error) fails the test.
    topology = topologies.get_topology_desc(platform="tpu", topology_name="v5e:2x2")
    mesh = parallel.make_mesh(expert=4, devices=topology.devices)
    step, state, x = _sharded_train_step_structs("pallas_tpu", mesh, dtype=jnp.bfloat16)
    with parallel.use_mesh(mesh):
        compiled = jax.jit(step).lower(state, x).compile()
    text = compiled.as_text()
    assert "all-to-all" in text
    assert "tpu_custom_call" in text


# --------------------------------------------------------------------------- interpret mode


def test_interpreted_pallas_under_a_vma_checked_shard_map_raises_a_clear_error():
    mesh = jax.make_mesh((4,), ("x",), axis_types=(jax.sharding.AxisType.Auto,),
                         devices=jax.devices()[:4])
    spec = jax.sharding.PartitionSpec("x")

    def local(lhs, rhs, sizes):
        return gmm(lhs, rhs, sizes[0], backend="pallas_tpu", interpret=True)

    fn = jax.shard_map(local, mesh=mesh, in_specs=(spec, spec, spec), out_specs=spec)
    with pytest.raises(ValueError, match="interpret mode cannot run inside.*check_vma=False"):
        jax.jit(fn)(jnp.ones((32, D)), jnp.ones((8, D, F)), jnp.full((4, 2), 4, jnp.int32))


def test_interpreted_pallas_runs_inside_a_shard_map_without_vma_checks():
    mesh = jax.make_mesh((4,), ("x",), axis_types=(jax.sharding.AxisType.Auto,),
                         devices=jax.devices()[:4])
    spec = jax.sharding.PartitionSpec("x")
    rng = np.random.default_rng(0)
    lhs = jnp.asarray(rng.standard_normal((32, D)), jnp.float32)
    rhs = jnp.asarray(rng.standard_normal((8, D, F)), jnp.float32)
    sizes = jnp.asarray([[3, 5], [0, 8], [8, 0], [1, 2]], jnp.int32)

    def local(lhs, rhs, sizes):
        return gmm(lhs, rhs, sizes[0], backend="pallas_gpu", interpret=True)

    fn = jax.shard_map(local, mesh=mesh, in_specs=(spec, spec, spec), out_specs=spec,
                       check_vma=False)
    out = np.asarray(jax.jit(fn)(lhs, rhs, sizes))
    for i in range(4):
        expected = jax.lax.ragged_dot(lhs[8 * i:8 * i + 8], rhs[2 * i:2 * i + 2], sizes[i])
        np.testing.assert_allclose(out[8 * i:8 * i + 8], expected, rtol=1e-5, atol=1e-5)
