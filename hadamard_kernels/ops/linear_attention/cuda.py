"""CUDA C++ backend of causal_linear_attention: launchers for the kernels in csrc/linear_attention*.cu (module
hadamard_kernels._C).

One kernel template, a chunked scan, runs every pass: a block owns one (sequence, head) and 64 output columns,
walks the sequence in chunks of 64 tokens and keeps its slice of the state in fp32 shared memory; inside a chunk
the masked (A B^T ∘ M) C and the state product A S run on tensor cores (float16/bfloat16, fp32 accumulation) or
as exact fp32 FMAs (float32). Forward: one pass (A = phi(q), B = phi(k), C = v, the normalizer in fp32 in the
same kernel); one token per sequence (T = 1 without cu_seqlens: decoding) runs a decode kernel instead, which
reads the state and writes the new one once, in fp32. Backward: with normalize a forward pass writes den_t and
grad_o_t . o_t per token into a workspace (4 * (1 + ceil(V / 64)) * B * T * H bytes); then one pass per gradient
asked for: dq forward in time, dk (and the key-sum gradient) and dv (and the state gradient) in reverse. Nothing
else is kept between the passes.

Parallelism: a pass has sequences x heads x ceil(columns / 64) blocks. When that leaves SMs idle (few heads, long
T), `common.SegmentPlan` (the Triton backend's plan too) cuts every sequence into segments: each pass then sums
every segment's state contribution, scans the sums into each segment's start state and runs one block per segment
(csrc/linear_attention.cu), with the sums, 4 * segments * H * (K * V + K) bytes, in the workspace.
"""

from __future__ import annotations

import torch

from ..._backend import require_cuda_extension
from .common import FEATURE_MAPS, SegmentPlan, properties

