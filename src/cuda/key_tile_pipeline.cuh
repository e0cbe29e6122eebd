// The stages of a warp-specialised sparse kernel (tma.cuh): a producer
// thread copies the query tile once and each key tile t of the row list into
// stage t % kStages, K and V on barriers of their own; consumer warpgroups
// wait for a stage's K (or V), compute, and hand it back, so that the next
// copy into that stage may start. Phases: the u-th use of a stage completes
// phase u, parity u & 1.
#pragma once

#include <algorithm>
#include <cstdint>

#include "cuda/tma.cuh"
#include "cuda/wgmma.cuh"

namespace slattn::cuda {

template <int kStages>
struct KeyTilePipeline {
  SharedBarrier q_full, k_full[kStages], v_full[kStages], k_empty[kStages], v_empty[kStages];

  // By thread 0 of the block, before its first __syncthreads; `consumers`
  // threads hand each tile back.
  __device__ void init(uint32_t consumers) {
    q_full.init(1);
    for (int stage = 0; stage < kStages; ++stage) {
      k_full[stage].init(1);
      v_full[stage].init(1);
      k_empty[stage].init(consumers);
      v_empty[stage].init(consumers);
    }
    fence_barrier_init();
  }

  static __device__ __forceinline__ int stage(int32_t t) { return t % kStages; }
  static __device__ __forceinline__ uint32_t parity(int32_t t) { return (t / kStages) & 1; }

  // Producer: the barrier that tile t's K (or V) copies will complete, once
  // every consumer has handed back the tile kStages before it; the caller
  // may fill the stage's other fields, then announces the copies' bytes on
  // it (arrive_expect_bytes) and starts them.
  __device__ __forceinline__ SharedBarrier& keys_slot(int32_t t) { return slot(k_empty, k_full, t); }
  __device__ __forceinline__ SharedBarrier& values_slot(int32_t t) { return slot(v_empty, v_full, t); }

  // Consumers.
  __device__ __forceinline__ void wait_keys(int32_t t) { k_full[stage(t)].wait(parity(t)); }
  __device__ __forceinline__ void wait_values(int32_t t) { v_full[stage(t)].wait(parity(t)); }
  __device__ __forceinline__ void release_keys(int32_t t) { k_empty[stage(t)].arrive(); }
  __device__ __forceinline__ void release_values(int32_t t) { v_empty[stage(t)].arrive(); }

 private:
  static __device__ __forceinline__ SharedBarrier& slot(SharedBarrier (&empty)[kStages], SharedBarrier (&full)[kStages],
                                                        int32_t t) {
    if (t >= kStages) empty[stage(t)].wait(parity(t) ^ 1);
    return full[stage(t)];
  }
};

// The producer warpgroup keeps few registers and the consumers take the rest
// of the SM's share, when that is more than the compiler may give every
// thread at launch (release_registers_to / claim_registers_to).
template <int kThreads, int kConsumers, int kBlocksPerSm>
struct RegisterSplit {
  static constexpr int kPerSm = 64 * 1024;
  static constexpr int kProducer = 24;
  static constexpr int kConsumer =
      std::min(240, (kPerSm / kBlocksPerSm - kWarpgroupThreads * kProducer) / (kConsumers * kWarpgroupThreads) / 8 * 8);
  static constexpr int kAtLaunch = std::min(255, kPerSm / (kThreads * kBlocksPerSm) / 8 * 8);
  static constexpr bool kHandOver = kAtLaunch < kConsumer;
};

}  // namespace slattn::cuda
