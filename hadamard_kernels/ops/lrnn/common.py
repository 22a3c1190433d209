"""lrnn_product's spec shared by its backends: option values and argument checks (DESIGN.md §4).

    z = x @ weight.T + bias                      (M, rank * dbar), viewed as (M, rank, dbar): row l * dbar + j of
                                                 weight is component j of neuron l
    phi_l = prod_j (1 + gamma * g_lj(z_lj))      (M, rank)

g is one of ACTIVATIONS: sin (sin(omega z)), spder (sin(z) sqrt|z|), arctan, tanh, or mlp, a tiny network per
component g_lj(z) = sum_i a_lji tanh(w_lji z + c_lji) with g_params (3, rank, dbar, h) = stack([a, w, c]).
omega scales z for sin only; any other activation with omega != 1 is a ValueError (there it would only rescale
the weights).
"""

from __future__ import annotations

import torch

from ... import _checks

# The backward forms grad_z (rows, rank * dbar) one chunk of rows at a time, within this many bytes (read at each
# call, so tests can make it small to run several chunks); both fused backends use the same policy.
CHUNK_BYTES = 32 * 2**20
ROW_ALIGN = 128  # rows of a chunk and of an mlp split: whole multiples of the largest kernel row tile

# Index = the activation code of the kernels (triton.py, csrc/lrnn.cu).
ACTIVATIONS = ("sin", "spder", "arctan", "tanh", "mlp")
# The mlp activation's hidden width h: its per-component parameters stay in registers.
MAX_HIDDEN = 16
# The contract's largest dbar (the 1..64): the fused kernels keep a neuron's components in one tile.
MAX_DBAR = 64


def check_args(x, weight, bias, g_params, rank, dbar, activation, omega, gamma) -> None:
    """x (..., d) (2-D in the backends), weight (rank * dbar, d), bias (rank * dbar,) or None, g_params
    (3, rank, dbar, h) with 1 <= h <= MAX_HIDDEN for activation "mlp" and None otherwise; rank >= 1 and
    1 <= dbar <= MAX_DBAR ints;
    omega a finite number (1 unless activation is "sin"); gamma a finite number or None (dbar ** -0.5)."""
    _checks.check_positive_int("rank", rank)
    _checks.check_positive_int("dbar", dbar)
    if dbar > MAX_DBAR:
        raise ValueError(f"dbar must be <= {MAX_DBAR} (a neuron's components), got {dbar}")
    _checks.check_choice("activation", activation, ACTIVATIONS)
    omega = _checks.check_finite_float("omega", omega)
    if activation != "sin" and omega != 1.0:
        raise ValueError(f"omega scales z for activation 'sin' only; activation {activation!r} needs omega=1.0, "
                         f"got {omega!r}")
    if gamma is not None:
        _checks.check_finite_float("gamma", gamma)
    _checks.check_tensor("x", x, min_ndim=1)
    _checks.check_tensor("weight", weight, ndim=2)
    d = weight.shape[1]
    _checks.check_positive("weight.shape[1]", d, "in_features d")
    # Plain strings: under torch.compile(dynamic=True) rank and dbar may be symbols, which an f-string cannot format.
    _checks.check_shape("weight", weight, (rank * dbar, d), "(rank * dbar, d)")
    if x.shape[-1] != d:
        raise ValueError(f"x must have last dim {d} (weight.shape[1]), got shape {tuple(x.shape)}")
    if bias is not None:
        _checks.check_tensor("bias", bias)
        _checks.check_shape("bias", bias, (rank * dbar,), "(rank * dbar,)")
    if activation == "mlp":
        if g_params is None:
            raise ValueError("activation 'mlp' needs g_params of shape (3, rank, dbar, h) = stack([a, w, c]), "
                             "got None")
        _checks.check_tensor("g_params", g_params, ndim=4)
        _checks.check_shape("g_params", g_params, (3, rank, dbar, None), "(3, rank, dbar, h)")
        h = g_params.shape[3]
        if not 1 <= h <= MAX_HIDDEN:
            raise ValueError(f"g_params.shape[3] (the mlp's hidden width h) must be in [1, {MAX_HIDDEN}], got {h}")
    elif g_params is not None:
        raise ValueError(f"g_params is only used by activation 'mlp'; pass None for activation {activation!r}")
    _checks.check_same_dtype_device("x", x, weight=weight, bias=bias, g_params=g_params)


