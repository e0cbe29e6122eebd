// Forward of SLA on CUDA: the sparse kernel, then (when asked for) the linear
// branch and the projection out = Os + Ol Wᵀ + b: for the fixed feature maps
// on Hopper inside the sparse kernel's epilogue where it can take them
// (ForwardLinearTerms: block_k = D, a projection, Ol not returned), else from
// every query block's H_m, the linear set's product (linear_forward_wgmma.h,
// after key_states_wgmma.h); elsewhere fused from per-block states
// (linear_forward_fused.h); through fp32 rows for hedgehog (linear_states.h).
#include "cuda/common.cuh"
#include "cuda/gemm.cuh"
#include "cuda/key_states_wgmma.h"
#include "cuda/linear_forward_fused.h"
#include "cuda/linear_forward_wgmma.h"
#include "cuda/linear_set_operands.h"
#include "cuda/linear_states.h"
#include "cuda/sla_cuda.h"
#include "cuda/sparse_kernels.h"
#include "cuda/sparse_mainloops.h"
#include "cuda/sparse_quantized.h"

namespace slattn::cuda {
namespace {

bool fused(const SlaForwardParams& p) { return fused_linear_forward_supported(p.feature_map); }

// Whether the Hopper sparse forward is to add the linear branch in its epilogue
// (ForwardLinearTerms; it may still refuse, rarely: a layout of out the copy
// engine cannot write): its key tiles hold a D x D state, a projection to fold
// into the states, and neither Ol itself nor the low-bit forward asked for.
bool linear_epilogue_expected(const SlaForwardParams& p, const Geometry& g) {
  return p.proj_weight != nullptr && !p.quantized && !p.out_linear.defined() && g.block_k == g.dim;
}

struct ForwardBuffers {
  QuantizedOperands quantized{};  // quantized=True
  KeyStates key_states{};    // fused path
  LinearSetOperands linear_set{};  // fused path on Hopper
  LinearBuffers linear{};    // unfused path
  float* os_rows = nullptr;  // unfused path, (q pairs, q_rows, D): Os, then Os + Ol Wᵀ

