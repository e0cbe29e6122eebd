// The Hopper linear kernels' operands (linear_set_operands.h): Z_m per query
// block (and dz_n per key block) by listed_sums_kernel (a warp per line of the
// block map), φ(Q) and the denominators by query_features_kernel in row slices
// (row_ops.cuh), H_m by the linear set's product (linear_set_states.h), W
// rounded to the input dtype.
#include "cuda/linear_set_operands.h"

#include <algorithm>

#include "cuda/common.cuh"
#include "cuda/linear_set_states.h"
#include "cuda/row_ops.cuh"
#include "cuda/sparse_kernels.h"
#include "cuda/sparse_mainloops.h"
#include "cuda/subset_list.cuh"

namespace slattn::cuda {
namespace {

// A line of the block map as listed_sums reads it (LinearSetLine): a row,
// the key blocks of the linear set U_m of SPEC section 3, or a column, the
// query blocks m whose U_m holds key block n (`line` then the plan column,
// q pair * Nk + n), read 256 entries a pass by one warp; list(line) (on every
// lane) counts them, or the blocks outside the set when those are fewer (a
// sum of them is then subtracted from the total: the same rule as
// subset_list.cuh's), and visit(line, listing, on_block) visits the listed
// ones in ascending order.
struct BlockListing {
  int32_t count;
  bool complement;  // the blocks outside the set
};

enum class MapLine { row, column };

template <MapLine kLine>
struct LinearSetLine {
  // Map entries each lane reads at once (independent loads) per pass of the warp.
  static constexpr int kReads = 8;
  RoutingPlanView plan;
  LinearScope scope;

  __device__ __forceinline__ BlockListing list(int64_t row) const {
    const int64_t count = length();
    int32_t included = 0;
    for (int64_t base = 0; base < count; base += kReads * kWarpSize) {
      bool in_set[kReads];
      read(row, base, in_set);
#pragma unroll
      for (int u = 0; u < kReads; ++u) included += __popc(__ballot_sync(0xffffffffu, in_set[u]));
    }
    const auto excluded = static_cast<int32_t>(count - included);
    return excluded < included ? BlockListing{excluded, true} : BlockListing{included, false};
  }
  // on_block(n) on every lane, for each listed key block n in ascending order.
  template <typename OnBlock>
  __device__ __forceinline__ void visit(int64_t row, BlockListing listing, OnBlock&& on_block) const {
    for_each_chunk(row, listing, [&](int64_t chunk, uint32_t mask) {
      for (; mask != 0; mask &= mask - 1) on_block(static_cast<int32_t>(chunk + __ffs(mask) - 1));
    });
  }

 private:
  // Entries of a line: key blocks of a row, query blocks of a column.
  __device__ __forceinline__ int64_t length() const {
    return kLine == MapLine::row ? plan.shape.k_blocks() : plan.shape.q_blocks();
  }

  // fn(chunk, mask) for each run of 32 blocks from `chunk` with a listed one: bit j of mask for chunk + j.
  template <typename Fn>
  __device__ __forceinline__ void for_each_chunk(int64_t row, BlockListing listing, Fn&& fn) const {
    const int64_t count = length();
    for (int64_t base = 0; base < count; base += kReads * kWarpSize) {
      bool in_set[kReads];
      read(row, base, in_set);
#pragma unroll
      for (int u = 0; u < kReads; ++u) {
        const int64_t chunk = base + u * kWarpSize;
        const bool listed = chunk + threadIdx.x % kWarpSize < count && in_set[u] != listing.complement;
        const uint32_t mask = __ballot_sync(0xffffffffu, listed);
        if (mask != 0) fn(chunk, mask);
      }
    }
  }

