// Hopper's tile copy engine (TMA: cp.async.bulk.tensor) and the shared-memory
// barriers (mbarrier) that producer and consumer warps meet at, plus the
// register hand-over between warpgroups (setmaxnreg). A producer thread
// announces the bytes a stage will receive (arrive_expect_bytes) and starts
// the copies, which complete the stage's barrier themselves; consumers wait
// for the barrier's phase to flip, compute, and arrive on the stage's
// "empty" barrier so that the producer may refill it.
//
// Copies land with the 128-byte swizzle of wgmma.cuh's SwizzledTile: a box
// of (rows x 64) 2-byte elements is one column chunk of a tile.
#pragma once

#include <cuda.h>

#include <cstdint>

#include "cuda/common.cuh"

namespace slattn::cuda {

__device__ __forceinline__ uint32_t shared_address(const void* pointer) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(pointer));
}

// A 64-bit mbarrier in shared memory. Phases alternate 0, 1, 0, ...: a
// waiter passes once the phase of the given parity has completed.
struct alignas(8) SharedBarrier {
  uint64_t state;

  // By one thread, before the block's first barrier (fence_barrier_init and __syncthreads follow).
  __device__ __forceinline__ void init(uint32_t arrivals) {
    SLATTN_SM90A(asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(shared_address(&state)),
                                   "r"(arrivals)));
  }
  __device__ __forceinline__ void arrive() {
    SLATTN_SM90A(asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];\n" ::"r"(shared_address(&state))
                                   : "memory"));
  }
  // This thread's arrival, and `bytes` more that copies must deliver before the phase completes.
  __device__ __forceinline__ void arrive_expect_bytes(uint32_t bytes) {
    SLATTN_SM90A(asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;\n" ::"r"(
                                       shared_address(&state)),
                                   "r"(bytes)
                                   : "memory"));
  }
  __device__ __forceinline__ void wait(uint32_t parity) {
#if defined(SLATTN_DEBUG_HANGS)
    wait_or_trap(parity);
#else
    SLATTN_SM90A(asm volatile("{\n"
                                   ".reg .pred done;\n"
                                   "retry:\n"
                                   "mbarrier.try_wait.parity.shared::cta.b64 done, [%0], %1;\n"
                                   "@!done bra retry;\n"
                                   "}\n" ::"r"(shared_address(&state)),
                                   "r"(parity)
                                   : "memory"));
#endif
  }

#if defined(SLATTN_DEBUG_HANGS)
  // Whether the phase of `parity` has completed (one try, which may suspend the thread a while).
  __device__ __forceinline__ bool try_wait(uint32_t parity) {
    uint32_t done = 1;
    SLATTN_SM90A(asm volatile("{\n"
                              ".reg .pred p;\n"
                              "mbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2;\n"
                              "selp.u32 %0, 1, 0, p;\n"
                              "}\n"
                              : "=r"(done)
                              : "r"(shared_address(&state)), "r"(parity)
                              : "memory"));
    return done != 0;
  }
  // A wait that reports the kernel's shape and the barrier, and traps, after 1 s.
  __device__ __noinline__ void wait_or_trap(uint32_t parity) {
    const uint64_t start = global_nanoseconds();
    while (!try_wait(parity)) {
      if (global_nanoseconds() - start > 1000000000ull) {
        printf("slattn: a barrier wait has lasted 1 s: grid %u, block %u, threads %u, thread %u, barrier at "
               "shared byte %u, parity %u\n",
               gridDim.x, blockIdx.x, blockDim.x, threadIdx.x, shared_address(&state), parity);
        __trap();
      }
    }
  }
  static __device__ __forceinline__ uint64_t global_nanoseconds() {
    uint64_t now;
    asm volatile("mov.u64 %0, %globaltimer;" : "=l"(now));
    return now;
  }
#endif
};

