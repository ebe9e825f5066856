"""Training and evaluation of a (MoE) transformer LM: ``run(config, workdir)``.

Launch through the thin entry point::

  python -m moejax.main --config=experiments/default.py --workdir=runs/default [--config.key=value]

The run writes into ``workdir``:

* ``checkpoints/<step>/`` — orbax checkpoints (params, optimizer state, data-iterator state, checksums),
  every ``checkpoint_every_steps``, the last ``keep_checkpoints`` kept; a restarted run resumes from the
  newest readable one and ends bit-identical to an uninterrupted run. SIGTERM saves and exits.
* ``metrics.jsonl`` — one JSON object per logged step (``step``, ``train_loss``, ...; steps 1,
  every ``log_every_steps`` and the last) and per evaluation (``step``, ``eval_loss``,
  ``eval_perplexity``, per-layer expert load, ...; step 0, every ``eval_every_steps``, the last).
* ``tensorboard/`` — the same scalars as TensorBoard events (tensorboardX, no TensorFlow).
* ``loss.png``, ``expert_load.png`` — plots drawn at the end.
* ``config.json`` — the config the run was started with: a resumed run must match it (see
  :mod:`moejax.trainer.workdir`); ``trainer.lock`` while a trainer runs in it.

Losses: ``train_loss`` / ``eval_loss`` are the token cross-entropy (masked by the batch weights); the
objective is that plus the MoE auxiliary losses (``train_aux_loss``). The MoE layers get
``token_mask = inputs != pad``: padding is routed nowhere and counts in no MoE loss or metric.
A step whose loss or gradient norm is not finite is never applied (see :mod:`moejax.trainer.step`):
the run stops there, its checkpoints all finite, unless ``skip_nonfinite_steps`` allows skipping.
Instruction tuning (Flan-MoE): ``init_from`` = a run's workdir to start from its parameters,
``freeze`` in ``none | router | experts | non_expert``, and ``instruct_eval`` for exact-match
accuracy and answer-token loss per task family.
"""

from __future__ import annotations

import time
from typing import Any

import jax
import numpy as np
from etils import epath
from flax import nnx
from rich.console import Console
from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn,
                           TimeElapsedColumn, TimeRemainingColumn)

from moejax import data as data_lib
from moejax import parallel, paths
from moejax.models.transformer import TransformerConfig
from moejax.trainer import workdir as workdir_lib
from moejax.trainer.checkpoint import Checkpointer, restore_params
from moejax.trainer.config import (complete_config, get_tokenizer, hf_checkpoint,
                                   make_model_config)
from moejax.trainer.evaluate import Evaluator
from moejax.trainer.metrics_writer import MetricsWriter
from moejax.trainer.plots import plot_run
from moejax.trainer.state import TrainSetup, setup
from moejax.trainer.step import jit_train_step

# An evaluation loss above this multiple of the best one, this many evaluations in a row, warns.
DIVERGENCE_FACTOR = 2.0
DIVERGENCE_EVALS = 2


def run(config, workdir: str) -> dict[str, Any]:
    """Trains (or resumes) per ``config`` in ``workdir``; returns a summary of the final metrics."""
    config = complete_config(config)
    tokenizer = get_tokenizer(config)  # a missing or too large tokenizer fails before any write
    workdir_lib.maybe_initialize_distributed(config)
    is_main = jax.process_index() == 0
    console = Console(quiet=not is_main, soft_wrap=True)
    workdir = paths.resolve(workdir)
    workdir_lib.check_writable(workdir)
    with workdir_lib.lock(workdir, enabled=is_main):
        checkpoint_dir = workdir / "checkpoints"
        resuming = checkpoint_dir.exists() and any(p.name.isdigit() for p in checkpoint_dir.iterdir())
        workdir_lib.check_config_unchanged(workdir, config, resuming=resuming)
        s = setup(config, tokenizer=tokenizer)
        with parallel.use_mesh(s.mesh, s.rules):
            return _train(s, workdir, console, is_main)


