"""The pod configs (experiments/pod/) preflighted for their slices: compile time, memory, collectives.

  python benchmarks/preflight.py [--configs=olmoe_1b_7b,...] [--slices=v5p-64,...] [--timeout=3600]

Each (config, slice) runs ``python -m moejax.preflight`` in its own process (the TPU compiler's
memory is returned between runs) at full depth and width. Writes the table to
``benchmarks/results/preflight.md`` (a row per run, also for runs that fail, with the reason) and
the full reports to ``benchmarks/results/preflight.txt``.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import re
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = ("olmoe_1b_7b", "mixtral_8x7b", "deepseek_v3_small")


def _slices():
    spec = importlib.util.spec_from_file_location(
        "pod_slices", os.path.join(ROOT, "experiments", "pod", "slices.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.SLICES


def _field(pattern, text, default="—"):
    m = re.search(pattern, text, re.M)
    return m.group(1).strip() if m else default


def one(config, slice_name, topology, timeout):
    command = [sys.executable, "-m", "moejax.preflight",
               f"--config=experiments/pod/{config}.py:slice={slice_name}", f"--topology={topology}"]
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=ROOT)
    start = time.perf_counter()
    try:
        done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True,
                              timeout=timeout)
    except subprocess.TimeoutExpired:
        return (f"| {config} | {slice_name} ({topology}) | > {timeout} s | — | — | — | — | "
                "compile did not finish |", "")
    wall = time.perf_counter() - start
    out = done.stdout
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    if done.returncode not in (0, 1) or not out:
        reason = errors[0][len("error: "):] if errors else done.stderr.strip().splitlines()[-1]
        return (f"| {config} | {slice_name} ({topology}) | {wall:.0f} s | — | — | — | — | "
                f"failed: {reason[:160]} |", done.stderr[-4000:])
    compile_s = _field(r"compile: train step ([\d.]+ s)", out)
    state = (float(_field(r"parameters\s+([\d.]+) GiB", out, "0"))
             + float(_field(r"optimizer state\s+([\d.]+) GiB", out, "0")))
    temps = _field(r"temporaries\s+([\d.]+ GiB)", out)
    total = _field(r"total\s+([\d.]+ GiB of\s+[\d.]+ GiB HBM \(\d+%\))", out)
    fits = "yes" if done.returncode == 0 else "**no**"
    total = re.sub(r"\s+", " ", total)
    collective = _field(r"^  total\s+([\d.]+ GiB)", out)
    row = (f"| {config} | {slice_name} ({topology}) | {compile_s} | {state:.2f} GiB | {temps} | "
           f"{total} | {collective} | {fits} |")
    return row, out


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--configs", default=",".join(CONFIGS))
    parser.add_argument("--slices", default=None)
    parser.add_argument("--timeout", type=int, default=3600)
    args = parser.parse_args()
    slices = _slices()
    names = args.slices.split(",") if args.slices else list(slices)
    rows = ["| config | slice (topology) | train step compile | params + optimizer / device | "
            "temporaries / device | total / device vs HBM | collectives sent / device / step | "
            "fits |", "|---|---|---|---|---|---|---|---|"]
    reports = []
    for config in args.configs.split(","):
        for name in names:
            row, report = one(config, name, slices[name]["topology"], args.timeout)
            print(row, flush=True)
            rows.append(row)
            reports.append(f"## {config} on {name}\n\n{report}\n")
    results = os.path.join(ROOT, "benchmarks", "results")
    with open(os.path.join(results, "preflight.md"), "w") as f:
        f.write("\n".join(rows) + "\n")
    with open(os.path.join(results, "preflight.txt"), "w") as f:
        f.write("\n".join(reports))


if __name__ == "__main__":
    main()
