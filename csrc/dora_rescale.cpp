// Host side of dora_rescale and its backward: the DoRA update applied to a base layer's output that was computed
// elsewhere. This is what a PEFT LoRA variant receives (peft/tuners/lora/layer.py Linear.forward computes
// base_layer(x) and hands `result` to the variant), so the fused layers can stay PEFT's own layer objects.
//
//   base None (eval, or no dropout):  out = g ⊙ (result − bias + s·u Bᵀ) + bias      (PEFT's multiplicative form)
//   base = x_d Wᵀ (training, p > 0):  out = result + (g−1) ⊙ base + g ⊙ s·u Bᵀ        (PEFT's additive form)
// (the first is the second with base = result − bias, and is computed that way: see below)
//
// with u = x Aᵀ (or x_d Aᵀ) [T, r] from the caller's GEMM. Everything is in result's dtype; g, g−1 and the
// reductions in fp32 (fp64 for fp64). The output is allocated in its final shape: never a view.
#include <ATen/ATen.h>
#include <ATen/DeviceGuard.h>

#include "checks.h"
#include "dora_ext.h"
#include "host_common.h"

namespace dora_ext {

std::tuple<at::Tensor, at::Tensor> dora_rescale(const at::Tensor& result, const std::optional<at::Tensor>& base,
                                                const std::optional<at::Tensor>& bias, const at::Tensor& lora_u,
                                                const at::Tensor& lora_B, const at::Tensor& magnitude,
                                                const at::Tensor& weight_norm, double scaling,
                                                const std::optional<at::Tensor>& x, const std::optional<at::Tensor>& weight) {
    const char* op = "dora_rescale";
    check_floating(op, "lora_B", lora_B);
    DORA_CHECK(op, lora_B.dim() == 2 && lora_B.size(1) >= 1, "expected lora_B of shape [out_features, r] with r >= 1, got ",
               shape_str(lora_B));
    check_scaling(op, scaling);
    const int64_t out_f = lora_B.size(0), r = lora_B.size(1);
    check_activation(op, "result", result, result, out_f, "out_features of lora_B", "result");
    check_same_device(op, "lora_B", lora_B, result, "result");
    check_activation(op, "lora_u", lora_u, result, r, "the rank of lora_B", "result");
    DORA_CHECK(op, lora_u.sizes().slice(0, lora_u.dim() - 1) == result.sizes().slice(0, result.dim() - 1),
               "expected lora_u of shape ", c10::str(at::IntArrayRef(with_last_dim(result.sizes(), r))), " (result's leading dims), got ",
               shape_str(lora_u));
    if (base) {
        check_activation(op, "base", *base, result, out_f, "out_features of lora_B", "result");
        DORA_CHECK(op, base->sizes() == result.sizes(), "expected base of result's shape ", shape_str(result), ", got ",
                   shape_str(*base));
        DORA_CHECK(op, !bias, "expected no bias with base: result already holds it (the bias is subtracted only in "
                   "the form without base)");
    }
    if (bias) {
        check_row_vector(op, "bias", *bias, lora_B, "result");
        DORA_CHECK(op, bias->scalar_type() == result.scalar_type(), "expected bias of result's dtype ",
                   result.scalar_type(), ", got ", bias->scalar_type());
    }
    check_dora_vectors(op, lora_B, magnitude, weight_norm, "result");
    DORA_CHECK(op, x.has_value() == weight.has_value(), "expected x and weight together (both or neither)");
    if (weight) {  // only the backward's recompute reads them (ops.py): shapes checked here, where errors are clear
        DORA_CHECK(op, weight->dim() == 2 && weight->size(0) == out_f, "expected weight of shape [", out_f,
                   ", in_features], got ", shape_str(*weight));
        DORA_CHECK(op, x->dim() >= 1 && x->size(-1) == weight->size(1) &&
                           x->sizes().slice(0, x->dim() - 1) == result.sizes().slice(0, result.dim() - 1),
                   "expected x of shape [..., ", weight->size(1), "] with result's leading dims, got ", shape_str(*x));
    }
    const at::OptionalDeviceGuard guard(at::device_of(result));
    const auto& k = kernels_for(result);

    const auto acc_t = accum_dtype({result.scalar_type()});
    const auto B = lora_B.to(result.scalar_type());
    const int64_t T = leading_rows(result);
    const auto u2 = lora_u.reshape({T, r});
    const auto res2 = result.reshape({T, out_f});
    auto out = at::empty(result.sizes(), result.options());
    auto out2 = out.view({T, out_f});
    const bool nonempty = out2.numel() > 0;
    // Both forms are evaluated as PEFT writes them, out = result + (g−1) ⊙ base + g ⊙ s·q (without base, base is
    // result − bias), so an untrained adapter (B = 0, m = the forward's own norm: g = 1, g−1 = 0) returns `result`
    // bit for bit, as PEFT does; acc ← base + s·q, the pre-scale sum the magnitude gradient needs.
    const auto gn = gains(magnitude, weight_norm, acc_t, true);
    out2.copy_(res2);
    auto acc = base ? base->reshape({T, out_f}).clone(at::MemoryFormat::Contiguous)
                    : (bias ? res2 - *bias : res2.clone(at::MemoryFormat::Contiguous));
    const auto q = at::mm(u2, B.t());
    if (nonempty) k.epilogue_dropout(out2, acc, q, gn.g, gn.gm1, at::Tensor(), scaling);
    return {out, acc};
}

std::tuple<OptTensor, OptTensor, OptTensor, OptTensor, OptTensor> dora_rescale_backward(
    const at::Tensor& grad_out, const std::optional<at::Tensor>& lora_u, const at::Tensor& lora_B,
    const at::Tensor& magnitude, const at::Tensor& weight_norm, const std::optional<at::Tensor>& acc, double scaling,
    bool has_base, std::array<bool, 5> output_mask, bool acc_is_output) {
    const char* op = "dora_rescale_backward";
    const auto [need_result, need_base, need_u, need_B, need_m] = output_mask;
    DORA_CHECK(op, !need_result || !has_base, "with base, result's gradient is grad_out itself (the caller passes it)");
    DORA_CHECK(op, !need_base || has_base, "a gradient for base was requested without base");
    DORA_CHECK(op, !acc_is_output || !has_base, "acc_is_output needs the form without base (out = g ⊙ acc)");
    check_floating(op, "lora_B", lora_B);
    DORA_CHECK(op, lora_B.dim() == 2, "expected lora_B of shape [out_features, r], got ", shape_str(lora_B));
    check_scaling(op, scaling);
    const int64_t out_f = lora_B.size(0), r = lora_B.size(1);
    check_activation(op, "grad_out", grad_out, grad_out, out_f, "out_features of lora_B", "grad_out");
    check_dora_vectors(op, lora_B, magnitude, weight_norm, "lora_B");
    const int64_t T = leading_rows(grad_out);
    check_saved(op, lora_u, acc, need_B, need_m, T, out_f, r);
    const at::OptionalDeviceGuard guard(at::device_of(grad_out));

    const auto dtype = grad_out.scalar_type();
    const auto gn = gains(magnitude, weight_norm, accum_dtype({dtype}), has_base && need_base);
    const bool need_gs = need_u || need_B || need_result;
    auto red = run_backward_reduce(grad_out.reshape({T, out_f}), gn, acc, need_gs, has_base && need_base, need_m,
                                   false);
    OptTensor g_result, g_base, g_u, g_B, g_m;
    if (need_result) g_result = red.grad_scaled.view(grad_out.sizes());
    if (need_base) g_base = red.grad_scaled_m1.view(grad_out.sizes());
    if (need_u) g_u = scaled_mm(red.grad_scaled, lora_B.to(dtype), scaling).view(with_last_dim(grad_out.sizes(), r));
    if (need_B) g_B = scaled_mm(red.grad_scaled.t(), *lora_u, scaling).to(lora_B.scalar_type());
    if (need_m) g_m = magnitude_grad(red, gn, magnitude, acc_is_output);
    return {g_result, g_base, g_u, g_B, g_m};
}

}  // namespace dora_ext
