"""Pure functions on arrays: routing, dispatch and the grouped-matmul front end."""

from moejax.ops import dispatch, dropless, ffn, routing
from moejax.ops.gmm import gmm, tgmm

__all__ = ["dispatch", "dropless", "ffn", "gmm", "routing", "tgmm"]
