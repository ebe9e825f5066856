"""Train and evaluate image classifiers (:class:`moejax.models.vit.ViT`) on TFDS image datasets.

```python
from moejax import vision
from moejax.models import vit

config = vit.ViTConfig(image_size=8, channels=1, patch_size=2, num_classes=10, d_model=64,
                       num_layers=4, num_heads=4, d_ff=128,
                       moe=vit.vmoe_config(64, 64, num_experts=8, capacity_factor=1.0))
model = vit.ViT(config, rngs=nnx.Rngs(0))
history = vision.train(model, dataset="digits_images", steps=600)
print(vision.evaluate(model, dataset="digits_images", split="test"))
```

The objective is the softmax cross-entropy of the labels plus the MoE layers' weighted auxiliary
losses; AdamW with linear warm-up and cosine decay, gradients clipped to global norm 1.
:func:`expert_by_class` tabulates which experts each class's patches go to (V-MoE's question:
do experts specialise?).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from moejax.data.images import create_image_iterator
from moejax.models.vit import ViT


def _loss(model: ViT, images, labels, key):
    logits, aux = model(images, rngs=key, deterministic=False)
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
    return ce + aux.total_loss, (ce, aux)


@nnx.jit
def _train_step(model: ViT, optimizer: nnx.Optimizer, images, labels, key):
    (loss, (ce, aux)), grads = nnx.value_and_grad(_loss, has_aux=True)(model, images, labels, key)
    # optax's schedules and bias correction mix int32 step counts with floats.
    with jax.numpy_dtype_promotion("standard"):
        optimizer.update(model, grads)
    dropped = aux.metrics.get("dropped_fraction", jnp.zeros((1,), jnp.float32))
    return {"loss": loss, "cross_entropy": ce, "aux_loss": aux.total_loss,
            "dropped_fraction": jnp.mean(dropped)}


@nnx.jit
def _eval_step(model: ViT, images, labels):
    logits, aux = model(images, deterministic=True)
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
    dropped = aux.metrics.get("dropped_fraction", jnp.zeros((1,), jnp.float32))
    return (jnp.sum(ce), jnp.sum(jnp.argmax(logits, axis=-1) == labels),
            jnp.mean(dropped) * labels.shape[0])


def make_optimizer(model: ViT, *, steps: int, learning_rate: float = 3e-3,
                   warmup_steps: int = 50, weight_decay: float = 0.05) -> nnx.Optimizer:
    """AdamW (decay on matrices only), linear warm-up then cosine decay to 0, clipping at norm 1."""
    for name, value, low in (("steps", steps, 1), ("warmup_steps", warmup_steps, 0)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
    if warmup_steps >= steps:
        raise ValueError(f"warmup_steps = {warmup_steps} must be < steps = {steps}")
    if not learning_rate > 0 or not weight_decay >= 0:
        raise ValueError(f"learning_rate must be > 0 and weight_decay >= 0, got {learning_rate}, "
                         f"{weight_decay}")
    schedule = optax.warmup_cosine_decay_schedule(0.0, learning_rate, warmup_steps, steps)
    def decay_mask(params):
        return jax.tree.map(lambda p: p.ndim >= 2, params)

    tx = optax.chain(optax.clip_by_global_norm(1.0),
                     optax.adamw(schedule, weight_decay=weight_decay, mask=decay_mask))
    return nnx.Optimizer(model, tx, wrt=nnx.Param)


def train(model: ViT, *, dataset: str = "digits_images", split: str = "train", steps: int = 600,
          batch_size: int = 64, learning_rate: float = 3e-3, warmup_steps: int = 50,
          weight_decay: float = 0.05, seed: int = 0, data_dir: str | None = None,
          eval_every: int = 0, eval_split: str = "test",
          log: Callable[[str], Any] | None = print) -> list[dict[str, float]]:
    """Trains ``model`` in place for ``steps`` steps; returns one row of metrics per step.

    With ``eval_every > 0`` the rows of every ``eval_every``-th step (and the last) also hold
    ``eval_accuracy`` and ``eval_loss`` on ``eval_split``.
    """
    optimizer = make_optimizer(model, steps=steps, learning_rate=learning_rate,
                               warmup_steps=warmup_steps, weight_decay=weight_decay)
    batches = create_image_iterator(dataset, split=split, batch_size=batch_size, seed=seed,
                                    data_dir=data_dir)
    _check_shapes(model, batches.image_shape, batches.num_classes, dataset)
    key = jax.random.key(seed)
    history = []
    start = time.perf_counter()
    for step in range(1, steps + 1):
        batch = next(batches)
        metrics = _train_step(model, optimizer, jnp.asarray(batch["images"]),
                              jnp.asarray(batch["labels"]), jax.random.fold_in(key, step))
        row = {"step": step, **{k: float(v) for k, v in metrics.items()}}
        if not np.isfinite(row["loss"]):
            raise FloatingPointError(f"training loss is {row['loss']} at step {step}")
        if eval_every and (step % eval_every == 0 or step == steps):
            result = evaluate(model, dataset=dataset, split=eval_split, data_dir=data_dir)
            row.update(eval_accuracy=result["accuracy"], eval_loss=result["loss"])
            if log is not None:
                log(f"step {step:5d}  loss {row['loss']:.4f}  eval accuracy "
                    f"{result['accuracy']:.4f}  ({time.perf_counter() - start:.0f} s)")
        history.append(row)
    return history


def evaluate(model: ViT, *, dataset: str = "digits_images", split: str = "test",
             data_dir: str | None = None, batch_size: int = 40) -> dict[str, float]:
    """Accuracy, mean cross-entropy and mean dropped fraction over the whole split (one epoch).

    The last partial batch is dropped: ``batch_size`` should divide the split's size (360 test
    images of ``digits_images`` for the default 40).
    """
    batches = create_image_iterator(dataset, split=split, batch_size=batch_size, shuffle=False,
                                    num_epochs=1, data_dir=data_dir)
    _check_shapes(model, batches.image_shape, batches.num_classes, dataset)
    total_ce = correct = dropped = 0.0
    count = 0
    for batch in batches:
        ce, right, drop = _eval_step(model, jnp.asarray(batch["images"]),
                                     jnp.asarray(batch["labels"]))
        total_ce += float(ce)
        correct += float(right)
        dropped += float(drop)
        count += len(batch["labels"])
    if count == 0:
        raise ValueError(f"split {split!r} of {dataset!r} has fewer than batch_size = "
                         f"{batch_size} images")
    return {"accuracy": correct / count, "loss": total_ce / count,
            "dropped_fraction": dropped / count, "examples": count}


def expert_by_class(model: ViT, images, labels, num_classes: int) -> np.ndarray:
    """``[num_moe_layers, num_classes, num_experts]``: the fraction of the class's patch copies
    that each expert processes (copies dropped by capacity count for no expert, so a row sums to
    1 minus the class's dropped fraction)."""
    routes = model.routes(jnp.asarray(images))
    labels = np.asarray(labels)
    table = []
    for route in routes:
        experts = np.asarray(route["experts"])
        kept = np.asarray(route["kept"]) & (np.asarray(route["weights"]) != 0)
        num_experts = model.moe_layers()[len(table)].config.num_experts
        layer = np.zeros((num_classes, num_experts))
        for c in range(num_classes):
            rows = labels == c
            if not rows.any():
                continue
            chosen = experts[rows][kept[rows]]
            layer[c] = np.bincount(chosen, minlength=num_experts) / kept[rows].size
        table.append(layer)
    return np.stack(table)


def _check_shapes(model: ViT, image_shape, num_classes: int, dataset: str) -> None:
    c = model.config
    if tuple(image_shape) != (c.image_size, c.image_size, c.channels):
        raise ValueError(f"{dataset!r} has images of shape {tuple(image_shape)}; the model expects "
                         f"{(c.image_size, c.image_size, c.channels)}")
    if num_classes != c.num_classes:
        raise ValueError(f"{dataset!r} has {num_classes} classes; the model's num_classes is "
                         f"{c.num_classes}")
