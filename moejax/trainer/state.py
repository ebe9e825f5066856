"""Model, optimizer and their shards: ``setup(config)`` gives everything a training step needs.

The same recipe serves the trainer, ``experiments/run_sweep.py`` and ``benchmarks/train.py``: the
config completed and checked, the model config, the mesh, the model initialised directly on its
shards and an optimizer state born on the shards of the parameters it mirrors.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import optax
from flax import nnx

from moejax import data as data_lib
from moejax import parallel
from moejax.models.transformer import Transformer, TransformerConfig
from moejax.trainer.config import complete_config, get_tokenizer, make_model_config


class TrainSetup(NamedTuple):
    """What the update step closes over, and the initial state it updates.

    ``state`` = ``{"params", "rest" (non-parameter variables: router biases, tables), "opt_state",
    "step", "nonfinite_steps" (steps skipped for a non-finite loss or gradient)}``, every array on
    its shards. ``rng_state`` holds the model's rng streams; the step feeds the routers explicit keys
    instead, so it never changes (and is not checkpointed).
    """

    config: ml_collections.ConfigDict
    tokenizer: data_lib.Tokenizer
    model_config: TransformerConfig
    mesh: jax.sharding.Mesh
    rules: tuple | None
    graphdef: Any
    eval_graphdef: Any
    state: dict[str, Any]
    rng_state: Any
    tx: optax.GradientTransformation
    schedule: optax.Schedule
    num_params: int


def setup(config, *, mesh: jax.sharding.Mesh | None = None,
          tokenizer: data_lib.Tokenizer | None = None) -> TrainSetup:
    """Completes ``config`` and builds the sharded model and optimizer state it describes.

    ``mesh`` defaults to ``config.mesh`` over all devices; ``tokenizer`` to
    ``get_tokenizer(config)`` (the model's vocabulary is ``config.vocab_size`` or the tokenizer's). Call it inside
    ``parallel.use_mesh(setup.mesh, setup.rules)`` when the model's code needs the mesh later
    (the trainer does); the state itself is already on its shards.
    """
    config = complete_config(config)
    if tokenizer is None:
        tokenizer = get_tokenizer(config)
    model_config = make_model_config(config, tokenizer)
    if mesh is None:
        mesh = parallel.make_mesh(**dict(config.mesh))
    rules = tuple(tuple(rule) for rule in config.sharding_rules) if config.sharding_rules else None
    check_batch_split(config, mesh, rules)

    def make_model():
        return Transformer(model_config, rngs=nnx.Rngs(params=config.seed, router=config.seed + 1))

    with parallel.use_mesh(mesh, rules):
        model = parallel.create_sharded(make_model, mesh, rules)
        graphdef, params, rng_state, rest = nnx.split(model, nnx.Param, nnx.RngState, ...)
        model.eval()
        eval_graphdef = nnx.graphdef(model)
        schedule = make_schedule(config)
        tx = make_optimizer(config, schedule, params)
        replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
        state = {"params": params, "rest": rest, "opt_state": _sharded_opt_init(tx, params, mesh),
                 "step": jax.device_put(jnp.zeros((), jnp.int32), replicated),
                 "nonfinite_steps": jax.device_put(jnp.zeros((), jnp.int32), replicated)}
    num_params = sum(x.size for x in jax.tree.leaves(params))
    return TrainSetup(config, tokenizer, model_config, mesh, rules, graphdef, eval_graphdef, state, rng_state,
                      tx, schedule, num_params)


def check_batch_split(config, mesh, rules) -> None:
    """The global batch splits evenly over the data-parallel devices and over the processes."""
    spec = parallel.batch_sharding(mesh, rules).spec[0]
    axes = () if spec is None else (spec,) if isinstance(spec, str) else tuple(spec)
    parts = math.prod(mesh.shape[a] for a in axes)
    if config.batch_size % parts:
        raise ValueError(
            f"batch_size = {config.batch_size} is not divisible by the data-parallel size "
            f"{parts} (mesh {dict(mesh.shape)}, batch split over {axes})")
    if config.batch_size % jax.process_count():
        raise ValueError(f"batch_size = {config.batch_size} is not divisible by the number of "
                         f"processes {jax.process_count()}")


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
