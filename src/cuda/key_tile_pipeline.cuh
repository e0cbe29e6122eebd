// The stages of a warp-specialised, persistent sparse kernel (tma.cuh): a
// thread block walks query blocks (items) one after another; a producer warp
// copies each one's query tile and the key tiles of its row list, tile t (its
// count runs on across items) into stage t % kStages, K and V on barriers of
// their own; consumer warpgroups wait for a stage's K (or V), compute, and
// hand it back so that the next copy into it may start, and hand the query
// tile back once an item's last scores are computed. The producer thus runs
// into the next item while the consumers finish this one. Phases: the u-th
// use of a barrier completes phase u, parity u & 1.
//
// A consumer hands a slot back only after waiting for the copy into it: an
// "empty" barrier must not complete phase u + 1 before the producer has
// waited for phase u, or the producer's parity wait would take the phase
// after it for its own and wait forever. Kernels whose stages hold one tile
// (produce_one_stage_items) use the "keys" barriers alone and never touch the
// others.
#pragma once

#include <algorithm>
#include <cstdint>
#include <type_traits>

#include "cuda/common.cuh"
#include "cuda/geometry.h"
#include "slattn/plan.h"
#include "cuda/tma.cuh"
#include "cuda/wgmma.cuh"

namespace slattn::cuda {

template <int kStages>
struct KeyTilePipeline {
  SharedBarrier q_full, q_empty, k_full[kStages], v_full[kStages], k_empty[kStages], v_empty[kStages];
  int32_t item_tiles;           // key tiles of the item whose query tile q_full announces
  int32_t tile_first[kStages];  // the first key of each stage's tile, announced with its K

