// A CPU emulation of the CUDA execution model, for tests only: kernels.cuh compiled as host C++ runs here, so CI
// executes the CUDA kernels' own code (indexing, strides, tails, launch shapes, block reductions) without a GPU.
//
// Each CUDA thread of a block is a fiber (ucontext) on the calling OS thread; the fibers run one at a time, each from
// one __syncthreads() to the next, in ascending or descending thread order (set_order): a missing barrier then makes
// some thread read shared memory another has not written yet (NaN: see shared_region) in one of the two orders,
// every time, not by chance. Blocks of a launch run one after another. A launch checks CUDA's limits (threads per
// block, grid dimensions, 48 KiB of static shared memory), and a barrier not reached by every thread of the block is
// an error. Every pointer a kernel is given must point into guarded memory (guarded_memory.h: the tensors of an
// emulated op); after the kernel, the slack around each is checked for writes out of range, and an access further
// out stops the kernel at the fault. Each of these fails the launch with an error naming the kernel and, where
// there is one, the argument. Not modelled: warps (no warp intrinsics are used), memory coalescing, speed, the
// driver.
#pragma once

#include <c10/util/Exception.h>
#include <ucontext.h>

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <functional>
#include <set>
#include <string>
#include <type_traits>
#include <vector>

#include "../../../csrc/quantized_weights.h"
#include "guarded_memory.h"

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline

struct dim3 {
    unsigned x, y, z;
    constexpr dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};

// The current thread's coordinates: set by the scheduler every time it switches to a fiber.
inline thread_local dim3 threadIdx, blockIdx, blockDim, gridDim;

