"""Triton kernels for causal_linear_attention.

One chunked kernel computes every pass. With a, b [T, DA] and c [T, DC] per sequence and head it forms, chunk by
chunk (BT = 64 tokens), out_t = sum_{s in chunk, s <= t} (a_t . b_s) c_s + a_t R, then R += b_chunk^T c_chunk:
the intra-chunk masked product (a_c b_c^T ∘ M) c_c and the inter-chunk term a_c R on tensor cores, the running
state R [DA, BC] in fp32 registers (fp64 for fp64 inputs), never in memory. A program owns one sequence (or one
segment of it, below), one head and BC columns of c, and walks its chunks in order (the backward's dk, dv passes
walk them in reverse, with the mask transposed: s >= t). Feature maps and their derivatives are applied to the
loaded tiles. With Q = phi(q), K = phi(k) and the row weights w = scale (/ den), d(num) = dN = w * do:

    pass    a        b          c         R (start)    out                        extra (normalize)
    o       Q        K          v         S_0          o = scale * out (/den)     den = rowsum(A) + Q.z + eps, z += K
    dq      do       v          K         S_0^T        dq = phi'(q) * w * out     a, b get a column x, 1; R a row z
    dk      v        do         w Q  rev  G^T          dk = phi'(k) * out         a, b get a column 1, x; R a row g_z
    dv      K        Q          dN   rev  G            dv = out                   -

(G, g_z: gradients of the final state and key sum.) With normalize, d(den) = -(do . o) / den = w * x, x = -(do . o)
/ scale: dN's row with its extra column is w * [do, x], so dq and dk take the loaded do tile (in shared memory, not
a [BT, DA] tile computed in registers) and apply w to dq's output rows and to the rows of dk's small c tile. The
final R of the o pass is the final state S_T, of the dv pass d S_0; the extra row of the dk pass ends as d z_0.
With normalize the backward first reruns the o pass to get o and den (fp32, [B*T, H]), then `_den_grad_kernel`
computes x once per row. A pass costs about one forward: it reads its three operands and writes one output, so the
backward is three passes (four with normalize); the per-chunk states are never written (only per-segment sums,
when sequences are split as below).

Parallelism: programs = sequences x heads x cdiv(DC, BC). When that is below the SM count (small batch x heads,
long T), every sequence is cut into segments of L chunks (`common.SegmentPlan`, shared with the CUDA backend):
`_segment_sum_kernel` computes each segment's b^T c (a parallel reduction), `_segment_scan_kernel` turns them into
each segment's start state (a short sequential scan over segments, which also writes the final state), and the
chunk kernel then runs one program per segment.

Precision: accumulation, the state R, the key sum z and den are fp32. The tiles and the state enter the dots in
the input dtype (bf16: as the per-chunk states fla stores in bf16; an emulation at T = 2048..8192, D = 64 gives
about 2e-3 relative error, mostly the bf16 output's own rounding); fp16 inputs take the inter-chunk dot in tf32,
since the state can pass fp16's range. Q.z and the key sum's update run as small dots too, z split into hi + lo
parts so it keeps fp32 precision (the key sum grows like T).

cu_seqlens: chunks start at each sequence's first token and never cross its end; the segment tables are built on
the device with torch ops (no host sync). T == 1 without cu_seqlens (decoding) runs `_decode_kernel`, one program
per (sequence, head, V block) with no dot: S += phi(k)^T v, o = phi(q) S (/ den).
"""

from __future__ import annotations

import math
import struct

import torch
import triton
import triton.language as tl

from .._library import triton_autotune
from .common import CHUNK as BT
from .common import FEATURE_MAPS, MAX_HEAD_DIM, SegmentPlan, properties, state_dtype

_FMAP = {name: code for code, name in enumerate(FEATURE_MAPS)}
_MODE_O, _MODE_DQ, _MODE_DK, _MODE_DV = 0, 1, 2, 3

# Chunk kernel configs (BC: state columns per program, R is [DA, BC] fp32), one list per width DA of the a/b tiles
# (the head dim padded to a power of 2). First config = the default when autotuning is off; the interpreter takes
# the smallest. Kept: configs that compile for sm_90 (bf16) to wgmma with no register spills (ptxas -v) in any pass,
# feature map or normalize, except DA = 256 at BC = 32, whose o pass with elu1 or relu spills 32-48 bytes: it stays
# for the autotuner, as BC = 16 computes each chunk's a b^T for twice as many column blocks.
_CHUNK_CONFIGS = [  # DA <= 64
    triton.Config({"BC": bc}, num_warps=w, num_stages=s)
    for bc, w, s in [(64, 4, 2), (64, 8, 2), (64, 4, 3), (128, 8, 2)]
]
_CHUNK_CONFIGS_MID = [  # DA = 128
    triton.Config({"BC": bc}, num_warps=w, num_stages=s)
    for bc, w, s in [(64, 8, 2), (32, 8, 2), (64, 8, 3)]
]
# DA = 256: maxnreg 255 states the 8-warp limit ptxas has anyway, but without it ptxas for sm_80 gives the dk pass
# 32 registers and a 5.8 KB stack (14.7 KB of spill traffic; 255 registers and 2.4 KB with it), the dq pass 128.
_CHUNK_CONFIGS_WIDE = [  # DA = 256
    triton.Config({"BC": bc}, num_warps=w, num_stages=s, maxnreg=255)
    for bc, w, s in [(16, 8, 2), (32, 8, 2)]
]
# DA = 256 where two stages exceed a block's shared memory (`_lean`): fp32 inputs (the o and dv passes take 270 KB,
# the segment sums 245 KB at 3 stages), GPUs with less than Hopper's 227 KB (A100's 163 KB: the bf16 o pass with
# elu1/relu and normalize takes 164 KB). One stage: 135-147 KB in fp32, 100 KB in bf16 (sm_80).
_CHUNK_CONFIGS_LEAN = [triton.Config({"BC": bc}, num_warps=w, num_stages=s, maxnreg=255)
                       for bc, w, s in [(16, 8, 1), (32, 8, 1)]]
