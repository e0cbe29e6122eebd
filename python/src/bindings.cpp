// slattn._C: the binding at the edge. Tensors cross as raw data pointers with
// their dtype, logical (B, H, L, D) sizes and element strides, filled in by
// the Python layer from torch tensors; nothing here knows about PyTorch.
// slattn::Error (std::invalid_argument) surfaces as ValueError.
#include <nanobind/nanobind.h>
#include <nanobind/stl/array.h>
#include <nanobind/stl/string.h>

#include <cstdint>

#include "slattn/sla.h"

namespace nb = nanobind;
using namespace nb::literals;

namespace {

void* as_pointer(uintptr_t address) { return reinterpret_cast<void*>(address); }

// Device launches: the caller's stream, and scratch memory from the caller's
// allocator. `allocate(nbytes)` returns an object with data_ptr() (a torch
// tensor from the caching allocator) that is kept alive across the launch;
// the allocator is stream-ordered, so releasing it afterwards is safe.
struct Launch {
  uintptr_t stream = 0;
  nb::object allocate;
  nb::object workspace;

  template <typename Params>
  void attach(Params& params, size_t bytes) {
    params.stream = as_pointer(stream);
    if (bytes == 0) return;
    SLATTN_CHECK(!allocate.is_none(), "device data needs a workspace allocator");
    workspace = allocate(bytes);
    params.workspace = as_pointer(nb::cast<uintptr_t>(workspace.attr("data_ptr")()));
    params.workspace_bytes = bytes;
  }
};

slattn::TensorView make_view(uintptr_t data, int dtype, const std::array<int64_t, 4>& size,
                             const std::array<int64_t, 4>& stride) {
  SLATTN_CHECK(dtype >= 0 && dtype <= static_cast<int>(slattn::DType::float16), "unknown dtype code ", dtype);
  slattn::TensorView view;
  view.data = as_pointer(data);
  view.dtype = static_cast<slattn::DType>(dtype);
  view.size = size;
  view.stride = stride;
  return view;
}

// shape: (batch, heads, q_len, k_len, block_q, block_k); buffers: the five plan pointers.
// Hedgehog's W_q and W_k (null for the fixed maps; equal addresses: tied).
slattn::FeatureWeights make_feature_weights(uintptr_t weight_q, uintptr_t weight_k, int dtype) {
  return {as_pointer(weight_q), as_pointer(weight_k), static_cast<slattn::DType>(dtype)};
}

slattn::RoutingPlanView make_plan(const std::array<int64_t, 6>& shape, const std::array<uintptr_t, 5>& buffers) {
  slattn::RoutingPlanView plan;
  plan.shape = {shape[0], shape[1], shape[2], shape[3], shape[4], shape[5]};
  plan.block_map = static_cast<int8_t*>(as_pointer(buffers[0]));
  plan.row_count = static_cast<int32_t*>(as_pointer(buffers[1]));
  plan.row_index = static_cast<int32_t*>(as_pointer(buffers[2]));
  plan.col_count = static_cast<int32_t*>(as_pointer(buffers[3]));
  plan.col_index = static_cast<int32_t*>(as_pointer(buffers[4]));
  return plan;
}

void route(const slattn::TensorView& q, const slattn::TensorView& k, double topk, double negligible,
           const slattn::RoutingPlanView& plan, uintptr_t stream, nb::object allocate) {
  slattn::RouteParams params;
  params.q = q;
  params.k = k;
  params.topk = topk;
  params.negligible = negligible;
  Launch launch{stream, allocate, nb::none()};
  launch.attach(params, slattn::route_workspace_bytes(params, plan));
  nb::gil_scoped_release release;
  slattn::route(params, plan);
}

void build_block_lists(const slattn::RoutingPlanView& plan, uintptr_t stream) {
  nb::gil_scoped_release release;
  slattn::build_block_lists(plan, as_pointer(stream));
}

void sla_forward(const slattn::TensorView& q, const slattn::TensorView& k, const slattn::TensorView& v,
                 uintptr_t proj_weight, uintptr_t proj_bias, int proj_dtype, const slattn::TensorView& out,
                 const slattn::TensorView& out_sparse, const slattn::TensorView& out_linear, uintptr_t lse,
                 double scale, const std::string& feature_map, uintptr_t feature_weight_q,
                 uintptr_t feature_weight_k, int feature_dtype, const std::string& linear_scope, bool quantized,
                 const slattn::RoutingPlanView& plan, uintptr_t stream, nb::object allocate) {
  slattn::SlaForwardParams params;
  params.q = q;
  params.k = k;
  params.v = v;
  params.proj_weight = as_pointer(proj_weight);
  params.proj_bias = as_pointer(proj_bias);
  params.proj_dtype = static_cast<slattn::DType>(proj_dtype);
  params.out = out;
  params.out_sparse = out_sparse;
  params.out_linear = out_linear;
  params.lse = as_pointer(lse);
  params.scale = scale;
  params.feature_map = slattn::parse_feature_map(feature_map);
  params.feature_weights = make_feature_weights(feature_weight_q, feature_weight_k, feature_dtype);
  params.linear_scope = slattn::parse_linear_scope(linear_scope);
  params.quantized = quantized;
  Launch launch{stream, allocate, nb::none()};
  launch.attach(params, slattn::sla_forward_workspace_bytes(params, plan));
  nb::gil_scoped_release release;
  slattn::sla_forward(params, plan);
}

void sla_backward(const slattn::TensorView& q, const slattn::TensorView& k, const slattn::TensorView& v,
                  const slattn::TensorView& out_sparse, uintptr_t lse, uintptr_t proj_weight, bool has_proj_bias,
                  int proj_dtype, const slattn::TensorView& dout, const slattn::TensorView& dout_sparse,
                  const slattn::TensorView& dout_linear, const slattn::TensorView& dq, const slattn::TensorView& dk,
                  const slattn::TensorView& dv, uintptr_t d_proj_weight, uintptr_t d_proj_bias, double scale,
                  const std::string& feature_map, uintptr_t feature_weight_q, uintptr_t feature_weight_k,
                  int feature_dtype, uintptr_t d_feature_weight_q, uintptr_t d_feature_weight_k,
                  const std::string& linear_scope, const slattn::RoutingPlanView& plan, uintptr_t stream,
                  nb::object allocate) {
  slattn::SlaBackwardParams params;
  params.q = q;
  params.k = k;
  params.v = v;
  params.out_sparse = out_sparse;
  params.lse = as_pointer(lse);
  params.proj_weight = as_pointer(proj_weight);
  params.has_proj_bias = has_proj_bias;
  params.proj_dtype = static_cast<slattn::DType>(proj_dtype);
  params.dout = dout;
  params.dout_sparse = dout_sparse;
  params.dout_linear = dout_linear;
  params.dq = dq;
  params.dk = dk;
  params.dv = dv;
  params.d_proj_weight = as_pointer(d_proj_weight);
  params.d_proj_bias = as_pointer(d_proj_bias);
  params.scale = scale;
  params.feature_map = slattn::parse_feature_map(feature_map);
  params.feature_weights = make_feature_weights(feature_weight_q, feature_weight_k, feature_dtype);
  params.d_feature_weight_q = as_pointer(d_feature_weight_q);
  params.d_feature_weight_k = as_pointer(d_feature_weight_k);
  params.linear_scope = slattn::parse_linear_scope(linear_scope);
  Launch launch{stream, allocate, nb::none()};
  launch.attach(params, slattn::sla_backward_workspace_bytes(params, plan));
  nb::gil_scoped_release release;
  slattn::sla_backward(params, plan);
}

}  // namespace

