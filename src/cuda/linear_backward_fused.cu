// Two kernels after the recomputed key-block states:
// linear_query_grads_kernel, per query block: H_m, φ(Q_m) and Ol as in the
// forward, then G = dOl / den and c = (dOl·Ol) / den, dQφ = G H_mᵀ − c Z_m
// through φ into dQ, dH_m = φ(Q_m)ᵀ G and dZ_m = −Σ c φ(q);
// linear_key_grads_kernel, per key block: dh_n and dz_n summed over the query
// blocks whose U_m holds n (subset_list.cuh), dKφ = V dh_nᵀ + dz_n through φ
// into dK, and dV += φ(K_n) dh_n. Products on tf32 tensor cores. Both add the
// sparse branch's fp32 gradient rows and store dq, dk, dv in the output dtype.
#include "cuda/gemm.cuh"
#include "cuda/key_states_wgmma.h"
#include "cuda/linear_backward_wgmma.h"
#include "cuda/linear_backward_fused.h"
#include "cuda/linear_forward_fused.h"
#include "cuda/linear_kernels.h"
#include "cuda/linear_tiles.cuh"
#include "cuda/projection_grads_wgmma.h"
#include "cuda/sla_cuda.h"
#include "cuda/sparse_kernels.h"
#include "cuda/sparse_mainloops.h"

namespace slattn::cuda {
namespace {

// grid: (Mq, query pairs); warp w owns query rows 16w.. of the block.
template <typename Element, int kDim, int kBlockQ>
__global__ void __launch_bounds__(kBlockQ / kRowsPerWarp * kWarpSize)
    linear_query_grads_kernel(Geometry g, RoutingPlanView plan, DeviceView<const Element> q, FeatureMap feature_map,
                              LinearScope scope, KeyStates states, const float* dol,
                              DeviceView<const Element> dout_linear, float* ol_rows, const float* dq_rows,
                              DeviceView<Element> dq, float* dh_query, float* dz_query) {
  using Shared = QueryBlockShared<Element, kDim, kBlockQ>;
  constexpr int kThreads = kBlockQ / kRowsPerWarp * kWarpSize, kWarps = kThreads / kWarpSize;
  extern __shared__ __align__(16) unsigned char raw[];
  Shared& s = *reinterpret_cast<Shared*>(raw);
  SubsetList list{reinterpret_cast<int32_t*>(raw + sizeof(Shared))};
  const int64_t m = blockIdx.x, pair = blockIdx.y;
  const int64_t b = pair / g.heads, h = pair % g.heads, row0 = m * kBlockQ;
  const int warp = threadIdx.x / kWarpSize, local0 = warp * kRowsPerWarp;
  const int64_t padded0 = pair * g.q_rows() + row0 + local0;  // this warp's first padded row

  stage_query_block<Element, kDim, kBlockQ>(g, plan, q, feature_map, scope, states, b, h, m, s, list);
  const bool non_empty = list.included > 0;
  float ol[kDim / 8][4];
  query_block_output<Element, kDim, kBlockQ>(g, row0, non_empty, s, ol);

  float grad[kDim / 8][4];  // dOl, then G
#pragma unroll
  for (int j = 0; j < kDim / 8; ++j) {
#pragma unroll
    for (int p = 0; p < 2; ++p) {
      const float2 from_proj = dol ? accumulator_pair(dol + padded0 * kDim, kDim, j, p)
                                   : make_float2(0.0f, 0.0f);
      grad[j][2 * p] = from_proj.x;
      grad[j][2 * p + 1] = from_proj.y;
      if (ol_rows) accumulator_pair(ol_rows + padded0 * kDim, kDim, j, p) = make_float2(ol[j][2 * p], ol[j][2 * p + 1]);
    }
    if (dout_linear.defined()) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int64_t row = row0 + local0 + accumulator_row(e);
        if (row < g.q_len) grad[j][e] += dout_linear.load(b, h, row, accumulator_col(j, e));
      }
    }
  }
  float c[2], inverse[2];
  accumulator_row_dots<kDim>(grad, ol, c);
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const int local = local0 + accumulator_row(2 * r);
    const bool live = non_empty && row0 + local < g.q_len;
    inverse[r] = live ? 1.0f / s.denominator[local] : 0.0f;
    c[r] *= inverse[r];
    if (threadIdx.x % 4 == 0) s.c[local] = c[r];
  }
