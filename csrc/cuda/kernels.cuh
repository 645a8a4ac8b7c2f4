// The CUDA kernels behind dora_ext.h and their launchers: kernel bodies, launch shapes, dtype dispatch. Compiled
// twice: by nvcc as real CUDA (kernels.cu), and as host C++ with the CUDA emulation (tests/cuda_emulation), which
// runs every CUDA thread of a block as a fiber, so CI executes this very code without a GPU. Everything that
// differs between the two goes through compat.h (shared-memory declarations, launches, device guard, stream,
// launch checks); nothing here may include CUDA runtime or ATen-CUDA headers.
//
// Every launcher guards the tensor's device, launches on the current stream (so torch.compile / CUDA graphs see the
// work on the stream they captured) and checks the launch. Indices are int64. Reductions are two-stage with a fixed
// chunking (dora_ext.h: kReduceChunkRows), never atomics: the magnitude and bias gradients are bitwise
// deterministic.
#pragma once

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>

#include <algorithm>

#include "../dora_ext.h"
#include "compat.h"

namespace dora_ext::cuda {
DORA_KERNELS_NAMESPACE {  // anonymous in the CUDA build (compat.h)

constexpr int kThreads = 256;
// Rows of W per block in the low-rank kernels: B's row values are warp-uniform loads, A's columns are loaded once
// per block and reused for these rows.
constexpr int kRowsPerBlock = 8;
// Grid y is at most DORA_MAX_GRID_Y (CUDA's 65535; compat.h): the [T, N] launches clamp their row groups to it
// and their kernels stride over the rest.

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// How the low-rank row kernels read (and, merging, write) element (row, k) of W, in the accumulation dtype.
template <typename w_t, typename acc_t>
struct StridedRows {  // a floating-point [out, in] tensor, any strides (transposed views for Conv1D layers)
    w_t* W;
    int64_t s0, s1;
    __device__ acc_t load(int64_t row, int64_t k) const { return static_cast<acc_t>(W[row * s0 + k * s1]); }
    __device__ void store(int64_t row, int64_t k, acc_t v) const { W[row * s0 + k * s1] = static_cast<w_t>(v); }
};

template <typename w_t, typename acc_t>
struct Packed4Rows {  // a bitsandbytes 4-bit weight; each value rounded to the dequantized dtype w_t, as bitsandbytes
    Packed4View v;
    __device__ acc_t load(int64_t row, int64_t k) const {
        return static_cast<acc_t>(static_cast<w_t>(packed4_value(v, row, k)));
    }
};

template <typename acc_t>
struct Int8Rows {  // a bitsandbytes LLM.int8 weight CB [out, in] with row scales SCB
    const int8_t* CB;
    const float* SCB;
    int64_t in;
    __device__ acc_t load(int64_t row, int64_t k) const { return static_cast<acc_t>(int8_value(CB, SCB, in, row, k)); }
};

// One block per kRowsPerBlock rows of W. kMerge == false: norm[j] = ‖W_j + s·B_j·A‖₂.
// kMerge == true: W_j ← c_j·W_j + d_j·s·(B_j·A), in place.
template <bool kMerge, typename Rows, typename acc_t>
__device__ void lowrank_rows(const Rows& W, const acc_t* __restrict__ A, const acc_t* __restrict__ B, int64_t out,
                             int64_t in, int64_t r, acc_t s, const acc_t* __restrict__ c, const acc_t* __restrict__ d,
                             acc_t* __restrict__ norm) {
    const int64_t row0 = static_cast<int64_t>(blockIdx.x) * kRowsPerBlock;
    const int rows = out - row0 < kRowsPerBlock ? static_cast<int>(out - row0) : kRowsPerBlock;
    acc_t sumsq[kRowsPerBlock];
#pragma unroll
    for (int jj = 0; jj < kRowsPerBlock; ++jj) sumsq[jj] = acc_t(0);

    for (int64_t k = threadIdx.x; k < in; k += blockDim.x) {
        acc_t low[kRowsPerBlock];
#pragma unroll
        for (int jj = 0; jj < kRowsPerBlock; ++jj) low[jj] = acc_t(0);
        for (int64_t i = 0; i < r; ++i) {
            const acc_t a = A[i * in + k];
#pragma unroll
            for (int jj = 0; jj < kRowsPerBlock; ++jj) {
                if (jj < rows) low[jj] += B[(row0 + jj) * r + i] * a;
            }
        }
#pragma unroll
        for (int jj = 0; jj < kRowsPerBlock; ++jj) {
            if (jj < rows) {
                const acc_t w = W.load(row0 + jj, k);
                if constexpr (kMerge) {
                    W.store(row0 + jj, k, c[row0 + jj] * w + d[row0 + jj] * s * low[jj]);
                } else {
                    const acc_t v = w + s * low[jj];
                    sumsq[jj] += v * v;
                }
            }
        }
    }
    if constexpr (!kMerge) {
        DORA_SHARED(acc_t, red, [kRowsPerBlock][kThreads]);
#pragma unroll
        for (int jj = 0; jj < kRowsPerBlock; ++jj) red[jj][threadIdx.x] = sumsq[jj];
        __syncthreads();
        for (int stride = kThreads / 2; stride > 0; stride >>= 1) {
            if (threadIdx.x < stride) {
#pragma unroll
                for (int jj = 0; jj < kRowsPerBlock; ++jj) red[jj][threadIdx.x] += red[jj][threadIdx.x + stride];
            }
            __syncthreads();
        }
        if (threadIdx.x < rows) norm[row0 + threadIdx.x] = sqrt(red[threadIdx.x][0]);
    }
}

template <typename w_t, typename acc_t, bool kMerge>
__global__ void lowrank_rows_kernel(w_t* __restrict__ W, int64_t sw0, int64_t sw1, const acc_t* __restrict__ A,
                                    const acc_t* __restrict__ B, int64_t out, int64_t in, int64_t r, acc_t s,
                                    const acc_t* __restrict__ c, const acc_t* __restrict__ d,
                                    acc_t* __restrict__ norm) {
    lowrank_rows<kMerge>(StridedRows<w_t, acc_t>{W, sw0, sw1}, A, B, out, in, r, s, c, d, norm);
}

// The 4-bit norm: the code tables (16 entries, and 256 for a nested absmax) are copied to shared memory once per
// block, so the per-element decode reads the packed byte and its block's absmax from global memory and nothing else.
template <typename w_t, typename acc_t>
__global__ void packed4_norm_kernel(Packed4View v, const acc_t* __restrict__ A, const acc_t* __restrict__ B,
                                    int64_t out, int64_t in, int64_t r, acc_t s, acc_t* __restrict__ norm) {
    DORA_SHARED(float, lut, [16 + 256]);
    for (int i = threadIdx.x; i < 16; i += blockDim.x) lut[i] = v.code[i];
    if (v.absmax_q != nullptr) {
        for (int i = threadIdx.x; i < 256; i += blockDim.x) lut[16 + i] = v.absmax_code[i];
    }
    __syncthreads();
    v.code = lut;
    if (v.absmax_q != nullptr) v.absmax_code = lut + 16;
    lowrank_rows<false>(Packed4Rows<w_t, acc_t>{v}, A, B, out, in, r, s, static_cast<const acc_t*>(nullptr),
                        static_cast<const acc_t*>(nullptr), norm);
}

template <typename acc_t>
__global__ void int8_norm_kernel(const int8_t* __restrict__ CB, const float* __restrict__ SCB,
                                 const acc_t* __restrict__ A, const acc_t* __restrict__ B, int64_t out, int64_t in,
                                 int64_t r, acc_t s, acc_t* __restrict__ norm) {
    lowrank_rows<false>(Int8Rows<acc_t>{CB, SCB, in}, A, B, out, in, r, s, static_cast<const acc_t*>(nullptr),
                        static_cast<const acc_t*>(nullptr), norm);
}

template <bool kMerge>
void launch_lowrank_rows(at::Tensor& W, const at::Tensor& A, const at::Tensor& B, double s, const at::Tensor* c,
                         const at::Tensor* d, at::Tensor* norm) {
    const int64_t out = W.size(0), in = W.size(1), r = A.size(0);
    if (out == 0) return;
    DORA_DEVICE_GUARD(W);
    auto stream = DORA_STREAM;
    const dim3 grid(static_cast<unsigned>(ceil_div(out, kRowsPerBlock)));
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, W.scalar_type(), "dora_ext::lowrank_rows", [&] {
        using w_t = scalar_t;
        AT_DISPATCH_FLOATING_TYPES(A.scalar_type(), "dora_ext::lowrank_rows_acc", [&] {
            using acc_t = scalar_t;
            auto* kernel = &lowrank_rows_kernel<w_t, acc_t, kMerge>;
            DORA_LAUNCH(kernel, grid, kThreads, stream,
                W.data_ptr<w_t>(), W.stride(0), W.stride(1), A.const_data_ptr<acc_t>(), B.const_data_ptr<acc_t>(), out,
                in, r, static_cast<acc_t>(s), c ? c->const_data_ptr<acc_t>() : nullptr,
                d ? d->const_data_ptr<acc_t>() : nullptr, norm ? norm->mutable_data_ptr<acc_t>() : nullptr);
            DORA_LAUNCH_CHECK();
        });
    });
}

// Column-parallel launch shape for [T, N] passes: x over columns (coalesced), y over row groups.
dim3 column_grid(int64_t T, int64_t N, int64_t rows_per_thread) {
    const int64_t row_groups = std::max<int64_t>(1, ceil_div(T, rows_per_thread));
    return dim3(static_cast<unsigned>(ceil_div(N, kThreads)),
                static_cast<unsigned>(std::min<int64_t>(DORA_MAX_GRID_Y, row_groups)));
}

template <typename scalar_t, typename acc_t>
__global__ void epilogue_kernel(scalar_t* __restrict__ out, const scalar_t* __restrict__ acc,
                                const acc_t* __restrict__ g, const scalar_t* __restrict__ bias, int64_t T, int64_t N) {
    const int64_t j = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
    if (j >= N) return;
    const acc_t gj = g[j];
    const acc_t bj = bias ? static_cast<acc_t>(bias[j]) : acc_t(0);
    for (int64_t t = blockIdx.y; t < T; t += gridDim.y) {
        const int64_t idx = t * N + j;
        out[idx] = static_cast<scalar_t>(gj * static_cast<acc_t>(acc[idx]) + bj);
    }
}

template <typename scalar_t, typename acc_t>
__global__ void epilogue_dropout_kernel(scalar_t* __restrict__ y, scalar_t* __restrict__ p,
                                        const scalar_t* __restrict__ q, const acc_t* __restrict__ g,
                                        const acc_t* __restrict__ gm1, const scalar_t* __restrict__ bias, acc_t s,
                                        int64_t T, int64_t N) {
    const int64_t j = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
    if (j >= N) return;
    const acc_t gj = g[j], gm1j = gm1[j];
    const acc_t bj = bias ? static_cast<acc_t>(bias[j]) : acc_t(0);
    for (int64_t t = blockIdx.y; t < T; t += gridDim.y) {
        const int64_t idx = t * N + j;
        const acc_t pv = static_cast<acc_t>(p[idx]);
        const acc_t qv = s * static_cast<acc_t>(q[idx]);
        y[idx] = static_cast<scalar_t>(static_cast<acc_t>(y[idx]) + bj + gm1j * pv + gj * qv);
        p[idx] = static_cast<scalar_t>(pv + qv);
    }
}

// One thread per (column, chunk of kReduceChunkRows rows): scales δ and writes per-chunk partial sums.
template <typename scalar_t, typename acc_t>
__global__ void backward_reduce_kernel(const scalar_t* __restrict__ grad, const scalar_t* __restrict__ acc,
                                       const acc_t* __restrict__ g, const acc_t* __restrict__ gm1,
                                       scalar_t* __restrict__ gs, scalar_t* __restrict__ gsm1,
                                       acc_t* __restrict__ dot_part, acc_t* __restrict__ sum_part, int64_t T,
                                       int64_t N, int64_t chunks) {
    const int64_t j = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
    if (j >= N) return;
    const acc_t gj = g[j];
    const acc_t gm1j = gsm1 ? gm1[j] : acc_t(0);
    for (int64_t c = blockIdx.y; c < chunks; c += gridDim.y) {
        acc_t dot = 0, sum = 0;
        const int64_t t_end = (c + 1) * kReduceChunkRows < T ? (c + 1) * kReduceChunkRows : T;
        for (int64_t t = c * kReduceChunkRows; t < t_end; ++t) {
            const int64_t idx = t * N + j;
            const acc_t dv = static_cast<acc_t>(grad[idx]);
            if (gs) gs[idx] = static_cast<scalar_t>(gj * dv);
            if (gsm1) gsm1[idx] = static_cast<scalar_t>(gm1j * dv);
            if (dot_part) dot += dv * static_cast<acc_t>(acc[idx]);
            sum += dv;
        }
        if (dot_part) dot_part[c * N + j] = dot;
        if (sum_part) sum_part[c * N + j] = sum;
    }
}

// dst[j] = Σ_c part[c, j], summed in chunk order.
template <typename acc_t>
__global__ void chunk_sum_kernel(const acc_t* __restrict__ part, acc_t* __restrict__ dst, int64_t chunks, int64_t N) {
    const int64_t j = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
    if (j >= N) return;
    acc_t total = 0;
    for (int64_t c = 0; c < chunks; ++c) total += part[c * N + j];
    dst[j] = total;
}

// One thread per column, sorted positions grid-strided; a row's token and adapter index are uniform across the block.
template <typename scalar_t, typename acc_t>
__global__ void mixed_epilogue_kernel(scalar_t* __restrict__ out, const scalar_t* __restrict__ result,
                                      const acc_t* __restrict__ lora, const acc_t* __restrict__ g,
                                      const acc_t* __restrict__ gm1, const int64_t* __restrict__ index,
                                      const int64_t* __restrict__ order, const scalar_t* __restrict__ bias, int64_t T,
                                      int64_t N, int64_t K) {
    const int64_t j = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
    if (j >= N) return;
    const acc_t bj = bias ? static_cast<acc_t>(bias[j]) : acc_t(0);
    for (int64_t p = blockIdx.y; p < T; p += gridDim.y) {
        const int64_t t = order[p], k = index[t], idx = t * N + j;
        if (k == K) {
            out[idx] = result[idx];
            continue;
        }
        const acc_t rv = static_cast<acc_t>(result[idx]);
        out[idx] = static_cast<scalar_t>(rv + gm1[k * N + j] * (rv - bj) + g[k * N + j] * lora[p * N + j]);
    }
}

template <typename T>
T* ptr_or_null(const at::Tensor& t) {
    return t.defined() ? t.data_ptr<T>() : nullptr;
}

}  // DORA_KERNELS_NAMESPACE

