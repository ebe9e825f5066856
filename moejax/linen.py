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
from moejax.layers.moe import missing_stream_message, router_needs_rng


class MoE(nn.Module):
    """Linen Mixture-of-Experts layer; see :class:`moejax.MoE` for the computation.

    ``deterministic`` may be set on the module or passed to the call (Flax's ``Dropout`` convention);
    neither means training. In training, routers that draw random numbers take a fresh key from the
    apply's ``MoEConfig.rng_stream`` stream (default ``router``), else from ``dropout``; at init,
    from ``params`` when neither is given (init with a single key). A training apply without
    either stream raises a ValueError naming them, never a fixed seed.
    """

    config: MoEConfig
    deterministic: bool | None = None

    @nn.compact
    def __call__(self, x: jax.Array, *, token_ids: jax.Array | None = None,
                 token_mask: jax.Array | None = None, deterministic: bool | None = None):
        if deterministic is None:
            deterministic = bool(self.deterministic)
        key = None
        if router_needs_rng(self.config, not deterministic):
            stream = next((n for n in (self.config.rng_stream, "dropout") if self.has_rng(n)),
                          "params" if self.is_initializing() else None)
            if stream is None:
                raise ValueError(missing_stream_message(self.config))
            key = self.make_rng(stream)
        layer = bridge.ToLinen(_NNXMoE, args=(self.config,), name="layer")
        return layer(x, token_ids=token_ids, token_mask=token_mask, deterministic=deterministic,
                     rngs=key)
