"""Dropless MoE feed-forward on one device: permute -> E experts (gmm) -> combine, one custom VJP.

``dropless_ffn(x, copies, weights, experts)`` equals ``unpermute(experts.grouped(permute(x)))``
with the gates ``weights`` (f32 result), and differentiates with respect to ``x``, the gates and
the expert weights. Written as one VJP it chooses what the backward pass keeps and when each
buffer is written, where the composition of the three ops keeps every intermediate:

* **Residuals**: only the hidden pre-activations ``h = x_perm · w_in`` (and ``x_perm · w_up`` for
  GLU experts). The activations are computed from ``h`` again, and the expert outputs ``y_perm``
  are not kept at all. The accelerator backends keep the sorted copies ``x_perm`` too.
* **Gate gradients without ``y_perm``**: ``d gate[t, j] = <dy[t], y_perm[r]>`` with
  ``y_perm[r] = a[r] · w_out[e]`` equals ``<dy[t] · w_out[e]ᵀ, a[r]>``: a row sum over the
  product ``g = dy_perm · w_out[e]ᵀ`` that the input gradient needs anyway, taken before the gate
  scales it.
* **On the ``cpu`` backend, no ``[T·k, ·]`` buffer but ``h`` and ``g`` is written**: the gmm and
  tgmm kernels take ``x`` (and the cotangent ``dy``) with the copies' token indices and gather each
  row chunk where they would otherwise slice it (XLA:CPU copies a dynamically sliced matmul
  operand anyway); they apply the activation (forward), ``gate · a`` (``w_out``'s gradient) and
  the hidden gradient ``dh = act'(h) · gate · g`` (``x``'s and ``w_in``'s gradients) to each chunk
  as they copy it (prologues); and the second forward matmul and the input-gradient matmul add
  each chunk's rows, gate-weighted or not, straight into the ``[T, D]`` result (a token's k copies
  add up there). So ``x_perm``, ``a``, ``y_perm``, ``dy_perm``, ``gate · a``, ``dh`` and
  ``dx_perm`` are never written. ``dh`` is computed twice (once per kernel that reads it), which
  is cheaper than writing it and reading it back.
* **Order**: the backward pass runs ``g``, the gate gradients, ``w_out``'s gradient, then
  ``x``'s and ``w_in``'s gradients; each step is made to wait for the previous one
  (:func:`_after`), so fewer buffers are live at once. Compiled temporaries of the layer's
  forward+backward at T = 8192, d_model = d_ff = 512, k = 2: 85 MiB at E = 8 and 90 MiB at
  E = 64, relu or exact gelu (the gate gradients are summed one block of rows at a time, so XLA
  writes gelu's erfc term for a block only), against 177 and 137 MiB (relu) for the three ops
  differentiated one by one.

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
    # The cpu kernels gather, transform and scatter rows chunk by chunk (module docstring).
    fused = resolve_backend(experts.gmm_backend) == "cpu"
    with jax.named_scope("dropless_ffn"):
        # Inside a shard_map the expert weights too: each shard's weight gradients vary, and
        # JAX sums them over the shards (the transpose of the cast) into the weights' type.
        w_in, w_up, w_out = experts.weights
        x_TxD, weights_TxK, order_TK, inverse_TK, w_in, w_out, *w_up = (
            dispatch_ops._varying_as_all(x_TxD, weights_TxK, copies.order_TK, copies.inverse_TK,
                                         w_in, w_out, *([] if w_up is None else [w_up])))
        experts = experts.with_weights(w_in, w_up[0] if w_up else None, w_out)
        return _dropless((k, fused), x_TxD, weights_TxK, order_TK, inverse_TK,
                         copies.group_sizes_E, experts)


def _after(x, dep):
    """``x``, computed no earlier than ``dep`` (a dependency XLA cannot fold away)."""
    return jnp.where(false_from(dep), jnp.zeros_like(x), x)


def _sorted_rows(src_TxD, tokens_TK, fused: bool, scope: str):
    """The sorted copies' rows of ``src`` as ``(array, rows)`` for :func:`_mm` / :func:`_weight_grad`:
    ``(src, tokens)`` for the ``cpu`` kernels to gather chunk by chunk (the ``[T·k, D]`` array is
    never written), else ``(src[tokens], None)``, built once."""
    if fused:
        return src_TxD, tokens_TK
    with jax.named_scope(scope):
        return dispatch_ops._rows(src_TxD, tokens_TK), None


def _mm(lhs, rhs, group_sizes, experts, lhs_rows=None, transpose_rhs=False, lhs_fn=None,
        lhs_extras=(), fused=False, out_rows=None, out_scale=None, num_out_rows=None):
    """``gmm(lhs, rhs)`` with the operand ``lhs_fn(lhs[lhs_rows], *lhs_extras)``: built first for
    the accelerator backends, gathered and computed chunk by chunk by the ``cpu`` kernel
    (``fused``), which can also add the product's rows to ``out_rows`` of an f32 result."""
    if not fused:
        assert lhs_rows is None and out_rows is None, "only the cpu kernels gather or scatter"
        if lhs_fn is not None:
            lhs = lhs_fn(lhs, *lhs_extras)
        return gmm(lhs, rhs, group_sizes, transpose_rhs=transpose_rhs, **experts.gmm_options)
    with jax.named_scope("gmm"):
        dtype = promote_types(lhs.dtype, rhs.dtype) if out_rows is None else jnp.float32
        return cpu_kernels.gmm(
            lhs, rhs, group_sizes, jnp.int32(0), transpose_rhs=transpose_rhs,
            preferred_element_type=dtype, tiling=_normalize_tiling(experts.gmm_tiling),
            interpret=None, lhs_rows=lhs_rows, lhs_fn=lhs_fn, lhs_extras=tuple(lhs_extras),
            out_rows=out_rows, out_scale=out_scale, num_out_rows=num_out_rows)


