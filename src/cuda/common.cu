#include "cuda/common.cuh"

namespace slattn::cuda {

void check(cudaError_t status, const char* what) {
  if (status != cudaSuccess)
    throw Unsupported(detail::concat("CUDA error in ", what, ": ", cudaGetErrorString(status)));
}

}  // namespace slattn::cuda
