"""Training and evaluation of a (MoE) transformer LM: ``run(config, workdir)``.

Launch through the thin entry point::

  python -m moejax.main --config=experiments/default.py --workdir=runs/default [--config.key=value]

``run`` is one function in banner-commented sections: config, processes, workdir, mesh, input,
model/optimizer/state (``create_train_state``), checkpoint (resume or fine-tune init), update step
(``make_train_step``), evaluation, loop, end of run. The run writes into ``workdir``:

* ``checkpoints/<step>/`` — orbax checkpoints (params, optimizer state, data-iterator state), every
  ``checkpoint_every_steps``, the last ``keep_checkpoints`` kept; a restarted run resumes from the
  newest readable one and ends bit-identical to an uninterrupted run. SIGTERM saves and exits.
* ``metrics.jsonl`` — one JSON object per logged step (``step``, ``train_loss``, ...; steps 1,
  every ``log_every_steps`` and the last) and per evaluation (``step``, ``eval_loss``,
  ``eval_perplexity``, per-layer expert load, ...; step 0, every ``eval_every_steps``, the last).
* ``tensorboard/`` — the same scalars as TensorBoard events (tensorboardX, no TensorFlow).
* ``loss.png``, ``expert_load.png`` — plots drawn at the end.

Losses: ``train_loss`` / ``eval_loss`` are the token cross-entropy (masked by the batch weights); the
objective is that plus the MoE auxiliary losses (``train_aux_loss``). The MoE layers get
``token_mask = inputs != PAD_ID``: padding is routed nowhere and counts in no MoE loss or metric.
Instruction tuning (Flan-MoE): ``init_from`` = a run's workdir to start from its parameters,
``freeze`` in ``none | router | experts | non_expert``, and ``instruct_eval`` for exact-match
accuracy and answer-token loss per task family. ``train_split`` / ``eval_split`` choose the
dataset's splits (single-task fine-tuning: ``instruct_synth``'s ``task_<family>`` and
``eval_<family>``).
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
import signal
import time
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from etils import epath
from flax import nnx
from rich.console import Console
from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn,
                           TimeElapsedColumn, TimeRemainingColumn)

from moejax import data as data_lib
from moejax import parallel, paths
from moejax.checkpoint import Checkpointer, restore_params
from moejax.layers.config import MoEConfig
from moejax.metrics_writer import MetricsWriter
from moejax.models.generate import greedy_generate
from moejax.models.transformer import Transformer, TransformerConfig
from moejax.plots import plot_run

FREEZE_OPTIONS = ("none", "router", "experts", "non_expert")

# Every key a config may hold, with its default. A key outside this table is an error (a typo must
# not be silently ignored); ``model`` and ``moe`` hold TransformerConfig / MoEConfig fields.
DEFAULTS = dict(
    dataset="stdlib_text",
    train_split="train",
    eval_split="validation",
    data_dir=None,
    text_key="text",
    seq_len=128,
    batch_size=16,
    num_train_steps=1000,
    seed=0,
    model=None,
    moe=None,
    optimizer=dict(learning_rate=3e-3, warmup_steps=100, end_learning_rate_ratio=0.1,
                   weight_decay=0.1, b1=0.9, b2=0.95, eps=1e-8, grad_clip_norm=1.0),
    mesh=dict(data=-1, fsdp=1, expert=1, tensor=1),
    sharding_rules=None,
    log_every_steps=10,
    eval_every_steps=200,
    eval_batches=4,
    checkpoint_every_steps=200,
    keep_checkpoints=3,
    init_from=None,
    freeze="none",
    instruct_eval=None,
    distributed=None,
    progress_bar=True,
    # DeepSeek-V3's bias update speed (gamma); used only by router="deepseek_v3".
    router_bias_update_rate=1e-3,
)
MODEL_KEYS = tuple(f.name for f in dataclasses.fields(TransformerConfig)
                   if f.name not in ("vocab_size", "max_len", "moe"))
MOE_KEYS = tuple(f.name for f in dataclasses.fields(MoEConfig)
                 if f.name not in ("d_model", "dtype", "param_dtype"))
INSTRUCT_EVAL_DEFAULTS = dict(families=None, num_examples=32, max_new_tokens=16, seed=2)
DISTRIBUTED_KEYS = ("coordinator_address", "num_processes", "process_id")


def run(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
    """Trains (or resumes) per ``config`` in ``workdir``; returns a summary of the final metrics."""
    # ------------------------------------------------------------------ config
    config = complete_config(config)
    model_config = make_model_config(config)

    # ------------------------------------------------------------------ processes
    _maybe_initialize_distributed(config)
    is_main = jax.process_index() == 0
    console = Console(quiet=not is_main, soft_wrap=True)

    # ------------------------------------------------------------------ workdir and logging
    workdir = paths.resolve(workdir)
    _check_workdir(workdir)
    checkpoint_dir = workdir / "checkpoints"

    # ------------------------------------------------------------------ mesh
    mesh = parallel.make_mesh(**dict(config.mesh))
    rules = tuple(tuple(rule) for rule in config.sharding_rules) if config.sharding_rules else None
    batch_sharding = parallel.batch_sharding(mesh, rules)
    batch_parts = math.prod(mesh.shape[a] for a in _axes(batch_sharding.spec[0]))
    if config.batch_size % batch_parts:
        raise ValueError(
            f"batch_size = {config.batch_size} is not divisible by the data-parallel size "
            f"{batch_parts} (mesh {dict(mesh.shape)}, batch split over {_axes(batch_sharding.spec[0])})")
    if config.batch_size % jax.process_count():
        raise ValueError(f"batch_size = {config.batch_size} is not divisible by the number of "
                         f"processes {jax.process_count()}")

    with parallel.use_mesh(mesh, rules):
        # -------------------------------------------------------------- input
        local_batch = config.batch_size // jax.process_count()
        data_kwargs = dict(seq_len=config.seq_len, batch_size=local_batch,
                           data_dir=config.data_dir, process_index=jax.process_index(),
                           process_count=jax.process_count(), text_key=config.text_key)
        train_iter = data_lib.create_iterator(config.dataset, split=config.train_split,
                                              seed=config.seed, **data_kwargs)
        eval_iter = data_lib.create_iterator(config.dataset, split=config.eval_split,
                                             seed=config.seed, shuffle=False, **data_kwargs)
        eval_start_state = eval_iter.get_state()

        # -------------------------------------------------------------- model, optimizer, state
        setup = create_train_state(config, model_config, mesh, rules)
        state, rng_state = setup.state, setup.rng_state
        shardings = jax.tree.map(lambda x: x.sharding, state)

        # -------------------------------------------------------------- checkpoint
        checkpointer = Checkpointer(checkpoint_dir, keep=config.keep_checkpoints)
        abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
                                state)
        # Parameters are stored as plain nested dicts (params/layers/0/attention/w_q/...).
        abstract_params = nnx.to_pure_dict(abstract["params"])
        restored = checkpointer.restore(abstract_params, _train_part(abstract), train_iter)
        start_step = 0
        if restored is not None:
            start_step, params, train_part = restored
            nnx.replace_by_pure_dict(state["params"], params)
            state.update(train_part)
            console.print(f"Resumed from {checkpoint_dir}/{start_step}")
            if start_step >= config.num_train_steps:
                console.print(f"Already trained to step {start_step} (num_train_steps = "
                              f"{config.num_train_steps}): nothing to train; use a new --workdir "
                              "to train again")
        elif config.init_from:
            source = _checkpoint_dir_of(config.init_from)
            from_step, params = restore_params(source, abstract_params)
            nnx.replace_by_pure_dict(state["params"], params)
            console.print(f"Initialised parameters from {source}/{from_step}")

        # -------------------------------------------------------------- update step
        uses_bias = model_config.moe is not None and model_config.moe.router == "deepseek_v3"
        train_step = jax.jit(
            make_train_step(setup, jax.random.key(config.seed + 2),
                            router_bias_rate=config.router_bias_update_rate if uses_bias else 0.0),
            donate_argnums=0, out_shardings=(shardings, None))

        # -------------------------------------------------------------- evaluation
        @jax.jit
        def eval_step(params, rest, rng_state, batch):
            model = nnx.merge(setup.eval_graphdef, params, rng_state, rest)
            logits_BxLxV, aux = model(batch["inputs"], token_mask=_token_mask(batch))
            ce_sum, weight_sum = token_cross_entropy(logits_BxLxV, batch["targets"],
                                                     batch["weights"])
            out = {"ce_sum": ce_sum, "weight_sum": weight_sum}
            for name in ("tokens_per_expert", "dropped_fraction"):
                if name in aux.metrics:
                    out[name] = aux.metrics[name]
            return out

        def evaluate(state) -> dict[str, Any]:
            eval_iter.set_state(eval_start_state)
            sums: dict[str, Any] = {}
            num_batches = 0
            for _ in range(config.eval_batches):
                try:
                    batch = parallel.shard_batch(next(eval_iter), mesh, rules)
                except StopIteration:
                    break
                num_batches += 1
                out = jax.device_get(eval_step(state["params"], state["rest"], rng_state, batch))
                for name, value in out.items():
                    sums[name] = sums.get(name, 0.0) + np.asarray(value, np.float64)
            if not sums or sums["weight_sum"] == 0:
                raise ValueError(f"dataset {config.dataset!r} has no validation tokens to evaluate")
            eval_loss = float(sums["ce_sum"] / sums["weight_sum"])
            result = {"eval_loss": eval_loss, "eval_perplexity": math.exp(min(eval_loss, 700.0))}
            if "tokens_per_expert" in sums:
                load_LxE = sums["tokens_per_expert"]
                share_LxE = load_LxE / np.maximum(load_LxE.sum(axis=1, keepdims=True), 1.0)
                result["eval_expert_load"] = share_LxE.tolist()
                result["eval_load_cv"] = (load_LxE.std(axis=1)
                                          / np.maximum(load_LxE.mean(axis=1), 1e-12)).tolist()
                result["eval_dropped_fraction"] = (sums["dropped_fraction"]
                                                   / num_batches).tolist()
            if config.instruct_eval is not None:
                result.update(instruct_answer_loss(config, eval_step, state, rng_state, mesh, rules))
                result.update(instruct_accuracy(config, setup.eval_graphdef, state, rng_state))
            return result

        # -------------------------------------------------------------- loop
        writer = MetricsWriter(workdir, enabled=is_main, resume_step=start_step)
        stop = _StopSignal()
        num_steps = config.num_train_steps
        progress = _progress(console, enabled=is_main and config.progress_bar)
        console.print(
            f"Training {setup.num_params / 1e6:.2f}M parameters ({_describe_model(model_config)}) on "
            f"{config.dataset!r}, {jax.device_count()} device(s) "
            f"{dict(mesh.shape)}, {jax.process_count()} process(es); steps {start_step} -> "
            f"{num_steps}; workdir {workdir}")
        task = progress.add_task("train", total=num_steps, completed=start_step, loss=float("nan"),
                                 speed=0.0)
        pending = None
        last_log = (start_step, time.perf_counter())
        final: dict[str, Any] = {}
        preempted = False

        def log_pending():
            nonlocal pending, last_log
            if pending is None:
                return
            step, metrics = pending
            pending = None
            values = {k: np.asarray(v) for k, v in jax.device_get(metrics).items()}
            if not np.isfinite(values["train_loss"]):
                raise FloatingPointError(
                    f"train_loss is {values['train_loss']} at step {step}: training diverged "
                    f"(lower optimizer.learning_rate or raise optimizer.warmup_steps)")
            now = time.perf_counter()
            steps_per_sec = (step - last_log[0]) / max(now - last_log[1], 1e-9)
            last_log = (step, now)
            values["steps_per_sec"] = steps_per_sec
            values["tokens_per_sec"] = steps_per_sec * config.batch_size * config.seq_len
            writer.write(step, values)
            final.update({k: v.tolist() if isinstance(v, np.ndarray) else v
                          for k, v in values.items()})
            progress.update(task, loss=float(values["train_loss"]), speed=steps_per_sec)

        try:
            with progress, stop:
                if start_step == 0:  # the untrained model's loss starts the curves
                    result = evaluate(state)
                    writer.write(0, result)
                    console.print(_eval_line(0, num_steps, result))
                    last_log = (0, time.perf_counter())
                for step in range(start_step, num_steps):
                    batch = parallel.shard_batch(next(train_iter), mesh, rules)
                    state, metrics = train_step(state, rng_state, batch)
                    done = step + 1
                    # Metrics of the previous step are read only now: the device is already
                    # busy with this one, so the host never stalls the pipeline.
                    log_pending()
                    if done % config.log_every_steps == 0 or done in (1, num_steps):
                        pending = (done, metrics)
                    progress.update(task, completed=done)
                    if done % config.eval_every_steps == 0 or done == num_steps:
                        log_pending()
                        result = evaluate(state)
                        writer.write(done, result)
                        final.update(result)
                        console.print(_eval_line(done, num_steps, result))
                        writer.flush()
                        last_log = (done, time.perf_counter())
                    preempted = stop.requested(done)
                    if done % config.checkpoint_every_steps == 0 or done == num_steps or preempted:
                        checkpointer.save(done, nnx.to_pure_dict(state["params"]),
                                          _train_part(state), train_iter)
                        writer.flush()
                    if preempted:
                        log_pending()
                        console.print(f"SIGTERM at step {done}: checkpoint saved to "
                                      f"{checkpoint_dir}/{done}; exiting")
                        break
                log_pending()
        # -------------------------------------------------------------- end of run
        finally:
            checkpointer.close()
            writer.close()
    summary = {"step": int(jax.device_get(state["step"])), "preempted": preempted,
               "num_params": setup.num_params, **final}
    if is_main and not preempted:
        plots = plot_run(workdir)
        for line in ("Plots: " + ", ".join(plots),
                     f"TensorBoard logs: {writer.tensorboard_dir} "
                     f"(tensorboard --logdir {writer.tensorboard_dir})",
                     f"Metrics: {writer.path}", f"Checkpoints: {checkpoint_dir}"):
            console.print(line, soft_wrap=True, highlight=False)
        summary["plots"] = plots
    return summary


# ---------------------------------------------------------------------- config helpers


def complete_config(config) -> ml_collections.ConfigDict:
    """``DEFAULTS`` overlaid with ``config``; unknown keys raise a ValueError naming a close match."""
    merged = ml_collections.ConfigDict(DEFAULTS)
    user = config.to_dict() if isinstance(config, ml_collections.ConfigDict) else dict(config)
    for key, value in user.items():
        _check_key(key, DEFAULTS, "config")
        if key in ("optimizer", "mesh") and value is not None:
            for sub in value:
                _check_key(sub, DEFAULTS[key], f"config.{key}")
            merged[key].update(value)
        else:
            merged[key] = value
    for name, allowed in (("model", MODEL_KEYS), ("moe", MOE_KEYS),
                          ("instruct_eval", INSTRUCT_EVAL_DEFAULTS),
                          ("distributed", DISTRIBUTED_KEYS)):
        for sub in merged[name] or {}:
            _check_key(sub, allowed, f"config.{name}")
    if merged.model is None:
        raise ValueError(f"config.model is required (a dict of {MODEL_KEYS})")
    if merged.instruct_eval is not None:
        merged.instruct_eval = ml_collections.ConfigDict(
            {**INSTRUCT_EVAL_DEFAULTS, **merged.instruct_eval.to_dict()})
    _check_values(merged)
    return merged


def _check_key(key, allowed, where):
    if key not in allowed:
        close = difflib.get_close_matches(key, list(allowed), n=1)
        hint = f"; did you mean {close[0]!r}?" if close else f"; known keys: {sorted(allowed)}"
        raise ValueError(f"{where}.{key} is not a known key{hint}")


def _check_values(config) -> None:
    for name in ("seq_len", "batch_size", "num_train_steps", "log_every_steps", "eval_every_steps",
                 "eval_batches", "checkpoint_every_steps", "keep_checkpoints"):
        value = config[name]
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"config.{name} must be a positive int, got {value!r}")
    if config.freeze not in FREEZE_OPTIONS:
        raise ValueError(f"config.freeze must be one of {FREEZE_OPTIONS}, got {config.freeze!r}")
    if config.freeze in ("router", "experts") and config.moe is None:
        raise ValueError(f"config.freeze = {config.freeze!r} needs an MoE model (config.moe is None)")
    opt = config.optimizer
    if not opt.learning_rate > 0:
        raise ValueError(f"config.optimizer.learning_rate must be > 0, got {opt.learning_rate}")
    if config.router_bias_update_rate < 0:
        raise ValueError(f"config.router_bias_update_rate must be >= 0, got "
                         f"{config.router_bias_update_rate}")
    if opt.warmup_steps < 0:
        raise ValueError(f"config.optimizer.warmup_steps must be >= 0, got {opt.warmup_steps}")
    if config.instruct_eval is not None:
        families = config.instruct_eval.families
        if families is not None:
            from moejax.data import instruct_synth

            for family in families:
                if family not in instruct_synth.FAMILIES:
                    raise ValueError(f"config.instruct_eval.families: unknown family {family!r}; "
                                     f"expected names from {list(instruct_synth.FAMILIES)}")


def _dtype(name):
    try:
        return jnp.dtype(name)
    except TypeError as error:
        raise ValueError(f"unknown dtype {name!r} (use e.g. 'float32' or 'bfloat16')") from error


def make_model_config(config) -> TransformerConfig:
    """The :class:`TransformerConfig` (with its :class:`MoEConfig`) that ``config`` describes."""
    model = dict(config.model)
    for key in ("dtype", "param_dtype"):
        if key in model:
            model[key] = _dtype(model[key])
    moe = None
    if config.moe is not None:
        moe = MoEConfig(d_model=model["d_model"], dtype=model.get("dtype", jnp.float32),
                        param_dtype=model.get("param_dtype", jnp.float32), **dict(config.moe))
    return TransformerConfig(vocab_size=data_lib.VOCAB_SIZE, max_len=config.seq_len, moe=moe,
                             **model)


def _describe_model(c: TransformerConfig) -> str:
    text = f"{c.num_layers} layers, d_model {c.d_model}, {c.num_heads} heads"
    if c.moe is None:
        return text + f", dense FFN {c.d_ff}"
    return (text + f", {c.num_moe_layers} MoE layers of {c.moe.num_experts} experts "
            f"(top-{c.moe.experts_per_token}, {c.moe.router}, {c.moe.dispatch})")


# ---------------------------------------------------------------------- model, state, step


class TrainSetup(NamedTuple):
    """What the update step closes over, and the initial state it updates.

    ``state`` = ``{"params", "rest" (non-parameter variables: router biases, tables), "opt_state",
    "step"}``, every array on its shards. ``rng_state`` holds the model's rng streams; the step
    feeds the routers explicit keys instead, so it never changes (and is not checkpointed).
    """

    graphdef: Any
    eval_graphdef: Any
    state: dict[str, Any]
    rng_state: Any
    tx: optax.GradientTransformation
    schedule: optax.Schedule
    num_params: int


def create_train_state(config, model_config: TransformerConfig, mesh, rules=None) -> TrainSetup:
    """The model initialised directly on its shards, and an optimizer state to match."""

    def make_model():
        return Transformer(model_config, rngs=nnx.Rngs(params=config.seed, router=config.seed + 1))

    model = parallel.create_sharded(make_model, mesh, rules)
    graphdef, params, rng_state, rest = nnx.split(model, nnx.Param, nnx.RngState, ...)
    model.eval()
    eval_graphdef = nnx.graphdef(model)
    schedule = make_schedule(config)
    tx = make_optimizer(config, schedule, params)
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    state = {"params": params, "rest": rest, "opt_state": _sharded_opt_init(tx, params, mesh),
             "step": jax.device_put(jnp.zeros((), jnp.int32), replicated)}
    num_params = sum(x.size for x in jax.tree.leaves(params))
    return TrainSetup(graphdef, eval_graphdef, state, rng_state, tx, schedule, num_params)


def make_train_step(setup: TrainSetup, base_key: jax.Array, *, router_bias_rate: float = 0.0):
    """``(state, rng_state, batch) -> (state, metrics)``: one AdamW step on CE + MoE aux losses.

    The routers' noise key is ``fold_in(base_key, step)``: a resumed run draws the same noise.
    ``router_bias_rate > 0`` (DeepSeek-V3 routers) then moves each router's bias against the
    step's expert load, outside the optimizer.
    """
    graphdef, tx, schedule = setup.graphdef, setup.tx, setup.schedule

    def loss_fn(params, rest, rng_state, batch, key):
        model = nnx.merge(graphdef, params, rng_state, rest)
        logits_BxLxV, aux = model(batch["inputs"], token_mask=_token_mask(batch), rngs=key)
        ce_sum, weight_sum = token_cross_entropy(logits_BxLxV, batch["targets"], batch["weights"])
        ce = ce_sum / jnp.maximum(weight_sum, 1.0)
        return ce + aux.total_loss, (ce, aux)

    def train_step(state, rng_state, batch):
        key = jax.random.fold_in(base_key, state["step"])
        grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
        (total, (ce, aux)), grads = grad_fn(state["params"], state["rest"], rng_state, batch, key)
        updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
        params = optax.apply_updates(state["params"], updates)
        rest = state["rest"]
        if router_bias_rate:
            model = nnx.merge(graphdef, params, rng_state, rest)
            model.update_router_biases(aux.metrics["tokens_per_expert"], router_bias_rate)
            rest = nnx.split(model, nnx.Param, nnx.RngState, ...)[3]
        new_state = dict(state, params=params, rest=rest, opt_state=opt_state,
                         step=state["step"] + 1)
        metrics = {"train_loss": ce, "train_aux_loss": aux.total_loss, "train_total_loss": total,
                   "grad_norm": optax.tree.norm(grads), "learning_rate": schedule(state["step"])}
        for name in ("load_cv", "router_entropy", "dropped_fraction"):
            if name in aux.metrics:
                metrics[f"train_{name}"] = aux.metrics[name]
        return new_state, metrics

    return train_step


# ---------------------------------------------------------------------- optimizer


def make_schedule(config) -> optax.Schedule:
    """Linear warmup to ``learning_rate``, then cosine decay to ``end_learning_rate_ratio`` of it."""
    opt = config.optimizer
    warmup = min(opt.warmup_steps, config.num_train_steps)
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=opt.learning_rate, warmup_steps=warmup,
        decay_steps=max(config.num_train_steps, warmup + 1),
        end_value=opt.learning_rate * opt.end_learning_rate_ratio)


def param_group(path) -> str:
    """``router``, ``experts`` (routed and shared experts) or ``non_expert``: what ``freeze`` names."""
    names = [str(getattr(k, "key", getattr(k, "name", k))) for k in path]
    if "router" in names:
        return "router"
    if "experts" in names or "shared" in names:
        return "experts"
    return "non_expert"


def make_optimizer(config, schedule, params) -> optax.GradientTransformation:
    """AdamW (decay on matrices only) after global-norm clipping; ``freeze`` zeroes a group's updates."""
    opt = config.optimizer
    decay_mask = jax.tree.map(lambda p: p.ndim >= 2, params)
    tx = optax.chain(
        optax.clip_by_global_norm(opt.grad_clip_norm),
        optax.adamw(schedule, b1=opt.b1, b2=opt.b2, eps=opt.eps, weight_decay=opt.weight_decay,
                    mask=decay_mask),
    )
    if config.freeze == "none":
        return tx
    labels = jax.tree_util.tree_map_with_path(
        lambda path, _: "frozen" if param_group(path) == config.freeze else "trained", params)
    return optax.multi_transform({"trained": tx, "frozen": optax.set_to_zero()}, labels)


