// Asynchronous copies global -> shared memory (cp.async, sm_80+) and the
// double-buffered walk over tiles that every pipelined kernel of slattn uses.
#pragma once

#include <cstdint>

namespace slattn::cuda {

// Copies the first `bytes` of kBytes (4, 8 or 16) from global to shared
// memory and zero-fills the rest; bytes = 0 reads nothing.
template <int kBytes>
__device__ __forceinline__ void cp_async(void* shared, const void* global, int bytes) {
  const auto address = static_cast<uint32_t>(__cvta_generic_to_shared(shared));
  if constexpr (kBytes == 16) {  // .cg: 16-byte copies may bypass L1
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(address), "l"(global), "r"(bytes));
  } else {
    asm volatile("cp.async.ca.shared.global [%0], [%1], %2, %3;\n" ::"r"(address), "l"(global), "n"(kBytes),
                 "r"(bytes));
  }
}

__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }

// Waits until at most kPending of this thread's committed copy groups are in flight.
template <int kPending>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(kPending) : "memory");
}

// Orders this thread's ordinary shared-memory writes (cp.async included)
// before later reads by the asynchronous proxy (wgmma's operands, the tile
// copy engine's stores); a barrier follows. Nothing to order before sm_90.
__device__ __forceinline__ void fence_shared_for_async_proxy() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
#endif
}

// Step t of a walk over `total` double-buffered tiles: starts the copies of
// tile t + 1 (load_next(t + 1) issues them and commits its group), waits for
// tile t's, and synchronises the block, after which tile t is complete for
// every thread. The caller synchronises again once it is done with tile t,
// before tile t + 2 is copied into the same buffer.
template <typename Index, typename LoadNext>
__device__ __forceinline__ void await_tile(Index t, Index total, LoadNext&& load_next) {
  if (t + 1 < total) {
    load_next(t + 1);
    cp_async_wait<1>();
  } else {
    cp_async_wait<0>();
  }
  __syncthreads();
}

}  // namespace slattn::cuda
