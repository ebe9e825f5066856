"""Hugging Face checkpoints of published MoE families, in and out, without torch.

``config, params = load(path)`` reads a ``transformers`` checkpoint directory (``config.json`` and
``model.safetensors`` or the sharded ``model-0000i-of-0000n.safetensors`` + its
``model.safetensors.index.json``) of a family in ``FAMILIES`` into a :class:`TransformerConfig`
and the model's parameters (an ``nnx.State``); ``save(path, config, params)`` writes the same
layout; ``model = load_model(path)`` is a ready :class:`Transformer` (eval mode):
``logits_BxLxV, aux = model(tokens_BxL)``.

Loading reads one tensor at a time with the ``safetensors`` NumPy API and places it on its
device(s) before reading the next, so the host never holds more than one parameter (an expert
stack ``[E, D, F]`` is one parameter, filled expert by expert). With ``mesh`` each parameter goes
straight onto the sharding its logical axes give (``moejax.parallel.state_shardings``). Saving
gathers one parameter at a time and holds at most one output file's tensors.

Layout (a ``transformers`` Linear weight is ``[out, in]``; ours are ``[in, ...]``):

  model.embed_tokens.weight [V, D]            -> embed [V, D]
  lm_head.weight [V, D]                       -> lm_head [D, V]  (absent when tied)
  layers.i.self_attn.{q,k,v}_proj.weight      -> attention.w_{q,k,v} [D, heads, K]
  layers.i.self_attn.{q,k,v}_proj.bias        -> attention.b_{q,k,v} [heads, K]  (Qwen2-MoE)
  layers.i.self_attn.o_proj.weight [D, H*K]   -> attention.w_o [H, K, D]
  layers.i.self_attn.{q,k}_norm.weight        -> attention.{q,k}_norm.scale  (OLMoE, Qwen3-MoE)
  layers.i.{input,post_attention}_layernorm   -> attention_norm / ffn_norm
  layers.i.<moe>.gate.weight [E, D]           -> ffn.router.w_router [D, E]
  layers.i.<moe>.experts.j.<gate|up|down>     -> ffn.experts.w_in / w_up / w_out [E, ...]
    (Mixtral names them w1 / w3 / w2 under block_sparse_moe)
  layers.i.mlp.shared_expert.<gate|up|down>   -> ffn.shared.w_in / w_up / w_out  (Qwen2-MoE)
  layers.i.mlp.shared_expert_gate.weight      -> ffn.shared.w_gate [D, 1]
  layers.i.mlp.<gate|up|down>_proj            -> ffn.w_in / w_up / w_out  (dense layers)
  model.norm.weight                           -> final_norm.scale
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from moejax.layers.config import MoEConfig
from moejax.models.transformer import Transformer, TransformerConfig

FAMILIES = ("mixtral", "olmoe", "qwen2_moe", "qwen3_moe")
ARCHITECTURES = {"mixtral": "MixtralForCausalLM", "olmoe": "OlmoeForCausalLM",
                 "qwen2_moe": "Qwen2MoeForCausalLM", "qwen3_moe": "Qwen3MoeForCausalLM"}
INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


# --------------------------------------------------------------------------- configs


def config_from_hf(hf: dict, *, param_dtype=None, dtype=None) -> TransformerConfig:
    """The :class:`TransformerConfig` of a ``transformers`` ``config.json`` (as a dict)."""
    family = hf.get("model_type")
    if family not in FAMILIES:
        raise ValueError(f"config.json model_type must be one of {FAMILIES}, got {family!r}")
    act = hf.get("hidden_act", "silu")
    if act not in ("silu", "swish"):
        raise ValueError(f"config.json hidden_act must be 'silu' for {family}, got {act!r}")
    rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type not in ("default", "linear"):
        raise ValueError(f"config.json rope type {rope_type!r} is not supported (default, linear)")
    rope_base = rope.get("rope_theta", hf.get("rope_theta", 10_000.0))
    stored = _DTYPES.get(hf.get("dtype", hf.get("torch_dtype", "float32")), jnp.float32)
    param_dtype = param_dtype or stored
    d = hf["hidden_size"]
    num_experts = hf.get("num_local_experts", hf.get("num_experts"))
    k = hf["num_experts_per_tok"]
    moe_kw = dict(d_model=d, num_experts=num_experts, experts_per_token=k, expert="glu",
                  activation="silu", param_dtype=param_dtype, dtype=dtype)
    model_kw = dict(vocab_size=hf["vocab_size"], d_model=d, num_layers=hf["num_hidden_layers"],
                    num_heads=hf["num_attention_heads"],
                    num_kv_heads=hf.get("num_key_value_heads") or hf["num_attention_heads"],
                    d_ff=hf["intermediate_size"],
                    max_len=hf.get("max_position_embeddings", 4096), activation="silu",
                    dense_ffn="glu", rope_base=float(rope_base),
                    rope_scaling=float(rope.get("factor", 1.0)) if rope_type == "linear" else 1.0,
                    norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
                    tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
                    param_dtype=param_dtype, dtype=dtype or param_dtype)
    if hf.get("head_dim") and hf["head_dim"] * hf["num_attention_heads"] != d:
        model_kw["attention_head_dim"] = hf["head_dim"]
    if family == "mixtral":
        moe_kw.update(d_ff=hf["intermediate_size"], router="mixtral")
    else:
        moe_kw.update(d_ff=hf.get("moe_intermediate_size", hf["intermediate_size"]),
                      router="top_k", renormalize=bool(hf.get("norm_topk_prob", False)))
    if family == "olmoe":
        model_kw["qk_norm"] = "full"
    if family == "qwen3_moe":
        model_kw["qk_norm"] = "head"
    if family == "qwen2_moe":
        model_kw["qkv_bias"] = bool(hf.get("qkv_bias", True))
        if hf.get("shared_expert_intermediate_size"):
            moe_kw.update(num_shared_experts=1, shared_d_ff=hf["shared_expert_intermediate_size"],
                          shared_expert_gate=True)
    if family in ("qwen2_moe", "qwen3_moe"):
        if hf.get("mlp_only_layers"):
            raise ValueError("config.json mlp_only_layers is not supported (dense layers must be "
                             f"every decoder_sparse_step-th), got {hf['mlp_only_layers']}")
        model_kw["moe_every"] = hf.get("decoder_sparse_step", 1)
    if hf.get("sliding_window") and hf.get("use_sliding_window", family == "mixtral"):
        raise ValueError("config.json sliding_window attention is not supported")
    return TransformerConfig(moe=MoEConfig(**moe_kw), **model_kw)


def family_of(config: TransformerConfig) -> str:
    """Which ``FAMILIES`` layout a config is saved in (from its architectural choices)."""
    moe = config.moe
    if moe is None or moe.expert != "glu" or config.dense_ffn != "glu":
        raise ValueError("only MoE configs with GLU experts and GLU dense FFNs have a Hugging Face "
                         "layout here")
    if config.qkv_bias or moe.shared_expert_gate:
        return "qwen2_moe"
    if config.qk_norm == "full":
        return "olmoe"
    if config.qk_norm == "head":
        return "qwen3_moe"
    if moe.router == "mixtral":
        return "mixtral"
    raise ValueError("cannot tell the Hugging Face family of this config; pass family=")


def config_to_hf(config: TransformerConfig, family: str | None = None) -> dict:
    """The ``config.json`` dict of ``config`` in ``family``'s ``transformers`` layout."""
    c, m = config, config.moe
    family = family or family_of(config)
    if family not in FAMILIES:
        raise ValueError(f"family must be one of {FAMILIES}, got {family!r}")
    if c.first_dense_layers:
        raise ValueError(f"{family} has no first_dense_layers")
    dtype_name = {jnp.dtype(v): n for n, v in _DTYPES.items()}[jnp.dtype(c.param_dtype)]
    rope = {"rope_theta": c.rope_base, "rope_type": "default"}
    if c.rope_scaling != 1.0:
        rope.update(rope_type="linear", factor=c.rope_scaling)
    hf = dict(architectures=[ARCHITECTURES[family]], model_type=family, vocab_size=c.vocab_size,
              hidden_size=c.d_model, num_hidden_layers=c.num_layers,
              num_attention_heads=c.num_heads, num_key_value_heads=c.kv_heads,
              head_dim=c.head_dim, intermediate_size=c.d_ff, max_position_embeddings=c.max_len,
              hidden_act="silu", rms_norm_eps=c.norm_eps, rope_parameters=rope,
              rope_theta=c.rope_base, tie_word_embeddings=c.tie_embeddings,
              num_experts_per_tok=m.experts_per_token, dtype=dtype_name,
              attention_bias=c.qkv_bias)
    if family == "mixtral":
        hf.update(num_local_experts=m.num_experts, intermediate_size=m.d_ff)
    else:
        hf.update(num_experts=m.num_experts, moe_intermediate_size=m.d_ff,
                  norm_topk_prob=m.renormalize)
    if family == "qwen3_moe":
        hf["num_local_experts"] = m.num_experts
    if family in ("qwen2_moe", "qwen3_moe"):
        hf.update(decoder_sparse_step=c.moe_every, mlp_only_layers=[])
    if family == "qwen2_moe":
        hf.update(qkv_bias=c.qkv_bias,
                  shared_expert_intermediate_size=(m.shared_d_ff or m.d_ff) * m.num_shared_experts)
    return hf


