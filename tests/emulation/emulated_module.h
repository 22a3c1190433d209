// The pybind11 glue every emulated kernel module repeats: the error check, a params class built from keyword
// arguments, pointer fields as integer addresses and the launcher functions, as hadamard_kernels._C exposes them.
// Include after cuda_emulation.h and the kernel sources.
#pragma once

#include "cuda_emulation.h"

#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstdint>
#include <stdexcept>
#include <string>
#include <tuple>
#include <vector>

namespace hk_module {

namespace py = pybind11;

// As the real module's, without the CUDA runtime (nothing here links it): the error code in numbers.
inline void check(cudaError_t err, const char* what) {
  if (err != cudaSuccess) {
    throw std::runtime_error(std::string(what) + " failed: CUDA error " + std::to_string(static_cast<int>(err)));
  }
}

// The params class `name`, built from keyword arguments (each set as an attribute), with its dtype as the code.
template <class P>
py::class_<P> params_class(py::module_& m, const char* name) {
  py::class_<P> cls(m, name, py::module_local());  // _C registers the same C++ type
  cls.def(py::init([](const py::kwargs& fields) {
    P params;
    py::object view = py::cast(&params, py::return_value_policy::reference);
    for (auto field : fields) py::setattr(view, field.first, field.second);
    return params;
  }));
  cls.def_property(
      "dtype", [](const P& p) { return static_cast<int>(p.dtype); },
      [](P& p, int code) { p.dtype = static_cast<hadamard_kernels::DType>(code); });
  return cls;
}

// A pointer field as its address (Python passes data_ptr()).
template <class P, class T>
void pointer(py::class_<P>& cls, const char* name, T* P::*member) {
  cls.def_property(
      name, [member](const P& p) { return reinterpret_cast<std::uintptr_t>(p.*member); },
      [member](P& p, std::uintptr_t address) { p.*member = reinterpret_cast<T*>(address); });
}

// m.name(params, stream) runs launch on the emulated device (the stream is ignored). release_gil: other Python
// threads run meanwhile.
template <class P>
void launcher(py::module_& m, const char* name, cudaError_t (*launch)(const P&, cudaStream_t),
              bool release_gil = false) {
  m.def(name, [name, launch, release_gil](const P& p, std::uintptr_t) {
    if (release_gil) {
      py::gil_scoped_release release;
      check(launch(p, nullptr), name);
    } else {
      check(launch(p, nullptr), name);
    }
  });
}

// m.take_launches(): the launches (grid x, grid y, threads per block) since the last call, in order, so a test can
// assert which kernels a launcher ran and on how many blocks.
inline void launch_log(py::module_& m) {
  m.def("take_launches", [] {
    std::vector<std::tuple<unsigned, unsigned, int>> out;
    for (const hk_emulation::Launched& l : hk_emulation::launches) out.emplace_back(l.grid.x, l.grid.y, l.threads);
    hk_emulation::launches.clear();
    return out;
  });
}

}  // namespace hk_module
