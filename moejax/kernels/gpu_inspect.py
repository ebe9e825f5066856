"""Compiles the Pallas GPU (Triton) gmm/tgmm kernels to PTX and cubin without a GPU, and reports
what a GPU would run: registers, spills, shared memory, tensor-core path and copy pipelining.

    python -m moejax.kernels.gpu_inspect --arch=9.0 [--dtype=bfloat16] [--m=1000 --k=512 --n=384]

Why: no GPU is lent to this project, so interpret mode and ``jax.export`` were all that checked
``moejax.kernels.pallas_gpu``. They prove the numbers and that Triton's lowering accepts the
kernel, not that it fits in shared memory, keeps its accumulator in registers or reaches the
tensor cores; nothing would notice a change that broke any of those. The CUDA PJRT plugin ships
Triton's compiler (``jax._src.lib.triton.compile``: Triton IR -> PTX, for any architecture),
and ``ptxas`` assembles the PTX and prints its resource use, so all of it can be checked on a CPU.

Steps per kernel:

1. ``jax.export`` the kernel for ``cuda`` (``interpret=False``) and take the Triton IR (MLIR
   bytecode) and the kernel's own ``num_warps`` / ``num_stages`` from the backend config of its
   ``__gpu$xla.gpu.triton`` custom call. The IR does not depend on the target architecture for
   our dtypes (Pallas uses the compute capability only for fp8 casts), so one export serves all.
2. ``triton.compile("CUDA", ir, arch, num_warps, 1, num_stages)`` runs Triton's GPU passes
   (layouts, software pipelining, wgmma/tcgen05 selection) and returns the PTX and the dynamic
   shared memory the launch needs.
3. Where ``ptxas`` is on ``PATH`` (or ``$PTXAS``), ``ptxas -arch=<PTX .target> -v`` reports
   registers per thread, spill stores/loads and stack frame.

The kernels are the three the custom VJP of ``moejax.ops.gmm`` runs for ``out = gmm(lhs, rhs)``
with ``lhs [m, k]``, ``rhs [g, k, n]``:

* ``gmm``: the forward, ``[m, k] x [g, k, n] -> [m, n]``;
* ``gmm_dlhs``: ``gmm(dout [m, n], rhs, transpose_rhs=True) -> [m, k]``;
* ``tgmm``: ``drhs = tgmm(lhs [m, k], dout [m, n]) -> [g, k, n]``.

Requirements: ``jax-cuda12-plugin`` and ``jax-cuda12-pjrt`` (installed ``--no-deps``; no NVIDIA
libraries are needed) and, for the register report, ``ptxas``. The plugin registers its Triton
compiler when JAX initialises its backends; on a machine without a GPU that needs
``JAX_SKIP_CUDA_CONSTRAINTS_CHECK=1``, and ``JAX_PLATFORMS=cpu`` keeps the plugin from printing
a "Unable to load CUDA" traceback. Both must be in the environment before the first
``jax.devices()``: the CLI sets them; library callers (the tests) run this in a subprocess.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from typing import Iterable, Sequence

KERNELS = ("gmm", "gmm_dlhs", "tgmm")

# Per-block shared memory limit (opt-in maximum) by compute capability, from the CUDA C
# Programming Guide's "Technical Specifications per Compute Capability": 163 KiB usable of the
# A100's 164 KiB, 227 KiB on H100/H200 and B200. The limit checked here is the one the issue
# states (sm_80 164 KiB, sm_90 227 KiB); Triton's own launch check uses the device's value.
SMEM_LIMIT_BYTES = {"8.0": 164 * 1024, "9.0": 227 * 1024, "10.0": 227 * 1024}
ARCHS = tuple(SMEM_LIMIT_BYTES)

_TRITON_CALL = "__gpu$xla.gpu.triton"


@dataclasses.dataclass(frozen=True)
class KernelReport:
    """What one kernel compiles to on one architecture.

    ``registers``, ``spill_bytes`` and ``stack_bytes`` are None when ``ptxas`` is missing.
    ``tensor_core`` is the matrix instruction family in the PTX: ``"tcgen05"`` (Blackwell),
    ``"wgmma"`` (Hopper warpgroup MMA), ``"mma.sync"`` (Ampere warp MMA) or ``"none"`` (FMA on
    CUDA cores). ``async_copies`` lists how global->shared loads are pipelined: ``"cp.async"``
    (Ampere asynchronous copies), ``"cp.async.bulk"`` (Hopper bulk copies) and ``"tma"``
    (tensor-map copies, ``cp.async.bulk.tensor``). ``ptxas_notes`` keeps ptxas' performance
    remarks (for example wgmma serialisation).
    """

    kernel: str
    dtype: str
    arch: str
    shape_mkng: tuple[int, int, int, int]
    tiling: tuple[int, int, int]
    num_warps: int
    num_stages: int
    target: str
    ptx_bytes: int
    smem_bytes: int
    smem_limit_bytes: int
    tensor_core: str
    async_copies: tuple[str, ...]
    registers: int | None = None
    spill_bytes: int | None = None
    stack_bytes: int | None = None
    ptxas_notes: tuple[str, ...] = ()

    @property
    def smem_fits(self) -> bool:
        return self.smem_bytes <= self.smem_limit_bytes

    @property
    def clean(self) -> bool:
        """Assembled without spills and fits the architecture's shared memory per block."""
        return self.smem_fits and self.spill_bytes == 0

    def row(self) -> dict:
        d = dataclasses.asdict(self)
        d["smem_fits"] = self.smem_fits
        return d


