"""Argument checks shared by every op family. A failed check raises ValueError naming the argument,
the value found and the one expected. Ops call these from one `check_args` per family."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def check_tensor(name: str, t, *, ndim: int | None = None, min_ndim: int | None = None,
                 dtypes: Sequence[torch.dtype] = FLOAT_DTYPES) -> None:
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if ndim is not None and t.dim() != ndim:
        raise ValueError(f"{name} must have {ndim} dims, got shape {tuple(t.shape)}")
    if min_ndim is not None and t.dim() < min_ndim:
        raise ValueError(f"{name} must have at least {min_ndim} dims, got shape {tuple(t.shape)}")
    if t.dtype not in dtypes:
        raise ValueError(f"{name} must have dtype in ({', '.join(map(str, dtypes))}), got {t.dtype}")


def check_shape(name: str, t: torch.Tensor, expected: Sequence[int], what: str = "") -> None:
    """`expected` may hold None for a dim that is not checked."""
    ok = t.dim() == len(expected) and all(e is None or s == e for s, e in zip(t.shape, expected))
    if not ok:
        shown = tuple("*" if e is None else e for e in expected)
        raise ValueError(f"{name} must have shape {shown}{' ' + what if what else ''}, got {tuple(t.shape)}")


def check_positive(name: str, value: int, what: str = "") -> None:
    if value < 1:
        raise ValueError(f"{name} must be >= 1{' (' + what + ')' if what else ''}, got {value}")


def check_positive_int(name: str, value) -> None:
    # (a torch.SymInt: torch.compile(dynamic=True) may trace an int option as a symbol)
    if isinstance(value, bool) or not isinstance(value, (int, torch.SymInt)):
        raise ValueError(f"{name} must be an int, got {value!r}")
    check_positive(name, value)


def check_same_dtype_device(reference_name: str, reference: torch.Tensor, **others: torch.Tensor | None) -> None:
    for name, t in others.items():
        if t is None:
            continue
        if t.device != reference.device:
            raise ValueError(f"{name} must be on {reference_name}'s device {reference.device}, got {t.device}")
        if t.dtype != reference.dtype:
            raise ValueError(f"{name} must have {reference_name}'s dtype {reference.dtype}, got {t.dtype}")


def check_choice(name: str, value, choices: Sequence) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {tuple(choices)}, got {value!r}")


def check_finite_float(name: str, value) -> float:
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise ValueError(f"{name} must be a number or a 1-element tensor, got shape {tuple(value.shape)}")
        value = value.item()
    # torch.compile(dynamic=True) may trace a Python number (a default eps, say) as a symbol, which math.isfinite
    # cannot take; a comparison can (the compiled code then guards on its outcome). NaN fails it too.
    numbers = (int, float, torch.SymInt, torch.SymFloat)
    if isinstance(value, bool) or not isinstance(value, numbers) or not abs(value) < math.inf:
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    return float(value)


def check_stacked_projection(x, weight_name: str, weight, bias_name: str, bias) -> tuple[int, int, int]:
    """x [..., d], weight [N, k, d] with N, k, d >= 1, bias [N, k] or None: the stacked projections
    x W_n^T + b_n of the polynomial families. Returns (N, k, d)."""
    check_tensor("x", x, min_ndim=1)
    check_tensor(weight_name, weight, ndim=3)
    degree, out_features, in_features = weight.shape
    check_positive(f"{weight_name}.shape[0]", degree, "the degree N")
    check_positive(f"{weight_name}.shape[1]", out_features, "out_features k")
    check_positive(f"{weight_name}.shape[2]", in_features, "in_features d")
    if x.shape[-1] != in_features:
        raise ValueError(f"x must have last dim {in_features} ({weight_name}.shape[2]), got shape {tuple(x.shape)}")
    if bias is not None:
        check_tensor(bias_name, bias)
        check_shape(bias_name, bias, (degree, out_features), f"(N, k) like {weight_name}.shape[:2]")
    return degree, out_features, in_features
