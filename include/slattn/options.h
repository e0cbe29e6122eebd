// Named options of SPEC sections 3 and 4, with their parsers.
#pragma once

#include <cstdint>
#include <string>
#include <string_view>

#include "slattn/macros.h"

namespace slattn {

// Feature map φ of the linear branch (SPEC section 3). hedgehog is the
// learnable one: φ(x) = softmax([x Wᵀ, −x Wᵀ]) over 2d features, W (d, d).
enum class FeatureMap : int { softmax = 0, elu = 1, relu = 2, hedgehog = 3 };

// Whether φ has trainable weights (the params then carry them).
SLATTN_HOST_DEVICE inline bool has_feature_weights(FeatureMap feature_map) {
  return feature_map == FeatureMap::hedgehog;
}

// Width F of φ(x) for a row of head_dim values: Qφ is (L, F), h_n (F, d), z_n (F).
SLATTN_HOST_DEVICE inline int64_t feature_dim(FeatureMap feature_map, int64_t head_dim) {
  return has_feature_weights(feature_map) ? 2 * head_dim : head_dim;
}

// Which key blocks the linear branch covers for a query block (SPEC section 3).
enum class LinearScope : int {
  marginal = 0,  // blocks with M = 0 (the paper's SLA)
  all = 1,       // every block that is not negligible, critical ones included
};

// Parsers throw slattn::Error naming `argument` and listing the allowed values.
FeatureMap parse_feature_map(std::string_view name, std::string_view argument = "feature_map");
LinearScope parse_linear_scope(std::string_view name, std::string_view argument = "linear_scope");
std::string feature_map_name(FeatureMap feature_map);
std::string linear_scope_name(LinearScope scope);

// ε of the linear branch's denominator (SPEC section 3).
inline constexpr double kLinearEpsilon = 1e-5;

}  // namespace slattn
