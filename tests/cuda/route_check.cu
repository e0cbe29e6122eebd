// Checks the CUDA router against the CPU router through the public entry
// points (device pointers run the CUDA path, host pointers the CPU path):
// every tensor of the plan (block map, row counts and lists, column counts
// and lists) must be identical, on random inputs, on inputs full of exact or
// near ties, and on the edge shapes of STYLE.md rule 7. Then times the CUDA
// router at B1 H12 L32760 D128, blocks 64, topk 0.05. Run by hand on a GPU;
// exits non-zero on any mismatch.
//
// Build and run from the repository root (a few minutes; sm_80: arch=compute_80,code=sm_80):
//   nvcc -std=c++17 -O3 --expt-relaxed-constexpr -gencode arch=compute_90a,code=sm_90a -DSLATTN_WITH_CUDA=1 -Xcompiler -ffp-contract=off -Iinclude -Isrc tests/cuda/route_check.cu src/*.cpp src/cpu/*.cpp src/cuda/*.cu -o /tmp/route_check && /tmp/route_check
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <exception>
#include <limits>
#include <random>
#include <string>
#include <vector>

#include "slattn/sla.h"

namespace {

using slattn::DType;
using slattn::PlanShape;
using slattn::RoutingPlanView;
using slattn::TensorView;

constexpr int kWarmup = 3;
constexpr int kTimed = 20;

void cuda_check(cudaError_t status, const char* what) {
  if (status != cudaSuccess) throw std::runtime_error(std::string(what) + ": " + cudaGetErrorString(status));
}

// What the inputs hold.
enum class Fill {
  kRandom,      // normal entries
  kFewRows,     // Q constant; every row of K one of three random rows: many equal scores
  kBlockTies,   // Q constant; K constant within a block, one of three rows: exactly tied blocks
  kZeroKey,     // K all zero: every score is 0
  kNearTies,    // Q and K rows one random row plus small noise: scores close together
  kNaNKey,      // random, with one NaN in K: a head whose scores are NaN for some blocks
};

struct Case {
  std::string name;
  int64_t batch, q_heads, kv_heads, q_len, k_len, dim, block_q, block_k;
  double topk, negligible;
  Fill fill = Fill::kRandom;
  bool nhd = false;
  DType dtype = DType::bfloat16;
};

uint16_t to_bits(float value, DType dtype) {
  uint16_t bits;
  if (dtype == DType::bfloat16) {
    const __nv_bfloat16 x = __float2bfloat16(value);
    std::memcpy(&bits, &x, sizeof(bits));
  } else {
    const __half x = __float2half(value);
    std::memcpy(&bits, &x, sizeof(bits));
  }
  return bits;
}

// A (B, H, L, D) tensor in the case's layout, host side.
struct HostTensor {
  std::vector<uint16_t> data;
  TensorView view;
};

HostTensor make_input(const Case& c, int64_t heads, int64_t length, bool is_query, std::mt19937& rng) {
  std::normal_distribution<float> normal;
  std::vector<std::vector<float>> rows(3, std::vector<float>(static_cast<size_t>(c.dim)));
  for (auto& row : rows)
    for (float& x : row) x = normal(rng);
  HostTensor t;
  t.data.resize(static_cast<size_t>(c.batch * heads * length * c.dim));
  t.view.dtype = c.dtype;
  t.view.size = {c.batch, heads, length, c.dim};
  t.view.stride = c.nhd ? std::array<int64_t, 4>{length * heads * c.dim, c.dim, heads * c.dim, 1}
                        : std::array<int64_t, 4>{heads * length * c.dim, length * c.dim, c.dim, 1};
  for (int64_t b = 0; b < c.batch; ++b)
    for (int64_t h = 0; h < heads; ++h)
      for (int64_t l = 0; l < length; ++l)
        for (int64_t d = 0; d < c.dim; ++d) {
          float x = normal(rng);
          const auto channel = static_cast<size_t>(d);
          switch (c.fill) {
            case Fill::kRandom: break;
            case Fill::kFewRows: x = is_query ? 0.5f : rows[static_cast<size_t>((l * 7 + h) % 3)][channel]; break;
            case Fill::kBlockTies:
              x = is_query ? 0.25f : rows[static_cast<size_t>(l / c.block_k % 3)][channel];
              break;
            case Fill::kZeroKey: x = is_query ? x : 0.0f; break;
            case Fill::kNearTies: x = rows[is_query ? 0 : 1][channel] + (is_query ? 0.5f : 0.02f) * x; break;
            case Fill::kNaNKey:
              if (!is_query && l == length / 2 && d == 1) x = std::numeric_limits<float>::quiet_NaN();
              break;
          }
          const int64_t at = b * t.view.stride[0] + h * t.view.stride[1] + l * t.view.stride[2] + d;
          t.data[static_cast<size_t>(at)] = to_bits(x, c.dtype);
        }
  t.view.data = t.data.data();
  return t;
}

template <typename T>
struct DeviceBuffer {
  T* data = nullptr;
  explicit DeviceBuffer(size_t count) { cuda_check(cudaMalloc(&data, count * sizeof(T) + 1), "cudaMalloc"); }
  ~DeviceBuffer() { cudaFree(data); }
  DeviceBuffer(const DeviceBuffer&) = delete;
  DeviceBuffer& operator=(const DeviceBuffer&) = delete;
};

template <typename T>
std::vector<T> to_host(const T* device, size_t count) {
  std::vector<T> host(count);
  cuda_check(cudaMemcpy(host.data(), device, count * sizeof(T), cudaMemcpyDeviceToHost), "cudaMemcpy");
  return host;
}

// The five tensors of a plan, in host vectors.
struct HostPlan {
  std::vector<int8_t> block_map;
  std::vector<int32_t> row_count, row_index, col_count, col_index;

