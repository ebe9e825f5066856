"""PNG plots of a finished run, drawn from its ``metrics.jsonl`` (``matplotlib.figure.Figure``:
no display, and no change to the global matplotlib backend).

``loss.png``: training and evaluation loss against step. ``expert_load.png`` (MoE models): the last
evaluation's share of tokens per expert in each MoE layer as a heatmap (1.0 = perfectly balanced),
beside the load coefficient of variation of each layer over training.
"""

from __future__ import annotations

import os

import numpy as np
from etils import epath
from matplotlib.figure import Figure

from moejax import paths
from moejax.trainer.metrics_writer import read_metrics


def plot_run(workdir: str | os.PathLike) -> list[str]:
    """Writes the plots into ``workdir`` (a directory or a URI); returns their paths."""
    workdir = paths.resolve(workdir)
    rows = read_metrics(workdir)
    written = [_plot_loss(rows, workdir / "loss.png")]
    load_rows = [row for row in rows if row.get("eval_expert_load")]
    if load_rows:
        written.append(_plot_expert_load(load_rows, workdir / "expert_load.png"))
    return written


def _save(fig: Figure, path: epath.Path) -> str:
    with path.open("wb") as f:
        fig.savefig(f, format="png", dpi=110)
    return os.fspath(path)


def _plot_loss(rows, path):
    fig = Figure(figsize=(7, 4))
    ax = fig.subplots()
    train = [(row["step"], row["train_loss"]) for row in rows if row.get("train_loss") is not None]
    evals = [(row["step"], row["eval_loss"]) for row in rows if row.get("eval_loss") is not None]
    if train:
        ax.plot(*zip(*train), label="train loss", lw=1)
    if evals:
        ax.plot(*zip(*evals), "o-", label="eval loss", ms=4)
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats / token)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    return _save(fig, path)


def _plot_expert_load(rows, path):
    load_LxE = np.asarray(rows[-1]["eval_expert_load"], np.float64)
    relative_LxE = load_LxE / np.maximum(load_LxE.mean(axis=1, keepdims=True), 1e-12)
    num_layers, num_experts = relative_LxE.shape
    fig = Figure(figsize=(11, 0.6 * num_layers + 3))
    heat, cv = fig.subplots(1, 2)
    image = heat.imshow(relative_LxE, cmap="viridis", aspect="auto", vmin=0)
    heat.set_xlabel("expert")
    heat.set_ylabel("MoE layer")
    heat.set_xticks(range(num_experts))
    heat.set_yticks(range(num_layers))
    heat.set_title(f"tokens per expert / mean, step {rows[-1]['step']}")
    fig.colorbar(image, ax=heat)
    steps = [row["step"] for row in rows]
    cv_SxL = np.asarray([row["eval_load_cv"] for row in rows], np.float64)
    for layer in range(num_layers):
        cv.plot(steps, cv_SxL[:, layer], "o-", ms=3, label=f"layer {layer}")
    cv.set_xlabel("step")
    cv.set_ylabel("load CV (0 = balanced)")
    cv.grid(alpha=0.3)
    cv.legend(fontsize=8)
    fig.tight_layout()
    return _save(fig, path)