#pragma unroll
  for (int j = 0; j < kDim / 8; ++j)
#pragma unroll
    for (int e = 0; e < 4; ++e) grad[j][e] *= inverse[e / 2];

  // dQφ = G H_mᵀ − c Z_m (B (d, f) = H_m[f][d]), then through φ into dQ.
  float dphi[kDim / 8][4] = {};
  mma_tf32_from_accumulators<kDim, kDim>(dphi, grad, SharedMatrix<float, 1, kDim + kStatePad>{&s.state[0][0]});
  float phi[kDim / 8][4];
  load_accumulator_rows<kDim>(&s.phi[0][0], kDim + kTilePad, phi);
#pragma unroll
  for (int j = 0; j < kDim / 8; ++j)
#pragma unroll
    for (int e = 0; e < 4; ++e) dphi[j][e] -= c[e / 2] * s.z[accumulator_col(j, e)];
  feature_map_backward<kDim>(feature_map, phi, dphi);
  // dq = the sparse branch's dq rows + this, in the output dtype.
  const int first = accumulator_row(0);  // the thread's first row of the warp's 16
  store_sum_with_rows(dq, b, h, row0 + local0 + first, g.q_len,
                      dq_rows + (padded0 + first) * kDim + accumulator_col(0, 0), kDim, dphi);

  __syncthreads();  // every warp is done reading H_m: G takes its place
#pragma unroll
  for (int j = 0; j < kDim / 8; ++j)
#pragma unroll
    for (int e = 0; e < 4; ++e) s.grad[local0 + accumulator_row(e)][accumulator_col(j, e)] = grad[j][e];
  __syncthreads();

  // dH_m = φ(Q_m)ᵀ G, 16 rows f per warp and step: A (f, i) = φ(q_i)_f, B (i, d) = G[i][d].
  float* dh = dh_query + (pair * g.q_blocks + m) * kDim * kDim;
  for (int f0 = local0; f0 < kDim; f0 += kWarps * kRowsPerWarp) {
    float acc[kDim / 8][4] = {};
    mma_tf32<kBlockQ, kDim>(acc, SharedMatrix<Element, 1, kDim + kTilePad>{&s.phi[0][f0]},
                            SharedMatrix<float, kDim + kStatePad, 1>{&s.grad[0][0]});
#pragma unroll
    for (int j = 0; j < kDim / 8; ++j)
#pragma unroll
      for (int p = 0; p < 2; ++p)
        accumulator_pair(dh + f0 * kDim, kDim, j, p) = make_float2(acc[j][2 * p], acc[j][2 * p + 1]);
  }
  for (int f = threadIdx.x; f < kDim; f += kThreads) {
    float sum = 0.0f;
    for (int i = 0; i < kBlockQ; ++i) sum += s.c[i] * to_float(s.phi[i][f]);
    dz_query[(pair * g.q_blocks + m) * kDim + f] = -sum;
  }
}

template <typename Element, int kDim, int kBlockK>
struct KeyGradShared {
  TileRow<Element, kDim> phi[kBlockK];  // K_n as loaded, then φ(K_n) in place: A of dV, and the chain rule
  TileRow<Element, kDim> v[kBlockK];    // V_n: A of dKφ
  float dh[kDim][kDim + kStatePad];     // dh_n: B of both products
  float dz[kDim];                       // dz_n
  // then the subset list: subset_list_bytes(Mq)
};

template <typename Element, int kDim, int kBlockK>
size_t key_grad_shared_bytes(const Geometry& g) {
  return sizeof(KeyGradShared<Element, kDim, kBlockK>) + subset_list_bytes(g.q_blocks);
}

