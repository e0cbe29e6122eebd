// Carving typed buffers out of one caller-provided workspace. The same layout
// code sizes the workspace (data == nullptr) and hands out the pointers, so the
// two can never disagree.
#pragma once

#include <cstddef>
#include <cstdint>

#include "slattn/error.h"

namespace slattn::cuda {

class WorkspaceCarver {
 public:
  WorkspaceCarver(void* data, size_t capacity) : base_(static_cast<char*>(data)), capacity_(capacity) {}

  template <typename T>
  T* take(int64_t count) {
    constexpr size_t kAlignment = 256;  // keeps every buffer aligned for vector loads
    offset_ = (offset_ + kAlignment - 1) / kAlignment * kAlignment;
    T* pointer = base_ ? reinterpret_cast<T*>(base_ + offset_) : nullptr;
    offset_ += static_cast<size_t>(count) * sizeof(T);
    if (base_ && offset_ > capacity_)
      throw Error(detail::concat("workspace too small: needs at least ", offset_, " bytes, got ", capacity_));
    return pointer;
  }
  size_t bytes() const { return offset_; }

  // Bytes a Buffers layout (a struct with static carve(carver, params, geometry)) takes.
  template <typename Buffers, typename Params, typename Geometry>
  static size_t bytes_for(const Params& params, const Geometry& geometry) {
    WorkspaceCarver sizer(nullptr, 0);
    Buffers::carve(sizer, params, geometry);
    return sizer.bytes();
  }

 private:
  char* base_;
  size_t capacity_;
  size_t offset_ = 0;
};

}  // namespace slattn::cuda
