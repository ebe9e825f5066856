"""Decoder-only transformer LM whose FFN blocks may be MoE layers (flax.nnx).

``logits_BxLxV, aux = Transformer(config, rngs=nnx.Rngs(0))(tokens_BxL, token_mask=mask_BxL)``.
Each block is pre-norm:
``x += attention(rms_norm(x)); x += ffn(rms_norm(x))`` with rotary position embeddings (RoPE) and
causal multi-head attention. Every ``moe_every``-th FFN (layers ``moe_every - 1``, ``2 * moe_every -
1``, ...) after the first ``first_dense_layers`` is a :class:`moejax.MoE`; the others are dense
FFNs. The dense baseline is the same model with ``moe=None``.

The options published MoE models need are fields of the one config (see
:mod:`moejax.models.presets`): grouped-query attention (``num_kv_heads``), a head size of its own
(``attention_head_dim``), q/k/v biases, q/k RMSNorm per head or over all heads (``qk_norm``), the
RoPE base and linear position scaling, tied embeddings, SwiGLU dense FFNs (``dense_ffn="glu"``) and
the norm epsilon. Their defaults are the original model.

:meth:`Transformer.extend` runs new tokens against a :class:`KVCache` (static size, one slot per
token; see :mod:`moejax.models.generate`).

``aux`` (:class:`LMAux`) sums each MoE auxiliary loss over the MoE layers (``aux.total_loss`` is the
term to add to the LM loss) and stacks the routing metrics per MoE layer, e.g.
``aux.metrics["tokens_per_expert"]`` is ``[num_moe_layers, E]``. ``token_mask`` (bool [B, L], True = a
real token) goes to every MoE layer: padding is routed nowhere and counts in no MoE loss or metric.
Attention stays causal and unmasked, so with right padding no real token ever attends to a pad.

With ``scan_layers=True`` the layers are grouped into ``num_layers / moe_every`` identical periods
(``moe_every - 1`` dense blocks, then one MoE block) whose parameters are stacked on a leading axis
and run under ``nnx.scan``: compile time stops growing with depth. Stacked parameters carry ``None``
as the logical name of that axis (never split).
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from moejax.layers.config import MoEConfig
from moejax.layers.params import logical_param, param
from moejax.layers.moe import MoE
from moejax.ops import routing as R
from moejax.ops.ffn import ACTIVATION_FNS, ffn
from moejax.parallel import constrain


@dataclasses.dataclass(frozen=True)
class TransformerConfig:
    """Hyperparameters of :class:`Transformer`.

    ``d_ff`` is the width of the dense FFN blocks (the experts' width is ``moe.d_ff``).
    ``moe.d_model`` must equal ``d_model``. ``remat`` recomputes each block's activations in the
    backward pass (``jax.checkpoint``).
    """

    vocab_size: int
    d_model: int
    num_layers: int
    num_heads: int
    d_ff: int
    max_len: int
    moe: MoEConfig | None = None
    moe_every: int = 1
    activation: str = "gelu"
    rope_base: float = 10_000.0
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    remat: bool = False
    scan_layers: bool = False
    # Architecture options of published models (defaults: the original model above).
    num_kv_heads: int | None = None          # grouped-query attention; None: num_heads
    attention_head_dim: int | None = None    # None: d_model // num_heads
    qkv_bias: bool = False                   # biases on the q, k, v projections (Qwen2)
    qk_norm: str | None = None               # "head" (Qwen3) or "full" (OLMoE) RMSNorm on q, k
    rope_scaling: float = 1.0                # linear position interpolation: positions / factor
    norm_eps: float = 1e-6
    tie_embeddings: bool = False             # logits = h @ embed.T, no lm_head
    dense_ffn: str = "mlp"                   # "glu": act(x w_in) * (x w_up) (SwiGLU with silu)
    first_dense_layers: int = 0              # DeepSeek's first_k_dense_replace

    def __post_init__(self):
        for name in ("vocab_size", "d_model", "num_layers", "num_heads", "d_ff", "max_len",
                     "moe_every"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"TransformerConfig.{name} must be a positive int, got {value!r}")
        for name in ("num_kv_heads", "attention_head_dim"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool)
                                      or value < 1):
                raise ValueError(f"TransformerConfig.{name} must be a positive int or None, got "
                                 f"{value!r}")
        if self.attention_head_dim is None and (
                self.d_model % self.num_heads or (self.d_model // self.num_heads) % 2):
            raise ValueError(
                f"TransformerConfig.d_model = {self.d_model} must be num_heads = {self.num_heads} "
                "times an even head dimension (RoPE rotates pairs of features)"
            )
        if self.attention_head_dim is not None and self.attention_head_dim % 2:
            raise ValueError(f"TransformerConfig.attention_head_dim = {self.attention_head_dim} "
                             "must be even (RoPE rotates pairs of features)")
        if self.num_heads % self.kv_heads:
            raise ValueError(f"TransformerConfig.num_kv_heads = {self.num_kv_heads} must divide "
                             f"num_heads = {self.num_heads}")
        if self.qk_norm not in (None, "head", "full"):
            raise ValueError(f"TransformerConfig.qk_norm must be None, 'head' or 'full', got "
                             f"{self.qk_norm!r}")
        if self.dense_ffn not in ("mlp", "glu"):
            raise ValueError(f"TransformerConfig.dense_ffn must be 'mlp' or 'glu', got "
                             f"{self.dense_ffn!r}")
        for name in ("rope_scaling", "norm_eps", "rope_base"):
            if not getattr(self, name) > 0:
                raise ValueError(f"TransformerConfig.{name} must be > 0, got "
                                 f"{getattr(self, name)!r}")
        if (not isinstance(self.first_dense_layers, int) or self.first_dense_layers < 0
                or self.first_dense_layers >= self.num_layers):
            raise ValueError(f"TransformerConfig.first_dense_layers must be an int in [0, "
                             f"num_layers = {self.num_layers}), got {self.first_dense_layers!r}")
        if self.scan_layers and self.first_dense_layers:
            raise ValueError("TransformerConfig.scan_layers needs first_dense_layers = 0 (the "
                             "scanned periods must be identical)")
        if self.activation not in ACTIVATION_FNS:
            raise ValueError(f"TransformerConfig.activation must be one of "
                             f"{sorted(ACTIVATION_FNS)}, got {self.activation!r}")
        if self.moe is not None:
            if not isinstance(self.moe, MoEConfig):
                raise ValueError(f"TransformerConfig.moe must be a moejax.MoEConfig or None, got "
                                 f"{type(self.moe).__name__}")
            if self.moe.d_model != self.d_model:
                raise ValueError(f"TransformerConfig.moe.d_model = {self.moe.d_model} must equal "
                                 f"d_model = {self.d_model}")
            if self.moe_every > self.num_layers - self.first_dense_layers:
                raise ValueError(f"TransformerConfig.moe_every = {self.moe_every} exceeds "
                                 f"num_layers - first_dense_layers = "
                                 f"{self.num_layers - self.first_dense_layers}: the model would "
                                 "have no MoE layer")
        if self.scan_layers and self.num_layers % self.period:
            raise ValueError(f"TransformerConfig.scan_layers needs num_layers = {self.num_layers} "
                             f"divisible by moe_every = {self.moe_every}")

    @property
    def head_dim(self) -> int:
        return self.attention_head_dim or self.d_model // self.num_heads

    @property
    def kv_heads(self) -> int:
        return self.num_kv_heads or self.num_heads

    @property
    def period(self) -> int:
        """Layers per repeating unit: ``moe_every`` with MoE, 1 for the dense model."""
        return self.moe_every if self.moe is not None else 1

    def is_moe_layer(self, layer: int) -> bool:
        return (self.moe is not None and layer >= self.first_dense_layers
                and (layer + 1 - self.first_dense_layers) % self.moe_every == 0)

    @property
    def num_moe_layers(self) -> int:
        return sum(self.is_moe_layer(i) for i in range(self.num_layers))

    def replace(self, **changes) -> "TransformerConfig":
        return dataclasses.replace(self, **changes)


class LMAux(NamedTuple):
    """MoE losses summed over layers (``losses``) and routing metrics stacked per MoE layer."""

    losses: dict[str, jax.Array]
    metrics: dict[str, jax.Array]

    @property
    def total_loss(self) -> jax.Array:
        return sum(self.losses.values(), jnp.zeros((), jnp.float32))


class KVCache(NamedTuple):
    """Keys and values of every layer for ``S`` token slots: ``k``, ``v`` [layers, B, S, KVH, K].

    ``valid_BxS`` marks the slots that hold a real token, ``positions_BxS`` their RoPE positions
    (each row counts its own real tokens, so padding leaves no gap), ``index`` is the next free
    slot (the same for every row). :meth:`Transformer.init_cache` makes an empty one.
    """

    k: jax.Array
    v: jax.Array
    valid_BxS: jax.Array
    index: jax.Array

    @property
    def size(self) -> int:
        return self.k.shape[2]

    @property
    def num_real_B(self) -> jax.Array:
        return jnp.sum(self.valid_BxS, axis=1, dtype=jnp.int32)


class LayerKV(NamedTuple):
    """One layer's slice of a :class:`KVCache` and where this call writes (``index``)."""

    k: jax.Array
    v: jax.Array
    valid_BxS: jax.Array
    index: jax.Array


class RMSNorm(nnx.Module):
    """``x / rms(x) * scale`` over the last axis, in float32; ``scale`` [D] starts at 1."""

    def __init__(self, d_model: int, param_dtype, *, eps: float = 1e-6, axes=("embed",)):
        self.eps = eps
        self.scale = nnx.Param(jnp.ones((d_model,), param_dtype), out_sharding=axes,
                               eager_sharding=False)

    def __call__(self, x):
        x32 = x.astype(jnp.float32)
        inv_rms = jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + self.eps)
        scale = self.scale[...].astype(jnp.float32).reshape((1,) * (x.ndim - 1) + (-1,))
        return (x32 * inv_rms * scale).astype(x.dtype)