  // Whether blocks base + 32 u + lane of the line are in the set (false past the end).
  __device__ __forceinline__ void read(int64_t row, int64_t base, bool (&in_set)[kReads]) const {
    const int64_t count = length(), k_blocks = plan.shape.k_blocks();
    const int64_t stride = kLine == MapLine::row ? 1 : k_blocks;
    const int8_t* map = plan.block_map + (kLine == MapLine::row ? row * k_blocks
                                                                : row / k_blocks * count * k_blocks + row % k_blocks);
    int8_t cls[kReads];
#pragma unroll
    for (int u = 0; u < kReads; ++u) {
      const int64_t n = base + u * kWarpSize + threadIdx.x % kWarpSize;
      cls[u] = n < count ? map[n * stride] : kNegligible;
    }
#pragma unroll
    for (int u = 0; u < kReads; ++u) {
      const int64_t n = base + u * kWarpSize + threadIdx.x % kWarpSize;
      in_set[u] = n < count && in_linear_set(cls[u], scope);
    }
  }
};

inline constexpr int kSetSumThreads = 256;  // a warp per line of the block map

// Per line of the block map, the per-block vectors of the listed blocks summed
// (LinearSetLine's listing), or the total less them when those are the
// blocks outside the set; each lane sums kDim / 32 features. Rows (query
// blocks): Z_m from the key blocks' z_n and Z. Columns (key blocks): dz_n
// from the query blocks' dZ_m and their total, over the query heads of the
// GQA group. 0 for an empty set.
template <int kDim, MapLine kLine>
__global__ void __launch_bounds__(kSetSumThreads)
    listed_sums_kernel(Geometry g, RoutingPlanView plan, LinearScope scope, const float* block_vectors,
                       const float* totals, float* sums) {
  constexpr int kPerLane = kDim / kWarpSize;
  constexpr bool kRows = kLine == MapLine::row;
  const int64_t line = (blockIdx.x * int64_t(kSetSumThreads) + threadIdx.x) / kWarpSize;
  if (line >= (kRows ? g.q_pairs() * g.q_blocks : g.kv_pairs() * g.k_blocks)) return;
  const int first = threadIdx.x % kWarpSize * kPerLane;
  const LinearSetLine<kLine> blocks{plan, scope};
  float sum[kPerLane];
#pragma unroll
  for (int i = 0; i < kPerLane; ++i) sum[i] = 0.0f;
  const int64_t members = kRows ? 1 : g.group();
  for (int64_t member = 0; member < members; ++member) {
    // The line of the plan, whose blocks' vectors start at `vectors`, and its total.
    int64_t plan_line, vectors, total;
    if constexpr (kRows) {
      const int64_t kv_pair = g.kv_pair_of(line / g.q_blocks);
      plan_line = line, vectors = kv_pair * g.k_blocks, total = kv_pair;
    } else {
      const int64_t kv_pair = line / g.k_blocks, n = line % g.k_blocks;
      const int64_t q_pair = kv_pair / g.kv_heads * g.heads + kv_pair % g.kv_heads * g.group() + member;
      plan_line = q_pair * g.k_blocks + n, vectors = q_pair * g.q_blocks, total = q_pair;
    }
    const BlockListing listing = blocks.list(plan_line);
    float listed[kPerLane];
#pragma unroll
    for (int i = 0; i < kPerLane; ++i) listed[i] = 0.0f;
    blocks.visit(plan_line, listing, [&](int32_t index) {
      const float* vector = block_vectors + (vectors + index) * kDim + first;
#pragma unroll
      for (int i = 0; i < kPerLane; ++i) listed[i] += vector[i];
    });
    const float* whole = totals + total * kDim + first;
#pragma unroll
    for (int i = 0; i < kPerLane; ++i) sum[i] += listing.complement ? whole[i] - listed[i] : listed[i];
  }
#pragma unroll
  for (int i = 0; i < kPerLane; ++i) sums[line * kDim + first + i] = sum[i];
}

template <MapLine kLine>
void listed_sums(const Geometry& g, const RoutingPlanView& plan, LinearScope scope, const float* block_vectors,
                 const float* totals, float* sums, cudaStream_t stream) {
  const int64_t lines = kLine == MapLine::row ? g.q_pairs() * g.q_blocks : g.kv_pairs() * g.k_blocks;
  const auto blocks = static_cast<unsigned>(ceil_div(lines * kWarpSize, kSetSumThreads));
  if (g.features == 64) {
    listed_sums_kernel<64, kLine><<<blocks, kSetSumThreads, 0, stream>>>(g, plan, scope, block_vectors, totals, sums);
  } else {
    SLATTN_CHECK(g.features == 128, "listed_sums: 64 or 128 features");
    listed_sums_kernel<128, kLine><<<blocks, kSetSumThreads, 0, stream>>>(g, plan, scope, block_vectors, totals,
                                                                          sums);
  }
  SLATTN_LAUNCH_CHECK("listed_sums_kernel");
}

// φ of one row slice (SPEC section 3), in fp32.
template <int kDim>
__device__ __forceinline__ RowSlice<kDim> feature_slice(FeatureMap feature_map, const RowSlice<kDim>& x) {
  using Slice = RowSlice<kDim>;
  Slice phi;
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
  return phi;
}

// Query rows a thread takes, their loads issued together: one row's 16 bytes a thread left the memory
// system half idle.
inline constexpr int kFeatureRowsPerThread = 2;

// φ(q) of every query row rounded to the input dtype into phi_q (dense), and
// φ(q)·Z_m + ε with φ in fp32, in row slices (row_ops.cuh); a thread's rows
// are a grid's worth of rows apart.
template <typename Element, int kDim>
__global__ void __launch_bounds__(kRowThreads)
    query_features_kernel(Geometry g, DeviceView<const Element> q, FeatureMap feature_map, const float* set_z,
                          Element* phi_q, float* denominator) {
  using Slice = RowSlice<kDim>;
  constexpr int kRows = kFeatureRowsPerThread;
  const int64_t rows = g.q_pairs() * g.q_len, stride = int64_t(gridDim.x) * blockDim.x / Slice::kLanes;
  int64_t flat[kRows];
  Slice x[kRows], z[kRows];
#pragma unroll
  for (int r = 0; r < kRows; ++r) {
    flat[r] = Slice::row_of_thread() + r * stride;
    // Lanes past the end compute row 0 alongside, for the reductions.
    const int64_t at = flat[r] < rows ? flat[r] : 0, pair = at / g.q_len, row = at % g.q_len;
    x[r].load(q, pair / g.heads, pair % g.heads, row);
    const float* z_row = set_z + (pair * g.q_blocks + row / g.block_q) * kDim + Slice::first();
#pragma unroll
    for (int i = 0; i < Slice::kPerLane; ++i) z[r].v[i] = z_row[i];
  }
#pragma unroll
  for (int r = 0; r < kRows; ++r) {
    const Slice phi = feature_slice(feature_map, x[r]);
    const float product = phi.dot(z[r]);
    if (flat[r] >= rows) continue;
    phi.store(phi_q + flat[r] * kDim);
    if (Slice::first() == 0) denominator[flat[r]] = product + static_cast<float>(kLinearEpsilon);
  }
}

template <typename Source, typename Target>
__global__ void convert_elements_kernel(const Source* source, Target* target, int64_t count) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < count; i += int64_t(gridDim.x) * blockDim.x)
    target[i] = from_float<Target>(to_float(source[i]));
}

