"""S6 — sparse upcycling (Komatsuzaki et al. 2022), in small.

  python experiments/upcycling.py                  # about 10 minutes on 2 CPU cores
  python experiments/upcycling.py --seeds=0 --extra_steps=100   # a quick look

A dense byte-level LM (``common.base_config("small")``: 2 layers, d_model 64, FFN 256) is
pretrained for ``--pretrain_steps``; then, for ``--extra_steps`` more steps each:

- ``dense, continued``: the dense model trains on (``init_from`` = the pretrained run);
- ``upcycled MoE``: layer 1's FFN becomes 8 experts, each a copy of the pretrained FFN, top-2
  Mixtral routing with the router at zero (``upcycle=True``), everything else copied;
- ``MoE from scratch``: the same MoE from a random initialisation.

Each continuation starts a fresh optimizer with a short warm-up. Writes
``experiments/results/upcycling/results.json`` (eval loss every 25 steps per arm and seed) and
``loss.png``, and prints the table for ``experiments/RESULTS.md``.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import shutil
import sys

import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from experiments import common  # noqa: E402
from moejax import trainer  # noqa: E402
from moejax.trainer.metrics_writer import read_metrics  # noqa: E402

OUT = pathlib.Path(__file__).resolve().parent / "results" / "upcycling"
EVAL_EVERY = 25


def _config(seed: int, steps: int, *, moe: bool):
    config = common.base_config("small", seed)
    config.num_train_steps = steps
    config.eval_every_steps = EVAL_EVERY
    config.checkpoint_every_steps = steps
    config.optimizer.warmup_steps = 10
    if moe:
        config.moe = common.moe(num_experts=8, experts_per_token=2, d_ff=config.model.d_ff,
                                router="mixtral", dispatch="dropless")
    return config


def _curve(workdir: pathlib.Path) -> list[tuple[int, float]]:
    return [(r["step"], r["eval_loss"]) for r in read_metrics(str(workdir)) if "eval_loss" in r]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pretrain_steps", type=int, default=500)
    parser.add_argument("--extra_steps", type=int, default=250)
    parser.add_argument("--seeds", default="0,1")
    parser.add_argument("--workdir", default="runs/upcycling")
    args = parser.parse_args()
    root = pathlib.Path(args.workdir)
    OUT.mkdir(parents=True, exist_ok=True)
    results = []
    for seed in (int(s) for s in args.seeds.split(",")):
        runs = root / f"seed{seed}"
        shutil.rmtree(runs, ignore_errors=True)
        trainer.run(_config(seed, args.pretrain_steps, moe=False), str(runs / "pretrain"))
        pretrained = str(runs / "pretrain")
        arms = {
            "dense, continued": _config(seed, args.extra_steps, moe=False),
            "upcycled MoE": _config(seed, args.extra_steps, moe=True),
            "MoE from scratch": _config(seed, args.extra_steps, moe=True),
        }
        arms["dense, continued"].init_from = pretrained
        arms["upcycled MoE"].init_from = pretrained
        arms["upcycled MoE"].upcycle = True
        pretrain_curve = _curve(runs / "pretrain")
        results.append(dict(arm="dense pretraining", seed=seed, curve=pretrain_curve))
        for name, config in arms.items():
            workdir = runs / name.replace(" ", "_").replace(",", "")
            trainer.run(config, str(workdir))
            results.append(dict(arm=name, seed=seed, curve=_curve(workdir)))
            print(f"seed {seed} {name:18s}: eval loss {results[-1]['curve'][0][1]:.4f} at step 0, "
                  f"{results[-1]['curve'][-1][1]:.4f} after {args.extra_steps} steps", flush=True)
    (OUT / "results.json").write_text(json.dumps(dict(args=vars(args), runs=results), indent=1))
    _plot(results, args.pretrain_steps)
    _table(results, args.extra_steps)


def _plot(results, pretrain_steps) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 3.8))
    colors = {"dense pretraining": "black", "dense, continued": "tab:blue",
              "upcycled MoE": "tab:orange", "MoE from scratch": "tab:green"}
    seen = set()
    for run in results:
        offset = 0 if run["arm"] == "dense pretraining" else pretrain_steps
        steps, losses = zip(*run["curve"])
        label = None if run["arm"] in seen else run["arm"]
        seen.add(run["arm"])
        ax.plot(np.array(steps) + offset, losses, color=colors[run["arm"]], label=label, alpha=0.8)
    ax.set_xlabel("training step (continuations start at the end of pretraining)")
    ax.set_ylabel("validation loss (nats/byte)")
    ax.set_ylim(top=min(3.5, ax.get_ylim()[1]))
    ax.legend()
    fig.tight_layout()
    fig.savefig(OUT / "loss.png", dpi=80)
    plt.close(fig)


def _table(results, extra_steps) -> None:
    print(f"\n| arm | eval loss at the start | after {extra_steps // 2} steps | after {extra_steps} "
          "steps |\n|---|---|---|---|")
    for arm in ("dense, continued", "upcycled MoE", "MoE from scratch"):
        runs = [r for r in results if r["arm"] == arm]
        cells = []
        for step in (0, extra_steps // 2, extra_steps):
            values = [dict(r["curve"]).get(step) for r in runs]
            values = [v for v in values if v is not None]
            cells.append(f"{np.mean(values):.4f} ({', '.join(f'{v:.4f}' for v in values)})"
                         if values else "-")
        print(f"| {arm} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
