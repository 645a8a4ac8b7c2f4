// The one TORCH_LIBRARY of the `dora_ext` namespace: every op schema lives here. Kernels are registered per
// backend in registration.cpp (CPU always, CUDA when the build includes it).
//
// Conventions: `weight` is an nn.Linear weight [out, in]; lora_A [r, in]; lora_B [out, r]; magnitude [out];
// `weight_norm` is ‖W + s·B·A‖ per output row in float32 (float64 for float64 inputs) and is never differentiated
// (DoRA, Liu et al. 2024, §4.3: the norm is treated as a constant).
#include <Python.h>
#include <torch/library.h>

#include "dora_ext.h"
#include "op_namespace.h"

extern "C" {
// Importing `dora_ext._C` from Python only has to load this shared object so that the static TORCH_LIBRARY
// initialisers below run; the module itself is empty (no pybind: ops are reached through torch.ops.dora_ext).
PyObject* PyInit__C(void) {
    static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
    return PyModule_Create(&module_def);
}
}

TORCH_LIBRARY_FOR(DORA_EXT_OPS_NS, m) {
    // Row norms of W + s·B·A, accumulated in fp32, without an [out, in] temporary.
    m.def("weight_norm(Tensor weight, Tensor lora_A, Tensor lora_B, float scaling) -> Tensor");

    // The same norm for bitsandbytes-quantized weights, read from their packed storage (quantized_weights.h has
    // the formats): 4-bit (Params4bit + QuantState: packed codes, absmax, code table, blocksize, the nested absmax's
    // code/scale/offset/blocksize, the weight's shape and dequantized dtype; row_group 32: bitsandbytes' CPU code
    // layout, with absmax given in the standard order) and LLM.int8 (CB int8 [out, in], SCB).
    m.def(
        "weight_norm_4bit(Tensor packed, Tensor absmax, Tensor code, int blocksize, Tensor? absmax_code, "
        "Tensor? absmax_scale, Tensor? absmax_offset, int absmax_blocksize, int out_features, int in_features, "
        "ScalarType dtype, Tensor lora_A, Tensor lora_B, float scaling, int row_group=0) -> Tensor");
    m.def("weight_norm_int8(Tensor weight, Tensor row_scale, Tensor lora_A, Tensor lora_B, float scaling) -> Tensor");

    // Fused DoRA linear with PEFT 0.21 semantics, g = magnitude / max(weight_norm, eps):
    //   x_drop is None:  out = g ⊙ (x Wᵀ + s·(x Aᵀ) Bᵀ) + bias
    //   x_drop given:    out = x Wᵀ + bias + (g-1) ⊙ (x_drop Wᵀ) + g ⊙ s·(x_drop Aᵀ) Bᵀ
    // Also returns what the backward needs: acc, the pre-scale sum [T, out] (the bracket above, or
    // x_drop Wᵀ + s·(x_drop Aᵀ)Bᵀ), and lora_u = x_src Aᵀ [T, r], where T is the product of x's leading dims.
    m.def(
        "dora_linear(Tensor x, Tensor? x_drop, Tensor weight, Tensor? bias, Tensor lora_A, Tensor lora_B, "
        "Tensor magnitude, Tensor weight_norm, float scaling) -> (Tensor out, Tensor acc, Tensor lora_u)");

    // Gradients of dora_linear; output_mask selects (x, x_drop, lora_A, lora_B, magnitude, bias).
    // x_src is x_drop when dropout is true, else x; it is only needed for the lora_A gradient.
    // acc_is_output: `acc` is the op's output itself (no bias, no dropout: out = g ⊙ acc), whose Σ δ ⊙ out over
    // g·n gives the magnitude gradient, so the forward need not keep acc alive.
    m.def(
        "dora_linear_backward(Tensor grad_out, Tensor? x_src, Tensor weight, Tensor lora_A, Tensor lora_B, "
        "Tensor magnitude, Tensor weight_norm, Tensor? acc, Tensor? lora_u, float scaling, bool dropout, "
        "bool[6] output_mask, bool acc_is_output=False) -> (Tensor?, Tensor?, Tensor?, Tensor?, Tensor?, Tensor?)");

    // The DoRA update of a base output computed elsewhere (a PEFT LoRA variant gets base_layer(x) as `result`),
    // g = magnitude / max(weight_norm, eps), lora_u = x Aᵀ (or x_drop Aᵀ) [..., r]:
    //   base is None:  out = g ⊙ (result − bias + s·lora_u Bᵀ) + bias
    //   base given:    out = result + (g-1) ⊙ base + g ⊙ s·lora_u Bᵀ     (base = x_drop Wᵀ; bias must be None)
    // acc is the pre-scale sum [T, out] the magnitude gradient needs. x and weight (optional, unused by the forward):
    // the base layer's input and [out, in] weight, so that a backward whose output was modified in place can
    // recompute result − bias as x Wᵀ (the autograd formula then keeps no [T, out] tensor of its own).
    m.def(
        "dora_rescale(Tensor result, Tensor? base, Tensor? bias, Tensor lora_u, Tensor lora_B, Tensor magnitude, "
        "Tensor weight_norm, float scaling, Tensor? x=None, Tensor? weight=None) -> (Tensor out, Tensor acc)");

    // Gradients of dora_rescale; output_mask selects (result, base, lora_u, lora_B, magnitude). With base, result's
    // gradient is grad_out itself, so the caller must not request it here.
    m.def(
        "dora_rescale_backward(Tensor grad_out, Tensor? lora_u, Tensor lora_B, Tensor magnitude, Tensor weight_norm, "
        "Tensor? acc, float scaling, bool has_base, bool[5] output_mask, bool acc_is_output=False) -> (Tensor?, "
        "Tensor?, Tensor?, Tensor?, Tensor?)");

    // Serving: each token through its own adapter over one base output (dora_mixed.cpp), inference only:
    //   out[t] = result[t] + (g_k − 1) ⊙ (result[t] − bias) + g_k ⊙ s_k·(x[t] A_kᵀ) B_kᵀ,  k = adapter_index[t],
    // g_k = magnitude[k] / max(weight_norm[k], eps) (rows of ones for plain LoRA); k = K (len(lora_A)): result[t].
    m.def(
        "dora_mixed(Tensor result, Tensor? bias, Tensor x, Tensor[] lora_A, Tensor[] lora_B, float[] scaling, "
        "Tensor magnitude, Tensor weight_norm, Tensor adapter_index) -> Tensor");

    // In place: weight ← g ⊙ (weight + s·B·A) with g from the norm of the unmerged weight; unmerge_ inverts it
    // with the same (cached) norm: weight ← weight / g − s·B·A.
    m.def(
        "merge_(Tensor(a!) weight, Tensor lora_A, Tensor lora_B, Tensor magnitude, Tensor weight_norm, "
        "float scaling) -> ()");
    m.def(
        "unmerge_(Tensor(a!) weight, Tensor lora_A, Tensor lora_B, Tensor magnitude, Tensor weight_norm, "
        "float scaling) -> ()");
}
