// Declarations shared by the schema file, the device-agnostic host ops and the per-backend kernels.
//
// Split of work: the host ops (dora_linear.cpp) validate arguments and run the GEMMs through ATen, so cuBLAS or
// MKL/oneDNN does the heavy lifting on each device; everything DoRA adds on top of LoRA (the weight norm, the
// column scaling epilogue, the fused backward scaling + magnitude reduction, the in-place merge) is a kernel with a
// CPU definition (cpu/kernels.cpp) and a CUDA definition (cuda/kernels.cu) behind the same signature.
#pragma once

#include <ATen/core/Tensor.h>

#include <array>
#include <optional>
#include <tuple>

#include "quantized_weights.h"

namespace dora_ext {

// Norms of rows whose value is (near) zero are clamped to this before dividing, so a zero base row gives g = 0
// instead of PEFT's NaN (huggingface/peft#2049; the same eps as the unmerged PR #3237).
constexpr double kNormEps = 1e-6;

// Rows of the [T, out] activations handled by one partial reduction. Fixed (not derived from the thread count)
// so the magnitude and bias gradients are bitwise reproducible on every backend.
constexpr int64_t kReduceChunkRows = 64;

// ---- ops registered in TORCH_LIBRARY(dora_ext) (schemas in dora_ext.cpp) ----
at::Tensor weight_norm(const at::Tensor& weight, const at::Tensor& lora_A, const at::Tensor& lora_B, double scaling);

std::tuple<at::Tensor, at::Tensor, at::Tensor> dora_linear(const at::Tensor& x, const std::optional<at::Tensor>& x_drop,
                                                           const at::Tensor& weight,
                                                           const std::optional<at::Tensor>& bias,
                                                           const at::Tensor& lora_A, const at::Tensor& lora_B,
                                                           const at::Tensor& magnitude, const at::Tensor& weight_norm,
                                                           double scaling);

using OptTensor = std::optional<at::Tensor>;
std::tuple<OptTensor, OptTensor, OptTensor, OptTensor, OptTensor, OptTensor> dora_linear_backward(
    const at::Tensor& grad_out, const std::optional<at::Tensor>& x_src, const at::Tensor& weight,
    const at::Tensor& lora_A, const at::Tensor& lora_B, const at::Tensor& magnitude, const at::Tensor& weight_norm,
    const std::optional<at::Tensor>& acc, const std::optional<at::Tensor>& lora_u, double scaling, bool dropout,
    std::array<bool, 6> output_mask, bool acc_is_output);

std::tuple<at::Tensor, at::Tensor> dora_rescale(const at::Tensor& result, const std::optional<at::Tensor>& base,
                                                const std::optional<at::Tensor>& bias, const at::Tensor& lora_u,
                                                const at::Tensor& lora_B, const at::Tensor& magnitude,
                                                const at::Tensor& weight_norm, double scaling,
                                                const std::optional<at::Tensor>& x, const std::optional<at::Tensor>& weight);

std::tuple<OptTensor, OptTensor, OptTensor, OptTensor, OptTensor> dora_rescale_backward(
    const at::Tensor& grad_out, const std::optional<at::Tensor>& lora_u, const at::Tensor& lora_B,
    const at::Tensor& magnitude, const at::Tensor& weight_norm, const std::optional<at::Tensor>& acc, double scaling,
    bool has_base, std::array<bool, 5> output_mask, bool acc_is_output);

// Row norms of a bitsandbytes-quantized W plus s·B·A (quantized_weights.h says how each format is decoded), read
// from the packed storage in row blocks: no [out, in] dequantized copy.
at::Tensor weight_norm_4bit(const at::Tensor& packed, const at::Tensor& absmax, const at::Tensor& code, int64_t blocksize,
                            const std::optional<at::Tensor>& absmax_code, const std::optional<at::Tensor>& absmax_scale,
                            const std::optional<at::Tensor>& absmax_offset, int64_t absmax_blocksize,
                            int64_t out_features, int64_t in_features, at::ScalarType dtype, const at::Tensor& lora_A,
                            const at::Tensor& lora_B, double scaling, int64_t row_group);

at::Tensor weight_norm_int8(const at::Tensor& weight, const at::Tensor& row_scale, const at::Tensor& lora_A,
                            const at::Tensor& lora_B, double scaling);

// Serving: tokens of one batch through different adapters over one base output (dora_mixed.cpp).
at::Tensor dora_mixed(const at::Tensor& result, const std::optional<at::Tensor>& bias, const at::Tensor& x,
                      at::TensorList lora_A, at::TensorList lora_B, at::ArrayRef<double> scaling,
                      const at::Tensor& magnitude, const at::Tensor& weight_norm, const at::Tensor& adapter_index);

void merge_(at::Tensor& weight, const at::Tensor& lora_A, const at::Tensor& lora_B, const at::Tensor& magnitude,
            const at::Tensor& weight_norm, double scaling);

void unmerge_(at::Tensor& weight, const at::Tensor& lora_A, const at::Tensor& lora_B, const at::Tensor& magnitude,
              const at::Tensor& weight_norm, double scaling);

// ---- per-backend kernels; A and B arrive already in the accumulation dtype (float, or double for fp64) ----
struct BackwardReduce {
    at::Tensor grad;            // δ = dL/dout, [T, out] contiguous
    at::Tensor acc;             // saved pre-scale sum [T, out]; undefined unless `dot` is requested
    at::Tensor g, gm1;          // m/n and (m-n)/n, [out] accumulation dtype; gm1 undefined unless requested
    at::Tensor grad_scaled;     // out: g ⊙ δ, [T, out] in δ's dtype, or undefined
    at::Tensor grad_scaled_m1;  // out: (g-1) ⊙ δ, [T, out] in δ's dtype, or undefined
    at::Tensor dot;             // out: Σ_t δ ⊙ acc, [out] accumulation dtype, or undefined
    at::Tensor colsum;          // out: Σ_t δ, [out] accumulation dtype, or undefined
};

// A validated bitsandbytes 4-bit weight (weight_ops.cpp checks it): contiguous tensors on one device, nested absmax
// tensors undefined unless absmax is uint8. `dtype`: the dequantized dtype every value is rounded to.
struct Packed4bit {
    at::Tensor packed, absmax, code, absmax_code, absmax_scale, absmax_offset;
    int64_t blocksize, absmax_blocksize, out, in;
    at::ScalarType dtype;
    int64_t row_group;  // 0, or 32 for bitsandbytes' CPU layout (quantized_weights.h)
};

// log2 of a power of two (weight_ops.cpp checks the block sizes are), 0 for 0.
inline int log2_of(int64_t power_of_two) {
    int n = 0;
    while (power_of_two > 1) power_of_two >>= 1, ++n;
    return n;
}

// Raw pointers of a Packed4bit for the element decoder (quantized_weights.h).
inline Packed4View packed4_view(const Packed4bit& W) {
    const bool nested = W.absmax.scalar_type() == at::kByte;
    return Packed4View{W.packed.const_data_ptr<uint8_t>(),
                       nested ? nullptr : W.absmax.const_data_ptr<float>(),
                       nested ? W.absmax.const_data_ptr<uint8_t>() : nullptr,
                       W.code.const_data_ptr<float>(),
                       nested ? W.absmax_code.const_data_ptr<float>() : nullptr,
                       nested ? W.absmax_scale.const_data_ptr<float>() : nullptr,
                       nested ? W.absmax_offset.const_data_ptr<float>() : nullptr,
                       log2_of(W.blocksize), log2_of(W.absmax_blocksize), W.in, W.row_group};
}

// One table of function pointers per backend, the same entries in each (cpu/kernels.cpp and cuda/kernels.cu define
// `kKernels`); host_common.h's kernels_for(t) picks the table of t's device. A new kernel is one entry here and one
// definition per backend.
struct Kernels {
    // ‖W_j + s·B_j·A‖₂ for every row j, [out] in A's dtype, without an [out, in] temporary.
    at::Tensor (*lowrank_row_norm)(const at::Tensor& W, const at::Tensor& A, const at::Tensor& B, double s);
    // The same norm for a 4-bit weight (Packed4bit) and for an int8 weight CB [out, in] with row scales SCB [out].
    at::Tensor (*packed4_row_norm)(const Packed4bit& W, const at::Tensor& A, const at::Tensor& B, double s);
    at::Tensor (*int8_row_norm)(const at::Tensor& CB, const at::Tensor& SCB, const at::Tensor& A, const at::Tensor& B,
                                double s);
    // W_j ← c_j·W_j + d_j·s·(B_j·A) in place, without an [out, in] temporary.
    void (*lowrank_rowscale_)(at::Tensor& W, const at::Tensor& c, const at::Tensor& d, const at::Tensor& A,
                              const at::Tensor& B, double s);
    // out = g ⊙ acc + bias (column-wise); [T, N] with T, N > 0.
    void (*epilogue)(at::Tensor& out, const at::Tensor& acc, const at::Tensor& g, const at::Tensor& bias);
    // In place: base ← base + bias + gm1 ⊙ P + g ⊙ s·Q, then P ← P + s·Q (the pre-scale sum backward needs).
    void (*epilogue_dropout)(at::Tensor& base, at::Tensor& P, const at::Tensor& Q, const at::Tensor& g,
                             const at::Tensor& gm1, const at::Tensor& bias, double s);
    // The fused backward pass over δ (BackwardReduce); [T, N] with T, N > 0.
    void (*backward_reduce)(BackwardReduce& args);
    // For the token t = order[p] at sorted position p, with adapter k = index[t] (K = g.size(0): none):
    // out[t] = result[t] + gm1[k] ⊙ (result[t] − bias) + g[k] ⊙ lora[p], or result[t] itself for k = K (those
    // sort last and have no lora row); lora, g, gm1 in the accumulation dtype; [T, N] with T, N > 0.
    void (*mixed_epilogue)(at::Tensor& out, const at::Tensor& result, const at::Tensor& lora, const at::Tensor& g,
                           const at::Tensor& gm1, const at::Tensor& index, const at::Tensor& order,
                           const at::Tensor& bias);
};

namespace cpu {
extern const Kernels kKernels;
}
#if defined(DORA_EXT_WITH_CUDA) || defined(DORA_EXT_EMULATE_CUDA)
namespace cuda {  // the CUDA kernels (cuda/kernels.cuh); in the emulation test build, run on the CPU
extern const Kernels kKernels;
}
#endif

}  // namespace dora_ext