# --------------------------------------------------------------------------- environment


def prepare_environment() -> None:
    """Sets the variables the CUDA plugin needs to register its Triton compiler on a CPU host.

    Only effective before JAX initialises its backends (the first ``jax.devices()``).
    """
    os.environ.setdefault("JAX_SKIP_CUDA_CONSTRAINTS_CHECK", "1")
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    if "jax" in sys.modules:  # jax read JAX_PLATFORMS when it was imported
        import jax

        if not jax.config.jax_platforms:
            jax.config.update("jax_platforms", os.environ["JAX_PLATFORMS"])


def missing_compiler() -> str | None:
    """Why Triton IR cannot be compiled to PTX here, or None when it can."""
    import jax
    from jax._src.lib import triton

    try:
        import jax_plugins.xla_cuda12  # noqa: F401
    except ImportError:
        return ("the CUDA plugin is not installed: pip install --no-deps "
                "jax-cuda12-plugin==<jax version> jax-cuda12-pjrt==<jax version>")
    jax.devices()  # Backend initialisation registers the plugin's Triton compilation handler.
    if not triton.has_compilation_handler("CUDA"):
        return ("the CUDA plugin registered no Triton compiler: set "
                "JAX_SKIP_CUDA_CONSTRAINTS_CHECK=1 (and JAX_PLATFORMS=cpu) before JAX starts")
    return None


def ptxas_path() -> str | None:
    return os.environ.get("PTXAS") or shutil.which("ptxas")


# --------------------------------------------------------------------------- export


@dataclasses.dataclass(frozen=True)
class TritonCall:
    """One ``__gpu$xla.gpu.triton`` custom call: the kernel as XLA would hand it to Triton."""

    name: str
    ir_bytecode: bytes
    num_warps: int
    num_stages: int


def triton_calls(fn, *args) -> list[TritonCall]:
    """Exports ``fn(*args)`` for CUDA and returns its Triton kernels in program order."""
    # Private modules: jax has no public way to read a custom call's backend config.
    import jax
    from jax._src.interpreters import mlir as jax_mlir
    from jax._src.lib.mlir import ir

    exported = jax.export.export(
        jax.jit(fn), platforms=["cuda"],
        disabled_checks=[jax.export.DisabledSafetyCheck.custom_call(_TRITON_CALL)],
    )(*args)
    calls = []
    with jax_mlir.make_ir_context():
        def collect(op):
            if (op.name == "stablehlo.custom_call"
                    and ir.StringAttr(op.attributes["call_target_name"]).value == _TRITON_CALL):
                config = ir.DictAttr(op.attributes["mhlo.backend_config"])
                calls.append(TritonCall(
                    name=ir.StringAttr(config["name"]).value,
                    ir_bytecode=ir.StringAttr(config["ir"]).value_bytes,
                    num_warps=ir.IntegerAttr(config["num_warps"]).value,
                    num_stages=ir.IntegerAttr(config["num_stages"]).value,
                ))
            return ir.WalkResult.ADVANCE

        ir.Module.parse(exported.mlir_module()).operation.walk(collect)
    return calls


