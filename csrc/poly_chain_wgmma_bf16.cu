// poly_chain's Hopper (wgmma) forward for bfloat16 (poly_chain_forward_wgmma.cuh), a translation unit of its own.
#include "poly_chain_forward_wgmma.cuh"

namespace hadamard_kernels::poly_chain_detail::forward_wgmma {
template cudaError_t launch_any<__nv_bfloat16>(const PolyChainParams&, cudaStream_t);
}  // namespace hadamard_kernels::poly_chain_detail::forward_wgmma
