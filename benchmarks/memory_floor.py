"""What E experts' weights cost on this CPU before any matmul: the floor under the MoE layer's ratio.

Beside the dense FFN's forward+backward (T = 8192, d_model 512, hidden d_ff·k = 1024, relu, the
``dense_ffn`` case of ``moe_layer.py``), times two memory-only programs at the E-expert layer's sizes
(d_ff 512 per expert):

  * ``read the expert weights``: one pass over both ``[E, 512, 512]`` f32 weight tensors (the layer
    reads them in the forward and again for the input gradients);
  * ``write E experts' weight gradients``: two fresh ``[E, 512, 512]`` f32 outputs, filled (XLA:CPU
    allocates every call's outputs anew, so this includes faulting the pages in).

Medians of interleaved repeats, each timed call right after an untimed one, in one process; ratios
are to the dense FFN of the same run. The dropless layer pays both on top of the dense FFN's FLOPs,
plus its router and dispatch.

    python benchmarks/memory_floor.py [--experts 8 64] [--repeats 9]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import time

import jax
import jax.numpy as jnp

HERE = os.path.dirname(os.path.abspath(__file__))
T, D, F, K = 8192, 512, 512, 2


def _cases(num_experts):
    key = jax.random.key(0)
    k1, k2, k3, k4, k5 = jax.random.split(key, 5)
    w_in = jax.random.normal(k1, (num_experts, D, F))
    w_out = jax.random.normal(k2, (num_experts, F, D))
    x = jax.random.normal(k3, (T, D))
    dense = {"w_in": jax.random.normal(k4, (D, F * K)) * D ** -0.5,
             "w_out": jax.random.normal(k5, (F * K, D)) * (F * K) ** -0.5}

    def dense_loss(params, x):
        return jnp.sum((jax.nn.relu(x @ params["w_in"]) @ params["w_out"]) ** 2)

    def write(a, b):
        return (jnp.broadcast_to(a[0, 0, 0], a.shape), jnp.broadcast_to(b[0, 0, 0], b.shape))

    return {
        "dense FFN forward+backward": (jax.jit(jax.value_and_grad(dense_loss, argnums=(0, 1))),
                                       (dense, x)),
        "read the expert weights": (jax.jit(lambda a, b: jnp.sum(a) + jnp.sum(b)), (w_in, w_out)),
        "write E experts' weight gradients": (jax.jit(write), (w_in, w_out)),
    }


def measure(num_experts, repeats):
    cases = _cases(num_experts)
    for fn, args in cases.values():
        jax.block_until_ready(fn(*args))
    times = {name: [] for name in cases}
    order = list(cases)
    load_before = os.getloadavg()[0]
    for r in range(repeats):
        for name in order[r % len(order):] + order[:r % len(order)]:
            fn, args = cases[name]
            jax.block_until_ready(fn(*args))
            start = time.perf_counter()
            jax.block_until_ready(fn(*args))
            times[name].append(time.perf_counter() - start)
    dense = statistics.median(times[order[0]])
    return [{"experts": num_experts, "case": name, "seconds": statistics.median(t),
             "ratio_to_dense_ffn": statistics.median(t) / dense,
             "load_before": load_before, "load_after": os.getloadavg()[0]}
            for name, t in times.items()]


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--experts", type=int, nargs="+", default=[8, 64])
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--out", default=os.path.join(HERE, "results"))
    args = parser.parse_args()
    rows = [row for e in args.experts for row in measure(e, args.repeats)]
    print(f"{'E':>4} {'case':36s} {'seconds':>8} {'x dense':>8}  load")
    for row in rows:
        print(f"{row['experts']:>4} {row['case']:36s} {row['seconds']:8.4f} "
              f"{row['ratio_to_dense_ffn']:8.3f}  {row['load_before']:.1f}-{row['load_after']:.1f}")
    meta = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "jax": jax.__version__, "cpu_count": os.cpu_count(), "repeats": args.repeats}
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "memory_floor.json")
    with open(path, "w") as f:
        json.dump({"meta": meta, "results": rows}, f, indent=1)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
