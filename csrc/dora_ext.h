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

// One table of function pointers per backend, the same entries in each (cpu/kernels.cpp and cuda/kernels.cu define
// `kKernels`); host_common.h's kernels_for(t) picks the table of t's device. A new kernel is one entry here and one
// definition per backend.
struct Kernels {
    // ‖W_j + s·B_j·A‖₂ for every row j, [out] in A's dtype, without an [out, in] temporary.
    at::Tensor (*lowrank_row_norm)(const at::Tensor& W, const at::Tensor& A, const at::Tensor& B, double s);
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
