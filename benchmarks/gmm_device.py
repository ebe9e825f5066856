"""Device check of the Pallas GPU (Triton) grouped matmul: correctness, then bf16 throughput.

Run on a machine with an NVIDIA GPU (about 3 minutes on an H100/H200-class chip):

    python benchmarks/gmm_device.py

1. Correctness: ``moejax.ops.gmm`` / ``tgmm`` with ``backend="pallas_gpu"`` against
   ``jax.lax.ragged_dot`` / ``ragged_dot_general`` and against a dense per-group reference in f32
   at ``Precision.HIGHEST`` (adversarial group sizes, shapes that are not tile multiples,
   ``transpose_rhs``, ``group_offset``, f32 inputs, gradients).
2. Throughput in bf16 (f32 accumulation) for E in {8, 64} experts with random (imbalanced) group
   sizes: gmm and tgmm against a dense ``jnp.dot`` of equal FLOPs and against ``lax.ragged_dot``.
3. A small autotune over tilings at E = 8.

Prints markdown tables and writes JSON to ``$OUT/gmm_device.json`` when ``$OUT`` is set, else to
``benchmarks/results/gmm_device.json``. Exits 0 with a message when no GPU is present, 1 when a
correctness check fails. ``--smoke`` runs the same logic on the CPU in Pallas interpret mode with
tiny shapes (its timings mean nothing) and writes its JSON to ``$OUT`` or a temporary directory.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from moejax import ops  # noqa: E402

FULL = dict(
    check_shape=(4000, 1000, 700), check_groups=8,
    perf_shape=(32768, 4096, 4096), perf_experts=(8, 64),
    tilings=((128, 64, 128), (128, 32, 128), (64, 64, 128), (128, 64, 256), (64, 32, 64)),
    min_seconds=0.3,
)
SMOKE = dict(
    check_shape=(150, 40, 24), check_groups=4,
    perf_shape=(256, 64, 64), perf_experts=(2, 4),
    tilings=((16, 16, 16), (32, 16, 32)),
    min_seconds=0.0,
)
HIGHEST = jax.lax.Precision.HIGHEST


def _has_gpu() -> bool:
    try:
        return bool(jax.devices("gpu"))
    except RuntimeError:
        return False


def _sizes(rng, m: int, g: int, kind: str) -> np.ndarray:
    if kind == "random":
        return rng.multinomial(m, rng.dirichlet(np.ones(g))).astype(np.int32)
    if kind == "adversarial":  # empty first/last groups, one empty middle group, sum < m
        sizes = np.zeros(g, np.int32)
        sizes[1:-1] = rng.multinomial(m - 37, np.ones(g - 2) / (g - 2))
        sizes[g // 2] = 0
        return sizes
    raise ValueError(kind)


# --------------------------------------------------------------------------- references


def _dense_gmm(lhs, rhs_gxkxn, group_sizes, offset=0):
    """Per-group dense products in f32, rows of other groups masked to 0."""
    ends = jnp.cumsum(group_sizes)
    starts = ends - group_sizes
    rows_M = jnp.arange(lhs.shape[0])
    out = jnp.zeros((lhs.shape[0], rhs_gxkxn.shape[2]), jnp.float32)
    for i in range(rhs_gxkxn.shape[0]):
        in_group_M = (rows_M >= starts[offset + i]) & (rows_M < ends[offset + i])
        prod = jnp.dot(lhs.astype(jnp.float32), rhs_gxkxn[i].astype(jnp.float32),
                       precision=HIGHEST)
        out = jnp.where(in_group_M[:, None], prod, out)
    return out


def _dense_tgmm(lhs, rhs, group_sizes, offset, num_groups):
    ends = jnp.cumsum(group_sizes)
    starts = ends - group_sizes
    rows_M = jnp.arange(lhs.shape[0])
    outs = []
    for i in range(num_groups):
        in_group_M = (rows_M >= starts[offset + i]) & (rows_M < ends[offset + i])
        x = jnp.where(in_group_M[:, None], lhs.astype(jnp.float32), 0.0)
        outs.append(jnp.dot(x.T, rhs.astype(jnp.float32), precision=HIGHEST))
    return jnp.stack(outs)


def _ragged_tgmm(lhs, rhs, group_sizes):
    dims = jax.lax.RaggedDotDimensionNumbers(
        dot_dimension_numbers=(([0], [0]), ([], [])),
        lhs_ragged_dimensions=[0], rhs_group_dimensions=[])
    return jax.lax.ragged_dot_general(lhs, rhs, group_sizes, dims, precision=HIGHEST,
                                      preferred_element_type=jnp.float32)


def _rel_err(out, ref) -> float:
    out, ref = np.asarray(out, np.float32), np.asarray(ref, np.float32)
    if not np.all(np.isfinite(out)):
        return float("inf")
    return float(np.max(np.abs(out - ref)) / max(float(np.max(np.abs(ref))), 1e-30))


# --------------------------------------------------------------------------- correctness


def run_checks(cfg, interpret: bool) -> list[dict]:
    m, k, n = cfg["check_shape"]
    g = cfg["check_groups"]
    rng = np.random.default_rng(0)
    kw = dict(backend="pallas_gpu", interpret=interpret)
    results = []

    def record(name, out, ref, tol):
        err = _rel_err(out, ref)
        results.append(dict(check=name, max_rel_err=err, tol=tol, ok=bool(err <= tol)))

    for kind in ("random", "adversarial"):
        sizes = jnp.asarray(_sizes(rng, m, g, kind))
        for dtype, tol in ((jnp.bfloat16, 1e-2), (jnp.float32, 1e-5)):
            name = f"{kind} {jnp.dtype(dtype).name}"
            lhs = jnp.asarray(rng.standard_normal((m, k)), dtype)
            rhs = jnp.asarray(rng.standard_normal((g, k, n)), dtype)
            dout = jnp.asarray(rng.standard_normal((m, n)), dtype)
            out = jax.jit(lambda x, w, s: ops.gmm(x, w, s, preferred_element_type=jnp.float32,
                                                  **kw))(lhs, rhs, sizes)
            ragged = jax.lax.ragged_dot(lhs, rhs, sizes, preferred_element_type=jnp.float32,
                                        precision=HIGHEST)
            record(f"gmm vs ragged_dot, {name}", out, ragged, tol)
            record(f"gmm vs dense, {name}", out, _dense_gmm(lhs, rhs, sizes), tol)
            out_t = ops.gmm(lhs, jnp.swapaxes(rhs, 1, 2), sizes, transpose_rhs=True,
                            preferred_element_type=jnp.float32, **kw)
            record(f"gmm transpose_rhs vs dense, {name}", out_t, _dense_gmm(lhs, rhs, sizes), tol)
            local = rhs[2:g - 1]
            out_o = ops.gmm(lhs, local, sizes, group_offset=jnp.int32(2),
                            preferred_element_type=jnp.float32, **kw)
            record(f"gmm group_offset=2 vs dense, {name}", out_o, _dense_gmm(lhs, local, sizes, 2),
                   tol)
            out_tg = ops.tgmm(lhs, dout, sizes, preferred_element_type=jnp.float32, **kw)
            record(f"tgmm vs dense, {name}", out_tg, _dense_tgmm(lhs, dout, sizes, 0, g), tol)
            record(f"tgmm vs ragged_dot_general, {name}", out_tg,
                   _ragged_tgmm(lhs, dout, sizes), tol)

            def loss(x, w, impl):
                if impl == "pallas":
                    y = ops.gmm(x, w, sizes, preferred_element_type=jnp.float32, **kw)
                else:
                    y = jax.lax.ragged_dot(x, w, sizes, preferred_element_type=jnp.float32,
                                           precision=HIGHEST)
                return jnp.sum(y * dout.astype(jnp.float32))

            grads = jax.grad(loss, argnums=(0, 1))(lhs, rhs, "pallas")
            ref_grads = jax.grad(loss, argnums=(0, 1))(lhs, rhs, "ragged_dot")
            # Gradients come out in the input dtype: bf16 rounding on both sides.
            grad_tol = 2e-2 if dtype == jnp.bfloat16 else 1e-4
            record(f"dlhs vs ragged_dot autodiff, {name}", grads[0], ref_grads[0], grad_tol)
            record(f"drhs vs ragged_dot autodiff, {name}", grads[1], ref_grads[1], grad_tol)
    return results


# --------------------------------------------------------------------------- throughput


def _seconds_per_call(fn, args, min_seconds: float) -> float:
    jax.block_until_ready(fn(*args))  # compile and warm up
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    once = time.perf_counter() - start
    iters = int(min(50, max(3, min_seconds / max(once, 1e-9))))
    best = float("inf")
    for _ in range(3):
        start = time.perf_counter()
        for _ in range(iters):
            out = fn(*args)
        jax.block_until_ready(out)
        best = min(best, (time.perf_counter() - start) / iters)
    return best


def _measure(fn, args, flops: float, min_seconds: float) -> dict:
    try:
        s = _seconds_per_call(jax.jit(fn), args, min_seconds)
    except Exception as e:  # noqa: BLE001 - an oracle that fails (e.g. out of memory) is reported
        return dict(ms=None, tflops=None, error=f"{type(e).__name__}: {str(e)[:200]}")
    return dict(ms=s * 1e3, tflops=flops / s / 1e12, error=None)


def _perf_operands(cfg, g: int, seed: int = 1):
    m, k, n = cfg["perf_shape"]
    rng = np.random.default_rng(seed)
    key_x, key_w, key_y = jax.random.split(jax.random.key(seed), 3)
    lhs = jax.random.normal(key_x, (m, k), jnp.bfloat16)
    rhs = jax.random.normal(key_w, (g, k, n), jnp.bfloat16)
    dout = jax.random.normal(key_y, (m, n), jnp.bfloat16)
    sizes = jnp.asarray(_sizes(rng, m, g, "random"))
    return lhs, rhs, dout, sizes


def run_perf(cfg, interpret: bool) -> list[dict]:
    m, k, n = cfg["perf_shape"]
    flops = 2.0 * m * k * n
    kw = dict(backend="pallas_gpu", interpret=interpret)
    rows = []
    for g in cfg["perf_experts"]:
        lhs, rhs, dout, sizes = _perf_operands(cfg, g)
        cases = {
            ("gmm", "pallas_gpu"): (lambda x, w, s: ops.gmm(x, w, s, **kw), (lhs, rhs, sizes)),
            ("gmm", "lax.ragged_dot"): (
                lambda x, w, s: jax.lax.ragged_dot(x, w, s, preferred_element_type=jnp.bfloat16),
                (lhs, rhs, sizes)),
            ("gmm", "dense jnp.dot"): (jnp.dot, (lhs, rhs[0])),
            ("tgmm", "pallas_gpu"): (lambda x, y, s: ops.tgmm(x, y, s, **kw), (lhs, dout, sizes)),
            ("tgmm", "lax.ragged_dot_general"): (
                lambda x, y, s: _ragged_tgmm(x, y, s).astype(jnp.bfloat16), (lhs, dout, sizes)),
            ("tgmm", "dense jnp.dot"): (lambda x, y: jnp.dot(x.T, y), (lhs, dout)),
        }
        for (op, impl), (fn, args) in cases.items():
            result = _measure(fn, args, flops, cfg["min_seconds"])
            rows.append(dict(op=op, impl=impl, experts=g, m=m, k=k, n=n, **result))
            print(f"  E={g:<3} {op:<5} {impl:<24} {_fmt(result['ms'], '.3f')} ms", flush=True)
    for row in rows:
        dense = next(r for r in rows if r["op"] == row["op"] and r["experts"] == row["experts"]
                     and r["impl"] == "dense jnp.dot")
        row["vs_dense"] = (row["tflops"] / dense["tflops"]
                           if row["tflops"] and dense["tflops"] else None)
    return rows


def run_autotune(cfg, interpret: bool) -> list[dict]:
    m, k, n = cfg["perf_shape"]
    g = cfg["perf_experts"][0]
    flops = 2.0 * m * k * n
    lhs, rhs, dout, sizes = _perf_operands(cfg, g)
    rows = []
    for tiling in cfg["tilings"]:
        kw = dict(backend="pallas_gpu", interpret=interpret, tiling=tiling)
        for op, fn, args in (
            ("gmm", lambda x, w, s: ops.gmm(x, w, s, **kw), (lhs, rhs, sizes)),
            ("tgmm", lambda x, y, s: ops.tgmm(x, y, s, **kw), (lhs, dout, sizes)),
        ):
            result = _measure(fn, args, flops, cfg["min_seconds"])
            rows.append(dict(op=op, tiling=list(tiling), experts=g, **result))
            print(f"  {op:<5} tiling={tiling} {_fmt(result['ms'], '.3f')} ms", flush=True)
    return rows


# --------------------------------------------------------------------------- report


def _fmt(x, spec: str) -> str:
    return "-" if x is None else format(x, spec)


def _markdown(report: dict) -> str:
    lines = ["## Correctness", "", "| check | max rel err | tol | ok |", "|---|---|---|---|"]
    for c in report["checks"]:
        lines.append(f"| {c['check']} | {c['max_rel_err']:.2e} | {c['tol']:.0e} | "
                     f"{'yes' if c['ok'] else '**NO**'} |")
    m, k, n = report["perf_shape"]
    lines += ["", f"## bf16 throughput, m={m} k={k} n={n}, random group sizes", "",
              "| E | op | impl | ms | TFLOP/s | vs dense |", "|---|---|---|---|---|---|"]
    for r in report["perf"]:
        tail = f" ({r['error']})" if r["error"] else ""
        lines.append(f"| {r['experts']} | {r['op']} | {r['impl']}{tail} | {_fmt(r['ms'], '.3f')} | "
                     f"{_fmt(r['tflops'], '.1f')} | {_fmt(r['vs_dense'], '.2f')} |")
    lines += ["", f"## Autotune (E={report['perf_experts'][0]})", "",
              "| op | tiling (tm, tk, tn) | ms | TFLOP/s |", "|---|---|---|---|"]
    for r in report["autotune"]:
        tail = f" ({r['error']})" if r["error"] else ""
        lines.append(f"| {r['op']} | {tuple(r['tiling'])}{tail} | {_fmt(r['ms'], '.3f')} | "
                     f"{_fmt(r['tflops'], '.1f')} |")
    for op in ("gmm", "tgmm"):
        timed = [r for r in report["autotune"] if r["op"] == op and r["ms"] is not None]
        if timed:
            best = min(timed, key=lambda r: r["ms"])
            lines.append(f"\nbest {op} tiling: {tuple(best['tiling'])}")
    return "\n".join(lines)


def _output_path(smoke: bool) -> pathlib.Path:
    if os.environ.get("OUT"):
        return pathlib.Path(os.environ["OUT"]) / "gmm_device.json"
    if smoke:
        return pathlib.Path(tempfile.mkdtemp()) / "gmm_device.json"
    return pathlib.Path(__file__).resolve().parent / "results" / "gmm_device.json"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--smoke", action="store_true",
                        help="run the logic on the CPU in interpret mode with tiny shapes")
    args = parser.parse_args(argv)
    if not args.smoke and not _has_gpu():
        print("gmm_device: no GPU found; this check needs an NVIDIA GPU (use --smoke to run "
              "its logic on the CPU). Nothing to do.")
        return 0
    cfg = SMOKE if args.smoke else FULL
    interpret = args.smoke
    device = jax.devices()[0]
    print(f"gmm_device on {device.device_kind} ({device.platform}), jax {jax.__version__}",
          flush=True)
    start = time.perf_counter()
    report = dict(device=device.device_kind, platform=device.platform, jax=jax.__version__,
                  smoke=args.smoke, perf_shape=list(cfg["perf_shape"]),
                  perf_experts=list(cfg["perf_experts"]))
    print("correctness ...", flush=True)
    report["checks"] = run_checks(cfg, interpret)
    print("throughput ...", flush=True)
    report["perf"] = run_perf(cfg, interpret)
    print("autotune ...", flush=True)
    report["autotune"] = run_autotune(cfg, interpret)
    report["seconds"] = time.perf_counter() - start
    print(_markdown(report))
    path = _output_path(args.smoke)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=1))
    print(f"\nwrote {path} ({report['seconds']:.0f} s)")
    failed = [c["check"] for c in report["checks"] if not c["ok"]]
    if failed:
        print(f"FAILED checks: {failed}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
