// Host side of dora_linear and dora_linear_backward: argument checks, then GEMMs through ATen (cuBLAS / MKL /
// oneDNN) and the fused DoRA kernels of the tensor's backend. The math follows PEFT 0.21
// (peft/tuners/lora/variants.py DoraLinearVariant, dora.py DoraLinearLayer) with the norm detached (DoRA §4.3).
//
// Precision: GEMMs run in x's dtype (fp32 adapters are cast to it, r·(in+out) elements), accumulating in fp32
// inside the GEMM; the norm, g = m/n, (g-1) = (m-n)/n and every epilogue/reduction run in fp32 (fp64 for fp64
// inputs) with a single rounding of the output.
//
// Outputs are allocated in their final shape and the GEMMs write into 2-D views of them, so what the op returns is
// an ordinary tensor, never a view: callers may modify it in place (ReLU(inplace=True), `y += residual`).
#include <ATen/ATen.h>
#include <ATen/DeviceGuard.h>

#include "checks.h"
#include "dora_ext.h"
#include "host_common.h"

namespace dora_ext {

std::tuple<at::Tensor, at::Tensor, at::Tensor> dora_linear(const at::Tensor& x, const std::optional<at::Tensor>& x_drop,
                                                           const at::Tensor& weight,
                                                           const std::optional<at::Tensor>& bias,
                                                           const at::Tensor& lora_A, const at::Tensor& lora_B,
                                                           const at::Tensor& magnitude, const at::Tensor& weight_norm,
                                                           double scaling) {
    const char* op = "dora_linear";
    check_lowrank(op, weight, lora_A, lora_B);
    check_scaling(op, scaling);
    const int64_t out_f = weight.size(0), in_f = weight.size(1);
    check_activation(op, "x", x, weight, in_f, "in_features of weight");
    if (x_drop) {
        check_activation(op, "x_drop", *x_drop, weight, in_f, "in_features of weight");
        DORA_CHECK(op, x_drop->sizes() == x.sizes(), "expected x_drop of x's shape ", shape_str(x), ", got ",
                   shape_str(*x_drop));
    }
    if (bias) {
        check_row_vector(op, "bias", *bias, weight);
        DORA_CHECK(op, bias->scalar_type() == weight.scalar_type(), "expected bias of the weight's dtype ",
                   weight.scalar_type(), ", got ", bias->scalar_type());
    }
    check_dora_vectors(op, weight, magnitude, weight_norm);
    const at::OptionalDeviceGuard guard(at::device_of(weight));
    const auto& k = kernels_for(x);

    const auto acc_t = accum_dtype({x.scalar_type()});
    const at::Tensor bias_t = bias ? bias->contiguous() : at::Tensor();
    const auto A = lora_A.to(x.scalar_type());
    const auto B = lora_B.to(x.scalar_type());
    const int64_t T = leading_rows(x);
    const auto x2 = x.reshape({T, in_f});
    auto out = at::empty(with_last_dim(x.sizes(), out_f), x.options());
    auto out2 = out.view({T, out_f});
    const bool nonempty = out2.numel() > 0;

    if (!x_drop) {
        const auto gn = gains(magnitude, weight_norm, acc_t, false);
        auto u = at::mm(x2, A.t());
        auto acc = at::mm(x2, weight.t());
        acc.addmm_(u, B.t(), 1.0, scaling);  // acc = x Wᵀ + s·u Bᵀ, one rounding in the GEMM
        if (nonempty) k.epilogue(out2, acc, gn.g, bias_t);
        return {out, acc, u};
    }
    // PEFT's dropout path: the base GEMM sees the un-dropped x, the DoRA correction the dropped one.
    const auto gn = gains(magnitude, weight_norm, acc_t, true);
    const auto xd2 = x_drop->reshape({T, in_f});
    auto u = at::mm(xd2, A.t());
    at::mm_out(out2, x2, weight.t());
    auto acc = at::mm(xd2, weight.t());
    const auto q = at::mm(u, B.t());
    if (nonempty) k.epilogue_dropout(out2, acc, q, gn.g, gn.gm1, bias_t, scaling);
    return {out, acc, u};
}

std::tuple<OptTensor, OptTensor, OptTensor, OptTensor, OptTensor, OptTensor> dora_linear_backward(
    const at::Tensor& grad_out, const std::optional<at::Tensor>& x_src, const at::Tensor& weight,
    const at::Tensor& lora_A, const at::Tensor& lora_B, const at::Tensor& magnitude, const at::Tensor& weight_norm,
    const std::optional<at::Tensor>& acc, const std::optional<at::Tensor>& lora_u, double scaling, bool dropout,
    std::array<bool, 6> output_mask, bool acc_is_output) {
    const char* op = "dora_linear_backward";
    check_lowrank(op, weight, lora_A, lora_B);
    check_scaling(op, scaling);
    check_dora_vectors(op, weight, magnitude, weight_norm);
    const int64_t out_f = weight.size(0), in_f = weight.size(1);
    check_activation(op, "grad_out", grad_out, weight, out_f, "out_features of weight");
    const auto [need_x, need_xd, need_A, need_B, need_m, need_bias] = output_mask;
    DORA_CHECK(op, !need_xd || dropout, "a gradient for x_drop was requested without dropout");
    DORA_CHECK(op, !need_A || x_src, "the lora_A gradient needs x_src");
    DORA_CHECK(op, !acc_is_output || !dropout, "acc_is_output needs the form without dropout (out = g ⊙ acc)");
    const int64_t T = leading_rows(grad_out);
    if (x_src) check_activation(op, "x_src", *x_src, weight, in_f, "in_features of weight");
    check_saved(op, lora_u, acc, need_B, need_m, T, out_f, lora_A.size(0));
    const at::OptionalDeviceGuard guard(at::device_of(weight));

    const auto acc_t = accum_dtype({weight.scalar_type()});
    const auto dtype = weight.scalar_type();
    const auto A = lora_A.to(dtype);
    const auto B = lora_B.to(dtype);
    const auto gn = gains(magnitude, weight_norm, acc_t, dropout && need_xd);
    // g ⊙ δ feeds every LoRA-side product and, without dropout, the whole dx GEMM.
    const bool need_gs = need_A || need_B || need_xd || (need_x && !dropout);
    auto red = run_backward_reduce(grad_out.reshape({T, out_f}), gn, acc, need_gs, dropout && need_xd, need_m,
                                   need_bias);

    OptTensor gx, gxd, gA, gB, gm, gb;
    const auto x_shape = with_last_dim(grad_out.sizes(), in_f);
    // s is folded into the small [T, r] operands (z and u) rather than applied to GEMM outputs, so each gradient
    // is rounded once to x's dtype: a second rounding doubles the float16/bfloat16 error of dA and dB.
    // Each product by s is the GEMM's alpha (beta = 0: the uninitialised destination is never read): one op and
    // one rounding instead of a GEMM and a scaling pass.
    at::Tensor zs;  // s·(g ⊙ δ) B, [T, r]
    if (need_A || need_xd || (need_x && !dropout)) zs = scaled_mm(red.grad_scaled, B, scaling);
    if (!dropout) {
        if (need_x) gx = at::mm(red.grad_scaled, weight).addmm_(zs, A).view(x_shape);
    } else {
        if (need_x) gx = at::mm(red.grad, weight).view(x_shape);
        if (need_xd) gxd = at::mm(red.grad_scaled_m1, weight).addmm_(zs, A).view(x_shape);
    }
    if (need_A) gA = at::mm(zs.t(), x_src->reshape({T, in_f})).to(lora_A.scalar_type());
    if (need_B) gB = scaled_mm(red.grad_scaled.t(), *lora_u, scaling).to(lora_B.scalar_type());
    if (need_m) gm = magnitude_grad(red, gn, magnitude, acc_is_output);
    if (need_bias) gb = red.colsum.to(dtype);
    return {gx, gxd, gA, gB, gm, gb};
}

}  // namespace dora_ext
