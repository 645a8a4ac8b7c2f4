// The CUDA kernels (csrc/cuda/kernels.cuh) compiled as host C++ over the CPU emulation (include/emulation.h, whose
// macros include/emulated_compat.h gives kernels.cuh in place of compat.h's CUDA ones), plus the emulation's
// controls, for the test-only library `dora_ext_emu` (built by tests/test_cuda_emulation.py with the host ops and
// schemas of the real extension, include/emulated_ops.h force-included: every op there runs the CUDA kernels' own
// code on CPU tensors). fma_variant.cpp compiles this file again, with contraction on, as `dora_ext_emu_fma`.
#include "include/emulated_compat.h"
// after the emulation's macros: compat.h refuses DORA_EXT_EMULATE_CUDA without them
#include "../../csrc/cuda/kernels.cuh"

#include <ATen/ops/ones.h>
#include <torch/library.h>

#include "../../csrc/op_namespace.h"
#include "include/nan_fill.h"

namespace {
const bool kInstalled = (dora_ext::emu::install_nan_fill_allocator(), true);

void set_thread_order(bool descending) {
    dora_ext::emu::set_order(descending ? dora_ext::emu::Order::Descending : dora_ext::emu::Order::Ascending);
}
}  // namespace

// A deliberately unchecked kernel, for the tests of the guards themselves: one thread reads or writes element
// `offset` of a float32 tensor, in range or not (external linkage, as the kernels: the launch check names it).
namespace dora_ext::emu_probe {
__global__ void probe_kernel(float* data, int64_t offset, bool write, float* value) {
    if (write) {
        data[offset] = value[0];
    } else {
        value[0] = data[offset];
    }
}

// write: data[offset] = 1; else returns data[offset] (a one-element tensor).
at::Tensor probe_access(at::Tensor& data, int64_t offset, bool write) {
    TORCH_CHECK(data.scalar_type() == at::kFloat, "probe_access: expected a float32 tensor");
    auto value = at::ones({1}, data.options());
    DORA_LAUNCH(probe_kernel, 1, 1, 0, data.data_ptr<float>(), offset, write, value.data_ptr<float>());
    return value;
}
}  // namespace dora_ext::emu_probe

#define DORA_EXT_EMU_FRAGMENT(ns, m) TORCH_LIBRARY_FRAGMENT(ns, m)
DORA_EXT_EMU_FRAGMENT(DORA_EXT_OPS_NS, m) {
    // The order in which the fibers of a block run between barriers: ascending or descending thread index.
    m.def("set_thread_order(bool descending) -> ()", &set_thread_order);
    // The largest grid y and z a launch accepts and the launchers clamp to: CUDA's 65535, lowered by the tests of
    // the clamps (emulation.h).
    m.def("set_max_grid_yz(int limit) -> ()", &dora_ext::emu::set_max_grid_yz);
    m.def("probe_access(Tensor(a!) data, int offset, bool write) -> Tensor");
    m.impl("probe_access", c10::DispatchKey::CPU, DORA_EXT_IMPL(dora_ext::emu_probe::probe_access));
}
