"""Preflight: does a config compile and fit on a TPU slice? Answered on any CPU host, ahead of time.

  python -m moejax.preflight --config=experiments/pod/olmoe_1b_7b.py:slice=v5p-64 \
    --topology=v5p:2x4x4

The real sharded train step and eval step are compiled for the slice by the TPU compiler (libtpu,
``jax.experimental.topologies``; install the ``tpu`` or ``test`` extra) from abstract values only:
no parameter is ever materialised, so billion-parameter configs preflight on a laptop. Printed:
compile times; per-device memory (parameters, optimizer state, the step's temporaries from
``memory_analysis()``) against the chip's HBM; the collectives of the compiled step with the bytes
one device sends per step (loops over scanned layers counted per iteration); model FLOPs per token
and what a target MFU means in step time and tokens per second.

A config that does not fit ends with exit code 1 and a message with the numbers and what to change;
an invalid config or topology with exit code 2. Any config key may be overridden like the trainer's
(``--config.batch_size=64``, ``--config.model.num_layers=2``).

The preflight reads ``config.vocab_size`` and never the tokenizer file. The MoE layers compile the
Pallas TPU kernels (``gmm_backend="pallas_tpu"``, not interpreted) whatever the config's backend
says for CPU runs.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import sys
import time

# libtpu locks the machine for one process; a preflight only compiles, so it shares (tests, several
# preflights at once).
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")

import jax  # noqa: E402
import jax.numpy as jnp
import ml_collections  # noqa: E402
from flax import nnx  # noqa: E402

from moejax import parallel  # noqa: E402
from moejax.parallel import hlo  # noqa: E402

# Per chip (the topology name's prefix): HBM per chip and peak dense bf16 FLOP/s.
CHIPS = {
    "v4": dict(hbm_gib=32, peak_flops=275e12),
    "v5e": dict(hbm_gib=16, peak_flops=197e12),
    "v5p": dict(hbm_gib=95, peak_flops=459e12),
    "v6e": dict(hbm_gib=32, peak_flops=918e12),
}
GIB = 1024 ** 3
# Config keys of the tokenizer interface; the preflight needs only the vocabulary size.


class PreflightError(ValueError):
    """The config cannot be compiled for the topology (a config or topology error)."""


class DoesNotFit(Exception):
    """The config compiles but its step needs more memory per device than the chip has."""


# ---------------------------------------------------------------------- trainer adapter
# Every use of the trainer's code is in this section, so that the preflight follows the trainer
# wherever it moves.

from moejax.data import get_tokenizer  # noqa: E402
from moejax.models.transformer import Transformer, count_params  # noqa: E402
from moejax.trainer import config as trainer_config  # noqa: E402
from moejax.trainer import state as trainer_state  # noqa: E402
from moejax.trainer import step as trainer_step  # noqa: E402


def _trainer_config(config) -> tuple[ml_collections.ConfigDict, int]:
    """The trainer's completed config and the vocabulary size the model is built with.

    The preflight reads no tokenizer file: a subword tokenizer needs ``config.vocab_size``.
    """
    user = config.to_dict() if isinstance(config, ml_collections.ConfigDict) else dict(config)
    tokenizer = user.get("tokenizer") or "byte"
    vocab_size = user.get("vocab_size")
    if vocab_size is None:
        if tokenizer != "byte":
            raise PreflightError(
                f"config.vocab_size is None with tokenizer {tokenizer!r}: the preflight does not "
                "read tokenizer files; set config.vocab_size (a multiple of 128)")
        vocab_size = get_tokenizer("byte").vocab_size
    if not isinstance(vocab_size, int) or vocab_size < 1 or vocab_size % 128:
        raise PreflightError(f"config.vocab_size must be a positive multiple of 128, got "
                             f"{vocab_size!r}")
    # The byte tokenizer stands in for the named one: only the vocabulary size matters here.
    user.update(tokenizer="byte", vocab_size=vocab_size)
    return trainer_config.complete_config(ml_collections.ConfigDict(user)), vocab_size


def _model_config(config, vocab_size):
    model_config = trainer_config.make_model_config(config, get_tokenizer("byte"))
    model_config = model_config.replace(vocab_size=vocab_size)
    if model_config.moe is not None:
        moe = dataclasses.replace(model_config.moe, gmm_backend="pallas_tpu", gmm_interpret=False)
        model_config = model_config.replace(moe=moe)
    return model_config


def _abstract_setup(config, model_config, mesh, rules):
    """A ``TrainSetup`` whose state holds sharded ``ShapeDtypeStruct``s (nothing allocated)."""
    with parallel.use_mesh(mesh, rules):
        model = nnx.eval_shape(lambda: Transformer(
            model_config, rngs=nnx.Rngs(params=config.seed, router=config.seed + 1)))
        graphdef, params, rng_state, rest = nnx.split(model, nnx.Param, nnx.RngState, ...)
        model.eval()
        eval_graphdef = nnx.graphdef(model)
        params, rng_state, rest = (_with_shardings(s, mesh, rules)
                                   for s in (params, rng_state, rest))
    schedule = trainer_state.make_schedule(config)
    tx = trainer_state.make_optimizer(config, schedule, params)
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    scalar = jax.ShapeDtypeStruct((), jnp.int32, sharding=replicated)
    state = {"params": params, "rest": rest, "opt_state": _abstract_opt_state(tx, params, mesh),
             "step": scalar, "nonfinite_steps": scalar}
    num_params = sum(math.prod(x.shape) for x in jax.tree.leaves(params))
    return trainer_state.TrainSetup(config, get_tokenizer("byte"), model_config, mesh, rules,
                                    graphdef, eval_graphdef, state, rng_state, tx, schedule,
                                    num_params)


def _train_step(config, setup, model_config):
    """The trainer's jitted update step (donating the state, as the trainer does)."""
    del config, model_config  # the setup carries both
    return trainer_step.jit_train_step(setup)