def _weight_grad(lhs, rhs, group_sizes, experts, like, lhs_rows=None, rhs_rows=None,
                 lhs_fn=None, lhs_extras=(), rhs_fn=None, rhs_extras=(), fused=False):
    """``tgmm(lhs, rhs)`` in ``like``'s dtype, each operand as in :func:`_mm`."""
    if not fused:
        assert lhs_rows is None and rhs_rows is None, "only the cpu kernels gather"
        if lhs_fn is not None:
            lhs = lhs_fn(lhs, *lhs_extras)
        if rhs_fn is not None:
            rhs = rhs_fn(rhs, *rhs_extras)
        out = tgmm(lhs, rhs, group_sizes, **experts.gmm_options)
    else:
        with jax.named_scope("tgmm"):
            out = cpu_kernels.tgmm(
                lhs, rhs, group_sizes, jnp.int32(0), num_groups=group_sizes.shape[0],
                preferred_element_type=promote_types(lhs.dtype, rhs.dtype),
                tiling=_normalize_tiling(experts.gmm_tiling), interpret=None,
                lhs_rows=lhs_rows, rhs_rows=rhs_rows, lhs_fn=lhs_fn, lhs_extras=tuple(lhs_extras),
                rhs_fn=rhs_fn, rhs_extras=tuple(rhs_extras))
    return out.astype(like.dtype)


