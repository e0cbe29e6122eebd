// The strided, batched fp32 matrix product of gemm.cuh on tensor cores:
// m16n8k8 products of TF32 inputs with fp32 accumulators (sm_80+, also sm_90).
//
// A block computes one (kTileM x kTileN) tile of C for one batch at a time,
// walking k in steps of kTileK; each of its four warps owns a (kWarpM x kWarpN)
// piece of the tile. Both operands are read as (rows x k) matrices: A as
// (m x k), B as Bᵀ (n x k), the .row.col form mma takes. Their tiles are
// staged in shared memory as fp32, double-buffered with cp.async, and rounded
// to TF32 only when read into fragments. A staged tile keeps its operand's
// contiguous dimension contiguous ([row][k] "k-major", else [k][row]), so
// global reads coalesce whichever stride is 1; where that dimension's runs of
// four are 16-byte aligned a copy moves four elements, else one (a kernel
// instance of its own). Out-of-range elements are zero-filled by the copy.
//
// Why TF32 is precise enough: SPEC.md §4 computes these products in the input
// precision (bf16 or fp16) with fp32 accumulation, and the tolerance is
// relative to that baseline. TF32 keeps 10 mantissa bits, as fp16 does and
// three more than bf16, so rounding the operands to TF32 adds no more error
// than the baseline's own rounding of them; the accumulation stays fp32.
#include <algorithm>
#include <cstdlib>
#include <limits>

#include "cuda/async_copy.cuh"
#include "cuda/common.cuh"
#include "cuda/gemm.cuh"
#include "cuda/mma.cuh"

namespace slattn::cuda {
namespace {

constexpr int kTileM = 64;
constexpr int kTileN = 64;
constexpr int kTileK = 32;
constexpr int kWarpM = 32;  // each warp: (kWarpM x kWarpN) of the block tile
constexpr int kWarpN = 32;
constexpr int kWarpsN = kTileN / kWarpN;
constexpr int kThreads = (kTileM / kWarpM) * kWarpsN * kWarpSize;
constexpr int kStages = 2;  // shared buffers: one being read while the next is copied in
// Blocks an SM must be able to hold at once (so at most 102 registers a
// thread): these products are bound by memory, and blocks in flight hide its
// latency. Six, all that an H100's shared memory takes, leave 80: spills.
constexpr int kMinBlocksPerSm = 5;
constexpr int kMmaM = 16;  // the m16n8k8 instruction shape
constexpr int kMmaN = 8;
constexpr int kMmaK = 8;
constexpr int kHalfM = kMmaM / 2;  // a lane holds rows g and g + kHalfM of A and C,
constexpr int kHalfK = kMmaK / 2;  // and k c and c + kHalfK of A and B
constexpr int kMmasM = kWarpM / kMmaM;
constexpr int kMmasN = kWarpN / kMmaN;
constexpr int kFloatBytes = sizeof(float);
constexpr int kRun = 4;  // floats in one 16-byte copy
constexpr int64_t kMaxGridX = std::numeric_limits<int32_t>::max();  // CUDA's limits
constexpr int64_t kMaxGridZ = 65535;

// One operand of every batch as the kernel reads it: a (rows x k) matrix, rows
// being m for A and n for B.
struct GemmSource {
  const float* data;
  int64_t rows;
  int64_t row_stride, k_stride, batch_stride;
  // How the kernel copies it, chosen on the host and passed as template arguments:
  bool k_major;     // staged [row][k], else [k][row]
  bool vectorized;  // runs of kRun along the contiguous dimension are contiguous and 16-byte aligned
};

struct GemmArgs {
  int64_t m, n, k, batches;
  unsigned col_tiles;  // tiles across n; blockIdx.x = row tile * col_tiles + column tile
  GemmSource a, b;
  GemmOutput c;
  bool paired_c;  // C's column pairs (2j, 2j + 1) are 8-byte aligned
  float beta;     // 0: C is not read
};

// A (kRows x kTileK) tile in shared memory. The padding puts the fragment reads
// on 32 distinct banks (lane 4g + c reads row g, k c: bank 4g + c k-major,
// 8c + g else) and keeps every line 16-byte aligned for cp.async.
template <int kRows, bool kKMajor>
struct StagedTile {
  static constexpr int kPad = kKMajor ? 4 : 8;
  static constexpr int kPitch = (kKMajor ? kTileK : kRows) + kPad;
  static constexpr int kFloats = (kKMajor ? kRows : kTileK) * kPitch;
  __device__ static int offset(int row, int k) { return kKMajor ? row * kPitch + k : k * kPitch + row; }
};

// One thread's share of copying an operand's tiles into shared memory, tile
// after tile along k. A staged tile is a stack of lines (rows k-major, else
// k) along the contiguous dimension; the thread copies the run of kRun at one
// place along a line, in every kLinesPerPass-th line.
template <int kRows, bool kKMajor, bool kVectorized>
struct TileCopier {
  using Tile = StagedTile<kRows, kKMajor>;
  static constexpr int kRunsPerLine = (kKMajor ? kTileK : kRows) / kRun;
  static constexpr int kLinesPerPass = kThreads / kRunsPerLine;
  static constexpr int kPasses = (kKMajor ? kRows : kTileK) / kLinesPerPass;
  static_assert(kThreads % kRunsPerLine == 0 && kPasses * kLinesPerPass == (kKMajor ? kRows : kTileK));

