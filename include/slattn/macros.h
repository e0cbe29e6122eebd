// Portability macros of the public headers.
#pragma once

// Marks small inline helpers usable from both host code and CUDA kernels.
#ifdef __CUDACC__
#define SLATTN_HOST_DEVICE __host__ __device__
#else
#define SLATTN_HOST_DEVICE
#endif
