// causal linear attention launchers (DESIGN.md §2): check the params, then run the scan passes of
// linear_attention_kernels.cuh (compiled one dtype per translation unit, linear_attention_{f32,f16,bf16}.cu).
//
// Forward: one pass (A = phi(q), B = phi(k), C = v), or with one token per sequence (T = 1 without cu_seqlens:
// decoding) the decode kernel. Backward: with normalize, a forward pass that writes den_t
// and grad_o_t . o_t per token into the workspace; then one pass per gradient asked for (dq; dk and d z_0;
// dv and d S_0), each independent of the others.
//
// Split sequences (segment_chunks > 0: few sequences x heads for the SMs, long T). A pass then runs as three
// launches: the segment sums (each segment's sum of B^T C from zero, and of its normalize vector), the segment
// scan (in place: sums -> each segment's start state, seeded with the pass's initial state, in the pass's
// direction; the total gives its final state), and the pass itself on every segment at once from its start state.
// The sums sit in the workspace, reused by the passes one after the other.

#include <climits>
#include <cstdint>

#include "linear_attention_kernels.cuh"

namespace hadamard_kernels {
namespace {

using linear_attention_detail::kBlock;
using linear_attention_detail::kChunk;
using linear_attention_detail::Operand;
using linear_attention_detail::ScanParams;

int64_t blocks_of(int64_t n) { return (n + kBlock - 1) / kBlock; }

// The split's segment count: N * segments per sequence, or with cu_seqlens at most one per segment_chunks
// chunks of all T tokens plus one per sequence (what SegmentPlan sizes its grid by).
int64_t segments_needed(const LinearAttentionParams& p) {
  const int64_t chunks = (p.T + kChunk - 1) / kChunk;
  if (p.cu_seqlens == nullptr) return p.N * ((chunks + p.segment_chunks - 1) / p.segment_chunks);
  return p.T / (kChunk * p.segment_chunks) + p.N + 1;
}

// Host-side checks of what the kernels rely on; Python has already checked shapes, dtypes and cu_seqlens.
bool valid(const LinearAttentionParams& p) {
  if (p.B < 1 || p.T < 1 || p.H < 1 || p.K < 1 || p.V < 1 || p.N < 1) return false;
  if (p.K > kLinearAttentionMaxDim || p.V > kLinearAttentionMaxDim) return false;
  if (p.cu_seqlens != nullptr ? p.B != 1 : p.N != p.B) return false;
  if (p.q == nullptr || p.k == nullptr || p.v == nullptr) return false;
  if (p.feature_map < 0 || p.feature_map >= kNumFeatureMaps) return false;
  if ((p.T + kChunk - 1) / kChunk > INT_MAX || p.segment_chunks < 0) return false;  // chunk indices are int
  if (p.segment_chunks > 0) {
    // Without cu_seqlens the grid is exactly segments per sequence x N; with them an upper bound.
    if (p.cu_seqlens == nullptr ? p.segments != segments_needed(p) : p.segments < segments_needed(p)) return false;
    if (p.cu_seqlens != nullptr && (p.segment_offsets == nullptr || p.segment_sequence == nullptr)) return false;
  }
  const int64_t segments = p.segment_chunks > 0 ? p.segments : p.N;
  return segments * p.H <= INT_MAX;  // one block per (segment, head) in grid.x
}

bool split(const LinearAttentionParams& p) { return p.segment_chunks > 0; }

// Floats of the segment sums: [segments, H, K * V] states and [segments, H, K] vectors (the normalize vector of
// every pass that has one is K long).
int64_t segment_floats(const LinearAttentionParams& p) {
  return split(p) ? p.segments * p.H * (p.K * p.V + p.K) : 0;
}

ScanParams common_params(const LinearAttentionParams& p) {
  ScanParams s;
  s.cu_seqlens = p.cu_seqlens;
  s.segments = split(p) ? p.segments : p.N;
  s.seg_chunks = p.segment_chunks;
  s.seg_per_sequence = split(p) && p.cu_seqlens == nullptr ? p.segments / p.N : 1;
  s.seg_offsets = p.segment_offsets;
  s.seg_sequence = p.segment_sequence;
  s.rows = p.B * p.T;
  s.T = p.T;
  s.H = p.H;
  s.feature_map = p.feature_map;
  s.normalize = p.normalize;
  s.scale = p.scale;
  s.eps = p.eps;
  return s;
}

Operand q_of(const LinearAttentionParams& p) { return {p.q, p.q_row_stride, p.q_head_stride}; }
Operand k_of(const LinearAttentionParams& p) { return {p.k, p.k_row_stride, p.k_head_stride}; }
Operand v_of(const LinearAttentionParams& p) { return {p.v, p.v_row_stride, p.v_head_stride}; }
Operand grad_o_of(const LinearAttentionParams& p) { return {p.grad_o, p.o_row_stride, p.o_head_stride}; }

// The forward pass: out = o (or null with stats); states S [K, V] and z [K].
ScanParams forward_params(const LinearAttentionParams& p) {
  ScanParams s = common_params(p);
  s.a = q_of(p);
  s.b = k_of(p);
  s.c = v_of(p);
  s.da = p.K;
  s.dv = p.V;
  s.state_in = p.initial_state;
  s.state_da_stride = p.V;
  s.state_dv_stride = 1;
  s.vec_in = p.normalize ? p.initial_key_sum : nullptr;
  return s;
}

template <int ROLE>
cudaError_t dispatch(const ScanParams& s, DType dtype, cudaStream_t stream) {
  return HK_DTYPE_SWITCH(dtype, T, [&] { return linear_attention_detail::launch_scan<T, ROLE>(s, stream); });
}

// ---- the segment scan of a split pass

struct SegmentScanParams {
  float* sums = nullptr;      // [segments, H, da * dv], in place: each segment's sum -> its start state
  float* vec_sums = nullptr;  // [segments, H, dvec], the same for the normalize vector, or null
  int64_t da = 0, dv = 0, dvec = 0, H = 0;
  int64_t per_sequence = 0;              // segments per sequence, or with cu_seqlens:
  const int32_t* offsets = nullptr;      // [N + 1], the first segment of each sequence
  const float* state_in = nullptr;       // the pass's initial state [N, H] x (da, dv) at the strides, or null
  float* state_out = nullptr;            // its final state, or null
  int64_t state_da_stride = 0, state_dv_stride = 0;
  const float* vec_in = nullptr;         // [N, H, dvec] or null
  float* vec_out = nullptr;
  bool reverse = false;
};

constexpr int kScanThreads = 256;

// One thread per element of a (sequence, head)'s state and vector, sequential over the sequence's segments in the
// pass's direction, in fp32.
__global__ void __launch_bounds__(kScanThreads) segment_scan_kernel(const SegmentScanParams p) {
  const int64_t nh = blockIdx.x, n = nh / p.H, h = nh % p.H;
  const int64_t e = static_cast<int64_t>(blockIdx.y) * kScanThreads + threadIdx.x;
  const int64_t state_elems = p.da * p.dv;
  const bool in_state = e < state_elems;
  if (!in_state && (p.vec_sums == nullptr || e >= state_elems + p.dvec)) return;
  const int64_t g0 = p.offsets != nullptr ? p.offsets[n] : n * p.per_sequence;
  const int64_t g1 = p.offsets != nullptr ? p.offsets[n + 1] : g0 + p.per_sequence;
  float* const sums = in_state ? p.sums + h * state_elems + e : p.vec_sums + h * p.dvec + (e - state_elems);
  const int64_t segment_stride = p.H * (in_state ? state_elems : p.dvec);
  const int64_t user = in_state ? nh * state_elems + (e / p.dv) * p.state_da_stride + (e % p.dv) * p.state_dv_stride
                                : nh * p.dvec + (e - state_elems);
  const float* in = in_state ? p.state_in : p.vec_in;
  float* out = in_state ? p.state_out : p.vec_out;
  float acc = in != nullptr ? in[user] : 0.f;
  for (int64_t i = 0; i < g1 - g0; ++i) {
    float* const x = sums + (p.reverse ? g1 - 1 - i : g0 + i) * segment_stride;
    const float sum = *x;
    *x = acc;
    acc += sum;
  }
  if (out != nullptr) out[user] = acc;
}

cudaError_t launch_segment_scan(const SegmentScanParams& p, int64_t sequences, cudaStream_t stream) {
  const int64_t elems = p.da * p.dv + (p.vec_sums != nullptr ? p.dvec : 0);
  const dim3 grid(static_cast<unsigned>(sequences * p.H),
                  static_cast<unsigned>((elems + kScanThreads - 1) / kScanThreads));
#if defined(HK_CPU_EMULATION)
  (void)stream;
  return hk_emulation::launch(segment_scan_kernel, grid, kScanThreads, 0, p);
#else
  segment_scan_kernel<<<grid, kScanThreads, 0, stream>>>(p);
  return cudaGetLastError();
#endif
}

// s reading its start states from / writing its end states to the segment buffers (row-major [segments, H, da, dv]
// and [segments, H, dvec]), null: none.
ScanParams with_states(ScanParams s, const float* in, const float* vec_in, float* out, float* vec_out) {
  s.state_in = in;
  s.vec_in = vec_in;
  s.state_out = out;
  s.vec_out = vec_out;
  s.state_da_stride = s.dv;
  s.state_dv_stride = 1;
  return s;
}

// Run pass ROLE with its inputs and outputs in `s`: directly, or split (see the top of this file) with the segment
// sums in `sums`.
template <int ROLE>
cudaError_t run_pass(const LinearAttentionParams& p, const ScanParams& s, float* sums, cudaStream_t stream) {
  namespace d = linear_attention_detail;
  if (!split(p)) return dispatch<ROLE>(s, p.dtype, stream);
  const bool has_vec = s.normalize && ROLE != d::kGradV;
  float* const vec_sums = has_vec ? sums + p.segments * p.H * p.K * p.V : nullptr;

  ScanParams sum = with_states(s, nullptr, nullptr, sums, vec_sums);  // from zero, into the segment buffers
  sum.sums = true;
  sum.stats = false;
  sum.out = nullptr;
  HK_RETURN_IF_ERROR(dispatch<ROLE>(sum, p.dtype, stream));

  SegmentScanParams scan;
  scan.sums = sums;
  scan.vec_sums = vec_sums;
  scan.da = s.da;
  scan.dv = s.dv;
  scan.dvec = ROLE == d::kForward ? s.da : s.dv;  // the key sum runs over A's columns, dq / dk's row over C's
  scan.H = p.H;
  scan.per_sequence = s.seg_per_sequence;
  scan.offsets = p.cu_seqlens != nullptr ? p.segment_offsets : nullptr;
  scan.state_in = s.state_in;
  scan.state_out = s.state_out;
  scan.state_da_stride = s.state_da_stride;
  scan.state_dv_stride = s.state_dv_stride;
  scan.vec_in = has_vec ? s.vec_in : nullptr;
  scan.vec_out = has_vec ? s.vec_out : nullptr;
  scan.reverse = ROLE == d::kGradK || ROLE == d::kGradV;
  HK_RETURN_IF_ERROR(launch_segment_scan(scan, p.N, stream));

  return dispatch<ROLE>(with_states(s, sums, vec_sums, nullptr, nullptr), p.dtype, stream);
}

// Floats of the backward's per-token statistics with normalize: den [B*T, H], then the partial sums of
// grad_o . o [V blocks, B*T, H].
int64_t stats_floats(const LinearAttentionParams& p) {
  return p.normalize ? (1 + blocks_of(p.V)) * p.B * p.T * p.H : 0;
}

}  // namespace

int64_t linear_attention_fwd_workspace_bytes(const LinearAttentionParams& p) {
  return valid(p) ? segment_floats(p) * static_cast<int64_t>(sizeof(float)) : 0;
}

int64_t linear_attention_bwd_workspace_bytes(const LinearAttentionParams& p) {
  return valid(p) ? (stats_floats(p) + segment_floats(p)) * static_cast<int64_t>(sizeof(float)) : 0;
}

cudaError_t launch_linear_attention_fwd(const LinearAttentionParams& p, cudaStream_t stream) {
  if (!valid(p) || p.o == nullptr) return cudaErrorInvalidValue;
  if (p.T == 1 && p.cu_seqlens == nullptr) {  // one token per sequence: decoding
    return HK_DTYPE_SWITCH(p.dtype, T, [&] { return linear_attention_detail::launch_decode<T>(p, stream); });
  }
  if (split(p) && (p.workspace == nullptr || !is_aligned(p.workspace, 16))) return cudaErrorInvalidValue;
  ScanParams s = forward_params(p);
  s.out = p.o;
  s.out_row_stride = p.o_row_stride;
  s.out_head_stride = p.o_head_stride;
  s.state_out = p.final_state;
  s.vec_out = p.normalize ? p.final_key_sum : nullptr;
  return run_pass<linear_attention_detail::kForward>(p, s, static_cast<float*>(p.workspace), stream);
}

cudaError_t launch_linear_attention_bwd(const LinearAttentionParams& p, cudaStream_t stream) {
  if (!valid(p) || p.grad_o == nullptr) return cudaErrorInvalidValue;
  if ((p.normalize || split(p)) && (p.workspace == nullptr || !is_aligned(p.workspace, 16))) {
    return cudaErrorInvalidValue;
  }
  namespace d = linear_attention_detail;
  float* den = p.normalize ? static_cast<float*>(p.workspace) : nullptr;
  float* delta = p.normalize ? den + p.B * p.T * p.H : nullptr;
  float* sums = static_cast<float*>(p.workspace) + stats_floats(p);

  if (p.normalize) {  // den_t and the partial sums of grad_o_t . o_t
    ScanParams s = forward_params(p);
    s.stats = true;
    s.grad_o = grad_o_of(p);
    s.den = den;
    s.delta = delta;
    HK_RETURN_IF_ERROR(run_pass<d::kForward>(p, s, sums, stream));
  }
  // Every gradient pass reads the per-token statistics.
  ScanParams g = common_params(p);
  g.den = den;
  g.delta = delta;
  g.delta_blocks = blocks_of(p.V);

  if (p.dq != nullptr) {  // scan_fwd(A = G, B = v, C = phi(k)) from S_0^T and z_0, times phi'(q)
    ScanParams s = g;
    s.a = grad_o_of(p);
    s.b = v_of(p);
    s.c = k_of(p);
    s.dphi = q_of(p);
    s.da = p.V;
    s.dv = p.K;
    s.out = p.dq;
    s.out_row_stride = p.dq_row_stride;
    s.out_head_stride = p.dq_head_stride;
    s.state_in = p.initial_state;
    s.state_da_stride = 1;
    s.state_dv_stride = p.V;
    s.vec_in = p.normalize ? p.initial_key_sum : nullptr;
    HK_RETURN_IF_ERROR(run_pass<d::kGradQ>(p, s, sums, stream));
  }
  const bool key_sum_grad = p.normalize && p.grad_initial_key_sum != nullptr;
  if (p.dk != nullptr || key_sum_grad) {  // scan_rev(A = v, B = G, C = phi(q)) from dS_T^T and dz_T, times phi'(k)
    ScanParams s = g;
    s.a = v_of(p);
    s.b = grad_o_of(p);
    s.c = q_of(p);
    s.dphi = k_of(p);
    s.da = p.V;
    s.dv = p.K;
    s.out = p.dk;
    s.out_row_stride = p.dk_row_stride;
    s.out_head_stride = p.dk_head_stride;
    s.state_in = p.grad_final_state;
    s.state_da_stride = 1;
    s.state_dv_stride = p.V;
    s.vec_in = p.normalize ? p.grad_final_key_sum : nullptr;
    s.vec_out = key_sum_grad ? p.grad_initial_key_sum : nullptr;
    HK_RETURN_IF_ERROR(run_pass<d::kGradK>(p, s, sums, stream));
  }
  if (p.dv != nullptr || p.grad_initial_state != nullptr) {  // scan_rev(A = phi(k), B = phi(q), C = G) from dS_T
    ScanParams s = g;
    s.a = k_of(p);
    s.b = q_of(p);
    s.c = grad_o_of(p);
    s.da = p.K;
    s.dv = p.V;
    s.out = p.dv;
    s.out_row_stride = p.dv_row_stride;
    s.out_head_stride = p.dv_head_stride;
    s.state_in = p.grad_final_state;
    s.state_out = p.grad_initial_state;
    s.state_da_stride = p.V;
    s.state_dv_stride = 1;
    HK_RETURN_IF_ERROR(run_pass<d::kGradV>(p, s, sums, stream));
  }
  return cudaSuccess;
}

}  // namespace hadamard_kernels
