// Builds without the CUDA toolkit: there is no device memory to detect.
#include "cuda/device.h"

namespace slattn::cuda {

bool is_device_pointer(const void*) { return false; }

}  // namespace slattn::cuda
