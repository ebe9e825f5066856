"""moejax.ops.dropless: the dropless FFN as one custom VJP against the composition of permute, the
experts' grouped FFN and unpermute (values and gradients with respect to x, the gates and every
expert weight), against a per-token NumPy loop and against autodiff of a per-token jnp FFN that
uses no moejax op; on every gmm backend (Pallas in interpret mode) in f32 and bf16, and lowered
with the compiled Pallas kernels for TPU and CUDA."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moejax.ops.ffn import activation_fn

from moejax.ops import dispatch
from moejax.ops.dropless import dropless_ffn
from moejax.ops.ffn import ExpertFFN

T, D, F = 45, 16, 24


def _case(k, num_experts, glu=False, unassigned=0.0, seed=0, dtype=jnp.float32):
    rng = np.random.default_rng(seed)
    indices = np.stack([rng.choice(num_experts, k, replace=False) for _ in range(T)])
    weights = rng.uniform(0.1, 1.0, (T, k)).astype(np.float32)
    assigned = rng.uniform(size=(T, k)) >= unassigned
    weights = np.where(assigned, weights, 0.0).astype(np.float32)
    keys = jax.random.split(jax.random.key(seed), 4)
    x = jax.random.normal(keys[0], (T, D), dtype)
    w_in = (jax.random.normal(keys[1], (num_experts, D, F)) * D ** -0.5).astype(dtype)
    w_out = (jax.random.normal(keys[2], (num_experts, F, D)) * F ** -0.5).astype(dtype)
    w_up = (jax.random.normal(keys[3], (num_experts, D, F)) * D ** -0.5).astype(dtype) if glu \
        else None
    return (x, jnp.asarray(indices, jnp.int32), jnp.asarray(weights), jnp.asarray(assigned),
            (w_in, w_up, w_out))


def _experts(weights, activation, backend):
    w_in, w_up, w_out = weights
    return ExpertFFN(w_in=w_in, w_out=w_out, w_up=w_up, activation=activation,
                     gmm_backend=backend)


def _fused(x, gates, weights, indices, assigned, activation, backend):
    copies = dispatch.sort_for_dropless(x, indices, weights[0].shape[0], assigned)
    return dropless_ffn(x, copies, gates, _experts(weights, activation, backend))


def _composed(x, gates, weights, indices, assigned, activation, backend):
    sorted_x, copies = dispatch.permute(x, indices, weights[0].shape[0], assigned)
    sorted_y = _experts(weights, activation, backend).grouped(sorted_x, copies.group_sizes_E)
    return dispatch.unpermute(sorted_y, copies, gates, jnp.float32)


def _numpy(x, gates, weights, indices, activation):
    act = {"relu": lambda v: np.maximum(v, 0), "gelu": lambda v: np.asarray(
        jax.nn.gelu(jnp.asarray(v), approximate=False), np.float64),
        "silu": lambda v: v / (1 + np.exp(-v))}[activation]
    x = np.asarray(x, np.float64)
    w_in, w_up, w_out = (None if w is None else np.asarray(w, np.float64) for w in weights)
    y = np.zeros_like(x)
    for t in range(x.shape[0]):
        for j in range(indices.shape[1]):
            e = int(indices[t, j])
            h = act(x[t] @ w_in[e])
            if w_up is not None:
                h = h * (x[t] @ w_up[e])
            y[t] += float(gates[t, j]) * (h @ w_out[e])
    return y


CASES = [  # k, E, activation, GLU, fraction of unassigned copies
    (1, 4, "relu", False, 0.0),
    (2, 8, "relu", False, 0.3),
    (2, 8, "gelu", False, 0.0),
    (2, 5, "silu", True, 0.2),
    (3, 16, "gelu", False, 0.1),
]


@pytest.mark.parametrize("backend", ["cpu", "reference"])
@pytest.mark.parametrize("k,num_experts,activation,glu,unassigned", CASES)
def test_values_and_gradients_equal_the_composition_and_numpy(backend, k, num_experts, activation,
                                                              glu, unassigned):
    x, indices, gates, assigned, weights = _case(k, num_experts, glu, unassigned)
    y = _fused(x, gates, weights, indices, assigned, activation, backend)
    assert y.dtype == jnp.float32 and y.shape == (T, D)
    np.testing.assert_allclose(y, _numpy(x, gates, weights, indices, activation),
                               rtol=2e-5, atol=2e-5)

    def loss(fn):
        # A cotangent that differs per token and feature, and gates that are differentiated.
        return lambda x, gates, weights: jnp.sum(
            jnp.sin(fn(x, gates, weights, indices, assigned, activation, backend)))

    got = jax.jit(jax.grad(loss(_fused), argnums=(0, 1, 2)))(x, gates, weights)
    want = jax.jit(jax.grad(loss(_composed), argnums=(0, 1, 2)))(x, gates, weights)
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        assert g.dtype == w.dtype and g.shape == w.shape
        np.testing.assert_allclose(g, w, rtol=2e-5, atol=2e-5)
    if unassigned:
        # An unassigned copy (gate 0) gets no output and no gate gradient.
        d_gates = np.asarray(got[1])
        assert np.all(d_gates[~np.asarray(assigned)] == 0.0)


def test_gradients_under_checkpoint_and_vmap_equal_the_plain_ones():
    x, indices, gates, assigned, weights = _case(2, 8, glu=True, unassigned=0.1)

    def loss(x, gates, weights, fn=_fused):
        return jnp.sum(jnp.cos(fn(x, gates, weights, indices, assigned, "silu", "cpu")))

    want = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(x, gates, weights)
    remat = jax.jit(jax.grad(lambda *a: jax.checkpoint(loss)(*a), argnums=(0, 1, 2)))(
        x, gates, weights)
    for g, w in zip(jax.tree.leaves(remat), jax.tree.leaves(want)):
        np.testing.assert_allclose(g, w, rtol=1e-6, atol=1e-6)
    # Two batches (the second with scaled tokens) under vmap against one call each.
    xs = jnp.stack([x, 0.5 * x])
    batched = jax.jit(jax.vmap(jax.grad(loss), in_axes=(0, None, None)))(xs, gates, weights)
    one = jax.jit(jax.grad(loss))
    for i in range(2):
        np.testing.assert_allclose(batched[i], one(xs[i], gates, weights), rtol=1e-5, atol=1e-5)


def test_bf16_keeps_dtypes_and_matches_the_composition():
    x, indices, gates, assigned, weights = _case(2, 8, dtype=jnp.bfloat16)

    def loss(fn):
        return lambda x, gates, weights: jnp.sum(
            fn(x, gates, weights, indices, assigned, "gelu", "cpu") ** 2)

    got = jax.grad(loss(_fused), argnums=(0, 1, 2))(x, gates, weights)
    want = jax.grad(loss(_composed), argnums=(0, 1, 2))(x, gates, weights)
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        assert g.dtype == w.dtype
        g, w = np.asarray(g, np.float32), np.asarray(w, np.float32)
        np.testing.assert_allclose(g, w, rtol=0.05, atol=0.05 * np.abs(w).max())


@pytest.mark.parametrize("activation", ["relu", "gelu"])
def test_the_backward_pass_keeps_fewer_buffers_than_the_composition(activation):
    """On the cpu backend the residuals are the hidden pre-activations only, and the kernels
    compute the activation, the hidden gradients and the combine of the k copies chunk by chunk:
    XLA's compiled temporaries of the fused VJP are smaller than the composition's by at least
    three [T·k, F] buffers (here 2048 tokens, k = 2; the sorted copies, the activations, the
    expert outputs, the hidden gradients and the copies' input gradients are never written)."""
    num_tokens, d, f, e, k = 2048, 128, 128, 8, 2
    rng = np.random.default_rng(0)
    indices = jnp.asarray(np.stack([rng.choice(e, k, replace=False) for _ in range(num_tokens)]),
                          jnp.int32)
    gates = jnp.asarray(rng.uniform(0.1, 1, (num_tokens, k)), jnp.float32)
    x = jax.random.normal(jax.random.key(0), (num_tokens, d))
    weights = (jax.random.normal(jax.random.key(1), (e, d, f)), None,
               jax.random.normal(jax.random.key(2), (e, f, d)))

    def temp_bytes(fn):
        def loss(x, gates, weights):
            return jnp.sum(fn(x, gates, weights, indices, None, activation, "cpu") ** 2)
        compiled = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).lower(x, gates, weights).compile()
        return compiled.memory_analysis().temp_size_in_bytes

    buffer = num_tokens * k * f * 4
    assert temp_bytes(_fused) <= temp_bytes(_composed) - 3 * buffer


