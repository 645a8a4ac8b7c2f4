// For the CUDA-emulation test build only: while an emulated op runs, every new CPU allocation is a guarded block
// (guarded_memory.h: fenced by poisoned slack and PROT_NONE reservations, itself filled with NaN bytes, so a kernel
// that reads memory nobody wrote, an output row it forgot or a partial sum it skipped, produces NaN instead of
// whatever the allocator handed back, often zeros, which hide the bug), and every tensor argument is handed to the
// op as a guarded copy (NanFilled below), so every tensor an emulated kernel touches is fenced.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/core/Allocator.h>
#include <c10/core/CPUAllocator.h>

#include <algorithm>
#include <cstring>
#include <deque>
#include <string>
#include <optional>
#include <type_traits>
#include <utility>
#include <vector>

#include "guarded_memory.h"

namespace dora_ext::emu {

inline bool& nan_fill_active() {
    static thread_local bool active = false;
    return active;
}

// Delegates to the CPU allocator it replaced, except while nan_fill_active(): then each block is guarded.
struct NanFillAllocator final : c10::Allocator {
    explicit NanFillAllocator(c10::Allocator* inner) : inner_(inner) { inner_raw_deleter() = inner->raw_deleter(); }
    c10::DataPtr allocate(std::size_t n) override {
        if (!nan_fill_active() || n == 0) return inner_->allocate(n);
        void* p = guarded_allocate(n);
        return {p, p, &free_block, c10::Device(c10::DeviceType::CPU)};
    }
    void copy_data(void* dest, const void* src, std::size_t count) const override {
        inner_->copy_data(dest, src, count);
    }
    c10::DeleterFnPtr raw_deleter() const override { return &free_block; }

  private:
    static c10::DeleterFnPtr& inner_raw_deleter() {
        static c10::DeleterFnPtr d = nullptr;
        return d;
    }
    static void free_block(void* p) {
        if (guarded_free(p)) return;
        TORCH_INTERNAL_ASSERT(inner_raw_deleter() != nullptr, "cuda emulation: a raw block of an allocator without a "
                              "raw deleter");
        inner_raw_deleter()(p);
    }
    c10::Allocator* inner_;
};

// Installed once, when the test library loads (tests/cuda_emulation/emulated_kernels.cpp).
inline void install_nan_fill_allocator() {
    static NanFillAllocator alloc(c10::GetCPUAllocator());
    c10::SetCPUAllocator(&alloc, /*priority=*/100);
}

struct NanFillScope {
    bool previous = nan_fill_active();
    NanFillScope() { nan_fill_active() = true; }
    ~NanFillScope() { nan_fill_active() = previous; }
};

// An op's tensor arguments as guarded copies (made inside a NanFillScope): the span of storage from a tensor's
// first element to its last, its layout kept, the gaps of a strided view left poisoned (a read there is NaN). An
// argument the op takes by mutable reference (merge_'s weight) is copied back afterwards, once its gaps are checked.
class GuardedArguments {
  public:
    explicit GuardedArguments(const char* op) : op_(op) {}

    template <typename A>
    decltype(auto) pass(A&& a) {
        using T = std::remove_cv_t<std::remove_reference_t<A>>;
        if constexpr (std::is_same_v<T, at::Tensor>) {
            auto& copy = tensors_.emplace_back(guarded_copy(a));
            if constexpr (std::is_lvalue_reference_v<A> && !std::is_const_v<std::remove_reference_t<A>>) {
                if (copy.defined() && !copy.is_same(a)) {
                    // the storage as it is before the op (elements and the gaps' poison), for check_gaps
                    auto before = at::empty({span(copy)}, copy.options());
                    std::memcpy(before.data_ptr(), copy.const_data_ptr(), before.nbytes());
                    written_.push_back({&a, &copy, before});
                }
                return static_cast<at::Tensor&>(copy);
            } else {
                return static_cast<const at::Tensor&>(copy);
            }
        } else if constexpr (std::is_same_v<T, std::optional<at::Tensor>>) {
            auto& copy = optionals_.emplace_back(a ? std::optional<at::Tensor>(guarded_copy(*a)) : std::nullopt);
            return static_cast<const std::optional<at::Tensor>&>(copy);
        } else if constexpr (std::is_same_v<T, at::TensorList>) {
            auto& list = lists_.emplace_back();
            for (const auto& t : a) list.push_back(guarded_copy(t));
            return at::TensorList(list);
        } else {
            return std::forward<A>(a);
        }
    }