# --------------------------------------------------------------------------- names


def _names(config: TransformerConfig, family: str) -> Iterator[tuple[str, list[str], Callable,
                                                                       Callable]]:
    """(our path, the checkpoint names it is made of, to_ours(list of arrays), to_theirs(array))."""
    c = config
    d, h, g, k = c.d_model, c.num_heads, c.kv_heads, c.head_dim
    same = (lambda ts: ts[0], lambda a: [a])
    linear = (lambda ts: ts[0].T, lambda a: [a.T])

    def heads(n):  # [n*K, D] -> [D, n, K]
        return (lambda ts: ts[0].T.reshape(d, n, k), lambda a: [a.reshape(d, n * k).T])

    def head_bias(n):
        return (lambda ts: ts[0].reshape(n, k), lambda a: [a.reshape(n * k)])

    def stacked(e):  # E Linear weights [out, in] -> [E, in, out]
        return (lambda ts: np.stack([t.T for t in ts]), lambda a: [a[j].T for j in range(e)])

    yield "embed", ["model.embed_tokens.weight"], *same
    if not c.tie_embeddings:
        yield "lm_head", ["lm_head.weight"], *linear
    yield "final_norm/scale", ["model.norm.weight"], *same
    for i in range(c.num_layers):
        p, q = f"layers/{i}", f"model.layers.{i}"
        yield f"{p}/attention_norm/scale", [f"{q}.input_layernorm.weight"], *same
        yield f"{p}/ffn_norm/scale", [f"{q}.post_attention_layernorm.weight"], *same
        for name, n in (("q", h), ("k", g), ("v", g)):
            yield f"{p}/attention/w_{name}", [f"{q}.self_attn.{name}_proj.weight"], *heads(n)
            if c.qkv_bias:
                yield f"{p}/attention/b_{name}", [f"{q}.self_attn.{name}_proj.bias"], *head_bias(n)
        yield (f"{p}/attention/w_o", [f"{q}.self_attn.o_proj.weight"],
               lambda ts: ts[0].T.reshape(h, k, d), lambda a: [a.reshape(h * k, d).T])
        if c.qk_norm is not None:
            for name in ("q", "k"):
                yield f"{p}/attention/{name}_norm/scale", [f"{q}.self_attn.{name}_norm.weight"], *same
        if c.is_moe_layer(i):
            m = c.moe
            block, names = (("block_sparse_moe", ("w1", "w3", "w2")) if family == "mixtral"
                            else ("mlp", ("gate_proj", "up_proj", "down_proj")))
            yield f"{p}/ffn/router/w_router", [f"{q}.{block}.gate.weight"], *linear
            for ours, theirs in zip(("w_in", "w_up", "w_out"), names):
                yield (f"{p}/ffn/experts/{ours}",
                       [f"{q}.{block}.experts.{j}.{theirs}.weight" for j in range(m.num_experts)],
                       *stacked(m.num_experts))
            if m.num_shared_experts:
                for ours, theirs in zip(("w_in", "w_up", "w_out"), ("gate", "up", "down")):
                    yield (f"{p}/ffn/shared/{ours}", [f"{q}.mlp.shared_expert.{theirs}_proj.weight"],
                           *linear)
                if m.shared_expert_gate:
                    yield f"{p}/ffn/shared/w_gate", [f"{q}.mlp.shared_expert_gate.weight"], *linear
        else:
            for ours, theirs in zip(("w_in", "w_up", "w_out"), ("gate", "up", "down")):
                yield f"{p}/ffn/{ours}", [f"{q}.mlp.{theirs}_proj.weight"], *linear


