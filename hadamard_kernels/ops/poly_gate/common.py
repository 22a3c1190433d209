"""poly_gate's spec shared by its backends: argument checks and the spatial shift (DESIGN.md §5).

The shift of `x (B, W, H, C)` moves four channel groups by one pixel each, keeping the border row: with the
survey's group boundaries g1 = C // 4, g2 = C // 2, g3 = 3 * C // 4,
    y[:, w, :, :g1]   = x[:, max(w - 1, 0), :, :g1]      (along W, forward)
    y[:, w, :, g1:g2] = x[:, min(w + 1, W - 1), :, g1:g2] (along W, backward)
    y[:, :, h, g2:g3] = x[:, :, max(h - 1, 0), g2:g3]    (along H, forward)
    y[:, :, h, g3:]   = x[:, :, min(h + 1, H - 1), g3:]  (along H, backward)
(DESIGN.md writes q, 2q, 3q with q = C // 4; the same boundaries when 4 divides C, and the survey's otherwise.)
"""

from __future__ import annotations

import torch

from ... import _checks

# Parameter gradients the fused backward kernels sum per program (block): ln1_weight, ln1_bias, ln2_weight,
# ln2_bias and alpha per channel, as a [PARAM_GRADS, programs, C] float32 (float64) buffer.
PARAM_GRADS = 5


def shift_groups(C: int) -> tuple[int, int, int]:
    """The channel boundaries (g1, g2, g3) of the four shifted groups, as the survey's Spatial_Shift slices them."""
    return C // 4, C // 2, 3 * C // 4


def check_alpha(alpha, C: int) -> None:
    if alpha is None:
        return
    _checks.check_tensor("alpha", alpha)
    if alpha.shape not in ((), (1,), (C,)):
        raise ValueError(f"alpha must be None, a scalar tensor of shape () or (1,), or per-channel of shape ({C},) "
                         f"(C = a.shape[-1]), got shape {tuple(alpha.shape)}")


def check_args(a, b, ln1_weight, ln1_bias, ln2_weight, ln2_bias, alpha, eps, spatial_shift) -> None:
    _checks.check_tensor("a", a, min_ndim=1)
    _checks.check_tensor("b", b, min_ndim=1)
    if b.shape != a.shape:
        raise ValueError(f"b must have a's shape {tuple(a.shape)}, got {tuple(b.shape)}")
    C = a.shape[-1]
    _checks.check_positive("a.shape[-1]", C, "the normalised channels C")
    for name, t in (("ln1_weight", ln1_weight), ("ln1_bias", ln1_bias), ("ln2_weight", ln2_weight),
                    ("ln2_bias", ln2_bias)):
        _checks.check_tensor(name, t)
        _checks.check_shape(name, t, (C,), "(C,) with C = a.shape[-1]")
    check_alpha(alpha, C)
    _checks.check_same_dtype_device("a", a, b=b, ln1_weight=ln1_weight, ln1_bias=ln1_bias, ln2_weight=ln2_weight,
                                    ln2_bias=ln2_bias, alpha=alpha)
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not eps > 0 or eps == float("inf"):
        raise ValueError(f"eps must be a finite number > 0, got {eps!r}")
    if not isinstance(spatial_shift, bool):
        raise ValueError(f"spatial_shift must be a bool, got {spatial_shift!r}")
    if spatial_shift and a.dim() != 4:
        raise ValueError(f"a must have 4 dims (B, W, H, C) when spatial_shift=True, got shape {tuple(a.shape)}")


def check_shift_input(x) -> None:
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != 4:
        raise ValueError(f"x must have 4 dims (B, W, H, C), got shape {tuple(x.shape)}")


def spatial_shift(x: torch.Tensor) -> torch.Tensor:
    """The shift above, out of place, in plain (differentiable) PyTorch: x [B, W, H, C] -> [B, W, H, C]."""
    g1, g2, g3 = shift_groups(x.shape[-1])
    y = x.clone()
    y[:, 1:, :, :g1] = x[:, :-1, :, :g1]
    y[:, :-1, :, g1:g2] = x[:, 1:, :, g1:g2]
    y[:, :, 1:, g2:g3] = x[:, :, :-1, g2:g3]
    y[:, :, :-1, g3:] = x[:, :, 1:, g3:]
    return y


def spatial_shift_adjoint(dy: torch.Tensor) -> torch.Tensor:
    """The transpose of `spatial_shift` (its backward): each element of dy goes back to the pixel it was read from,
    so a border pixel, read twice, gets two terms, and the pixel at the far border gets none."""
    g1, g2, g3 = shift_groups(dy.shape[-1])
    dx = torch.zeros_like(dy)
    dx[:, :-1, :, :g1] += dy[:, 1:, :, :g1]
    dx[:, 0, :, :g1] += dy[:, 0, :, :g1]
    dx[:, 1:, :, g1:g2] += dy[:, :-1, :, g1:g2]
    dx[:, -1, :, g1:g2] += dy[:, -1, :, g1:g2]
    dx[:, :, :-1, g2:g3] += dy[:, :, 1:, g2:g3]
    dx[:, :, 0, g2:g3] += dy[:, :, 0, g2:g3]
    dx[:, :, 1:, g3:] += dy[:, :, :-1, g3:]
    dx[:, :, -1, g3:] += dy[:, :, -1, g3:]
    return dx


def reduce_param_grads(part, alpha, needs, dtypes):
    """(dln1_weight, dln1_bias, dln2_weight, dln2_bias, dalpha) from the [5, programs, C] partial sums."""
    sums = part.sum(1)
    grads = list(sums[:4])
    dalpha = None
    if alpha is not None:
        dalpha = sums[4].reshape(alpha.shape) if (alpha.numel() > 1) else sums[4].sum().reshape(alpha.shape)
    grads.append(dalpha)
    # Rows of one tensor: each gradient gets its own storage (outputs of a custom op may not alias).
    return [None if (g is None or not need) else g.to(dtype, copy=True) for g, need, dtype in zip(grads, needs, dtypes)]
