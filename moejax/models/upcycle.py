"""Sparse upcycling (Komatsuzaki et al. 2022): an MoE model started from a dense checkpoint.

``config, params = upcycle(dense_params, dense_config, moe_config, noise=0.0, seed=0)`` copies
every dense FFN that becomes an MoE layer into each of its experts, starts the router at zero
(``noise=0``) or from ``N(0, noise^2)``, and keeps every other parameter as it is. With
``moe_config.d_ff`` a divisor ``d_ff / m`` of the dense width, experts are fine-grained: expert
``e`` gets the ``e mod m``-th slice of the dense FFN's hidden units.

With full-width experts and gates that sum to 1 per token (``mixtral``; ``top_k`` with
``renormalize``; ``softmax``), every token's MoE output is ``sum_i g_i FFN(x) = FFN(x)``, so the
upcycled model starts with the dense model's logits (up to float rounding: the experts' matmuls
run in another order than the dense FFN's).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from moejax.layers.config import MoEConfig
from moejax.models.transformer import Transformer, TransformerConfig


def _path(path) -> str:
    return "/".join(str(getattr(p, "key", getattr(p, "name", p))) for p in path)


def upcycle(dense_params, dense_config: TransformerConfig,
            moe_config: MoEConfig | TransformerConfig, *, noise: float = 0.0, seed: int = 0):
    """``(config, params)`` of the upcycled model; ``params`` is an ``nnx.State`` of parameters.

    ``dense_params``: the dense model's parameters (``nnx.State``) or the model. ``moe_config``: the
    experts' :class:`MoEConfig` (every layer becomes MoE), or the whole target
    :class:`TransformerConfig` (its ``moe_every`` / ``first_dense_layers`` choose the layers).
    Build the model with ``Transformer(config, rngs=...)`` and ``nnx.update(model, params)``.
    """
    if dense_config.moe is not None:
        raise ValueError("dense_config must be a dense model (moe=None)")
    if dense_config.scan_layers:
        raise ValueError("upcycle needs scan_layers=False")
    if isinstance(moe_config, MoEConfig):
        config = dense_config.replace(moe=moe_config, moe_every=1)
    elif isinstance(moe_config, TransformerConfig):
        config = moe_config
    else:
        raise ValueError(f"moe_config must be a MoEConfig or TransformerConfig, got "
                         f"{type(moe_config).__name__}")
    moe = config.moe
    if moe is None or config.scan_layers:
        raise ValueError("the target config needs moe set and scan_layers=False")
    if config.replace(moe=None, moe_every=1, first_dense_layers=0) != dense_config.replace(
            moe_every=1, first_dense_layers=0):
        raise ValueError("the target config must equal dense_config apart from moe, moe_every and "
                         "first_dense_layers")
    if (moe.expert == "glu") != (dense_config.dense_ffn == "glu") or (
            moe.activation != dense_config.activation):
        raise ValueError(f"experts (expert={moe.expert!r}, activation={moe.activation!r}) must "
                         f"match the dense FFN (dense_ffn={dense_config.dense_ffn!r}, "
                         f"activation={dense_config.activation!r})")
    if dense_config.d_ff % moe.d_ff:
        raise ValueError(f"MoEConfig.d_ff = {moe.d_ff} must divide the dense d_ff = "
                         f"{dense_config.d_ff}")
    if moe.num_shared_experts:
        raise ValueError("upcycle makes routed experts only (num_shared_experts = 0)")
    if isinstance(dense_params, nnx.Module):
        dense_params = nnx.state(dense_params, nnx.Param)
    dense = {_path(p): v.get_value() for p, v in nnx.to_flat_state(dense_params)}
    abstract = nnx.state(nnx.eval_shape(lambda: Transformer(config, rngs=nnx.Rngs(0))), nnx.Param)
    pieces = dense_config.d_ff // moe.d_ff
    rng = np.random.default_rng(seed)
    out = []
    for path, variable in nnx.to_flat_state(abstract):
        name = _path(path)
        want = variable.get_value()
        if name in dense:
            value = dense[name]
        elif "/ffn/experts/" in name:
            layer, weight = name.split("/ffn/experts/")
            w = dense[f"{layer}/ffn/{weight}"]
            axis = 0 if weight == "w_out" else 1  # the hidden axis F
            slices = jnp.split(w, pieces, axis=axis)
            value = jnp.stack([slices[e % pieces] for e in range(moe.num_experts)])
        elif "/ffn/router/" in name:
            value = jnp.asarray(noise * rng.standard_normal(want.shape), want.dtype)
        else:
            raise ValueError(f"upcycle does not know how to initialise {name} (router "
                             f"{moe.router!r}); use a logits router")
        if value.shape != want.shape:
            raise ValueError(f"{name}: got shape {value.shape} from the dense model, the target "
                             f"needs {want.shape}")
        out.append((path, variable.replace(jnp.asarray(value, want.dtype))))
    return config, nnx.from_flat_state(out)
