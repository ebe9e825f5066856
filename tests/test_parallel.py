"""moejax.parallel on 8 fake CPU devices: meshes, rules, sharded creation, expert parallelism, errors."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec

import moejax
from moejax import parallel
from moejax.ops.ffn import ExpertFFN
from moejax.parallel.hlo import collectives

D, F, E, K = 8, 16, 8, 2
MESHES = {
    "data8": dict(data=8),
    "expert8": dict(expert=8),
    "data2_expert4": dict(data=2, expert=4),
    "fsdp2_expert2_tensor2": dict(fsdp=2, expert=2, tensor=2),
}


def _config(**kw):
    base = dict(d_model=D, d_ff=F, num_experts=E, experts_per_token=K, router="mixtral",
                expert="glu", activation="silu", num_shared_experts=1, capacity_factor=float(E),
                gmm_backend="reference")
    return moejax.MoEConfig(**dict(base, **kw))


def _x(batch=8, length=4, seed=1):
    return jax.random.normal(jax.random.key(seed), (batch, length, D), jnp.float32)


def _loss_fn(model, x):
    y, aux = model(x)
    return jnp.sum(y * jnp.cos(y)) + aux.total_loss, y


def _grad_step(model, x):
    return nnx.value_and_grad(_loss_fn, argnums=(0, 1), has_aux=True)(model, x)


def _sharded_copy(reference, mesh):
    """A layer built with ``create_sharded`` on ``mesh`` holding exactly ``reference``'s parameters."""
    config = reference.config
    model = parallel.create_sharded(lambda: moejax.MoE(config, rngs=nnx.Rngs(0)), mesh)
    placed = jax.tree.map(lambda value, target: jax.device_put(value, target.sharding),
                          nnx.state(reference, nnx.Param), nnx.state(model, nnx.Param))
    nnx.update(model, placed)
    return model


# Test shapes are tiny: skipping XLA's expensive LLVM passes halves compile time and changes no result.
FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}


@functools.cache
def _single_device_result(dispatch):
    config = _config(dispatch=dispatch)
    one_device = parallel.make_mesh(devices=jax.devices()[:1])
    model = parallel.create_sharded(lambda: moejax.MoE(config, rngs=nnx.Rngs(0)), one_device)
    model.eval()
    graphdef, state = nnx.split(model)

    def step(state, x):
        return _grad_step(nnx.merge(graphdef, state), x)

    x = jax.device_put(_x(), jax.devices()[0])
    (loss, y), grads = jax.jit(step).lower(state, x).compile(FAST_COMPILE)(state, x)
    return model, loss, y, grads


@functools.cache
def _sharded_result(mesh_name, dispatch):
    reference = _single_device_result(dispatch)[0]
    mesh = parallel.make_mesh(**MESHES[mesh_name])
    model = _sharded_copy(reference, mesh)
    model.eval()
    graphdef, state = nnx.split(model)

    def step(state, x):
        return _grad_step(nnx.merge(graphdef, state), x)

    with parallel.use_mesh(mesh):
        x = parallel.shard_batch(np.asarray(_x()), mesh)
        compiled = jax.jit(step).lower(state, x).compile(FAST_COMPILE)
        (loss, y), grads = compiled(state, x)
    return model, loss, y, grads, compiled.as_text()


# --------------------------------------------------------------------------- mesh and rules


def test_make_mesh_has_the_four_axes_in_order_with_their_sizes():
    mesh = parallel.make_mesh(data=2, expert=2, tensor=2)
    assert mesh.axis_names == ("data", "fsdp", "expert", "tensor")
    assert dict(mesh.shape) == {"data": 2, "fsdp": 1, "expert": 2, "tensor": 2}
    assert all(t == jax.sharding.AxisType.Auto for t in mesh.axis_types)


def test_make_mesh_minus_one_takes_the_remaining_devices():
    assert parallel.make_mesh(data=2, expert=-1).shape["expert"] == 4