def _activations(experts, dtype):
    """Row-wise functions of the hidden pre-activations ``h`` (and ``up``): the expert FFN's
    activation ``a``, the gated activation for ``w_out``'s gradient, and the hidden gradients."""
    act_fn = activation_fn(experts.activation)

    def a_fn(h, *up):
        a = act_fn(h)
        return a if not up else a * up[0]

    def a_w_fn(h, gate, *up):  # gate · a, the rows of w_out's gradient
        return (gate * a_fn(h, *up).astype(jnp.float32)).astype(dtype)

    def dh_fn(g, h, gate, *up):  # the cotangent of h, from g = dy · w_out[e]ᵀ
        da = (gate * g).astype(h.dtype)
        _, act_vjp = jax.vjp(act_fn, h)
        return act_vjp(da if not up else da * up[0])[0].astype(dtype)

    def d_up_fn(g, h, gate):  # the cotangent of up
        return ((gate * g).astype(h.dtype) * act_fn(h)).astype(dtype)

    return a_fn, a_w_fn, dh_fn, d_up_fn


def _sorted_gates(weights_TxK, order_TK):
    """The gate of each sorted copy, f32 ``[T·k]``."""
    return weights_TxK.reshape(-1).astype(jnp.float32)[order_TK]


_ROW_BLOCK = 512


