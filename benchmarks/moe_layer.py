"""MoE layer benchmark: dropless vs a dense FFN of equal active FLOPs, vs capacity dispatch, vs one-hot.

For each (activation, T, E): forward+backward time and the compiled peak memory of

  * ``dense_ffn``       one FFN with ``d_ff * k`` hidden units: the same active FLOPs as k experts,
  * ``balanced einsum`` the E experts alone on T·k/E copies each (XLA batched einsums, no router,
                        no dispatch): what E experts' weights and gradients cost by themselves,
  * ``dropless``        moejax.MoE, dispatch="dropless" (sort, then ``moejax.ops.dropless``: gather,
                        gmm on the ``cpu`` backend here, combine, as one custom VJP),
  * ``capacity cf=c``   moejax.MoE, dispatch="capacity" with capacity factor c,
  * ``onehot cf=1.25``  the GShard-style ``[T, E, C]`` one-hot dispatch/combine einsum (reference).

d_model 512, d_ff 512, k = 2, top-k router, activation ``relu`` and exact ``gelu`` (erf; its cost
is the same in every case and dilutes the dispatch overhead, relu shows it). Ratios are to
``dense_ffn`` measured in the same run.

Every case is measured the same way: the same ``[T, d_model]`` float32 input array, the loss
``sum(y ** 2)`` (plus the layer's weighted auxiliary losses), ``jax.value_and_grad`` with respect to
the parameters *and* the input, one jitted function per case, compiled and run twice before timing.
Repeats are interleaved (each round visits every case, starting one case later than the round
before) and each timed call comes right after an untimed call of the same case: on this VM a call
that follows a case with a much larger footprint (the one-hot case frees gigabytes) pays for
faulting its memory back in, which is the predecessor's cost, not its own. Medians of wall-clock
time; process CPU time medians too (they move less when other processes share the cores); the
1-minute load average before and after each block.

    python benchmarks/moe_layer.py                       # full table (~20 min on 2 cores)
    python benchmarks/moe_layer.py --quick               # small shapes, seconds
    python benchmarks/moe_layer.py --tokens 8192 --experts 8 64 --cases dense_ffn dropless
    python benchmarks/moe_layer.py --order-effect        # why the old dense baseline was slow
    python benchmarks/moe_layer.py --summary             # the targets, three allocators + one core
    python benchmarks/moe_layer.py --steps               # dense FFN -> dropless, one change a step
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import resource
import statistics
import time

import jax
import jax.numpy as jnp
from flax import nnx

import moejax
from moejax import MoEConfig

HERE = os.path.dirname(os.path.abspath(__file__))
ACTIVATIONS = {"relu": jax.nn.relu, "gelu": lambda h: jax.nn.gelu(h, approximate=False)}
CASES = ("dense_ffn", "balanced einsum", "dropless", "capacity cf=1.0", "capacity cf=1.25",
         "capacity cf=2.0", "onehot cf=1.25")


def _value_and_grad(loss):
    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))


def layer_config(num_experts, d, f, k, activation, **overrides):
    base = dict(d_model=d, d_ff=f, num_experts=num_experts, experts_per_token=k, router="top_k",
                load_balancing_weight=0.01, z_loss_weight=0.0, gmm_backend="cpu",
                activation=activation, dispatch="dropless")
    return MoEConfig(**{**base, **overrides})


def moe_layer_case(config):
    """``(fn, state)``: fn(state, x) = value and gradients of ``sum(y**2) + aux`` wrt state and x."""
    graphdef, state = nnx.split(moejax.MoE(config, rngs=nnx.Rngs(0)))

    def loss(state, x):
        y, aux = nnx.merge(graphdef, state)(x)
        return jnp.sum(y.astype(jnp.float32) ** 2) + aux.total_loss

    return _value_and_grad(loss), state


def dense_ffn_case(d, f, activation, key):
    k1, k2 = jax.random.split(key)
    params = {"w_in": jax.random.normal(k1, (d, f)) * d ** -0.5,
              "w_out": jax.random.normal(k2, (f, d)) * f ** -0.5}
    act = ACTIVATIONS[activation]

    def loss(params, x):
        y = act(x @ params["w_in"]) @ params["w_out"]
        return jnp.sum(y ** 2)

    return _value_and_grad(loss), params


def balanced_einsum_case(num_tokens, d, f, num_experts, k, activation, key):
    """The experts alone on equal groups: ``T·k / E`` copies each, one batched einsum per projection,
    no router and no dispatch: the dense FFN's FLOPs with E experts' weights to read and their
    gradients to write (E / k times the dense FFN's)."""
    if num_tokens * k % num_experts:
        raise ValueError(f"T·k = {num_tokens * k} does not split into {num_experts} equal groups")
    k1, k2 = jax.random.split(key)
    params = {"w_in": jax.random.normal(k1, (num_experts, d, f)) * d ** -0.5,
              "w_out": jax.random.normal(k2, (num_experts, f, d)) * f ** -0.5}
    act = ACTIVATIONS[activation]

    def loss(params, x):
        x_ExCxD = jnp.tile(x, (k, 1)).reshape(num_experts, num_tokens * k // num_experts, d)
        h = act(jnp.einsum("ecd,edf->ecf", x_ExCxD, params["w_in"]))
        return jnp.sum(jnp.einsum("ecf,efd->ecd", h, params["w_out"]) ** 2)

    return _value_and_grad(loss), params


def onehot_case(d, f, num_experts, k, capacity_factor, num_tokens, activation, key):
    """GShard's formulation: dispatch and combine tensors [T, E, C] and two einsums."""
    capacity = max(1, math.ceil(capacity_factor * num_tokens * k / num_experts))
    k1, k2, k3 = jax.random.split(key, 3)
    params = {"w_router": jax.random.normal(k1, (d, num_experts)) * d ** -0.5,
              "w_in": jax.random.normal(k2, (num_experts, d, f)) * d ** -0.5,
              "w_out": jax.random.normal(k3, (num_experts, f, d)) * f ** -0.5}
    act = ACTIVATIONS[activation]

    def loss(params, x):
        probs = jax.nn.softmax(x @ params["w_router"])
        gates, experts = jax.lax.top_k(probs, k)
        onehot_TxKxE = jax.nn.one_hot(experts, num_experts)
        # First-come positions: choice rank major, then token order.
        ranked_KTxE = jnp.swapaxes(onehot_TxKxE, 0, 1).reshape(-1, num_experts)
        position_KTxE = (jnp.cumsum(ranked_KTxE, axis=0) - 1) * ranked_KTxE
        position_TxKxE = jnp.swapaxes(position_KTxE.reshape(k, num_tokens, num_experts), 0, 1)
        keep_TxKxE = onehot_TxKxE * (position_TxKxE < capacity)
        slot_TxKxExC = jax.nn.one_hot(position_TxKxE, capacity) * keep_TxKxE[..., None]
        dispatch_TxExC = slot_TxKxExC.sum(axis=1)
        combine_TxExC = jnp.einsum("tk,tkec->tec", gates, slot_TxKxExC)
        x_ExCxD = jnp.einsum("tec,td->ecd", dispatch_TxExC, x)
        h = act(jnp.einsum("ecd,edf->ecf", x_ExCxD, params["w_in"]))
        y_ExCxD = jnp.einsum("ecf,efd->ecd", h, params["w_out"])
        y = jnp.einsum("tec,ecd->td", combine_TxExC, y_ExCxD)
        return jnp.sum(y ** 2)

    return _value_and_grad(loss), params


def _fixed_routing(num_tokens, num_experts, k, key):
    """A top-k routing drawn once, as an untrained router's: softmax gates of random logits."""
    probs = jax.nn.softmax(jax.random.normal(key, (num_tokens, num_experts)), axis=-1)
    gates_TxK, indices_TxK = jax.lax.top_k(probs, k)
    return indices_TxK.astype(jnp.int32), gates_TxK


def copies_ffn_case(num_tokens, d, f, num_experts, k, activation, key):
    """The MoE's shapes with one FFN: every token's k copies gathered in a routed order (sorted by
    expert, as the dropless layer does), one FFN of ``d_ff`` hidden units on the ``T·k`` copies
    (XLA's dots), the gate-weighted combine. Plain jnp and autodiff: what k copies of each token
    cost with no experts."""
    k1, k2, k3 = jax.random.split(key, 3)
    params = {"w_in": jax.random.normal(k1, (d, f)) * d ** -0.5,
              "w_out": jax.random.normal(k2, (f, d)) * f ** -0.5}
    indices_TxK, gates_TxK = _fixed_routing(num_tokens, num_experts, k, k3)
    order_TK = jnp.argsort(indices_TxK.reshape(-1), stable=True)
    tokens_TK = order_TK // k
    inverse_TxK = jnp.argsort(order_TK).reshape(num_tokens, k)
    act = ACTIVATIONS[activation]

    def loss(params, x):
        y_perm = act(x[tokens_TK] @ params["w_in"]) @ params["w_out"]
        y = sum(gates_TxK[:, j, None] * y_perm[inverse_TxK[:, j]] for j in range(k))
        return jnp.sum(y ** 2)

    return _value_and_grad(loss), params


def experts_gmm_case(num_tokens, d, f, num_experts, k, activation, key):
    """The dropless layer without its router: the same fixed routing as ``copies ffn``, sorted
    once outside the timed function, and ``moejax.ops.dropless.dropless_ffn`` (gather, E experts
    on the ``cpu`` gmm backend, combine) with its gradients for the input and the experts."""
    from moejax.ops import dispatch, dropless
    from moejax.ops.ffn import ExpertFFN

    k1, k2, k3 = jax.random.split(key, 3)
    params = {"w_in": jax.random.normal(k1, (num_experts, d, f)) * d ** -0.5,
              "w_out": jax.random.normal(k2, (num_experts, f, d)) * f ** -0.5}
    indices_TxK, gates_TxK = _fixed_routing(num_tokens, num_experts, k, k3)
    copies = jax.jit(dispatch.sort_copies, static_argnums=1)(indices_TxK, num_experts)

    def loss(params, x):
        experts = ExpertFFN(w_in=params["w_in"], w_out=params["w_out"], activation=activation,
                            gmm_backend="cpu")
        return jnp.sum(dropless.dropless_ffn(x, copies, gates_TxK, experts) ** 2)

    return _value_and_grad(loss), params


def _onehot_fits(num_tokens, num_experts, k):
    capacity = math.ceil(1.25 * num_tokens * k / num_experts)
    return num_tokens * k * num_experts * capacity * 4 < 2e9  # the [T, k, E, C] f32 tensor


def make_cases(names, num_tokens, num_experts, d, f, k, activation):
    key = jax.random.key(0)
    cases = {}
    for name in names:
        if name == "dense_ffn":
            cases[name] = dense_ffn_case(d, f * k, activation, key)
        elif name == "balanced einsum":
            cases[name] = balanced_einsum_case(num_tokens, d, f, num_experts, k, activation, key)
        elif name == "copies ffn":
            cases[name] = copies_ffn_case(num_tokens, d, f, num_experts, k, activation, key)
        elif name == "experts alone (gmm)":
            cases[name] = experts_gmm_case(num_tokens, d, f, num_experts, k, activation, key)
        elif name == "dropless":
            cases[name] = moe_layer_case(layer_config(num_experts, d, f, k, activation))
        elif name.startswith("capacity cf="):
            cf = float(name.split("=")[1])
            cases[name] = moe_layer_case(layer_config(num_experts, d, f, k, activation,
                                                      dispatch="capacity", capacity_factor=cf))
        elif name == "onehot cf=1.25":
            if _onehot_fits(num_tokens, num_experts, k):
                cases[name] = onehot_case(d, f, num_experts, k, 1.25, num_tokens, activation, key)
        else:
            raise ValueError(f"unknown case {name!r}; known: {CASES + STEP_CASES}")
    return cases


def _peak_bytes(fn, *args):
    analysis = fn.lower(*args).compile().memory_analysis()
    if analysis is None:
        return float("nan")
    return (analysis.temp_size_in_bytes + analysis.argument_size_in_bytes
            + analysis.output_size_in_bytes - analysis.alias_size_in_bytes)


def _cpu_jiffies():
    """(steal, total) jiffies of all CPUs from ``/proc/stat``; None where there is none."""
    try:
        with open("/proc/stat") as fh:
            fields = [int(v) for v in fh.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    return (fields[7] if len(fields) > 7 else 0), sum(fields[:8])


def _steal_share(before, after):
    """Share of the CPUs' time the hypervisor gave to other guests between two readings."""
    if before is None or after is None or after[1] <= before[1]:
        return float("nan")
    return (after[0] - before[0]) / (after[1] - before[1])


def _timed(fn, params, x):
    """Wall and CPU seconds, minor page faults and the hypervisor's steal share of one call,
    right after an untimed call."""
    jax.block_until_ready(fn(params, x))  # untimed: the case's own memory state
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    jiffies = _cpu_jiffies()
    wall, cpu = time.perf_counter(), time.process_time()
    jax.block_until_ready(fn(params, x))
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    steal = _steal_share(jiffies, _cpu_jiffies())
    return wall, cpu, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults, steal


def measure(names, num_tokens, num_experts, d, f, k, activation, repeats):
    x = jax.random.normal(jax.random.key(1), (num_tokens, d), jnp.float32)
    cases = make_cases(names, num_tokens, num_experts, d, f, k, activation)
    load_before = os.getloadavg()[0]
    rows = {}
    for name, (fn, params) in cases.items():
        for _ in range(2):
            jax.block_until_ready(fn(params, x))  # compile, then one run
        rows[name] = {"wall": [], "cpu": [], "faults": [], "steal": [],
                      "peak_bytes": _peak_bytes(fn, params, x)}
    order = list(cases)
    for r in range(repeats):
        for name in order[r % len(order):] + order[:r % len(order)]:
            fn, params = cases[name]
            wall, cpu, faults, steal = _timed(fn, params, x)
            rows[name]["wall"].append(wall)
            rows[name]["cpu"].append(cpu)
            rows[name]["faults"].append(faults)
            rows[name]["steal"].append(steal)
    load_after = os.getloadavg()[0]
    base = rows.get("dense_ffn")
    out = []
    for name, row in rows.items():
        wall, cpu = statistics.median(row["wall"]), statistics.median(row["cpu"])
        out.append({
            "activation": activation, "tokens": num_tokens, "experts": num_experts, "case": name,
            "seconds": wall, "cpu_seconds": cpu,
            "ratio_to_dense_ffn": wall / statistics.median(base["wall"]) if base else None,
            "cpu_ratio_to_dense_ffn": cpu / statistics.median(base["cpu"]) if base else None,
            "peak_mib": row["peak_bytes"] / 2**20, "times": row["wall"],
            "page_faults": statistics.median(row["faults"]),
            # The hypervisor's steal share of the CPUs during the timed calls (all of them): on a
            # shared VM, wall time with steal is time this process was not running.
            "steal": statistics.fmean(row["steal"]),
            "load_before": load_before, "load_after": load_after,
        })
    return out


# The summary (the targets) is measured under three allocators, each in its own process:
# glibc's default, glibc with transparent huge pages for its large blocks, and glibc keeping the
# memory it gets. XLA:CPU takes every call's outputs and temporaries from malloc; by default glibc
# serves blocks this large with fresh mmaps and unmaps them on free, so each call faults its memory
# in again, 4 KiB at a time (2-3 µs a page on this VM), or 2 MiB at a time with huge pages. With
# mmap_max=0 (no mmap for large blocks), an unreachable trim_threshold (the heap is never given
# back) and arena_max=1 (every thread allocates from the one heap), the blocks come from memory
# already faulted in by earlier calls: what is left is the computation. The tunables change nothing
# else, for every case alike.
ALLOCATORS = (
    ("glibc default", None),
    ("glibc, huge pages", "glibc.malloc.hugetlb=1"),
    ("glibc, memory kept",
     "glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=4294967295:glibc.malloc.arena_max=1"),
)
# One more run of the summary keeps the memory and is held to one core (the child process's CPU
# affinity, so XLA:CPU sizes its thread pool to one thread): the work each case does, apart from how
# well it spreads over two cores. XLA's dots on one expert's few hundred rows use two cores less well
# than the dense FFN's one large dot, so the ratios on one core and on two differ by that.
ONE_CORE = ("glibc, memory kept, one core", ALLOCATORS[2][1], 1)
SUMMARY_CASES = ("dense_ffn", "balanced einsum", "dropless", "capacity cf=1.0")


# From the dense FFN to the dropless layer one change at a time (``--steps``): k copies of each
# token through one FFN of d_ff hidden units (the MoE's shapes), the E experts on the same copies
# through the grouped matmuls (no router), then the layer (router, sort, auxiliary losses). The
# balanced einsum is the E experts as XLA's batched matmuls on equal groups, for comparison.
STEP_CASES = ("copies ffn", "experts alone (gmm)")
STEPS = ("dense_ffn", "copies ffn", "balanced einsum", "experts alone (gmm)", "dropless")


def steps(repeats, out):
    """The ``STEPS`` cases at T = 8192, E = 8 and 64, relu and gelu, in this process (glibc's
    default allocator unless ``GLIBC_TUNABLES`` says otherwise). Writes ``moe_layer_steps.json``."""
    rows = []
    for activation in ACTIVATIONS:
        for num_experts in (8, 64):
            for row in measure(STEPS, 8192, num_experts, 512, 512, 2, activation, repeats):
                rows.append(row)
                print(f"{activation:>4} E={num_experts:<3} {row['case']:<20} {row['seconds']:.4f} s"
                      f"  x dense {row['ratio_to_dense_ffn']:.2f}  cpu x dense "
                      f"{row['cpu_ratio_to_dense_ffn']:.2f}  faults {row['page_faults']:.0f}"
                      f"  steal {100 * row['steal']:.0f} %", flush=True)
    meta = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "jax": jax.__version__, "machine": platform.machine(), "cpus": os.cpu_count(),
            "glibc_tunables": os.environ.get("GLIBC_TUNABLES", ""), "d_model": 512, "d_ff": 512,
            "k": 2, "tokens": 8192, "repeats": repeats}
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "moe_layer_steps.json"), "w") as fh:
        json.dump({"meta": meta, "results": rows}, fh, indent=1)
    print(f"wrote {os.path.join(out, 'moe_layer_steps.json')}")


