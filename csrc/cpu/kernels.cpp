// CPU kernels behind dora_ext.h. Parallel over rows with at::parallel_for; ATen ops called inside a parallel
// region run single-threaded, so each thread works on its own cache-sized block.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstring>
#include <vector>

#include "../dora_ext.h"

namespace dora_ext::cpu {
namespace {

// Rows of W per block: 2^18 elements (1 MiB in fp32) per [rows, in] accumulation block. Measured on 2 EPYC cores
// (weight_norm, r=64): 2^16 made the B_rows·A GEMM too short (5 rows at in=11008: 100 ms vs 57 ms at 4096→11008);
// 2^20 was no faster than 2^18.
int64_t rows_per_block(int64_t in_features) { return std::max<int64_t>(1, (int64_t{1} << 18) / std::max<int64_t>(in_features, 1)); }

// Calls fn(row0, rows) for consecutive row blocks of W, in parallel. at::parallel_for does not carry
// thread-local state (grad mode, the below-autograd dispatch exclusion) into OpenMP worker threads, so ATen ops
// inside fn must only see tensors that do not require grad: callers pass detached aliases (no copy).
template <typename Fn>
void for_each_row_block(int64_t out_features, int64_t in_features, const Fn& fn) {
    const int64_t block = rows_per_block(in_features);
    at::parallel_for(0, out_features, block, [&](int64_t begin, int64_t end) {
        for (int64_t r0 = begin; r0 < end; r0 += block) fn(r0, std::min(block, end - r0));
    });
}


// ‖W_j + s·B_j·A‖ for every row, where fill(V, r0, rows) writes rows [r0, r0 + rows) of W into the block V
// [rows, in] (accumulation dtype): one block-sized temporary per thread, never [out, in].
template <typename Fill>
at::Tensor row_norm_by_blocks(int64_t out, int64_t in, const at::Tensor& A_in, const at::Tensor& B_in, double s,
                              const Fill& fill) {
    const auto A = A_in.detach(), B = B_in.detach();
    auto norm = at::empty({out}, A.options());
    for_each_row_block(out, in, [&](int64_t r0, int64_t rows) {
        auto V = at::empty({rows, in}, A.options());
        fill(V, r0, rows);
        V.addmm_(B.narrow(0, r0, rows), A, 1.0, s);
        auto dst = norm.narrow(0, r0, rows);
        at::linalg_vector_norm_out(dst, V, 2, at::IntArrayRef{1});
    });
    return norm;
}

}  // namespace

at::Tensor lowrank_row_norm(const at::Tensor& W_in, const at::Tensor& A, const at::Tensor& B, double s) {
    const auto W = W_in.detach();
    return row_norm_by_blocks(W.size(0), W.size(1), A, B, s,
                              [&](at::Tensor& V, int64_t r0, int64_t rows) { V.copy_(W.narrow(0, r0, rows)); });
}

at::Tensor packed4_row_norm(const Packed4bit& W, const at::Tensor& A, const at::Tensor& B, double s) {
    const Packed4View view = packed4_view(W);
    at::Tensor norm;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, W.dtype, "dora_ext::packed4_row_norm", [&] {
        using w_t = scalar_t;  // the dequantized dtype: each value is rounded to it, as bitsandbytes does
        AT_DISPATCH_FLOATING_TYPES(A.scalar_type(), "dora_ext::packed4_row_norm_acc", [&] {
            using acc_t = scalar_t;
            // The two code values of every byte (high nibble first), exact in acc_t: code[] is float32.
            acc_t pairs[256][2];
            for (int b = 0; b < 256; ++b) {
                pairs[b][0] = static_cast<acc_t>(view.code[b >> 4]);
                pairs[b][1] = static_cast<acc_t>(view.code[b & 0x0F]);
            }
            norm = row_norm_by_blocks(W.out, W.in, A, B, s, [&](at::Tensor& V, int64_t r0, int64_t rows) {
                acc_t* v = V.mutable_data_ptr<acc_t>();
                if (view.row_group != 0 || W.in % 2 != 0) {  // the CPU layout, odd rows: element by element
                    for (int64_t j = 0; j < rows; ++j)
                        for (int64_t k = 0; k < W.in; ++k)
                            v[j * W.in + k] = static_cast<acc_t>(static_cast<w_t>(packed4_value(view, r0 + j, k)));
                    return;
                }
                // Rows start on a byte and blocks hold an even number of codes. Two passes per stretch of a row
                // inside one block: one 8-byte copy per byte from a 256-entry table of code pairs, then a loop the
                // compiler vectorizes that scales by the block's absmax and rounds to w_t (packed4_value's
                // arithmetic: float code · float absmax). One EPYC core, a [64, 4096] nf4 block at bitsandbytes'
                // default blocksize 64: 74 us, against 123 us for a 16-entry table of scaled values built per
                // block (every 32 bytes).
                for (int64_t j = 0; j < rows; ++j) {
                    const int64_t f0 = (r0 + j) * W.in;
                    acc_t* vr = v + j * W.in;
                    for (int64_t k0 = 0; k0 < W.in;) {
                        const int64_t block = (f0 + k0) >> view.blocksize_log2;
                        const int64_t k1 = std::min<int64_t>(W.in, ((block + 1) << view.blocksize_log2) - f0);
                        const uint8_t* p = view.packed + ((f0 + k0) >> 1);
                        for (int64_t k = k0; k < k1; k += 2, ++p) std::memcpy(vr + k, pairs[*p], sizeof(pairs[0]));
                        const float absmax = packed4_absmax(view, block);
                        for (int64_t k = k0; k < k1; ++k)
                            vr[k] = static_cast<acc_t>(static_cast<w_t>(static_cast<float>(vr[k]) * absmax));
                        k0 = k1;
                    }
                }
            });
        });
    });
    return norm;
}