def test_logical_to_spec_maps_names_and_uses_each_mesh_axis_once():
    spec = parallel.logical_to_spec(("batch", "length", "embed"), parallel.DEFAULT_RULES)
    assert spec == PartitionSpec(("data", "fsdp", "expert"), None, None)
    assert parallel.logical_to_spec(("expert", "embed", "mlp"), parallel.DEFAULT_RULES) == (
        PartitionSpec("expert", "fsdp", "tensor"))


def test_custom_rules_override_the_defaults():
    rules = (("batch", "data"), ("embed", None), ("mlp", "tensor"), ("expert", "expert"))
    assert parallel.logical_to_spec(("expert", "embed", "mlp"), rules) == (
        PartitionSpec("expert", None, "tensor"))


def test_constrain_is_identity_without_a_mesh():
    x = jnp.ones((4, D))
    assert parallel.constrain(x, ("batch", "embed")) is x


def test_constrain_splits_divisible_dimensions_and_leaves_the_others_to_the_compiler():
    with parallel.use_mesh(parallel.make_mesh(data=2, expert=4)):
        split = jax.jit(lambda x: parallel.constrain(x, ("batch", "embed")))(jnp.ones((16, D)))
        uneven = jax.jit(lambda x: parallel.constrain(x, ("batch", "embed")))(jnp.ones((6, D)))
    assert {s.data.shape for s in split.addressable_shards} == {(2, D)}
    np.testing.assert_array_equal(np.asarray(uneven), np.ones((6, D)))


def test_shard_batch_splits_the_leading_dimension_over_the_batch_axes():
    mesh = parallel.make_mesh(data=2, expert=4)
    batch = parallel.shard_batch({"tokens": np.arange(16 * 3).reshape(16, 3)}, mesh)
    tokens = batch["tokens"]
    assert tokens.sharding.spec == PartitionSpec(("data", "fsdp", "expert"))
    assert {s.data.shape for s in tokens.addressable_shards} == {(2, 3)}
    np.testing.assert_array_equal(np.asarray(tokens), np.arange(16 * 3).reshape(16, 3))


# --------------------------------------------------------------------------- sharded creation