def rope(x_BxLxHxK: jax.Array, base: float, positions_BxL: jax.Array | None = None,
         scaling: float = 1.0) -> jax.Array:
    """Rotary position embedding (Su et al. 2021), half-split form.

    Positions are ``0..L-1`` unless ``positions_BxL`` gives each token's own; ``scaling`` > 1 is
    linear position interpolation (positions divided by it).
    """
    _, length, _, head_dim = x_BxLxHxK.shape
    half = head_dim // 2
    inv_freq_K2 = base ** (-jnp.arange(half, dtype=jnp.float32) / half)
    if positions_BxL is None:
        positions_BxL = jnp.arange(length, dtype=jnp.float32)[None, :]
    positions_BxL = positions_BxL.astype(jnp.float32)
    if scaling != 1.0:
        positions_BxL = positions_BxL / scaling
    angle_BxLxK2 = positions_BxL[:, :, None] * inv_freq_K2[None, None, :]
    sin = jnp.sin(angle_BxLxK2)[:, :, None, :]
    cos = jnp.cos(angle_BxLxK2)[:, :, None, :]
    x = x_BxLxHxK.astype(jnp.float32)
    x1, x2 = x[..., :half], x[..., half:]
    rotated = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return rotated.astype(x_BxLxHxK.dtype)