def _eval_step(setup):
    return trainer_step.jit_eval_step(setup)


# ---------------------------------------------------------------------- abstract state


def _with_shardings(state, mesh, rules):
    shardings = parallel.state_shardings(state, mesh, rules)
    return jax.tree.map(lambda v, s: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=s),
                        state, shardings)


def _abstract_opt_state(tx, params, mesh):
    """The optimizer state's shapes, each leaf on the shards of the parameter it mirrors (a leaf
    whose key path ends with a parameter's path and has its shape), everything else replicated."""
    by_path = {tuple(path): p for path, p in jax.tree_util.tree_leaves_with_path(params)}
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())

    def place(path, leaf):
        sharding = replicated
        for start in range(len(path)):
            p = by_path.get(tuple(path[start:]))
            if p is not None and p.shape == leaf.shape:
                sharding = p.sharding
                break
        return jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=sharding)

    return jax.tree_util.tree_map_with_path(place, jax.eval_shape(tx.init, params))


def _batch(config, mesh, rules):
    sharding = parallel.batch_sharding(mesh, rules)
    shape = (config.batch_size, config.seq_len)
    return {"inputs": jax.ShapeDtypeStruct(shape, jnp.int32, sharding=sharding),
            "targets": jax.ShapeDtypeStruct(shape, jnp.int32, sharding=sharding),
            "weights": jax.ShapeDtypeStruct(shape, jnp.float32, sharding=sharding)}


def per_device_bytes(tree) -> int:
    """Bytes one device holds of a pytree of sharded ``ShapeDtypeStruct``s (the largest shard)."""
    total = 0
    for leaf in jax.tree.leaves(tree):
        shard = leaf.sharding.shard_shape(leaf.shape) if leaf.sharding is not None else leaf.shape
        total += math.prod(shard) * jnp.dtype(leaf.dtype).itemsize
    return total


# ---------------------------------------------------------------------- collectives per step

_COMPUTATION = re.compile(r"^(?:ENTRY\s+)?%?([\w.\-]+)\s.*\{\s*$")
_NAME = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=")
_CALLEE = re.compile(
    r"(calls|to_apply|body|condition|true_computation|false_computation)=%?([\w.\-]+)")