@pytest.mark.parametrize("glu", [False, True])
def test_more_copies_than_a_row_block_equal_the_composition(glu):
    """1400 copies: the gate gradients are summed in row blocks (the last one overlapping its
    predecessor), the kernels run several chunks per group; values and gradients as the
    composition's."""
    num_tokens, k, e = 700, 2, 3
    rng = np.random.default_rng(1)
    indices = jnp.asarray(np.stack([rng.choice(e, k, replace=False) for _ in range(num_tokens)]),
                          jnp.int32)
    gates = jnp.asarray(rng.uniform(0.1, 1, (num_tokens, k)), jnp.float32)
    keys = jax.random.split(jax.random.key(3), 4)
    x = jax.random.normal(keys[0], (num_tokens, D))
    weights = (jax.random.normal(keys[1], (e, D, F)) * D ** -0.5,
               jax.random.normal(keys[3], (e, D, F)) * D ** -0.5 if glu else None,
               jax.random.normal(keys[2], (e, F, D)) * F ** -0.5)

    def loss(fn):
        return lambda x, gates, weights: jnp.sum(
            jnp.sin(fn(x, gates, weights, indices, None, "gelu", "cpu")))

    got = jax.jit(jax.value_and_grad(loss(_fused), argnums=(0, 1, 2)))(x, gates, weights)
    want = jax.jit(jax.value_and_grad(loss(_composed), argnums=(0, 1, 2)))(x, gates, weights)
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        np.testing.assert_allclose(g, w, rtol=2e-5, atol=2e-5)


