"""Pallas GPU (Triton) grouped matmul: interpret-mode numerics on CPU, Triton lowering for CUDA.

References are independent: ``jax.lax.ragged_dot`` (and its autodiff) or per-group NumPy in float64.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moejax import ops
from references import numpy_gmm, numpy_tgmm

GPU = dict(backend="pallas_gpu", interpret=True)
SMALL_TILES = (16, 16, 16)  # many row tiles, so group boundaries straddle tiles

# m = 150, k = 40, n = 24: no dimension is a multiple of 16.
GROUP_SIZE_CASES = {
    "mixed_with_empty_group": [23, 0, 41, 17, 50, 19],
    "all_rows_in_one_group": [0, 0, 150, 0],
    "first_and_last_group_empty": [0, 60, 33, 57, 0],
    "sum_below_m": [10, 5, 0, 30],
    "all_groups_empty": [0, 0, 0],
    "boundaries_inside_tiles": [1, 15, 17, 3, 33, 81],
}


def _normal(rng, shape, dtype=jnp.float32):
    return jnp.asarray(rng.standard_normal(shape), dtype)


def _gmm_operands(seed, m, k, n, sizes, dtype=jnp.float32):
    rng = np.random.default_rng(seed)
    return (_normal(rng, (m, k), dtype), _normal(rng, (len(sizes), k, n), dtype),
            jnp.asarray(sizes, jnp.int32))


# --------------------------------------------------------------------------- gmm numerics


@pytest.mark.parametrize("sizes", GROUP_SIZE_CASES.values(), ids=GROUP_SIZE_CASES.keys())
def test_gmm_matches_ragged_dot_on_adversarial_group_sizes(sizes):
    lhs, rhs, group_sizes = _gmm_operands(0, 150, 40, 24, sizes)
    out = ops.gmm(lhs, rhs, group_sizes, tiling=SMALL_TILES, **GPU)
    expected = jax.lax.ragged_dot(lhs, rhs, group_sizes)
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("seed", [1, 2])
def test_gmm_matches_ragged_dot_at_default_tiling_on_random_shapes(seed):
    rng = np.random.default_rng(seed)
    m, k, n = rng.integers(130, 260), rng.integers(17, 90), rng.integers(17, 150)
    g = int(rng.integers(2, 7))
    sizes = rng.multinomial(int(rng.integers(0, m + 1)), np.ones(g) / g)
    lhs, rhs, group_sizes = _gmm_operands(seed, m, k, n, sizes)
    out = jax.jit(lambda x, w, s: ops.gmm(x, w, s, **GPU))(lhs, rhs, group_sizes)
    expected = jax.lax.ragged_dot(lhs, rhs, group_sizes)
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5)


def test_gmm_rows_past_the_last_group_are_exactly_zero():
    lhs, rhs, group_sizes = _gmm_operands(3, 150, 40, 24, GROUP_SIZE_CASES["sum_below_m"])
    out = ops.gmm(lhs, rhs, group_sizes, tiling=SMALL_TILES, **GPU)
    np.testing.assert_array_equal(out[45:], 0.0)


@pytest.mark.parametrize("out_dtype, tol", [(jnp.bfloat16, 1e-2), (jnp.float32, 1e-4)])
def test_gmm_bf16_inputs_accumulate_in_f32(out_dtype, tol):
    lhs, rhs, group_sizes = _gmm_operands(4, 150, 40, 24, [30, 0, 70, 50], jnp.bfloat16)
    out = ops.gmm(lhs, rhs, group_sizes, preferred_element_type=out_dtype, **GPU)
    expected = jax.lax.ragged_dot(lhs.astype(jnp.float32), rhs.astype(jnp.float32), group_sizes)
    assert out.dtype == out_dtype
    np.testing.assert_allclose(out.astype(jnp.float32), expected, rtol=tol, atol=tol)


def test_gmm_transpose_rhs_contracts_the_last_dimension_of_rhs():
    lhs, rhs, group_sizes = _gmm_operands(5, 150, 40, 24, [40, 33, 0, 77])
    rhs_gxnxk = jnp.swapaxes(rhs, 1, 2)
    out = ops.gmm(lhs, rhs_gxnxk, group_sizes, transpose_rhs=True, tiling=SMALL_TILES, **GPU)
    expected = jax.lax.ragged_dot(lhs, rhs, group_sizes)
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "sizes, offset, num_local",
    [([20, 31, 0, 44, 25, 30], 2, 3),
     ([20, 31, 0, 44, 25, 30], 0, 2),
     ([20, 31, 0, 44, 25, 10], 3, 3),
     ([70, 0, 0, 80], 1, 2)],
    ids=["middle_groups", "leading_groups", "trailing_groups_and_rows_past_sum",
         "only_empty_groups"],
)
def test_gmm_with_group_offset_uses_local_groups_and_zeroes_the_rest(sizes, offset, num_local):
    lhs, rhs, group_sizes = _gmm_operands(6, 150, 40, 24, sizes)
    rhs_local = rhs[offset:offset + num_local]
    out = ops.gmm(lhs, rhs_local, group_sizes, group_offset=offset, tiling=SMALL_TILES, **GPU)
    np.testing.assert_allclose(out, numpy_gmm(lhs, rhs_local, sizes, offset),
                               rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------- tgmm numerics


@pytest.mark.parametrize("tiling", [SMALL_TILES, None], ids=["small_tiles", "default_tiling"])
def test_tgmm_matches_per_group_numpy_including_empty_groups(tiling):
    rng = np.random.default_rng(7)
    sizes = [0, 37, 0, 50, 20, 0]  # sum 107 < m = 150
    lhs, rhs = _normal(rng, (150, 40)), _normal(rng, (150, 24))
    out = ops.tgmm(lhs, rhs, jnp.asarray(sizes, jnp.int32), tiling=tiling, **GPU)
    np.testing.assert_allclose(out, numpy_tgmm(lhs, rhs, sizes, 0, 6), rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(out[np.asarray(sizes) == 0], 0.0)


def test_tgmm_with_group_offset_returns_only_the_local_groups():
    rng = np.random.default_rng(8)
    sizes = [20, 31, 0, 44, 25, 30]
    lhs, rhs = _normal(rng, (150, 40)), _normal(rng, (150, 24))
    out = ops.tgmm(lhs, rhs, jnp.asarray(sizes, jnp.int32), group_offset=1, num_groups=3,
                   tiling=SMALL_TILES, **GPU)
    np.testing.assert_allclose(out, numpy_tgmm(lhs, rhs, sizes, 1, 3), rtol=1e-5, atol=1e-5)


def test_tgmm_bf16_inputs_accumulate_in_f32():
    rng = np.random.default_rng(9)
    sizes = [60, 0, 90]
    lhs, rhs = _normal(rng, (150, 40), jnp.bfloat16), _normal(rng, (150, 24), jnp.bfloat16)
    out = ops.tgmm(lhs, rhs, jnp.asarray(sizes, jnp.int32), preferred_element_type=jnp.float32,
                   **GPU)
    np.testing.assert_allclose(out, numpy_tgmm(lhs.astype(jnp.float32), rhs.astype(jnp.float32),
                                                sizes, 0, 3), rtol=1e-4, atol=1e-4)


# --------------------------------------------------------------------------- gradients


@pytest.mark.parametrize("transpose_rhs", [False, True])
def test_gmm_gradients_match_ragged_dot_autodiff(transpose_rhs):
    sizes = [23, 0, 41, 50, 19]  # sum 133 < m: rows past it get no gradient
    lhs, rhs, group_sizes = _gmm_operands(10, 150, 40, 24, sizes)
    dout = _normal(np.random.default_rng(11), (150, 24))
    rhs_arg = jnp.swapaxes(rhs, 1, 2) if transpose_rhs else rhs

    def loss(x, w):
        out = ops.gmm(x, w, group_sizes, transpose_rhs=transpose_rhs, tiling=SMALL_TILES, **GPU)
        return jnp.sum(out * dout)

    def reference_loss(x, w):
        w_gxkxn = jnp.swapaxes(w, 1, 2) if transpose_rhs else w
        return jnp.sum(jax.lax.ragged_dot(x, w_gxkxn, group_sizes) * dout)

    dlhs, drhs = jax.grad(loss, argnums=(0, 1))(lhs, rhs_arg)
    dlhs_ref, drhs_ref = jax.grad(reference_loss, argnums=(0, 1))(lhs, rhs_arg)
    np.testing.assert_allclose(dlhs, dlhs_ref, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(drhs, drhs_ref, rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------- Triton lowering


def _triton_kernels_for_cuda(fn, *args):
    """Exports ``fn`` for CUDA and returns ``{kernel name: Triton module text}`` per Triton call.

    Each kernel's Triton IR is re-parsed, which runs the MLIR verifier: ill-typed IR (which the
    export itself does not reject) fails here instead of inside XLA on a GPU.
    """
    # Private modules: jax exposes no public way to parse the Triton dialect.
    from jax._src.interpreters import mlir as jax_mlir
    from jax._src.lib.mlir import ir
    from jaxlib.triton import dialect as triton_dialect

    exported = jax.export.export(
        jax.jit(fn), platforms=["cuda"],
        disabled_checks=[jax.export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")],
    )(*args)
    calls = []
    with jax_mlir.make_ir_context():
        def collect(op):
            if (op.name == "stablehlo.custom_call"
                    and ir.StringAttr(op.attributes["call_target_name"]).value
                    == "__gpu$xla.gpu.triton"):
                config = ir.DictAttr(op.attributes["mhlo.backend_config"])
                calls.append((ir.StringAttr(config["name"]).value,
                              ir.StringAttr(config["ir"]).value_bytes))
            return ir.WalkResult.ADVANCE

        ir.Module.parse(exported.mlir_module()).operation.walk(collect)
    context = ir.Context()
    context.append_dialect_registry(jax_mlir.upstream_dialects)
    triton_dialect.register_dialect(context)
    context.load_all_available_dialects()
    kernels = []
    with context, ir.Location.unknown():
        for name, bytecode in calls:
            kernels.append((name, str(ir.Module.parse(bytecode))))
    return kernels


@pytest.mark.parametrize(
    "dtype, tiling",
    [(jnp.bfloat16, None), (jnp.bfloat16, (64, 32, 64)), (jnp.bfloat16, (128, 64, 256)),
     (jnp.float32, None)],
    ids=["bf16_default", "bf16_64x32x64", "bf16_128x64x256", "f32_default"],
)
def test_gmm_and_its_gradient_lower_to_valid_triton_kernels_for_cuda(dtype, tiling):
    def loss(lhs, rhs, group_sizes):
        out = ops.gmm(lhs, rhs, group_sizes, tiling=tiling, backend="pallas_gpu", interpret=False)
        return jnp.sum(out.astype(jnp.float32))

    kernels = _triton_kernels_for_cuda(
        jax.value_and_grad(loss, argnums=(0, 1)),
        jax.ShapeDtypeStruct((1000, 200), dtype),
        jax.ShapeDtypeStruct((8, 200, 300), dtype),
        jax.ShapeDtypeStruct((8,), jnp.int32),
    )
    # Forward gmm, dlhs (gmm with transposed rhs) and drhs (tgmm), each a Triton kernel whose
    # k (or row) loop is an scf.for around a tt.dot.
    assert sorted(name for name, _ in kernels) == ["moejax_gmm", "moejax_gmm", "moejax_tgmm"]
    for _, module in kernels:
        assert "scf.for" in module and "tt.dot" in module


def test_gmm_on_tile_multiples_with_traced_group_offset_lowers_to_triton_for_cuda():
    def local_gmm(lhs, rhs_local, group_sizes, offset):
        return ops.gmm(lhs, rhs_local, group_sizes, group_offset=offset, backend="pallas_gpu",
                       interpret=False)

    kernels = _triton_kernels_for_cuda(
        local_gmm,
        jax.ShapeDtypeStruct((512, 256), jnp.bfloat16),
        jax.ShapeDtypeStruct((2, 256, 128), jnp.bfloat16),
        jax.ShapeDtypeStruct((8,), jnp.int32),
        jax.ShapeDtypeStruct((), jnp.int32),
    )
    assert [name for name, _ in kernels] == ["moejax_gmm"]


# --------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    "tiling",
    [(24, 16, 16), (8, 16, 16), (16, 16, 512), (256, 256, 256)],
    ids=["not_power_of_two", "below_16", "above_256", "exceeds_shared_memory"],
)
def test_bad_tiling_raises_value_error_naming_tiling(tiling):
    lhs, rhs, group_sizes = _gmm_operands(12, 64, 32, 32, [32, 32])
    with pytest.raises(ValueError, match="tiling"):
        ops.gmm(lhs, rhs, group_sizes, tiling=tiling, **GPU)
    with pytest.raises(ValueError, match="tiling"):
        ops.tgmm(lhs, lhs, group_sizes, tiling=tiling, **GPU)
