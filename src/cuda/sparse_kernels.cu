#include "cuda/common.cuh"
#include "cuda/row_ops.cuh"
#include "cuda/sla_cuda.h"
#include "cuda/sparse_kernels.h"

namespace slattn::cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / kWarpSize;
constexpr int kChunk = kWarpSize;  // keys (or queries) per shared-memory chunk: one per lane
constexpr int kKeyTile = 64;       // key rows per block of the dK/dV kernel

template <int kHeadDim>
constexpr int kPerLane = kHeadDim / kWarpSize;

// Shared-memory layout of the dQ kernel. Rows read by lanes at the same
// column are padded by one float to avoid bank conflicts.
template <int kHeadDim, int kBlockQ>
struct QueryBlockShared {
  float q[kBlockQ][kHeadDim];
  float dout[kBlockQ][kHeadDim];
  float k[kChunk][kHeadDim + 1];
  float v[kChunk][kHeadDim + 1];
  float lse[kBlockQ];
  float delta[kBlockQ];
};

// Loads keys [first, first + kChunk) of (b, kv) into shared memory; keys at or
// past `end` become zero rows.
template <typename Element, int kHeadDim>
__device__ void load_key_chunk(const DeviceView<const Element>& k, const DeviceView<const Element>& v, int64_t b,
                               int64_t kv, int64_t first, int64_t end, float (*k_s)[kHeadDim + 1],
                               float (*v_s)[kHeadDim + 1]) {
  for (int idx = threadIdx.x; idx < kChunk * kHeadDim; idx += kThreads) {
    const int j = idx / kHeadDim, d = idx % kHeadDim;
    const bool valid = first + j < end;
    k_s[j][d] = valid ? k.load(b, kv, first + j, d) : 0.0f;
    v_s[j][d] = valid ? v.load(b, kv, first + j, d) : 0.0f;
  }
}

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
  dos.store(a.dos_rows + flat * g.dim, g.dim);
  if (a.dout_rows) dout.store(a.dout_rows + flat * g.dim, g.dim);
  if (threadIdx.x % kWarpSize == 0) a.delta[flat] = delta;
}

template <typename Element, int kHeadDim, int kBlockQ>
__global__ void __launch_bounds__(kThreads) sparse_dq_kernel(Geometry g, RoutingPlanView plan, SparseBackwardArgs a) {
  using Shared = QueryBlockShared<kHeadDim, kBlockQ>;
  extern __shared__ __align__(16) unsigned char raw[];
  Shared& s = *reinterpret_cast<Shared*>(raw);
  constexpr int kRows = kBlockQ / kWarps;
  const int warp = threadIdx.x / kWarpSize, lane = threadIdx.x % kWarpSize;
  const int64_t m = blockIdx.x, h = blockIdx.y, b = blockIdx.z;
  const int64_t kv = h / g.group();
  const int64_t pair = b * g.heads + h;
  const int64_t row0 = m * kBlockQ;
  const auto q = DeviceView<const Element>::of(a.q);
  const auto k = DeviceView<const Element>::of(a.k);
  const auto v = DeviceView<const Element>::of(a.v);
  const int64_t padded0 = pair * g.q_rows() + row0;

  for (int idx = threadIdx.x; idx < kBlockQ * kHeadDim; idx += kThreads) {
    const int r = idx / kHeadDim, d = idx % kHeadDim;
    const bool valid = row0 + r < g.q_len;
    s.q[r][d] = valid ? a.scale * q.load(b, h, row0 + r, d) : 0.0f;
    s.dout[r][d] = a.dos_rows[(padded0 + r) * kHeadDim + d];
  }
  for (int r = threadIdx.x; r < kBlockQ; r += kThreads) {
    const bool valid = row0 + r < g.q_len;
    s.lse[r] = valid ? a.lse[pair * g.q_len + row0 + r] : INFINITY;  // pad rows: P = 0
    s.delta[r] = a.delta[padded0 + r];
  }
  float acc[kRows][kPerLane<kHeadDim>] = {};

  const int64_t plan_row = pair * g.q_blocks + m;
  const int32_t count = plan.row_count[plan_row];
  for (int32_t i = 0; i < count; ++i) {
    const int64_t n = plan.row_index[plan_row * g.k_blocks + i];
    const int64_t end = min(g.k_len, (n + 1) * g.block_k);
    for (int64_t first = n * g.block_k; first < end; first += kChunk) {
      __syncthreads();
      load_key_chunk<Element, kHeadDim>(k, v, b, kv, first, end, s.k, s.v);
      __syncthreads();
      const bool valid = first + lane < end;
#pragma unroll
      for (int r = 0; r < kRows; ++r) {
        const int local = warp + r * kWarps;
        float score = 0.0f, dp = 0.0f;
#pragma unroll 8
        for (int d = 0; d < kHeadDim; ++d) {
          score += s.q[local][d] * s.k[lane][d];
          dp += s.dout[local][d] * s.v[lane][d];
        }
        const float p = valid ? __expf(score - s.lse[local]) : 0.0f;
        const float ds = p * (dp - s.delta[local]);
#pragma unroll 4
        for (int j = 0; j < kChunk; ++j) {
          const float dsj = __shfl_sync(0xffffffffu, ds, j);
#pragma unroll
          for (int t = 0; t < kPerLane<kHeadDim>; ++t) acc[r][t] += dsj * s.k[j][lane + t * kWarpSize];
        }
      }
    }
  }
#pragma unroll
  for (int r = 0; r < kRows; ++r) {
    const int local = warp + r * kWarps;
#pragma unroll
    for (int t = 0; t < kPerLane<kHeadDim>; ++t)
      a.dq_rows[(padded0 + local) * kHeadDim + lane + t * kWarpSize] = a.scale * acc[r][t];
  }
}

