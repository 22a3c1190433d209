// pybind11 module hadamard_kernels._C: turns Python ints (tensor.data_ptr(), the stream handle) into each
// family's params struct and a non-zero CUDA error into RuntimeError. No logic, no argument checks (those
// live in Python), and no CUDA call at import, so a machine without a GPU imports it.
// Add a family: one bind_<family>() block below and one line in PYBIND11_MODULE.

#include <pybind11/pybind11.h>

#include <cuda_runtime_api.h>

#include <cstdint>
#include <stdexcept>
#include <string>

#include "hadamard_kernels/activation.h"
#include "hadamard_kernels/common.h"
#include "hadamard_kernels/poly_chain.h"
#include "hadamard_kernels/poly_ncp.h"

namespace py = pybind11;
namespace hk = hadamard_kernels;

namespace {

using Address = std::uintptr_t;  // a device pointer as Python sees it (data_ptr(), 0 for None)

void check_cuda(cudaError_t err, const char* what) {
  if (err != cudaSuccess) {
    throw std::runtime_error(std::string(what) + " failed: " + cudaGetErrorString(err) + " (" +
                             cudaGetErrorName(err) + ")");
  }
}

void* to_ptr(Address address) { return reinterpret_cast<void*>(address); }

cudaStream_t to_stream(Address handle) { return reinterpret_cast<cudaStream_t>(handle); }

template <int N>
py::tuple names(const char* const (&list)[N]) {
  py::tuple out(N);
  for (int i = 0; i < N; ++i) out[i] = py::str(list[i]);
  return out;
}

void check_activation_code(int code) {
  if (code < 0 || code >= hk::kNumActivations) {
    throw py::value_error("activation code must be in [0, " + std::to_string(hk::kNumActivations) + "), got " +
                          std::to_string(code));
  }
}

// ---- shared: dtype codes, activation codes and host wrappers of the device math (for CPU tests)
void bind_common(py::module_& m) {
  m.attr("DTYPES") = names(hk::kDTypeNames);
  m.attr("ACTIVATIONS") = names(hk::kActivationNames);
  m.def(
      "activation_host",
      [](int code, float z) {
        check_activation_code(code);
        return hk::activation(code, z);
      },
      py::arg("code"), py::arg("z"), "act(z) in float32, the same function the kernels run (host build)");
  m.def(
      "activation_grad_host",
      [](int code, float z) {
        check_activation_code(code);
        return hk::activation_grad(code, z);
      },
      py::arg("code"), py::arg("z"), "d act / dz in float32 (host build)");
}

// ---- poly_chain (csrc/poly_chain.cu)
void bind_poly_chain(py::module_& m) {
  m.attr("POLY_CHAIN_MODES") = names(hk::kPolyChainModeNames);
  py::class_<hk::PolyChainParams>(m, "PolyChainParams")
      .def(py::init([](Address x, Address weight, Address bias, Address y, Address grad_y, Address grad_z,
                       Address workspace, int64_t M, int64_t d, int64_t k, int64_t N, int64_t x_row_stride,
                       int64_t y_row_stride, int dtype, int activation, int mode, float scale) {
             hk::PolyChainParams p;
             p.x = to_ptr(x);
             p.weight = to_ptr(weight);
             p.bias = to_ptr(bias);
             p.y = to_ptr(y);
             p.grad_y = to_ptr(grad_y);
             p.grad_z = to_ptr(grad_z);
             p.workspace = to_ptr(workspace);
             p.M = M;
             p.d = d;
             p.k = k;
             p.N = N;
             p.x_row_stride = x_row_stride;
             p.y_row_stride = y_row_stride;
             p.dtype = static_cast<hk::DType>(dtype);  // an unknown code makes the launcher fail cleanly
             p.activation = activation;
             p.mode = mode;
             p.scale = scale;
             return p;
           }),
           py::kw_only(), py::arg("x"), py::arg("weight"), py::arg("bias") = 0, py::arg("y") = 0,
           py::arg("grad_y") = 0, py::arg("grad_z") = 0, py::arg("workspace") = 0, py::arg("M"), py::arg("d"),
           py::arg("k"), py::arg("N"), py::arg("x_row_stride"), py::arg("y_row_stride"), py::arg("dtype"),
           py::arg("activation"), py::arg("mode"), py::arg("scale"))
      .def_property(
          "workspace", [](const hk::PolyChainParams& p) { return reinterpret_cast<Address>(p.workspace); },
          [](hk::PolyChainParams& p, Address workspace) { p.workspace = to_ptr(workspace); });
  m.def(
      "poly_chain_fwd",
      [](const hk::PolyChainParams& p, Address stream) {
        check_cuda(hk::launch_poly_chain_fwd(p, to_stream(stream)), "poly_chain_fwd");
      },
      py::arg("params"), py::arg("stream"));
  m.def(
      "poly_chain_bwd",
      [](const hk::PolyChainParams& p, Address stream) {
        check_cuda(hk::launch_poly_chain_bwd(p, to_stream(stream)), "poly_chain_bwd");
      },
      py::arg("params"), py::arg("stream"));
  m.def("poly_chain_bwd_workspace_bytes", &hk::poly_chain_bwd_workspace_bytes, py::arg("params"));
}

// ---- poly_ncp (csrc/poly_ncp.cu)
void bind_poly_ncp(py::module_& m) {
  m.attr("POLY_NCP_MAX_K") = hk::kPolyNcpMaxK;
  py::class_<hk::PolyNcpParams>(m, "PolyNcpParams")
      .def(py::init([](Address x, Address a_weight, Address a_bias, Address s_weight, Address s_bias, Address y,
                       Address grad_y, Address grad_a, Address grad_s, Address ys, int64_t M, int64_t d, int64_t k,
                       int64_t N, int64_t x_row_stride, int64_t y_row_stride, int dtype) {
             hk::PolyNcpParams p;
             p.x = to_ptr(x);
             p.a_weight = to_ptr(a_weight);
             p.a_bias = to_ptr(a_bias);
             p.s_weight = to_ptr(s_weight);
             p.s_bias = to_ptr(s_bias);
             p.y = to_ptr(y);
             p.grad_y = to_ptr(grad_y);
             p.grad_a = to_ptr(grad_a);
             p.grad_s = to_ptr(grad_s);
             p.ys = to_ptr(ys);
             p.M = M;
             p.d = d;
             p.k = k;
             p.N = N;
             p.x_row_stride = x_row_stride;
             p.y_row_stride = y_row_stride;
             p.dtype = static_cast<hk::DType>(dtype);  // an unknown code makes the launcher fail cleanly
             return p;
           }),
           py::kw_only(), py::arg("x"), py::arg("a_weight"), py::arg("a_bias") = 0, py::arg("s_weight") = 0,
           py::arg("s_bias") = 0, py::arg("y") = 0, py::arg("grad_y") = 0, py::arg("grad_a") = 0,
           py::arg("grad_s") = 0, py::arg("ys") = 0, py::arg("M"), py::arg("d"), py::arg("k"), py::arg("N"),
           py::arg("x_row_stride"), py::arg("y_row_stride"), py::arg("dtype"));
  m.def(
      "poly_ncp_fwd",
      [](const hk::PolyNcpParams& p, Address stream) {
        check_cuda(hk::launch_poly_ncp_fwd(p, to_stream(stream)), "poly_ncp_fwd");
      },
      py::arg("params"), py::arg("stream"));
  m.def(
      "poly_ncp_bwd",
      [](const hk::PolyNcpParams& p, Address stream) {
        check_cuda(hk::launch_poly_ncp_bwd(p, to_stream(stream)), "poly_ncp_bwd");
      },
      py::arg("params"), py::arg("stream"));
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "hadamard_kernels CUDA kernels (raw-pointer launchers; call through hadamard_kernels.ops)";
  bind_common(m);
  bind_poly_chain(m);
  bind_poly_ncp(m);
}
