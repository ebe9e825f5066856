"""The MoE layer inside other people's code: every way a host model met the layer and broke it.

Each test names the failure it guards (packaging, Explicit meshes, the host's axis rules, eval
views, rng streams, scanned layers, dtypes, eager calls) and compares against the layer run plainly
on one device.
"""

from __future__ import annotations

import functools
import os
import pathlib
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn
from flax import nnx
from flax.linen import partitioning as nn_partitioning
from jax.sharding import AxisType, NamedSharding, PartitionSpec

import moejax
from moejax import parallel
from moejax.layers import moe as moe_module

ROOT = pathlib.Path(__file__).resolve().parents[1]
D = 16


def _config(**overrides):
    kw = dict(d_model=D, d_ff=32, num_experts=4, experts_per_token=2, router="mixtral",
              gmm_backend="cpu")
    kw.update(overrides)
    return moejax.MoEConfig(**kw)


def _x(shape=(8, 4, D), seed=0):
    return jax.random.normal(jax.random.key(seed), shape, jnp.float32)


def _auto_mesh(shape, names):
    return jax.make_mesh(shape, names, axis_types=(AxisType.Auto,) * len(names),
                         devices=jax.devices()[:int(np.prod(shape))])


# --------------------------------------------------------------------------- 1. packaging


def test_every_source_directory_is_a_package():
    setuptools = pytest.importorskip("setuptools")
    packages = set(setuptools.find_packages(str(ROOT), include=["moejax", "moejax.*"]))
    dirs = {p.parent for p in (ROOT / "moejax").rglob("*.py") if "__pycache__" not in p.parts}
    missing = sorted(str(d.relative_to(ROOT)) for d in dirs
                     if ".".join(d.relative_to(ROOT).parts) not in packages)
    assert not missing, f"directories with Python files but no __init__.py: {missing}"


