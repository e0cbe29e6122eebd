// The low-bit sparse branch on CUDA (SPEC section 6), for inference and
// quantization-aware training: Q and K~ = K − mean(K) in INT8 with one step
// per block, V in FP8 e4m3 with one scale per channel (quantize_operands.cu,
// memory-bound passes), then the forward over them on Hopper
// (sparse_forward_quantized.cu): S = Q Kᵀ on INT8 tensor cores, P in e4m3 at
// a fixed scale of 448, each key tile's P V on FP8 tensor cores added to fp32
// accumulators. The CPU path (src/cpu/sparse_quantized.h) fixes the
// semantics; this path differs from it only in P's rounding, which is taken
// against the running row maximum instead of the final one.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "cuda/common.cuh"
#include "cuda/geometry.h"
#include "cuda/sparse_kernels.h"
#include "cuda/workspace.h"

namespace slattn::cuda {

// Keys per partial column statistic of K and V (the mean of K and the peak of |V| need every key first).
inline constexpr int kStatsChunkRows = 512;

// The quantized operands in the workspace: dense, padded with zero rows to
// whole blocks, so that every tile the copy engine reads is whole.
struct QuantizedOperands {
  int8_t* q = nullptr;            // (q pairs, q_rows, D)
  float* q_steps = nullptr;       // (q pairs, q_blocks): max |q| / 127 over the block
  int8_t* k = nullptr;            // (kv pairs, k_rows, D): K − mean(K)
  float* k_steps = nullptr;       // (kv pairs, k_blocks)
  uint8_t* v = nullptr;           // (kv pairs, D, k_rows) e4m3: Vᵀ, each 32 keys in e4m3-fragment order
  float* v_scales = nullptr;      // (kv pairs, D): max |v_c| / 448
  float* key_sums = nullptr;      // (kv pairs, chunks, D): column sums of K over each chunk of keys
  float* value_peaks = nullptr;   // (kv pairs, chunks, D): column maxima of |V| over each chunk
  float* key_means = nullptr;     // (kv pairs, D): mean(K), from key_sums

  SLATTN_HOST_DEVICE static int64_t chunks(const Geometry& g) { return ceil_div(g.k_len, kStatsChunkRows); }

  static QuantizedOperands carve(WorkspaceCarver& carver, const Geometry& g) {
    QuantizedOperands ops;
    ops.q = carver.take<int8_t>(g.q_pairs() * g.q_rows() * g.dim);
    ops.q_steps = carver.take<float>(g.q_pairs() * g.q_blocks);
    ops.k = carver.take<int8_t>(g.kv_pairs() * g.k_rows() * g.dim);
    ops.k_steps = carver.take<float>(g.kv_pairs() * g.k_blocks);
    ops.v = carver.take<uint8_t>(g.kv_pairs() * g.dim * g.k_rows());
    ops.v_scales = carver.take<float>(g.kv_pairs() * g.dim);
    ops.key_sums = carver.take<float>(g.kv_pairs() * chunks(g) * g.dim);
    ops.value_peaks = carver.take<float>(g.kv_pairs() * chunks(g) * g.dim);
    ops.key_means = carver.take<float>(g.kv_pairs() * g.dim);
    return ops;
  }
};

// Fills `ops` from q, k and v.
void quantize_operands(const Geometry& g, const TensorView& q, const TensorView& k, const TensorView& v,
                       const QuantizedOperands& ops, cudaStream_t stream);

// Raises Unsupported unless the current GPU and this build run the low-bit forward
// (compute capability 9.x, sm_90a code); call before any work is queued.
void check_quantized_support(const Geometry& g, DType dtype);

// The sparse branch's forward from quantized operands; writes what sparse_forward writes.
void sparse_forward_quantized(const Geometry& g, const RoutingPlanView& plan, const SparseForwardArgs& args,
                              const QuantizedOperands& ops, cudaStream_t stream);

}  // namespace slattn::cuda