def test_shape_mismatch_names_the_shapes():
    x, indices, gates, assigned, weights = _case(2, 8)
    copies = dispatch.sort_for_dropless(x, indices, 8, assigned)
    with pytest.raises(ValueError, match="must agree on T"):
        dropless_ffn(x[:-1], copies, gates, _experts(weights, "relu", "cpu"))


def _per_token(x, gates, weights, indices, assigned, activation):
    """The same layer with no moejax op: each token's k experts' weights gathered, plain jnp;
    unassigned copies count 0 (and their gates get no gradient)."""
    w_in, w_up, w_out = weights
    f32 = jnp.float32
    gates = jnp.where(assigned, gates, jnp.zeros_like(gates))
    h = jnp.einsum("td,tkdf->tkf", x.astype(f32), w_in[indices].astype(f32))
    a = activation_fn(activation)(h)
    if w_up is not None:
        a = a * jnp.einsum("td,tkdf->tkf", x.astype(f32), w_up[indices].astype(f32))
    y = jnp.einsum("tkf,tkfd->tkd", a, w_out[indices].astype(f32))
    return jnp.einsum("tk,tkd->td", gates.astype(f32), y)


@pytest.mark.parametrize("dtype", ["f32", "bf16"])
@pytest.mark.parametrize("backend", ["cpu", "reference", "pallas_tpu", "pallas_gpu"])
def test_every_backend_equals_a_per_token_ffn_without_moejax_ops(backend, dtype):
    """GLU experts (silu), k = 2, some copies unassigned; values and the gradients of x, the gates
    and every weight against autodiff of :func:`_per_token` (f32 oracle for bf16 too)."""
    dt = {"f32": jnp.float32, "bf16": jnp.bfloat16}[dtype]
    x, indices, gates, assigned, weights = _case(2, 8, glu=True, unassigned=0.2, dtype=dt)

    def loss(fn, **kw):
        return lambda x, gates, weights: jnp.sum(jnp.sin(fn(x, gates, weights, indices, **kw)))

    got_y = jax.jit(lambda x, g, w: _fused(x, g, w, indices, assigned, "silu", backend))(
        x, gates, weights)
    got = jax.jit(jax.grad(loss(_fused, assigned=assigned, activation="silu", backend=backend),
                           argnums=(0, 1, 2)))(x, gates, weights)
    up = lambda t: jax.tree.map(lambda v: v.astype(jnp.float32), t)  # noqa: E731
    want_y = _per_token(*up((x, gates, weights)), indices, assigned, "silu")
    want = jax.grad(loss(_per_token, assigned=assigned, activation="silu"), argnums=(0, 1, 2))(
        *up((x, gates, weights)))
    tol = 2e-5 if dtype == "f32" else 0.05
    assert got_y.dtype == jnp.float32
    np.testing.assert_allclose(got_y, want_y, rtol=tol, atol=tol)
    for g, w, primal in zip(jax.tree.leaves(got), jax.tree.leaves(want),
                            jax.tree.leaves((x, gates, weights))):
        assert g.dtype == primal.dtype
        w = np.asarray(w)
        np.testing.assert_allclose(np.asarray(g, np.float32), w, rtol=tol,
                                   atol=tol * max(1.0, np.abs(w).max()))


EXPORT_TARGETS = {
    "pallas_tpu": ("tpu", "tpu_custom_call"),
    "pallas_gpu": ("cuda", "__gpu$xla.gpu.triton"),
}