def _sharded_opt_init(tx, params, mesh):
    """Optimizer state born on the shards of the parameters it mirrors (everything else replicated).

    A state leaf mirrors a parameter when its key path ends with the parameter's path and the
    shapes agree (Adam's moments; ``multi_transform`` nests them a few levels deeper).
    """
    by_path = {tuple(path): p for path, p in jax.tree_util.tree_leaves_with_path(params)}
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())

    def sharding(path, leaf):
        for start in range(len(path)):
            p = by_path.get(tuple(path[start:]))
            if p is not None and p.shape == leaf.shape:
                return p.sharding
        return replicated

    shardings = jax.tree_util.tree_map_with_path(sharding, jax.eval_shape(tx.init, params))
    return jax.jit(tx.init, out_shardings=shardings)(params)


def _train_part(state):
    return {k: v for k, v in state.items() if k != "params"}


def _token_mask(batch):
    """Real tokens of the inputs: padded instruction rows route no padding (packed text has none)."""
    return batch["inputs"] != data_lib.PAD_ID


def token_cross_entropy(logits_BxLxV, targets_BxL, weights_BxL):
    """``(sum of weighted token cross-entropies, sum of weights)``, in float32."""
    logits = logits_BxLxV.astype(jnp.float32)
    log_z_BxL = jax.nn.logsumexp(logits, axis=-1)
    target_logit_BxL = jnp.take_along_axis(logits, targets_BxL[..., None], axis=-1)[..., 0]
    weights = weights_BxL.astype(jnp.float32)
    return jnp.sum((log_z_BxL - target_logit_BxL) * weights), jnp.sum(weights)


