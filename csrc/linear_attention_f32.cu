// causal linear attention kernels for float32 (linear_attention_kernels.cuh), one translation unit per dtype.
#include "linear_attention_kernels.cuh"

namespace hadamard_kernels::linear_attention_detail {
HK_LINEAR_ATTENTION_INSTANCES(, float)
}  // namespace hadamard_kernels::linear_attention_detail
