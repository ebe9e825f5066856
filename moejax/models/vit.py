"""Vision transformer whose FFN blocks may be MoE layers: V-MoE (Riquelme et al. 2021) at small scale.

``logits_BxC, aux = ViT(config, rngs=nnx.Rngs(0))(images_BxHxWxC)``.

The image is cut into non-overlapping ``patch_size`` x ``patch_size`` patches (row-major), each
patch is flattened and projected to ``d_model``, and a learned position embedding is added. Each
block is pre-norm: ``x += attention(norm(x)); x += ffn(norm(x))`` with bidirectional multi-head
attention. Every ``moe_every``-th FFN (layers ``moe_every - 1``, ``2 * moe_every - 1``, ...) is a
:class:`moejax.MoE` whose tokens are the patches of the whole batch; the others are dense MLPs.
After a final norm the patch tokens are averaged (global average pooling) and a linear head gives
the class logits. The dense baseline is the same model with ``moe=None``.

V-MoE's routing is a top-k of the softmax of the router logits (``router="top_k"``) with capacity
dispatch in batch-priority order (``dispatch="capacity"``,
``capacity_order="batch_priority"``): when an expert overflows, the patches with the largest
routing weight anywhere in the batch keep their place. :func:`vmoe_config` builds that MoE config.

``aux`` (:class:`ViTAux`) sums each MoE auxiliary loss over the MoE layers and stacks the routing
metrics per MoE layer (``aux.metrics["tokens_per_expert"]`` is ``[num_moe_layers, E]``).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from moejax.layers.config import MoEConfig
from moejax.layers.moe import MoE
from moejax.layers.params import param
from moejax.ops import dispatch as dispatch_ops
from moejax.models.transformer import LMAux, param_counts, stack_aux
from moejax.ops.ffn import ACTIVATION_FNS, ffn


@dataclasses.dataclass(frozen=True)
class ViTConfig:
    """Hyperparameters of :class:`ViT`. ``d_ff`` is the dense FFN width (experts: ``moe.d_ff``)."""

    image_size: int
    channels: int
    patch_size: int
    num_classes: int
    d_model: int
    num_layers: int
    num_heads: int
    d_ff: int
    moe: MoEConfig | None = None
    moe_every: int = 2
    activation: str = "gelu"
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    def __post_init__(self):
        for name in ("image_size", "channels", "patch_size", "num_classes", "d_model",
                     "num_layers", "num_heads", "d_ff", "moe_every"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"ViTConfig.{name} must be a positive int, got {value!r}")
        if self.image_size % self.patch_size:
            raise ValueError(f"ViTConfig.image_size = {self.image_size} must be a multiple of "
                             f"patch_size = {self.patch_size}")
        if self.d_model % self.num_heads:
            raise ValueError(f"ViTConfig.d_model = {self.d_model} must be a multiple of "
                             f"num_heads = {self.num_heads}")
        if self.activation not in ACTIVATION_FNS:
            raise ValueError(f"ViTConfig.activation must be one of {sorted(ACTIVATION_FNS)}, "
                             f"got {self.activation!r}")
        if self.moe is not None:
            if not isinstance(self.moe, MoEConfig):
                raise ValueError(f"ViTConfig.moe must be a moejax.MoEConfig or None, got "
                                 f"{type(self.moe).__name__}")
            if self.moe.d_model != self.d_model:
                raise ValueError(f"ViTConfig.moe.d_model = {self.moe.d_model} must equal "
                                 f"d_model = {self.d_model}")
            if self.moe_every > self.num_layers:
                raise ValueError(f"ViTConfig.moe_every = {self.moe_every} exceeds num_layers = "
                                 f"{self.num_layers}: the model would have no MoE layer")

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    @property
    def patch_dim(self) -> int:
        return self.patch_size * self.patch_size * self.channels

    def is_moe_layer(self, layer: int) -> bool:
        return self.moe is not None and (layer + 1) % self.moe_every == 0

    @property
    def num_moe_layers(self) -> int:
        return sum(self.is_moe_layer(i) for i in range(self.num_layers))

    def replace(self, **changes) -> "ViTConfig":
        return dataclasses.replace(self, **changes)


def vmoe_config(d_model: int, d_ff: int, num_experts: int, *, experts_per_token: int = 2,
                capacity_factor: float = 1.0, dispatch: str = "capacity",
                **overrides) -> MoEConfig:
    """V-MoE's MoE layer: top-k of the router softmax, batch-priority capacity, a balancing loss."""
    return MoEConfig(d_model=d_model, d_ff=d_ff, num_experts=num_experts,
                     experts_per_token=experts_per_token,
                     router="top_k", dispatch=dispatch,
                     capacity_factor=capacity_factor, capacity_order="batch_priority",
                     **overrides)


