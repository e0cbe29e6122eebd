// Approximate block scores of the router on tensor cores (see route_stages.cuh
// for why): S̃ = q̃ k̃ᵀ for every (b, kv head), the query heads of its group
// stacked as rows (their rows are adjacent in (B, Hq, Mq, D)), with m16n8k8
// TF32 products and fp32 accumulators. The kernel is the router's own, not
// gemm(), because the router's exactness rests on the error bound below and
// so on these numerics staying as they are.
//
// The bound (route_stages.cuh), for one pair with P = Σ_c |q̄_c k̄_c| <= |q̄| |k̄|:
//   - operands: q̃_c = tf32(fp32(q̄_c)), each step rounding to nearest, is within
//     (2^-11 + 2^-24 + 2^-35) |q̄_c| of q̄_c (k̃_c likewise), so a product is
//     within (2^-10 + 2^-22) |q̄_c k̄_c| of q̄_c k̄_c;
//   - the exact score is within D 2^-53 P <= 2^-45 P of Σ_c q̄_c k̄_c;
//   - that leaves almost 2^-11 P of kScoreRelativeError = 1.5 x 2^-10 for the
//     accumulation: TF32 products are exact in fp32, and the tensor cores add
//     them with a few fp32 ulps of error per k8 step (Fasi et al., "Numerical
//     behavior of NVIDIA tensor cores", PeerJ CS 2021), at most ~2^-17 P over
//     the D / 8 <= 32 steps;
//   - values under fp32's normal range may be flushed to zero on the way: at
//     most 2^-126 per operand element (times the other operand), per product
//     and per step, in all <= 2^-122 (|q̄| + |k̄|) + 2^-118 + 2^-121 for D <= 256,
//     below kScoreAbsoluteError (|q̄| + |k̄| + 1).
// A value beyond fp32's range makes a score or the bound infinite or NaN, and
// the classifier then takes exact scores for the whole row.
#include "cuda/async_copy.cuh"
#include "cuda/common.cuh"
#include "cuda/mma.cuh"
#include "cuda/route_stages.cuh"

