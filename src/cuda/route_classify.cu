// Classes and row lists of the router (SPEC section 1), one warp per query
// block m, from approximate scores s̃_n within ε of the exact scores s_n
// (route_stages.cuh). With T̃ the n_crit-th largest s̃ of the row, known to
// lie in [low, high]:
//   - s̃_n < low - 2ε: n_crit blocks have s >= T̃ - ε > s_n, so n is not critical;
//   - s̃_n > high + 2ε: a block with s >= s_n has s̃ > T̃, and at most
//     n_crit - 1 blocks (n among them) do, so n is critical ("sure");
//   - the rest are "maybe" blocks. The critical set is a prefix of the exact
//     order (score descending, ties to the lower index: rm::outranks) that
//     holds the sure blocks and no block outside sure + maybe, so its maybe
//     blocks are the first n_crit - sure of them in that order; only they need
//     exact scores, computed as the CPU computes them.
// Negligible blocks mirror this from the bottom (B̃, the n_negl-th smallest
// s̃; among equal scores the higher indices rank lower). A row whose
// approximate scores or bound are not finite makes every block a maybe block.
// [low, high] need only be about ε wide (bisection on values, a warp-wide
// count a step); the exact selection among the maybe blocks is a radix search
// on order-preserving integer keys (kth_largest).
#include <algorithm>

#include "cuda/common.cuh"
#include "cuda/route_stages.cuh"
#include "route_math.h"

namespace slattn::cuda {
namespace {

namespace rm = route_math;

constexpr int kMaxWarps = 8;  // rows per block, when shared memory allows
constexpr unsigned kAllLanes = 0xffffffffu;

// What is known of one key block of the row; one byte each in shared memory.
enum BlockState : uint8_t {
  kSureCritical = 1,
  kMaybeCritical = 2,
  kSureNegligible = 4,
  kMaybeNegligible = 8,
  kChosenCritical = 16,  // a maybe block that the exact scores made critical
  kChosenNegligible = 32,
};

// A warp's shared memory for its row: the approximate scores, then in their
// place the exact keys of the maybe blocks; the maybe blocks, ascending; the
// state of every block.
struct RowScratch {
  uint64_t* exact;   // (maybe blocks)
  float* approx;     // (Nk), dead once the states are known
  uint16_t* maybe;   // (maybe blocks): block indices (Nk <= 65536)
  uint8_t* state;    // (Nk)

