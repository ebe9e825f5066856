"""Runs one paper-reproduction sweep (S1-S5) and writes its results: JSON per run, a table, a plot.

  python experiments/run_sweep.py s1_balancing [--size=small] [--only=REGEX]

``s1_balancing`` names ``experiments/s1_balancing.py`` (its ``sweep(size)`` lists the runs). Each run
trains with ``moejax.trainer.run`` in ``runs/sweeps/<sweep>-<size>/<run>/`` and its numbers go to
``experiments/results/<sweep>/runs/<run>.json`` (``<sweep>-<size>`` for sizes other than ``small``);
a run whose JSON exists is skipped, so an interrupted sweep resumes. Then the runs of one setting
(several seeds) are pooled, mean and standard deviation, into ``results.json``, ``table.md`` and
``<sweep>.png``, and the block between ``<!-- BEGIN <sweep> -->`` and ``<!-- END <sweep> -->`` in
``experiments/RESULTS.md`` (``<sweep>-<size>`` for sizes other than ``small``) is replaced by the
generated table: no number there is typed by hand.

A sweep may also list ``COMPARISONS``: differences between settings computed per seed (paired), then
pooled, in a second table.

Per run: final validation loss and perplexity (and its drop from the step-0 evaluation), median
training step time (compilation excluded), dropped-token fraction, per-family exact match and
answer-token loss of instruction-tuned runs (with the held-out families' mean and its drop), and,
when the sweep sets ``ANALYZE_BALANCE``, Shazeer et al.'s balance statistics measured on the final
checkpoint (see :func:`balance_statistics`). A run that diverges (non-finite loss) is recorded with
``diverged: true``.
"""

from __future__ import annotations

import argparse
import importlib
import json
import math
import os
import re
import sys
import time

if not __package__:  # run as a script: the sweep configs import the experiments package
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import matplotlib  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from moejax import data as data_lib  # noqa: E402
from moejax import parallel, trainer  # noqa: E402
from moejax.data import instruct_synth  # noqa: E402
from moejax.trainer.checkpoint import restore_params  # noqa: E402
from moejax.trainer.metrics_writer import read_metrics  # noqa: E402

EXPERIMENTS_DIR = os.path.dirname(os.path.abspath(__file__))
REPO_DIR = os.path.dirname(EXPERIMENTS_DIR)
BALANCE_BATCHES = 8


def load_sweep(name: str):
    """The sweep config module ``experiments/<name>.py``."""
    path = os.path.join(EXPERIMENTS_DIR, f"{name}.py")
    if not re.fullmatch(r"s\d_\w+", name) or not os.path.exists(path):
        available = sorted(f[:-3] for f in os.listdir(EXPERIMENTS_DIR)
                           if re.fullmatch(r"s\d_\w+\.py", f))
        raise ValueError(f"sweep {name!r} not found; available: {', '.join(available)}")
    return importlib.import_module(f"experiments.{name}")


# ---------------------------------------------------------------------- one run


def execute(sweep, run, workdir: str, workdirs: dict[str, str]) -> dict:
    """Trains ``run`` in ``workdir`` and returns its result record."""
    config = sweep.get_config(run.arg)
    if config.get("init_from") in workdirs:
        # A sweep names the run it fine-tunes; the runner knows where that run lives.
        config.init_from = workdirs[config.init_from]
    start = time.perf_counter()
    diverged = False
    try:
        summary = trainer.run(config, workdir)
    except FloatingPointError:
        diverged, summary = True, {}
    wall_s = time.perf_counter() - start
    rows = read_metrics(workdir)
    result = {"name": run.name, "group": run.group, "seed": run.seed, "arg": run.arg,
              "config": config.to_dict(), "wall_s": wall_s, "diverged": diverged,
              "num_params": summary.get("num_params")}
    result.update(train_statistics(rows))
    evals = [row for row in rows if "eval_loss" in row]
    if evals and not diverged:
        final = evals[-1]
        result["eval_loss"] = final["eval_loss"]
        result["eval_perplexity"] = final["eval_perplexity"]
        if len(evals) > 1 and evals[0]["step"] == 0:
            # The step-0 evaluation is the starting point's loss (for fine-tuning: before tuning).
            result["initial_eval_loss"] = evals[0]["eval_loss"]
            result["eval_loss_gain"] = evals[0]["eval_loss"] - final["eval_loss"]
        if "eval_dropped_fraction" in final:
            result["eval_dropped_fraction"] = float(np.mean(final["eval_dropped_fraction"]))
        for key, value in final.items():
            if key.startswith(("eval_exact_match/", "eval_answer_loss/")):
                result[key] = value
        result.update(held_out_answer_loss(evals))
        if getattr(sweep, "ANALYZE_BALANCE", False) and config.moe is not None:
            result.update(balance_statistics(config, workdir))
    return result


