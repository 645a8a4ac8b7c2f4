// For the CUDA-emulation test build only: the memory an emulated kernel may touch, fenced, so that an out-of-range
// read or write fails the launch with an error naming the kernel and the tensor, every time, instead of corrupting
// the heap (a crash, or a failure only when a test runs alone) or reading a neighbour's values.
//
// Every CPU allocation made while an emulated op runs (its outputs and temporaries, and the guarded copies of its
// tensor arguments: nan_fill.h) is its own mapping:
//
//   [ kReserve bytes PROT_NONE ][ lead slack | data | tail slack ][ kReserve bytes PROT_NONE ]
//
// The slack (kSlack bytes or more on each side) and the data start filled with poison (poison_byte: NaN in every
// float type at every alignment, negative in every signed integer type), so a read just out of range or of memory
// nobody wrote yields NaN; the launch (emulation.h) checks after every kernel that the slack of each tensor it was
// given still holds its poison, which catches writes just out of range. The poison's NaN payloads differ from block
// to block and along each block, so a NaN computed from poison read elsewhere (arithmetic keeps a NaN operand's
// payload) and stored out of range does not restore the bytes it overwrote: a missing bounds check whose threads read
// poison and write its NaN shows too. An access further out lands in the PROT_NONE reservation: the fault handler
// below stops the kernel there and the launch reports the address relative to the nearest tensor. The data is placed
// kSlack to kSlack + 63 bytes (64-byte alignment, as c10's allocator gives) before the end of its accessible pages.
#pragma once

#include <c10/util/Exception.h>
#include <cxxabi.h>
#include <dlfcn.h>
#include <signal.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <ucontext.h>
#include <unistd.h>

#include <atomic>
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <map>
#include <mutex>
#include <string>