_SUM_CONFIGS_LEAN = [triton.Config({"BC": bc}, num_warps=w, num_stages=s) for bc, w, s in [(64, 8, 2), (32, 8, 2)]]
_SUM_CONFIGS = {  # segment sums, by DA
    da: [triton.Config({"BC": bc}, num_warps=w, num_stages=s) for bc, w, s in configs]
    for da, configs in [(64, [(64, 4, 3), (64, 8, 3), (128, 8, 3)]), (128, [(64, 8, 3), (128, 8, 3), (32, 8, 3)]),
                        (256, [(64, 8, 3), (32, 8, 3)])]
}
_KEY = ["K", "V", "MODE", "NORMALIZE", "FMAP", "SPLIT", "VARLEN"]


# ----------------------------------------------------------------------------------------------- helpers
@triton.jit
def _phi(x, FMAP: tl.constexpr):
    """identity | elu1 = elu(x) + 1 | relu (NaN stays NaN, as torch.relu)."""
    if FMAP == 1:
        x = tl.where(x > 0, x + 1.0, tl.exp(x))
    elif FMAP == 2:
        x = tl.where(x < 0, 0.0, x)
    return x


@triton.jit
def _times_phi_grad(y, x, FMAP: tl.constexpr):
    """y * phi'(x): phi' = 1 | (1 if x > 0 else exp(x)) | (1 if x > 0 else 0)."""
    if FMAP == 1:
        y = y * tl.where(x > 0, 1.0, tl.exp(x))
    elif FMAP == 2:
        y = y * tl.where(x > 0, 1.0, 0.0)
    return y


@triton.jit
def _load(ptr, o_t, m_t, o_d, m_d, H, D, i_h, PHI: tl.constexpr, ACC: tl.constexpr, OUT: tl.constexpr):
    """[BT, BD] tile of x [rows, H, D] at head i_h, rows o_t (int64), zero outside the masks, as OUT (the input
    dtype for dot operands); phi(x) when PHI >= 0 (a feature-map code). Helpers are few and flat: each nested
    call costs the interpreter ~3 ms."""
    x = tl.load(ptr + (o_t[:, None] * H + i_h) * D + o_d[None, :], mask=m_t[:, None] & m_d[None, :], other=0.0)
    if PHI == 1 or PHI == 2:
        # phi in the loaded dtype: for 16-bit inputs the same single rounding as fp32 math and a cast, in half the
        # registers.
        if ACC == tl.float64:
            x = x.to(tl.float64)
        if PHI == 1:
            x = tl.where(x > 0, x + 1.0, tl.exp(x.to(ACC)).to(x.dtype))
        else:
            x = tl.where(x < 0, 0.0, x)
        # elu1 made the padding (loaded as 0) 1: zero it by 0/1 row and column factors (a 2D mask used after the
        # load would stay live through the software pipeline, a register per element). relu needs no zeroing, but
        # the factors also keep phi in the load's layout: phi(x) is stored to shared memory once and read by each
        # dot, while a phi of constants only would be moved past the conversion to each dot's operand layout, the
        # tile held in registers in two layouts (ptxas -v of an sm_90 build at head dim 256: 136 bytes of spills).
        x = x * tl.where(m_t, 1.0, 0.0).to(x.dtype)[:, None] * tl.where(m_d, 1.0, 0.0).to(x.dtype)[None, :]
    return x.to(OUT)


@triton.jit
def _grad_num(do_ptr, x_ptr, den_ptr, o_t, m_t, o_d, m_d, H, V, i_h, scale, NORMALIZE: tl.constexpr,
              WITH_X: tl.constexpr, ACC: tl.constexpr):
    """The do tile [BT, BD] as loaded, the row weights w [BT] (ACC) of d(num) = w * do (w = scale (/ den)) and,
    when WITH_X, x [BT] (ACC, `_den_grad_kernel`'s) of d(den) = w * x."""
    do = tl.load(do_ptr + (o_t[:, None] * H + i_h) * V + o_d[None, :], mask=m_t[:, None] & m_d[None, :], other=0.0)
    x = tl.zeros(o_t.shape, ACC)
    w = tl.zeros(o_t.shape, ACC) + scale
    if NORMALIZE:
        w = scale / tl.load(den_ptr + o_t * H + i_h, mask=m_t, other=1.0).to(ACC)
        if WITH_X:
            x = tl.load(x_ptr + o_t * H + i_h, mask=m_t, other=0.0).to(ACC)
    return do, w, x


@triton.jit
def _scalar(hi, lo, ACC: tl.constexpr):
    """A float option passed as two fp32 arguments hi + lo (hi = fp32(x), lo = x - hi): fp32 math gets hi (the
    launch types Python floats fp32; Inductor may pass fp64, hence the cast), fp64 inputs (the interpreter) get x to
    about 1e-15."""
    return tl.cast(hi, tl.float32).to(ACC) + tl.cast(lo, tl.float32).to(ACC)


@triton.jit
def _first_block(mask, i_c):
    """mask where i_c == 0, else all False (the scalar test is broadcast first: the interpreter rejects a bool
    tensor & a bool scalar)."""
    return mask & ((tl.zeros(mask.shape, tl.int32) + i_c) == 0)


@triton.jit
def _matvec(a, z, DT: tl.constexpr, ACC: tl.constexpr, PREC: tl.constexpr, TF32: tl.constexpr, W: tl.constexpr):
    """a [M, N] (DT) . z [N] (ACC) -> [M] on tensor cores: z split into hi + lo, the columns 0 and 1 of a [N, W]
    operand (bf16 hi + lo keep 16 bits; tf32 hi + lo (the low 13 bits masked off) about 21). W: the width of
    another dot of a (a @ R's BC), so both take a in one operand layout."""
    o_z = tl.arange(0, W)[None, :]
    if ACC == tl.float64:
        z_hi = z
        z_lo = z * 0.0
    elif TF32 or DT == tl.float32:
        z_hi = (z.to(tl.int32, bitcast=True) & -8192).to(tl.float32, bitcast=True)
        z_lo = z - z_hi
    else:
        z_hi = z.to(DT).to(ACC)
        z_lo = z - z_hi
    zz = tl.where(o_z == 0, z_hi[:, None], tl.where(o_z == 1, z_lo[:, None], 0.0))
    if TF32:
        r = tl.dot(a.to(tl.float32), zz.to(tl.float32), input_precision="tf32", out_dtype=ACC)
    else:
        r = tl.dot(a, zz.to(DT), input_precision=PREC, out_dtype=ACC)
    return tl.sum(r, 1)


