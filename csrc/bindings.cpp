// pybind11 module hadamard_kernels._C: turns Python ints (tensor.data_ptr(), the stream handle) into each
// family's params struct and a non-zero CUDA error into RuntimeError. No logic, no argument checks (those
// live in Python), and no CUDA call at import, so a machine without a GPU (or with an old driver) imports it.
// Add a family: one bind_<family>() block below and one line in PYBIND11_MODULE.

#include <pybind11/pybind11.h>

#include <cuda_runtime_api.h>

#include <cstdint>
#include <stdexcept>
#include <string>
#include <type_traits>

#include "hadamard_kernels/activation.h"
#include "hadamard_kernels/common.h"
#include "hadamard_kernels/linear_attention.h"
#include "hadamard_kernels/lrnn.h"
#include "hadamard_kernels/poly_chain.h"
#include "hadamard_kernels/poly_gate.h"
#include "hadamard_kernels/poly_ncp.h"
#include "hadamard_kernels/poly_sa.h"

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

cudaStream_t to_stream(Address handle) { return reinterpret_cast<cudaStream_t>(handle); }

// A family's params struct as a Python class built with keyword arguments, one per field
// (`PolyChainParams(x=t.data_ptr(), M=..., ...)`); an unknown name raises AttributeError. Pointer fields take
// Python ints (0 for None), enum fields their integer code; fields not given keep the struct's defaults.
template <class P>
class ParamsClass {
 public:
  ParamsClass(py::module_& m, const char* name) : cls_(m, name) {
    cls_.def(py::init([](const py::kwargs& fields) {
      P params;
      py::object view = py::cast(&params, py::return_value_policy::reference);
      for (auto field : fields) py::setattr(view, field.first, field.second);
      return params;
    }));
  }
  template <class T>
  ParamsClass& pointer(const char* name, T* P::*member) {
    cls_.def_property(
        name, [member](const P& p) { return reinterpret_cast<Address>(p.*member); },
        [member](P& p, Address address) { p.*member = reinterpret_cast<T*>(address); });
    return *this;
  }
  template <class T>
  ParamsClass& value(const char* name, T P::*member) {
    if constexpr (std::is_enum_v<T>) {  // an unknown code makes the launcher fail cleanly
      cls_.def_property(
          name, [member](const P& p) { return static_cast<int>(p.*member); },
          [member](P& p, int code) { p.*member = static_cast<T>(code); });
    } else {
      cls_.def_readwrite(name, member);
    }
    return *this;
  }

 private:
  py::class_<P> cls_;
};

// m.<name>(params, stream): runs a launcher on the stream, raising RuntimeError on a CUDA error.
template <class P>
void def_launcher(py::module_& m, const char* name, cudaError_t (*launch)(const P&, cudaStream_t)) {
  m.def(
      name, [name, launch](const P& p, Address stream) { check_cuda(launch(p, to_stream(stream)), name); },
      py::arg("params"), py::arg("stream"));
}

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

// (driver version, runtime version, device count, error or None) as the CUDA runtime linked into this module sees
// them; versions are 1000 * major + 10 * minor, driver 0 = no driver. Never raises: on a machine without a GPU, or
// with a driver older than the runtime, cudaGetDeviceCount's error says why (Python decides what it means).
py::tuple cuda_runtime_info() {
  int driver = 0;
  if (cudaDriverGetVersion(&driver) != cudaSuccess) driver = 0;
  int count = 0;
  const cudaError_t err = cudaGetDeviceCount(&count);
  (void)cudaGetLastError();  // leave no error behind for the next launch to report
  if (err != cudaSuccess) {
    return py::make_tuple(driver, CUDART_VERSION, 0,
                          std::string(cudaGetErrorName(err)) + ": " + cudaGetErrorString(err));
  }
  return py::make_tuple(driver, CUDART_VERSION, count, py::none());
}