// grid: (Nk, kv pairs); warp w owns key rows 16w.. of the block.
template <typename Element, int kDim, int kBlockK>
__global__ void __launch_bounds__(kBlockK / kRowsPerWarp * kWarpSize)
    linear_key_grads_kernel(Geometry g, RoutingPlanView plan, DeviceView<const Element> k,
                            DeviceView<const Element> v, FeatureMap feature_map, LinearScope scope,
                            const float* dh_query, const float* dz_query, const float* dh_total,
                            const float* dz_total, const float* dk_rows, const float* dv_rows,
                            DeviceView<Element> dk, DeviceView<Element> dv) {
  using Shared = KeyGradShared<Element, kDim, kBlockK>;
  constexpr int kThreads = kBlockK / kRowsPerWarp * kWarpSize;
  constexpr int64_t kState = int64_t(kDim) * kDim;
  extern __shared__ __align__(16) unsigned char raw[];
  Shared& s = *reinterpret_cast<Shared*>(raw);
  SubsetList list{reinterpret_cast<int32_t*>(raw + sizeof(Shared))};
  const int64_t n = blockIdx.x, kv_pair = blockIdx.y;
  const int64_t b = kv_pair / g.kv_heads, kv = kv_pair % g.kv_heads;
  const int64_t first = n * kBlockK, end = min(g.k_len, first + kBlockK);
  const int local0 = threadIdx.x / kWarpSize * kRowsPerWarp;
  const int64_t padded0 = kv_pair * g.k_rows() + first + local0;  // this warp's first padded row

  load_tile<Element, kDim, kThreads>(k, b, kv, first, kBlockK, end, s.phi);
  load_tile<Element, kDim, kThreads>(v, b, kv, first, kBlockK, end, s.v);
  cp_async_commit();
  cp_async_wait<0>();
  __syncthreads();
  stage_phi_rows<Element, kDim>(s.phi, 0, kBlockK, static_cast<int>(end - first), feature_map, &s.phi[0][0],
                                kDim + kTilePad, [](int, const WarpRow&) {});

  for (int64_t member = 0; member < g.group(); ++member) {
    const int64_t q_pair = b * g.heads + kv * g.group() + member;
    const int8_t* map = plan.block_map + q_pair * g.q_blocks * g.k_blocks + n;
    build_subset_list(g.q_blocks, [&](int64_t m) { return in_linear_set(map[m * g.k_blocks], scope); }, list);
    subset_sum_to_shared<kDim, kDim, kThreads>(list, dh_query + q_pair * g.q_blocks * kState,
                                               dh_total + q_pair * kState, &s.dh[0][0], kDim + kStatePad,
                                               /*accumulate=*/member > 0);
    for (int f = threadIdx.x; f < kDim; f += kThreads)
      s.dz[f] = (member > 0 ? s.dz[f] : 0.0f) + subset_sum(list, dz_query + q_pair * g.q_blocks * kDim, kDim,
                                                          dz_total + q_pair * kDim, f);
  }
  __syncthreads();

  // dKφ = V dh_nᵀ + dz_n (B (d, f) = dh_n[f][d]), then through φ into dK.
  float dphi[kDim / 8][4] = {};
  mma_tf32<kDim, kDim>(dphi, SharedMatrix<Element, kDim + kTilePad, 1>{&s.v[local0][0]},
                       SharedMatrix<float, 1, kDim + kStatePad>{&s.dh[0][0]});
  float phi[kDim / 8][4];
  load_accumulator_rows<kDim>(&s.phi[0][0], kDim + kTilePad, phi);
#pragma unroll
  for (int j = 0; j < kDim / 8; ++j)
#pragma unroll
    for (int e = 0; e < 4; ++e) dphi[j][e] += s.dz[accumulator_col(j, e)];
  feature_map_backward<kDim>(feature_map, phi, dphi);
  // dV += φ(K_n) dh_n.
  float dv_linear[kDim / 8][4] = {};
  mma_tf32<kDim, kDim>(dv_linear, SharedMatrix<Element, kDim + kTilePad, 1>{&s.phi[local0][0]},
                       SharedMatrix<float, kDim + kStatePad, 1>{&s.dh[0][0]});
  // dk, dv = the sparse branch's rows + these, in the output dtype.
  const int thread_row = accumulator_row(0);  // the thread's first row of the warp's 16
  const int64_t at_row = (padded0 + thread_row) * kDim + accumulator_col(0, 0);
  store_sum_with_rows(dk, b, kv, first + local0 + thread_row, end, dk_rows + at_row, kDim, dphi);
  store_sum_with_rows(dv, b, kv, first + local0 + thread_row, end, dv_rows + at_row, kDim, dv_linear);
}