  explicit HostPlan(const PlanShape& s)
      : block_map(static_cast<size_t>(s.rows() * s.k_blocks()), 7),
        row_count(static_cast<size_t>(s.rows()), 7),
        row_index(static_cast<size_t>(s.rows() * s.k_blocks()), 7),
        col_count(static_cast<size_t>(s.cols()), 7),
        col_index(static_cast<size_t>(s.cols() * s.q_blocks()), 7) {}
  RoutingPlanView view(const PlanShape& s) {
    return {s, block_map.data(), row_count.data(), row_index.data(), col_count.data(), col_index.data()};
  }
};

struct DevicePlan {
  PlanShape shape;
  DeviceBuffer<int8_t> block_map;
  DeviceBuffer<int32_t> row_count, row_index, col_count, col_index;

  explicit DevicePlan(const PlanShape& s)
      : shape(s),
        block_map(static_cast<size_t>(s.rows() * s.k_blocks())),
        row_count(static_cast<size_t>(s.rows())),
        row_index(static_cast<size_t>(s.rows() * s.k_blocks())),
        col_count(static_cast<size_t>(s.cols())),
        col_index(static_cast<size_t>(s.cols() * s.q_blocks())) {
    // A byte pattern no router writes, so that a missed entry shows.
    cuda_check(cudaMemset(block_map.data, 0x55, static_cast<size_t>(s.rows() * s.k_blocks())), "cudaMemset");
    cuda_check(cudaMemset(row_index.data, 0x55, static_cast<size_t>(s.rows() * s.k_blocks()) * 4), "cudaMemset");
    cuda_check(cudaMemset(col_index.data, 0x55, static_cast<size_t>(s.cols() * s.q_blocks()) * 4), "cudaMemset");
  }
  RoutingPlanView view() const {
    return {shape, block_map.data, row_count.data, row_index.data, col_count.data, col_index.data};
  }
  HostPlan copy() const {
    HostPlan host(shape);
    host.block_map = to_host(block_map.data, host.block_map.size());
    host.row_count = to_host(row_count.data, host.row_count.size());
    host.row_index = to_host(row_index.data, host.row_index.size());
    host.col_count = to_host(col_count.data, host.col_count.size());
    host.col_index = to_host(col_index.data, host.col_index.size());
    return host;
  }
};

// The inputs on the device, and the router's params for them.
struct DeviceInputs {
  DeviceBuffer<uint16_t> q, k;
  slattn::RouteParams params;

