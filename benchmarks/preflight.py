"""The pod configs (experiments/pod/) preflighted for their slices: compile time, memory, collectives.

  python benchmarks/preflight.py [--configs=olmoe_1b_7b,...] [--slices=v5p-64,...] [--timeout=3600]

Each (config, slice) runs ``python -m moejax.preflight`` in its own process (the TPU compiler's
memory is returned between runs) at full depth and width. Writes the table to
``benchmarks/results/preflight.md`` (a row per run, also for runs that fail, with the reason) and
the full reports to ``benchmarks/results/preflight.txt``, after every run; the rows and reports of
runs not repeated (other ``--configs`` / ``--slices``) are kept.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = ("olmoe_1b_7b", "mixtral_8x7b", "deepseek_v3_small")


def _slices():
    if ROOT not in sys.path:  # the pod configs are a package of the repository
        sys.path.insert(0, ROOT)
    from experiments.pod.slices import SLICES

    return SLICES


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
    collective = _field(r"^  total\s+([\d.]+ GiB)\s*$", out)
    row = (f"| {config} | {slice_name} ({topology}) | {compile_s} | {state:.2f} GiB | {temps} | "
           f"{total} | {collective} | {fits} |")
    return row, out


HEADER = ["| config | slice (topology) | train step compile | params + optimizer / device | "
          "temporaries / device | total / device vs HBM | collectives sent / device / step | fits |",
          "|---|---|---|---|---|---|---|---|"]


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--configs", default=",".join(CONFIGS))
    parser.add_argument("--slices", default=None)
    parser.add_argument("--timeout", type=int, default=3600)
    args = parser.parse_args()
    slices = _slices()
    names = args.slices.split(",") if args.slices else list(slices)
    # Runs not repeated now keep their earlier row and report.
    rows, reports = _read()
    for config in args.configs.split(","):
        for name in names:
            row, report = one(config, name, slices[name]["topology"], args.timeout)
            print(row, flush=True)
            rows[(config, name)] = row
            reports[(config, name)] = f"## {config} on {name}\n\n{report}\n"
            _write(rows, reports, list(slices))  # after every run: an interrupted sweep keeps it


def _paths():
    results = os.path.join(ROOT, "benchmarks", "results")
    return os.path.join(results, "preflight.md"), os.path.join(results, "preflight.txt")


def _read():
    md, txt = _paths()
    rows, reports = {}, {}
    if os.path.exists(md):
        for line in open(md).read().splitlines()[2:]:
            cells = [c.strip() for c in line.strip("|").split("|")]
            if len(cells) > 2:
                rows[(cells[0], cells[1].split(" ")[0])] = line
    if os.path.exists(txt):
        for part in re.split(r"^(?=## )", open(txt).read(), flags=re.M):
            if m := re.match(r"## (\S+) on (\S+)", part):
                reports[(m.group(1), m.group(2))] = part.rstrip("\n") + "\n"
    return rows, reports


def _write(rows, reports, slice_order):
    def order(key):
        config, name = key
        return (CONFIGS.index(config) if config in CONFIGS else len(CONFIGS), config,
                slice_order.index(name) if name in slice_order else len(slice_order))

    md, txt = _paths()
    with open(md, "w") as f:
        f.write("\n".join(HEADER + [rows[k] for k in sorted(rows, key=order)]) + "\n")
    with open(txt, "w") as f:
        f.write("\n".join(reports[k] for k in sorted(reports, key=order)))


if __name__ == "__main__":
    main()
