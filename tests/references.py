"""NumPy references for the grouped-matmul tests, written from the definitions (float64 loops)."""

import numpy as np


def numpy_gmm(lhs, rhs_local, sizes, offset=0):
    """Row group i of lhs times ``rhs_local[i - offset]``; rows of other groups and past the sum are 0."""
    lhs, rhs_local = np.asarray(lhs, np.float64), np.asarray(rhs_local, np.float64)
    out = np.zeros((lhs.shape[0], rhs_local.shape[2]), np.float64)
    start = 0
    for i, size in enumerate(np.asarray(sizes)):
        if 0 <= i - offset < rhs_local.shape[0]:
            out[start:start + size] = lhs[start:start + size] @ rhs_local[i - offset]
        start += size
    return out


def numpy_tgmm(lhs, rhs, sizes, offset, num_groups):
    """``out[i] = lhs[rows of group offset + i].T @ rhs[same rows]``; empty groups are 0."""
    lhs, rhs = np.asarray(lhs, np.float64), np.asarray(rhs, np.float64)
    out = np.zeros((num_groups, lhs.shape[1], rhs.shape[1]), np.float64)
    start = 0
    for i, size in enumerate(np.asarray(sizes)):
        if offset <= i < offset + num_groups:
            out[i - offset] = lhs[start:start + size].T @ rhs[start:start + size]
        start += size
    return out