  // By thread 0 of the block, before its first __syncthreads; `consumers`
  // threads hand each tile back.
  __device__ void init(uint32_t consumers) {
    q_full.init(1);
    q_empty.init(consumers);
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

// The barriers of kernels whose items copy all their tiles at once and walk
// no list (produce_whole_items), with kStages items' tiles in shared memory:
// the producer announces item u's copies on full[u % kStages] once the
// consumers have arrived on empty[u % kStages] for item u - kStages (u counts
// a thread block's items).
template <int kStages>
struct ItemStages {
  SharedBarrier full[kStages], empty[kStages];

  // By thread 0 of the block, before its first __syncthreads.
  __device__ void init(uint32_t consumers) {
    for (int stage = 0; stage < kStages; ++stage) {
      full[stage].init(1);
      empty[stage].init(consumers);
    }
    fence_barrier_init();
  }

  static __device__ __forceinline__ int stage(int32_t use) { return use % kStages; }
  static __device__ __forceinline__ uint32_t parity(int32_t use) { return (use / kStages) & 1; }

  // Consumers: wait for item `use`'s tiles; hand its stage back once every read of them is complete.
  __device__ __forceinline__ void wait_full(int32_t use) { full[stage(use)].wait(parity(use)); }
  __device__ __forceinline__ void release(int32_t use) { empty[stage(use)].arrive(); }
};

// The producer's part over the items of this thread block (items is their
// count over the grid), on one thread: load_item(item, stage, barrier)
// announces the item's bytes on the barrier and starts its copies into the
// stage's tiles.
template <int kStages, typename LoadItem>
__device__ __forceinline__ void produce_whole_items(ItemStages<kStages>& stages, int64_t items, LoadItem&& load_item) {
  int32_t use = 0;
  for (int64_t item = blockIdx.x; item < items; item += gridDim.x, ++use) {
    const int stage = ItemStages<kStages>::stage(use);
    // The consumers are done with the tiles of the item kStages before.
    if (use >= kStages) stages.empty[stage].wait(ItemStages<kStages>::parity(use) ^ 1);
    load_item(item, stage, stages.full[stage]);
  }
}

// Query block `item` of a persistent walk over (batch, heads, query blocks),
// query blocks fastest: the items in flight at once share K and V in L2.
struct QueryItem {
  int64_t m, h, b;

  __device__ __forceinline__ static QueryItem of(int64_t item, const Geometry& g) {
    const int64_t pair = item / g.q_blocks;
    return {item % g.q_blocks, pair % g.heads, pair / g.heads};
  }
};

// Key block `item` of a persistent walk over (batch, kv heads, key blocks),
// key blocks fastest (the backward's dK/dV kernel walks column lists so).
struct KeyItem {
  int64_t n, kv, b;

  __device__ __forceinline__ static KeyItem of(int64_t item, const Geometry& g) {
    const int64_t pair = item / g.k_blocks;
    return {item % g.k_blocks, pair % g.kv_heads, pair / g.kv_heads};
  }
};

// By the producer's copying thread of a kernel whose items are one stage
// each (the key-block states, the projection's gradients): for each item of
// this thread block (blockIdx.x, then gridDim.x apart), waits for its stage
// to be handed back, announces `bytes` on the stage's "keys" barrier and
// calls load(item, stage, full) to issue the copies.
template <int kStages, typename Load>
__device__ __forceinline__ void produce_one_stage_items(KeyTilePipeline<kStages>& pipe, int64_t items, uint32_t bytes,
                                                        Load&& load) {
  int32_t t = 0;
  for (int64_t item = blockIdx.x; item < items; item += gridDim.x, ++t) {
    SharedBarrier& full = pipe.keys_slot(t);
    full.arrive_expect_bytes(bytes);
    load(item, t % kStages, full);
  }
}

// By one producer warp: calls on_block(n, value) on lane 0 for each key block
// n of a row list, in order, where value = lane_value(n) was read by the
// lane that loaded n: 32 entries (and their values) are read at once instead
// of one dependent global read per tile.
template <typename LaneValue, typename OnBlock>
__device__ __forceinline__ void walk_row_list(const int32_t* list, int32_t count, LaneValue&& lane_value,
                                              OnBlock&& on_block) {
  const int lane = threadIdx.x % kWarpSize;
  for (int32_t chunk = 0; chunk < count; chunk += kWarpSize) {
    const int32_t mine = chunk + lane < count ? list[chunk + lane] : 0;
    const auto value = lane_value(mine);
    const int here = static_cast<int>(min(int32_t(kWarpSize), count - chunk));
    for (int j = 0; j < here; ++j) {
      const int32_t n = __shfl_sync(0xffffffffu, mine, j);
      const auto its_value = __shfl_sync(0xffffffffu, value, j);
      if (lane == 0) on_block(n, its_value);
      __syncwarp();
    }
  }
}

// The producer warp's part, for the items of this thread block: announces
// each item's tile count (the length of its row list of critical blocks)
// with its query tile (load_query(item, barrier) announces the bytes and
// starts the copies; an item without key blocks copies none and arrives),
// then, per key block n of the row list, once its stage is free, records
// where the tile starts and calls load_keys(stage, item, n, value, barrier)
// and load_values(stage, item, n, barrier), which announce and start their
// copies (value: lane_value(item, n), read ahead by the walk). With a
// load_tail (not NoTail), every item ends with one more ring entry, after
// its key tiles and not counted among them: load_tail(stage, item, keys,
// values) fills the stage's two tiles, announcing on its two barriers; and
// the query tile is copied even for an item without key blocks (the
// consumers' use of the tail reads it).
struct NoTail {};

template <int kStages, typename LoadQuery, typename LaneValue, typename LoadKeys, typename LoadValues,
          typename LoadTail = NoTail>
__device__ __forceinline__ void produce_items(KeyTilePipeline<kStages>& pipe, const Geometry& g,
                                              const RoutingPlanView& plan, LoadQuery&& load_query,
                                              LaneValue&& lane_value, LoadKeys&& load_keys,
                                              LoadValues&& load_values, LoadTail&& load_tail = NoTail{}) {
  constexpr bool kTail = !std::is_same_v<std::decay_t<LoadTail>, NoTail>;
  const int64_t items = g.q_blocks * g.heads * g.batch;
  int32_t t = 0;  // key tiles copied so far, over all items (counted on lane 0)
  int32_t use = 0;
  for (int64_t item = blockIdx.x; item < items; item += gridDim.x, ++use) {
    const QueryItem at = QueryItem::of(item, g);
    const int64_t plan_row = (at.b * g.heads + at.h) * g.q_blocks + at.m;
    const int32_t count = plan.row_count[plan_row];
    if (threadIdx.x % kWarpSize == 0) {
      if (use > 0) pipe.q_empty.wait((use - 1) & 1);  // the consumers are done with the last item's query tile
      pipe.item_tiles = count;
      if (count > 0 || kTail) {
        load_query(at, pipe.q_full);
      } else {
        pipe.q_full.arrive();
      }
    }
    walk_row_list(
        plan.row_index + plan_row * plan.shape.k_blocks(), count, [&](int32_t n) { return lane_value(at, n); },
        [&](int32_t n, auto value) {
          const int stage = pipe.stage(t);
          SharedBarrier& keys = pipe.keys_slot(t);
          pipe.tile_first[stage] = static_cast<int32_t>(n * g.block_k);  // a key tile is a whole block
          load_keys(stage, at, n, value, keys);
          load_values(stage, at, n, pipe.values_slot(t));
          ++t;
        });
    if constexpr (kTail) {
      if (threadIdx.x % kWarpSize == 0) {
        SharedBarrier& keys = pipe.keys_slot(t);
        load_tail(pipe.stage(t), at, keys, pipe.values_slot(t));
        ++t;
      }
    }
  }
}

// Thread blocks of `shared_bytes` (and one consumer warpgroup) per SM: two
// where their shared memory fits, so that one hides the other's waits; a
// block of two consumers takes the SM's registers alone.
constexpr int blocks_per_sm(size_t shared_bytes, int consumers) {
  constexpr size_t kSharedPerSm = 228 * 1024, kReservedPerBlock = 1024;
  return consumers == 1 && 2 * (shared_bytes + kReservedPerBlock) <= kSharedPerSm ? 2 : 1;
}

// The producer warpgroup keeps few registers and the consumers take the rest
// of the SM's share, when that is more than the compiler may give every
// thread at launch (release_registers_to / claim_registers_to).
template <int kThreads, int kConsumers, int kBlocksPerSm>
struct RegisterSplit {
  static constexpr int kPerSm = 64 * 1024;
  static constexpr int kProducer = 40;
  static constexpr int kConsumer =
      std::min(240, (kPerSm / kBlocksPerSm - kWarpgroupThreads * kProducer) / (kConsumers * kWarpgroupThreads) / 8 * 8);
  static constexpr int kAtLaunch = std::min(255, kPerSm / (kThreads * kBlocksPerSm) / 8 * 8);
  static constexpr bool kHandOver = kAtLaunch < kConsumer;
};

}  // namespace slattn::cuda
