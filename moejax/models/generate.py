"""Greedy decoding with a :class:`~moejax.models.Transformer`, one jitted loop, static shapes.

Prompts are left-aligned in a ``[B, length]`` buffer; each row appends its own argmax token at its
own position. Causal attention means the padding to the right of a row's position never changes the
logits it reads, and the MoE layers get it as masked tokens, so no attention mask or KV cache is needed (each new token costs one full forward
pass over the buffer — fine for the short answers of instruction-tuning evaluations).
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx


def greedy_generate(model, prompts: Sequence[np.ndarray], *, max_new_tokens: int, length: int,
                    eos_id: int, pad_id: int = 0) -> list[np.ndarray]:
    """The greedy continuation (int32 ids, without the EOS that ends it) of each prompt.

    Generation stops at EOS, after ``max_new_tokens`` tokens or at the end of the buffer of
    ``length`` tokens (``<= model.config.max_len``). The model should be in eval mode.
    """
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if length > model.config.max_len:
        raise ValueError(f"length = {length} exceeds the model's max_len = {model.config.max_len}")
    lengths_B = np.asarray([len(p) for p in prompts], np.int32)
    if len(prompts) == 0 or lengths_B.min() < 1 or lengths_B.max() >= length:
        raise ValueError(f"every prompt needs 1 to {length - 1} tokens (buffer length {length}); "
                         f"got lengths {lengths_B.min() if len(prompts) else None} to "
                         f"{lengths_B.max() if len(prompts) else None}")
    tokens_BxL = np.full((len(prompts), length), pad_id, np.int32)
    for row, prompt in enumerate(prompts):
        tokens_BxL[row, : len(prompt)] = prompt
    out_BxL = _decode(model, jnp.asarray(tokens_BxL), jnp.asarray(lengths_B),
                      max_new_tokens=max_new_tokens)
    out_BxL = np.asarray(out_BxL)
    continuations = []
    for row, start in enumerate(lengths_B):
        new = out_BxL[row, start: min(start + max_new_tokens, length)]
        stop = np.flatnonzero(new == eos_id)
        continuations.append(new[: stop[0]] if stop.size else new)
    return continuations


@nnx.jit(static_argnames=("max_new_tokens",))
def _decode(model, tokens_BxL, lengths_B, *, max_new_tokens):
    length = tokens_BxL.shape[1]
    rows_B = jnp.arange(tokens_BxL.shape[0])

    def step(i, tokens_BxL):
        # Only the filled part of each row is real: the padding beyond it must not compete for
        # expert capacity (expert choice, capacity dispatch) or count in router statistics.
        filled_BxL = jnp.arange(length)[None, :] < (lengths_B + i)[:, None]
        logits_BxLxV, _ = model(tokens_BxL, token_mask=filled_BxL)
        position_B = lengths_B + i
        next_B = jnp.argmax(logits_BxLxV[rows_B, jnp.minimum(position_B, length) - 1], axis=-1)
        in_buffer_B = position_B < length
        # Rows past the buffer end write nowhere (the index is clamped and the old value kept).
        at_B = jnp.minimum(position_B, length - 1)
        old_B = tokens_BxL[rows_B, at_B]
        return tokens_BxL.at[rows_B, at_B].set(
            jnp.where(in_buffer_B, next_B.astype(tokens_BxL.dtype), old_B))

    return jax.lax.fori_loop(0, max_new_tokens, step, tokens_BxL)
