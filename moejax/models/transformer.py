"""Decoder-only transformer LM whose FFN blocks may be MoE layers (flax.nnx).

``logits_BxLxV, aux = Transformer(config, rngs=nnx.Rngs(0))(tokens_BxL, token_mask=mask_BxL)``.
Each block is pre-norm:
``x += attention(rms_norm(x)); x += ffn(rms_norm(x))`` with rotary position embeddings (RoPE) and
causal multi-head attention. Every ``moe_every``-th FFN (layers ``moe_every - 1``, ``2 * moe_every -
1``, ...) is a :class:`moejax.MoE`; the others are dense MLPs. The dense baseline is the same model
with ``moe=None``.

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
from moejax.layers.params import param
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

    def __post_init__(self):
        for name in ("vocab_size", "d_model", "num_layers", "num_heads", "d_ff", "max_len",
                     "moe_every"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"TransformerConfig.{name} must be a positive int, got {value!r}")
        if self.d_model % self.num_heads or (self.d_model // self.num_heads) % 2:
            raise ValueError(
                f"TransformerConfig.d_model = {self.d_model} must be num_heads = {self.num_heads} "
                "times an even head dimension (RoPE rotates pairs of features)"
            )
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
            if self.moe_every > self.num_layers:
                raise ValueError(f"TransformerConfig.moe_every = {self.moe_every} exceeds "
                                 f"num_layers = {self.num_layers}: the model would have no MoE layer")
        if self.scan_layers and self.num_layers % self.period:
            raise ValueError(f"TransformerConfig.scan_layers needs num_layers = {self.num_layers} "
                             f"divisible by moe_every = {self.moe_every}")

    @property
    def head_dim(self) -> int:
        return self.d_model // self.num_heads

    @property
    def period(self) -> int:
        """Layers per repeating unit: ``moe_every`` with MoE, 1 for the dense model."""
        return self.moe_every if self.moe is not None else 1

    def is_moe_layer(self, layer: int) -> bool:
        return self.moe is not None and (layer + 1) % self.moe_every == 0

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


class RMSNorm(nnx.Module):
    """``x / rms(x) * scale``, computed in float32; ``scale`` [D] starts at 1."""

    def __init__(self, d_model: int, param_dtype, *, eps: float = 1e-6):
        self.eps = eps
        self.scale = nnx.Param(jnp.ones((d_model,), param_dtype), out_sharding=("embed",),
                               eager_sharding=False)

    def __call__(self, x_BxLxD):
        x = x_BxLxD.astype(jnp.float32)
        inv_rms = jax.lax.rsqrt(jnp.mean(jnp.square(x), axis=-1, keepdims=True) + self.eps)
        return (x * inv_rms * self.scale[...].astype(jnp.float32)[None, None, :]).astype(
            x_BxLxD.dtype)


def rope(x_BxLxHxK: jax.Array, base: float) -> jax.Array:
    """Rotary position embedding (Su et al. 2021), half-split form, positions ``0..L-1``."""
    _, length, _, head_dim = x_BxLxHxK.shape
    half = head_dim // 2
    inv_freq_K2 = base ** (-jnp.arange(half, dtype=jnp.float32) / half)
    angle_LxK2 = jnp.arange(length, dtype=jnp.float32)[:, None] * inv_freq_K2[None, :]
    sin = jnp.sin(angle_LxK2)[None, :, None, :]
    cos = jnp.cos(angle_LxK2)[None, :, None, :]
    x = x_BxLxHxK.astype(jnp.float32)
    x1, x2 = x[..., :half], x[..., half:]
    rotated = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return rotated.astype(x_BxLxHxK.dtype)


class Attention(nnx.Module):
    """Causal multi-head self-attention with RoPE; softmax in float32."""

    def __init__(self, config: TransformerConfig, *, rngs: nnx.Rngs):
        d, h, k = config.d_model, config.num_heads, config.head_dim
        self.config = config
        pd = config.param_dtype
        self.w_q = param(rngs, (d, h, k), d, ("embed", "heads", None), pd)
        self.w_k = param(rngs, (d, h, k), d, ("embed", "heads", None), pd)
        self.w_v = param(rngs, (d, h, k), d, ("embed", "heads", None), pd)
        self.w_o = param(rngs, (h, k, d), h * k, ("heads", None, "embed"), pd)

    def __call__(self, x_BxLxD):
        c = self.config
        dt = c.dtype
        x = x_BxLxD.astype(dt)
        q_BxLxHxK = rope(jnp.einsum("bld,dhk->blhk", x, self.w_q[...].astype(dt)), c.rope_base)
        k_BxLxHxK = rope(jnp.einsum("bld,dhk->blhk", x, self.w_k[...].astype(dt)), c.rope_base)
        v_BxLxHxK = jnp.einsum("bld,dhk->blhk", x, self.w_v[...].astype(dt))
        q_BxLxHxK = constrain(q_BxLxHxK, ("batch", "length", "heads", None))
        logits_BxHxLxL = jnp.einsum("bqhk,bshk->bhqs", q_BxLxHxK, k_BxLxHxK,
                                    preferred_element_type=jnp.float32) * (c.head_dim ** -0.5)
        length = x.shape[1]
        causal_LxL = jnp.tril(jnp.ones((length, length), jnp.bool_))
        logits_BxHxLxL = jnp.where(causal_LxL[None, None], logits_BxHxLxL, -1e30)
        probs_BxHxLxL = jax.nn.softmax(logits_BxHxLxL, axis=-1).astype(dt)
        out_BxLxHxK = jnp.einsum("bhqs,bshk->bqhk", probs_BxHxLxL, v_BxLxHxK)
        return jnp.einsum("blhk,hkd->bld", out_BxLxHxK, self.w_o[...].astype(dt))


class DenseFFN(nnx.Module):
    """``w_out(act(w_in x))`` with ``w_in`` [D, F] ``("embed", "mlp")`` and ``w_out`` [F, D]."""

    def __init__(self, config: TransformerConfig, *, rngs: nnx.Rngs):
        d, f = config.d_model, config.d_ff
        self.config = config
        self.w_in = param(rngs, (d, f), d, ("embed", "mlp"), config.param_dtype)
        self.w_out = param(rngs, (f, d), f, ("mlp", "embed"), config.param_dtype)

    def __call__(self, x_BxLxD):
        dt = self.config.dtype
        return ffn(x_BxLxD.astype(dt), self.w_in[...].astype(dt), self.w_out[...].astype(dt),
                   activation=self.config.activation,
                   hidden=lambda h: constrain(h, ("batch", "length", "mlp")))


class Block(nnx.Module):
    """One pre-norm transformer layer; ``ffn`` is a :class:`moejax.MoE` when ``is_moe``."""

    def __init__(self, config: TransformerConfig, is_moe: bool, *, rngs: nnx.Rngs):
        self.is_moe = is_moe
        self.attention_norm = RMSNorm(config.d_model, config.param_dtype)
        self.attention = Attention(config, rngs=rngs)
        self.ffn_norm = RMSNorm(config.d_model, config.param_dtype)
        self.ffn = MoE(config.moe, rngs=rngs) if is_moe else DenseFFN(config, rngs=rngs)

    def __call__(self, x_BxLxD, tokens_BxL, key, token_mask_BxL=None):
        x_BxLxD = x_BxLxD + self.attention(self.attention_norm(x_BxLxD)).astype(x_BxLxD.dtype)
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


class Transformer(nnx.Module):
    """Decoder-only LM: ``logits_BxLxV, aux = model(tokens_BxL, token_mask=mask_BxL, rngs=key)``.

    ``token_mask`` (bool [B, L] or None) marks the real tokens for the MoE layers (module docstring).
    ``rngs`` (a key) feeds the routers that draw noise in training (noisy top-k, GShard's random
    second expert, jitter); without it they use the ``router`` stream the model was built with.
    Attributes: ``embed`` [V, D], ``layers`` (a list of blocks, or one stacked :class:`Period`
    with ``scan_layers``), ``final_norm``, ``lm_head`` [D, V].
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
        self.final_norm = RMSNorm(c.d_model, c.param_dtype)
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
            auxes = _stack_aux(auxes)
        h_BxLxD = self.final_norm(x_BxLxD)
        logits_BxLxV = jnp.einsum("bld,dv->blv", h_BxLxD.astype(c.dtype),
                                  self.lm_head[...].astype(c.dtype),
                                  preferred_element_type=jnp.float32)
        return constrain(logits_BxLxV, ("batch", "length", "vocab")), auxes

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


def _stack_aux(auxes) -> LMAux:
    if not auxes:
        return LMAux({}, {})
    losses = {name: sum(aux.losses[name] for aux in auxes) for name in auxes[0].losses}
    metrics = {name: jnp.stack([aux.metrics[name] for aux in auxes])
               for name in auxes[0].metrics}
    return LMAux(losses, metrics)


def count_params(config: TransformerConfig) -> dict[str, int]:
    """Parameter counts: ``total``, ``active`` (k of E experts per token), ``embedding`` (embed + head)."""
    model = nnx.eval_shape(lambda: Transformer(config, rngs=nnx.Rngs(0)))
    total = active = 0
    for path, value in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        size = value.get_value().size
        total += size
        if "experts" in path and config.moe is not None:
            size = size * config.moe.experts_per_token // config.moe.num_experts
        active += size
    embedding = 2 * config.vocab_size * config.d_model
    return {"total": total, "active": active, "embedding": embedding}
