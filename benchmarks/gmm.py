"""CPU grouped matmul: moejax's ``cpu`` backend and ``jax.lax.ragged_dot`` against a dense matmul.

    python benchmarks/gmm.py                # full table, about 5-10 minutes on 2 cores
    python benchmarks/gmm.py --quick        # tiny shapes, a smoke test
    python benchmarks/gmm.py --repeats 9

Every case times, side by side in one process (interleaved repeats, medians; ragged_dot in its own
rounds after the others, at most 3):

* ``dense``: ``lhs @ rhs[0]``, the same FLOPs as the grouped product;
* ``cpu``: ``moejax.ops.gmm(..., backend="cpu")``;
* ``ragged_dot``: ``jax.lax.ragged_dot``, skipped when its estimated time (about ``E`` dense
  products per call on CPU) passes 30 s per case or its ``[g, m, k]`` expansion passes 2 GiB;
* the floor: ``max(dense, rhs.sum())`` forward (one streaming read of ``rhs``) and
  ``max(dense, rhs * 2)`` forward+backward (which must also write a fresh ``rhs``-sized ``drhs``).

Forward+backward is ``jax.value_and_grad`` of ``sum(out)`` with respect to ``lhs`` and ``rhs`` (the
value keeps XLA from dropping the forward): through ``moejax.ops.gmm``'s custom VJP for ``cpu``,
through autodiff for ``ragged_dot`` and ``dense``.

Group sizes: ``balanced`` (``rows / E`` each) or ``zipf`` (``p_i ~ i**-1.2``, expert order shuffled
with a fixed seed). The table gives wall-clock ratios to dense and, in parentheses, the same ratio in
process CPU time, which moves less when other processes share the cores. Results go to
``benchmarks/results/gmm_cpu.json`` (with the machine, jax version, date and load average) and
``gmm_cpu.png``. Run with ``XLA_FLAGS`` unset.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import json
import os
import platform
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from moejax.ops import gmm

RESULTS = Path(__file__).resolve().parent / "results"
FULL = dict(rows=(4096, 16384), d=512, f=1024, experts=(8, 64, 256))
QUICK = dict(rows=(256,), d=32, f=64, experts=(8,))
# ragged_dot is timed with at most this many repeats, and skipped past this estimated wall time per
# case or this expansion size.
RAGGED_REPEATS = 3
RAGGED_MAX_SECONDS = 30.0
RAGGED_MAX_BYTES = 2 << 30


def group_sizes(rows: int, experts: int, kind: str) -> np.ndarray:
    if kind == "balanced":
        p = np.ones(experts)
    else:
        p = np.arange(1, experts + 1, dtype=np.float64) ** -1.2
        np.random.default_rng(0).shuffle(p)
    p = rows * p / p.sum()
    sizes = np.floor(p).astype(np.int64)
    sizes[np.argsort(sizes - p)[: rows - sizes.sum()]] += 1
    return sizes.astype(np.int32)


def _dense(lhs, rhs):
    return lhs @ rhs[0]


def _cpu(lhs, rhs, sizes):
    return gmm(lhs, rhs, sizes, backend="cpu")


def _ragged(lhs, rhs, sizes):
    return jax.lax.ragged_dot(lhs, rhs, sizes)


def _sum_value_and_grad(fn):
    return jax.value_and_grad(lambda lhs, rhs, *rest: fn(lhs, rhs, *rest).sum(), (0, 1))


# One jitted function per (product, mode), shared by the cases so equal shapes compile once.
TIMED = {
    (name, mode): jax.jit(fn if mode == "fwd" else _sum_value_and_grad(fn))
    for name, fn in (("dense", _dense), ("cpu", _cpu), ("ragged_dot", _ragged))
    for mode in ("fwd", "fwd+bwd")
}
STREAM = {"fwd": jax.jit(lambda rhs: rhs.sum()), "fwd+bwd": jax.jit(lambda rhs: rhs * 2)}


def _medians(times: dict) -> dict:
    return {name: float(np.median(t)) for name, t in times.items()}


def interleaved_medians(fns: dict, repeats: int) -> tuple[dict, dict]:
    """Median wall and process-CPU seconds of each (fn, args): warmed up, then alternating rounds.

    CPU seconds count only this process's threads, so they move less than wall time when other
    processes share the cores.
    """
    for fn, args in fns.values():
        jax.block_until_ready(fn(*args))
    wall = {name: [] for name in fns}
    cpu = {name: [] for name in fns}
    for _ in range(repeats):
        for name, (fn, args) in fns.items():
            start, start_cpu = time.perf_counter(), time.process_time()
            jax.block_until_ready(fn(*args))
            wall[name].append(time.perf_counter() - start)
            cpu[name].append(time.process_time() - start_cpu)
    return _medians(wall), _medians(cpu)


def run_case(rows, d, f, experts, kind, mode, repeats):
    keys = jax.random.split(jax.random.key(0), 2)
    lhs = jax.random.normal(keys[0], (rows, d), jnp.float32)
    rhs = jax.random.normal(keys[1], (experts, d, f), jnp.float32)
    sizes = jnp.asarray(group_sizes(rows, experts, kind))
    fns = {
        "dense": (TIMED["dense", mode], (lhs, rhs[:1])),
        "cpu": (TIMED["cpu", mode], (lhs, rhs, sizes)),
        "rhs_stream": (STREAM[mode], (rhs,)),
    }

    t, cpu_t = interleaved_medians(fns, repeats)

    # ragged_dot runs apart, after the others: its seconds-long, GiB-sized calls would disturb the
    # millisecond timings next to them. On CPU it costs about ``experts`` dense products per call.
    ragged_repeats = min(repeats, RAGGED_REPEATS)
    ragged_estimate = 1.1 * t["dense"] * experts * (ragged_repeats + 1)
    expansion = experts * rows * max(d, f) * 4
    skip = None
    if ragged_estimate > RAGGED_MAX_SECONDS:
        skip = f"est. {ragged_estimate:.0f} s"
    elif expansion > RAGGED_MAX_BYTES:
        skip = f"expansion {expansion / 2**30:.0f} GiB"
    if skip is None:
        ragged = {"ragged_dot": (TIMED["ragged_dot", mode], (lhs, rhs, sizes))}
        t.update(interleaved_medians(ragged, ragged_repeats)[0])

    floor = max(t["dense"], t["rhs_stream"])
    return {
        "rows": rows, "d": d, "f": f, "experts": experts, "group_sizes": kind, "mode": mode,
        "dense_s": t["dense"], "cpu_s": t["cpu"], "ragged_dot_s": t.get("ragged_dot"),
        "ragged_dot_skipped": skip, "rhs_stream_s": t["rhs_stream"], "floor_s": floor,
        "cpu_ratio": t["cpu"] / t["dense"],
        "cpu_ratio_in_process_cpu_time": cpu_t["cpu"] / cpu_t["dense"],
        "ragged_dot_ratio": t["ragged_dot"] / t["dense"] if "ragged_dot" in t else None,
        "floor_ratio": floor / t["dense"],
    }


def machine_info() -> dict:
    model = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "cpu": model, "cores": os.cpu_count(), "platform": platform.platform(),
        "python": platform.python_version(), "jax": jax.__version__,
        "jaxlib": importlib.metadata.version("jaxlib"),
        "devices": [str(x) for x in jax.devices()],
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
        "load_average_at_start": os.getloadavg(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def format_row(r: dict) -> str:
    ragged = (f"{r['ragged_dot_s'] * 1e3:9.1f} {r['ragged_dot_ratio']:7.2f}x"
              if r["ragged_dot_s"] is not None else f"  skipped ({r['ragged_dot_skipped']})")
    return (f"{r['rows']:6d} {r['experts']:4d} {r['group_sizes']:9s} {r['mode']:8s}"
            f"{r['dense_s'] * 1e3:9.1f} {r['cpu_s'] * 1e3:9.1f} {r['cpu_ratio']:7.2f}x"
            f" ({r['cpu_ratio_in_process_cpu_time']:4.2f}x)"
            f"{r['floor_s'] * 1e3:9.1f} {r['floor_ratio']:6.2f}x {ragged}")


HEADER = (f"{'rows':>6s} {'E':>4s} {'groups':9s} {'mode':8s}{'dense ms':>9s} {'cpu ms':>9s}"
          f" {'ratio':>7s} {'(cpu-s)':>8s}{'floor ms':>9s} {'ratio':>6s}"
          f" {'ragged ms':>9s} {'ratio':>7s}")


def plot(results: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    modes = ("fwd", "fwd+bwd")
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.8), sharey=True)
    for ax, mode in zip(axes, modes):
        for rows in sorted({r["rows"] for r in results}):
            for kind, style in (("balanced", "-"), ("zipf", "--")):
                sel = [r for r in results if r["mode"] == mode and r["rows"] == rows
                       and r["group_sizes"] == kind]
                if not sel:
                    continue
                experts = [r["experts"] for r in sel]
                ax.plot(experts, [r["cpu_ratio"] for r in sel], style, marker="o",
                        label=f"cpu, {rows} rows, {kind}")
                ragged = [(r["experts"], r["ragged_dot_ratio"]) for r in sel
                          if r["ragged_dot_ratio"] is not None]
                if ragged:
                    ax.plot(*zip(*ragged), style, marker="x", color="gray", alpha=0.7,
                            label=f"ragged_dot, {rows} rows, {kind}")
        ax.axhline(1.0, color="black", linewidth=0.8)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("experts E")
        ax.set_title(mode)
    axes[0].set_ylabel("time / dense matmul of equal FLOPs")
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=4, fontsize=7)
    fig.suptitle("grouped matmul on CPU (lower is better)")
    fig.tight_layout(rect=(0, 0.12, 1, 1))
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny shapes, few cases (smoke test)")
    parser.add_argument("--repeats", type=int, default=5, help="timed rounds per case")
    parser.add_argument("--out", type=Path, default=RESULTS, help="folder for the JSON and PNG")
    args = parser.parse_args()
    grid = QUICK if args.quick else FULL

    info = machine_info()
    print(f"{info['cpu']}, {info['cores']} cores, jax {info['jax']}, {info['date']}")
    print(HEADER)
    results = []
    for rows in grid["rows"]:
        for experts in grid["experts"]:
            for kind in ("balanced", "zipf"):
                for mode in ("fwd", "fwd+bwd"):
                    r = run_case(rows, grid["d"], grid["f"], experts, kind, mode, args.repeats)
                    results.append(r)
                    print(format_row(r), flush=True)

    args.out.mkdir(parents=True, exist_ok=True)
    payload = {"machine": info, "shapes": {k: v for k, v in grid.items()},
               "repeats": args.repeats, "results": results}
    (args.out / "gmm_cpu.json").write_text(json.dumps(payload, indent=1))
    plot(results, args.out / "gmm_cpu.png")
    print(f"wrote {args.out / 'gmm_cpu.json'} and {args.out / 'gmm_cpu.png'}")


if __name__ == "__main__":
    main()
