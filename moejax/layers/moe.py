"""The MoE layer (flax.nnx): a router, E experts, a dispatch mode, optional shared experts.

``y, aux = moe(x)`` for ``x`` of shape ``[..., d_model]``. ``aux.losses`` holds the router's auxiliary
losses already multiplied by their ``MoEConfig`` weights (``aux.total_loss`` is their sum, to add to
the caller's loss); ``aux.metrics`` holds per-expert load, max/mean load, load CV, router entropy and
the fraction of token copies dropped by capacity (0 for dense and dropless dispatch).

Under ``moejax.parallel.use_mesh``, dropless and capacity dispatch run per device with the experts
split over the ``expert`` mesh axis (``moejax.parallel.expert``); capacity then applies to each
device's tokens (GShard's groups), so it drops exactly as on one device only when nothing drops.

``moe(x, token_mask=mask)`` (bool, x's batch shape, True = a real token) leaves padding out: a masked
token is dispatched to no expert (takes no capacity slot), its output is exactly 0 (shared experts
included) and it counts in no auxiliary loss and no metric (means run over the real tokens).
Capacity dispatch keeps its static buffer ``C`` from all T tokens, so masked tokens leave slots free
for real ones; expert choice fills ``expert_choice_capacity`` of the real-token count per expert.
An input without tokens (a zero-size batch dimension) gives an empty output and the auxiliary losses
and metrics of a batch whose tokens are all masked: zeros, every one finite, on every router.

Train/eval follows NNX: ``moe.train()`` / ``moe.eval()`` and ``nnx.view(model, deterministic=True)``
set ``Router.deterministic``; routing noise and input jitter are drawn only in training, from the
``MoEConfig.rng_stream`` stream (default ``router``), else ``dropout``, else ``nnx.Rngs``' default.

With ``MoEConfig.sow_aux`` the layer also sows its weighted aux loss and metrics (``nnx.capture``
collects them, or they stay on the layer); :func:`collect_aux` sums them over a whole model.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from moejax.layers.config import LOSS_WEIGHT_FIELDS, MoEConfig
from moejax.layers.experts import Experts, SharedExperts
from moejax.layers.params import logical_param, param
from moejax.ops import dispatch as dispatch_ops
from moejax.ops import dropless as dropless_ops
from moejax.ops import routing as R
from moejax.ops.routing.common import zero_masked
from moejax.parallel import (
    capacity_expert_parallel,
    constrain,
    dropless_expert_parallel,
    expert_parallel_layout,
)
from moejax.parallel.mesh import current_rules, fallback_rules, like, replicated

NOISY_ROUTERS = ("noisy_top_k", "hierarchical_noisy_top_k")
# Names of the sown intermediates (MoEConfig.sow_aux).
AUX_LOSS = "moe_aux_loss"
AUX_METRICS = "moe_aux_metrics"


class MoEAux(NamedTuple):
    """What an MoE layer returns beside its output: weighted losses and routing metrics."""

    losses: dict[str, jax.Array]
    metrics: dict[str, jax.Array]

    @property
    def total_loss(self) -> jax.Array:
        return sum(self.losses.values(), jnp.zeros((), jnp.float32))


def router_needs_rng(config: MoEConfig, train: bool) -> bool:
    """Whether routing in this mode draws random numbers (routing noise, GShard's second-choice
    sampling, input jitter)."""
    return train and (config.router in NOISY_ROUTERS or config.router_jitter > 0
                      or (config.router == "gshard" and config.gshard_policy != "all"))


def rng_stream_name(config: MoEConfig, available) -> str | None:
    """The rng stream routing noise is drawn from: ``config.rng_stream`` when the host provides it,
    else ``dropout``, else ``default`` (``nnx.Rngs(0)``); None when there is none of them.

    ``available`` is an ``nnx.Rngs`` or the names of the host's streams. Membership is checked by
    name: ``nnx.Rngs`` would otherwise hand out its ``default`` stream for any missing name.
    """
    names = set(available) if not isinstance(available, nnx.Rngs) else {
        n for n in (config.rng_stream, "dropout", "default") if n in available}
    for name in (config.rng_stream, "dropout", "default"):
        if name in names:
            return name
    return None


def missing_stream_message(config: MoEConfig) -> str:
    return (
        f"router={config.router!r} draws random numbers in training (noise, jitter or sampling) "
        f"but the host provides no rng stream {config.rng_stream!r} (MoEConfig.rng_stream) nor "
        "'dropout': pass one (nnx.Rngs(router=...), or rngs={'router': key} in Linen apply), or "
        "evaluate (deterministic=True, model.eval() or nnx.view(model, deterministic=True))"
    )


@nnx.register_variable_name("router_bias")
class RouterBias(nnx.Variable):
    """DeepSeek-V3's balancing bias: state updated by ``MoE.update_router_bias``, not by the optimiser."""


