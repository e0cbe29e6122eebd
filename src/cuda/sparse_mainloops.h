// The mainloops behind sparse_forward and sparse_backward (sparse_kernels.h) and how one is
// chosen: warpgroup products (wgmma) on Hopper when the build carries sm_90a
// code, mma.sync elsewhere. SLATTN_CUDA_MAINLOOP=mma or wgmma forces one
// (tests hold both to the reference; benchmarks compare them).
#pragma once

#include <cuda_runtime.h>

#include "cuda/common.cuh"
#include "cuda/geometry.h"
#include "cuda/sparse_kernels.h"

namespace slattn::cuda {

enum class Mainloop { automatic, mma, wgmma };

// SLATTN_CUDA_MAINLOOP read at each call; an unknown value is refused.
Mainloop requested_mainloop();

// True when the current device has compute capability 9.x.
bool current_device_is_hopper();

// True when `kernel` was loaded as sm_90 machine code: the build has an
// sm_90a target (an sm_80-only build gives wgmma kernels an empty body).
template <typename Kernel>
bool loaded_for_hopper(Kernel kernel) {
  cudaFuncAttributes attributes{};
  SLATTN_CUDA_CHECK(cudaFuncGetAttributes(&attributes, kernel));
  return attributes.binaryVersion == 90;
}

// The most shared memory a Hopper thread block may opt into: kernels pick
// their stages by it at compile time.
inline constexpr size_t kHopperSharedPerBlock = 227 * 1024;

// Why a Hopper kernel cannot run here, or nullptr: `loaded` is
// loaded_for_hopper(kernel) (kept by the caller per instantiation), `shared`
// the bytes of shared memory it asks for.
inline const char* hopper_kernel_refusal(bool loaded, size_t shared) {
  if (!loaded) return "the build has no sm_90a code";
  if (shared > max_shared_per_block()) return "the kernel needs more shared memory than this GPU gives a thread block";
  return nullptr;
}

// The padded dOs rows of the backward's workspace, seen as a (B, H, q_rows, D) tensor.
template <typename Element>
DeviceView<const Element> dos_view(const Geometry& g, const void* dos_rows) {
  DeviceView<const Element> view;
  view.data = static_cast<const Element*>(dos_rows);
  view.stride_d = 1;
  view.stride_l = g.dim;
  view.stride_h = g.q_rows() * g.dim;
  view.stride_b = g.heads * view.stride_h;
  return view;
}

void sparse_forward_mma(const Geometry& g, const RoutingPlanView& plan, const SparseForwardArgs& args,
                        cudaStream_t stream);
// Launches the Hopper forward and returns nullptr, or returns why it cannot run (nothing launched, `before`
// not called): no sm_90a code in the build, too little shared memory, or a layout of q, k or v that the
// tile copy engine cannot describe. The mma.sync mainloop serves all of these. Calls `before` (when given)
// if the kernel can add the linear terms, and adds those it returns (*terms_added says whether it did).
const char* sparse_forward_wgmma(const Geometry& g, const RoutingPlanView& plan, const SparseForwardArgs& args,
                                 const ForwardLinearStep& before, bool* terms_added, cudaStream_t stream);

// The dQ and dK/dV kernels, after sparse_delta.
void sparse_backward_mma(const Geometry& g, const RoutingPlanView& plan, const SparseBackwardArgs& args,
                         cudaStream_t stream);
// Launches sparse_delta (without dOs rows when the kernels read dout itself), the Hopper dQ kernel,
// calls `between` (when given) and launches the dK/dV kernel, with the terms it returned (*terms_added says
// whether there were any); returns nullptr, or returns why the kernels cannot run (nothing launched, nothing
// called), as sparse_forward_wgmma.
const char* sparse_backward_wgmma(const Geometry& g, const RoutingPlanView& plan, const SparseBackwardArgs& args,
                                  const KeyGradLinearStep& between, bool* terms_added, cudaStream_t stream);

}  // namespace slattn::cuda
