"""Decoding with a :class:`~moejax.models.Transformer`: KV-cache generation under one ``jax.jit``.

:func:`generate` prefills the prompts into a static-size :class:`~moejax.models.KVCache` (one
slot per prompt position and per new token) and then decodes one token per step in a
``lax.scan``, greedily (``temperature=0``) or by sampling with temperature and top-p (nucleus,
Holtzman et al. 2020). Prompts of different lengths share one ``[B, P]`` buffer, padded on the
right or the left; the padding is masked out of attention and routing and takes no position, so
each row computes what it would alone (tested against the no-cache forward).

:func:`greedy_generate` (the trainer's instruction evaluation) uses the cache when the model's
routing decides per token. Routing that compares tokens with each other (expert choice, capacity
dispatch that can drop) would see one new token per step instead of the whole sequence, so those
models decode with the full forward pass over a ``[B, length]`` buffer per new token, as before.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx


def cache_is_exact(config) -> bool:
    """Whether cached decoding computes what the full forward computes for this model config."""
    moe = config.moe
    return moe is None or (moe.router != "expert_choice" and moe.dispatch != "capacity")


def pad_prompts(prompts: Sequence[np.ndarray], *, length: int | None = None, pad_id: int = 0,
                left: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """``(tokens_BxP, mask_BxP)``: the prompts in one buffer of ``length`` (default: the longest)."""
    lengths = [len(p) for p in prompts]
    if not prompts or min(lengths) < 1:
        raise ValueError(f"every prompt needs at least one token, got lengths {lengths}")
    length = length or max(lengths)
    if max(lengths) > length:
        raise ValueError(f"a prompt of {max(lengths)} tokens does not fit length = {length}")
    tokens = np.full((len(prompts), length), pad_id, np.int32)
    mask = np.zeros((len(prompts), length), bool)
    for row, prompt in enumerate(prompts):
        span = slice(length - len(prompt), length) if left else slice(0, len(prompt))
        tokens[row, span] = prompt
        mask[row, span] = True
    return tokens, mask


def generate(model, tokens_BxP, mask_BxP=None, *, max_new_tokens: int, temperature: float = 0.0,
             top_p: float = 1.0, key: jax.Array | None = None) -> jax.Array:
    """``max_new_tokens`` new tokens per row, int32 ``[B, max_new_tokens]``, with a KV cache.

    ``tokens_BxP`` holds the prompts, ``mask_BxP`` (bool, None = no padding) marks their real
    tokens (either side may be padded, see :func:`pad_prompts`). ``temperature=0`` is greedy;
    otherwise ``key`` is required and tokens are sampled from ``softmax(logits / temperature)``
    restricted to the smallest set of top tokens whose probability reaches ``top_p``. The model
    should be in eval mode. Rows do not stop at an end token: cut them after it.
    """
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if temperature < 0 or not 0 < top_p <= 1:
        raise ValueError(f"need temperature >= 0 and 0 < top_p <= 1, got {temperature}, {top_p}")
    if temperature > 0 and key is None:
        raise ValueError("sampling (temperature > 0) needs a key")
    tokens_BxP = jnp.asarray(tokens_BxP, jnp.int32)
    mask_BxP = (jnp.ones(tokens_BxP.shape, jnp.bool_) if mask_BxP is None
                else jnp.asarray(mask_BxP, jnp.bool_))
    if mask_BxP.shape != tokens_BxP.shape:
        raise ValueError(f"mask shape {mask_BxP.shape} must equal the tokens' {tokens_BxP.shape}")
    key = jax.random.key(0) if key is None else key
    return _generate(model, tokens_BxP, mask_BxP, key, max_new_tokens=max_new_tokens,
                     temperature=float(temperature), top_p=float(top_p))


def _pick(logits_BxV, key, temperature, top_p):
    if temperature == 0.0:
        return jnp.argmax(logits_BxV, axis=-1).astype(jnp.int32)
    logits_BxV = logits_BxV.astype(jnp.float32) / temperature
    if top_p < 1.0:
        sorted_BxV = jnp.sort(logits_BxV, axis=-1)[:, ::-1]
        probs_BxV = jax.nn.softmax(sorted_BxV, axis=-1)
        before_BxV = jnp.cumsum(probs_BxV, axis=-1) - probs_BxV
        # The smallest logit still inside the nucleus; everything below it is cut.
        kept_B = jnp.sum(before_BxV < top_p, axis=-1)
        cutoff_Bx1 = jnp.take_along_axis(sorted_BxV, kept_B[:, None] - 1, axis=-1)
        logits_BxV = jnp.where(logits_BxV >= cutoff_Bx1, logits_BxV, -jnp.inf)
    return jax.random.categorical(key, logits_BxV, axis=-1).astype(jnp.int32)


@nnx.jit(static_argnames=("max_new_tokens", "temperature", "top_p"))
def _generate(model, tokens_BxP, mask_BxP, key, *, max_new_tokens, temperature, top_p):
    batch, prompt_len = tokens_BxP.shape
    cache = model.init_cache(batch, prompt_len + max_new_tokens)
    logits_BxPxV, _, cache = model.extend(tokens_BxP, cache, token_mask=mask_BxP)
    last_B = jnp.max(jnp.where(mask_BxP, jnp.arange(prompt_len)[None, :], 0), axis=1)
    keys = jax.random.split(key, max_new_tokens)
    first_B = _pick(logits_BxPxV[jnp.arange(batch), last_B], keys[0], temperature, top_p)

    def step(carry, step_key):
        token_B, cache = carry
        logits_Bx1xV, _, cache = model.extend(token_B[:, None], cache)
        next_B = _pick(logits_Bx1xV[:, 0], step_key, temperature, top_p)
        return (next_B, cache), next_B

    _, rest_NxB = jax.lax.scan(step, (first_B, cache), keys[1:])
    return jnp.concatenate([first_B[:, None], rest_NxB.T], axis=1)


def greedy_generate(model, prompts: Sequence[np.ndarray], *, max_new_tokens: int, length: int,
                    eos_id: int, pad_id: int = 0, use_cache: bool | None = None
                    ) -> list[np.ndarray]:
    """The greedy continuation (int32 ids, without the EOS that ends it) of each prompt.

    Generation stops at EOS, after ``max_new_tokens`` tokens or at the end of the buffer of
    ``length`` tokens (``<= model.config.max_len``). The model should be in eval mode.
    ``use_cache``: None decodes with the KV cache when :func:`cache_is_exact` for the model.
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
    if use_cache is None:
        use_cache = cache_is_exact(model.config)
    if use_cache:
        # Prompt buffers in steps of 16 tokens: few distinct shapes, so few compilations.
        width = min(length - 1, -(-int(lengths_B.max()) // 16) * 16)
        tokens_BxP, mask_BxP = pad_prompts(prompts, length=width, pad_id=pad_id)
        # Not a function of the shortest prompt: one compilation per (batch, width); tokens past a
        # row's end of buffer (``length - start``) are cut below.
        steps = min(max_new_tokens, length - 1)
        new_BxN = np.asarray(generate(model, tokens_BxP, mask_BxP, max_new_tokens=steps))
        rows = [new_BxN[row, : min(max_new_tokens, length - start)]
                for row, start in enumerate(lengths_B)]
    else:
        tokens_BxL = np.full((len(prompts), length), pad_id, np.int32)
        for row, prompt in enumerate(prompts):
            tokens_BxL[row, : len(prompt)] = prompt
        out_BxL = np.asarray(_decode(model, jnp.asarray(tokens_BxL), jnp.asarray(lengths_B),
                                     max_new_tokens=max_new_tokens))
        rows = [out_BxL[row, start: min(start + max_new_tokens, length)]
                for row, start in enumerate(lengths_B)]
    continuations = []
    for new in rows:
        stop = np.flatnonzero(new == eos_id)
        continuations.append(new[: stop[0]] if stop.size else new)
    return continuations


@nnx.jit(static_argnames=("max_new_tokens",))
def _decode(model, tokens_BxL, lengths_B, *, max_new_tokens):
    """Without a cache: each new token costs one full forward pass over the ``[B, L]`` buffer.
    Causal attention keeps the padding right of a row's position out of the logits it reads, and
    the MoE layers get that padding as masked tokens."""
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
