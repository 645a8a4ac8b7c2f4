// For the CUDA-emulation test build only: while an emulated op runs, every new CPU allocation is filled with NaN
// bytes, so a kernel that reads memory nobody wrote (an output row it forgot, a partial sum it skipped) produces NaN
// instead of whatever the allocator handed back (often zeros, which hide the bug).
#pragma once

#include <c10/core/Allocator.h>
#include <c10/core/CPUAllocator.h>

#include <cstring>
#include <utility>

namespace dora_ext::emu {

inline bool& nan_fill_active() {
    static thread_local bool active = false;
    return active;
}

// Delegates to the CPU allocator it replaced; only fills the new block while nan_fill_active().
struct NanFillAllocator final : c10::Allocator {
    explicit NanFillAllocator(c10::Allocator* inner) : inner_(inner) {}
    c10::DataPtr allocate(std::size_t n) override {
        auto p = inner_->allocate(n);
        if (nan_fill_active() && n > 0 && p.get() != nullptr) std::memset(p.get(), 0xFF, n);
        return p;
    }
    void copy_data(void* dest, const void* src, std::size_t count) const override {
        inner_->copy_data(dest, src, count);
    }
    c10::DeleterFnPtr raw_deleter() const override { return inner_->raw_deleter(); }

  private:
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

// NanFilled<decltype(&op), &op>::call: op, with fresh memory NaN-filled for its duration (op_namespace.h).
template <typename F, F f>
struct NanFilled;

template <typename R, typename... Args, R (*f)(Args...)>
struct NanFilled<R (*)(Args...), f> {
    static R call(Args... args) {
        NanFillScope scope;
        return f(std::forward<Args>(args)...);
    }
};

}  // namespace dora_ext::emu