@nnx.register_variable_name("router_table")
class RouterTable(nnx.Variable):
    """The hash router's fixed token-id -> expert table (never trained)."""


class RouteInputs(NamedTuple):
    """What a router adapter routes: tokens in f32 (jittered in training), the noise key (None when
    the router draws nothing) and the per-token extras."""

    x_TxD: jax.Array
    key: jax.Array | None
    train: bool
    token_ids_T: jax.Array | None
    token_mask_T: jax.Array | None
    sequence_length: int | None


class RouterAdapter(NamedTuple):
    """One router of the layer: its parameters (``make(config, rngs, rules)`` -> attribute name ->
    variable) and its call (``route(router, inputs)`` -> ``Routing``)."""

    make: Callable[..., dict[str, nnx.Variable]]
    route: Callable[["Router", RouteInputs], Any]


ROUTERS: dict[str, RouterAdapter] = {}


def _logits_params(config, rngs, rules):
    d, e = config.d_model, config.num_experts
    return {"w_router": param(rngs, (d, e), d, ("embed", "expert"), config.param_dtype, rules)}


def register_router(name: str, make=_logits_params):
    """Registers ``route`` as router ``name`` of the layer (logits routers keep the default
    ``make``: one ``w_router`` [D, E]). The math itself lives in ``moejax.ops.routing``."""
    def decorate(route):
        ROUTERS[name] = RouterAdapter(make, route)
        return route
    return decorate


def _noisy_params(config, rngs, rules):
    d, e, dt = config.d_model, config.num_experts, config.param_dtype
    # Zero-initialised, as Shazeer et al. prescribe: equal gates and unit-free noise at the start.
    return {name: logical_param(jnp.zeros((d, e), dt), ("embed", "expert"), rules)
            for name in ("w_gate", "w_noise")}


def _hierarchical_params(config, rngs, rules):
    d, a, dt = config.d_model, config.num_expert_groups, config.param_dtype
    b = config.num_experts // a
    shapes = {"w_gate_primary": ((d, a), ("embed", None)),
              "w_noise_primary": ((d, a), ("embed", None)),
              "w_gate_secondary": ((a, d, b), (None, "embed", None)),
              "w_noise_secondary": ((a, d, b), (None, "embed", None))}
    return {name: logical_param(jnp.zeros(shape, dt), axes, rules)
            for name, (shape, axes) in shapes.items()}


def _hash_params(config, rngs, rules):
    return {"table": RouterTable(R.make_hash_table(config.hash_vocab_size, config.num_experts,
                                                   config.hash_seed))}


def _deepseek_params(config, rngs, rules):
    return dict(_logits_params(config, rngs, rules),
                bias=RouterBias(jnp.zeros((config.num_experts,), jnp.float32)))


@register_router("noisy_top_k", make=_noisy_params)
def _noisy_top_k(router, i):
    return R.noisy_top_k(i.x_TxD, router._w("w_gate"), router._w("w_noise"),
                         router.config.experts_per_token, key=i.key, train=i.train,
                         token_mask=i.token_mask_T)


