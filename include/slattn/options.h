// Named options of SPEC sections 3 and 4, with their parsers.
#pragma once

#include <string>
#include <string_view>

namespace slattn {

// Feature map φ of the linear branch (SPEC section 3).
enum class FeatureMap : int { softmax = 0, elu = 1, relu = 2 };

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
