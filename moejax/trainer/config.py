"""The trainer's one config schema: every key, its default and the values it accepts.

``default_config()`` is a locked ``ml_collections.ConfigDict`` holding every key at its default (experiment
files start from it, so a command-line override of any key works and a misspelt one is an error).
``complete_config(config)`` overlays a user config (a ``ConfigDict`` or a dict, possibly partial) on the
defaults, checks every key and value, and returns the result locked. ``model`` and ``moe`` hold
:class:`TransformerConfig` / :class:`MoEConfig` fields (``model_fields()`` / ``moe_fields()`` give all of
them at their defaults), which those dataclasses validate; ``make_model_config`` builds them.

The tokenizer comes from one place, :func:`get_tokenizer` (``setup`` builds it once); the model's
vocabulary is ``config.vocab_size`` or, by default, the tokenizer's.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
from typing import Any, Callable, NamedTuple

import jax.numpy as jnp
import ml_collections

from moejax import data as data_lib
from moejax.layers.config import MoEConfig
from moejax.models.transformer import TransformerConfig

FREEZE_OPTIONS = ("none", "router", "experts", "non_expert")
TOKENIZER_SCHEMES = ("sentencepiece:", "hf:")


class Spec(NamedTuple):
    """One key: its default and a test of a value, with the words that describe what it accepts."""

    default: Any
    test: Callable[[Any], bool]
    expected: str


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_real(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def positive_int(default):
    return Spec(default, lambda v: _is_int(v) and v >= 1, "a positive int")


def nonnegative_int(default):
    return Spec(default, lambda v: _is_int(v) and v >= 0, "an int >= 0")


def real(default, low=-math.inf, high=math.inf, *, low_open=False, high_open=False):
    def test(v):
        return (_is_real(v) and (v > low if low_open else v >= low)
                and (v < high if high_open else v <= high))

    if high == math.inf:
        return Spec(default, test, f"a finite number {'>' if low_open else '>='} {low:g}")
    left, right = "(" if low_open else "[", ")" if high_open else "]"
    return Spec(default, test, f"a finite number in {left}{low:g}, {high:g}{right}")


def text(default):
    return Spec(default, lambda v: isinstance(v, str) and bool(v), "a non-empty string")


def optional_text(default=None):
    return Spec(default, lambda v: v is None or (isinstance(v, str) and bool(v)),
                "None or a non-empty string")


def flag(default):
    return Spec(default, lambda v: isinstance(v, bool), "a bool")


def one_of(default, options):
    return Spec(default, lambda v: v in options, f"one of {options}")


def _mesh_size(default):
    return Spec(default, lambda v: _is_int(v) and (v >= 1 or v == -1),
                "a positive int or -1 (all remaining devices)")


# Sections that are None or a dict of known keys (validated where they are used).
MODEL_KEYS = tuple(f.name for f in dataclasses.fields(TransformerConfig)
                   if f.name not in ("vocab_size", "max_len", "moe"))
MOE_KEYS = tuple(f.name for f in dataclasses.fields(MoEConfig)
                 if f.name not in ("d_model", "dtype", "param_dtype"))
INSTRUCT_EVAL_DEFAULTS = dict(families=None, num_examples=32, max_new_tokens=16, seed=2)
DISTRIBUTED_KEYS = ("coordinator_address", "num_processes", "process_id")
OPEN_SECTIONS = {"model": MODEL_KEYS, "moe": MOE_KEYS, "instruct_eval": tuple(INSTRUCT_EVAL_DEFAULTS),
                 "distributed": DISTRIBUTED_KEYS}

SCHEMA: dict[str, Any] = dict(
    dataset=text("stdlib_text"),
    train_split=text("train"),
    eval_split=text("validation"),
    data_dir=optional_text(),
    text_key=text("text"),
    # Stream the data (create_iterator(stream=True)): each process reads and tokenizes only its own
    # documents as it trains; nothing pre-read or cached. For very large splits (c4/en); a run then
    # resumes only with the same number of processes.
    stream_data=flag(False),
    # "byte", "sentencepiece:<path to .model>" or "hf:<path to tokenizer.json>" (moejax.data.get_tokenizer).
    tokenizer=Spec("byte", lambda v: isinstance(v, str) and (
        v == "byte" or any(v.startswith(p) and len(v) > len(p) for p in TOKENIZER_SCHEMES)),
        "'byte', 'sentencepiece:<path to .model>' or 'hf:<path to tokenizer.json>'"),
    # The model's vocabulary. None: the tokenizer's own (padded to a multiple of 128); else a
    # multiple of 128 at least as large as that.
    vocab_size=Spec(None, lambda v: v is None or (_is_int(v) and v >= 1 and v % 128 == 0),
                    "None or a positive multiple of 128"),
    seq_len=positive_int(128),
    batch_size=positive_int(16),
    num_train_steps=positive_int(1000),
    seed=Spec(0, _is_int, "an int"),
    optimizer=dict(
        learning_rate=real(3e-3, 0.0, low_open=True),
        warmup_steps=nonnegative_int(100),
        end_learning_rate_ratio=real(0.1, 0.0, 1.0),
        weight_decay=real(0.1, 0.0),
        b1=real(0.9, 0.0, 1.0, high_open=True),
        b2=real(0.95, 0.0, 1.0, high_open=True),
        eps=real(1e-8, 0.0, low_open=True),
        grad_clip_norm=real(1.0, 0.0, low_open=True),
    ),
    mesh=dict(data=_mesh_size(-1), fsdp=_mesh_size(1), expert=_mesh_size(1),
              tensor=_mesh_size(1)),
    sharding_rules=Spec(None, lambda v: v is None or isinstance(v, (list, tuple)),
                        "None or a sequence of (logical axis, mesh axes) rules"),
    log_every_steps=positive_int(10),
    eval_every_steps=positive_int(200),
    eval_batches=positive_int(4),
    checkpoint_every_steps=positive_int(200),
    keep_checkpoints=positive_int(3),
    init_from=optional_text(),
    # With init_from = a dense run: copy its FFNs into every expert of this MoE model (sparse
    # upcycling, Komatsuzaki et al. 2022); the routers start at zero plus upcycle_noise.
    upcycle=flag(False),
    upcycle_noise=real(0.0, 0.0),
    freeze=one_of("none", FREEZE_OPTIONS),
    progress_bar=flag(True),
    # DeepSeek-V3's bias update speed (gamma); used only by router="deepseek_v3".
    router_bias_update_rate=real(1e-3, 0.0),
    # 0: a step with a non-finite loss or gradient norm stops the run. N > 0: such a step is
    # skipped (no update) and the run stops at the (N+1)-th.
    skip_nonfinite_steps=nonnegative_int(0),
    # A resumed run refuses a config that differs from the one its workdir was started with;
    # True accepts changes that keep every array's shape (optimizer values, evaluation, ...).
    allow_new_config=flag(False),
    model=None,
    moe=None,
    instruct_eval=None,
    distributed=None,
)


def default_config() -> ml_collections.ConfigDict:
    """Every key of :data:`SCHEMA` at its default, locked (``model`` must still be set)."""
    config = ml_collections.ConfigDict(_defaults(SCHEMA))
    config.lock()
    return config


def model_fields(**overrides) -> dict[str, Any]:
    """Every ``config.model`` key at its :class:`TransformerConfig` default (dtypes by name), updated."""
    return _dataclass_fields(TransformerConfig, MODEL_KEYS, "model", overrides)


def moe_fields(**overrides) -> dict[str, Any]:
    """Every ``config.moe`` key at its :class:`MoEConfig` default, updated by ``overrides``."""
    return _dataclass_fields(MoEConfig, MOE_KEYS, "moe", overrides)


def _dataclass_fields(cls, keys, where, overrides) -> dict[str, Any]:
    out = {}
    for field in dataclasses.fields(cls):
        if field.name in keys and field.default is not dataclasses.MISSING:
            value = field.default
            out[field.name] = jnp.dtype(value).name if field.name.endswith("dtype") else value
    for key in overrides:
        _check_key(key, keys, f"config.{where}")
    out.update(overrides)
    return out


def complete_config(config) -> ml_collections.ConfigDict:
    """``config`` over the defaults, every key and value checked; returned locked.

    An unknown key raises a ValueError naming the closest known one; a bad value one naming the key
    and what it accepts.
    """
    user = config.to_dict() if isinstance(config, ml_collections.ConfigDict) else dict(config)
    merged = _defaults(SCHEMA)
    for key, value in user.items():
        _check_key(key, SCHEMA, "config")
        if isinstance(SCHEMA[key], dict) and value is not None:
            for sub in value:
                _check_key(sub, SCHEMA[key], f"config.{key}")
            merged[key].update(value)
        else:
            merged[key] = value
    for name, allowed in OPEN_SECTIONS.items():
        if merged[name] is not None and not isinstance(merged[name], dict):
            raise ValueError(f"config.{name} must be None or a dict, got {merged[name]!r}")
        for sub in merged[name] or {}:
            _check_key(sub, allowed, f"config.{name}")
    if merged["model"] is None and hf_checkpoint(merged) is None:
        raise ValueError(f"config.model is required (a dict of {MODEL_KEYS})")
    if merged["instruct_eval"] is not None:
        merged["instruct_eval"] = {**INSTRUCT_EVAL_DEFAULTS, **merged["instruct_eval"]}
    _check_values(SCHEMA, merged, "config")
    _check_relations(merged)
    completed = ml_collections.ConfigDict(merged)
    completed.lock()
    return completed


def _defaults(schema) -> dict[str, Any]:
    return {key: _defaults(spec) if isinstance(spec, dict) else
            (spec.default if isinstance(spec, Spec) else spec) for key, spec in schema.items()}


def _check_key(key, allowed, where) -> None:
    if key not in allowed:
        close = difflib.get_close_matches(key, list(allowed), n=1)
        hint = f"; did you mean {close[0]!r}?" if close else f"; known keys: {sorted(allowed)}"
        raise ValueError(f"{where}.{key} is not a known key{hint}")


def _check_values(schema, values, where) -> None:
    for key, spec in schema.items():
        if isinstance(spec, dict):
            _check_values(spec, values[key], f"{where}.{key}")
        elif isinstance(spec, Spec) and not spec.test(values[key]):
            raise ValueError(f"{where}.{key} must be {spec.expected}, got {values[key]!r}")


def _check_relations(config) -> None:
    if config["upcycle"] and (not config["init_from"] or hf_checkpoint(config) is not None
                              or config["moe"] is None):
        raise ValueError("config.upcycle needs config.init_from = a dense run's workdir and "
                         "config.moe (the MoE to build from it)")
    if config["freeze"] in ("router", "experts") and config["moe"] is None:
        raise ValueError(f"config.freeze = {config['freeze']!r} needs an MoE model "
                         "(config.moe is None)")
    if config["instruct_eval"] is not None and config["instruct_eval"]["families"] is not None:
        families = data_lib.instruct_synth.FAMILIES
        for family in config["instruct_eval"]["families"]:
            if family not in families:
                raise ValueError(f"config.instruct_eval.families: unknown family {family!r}; "
                                 f"expected names from {list(families)}")
    if config["tokenizer"] == "byte":  # a file tokenizer is checked when setup loads it
        get_tokenizer(config)


def get_tokenizer(config) -> data_lib.Tokenizer:
    """The tokenizer ``config.tokenizer`` names (loaded from its file), checked against
    ``config.vocab_size``. The one place the trainer obtains it: :func:`moejax.trainer.setup` calls
    it once and keeps the result in ``TrainSetup.tokenizer``."""
    try:
        tokenizer = data_lib.get_tokenizer(config["tokenizer"])
    except (OSError, ValueError) as error:
        raise ValueError(f"config.tokenizer = {config['tokenizer']!r}: {error}") from error
    vocab_size = config["vocab_size"]
    if vocab_size is not None and vocab_size < tokenizer.vocab_size:
        raise ValueError(f"config.vocab_size = {vocab_size} is smaller than the vocabulary of "
                         f"tokenizer {config['tokenizer']!r} ({tokenizer.vocab_size} ids, padded "
                         "to a multiple of 128); use None or a larger multiple of 128")
    return tokenizer


def model_vocab_size(config, tokenizer: data_lib.Tokenizer) -> int:
    """The model's vocabulary: ``config.vocab_size`` if set, else ``tokenizer.vocab_size``."""
    return config["vocab_size"] or tokenizer.vocab_size


