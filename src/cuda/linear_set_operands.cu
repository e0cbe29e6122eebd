// The Hopper linear kernels' operands (linear_set_operands.h): Z_m per query
// block by set_z_kernel (a warp per block, the kernels' own listing), φ(Q)
// and the denominators by query_features_kernel in row slices (row_ops.cuh),
// H and W rounded to the input dtype.
#include "cuda/linear_set_operands.h"

#include <algorithm>

#include "cuda/common.cuh"
#include "cuda/key_tile_pipeline.cuh"
#include "cuda/row_ops.cuh"
#include "cuda/sparse_kernels.h"
#include "cuda/sparse_mainloops.h"

namespace slattn::cuda {
namespace {

inline constexpr int kSetZThreads = 256;  // a warp per query block

// Z_m of every query block: Σ z_n over the key blocks of U_m, or Z less the
// blocks outside it when those are fewer (LinearSetBlocks' listing); each
// lane sums kDim / 32 features. 0 for an empty U_m.
template <int kDim>
__global__ void __launch_bounds__(kSetZThreads)
    set_z_kernel(Geometry g, RoutingPlanView plan, LinearScope scope, const float* block_z, const float* total_z,
                 float* set_z) {
  constexpr int kPerLane = kDim / kWarpSize;
  const int64_t row = (blockIdx.x * int64_t(kSetZThreads) + threadIdx.x) / kWarpSize;  // (q pair, m)
  if (row >= g.q_pairs() * g.q_blocks) return;
  const int64_t kv_pair = g.kv_pair_of(row / g.q_blocks);
  const int first = threadIdx.x % kWarpSize * kPerLane;
  const LinearSetBlocks blocks{plan, scope};
  const BlockListing listing = blocks.list(row);
  float z[kPerLane];
#pragma unroll
  for (int i = 0; i < kPerLane; ++i) z[i] = 0.0f;
  blocks.visit(row, listing, [&](int32_t n) {
    const float* z_n = block_z + (kv_pair * g.k_blocks + n) * kDim + first;
#pragma unroll
    for (int i = 0; i < kPerLane; ++i) z[i] += z_n[i];
  });
  const float* total = total_z + kv_pair * kDim + first;
#pragma unroll
  for (int i = 0; i < kPerLane; ++i) set_z[row * kDim + first + i] = listing.complement ? total[i] - z[i] : z[i];
}

// φ(q) of every query row rounded to the input dtype into phi_q (dense), and
// φ(q)·Z_m + ε with φ in fp32, in row slices (row_ops.cuh).
template <typename Element, int kDim>
__global__ void __launch_bounds__(kRowThreads)
    query_features_kernel(Geometry g, DeviceView<const Element> q, FeatureMap feature_map, const float* set_z,
                          Element* phi_q, float* denominator) {
  using Slice = RowSlice<kDim>;
  const int64_t flat = Slice::row_of_thread();
  const bool valid = flat < g.q_pairs() * g.q_len;  // lanes past the end compute row 0 alongside, for the reductions
  const int64_t pair = (valid ? flat : 0) / g.q_len, row = (valid ? flat : 0) % g.q_len;
  Slice x, phi, z;
  x.load(q, pair / g.heads, pair % g.heads, row);
  if (feature_map == FeatureMap::softmax) {  // as feature_map_row
    float peak = x.v[0];
#pragma unroll
    for (int i = 1; i < Slice::kPerLane; ++i) peak = fmaxf(peak, x.v[i]);
    peak = Slice::reduce(peak, [](float a, float b) { return fmaxf(a, b); });
    float total = 0.0f;
#pragma unroll
    for (int i = 0; i < Slice::kPerLane; ++i) {
      phi.v[i] = __expf(x.v[i] - peak);
      total += phi.v[i];
    }
    const float inverse = 1.0f / Slice::reduce(total, [](float a, float b) { return a + b; });
#pragma unroll
    for (int i = 0; i < Slice::kPerLane; ++i) phi.v[i] *= inverse;
  } else {
#pragma unroll
    for (int i = 0; i < Slice::kPerLane; ++i) {
      const float value = x.v[i];
      phi.v[i] = feature_map == FeatureMap::elu ? (value > 0.0f ? value + 1.0f : __expf(value)) : fmaxf(value, 0.0f);
    }
  }
  const float* z_row = set_z + (pair * g.q_blocks + row / g.block_q) * kDim + Slice::first();
#pragma unroll
  for (int i = 0; i < Slice::kPerLane; ++i) z.v[i] = z_row[i];
  const float product = phi.dot(z);
  if (!valid) return;
  phi.store(phi_q + flat * kDim);
  if (Slice::first() == 0) denominator[flat] = product + static_cast<float>(kLinearEpsilon);
}

template <typename Element>
__global__ void round_to_element_kernel(const float* source, Element* target, int64_t count) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < count; i += int64_t(gridDim.x) * blockDim.x)
    target[i] = from_float<Element>(source[i]);
}

