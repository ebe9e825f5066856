"""MoE layer benchmark: dropless vs a dense FFN of equal active FLOPs, vs capacity dispatch, vs one-hot.

For each (T, E): forward+backward time (median of interleaved repeats, one process) and the compiled
peak memory of

  * ``dropless``        moejax.MoE, dispatch="dropless" (sort + gmm on the ``cpu`` backend here),
  * ``capacity cf=c``   moejax.MoE, dispatch="capacity" with capacity factor c,
  * ``onehot cf=1.25``  the GShard-style ``[T, E, C]`` one-hot dispatch/combine einsum (reference),
  * ``dense_ffn``       one FFN with ``d_ff * k`` hidden units: the same active FLOPs as k experts.

d_model 512, d_ff 512, k = 2, top-k router. Ratios are to ``dense_ffn`` measured in the same run.

    python benchmarks/moe_layer.py            # full table (~10 min on 2 cores)
    python benchmarks/moe_layer.py --quick    # small shapes, seconds
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import statistics
import time

import jax
import jax.numpy as jnp
from flax import nnx

import moejax
from moejax import MoEConfig

HERE = os.path.dirname(os.path.abspath(__file__))


def _loss_fn_for_layer(layer):
    graphdef, state = nnx.split(layer)

    def loss(state, x):
        y, aux = nnx.merge(graphdef, state)(x)
        return jnp.sum(y.astype(jnp.float32) ** 2) + aux.total_loss

    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1))), state


def _dense_ffn(d, f, key):
    k1, k2 = jax.random.split(key)
    params = {"w_in": jax.random.normal(k1, (d, f)) * d ** -0.5,
              "w_out": jax.random.normal(k2, (f, d)) * f ** -0.5}

    def loss(params, x):
        y = jax.nn.gelu(x @ params["w_in"], approximate=False) @ params["w_out"]
        return jnp.sum(y ** 2)

    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1))), params


def _onehot_capacity(d, f, num_experts, k, capacity_factor, num_tokens, key):
    """GShard's formulation: dispatch and combine tensors [T, E, C] and two einsums."""
    capacity = max(1, math.ceil(capacity_factor * num_tokens * k / num_experts))
    k1, k2, k3 = jax.random.split(key, 3)
    params = {"w_router": jax.random.normal(k1, (d, num_experts)) * d ** -0.5,
              "w_in": jax.random.normal(k2, (num_experts, d, f)) * d ** -0.5,
              "w_out": jax.random.normal(k3, (num_experts, f, d)) * f ** -0.5}

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
        h = jax.nn.gelu(jnp.einsum("ecd,edf->ecf", x_ExCxD, params["w_in"]), approximate=False)
        y_ExCxD = jnp.einsum("ecf,efd->ecd", h, params["w_out"])
        y = jnp.einsum("tec,ecd->td", combine_TxExC, y_ExCxD)
        return jnp.sum(y ** 2)

    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1))), params


def _peak_bytes(fn, *args):
    analysis = fn.lower(*args).compile().memory_analysis()
    if analysis is None:
        return float("nan")
    return (analysis.temp_size_in_bytes + analysis.argument_size_in_bytes
            + analysis.output_size_in_bytes - analysis.alias_size_in_bytes)


def _cases(num_tokens, num_experts, d, f, k, include_onehot):
    key = jax.random.key(0)
    cases = {"dense_ffn": _dense_ffn(d, f * k, key)}
    base = dict(d_model=d, d_ff=f, num_experts=num_experts, experts_per_token=k, router="top_k",
                load_balancing_weight=0.01, z_loss_weight=0.0, gmm_backend="cpu")
    cases["dropless"] = _loss_fn_for_layer(
        moejax.MoE(MoEConfig(dispatch="dropless", **base), rngs=nnx.Rngs(0)))
    for cf in (1.0, 1.25, 2.0):
        cases[f"capacity cf={cf}"] = _loss_fn_for_layer(moejax.MoE(
            MoEConfig(dispatch="capacity", capacity_factor=cf, **base), rngs=nnx.Rngs(0)))
    if include_onehot:
        cases["onehot cf=1.25"] = _onehot_capacity(d, f, num_experts, k, 1.25, num_tokens, key)
    return cases


