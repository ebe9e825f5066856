"""Language models built from moejax layers: the decoder-only :class:`Transformer` and greedy decoding."""

from moejax.models.generate import greedy_generate
from moejax.models.transformer import KVCache, LMAux, Transformer, TransformerConfig, count_params

__all__ = ["KVCache", "LMAux", "Transformer", "TransformerConfig", "count_params", "greedy_generate"]