_BRANCHES = re.compile(r"branch_computations=\{([^}]*)\}")
_TRIP_COUNT = re.compile(r'"known_trip_count":\{"n":"(\d+)"')
_CONSTANT = re.compile(r"\bs32\[\](?:\{[^}]*\})? constant\((\d+)\)")


def _trip_count(line: str, computations: dict[str, list[str]]) -> int | None:
    """A while loop's trip count: XLA's ``known_trip_count``, else (the TPU compiler's HLO has no
    such annotation) ``N`` when the loop condition is ``counter < constant(N)``, the form of every
    ``scan`` and ``fori_loop``, whose counter starts at 0."""
    if m := _TRIP_COUNT.search(line):
        return int(m.group(1))
    if " while(" not in line or not (m := re.search(r"condition=%?([\w.\-]+)", line)):
        return None
    body = computations.get(m.group(1), [])
    constants = [c for text in body for c in _CONSTANT.findall(text)]
    roots = [text for text in body if text.lstrip().startswith("ROOT")]
    if (len(constants) == 1 and len(roots) == 1 and " compare(" in roots[0]
            and "direction=LT" in roots[0]):
        return int(constants[0])
    return None


def _executions(hlo_text: str) -> dict[str, int]:
    """Instruction name -> how often it runs per program execution (while loops with a known trip
    count multiply their body; each conditional branch counts as if taken)."""
    computations: dict[str, list[str]] = {}
    entry = None
    current = None
    for line in hlo_text.splitlines():
        if (m := _COMPUTATION.match(line)) and "=" not in line.split("{")[0].split("(")[0]:
            current = m.group(1)
            computations[current] = []
            if line.startswith("ENTRY"):
                entry = current
        elif current is not None:
            computations[current].append(line)
    runs: dict[str, int] = {}

    def visit(name: str, times: int) -> None:
        if name not in computations or runs.get(name, 0) >= times:
            return
        runs[name] = times
        for line in computations[name]:
            trips = _trip_count(line, computations)
            for kind, callee in _CALLEE.findall(line):
                loop = kind in ("body", "condition") and trips is not None
                visit(callee, times * trips if loop else times)
            if m := _BRANCHES.search(line):
                for callee in re.findall(r"%?([\w.\-]+)", m.group(1)):
                    visit(callee, times)

    if entry is not None:
        visit(entry, 1)
    counts = {}
    for name, lines in computations.items():
        for line in lines:
            if m := _NAME.match(line):
                counts[m.group(1)] = runs.get(name, 1)
    return counts


def collective_bytes(hlo_text: str, num_devices: int) -> dict[str, dict[str, float]]:
    """Per collective kind: ``count`` (executions per step) and ``bytes`` one device sends per
    step. Of a conditional's branches (expert parallelism's fast and worst-case exchange) only the
    cheapest counts: the step takes the worst case only when a shard would overflow."""
    executions = _executions(hlo_text)
    found = hlo.collectives(hlo_text, num_devices)
    # The cheapest branch of each conditional.
    by_branch: dict[str, float] = {}
    for c in found:
        if c.branch:
            by_branch[c.branch] = by_branch.get(c.branch, 0.0) + c.sent_bytes * executions.get(
                c.name, 1)
    cheapest: dict[str, str] = {}
    for branch, sent in by_branch.items():
        cond = branch.rsplit("/", 1)[0]
        if cond not in cheapest or sent < by_branch[cheapest[cond]]:
            cheapest[cond] = branch
    out: dict[str, dict[str, float]] = {}
    for c in found:
        if c.branch and cheapest.get(c.branch.rsplit("/", 1)[0]) != c.branch:
            continue
        times = executions.get(c.name, 1)
        entry = out.setdefault(c.op, {"count": 0, "bytes": 0.0})
        entry["count"] += times
        entry["bytes"] += c.sent_bytes * times
    return out


# ---------------------------------------------------------------------- the preflight


