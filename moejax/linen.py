"""Linen front door: ``moejax.linen.MoE(config)``, the NNX layer wrapped with ``flax.nnx.bridge``.

    y, aux = moejax.linen.MoE(config).apply(variables, x, rngs={"router": key})

Same ``(y, aux)`` as :class:`moejax.MoE`. Parameters live under ``variables["params"]["layer"]``
with the NNX layer's structure (``router``, ``experts``, ``shared``), each boxed as
``nn.LogicallyPartitioned`` with its logical axis names, so the host's own Linen recipe applies:
``nn.get_partition_spec(variables)`` + ``nn.logical_to_mesh_sharding(..., rules)`` under the host's
``axis_rules`` (a name the rules do not map is replicated), and ``nn.scan(...,
metadata_params={nn.PARTITION_NAME: "layers"})`` adds the scan axis to every name. DeepSeek-V3's
bias is in the ``router_bias`` collection and the hash table in ``router_table``.

Rng streams: ``params`` at init; in training, routers that draw random numbers take a fresh key
from ``MoEConfig.rng_stream`` (default ``router``), else ``dropout``, else (at init only)
``params`` — so ``init`` with a single key works. Evaluation: ``deterministic=True``.

With ``MoEConfig.sow_aux`` the weighted aux loss and metrics are also sown into the
``intermediates`` collection (``apply(..., mutable=["intermediates"])``); ``moejax.collect_aux``
sums them.

The NNX layer is rebuilt abstractly (``nnx.eval_shape``) on each apply and filled with the
variables given: no parameter is initialised outside ``init``.
"""

from __future__ import annotations

import jax
from flax import linen as nn
from flax import nnx
from flax.nnx import bridge

from moejax.layers.config import MoEConfig
from moejax.layers.moe import MoE as _NNXMoE
from moejax.layers.moe import missing_stream_message, router_needs_rng


def _build(config: MoEConfig, initializing: bool, *, rngs: nnx.Rngs) -> _NNXMoE:
    """The NNX layer: initialised at ``init``; at apply, only its structure (the values follow)."""
    if initializing:
        return _NNXMoE(config, rngs=rngs)
    return nnx.eval_shape(lambda: _NNXMoE(config, rngs=nnx.Rngs(params=0)))


def _to_linen_variable(variable: nnx.Variable):
    """An NNX variable as a Linen value: boxed with its logical axis names when it has any."""
    value = variable.get_value()
    names = variable.get_metadata().get("out_sharding")
    if names:
        return nn.LogicallyPartitioned(value, tuple(names))
    return value


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
        if not isinstance(self.config, MoEConfig):
            raise ValueError(
                f"config must be a moejax.MoEConfig, got {type(self.config).__name__}")
        if deterministic is None:
            deterministic = bool(self.deterministic)
        initializing = self.is_initializing()
        key = None
        if router_needs_rng(self.config, not deterministic):
            stream = next((n for n in (self.config.rng_stream, "dropout") if self.has_rng(n)),
                          "params" if initializing else None)
            if stream is None:
                raise ValueError(missing_stream_message(self.config))
            key = self.make_rng(stream)
        if not initializing:
            self._check_collections()
        layer = bridge.ToLinen(_build, args=(self.config, initializing),
                               metadata_fn=_to_linen_variable, name="layer")
        return layer(x, token_ids=token_ids, token_mask=token_mask, deterministic=deterministic,
                     rngs=key)

    def _check_collections(self):
        needed = {"params"}
        if self.config.router == "deepseek_v3":
            needed.add("router_bias")
        if self.config.router == "hash":
            needed.add("router_table")
        missing = sorted(c for c in needed if not self.has_variable(c, "layer"))
        if missing:
            raise ValueError(
                f"moejax.linen.MoE (router={self.config.router!r}) needs the variable "
                f"collections {missing} from init; pass every collection init returned "
                "(variables, not only variables['params'])")