template <typename Source, typename Target>
void convert_elements(const Source* source, Target* target, int64_t count, cudaStream_t stream) {
  constexpr int kThreads = 256;
  const auto blocks = static_cast<unsigned>(std::min<int64_t>(ceil_div(count, kThreads), 1024));
  convert_elements_kernel<<<blocks, kThreads, 0, stream>>>(source, target, count);
  SLATTN_LAUNCH_CHECK("convert_elements_kernel");
}

}  // namespace

void round_to_dtype(const float* source, void* target, DType dtype, int64_t count, cudaStream_t stream) {
  dispatch_element(dtype, [&](auto tag) {
    convert_elements(source, static_cast<decltype(tag)*>(target), count, stream);
  });
}

TensorView dense_rows(void* data, DType dtype, int64_t batch, int64_t heads, int64_t length, int64_t dim) {
  TensorView view;
  view.data = data;
  view.dtype = dtype;
  view.size = {batch, heads, length, dim};
  view.stride = {heads * length * dim, length * dim, dim, 1};
  return view;
}

LinearSetOperands LinearSetOperands::carve(WorkspaceCarver& carver, const Geometry& g, DType dtype, bool query_rows) {
  LinearSetOperands o;
  const auto element_count = [&](int64_t count) { return count * static_cast<int64_t>(dtype_size(dtype)); };
  if (query_rows) {
    o.phi_q = carver.take<unsigned char>(element_count(g.q_pairs() * g.q_len * g.dim));
    o.denominator = carver.take<float>(g.q_pairs() * g.q_len);
  }
  o.block_h = carver.take<unsigned char>(element_count(g.kv_pairs() * key_blocks_padded(g) * g.features * g.dim));
  o.set_z = carver.take<float>(g.q_pairs() * g.q_blocks * g.features);
  o.indicator = carver.take<unsigned char>(element_count(g.kv_pairs() * set_rows_padded(g) * key_blocks_padded(g)));
  o.set_size = carver.take<int32_t>(g.q_pairs() * g.q_blocks);
  o.set_h = carver.take<unsigned char>(element_count(g.q_pairs() * g.q_blocks * g.features * g.dim));
  o.weight = carver.take<unsigned char>(element_count(g.dim * g.dim));
  o.cublas_workspace = carver.take<unsigned char>(kCublasWorkspaceBytes);
  return o;
}

