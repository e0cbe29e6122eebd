// The CUDA path of SLA: entry points called by the dispatcher (src/sla.cpp)
// for device data, and the dtype dispatch they share.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstddef>

#include "slattn/error.h"
#include "slattn/params.h"
#include "slattn/plan.h"
#include "slattn/route.h"

namespace slattn::cuda {

// Calls fn(Element{}) with the CUDA element type of `dtype`; other dtypes are refused.
template <typename Fn>
void dispatch_element(DType dtype, Fn&& fn) {
  switch (dtype) {
    case DType::bfloat16: fn(__nv_bfloat16{}); return;
    case DType::float16: fn(__half{}); return;
    default:
      throw Error(detail::concat("the CUDA path supports bfloat16 and float16 inputs, got ", dtype_name(dtype),
                                 " (the CPU path serves float32 and float64)"));
  }
}

size_t route_workspace_bytes(const RouteParams& params, const RoutingPlanView& plan);
void route(const RouteParams& params, const RoutingPlanView& plan, void* workspace, size_t workspace_bytes,
           cudaStream_t stream);
void build_block_lists(const RoutingPlanView& plan, cudaStream_t stream);

size_t sla_forward_workspace_bytes(const SlaForwardParams& params, const RoutingPlanView& plan);
void sla_forward(const SlaForwardParams& params, const RoutingPlanView& plan);

size_t sla_backward_workspace_bytes(const SlaBackwardParams& params, const RoutingPlanView& plan);
void sla_backward(const SlaBackwardParams& params, const RoutingPlanView& plan);

}  // namespace slattn::cuda
