"""One of the two processes of tests/test_parallel_multiprocess.py: the expert-parallel layer over gloo.

Usage: ``python tests/parallel_worker.py PORT PROCESS_ID OUT.npz``. Each process has 4 CPU devices;
the ``expert=8`` mesh spans both, so the all-to-all crosses the process boundary. Process 0 writes
the loss, the output and the gradients (gathered to the host) to ``OUT.npz``. The test imports
:func:`config`, :func:`batch` and :func:`grad_step` to compute the same step on one device.
"""

import os
import sys

import numpy as np

NUM_PROCESSES, DEVICES_PER_PROCESS = 2, 4


def config():
    import moejax

    return moejax.MoEConfig(d_model=8, d_ff=16, num_experts=8, experts_per_token=2,
                            router="mixtral", expert="glu", activation="silu",
                            gmm_backend="reference")


def batch():
    return np.random.default_rng(0).standard_normal((8, 4, 8)).astype(np.float32)


def grad_step(graphdef, state, x):
    import jax.numpy as jnp
    from flax import nnx

    def loss_fn(model, x):
        y, aux = model(x)
        return jnp.sum(y * jnp.cos(y)) + aux.total_loss, y

    return nnx.value_and_grad(loss_fn, argnums=(0, 1), has_aux=True)(nnx.merge(graphdef, state), x)


def main(port: str, process_id: str, out: str) -> None:
    os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={DEVICES_PER_PROCESS}"
    os.environ["JAX_PLATFORMS"] = "cpu"
    import jax

    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(f"127.0.0.1:{port}", num_processes=NUM_PROCESSES,
                               process_id=int(process_id))
    from flax import nnx
    from jax.experimental import multihost_utils

    import moejax
    from moejax import parallel

    cfg = config()
    mesh = parallel.make_mesh(expert=NUM_PROCESSES * DEVICES_PER_PROCESS)
    model = parallel.create_sharded(lambda: moejax.MoE(cfg, rngs=nnx.Rngs(0)), mesh)
    model.eval()
    graphdef, state = nnx.split(model)
    x = batch()
    rows = sorted({(index[0].start or 0, index[0].stop or x.shape[0]) for index in
                   parallel.batch_sharding(mesh).addressable_devices_indices_map(x.shape).values()})
    local_x = np.concatenate([x[start:stop] for start, stop in rows])
    with parallel.use_mesh(mesh):
        x_global = parallel.shard_batch(local_x, mesh)
        (loss, y), grads = jax.jit(lambda s, x: grad_step(graphdef, s, x))(state, x_global)
    gathered = [np.asarray(multihost_utils.process_allgather(leaf, tiled=True))
                for leaf in [loss, y, *jax.tree.leaves(grads)]]
    if jax.process_index() == 0:
        np.savez(out, *gathered)
    jax.distributed.shutdown()


if __name__ == "__main__":
    main(*sys.argv[1:])