def _gate_grads(g, a_fn, h, *ups, blocked):
    """``sum(g * a_fn(h, *ups), axis=-1)`` in f32. ``blocked``: one block of rows at a time, so
    that XLA:CPU, which otherwise computes an activation's transcendental part (gelu's erfc) as a
    ``[T·k, F]`` array of its own before the reduction, writes at most a block of it."""
    def dots(g, h, *ups):
        return jnp.sum(g.astype(jnp.float32) * a_fn(h, *ups).astype(jnp.float32), axis=-1)

    m = g.shape[0]
    if not blocked or m <= _ROW_BLOCK:
        return dots(g, h, *ups)

    def block(i, out_M):
        start = jnp.minimum(i * _ROW_BLOCK, m - _ROW_BLOCK)  # the last block ends at row m
        rows = [jax.lax.dynamic_slice_in_dim(v, start, _ROW_BLOCK) for v in (g, h, *ups)]
        return jax.lax.dynamic_update_slice_in_dim(out_M, dots(*rows), start, 0)

    out_M = jnp.zeros((m,), jnp.float32)
    return jax.lax.fori_loop(0, -(-m // _ROW_BLOCK), block, out_M)


def _forward(k, fused, x_TxD, weights_TxK, order_TK, inverse_TK, group_sizes, experts):
    num_tokens = x_TxD.shape[0]
    x_src, x_rows = _sorted_rows(x_TxD, dispatch_ops._tokens(order_TK, k), fused, "permute")
    mm = functools.partial(_mm, group_sizes=group_sizes, experts=experts, fused=fused)
    h = mm(x_src, experts.w_in, lhs_rows=x_rows)
    up = None if experts.w_up is None else mm(x_src, experts.w_up, lhs_rows=x_rows)
    a_fn = _activations(experts, x_TxD.dtype)[0]
    # On the cpu backend the activation is applied chunk by chunk inside the kernel, and each
    # chunk's rows are added, gate-weighted, to their tokens' outputs.
    ups = () if up is None else (up,)
    if fused:
        y = mm(h, experts.w_out, lhs_fn=a_fn, lhs_extras=ups, out_rows=x_rows,
               out_scale=_sorted_gates(weights_TxK, order_TK), num_out_rows=num_tokens)
    else:
        y_perm = mm(h, experts.w_out, lhs_fn=a_fn, lhs_extras=ups)
        with jax.named_scope("unpermute"):
            y = dispatch_ops._weighted_rows(y_perm, weights_TxK,
                                            inverse_TK.reshape(weights_TxK.shape))
    # The sorted copies are kept where they were built (x itself is a residual anyway).
    return y, (None if fused else x_src, h, up)


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


def _backward(k, fused, residuals, dy_TxD):
    (x_TxD, weights_TxK, order_TK, inverse_TK, group_sizes, experts, h, up,
     x_perm) = residuals
    w_in, w_up, w_out = experts.weights
    dtype = x_TxD.dtype
    a_fn, a_w_fn, dh_fn, d_up_fn = _activations(experts, dtype)
    ups = () if up is None else (up,)

    def mm_t(lhs, rhs, **kw):  # lhs · rhs[e]ᵀ
        return _mm(lhs, rhs, group_sizes, experts, transpose_rhs=True, fused=fused,
                   **kw).astype(jnp.float32)

    def weight_grad(lhs, rhs, like, **kw):
        return _weight_grad(lhs, rhs, group_sizes, experts, like, fused=fused, **kw)

    tokens_TK = dispatch_ops._tokens(order_TK, k)
    inverse_TxK = inverse_TK.reshape(weights_TxK.shape)
    # Unweighted cotangent rows, then g = dy_perm · w_out[e]ᵀ (the gates are applied after).
    dy_src, dy_rows = _sorted_rows(dy_TxD.astype(dtype), tokens_TK, fused, "unpermute")
    g = mm_t(dy_src, w_out, lhs_rows=dy_rows)
    # d gate = <dy[t], a[r] · w_out[e]> = <g[r], a[r]>.
    with jax.named_scope("unpermute"):
        d_gate_TK = _gate_grads(g, a_fn, h, *ups, blocked=fused)
        d_weights_TxK = dispatch_ops._rows(d_gate_TK, inverse_TxK).astype(weights_TxK.dtype)
    gate_TK = _sorted_gates(weights_TxK, order_TK)[:, None]
    # w_out's gradient: sum_r (gate_r · a_r)ᵀ dy_r, after the gate gradients (which read a and g);
    # on the cpu backend gate · a is computed chunk by chunk inside the kernel.
    d_w_out = weight_grad(h, dy_src, w_out, rhs_rows=dy_rows, lhs_fn=a_w_fn,
                          lhs_extras=(_after(gate_TK, d_gate_TK), *ups))
    # The gates that dh (and d_up) read, after w_out's gradient.
    gate_TK = _after(_after(gate_TK, g), d_w_out)
    x_src, x_rows = (x_TxD, tokens_TK) if x_perm is None else (x_perm, None)
    # The hidden gradient dh (and d_up) as (operand, prologue, its extras) for the two kernels
    # that read it.
    if fused:
        # Computed from g, h and the gates chunk by chunk in each kernel that reads it, and each
        # chunk's input gradients are added to their tokens' rows (the k copies of a token add up
        # there): neither dh nor the copies' input gradients are written out.
        dh = (g, dh_fn, (h, gate_TK, *ups))
        d_up = None if up is None else (g, d_up_fn, (h, gate_TK))
        to_tokens = dict(out_rows=tokens_TK, num_out_rows=x_TxD.shape[0])
    else:
        dh = (dh_fn(g, h, gate_TK, *ups), None, ())
        d_up = None if up is None else (d_up_fn(g, h, gate_TK), None, ())
        to_tokens = {}

    def grads(w, src, fn, extras):  # the input gradients (by copy, or by token) and w's gradient
        dx = mm_t(src, w, lhs_fn=fn, lhs_extras=extras, **to_tokens)
        return dx, weight_grad(x_src, src, w, lhs_rows=x_rows, rhs_fn=fn, rhs_extras=extras)

    dx, d_w_in = grads(w_in, *dh)
    d_w_up = None
    if up is not None:
        dx_up, d_w_up = grads(w_up, *d_up)
        dx = dx + dx_up
    if fused:
        dx_TxD = dx
    else:
        # A token's k copies add up: one gather per choice, summed in f32 in one pass.
        with jax.named_scope("permute"):
            dx_TxD = dispatch_ops._rows(dx, inverse_TxK[:, 0])
            for j in range(1, k):
                dx_TxD = dx_TxD + dispatch_ops._rows(dx, inverse_TxK[:, j])
    return (dx_TxD.astype(x_TxD.dtype), d_weights_TxK, None, None, None,
            experts.with_weights(d_w_in, d_w_up, d_w_out))


_dropless.defvjp(_dropless_fwd, _dropless_bwd)
