"""causal_linear_attention's spec shared by its backends: option values and argument checks."""

from __future__ import annotations

import functools

import torch

from ... import _checks

# Index = the code the kernels use.
FEATURE_MAPS = ("identity", "elu1", "relu")
MAX_HEAD_DIM = 256  # the op's contract (README: Dk and Dv up to 256), a ValueError beyond it
CHUNK = 64  # tokens per chunk, in both fused backends
PLAN_COLUMNS = 64  # state columns per program the segment plan assumes (the Triton autotuner may pick another)


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
    if not _symbolic_any(cu_seqlens, q) and not _capturing_cuda_graph(q):
        offsets = cu_seqlens.cpu()  # one host sync: the values decide correctness, so they are checked
        if offsets[0] != 0 or offsets[-1] != q.shape[1]:
            raise ValueError(f"cu_seqlens must start at 0 and end at T = {q.shape[1]}, got "
                             f"{offsets[0].item()} ... {offsets[-1].item()}")
        if (offsets[1:] < offsets[:-1]).any():
            raise ValueError(f"cu_seqlens must be non-decreasing, got {offsets.tolist()}")
    return cu_seqlens.shape[0] - 1


def _symbolic_any(*tensors) -> bool:
    return any(_is_symbolic(t) for t in tensors)


def _capturing_cuda_graph(t: torch.Tensor) -> bool:
    """Whether a CUDA graph is being captured on the current stream. A host read of a device tensor is an error
    there, so values are not checked: the eager warm-up a capture needs checked the values it had, and the graph's
    replays read whatever the tensor then holds (README: Packed sequences)."""
    return t.is_cuda and torch.cuda.is_current_stream_capturing()


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


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


@functools.cache
def gpu_properties(index: int):
    return torch.cuda.get_device_properties(index)


def properties(t: torch.Tensor):
    """The properties of t's GPU (SM count, compute capability, shared memory per block), cached."""
    return gpu_properties(t.device.index if t.device.index is not None else torch.cuda.current_device())


class SegmentPlan:
    """How sequences map to the fused backends' programs (blocks), one place for both. A program walks one segment
    of a sequence chunk by chunk; a sequence is one segment unless sequences x heads x column blocks would leave
    SMs idle, and then it is cut into segments of L chunks (`segment` forces L, for tests). With a split, a pass
    first sums each segment's b^T c, then scans those sums into each segment's start state (which also gives the
    final state), then runs the chunked pass on every segment at once.

    Attributes: split; L (chunks per segment); nseg (segments per sequence without cu_seqlens); G (segments in
    all: with cu_seqlens an upper bound, as the grid is sized without a host sync); seg_off [N + 1] int32 (first
    segment of each sequence) and seg_seq [G] int32 (each segment's sequence), built on the device with torch ops,
    empty unless split with cu_seqlens."""

    def __init__(self, q, cu_seqlens, N, H, DC, segment=None):
        T = q.shape[1]
        self.varlen, self.cu, self.T, self.N = cu_seqlens is not None, cu_seqlens, T, N
        longest = _cdiv(T, CHUNK)  # chunks of the longest possible sequence
        typical = longest if cu_seqlens is None else _cdiv(_cdiv(T, N), CHUNK)
        if segment is None and q.is_cuda:
            programs = N * H * _cdiv(DC, PLAN_COLUMNS)
            sms = properties(q).multi_processor_count
            if programs < sms and typical > 2:
                segment = max(2, _cdiv(typical, _cdiv(2 * sms, programs)))
        self.split = segment is not None and segment < longest
        self.L = segment if self.split else max(longest, 1)
        self.nseg, self.G = 1, N
        self.seg_seq = self.seg_off = q.new_empty(0, dtype=torch.int32)
        if self.split and not self.varlen:
            self.nseg = _cdiv(longest, self.L)
            self.G = N * self.nseg
        elif self.split:
            # Segments of sequence n: seg_off[n] .. seg_off[n+1] - 1, at least one (an empty sequence still has a
            # final state). The grid takes an upper bound of their number.
            lens = (cu_seqlens[1:] - cu_seqlens[:-1]).to(torch.int64)
            per_seq = torch.clamp((lens + CHUNK * self.L - 1) // (CHUNK * self.L), min=1)
            self.seg_off = torch.zeros(N + 1, dtype=torch.int32, device=q.device)
            self.seg_off[1:] = torch.cumsum(per_seq, 0)
            self.G = T // (CHUNK * self.L) + N + 1
            g = torch.arange(self.G, device=q.device, dtype=torch.int32)
            self.seg_seq = torch.searchsorted(self.seg_off[1:], g, right=True, out_int32=True).clamp_(max=N - 1)