// ---- shared: dtype codes, activation codes, the runtime check and host wrappers of the device math (CPU tests)
void bind_common(py::module_& m) {
  m.def("cuda_runtime_info", &cuda_runtime_info,
        "(driver version, runtime version, device count, error or None) of the CUDA runtime linked in");
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
  using P = hk::PolyChainParams;
  ParamsClass<P>(m, "PolyChainParams")
      .pointer("x", &P::x).pointer("weight", &P::weight).pointer("bias", &P::bias).pointer("y", &P::y)
      .pointer("z", &P::z).pointer("grad_y", &P::grad_y).pointer("grad_z", &P::grad_z)
      .value("M", &P::M).value("d", &P::d).value("k", &P::k).value("N", &P::N)
      .value("x_row_stride", &P::x_row_stride).value("y_row_stride", &P::y_row_stride)
      .value("dtype", &P::dtype).value("activation", &P::activation).value("mode", &P::mode)
      .value("scale", &P::scale).value("wgmma", &P::wgmma);
  def_launcher(m, "poly_chain_fwd", &hk::launch_poly_chain_fwd);
  def_launcher(m, "poly_chain_bwd", &hk::launch_poly_chain_bwd);
}

// ---- poly_ncp (csrc/poly_ncp.cu)
void bind_poly_ncp(py::module_& m) {
  m.attr("POLY_NCP_MAX_K") = hk::kPolyNcpMaxK;
  using P = hk::PolyNcpParams;
  ParamsClass<P>(m, "PolyNcpParams")
      .pointer("x", &P::x).pointer("a_weight", &P::a_weight).pointer("a_bias", &P::a_bias)
      .pointer("s_weight", &P::s_weight).pointer("s_bias", &P::s_bias).pointer("y", &P::y)
      .pointer("grad_y", &P::grad_y).pointer("grad_a", &P::grad_a).pointer("grad_s", &P::grad_s)
      .pointer("ys", &P::ys).pointer("workspace", &P::workspace)
      .value("M", &P::M).value("d", &P::d).value("k", &P::k).value("N", &P::N)
      .value("x_row_stride", &P::x_row_stride).value("y_row_stride", &P::y_row_stride)
      .value("dtype", &P::dtype).value("per_degree", &P::per_degree);
  def_launcher(m, "poly_ncp_fwd", &hk::launch_poly_ncp_fwd);
  def_launcher(m, "poly_ncp_bwd", &hk::launch_poly_ncp_bwd);
}

