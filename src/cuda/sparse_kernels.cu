#include <cstdlib>
#include <string_view>

#include "cuda/common.cuh"
#include "cuda/row_ops.cuh"
#include "cuda/sla_cuda.h"
#include "cuda/sparse_kernels.h"
#include "cuda/sparse_mainloops.h"

namespace slattn::cuda {
namespace {

constexpr int kThreads = 256;
constexpr const char* kWgmmaUnavailable =
    "SLATTN_CUDA_MAINLOOP=wgmma needs a compute capability 9.0 GPU and a build with sm_90a code";
constexpr int kWarps = kThreads / kWarpSize;

// Warp per padded query row: dOs = dout + dout_sparse, D_i = dOs · Os.
template <typename Element>
__global__ void sparse_delta_kernel(Geometry g, SparseBackwardArgs a) {
  const int64_t flat = blockIdx.x * int64_t(kWarps) + threadIdx.x / kWarpSize;
  if (flat >= g.q_pairs() * g.q_rows()) return;
  const int64_t pair = flat / g.q_rows(), row = flat % g.q_rows();
  const int64_t b = pair / g.heads, h = pair % g.heads;
  WarpRow dout{}, dos{}, os{};
  if (row < g.q_len) {
    dout.load(DeviceView<const Element>::of(a.dout), b, h, row, g.dim);
    os.load(DeviceView<const Element>::of(a.out_sparse), b, h, row, g.dim);
    dos = dout;
    if (a.dout_sparse.defined()) {
      WarpRow extra;
      extra.load(DeviceView<const Element>::of(a.dout_sparse), b, h, row, g.dim);
#pragma unroll
      for (int t = 0; t < kMaxPerLane; ++t) dos.v[t] += extra.v[t];
    }
  }
  const float delta = dos.dot(os);
  Element* dos_row = static_cast<Element*>(a.dos_rows) + flat * g.dim;
#pragma unroll
  for (int t = 0; t < kMaxPerLane; ++t)
    if (WarpRow::index(t) < g.dim) dos_row[WarpRow::index(t)] = from_float<Element>(dos.v[t]);
  if (a.dout_rows) dout.store(a.dout_rows + flat * g.dim, g.dim);
  if (threadIdx.x % kWarpSize == 0) a.delta[flat] = delta;
}

}  // namespace

void check_sparse_support(const Geometry& g) {
  SLATTN_CHECK(g.dim == 64 || g.dim == 128, "the CUDA kernels support head_dim 64 and 128, got ", g.dim,
               " (the CPU path serves every multiple of 8 up to 256)");
  SLATTN_CHECK(g.block_q == 64 || g.block_q == 128, "the CUDA kernels support block_q 64 and 128, got ", g.block_q);
  SLATTN_CHECK(g.block_k == 64 || g.block_k == 128, "the CUDA kernels support block_k 64 and 128, got ", g.block_k);
}

void check_cuda_support(const Geometry& g, const void* proj_weight, DType proj_dtype, FeatureMap feature_map,
                        const FeatureWeights& feature_weights) {
  check_sparse_support(g);
  SLATTN_CHECK(proj_weight == nullptr || proj_dtype == DType::float32,
               "the CUDA path takes float32 projection weights, got ", dtype_name(proj_dtype));
  SLATTN_CHECK(!has_feature_weights(feature_map) || feature_weights.dtype == DType::float32,
               "the CUDA path takes float32 feature weights (feature_weight_q/feature_weight_k), got ",
               dtype_name(feature_weights.dtype));
}

Mainloop requested_mainloop() {
  const char* value = std::getenv("SLATTN_CUDA_MAINLOOP");
  const std::string_view name = value ? value : "";
  if (name.empty() || name == "auto") return Mainloop::automatic;
  if (name == "mma") return Mainloop::mma;
  if (name == "wgmma") return Mainloop::wgmma;
  throw Error(detail::concat("SLATTN_CUDA_MAINLOOP must be auto, mma or wgmma, got '", name, "'"));
}

bool current_device_is_hopper() {
  int device = 0, major = 0;
  SLATTN_CUDA_CHECK(cudaGetDevice(&device));
  SLATTN_CUDA_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device));
  return major == 9;
}

void sparse_forward(const Geometry& g, const RoutingPlanView& plan, const SparseForwardArgs& args,
                    cudaStream_t stream) {
  check_sparse_support(g);
  const Mainloop mainloop = requested_mainloop();
  if (mainloop != Mainloop::mma && current_device_is_hopper()) {
    const char* refusal = sparse_forward_wgmma(g, plan, args, stream);
    if (refusal == nullptr) return;
    if (mainloop == Mainloop::wgmma) throw Unsupported(detail::concat("SLATTN_CUDA_MAINLOOP=wgmma: ", refusal));
  } else if (mainloop == Mainloop::wgmma) {
    throw Unsupported(kWgmmaUnavailable);
  }
  sparse_forward_mma(g, plan, args, stream);
}

void sparse_backward(const Geometry& g, const RoutingPlanView& plan, const SparseBackwardArgs& args,
                     cudaStream_t stream) {
  check_sparse_support(g);
  sparse_delta(g, args, stream);
  const Mainloop mainloop = requested_mainloop();
  if (mainloop != Mainloop::mma && current_device_is_hopper() && sparse_backward_wgmma(g, plan, args, stream)) return;
  if (mainloop == Mainloop::wgmma) throw Unsupported(kWgmmaUnavailable);
  sparse_backward_mma(g, plan, args, stream);
}

void sparse_delta(const Geometry& g, const SparseBackwardArgs& args, cudaStream_t stream) {
  dispatch_element(args.q.dtype, [&](auto tag) {
    using Element = decltype(tag);
    const auto rows = g.q_pairs() * g.q_rows();
    sparse_delta_kernel<Element><<<static_cast<unsigned>(ceil_div(rows, kWarps)), kThreads, 0, stream>>>(g, args);
  });
  SLATTN_LAUNCH_CHECK("sparse_delta_kernel");
}

}  // namespace slattn::cuda