at::Tensor lowrank_row_norm(const at::Tensor& W, const at::Tensor& A, const at::Tensor& B, double s) {
    auto norm = at::empty({W.size(0)}, A.options());
    auto W_mut = W;  // read-only in this mode; the kernel signature is shared with the in-place merge
    launch_lowrank_rows<false>(W_mut, A, B, s, nullptr, nullptr, &norm);
    return norm;
}

void lowrank_rowscale_(at::Tensor& W, const at::Tensor& c, const at::Tensor& d, const at::Tensor& A,
                       const at::Tensor& B, double s) {
    launch_lowrank_rows<true>(W, A, B, s, &c, &d, nullptr);
}

// The launch shared by the quantized norms: an [out] norm in A's dtype, and (out > 0) launch(grid, norm) under a
// guard of the storage's device, one block per kRowsPerBlock rows. (The stream is taken inside `launch`: nvcc's
// stub generator mishandles kernels instantiated in a generic lambda.)
template <typename Launch>
at::Tensor launch_row_norm(const at::Tensor& storage, int64_t out, const at::Tensor& A, const Launch& launch) {
    auto norm = at::empty({out}, A.options());
    if (out == 0) return norm;
    DORA_DEVICE_GUARD(storage);
    launch(dim3(static_cast<unsigned>(ceil_div(out, kRowsPerBlock))), norm);
    return norm;
}