// ---- linear_attention (csrc/linear_attention.cu)
void bind_linear_attention(py::module_& m) {
  m.attr("FEATURE_MAPS") = names(hk::kFeatureMapNames);
  m.attr("LINEAR_ATTENTION_MAX_DIM") = hk::kLinearAttentionMaxDim;
  using P = hk::LinearAttentionParams;
  ParamsClass<P>(m, "LinearAttentionParams")
      .pointer("q", &P::q).pointer("k", &P::k).pointer("v", &P::v).pointer("o", &P::o).pointer("grad_o", &P::grad_o)
      .pointer("dq", &P::dq).pointer("dk", &P::dk).pointer("dv", &P::dv)
      .pointer("initial_state", &P::initial_state).pointer("initial_key_sum", &P::initial_key_sum)
      .pointer("final_state", &P::final_state).pointer("final_key_sum", &P::final_key_sum)
      .pointer("grad_final_state", &P::grad_final_state).pointer("grad_final_key_sum", &P::grad_final_key_sum)
      .pointer("grad_initial_state", &P::grad_initial_state).pointer("grad_initial_key_sum", &P::grad_initial_key_sum)
      .pointer("cu_seqlens", &P::cu_seqlens).pointer("workspace", &P::workspace)
      .pointer("segment_offsets", &P::segment_offsets).pointer("segment_sequence", &P::segment_sequence)
      .value("segment_chunks", &P::segment_chunks).value("segments", &P::segments)
      .value("B", &P::B).value("T", &P::T).value("H", &P::H).value("K", &P::K).value("V", &P::V).value("N", &P::N)
      .value("q_row_stride", &P::q_row_stride).value("q_head_stride", &P::q_head_stride)
      .value("k_row_stride", &P::k_row_stride).value("k_head_stride", &P::k_head_stride)
      .value("v_row_stride", &P::v_row_stride).value("v_head_stride", &P::v_head_stride)
      .value("o_row_stride", &P::o_row_stride).value("o_head_stride", &P::o_head_stride)
      .value("dq_row_stride", &P::dq_row_stride).value("dq_head_stride", &P::dq_head_stride)
      .value("dk_row_stride", &P::dk_row_stride).value("dk_head_stride", &P::dk_head_stride)
      .value("dv_row_stride", &P::dv_row_stride).value("dv_head_stride", &P::dv_head_stride)
      .value("dtype", &P::dtype).value("feature_map", &P::feature_map).value("normalize", &P::normalize)
      .value("scale", &P::scale).value("eps", &P::eps);
  def_launcher(m, "linear_attention_fwd", &hk::launch_linear_attention_fwd);
  def_launcher(m, "linear_attention_bwd", &hk::launch_linear_attention_bwd);
  m.def("linear_attention_fwd_workspace_bytes", &hk::linear_attention_fwd_workspace_bytes, py::arg("params"));
  m.def("linear_attention_bwd_workspace_bytes", &hk::linear_attention_bwd_workspace_bytes, py::arg("params"));
  // Host builds of the kernels' element-wise math, for CPU tests.
  auto feature_map_code = [](int code) {
    if (code < 0 || code >= hk::kNumFeatureMaps) {
      throw py::value_error("feature map code must be in [0, " + std::to_string(hk::kNumFeatureMaps) + "), got " +
                            std::to_string(code));
    }
    return code;
  };
  m.def(
      "linear_attention_feature_map_host",
      [feature_map_code](int code, float x) { return hk::feature_map(feature_map_code(code), x); },
      py::arg("code"), py::arg("x"), "phi(x) in float32");
  m.def(
      "linear_attention_feature_map_grad_host",
      [feature_map_code](int code, float x) { return hk::feature_map_grad(feature_map_code(code), x); },
      py::arg("code"), py::arg("x"), "phi'(x) in float32");
  m.def("linear_attention_normalized_output_host", &hk::normalized_output, py::arg("num"), py::arg("den"),
        py::arg("scale"), "scale * num / den in float32 (den includes eps)");
  m.def(
      "linear_attention_normalizer_grads_host",
      [](float grad_o, float o, float den, float scale) {
        return py::make_tuple(grad_o * hk::normalizer_row_scale(den, scale), hk::normalizer_den_grad(grad_o * o, den));
      },
      py::arg("grad_o"), py::arg("o"), py::arg("den"), py::arg("scale"),
      "(d num, d den) of o = scale * num / den for one element, in float32");
}

// ---- poly_gate (csrc/poly_gate.cu)
void bind_poly_gate(py::module_& m) {
  m.attr("POLY_GATE_MAX_C") = hk::kPolyGateMaxC;
  using P = hk::PolyGateParams;
  ParamsClass<P>(m, "PolyGateParams")
      .pointer("a", &P::a).pointer("b", &P::b).pointer("ln1_weight", &P::ln1_weight).pointer("ln1_bias", &P::ln1_bias)
      .pointer("ln2_weight", &P::ln2_weight).pointer("ln2_bias", &P::ln2_bias).pointer("alpha", &P::alpha)
      .pointer("y", &P::y).pointer("grad_y", &P::grad_y).pointer("da", &P::da).pointer("db", &P::db)
      .pointer("partial", &P::partial)
      .value("M", &P::M).value("C", &P::C).value("W", &P::W).value("H", &P::H)
      .value("a_row_stride", &P::a_row_stride).value("b_row_stride", &P::b_row_stride)
      .value("y_row_stride", &P::y_row_stride).value("da_row_stride", &P::da_row_stride)
      .value("db_row_stride", &P::db_row_stride).value("alpha_stride", &P::alpha_stride).value("grid", &P::grid)
      .value("eps", &P::eps).value("spatial", &P::spatial).value("dtype", &P::dtype);
  def_launcher(m, "poly_gate_fwd", &hk::launch_poly_gate_fwd);
  def_launcher(m, "poly_gate_bwd", &hk::launch_poly_gate_bwd);
  // Host builds of the kernels' index and element math, for CPU tests.
  m.def(
      "poly_gate_shift_host",
      [](int64_t row, int64_t c, int64_t W, int64_t H, int64_t C) {
        const int group = hk::shift_group(c, hk::shift_groups(C));
        const int64_t image = row / (W * H), w = row / H % W, h = row % H;
        const hk::ShiftTransposeTerms terms = hk::shift_transpose_terms(w, h, group, W, H);
        int64_t partner_row = -1;
        if (terms.partner >= 0) {
          partner_row = group < 2 ? (image * W + terms.partner) * H + h : (image * W + w) * H + terms.partner;
        }
        return py::make_tuple(hk::shift_source_row(row, group, W, H), hk::shift_target_row(row, group, W, H),
                              terms.own, partner_row);
      },
      py::arg("row"), py::arg("c"), py::arg("W"), py::arg("H"), py::arg("C"),
      "(row read by the shift, row its gradient goes to, whether it sends its own term, row whose term it adds or -1)");
  m.def(
      "poly_gate_tile_pixel_host",
      [](int64_t k, int64_t n) { return py::make_tuple(hk::shift_axis_tile(n), hk::shift_tile_pixel(k, n)); },
      py::arg("k"), py::arg("n"), "(pixels per backward tile along an axis of length n, pixel at tile position k)");
  m.def(
      "poly_gate_grads_host",
      [](float g, float n1, float n2, float alpha) {
        return py::make_tuple(hk::poly_gate_output(n1, n2, alpha), hk::poly_gate_grad_n1(g, n2, alpha),
                              hk::poly_gate_grad_n2(g, n1, alpha));
      },
      py::arg("g"), py::arg("n1"), py::arg("n2"), py::arg("alpha"), "(y, dL/dn1, dL/dn2) in float32");
  m.def("poly_gate_layer_norm_input_grad_host", &hk::layer_norm_input_grad, py::arg("dxhat"), py::arg("xhat"),
        py::arg("rstd"), py::arg("mean_dxhat"), py::arg("mean_dxhat_xhat"), "dL/dx of one LayerNorm element");
}

