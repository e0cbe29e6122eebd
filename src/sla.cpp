// Public entry points: validate, then dispatch on where the data lives.
#include "slattn/sla.h"

#include "cpu/sla_cpu.h"
#include "cuda/device.h"
#include "validate.h"

namespace slattn {
namespace {

void require_host(const void* pointer, const char* entry_point) {
  if (cuda::is_device_pointer(pointer))
    throw Unsupported(detail::concat(entry_point,
                                     ": this build has no CUDA kernels yet; pass host (CPU) memory"));
}

}  // namespace

void route(const RouteParams& params, const RoutingPlanView& plan) {
  validate(params, plan);
  require_host(params.q.data, "route");
  cpu::route(params, plan);
  build_block_lists(plan);
}

void sla_forward(const SlaForwardParams& params, const RoutingPlanView& plan) {
  validate(params, plan);
  require_host(params.q.data, "sla_forward");
  cpu::sla_forward(params, plan);
}

void sla_backward(const SlaBackwardParams& params, const RoutingPlanView& plan) {
  validate(params, plan);
  require_host(params.q.data, "sla_backward");
  cpu::sla_backward(params, plan);
}

}  // namespace slattn
