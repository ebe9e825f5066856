"""The Pallas GPU kernels compiled all the way to cubin on this CPU: Triton IR -> PTX (the CUDA
plugin's Triton compiler) -> ``ptxas -v``, for sm_80 and sm_90a.

Interpret-mode tests prove the numbers and the export tests that Triton's lowering accepts the
kernels; only this proves that each kernel of gmm's custom VJP, at its default configuration,
assembles without register spills, fits the architecture's shared memory per block and reaches
the tensor cores (wgmma on Hopper for bf16) — and that f32 stays off them (full f32, no TF32).

The compile work runs in one subprocess with ``JAX_SKIP_CUDA_CONSTRAINTS_CHECK=1`` and
``JAX_PLATFORMS=cpu``: the plugin registers its Triton compiler only when JAX starts its
backends, and those variables must not leak into the other tests' process.
"""

from __future__ import annotations

import fcntl
import json
import os
import subprocess
import sys

import jax.numpy as jnp
import pytest

from moejax.kernels import gpu_inspect, pallas_gpu

ARCHS = ("8.0", "9.0")
DTYPES = ("bfloat16", "float32")
# Forward problems lhs [m, k] x rhs [g, k, n]. "full": every default tile whole (m, k, n multiples
# of the default tiles, which are not shrunk). "partial": no dimension a multiple of a tile, so
# every load and store is masked, and k, n below a default tile so tiles are shrunk to the problem.
SHAPES = {"full": (2048, 512, 512, 8), "partial": (1000, 200, 300, 5)}

PTXAS = gpu_inspect.ptxas_path()


def _compile_reports() -> str:
    env = dict(os.environ, JAX_SKIP_CUDA_CONSTRAINTS_CHECK="1", JAX_PLATFORMS="cpu")
    cmd = [sys.executable, "-m", "moejax.kernels.gpu_inspect", "--json"]
    cmd += [f"--arch={a}" for a in ARCHS] + [f"--dtype={d}" for d in DTYPES]
    cmd += ["--shape=" + ",".join(map(str, s)) for s in SHAPES.values()]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    # Exit status 1 means some kernel spilled or overflowed shared memory: the tests say which.
    assert proc.returncode in (0, 1), proc.stderr[-4000:]
    return proc.stdout


