"""The decoder-only transformer LM: forward pass against a NumPy reference, MoE placement and aux,
causality, layer scan, remat, sharding metadata, parameter counts and greedy decoding."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from scipy.special import erf

import moejax
from moejax import parallel
from moejax.models import Transformer, TransformerConfig, count_params
from moejax.models.generate import greedy_generate

VOCAB = 40


def dense_config(**changes):
    base = dict(vocab_size=VOCAB, d_model=16, num_layers=2, num_heads=2, d_ff=32, max_len=16)
    return TransformerConfig(**{**base, **changes})


def moe_config(**changes):
    moe = moejax.MoEConfig(d_model=16, d_ff=8, num_experts=4, experts_per_token=2)
    base = dict(vocab_size=VOCAB, d_model=16, num_layers=4, num_heads=2, d_ff=32, max_len=16,
                moe=moe, moe_every=2)
    return TransformerConfig(**{**base, **changes})


@nnx.jit
def forward(model, tokens):
    return model(tokens)


def random_tokens(shape, seed=0):
    return jnp.asarray(np.random.default_rng(seed).integers(0, VOCAB, shape), jnp.int32)


# ---------------------------------------------------------------------- NumPy reference


def np_rms_norm(x, scale):
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + 1e-6) * scale


def np_rope(x_LxHxK, base=10_000.0):
    length, _, k = x_LxHxK.shape
    half = k // 2
    out = np.empty_like(x_LxHxK)
    for pos in range(length):
        for i in range(half):
            theta = pos * base ** (-i / half)
            a, b = x_LxHxK[pos, :, i], x_LxHxK[pos, :, i + half]
            out[pos, :, i] = a * np.cos(theta) - b * np.sin(theta)
            out[pos, :, i + half] = b * np.cos(theta) + a * np.sin(theta)
    return out


def np_dense_lm(params, tokens_L, num_heads):
    """One sequence through the dense model, written from the architecture's definition."""
    p = jax.tree.map(np.asarray, nnx.to_pure_dict(params))
    x = p["embed"][tokens_L].astype(np.float64)
    length = len(tokens_L)
    for layer in p["layers"].values():
        h = np_rms_norm(x, layer["attention_norm"]["scale"])
        att = layer["attention"]
        q = np_rope(np.einsum("ld,dhk->lhk", h, att["w_q"]))
        k = np_rope(np.einsum("ld,dhk->lhk", h, att["w_k"]))
        v = np.einsum("ld,dhk->lhk", h, att["w_v"])
        out = np.zeros_like(q)
        for head in range(num_heads):
            scores = q[:, head] @ k[:, head].T / np.sqrt(q.shape[-1])
            scores[np.triu_indices(length, 1)] = -np.inf
            probs = np.exp(scores - scores.max(axis=1, keepdims=True))
            probs /= probs.sum(axis=1, keepdims=True)
            out[:, head] = probs @ v[:, head]
        x = x + np.einsum("lhk,hkd->ld", out, att["w_o"])
        h = np_rms_norm(x, layer["ffn_norm"]["scale"])
        pre = h @ layer["ffn"]["w_in"]
        x = x + (0.5 * pre * (1 + erf(pre / np.sqrt(2)))) @ layer["ffn"]["w_out"]
    return np_rms_norm(x, p["final_norm"]["scale"]) @ p["lm_head"]


# ---------------------------------------------------------------------- forward pass


def test_dense_forward_matches_numpy_reference():
    config = dense_config()
    model = Transformer(config, rngs=nnx.Rngs(0))
    tokens = random_tokens((2, 9))
    logits, aux = forward(model, tokens)
    assert logits.shape == (2, 9, VOCAB) and logits.dtype == jnp.float32
    params = nnx.state(model, nnx.Param)
    for row in range(2):
        expected = np_dense_lm(params, np.asarray(tokens[row]), config.num_heads)
        np.testing.assert_allclose(np.asarray(logits[row]), expected, rtol=2e-4, atol=2e-4)
    assert aux.losses == {} and aux.metrics == {}
    assert float(aux.total_loss) == 0.0


