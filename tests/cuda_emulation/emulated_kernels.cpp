// The CUDA kernels (csrc/cuda/kernels.cuh) compiled as host C++ over the CPU emulation (csrc/cuda/emulation.h), plus
// the emulation's controls, for the test-only library `dora_ext_emu` (built by tests/test_cuda_emulation.py with the
// host ops and schemas of the real extension: every op there runs the CUDA kernels' own code on CPU tensors).
#include "../../csrc/cuda/kernels.cuh"

#include <torch/library.h>

#include "../../csrc/cuda/nan_fill.h"

namespace {
const bool kInstalled = (dora_ext::emu::install_nan_fill_allocator(), true);

void set_thread_order(bool descending) {
    dora_ext::emu::set_order(descending ? dora_ext::emu::Order::Descending : dora_ext::emu::Order::Ascending);
}
}  // namespace

TORCH_LIBRARY_FRAGMENT(dora_ext_emu, m) {
    // The order in which the fibers of a block run between barriers: ascending or descending thread index.
    m.def("set_thread_order(bool descending) -> ()", &set_thread_order);
}
