// causal linear attention kernels for float16 (linear_attention_kernels.cuh), one translation unit per dtype.
#include "linear_attention_kernels.cuh"

namespace hadamard_kernels::linear_attention_detail {
HK_LINEAR_ATTENTION_INSTANCES(, __half)
}  // namespace hadamard_kernels::linear_attention_detail
