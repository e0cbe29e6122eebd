// A non-owning view of a 4-D tensor: the only way tensors enter the core.
//
// The logical order is always (batch, heads, length, head_dim); layouts such
// as NHD (B, L, H, D) are expressed by permuting the strides, never by copying.
// Strides are in elements, as int64, like PyTorch's.
#pragma once

#include <array>
#include <cstdint>
#include <string>

#include "slattn/macros.h"

namespace slattn {

enum class DType : int { float32 = 0, float64 = 1, bfloat16 = 2, float16 = 3 };

std::string dtype_name(DType dtype);
std::size_t dtype_size(DType dtype);

// Axis names of the logical order.
enum Axis : int { kBatch = 0, kHeads = 1, kLength = 2, kHeadDim = 3 };

struct TensorView {
  void* data = nullptr;
  DType dtype = DType::float32;
  std::array<int64_t, 4> size{};    // (B, H, L, D)
  std::array<int64_t, 4> stride{};  // elements, same order as size

  SLATTN_HOST_DEVICE bool defined() const { return data != nullptr; }
  SLATTN_HOST_DEVICE int64_t batch() const { return size[kBatch]; }
  SLATTN_HOST_DEVICE int64_t heads() const { return size[kHeads]; }
  SLATTN_HOST_DEVICE int64_t length() const { return size[kLength]; }
  SLATTN_HOST_DEVICE int64_t head_dim() const { return size[kHeadDim]; }
  SLATTN_HOST_DEVICE int64_t offset(int64_t b, int64_t h, int64_t l, int64_t d) const {
    return b * stride[kBatch] + h * stride[kHeads] + l * stride[kLength] + d * stride[kHeadDim];
  }
};

}  // namespace slattn