@pytest.mark.parametrize("mesh_name", ["expert8", "data2_expert4", "fsdp2_expert2_tensor2"])
def test_create_sharded_puts_each_expert_weight_slice_on_its_device(mesh_name):
    mesh = parallel.make_mesh(**MESHES[mesh_name])
    config = _config()
    model = parallel.create_sharded(lambda: moejax.MoE(config, rngs=nnx.Rngs(0)), mesh)
    ep, fsdp, tp = mesh.shape["expert"], mesh.shape["fsdp"], mesh.shape["tensor"]
    w_in = model.experts.w_in[...]
    assert w_in.sharding.spec == PartitionSpec("expert", "fsdp", "tensor")
    assert {s.data.shape for s in w_in.addressable_shards} == {(E // ep, D // fsdp, F // tp)}
    w_out = model.experts.w_out[...]
    assert {s.data.shape for s in w_out.addressable_shards} == {(E // ep, F // tp, D // fsdp)}


def test_create_sharded_gives_the_same_values_as_building_on_one_device(single_device):
    mesh = parallel.make_mesh(**MESHES["fsdp2_expert2_tensor2"])
    config = _config()
    sharded = parallel.create_sharded(lambda: moejax.MoE(config, rngs=nnx.Rngs(0)), mesh)
    plain = moejax.MoE(config, rngs=nnx.Rngs(0))
    for a, b in zip(jax.tree.leaves(nnx.state(sharded, nnx.Param)),
                    jax.tree.leaves(nnx.state(plain, nnx.Param))):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-7)


# --------------------------------------------------------------------------- expert parallelism


@pytest.mark.parametrize("mesh_name, dispatch", [
    *((name, "dropless") for name in MESHES), ("fsdp2_expert2_tensor2", "capacity"),
])
def test_sharded_layer_forward_and_gradients_equal_the_single_device_layer(mesh_name, dispatch):
    _, loss0, y0, grads0 = _single_device_result(dispatch)
    _, loss, y, grads, _ = _sharded_result(mesh_name, dispatch)
    np.testing.assert_allclose(np.asarray(y), np.asarray(y0), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(float(loss), float(loss0), rtol=1e-5, atol=1e-5)
    leaves0, leaves = jax.tree.leaves(grads0), jax.tree.leaves(grads)
    assert len(leaves) == len(leaves0)
    for a, b in zip(leaves, leaves0):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("mesh_name", ["expert8", "fsdp2_expert2_tensor2"])
def test_expert_parallel_step_exchanges_tokens_and_never_gathers_the_expert_weights(mesh_name):
    hlo = _sharded_result(mesh_name, "dropless")[4]
    found = collectives(hlo)
    assert any(c.op == "all-to-all" and c.group_size == MESHES[mesh_name]["expert"]
               for c in found)
    for c in found:
        if c.op == "all-gather":
            assert all(len(dims) < 3 or dims[0] < E for _, dims in c.shapes), c


def _routing_to(expert_indices_TxK, num_tokens):
    return (jnp.asarray(expert_indices_TxK, jnp.int32),
            jax.random.uniform(jax.random.key(3), (num_tokens, K), jnp.float32))


def _numpy_moe(x, indices, weights, w_in, w_out):
    """Token by token, in float64: y_t = sum_j g_tj * W_out[e] gelu(W_in[e] x_t)."""
    from scipy.special import erf

    x, weights = np.asarray(x, np.float64), np.asarray(weights, np.float64)
    w_in, w_out = np.asarray(w_in, np.float64), np.asarray(w_out, np.float64)
    y = np.zeros_like(x)
    for t in range(x.shape[0]):
        for j, e in enumerate(np.asarray(indices)[t]):
            h = x[t] @ w_in[e]
            y[t] += weights[t, j] * ((0.5 * h * (1 + erf(h / np.sqrt(2)))) @ w_out[e])
    return y


def _exchange_case(mesh_shape, indices_TxK, exchange_factor):
    num_tokens = indices_TxK.shape[0]
    keys = jax.random.split(jax.random.key(0), 3)
    x = jax.random.normal(keys[0], (num_tokens, D))
    w_in = jax.random.normal(keys[1], (E, D, F)) / 3
    w_out = jax.random.normal(keys[2], (E, F, D)) / 4
    indices, weights = _routing_to(indices_TxK, num_tokens)
    with parallel.use_mesh(parallel.make_mesh(**mesh_shape)):
        experts = ExpertFFN(w_in, w_out, activation="gelu", gmm_backend="reference")
        y = jax.jit(functools.partial(
            parallel.dropless_expert_parallel, exchange_factor=exchange_factor,
        ))(x, indices, weights, experts)
    np.testing.assert_allclose(np.asarray(y), _numpy_moe(x, indices, weights, w_in, w_out),
                               rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("exchange_factor", [None, 0.5])
def test_dropless_exchange_drops_nothing_when_every_copy_goes_to_one_shard(exchange_factor):
    # Every token picks experts 0 and 1: all copies land on expert shard 0.
    _exchange_case(dict(data=2, expert=4), np.tile([[0, 1]], (32, 1)), exchange_factor)


def _one_copy_per_shard():
    # 4 tokens per device, local token j picks experts 2j and 2j+1: one copy per expert shard,
    # exactly the fast buffer of exchange_factor=1 (the average, 1 row per destination).
    local_j = np.arange(32) % 4
    return np.stack([2 * local_j, 2 * local_j + 1], axis=1)


def test_dropless_fast_exchange_is_exact_when_its_buffers_are_exactly_full():
    _exchange_case(dict(expert=8), _one_copy_per_shard(), 1.0)


def test_dropless_exchange_falls_back_when_one_shard_is_one_copy_over():
    indices = _one_copy_per_shard()
    indices[::4, 1] = 2  # each device's token 0 now sends 2 copies to shard 2 and none to shard 1
    _exchange_case(dict(expert=8), indices, 1.0)


def test_collectives_reads_op_bytes_group_size_and_conditional_branch_from_hlo():
    mesh = parallel.make_mesh(data=2, expert=4)

    def local(x_1x8, flag_1):
        def exchange():
            return jax.lax.all_to_all(x_1x8, "expert", 1, 1, tiled=True)

        return jax.lax.cond(flag_1[0] > 0, exchange, lambda: x_1x8), jax.lax.psum(x_1x8, "data")

    fn = jax.jit(jax.shard_map(local, mesh=mesh, in_specs=PartitionSpec(("data", "expert")),
                               out_specs=PartitionSpec(("data", "expert"))))
    x, flag = jnp.ones((8, 8), jnp.float32), jnp.ones((8,), jnp.int32)
    found = collectives(fn.lower(x, flag).compile().as_text())
    [a2a] = [c for c in found if c.op == "all-to-all"]
    [reduce] = [c for c in found if c.op == "all-reduce"]
    assert (a2a.result_bytes, a2a.group_size, a2a.sent_bytes) == (32, 4, 24)
    assert a2a.branch.endswith("/1")
    assert (reduce.result_bytes, reduce.group_size, reduce.sent_bytes, reduce.branch) == (
        32, 2, 32, "")


def test_capacity_expert_parallel_reports_the_fraction_dropped_over_all_devices():
    num_tokens, capacity_factor = 64, 2.0
    x = jax.random.normal(jax.random.key(0), (num_tokens, D))
    w = jnp.ones((E, D, F)) / D
    w_out = jnp.ones((E, F, D)) / F
    indices, weights = _routing_to(np.tile([[0, 5]], (num_tokens, 1)), num_tokens)
    mesh = parallel.make_mesh(expert=8)
    with parallel.use_mesh(mesh):
        _, dropped = jax.jit(functools.partial(
            parallel.capacity_expert_parallel, capacity_factor=capacity_factor,
        ))(x, indices, weights, ExpertFFN(w, w_out, activation="relu"))
    # 8 tokens per device, C = ceil(2 * 8 * 2 / 8) = 4: experts 0 and 5 each keep 4 of 8 copies.
    assert float(dropped) == pytest.approx(0.5)


# --------------------------------------------------------------------------- bad configuration


def test_mesh_larger_than_the_devices_is_rejected():
    with pytest.raises(ValueError, match=r"needs 16 devices, but 8 are available"):
        parallel.make_mesh(data=2, expert=8)


def test_unknown_mesh_axis_names_are_rejected():
    with pytest.raises(ValueError, match=r"unknown mesh axes \['model'\]"):
        parallel.make_mesh(model=8)
    with pytest.raises(ValueError, match=r"mesh axis 'model'"):
        with parallel.use_mesh(parallel.make_mesh(data=8), rules=(("batch", "model"),)):
            pass


def test_logical_axis_without_a_rule_is_replicated():
    spec = parallel.logical_to_spec(("batch", "kv_heads"), parallel.DEFAULT_RULES)
    assert spec == PartitionSpec(("data", "fsdp", "expert"), None)


def test_experts_not_divisible_by_the_expert_axis_are_rejected():
    mesh = parallel.make_mesh(expert=8)
    config = _config(num_experts=4)
    with pytest.raises(ValueError, match=r"experts.w_in \(4, 8, 16\): dimension 0 of size 4 is "
                                         r"split over mesh axes \('expert',\) of total size 8"):
        parallel.create_sharded(lambda: moejax.MoE(config, rngs=nnx.Rngs(0)), mesh)


def test_batch_not_divisible_by_the_batch_axes_is_rejected():
    mesh = parallel.make_mesh(data=2, expert=4)
    with pytest.raises(ValueError, match=r"batch size 6 .* not divisible by the batch mesh axes "
                                         r"\('data', 'fsdp', 'expert'\) of total size 8"):
        parallel.shard_batch(np.zeros((6, 4, D)), mesh)


def test_tokens_not_divisible_by_the_token_axes_are_rejected_by_the_layer():
    mesh = parallel.make_mesh(data=2, expert=4)
    model = moejax.MoE(_config(), rngs=nnx.Rngs(0))
    with parallel.use_mesh(mesh):
        with pytest.raises(ValueError, match=r"12 tokens are not divisible by the token mesh axes "
                                             r"\('data', 'fsdp', 'expert'\) of total size 8"):
            model(jnp.zeros((3, 4, D)))


def test_received_copies_equal_the_sort_by_expert_of_the_received_rows():
    """The receiver's order from the counts alone equals ``sort_copies`` of the rows' expert ids."""
    from moejax.ops import dispatch as dispatch_ops
    from moejax.parallel.expert import _received_copies

    rng = np.random.default_rng(0)
    num_sources, experts_local, capacity, num_experts, offset = 4, 3, 7, 12, 6
    for _ in range(5):
        counts = np.zeros((num_sources, experts_local), np.int32)
        for s in range(num_sources):  # each source sends at most ``capacity`` rows, some none
            total = rng.integers(0, capacity + 1)
            counts[s] = np.bincount(rng.integers(0, experts_local, total),
                                    minlength=experts_local)
        ids, valid = [], []
        for s in range(num_sources):  # rows arrive in expert order, then padding
            row = np.repeat(offset + np.arange(experts_local), counts[s])
            ids += list(row) + [0] * (capacity - len(row))
            valid += [True] * len(row) + [False] * (capacity - len(row))
        want = dispatch_ops.sort_copies(jnp.asarray(ids, jnp.int32)[:, None], num_experts,
                                        assigned_TxK=jnp.asarray(valid)[:, None])
        got = _received_copies(jnp.asarray(counts), capacity, num_experts, jnp.int32(offset))
        for name in ("order_TK", "inverse_TK", "group_sizes_E"):
            np.testing.assert_array_equal(getattr(got, name), getattr(want, name), err_msg=name)


@pytest.mark.parametrize("backend", ["cpu", "reference", "pallas_tpu", "pallas_gpu"])
def test_exchange_in_rounds_gives_the_single_exchanges_values_and_gradients(backend):
    """Every copy to expert shard 0 overflows exchange_factor=0.5's buffers: the layer exchanges in
    rounds. Values and gradients equal one worst-case exchange (exchange_factor=None), per backend."""
    num_tokens = 32
    keys = jax.random.split(jax.random.key(0), 3)
    x = jax.random.normal(keys[0], (num_tokens, D))
    w_in = jax.random.normal(keys[1], (E, D, F)) / 3
    w_out = jax.random.normal(keys[2], (E, F, D)) / 4
    indices, weights = _routing_to(np.tile([[0, 1]], (num_tokens, 1)), num_tokens)

    def loss(x, w_in, w_out, factor):
        experts = ExpertFFN(w_in, w_out, activation="gelu", gmm_backend=backend)
        y = parallel.dropless_expert_parallel(x, indices, weights, experts,
                                              exchange_factor=factor)
        return jnp.sum(y ** 2), y

    results = {}
    with parallel.use_mesh(parallel.make_mesh(data=2, expert=4)):
        for factor in (0.5, None):
            grad = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True),
                           static_argnums=3)
            results[factor] = grad(x, w_in, w_out, factor)
    (_, y_rounds), grads_rounds = results[0.5]
    (_, y_once), grads_once = results[None]
    np.testing.assert_allclose(np.asarray(y_rounds), _numpy_moe(x, indices, weights, w_in, w_out),
                               rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(y_rounds), np.asarray(y_once), rtol=1e-6, atol=1e-6)
    for got, want in zip(grads_rounds, grads_once):
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)
