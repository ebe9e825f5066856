"""Pure functions on arrays: routing, dispatch and the grouped-matmul front end."""

from moejax.ops import dispatch, routing
from moejax.ops.gmm import gmm, tgmm

__all__ = ["dispatch", "gmm", "routing", "tgmm"]