NB_MODULE(_C, m) {
  m.doc() = "slattn core bindings (raw pointers; use the slattn package, not this module)";
  nb::register_exception_translator([](const std::exception_ptr& error, void*) {
    try {
      std::rethrow_exception(error);
    } catch (const slattn::Unsupported& unsupported) {
      PyErr_SetString(PyExc_NotImplementedError, unsupported.what());
    }
  });
  nb::class_<slattn::TensorView>(m, "TensorView")
      .def("__init__",
           [](slattn::TensorView* self, uintptr_t data, int dtype, const std::array<int64_t, 4>& size,
              const std::array<int64_t, 4>& stride) { new (self) slattn::TensorView(make_view(data, dtype, size, stride)); },
           "data"_a, "dtype"_a, "size"_a, "stride"_a)
      .def(nb::init<>());
  nb::class_<slattn::RoutingPlanView>(m, "RoutingPlanView")
      .def("__init__",
           [](slattn::RoutingPlanView* self, const std::array<int64_t, 6>& shape, const std::array<uintptr_t, 5>& buffers) {
             new (self) slattn::RoutingPlanView(make_plan(shape, buffers));
           },
           "shape"_a, "buffers"_a);
  m.def("route", &route, "q"_a, "k"_a, "topk"_a, "negligible"_a, "plan"_a, "stream"_a, "allocate"_a.none());
  m.def("build_block_lists", &build_block_lists, "plan"_a, "stream"_a);
  m.def("sla_forward", &sla_forward, nb::arg("q"), nb::arg("k"), nb::arg("v"), nb::arg("proj_weight"),
        nb::arg("proj_bias"), nb::arg("proj_dtype"), nb::arg("out"), nb::arg("out_sparse"), nb::arg("out_linear"),
        nb::arg("lse"), nb::arg("scale"), nb::arg("feature_map"), nb::arg("feature_weight_q"),
        nb::arg("feature_weight_k"), nb::arg("feature_dtype"), nb::arg("linear_scope"), nb::arg("quantized"),
        nb::arg("plan"), nb::arg("stream"), nb::arg("allocate").none());
  m.def("sla_backward", &sla_backward, nb::arg("q"), nb::arg("k"), nb::arg("v"), nb::arg("out_sparse"),
        nb::arg("lse"), nb::arg("proj_weight"), nb::arg("has_proj_bias"), nb::arg("proj_dtype"), nb::arg("dout"),
        nb::arg("dout_sparse"), nb::arg("dout_linear"), nb::arg("dq"), nb::arg("dk"), nb::arg("dv"),
        nb::arg("d_proj_weight"), nb::arg("d_proj_bias"), nb::arg("scale"), nb::arg("feature_map"),
        nb::arg("feature_weight_q"), nb::arg("feature_weight_k"), nb::arg("feature_dtype"),
        nb::arg("d_feature_weight_q"), nb::arg("d_feature_weight_k"), nb::arg("linear_scope"), nb::arg("plan"),
        nb::arg("stream"), nb::arg("allocate").none());
  m.def("critical_blocks_per_row", &slattn::critical_blocks_per_row, "topk"_a, "k_blocks"_a);
  m.def("negligible_blocks_per_row", &slattn::negligible_blocks_per_row, "topk"_a, "negligible"_a, "k_blocks"_a);
  m.def("set_num_threads", &slattn::set_num_threads, "threads"_a);
  m.def("num_threads", &slattn::num_threads);
  m.def("built_with_cuda", &slattn::built_with_cuda);
}