def _train(s: TrainSetup, workdir: epath.Path, console: Console, is_main: bool) -> dict[str, Any]:
    config, mesh, rules = s.config, s.mesh, s.rules
    data_kwargs = dict(seq_len=config.seq_len, batch_size=config.batch_size // jax.process_count(),
                       data_dir=config.data_dir, process_index=jax.process_index(),
                       process_count=jax.process_count(), text_key=config.text_key,
                       tokenizer=s.tokenizer, stream=config.stream_data)
    train_iter = data_lib.create_iterator(config.dataset, split=config.train_split,
                                          seed=config.seed, **data_kwargs)
    evaluate = Evaluator(s, data_lib.create_iterator(
        config.dataset, split=config.eval_split, seed=config.seed, shuffle=False, **data_kwargs))
    checkpointer = Checkpointer(workdir / "checkpoints", keep=config.keep_checkpoints)
    state, start_step = _restore(s, checkpointer, train_iter, console)
    if is_main:
        workdir_lib.save_config(workdir, config)
    train_step = jit_train_step(s)
    writer = MetricsWriter(workdir, enabled=is_main, resume_step=start_step)
    monitor = _Monitor(config, writer, checkpointer)
    num_steps, stop, preempted, final = config.num_train_steps, workdir_lib.StopSignal(), False, {}
    progress = _progress(console, enabled=is_main and config.progress_bar)
    console.print(
        f"Training {s.num_params / 1e6:.2f}M parameters ({_describe_model(s.model_config)}) on "
        f"{config.dataset!r}, {jax.device_count()} device(s) {dict(mesh.shape)}, "
        f"{jax.process_count()} process(es); steps {start_step} -> {num_steps}; workdir {workdir}")
    task = progress.add_task("train", total=num_steps, completed=start_step, loss=float("nan"),
                             speed=0.0)
    monitor.on_log = lambda loss, speed: progress.update(task, loss=loss, speed=speed)

    def evaluation(step):
        result = evaluate(state)
        writer.write(step, result)
        final.update(result)
        console.print(_eval_line(step, num_steps, result))
        monitor.watch_divergence(step, result["eval_loss"], console)
        writer.flush()
        monitor.restart_clock(step)

    try:
        with progress, stop:
            if start_step == 0:  # the untrained model's loss starts the curves
                evaluation(0)
            for step in range(start_step, num_steps):
                batch = parallel.shard_batch(next(train_iter), mesh, rules)
                state, metrics = train_step(state, s.rng_state, batch)
                done = step + 1
                # The previous step is read only now: the device is already busy with this one.
                monitor.push(done, metrics, log=done % config.log_every_steps == 0
                             or done in (1, num_steps))
                progress.update(task, completed=done)
                if done % config.eval_every_steps == 0 or done == num_steps:
                    monitor.flush()
                    evaluation(done)
                preempted = stop.requested(done)
                if done % config.checkpoint_every_steps == 0 or done == num_steps or preempted:
                    monitor.flush()  # no step is saved before its finiteness is known
                    checkpointer.save(done, nnx.to_pure_dict(state["params"]),
                                      _train_part(state), train_iter)
                    writer.flush()
                if preempted:
                    console.print(f"SIGTERM at step {done}: checkpoint saved to "
                                  f"{checkpointer.directory}/{done}; exiting")
                    break
            monitor.flush()
    finally:
        checkpointer.close()
        writer.close()
    final.update(monitor.final)
    summary = {"step": int(jax.device_get(state["step"])), "preempted": preempted,
               "num_params": s.num_params, **final}
    if is_main and not preempted:
        summary["plots"] = plot_run(workdir)
        for line in ("Plots: " + ", ".join(summary["plots"]),
                     f"TensorBoard logs: {writer.tensorboard_dir} "
                     f"(tensorboard --logdir {writer.tensorboard_dir})",
                     f"Metrics: {writer.path}", f"Checkpoints: {checkpointer.directory}"):
            console.print(line, soft_wrap=True, highlight=False)
    return summary