def _path_key(path) -> str:
    return "/".join(str(getattr(p, "key", getattr(p, "name", p))) for p in path)


# --------------------------------------------------------------------------- files


class _Reader:
    """Tensors by name from one checkpoint directory (single file or sharded with an index)."""

    def __init__(self, directory: str):
        from safetensors import safe_open

        self._open = safe_open
        index = os.path.join(directory, INDEX_FILE)
        if os.path.exists(index):
            with open(index) as f:
                self.where = {n: os.path.join(directory, fn)
                              for n, fn in json.load(f)["weight_map"].items()}
        elif os.path.exists(os.path.join(directory, SINGLE_FILE)):
            path = os.path.join(directory, SINGLE_FILE)
            with safe_open(path, "np") as f:
                self.where = {n: path for n in f.keys()}
        else:
            raise FileNotFoundError(f"{directory} has neither {INDEX_FILE} nor {SINGLE_FILE}")
        self._files = {}

    def get(self, name: str) -> np.ndarray:
        if name not in self.where:
            raise KeyError(f"the checkpoint has no tensor {name!r}")
        path = self.where[name]
        if path not in self._files:
            self._files[path] = self._open(path, "np")
        return self._files[path].get_tensor(name)

    def close(self):
        self._files.clear()


def _directory(path: str) -> str:
    return os.path.dirname(path) if os.path.isfile(path) else path


