// causal linear attention launchers (DESIGN.md §2): check the params, then run the scan passes of
// linear_attention_kernels.cuh (compiled one dtype per translation unit, linear_attention_{f32,f16,bf16}.cu).
//
// Forward: one pass (A = phi(q), B = phi(k), C = v). Backward: with normalize, a forward pass that writes den_t
// and grad_o_t . o_t per token into the workspace; then one pass per gradient asked for (dq; dk and d z_0;
// dv and d S_0), each independent of the others.

#include <climits>
#include <cstdint>

#include "linear_attention_kernels.cuh"

namespace hadamard_kernels {
namespace {

using linear_attention_detail::kBlock;
using linear_attention_detail::Operand;
using linear_attention_detail::ScanParams;

int64_t blocks_of(int64_t n) { return (n + kBlock - 1) / kBlock; }

// Host-side checks of what the kernels rely on; Python has already checked shapes, dtypes and cu_seqlens.
bool valid(const LinearAttentionParams& p) {
  if (p.B < 1 || p.T < 1 || p.H < 1 || p.K < 1 || p.V < 1 || p.N < 1) return false;
  if (p.K > kLinearAttentionMaxDim || p.V > kLinearAttentionMaxDim) return false;
  if (p.cu_seqlens != nullptr ? p.B != 1 : p.N != p.B) return false;
  if (p.q == nullptr || p.k == nullptr || p.v == nullptr) return false;
  if (p.feature_map < 0 || p.feature_map >= kNumFeatureMaps) return false;
  return p.N * p.H <= INT_MAX;  // one block per (sequence, head) in grid.x
}

ScanParams common_params(const LinearAttentionParams& p) {
  ScanParams s;
  s.cu_seqlens = p.cu_seqlens;
  s.rows = p.B * p.T;
  s.T = p.T;
  s.H = p.H;
  s.N = p.N;
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

}  // namespace

int64_t linear_attention_bwd_workspace_bytes(const LinearAttentionParams& p) {
  if (!valid(p) || !p.normalize) return 0;
  // den [B*T, H], then the partial sums of grad_o . o [V blocks, B*T, H]: floats.
  return (1 + blocks_of(p.V)) * p.B * p.T * p.H * static_cast<int64_t>(sizeof(float));
}

cudaError_t launch_linear_attention_fwd(const LinearAttentionParams& p, cudaStream_t stream) {
  if (!valid(p) || p.o == nullptr) return cudaErrorInvalidValue;
  ScanParams s = forward_params(p);
  s.out = p.o;
  s.out_row_stride = p.o_row_stride;
  s.out_head_stride = p.o_head_stride;
  s.state_out = p.final_state;
  s.vec_out = p.normalize ? p.final_key_sum : nullptr;
  return dispatch<linear_attention_detail::kForward>(s, p.dtype, stream);
}

cudaError_t launch_linear_attention_bwd(const LinearAttentionParams& p, cudaStream_t stream) {
  if (!valid(p) || p.grad_o == nullptr) return cudaErrorInvalidValue;
  if (p.normalize && (p.workspace == nullptr || !is_aligned(p.workspace, 16))) return cudaErrorInvalidValue;
  namespace d = linear_attention_detail;
  float* den = p.normalize ? static_cast<float*>(p.workspace) : nullptr;
  float* delta = p.normalize ? den + p.B * p.T * p.H : nullptr;

  if (p.normalize) {  // den_t and the partial sums of grad_o_t . o_t
    ScanParams s = forward_params(p);
    s.stats = true;
    s.grad_o = grad_o_of(p);
    s.den = den;
    s.delta = delta;
    HK_RETURN_IF_ERROR(dispatch<d::kForward>(s, p.dtype, stream));
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
    HK_RETURN_IF_ERROR(dispatch<d::kGradQ>(s, p.dtype, stream));
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
    HK_RETURN_IF_ERROR(dispatch<d::kGradK>(s, p.dtype, stream));
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
    HK_RETURN_IF_ERROR(dispatch<d::kGradV>(s, p.dtype, stream));
  }
  return cudaSuccess;
}

}  // namespace hadamard_kernels