at::Tensor int8_row_norm(const at::Tensor& CB, const at::Tensor& SCB, const at::Tensor& A, const at::Tensor& B,
                         double s) {
    const int64_t in = CB.size(1);
    const auto* cb = CB.const_data_ptr<int8_t>();
    const auto* scb = SCB.const_data_ptr<float>();
    at::Tensor norm;
    AT_DISPATCH_FLOATING_TYPES(A.scalar_type(), "dora_ext::int8_row_norm", [&] {
        using acc_t = scalar_t;
        norm = row_norm_by_blocks(CB.size(0), in, A, B, s, [&](at::Tensor& V, int64_t r0, int64_t rows) {
            acc_t* v = V.mutable_data_ptr<acc_t>();
            for (int64_t j = 0; j < rows; ++j)
                for (int64_t k = 0; k < in; ++k) v[j * in + k] = static_cast<acc_t>(int8_value(cb, scb, in, r0 + j, k));
        });
    });
    return norm;
}

void lowrank_rowscale_(at::Tensor& W_inout, const at::Tensor& c_in, const at::Tensor& d_in, const at::Tensor& A_in,
                       const at::Tensor& B_in, double s) {
    // W is written through its detached alias: same storage and version counter.
    const auto W = W_inout.detach(), c = c_in.detach(), d = d_in.detach(), A = A_in.detach(), B = B_in.detach();
    const int64_t out = W.size(0), in = W.size(1);
    for_each_row_block(out, in, [&](int64_t r0, int64_t rows) {
        auto rows_of_W = W.narrow(0, r0, rows);
        auto V = at::mm(B.narrow(0, r0, rows), A);  // [rows, in] in the accumulation dtype: the only temporary
        V.mul_(d.narrow(0, r0, rows).unsqueeze(1) * s).addcmul_(rows_of_W, c.narrow(0, r0, rows).unsqueeze(1));
        rows_of_W.copy_(V);  // the only rounding to W's dtype
    });
}

// Rows per at::parallel_for task for the elementwise passes over [T, N]: about 32K elements, enough work per task
// to amortise the scheduling, at least one row.
static int64_t token_grain(int64_t N) {
    return std::max<int64_t>(1, 32768 / std::max<int64_t>(N, 1));
}