def _onehot_fits(num_tokens, num_experts, k):
    capacity = math.ceil(1.25 * num_tokens * k / num_experts)
    return num_tokens * k * num_experts * capacity * 4 < 2e9  # the [T, k, E, C] f32 tensor


def measure(num_tokens, num_experts, d, f, k, repeats):
    x = jax.random.normal(jax.random.key(1), (num_tokens, d), jnp.float32)
    cases = _cases(num_tokens, num_experts, d, f, k, _onehot_fits(num_tokens, num_experts, k))
    rows = {}
    for name, (fn, params) in cases.items():
        jax.block_until_ready(fn(params, x))  # compile + warm up
        rows[name] = {"times": [], "peak_bytes": _peak_bytes(fn, params, x)}
    for _ in range(repeats):
        for name, (fn, params) in cases.items():
            start = time.perf_counter()
            jax.block_until_ready(fn(params, x))
            rows[name]["times"].append(time.perf_counter() - start)
    base = statistics.median(rows["dense_ffn"]["times"])
    out = []
    for name, row in rows.items():
        median = statistics.median(row["times"])
        out.append({"tokens": num_tokens, "experts": num_experts, "case": name,
                    "seconds": median, "ratio_to_dense_ffn": median / base,
                    "peak_mib": row["peak_bytes"] / 2**20})
    return out


def _plot(results, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    token_counts = sorted({r["tokens"] for r in results})
    fig, axes = plt.subplots(1, 2 * len(token_counts), figsize=(6 * len(token_counts) * 2, 4))
    for col, tokens in enumerate(token_counts):
        subset = [r for r in results if r["tokens"] == tokens]
        names = list(dict.fromkeys(r["case"] for r in subset))
        experts = sorted({r["experts"] for r in subset})
        for metric, ax in (("ratio_to_dense_ffn", axes[2 * col]), ("peak_mib", axes[2 * col + 1])):
            for name in names:
                pts = [(r["experts"], r[metric]) for r in subset if r["case"] == name]
                ax.plot(*zip(*pts), marker="o", label=name)
            ax.set_xscale("log", base=2)
            ax.set_xticks(experts, [str(e) for e in experts])
            ax.set_xlabel("experts")
            ax.set_title(f"T={tokens}: {'time / dense FFN' if metric.startswith('ratio') else 'peak MiB'}")
        axes[2 * col].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small shapes (seconds)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", default=os.path.join(HERE, "results"))
    args = parser.parse_args()
    if args.quick:
        shapes, d, f, experts = [256], 64, 64, [4, 16]
    else:
        shapes, d, f, experts = [2048, 8192], 512, 512, [8, 64, 256]
    results = []
    print(f"{'T':>6} {'E':>4} {'case':<16} {'fwd+bwd s':>10} {'x dense':>8} {'peak MiB':>9}")
    for num_tokens in shapes:
        for num_experts in experts:
            for row in measure(num_tokens, num_experts, d, f, 2, args.repeats):
                results.append(row)
                print(f"{row['tokens']:>6} {row['experts']:>4} {row['case']:<16} "
                      f"{row['seconds']:>10.4f} {row['ratio_to_dense_ffn']:>8.2f} "
                      f"{row['peak_mib']:>9.1f}", flush=True)
    os.makedirs(args.out, exist_ok=True)
    stem = "moe_layer_quick" if args.quick else "moe_layer"
    meta = {"date": datetime.date.today().isoformat(), "jax": jax.__version__,
            "machine": platform.machine(), "cpus": os.cpu_count(), "d_model": d, "d_ff": f, "k": 2,
            "repeats": args.repeats}
    with open(os.path.join(args.out, stem + ".json"), "w") as fh:
        json.dump({"meta": meta, "results": results}, fh, indent=1)
    _plot(results, os.path.join(args.out, stem + ".png"))
    print(f"wrote {os.path.join(args.out, stem)}.json and .png")


if __name__ == "__main__":
    main()
