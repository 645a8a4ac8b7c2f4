// Every op's kernel registration, for both backends. The host ops are device-agnostic (host_common.h's
// kernels_for picks each backend's kernel table), so the CPU and CUDA keys get the same list.
#include <torch/library.h>

#include "dora_ext.h"

namespace dora_ext {
namespace {
void register_kernels(torch::Library& m) {
    m.impl("weight_norm", &weight_norm);
    m.impl("dora_linear", &dora_linear);
    m.impl("dora_linear_backward", &dora_linear_backward);
    m.impl("dora_rescale", &dora_rescale);
    m.impl("dora_rescale_backward", &dora_rescale_backward);
    m.impl("merge_", &merge_);
    m.impl("unmerge_", &unmerge_);
}
}  // namespace

TORCH_LIBRARY_IMPL(dora_ext, CPU, m) { register_kernels(m); }

#ifdef DORA_EXT_WITH_CUDA
TORCH_LIBRARY_IMPL(dora_ext, CUDA, m) { register_kernels(m); }
#endif

}  // namespace dora_ext
