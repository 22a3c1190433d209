// The linear_attention kernels and launchers (csrc/linear_attention*.cu, unchanged) built for the CPU under
// cuda_emulation.h, as a pybind11 module with the linear_attention part of hadamard_kernels._C's interface, so
// hadamard_kernels/ops/linear_attention/cuda.py drives them on CPU tensors (tests/test_linear_attention_cuda.py
// builds it with the host compiler).

#include "cuda_emulation.h"

#include "linear_attention.cu"
#include "linear_attention_bf16.cu"
#include "linear_attention_f16.cu"
#include "linear_attention_f32.cu"
#include "emulated_module.h"

namespace py = pybind11;
namespace hk = hadamard_kernels;
using hk_module::launcher;
using hk_module::pointer;
using P = hk::LinearAttentionParams;

PYBIND11_MODULE(hk_linear_attention_emulated, m) {
  m.attr("DTYPES") = py::make_tuple("float32", "float16", "bfloat16");
  m.attr("LINEAR_ATTENTION_MAX_DIM") = hk::kLinearAttentionMaxDim;
  py::class_<P> cls = hk_module::params_class<P>(m, "LinearAttentionParams");
  pointer(cls, "q", &P::q);
  pointer(cls, "k", &P::k);
  pointer(cls, "v", &P::v);
  pointer(cls, "o", &P::o);
  pointer(cls, "grad_o", &P::grad_o);
  pointer(cls, "dq", &P::dq);
  pointer(cls, "dk", &P::dk);
  pointer(cls, "dv", &P::dv);
  pointer(cls, "initial_state", &P::initial_state);
  pointer(cls, "initial_key_sum", &P::initial_key_sum);
  pointer(cls, "final_state", &P::final_state);
  pointer(cls, "final_key_sum", &P::final_key_sum);
  pointer(cls, "grad_final_state", &P::grad_final_state);
  pointer(cls, "grad_final_key_sum", &P::grad_final_key_sum);
  pointer(cls, "grad_initial_state", &P::grad_initial_state);
  pointer(cls, "grad_initial_key_sum", &P::grad_initial_key_sum);
  pointer(cls, "cu_seqlens", &P::cu_seqlens);
  pointer(cls, "workspace", &P::workspace);
  pointer(cls, "segment_offsets", &P::segment_offsets);
  pointer(cls, "segment_sequence", &P::segment_sequence);
  cls.def_readwrite("B", &P::B).def_readwrite("T", &P::T).def_readwrite("H", &P::H).def_readwrite("K", &P::K)
      .def_readwrite("V", &P::V).def_readwrite("N", &P::N)
      .def_readwrite("segment_chunks", &P::segment_chunks).def_readwrite("segments", &P::segments)
      .def_readwrite("q_row_stride", &P::q_row_stride).def_readwrite("q_head_stride", &P::q_head_stride)
      .def_readwrite("k_row_stride", &P::k_row_stride).def_readwrite("k_head_stride", &P::k_head_stride)
      .def_readwrite("v_row_stride", &P::v_row_stride).def_readwrite("v_head_stride", &P::v_head_stride)
      .def_readwrite("o_row_stride", &P::o_row_stride).def_readwrite("o_head_stride", &P::o_head_stride)
      .def_readwrite("dq_row_stride", &P::dq_row_stride).def_readwrite("dq_head_stride", &P::dq_head_stride)
      .def_readwrite("dk_row_stride", &P::dk_row_stride).def_readwrite("dk_head_stride", &P::dk_head_stride)
      .def_readwrite("dv_row_stride", &P::dv_row_stride).def_readwrite("dv_head_stride", &P::dv_head_stride)
      .def_readwrite("feature_map", &P::feature_map).def_readwrite("normalize", &P::normalize)
      .def_readwrite("scale", &P::scale).def_readwrite("eps", &P::eps);
  launcher(m, "linear_attention_fwd", &hk::launch_linear_attention_fwd, /*release_gil=*/true);
  launcher(m, "linear_attention_bwd", &hk::launch_linear_attention_bwd, /*release_gil=*/true);
  m.def("linear_attention_fwd_workspace_bytes", &hk::linear_attention_fwd_workspace_bytes);
  m.def("linear_attention_bwd_workspace_bytes", &hk::linear_attention_bwd_workspace_bytes);
  hk_module::launch_log(m);
  // The dynamic shared memory of one block (dtype code, reduction dim), for cuda.py's copy of the formula.
  m.def("scan_shared_bytes", [](int dtype, int64_t da) {
    namespace d = hk::linear_attention_detail;
    return dtype == 0 ? d::shared_bytes<float>(da) : dtype == 1 ? d::shared_bytes<__half>(da)
                                                                : d::shared_bytes<__nv_bfloat16>(da);
  });
}