template <typename Element>
void round_to_element(const float* source, void* target, int64_t count, cudaStream_t stream) {
  constexpr int kThreads = 256;
  const auto blocks = static_cast<unsigned>(std::min<int64_t>(ceil_div(count, kThreads), 1024));
  round_to_element_kernel<<<blocks, kThreads, 0, stream>>>(source, static_cast<Element*>(target), count);
  SLATTN_LAUNCH_CHECK("round_to_element_kernel");
}

// A (batch, heads, length, dim) tensor stored densely in that order.
TensorView dense_rows(void* data, DType dtype, int64_t batch, int64_t heads, int64_t length, int64_t dim) {
  TensorView view;
  view.data = data;
  view.dtype = dtype;
  view.size = {batch, heads, length, dim};
  view.stride = {heads * length * dim, length * dim, dim, 1};
  return view;
}

}  // namespace

LinearSetOperands LinearSetOperands::carve(WorkspaceCarver& carver, const Geometry& g, DType dtype) {
  LinearSetOperands o;
  const auto element_count = [&](int64_t count) { return count * static_cast<int64_t>(dtype_size(dtype)); };
  o.phi_q = carver.take<unsigned char>(element_count(g.q_pairs() * g.q_len * g.dim));
  o.block_h = carver.take<unsigned char>(element_count(g.kv_pairs() * g.k_blocks * g.features * g.dim));
  o.set_z = carver.take<float>(g.q_pairs() * g.q_blocks * g.features);
  o.denominator = carver.take<float>(g.q_pairs() * g.q_len);
  o.total_h = carver.take<unsigned char>(element_count(g.kv_pairs() * g.features * g.dim));
  o.weight = carver.take<unsigned char>(element_count(g.dim * g.dim));
  return o;
}

bool use_hopper_linear(FeatureMap feature_map) {
  return !has_feature_weights(feature_map) && requested_mainloop() != Mainloop::mma && current_device_is_hopper();
}

void prepare_linear_set_operands(const Geometry& g, const RoutingPlanView& plan, const TensorView& q,
                                 FeatureMap feature_map, LinearScope scope, const KeyStates& states,
                                 const float* weight, const LinearSetOperands& operands, cudaStream_t stream) {
  SLATTN_CHECK(g.features == g.dim, "prepare_linear_set_operands: fixed feature maps only");
  dispatch_sparse_kernel(q.dtype, g, [&](auto tag, auto head_dim, auto, auto) {
    using Element = decltype(tag);
    constexpr int D = decltype(head_dim)::value;
    const int64_t set_rows = g.q_pairs() * g.q_blocks;
    set_z_kernel<D><<<static_cast<unsigned>(ceil_div(set_rows * kWarpSize, kSetZThreads)), kSetZThreads, 0,
                      stream>>>(g, plan, scope, states.z, states.total_z, operands.set_z);
    SLATTN_LAUNCH_CHECK("set_z_kernel");
    query_features_kernel<Element, D><<<RowSlice<D>::blocks(g.q_pairs() * g.q_len, kRowThreads), kRowThreads, 0,
                                        stream>>>(g, DeviceView<const Element>::of(q), feature_map, operands.set_z,
                                                  static_cast<Element*>(operands.phi_q), operands.denominator);
    SLATTN_LAUNCH_CHECK("query_features_kernel");
    round_to_element<Element>(states.total_h, operands.total_h, g.kv_pairs() * D * D, stream);
    if (weight) round_to_element<Element>(weight, operands.weight, D * D, stream);
  });
}

LinearSetMaps linear_set_maps(const Geometry& g, DType dtype, const LinearSetOperands& operands) {
  const int64_t d = g.dim;
  LinearSetMaps maps;
  const bool packed =
      make_row_tile_map(dense_rows(operands.phi_q, dtype, g.batch, g.heads, g.q_len, d), static_cast<int>(g.block_q),
                        &maps.phi_q) &&
      make_row_tile_map(dense_rows(operands.block_h, dtype, 1, g.kv_pairs() * g.k_blocks, d, d), static_cast<int>(d),
                        &maps.states) &&
      make_row_tile_map(dense_rows(operands.total_h, dtype, g.batch, g.kv_heads, d, d), static_cast<int>(d),
                        &maps.h) &&
      make_row_tile_map(dense_rows(operands.weight, dtype, 1, 1, d, d), static_cast<int>(d), &maps.w);
  SLATTN_CHECK(packed, "linear_set_maps: the tile copy engine refused a workspace buffer");
  return maps;
}

}  // namespace slattn::cuda
