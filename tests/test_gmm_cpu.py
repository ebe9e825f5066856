"""The XLA-only CPU backend of gmm/tgmm (``backend="cpu"``) against ragged_dot and NumPy."""

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from moejax.kernels import cpu
from moejax.ops import gmm, tgmm
from references import numpy_gmm, numpy_tgmm

# (m, k, n, groups, tiling): m, k, n are not multiples of the chunk sizes; tm=16 forces many chunks;
# m=5 is below the smallest chunk size; m=700 has groups of several whole 512-row chunks and tgmm's
# closing chunks of every size.
SHAPES = [
    (37, 5, 11, 4, (16, 128, 128)),
    (700, 6, 5, 3, None),
    (130, 24, 40, 6, None),
    (5, 3, 4, 2, None),
]

_gmm = jax.jit(
    functools.partial(gmm, backend="cpu"),
    static_argnames=("transpose_rhs", "preferred_element_type", "tiling"),
)
_tgmm = jax.jit(
    functools.partial(tgmm, backend="cpu"),
    static_argnames=("num_groups", "preferred_element_type", "tiling"),
)


@st.composite
def group_sizes(draw, m, g):
    """Adversarial group sizes: all zero, one group holding every row, empty ends, sum < m, random."""
    kind = draw(st.sampled_from(["random", "zeros", "one_holds_all", "empty_ends", "short"]))
    if kind == "zeros":
        sizes = [0] * g
    elif kind == "one_holds_all":
        sizes = [0] * g
        sizes[draw(st.integers(0, g - 1))] = m
    elif kind == "empty_ends" and g >= 3:
        cuts = sorted(draw(st.lists(st.integers(0, m), min_size=g - 3, max_size=g - 3)))
        sizes = [0] + list(np.diff([0, *cuts, m])) + [0]
    elif kind == "empty_ends":
        sizes = [0] * (g - 1) + [m]
    else:
        cuts = sorted(draw(st.lists(st.integers(0, m), min_size=g, max_size=g)))
        sizes = list(np.diff([0, *cuts]))  # sum = largest cut <= m
        if kind == "short":
            sizes = [s // 2 for s in sizes]
    return np.asarray(sizes, np.int32)


@st.composite
def problems(draw):
    m, k, n, g, tiling = draw(st.sampled_from(SHAPES))
    sizes = draw(group_sizes(m, g))
    seed = draw(st.integers(0, 2**16))
    rng = np.random.default_rng(seed)
    lhs = rng.standard_normal((m, k)).astype(np.float32)
    rhs = rng.standard_normal((g, k, n)).astype(np.float32)
    return lhs, rhs, sizes, tiling, rng


def _ragged_dot(lhs, rhs, sizes):
    return jax.lax.ragged_dot(jnp.asarray(lhs), jnp.asarray(rhs), jnp.asarray(sizes),
                              precision=jax.lax.Precision.HIGHEST)


@given(problems())
def test_gmm_matches_ragged_dot(problem):
    lhs, rhs, sizes, tiling, _ = problem
    out = _gmm(jnp.asarray(lhs), jnp.asarray(rhs), jnp.asarray(sizes), tiling=tiling)
    np.testing.assert_allclose(out, _ragged_dot(lhs, rhs, sizes), rtol=1e-5, atol=1e-5)


@given(problems())
def test_gmm_rows_past_the_sum_of_group_sizes_are_exactly_zero(problem):
    lhs, rhs, sizes, tiling, _ = problem
    out = np.asarray(_gmm(jnp.asarray(lhs), jnp.asarray(rhs), jnp.asarray(sizes), tiling=tiling))
    assert np.all(out[int(sizes.sum()):] == 0)


@given(problems())
def test_gmm_with_transposed_rhs_matches_ragged_dot(problem):
    lhs, rhs, sizes, tiling, _ = problem
    rhs_t = jnp.swapaxes(jnp.asarray(rhs), 1, 2)
    out = _gmm(jnp.asarray(lhs), rhs_t, jnp.asarray(sizes), transpose_rhs=True, tiling=tiling)
    np.testing.assert_allclose(out, _ragged_dot(lhs, rhs, sizes), rtol=1e-5, atol=1e-5)


@given(problems())
def test_gmm_bf16_matches_ragged_dot_to_bf16_precision(problem):
    lhs, rhs, sizes, tiling, _ = problem
    lhs16, rhs16 = jnp.asarray(lhs, jnp.bfloat16), jnp.asarray(rhs, jnp.bfloat16)
    out = _gmm(lhs16, rhs16, jnp.asarray(sizes), tiling=tiling)
    assert out.dtype == jnp.bfloat16
    want = _ragged_dot(lhs16.astype(jnp.float32), rhs16.astype(jnp.float32), sizes)
    np.testing.assert_allclose(out.astype(jnp.float32), want, rtol=2e-2, atol=2e-2)


@given(problems(), st.data())
def test_gmm_with_group_offset_computes_only_the_local_groups(problem, data):
    lhs, rhs, sizes, tiling, _ = problem
    num_local = 2
    offset = data.draw(st.integers(0, len(sizes) - num_local))
    local_rhs = rhs[offset:offset + num_local]
    out = _gmm(jnp.asarray(lhs), jnp.asarray(local_rhs), jnp.asarray(sizes),
               group_offset=jnp.int32(offset), tiling=tiling)
    np.testing.assert_allclose(out, numpy_gmm(lhs, local_rhs, sizes, offset), rtol=1e-5, atol=1e-5)


@given(problems())
def test_tgmm_matches_per_group_numpy_and_empty_groups_are_zero(problem):
    lhs, _, sizes, tiling, rng = problem
    rhs = rng.standard_normal((lhs.shape[0], 9)).astype(np.float32)
    out = _tgmm(jnp.asarray(lhs), jnp.asarray(rhs), jnp.asarray(sizes), tiling=tiling)
    # f32 sums over up to m rows: the rounding error grows with m.
    np.testing.assert_allclose(out, numpy_tgmm(lhs, rhs, sizes, 0, len(sizes)),
                               rtol=1e-5, atol=1e-5 * max(1, lhs.shape[0] / 128))
    assert np.all(np.asarray(out)[sizes == 0] == 0)


@pytest.mark.parametrize("tiling", [None, (64, 128, 128)])
def test_tgmm_groups_of_whole_chunks_and_every_closing_size(tiling):
    # Whole multiples of the chunk (no closing remainder), remainders on and next to the closing
    # sizes (multiples of 32), a 1-row group, and rows past the last group.
    sizes = np.asarray([1024, 0, 32, 33, 1, 511, 64, 31, 128, 96], np.int32)
    rng = np.random.default_rng(7)
    lhs = rng.standard_normal((int(sizes.sum()) + 4, 6)).astype(np.float32)
    rhs = rng.standard_normal((lhs.shape[0], 5)).astype(np.float32)
    out = _tgmm(jnp.asarray(lhs), jnp.asarray(rhs), jnp.asarray(sizes), tiling=tiling)
    np.testing.assert_allclose(out, numpy_tgmm(lhs, rhs, sizes, 0, len(sizes)),
                               rtol=1e-5, atol=1e-4)


@given(problems(), st.data())
def test_tgmm_with_group_offset_returns_only_the_local_groups(problem, data):
    lhs, _, sizes, tiling, rng = problem
    rhs = rng.standard_normal((lhs.shape[0], 9)).astype(np.float32)
    num_local = 2
    offset = data.draw(st.integers(0, len(sizes) - num_local))
    out = _tgmm(jnp.asarray(lhs), jnp.asarray(rhs), jnp.asarray(sizes),
                group_offset=jnp.int32(offset), num_groups=num_local, tiling=tiling)
    np.testing.assert_allclose(out, numpy_tgmm(lhs, rhs, sizes, offset, num_local),
                               rtol=1e-5, atol=1e-5 * max(1, lhs.shape[0] / 128))


def test_tgmm_bf16_accumulates_in_f32():
    rng = np.random.default_rng(0)
    lhs = rng.standard_normal((300, 8)).astype(np.float32)
    rhs = rng.standard_normal((300, 6)).astype(np.float32)
    sizes = np.array([290, 0, 10], np.int32)
    lhs16, rhs16 = jnp.asarray(lhs, jnp.bfloat16), jnp.asarray(rhs, jnp.bfloat16)
    out = _tgmm(lhs16, rhs16, jnp.asarray(sizes), preferred_element_type=jnp.float32,
                tiling=(16, 128, 128))
    want = numpy_tgmm(lhs16.astype(jnp.float32), rhs16.astype(jnp.float32), sizes, 0, 3)
    np.testing.assert_allclose(out, want, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("transpose_rhs", [False, True])
def test_gradients_match_ragged_dot_autodiff(transpose_rhs):
    rng = np.random.default_rng(3)
    m, k, n = 37, 5, 11
    lhs = jnp.asarray(rng.standard_normal((m, k)), jnp.float32)
    rhs = jnp.asarray(rng.standard_normal((4, k, n)), jnp.float32)
    sizes = jnp.asarray([10, 0, 20, 3], jnp.int32)
    cot = jnp.asarray(rng.standard_normal((m, n)), jnp.float32)
    w = jnp.swapaxes(rhs, 1, 2) if transpose_rhs else rhs

    def ours(a, b):
        out = gmm(a, b, sizes, transpose_rhs=transpose_rhs, tiling=(8, 128, 128), backend="cpu")
        return jnp.sum(out * cot)

    def oracle(a, b):
        b = jnp.swapaxes(b, 1, 2) if transpose_rhs else b
        return jnp.sum(jax.lax.ragged_dot(a, b, sizes, precision=jax.lax.Precision.HIGHEST) * cot)

    grads = jax.jit(jax.grad(ours, (0, 1)))(lhs, w)
    for got, want in zip(grads, jax.jit(jax.grad(oracle, (0, 1)))(lhs, w)):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_one_compilation_serves_every_group_sizes_and_offset():
    rng = np.random.default_rng(4)
    lhs = jnp.asarray(rng.standard_normal((40, 6)), jnp.float32)
    rhs = jnp.asarray(rng.standard_normal((3, 6, 5)), jnp.float32)
    traces = []

    @jax.jit
    def f(local_rhs, sizes, offset):
        traces.append(None)
        return gmm(lhs, local_rhs, sizes, group_offset=offset, backend="cpu")

    for sizes, offset in [([5, 30, 5], 0), ([0, 0, 40], 1), ([12, 0, 1], 1)]:
        sizes = np.asarray(sizes, np.int32)
        out = f(rhs[offset:offset + 2], jnp.asarray(sizes), jnp.int32(offset))
        np.testing.assert_allclose(out, numpy_gmm(lhs, rhs[offset:offset + 2], sizes, offset),
                                   rtol=1e-5, atol=1e-5)
    assert len(traces) == 1


def test_scratch_memory_stays_linear_not_groups_times_rows():
    # ragged_dot on CPU needs [g, m, k] scratch (about 8x the bound here); this backend needs no
    # more than its operands' size.
    m, k, n, g = 256, 32, 24, 32
    args = (jnp.zeros((m, k)), jnp.zeros((g, k, n)), jnp.zeros((g,), jnp.int32))
    bound = 4 * (m * k + m * n + g * k * n)
    ours = functools.partial(gmm, tiling=(16, 128, 128), backend="cpu")
    forward = jax.jit(ours)
    both = jax.jit(jax.value_and_grad(lambda a, b, s: ours(a, b, s).sum(), (0, 1)))
    for fn in (forward, both):
        assert fn.lower(*args).compile().memory_analysis().temp_size_in_bytes <= bound


def _big_copies(hlo_text, min_elements):
    """Shapes of the ``copy`` instructions with at least ``min_elements`` in optimized HLO."""
    shapes = re.findall(r"= f32\[([\d,]+)\]\S* copy\(", hlo_text)
    return [s for s in shapes if np.prod([int(d) for d in s.split(",")]) >= min_elements]


def test_two_layer_ffn_gradient_copies_no_output_sized_buffer():
    # Every gmm/tgmm output starts as zeros updated in place by a loop. Zeros that XLA merged
    # into one buffer would be copied once per loop: more memory written (and on the CPU faulted
    # in afresh) on every call.
    m, d, f, g = 96, 16, 16, 4
    x, sizes = jnp.zeros((m, d)), jnp.asarray([30, 0, 50, 16], jnp.int32)
    w_in, w_out = jnp.zeros((g, d, f)), jnp.zeros((g, f, d))

    def loss(x, w_in, w_out):
        h = jax.nn.relu(gmm(x, w_in, sizes, tiling=(16, 128, 128), backend="cpu"))
        return jnp.sum(gmm(h, w_out, sizes, tiling=(16, 128, 128), backend="cpu") ** 2)

    step = jax.jit(jax.value_and_grad(loss, (0, 1, 2)))
    assert _big_copies(step.lower(x, w_in, w_out).compile().as_text(), g * d * f) == []


_chunk_plan = jax.jit(cpu.chunk_plan, static_argnums=(2, 3, 4))


@given(st.lists(st.integers(0, 700), min_size=6, max_size=6), st.sampled_from([512, 16, 100]))
def test_chunks_cover_each_group_and_stay_inside_it_unless_the_group_is_smaller(sizes, tm):
    sizes = np.asarray(sizes, np.int32)
    m = 6 * 700 + 3
    plan = _chunk_plan(jnp.asarray(sizes), 0, len(sizes), m, tm)
    counts, firsts = np.asarray(plan.counts), np.asarray(plan.firsts)
    for g, (start, end) in enumerate(zip(np.asarray(plan.starts_G), np.asarray(plan.ends_G))):
        covered = np.zeros(m, bool)
        for c, count_G, first_G in zip(plan.sizes, counts, firsts):
            for j in range(count_G[g]):
                row = min(max(min(first_G[g] + j * c, end - c), 0), m - c)
                if end - start >= plan.sizes[-1]:
                    assert start <= row and row + c <= end
                covered[row:row + c] = True
        assert covered[start:end].all()
        computed = sum(count_G[g] * c for c, count_G in zip(plan.sizes, counts))
        assert computed < 2 * (end - start) + plan.sizes[-1]


def test_chunks_that_run_into_later_groups_or_past_the_local_rows():
    # m = 300, tm = 64, sizes 10, 0, 45, 200, 20 (sum 275): groups smaller than a chunk next to
    # other groups, a group of several whole chunks and a remainder, and the last local group
    # followed by rows of non-local groups (offsets 1 and 2) or of no group (rows 275-299), which
    # must stay 0 whatever chunk covers the group.
    m, k, n = 300, 7, 5
    sizes = np.asarray([10, 0, 45, 200, 20], np.int32)
    lhs = jax.random.normal(jax.random.key(0), (m, k))
    rhs_all = jax.random.normal(jax.random.key(1), (5, k, n))
    for offset, num_local in [(0, 5), (1, 3), (2, 1)]:
        rhs = rhs_all[offset:offset + num_local]
        for transpose_rhs in (False, True):
            r = jnp.swapaxes(rhs, 1, 2) if transpose_rhs else rhs
            out = _gmm(lhs, r, jnp.asarray(sizes), group_offset=offset, tiling=(64, 128, 128),
                       transpose_rhs=transpose_rhs)
            want = np.zeros((m, n), np.float32)
            ends = np.cumsum(sizes)
            for g in range(offset, offset + num_local):
                rows = slice(ends[g] - sizes[g], ends[g])
                want[rows] = np.asarray(lhs)[rows] @ np.asarray(rhs_all[g])
            np.testing.assert_allclose(np.asarray(out), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("sizes", [[40, 0, 77, 3, 100], [0, 0, 220, 0, 0], [5, 9, 0, 30, 11]])
def test_gathered_operands_equal_gathering_first(sizes):
    # lhs_rows / rhs_rows: each chunk gathers its rows; equal to the kernels on x[idx] (the same
    # rows, so the same matmuls: bit for bit), for both rhs layouts and rows past sum(sizes).
    m, t, k, n = 220, 150, 9, 6
    sizes = jnp.asarray(sizes, jnp.int32)
    x = jax.random.normal(jax.random.key(0), (t, k))
    d = jax.random.normal(jax.random.key(1), (t, n))
    idx = jax.random.randint(jax.random.key(2), (m,), 0, t, jnp.int32)
    w = jax.random.normal(jax.random.key(3), (5, k, n))
    tiling = (32, 128, 128)
    kw = dict(preferred_element_type=jnp.float32, tiling=tiling, interpret=None)
    gathered = jax.jit(lambda x, w, idx: cpu.gmm(x, w, sizes, 0, transpose_rhs=False,
                                                  lhs_rows=idx, **kw))(x, w, idx)
    np.testing.assert_array_equal(gathered, cpu.gmm(x[idx], w, sizes, 0, transpose_rhs=False, **kw))
    np.testing.assert_allclose(gathered, numpy_gmm(x[idx], w, sizes), rtol=1e-5, atol=1e-5)
    # transpose_rhs: d[idx] · w[e]ᵀ, contracting with w's last axis.
    gathered_t = cpu.gmm(d, w, sizes, 0, transpose_rhs=True, lhs_rows=idx, **kw)
    np.testing.assert_array_equal(gathered_t, cpu.gmm(d[idx], w, sizes, 0, transpose_rhs=True, **kw))
    want = cpu.tgmm(x[idx], d[idx], sizes, 0, num_groups=5, **kw)
    np.testing.assert_array_equal(
        cpu.tgmm(x, d[idx], sizes, 0, num_groups=5, lhs_rows=idx, **kw), want)
    np.testing.assert_array_equal(
        cpu.tgmm(x[idx], d, sizes, 0, num_groups=5, rhs_rows=idx, **kw), want)
    np.testing.assert_allclose(want, numpy_tgmm(x[idx], d[idx], sizes, 0, 5), rtol=1e-5,
                               atol=1e-5)


def test_gathered_operands_when_only_the_row_index_varies_under_a_shard_map():
    # Replicated lhs, rhs and group sizes; the row index differs per device. The output and the
    # loop carries must vary with the index (check_vma), and each device equals its own call.
    m, t, k, n, shards = 64, 40, 8, 5, 4
    sizes = jnp.asarray([20, 0, 30, 14], jnp.int32)
    x = jax.random.normal(jax.random.key(0), (t, k))
    d = jax.random.normal(jax.random.key(1), (t, n))
    w = jax.random.normal(jax.random.key(2), (4, k, n))
    idx = jax.random.randint(jax.random.key(3), (shards * m,), 0, t, jnp.int32)
    kw = dict(preferred_element_type=jnp.float32, tiling=(16, 128, 128), interpret=None)
    P = jax.sharding.PartitionSpec
    mesh = jax.make_mesh((shards,), ("data",), devices=jax.devices()[:shards])

    def local(x, d, w, idx):
        out = cpu.gmm(x, w, sizes, 0, transpose_rhs=False, lhs_rows=idx, **kw)
        grads = cpu.tgmm(x, d, sizes, 0, num_groups=4, lhs_rows=idx, rhs_rows=idx, **kw)
        return out, grads[None]

    out, grads = jax.jit(jax.shard_map(local, mesh=mesh, in_specs=(P(), P(), P(), P("data")),
                                       out_specs=(P("data"), P("data")), check_vma=True))(
        x, d, w, jax.device_put(idx, jax.sharding.NamedSharding(mesh, P("data"))))
    out, grads = np.asarray(out), np.asarray(grads)
    for i in range(shards):
        rows = idx[i * m:(i + 1) * m]
        np.testing.assert_allclose(out[i * m:(i + 1) * m],
                                   numpy_gmm(x[rows], w, sizes), rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(grads[i], numpy_tgmm(x[rows], d[rows], sizes, 0, 4),
                                   rtol=1e-5, atol=1e-5)


def _numpy_scattered(lhs, rhs, sizes, dest, scale, num_out, offset=0, num_local=None,
                     transpose_rhs=False):
    """out[dest[r]] += scale[r] · lhs[r] @ rhs[g - offset] over the rows r of the local groups g."""
    lhs, rhs = np.asarray(lhs, np.float64), np.asarray(rhs, np.float64)
    sizes = np.asarray(sizes)
    num_local = len(sizes) if num_local is None else num_local
    out = np.zeros((num_out, rhs.shape[1] if transpose_rhs else rhs.shape[2]))
    ends = np.cumsum(sizes)
    for g in range(offset, offset + num_local):
        w = rhs[g - offset].T if transpose_rhs else rhs[g - offset]
        for r in range(ends[g] - sizes[g], ends[g]):
            out[dest[r]] += scale[r] * (lhs[r] @ w)
    return out


# Groups below the smallest chunk (8 rows), groups of whole chunks plus a remainder (overlapping
# end-aligned chunks), empty groups, rows past sum(sizes) (m = 220).
@pytest.mark.parametrize("sizes", [[40, 0, 77, 3, 100], [0, 0, 220, 0, 0], [5, 9, 0, 30, 11],
                                   [1, 2, 3, 4, 5]])
@pytest.mark.parametrize("transpose_rhs", [False, True])
def test_rows_added_to_their_destinations(sizes, transpose_rhs):
    # out_rows / out_scale: every row of a local group is added once, scaled, to its destination
    # (several rows share destinations, as a token's k copies do; overlapping chunks must not add
    # a row twice), rows of other groups and past sum(sizes) are not added.
    m, t, k, n, num_out = 220, 150, 9, 6, 70
    sizes = jnp.asarray(sizes, jnp.int32)
    x = jax.random.normal(jax.random.key(0), (t, k))
    idx = jax.random.randint(jax.random.key(1), (m,), 0, t, jnp.int32)
    dest = jax.random.randint(jax.random.key(2), (m,), 0, num_out, jnp.int32)
    scale = jax.random.uniform(jax.random.key(3), (m,), minval=0.5, maxval=2.0)
    w = jax.random.normal(jax.random.key(4), (5, n, k) if transpose_rhs else (5, k, n))
    kw = dict(transpose_rhs=transpose_rhs, preferred_element_type=jnp.float32,
              tiling=(32, 128, 128), interpret=None)
    out = jax.jit(lambda x, w, idx, dest, scale: cpu.gmm(
        x, w, sizes, 0, lhs_rows=idx, out_rows=dest, out_scale=scale, num_out_rows=num_out,
        **kw))(x, w, idx, dest, scale)
    assert out.shape == (num_out, n)
    want = _numpy_scattered(x[idx], w, sizes, np.asarray(dest), np.asarray(scale), num_out,
                            transpose_rhs=transpose_rhs)
    np.testing.assert_allclose(out, want, rtol=1e-5, atol=1e-4)
    # Unscaled, and only the local groups 1..3 of 5 (group_offset 1, rhs holds 3 experts).
    out = cpu.gmm(x, w[1:4], sizes, 1, lhs_rows=idx, out_rows=dest, num_out_rows=num_out, **kw)
    want = _numpy_scattered(x[idx], w[1:4], sizes, np.asarray(dest), np.ones(m), num_out,
                            offset=1, num_local=3, transpose_rhs=transpose_rhs)
    np.testing.assert_allclose(out, want, rtol=1e-5, atol=1e-4)


def test_prologues_equal_applying_them_first():
    # lhs_fn / rhs_fn with extras: the operand is fn(rows, *extra rows), chunk by chunk; equal to
    # building it first (bit for bit: the same elementwise ops on the same rows, then the same
    # matmuls), gathered or not, for gmm, the scattered gmm and both tgmm operands.
    m, t, k, n = 220, 150, 9, 6
    sizes = jnp.asarray([40, 0, 77, 3, 90], jnp.int32)
    keys = jax.random.split(jax.random.key(0), 6)
    h = jax.random.normal(keys[0], (m, k))
    gate = jax.random.uniform(keys[1], (m, 1))
    x = jax.random.normal(keys[2], (t, k))
    d = jax.random.normal(keys[3], (m, n))
    idx = jax.random.randint(keys[4], (m,), 0, t, jnp.int32)
    w = jax.random.normal(keys[5], (5, k, n))
    kw = dict(preferred_element_type=jnp.float32, tiling=(32, 128, 128), interpret=None)

    def fn(h, gate):
        return gate * jax.nn.gelu(h, approximate=False)

    built = fn(h, gate)
    np.testing.assert_array_equal(
        cpu.gmm(h, w, sizes, 0, transpose_rhs=False, lhs_fn=fn, lhs_extras=(gate,), **kw),
        cpu.gmm(built, w, sizes, 0, transpose_rhs=False, **kw))
    np.testing.assert_allclose(
        cpu.gmm(h, w, sizes, 0, transpose_rhs=False, lhs_fn=fn, lhs_extras=(gate,), **kw),
        numpy_gmm(built, w, sizes), rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(
        cpu.tgmm(h, d, sizes, 0, num_groups=5, lhs_fn=fn, lhs_extras=(gate,), **kw),
        cpu.tgmm(built, d, sizes, 0, num_groups=5, **kw))
    # rhs_fn on a gathered lhs: x[idx]ᵀ · fn(h, gate).
    np.testing.assert_array_equal(
        cpu.tgmm(x, h, sizes, 0, num_groups=5, lhs_rows=idx, rhs_fn=fn, rhs_extras=(gate,),
                 **kw),
        cpu.tgmm(x[idx], built, sizes, 0, num_groups=5, **kw))
    np.testing.assert_allclose(
        cpu.tgmm(x, h, sizes, 0, num_groups=5, lhs_rows=idx, rhs_fn=fn, rhs_extras=(gate,),
                 **kw),
        numpy_tgmm(x[idx], built, sizes, 0, 5), rtol=1e-5, atol=1e-4)


def test_prologue_and_destination_arguments_are_checked():
    h, w = jnp.ones((10, 4)), jnp.ones((2, 4, 3))
    sizes = jnp.asarray([4, 6], jnp.int32)
    kw = dict(transpose_rhs=False, preferred_element_type=jnp.float32, tiling=None,
              interpret=None)
    with pytest.raises(ValueError, match="lhs_extras were given without lhs_fn"):
        cpu.gmm(h, w, sizes, 0, lhs_extras=(h,), **kw)
    with pytest.raises(ValueError, match=re.escape("operand's 10 rows") + ".*(9, 1)"):
        cpu.gmm(h, w, sizes, 0, lhs_fn=lambda h, s: h * s, lhs_extras=(jnp.ones((9, 1)),), **kw)
    with pytest.raises(ValueError, match="out_rows.*num_out_rows go together"):
        cpu.gmm(h, w, sizes, 0, out_rows=jnp.zeros((10,), jnp.int32), **kw)
    with pytest.raises(ValueError, match=re.escape("int [10]") + ".*shape \\(8,\\)"):
        cpu.gmm(h, w, sizes, 0, out_rows=jnp.zeros((8,), jnp.int32), num_out_rows=3, **kw)
    with pytest.raises(ValueError, match="out_scale needs one value per operand row \\(10\\)"):
        cpu.gmm(h, w, sizes, 0, out_rows=jnp.zeros((10,), jnp.int32), num_out_rows=3,
                out_scale=jnp.ones((4,)), **kw)
    with pytest.raises(ValueError, match="rhs_extras were given without rhs_fn"):
        cpu.tgmm(h, jnp.ones((10, 3)), sizes, 0, num_groups=2, rhs_extras=(h,),
                 preferred_element_type=jnp.float32, tiling=None, interpret=None)