def _dtype(name):
    try:
        return jnp.dtype(name)
    except TypeError as error:
        raise ValueError(f"unknown dtype {name!r} (use e.g. 'float32' or 'bfloat16')") from error


HF_PREFIX = "hf:"
# What config.model / config.moe may still choose when a Hugging Face checkpoint fixes the model.
HF_MODEL_KEYS = ("dtype", "param_dtype", "remat")
HF_MOE_KEYS = ("dispatch", "capacity_factor", "capacity_order", "gmm_backend", "gmm_tiling",
               "gmm_interpret", "remat", "load_balancing_weight", "z_loss_weight",
               "importance_weight", "load_weight", "sequence_balance_weight", "router_jitter",
               "ep_exchange_factor", "rng_stream")


def hf_checkpoint(config) -> str | None:
    """The checkpoint directory of ``init_from = "hf:<dir>"``, else None."""
    init_from = config["init_from"] or ""
    return init_from[len(HF_PREFIX):] if init_from.startswith(HF_PREFIX) else None


def _hf_model_config(config, path: str, tokenizer: data_lib.Tokenizer) -> TransformerConfig:
    """The checkpoint's architecture, with the run's dtypes, sequence length and dispatch."""
    from moejax.models import hf

    for section, allowed in (("model", HF_MODEL_KEYS), ("moe", HF_MOE_KEYS)):
        fixed = sorted(set(config[section] or {}) - set(allowed))
        if fixed:
            raise ValueError(f"config.{section}.{fixed[0]} is fixed by the checkpoint "
                             f"init_from = {config['init_from']!r}; with a Hugging Face checkpoint "
                             f"config.{section} may only set {allowed}")
    model = dict(config.model or {})
    param_dtype = _dtype(model["param_dtype"]) if "param_dtype" in model else None
    dtype = _dtype(model["dtype"]) if "dtype" in model else None
    try:
        result = hf.config_from_hf(hf.read_config(path), param_dtype=param_dtype, dtype=dtype)
    except (OSError, KeyError, ValueError) as error:
        raise ValueError(f"config.init_from = {config['init_from']!r}: {error}") from error
    if config["vocab_size"] is not None and config["vocab_size"] != result.vocab_size:
        raise ValueError(f"config.vocab_size = {config['vocab_size']} differs from the checkpoint's "
                         f"vocab_size {result.vocab_size}; leave it None")
    if tokenizer.num_ids > result.vocab_size:
        raise ValueError(f"tokenizer {config['tokenizer']!r} has {tokenizer.num_ids} ids, more than "
                         f"the checkpoint's vocab_size {result.vocab_size}: use the checkpoint's "
                         "own tokenizer (tokenizer = 'hf:<dir>/tokenizer.json')")
    moe = result.moe.replace(**dict(config.moe or {})) if result.moe is not None else None
    return result.replace(max_len=config.seq_len, remat=bool(model.get("remat", False)), moe=moe)


