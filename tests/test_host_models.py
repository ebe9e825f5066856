"""The MoE layer as a feed-forward block inside host models written the way Flax users write them.

(a) A Linen decoder LM with its own ``axis_rules`` (only ``embed``/``mlp``/``heads`` mapped), layers
    under ``nn.scan`` with partition metadata, ``init`` with a single key, dropout-only rngs, the aux
    loss sown and collected with ``moejax.collect_aux``.
(b) An NNX LM (one block) sharded the way Gemma's code does it: an ``Explicit`` mesh set with ``jax.set_mesh``,
    the host's own sharding names (mesh axes ``fsdp``/``tp``), Flax's ``get_named_sharding``,
    ``nnx.Optimizer`` and ``nnx.jit``, evaluation through ``nnx.view(..., deterministic=True)``.
(c) The same NNX LM on an ``Auto`` ``('data', 'model')`` mesh.

Each runs on one device with no mesh and on 8 devices: the loss and every gradient agree, and a few
optimizer steps lower the loss.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import linen as nn
from flax import nnx
from flax.linen import partitioning as nn_partitioning
from jax.sharding import AxisType, NamedSharding, PartitionSpec

import moejax
from moejax import parallel

V, D, H, L, B = 32, 16, 32, 8, 8


def _tokens(seed=0):
    return jax.random.randint(jax.random.key(seed), (B, L), 0, V)


def _next_token_loss(logits, tokens):
    return optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1], tokens[:, 1:]).mean()


def _optax_promotion():
    """optax's bias correction raises a float to an int32 step count (standard promotion only)."""
    return jax.numpy_dtype_promotion("standard")


def _assert_trees_close(got, want, rtol=2e-4, atol=1e-5):
    got_leaves, want_leaves = jax.tree.leaves(got), jax.tree.leaves(want)
    assert len(got_leaves) == len(want_leaves) > 0
    for a, b in zip(got_leaves, want_leaves):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=rtol, atol=atol)


# --------------------------------------------------------------------------- (a) Linen


LINEN_RULES = (("embed", "fsdp"), ("mlp", "tensor"), ("heads", "tensor"))
LINEN_MOE = moejax.MoEConfig(d_model=D, d_ff=H, num_experts=4, experts_per_token=2,
                             router="noisy_top_k", gmm_backend="cpu", sow_aux=True)


def _logical(init, *names):
    return nn.with_logical_partitioning(init, names)


class LinenBlock(nn.Module):
    train: bool

    @nn.compact
    def __call__(self, x, _):
        h = nn.LayerNorm(use_bias=False)(x)
        q, k, v = (nn.Dense(D, use_bias=False, name=name, kernel_init=_logical(
            nn.initializers.lecun_normal(), "embed", "heads"))(h) for name in "qkv")
        scores = jnp.einsum("bqd,bkd->bqk", q, k) / np.sqrt(D)
        causal = jnp.tril(jnp.ones((x.shape[1], x.shape[1]), bool))
        h = jnp.einsum("bqk,bkd->bqd", jax.nn.softmax(jnp.where(causal, scores, -1e9)), v)
        h = nn.Dense(D, use_bias=False, kernel_init=_logical(nn.initializers.lecun_normal(),
                                                             "heads", "embed"))(h)
        x = x + nn.Dropout(0.1, deterministic=not self.train)(h)
        y, _ = moejax.linen.MoE(LINEN_MOE, deterministic=not self.train)(
            nn.LayerNorm(use_bias=False)(x))
        return x + y, None


class LinenLM(nn.Module):
    train: bool = True

    @nn.compact
    def __call__(self, tokens):
        embed = nn.Embed(V, D, embedding_init=_logical(nn.initializers.normal(1.0), "vocab",
                                                       "embed"))
        x = embed(tokens)
        stack = nn.scan(LinenBlock, variable_axes={"params": 0, "intermediates": 0},
                        split_rngs={"params": True, "dropout": True}, length=2,
                        metadata_params={nn.PARTITION_NAME: "layers"})
        x, _ = stack(train=self.train)(x, None)
        return embed.attend(nn.LayerNorm(use_bias=False)(x))