# ---------------------------------------------------------------------- instruction tuning


def _instruct_families(config) -> tuple[str, ...]:
    from moejax.data import instruct_synth

    return tuple(config.instruct_eval.families or instruct_synth.HELD_OUT_FAMILIES)


def instruct_answer_loss(config, eval_step, state, rng_state, mesh, rules) -> dict[str, float]:
    """Mean answer-token cross-entropy (teacher forcing) per family of ``config.instruct_eval``.

    The same examples as the exact-match score; a continuous measure of how close a model is to the
    answers while exact match is still at zero. Batches of ``config.batch_size`` rows, the last one
    padded with rows of weight 0; each process feeds its block of every batch.
    """
    from moejax.data import instruct_synth

    ie = config.instruct_eval
    local = config.batch_size // jax.process_count()
    first = jax.process_index() * local
    blank = {key: np.zeros_like(value) for key, value in
             data_lib.instruct_row("", "", config.seq_len).items()}
    out = {}
    for family in _instruct_families(config):
        rows = [data_lib.instruct_row(prompt, answer, config.seq_len)
                for prompt, answer in instruct_synth.make_examples(family, ie.num_examples, ie.seed)]
        ce_sum = weight_sum = 0.0
        for start in range(0, len(rows), config.batch_size):
            chunk = rows[start:start + config.batch_size]
            chunk += [blank] * (config.batch_size - len(chunk))
            mine = chunk[first:first + local]
            batch = {key: np.stack([row[key] for row in mine]) for key in blank}
            sums = jax.device_get(eval_step(state["params"], state["rest"], rng_state,
                                            parallel.shard_batch(batch, mesh, rules)))
            ce_sum += float(sums["ce_sum"])
            weight_sum += float(sums["weight_sum"])
        out[f"eval_answer_loss/{family}"] = ce_sum / weight_sum
    return out


