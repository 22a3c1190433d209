// The poly_ncp kernels and launchers (csrc/poly_ncp.cu, unchanged) built for the CPU under cuda_emulation.h and
// wmma_emulation.h, as a pybind11 module with the poly_ncp part of hadamard_kernels._C's interface, so
// hadamard_kernels/ops/poly_ncp/cuda.py drives them on CPU tensors (tests/test_poly_ncp_cuda.py builds it with the
// host compiler).

#include "cuda_emulation.h"
#include "wmma_emulation.h"

#include <pybind11/pybind11.h>

#include <string>

#include "poly_ncp.cu"

namespace py = pybind11;
namespace hk = hadamard_kernels;
using P = hk::PolyNcpParams;

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

void launcher(py::module_& m, const char* name, cudaError_t (*launch)(const P&, cudaStream_t)) {
  m.def(name, [name, launch](const P& p, std::uintptr_t) { check(launch(p, nullptr), name); });
}

}  // namespace

PYBIND11_MODULE(hk_poly_ncp_emulated, m) {
  m.attr("DTYPES") = py::make_tuple("float32", "float16", "bfloat16");
  m.attr("POLY_NCP_MAX_K") = hk::kPolyNcpMaxK;
  py::class_<P> cls(m, "PolyNcpParams", py::module_local());  // _C registers the same C++ type
  cls.def(py::init([](const py::kwargs& fields) {
    P params;
    py::object view = py::cast(&params, py::return_value_policy::reference);
    for (auto field : fields) py::setattr(view, field.first, field.second);
    return params;
  }));
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
  cls.def_property(
      "dtype", [](const P& p) { return static_cast<int>(p.dtype); },
      [](P& p, int code) { p.dtype = static_cast<hk::DType>(code); });
  launcher(m, "poly_ncp_fwd", &hk::launch_poly_ncp_fwd);
  launcher(m, "poly_ncp_bwd", &hk::launch_poly_ncp_bwd);
}