void epilogue(at::Tensor& out, const at::Tensor& acc, const at::Tensor& g, const at::Tensor& bias) {
    const int64_t T = acc.size(0), N = acc.size(1);
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, acc.scalar_type(), "dora_ext::epilogue", [&] {
        using opmath_t = at::opmath_type<scalar_t>;
        const auto* a = acc.const_data_ptr<scalar_t>();
        const auto* gp = g.const_data_ptr<opmath_t>();
        const scalar_t* bp = bias.defined() ? bias.const_data_ptr<scalar_t>() : nullptr;
        auto* o = out.mutable_data_ptr<scalar_t>();
        at::parallel_for(0, T, token_grain(N), [&](int64_t t0, int64_t t1) {
            for (int64_t t = t0; t < t1; ++t) {
                const scalar_t* ar = a + t * N;
                scalar_t* orow = o + t * N;
                if (bp) {
                    for (int64_t j = 0; j < N; ++j)
                        orow[j] = static_cast<scalar_t>(gp[j] * static_cast<opmath_t>(ar[j]) + static_cast<opmath_t>(bp[j]));
                } else {
                    for (int64_t j = 0; j < N; ++j) orow[j] = static_cast<scalar_t>(gp[j] * static_cast<opmath_t>(ar[j]));
                }
            }
        });
    });
}

void epilogue_dropout(at::Tensor& base, at::Tensor& P, const at::Tensor& Q, const at::Tensor& g,
                      const at::Tensor& gm1, const at::Tensor& bias, double s) {
    const int64_t T = base.size(0), N = base.size(1);
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, base.scalar_type(), "dora_ext::epilogue_dropout", [&] {
        using opmath_t = at::opmath_type<scalar_t>;
        auto* y = base.mutable_data_ptr<scalar_t>();
        auto* p = P.mutable_data_ptr<scalar_t>();
        const auto* q = Q.const_data_ptr<scalar_t>();
        const auto* gp = g.const_data_ptr<opmath_t>();
        const auto* gm1p = gm1.const_data_ptr<opmath_t>();
        const scalar_t* bp = bias.defined() ? bias.const_data_ptr<scalar_t>() : nullptr;
        const auto sc = static_cast<opmath_t>(s);
        at::parallel_for(0, T, token_grain(N), [&](int64_t t0, int64_t t1) {
            for (int64_t t = t0; t < t1; ++t) {
                const int64_t row = t * N;
                for (int64_t j = 0; j < N; ++j) {
                    const opmath_t pv = static_cast<opmath_t>(p[row + j]);
                    const opmath_t qv = sc * static_cast<opmath_t>(q[row + j]);
                    const opmath_t b = bp ? static_cast<opmath_t>(bp[j]) : opmath_t(0);
                    y[row + j] = static_cast<scalar_t>(static_cast<opmath_t>(y[row + j]) + b + gm1p[j] * pv + gp[j] * qv);
                    p[row + j] = static_cast<scalar_t>(pv + qv);
                }
            }
        });
    });
}