def instruct_accuracy(config, eval_graphdef, state, rng_state) -> dict[str, float]:
    """Exact-match accuracy of greedy answers for each family of ``config.instruct_eval``."""
    from moejax.data import instruct_synth

    ie = config.instruct_eval
    families = _instruct_families(config)
    model = nnx.merge(eval_graphdef, state["params"], rng_state, state["rest"])

    def generate(prompts):
        ids = [data_lib.encode(p, bos=True) for p in prompts]
        outs = greedy_generate(model, ids, max_new_tokens=ie.max_new_tokens,
                               length=config.seq_len, eos_id=data_lib.EOS_ID,
                               pad_id=data_lib.PAD_ID)
        return [data_lib.decode(o) for o in outs]

    return {f"eval_exact_match/{family}": instruct_synth.exact_match_accuracy(
        generate, family, ie.num_examples, ie.seed) for family in families}


# ---------------------------------------------------------------------- processes, files, signals


def _maybe_initialize_distributed(config) -> None:
    """``jax.distributed.initialize`` when a multi-process job is configured or detected.

    Explicit: ``config.distributed`` (coordinator_address, num_processes, process_id) or the
    ``JAX_COORDINATOR_ADDRESS`` / ``JAX_NUM_PROCESSES`` / ``JAX_PROCESS_ID`` variables. Detected:
    multi-host TPU slices and SLURM / Open MPI jobs of more than one task (JAX reads their settings).
    On CPU the collectives go through gloo.
    """
    if jax.distributed.is_initialized():
        return
    explicit = dict(config.distributed or {})
    address = explicit.get("coordinator_address") or os.environ.get("JAX_COORDINATOR_ADDRESS")
    detected = (
        "," in os.environ.get("TPU_WORKER_HOSTNAMES", "")
        or int(os.environ.get("SLURM_NTASKS", "1")) > 1
        or int(os.environ.get("OMPI_COMM_WORLD_SIZE", "1")) > 1
    )
    if not address and not detected:
        return
    if os.environ.get("JAX_PLATFORMS", "").startswith("cpu"):
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    if address:
        num_processes = explicit.get("num_processes") or int(os.environ["JAX_NUM_PROCESSES"])
        process_id = explicit.get("process_id")
        if process_id is None:
            process_id = int(os.environ["JAX_PROCESS_ID"])
        jax.distributed.initialize(address, num_processes=num_processes, process_id=process_id)
    else:
        jax.distributed.initialize()


