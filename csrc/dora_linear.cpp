// Host side of every op, shared by the CPU and CUDA registrations: argument checks, then GEMMs through ATen
// (cuBLAS / MKL / oneDNN) and the fused DoRA kernels of the tensor's backend. The math follows PEFT 0.21
// (peft/tuners/lora/variants.py, dora.py) with the norm detached (DoRA §4.3).
//
// Precision: GEMMs run in x's dtype (fp32 adapters are cast to it, r·(in+out) elements), accumulating in fp32
// inside the GEMM; the norm, g = m/n, (g-1) = (m-n)/n and every epilogue/reduction run in fp32 (fp64 for fp64
// inputs) with a single rounding of the output.
#include <ATen/ATen.h>
#include <ATen/DeviceGuard.h>
#include <torch/library.h>

#include "checks.h"
#include "dora_ext.h"

namespace dora_ext {
namespace {

#ifdef DORA_EXT_WITH_CUDA
#define DORA_KERNEL(t, name) ((t).is_cuda() ? &cuda::name : &cpu::name)
#else
#define DORA_KERNEL(t, name) (&cpu::name)
#endif

at::ScalarType accum_dtype(std::initializer_list<at::ScalarType> dtypes) {
    for (auto t : dtypes) {
        if (t == at::kDouble) return at::kDouble;
    }
    return at::kFloat;
}

// The clamped norm n = max(weight_norm, eps), g = m / n and, when asked, g - 1 computed as (m - n) / n so its
// digits survive when m ≈ n (PEFT's `m/n - 1` in low precision cancels; peft_and_family.md §7 item 2).
struct Gains {
    at::Tensor n, g, gm1;  // gm1 undefined unless requested
};

Gains gains(const at::Tensor& magnitude, const at::Tensor& weight_norm, at::ScalarType acc, bool want_gm1) {
    auto n = weight_norm.to(acc).clamp_min(kNormEps);
    auto m = magnitude.to(acc);
    Gains out{n, (m / n).contiguous(), at::Tensor()};
    if (want_gm1) out.gm1 = ((m - n) / n).contiguous();
    return out;
}

void check_activation(const char* op, const char* name, const at::Tensor& t, const at::Tensor& weight,
                      int64_t features, const char* what) {
    check_floating(op, name, t);
    DORA_CHECK(op, t.dim() >= 1 && t.size(-1) == features, "expected ", name, " of shape [..., ", features, "] (",
               what, "), got ", shape_str(t));
    DORA_CHECK(op, t.scalar_type() == weight.scalar_type(), "expected ", name, " of the weight's dtype ",
               weight.scalar_type(), ", got ", t.scalar_type());
    check_same_device(op, name, t, weight);
}

void check_dora_vectors(const char* op, const at::Tensor& weight, const at::Tensor& magnitude,
                        const at::Tensor& weight_norm) {
    check_row_vector(op, "magnitude", magnitude, weight);
    check_row_vector(op, "weight_norm", weight_norm, weight);
}

std::vector<int64_t> with_last_dim(at::IntArrayRef sizes, int64_t last) {
    auto v = sizes.vec();
    v.back() = last;
    return v;
}

}  // namespace

at::Tensor weight_norm(const at::Tensor& weight, const at::Tensor& lora_A, const at::Tensor& lora_B, double scaling) {
    const char* op = "weight_norm";
    check_lowrank(op, weight, lora_A, lora_B);
    check_scaling(op, scaling);
    const at::OptionalDeviceGuard guard(at::device_of(weight));
    const auto acc = accum_dtype({weight.scalar_type(), lora_A.scalar_type()});
    return DORA_KERNEL(weight, lowrank_row_norm)(weight, lora_A.to(acc).contiguous(), lora_B.to(acc).contiguous(),
                                                 scaling);
}

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

