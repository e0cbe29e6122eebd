// Hopper warpgroup matrix products (wgmma, sm_90a) and the shared-memory
// tiles they read. A warpgroup (4 consecutive warps, 128 threads) multiplies
// a 64-row A (shared memory or registers) by a B in shared memory into fp32
// accumulators; the accumulators of warp w hold rows 16w..16w+15 laid out
// as mma.sync's (mma.cuh): float acc[N / 8][4], acc[j][e] at row
// 16w + lane / 4 + 8 (e / 2), column 8j + 2 (lane % 4) + e % 2. An A held in
// registers is, per warp, an m16n8k16 A fragment (four b16x2 registers).
// The 8-bit products (INT8 S = Q Kᵀ into int32, FP8 e4m3 O += P V into fp32;
// the low-bit sparse branch) take 32 K elements a step, and an A in
// registers is the m16n8k32 fragment (four 4-byte registers).
//
// Shared operands use the 128-byte swizzle: a (rows x cols) tile is stored
// as cols / 64 column chunks of (rows x 64) elements, each row 128 bytes
// whose 16-byte units are permuted by unit ^ (row % 8); chunks are
// 1024-byte aligned, so the permutation the tensor cores apply to the
// address bits matches the one the copies applied. 8-bit tiles (ByteTile)
// have rows of 64 or 128 bytes, swizzled over that width (64 bytes: units
// permuted by unit ^ (row / 2 % 4), the address bits the 64-byte mode uses).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_fp8.h>

#include <cstdint>
#include <type_traits>

#include "cuda/async_copy.cuh"
#include "cuda/common.cuh"
#include "cuda/mma.cuh"

namespace slattn::cuda {

inline constexpr int kWarpgroupThreads = 128;
inline constexpr int kWarpgroupRows = 64;  // the M of one wgmma
inline constexpr int kSwizzleBytes = 128;  // one row of a column chunk
inline constexpr int kSwizzleAtomBytes = 1024;  // 8 rows: the period of the swizzle

// (kRows x kCols) elements, 128-byte swizzled in column chunks of 64 (2-byte elements).
template <typename Element, int kRows, int kCols>
struct alignas(kSwizzleAtomBytes) SwizzledTile {
  static_assert(sizeof(Element) == 2, "16-bit elements: 64 per 128-byte row");
  static constexpr int kChunkCols = kSwizzleBytes / sizeof(Element);
  static constexpr int kUnitElements = 16 / sizeof(Element);
  static constexpr int kChunkBytes = kRows * kSwizzleBytes;
  static constexpr int kChunks = kCols / kChunkCols;
  static constexpr int kUnits = kRows * kCols / kUnitElements;  // 16-byte units of the tile
  static_assert(kRows % 8 == 0 && kCols % kChunkCols == 0, "whole swizzle atoms");
  Element data[kRows * kCols];

  // Column chunk c: kRows rows of kChunkCols elements.
  __device__ __forceinline__ Element* chunk(int c) { return data + c * kRows * kChunkCols; }

  // The 16-byte unit u (columns 8u..8u+7) of row r.
  __device__ __forceinline__ Element* unit(int r, int u) {
    const int chunk = u / (kChunkCols / kUnitElements), within = u % (kChunkCols / kUnitElements);
    return data + (chunk * kRows + r) * kChunkCols + (within ^ (r % 8)) * kUnitElements;
  }
  __device__ __forceinline__ const Element* unit(int r, int u) const {
    return const_cast<SwizzledTile*>(this)->unit(r, u);
  }

