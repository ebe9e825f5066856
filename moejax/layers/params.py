"""Parameters with logical axis names, shared by the MoE layer and the models."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx


def param(rngs: nnx.Rngs, shape, fan_in: int, axes, dtype, sharding_rules=None) -> nnx.Param:
    """A ``N(0, 1/fan_in)`` parameter carrying logical axis names for ``moejax.parallel``.

    Sharding is applied from these names by ``moejax.parallel`` or the host (``eager_sharding=
    False``), so the layer also builds with no mesh at all. ``sharding_rules``: see
    ``moejax.parallel.fallback_rules``.
    """
    value = jax.random.normal(rngs.params(), shape, dtype) * jnp.asarray(fan_in ** -0.5, dtype)
    return logical_param(value, axes, sharding_rules)


def logical_param(value, axes, sharding_rules=None) -> nnx.Param:
    """``value`` as a parameter with logical ``axes`` (and the host mesh's fallback rules, if any)."""
    extra = {} if sharding_rules is None else {"sharding_rules": sharding_rules}
    return nnx.Param(value, out_sharding=axes, eager_sharding=False, **extra)
