#include "slattn/options.h"

#include "slattn/error.h"
#include "slattn/tensor_view.h"

namespace slattn {

FeatureMap parse_feature_map(std::string_view name, std::string_view argument) {
  if (name == "softmax") return FeatureMap::softmax;
  if (name == "elu") return FeatureMap::elu;
  if (name == "relu") return FeatureMap::relu;
  if (name == "hedgehog") return FeatureMap::hedgehog;
  throw Error(detail::concat(argument, " must be one of 'softmax', 'elu', 'relu', 'hedgehog', got '", name, "'"));
}

LinearScope parse_linear_scope(std::string_view name, std::string_view argument) {
  if (name == "marginal") return LinearScope::marginal;
  if (name == "all") return LinearScope::all;
  throw Error(detail::concat(argument, " must be one of 'marginal', 'all', got '", name, "'"));
}

std::string feature_map_name(FeatureMap feature_map) {
  switch (feature_map) {
    case FeatureMap::softmax: return "softmax";
    case FeatureMap::elu: return "elu";
    case FeatureMap::relu: return "relu";
    case FeatureMap::hedgehog: return "hedgehog";
  }
  throw Error("unknown feature map code");
}

std::string linear_scope_name(LinearScope scope) {
  switch (scope) {
    case LinearScope::marginal: return "marginal";
    case LinearScope::all: return "all";
  }
  throw Error("unknown linear scope code");
}

std::string dtype_name(DType dtype) {
  switch (dtype) {
    case DType::float32: return "float32";
    case DType::float64: return "float64";
    case DType::bfloat16: return "bfloat16";
    case DType::float16: return "float16";
  }
  throw Error("unknown dtype code");
}

std::size_t dtype_size(DType dtype) {
  switch (dtype) {
    case DType::float32: return 4;
    case DType::float64: return 8;
    case DType::bfloat16:
    case DType::float16: return 2;
  }
  throw Error("unknown dtype code");
}

}  // namespace slattn