    const auto acc_t = accum_dtype({x.scalar_type()});
    const at::Tensor bias_t = bias ? bias->contiguous() : at::Tensor();
    const auto A = lora_A.to(x.scalar_type());
    const auto B = lora_B.to(x.scalar_type());
    const auto x2 = x.reshape({-1, in_f});
    const auto out_shape = with_last_dim(x.sizes(), out_f);

    if (!x_drop) {
        const auto gn = gains(magnitude, weight_norm, acc_t, false);
        auto u = at::mm(x2, A.t());
        auto acc = at::mm(x2, weight.t());
        acc.addmm_(u, B.t(), 1.0, scaling);  // acc = x Wᵀ + s·u Bᵀ, one rounding in the GEMM
        auto out = at::empty_like(acc);
        if (acc.numel() > 0) DORA_KERNEL(x, epilogue)(out, acc, gn.g, bias_t);
        return {out.view(out_shape), acc, u};
    }
    // PEFT's dropout path: the base GEMM sees the un-dropped x, the DoRA correction the dropped one.
    const auto gn = gains(magnitude, weight_norm, acc_t, true);
    const auto xd2 = x_drop->reshape({-1, in_f});
    auto u = at::mm(xd2, A.t());
    auto out = at::mm(x2, weight.t());
    auto acc = at::mm(xd2, weight.t());
    const auto q = at::mm(u, B.t());
    if (out.numel() > 0) DORA_KERNEL(x, epilogue_dropout)(out, acc, q, gn.g, gn.gm1, bias_t, scaling);
    return {out.view(out_shape), acc, u};
}

