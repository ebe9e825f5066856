"""Dropless MoE feed-forward on one device: permute -> E experts (gmm) -> combine, one custom VJP.

``dropless_ffn(x, copies, weights, experts)`` equals ``unpermute(experts.grouped(permute(x)))``
with the gates ``weights`` (f32 result), and differentiates with respect to ``x``, the gates and
the expert weights. Written as one VJP it chooses what the backward pass keeps and when each
buffer is written, where the composition of the three ops keeps every intermediate:

* **Residuals**: only the hidden pre-activations ``h = x_perm · w_in`` (and ``x_perm · w_up`` for
  GLU experts). The activations are computed from ``h`` again (XLA may merge that with the
  forward pass's and keep those: it does for exact gelu, with its erf and exp terms), and the
  expert outputs ``y_perm`` are not kept at all. The accelerator backends keep the sorted copies
  ``x_perm`` too.
* **No sorted copies on the ``cpu`` backend**: there the gmm and tgmm kernels take ``x`` (and the
  cotangent ``dy``) with the copies' token indices and gather each row chunk where they would
  otherwise slice it (XLA:CPU copies a dynamically sliced matmul operand anyway), so the
  ``[T·k, D]`` buffers ``x_perm`` (forward, and again for ``w_in``'s gradient) and ``dy_perm``
  are never written.
* **Gate gradients without ``y_perm``**: ``d gate[t, j] = <dy[t], y_perm[r]>`` with
  ``y_perm[r] = a[r] · w_out[e]`` equals ``<dy[t] · w_out[e]ᵀ, a[r]>``: a row sum over the
  product ``g = dy_perm · w_out[e]ᵀ`` that the input gradient needs anyway, taken before the gate
  scales it.
* **Order**: the backward pass runs ``g``, the gate gradients, ``w_out``'s gradient, then the
  hidden gradient, ``x``'s and ``w_in``'s gradients; each step is made to wait for the previous
  one (:func:`_after`), so fewer ``[T·k, F]`` / ``[T·k, D]`` buffers are live at once. Compiled
  temporaries of the layer's forward+backward at T = 8192, d_model = d_ff = 512, k = 2, relu:
  115 MiB at E = 8 and 88 MiB at E = 64 (gelu: 209 and 182 MiB), against 177 and 137 MiB (relu)
  for the three ops differentiated one by one.

On the CPU every buffer a call writes is memory faulted in afresh, so buffers not written are time
saved (``benchmarks/RESULTS.md``). Results equal the composition up to float rounding.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from moejax.kernels import cpu as cpu_kernels
from moejax.kernels.common import false_from, promote_types
from moejax.ops import dispatch as dispatch_ops
from moejax.ops.ffn import ExpertFFN, activation_fn
from moejax.ops.gmm import _normalize_tiling, gmm, resolve_backend, tgmm


def dropless_ffn(x_TxD: jax.Array, copies: dispatch_ops.SortedCopies, weights_TxK: jax.Array,
                 experts: ExpertFFN) -> jax.Array:
    """``y[t] = sum_j weights[t, j] · FFN_{e(t, j)}(x[t])`` in f32, for the copies sorted by
    :func:`moejax.ops.dispatch.permute` (unassigned copies after the last group count 0).
    ``x_TxD`` and the expert weights should be in the compute dtype."""
    num_tokens, k = weights_TxK.shape
    if x_TxD.shape[0] != num_tokens or copies.order_TK.shape != (num_tokens * k,):
        raise ValueError(
            f"dropless_ffn: x {x_TxD.shape}, weights {weights_TxK.shape} and the sorted copies "
            f"({copies.order_TK.shape[0]}) must agree on T = {num_tokens} tokens, k = {k}")
    gather_in_gmm = resolve_backend(experts.gmm_backend) == "cpu"
    with jax.named_scope("dropless_ffn"):
        # Inside a shard_map the expert weights too: each shard's weight gradients vary, and
        # JAX sums them over the shards (the transpose of the cast) into the weights' type.
        w_in, w_up, w_out = experts.weights
        x_TxD, weights_TxK, order_TK, inverse_TK, w_in, w_out, *w_up = (
            dispatch_ops._varying_as_all(x_TxD, weights_TxK, copies.order_TK, copies.inverse_TK,
                                         w_in, w_out, *([] if w_up is None else [w_up])))
        experts = experts.with_weights(w_in, w_up[0] if w_up else None, w_out)
        return _dropless((k, gather_in_gmm), x_TxD, weights_TxK, order_TK, inverse_TK,
                         copies.group_sizes_E, experts)


def _after(x, dep):
    """``x``, computed no earlier than ``dep`` (a dependency XLA cannot fold away)."""
    return jnp.where(false_from(dep), jnp.zeros_like(x), x)


def _sorted_rows(src_TxD, tokens_TK, gather_in_gmm: bool, scope: str):
    """The sorted copies' rows of ``src`` as ``(array, rows)`` for :func:`_mm` / :func:`_weight_grad`:
    ``(src, tokens)`` for the ``cpu`` kernels to gather chunk by chunk (the ``[T·k, D]`` array is
    never written), else ``(src[tokens], None)``, built once."""
    if gather_in_gmm:
        return src_TxD, tokens_TK
    with jax.named_scope(scope):
        return dispatch_ops._rows(src_TxD, tokens_TK), None


def _mm(lhs, rhs, group_sizes, experts, lhs_rows=None, transpose_rhs=False):
    """``gmm(lhs, rhs)``, or ``gmm(lhs[lhs_rows], rhs)`` gathered by the ``cpu`` kernel."""
    if lhs_rows is None:
        return gmm(lhs, rhs, group_sizes, transpose_rhs=transpose_rhs, **experts.gmm_options)
    with jax.named_scope("gmm"):
        return cpu_kernels.gmm(
            lhs, rhs, group_sizes, jnp.int32(0), transpose_rhs=transpose_rhs,
            preferred_element_type=promote_types(lhs.dtype, rhs.dtype),
            tiling=_normalize_tiling(experts.gmm_tiling), interpret=None, lhs_rows=lhs_rows)


def _weight_grad(lhs, rhs, group_sizes, experts, like, lhs_rows=None, rhs_rows=None):
    """``tgmm(lhs, rhs)`` in ``like``'s dtype; an operand with rows is gathered by the ``cpu``
    kernel."""
    if lhs_rows is None and rhs_rows is None:
        out = tgmm(lhs, rhs, group_sizes, **experts.gmm_options)
    else:
        with jax.named_scope("tgmm"):
            out = cpu_kernels.tgmm(
                lhs, rhs, group_sizes, jnp.int32(0), num_groups=group_sizes.shape[0],
                preferred_element_type=promote_types(lhs.dtype, rhs.dtype),
                tiling=_normalize_tiling(experts.gmm_tiling), interpret=None,
                lhs_rows=lhs_rows, rhs_rows=rhs_rows)
    return out.astype(like.dtype)


def _forward(k, gather_in_gmm, x_TxD, weights_TxK, order_TK, inverse_TK, group_sizes, experts):
    x_src, x_rows = _sorted_rows(x_TxD, dispatch_ops._tokens(order_TK, k), gather_in_gmm,
                                 "permute")
    h = _mm(x_src, experts.w_in, group_sizes, experts, x_rows)
    up = None if experts.w_up is None else _mm(x_src, experts.w_up, group_sizes, experts, x_rows)
    a = activation_fn(experts.activation)(h)
    if up is not None:
        a = a * up
    y_perm = _mm(a, experts.w_out, group_sizes, experts)
    with jax.named_scope("unpermute"):
        y = dispatch_ops._weighted_rows(y_perm, weights_TxK,
                                        inverse_TK.reshape(weights_TxK.shape))
    # The sorted copies are kept where they were built (x itself is a residual anyway).
    return y, (None if gather_in_gmm else x_src, h, up)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _dropless(config, x_TxD, weights_TxK, order_TK, inverse_TK, group_sizes, experts):
    return _forward(*config, x_TxD, weights_TxK, order_TK, inverse_TK, group_sizes, experts)[0]


def _dropless_fwd(config, x_TxD, weights_TxK, order_TK, inverse_TK, group_sizes, experts):
    y, (x_perm, h, up) = _forward(*config, x_TxD, weights_TxK, order_TK, inverse_TK,
                                  group_sizes, experts)
    return y, (x_TxD, weights_TxK, order_TK, inverse_TK, group_sizes, experts, h, up, x_perm)


def _dropless_bwd(config, residuals, dy_TxD):
    with jax.named_scope("backward"):
        return _backward(*config, residuals, dy_TxD)


def _backward(k, gather_in_gmm, residuals, dy_TxD):
    (x_TxD, weights_TxK, order_TK, inverse_TK, group_sizes, experts, h, up,
     x_perm) = residuals
    w_in, w_up, w_out = experts.weights

    def mm_t(lhs, rhs, lhs_rows=None):  # lhs · rhs[e]ᵀ
        return _mm(lhs, rhs, group_sizes, experts, lhs_rows,
                   transpose_rhs=True).astype(jnp.float32)

    dtype = x_TxD.dtype
    tokens_TK = dispatch_ops._tokens(order_TK, k)
    inverse_TxK = inverse_TK.reshape(weights_TxK.shape)
    # Unweighted cotangent rows, then g = dy_perm · w_out[e]ᵀ (the gates are applied after).
    dy_src, dy_rows = _sorted_rows(dy_TxD.astype(dtype), tokens_TK, gather_in_gmm, "unpermute")
    g = mm_t(dy_src, w_out, dy_rows)
    act, act_vjp = jax.vjp(activation_fn(experts.activation), h)
    a = act if up is None else act * up
    a = a.astype(jnp.float32)
    # d gate = <dy[t], a[r] · w_out[e]> = <g[r], a[r]>.
    with jax.named_scope("unpermute"):
        d_gate_TK = jnp.sum(g * a, axis=-1)
        d_weights_TxK = dispatch_ops._rows(d_gate_TK, inverse_TxK).astype(weights_TxK.dtype)
    gate_TK = weights_TxK.reshape(-1).astype(jnp.float32)[order_TK][:, None]
    # w_out's gradient: sum_r (gate_r · a_r)ᵀ dy_r, after the gate gradients (which read a and g).
    a_w = (_after(gate_TK, d_gate_TK) * a).astype(dtype)
    d_w_out = _weight_grad(a_w, dy_src, group_sizes, experts, w_out, rhs_rows=dy_rows)
    da = _after(_after(gate_TK, g) * g, d_w_out).astype(h.dtype)
    if up is None:
        (dh,) = act_vjp(da)
        d_up = None
    else:
        (dh,) = act_vjp(da * up)
        d_up = (da * act).astype(dtype)
    dh = dh.astype(dtype)
    # The sorted copies of x: kept by the forward pass, or gathered again chunk by chunk.
    x_src, x_rows = (x_TxD, tokens_TK) if x_perm is None else (x_perm, None)
    dx_perm = mm_t(dh, w_in)
    d_w_in = _weight_grad(x_src, dh, group_sizes, experts, w_in, lhs_rows=x_rows)
    d_w_up = None
    if d_up is not None:
        dx_perm = dx_perm + mm_t(d_up, w_up)
        d_w_up = _weight_grad(x_src, d_up, group_sizes, experts, w_up, lhs_rows=x_rows)
    # A token's k copies add up: one gather per choice, summed in f32 in one pass.
    with jax.named_scope("permute"):
        dx_TxD = dispatch_ops._rows(dx_perm, inverse_TxK[:, 0])
        for j in range(1, k):
            dx_TxD = dx_TxD + dispatch_ops._rows(dx_perm, inverse_TxK[:, j])
    return (dx_TxD.astype(x_TxD.dtype), d_weights_TxK, None, None, None,
            experts.with_weights(d_w_in, d_w_up, d_w_out))


_dropless.defvjp(_dropless_fwd, _dropless_bwd)
