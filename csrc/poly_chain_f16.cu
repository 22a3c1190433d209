// poly_chain kernels for float16 (poly_chain_kernels.cuh), one translation unit per dtype.
#include "poly_chain_kernels.cuh"

namespace hadamard_kernels::poly_chain_detail {
template cudaError_t launch<__half, false>(const PolyChainParams&, cudaStream_t);
template cudaError_t launch<__half, true>(const PolyChainParams&, cudaStream_t);
}  // namespace hadamard_kernels::poly_chain_detail