// ---- poly_sa (csrc/poly_sa.cu)
void bind_poly_sa(py::module_& m) {
  using P = hk::PolySaParams;
  ParamsClass<P>(m, "PolySaParams")
      .pointer("z", &P::z).pointer("w1", &P::w1).pointer("w2", &P::w2).pointer("w3", &P::w3)
      .pointer("alpha", &P::alpha).pointer("beta", &P::beta).pointer("mask", &P::mask).pointer("m", &P::m)
      .pointer("s", &P::s).pointer("grad_y", &P::grad_y).pointer("part", &P::part).pointer("y", &P::y)
      .pointer("dz", &P::dz).pointer("u", &P::u).pointer("grad_p", &P::grad_p)
      .value("B", &P::B).value("N", &P::N).value("C", &P::C).value("tokens_per_split", &P::tokens_per_split)
      .value("z_row_stride", &P::z_row_stride).value("g_row_stride", &P::g_row_stride)
      .value("out_row_stride", &P::out_row_stride).value("dtype", &P::dtype);
  def_launcher(m, "poly_sa_pool_fwd", &hk::launch_poly_sa_pool_fwd);
  def_launcher(m, "poly_sa_out_fwd", &hk::launch_poly_sa_out_fwd);
  def_launcher(m, "poly_sa_out_bwd", &hk::launch_poly_sa_out_bwd);
  def_launcher(m, "poly_sa_pool_bwd", &hk::launch_poly_sa_pool_bwd);
  // Host builds of the kernels' element math, for CPU tests.
  m.def(
      "poly_sa_epilogue_host",
      [](bool real, float p1, float p2, float s, float alpha, float beta, float z, float g, float gp, float m,
         float acc) {
        return py::make_tuple(hk::poly_sa_pool_term(real, p1, p2), hk::poly_sa_pool_grad(real, s, p2),
                              hk::poly_sa_pool_grad(real, s, p1), hk::poly_sa_output(alpha, z, beta, acc),
                              hk::poly_sa_direct_grad(alpha, beta, g, gp, m));
      },
      py::arg("real"), py::arg("p1"), py::arg("p2"), py::arg("s"), py::arg("alpha"), py::arg("beta"), py::arg("z"),
      py::arg("g"), py::arg("gp"), py::arg("m"), py::arg("acc"),
      "(pool term, dp1, dp2, y, dz_direct) of one element in float32");
}

