"""Published MoE architectures as :class:`~moejax.models.TransformerConfig` s of the one model.

``preset(name, size="full" | "tiny", **changes)``; ``PRESETS`` lists the names. "full" is the
published model's shape (from its ``config.json``); "tiny" keeps every architectural choice at a
size that runs in a unit test. ``changes`` replace top-level fields (``moe=`` replaces the MoE
config whole; ``moe_changes=`` updates fields of it).

- ``mixtral``: Mixtral-8x7B (Jiang et al. 2024). GQA, SwiGLU experts, softmax over the top-2 logits.
- ``olmoe``: OLMoE-1B-7B (Muennighoff et al. 2024). q/k RMSNorm over all heads, 64 experts, top-8
  with the chosen softmax probabilities used as they are (``norm_topk_prob = False``).
- ``qwen2_moe``: Qwen1.5-MoE-A2.7B. q/k/v biases, 60 experts top-4 without renormalisation, one
  shared expert of width 5632 scaled by a sigmoid gate.
- ``qwen3_moe``: Qwen3-30B-A3B. GQA with head size 128, q/k RMSNorm per head, 128 experts top-8,
  renormalised.
- ``deepseek_v3``: DeepSeek-V3's MoE block (256 routed experts top-8 by sigmoid affinity with
  the balancing bias, 8 groups of which 4 may be used, one shared expert, routed scaling 2.5, the
  first 3 layers dense). Its attention is *standard* grouped-query attention here, not MLA
  (multi-head latent attention), so DeepSeek-V3 checkpoints do not load into this preset.
"""

from __future__ import annotations

import dataclasses

from moejax.layers.config import MoEConfig
from moejax.models.transformer import TransformerConfig

_FULL = {
    "mixtral": dict(
        model=dict(vocab_size=32000, d_model=4096, num_layers=32, num_heads=32, num_kv_heads=8,
                   d_ff=14336, max_len=32768, rope_base=1e6, norm_eps=1e-5),
        moe=dict(d_ff=14336, num_experts=8, experts_per_token=2, router="mixtral")),
    "olmoe": dict(
        model=dict(vocab_size=50304, d_model=2048, num_layers=16, num_heads=16, d_ff=1024,
                   max_len=4096, rope_base=1e4, norm_eps=1e-5, qk_norm="full"),
        moe=dict(d_ff=1024, num_experts=64, experts_per_token=8, router="top_k")),
    "qwen2_moe": dict(
        model=dict(vocab_size=151936, d_model=2048, num_layers=24, num_heads=16, d_ff=5632,
                   max_len=8192, rope_base=1e6, qkv_bias=True),
        moe=dict(d_ff=1408, num_experts=60, experts_per_token=4, router="top_k",
                 num_shared_experts=1, shared_d_ff=5632, shared_expert_gate=True)),
    "qwen3_moe": dict(
        model=dict(vocab_size=151936, d_model=2048, num_layers=48, num_heads=32, num_kv_heads=4,
                   attention_head_dim=128, d_ff=6144, max_len=40960, rope_base=1e6,
                   qk_norm="head"),
        moe=dict(d_ff=768, num_experts=128, experts_per_token=8, router="top_k",
                 renormalize=True)),
    "deepseek_v3": dict(
        model=dict(vocab_size=129280, d_model=7168, num_layers=61, num_heads=128,
                   attention_head_dim=128, d_ff=18432, max_len=163840, norm_eps=1e-6,
                   first_dense_layers=3),
        moe=dict(d_ff=2048, num_experts=256, experts_per_token=8, router="deepseek_v3",
                 num_expert_groups=8, topk_groups=4, routed_scaling_factor=2.5,
                 num_shared_experts=1)),
}

# The same choices at test size: d_model 32, 2-3 layers, 4-8 experts.
_TINY = {
    "mixtral": dict(
        model=dict(vocab_size=64, d_model=32, num_layers=2, num_heads=4, num_kv_heads=2, d_ff=16,
                   max_len=64),
        moe=dict(d_ff=16, num_experts=4, experts_per_token=2)),
    "olmoe": dict(
        model=dict(vocab_size=64, d_model=32, num_layers=2, num_heads=4, num_kv_heads=2, d_ff=16,
                   max_len=64),
        moe=dict(d_ff=16, num_experts=8, experts_per_token=2)),
    "qwen2_moe": dict(
        model=dict(vocab_size=64, d_model=32, num_layers=2, num_heads=4, num_kv_heads=2, d_ff=48,
                   max_len=64),
        moe=dict(d_ff=16, num_experts=4, experts_per_token=2, shared_d_ff=24)),
    "qwen3_moe": dict(
        model=dict(vocab_size=64, d_model=32, num_layers=2, num_heads=4, num_kv_heads=2,
                   attention_head_dim=16, d_ff=48, max_len=64),
        moe=dict(d_ff=16, num_experts=4, experts_per_token=2)),
    "deepseek_v3": dict(
        model=dict(vocab_size=64, d_model=32, num_layers=3, num_heads=4, attention_head_dim=8,
                   d_ff=48, max_len=64, first_dense_layers=1),
        moe=dict(d_ff=16, num_experts=8, experts_per_token=2, num_expert_groups=4,
                 topk_groups=2)),
}

PRESETS = tuple(_FULL)
SIZES = ("full", "tiny")


def preset(name: str, size: str = "full", *, moe_changes: dict | None = None,
           **changes) -> TransformerConfig:
    """The :class:`TransformerConfig` of published architecture ``name`` at ``size``."""
    if name not in _FULL:
        raise ValueError(f"preset name must be one of {PRESETS}, got {name!r}")
    if size not in SIZES:
        raise ValueError(f"preset size must be one of {SIZES}, got {size!r}")
    model_kw = dict(_FULL[name]["model"])
    moe_kw = dict(_FULL[name]["moe"])
    if size == "tiny":
        model_kw.update(_TINY[name]["model"])
        moe_kw.update(_TINY[name]["moe"])
    known = {f.name for f in dataclasses.fields(TransformerConfig)}
    unknown = sorted(set(changes) - known)
    if unknown:
        raise ValueError(f"preset got unknown TransformerConfig fields {unknown}")
    # What every one of these families shares: SwiGLU FFNs, untied embeddings, dropless experts.
    model_kw = dict(activation="silu", dense_ffn="glu", **model_kw)
    model_kw.update(changes)
    if "moe" not in changes:
        model_kw["moe"] = MoEConfig(**{"d_model": model_kw["d_model"], "expert": "glu",
                                       "activation": "silu", **moe_kw, **(moe_changes or {})})
    return TransformerConfig(**model_kw)
