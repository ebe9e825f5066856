"""The update and evaluation steps, as plain functions of arrays (``jit_*`` bind them to a setup).

Every update checks, on the device, that its loss and gradient norm are finite. A non-finite step
applies no update (parameters, optimizer state and router biases stay as they were) and counts
itself in ``state["nonfinite_steps"]``; the loop reads that one scalar every step and decides
whether to stop. So no state with a non-finite step in it ever exists, let alone gets checkpointed.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from moejax.trainer.state import TrainSetup


def token_cross_entropy(logits_BxLxV, targets_BxL, weights_BxL):
    """``(sum of weighted token cross-entropies, sum of weights)``, in float32."""
    logits = logits_BxLxV.astype(jnp.float32)
    log_z_BxL = jax.nn.logsumexp(logits, axis=-1)
    target_logit_BxL = jnp.take_along_axis(logits, targets_BxL[..., None], axis=-1)[..., 0]
    weights = weights_BxL.astype(jnp.float32)
    return jnp.sum((log_z_BxL - target_logit_BxL) * weights), jnp.sum(weights)


def _loss(params, rest, rng_state, batch, key, *, graphdef, pad_id):
    # Fresh Variables at this trace level for the state ``grad`` does not differentiate:
    # ``nnx.merge`` keeps the Variable objects it is given, and ``nnx.scan`` (scan_layers) refuses
    # Variables of the enclosing ``jit``'s level (DeepSeek-V3's router biases live in ``rest``).
    rest, rng_state = jax.tree.map(lambda x: x, (rest, rng_state))
    model = nnx.merge(graphdef, params, rng_state, rest)
    # Padding (instruction rows) is routed nowhere and counts in no MoE loss or metric.
    logits_BxLxV, aux = model(batch["inputs"], token_mask=batch["inputs"] != pad_id, rngs=key)
    ce_sum, weight_sum = token_cross_entropy(logits_BxLxV, batch["targets"], batch["weights"])
    ce = ce_sum / jnp.maximum(weight_sum, 1.0)
    return ce + aux.total_loss, (ce, aux)


def train_step(state, rng_state, batch, *, graphdef, tx, schedule, base_key, pad_id,
               router_bias_rate=0.0):
    """``(state, metrics)`` after one AdamW step on CE + MoE aux losses (none if non-finite).

    The routers' noise key is ``fold_in(base_key, step)``: a resumed run draws the same noise.
    ``router_bias_rate > 0`` (DeepSeek-V3 routers) then moves each router's bias against the
    step's expert load, outside the optimizer.
    """
    key = jax.random.fold_in(base_key, state["step"])
    grad_fn = jax.value_and_grad(functools.partial(_loss, graphdef=graphdef, pad_id=pad_id),
                                 has_aux=True)
    (total, (ce, aux)), grads = grad_fn(state["params"], state["rest"], rng_state, batch, key)
    grad_norm = optax.tree.norm(grads)
    finite = jnp.isfinite(total) & jnp.isfinite(grad_norm)
    updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
    params = optax.apply_updates(state["params"], updates)
    rest = state["rest"]
    if router_bias_rate:
        model = nnx.merge(graphdef, params, rng_state, rest)
        model.update_router_biases(aux.metrics["tokens_per_expert"], router_bias_rate)
        rest = nnx.split(model, nnx.Param, nnx.RngState, ...)[3]
    keep = lambda new, old: jnp.where(finite, new, old)  # noqa: E731
    new_state = dict(state, params=jax.tree.map(keep, params, state["params"]),
                     rest=jax.tree.map(keep, rest, state["rest"]),
                     opt_state=jax.tree.map(keep, opt_state, state["opt_state"]),
                     step=state["step"] + 1,
                     nonfinite_steps=state["nonfinite_steps"] + (~finite).astype(jnp.int32))
    metrics = {"train_loss": ce, "train_aux_loss": aux.total_loss, "train_total_loss": total,
               "grad_norm": grad_norm, "learning_rate": schedule(state["step"]),
               "nonfinite_steps": new_state["nonfinite_steps"]}
    for name in ("load_cv", "router_entropy", "dropped_fraction"):
        if name in aux.metrics:
            metrics[f"train_{name}"] = aux.metrics[name]
    return new_state, metrics


def eval_step(params, rest, rng_state, batch, *, graphdef, pad_id):
    """Summed token cross-entropy and weights of ``batch``, and the MoE layers' load metrics."""
    model = nnx.merge(graphdef, params, rng_state, rest)
    logits_BxLxV, aux = model(batch["inputs"], token_mask=batch["inputs"] != pad_id)
    ce_sum, weight_sum = token_cross_entropy(logits_BxLxV, batch["targets"], batch["weights"])
    out = {"ce_sum": ce_sum, "weight_sum": weight_sum}
    for name in ("tokens_per_expert", "dropped_fraction"):
        if name in aux.metrics:
            out[name] = aux.metrics[name]
    return out


def jit_train_step(setup: TrainSetup, *, donate: bool = True):
    """``train_step`` bound to ``setup`` and jitted: ``(state, rng_state, batch) -> (state, metrics)``."""
    config, moe = setup.config, setup.model_config.moe
    uses_bias = moe is not None and moe.router == "deepseek_v3"
    shardings = jax.tree.map(lambda x: x.sharding, setup.state)
    step = functools.partial(
        train_step, graphdef=setup.graphdef, tx=setup.tx, schedule=setup.schedule,
        base_key=jax.random.key(config.seed + 2), pad_id=setup.tokenizer.pad_id,
        router_bias_rate=config.router_bias_update_rate if uses_bias else 0.0)
    return jax.jit(step, donate_argnums=0 if donate else (), out_shardings=(shardings, None))


def jit_eval_step(setup: TrainSetup):
    """``eval_step`` bound to ``setup`` and jitted: ``(params, rest, rng_state, batch) -> sums``."""
    return jax.jit(functools.partial(eval_step, graphdef=setup.eval_graphdef,
                                     pad_id=setup.tokenizer.pad_id))