def _restore(s: TrainSetup, checkpointer: Checkpointer, train_iter, console) -> tuple[dict, int]:
    """The state to start from: the newest readable checkpoint, ``init_from``'s parameters, or new."""
    state, config = s.state, s.config
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
                            state)
    # Parameters are stored as plain nested dicts (params/layers/0/attention/w_q/...).
    abstract_params = nnx.to_pure_dict(abstract["params"])
    restored = checkpointer.restore(abstract_params, _train_part(abstract), train_iter)
    if restored is not None:
        step, params, train_part = restored
        nnx.replace_by_pure_dict(state["params"], params)
        state.update(train_part)
        console.print(f"Resumed from {checkpointer.directory}/{step}")
        if step >= config.num_train_steps:
            console.print(f"Already trained to step {step} (num_train_steps = "
                          f"{config.num_train_steps}): nothing to train; use a new --workdir "
                          "to train again")
        return state, step
    hf_path = hf_checkpoint(config)
    if hf_path is not None:
        from moejax.models import hf

        params = hf.load_params(hf_path, s.model_config, mesh=s.mesh, rules=s.rules)
        nnx.replace_by_pure_dict(state["params"], nnx.to_pure_dict(params))
        console.print(f"Initialised parameters from the Hugging Face checkpoint {hf_path}")
    elif config.upcycle:
        params = nnx.to_pure_dict(_upcycled_params(s, _checkpoint_dir_of(config.init_from),
                                                   console))
        # Onto the shards the step expects.
        params = jax.tree.map(lambda new, old: jax.device_put(new, old.sharding), params,
                              nnx.to_pure_dict(state["params"]))
        nnx.replace_by_pure_dict(state["params"], params)
    elif config.init_from:
        source = _checkpoint_dir_of(config.init_from)
        from_step, params = restore_params(source, abstract_params)
        nnx.replace_by_pure_dict(state["params"], params)
        console.print(f"Initialised parameters from {source}/{from_step}")
    return state, 0


def _upcycled_params(s: TrainSetup, source: epath.Path, console):
    """This MoE model's parameters upcycled from the dense run whose checkpoints are ``source``."""
    import json

    from moejax.models import upcycle
    from moejax.models.transformer import Transformer

    record = source.parent / workdir_lib.CONFIG_FILE
    if not record.exists():
        raise ValueError(f"config.upcycle: no {workdir_lib.CONFIG_FILE} next to {source} (the dense "
                         "run's config)")
    dense_config = make_model_config(complete_config(json.loads(record.read_text())), s.tokenizer)
    if dense_config.moe is not None:
        raise ValueError(f"config.upcycle: the run in {source.parent} is not dense")
    replicated = jax.sharding.NamedSharding(s.mesh, jax.sharding.PartitionSpec())
    abstract = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=replicated),
        nnx.state(nnx.eval_shape(lambda: Transformer(dense_config, rngs=nnx.Rngs(0))), nnx.Param))
    from_step, dense = restore_params(source, nnx.to_pure_dict(abstract))
    nnx.replace_by_pure_dict(abstract, dense)
    try:
        _, params = upcycle(abstract, dense_config, s.model_config,
                            noise=s.config.upcycle_noise, seed=s.config.seed)
    except ValueError as error:
        raise ValueError(f"config.upcycle from {source.parent}: {error}") from error
    console.print(f"Upcycled the dense parameters of {source}/{from_step} into "
                  f"{s.model_config.moe.num_experts} experts per MoE layer")
    return params


