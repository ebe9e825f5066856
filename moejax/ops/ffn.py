"""The feed-forward block, written once: ``w_out · (act(x · w_in) [* (x · w_up)])``.

:func:`ffn` takes the matmul as an argument, so the same math serves a plain FFN (``x @ w``), a
capacity buffer (batched ``[E, C, D] @ [E, D, F]``), dense MoE (every expert on every token) and
dropless MoE (``gmm`` over expert-sorted rows). :class:`ExpertFFN` is E experts' weights with how to
run them (activation, gmm backend, tiling, interpret mode): what the MoE layer hands its dispatch
and ``moejax.parallel``'s expert-parallel functions.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp

from moejax.ops.gmm import gmm

ACTIVATION_FNS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "relu": jax.nn.relu,
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "gelu_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "silu": jax.nn.silu,
    "swish": jax.nn.silu,
    "squared_relu": lambda x: jnp.square(jax.nn.relu(x)),
}


def activation_fn(activation: str | Callable[[jax.Array], jax.Array]):
    """A name from ``ACTIVATION_FNS`` (ValueError listing them otherwise) or a callable, as is."""
    if callable(activation):
        return activation
    try:
        return ACTIVATION_FNS[activation]
    except KeyError:
        raise ValueError(
            f"activation must be one of {sorted(ACTIVATION_FNS)}, got {activation!r}") from None


def ffn(x, w_in, w_out, w_up=None, *, activation, matmul=jnp.matmul, hidden=None):
    """``matmul(act(matmul(x, w_in)) [* matmul(x, w_up)], w_out)``; ``hidden`` (optional) is
    applied to the hidden activations (e.g. a sharding constraint)."""
    h = activation_fn(activation)(matmul(x, w_in))
    if w_up is not None:
        h = h * matmul(x, w_up)
    if hidden is not None:
        h = hidden(h)
    return matmul(h, w_out)


@functools.partial(jax.tree_util.register_dataclass,
                   data_fields=["w_in", "w_out", "w_up"],
                   meta_fields=["activation", "gmm_backend", "gmm_tiling", "gmm_interpret"])
@dataclasses.dataclass(frozen=True)
class ExpertFFN:
    """E experts: ``w_in`` [E, D, F], ``w_out`` [E, F, D], ``w_up`` [E, D, F] for GLU (else None),
    run with ``activation`` and, for grouped rows, ``moejax.ops.gmm`` with the given backend."""

    w_in: jax.Array
    w_out: jax.Array
    w_up: jax.Array | None = None
    activation: str = "gelu"
    gmm_backend: str = "auto"
    gmm_tiling: tuple[int, int, int] | None = None
    gmm_interpret: bool | None = None

    @property
    def num_experts(self) -> int:
        return self.w_in.shape[0]

    @property
    def weights(self) -> tuple[jax.Array, jax.Array | None, jax.Array]:
        return self.w_in, self.w_up, self.w_out

    def with_weights(self, w_in, w_up, w_out) -> "ExpertFFN":
        """The same experts over other weights (e.g. a device's shard inside ``shard_map``)."""
        return dataclasses.replace(self, w_in=w_in, w_up=w_up, w_out=w_out)

    def astype(self, dtype) -> "ExpertFFN":
        return self.with_weights(*(None if w is None else w.astype(dtype) for w in self.weights))

    def _ffn(self, x, matmul):
        return ffn(x, self.w_in, self.w_out, self.w_up, activation=self.activation,
                   matmul=matmul)

    @property
    def gmm_options(self) -> dict:
        """How these experts run ``moejax.ops.gmm`` / ``tgmm``: backend, tiling, interpret mode."""
        return dict(backend=self.gmm_backend, tiling=self.gmm_tiling,
                    interpret=self.gmm_interpret)

    def grouped(self, x_RxD, group_sizes_E, group_offset=None):
        """Dropless: rows sorted by expert, ``group_sizes_E`` rows each (``group_offset``: the
        first expert these weights hold, under expert parallelism)."""
        matmul = functools.partial(gmm, group_sizes=group_sizes_E, group_offset=group_offset,
                                   **self.gmm_options)
        return self._ffn(x_RxD, matmul)

    def batched(self, x_ExCxD):
        """Capacity: one ``[C, D]`` buffer per expert of these weights."""
        return self._ffn(x_ExCxD, jnp.matmul)

    def every_expert(self, x_TxD):
        """Dense: every expert on every token, ``[T, E, D]``."""
        def matmul(a, w):
            return jnp.einsum("td,edf->tef" if a.ndim == 2 else "tef,efd->ted", a, w)
        return self._ffn(x_TxD, matmul)