# The same as the language model's: losses summed over MoE layers, metrics stacked per layer.
ViTAux = LMAux


def patchify(images_BxHxWxC: jax.Array, patch_size: int) -> jax.Array:
    """``[B, H, W, C]`` -> ``[B, (H/p) * (W/p), p * p * C]``, patches in row-major order."""
    b, h, w, c = images_BxHxWxC.shape
    p = patch_size
    x = images_BxHxWxC.reshape(b, h // p, p, w // p, p, c)
    x = x.transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(b, (h // p) * (w // p), p * p * c)


class LayerNorm(nnx.Module):
    """Layer normalisation without bias, in float32; ``scale`` [D] starts at 1."""

    def __init__(self, d_model: int, param_dtype, *, eps: float = 1e-6):
        self.eps = eps
        self.scale = nnx.Param(jnp.ones((d_model,), param_dtype))

    def __call__(self, x_BxNxD):
        x = x_BxNxD.astype(jnp.float32)
        x = x - jnp.mean(x, axis=-1, keepdims=True)
        x = x * jax.lax.rsqrt(jnp.mean(jnp.square(x), axis=-1, keepdims=True) + self.eps)
        return (x * self.scale[...].astype(jnp.float32)[None, None, :]).astype(x_BxNxD.dtype)


class SelfAttention(nnx.Module):
    """Bidirectional multi-head self-attention over the patches; softmax in float32."""

    def __init__(self, config: ViTConfig, *, rngs: nnx.Rngs):
        d, h = config.d_model, config.num_heads
        k = d // h
        pd = config.param_dtype
        self.config = config
        self.w_qkv = param(rngs, (3, d, h, k), d, (None, "embed", "heads", None), pd)
        self.w_o = param(rngs, (h, k, d), d, ("heads", None, "embed"), pd)

    def __call__(self, x_BxNxD):
        dt = self.config.dtype
        q, k, v = jnp.einsum("bnd,tdhk->tbnhk", x_BxNxD.astype(dt), self.w_qkv[...].astype(dt))
        scale = q.shape[-1] ** -0.5
        logits_BxHxNxN = jnp.einsum("bqhk,bshk->bhqs", q, k,
                                    preferred_element_type=jnp.float32) * scale
        probs = jax.nn.softmax(logits_BxHxNxN, axis=-1).astype(dt)
        out_BxNxHxK = jnp.einsum("bhqs,bshk->bqhk", probs, v)
        return jnp.einsum("bnhk,hkd->bnd", out_BxNxHxK, self.w_o[...].astype(dt))


class MLP(nnx.Module):
    def __init__(self, config: ViTConfig, *, rngs: nnx.Rngs):
        d, f = config.d_model, config.d_ff
        self.config = config
        self.w_in = param(rngs, (d, f), d, ("embed", "mlp"), config.param_dtype)
        self.w_out = param(rngs, (f, d), f, ("mlp", "embed"), config.param_dtype)

    def __call__(self, x_BxNxD):
        dt = self.config.dtype
        return ffn(x_BxNxD.astype(dt), self.w_in[...].astype(dt), self.w_out[...].astype(dt),
                   activation=self.config.activation)


class EncoderBlock(nnx.Module):
    def __init__(self, config: ViTConfig, is_moe: bool, *, rngs: nnx.Rngs):
        self.is_moe = is_moe
        self.attention_norm = LayerNorm(config.d_model, config.param_dtype)
        self.attention = SelfAttention(config, rngs=rngs)
        self.ffn_norm = LayerNorm(config.d_model, config.param_dtype)
        self.ffn = MoE(config.moe, rngs=rngs) if is_moe else MLP(config, rngs=rngs)

    def __call__(self, x_BxNxD, key, deterministic):
        x_BxNxD = x_BxNxD + self.attention(self.attention_norm(x_BxNxD)).astype(x_BxNxD.dtype)
        h_BxNxD = self.ffn_norm(x_BxNxD)
        if self.is_moe:
            y_BxNxD, aux = self.ffn(h_BxNxD, rngs=key, deterministic=deterministic)
        else:
            y_BxNxD, aux = self.ffn(h_BxNxD), None
        return x_BxNxD + y_BxNxD.astype(x_BxNxD.dtype), aux


class ViT(nnx.Module):
    """``logits_BxC, aux = model(images_BxHxWxC, rngs=key, deterministic=False)``.

    ``rngs`` (a key) feeds noisy routers in training; ``deterministic=True`` routes without noise
    (evaluation). Attributes: ``patch_embed`` [P, D], ``pos_embed`` [N, D], ``layers``,
    ``final_norm``, ``head`` [D, classes] (starts at zero, as in ViT).
    """

    def __init__(self, config: ViTConfig, *, rngs: nnx.Rngs):
        if not isinstance(config, ViTConfig):
            raise ValueError(f"config must be a ViTConfig, got {type(config).__name__}")
        c = config
        self.config = c
        self.patch_embed = param(rngs, (c.patch_dim, c.d_model), c.patch_dim, (None, "embed"),
                                 c.param_dtype)
        self.pos_embed = nnx.Param(
            0.02 * jax.random.normal(rngs.params(), (c.num_patches, c.d_model), c.param_dtype))
        self.layers = nnx.List([EncoderBlock(c, c.is_moe_layer(i), rngs=rngs)
                                for i in range(c.num_layers)])
        self.final_norm = LayerNorm(c.d_model, c.param_dtype)
        self.head = nnx.Param(jnp.zeros((c.d_model, c.num_classes), c.param_dtype))

    def __call__(self, images_BxHxWxC: jax.Array, *, rngs: jax.Array | None = None,
                 deterministic: bool | None = None):
        c = self.config
        expected = (c.image_size, c.image_size, c.channels)
        if images_BxHxWxC.ndim != 4 or tuple(images_BxHxWxC.shape[1:]) != expected:
            raise ValueError(f"images must be float [batch, {c.image_size}, {c.image_size}, "
                             f"{c.channels}], got shape {tuple(images_BxHxWxC.shape)}")
        if not jnp.issubdtype(images_BxHxWxC.dtype, jnp.floating):
            raise ValueError(f"images must be floating point (scaled to about [0, 1]), got "
                             f"{images_BxHxWxC.dtype}")
        dt = c.dtype
        patches_BxNxP = patchify(images_BxHxWxC.astype(dt), c.patch_size)
        x_BxNxD = patches_BxNxP @ self.patch_embed[...].astype(dt)
        x_BxNxD = x_BxNxD + self.pos_embed[...].astype(dt)[None, :, :]
        auxes = []
        for i, block in enumerate(self.layers):
            key = None if rngs is None else jax.random.fold_in(rngs, i)
            x_BxNxD, aux = block(x_BxNxD, key, deterministic)
            if aux is not None:
                auxes.append(aux)
        pooled_BxD = jnp.mean(self.final_norm(x_BxNxD).astype(jnp.float32), axis=1)
        logits_BxC = pooled_BxD @ self.head[...].astype(jnp.float32)
        return logits_BxC, stack_aux(auxes)

    def moe_layers(self) -> list[MoE]:
        """The MoE layers, first to last."""
        return [block.ffn for block in self.layers if block.is_moe]

    def routes(self, images_BxHxWxC: jax.Array) -> list[dict[str, jax.Array]]:
        """Where each patch goes in every MoE layer, in evaluation mode (no routing noise).

        One dict per MoE layer: ``experts`` int [B, N, k] (the chosen experts), ``weights`` [B, N, k]
        (their gates) and ``kept`` bool [B, N, k] (False where capacity dispatch dropped the copy;
        all True for dense and dropless dispatch). The forward pass is the model's own.
        """
        c = self.config
        dt = c.dtype
        b = images_BxHxWxC.shape[0]
        x_BxNxD = patchify(images_BxHxWxC.astype(dt), c.patch_size) @ self.patch_embed[...].astype(dt)
        x_BxNxD = x_BxNxD + self.pos_embed[...].astype(dt)[None, :, :]
        found = []
        for block in self.layers:
            if block.is_moe:
                moe = block.ffn
                h = block.attention_norm(x_BxNxD)
                h_TxD = block.ffn_norm(x_BxNxD + block.attention(h).astype(x_BxNxD.dtype))
                h_TxD = h_TxD.reshape(-1, c.d_model)
                routing = moe.router(h_TxD, deterministic=True)
                experts_TxK, weights_TxK = routing.expert_indices, routing.combine_weights
                kept_TxK = jnp.ones(experts_TxK.shape, jnp.bool_)
                if moe.config.dispatch == "capacity":
                    m = moe.config
                    capacity = dispatch_ops.expert_capacity(h_TxD.shape[0], experts_TxK.shape[1],
                                                            m.num_experts, m.capacity_factor)
                    kept_TxK = dispatch_ops.capacity_dispatch(
                        experts_TxK, weights_TxK, m.num_experts, capacity, m.capacity_order,
                        weights_TxK != 0).kept_TxK
                shape = (b, c.num_patches, experts_TxK.shape[1])
                found.append({"experts": experts_TxK.reshape(shape),
                              "weights": weights_TxK.reshape(shape),
                              "kept": kept_TxK.reshape(shape)})
            x_BxNxD, _ = block(x_BxNxD, None, True)
        return found


def count_params(config: ViTConfig) -> dict[str, int]:
    """Parameter counts: ``total`` and ``active`` (k of E experts per patch)."""
    return param_counts(nnx.eval_shape(lambda: ViT(config, rngs=nnx.Rngs(0))), config.moe)