@register_router("hierarchical_noisy_top_k", make=_hierarchical_params)
def _hierarchical(router, i):
    c = router.config
    k_primary = c.topk_groups or 1
    return R.hierarchical_noisy_top_k(
        i.x_TxD, router._w("w_gate_primary"), router._w("w_noise_primary"),
        router._w("w_gate_secondary"), router._w("w_noise_secondary"),
        k_primary, c.experts_per_token // k_primary, key=i.key, train=i.train,
        token_mask=i.token_mask_T)


@register_router("hash", make=_hash_params)
def _hash(router, i):
    if i.token_ids_T is None:
        raise ValueError("router='hash' routes by token id: call moe(x, token_ids=...)")
    c = router.config
    return R.hash_route(i.token_ids_T, router.table[...], c.experts_per_token,
                        num_experts=c.num_experts, token_mask=i.token_mask_T)


@register_router("softmax")
def _softmax(router, i):
    return R.softmax(router.logits(i.x_TxD), token_mask=i.token_mask_T)


@register_router("top_k")
def _top_k(router, i):
    c = router.config
    return R.top_k(router.logits(i.x_TxD), c.experts_per_token, renormalize=c.renormalize,
                   token_mask=i.token_mask_T)


@register_router("switch")
def _switch(router, i):
    return R.switch(router.logits(i.x_TxD), token_mask=i.token_mask_T)


@register_router("mixtral")
def _mixtral(router, i):
    return R.mixtral(router.logits(i.x_TxD), router.config.experts_per_token,
                     token_mask=i.token_mask_T)


@register_router("gshard")
def _gshard(router, i):
    policy = router.config.gshard_policy if i.train else "all"
    return R.gshard(router.logits(i.x_TxD), policy=policy, key=i.key, token_mask=i.token_mask_T)


@register_router("deepseek_v3", make=_deepseek_params)
def _deepseek_v3(router, i):
    c = router.config
    return R.deepseek_v3(
        router.logits(i.x_TxD), c.experts_per_token, router.bias[...],
        routed_scaling_factor=c.routed_scaling_factor, num_groups=c.num_expert_groups,
        topk_groups=c.topk_groups, sequence_length=i.sequence_length,
        token_mask=i.token_mask_T)


@register_router("expert_choice")
def _expert_choice(router, i):
    c = router.config
    capacity = R.expert_choice_capacity(i.x_TxD.shape[0], c.num_experts, c.capacity_factor)
    active = None if i.token_mask_T is None else R.expert_choice_active_capacity(
        i.token_mask_T, c.num_experts, c.capacity_factor)
    # Each expert picks from every token of the batch: the logits whole on every device.
    mask = None if i.token_mask_T is None else replicated(i.token_mask_T)
    return R.expert_choice(replicated(router.logits(i.x_TxD)), capacity, active_capacity=active,
                           token_mask=mask)