  DeviceInputs(const HostTensor& host_q, const HostTensor& host_k, double topk, double negligible)
      : q(host_q.data.size()), k(host_k.data.size()) {
    cuda_check(cudaMemcpy(q.data, host_q.data.data(), host_q.data.size() * 2, cudaMemcpyHostToDevice), "cudaMemcpy");
    cuda_check(cudaMemcpy(k.data, host_k.data.data(), host_k.data.size() * 2, cudaMemcpyHostToDevice), "cudaMemcpy");
    params.q = host_q.view;
    params.q.data = q.data;
    params.k = host_k.view;
    params.k.data = k.data;
    params.topk = topk;
    params.negligible = negligible;
  }
};

template <typename T>
bool same(const char* what, const std::vector<T>& expected, const std::vector<T>& got) {
  for (size_t i = 0; i < expected.size(); ++i) {
    if (expected[i] == got[i]) continue;
    std::printf("    %s differs at %zu: CPU %d, CUDA %d\n", what, i, static_cast<int>(expected[i]),
                static_cast<int>(got[i]));
    return false;
  }
  return true;
}

bool check(const Case& c) {
  std::mt19937 rng(1234);
  const HostTensor q = make_input(c, c.q_heads, c.q_len, true, rng);
  const HostTensor k = make_input(c, c.kv_heads, c.k_len, false, rng);
  const PlanShape shape{c.batch, c.q_heads, c.q_len, c.k_len, c.block_q, c.block_k};

  HostPlan expected(shape);
  slattn::RouteParams host_params;
  host_params.q = q.view;
  host_params.k = k.view;
  host_params.topk = c.topk;
  host_params.negligible = c.negligible;
  slattn::route(host_params, expected.view(shape));

  DeviceInputs inputs(q, k, c.topk, c.negligible);
  const DevicePlan plan(shape);
  const size_t bytes = slattn::route_workspace_bytes(inputs.params, plan.view());
  DeviceBuffer<unsigned char> workspace(bytes);
  inputs.params.workspace = workspace.data;
  inputs.params.workspace_bytes = bytes;
  slattn::route(inputs.params, plan.view());
  cuda_check(cudaDeviceSynchronize(), "route");
  const HostPlan got = plan.copy();

  const bool ok = same("block_map", expected.block_map, got.block_map) &&
                  same("row_count", expected.row_count, got.row_count) &&
                  same("row_index", expected.row_index, got.row_index) &&
                  same("col_count", expected.col_count, got.col_count) &&
                  same("col_index", expected.col_index, got.col_index);
  std::printf("%-40s Mq %5lld Nk %5lld  %s\n", c.name.c_str(), static_cast<long long>(shape.q_blocks()),
              static_cast<long long>(shape.k_blocks()), ok ? "identical" : "MISMATCH");
  return ok;
}

// Mean time of one CUDA route call, in ms.
double time_route(const Case& c) {
  std::mt19937 rng(99);
  const HostTensor q = make_input(c, c.q_heads, c.q_len, true, rng);
  const HostTensor k = make_input(c, c.kv_heads, c.k_len, false, rng);
  DeviceInputs inputs(q, k, c.topk, c.negligible);
  const DevicePlan plan(PlanShape{c.batch, c.q_heads, c.q_len, c.k_len, c.block_q, c.block_k});
  const size_t bytes = slattn::route_workspace_bytes(inputs.params, plan.view());
  DeviceBuffer<unsigned char> workspace(bytes);
  inputs.params.workspace = workspace.data;
  inputs.params.workspace_bytes = bytes;
  for (int i = 0; i < kWarmup; ++i) slattn::route(inputs.params, plan.view());
  cudaEvent_t start, stop;
  cuda_check(cudaEventCreate(&start), "cudaEventCreate");
  cuda_check(cudaEventCreate(&stop), "cudaEventCreate");
  cuda_check(cudaEventRecord(start), "cudaEventRecord");
  for (int i = 0; i < kTimed; ++i) slattn::route(inputs.params, plan.view());
  cuda_check(cudaEventRecord(stop), "cudaEventRecord");
  cuda_check(cudaEventSynchronize(stop), "cudaEventSynchronize");
  float ms = 0.0f;
  cuda_check(cudaEventElapsedTime(&ms, start, stop), "cudaEventElapsedTime");
  cudaEventDestroy(start);
  cudaEventDestroy(stop);
  return ms / kTimed;
}

}  // namespace

