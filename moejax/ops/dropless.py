"""Dropless MoE feed-forward on one device: permute -> E experts (gmm) -> combine, one custom VJP.

``dropless_ffn(x, copies, weights, experts)`` equals ``unpermute(experts.grouped(permute(x)))``
with the gates ``weights`` (f32 result), and differentiates with respect to ``x``, the gates and
the expert weights. Written as one VJP it chooses what the backward pass keeps and when each
buffer is written, where the composition of the three ops keeps every intermediate:

* **Residuals**: only the hidden pre-activations ``h = x_perm · w_in`` (and ``x_perm · w_up`` for
  GLU experts). The sorted copies ``x_perm`` are gathered again from ``x`` in the backward pass
  (on the ``cpu`` gmm backend; the accelerator backends keep them), the activations are computed
  from ``h`` again (XLA may merge that with the forward pass's and keep those: it does for exact
  gelu, with its erf and exp terms), and the expert outputs ``y_perm`` are not kept at all.
* **Gate gradients without ``y_perm``**: ``d gate[t, j] = <dy[t], y_perm[r]>`` with
  ``y_perm[r] = a[r] · w_out[e]`` equals ``<dy[t] · w_out[e]ᵀ, a[r]>``: a row sum over the
  product ``g = dy_perm · w_out[e]ᵀ`` that the input gradient needs anyway, taken before the gate
  scales it.
* **Order**: the backward pass runs ``g``, the gate gradients, ``w_out``'s gradient, then the
  hidden gradient, the re-gathered ``x_perm``, ``x``'s and ``w_in``'s gradients; each step is
  made to wait for the previous one (:func:`_after`), so fewer ``[T·k, F]`` / ``[T·k, D]`` buffers
  are live at once. XLA would otherwise merge the gather of ``x_perm`` with the forward pass's
  identical gather and keep the result. Compiled temporaries of the layer's forward+backward at
  T = 8192, d_model = d_ff = 512, k = 2, relu: 130 MiB at E = 8 and 128 MiB at E = 64, against
  177 and 137 MiB for the three ops differentiated one by one.

On the CPU every buffer a call writes is memory faulted in afresh, so buffers not written are time
saved (``benchmarks/RESULTS.md``). Results equal the composition up to float rounding.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from moejax.kernels.common import false_from
from moejax.ops import dispatch as dispatch_ops
from moejax.ops.ffn import ExpertFFN, activation_fn
from moejax.ops.gmm import gmm, resolve_backend, tgmm


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
    regather = resolve_backend(experts.gmm_backend) == "cpu"
    with jax.named_scope("dropless_ffn"):
        x_TxD, weights_TxK, order_TK, inverse_TK = dispatch_ops._varying_as_all(
            x_TxD, weights_TxK, copies.order_TK, copies.inverse_TK)
        return _dropless((k, regather), x_TxD, weights_TxK, order_TK, inverse_TK,
                         copies.group_sizes_E, experts)


def _after(x, dep):
    """``x``, computed no earlier than ``dep`` (a dependency XLA cannot fold away)."""
    return jnp.where(false_from(dep), jnp.zeros_like(x), x)


def _forward(k, x_TxD, weights_TxK, order_TK, inverse_TK, group_sizes, experts):
    def mm(lhs, rhs):
        return gmm(lhs, rhs, group_sizes, **experts.gmm_options)

    with jax.named_scope("permute"):
        x_perm = dispatch_ops._rows(x_TxD, dispatch_ops._tokens(order_TK, k))
    h = mm(x_perm, experts.w_in)
    up = None if experts.w_up is None else mm(x_perm, experts.w_up)
    a = activation_fn(experts.activation)(h)
    if up is not None:
        a = a * up
    y_perm = mm(a, experts.w_out)
    with jax.named_scope("unpermute"):
        y = dispatch_ops._weighted_rows(y_perm, weights_TxK,
                                        inverse_TK.reshape(weights_TxK.shape))
    return y, (x_perm, h, up)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _dropless(config, x_TxD, weights_TxK, order_TK, inverse_TK, group_sizes, experts):
    return _forward(config[0], x_TxD, weights_TxK, order_TK, inverse_TK, group_sizes, experts)[0]


def _dropless_fwd(config, x_TxD, weights_TxK, order_TK, inverse_TK, group_sizes, experts):
    k, regather = config
    y, (x_perm, h, up) = _forward(k, x_TxD, weights_TxK, order_TK, inverse_TK, group_sizes,
                                  experts)
    kept = None if regather else x_perm
    return y, (x_TxD, weights_TxK, order_TK, inverse_TK, group_sizes, experts, h, up, kept)


def _dropless_bwd(config, residuals, dy_TxD):
    with jax.named_scope("backward"):
        return _backward(config[0], residuals, dy_TxD)


def _backward(k, residuals, dy_TxD):
    (x_TxD, weights_TxK, order_TK, inverse_TK, group_sizes, experts, h, up,
     x_perm) = residuals
    w_in, w_up, w_out = experts.weights

    def mm_t(lhs, rhs):  # lhs · rhs[e]ᵀ
        return gmm(lhs, rhs, group_sizes, transpose_rhs=True,
                   **experts.gmm_options).astype(jnp.float32)

    def weight_grad(lhs, rhs, like):
        return tgmm(lhs, rhs, group_sizes, **experts.gmm_options).astype(like.dtype)

    dtype = x_TxD.dtype
    tokens_TK = dispatch_ops._tokens(order_TK, k)
    inverse_TxK = inverse_TK.reshape(weights_TxK.shape)
    # Unweighted cotangent rows, then g = dy_perm · w_out[e]ᵀ (the gates are applied after).
    with jax.named_scope("unpermute"):
        dy_perm = dispatch_ops._rows(dy_TxD.astype(jnp.float32), tokens_TK).astype(dtype)
    g = mm_t(dy_perm, w_out)
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
    d_w_out = weight_grad(a_w, dy_perm, w_out)
    da = _after(_after(gate_TK, g) * g, d_w_out).astype(h.dtype)
    if up is None:
        (dh,) = act_vjp(da)
        d_up = None
    else:
        (dh,) = act_vjp(da * up)
        d_up = (da * act).astype(dtype)
    dh = dh.astype(dtype)
    if x_perm is None:
        # Gathered again, after w_out's gradient: not kept alive through the backward pass.
        with jax.named_scope("permute"):
            x_perm = dispatch_ops._rows(
                x_TxD, tokens_TK + false_from(d_w_out).astype(tokens_TK.dtype))
    dx_perm = mm_t(dh, w_in)
    d_w_in = weight_grad(x_perm, dh, w_in)
    d_w_up = None
    if d_up is not None:
        dx_perm = dx_perm + mm_t(d_up, w_up)
        d_w_up = weight_grad(x_perm, d_up, w_up)
    # A token's k copies add up: one gather per choice, summed in f32 in one pass.
    with jax.named_scope("permute"):
        dx_TxD = dispatch_ops._rows(dx_perm, inverse_TxK[:, 0])
        for j in range(1, k):
            dx_TxD = dx_TxD + dispatch_ops._rows(dx_perm, inverse_TxK[:, j])
    return (dx_TxD.astype(x_TxD.dtype), d_weights_TxK, None, None, None,
            experts.with_weights(d_w_in, d_w_up, d_w_out))


_dropless.defvjp(_dropless_fwd, _dropless_bwd)