at::Tensor packed4_row_norm(const Packed4bit& W, const at::Tensor& A, const at::Tensor& B, double s) {
    const Packed4View view = packed4_view(W);
    return launch_row_norm(W.packed, W.out, A, [&](dim3 grid, at::Tensor& norm) {
        auto stream = DORA_STREAM;
        AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, W.dtype, "dora_ext::packed4_row_norm", [&] {
            using w_t = scalar_t;
            AT_DISPATCH_FLOATING_TYPES(A.scalar_type(), "dora_ext::packed4_row_norm_acc", [&] {
                using acc_t = scalar_t;
                auto* kernel = &packed4_norm_kernel<w_t, acc_t>;
                DORA_LAUNCH(kernel, grid, kThreads, stream, view, A.const_data_ptr<acc_t>(),
                            B.const_data_ptr<acc_t>(), W.out, W.in, A.size(0), static_cast<acc_t>(s),
                            norm.mutable_data_ptr<acc_t>());
                DORA_LAUNCH_CHECK();
            });
        });
    });
}

at::Tensor int8_row_norm(const at::Tensor& CB, const at::Tensor& SCB, const at::Tensor& A, const at::Tensor& B,
                         double s) {
    return launch_row_norm(CB, CB.size(0), A, [&](dim3 grid, at::Tensor& norm) {
        auto stream = DORA_STREAM;
        AT_DISPATCH_FLOATING_TYPES(A.scalar_type(), "dora_ext::int8_row_norm", [&] {
            using acc_t = scalar_t;
            auto* kernel = &int8_norm_kernel<acc_t>;
            DORA_LAUNCH(kernel, grid, kThreads, stream, CB.const_data_ptr<int8_t>(), SCB.const_data_ptr<float>(),
                        A.const_data_ptr<acc_t>(), B.const_data_ptr<acc_t>(), CB.size(0), CB.size(1), A.size(0),
                        static_cast<acc_t>(s), norm.mutable_data_ptr<acc_t>());
            DORA_LAUNCH_CHECK();
        });
    });
}