// ---- lrnn (csrc/lrnn.cu)
void bind_lrnn(py::module_& m) {
  m.attr("LRNN_ACTIVATIONS") = names(hk::kLrnnActivationNames);
  m.attr("LRNN_MAX_DBAR") = hk::kLrnnMaxDbar;
  m.attr("LRNN_MAX_HIDDEN") = hk::kLrnnMaxHidden;
  using P = hk::LrnnParams;
  ParamsClass<P>(m, "LrnnParams")
      .pointer("x", &P::x).pointer("weight", &P::weight).pointer("bias", &P::bias).pointer("g_params", &P::g_params)
      .pointer("phi", &P::phi).pointer("grad_phi", &P::grad_phi).pointer("grad_z", &P::grad_z)
      .pointer("g_params_part", &P::g_params_part)
      .value("M", &P::M).value("d", &P::d).value("rank", &P::rank).value("dbar", &P::dbar).value("h", &P::h)
      .value("x_row_stride", &P::x_row_stride).value("phi_row_stride", &P::phi_row_stride)
      .value("grad_z_row_stride", &P::grad_z_row_stride).value("rows_per_split", &P::rows_per_split)
      .value("dtype", &P::dtype).value("activation", &P::activation).value("omega", &P::omega)
      .value("gamma", &P::gamma);
  def_launcher(m, "lrnn_fwd", &hk::launch_lrnn_fwd);
  def_launcher(m, "lrnn_bwd", &hk::launch_lrnn_bwd);
  // Host builds of the kernels' element math, for CPU tests.
  auto fixed_code = [](int code) {
    if (code < 0 || code >= hk::kLrnnMlp) {
      throw py::value_error("lrnn activation code must be in [0, " + std::to_string(hk::kLrnnMlp) +
                            ") (mlp has lrnn_mlp_host), got " + std::to_string(code));
    }
    return code;
  };
  m.def(
      "lrnn_g_host", [fixed_code](int code, float z, float omega) { return hk::lrnn_g(fixed_code(code), z, omega); },
      py::arg("code"), py::arg("z"), py::arg("omega"), "g(z) in float32");
  m.def(
      "lrnn_g_grad_host",
      [fixed_code](int code, float z, float omega) { return hk::lrnn_g_grad(fixed_code(code), z, omega); },
      py::arg("code"), py::arg("z"), py::arg("omega"), "g'(z) in float32");
  m.def(
      "lrnn_mlp_host",
      [](float z, const py::sequence& a, const py::sequence& w, const py::sequence& c, float u) {
        const int h = static_cast<int>(py::len(a));
        if (h < 1 || h > hk::kLrnnMaxHidden || py::len(w) != py::len(a) || py::len(c) != py::len(a)) {
          throw py::value_error("lrnn_mlp_host: a, w, c must have the same length h in [1, " +
                                std::to_string(hk::kLrnnMaxHidden) + "]");
        }
        float av[hk::kLrnnMaxHidden], wv[hk::kLrnnMaxHidden], cv[hk::kLrnnMaxHidden];
        float da[hk::kLrnnMaxHidden] = {}, dw[hk::kLrnnMaxHidden] = {}, dc[hk::kLrnnMaxHidden] = {};
        for (int i = 0; i < h; ++i) {
          av[i] = a[i].cast<float>();
          wv[i] = w[i].cast<float>();
          cv[i] = c[i].cast<float>();
        }
        const float g = hk::lrnn_mlp_g(z, av, wv, cv, h);
        const float grad = hk::lrnn_mlp_g_grad<true>(z, av, wv, cv, h, u, da, dw, dc);
        py::list grads[3];
        for (int i = 0; i < h; ++i) {
          grads[0].append(da[i]);
          grads[1].append(dw[i]);
          grads[2].append(dc[i]);
        }
        return py::make_tuple(g, grad, grads[0], grads[1], grads[2]);
      },
      py::arg("z"), py::arg("a"), py::arg("w"), py::arg("c"), py::arg("u"),
      "(g(z), g'(z), u dg/da, u dg/dw, u dg/dc) of one mlp component in float32");
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "hadamard_kernels CUDA kernels (raw-pointer launchers; call through hadamard_kernels.ops)";
  bind_common(m);
  bind_poly_chain(m);
  bind_poly_ncp(m);
  bind_linear_attention(m);
  bind_poly_gate(m);
  bind_poly_sa(m);
  bind_lrnn(m);
}
