// Reading quantized base weights element by element, shared by the CPU kernels and the CUDA kernels (host and device
// code alike), so both decode the bitsandbytes formats with the same arithmetic as bitsandbytes' own dequantize:
//
//   4-bit (Params4bit, nf4/fp4): the row-major flattened [out, in] weight, two codes per byte with the first element
//     in the high nibble; value = code[q] · absmax[f / blocksize], rounded to the dequantized dtype (what
//     bitsandbytes.functional.dequantize_4bit returns). With nested ("double") quantization absmax is itself
//     8-bit blockwise: absmax[b] = absmax_code[q_b] · absmax_scale[b / absmax_blocksize] + offset.
//     bitsandbytes' CPU layout (row_group = 32; what Linear4bit switches to in an inference forward on CPUs with
//     AVX512-BF16): the codes of each group of 32 rows are interleaved per pair of columns, 32 bytes per pair, byte p
//     holding row p/2 in its low nibble and row 16 + p/2 in its high nibble, column 2·kp + p%2.
//   8-bit (Int8Params, LLM.int8 vector-wise): value = (CB[o, i] · SCB[o]) · (1/127), in float32
//     (bitsandbytes.functional.int8_vectorwise_dequant).
#pragma once

#include <cstdint>

#if defined(__CUDACC__)
#define DORA_HD __host__ __device__ __forceinline__
#else
#define DORA_HD inline
#endif

namespace dora_ext {

// Raw pointers into one 4-bit weight's storage; every pointer is a contiguous float32/uint8 array on one device.
// The code tables may point at a copy (CUDA kernels read them from shared memory).
struct Packed4View {
    const uint8_t* packed;        // [ceil(out·in / 2)]
    const float* absmax;          // [blocks] (not nested), else nullptr
    const uint8_t* absmax_q;      // [blocks] (nested), else nullptr
    const float* code;            // [16]
    const float* absmax_code;     // [256] (nested)
    const float* absmax_scale;    // [ceil(blocks / absmax_blocksize)] (nested)
    const float* absmax_offset;   // [1] (nested)
    int blocksize_log2, absmax_blocksize_log2;  // bitsandbytes' block sizes are powers of two: shifts, no division
    int64_t in;
    int64_t row_group;            // 0: the standard layout; 32: bitsandbytes' CPU layout
};

// a·b and a + b, each rounded to float on its own: never contracted into one fused multiply-add, which rounds once
// (nvcc contracts by default, -fmad=true; a host compiler may, -ffp-contract=fast). For the values where
// bitsandbytes' exact rounding is the contract.
#if !defined(__CUDA_ARCH__)
// Host: the empty asm hands the rounded value through a register the optimiser cannot see into, so no product
// before it and no sum after it can be fused into an fma.
inline float keep_rounded(float v) {
#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__))
    __asm__("" : "+x"(v));
#elif defined(__GNUC__) && defined(__aarch64__)
    __asm__("" : "+w"(v));
#else
    volatile float rounded = v;
    v = rounded;
#endif
    return v;
}
#endif

DORA_HD float mul_rn(float a, float b) {
#if defined(__CUDA_ARCH__)
    return __fmul_rn(a, b);
#else
    return keep_rounded(a * b);
#endif
}

DORA_HD float add_rn(float a, float b) {
#if defined(__CUDA_ARCH__)
    return __fadd_rn(a, b);
#else
    return keep_rounded(keep_rounded(a) + keep_rounded(b));
#endif
}

DORA_HD float packed4_absmax(const Packed4View& v, int64_t block) {
    if (v.absmax_q == nullptr) return v.absmax[block];
    // bitsandbytes: dequantize_blockwise(absmax_q, state2), then `absmax += offset`: a product, then a sum, each
    // rounded (an fma differs by 1 ulp for some blocks, and so can the weight's bfloat16/float16 values).
    return add_rn(mul_rn(v.absmax_code[v.absmax_q[block]], v.absmax_scale[block >> v.absmax_blocksize_log2]),
                  v.absmax_offset[0]);
}

// Element (row, k) of the dequantized weight in float32 before the rounding to the dequantized dtype.
DORA_HD float packed4_value(const Packed4View& v, int64_t row, int64_t k) {
    const int64_t f = row * v.in + k;
    int q;
    if (v.row_group == 0) {
        const uint8_t byte = v.packed[f >> 1];
        q = (f & 1) ? (byte & 0x0F) : (byte >> 4);
    } else {
        const int64_t half = v.row_group / 2, r = row % v.row_group;
        const bool high = r >= half;
        const int64_t p = (high ? r - half : r) * 2 + (k & 1);
        const uint8_t byte = v.packed[((row / v.row_group) * (v.in / 2) + (k >> 1)) * v.row_group + p];
        q = high ? (byte >> 4) : (byte & 0x0F);
    }
    return v.code[q] * packed4_absmax(v, f >> v.blocksize_log2);
}

// bitsandbytes' 1/127 as the float32 it multiplies by (7.874015718698502e-3).
constexpr float kInt8Dequant = 7.874015718698502e-3f;

DORA_HD float int8_value(const int8_t* CB, const float* SCB, int64_t in, int64_t row, int64_t k) {
    return (static_cast<float>(CB[row * in + k]) * SCB[row]) * kInt8Dequant;
}

}  // namespace dora_ext
