// The lrnn kernels and launchers (csrc/lrnn.cu, unchanged) built for the CPU under cuda_emulation.h, as a pybind11
// module with the lrnn part of hadamard_kernels._C's interface, so hadamard_kernels/ops/lrnn/cuda.py drives them on
// CPU tensors (tests/test_lrnn_cuda.py builds it with the host compiler).

#include "cuda_emulation.h"

#include <pybind11/pybind11.h>

#include <string>

#include "lrnn.cu"

namespace py = pybind11;
namespace hk = hadamard_kernels;
using P = hk::LrnnParams;

namespace {

// As the real module's, without the CUDA runtime (nothing here links it): the error code in numbers.
void check(cudaError_t err, const char* what) {
  if (err != cudaSuccess) {
    throw std::runtime_error(std::string(what) + " failed: CUDA error " + std::to_string(static_cast<int>(err)));
  }
}

template <class T>
void pointer(py::class_<P>& cls, const char* name, T* P::*member) {
  cls.def_property(
      name, [member](const P& p) { return reinterpret_cast<std::uintptr_t>(p.*member); },
      [member](P& p, std::uintptr_t address) { p.*member = reinterpret_cast<T*>(address); });
}

}  // namespace

PYBIND11_MODULE(hk_lrnn_emulated, m) {
  m.attr("DTYPES") = py::make_tuple("float32", "float16", "bfloat16");
  py::class_<P> cls(m, "LrnnParams", py::module_local());  // _C registers the same C++ type
  cls.def(py::init([](const py::kwargs& fields) {
    P params;
    py::object view = py::cast(&params, py::return_value_policy::reference);
    for (auto field : fields) py::setattr(view, field.first, field.second);
    return params;
  }));
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
  cls.def_property(
      "dtype", [](const P& p) { return static_cast<int>(p.dtype); },
      [](P& p, int code) { p.dtype = static_cast<hk::DType>(code); });
  m.def("lrnn_fwd", [](const P& p, std::uintptr_t) { check(hk::launch_lrnn_fwd(p, nullptr), "lrnn_fwd"); });
  m.def("lrnn_bwd", [](const P& p, std::uintptr_t) { check(hk::launch_lrnn_bwd(p, nullptr), "lrnn_bwd"); });
}