std::tuple<OptTensor, OptTensor, OptTensor, OptTensor, OptTensor, OptTensor> dora_linear_backward(
    const at::Tensor& grad_out, const std::optional<at::Tensor>& x_src, const at::Tensor& weight,
    const at::Tensor& lora_A, const at::Tensor& lora_B, const at::Tensor& magnitude, const at::Tensor& weight_norm,
    const std::optional<at::Tensor>& acc, const std::optional<at::Tensor>& lora_u, double scaling, bool dropout,
    std::array<bool, 6> output_mask) {
    const char* op = "dora_linear_backward";
    check_lowrank(op, weight, lora_A, lora_B);
    check_scaling(op, scaling);
    check_dora_vectors(op, weight, magnitude, weight_norm);
    const int64_t out_f = weight.size(0), in_f = weight.size(1), r = lora_A.size(0);
    check_activation(op, "grad_out", grad_out, weight, out_f, "out_features of weight");
    const auto [need_x, need_xd, need_A, need_B, need_m, need_bias] = output_mask;
    DORA_CHECK(op, !need_xd || dropout, "a gradient for x_drop was requested without dropout");
    DORA_CHECK(op, !need_A || x_src, "the lora_A gradient needs x_src");
    DORA_CHECK(op, !need_B || lora_u, "the lora_B gradient needs lora_u");
    DORA_CHECK(op, !need_m || acc, "the magnitude gradient needs acc");
    const int64_t T = grad_out.numel() / out_f;
    if (x_src) check_activation(op, "x_src", *x_src, weight, in_f, "in_features of weight");
    if (lora_u) {
        DORA_CHECK(op, lora_u->dim() == 2 && lora_u->size(0) == T && lora_u->size(1) == r, "expected lora_u of shape [",
                   T, ", ", r, "], got ", shape_str(*lora_u));
    }
    if (acc) {
        DORA_CHECK(op, acc->dim() == 2 && acc->size(0) == T && acc->size(1) == out_f, "expected acc of shape [", T,
                   ", ", out_f, "], got ", shape_str(*acc));
    }
    const at::OptionalDeviceGuard guard(at::device_of(weight));

    const auto acc_t = accum_dtype({weight.scalar_type()});
    const auto dtype = weight.scalar_type();
    const auto A = lora_A.to(dtype);
    const auto B = lora_B.to(dtype);
    const auto gn = gains(magnitude, weight_norm, acc_t, dropout && need_xd);

    BackwardReduce red;
    red.grad = grad_out.reshape({T, out_f}).contiguous();
    red.g = gn.g;
    red.gm1 = gn.gm1;
    // g ⊙ δ feeds every LoRA-side product and, without dropout, the whole dx GEMM.
    const bool need_gs = need_A || need_B || need_xd || (need_x && !dropout);
    if (need_gs) red.grad_scaled = at::empty_like(red.grad);
    if (dropout && need_xd) red.grad_scaled_m1 = at::empty_like(red.grad);
    if (need_m) {
        red.acc = acc->contiguous();
        red.dot = at::empty({out_f}, red.grad.options().dtype(acc_t));
    }
    if (need_bias) red.colsum = at::empty({out_f}, red.grad.options().dtype(acc_t));
    if (T > 0) {
        DORA_KERNEL(weight, backward_reduce)(red);
    } else {
        if (red.dot.defined()) red.dot.zero_();
        if (red.colsum.defined()) red.colsum.zero_();
    }

    OptTensor gx, gxd, gA, gB, gm, gb;
    const auto x_shape = with_last_dim(grad_out.sizes(), in_f);
    // s is folded into the small [T, r] operands (z and u) rather than applied to GEMM outputs, so each gradient
    // is rounded once to x's dtype: a second rounding doubles the float16/bfloat16 error of dA and dB.
    at::Tensor zs;  // s·(g ⊙ δ) B, [T, r]
    if (need_A || need_xd || (need_x && !dropout)) zs = at::mm(red.grad_scaled, B).mul_(scaling);
    if (!dropout) {
        if (need_x) gx = at::mm(red.grad_scaled, weight).addmm_(zs, A).view(x_shape);
    } else {
        if (need_x) gx = at::mm(red.grad, weight).view(x_shape);
        if (need_xd) gxd = at::mm(red.grad_scaled_m1, weight).addmm_(zs, A).view(x_shape);
    }
    if (need_A) gA = at::mm(zs.t(), x_src->reshape({T, in_f})).to(lora_A.scalar_type());
    if (need_B) gB = at::mm(red.grad_scaled.t(), *lora_u * scaling).to(lora_B.scalar_type());
    if (need_m) gm = (red.dot / gn.n).to(magnitude.scalar_type());
    if (need_bias) gb = red.colsum.to(dtype);
    return {gx, gxd, gA, gB, gm, gb};
}

namespace {
at::Tensor merge_factor(const char* op, const at::Tensor& weight, const at::Tensor& lora_A,
                        const at::Tensor& lora_B, const at::Tensor& magnitude, const at::Tensor& weight_norm,
                        double scaling) {
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
    DORA_KERNEL(weight, lowrank_rowscale_)(weight, g, g, lora_A.to(acc).contiguous(), lora_B.to(acc).contiguous(),
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
    DORA_KERNEL(weight, lowrank_rowscale_)(weight, g.reciprocal(), at::full_like(g, -1.0),
                                           lora_A.to(acc).contiguous(), lora_B.to(acc).contiguous(), scaling);
}

namespace {
// The host ops are device-agnostic (DORA_KERNEL picks each backend's kernels), so both keys get the same list.
void register_kernels(torch::Library& m) {
    m.impl("weight_norm", &weight_norm);
    m.impl("dora_linear", &dora_linear);
    m.impl("dora_linear_backward", &dora_linear_backward);
    m.impl("merge_", &merge_);
    m.impl("unmerge_", &unmerge_);
}
}  // namespace

TORCH_LIBRARY_IMPL(dora_ext, CPU, m) { register_kernels(m); }

#ifdef DORA_EXT_WITH_CUDA
TORCH_LIBRARY_IMPL(dora_ext, CUDA, m) { register_kernels(m); }
#endif

}  // namespace dora_ext