namespace dora_ext::emu {

constexpr std::size_t kSlack = 1024;                    // poisoned bytes at least, before and after the data
constexpr std::size_t kAlign = 64;                      // the alignment c10's CPU allocator gives
constexpr std::size_t kReserve = std::size_t{64} << 20;  // PROT_NONE on each side: costs address space only

struct Region {
    char* base;        // the whole mapping: [base, base + total)
    std::size_t total;
    char* open_begin;  // the accessible pages: [open_begin, open_end)
    char* open_end;
    char* data;        // the allocation: [data, data + bytes)
    std::size_t bytes;
    uint64_t salt;     // varies the poison from block to block
};

// The poison at address a of a block with salt `salt`: odd bytes 0xFF (the high byte of every little-endian element
// of 2 or more bytes: sign and exponent all ones), even bytes 0x81..0xFF (a bfloat16 or float32 exponent's last bit
// set, a bfloat16 mantissa not 0) and 0xF0..0xFF at 6 mod 8 (a float64 exponent's last four bits), the rest of each
// from a hash of a and salt: NaN as float16, bfloat16, float32 and float64 at any alignment.
inline unsigned char poison_byte(uint64_t salt, std::uintptr_t a) {
    if (a & 1) return 0xFF;
    const uint64_t h = ((a >> 1) + salt) * 0x9E3779B97F4A7C15ull;
    const auto bits = static_cast<unsigned char>(h >> 57);  // 7 bits
    return (a & 7) == 6 ? static_cast<unsigned char>(0xF0 | (bits & 0x0F))
                        : static_cast<unsigned char>(0x80 | (bits != 0 ? bits : 1));
}

inline void poison(uint64_t salt, char* begin, char* end) {
    for (char* p = begin; p < end; ++p) *p = static_cast<char>(poison_byte(salt, reinterpret_cast<std::uintptr_t>(p)));
}

struct Regions {
    std::mutex mutex;
    std::map<std::uintptr_t, Region> by_base;           // keyed by the mapping's start (mappings never overlap)
    std::map<std::uintptr_t, std::uintptr_t> base_of;  // data address -> mapping start
};

inline Regions& regions() {
    static auto* r = new Regions();  // never destroyed: deleters may run during process exit
    return *r;
}

inline std::size_t page_size() {
    static const std::size_t p = static_cast<std::size_t>(sysconf(_SC_PAGESIZE));
    return p;
}

// A fenced, poisoned block of `bytes` bytes (bytes > 0); its data address.
inline void* guarded_allocate(std::size_t bytes) {
    const std::size_t page = page_size();
    const std::size_t open = (bytes + 2 * kSlack + kAlign + page - 1) / page * page;
    const std::size_t total = open + 2 * kReserve;
    void* m = mmap(nullptr, total, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    TORCH_CHECK(m != MAP_FAILED, "cuda emulation: mmap of a guarded block of ", bytes, " bytes failed: ",
                std::strerror(errno));
    char* base = static_cast<char*>(m);
    char* open_begin = base + kReserve;
    if (mprotect(open_begin, open, PROT_READ | PROT_WRITE) != 0) {
        const int err = errno;
        munmap(base, total);
        TORCH_CHECK(false, "cuda emulation: mprotect of a guarded block failed: ", std::strerror(err));
    }
    static std::atomic<uint64_t> blocks{0};
    const uint64_t salt = (blocks.fetch_add(1) + 1) * 0xD1B54A32D192ED03ull;
    char* end = open_begin + open;
    poison(salt, open_begin, end);
    char* data = reinterpret_cast<char*>(reinterpret_cast<std::uintptr_t>(end - kSlack - bytes) / kAlign * kAlign);
    Regions& r = regions();
    std::lock_guard<std::mutex> lock(r.mutex);
    const auto key = reinterpret_cast<std::uintptr_t>(base);
    r.by_base.emplace(key, Region{base, total, open_begin, end, data, bytes, salt});
    r.base_of.emplace(reinterpret_cast<std::uintptr_t>(data), key);
    return data;
}

// Unmaps p if it is a guarded block's data address; false if it is not one.
inline bool guarded_free(void* p) {
    Region g;
    {
        Regions& r = regions();
        std::lock_guard<std::mutex> lock(r.mutex);
        auto it = r.base_of.find(reinterpret_cast<std::uintptr_t>(p));
        if (it == r.base_of.end()) return false;
        auto region = r.by_base.find(it->second);
        g = region->second;
        r.by_base.erase(region);
        r.base_of.erase(it);
    }
    munmap(g.base, g.total);
    return true;
}

// The guarded block whose mapping (reservations included) holds address p.
inline bool find_region(const void* p, Region* out) {
    const auto a = reinterpret_cast<std::uintptr_t>(p);
    Regions& r = regions();
    std::lock_guard<std::mutex> lock(r.mutex);
    auto it = r.by_base.upper_bound(a);
    if (it == r.by_base.begin()) return false;
    --it;
    if (a >= it->first + it->second.total) return false;
    *out = it->second;
    return true;
}

// The first byte of region g's slack that no longer holds its poison (a write out of range), or nullptr.
inline const char* damaged_slack(const Region& g) {
    for (const char* p = g.open_begin; p < g.data; ++p) {
        if (static_cast<unsigned char>(*p) != poison_byte(g.salt, reinterpret_cast<std::uintptr_t>(p))) return p;
    }
    for (const char* p = g.data + g.bytes; p < g.open_end; ++p) {
        if (static_cast<unsigned char>(*p) != poison_byte(g.salt, reinterpret_cast<std::uintptr_t>(p))) return p;
    }
    return nullptr;
}

// Where address p lies relative to region g's data, in words.
inline std::string where_in(const Region& g, const void* p) {
    const auto offset = reinterpret_cast<std::intptr_t>(p) - reinterpret_cast<std::intptr_t>(g.data);
    const auto n = static_cast<std::intptr_t>(g.bytes);
    return c10::str("byte offset ", offset, " of a ", n, "-byte tensor",
                    offset < 0 ? " (before its start)" : offset >= n ? " (past its end)" : "");
}

// The function at address fn, by name, without its parameter list (it must have external linkage: the kernels do in
// this build, emulated_compat.h).
inline std::string symbol_name(const void* fn) {
    Dl_info info{};
    if (dladdr(fn, &info) == 0 || info.dli_sname == nullptr || info.dli_saddr != fn) return "an unnamed function";
    int status = 0;
    char* demangled = abi::__cxa_demangle(info.dli_sname, nullptr, nullptr, &status);
    std::string name = status == 0 && demangled != nullptr ? demangled : info.dli_sname;
    std::free(demangled);
    const auto paren = name.find('(');  // the parameter list, and a function template's return type, go
    if (paren != std::string::npos) name.resize(paren);
    if (name.rfind("void ", 0) == 0) name.erase(0, 5);
    return name;
}

// ---- faults: a kernel's access to a PROT_NONE reservation (or anywhere unmapped) stops the kernel, not the process.
// While a fiber runs, the block scheduler (emulation.h) publishes its OS thread and the context to resume; a fault
// on that thread is recorded and the scheduler resumed (the fiber is abandoned: the launch reports the fault). A
// fault anywhere else goes to the handler installed before this one. One kernel runs at a time in a process (the
// tests launch from one thread).
struct FaultCatcher {
    std::atomic<long> tid{0};              // the thread whose fiber is running a kernel now, or 0
    ucontext_t* resume = nullptr;          // that thread's scheduler context
    void* volatile address = nullptr;      // the faulting address
    volatile sig_atomic_t faulted = 0;
    struct sigaction previous {};
};

inline FaultCatcher& fault_catcher() {
    static auto* f = new FaultCatcher();
    return *f;
}

inline long current_tid() {
    static thread_local const long tid = static_cast<long>(syscall(SYS_gettid));
    return tid;
}

inline void on_fault(int sig, siginfo_t* info, void*) {
    FaultCatcher& f = fault_catcher();
    if (f.tid.load() != 0 && f.tid.load() == static_cast<long>(syscall(SYS_gettid))) {
        f.tid.store(0);
        f.address = info->si_addr;
        f.faulted = 1;
        setcontext(f.resume);  // the scheduler, on its own stack; restores its signal mask (SIGSEGV unblocked)
    }
    // not an emulated kernel's fault: the previous handler goes back, and the access faults again into it
    sigaction(sig, &f.previous, nullptr);
}

// Called at every launch, so a handler installed since (faulthandler) does not take the kernels' faults.
inline void ensure_fault_handler() {
    struct sigaction current {};
    sigaction(SIGSEGV, nullptr, &current);
    if ((current.sa_flags & SA_SIGINFO) && current.sa_sigaction == &on_fault) return;
    struct sigaction mine {};
    mine.sa_sigaction = &on_fault;
    mine.sa_flags = SA_SIGINFO;
    sigemptyset(&mine.sa_mask);
    sigaction(SIGSEGV, &mine, &fault_catcher().previous);
}

}  // namespace dora_ext::emu
