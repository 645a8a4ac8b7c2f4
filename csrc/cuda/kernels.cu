// The CUDA build of the kernels (kernels.cuh holds them, shared with the CPU emulation the tests run).
#include "kernels.cuh"