def _linen_loss(model, variables, tokens, key):
    logits, sown = model.apply(variables, tokens, rngs={"dropout": key},
                               mutable=["intermediates"])
    aux = moejax.collect_aux(sown)
    return _next_token_loss(logits, tokens) + aux.total_loss, aux.losses


def test_linen_decoder_with_its_own_rules_scan_and_sown_aux_loss():
    model = LinenLM()
    tokens = _tokens()
    variables = jax.jit(model.init)(jax.random.key(0), tokens)  # one key: params (and noise)
    specs = nn.get_partition_spec(variables)["params"]
    moe_specs = specs["ScanLinenBlock_0"]["MoE_0"]["layer"]
    assert moe_specs["experts"]["w_in"] == PartitionSpec("layers", "expert", "embed", "mlp")
    key = jax.random.key(1)
    grad_fn = jax.value_and_grad(lambda v, t, k: _linen_loss(model, v, t, k), has_aux=True)

    (loss1, aux_losses), grads1 = jax.jit(grad_fn)(variables, tokens, key)
    # One entry for the scanned stack, summed over its layers.
    assert list(aux_losses) == ["ScanLinenBlock_0/MoE_0/layer"]
    assert aux_losses["ScanLinenBlock_0/MoE_0/layer"] > 0

    mesh = jax.make_mesh((4, 2), ("fsdp", "tensor"), axis_types=(AxisType.Auto,) * 2)
    shardings = nn.logical_to_mesh_sharding(specs, mesh, LINEN_RULES)
    with jax.set_mesh(mesh), nn_partitioning.axis_rules(LINEN_RULES):
        sharded = {"params": jax.device_put(variables["params"], shardings)}
        w_in = sharded["params"]["ScanLinenBlock_0"]["MoE_0"]["layer"]["experts"]["w_in"]
        assert w_in.value.sharding.spec == PartitionSpec(None, None, "fsdp", "tensor")
        batch = jax.device_put(tokens, NamedSharding(mesh, PartitionSpec("fsdp")))
        optimizer = optax.adam(3e-2)

        @jax.jit
        def train_step(variables, opt_state, key):
            (loss, _), grads = grad_fn(variables, batch, key)
            with _optax_promotion():
                updates, opt_state = optimizer.update(grads, opt_state, variables)
            return optax.apply_updates(variables, updates), opt_state, loss, grads

        opt_state = jax.jit(optimizer.init)(sharded)
        losses = []
        for i in range(6):
            sharded, opt_state, loss, grads = train_step(sharded, opt_state,
                                                         key if i == 0 else jax.random.key(i))
            if i == 0:
                np.testing.assert_allclose(loss, loss1, rtol=1e-5)
                _assert_trees_close(grads, grads1)
            losses.append(float(loss))
    assert losses[-1] < losses[0] - 0.1, losses
    evaluate = jax.jit(lambda v, t: LinenLM(train=False).apply(v, t))
    np.testing.assert_array_equal(evaluate(variables, tokens), evaluate(variables, tokens))


# --------------------------------------------------------------------------- (b, c) NNX


class NNXBlock(nnx.Module):
    def __init__(self, config: moejax.MoEConfig, names, rngs: nnx.Rngs):
        hidden_in, hidden_out = names
        init = nnx.initializers.lecun_normal()
        self.norm = nnx.RMSNorm(D, rngs=rngs)
        self.up = nnx.Linear(D, H, use_bias=False, rngs=rngs,
                             kernel_init=nnx.with_partitioning(init, hidden_in))
        self.down = nnx.Linear(H, D, use_bias=False, rngs=rngs,
                               kernel_init=nnx.with_partitioning(init, hidden_out))
        self.dropout = nnx.Dropout(0.1, rngs=rngs)
        self.moe_norm = nnx.RMSNorm(D, rngs=rngs)
        self.moe = moejax.MoE(config, rngs=rngs)

    def __call__(self, x):
        sharding = getattr(jax.typeof(x), "sharding", None)
        explicit = sharding is not None and parallel.has_explicit_axes(sharding.mesh)
        h = jax.nn.gelu(self.up(self.norm(x)))
        h = self.down(h, out_sharding=sharding.spec) if explicit else self.down(h)
        x = x + self.dropout(h)
        y, _ = self.moe(self.moe_norm(x))
        return x + y