namespace dora_ext::emu {

enum class Order { Ascending, Descending };

inline Order& order() {
    static Order o = Order::Ascending;
    return o;
}

inline void set_order(Order o) { order() = o; }

constexpr std::size_t kStackBytes = 64 * 1024;
constexpr std::size_t kMaxStaticShared = 48 * 1024;
constexpr int64_t kCudaMaxGridYZ = 65535;

// The largest grid y and z the launches accept, CUDA's 65535 unless a test lowers it (set_max_grid_yz): the
// launchers clamp to it (emulated_compat.h: DORA_MAX_GRID_Y), so a few hundred rows exercise the clamps and the
// grid-stride loops behind them, which at CUDA's limit would need 2^18 rows and 2^24 emulated threads.
inline int64_t& max_grid_yz() {
    static int64_t limit = kCudaMaxGridYZ;
    return limit;
}

inline void set_max_grid_yz(int64_t limit) {
    TORCH_CHECK(limit >= 1 && limit <= kCudaMaxGridYZ, "cuda emulation: the grid limit must be in 1..",
                kCudaMaxGridYZ, " (CUDA's), got ", limit);
    max_grid_yz() = limit;
}

struct Fiber {
    ucontext_t ctx;
    std::vector<char> stack;
    bool done = false, at_barrier = false;
};

struct Block {
    ucontext_t scheduler;
    std::vector<Fiber> fibers;  // kept across blocks and launches: stacks are reused
    int current = -1;
    const std::function<void()>* body = nullptr;
    std::set<void*> filled;  // shared arrays NaN-filled in this block
    std::size_t shared_bytes = 0;
    void* fault = nullptr;  // the address, when a thread of the block faulted (guarded_memory.h): it was abandoned
};

inline Block& block() {
    static thread_local Block b;
    return b;
}

inline void fiber_main() {
    Block& b = block();
    (*b.body)();
    b.fibers[b.current].done = true;  // returning resumes the scheduler (uc_link)
}

// __syncthreads(): park this thread at the barrier; the scheduler resumes it once every thread has arrived.
inline void syncthreads() {
    Block& b = block();
    TORCH_CHECK(b.current >= 0, "cuda emulation: __syncthreads() outside a kernel");
    Fiber& f = b.fibers[b.current];
    f.at_barrier = true;
    swapcontext(&f.ctx, &b.scheduler);
}

// Called where a kernel declares a shared array: the first thread of the block to get there fills it with NaN bytes.
inline void shared_region(void* p, std::size_t bytes) {
    Block& b = block();
    if (b.filled.insert(p).second) {
        b.shared_bytes += bytes;
        TORCH_CHECK(b.shared_bytes <= kMaxStaticShared, "cuda emulation: ", b.shared_bytes,
                    " bytes of static shared memory in one block, more than CUDA's ", kMaxStaticShared);
        std::memset(p, 0xFF, bytes);  // NaN in every float type
    }
}

// Runs one block; false if a thread faulted (b.fault: the address), which abandons the block.
inline bool run_block(const std::function<void()>& body, unsigned threads) {
    Block& b = block();
    FaultCatcher& catcher = fault_catcher();
    if (b.fibers.size() < threads) b.fibers.resize(threads);
    b.body = &body;
    b.filled.clear();
    b.shared_bytes = 0;
    for (unsigned i = 0; i < threads; ++i) {
        Fiber& f = b.fibers[i];
        if (f.stack.empty()) {  // a context initialised once (getcontext is a system call); makecontext resets it
            f.stack.resize(kStackBytes);
            getcontext(&f.ctx);
        }
        f.done = f.at_barrier = false;
        f.ctx.uc_stack.ss_sp = f.stack.data();
        f.ctx.uc_stack.ss_size = f.stack.size();
        f.ctx.uc_link = &b.scheduler;
        makecontext(&f.ctx, &fiber_main, 0);
    }
    const dim3 bd = blockDim;
    for (;;) {  // one round: every live thread runs up to its next barrier (or its end)
        for (unsigned k = 0; k < threads; ++k) {
            const unsigned i = order() == Order::Ascending ? k : threads - 1 - k;
            Fiber& f = b.fibers[i];
            if (f.done) continue;
            f.at_barrier = false;
            b.current = static_cast<int>(i);
            threadIdx = dim3(i % bd.x, (i / bd.x) % bd.y, i / (bd.x * bd.y));
            catcher.faulted = 0;
            catcher.resume = &b.scheduler;
            catcher.tid.store(current_tid());
            swapcontext(&b.scheduler, &f.ctx);  // a fault resumes here too (on_fault: setcontext)
            catcher.tid.store(0);
            if (catcher.faulted) {
                b.current = -1;
                b.fault = catcher.address;
                return false;
            }
        }
        b.current = -1;
        unsigned done = 0, waiting = 0;
        for (unsigned i = 0; i < threads; ++i) {
            done += b.fibers[i].done;
            waiting += b.fibers[i].at_barrier;
        }
        if (done == threads) return true;
        TORCH_CHECK(done == 0 && waiting == threads, "cuda emulation: __syncthreads() reached by ", waiting, " of ",
                    threads, " threads of block (", blockIdx.x, ", ", blockIdx.y, ", ", blockIdx.z, "); ", done,
                    " had returned: a barrier inside divergent code");
    }
}

// The launch's argument expressions, one per argument: DORA_LAUNCH's text split at its top-level commas.
inline std::vector<std::string> split_arguments(const char* text) {
    std::vector<std::string> out(1);
    int depth = 0;
    for (const char* c = text; *c != '\0'; ++c) {
        if (*c == '(' || *c == '[' || *c == '{' || (*c == '<' && c[1] != '<')) ++depth;
        if (*c == ')' || *c == ']' || *c == '}' || (*c == '>' && c != text && c[-1] != '-')) --depth;
        if (*c == ',' && depth == 0) {
            out.emplace_back();
            continue;
        }
        if (!(out.back().empty() && (*c == ' ' || *c == '\n'))) out.back() += *c;
    }
    return out;
}

// One pointer a kernel was given: which argument (and, for a struct of pointers, which field).
struct PointerArg {
    int index;
    const char* field;
    const void* ptr;
};

template <typename T>
void collect_pointers(std::vector<PointerArg>& out, int index, const T& arg) {
    if constexpr (std::is_pointer_v<T>) {
        if (arg != nullptr) out.push_back({index, "", static_cast<const void*>(arg)});
    } else if constexpr (std::is_same_v<T, ::dora_ext::Packed4View>) {
        const std::pair<const char*, const void*> fields[] = {
            {".packed", arg.packed},           {".absmax", arg.absmax},           {".absmax_q", arg.absmax_q},
            {".code", arg.code},               {".absmax_code", arg.absmax_code}, {".absmax_scale", arg.absmax_scale},
            {".absmax_offset", arg.absmax_offset}};
        for (const auto& [field, p] : fields) {
            if (p != nullptr) out.push_back({index, field, p});
        }
    }
}

struct LaunchReport {
    std::string kernel;
    std::vector<std::string> texts;
    std::vector<PointerArg> pointers;

