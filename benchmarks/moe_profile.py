"""Where the dropless MoE layer's time goes: per-op time of its compiled forward+backward on CPU.

The function is the one ``benchmarks/moe_layer.py`` times (``jax.value_and_grad`` of
``sum(y ** 2) + aux`` with respect to the parameters and the input, T = 8192, d_model 512, d_ff 512,
k = 2, top-k router, gmm backend ``cpu``). It runs ``--steps`` times under ``jax.profiler``; XLA:CPU
records one event per executed thunk (one per HLO instruction run, loop bodies once per trip).
Each event's exclusive time (its duration minus the events nested in it on the same thread) is
summed per HLO instruction and mapped to a part of the layer through the instruction's ``op_name``
metadata: the named scopes ``sort_copies``, ``permute``, ``unpermute``, ``gmm`` and ``tgmm`` set by
``moejax.ops``, ``transpose(...)`` or the scope ``backward`` (``moejax.ops.dropless``' custom VJP)
for the backward pass, the activation by name. Instructions XLA
adds itself carry no ``op_name``: their time is listed by opcode (``copy``: copy insertion,
``broadcast``: fills). The rest (router, auxiliary and final losses) is one line.

Time on both cores is summed, so the op total can pass the wall time; shares are of the op total.
The dense FFN of equal active FLOPs is profiled the same way for scale.

    python benchmarks/moe_profile.py --label before     # E = 64 and 8, relu
    python benchmarks/moe_profile.py --label after
    python benchmarks/moe_profile.py --label "fused VJP"      # moejax.ops.dropless' custom VJP
    python benchmarks/moe_profile.py --experts 64 --steps 5 --top 30   # print only (no --label)
    GLIBC_TUNABLES=glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=4294967295:glibc.malloc.arena_max=1 \
        python benchmarks/moe_profile.py --label "memory kept"   # no page faults: the computation

Results go to ``benchmarks/results/moe_profile.json`` (one entry per label; ``report.py`` prints
them side by side).
"""

from __future__ import annotations

import argparse
import collections
import datetime
import glob
import json
import os
import re
import resource
import statistics
import tempfile
import time

import jax
import jax.numpy as jnp

import moe_layer

HERE = os.path.dirname(os.path.abspath(__file__))
RESULTS = os.path.join(HERE, "results", "moe_profile.json")

def _in(scope):
    """Whether an op_name lies in the named scope (``.../gmm/...`` or ``jvp(gmm)/...``)."""
    pattern = re.compile(rf"(^|[/(]){scope}([/)]|$)")
    return lambda op: pattern.search(op) is not None


def _backward(op):
    """Autodiff's transposes, or a custom VJP's backward pass (scope ``backward``)."""
    return "transpose(" in op or _in("backward")(op)


# (part, test on (op_name, opcode)); the first match names the part.
PARTS = [
    ("tgmm (weight gradients)", lambda op, _: _in("tgmm")(op)),
    ("gmm backward (input gradients)", lambda op, _: _in("gmm")(op) and _backward(op)),
    ("gmm forward", lambda op, _: _in("gmm")(op)),
    ("sort (argsort, inverse, group sizes)", lambda op, _: _in("sort_copies")(op)),
    ("permute backward (gather + sum over k)",
     lambda op, _: _in("permute")(op) and _backward(op)),
    ("permute (gather)", lambda op, _: _in("permute")(op)),
    ("unpermute + combine backward", lambda op, _: _in("unpermute")(op) and _backward(op)),
    ("unpermute + combine", lambda op, _: _in("unpermute")(op)),
    ("activation", lambda op, _: re.search(r"\b(relu|gelu|erf|erfc|tanh)\b", op) is not None),
    ("copies XLA inserted", lambda op, code: not op and code == "copy"),
    ("fills XLA inserted", lambda op, code: not op and code in ("broadcast", "fusion_broadcast")),
    ("unattributed", lambda op, _: not op),
    ("router, losses, rest", lambda op, _: True),
]
# Events that are not work: the caller waiting for the program, the thread pool's bookkeeping.
_SKIP = ("ThunkExecutor::Execute (wait", "ThreadpoolListener", "end: ")


def _instructions(hlo_text):
    """HLO instruction name -> (op_name, opcode), from the compiled module's text."""
    table = {}
    for line in hlo_text.splitlines():
        m = re.match(r"\s*(?:ROOT )?%?([\w.\-]+) = \S+ ([\w\-]+)\(", line)
        if not m:
            m = re.match(r"\s*(?:ROOT )?%?([\w.\-]+) = \([^=]*\) ([\w\-]+)\(", line)
        if not m:
            continue
        name, opcode = m.groups()
        op = re.search(r'op_name="([^"]*)"', line)
        if opcode == "fusion" and name.startswith("wrapped_broadcast"):
            opcode = "fusion_broadcast"
        table[name] = (op.group(1) if op else "", opcode)
    return table


def _part(op_name, opcode):
    for part, test in PARTS:
        if test(op_name, opcode):
            return part
    raise AssertionError


def _exclusive_times(xplane_path):
    """Instruction (event) name -> summed exclusive nanoseconds over every thread."""
    profile = jax.profiler.ProfileData.from_file(xplane_path)
    totals = collections.Counter()
    for plane in profile.planes:
        for line in plane.lines:
            if line.name == "python":
                continue
            events = sorted((e.start_ns, e.start_ns + e.duration_ns, e.name) for e in line.events
                            if not e.name.startswith(_SKIP))
            stack = []
            for start, end, name in events:
                while stack and stack[-1][1] <= start:
                    stack.pop()
                if stack:
                    totals[stack[-1][2]] -= end - start
                totals[name] += end - start
                stack.append((start, end, name))
    return totals


