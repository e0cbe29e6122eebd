// One params struct per direction (STYLE.md rule 2). Raw pointers, element
// strides, shapes and options: no framework types. Zero-initialise, then fill.
#pragma once

#include <cstddef>

#include "slattn/options.h"
#include "slattn/tensor_view.h"

namespace slattn {

// The LSE is fp32 for fp32/bf16/fp16 inputs and fp64 for fp64 inputs, so that
// float64 runs (gradient checks) stay in float64 throughout (SPEC section 4).
inline DType lse_dtype(DType input) { return input == DType::float64 ? DType::float64 : DType::float32; }

// Weights of a learnable feature map (FeatureMap::hedgehog, SPEC section 3):
// W_q for the queries and W_k for the keys, each (D, D) row-major as (out, in)
// so that φ(x) = softmax([x Wᵀ, −x Wᵀ]). Tied maps (tie_feature_map_qk) pass
// the same pointer twice; the core treats equal pointers as one weight.
// Required with hedgehog, refused with the fixed maps.
struct FeatureWeights {
  const void* q = nullptr;
  const void* k = nullptr;
  DType dtype = DType::float32;  // float32, or float64 with float64 inputs

  bool tied() const { return q != nullptr && q == k; }
};

// Forward of SLA (SPEC sections 2-4):
//   out = Os + Ol · proj_weightᵀ + proj_bias
// q (B, Hq, Lq, D); k, v (B, Hkv, Lk, D); out, out_sparse, out_linear like q.
// The linear branch runs when proj_weight or out_linear is given; a missing
// projection counts as zero.
struct SlaForwardParams {
  TensorView q, k, v;
  const void* proj_weight = nullptr;  // (D, D) row-major (out, in): the master weights
  const void* proj_bias = nullptr;    // (D); may be given only with proj_weight
  DType proj_dtype = DType::float32;  // float32, or float64 with float64 inputs

  TensorView out;         // required
  TensorView out_sparse;  // optional: Os, which the backward pass needs
  TensorView out_linear;  // optional: Ol before the projection
  void* lse = nullptr;    // required: (B, Hq, Lq) contiguous, natural log, lse_dtype(q.dtype)

  double scale = 0.0;     // softmax scale; the bindings default it to 1/sqrt(D)
  FeatureMap feature_map = FeatureMap::softmax;
  FeatureWeights feature_weights;  // hedgehog only
  LinearScope linear_scope = LinearScope::marginal;
  // The sparse branch in low bits (SPEC section 6): INT8 Q and K~ per block,
  // FP8 e4m3 P and V. The CPU path computes it as fake quantization, Hopper
  // GPUs on INT8/FP8 tensor cores; other GPUs refuse it (Unsupported).
  bool quantized = false;

  bool linear_branch() const { return proj_weight != nullptr || out_linear.defined(); }

  // Device data only: the stream to run on (a cudaStream_t; null is the
  // default stream) and scratch memory of at least the size returned by the
  // matching *_workspace_bytes() function. Nothing else is allocated per call.
  void* stream = nullptr;
  void* workspace = nullptr;
  size_t workspace_bytes = 0;
};

// Backward of SLA (SPEC section 5). Incoming gradients: dout on `out`, and
// optionally extra gradients on the branch outputs (when the caller used them
// directly): dOs = dout + dout_sparse, dOl = dout · proj_weight + dout_linear.
// All gradients are written (not accumulated). dk/dv are summed over the query
// heads that share a key/value head.
//
// With hedgehog the backward also writes the feature weights' gradients, in
// feature_weights.dtype: d_feature_weight_q = Σ over query rows, and
// d_feature_weight_k = Σ over key rows. Tied weights (feature_weights.q ==
// feature_weights.k) have one gradient, the sum of both: the caller passes
// the same output pointer for both and the core writes it once.
struct SlaBackwardParams {
  TensorView q, k, v;
  TensorView out_sparse;     // Os of the forward pass
  const void* lse = nullptr;  // LSE of the forward pass, (B, Hq, Lq), lse_dtype(q.dtype)
  const void* proj_weight = nullptr;
  bool has_proj_bias = false;
  DType proj_dtype = DType::float32;

  TensorView dout;          // required
  TensorView dout_sparse;   // optional
  TensorView dout_linear;   // optional; needs the linear branch

  TensorView dq, dk, dv;    // required
  void* d_proj_weight = nullptr;  // (D, D) in proj_dtype, required when proj_weight is given
  void* d_proj_bias = nullptr;    // (D) in proj_dtype, required when has_proj_bias
  void* d_feature_weight_q = nullptr;  // (D, D), required with hedgehog and the linear branch
  void* d_feature_weight_k = nullptr;  // (D, D); == d_feature_weight_q when the weights are tied

  double scale = 0.0;
  FeatureMap feature_map = FeatureMap::softmax;
  FeatureWeights feature_weights;  // hedgehog only
  LinearScope linear_scope = LinearScope::marginal;

  bool linear_branch() const { return proj_weight != nullptr || dout_linear.defined(); }

  // Device data only: the stream to run on (a cudaStream_t; null is the
  // default stream) and scratch memory of at least the size returned by the
  // matching *_workspace_bytes() function. Nothing else is allocated per call.
  void* stream = nullptr;
  void* workspace = nullptr;
  size_t workspace_bytes = 0;
};

}  // namespace slattn
