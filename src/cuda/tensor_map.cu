// Host side of tensor_map.h: the driver's cuTensorMapEncodeTiled, reached
// through the runtime's entry-point query so that nothing links libcuda.
#include <cudaTypedefs.h>

#include <algorithm>
#include <array>

#include "cuda/tensor_map.h"
#include "slattn/error.h"

namespace slattn::cuda {
namespace {

PFN_cuTensorMapEncodeTiled_v12000 encode_tiled() {
  static const auto function = [] {
    void* entry = nullptr;
    cudaDriverEntryPointQueryResult found{};
    constexpr unsigned kFirstVersionWithTensorMaps = 12000;
    const cudaError_t status =
        cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &entry, kFirstVersionWithTensorMaps,
                                         cudaEnableDefault, &found);
    return status == cudaSuccess && found == cudaDriverEntryPointSuccess
               ? reinterpret_cast<PFN_cuTensorMapEncodeTiled_v12000>(entry)
               : nullptr;
  }();
  return function;
}

struct RowAxis {
  int axis;  // kLength, kHeads or kBatch
  uint64_t size, stride_bytes;
};

}  // namespace

RowTileMap byte_tile_map(const void* data, int64_t matrices, int64_t rows, int64_t row_bytes, int box_rows,
                         int box_bytes) {
  const auto encode = encode_tiled();
  SLATTN_CHECK(encode != nullptr, "the CUDA driver does not provide cuTensorMapEncodeTiled");
  const cuuint64_t dims[4] = {static_cast<cuuint64_t>(row_bytes), static_cast<cuuint64_t>(rows),
                              static_cast<cuuint64_t>(matrices), 1};
  const cuuint64_t matrix_bytes = static_cast<cuuint64_t>(rows * row_bytes);
  const cuuint64_t strides[3] = {static_cast<cuuint64_t>(row_bytes), matrix_bytes, matrix_bytes * dims[2]};
  const cuuint32_t box[4] = {static_cast<cuuint32_t>(box_bytes), static_cast<cuuint32_t>(box_rows), 1, 1};
  const cuuint32_t element_strides[4] = {1, 1, 1, 1};
  RowTileMap map{};
  map.length_axis = 1;
  map.head_axis = 2;
  map.batch_axis = 3;
  const CUresult status =
      encode(&map.map, CU_TENSOR_MAP_DATA_TYPE_UINT8, 4, const_cast<void*>(data), dims, strides, box, element_strides,
             CU_TENSOR_MAP_INTERLEAVE_NONE, box_bytes == 128 ? CU_TENSOR_MAP_SWIZZLE_128B : CU_TENSOR_MAP_SWIZZLE_64B,
             CU_TENSOR_MAP_L2_PROMOTION_L2_256B, CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);
  SLATTN_CHECK(status == CUDA_SUCCESS, "cuTensorMapEncodeTiled refused a low-bit operand's map (error ", int(status),
               ")");
  return map;
}

bool make_row_tile_map(const TensorView& x, int box_rows, RowTileMap* out) {
  constexpr uint64_t kAlignment = 16, kStrideLimit = uint64_t(1) << 40;
  if (x.dtype != DType::bfloat16 && x.dtype != DType::float16) return false;
  const uint64_t element = dtype_size(x.dtype);
  if (x.stride[kHeadDim] != 1 || x.head_dim() % kRowTileBoxCols != 0 ||
      reinterpret_cast<uintptr_t>(x.data) % kAlignment != 0)
    return false;
  const auto encode = encode_tiled();
  if (encode == nullptr) return false;

  std::array<RowAxis, 3> axes{};
  int count = 0;
  for (int axis : {kLength, kHeads, kBatch}) {
    if (x.stride[axis] < 0) return false;
    axes[count++] = {axis, static_cast<uint64_t>(x.size[axis]), static_cast<uint64_t>(x.stride[axis]) * element};
  }
  // By stride, axes of one element last (their stride is meaningless and may be anything); these get a
  // packed stride so that every stride is valid.
  std::stable_sort(axes.begin(), axes.end(), [](const RowAxis& a, const RowAxis& b) {
    if ((a.size == 1) != (b.size == 1)) return b.size == 1;
    return a.stride_bytes < b.stride_bytes;
  });
  uint64_t span = static_cast<uint64_t>(x.head_dim()) * element;
  for (RowAxis& axis : axes) {
    if (axis.size == 1) axis.stride_bytes = span;
    if (axis.stride_bytes == 0 || axis.stride_bytes % kAlignment != 0 || axis.stride_bytes >= kStrideLimit)
      return false;
    span = std::max(span, axis.stride_bytes * axis.size);
  }

  const cuuint64_t dims[4] = {static_cast<cuuint64_t>(x.head_dim()), axes[0].size, axes[1].size, axes[2].size};
  const cuuint64_t strides[3] = {axes[0].stride_bytes, axes[1].stride_bytes, axes[2].stride_bytes};
  cuuint32_t box[4] = {kRowTileBoxCols, 1, 1, 1};
  const cuuint32_t element_strides[4] = {1, 1, 1, 1};
  RowTileMap map{};
  for (int i = 0; i < 3; ++i) {
    if (axes[i].axis == kLength) {
      map.length_axis = i + 1;
      box[i + 1] = static_cast<cuuint32_t>(box_rows);
    }
    if (axes[i].axis == kHeads) map.head_axis = i + 1;
    if (axes[i].axis == kBatch) map.batch_axis = i + 1;
  }
  const CUresult status =
      encode(&map.map, x.dtype == DType::bfloat16 ? CU_TENSOR_MAP_DATA_TYPE_BFLOAT16 : CU_TENSOR_MAP_DATA_TYPE_FLOAT16,
             4, x.data, dims, strides, box, element_strides, CU_TENSOR_MAP_INTERLEAVE_NONE,
             CU_TENSOR_MAP_SWIZZLE_128B, CU_TENSOR_MAP_L2_PROMOTION_L2_256B, CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);
  if (status != CUDA_SUCCESS) return false;
  *out = map;
  return true;
}

}  // namespace slattn::cuda