// The query kernel of the sm_80 path: dOl by a product of fp32 rows first.
void linear_query_grads(const Geometry& g, const RoutingPlanView& plan, const TensorView& q, FeatureMap feature_map,
                        LinearScope scope, const LinearGradBuffers& buf, const float* dout_rows, const float* weight,
                        const TensorView& dout_linear, const float* dq_rows, const TensorView& dq,
                        cudaStream_t stream) {
  if (weight) {  // dOl = dO · W
    const int64_t rows = g.q_pairs() * g.q_rows();
    gemm(1, dense(dout_rows, rows, g.dim), dense(weight, g.dim, g.dim), dense_out(buf.dol, rows, g.dim), stream);
  }
  const dim3 query_grid(static_cast<unsigned>(g.q_blocks), static_cast<unsigned>(g.q_pairs()));
  dispatch_sparse_kernel(q.dtype, g, [&](auto tag, auto head_dim, auto block_q, auto) {
    using Element = decltype(tag);
    constexpr int D = decltype(head_dim)::value, BQ = decltype(block_q)::value;
    launch_with_shared(linear_query_grads_kernel<Element, D, BQ>, query_grid, BQ / kRowsPerWarp * kWarpSize,
                       query_block_shared_bytes<Element, D, BQ>(g), stream, g, plan, DeviceView<const Element>::of(q),
                       feature_map, scope, buf.keys, weight ? buf.dol : nullptr,
                       DeviceView<const Element>::of(dout_linear), buf.ol, dq_rows, DeviceView<Element>::of(dq),
                       buf.dh_query, buf.dz_query);
  });
  SLATTN_LAUNCH_CHECK("linear_query_grads_kernel");
}

// The key kernel of the sm_80 path: dh_n summed over the column lists from the fp32 dH_m.
void linear_key_grads(const Geometry& g, const RoutingPlanView& plan, const TensorView& k, const TensorView& v,
                      FeatureMap feature_map, LinearScope scope, const LinearGradBuffers& buf, const float* dk_rows,
                      const float* dv_rows, const TensorView& dk, const TensorView& dv, cudaStream_t stream) {
  const dim3 key_grid(static_cast<unsigned>(g.k_blocks), static_cast<unsigned>(g.kv_pairs()));
  dispatch_sparse_kernel(k.dtype, g, [&](auto tag, auto head_dim, auto, auto block_k) {
    using Element = decltype(tag);
    constexpr int D = decltype(head_dim)::value, BK = decltype(block_k)::value;
    launch_with_shared(linear_key_grads_kernel<Element, D, BK>, key_grid, BK / kRowsPerWarp * kWarpSize,
                       key_grad_shared_bytes<Element, D, BK>(g), stream, g, plan, DeviceView<const Element>::of(k),
                       DeviceView<const Element>::of(v), feature_map, scope, buf.dh_query, buf.dz_query,
                       buf.dh_total, buf.dz_total, dk_rows, dv_rows, DeviceView<Element>::of(dk),
                       DeviceView<Element>::of(dv));
  });
  SLATTN_LAUNCH_CHECK("linear_key_grads_kernel");
}

// SLATTN_CUDA_MAINLOOP=wgmma asks for the Hopper kernels: their refusal is an error.
void refuse_if_forced(const char* refusal) {
  if (refusal != nullptr && requested_mainloop() == Mainloop::wgmma)
    throw Unsupported(detail::concat("SLATTN_CUDA_MAINLOOP=wgmma: ", refusal));
}

}  // namespace

LinearGradBuffers LinearGradBuffers::carve(WorkspaceCarver& carver, const Geometry& g, bool projection, DType dtype,
                                           bool hopper) {
  const int64_t state = g.features * g.dim, rows = g.q_pairs() * g.q_rows();
  LinearGradBuffers b;
  b.keys = KeyStates::carve(carver, g);
  if (hopper) {
    b.linear_set = LinearSetOperands::carve(carver, g, dtype);
    b.key_set = LinearKeyGradOperands::carve(carver, g, dtype);
  }
  if (projection) {
    b.ol = carver.take<float>(rows * g.dim);
    if (hopper) b.projection_partials = carver.take<float>(projection_grad_partial_floats(g));
    b.dol = carver.take<float>(rows * g.dim);
  }
  b.dh_query = carver.take<float>(g.q_pairs() * g.q_blocks * state);
  b.dz_query = carver.take<float>(g.q_pairs() * g.q_blocks * g.features);
  b.dh_total = carver.take<float>(g.q_pairs() * state);
  b.dz_total = carver.take<float>(g.q_pairs() * g.features);
  return b;
}

