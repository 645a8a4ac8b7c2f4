// Argument validation shared by every host entry point. Each message names the op, what was expected and what
// came, because these errors usually surface deep inside a training loop where the call site is not obvious.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <cmath>
#include <optional>
#include <string>

namespace dora_ext {

inline std::string shape_str(const at::Tensor& t) { return c10::str(t.sizes()); }

#define DORA_CHECK(op, cond, ...) TORCH_CHECK((cond), "dora_ext::", op, ": ", __VA_ARGS__)

inline void check_floating(const char* op, const char* name, const at::Tensor& t) {
    DORA_CHECK(op, at::isFloatingType(t.scalar_type()),
               "expected ", name, " to be a floating-point tensor (float16, bfloat16, float32 or float64), got ",
               t.scalar_type());
}

inline void check_same_device(const char* op, const char* name, const at::Tensor& t, const at::Tensor& ref,
                              const char* ref_name = "weight") {
    DORA_CHECK(op, t.device() == ref.device(), "expected ", name, " on ", ref.device(), " (the device of ", ref_name,
               "), got ", t.device());
}

inline void check_scaling(const char* op, double scaling) {
    DORA_CHECK(op, std::isfinite(scaling), "expected a finite scaling, got ", scaling);
}

// lora_A [r, in] and lora_B [out, r] of one dtype, on the device of `ref` (the weight, or a quantized weight's
// storage, named ref_name): the low-rank update s·B·A of an [out, in] weight.
inline void check_factors(const char* op, const at::Tensor& ref, int64_t out, int64_t in, const at::Tensor& lora_A,
                          const at::Tensor& lora_B, const char* ref_name = "weight") {
    check_floating(op, "lora_A", lora_A);
    check_floating(op, "lora_B", lora_B);
    DORA_CHECK(op, lora_A.dim() == 2 && lora_A.size(1) == in && lora_A.size(0) >= 1,
               "expected lora_A of shape [r, ", in, "] with r >= 1, got ", shape_str(lora_A));
    const int64_t r = lora_A.size(0);
    DORA_CHECK(op, lora_B.dim() == 2 && lora_B.size(0) == out && lora_B.size(1) == r,
               "expected lora_B of shape [", out, ", ", r, "], got ", shape_str(lora_B));
    DORA_CHECK(op, lora_A.scalar_type() == lora_B.scalar_type(), "expected lora_A and lora_B of one dtype, got ",
               lora_A.scalar_type(), " and ", lora_B.scalar_type());
    check_same_device(op, "lora_A", lora_A, ref, ref_name);
    check_same_device(op, "lora_B", lora_B, ref, ref_name);
}

// weight [out, in], lora_A [r, in], lora_B [out, r]: the low-rank update s·B·A has the weight's shape.
inline void check_lowrank(const char* op, const at::Tensor& weight, const at::Tensor& lora_A, const at::Tensor& lora_B) {
    check_floating(op, "weight", weight);
    DORA_CHECK(op, weight.dim() == 2, "expected weight of shape [out_features, in_features], got ", shape_str(weight));
    check_factors(op, weight, weight.size(0), weight.size(1), lora_A, lora_B);
}

// A per-output-feature vector (magnitude, weight_norm, bias): shape [out], on the weight's device.
// `ref` is the weight, or any tensor whose first dimension is out_features (lora_B), named `ref_name`.
inline void check_row_vector(const char* op, const char* name, const at::Tensor& t, const at::Tensor& ref,
                             const char* ref_name = "weight") {
    check_floating(op, name, t);
    DORA_CHECK(op, t.dim() == 1 && t.size(0) == ref.size(0), "expected ", name, " of shape [", ref.size(0),
               "], got ", shape_str(t));
    check_same_device(op, name, t, ref, ref_name);
}

// An activation [..., features] of `ref`'s dtype and device (x, x_drop, grad_out, a base-layer result); ref_name
// names ref in the messages.
inline void check_activation(const char* op, const char* name, const at::Tensor& t, const at::Tensor& ref,
                             int64_t features, const char* what, const char* ref_name = "weight") {
    check_floating(op, name, t);
    DORA_CHECK(op, t.dim() >= 1 && t.size(-1) == features, "expected ", name, " of shape [..., ", features, "] (",
               what, "), got ", shape_str(t));
    DORA_CHECK(op, t.scalar_type() == ref.scalar_type(), "expected ", name, " of the ", ref_name, "'s dtype ",
               ref.scalar_type(), ", got ", t.scalar_type());
    check_same_device(op, name, t, ref, ref_name);
}

inline void check_dora_vectors(const char* op, const at::Tensor& ref, const at::Tensor& magnitude,
                               const at::Tensor& weight_norm, const char* ref_name = "weight") {
    check_row_vector(op, "magnitude", magnitude, ref, ref_name);
    check_row_vector(op, "weight_norm", weight_norm, ref, ref_name);
}

}  // namespace dora_ext
