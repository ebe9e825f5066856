"""Linen front door: ``moejax.linen.MoE(config)``, the NNX layer wrapped with ``flax.nnx.bridge``.

    y, aux = moejax.linen.MoE(config).apply(variables, x, rngs={"router": key})

Same ``(y, aux)`` as :class:`moejax.MoE`. Rng streams: ``params`` at init, ``router`` for routing noise
and input jitter in training (deterministic routers need none at apply time). Evaluation:
``deterministic=True``. Parameters live under ``variables["params"]["layer"]`` with the NNX layer's
structure (``router``, ``experts``, ``shared``); DeepSeek-V3's bias is in the ``router_bias``
collection and the hash table in ``router_table``.
"""

from __future__ import annotations

import jax
from flax import linen as nn
from flax.nnx import bridge

from moejax.layers.config import MoEConfig
from moejax.layers.moe import MoE as _NNXMoE


class MoE(nn.Module):
    """Linen Mixture-of-Experts layer; see :class:`moejax.MoE` for the computation."""

    config: MoEConfig

    @nn.compact
    def __call__(self, x: jax.Array, *, token_ids: jax.Array | None = None,
                 token_mask: jax.Array | None = None, deterministic: bool = False):
        layer = bridge.ToLinen(_NNXMoE, args=(self.config,), name="layer")
        return layer(x, token_ids=token_ids, token_mask=token_mask, deterministic=deterministic)