class Attention(nnx.Module):
    """Causal grouped-query self-attention with RoPE; softmax in float32.

    ``w_q`` [D, H, K], ``w_k`` / ``w_v`` [D, KVH, K], ``w_o`` [H, K, D]; with ``qkv_bias`` also
    ``b_q`` [H, K], ``b_k`` / ``b_v`` [KVH, K]; with ``qk_norm`` RMSNorms ``q_norm`` / ``k_norm``
    over each head's K features ("head") or over all heads' features ("full"). Each group of
    ``H / KVH`` query heads shares one key/value head.
    """

    def __init__(self, config: TransformerConfig, *, rngs: nnx.Rngs):
        d, h, g, k = config.d_model, config.num_heads, config.kv_heads, config.head_dim
        self.config = config
        pd = config.param_dtype
        self.w_q = param(rngs, (d, h, k), d, ("embed", "heads", None), pd)
        self.w_k = param(rngs, (d, g, k), d, ("embed", "heads", None), pd)
        self.w_v = param(rngs, (d, g, k), d, ("embed", "heads", None), pd)
        self.w_o = param(rngs, (h, k, d), h * k, ("heads", None, "embed"), pd)
        if config.qkv_bias:
            self.b_q = logical_param(jnp.zeros((h, k), pd), ("heads", None))
            self.b_k = logical_param(jnp.zeros((g, k), pd), ("heads", None))
            self.b_v = logical_param(jnp.zeros((g, k), pd), ("heads", None))
        if config.qk_norm is not None:
            full = config.qk_norm == "full"
            self.q_norm = RMSNorm(h * k if full else k, pd, eps=config.norm_eps, axes=(None,))
            self.k_norm = RMSNorm(g * k if full else k, pd, eps=config.norm_eps, axes=(None,))

    def _project(self, x_BxLxD, positions_BxL):
        c = self.config
        dt = c.dtype
        x = x_BxLxD.astype(dt)
        q = jnp.einsum("bld,dhk->blhk", x, self.w_q[...].astype(dt))
        k = jnp.einsum("bld,dhk->blhk", x, self.w_k[...].astype(dt))
        v = jnp.einsum("bld,dhk->blhk", x, self.w_v[...].astype(dt))
        if c.qkv_bias:
            q, k, v = (t + b[...].astype(dt)[None, None] for t, b in ((q, self.b_q), (k, self.b_k),
                                                           (v, self.b_v)))
        if c.qk_norm == "head":
            q, k = self.q_norm(q), self.k_norm(k)
        elif c.qk_norm == "full":
            q = self.q_norm(q.reshape(*q.shape[:2], -1)).reshape(q.shape)
            k = self.k_norm(k.reshape(*k.shape[:2], -1)).reshape(k.shape)
        q = rope(q, c.rope_base, positions_BxL, c.rope_scaling)
        k = rope(k, c.rope_base, positions_BxL, c.rope_scaling)
        return q, k, v

    def _attend(self, q_BxLxHxK, k_BxSxGxK, v_BxSxGxK, allowed_BxLxS):
        c = self.config
        dt = c.dtype
        q_BxLxHxK = constrain(q_BxLxHxK, ("batch", "length", "heads", None))
        b, length, h, k = q_BxLxHxK.shape
        g = k_BxSxGxK.shape[2]
        q_BxLxGxRxK = q_BxLxHxK.reshape(b, length, g, h // g, k)
        logits = jnp.einsum("bqgrk,bsgk->bgrqs", q_BxLxGxRxK, k_BxSxGxK,
                            preferred_element_type=jnp.float32) * (c.head_dim ** -0.5)
        logits = jnp.where(allowed_BxLxS[:, None, None], logits, -1e30)
        probs = jax.nn.softmax(logits, axis=-1).astype(dt)
        out_BxLxGxRxK = jnp.einsum("bgrqs,bsgk->bqgrk", probs, v_BxSxGxK)
        return jnp.einsum("blhk,hkd->bld", out_BxLxGxRxK.reshape(b, length, h, k),
                          self.w_o[...].astype(dt))

    def __call__(self, x_BxLxD):
        q, k, v = self._project(x_BxLxD, None)
        length = x_BxLxD.shape[1]
        causal_LxL = jnp.tril(jnp.ones((length, length), jnp.bool_))
        return self._attend(q, k, v, causal_LxL[None])

    def extend(self, x_BxLxD, positions_BxL, kv: LayerKV):
        """The new tokens' outputs with their keys and values written into ``kv`` at ``kv.index``;
        each attends to the valid slots up to its own."""
        q, k, v = self._project(x_BxLxD, positions_BxL)
        at = (0, kv.index, 0, 0)
        k_all = jax.lax.dynamic_update_slice(kv.k, k.astype(kv.k.dtype), at)
        v_all = jax.lax.dynamic_update_slice(kv.v, v.astype(kv.v.dtype), at)
        length, size = x_BxLxD.shape[1], kv.k.shape[1]
        causal_LxS = (jnp.arange(size)[None, :] <= kv.index + jnp.arange(length)[:, None])
        allowed_BxLxS = causal_LxS[None] & kv.valid_BxS[:, None, :]
        out = self._attend(q, k_all.astype(q.dtype), v_all.astype(q.dtype), allowed_BxLxS)
        return out, kv._replace(k=k_all, v=v_all)


class DenseFFN(nnx.Module):
    """``w_out(act(w_in x) [* w_up x])`` with ``w_in`` / ``w_up`` [D, F] ``("embed", "mlp")`` and
    ``w_out`` [F, D]; ``w_up`` only with ``dense_ffn="glu"``."""

    def __init__(self, config: TransformerConfig, *, rngs: nnx.Rngs):
        d, f = config.d_model, config.d_ff
        self.config = config
        self.w_in = param(rngs, (d, f), d, ("embed", "mlp"), config.param_dtype)
        self.w_out = param(rngs, (f, d), f, ("mlp", "embed"), config.param_dtype)
        if config.dense_ffn == "glu":
            self.w_up = param(rngs, (d, f), d, ("embed", "mlp"), config.param_dtype)

    def __call__(self, x_BxLxD):
        dt = self.config.dtype
        w_up = self.w_up[...].astype(dt) if self.config.dense_ffn == "glu" else None
        return ffn(x_BxLxD.astype(dt), self.w_in[...].astype(dt), self.w_out[...].astype(dt),
                   w_up, activation=self.config.activation,
                   hidden=lambda h: constrain(h, ("batch", "length", "mlp")))


class Block(nnx.Module):
    """One pre-norm transformer layer; ``ffn`` is a :class:`moejax.MoE` when ``is_moe``."""

    def __init__(self, config: TransformerConfig, is_moe: bool, *, rngs: nnx.Rngs):
        self.is_moe = is_moe
        eps = config.norm_eps
        self.attention_norm = RMSNorm(config.d_model, config.param_dtype, eps=eps)
        self.attention = Attention(config, rngs=rngs)
        self.ffn_norm = RMSNorm(config.d_model, config.param_dtype, eps=eps)
        self.ffn = MoE(config.moe, rngs=rngs) if is_moe else DenseFFN(config, rngs=rngs)

    def __call__(self, x_BxLxD, tokens_BxL, key, token_mask_BxL=None):
        x_BxLxD = x_BxLxD + self.attention(self.attention_norm(x_BxLxD)).astype(x_BxLxD.dtype)
        return self._ffn_residual(x_BxLxD, tokens_BxL, key, token_mask_BxL)

    def extend(self, x_BxLxD, tokens_BxL, token_mask_BxL, positions_BxL, kv: LayerKV):
        """:meth:`__call__` for new tokens against a cache (deterministic routing)."""
        out, kv = self.attention.extend(self.attention_norm(x_BxLxD), positions_BxL, kv)
        x_BxLxD = x_BxLxD + out.astype(x_BxLxD.dtype)
        x_BxLxD, aux = self._ffn_residual(x_BxLxD, tokens_BxL, None, token_mask_BxL)
        return x_BxLxD, aux, kv

    def _ffn_residual(self, x_BxLxD, tokens_BxL, key, token_mask_BxL):
        h_BxLxD = self.ffn_norm(x_BxLxD)
        if self.is_moe:
            y_BxLxD, aux = self.ffn(h_BxLxD, token_ids=tokens_BxL, token_mask=token_mask_BxL,
                                    rngs=key)
        else:
            y_BxLxD, aux = self.ffn(h_BxLxD), None
        x_BxLxD = constrain(x_BxLxD + y_BxLxD.astype(x_BxLxD.dtype), ("batch", "length", "embed"))
        return x_BxLxD, aux


class Period(nnx.Module):
    """``period`` consecutive blocks (the last one MoE when the model has MoE): the unit of the scan."""

    def __init__(self, config: TransformerConfig, *, rngs: nnx.Rngs):
        self.blocks = nnx.List([Block(config, config.is_moe_layer(i), rngs=rngs)
                                for i in range(config.period)])

    def __call__(self, x_BxLxD, tokens_BxL, key, token_mask_BxL=None):
        auxes = []
        for i, block in enumerate(self.blocks):
            x_BxLxD, aux = block(x_BxLxD, tokens_BxL, None if key is None else
                                 jax.random.fold_in(key, i), token_mask_BxL)
            if aux is not None:
                auxes.append(aux)
        return x_BxLxD, auxes

    def extend(self, x_BxLxD, tokens_BxL, token_mask_BxL, positions_BxL, kv: LayerKV):
        """Each block against its slice ``kv.k[i]`` of the period's ``[period, B, S, KVH, K]``."""
        auxes, ks, vs = [], [], []
        for i, block in enumerate(self.blocks):
            x_BxLxD, aux, layer_kv = block.extend(
                x_BxLxD, tokens_BxL, token_mask_BxL, positions_BxL,
                kv._replace(k=kv.k[i], v=kv.v[i]))
            ks.append(layer_kv.k)
            vs.append(layer_kv.v)
            if aux is not None:
                auxes.append(aux)
        return x_BxLxD, auxes, jnp.stack(ks), jnp.stack(vs)


class Transformer(nnx.Module):
    """Decoder-only LM: ``logits_BxLxV, aux = model(tokens_BxL, token_mask=mask_BxL, rngs=key)``.

    ``token_mask`` (bool [B, L] or None) marks the real tokens for the MoE layers (module docstring).
    ``rngs`` (a key) feeds the routers that draw noise in training (noisy top-k, GShard's random
    second expert, jitter); without it they use the ``router`` stream the model was built with.
    Attributes: ``embed`` [V, D], ``layers`` (a list of blocks, or one stacked :class:`Period`
    with ``scan_layers``), ``final_norm``, ``lm_head`` [D, V] (absent with ``tie_embeddings``).
    """

    def __init__(self, config: TransformerConfig, *, rngs: nnx.Rngs):
        if not isinstance(config, TransformerConfig):
            raise ValueError(f"config must be a TransformerConfig, got {type(config).__name__}")
        c = config
        self.config = c
        self.embed = nnx.Param(
            jax.random.normal(rngs.params(), (c.vocab_size, c.d_model), c.param_dtype),
            out_sharding=("vocab", "embed"), eager_sharding=False)
        if c.scan_layers:
            num_periods = c.num_layers // c.period

            @nnx.split_rngs(splits=num_periods)
            @nnx.vmap(in_axes=0, out_axes=0, transform_metadata={nnx.PARTITION_NAME: None})
            def stacked(rngs):
                return Period(c, rngs=rngs)

            self.layers = stacked(rngs)
        else:
            self.layers = nnx.List([Block(c, c.is_moe_layer(i), rngs=rngs)
                                    for i in range(c.num_layers)])
        self.final_norm = RMSNorm(c.d_model, c.param_dtype, eps=c.norm_eps)
        if not c.tie_embeddings:
            self.lm_head = param(rngs, (c.d_model, c.vocab_size), c.d_model, ("embed", "vocab"),
                                 c.param_dtype)

    def __call__(self, tokens_BxL: jax.Array, *, token_mask: jax.Array | None = None,
                 rngs: jax.Array | None = None):
        c = self.config
        if tokens_BxL.ndim != 2 or tokens_BxL.shape[1] > c.max_len:
            raise ValueError(f"tokens must be int [batch, length] with length <= max_len = "
                             f"{c.max_len}, got shape {tokens_BxL.shape}")
        if token_mask is not None and (jnp.shape(token_mask) != tokens_BxL.shape
                                       or jnp.result_type(token_mask) != jnp.bool_):
            raise ValueError(f"token_mask must be a bool array of the tokens' shape "
                             f"{tokens_BxL.shape} (True = a real token), got "
                             f"{jnp.result_type(token_mask)} {jnp.shape(token_mask)}")
        x_BxLxD = jnp.take(self.embed[...], tokens_BxL, axis=0).astype(c.dtype)
        x_BxLxD = constrain(x_BxLxD, ("batch", "length", "embed"))
        if c.scan_layers:
            x_BxLxD, auxes = self._scan(x_BxLxD, tokens_BxL, rngs, token_mask)
        else:
            auxes = []
            run = nnx.remat(_run_block) if c.remat else _run_block
            for i, block in enumerate(self.layers):
                key = None if rngs is None else jax.random.fold_in(rngs, i)
                x_BxLxD, aux = run(block, x_BxLxD, tokens_BxL, key, token_mask)
                if aux is not None:
                    auxes.append(aux)
            auxes = stack_aux(auxes)
        return self._logits(x_BxLxD), auxes

    def _logits(self, x_BxLxD):
        c = self.config
        h_BxLxD = self.final_norm(x_BxLxD).astype(c.dtype)
        if c.tie_embeddings:
            logits_BxLxV = jnp.einsum("bld,vd->blv", h_BxLxD, self.embed[...].astype(c.dtype),
                                      preferred_element_type=jnp.float32)
        else:
            logits_BxLxV = jnp.einsum("bld,dv->blv", h_BxLxD, self.lm_head[...].astype(c.dtype),
                                      preferred_element_type=jnp.float32)
        return constrain(logits_BxLxV, ("batch", "length", "vocab"))

    def expert_choices(self, tokens_BxL: jax.Array) -> list[jax.Array]:
        """The experts each token is routed to in each MoE layer (deterministic routing): a list
        of int32 ``[B * L, k]`` in router order, one per MoE layer (unrolled layers only)."""
        c = self.config
        if c.scan_layers:
            raise ValueError("expert_choices needs scan_layers=False")
        x_BxLxD = jnp.take(self.embed[...], tokens_BxL, axis=0).astype(c.dtype)
        choices = []
        for block in self.layers:
            if block.is_moe:
                attended = x_BxLxD + block.attention(block.attention_norm(x_BxLxD)).astype(
                    x_BxLxD.dtype)
                h_TxD = block.ffn_norm(attended).reshape(-1, c.d_model)
                routing = block.ffn.router(h_TxD, token_ids_T=tokens_BxL.reshape(-1),
                                           deterministic=True)
                choices.append(routing.expert_indices)
            x_BxLxD, _ = block(x_BxLxD, tokens_BxL, None)
        return choices

    def init_cache(self, batch: int, size: int, dtype=None) -> KVCache:
        """An empty :class:`KVCache` of ``size`` slots for ``batch`` rows (``dtype``: the compute
        dtype by default)."""
        c = self.config
        shape = (c.num_layers, batch, size, c.kv_heads, c.head_dim)
        zeros = jnp.zeros(shape, dtype or c.dtype)
        return KVCache(zeros, zeros, jnp.zeros((batch, size), jnp.bool_),
                       jnp.zeros((), jnp.int32))

    def extend(self, tokens_BxL: jax.Array, cache: KVCache, *,
               token_mask: jax.Array | None = None):
        """Runs ``L`` new tokens per row against ``cache``: ``(logits_BxLxV, aux, cache)``.

        The tokens take slots ``cache.index .. cache.index + L - 1`` of every row; ``token_mask``
        (bool [B, L], None = all real) marks the real ones. A real token's position is the number
        of real tokens before it in its row, and it attends to the real tokens up to itself, so a
        row padded anywhere computes what its unpadded sequence computes in :meth:`__call__`.
        Padding is also routed nowhere by the MoE layers. Routing is deterministic (no noise
        key); call it in eval mode. The caller keeps ``cache.index + L <= cache.size``.
        """
        c = self.config
        batch, length = tokens_BxL.shape
        if tokens_BxL.ndim != 2 or batch != cache.valid_BxS.shape[0]:
            raise ValueError(f"tokens must be int [batch, length] with the cache's batch = "
                             f"{cache.valid_BxS.shape[0]}, got shape {tokens_BxL.shape}")
        if length > cache.size:
            raise ValueError(f"{length} tokens do not fit a cache of {cache.size} slots")
        mask_BxL = (jnp.ones(tokens_BxL.shape, jnp.bool_) if token_mask is None
                    else token_mask)
        if jnp.shape(mask_BxL) != tokens_BxL.shape or jnp.result_type(mask_BxL) != jnp.bool_:
            raise ValueError(f"token_mask must be a bool array of the tokens' shape "
                             f"{tokens_BxL.shape}, got {jnp.result_type(mask_BxL)} "
                             f"{jnp.shape(mask_BxL)}")
        positions_BxL = (cache.num_real_B[:, None]
                         + jnp.cumsum(mask_BxL, axis=1, dtype=jnp.int32) - 1)
        valid_BxS = jax.lax.dynamic_update_slice(cache.valid_BxS, mask_BxL, (0, cache.index))
        x_BxLxD = jnp.take(self.embed[...], tokens_BxL, axis=0).astype(c.dtype)
        x_BxLxD = constrain(x_BxLxD, ("batch", "length", "embed"))
        kv = LayerKV(cache.k, cache.v, valid_BxS, cache.index)
        if c.scan_layers:
            num_periods = c.num_layers // c.period
            split = lambda a: a.reshape(num_periods, c.period, *a.shape[1:])  # noqa: E731

            def step(x, period, k, v):
                x, auxes, k, v = period.extend(x, tokens_BxL, mask_BxL, positions_BxL,
                                               kv._replace(k=k, v=v))
                return x, (auxes[0] if auxes else None, k, v)

            scanned = nnx.scan(step, in_axes=(nnx.Carry, 0, 0, 0), out_axes=(nnx.Carry, 0))
            x_BxLxD, (aux, k, v) = scanned(x_BxLxD, self.layers, split(cache.k), split(cache.v))
            k, v = (a.reshape(cache.k.shape) for a in (k, v))
            aux = LMAux({}, {}) if aux is None else LMAux(
                {name: jnp.sum(value) for name, value in aux.losses.items()}, dict(aux.metrics))
        else:
            auxes, ks, vs = [], [], []
            for i, block in enumerate(self.layers):
                x_BxLxD, layer_aux, layer_kv = block.extend(
                    x_BxLxD, tokens_BxL, mask_BxL, positions_BxL,
                    kv._replace(k=cache.k[i], v=cache.v[i]))
                ks.append(layer_kv.k)
                vs.append(layer_kv.v)
                if layer_aux is not None:
                    auxes.append(layer_aux)
            k, v, aux = jnp.stack(ks), jnp.stack(vs), stack_aux(auxes)
        cache = KVCache(k, v, valid_BxS, cache.index + length)
        return self._logits(x_BxLxD), aux, cache

    def update_router_biases(self, tokens_per_expert_LxE: jax.Array, rate: float) -> None:
        """DeepSeek-V3 balancing in every MoE layer, from ``aux.metrics["tokens_per_expert"]``."""
        if self.config.moe is None or self.config.moe.router != "deepseek_v3":
            raise ValueError("update_router_biases needs MoE layers with router='deepseek_v3'")
        if self.config.scan_layers:
            router = self.layers.blocks[-1].ffn.router
            router.bias[...] = jax.vmap(R.update_bias, in_axes=(0, 0, None))(
                router.bias[...], tokens_per_expert_LxE, rate)
            return
        moe_blocks = [block for block in self.layers if block.is_moe]
        for block, tokens_per_expert_E in zip(moe_blocks, tokens_per_expert_LxE):
            block.ffn.update_router_bias(tokens_per_expert_E, rate)

    def _scan(self, x_BxLxD, tokens_BxL, rngs, token_mask_BxL):
        c = self.config
        num_periods = c.num_layers // c.period
        keys = None if rngs is None else jax.random.split(rngs, num_periods)

        def step(x, period, key):
            x, auxes = period(x, tokens_BxL, key, token_mask_BxL)
            # One MoE layer per period at most: its aux (or nothing) is this step's output.
            return x, (auxes[0] if auxes else None)

        if c.remat:
            step = nnx.remat(step)
        scanned = nnx.scan(step, in_axes=(nnx.Carry, 0, 0 if keys is not None else None),
                           out_axes=(nnx.Carry, 0))
        x_BxLxD, aux = scanned(x_BxLxD, self.layers, keys)
        if aux is None:
            return x_BxLxD, LMAux({}, {})
        losses = {name: jnp.sum(value) for name, value in aux.losses.items()}
        return x_BxLxD, LMAux(losses, dict(aux.metrics))


def _run_block(block, x_BxLxD, tokens_BxL, key, token_mask_BxL):
    return block(x_BxLxD, tokens_BxL, key, token_mask_BxL)


def stack_aux(auxes) -> LMAux:
    """MoE layers' aux summed (losses) and stacked per layer (metrics); empty when there is none."""
    if not auxes:
        return LMAux({}, {})
    losses = {name: sum(aux.losses[name] for aux in auxes) for name in auxes[0].losses}
    metrics = {name: jnp.stack([aux.metrics[name] for aux in auxes])
               for name in auxes[0].metrics}
    return LMAux(losses, metrics)


def param_counts(model: nnx.Module, moe: MoEConfig | None) -> dict[str, int]:
    """``total`` parameters of a model (abstract or real) and ``active`` ones: k of E experts."""
    total = active = 0
    for path, value in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        size = value.get_value().size
        total += size
        if "experts" in path and moe is not None:
            size = size * moe.experts_per_token // moe.num_experts
        active += size
    return {"total": total, "active": active}


def count_params(config: TransformerConfig) -> dict[str, int]:
    """Parameter counts: ``total``, ``active`` (k of E experts per token), ``embedding`` (embed + head)."""
    model = nnx.eval_shape(lambda: Transformer(config, rngs=nnx.Rngs(0)))
    counts = param_counts(model, config.moe)
    total, active = counts["total"], counts["active"]
    embedding = (1 if config.tie_embeddings else 2) * config.vocab_size * config.d_model
    return {"total": total, "active": active, "embedding": embedding}
