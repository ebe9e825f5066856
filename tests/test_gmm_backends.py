"""gmm/tgmm on every backend, in the cases peers' test suites check (JAX megablox, ragged_dot,
MegaBlocks): low and mixed precision with gradients, many empty groups, long contractions, fewer
rows than a tile, tgmm gradients, vmap, exported functions run, symbolic shapes.

Pallas backends run in interpret mode. The suite runs under strict dtype promotion (conftest).
References are independent: NumPy in float64 and ``jax.lax.ragged_dot`` autodiff.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moejax.ops import gmm, tgmm
from references import numpy_gmm, numpy_tgmm

BACKENDS = ("cpu", "reference", "pallas_tpu", "pallas_gpu")
TOLERANCE = {jnp.float32: 1e-4, jnp.bfloat16: 3e-2, jnp.float16: 5e-3}


def _ops(backend):
    kw = dict(backend=backend, interpret=True if backend.startswith("pallas") else None)
    return (lambda *a, **k: gmm(*a, **kw, **k)), (lambda *a, **k: tgmm(*a, **kw, **k))


def _normal(rng, shape, dtype=jnp.float32):
    return jnp.asarray(rng.standard_normal(shape), jnp.float32).astype(dtype)


def _tol(*dtypes):
    return max(TOLERANCE[jnp.dtype(d).type] for d in dtypes)


def _f32(x):
    return np.asarray(jnp.asarray(x, jnp.float32))


# --------------------------------------------------------------------------- dtypes and gradients

DTYPE_CASES = {
    "bf16": (jnp.bfloat16, jnp.bfloat16, None),
    "f16": (jnp.float16, jnp.float16, None),
    "bf16_in_f32_out": (jnp.bfloat16, jnp.bfloat16, jnp.float32),
    "bf16_lhs_f32_rhs": (jnp.bfloat16, jnp.float32, None),
    "f32_lhs_bf16_rhs_bf16_out": (jnp.float32, jnp.bfloat16, jnp.bfloat16),
    "f16_lhs_f32_rhs_f16_out": (jnp.float16, jnp.float32, jnp.float16),
}


@pytest.mark.parametrize("dtypes", DTYPE_CASES.values(), ids=DTYPE_CASES.keys())
@pytest.mark.parametrize("backend", BACKENDS)
def test_gmm_and_its_gradients_in_low_and_mixed_precision(backend, dtypes):
    lhs_dtype, rhs_dtype, out_dtype = dtypes
    gmm_, _ = _ops(backend)
    rng = np.random.default_rng(0)
    lhs, rhs = _normal(rng, (40, 24), lhs_dtype), _normal(rng, (4, 24, 16), rhs_dtype)
    sizes = jnp.asarray([9, 0, 20, 8], jnp.int32)
    cot = _normal(rng, (40, 16))
    out = gmm_(lhs, rhs, sizes, preferred_element_type=out_dtype)
    with jax.numpy_dtype_promotion("standard"):
        expected_dtype = out_dtype or jnp.promote_types(lhs_dtype, rhs_dtype)
    assert out.dtype == expected_dtype
    tol = _tol(lhs_dtype, rhs_dtype, expected_dtype)
    np.testing.assert_allclose(_f32(out), numpy_gmm(_f32(lhs), _f32(rhs), sizes),
                               rtol=tol, atol=tol * 4)

    def ours(a, b):
        y = gmm_(a, b, sizes, preferred_element_type=out_dtype)
        return jnp.sum(y.astype(jnp.float32) * cot)

    def oracle(a, b):  # the same values in f32
        return jnp.sum(jax.lax.ragged_dot(a.astype(jnp.float32), b.astype(jnp.float32), sizes)
                       * cot)

    grads = jax.grad(ours, (0, 1))(lhs, rhs)
    expected = jax.grad(oracle, (0, 1))(lhs, rhs)
    for got, want, primal in zip(grads, expected, (lhs, rhs)):
        assert got.dtype == primal.dtype
        got, want = _f32(got), _f32(want)
        assert np.max(np.abs(got - want)) <= tol * 2 * (np.max(np.abs(want)) + 1e-6)


# --------------------------------------------------------------------------- shapes


@pytest.mark.parametrize("backend", BACKENDS)
def test_32_groups_most_of_them_empty(backend):
    gmm_, tgmm_ = _ops(backend)
    rng = np.random.default_rng(1)
    sizes_np = np.zeros(32, np.int32)
    sizes_np[[0, 3, 4, 17, 30]] = [7, 1, 30, 12, 9]
    sizes = jnp.asarray(sizes_np)
    lhs, rhs, dout = _normal(rng, (64, 16)), _normal(rng, (32, 16, 24)), _normal(rng, (64, 24))
    np.testing.assert_allclose(gmm_(lhs, rhs, sizes), numpy_gmm(lhs, rhs, sizes),
                               rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(tgmm_(lhs, dout, sizes), numpy_tgmm(lhs, dout, sizes, 0, 32),
                               rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("backend", BACKENDS)
def test_long_contraction_k_2048(backend):
    gmm_, tgmm_ = _ops(backend)
    rng = np.random.default_rng(2)
    sizes = jnp.asarray([5, 11, 0, 8], jnp.int32)
    lhs, rhs, dout = _normal(rng, (24, 2048)), _normal(rng, (4, 2048, 16)), _normal(rng, (24, 16))
    np.testing.assert_allclose(gmm_(lhs, rhs, sizes), numpy_gmm(lhs, rhs, sizes),
                               rtol=1e-4, atol=1e-3)
    np.testing.assert_allclose(tgmm_(lhs, dout, sizes), numpy_tgmm(lhs, dout, sizes, 0, 4),
                               rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("m", [1, 5, 9])
@pytest.mark.parametrize("backend", BACKENDS)
def test_fewer_rows_than_a_tile(backend, m):
    gmm_, tgmm_ = _ops(backend)
    rng = np.random.default_rng(m)
    sizes = jnp.asarray([m // 2, 0, m - m // 2], jnp.int32)
    lhs, rhs, dout = _normal(rng, (m, 20)), _normal(rng, (3, 20, 18)), _normal(rng, (m, 18))
    np.testing.assert_allclose(gmm_(lhs, rhs, sizes), numpy_gmm(lhs, rhs, sizes),
                               rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(tgmm_(lhs, dout, sizes), numpy_tgmm(lhs, dout, sizes, 0, 3),
                               rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------- transformations


@pytest.mark.parametrize("backend", BACKENDS)
def test_tgmm_gradients_match_autodiff_of_a_masked_product(backend):
    _, tgmm_ = _ops(backend)
    rng = np.random.default_rng(3)
    sizes = jnp.asarray([6, 0, 13, 5], jnp.int32)
    lhs, rhs, cot = _normal(rng, (30, 12)), _normal(rng, (30, 10)), _normal(rng, (4, 12, 10))
    groups = np.repeat(np.arange(4), np.asarray(sizes))
    onehot_MxG = jnp.asarray(np.eye(4, dtype=np.float32)[np.pad(groups, (0, 6), constant_values=0)]
                             * (np.arange(30) < 24)[:, None])

    def ours(a, b):
        return jnp.sum(tgmm_(a, b, sizes) * cot)

    def oracle(a, b):
        return jnp.sum(jnp.einsum("mg,mk,mn->gkn", onehot_MxG, a, b) * cot)

    for got, want in zip(jax.grad(ours, (0, 1))(lhs, rhs), jax.grad(oracle, (0, 1))(lhs, rhs)):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("backend", BACKENDS)
def test_vmap_of_gmm_and_of_its_gradient(backend):
    gmm_, _ = _ops(backend)
    rng = np.random.default_rng(4)
    lhs, rhs = _normal(rng, (3, 16, 8)), _normal(rng, (3, 4, 8, 12))
    sizes = jnp.asarray([[5, 0, 7, 4], [16, 0, 0, 0], [1, 2, 3, 4]], jnp.int32)
    out = jax.vmap(gmm_)(lhs, rhs, sizes)
    for i in range(3):
        np.testing.assert_allclose(out[i], numpy_gmm(lhs[i], rhs[i], sizes[i]),
                                   rtol=1e-5, atol=1e-5)
    grad = jax.vmap(jax.grad(lambda a, b, s: jnp.sum(jnp.sin(gmm_(a, b, s))), (0, 1)))
    oracle = jax.vmap(jax.grad(lambda a, b, s: jnp.sum(jnp.sin(jax.lax.ragged_dot(a, b, s))),
                               (0, 1)))
    for got, want in zip(grad(lhs, rhs, sizes), oracle(lhs, rhs, sizes)):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_an_exported_gmm_runs_and_matches(backend):
    gmm_, _ = _ops(backend)
    rng = np.random.default_rng(5)
    lhs, rhs = _normal(rng, (20, 8)), _normal(rng, (3, 8, 16))
    sizes = jnp.asarray([4, 0, 12], jnp.int32)
    exported = jax.export.export(jax.jit(gmm_), platforms=["cpu"])(lhs, rhs, sizes)
    restored = jax.export.deserialize(exported.serialize())
    np.testing.assert_allclose(restored.call(lhs, rhs, sizes), numpy_gmm(lhs, rhs, sizes),
                               rtol=1e-5, atol=1e-5)


def test_the_reference_backend_exports_with_a_symbolic_number_of_rows():
    rng = np.random.default_rng(6)
    rhs, sizes = _normal(rng, (3, 8, 16)), jnp.asarray([4, 0, 9], jnp.int32)
    m = jax.export.symbolic_shape("m, 8")
    exported = jax.export.export(jax.jit(lambda a, b, s: gmm(a, b, s, backend="reference")))(
        jax.ShapeDtypeStruct(m, jnp.float32), rhs, sizes)
    for rows in (13, 40):
        lhs = _normal(rng, (rows, 8))
        np.testing.assert_allclose(exported.call(lhs, rhs, sizes), numpy_gmm(lhs, rhs, sizes),
                                   rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("op", ["gmm", "tgmm"])
@pytest.mark.parametrize("backend", ["cpu", "pallas_tpu", "pallas_gpu"])
def test_tiled_backends_reject_a_symbolic_number_of_rows_naming_it(backend, op):
    fn = _ops(backend)[op == "tgmm"]
    second = (3, 8, 16) if op == "gmm" else None
    m = jax.export.symbolic_shape("m, 8")
    rhs = (jax.ShapeDtypeStruct(second, jnp.float32) if second
           else jax.ShapeDtypeStruct(jax.export.symbolic_shape("m, 16", scope=m[0].scope),
                                     jnp.float32))
    with pytest.raises(ValueError, match=rf"{op}: backend='{backend}' needs static shapes.*'m'"):
        jax.export.export(jax.jit(fn))(jax.ShapeDtypeStruct(m, jnp.float32), rhs,
                                       jax.ShapeDtypeStruct((3,), jnp.int32))