def make_model_config(config, tokenizer: data_lib.Tokenizer | None = None) -> TransformerConfig:
    """The :class:`TransformerConfig` (with its :class:`MoEConfig`) that a completed ``config`` describes.

    ``tokenizer``: ``get_tokenizer(config)``, built here when not given. With
    ``init_from = "hf:<dir>"`` the architecture is the checkpoint's (``config.json``).
    """
    if tokenizer is None:
        tokenizer = get_tokenizer(config)
    path = hf_checkpoint(config)
    if path is not None:
        return _hf_model_config(config, path, tokenizer)
    model = dict(config.model)
    for key in ("dtype", "param_dtype"):
        if key in model:
            model[key] = _dtype(model[key])
    vocab_size = model_vocab_size(config, tokenizer)
    moe = None
    if config.moe is not None:
        moe_fields = dict(config.moe)
        # A hash router's table covers the token ids: by default the model's whole vocabulary.
        if moe_fields.get("router") == "hash":
            table = moe_fields.get("hash_vocab_size") or vocab_size
            if table < vocab_size:
                raise ValueError(f"config.moe.hash_vocab_size = {table} is smaller than the model's "
                                 f"vocab_size {vocab_size}: token ids past it would have no "
                                 "expert; use 0 (the model's vocabulary) or a larger value")
            moe_fields["hash_vocab_size"] = table
        moe = MoEConfig(d_model=model["d_model"], dtype=model.get("dtype", jnp.float32),
                        param_dtype=model.get("param_dtype", jnp.float32), **moe_fields)
    return TransformerConfig(vocab_size=vocab_size, max_len=config.seq_len,
                             moe=moe, **model)
