"""Bytes each device sends per training step of one MoE layer, by collective, read from compiled HLO.

Compares, at E = 64 experts on 8 devices, replicated experts (``data=8``), fully sharded experts
(``fsdp=8``) and expert parallelism (``expert=8``, dropless and GShard capacity). Nothing runs: each
step (forward + gradient of every parameter) is lowered with abstract inputs, compiled for 8 fake
CPU devices and its collectives are read with :func:`moejax.parallel.hlo.collectives`. The dropless
expert-parallel step has two branches (fast exchange buffers of ``exchange_factor`` times the
average, and the worst-case buffers taken when a shard would overflow); both are listed. An exchange
that moved only the real rows (``ragged_all_to_all``, not available on XLA:CPU) would send
``tokens_per_device * k * d_model * 4 * (n-1)/n`` bytes, half the fast branch's.

XLA:CPU lowers a reduce-scatter as an all-reduce followed by a slice, so the FSDP row shows its
gradient reduction as an all-reduce (a TPU sends half as much there).

    python benchmarks/parallel.py [--d_model 512] [--d_ff 1024] [--tokens_per_device 1024]
"""

import os

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import argparse  # noqa: E402
from collections import defaultdict  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from flax import nnx  # noqa: E402

import moejax  # noqa: E402
from moejax import parallel  # noqa: E402
from moejax.parallel.hlo import OPS, collectives  # noqa: E402

NUM_EXPERTS, K, SEQUENCE = 64, 2, 1024


def step_hlo(config: moejax.MoEConfig, mesh, batch: int) -> str:
    """Compiled HLO of the gradient of a scalar loss wrt the parameters and the input (as inside a
    model), every input abstract."""
    abstract = nnx.eval_shape(lambda: moejax.MoE(config, rngs=nnx.Rngs(0)))
    graphdef, abstract_state = nnx.split(abstract)
    shardings = parallel.state_shardings(abstract_state, mesh)
    state = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                         abstract_state, shardings)
    x = jax.ShapeDtypeStruct((batch, SEQUENCE, config.d_model), jnp.float32,
                             sharding=parallel.batch_sharding(mesh))

    def step(state, x):
        def loss_fn(state, x):
            model = nnx.merge(graphdef, state)
            model.eval()
            y, aux = model(x)
            return jnp.mean(jnp.square(y)) + aux.total_loss

        return jax.value_and_grad(loss_fn, argnums=(0, 1))(state, x)

    with parallel.use_mesh(mesh):
        return jax.jit(step).lower(state, x).compile().as_text()


def sent_by_op(found, branch_index=None):
    """MB sent per device by op, outside conditionals plus (optionally) one branch of them."""
    total = defaultdict(float)
    for c in found:
        if c.branch and (branch_index is None or not c.branch.endswith(f"/{branch_index}")):
            continue
        total[c.op] += c.sent_bytes / 2**20
    return total


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--d_model", type=int, default=512)
    parser.add_argument("--d_ff", type=int, default=1024)
    parser.add_argument("--tokens_per_device", type=int, default=1024)
    args = parser.parse_args()
    devices = jax.device_count()
    batch = devices * args.tokens_per_device // SEQUENCE
    base = moejax.MoEConfig(d_model=args.d_model, d_ff=args.d_ff, num_experts=NUM_EXPERTS,
                            experts_per_token=K, router="top_k", gmm_backend="reference")
    setups = [
        ("replicated experts, dropless", dict(data=devices), "dropless", None),
        ("FSDP experts, dropless", dict(fsdp=devices), "dropless", None),
        ("expert parallel, dropless (fast branch)", dict(expert=devices), "dropless", 0),
        ("expert parallel, dropless (worst-case branch)", dict(expert=devices), "dropless", 1),
        ("expert parallel, capacity 1.25 (GShard)", dict(expert=devices), "capacity", None),
    ]
    weights_mb = 2 * NUM_EXPERTS * args.d_model * args.d_ff * 4 / 2**20
    print(f"E={NUM_EXPERTS}, k={K}, d_model={args.d_model}, d_ff={args.d_ff}, f32, {devices} "
          f"devices, {args.tokens_per_device} tokens per device; expert weights {weights_mb:.0f} "
          f"MB in all. MB sent per device per training step (forward + backward):\n")
    header = ["setup", "mesh", *OPS, "total"]
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    hlo_cache = {}
    for name, shape, dispatch, branch in setups:
        key = (tuple(shape.items()), dispatch)
        if key not in hlo_cache:
            config = base.replace(dispatch=dispatch, capacity_factor=1.25)
            hlo_cache[key] = collectives(step_hlo(config, parallel.make_mesh(**shape), batch))
        sent = sent_by_op(hlo_cache[key], branch)
        mesh = " x ".join(f"{a}={s}" for a, s in shape.items())
        cells = [f"{sent[op]:.1f}" if sent[op] else "-" for op in OPS]
        print(f"| {name} | {mesh} | " + " | ".join(cells) + f" | {sum(sent.values()):.1f} |")


if __name__ == "__main__":
    main()