@triton.jit
def _column_sum(b_t, PREC: tl.constexpr, ACC: tl.constexpr, W: tl.constexpr):
    """sum over the columns of b_t [DA, BT] -> [DA] (ACC), as a [DA, BT] x [BT, W] dot with one column of ones: the
    operand of the state update b^T c, W its BC (a [16, BT] x [BT, DA] dot held b in registers in another layout,
    and spilled at DA = 256)."""
    o_w = tl.arange(0, W)[None, :]
    o_t = tl.arange(0, b_t.shape[1])[:, None]
    ones = tl.where((o_w == 0) & (o_t >= 0), 1.0, 0.0).to(b_t.dtype)
    return tl.sum(tl.dot(b_t, ones, input_precision=PREC, out_dtype=ACC), 1)


@triton.jit
def _sequence(g, cu_ptr, seg_seq_ptr, seg_off_ptr, T, NSEG, L, VARLEN: tl.constexpr, SPLIT: tl.constexpr,
              BT: tl.constexpr):
    """Segment g -> (sequence n, first token, end token, first chunk, end chunk). Without SPLIT a segment is a
    whole sequence. Past the last segment of a varlen batch (the grid is an upper bound) the chunk range is empty."""
    if VARLEN:
        if SPLIT:
            n = tl.load(seg_seq_ptr + g)
            j = g - tl.load(seg_off_ptr + n)
        else:
            n = g
            j = 0
        bos = tl.load(cu_ptr + n).to(tl.int64)
        eos = tl.load(cu_ptr + n + 1).to(tl.int64)
    else:
        n = g // NSEG
        j = g % NSEG
        bos = n.to(tl.int64) * T
        eos = bos + T
    n_chunks = tl.cdiv(eos - bos, BT)
    c0 = tl.minimum(j * L, n_chunks)
    c1 = tl.minimum(c0 + L, n_chunks)
    return n, bos, eos, c0, c1


# ----------------------------------------------------------------------------------------------- the passes
@triton.jit
def _operands(q_ptr, k_ptr, v_ptr, do_ptr, x_ptr, den_ptr, o_t, m_t, o_a, m_a, o_c, m_c, H, K, V, i_h, scale,
              MODE: tl.constexpr, FMAP: tl.constexpr, NORMALIZE: tl.constexpr, WITH_A: tl.constexpr,
              ACC: tl.constexpr, DT: tl.constexpr):
    """The pass's a [BT, DA] (when WITH_A), b [BT, DA], c [BT, BC] tiles of one chunk (DT), the extra columns
    ea, eb [BT] (ACC) of a and b (the dq and dk passes with normalize; zeros otherwise) and the row weights w [BT]
    (ACC) of dN = w * do, which the dq pass applies to its output. a and b are loaded tiles, or phi of one: a tile
    computed in registers (as dN was) is a wgmma operand only from registers, [BT, DA] of them per warp group (at
    head dim 256 the dq and dk passes spilled), a loaded one from shared memory."""
    a = tl.zeros((o_t.shape[0], o_a.shape[0]), DT)
    ea = tl.zeros(o_t.shape, ACC)
    eb = tl.zeros(o_t.shape, ACC)
    w = tl.zeros(o_t.shape, ACC)
    valid = tl.where(m_t, 1.0, 0.0).to(ACC)
    if MODE == 0:
        if WITH_A:
            a = _load(q_ptr, o_t, m_t, o_a, m_a, H, K, i_h, FMAP, ACC, DT)
        b = _load(k_ptr, o_t, m_t, o_a, m_a, H, K, i_h, FMAP, ACC, DT)
        c = _load(v_ptr, o_t, m_t, o_c, m_c, H, V, i_h, -1, ACC, DT)
    elif MODE == 1:
        b = _load(v_ptr, o_t, m_t, o_a, m_a, H, V, i_h, -1, ACC, DT)
        c = _load(k_ptr, o_t, m_t, o_c, m_c, H, K, i_h, FMAP, ACC, DT)
        if WITH_A:
            a, w, ea = _grad_num(do_ptr, x_ptr, den_ptr, o_t, m_t, o_a, m_a, H, V, i_h, scale, NORMALIZE, True, ACC)
        eb = valid
    elif MODE == 2:
        if WITH_A:
            a = _load(v_ptr, o_t, m_t, o_a, m_a, H, V, i_h, -1, ACC, DT)
        b, w, eb = _grad_num(do_ptr, x_ptr, den_ptr, o_t, m_t, o_a, m_a, H, V, i_h, scale, NORMALIZE, True, ACC)
        c = _load(q_ptr, o_t, m_t, o_c, m_c, H, K, i_h, FMAP, ACC, DT)
        # w on the state update's c only: the intra-chunk product weights A's columns before the causal mask, so a
        # NaN weight (a NaN in q_t) reaches only the dk rows that token t feeds, as in the reference.
        cs = (c.to(ACC) * w[:, None]).to(DT)
        ea = valid
    else:
        if WITH_A:
            a = _load(k_ptr, o_t, m_t, o_a, m_a, H, K, i_h, FMAP, ACC, DT)
        b = _load(q_ptr, o_t, m_t, o_a, m_a, H, K, i_h, FMAP, ACC, DT)
        c, w, _ = _grad_num(do_ptr, x_ptr, den_ptr, o_t, m_t, o_c, m_c, H, V, i_h, scale, NORMALIZE, False, ACC)
        c = (c.to(ACC) * w[:, None]).to(DT)
    if MODE != 2:
        cs = c  # c as it enters the state update
    return a, b, c, cs, ea, eb, w


