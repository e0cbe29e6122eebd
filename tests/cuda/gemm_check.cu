// Checks slattn::cuda::gemm (src/cuda/gemm.cu, TF32 tensor cores) against a
// double-precision host reference on ragged, strided, transposed and batched
// cases, then times the shapes one SLA forward + backward runs through it
// (B1 H12 L32760 D128). Run by hand on a GPU; exits non-zero on any failure.
//
// Build and run from the repository root (on an A100: -arch=sm_80):
//   nvcc -std=c++17 -O3 --expt-relaxed-constexpr -arch=sm_90a -Iinclude -Isrc -o /tmp/gemm_check tests/cuda/gemm_check.cu src/cuda/gemm.cu src/cuda/common.cu && /tmp/gemm_check
#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <exception>
#include <limits>
#include <random>
#include <string>
#include <utility>
#include <vector>

#include "cuda/common.cuh"
#include "cuda/gemm.cuh"
#include "slattn/error.h"

namespace {

using slattn::cuda::GemmOperand;
using slattn::cuda::GemmOutput;

// Error bound, relative to Σ_k |a| |b| (+ |β c|) of each element: TF32 rounds
// each operand to 2^-11, fp32 accumulates.
constexpr double kTolerance = 5e-3;
constexpr float kNaN = std::numeric_limits<float>::quiet_NaN();

// How one operand, (rows x cols) per batch, lies in memory.
struct Layout {
  bool transposed = false;  // stored as its transpose
  int64_t step = 1;         // between neighbours along a stored row (1: contiguous)
  int64_t pad = 0;          // unused elements after each stored row
  int64_t batch_pad = 0;    // unused elements after each batch
  int64_t offset = 0;       // unused elements before the first batch (1: not 16-byte aligned)
};

// C, (m x n) per batch; its columns are contiguous.
struct OutLayout {
  int64_t pad = 0;
  int64_t offset = 0;
};

struct Case {
  Case(std::string name_, int64_t m_, int64_t n_, int64_t k_, int64_t batches_, Layout a_ = {}, Layout b_ = {},
       OutLayout c_ = {}, float beta_ = 0.0f)
      : name(std::move(name_)), m(m_), n(n_), k(k_), batches(batches_), a(a_), b(b_), c(c_), beta(beta_) {}