def _transparent_hugepages():
    try:
        with open("/sys/kernel/mm/transparent_hugepage/enabled") as fh:
            return fh.read().strip()
    except OSError:
        return "unknown"


def summary(repeats, out):
    """T = 8192, E = 8 and 64, relu and gelu: the dense FFN, the experts alone, dropless and
    capacity 1.0, once per allocator of ``ALLOCATORS`` and once more on one core (``ONE_CORE``), a
    child process each. Writes ``moe_layer_summary.json``."""
    import subprocess
    import sys
    import tempfile

    runs = []
    cpus = sorted(os.sched_getaffinity(0))
    for name, tunables, cores in [(*setup, None) for setup in ALLOCATORS] + [ONE_CORE]:
        env = {key: value for key, value in os.environ.items() if key != "GLIBC_TUNABLES"}
        if tunables:
            env["GLIBC_TUNABLES"] = tunables
        affinity = set(cpus[:cores]) if cores else None
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, "rows.json")
            subprocess.run([sys.executable, os.path.abspath(__file__), "--summary-child", path,
                            "--repeats", str(repeats)], env=env, check=True,
                           preexec_fn=(lambda: os.sched_setaffinity(0, affinity)) if cores else None)
            with open(path) as fh:
                rows = json.load(fh)
        runs.append({"allocator": name, "glibc_tunables": tunables, "results": rows,
                     "cores": cores or len(cpus)})
    meta = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "jax": jax.__version__, "machine": platform.machine(), "cpus": os.cpu_count(),
            "transparent_hugepage": _transparent_hugepages(), "d_model": 512, "d_ff": 512, "k": 2,
            "repeats": repeats}
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "moe_layer_summary.json"), "w") as fh:
        json.dump({"meta": meta, "runs": runs}, fh, indent=1)
    print(f"wrote {os.path.join(out, 'moe_layer_summary.json')}")


