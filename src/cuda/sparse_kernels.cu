#include <cstdlib>
#include <string_view>

#include "cuda/common.cuh"
#include "cuda/row_ops.cuh"
#include "cuda/sla_cuda.h"
#include "cuda/sparse_kernels.h"
#include "cuda/sparse_mainloops.h"
#include "cuda/tile_mma.cuh"

namespace slattn::cuda {
namespace {

constexpr int kThreads = 256;
constexpr const char* kWgmmaUnavailable =
    "SLATTN_CUDA_MAINLOOP=wgmma needs a compute capability 9.0 GPU and a build with sm_90a code";

// Per padded query row, in row slices (row_ops.cuh): dOs = dout + dout_sparse, D_i = dOs · Os.
template <typename Element, int kDim>
__global__ void __launch_bounds__(kThreads) sparse_delta_kernel(Geometry g, SparseBackwardArgs a) {
  using Slice = RowSlice<kDim>;
  const int64_t flat = Slice::row_of_thread();
  const bool valid = flat < g.q_pairs() * g.q_rows();  // lanes past the end take part in the reductions
  const int64_t pair = (valid ? flat : 0) / g.q_rows(), row = (valid ? flat : 0) % g.q_rows();
  const int64_t b = pair / g.heads, h = pair % g.heads;
  Slice dout{}, dos{}, os{};
  if (row < g.q_len) {
    dout.load(DeviceView<const Element>::of(a.dout), b, h, row);
    os.load(DeviceView<const Element>::of(a.out_sparse), b, h, row);
    dos = dout;
    if (a.dout_sparse.defined()) {
      Slice extra;
      extra.load(DeviceView<const Element>::of(a.dout_sparse), b, h, row);
#pragma unroll
      for (int i = 0; i < Slice::kPerLane; ++i) dos.v[i] += extra.v[i];
    }
  }
  const float delta = dos.dot(os);
  if (!valid) return;
  if (a.dos_rows) dos.store(static_cast<Element*>(a.dos_rows) + flat * kDim);
  if (a.dout_rows) dout.store(a.dout_rows + flat * kDim);
  if (Slice::first() == 0) {
    a.delta[flat] = delta;
    a.lse_log2_rows[flat] = row < g.q_len ? a.lse[pair * g.q_len + row] * kLog2e : INFINITY;
  }
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

namespace {

// hopper() (which launches and returns nullptr, or returns why it cannot
// run) on a Hopper GPU unless SLATTN_CUDA_MAINLOOP=mma, else or on a refusal
// mma(); SLATTN_CUDA_MAINLOOP=wgmma turns the refusal into an error.
template <typename Hopper, typename Mma>
void run_on_mainloop(Hopper&& hopper, Mma&& mma) {
  const Mainloop mainloop = requested_mainloop();
  if (mainloop != Mainloop::mma && current_device_is_hopper()) {
    const char* refusal = hopper();
    if (refusal == nullptr) return;
    if (mainloop == Mainloop::wgmma) throw Unsupported(detail::concat("SLATTN_CUDA_MAINLOOP=wgmma: ", refusal));
  } else if (mainloop == Mainloop::wgmma) {
    throw Unsupported(kWgmmaUnavailable);
  }
  mma();
}

}  // namespace

bool sparse_forward(const Geometry& g, const RoutingPlanView& plan, const SparseForwardArgs& args,
                    cudaStream_t stream, const ForwardLinearStep& before) {
  check_sparse_support(g);
  bool terms_added = false;
  run_on_mainloop([&] { return sparse_forward_wgmma(g, plan, args, before, &terms_added, stream); },
                  [&] { sparse_forward_mma(g, plan, args, stream); });
  return terms_added;
}

bool sparse_backward(const Geometry& g, const RoutingPlanView& plan, const SparseBackwardArgs& args,
                     cudaStream_t stream, const KeyGradLinearStep& between) {
  check_sparse_support(g);
  bool terms_added = false;
  run_on_mainloop([&] { return sparse_backward_wgmma(g, plan, args, between, &terms_added, stream); },
                  [&] {
                    sparse_delta(g, args, stream);
                    sparse_backward_mma(g, plan, args, stream);
                    if (between) {  // no dK/dV kernel here adds linear terms: the caller adds them to the rows
                      const KeyGradLinearTerms* terms = between(false);
                      SLATTN_CHECK(terms == nullptr, "sparse_backward: linear terms for the mma.sync dK/dV kernel");
                    }
                  });
  return terms_added;
}

void sparse_delta(const Geometry& g, const SparseBackwardArgs& args, cudaStream_t stream) {
  dispatch_sparse_kernel(args.q.dtype, g, [&](auto tag, auto head_dim, auto, auto) {
    using Element = decltype(tag);
    constexpr int D = decltype(head_dim)::value;
    sparse_delta_kernel<Element, D>
        <<<RowSlice<D>::blocks(g.q_pairs() * g.q_rows(), kThreads), kThreads, 0, stream>>>(g, args);
  });
  SLATTN_LAUNCH_CHECK("sparse_delta_kernel");
}

}  // namespace slattn::cuda
