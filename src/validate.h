// Argument checks shared by every backend: each failure names the argument.
#pragma once

#include "slattn/params.h"
#include "slattn/plan.h"
#include "slattn/route.h"

namespace slattn {

// The plan shape implied by q, k and the plan's block sizes.
PlanShape expected_plan_shape(const TensorView& q, const TensorView& k, const PlanShape& plan);

void validate(const RouteParams& params, const RoutingPlanView& plan);
void validate(const SlaForwardParams& params, const RoutingPlanView& plan);
void validate(const SlaBackwardParams& params, const RoutingPlanView& plan);

}  // namespace slattn