  // Columns 8j + 2 (lane % 4) and the next of row r, as one 4-byte word: a
  // thread's accumulator pair of tile j (wgmma's layout) at row r.
  __device__ __forceinline__ uint32_t& accumulator_pair(int r, int j) {
    return *reinterpret_cast<uint32_t*>(unit(r, j) + 2 * (threadIdx.x % 4));
  }
  __device__ __forceinline__ uint32_t accumulator_pair(int r, int j) const {
    return const_cast<SwizzledTile*>(this)->accumulator_pair(r, j);
  }
};

// (kRows x kBytes) 8-bit elements (INT8 or FP8), rows of 64 or 128 bytes
// swizzled over that width: the layout the tile copy engine writes for a box
// of kBytes x kRows (tma.cuh), read K-major by the 8-bit products.
template <int kRows, int kBytes>
struct alignas(kSwizzleAtomBytes) ByteTile {
  static_assert(kRows % 8 == 0 && (kBytes == 64 || kBytes == 128), "whole atoms of one swizzle width");
  uint8_t data[kRows * kBytes];
};

// What to add to a ByteTile's K-major descriptor for the operand at `row`
// (a multiple of 8) and K step `step32` (32 bytes each).
template <int kBytes>
__device__ __forceinline__ uint64_t byte_tile_offset(int row, int step32) {
  return (row * kBytes + step32 * 32) >> 4;
}

// The key whose P an e4m3 A fragment (k32) holds at column `column` of its
// 32, when the fragment is packed from fp32 accumulators in place
// (accumulators_to_e4m3_fragments): a thread's accumulators hold key pairs
// 8j + 2 quad + {0, 1}, its A fragment wants columns 4 quad + {0..3} (and
// 16 more). The product is the same if V's keys are stored in this order.
__host__ __device__ constexpr int key_of_e4m3_fragment_column(int column) {
  return (column & 0x11) | ((column & 0x2) << 2) | ((column & 0xC) >> 1);
}

// `raw` (the dynamic shared memory) advanced to the next multiple of `alignment` bytes of the shared window;
// the launch asks for `alignment` bytes more than the layout needs.
__device__ __forceinline__ unsigned char* align_shared(unsigned char* raw, uint32_t alignment) {
  const auto address = static_cast<uint32_t>(__cvta_generic_to_shared(raw));
  return raw + ((address + alignment - 1) / alignment * alignment - address);
}

// The shared-memory matrix descriptor of a 128-byte-swizzled operand at
// `start`: `leading` bytes between column chunks along M/N (used by
// MN-major operands), `stride` bytes between 8-row groups along K or M/N.
// swizzle_bytes: the width the 16-byte units are permuted over, 128 (the
// 16-bit tiles) or 64 (8-bit tiles of 64-byte rows).
__device__ __forceinline__ uint64_t swizzled_descriptor(const void* start, uint32_t leading, uint32_t stride,
                                                        uint32_t swizzle_bytes = kSwizzleBytes) {
  const auto address = static_cast<uint64_t>(__cvta_generic_to_shared(start));
  const uint64_t layout = swizzle_bytes == 128 ? 1 : 2;  // the descriptor's codes for the 128- and 64-byte swizzles
  return ((address & 0x3FFFF) >> 4) | (uint64_t(leading >> 4) << 16) | (uint64_t(stride >> 4) << 32) |
         (layout << 62);
}

// Descriptors of a SwizzledTile from its first element, read K-major (rows
// along M or N, columns along K: Q and K in S = Q Kᵀ) or MN-major (rows along
// K: V in O += P V).
template <typename Tile>
__device__ __forceinline__ uint64_t k_major_descriptor(const Tile& tile) {
  return swizzled_descriptor(tile.data, 16, kSwizzleAtomBytes);
}
template <typename Tile>
__device__ __forceinline__ uint64_t mn_major_descriptor(const Tile& tile) {
  return swizzled_descriptor(tile.data, Tile::kChunkBytes, kSwizzleAtomBytes);
}
template <int kRows, int kBytes>
__device__ __forceinline__ uint64_t k_major_descriptor(const ByteTile<kRows, kBytes>& tile) {
  constexpr uint32_t kAtomRows = 8;
  return swizzled_descriptor(tile.data, 16, kAtomRows * kBytes, kBytes);
}

// What to add to a tile's descriptor for the operand at `row` (a multiple
// of 8) and K step `step16` (16 columns each), K-major; and for K step
// `step16` (16 rows each), MN-major. The start address is in 16-byte units.
template <typename Tile>
__device__ __forceinline__ uint64_t k_major_offset(int row, int step16) {
  constexpr int kStepsPerChunk = Tile::kChunkCols / 16;
  return ((step16 / kStepsPerChunk) * Tile::kChunkBytes + row * kSwizzleBytes +
          (step16 % kStepsPerChunk) * 16 * int(sizeof(Tile::data[0]))) >> 4;
}
__device__ __forceinline__ uint64_t mn_major_offset(int step16) {
  return (step16 * 16 * kSwizzleBytes) >> 4;
}

// Hides `value`'s origin from the compiler, so that descriptors derived from
// it are formed next to their use instead of being hoisted out of the loop
// and held (two registers each) across it.
__device__ __forceinline__ void opaque(uint64_t& value) { asm volatile("" : "+l"(value)); }

// Before the first wgmma of a batch: earlier register writes (accumulators, A fragments) are visible to it.
__device__ __forceinline__ void wgmma_fence() {
  SLATTN_SM90A(asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory"));
}
__device__ __forceinline__ void wgmma_commit() {
  SLATTN_SM90A(asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory"));
}
// Waits until at most kPending committed batches of this warpgroup are in flight.
template <int kPending>
__device__ __forceinline__ void wgmma_wait() {
  SLATTN_SM90A(asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(kPending) : "memory"));
}

// P (64 x kCols, a warpgroup's fp32 accumulators) rounded to Element as the
// A fragments of kCols / 16 register-A products. Formed before the
// wgmma_fence of their batch: ptxas otherwise fences each product again.
template <typename Element, int kCols>
__device__ __forceinline__ void accumulators_to_fragments(const float (&p)[kCols / 8][4],
                                                          uint32_t (&fragments)[kCols / 16][4]) {
#pragma unroll
  for (int step = 0; step < kCols / 16; ++step) {
    fragments[step][0] = pack2<Element>(p[2 * step][0], p[2 * step][1]);
    fragments[step][1] = pack2<Element>(p[2 * step][2], p[2 * step][3]);
    fragments[step][2] = pack2<Element>(p[2 * step + 1][0], p[2 * step + 1][1]);
    fragments[step][3] = pack2<Element>(p[2 * step + 1][2], p[2 * step + 1][3]);
  }
}

// Four values as e4m3 bytes (round to nearest even, saturating), the first in the lowest byte.
__device__ __forceinline__ uint32_t pack4_e4m3(float x0, float x1, float x2, float x3) {
  const uint32_t low = __nv_cvt_float2_to_fp8x2(make_float2(x0, x1), __NV_SATFINITE, __NV_E4M3);
  const uint32_t high = __nv_cvt_float2_to_fp8x2(make_float2(x2, x3), __NV_SATFINITE, __NV_E4M3);
  return low | (high << 16);
}

// P (64 x kCols, fp32 accumulators) rounded to e4m3 as the A fragments of
// kCols / 32 register-A k32 products, each thread's values kept in place:
// column c of a fragment is key key_of_e4m3_fragment_column(c) of its 32.
template <int kCols>
__device__ __forceinline__ void accumulators_to_e4m3_fragments(const float (&p)[kCols / 8][4],
                                                               uint32_t (&fragments)[kCols / 32][4]) {
#pragma unroll
  for (int step = 0; step < kCols / 32; ++step) {
    const int j = 4 * step;
    fragments[step][0] = pack4_e4m3(p[j][0], p[j][1], p[j + 1][0], p[j + 1][1]);
    fragments[step][1] = pack4_e4m3(p[j][2], p[j][3], p[j + 1][2], p[j + 1][3]);
    fragments[step][2] = pack4_e4m3(p[j + 2][0], p[j + 2][1], p[j + 3][0], p[j + 3][1]);
    fragments[step][3] = pack4_e4m3(p[j + 2][2], p[j + 2][3], p[j + 3][2], p[j + 3][3]);
  }
}

// Keeps the compiler from moving accesses of the accumulators across the asynchronous products.
template <int kTiles>
__device__ __forceinline__ void fence_accumulators(float (&acc)[kTiles][4]) {
#pragma unroll
  for (int j = 0; j < kTiles; ++j)
#pragma unroll
    for (int e = 0; e < 4; ++e) asm volatile("" : "+f"(acc[j][e])::"memory");
}

template <int kTiles>
__device__ __forceinline__ void fence_accumulators(int32_t (&acc)[kTiles][4]) {
#pragma unroll
  for (int j = 0; j < kTiles; ++j)
#pragma unroll
    for (int e = 0; e < 4; ++e) asm volatile("" : "+r"(acc[j][e])::"memory");
}

#define SLATTN_WGMMA_ACC64(C, d) \
    C(d[0][0]), C(d[0][1]), C(d[0][2]), C(d[0][3]), C(d[1][0]), C(d[1][1]), C(d[1][2]), C(d[1][3]), \
    C(d[2][0]), C(d[2][1]), C(d[2][2]), C(d[2][3]), C(d[3][0]), C(d[3][1]), C(d[3][2]), C(d[3][3]), \
    C(d[4][0]), C(d[4][1]), C(d[4][2]), C(d[4][3]), C(d[5][0]), C(d[5][1]), C(d[5][2]), C(d[5][3]), \
    C(d[6][0]), C(d[6][1]), C(d[6][2]), C(d[6][3]), C(d[7][0]), C(d[7][1]), C(d[7][2]), C(d[7][3])
#define SLATTN_WGMMA_REGS64 "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31}"
#define SLATTN_WGMMA_ACC128(C, d) \
    C(d[0][0]), C(d[0][1]), C(d[0][2]), C(d[0][3]), C(d[1][0]), C(d[1][1]), C(d[1][2]), C(d[1][3]), \
    C(d[2][0]), C(d[2][1]), C(d[2][2]), C(d[2][3]), C(d[3][0]), C(d[3][1]), C(d[3][2]), C(d[3][3]), \
    C(d[4][0]), C(d[4][1]), C(d[4][2]), C(d[4][3]), C(d[5][0]), C(d[5][1]), C(d[5][2]), C(d[5][3]), \
    C(d[6][0]), C(d[6][1]), C(d[6][2]), C(d[6][3]), C(d[7][0]), C(d[7][1]), C(d[7][2]), C(d[7][3]), \
    C(d[8][0]), C(d[8][1]), C(d[8][2]), C(d[8][3]), C(d[9][0]), C(d[9][1]), C(d[9][2]), C(d[9][3]), \
    C(d[10][0]), C(d[10][1]), C(d[10][2]), C(d[10][3]), C(d[11][0]), C(d[11][1]), C(d[11][2]), C(d[11][3]), \
    C(d[12][0]), C(d[12][1]), C(d[12][2]), C(d[12][3]), C(d[13][0]), C(d[13][1]), C(d[13][2]), C(d[13][3]), \
    C(d[14][0]), C(d[14][1]), C(d[14][2]), C(d[14][3]), C(d[15][0]), C(d[15][1]), C(d[15][2]), C(d[15][3])
#define SLATTN_WGMMA_REGS128 "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, %48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63}"


// The operand numbers after the N / 2 accumulators are spelled out: %N/2 on.
#define SLATTN_WGMMA_SS(N, TYPE, A, B, S, TA, TB, SA)                                                       \
  asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, " S ", 0;\nwgmma.mma_async.sync.aligned.m64n" #N "k16.f32." \
               TYPE "." TYPE " " SLATTN_WGMMA_REGS##N ", " A ", " B ", p, " SA ", 1, " TA ", " TB ";\n}\n"   \
               : SLATTN_WGMMA_ACC##N("+f", d)                                                                    \
               : "l"(a), "l"(b), "r"(int(accumulate)), "n"(kTransA), "n"(kTransB), "n"(kScaleA))
#define SLATTN_WGMMA_RS(N, TYPE, A, B, S, TB)                                                               \
  asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, " S ", 0;\nwgmma.mma_async.sync.aligned.m64n" #N "k16.f32." \
               TYPE "." TYPE " " SLATTN_WGMMA_REGS##N ", " A ", " B ", p, 1, 1, " TB ";\n}\n"                \
               : SLATTN_WGMMA_ACC##N("+f", d)                                                                    \
               : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(b), "r"(int(accumulate)), "n"(kTransB))