void backward_reduce(BackwardReduce& r) {
    const int64_t T = r.grad.size(0), N = r.grad.size(1);
    const int64_t chunks = (T + kReduceChunkRows - 1) / kReduceChunkRows;
    const bool want_dot = r.dot.defined(), want_sum = r.colsum.defined();
    const auto acc_dtype = r.g.scalar_type();
    // Partial sums per fixed chunk of rows, added in chunk order afterwards: same bits for any thread count.
    at::Tensor dot_part = want_dot ? at::zeros({chunks, N}, r.g.options()) : at::Tensor();
    at::Tensor sum_part = want_sum ? at::zeros({chunks, N}, r.g.options()) : at::Tensor();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, r.grad.scalar_type(), "dora_ext::backward_reduce", [&] {
        using opmath_t = at::opmath_type<scalar_t>;
        TORCH_INTERNAL_ASSERT(c10::CppTypeToScalarType<opmath_t>::value == acc_dtype);
        const auto* d = r.grad.const_data_ptr<scalar_t>();
        const scalar_t* a = want_dot ? r.acc.const_data_ptr<scalar_t>() : nullptr;
        const auto* gp = r.g.const_data_ptr<opmath_t>();
        const opmath_t* gm1p = r.grad_scaled_m1.defined() ? r.gm1.const_data_ptr<opmath_t>() : nullptr;
        scalar_t* gs = r.grad_scaled.defined() ? r.grad_scaled.mutable_data_ptr<scalar_t>() : nullptr;
        scalar_t* gsm1 = gm1p ? r.grad_scaled_m1.mutable_data_ptr<scalar_t>() : nullptr;
        opmath_t* dotp = want_dot ? dot_part.mutable_data_ptr<opmath_t>() : nullptr;
        opmath_t* sump = want_sum ? sum_part.mutable_data_ptr<opmath_t>() : nullptr;
        at::parallel_for(0, chunks, 1, [&](int64_t c0, int64_t c1) {
            for (int64_t c = c0; c < c1; ++c) {
                const int64_t t_end = std::min(T, (c + 1) * kReduceChunkRows);
                for (int64_t t = c * kReduceChunkRows; t < t_end; ++t) {
                    const int64_t row = t * N;
                    if (gs)
                        for (int64_t j = 0; j < N; ++j)
                            gs[row + j] = static_cast<scalar_t>(gp[j] * static_cast<opmath_t>(d[row + j]));
                    if (gsm1)
                        for (int64_t j = 0; j < N; ++j)
                            gsm1[row + j] = static_cast<scalar_t>(gm1p[j] * static_cast<opmath_t>(d[row + j]));
                    if (dotp)
                        for (int64_t j = 0; j < N; ++j)
                            dotp[c * N + j] += static_cast<opmath_t>(d[row + j]) * static_cast<opmath_t>(a[row + j]);
                    if (sump)
                        for (int64_t j = 0; j < N; ++j) sump[c * N + j] += static_cast<opmath_t>(d[row + j]);
                }
            }
        });
        auto finish = [&](const opmath_t* part, at::Tensor& dst) {
            auto* o = dst.mutable_data_ptr<opmath_t>();
            at::parallel_for(0, N, 1024, [&](int64_t j0, int64_t j1) {
                for (int64_t j = j0; j < j1; ++j) {
                    opmath_t total = 0;
                    for (int64_t c = 0; c < chunks; ++c) total += part[c * N + j];
                    o[j] = total;
                }
            });
        };
        if (dotp) finish(dotp, r.dot);
        if (sump) finish(sump, r.colsum);
    });
}

void mixed_epilogue(at::Tensor& out, const at::Tensor& result, const at::Tensor& lora, const at::Tensor& g,
                    const at::Tensor& gm1, const at::Tensor& index, const at::Tensor& order, const at::Tensor& bias) {
    const int64_t T = result.size(0), N = result.size(1), K = g.size(0);
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, result.scalar_type(), "dora_ext::mixed_epilogue", [&] {
        using opmath_t = at::opmath_type<scalar_t>;
        const auto* r = result.const_data_ptr<scalar_t>();
        const opmath_t* l = lora.numel() ? lora.const_data_ptr<opmath_t>() : nullptr;
        const auto* gp = g.const_data_ptr<opmath_t>();
        const auto* gm1p = gm1.const_data_ptr<opmath_t>();
        const auto* idx = index.const_data_ptr<int64_t>();
        const auto* ord = order.const_data_ptr<int64_t>();
        const scalar_t* bp = bias.defined() ? bias.const_data_ptr<scalar_t>() : nullptr;
        auto* o = out.mutable_data_ptr<scalar_t>();
        at::parallel_for(0, T, token_grain(N), [&](int64_t p0, int64_t p1) {
            for (int64_t p = p0; p < p1; ++p) {
                const int64_t t = ord[p], k = idx[t], row = t * N;
                if (k == K) {
                    std::copy(r + row, r + row + N, o + row);
                    continue;
                }
                const opmath_t* gk = gp + k * N;
                const opmath_t* gm1k = gm1p + k * N;
                const opmath_t* lp = l + p * N;
                for (int64_t j = 0; j < N; ++j) {
                    const opmath_t rv = static_cast<opmath_t>(r[row + j]);
                    const opmath_t base = bp ? rv - static_cast<opmath_t>(bp[j]) : rv;
                    o[row + j] = static_cast<scalar_t>(rv + gm1k[j] * base + gk[j] * lp[j]);
                }
            }
        });
    });
}

const Kernels kKernels{&lowrank_row_norm, &packed4_row_norm, &int8_row_norm, &lowrank_rowscale_, &epilogue,
                       &epilogue_dropout, &backward_reduce, &mixed_epilogue};

}  // namespace dora_ext::cpu
