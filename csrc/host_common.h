// Helpers shared by the host ops (argument checks are in checks.h): which backend's kernels a tensor gets, the
// accumulation dtype, the DoRA gains, and shape arithmetic that works for zero-size dimensions.
#pragma once

#include <ATen/ATen.h>
#include <c10/util/accumulate.h>

#include <initializer_list>
#include <vector>

#include "checks.h"
#include "dora_ext.h"

namespace dora_ext {

// The kernel table of the backend `t` lives on (dora_ext.h: one table per backend, the same entries).
inline const Kernels& kernels_for(const at::Tensor& t) {
#if defined(DORA_EXT_EMULATE_CUDA)
    (void)t;
    return cuda::kKernels;  // the emulation test build: every op runs the CUDA kernels' own code on CPU tensors
#else
#ifdef DORA_EXT_WITH_CUDA
    if (t.is_cuda()) return cuda::kKernels;
#endif
    (void)t;
    return cpu::kKernels;
#endif
}

// The one rule for the accumulation dtype: float64 if any input that enters a reduction is float64, else float32
// (dora_ext.ops.accum_dtype is the same rule for the fake kernels and the Python layers).
inline at::ScalarType accum_dtype(std::initializer_list<at::ScalarType> dtypes) {
    for (auto t : dtypes) {
        if (t == at::kDouble) return at::kDouble;
    }
    return at::kFloat;
}

// The clamped norm n = max(weight_norm, eps), g = m / n and, when asked, g - 1 computed as (m - n) / n so its
// digits survive when m ≈ n (PEFT's `m/n - 1` in low precision cancels).
struct Gains {
    at::Tensor n, g, gm1;  // gm1 undefined unless requested
};

inline Gains gains(const at::Tensor& magnitude, const at::Tensor& weight_norm, at::ScalarType acc, bool want_gm1) {
    auto n = weight_norm.to(acc).clamp_min(kNormEps);
    auto m = magnitude.to(acc);
    Gains out{n, (m / n).contiguous(), at::Tensor()};
    if (want_gm1) out.gm1 = ((m - n) / n).contiguous();
    return out;
}

// s·(a b) as one GEMM: alpha = s, beta = 0 (BLAS and ATen's addmm never read the destination then, so it may be
// uninitialised). Rounded once, where mm(a, b).mul_(s) rounds twice and runs a second pass.
inline at::Tensor scaled_mm(const at::Tensor& a, const at::Tensor& b, double s) {
    auto out = at::empty({a.size(0), b.size(1)}, a.options());
    return out.addmm_(a, b, /*beta=*/0.0, /*alpha=*/s);
}

inline std::vector<int64_t> with_last_dim(at::IntArrayRef sizes, int64_t last) {
    auto v = sizes.vec();
    v.back() = last;
    return v;
}

// T, the number of rows of an activation [..., features]: the product of the leading dims. Not numel / features,
// which divides by zero for a zero-size feature dimension.
inline int64_t leading_rows(const at::Tensor& t) {
    return c10::multiply_integers(t.sizes().begin(), t.sizes().end() - 1);
}

// What a backward saved from its forward: lora_u [T, r] (for the lora_B gradient) and acc [T, out] (for the
// magnitude gradient), each checked when its gradient is requested.
inline void check_saved(const char* op, const std::optional<at::Tensor>& lora_u, const std::optional<at::Tensor>& acc,
                        bool need_B, bool need_m, int64_t T, int64_t out_f, int64_t r) {
    DORA_CHECK(op, !need_B || lora_u, "the lora_B gradient needs lora_u");
    DORA_CHECK(op, !need_m || acc, "the magnitude gradient needs acc");
    if (lora_u) {
        DORA_CHECK(op, lora_u->dim() == 2 && lora_u->size(0) == T && lora_u->size(1) == r, "expected lora_u of shape [",
                   T, ", ", r, "], got ", shape_str(*lora_u));
    }
    if (acc) {
        DORA_CHECK(op, acc->dim() == 2 && acc->size(0) == T && acc->size(1) == out_f, "expected acc of shape [", T,
                   ", ", out_f, "], got ", shape_str(*acc));
    }
}

// One fused pass over δ = grad2 [T, out]: g ⊙ δ, (g-1) ⊙ δ, Σ_t δ ⊙ acc and Σ_t δ, each only when asked. Zero-size
// dimensions launch no kernel (a CUDA grid of 0 blocks is a launch error) and give zero sums.
inline BackwardReduce run_backward_reduce(const at::Tensor& grad2, const Gains& gn, const std::optional<at::Tensor>& acc,
                                          bool want_scaled, bool want_scaled_m1, bool want_dot, bool want_colsum) {
    BackwardReduce red;
    red.grad = grad2.contiguous();
    red.g = gn.g;
    red.gm1 = gn.gm1;
    const auto acc_t = gn.g.scalar_type();
    const int64_t out_f = red.grad.size(1);
    if (want_scaled) red.grad_scaled = at::empty_like(red.grad);
    if (want_scaled_m1) red.grad_scaled_m1 = at::empty_like(red.grad);
    if (want_dot) {
        red.acc = acc->contiguous();
        red.dot = at::empty({out_f}, red.grad.options().dtype(acc_t));
    }
    if (want_colsum) red.colsum = at::empty({out_f}, red.grad.options().dtype(acc_t));
    if (red.grad.numel() > 0) {
        kernels_for(red.grad).backward_reduce(red);
    } else {
        if (red.dot.defined()) red.dot.zero_();
        if (red.colsum.defined()) red.colsum.zero_();
    }
    return red;
}

// The magnitude gradient Σ_t δ ⊙ acc / n from the reduction's dot, in the magnitude's dtype. When acc is the
// output (acc_is_output: out = g ⊙ acc, g = m / n), Σ δ ⊙ acc / n = Σ δ ⊙ out / (g·n) = Σ δ ⊙ out / m, which needs
// m ≠ 0 (ops.py passes the output only then).
inline at::Tensor magnitude_grad(const BackwardReduce& red, const Gains& gn, const at::Tensor& magnitude,
                                 bool acc_is_output) {
    const auto& denominator = acc_is_output ? magnitude.to(red.dot.scalar_type()) : gn.n;
    return (red.dot / denominator).to(magnitude.scalar_type());
}

}  // namespace dora_ext