// d (64 x N) = kScaleA A (64 x 16) · B (N x 16)ᵀ [+ d], both from shared memory
// (kTransA / kTransB: the operand is M-/N-major instead of K-major; kScaleA: 1 or -1).
template <typename Element, int N, int kTransA, int kTransB, int kScaleA = 1>
__device__ __forceinline__ void wgmma_ss(float (&d)[N / 8][4], uint64_t a, uint64_t b, bool accumulate) {
  static_assert(N == 64 || N == 128, "instantiated for N = 64 and 128");
  static_assert(kScaleA == 1 || kScaleA == -1, "the product takes A or -A");
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  if constexpr (N == 64 && std::is_same_v<Element, __nv_bfloat16>)
    SLATTN_WGMMA_SS(64, "bf16", "%32", "%33", "%34", "%35", "%36", "%37");
  else if constexpr (N == 64)
    SLATTN_WGMMA_SS(64, "f16", "%32", "%33", "%34", "%35", "%36", "%37");
  else if constexpr (std::is_same_v<Element, __nv_bfloat16>)
    SLATTN_WGMMA_SS(128, "bf16", "%64", "%65", "%66", "%67", "%68", "%69");
  else
    SLATTN_WGMMA_SS(128, "f16", "%64", "%65", "%66", "%67", "%68", "%69");
#endif
}

