// Force-included (-include) into every translation unit of the CUDA-emulation builds (tests/test_cuda_emulation.py),
// the product's host sources among them: the op registrations (csrc/registration.cpp, through op_namespace.h's
// DORA_EXT_IMPL) wrap every op so that fresh memory is guarded and NaN-filled while it runs and its tensor arguments
// are guarded copies (nan_fill.h). In the product build op_namespace.h defines DORA_EXT_IMPL as the function itself.
#pragma once

#ifndef DORA_EXT_EMULATE_CUDA
#error "emulated_ops.h is the CUDA emulation's (tests/cuda_emulation): build it with -DDORA_EXT_EMULATE_CUDA"
#endif

#include "nan_fill.h"

#define DORA_EXT_IMPL(fn) (&::dora_ext::emu::NanFilled<decltype(&fn), &fn>::call)