// Makes the barriers' initialisation visible to the copy engine (before the block's barrier).
__device__ __forceinline__ void fence_barrier_init() {
  SLATTN_SM90A(asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory"));
}

// Synchronises `threads` threads (whole warps) of the block on hardware
// barrier `id`: some warpgroups meet while the others go on (0 is __syncthreads').
__device__ __forceinline__ void named_barrier_sync(int id, int threads) {
  SLATTN_SM90A(asm volatile("bar.sync %0, %1;\n" ::"r"(id), "r"(threads) : "memory"));
}

// Coordinates of a box in a 4-dimensional tensor map, innermost first.
struct TileCoordinates {
  int32_t c[4];
};

// Copies the box at `at` of the tensor described by `map` (a __grid_constant__
// kernel parameter) into shared memory at `destination`; completes `bytes`
// (the whole box, zero-filled where it leaves the tensor) on `barrier`.
__device__ __forceinline__ void tma_load(void* destination, const CUtensorMap& map, const TileCoordinates& at,
                                         SharedBarrier& barrier) {
  SLATTN_SM90A(asm volatile(
      "cp.async.bulk.tensor.4d.shared::cluster.global.tile.mbarrier::complete_tx::bytes [%0], [%1, {%2, %3, %4, %5}], "
      "[%6];\n" ::"r"(shared_address(destination)),
      "l"(reinterpret_cast<uint64_t>(&map)), "r"(at.c[0]), "r"(at.c[1]), "r"(at.c[2]), "r"(at.c[3]),
      "r"(shared_address(&barrier.state))
      : "memory"));
}

// Copies `bytes` (a multiple of 16; both addresses 16-byte aligned) from
// global memory to shared memory at `destination`, completing them on `barrier`.
__device__ __forceinline__ void bulk_load(void* destination, const void* source, uint32_t bytes,
                                          SharedBarrier& barrier) {
  SLATTN_SM90A(asm volatile(
      "cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];\n" ::"r"(
          shared_address(destination)),
      "l"(reinterpret_cast<uint64_t>(source)), "r"(bytes), "r"(shared_address(&barrier.state))
      : "memory"));
}

// Copies shared memory at `source` to the box at `at` of the tensor described
// by `map`, rows outside the tensor left out; joins the issuing thread's
// current bulk group. The threads that wrote `source` must first make their
// writes visible to the copy engine (fence_shared_for_async_proxy) and meet.
__device__ __forceinline__ void tma_store(const CUtensorMap& map, const TileCoordinates& at, const void* source) {
  SLATTN_SM90A(asm volatile(
      "cp.async.bulk.tensor.4d.global.shared::cta.bulk_group [%0, {%2, %3, %4, %5}], [%1];\n" ::"l"(
          reinterpret_cast<uint64_t>(&map)),
      "r"(shared_address(source)), "r"(at.c[0]), "r"(at.c[1]), "r"(at.c[2]), "r"(at.c[3])
      : "memory"));
}

// Closes the issuing thread's current bulk group of stores.
__device__ __forceinline__ void commit_bulk_group() {
  SLATTN_SM90A(asm volatile("cp.async.bulk.commit_group;\n" ::: "memory"));
}

// Waits until the issuing thread's bulk groups have read their shared memory
// (it may be written again), or, `written`, until their writes are complete.
template <bool kWritten>
__device__ __forceinline__ void wait_bulk_groups() {
  if constexpr (kWritten) {
    SLATTN_SM90A(asm volatile("cp.async.bulk.wait_group 0;\n" ::: "memory"));
  } else {
    SLATTN_SM90A(asm volatile("cp.async.bulk.wait_group.read 0;\n" ::: "memory"));
  }
}

// Registers per thread for the rest of this warpgroup's life (a multiple of 8
// in [24, 256]); every thread of the warpgroup executes it.
template <int kRegisters>
__device__ __forceinline__ void release_registers_to() {
  SLATTN_SM90A(asm volatile("setmaxnreg.dec.sync.aligned.u32 %0;\n" ::"n"(kRegisters)));
}
template <int kRegisters>
__device__ __forceinline__ void claim_registers_to() {
  SLATTN_SM90A(asm volatile("setmaxnreg.inc.sync.aligned.u32 %0;\n" ::"n"(kRegisters)));
}

}  // namespace slattn::cuda
