"""causal_linear_attention's spec shared by its backends: option values and argument checks."""

from __future__ import annotations

import torch

from ... import _checks

# Index = the code the kernels use.
FEATURE_MAPS = ("identity", "elu1", "relu")
MAX_HEAD_DIM = 256  # the op's contract (README: Dk and Dv up to 256), a ValueError beyond it


def state_dtype(dtype: torch.dtype) -> torch.dtype:
    """States and key sums are float32 whatever the input dtype (float64 stays float64)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _is_symbolic(t: torch.Tensor) -> bool:
    """A fake or meta tensor (torch.compile tracing, the meta device): it has a shape but no values."""
    from torch._subclasses.fake_tensor import is_fake

    return t.is_meta or is_fake(t)


def check_cu_seqlens(cu_seqlens, q) -> int:
    """cu_seqlens int32 [n+1] on q's device with B == 1, 0 = c_0 <= c_1 <= ... <= c_n = T. Returns n."""
    _checks.check_tensor("cu_seqlens", cu_seqlens, ndim=1, dtypes=(torch.int32,))
    if cu_seqlens.device != q.device:
        raise ValueError(f"cu_seqlens must be on q's device {q.device}, got {cu_seqlens.device}")
    if q.shape[0] != 1:
        raise ValueError(f"with cu_seqlens, q, k, v must have batch size 1 (packed sequences), got B = {q.shape[0]}")
    if cu_seqlens.shape[0] < 2:
        raise ValueError(f"cu_seqlens must have at least 2 entries (n + 1 for n sequences), got {cu_seqlens.shape[0]}")
    if not _symbolic_any(cu_seqlens, q):
        offsets = cu_seqlens.cpu()  # one host sync: the values decide correctness, so they are checked
        if offsets[0] != 0 or offsets[-1] != q.shape[1]:
            raise ValueError(f"cu_seqlens must start at 0 and end at T = {q.shape[1]}, got "
                             f"{offsets[0].item()} ... {offsets[-1].item()}")
        if (offsets[1:] < offsets[:-1]).any():
            raise ValueError(f"cu_seqlens must be non-decreasing, got {offsets.tolist()}")
    return cu_seqlens.shape[0] - 1


def _symbolic_any(*tensors) -> bool:
    return any(_is_symbolic(t) for t in tensors)


def check_args(q, k, v, initial_state, initial_key_sum, feature_map, normalize, cu_seqlens) -> None:
    """q, k [B, T, H, K], v [B, T, H, V] of one dtype and device; states [n, H, K, V] and [n, H, K] in the state
    dtype (n = B, or the number of sequences in cu_seqlens)."""
    _checks.check_tensor("q", q, ndim=4)
    _checks.check_tensor("k", k, ndim=4)
    _checks.check_tensor("v", v, ndim=4)
    _checks.check_same_dtype_device("q", q, k=k, v=v)
    batch, _, heads, head_dim = q.shape
    if k.shape != q.shape:
        raise ValueError(f"k must have q's shape {tuple(q.shape)} (B, T, H, Dk), got {tuple(k.shape)}")
    _checks.check_shape("v", v, (*q.shape[:3], None), "(B, T, H, Dv) with q's B, T, H")
    value_dim = v.shape[3]
    for name, size in (("q.shape[0]", batch), ("q.shape[2]", heads), ("q.shape[3]", head_dim),
                       ("v.shape[3]", value_dim)):
        _checks.check_positive(name, size)
    if head_dim > MAX_HEAD_DIM or value_dim > MAX_HEAD_DIM:
        raise ValueError(f"q.shape[3] (Dk) and v.shape[3] (Dv) must be <= {MAX_HEAD_DIM}, got Dk = {head_dim}, "
                         f"Dv = {value_dim}")
    _checks.check_choice("feature_map", feature_map, FEATURE_MAPS)
    if not isinstance(normalize, bool):
        raise ValueError(f"normalize must be a bool, got {normalize!r}")
    n = batch if cu_seqlens is None else check_cu_seqlens(cu_seqlens, q)
    dtype = state_dtype(q.dtype)
    for name, state, shape, what in (
            ("initial_state", initial_state, (n, heads, head_dim, value_dim), "(n, H, Dk, Dv)"),
            ("initial_key_sum", initial_key_sum, (n, heads, head_dim), "(n, H, Dk)")):
        if state is None:
            continue
        _checks.check_tensor(name, state, dtypes=(dtype,))
        _checks.check_shape(name, state, shape, f"{what}, n = {'B' if cu_seqlens is None else 'sequences'}")
        if state.device != q.device:
            raise ValueError(f"{name} must be on q's device {q.device}, got {state.device}")
    if initial_key_sum is not None and not normalize:
        raise ValueError("initial_key_sum is only used with normalize=True")
