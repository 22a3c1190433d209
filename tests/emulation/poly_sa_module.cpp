// The poly_sa kernels and launchers (csrc/poly_sa.cu, unchanged) built for the CPU under cuda_emulation.h, as a
// pybind11 module with the poly_sa part of hadamard_kernels._C's interface, so hadamard_kernels/ops/poly_sa/cuda.py
// drives them on CPU tensors (tests/test_poly_sa_cuda.py builds it with the host compiler). The kernels' wmma calls
// run on wmma_emulation.h.

#include "cuda_emulation.h"
#include "wmma_emulation.h"

#include "poly_sa.cu"
#include "emulated_module.h"

namespace py = pybind11;
namespace hk = hadamard_kernels;
using hk_module::launcher;
using hk_module::pointer;
using P = hk::PolySaParams;

PYBIND11_MODULE(hk_poly_sa_emulated, m) {
  m.attr("DTYPES") = py::make_tuple("float32", "float16", "bfloat16");
  py::class_<P> cls = hk_module::params_class<P>(m, "PolySaParams");
  pointer(cls, "z", &P::z);
  pointer(cls, "w1", &P::w1);
  pointer(cls, "w2", &P::w2);
  pointer(cls, "w3", &P::w3);
  pointer(cls, "alpha", &P::alpha);
  pointer(cls, "beta", &P::beta);
  pointer(cls, "mask", &P::mask);
  pointer(cls, "m", &P::m);
  pointer(cls, "s", &P::s);
  pointer(cls, "grad_y", &P::grad_y);
  pointer(cls, "part", &P::part);
  pointer(cls, "y", &P::y);
  pointer(cls, "dz", &P::dz);
  pointer(cls, "u", &P::u);
  pointer(cls, "grad_p", &P::grad_p);
  cls.def_readwrite("B", &P::B).def_readwrite("N", &P::N).def_readwrite("C", &P::C);
  cls.def_readwrite("tokens_per_split", &P::tokens_per_split).def_readwrite("z_row_stride", &P::z_row_stride);
  cls.def_readwrite("g_row_stride", &P::g_row_stride).def_readwrite("out_row_stride", &P::out_row_stride);
  launcher(m, "poly_sa_pool_fwd", &hk::launch_poly_sa_pool_fwd);
  launcher(m, "poly_sa_out_fwd", &hk::launch_poly_sa_out_fwd);
  launcher(m, "poly_sa_out_bwd", &hk::launch_poly_sa_out_bwd);
  launcher(m, "poly_sa_pool_bwd", &hk::launch_poly_sa_pool_bwd);
}
