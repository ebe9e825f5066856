"""Training throughput on CPU: tokens/s and model FLOPs utilisation (MFU), MoE vs the dense baseline.

  python benchmarks/train.py                     # experiments/default.py, MoE and moe=False
  python benchmarks/train.py --steps 30 --batch_size 32

The dense baseline is ``default.py:moe=False``: every FFN is as wide as the MoE layer's active
experts (k x expert width), so both models do the same matmul FLOPs per token (the router's
``d_model x E`` product aside). Each model runs the trainer's own jitted, donated update step
(``moejax.trainer.step.jit_train_step``) on real ``stdlib_text`` batches, fetched before timing.

Model FLOPs per token = 6 x (active matmul parameters: every weight a token multiplies, the k chosen
experts only, the output projection included, the input embedding excluded) + 12 x layers x d_model
x seq_len for the attention scores and values (PaLM, Chowdhery et al. 2022, appendix B). CPUs have
no single spec-sheet peak, so MFU is against the float32 matmul throughput measured here (best of
several 2048^3 products): the share of attainable matmul speed the training step reaches.
The two models' steps are timed in interleaved rounds (median per model; on a shared machine the
other processes' load then falls on both alike). Writes ``benchmarks/results/train_cpu.json``.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from moejax import data as data_lib
from moejax import parallel, trainer
from moejax.models import count_params
from moejax.trainer.step import jit_train_step

HERE = os.path.dirname(os.path.abspath(__file__))


def load_config(path: str, arg: str | None):
    # Experiment configs import their package (experiments.common) from the repository root.
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(path))))
    spec = importlib.util.spec_from_file_location("experiment_config", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(arg)


def model_flops_per_token(model_config, seq_len: int) -> float:
    counts = count_params(model_config)
    input_embedding = model_config.vocab_size * model_config.d_model
    attention = 12 * model_config.num_layers * model_config.d_model * seq_len
    return 6.0 * (counts["active"] - input_embedding) + attention


def matmul_peak_flops(n: int = 2048, repeats: int = 5) -> float:
    a = jnp.ones((n, n), jnp.float32)
    matmul = jax.jit(lambda x, y: x @ y)
    matmul(a, a).block_until_ready()
    best = min(_timed(lambda: matmul(a, a).block_until_ready()) for _ in range(repeats))
    return 2.0 * n**3 / best


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


class _Runner:
    """One model's jitted update step, state and pre-fetched batches."""

    def __init__(self, config, *, num_batches: int):
        self.setup = trainer.setup(config, mesh=parallel.make_mesh(data=1,
                                                                   devices=jax.devices()[:1]))
        self.config, self.model_config, self.mesh = (self.setup.config, self.setup.model_config,
                                                     self.setup.mesh)
        with parallel.use_mesh(self.mesh):
            iterator = data_lib.create_iterator(self.config.dataset, split="train",
                                                seq_len=self.config.seq_len,
                                                batch_size=self.config.batch_size,
                                                seed=self.config.seed,
                                                data_dir=self.config.data_dir,
                                                text_key=self.config.text_key,
                                                tokenizer=self.setup.tokenizer,
                                                stream=self.config.stream_data)
            self.batches = [parallel.shard_batch(next(iterator), self.mesh)
                            for _ in range(num_batches)]
            self.step = jit_train_step(self.setup)
        self.state = self.setup.state
        self.next_batch = 0
        self.times: list[float] = []

    def run(self, steps: int, *, record: bool = True) -> None:
        with parallel.use_mesh(self.mesh):
            for _ in range(steps):
                batch = self.batches[self.next_batch % len(self.batches)]
                self.next_batch += 1
                start = time.perf_counter()
                self.state, metrics = self.step(self.state, self.setup.rng_state, batch)
                jax.block_until_ready(metrics)
                if record:
                    self.times.append(time.perf_counter() - start)

    def result(self) -> dict:
        step_s = float(np.median(self.times))
        best_s = float(np.min(self.times))
        tokens_per_step = self.config.batch_size * self.config.seq_len
        flops_per_token = model_flops_per_token(self.model_config, self.config.seq_len)
        counts = count_params(self.model_config)
        return {
            "total_params": counts["total"],
            "active_params": counts["active"],
            "model_flops_per_token": flops_per_token,
            "step_ms_median": 1e3 * step_s,
            "step_ms_min": 1e3 * best_s,
            "tokens_per_sec": tokens_per_step / step_s,
            "tokens_per_sec_best": tokens_per_step / best_s,
            "model_flops_per_sec": flops_per_token * tokens_per_step / step_s,
        }


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default=os.path.join(HERE, "..", "experiments", "default.py"))
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--batch_size", type=int, default=None)
    parser.add_argument("--out", default=os.path.join(HERE, "results", "train_cpu.json"))
    args = parser.parse_args()
    if args.steps < 1 or args.warmup < 1:
        parser.error("--steps and --warmup must be >= 1")

    runners = {}
    for name, arg in (("moe", "moe=True"), ("dense", "moe=False")):
        config = load_config(args.config, arg)
        if args.batch_size:
            config.batch_size = args.batch_size
        runners[name] = _Runner(config, num_batches=args.steps)
        runners[name].run(args.warmup, record=False)  # compiles
    # Interleaved rounds: load from other processes on a shared machine hits both models alike.
    rounds = 5
    for _ in range(rounds):
        for runner in runners.values():
            runner.run(max(1, args.steps // rounds))
    peak = matmul_peak_flops()
    results = {name: runner.result() for name, runner in runners.items()}
    for r in results.values():
        r["mfu_vs_measured_matmul_peak"] = r["model_flops_per_sec"] / peak

    print(f"float32 matmul peak measured on this machine: {peak / 1e9:.1f} GFLOP/s "
          f"({os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f})")
    header = (f"{'model':<6} {'params':>8} {'active':>8} {'MFLOP/tok':>10} {'step ms':>8} "
              f"{'best ms':>8} {'tokens/s':>9} {'GFLOP/s':>8} {'MFU':>6}")
    print(header)
    print("-" * len(header))
    for name, r in results.items():
        print(f"{name:<6} {r['total_params'] / 1e6:>7.2f}M {r['active_params'] / 1e6:>7.2f}M "
              f"{r['model_flops_per_token'] / 1e6:>10.2f} {r['step_ms_median']:>8.1f} "
              f"{r['step_ms_min']:>8.1f} "
              f"{r['tokens_per_sec']:>9.0f} {r['model_flops_per_sec'] / 1e9:>8.2f} "
              f"{100 * r['mfu_vs_measured_matmul_peak']:>5.1f}%")
    print(f"MoE / dense tokens per second: "
          f"{results['moe']['tokens_per_sec'] / results['dense']['tokens_per_sec']:.2f}")

    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    record = {
        "config": os.path.relpath(os.path.abspath(args.config), os.path.join(HERE, "..")),
        "steps": args.steps,
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(),
                    "load_average_1m": os.getloadavg()[0], "jax": jax.__version__,
                    "backend": jax.default_backend()},
        "matmul_peak_flops_per_sec": peak,
        "results": results,
    }
    with open(args.out, "w") as f:
        json.dump(record, f, indent=2)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