int main() {
  const Case main_case{"B1 H12 L32760 D128 topk 0.05", 1, 12, 12, 32760, 32760, 128, 64, 64, 0.05, 0.0};
  const std::vector<Case> cases = {
      main_case,
      {"Lq 4000 != Lk 9000", 1, 4, 4, 4000, 9000, 128, 64, 64, 0.1, 0.0},
      {"L 1", 1, 2, 2, 1, 1, 128, 64, 64, 0.05, 0.0},
      {"Lq 1, Lk 777", 2, 2, 1, 1, 777, 64, 64, 64, 0.3, 0.2},
      {"ragged L 1000, blocks 64", 2, 3, 3, 1000, 1000, 128, 64, 64, 0.2, 0.1},
      {"ragged L 1000, blocks 128", 2, 3, 3, 1000, 1000, 128, 128, 128, 0.2, 0.1},
      {"ragged L 1000, blocks 64 / 128", 1, 3, 3, 1000, 1000, 128, 64, 128, 0.3, 0.0},
      {"GQA Hq 8, Hkv 2", 2, 8, 2, 4096, 4096, 128, 64, 64, 0.05, 0.0},
      {"GQA NHD fp16", 1, 8, 2, 3000, 5000, 128, 64, 64, 0.1, 0.1, Fill::kRandom, true, DType::float16},
      {"negligible 0.1", 1, 4, 4, 32760, 32760, 128, 64, 64, 0.05, 0.1},
      {"topk 1.0", 1, 4, 4, 8192, 8192, 128, 64, 64, 1.0, 0.0},
      {"d 64", 1, 8, 8, 16384, 16384, 64, 64, 64, 0.05, 0.0},
      {"d 64 NHD", 2, 4, 4, 5000, 5000, 64, 128, 128, 0.1, 0.05, Fill::kRandom, true},
      {"Nk 4096: L 262144, block 64", 1, 1, 1, 262144, 262144, 64, 64, 64, 0.05, 0.05},
      {"ties: Q constant, K of 3 rows", 1, 4, 2, 8192, 8192, 128, 64, 64, 0.1, 0.1, Fill::kFewRows},
      {"ties: K constant per block", 1, 4, 4, 8192, 8192, 128, 64, 64, 0.2, 0.3, Fill::kBlockTies},
      {"ties: K zero", 1, 2, 2, 4096, 4096, 128, 64, 64, 0.1, 0.1, Fill::kZeroKey},
      {"near ties", 1, 4, 4, 32760, 32760, 128, 64, 64, 0.05, 0.05, Fill::kNearTies},
      {"NaN in K", 1, 2, 2, 4096, 4096, 128, 64, 64, 0.1, 0.1, Fill::kNaNKey},
  };
  int failures = 0;
  for (const Case& c : cases) {
    try {
      failures += check(c) ? 0 : 1;
    } catch (const std::exception& e) {
      std::printf("%-40s threw: %s\n", c.name.c_str(), e.what());
      ++failures;
    }
  }
  try {
    std::printf("CUDA route, %s: %.4f ms (mean of %d)\n", main_case.name.c_str(), time_route(main_case), kTimed);
  } catch (const std::exception& e) {
    std::printf("timing threw: %s\n", e.what());
    ++failures;
  }
  std::printf("%d of %zu cases failed\n", failures, cases.size());
  return failures == 0 ? 0 : 1;
}
