"""KV-cache generation: cached logits equal the full forward for padded batches (left and right
padding, grouped-query attention with q/k norms, scanned layers), greedy decoding with and
without the cache agree, and top-p sampling draws only from the nucleus in its proportions."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from moejax.models import Transformer
from moejax.models.generate import _pick, generate, greedy_generate, pad_prompts
from moejax.models.presets import preset


@nnx.jit
def forward(model, tokens, mask):
    return model(tokens, token_mask=mask)[0]


@nnx.jit
def extend(model, tokens, cache, mask):
    logits, _, cache = model.extend(tokens, cache, token_mask=mask)
    return logits, cache


def tiny_model(**changes):
    # GQA (4 query heads on 2 kv heads), per-head q/k RMSNorm, head size != d_model / heads.
    # Dense dispatch compiles fastest on CPU; routing is per token either way.
    config = preset("qwen3_moe", "tiny", moe_changes=dict(dispatch="dense"), **changes)
    model = Transformer(config, rngs=nnx.Rngs(0))
    model.eval()
    return model


PROMPTS = [np.array([3, 9, 4, 1, 7], np.int32), np.array([5, 2], np.int32),
           np.array([8, 6, 3, 3, 1, 2, 9], np.int32)]


@pytest.mark.parametrize("left,scan", [(False, False), (True, True)])
def test_cached_logits_equal_the_full_forward_of_each_unpadded_row(left, scan):
    model = tiny_model(scan_layers=scan, num_layers=2)
    tokens, mask = pad_prompts(PROMPTS, length=8, left=left)
    cache = model.init_cache(len(PROMPTS), 8 + 2)
    logits, cache = extend(model, jnp.asarray(tokens), cache, jnp.asarray(mask))
    appended = np.array([[11, 12], [13, 14], [15, 16]], np.int32)
    steps = []
    for i in range(2):
        step_logits, cache = extend(model, jnp.asarray(appended[:, i: i + 1]), cache,
                                    jnp.ones((3, 1), bool))
        steps.append(np.asarray(step_logits)[:, 0])
    # Each row alone, right-padded (causal attention: the padding changes no real position).
    full, full_mask = pad_prompts([np.concatenate([p, a]) for p, a in zip(PROMPTS, appended)])
    wants = np.asarray(forward(model, jnp.asarray(full), jnp.asarray(full_mask)))
    for row, prompt in enumerate(PROMPTS):
        want = wants[row]
        np.testing.assert_allclose(np.asarray(logits)[row, mask[row]], want[: len(prompt)],
                                   atol=2e-5, rtol=0)
        for i in range(2):
            np.testing.assert_allclose(steps[i][row], want[len(prompt) + i], atol=2e-5, rtol=0)


def test_greedy_generate_is_the_same_with_and_without_the_cache():
    model = tiny_model()
    kw = dict(max_new_tokens=6, length=12, eos_id=-1)
    cached = greedy_generate(model, PROMPTS, use_cache=True, **kw)
    plain = greedy_generate(model, PROMPTS, use_cache=False, **kw)
    for a, b in zip(cached, plain):
        np.testing.assert_array_equal(a, b)
    # Rows stop at the end of the 12-token buffer.
    assert [len(c) for c in cached] == [6, 6, 5]


def test_sampling_with_a_tiny_nucleus_is_greedy():
    model = tiny_model()
    tokens, mask = pad_prompts(PROMPTS)
    greedy = generate(model, tokens, mask, max_new_tokens=4)
    nucleus = generate(model, tokens, mask, max_new_tokens=4, temperature=1.0, top_p=1e-6,
                       key=jax.random.key(1))
    np.testing.assert_array_equal(np.asarray(nucleus), np.asarray(greedy))


def test_top_p_samples_only_the_nucleus_in_proportion():
    probs = np.array([0.5, 0.3, 0.15, 0.05])
    logits = jnp.asarray(np.tile(np.log(probs), (20000, 1)), jnp.float32)
    # top_p = 0.7: the nucleus is {0, 1} (0.5 < 0.7 <= 0.8), renormalised to 0.625 / 0.375.
    drawn = np.asarray(_pick(logits, jax.random.key(0), 1.0, 0.7))
    counts = np.bincount(drawn, minlength=4) / len(drawn)
    assert counts[2] == counts[3] == 0
    np.testing.assert_allclose(counts[:2], [0.625, 0.375], atol=0.015)


def test_sampling_without_a_key_is_refused():
    model = tiny_model()
    with pytest.raises(ValueError, match="key"):
        generate(model, np.ones((1, 3), np.int32), max_new_tokens=2, temperature=1.0)
