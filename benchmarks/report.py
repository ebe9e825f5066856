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


TARGETS = {8: 1.15, 64: 1.3}


def _summary_section(summary):
    """The targets' table (``moe_layer.py --summary``): each allocator in its own process."""
    if summary is None:
        return []
    meta = summary["meta"]
    runs = summary["runs"]
    loads = [r[key] for run in runs for r in run["results"]
             for key in ("load_before", "load_after")]
    steal = all("steal" in r for run in runs for r in run["results"])
    tunables = "; ".join(f"{run['allocator']}: `GLIBC_TUNABLES={run['glibc_tunables']}`"
                         for run in runs if run["glibc_tunables"] and not _fewer_cores(run, runs))
    lines = [
        "### The targets: T = 8192, E = 8 and 64 (`python benchmarks/moe_layer.py --summary`)",
        "",
        f"Measured {meta['date']} on {meta['cpus']} cores, jax {meta['jax']}, the same cases and "
        f"method as the tables below, {meta['repeats']} interleaved repeats (medians), 1-minute "
        f"load {min(loads):.1f}-{max(loads):.1f}. Each allocator ran in its own process "
        f"({tunables}; this kernel's transparent huge pages: `{meta['transparent_hugepage']}`). "
        "XLA:CPU takes every call's outputs and temporaries from malloc. By default glibc serves "
        "blocks this large with fresh mappings and unmaps them on free, so each call faults its "
        "memory in again, 4 KiB at a time; with huge pages 2 MiB at a time. With memory kept "
        "(no mmap for large blocks, the heap never trimmed, one arena) later calls reuse memory "
        "already faulted in: no page faults, what is left is the computation. The layer's "
        "outputs include E experts' weight gradients, E / k times the dense FFN's (128 MiB "
        "against 4 MiB at E = 64). "
        + _one_core_words(runs, meta) +
        "× dense: wall-clock ratio to the dense FFN of the same process "
        "(CPU-time ratio in parentheses); faults: minor page faults per call"
        + ("; steal: the hypervisor's share of the 2 CPUs given to other guests during the timed "
           "calls of the dense FFN / the dropless layer (this is a shared VM: wall time under "
           "steal is time the process was not running)" if steal else "") + ".",
        "",
        "| activation | E | allocator | dense FFN s | dropless | balanced einsum (experts alone) "
        "| capacity cf=1.0 | faults: dense / dropless |" + (" steal % |" if steal else "")
        + " target | met |",
        "|---|---|---|---|---|---|---|---|---|---|" + ("---|" if steal else ""),
    ]
    for activation in dict.fromkeys(r["activation"] for run in runs for r in run["results"]):
        for experts in TARGETS:
            for run in runs:
                cell = {r["case"]: r for r in run["results"]
                        if (r["activation"], r["experts"]) == (activation, experts)}
                if "dropless" not in cell:
                    continue

                def ratio(case, cell=cell):
                    r = cell.get(case)
                    return (f"{r['ratio_to_dense_ffn']:.2f} ({r['cpu_ratio_to_dense_ffn']:.2f})"
                            if r else "-")

                d, dense = cell["dropless"], cell["dense_ffn"]
                met = "yes" if d["ratio_to_dense_ffn"] <= TARGETS[experts] else "no"
                target = f"≤ {TARGETS[experts]}"
                if _fewer_cores(run, runs):
                    target, met = "- (the machine's cores)", "-"
                lines.append(
                    f"| {activation} | {experts} | {run['allocator']} | {dense['seconds']:.3f} | "
                    f"{ratio('dropless')} | {ratio('balanced einsum')} | "
                    f"{ratio('capacity cf=1.0')} | {dense['page_faults']:.0f} / "
                    f"{d['page_faults']:.0f} |"
                    + (f" {100 * dense['steal']:.0f} / {100 * d['steal']:.0f} |" if steal else "")
                    + f" {target} | {met} |")
    lines.append("")

    def seconds(run, case):
        return {(r["activation"], r["experts"]): r["seconds"] for r in run["results"]
                if r["case"] == case}

    for run in runs[1:]:
        notes = []
        for case in ("dense_ffn", "dropless"):
            a, b = seconds(runs[0], case), seconds(run, case)
            change = [b[key] / a[key] for key in a if key in b]
            notes.append(f"{case} {min(change):.2f}-{max(change):.2f}×")
        lines.append(f"Time under \"{run['allocator']}\" over time under \"{runs[0]['allocator']}\", "
                     f"per case: {', '.join(notes)}.")
        lines.append("")
    return lines