// d (64 x N) = A (64 x 16, this warp's m16n8k16 A fragment) · B (N x 16)ᵀ [+ d], B from shared memory.
template <typename Element, int N, int kTransB>
__device__ __forceinline__ void wgmma_rs(float (&d)[N / 8][4], const uint32_t (&a)[4], uint64_t b, bool accumulate) {
  static_assert(N == 64 || N == 128, "instantiated for N = 64 and 128");
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  if constexpr (N == 64 && std::is_same_v<Element, __nv_bfloat16>)
    SLATTN_WGMMA_RS(64, "bf16", "{%32, %33, %34, %35}", "%36", "%37", "%38");
  else if constexpr (N == 64)
    SLATTN_WGMMA_RS(64, "f16", "{%32, %33, %34, %35}", "%36", "%37", "%38");
  else if constexpr (std::is_same_v<Element, __nv_bfloat16>)
    SLATTN_WGMMA_RS(128, "bf16", "{%64, %65, %66, %67}", "%68", "%69", "%70");
  else
    SLATTN_WGMMA_RS(128, "f16", "{%64, %65, %66, %67}", "%68", "%69", "%70");
#endif
}

// The 8-bit products take 32 K elements a step and read both shared operands K-major.
#define SLATTN_WGMMA_S8(N, A, B, S)                                                                      \
  asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, " S ", 0;\nwgmma.mma_async.sync.aligned.m64n" #N      \
               "k32.s32.s8.s8 " SLATTN_WGMMA_REGS##N ", " A ", " B ", p;\n}\n"                          \
               : SLATTN_WGMMA_ACC##N("+r", d)                                                          \
               : "l"(a), "l"(b), "r"(int(accumulate)))
