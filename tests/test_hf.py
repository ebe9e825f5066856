"""Hugging Face checkpoints: parity with ``transformers`` on fixtures it made (logits and the
experts each token is routed to), exact save/load round trips, sharded files, bad input."""

import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from moejax import parallel
from moejax.models import Transformer, hf
from moejax.models.presets import preset

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures", "hf")


@nnx.jit
def forward(model, tokens):
    return model(tokens)[0]


@nnx.jit
def logits_and_expert_choices(model, tokens):
    return model(tokens)[0], model.expert_choices(tokens)


# The default dropless dispatch for one family (it compiles slowly on CPU); dense for the others
# (the dispatch modes compute the same, tests/test_moe_layer.py).
@pytest.mark.parametrize("family", hf.FAMILIES)
def test_logits_and_expert_choices_match_transformers(family):
    directory = os.path.join(FIXTURES, family)
    ref = np.load(os.path.join(directory, "reference.npz"))
    changes = None if family == "mixtral" else dict(dispatch="dense")
    model = hf.load_model(directory, dtype=jnp.float32, moe_changes=changes)
    tokens = jnp.asarray(ref["tokens"])
    logits, choices = logits_and_expert_choices(model, tokens)
    np.testing.assert_allclose(np.asarray(logits), ref["logits"], atol=1e-4, rtol=0)
    got = np.stack([np.asarray(c) for c in choices])
    assert got.shape == ref["experts"].shape
    # The same k experts per token (the order among them is the router's, by probability).
    np.testing.assert_array_equal(np.sort(got, axis=-1), np.sort(ref["experts"], axis=-1))


def test_fixtures_record_the_transformers_version_that_made_them():
    for family in hf.FAMILIES:
        with open(os.path.join(FIXTURES, family, "reference.json")) as f:
            assert json.load(f)["transformers"]


def test_fixture_configs_map_onto_the_presets_architecture():
    for family in hf.FAMILIES:
        with open(os.path.join(FIXTURES, family, "config.json")) as f:
            config = hf.config_from_hf(json.load(f))
        tiny = preset(family, "tiny")
        for field in ("qkv_bias", "qk_norm", "dense_ffn", "activation", "tie_embeddings"):
            assert getattr(config, field) == getattr(tiny, field), (family, field)
        assert config.moe.router == tiny.moe.router
        assert config.moe.shared_expert_gate == tiny.moe.shared_expert_gate
        assert hf.family_of(config) == family


@pytest.mark.parametrize("family,dtype", [("qwen2_moe", jnp.float32), ("qwen3_moe", jnp.bfloat16)])
def test_save_then_load_gives_back_the_config_and_parameters_bit_for_bit(tmp_path, family, dtype):
    config = preset(family, "tiny", param_dtype=dtype, dtype=dtype,
                    moe_changes=dict(param_dtype=dtype))
    model = Transformer(config, rngs=nnx.Rngs(1))
    # Small files: the sharded layout with an index.
    written = hf.save(str(tmp_path), config, model, max_shard_bytes=20_000)
    assert hf.INDEX_FILE in written and len(written) > 3
    loaded_config, params = hf.load(str(tmp_path))
    assert loaded_config == config
    want = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    got = nnx.to_pure_dict(params)
    assert jax.tree.structure(got) == jax.tree.structure(want)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        assert a.dtype == b.dtype
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_a_saved_fixture_reloads_to_the_same_logits(tmp_path):
    source = os.path.join(FIXTURES, "qwen2_moe")
    config, params = hf.load(source)
    hf.save(str(tmp_path), config, params)
    tokens = jnp.asarray(np.load(os.path.join(source, "reference.npz"))["tokens"])
    dense = dict(dispatch="dense")
    a = forward(hf.load_model(source, moe_changes=dense), tokens)
    b = forward(hf.load_model(str(tmp_path), moe_changes=dense), tokens)
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_loading_onto_a_mesh_places_each_parameter_on_its_shards():
    mesh = parallel.make_mesh(fsdp=2, expert=2, tensor=2)
    model = hf.load_model(os.path.join(FIXTURES, "olmoe"), mesh=mesh)
    w_in = model.layers[0].ffn.experts.w_in[...]  # [E, D, F] = [8, 32, 16]
    assert w_in.sharding.mesh.shape == mesh.shape
    assert w_in.sharding.shard_shape(w_in.shape) != w_in.shape


def test_missing_tensor_is_named(tmp_path):
    source = os.path.join(FIXTURES, "qwen3_moe")
    shutil.copy(os.path.join(source, "config.json"), tmp_path / "config.json")
    from safetensors.numpy import load_file, save_file
    tensors = load_file(os.path.join(source, "model.safetensors"))
    del tensors["model.layers.1.mlp.experts.3.up_proj.weight"]
    save_file(tensors, str(tmp_path / "model.safetensors"))
    with pytest.raises(KeyError, match="experts.3.up_proj"):
        hf.load(str(tmp_path))


def test_unsupported_model_type_is_named(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(ValueError, match="model_type"):
        hf.load(str(tmp_path))
