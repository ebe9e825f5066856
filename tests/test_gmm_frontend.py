"""The gmm/tgmm front end: argument checking, backend choice and the shared custom VJP."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moejax.ops import gmm, tgmm
from moejax.ops.gmm import resolve_backend
from references import numpy_gmm, numpy_tgmm


@pytest.fixture
def problem():
    rng = np.random.default_rng(0)
    lhs = rng.standard_normal((37, 5)).astype(np.float32)
    rhs = rng.standard_normal((4, 5, 7)).astype(np.float32)
    sizes = np.array([10, 0, 20, 3], np.int32)
    return lhs, rhs, sizes


def test_reference_backend_matches_numpy_and_zeroes_rows_past_the_sum(problem):
    lhs, rhs, sizes = problem
    out = gmm(jnp.asarray(lhs), jnp.asarray(rhs), jnp.asarray(sizes), backend="reference")
    np.testing.assert_allclose(out, numpy_gmm(lhs, rhs, sizes), rtol=1e-5, atol=1e-5)
    assert np.all(np.asarray(out)[33:] == 0)


def test_group_offset_zeroes_rows_of_groups_not_held(problem):
    lhs, rhs, sizes = problem
    out = gmm(jnp.asarray(lhs), jnp.asarray(rhs[1:3]), jnp.asarray(sizes), group_offset=1,
              backend="reference")
    np.testing.assert_allclose(out, numpy_gmm(lhs, rhs[1:3], sizes, offset=1), rtol=1e-5, atol=1e-5)


def test_tgmm_reference_matches_numpy_with_offset(problem):
    lhs, _, sizes = problem
    rhs = np.random.default_rng(1).standard_normal((37, 6)).astype(np.float32)
    out = tgmm(jnp.asarray(lhs), jnp.asarray(rhs), jnp.asarray(sizes), group_offset=1, num_groups=2,
               backend="reference")
    np.testing.assert_allclose(out, numpy_tgmm(lhs, rhs, sizes, 1, 2), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("transpose_rhs", [False, True])
def test_custom_vjp_matches_ragged_dot_autodiff(problem, transpose_rhs):
    lhs, rhs, sizes = map(jnp.asarray, problem)
    w = jnp.swapaxes(rhs, 1, 2) if transpose_rhs else rhs
    cot = jnp.asarray(np.random.default_rng(2).standard_normal((37, 7)), jnp.float32)

    def ours(a, b):
        return jnp.sum(gmm(a, b, sizes, transpose_rhs=transpose_rhs, backend="reference") * cot)

    def oracle(a, b):
        b = jnp.swapaxes(b, 1, 2) if transpose_rhs else b
        return jnp.sum(jax.lax.ragged_dot(a, b, sizes) * cot)

    for got, want in zip(jax.grad(ours, (0, 1))(lhs, w), jax.grad(oracle, (0, 1))(lhs, w)):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_tgmm_is_differentiable(problem):
    lhs, _, sizes = map(jnp.asarray, problem)
    rhs = jnp.asarray(np.random.default_rng(3).standard_normal((37, 6)), jnp.float32)

    def loss(a, b):
        return jnp.sum(tgmm(a, b, sizes, backend="reference") ** 2)

    def oracle(a, b):
        groups = jnp.repeat(jnp.arange(4), sizes, total_repeat_length=37)
        valid = jnp.arange(37) < jnp.sum(sizes)
        onehot = (groups[:, None] == jnp.arange(4)[None, :]) & valid[:, None]
        return jnp.sum(jnp.einsum("mg,mk,mn->gkn", onehot.astype(a.dtype), a, b) ** 2)

    for got, want in zip(jax.grad(loss, (0, 1))(lhs, rhs), jax.grad(oracle, (0, 1))(lhs, rhs)):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


def test_preferred_element_type_sets_the_output_dtype(problem):
    lhs, rhs, sizes = problem
    out = gmm(jnp.asarray(lhs, jnp.bfloat16), jnp.asarray(rhs, jnp.bfloat16), jnp.asarray(sizes),
              preferred_element_type=jnp.float32, backend="reference")
    assert out.dtype == jnp.float32


def test_auto_backend_on_cpu_is_the_cpu_path():
    assert resolve_backend("auto") == "cpu"


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(lhs=np.zeros((4, 3, 1))), "lhs must have rank 2"),
        (dict(rhs=np.zeros((3, 5))), "rhs must have rank 3"),
        (dict(sizes=np.array([4.0, 4.0], np.float32)), "group_sizes must be int32"),
        (dict(sizes=np.array([[2, 2]], np.int32)), "group_sizes must have rank 1"),
        (dict(sizes=np.array([5, -1], np.int32)), "group_sizes must be >= 0"),
        (dict(sizes=np.array([5, 5], np.int32)), "exceeds the number of rows m = 8"),
        (dict(rhs=np.zeros((2, 4, 5), np.float32)), "contraction sizes differ"),
        (dict(rhs=np.zeros((3, 3, 5), np.float32)), "rhs holds 3 groups but group_sizes has 2"),
        (dict(lhs=np.zeros((8, 3), np.int32)), "lhs must have a floating dtype"),
        (dict(backend="tpu"), "backend must be one of"),
        (dict(tiling=(8, 128)), "tiling must be three positive ints"),
    ],
)
def test_bad_input_names_the_argument(kwargs, match):
    args = dict(lhs=np.zeros((8, 3), np.float32), rhs=np.zeros((2, 3, 5), np.float32),
                sizes=np.array([4, 4], np.int32), backend="reference", tiling=None)
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        gmm(jnp.asarray(args["lhs"]), jnp.asarray(args["rhs"]), jnp.asarray(args["sizes"]),
            backend=args["backend"], tiling=args["tiling"])


def test_group_offset_out_of_range_is_rejected():
    with pytest.raises(ValueError, match="group_offset = 2"):
        gmm(jnp.zeros((8, 3)), jnp.zeros((2, 3, 5)), jnp.array([2, 2, 2], jnp.int32),
            group_offset=2, backend="reference")


def test_tgmm_rows_must_agree():
    with pytest.raises(ValueError, match="same rows m"):
        tgmm(jnp.zeros((8, 3)), jnp.zeros((7, 5)), jnp.array([4, 4], jnp.int32),
             backend="reference")