def _check_workdir(workdir: epath.Path) -> None:
    try:
        workdir.mkdir(parents=True, exist_ok=True)
        probe = workdir / f".write_probe_{jax.process_index()}"
        probe.write_text("ok")
        probe.unlink()
    except OSError as error:
        raise ValueError(f"workdir {workdir} is not writable ({error.strerror or error})") from error


def _checkpoint_dir_of(path: str) -> epath.Path:
    """A run's workdir or its ``checkpoints`` directory (either may be a URI) -> the checkpoints
    directory."""
    path = paths.resolve(path)
    inner = path / "checkpoints"
    return inner if inner.is_dir() else path


def _axes(entry) -> tuple[str, ...]:
    if entry is None:
        return ()
    return (entry,) if isinstance(entry, str) else tuple(entry)


class _StopSignal:
    """SIGTERM -> stop at the next step boundary (all processes agree on the step)."""

    def __init__(self):
        self._received = False
        self._previous = None

    def __enter__(self):
        def handler(signum, frame):
            del signum, frame
            self._received = True

        self._previous = signal.signal(signal.SIGTERM, handler)
        return self

    def __exit__(self, *exc):
        signal.signal(signal.SIGTERM, self._previous)

    def requested(self, step: int) -> bool:
        if jax.process_count() == 1:
            return self._received
        from jax.experimental import multihost_utils

        flag = np.asarray([self._received], np.int32)
        return bool(multihost_utils.process_allgather(flag).max()) if step % 10 == 0 else False


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
