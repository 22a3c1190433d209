// The lrnn kernels and launchers (csrc/lrnn.cu, unchanged) built for the CPU under cuda_emulation.h, as a pybind11
// module with the lrnn part of hadamard_kernels._C's interface, so hadamard_kernels/ops/lrnn/cuda.py drives them on
// CPU tensors (tests/test_lrnn_cuda.py builds it with the host compiler).

#include "cuda_emulation.h"

#include "lrnn.cu"
#include "emulated_module.h"

namespace py = pybind11;
namespace hk = hadamard_kernels;
using hk_module::launcher;
using hk_module::pointer;
using P = hk::LrnnParams;

PYBIND11_MODULE(hk_lrnn_emulated, m) {
  m.attr("DTYPES") = py::make_tuple("float32", "float16", "bfloat16");
  py::class_<P> cls = hk_module::params_class<P>(m, "LrnnParams");
  pointer(cls, "x", &P::x);
  pointer(cls, "weight", &P::weight);
  pointer(cls, "bias", &P::bias);
  pointer(cls, "g_params", &P::g_params);
  pointer(cls, "phi", &P::phi);
  pointer(cls, "grad_phi", &P::grad_phi);
  pointer(cls, "grad_z", &P::grad_z);
  pointer(cls, "g_params_part", &P::g_params_part);
  cls.def_readwrite("M", &P::M).def_readwrite("d", &P::d).def_readwrite("rank", &P::rank)
      .def_readwrite("dbar", &P::dbar).def_readwrite("h", &P::h).def_readwrite("x_row_stride", &P::x_row_stride)
      .def_readwrite("phi_row_stride", &P::phi_row_stride).def_readwrite("grad_z_row_stride", &P::grad_z_row_stride)
      .def_readwrite("rows_per_split", &P::rows_per_split).def_readwrite("activation", &P::activation)
      .def_readwrite("omega", &P::omega).def_readwrite("gamma", &P::gamma);
  launcher(m, "lrnn_fwd", &hk::launch_lrnn_fwd);
  launcher(m, "lrnn_bwd", &hk::launch_lrnn_bwd);
}
