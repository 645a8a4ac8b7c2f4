// The CPU emulation's side of csrc/cuda/compat.h: the macros the kernels of csrc/cuda/kernels.cuh are written in
// (shared-memory declarations, launches, the device guard, the stream, the launch check, the grid limit, the kernels'
// namespace, the float intrinsics), defined over the fiber emulation (emulation.h). The emulation build
// (tests/cuda_emulation/emulated_kernels.cpp) includes this before kernels.cuh; compat.h then defines nothing (it
// refuses DORA_EXT_EMULATE_CUDA without these), so the product's headers name no test file.
#pragma once

#ifndef DORA_EXT_EMULATE_CUDA
#error "emulated_compat.h is the CUDA emulation's (tests/cuda_emulation): build it with -DDORA_EXT_EMULATE_CUDA"
#endif

#include "../../../csrc/quantized_weights.h"
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