def _fewer_cores(run, runs):
    """Whether ``run`` was held to fewer cores than the summary's other runs had."""
    return run.get("cores", 0) < max(r.get("cores", 0) for r in runs)


def _ratio_span(run, cases, experts=64):
    """The range of ``run``'s ratios to the dense FFN over ``cases`` at ``experts`` experts."""
    ratios = [r["ratio_to_dense_ffn"] for r in run["results"]
              if r["case"] in cases and r["experts"] == experts]
    return f"{min(ratios):.2f}-{max(ratios):.2f}×" if ratios else "-"


def _one_core_words(runs, meta):
    """What the summary's one-core run is, and the E = 64 ratios on one core and on all cores."""
    one = [run for run in runs if _fewer_cores(run, runs)]
    if not one:
        return ""
    twin = [run for run in runs if run["glibc_tunables"] == one[0]["glibc_tunables"]
            and run is not one[0]]
    words = (f"\"{one[0]['allocator']}\" is the memory-kept run held to {one[0]['cores']} core "
             "(the process's CPU affinity; XLA:CPU sizes its thread pool to it): the work each case "
             "does, apart from how much of it two cores run in parallel. ")
    if twin:
        def speedup(case):
            one_s = {(r["activation"], r["experts"]): r["seconds"] for r in one[0]["results"]
                     if r["case"] == case}
            ratios = [one_s[(r["activation"], r["experts"])] / r["seconds"]
                      for r in twin[0]["results"] if r["case"] == case
                      and (r["activation"], r["experts"]) in one_s]
            return f"{min(ratios):.2f}-{max(ratios):.2f}×"

        words += ("At E = 64, relu and gelu, on one core: dropless "
                  f"{_ratio_span(one[0], ['dropless'])}, balanced einsum "
                  f"{_ratio_span(one[0], ['balanced einsum'])}; on {meta['cpus']} cores with the "
                  f"same allocator: dropless {_ratio_span(twin[0], ['dropless'])}, balanced einsum "
                  f"{_ratio_span(twin[0], ['balanced einsum'])}. Going from one core to "
                  f"{meta['cpus']} (every E and activation) speeds up the dense FFN "
                  f"{speedup('dense_ffn')}, the balanced einsum {speedup('balanced einsum')}, "
                  f"capacity {speedup('capacity cf=1.0')} and the dropless layer "
                  f"{speedup('dropless')}: XLA's dots on one expert's few hundred rows at a time, "
                  "and the per-chunk copies, gathers and scatters between them, spread over two "
                  "cores less well than the dense FFN's one large dot per projection. ")
    return words