template <int kHeadDim>
struct KeyTileShared {
  float k[kKeyTile][kHeadDim + 1];
  float v[kKeyTile][kHeadDim + 1];
  float q[kChunk][kHeadDim + 1];
  float dout[kChunk][kHeadDim + 1];
  float lse[kChunk];
  float delta[kChunk];
};

// grid (Nk * tiles, Hkv, B): dK and dV of kKeyTile keys, over the query blocks
// (of every query head of the group) whose row list holds their key block.
template <typename Element, int kHeadDim>
__global__ void __launch_bounds__(kThreads) sparse_dkv_kernel(Geometry g, RoutingPlanView plan, SparseBackwardArgs a) {
  using Shared = KeyTileShared<kHeadDim>;
  extern __shared__ __align__(16) unsigned char raw[];
  Shared& s = *reinterpret_cast<Shared*>(raw);
  constexpr int kRows = kKeyTile / kWarps;
  const int warp = threadIdx.x / kWarpSize, lane = threadIdx.x % kWarpSize;
  const int64_t tiles = ceil_div(g.block_k, kKeyTile);
  const int64_t n = blockIdx.x / tiles, kv = blockIdx.y, b = blockIdx.z;
  const int64_t key0 = n * g.block_k + (blockIdx.x % tiles) * kKeyTile;
  const int64_t key_end = min(min(g.k_len, (n + 1) * g.block_k), key0 + kKeyTile);
  if (key0 >= key_end) return;
  const auto q = DeviceView<const Element>::of(a.q);
  const auto k = DeviceView<const Element>::of(a.k);
  const auto v = DeviceView<const Element>::of(a.v);
  for (int idx = threadIdx.x; idx < kKeyTile * kHeadDim; idx += kThreads) {
    const int j = idx / kHeadDim, d = idx % kHeadDim;
    const bool valid = key0 + j < key_end;
    s.k[j][d] = valid ? k.load(b, kv, key0 + j, d) : 0.0f;
    s.v[j][d] = valid ? v.load(b, kv, key0 + j, d) : 0.0f;
  }
  float dk[kRows][kPerLane<kHeadDim>] = {}, dv[kRows][kPerLane<kHeadDim>] = {};

  for (int64_t member = 0; member < g.group(); ++member) {
    const int64_t h = kv * g.group() + member;
    const int64_t pair = b * g.heads + h;
    const int64_t column = pair * g.k_blocks + n;
    const int32_t count = plan.col_count[column];
    for (int32_t i = 0; i < count; ++i) {
      const int64_t m = plan.col_index[column * g.q_blocks + i];
      const int64_t end = min(g.q_len, (m + 1) * g.block_q);
      for (int64_t first = m * g.block_q; first < end; first += kChunk) {
        __syncthreads();
        for (int idx = threadIdx.x; idx < kChunk * kHeadDim; idx += kThreads) {
          const int r = idx / kHeadDim, d = idx % kHeadDim;
          const bool valid = first + r < end;
          s.q[r][d] = valid ? a.scale * q.load(b, h, first + r, d) : 0.0f;
          s.dout[r][d] = valid ? a.dos_rows[(pair * g.q_rows() + first + r) * kHeadDim + d] : 0.0f;
        }
        for (int r = threadIdx.x; r < kChunk; r += kThreads) {
          const bool valid = first + r < end;
          s.lse[r] = valid ? a.lse[pair * g.q_len + first + r] : INFINITY;
          s.delta[r] = valid ? a.delta[pair * g.q_rows() + first + r] : 0.0f;
        }
        __syncthreads();
#pragma unroll
        for (int r = 0; r < kRows; ++r) {
          const int local = warp + r * kWarps;
          float score = 0.0f, dp = 0.0f;
#pragma unroll 8
          for (int d = 0; d < kHeadDim; ++d) {
            score += s.q[lane][d] * s.k[local][d];
            dp += s.dout[lane][d] * s.v[local][d];
          }
          const float p = __expf(score - s.lse[lane]);  // 0 for rows past the end (lse = +inf)
          const float ds = p * (dp - s.delta[lane]);
#pragma unroll 4
          for (int i2 = 0; i2 < kChunk; ++i2) {
            const float pi = __shfl_sync(0xffffffffu, p, i2);
            const float dsi = __shfl_sync(0xffffffffu, ds, i2);
#pragma unroll
            for (int t = 0; t < kPerLane<kHeadDim>; ++t) {
              dv[r][t] += pi * s.dout[i2][lane + t * kWarpSize];
              dk[r][t] += dsi * s.q[i2][lane + t * kWarpSize];
            }
          }
        }
      }
    }
  }
  const int64_t kv_pair = b * g.kv_heads + kv;
#pragma unroll
  for (int r = 0; r < kRows; ++r) {
    const int64_t key = key0 + warp + r * kWarps;
    if (key >= key_end) continue;
#pragma unroll
    for (int t = 0; t < kPerLane<kHeadDim>; ++t) {
      const int64_t offset = (kv_pair * g.k_rows() + key) * kHeadDim + lane + t * kWarpSize;
      a.dk_rows[offset] = dk[r][t];  // q was pre-scaled, so this is scale * Σ dS q
      a.dv_rows[offset] = dv[r][t];
    }
  }
}