def read_config(path: str) -> dict:
    """The ``config.json`` of a Hugging Face checkpoint directory (or of a file inside it)."""
    config_path = os.path.join(_directory(path), "config.json")
    if not os.path.exists(config_path):
        raise ValueError(f"no config.json in the checkpoint directory {_directory(path)!r}")
    with open(config_path) as f:
        return json.load(f)


def load(path: str, *, param_dtype=None, dtype=None, mesh=None, rules=None,
         moe_changes: dict | None = None):
    """``(config, params)`` from a Hugging Face checkpoint directory (or a file inside it).

    ``param_dtype``: the parameters' dtype (default: the checkpoint's, from ``config.json``);
    ``dtype``: the compute dtype (default: ``param_dtype``). ``params`` is the
    ``nnx.State`` of the model's parameters; with ``mesh`` (and logical-axis ``rules``) each one is
    placed on its shards as it is read. ``moe_changes`` replaces fields of the MoE config that the
    checkpoint does not fix (``dispatch``, ``gmm_backend``, loss weights, ...).
    """
    config = config_from_hf(read_config(path), param_dtype=param_dtype, dtype=dtype)
    if moe_changes:
        config = config.replace(moe=config.moe.replace(**moe_changes))
    return config, load_params(path, config, mesh=mesh, rules=rules)