namespace slattn::cuda {
namespace {

constexpr int kTile = 64;           // query-block rows and key-block columns of a block's tile
constexpr int kChunk = 32;          // head-dim channels staged at a time
constexpr int kPitch = kChunk + 4;  // fragment reads (row g, channel c) hit bank 4g + c; rows stay 16-byte aligned
constexpr int kWarpTile = 32;       // each warp computes a (kWarpTile x kWarpTile) quarter of the tile
constexpr int kWarpsAcross = kTile / kWarpTile;
constexpr int kThreads = kWarpsAcross * kWarpsAcross * kWarpSize;
constexpr int kStages = 2;  // one chunk read while the next is copied in
constexpr int kRun = 4;     // floats in one 16-byte copy
constexpr int kMmaM = 16;   // the m16n8k8 instruction shape
constexpr int kMmaN = 8;
constexpr int kMmaK = 8;
constexpr int kMmasM = kWarpTile / kMmaM;
constexpr int kMmasN = kWarpTile / kMmaN;
constexpr int64_t kMaxGridZ = 65535;

struct ScoreArgs {
  const float* q;  // (pairs, rows, dim)
  const float* k;  // (pairs, cols, dim)
  float* scores;   // (pairs, rows, cols)
  int64_t rows, cols, dim;
};

// Starts copying channels c0.. of the tile's rows (`rows_left` of them exist)
// into `tile`; what lies outside is zero-filled, so it adds nothing.
__device__ __forceinline__ void stage_chunk(float* tile, const float* rows, int64_t rows_left, int64_t dim,
                                            int64_t c0) {
  constexpr int kRunsPerRow = kChunk / kRun;
  for (int e = threadIdx.x; e < kTile * kRunsPerRow; e += kThreads) {
    const int row = e / kRunsPerRow, run = e % kRunsPerRow * kRun;
    const bool valid = row < rows_left && c0 + run < dim;  // dim is a multiple of kRun
    cp_async<16>(tile + row * kPitch + run, valid ? rows + row * dim + c0 + run : rows, valid ? 16 : 0);
  }
}

// grid (row tiles, column tiles, pairs): one (kTile x kTile) tile of one pair's scores.
__global__ void __launch_bounds__(kThreads) approximate_scores_kernel(const __grid_constant__ ScoreArgs a) {
  __shared__ alignas(16) float q_tiles[kStages][kTile * kPitch];
  __shared__ alignas(16) float k_tiles[kStages][kTile * kPitch];
  const int64_t pair = blockIdx.z;
  const int64_t row0 = blockIdx.x * int64_t{kTile}, col0 = blockIdx.y * int64_t{kTile};
  const float* q = a.q + (pair * a.rows + row0) * a.dim;
  const float* k = a.k + (pair * a.cols + col0) * a.dim;
  const int warp = threadIdx.x / kWarpSize, lane = threadIdx.x % kWarpSize;
  const int group = lane / 4, member = lane % 4;  // the fragment coordinates g and c
  const int warp_row = warp / kWarpsAcross * kWarpTile, warp_col = warp % kWarpsAcross * kWarpTile;
  const int64_t chunks = ceil_div(a.dim, kChunk);

  float acc[kMmasM][kMmasN][4] = {};
  auto stage = [&](int64_t t) {
    stage_chunk(q_tiles[t % kStages], q, a.rows - row0, a.dim, t * kChunk);
    stage_chunk(k_tiles[t % kStages], k, a.cols - col0, a.dim, t * kChunk);
    cp_async_commit();
  };
  stage(0);
  for (int64_t t = 0; t < chunks; ++t) {
    await_tile(t, chunks, stage);  // chunk t, copied by every thread, is complete
    const float* q_tile = q_tiles[t % kStages];
    const float* k_tile = k_tiles[t % kStages];
#pragma unroll
    for (int kk = 0; kk < kChunk; kk += kMmaK) {
      uint32_t a_frag[kMmasM][4], b_frag[kMmasN][2];
#pragma unroll
      for (int i = 0; i < kMmasM; ++i) {
        const float* row = q_tile + (warp_row + i * kMmaM + group) * kPitch + kk + member;
        a_frag[i][0] = to_tf32(row[0]);
        a_frag[i][1] = to_tf32(row[8 * kPitch]);
        a_frag[i][2] = to_tf32(row[4]);
        a_frag[i][3] = to_tf32(row[8 * kPitch + 4]);
      }
#pragma unroll
      for (int j = 0; j < kMmasN; ++j) {
        const float* col = k_tile + (warp_col + j * kMmaN + group) * kPitch + kk + member;
        b_frag[j][0] = to_tf32(col[0]);
        b_frag[j][1] = to_tf32(col[4]);
      }
#pragma unroll
      for (int i = 0; i < kMmasM; ++i)
#pragma unroll
        for (int j = 0; j < kMmasN; ++j) mma_1688_tf32(acc[i][j], a_frag[i], b_frag[j][0], b_frag[j][1]);
    }
    __syncthreads();  // every warp is done with this buffer before it is refilled
  }

#pragma unroll
  for (int i = 0; i < kMmasM; ++i)
#pragma unroll
    for (int half = 0; half < 2; ++half) {  // accumulator rows g, then g + 8
      const int64_t row = row0 + warp_row + i * kMmaM + half * 8 + group;
      if (row >= a.rows) continue;
      float* out = a.scores + (pair * a.rows + row) * a.cols;
#pragma unroll
      for (int j = 0; j < kMmasN; ++j) {
        const int64_t col = col0 + warp_col + j * kMmaN + 2 * member;
        if (col < a.cols) out[col] = acc[i][j][2 * half];
        if (col + 1 < a.cols) out[col + 1] = acc[i][j][2 * half + 1];
      }
    }
}

}  // namespace

void launch_approximate_scores(const float* q_approx, const float* k_approx, const PlanShape& shape,
                               int64_t kv_heads, int64_t dim, float* scores, cudaStream_t stream) {
  const int64_t pairs = shape.batch * kv_heads;
  SLATTN_CHECK(pairs <= kMaxGridZ, "the CUDA router takes at most ", kMaxGridZ, " (batch, kv head) pairs, got ",
               pairs);
  const ScoreArgs args{q_approx, k_approx, scores, shape.heads / kv_heads * shape.q_blocks(), shape.k_blocks(), dim};
  const dim3 grid(static_cast<unsigned>(ceil_div(args.rows, kTile)), static_cast<unsigned>(ceil_div(args.cols, kTile)),
                  static_cast<unsigned>(pairs));
  approximate_scores_kernel<<<grid, kThreads, 0, stream>>>(args);
  SLATTN_LAUNCH_CHECK("approximate_scores_kernel");
}

}  // namespace slattn::cuda
