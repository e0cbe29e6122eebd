#include "cuda/common.cuh"
#include "cuda/gemm.cuh"

namespace slattn::cuda {
namespace {

// The kernel's view of one launch.
struct GemmArgs {
  int64_t m, n, k, batches;
  GemmOperand a, b;
  GemmOutput c;
  float beta;  // 0: C is not read
};

constexpr int kTileM = 64;
constexpr int kTileN = 64;
constexpr int kTileK = 16;
constexpr int kThreads = 256;  // each thread owns a 4x4 patch of the 64x64 tile
constexpr int kPatch = 4;

__global__ void __launch_bounds__(kThreads) gemm_kernel(GemmArgs g) {
  __shared__ float a_tile[kTileK][kTileM + 1];  // stored k-major; +1 breaks bank conflicts
  __shared__ float b_tile[kTileK][kTileN + 1];
  const int64_t row0 = blockIdx.y * int64_t(kTileM);
  const int64_t col0 = blockIdx.x * int64_t(kTileN);
  const int tr = threadIdx.x / (kTileN / kPatch);  // patch row
  const int tc = threadIdx.x % (kTileN / kPatch);  // patch column
  for (int64_t batch = blockIdx.z; batch < g.batches; batch += gridDim.z) {
    const float* a = g.a.data + batch * g.a.batch_stride;
    const float* b = g.b.data + batch * g.b.batch_stride;
    float acc[kPatch][kPatch] = {};
    for (int64_t k0 = 0; k0 < g.k; k0 += kTileK) {
      for (int i = threadIdx.x; i < kTileK * kTileM; i += kThreads) {
        const int kk = i / kTileM, mm = i % kTileM;
        const int64_t row = row0 + mm, k = k0 + kk;
        a_tile[kk][mm] = (row < g.m && k < g.k) ? a[row * g.a.row_stride + k * g.a.col_stride] : 0.0f;
      }
      for (int i = threadIdx.x; i < kTileK * kTileN; i += kThreads) {
        const int kk = i / kTileN, nn = i % kTileN;
        const int64_t col = col0 + nn, k = k0 + kk;
        b_tile[kk][nn] = (col < g.n && k < g.k) ? b[k * g.b.row_stride + col * g.b.col_stride] : 0.0f;
      }
      __syncthreads();
#pragma unroll
      for (int kk = 0; kk < kTileK; ++kk) {
        float a_frag[kPatch], b_frag[kPatch];
#pragma unroll
        for (int i = 0; i < kPatch; ++i) a_frag[i] = a_tile[kk][tr + i * (kTileM / kPatch)];
#pragma unroll
        for (int j = 0; j < kPatch; ++j) b_frag[j] = b_tile[kk][tc + j * (kTileN / kPatch)];
#pragma unroll
        for (int i = 0; i < kPatch; ++i)
#pragma unroll
          for (int j = 0; j < kPatch; ++j) acc[i][j] += a_frag[i] * b_frag[j];
      }
      __syncthreads();
    }
    float* c = g.c.data + batch * g.c.batch_stride;
#pragma unroll
    for (int i = 0; i < kPatch; ++i) {
      const int64_t row = row0 + tr + i * (kTileM / kPatch);
#pragma unroll
      for (int j = 0; j < kPatch; ++j) {
        const int64_t col = col0 + tc + j * (kTileN / kPatch);
        if (row < g.m && col < g.n) {
          float* out = c + row * g.c.row_stride + col;
          *out = acc[i][j] + (g.beta != 0.0f ? g.beta * *out : 0.0f);
        }
      }
    }
  }
}

}  // namespace

void gemm(int64_t batches, const GemmOperand& a, const GemmOperand& b, const GemmOutput& c, cudaStream_t stream,
          float beta) {
  SLATTN_CHECK(a.cols == b.rows && c.rows == a.rows && c.cols == b.cols, "gemm: operand sizes (", a.rows, "x",
               a.cols, ") (", b.rows, "x", b.cols, ") -> (", c.rows, "x", c.cols, ") do not agree");
  const GemmArgs args{a.rows, b.cols, a.cols, batches, a, b, c, beta};
  if (args.m == 0 || args.n == 0 || args.batches == 0) return;
  constexpr int64_t kMaxGridZ = 65535;
  const dim3 grid(static_cast<unsigned>(ceil_div(args.n, kTileN)), static_cast<unsigned>(ceil_div(args.m, kTileM)),
                  static_cast<unsigned>(args.batches < kMaxGridZ ? args.batches : kMaxGridZ));
  SLATTN_CHECK(grid.y <= 65535u, "gemm: too many rows for one launch (", args.m, ")");
  gemm_kernel<<<grid, kThreads, 0, stream>>>(args);
  SLATTN_LAUNCH_CHECK("gemm_kernel");
}

}  // namespace slattn::cuda
