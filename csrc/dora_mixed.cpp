// Host side of dora_mixed: one batch whose tokens use different adapters (serving many fine-tunes of one base).
//
// The base product is the caller's, computed once for every token (`result`, bias included). Each adapter's
// low-rank part runs only on its own tokens: the tokens are grouped by adapter with one stable sort, and per adapter
// one gathered [T_k, in] × [in, r_k] × [r_k, out] pair of GEMMs writes s_k·(x A_kᵀ) B_kᵀ into its slice of one
// sorted buffer (never a per-adapter copy of W). One fused epilogue then applies each token's adapter:
//
//   out = result + (g_k − 1) ⊙ (result − bias) + g_k ⊙ s_k·(x A_kᵀ) B_kᵀ      (PEFT's eval form of its DoRA variant)
//
// with g_k = m_k / max(n_k, eps) and g_k − 1 = (m_k − n_k) / max(n_k, eps) (gains(): no cancellation); a plain LoRA
// adapter is m = n = 1 (g = 1, g − 1 = 0: out = result + s·x Aᵀ Bᵀ exactly), and a token whose index is K (no
// adapter: PEFT's "__base__", or a layer the adapter does not target) gets `result` unchanged, bit for bit.
// Inference only: no backward (ops.py refuses gradients).
#include <ATen/ATen.h>
#include <ATen/DeviceGuard.h>

#include "checks.h"
#include "dora_ext.h"
#include "host_common.h"