bool use_hopper_linear(FeatureMap feature_map) {
  return !has_feature_weights(feature_map) && requested_mainloop() != Mainloop::mma && current_device_is_hopper();
}

void prepare_linear_set_states(const Geometry& g, const RoutingPlanView& plan, DType dtype, LinearScope scope,
                               const KeyStates& states, const float* weight, const LinearSetOperands& operands,
                               cudaStream_t stream) {
  SLATTN_CHECK(g.features == g.dim, "prepare_linear_set_states: fixed feature maps only");
  listed_sums<MapLine::row>(g, plan, scope, states.z, states.total_z, operands.set_z, stream);
  linear_set_indicator(g, plan, scope, dtype, operands.indicator, operands.set_size, stream);
  sum_set_states(g, dtype, operands.indicator, operands.block_h, operands.set_h, operands.cublas_workspace, stream);
  if (weight) round_to_dtype(weight, operands.weight, dtype, g.dim * g.dim, stream);
}

void prepare_linear_set_operands(const Geometry& g, const RoutingPlanView& plan, const TensorView& q,
                                 FeatureMap feature_map, LinearScope scope, const KeyStates& states,
                                 const float* weight, const LinearSetOperands& operands, cudaStream_t stream) {
  SLATTN_CHECK(operands.phi_q != nullptr, "prepare_linear_set_operands: carved without query rows");
  prepare_linear_set_states(g, plan, q.dtype, scope, states, weight, operands, stream);
  dispatch_sparse_kernel(q.dtype, g, [&](auto tag, auto head_dim, auto, auto) {
    using Element = decltype(tag);
    constexpr int D = decltype(head_dim)::value;
    const int64_t rows = ceil_div(g.q_pairs() * g.q_len, kFeatureRowsPerThread);
    query_features_kernel<Element, D><<<RowSlice<D>::blocks(rows, kRowThreads), kRowThreads, 0,
                                        stream>>>(g, DeviceView<const Element>::of(q), feature_map, operands.set_z,
                                                  static_cast<Element*>(operands.phi_q), operands.denominator);
    SLATTN_LAUNCH_CHECK("query_features_kernel");
  });
}

RowTileMap state_tiles_map(const void* tiles, DType dtype, int64_t count, int64_t dim) {
  RowTileMap map;
  SLATTN_CHECK(make_row_tile_map(dense_rows(const_cast<void*>(tiles), dtype, 1, count, dim, dim),
                                 static_cast<int>(dim), &map),
               "the tile copy engine refused a buffer of D x D tiles");
  return map;
}

LinearSetMaps linear_set_maps(const Geometry& g, DType dtype, const LinearSetOperands& operands) {
  LinearSetMaps maps;
  SLATTN_CHECK(operands.phi_q == nullptr ||
                   make_row_tile_map(dense_rows(operands.phi_q, dtype, g.batch, g.heads, g.q_len, g.dim),
                                     static_cast<int>(g.block_q), &maps.phi_q),
               "linear_set_maps: the tile copy engine refused the phi(Q) rows");
  maps.set_h = state_tiles_map(operands.set_h, dtype, g.q_pairs() * g.q_blocks, g.dim);
  maps.w = state_tiles_map(operands.weight, dtype, 1, g.dim);
  return maps;
}

void key_block_dz(const Geometry& g, const RoutingPlanView& plan, LinearScope scope, const float* dz_query,
                  const float* dz_total, float* dz_key, cudaStream_t stream) {
  listed_sums<MapLine::column>(g, plan, scope, dz_query, dz_total, dz_key, stream);
}

}  // namespace slattn::cuda
