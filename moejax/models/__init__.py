"""Language models built from moejax layers: the decoder-only :class:`Transformer`, KV-cache
decoding, sparse upcycling; presets of published MoEs (``moejax.models.presets``) and their Hugging
Face checkpoints (``moejax.models.hf``)."""

from moejax.models.generate import generate, greedy_generate
from moejax.models.upcycle import upcycle
from moejax.models.transformer import KVCache, LMAux, Transformer, TransformerConfig, count_params

__all__ = ["KVCache", "LMAux", "Transformer", "TransformerConfig", "count_params", "generate",
           "greedy_generate", "upcycle"]