def _summary_child(path, repeats):
    print(f"allocator: GLIBC_TUNABLES={os.environ.get('GLIBC_TUNABLES', '')!r}, "
          f"{len(os.sched_getaffinity(0))} cores")
    rows = []
    for activation in ACTIVATIONS:
        for num_experts in (8, 64):
            for row in measure(SUMMARY_CASES, 8192, num_experts, 512, 512, 2, activation,
                               repeats):
                rows.append(row)
                print(f"{activation:>4} E={num_experts:<3} {row['case']:<16} {row['seconds']:.4f} s"
                      f"  x dense {row['ratio_to_dense_ffn']:.2f}  cpu x dense "
                      f"{row['cpu_ratio_to_dense_ffn']:.2f}  faults {row['page_faults']:.0f}"
                      f"  steal {100 * row['steal']:.0f} %",
                      flush=True)
    with open(path, "w") as fh:
        json.dump(rows, fh)


def order_effect(repeats, num_tokens=8192, num_experts=64, d=512, f=512, k=2, activation="gelu"):
    """The dense FFN timed right after the one-hot case (the committed table's old order: every
    round ran the cases in a fixed order, the dense FFN first, the one-hot case last) and right
    after a call of its own, in alternating pairs. Wall and CPU time, and the minor page faults."""
    x = jax.random.normal(jax.random.key(1), (num_tokens, d), jnp.float32)
    cases = make_cases(["dense_ffn", "onehot cf=1.25"], num_tokens, num_experts, d, f, k,
                       activation)
    (dense, dense_params), (onehot, onehot_params) = cases["dense_ffn"], cases["onehot cf=1.25"]
    for _ in range(2):
        jax.block_until_ready(dense(dense_params, x))
        jax.block_until_ready(onehot(onehot_params, x))
    load_before = os.getloadavg()[0]
    rows = {"after the one-hot case": [], "after itself": []}
    for _ in range(repeats):
        for name, (first, first_params) in (("after the one-hot case", (onehot, onehot_params)),
                                            ("after itself", (dense, dense_params))):
            jax.block_until_ready(first(first_params, x))
            usage = resource.getrusage(resource.RUSAGE_SELF)
            wall = time.perf_counter()
            jax.block_until_ready(dense(dense_params, x))
            wall = time.perf_counter() - wall
            after = resource.getrusage(resource.RUSAGE_SELF)
            rows[name].append({"seconds": wall,
                               "cpu_seconds": (after.ru_utime - usage.ru_utime
                                               + after.ru_stime - usage.ru_stime),
                               "system_seconds": after.ru_stime - usage.ru_stime,
                               "page_faults": after.ru_minflt - usage.ru_minflt})
    summary = {name: {key: statistics.median(r[key] for r in runs) for key in runs[0]}
               for name, runs in rows.items()}
    return {"tokens": num_tokens, "experts": num_experts, "activation": activation,
            "repeats": repeats, "load_before": load_before, "load_after": os.getloadavg()[0],
            "dense_ffn": summary, "runs": rows}


