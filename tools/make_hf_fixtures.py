"""Writes the Hugging Face parity fixtures under ``tests/fixtures/hf/<family>/``.

Needs ``torch`` and ``transformers`` (not moejax's dependencies; ``tests/test_hf.py`` reads the
fixtures without them)::

    python3 -m venv /tmp/hfvenv && /tmp/hfvenv/bin/pip install torch transformers safetensors
    /tmp/hfvenv/bin/python tools/make_hf_fixtures.py

For each family a tiny randomly initialised ``transformers`` model is saved with
``save_pretrained`` (safetensors + ``config.json``; Mixtral's in several files with an index),
and ``reference.npz`` holds a fixed batch of tokens, the model's float32 logits and, per MoE layer,
the top-k experts each token is routed to (from the router logits ``transformers`` returns).
``reference.json`` records the versions that made them.
"""

from __future__ import annotations

import json
import os
import shutil
import sys

import numpy as np
import torch
import transformers

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "fixtures", "hf")
COMMON = dict(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, num_experts_per_tok=2, max_position_embeddings=64,
              tie_word_embeddings=False)

FAMILIES = {
    # Several safetensors files and an index; GQA; softmax over the top-2 logits.
    "mixtral": ("MixtralConfig", "MixtralForCausalLM",
                dict(intermediate_size=16, num_local_experts=4, rope_theta=1e6),
                dict(max_shard_size="40KB")),
    # q/k RMSNorm over all heads; 8 experts, top-2 probabilities as they are.
    "olmoe": ("OlmoeConfig", "OlmoeForCausalLM",
              dict(intermediate_size=16, num_experts=8, norm_topk_prob=False, pad_token_id=0,
                   eos_token_id=1, bos_token_id=None), {}),
    # q/k/v biases; a dense first layer (decoder_sparse_step 2); gated shared expert.
    "qwen2_moe": ("Qwen2MoeConfig", "Qwen2MoeForCausalLM",
                  dict(intermediate_size=48, moe_intermediate_size=16,
                       shared_expert_intermediate_size=24, num_experts=4, decoder_sparse_step=2,
                       norm_topk_prob=False), {}),
    # Head size 16 != 32 / 4; q/k RMSNorm per head; renormalised top-k; linear RoPE scaling.
    "qwen3_moe": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM",
                  dict(intermediate_size=48, moe_intermediate_size=16, num_experts=4,
                       head_dim=16, norm_topk_prob=True,
                       rope_parameters={"rope_type": "linear", "factor": 2.0,
                                        "rope_theta": 10000.0}), {}),
}


def randomize(model: torch.nn.Module, seed: int) -> None:
    """Weights of unit-ish scale (the library's 0.02 init makes routing and attention near-uniform,
    which would test little); RMSNorm scales around 1."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or "layernorm" in name:
                p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=gen))
            elif p.ndim == 1:
                p.copy_(0.1 * torch.randn(p.shape, generator=gen))
            else:
                fan_in = p.shape[-1]
                p.copy_(torch.randn(p.shape, generator=gen) * fan_in ** -0.5)


def make(family: str, seed: int) -> None:
    config_cls, model_cls, extra, save_kw = FAMILIES[family]
    config = getattr(transformers, config_cls)(**{**COMMON, **extra})
    torch.manual_seed(seed)
    model = getattr(transformers, model_cls)(config).eval()
    randomize(model, seed)
    out = os.path.join(ROOT, family)
    shutil.rmtree(out, ignore_errors=True)
    model.save_pretrained(out, safe_serialization=True, **save_kw)
    for junk in ("generation_config.json",):
        if os.path.exists(os.path.join(out, junk)):
            os.remove(os.path.join(out, junk))
    tokens = np.random.default_rng(seed).integers(0, COMMON["vocab_size"], (2, 12))
    with torch.no_grad():
        result = model(torch.as_tensor(tokens), output_router_logits=True, use_cache=False)
    k = COMMON["num_experts_per_tok"]
    experts = [torch.topk(torch.softmax(r.float(), dim=-1), k, dim=-1).indices.numpy()
               for r in result.router_logits]
    np.savez(os.path.join(out, "reference.npz"), tokens=tokens.astype(np.int32),
             logits=result.logits.float().numpy(),
             experts=np.stack(experts).astype(np.int32))
    with open(os.path.join(out, "reference.json"), "w") as f:
        json.dump({"transformers": transformers.__version__, "torch": torch.__version__,
                   "seed": seed, "model": model_cls,
                   "experts": "top-k expert ids per MoE layer, token (row-major over batch, "
                              "length), by descending router probability"}, f, indent=2)
    size = sum(os.path.getsize(os.path.join(out, n)) for n in os.listdir(out))
    print(f"{family}: {sorted(os.listdir(out))} {size / 1024:.0f} KiB")


if __name__ == "__main__":
    for name in sys.argv[1:] or FAMILIES:
        make(name, seed=list(FAMILIES).index(name))