  static ForwardBuffers carve(WorkspaceCarver& carver, const SlaForwardParams& p, const Geometry& g) {
    ForwardBuffers b;
    if (p.quantized) b.quantized = QuantizedOperands::carve(carver, g);
    if (!p.linear_branch()) return b;
    if (fused(p)) {
      b.key_states = KeyStates::carve(carver, g);
      // Without φ(Q) rows where the epilogue is expected: should it refuse, the sm_80 kernels serve.
      if (use_hopper_linear(p.feature_map))
        b.linear_set = LinearSetOperands::carve(carver, g, p.q.dtype, !linear_epilogue_expected(p, g));
      return b;
    }
    b.linear = LinearBuffers::carve(carver, g, p.feature_map);
    if (p.proj_weight) b.os_rows = carver.take<float>(g.q_pairs() * g.q_rows() * g.dim);
    return b;
  }
};

// The sparse branch, in low bits when asked for (sparse_quantized.h).
void run_sparse_forward(const SlaForwardParams& p, const Geometry& g, const RoutingPlanView& plan,
                        const SparseForwardArgs& args, const ForwardBuffers& buf, cudaStream_t stream) {
  if (!p.quantized) {
    sparse_forward(g, plan, args, stream);
    return;
  }
  quantize_operands(g, p.q, p.k, p.v, buf.quantized, stream);
  sparse_forward_quantized(g, plan, args, buf.quantized, stream);
}

// The sparse forward with, on Hopper, the linear branch in its epilogue
// (ForwardLinearTerms): W rounded, the key-block states projected (h_n Wᵀ)
// and the linear set's sums run first, once the kernel is sure to add them.
// Returns whether it did (else the sparse kernel wrote Os alone, as `sparse`
// asks).
bool sparse_forward_with_linear_terms(const SlaForwardParams& p, const Geometry& g, const RoutingPlanView& plan,
                                      const SparseForwardArgs& sparse, const ForwardBuffers& buf,
                                      cudaStream_t stream) {
  const LinearSetOperands& set = buf.linear_set;
  const ForwardLinearTerms terms{p.feature_map, set.set_h, set.set_z, static_cast<const float*>(p.proj_bias)};
  const ForwardLinearStep before{p.out, [&]() -> const ForwardLinearTerms* {
                                   round_to_dtype(static_cast<const float*>(p.proj_weight), set.weight, p.q.dtype,
                                                  g.dim * g.dim, stream);
                                   if (key_block_states_wgmma(g, p.k, p.v, p.feature_map, buf.key_states,
                                                              set.block_h, nullptr, stream, set.weight) != nullptr)
                                     return nullptr;
                                   prepare_linear_set_states(g, plan, p.q.dtype, p.linear_scope, buf.key_states,
                                                             nullptr, set, stream);
                                   return &terms;
                                 }};
  return sparse_forward(g, plan, sparse, stream, before);
}

// Os, then the linear branch's out = Os + Ol Wᵀ + b. With a projection Os is
// written once, to out_sparse when asked for (the linear branch reads it
// there), else to out (the linear branch adds to it in place).
void fused_forward(const SlaForwardParams& p, const Geometry& g, const RoutingPlanView& plan,
                   const ForwardBuffers& buf, cudaStream_t stream) {
  const bool os_apart = p.proj_weight != nullptr && p.out_sparse.defined();
  const TensorView& os = os_apart ? p.out_sparse : p.out;
  SparseForwardArgs sparse{p.q, p.k, p.v, os_apart ? TensorView{} : p.out, p.out_sparse, nullptr,
                           static_cast<float*>(p.lse), static_cast<float>(p.scale)};
  if (p.linear_branch() && buf.linear_set.block_h && linear_epilogue_expected(p, g)) {
    if (sparse_forward_with_linear_terms(p, g, plan, sparse, buf, stream)) return;
  } else {
    run_sparse_forward(p, g, plan, sparse, buf, stream);
  }
  if (!p.linear_branch()) return;
  const auto* weight = static_cast<const float*>(p.proj_weight);
  const auto* bias = static_cast<const float*>(p.proj_bias);
  if (buf.linear_set.block_h) {
    const char* refusal = key_block_states_wgmma(g, p.k, p.v, p.feature_map, buf.key_states,
                                                 buf.linear_set.block_h, nullptr, stream);
    if (refusal == nullptr)
      refusal = linear_output_wgmma(g, plan, p.q, p.feature_map, p.linear_scope, buf.key_states, buf.linear_set,
                                    weight, bias, os, p.out, p.out_linear, stream);
    if (refusal == nullptr) return;
    if (requested_mainloop() == Mainloop::wgmma)
      throw Unsupported(detail::concat("SLATTN_CUDA_MAINLOOP=wgmma: ", refusal));
  }
  // The sm_80 kernels read the fp32 states, which the Hopper ones do not write.
  key_block_states(g, p.k, p.v, p.feature_map, buf.key_states, nullptr, nullptr, stream);
  linear_output_fused(g, plan, p.q, p.feature_map, p.linear_scope, buf.key_states,
                      weight, bias, os, p.out, p.out_linear, stream);
}

}  // namespace

size_t sla_forward_workspace_bytes(const SlaForwardParams& params, const RoutingPlanView& plan) {
  return WorkspaceCarver::bytes_for<ForwardBuffers>(
      params, Geometry::of(params.q, params.k, plan.shape, params.feature_map));
}

void sla_forward(const SlaForwardParams& p, const RoutingPlanView& plan) {
  const Geometry g = Geometry::of(p.q, p.k, plan.shape, p.feature_map);
  check_cuda_support(g, p.proj_weight, p.proj_dtype, p.feature_map, p.feature_weights);
  if (p.quantized) check_quantized_support(g, p.q.dtype);  // refused before any work is queued
  auto stream = static_cast<cudaStream_t>(p.stream);
  WorkspaceCarver carver(p.workspace, p.workspace_bytes);
  const ForwardBuffers buf = ForwardBuffers::carve(carver, p, g);
  if (fused(p)) {
    fused_forward(p, g, plan, buf, stream);
    return;
  }

  SparseForwardArgs sparse{p.q, p.k, p.v, p.proj_weight ? TensorView{} : p.out, p.out_sparse, buf.os_rows,
                           static_cast<float*>(p.lse), static_cast<float>(p.scale)};
  run_sparse_forward(p, g, plan, sparse, buf, stream);
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