    std::string argument(const PointerArg& a) const {
        const std::string text = a.index < static_cast<int>(texts.size()) ? texts[a.index] : "?";
        return c10::str("argument ", a.index, " `", text, "`", a.field);
    }
    // The kernel's arguments that point into region g, in words.
    std::string arguments_in(const Region& g) const {
        std::string out;
        for (const auto& a : pointers) {
            Region h{};
            if (find_region(a.ptr, &h) && h.base == g.base) out += (out.empty() ? "" : " and ") + argument(a);
        }
        return out.empty() ? std::string("a tensor it was not given") : out;
    }
};

// kernel<<<grid, block>>>(args...), emulated: the kernel runs once per thread, each thread a fiber.
template <typename Kernel, typename... Args>
void launch(const char* argument_text, dim3 grid, dim3 block_dim, Kernel kernel, Args... args) {
    const uint64_t threads = uint64_t{block_dim.x} * block_dim.y * block_dim.z;
    LaunchReport report{symbol_name(reinterpret_cast<const void*>(kernel)), split_arguments(argument_text), {}};
    if (report.texts.size() != sizeof...(Args)) report.texts.clear();  // a split this parser got wrong: no names
    TORCH_CHECK(threads >= 1 && threads <= 1024 && block_dim.x <= 1024 && block_dim.y <= 1024 && block_dim.z <= 64,
                "cuda emulation: ", report.kernel, ": invalid block (", block_dim.x, ", ", block_dim.y, ", ",
                block_dim.z, "): CUDA allows 1..1024 threads, x, y <= 1024, z <= 64");
    const int64_t yz = max_grid_yz();
    TORCH_CHECK(grid.x >= 1 && grid.x <= 2147483647u && grid.y >= 1 && grid.y <= yz && grid.z >= 1 && grid.z <= yz,
                "cuda emulation: ", report.kernel, ": invalid grid (", grid.x, ", ", grid.y, ", ", grid.z,
                "): CUDA allows x in 1..2^31-1, y and z in 1..", yz,
                yz == kCudaMaxGridYZ ? "" : " (lowered for this test)", " (a zero-size launch is an error too)");
    int index = 0;
    (collect_pointers(report.pointers, index++, args), ...);
    for (const auto& a : report.pointers) {
        Region g{};
        TORCH_CHECK(find_region(a.ptr, &g) && a.ptr >= g.data && a.ptr < g.data + g.bytes, "cuda emulation: ",
                    report.kernel, ": ", report.argument(a),
                    " does not point into a tensor of the emulated op (guarded memory: guarded_memory.h), so its "
                    "accesses could not be checked");
    }
    ensure_fault_handler();
    const std::function<void()> fn = [&] { kernel(args...); };
    gridDim = grid;
    blockDim = block_dim;
    for (unsigned z = 0; z < grid.z; ++z)
        for (unsigned y = 0; y < grid.y; ++y)
            for (unsigned x = 0; x < grid.x; ++x) {
                blockIdx = dim3(x, y, z);
                if (run_block(fn, static_cast<unsigned>(threads))) continue;
                const void* address = block().fault;
                Region g{};
                TORCH_CHECK(!find_region(address, &g), "cuda emulation: ", report.kernel, " accessed memory out of "
                            "range in block (", x, ", ", y, ", ", z, "): address ", address, ", ", where_in(g, address),
                            ", the tensor of ", report.arguments_in(g));
                TORCH_CHECK(false, "cuda emulation: ", report.kernel, " accessed address ", address,
                            " in block (", x, ", ", y, ", ", z, "), outside every tensor of the emulated op");
            }
    for (const auto& a : report.pointers) {
        Region g{};
        find_region(a.ptr, &g);
        const char* bad = damaged_slack(g);
        TORCH_CHECK(bad == nullptr, "cuda emulation: ", report.kernel, " wrote out of range of ", report.argument(a),
                    ": its guard bytes changed, first ", where_in(g, bad));
    }
}

}  // namespace dora_ext::emu

#define __syncthreads() ::dora_ext::emu::syncthreads()
