// Forward of the low-bit sparse branch on Hopper (sm_90a), over the operands
// of quantize_operands.cu: the schedule of sparse_forward_wgmma.cu (key tiles
// of a whole block double-buffered by cp.async) with 8-bit products, and a
// thread block of one warpgroup per 64 query rows, three per SM: they overlap
// each other's products and softmax with no barrier between them, though a
// 128-row query block's K/V tiles are then read twice. On an H100 at the
// Wan2.1-1.3B shape (128-blocks) one block of two warpgroups per query block
// took 878 us, two 64-row blocks per SM 861 us, three 697 us (at 168
// registers, the head dim 128 builds spill 4-20 bytes). Per tile:
//   S = Q Kᵀ in int32 (INT8 tensor cores), exact; logits = S · q step · k step;
//   the online softmax of the bf16 kernel with P and its row sums 448 times
//   larger (the row sums from P unrounded);
//   448 P to e4m3 in registers, O_tile = P V on FP8 tensor cores into fresh
//   accumulators (their internal sums are narrower than fp32), O += O_tile in fp32.
// The epilogue divides by the row sums, which cancels the 448, and applies V's
// channel scales.
#include "cuda/common.cuh"
#include "cuda/sla_cuda.h"
#include "cuda/sparse_forward_steps.cuh"
#include "cuda/sparse_mainloops.h"
#include "cuda/sparse_quantized.h"
#include "cuda/wgmma.cuh"

namespace slattn::cuda {
namespace {

#if defined(__CUDA_ARCH_FEAT_SM90_ALL)  // used by the sm_90a kernel body only
// P in [0, 1] is stored as e4m3(448 P), 448 the largest e4m3 value: exp2 offset log2(448).
constexpr float kLog2E4m3Max = 8.807354922057604f;

// x as fp32 for |x| < 2^22 (an INT8 dot product of up to 128 terms is below
// 127² · 128 < 2^21): the bits of 1.5 · 2^23 + x, less 1.5 · 2^23. Two
// full-rate operations instead of a conversion at a quarter of their rate.
__device__ __forceinline__ float small_int_to_float(int32_t x) {
  constexpr int32_t kMagicBits = 0x4B400000;  // 1.5 · 2^23 as fp32
  constexpr float kMagic = 12582912.0f;
  return __int_as_float(x + kMagicBits) - kMagic;
}
#endif

template <int kHeadDim, int kKeyTile>
struct QuantizedForwardShared {
  ByteTile<kWarpgroupRows, kHeadDim> q;  // the thread block's 64 query rows
  ByteTile<kKeyTile, kHeadDim> k[2];  // double-buffered: the next tile loads during this one's math
  ByteTile<kHeadDim, kKeyTile> v[2];  // Vᵀ: a row per channel, K-major for the FP8 product
};

// Key blocks the row list may hold: it is copied to shared memory in 16 bits,
// which keeps three thread blocks per SM up to 1024 key blocks of 128 (the
// Wan2.1-14B shape has 591).
using ListEntry = uint16_t;
constexpr int64_t kMaxKeyBlocks = 65535;

// The tiles, with room to align the dynamic buffer to the swizzle atom; the
// launch adds the row list (k_blocks entries), copied after the tiles.
template <int kHeadDim, int kKeyTile>
constexpr size_t quantized_forward_shared_bytes() {
  return sizeof(QuantizedForwardShared<kHeadDim, kKeyTile>) + kSwizzleAtomBytes;
}

template <typename Element, int kHeadDim, int kBlockQ, int kKeyTile>
__global__ void __launch_bounds__(kWarpgroupThreads, 3)
    sparse_forward_quantized_kernel(Geometry g, RoutingPlanView plan, SparseForwardArgs a, QuantizedOperands ops) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  static_assert(127 * 127 * kHeadDim < (1 << 22), "S must stay within small_int_to_float's range");
  constexpr int kThreads = kWarpgroupThreads;
  using Shared = QuantizedForwardShared<kHeadDim, kKeyTile>;
  extern __shared__ unsigned char raw[];
  Shared& s = *reinterpret_cast<Shared*>(align_shared(raw, kSwizzleAtomBytes));

  const int warp = threadIdx.x / kWarpSize;  // owns query rows 16 warp .. 16 warp + 15 of the thread block's
  constexpr int kCtasPerBlock = kBlockQ / kWarpgroupRows;
  const int64_t m = blockIdx.x / kCtasPerBlock, h = blockIdx.y, b = blockIdx.z;
  const int64_t q_pair = b * g.heads + h, kv_pair = b * g.kv_heads + h / g.group();
  const int64_t row0 = m * kBlockQ + blockIdx.x % kCtasPerBlock * kWarpgroupRows;

  s.q.template load<kThreads>(reinterpret_cast<const uint8_t*>(ops.q) + q_pair * g.q_rows() * kHeadDim, kHeadDim,
                              row0);
  cp_async_commit();
  const uint8_t* k_rows = reinterpret_cast<const uint8_t*>(ops.k) + kv_pair * g.k_rows() * kHeadDim;
  const uint8_t* v_rows = ops.v + kv_pair * kHeadDim * g.k_rows();
  const float* k_steps = ops.k_steps + kv_pair * g.k_blocks;
  const float q_scale_log2 = a.scale * kLog2e * ops.q_steps[q_pair * g.q_blocks + m];

  float row_max[2] = {-INFINITY, -INFINITY}, row_sum[2] = {0.0f, 0.0f};
  float out[kHeadDim / 8][4] = {};

