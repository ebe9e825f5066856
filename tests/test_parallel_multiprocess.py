"""The expert-parallel layer across two processes (gloo collectives) equals the one-process layer."""

import os
import socket
import subprocess
import sys

import jax
import numpy as np
from flax import nnx

import moejax
import parallel_worker
from moejax import parallel

TIMEOUT_S = 120


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_with_an_expert_axis_across_them_match_one_process(tmp_path):
    out = tmp_path / "result.npz"
    port = _free_port()
    worker = os.path.join(os.path.dirname(__file__), "parallel_worker.py")
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, PYTHONPATH=repo + os.pathsep + os.environ.get("PYTHONPATH", ""))
    procs = [subprocess.Popen([sys.executable, worker, str(port), str(i), str(out)], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for i in range(parallel_worker.NUM_PROCESSES)]
    logs = []
    try:
        for proc in procs:
            logs.append(proc.communicate(timeout=TIMEOUT_S)[0])
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    for proc, log in zip(procs, logs):
        assert proc.returncode == 0, log[-3000:]

    cfg = parallel_worker.config()
    one_device = parallel.make_mesh(devices=jax.devices()[:1])
    model = parallel.create_sharded(lambda: moejax.MoE(cfg, rngs=nnx.Rngs(0)), one_device)
    model.eval()
    graphdef, state = nnx.split(model)
    x = jax.device_put(parallel_worker.batch(), jax.devices()[0])
    (loss, y), grads = jax.jit(lambda s, x: parallel_worker.grad_step(graphdef, s, x))(state, x)
    expected = [loss, y, *jax.tree.leaves(grads)]
    with np.load(out) as result:
        got = [result[f"arr_{i}"] for i in range(len(result.files))]
    assert len(got) == len(expected)
    for a, b in zip(got, expected):
        np.testing.assert_allclose(a, np.asarray(b), rtol=1e-4, atol=1e-5)
