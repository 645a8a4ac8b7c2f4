// Host side of the ops on the weight itself: weight_norm (the DoRA norm, never differentiated), merge_ and unmerge_
// (in place, row-blocked, no [out, in] temporary).
#include <ATen/ATen.h>
#include <ATen/DeviceGuard.h>

#include "checks.h"
#include "dora_ext.h"
#include "host_common.h"

namespace dora_ext {

at::Tensor weight_norm(const at::Tensor& weight, const at::Tensor& lora_A, const at::Tensor& lora_B, double scaling) {
    const char* op = "weight_norm";
    check_lowrank(op, weight, lora_A, lora_B);
    check_scaling(op, scaling);
    const at::OptionalDeviceGuard guard(at::device_of(weight));
    const auto acc = accum_dtype({weight.scalar_type(), lora_A.scalar_type()});
    return kernels_for(weight).lowrank_row_norm(weight, lora_A.to(acc).contiguous(), lora_B.to(acc).contiguous(),
                                                scaling);
}

namespace {
at::Tensor merge_factor(const char* op, const at::Tensor& weight, const at::Tensor& lora_A, const at::Tensor& lora_B,
                        const at::Tensor& magnitude, const at::Tensor& weight_norm, double scaling) {
    check_lowrank(op, weight, lora_A, lora_B);
    check_scaling(op, scaling);
    check_dora_vectors(op, weight, magnitude, weight_norm);
    const auto acc = accum_dtype({weight.scalar_type(), lora_A.scalar_type()});
    auto g = gains(magnitude, weight_norm, acc, false).g;
    DORA_CHECK(op, at::isfinite(g).all().item<bool>(),
               "expected finite magnitude / weight_norm ratios, got non-finite values (check the magnitude for "
               "inf/NaN)");
    return g;
}
}  // namespace

void merge_(at::Tensor& weight, const at::Tensor& lora_A, const at::Tensor& lora_B, const at::Tensor& magnitude,
            const at::Tensor& weight_norm, double scaling) {
    const char* op = "merge_";
    const at::OptionalDeviceGuard guard(at::device_of(weight));
    auto g = merge_factor(op, weight, lora_A, lora_B, magnitude, weight_norm, scaling);
    const auto acc = g.scalar_type();
    kernels_for(weight).lowrank_rowscale_(weight, g, g, lora_A.to(acc).contiguous(), lora_B.to(acc).contiguous(),
                                          scaling);
}

void unmerge_(at::Tensor& weight, const at::Tensor& lora_A, const at::Tensor& lora_B, const at::Tensor& magnitude,
              const at::Tensor& weight_norm, double scaling) {
    const char* op = "unmerge_";
    const at::OptionalDeviceGuard guard(at::device_of(weight));
    auto g = merge_factor(op, weight, lora_A, lora_B, magnitude, weight_norm, scaling);
    DORA_CHECK(op, (g != 0).all().item<bool>(),
               "cannot unmerge rows whose merge factor magnitude/weight_norm is 0: the merged row is all zeros and "
               "the original row is not recoverable from it");
    const auto acc = g.scalar_type();
    kernels_for(weight).lowrank_rowscale_(weight, g.reciprocal(), at::full_like(g, -1.0), lora_A.to(acc).contiguous(),
                                          lora_B.to(acc).contiguous(), scaling);
}

}  // namespace dora_ext
