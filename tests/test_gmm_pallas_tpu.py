"""Pallas Mosaic TPU grouped matmul: interpret-mode numerics on CPU, TPU lowering without a TPU."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moejax.ops import gmm, tgmm
from references import numpy_gmm, numpy_tgmm

BACKEND = dict(backend="pallas_tpu", interpret=True)


def _operands(m, k, n, num_groups, dtype, *, seed=0, transpose_rhs=False):
    rng = np.random.default_rng(seed)
    lhs = jnp.asarray(rng.standard_normal((m, k)), dtype)
    shape = (num_groups, n, k) if transpose_rhs else (num_groups, k, n)
    rhs = jnp.asarray(rng.standard_normal(shape), dtype)
    return lhs, rhs


GMM_CASES = {
    "all_groups_empty": (64, 128, 128, [0, 0, 0], None),
    "all_rows_in_one_group": (256, 128, 128, [0, 256, 0], None),
    "first_and_last_groups_empty": (200, 128, 128, [0, 90, 110, 0], None),
    "rows_past_sum_are_zero": (300, 128, 128, [40, 100, 60], None),
    "m_k_n_not_tile_multiples": (300, 200, 136, [0, 70, 1, 130, 0, 50], None),
    "several_k_tiles_with_a_partial_one": (100, 300, 256, [30, 70], (32, 128, 128)),
    "tiny_groups_straddling_small_tiles": (96, 128, 128, [1, 2, 13, 1, 40, 5, 0, 7], (8, 128, 128)),
    "tiles_larger_than_the_problem": (40, 64, 24, [10, 0, 30], (256, 256, 512)),
}


@pytest.mark.parametrize("case", list(GMM_CASES))
def test_gmm_f32_matches_ragged_dot(case):
    m, k, n, sizes, tiling = GMM_CASES[case]
    lhs, rhs = _operands(m, k, n, len(sizes), jnp.float32)
    group_sizes = jnp.asarray(sizes, jnp.int32)
    out = gmm(lhs, rhs, group_sizes, tiling=tiling, **BACKEND)
    expected = jax.lax.ragged_dot(lhs, rhs, group_sizes, precision=jax.lax.Precision.HIGHEST)
    assert out.shape == (m, n) and out.dtype == jnp.float32
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("case", ["m_k_n_not_tile_multiples", "several_k_tiles_with_a_partial_one"])
def test_gmm_bf16_matches_ragged_dot_in_f32(case):
    m, k, n, sizes, tiling = GMM_CASES[case]
    lhs, rhs = _operands(m, k, n, len(sizes), jnp.bfloat16)
    group_sizes = jnp.asarray(sizes, jnp.int32)
    out = gmm(lhs, rhs, group_sizes, tiling=tiling, **BACKEND)
    expected = jax.lax.ragged_dot(lhs, rhs, group_sizes, preferred_element_type=jnp.float32)
    assert out.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(out, np.float32), expected, rtol=2e-2, atol=2e-1)


def test_gmm_bf16_inputs_accumulate_in_f32_when_asked():
    lhs, rhs = _operands(160, 256, 128, 2, jnp.bfloat16)
    group_sizes = jnp.asarray([100, 60], jnp.int32)
    out = gmm(lhs, rhs, group_sizes, preferred_element_type=jnp.float32, **BACKEND)
    expected = jax.lax.ragged_dot(lhs, rhs, group_sizes, preferred_element_type=jnp.float32)
    assert out.dtype == jnp.float32
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-4)


def test_gmm_transpose_rhs_contracts_the_last_dimension():
    m, k, n, sizes = 200, 200, 136, [50, 0, 120]
    lhs, rhs_gxnxk = _operands(m, k, n, len(sizes), jnp.float32, transpose_rhs=True)
    group_sizes = jnp.asarray(sizes, jnp.int32)
    out = gmm(lhs, rhs_gxnxk, group_sizes, transpose_rhs=True, **BACKEND)
    expected = jax.lax.ragged_dot(
        lhs, jnp.swapaxes(rhs_gxnxk, 1, 2), group_sizes, precision=jax.lax.Precision.HIGHEST)
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-4)


def test_gmm_group_offset_uses_local_groups_and_zeros_other_rows():
    m, k, n = 200, 128, 128
    sizes = np.array([30, 25, 0, 70, 40, 20], np.int32)
    offset, num_local = 2, 3
    lhs, rhs_local = _operands(m, k, n, num_local, jnp.float32)
    out = gmm(lhs, rhs_local, jnp.asarray(sizes), group_offset=jnp.int32(offset), **BACKEND)
    expected = numpy_gmm(lhs, rhs_local, sizes, offset)
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-4)
    local_first, local_last = 55, 165
    assert not np.asarray(out[:local_first]).any() and not np.asarray(out[local_last:]).any()


def test_tgmm_matches_per_group_products_and_zeros_empty_groups():
    m, k, n = 300, 200, 136
    sizes = np.array([0, 70, 1, 130, 0, 50], np.int32)
    lhs, _ = _operands(m, k, n, 1, jnp.float32, seed=1)
    rhs, _ = _operands(m, n, k, 1, jnp.float32, seed=2)
    out = tgmm(lhs, rhs, jnp.asarray(sizes), **BACKEND)
    expected = numpy_tgmm(lhs, rhs, sizes, 0, len(sizes))
    assert out.shape == (len(sizes), k, n)
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-4)
    assert not np.asarray(out[0]).any() and not np.asarray(out[4]).any()


def test_tgmm_with_group_offset_and_small_tiles():
    m, k, n = 96, 256, 128
    sizes = np.array([5, 3, 0, 20, 9, 40, 19], np.int32)
    offset, num_local = 1, 4
    lhs, _ = _operands(m, k, n, 1, jnp.float32, seed=3)
    rhs, _ = _operands(m, n, k, 1, jnp.float32, seed=4)
    out = tgmm(lhs, rhs, jnp.asarray(sizes), num_groups=num_local, group_offset=offset,
               tiling=(8, 128, 128), **BACKEND)
    expected = numpy_tgmm(lhs, rhs, sizes, offset, num_local)
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-4)


def test_tgmm_bf16_matches_f32_products():
    m, k, n = 160, 128, 256
    sizes = np.array([64, 0, 96], np.int32)
    lhs, _ = _operands(m, k, n, 1, jnp.bfloat16, seed=5)
    rhs, _ = _operands(m, n, k, 1, jnp.bfloat16, seed=6)
    out = tgmm(lhs, rhs, jnp.asarray(sizes), preferred_element_type=jnp.float32, **BACKEND)
    expected = numpy_tgmm(np.asarray(lhs, np.float32), np.asarray(rhs, np.float32), sizes, 0, 3)
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-3)


@pytest.mark.parametrize("transpose_rhs", [False, True])
def test_gmm_gradients_match_ragged_dot_autodiff(transpose_rhs):
    m, k, n = 200, 136, 200
    sizes = jnp.asarray([0, 90, 3, 80], jnp.int32)
    lhs, rhs = _operands(m, k, n, 4, jnp.float32, transpose_rhs=transpose_rhs)
    cotangent = jnp.asarray(np.random.default_rng(7).standard_normal((m, n)), jnp.float32)

    def loss_pallas(lhs, rhs):
        return jnp.sum(gmm(lhs, rhs, sizes, transpose_rhs=transpose_rhs, **BACKEND) * cotangent)

    def loss_reference(lhs, rhs):
        rhs_gxkxn = jnp.swapaxes(rhs, 1, 2) if transpose_rhs else rhs
        out = jax.lax.ragged_dot(lhs, rhs_gxkxn, sizes, precision=jax.lax.Precision.HIGHEST)
        return jnp.sum(out * cotangent)

    grads = jax.grad(loss_pallas, argnums=(0, 1))(lhs, rhs)
    expected = jax.grad(loss_reference, argnums=(0, 1))(lhs, rhs)
    for got, want in zip(grads, expected):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-4)


# --------------------------------------------------------------------------- lowering for TPU


LOWERING_TILINGS = [None, (256, 128, 128), (128, 256, 512)]


def _export_for_tpu(fn, *args):
    exported = jax.export.export(
        jax.jit(fn), platforms=["tpu"],
        disabled_checks=[jax.export.DisabledSafetyCheck.custom_call("tpu_custom_call")],
    )(*args)
    return exported.mlir_module()


def _bf16_structs(m=512, k=384, n=640, num_groups=8):
    return (
        jax.ShapeDtypeStruct((m, k), jnp.bfloat16),
        jax.ShapeDtypeStruct((num_groups, k, n), jnp.bfloat16),
        jax.ShapeDtypeStruct((num_groups,), jnp.int32),
    )


@pytest.mark.parametrize("tiling", LOWERING_TILINGS)
def test_gmm_lowers_to_a_mosaic_tpu_kernel(tiling):
    def forward(lhs, rhs, group_sizes):
        return gmm(lhs, rhs, group_sizes, tiling=tiling, backend="pallas_tpu", interpret=False)

    assert "tpu_custom_call" in _export_for_tpu(forward, *_bf16_structs())


@pytest.mark.parametrize("tiling", LOWERING_TILINGS)
def test_gmm_gradient_lowers_to_mosaic_tpu_kernels(tiling):
    def loss(lhs, rhs, group_sizes):
        out = gmm(lhs, rhs, group_sizes, tiling=tiling, backend="pallas_tpu", interpret=False)
        return jnp.sum(out.astype(jnp.float32))

    module = _export_for_tpu(jax.grad(loss, argnums=(0, 1)), *_bf16_structs())
    # dlhs (gmm with transposed rhs) and drhs (tgmm) are one kernel each.
    assert module.count("stablehlo.custom_call @tpu_custom_call") == 2


def test_gmm_with_partial_tiles_lowers_to_a_mosaic_tpu_kernel():
    def loss(lhs, rhs, group_sizes):
        out = gmm(lhs, rhs, group_sizes, backend="pallas_tpu", interpret=False)
        return jnp.sum(out.astype(jnp.float32))

    structs = _bf16_structs(m=300, k=200, n=136, num_groups=5)
    assert "tpu_custom_call" in _export_for_tpu(jax.value_and_grad(loss, argnums=(0, 1)), *structs)


# --------------------------------------------------------------------------- validation


@pytest.mark.parametrize("tiling", [(100, 128, 128), (128, 100, 128), (128, 128, 64)])
def test_tiling_off_the_8_by_128_grid_is_rejected(tiling):
    lhs, rhs = _operands(16, 128, 128, 1, jnp.float32)
    with pytest.raises(ValueError, match="tiling"):
        gmm(lhs, rhs, jnp.asarray([16], jnp.int32), tiling=tiling, **BACKEND)
