// The poly_chain kernels and launchers (csrc/poly_chain*.cu, unchanged) built for the CPU under cuda_emulation.h, as
// a pybind11 module with the poly_chain part of hadamard_kernels._C's interface, so
// hadamard_kernels/ops/poly_chain/cuda.py drives them on CPU tensors (tests/test_poly_chain_cuda.py builds it with
// the host compiler). The per-dtype translation units are included here as one.

#include "cuda_emulation.h"

#include "poly_chain.cu"
#include "poly_chain_f32.cu"
#include "poly_chain_f16.cu"
#include "poly_chain_bf16.cu"
#include "poly_chain_wgmma_f16_ccp.cu"
#include "poly_chain_wgmma_f16_product.cu"
#include "poly_chain_wgmma_bf16_ccp.cu"
#include "poly_chain_wgmma_bf16_product.cu"
#include "emulated_module.h"

namespace py = pybind11;
namespace hk = hadamard_kernels;
using hk_module::launcher;
using hk_module::pointer;
using P = hk::PolyChainParams;

PYBIND11_MODULE(hk_poly_chain_emulated, m) {
  m.attr("DTYPES") = py::make_tuple("float32", "float16", "bfloat16");
  py::class_<P> cls = hk_module::params_class<P>(m, "PolyChainParams");
  pointer(cls, "x", &P::x);
  pointer(cls, "weight", &P::weight);
  pointer(cls, "bias", &P::bias);
  pointer(cls, "y", &P::y);
  pointer(cls, "z", &P::z);
  pointer(cls, "grad_y", &P::grad_y);
  pointer(cls, "grad_z", &P::grad_z);
  cls.def_readwrite("M", &P::M).def_readwrite("d", &P::d).def_readwrite("k", &P::k).def_readwrite("N", &P::N)
      .def_readwrite("x_row_stride", &P::x_row_stride).def_readwrite("y_row_stride", &P::y_row_stride)
      .def_readwrite("activation", &P::activation).def_readwrite("mode", &P::mode).def_readwrite("scale", &P::scale)
      .def_readwrite("wgmma", &P::wgmma);
  launcher(m, "poly_chain_fwd", &hk::launch_poly_chain_fwd);
  launcher(m, "poly_chain_bwd", &hk::launch_poly_chain_bwd);
}