def matmul_shapes(repeats, num_tokens=8192, d=512, f=512, k=2):
    """Wall time of each matmul of the dense FFN's forward+backward beside the same product at one
    expert's shape over T·k rows (equal FLOPs): how much of the gap to the dense FFN the shapes
    alone make (XLA:CPU's matmul speed depends on them)."""
    key = jax.random.key(2)
    x, x_k = jnp.ones((num_tokens, d)), jnp.ones((num_tokens * k, d))
    h, h_k = jnp.ones((num_tokens, f * k)), jnp.ones((num_tokens * k, f))
    w_in, w_out = jax.random.normal(key, (d, f * k)), jax.random.normal(key, (f * k, d))
    w_in_k, w_out_k = jax.random.normal(key, (d, f)), jax.random.normal(key, (f, d))
    products = {
        "x @ w_in": ((lambda a, b: a @ b), (x, w_in), (x_k, w_in_k)),
        "h @ w_out": ((lambda a, b: a @ b), (h, w_out), (h_k, w_out_k)),
        "dy @ w_out.T": ((lambda a, b: a @ b.T), (x, w_out), (x_k, w_out_k)),
        "dh @ w_in.T": ((lambda a, b: a @ b.T), (h, w_in), (h_k, w_in_k)),
        "h.T @ dy": ((lambda a, b: a.T @ b), (h, x), (h_k, x_k)),
        "x.T @ dh": ((lambda a, b: a.T @ b), (x, h), (x_k, h_k)),
    }
    fns = {(name, which): (jax.jit(fn), args)
           for name, (fn, ffn_args, expert_args) in products.items()
           for which, args in (("dense FFN", ffn_args), ("expert shape", expert_args))}
    times = {key: [] for key in fns}
    for fn, args in fns.values():
        jax.block_until_ready(fn(*args))
    for _ in range(repeats):
        for key, (fn, args) in fns.items():
            jax.block_until_ready(fn(*args))
            start = time.perf_counter()
            jax.block_until_ready(fn(*args))
            times[key].append(time.perf_counter() - start)
    return [{"product": name, "dense_ffn_seconds": statistics.median(times[name, "dense FFN"]),
             "expert_shape_seconds": statistics.median(times[name, "expert shape"])}
            for name in products]