@pytest.mark.parametrize("backend", EXPORT_TARGETS)
def test_the_vjp_lowers_with_the_compiled_kernels_for_tpu_and_cuda(backend):
    """The forward and backward of the custom VJP with the compiled (not interpreted) Pallas
    kernels, lowered for the real target: every gmm and tgmm is a kernel call."""
    platform, custom_call = EXPORT_TARGETS[backend]
    num_tokens, d, f, e = 256, 128, 256, 8
    rng = np.random.default_rng(0)
    indices = jnp.asarray(np.stack([rng.choice(e, 2, replace=False) for _ in range(num_tokens)]),
                          jnp.int32)
    assigned = jnp.ones((num_tokens, 2), bool)
    bf16 = jnp.bfloat16
    x = jax.ShapeDtypeStruct((num_tokens, d), bf16)
    gates = jax.ShapeDtypeStruct((num_tokens, 2), jnp.float32)
    weights = (jax.ShapeDtypeStruct((e, d, f), bf16), jax.ShapeDtypeStruct((e, d, f), bf16),
               jax.ShapeDtypeStruct((e, f, d), bf16))

    def step(x, gates, weights):
        copies = dispatch.sort_for_dropless(x, indices, e, assigned)
        experts = dataclasses.replace(_experts(weights, "silu", backend), gmm_interpret=False)
        return jax.value_and_grad(
            lambda x, g, w: jnp.sum(dropless_ffn(x, copies, g,
                                                 experts.with_weights(*w)) ** 2),
            argnums=(0, 1, 2))(x, gates, weights)

    checks = [jax.export.DisabledSafetyCheck.custom_call(custom_call)]
    exported = jax.export.export(jax.jit(step), platforms=[platform], disabled_checks=checks)(
        x, gates, weights)
    # Forward: gmm for w_in, w_up, w_out; backward: three transposed gmm and three tgmm.
    assert exported.mlir_module().count(custom_call) >= 9


@pytest.mark.parametrize("backend", ["cpu", "reference"])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_inside_a_vma_checked_shard_map_each_shard_equals_its_own_call(backend, dtype):
    # A host model's data-parallel shard_map: each of 4 devices routes its own tokens to all the
    # experts (the cpu backend gathers the copies' rows inside its kernels). Values and gradients
    # (x, gates, every weight; the weights' gradients summed over the shards) equal one call per
    # shard without a mesh. Before the expert weights were cast to varying, the custom VJP's
    # weight cotangents (varying) did not match the replicated weights and JAX raised.
    shards = 4
    x, indices, gates, assigned, weights = _case(2, 8, glu=True, dtype=dtype)
    rows = (T // shards) * shards
    x, indices, gates, assigned = x[:rows], indices[:rows], gates[:rows], assigned[:rows]

    def loss(x, gates, weights, indices, assigned):
        y = _fused(x, gates, weights, indices, assigned, "silu", backend)
        return jnp.sum(y * jnp.cos(y))

    grad = jax.grad(loss, argnums=(0, 1, 2))
    mesh = jax.make_mesh((shards,), ("data",), devices=jax.devices()[:shards])
    P = jax.sharding.PartitionSpec

    # The weights are replicated: under check_vma their gradient comes out summed over the
    # shards already (the transpose of the cast to varying), so each shard returns the total.
    sharded = jax.jit(jax.shard_map(
        grad, mesh=mesh, in_specs=(P("data"), P("data"), P(), P("data"), P("data")),
        out_specs=(P("data"), P("data"), P()), check_vma=True))
    specs = (P("data"), P("data"), P(), P("data"), P("data"))
    got = sharded(*(jax.tree.map(lambda a, spec=spec: jax.device_put(
        a, jax.sharding.NamedSharding(mesh, spec)), arg)
        for arg, spec in zip((x, gates, weights, indices, assigned), specs)))
    size = rows // shards

    def shard(a, i):
        return a[i * size:(i + 1) * size]

    parts = [jax.jit(grad)(shard(x, i), shard(gates, i), weights, shard(indices, i),
                           shard(assigned, i)) for i in range(shards)]
    want = (np.concatenate([np.asarray(p[0], np.float32) for p in parts]),
            np.concatenate([np.asarray(p[1], np.float32) for p in parts]),
            jax.tree.map(lambda *w: sum(np.asarray(v, np.float32) for v in w),
                         *(p[2] for p in parts)))
    tol = 1e-5 if dtype == jnp.float32 else 0.05
    for g, w, one in zip(jax.tree.leaves(got), jax.tree.leaves(want), jax.tree.leaves(parts[0])):
        assert g.dtype == one.dtype
        np.testing.assert_allclose(np.asarray(g, np.float32), w, rtol=tol,
                                   atol=tol * max(1.0, np.abs(w).max()))
