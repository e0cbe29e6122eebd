#include "cuda/linear_kernels.h"
#include "cuda/row_ops.cuh"
#include "cuda/subset_list.cuh"
#include "cuda/sla_cuda.h"

namespace slattn::cuda {
namespace {

template <typename Element>
__global__ void feature_rows_kernel(DeviceView<const Element> x, int64_t heads, int64_t length, int64_t rows_padded,
                                    int64_t dim, FeatureMap feature_map, float* phi, float* raw, int64_t pairs) {
  RowIndex at;
  if (!RowIndex::of(pairs, rows_padded, at)) return;
  WarpRow value{};
  if (at.row < length) value.load(x, at.pair / heads, at.pair % heads, at.row, dim);
  const int64_t offset = (at.pair * rows_padded + at.row) * dim;
  if (raw) value.store(raw + offset, dim);
  if (phi) {
    WarpRow mapped = feature_map_row(feature_map, value, dim);
    if (at.row >= length) mapped = WarpRow{};  // pad rows stay zero, also under softmax and elu
    mapped.store(phi + offset, dim);
  }
}

// sum[c] += at[c] for kVector adjacent columns: one 16-byte load, or one element.
template <int kVector>
__device__ __forceinline__ void add_columns(float (&sum)[kVector], const float* at) {
  if constexpr (kVector == 1) {
    sum[0] += at[0];
  } else {
    static_assert(sizeof(float) * kVector == 16, "one 16-byte unit");
    const uint4 unit = *reinterpret_cast<const uint4*>(at);
    const float* values = reinterpret_cast<const float*>(&unit);
#pragma unroll
    for (int c = 0; c < kVector; ++c) sum[c] += values[c];
  }
}

constexpr int kColumnSumThreads = 256;

// A block per (batch, 32 kVector adjacent columns): lane l of every warp takes columns kVector l.., and
// each warp a share of the rows (w, w + warps, ...) with kLanes partial sums in flight; the warps' sums
// are then added in a fixed order. Tall, narrow arrays (z totals, bias partials) so get 8 warps on
// their rows instead of one thread a column walking all of them.
template <int kVector>
__global__ void __launch_bounds__(kColumnSumThreads)
    column_sums_kernel(const float* src, int64_t rows, int64_t width, float* dst) {
  constexpr int kWarps = kColumnSumThreads / kWarpSize, kLanes = 4, kBlockColumns = kWarpSize * kVector;
  __shared__ float warp_sums[kWarps][kBlockColumns];
  const int64_t column_blocks = ceil_div(width, int64_t(kBlockColumns));
  const int64_t batch = blockIdx.x / column_blocks, first = blockIdx.x % column_blocks * kBlockColumns;
  const int lane = threadIdx.x % kWarpSize, warp = threadIdx.x / kWarpSize;
  const int64_t col = first + lane * kVector;
  float partial[kLanes][kVector] = {};
  if (col < width) {
    const float* column = src + batch * rows * width + col;
    int64_t r = warp;
    for (; r + (kLanes - 1) * kWarps < rows; r += kLanes * kWarps) {
#pragma unroll
      for (int j = 0; j < kLanes; ++j) add_columns<kVector>(partial[j], column + (r + j * kWarps) * width);
    }
    for (; r < rows; r += kWarps) add_columns<kVector>(partial[0], column + r * width);
  }
#pragma unroll
  for (int c = 0; c < kVector; ++c)
    warp_sums[warp][lane * kVector + c] = (partial[0][c] + partial[1][c]) + (partial[2][c] + partial[3][c]);
  __syncthreads();
  for (int i = threadIdx.x; i < kBlockColumns && first + i < width; i += kColumnSumThreads) {
    float sum = 0.0f;
#pragma unroll
    for (int w = 0; w < kWarps; ++w) sum += warp_sums[w][i];
    dst[batch * width + first + i] = sum;
  }
}

// grid: one block per (query pair, query block); shared: subset_list_bytes(Nk).
__global__ void assemble_query_states_kernel(Geometry g, const int8_t* block_map, LinearScope scope,
                                             const float* key_h, const float* key_z, const float* total_h,
                                             const float* total_z, QueryStates out) {
  extern __shared__ int32_t list_rows[];
  const int64_t row = blockIdx.x;  // q_pair * Mq + m
  const int64_t kv_pair = g.kv_pair_of(row / g.q_blocks);
  const int8_t* map = block_map + row * g.k_blocks;
  SubsetList list{list_rows};
  build_subset_list(g.k_blocks, [&](int64_t n) { return in_linear_set(map[n], scope); }, list);
  if (threadIdx.x == 0) out.non_empty[row] = list.included > 0;
  const int64_t state = g.features * g.dim;
  for (int64_t e = threadIdx.x; e < state; e += blockDim.x)
    out.h[row * state + e] =
        subset_sum(list, key_h + kv_pair * g.k_blocks * state, state, total_h + kv_pair * state, e);
  for (int64_t f = threadIdx.x; f < g.features; f += blockDim.x)
    out.z[row * g.features + f] = subset_sum(list, key_z + kv_pair * g.k_blocks * g.features, g.features,
                                             total_z + kv_pair * g.features, f);
}

template <typename Element>
__global__ void linear_output_kernel(Geometry g, const float* phi_q, QueryStates states, float* ol,
                                     DeviceView<Element> out_linear) {
  RowIndex at;
  if (!RowIndex::of(g.q_pairs(), g.q_rows(), at)) return;
  const int64_t block = at.pair * g.q_blocks + at.row / g.block_q;
  const int64_t offset = (at.pair * g.q_rows() + at.row) * g.dim;
  WarpRow numerator, phi, z;
  numerator.load(ol + offset, g.dim);
  phi.load(phi_q + (at.pair * g.q_rows() + at.row) * g.features, g.features);
  z.load(states.z + block * g.features, g.features);
  const float denominator = phi.dot(z) + static_cast<float>(kLinearEpsilon);
  const bool live = at.row < g.q_len && states.non_empty[block];
  WarpRow result;
#pragma unroll
  for (int t = 0; t < kMaxPerLane; ++t) result.v[t] = live ? numerator.v[t] / denominator : 0.0f;
  result.store(ol + offset, g.dim);
  if (out_linear.defined() && at.row < g.q_len) {
#pragma unroll
    for (int t = 0; t < kMaxPerLane; ++t)
      if (WarpRow::index(t) < g.dim)
        out_linear.store(at.pair / g.heads, at.pair % g.heads, at.row, WarpRow::index(t), result.v[t]);
  }
}

template <typename Element>
__global__ void store_rows_kernel(const float* rows, int64_t heads, int64_t length, int64_t rows_padded, int64_t dim,
                                  const float* bias, DeviceView<Element> out, int64_t pairs) {
  RowIndex at;
  if (!RowIndex::of(pairs, rows_padded, at) || at.row >= length) return;
  const float* row = rows + (at.pair * rows_padded + at.row) * dim;
  for (int64_t d = threadIdx.x % kWarpSize; d < dim; d += kWarpSize)
    out.store(at.pair / heads, at.pair % heads, at.row, d, row[d] + (bias ? bias[d] : 0.0f));
}

template <typename Element>
__global__ void linear_row_grads_kernel(Geometry g, const float* phi_q, QueryStates states, const float* ol,
                                        const float* dol_from_proj, DeviceView<const Element> dout_linear,
                                        float* grad_g, float* grad_c) {
  RowIndex at;
  if (!RowIndex::of(g.q_pairs(), g.q_rows(), at)) return;
  const int64_t block = at.pair * g.q_blocks + at.row / g.block_q;
  const int64_t offset = (at.pair * g.q_rows() + at.row) * g.dim;
  const bool live = at.row < g.q_len && states.non_empty[block];
  WarpRow dol{}, out, phi, z;
  if (dol_from_proj) dol.load(dol_from_proj + offset, g.dim);
  if (dout_linear.defined() && at.row < g.q_len) {
    WarpRow extra;
    extra.load(dout_linear, at.pair / g.heads, at.pair % g.heads, at.row, g.dim);
#pragma unroll
    for (int t = 0; t < kMaxPerLane; ++t) dol.v[t] += extra.v[t];
  }
  out.load(ol + offset, g.dim);
  phi.load(phi_q + (at.pair * g.q_rows() + at.row) * g.features, g.features);
  z.load(states.z + block * g.features, g.features);
  const float denominator = phi.dot(z) + static_cast<float>(kLinearEpsilon);
  const float c = dol.dot(out) / denominator;
  WarpRow grad;
#pragma unroll
  for (int t = 0; t < kMaxPerLane; ++t) grad.v[t] = live ? dol.v[t] / denominator : 0.0f;
  grad.store(grad_g + offset, g.dim);
  if (threadIdx.x % kWarpSize == 0) grad_c[at.pair * g.q_rows() + at.row] = live ? c : 0.0f;
}

template <typename Element>
__global__ void linear_query_grad_kernel(Geometry g, DeviceView<const Element> q, FeatureMap feature_map,
                                         const float* phi_q, float* dqphi, const float* grad_c, QueryStates states,
                                         float* dq) {
  RowIndex at;
  if (!RowIndex::of(g.q_pairs(), g.q_rows(), at) || at.row >= g.q_len) return;
  const int64_t block = at.pair * g.q_blocks + at.row / g.block_q;
  const int64_t row = at.pair * g.q_rows() + at.row;
  WarpRow phi, dphi, z;
  phi.load(phi_q + row * g.features, g.features);
  dphi.load(dqphi + row * g.features, g.features);
  z.load(states.z + block * g.features, g.features);
  const float c = grad_c[row];
#pragma unroll
  for (int t = 0; t < kMaxPerLane; ++t) dphi.v[t] -= c * z.v[t];
  if (feature_map == FeatureMap::hedgehog) {
    hedgehog_pre_grad_row(phi, dphi, g.dim, dqphi + row * g.features);
    return;
  }
  WarpRow x;
  x.load(q, at.pair / g.heads, at.pair % g.heads, at.row, g.dim);
  const WarpRow dx = feature_map_backward_row(feature_map, x, phi, dphi);
  WarpRow acc;
  acc.load(dq + row * g.dim, g.dim);
#pragma unroll
  for (int t = 0; t < kMaxPerLane; ++t) acc.v[t] += dx.v[t];
  acc.store(dq + row * g.dim, g.dim);
}

// grid: one block per (query pair, query block); thread per feature.
__global__ void query_z_grads_kernel(Geometry g, const float* phi_q, const float* grad_c, float* dz) {
  const int64_t block = blockIdx.x;
  const int64_t first = (block / g.q_blocks) * g.q_rows() + (block % g.q_blocks) * g.block_q;
  for (int64_t f = threadIdx.x; f < g.features; f += blockDim.x) {
    float sum = 0.0f;
    for (int64_t i = 0; i < g.block_q; ++i) sum += grad_c[first + i] * phi_q[(first + i) * g.features + f];
    dz[block * g.features + f] = -sum;
  }
}

// grid: one block per (kv pair, key block); shared: subset_list_bytes(Mq).
__global__ void key_state_grads_kernel(Geometry g, const int8_t* block_map, LinearScope scope, const float* dh_query,
                                       const float* dz_query, const float* dh_total, const float* dz_total,
                                       float* dh_key, float* dz_key) {
  extern __shared__ int32_t list_rows[];
  const int64_t column = blockIdx.x;  // kv_pair * Nk + n
  const int64_t kv_pair = column / g.k_blocks, n = column % g.k_blocks;
  const int64_t b = kv_pair / g.kv_heads, kv = kv_pair % g.kv_heads;
  const int64_t state = g.features * g.dim;
  for (int64_t e = threadIdx.x; e < state + g.features; e += blockDim.x)
    (e < state ? dh_key[column * state + e] : dz_key[column * g.features + e - state]) = 0.0f;
  for (int64_t member = 0; member < g.group(); ++member) {
    const int64_t q_pair = b * g.heads + kv * g.group() + member;
    const int8_t* map = block_map + q_pair * g.q_blocks * g.k_blocks + n;
    SubsetList list{list_rows};
    build_subset_list(g.q_blocks, [&](int64_t m) { return in_linear_set(map[m * g.k_blocks], scope); }, list);
    for (int64_t e = threadIdx.x; e < state; e += blockDim.x)
      dh_key[column * state + e] += subset_sum(list, dh_query + q_pair * g.q_blocks * state, state,
                                               dh_total + q_pair * state, e);
    for (int64_t f = threadIdx.x; f < g.features; f += blockDim.x)
      dz_key[column * g.features + f] += subset_sum(list, dz_query + q_pair * g.q_blocks * g.features, g.features,
                                                    dz_total + q_pair * g.features, f);
  }
}

template <typename Element>
__global__ void linear_key_grad_kernel(Geometry g, DeviceView<const Element> k, FeatureMap feature_map,
                                       const float* phi_k, float* dkphi, const float* dz_key, float* dk) {
  RowIndex at;
  if (!RowIndex::of(g.kv_pairs(), g.k_rows(), at) || at.row >= g.k_len) return;
  const int64_t row = at.pair * g.k_rows() + at.row;
  const int64_t block = at.pair * g.k_blocks + at.row / g.block_k;
  WarpRow phi, dphi, dz;
  phi.load(phi_k + row * g.features, g.features);
  dphi.load(dkphi + row * g.features, g.features);
  dz.load(dz_key + block * g.features, g.features);
#pragma unroll
  for (int t = 0; t < kMaxPerLane; ++t) dphi.v[t] += dz.v[t];
  if (feature_map == FeatureMap::hedgehog) {
    hedgehog_pre_grad_row(phi, dphi, g.dim, dkphi + row * g.features);
    return;
  }
  WarpRow x;
  x.load(k, at.pair / g.kv_heads, at.pair % g.kv_heads, at.row, g.dim);
  const WarpRow dx = feature_map_backward_row(feature_map, x, phi, dphi);
  WarpRow acc;
  acc.load(dk + row * g.dim, g.dim);
#pragma unroll
  for (int t = 0; t < kMaxPerLane; ++t) acc.v[t] += dx.v[t];
  acc.store(dk + row * g.dim, g.dim);
}

}  // namespace

void feature_rows(const TensorView& x, int64_t rows_padded, FeatureMap feature_map, float* phi, float* raw,
                  cudaStream_t stream) {
  SLATTN_CHECK(phi == nullptr || !has_feature_weights(feature_map),
               "feature_rows: a learnable feature map needs its weights (hedgehog_rows)");
  const int64_t pairs = x.batch() * x.heads();
  dispatch_element(x.dtype, [&](auto tag) {
    using Element = decltype(tag);
    feature_rows_kernel<Element><<<row_blocks(pairs * rows_padded), kRowThreads, 0, stream>>>(
        DeviceView<const Element>::of(x), x.heads(), x.length(), rows_padded, x.head_dim(), feature_map, phi, raw,
        pairs);
  });
  SLATTN_LAUNCH_CHECK("feature_rows_kernel");
}

void column_sums(const float* src, int64_t batches, int64_t rows, int64_t width, float* dst, cudaStream_t stream) {
  constexpr int kVector = 16 / sizeof(float);  // a 16-byte load
  const bool vectors = width % kVector == 0 && reinterpret_cast<uintptr_t>(src) % 16 == 0;
  const int64_t block_columns = kWarpSize * (vectors ? kVector : 1);
  const auto blocks = static_cast<unsigned>(batches * ceil_div(width, block_columns));
  if (vectors)
    column_sums_kernel<kVector><<<blocks, kColumnSumThreads, 0, stream>>>(src, rows, width, dst);
  else
    column_sums_kernel<1><<<blocks, kColumnSumThreads, 0, stream>>>(src, rows, width, dst);
  SLATTN_LAUNCH_CHECK("column_sums_kernel");
}

void assemble_query_states(const Geometry& g, const RoutingPlanView& plan, LinearScope scope, const float* key_h,
                           const float* key_z, const float* total_h, const float* total_z, QueryStates out,
                           cudaStream_t stream) {
  const size_t shared = subset_list_bytes(g.k_blocks);
  assemble_query_states_kernel<<<static_cast<unsigned>(g.q_pairs() * g.q_blocks), 256, shared, stream>>>(
      g, plan.block_map, scope, key_h, key_z, total_h, total_z, out);
  SLATTN_LAUNCH_CHECK("assemble_query_states_kernel");
}

void linear_output(const Geometry& g, const float* phi_q, QueryStates states, float* ol, const TensorView& out_linear,
                   cudaStream_t stream) {
  dispatch_element(out_linear.defined() ? out_linear.dtype : DType::bfloat16, [&](auto tag) {
    using Element = decltype(tag);
    linear_output_kernel<Element><<<row_blocks(g.q_pairs() * g.q_rows()), kRowThreads, 0, stream>>>(
        g, phi_q, states, ol, DeviceView<Element>::of(out_linear));
  });
  SLATTN_LAUNCH_CHECK("linear_output_kernel");
}

void combine_output(const Geometry& g, const float* pre, const float* bias, const TensorView& out,
                    cudaStream_t stream) {
  dispatch_element(out.dtype, [&](auto tag) {
    using Element = decltype(tag);
    store_rows_kernel<Element><<<row_blocks(g.q_pairs() * g.q_rows()), kRowThreads, 0, stream>>>(
        pre, g.heads, g.q_len, g.q_rows(), g.dim, bias, DeviceView<Element>::of(out), g.q_pairs());
  });
  SLATTN_LAUNCH_CHECK("store_rows_kernel (combine)");
}

void store_rows(const float* rows, int64_t rows_padded, const TensorView& out, cudaStream_t stream) {
  const int64_t pairs = out.batch() * out.heads();
  dispatch_element(out.dtype, [&](auto tag) {
    using Element = decltype(tag);
    store_rows_kernel<Element><<<row_blocks(pairs * rows_padded), kRowThreads, 0, stream>>>(
        rows, out.heads(), out.length(), rows_padded, out.head_dim(), nullptr, DeviceView<Element>::of(out), pairs);
  });
  SLATTN_LAUNCH_CHECK("store_rows_kernel");
}

void linear_row_grads(const Geometry& g, const float* phi_q, QueryStates states, const float* ol,
                      const float* dol_from_proj, const TensorView& dout_linear, float* grad_g, float* grad_c,
                      cudaStream_t stream) {
  dispatch_element(dout_linear.defined() ? dout_linear.dtype : DType::bfloat16, [&](auto tag) {
    using Element = decltype(tag);
    linear_row_grads_kernel<Element><<<row_blocks(g.q_pairs() * g.q_rows()), kRowThreads, 0, stream>>>(
        g, phi_q, states, ol, dol_from_proj, DeviceView<const Element>::of(dout_linear), grad_g, grad_c);
  });
  SLATTN_LAUNCH_CHECK("linear_row_grads_kernel");
}

void linear_query_grad(const Geometry& g, const TensorView& q, FeatureMap feature_map, const float* phi_q,
                       float* dqphi, const float* grad_c, QueryStates states, float* dq, cudaStream_t stream) {
  dispatch_element(q.dtype, [&](auto tag) {
    using Element = decltype(tag);
    linear_query_grad_kernel<Element><<<row_blocks(g.q_pairs() * g.q_rows()), kRowThreads, 0, stream>>>(
        g, DeviceView<const Element>::of(q), feature_map, phi_q, dqphi, grad_c, states, dq);
  });
  SLATTN_LAUNCH_CHECK("linear_query_grad_kernel");
}

void query_z_grads(const Geometry& g, const float* phi_q, const float* grad_c, float* dz, cudaStream_t stream) {
  query_z_grads_kernel<<<static_cast<unsigned>(g.q_pairs() * g.q_blocks), 128, 0, stream>>>(g, phi_q, grad_c, dz);
  SLATTN_LAUNCH_CHECK("query_z_grads_kernel");
}

void key_state_grads(const Geometry& g, const RoutingPlanView& plan, LinearScope scope, const float* dh_query,
                     const float* dz_query, const float* dh_total, const float* dz_total, float* dh_key,
                     float* dz_key, cudaStream_t stream) {
  const size_t shared = subset_list_bytes(g.q_blocks);
  key_state_grads_kernel<<<static_cast<unsigned>(g.kv_pairs() * g.k_blocks), 256, shared, stream>>>(
      g, plan.block_map, scope, dh_query, dz_query, dh_total, dz_total, dh_key, dz_key);
  SLATTN_LAUNCH_CHECK("key_state_grads_kernel");
}

void linear_key_grad(const Geometry& g, const TensorView& k, FeatureMap feature_map, const float* phi_k,
                     float* dkphi, const float* dz_key, float* dk, cudaStream_t stream) {
  dispatch_element(k.dtype, [&](auto tag) {
    using Element = decltype(tag);
    linear_key_grad_kernel<Element><<<row_blocks(g.kv_pairs() * g.k_rows()), kRowThreads, 0, stream>>>(
        g, DeviceView<const Element>::of(k), feature_map, phi_k, dkphi, dz_key, dk);
  });
  SLATTN_LAUNCH_CHECK("linear_key_grad_kernel");
}

}  // namespace slattn::cuda