def test_changing_future_tokens_leaves_earlier_logits_unchanged():
    model = Transformer(moe_config(moe=moejax.MoEConfig(d_model=16, d_ff=8, num_experts=4,
                                                         dispatch="dropless")),
                        rngs=nnx.Rngs(1))
    model.eval()
    tokens = random_tokens((1, 12))
    changed = tokens.at[0, 7:].set((tokens[0, 7:] + 1) % VOCAB)
    before, _ = forward(model, tokens)
    after, _ = forward(model, changed)
    np.testing.assert_array_equal(np.asarray(before[0, :7]), np.asarray(after[0, :7]))
    assert not np.allclose(np.asarray(before[0, 7:]), np.asarray(after[0, 7:]))


def test_every_moe_every_th_layer_is_moe_and_metrics_stack_per_moe_layer():
    config = moe_config(num_layers=6, moe_every=3)
    model = Transformer(config, rngs=nnx.Rngs(0))
    kinds = [type(block.ffn).__name__ for block in model.layers]
    assert kinds == ["DenseFFN", "DenseFFN", "MoE", "DenseFFN", "DenseFFN", "MoE"]
    _, aux = forward(model, random_tokens((2, 8)))
    assert aux.metrics["tokens_per_expert"].shape == (2, 4)
    # Each MoE layer routes all 16 tokens to k = 2 experts.
    np.testing.assert_allclose(np.asarray(aux.metrics["tokens_per_expert"]).sum(axis=1), [32, 32])
    assert aux.metrics["load_cv"].shape == (2,)


def test_aux_losses_are_the_sum_over_moe_layers_of_each_layers_losses():
    model = Transformer(moe_config(), rngs=nnx.Rngs(0))
    tokens = random_tokens((2, 8))

    @nnx.jit
    def layer_by_layer(model, tokens):
        x = jnp.take(model.embed[...], tokens, axis=0)
        per_layer = []
        for block in model.layers:
            x, layer_aux = block(x, tokens, None)
            if layer_aux is not None:
                per_layer.append(layer_aux.losses)
        return per_layer

    _, aux = forward(model, tokens)
    per_layer = layer_by_layer(model, tokens)
    assert len(per_layer) == 2 and set(aux.losses) == set(per_layer[0])
    for name, value in aux.losses.items():
        np.testing.assert_allclose(float(value), sum(float(losses[name]) for losses in per_layer),
                                   rtol=1e-6)
    np.testing.assert_allclose(float(aux.total_loss), sum(float(v) for v in aux.losses.values()),
                               rtol=1e-6)


def test_scanned_layers_compute_the_same_as_unrolled_layers():
    unrolled = Transformer(moe_config(), rngs=nnx.Rngs(0))
    scanned = Transformer(moe_config(scan_layers=True), rngs=nnx.Rngs(5))
    # Copy the unrolled parameters into the scanned model: period p, block i = layer 2 p + i.
    source = nnx.to_pure_dict(nnx.state(unrolled, nnx.Param))
    target = nnx.to_pure_dict(nnx.state(scanned, nnx.Param))
    layers = source.pop("layers")
    target.update(source)
    for i in range(2):
        target["layers"]["blocks"][i] = jax.tree.map(
            lambda *xs: jnp.stack(xs), layers[i], layers[i + 2])
    state = nnx.state(scanned, nnx.Param)
    nnx.replace_by_pure_dict(state, target)
    nnx.update(scanned, state)
    tokens = random_tokens((2, 8))
    want_logits, want_aux = forward(unrolled, tokens)
    got_logits, got_aux = forward(scanned, tokens)
    np.testing.assert_allclose(np.asarray(got_logits), np.asarray(want_logits), rtol=1e-5,
                               atol=1e-5)
    np.testing.assert_allclose(np.asarray(got_aux.metrics["tokens_per_expert"]),
                               np.asarray(want_aux.metrics["tokens_per_expert"]))
    np.testing.assert_allclose(float(got_aux.total_loss), float(want_aux.total_loss), rtol=1e-5)


