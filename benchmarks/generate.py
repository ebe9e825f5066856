"""Tokens per second of greedy decoding with and without the KV cache.

    PYTHONPATH=. JAX_PLATFORMS=cpu python benchmarks/generate.py [--new 32] [--batch 8]

Model: the ``qwen3_moe`` preset at tiny width with 4 layers (dropless experts). Without the cache
every new token is a full forward pass over the ``[B, length]`` buffer; with it, one prefill and
then one token per row per step. Both are timed after compilation (best of 3). Prints a table and
writes ``benchmarks/results/generate.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import jax
import numpy as np
from flax import nnx

from moejax.models import Transformer, greedy_generate
from moejax.models.presets import preset


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--new", type=int, default=32)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--prompt", type=int, default=16)
    args = parser.parse_args()
    config = preset("qwen3_moe", "tiny", num_layers=4, d_model=128, vocab_size=512, max_len=256,
                    moe_changes=dict(d_ff=64, num_experts=8))
    model = Transformer(config, rngs=nnx.Rngs(0))
    model.eval()
    rng = np.random.default_rng(0)
    prompts = [rng.integers(0, config.vocab_size, rng.integers(args.prompt // 2, args.prompt + 1))
               for _ in range(args.batch)]
    length = args.prompt + args.new + 1
    rows = []
    for use_cache in (False, True):
        def run():
            return greedy_generate(model, prompts, max_new_tokens=args.new, length=length,
                                   eos_id=-1, use_cache=use_cache)
        start = time.perf_counter()
        outputs = run()
        compile_s = time.perf_counter() - start
        times = []
        for _ in range(3):
            start = time.perf_counter()
            run()
            times.append(time.perf_counter() - start)
        tokens = sum(len(o) for o in outputs)
        rows.append(dict(cache=use_cache, tokens=tokens, seconds=min(times),
                         tokens_per_s=tokens / min(times), first_call_s=compile_s,
                         outputs=[o.tolist() for o in outputs]))
    same = rows[0]["outputs"] == rows[1]["outputs"]
    print(f"{'cache':>6} {'tokens':>7} {'seconds':>8} {'tokens/s':>9} {'first call s':>13}")
    for r in rows:
        print(f"{str(r['cache']):>6} {r['tokens']:>7} {r['seconds']:>8.3f} {r['tokens_per_s']:>9.1f}"
              f" {r['first_call_s']:>13.1f}")
    speedup = rows[1]["tokens_per_s"] / rows[0]["tokens_per_s"]
    print(f"speed-up with the cache: {speedup:.1f}x; same tokens: {same}")
    result = dict(config=dict(vars(args), layers=config.num_layers, d_model=config.d_model,
                              experts=config.moe.num_experts, length=length),
                  backend=jax.default_backend(), devices=jax.device_count(),
                  rows=[{k: v for k, v in r.items() if k != "outputs"} for r in rows],
                  speedup=speedup, same_tokens=same)
    out = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "generate.json")
    with open(out, "w") as f:
        json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
