"""Helpers shared by the test files: tolerances, comparisons that name the tensor, backend lists."""

from __future__ import annotations

import pytest
import torch

import hadamard_kernels as hk

# Relative error ||out - ref|| / ||ref|| against a float64 reference (DESIGN.md). float64 runs only on the
# reference and the Triton interpreter, where it agrees to rounding.
REL_TOL = {torch.float64: 1e-10, torch.float32: 1e-5, torch.float16: 5e-3, torch.bfloat16: 1e-2}

HAS_CUDA = torch.cuda.is_available()
requires_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
cuda = pytest.mark.cuda


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.double(), ref.double()
    denom = ref.norm().item()
    diff = (out - ref).norm().item()
    return diff / denom if denom > 0 else diff


def assert_close(name: str, out: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype | None = None, tol=None) -> None:
    """out (any dtype) against ref (float64): same shape, no NaN unless ref has one there, rel error < tol."""
    assert out.shape == ref.shape, f"{name}: shape {tuple(out.shape)} != reference {tuple(ref.shape)}"
    out_nan, ref_nan = torch.isnan(out.double()), torch.isnan(ref.double())
    assert torch.equal(out_nan.cpu(), ref_nan.cpu()), f"{name}: NaN pattern differs from the reference"
    keep = ~ref_nan
    tol = tol if tol is not None else REL_TOL[dtype or out.dtype]
    err = rel_err(out.double()[keep], ref.double()[keep])
    assert err < tol, f"{name}: relative error {err:.3e} >= {tol:.1e} ({out.dtype})"


def cpu_backends(dtype: torch.dtype = torch.float64) -> list[str]:
    """Backends that run CPU tensors of `dtype` here (triton only under TRITON_INTERPRET=1)."""
    return [b for b, why in hk.available_backends("cpu", dtype).items() if why is None]


def gpu_backends() -> list[str]:
    """Fused backends to check on a GPU; each must be available there (a missing one fails, not skips)."""
    return ["triton", "cuda"]
