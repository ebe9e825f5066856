"""Grouped matrix multiplication: the front end of moejax's block-sparse kernel family.

``gmm(lhs, rhs, group_sizes)`` multiplies contiguous row groups of ``lhs`` by their own matrix:
rows ``[start_i, start_i + group_sizes[i])`` use ``rhs[i]``; rows past ``sum(group_sizes)`` are 0.
It has the semantics of ``jax.lax.ragged_dot`` and a ``jax.custom_vjp`` shared by every backend:

    dlhs = gmm(dout, rhs, transpose_rhs=not transpose_rhs)
    drhs = tgmm(lhs, dout)                  (tgmm(dout, lhs) when transpose_rhs)

Backends (``backend=``): ``"pallas_tpu"`` (Mosaic TPU kernels), ``"pallas_gpu"`` (Pallas Triton
kernels), ``"cpu"`` (XLA-only path that is fast on CPU), ``"reference"`` (``lax.ragged_dot``, the oracle)
and ``"auto"``, which picks by ``jax.default_backend()``: TPU -> pallas_tpu, GPU -> pallas_gpu,
otherwise cpu.

``interpret=None`` runs a Pallas backend in interpret mode when the default JAX backend is the CPU (so
the kernels run everywhere); pass ``interpret=False`` to lower for the real target, for example under
``jax.export`` with ``platforms=["tpu"]``.
"""

from __future__ import annotations

import functools
import importlib
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from moejax.kernels.common import promote_types

BACKENDS = ("auto", "pallas_tpu", "pallas_gpu", "cpu", "reference")

_MODULES = {
    "pallas_tpu": "moejax.kernels.pallas_tpu",
    "pallas_gpu": "moejax.kernels.pallas_gpu",
    "cpu": "moejax.kernels.cpu",
    "reference": "moejax.kernels.reference",
}


def resolve_backend(backend: str) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend != "auto":
        return backend
    platform = jax.default_backend()
    if platform == "tpu":
        return "pallas_tpu"
    if platform in ("gpu", "cuda", "rocm"):
        return "pallas_gpu"
    return "cpu"


def _kernels(backend: str):
    return importlib.import_module(_MODULES[backend])


def _resolve_interpret(interpret: bool | None) -> bool:
    if interpret is None:
        return jax.default_backend() == "cpu"
    return bool(interpret)


def runs_interpreted(backend: str = "auto", interpret: bool | None = None) -> bool:
    """Whether ``gmm(..., backend=backend, interpret=interpret)`` runs a Pallas kernel in
    interpret mode (JAX's HLO interpreter) on this host."""
    return resolve_backend(backend).startswith("pallas") and _resolve_interpret(interpret)


def _check_not_interpreted_under_vma(fn: str, backend: str, interpret: bool, *operands) -> None:
    # Pallas' HLO interpreter re-traces the kernel's grid loop when the program is lowered, and that
    # trace mixes the operands' varying manual axes with its own unvarying loop indices: under
    # ``shard_map(check_vma=True)`` it fails deep inside JAX. Compiled kernels (interpret=False)
    # carry the varying axes and need nothing of this.
    if not (backend.startswith("pallas") and interpret):
        return
    varying = set().union(*(jax.typeof(x).manual_axis_type.varying for x in operands))
    if varying:
        raise ValueError(
            f"{fn}: backend={backend!r} in interpret mode cannot run inside "
            f"jax.shard_map(check_vma=True) (operands vary over mesh axes {sorted(varying)}); "
            "pass check_vma=False to that shard_map (moejax.parallel does so for interpreted "
            "kernels), or use interpret=False on a TPU/GPU, or backend='cpu'"
        )


def _check_float(name: str, x) -> None:
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise ValueError(f"{name} must have a floating dtype, got {x.dtype}")


