// Forward of SLA on CUDA: the sparse kernel, then (when asked for) the linear
// branch and the projection out = Os + Ol Wᵀ + b.
#include "cuda/common.cuh"
#include "cuda/gemm.cuh"
#include "cuda/linear_states.h"
#include "cuda/sla_cuda.h"
#include "cuda/sparse_kernels.h"

namespace slattn::cuda {
namespace {

struct ForwardBuffers {
  LinearBuffers linear{};
  float* os_rows = nullptr;  // (q pairs, q_rows, D): Os, then Os + Ol Wᵀ

  static ForwardBuffers carve(WorkspaceCarver& carver, const SlaForwardParams& p, const Geometry& g) {
    ForwardBuffers b;
    if (p.linear_branch()) b.linear = LinearBuffers::carve(carver, g, p.feature_map);
    if (p.proj_weight) b.os_rows = carver.take<float>(g.q_pairs() * g.q_rows() * g.dim);
    return b;
  }
};

}  // namespace

size_t sla_forward_workspace_bytes(const SlaForwardParams& params, const RoutingPlanView& plan) {
  return WorkspaceCarver::bytes_for<ForwardBuffers>(
      params, Geometry::of(params.q, params.k, plan.shape, params.feature_map));
}

void sla_forward(const SlaForwardParams& p, const RoutingPlanView& plan) {
  const Geometry g = Geometry::of(p.q, p.k, plan.shape, p.feature_map);
  check_cuda_support(g, p.proj_weight, p.proj_dtype, p.feature_map, p.feature_weights);
  auto stream = static_cast<cudaStream_t>(p.stream);
  WorkspaceCarver carver(p.workspace, p.workspace_bytes);
  const ForwardBuffers buf = ForwardBuffers::carve(carver, p, g);

  SparseForwardArgs sparse{p.q, p.k, p.v, p.proj_weight ? TensorView{} : p.out, p.out_sparse, buf.os_rows,
                           static_cast<float*>(p.lse), static_cast<float>(p.scale)};
  sparse_forward(g, plan, sparse, stream);
  if (!p.linear_branch()) return;
  linear_forward(g, plan, p.q, p.k, p.v, p.feature_map, p.feature_weights, p.linear_scope, buf.linear, p.out_linear,
                 stream);
  if (!p.proj_weight) return;

  // Os rows += Ol Wᵀ (W is (out, in) row-major, so Wᵀ is W with swapped strides).
  const int64_t rows = g.q_pairs() * g.q_rows();
  gemm(1, dense(buf.linear.ol, rows, g.dim),
       dense(static_cast<const float*>(p.proj_weight), g.dim, g.dim, /*transposed=*/true),
       dense_out(buf.os_rows, rows, g.dim), stream, /*beta=*/1.0f);
  combine_output(g, buf.os_rows, static_cast<const float*>(p.proj_bias), p.out, stream);
}

}  // namespace slattn::cuda