@dataclasses.dataclass
class Report:
    topology: str
    chip: str
    num_devices: int
    mesh: dict[str, int]
    num_params: int
    active_params: int
    train_compile_s: float
    eval_compile_s: float
    params_bytes: int
    opt_state_bytes: int
    batch_bytes: int
    argument_bytes: int
    output_bytes: int
    alias_bytes: int
    temp_bytes: int
    code_bytes: int
    eval_temp_bytes: int
    hbm_bytes: int
    collectives: dict[str, dict[str, float]]
    flops_per_token: float
    tokens_per_step: int
    target_mfu: float
    peak_flops: float

    @property
    def peak_bytes(self) -> int:
        """Train step memory per device: its arguments (state, batch), outputs not written in place
        of a donated argument, temporaries and code."""
        return (self.argument_bytes + self.output_bytes - self.alias_bytes + self.temp_bytes
                + self.code_bytes)

    @property
    def fits(self) -> bool:
        return self.peak_bytes <= self.hbm_bytes

    @property
    def collective_bytes_per_step(self) -> float:
        return sum(c["bytes"] for c in self.collectives.values())

    @property
    def step_seconds_at_target(self) -> float:
        flops = self.flops_per_token * self.tokens_per_step
        return flops / (self.num_devices * self.peak_flops * self.target_mfu)


def chip_of(topology: str) -> str:
    chip = topology.split(":", 1)[0]
    if chip not in CHIPS:
        raise PreflightError(f"--topology={topology!r}: unknown chip {chip!r}; expected "
                             f"'<chip>:<shape>' with chip in {sorted(CHIPS)}, e.g. v5p:2x4x4")
    return chip


def topology_devices(topology: str):
    chip_of(topology)
    try:
        from jax.experimental import topologies
    except ImportError as error:  # pragma: no cover - jax always has it
        raise PreflightError(f"jax.experimental.topologies is unavailable: {error}") from error
    try:
        return topologies.get_topology_desc(platform="tpu", topology_name=topology).devices
    except Exception as error:
        raise PreflightError(
            f"--topology={topology!r}: no TPU topology ({error}). The preflight needs libtpu "
            "(pip install -e '.[tpu]') and a topology the chip supports, e.g. v5p:2x4x4, "
            "v5e:16x16, v6e:16x16, v4:2x2x2") from error


def model_flops_per_token(model_config) -> float:
    """Training FLOPs per token (forward + backward), PaLM's estimate: ``6 N + 12 L d S`` with N the
    parameters one token multiplies (k of E experts, the LM head; not the embedding lookup)."""
    counts = count_params(model_config)
    matmul_params = counts["active"] - model_config.vocab_size * model_config.d_model
    attention = 12 * model_config.num_layers * model_config.d_model * model_config.max_len
    return 6.0 * matmul_params + attention


def run(config, topology: str, *, target_mfu: float = 0.4, eval_step: bool = True) -> Report:
    """Compiles ``config``'s train (and eval) step for ``topology``; returns the numbers."""
    # Programs compiled for a topology without its chips cannot be loaded back from JAX's persistent
    # compilation cache (there is no client to load them into): writing them there only wastes space.
    enabled = jax.config.jax_enable_compilation_cache
    jax.config.update("jax_enable_compilation_cache", False)
    try:
        return _run(config, topology, target_mfu=target_mfu, eval_step=eval_step)
    finally:
        jax.config.update("jax_enable_compilation_cache", enabled)