def _check_group_sizes(group_sizes, m: int, fn: str) -> None:
    if group_sizes.ndim != 1:
        raise ValueError(f"{fn}: group_sizes must have rank 1 [g], got shape {group_sizes.shape}")
    if group_sizes.dtype != jnp.int32:
        raise ValueError(f"{fn}: group_sizes must be int32, got {group_sizes.dtype}")
    if isinstance(group_sizes, jax.core.Tracer):
        return
    sizes = np.asarray(group_sizes)
    if (sizes < 0).any():
        raise ValueError(f"{fn}: group_sizes must be >= 0, got {sizes.tolist()}")
    if int(sizes.sum()) > m:
        raise ValueError(
            f"{fn}: sum(group_sizes) = {int(sizes.sum())} exceeds the number of rows m = {m}"
        )


def _check_group_offset(group_offset, num_local: int, num_groups: int, fn: str):
    if group_offset is None:
        if num_local != num_groups:
            raise ValueError(
                f"{fn}: rhs holds {num_local} groups but group_sizes has {num_groups}; pass "
                "group_offset when rhs holds a slice of the groups"
            )
        return jnp.zeros((), jnp.int32)
    if num_local > num_groups:
        raise ValueError(
            f"{fn}: rhs holds {num_local} groups, more than group_sizes' {num_groups}"
        )
    offset = jnp.asarray(group_offset)
    if offset.ndim != 0 or not jnp.issubdtype(offset.dtype, jnp.integer):
        raise ValueError(f"{fn}: group_offset must be an integer scalar, got {offset.dtype}{offset.shape}")
    if not isinstance(offset, jax.core.Tracer):
        o = int(offset)
        if o < 0 or o + num_local > num_groups:
            raise ValueError(
                f"{fn}: group_offset = {o} with {num_local} local groups is outside [0, {num_groups}]"
            )
    # A traced offset cannot be checked: it is clamped into range, the same way for every backend.
    return jnp.clip(offset.astype(jnp.int32), 0, num_groups - num_local)


def _check_static_shapes(fn: str, backend: str, **operands) -> None:
    # The kernels' tilings, work lists and chunk ladders are sized at trace time from m, k and n.
    if backend == "reference":
        return
    for name, x in operands.items():
        symbolic = [d for d in x.shape if not isinstance(d, (int, np.integer))]
        if symbolic:
            axes = {"lhs": "[m, k]", "rhs": "[g, k, n]" if fn == "gmm" else "[m, n]"}[name]
            raise ValueError(
                f"{fn}: backend={backend!r} needs static shapes (its tiling is fixed at trace "
                f"time), but {name} {axes} has the symbolic shape {tuple(map(str, x.shape))}; for "
                "jax.export with a symbolic number of rows m use backend='reference' "
                "(lax.ragged_dot), or export one function per row count"
            )


def _normalize_tiling(tiling) -> tuple[int, int, int] | None:
    if tiling is None:
        return None
    tiling = tuple(int(t) for t in tiling)
    if len(tiling) != 3 or any(t <= 0 for t in tiling):
        raise ValueError(f"tiling must be three positive ints (tm, tk, tn), got {tiling}")
    return tiling


# --------------------------------------------------------------------------- gmm


