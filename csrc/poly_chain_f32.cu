// poly_chain kernels for float32 (poly_chain_kernels.cuh), one translation unit per dtype.
#include "poly_chain_kernels.cuh"

namespace hadamard_kernels::poly_chain_detail {
template cudaError_t launch<float, false>(const PolyChainParams&, cudaStream_t);
template cudaError_t launch<float, true>(const PolyChainParams&, cudaStream_t);
}  // namespace hadamard_kernels::poly_chain_detail
