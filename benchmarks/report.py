"""Writes ``benchmarks/RESULTS.md`` from the JSON files in ``benchmarks/results/`` (no number typed by hand).

    python benchmarks/report.py

Run the benchmarks first (``make bench``); sections whose JSON is missing say so.
"""

from __future__ import annotations

import json
import os

HERE = os.path.dirname(os.path.abspath(__file__))
RESULTS = os.path.join(HERE, "results")


def _load(name):
    path = os.path.join(RESULTS, name)
    if not os.path.exists(path):
        return None
    with open(path) as fh:
        return json.load(fh)


def _gmm_section(data):
    lines = ["## Grouped matmul on CPU (`benchmarks/gmm.py`)", ""]
    if data is None:
        return lines + ["Not run yet: `python benchmarks/gmm.py`.", ""]
    machine = data["machine"]
    lines += [
        f"Measured {machine['date']} on {machine['cores']} {machine['cpu']} cores, jax "
        f"{machine['jax']}, {data['repeats']} interleaved repeats (medians), f32, d = "
        f"{data['shapes']['d']}, f = {data['shapes']['f']}. Ratios are to a dense "
        "`lhs @ rhs[0]` of equal FLOPs in the same process; the floor is max(dense, one "
        "streaming pass over `rhs`).",
        "",
        "| rows | E | groups | pass | cpu × dense | ragged_dot × dense | floor × dense |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in data["results"]:
        ragged = ("skipped" if r["ragged_dot_ratio"] is None
                  else f"{r['ragged_dot_ratio']:.1f}")
        lines.append(f"| {r['rows']} | {r['experts']} | {r['group_sizes']} | {r['mode']} | "
                     f"{r['cpu_ratio']:.2f} | {ragged} | {r['floor_ratio']:.2f} |")
    lines += ["", "![gmm](results/gmm_cpu.png)", ""]
    return lines


def _moe_layer_section(data):
    lines = ["## MoE layer (`benchmarks/moe_layer.py`)", ""]
    if data is None:
        return lines + ["Not run yet: `python benchmarks/moe_layer.py`.", ""]
    meta = data["meta"]
    lines += [
        f"Measured {meta['date']} on {meta['cpus']} cores, jax {meta['jax']}, forward+backward, "
        f"d_model {meta['d_model']}, d_ff {meta['d_ff']}, k = {meta['k']}, top-k router, "
        f"{meta['repeats']} interleaved repeats (medians). `dense_ffn` has d_ff·k hidden units "
        "(the same active FLOPs); peak memory is the compiled program's arguments + outputs + "
        "temporaries.",
        "",
        "| T | E | case | seconds | × dense FFN | peak MiB |",
        "|---|---|---|---|---|---|",
    ]
    for r in data["results"]:
        lines.append(f"| {r['tokens']} | {r['experts']} | {r['case']} | {r['seconds']:.4f} | "
                     f"{r['ratio_to_dense_ffn']:.2f} | {r['peak_mib']:.1f} |")
    lines += ["", "![moe layer](results/moe_layer.png)", ""]
    return lines


def _train_section(data):
    lines = ["## Training throughput (`benchmarks/train.py`)", ""]
    if data is None:
        return lines + ["Not run yet: `python benchmarks/train.py`.", ""]
    lines += [
        f"Config `{data['config']}`, {data['steps']} steps per model, jax "
        f"{data['machine']['jax']} on {data['machine']['cpus']} CPU cores (1-minute load "
        f"{data['machine']['load_average_1m']:.1f} at the start). MFU is model FLOPs per second over "
        f"a measured f32 matmul peak of {data['matmul_peak_flops_per_sec'] / 1e9:.0f} GFLOP/s.",
        "",
        "| model | params | active | tokens/s (median step) | tokens/s (best step) | MFU |",
        "|---|---|---|---|---|---|",
    ]
    for name, r in data["results"].items():
        lines.append(f"| {name} | {r['total_params']:,} | {r['active_params']:,} | "
                     f"{r['tokens_per_sec']:,.0f} | {r['tokens_per_sec_best']:,.0f} | "
                     f"{100 * r['mfu_vs_measured_matmul_peak']:.1f} % |")
    return lines + [""]


def _kib(nbytes):
    return f"{nbytes / 1024:.0f}"


def _gpu_compile_section(data):
    lines = ["## Pallas GPU kernels compiled to cubin (`benchmarks/gpu_compile.py`)", ""]
    if data is None:
        return lines + ["Not run yet: `python benchmarks/gpu_compile.py`.", ""]
    meta = data["meta"]
    m, k, n, g = meta["sweep_shape"]
    lines += [
        f"Compiled {meta['date']} on a CPU host, without a GPU: jax {meta['jax']}'s CUDA plugin "
        "compiles each kernel's Triton IR to PTX for the architecture, and `ptxas -v` "
        f"({meta['ptxas']}) assembles it and reports registers and spills "
        "(`moejax.kernels.gpu_inspect`). Shared memory is what Triton asks at launch. Kernels "
        "of gmm's custom VJP: `gmm` (forward), `gmm_dlhs` (gmm with `transpose_rhs`), `tgmm` "
        "(weight gradient); tilings are (tm, tk, tn) of the kernel's own arguments.",
        "",
        f"### Defaults (`pallas_gpu.DEFAULT_CONFIGS`) at m = {m}, k = {k}, n = {n}, E = {g}",
        "",
        "| kernel | dtype | arch | tiling | warps | stages | registers | spill B | smem KiB "
        "| tensor cores | async copies |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in data["defaults"]:
        lines.append(
            f"| {r['kernel']} | {r['dtype']} | {r['target']} | "
            f"{'x'.join(map(str, r['tiling']))} | {r['num_warps']} | {r['num_stages']} | "
            f"{r['registers']} | {r['spill_bytes']} | {_kib(r['smem_bytes'])} | "
            f"{r['tensor_core']} | {', '.join(r['async_copies']) or '-'} |")
    lines += ["", "Why these and not larger tiles: the comment above `DEFAULT_CONFIGS` in "
              "`moejax/kernels/pallas_gpu.py`. `tests/test_gpu_compile.py` checks every default "
              "for sm_80 and sm_90a, with whole and with masked (partial) tiles.", ""]
    notes = sorted({f"{r['target']}: {note}"
                    for r in data["defaults"] for note in r["ptxas_notes"]})
    if notes:
        lines += ["ptxas remarks on the defaults: " + "; ".join(notes), ""]
    if data["sweep"]:
        lines += [
            f"### Sweep at {meta['sweep_stages']} stages (E = {g})",
            "",
            "Shared memory grows with the stages: Triton buffers stages − 1 tiles for mma.sync "
            "and FMA loops and stages tiles for wgmma (hence 64 vs 96 KiB for one bf16 tiling). "
            "Limits per block: sm_80 164 KiB, "
            f"sm_90 227 KiB; the kernels' portable budget is {_kib(meta['portable_smem_bytes'])} "
            "KiB (sm_86/sm_89 allow 99 KiB). `clean` = no spills and within the architecture's "
            "limit.",
            "",
            "<details><summary>Every configuration compiled</summary>",
            "",
            "| kernel | dtype | tiling | warps | sm_80 regs / spill B / smem KiB | "
            "sm_90a regs / spill B / smem KiB | clean on both |",
            "|---|---|---|---|---|---|---|",
        ]
        cells = {}
        for r in data["sweep"]:
            key = (r["kernel"], r["dtype"], tuple(r["tiling"]), r["num_warps"])
            cells.setdefault(key, {})[r["arch"]] = r
        for key, by_arch in cells.items():
            row, clean = [], True
            for arch in ("8.0", "9.0"):
                r = by_arch.get(arch)
                if r is None or "error" in r:
                    row.append("ptxas: " + (r["error"].split(":")[-1].strip() if r else "n/a"))
                    clean = False
                    continue
                row.append(f"{r['registers']} / {r['spill_bytes']} / {_kib(r['smem_bytes'])}")
                clean &= r["spill_bytes"] == 0 and r["smem_fits"]
            lines.append(f"| {key[0]} | {key[1]} | {'x'.join(map(str, key[2]))} | {key[3]} | "
                         f"{row[0]} | {row[1]} | {'yes' if clean else 'no'} |")
        lines += ["", "</details>", ""]
    gpus = meta["gpus"]
    lines += [
        f"### Roofline estimate (not a measurement) at T = {meta['tokens']}, k = {meta['top_k']}, "
        f"d_model {meta['d_model']}, d_ff {meta['d_ff']}",
        "",
        "max(FLOPs / peak, bytes / HBM bandwidth) from published dense peaks: "
        + "; ".join(f"{name} {fig['bf16'] / 1e12:.0f} TFLOP/s bf16, {fig['f32'] / 1e12:.1f} "
                    f"TFLOP/s f32 (no TF32), {fig['hbm'] / 1e12:.2f} TB/s"
                    for name, fig in gpus.items())
        + " (NVIDIA A100, H100 and H200 datasheets). Bytes are compulsory traffic (operands read "
        "once, output written once); FLOPs include the tiles a kernel multiplies and discards "
        "when every group boundary falls inside a tile (worst case). The dense matmul has equal "
        "useful FLOPs and one weight matrix. `benchmarks/gmm_device.py` measures on a GPU.",
        "",
        "| kernel | dtype | E | GFLOP (executed) | MB | FLOP/B (dense) | "
        + " | ".join(f"{name} µs (dense)" for name in gpus) + " |",
        "|---|---|---|---|---|---|" + "---|" * len(gpus),
    ]
    for r in data["roofline"]:
        est = " | ".join(
            f"{e['us']:.0f} {e['bound'][0]} ({e['dense_us']:.0f})" for e in r["estimate"].values())
        lines.append(
            f"| {r['kernel']} | {r['dtype']} | {r['experts']} | {r['flops'] / 1e9:.1f} "
            f"({r['executed_flops'] / 1e9:.1f}) | {r['bytes'] / 1e6:.1f} | "
            f"{r['intensity']:.0f} ({r['dense_intensity']:.0f}) | {est} |")
    lines += ["", "c / m: compute- or memory-bound.", ""]
    return lines


def main():
    lines = [
        "# Benchmark results",
        "",
        "Generated by `python benchmarks/report.py` from `benchmarks/results/*.json`. The machines "
        "are shared and noisy: compare ratios measured side by side in one run, not absolute times.",
        "",
    ]
    lines += _gmm_section(_load("gmm_cpu.json"))
    lines += _moe_layer_section(_load("moe_layer.json"))
    lines += _train_section(_load("train_cpu.json"))
    parallel = os.path.join(RESULTS, "parallel.txt")
    lines += ["## Collective bytes under expert parallelism (`benchmarks/parallel.py`)", ""]
    if os.path.exists(parallel):
        with open(parallel) as fh:
            lines += ["```", fh.read().rstrip(), "```", ""]
    else:
        lines += ["Not run yet: `python benchmarks/parallel.py > benchmarks/results/parallel.txt`.", ""]
    lines += _gpu_compile_section(_load("gpu_compile.json"))
    lines += [
        "## GPU (`benchmarks/gmm_device.py`)",
        "",
        "Not run: no GPU machine was available to this project's sessions so far. The script checks "
        "`pallas_gpu` against `jax.lax.ragged_dot` and reports bf16 TFLOP/s of gmm and tgmm vs dense "
        "`jnp.dot` and `ragged_dot` (E ∈ {8, 64}); `python benchmarks/gmm_device.py --smoke` runs its "
        "logic on CPU in interpret mode.",
        "",
    ]
    with open(os.path.join(HERE, "RESULTS.md"), "w") as fh:
        fh.write("\n".join(lines))
    print(f"wrote {os.path.join(HERE, 'RESULTS.md')}")


if __name__ == "__main__":
    main()