def test_scanned_parameters_have_an_unsplit_leading_layer_axis():
    model = Transformer(moe_config(scan_layers=True), rngs=nnx.Rngs(0))
    w_in = model.layers.blocks[1].ffn.experts.w_in
    assert w_in.shape == (2, 4, 16, 8)
    assert w_in.get_metadata()["out_sharding"] == (None, "expert", "embed", "mlp")


def test_remat_gives_the_same_loss_and_gradients():
    tokens = random_tokens((2, 8))

    def loss_and_grads(remat):
        model = Transformer(moe_config(num_layers=2, remat=remat), rngs=nnx.Rngs(0))

        def loss(model):
            logits, aux = model(tokens)
            return jnp.mean(jax.nn.logsumexp(logits, axis=-1)) + aux.total_loss

        return nnx.jit(nnx.value_and_grad(loss))(model)

    loss_a, grads_a = loss_and_grads(False)
    loss_b, grads_b = loss_and_grads(True)
    np.testing.assert_allclose(float(loss_a), float(loss_b), rtol=1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5,
                                                         atol=1e-6), grads_a, grads_b)


def test_noisy_router_draws_its_noise_from_the_given_key():
    moe = moejax.MoEConfig(d_model=16, d_ff=8, num_experts=4, router="noisy_top_k")
    model = Transformer(moe_config(moe=moe), rngs=nnx.Rngs(params=0, router=1))
    # Noisy top-k starts with zero gates: the noise alone picks the experts.
    model.layers[1].ffn.router.w_noise[...] = jnp.ones((16, 4))
    tokens = random_tokens((2, 8))
    run = nnx.jit(lambda model, tokens, key: model(tokens, rngs=key))
    a, _ = run(model, tokens, jax.random.key(3))
    b, _ = run(model, tokens, jax.random.key(3))
    c, _ = run(model, tokens, jax.random.key(4))
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert not np.allclose(np.asarray(a), np.asarray(c))


@pytest.mark.parametrize("scan_layers", [False, True])
def test_router_bias_update_moves_each_layers_bias_against_its_load(scan_layers):
    moe = moejax.MoEConfig(d_model=16, d_ff=8, num_experts=4, router="deepseek_v3")
    model = Transformer(moe_config(moe=moe, scan_layers=scan_layers), rngs=nnx.Rngs(0))
    load_LxE = np.array([[1.0, 5.0, 3.0, 3.0], [4.0, 0.0, 0.0, 8.0]], np.float32)
    model.update_router_biases(jnp.asarray(load_LxE), 0.5)
    # DeepSeek-V3 sec. 2.1.2: b_i += rate * sign(mean load - load_i), from b = 0.
    expected_LxE = 0.5 * np.sign(load_LxE.mean(axis=1, keepdims=True) - load_LxE)
    if scan_layers:
        got_LxE = np.asarray(model.layers.blocks[1].ffn.router.bias[...])
    else:
        got_LxE = np.stack([np.asarray(model.layers[i].ffn.router.bias[...]) for i in (1, 3)])
    np.testing.assert_array_equal(got_LxE, expected_LxE)


# ---------------------------------------------------------------------- sharding and sizes


def test_every_parameter_names_a_known_logical_axis_per_dimension():
    known = {"embed", "mlp", "heads", "vocab", "expert", None}
    model = Transformer(moe_config(), rngs=nnx.Rngs(0))
    for path, variable in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        axes = variable.get_metadata()["out_sharding"]
        assert len(axes) == variable.get_value().ndim, path
        assert set(axes) <= known, path