class Router(nnx.Module):
    """Router parameters and the call into ``moejax.ops.routing`` (all router math in float32).

    Each router name is one :class:`RouterAdapter` in ``ROUTERS`` (its parameters and its call).
    Logits routers own ``w_router`` [D, E] (axes ``("embed", "expert")``). Noisy top-k owns
    ``w_gate`` and ``w_noise`` [D, E], zero-initialised as Shazeer et al. prescribe (equal gates and
    unit-free noise at the start, so load starts balanced). Hierarchical noisy top-k owns primary
    [D, a] and secondary [a, D, b] gates, also zero. DeepSeek-V3 adds ``bias`` [E] (a
    ``RouterBias``); hash owns a ``RouterTable``.
    """

    def __init__(self, config: MoEConfig, *, rngs: nnx.Rngs):
        self.config = config
        self.deterministic = False
        if config.router not in ROUTERS:
            raise ValueError(f"MoEConfig.router must be one of {sorted(ROUTERS)}, got "
                             f"{config.router!r}")
        for name, variable in ROUTERS[config.router].make(
                config, rngs, fallback_rules(config.mesh_roles)).items():
            setattr(self, name, variable)
        self.rngs = nnx.data(None)
        if self.needs_rng(train=True):
            stream = rng_stream_name(config, rngs)
            self.rngs = rngs[stream].fork() if stream is not None else nnx.data(None)

    def set_view(self, deterministic: bool | None = None):
        """``nnx.view(model, deterministic=True)``: routing without noise or jitter (eval)."""
        if deterministic is not None:
            self.deterministic = deterministic

    def needs_rng(self, train: bool) -> bool:
        return router_needs_rng(self.config, train)

    def _w(self, name: str) -> jax.Array:
        """A router weight, whole on every device: the router is small, and under ``Explicit``
        axes a weight split over the axis that also splits the tokens would split the logits twice.
        """
        return replicated(getattr(self, name)[...])

    def logits(self, x_TxD: jax.Array) -> jax.Array:
        """``x @ w_router`` in f32, ``[T, E]``."""
        return x_TxD @ self._w("w_router").astype(jnp.float32)

    def _key(self, rngs):
        stream = rngs if rngs is not None else self.rngs
        if isinstance(stream, nnx.Rngs):
            name = rng_stream_name(self.config, stream)
            stream = stream[name] if name is not None else None
        if stream is None:
            raise ValueError(missing_stream_message(self.config))
        if isinstance(stream, nnx.RngStream):
            return stream()
        return stream

    def __call__(self, x_TxD, *, token_ids_T=None, token_mask_T=None, sequence_length=None,
                 deterministic=None, rngs=None):
        c = self.config
        train = not (self.deterministic if deterministic is None else deterministic)
        key = self._key(rngs) if self.needs_rng(train) else None
        jitter_key = None
        if key is not None:
            key, jitter_key = jax.random.split(key)
        x = x_TxD.astype(jnp.float32)
        if train and c.router_jitter > 0 and c.router != "hash":
            x = R.jitter(x, jitter_key, c.router_jitter)
        inputs = RouteInputs(x, key, train, token_ids_T, token_mask_T, sequence_length)
        return ROUTERS[c.router].route(self, inputs)


