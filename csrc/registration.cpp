// Every op's kernel registration, for both backends. The host ops are device-agnostic (host_common.h's
// kernels_for picks each backend's kernel table), so the CPU and CUDA keys get the same list.
#include <torch/library.h>

#include "dora_ext.h"
#include "op_namespace.h"

namespace dora_ext {
namespace {
void register_kernels(torch::Library& m) {
    m.impl("weight_norm", DORA_EXT_IMPL(weight_norm));
    m.impl("weight_norm_4bit", DORA_EXT_IMPL(weight_norm_4bit));
    m.impl("weight_norm_int8", DORA_EXT_IMPL(weight_norm_int8));
    m.impl("dora_linear", DORA_EXT_IMPL(dora_linear));
    m.impl("dora_linear_backward", DORA_EXT_IMPL(dora_linear_backward));
    m.impl("dora_rescale", DORA_EXT_IMPL(dora_rescale));
    m.impl("dora_rescale_backward", DORA_EXT_IMPL(dora_rescale_backward));
    m.impl("dora_mixed", DORA_EXT_IMPL(dora_mixed));
    m.impl("merge_", DORA_EXT_IMPL(merge_));
    m.impl("unmerge_", DORA_EXT_IMPL(unmerge_));
}
}  // namespace

TORCH_LIBRARY_IMPL_FOR(DORA_EXT_OPS_NS, CPU, m) { register_kernels(m); }

#ifdef DORA_EXT_WITH_CUDA
TORCH_LIBRARY_IMPL_FOR(DORA_EXT_OPS_NS, CUDA, m) { register_kernels(m); }
#endif

}  // namespace dora_ext
