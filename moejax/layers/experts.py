"""Expert FFNs: ``E`` MLP or GLU experts stored as stacked weights, run in one of three dispatch modes."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from moejax.layers.config import MoEConfig
from moejax.ops import gmm
from moejax.parallel import (
    fallback_rules,
    ExpertParallelLayout,
    capacity_expert_parallel,
    dropless_expert_parallel,
)

ACTIVATION_FNS = {
    "relu": jax.nn.relu,
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "gelu_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "silu": jax.nn.silu,
    "swish": jax.nn.silu,
    "squared_relu": lambda x: jnp.square(jax.nn.relu(x)),
}


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


class Experts(nnx.Module):
    """``num_experts`` FFNs: ``w_in`` [E, D, F], ``w_up`` [E, D, F] (GLU only), ``w_out`` [E, F, D].

    Every method computes in its input's dtype (the MoE layer casts tokens to the compute dtype once).

    Logical axes: ``("expert", "embed", "mlp")`` and ``("expert", "mlp", "embed")``.
    """

    def __init__(self, config: MoEConfig, *, rngs: nnx.Rngs):
        e, d, f = config.num_experts, config.d_model, config.d_ff
        self.config = config
        dt, rules = config.param_dtype, fallback_rules(config.mesh_roles)
        self.w_in = param(rngs, (e, d, f), d, ("expert", "embed", "mlp"), dt, rules)
        if config.expert == "glu":
            self.w_up = param(rngs, (e, d, f), d, ("expert", "embed", "mlp"), dt, rules)
        self.w_out = param(rngs, (e, f, d), f, ("expert", "mlp", "embed"), dt, rules)

    def _weights(self, dt):
        w_up = self.w_up[...].astype(dt) if self.config.expert == "glu" else None
        return self.w_in[...].astype(dt), w_up, self.w_out[...].astype(dt)

    def _hidden(self, h, up):
        act = ACTIVATION_FNS[self.config.activation]
        return act(h) * up if up is not None else act(h)

    def grouped(self, sorted_x_TKxD: jax.Array, group_sizes_E: jax.Array) -> jax.Array:
        """Dropless: rows sorted by expert, ``group_sizes_E`` rows each, through ``moejax.ops.gmm``."""
        x = sorted_x_TKxD
        w_in, w_up, w_out = self._weights(x.dtype)
        kw = dict(backend=self.config.gmm_backend, tiling=self.config.gmm_tiling,
                  interpret=self.config.gmm_interpret)
        h = gmm(x, w_in, group_sizes_E, **kw)
        up = gmm(x, w_up, group_sizes_E, **kw) if w_up is not None else None
        return gmm(self._hidden(h, up), w_out, group_sizes_E, **kw)

    def batched(self, x_ExCxD: jax.Array) -> jax.Array:
        """Capacity: a fixed ``[E, C, D]`` buffer, one batched matmul per projection."""
        x = x_ExCxD
        w_in, w_up, w_out = self._weights(x.dtype)
        h = jnp.einsum("ecd,edf->ecf", x, w_in)
        up = jnp.einsum("ecd,edf->ecf", x, w_up) if w_up is not None else None
        return jnp.einsum("ecf,efd->ecd", self._hidden(h, up), w_out)

    def _parallel_kw(self, layout: ExpertParallelLayout, x_TxD, assigned_TxK):
        w_in, w_up, w_out = self._weights(x_TxD.dtype)
        return dict(
            x_TxD=x_TxD, w_in_ExDxF=w_in, w_out_ExFxD=w_out,
            w_up_ExDxF=w_up, activation=ACTIVATION_FNS[self.config.activation],
            assigned_TxK=assigned_TxK, expert_axis=layout.expert_axis,
            token_axes=layout.token_axes, hidden_axes=layout.hidden_axes, remat=self.config.remat,
        )

    def dropless_parallel(self, layout: ExpertParallelLayout, x_TxD, expert_indices_TxK,
                          combine_weights_TxK, assigned_TxK) -> jax.Array:
        """Dropless under a mesh: per device, experts split over the expert axis; f32 ``[T, D]``."""
        return dropless_expert_parallel(
            expert_indices_TxK=expert_indices_TxK, combine_weights_TxK=combine_weights_TxK,
            gmm_backend=self.config.gmm_backend, gmm_tiling=self.config.gmm_tiling,
            gmm_interpret=self.config.gmm_interpret, exchange_factor=self.config.ep_exchange_factor,
            **self._parallel_kw(layout, x_TxD, assigned_TxK),
        )

    def capacity_parallel(self, layout: ExpertParallelLayout, x_TxD, expert_indices_TxK,
                          combine_weights_TxK, assigned_TxK):
        """GShard capacity dispatch under a mesh (per-device capacity); ``(y_TxD, dropped)``."""
        return capacity_expert_parallel(
            expert_indices_TxK=expert_indices_TxK, combine_weights_TxK=combine_weights_TxK,
            capacity_factor=self.config.capacity_factor,
            capacity_order=self.config.capacity_order,
            **self._parallel_kw(layout, x_TxD, assigned_TxK),
        )

    def dense(self, x_TxD: jax.Array, weights_TxE: jax.Array) -> jax.Array:
        """Dense: every expert on every token, outputs weighted by the ``[T, E]`` gates (f32)."""
        x = x_TxD
        w_in, w_up, w_out = self._weights(x.dtype)
        h = jnp.einsum("td,edf->tef", x, w_in)
        up = jnp.einsum("td,edf->tef", x, w_up) if w_up is not None else None
        y_TxExD = jnp.einsum("tef,efd->ted", self._hidden(h, up), w_out)
        return jnp.einsum("te,ted->td", weights_TxE.astype(jnp.float32), y_TxExD.astype(jnp.float32))


class SharedExperts(nnx.Module):
    """Always-on FFN of ``num_shared_experts`` experts (DeepSeekMoE), stored as one wide FFN.

    The sum of S FFNs of width F equals one FFN of width S·F, so one pair of matmuls does them all.
    """

    def __init__(self, config: MoEConfig, *, rngs: nnx.Rngs):
        d = config.d_model
        f = config.num_shared_experts * (config.shared_d_ff or config.d_ff)
        self.config = config
        dt, rules = config.param_dtype, fallback_rules(config.mesh_roles)
        self.w_in = param(rngs, (d, f), d, ("embed", "mlp"), dt, rules)
        if config.expert == "glu":
            self.w_up = param(rngs, (d, f), d, ("embed", "mlp"), dt, rules)
        self.w_out = param(rngs, (f, d), f, ("mlp", "embed"), dt, rules)

    def __call__(self, x_TxD: jax.Array) -> jax.Array:
        x = x_TxD
        dt = x.dtype
        h = ACTIVATION_FNS[self.config.activation](x @ self.w_in[...].astype(dt))
        if self.config.expert == "glu":
            h = h * (x @ self.w_up[...].astype(dt))
        return h @ self.w_out[...].astype(dt)