def held_out_answer_loss(evals: list[dict]) -> dict:
    """Mean answer-token loss over the held-out ``instruct_synth`` families the run scored (zero-shot
    for an instruction-tuned model), and its fall from the step-0 evaluation."""
    keys = [f"eval_answer_loss/{family}" for family in instruct_synth.HELD_OUT_FAMILIES]
    final = evals[-1]
    if not all(key in final for key in keys):
        return {}
    out = {"held_out_answer_loss": float(np.mean([final[key] for key in keys]))}
    if len(evals) > 1 and evals[0]["step"] == 0 and all(key in evals[0] for key in keys):
        out["held_out_answer_loss_gain"] = (float(np.mean([evals[0][key] for key in keys]))
                                            - out["held_out_answer_loss"])
    return out


def train_statistics(rows: list[dict]) -> dict:
    """Step time (first logged interval, which holds compilation, left out), drops, loss spikes."""
    train_rows = [row for row in rows if "train_loss" in row]
    out = {}
    speeds = [row["steps_per_sec"] for row in train_rows[1:]]
    if speeds:
        out["step_time_ms"] = 1000.0 / float(np.median(speeds))
    drops = [np.mean(row["train_dropped_fraction"]) for row in train_rows
             if "train_dropped_fraction" in row]
    if drops:
        out["train_dropped_fraction"] = float(np.mean(drops))
    if train_rows:
        losses = np.asarray([row["train_loss"] for row in train_rows])
        out["final_train_loss"] = float(losses[-1])
        # A spike: a logged loss above the best so far by more than 0.5 nats (instability).
        out["loss_spikes"] = int(np.sum(losses[1:] > np.minimum.accumulate(losses)[:-1] + 0.5))
    return out


def balance_statistics(config, workdir: str) -> dict:
    """Shazeer et al.'s balance numbers of the final checkpoint, gating noise on (training mode).

    Per validation batch and MoE layer: CV(Importance(X)) and CV(Load(X)) (eq. 6 and 10; noisy
    routers only) and max/mean of the tokens each expert receives; averaged over batches and layers.
    """
    setup = trainer.setup(config)
    config, mesh = setup.config, setup.mesh
    with parallel.use_mesh(mesh, setup.rules):
        params = setup.state["params"]
        # Checkpoints hold plain arrays, not nnx Variables: restore a pure dict, then fill the State.
        abstract = jax.tree.map(
            lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
            nnx.to_pure_dict(params))
        _, restored = restore_params(os.path.join(workdir, "checkpoints"), abstract)
        nnx.replace_by_pure_dict(params, restored)

        @jax.jit
        def routing_metrics(params, rest, rng_state, inputs, key):
            model = nnx.merge(setup.graphdef, params, rng_state, rest)
            _, aux = model(inputs, token_mask=inputs != setup.tokenizer.pad_id, rngs=key)
            out = {"tokens_per_expert": aux.metrics["tokens_per_expert"]}
            for name in ("importance", "load"):
                if name in aux.metrics:
                    out[name] = aux.metrics[name]
            return out

        batches = data_lib.create_iterator(config.dataset, split="validation", seed=config.seed,
                                           shuffle=False, seq_len=config.seq_len,
                                           batch_size=config.batch_size, data_dir=config.data_dir,
                                           text_key=config.text_key, tokenizer=setup.tokenizer,
                                           stream=config.stream_data)
        per_batch: dict[str, list[float]] = {}
        for i in range(BALANCE_BATCHES):
            try:
                batch = parallel.shard_batch(next(batches), mesh, setup.rules)
            except StopIteration:
                break
            out = jax.device_get(routing_metrics(params, setup.state["rest"], setup.rng_state,
                                                 batch["inputs"], jax.random.key(1000 + i)))
            load_LxE = np.asarray(out["tokens_per_expert"], np.float64)
            per_batch.setdefault("max_over_mean_load", []).append(
                float(np.mean(load_LxE.max(axis=1) / load_LxE.mean(axis=1))))
            for name in ("importance", "load"):
                if name in out:
                    v_LxE = np.asarray(out[name], np.float64)
                    per_batch.setdefault(f"cv_{name}", []).append(
                        float(np.mean(v_LxE.std(axis=1) / v_LxE.mean(axis=1))))
    return {name: float(np.mean(values)) for name, values in per_batch.items()}


# ---------------------------------------------------------------------- pooling, table, plot