  const float* from;   // the thread's first run in the next tile
  int64_t along_left;  // elements from there to the operand's end along the contiguous dimension
  int64_t lines_left;  // lines from there to the operand's end
  int to;              // the run's offset in a staged tile

  // Positioned at the first tile of rows row0.. of one batch's operand (at `base`).
  __device__ TileCopier(const GemmSource& source, const float* base, int64_t row0, int64_t k_size) {
    const int along = threadIdx.x % kRunsPerLine * kRun, line = threadIdx.x / kRunsPerLine;
    const int64_t row = row0 + (kKMajor ? line : along), k = kKMajor ? along : line;
    from = base + row * source.row_stride + k * source.k_stride;
    along_left = kKMajor ? k_size - k : source.rows - row;
    lines_left = kKMajor ? source.rows - row : k_size - k;
    to = line * Tile::kPitch + along;
  }

  // Starts copying the next tile into `tile`, zeros past the operand's end.
  // A run past the end reads nothing; it names source.data, a valid address.
  __device__ void copy_next(float* tile, const GemmSource& source) {
    const int64_t along_stride = kKMajor ? source.k_stride : source.row_stride;
    const int64_t line_stride = kKMajor ? source.row_stride : source.k_stride;
    const int run_size = static_cast<int>(max(int64_t{0}, min(int64_t{kRun}, along_left)));
#pragma unroll
    for (int pass = 0; pass < kPasses; ++pass) {
      const int valid = lines_left > pass * kLinesPerPass ? run_size : 0;
      const float* run = from + pass * kLinesPerPass * line_stride;
      float* run_to = tile + to + pass * kLinesPerPass * Tile::kPitch;
      if constexpr (kVectorized) {
        cp_async<kRun * kFloatBytes>(run_to, valid > 0 ? run : source.data, valid * kFloatBytes);
      } else {
#pragma unroll
        for (int e = 0; e < kRun; ++e)
          cp_async<kFloatBytes>(run_to + e, e < valid ? run + e * along_stride : source.data,
                                  e < valid ? kFloatBytes : 0);
      }
    }
    from += kTileK * source.k_stride;
    (kKMajor ? along_left : lines_left) -= kTileK;
  }
};

template <bool kAKMajor, bool kBKMajor, bool kVectorized>
__global__ void __launch_bounds__(kThreads, kMinBlocksPerSm) gemm_kernel(const __grid_constant__ GemmArgs g) {
  using ATile = StagedTile<kTileM, kAKMajor>;
  using BTile = StagedTile<kTileN, kBKMajor>;
  __shared__ alignas(16) float a_tiles[kStages][ATile::kFloats];
  __shared__ alignas(16) float b_tiles[kStages][BTile::kFloats];
  const int64_t row0 = int64_t{blockIdx.x / g.col_tiles} * kTileM;
  const int64_t col0 = int64_t{blockIdx.x % g.col_tiles} * kTileN;
  const int warp = threadIdx.x / kWarpSize, lane = threadIdx.x % kWarpSize;
  const int group = lane / 4, member = lane % 4;  // the fragment coordinates g and c
  const int warp_row = warp / kWarpsN * kWarpM, warp_col = warp % kWarpsN * kWarpN;
  const int64_t k_tiles = ceil_div(g.k, kTileK);

  for (int64_t batch = blockIdx.z; batch < g.batches; batch += gridDim.z) {
    const float* a = g.a.data + batch * g.a.batch_stride;
    const float* b = g.b.data + batch * g.b.batch_stride;
    float acc[kMmasM][kMmasN][4] = {};
    TileCopier<kTileM, kAKMajor, kVectorized> a_copier(g.a, a, row0, g.k);
    TileCopier<kTileN, kBKMajor, kVectorized> b_copier(g.b, b, col0, g.k);
    auto copy_next = [&](int64_t t) {  // the copiers walk k in order: t is their next tile
      a_copier.copy_next(a_tiles[t % kStages], g.a);
      b_copier.copy_next(b_tiles[t % kStages], g.b);
      cp_async_commit();
    };
    if (k_tiles > 0) copy_next(0);
    for (int64_t t = 0; t < k_tiles; ++t) {
      await_tile(t, k_tiles, copy_next);  // tile t, copied by every thread, is complete
      const float* a_tile = a_tiles[t % kStages];
      const float* b_tile = b_tiles[t % kStages];
#pragma unroll
      for (int kk = 0; kk < kTileK; kk += kMmaK) {
        uint32_t a_frag[kMmasM][4], b_frag[kMmasN][2];
#pragma unroll
        for (int i = 0; i < kMmasM; ++i) {
          const int row = warp_row + i * kMmaM + group;
          a_frag[i][0] = to_tf32(a_tile[ATile::offset(row, kk + member)]);
          a_frag[i][1] = to_tf32(a_tile[ATile::offset(row + kHalfM, kk + member)]);
          a_frag[i][2] = to_tf32(a_tile[ATile::offset(row, kk + member + kHalfK)]);
          a_frag[i][3] = to_tf32(a_tile[ATile::offset(row + kHalfM, kk + member + kHalfK)]);
        }
#pragma unroll
        for (int j = 0; j < kMmasN; ++j) {
          const int col = warp_col + j * kMmaN + group;
          b_frag[j][0] = to_tf32(b_tile[BTile::offset(col, kk + member)]);
          b_frag[j][1] = to_tf32(b_tile[BTile::offset(col, kk + member + kHalfK)]);
        }
#pragma unroll
        for (int i = 0; i < kMmasM; ++i)
#pragma unroll
          for (int j = 0; j < kMmasN; ++j) mma_1688_tf32(acc[i][j], a_frag[i], b_frag[j][0], b_frag[j][1]);
      }
      __syncthreads();  // every warp is done with this buffer before it is refilled
    }

    float* c = g.c.data + batch * g.c.batch_stride;
#pragma unroll
    for (int i = 0; i < kMmasM; ++i)
#pragma unroll
      for (int half = 0; half < 2; ++half) {  // accumulator rows g, then g + kHalfM
        const int64_t row = row0 + warp_row + i * kMmaM + half * kHalfM + group;
        if (row >= g.m) continue;
#pragma unroll
        for (int j = 0; j < kMmasN; ++j) {
          const int64_t col = col0 + warp_col + j * kMmaN + 2 * member;
          if (col >= g.n) continue;
          float* out = c + row * g.c.row_stride + col;
          float2 value{acc[i][j][2 * half], acc[i][j][2 * half + 1]};
          if (g.paired_c && col + 1 < g.n) {
            if (g.beta != 0.0f) {
              const float2 old = *reinterpret_cast<const float2*>(out);
              value.x += g.beta * old.x;
              value.y += g.beta * old.y;
            }
            *reinterpret_cast<float2*>(out) = value;
          } else {
            out[0] = value.x + (g.beta != 0.0f ? g.beta * out[0] : 0.0f);
            if (col + 1 < g.n) out[1] = value.y + (g.beta != 0.0f ? g.beta * out[1] : 0.0f);
          }
        }
      }
  }
}

bool aligned(const void* pointer, size_t bytes) { return reinterpret_cast<uintptr_t>(pointer) % bytes == 0; }

// An operand seen as (rows x k): staged k-major when k is its contiguous
// dimension (strided both ways: when k's stride is the smaller), copied 16
// bytes at a time when every run of kRun is contiguous and aligned.
GemmSource source_of(const float* data, int64_t rows, int64_t row_stride, int64_t k_stride, int64_t batch_stride,
                     int64_t batches) {
  const bool k_major = k_stride == 1 || (row_stride != 1 && std::abs(k_stride) <= std::abs(row_stride));
  const int64_t contiguous = k_major ? k_stride : row_stride, other = k_major ? row_stride : k_stride;
  const bool vectorized = contiguous == 1 && other % kRun == 0 && (batches == 1 || batch_stride % kRun == 0) &&
                          aligned(data, kRun * kFloatBytes);
  return {data, rows, row_stride, k_stride, batch_stride, k_major, vectorized};
}

}  // namespace

void gemm(int64_t batches, const GemmOperand& a, const GemmOperand& b, const GemmOutput& c, cudaStream_t stream,
          float beta) {
  SLATTN_CHECK(a.cols == b.rows && c.rows == a.rows && c.cols == b.cols, "gemm: operand sizes (", a.rows, "x",
               a.cols, ") (", b.rows, "x", b.cols, ") -> (", c.rows, "x", c.cols, ") do not agree");
  if (a.rows == 0 || b.cols == 0 || batches == 0) return;
  GemmArgs args{};
  args.m = a.rows;
  args.n = b.cols;
  args.k = a.cols;
  args.batches = batches;
  args.a = source_of(a.data, a.rows, a.row_stride, a.col_stride, a.batch_stride, batches);
  args.b = source_of(b.data, b.cols, b.col_stride, b.row_stride, b.batch_stride, batches);
  args.c = c;
  args.paired_c =
      c.row_stride % 2 == 0 && (batches == 1 || c.batch_stride % 2 == 0) && aligned(c.data, sizeof(float2));
  args.beta = beta;
  // The column tiles of a row tile run next to each other, while its rows of A are in L2.
  const int64_t col_tiles = ceil_div(args.n, kTileN), tiles = ceil_div(args.m, kTileM) * col_tiles;
  SLATTN_CHECK(tiles <= kMaxGridX, "gemm: too many tiles for one launch (", args.m, "x", args.n, ")");
  args.col_tiles = static_cast<unsigned>(col_tiles);
  const dim3 grid(static_cast<unsigned>(tiles), 1, static_cast<unsigned>(std::min(batches, kMaxGridZ)));
  using Kernel = void (*)(GemmArgs);
  constexpr Kernel kKernels[2][2][2] = {
      {{gemm_kernel<false, false, false>, gemm_kernel<false, false, true>},
       {gemm_kernel<false, true, false>, gemm_kernel<false, true, true>}},
      {{gemm_kernel<true, false, false>, gemm_kernel<true, false, true>},
       {gemm_kernel<true, true, false>, gemm_kernel<true, true, true>}}};
  const bool vectorized = args.a.vectorized && args.b.vectorized;
  kKernels[args.a.k_major][args.b.k_major][vectorized]<<<grid, kThreads, 0, stream>>>(args);
  SLATTN_LAUNCH_CHECK("gemm_kernel");
}

}  // namespace slattn::cuda