    // After the op: the in-place arguments back into the caller's tensors.
    void write_back() {
        for (auto& w : written_) {
            check_gaps(*w.copy, w.before);
            w.original->copy_(*w.copy);
        }
    }

  private:
    static int64_t span(const at::Tensor& t) {
        int64_t n = 1;
        for (int64_t d = 0; d < t.dim(); ++d) n += (t.size(d) - 1) * t.stride(d);
        return n;
    }

    // No two elements share memory (ATen's has_internal_overlap says "too hard" for any strided view with gaps):
    // the dims by increasing stride, each stride past the whole extent of the dims below it.
    static bool non_overlapping(const at::Tensor& t) {
        std::vector<std::pair<int64_t, int64_t>> dims;  // (stride, size) of the dims of size > 1
        for (int64_t d = 0; d < t.dim(); ++d) {
            if (t.size(d) > 1) dims.emplace_back(t.stride(d), t.size(d));
        }
        std::sort(dims.begin(), dims.end());
        int64_t extent = 0;  // the largest offset the dims so far reach
        for (const auto& [stride, size] : dims) {
            if (stride <= extent) return false;
            extent += (size - 1) * stride;
        }
        return true;
    }

    static at::Tensor guarded_copy(const at::Tensor& t) {
        if (!t.defined() || !t.device().is_cpu() || !t.has_storage() || t.numel() == 0) return t;
        auto buffer = at::empty({span(t)}, t.options());  // a guarded block, NaN bytes (nan_fill_active)
        auto copy = buffer.as_strided(t.sizes(), t.strides());
        if (non_overlapping(copy)) {
            copy.copy_(t);
        } else {  // stride 0 (expanded): the span's bytes as they are
            std::memcpy(buffer.data_ptr(), t.const_data_ptr(), buffer.nbytes());
        }
        return copy;
    }

    // A strided in-place argument's gaps (storage between its elements) must still hold their poison.
    void check_gaps(const at::Tensor& copy, const at::Tensor& before) const {
        if (before.numel() == copy.numel() || !non_overlapping(copy)) return;
        auto expected = before.clone();  // the gaps as they were, the elements as they are now
        expected.as_strided(copy.sizes(), copy.strides()).copy_(copy);
        TORCH_CHECK(std::memcmp(expected.const_data_ptr(), copy.const_data_ptr(), expected.nbytes()) == 0,
                    "cuda emulation: ", op_, " wrote into the gaps between the elements of its in-place argument "
                    "(a strided view of shape ", copy.sizes(), " and strides ", copy.strides(), ")");
    }

    const char* op_;
    std::deque<at::Tensor> tensors_;
    std::deque<std::optional<at::Tensor>> optionals_;
    std::deque<std::vector<at::Tensor>> lists_;
    struct Written {
        at::Tensor* original;
        at::Tensor* copy;
        at::Tensor before;
    };
    std::vector<Written> written_;
};

// NanFilled<decltype(&op), &op>::call: op, with fresh memory guarded and NaN-filled and its tensor arguments guarded
// copies for its duration (emulated_ops.h: DORA_EXT_IMPL).
template <typename F, F f>
struct NanFilled;

template <typename R, typename... Args, R (*f)(Args...)>
struct NanFilled<R (*)(Args...), f> {
    static R call(Args... args) {
        NanFillScope scope;
        static const std::string name = symbol_name(reinterpret_cast<const void*>(f));
        GuardedArguments guarded(name.c_str());
        if constexpr (std::is_void_v<R>) {
            f(guarded.pass(std::forward<Args>(args))...);
            guarded.write_back();
        } else {
            R result = f(guarded.pass(std::forward<Args>(args))...);
            guarded.write_back();
            return result;
        }
    }
};

}  // namespace dora_ext::emu