# kLinearAttentionMaxDim in csrc/include/hadamard_kernels/linear_attention.h (exported as
# _C.LINEAR_ATTENTION_MAX_DIM): a block keeps a [K or V, 64] slice of the fp32 state in shared memory.
MAX_DIM = 256
DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def shared_bytes(dtype, K, V) -> int:
    """Shared memory of one block of the scan kernel, the largest over the passes (their reduction dim is K or V):
    shared_bytes() in csrc/linear_attention_kernels.cuh (four [64, 64] tiles, the fp32 state [dim, 64 + 4] and, for
    16-bit inputs, three [64, 64] staging tiles) plus its static arrays."""
    elem, pad, staged = (4, 4, 0) if dtype == torch.float32 else (2, 8, 3)
    dim = -(-max(K, V) // 64) * 64
    return (4 * 64 * (64 + pad) + staged * 64 * 64) * elem + dim * 68 * 4 + 4 * (256 + 7 * 64 + 4)


def unsupported(q, k, v, initial_state, initial_key_sum, feature_map, normalize, scale, eps, output_final_state,
                cu_seqlens):
    if q.dtype not in DTYPES:
        return f"the cuda kernels support float32, float16 and bfloat16, got {q.dtype}"
    K, V = q.shape[-1], v.shape[-1]
    if K > MAX_DIM or V > MAX_DIM:
        return (f"the cuda kernels keep a [K or V, 64] slice of the fp32 state in shared memory and support "
                f"K, V <= {MAX_DIM}, got K={K}, V={V}")
    if q.device.type == "cuda":
        # GPUs with 99 KB per block (sm_86, sm_89) fit every 16-bit size up to K, V = 128 and float32 up to 64.
        limit = getattr(properties(q), "shared_memory_per_block_optin", None)
        if limit and (need := shared_bytes(q.dtype, K, V)) > limit:
            return (f"K={K}, V={V} in {q.dtype} need {need} bytes of shared memory per block, this GPU allows "
                    f"{limit}")
    return None


def _rows(x):
    """(x, row stride, head stride): the kernels view x [B, T, H, D] as [B * T, H, D] with unit column stride.
    A copy only when x's strides do not allow that view (a slice of a fused qkv projection does)."""
    B, T, _, D = x.shape
    if (D > 1 and x.stride(3) != 1) or (B > 1 and T > 1 and x.stride(0) != T * x.stride(1)):
        x = x.contiguous()
    return x, (x.stride(1) if T > 1 else x.stride(0)), x.stride(2)


def _ptr(t):
    return 0 if t is None else t.data_ptr()


def _state(t):
    return None if t is None else t.contiguous()


def _params(ext, q, k, v, feature_map, normalize, scale, eps, cu_seqlens, plan, **fields):
    """LinearAttentionParams for q, k, v (as returned by _rows), the options and the segment plan; `fields` adds the
    rest."""
    (q, q_rs, q_hs), (k, k_rs, k_hs), (v, v_rs, v_hs) = q, k, v
    B, T, H, K = q.shape
    if plan.split:
        tables = (plan.seg_off, plan.seg_seq) if plan.varlen else (None, None)
        fields.update(segment_chunks=plan.L, segments=plan.G, segment_offsets=_ptr(tables[0]),
                      segment_sequence=_ptr(tables[1]))
    return ext.LinearAttentionParams(
        q=q.data_ptr(), k=k.data_ptr(), v=v.data_ptr(), cu_seqlens=_ptr(cu_seqlens),
        B=B, T=T, H=H, K=K, V=v.shape[-1], N=B if cu_seqlens is None else cu_seqlens.shape[0] - 1,
        q_row_stride=q_rs, q_head_stride=q_hs, k_row_stride=k_rs, k_head_stride=k_hs,
        v_row_stride=v_rs, v_head_stride=v_hs,
        dtype=ext.DTYPES.index(str(q.dtype).removeprefix("torch.")), feature_map=FEATURE_MAPS.index(feature_map),
        normalize=bool(normalize), scale=float(scale), eps=float(eps), **fields)


def _workspace(ext, params, backward, like):
    """The launcher's scratch (`params.workspace` set), or None when it needs none. Returned to be kept alive until
    the launch is enqueued."""
    size = (ext.linear_attention_bwd_workspace_bytes if backward else ext.linear_attention_fwd_workspace_bytes)(params)
    if not size:
        return None
    workspace = torch.empty(size, device=like.device, dtype=torch.uint8)
    params.workspace = workspace.data_ptr()
    return workspace


def _out(shape, like):
    """A contiguous [B, T, H, D] output in like's dtype, with its row and head strides."""
    out = torch.empty(shape, device=like.device, dtype=like.dtype)
    return out, out.stride(1), out.stride(2)


def forward(q, k, v, initial_state, initial_key_sum, feature_map, normalize, scale, eps, output_final_state,
            cu_seqlens, *, segment=None):
    """segment: force the segment length in chunks (tests of the split on small sizes)."""
    ext = require_cuda_extension()
    B, T, H, K = q.shape
    V = v.shape[-1]
    N = B if cu_seqlens is None else cu_seqlens.shape[0] - 1
    o, o_rs, o_hs = _out((B, T, H, V), q)
    final_state = q.new_empty((N, H, K, V), dtype=torch.float32) if output_final_state else None
    final_key_sum = q.new_empty((N, H, K), dtype=torch.float32) if output_final_state and normalize else None
    initial_state, initial_key_sum = _state(initial_state), _state(initial_key_sum if normalize else None)
    cu_seqlens = None if cu_seqlens is None else cu_seqlens.contiguous()
    with torch.cuda.device(q.device):
        plan = SegmentPlan(q, cu_seqlens, N, H, V, segment)
        params = _params(ext, _rows(q), _rows(k), _rows(v), feature_map, normalize, scale, eps, cu_seqlens, plan,
                         o=o.data_ptr(), o_row_stride=o_rs, o_head_stride=o_hs,
                         initial_state=_ptr(initial_state), initial_key_sum=_ptr(initial_key_sum),
                         final_state=_ptr(final_state), final_key_sum=_ptr(final_key_sum))
        workspace = _workspace(ext, params, False, q)  # noqa: F841 (alive until the launch is enqueued)
        ext.linear_attention_fwd(params, torch.cuda.current_stream().cuda_stream)
    return o, final_state, final_key_sum


def backward(grad_o, grad_final_state, grad_final_key_sum, q, k, v, initial_state, initial_key_sum, feature_map,
             normalize, scale, eps, cu_seqlens, needs, *, segment=None):
    need_q, need_k, need_v, need_state, need_key_sum = needs
    need_key_sum = need_key_sum and normalize
    if not (need_q or need_k or need_v or need_state or need_key_sum):
        return None, None, None, None, None
    ext = require_cuda_extension()
    B, T, H, K = q.shape
    V = v.shape[-1]
    N = B if cu_seqlens is None else cu_seqlens.shape[0] - 1
    dq, dq_rs, dq_hs = _out(q.shape, q) if need_q else (None, 0, 0)
    dk, dk_rs, dk_hs = _out(k.shape, k) if need_k else (None, 0, 0)
    dv, dv_rs, dv_hs = _out(v.shape, v) if need_v else (None, 0, 0)
    d_state = q.new_empty((N, H, K, V), dtype=torch.float32) if need_state else None
    d_key_sum = q.new_empty((N, H, K), dtype=torch.float32) if need_key_sum else None
    initial_state, initial_key_sum = _state(initial_state), _state(initial_key_sum if normalize else None)
    grad_final_state = _state(grad_final_state)
    grad_final_key_sum = _state(grad_final_key_sum if normalize else None)
    grad_o, go_rs, go_hs = _rows(grad_o)
    cu_seqlens = None if cu_seqlens is None else cu_seqlens.contiguous()
    with torch.cuda.device(q.device):
        # One plan for every pass: the dq / dk passes have ceil(K / 64) column blocks, the others ceil(V / 64).
        plan = SegmentPlan(q, cu_seqlens, N, H, min(K, V), segment)
        params = _params(ext, _rows(q), _rows(k), _rows(v), feature_map, normalize, scale, eps, cu_seqlens, plan,
                         grad_o=grad_o.data_ptr(), o_row_stride=go_rs, o_head_stride=go_hs,
                         dq=_ptr(dq), dq_row_stride=dq_rs, dq_head_stride=dq_hs,
                         dk=_ptr(dk), dk_row_stride=dk_rs, dk_head_stride=dk_hs,
                         dv=_ptr(dv), dv_row_stride=dv_rs, dv_head_stride=dv_hs,
                         initial_state=_ptr(initial_state), initial_key_sum=_ptr(initial_key_sum),
                         grad_final_state=_ptr(grad_final_state), grad_final_key_sum=_ptr(grad_final_key_sum),
                         grad_initial_state=_ptr(d_state), grad_initial_key_sum=_ptr(d_key_sum))
        workspace = _workspace(ext, params, True, q)  # noqa: F841 (alive until the launch is enqueued)
        ext.linear_attention_bwd(params, torch.cuda.current_stream().cuda_stream)
    return dq, dk, dv, d_state, d_key_sum
