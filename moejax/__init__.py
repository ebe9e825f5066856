"""moejax: Mixture-of-Experts for JAX/Flax.

``moejax.MoE`` / ``moejax.MoEConfig`` (flax.nnx), ``moejax.linen.MoE`` (Linen), ``moejax.collect_aux``
(sown aux losses), ``moejax.ops``
(routers, dispatch and the grouped-matmul kernels as pure functions).
"""

from moejax import linen, ops
from moejax.layers.config import MoEConfig
from moejax.layers.moe import MoE, MoEAux, collect_aux

__version__ = "0.1.0"

__all__ = ["MoE", "MoEAux", "MoEConfig", "collect_aux", "linen", "ops"]
