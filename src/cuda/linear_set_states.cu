// The linear set's indicator from the block map, and its products with the
// per-block tiles on cuBLAS (linear_set_states.h).
#include "cuda/linear_set_states.h"

#include <cublas_v2.h>

#include <unordered_map>

#include "cuda/common.cuh"
#include "cuda/sla_cuda.h"
#include "cuda/subset_list.cuh"

namespace slattn::cuda {
namespace {

constexpr int kIndicatorThreads = 128;

void check_cublas(cublasStatus_t status, const char* what) {
  if (status != CUBLAS_STATUS_SUCCESS)
    throw Unsupported(detail::concat("cuBLAS error in ", what, ": ", cublasGetStatusString(status)));
}

// One handle per thread and device, made on first use and kept: creating one takes milliseconds, and a
// handle must not be shared by threads that set its stream and workspace at once.
cublasHandle_t cublas_handle() {
  thread_local std::unordered_map<int, cublasHandle_t> handles;
  int device = 0;
  SLATTN_CUDA_CHECK(cudaGetDevice(&device));
  const auto found = handles.find(device);
  if (found != handles.end()) return found->second;
  cublasHandle_t handle = nullptr;
  check_cublas(cublasCreate(&handle), "cublasCreate");
  handles.emplace(device, handle);
  return handle;
}

// Grid: a thread block per row of the indicator (kv pair * set_rows_padded + member * Mq + m); padding
// rows are zeros.
template <typename Element>
__global__ void __launch_bounds__(kIndicatorThreads)
    linear_set_indicator_kernel(Geometry g, const int8_t* block_map, int64_t rows_padded, int64_t columns,
                                LinearScope scope, Element* indicator, int32_t* set_size) {
  const int64_t kv_pair = blockIdx.x / rows_padded, row = blockIdx.x % rows_padded;
  const bool real = row < g.group() * g.q_blocks;
  const int64_t plan_row = kv_pair * g.group() * g.q_blocks + row;  // q pair * Mq + m
  const int8_t* classes = block_map + plan_row * g.k_blocks;
  Element* out = indicator + blockIdx.x * columns;
  int32_t size = 0;
  for (int64_t base = 0; base < columns; base += kIndicatorThreads) {  // the same trips on every thread
    const int64_t n = base + threadIdx.x;
    const bool in_set = real && n < g.k_blocks && in_linear_set(classes[n], scope);
    if (n < columns) out[n] = from_float<Element>(in_set ? 1.0f : 0.0f);
    size += __syncthreads_count(in_set);
  }
  if (real && threadIdx.x == 0) set_size[plan_row] = size;
}

// Zeroes tiles [real, padded) of each of `pairs` runs of `padded` tiles.
void zero_padding_tiles(void* tiles, int64_t pairs, int64_t real, int64_t padded, size_t tile_bytes,
                        cudaStream_t stream) {
  if (real == padded) return;
  SLATTN_CUDA_CHECK(cudaMemset2DAsync(static_cast<unsigned char*>(tiles) + real * tile_bytes, padded * tile_bytes, 0,
                                      (padded - real) * tile_bytes, static_cast<size_t>(pairs), stream));
}

size_t tile_bytes(const Geometry& g, DType dtype) {
  return static_cast<size_t>(g.features * g.dim) * dtype_size(dtype);
}

cudaDataType_t cublas_type(DType dtype) {
  SLATTN_CHECK(dtype == DType::bfloat16 || dtype == DType::float16,
               "the linear set's products take bfloat16 or float16, got ", dtype_name(dtype));
  return dtype == DType::bfloat16 ? CUDA_R_16BF : CUDA_R_16F;
}

// Per (batch, kv head): out (rows x F·D) = A · tiles (inner x F·D), all row-major in `dtype`, where A is the
// pair's block of the indicator (set_rows_padded x key_blocks_padded), or its transpose when `transposed`.
void indicator_product(const Geometry& g, DType dtype, bool transposed, const void* indicator, const void* tiles,
                       void* out, void* cublas_workspace, cudaStream_t stream) {
  const int64_t cols = g.features * g.dim, columns = key_blocks_padded(g);
  const int64_t rows = transposed ? columns : g.group() * g.q_blocks;
  const int64_t inner = transposed ? set_rows_padded(g) : columns;
  cublasHandle_t handle = cublas_handle();
  check_cublas(cublasSetStream(handle, stream), "cublasSetStream");
  check_cublas(cublasSetWorkspace(handle, cublas_workspace, kCublasWorkspaceBytes), "cublasSetWorkspace");
  const cudaDataType_t type = cublas_type(dtype);
  const float one = 1.0f, zero = 0.0f;
  // Column-major, as cuBLAS reads: outᵀ (cols x rows) = tilesᵀ (cols x inner) · Aᵀ (inner x rows). The
  // indicator block is stored row-major: Aᵀ is read as stored, or transposed when A is its transpose.
  check_cublas(cublasGemmStridedBatchedEx(
                   handle, CUBLAS_OP_N, transposed ? CUBLAS_OP_T : CUBLAS_OP_N, static_cast<int>(cols),
                   static_cast<int>(rows), static_cast<int>(inner), &one, tiles, type, static_cast<int>(cols),
                   inner * cols, indicator, type, static_cast<int>(columns), set_rows_padded(g) * columns, &zero, out,
                   type, static_cast<int>(cols), rows * cols, static_cast<int>(g.kv_pairs()), CUBLAS_COMPUTE_32F,
                   CUBLAS_GEMM_DEFAULT),
               "cublasGemmStridedBatchedEx");
}

}  // namespace

void linear_set_indicator(const Geometry& g, const RoutingPlanView& plan, LinearScope scope, DType dtype,
                          void* indicator, int32_t* set_size, cudaStream_t stream) {
  dispatch_element(dtype, [&](auto tag) {
    using Element = decltype(tag);
    linear_set_indicator_kernel<<<static_cast<unsigned>(g.kv_pairs() * set_rows_padded(g)), kIndicatorThreads, 0,
                                  stream>>>(g, plan.block_map, set_rows_padded(g), key_blocks_padded(g), scope,
                                            static_cast<Element*>(indicator), set_size);
  });
  SLATTN_LAUNCH_CHECK("linear_set_indicator_kernel");
}

void sum_set_states(const Geometry& g, DType dtype, const void* indicator, void* block_h, void* set_h,
                    void* cublas_workspace, cudaStream_t stream) {
  zero_padding_tiles(block_h, g.kv_pairs(), g.k_blocks, key_blocks_padded(g), tile_bytes(g, dtype), stream);
  indicator_product(g, dtype, false, indicator, block_h, set_h, cublas_workspace, stream);
}

void sum_key_set_grads(const Geometry& g, DType dtype, const void* indicator, void* dh_query, void* dh_key,
                       void* cublas_workspace, cudaStream_t stream) {
  zero_padding_tiles(dh_query, g.kv_pairs(), g.group() * g.q_blocks, set_rows_padded(g), tile_bytes(g, dtype),
                     stream);
  indicator_product(g, dtype, true, indicator, dh_query, dh_key, cublas_workspace, stream);
}

}  // namespace slattn::cuda
