// The contraction variant of the emulation, `dora_ext_emu_fma`: the emulated CUDA kernels and the weight ops built
// with floating-point contraction on (-ffp-contract=fast, and FMA instructions), as nvcc compiles device code by
// default (-fmad=true), so a kernel whose exact rounding is a contract (bitsandbytes' dequantized values: the 4-bit
// norm's nested absmax, a product then a sum) shows a fused multiply-add's difference on the CPU too.
//
// One translation unit (the headers are parsed once) holding only what the weight ops need: the schemas (every op's;
// only the weight ops get kernels here), weight_ops.cpp, the emulated kernels and the emulation's controls.
#include "../../csrc/dora_ext.cpp"
#include "../../csrc/weight_ops.cpp"
#include "emulated_kernels.cpp"

namespace dora_ext {
namespace {
TORCH_LIBRARY_IMPL_FOR(DORA_EXT_OPS_NS, CPU, m) {
    m.impl("weight_norm", DORA_EXT_IMPL(weight_norm));
    m.impl("weight_norm_4bit", DORA_EXT_IMPL(weight_norm_4bit));
    m.impl("weight_norm_int8", DORA_EXT_IMPL(weight_norm_int8));
    m.impl("merge_", DORA_EXT_IMPL(merge_));
    m.impl("unmerge_", DORA_EXT_IMPL(unmerge_));
}
}  // namespace
}  // namespace dora_ext