def test_the_built_wheel_installs_and_runs_from_outside_the_checkout(tmp_path):
    """``pip wheel .`` into a fresh venv (the Colab / ``pip install git+...`` path): import moejax,
    ``moejax.linen`` as an attribute, one forward of each front door."""
    wheels = tmp_path / "wheels"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps",
                    "--no-build-isolation", "-w", str(wheels), str(ROOT)],
                   check=True, capture_output=True, text=True)
    (wheel,) = wheels.glob("moejax-*.whl")
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    target = next((venv / "lib").glob("python*/site-packages"))
    # Install the wheel by unpacking it (what pip does for a pure-Python wheel), without network.
    import zipfile

    with zipfile.ZipFile(wheel) as archive:
        archive.extractall(target)
    # jax, flax, ... from this environment's site-packages; moejax only from the wheel (this
    # environment's moejax is an editable finder, which PYTHONPATH entries do not run).
    deps = [p for p in sys.path if p.endswith("site-packages")]
    script = textwrap.dedent("""
        import jax, jax.numpy as jnp, pathlib, sys
        from flax import nnx
        import moejax
        assert str(pathlib.Path(moejax.__file__).resolve()).startswith(sys.argv[1]), moejax.__file__
        cfg = moejax.MoEConfig(d_model=8, d_ff=16, num_experts=4, experts_per_token=2)
        y, aux = moejax.MoE(cfg, rngs=nnx.Rngs(0))(jnp.ones((2, 3, 8)))
        v = moejax.linen.MoE(cfg).init(jax.random.key(0), jnp.ones((2, 3, 8)))
        y2, _ = moejax.linen.MoE(cfg).apply(v, jnp.ones((2, 3, 8)))
        print("OK", y.shape, y2.shape, moejax.__file__)
    """)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(deps), JAX_PLATFORMS="cpu")
    out = subprocess.run([str(venv / "bin" / "python"), "-c", script, str(venv.resolve())],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "OK (2, 3, 8) (2, 3, 8)" in out.stdout


# --------------------------------------------------------------------------- 2. Explicit axes


def test_eager_call_under_an_explicit_one_device_mesh_equals_no_mesh():
    layer = moejax.MoE(_config(), rngs=nnx.Rngs(0))
    x = _x()
    y0, aux0 = layer(x)
    with jax.set_mesh(jax.make_mesh((1,), ("data",), devices=jax.devices()[:1])):
        y1, aux1 = layer(x)
    np.testing.assert_allclose(y1, y0, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(aux1.total_loss, aux0.total_loss, rtol=1e-5)


@pytest.mark.parametrize("dispatch", ["dropless", "capacity"])
def test_presharded_input_under_an_explicit_eight_device_mesh_equals_no_mesh(dispatch):
    config = _config(dispatch=dispatch, capacity_factor=4.0)
    layer = moejax.MoE(config, rngs=nnx.Rngs(0))
    x = _x()
    y0, _ = layer(x)
    mesh = jax.make_mesh((8,), ("data",), axis_types=(AxisType.Explicit,))
    with jax.set_mesh(mesh):
        xs = jax.device_put(x, NamedSharding(mesh, PartitionSpec("data")))
        y1, _ = nnx.jit(lambda m, x: m(x))(layer, xs)
        assert y1.sharding.spec[0] == "data"
    np.testing.assert_allclose(y1, y0, rtol=1e-5, atol=1e-6)


# Auto axes (moejax's own meshes) are covered by test_parallel*.py and test_token_mask.py.
AXIS_TYPES = {
    "explicit": (AxisType.Explicit, AxisType.Explicit),
    "mixed": (AxisType.Explicit, AxisType.Auto),
}
ROUTER_DISPATCH = [("expert_choice", "capacity"), ("mixtral", "dropless"),
                   ("mixtral", "capacity"), ("softmax", "dense"), ("deepseek_v3", "dropless")]


def _dispatch_config(router, dispatch):
    k = 4 if router == "softmax" else 2
    return _config(router=router, dispatch=dispatch, experts_per_token=k, capacity_factor=4.0)


def _forward_and_grad(layer, x):
    y, aux = layer(x)
    return y, aux.total_loss, nnx.grad(lambda x: jnp.sum(layer(x)[0] ** 2))(x)


@functools.cache
def _unsharded(router, dispatch):
    layer = moejax.MoE(_dispatch_config(router, dispatch), rngs=nnx.Rngs(0))
    return nnx.jit(_forward_and_grad)(layer, _x())


@pytest.mark.parametrize("axis_types", sorted(AXIS_TYPES))
@pytest.mark.parametrize("router, dispatch", ROUTER_DISPATCH)
def test_every_dispatch_under_explicit_and_mixed_axes_equals_no_mesh(router, dispatch, axis_types):
    config, x = _dispatch_config(router, dispatch), _x()
    want = _unsharded(router, dispatch)
    mesh = jax.make_mesh((2, 4), ("data", "expert"), axis_types=AXIS_TYPES[axis_types])
    with jax.set_mesh(mesh):
        xs = jax.device_put(x, NamedSharding(mesh, PartitionSpec("data")))
        got = nnx.jit(_forward_and_grad)(moejax.MoE(config, rngs=nnx.Rngs(0)), xs)
    for a, b in zip(got, want):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------- 3. the host's rules


LM1B_RULES = (("embed", "fsdp"), ("mlp", "tensor"))


def test_linen_init_under_the_hosts_axis_rules_replicates_names_they_do_not_map():
    mesh = _auto_mesh((4, 2), ("fsdp", "tensor"))
    x = _x()
    module = moejax.linen.MoE(_config())
    with jax.set_mesh(mesh), nn_partitioning.axis_rules(LM1B_RULES):
        abstract = jax.eval_shape(module.init, jax.random.key(0), x)
        specs = nn.get_partition_spec(abstract)
        shardings = nn.logical_to_mesh_sharding(specs, mesh, LM1B_RULES)
        variables = jax.jit(module.init, out_shardings=shardings)(jax.random.key(0), x)
        y, _ = jax.jit(module.apply)(variables, x)
    w_in = variables["params"]["layer"]["experts"]["w_in"]
    assert w_in.names == ("expert", "embed", "mlp")
    assert w_in.value.sharding.spec == PartitionSpec(None, "fsdp", "tensor")
    y0, _ = module.apply(jax.device_get(variables), x)
    np.testing.assert_allclose(y, y0, rtol=1e-5, atol=1e-6)


def test_create_sharded_on_a_mesh_without_moejax_axis_names():
    mesh = _auto_mesh((4, 2), ("fsdp", "tensor"))
    config = _config()
    layer = parallel.create_sharded(lambda: moejax.MoE(config, rngs=nnx.Rngs(0)), mesh)
    assert layer.experts.w_in[...].sharding.spec == PartitionSpec(None, "fsdp", "tensor")
    x = _x()
    with parallel.use_mesh(mesh):
        y, _ = nnx.jit(lambda m, x: m(x))(layer, x)
    y0, _ = moejax.MoE(config, rngs=nnx.Rngs(0))(x)
    np.testing.assert_allclose(y, y0, rtol=1e-5, atol=1e-5)


def test_flax_partition_spec_recipe_on_a_data_model_mesh():
    """Flax's own recipe (``nnx.get_partition_spec`` + ``with_sharding_constraint``), layer built
    under the host's mesh: the experts go to the axis named by ``MeshRoles``."""
    mesh = _auto_mesh((2, 4), ("data", "model"))
    config = _config(mesh_roles=parallel.MeshRoles(expert="model"))

    @nnx.jit
    def create():
        layer = moejax.MoE(config, rngs=nnx.Rngs(0))
        state = nnx.state(layer)
        nnx.update(layer, jax.lax.with_sharding_constraint(state, nnx.get_partition_spec(state)))
        return layer

    with jax.set_mesh(mesh):
        layer = create()
        y, _ = nnx.jit(lambda m, x: m(x))(layer, _x())
    assert layer.experts.w_in[...].sharding.spec == PartitionSpec("model")
    assert layer.router.w_router[...].sharding.spec == PartitionSpec(None, "model")
    y0, _ = moejax.MoE(_config(), rngs=nnx.Rngs(0))(_x())
    np.testing.assert_allclose(y, y0, rtol=1e-5, atol=1e-5)


def test_a_mesh_without_an_expert_axis_dispatches_per_device_not_over_the_global_batch():
    mesh = _auto_mesh((8,), ("data",))
    layer = moejax.MoE(_config(), rngs=nnx.Rngs(0))
    x = _x()
    graphdef, state = nnx.split(layer)

    def forward(state, x):
        return nnx.merge(graphdef, state)(x)[0]

    with jax.set_mesh(mesh):
        jaxpr = str(jax.make_jaxpr(forward)(state, x))
        y = jax.jit(forward)(state, x)
    assert "shard_map" in jaxpr
    np.testing.assert_allclose(y, layer(x)[0], rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------------------- 4. eval views


@pytest.mark.parametrize("router", ["noisy_top_k", "gshard"])
def test_nnx_view_deterministic_turns_routing_noise_off(router):
    config = _config(router=router, router_jitter=0.1, gmm_backend="reference")
    layer = moejax.MoE(config, rngs=nnx.Rngs(0))
    if router == "noisy_top_k":
        layer.router.w_gate[...] = jax.random.normal(jax.random.key(3), (D, 4))
        layer.router.w_noise[...] = jax.random.normal(jax.random.key(4), (D, 4))
    x = _x()
    view = nnx.view(layer, deterministic=True)
    assert view.router.deterministic and not layer.router.deterministic
    first, _ = view(x)
    second, _ = view(x)
    np.testing.assert_array_equal(first, second)
    layer.eval()
    np.testing.assert_allclose(layer(x)[0], first, rtol=1e-6, atol=1e-6)
    layer.train()
    train_a, _ = layer(x)
    train_b, _ = layer(x)
    assert not np.allclose(train_a, train_b)


# --------------------------------------------------------------------------- 5. rng streams


NOISY = dict(router="noisy_top_k")


def _noisy_linen_variables(module, x):
    variables = module.init(jax.random.key(0), x)  # a single key: the params stream
    params = variables["params"]["layer"]["router"]
    params["w_gate"] = nn.LogicallyPartitioned(jax.random.normal(jax.random.key(3), (D, 4)),
                                               params["w_gate"].names)
    params["w_noise"] = nn.LogicallyPartitioned(jax.random.normal(jax.random.key(4), (D, 4)),
                                                params["w_noise"].names)
    return variables


def test_linen_init_with_a_single_key_and_training_with_dropout_only_rngs():
    module = moejax.linen.MoE(_config(**NOISY))
    x = _x()
    variables = _noisy_linen_variables(module, x)
    a, _ = module.apply(variables, x, rngs={"dropout": jax.random.key(1)})
    b, _ = module.apply(variables, x, rngs={"dropout": jax.random.key(2)})
    c, _ = module.apply(variables, x, rngs={"router": jax.random.key(1)})
    assert not np.allclose(a, b)  # a fresh draw per key, never a constant seed
    np.testing.assert_array_equal(a, c)  # the dropout stream stands in for the router stream


def test_linen_training_apply_without_a_stream_names_the_stream():
    module = moejax.linen.MoE(_config(**NOISY))
    x = _x()
    variables = module.init(jax.random.key(0), x)
    with pytest.raises(ValueError, match="'router'.*'dropout'"):
        module.apply(variables, x)
    module.apply(variables, x, deterministic=True)  # evaluation needs no stream


def test_nnx_params_and_dropout_streams_route_with_dropout_noise():
    config = _config(**NOISY)
    layer = moejax.MoE(config, rngs=nnx.Rngs(params=0, dropout=1))
    layer.router.w_gate[...] = jax.random.normal(jax.random.key(3), (D, 4))
    layer.router.w_noise[...] = jax.random.normal(jax.random.key(4), (D, 4))
    x = _x()
    assert not np.allclose(layer(x)[0], layer(x)[0])
    bare = moejax.MoE(config, rngs=nnx.Rngs(params=0))  # no stream for noise at all
    with pytest.raises(ValueError, match="rng stream 'router'"):
        bare(x)
    bare(x, deterministic=True)


def test_the_rng_stream_name_is_configurable():
    layer = moejax.MoE(_config(rng_stream="gating", **NOISY), rngs=nnx.Rngs(params=0, gating=1))
    layer(_x())
    with pytest.raises(ValueError, match="'gating'"):
        moejax.MoE(_config(rng_stream="gating", **NOISY), rngs=nnx.Rngs(params=0))(_x())


# --------------------------------------------------------------------------- 6. scanned layers


def test_linen_scan_adds_the_layer_axis_to_every_partition_name():
    config = _config(**NOISY)

    class Block(nn.Module):
        @nn.compact
        def __call__(self, x, _):
            y, aux = moejax.linen.MoE(config)(x)
            return x + y, aux.total_loss

    class Stack(nn.Module):
        @nn.compact
        def __call__(self, x):
            scan = nn.scan(Block, variable_axes={"params": 0}, split_rngs={"params": True,
                                                                         "dropout": True},
                           length=3, metadata_params={nn.PARTITION_NAME: "layers"})
            return scan()(x, None)

    x = _x()
    variables = Stack().init({"params": jax.random.key(0), "dropout": jax.random.key(1)}, x)
    specs = nn.get_partition_spec(variables)["params"]
    layer_specs = specs["ScanBlock_0"]["MoE_0"]["layer"]
    assert layer_specs["experts"]["w_in"] == PartitionSpec("layers", "expert", "embed", "mlp")
    assert layer_specs["router"]["w_gate"] == PartitionSpec("layers", "embed", "expert")
    y, losses = Stack().apply(variables, x, rngs={"dropout": jax.random.key(2)})
    assert y.shape == x.shape and losses.shape == (3,)


def test_nnx_vmap_with_transform_metadata_adds_the_layer_axis():
    config = _config()

    @nnx.vmap(in_axes=0, out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
    def make(key):
        return moejax.MoE(config, rngs=nnx.Rngs(key))

    stack = make(jax.random.split(jax.random.key(0), 3))
    assert stack.experts.w_in.out_sharding == ("layers", "expert", "embed", "mlp")
    assert stack.experts.w_in[...].shape == (3, 4, D, 32)
    specs = parallel.state_shardings(nnx.state(stack),
                                     parallel.make_mesh(expert=4, devices=jax.devices()[:4]))
    assert specs.experts.w_in.get_value().spec == PartitionSpec(None, "expert", "fsdp", "tensor")


# --------------------------------------------------------------------------- 7. smaller frictions


def test_moejax_linen_is_an_attribute_of_a_fresh_import():
    out = subprocess.run([sys.executable, "-c", "import moejax; print(moejax.linen.MoE.__name__)"],
                         capture_output=True, text=True, env=dict(os.environ, JAX_PLATFORMS="cpu"))
    assert out.returncode == 0 and out.stdout.strip() == "MoE", out.stderr[-2000:]


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32])
def test_output_dtype_follows_the_input_by_default(dtype):
    layer = moejax.MoE(_config(), rngs=nnx.Rngs(0))
    y, aux = layer(_x().astype(dtype))
    assert y.dtype == dtype and aux.total_loss.dtype == jnp.float32
    forced = moejax.MoE(_config(dtype=jnp.float32), rngs=nnx.Rngs(0))
    assert forced(_x().astype(jnp.bfloat16))[0].dtype == jnp.float32


def test_eager_calls_compile_once_per_shape(monkeypatch):
    traces = []
    original = moe_module.MoE._forward

    def counting(self, *args, **kw):
        traces.append(1)
        return original(self, *args, **kw)

    monkeypatch.setattr(moe_module.MoE, "_forward", counting)
    layer = moejax.MoE(_config(num_experts=3, sow_aux=True), rngs=nnx.Rngs(0))
    x = _x()
    y_first, aux = layer(x)
    np.testing.assert_allclose(moejax.collect_aux(layer).total_loss, aux.total_loss)
    for _ in range(2):  # sown values popped each step
        y, _ = layer(x)
        moejax.collect_aux(layer)
    assert len(traces) == 1
    for _ in range(2):  # or captured (the captures are part of the structure: one more program)
        (y, _), sown = nnx.capture(layer, nnx.Intermediate)(x)
        assert list(moejax.collect_aux(sown).losses) == [""]
    assert len(traces) == 2
    layer(_x((2, 5, D)))
    moejax.collect_aux(layer)
    assert len(traces) == 3
    # The compiled call equals the same layer traced inline.
    y_traced, _ = nnx.jit(lambda m, x: m(x))(layer, x)
    np.testing.assert_allclose(y, y_traced, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(y, y_first)


def test_linen_apply_initialises_no_parameters():
    module = moejax.linen.MoE(_config())
    x = _x()
    variables = module.init(jax.random.key(0), x)
    init_jaxpr = str(jax.make_jaxpr(module.init)(jax.random.key(0), x))
    apply_jaxpr = str(jax.make_jaxpr(module.apply)(variables, x))
    assert "random_bits" in init_jaxpr or "threefry" in init_jaxpr
    assert "random_bits" not in apply_jaxpr and "threefry" not in apply_jaxpr


def test_linen_apply_without_the_router_bias_collection_names_it():
    module = moejax.linen.MoE(_config(router="deepseek_v3"))
    x = _x()
    variables = module.init(jax.random.key(0), x)
    with pytest.raises(ValueError, match="router_bias"):
        module.apply({"params": variables["params"]}, x)
    module.apply(variables, x)


# --------------------------------------------------------------------------- the library half


def test_every_routing_function_has_a_layer_adapter():
    from moejax.ops import routing

    assert sorted(moe_module.ROUTERS) == sorted(routing.ROUTERS)
