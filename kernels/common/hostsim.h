// hostsim: the CUDA built-ins our kernels use, emulated on the CPU so that g++ compiles the same
// kernels/*.cu files nvcc compiles (design: docs/ARCHITECTURE.md §4).
//
// Execution model
// - Blocks of a launch run one after another on the calling OS thread; every CUDA thread of a
//   block is a fiber with its own stack. A fiber runs until it reaches a barrier or a warp
//   collective, then yields to the block scheduler, which resumes only fibers whose barrier
//   has released. Launches on different OS threads are independent: all emulator state and
//   `__shared__` variables are thread_local, so parallel tests need no global lock.
// - Thread order inside a block is forward, reversed (HOSTSIM_REVERSE=1) or a permutation
//   drawn from HOSTSIM_SEED; a correct kernel gives the same result in every order.
// - __syncthreads: releases when every live thread arrived; exited threads drop out. Two
//   threads arriving in one phase from different source lines is a divergent barrier: an error
//   that names both lines.
// - Warp collectives (shuffles, votes, __syncwarp, mma.sync, ldmatrix): exchange through a
//   double-buffered per-warp slot array and a warp barrier. The mask must cover the whole warp
//   (collectives on full warps only); a lane that exits while its warp needs it is an error.
// - cp.async: copies are queued per thread, their destination poisoned at issue; wait_group
//   performs them. Reading before the wait sees poison; exiting with copies pending is an error.
// - Dynamic shared memory is filled with 0xFF (NaN as f32 and bf16) at the start of every block;
//   its start is 1024-byte aligned and is shared address 0 for mbarriers and wgmma descriptors.
// - Hopper (kernels/common/hopper_sm90a.cuh): warpgroup instructions (wgmma.*) are collectives
//   of the warpgroup's 128 threads. wgmma.mma_async decodes its matrix descriptors and swizzles
//   exactly, computes at issue and lands its result at wait_group; until then the accumulator
//   registers read NaN. mbarrier is a state machine (phase, pending arrivals, transaction
//   bytes); try_wait.parity suspends the fiber until the phase completes, and a wait that
//   cannot complete is a deadlock report naming its source line.
// - Numerics proven against an H200 (tests/fixtures/truth-sm90.safetensors, `verify --truth`):
//   mma.sync accumulates with the tensor core's truncating alignment (tensor_core_sum), and
//   fmaxf/fminf order -0 below +0.
// - Errors (divergent barrier, deadlock, partial-warp collective, bad launch shape...) stop the
//   launch: the launcher returns non-zero and hostsim_last_error() says what happened.
#pragma once

#include <float.h>
#include <math.h>
#include <stdint.h>
#include <string.h>

#include <algorithm>
#include <cstdarg>
#include <cstdio>
#include <cmath>
#include <cstdlib>
#include <numeric>
#include <source_location>
#include <string>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

#include <sys/mman.h>
#if !defined(__x86_64__)
#include <ucontext.h>
#endif

// ---------------------------------------------------------------------------------------------
// Keywords and vector types
// ---------------------------------------------------------------------------------------------
#define __global__
#define __device__
#define __host__
#define __constant__
#define __forceinline__ inline __attribute__((always_inline))
#define __noinline__ __attribute__((noinline))
#define __launch_bounds__(...)
#define __align__(n) __attribute__((aligned(n)))
#define __restrict__ __restrict
// Blocks of one launch run one at a time on one OS thread: a thread_local static is exactly
// one block's shared memory.
#define __shared__ static thread_local

struct uint3 { unsigned x, y, z; };
struct dim3 { unsigned x, y, z; };
struct __align__(8) int2 { int x, y; };
struct __align__(8) uint2 { unsigned x, y; };
struct __align__(8) float2 { float x, y; };
struct __align__(16) int4 { int x, y, z, w; };
struct __align__(16) uint4 { unsigned x, y, z, w; };
struct __align__(16) float4 { float x, y, z, w; };
inline int2 make_int2(int x, int y) { return {x, y}; }
inline uint2 make_uint2(unsigned x, unsigned y) { return {x, y}; }
inline float2 make_float2(float x, float y) { return {x, y}; }
inline int4 make_int4(int x, int y, int z, int w) { return {x, y, z, w}; }
inline uint4 make_uint4(unsigned x, unsigned y, unsigned z, unsigned w) { return {x, y, z, w}; }
inline float4 make_float4(float x, float y, float z, float w) { return {x, y, z, w}; }

inline thread_local uint3 threadIdx, blockIdx;
inline thread_local dim3 blockDim, gridDim;

