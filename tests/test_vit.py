"""The vision MoE (moejax.models.vit) and the digits image dataset."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from moejax.data import digits_images
from moejax.data.images import create_image_iterator
from moejax.data.pipeline import load_builder
from moejax.models import vit


def _config(moe=None, **kw):
    base = dict(image_size=8, channels=1, patch_size=2, num_classes=10, d_model=16, num_layers=2,
                num_heads=2, d_ff=32, moe=moe, moe_every=2)
    base.update(kw)
    return vit.ViTConfig(**base)


def test_patchify_cuts_row_major_patches():
    images = np.arange(2 * 4 * 6 * 3, dtype=np.float32).reshape(2, 4, 6, 3)
    got = np.asarray(vit.patchify(jnp.asarray(images), 2))
    assert got.shape == (2, 6, 12)
    for b in range(2):
        for i in range(2):
            for j in range(3):
                want = images[b, 2 * i:2 * i + 2, 2 * j:2 * j + 2, :].reshape(-1)
                np.testing.assert_array_equal(got[b, 3 * i + j], want)


def test_one_expert_vmoe_equals_the_dense_vit_with_the_same_weights():
    # One expert, top-1 of one: the gate is exactly 1, so the MoE block is the dense MLP.
    moe = vit.vmoe_config(16, 32, 1, experts_per_token=1, dispatch="dense",
                          activation="gelu")
    sparse = vit.ViT(_config(moe), rngs=nnx.Rngs(0))
    dense = vit.ViT(_config(), rngs=nnx.Rngs(1))
    # Copy every shared parameter, and the expert into the dense MLP.
    nnx.update(dense.layers[0], nnx.state(sparse.layers[0]))
    for name in ("patch_embed", "pos_embed"):
        getattr(dense, name)[...] = getattr(sparse, name)[...]
    nnx.update(dense.final_norm, nnx.state(sparse.final_norm))
    for name in ("attention_norm", "attention", "ffn_norm"):
        nnx.update(getattr(dense.layers[1], name), nnx.state(getattr(sparse.layers[1], name)))
    experts = sparse.layers[1].ffn.experts
    dense.layers[1].ffn.w_in[...] = experts.w_in[...][0]
    dense.layers[1].ffn.w_out[...] = experts.w_out[...][0]
    dense.head[...] = jax.random.normal(jax.random.key(2), dense.head[...].shape)
    sparse.head[...] = dense.head[...]
    images = jax.random.uniform(jax.random.key(3), (4, 8, 8, 1))
    want, _ = dense(images)
    got, aux = sparse(images)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    assert aux.metrics["tokens_per_expert"].shape == (1, 1)
    np.testing.assert_allclose(aux.metrics["tokens_per_expert"], [[4 * 16]])


def test_batch_priority_capacity_drops_patches_and_reports_it():
    moe = vit.vmoe_config(16, 32, 4, capacity_factor=0.5)
    model = vit.ViT(_config(moe), rngs=nnx.Rngs(0))
    logits, aux = model(jax.random.uniform(jax.random.key(0), (8, 8, 8, 1)))
    assert logits.shape == (8, 10)
    assert aux.metrics["dropped_fraction"].shape == (1,)
    # Capacity 0.5: at least half of the token copies cannot be placed.
    assert float(aux.metrics["dropped_fraction"][0]) >= 0.5 - 1e-6
    assert set(aux.losses) == {"load_balancing", "z_loss"}
    assert all(np.isfinite(float(v)) for v in aux.losses.values())


def test_vit_config_and_inputs_are_checked():
    with pytest.raises(ValueError, match="patch_size"):
        _config(patch_size=3)
    with pytest.raises(ValueError, match="d_model"):
        _config(moe=vit.vmoe_config(8, 32, 4))
    model = vit.ViT(_config(), rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match=r"images must be float \[batch, 8, 8, 1\]"):
        model(jnp.zeros((2, 8, 8)))
    with pytest.raises(ValueError, match="floating point"):
        model(jnp.zeros((2, 8, 8, 1), jnp.uint8))
    counts = vit.count_params(_config(vit.vmoe_config(16, 32, 4)))
    assert counts["total"] > counts["active"]


@pytest.fixture(scope="module")
def digits_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("tfds"))


def test_digits_dataset_holds_scikit_learns_images_split_by_index(digits_dir):
    images, labels = digits_images.load_arrays()
    assert images.shape == (1797, 8, 8, 1) and images.max() == 16
    source = load_builder("digits_images", digits_dir).as_data_source(split="test")
    records = [source[i] for i in range(len(source))]
    index = np.array(sorted(int(r["index"]) for r in records))
    np.testing.assert_array_equal(index, np.arange(0, 1797, 5))
    for r in records:
        np.testing.assert_array_equal(r["image"], images[r["index"]])
        assert r["label"] == labels[r["index"]]
    test = create_image_iterator("digits_images", split="test", batch_size=40, shuffle=False,
                                 num_epochs=1, data_dir=digits_dir)
    rows = list(test)
    got_images = np.concatenate([b["images"] for b in rows])
    got_labels = np.concatenate([b["labels"] for b in rows])
    assert got_images.dtype == np.float32 and got_labels.dtype == np.int32
    np.testing.assert_array_equal(np.sort(got_labels), np.sort(labels[index]))
    np.testing.assert_allclose(np.sort(got_images.reshape(360, -1).sum(1)),
                               np.sort(images[index].reshape(360, -1).sum(1) / 16.0), rtol=1e-6)
    assert got_images.max() == 1.0 and np.bincount(got_labels).min() >= 20


def test_image_iterator_state_resumes_exactly(digits_dir):
    def make():
        return create_image_iterator("digits_images", split="train", batch_size=32, seed=3,
                                     data_dir=digits_dir)
    it = make()
    for _ in range(3):
        next(it)
    state = it.get_state()
    want = [next(it)["labels"] for _ in range(2)]
    resumed = make()
    resumed.set_state(state)
    for w in want:
        np.testing.assert_array_equal(next(resumed)["labels"], w)
    with pytest.raises(ValueError, match="label_key"):
        create_image_iterator("digits_images", split="train", batch_size=8, label_key="y",
                              data_dir=digits_dir)