void epilogue(at::Tensor& out, const at::Tensor& acc, const at::Tensor& g, const at::Tensor& bias) {
    const int64_t T = acc.size(0), N = acc.size(1);
    DORA_DEVICE_GUARD(out);
    auto stream = DORA_STREAM;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, acc.scalar_type(), "dora_ext::epilogue", [&] {
        using acc_t = at::opmath_type<scalar_t>;
        auto* kernel = &epilogue_kernel<scalar_t, acc_t>;
        DORA_LAUNCH(kernel, column_grid(T, N, 4), kThreads, stream,
            out.data_ptr<scalar_t>(), acc.const_data_ptr<scalar_t>(), g.const_data_ptr<acc_t>(),
            ptr_or_null<scalar_t>(bias), T, N);
        DORA_LAUNCH_CHECK();
    });
}

void epilogue_dropout(at::Tensor& base, at::Tensor& P, const at::Tensor& Q, const at::Tensor& g,
                      const at::Tensor& gm1, const at::Tensor& bias, double s) {
    const int64_t T = base.size(0), N = base.size(1);
    DORA_DEVICE_GUARD(base);
    auto stream = DORA_STREAM;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, base.scalar_type(), "dora_ext::epilogue_dropout", [&] {
        using acc_t = at::opmath_type<scalar_t>;
        auto* kernel = &epilogue_dropout_kernel<scalar_t, acc_t>;
        DORA_LAUNCH(kernel, column_grid(T, N, 4), kThreads, stream,
            base.data_ptr<scalar_t>(), P.data_ptr<scalar_t>(), Q.const_data_ptr<scalar_t>(), g.const_data_ptr<acc_t>(),
            gm1.const_data_ptr<acc_t>(), ptr_or_null<scalar_t>(bias), static_cast<acc_t>(s), T, N);
        DORA_LAUNCH_CHECK();
    });
}

