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
// - TMA (cp.async.bulk.tensor) reads tensor maps our host encoder wrote for the emulator
//   (src/runtime/tensor_map.rs): loads zero-fill out-of-range elements, place the box with the
//   same swizzle function wgmma's descriptors decode, poison the destination at issue and land
//   when a thread waiting on their mbarrier runs (completing the box's bytes there, so a wrong
//   expect_tx is reported); stores write the in-range elements at cp.async.bulk.wait_group.
// - Async proxy: wgmma operands and TMA store sources must not have been written by ordinary
//   stores since the last fence.proxy.async (a shadow copy of shared memory as the async proxy
//   sees it); such a read is an error naming the source line.
// - Named barriers (bar.sync/bar.arrive id, count) and setmaxnreg (a warpgroup collective,
//   uniform count) are checked as the PTX ISA states them.
// - Numerics proven against an H200 (tests/fixtures/truth-sm90.safetensors, `verify --truth`):
//   mma.sync accumulates with the tensor core's truncating alignment (tensor_core_sum), and
//   fmaxf/fminf order -0 below +0.
// - Errors (divergent barrier, deadlock, partial-warp collective, bad launch shape...) stop the
//   launch: the launcher returns non-zero and hostsim_last_error() says what happened.
#pragma once

#include <float.h>
#include <math.h>
#include <stddef.h>
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

#include <dlfcn.h>
#include <elf.h>
#include <fcntl.h>
#include <link.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>
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
#define __grid_constant__
// Blocks of one launch run one at a time on one OS thread: a thread_local static is exactly
// one block's shared memory.
#define __shared__ static thread_local
// Emulator code that -fsanitize=thread must not instrument (see the race check): the hooks,
// the emulator's own shared-memory bookkeeping, and its hot paths (scheduling, exchanges, the
// tensor-core arithmetic), which touch no shared memory on a thread's behalf.
#define HS_UNCHECKED __attribute__((no_sanitize_thread))

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

// The driver's opaque 128-byte tensor map; under the emulator it holds hostsim::TensorMapDesc.
struct CUtensorMap {
    unsigned long long opaque[16];
};
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

enum class Wait : uint8_t { Running, Block, Warp, Group, MBarrier, Named, Done };

// A cp.async.bulk.tensor store in flight: the global bytes it writes (taken from shared memory
// at issue) and a copy of its shared-memory source, which must not change before the wait.
struct BulkStore {
    std::vector<std::pair<unsigned char*, uint64_t>> elements;  // destination, element bits
    unsigned elem_bytes;
    uint32_t src_lo;
    std::vector<unsigned char> src;
};

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
    std::vector<BulkStore> bulk;       // cp.async.bulk stores issued, not yet waited for
    std::vector<size_t> bulk_groups;   // end index in `bulk` of each committed bulk group
    // The mbarrier try_wait this fiber is suspended in: barrier index, awaited parity, caller.
    // Also the named barrier (bar.sync) it waits at.
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

// A cp.async.bulk.tensor load in flight: the bytes it lands ([lo, lo + bytes.size()) of shared
// memory, where mask is set) and the mbarrier whose transaction count it completes.
struct TmaLoad {
    unsigned bar;
    uint32_t lo;
    uint32_t tx;
    std::vector<unsigned char> bytes, mask;
};

// A named barrier (bar.sync / bar.arrive id, count): releases when `count` threads arrived.
struct NamedBarrier {
    unsigned count = 0, arrived = 0;
    uint64_t gen = 0;
    const char* file = nullptr;  // the current phase's first arrival
    unsigned line = 0;
};

struct BlockBarrier {
    unsigned live = 0, arrived = 0;
    uint64_t gen = 0;
    const char* file = nullptr;  // where the current phase's first arrival came from
    unsigned line = 0;
};

// The race check's shadow state (see "shared-memory race check" below).
struct RaceShadow {
    uint32_t w_epoch, w_warp_epoch, r_epoch, r_warp_epoch;
    uint16_t w_tid, r_tid;
    uint8_t r_many;  // 0: one reader this epoch; 1: several, one warp; 2: several warps
    const void* w_pc;
};

struct RaceCheck {
    int forced = -1;       // hostsim_set_race_check on this OS thread (-1: HOSTSIM_RACECHECK decides)
    bool enabled = false;  // this launch checks: asked for, and the kernels instrumented
    uint32_t epoch = 0;    // block epoch, never reset: shadow entries of older epochs are stale
    std::vector<uint32_t> warp_epoch;
    std::vector<RaceShadow> smem, tls;
    std::vector<uint8_t> tls_shared;  // per byte of the TLS block: part of a __shared__ variable
    uintptr_t tls_lo = 0;
    size_t tls_size = 0;
    bool tls_searched = false;
};

