// Public entry points of the slattn core. Include this header only.
//
// Plan, then run: route() (or build_block_lists() on a user block map) fills a
// RoutingPlanView once; sla_forward() and sla_backward() read it.
// Dispatch is on where the data lives: host pointers run the CPU reference
// path, which follows SPEC.md line by line; device pointers run the CUDA path
// (bfloat16/float16, head dims 64 and 128, blocks 64 and 128).
#pragma once

#include "slattn/error.h"
#include "slattn/params.h"
#include "slattn/plan.h"
#include "slattn/route.h"
#include "slattn/tensor_view.h"

namespace slattn {

void sla_forward(const SlaForwardParams& params, const RoutingPlanView& plan);
void sla_backward(const SlaBackwardParams& params, const RoutingPlanView& plan);

// Scratch memory the CUDA path needs for these params (0 for host data).
size_t sla_forward_workspace_bytes(const SlaForwardParams& params, const RoutingPlanView& plan);
size_t sla_backward_workspace_bytes(const SlaBackwardParams& params, const RoutingPlanView& plan);

// Whether this build has the CUDA path, and whether `pointer` is device memory.
bool built_with_cuda();
bool is_device_pointer(const void* pointer);

// Threads used by the CPU path (default: the hardware's concurrency).
void set_num_threads(int threads);
int num_threads();

// Largest head dim the core accepts; head dims must be multiples of kHeadDimMultiple.
inline constexpr int64_t kMaxHeadDim = 256;
inline constexpr int64_t kHeadDimMultiple = 8;
// Block sizes the CPU path accepts (the CUDA kernels accept 64 and 128 only).
inline constexpr int64_t kMaxBlockSize = 1024;

}  // namespace slattn