void backward_reduce(BackwardReduce& r) {
    const int64_t T = r.grad.size(0), N = r.grad.size(1);
    const int64_t chunks = ceil_div(T, kReduceChunkRows);
    DORA_DEVICE_GUARD(r.grad);
    auto stream = DORA_STREAM;
    const bool want_dot = r.dot.defined(), want_sum = r.colsum.defined();
    at::Tensor dot_part = want_dot ? at::empty({chunks, N}, r.g.options()) : at::Tensor();
    at::Tensor sum_part = want_sum ? at::empty({chunks, N}, r.g.options()) : at::Tensor();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, r.grad.scalar_type(), "dora_ext::backward_reduce", [&] {
        using acc_t = at::opmath_type<scalar_t>;
        const dim3 grid(static_cast<unsigned>(ceil_div(N, kThreads)),
                        static_cast<unsigned>(std::min<int64_t>(DORA_MAX_GRID_Y, chunks)));
        auto* reduce = &backward_reduce_kernel<scalar_t, acc_t>;
        DORA_LAUNCH(reduce, grid, kThreads, stream,
            r.grad.const_data_ptr<scalar_t>(), want_dot ? r.acc.const_data_ptr<scalar_t>() : nullptr,
            r.g.const_data_ptr<acc_t>(), r.gm1.defined() ? r.gm1.const_data_ptr<acc_t>() : nullptr,
            ptr_or_null<scalar_t>(r.grad_scaled), ptr_or_null<scalar_t>(r.grad_scaled_m1),
            ptr_or_null<acc_t>(dot_part), ptr_or_null<acc_t>(sum_part), T, N, chunks);
        DORA_LAUNCH_CHECK();
        const unsigned col_blocks = static_cast<unsigned>(ceil_div(N, kThreads));
        auto* chunk_sum = &chunk_sum_kernel<acc_t>;
        if (want_dot) {
            DORA_LAUNCH(chunk_sum, col_blocks, kThreads, stream, dot_part.const_data_ptr<acc_t>(),
                        r.dot.data_ptr<acc_t>(), chunks, N);
            DORA_LAUNCH_CHECK();
        }
        if (want_sum) {
            DORA_LAUNCH(chunk_sum, col_blocks, kThreads, stream, sum_part.const_data_ptr<acc_t>(),
                        r.colsum.data_ptr<acc_t>(), chunks, N);
            DORA_LAUNCH_CHECK();
        }
    });
}