  std::string name;
  int64_t m, n, k, batches;
  Layout a, b;
  OutLayout c;
  float beta;
  int64_t row_step = 1, batch_step = 1;  // the reference checks every row_step-th row of every batch_step-th batch
};

// An operand's strides under `layout`, data left null; `elements` is the buffer it needs.
GemmOperand describe(int64_t rows, int64_t cols, int64_t batches, const Layout& layout, int64_t& elements) {
  const int64_t stored_rows = layout.transposed ? cols : rows, stored_cols = layout.transposed ? rows : cols;
  const int64_t inner = layout.step, outer = stored_cols * layout.step + layout.pad;
  const int64_t batch_stride = stored_rows * outer + layout.batch_pad;
  elements = layout.offset + batches * batch_stride + 1;
  return layout.transposed ? GemmOperand{nullptr, rows, cols, inner, outer, batch_stride}
                           : GemmOperand{nullptr, rows, cols, outer, inner, batch_stride};
}

GemmOutput describe_out(int64_t m, int64_t n, int64_t batches, const OutLayout& layout, int64_t& elements) {
  const int64_t row_stride = n + layout.pad, batch_stride = m * row_stride + layout.pad;
  elements = layout.offset + batches * batch_stride + 1;
  return GemmOutput{nullptr, m, n, row_stride, batch_stride};
}

// A device copy of `host`; the caller frees it.
float* upload(const std::vector<float>& host) {
  float* device = nullptr;
  SLATTN_CUDA_CHECK(cudaMalloc(&device, host.size() * sizeof(float)));
  SLATTN_CUDA_CHECK(cudaMemcpy(device, host.data(), host.size() * sizeof(float), cudaMemcpyHostToDevice));
  return device;
}

std::vector<float> random_values(int64_t count, std::mt19937& rng) {
  std::uniform_real_distribution<float> uniform(-1.0f, 1.0f);
  std::vector<float> values(count);
  for (float& v : values) v = uniform(rng);
  return values;
}

// Whether buffer index `index` is an element of C (as opposed to padding).
bool inside(int64_t index, const GemmOutput& c, int64_t offset, int64_t batches) {
  const int64_t relative = index - offset;
  if (relative < 0) return false;
  const int64_t batch = relative / c.batch_stride, in_batch = relative % c.batch_stride;
  return batch < batches && in_batch / c.row_stride < c.rows && in_batch % c.row_stride < c.cols;
}

bool run_case(const Case& test, std::mt19937& rng) {
  int64_t a_elements = 0, b_elements = 0, c_elements = 0;
  GemmOperand a = describe(test.m, test.k, test.batches, test.a, a_elements);
  GemmOperand b = describe(test.k, test.n, test.batches, test.b, b_elements);
  GemmOutput c = describe_out(test.m, test.n, test.batches, test.c, c_elements);
  const std::vector<float> a_host = random_values(a_elements, rng), b_host = random_values(b_elements, rng);
  // β = 0: C holds NaN, which must not leak into the result.
  const std::vector<float> c_before =
      test.beta == 0.0f ? std::vector<float>(c_elements, kNaN) : random_values(c_elements, rng);
  float* a_device = upload(a_host);
  float* b_device = upload(b_host);
  float* c_device = upload(c_before);
  a.data = a_device + test.a.offset;
  b.data = b_device + test.b.offset;
  c.data = c_device + test.c.offset;
  slattn::cuda::gemm(test.batches, a, b, c, nullptr, test.beta);
  SLATTN_CUDA_CHECK(cudaDeviceSynchronize());
  std::vector<float> c_after(c_elements);
  SLATTN_CUDA_CHECK(cudaMemcpy(c_after.data(), c_device, c_elements * sizeof(float), cudaMemcpyDeviceToHost));
  SLATTN_CUDA_CHECK(cudaFree(a_device));
  SLATTN_CUDA_CHECK(cudaFree(b_device));
  SLATTN_CUDA_CHECK(cudaFree(c_device));

  double worst = 0.0;
  for (int64_t batch = 0; batch < test.batches; ++batch) {
    if (batch % test.batch_step != 0 && batch != test.batches - 1) continue;
    const float* a_batch = a_host.data() + test.a.offset + batch * a.batch_stride;
    const float* b_batch = b_host.data() + test.b.offset + batch * b.batch_stride;
    const int64_t c_batch = test.c.offset + batch * c.batch_stride;
    for (int64_t i = 0; i < test.m; ++i) {
      if (i % test.row_step != 0 && i != test.m - 1) continue;
      for (int64_t j = 0; j < test.n; ++j) {
        double sum = 0.0, magnitude = 0.0;
        for (int64_t kk = 0; kk < test.k; ++kk) {
          const double product = static_cast<double>(a_batch[i * a.row_stride + kk * a.col_stride]) *
                                 b_batch[kk * b.row_stride + j * b.col_stride];
          sum += product;
          magnitude += std::abs(product);
        }
        const int64_t at = c_batch + i * c.row_stride + j;
        if (test.beta != 0.0f) {
          sum += static_cast<double>(test.beta) * c_before[at];
          magnitude += std::abs(static_cast<double>(test.beta) * c_before[at]);
        }
        const double error = std::abs(c_after[at] - sum) / (magnitude + 1e-30);
        if (std::isnan(error) || error > worst) worst = error;  // a NaN sticks
      }
    }
  }
  int64_t touched = 0;  // padding of C that changed
  for (int64_t index = 0; index < c_elements; ++index)
    if (!inside(index, c, test.c.offset, test.batches) &&
        std::memcmp(&c_before[index], &c_after[index], sizeof(float)) != 0)
      ++touched;
  const bool ok = worst <= kTolerance && touched == 0;
  std::printf("%-4s %-44s m %7lld n %4lld k %6lld batches %6lld  max rel error %.2e  padding changed %lld\n",
              ok ? "ok" : "FAIL", test.name.c_str(), static_cast<long long>(test.m),
              static_cast<long long>(test.n), static_cast<long long>(test.k), static_cast<long long>(test.batches),
              worst, static_cast<long long>(touched));
  return ok;
}

// Sizes that do not agree are refused; empty products launch nothing and leave C alone.
bool check_contract() {
  bool ok = true;
  float* c_device = upload(std::vector<float>{kNaN});
  const GemmOutput c{c_device, 0, 4, 4, 0};
  try {
    slattn::cuda::gemm(1, GemmOperand{c_device, 3, 2, 2, 1, 6}, GemmOperand{c_device, 5, 4, 4, 1, 20},
                       GemmOutput{c_device, 3, 4, 4, 12}, nullptr);
    ok = false;
  } catch (const slattn::Error&) {
  }
  slattn::cuda::gemm(1, GemmOperand{c_device, 0, 2, 2, 1, 0}, GemmOperand{c_device, 2, 4, 4, 1, 8}, c, nullptr);
  slattn::cuda::gemm(0, GemmOperand{c_device, 3, 2, 2, 1, 6}, GemmOperand{c_device, 2, 4, 4, 1, 8},
                     GemmOutput{c_device, 3, 4, 4, 12}, nullptr);
  SLATTN_CUDA_CHECK(cudaDeviceSynchronize());
  float after = 0.0f;
  SLATTN_CUDA_CHECK(cudaMemcpy(&after, c_device, sizeof(float), cudaMemcpyDeviceToHost));
  SLATTN_CUDA_CHECK(cudaFree(c_device));
  ok = ok && std::isnan(after);
  std::printf("%-4s %s\n", ok ? "ok" : "FAIL", "size check throws; empty products leave C alone");
  return ok;
}

std::vector<Case> cases() {
  std::vector<Case> list;
  const int64_t sizes[] = {1, 7, 64, 100, 129};
  int index = 0;
  for (int64_t m : sizes)  // every ragged combination, cycling through the four transpositions and β
    for (int64_t n : sizes)
      for (int64_t k : sizes) {
        Case test{"ragged", m, n, k, 1};
        test.a.transposed = index % 2 == 1;
        test.b.transposed = index / 2 % 2 == 1;
        test.beta = index % 3 == 0 ? 1.0f : 0.0f;
        test.name += std::string(test.a.transposed ? " A^T" : "") + (test.b.transposed ? " B^T" : "") +
                     (test.beta != 0.0f ? " beta 1" : "");
        list.push_back(test);
        ++index;
      }
  // {transposed, step, pad, batch_pad, offset}
  const Layout dense{false, 1, 0, 0, 0}, transposed{true, 1, 0, 0, 0};
  const Layout strided{false, 2, 3, 1, 0}, strided_t{true, 2, 3, 1, 0};          // neither stride 1
  const Layout padded{false, 1, 3, 0, 0}, padded_t{true, 1, 3, 0, 0};            // aligned rows iff 4 | cols + 3
  const Layout odd_batches{false, 1, 0, 1, 0}, odd_batches_t{true, 1, 0, 1, 0};  // batches not 16-byte aligned
  const Layout shifted{false, 1, 0, 0, 1}, shifted_t{true, 1, 0, 0, 1};          // base not 16-byte aligned
  const OutLayout odd_c{3, 1};                                                    // C pairs not 8-byte aligned
  list.push_back({"long k", 7, 5, 32768, 1, dense, dense});
  list.push_back({"long k, 1x1", 1, 1, 32768, 1, dense, transposed});
  list.push_back({"long k, A^T (dW)", 64, 64, 32768, 1, transposed, dense});
  Case long_ragged{"long ragged k, A^T B^T", 129, 100, 32760, 2, transposed, transposed, {}, 1.0f};
  long_ragged.row_step = 3;
  list.push_back(long_ragged);
  list.push_back({"k = 0, beta 0.5", 7, 9, 0, 2, dense, dense, {}, 0.5f});
  list.push_back({"k = 0, beta 0", 7, 9, 0, 2, dense, dense});
  list.push_back({"strided A B", 100, 129, 70, 3, strided, strided});
  list.push_back({"strided A^T B^T, odd C", 129, 7, 100, 3, strided_t, strided_t, odd_c, 1.0f});
  list.push_back({"padded A, strided B^T", 64, 100, 129, 3, padded, strided_t, {2, 0}});
  list.push_back({"padded A^T B^T, odd C", 100, 64, 64, 3, padded_t, padded_t, odd_c});
  // Aligned rows of ragged length: 16-byte copies that end part-way.
  list.push_back({"padded A B^T, part runs of k", 100, 61, 129, 3, padded, padded_t, {}, 1.0f});
  list.push_back({"padded A^T B, part runs of m n", 125, 61, 77, 3, padded_t, padded});
  list.push_back({"odd batch strides", 64, 64, 64, 3, odd_batches, odd_batches_t});
  list.push_back({"shifted A B^T", 65, 63, 33, 3, shifted, shifted_t, {}, 1.0f});
  list.push_back({"shifted A^T B, odd C", 63, 65, 31, 3, shifted_t, shifted, odd_c, 1.0f});
  list.push_back({"dense, beta 0.5", 129, 129, 129, 3, dense, dense, {}, 0.5f});
  list.push_back({"70000 tiny batches", 7, 7, 7, 70000, dense, dense});
  list.push_back({"70000 tiny batches A^T B^T, beta 1", 3, 5, 2, 70000, transposed, transposed, {}, 1.0f});
  list.push_back({"70000 tiny batches, strided", 2, 3, 9, 70000, strided, padded, odd_c});
  list.push_back({"ol = phi_q H", 64, 128, 128, 5, dense, dense});
  list.push_back({"h = phi_k^T V", 128, 128, 64, 5, transposed, dense});
  list.push_back({"dQphi = G H^T", 64, 128, 128, 5, dense, transposed});
  list.push_back({"dV += phi_k dh, beta 1", 64, 128, 128, 5, dense, dense, {}, 1.0f});
  Case projection{"Os += Ol W^T, beta 1", 393216, 128, 128, 1, dense, transposed, {}, 1.0f};
  projection.row_step = 997;
  list.push_back(projection);
  Case tall{"more than 65535 row tiles", 65536 * 64 + 65, 8, 8, 1, dense, dense};
  tall.row_step = 9973;
  list.push_back(tall);
  Case weight{"dW = dO^T Ol", 128, 128, 32760, 3, transposed, dense};
  weight.row_step = 5;
  weight.batch_step = 2;
  list.push_back(weight);
  return list;
}

__global__ void fill_uniform(float* data, int64_t count, uint32_t seed) {
  for (int64_t i = blockIdx.x * int64_t{blockDim.x} + threadIdx.x; i < count; i += int64_t{gridDim.x} * blockDim.x) {
    uint32_t x = static_cast<uint32_t>(i) * 2654435761u ^ seed;
    x ^= x >> 15;
    x *= 2246822519u;
    x ^= x >> 13;
    data[i] = static_cast<float>(x) / 4294967296.0f * 2.0f - 1.0f;
  }
}

float* device_random(int64_t count, uint32_t seed) {
  constexpr int kFillThreads = 256, kFillBlocks = 1024;
  float* data = nullptr;
  SLATTN_CUDA_CHECK(cudaMalloc(&data, count * sizeof(float)));
  fill_uniform<<<kFillBlocks, kFillThreads>>>(data, count, seed);
  SLATTN_CUDA_CHECK(cudaGetLastError());
  return data;
}

// Mean time of one call of C = A B (+ β C), A = a per batch, after warm-up.
void time_shape(const char* name, int64_t batches, GemmOperand a, GemmOperand b, GemmOutput c, float beta) {
  constexpr int kWarmup = 3, kRepeats = 20;
  float* a_device = device_random(batches * a.batch_stride, 1);
  float* b_device = device_random(batches * b.batch_stride, 2);
  float* c_device = device_random(batches * c.batch_stride, 3);
  a.data = a_device;
  b.data = b_device;
  c.data = c_device;
  cudaEvent_t start, stop;
  SLATTN_CUDA_CHECK(cudaEventCreate(&start));
  SLATTN_CUDA_CHECK(cudaEventCreate(&stop));
  for (int i = 0; i < kWarmup; ++i) slattn::cuda::gemm(batches, a, b, c, nullptr, beta);
  SLATTN_CUDA_CHECK(cudaEventRecord(start));
  for (int i = 0; i < kRepeats; ++i) slattn::cuda::gemm(batches, a, b, c, nullptr, beta);
  SLATTN_CUDA_CHECK(cudaEventRecord(stop));
  SLATTN_CUDA_CHECK(cudaEventSynchronize(stop));
  float total_ms = 0.0f;
  SLATTN_CUDA_CHECK(cudaEventElapsedTime(&total_ms, start, stop));
  const double ms = total_ms / kRepeats;
  const double flops = 2.0 * a.rows * b.cols * a.cols * batches;
  std::printf("time %-34s %9.3f ms  %7.2f TFLOPS\n", name, ms, flops / (ms * 1e-3) / 1e12);
  SLATTN_CUDA_CHECK(cudaEventDestroy(start));
  SLATTN_CUDA_CHECK(cudaEventDestroy(stop));
  SLATTN_CUDA_CHECK(cudaFree(a_device));
  SLATTN_CUDA_CHECK(cudaFree(b_device));
  SLATTN_CUDA_CHECK(cudaFree(c_device));
}

// The products of one SLA forward + backward at B1 H12 L32760 D128, block 64.
void time_sla_shapes() {
  using slattn::cuda::dense;
  using slattn::cuda::dense_out;
  constexpr int64_t kHeads = 12, kRows = 32760, kBlock = 64, kDim = 128;
  constexpr int64_t kBlocks = kHeads * ((kRows + kBlock - 1) / kBlock);  // query (or key) blocks: 6144
  constexpr int64_t kAllRows = kBlocks * kBlock;
  time_shape("6144 x (64x128)(128x128)", kBlocks, dense(nullptr, kBlock, kDim), dense(nullptr, kDim, kDim),
             dense_out(nullptr, kBlock, kDim), 0.0f);
  time_shape("6144 x (64x128)^T(64x128)", kBlocks, dense(nullptr, kBlock, kDim, true), dense(nullptr, kBlock, kDim),
             dense_out(nullptr, kDim, kDim), 0.0f);
  time_shape("6144 x (64x128)(128x128)^T", kBlocks, dense(nullptr, kBlock, kDim), dense(nullptr, kDim, kDim, true),
             dense_out(nullptr, kBlock, kDim), 0.0f);
  time_shape("(393216x128)(128x128)^T + C", 1, dense(nullptr, kAllRows, kDim), dense(nullptr, kDim, kDim, true),
             dense_out(nullptr, kAllRows, kDim), 1.0f);
  time_shape("12 x (32760x128)^T(32760x128)", kHeads, dense(nullptr, kRows, kDim, true), dense(nullptr, kRows, kDim),
             dense_out(nullptr, kDim, kDim), 0.0f);
  constexpr int64_t kChunkRows = 2048;  // dW as partial products over chunks of 32 query blocks
  time_shape("192 x (2048x128)^T(2048x128)", kAllRows / kChunkRows, dense(nullptr, kChunkRows, kDim, true),
             dense(nullptr, kChunkRows, kDim), dense_out(nullptr, kDim, kDim), 0.0f);
}

}  // namespace

int main() {
  try {
    std::mt19937 rng(20240601);
    int failures = check_contract() ? 0 : 1;
    for (const Case& test : cases()) failures += run_case(test, rng) ? 0 : 1;
    std::printf("%d failed\n", failures);
    time_sla_shapes();
    return failures == 0 ? 0 : 1;
  } catch (const std::exception& error) {
    std::printf("FAIL %s\n", error.what());
    return 1;
  }
}
