// Host side of the ops on the weight itself: weight_norm (the DoRA norm, never differentiated) for floating-point,
// bitsandbytes 4-bit and int8 weights, merge_ and unmerge_ (in place, row-blocked, no [out, in] temporary).
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
void check_dtype(const char* op, const char* name, const at::Tensor& t, at::ScalarType dtype) {
    DORA_CHECK(op, t.scalar_type() == dtype, "expected ", name, " of dtype ", dtype, ", got ", t.scalar_type());
}

void check_numel(const char* op, const char* name, const at::Tensor& t, int64_t numel, const char* why) {
    DORA_CHECK(op, t.numel() == numel, "expected ", name, " with ", numel, " elements (", why, "), got ",
               shape_str(t));
}
}  // namespace

at::Tensor weight_norm_4bit(const at::Tensor& packed, const at::Tensor& absmax, const at::Tensor& code, int64_t blocksize,
                            const std::optional<at::Tensor>& absmax_code, const std::optional<at::Tensor>& absmax_scale,
                            const std::optional<at::Tensor>& absmax_offset, int64_t absmax_blocksize,
                            int64_t out_features, int64_t in_features, at::ScalarType dtype, const at::Tensor& lora_A,
                            const at::Tensor& lora_B, double scaling, int64_t row_group) {
    const char* op = "weight_norm_4bit";
    DORA_CHECK(op, row_group == 0 || (row_group == 32 && out_features % 32 == 0 && in_features % 2 == 0),
               "expected row_group 0 (the standard layout) or 32 (bitsandbytes' CPU layout, out_features a multiple "
               "of 32 and in_features even), got row_group=", row_group, " for a weight [", out_features, ", ",
               in_features, "]");
    DORA_CHECK(op, out_features >= 0 && in_features >= 0, "expected a weight shape [out, in] >= 0, got [",
               out_features, ", ", in_features, "]");
    auto power_of_two = [](int64_t n) { return n > 0 && (n & (n - 1)) == 0; };
    DORA_CHECK(op, power_of_two(blocksize), "expected a power-of-two blocksize (bitsandbytes': 32 to 4096), got ",
               blocksize);
    DORA_CHECK(op, dtype == at::kFloat || dtype == at::kHalf || dtype == at::kBFloat16,
               "expected the dequantized dtype float32, float16 or bfloat16 (bitsandbytes' 4-bit dtypes), got ", dtype);
    check_dtype(op, "packed", packed, at::kByte);
    const int64_t numel = out_features * in_features, blocks = (numel + blocksize - 1) / blocksize;
    check_numel(op, "packed", packed, (numel + 1) / 2, "two 4-bit codes per byte");
    check_dtype(op, "code", code, at::kFloat);
    check_numel(op, "code", code, 16, "one value per 4-bit code");
    check_numel(op, "absmax", absmax, blocks, "one per block of the flattened weight");
    const bool nested = absmax.scalar_type() == at::kByte;
    DORA_CHECK(op, nested || absmax.scalar_type() == at::kFloat,
               "expected absmax of dtype float32, or uint8 for a nested (double-quantized) absmax, got ",
               absmax.scalar_type());
    DORA_CHECK(op, nested == (absmax_code.has_value() && absmax_scale.has_value() && absmax_offset.has_value()),
               nested ? "expected absmax_code, absmax_scale and absmax_offset with a uint8 (nested) absmax"
                      : "expected no absmax_code, absmax_scale or absmax_offset with a float32 absmax");
    for (const auto* t : {&packed, &absmax, &code}) check_same_device(op, "every 4-bit tensor", *t, packed, "packed");
    Packed4bit W{packed.contiguous(), absmax.contiguous(), code.contiguous(), {}, {}, {}, blocksize, absmax_blocksize,
                 out_features, in_features, dtype, row_group};
    if (nested) {
        DORA_CHECK(op, power_of_two(absmax_blocksize), "expected a power-of-two absmax_blocksize, got ",
                   absmax_blocksize);
        check_dtype(op, "absmax_code", *absmax_code, at::kFloat);
        check_numel(op, "absmax_code", *absmax_code, 256, "one value per 8-bit absmax code");
        check_dtype(op, "absmax_scale", *absmax_scale, at::kFloat);
        check_numel(op, "absmax_scale", *absmax_scale, (blocks + absmax_blocksize - 1) / absmax_blocksize,
                    "one per block of absmax_blocksize absmax values");
        check_dtype(op, "absmax_offset", *absmax_offset, at::kFloat);
        check_numel(op, "absmax_offset", *absmax_offset, 1, "a scalar");
        for (const auto* t : {&*absmax_code, &*absmax_scale, &*absmax_offset})
            check_same_device(op, "every 4-bit tensor", *t, packed, "packed");
        W.absmax_code = absmax_code->contiguous();
        W.absmax_scale = absmax_scale->contiguous();
        W.absmax_offset = absmax_offset->contiguous();
    }
    check_factors(op, packed, out_features, in_features, lora_A, lora_B, "the quantized weight");
    check_scaling(op, scaling);
    const at::OptionalDeviceGuard guard(at::device_of(packed));
    const auto acc = accum_dtype({lora_A.scalar_type()});
    return kernels_for(packed).packed4_row_norm(W, lora_A.to(acc).contiguous(), lora_B.to(acc).contiguous(), scaling);
}

at::Tensor weight_norm_int8(const at::Tensor& weight, const at::Tensor& row_scale, const at::Tensor& lora_A,
                            const at::Tensor& lora_B, double scaling) {
    const char* op = "weight_norm_int8";
    check_dtype(op, "weight", weight, at::kChar);
    DORA_CHECK(op, weight.dim() == 2, "expected weight of shape [out_features, in_features], got ", shape_str(weight));
    check_dtype(op, "row_scale", row_scale, at::kFloat);
    DORA_CHECK(op, row_scale.dim() == 1 && row_scale.size(0) == weight.size(0), "expected row_scale of shape [",
               weight.size(0), "] (bitsandbytes' SCB), got ", shape_str(row_scale));
    check_same_device(op, "row_scale", row_scale, weight);
    check_factors(op, weight, weight.size(0), weight.size(1), lora_A, lora_B, "the quantized weight");
    check_scaling(op, scaling);
    const at::OptionalDeviceGuard guard(at::device_of(weight));
    const auto acc = accum_dtype({lora_A.scalar_type()});
    return kernels_for(weight).int8_row_norm(weight.contiguous(), row_scale.contiguous(), lora_A.to(acc).contiguous(),
                                             lora_B.to(acc).contiguous(), scaling);
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