  const auto tiles = shared_row_tiles<kKeyTile, kThreads>(g, plan, q_pair, m,
                                                          reinterpret_cast<ListEntry*>(&s + 1));  // after the tiles
  const int32_t total = tiles.count();
  auto load_keys = [&](int32_t t) {
    const int64_t first = tiles.first(t);
    s.k[t & 1].template load<kThreads>(k_rows, kHeadDim, first);
    s.v[t & 1].template load<kThreads>(v_rows + first, g.k_rows(), 0);  // channels 0..D, keys first..
    cp_async_commit();
  };
  if (total > 0) load_keys(0);
  for (int32_t t = 0; t < total; ++t) {
    const int buffer = t & 1;
    await_tile<true>(t, total, load_keys);  // tile t (and Q) is complete and visible to the tensor cores
    const int64_t first = tiles.first(t), end = tiles.end(t);

    uint64_t q_desc = k_major_descriptor(s.q), k_desc = k_major_descriptor(s.k[buffer]);
    opaque(q_desc);
    int32_t exact[kKeyTile / 8][4];
    wgmma_fence();
#pragma unroll
    for (int step = 0; step < kHeadDim / 32; ++step)  // S = Q Kᵀ, 32 head dims a step
      wgmma_ss_s8<kKeyTile>(exact, q_desc + byte_tile_offset(0, step),
                            k_desc + byte_tile_offset(0, step), step > 0);
    wgmma_commit();
    wgmma_wait<0>();
    fence_accumulators(exact);

    float score[kKeyTile / 8][4];
#pragma unroll
    for (int j = 0; j < kKeyTile / 8; ++j)
#pragma unroll
      for (int e = 0; e < 4; ++e) score[j][e] = small_int_to_float(exact[j][e]);
    online_softmax_step<KeyMask::partial_tiles>(score, out, row_max, row_sum, first, end,
                                                q_scale_log2 * k_steps[first / g.block_k], kLog2E4m3Max);

    uint32_t p[kKeyTile / 32][4];
    accumulators_to_e4m3_fragments<kKeyTile>(score, p);
    uint64_t v_desc = k_major_descriptor(s.v[buffer]);
    opaque(v_desc);
    float tile_out[kHeadDim / 8][4];
    wgmma_fence();
#pragma unroll
    for (int step = 0; step < kKeyTile / 32; ++step)  // O_tile = P V, 32 keys a step
      wgmma_rs_e4m3<kHeadDim>(tile_out, p[step], v_desc + byte_tile_offset(0, step), step > 0);
    wgmma_commit();
    wgmma_wait<0>();
    fence_accumulators(tile_out);
#pragma unroll
    for (int j = 0; j < kHeadDim / 8; ++j)
#pragma unroll
      for (int e = 0; e < 4; ++e) out[j][e] += tile_out[j][e];
    __syncthreads();  // every warpgroup is done with `buffer` before tile t + 2 is loaded into it
  }

  cp_async_wait<0>();  // nothing left in flight when no tile was walked
  const float* v_scales = ops.v_scales + kv_pair * kHeadDim;
#pragma unroll
  for (int j = 0; j < kHeadDim / 8; ++j)
#pragma unroll
    for (int e = 0; e < 4; ++e) out[j][e] *= v_scales[accumulator_col(j, e)];
  for (float& peak : row_max) peak -= kLog2E4m3Max;  // the LSE of P, not of 448 P
  store_forward_rows<Element, kHeadDim>(g, a, b, h, row0 + warp * kRowsPerWarp, out, row_max, row_sum);
#endif
}

constexpr const char* kNeedsHopper =
    "quantized=True on CUDA needs a compute capability 9.0 GPU and a build with sm_90a code (the CPU path "
    "computes it as fake quantization)";

// Calls fn(kernel, shared bytes, thread blocks per query block) for the kernel of g's shape.
template <typename Fn>
void with_quantized_kernel(const Geometry& g, DType dtype, Fn&& fn) {
  dispatch_sparse_kernel(dtype, g, [&](auto tag, auto head_dim, auto block_q, auto block_k) {
    using Element = decltype(tag);
    constexpr int D = decltype(head_dim)::value, BQ = decltype(block_q)::value, BK = decltype(block_k)::value;
    fn(sparse_forward_quantized_kernel<Element, D, BQ, BK>,
       quantized_forward_shared_bytes<D, BK>() + g.k_blocks * sizeof(ListEntry), BQ / kWarpgroupRows);
  });
}

}  // namespace

void check_quantized_support(const Geometry& g, DType dtype) {
  check_sparse_support(g);
  if (!current_device_is_hopper()) throw Unsupported(kNeedsHopper);
  with_quantized_kernel(g, dtype, [&](auto kernel, size_t shared, int) {
    if (!loaded_for_hopper(kernel)) throw Unsupported(kNeedsHopper);
    SLATTN_CHECK(g.k_blocks <= kMaxKeyBlocks && shared <= max_shared_per_block(), "quantized=True: a row list of ",
                 g.k_blocks, " key blocks does not fit in shared memory; use larger blocks");
  });
}

void sparse_forward_quantized(const Geometry& g, const RoutingPlanView& plan, const SparseForwardArgs& args,
                              const QuantizedOperands& ops, cudaStream_t stream) {
  with_quantized_kernel(g, args.q.dtype, [&](auto kernel, size_t shared, int ctas_per_block) {
    const dim3 grid(static_cast<unsigned>(g.q_blocks * ctas_per_block), static_cast<unsigned>(g.heads),
                    static_cast<unsigned>(g.batch));
    launch_with_shared(kernel, grid, kWarpgroupThreads, shared, stream, g, plan, args, ops);
  });
  SLATTN_LAUNCH_CHECK("sparse_forward_quantized_kernel");
}

}  // namespace slattn::cuda
