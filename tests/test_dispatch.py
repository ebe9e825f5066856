"""moejax.ops.dispatch, dropless: the sort of token copies by expert, permute and unpermute with
their custom VJPs, against NumPy and against autodiff of plain gathers."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moejax.ops import dispatch

T, D = 37, 6


def _routing(num_tokens, k, num_experts, seed=0):
    rng = np.random.default_rng(seed)
    indices = np.stack([rng.choice(num_experts, k, replace=False) for _ in range(num_tokens)])
    weights = rng.uniform(0.1, 1.0, (num_tokens, k)).astype(np.float32)
    return jnp.asarray(indices, jnp.int32), jnp.asarray(weights)


@pytest.mark.parametrize("k,num_experts", [(1, 4), (2, 8), (2, 64), (4, 5)])
def test_sort_copies_is_the_stable_sort_by_expert(k, num_experts):
    indices, _ = _routing(T, k, num_experts)
    copies = dispatch.sort_copies(indices, num_experts)
    flat = np.asarray(indices).reshape(-1)
    np.testing.assert_array_equal(copies.order_TK, np.argsort(flat, kind="stable"))
    np.testing.assert_array_equal(np.asarray(copies.order_TK)[copies.inverse_TK], np.arange(T * k))
    np.testing.assert_array_equal(copies.group_sizes_E, np.bincount(flat, minlength=num_experts))


def test_sort_copies_puts_unassigned_copies_last_and_counts_them_nowhere():
    indices, _ = _routing(T, 2, 8)
    assigned = jnp.asarray(np.random.default_rng(1).uniform(size=(T, 2)) < 0.7)
    copies = dispatch.sort_copies(indices, 8, assigned_TxK=assigned)
    flat = np.where(np.asarray(assigned).reshape(-1), np.asarray(indices).reshape(-1), 8)
    np.testing.assert_array_equal(copies.order_TK, np.argsort(flat, kind="stable"))
    np.testing.assert_array_equal(copies.group_sizes_E, np.bincount(flat, minlength=9)[:8])


def _expert_fn(sorted_x, group_sizes, w_ExDxD):
    """Each sorted row times its expert's matrix (a stand-in for the experts, rows independent)."""
    expert_of_row = jnp.repeat(jnp.arange(w_ExDxD.shape[0]), group_sizes,
                               total_repeat_length=sorted_x.shape[0])
    return jnp.einsum("rd,rde->re", sorted_x, w_ExDxD[expert_of_row])


def _numpy_layer(x, indices, weights, w_ExDxD):
    x, w = np.asarray(x, np.float64), np.asarray(w_ExDxD, np.float64)
    y = np.zeros_like(x)
    for t in range(x.shape[0]):
        for j in range(indices.shape[1]):
            y[t] += float(weights[t, j]) * (x[t] @ w[int(indices[t, j])])
    return y