struct State {
    std::vector<Fiber> fibers;
    std::vector<Warp> warps;
    std::vector<WarpGroup> warpgroups;
    std::vector<MBarrier> mbarriers;
    std::vector<TmaLoad> tma_loads;  // issued, not landed (they land when their mbarrier is waited on)
    NamedBarrier named[16];
    BlockBarrier barrier;
    Fiber* cur = nullptr;
    void* sched_sp = nullptr;
#if !defined(__x86_64__)
    ucontext_t sched_uc;
#endif
    void (*body)(void*) = nullptr;
    void* ctx = nullptr;
    unsigned char* smem = nullptr;
    // Dynamic shared memory as the async proxy (wgmma, TMA) sees it: the bytes as of the last
    // fence.proxy.async, plus what TMA loads landed. Filled lazily (async_valid) on a block's
    // first Hopper instruction; until a fence it is the block's start state (all 0xFF).
    unsigned char* async_view = nullptr;
    bool async_valid = false;
    size_t smem_cap = 0;
    uint32_t smem_bytes = 0;  // this launch's dynamic shared memory
    bool failed = false;
    std::string error;
    RaceCheck race;

    ~State() {
        for (Fiber& f : fibers)
            if (f.stack) munmap(f.stack - 4096, kStackBytes + 4096);
        free(smem);
        free(async_view);
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

// True while a CUDA thread of a race-checked launch runs (the race hooks' fast path).
inline thread_local bool g_race_active = false;

// Unchecked: it sets g_race_active itself.
HS_UNCHECKED inline void to_fiber(Fiber& f) {
    State& s = state();
    s.cur = &f;
    threadIdx = f.tid;
    g_race_active = s.race.enabled;
#if defined(__x86_64__)
    hostsim_switch(&s.sched_sp, f.sp);
#else
    swapcontext(&s.sched_uc, &f.uc);
#endif
    g_race_active = false;
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

// --- shared-memory race check ------------------------------------------------------------------
// With HOSTSIM_RACECHECK=1 and kernels compiled with -fsanitize=thread (build.rs does with
// UPX_HOSTSIM_RACECHECK=1; g++
// then calls the __tsan_* hooks below on every load and store, and no TSan runtime is linked),
// every access of a CUDA thread to dynamic shared memory or a static __shared__ variable is
// checked against a shadow of the last write and the reads of each byte: two threads touching
// the same byte, at least one writing, with no barrier between them, is an error naming both
// threads and the code address of the access. "Between" is tracked with epochs: __syncthreads,
// a completed mbarrier phase and a released named barrier start a new block epoch (the last
// two conservatively order every thread, so a race across them is missed); a warp collective
// (shuffle, vote, __syncwarp, mma.sync, ldmatrix) starts a new epoch of its warp.
inline void race_block_epoch() { ++state().race.epoch; }
inline void race_warp_epoch(unsigned warp) {
    RaceCheck& r = state().race;
    if (r.enabled) ++r.warp_epoch[warp];
}

inline std::string race_code(const void* pc) {
    Dl_info info;
    if (pc && dladdr(pc, &info) && info.dli_fname)
        return format("code at %s+0x%zx (addr2line -e %s 0x%zx names the line)", info.dli_fname,
                      (size_t)((uintptr_t)pc - (uintptr_t)info.dli_fbase), info.dli_fname,
                      (size_t)((uintptr_t)pc - (uintptr_t)info.dli_fbase));
    return format("code at %p", pc);
}

[[noreturn]] HS_UNCHECKED inline void race_report(const State& s, const char* kind, const char* other_did, uintptr_t a,
                                     unsigned other, const void* pc, const void* other_pc) {
    const bool dynamic = a - (uintptr_t)s.smem < s.smem_bytes;
    const Fiber& o = s.fibers[other];
    g_race_active = false;
    fail(format("shared-memory race (%s): %s, with no barrier since thread (%u,%u,%u) %s it; this access: %s%s%s",
                kind,
                dynamic ? format("dynamic shared memory byte %zu", (size_t)(a - (uintptr_t)s.smem)).c_str()
                        : "a static __shared__ variable",
                o.tid.x, o.tid.y, o.tid.z, other_did, race_code(pc).c_str(),
                other_pc ? "; that write: " : "", other_pc ? race_code(other_pc).c_str() : ""));
}

// One access of n bytes at p by the running thread. Not instrumented itself (nor are the
// hooks and the emulator's own TMA and proxy bookkeeping: HS_UNCHECKED).
HS_UNCHECKED inline void race_access(const void* p, size_t n, bool write, const void* pc) {
    State& s = *g_state;
    RaceCheck& r = s.race;
    uintptr_t a = (uintptr_t)p;
    RaceShadow* shadow;
    size_t room;
    if (a - (uintptr_t)s.smem < s.smem_bytes) {
        shadow = &r.smem[a - (uintptr_t)s.smem];
        room = s.smem_bytes - (a - (uintptr_t)s.smem);
    } else if (a - r.tls_lo < r.tls_size && r.tls_shared[a - r.tls_lo]) {
        shadow = &r.tls[a - r.tls_lo];
        room = r.tls_size - (a - r.tls_lo);
    } else {
        return;
    }
    const Fiber& f = *s.cur;
    const uint16_t t = (uint16_t)f.linear;
    const uint32_t e = r.epoch, we = r.warp_epoch[f.warp];
    // Ordered after an access by thread u at warp epoch uwe in this block epoch: same thread,
    // or same warp with a warp collective in between.
    auto ordered = [&](unsigned u, uint32_t uwe) { return u == t || (u / 32 == f.warp && uwe != we); };
    for (size_t i = 0; i < std::min(n, room); ++i) {
        RaceShadow& x = shadow[i];
        if (x.w_epoch == e && !ordered(x.w_tid, x.w_warp_epoch))
            race_report(s, write ? "write after write" : "read after write", "wrote", a + i, x.w_tid, pc, x.w_pc);
        if (write) {
            if (x.r_epoch == e) {
                const bool raced = x.r_many == 2 || (x.r_many == 1 && (x.r_tid / 32 != f.warp || x.r_warp_epoch == we)) ||
                                   (x.r_many == 0 && !ordered(x.r_tid, x.r_warp_epoch));
                if (raced) race_report(s, "write after read", "read", a + i, x.r_tid, pc, nullptr);
            }
            x.w_epoch = e;
            x.w_warp_epoch = we;
            x.w_tid = t;
            x.w_pc = pc;
        } else if (x.r_epoch != e) {
            x.r_epoch = e;
            x.r_warp_epoch = we;
            x.r_tid = t;
            x.r_many = 0;
        } else if (x.r_tid != t || x.r_many) {
            x.r_many = std::max<uint8_t>(x.r_many, x.r_tid / 32 != f.warp ? 2 : 1);
            x.r_warp_epoch = std::max(x.r_warp_epoch, we);
        }
    }
}

// The static __shared__ variables: function-local `static thread_local` objects (symbols
// `_ZZ…`; not their `_ZGV…` initialisation guards, nor the emulator's own thread_locals) in
// the executable's static TLS block, found in its symbol table. On x86-64 the block ends at
// the thread pointer; that layout is checked on threadIdx's symbol, and without a match
// (another platform, a stripped binary) static shared memory goes unchecked.
inline void race_find_shared(RaceCheck& r) {
#if defined(__x86_64__)
    size_t tls[2] = {0, 1};  // PT_TLS memsz, align
    dl_iterate_phdr(
        [](dl_phdr_info* info, size_t, void* data) -> int {
            if (info->dlpi_tls_modid != 1) return 0;
            for (int i = 0; i < info->dlpi_phnum; ++i)
                if (info->dlpi_phdr[i].p_type == PT_TLS) {
                    static_cast<size_t*>(data)[0] = info->dlpi_phdr[i].p_memsz;
                    static_cast<size_t*>(data)[1] = std::max<size_t>(info->dlpi_phdr[i].p_align, 1);
                    return 1;
                }
            return 0;
        },
        tls);
    const size_t span = (tls[0] + tls[1] - 1) / tls[1] * tls[1];
    const uintptr_t lo = (uintptr_t)__builtin_thread_pointer() - span;
    const int fd = open("/proc/self/exe", O_RDONLY);
    if (fd < 0 || !span) return;
    struct stat st;
    void* map = fstat(fd, &st) == 0 ? mmap(nullptr, st.st_size, PROT_READ, MAP_PRIVATE, fd, 0) : MAP_FAILED;
    close(fd);
    if (map == MAP_FAILED) return;
    const auto* base = static_cast<const unsigned char*>(map);
    const auto* eh = reinterpret_cast<const Elf64_Ehdr*>(base);
    const auto* sh = reinterpret_cast<const Elf64_Shdr*>(base + eh->e_shoff);
    std::vector<uint8_t> shared(span, 0);
    bool layout_ok = false;
    for (unsigned i = 0; i < eh->e_shnum; ++i) {
        if (sh[i].sh_type != SHT_SYMTAB) continue;
        const char* names = reinterpret_cast<const char*>(base + sh[sh[i].sh_link].sh_offset);
        const auto* sym = reinterpret_cast<const Elf64_Sym*>(base + sh[i].sh_offset);
        for (size_t k = 0; k < sh[i].sh_size / sizeof(Elf64_Sym); ++k) {
            if (ELF64_ST_TYPE(sym[k].st_info) != STT_TLS) continue;
            const char* name = names + sym[k].st_name;
            if (strcmp(name, "threadIdx") == 0) layout_ok = lo + sym[k].st_value == (uintptr_t)&threadIdx;
            if (strncmp(name, "_ZZ", 3) == 0 && sym[k].st_value + sym[k].st_size <= span)
                memset(&shared[sym[k].st_value], 1, sym[k].st_size);
        }
    }
    munmap(map, st.st_size);
    if (!layout_ok) return;
    r.tls_lo = lo;
    r.tls_size = span;
    r.tls_shared = std::move(shared);
#endif
}

// Arms the check for a launch (HOSTSIM_RACECHECK=1 and instrumented kernels).
inline void race_launch(State& s, unsigned threads) {
    RaceCheck& r = s.race;
#if defined(__SANITIZE_THREAD__)
    const char* v = getenv("HOSTSIM_RACECHECK");
    r.enabled = r.forced >= 0 ? r.forced != 0 : v && *v && strcmp(v, "0") != 0;
#endif
    if (!r.enabled) return;
    if (!r.tls_searched) {
        race_find_shared(r);
        r.tls_searched = true;
    }
    if (r.smem.size() < s.smem_cap) r.smem.assign(s.smem_cap, RaceShadow{});
    if (r.tls.size() < r.tls_size) r.tls.assign(r.tls_size, RaceShadow{});
    r.warp_epoch.assign((threads + 31) / 32, 0);
}

}  // namespace hostsim

// The hooks g++ -fsanitize=thread calls (no TSan runtime is linked: these are the only
// definitions). Weak: the header is compiled into several objects of one archive.
#define HS_TSAN_HOOK(name, n, write)                                                 \
    extern "C" __attribute__((weak)) HS_UNCHECKED void name(void* p) {            \
        if (hostsim::g_race_active) hostsim::race_access(p, n, write, __builtin_return_address(0)); \
    }
#define HS_TSAN_HOOKS(n)                                    \
    HS_TSAN_HOOK(__tsan_read##n, n, false)                   \
    HS_TSAN_HOOK(__tsan_write##n, n, true)                   \
    HS_TSAN_HOOK(__tsan_unaligned_read##n, n, false)         \
    HS_TSAN_HOOK(__tsan_unaligned_write##n, n, true)
HS_TSAN_HOOKS(1)
HS_TSAN_HOOKS(2)
HS_TSAN_HOOKS(4)
HS_TSAN_HOOKS(8)
HS_TSAN_HOOKS(16)
#undef HS_TSAN_HOOKS
#undef HS_TSAN_HOOK
extern "C" __attribute__((weak)) HS_UNCHECKED void __tsan_read_range(void* p, unsigned long n) {
    if (hostsim::g_race_active) hostsim::race_access(p, n, false, __builtin_return_address(0));
}
extern "C" __attribute__((weak)) HS_UNCHECKED void __tsan_write_range(void* p, unsigned long n) {
    if (hostsim::g_race_active) hostsim::race_access(p, n, true, __builtin_return_address(0));
}
extern "C" __attribute__((weak)) void __tsan_init() {}
extern "C" __attribute__((weak)) void __tsan_func_entry(void*) {}
extern "C" __attribute__((weak)) void __tsan_func_exit() {}

namespace hostsim {

// --- barriers ------------------------------------------------------------------------------
HS_UNCHECKED inline void yield_until(Fiber& f, Wait w, uint64_t gen) {
    f.wait = w;
    f.wait_gen = gen;
    to_scheduler(f);
}

HS_UNCHECKED inline void block_barrier(const std::source_location& loc) {
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
        race_block_epoch();
        return;
    }
    yield_until(f, Wait::Block, b.gen);
}

// Deposits this lane's 64-byte slot for a warp collective, waits for the whole warp, and
// returns the 32 slots of this collective.
template <typename Write>
HS_UNCHECKED inline uint64_t (*warp_exchange(uint32_t mask, const char* what, Write write))[8] {
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
        race_warp_epoch(f.warp);
    } else {
        yield_until(f, Wait::Warp, w.gen);
    }
    return buf;
}

inline unsigned lane_id() { return state().cur->lane; }

// --- cp.async ------------------------------------------------------------------------------
// A 16-byte cp.async (cp-size 16) reading `src_bytes` of them from src (PTX's src-size).
HS_UNCHECKED inline void cp_async_16(void* dst, const void* src, unsigned src_bytes) {
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
HS_UNCHECKED inline void cp_async_wait(size_t pending) {
    Fiber& f = *state().cur;
    if (f.groups.size() <= pending) return;
    const size_t done_groups = f.groups.size() - pending;
    const size_t n = f.groups[done_groups - 1];
    for (size_t i = 0; i < n; ++i) {
        const AsyncCopy& c = f.copies[i];
        memcpy(c.dst, c.src, c.src_bytes);
        memset((unsigned char*)c.dst + c.src_bytes, 0, 16 - c.src_bytes);
        if (g_race_active) race_access(c.dst, 16, true, __builtin_return_address(0));
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
HS_UNCHECKED inline float tensor_core_sum(float c, const float* a, const float* b, unsigned n) {
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
HS_UNCHECKED inline void mma_bf16_16816(float d[4], const uint32_t a[4], const uint32_t b[2], const float c[4]) {
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

// A swizzle of `span` bytes (32, 64, 128; 0 none) on an absolute shared address: the 16-byte
// chunk (bits 4..) is XORed with the row of `span` bytes within the 8-row pattern (bits 7..),
// counted from the pattern start `base_offset` names. TMA writes and wgmma reads go through
// this one function, so both sides of the copy agree by construction; the layout test checks it
// against the ISA's figures.
inline uint32_t swizzle_address(uint32_t a, uint32_t span, uint32_t base_offset = 0) {
    return span ? a ^ ((((a >> 7) - base_offset) & (span / 16 - 1)) << 4) : a;
}

// --- async proxy ---------------------------------------------------------------------------
// wgmma operands and TMA store sources are read by the async proxy, which sees ordinary
// (generic-proxy) stores only after a fence.proxy.async. The emulator keeps the bytes as the
// async proxy may see them (State::async_view) and reports a read of bytes that differ: they
// were written by ordinary stores after the last fence. A fence by any thread publishes the
// whole window (the emulator cannot tell which thread wrote which byte), so a fence in the
// wrong thread goes unnoticed; a missing or early fence is caught.
inline void ensure_async_view(State& s) {
    if (s.async_valid) return;
    memset(s.async_view, 0xFF, s.smem_cap);  // the block's start state: nothing written yet
    s.async_valid = true;
}

HS_UNCHECKED inline void fence_proxy_async() {
    State& s = state();
    if (!s.smem_bytes) return;
    ensure_async_view(s);
    memcpy(s.async_view, s.smem, s.smem_bytes);
}

// Checks an async-proxy read of [a, a + n) of shared memory.
HS_UNCHECKED inline void check_async_read(uint32_t a, uint32_t n, const char* what, const std::source_location& loc) {
    State& s = state();
    ensure_async_view(s);
    if (memcmp(s.smem + a, s.async_view + a, n) == 0) return;
    uint32_t i = 0;
    while (s.smem[a + i] == s.async_view[a + i]) ++i;
    fail(format("%s (%s:%u) reads shared address %u, written by ordinary stores after the last fence.proxy.async: "
                "the async proxy need not see them (add fence_proxy_async() after the stores)",
                what, loc.file_name(), loc.line(), a + i));
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
        race_block_epoch();
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

// Lands the TMA loads in flight on mbarrier i: their bytes reach shared memory (as the async
// proxy wrote them) and their transaction bytes complete on the barrier.
HS_UNCHECKED inline void land_tma_loads(unsigned i) {
    State& s = state();
    for (size_t k = 0; k < s.tma_loads.size();) {
        if (s.tma_loads[k].bar != i) {
            ++k;
            continue;
        }
        const TmaLoad op = std::move(s.tma_loads[k]);
        s.tma_loads.erase(s.tma_loads.begin() + k);
        ensure_async_view(s);
        for (size_t j = 0; j < op.bytes.size(); ++j)
            if (op.mask[j]) s.smem[op.lo + j] = s.async_view[op.lo + j] = op.bytes[j];
        MBarrier& b = s.mbarriers[i];
        b.tx -= op.tx;
        mbarrier_settle(b);
    }
}

// mbarrier.try_wait.parity: true once the phase of that parity has completed, i.e. when the
// current phase's parity differs. A fiber yield point: until then the fiber is suspended and
// resumed only when the barrier moves on (so it returns true); if it never does, the block is
// reported as a deadlock naming the caller's line. TMA loads signalling this barrier land
// here, in the waiting thread: until a thread waits (and runs), their destination reads as
// poison.
inline bool mbarrier_try_wait_parity(void* bar, uint32_t parity, const std::source_location& loc) {
    State& s = state();
    const unsigned i = mbarrier_index(bar, "mbarrier.try_wait.parity");
    for (;;) {
        land_tma_loads(i);
        if ((s.mbarriers[i].phases & 1) != (parity & 1)) return true;
        Fiber& f = *s.cur;
        f.wait_bar = i;
        f.wait_parity = parity & 1;
        f.wait_file = loc.file_name();
        f.wait_line = loc.line();
        yield_until(f, Wait::MBarrier, 0);  // resumed when the phase moves on or a TMA load is in flight
    }
}

// Whether a TMA load signalling mbarrier i is in flight (a thread waiting on it lands it).
inline bool tma_load_in_flight(const State& s, unsigned i) {
    for (const TmaLoad& op : s.tma_loads)
        if (op.bar == i) return true;
    return false;
}

// A warpgroup-wide .sync.aligned instruction: every thread deposits its operands with
// `write`; `last` runs once, in the thread whose arrival completes the set, before any of them
// goes on. All 4 warps of the warpgroup must execute it.
template <typename Write, typename Last> HS_UNCHECKED inline void warpgroup_collective(const char* what, Write write, Last last) {
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
    return swizzle_address(m.start + off, w, m.base_offset);
}

// Gathers a 16-bit operand (rows × 16, row-major as floats) through its descriptor; an
// async-proxy read (check_async_read).
inline void load_operand(float* out, uint64_t desc, bool mn_major, unsigned rows, const char* which,
                         const std::source_location& loc) {
    State& s = state();
    const MatrixDesc m = decode_matrix_desc(desc);
    for (unsigned r = 0; r < rows; ++r)
        for (unsigned k = 0; k < 16; ++k) {
            const uint32_t a = operand_address(m, mn_major, r, k);
            if (a + 2 > s.smem_bytes)
                fail(format("wgmma.mma_async: operand %s element (%u, %u) at shared address %u lies outside the %u "
                            "bytes of dynamic shared memory",
                            which, r, k, a, s.smem_bytes));
            check_async_read(a, 2, which[0] == 'A' ? "wgmma.mma_async operand A" : "wgmma.mma_async operand B", loc);
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
                  bool trans_b, bool accumulate, const std::source_location& loc) {
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
                load_operand(a, desc_a, trans_a, 64, "A", loc);
            }
            load_operand(bt, desc_b, trans_b, n, "B", loc);
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

// --- TMA: cp.async.bulk.tensor ---------------------------------------------------------------
// The emulator's tensor map (what TensorMapSpec::encode writes for the hostsim backend,
// src/runtime/tensor_map.rs; the byte offsets are asserted on both sides). Dimension 0 is the
// innermost; strides are in bytes for dimensions 1.. ; dims are stored minus one (2^32 fits).
struct TensorMapDesc {
    uint64_t magic;       // kTensorMapMagic: built by our encoder for the emulator
    uint64_t address;     // global address of element 0
    uint64_t strides[4];  // byte stride of dimensions 1..rank-1
    uint32_t dims_minus1[5];
    uint16_t box[5];      // box sides in elements (1..256)
    uint8_t elem_strides[5];
    uint8_t rank, elem_bytes, swizzle;  // swizzle span in bytes, 0 for none
};
constexpr uint64_t kTensorMapMagic = 0x3150414D53524F54ull;  // "TORSMAP1"
static_assert(sizeof(TensorMapDesc) <= sizeof(CUtensorMap) && offsetof(TensorMapDesc, strides) == 16 &&
              offsetof(TensorMapDesc, dims_minus1) == 48 && offsetof(TensorMapDesc, box) == 68 &&
              offsetof(TensorMapDesc, elem_strides) == 78 && offsetof(TensorMapDesc, rank) == 83);

inline const TensorMapDesc& tensor_map(const void* map, unsigned rank, const char* what) {
    const TensorMapDesc& m = *static_cast<const TensorMapDesc*>(map);
    if (m.magic != kTensorMapMagic)
        fail(format("%s: the tensor map was not encoded for the emulator (build it with TensorMapSpec::encode on the "
                    "hostsim backend)",
                    what));
    if (m.rank != rank) fail(format("%s: a %u-d copy with a rank-%u tensor map", what, rank, m.rank));
    return m;
}

// The box as TMA moves it: sides ceil(box / element stride), dimension 0 fastest, densely
// packed from the shared-memory destination, then swizzled on the absolute address.
// `visit(smem address, global element or nullptr when out of range)` per element.
template <typename Visit> inline uint32_t tma_box(const TensorMapDesc& m, uint32_t dst, const int* c, Visit visit) {
    if (m.swizzle && m.box[0] * m.elem_bytes != m.swizzle)
        fail(format("cp.async.bulk.tensor: an inner box side of %u bytes under a %u-byte swizzle: the driver accepts "
                    "it, but hostsim does not know the hardware's shared-memory layout for it (use an inner side of "
                    "exactly the span)",
                    m.box[0] * m.elem_bytes, m.swizzle));
    unsigned side[5] = {1, 1, 1, 1, 1};
    uint64_t count = 1;
    for (unsigned d = 0; d < m.rank; ++d) {
        side[d] = (m.box[d] + m.elem_strides[d] - 1) / m.elem_strides[d];
        count *= side[d];
    }
    for (uint64_t e = 0; e < count; ++e) {
        uint64_t rest = e, off = 0;
        bool inside = true;
        for (unsigned d = 0; d < m.rank; ++d) {
            const int64_t g = (int64_t)c[d] + (int64_t)(rest % side[d]) * m.elem_strides[d];
            rest /= side[d];
            inside = inside && g >= 0 && g <= (int64_t)m.dims_minus1[d];
            off += d == 0 ? (uint64_t)g * m.elem_bytes : (uint64_t)g * m.strides[d - 1];
        }
        const uint32_t a = swizzle_address(dst + (uint32_t)(e * m.elem_bytes), m.swizzle);
        visit(a, inside ? (unsigned char*)(uintptr_t)(m.address + off) : nullptr);
    }
    return (uint32_t)(count * m.elem_bytes);
}

// The shared-memory side of a TMA copy: inside dynamic shared memory, 128-byte aligned, or
// aligned to the whole swizzle pattern (8 rows of the span) when swizzled, so the pattern
// starts where wgmma's descriptors (base offset 0) expect it.
inline uint32_t tma_smem(const void* p, const TensorMapDesc& m, const char* what) {
    const uint32_t a = smem_address(p, what), align = m.swizzle ? 8 * m.swizzle : 128;
    if (a % align)
        fail(format("%s: shared address %u is not %u-byte aligned (%s)", what, a, align,
                    m.swizzle ? "the start of the swizzle pattern" : "TMA's minimum"));
    return a;
}

// cp.async.bulk.tensor.Nd.shared::cluster.global.tile.mbarrier::complete_tx::bytes: the box at
// coordinates c (out-of-range elements zero) goes to dst; the box's full byte count completes
// on the mbarrier. The destination reads as poison until the copy lands, which is when a
// thread waiting on that mbarrier runs next.
HS_UNCHECKED inline void tma_load(void* dst, const void* map, void* bar, const int* c, unsigned rank) {
    State& s = state();
    const char* what = "cp.async.bulk.tensor (load)";
    const TensorMapDesc& m = tensor_map(map, rank, what);
    const unsigned bi = mbarrier_index(bar, what);
    const uint32_t lo = tma_smem(dst, m, what);
    TmaLoad op{bi, lo, 0, {}, {}};
    auto put = [&](uint32_t a, const unsigned char* g) {
        if (a + m.elem_bytes > s.smem_bytes)
            fail(format("%s: the box reaches shared address %u, past the %u bytes of dynamic shared memory", what,
                        a + m.elem_bytes, s.smem_bytes));
        const uint32_t j = a - lo;
        if (op.bytes.size() < j + m.elem_bytes) {
            op.bytes.resize(j + m.elem_bytes);
            op.mask.resize(j + m.elem_bytes);
        }
        if (g) memcpy(&op.bytes[j], g, m.elem_bytes);
        else memset(&op.bytes[j], 0, m.elem_bytes);
        memset(&op.mask[j], 1, m.elem_bytes);
    };
    op.tx = tma_box(m, lo, c, put);
    ensure_async_view(s);
    for (size_t j = 0; j < op.bytes.size(); ++j)
        if (op.mask[j]) s.smem[lo + j] = s.async_view[lo + j] = 0xFF;  // poison until it lands
    s.tma_loads.push_back(std::move(op));
}

// cp.async.bulk.tensor.Nd.global.shared::cta.tile.bulk_group: the box at coordinates c from
// src (an async-proxy read; out-of-range elements are not written). Performed at the
// cp.async.bulk.wait_group that completes its group; the source must not change until then.
HS_UNCHECKED inline void tma_store(const void* map, const void* src, const int* c, unsigned rank, const std::source_location& loc) {
    State& s = state();
    const char* what = "cp.async.bulk.tensor (store)";
    const TensorMapDesc& m = tensor_map(map, rank, what);
    const uint32_t lo = tma_smem(src, m, what);
    BulkStore op{{}, m.elem_bytes, lo, {}};
    uint32_t hi = lo;
    const uint32_t bytes = tma_box(m, lo, c, [&](uint32_t a, unsigned char* g) {
        if (a + m.elem_bytes > s.smem_bytes)
            fail(format("%s: the box reaches shared address %u, past the %u bytes of dynamic shared memory", what,
                        a + m.elem_bytes, s.smem_bytes));
        hi = std::max(hi, a + m.elem_bytes);
        uint64_t v = 0;
        memcpy(&v, s.smem + a, m.elem_bytes);
        if (g) op.elements.push_back({g, v});
    });
    (void)bytes;
    check_async_read(lo, hi - lo, what, loc);
    op.src.assign(s.smem + lo, s.smem + hi);
    state().cur->bulk.push_back(std::move(op));
}

inline void bulk_commit() {
    Fiber& f = *state().cur;
    f.bulk_groups.push_back(f.bulk.size());
}

// cp.async.bulk.wait_group N: all but the N most recent committed groups of this thread are done.
HS_UNCHECKED inline void bulk_wait(size_t pending) {
    State& s = state();
    Fiber& f = *s.cur;
    if (f.bulk_groups.size() <= pending) return;
    const size_t done_groups = f.bulk_groups.size() - pending, n = f.bulk_groups[done_groups - 1];
    for (size_t i = 0; i < n; ++i) {
        const BulkStore& op = f.bulk[i];
        if (memcmp(s.smem + op.src_lo, op.src.data(), op.src.size()) != 0)
            fail(format("cp.async.bulk.tensor (store): its source at shared address %u changed before "
                        "cp.async.bulk.wait_group completed it",
                        op.src_lo));
        for (const auto& [g, v] : op.elements) memcpy(g, &v, op.elem_bytes);
    }
    f.bulk.erase(f.bulk.begin(), f.bulk.begin() + n);
    f.bulk_groups.erase(f.bulk_groups.begin(), f.bulk_groups.begin() + done_groups);
    for (size_t& g : f.bulk_groups) g -= n;
}

// --- warpgroup registers and named barriers --------------------------------------------------
// setmaxnreg.{inc,dec}.sync.aligned.u32: a warpgroup collective; every thread of the
// warpgroup names the same count, a multiple of 8 in 24..256.
inline void setmaxnreg(unsigned count, bool inc) {
    const char* what = inc ? "setmaxnreg.inc" : "setmaxnreg.dec";
    if (count < 24 || count > 256 || count % 8)
        fail(format("%s: register count %u is not a multiple of 8 in 24..256", what, count));
    warpgroup_collective(what, [&](uint64_t* slot) { slot[0] = count; }, [&](WarpGroup& g) {
        for (unsigned t = 1; t < 128; ++t)
            if (g.slots[t][0] != g.slots[0][0])
                fail(format("%s: warpgroup threads 0 and %u ask for %llu and %llu registers: the count must be "
                            "uniform across the warpgroup",
                            what, t, (unsigned long long)g.slots[0][0], (unsigned long long)g.slots[t][0]));
    });
}

// bar.sync / bar.arrive id, count: `count` threads (whole warps) meet at barrier `id` (1..15;
// 0 is __syncthreads'). bar.arrive counts without waiting. Exited threads do not count: a
// barrier that waits for them is a deadlock.
inline void named_barrier(unsigned id, unsigned count, bool wait, const std::source_location& loc) {
    State& s = state();
    Fiber& f = *s.cur;
    const char* what = wait ? "bar.sync" : "bar.arrive";
    const unsigned threads = blockDim.x * blockDim.y * blockDim.z;
    if (id == 0 || id > 15)
        fail(format("%s %u (%s:%u): named barriers are 1..15 (barrier 0 is __syncthreads')", what, id, loc.file_name(),
                    loc.line()));
    if (count == 0 || count % 32 || count > (threads + 31) / 32 * 32)
        fail(format("%s %u, %u (%s:%u): the thread count must be a non-zero multiple of 32 up to the block's %u",
                    what, id, count, loc.file_name(), loc.line(), threads));
    NamedBarrier& b = s.named[id];
    if (b.arrived == 0) {
        b.count = count;
        b.file = loc.file_name();
        b.line = loc.line();
    } else if (b.count != count) {
        fail(format("%s %u: thread counts %u (%s:%u) and %u (%s:%u) in the same phase", what, id, b.count, b.file,
                    b.line, count, loc.file_name(), loc.line()));
    }
    if (++b.arrived == b.count) {
        b.arrived = 0;
        ++b.gen;
        race_block_epoch();
        return;
    }
    if (!wait) return;
    f.wait_bar = id;
    f.wait_file = loc.file_name();
    f.wait_line = loc.line();
    yield_until(f, Wait::Named, b.gen);
}

// --- scheduling ----------------------------------------------------------------------------
inline void thread_exit() {
    State& s = state();
    Fiber& f = *s.cur;
    if (!f.copies.empty()) fail(format("thread exited with %zu cp.async copies never waited for", f.copies.size()));
    if (!f.bulk.empty())
        fail(format("thread exited with %zu cp.async.bulk.tensor stores never waited for (cp.async.bulk.wait_group)",
                    f.bulk.size()));
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
        race_block_epoch();
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
    unsigned at_mbar = 0, at_named = 0;
    const Fiber* named = nullptr;
    for (unsigned i = 0; i < n; ++i) {
        const Fiber& f = s.fibers[i];
        if (f.wait == Wait::Named && at_named++ == 0) named = &f;
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
    if (named) {
        const NamedBarrier& b = s.named[named->wait_bar];
        r += format("; %u threads wait at named barriers, e.g. thread (%u,%u,%u) at bar.sync %u (%s:%u), which has %u "
                    "of its %u threads",
                    at_named, named->tid.x, named->tid.y, named->tid.z, named->wait_bar, named->wait_file,
                    named->wait_line, b.arrived, b.count);
    }
    return r;
}

HS_UNCHECKED inline bool run_block(State& s, unsigned n, const std::vector<unsigned>& order) {
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
    s.tma_loads.clear();
    s.async_valid = false;
    for (NamedBarrier& nb : s.named) nb = NamedBarrier{};
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
        f.bulk.clear();
        f.bulk_groups.clear();
        prepare_stack(f);
    }
    if (s.smem_cap) memset(s.smem, 0xFF, s.smem_cap);
    race_block_epoch();
    for (;;) {
        bool progress = false, all_done = true;
        for (unsigned i : order) {
            Fiber& f = s.fibers[i];
            if (f.wait == Wait::Done) continue;
            all_done = false;
            if (f.wait == Wait::Block && s.barrier.gen == f.wait_gen) continue;
            if (f.wait == Wait::Warp && s.warps[f.warp].gen == f.wait_gen) continue;
            if (f.wait == Wait::Group && s.warpgroups[f.linear / 128].gen == f.wait_gen) continue;
            if (f.wait == Wait::MBarrier && (s.mbarriers[f.wait_bar].phases & 1) == f.wait_parity &&
                !tma_load_in_flight(s, f.wait_bar))
                continue;
            if (f.wait == Wait::Named && s.named[f.wait_bar].gen == f.wait_gen) continue;
            f.wait = Wait::Running;
            to_fiber(f);
            progress = true;
            if (s.failed) return false;
        }
        if (all_done) {
            if (s.tma_loads.empty()) return true;
            s.failed = true;
            s.error = format("block (%u,%u,%u) ended with %zu cp.async.bulk.tensor loads never waited for (a TMA load "
                             "lands when a thread waits on its mbarrier, e.g. the one at shared address %u)",
                             blockIdx.x, blockIdx.y, blockIdx.z, s.tma_loads.size(),
                             s.mbarriers[s.tma_loads[0].bar].addr);
            return false;
        }
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
        free(s.async_view);
        // 1024-byte aligned, like the hardware's swizzle patterns (see smem_address).
        s.smem_cap = (cfg->smem_bytes + 1023) / 1024 * 1024;
        s.smem = (unsigned char*)aligned_alloc(1024, s.smem_cap);
        s.async_view = (unsigned char*)malloc(s.smem_cap);
    }
    s.smem_bytes = cfg->smem_bytes;
    race_launch(s, n);
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

// Turns the race check on (1) or off (0) for launches from this OS thread, or back to
// HOSTSIM_RACECHECK (-1). Returns whether the kernels are instrumented for it.
extern "C" __attribute__((weak)) int hostsim_set_race_check(int on) {
    hostsim::state().race.forced = on;
#if defined(__SANITIZE_THREAD__)
    return 1;
#else
    return 0;
#endif
}

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
template <typename T, typename Src> HS_UNCHECKED inline T shuffle(unsigned mask, T v, int width, const char* what, Src src) {
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