def pool(results: list[dict], columns, baseline_group: str | None = None) -> list[dict]:
    """One row per group (in sweep order): mean, std and count of each column over its seeds.

    With ``baseline_group``, ``delta_eval_loss`` is each group's mean validation loss minus the
    baseline's (its std is the group's own).
    """
    groups: dict[str, list[dict]] = {}
    for result in results:
        groups.setdefault(result["group"], []).append(result)
    rows = []
    for group, members in groups.items():
        row = {"group": group, "seeds": len(members),
               "diverged": sum(bool(m["diverged"]) for m in members),
               "wall_s": float(sum(m["wall_s"] for m in members))}
        for key, _ in columns:
            values = [m[key] for m in members if m.get(key) is not None
                      and math.isfinite(m[key])]
            if values:
                row[key] = {"mean": float(np.mean(values)), "std": float(np.std(values)),
                            "n": len(values)}
        rows.append(row)
    baseline = next((row for row in rows if row["group"] == baseline_group), None)
    if baseline is not None and "eval_loss" in baseline:
        for row in rows:
            if "eval_loss" in row:
                row["delta_eval_loss"] = dict(row["eval_loss"], mean=row["eval_loss"]["mean"]
                                              - baseline["eval_loss"]["mean"])
    return rows


def paired_differences(results: list[dict], comparisons) -> list[dict]:
    """Per seed, ``sum(key of plus groups) - sum(key of minus groups)``; mean and std over the seeds
    that have every term. ``comparisons``: ``(label, key, plus_groups, minus_groups)`` tuples."""
    by_seed: dict[int, dict[str, dict]] = {}
    for result in results:
        by_seed.setdefault(result["seed"], {})[result["group"]] = result
    rows = []
    for label, key, plus, minus in comparisons:
        values = []
        for groups in by_seed.values():
            terms = [groups.get(g, {}).get(key) for g in plus + minus]
            if all(t is not None and math.isfinite(t) for t in terms):
                values.append(sum(terms[:len(plus)]) - sum(terms[len(plus):]))
        stat = ({"mean": float(np.mean(values)), "std": float(np.std(values)), "n": len(values)}
                if values else None)
        rows.append({"label": label, "key": key, "plus": list(plus), "minus": list(minus),
                     "value": stat})
    return rows


def comparison_table(rows: list[dict]) -> str:
    lines = ["| comparison (paired by seed) | seeds | value |", "|---|---|---|"]
    for row in rows:
        seeds = row["value"]["n"] if row["value"] else 0
        lines.append(f"| {row['label']} | {seeds} | {_cell(row['value'])} |")
    return "\n".join(lines) + "\n"


def _cell(stat) -> str:
    if stat is None:
        return "—"
    digits = 3 if abs(stat["mean"]) < 100 else 1
    text = f"{stat['mean']:.{digits}f}"
    return text + (f" ± {stat['std']:.{digits}f}" if stat["n"] > 1 else "")