def _plain_layer(x, indices, weights, w_ExDxD, num_experts):
    """The same computation from plain gathers and an einsum, differentiated by JAX's autodiff."""
    k = indices.shape[1]
    flat = indices.reshape(-1)
    order = jnp.argsort(flat, stable=True)
    inverse = jnp.argsort(order)
    sizes = jnp.bincount(flat, length=num_experts).astype(jnp.int32)
    sorted_y = _expert_fn(x[order // k], sizes, w_ExDxD)
    return jnp.einsum("tk,tkd->td", weights, sorted_y[inverse].reshape(x.shape[0], k, -1))


def _moejax_layer(x, indices, weights, w_ExDxD, num_experts):
    sorted_x, copies = dispatch.permute(x, indices, num_experts)
    sorted_y = _expert_fn(sorted_x, copies.group_sizes_E, w_ExDxD)
    return dispatch.unpermute(sorted_y, copies, weights)


@pytest.mark.parametrize("k,num_experts", [(1, 4), (2, 8), (3, 5)])
def test_permute_then_unpermute_equals_numpy_and_autodiff_of_plain_gathers(k, num_experts):
    indices, weights = _routing(T, k, num_experts)
    x = jax.random.normal(jax.random.key(0), (T, D))
    w = jax.random.normal(jax.random.key(1), (num_experts, D, D))
    y = _moejax_layer(x, indices, weights, w, num_experts)
    np.testing.assert_allclose(y, _numpy_layer(x, indices, weights, w), rtol=1e-5, atol=1e-5)

    def loss(fn):
        return lambda x, weights, w: jnp.sum(jnp.sin(fn(x, indices, weights, w, num_experts)))

    got = jax.grad(loss(_moejax_layer), argnums=(0, 1, 2))(x, weights, w)
    want = jax.grad(loss(_plain_layer), argnums=(0, 1, 2))(x, weights, w)
    for g, r in zip(got, want):
        assert g.dtype == r.dtype
        np.testing.assert_allclose(g, r, rtol=1e-5, atol=1e-5)


def test_unassigned_copies_get_no_output_and_no_gradient():
    indices, weights = _routing(T, 2, 8)
    assigned = jnp.asarray(np.random.default_rng(2).uniform(size=(T, 2)) < 0.6)
    weights = jnp.where(assigned, weights, 0.0)
    x = jax.random.normal(jax.random.key(0), (T, D))

    def loss(x):
        sorted_x, copies = dispatch.permute(x, indices, 8, assigned)
        mine = jnp.arange(sorted_x.shape[0]) < jnp.sum(copies.group_sizes_E)
        sorted_y = jnp.where(mine[:, None], 2.0 * sorted_x, 0.0)  # gmm gives 0 past the groups
        return jnp.sum(dispatch.unpermute(sorted_y, copies, weights) ** 2)

    grad = jax.grad(loss)(x)
    scale = 2.0 * jnp.sum(weights, axis=1, keepdims=True)
    np.testing.assert_allclose(grad, 2.0 * scale * scale * x, rtol=1e-5, atol=1e-6)


def test_bf16_rows_keep_their_dtype_and_combine_in_f32():
    indices, weights = _routing(T, 2, 8)
    x = jax.random.normal(jax.random.key(0), (T, D), jnp.bfloat16)
    sorted_x, copies = dispatch.permute(x, indices, 8)
    assert sorted_x.dtype == jnp.bfloat16
    y = dispatch.unpermute(sorted_x, copies, weights, jnp.float32)
    assert y.dtype == jnp.float32
    want = np.asarray(x, np.float64) * np.asarray(weights, np.float64).sum(axis=1, keepdims=True)
    np.testing.assert_allclose(y, want, rtol=1e-6, atol=1e-6)
    dx = jax.grad(lambda x: jnp.sum(dispatch.unpermute(dispatch.permute(x, indices, 8)[0],
                                                       copies, weights, jnp.float32)))(x)
    assert dx.dtype == jnp.bfloat16


# ------------------------------------------------------------------------------------------ capacity


def _onehot_capacity(x, w_ExDxD, indices, weights, kept, position, capacity):
    """GShard's one-hot formulation from the same slots: dispatch [T, k, E, C], plain einsums."""
    num_experts = w_ExDxD.shape[0]
    slot = (jax.nn.one_hot(indices, num_experts)[..., None]
            * jax.nn.one_hot(position, capacity)[:, :, None, :]
            * kept[:, :, None, None].astype(jnp.float32))
    buffer = jnp.einsum("tkec,td->ecd", slot, x)
    y_buffer = jnp.tanh(jnp.einsum("ecd,edf->ecf", buffer, w_ExDxD))
    return jnp.einsum("tkec,tk,ecd->td", slot, weights, y_buffer)


@pytest.mark.parametrize("order", ["first_come", "token_major", "batch_priority"])
@pytest.mark.parametrize("k,num_experts,capacity", [(1, 4, 5), (2, 8, 3), (2, 5, 40), (3, 6, 4)])
def test_capacity_gather_and_combine_equal_the_one_hot_einsums_values_and_gradients(
        k, num_experts, capacity, order):
    """Drops (small capacities), empty slots (large ones) and unassigned copies; the custom VJPs'
    gathers against autodiff of the one-hot einsums."""
    indices, weights = _routing(T, k, num_experts, seed=k + num_experts)
    rng = np.random.default_rng(3)
    assigned = jnp.asarray(rng.uniform(size=(T, k)) < 0.85)
    x = jnp.asarray(rng.standard_normal((T, D)), jnp.float32)
    w = jnp.asarray(rng.standard_normal((num_experts, D, D)) * 0.5, jnp.float32)
    plan = dispatch.capacity_dispatch(indices, weights, num_experts, capacity, order, assigned)
    assert not bool(plan.kept_TxK.all()) or capacity == 40  # the small capacities drop copies

    def ours(x, w, weights):
        buffer = dispatch.capacity_gather(x, plan, k)
        y_buffer = jnp.tanh(jnp.einsum("ecd,edf->ecf", buffer, w))
        return dispatch.capacity_combine(y_buffer, plan, weights)

    def reference(x, w, weights):
        return _onehot_capacity(x, w, indices, weights, plan.kept_TxK, plan.position_TxK, capacity)

    np.testing.assert_allclose(ours(x, w, weights), reference(x, w, weights), rtol=1e-5, atol=1e-5)
    probe = jnp.asarray(rng.standard_normal((T, D)), jnp.float32)
    grads = jax.grad(lambda *a: jnp.sum(ours(*a) * probe), argnums=(0, 1, 2))(x, w, weights)
    expected = jax.grad(lambda *a: jnp.sum(reference(*a) * probe), argnums=(0, 1, 2))(x, w, weights)
    for got, want in zip(grads, expected):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_capacity_gather_and_combine_differentiate_by_gathers_only():
    """No scatter in the backward: autodiff of a gather would scatter-add rows."""
    indices, weights = _routing(T, 2, 8)
    plan = dispatch.capacity_dispatch(indices, weights, 8, 6)
    x = jnp.ones((T, D), jnp.float32)

    def loss(x, weights):
        buffer = dispatch.capacity_gather(x, plan, 2)
        return jnp.sum(dispatch.capacity_combine(buffer * 2.0, plan, weights) ** 2)

    text = jax.jit(jax.grad(loss, argnums=(0, 1))).lower(x, weights).as_text()
    assert "scatter" not in text