// ---------------------------------------------------------------------------------------------
// bf16 (bit-compatible with cuda_bf16.h: round to nearest even, NaN → 0x7FFF)
// ---------------------------------------------------------------------------------------------
namespace hostsim {
inline uint16_t f32_to_bf16_bits(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    if ((u & 0x7FFFFFFFu) > 0x7F800000u) return 0x7FFF;
    return (uint16_t)((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
}
inline float bf16_bits_to_f32(uint16_t b) {
    const uint32_t u = (uint32_t)b << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}
}  // namespace hostsim

struct __nv_bfloat16 {
    uint16_t __x;
    __nv_bfloat16() = default;
    __nv_bfloat16(float f) : __x(hostsim::f32_to_bf16_bits(f)) {}
    operator float() const { return hostsim::bf16_bits_to_f32(__x); }
};
struct __align__(4) __nv_bfloat162 { __nv_bfloat16 x, y; };
static_assert(std::is_trivially_default_constructible_v<__nv_bfloat16> && sizeof(__nv_bfloat16) == 2);

inline __nv_bfloat16 __float2bfloat16(float f) { return __nv_bfloat16(f); }
inline __nv_bfloat16 __float2bfloat16_rn(float f) { return __nv_bfloat16(f); }
inline float __bfloat162float(__nv_bfloat16 b) { return (float)b; }
inline __nv_bfloat162 __floats2bfloat162_rn(float a, float b) { return {__nv_bfloat16(a), __nv_bfloat16(b)}; }
inline __nv_bfloat162 __float22bfloat162_rn(float2 f) { return {__nv_bfloat16(f.x), __nv_bfloat16(f.y)}; }
inline float2 __bfloat1622float2(__nv_bfloat162 b) { return {(float)b.x, (float)b.y}; }
inline unsigned short __bfloat16_as_ushort(__nv_bfloat16 b) { return b.__x; }
inline float __low2float(__nv_bfloat162 b) { return (float)b.x; }
inline float __high2float(__nv_bfloat162 b) { return (float)b.y; }

// ---------------------------------------------------------------------------------------------
// Math: fast intrinsics map to the precise libm functions (tolerances must cover the GPU).
// ---------------------------------------------------------------------------------------------
inline float rsqrtf(float x) { return 1.0f / sqrtf(x); }
// cos(πx), sin(πx) with the exact reduction of x modulo 2 that CUDA's versions do.
inline double cospi(double x) { return cos(M_PI * remainder(x, 2.0)); }
inline double sinpi(double x) { return sin(M_PI * remainder(x, 2.0)); }
inline float __expf(float x) { return expf(x); }
inline float __logf(float x) { return logf(x); }
inline float __sinf(float x) { return sinf(x); }
inline float __cosf(float x) { return cosf(x); }
inline float __powf(float a, float b) { return powf(a, b); }
inline float __fdividef(float a, float b) { return a / b; }
inline float __frcp_rn(float x) { return 1.0f / x; }
// The GPU's fmaxf/fminf order -0 below +0 (libm may return either zero): measured on an H200
// (tests/fixtures/truth-sm90.safetensors, block_reduce_w32_order).
inline float device_fmaxf(float a, float b) {
    if (a == 0.0f && b == 0.0f) return signbit(a) ? b : a;
    return ::fmaxf(a, b);
}
inline float device_fminf(float a, float b) {
    if (a == 0.0f && b == 0.0f) return signbit(a) ? a : b;
    return ::fminf(a, b);
}
#define fmaxf device_fmaxf
#define fminf device_fminf
inline float __saturatef(float x) { return fminf(fmaxf(x, 0.0f), 1.0f); }
inline int min(int a, int b) { return a < b ? a : b; }
inline int max(int a, int b) { return a > b ? a : b; }
inline unsigned min(unsigned a, unsigned b) { return a < b ? a : b; }
inline unsigned max(unsigned a, unsigned b) { return a > b ? a : b; }
inline long long min(long long a, long long b) { return a < b ? a : b; }
inline long long max(long long a, long long b) { return a > b ? a : b; }
inline float min(float a, float b) { return fminf(a, b); }
inline float max(float a, float b) { return fmaxf(a, b); }
inline int __popc(unsigned x) { return __builtin_popcount(x); }
inline int __clz(int x) { return x == 0 ? 32 : __builtin_clz((unsigned)x); }
inline int __ffs(int x) { return __builtin_ffs(x); }
template <typename T> inline T __ldg(const T* p) { return *p; }

// Atomics: fibers of one launch never run concurrently, so a plain read-modify-write is atomic.
template <typename T> inline T atomicAdd(T* p, T v) { T old = *p; *p = old + v; return old; }
template <typename T> inline T atomicMax(T* p, T v) { T old = *p; *p = old > v ? old : v; return old; }
template <typename T> inline T atomicMin(T* p, T v) { T old = *p; *p = old < v ? old : v; return old; }
template <typename T> inline T atomicExch(T* p, T v) { T old = *p; *p = v; return old; }
template <typename T> inline T atomicCAS(T* p, T cmp, T v) { T old = *p; if (old == cmp) *p = v; return old; }
inline void __threadfence() {}
inline void __threadfence_block() {}

// ---------------------------------------------------------------------------------------------
// The emulator
// ---------------------------------------------------------------------------------------------
namespace hostsim {

struct LaunchCfg {
    uint32_t grid[3];
    uint32_t block[3];
    uint32_t smem_bytes;
};

constexpr size_t kStackBytes = 256 * 1024;  // per CUDA thread; a guard page sits below it
constexpr uint32_t kMaxThreads = 1024;
constexpr uint32_t kMaxSmem = 227 * 1024;

struct AsyncCopy {
    void* dst;
    const void* src;
    unsigned src_bytes;  // cp.async's src-size: bytes read from src; the rest of 16 are zeroed
};

enum class Wait : uint8_t { Running, Block, Warp, Group, MBarrier, Done };

struct Fiber {
    void* sp = nullptr;  // saved stack pointer while switched out
#if !defined(__x86_64__)
    ucontext_t uc;
#endif
    char* stack = nullptr;  // lowest usable byte (the guard page is below)
    uint3 tid{};
    unsigned linear = 0, warp = 0, lane = 0;
    Wait wait = Wait::Running;
    uint64_t wait_gen = 0;
    uint64_t collectives = 0;          // warp collectives executed: picks the exchange buffer
    std::vector<AsyncCopy> copies;     // issued, not yet performed
    std::vector<size_t> groups;        // end index in `copies` of each committed group
    bool wgmma_fenced = false;         // a wgmma.fence since the start or the last wait_group
    // The mbarrier try_wait this fiber is suspended in: barrier index, awaited parity, caller.
    unsigned wait_bar = 0, wait_parity = 0, wait_line = 0;
    const char* wait_file = nullptr;
};

struct Warp {
    uint32_t lanes = 0;  // lanes that exist in this warp
    uint32_t live = 0;   // lanes that have not exited
    unsigned arrived = 0;
    uint64_t gen = 0;
    const char* what = nullptr;  // the collective of the current phase
    uint64_t slots[2][32][8];    // double-buffered exchange, 64 bytes per lane
};

// One wgmma.mma_async in flight: its result, computed at issue, lands in the threads'
// accumulator registers at the wait_group that completes its group.
struct WgmmaOp {
    float* d[128];              // each thread's accumulator registers
    unsigned values;            // accumulator values per thread (N/2)
    std::vector<float> result;  // thread-major, `values` per thread
};

// A warpgroup: 4 consecutive warps (128 threads) executing the warpgroup-wide .sync.aligned
// instructions together.
struct WarpGroup {
    unsigned threads = 0, live = 0, arrived = 0;
    uint64_t gen = 0;
    const char* what = nullptr;   // the instruction of the current phase
    uint64_t slots[128][6];       // each thread's operands of the current instruction
    std::vector<WgmmaOp> ops;     // issued and not landed, oldest first
    std::vector<size_t> groups;   // end index in `ops` of each committed group
};

// An mbarrier object (PTX ISA, "mbarrier"): the current phase completes when its pending
// arrivals and its transaction count both reach zero; then the phase flips and the arrival
// count re-arms.
struct MBarrier {
    uint32_t addr;      // shared address of the 8-byte object
    uint32_t expected;  // arrivals per phase (the init count)
    uint32_t pending;   // arrivals the current phase still needs
    int64_t tx;         // transaction bytes expected and not yet complete (negative: ahead)
    uint64_t phases;    // completed phases; the current phase's parity is phases & 1
};

struct BlockBarrier {
    unsigned live = 0, arrived = 0;
    uint64_t gen = 0;
    const char* file = nullptr;  // where the current phase's first arrival came from
    unsigned line = 0;
};

struct State {
    std::vector<Fiber> fibers;
    std::vector<Warp> warps;
    std::vector<WarpGroup> warpgroups;
    std::vector<MBarrier> mbarriers;
    BlockBarrier barrier;
    Fiber* cur = nullptr;
    void* sched_sp = nullptr;
#if !defined(__x86_64__)
    ucontext_t sched_uc;
#endif
    void (*body)(void*) = nullptr;
    void* ctx = nullptr;
    unsigned char* smem = nullptr;
    size_t smem_cap = 0;
    uint32_t smem_bytes = 0;  // this launch's dynamic shared memory
    bool failed = false;
    std::string error;

    ~State() {
        for (Fiber& f : fibers)
            if (f.stack) munmap(f.stack - 4096, kStackBytes + 4096);
        free(smem);
    }
};

inline thread_local State* g_state = nullptr;
inline thread_local struct StateOwner {
    ~StateOwner() { delete g_state; }
} g_state_owner;

inline State& state() {
    if (!g_state) {
        (void)&g_state_owner;  // registers the destructor for this OS thread
        g_state = new State;
    }
    return *g_state;
}

inline std::string format(const char* fmt, ...) {
    char buf[1024];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(buf, sizeof buf, fmt, ap);
    va_end(ap);
    return buf;
}

// --- context switch ------------------------------------------------------------------------
#if defined(__x86_64__)
// hostsim_switch(save, load): saves the callee-saved registers on the current stack, stores
// the stack pointer in *save, switches to `load` and restores that context's registers.
// Weak, because this header is compiled into several objects of one archive.
extern "C" void hostsim_switch(void** save, void* load);
asm(R"(
    .text
    .weak hostsim_switch
    .type hostsim_switch, @function
hostsim_switch:
    pushq %rbp
    pushq %rbx
    pushq %r12
    pushq %r13
    pushq %r14
    pushq %r15
    movq %rsp, (%rdi)
    movq %rsi, %rsp
    popq %r15
    popq %r14
    popq %r13
    popq %r12
    popq %rbx
    popq %rbp
    ret
    .size hostsim_switch, .-hostsim_switch
)");
#endif

[[noreturn]] inline void fiber_main();

inline void to_scheduler(Fiber& f) {
    State& s = state();
#if defined(__x86_64__)
    hostsim_switch(&f.sp, s.sched_sp);
#else
    swapcontext(&f.uc, &s.sched_uc);
#endif
}

inline void to_fiber(Fiber& f) {
    State& s = state();
    s.cur = &f;
    threadIdx = f.tid;
#if defined(__x86_64__)
    hostsim_switch(&s.sched_sp, f.sp);
#else
    swapcontext(&s.sched_uc, &f.uc);
#endif
}

inline void prepare_stack(Fiber& f) {
#if defined(__x86_64__)
    // Entered through the `ret` of hostsim_switch: six zeroed registers, then fiber_main as
    // the return address, then a dummy return address so fiber_main starts with the stack
    // aligned as after a call (rsp ≡ 8 mod 16).
    void** sp = (void**)(f.stack + kStackBytes);
    *--sp = nullptr;
    *--sp = (void*)&fiber_main;
    for (int i = 0; i < 6; ++i) *--sp = nullptr;
    f.sp = sp;
#else
    getcontext(&f.uc);
    f.uc.uc_stack.ss_sp = f.stack;
    f.uc.uc_stack.ss_size = kStackBytes;
    f.uc.uc_link = nullptr;
    makecontext(&f.uc, (void (*)())fiber_main, 0);
#endif
}

// --- errors --------------------------------------------------------------------------------
inline std::string where(const Fiber& f) {
    return format("block (%u,%u,%u) thread (%u,%u,%u)", blockIdx.x, blockIdx.y, blockIdx.z, f.tid.x, f.tid.y,
                  f.tid.z);
}

// Stops the launch from inside a fiber: the scheduler never resumes it.
[[noreturn]] inline void fail(const std::string& msg) {
    State& s = state();
    s.failed = true;
    s.error = msg + " (" + where(*s.cur) + ")";
    to_scheduler(*s.cur);
    __builtin_unreachable();
}

// --- barriers ------------------------------------------------------------------------------
inline void yield_until(Fiber& f, Wait w, uint64_t gen) {
    f.wait = w;
    f.wait_gen = gen;
    to_scheduler(f);
}

inline void block_barrier(const std::source_location& loc) {
    State& s = state();
    Fiber& f = *s.cur;
    BlockBarrier& b = s.barrier;
    if (b.arrived == 0) {
        b.file = loc.file_name();
        b.line = loc.line();
    } else if (b.line != loc.line() || (b.file != loc.file_name() && strcmp(b.file, loc.file_name()) != 0)) {
        fail(format("__syncthreads: divergent barrier: %s:%u and %s:%u arrive in the same phase", b.file, b.line,
                    loc.file_name(), loc.line()));
    }
    if (++b.arrived == b.live) {
        b.arrived = 0;
        ++b.gen;
        return;
    }
    yield_until(f, Wait::Block, b.gen);
}

// Deposits this lane's 64-byte slot for a warp collective, waits for the whole warp, and
// returns the 32 slots of this collective.
template <typename Write>
inline uint64_t (*warp_exchange(uint32_t mask, const char* what, Write write))[8] {
    State& s = state();
    Fiber& f = *s.cur;
    Warp& w = s.warps[f.warp];
    if (mask != w.lanes)
        fail(format("%s: mask 0x%08x, but warp %u has lanes 0x%08x: hostsim emulates warp collectives on full "
                    "warps only",
                    what, mask, f.warp, w.lanes));
    if (w.live != w.lanes)
        fail(format("%s: lanes 0x%08x of warp %u have exited but are in the mask", what, w.lanes & ~w.live, f.warp));
    if (w.arrived == 0) {
        w.what = what;
    } else if (w.what != what && strcmp(w.what, what) != 0) {  // literals usually share an address
        fail(format("warp %u: divergent collectives: %s and %s in the same phase", f.warp, w.what, what));
    }
    uint64_t(*buf)[8] = w.slots[f.collectives & 1];
    ++f.collectives;
    write(buf[f.lane]);
    if (++w.arrived == (unsigned)__builtin_popcount(w.live)) {
        w.arrived = 0;
        ++w.gen;
    } else {
        yield_until(f, Wait::Warp, w.gen);
    }
    return buf;
}

inline unsigned lane_id() { return state().cur->lane; }

// --- cp.async ------------------------------------------------------------------------------
// A 16-byte cp.async (cp-size 16) reading `src_bytes` of them from src (PTX's src-size).
inline void cp_async_16(void* dst, const void* src, unsigned src_bytes) {
    if (((uintptr_t)dst | (uintptr_t)src) & 15)
        fail(format("cp.async: 16-byte copy with misaligned address (dst %p, src %p)", dst, src));
    if (src_bytes > 16) fail(format("cp.async: src-size %u exceeds the copy size 16", src_bytes));
    memset(dst, 0xFF, 16);  // poison: reading before the wait sees NaN, not stale data
    state().cur->copies.push_back({dst, src, src_bytes});
}

inline void cp_async_commit() {
    Fiber& f = *state().cur;
    f.groups.push_back(f.copies.size());
}

// Completes all but the `pending` most recent committed groups of this thread.
inline void cp_async_wait(size_t pending) {
    Fiber& f = *state().cur;
    if (f.groups.size() <= pending) return;
    const size_t done_groups = f.groups.size() - pending;
    const size_t n = f.groups[done_groups - 1];
    for (size_t i = 0; i < n; ++i) {
        const AsyncCopy& c = f.copies[i];
        memcpy(c.dst, c.src, c.src_bytes);
        memset((unsigned char*)c.dst + c.src_bytes, 0, 16 - c.src_bytes);
    }
    f.copies.erase(f.copies.begin(), f.copies.begin() + n);
    f.groups.erase(f.groups.begin(), f.groups.begin() + done_groups);
    for (size_t& g : f.groups) g -= n;
}

// --- tensor-core emulation (fragment layouts: PTX ISA, mma.m16n8k16 and ldmatrix) -----------
inline float bf16_half(uint64_t reg, unsigned half) { return bf16_bits_to_f32((uint16_t)(reg >> (16 * half))); }

// The tensor core's f32 accumulation of c + Σ_k a_k·b_k (k < 16), as measured on an H200
// (tests/fixtures/truth-sm90.safetensors, the mma_order_* and mma_chain cases): every term
// goes in at once. E is the largest exponent among the non-zero terms, where c counts its own
// and a product a·b counts e(a) + e(b) (its significand, in [1, 4), not normalised). Each term
// is truncated toward zero to a multiple of 2^(E−25), the truncated terms are summed exactly
// (in double: 17 terms below 2^(E+2) on a 2^(E−25) grid need at most 32 bits), and the sum is
// rounded toward zero to f32; an exact zero is +0. Non-finite terms follow IEEE addition.
inline float tensor_core_sum(float c, const float* a, const float* b, unsigned n) {
    double terms[17];
    int exps[17];
    unsigned count = 0;
    bool finite = std::isfinite(c);
    auto add = [&](double t, int e) {
        terms[count] = t;
        exps[count++] = e;
    };
    if (c != 0.0f) add(c, ilogbf(c));
    for (unsigned k = 0; k < n; ++k) {
        finite = finite && std::isfinite(a[k]) && std::isfinite(b[k]);
        if (a[k] != 0.0f && b[k] != 0.0f) add((double)a[k] * (double)b[k], ilogbf(a[k]) + ilogbf(b[k]));
    }
    if (!finite) {
        double s = c;
        for (unsigned k = 0; k < n; ++k) s += (double)a[k] * (double)b[k];
        return (float)s;
    }
    if (count == 0) return 0.0f;
    const int top = *std::max_element(exps, exps + count);
    double sum = 0.0;
    for (unsigned i = 0; i < count; ++i) sum += ldexp(trunc(ldexp(terms[i], 25 - top)), top - 25);
    if (sum == 0.0) return 0.0f;
    float r = (float)sum;
    if (std::isinf(r)) return copysignf(FLT_MAX, (float)sum);
    if (fabs((double)r) > fabs(sum)) r = nextafterf(r, 0.0f);
    return r;
}

// D = A·B + C for one m16n8k16 bf16 tile, with the tensor core's accumulation.
inline void mma_bf16_16816(float d[4], const uint32_t a[4], const uint32_t b[2], const float c[4]) {
    auto slots = warp_exchange(0xFFFFFFFFu, "mma.sync", [&](uint64_t* slot) {
        for (int i = 0; i < 4; ++i) slot[i] = a[i];
        slot[4] = b[0];
        slot[5] = b[1];
    });
    const unsigned lane = lane_id(), g = lane >> 2, t = lane & 3;
    const float c_in[4] = {c[0], c[1], c[2], c[3]};
    for (unsigned i = 0; i < 4; ++i) {
        const unsigned row = g + 8 * (i >> 1), col = 2 * t + (i & 1);
        float av[16], bv[16];
        for (unsigned k = 0; k < 16; ++k) {
            const unsigned kl = (k % 8) >> 1, hi = k >= 8, half = k & 1;
            av[k] = bf16_half(slots[4 * (row % 8) + kl][(row >= 8) + 2 * hi], half);
            bv[k] = bf16_half(slots[4 * col + kl][4 + hi], half);
        }
        d[i] = tensor_core_sum(c_in[i], av, bv, 16);
    }
}

// ldmatrix.m8n8.x{1,2,4}[.trans].b16: lanes 8j..8j+7 address the rows of matrix j.
inline void ldmatrix(uint32_t* r, const void* row, unsigned matrices, bool trans) {
    if ((uintptr_t)row & 15) fail(format("ldmatrix: row address %p is not 16-byte aligned", row));
    auto slots = warp_exchange(0xFFFFFFFFu, "ldmatrix", [&](uint64_t* slot) { slot[0] = (uintptr_t)row; });
    const unsigned lane = lane_id(), g = lane >> 2, t = lane & 3;
    auto at = [&](unsigned j, unsigned rr, unsigned cc) {
        return (uint32_t)((const uint16_t*)(uintptr_t)slots[8 * j + rr][0])[cc];
    };
    for (unsigned j = 0; j < matrices; ++j)
        r[j] = trans ? at(j, 2 * t, g) | at(j, 2 * t + 1, g) << 16 : at(j, g, 2 * t) | at(j, g, 2 * t + 1) << 16;
}

// --- Hopper: shared addresses, mbarrier, wgmma ----------------------------------------------
// The shared address of p: its offset in the block's dynamic shared memory, whose start is
// 1024-byte aligned like the hardware's swizzle patterns (so an offset's address bits are the
// ones the swizzles read). mbarriers and wgmma operands must live there.
inline uint32_t smem_address(const void* p, const char* what) {
    State& s = state();
    const uintptr_t a = (uintptr_t)p, base = (uintptr_t)s.smem;
    if (a < base || a >= base + s.smem_bytes)
        fail(format("%s: %p is not in the block's %u bytes of dynamic shared memory (hostsim keeps mbarriers and "
                    "wgmma operands there only)",
                    what, p, s.smem_bytes));
    return (uint32_t)(a - base);
}

inline unsigned mbarrier_index(const void* bar, const char* what) {
    State& s = state();
    const uint32_t a = smem_address(bar, what);
    for (unsigned i = 0; i < s.mbarriers.size(); ++i)
        if (s.mbarriers[i].addr == a) return i;
    fail(format("%s: no mbarrier was initialised at shared address %u", what, a));
}

inline void mbarrier_init(void* bar, uint32_t count) {
    State& s = state();
    const uint32_t a = smem_address(bar, "mbarrier.init");
    if (a & 7) fail(format("mbarrier.init: shared address %u is not 8-byte aligned", a));
    if (count == 0 || count >= (1u << 20)) fail(format("mbarrier.init: count %u outside 1..2^20-1", count));
    const MBarrier b{a, count, count, 0, 0};
    for (MBarrier& old : s.mbarriers)
        if (old.addr == a) {
            old = b;
            return;
        }
    s.mbarriers.push_back(b);
}

// Completes the current phase when nothing is outstanding. More transaction bytes than the
// phase expected is an error: on the GPU they would leak into the next phase.
inline void mbarrier_settle(MBarrier& b) {
    if (b.pending != 0) return;
    if (b.tx < 0)
        fail(format("mbarrier at shared address %u: %lld transaction bytes more than expect_tx announced completed "
                    "in phase %llu",
                    b.addr, (long long)-b.tx, (unsigned long long)b.phases));
    if (b.tx == 0) {
        ++b.phases;
        b.pending = b.expected;
    }
}

// mbarrier.arrive (tx_bytes 0) or mbarrier.arrive.expect_tx.
inline void mbarrier_arrive(void* bar, uint32_t tx_bytes) {
    MBarrier& b = state().mbarriers[mbarrier_index(bar, "mbarrier.arrive")];
    if (b.pending == 0)
        fail(format("mbarrier.arrive: the %u arrivals of phase %llu at shared address %u are complete (it waits for "
                    "%lld transaction bytes): one arrival too many",
                    b.expected, (unsigned long long)b.phases, b.addr, (long long)b.tx));
    b.tx += tx_bytes;
    --b.pending;
    mbarrier_settle(b);
}

// mbarrier.complete_tx: `bytes` of the phase's transactions arrived (what TMA signals).
inline void mbarrier_complete_tx(void* bar, uint32_t bytes) {
    MBarrier& b = state().mbarriers[mbarrier_index(bar, "mbarrier.complete_tx")];
    b.tx -= bytes;
    mbarrier_settle(b);
}

// mbarrier.try_wait.parity: true once the phase of that parity has completed, i.e. when the
// current phase's parity differs. A fiber yield point: until then the fiber is suspended and
// resumed only when the barrier moves on (so it returns true); if it never does, the block is
// reported as a deadlock naming the caller's line.
inline bool mbarrier_try_wait_parity(void* bar, uint32_t parity, const std::source_location& loc) {
    State& s = state();
    const unsigned i = mbarrier_index(bar, "mbarrier.try_wait.parity");
    if ((s.mbarriers[i].phases & 1) != (parity & 1)) return true;
    Fiber& f = *s.cur;
    f.wait_bar = i;
    f.wait_parity = parity & 1;
    f.wait_file = loc.file_name();
    f.wait_line = loc.line();
    yield_until(f, Wait::MBarrier, 0);
    return true;
}

// A warpgroup-wide .sync.aligned instruction: every thread deposits its operands with
// `write`; `last` runs once, in the thread whose arrival completes the set, before any of them
// goes on. All 4 warps of the warpgroup must execute it.
template <typename Write, typename Last> inline void warpgroup_collective(const char* what, Write write, Last last) {
    State& s = state();
    Fiber& f = *s.cur;
    const unsigned gi = f.linear / 128;
    WarpGroup& g = s.warpgroups[gi];
    if (g.threads != 128)
        fail(format("%s: warpgroup %u has %u threads; warpgroup instructions need all 128 (4 full warps)", what, gi,
                    g.threads));
    if (g.live != 128)
        fail(format("%s: %u threads of warpgroup %u have exited; all 4 warps must execute it", what, 128 - g.live,
                    gi));
    if (g.arrived == 0) {
        g.what = what;
    } else if (g.what != what && strcmp(g.what, what) != 0) {
        fail(format("warpgroup %u: divergent warpgroup instructions: %s and %s in the same phase", gi, g.what, what));
    }
    write(g.slots[f.linear % 128]);
    if (++g.arrived == 128) {
        g.arrived = 0;
        last(g);
        ++g.gen;
    } else {
        yield_until(f, Wait::Group, g.gen);
    }
}

// The 64-bit wgmma matrix descriptor (PTX ISA, "Matrix Descriptor Format"): start address,
// leading and stride dimension byte offsets, each stored as (bytes & 0x3FFFF) >> 4 in 14 bits
// (bits 0-13, 16-29, 32-45); the base offset (bits 49-51); the swizzle mode (bits 62-63:
// 0 none, 1 128-byte, 2 64-byte, 3 32-byte).
struct MatrixDesc {
    uint32_t start, lbo, sbo, base_offset;
    uint32_t swizzle;  // the swizzle span in bytes, 0 for none
};

inline MatrixDesc decode_matrix_desc(uint64_t d) {
    static const uint32_t spans[4] = {0, 128, 64, 32};
    return {(uint32_t)(d & 0x3FFF) << 4, (uint32_t)(d >> 16 & 0x3FFF) << 4, (uint32_t)(d >> 32 & 0x3FFF) << 4,
            (uint32_t)(d >> 49 & 7), spans[d >> 62]};
}

// The shared address of element (mn, k), k < 16, of a 16-bit wgmma operand (A: mn = m; B:
// mn = n) in the canonical layouts (PTX ISA, "Shared Memory Matrix Layout" and "Strides").
// Core matrices are 8 rows of 16 bytes. K-major without swizzle: rows along mn 16 bytes apart,
// the two k-halves LBO apart, 8-row groups along mn SBO apart. K-major swizzled: rows of
// `span` bytes along mn, the 16 k contiguous, 8-row groups SBO apart (LBO unused).
// MN-major without swizzle: 8 contiguous mn per 16-byte row, rows along k, mn groups SBO
// apart, k groups of 8 LBO apart. MN-major swizzled: span/2 contiguous mn per row, rows along
// k `span` bytes apart, 8-row k groups SBO apart, span-wide mn groups LBO apart. A swizzle
// then XORs the 16-byte chunk (address bits 4..) with the row within its pattern (bits 7..,
// counted from the pattern start the base offset names), on the absolute address.
inline uint32_t operand_address(const MatrixDesc& m, bool mn_major, unsigned mn, unsigned k) {
    const uint32_t w = m.swizzle;
    uint32_t off;
    if (!mn_major)
        off = w ? (mn % 8) * w + (mn / 8) * m.sbo + k * 2 : (mn % 8) * 16 + (mn / 8) * m.sbo + (k % 8) * 2 + (k / 8) * m.lbo;
    else
        off = w ? (mn % (w / 2)) * 2 + (mn / (w / 2)) * m.lbo + (k % 8) * w + (k / 8) * m.sbo
                : (mn % 8) * 2 + (mn / 8) * m.sbo + (k % 8) * 16 + (k / 8) * m.lbo;
    const uint32_t a = m.start + off;
    return w ? a ^ ((((a >> 7) - m.base_offset) & (w / 16 - 1)) << 4) : a;
}

// Gathers a 16-bit operand (rows × 16, row-major as floats) through its descriptor.
inline void load_operand(float* out, uint64_t desc, bool mn_major, unsigned rows, const char* which) {
    State& s = state();
    const MatrixDesc m = decode_matrix_desc(desc);
    for (unsigned r = 0; r < rows; ++r)
        for (unsigned k = 0; k < 16; ++k) {
            const uint32_t a = operand_address(m, mn_major, r, k);
            if (a + 2 > s.smem_bytes)
                fail(format("wgmma.mma_async: operand %s element (%u, %u) at shared address %u lies outside the %u "
                            "bytes of dynamic shared memory",
                            which, r, k, a, s.smem_bytes));
            uint16_t bits;
            memcpy(&bits, s.smem + a, 2);
            out[r * 16 + k] = bf16_bits_to_f32(bits);
        }
}

// The f32 accumulator fragment of wgmma m64nNk16 (PTX ISA, "Matrix Fragments for
// wgmma.mma_async.m64nNk16"): value v of warpgroup thread t is D[row][col] with
// row = 16·(t/32) + (t%32)/4 + 8·((v/2)%2), col = 8·(v/4) + 2·(t%4) + v%2. The 16-bit A
// fragment in registers is the same pattern over 64×16: element i (register i/2, half i%2).
inline unsigned frag_row(unsigned t, unsigned v) { return 16 * (t / 32) + (t % 32) / 4 + 8 * ((v / 2) % 2); }
inline unsigned frag_col(unsigned t, unsigned v) { return 8 * (v / 4) + 2 * (t % 4) + v % 2; }

inline void wgmma_fence() {
    warpgroup_collective("wgmma.fence", [](uint64_t*) {}, [](WarpGroup&) {});
    state().cur->wgmma_fenced = true;
}

// wgmma.mma_async m64nNk16 f32 += bf16·bf16: D = A·B (+ D when `accumulate`), A 64×16 from
// `a_regs` (the fragment above) or through `desc_a`, B 16×N through `desc_b` (stored N×K:
// K-major unless trans_b). Computed at issue with the tensor core's accumulation; the result
// lands at the wait_group that completes it, and until then the accumulator registers hold
// NaN. A wgmma on an accumulator still in flight chains on its pending value.
inline void wgmma(float* d, unsigned n, const uint32_t* a_regs, uint64_t desc_a, uint64_t desc_b, bool trans_a,
                  bool trans_b, bool accumulate) {
    if (!state().cur->wgmma_fenced)
        fail("wgmma.mma_async: no wgmma.fence since the warpgroup started or last waited: the registers it reads "
             "are not ordered before it");
    const uint64_t flags = n | (uint64_t)trans_a << 16 | (uint64_t)trans_b << 17 | (uint64_t)accumulate << 18 |
                           (uint64_t)(a_regs != nullptr) << 19;
    warpgroup_collective(
        "wgmma.mma_async",
        [&](uint64_t* slot) {
            slot[0] = (uintptr_t)d;
            slot[1] = a_regs ? 0 : desc_a;
            slot[2] = desc_b;
            slot[3] = flags;
            if (a_regs) {
                slot[4] = a_regs[0] | (uint64_t)a_regs[1] << 32;
                slot[5] = a_regs[2] | (uint64_t)a_regs[3] << 32;
            }
        },
        [&](WarpGroup& g) {
            for (unsigned t = 1; t < 128; ++t)
                if (memcmp(&g.slots[t][1], &g.slots[0][1], 3 * sizeof(uint64_t)) != 0)
                    fail(format("wgmma.mma_async: warpgroup threads 0 and %u pass different descriptors or shapes", t));
            float a[64 * 16], bt[256 * 16];
            if (a_regs) {
                for (unsigned t = 0; t < 128; ++t)
                    for (unsigned i = 0; i < 8; ++i)
                        a[frag_row(t, i) * 16 + frag_col(t, i)] =
                            bf16_half(g.slots[t][4 + i / 4] >> (32 * ((i / 2) % 2)), i % 2);
            } else {
                load_operand(a, desc_a, trans_a, 64, "A");
            }
            load_operand(bt, desc_b, trans_b, n, "B");
            WgmmaOp op{{}, n / 2, std::vector<float>(64 * n)};
            for (unsigned t = 0; t < 128; ++t) {
                float* dt = (float*)(uintptr_t)g.slots[t][0];
                op.d[t] = dt;
                const float* c = dt;
                for (const WgmmaOp& prev : g.ops)
                    if (prev.d[t] == dt) c = &prev.result[t * op.values];
                for (unsigned v = 0; v < op.values; ++v)
                    op.result[t * op.values + v] = tensor_core_sum(accumulate ? c[v] : 0.0f, &a[frag_row(t, v) * 16],
                                                                   &bt[frag_col(t, v) * 16], 16);
            }
            for (unsigned t = 0; t < 128; ++t) std::fill(op.d[t], op.d[t] + op.values, NAN);
            g.ops.push_back(std::move(op));
        });
}

inline void wgmma_commit() {
    warpgroup_collective("wgmma.commit_group", [](uint64_t*) {}, [](WarpGroup& g) { g.groups.push_back(g.ops.size()); });
}

// wgmma.wait_group N: the results of all but the N most recent committed groups land.
inline void wgmma_wait(size_t pending) {
    warpgroup_collective("wgmma.wait_group", [](uint64_t*) {}, [&](WarpGroup& g) {
        if (g.groups.size() <= pending) return;
        const size_t done_groups = g.groups.size() - pending, n = g.groups[done_groups - 1];
        for (size_t i = 0; i < n; ++i)
            for (unsigned t = 0; t < 128; ++t)
                memcpy(g.ops[i].d[t], &g.ops[i].result[t * g.ops[i].values], g.ops[i].values * sizeof(float));
        g.ops.erase(g.ops.begin(), g.ops.begin() + n);
        g.groups.erase(g.groups.begin(), g.groups.begin() + done_groups);
        for (size_t& e : g.groups) e -= n;
        // An accumulator that an older group just wrote but a newer wgmma still targets stays NaN.
        for (const WgmmaOp& op : g.ops)
            for (unsigned t = 0; t < 128; ++t) std::fill(op.d[t], op.d[t] + op.values, NAN);
    });
    state().cur->wgmma_fenced = false;
}

// --- scheduling ----------------------------------------------------------------------------
inline void thread_exit() {
    State& s = state();
    Fiber& f = *s.cur;
    if (!f.copies.empty()) fail(format("thread exited with %zu cp.async copies never waited for", f.copies.size()));
    WarpGroup& g = s.warpgroups[f.linear / 128];
    if (!g.ops.empty())
        fail(format("thread exited with %zu wgmma.mma_async of its warpgroup never waited for (wgmma.wait_group)",
                    g.ops.size()));
    if (g.arrived > 0)
        fail(format("thread exited while warpgroup %u waits for it in %s", f.linear / 128, g.what));
    --g.live;
    f.wait = Wait::Done;
    Warp& w = s.warps[f.warp];
    w.live &= ~(1u << f.lane);
    if (w.arrived > 0)
        fail(format("lane %u exited while warp %u waits for it in %s", f.lane, f.warp, w.what));
    BlockBarrier& b = s.barrier;
    --b.live;
    if (b.arrived > 0 && b.arrived == b.live) {
        b.arrived = 0;
        ++b.gen;
    }
    to_scheduler(f);
    __builtin_unreachable();
}

[[noreturn]] inline void fiber_main() {
    State& s = state();
    s.body(s.ctx);
    thread_exit();
    __builtin_unreachable();
}

inline bool env_flag(const char* name) {
    const char* v = getenv(name);
    return v && *v && strcmp(v, "0") != 0;
}

inline uint64_t splitmix(uint64_t& x) {
    uint64_t z = (x += 0x9E3779B97F4A7C15ull);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}

inline bool ensure_fibers(State& s, size_t n) {
    while (s.fibers.size() < n) {
        void* m = mmap(nullptr, kStackBytes + 4096, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE,
                       -1, 0);
        if (m == MAP_FAILED) return false;
        mprotect(m, 4096, PROT_NONE);  // guard page: a stack overflow faults instead of corrupting
        s.fibers.emplace_back();
        s.fibers.back().stack = (char*)m + 4096;
    }
    return true;
}

inline std::string deadlock_report(State& s, unsigned n) {
    unsigned at_block = 0, at_warp = 0, at_group = 0, done = 0;
    const char *what = "", *group_what = "";
    const Fiber* mbar = nullptr;
    unsigned at_mbar = 0;
    for (unsigned i = 0; i < n; ++i) {
        const Fiber& f = s.fibers[i];
        at_block += f.wait == Wait::Block;
        done += f.wait == Wait::Done;
        if (f.wait == Wait::Warp) {
            ++at_warp;
            what = s.warps[f.warp].what;
        }
        if (f.wait == Wait::Group) {
            ++at_group;
            group_what = s.warpgroups[f.linear / 128].what;
        }
        if (f.wait == Wait::MBarrier && at_mbar++ == 0) mbar = &f;
    }
    std::string r = format("deadlock in block (%u,%u,%u): %u threads wait at __syncthreads (%s:%u), %u in warp "
                           "collectives (%s), %u in warpgroup instructions (%s), %u exited",
                           blockIdx.x, blockIdx.y, blockIdx.z, at_block, s.barrier.file ? s.barrier.file : "?",
                           s.barrier.line, at_warp, what, at_group, group_what, done);
    if (mbar) {
        const MBarrier& b = s.mbarriers[mbar->wait_bar];
        r += format("; %u threads wait in mbarrier.try_wait.parity, e.g. thread (%u,%u,%u) at %s:%u for parity %u of "
                    "the mbarrier at shared address %u, which has completed %llu phases and whose current phase "
                    "misses %u of %u arrivals and %lld transaction bytes",
                    at_mbar, mbar->tid.x, mbar->tid.y, mbar->tid.z, mbar->wait_file, mbar->wait_line,
                    mbar->wait_parity, b.addr, (unsigned long long)b.phases, b.pending, b.expected, (long long)b.tx);
    }
    return r;
}

inline bool run_block(State& s, unsigned n, const std::vector<unsigned>& order) {
    const unsigned bx = blockDim.x, by = blockDim.y;
    s.barrier = BlockBarrier{};
    s.barrier.live = n;
    const unsigned nwarps = (n + 31) / 32;
    s.warps.resize(nwarps);
    for (unsigned w = 0; w < nwarps; ++w) {
        const unsigned lanes = std::min(32u, n - 32 * w);
        s.warps[w].lanes = s.warps[w].live = lanes == 32 ? 0xFFFFFFFFu : (1u << lanes) - 1;
        s.warps[w].arrived = 0;
        s.warps[w].gen = 0;
    }
    s.warpgroups.resize((n + 127) / 128);
    for (unsigned g = 0; g < s.warpgroups.size(); ++g) {
        WarpGroup& wg = s.warpgroups[g];
        wg.threads = wg.live = std::min(128u, n - 128 * g);
        wg.arrived = 0;
        wg.gen = 0;
        wg.ops.clear();
        wg.groups.clear();
    }
    s.mbarriers.clear();
    for (unsigned i = 0; i < n; ++i) {
        Fiber& f = s.fibers[i];
        f.tid = {i % bx, (i / bx) % by, i / (bx * by)};
        f.linear = i;
        f.warp = i / 32;
        f.lane = i % 32;
        f.wait = Wait::Running;
        f.collectives = 0;
        f.copies.clear();
        f.groups.clear();
        f.wgmma_fenced = false;
        prepare_stack(f);
    }
    if (s.smem_cap) memset(s.smem, 0xFF, s.smem_cap);
    for (;;) {
        bool progress = false, all_done = true;
        for (unsigned i : order) {
            Fiber& f = s.fibers[i];
            if (f.wait == Wait::Done) continue;
            all_done = false;
            if (f.wait == Wait::Block && s.barrier.gen == f.wait_gen) continue;
            if (f.wait == Wait::Warp && s.warps[f.warp].gen == f.wait_gen) continue;
            if (f.wait == Wait::Group && s.warpgroups[f.linear / 128].gen == f.wait_gen) continue;
            if (f.wait == Wait::MBarrier && (s.mbarriers[f.wait_bar].phases & 1) == f.wait_parity) continue;
            f.wait = Wait::Running;
            to_fiber(f);
            progress = true;
            if (s.failed) return false;
        }
        if (all_done) return true;
        if (!progress) {
            s.failed = true;
            s.error = deadlock_report(s, n);
            return false;
        }
    }
}

inline int run(const LaunchCfg* cfg, void (*body)(void*), void* ctx) {
    State& s = state();
    s.failed = false;
    s.error.clear();
    const uint32_t* g = cfg->grid;
    const uint32_t* b = cfg->block;
    const uint64_t threads = (uint64_t)b[0] * b[1] * b[2];
    if (!g[0] || !g[1] || !g[2] || !threads || threads > kMaxThreads || b[2] > 64 || g[1] > 65535 ||
        g[2] > 65535 || g[0] > 0x7FFFFFFFu) {
        s.error = format("invalid launch shape: grid (%u,%u,%u), block (%u,%u,%u)", g[0], g[1], g[2], b[0], b[1], b[2]);
        return 1;
    }
    if (cfg->smem_bytes > kMaxSmem) {
        s.error = format("%u bytes of dynamic shared memory requested; at most %u exist", cfg->smem_bytes, kMaxSmem);
        return 1;
    }
    const unsigned n = (unsigned)threads;
    if (!ensure_fibers(s, n)) {
        s.error = "could not allocate fiber stacks";
        return 1;
    }
    if (s.smem_cap < cfg->smem_bytes) {
        free(s.smem);
        // 1024-byte aligned, like the hardware's swizzle patterns (see smem_address).
        s.smem_cap = (cfg->smem_bytes + 1023) / 1024 * 1024;
        s.smem = (unsigned char*)aligned_alloc(1024, s.smem_cap);
    }
    s.smem_bytes = cfg->smem_bytes;
    s.body = body;
    s.ctx = ctx;
    gridDim = {g[0], g[1], g[2]};
    blockDim = {b[0], b[1], b[2]};

    std::vector<unsigned> order(n);
    std::iota(order.begin(), order.end(), 0u);
    const bool reverse = env_flag("HOSTSIM_REVERSE");
    const char* seed_env = getenv("HOSTSIM_SEED");
    uint64_t seed = seed_env ? strtoull(seed_env, nullptr, 10) : 0;
    if (reverse) std::reverse(order.begin(), order.end());

    const uint64_t blocks = (uint64_t)g[0] * g[1] * g[2];
    for (uint64_t k = 0; k < blocks; ++k) {
        const uint64_t bi = reverse ? blocks - 1 - k : k;
        blockIdx = {(unsigned)(bi % g[0]), (unsigned)(bi / g[0] % g[1]), (unsigned)(bi / ((uint64_t)g[0] * g[1]))};
        if (seed_env)
            for (unsigned i = n; i > 1; --i) std::swap(order[i - 1], order[splitmix(seed) % i]);
        if (!run_block(s, n, order)) return 1;
    }
    return 0;
}

// Unpacks the cuLaunchKernel-style argument array into a typed call of `kernel`.
template <typename... A, size_t... I>
inline int launch_with(void (*kernel)(A...), const LaunchCfg* cfg, void** args, std::index_sequence<I...>) {
    using Args = std::tuple<std::remove_cv_t<A>...>;
    Args values{*static_cast<std::remove_cv_t<A>*>(args[I])...};
    struct Ctx {
        void (*kernel)(A...);
        Args* values;
    } ctx{kernel, &values};
    return run(cfg, [](void* p) { std::apply(static_cast<Ctx*>(p)->kernel, *static_cast<Ctx*>(p)->values); }, &ctx);
}

template <typename... A> inline int launch(void (*kernel)(A...), const LaunchCfg* cfg, void** args) {
    return launch_with(kernel, cfg, args, std::index_sequence_for<A...>{});
}

}  // namespace hostsim

extern "C" __attribute__((weak)) const char* hostsim_last_error() { return hostsim::state().error.c_str(); }

#define HS_EXPORT(kernel)                                                                     \
    extern "C" int hostsim_launch_##kernel(const hostsim::LaunchCfg* cfg, void** args) { \
        return hostsim::launch(kernel, cfg, args);                                            \
    }

template <typename T> inline T* dynamic_smem() { return reinterpret_cast<T*>(hostsim::state().smem); }

// ---------------------------------------------------------------------------------------------
// Barriers, shuffles and votes
// ---------------------------------------------------------------------------------------------
inline void __syncthreads(const std::source_location loc = std::source_location::current()) {
    hostsim::block_barrier(loc);
}

inline void __syncwarp(unsigned mask = 0xFFFFFFFFu) {
    hostsim::warp_exchange(mask, "__syncwarp", [](uint64_t*) {});
}

namespace hostsim {
template <typename T> inline uint64_t to_bits(T v) {
    static_assert(sizeof(T) <= 8 && std::is_trivially_copyable_v<T>);
    uint64_t u = 0;
    memcpy(&u, &v, sizeof(T));
    return u;
}
template <typename T> inline T from_bits(uint64_t u) {
    T v;
    memcpy(&v, &u, sizeof(T));
    return v;
}
// One shuffle: every lane deposits v and reads the value of lane src(lane) of its segment.
template <typename T, typename Src> inline T shuffle(unsigned mask, T v, int width, const char* what, Src src) {
    auto slots = warp_exchange(mask, what, [&](uint64_t* slot) { slot[0] = to_bits(v); });
    const int lane = (int)lane_id(), base = lane & ~(width - 1);
    const int from = src(lane - base);
    return from < 0 ? v : from_bits<T>(slots[base + from][0]);
}
}  // namespace hostsim

template <typename T> inline T __shfl_sync(unsigned mask, T v, int src, int width = 32) {
    return hostsim::shuffle(mask, v, width, "__shfl_sync", [&](int) { return src & (width - 1); });
}
template <typename T> inline T __shfl_xor_sync(unsigned mask, T v, int m, int width = 32) {
    return hostsim::shuffle(mask, v, width, "__shfl_xor_sync", [&](int l) { return (l ^ m) < width ? l ^ m : l; });
}
template <typename T> inline T __shfl_up_sync(unsigned mask, T v, unsigned d, int width = 32) {
    return hostsim::shuffle(mask, v, width, "__shfl_up_sync", [&](int l) { return l - (int)d >= 0 ? l - (int)d : -1; });
}
template <typename T> inline T __shfl_down_sync(unsigned mask, T v, unsigned d, int width = 32) {
    return hostsim::shuffle(mask, v, width, "__shfl_down_sync",
                            [&](int l) { return l + (int)d < width ? l + (int)d : -1; });
}
inline unsigned __ballot_sync(unsigned mask, int pred) {
    auto slots = hostsim::warp_exchange(mask, "vote", [&](uint64_t* slot) { slot[0] = pred != 0; });
    unsigned bits = 0;
    for (unsigned l = 0; l < 32; ++l)
        if ((mask >> l) & 1) bits |= (unsigned)slots[l][0] << l;
    return bits;
}
inline int __any_sync(unsigned mask, int pred) { return __ballot_sync(mask, pred) != 0; }
inline int __all_sync(unsigned mask, int pred) { return __ballot_sync(mask, pred) == mask; }
inline unsigned __activemask() { return hostsim::state().warps[hostsim::state().cur->warp].live; }
