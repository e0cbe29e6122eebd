// The CPU path of SLA: follows SPEC.md line by line; parallel over heads.
#pragma once

#include "slattn/params.h"
#include "slattn/plan.h"
#include "slattn/route.h"

namespace slattn::cpu {

void route(const RouteParams& params, const RoutingPlanView& plan);
void sla_forward(const SlaForwardParams& params, const RoutingPlanView& plan);
void sla_backward(const SlaBackwardParams& params, const RoutingPlanView& plan);

}  // namespace slattn::cpu