@triton.jit
def _chunk_kernel(q_ptr, k_ptr, v_ptr, do_ptr, x_ptr, den_ptr, out_ptr, r0_ptr, e0_ptr, rT_ptr, eT_ptr, seg_ptr,
                  sege_ptr, cu_ptr, seg_seq_ptr, seg_off_ptr, T, H, K, V, NSEG, L, scale, scale_lo, eps,
                  eps_lo, stride_ra, stride_rc, MODE: tl.constexpr, FMAP: tl.constexpr, NORMALIZE: tl.constexpr,
                  HAS_R0: tl.constexpr, HAS_E0: tl.constexpr, STORE_R: tl.constexpr, STORE_E: tl.constexpr,
                  STORE_DEN: tl.constexpr, VARLEN: tl.constexpr, SPLIT: tl.constexpr, ACC: tl.constexpr,
                  PREC: tl.constexpr, ALIGN: tl.constexpr, WGMMA: tl.constexpr, DA: tl.constexpr, BT: tl.constexpr,
                  BC: tl.constexpr):
    """One pass (see the module docstring) for one segment, one head and BC columns of c.

    out [rows, H, DC]. r0, rT [N, H, K, V] read/written with strides (stride_ra, stride_rc) over (a, c) dims;
    e0, eT [N, H, K] (the key sum z over a's dims for the o pass, the extra row over c's dims for dq/dk).
    SPLIT: start state and extra from the scanned segment buffers seg [G, H, DA_, DC_] and sege [G, H, *].
    ALIGN: a power of 2 dividing K and V (`_align`). WGMMA: the target has wgmma (sm_90+; the interpreter too)."""
    REVERSE: tl.constexpr = MODE >= 2
    EXTRA_AB: tl.constexpr = NORMALIZE and (MODE == 1 or MODE == 2)
    KEY_SUM: tl.constexpr = NORMALIZE and MODE == 0
    DT: tl.constexpr = q_ptr.dtype.element_ty
    TF32: tl.constexpr = DT == tl.float16  # fp16 inputs: the dot against the state in tf32 (module docstring)
    if ALIGN < 16:  # the same K, V, known to the compiler as multiples of ALIGN (16 it knows itself)
        K = K // ALIGN * ALIGN
        V = V // ALIGN * ALIGN
    scale = _scalar(scale, scale_lo, ACC)
    eps = _scalar(eps, eps_lo, ACC)
    if MODE == 0 or MODE == 3:
        DIM_A = K
        DIM_C = V
    else:
        DIM_A = V
        DIM_C = K
    NC = tl.cdiv(DIM_C, BC)
    pid = tl.program_id(0)
    i_c = pid % NC
    i_h = (pid // NC) % H
    g = pid // (NC * H)
    n, bos, eos, c0, c1 = _sequence(g, cu_ptr, seg_seq_ptr, seg_off_ptr, T, NSEG, L, VARLEN, SPLIT, BT)
    o_a = tl.arange(0, DA)
    m_a = o_a < DIM_A
    o_c = i_c * BC + tl.arange(0, BC)
    m_c = o_c < DIM_C
    m_r = m_a[:, None] & m_c[None, :]
    nh = n.to(tl.int64) * H + i_h
    o_e = o_a if KEY_SUM else o_c  # the extra vector's dims
    m_e = m_a if KEY_SUM else m_c

    if SPLIT:
        gh = g.to(tl.int64) * H + i_h
        R = tl.load(seg_ptr + (gh * DIM_A + o_a[:, None]) * DIM_C + o_c[None, :], mask=m_r, other=0.0).to(ACC)
        e = tl.load(sege_ptr + gh * K + o_e, mask=m_e, other=0.0).to(ACC)
    else:
        if HAS_R0:
            p_r = r0_ptr + nh * K * V + o_a[:, None] * stride_ra + o_c[None, :] * stride_rc
            R = tl.load(p_r, mask=m_r, other=0.0).to(ACC)
        else:
            R = tl.zeros((DA, BC), ACC)
        if HAS_E0:
            e = tl.load(e0_ptr + nh * K + o_e, mask=m_e, other=0.0).to(ACC)
        else:
            e = tl.zeros(o_e.shape, ACC)

    o_i = tl.arange(0, BT)
    if REVERSE:
        causal = o_i[:, None] <= o_i[None, :]
    else:
        causal = o_i[:, None] >= o_i[None, :]
    for i in range(c0, c1):
        if REVERSE:
            ci = c1 - 1 - (i - c0)
        else:
            ci = i
        o_t = bos + ci * BT + o_i
        m_t = o_t < eos
        a, b, c, cs, ea, eb, w = _operands(q_ptr, k_ptr, v_ptr, do_ptr, x_ptr, den_ptr, o_t, m_t, o_a, m_a, o_c,
                                           m_c, H, K, V, i_h, scale, MODE, FMAP, NORMALIZE, True, ACC, DT)
        b_t = tl.trans(b)
        A = tl.dot(a, b_t, input_precision=PREC, out_dtype=ACC)
        if EXTRA_AB:
            A += ea[:, None] * eb[None, :]
        if MODE == 2:
            A = A * w[None, :]  # dN's weights (see _operands)
        A = tl.where(causal, A, 0.0)
        acc = tl.dot(A.to(DT), c, input_precision=PREC, out_dtype=ACC)
        if TF32 and WGMMA and DA >= 256 and (MODE == 1 or MODE == 2 or (FMAP == 0 and not KEY_SUM)):
            # As (R^T a^T)^T (M = BC: mma.sync), a's fp32 copy is a B operand split over the warps, not a [BT, DA]
            # wgmma A operand per warp group (sm_90 fp16 at 256: 88-912 B of spills -> 0-184). Not where a is phi of
            # a load, nor in the o pass with normalize (it spilled more, or lost cp.async), nor on sm_80 (mma.sync
            # either way: up to 15 KB of spills instead of 4 KB).
            acc += tl.trans(tl.dot(tl.trans(R), tl.trans(a).to(tl.float32), input_precision="tf32", out_dtype=ACC))
        elif TF32:  # fp16 inputs: fp16 cannot hold the state's range
            acc += tl.dot(a.to(tl.float32), R, input_precision="tf32", out_dtype=ACC)
        else:
            acc += tl.dot(a, R.to(DT), input_precision=PREC, out_dtype=ACC)
        # The state update before the epilogue, not after the store: at head dim 256 the o pass spilled otherwise
        # (ptxas -v of an sm_90 build).
        R += tl.dot(b_t, cs, input_precision=PREC, out_dtype=ACC)
        if EXTRA_AB:
            acc += ea[:, None] * e[None, :]
            e += _matvec(tl.trans(cs), eb, DT, ACC, PREC, TF32, 16)  # a dot, as the key sum's below
        if MODE == 0:
            if NORMALIZE:
                # Q.z and the key sum's update as small dots (elementwise forms keep fp32 copies of the a, b tiles
                # in registers): z enters as hi + lo columns, so the dot loses none of its fp32 precision.
                den = tl.sum(A, 1) + _matvec(a, e, DT, ACC, PREC, TF32, BC) + eps
                acc = acc / den[:, None]
                if STORE_DEN:
                    tl.store(den_ptr + o_t * H + i_h, den, mask=_first_block(m_t, i_c))
                e += _column_sum(b_t, PREC, ACC, BC)
            acc = acc * scale
        elif MODE == 1:
            acc = _times_phi_grad(acc * w[:, None], _load(q_ptr, o_t, m_t, o_c, m_c, H, K, i_h, -1, ACC, ACC), FMAP)
        elif MODE == 2:
            acc = _times_phi_grad(acc, _load(k_ptr, o_t, m_t, o_c, m_c, H, K, i_h, -1, ACC, ACC), FMAP)
        p_out = out_ptr + (o_t[:, None] * H + i_h) * DIM_C + o_c[None, :]
        tl.store(p_out, acc.to(out_ptr.dtype.element_ty), mask=m_t[:, None] & m_c[None, :])

    if not SPLIT:  # with SPLIT the scan kernel writes the final state
        if STORE_R:
            # Offsets and mask of its own (the strides the launcher passes, as V): the initial state's load's stayed
            # live through the chunk loop (sm_90, head dim 256: 32-88 B of spills in the o pass).
            if MODE == 0 or MODE == 3:
                p_r = rT_ptr + nh * K * V + o_a[:, None] * V + o_c[None, :]
            else:
                p_r = rT_ptr + nh * K * V + o_a[:, None] + o_c[None, :] * V
            tl.store(p_r, R.to(rT_ptr.dtype.element_ty), mask=(o_a[:, None] < DIM_A) & (o_c[None, :] < DIM_C))
        if STORE_E:
            if KEY_SUM:  # the first column block writes the key sum
                m_e = _first_block(m_e, i_c)
            tl.store(eT_ptr + nh * K + o_e, e.to(eT_ptr.dtype.element_ty), mask=m_e)


@triton.jit
def _segment_sum_kernel(q_ptr, k_ptr, v_ptr, do_ptr, x_ptr, den_ptr, seg_ptr, sege_ptr, cu_ptr, seg_seq_ptr,
                        seg_off_ptr, T, H, K, V, NSEG, L, scale, scale_lo, MODE: tl.constexpr, FMAP: tl.constexpr,
                        NORMALIZE: tl.constexpr, VARLEN: tl.constexpr, ACC: tl.constexpr, PREC: tl.constexpr,
                        ALIGN: tl.constexpr, DA: tl.constexpr, BT: tl.constexpr, BC: tl.constexpr):
    """seg[g, h] = sum over the chunks of segment g of b^T c [DA_, DC_] (fp32), and its extra vector sege[g, h]:
    sum of b (the o pass with normalize, over a's dims) or sum of eb * c (dq, dk with normalize, over c's dims)."""
    EXTRA_AB: tl.constexpr = NORMALIZE and (MODE == 1 or MODE == 2)
    KEY_SUM: tl.constexpr = NORMALIZE and MODE == 0
    DT: tl.constexpr = q_ptr.dtype.element_ty
    TF32: tl.constexpr = DT == tl.float16
    if ALIGN < 16:
        K = K // ALIGN * ALIGN
        V = V // ALIGN * ALIGN
    scale = _scalar(scale, scale_lo, ACC)
    if MODE == 0 or MODE == 3:
        DIM_A = K
        DIM_C = V
    else:
        DIM_A = V
        DIM_C = K
    NC = tl.cdiv(DIM_C, BC)
    pid = tl.program_id(0)
    i_c = pid % NC
    i_h = (pid // NC) % H
    g = pid // (NC * H)
    n, bos, eos, c0, c1 = _sequence(g, cu_ptr, seg_seq_ptr, seg_off_ptr, T, NSEG, L, VARLEN, True, BT)
    o_a = tl.arange(0, DA)
    m_a = o_a < DIM_A
    o_c = i_c * BC + tl.arange(0, BC)
    m_c = o_c < DIM_C
    o_e = o_a if KEY_SUM else o_c
    m_e = m_a if KEY_SUM else m_c
    R = tl.zeros((DA, BC), ACC)
    e = tl.zeros(o_e.shape, ACC)
    o_i = tl.arange(0, BT)
    for ci in range(c0, c1):
        o_t = bos + ci * BT + o_i
        m_t = o_t < eos
        _, b, _, cs, _, eb, _ = _operands(q_ptr, k_ptr, v_ptr, do_ptr, x_ptr, den_ptr, o_t, m_t, o_a, m_a, o_c, m_c,
                                          H, K, V, i_h, scale, MODE, FMAP, NORMALIZE, False, ACC, DT)
        R += tl.dot(tl.trans(b), cs, input_precision=PREC, out_dtype=ACC)
        if EXTRA_AB:
            e += _matvec(tl.trans(cs), eb, DT, ACC, PREC, TF32, 16)
        if KEY_SUM:
            e += _column_sum(tl.trans(b), PREC, ACC, BC)
    gh = g.to(tl.int64) * H + i_h
    tl.store(seg_ptr + (gh * DIM_A + o_a[:, None]) * DIM_C + o_c[None, :], R, mask=m_a[:, None] & m_c[None, :])
    if KEY_SUM:  # the first column block writes the key sum
        m_e = _first_block(m_e, i_c)
    if EXTRA_AB or KEY_SUM:
        tl.store(sege_ptr + gh * K + o_e, e, mask=m_e)


@triton.jit
def _segment_scan_kernel(seg_ptr, sege_ptr, r0_ptr, e0_ptr, rT_ptr, eT_ptr, seg_off_ptr, H, K, V, NSEG,
                         stride_ra, stride_rc, MODE: tl.constexpr, NORMALIZE: tl.constexpr, HAS_R0: tl.constexpr,
                         HAS_E0: tl.constexpr, STORE_R: tl.constexpr, STORE_E: tl.constexpr, VARLEN: tl.constexpr,
                         ACC: tl.constexpr, DA: tl.constexpr, BC: tl.constexpr):
    """In place, per sequence and head: segment sums -> each segment's start state (exclusive scan in the pass's
    direction, seeded with the initial state), and the total -> the final state."""
    REVERSE: tl.constexpr = MODE >= 2
    EXTRA_AB: tl.constexpr = NORMALIZE and (MODE == 1 or MODE == 2)
    KEY_SUM: tl.constexpr = NORMALIZE and MODE == 0
    if MODE == 0 or MODE == 3:
        DIM_A = K
        DIM_C = V
    else:
        DIM_A = V
        DIM_C = K
    NC = tl.cdiv(DIM_C, BC)
    pid = tl.program_id(0)
    i_c = pid % NC
    i_h = (pid // NC) % H
    n = pid // (NC * H)
    if VARLEN:
        g0 = tl.load(seg_off_ptr + n)
        g1 = tl.load(seg_off_ptr + n + 1)
    else:
        g0 = n * NSEG
        g1 = g0 + NSEG
    o_a = tl.arange(0, DA)
    m_a = o_a < DIM_A
    o_c = i_c * BC + tl.arange(0, BC)
    m_c = o_c < DIM_C
    m_r = m_a[:, None] & m_c[None, :]
    o_e = o_a if KEY_SUM else o_c
    m_e = _first_block(m_a, i_c) if KEY_SUM else m_c  # the key sum is scanned by the first column block only
    nh = n.to(tl.int64) * H + i_h
    R = tl.zeros((DA, BC), ACC)
    e = tl.zeros(o_e.shape, ACC)
    if HAS_R0:
        p_r = r0_ptr + nh * K * V + o_a[:, None] * stride_ra + o_c[None, :] * stride_rc
        R = tl.load(p_r, mask=m_r, other=0.0).to(ACC)
    if HAS_E0:
        e = tl.load(e0_ptr + nh * K + o_e, mask=m_e, other=0.0).to(ACC)
    for i in range(g0, g1):
        if REVERSE:
            gs = g1 - 1 - (i - g0)
        else:
            gs = i
        gh = gs.to(tl.int64) * H + i_h
        p_s = seg_ptr + (gh * DIM_A + o_a[:, None]) * DIM_C + o_c[None, :]
        x = tl.load(p_s, mask=m_r, other=0.0)
        tl.store(p_s, R, mask=m_r)
        R += x
        if EXTRA_AB or KEY_SUM:
            p_e = sege_ptr + gh * K + o_e
            y = tl.load(p_e, mask=m_e, other=0.0)
            tl.store(p_e, e, mask=m_e)
            e += y
    if STORE_R:
        p_r = rT_ptr + nh * K * V + o_a[:, None] * stride_ra + o_c[None, :] * stride_rc
        tl.store(p_r, R.to(rT_ptr.dtype.element_ty), mask=m_r)
    if STORE_E:
        tl.store(eT_ptr + nh * K + o_e, e.to(eT_ptr.dtype.element_ty), mask=m_e)


@triton.jit
def _den_grad_kernel(do_ptr, o_ptr, x_ptr, ROWS, V, scale, scale_lo, ACC: tl.constexpr, BR: tl.constexpr,
                     BV: tl.constexpr):
    """x = -(do . o) / scale (d(den) = w * x, module docstring; 0 for scale 0, where w = 0) for BR rows of do, o
    [ROWS, V] (ROWS = B*T*H) into x [ROWS]. Once per row: the dq and dk passes read it, instead of each of their
    column blocks loading o's full rows to recompute it."""
    scale = _scalar(scale, scale_lo, ACC)
    o_r = tl.program_id(0).to(tl.int64) * BR + tl.arange(0, BR)
    m_r = o_r < ROWS
    o_v = tl.arange(0, BV)
    p = o_r[:, None] * V + o_v[None, :]
    m = m_r[:, None] & (o_v < V)[None, :]
    dot = tl.sum(tl.load(do_ptr + p, mask=m, other=0.0).to(ACC) * tl.load(o_ptr + p, mask=m, other=0.0).to(ACC), 1)
    tl.store(x_ptr + o_r, tl.where(scale == 0, 0.0, -dot / scale), mask=m_r)


@triton.jit
def _decode_kernel(q_ptr, k_ptr, v_ptr, o_ptr, s0_ptr, z0_ptr, sT_ptr, zT_ptr, H, K, V, scale, scale_lo, eps, eps_lo,
                   FMAP: tl.constexpr, NORMALIZE: tl.constexpr, HAS_S0: tl.constexpr, HAS_Z0: tl.constexpr,
                   STORE_S: tl.constexpr, ACC: tl.constexpr, DA: tl.constexpr, BC: tl.constexpr):
    """One token per sequence (T == 1): S = S_0 + phi(k)^T v, o = scale * phi(q) S (/ (phi(q).(z_0 + phi(k)) + eps))
    for BC columns of V, with elementwise products (no dot: a [1, K] x [K, BC] product)."""
    pid = tl.program_id(0)
    NC = tl.cdiv(V, BC)
    i_c = pid % NC
    nh = (pid // NC).to(tl.int64)  # = n * H + h, which is also the token's row (T == 1)
    scale = _scalar(scale, scale_lo, ACC)
    eps = _scalar(eps, eps_lo, ACC)
    o_a = tl.arange(0, DA)
    m_a = o_a < K
    o_c = i_c * BC + tl.arange(0, BC)
    m_c = o_c < V
    m_r = m_a[:, None] & m_c[None, :]
    bq = _phi(tl.load(q_ptr + nh * K + o_a, mask=m_a, other=0.0).to(ACC), FMAP)
    bk = _phi(tl.load(k_ptr + nh * K + o_a, mask=m_a, other=0.0).to(ACC), FMAP)
    bk = tl.where(m_a, bk, 0.0)
    bv = tl.load(v_ptr + nh * V + o_c, mask=m_c, other=0.0).to(ACC)
    p_s = nh * K * V + o_a[:, None] * V + o_c[None, :]
    S = bk[:, None] * bv[None, :]
    if HAS_S0:
        S += tl.load(s0_ptr + p_s, mask=m_r, other=0.0).to(ACC)
    o = tl.sum(bq[:, None] * S, 0) * scale
    if NORMALIZE:
        z = bk
        if HAS_Z0:
            z += tl.load(z0_ptr + nh * K + o_a, mask=m_a, other=0.0).to(ACC)
        o = o / (tl.sum(bq * z, 0) + eps)
        if STORE_S:
            tl.store(zT_ptr + nh * K + o_a, z.to(zT_ptr.dtype.element_ty), mask=_first_block(m_a, i_c))
    tl.store(o_ptr + nh * V + o_c, o.to(o_ptr.dtype.element_ty), mask=m_c)
    if STORE_S:
        tl.store(sT_ptr + p_s, S.to(sT_ptr.dtype.element_ty), mask=m_r)


_chunk = {64: triton_autotune(_CHUNK_CONFIGS, key=_KEY)(_chunk_kernel),
          128: triton_autotune(_CHUNK_CONFIGS_MID, key=_KEY)(_chunk_kernel),
          256: triton_autotune(_CHUNK_CONFIGS_WIDE, key=_KEY)(_chunk_kernel),
          "lean": triton_autotune(_CHUNK_CONFIGS_LEAN, key=_KEY)(_chunk_kernel)}
_segment_sum = {da: triton_autotune(configs, key=[n for n in _KEY if n != "SPLIT"])(_segment_sum_kernel)
                for da, configs in [*_SUM_CONFIGS.items(), ("lean", _SUM_CONFIGS_LEAN)]}


# ----------------------------------------------------------------------------------------------- launchers
def unsupported(q, k, v, initial_state, initial_key_sum, feature_map, normalize, scale, eps, output_final_state,
                cu_seqlens):
    if q.shape[-1] > MAX_HEAD_DIM or v.shape[-1] > MAX_HEAD_DIM:
        return (f"the Triton kernels hold a head's Dk and Dv (<= {MAX_HEAD_DIM}) on chip, got Dk = {q.shape[-1]}, "
                f"Dv = {v.shape[-1]}")
    return None


def _hi_lo(x: float) -> tuple[float, float]:
    """x as fp32 hi + fp32 lo (see _scalar)."""
    try:
        hi = struct.unpack("f", struct.pack("f", x))[0]
    except OverflowError:
        return x, 0.0
    return hi, x - hi


def _has_wgmma(q) -> bool:
    """The kernels' WGMMA flag: q's GPU is sm_90 or newer; the interpreter takes the sm_90 forms (tests patch this
    to run the other ones)."""
    return not q.is_cuda or properties(q).major >= 9


def _lean(q, DA: int) -> bool:
    """The one-stage configs (`_CHUNK_CONFIGS_LEAN`): DA = 256 with 4-byte inputs, or on a GPU with less shared
    memory per block than Hopper (200 KB: the two-stage configs take up to 168 KB in bf16)."""
    if DA < 256:
        return False
    if q.element_size() >= 4:
        return True
    return q.is_cuda and (getattr(properties(q), "shared_memory_per_block_optin", 0) or 0) < 200 * 1024


def _dtype_flags(dtype):
    return dict(
        ACC=tl.float64 if dtype == torch.float64 else tl.float32,
        # fp32 inputs honour torch's TF32 switch; fp64 (interpreter) accumulates in fp64.
        PREC="ieee" if dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32 else "tf32",
    )


def _align(K: int, V: int) -> int:
    """The largest power of 2 (at most 16) dividing K and V. Triton only knows integer arguments that are multiples
    of 16: a head dim such as 200 (16-byte rows in 16-bit dtypes) otherwise loads element by element, without
    cp.async, and at 200 every pass spilled 2.3-3.6 KB (ptxas -v, sm_90 bf16)."""
    g = math.gcd(K, V)
    return min(16, g & -g) if g else 16


def _plan_args(plan, like):
    """The plan's tables as kernel arguments (`like` stands in for cu_seqlens without packed sequences)."""
    return (plan.cu if plan.varlen else like), plan.seg_seq, plan.seg_off


def _pass(mode, q, k, v, do, x, den, out, r0, e0, rT, eT, *, feature_map, normalize, scale, eps, plan,
          store_den=False, config=None):
    """One pass (module docstring) over every sequence and head, writing out [B, T, H, DC]. do, x (`_den_grad`),
    den: the backward's inputs (None in the forward).

    r0 / rT: [N, H, K, V] state in / final state out (None: zeros / not stored), read transposed by the dq and dk
    passes; e0 / eT: [N, H, K] extra vector in / out. config: a raw launch with these kernel settings (tests of
    every tile path) instead of the autotuned entry points."""
    H, K, V = q.shape[2], q.shape[3], v.shape[3]
    DA_, DC_ = (K, V) if mode in (_MODE_O, _MODE_DV) else (V, K)
    DA = max(16, triton.next_power_of_2(DA_))
    strides = (V, 1) if mode in (_MODE_O, _MODE_DV) else (1, V)
    flags = dict(MODE=mode, FMAP=_FMAP[feature_map], NORMALIZE=normalize, VARLEN=plan.varlen, ALIGN=_align(K, V),
                 **_dtype_flags(q.dtype))
    extra = normalize and mode != _MODE_DV
    lean = _lean(q, DA)
    wgmma = _has_wgmma(q)
    seg = sege = None
    do, x, den = (t if t is not None else q for t in (do, x, den))  # unread by passes that do not need them

    def grid(meta):
        return (triton.cdiv(DC_, meta["BC"]) * H * plan.G,)

    if plan.split:
        sdt = state_dtype(q.dtype)
        seg = torch.empty((plan.G, H, DA_, DC_), device=q.device, dtype=sdt)
        sege = torch.empty((plan.G, H, K), device=q.device, dtype=sdt) if extra else seg
        tuned = _segment_sum["lean" if lean else max(DA, 64)]
        kernel, kwargs = (tuned, {}) if config is None else (_segment_sum_kernel, dict(config))
        kernel[grid](q, k, v, do, x, den, seg, sege, *_plan_args(plan, q), plan.T, H, K, V, plan.nseg,
                     plan.L, *_hi_lo(scale), DA=DA, BT=BT, **flags, **kwargs)
        BS = 32 if DA >= 256 else 64
        _segment_scan_kernel[(triton.cdiv(DC_, BS) * H * plan.N,)](
            seg, sege, *(t if t is not None else seg for t in (r0, e0, rT, eT)), plan.seg_off, H, K, V, plan.nseg,
            *strides, MODE=mode, NORMALIZE=normalize, HAS_R0=r0 is not None, HAS_E0=e0 is not None,
            STORE_R=rT is not None, STORE_E=eT is not None, VARLEN=plan.varlen, ACC=flags["ACC"], DA=DA, BC=BS,
            num_warps=4)
        r0 = e0 = rT = eT = None  # the scan consumed the initial state and wrote the final one
    if config is None:
        kernel, kwargs = _chunk["lean" if lean else max(DA, 64)], {}
    else:
        kernel, kwargs = _chunk_kernel, dict(config)
    dummy = seg if seg is not None else q
    kernel[grid](q, k, v, do, x, den, out, *(t if t is not None else dummy for t in (r0, e0, rT, eT, seg, sege)),
                 *_plan_args(plan, q), plan.T, H, K, V, plan.nseg, plan.L, *_hi_lo(scale),
                 *_hi_lo(eps), *strides, WGMMA=wgmma, HAS_R0=r0 is not None, HAS_E0=e0 is not None,
                 STORE_R=rT is not None, STORE_E=eT is not None, STORE_DEN=store_den, SPLIT=plan.split, DA=DA,
                 BT=BT, **flags, **kwargs)


def _den_grad(do, o, scale, out):
    """out [B, T, H] = x = -(do . o) / scale (`_den_grad_kernel`)."""
    rows, V = out.numel(), do.shape[-1]
    BR = 16
    _den_grad_kernel[(triton.cdiv(rows, BR),)](do, o, out, rows, V, *_hi_lo(scale), ACC=_dtype_flags(do.dtype)["ACC"],
                                              BR=BR, BV=triton.next_power_of_2(V), num_warps=4)


def _contiguous(*tensors):
    return [t.contiguous() if t is not None else None for t in tensors]


def _num_sequences(q, cu_seqlens):
    return q.shape[0] if cu_seqlens is None else cu_seqlens.shape[0] - 1


def _decode(q, k, v, initial_state, initial_key_sum, feature_map, normalize, scale, eps, output_final_state):
    B, _, H, K = q.shape
    V = v.shape[-1]
    sdt = state_dtype(q.dtype)
    o = torch.empty_like(v, dtype=q.dtype)
    final_state = torch.empty((B, H, K, V), device=q.device, dtype=sdt) if output_final_state else None
    final_key_sum = torch.empty((B, H, K), device=q.device, dtype=sdt) if output_final_state and normalize else None
    DA = triton.next_power_of_2(K)
    BC = min(triton.next_power_of_2(V), max(16, 4096 // DA))  # a [DA, BC] tile of at most 4096 elements
    dummy = o
    _decode_kernel[(triton.cdiv(V, BC) * B * H,)](
        q, k, v, o, *(t if t is not None else dummy for t in (initial_state, initial_key_sum, final_state,
                                                              final_key_sum)),
        H, K, V, *_hi_lo(scale), *_hi_lo(eps), FMAP=_FMAP[feature_map], NORMALIZE=normalize,
        HAS_S0=initial_state is not None, HAS_Z0=initial_key_sum is not None, STORE_S=output_final_state,
        ACC=_dtype_flags(q.dtype)["ACC"], DA=DA, BC=BC, num_warps=4)
    return o, final_state, final_key_sum


def forward(q, k, v, initial_state, initial_key_sum, feature_map, normalize, scale, eps, output_final_state,
            cu_seqlens, *, segment=None, config=None):
    """o [B, T, H, V] (q's dtype), final state [N, H, K, V] and key sum [N, H, K] (state dtype) or None.
    segment / config: force the segment length (chunks) / a raw kernel config (tests of every path)."""
    q, k, v, initial_state, initial_key_sum = _contiguous(q, k, v, initial_state, initial_key_sum)
    if q.shape[1] == 1 and cu_seqlens is None and segment is None and config is None:
        return _decode(q, k, v, initial_state, initial_key_sum, feature_map, normalize, scale, eps,
                       output_final_state)
    N, H, K, V = _num_sequences(q, cu_seqlens), q.shape[2], q.shape[3], v.shape[3]
    sdt = state_dtype(q.dtype)
    o = torch.empty_like(v, dtype=q.dtype)
    final_state = torch.empty((N, H, K, V), device=q.device, dtype=sdt) if output_final_state else None
    final_key_sum = torch.empty((N, H, K), device=q.device, dtype=sdt) if output_final_state and normalize else None
    plan = SegmentPlan(q, cu_seqlens, N, H, V, segment)
    _pass(_MODE_O, q, k, v, None, None, None, o, initial_state, initial_key_sum, final_state, final_key_sum,
          feature_map=feature_map, normalize=normalize, scale=scale, eps=eps, plan=plan, config=config)
    return o, final_state, final_key_sum


def backward(grad_o, grad_final_state, grad_final_key_sum, q, k, v, initial_state, initial_key_sum, feature_map,
             normalize, scale, eps, cu_seqlens, needs, *, segment=None, config=None):
    """(dq, dk, dv, d initial_state, d initial_key_sum), None where needs[i] is False."""
    q, k, v, initial_state, initial_key_sum = _contiguous(q, k, v, initial_state, initial_key_sum)
    do, G, g_z = _contiguous(grad_o.to(q.dtype), grad_final_state, grad_final_key_sum)
    need_q, need_k, need_v, need_state, need_key_sum = needs
    need_key_sum = need_key_sum and normalize
    N, H, K, V = _num_sequences(q, cu_seqlens), q.shape[2], q.shape[3], v.shape[3]
    sdt = state_dtype(q.dtype)
    options = dict(feature_map=feature_map, normalize=normalize, scale=scale, eps=eps, config=config)
    x = den = None
    if normalize and (need_q or need_k or need_v or need_state or need_key_sum):
        # o and den of the forward (recomputed): d num = scale * do / den, d den = -(do . o) / den = w * x.
        o = torch.empty_like(v, dtype=q.dtype)
        den = torch.empty(q.shape[:3], device=q.device, dtype=sdt)
        _pass(_MODE_O, q, k, v, None, None, den, o, initial_state, initial_key_sum, None, None, store_den=True,
              plan=SegmentPlan(q, cu_seqlens, N, H, V, segment), **options)
        x = torch.empty_like(den)
        _den_grad(do, o, scale, x)
    dq = dk = dv = d_state = d_key_sum = None
    if need_q:
        dq = torch.empty_like(q)
        _pass(_MODE_DQ, q, k, v, do, x, den, dq, initial_state, initial_key_sum, None, None,
              plan=SegmentPlan(q, cu_seqlens, N, H, K, segment), **options)
    if need_k or need_key_sum:
        dk = torch.empty_like(k)
        d_key_sum = torch.empty((N, H, K), device=q.device, dtype=sdt) if need_key_sum else None
        _pass(_MODE_DK, q, k, v, do, x, den, dk, G, g_z if normalize else None, None, d_key_sum,
              plan=SegmentPlan(q, cu_seqlens, N, H, K, segment), **options)
    if need_v or need_state:
        dv = torch.empty_like(v)
        d_state = torch.empty((N, H, K, V), device=q.device, dtype=sdt) if need_state else None
        _pass(_MODE_DV, q, k, v, do, x, den, dv, G, None, d_state, None,
              plan=SegmentPlan(q, cu_seqlens, N, H, V, segment), **options)
    return (dq if need_q else None, dk if need_k else None, dv if need_v else None, d_state, d_key_sum)
