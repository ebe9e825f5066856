"""Block-sparse grouped matmul (gmm) and its transpose (tgmm) as Pallas kernels for NVIDIA GPUs.

Both kernels use the Triton lowering of Pallas (selected by ``pallas.triton.CompilerParams``; in
jax 0.10 a GPU ``pallas_call`` otherwise defaults to Mosaic GPU). Every operand is passed whole
(one pointer per array, no BlockSpec); kernels address tiles with ``ref.at[pl.ds(...)]`` and
masked ``load``/``store``, so ``m``, ``k`` and ``n`` need not be tile multiples and nothing is
padded in HBM.

Tiling ``(tm, tk, tn)``, powers of two in [16, 256]:

* ``gmm`` [m, k] x [g, k, n] -> [m, n]: grid ``(cdiv(n, tn), num_work_items)``, n tiles fastest so
  that programs running together share an ``lhs`` row tile and one group's ``rhs`` in L2. A program
  loops over ``cdiv(k, tk)`` steps (``fori_loop``, software-pipelined by Triton), accumulating
  ``lhs[tm, tk] @ rhs[group][tk, tn]`` in f32, and stores only the rows of its group.
* ``tgmm`` [m, k], [m, n] -> [g, k, n]: grid ``(cdiv(n, tn), cdiv(k, tk), g)``; a program walks its
  group's rows ``tm`` at a time (dynamic trip count from the group's start and end), accumulating
  ``lhs[rows, tk].T @ rhs[rows, tn]`` with rows outside the group loaded as 0. An empty group
  makes no step and stores zeros.

Default tilings, warps and stages per kernel and dtype: ``DEFAULT_CONFIGS`` (each tile shrunk to
the problem when smaller).

Metadata (int32, built on device from ``group_sizes`` by ``moejax.kernels.metadata``): gmm reads an
``items_4xW`` table, one column per work item ``(row tile, local group, group start, group end)``,
from ``metadata.group_metadata``, and ``bounds_2 = (first, last)``, the rows of the local groups
(``metadata.local_row_range``). Rows outside ``[first, last)`` must come out 0, and no work item
covers a tile lying wholly outside that range; the spare columns of the static-length work list
(``W = cdiv(m, tm) + g - 1`` is at least the number of active items plus those tiles) are
assigned to those tiles and store zeros, and every item also zeroes the rows of its tile that lie
outside ``[first, last)``. The output is thus written completely without a zero-initialised
buffer. tgmm reads ``bounds_2xG`` (start, end of each local group).

Backward: ``moejax.ops.gmm``'s custom VJP pairs these kernels: for ``out = gmm(lhs, rhs)``,
``dlhs = gmm(dout, rhs, transpose_rhs=True)`` and ``drhs = tgmm(lhs, dout)``.

Numerics: f32 accumulation always. bf16 and f16 tiles use tensor cores; f32 tiles are multiplied
in full f32 (``Precision.HIGHEST``, no TF32), which is exact to the contract but slower.

Hardware: the Triton lowering targets NVIDIA GPUs; bf16 tensor-core dots need compute capability
>= 8.0 (Ampere, Ada, Hopper). Pipeline depth is chosen so that a program's tiles fit 96 KiB of
shared memory, which every GPU of compute capability >= 8.0 provides per block (up to 4 stages;
more would pay on Hopper). On Hopper, Triton emits wgmma for the bf16 tile dots, but nothing
Hopper-specific (TMA, warp specialisation) is requested. Lowering is tested without hardware via
``jax.export`` for ``cuda``, and the emitted Triton IR is verified; ``moejax.kernels.gpu_inspect``
compiles it on to PTX and cubin for sm_80 / sm_90a (registers, spills, shared memory, wgmma), so
only speed needs a GPU (``benchmarks/gmm_device.py``).
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from moejax.kernels import common, metadata

_MIN_TILE = 16  # Triton's tensor-core dot needs every dimension >= 16.
_MAX_TILE = 256
_SHARED_MEMORY_BYTES = 96 * 1024
_MAX_STAGES = 4


class KernelConfig(NamedTuple):
    """A kernel's launch configuration: ``tiling`` (tm, tk, tn), warps per program and the
    software-pipeline depth Triton gives the k loop (tiles in flight in shared memory)."""

    tiling: tuple[int, int, int]
    num_warps: int
    num_stages: int


# Default configuration per kernel and operand width in bytes (2: bf16/f16, 4: f32), chosen from
# the compile report of ``benchmarks/gpu_compile.py`` (Triton -> PTX -> ``ptxas -v`` for sm_80
# and sm_90a; full sweep in ``benchmarks/RESULTS.md``): the largest output tiles that assemble
# with no register spills on both architectures, with register headroom (unmasked and masked
# tiles: ``tests/test_gpu_compile.py``), and whose pipeline fits the portable 96 KiB budget.
# ("gmm", w) also serves gmm with ``transpose_rhs`` (the dlhs kernel of the VJP).
#
# One table serves every architecture: the kernels are traced before XLA picks a device (and
# exported on hosts without one), so they cannot choose per architecture; every entry is clean
# on sm_80 and sm_90a (and sm_100a). Registers per thread at m = 16384, k = n = 512:
#
# | kernel, width | tiling       | warps | stages | regs sm_80 / sm_90a    | smem sm_80 / sm_90a |
# | gmm, 2        | 128, 64, 128 | 8     | 3      | 204 / 122 (dlhs 139/120) | 64 / 96 KiB       |
# | tgmm, 2       | 64, 128, 128 | 8     | 3      | 128 / 94               | 64 / 96 KiB         |
# | gmm, 4        | 128, 16, 128 | 8     | 3      | 143 / 213 (dlhs 200/214) | 32 / 32 KiB       |
# | tgmm, 4       | 16, 128, 128 | 8     | 3      | 121 / 124              | 32 / 32 KiB         |
#
# Why not larger:
# * bf16 gmm: 128x256 and 256x128 output tiles spill on sm_80 at tk >= 64 (8 and 16 warps) and
#   sit at the 255-register cap at tk = 32; tk = 128 is clean but needs 128 / 192 KiB, beyond
#   the 99 KiB per block of sm_86 / sm_89. Hopper alone could take 128x64x256 or 256x64x128
#   (8 warps, 172 / 203 registers, 144 KiB).
# * bf16 tgmm: a 128x256 output tile (tm = 32) is clean, but tgmm's grid is
#   ``cdiv(k, tk) * cdiv(n, tn) * E`` programs: 64 at d_model = d_ff = 512, E = 8, for 108 (A100)
#   to 132 (H100) SMs. 128x128 keeps 128.
# * f32: the previous (128, 32, 128) gmm and (32, 128, 128) tgmm reach 249-255 registers, and
#   the dlhs and tgmm kernels spill 8-128 bytes once tiles are masked (m, k, n not tile
#   multiples); halving the contraction tile keeps the output tile and ~30 registers of headroom.
#
# f32 inputs multiply in full f32 on the CUDA cores (``_precision``: HIGHEST, no TF32; the PTX has
# no mma, tested). TF32 would run on the tensor cores (8x the A100's f32 peak) but round inputs
# to 10 mantissa bits, and every other backend (cpu, reference, pallas_tpu) returns f32-exact
# products for f32 operands: a backend switch must not change results. Speed wants bf16 inputs.
DEFAULT_CONFIGS: dict[tuple[str, int], KernelConfig] = {
    ("gmm", 2): KernelConfig((128, 64, 128), num_warps=8, num_stages=3),
    ("gmm", 4): KernelConfig((128, 16, 128), num_warps=8, num_stages=3),
    ("tgmm", 2): KernelConfig((64, 128, 128), num_warps=8, num_stages=3),
    ("tgmm", 4): KernelConfig((16, 128, 128), num_warps=8, num_stages=3),
}


def _fit(dim: int, cap: int) -> int:
    return max(_MIN_TILE, min(cap, pl.next_power_of_2(dim)))


def default_config(kernel: str, compute_dtype, m: int, k: int, n: int) -> KernelConfig:
    """``DEFAULT_CONFIGS``' entry with each tile shrunk to the problem when the problem is
    smaller (a shrunk tiling takes the warps and stages :func:`_compiler_params` derives)."""
    entry = DEFAULT_CONFIGS[kernel, min(jnp.dtype(compute_dtype).itemsize, 4)]
    tiling = tuple(_fit(d, t) for d, t in zip((m, k, n), entry.tiling))
    if tiling == entry.tiling:
        return entry
    itemsize = jnp.dtype(compute_dtype).itemsize
    tm, tk, tn = tiling
    if kernel == "gmm":
        params = _compiler_params(tiling, (tm * tk + tk * tn) * itemsize, tm * tn)
    else:
        params = _compiler_params(tiling, (tm * tk + tm * tn) * itemsize, tk * tn)
    return KernelConfig(tiling, params.num_warps, params.num_stages)


def default_tiling(kernel: str, compute_dtype, m: int, k: int, n: int) -> tuple[int, int, int]:
    """The tiling ``kernel`` ("gmm" or "tgmm") uses for an ``[m, k]`` lhs when none is given."""
    return default_config(kernel, compute_dtype, m, k, n).tiling


def _compute_dtype(lhs_dtype, rhs_dtype) -> np.dtype:
    return common.promote_types(lhs_dtype, rhs_dtype)


def _acc_dtype(compute_dtype) -> np.dtype:
    return common.promote_types(compute_dtype, jnp.float32)


def _precision(compute_dtype):
    return jax.lax.Precision.HIGHEST if jnp.dtype(compute_dtype).itemsize >= 4 else None


def _validate_tiling(tiling) -> tuple[int, int, int]:
    tiling = tuple(int(t) for t in tiling)
    if len(tiling) != 3 or any(
        t < _MIN_TILE or t > _MAX_TILE or t & (t - 1) for t in tiling
    ):
        raise ValueError(
            f"tiling must be (tm, tk, tn), powers of two in [{_MIN_TILE}, {_MAX_TILE}] for the "
            f"Pallas GPU (Triton) backend, got {tiling}"
        )
    return tiling


def _compiler_params(tiling, bytes_per_stage: int, acc_elements: int) -> plgpu.CompilerParams:
    """Warps and stages for an explicit tiling (defaults come from ``DEFAULT_CONFIGS``)."""
    if bytes_per_stage > _SHARED_MEMORY_BYTES:
        raise ValueError(
            f"tiling {tiling} needs {bytes_per_stage // 1024} KiB of shared memory per pipeline "
            f"stage, more than the {_SHARED_MEMORY_BYTES // 1024} KiB budget; use smaller tiles"
        )
    # 8 warps keep a 128x128 f32 accumulator at 64 registers per thread.
    return plgpu.CompilerParams(
        num_warps=8 if acc_elements >= 128 * 128 else 4,
        num_stages=min(_MAX_STAGES, _SHARED_MEMORY_BYTES // bytes_per_stage),
    )


def _and(*masks):
    """Conjunction of the masks that are not None (None when all are: an unmasked access)."""
    masks = [x for x in masks if x is not None]
    return functools.reduce(jnp.logical_and, masks) if masks else None


def _in_bounds(start, size: int, bound: int, axis: int):
    """Mask of ``start + arange(size) < bound`` shaped for ``axis`` of a 2-D tile, or None when
    the tile can never cross ``bound``."""
    if bound % size == 0:
        return None
    ok = start + jnp.arange(size, dtype=jnp.int32) < bound
    return ok[:, None] if axis == 0 else ok[None, :]


def _load(ref, mask):
    """Loads a tile; where ``mask`` is False it reads 0 without touching memory."""
    if mask is None:
        return plgpu.load(ref)
    return plgpu.load(ref, mask=jnp.broadcast_to(mask, ref.shape), other=0)


def _store(ref, value, mask):
    """Stores a tile, leaving memory where ``mask`` is False untouched."""
    plgpu.store(ref, value, mask=None if mask is None else jnp.broadcast_to(mask, ref.shape))


# --------------------------------------------------------------------------- gmm


def _gmm_kernel(items_ref, bounds_ref, lhs_ref, rhs_ref, out_ref, *, m, k, n, tiling,
                transpose_rhs, compute_dtype, precision):
    tm, tk, tn = tiling
    n_idx = pl.program_id(0)
    w = pl.program_id(1)
    tile = items_ref[0, w]
    group = items_ref[1, w]
    lo = items_ref[2, w]
    hi = items_ref[3, w]
    first = bounds_ref[0]
    last = bounds_ref[1]
    acc_dtype = _acc_dtype(compute_dtype)

    @pl.when(tile < metadata.cdiv(m, tm))
    def _():
        r0 = tile * tm
        n0 = n_idx * tn
        rows_Mx1 = r0 + jnp.arange(tm, dtype=jnp.int32)[:, None]
        row_ok = rows_Mx1 < m if m % tm else None
        col_ok = _in_bounds(n0, tn, n, axis=1)

        def step(i, acc_MxN):
            k0 = i * tk
            k_row = _in_bounds(k0, tk, k, axis=0)
            k_col = _in_bounds(k0, tk, k, axis=1)
            x_MxK = _load(lhs_ref.at[pl.ds(r0, tm), pl.ds(k0, tk)], _and(row_ok, k_col))
            if transpose_rhs:
                w_tile = _load(rhs_ref.at[group, pl.ds(n0, tn), pl.ds(k0, tk)],
                               _and(_in_bounds(n0, tn, n, axis=0), k_col))
                dims = (((1,), (1,)), ((), ()))
            else:
                w_tile = _load(rhs_ref.at[group, pl.ds(k0, tk), pl.ds(n0, tn)],
                               _and(k_row, col_ok))
                dims = (((1,), (0,)), ((), ()))
            return acc_MxN + jax.lax.dot_general(
                x_MxK.astype(compute_dtype), w_tile.astype(compute_dtype), dims,
                precision=precision, preferred_element_type=acc_dtype)

        # Spare items (lo == hi) only zero rows outside the local groups: no k steps. (Not
        # jnp.where(pred, int, int): jax 0.10's Triton lowering gives such weak-typed literals
        # the predicate's i1 type, which turns the trip count into `false`.)
        num_steps = (lo < hi).astype(jnp.int32) * metadata.cdiv(k, tk)
        acc_MxN = jax.lax.fori_loop(0, num_steps, step, jnp.zeros((tm, tn), acc_dtype))
        in_group = (rows_Mx1 >= lo) & (rows_Mx1 < hi)
        outside_local = (rows_Mx1 < first) | (rows_Mx1 >= last)
        out_MxN = jnp.where(in_group, acc_MxN, 0).astype(out_ref.dtype)
        _store(out_ref.at[pl.ds(r0, tm), pl.ds(n0, tn)], out_MxN,
               _and(in_group | outside_local, row_ok, col_ok))


def _gmm_work_items(group_sizes, group_offset, m: int, tm: int, num_local: int):
    """``items_4xW`` and ``bounds_2`` of the module docstring."""
    meta = metadata.group_metadata(
        group_sizes, m, tm, group_offset=group_offset, num_local_groups=num_local)
    first, last = metadata.local_row_range(group_sizes, group_offset, num_local)
    num_items = metadata.max_work_items(m, tm, num_local)
    w_W = jnp.arange(num_items, dtype=jnp.int32)
    active_W = w_W < meta.num_work
    # Tiles wholly outside [first, last): [0, low_end) and [high_start, num_tiles).
    any_local = last > first
    low_end = jnp.where(any_local, first // tm, 0)
    high_start = jnp.where(any_local, (last + tm - 1) // tm, 0)
    spare_W = w_W - meta.num_work
    spare_tiles_W = jnp.where(spare_W < low_end, spare_W, high_start + spare_W - low_end)
    tiles_W = jnp.where(active_W, meta.work_tiles_W, spare_tiles_W)
    lo_W = jnp.where(active_W, meta.group_starts_G[meta.work_groups_W], 0)
    hi_W = jnp.where(active_W, meta.group_ends_G[meta.work_groups_W], 0)
    items_4xW = jnp.stack([tiles_W, meta.work_groups_W, lo_W, hi_W]).astype(jnp.int32)
    bounds_2 = jnp.stack([first, last]).astype(jnp.int32)
    return items_4xW, bounds_2


def gmm(lhs, rhs, group_sizes, group_offset, *, transpose_rhs, preferred_element_type, tiling,
        interpret):
    """``out[rows_i] = lhs[rows_i] @ rhs[i - group_offset]`` for the local groups, 0 elsewhere."""
    m, k = lhs.shape
    g = rhs.shape[0]
    n = rhs.shape[1] if transpose_rhs else rhs.shape[2]
    compute_dtype = _compute_dtype(lhs.dtype, rhs.dtype)
    if tiling is None:
        config = default_config("gmm", compute_dtype, m, k, n)
        tiling = config.tiling
        params = plgpu.CompilerParams(num_warps=config.num_warps, num_stages=config.num_stages)
    else:
        tiling = _validate_tiling(tiling)
        tm, tk, tn = tiling
        params = _compiler_params(tiling, (tm * tk + tk * tn) * compute_dtype.itemsize, tm * tn)
    tm, tk, tn = tiling
    if 0 in (m, k, n):
        return jnp.zeros((m, n), preferred_element_type)
    items_4xW, bounds_2 = _gmm_work_items(group_sizes, group_offset, m, tm, g)
    kernel = functools.partial(
        _gmm_kernel, m=m, k=k, n=n, tiling=tiling, transpose_rhs=transpose_rhs,
        compute_dtype=compute_dtype, precision=_precision(compute_dtype))
    return pl.pallas_call(
        kernel,
        out_shape=common.out_struct((m, n), preferred_element_type, items_4xW, bounds_2, lhs,
                                      rhs),
        grid=(metadata.cdiv(n, tn), items_4xW.shape[1]),
        compiler_params=params,
        interpret=interpret,
        name="moejax_gmm",
    )(items_4xW, bounds_2, lhs, rhs)


# --------------------------------------------------------------------------- tgmm


def _tgmm_kernel(bounds_ref, lhs_ref, rhs_ref, out_ref, *, k, n, tiling, compute_dtype,
                 precision):
    tm, tk, tn = tiling
    k0 = pl.program_id(1) * tk
    n0 = pl.program_id(0) * tn
    group = pl.program_id(2)
    start = bounds_ref[0, group]
    end = bounds_ref[1, group]
    k_col = _in_bounds(k0, tk, k, axis=1)
    n_col = _in_bounds(n0, tn, n, axis=1)

    def step(i, acc_KxN):
        r0 = start + i * tm
        rows_ok = r0 + jnp.arange(tm, dtype=jnp.int32)[:, None] < end
        x_MxK = _load(lhs_ref.at[pl.ds(r0, tm), pl.ds(k0, tk)], _and(rows_ok, k_col))
        y_MxN = _load(rhs_ref.at[pl.ds(r0, tm), pl.ds(n0, tn)], _and(rows_ok, n_col))
        return acc_KxN + jax.lax.dot_general(
            x_MxK.astype(compute_dtype), y_MxN.astype(compute_dtype), (((0,), (0,)), ((), ())),
            precision=precision, preferred_element_type=_acc_dtype(compute_dtype))

    num_steps = jax.lax.div(end - start + tm - 1, tm)  # non-negative: truncation is ceil-div
    acc_KxN = jax.lax.fori_loop(
        0, num_steps, step, jnp.zeros((tk, tn), _acc_dtype(compute_dtype)))
    _store(out_ref.at[group, pl.ds(k0, tk), pl.ds(n0, tn)], acc_KxN.astype(out_ref.dtype),
           _and(_in_bounds(k0, tk, k, axis=0), n_col))


def tgmm(lhs, rhs, group_sizes, group_offset, *, num_groups, preferred_element_type, tiling,
         interpret):
    """``out[i] = lhs[rows of group offset+i].T @ rhs[same rows]``; an empty group gives zeros."""
    m, k = lhs.shape
    n = rhs.shape[1]
    compute_dtype = _compute_dtype(lhs.dtype, rhs.dtype)
    if tiling is None:
        config = default_config("tgmm", compute_dtype, m, k, n)
        tiling = config.tiling
        params = plgpu.CompilerParams(num_warps=config.num_warps, num_stages=config.num_stages)
    else:
        tiling = _validate_tiling(tiling)
        tm, tk, tn = tiling
        params = _compiler_params(tiling, (tm * tk + tm * tn) * compute_dtype.itemsize, tk * tn)
    tm, tk, tn = tiling
    if 0 in (m, k, n):
        return jnp.zeros((num_groups, k, n), preferred_element_type)
    ends = jnp.cumsum(group_sizes.astype(jnp.int32))
    starts = ends - group_sizes
    bounds_2xG = jnp.stack([
        jax.lax.dynamic_slice_in_dim(starts, group_offset, num_groups),
        jax.lax.dynamic_slice_in_dim(ends, group_offset, num_groups),
    ]).astype(jnp.int32)
    kernel = functools.partial(
        _tgmm_kernel, k=k, n=n, tiling=tiling, compute_dtype=compute_dtype,
        precision=_precision(compute_dtype))
    return pl.pallas_call(
        kernel,
        out_shape=common.out_struct((num_groups, k, n), preferred_element_type, bounds_2xG,
                                      lhs, rhs),
        grid=(metadata.cdiv(n, tn), metadata.cdiv(k, tk), num_groups),
        compiler_params=params,
        interpret=interpret,
        name="moejax_tgmm",
    )(bounds_2xG, lhs, rhs)
