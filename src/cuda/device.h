// Where a pointer lives, so that host-only code never dereferences device
// memory. Compiled with CUDA when the toolkit is found; otherwise every
// pointer is taken to be a host pointer.
#pragma once

namespace slattn::cuda {

// True when the build has CUDA and `pointer` is device (or managed) memory.
bool is_device_pointer(const void* pointer);

}  // namespace slattn::cuda