class MoE(nnx.Module):
    """Mixture-of-Experts layer: ``y, aux = MoE(config, rngs=nnx.Rngs(0))(x)``.

    Attributes: ``router`` (:class:`Router`), ``experts`` (:class:`moejax.layers.experts.Experts`),
    ``shared`` (:class:`SharedExperts`, only when ``num_shared_experts > 0``).
    """

    def __init__(self, config: MoEConfig, *, rngs: nnx.Rngs):
        if not isinstance(config, MoEConfig):
            raise ValueError(f"config must be a moejax.MoEConfig, got {type(config).__name__}")
        self.config = config
        self.router = Router(config, rngs=rngs)
        self.experts = Experts(config, rngs=rngs)
        if config.num_shared_experts:
            self.shared = SharedExperts(config, rngs=rngs)

    def __call__(self, x: jax.Array, *, token_ids: jax.Array | None = None,
                 token_mask: jax.Array | None = None,
                 deterministic: bool | None = None,
                 rngs: nnx.Rngs | nnx.RngStream | jax.Array | None = None):
        """Routes ``x`` [..., d_model] through the experts; returns ``(y, aux)``.

        token_ids: int ids with x's batch shape (the hash router needs them).
        token_mask: bool with x's batch shape, True = a real token (None: all are). Masked tokens
          are not dispatched, get output 0 and count in no loss or metric (module docstring).
        deterministic: overrides ``router.deterministic`` (eval mode: no noise, no jitter).
        rngs: overrides the router's stored rng stream.

        Called eagerly (concrete arrays, no enclosing ``jit``/``grad``), the layer runs as one
        compiled program per input shape instead of op by op; traced, it is traced inline.
        """
        c = self.config
        batch_shape = self._check_inputs(x, token_ids, token_mask)
        if math.prod(batch_shape) == 0:
            return self._no_tokens(x, batch_shape, token_ids, deterministic, rngs)
        deterministic = bool(self.router.deterministic if deterministic is None else deterministic)
        if _all_concrete((nnx.state(self), x, token_ids, token_mask,
                          None if isinstance(rngs, (nnx.Rngs, nnx.RngStream)) else rngs)):
            key = self.router._key(rngs) if self.router.needs_rng(not deterministic) else None
            # Sown values are part of the structure: pop them each step (``collect_aux``) or
            # sow under ``nnx.capture`` to keep one compiled program.
            graphdef, state = nnx.split(self)
            y, aux = _eager_forward(graphdef, deterministic, current_rules(), state, x,
                                    token_ids, token_mask, key)
        else:
            y, aux = self._forward(x, batch_shape, token_ids, token_mask, deterministic, rngs)
        if c.sow_aux:
            self._sow(AUX_LOSS, aux.total_loss)
            self._sow(AUX_METRICS, aux.metrics)
        return y, aux

    def _no_tokens(self, x, batch_shape, token_ids, deterministic, rngs):
        """An empty ``x``: routes one masked stand-in token (every empty dimension of size 1)
        for the shapes of the losses and metrics, all zero, and returns an empty output."""
        shape = tuple(max(n, 1) for n in batch_shape)
        stand_in = jnp.zeros((*shape, x.shape[-1]), x.dtype)
        ids = None if token_ids is None else jnp.zeros(shape, token_ids.dtype)
        y, aux = self(stand_in, token_ids=ids, token_mask=jnp.zeros(shape, jnp.bool_),
                      deterministic=deterministic, rngs=rngs)
        return jnp.zeros(x.shape, y.dtype), aux

    def _sow(self, name: str, value) -> None:
        """``sow`` into ``nnx.capture``'s intermediates; outside a capture (and under Linen's
        bridge, which reads them into ``intermediates``) onto the layer, a tuple of calls."""
        if hasattr(self, "__captures__"):
            self.sow(nnx.Intermediate, name, value)
        elif hasattr(self, name):
            getattr(self, name).set_value(getattr(self, name).get_value() + (value,))
        else:
            setattr(self, name, nnx.Intermediate((value,)))

    def _check_inputs(self, x, token_ids, token_mask) -> tuple[int, ...]:
        c = self.config
        if x.ndim < 2 or x.shape[-1] != c.d_model:
            raise ValueError(
                f"x must have shape [..., d_model] = [..., {c.d_model}] with at least one batch "
                f"dimension, got {x.shape}"
            )
        batch_shape = x.shape[:-1]
        if not jnp.issubdtype(jnp.dtype(c.dtype or x.dtype), jnp.floating):
            raise ValueError(f"x must have a floating dtype (or set MoEConfig.dtype), got {x.dtype}")
        if token_ids is not None and token_ids.shape != batch_shape:
            raise ValueError(
                f"token_ids must have x's batch shape {batch_shape}, got {token_ids.shape}"
            )
        if token_mask is not None:
            shape, dtype = jnp.shape(token_mask), jnp.result_type(token_mask)
            if shape != batch_shape or dtype != jnp.bool_:
                raise ValueError(
                    f"token_mask must be a bool array with x's batch shape {batch_shape} (True = a "
                    f"real token), got {dtype} {shape}"
                )
        return batch_shape

    def _forward(self, x, batch_shape, token_ids, token_mask, deterministic, rngs):
        c = self.config
        num_tokens = math.prod(batch_shape)
        compute_dtype = jnp.dtype(c.dtype or x.dtype)
        x_TxD = constrain(x.reshape(num_tokens, c.d_model), ("batch", "embed"))
        token_ids_T = None if token_ids is None else token_ids.reshape(num_tokens)
        token_mask_T = None
        if token_mask is not None:
            token_mask_T = constrain(jnp.reshape(token_mask, (num_tokens,)), ("batch",))
        sequence_length = batch_shape[-1] if len(batch_shape) >= 2 else None
        routing = self.router(x_TxD, token_ids_T=token_ids_T, token_mask_T=token_mask_T,
                              sequence_length=sequence_length, deterministic=deterministic,
                              rngs=rngs)
        # The router reads the input as given (in f32); the experts compute in ``dtype``.
        y_TxD, dropped_fraction = self._dispatch(x_TxD.astype(compute_dtype), routing)
        y_TxD = like(y_TxD, x_TxD)  # expert choice combines on whole-batch buffers
        if c.num_shared_experts:
            y_TxD = y_TxD + self.shared(x_TxD.astype(compute_dtype)).astype(jnp.float32)
        # Shared experts run on every row (static shapes); a masked token's output is 0 all the same.
        y_TxD = zero_masked(y_TxD, token_mask_T)
        # A loss of weight 0 is exactly 0, and not computed: ``0 * value`` would keep the loss and
        # its backward in the program (XLA cannot drop a product with 0, which is NaN for inf).
        losses = {name: _weighted(getattr(c, LOSS_WEIGHT_FIELDS[name]), value)
                  for name, value in routing.aux_losses.items()}
        metrics = dict(routing.metrics, dropped_fraction=dropped_fraction)
        y_TxD = constrain(y_TxD, ("batch", "embed"))
        y = like(y_TxD.astype(compute_dtype).reshape(*batch_shape, c.d_model), x)
        return y, MoEAux(losses, metrics)

    def _dispatch(self, x_TxD, routing):
        c = self.config
        experts = self.experts
        if isinstance(routing, R.ExpertChoiceRouting):
            tokens_ExC = routing.token_indices
            run = _maybe_remat(experts.batched, c.remat)
            y_ExCxD = run(replicated(x_TxD)[tokens_ExC]).astype(jnp.float32)
            weighted = y_ExCxD * routing.combine_weights.astype(jnp.float32)[..., None]
            y_TxD = jnp.zeros(x_TxD.shape, jnp.float32).at[tokens_ExC.reshape(-1)].add(
                weighted.reshape(-1, c.d_model)
            )
            return y_TxD, routing.metrics.get("unrouted_fraction", jnp.zeros((), jnp.float32))
        indices_TxK = routing.expert_indices
        weights_TxK = routing.combine_weights
        # Routers give masked tokens (and GShard's dropped second choices) weight 0.
        assigned_TxK = weights_TxK != 0
        if c.dispatch == "dense":
            weights_TxE = dispatch_ops.dense_combine_weights(indices_TxK, weights_TxK,
                                                             c.num_experts)
            run = _maybe_remat(experts.dense, c.remat)
            return run(x_TxD, weights_TxE), jnp.zeros((), jnp.float32)
        # Under a mesh, each device dispatches its own tokens; the experts split over the expert axis.
        layout = expert_parallel_layout(tokens=x_TxD, roles=c.mesh_roles)
        if layout is not None:
            parallel_kw = dict(assigned_TxK=assigned_TxK, remat=c.remat, **layout._asdict())
            ffn = experts.ffn(x_TxD.dtype)
            if c.dispatch == "capacity":
                return capacity_expert_parallel(
                    x_TxD, indices_TxK, weights_TxK, ffn, capacity_factor=c.capacity_factor,
                    capacity_order=c.capacity_order, **parallel_kw)
            y_TxD = dropless_expert_parallel(x_TxD, indices_TxK, weights_TxK, ffn,
                                             exchange_factor=c.ep_exchange_factor, **parallel_kw)
            return y_TxD, jnp.zeros((), jnp.float32)
        if c.dispatch == "capacity":
            num_tokens, k = indices_TxK.shape
            capacity = dispatch_ops.expert_capacity(num_tokens, k, c.num_experts,
                                                    c.capacity_factor)
            plan = dispatch_ops.capacity_dispatch(indices_TxK, weights_TxK, c.num_experts,
                                                  capacity, c.capacity_order, assigned_TxK)
            run = _maybe_remat(experts.batched, c.remat)
            y_ExCxD = run(dispatch_ops.capacity_gather(x_TxD, plan, k))
            y_TxD = dispatch_ops.capacity_combine(y_ExCxD, plan, weights_TxK, jnp.float32)
            num_assigned = jnp.maximum(jnp.sum(assigned_TxK), 1)
            dropped = jnp.sum(assigned_TxK & ~plan.kept_TxK) / num_assigned
            return y_TxD, dropped.astype(jnp.float32)
        copies = dispatch_ops.sort_for_dropless(x_TxD, indices_TxK, c.num_experts, assigned_TxK)
        run = _maybe_remat(dropless_ops.dropless_ffn, c.remat)
        y_TxD = run(x_TxD, copies, weights_TxK, experts.ffn(x_TxD.dtype))
        return y_TxD, jnp.zeros((), jnp.float32)

    def update_router_bias(self, tokens_per_expert: jax.Array, rate: float) -> None:
        """DeepSeek-V3 balancing: ``bias += rate * sign(mean load - load)``, outside the optimiser."""
        if self.config.router != "deepseek_v3":
            raise ValueError(
                f"update_router_bias needs router='deepseek_v3', got {self.config.router!r}"
            )
        self.router.bias[...] = R.update_bias(self.router.bias[...], tokens_per_expert, rate)


