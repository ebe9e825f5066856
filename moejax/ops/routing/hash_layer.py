"""Hash routing (Roller et al. 2021, "Hash Layers For Large Sparse Models"): the expert of a token is a fixed
function of its token id, from a balanced random table. No parameters, no balancing loss.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from moejax.ops.routing.common import (
    Routing,
    check_int,
    check_token_mask,
    count_tokens_per_expert,
    mask_assigned,
    routing_metrics,
    zero_masked,
)


def make_hash_table(vocab_size: int, num_experts: int, seed: int) -> jax.Array:
    """Balanced random hash table, int32 [vocab_size]: token id -> expert.

    Each expert receives floor(V / E) or ceil(V / E) token ids (which experts get the extra id is random
    too); the assignment of ids is a uniformly random permutation drawn from ``numpy.random``'s
    ``default_rng(seed)``, so a seed always gives the same table.
    """
    vocab_size = check_int(vocab_size, "vocab_size", low=1)
    num_experts = check_int(num_experts, "num_experts", low=1)
    rng = np.random.default_rng(seed)
    expert_labels = rng.permutation(num_experts)
    balanced_V = expert_labels[np.arange(vocab_size) % num_experts]
    return jnp.asarray(rng.permutation(balanced_V), dtype=jnp.int32)


def hash_route(
    token_ids: jax.Array, table: jax.Array, k: int = 1, *, num_experts: int,
    token_mask: jax.Array | None = None,
) -> Routing:
    """Hash-layer routing: token t goes to expert table[token_ids[t]] with gate 1.0 (Roller et al. 2021).

    With k > 1 the token also goes to the next k - 1 experts cyclically, (table[id] + j) mod E for
    j < k, each with gate 1 / k (the mean of the k experts); a balanced table stays balanced under the
    shift, and the k experts are distinct.

    Args:
      token_ids: int [T], token ids in [0, V).
      table: int [V], from ``make_hash_table``.
      k: experts per token, 1 <= k <= num_experts.
      num_experts: E, the number of experts the table was built for (static; shapes depend on it).
      token_mask: bool [T], True = a real token; None = all tokens. Masked tokens get gates 0 and
        count in no metric.

    Returns:
      Routing with ``aux_losses`` {} and ``metrics`` whose router distribution is the gates (entropy
      log k).
    """
    if jnp.ndim(token_ids) != 1 or not jnp.issubdtype(jnp.result_type(token_ids), jnp.integer):
        raise ValueError(
            f"token_ids must be an integer array of shape [T], got {jnp.result_type(token_ids)} "
            f"{jnp.shape(token_ids)}"
        )
    if jnp.ndim(table) != 1 or not jnp.issubdtype(jnp.result_type(table), jnp.integer):
        raise ValueError(
            f"table must be an integer array of shape [V], got {jnp.result_type(table)} {jnp.shape(table)}"
        )
    num_experts = check_int(num_experts, "num_experts", low=1)
    k = check_int(k, "k", low=1, high=num_experts)
    num_tokens = token_ids.shape[0]
    token_mask = check_token_mask(token_mask, num_tokens)
    first_T = table[token_ids].astype(jnp.int32)
    expert_indices_TxK = (first_T[:, None] + jnp.arange(k, dtype=jnp.int32)[None, :]) % num_experts
    gates_TxK = jnp.full((num_tokens, k), 1.0 / k, jnp.float32)
    probs_TxE = jnp.sum(
        jax.nn.one_hot(expert_indices_TxK, num_experts, dtype=jnp.float32) * gates_TxK[..., None], axis=1
    )
    tokens_per_expert_E = count_tokens_per_expert(
        expert_indices_TxK, num_experts, assigned=mask_assigned(None, token_mask, k)
    )
    return Routing(
        expert_indices=expert_indices_TxK,
        combine_weights=zero_masked(gates_TxK, token_mask),
        aux_losses={},
        metrics=routing_metrics(tokens_per_expert_E, probs_TxE, token_mask),
    )