bool fused_linear_backward_supported(const Geometry& g, FeatureMap feature_map) {
  if (!fused_linear_forward_supported(feature_map)) return false;
  size_t needed = 0;
  dispatch_sparse_kernel(DType::bfloat16, g, [&](auto tag, auto head_dim, auto, auto block_k) {
    needed = key_grad_shared_bytes<decltype(tag), decltype(head_dim)::value, decltype(block_k)::value>(g);
  });
  return needed <= max_shared_per_block();
}

bool linear_backward_fused_queries(const Geometry& g, const RoutingPlanView& plan, const TensorView& q,
                                   const TensorView& k, const TensorView& v, FeatureMap feature_map, LinearScope scope,
                                   const LinearGradBuffers& buf, const TensorView& dout, float* dout_rows,
                                   const float* weight, const TensorView& dout_linear, const float* dq_rows,
                                   const TensorView& dq, cudaStream_t stream) {
  const bool hopper = buf.linear_set.block_h != nullptr;
  // A Hopper kernel that refuses (key_states_wgmma.h, linear_backward_wgmma.h) leaves the rest of the
  // linear backward to the sm_80 kernels, on the fp32 states.
  const char* refusal = "not on Hopper";
  if (hopper) {
    refusal = key_block_states_wgmma(g, k, v, feature_map, buf.keys, buf.linear_set.block_h, buf.key_set.phi_k,
                                     stream);
    if (refusal == nullptr)
      refusal = linear_query_grads_wgmma(
          g, plan, q, feature_map, scope, buf.keys, buf.linear_set,
          LinearQueryGradArgs{dout, weight, dout_linear, weight ? buf.ol : nullptr, dq_rows, dq, buf.key_set.dh_low,
                              buf.dz_query},
          stream);
    refuse_if_forced(refusal);
  }
  const bool dh_low = refusal == nullptr;
  if (!dh_low) {  // on the fp32 states
    if (weight && hopper) feature_rows(dout, g.q_rows(), feature_map, nullptr, dout_rows, stream);
    key_block_states(g, k, v, feature_map, buf.keys, nullptr, nullptr, stream);
    linear_query_grads(g, plan, q, feature_map, scope, buf, dout_rows, weight, dout_linear, dq_rows, dq, stream);
  }
  column_sums(buf.dz_query, g.q_pairs(), g.q_blocks, g.features, buf.dz_total, stream);
  return dh_low;  // the Hopper query kernel ran
}

KeyGradLinearTerms linear_backward_fused_key_terms(const Geometry& g, const RoutingPlanView& plan, DType dtype,
                                                   FeatureMap feature_map, LinearScope scope,
                                                   const LinearGradBuffers& buf, const TensorView& dk,
                                                   const TensorView& dv, cudaStream_t stream) {
  return linear_key_terms_wgmma(g, plan, dtype, feature_map, scope, buf.linear_set, buf.key_set,
                                LinearKeyGradArgs{buf.dz_query, buf.dz_total, nullptr, nullptr, dk, dv}, stream);
}

void linear_backward_fused_keys(const Geometry& g, const RoutingPlanView& plan, const TensorView& k,
                                const TensorView& v, FeatureMap feature_map, LinearScope scope,
                                const LinearGradBuffers& buf, bool hopper_queries, const float* dk_rows,
                                const float* dv_rows, const TensorView& dk, const TensorView& dv,
                                cudaStream_t stream) {
  if (hopper_queries) {
    // It copies v as the key-block states did and needs less shared memory than the query kernel: it runs.
    const char* refusal =
        linear_key_grads_wgmma(g, plan, v, feature_map, scope, buf.linear_set, buf.key_set,
                               LinearKeyGradArgs{buf.dz_query, buf.dz_total, dk_rows, dv_rows, dk, dv}, stream);
    SLATTN_CHECK(refusal == nullptr, "the Hopper key kernel refused after the query kernel ran: ", refusal);
    return;
  }
  // The sm_80 key kernel, on the fp32 dH_m and their totals.
  column_sums(buf.dh_query, g.q_pairs(), g.q_blocks, g.features * g.dim, buf.dh_total, stream);
  linear_key_grads(g, plan, k, v, feature_map, scope, buf, dk_rows, dv_rows, dk, dv, stream);
}

}  // namespace slattn::cuda