def gmm(
    lhs: jax.Array,
    rhs: jax.Array,
    group_sizes: jax.Array,
    *,
    transpose_rhs: bool = False,
    group_offset: jax.Array | int | None = None,
    preferred_element_type: Any = None,
    tiling: tuple[int, int, int] | None = None,
    backend: str = "auto",
    interpret: bool | None = None,
) -> jax.Array:
    """Grouped matmul: ``out[rows_i] = lhs[rows_i] @ rhs[i]`` (``rhs[i].T`` if ``transpose_rhs``).

    Args:
      lhs: [m, k] rows sorted by group.
      rhs: [g, k, n], or [g, n, k] when ``transpose_rhs``.
      group_sizes: int32 [G] with ``sum <= m``. ``G == g`` unless ``group_offset`` is given.
      transpose_rhs: contract with the last dimension of ``rhs``.
      group_offset: ``rhs`` holds groups ``[group_offset, group_offset + g)`` only (expert
        sharding); rows of the other groups are 0. A concrete offset outside ``[0, G - g]`` is an
        error; a traced one is clamped into that range (the same on every backend).
      preferred_element_type: output dtype (default: lhs and rhs promoted). Accumulation is f32.
      tiling: backend tile sizes ``(tm, tk, tn)``; None picks the backend's default.
      backend: "auto" | "pallas_tpu" | "pallas_gpu" | "cpu" | "reference".
      interpret: Pallas interpret mode; None means "when the default JAX backend is the CPU".

    Returns:
      [m, n] of ``preferred_element_type``.
    """
    if lhs.ndim != 2:
        raise ValueError(f"gmm: lhs must have rank 2 [m, k], got shape {lhs.shape}")
    if rhs.ndim != 3:
        raise ValueError(f"gmm: rhs must have rank 3 [g, k, n], got shape {rhs.shape}")
    _check_float("gmm: lhs", lhs)
    _check_float("gmm: rhs", rhs)
    backend = resolve_backend(backend)
    _check_static_shapes("gmm", backend, lhs=lhs, rhs=rhs)
    _check_group_sizes(group_sizes, lhs.shape[0], "gmm")
    k_rhs = rhs.shape[2] if transpose_rhs else rhs.shape[1]
    if lhs.shape[1] != k_rhs:
        layout = "[g, n, k]" if transpose_rhs else "[g, k, n]"
        raise ValueError(
            f"gmm: contraction sizes differ: lhs {lhs.shape} has k = {lhs.shape[1]}, rhs {rhs.shape} "
            f"({layout}) has k = {k_rhs}"
        )
    offset = _check_group_offset(group_offset, rhs.shape[0], group_sizes.shape[0], "gmm")
    out_dtype = jnp.dtype(preferred_element_type or promote_types(lhs.dtype, rhs.dtype))
    interpret = _resolve_interpret(interpret)
    _check_not_interpreted_under_vma("gmm", backend, interpret, lhs, rhs, group_sizes, offset)
    config = (bool(transpose_rhs), out_dtype, _normalize_tiling(tiling), backend, interpret)
    return _gmm(config, lhs, rhs, group_sizes, offset)


def _gmm_impl(config, lhs, rhs, group_sizes, offset):
    transpose_rhs, out_dtype, tiling, backend, interpret = config
    with jax.named_scope("gmm"):
        return _kernels(backend).gmm(
            lhs, rhs, group_sizes, offset, transpose_rhs=transpose_rhs,
            preferred_element_type=out_dtype, tiling=tiling, interpret=interpret,
        )


def _tgmm_impl(config, lhs, rhs, group_sizes, offset, num_groups):
    out_dtype, tiling, backend, interpret = config
    with jax.named_scope("tgmm"):
        return _kernels(backend).tgmm(
            lhs, rhs, group_sizes, offset, num_groups=num_groups,
            preferred_element_type=out_dtype, tiling=tiling, interpret=interpret,
        )


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _gmm(config, lhs, rhs, group_sizes, offset):
    return _gmm_impl(config, lhs, rhs, group_sizes, offset)


def _gmm_fwd(config, lhs, rhs, group_sizes, offset):
    return _gmm_impl(config, lhs, rhs, group_sizes, offset), (lhs, rhs, group_sizes, offset)


def _gmm_bwd(config, residuals, dout):
    transpose_rhs, _, tiling, backend, interpret = config
    lhs, rhs, group_sizes, offset = residuals
    dlhs = _gmm(
        (not transpose_rhs, lhs.dtype, tiling, backend, interpret),
        dout.astype(rhs.dtype), rhs, group_sizes, offset,
    )
    tconfig = (rhs.dtype, tiling, backend, interpret)
    if transpose_rhs:
        drhs = _tgmm(tconfig, dout.astype(lhs.dtype), lhs, group_sizes, offset, rhs.shape[0])
    else:
        drhs = _tgmm(tconfig, lhs, dout.astype(lhs.dtype), group_sizes, offset, rhs.shape[0])
    return dlhs, drhs, None, None


