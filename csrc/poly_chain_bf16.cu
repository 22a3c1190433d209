// poly_chain kernels for bfloat16 (poly_chain_kernels.cuh), one translation unit per dtype.
#include "poly_chain_kernels.cuh"

namespace hadamard_kernels::poly_chain_detail {
template cudaError_t launch<__nv_bfloat16, false>(const PolyChainParams&, cudaStream_t);
template cudaError_t launch<__nv_bfloat16, true>(const PolyChainParams&, cudaStream_t);
}  // namespace hadamard_kernels::poly_chain_detail
