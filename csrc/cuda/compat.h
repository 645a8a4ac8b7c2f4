// What differs between the real CUDA build of kernels.cuh (nvcc) and its CPU emulation (DORA_EXT_EMULATE_CUDA, the
// test build in tests/cuda_emulation): shared-memory declarations, kernel launches, the device guard, the stream and
// the launch check. Kernel code uses only these macros, threadIdx/blockIdx/blockDim/gridDim and __syncthreads().
#pragma once

#ifdef DORA_EXT_EMULATE_CUDA
#include "emulation.h"

// A block's shared array: one static array (the blocks of a launch run one after another), NaN-filled by the first
// thread of each block that reaches the declaration, so a read before any write is visible in the results.
#define DORA_SHARED(type, name, dims) \
    static type name dims;            \
    ::dora_ext::emu::shared_region(&name, sizeof(name))
#define DORA_LAUNCH(kernel, grid, block, stream, ...) \
    ::dora_ext::emu::launch(dim3(grid), dim3(block), [&] { kernel(__VA_ARGS__); })
#define DORA_LAUNCH_CHECK() ((void)0)
#define DORA_DEVICE_GUARD(t) ((void)(t))
#define DORA_STREAM 0

#else
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>

#define DORA_SHARED(type, name, dims) __shared__ type name dims
#define DORA_LAUNCH(kernel, grid, block, stream, ...) kernel<<<grid, block, 0, stream>>>(__VA_ARGS__)
#define DORA_LAUNCH_CHECK() C10_CUDA_KERNEL_LAUNCH_CHECK()
#define DORA_DEVICE_GUARD(t) const c10::cuda::CUDAGuard dora_device_guard((t).device())
#define DORA_STREAM at::cuda::getCurrentCUDAStream()
#endif
