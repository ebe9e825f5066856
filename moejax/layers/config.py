"""``MoEConfig``: the frozen hyperparameters of one MoE layer (no experiment code needed to import it)."""

from __future__ import annotations

import dataclasses
import math
import numbers
from typing import Any

import jax.numpy as jnp

from moejax.ops.dispatch import CAPACITY_ORDERS
from moejax.parallel.mesh import MeshRoles

DISPATCH_MODES = ("dense", "capacity", "dropless")
EXPERT_KINDS = ("mlp", "glu")
ACTIVATIONS = ("relu", "gelu", "gelu_tanh", "silu", "swish", "squared_relu")
GMM_BACKENDS = ("auto", "pallas_tpu", "pallas_gpu", "cpu", "reference")

# Routers that decide per expert (not per token) bring their own dispatch; dense gating needs dense.
ROUTER_DISPATCH = {
    "softmax": ("dense",),
    "expert_choice": ("capacity",),
}

# aux loss name (as routers return it) -> MoEConfig field holding its weight.
LOSS_WEIGHT_FIELDS = {
    "importance": "importance_weight",
    "load": "load_weight",
    "load_balancing": "load_balancing_weight",
    "z_loss": "z_loss_weight",
    "sequence_balance": "sequence_balance_weight",
}


@dataclasses.dataclass(frozen=True)
class MoEConfig:
    """Hyperparameters of :class:`moejax.MoE` (and :class:`moejax.linen.MoE`).

    Routers are names from ``moejax.ops.routing.ROUTERS``. ``experts_per_token`` is k (for
    ``softmax`` gating it must equal ``num_experts``; for ``expert_choice`` it is unused and each
    expert takes ``ceil(capacity_factor * T / E)`` tokens). ``hierarchical_noisy_top_k`` splits the
    experts into ``num_expert_groups`` groups and picks ``topk_groups`` (default 1) groups per token,
    then ``experts_per_token / topk_groups`` experts inside each; ``deepseek_v3`` uses the same two
    fields for group-limited routing. Fine-grained experts (DeepSeekMoE) are
    just more, smaller experts; shared experts are always-on FFNs of width
    ``shared_d_ff or d_ff`` each, added to the routed output.
    """

    d_model: int
    d_ff: int
    num_experts: int
    experts_per_token: int = 2
    router: str = "mixtral"
    dispatch: str = "dropless"
    capacity_factor: float = 1.25
    capacity_order: str = "first_come"
    expert: str = "mlp"
    activation: str = "gelu"
    num_shared_experts: int = 0
    shared_d_ff: int | None = None
    # Qwen2-MoE: the shared experts' output is scaled per token by sigmoid(x @ w_gate), w_gate [D, 1].
    shared_expert_gate: bool = False
    # Weights of the router's (unweighted) auxiliary losses; the layer reports them weighted.
    importance_weight: float = 0.1
    load_weight: float = 0.1
    load_balancing_weight: float = 0.01
    z_loss_weight: float = 1e-3
    sequence_balance_weight: float = 1e-4
    router_jitter: float = 0.0
    # The host's rng stream for routing noise and jitter in training ('dropout', then nnx.Rngs'
    # 'default' stream, when the host has no stream of this name).
    rng_stream: str = "router"
    # Router options.
    renormalize: bool = False
    gshard_policy: str = "random"
    num_expert_groups: int = 1
    topk_groups: int | None = None
    routed_scaling_factor: float = 1.0
    hash_vocab_size: int = 0
    hash_seed: int = 0
    # Numerics and kernels.
    param_dtype: Any = jnp.float32
    # Compute dtype of the experts and of the output; None: the input's dtype. Router math is f32.
    dtype: Any = None
    gmm_backend: str = "auto"
    gmm_tiling: tuple[int, int, int] | None = None
    # Pallas interpret mode; None: when the default JAX backend is the CPU. False compiles the real
    # kernel, e.g. ahead of time for a TPU slice from a CPU host.
    gmm_interpret: bool | None = None
    remat: bool = False
    # Expert parallelism: all-to-all buffers hold this many times the average per-shard load; a step
    # that would overflow them exchanges in several rounds of these buffers (nothing is dropped).
    # None: one exchange with worst-case buffers (every local copy to one shard).
    ep_exchange_factor: float | None = 2.0
    # Which axes of the host's mesh hold the experts, split the tokens and split F
    # (``moejax.parallel.MeshRoles``); None: from the active logical-axis rules.
    mesh_roles: MeshRoles | None = None
    # Also sow the weighted aux loss and the metrics as intermediates (NNX ``nnx.Intermediate``,
    # Linen ``intermediates``), summed by ``moejax.collect_aux``; ``moe(x)`` still returns them.
    sow_aux: bool = False

    def __post_init__(self):
        from moejax.ops.routing import ROUTERS  # the registry is the single list of names

        for name in ("d_model", "d_ff", "num_experts", "experts_per_token"):
            value = getattr(self, name)
            if not _is_int(value) or value < 1:
                raise ValueError(f"MoEConfig.{name} must be a positive int, got {value!r}")
        if self.shared_d_ff is not None and (not _is_int(self.shared_d_ff) or self.shared_d_ff < 1):
            raise ValueError(
                f"MoEConfig.shared_d_ff must be None or a positive int, got {self.shared_d_ff!r}"
            )
        for name in ("num_shared_experts", "num_expert_groups", "hash_vocab_size", "hash_seed"):
            if not _is_int(getattr(self, name)):
                raise ValueError(f"MoEConfig.{name} must be an int, got {getattr(self, name)!r}")
        for name in ("capacity_factor", "routed_scaling_factor"):
            value = getattr(self, name)
            if not _is_real(value) or not value > 0:
                raise ValueError(f"MoEConfig.{name} must be a finite number > 0, got {value!r}")
        if self.router not in ROUTERS:
            raise ValueError(
                f"MoEConfig.router must be one of {sorted(ROUTERS)}, got {self.router!r}"
            )
        _one_of("dispatch", self.dispatch, DISPATCH_MODES)
        _one_of("expert", self.expert, EXPERT_KINDS)
        _one_of("activation", self.activation, ACTIVATIONS)
        _one_of("gmm_backend", self.gmm_backend, GMM_BACKENDS)
        _one_of("capacity_order", self.capacity_order, CAPACITY_ORDERS)
        if self.experts_per_token > self.num_experts:
            raise ValueError(
                f"MoEConfig.experts_per_token = {self.experts_per_token} exceeds "
                f"num_experts = {self.num_experts}"
            )
        if self.router == "softmax" and self.experts_per_token != self.num_experts:
            raise ValueError(
                "MoEConfig.experts_per_token must equal num_experts for router='softmax' "
                f"(dense gating uses every expert), got {self.experts_per_token} and "
                f"{self.num_experts}"
            )
        allowed = ROUTER_DISPATCH.get(self.router)
        if allowed is not None and self.dispatch not in allowed:
            raise ValueError(
                f"MoEConfig.router={self.router!r} does not fit dispatch={self.dispatch!r}; "
                f"use dispatch in {allowed}"
            )
        if self.router == "switch" and self.experts_per_token != 1:
            raise ValueError("MoEConfig.experts_per_token must be 1 for router='switch'")
        if self.router == "gshard" and self.experts_per_token != 2:
            raise ValueError("MoEConfig.experts_per_token must be 2 for router='gshard'")
        if self.num_expert_groups < 1 or self.num_experts % self.num_expert_groups:
            raise ValueError(
                f"MoEConfig.num_expert_groups = {self.num_expert_groups} must be >= 1 and divide "
                f"num_experts = {self.num_experts}"
            )
        if self.router == "hierarchical_noisy_top_k":
            k_primary = self.topk_groups or 1
            group_size = self.num_experts // self.num_expert_groups
            if self.num_expert_groups < 2 or self.experts_per_token % k_primary or (
                k_primary > self.num_expert_groups
                or self.experts_per_token // k_primary > group_size
            ):
                raise ValueError(
                    "router='hierarchical_noisy_top_k' needs num_expert_groups >= 2 and "
                    "experts_per_token = topk_groups * (experts per chosen group), with "
                    f"topk_groups <= num_expert_groups; got num_expert_groups = "
                    f"{self.num_expert_groups}, topk_groups = {self.topk_groups}, "
                    f"experts_per_token = {self.experts_per_token}"
                )
        if self.router == "hash" and self.hash_vocab_size < 1:
            raise ValueError("MoEConfig.hash_vocab_size must be >= 1 for router='hash'")
        if self.dispatch == "capacity" or self.router == "expert_choice":
            if not self.capacity_factor > 0:
                raise ValueError(
                    f"MoEConfig.capacity_factor must be > 0 for dispatch={self.dispatch!r}, "
                    f"got {self.capacity_factor}"
                )
        if self.num_shared_experts < 0:
            raise ValueError(
                f"MoEConfig.num_shared_experts must be >= 0, got {self.num_shared_experts}"
            )
        if not _is_real(self.router_jitter) or self.router_jitter < 0 or self.router_jitter >= 1:
            raise ValueError(f"MoEConfig.router_jitter must be in [0, 1), got {self.router_jitter}")
        if self.ep_exchange_factor is not None and not (
            _is_real(self.ep_exchange_factor) and self.ep_exchange_factor > 0
        ):
            raise ValueError(
                f"MoEConfig.ep_exchange_factor must be > 0 or None, got {self.ep_exchange_factor}"
            )
        for name in ("sow_aux", "remat"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"MoEConfig.{name} must be a bool, got {getattr(self, name)!r}")
        for loss, field in LOSS_WEIGHT_FIELDS.items():
            value = getattr(self, field)
            if not _is_real(value) or value < 0:
                raise ValueError(
                    f"MoEConfig.{field} (weight of {loss!r}) must be a finite number >= 0, "
                    f"got {value!r}"
                )
        self._check_architecture_fields()

    def _check_architecture_fields(self) -> None:
        """Fields published MoE architectures need (shared-expert gate, routed scaling)."""
        if not isinstance(self.shared_expert_gate, bool):
            raise ValueError(
                f"MoEConfig.shared_expert_gate must be a bool, got {self.shared_expert_gate!r}")
        if self.shared_expert_gate and self.num_shared_experts < 1:
            raise ValueError("MoEConfig.shared_expert_gate needs num_shared_experts >= 1")
        if not self.routed_scaling_factor > 0:
            raise ValueError(f"MoEConfig.routed_scaling_factor must be > 0, got "
                             f"{self.routed_scaling_factor}")

    def replace(self, **changes) -> "MoEConfig":
        return dataclasses.replace(self, **changes)


def _is_int(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_real(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)


def _one_of(field: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"MoEConfig.{field} must be one of {allowed}, got {value!r}")
