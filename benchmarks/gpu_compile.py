"""Pallas GPU kernels compiled to cubin on a CPU host: resources per configuration, and a roofline
*estimate* for the benchmark shapes.

    python benchmarks/gpu_compile.py [--jobs 2]    # writes benchmarks/results/gpu_compile.json
    python benchmarks/report.py                     # puts its tables into benchmarks/RESULTS.md

Why: without a GPU, the choice of ``moejax.kernels.pallas_gpu.DEFAULT_CONFIGS`` (tiles, warps,
stages) can still rest on what the compiler does with each candidate: Triton compiles the kernel
for sm_80 / sm_90a and ``ptxas -v`` reports registers and spills (``moejax.kernels.gpu_inspect``).
This script sweeps tilings x warps for each kernel of gmm's custom VJP and dtype, compiles the
defaults for sm_80, sm_90a and sm_100a, and sets an analytical roofline next to a dense matmul's.

The roofline is an estimate from published peak figures, not a measurement:
``max(FLOPs / peak, bytes / HBM bandwidth)`` with compulsory bytes (every operand read once, the
output written once). ``benchmarks/gmm_device.py`` measures the kernels when a GPU is lent.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import datetime
import json
import os
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

from moejax.kernels import gpu_inspect  # noqa: E402

# Forward problem of the benchmark: T tokens x top-k rows; lhs [m, d_model], rhs [E, d_model, d_ff].
TOKENS, TOP_K, D_MODEL, D_FF = 8192, 2, 512, 512
EXPERTS = (8, 64)
SWEEP_SHAPE = (TOKENS * TOP_K, D_MODEL, D_FF, 8)

# Published dense peaks (no sparsity) and HBM bandwidth:
# A100 SXM 80GB: NVIDIA A100 Tensor Core GPU datasheet (BF16 312 TFLOP/s, TF32 156, FP32 19.5,
#   2,039 GB/s, quoted as 2.0 TB/s). H100 SXM: NVIDIA H100 Tensor Core GPU datasheet (BF16 989.4
#   TFLOP/s dense, i.e. 1,979 with sparsity; TF32 494.7; FP32 67; 3.35 TB/s). H200 SXM: NVIDIA
#   H200 datasheet (the H100's compute, 4.8 TB/s HBM3e).
GPUS = {
    "A100 SXM": dict(bf16=312e12, tf32=156e12, f32=19.5e12, hbm=2.0e12),
    "H100 SXM": dict(bf16=989e12, tf32=494e12, f32=67e12, hbm=3.35e12),
    "H200 SXM": dict(bf16=989e12, tf32=494e12, f32=67e12, hbm=4.8e12),
}


# --------------------------------------------------------------------------- sweep


def _candidates(kernel: str, dtype: str):
    """(tiling, warps) pairs: output tiles 64x64 .. 256x128 (256x256 needs more than the 255
    registers a thread may hold at 16 warps), contraction tiles around the defaults, and the warp
    counts that give each thread 16-128 accumulator elements."""
    contraction = (32, 64, 128) if dtype == "bfloat16" else (16, 32, 64)
    for out_a, out_b in ((64, 64), (128, 128), (128, 256), (256, 128)):
        for c in contraction:
            tiling = (c, out_a, out_b) if kernel == "tgmm" else (out_a, c, out_b)
            for warps in (4, 8, 16):
                if 16 <= out_a * out_b // (32 * warps) <= 128:
                    yield tiling, warps


def _sweep_job(kernel, dtype, tiling, warps_list, archs, stages):
    import moejax.kernels.pallas_gpu as pallas_gpu

    # Explicit tilings are refused beyond the portable shared-memory budget; the sweep reaches
    # past it on purpose, to show what the larger tiles would need.
    pallas_gpu._SHARED_MEMORY_BYTES = 1 << 30
    call = gpu_inspect.exported_call(kernel, dtype, SWEEP_SHAPE, tiling)
    rows = []
    for arch in archs:
        for warps in warps_list:
            try:
                report = gpu_inspect.inspect_kernel(
                    kernel, dtype, arch, SWEEP_SHAPE, tiling=tiling, num_warps=warps,
                    num_stages=stages, call=call)
                rows.append(report.row())
            except RuntimeError as err:  # ptxas refuses, e.g. "Insufficient registers"
                fatal = [line for line in str(err).splitlines() if "fatal" in line]
                rows.append(dict(kernel=kernel, dtype=dtype, arch=arch, tiling=list(tiling),
                                 num_warps=warps, num_stages=stages,
                                 error=(fatal or [str(err)])[0][:200]))
    return rows


def _defaults_job(dtype, m, k, n, g, archs):
    return [r.row() for r in gpu_inspect.inspect_all(archs, [dtype], (m, k, n, g))]


# --------------------------------------------------------------------------- roofline


def roofline(kernel: str, dtype: str, experts: int, tiling) -> dict:
    """FLOPs and compulsory bytes of one kernel at the benchmark shape, and of a dense matmul of
    equal FLOPs, with the estimated time on each GPU.

    ``executed_flops`` adds the tiles a kernel multiplies but discards in the worst case, when
    every group boundary falls inside a tile: gmm runs up to ``E - 1`` extra row tiles, tgmm up
    to ``E`` extra ``tm``-row steps per output tile.
    """
    m, k, n = TOKENS * TOP_K, D_MODEL, D_FF
    width = 2 if dtype == "bfloat16" else 4
    flops = 2 * m * k * n
    tm = tiling[0]
    if kernel == "tgmm":
        nbytes = width * (m * k + m * n + experts * k * n)
        steps = -(-m // tm) + experts
        executed = 2 * steps * tm * k * n
    else:  # gmm and gmm_dlhs read lhs [m, k|n] and all experts' weights, write [m, n|k]
        nbytes = width * (m * k + experts * k * n + m * n)
        tiles = -(-m // tm) + experts - 1
        executed = 2 * tiles * tm * k * n
    dense_bytes = width * (m * k + k * n + m * n)
    peak_key = "bf16" if dtype == "bfloat16" else "f32"
    est = {}
    for gpu, fig in GPUS.items():
        t = max(executed / fig[peak_key], nbytes / fig["hbm"])
        t_dense = max(flops / fig[peak_key], dense_bytes / fig["hbm"])
        est[gpu] = dict(us=1e6 * t, dense_us=1e6 * t_dense,
                        bound="compute" if executed / fig[peak_key] >= nbytes / fig["hbm"]
                        else "memory")
    return dict(kernel=kernel, dtype=dtype, experts=experts, tiling=list(tiling), flops=flops,
                executed_flops=executed, bytes=nbytes, dense_bytes=dense_bytes,
                intensity=flops / nbytes, dense_intensity=flops / dense_bytes, estimate=est)


# --------------------------------------------------------------------------- main


def _ptxas_version() -> str:
    ptxas = gpu_inspect.ptxas_path()
    if ptxas is None:
        return "missing"
    out = subprocess.run([ptxas, "--version"], capture_output=True, text=True).stdout
    return out.strip().splitlines()[-1]


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=2, help="compiler processes")
    parser.add_argument("--no-sweep", action="store_true", help="defaults and roofline only")
    parser.add_argument("--out", default=os.path.join(HERE, "results", "gpu_compile.json"))
    args = parser.parse_args()
    gpu_inspect.prepare_environment()  # inherited by the worker processes
    why = gpu_inspect.missing_compiler()
    if why:
        sys.exit(f"cannot compile Triton kernels here: {why}")
    if gpu_inspect.ptxas_path() is None:
        sys.exit("ptxas not found: the sweep needs registers and spills")

    import jax

    from moejax.kernels import pallas_gpu

    dtypes = ("bfloat16", "float32")
    sweep, defaults = [], []
    ctx = __import__("multiprocessing").get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(args.jobs, mp_context=ctx) as pool:
        # The number of experts changes only the grid, not the compiled kernel: one shape will do.
        futures = [pool.submit(_defaults_job, d, *SWEEP_SHAPE, ("8.0", "9.0", "10.0"))
                   for d in dtypes]
        if not args.no_sweep:
            for kernel in gpu_inspect.KERNELS:
                for dtype in dtypes:
                    by_tiling = {}
                    for tiling, warps in _candidates(kernel, dtype):
                        by_tiling.setdefault(tiling, []).append(warps)
                    futures += [pool.submit(_sweep_job, kernel, dtype, tiling, warps,
                                            ("8.0", "9.0"), 3)
                                for tiling, warps in by_tiling.items()]
        for i, future in enumerate(futures):
            rows = future.result()
            (defaults if i < len(dtypes) else sweep).extend(rows)
            print(f"{i + 1}/{len(futures)}", file=sys.stderr, flush=True)

    rooflines = []
    for dtype in dtypes:
        for experts in EXPERTS:
            for kernel in gpu_inspect.KERNELS:
                tiling = gpu_inspect.default_tiling(kernel, dtype, SWEEP_SHAPE)
                rooflines.append(roofline(kernel, dtype, experts, tiling))
    data = dict(
        meta=dict(date=datetime.date.today().isoformat(), jax=jax.__version__,
                  ptxas=_ptxas_version(), sweep_shape=list(SWEEP_SHAPE), sweep_stages=3,
                  tokens=TOKENS, top_k=TOP_K, d_model=D_MODEL, d_ff=D_FF, experts=list(EXPERTS),
                  gpus=GPUS, portable_smem_bytes=pallas_gpu._SHARED_MEMORY_BYTES),
        default_configs={f"{kernel}/{width}": dict(tiling=list(c.tiling), num_warps=c.num_warps,
                                                   num_stages=c.num_stages)
                         for (kernel, width), c in pallas_gpu.DEFAULT_CONFIGS.items()},
        defaults=defaults, sweep=sweep, roofline=rooflines)
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as fh:
        json.dump(data, fh, indent=1)
    print(gpu_inspect.format_table([gpu_inspect.KernelReport(**{
        k: tuple(v) if isinstance(v, list) else v for k, v in r.items() if k != "smem_fits"})
        for r in defaults]))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