def markdown_table(rows: list[dict], columns, group_label: str) -> str:
    header = [group_label, "seeds"] + [label for _, label in columns]
    if any(row["diverged"] for row in rows):
        header.append("diverged")
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        cells = [row["group"], str(row["seeds"])] + [_cell(row.get(key)) for key, _ in columns]
        if len(cells) < len(header):
            cells.append(f"{row['diverged']}/{row['seeds']}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], columns, keys, title: str, path: str) -> None:
    """One bar chart per plotted column: the mean over seeds, the standard deviation as error bar."""
    labels = dict(columns)
    fig, axes = plt.subplots(1, len(keys), figsize=(5.5 * len(keys), 4.2), squeeze=False)
    names = [row["group"] for row in rows]
    x = np.arange(len(rows))
    for ax, key in zip(axes[0], keys):
        means = [row[key]["mean"] if key in row else np.nan for row in rows]
        stds = [row[key]["std"] if key in row else 0.0 for row in rows]
        ax.bar(x, means, yerr=stds, capsize=3, color="tab:blue", alpha=0.8)
        ax.set_xticks(x, names, rotation=35, ha="right", fontsize=8)
        ax.set_title(labels[key])
        finite = [m for m in means if np.isfinite(m)]
        if key.endswith("loss") and finite:
            spread = max(finite) - min(finite)
            ax.set_ylim(min(finite) - max(spread, 0.02), max(finite) + max(spread, 0.02) * 0.5)
        ax.grid(axis="y", alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def section(sweep, name: str, size: str, table: str, results: list[dict], out_dir: str,
            results_md: str) -> str:
    """The generated block of RESULTS.md: command, measured time, our table, the paper's, plot."""
    command = f"python experiments/run_sweep.py {name}" + ("" if size == "small" else f" --size={size}")
    total_s = sum(r["wall_s"] for r in results)
    rel = os.path.relpath(out_dir, os.path.dirname(os.path.abspath(results_md)))
    lines = [f"Command: `{command}` — {len(results)} runs, measured {total_s / 60:.1f} min of "
             f"training on this machine (2 CPU cores shared with other work).", "",
             f"Ours (size={size}; mean ± std over seeds):", "", table]
    if getattr(sweep, "PAPER", None) and size == "small":  # once per section
        lines += ["Paper:", "", sweep.PAPER]
    lines += [f"![{name}]({rel}/{name}.png)", ""]
    return "\n".join(lines)


def replace_block(path: str, name: str, text: str) -> bool:
    """Replaces the ``<!-- BEGIN name -->`` ... ``<!-- END name -->`` block of ``path``, if present."""
    if not os.path.exists(path):
        return False
    with open(path) as f:
        content = f.read()
    begin, end = f"<!-- BEGIN {name} -->", f"<!-- END {name} -->"
    if begin not in content or end not in content:
        return False
    head, rest = content.split(begin, 1)
    _, tail = rest.split(end, 1)
    with open(path, "w") as f:
        f.write(f"{head}{begin}\n{text}{end}{tail}")
    return True


# ---------------------------------------------------------------------- the sweep


def run_sweep(name: str, *, size: str = "small", only: str | None = None,
              workroot: str | None = None, results_root: str | None = None,
              results_md: str | None = None) -> dict:
    """Runs (or resumes) sweep ``name`` and writes its results; returns the pooled results."""
    sweep = load_sweep(name)
    runs = sweep.sweep(size)
    workroot = workroot or os.path.join(REPO_DIR, "runs", "sweeps")
    results_root = results_root or os.path.join(EXPERIMENTS_DIR, "results")
    results_md = results_md or os.path.join(EXPERIMENTS_DIR, "RESULTS.md")
    out_dir = os.path.join(results_root, name if size == "small" else f"{name}-{size}")
    os.makedirs(os.path.join(out_dir, "runs"), exist_ok=True)
    workdirs = {run.name: os.path.join(workroot, f"{name}-{size}", run.name) for run in runs}
    results = []
    for run in runs:
        path = os.path.join(out_dir, "runs", f"{run.name}.json")
        if os.path.exists(path):
            with open(path) as f:
                results.append(json.load(f))
            continue
        if only and not re.search(only, run.name):
            continue
        print(f"[{name}] {run.name} ({run.arg})", flush=True)
        result = execute(sweep, run, workdirs[run.name], workdirs)
        with open(path, "w") as f:
            json.dump(result, f, indent=1)
        print(f"[{name}] {run.name}: wall {result['wall_s']:.0f}s, eval loss "
              f"{result.get('eval_loss', float('nan')):.4f}", flush=True)
        results.append(result)
    columns = sweep.COLUMNS
    rows = pool(results, columns, getattr(sweep, "BASELINE_GROUP", None))
    table = markdown_table(rows, columns, getattr(sweep, "GROUP_LABEL", "setting"))
    pooled = {"sweep": name, "size": size, "section": sweep.SECTION, "title": sweep.TITLE,
              "total_wall_s": sum(r["wall_s"] for r in results), "groups": rows}
    if getattr(sweep, "COMPARISONS", None):
        pooled["comparisons"] = paired_differences(results, sweep.COMPARISONS)
        table += "\n" + comparison_table(pooled["comparisons"])
    with open(os.path.join(out_dir, "results.json"), "w") as f:
        json.dump(pooled, f, indent=1)
    with open(os.path.join(out_dir, "table.md"), "w") as f:
        f.write(table)
    if rows:
        plot(rows, columns, sweep.PLOT, f"{sweep.SECTION}: {sweep.TITLE} (size={size})",
             os.path.join(out_dir, f"{name}.png"))
    # The committed size=small results fill <!-- BEGIN name -->; another size its own <name>-<size> block.
    replace_block(results_md, name if size == "small" else f"{name}-{size}",
                  section(sweep, name, size, table, results, out_dir, results_md))
    return pooled


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("sweep", help="a sweep config in experiments/, e.g. s1_balancing")
    parser.add_argument("--size", default="small", choices=("micro", "small", "long", "full"))
    parser.add_argument("--only", default=None, help="run only the runs whose name matches")
    parser.add_argument("--workroot", default=None, help="where run workdirs go (runs/sweeps)")
    args = parser.parse_args(argv)
    pooled = run_sweep(args.sweep, size=args.size, only=args.only, workroot=args.workroot)
    print(f"{args.sweep}: {len(pooled['groups'])} settings, "
          f"{pooled['total_wall_s'] / 60:.1f} min of training in total")


if __name__ == "__main__":
    main()