def _run(config, topology: str, *, target_mfu: float, eval_step: bool) -> Report:
    chip = chip_of(topology)
    config, vocab_size = _trainer_config(config)
    model_config = _model_config(config, vocab_size)
    devices = topology_devices(topology)
    mesh_sizes = dict(config.mesh)
    try:
        mesh = parallel.make_mesh(**mesh_sizes, devices=devices)
    except ValueError as error:
        raise PreflightError(f"config.mesh {mesh_sizes} does not fit topology {topology} "
                             f"({len(devices)} chips): {error}") from error
    rules = tuple(tuple(r) for r in config.sharding_rules) if config.sharding_rules else None
    batch_parts = math.prod(mesh.shape[a] for a in parallel.mesh.as_axes(
        parallel.batch_sharding(mesh, rules).spec[0]))
    if config.batch_size % batch_parts:
        raise PreflightError(f"config.batch_size = {config.batch_size} is not divisible by the "
                             f"batch's mesh axes ({batch_parts} devices, mesh {dict(mesh.shape)})")

    setup = _abstract_setup(config, model_config, mesh, rules)
    batch = _batch(config, mesh, rules)
    # Built outside the mesh: the step's base key is a host constant, not an array on the slice.
    train_step = _train_step(config, setup, model_config)
    with parallel.use_mesh(mesh, rules):
        lowered = train_step.lower(setup.state, setup.rng_state, batch)
        start = time.perf_counter()
        try:
            compiled = lowered.compile()
        except Exception as error:
            if "RESOURCE_EXHAUSTED" in str(error) or "Ran out of memory" in str(error):
                raise DoesNotFit(_advice(config, model_config, mesh, chip, setup,
                                         compiler_message=str(error))) from error
            raise
        train_s = time.perf_counter() - start
        eval_s, eval_temp = 0.0, 0
        if eval_step:
            state = setup.state
            lowered_eval = _eval_step(setup).lower(state["params"], state["rest"],
                                                   setup.rng_state, batch)
            start = time.perf_counter()
            compiled_eval = lowered_eval.compile()
            eval_s = time.perf_counter() - start
            eval_temp = compiled_eval.memory_analysis().temp_size_in_bytes
    memory = compiled.memory_analysis()
    counts = count_params(model_config)
    return Report(
        topology=topology, chip=chip, num_devices=len(devices), mesh=dict(mesh.shape),
        num_params=counts["total"], active_params=counts["active"],
        train_compile_s=train_s, eval_compile_s=eval_s,
        params_bytes=per_device_bytes(setup.state["params"]),
        opt_state_bytes=per_device_bytes(setup.state["opt_state"]),
        batch_bytes=per_device_bytes(batch),
        argument_bytes=memory.argument_size_in_bytes, output_bytes=memory.output_size_in_bytes,
        alias_bytes=memory.alias_size_in_bytes, temp_bytes=memory.temp_size_in_bytes,
        code_bytes=memory.generated_code_size_in_bytes, eval_temp_bytes=eval_temp,
        hbm_bytes=CHIPS[chip]["hbm_gib"] * GIB,
        collectives=collective_bytes(compiled.as_text(), len(devices)),
        flops_per_token=model_flops_per_token(model_config),
        tokens_per_step=config.batch_size * config.seq_len, target_mfu=target_mfu,
        peak_flops=CHIPS[chip]["peak_flops"])


def _advice(config, model_config, mesh, chip, setup, *, compiler_message="") -> str:
    state = per_device_bytes(setup.state["params"]) + per_device_bytes(setup.state["opt_state"])
    lines = [f"does not fit on {chip} ({CHIPS[chip]['hbm_gib']} GiB HBM per chip) with mesh "
             f"{dict(mesh.shape)}: parameters + optimizer state {state / GIB:.2f} GiB per device"]
    if compiler_message:
        first = [line for line in compiler_message.splitlines() if line.strip()][:3]
        lines.append("TPU compiler: " + " ".join(first))
    lines.append("what to change: " + "; ".join(_suggestions(config, model_config,
                                                              dict(mesh.shape))))
    return "\n".join(lines)


def _suggestions(config, model_config, sizes: dict[str, int]) -> list[str]:
    out = []
    if sizes.get("data", 1) > 1:
        out.append(f"move mesh.data = {sizes['data']} into mesh.fsdp (splits parameters and "
                   "optimizer state too)")
    if not model_config.remat:
        out.append("set model.remat = True (recompute activations in the backward pass)")
    out.append(f"lower batch_size (now {config.batch_size}) or seq_len (now {config.seq_len}) to "
               "shrink activations")
    if sizes.get("tensor", 1) == 1:
        out.append("split the FFN width, heads and vocabulary with mesh.tensor > 1")
    out.append("or use a larger slice")
    return out