def profile(fn, params, x, steps):
    """Per-part and per-instruction milliseconds per step; untraced: the median step time, the
    process CPU time (user, system) and the minor page faults per step, the compiled sizes."""
    compiled = fn.lower(params, x).compile()
    table = _instructions(compiled.as_text())
    memory = compiled.memory_analysis()
    for _ in range(3):
        jax.block_until_ready(fn(params, x))
    walls, usage = [], []
    for _ in range(steps):
        before = resource.getrusage(resource.RUSAGE_SELF)
        start = time.perf_counter()
        jax.block_until_ready(fn(params, x))
        walls.append(time.perf_counter() - start)
        after = resource.getrusage(resource.RUSAGE_SELF)
        usage.append((after.ru_utime - before.ru_utime, after.ru_stime - before.ru_stime,
                      after.ru_minflt - before.ru_minflt))
    with tempfile.TemporaryDirectory() as trace_dir:
        jax.profiler.start_trace(trace_dir)
        for _ in range(steps):
            jax.block_until_ready(fn(params, x))
        jax.profiler.stop_trace()
        (path,) = glob.glob(os.path.join(trace_dir, "**", "*.xplane.pb"), recursive=True)
        totals = _exclusive_times(path)
    parts = collections.Counter()
    ops = []
    for name, ns in totals.items():
        op_name, opcode = table.get(name, ("", ""))
        part = ("thunk executor" if name.startswith("ThunkExecutor")
                else _part(op_name, opcode))
        parts[part] += ns / 1e6 / steps
        ops.append({"name": name, "ms": ns / 1e6 / steps, "part": part, "op_name": op_name})
    ops.sort(key=lambda o: -o["ms"])
    return {"wall_ms": 1e3 * statistics.median(walls),
            "user_ms": 1e3 * statistics.median(u for u, _, _ in usage),
            "system_ms": 1e3 * statistics.median(s for _, s, _ in usage),
            "page_faults": statistics.median(f for _, _, f in usage),
            "temp_mib": memory.temp_size_in_bytes / 2**20,
            "output_mib": memory.output_size_in_bytes / 2**20,
            "op_ms": sum(parts.values()), "parts": dict(parts.most_common()), "top_ops": ops[:25]}


def run(num_experts, activation, steps, tokens=8192, d=512, f=512, k=2):
    x = jax.random.normal(jax.random.key(1), (tokens, d), jnp.float32)
    dense_fn, dense_params = moe_layer.dense_ffn_case(d, f * k, activation, jax.random.key(0))
    moe_fn, moe_state = moe_layer.moe_layer_case(
        moe_layer.layer_config(num_experts, d, f, k, activation))
    return {"experts": num_experts, "activation": activation, "tokens": tokens,
            "load_before": os.getloadavg()[0],
            "dense_ffn": profile(dense_fn, dense_params, x, steps),
            "dropless": profile(moe_fn, moe_state, x, steps),
            "load_after": os.getloadavg()[0]}


def _print(entry, top):
    moe, dense = entry["dropless"], entry["dense_ffn"]
    print(f"E={entry['experts']} {entry['activation']} (load {entry['load_before']:.1f}-"
          f"{entry['load_after']:.1f})")
    for name, r in (("dropless", moe), ("dense FFN", dense)):
        print(f"  {name:9s} {r['wall_ms']:5.0f} ms wall, {r['user_ms']:5.0f} ms user + "
              f"{r['system_ms']:4.0f} ms system CPU, {r['page_faults']:6.0f} page faults, "
              f"temp {r['temp_mib']:4.0f} MiB + out {r['output_mib']:4.0f} MiB, "
              f"{r['op_ms']:5.0f} ms of ops")
    for part, ms in moe["parts"].items():
        print(f"  {ms:8.1f} ms  {100 * ms / moe['op_ms']:5.1f} %  {part}")
    for op in moe["top_ops"][:top]:
        print(f"    {op['ms']:7.1f} ms  {op['name']:<34} {op['part']:<32} {op['op_name'][-70:]}")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--experts", type=int, nargs="+", default=[64, 8])
    parser.add_argument("--activation", default="relu", choices=list(moe_layer.ACTIVATIONS))
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--top", type=int, default=12, help="instructions to print per profile")
    parser.add_argument("--label", default=None,
                        help="store under this label in results/moe_profile.json")
    args = parser.parse_args()
    entries = []
    for num_experts in args.experts:
        entry = run(num_experts, args.activation, args.steps)
        _print(entry, args.top)
        entries.append(entry)
    if args.label:
        stored = {}
        if os.path.exists(RESULTS):
            with open(RESULTS) as fh:
                stored = json.load(fh)
        stored[args.label] = {
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "jax": jax.__version__, "cpus": os.cpu_count(), "steps": args.steps,
            "glibc_tunables": os.environ.get("GLIBC_TUNABLES"), "entries": entries}
        with open(RESULTS, "w") as fh:
            json.dump(stored, fh, indent=1)
        print(f"wrote {RESULTS} [{args.label}]")


if __name__ == "__main__":
    main()