def _plot(results, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = sorted({(r["activation"], r["tokens"]) for r in results})
    fig, axes = plt.subplots(2, len(panels), figsize=(5 * len(panels), 7), squeeze=False)
    for col, (activation, tokens) in enumerate(panels):
        subset = [r for r in results if (r["activation"], r["tokens"]) == (activation, tokens)]
        names = list(dict.fromkeys(r["case"] for r in subset))
        experts = sorted({r["experts"] for r in subset})
        for metric, ax in (("ratio_to_dense_ffn", axes[0, col]), ("peak_mib", axes[1, col])):
            for name in names:
                pts = [(r["experts"], r[metric]) for r in subset if r["case"] == name]
                ax.plot(*zip(*pts), marker="o", label=name)
            ax.set_xscale("log", base=2)
            ax.set_xticks(experts, [str(e) for e in experts])
            ax.set_xlabel("experts")
            what = "time / dense FFN" if metric.startswith("ratio") else "peak MiB"
            ax.set_title(f"{activation}, T={tokens}: {what}")
        axes[0, col].axhline(1.0, color="grey", lw=0.5)
        axes[0, col].set_yscale("log", base=2)
        axes[0, col].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small shapes (seconds)")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--tokens", type=int, nargs="+", default=None)
    parser.add_argument("--experts", type=int, nargs="+", default=None)
    parser.add_argument("--activations", nargs="+", default=list(ACTIVATIONS),
                        choices=list(ACTIVATIONS))
    parser.add_argument("--cases", nargs="+", default=list(CASES),
                        choices=list(CASES) + list(STEP_CASES))
    parser.add_argument("--order-effect", action="store_true",
                        help="only time the dense FFN right after the one-hot case and right "
                             "after itself (results/moe_layer_order.json)")
    parser.add_argument("--out", default=os.path.join(HERE, "results"),
                        help="folder for the JSON and the plot (with --tokens/--experts/--cases, "
                             "only printed unless given)")
    parser.add_argument("--summary", action="store_true",
                        help="only the targets' table (T = 8192, E = 8 and 64) under both "
                             "allocators (results/moe_layer_summary.json)")
    parser.add_argument("--summary-child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--steps", action="store_true",
                        help="only the steps from the dense FFN to the dropless layer (T = 8192, "
                             "E = 8 and 64; results/moe_layer_steps.json)")
    args = parser.parse_args()
    if args.steps:
        steps(args.repeats, args.out)
        return
    if args.summary_child:
        _summary_child(args.summary_child, args.repeats)
        return
    if args.summary:
        summary(args.repeats, args.out)
        return
    if args.order_effect:
        result = order_effect(args.repeats)
        result["date"] = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
        for name, r in result["dense_ffn"].items():
            print(f"dense FFN {name:24s} {r['seconds']:.3f} s wall, {r['cpu_seconds']:.3f} s CPU "
                  f"({r['system_seconds']:.3f} s system), {r['page_faults']:.0f} page faults")
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "moe_layer_order.json"), "w") as fh:
            json.dump(result, fh, indent=1)
        return
    if args.quick:
        shapes, d, f, experts = [256], 64, 64, [4, 16]
    else:
        shapes, d, f, experts = [2048, 8192], 512, 512, [8, 64, 256]
    partial = args.tokens or args.experts or args.cases != list(CASES)
    shapes, experts = args.tokens or shapes, args.experts or experts
    results = []
    print(f"{'act':>4} {'T':>6} {'E':>4} {'case':<16} {'fwd+bwd s':>10} {'x dense':>8} "
          f"{'cpu x dense':>11} {'peak MiB':>9} {'load':>9}")
    for activation in args.activations:
        for num_tokens in shapes:
            for num_experts in experts:
                for row in measure(args.cases, num_tokens, num_experts, d, f, 2, activation,
                                   args.repeats):
                    results.append(row)
                    ratio = row["ratio_to_dense_ffn"] or float("nan")
                    cpu_ratio = row["cpu_ratio_to_dense_ffn"] or float("nan")
                    print(f"{activation:>4} {row['tokens']:>6} {row['experts']:>4} "
                          f"{row['case']:<16} {row['seconds']:>10.4f} {ratio:>8.2f} "
                          f"{cpu_ratio:>11.2f} {row['peak_mib']:>9.1f} "
                          f"{row['load_before']:>4.1f}-{row['load_after']:<4.1f}", flush=True)
    if partial and args.out == os.path.join(HERE, "results"):
        return
    os.makedirs(args.out, exist_ok=True)
    stem = "moe_layer_quick" if args.quick else "moe_layer"
    meta = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "jax": jax.__version__, "machine": platform.machine(), "cpus": os.cpu_count(),
            "d_model": d, "d_ff": f, "k": 2, "repeats": args.repeats}
    shapes_table = matmul_shapes(args.repeats, max(shapes), d, f, 2)
    for row in shapes_table:
        print(f"{row['product']:<14} dense FFN {row['dense_ffn_seconds']:.4f} s, expert shape "
              f"{row['expert_shape_seconds']:.4f} s")
    with open(os.path.join(args.out, stem + ".json"), "w") as fh:
        json.dump({"meta": meta, "results": results, "matmul_shapes": shapes_table}, fh, indent=1)
    _plot(results, os.path.join(args.out, stem + ".png"))
    print(f"wrote {os.path.join(args.out, stem)}.json and .png")


if __name__ == "__main__":
    main()