class NNXLM(nnx.Module):
    def __init__(self, config, names, rngs: nnx.Rngs):
        self.embed = nnx.Param(jax.random.normal(rngs.params(), (V, D)))
        # One block: each MoE block costs seconds to compile on the CPU, and the stacked case (several
        # layers' aux losses summed) is the Linen test's scan.
        self.blocks = nnx.List([NNXBlock(config, names, rngs)])

    def __call__(self, tokens):
        x = jax.nn.one_hot(tokens, V) @ self.embed[...]
        for block in self.blocks:
            x = block(x)
        return x @ self.embed[...].T


def _nnx_loss(model, tokens):
    logits, sown = nnx.capture(model, nnx.Intermediate)(tokens)
    return _next_token_loss(logits, tokens) + moejax.collect_aux(sown).total_loss


@nnx.jit
def _train_step(model, optimizer, tokens):
    loss, grads = nnx.value_and_grad(_nnx_loss)(model, tokens)
    optimizer.update(model, grads)
    return loss, grads


HOSTS = {
    # Gemma's way: Explicit axes, the host's params named by mesh axes, experts over fsdp.
    "explicit_fsdp_tp": dict(
        shape=(4, 2), axes=("fsdp", "tp"), types=AxisType.Explicit,
        names=((None, "tp"), ("tp", None)), batch="fsdp",
        roles=parallel.MeshRoles(expert="fsdp", batch=("fsdp",), hidden=("tp",)),
        expert_spec=PartitionSpec("fsdp", None, "tp")),
    "auto_data_model": dict(
        shape=(2, 4), axes=("data", "model"), types=AxisType.Auto,
        names=((None, "model"), ("model", None)), batch="data",
        roles=parallel.MeshRoles(expert="model"),
        expert_spec=PartitionSpec("model", None, None)),
}


@pytest.mark.parametrize("host", sorted(HOSTS))
def test_nnx_lm_on_the_hosts_mesh_equals_one_device_and_trains(host):
    spec = HOSTS[host]
    config = moejax.MoEConfig(d_model=D, d_ff=H, num_experts=4, experts_per_token=2,
                              router="noisy_top_k", gmm_backend="cpu", sow_aux=True,
                              mesh_roles=spec["roles"])
    tokens = _tokens()

    def make(mesh):
        # Built under the host's mesh, as the host builds its own layers.
        with jax.set_mesh(mesh):
            model = NNXLM(config, spec["names"], nnx.Rngs(params=0, dropout=1))
            return model, nnx.Optimizer(model, optax.adam(3e-2), wrt=nnx.Param)

    one = jax.make_mesh((1, 1), spec["axes"], axis_types=(spec["types"],) * 2,
                        devices=jax.devices()[:1])
    with jax.set_mesh(one), _optax_promotion():
        loss1, grads1 = _train_step(*make(one), tokens)

    mesh = jax.make_mesh(spec["shape"], spec["axes"], axis_types=(spec["types"],) * 2)
    model, optimizer = make(mesh)
    with jax.set_mesh(mesh):
        state = nnx.state((model, optimizer))
        nnx.update((model, optimizer), jax.device_put(state, nnx.get_named_sharding(state, mesh)))
        assert model.blocks[0].moe.experts.w_in[...].sharding.spec == spec["expert_spec"]
        batch = jax.device_put(tokens, NamedSharding(mesh, PartitionSpec(spec["batch"])))
        with _optax_promotion():
            losses = [_train_step(model, optimizer, batch) for _ in range(6)]
        loss8, grads8 = losses[0]
        np.testing.assert_allclose(loss8, loss1, rtol=1e-5)
        _assert_trees_close(grads8, grads1)
        losses = [float(loss) for loss, _ in losses]

        evaluation = nnx.view(model, deterministic=True)
        assert all(block.moe.router.deterministic for block in evaluation.blocks)
        forward = nnx.jit(lambda m, t: m(t))
        np.testing.assert_array_equal(forward(evaluation, batch), forward(evaluation, batch))
    assert losses[-1] < losses[0] - 0.1, losses
