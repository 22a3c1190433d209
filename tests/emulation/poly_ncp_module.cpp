// The poly_ncp kernels and launchers (csrc/poly_ncp.cu, unchanged) built for the CPU under cuda_emulation.h and
// wmma_emulation.h, as a pybind11 module with the poly_ncp part of hadamard_kernels._C's interface, so
// hadamard_kernels/ops/poly_ncp/cuda.py drives them on CPU tensors (tests/test_poly_ncp_cuda.py builds it with the
// host compiler).

#include "cuda_emulation.h"
#include "wmma_emulation.h"

#include "poly_ncp.cu"
#include "emulated_module.h"

namespace py = pybind11;
namespace hk = hadamard_kernels;
using hk_module::launcher;
using hk_module::pointer;
using P = hk::PolyNcpParams;

PYBIND11_MODULE(hk_poly_ncp_emulated, m) {
  m.attr("DTYPES") = py::make_tuple("float32", "float16", "bfloat16");
  m.attr("POLY_NCP_MAX_K") = hk::kPolyNcpMaxK;
  py::class_<P> cls = hk_module::params_class<P>(m, "PolyNcpParams");
  pointer(cls, "x", &P::x);
  pointer(cls, "a_weight", &P::a_weight);
  pointer(cls, "a_bias", &P::a_bias);
  pointer(cls, "s_weight", &P::s_weight);
  pointer(cls, "s_bias", &P::s_bias);
  pointer(cls, "y", &P::y);
  pointer(cls, "grad_y", &P::grad_y);
  pointer(cls, "grad_a", &P::grad_a);
  pointer(cls, "grad_s", &P::grad_s);
  pointer(cls, "ys", &P::ys);
  pointer(cls, "workspace", &P::workspace);
  cls.def_readwrite("M", &P::M).def_readwrite("d", &P::d).def_readwrite("k", &P::k).def_readwrite("N", &P::N);
  cls.def_readwrite("x_row_stride", &P::x_row_stride).def_readwrite("y_row_stride", &P::y_row_stride);
  cls.def_readwrite("per_degree", &P::per_degree);
  launcher(m, "poly_ncp_fwd", &hk::launch_poly_ncp_fwd);
  launcher(m, "poly_ncp_bwd", &hk::launch_poly_ncp_bwd);
}