def test_model_sharded_over_data_fsdp_and_tensor_axes_computes_the_same_logits():
    config = moe_config(num_layers=2)
    tokens = random_tokens((4, 8))
    want, _ = forward(Transformer(config, rngs=nnx.Rngs(0)), tokens)
    mesh = parallel.make_mesh(data=2, fsdp=2, tensor=2)
    model = parallel.create_sharded(lambda: Transformer(config, rngs=nnx.Rngs(0)), mesh)
    w_in = model.layers[1].ffn.experts.w_in[...]  # [E, D, F] split on D (fsdp) and F (tensor)
    assert w_in.sharding.shard_shape(w_in.shape) == (4, 8, 4)
    with parallel.use_mesh(mesh):
        got, _ = forward(model, tokens)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)


def test_count_params_counts_k_of_e_experts_as_active():
    config = moe_config()
    d, f, v, e, k, dense_f = 16, 8, VOCAB, 4, 2, 32
    attention = 4 * d * d + 2 * d
    dense_layer = attention + 2 * d * dense_f
    moe_layer_shared = attention + d * e  # norms, attention and the router
    experts = 2 * e * d * f
    total = 2 * v * d + d + 2 * dense_layer + 2 * (moe_layer_shared + experts)
    counts = count_params(config)
    assert counts["total"] == total
    assert counts["active"] == total - 2 * experts + 2 * experts * k // e
    assert counts["embedding"] == 2 * v * d


@pytest.mark.parametrize("changes, field", [
    (dict(d_model=18), "d_model"),
    (dict(num_layers=1), "moe_every"),
    (dict(moe=moejax.MoEConfig(d_model=8, d_ff=8, num_experts=4)), "moe.d_model"),
    (dict(num_layers=3, scan_layers=True), "scan_layers"),
    (dict(num_heads=0), "num_heads"),
    (dict(activation="tanh"), "activation"),
])
def test_bad_config_raises_naming_the_field(changes, field):
    with pytest.raises(ValueError, match=field.replace(".", r"\.")):
        moe_config(**changes)


def test_sequence_longer_than_max_len_is_rejected():
    model = Transformer(dense_config(), rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="max_len"):
        model(random_tokens((1, 17)))


# ---------------------------------------------------------------------- greedy decoding


def test_greedy_generate_matches_argmax_decoding_one_token_at_a_time():
    model = Transformer(moe_config(), rngs=nnx.Rngs(2))
    model.eval()
    length = 12

    def next_token(sequence):
        # The prefix alone, right-padded to a fixed shape (causality: padding does not matter).
        padded = np.zeros((1, length), np.int32)
        padded[0, : len(sequence)] = sequence
        logits, _ = forward(model, jnp.asarray(padded))
        return int(np.asarray(logits)[0, len(sequence) - 1].argmax())

    prompts = [np.array([1, 5, 9, 3], np.int32), np.array([1, 7], np.int32)]
    eos = next_token(list(prompts[1]))  # makes row 1 stop at once
    got = greedy_generate(model, prompts, max_new_tokens=5, length=length, eos_id=eos)
    for prompt, out in zip(prompts, got):
        sequence = list(prompt)
        expected = []
        for _ in range(5):
            token = next_token(sequence)
            if token == eos:
                break
            expected.append(token)
            sequence.append(token)
        np.testing.assert_array_equal(out, expected)
    assert len(got[1]) == 0


def test_greedy_generate_does_not_depend_on_the_buffer_padding_with_expert_choice_layers():
    # Expert choice picks tokens across the batch: unmasked padding would compete with the prompts.
    moe = moejax.MoEConfig(d_model=16, d_ff=8, num_experts=4, router="expert_choice",
                           dispatch="capacity", capacity_factor=0.5)
    model = Transformer(moe_config(moe=moe, max_len=32), rngs=nnx.Rngs(3))
    model.eval()
    prompts = [np.asarray(random_tokens((n,), seed=n)) for n in (6, 3, 9, 4)]

    def generate(length):
        return greedy_generate(model, prompts, max_new_tokens=8, length=length, eos_id=VOCAB)

    short, long = generate(18), generate(32)
    for a, b in zip(short, long):
        np.testing.assert_array_equal(a, b)