_gmm.defvjp(_gmm_fwd, _gmm_bwd)


# --------------------------------------------------------------------------- tgmm


def tgmm(
    lhs: jax.Array,
    rhs: jax.Array,
    group_sizes: jax.Array,
    *,
    num_groups: int | None = None,
    group_offset: jax.Array | int | None = None,
    preferred_element_type: Any = None,
    tiling: tuple[int, int, int] | None = None,
    backend: str = "auto",
    interpret: bool | None = None,
) -> jax.Array:
    """Transposed grouped matmul: ``out[i] = lhs[rows_i].T @ rhs[rows_i]``; empty group -> zeros.

    Args:
      lhs: [m, k]; rhs: [m, n], rows sorted by group.
      group_sizes: int32 [G] with ``sum <= m``.
      num_groups: groups in the output (default ``G``, or ``G - group_offset`` with an offset).
      group_offset: the output holds groups ``[group_offset, group_offset + num_groups)``.
      preferred_element_type, tiling, backend, interpret: as in :func:`gmm`.

    Returns:
      [num_groups, k, n] of ``preferred_element_type``. This is the weight gradient of gmm.
    """
    if lhs.ndim != 2:
        raise ValueError(f"tgmm: lhs must have rank 2 [m, k], got shape {lhs.shape}")
    if rhs.ndim != 2:
        raise ValueError(f"tgmm: rhs must have rank 2 [m, n], got shape {rhs.shape}")
    if lhs.shape[0] != rhs.shape[0]:
        raise ValueError(f"tgmm: lhs {lhs.shape} and rhs {rhs.shape} must have the same rows m")
    _check_float("tgmm: lhs", lhs)
    _check_float("tgmm: rhs", rhs)
    backend = resolve_backend(backend)
    _check_static_shapes("tgmm", backend, lhs=lhs, rhs=rhs)
    _check_group_sizes(group_sizes, lhs.shape[0], "tgmm")
    total = group_sizes.shape[0]
    if num_groups is None:
        num_groups = total
        if group_offset is not None and not isinstance(group_offset, jax.core.Tracer):
            num_groups = total - int(group_offset)
    if num_groups < 1:
        raise ValueError(f"tgmm: num_groups must be >= 1, got {num_groups}")
    offset = _check_group_offset(group_offset, num_groups, total, "tgmm")
    out_dtype = jnp.dtype(preferred_element_type or promote_types(lhs.dtype, rhs.dtype))
    interpret = _resolve_interpret(interpret)
    _check_not_interpreted_under_vma("tgmm", backend, interpret, lhs, rhs, group_sizes, offset)
    config = (out_dtype, _normalize_tiling(tiling), backend, interpret)
    return _tgmm(config, lhs, rhs, group_sizes, offset, int(num_groups))


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 5))
def _tgmm(config, lhs, rhs, group_sizes, offset, num_groups):
    return _tgmm_impl(config, lhs, rhs, group_sizes, offset, num_groups)


def _tgmm_fwd(config, lhs, rhs, group_sizes, offset, num_groups):
    out = _tgmm_impl(config, lhs, rhs, group_sizes, offset, num_groups)
    return out, (lhs, rhs, group_sizes, offset)


def _tgmm_bwd(config, num_groups, residuals, dout):
    # out[i] = lhs_i.T @ rhs_i  =>  dlhs_i = rhs_i @ dout[i].T,  drhs_i = lhs_i @ dout[i].
    _, tiling, backend, interpret = config
    lhs, rhs, group_sizes, offset = residuals
    dout = dout.astype(lhs.dtype)
    dlhs = _gmm((True, lhs.dtype, tiling, backend, interpret), rhs, dout, group_sizes, offset)
    drhs = _gmm((False, rhs.dtype, tiling, backend, interpret), lhs, dout, group_sizes, offset)
    return dlhs, drhs, None, None


_tgmm.defvjp(_tgmm_fwd, _tgmm_bwd)