namespace dora_ext {

at::Tensor dora_mixed(const at::Tensor& result, const std::optional<at::Tensor>& bias, const at::Tensor& x,
                      at::TensorList lora_A, at::TensorList lora_B, at::ArrayRef<double> scaling,
                      const at::Tensor& magnitude, const at::Tensor& weight_norm, const at::Tensor& adapter_index) {
    const char* op = "dora_mixed";
    const int64_t K = static_cast<int64_t>(lora_A.size());
    DORA_CHECK(op, K >= 1 && static_cast<int64_t>(lora_B.size()) == K && static_cast<int64_t>(scaling.size()) == K,
               "expected one lora_A, lora_B and scaling per adapter, got ", lora_A.size(), ", ", lora_B.size(),
               " and ", scaling.size());
    check_floating(op, "result", result);
    DORA_CHECK(op, result.dim() >= 1, "expected result of shape [..., out_features], got ", shape_str(result));
    const int64_t out_f = result.size(-1);
    DORA_CHECK(op, x.dim() == result.dim() && x.sizes().slice(0, x.dim() - 1) == result.sizes().slice(0, result.dim() - 1),
               "expected x of shape [..., in_features] with result's leading dims ", shape_str(result), ", got ",
               shape_str(x));
    check_floating(op, "x", x);
    check_same_device(op, "x", x, result, "result");
    const int64_t in_f = x.size(-1), T = leading_rows(result);
    for (int64_t k = 0; k < K; ++k) {
        check_floating(op, "lora_A", lora_A[k]);
        check_floating(op, "lora_B", lora_B[k]);
        DORA_CHECK(op, lora_A[k].dim() == 2 && lora_A[k].size(1) == in_f && lora_A[k].size(0) >= 1,
                   "expected lora_A[", k, "] of shape [r, ", in_f, "], got ", shape_str(lora_A[k]));
        DORA_CHECK(op, lora_B[k].dim() == 2 && lora_B[k].size(0) == out_f && lora_B[k].size(1) == lora_A[k].size(0),
                   "expected lora_B[", k, "] of shape [", out_f, ", ", lora_A[k].size(0), "], got ",
                   shape_str(lora_B[k]));
        check_same_device(op, "lora_A", lora_A[k], result, "result");
        check_same_device(op, "lora_B", lora_B[k], result, "result");
        check_scaling(op, scaling[k]);
    }
    for (const auto* t : {&magnitude, &weight_norm}) {
        check_floating(op, "magnitude and weight_norm", *t);
        DORA_CHECK(op, t->dim() == 2 && t->size(0) == K && t->size(1) == out_f,
                   "expected magnitude and weight_norm of shape [", K, ", ", out_f, "] (one row per adapter; ones for "
                   "plain LoRA), got ", shape_str(*t));
        check_same_device(op, "magnitude and weight_norm", *t, result, "result");
    }
    if (bias) {
        DORA_CHECK(op, bias->dim() == 1 && bias->size(0) == out_f && bias->scalar_type() == result.scalar_type(),
                   "expected bias of shape [", out_f, "] and result's dtype ", result.scalar_type(), ", got ",
                   shape_str(*bias), " ", bias->scalar_type());
        check_same_device(op, "bias", *bias, result, "result");
    }
    DORA_CHECK(op, adapter_index.scalar_type() == at::kLong && adapter_index.dim() == 1 && adapter_index.size(0) == T,
               "expected adapter_index of dtype int64 and shape [", T, "] (one per token), got ",
               adapter_index.scalar_type(), " ", shape_str(adapter_index));
    check_same_device(op, "adapter_index", adapter_index, result, "result");
    const at::OptionalDeviceGuard guard(at::device_of(result));

    // As dora_linear and dora_rescale: the activations' dtype alone sets the accumulation dtype (the epilogue runs
    // in result's opmath type), and a magnitude or norm of another floating dtype (float64 adapters on a float32
    // model) is converted to it, as their single-adapter forward does.
    const auto acc = accum_dtype({result.scalar_type()});
    const auto gn = gains(magnitude, weight_norm, acc, true);
    auto out = at::empty_like(result, at::MemoryFormat::Contiguous);
    if (T == 0 || out_f == 0) return out;
    const auto r2 = result.reshape({T, out_f}).contiguous();
    const auto x2 = x.reshape({T, in_f});
    const auto idx = adapter_index.contiguous();
    // one stable sort groups the tokens by adapter; one host read of the group sizes (the only sync)
    const auto order = idx.argsort(/*stable=*/true);
    // indices outside [0, K] are counted in an extra bin K + 1, so the one host read also validates them
    const auto binned = at::where(at::logical_or(idx < 0, idx > K), at::full_like(idx, K + 1), idx);
    const auto counts = at::bincount(binned, {}, K + 2).cpu();
    const auto* count = counts.const_data_ptr<int64_t>();
    DORA_CHECK(op, count[K + 1] == 0, "expected adapter indices in [0, ", K, "] (", K, ": no adapter), got ",
               count[K + 1], " outside");
    // s_k·(x A_kᵀ) B_kᵀ of every adapted token, in sorted order: adapter k's GEMM writes straight into its slice
    // (no [T, out] zero fill, no scatter); the base tokens (index K) sort last and have no rows here.
    const int64_t adapted = T - count[K];
    auto lora = at::empty({adapted, out_f}, result.options().dtype(acc));
    int64_t start = 0;
    for (int64_t k = 0; k < K; ++k) {
        const int64_t n = count[k];
        if (n > 0) {
            const auto& A = lora_A[k];
            const auto xs = x2.index_select(0, order.narrow(0, start, n)).to(A.scalar_type());
            auto dst = lora.narrow(0, start, n);
            const auto u = at::mm(xs, A.t());
            const auto Bt = lora_B[k].to(A.scalar_type()).t();
            if (A.scalar_type() == acc) {
                at::mm_out(dst, u, Bt);
            } else {
                dst.copy_(at::mm(u, Bt));
            }
            dst.mul_(scaling[k]);
        }
        start += n;
    }
    auto out2 = out.view({T, out_f});
    kernels_for(result).mixed_epilogue(out2, r2, lora, gn.g, gn.gm1, idx, order,
                                       bias ? bias->contiguous() : at::Tensor());
    return out;
}

}  // namespace dora_ext
