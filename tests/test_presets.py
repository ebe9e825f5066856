"""Presets of published MoEs: their parameter counts are the published ones, and every tiny
preset builds and runs."""

import jax.numpy as jnp
import pytest
from flax import nnx

from moejax.models import Transformer, count_params
from moejax.models.presets import PRESETS, preset

# Published totals / active parameters (billions): Mixtral-8x7B 46.7 / 12.9 (Jiang et al. 2024),
# OLMoE-1B-7B 6.9 / 1.3 (Muennighoff et al. 2024), Qwen1.5-MoE-A2.7B 14.3 / 2.7 (Qwen blog),
# Qwen3-30B-A3B 30.5 / 3.3 (Qwen3 model card).
PUBLISHED = {"mixtral": (46.7, 12.9), "olmoe": (6.9, 1.3), "qwen2_moe": (14.3, 2.7),
             "qwen3_moe": (30.5, 3.3)}


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_full_presets_have_the_published_parameter_counts(name):
    counts = count_params(preset(name, scan_layers=True))  # scan: one layer's shapes, fast
    total, active = PUBLISHED[name]
    assert counts["total"] / 1e9 == pytest.approx(total, rel=0.01)
    assert counts["active"] / 1e9 == pytest.approx(active, rel=0.03)


def test_every_tiny_preset_builds_and_traces():
    for name in PRESETS:
        config = preset(name, "tiny")
        logits, aux = nnx.eval_shape(
            lambda: Transformer(config, rngs=nnx.Rngs(0))(jnp.zeros((1, 4), jnp.int32)))
        assert logits.shape == (1, 4, config.vocab_size)
        assert aux.metrics["tokens_per_expert"].shape[0] == config.num_moe_layers


def test_deepseek_v3_preset_has_its_dense_first_layers_and_moe_block():
    config = preset("deepseek_v3")
    assert [config.is_moe_layer(i) for i in range(4)] == [False, False, False, True]
    assert config.moe.router == "deepseek_v3" and config.moe.routed_scaling_factor == 2.5
    assert (config.moe.num_expert_groups, config.moe.topk_groups) == (8, 4)


def test_unknown_preset_or_field_is_named():
    with pytest.raises(ValueError, match="preset name"):
        preset("llama")
    with pytest.raises(ValueError, match="num_expertz"):
        preset("mixtral", num_expertz=3)
