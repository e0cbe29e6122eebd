// Public entry points: validate, then dispatch on where the data lives.
#include "slattn/sla.h"

#include "cpu/sla_cpu.h"
#include "cuda/device.h"
#include "validate.h"

#ifdef SLATTN_WITH_CUDA
#include "cuda/sla_cuda.h"
#endif

namespace slattn {
namespace {

// True for device data; throws for device data in a build without CUDA kernels.
bool on_device(const void* pointer, const char* entry_point) {
  if (!cuda::is_device_pointer(pointer)) return false;
#ifdef SLATTN_WITH_CUDA
  (void)entry_point;
  return true;
#else
  throw Unsupported(detail::concat(entry_point, ": this build has no CUDA kernels; pass host (CPU) memory"));
#endif
}

#ifdef SLATTN_WITH_CUDA
void check_workspace(const void* workspace, size_t given, size_t needed, const char* entry_point) {
  SLATTN_CHECK(needed == 0 || (workspace != nullptr && given >= needed), entry_point, ": workspace needs ", needed,
               " bytes, got ", workspace ? given : 0);
}
#endif

}  // namespace

bool built_with_cuda() {
#ifdef SLATTN_WITH_CUDA
  return true;
#else
  return false;
#endif
}

bool is_device_pointer(const void* pointer) { return cuda::is_device_pointer(pointer); }

size_t route_workspace_bytes(const RouteParams& params, const RoutingPlanView& plan) {
  validate(params, plan);
#ifdef SLATTN_WITH_CUDA
  if (on_device(params.q.data, "route")) return cuda::route_workspace_bytes(params, plan);
#endif
  (void)plan;
  (void)params;
  return 0;
}

size_t sla_forward_workspace_bytes(const SlaForwardParams& params, const RoutingPlanView& plan) {
  validate(params, plan);
#ifdef SLATTN_WITH_CUDA
  if (on_device(params.q.data, "sla_forward")) return cuda::sla_forward_workspace_bytes(params, plan);
#endif
  (void)plan;
  (void)params;
  return 0;
}

size_t sla_backward_workspace_bytes(const SlaBackwardParams& params, const RoutingPlanView& plan) {
  validate(params, plan);
#ifdef SLATTN_WITH_CUDA
  if (on_device(params.q.data, "sla_backward")) return cuda::sla_backward_workspace_bytes(params, plan);
#endif
  (void)plan;
  (void)params;
  return 0;
}

void route(const RouteParams& params, const RoutingPlanView& plan) {
  validate(params, plan);
  if (on_device(params.q.data, "route")) {
#ifdef SLATTN_WITH_CUDA
    check_workspace(params.workspace, params.workspace_bytes, cuda::route_workspace_bytes(params, plan), "route");
    cuda::route(params, plan, params.workspace, params.workspace_bytes, static_cast<cudaStream_t>(params.stream));
#endif
    return;
  }
  cpu::route(params, plan);
  build_block_lists(plan);
}

void sla_forward(const SlaForwardParams& params, const RoutingPlanView& plan) {
  validate(params, plan);
  if (on_device(params.q.data, "sla_forward")) {
#ifdef SLATTN_WITH_CUDA
    check_workspace(params.workspace, params.workspace_bytes, cuda::sla_forward_workspace_bytes(params, plan),
                    "sla_forward");
    cuda::sla_forward(params, plan);
#endif
    return;
  }
  cpu::sla_forward(params, plan);
}

void sla_backward(const SlaBackwardParams& params, const RoutingPlanView& plan) {
  validate(params, plan);
  if (on_device(params.q.data, "sla_backward")) {
#ifdef SLATTN_WITH_CUDA
    check_workspace(params.workspace, params.workspace_bytes, cuda::sla_backward_workspace_bytes(params, plan),
                    "sla_backward");
    cuda::sla_backward(params, plan);
#endif
    return;
  }
  cpu::sla_backward(params, plan);
}

}  // namespace slattn
