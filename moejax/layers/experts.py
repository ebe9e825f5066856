"""Expert FFNs: ``E`` MLP or GLU experts stored as stacked weights, run in one of three dispatch modes.

The math lives in :mod:`moejax.ops.ffn`; these modules own the parameters and hand an
:class:`~moejax.ops.ffn.ExpertFFN` (weights, activation, gmm backend, tiling) to the dispatch.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from moejax.layers.config import MoEConfig
from moejax.layers.params import param
from moejax.ops.ffn import ExpertFFN, ffn
from moejax.parallel import fallback_rules


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

    def ffn(self, dtype) -> ExpertFFN:
        """The experts as an :class:`ExpertFFN` with weights in ``dtype``."""
        c = self.config
        return ExpertFFN(
            w_in=self.w_in[...], w_out=self.w_out[...],
            w_up=self.w_up[...] if c.expert == "glu" else None, activation=c.activation,
            gmm_backend=c.gmm_backend, gmm_tiling=c.gmm_tiling, gmm_interpret=c.gmm_interpret,
        ).astype(dtype)

    def grouped(self, sorted_x_TKxD: jax.Array, group_sizes_E: jax.Array) -> jax.Array:
        """Dropless: rows sorted by expert, ``group_sizes_E`` rows each, through ``moejax.ops.gmm``."""
        return self.ffn(sorted_x_TKxD.dtype).grouped(sorted_x_TKxD, group_sizes_E)

    def batched(self, x_ExCxD: jax.Array) -> jax.Array:
        """Capacity: a fixed ``[E, C, D]`` buffer, one batched matmul per projection."""
        return self.ffn(x_ExCxD.dtype).batched(x_ExCxD)

    def dense(self, x_TxD: jax.Array, weights_TxE: jax.Array) -> jax.Array:
        """Dense: every expert on every token, outputs weighted by the ``[T, E]`` gates (f32)."""
        y_TxExD = self.ffn(x_TxD.dtype).every_expert(x_TxD)
        return jnp.einsum("te,ted->td", weights_TxE.astype(jnp.float32), y_TxExD.astype(jnp.float32))


class SharedExperts(nnx.Module):
    """Always-on FFN of ``num_shared_experts`` experts (DeepSeekMoE), stored as one wide FFN.

    The sum of S FFNs of width F equals one FFN of width S·F, so one pair of matmuls does them all.
    With ``shared_expert_gate`` (Qwen2-MoE) the output is scaled by ``sigmoid(x @ w_gate)``,
    ``w_gate`` [D, 1].
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
        if config.shared_expert_gate:
            self.w_gate = param(rngs, (d, 1), d, ("embed", None), dt, rules)

    def __call__(self, x_TxD: jax.Array) -> jax.Array:
        dt = x_TxD.dtype
        w_up = self.w_up[...].astype(dt) if self.config.expert == "glu" else None
        y_TxD = ffn(x_TxD, self.w_in[...].astype(dt), self.w_out[...].astype(dt), w_up,
                    activation=self.config.activation)
        if self.config.shared_expert_gate:
            gate_Tx1 = jax.nn.sigmoid(x_TxD.astype(jnp.float32)
                                      @ self.w_gate[...].astype(jnp.float32))
            y_TxD = (y_TxD.astype(jnp.float32) * gate_Tx1).astype(y_TxD.dtype)
        return y_TxD