template <typename Kernel>
void set_shared(Kernel kernel, size_t bytes) {
  SLATTN_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(bytes)));
}

}  // namespace

void check_sparse_support(const Geometry& g) {
  SLATTN_CHECK(g.dim == 64 || g.dim == 128, "the CUDA kernels support head_dim 64 and 128, got ", g.dim,
               " (the CPU path serves every multiple of 8 up to 256)");
  SLATTN_CHECK(g.block_q == 64 || g.block_q == 128, "the CUDA kernels support block_q 64 and 128, got ", g.block_q);
  SLATTN_CHECK(g.block_k == 64 || g.block_k == 128, "the CUDA kernels support block_k 64 and 128, got ", g.block_k);
}

void check_cuda_support(const Geometry& g, const void* proj_weight, DType proj_dtype) {
  check_sparse_support(g);
  SLATTN_CHECK(proj_weight == nullptr || proj_dtype == DType::float32,
               "the CUDA path takes float32 projection weights, got ", dtype_name(proj_dtype));
}

void sparse_backward(const Geometry& g, const RoutingPlanView& plan, const SparseBackwardArgs& args,
                     cudaStream_t stream) {
  check_sparse_support(g);
  dispatch_element(args.q.dtype, [&](auto tag) {
    using Element = decltype(tag);
    const auto rows = g.q_pairs() * g.q_rows();
    sparse_delta_kernel<Element><<<static_cast<unsigned>(ceil_div(rows, kWarps)), kThreads, 0, stream>>>(g, args);
    SLATTN_LAUNCH_CHECK("sparse_delta_kernel");
    dispatch_sparse_shape(g, [&](auto head_dim, auto block_q) {
      constexpr int D = decltype(head_dim)::value, BQ = decltype(block_q)::value;
      auto dq_kernel = sparse_dq_kernel<Element, D, BQ>;
      const size_t dq_shared = sizeof(QueryBlockShared<D, BQ>);
      set_shared(dq_kernel, dq_shared);
      dq_kernel<<<dim3(static_cast<unsigned>(g.q_blocks), static_cast<unsigned>(g.heads),
                       static_cast<unsigned>(g.batch)),
                  kThreads, dq_shared, stream>>>(g, plan, args);
      SLATTN_LAUNCH_CHECK("sparse_dq_kernel");
      auto dkv_kernel = sparse_dkv_kernel<Element, D>;
      const size_t dkv_shared = sizeof(KeyTileShared<D>);
      set_shared(dkv_kernel, dkv_shared);
      const int64_t tiles = ceil_div(g.block_k, kKeyTile);
      dkv_kernel<<<dim3(static_cast<unsigned>(g.k_blocks * tiles), static_cast<unsigned>(g.kv_heads),
                        static_cast<unsigned>(g.batch)),
                   kThreads, dkv_shared, stream>>>(g, plan, args);
      SLATTN_LAUNCH_CHECK("sparse_dkv_kernel");
    });
  });
}

}  // namespace slattn::cuda
