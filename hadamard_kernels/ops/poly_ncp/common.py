"""poly_ncp's spec shared by its backends: argument checks, and the backward's GEMM stage, which both fused
backends run on the per-row gradients their kernels write."""

from __future__ import annotations

from collections.abc import Callable

import torch

from ... import _checks
from .._projections import projection_grads

# Cap on the backward's transient memory (the per-row kernel outputs below): rows are processed in chunks
# that fit it, so the backward never allocates more than this beyond the gradients themselves.
WORKSPACE_BYTES = 1 << 30


def check_args(x, a_weight, a_bias, s_weight, s_bias) -> None:
    degree, out_features, _ = _checks.check_stacked_projection(x, "a_weight", a_weight, "a_bias", a_bias)
    _checks.check_tensor("s_weight", s_weight, ndim=3)
    _checks.check_shape("s_weight", s_weight, (degree - 1, out_features, out_features),
                        f"(N-1, k, k) with N={degree}, k={out_features} from a_weight")
    if s_bias is not None:
        _checks.check_tensor("s_bias", s_bias)
        _checks.check_shape("s_bias", s_bias, (degree - 1, out_features),
                            f"(N-1, k) with N={degree}, k={out_features} from a_weight")
    _checks.check_same_dtype_device("x", x, a_weight=a_weight, a_bias=a_bias, s_weight=s_weight, s_bias=s_bias)


def rows_per_chunk(N: int, K: int, itemsize: int) -> int:
    """Rows whose kernel outputs (grad_a [., N, K], grad_s and ys [N-1, ., K]) fit in WORKSPACE_BYTES."""
    return max(1, WORKSPACE_BYTES // ((3 * N - 2) * K * itemsize))


def backward_in_row_chunks(chain_grads: Callable, grad_y, x, a_weight, a_bias, s_weight, s_bias, needs):
    """The five gradients from a fused kernel's per-row outputs, a chunk of rows at a time.

    chain_grads(x2d [m, d], gy [m, k]) -> (grad_a [m, N, k], grad_s [N-1, m, k], ys [N-1, m, k]) with
    grad_a[:, n] = dL/d(A_n x + a_n), grad_s[n-1] = dL/d(S_n y_{n-1} + s_n) and ys[n-1] = y_n (n = 1..N-1).
    Then dx, dA, da come as in poly_chain (grad_a is poly_chain's grad_z), dS_n = grad_s_n^T @ y_{n-1} and
    ds_n = sum over rows of grad_s_n. Partial sums across chunks are kept in float32 (float64 stays float64).
    """
    N, K, D = a_weight.shape
    x2d = x.reshape(-1, D).contiguous()
    gy = grad_y.reshape(-1, K).contiguous()
    M = x2d.shape[0]
    need_x, need_aw, need_ab, need_sw, need_sb = needs
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    rows = rows_per_chunk(N, K, x.element_size())
    dx_parts, sums = [], [None] * 4
    for r0 in range(0, M, rows):
        x_rows = x2d[r0:r0 + rows]
        grad_a, grad_s, ys = chain_grads(x_rows, gy[r0:r0 + rows])
        dx, daw, dab = projection_grads(grad_a, x_rows, a_weight, a_bias is not None, (need_x, need_aw, need_ab))
        dsw = torch.bmm(grad_s.transpose(1, 2), ys) if need_sw else None
        dsb = grad_s.sum(1, dtype=acc) if (need_sb and s_bias is not None) else None
        dx_parts.append(dx)
        for i, part in enumerate((daw, dab, dsw, dsb)):
            if part is not None:
                sums[i] = part.to(acc) if sums[i] is None else sums[i].add_(part)
    dx = None
    if need_x:
        dx = (dx_parts[0] if len(dx_parts) == 1 else torch.cat(dx_parts)).view(x.shape)
    return (dx, *(None if s is None else s.to(x.dtype) for s in sums))
