"""The router zoo: pure functions from router inputs to a ``Routing`` pytree (or ``ExpertChoiceRouting``).

Routers (``ROUTERS`` name -> function; look one up with ``get_router(name)``):

  softmax(logits)                                         Shazeer et al. 2017 eq. 2, dense (k = E)
  noisy_top_k(x, w_gate, w_noise, k, *, key, train, noise_epsilon)           Shazeer eq. 3-11
  hierarchical_noisy_top_k(x, w_gate_primary, w_noise_primary, w_gate_secondary, w_noise_secondary,
                           k_primary, k_secondary, *, key, train, noise_epsilon)  Shazeer eq. 12-14
  top_k(logits, k, *, renormalize, norm_p)                softmax top-k, Switch/ST-MoE losses
  switch(logits)                                          Fedus et al. 2021, top-1
  gshard(logits, *, policy, key)                          Lepikhin et al. 2020, top-2, Algorithm 1
  mixtral(logits, k=2)                                    Jiang et al. 2024, softmax over the top-k logits
  expert_choice(logits, capacity, *, active_capacity)     Zhou et al. 2022 (ExpertChoiceRouting)
  deepseek_v3(logits, k, bias, *, routed_scaling_factor, num_groups, topk_groups, sequence_length)
  hash_route(token_ids, table, k=1, *, num_experts)       Roller et al. 2021 (registry name "hash")

Helpers: ``jitter`` (Switch input jitter), ``batch_priority_order`` (V-MoE), ``update_bias``
(DeepSeek-V3 bias rule), ``make_hash_table``, ``expert_choice_capacity``,
``expert_choice_active_capacity``, and the shared ``routing_metrics``, ``count_tokens_per_expert``,
``cv_squared``, ``load_balancing_loss``, ``z_loss``, ``check_token_mask``.

All router math is float32 whatever the input dtype. ``aux_losses`` are unweighted: the caller owns the
weights. Every router also takes ``token_mask`` (bool [T], True = a real token): masked tokens get combine
weight 0 (never dispatched; expert choice never picks them) and are left out of every loss and metric.
"""

from __future__ import annotations

from typing import Callable

from moejax.ops.routing.common import (
    ExpertChoiceRouting,
    Routing,
    check_token_mask,
    count_tokens_per_expert,
    cv_squared,
    load_balancing_loss,
    routing_metrics,
    z_loss,
)
from moejax.ops.routing.deepseek import deepseek_v3, update_bias
from moejax.ops.routing.expert_choice_routing import (
    expert_choice,
    expert_choice_active_capacity,
    expert_choice_capacity,
)
from moejax.ops.routing.hash_layer import hash_route, make_hash_table
from moejax.ops.routing.shazeer import hierarchical_noisy_top_k, noisy_top_k, softmax
from moejax.ops.routing.token_choice import (
    GSHARD_POLICIES,
    batch_priority_order,
    gshard,
    jitter,
    mixtral,
    switch,
    top_k,
)

ROUTERS: dict[str, Callable] = {
    "softmax": softmax,
    "noisy_top_k": noisy_top_k,
    "hierarchical_noisy_top_k": hierarchical_noisy_top_k,
    "top_k": top_k,
    "switch": switch,
    "gshard": gshard,
    "mixtral": mixtral,
    "expert_choice": expert_choice,
    "deepseek_v3": deepseek_v3,
    "hash": hash_route,
}


def get_router(name: str) -> Callable:
    """The router function registered as ``name`` in ``ROUTERS``; ValueError listing the known names."""
    try:
        return ROUTERS[name]
    except (KeyError, TypeError):
        raise ValueError(f"router must be one of {sorted(ROUTERS)}, got {name!r}") from None


__all__ = [
    "GSHARD_POLICIES",
    "ROUTERS",
    "ExpertChoiceRouting",
    "Routing",
    "batch_priority_order",
    "check_token_mask",
    "count_tokens_per_expert",
    "cv_squared",
    "deepseek_v3",
    "expert_choice",
    "expert_choice_active_capacity",
    "expert_choice_capacity",
    "get_router",
    "gshard",
    "hash_route",
    "hierarchical_noisy_top_k",
    "jitter",
    "load_balancing_loss",
    "make_hash_table",
    "mixtral",
    "noisy_top_k",
    "routing_metrics",
    "softmax",
    "switch",
    "top_k",
    "update_bias",
    "z_loss",
]