def format_report(r: Report) -> str:
    gib = lambda b: f"{b / GIB:7.2f} GiB"  # noqa: E731
    lines = [
        f"topology {r.topology}: {r.num_devices} x {r.chip} chips, mesh {r.mesh}",
        f"model: {r.num_params / 1e9:.2f}B parameters, "
        f"{r.active_params / 1e9:.2f}B active per token",
        f"compile: train step {r.train_compile_s:.1f} s, eval step {r.eval_compile_s:.1f} s",
        "memory per device (train step):",
        f"  parameters       {gib(r.params_bytes)}",
        f"  optimizer state  {gib(r.opt_state_bytes)}",
        f"  batch            {gib(r.batch_bytes)}",
        f"  temporaries      {gib(r.temp_bytes)}  (activations, gradients, collectives' buffers)",
        f"  outputs not donated {r.output_bytes - r.alias_bytes:,} bytes; code "
        f"{r.code_bytes:,} bytes",
        f"  total            {gib(r.peak_bytes)} of {gib(r.hbm_bytes)} HBM "
        f"({100 * r.peak_bytes / r.hbm_bytes:.0f}%): {'fits' if r.fits else 'DOES NOT FIT'}",
        f"  eval step temporaries {gib(r.eval_temp_bytes)}",
        "collectives per train step (bytes one device sends):",
    ]
    for op, c in sorted(r.collectives.items()):
        lines.append(f"  {op:<19} x{int(c['count']):<5} {c['bytes'] / GIB:9.3f} GiB")
    lines.append(f"  total                     {r.collective_bytes_per_step / GIB:9.3f} GiB")
    tokens = r.tokens_per_step
    lines += [
        f"model FLOPs: {r.flops_per_token / 1e9:.2f} GFLOP per token, "
        f"{r.flops_per_token * tokens / 1e15:.2f} PFLOP per step of {tokens:,} tokens",
        f"at {100 * r.target_mfu:.0f}% MFU ({r.peak_flops / 1e12:.0f} TFLOP/s bf16 per chip): "
        f"{r.step_seconds_at_target:.2f} s per step, "
        f"{tokens / r.step_seconds_at_target:,.0f} tokens/s",
    ]
    return "\n".join(lines)


# ---------------------------------------------------------------------- command line


def main(argv=None) -> int:
    from absl import app, flags
    from ml_collections import config_flags

    config_flag = config_flags.DEFINE_config_file(
        "config", None, "Experiment config file (get_config()).", lock_config=False,
        accept_new_attributes=True)
    topology_flag = flags.DEFINE_string("topology", None,
                                        "TPU slice, e.g. v5p:2x4x4 or v5e:16x16.")
    mfu_flag = flags.DEFINE_float("target_mfu", 0.4, "Model FLOPs utilisation to estimate at.")
    flags.mark_flags_as_required(["config", "topology"])
    from moejax.paths import config_package_on_path

    argv = sys.argv if argv is None else argv
    config_package_on_path(argv)
    try:
        flags.FLAGS(argv)
    except (flags.Error, AttributeError, KeyError, ValueError) as error:
        from moejax.paths import error_line

        print(f"error: {error_line(error)}", file=sys.stderr)
        return 2
    try:
        report = run(config_flag.value, topology_flag.value, target_mfu=mfu_flag.value)
    except DoesNotFit as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(format_report(report))
    if not report.fits:
        print("error: " + _advice_from_report(report, config_flag.value), file=sys.stderr)
        return 1
    return 0


def _advice_from_report(r: Report, config) -> str:
    config, vocab_size = _trainer_config(config)
    model_config = _model_config(config, vocab_size)
    over = r.peak_bytes - r.hbm_bytes
    return (f"does not fit on {r.chip}: {r.peak_bytes / GIB:.2f} GiB per device (parameters "
            f"{r.params_bytes / GIB:.2f}, optimizer state {r.opt_state_bytes / GIB:.2f}, "
            f"temporaries {r.temp_bytes / GIB:.2f}) > {r.hbm_bytes / GIB:.0f} GiB HBM by "
            f"{over / GIB:.2f} GiB\nwhat to change: "
            + "; ".join(_suggestions(config, model_config, r.mesh)))


if __name__ == "__main__":
    sys.exit(main())