class _Monitor:
    """Reads each step's metrics one step late: the finiteness count every step, the rest on logged
    steps (written to the metrics files); warns when evaluations diverge."""

    def __init__(self, config, writer: MetricsWriter, checkpointer: Checkpointer):
        self.config, self.writer, self.checkpointer = config, writer, checkpointer
        self.pending = None
        self.final: dict[str, Any] = {}
        self.on_log = lambda loss, speed: None
        self.best_eval, self.bad_evals = float("inf"), 0
        self.restart_clock(0)

    def restart_clock(self, step: int) -> None:
        self.last_log = (step, time.perf_counter())

    def push(self, step: int, metrics, *, log: bool) -> None:
        self.flush()
        self.pending = (step, metrics, log)

    def flush(self) -> None:
        if self.pending is None:
            return
        step, metrics, log = self.pending
        self.pending = None
        nonfinite = int(jax.device_get(metrics["nonfinite_steps"]))
        if nonfinite > self.config.skip_nonfinite_steps:
            raise FloatingPointError(self._nonfinite_message(step, metrics, nonfinite))
        if log:
            self._log(step, metrics)

    def _log(self, step, metrics) -> None:
        values = {k: np.asarray(v) for k, v in jax.device_get(metrics).items()}
        now = time.perf_counter()
        steps_per_sec = (step - self.last_log[0]) / max(now - self.last_log[1], 1e-9)
        self.last_log = (step, now)
        values["steps_per_sec"] = steps_per_sec
        values["tokens_per_sec"] = steps_per_sec * self.config.batch_size * self.config.seq_len
        self.writer.write(step, values)
        self.final.update({k: v.tolist() if isinstance(v, np.ndarray) else v
                           for k, v in values.items()})
        self.on_log(float(values["train_loss"]), steps_per_sec)

    def _nonfinite_message(self, step, metrics, count) -> str:
        values = jax.device_get({k: metrics[k] for k in ("train_total_loss", "grad_norm")})
        saved = self.checkpointer.all_steps()
        kept = (f"the last checkpoint, step {saved[-1]}, holds only finite steps"
                if saved else "no checkpoint was written")
        limit = self.config.skip_nonfinite_steps
        advice = "lower optimizer.learning_rate or raise optimizer.warmup_steps"
        model = self.config.model or {}
        if "float16" in (model.get("dtype"), model.get("param_dtype")):
            advice = "float16 overflows easily: train in bfloat16 or float32"
        return (f"step {step}: loss {float(values['train_total_loss'])}, gradient norm "
                f"{float(values['grad_norm'])} — {count} non-finite step(s), more than "
                f"skip_nonfinite_steps = {limit}; the step was not applied and {kept}. "
                f"Training diverged: {advice}")

    def watch_divergence(self, step: int, eval_loss: float, console: Console) -> None:
        if eval_loss < self.best_eval:
            self.best_eval, self.bad_evals = eval_loss, 0
            return
        self.bad_evals = self.bad_evals + 1 if eval_loss > DIVERGENCE_FACTOR * self.best_eval else 0
        if self.bad_evals >= DIVERGENCE_EVALS:
            console.print(f"warning: step {step}: eval loss {eval_loss:.4f} has been above "
                          f"{DIVERGENCE_FACTOR:g}x the best ({self.best_eval:.4f}) for "
                          f"{self.bad_evals} evaluations: training is diverging (lower "
                          "optimizer.learning_rate?)", highlight=False)


def _train_part(state):
    return {k: v for k, v in state.items() if k != "params"}


def _checkpoint_dir_of(path: str) -> epath.Path:
    """A run's workdir or its ``checkpoints`` directory (either may be a URI) -> the checkpoints
    directory."""
    path = paths.resolve(path)
    inner = path / "checkpoints"
    return inner if inner.is_dir() else path


def _describe_model(c: TransformerConfig) -> str:
    text = f"{c.num_layers} layers, d_model {c.d_model}, {c.num_heads} heads"
    if c.moe is None:
        return text + f", dense FFN {c.d_ff}"
    return (text + f", {c.num_moe_layers} MoE layers of {c.moe.num_experts} experts "
            f"(top-{c.moe.experts_per_token}, {c.moe.router}, {c.moe.dispatch})")


def _progress(console: Console, *, enabled: bool) -> Progress:
    return Progress(
        TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
        TextColumn("{task.fields[speed]:.2f} steps/s"), TextColumn("loss {task.fields[loss]:.4f}"),
        TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(),
        console=console, disable=not enabled, transient=False,
    )


def _eval_line(step, num_steps, result) -> str:
    text = (f"step {step}/{num_steps}: eval loss {result['eval_loss']:.4f}, "
            f"perplexity {result['eval_perplexity']:.2f}")
    if "eval_load_cv" in result:
        text += ", expert load CV per layer " + " ".join(f"{v:.2f}" for v in result["eval_load_cv"])
    accuracies = {k.split("/", 1)[1]: v for k, v in result.items()
                  if k.startswith("eval_exact_match/")}
    if accuracies:
        text += ", exact match " + " ".join(f"{k} {v:.2f}" for k, v in accuracies.items())
    return text