void mixed_epilogue(at::Tensor& out, const at::Tensor& result, const at::Tensor& lora, const at::Tensor& g,
                    const at::Tensor& gm1, const at::Tensor& index, const at::Tensor& order, const at::Tensor& bias) {
    const int64_t T = result.size(0), N = result.size(1), K = g.size(0);
    DORA_DEVICE_GUARD(out);
    auto stream = DORA_STREAM;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, result.scalar_type(), "dora_ext::mixed_epilogue", [&] {
        using acc_t = at::opmath_type<scalar_t>;
        auto* kernel = &mixed_epilogue_kernel<scalar_t, acc_t>;
        DORA_LAUNCH(kernel, column_grid(T, N, 4), kThreads, stream,
            out.data_ptr<scalar_t>(), result.const_data_ptr<scalar_t>(),
            lora.numel() ? lora.const_data_ptr<acc_t>() : nullptr, g.const_data_ptr<acc_t>(),
            gm1.const_data_ptr<acc_t>(), index.const_data_ptr<int64_t>(), order.const_data_ptr<int64_t>(),
            ptr_or_null<scalar_t>(bias), T, N, K);
        DORA_LAUNCH_CHECK();
    });
}

const Kernels kKernels{&lowrank_row_norm, &packed4_row_norm, &int8_row_norm, &lowrank_rowscale_, &epilogue,
                       &epilogue_dropout, &backward_reduce, &mixed_epilogue};

}  // namespace dora_ext::cuda
