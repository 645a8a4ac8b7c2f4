// What differs between the real CUDA build of kernels.cuh (nvcc) and its CPU emulation (DORA_EXT_EMULATE_CUDA, the
// test build in tests/cuda_emulation): shared-memory declarations, kernel launches, the device guard, the stream,
// the launch check, the grid limit the launchers clamp to and the kernels' namespace. Kernel code uses only these
// macros, threadIdx/blockIdx/blockDim/gridDim, __syncthreads() and the float intrinsics __fmul_rn / __fadd_rn.
// The CUDA definitions are here; the emulation brings its own (tests/cuda_emulation/include/emulated_compat.h,
// included before kernels.cuh), so the product sources include no test header.
#pragma once

#ifdef DORA_EXT_EMULATE_CUDA
#ifndef DORA_LAUNCH
#error "DORA_EXT_EMULATE_CUDA without the emulation's macros: include emulated_compat.h before kernels.cuh"
#endif
#else
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>

#define DORA_SHARED(type, name, dims) __shared__ type name dims
#define DORA_LAUNCH(kernel, grid, block, stream, ...) kernel<<<grid, block, 0, stream>>>(__VA_ARGS__)
#define DORA_LAUNCH_CHECK() C10_CUDA_KERNEL_LAUNCH_CHECK()
#define DORA_DEVICE_GUARD(t) const c10::cuda::CUDAGuard dora_device_guard((t).device())
#define DORA_STREAM at::cuda::getCurrentCUDAStream()
#define DORA_MAX_GRID_Y int64_t{65535}
#define DORA_KERNELS_NAMESPACE namespace
#endif
