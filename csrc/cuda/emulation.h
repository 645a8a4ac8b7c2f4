// A CPU emulation of the CUDA execution model, for tests only: kernels.cuh compiled as host C++ runs here, so CI
// executes the CUDA kernels' own code (indexing, strides, tails, launch shapes, block reductions) without a GPU.
//
// Each CUDA thread of a block is a fiber (ucontext) on the calling OS thread; the fibers run one at a time, each from
// one __syncthreads() to the next, in ascending or descending thread order (set_order): a missing barrier then makes
// some thread read shared memory another has not written yet (NaN: see shared_region) in one of the two orders,
// every time, not by chance. Blocks of a launch run one after another. A launch checks CUDA's limits (threads per
// block, grid dimensions, 48 KiB of static shared memory), and a barrier not reached by every thread of the block is
// an error. Not modelled: warps (no warp intrinsics are used), memory coalescing, speed, the driver.
#pragma once

#include <c10/util/Exception.h>
#include <ucontext.h>

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <functional>
#include <set>
#include <vector>

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

inline void run_block(const std::function<void()>& body, unsigned threads) {
    Block& b = block();
    if (b.fibers.size() < threads) b.fibers.resize(threads);
    b.body = &body;
    b.filled.clear();
    b.shared_bytes = 0;
    for (unsigned i = 0; i < threads; ++i) {
        Fiber& f = b.fibers[i];
        if (f.stack.empty()) f.stack.resize(kStackBytes);
        f.done = f.at_barrier = false;
        getcontext(&f.ctx);
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
            swapcontext(&b.scheduler, &f.ctx);
        }
        b.current = -1;
        unsigned done = 0, waiting = 0;
        for (unsigned i = 0; i < threads; ++i) {
            done += b.fibers[i].done;
            waiting += b.fibers[i].at_barrier;
        }
        if (done == threads) return;
        TORCH_CHECK(done == 0 && waiting == threads, "cuda emulation: __syncthreads() reached by ", waiting, " of ",
                    threads, " threads of block (", blockIdx.x, ", ", blockIdx.y, ", ", blockIdx.z, "); ", done,
                    " had returned: a barrier inside divergent code");
    }
}

// kernel<<<grid, block>>>(...), emulated: `body` is the kernel call, run once per thread.
template <typename F>
void launch(dim3 grid, dim3 block_dim, F&& body) {
    const uint64_t threads = uint64_t{block_dim.x} * block_dim.y * block_dim.z;
    TORCH_CHECK(threads >= 1 && threads <= 1024 && block_dim.x <= 1024 && block_dim.y <= 1024 && block_dim.z <= 64,
                "cuda emulation: invalid block (", block_dim.x, ", ", block_dim.y, ", ", block_dim.z,
                "): CUDA allows 1..1024 threads, x, y <= 1024, z <= 64");
    TORCH_CHECK(grid.x >= 1 && grid.x <= 2147483647u && grid.y >= 1 && grid.y <= 65535 && grid.z >= 1 &&
                    grid.z <= 65535,
                "cuda emulation: invalid grid (", grid.x, ", ", grid.y, ", ", grid.z,
                "): CUDA allows x in 1..2^31-1, y and z in 1..65535 (a zero-size launch is an error too)");
    const std::function<void()> fn = std::forward<F>(body);
    gridDim = grid;
    blockDim = block_dim;
    for (unsigned z = 0; z < grid.z; ++z)
        for (unsigned y = 0; y < grid.y; ++y)
            for (unsigned x = 0; x < grid.x; ++x) {
                blockIdx = dim3(x, y, z);
                run_block(fn, static_cast<unsigned>(threads));
            }
}

}  // namespace dora_ext::emu

#define __syncthreads() ::dora_ext::emu::syncthreads()
