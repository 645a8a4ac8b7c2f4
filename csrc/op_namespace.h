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

// What an op registration hands the dispatcher: the function itself. The emulation build defines its wrapper in a
// header it force-includes (tests/cuda_emulation/include/emulated_ops.h), so the product sources include no test
// header; without it the emulated ops would run unguarded, hence the error.
#ifdef DORA_EXT_EMULATE_CUDA
#ifndef DORA_EXT_IMPL
#error "DORA_EXT_EMULATE_CUDA without DORA_EXT_IMPL: the emulation build force-includes emulated_ops.h (-include)"
#endif
#else
#define DORA_EXT_IMPL(fn) (&fn)
#endif