#define SLATTN_WGMMA_E4M3_RS(N, A, B, S)                                                                 \
  asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, " S ", 0;\nwgmma.mma_async.sync.aligned.m64n" #N      \
               "k32.f32.e4m3.e4m3 " SLATTN_WGMMA_REGS##N ", " A ", " B ", p, 1, 1;\n}\n"                 \
               : SLATTN_WGMMA_ACC##N("+f", d)                                                          \
               : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(b), "r"(int(accumulate)))

// d (64 x N, int32) = A (64 x 32 INT8) · B (N x 32 INT8)ᵀ [+ d], both from shared memory.
template <int N>
__device__ __forceinline__ void wgmma_ss_s8(int32_t (&d)[N / 8][4], uint64_t a, uint64_t b, bool accumulate) {
  static_assert(N == 64 || N == 128, "instantiated for N = 64 and 128");
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  if constexpr (N == 64)
    SLATTN_WGMMA_S8(64, "%32", "%33", "%34");
  else
    SLATTN_WGMMA_S8(128, "%64", "%65", "%66");
#endif
}

// d (64 x N, fp32) = A (64 x 32 e4m3, this warp's k32 fragment) · B (N x 32 e4m3)ᵀ [+ d], B from shared memory.
template <int N>
__device__ __forceinline__ void wgmma_rs_e4m3(float (&d)[N / 8][4], const uint32_t (&a)[4], uint64_t b,
                                              bool accumulate) {
  static_assert(N == 64 || N == 128, "instantiated for N = 64 and 128");
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  if constexpr (N == 64)
    SLATTN_WGMMA_E4M3_RS(64, "{%32, %33, %34, %35}", "%36", "%37");
  else
    SLATTN_WGMMA_E4M3_RS(128, "{%64, %65, %66, %67}", "%68", "%69");
#endif
}

#undef SLATTN_WGMMA_SS
#undef SLATTN_WGMMA_RS
#undef SLATTN_WGMMA_S8
#undef SLATTN_WGMMA_E4M3_RS
#undef SLATTN_WGMMA_ACC64
#undef SLATTN_WGMMA_ACC128
#undef SLATTN_WGMMA_REGS64
#undef SLATTN_WGMMA_REGS128

}  // namespace slattn::cuda
