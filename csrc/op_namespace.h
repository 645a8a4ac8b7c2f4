// The op namespace: `dora_ext` for the real extension. The CUDA-emulation test build (tests/cuda_emulation) compiles
// the same schemas and host ops under its own namespace (DORA_EXT_OPS_NS=dora_ext_emu), so both can be loaded in
// one process, and wraps every op so that fresh memory is NaN-filled while it runs (DORA_EXT_IMPL).
#pragma once

#include <torch/library.h>

#ifndef DORA_EXT_OPS_NS
#define DORA_EXT_OPS_NS dora_ext
#endif

// TORCH_LIBRARY pastes its namespace argument: one level of indirection expands DORA_EXT_OPS_NS first.
#define TORCH_LIBRARY_FOR(ns, m) TORCH_LIBRARY(ns, m)
#define TORCH_LIBRARY_IMPL_FOR(ns, key, m) TORCH_LIBRARY_IMPL(ns, key, m)

#ifdef DORA_EXT_EMULATE_CUDA
#include "cuda/nan_fill.h"
#define DORA_EXT_IMPL(fn) (&::dora_ext::emu::NanFilled<decltype(&fn), &fn>::call)
#else
#define DORA_EXT_IMPL(fn) (&fn)
#endif