def _moe_layer_section(data, order, profile, summary=None, steps=None):
    lines = ["## MoE layer (`benchmarks/moe_layer.py`)", ""]
    if data is None:
        return lines + ["Not run yet: `python benchmarks/moe_layer.py`.", ""]
    meta = data["meta"]
    results = data["results"]
    loads = [r[key] for r in results for key in ("load_before", "load_after")]
    lines += [
        f"Measured {meta['date']} on {meta['cpus']} cores, jax {meta['jax']}, forward+backward "
        "(`jax.value_and_grad` of `sum(y ** 2)` plus the layer's auxiliary losses, with respect to "
        f"the parameters and the input), d_model {meta['d_model']}, d_ff {meta['d_ff']}, k = "
        f"{meta['k']}, top-k router, float32, {meta['repeats']} interleaved repeats (medians), "
        "each timed call right after an untimed call of the same case. `dense_ffn` has d_ff·k "
        "hidden units (the same active FLOPs); `balanced einsum` is the E experts alone on equal "
        "groups (no router, no dispatch). × dense: wall-clock ratio; CPU: the same ratio in "
        "process CPU time. 1-minute load average during the run: "
        f"{min(loads):.1f}-{max(loads):.1f} on {meta['cpus']} cores (the machine is shared); peak "
        "memory is the compiled program's arguments + outputs + temporaries.",
        "",
    ]
    lines += _summary_section(summary) if summary else _summary(results)
    lines += _steps_section(steps)
    for activation in dict.fromkeys(r["activation"] for r in results):
        title = {"relu": "relu", "gelu": "exact gelu (erf)"}.get(activation, activation)
        lines += [
            f"### {title}",
            "",
            "| T | E | case | seconds | × dense | × dense (CPU) | peak MiB | load |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for r in results:
            if r["activation"] == activation:
                lines.append(
                    f"| {r['tokens']} | {r['experts']} | {r['case']} | {r['seconds']:.4f} | "
                    f"{r['ratio_to_dense_ffn']:.2f} | {r['cpu_ratio_to_dense_ffn']:.2f} | "
                    f"{r['peak_mib']:.1f} | {r['load_before']:.1f}-{r['load_after']:.1f} |")
        lines.append("")
    lines += ["![moe layer](results/moe_layer.png)", ""]
    lines += _shapes_section(data)
    lines += _order_section(order)
    lines += _profile_section(profile, summary)
    return lines


STEP_NOTES = {
    "dense_ffn": "one FFN of d_ff·k hidden units on the T tokens (the baseline)",
    "copies ffn": "k copies of each token gathered in routed order, one FFN of d_ff hidden units "
                  "on the T·k copies, gate-weighted combine (the MoE's shapes, one expert, XLA's "
                  "dots)",
    "balanced einsum": "E experts on T·k / E copies each, XLA's batched matmuls, no gather (E "
                       "experts' weights and gradients, equal groups)",
    "experts alone (gmm)": "E experts on the copies of a fixed routing through "
                           "`moejax.ops.dropless` (gather, grouped matmuls on the `cpu` backend, "
                           "combine): the dropless layer without its router",
    "dropless": "the layer: router, sort, the same experts, auxiliary losses",
}


def _steps_section(steps):
    """From the dense FFN to the dropless layer one change at a time (``moe_layer.py --steps``)."""
    if steps is None:
        return []
    meta, results = steps["meta"], steps["results"]
    loads = [r[key] for r in results for key in ("load_before", "load_after")]
    cases = list(dict.fromkeys(r["case"] for r in results))
    configs = list(dict.fromkeys((r["activation"], r["experts"]) for r in results))
    cell = {(r["activation"], r["experts"], r["case"]): r for r in results}
    lines = [
        "### From the dense FFN to the dropless layer, one change at a time "
        "(`python benchmarks/moe_layer.py --steps`)",
        "",
        f"Measured {meta['date']} on {meta['cpus']} cores, jax {meta['jax']}, in one process "
        f"(allocator: glibc "
        + (f"with `GLIBC_TUNABLES={meta['glibc_tunables']}`" if meta["glibc_tunables"]
           else "default") +
        f"), T = {meta['tokens']}, d_model {meta['d_model']}, d_ff {meta['d_ff']}, k = "
        f"{meta['k']}, the method above, {meta['repeats']} interleaved repeats (medians), 1-minute "
        f"load {min(loads):.1f}-{max(loads):.1f}. Each row adds one thing to the row above it, "
        "so the differences between rows split the dropless layer's ratio into its parts "
        "(`balanced einsum` is a side step: the E experts as batched matmuls on equal groups). "
        "× dense: wall-clock ratio to the dense FFN of the same run (CPU-time ratio in "
        "parentheses); faults: minor page faults per call; steal: the hypervisor's share of the "
        "CPUs during the case's timed calls (where it is high, the wall-clock ratio is the "
        "neighbours' load, and the CPU-time ratio is the one to read).",
        "",
        "| case | what it adds | " + " | ".join(f"{a} E={e}" for a, e in configs) + " |",
        "|---|---|" + "---|" * len(configs),
    ]
    for case in cases:
        row = []
        for activation, experts in configs:
            r = cell.get((activation, experts, case))
            row.append(f"{r['ratio_to_dense_ffn']:.2f} ({r['cpu_ratio_to_dense_ffn']:.2f}), "
                       f"{r['page_faults'] / 1000:.0f}k faults, steal {100 * r['steal']:.0f} %"
                       if r else "-")
        lines.append(f"| {case} | {STEP_NOTES.get(case, '')} | " + " | ".join(row) + " |")
    lines.append("")
    for experts, target in TARGETS.items():
        floors = []
        for activation in dict.fromkeys(a for a, e in configs if e == experts):
            r = [cell.get((activation, experts, case)) for case in
                 ("copies ffn", "balanced einsum", "experts alone (gmm)", "dropless")]
            if None in r:
                continue
            floors.append(
                f"{activation}: k copies through one FFN {r[0]['ratio_to_dense_ffn']:.2f}×, the "
                f"experts as batched matmuls on equal groups {r[1]['ratio_to_dense_ffn']:.2f}×, "
                f"through the grouped matmuls {r[2]['ratio_to_dense_ffn']:.2f}×, the layer "
                f"{r[3]['ratio_to_dense_ffn']:.2f}×")
        if floors:
            lines += [f"E = {experts} (target ≤ {target}): " + "; ".join(floors) + ".", ""]
    return lines


def _summary(results):
    """The dropless layer at T = 8192, E = 8 and 64, against its targets and the experts alone."""
    targets = TARGETS
    cell = {(r["activation"], r["tokens"], r["experts"], r["case"]): r for r in results}
    rows = [(a, e) for a in dict.fromkeys(r["activation"] for r in results) for e in targets
            if (a, 8192, e, "dropless") in cell]
    if not rows:
        return []
    lines = [
        "Summary, T = 8192 (wall-clock ratios to the dense FFN of the same run; CPU-time ratios "
        "in parentheses):",
        "",
        "| activation | E | dropless | balanced einsum (experts alone) | target | met |",
        "|---|---|---|---|---|---|",
    ]
    for activation, experts in rows:
        d = cell[activation, 8192, experts, "dropless"]
        b = cell.get((activation, 8192, experts, "balanced einsum"))
        floor = (f"{b['ratio_to_dense_ffn']:.2f} ({b['cpu_ratio_to_dense_ffn']:.2f})"
                 if b else "-")
        met = "yes" if d["ratio_to_dense_ffn"] <= targets[experts] else "no"
        lines.append(f"| {activation} | {experts} | {d['ratio_to_dense_ffn']:.2f} "
                     f"({d['cpu_ratio_to_dense_ffn']:.2f}) | {floor} | ≤ {targets[experts]} | "
                     f"{met} |")
    return lines + [""]


def _order_section(order):
    lines = ["### Why the dense baseline of the first table was slow", ""]
    if order is None:
        return lines + ["Not run yet: `python benchmarks/moe_layer.py --order-effect`.", ""]
    after, own = order["dense_ffn"]["after the one-hot case"], order["dense_ffn"]["after itself"]
    lines += [
        "The first version of this table timed every round in one fixed order (dense FFN first, "
        "one-hot case last), so each dense FFN call followed the one-hot case, which allocates and "
        "frees gigabytes. On this VM every call's temporaries are fresh pages (XLA:CPU allocates "
        "them per call, the allocator returns them), and right after the one-hot case each page "
        "fault costs several times more, as if the freed memory had to be handed back to the guest. "
        "The dense FFN was charged for that. `python benchmarks/moe_layer.py --order-effect` "
        f"({order['date']}, T = {order['tokens']}, {order['activation']}, medians of "
        f"{order['repeats']} alternating pairs, load {order['load_before']:.1f}-"
        f"{order['load_after']:.1f}):",
        "",
        "| dense FFN timed | seconds | CPU s | of which system | page faults |",
        "|---|---|---|---|---|",
    ]
    for name, r in (("right after the one-hot case", after), ("right after itself", own)):
        lines.append(f"| {name} | {r['seconds']:.3f} | {r['cpu_seconds']:.3f} | "
                     f"{r['system_seconds']:.3f} | {r['page_faults']:.0f} |")
    lines += [
        "",
        f"Same page faults, {after['system_seconds'] / own['system_seconds']:.1f}× the system time, "
        f"{after['seconds'] / own['seconds']:.2f}× the wall time. Every case is now timed right "
        "after an untimed call of its own, so none pays for its predecessor.",
        "",
    ]
    return lines


def _memory_floor_section(data):
    if not data:
        return []
    meta = data["meta"]
    lines = [
        "### What E experts' weights cost before any matmul (`benchmarks/memory_floor.py`)",
        "",
        f"Measured {meta['date']} on {meta['cpu_count']} cores, jax {meta['jax']}, medians of "
        f"{meta['repeats']} interleaved repeats, ratios to the dense FFN's forward+backward (T = "
        "8192, d_model 512, hidden 1024, relu) of the same run. The dropless layer pays these on top "
        "of the dense FFN's FLOPs: one pass over the experts' weights in the forward and another for "
        "the input gradients, and its E experts' weight gradients written to fresh memory (XLA:CPU "
        "allocates a call's outputs anew), before its router and dispatch.",
        "",
        "| E | case | seconds | × dense FFN | load |",
        "|---|---|---|---|---|",
    ]
    for r in data["results"]:
        lines.append(f"| {r['experts']} | {r['case']} | {r['seconds']:.4f} | "
                     f"{r['ratio_to_dense_ffn']:.3f} | {r['load_before']:.1f}-{r['load_after']:.1f} |")
    return lines + [""]


def _profile_section(profile, summary=None):
    lines = ["### Where the dropless layer's time goes (`benchmarks/moe_profile.py`)", ""]
    if not profile or not {"before", "after"} <= set(profile):
        return lines + ["Not run yet: `python benchmarks/moe_profile.py --label before|after`.", ""]
    kept = profile.get("memory kept")
    described = {
        "before": "the code of commit c8ce706 with the named scopes added",
        "after": "commit 7df78d4 (permute, the experts' grouped FFN and unpermute, differentiated "
                 "as three ops)",
        "memory kept": (f"the code of `after` with `GLIBC_TUNABLES={kept['glibc_tunables']}` "
                        "(glibc keeps the memory it gets, so no call faults pages in: the "
                        "computation alone)" if kept else ""),
        "fused VJP": "commit 2c966cd: gather, grouped FFN and combine as one custom VJP "
                     "(`moejax.ops.dropless`)",
        "gathered in gmm": "commit a9a9794: the same VJP, with the `cpu` kernels gathering the "
                           "copies' rows chunk by chunk (no `[T·k, D]` sorted copies written)",
        "fused in gmm": "this code: the same VJP, with the `cpu` kernels also computing their "
                        "operands chunk by chunk (the activation, `gate · a`, the hidden "
                        "gradient) and adding the rows of the second forward matmul and of the "
                        "input gradients straight into the `[T, D]` results",
    }
    names = [name for name in described if name in profile]
    runs = [profile[name] for name in names]
    lines += [
        "The function timed above (T = 8192, relu), compiled once and run under `jax.profiler`: "
        "each executed thunk's exclusive time, summed per HLO instruction and mapped to a part of "
        "the layer by its `op_name` (named scopes in `moejax.ops`; `transpose(...)` or the scope "
        "`backward` marks the backward). Op times are wall time per op on the thread that ran it, "
        "so work split over both cores counts once, an op that waits counts its wait, and the op "
        "that first touches a page pays its fault; the untraced CPU-time, page-fault and size "
        "lines are the reliable totals. "
        + "; ".join(f"{name}: {described[name]}" for name in names)
        + f". Measured one after the other ({', '.join(run['date'] for run in runs)}) at "
        "1-minute load "
        + ", ".join(f"{e['load_before']:.1f}-{e['load_after']:.1f}"
                    for run in runs for e in run["entries"])
        + ".",
        "",
    ]
    for entries in zip(*(run["entries"] for run in runs)):
        assert len({e["experts"] for e in entries}) == 1
        parts = list(dict.fromkeys(p for e in entries for p in e["dropless"]["parts"]))
        lines += [
            f"E = {entries[0]['experts']}:",
            "",
            "| | " + " | ".join(names) + " | "
            + " | ".join(f"dense FFN ({name} run)" for name in names) + " |",
            "|---|" + "---|" * (2 * len(names)),
        ]
        rows = (("wall ms (untraced median)", "wall_ms"), ("user CPU ms", "user_ms"),
                ("system CPU ms", "system_ms"), ("minor page faults", "page_faults"),
                ("temporaries MiB", "temp_mib"), ("outputs MiB", "output_mib"))
        blank = " |" * len(names)
        for label, key in rows:
            lines.append(f"| {label} | " + " | ".join(f"{e['dropless'][key]:.0f}" for e in entries)
                         + " | " + " | ".join(f"{e['dense_ffn'][key]:.0f}" for e in entries) + " |")
        cpu = lambda r: r["user_ms"] + r["system_ms"]  # noqa: E731
        ones = " | ".join("1.00" for _ in entries)
        lines.append("| wall × dense FFN (same run) | " + " | ".join(
            f"{e['dropless']['wall_ms'] / e['dense_ffn']['wall_ms']:.2f}" for e in entries)
            + f" | {ones} |")
        lines.append("| CPU × dense FFN (same run) | " + " | ".join(
            f"{cpu(e['dropless']) / cpu(e['dense_ffn']):.2f}" for e in entries) + f" | {ones} |")
        for part in parts:
            lines.append(f"| op ms: {part} | " + " | ".join(
                f"{e['dropless']['parts'].get(part, 0.0):.1f}" for e in entries) + f" |{blank}")
        lines.append("| op ms: total | " + " | ".join(f"{e['dropless']['op_ms']:.0f}"
                                                     for e in entries)
                     + " | " + " | ".join(f"{e['dense_ffn']['op_ms']:.0f}" for e in entries) + " |")
        lines.append("")
    lines += [
        "What changed between `before` and `after` (`moejax/kernels/cpu.py`, "
        "`moejax/ops/dispatch.py`): "
        "every gmm/tgmm output used to start from `jnp.zeros`, which XLA merged across calls into "
        "one buffer and then copied for each loop that updates it in place (the `fills` and "
        "`copies` lines); each call now computes its own zeros from its operands. `unpermute` "
        "gathered the k expert outputs into a `[T, k, D]` buffer and combined them with a batched "
        "dot; it is now one fused multiply-add of k row gathers, and its backward one gather of "
        "the weighted cotangent. `permute`'s backward sums its k gathers in one pass. The sort by "
        "expert is one sort of int32 keys (expert · T·k + copy) instead of a two-operand stable "
        "sort. Temporaries fell by the sizes in the table; since XLA:CPU allocates a call's "
        "temporaries afresh and this VM charges 2-3 µs of system time per 4 KiB page touched, "
        "that is most of the CPU time saved.",
        "",
        "What changed between `after` and `fused VJP` (`moejax/ops/dropless.py`): the gather of "
        "the sorted copies, the experts' grouped FFN and the gate-weighted combine are one custom "
        "VJP instead of three ops differentiated one by one. Its residuals are the hidden "
        "pre-activations only: the sorted copies are gathered again from the input in the "
        "backward pass (on the cpu backend), the activations are recomputed, and the expert "
        "outputs are not kept, since the gate gradients `<dy[t], a[r] · w_out[e]>` equal "
        "`<dy[t] · w_out[e]ᵀ, a[r]>`, a row sum over a product the input gradient computes "
        "anyway. Each backward step waits for the previous one, so fewer `[T·k, d_ff]` buffers "
        "are live at once: the temporaries and page-fault lines.",
        "",
        "What changed between `fused VJP` and `gathered in gmm` (`moejax/kernels/cpu.py`, "
        "`moejax/ops/dropless.py`): on the `cpu` backend the grouped matmuls take the input (and, "
        "in the backward pass, the output cotangent) with the copies' token indices, and each row "
        "chunk gathers its rows where it used to slice them from the sorted copies. XLA:CPU "
        "copies a dynamically sliced matmul operand into a buffer of its own anyway, so the "
        "gather costs what the slice did, and the sorted copies of the input (forward, and again "
        "for the first projection's weight gradient) and of the cotangent are never written: "
        "three `[T·k, d_model]` passes and their pages fewer.",
        "",
        "What changed between `gathered in gmm` and `fused in gmm` (`moejax/kernels/cpu.py`, "
        "`moejax/ops/dropless.py`): the `cpu` kernels take a row-wise prologue for an operand "
        "(with extra arrays sliced alongside it) and apply it to each chunk as they copy it, and "
        "gmm can add each chunk's rows, scaled, into the rows of a smaller result instead of "
        "writing the `[T·k, n]` product. The dropless VJP uses them for the activation (forward), "
        "`gate · a` (the second projection's weight gradient), the hidden gradient "
        "`act'(h) · gate · g` (computed in both kernels that read it), the gate-weighted combine "
        "of the k copies (forward) and the sum of the copies' input gradients (backward). Of the "
        "`[T·k, ·]` buffers only the hidden pre-activations `h` and `g = dy · w_outᵀ` are "
        "written: the temporaries and page-fault lines.",
        "",
        "What is left: see the summary table at the top of this section. The `balanced einsum` "
        "rows are the experts alone, as XLA's batched matmuls on equal groups, with no router and "
        "no dispatch, and `capacity cf=1.0` is the same batched matmuls behind the router and the "
        "slot gathers. E experts' weight gradients (E·d_model·d_ff·2 floats, 128 MiB at E = 64 "
        "against 4 MiB for the dense FFN) are written on every call, to fresh pages unless the "
        "allocator keeps its memory, and the matmuls are smaller. The dropless layer's grouped "
        "matmuls run as loops of row chunks: each chunk is one XLA dot that packs its expert's "
        "weights again and writes a fresh result that a dynamic-update-slice copies into the "
        "output (or a scatter adds to it); for the weight gradients, one `[d_model, d_ff]` block per group plus the zero "
        "fill of the E-expert output."
        + _kept_gap(summary),
        "",
    ]
    return lines


def _kept_gap(summary):
    """The E = 64 ratios without page faults (the summary's "memory kept" run), in words."""
    runs = (summary or {}).get("runs", [])
    kept = [run for run in runs if run["glibc_tunables"]
            and "mmap_max=0" in run["glibc_tunables"] and not _fewer_cores(run, runs)]
    if not kept:
        return ""
    return (" With memory kept (no page faults), at E = 64 the dropless layer is at "
            f"{_ratio_span(kept[0], ['dropless'])} the dense FFN while the batched-matmul cases "
            f"are at {_ratio_span(kept[0], ['balanced einsum', 'capacity cf=1.0'])}: that difference is these per-chunk "
            "and per-group costs, which XLA's batched dot does not pay on equal groups.")


def _shapes_section(data):
    rows = (data or {}).get("matmul_shapes")
    if not rows:
        return []
    meta = data["meta"]
    lines = [
        "### The dense FFN's matmuls against one expert's shape",
        "",
        f"Each matmul of the dense FFN's forward+backward (T = 8192, d_model {meta['d_model']}, "
        f"hidden d_ff·k = {meta['d_ff'] * meta['k']}) beside the same product at one expert's "
        f"shape over T·k rows (hidden {meta['d_ff']}): equal FLOPs, medians of "
        f"{meta['repeats']} interleaved repeats, same run as the table above.",
        "",
        "| product | dense FFN s | expert shape s | ratio |",
        "|---|---|---|---|",
    ]
    for r in rows:
        lines.append(f"| `{r['product']}` | {r['dense_ffn_seconds']:.4f} | "
                     f"{r['expert_shape_seconds']:.4f} | "
                     f"{r['expert_shape_seconds'] / r['dense_ffn_seconds']:.2f} |")
    dense = sum(r["dense_ffn_seconds"] for r in rows)
    expert = sum(r["expert_shape_seconds"] for r in rows)
    lines += [f"| all six | {dense:.4f} | {expert:.4f} | {expert / dense:.2f} |", ""]
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
    lines += _moe_layer_section(_load("moe_layer.json"), _load("moe_layer_order.json"),
                                _load("moe_profile.json"), _load("moe_layer_summary.json"),
                                _load("moe_layer_steps.json"))
    lines += _memory_floor_section(_load("memory_floor.json"))
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
    # Written by hand from tests/test_tpu_compile.py and benchmarks/preflight.py (its table is
    # results/preflight.md): kept as it is.
    tpu = os.path.join(RESULTS, "tpu_compile.md")
    if os.path.exists(tpu):
        with open(tpu) as fh:
            lines += ["", fh.read().rstrip(), ""]
    with open(os.path.join(HERE, "RESULTS.md"), "w") as fh:
        fh.write("\n".join(lines))
    print(f"wrote {os.path.join(HERE, 'RESULTS.md')}")


if __name__ == "__main__":
    main()