def accumulate_dtype(dtype: torch.dtype) -> torch.dtype:
    """float32, or float64 for float64 inputs: the dtype of every sum and product of the family."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def chunk_rows(rank: int, dbar: int, element_size: int, chunk_bytes: int) -> int:
    """Rows of one backward chunk: grad_z (rows, rank * dbar) within chunk_bytes, in whole ROW_ALIGN blocks where
    one fits, else whole 16-row blocks; at least 16 rows, which the largest row of the contract (rank 4096 x dbar 64
    in fp32, 1 MiB) keeps within 32 MiB."""
    rows = chunk_bytes // (rank * dbar * element_size)
    align = ROW_ALIGN if rows >= ROW_ALIGN else 16
    return max(align, rows // align * align)


def split_rows(rows: int, columns: int, device: torch.device) -> int:
    """Rows per program of the mlp backward, which sums the g_params gradients over them: about four programs per
    SM (few partial sums to add), whole ROW_ALIGN blocks."""
    programs = 4 * torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 4
    column_tiles = -(-columns // 128)
    splits = max(1, min(-(-rows // ROW_ALIGN), -(-programs // column_tiles)))
    return -(-(-(-rows // splits)) // ROW_ALIGN) * ROW_ALIGN


def chunked_backward(grad_z_chunk, x, weight, bias, g_params, rank, dbar, needs, chunk_bytes=None):
    """The backward of both fused backends around their grad_z kernel -> (dx, dweight, dbias, dg_params).

    grad_z_chunk(r0, r1, out, need_g) writes dL/dz of rows r0:r1 into out (r1 - r0, rank * dbar) and returns, when
    need_g, the per-split sums of dL/dg_params (splits, 3, rank * dbar, h), else None. The gradient GEMMs run per
    chunk in torch (dx = grad_z W, dW += grad_z^T x, db += colsum grad_z), so the transient memory is one chunk,
    never the whole (M, rank * dbar); sums over chunks and splits are in the accumulate dtype, in a fixed order."""
    need_x, need_w, need_b, need_g = needs
    need_b = need_b and bias is not None
    need_g = need_g and g_params is not None
    M, columns = x.shape[0], rank * dbar
    acc = accumulate_dtype(x.dtype)
    rows_per_chunk = chunk_rows(rank, dbar, x.element_size(), CHUNK_BYTES if chunk_bytes is None else chunk_bytes)
    single = M <= rows_per_chunk
    dx = torch.empty_like(x) if need_x else None
    # A single chunk writes dweight in the input dtype directly.
    dw = None if not need_w else (torch.empty_like(weight) if single else torch.zeros_like(weight, dtype=acc))
    db = torch.zeros(columns, device=x.device, dtype=acc) if need_b else None
    dgp = torch.zeros(g_params.shape, device=x.device, dtype=acc) if need_g else None
    grad_z = torch.empty((min(M, rows_per_chunk), columns), device=x.device, dtype=x.dtype)
    for r0 in range(0, M, rows_per_chunk):
        r1 = min(M, r0 + rows_per_chunk)
        gz = grad_z[:r1 - r0]
        part = grad_z_chunk(r0, r1, gz, need_g)
        if need_x:
            torch.mm(gz, weight, out=dx[r0:r1])
        if need_w:
            if single:
                torch.mm(gz.T, x, out=dw)
            elif dw.dtype == x.dtype:
                dw.addmm_(gz.T, x[r0:r1])
            else:
                dw += (gz.T @ x[r0:r1]).to(acc)  # fp16/bf16: each chunk's GEMM accumulates in fp32 inside
        if need_b:
            db += gz.sum(0, dtype=acc)
        if need_g:
            dgp += part.sum(0).view(g_params.shape).to(acc)  # the splits in a fixed order
    return (dx, dw.to(weight.dtype) if need_w else None, db.to(bias.dtype) if need_b else None,
            dgp.to(g_params.dtype) if need_g else None)