def _weighted(weight: float, loss: jax.Array) -> jax.Array:
    """``weight * loss``; exactly 0 for a weight of 0 (the loss is then left out of the program)."""
    return weight * loss if weight else jnp.zeros(jnp.shape(loss), jnp.result_type(loss))


def _maybe_remat(fn, remat: bool):
    return jax.checkpoint(fn) if remat else fn


def _all_concrete(tree) -> bool:
    return not any(isinstance(leaf, jax.core.Tracer) for leaf in jax.tree.leaves(tree))


@functools.partial(jax.jit, static_argnums=(0, 1, 2))
def _eager_forward(graphdef, deterministic, rules, state, x, token_ids, token_mask, key):
    """An eager call as one compiled program, cached per layer structure, input shapes and the
    active logical-axis ``rules`` (part of the key: they shape the constraints)."""
    del rules
    layer = nnx.merge(graphdef, state)
    return layer._forward(x, x.shape[:-1], token_ids, token_mask, deterministic, key)


def collect_aux(source: Any) -> MoEAux:
    """The aux losses and metrics sown by every MoE layer with ``MoEConfig.sow_aux=True``.

    ``source``: the ``nnx.State`` of intermediates ``nnx.capture(model, nnx.Intermediate)``
    returned, an ``nnx.Module`` called outside a capture (the sown values are popped, so the next
    step starts from none), or what a Linen ``apply(..., mutable=["intermediates"])`` returned
    (its variables dict, or the ``(output, variables)`` pair). Returns :class:`MoEAux` keyed by
    each layer's path: ``losses[path]`` is that layer's weighted aux loss summed over its calls
    (and over a scanned stack), ``metrics[path + "/" + name]`` the metrics of its calls stacked;
    ``.total_loss`` is what to add to the model's loss.
    """
    if isinstance(source, nnx.Module):
        source = nnx.pop(source, nnx.All(nnx.Intermediate, nnx.Any(nnx.PathContains(AUX_LOSS),
                                                                   nnx.PathContains(AUX_METRICS))))
    elif isinstance(source, tuple) and len(source) == 2 and isinstance(source[1], Mapping):
        source = source[1]
    if isinstance(source, Mapping) and "intermediates" in source:
        source = source["intermediates"]
    losses: dict[str, jax.Array] = {}
    calls: dict[str, list[jax.Array]] = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(source)[0]:
        # A Variable's value shows in the path as attribute ``value``.
        keys = [_key_name(k) for k in path
                if not (isinstance(k, jax.tree_util.GetAttrKey) and k.name == "value")]
        if AUX_LOSS in keys:
            where = "/".join(keys[:keys.index(AUX_LOSS)])
            total = jnp.sum(jnp.asarray(leaf, jnp.float32))
            losses[where] = losses[where] + total if where in losses else total
        elif AUX_METRICS in keys:
            at = keys.index(AUX_METRICS)
            # keys after the name: the call's index in the sown tuple, then the metric's name.
            name = "/".join(keys[:at] + keys[at + 2:])
            calls.setdefault(name, []).append(leaf)
    metrics = {name: values[0] if len(values) == 1 else jnp.stack(values)
               for name, values in calls.items()}
    return MoEAux(losses, metrics)


def _key_name(k) -> str:
    for attr in ("key", "name", "idx"):
        if hasattr(k, attr):
            return str(getattr(k, attr))
    return str(k)
