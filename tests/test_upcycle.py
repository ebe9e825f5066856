"""Sparse upcycling: at step 0 the upcycled MoE computes the dense model's logits when its top-k
gates sum to 1, every non-FFN parameter is the dense one, and fine-grained experts split the FFN."""

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import moejax
from moejax.models import Transformer, TransformerConfig, upcycle

DENSE = TransformerConfig(vocab_size=48, d_model=16, num_layers=2, num_heads=2, d_ff=32,
                          max_len=16, activation="silu", dense_ffn="glu")
TOKENS = jnp.asarray(np.random.default_rng(0).integers(0, 48, (2, 10)), jnp.int32)


@nnx.jit
def forward(model, tokens):
    return model(tokens)[0]


def upcycled_model(dense, moe, **kw):
    config, params = upcycle(nnx.state(dense, nnx.Param), DENSE, moe, **kw)
    model = Transformer(config, rngs=nnx.Rngs(9))
    nnx.update(model, params)
    model.eval()
    return model


def moe(**changes):
    return moejax.MoEConfig(**{**dict(d_model=16, d_ff=32, num_experts=4, experts_per_token=2,
                                      expert="glu", activation="silu", dispatch="dense"),
                               **changes})


@pytest.mark.parametrize("noise", [0.0, 0.5])
def test_upcycled_model_reproduces_the_dense_logits_at_step_0(noise):
    dense = Transformer(DENSE, rngs=nnx.Rngs(0))
    want = np.asarray(forward(dense, TOKENS))
    got = np.asarray(forward(upcycled_model(dense, moe(), noise=noise, seed=1), TOKENS))
    # Equal up to float rounding: the experts' products run in another order than the FFN's.
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)


def test_gates_that_do_not_sum_to_one_change_the_logits():
    dense = Transformer(DENSE, rngs=nnx.Rngs(0))
    want = np.asarray(forward(dense, TOKENS))
    model = upcycled_model(dense, moe(router="top_k"), noise=0.5, seed=1)
    assert np.abs(np.asarray(forward(model, TOKENS)) - want).max() > 1e-2


def test_non_ffn_parameters_are_copied_and_fine_grained_experts_split_the_ffn():
    dense = Transformer(DENSE, rngs=nnx.Rngs(0))
    model = upcycled_model(dense, moe(d_ff=8, num_experts=8))
    np.testing.assert_array_equal(model.embed[...], dense.embed[...])
    np.testing.assert_array_equal(model.layers[1].attention.w_q[...],
                                  dense.layers[1].attention.w_q[...])
    w_in, w_out = model.layers[0].ffn.experts.w_in[...], model.layers[0].ffn.experts.w_out[...]
    np.testing.assert_array_equal(w_in[5], dense.layers[0].ffn.w_in[...][:, 8:16])
    np.testing.assert_array_equal(w_out[3], dense.layers[0].ffn.w_out[...][24:32])
    np.testing.assert_array_equal(model.layers[0].ffn.router.w_router[...], 0)


def test_experts_that_do_not_match_the_dense_ffn_are_refused():
    dense = Transformer(DENSE, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="activation"):
        upcycle(nnx.state(dense, nnx.Param), DENSE, moe(activation="gelu"))
    with pytest.raises(ValueError, match="d_ff"):
        upcycle(nnx.state(dense, nnx.Param), DENSE, moe(d_ff=12))