  __host__ __device__ static size_t bytes(int k_blocks) {
    constexpr size_t kPerBlock = sizeof(uint64_t) + sizeof(uint16_t) + sizeof(uint8_t);
    constexpr size_t kAlignment = 16;
    return (kPerBlock * k_blocks + kAlignment - 1) / kAlignment * kAlignment;
  }
  __device__ static RowScratch at(unsigned char* base, int k_blocks) {
    auto* exact = reinterpret_cast<uint64_t*>(base);
    auto* maybe = reinterpret_cast<uint16_t*>(exact + k_blocks);
    return {exact, reinterpret_cast<float*>(exact), maybe, reinterpret_cast<uint8_t*>(maybe + k_blocks)};
  }
};

__device__ __forceinline__ int lane_id() { return static_cast<int>(threadIdx.x % kWarpSize); }
__device__ __forceinline__ unsigned lanes_below() { return (1u << lane_id()) - 1u; }

template <typename T>
__device__ __forceinline__ T warp_least(T x) {
  for (int offset = kWarpSize / 2; offset > 0; offset /= 2) {
    const T other = __shfl_xor_sync(kAllLanes, x, offset);
    x = other < x ? other : x;
  }
  return x;
}

template <typename T>
__device__ __forceinline__ T warp_greatest(T x) {
  for (int offset = kWarpSize / 2; offset > 0; offset /= 2) {
    const T other = __shfl_xor_sync(kAllLanes, x, offset);
    x = other > x ? other : x;
  }
  return x;
}

// An order-preserving integer key of an exact rank key (never NaN): a < b iff
// key(a) < key(b). -0 becomes +0 first, as the two compare equal and so tie
// (then the index decides, as on the CPU).
__device__ __forceinline__ uint64_t rank_key_bits(double key) {
  const auto bits = static_cast<uint64_t>(__double_as_longlong(key == 0.0 ? 0.0 : key));
  return bits >> 63 ? ~bits : bits | (uint64_t{1} << 63);
}

// How many of the elements i < count are members with a key that passes `test`.
template <typename Member, typename KeyOf, typename Test>
__device__ __forceinline__ int count_where(int count, const Member& member, const KeyOf& key_of, const Test& test) {
  int found = 0;
  for (int i = lane_id(); i < count; i += kWarpSize) found += member(i) && test(key_of(i)) ? 1 : 0;
  return static_cast<int>(__reduce_add_sync(kAllLanes, static_cast<unsigned>(found)));
}

// The k-th largest key (1 <= k <= members) of the `members` elements i < count
// with member(i); the whole warp calls it and gets the answer. A bit at a
// time from the highest where the keys differ, it keeps the greatest prefix
// that at least k keys reach, and stops early once exactly k do.
template <typename Member, typename KeyOf>
__device__ uint64_t kth_largest(int count, int members, int k, const Member& member, const KeyOf& key_of) {
  using Key = uint64_t;
  Key low = ~Key{0}, high = 0;
  for (int i = lane_id(); i < count; i += kWarpSize) {
    if (!member(i)) continue;
    const Key key = key_of(i);
    low = key < low ? key : low;
    high = key > high ? key : high;
  }
  low = warp_least(low);
  high = warp_greatest(high);
  if (k == members || low == high) return low;
  int bit = 63 - __clzll(static_cast<long long>(low ^ high));
  Key prefix = high & ~((Key{2} << bit) - 1);  // the bits above `bit`, common to all keys
  for (; bit >= 0; --bit) {
    const Key candidate = prefix | Key{1} << bit;
    const int reaching = count_where(count, member, key_of, [candidate](Key key) { return key >= candidate; });
    if (reaching < k) continue;
    prefix = candidate;
    if (reaching == k) break;
  }
  Key least = ~Key{0};  // the k-th largest is the least key reaching the prefix
  for (int i = lane_id(); i < count; i += kWarpSize) {
    if (!member(i)) continue;
    const Key key = key_of(i);
    if (key >= prefix && key < least) least = key;
  }
  return warp_least(least);
}

// Marks with `flag` the `take` of the `members` maybe blocks that rank first
// by exact key, descending; equal keys go in list (index) order, or with
// `ties_last` in reverse.
template <typename Member, typename KeyOf>
__device__ void choose(const RowScratch& s, int count, int members, int take, bool ties_last, uint8_t flag,
                       const Member& member, const KeyOf& key_of) {
  if (take == 0) return;
  const bool all = take == members;  // then the exact keys are not needed, nor computed
  uint64_t threshold = 0;
  int equal = 0, ties = 0;  // keys equal to the threshold, and how many of them are taken
  if (!all) {
    threshold = kth_largest(count, members, take, member, key_of);
    ties = take - count_where(count, member, key_of, [threshold](uint64_t key) { return key > threshold; });
    equal = count_where(count, member, key_of, [threshold](uint64_t key) { return key == threshold; });
  }
  int seen = 0;  // equal keys before this round of 32
  for (int base = 0; base < count; base += kWarpSize) {
    const int j = base + lane_id();
    const bool is_member = j < count && member(j);
    const uint64_t key = is_member && !all ? key_of(j) : 0;
    const bool tie = is_member && !all && key == threshold;
    const unsigned ties_here = __ballot_sync(kAllLanes, tie);
    const int rank = seen + __popc(ties_here & lanes_below());
    seen += __popc(ties_here);
    const bool taken_tie = tie && (ties_last ? rank >= equal - ties : rank < ties);
    if (is_member && (all || key > threshold || taken_tie)) s.state[s.maybe[j]] |= flag;
  }
}

// Approximate scores beyond these: sure / maybe critical, sure / maybe negligible.
struct Thresholds {
  float critical_above, critical_from, negligible_below, negligible_to;
};

// Narrows [low, high] (all scores at first) by bisection, keeping the k-th
// largest of the row's approximate scores in it (the k-th smallest with
// `from_bottom`), until it is at most `resolution` wide or no float lies inside.
__device__ void bracket(const float* scores, int count, int k, bool from_bottom, float resolution, float& low,
                        float& high) {
  if (k == 1 || k == count) {  // the greatest or the least
    if ((k == 1) != from_bottom) {
      low = high;
    } else {
      high = low;
    }
    return;
  }
  while (high - low > resolution) {
    const float middle = 0.5f * low + 0.5f * high;  // no overflow, and within [low, high]
    if (middle <= low || middle >= high) return;
    int reaching = 0;  // scores on the k-th's side of middle, middle included
    for (int n = lane_id(); n < count; n += kWarpSize)
      reaching += (from_bottom ? scores[n] <= middle : scores[n] >= middle) ? 1 : 0;
    reaching = static_cast<int>(__reduce_add_sync(kAllLanes, static_cast<unsigned>(reaching)));
    // At least k reach middle: the k-th does too. Fewer: it lies strictly on the other side.
    if ((reaching >= k) != from_bottom) {
      low = middle;
    } else {
      high = middle;
    }
  }
}

__device__ Thresholds thresholds(const float* scores, int k_blocks, int n_crit, int n_negl, float error) {
  float least = HUGE_VALF, greatest = -HUGE_VALF;
  for (int n = lane_id(); n < k_blocks; n += kWarpSize) {
    least = fminf(least, scores[n]);
    greatest = fmaxf(greatest, scores[n]);
  }
  least = warp_least(least);
  greatest = warp_greatest(greatest);
  const float margin = __fmul_ru(2.0f, error);
  float low = least, high = greatest;
  bracket(scores, k_blocks, n_crit, false, error, low, high);
  Thresholds t{__fadd_ru(high, margin), __fsub_rd(low, margin), 0.0f, 0.0f};
  if (n_negl > 0) {
    low = least;
    high = greatest;
    bracket(scores, k_blocks, n_negl, true, error, low, high);
    t.negligible_below = __fsub_rd(low, margin);
    t.negligible_to = __fadd_ru(high, margin);
  }
  return t;
}

// grid (rows / warps), one warp per query-block row.
__global__ void __launch_bounds__(kMaxWarps * kWarpSize) classify_kernel(const __grid_constant__ ClassifyArgs a) {
  extern __shared__ __align__(16) unsigned char shared[];
  const int k_blocks = static_cast<int>(a.shape.k_blocks());
  const int64_t q_blocks = a.shape.q_blocks();
  const int warp = static_cast<int>(threadIdx.x / kWarpSize), lane = lane_id();
  const int64_t row = blockIdx.x * int64_t{blockDim.x / kWarpSize} + warp;
  if (row >= a.shape.rows()) return;
  const RowScratch s = RowScratch::at(shared + warp * RowScratch::bytes(k_blocks), k_blocks);
  const int64_t head = row / q_blocks % a.shape.heads, batch = row / q_blocks / a.shape.heads;
  const int64_t kv_pair = batch * a.kv_heads + head / (a.shape.heads / a.kv_heads);

  bool finite = true;
  const float* scores = a.scores + row * k_blocks;
  for (int n = lane; n < k_blocks; n += kWarpSize) {
    const float score = scores[n];
    finite = finite && isfinite(score);
    s.approx[n] = score;  // read by this lane only, until the states are known
  }
  const float error = score_error_bound(a.q_norms[row], a.k_norm_max[kv_pair]);
  const bool bounded = __all_sync(kAllLanes, finite) && isfinite(error);
  Thresholds t{};
  if (bounded) t = thresholds(s.approx, k_blocks, a.n_crit, a.n_negl, error);

  // States, and the maybe blocks in ascending order.
  int sure_crit = 0, maybe_crit = 0, sure_negl = 0, maybe_negl = 0, maybe_count = 0;
  for (int base = 0; base < k_blocks; base += kWarpSize) {
    const int n = base + lane;
    uint8_t state = 0;
    if (n < k_blocks && !bounded) {
      state = kMaybeCritical | (a.n_negl > 0 ? kMaybeNegligible : 0);
    } else if (n < k_blocks) {
      const float score = s.approx[n];
      state = score > t.critical_above ? kSureCritical : score >= t.critical_from ? kMaybeCritical : 0;
      if (a.n_negl > 0)
        state |= score < t.negligible_below ? kSureNegligible : score <= t.negligible_to ? kMaybeNegligible : 0;
    }
    sure_crit += state & kSureCritical ? 1 : 0;
    maybe_crit += state & kMaybeCritical ? 1 : 0;
    sure_negl += state & kSureNegligible ? 1 : 0;
    maybe_negl += state & kMaybeNegligible ? 1 : 0;
    const bool is_maybe = state & (kMaybeCritical | kMaybeNegligible);
    const unsigned maybes = __ballot_sync(kAllLanes, is_maybe);
    if (is_maybe) s.maybe[maybe_count + __popc(maybes & lanes_below())] = static_cast<uint16_t>(n);
    maybe_count += __popc(maybes);
    if (n < k_blocks) s.state[n] = state;
  }
  const auto total = [](int x) { return static_cast<int>(__reduce_add_sync(kAllLanes, static_cast<unsigned>(x))); };
  const int crit_left = a.n_crit - total(sure_crit), negl_left = a.n_negl - total(sure_negl);
  maybe_crit = total(maybe_crit);
  maybe_negl = total(maybe_negl);
  // States and maybe list in place; the approximate scores, whose place the
  // exact keys take, are dead.
  __syncwarp();

  if ((crit_left > 0 && crit_left < maybe_crit) || (negl_left > 0 && negl_left < maybe_negl)) {
    const double* q_mean = a.q_means + row * a.dim;
    for (int j = lane; j < maybe_count; j += kWarpSize) {
      const double* k_bar = a.k_means + (kv_pair * k_blocks + s.maybe[j]) * a.dim;
      double score = 0.0;
#pragma unroll 8
      for (int64_t c = 0; c < a.dim; ++c) score = rm::score_step(score, q_mean[c], k_bar[c]);
      s.exact[j] = rank_key_bits(rm::rank_key(score));
    }
    __syncwarp();
  }
  const uint64_t* exact = s.exact;
  choose(s, maybe_count, maybe_crit, crit_left, false, kChosenCritical,
         [&s](int j) { return (s.state[s.maybe[j]] & kMaybeCritical) != 0; }, [exact](int j) { return exact[j]; });
  __syncwarp();  // choosing the negligible blocks reads the states just written
  choose(s, maybe_count, maybe_negl, negl_left, true, kChosenNegligible,
         [&s](int j) { return (s.state[s.maybe[j]] & kMaybeNegligible) != 0; }, [exact](int j) { return ~exact[j]; });
  __syncwarp();

  int8_t* map = a.block_map + row * k_blocks;
  int32_t* list = a.row_index + row * k_blocks;
  int listed = 0;
  for (int base = 0; base < k_blocks; base += kWarpSize) {
    const int n = base + lane;
    const uint8_t state = n < k_blocks ? s.state[n] : 0;
    const bool critical = state & (kSureCritical | kChosenCritical);
    const bool negligible = !critical && (state & (kSureNegligible | kChosenNegligible));
    if (n < k_blocks) map[n] = critical ? kCritical : negligible ? kNegligible : kMarginal;
    const unsigned criticals = __ballot_sync(kAllLanes, critical);
    if (critical) list[listed + __popc(criticals & lanes_below())] = n;
    listed += __popc(criticals);
  }
  for (int i = listed + lane; i < k_blocks; i += kWarpSize) list[i] = -1;
  if (lane == 0) a.row_count[row] = listed;
}

}  // namespace

void launch_classify(const ClassifyArgs& args, cudaStream_t stream) {
  const int k_blocks = static_cast<int>(args.shape.k_blocks());
  const size_t shared_limit = max_shared_per_block();
  const size_t per_warp = RowScratch::bytes(k_blocks);
  const int warps = static_cast<int>(std::min<size_t>(kMaxWarps, shared_limit / per_warp));
  SLATTN_CHECK(warps >= 1, "the CUDA router needs ", per_warp, " bytes of shared memory per row, the device has ",
               shared_limit);
  const size_t shared = warps * per_warp;
  SLATTN_CUDA_CHECK(
      cudaFuncSetAttribute(classify_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(shared)));
  classify_kernel<<<static_cast<unsigned>(ceil_div(args.shape.rows(), warps)), warps * kWarpSize, shared, stream>>>(
      args);
  SLATTN_LAUNCH_CHECK("classify_kernel");
}

}  // namespace slattn::cuda
