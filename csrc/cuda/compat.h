// What differs between the real CUDA build of kernels.cuh (nvcc) and its CPU emulation (DORA_EXT_EMULATE_CUDA, the
// test build in tests/cuda_emulation): shared-memory declarations, kernel launches, the device guard, the stream,
// the launch check, the grid limit the launchers clamp to and the kernels' namespace. Kernel code uses only these
// macros, threadIdx/blockIdx/blockDim/gridDim, __syncthreads() and the float intrinsics __fmul_rn / __fadd_rn.
#pragma once

#ifdef DORA_EXT_EMULATE_CUDA
#include "emulation.h"

// A block's shared array: one static array (the blocks of a launch run one after another), NaN-filled by the first
// thread of each block that reaches the declaration, so a read before any write is visible in the results.
#define DORA_SHARED(type, name, dims) \
    static type name dims;            \
    ::dora_ext::emu::shared_region(&name, sizeof(name))
// The argument expressions go along as text, so a launch check can name the tensor it is about.
#define DORA_LAUNCH(kernel, grid, block, stream, ...) \
    ::dora_ext::emu::launch(#__VA_ARGS__, dim3(grid), dim3(block), kernel, __VA_ARGS__)
#define DORA_LAUNCH_CHECK() ((void)0)
#define DORA_DEVICE_GUARD(t) ((void)(t))
#define DORA_STREAM 0
// CUDA's 65535, unless a test lowers it (emulation.h: set_max_grid_yz) to reach the clamps with few rows.
#define DORA_MAX_GRID_Y (::dora_ext::emu::max_grid_yz())
// `DORA_KERNELS_NAMESPACE {`: the kernels get external linkage here (an inline namespace: still visible unqualified),
// so a launch check can name a kernel from its address; in the CUDA build they are internal (`namespace {`).
#define DORA_KERNELS_NAMESPACE inline namespace emulated

// CUDA's round-to-nearest float intrinsics: each result rounded on its own, never contracted into a fused
// multiply-add, even when this build contracts (-ffp-contract=fast: the variant that shows nvcc's contraction).
inline float __fmul_rn(float a, float b) { return ::dora_ext::mul_rn(a, b); }
inline float __fadd_rn(float a, float b) { return ::dora_ext::add_rn(a, b); }

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
