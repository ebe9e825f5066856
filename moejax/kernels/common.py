"""Helpers every kernel backend shares: dtype promotion, ``pallas_call`` output types, and a False
that XLA cannot fold (to order or keep apart what XLA would merge)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def promote_types(a, b) -> np.dtype:
    """JAX's standard promotion of two dtypes, whatever ``jax_numpy_dtype_promotion`` is set to.

    Mixed operand dtypes are part of gmm's contract (the result defaults to their promotion), and
    the f32 accumulator of a bf16 product is the kernels' choice, not an implicit promotion of the
    caller's: neither may fail under ``jax.numpy_dtype_promotion("strict")``.
    """
    with jax.numpy_dtype_promotion("standard"):
        return jnp.promote_types(a, b)


def out_struct(shape, dtype, *operands) -> jax.ShapeDtypeStruct:
    """The ``out_shape`` of a ``pallas_call`` whose result varies as its ``operands`` do.

    Inside ``jax.shard_map`` (with ``check_vma``) a ``pallas_call`` must say over which manual mesh
    axes its output varies; a kernel's output depends on every operand, so it varies over the union
    of theirs. Outside ``shard_map`` the union is empty and the annotation changes nothing.
    """
    varying = frozenset().union(*(jax.typeof(x).manual_axis_type.varying for x in operands))
    return jax.ShapeDtypeStruct(
        shape, dtype, manual_axis_type=jax.sharding.ManualAxisType(varying=varying))


def false_from(*values) -> jax.Array:
    """A False scalar that XLA computes from ``values`` and cannot fold: ``(a != a) & (a == a)`` is
    False for every ``a`` (NaN included), ``a`` each value's first element (empty values are
    skipped). What depends on it is computed after ``values`` and is not merged with an equal
    expression that does not."""
    false = jnp.zeros((), jnp.bool_)
    for value in values:
        if value.size:
            a = value.reshape(-1)[0].astype(jnp.float32)
            false = false | ((a != a) & (a == a))
    return false