@pytest.fixture(scope="module")
def reports(tmp_path_factory):
    """Every kernel x dtype x shape x arch at its default configuration, from one subprocess.

    Under pytest-xdist each worker would compile everything again; the first one to get here
    compiles, under a lock in the session's shared temporary directory, and the others read its
    output.
    """
    if PTXAS is None:
        pytest.skip("ptxas is not on PATH (nor $PTXAS): cubin resources cannot be checked; "
                    "install the CUDA toolkit or pip install nvidia-cuda-nvcc-cu12")
    shared = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        shared = shared.parent  # this session's directory, common to its workers
    cache = shared / "gpu_compile_reports.jsonl"
    with open(shared / "gpu_compile_reports.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not cache.exists():
            cache.write_text(_compile_reports())
        lines = cache.read_text().splitlines()
    by_key = {}
    for row in (json.loads(line) for line in lines if line.startswith("{")):
        shape = next(name for name, s in SHAPES.items() if tuple(row["shape_mkng"]) == s)
        by_key[row["kernel"], row["dtype"], shape, row["arch"]] = row
    assert len(by_key) == len(gpu_inspect.KERNELS) * len(DTYPES) * len(SHAPES) * len(ARCHS)
    return by_key


CASES = [(kernel, dtype, shape, arch) for kernel in gpu_inspect.KERNELS for dtype in DTYPES
         for shape in SHAPES for arch in ARCHS]


def _id(case):
    return "-".join(case)


@pytest.mark.parametrize("case", CASES, ids=_id)
def test_default_configuration_assembles_without_spills_within_shared_memory(reports, case):
    row = reports[case]
    assert row["target"] == {"8.0": "sm_80", "9.0": "sm_90a"}[row["arch"]]
    assert row["spill_bytes"] == 0, row
    assert row["stack_bytes"] == 0, row
    assert row["registers"] <= 255, row
    limit = {"8.0": 164 * 1024, "9.0": 227 * 1024}[row["arch"]]
    assert row["smem_bytes"] <= limit, row
    # Every default also fits the portable budget the kernels size their pipelines for.
    assert row["smem_bytes"] <= pallas_gpu._SHARED_MEMORY_BYTES, row
    assert "cp.async" in row["async_copies"], row  # global->shared loads are pipelined


@pytest.mark.parametrize("kernel", gpu_inspect.KERNELS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_full_shape_compiles_the_configuration_table(reports, kernel, dtype):
    """At a shape no tile is shrunk for, the kernel launches exactly ``DEFAULT_CONFIGS``' entry:
    the table is what was assembled, not a description of it."""
    row = reports[kernel, dtype, "full", "9.0"]
    entry = pallas_gpu.DEFAULT_CONFIGS["tgmm" if kernel == "tgmm" else "gmm",
                                       jnp.dtype(dtype).itemsize]
    assert (tuple(row["tiling"]), row["num_warps"], row["num_stages"]) == tuple(entry)


@pytest.mark.parametrize("kernel", gpu_inspect.KERNELS)
@pytest.mark.parametrize("shape", SHAPES)
def test_bf16_uses_tensor_cores(reports, kernel, shape):
    assert reports[kernel, "bfloat16", shape, "9.0"]["tensor_core"] == "wgmma"
    assert reports[kernel, "bfloat16", shape, "8.0"]["tensor_core"] == "mma.sync"


@pytest.mark.parametrize("kernel", gpu_inspect.KERNELS)
@pytest.mark.parametrize("arch", ARCHS)
def test_f32_is_full_precision_off_the_tensor_cores(reports, kernel, arch):
    """f32 operands multiply in full f32 (Precision.HIGHEST), not TF32: no mma instruction."""
    for shape in SHAPES:
        assert reports[kernel, "float32", shape, arch]["tensor_core"] == "none"


# --------------------------------------------------------------------------- PTX parsing


_PTX_HOPPER = """
.version 8.8
.target sm_90a
.address_size 64
    cp.async.cg.shared.global [ %r1 + 0 ], [ %rd1 + 0 ], 0x10, %r2;
    wgmma.mma_async.sync.aligned.m64n128k16.f32.bf16.bf16 {%f1}, %rd2, %rd3, p, 1, 1, 0, 1;
"""
_PTX_AMPERE_TMA = """
.target sm_80
    mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%f1}, {%r1}, {%r2}, {%f2};
    cp.async.bulk.tensor.2d.shared::cluster.global.mbarrier::complete_tx::bytes [%r1], [%rd1], [%r4];
"""


def test_ptx_classification():
    assert gpu_inspect.ptx_target(_PTX_HOPPER) == "sm_90a"
    assert gpu_inspect.tensor_core_path(_PTX_HOPPER) == "wgmma"
    assert gpu_inspect.async_copies(_PTX_HOPPER) == ("cp.async",)
    assert gpu_inspect.ptx_target(_PTX_AMPERE_TMA) == "sm_80"
    assert gpu_inspect.tensor_core_path(_PTX_AMPERE_TMA) == "mma.sync"
    assert gpu_inspect.async_copies(_PTX_AMPERE_TMA) == ("tma",)
    assert gpu_inspect.tensor_core_path("fma.rn.f32 %f1, %f2, %f3, %f4;") == "none"


def test_ptxas_report_parsing_sees_spills():
    """The parser reads spills from ptxas' own words: a kernel forced to spill reports them."""
    if PTXAS is None:
        pytest.skip("ptxas is not on PATH (nor $PTXAS)")
    # 64 f32 values live at once (volatile loads keep their order, and the sum starts with the
    # last one loaded) under a 24-register cap.
    body = "\n".join(f"    ld.volatile.global.f32 %f{i}, [%rd1+{4 * i}];" for i in range(65))
    sums = "\n".join(f"    add.f32 %f0, %f0, %f{i};" for i in range(64, 0, -1))
    ptx = f"""
.version 8.0
.target sm_80
.address_size 64
.visible .entry spill(.param .u64 p) .maxnreg 24
{{
    .reg .f32 %f<65>;
    .reg .b64 %rd<2>;
    ld.param.u64 %rd1, [p];
{body}
{sums}
    st.global.f32 [%rd1], %f0;
    ret;
}}
"""
    report = gpu_inspect.assemble(ptx)
    assert report.registers <= 24
    assert report.spill_bytes > 0