def load_params(path: str, config: TransformerConfig, *, mesh=None, rules=None):
    """The checkpoint's parameters (``nnx.State``) for a model built with ``config``.

    ``config`` must have the checkpoint's architecture (e.g. ``config_from_hf`` of its
    ``config.json`` with other dtypes, ``max_len`` or dispatch); tensors are converted to its
    ``param_dtype`` and, with ``mesh``, placed on their shards one at a time.
    """
    if config.scan_layers:
        raise ValueError("loading a Hugging Face checkpoint needs scan_layers=False (its layers "
                         "are stored one by one)")
    directory = _directory(path)
    family = read_config(path)["model_type"]
    abstract = nnx.eval_shape(lambda: Transformer(config, rngs=nnx.Rngs(0)))
    params = nnx.state(abstract, nnx.Param)
    shardings = None
    if mesh is not None:
        from moejax.parallel import state_shardings

        shardings = {_path_key(p): v.get_value()
                     for p, v in nnx.to_flat_state(state_shardings(params, mesh, rules))}
    reader = _Reader(directory)
    flat = {_path_key(p): (p, v) for p, v in nnx.to_flat_state(params)}
    loaded = []
    try:
        for ours, theirs, to_ours, _ in _names(config, family):
            if ours not in flat:
                raise KeyError(f"the model has no parameter {ours!r}")
            key, variable = flat.pop(ours)
            want = variable.get_value()
            value = np.asarray(to_ours([reader.get(n) for n in theirs]))
            if value.shape != want.shape:
                raise ValueError(f"checkpoint tensor(s) {theirs[0]}... give {ours} the shape "
                                 f"{value.shape}, the config expects {want.shape}")
            value = value.astype(want.dtype)
            placed = (jax.device_put(value, shardings[ours]) if shardings is not None
                      else jnp.asarray(value))
            loaded.append((key, variable.replace(placed)))
    finally:
        reader.close()
    if flat:
        raise ValueError(f"no checkpoint tensor for parameters {sorted(flat)}")
    return nnx.from_flat_state(loaded)


def load_model(path: str, dtype=jnp.float32, *, mesh=None, rules=None,
               moe_changes: dict | None = None) -> Transformer:
    """A :class:`Transformer` in eval mode with the checkpoint's weights in ``dtype``."""
    config, params = load(path, param_dtype=dtype, dtype=dtype, mesh=mesh, rules=rules,
                          moe_changes=moe_changes)
    abstract = nnx.eval_shape(lambda: Transformer(config, rngs=nnx.Rngs(0)))
    graphdef, _, rest = nnx.split(abstract, nnx.Param, ...)
    if jax.tree.leaves(rest):
        raise ValueError("the model has state besides parameters that a checkpoint cannot fill")
    model = nnx.merge(graphdef, params, rest)
    model.eval()
    return model


def save(path: str, config: TransformerConfig, params, *, family: str | None = None,
         max_shard_bytes: int = 5 * 2**30) -> list[str]:
    """Writes ``config.json`` and the safetensors files (sharded, with an index, when the tensors
    exceed ``max_shard_bytes``) into directory ``path``; returns the files written.

    ``params``: the model's ``nnx.State`` of parameters (or the model itself). Tensors are
    stored in the parameters' dtype.
    """
    from safetensors.numpy import save_file

    family = family or family_of(config)
    if isinstance(params, nnx.Module):
        params = nnx.state(params, nnx.Param)
    flat = {_path_key(p): v.get_value() for p, v in nnx.to_flat_state(params)}
    entries = list(_names(config, family))
    missing = sorted({e[0] for e in entries} - set(flat))
    if missing:
        raise ValueError(f"params lack {missing} (does the config match the parameters?)")
    # Plan the files from shapes alone; then write one file at a time.
    files: list[list[tuple]] = [[]]
    size = 0
    for entry in entries:
        nbytes = flat[entry[0]].size * jnp.dtype(flat[entry[0]].dtype).itemsize
        if files[-1] and size + nbytes > max_shard_bytes:
            files.append([])
            size = 0
        files[-1].append(entry)
        size += nbytes
    os.makedirs(path, exist_ok=True)
    names = ([SINGLE_FILE] if len(files) == 1 else
             [f"model-{i + 1:05d}-of-{len(files):05d}.safetensors" for i in range(len(files))])
    weight_map, total = {}, 0
    for name, entries in zip(names, files):
        tensors = {}
        for ours, theirs, _, to_theirs in entries:
            for n, t in zip(theirs, to_theirs(np.asarray(jax.device_get(flat[ours])))):
                tensors[n] = np.ascontiguousarray(t)
                weight_map[n] = name
                total += t.nbytes
        save_file(tensors, os.path.join(path, name), metadata={"format": "pt"})
    written = list(names)
    if len(files) > 1:
        with open(os.path.join(path, INDEX_FILE), "w") as f:
            json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
        written.append(INDEX_FILE)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(config_to_hf(config, family), f, indent=2)
    written.append("config.json")
    return written