def kernel_fn(kernel: str, dtype, shape_mkng: Sequence[int], tiling=None):
    """``(fn, args)`` running one kernel of gmm's custom VJP at the forward problem's shape."""
    import jax
    import jax.numpy as jnp

    from moejax.kernels import pallas_gpu

    m, k, n, g = shape_mkng
    dtype = jnp.dtype(dtype)
    sizes = jax.ShapeDtypeStruct((g,), jnp.int32)
    offset = jnp.int32(0)
    if kernel == "gmm":
        def fn(lhs_MxK, rhs_GxKxN, group_sizes):
            return pallas_gpu.gmm(lhs_MxK, rhs_GxKxN, group_sizes, offset, transpose_rhs=False,
                                  preferred_element_type=dtype, tiling=tiling, interpret=False)
        args = ((m, k), (g, k, n))
    elif kernel == "gmm_dlhs":
        def fn(dout_MxN, rhs_GxKxN, group_sizes):
            return pallas_gpu.gmm(dout_MxN, rhs_GxKxN, group_sizes, offset, transpose_rhs=True,
                                  preferred_element_type=dtype, tiling=tiling, interpret=False)
        args = ((m, n), (g, k, n))
    elif kernel == "tgmm":
        def fn(lhs_MxK, dout_MxN, group_sizes):
            return pallas_gpu.tgmm(lhs_MxK, dout_MxN, group_sizes, offset, num_groups=g,
                                   preferred_element_type=dtype, tiling=tiling, interpret=False)
        args = ((m, k), (m, n))
    else:
        raise ValueError(f"kernel must be one of {KERNELS}, got {kernel!r}")
    return fn, tuple(jax.ShapeDtypeStruct(s, dtype) for s in args) + (sizes,)


# --------------------------------------------------------------------------- PTX and cubin


def compile_ptx(call: TritonCall, arch: str, *, num_warps: int | None = None,
                num_stages: int | None = None) -> tuple[str, int]:
    """Triton IR -> ``(ptx, dynamic shared memory bytes)`` for compute capability ``arch``."""
    from jax._src.lib import triton

    result = triton.compile(
        "CUDA", call.ir_bytecode, arch,
        num_warps=call.num_warps if num_warps is None else num_warps, num_ctas=1,
        num_stages=call.num_stages if num_stages is None else num_stages)
    ptx = result.asm.decode() if isinstance(result.asm, bytes) else result.asm
    return ptx, int(result.smem_bytes)


def ptx_target(ptx: str) -> str:
    """The PTX ``.target`` (``sm_80``, ``sm_90a``, ``sm_100a``): what ptxas must assemble for."""
    match = re.search(r"^\s*\.target\s+(\w+)", ptx, re.M)
    if not match:
        raise ValueError("PTX has no .target directive")
    return match.group(1)


def tensor_core_path(ptx: str) -> str:
    if re.search(r"\btcgen05\.mma", ptx):
        return "tcgen05"
    if re.search(r"\bwgmma\.mma_async", ptx):
        return "wgmma"
    if re.search(r"\bmma\.sync", ptx):
        return "mma.sync"
    return "none"


def async_copies(ptx: str) -> tuple[str, ...]:
    found = []
    if re.search(r"\bcp\.async\.(ca|cg)\.shared", ptx):
        found.append("cp.async")
    if re.search(r"\bcp\.async\.bulk\.(?!tensor)", ptx):
        found.append("cp.async.bulk")
    if re.search(r"\bcp\.async\.bulk\.tensor", ptx):
        found.append("tma")
    return tuple(found)


@dataclasses.dataclass(frozen=True)
class PtxasReport:
    registers: int
    spill_bytes: int
    stack_bytes: int
    notes: tuple[str, ...]


