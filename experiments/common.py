"""What experiment configs share: the trainer's defaults, one argument parser, the sweeps' small LM.

Every config file starts from :func:`base` (the trainer's full schema at its defaults, locked: any key
can then be overridden on the command line, a misspelt one is an error), fills ``model`` / ``moe``
with :func:`model` / :func:`moe` (every field of the model's dataclasses) and reads its
``config.py:key=value,...`` argument with :func:`parse_arg`.

A sweep config (``experiments/s1_balancing.py``, ...) is an ml_collections config file with
``get_config(arg)`` for one run (so ``python -m moejax.main --config=experiments/s1_balancing.py:seed=1``
trains it alone) and ``sweep(size)`` listing the runs that ``experiments/run_sweep.py`` executes.

Sizes: ``micro`` (2 steps; the tests), ``small`` (the committed results: minutes on 2 CPU cores),
``long`` (the small model trained 4x longer, 1000 steps: the check of whether a trend changes with
training length) and ``full`` (d_model 128, 4 layers, sequence 128, batch 32, 2000 steps; hours on 2
CPU cores, not run here).
"""

from __future__ import annotations

from typing import NamedTuple

import ml_collections

from moejax.trainer.config import default_config, model_fields, moe_fields

SIZES = ("micro", "small", "long", "full")

# The platform's grouped-matmul backend (the XLA-only ``cpu`` path on a CPU).
GMM_BACKEND = "auto"

# size -> (seq_len, batch_size, num_train_steps, d_model, num_layers, num_heads, warmup, eval_batches)
_SHAPES = {
    "micro": (16, 8, 2, 32, 2, 2, 1, 1),
    "small": (64, 16, 250, 64, 2, 2, 25, 8),
    "long": (64, 16, 1000, 64, 2, 2, 100, 8),
    "full": (128, 32, 2000, 128, 4, 4, 100, 16),
}


class Run(NamedTuple):
    """One run of a sweep: ``name`` (unique, a file name), ``group`` (seeds of one setting share it),
    ``seed`` and ``arg`` (the string that ``get_config`` of the sweep's config file takes)."""

    name: str
    group: str
    seed: int
    arg: str


def base() -> ml_collections.ConfigDict:
    """Every trainer key at its default, locked; set ``model`` (and ``moe``) with the helpers below."""
    return default_config()


def model(**fields) -> dict:
    """Every ``TransformerConfig`` field of ``config.model`` at its default, updated by ``fields``."""
    return model_fields(**fields)


def moe(**fields) -> dict:
    """Every ``MoEConfig`` field of ``config.moe`` at its default, updated by ``fields``."""
    return moe_fields(**fields)


def parse_arg(arg: str | None, defaults: dict[str, str], config_name: str) -> dict[str, str]:
    """``"a=1,b=x"`` over ``defaults``; an unknown key or a malformed part raises a ValueError."""
    args = dict(defaults)
    for part in (arg or "").split(","):
        if not part:
            continue
        if "=" not in part:
            raise ValueError(f"{config_name}: config argument {part!r} is not key=value")
        key, value = part.split("=", 1)
        if key not in defaults:
            raise ValueError(f"{config_name}: unknown config argument {key!r}; known: "
                             f"{', '.join(sorted(defaults))}")
        args[key] = value
    if args.get("size", "small") not in SIZES:
        raise ValueError(f"{config_name}: size must be one of {SIZES}, got {args['size']!r}")
    return args


def truthy(value: str) -> bool:
    """A config argument's yes (``1``, ``true``, ``yes``, any case)."""
    return value.lower() in ("1", "true", "yes")


def base_config(size: str, seed: int, *, d_ff_multiple: int = 4,
                moe_every: int = 2) -> ml_collections.ConfigDict:
    """The small byte-level LM on ``stdlib_text`` that every sweep trains; ``config.moe`` is unset.

    Evaluation and the only checkpoint come at the last step (the runner reads the final numbers).
    """
    seq_len, batch, steps, d_model, layers, heads, warmup, eval_batches = _SHAPES[size]
    config = base()
    config.dataset = "stdlib_text"
    config.seq_len = seq_len
    config.batch_size = batch
    config.num_train_steps = steps
    config.seed = seed
    config.model = model(d_model=d_model, num_layers=layers, num_heads=heads,
                         d_ff=d_ff_multiple * d_model, moe_every=moe_every)
    config.optimizer.update(learning_rate=3e-3, warmup_steps=warmup, end_learning_rate_ratio=0.1,
                            weight_decay=0.1, b1=0.9, b2=0.95, grad_clip_norm=1.0)
    config.log_every_steps = 1 if size == "micro" else 10
    config.eval_every_steps = steps
    config.eval_batches = eval_batches
    config.checkpoint_every_steps = steps
    config.keep_checkpoints = 1
    config.progress_bar = False
    return config


def seeds_for(size: str, count: int) -> range:
    """``count`` seeds, one for ``micro`` (the tests only check that a sweep builds and runs)."""
    return range(1 if size == "micro" else count)