def assemble(ptx: str, ptxas: str | None = None) -> PtxasReport:
    """Runs ``ptxas -v`` on the PTX (for its own ``.target``) and parses the resource report."""
    ptxas = ptxas or ptxas_path()
    if ptxas is None:
        raise FileNotFoundError("ptxas not found on PATH (set $PTXAS)")
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "kernel.ptx")
        with open(src, "w") as fh:
            fh.write(ptx)
        proc = subprocess.run(
            [ptxas, f"-arch={ptx_target(ptx)}", "-v", src, "-o", os.path.join(tmp, "k.cubin")],
            capture_output=True, text=True)
    log = proc.stdout + proc.stderr
    if proc.returncode:
        raise RuntimeError(f"ptxas failed ({proc.returncode}):\n{log}")
    spills = re.search(
        r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", log)
    registers = re.search(r"Used (\d+) registers", log)
    if not (spills and registers):
        raise RuntimeError(f"could not parse ptxas -v output:\n{log}")
    notes = tuple(sorted({re.sub(r".*Potential Performance Loss: ", "", line).strip()
                          for line in log.splitlines() if "Performance Loss" in line}))
    return PtxasReport(registers=int(registers.group(1)),
                       spill_bytes=int(spills.group(2)) + int(spills.group(3)),
                       stack_bytes=int(spills.group(1)), notes=notes)


# --------------------------------------------------------------------------- reports


def inspect_kernel(kernel: str, dtype, arch: str, shape_mkng: Sequence[int], *, tiling=None,
                   num_warps: int | None = None, num_stages: int | None = None,
                   call: TritonCall | None = None) -> KernelReport:
    """Compiles one kernel for ``arch`` and reports its resources.

    ``tiling=None`` is the kernel's default; ``num_warps`` / ``num_stages`` override the values
    the kernel chose for that tiling (for sweeps). ``call`` reuses an earlier export of the same
    kernel, dtype, shape and tiling (the Triton IR does not depend on ``arch``, warps or stages).
    """
    import jax.numpy as jnp

    if arch not in SMEM_LIMIT_BYTES:
        raise ValueError(f"arch must be one of {ARCHS}, got {arch!r}")
    if call is None:
        call = exported_call(kernel, dtype, shape_mkng, tiling)
    ptx, smem = compile_ptx(call, arch, num_warps=num_warps, num_stages=num_stages)
    report = KernelReport(
        kernel=kernel, dtype=jnp.dtype(dtype).name, arch=arch,
        shape_mkng=tuple(int(s) for s in shape_mkng),
        tiling=tuple(tiling or default_tiling(kernel, dtype, shape_mkng)),
        num_warps=call.num_warps if num_warps is None else num_warps,
        num_stages=call.num_stages if num_stages is None else num_stages,
        target=ptx_target(ptx), ptx_bytes=len(ptx), smem_bytes=smem,
        smem_limit_bytes=SMEM_LIMIT_BYTES[arch], tensor_core=tensor_core_path(ptx),
        async_copies=async_copies(ptx))
    if ptxas_path() is None:
        return report
    asm = assemble(ptx)
    return dataclasses.replace(report, registers=asm.registers, spill_bytes=asm.spill_bytes,
                               stack_bytes=asm.stack_bytes, ptxas_notes=asm.notes)


def exported_call(kernel: str, dtype, shape_mkng: Sequence[int], tiling=None) -> TritonCall:
    fn, args = kernel_fn(kernel, dtype, shape_mkng, tiling)
    calls = [c for c in triton_calls(fn, *args) if c.name.startswith("moejax_")]
    if len(calls) != 1:
        raise RuntimeError(f"expected one moejax Triton kernel for {kernel}, found "
                           f"{[c.name for c in calls]}")
    return calls[0]


def inspect_all(archs: Iterable[str], dtypes: Iterable, shape_mkng: Sequence[int],
                kernels: Iterable[str] = KERNELS, tiling=None) -> list[KernelReport]:
    """Reports for every kernel x dtype x arch, exporting each kernel once per dtype."""
    archs = list(archs)
    reports = []
    for dtype in dtypes:
        for kernel in kernels:
            call = exported_call(kernel, dtype, shape_mkng, tiling)
            reports += [inspect_kernel(kernel, dtype, arch, shape_mkng, tiling=tiling, call=call)
                        for arch in archs]
    return reports


def default_tiling(kernel: str, dtype, shape_mkng: Sequence[int]) -> tuple[int, int, int]:
    """The tiling ``pallas_gpu`` picks by default for this kernel (for the report's table)."""
    import jax.numpy as jnp

    from moejax.kernels import pallas_gpu

    m, k, n, _ = shape_mkng
    dtype = jnp.dtype(dtype)
    if kernel == "gmm":
        return pallas_gpu.default_tiling("gmm", dtype, m, k, n)
    if kernel == "gmm_dlhs":
        return pallas_gpu.default_tiling("gmm", dtype, m, n, k)
    return pallas_gpu.default_tiling("tgmm", dtype, m, k, n)


def format_table(reports: Sequence[KernelReport]) -> str:
    def kib(b):
        return f"{b / 1024:.0f}"

    header = ("kernel", "dtype", "arch", "target", "tiling", "warps", "stages", "regs",
              "spill B", "stack B", "smem KiB", "limit KiB", "tensor core", "async copies",
              "PTX KiB")
    rows = [header]
    for r in reports:
        tiling = "x".join(map(str, r.tiling))
        rows.append((
            r.kernel, r.dtype, r.arch, r.target, tiling, str(r.num_warps), str(r.num_stages),
            "-" if r.registers is None else str(r.registers),
            "-" if r.spill_bytes is None else str(r.spill_bytes),
            "-" if r.stack_bytes is None else str(r.stack_bytes),
            kib(r.smem_bytes), kib(r.smem_limit_bytes), r.tensor_core,
            ",".join(r.async_copies) or "-", f"{r.ptx_bytes / 1024:.0f}"))
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _ints(count: int, what: str):
    def parse(text: str) -> tuple[int, ...]:
        parts = tuple(int(t) for t in text.split(","))
        if len(parts) != count:
            raise argparse.ArgumentTypeError(f"expected {what}")
        return parts
    return parse


def main(argv: Sequence[str] | None = None) -> int:
    """Prints the table (or JSON lines with ``--json``); exit status 1 when a kernel spills or
    exceeds its architecture's shared memory, 2 when nothing can be compiled here."""
    parser = argparse.ArgumentParser(
        prog="python -m moejax.kernels.gpu_inspect", description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", action="append", choices=ARCHS,
                        help="compute capability (repeatable; default 8.0 and 9.0)")
    parser.add_argument("--dtype", action="append", choices=("bfloat16", "float16", "float32"),
                        help="operand dtype (repeatable; default bfloat16 and float32)")
    parser.add_argument("--kernel", action="append", choices=KERNELS,
                        help="kernel of gmm's custom VJP (repeatable; default all)")
    parser.add_argument("--tiling", type=_ints(3, "tm,tk,tn"), default=None,
                        help="tm,tk,tn for every kernel (default: each kernel's own)")
    parser.add_argument("--shape", type=_ints(4, "m,k,n,g"), action="append",
                        help="forward problem lhs [m, k] x rhs [g, k, n] (repeatable; default "
                             "16384,512,512,8: 8192 tokens x top-2, d_model 512, d_ff 512)")
    parser.add_argument("--json", action="store_true", help="one JSON object per kernel")
    args = parser.parse_args(argv)
    prepare_environment()
    why = missing_compiler()
    if why:
        print(f"cannot compile Triton kernels here: {why}", file=sys.stderr)
        return 2
    if ptxas_path() is None:
        print("ptxas not found: registers and spills are not reported", file=sys.stderr)
    reports = []
    for shape in args.shape or [(16384, 512, 512, 8)]:
        reports += inspect_all(args.arch or ("8.0", "9.0"), args.dtype or ("bfloat16", "float32"),
                               shape, args.kernel or KERNELS, args.tiling)
    if args.json:
        for r in reports:
            print(json.dumps(r.row()))
    else:
        print(format_table(reports))
        for r in reports:
            for note in r.ptxas_notes:
                print(f"note: {r.kernel} {r.dtype} {r.target}: {note}")
    return 0 if all(r.clean for r in reports if r.spill_bytes is not None) else 1


if __name__ == "__main__":
    sys.exit(main())
