// cuh_module.h: the fiber scheduler and the launcher of the CPU harness. harness.py
// generates one translation unit per kernel module:
//
//     #include "cuda_shim.h"
//     #include "/abs/path/kernels/gemm.cu"        // the real source, unchanged
//     #include "cuh_module.h"
//     CUH_BEGIN_ENTRIES
//     CUH_ENTRY("gemm_tiled<float, 0, 1, 2>", gemm_tiled<float, 0, 1, 2>)
//     ...
//     CUH_END_ENTRIES
//
// and a second one defining the dynamic shared-memory buffer (cuh_dyn_smem) with one alias
// per `extern __shared__` name found in the source.
//
// Execution model. One launch runs its blocks one after another on the calling OS thread;
// each CUDA thread of a block is a fiber with its own stack (hand-rolled x86-64 context
// switch, annotated for AddressSanitizer). A fiber runs until it reaches a scheduling
// point (a block barrier, a warp-level intrinsic) or returns. When no fiber can run:
//   * warp operations whose participating lanes (mask ∩ live lanes) have all arrived are
//     completed, all results computed before any lane resumes;
//   * otherwise, when every live thread waits at __syncthreads, the barrier opens;
//   * otherwise the block is deadlocked: report and exit.
// The order in which runnable fibers are resumed is a fresh seeded permutation at every
// phase (schedule "random"), or thread order ("forward"), or reverse order ("reverse").
#pragma once

#include "cuh_abi.h"
#include "cuda_shim.h"

#include <dlfcn.h>
#include <link.h>
#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdarg>
#include <string>
#include <utility>
#include <vector>

#if defined(__SANITIZE_ADDRESS__)
#include <sanitizer/asan_interface.h>
#include <sanitizer/common_interface_defs.h>
#define CUH_ASAN 1
#else
#define CUH_ASAN 0
#endif

// ThreadSanitizer build (CUGRAD_HARNESS_SANITIZE=thread): the racecheck of the harness. Each
// CUDA thread is a TSan fiber; switching scheduler -> fiber synchronises (so a fiber sees
// what the runner and the scheduler set up), switching back does not, and the only other
// happens-before edges between the threads of a block are the ones CUDA gives:
// __syncthreads* (among the threads that reach it) and __syncwarp (among its lanes).
// Shuffles, votes and the other warp intrinsics exchange values but order no memory, as in
// the CUDA memory model. A block's threads all happen before the next block's (blocks run
// one after another here), so TSan reports races between threads of one block: a shared-
// memory (or global) access that no barrier orders against another thread's write. The
// harness's own bookkeeping is not instrumented (CUH_NO_TSAN), only the kernels are.
#if defined(__SANITIZE_THREAD__)
#include <sanitizer/tsan_interface.h>
#define CUH_TSAN 1
#define CUH_NO_TSAN __attribute__((no_sanitize_thread))
#else
#define CUH_TSAN 0
#define CUH_NO_TSAN
#endif
#if CUH_ASAN && CUH_TSAN
#error "AddressSanitizer and ThreadSanitizer cannot be combined"
#endif

#if !defined(__x86_64__)
#error "the cugrad CPU harness switches fibers with x86-64 assembly; port cuh_switch to this target"
#endif

#ifndef CUH_DYN_SMEM_CAPACITY
#define CUH_DYN_SMEM_CAPACITY (227 * 1024)   // the largest opt-in block shared memory (sm_90)
#endif

uint3 threadIdx, blockIdx;
dim3 blockDim, gridDim;
extern thread_local unsigned char cuh_dyn_smem[CUH_DYN_SMEM_CAPACITY];

// void cuh_switch(void** save_sp, void* new_sp): save callee-saved state on the current
// stack, store its pointer in *save_sp, continue on new_sp. cuh_fiber_start is where a new
// fiber's first switch lands: it calls cuh_fiber_main(fiber) (held in r12) and never returns.
extern "C" void cuh_switch(void** save_sp, void* new_sp);
extern "C" void cuh_fiber_start();
asm(R"(
    .text
    .globl cuh_switch
    .hidden cuh_switch
    .type cuh_switch,@function
cuh_switch:
    pushq %rbp
    pushq %rbx
    pushq %r12
    pushq %r13
    pushq %r14
    pushq %r15
    subq $8, %rsp
    stmxcsr (%rsp)
    fnstcw 4(%rsp)
    movq %rsp, (%rdi)
    movq %rsi, %rsp
    ldmxcsr (%rsp)
    fldcw 4(%rsp)
    addq $8, %rsp
    popq %r15
    popq %r14
    popq %r13
    popq %r12
    popq %rbx
    popq %rbp
    ret
    .size cuh_switch, .-cuh_switch

    .globl cuh_fiber_start
    .hidden cuh_fiber_start
    .type cuh_fiber_start,@function
cuh_fiber_start:
    .cfi_startproc
    .cfi_undefined rip
    movq %r12, %rdi
    call cuh_fiber_main
    ud2
    .cfi_endproc
    .size cuh_fiber_start, .-cuh_fiber_start
)");

namespace cuh {
namespace {

enum State : int { RUNNABLE, AT_BARRIER, AT_WARP, DONE };

struct Fiber {
    void* sp = nullptr;
    char* stack_lo = nullptr;
    size_t stack_size = 0;
    uint3 tid{};
    int lane = 0, warp = 0;
    State state = DONE;
    int op = 0, arg = 0, width = 32, is_signed = 0, pred = 0;
    unsigned mask = 0;
    unsigned long long bits = 0, result = 0;
    void* fake_stack = nullptr;   // ASan's fake stack while switched out
    const char* bar_file = "";    // the __syncthreads this thread waits at (AT_BARRIER)
    int bar_line = 0;
    void* tsan = nullptr;         // TSan's fiber context (CUH_TSAN)
    bool started = false;         // CUH_TSAN: fibers persist, parked after their body
};

constexpr size_t kStackSize = CUH_ASAN ? (512u << 10) : (128u << 10);
constexpr size_t kGuard = 4096;
constexpr int kMaxThreads = 1024;
constexpr unsigned long long kPoisonBits = ~0ull;   // NaN as float or double, -1 as an integer

CUH_NO_TSAN const char* op_name(int op) {
    static const char* names[] = {"__shfl_sync", "__shfl_up_sync", "__shfl_down_sync", "__shfl_xor_sync",
                                  "__ballot_sync", "__all_sync", "__any_sync", "__syncwarp",
                                  "__match_any_sync", "__reduce_add_sync", "__reduce_min_sync",
                                  "__reduce_max_sync", "__reduce_and_sync", "__reduce_or_sync",
                                  "__reduce_xor_sync"};
    return (op >= 0 && op < (int)(sizeof names / sizeof names[0])) ? names[op] : "?";
}

struct Scheduler {
    std::vector<Fiber> fibers;   // sized to the block; stacks are kept between launches
    Fiber* fb = nullptr;         // fibers.data(), for code that runs on a fiber
    std::vector<int> order;
    int nthreads = 0;
    Fiber* cur = nullptr;
    void* sched_sp = nullptr;
    void* sched_fake = nullptr;
    const void* sched_stack_bottom = nullptr;
    size_t sched_stack_size = 0;
    void (*body)(void**) = nullptr;
    void** args = nullptr;
    unsigned schedule = SCHEDULE_RANDOM;
    unsigned long long warned_poison = 0;
    // shared memory of this module: its whole TLS block (static __shared__ arrays and the
    // dynamic buffer), found once.
    unsigned char* tls_lo = nullptr;
    size_t tls_size = 0;
    unsigned char* dyn = nullptr;
    void* tsan_sched = nullptr;   // TSan's context of the scheduler (the runner's thread)
    char tsan_block_end = 0;      // sync object: every thread of a block -> the scheduler
};
Scheduler S;

CUH_NO_TSAN unsigned long long splitmix(unsigned long long& s) {
    unsigned long long z = (s += 0x9e3779b97f4a7c15ull);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
}

[[noreturn]] void fatal(const char* fmt, ...) __attribute__((format(printf, 1, 2)));
[[noreturn]] CUH_NO_TSAN void fatal(const char* fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    std::fprintf(stderr, "cuda_harness: FAULT: ");
    std::vfprintf(stderr, fmt, ap);
    va_end(ap);
    std::fprintf(stderr, " [block (%u,%u,%u) of grid (%u,%u,%u), block size (%u,%u,%u)]\n",
                 blockIdx.x, blockIdx.y, blockIdx.z, gridDim.x, gridDim.y, gridDim.z,
                 blockDim.x, blockDim.y, blockDim.z);
    std::fflush(stderr);
    _exit(86);
}

CUH_NO_TSAN void ensure_stacks(int n) {
    if ((int)S.fibers.size() >= n) return;
    int old = (int)S.fibers.size();
    S.fibers.resize(n);
    S.fb = S.fibers.data();
    for (int i = old; i < n; ++i) {
        Fiber& f = S.fibers[i];
        void* mem = mmap(nullptr, kStackSize + kGuard, PROT_READ | PROT_WRITE,
                         MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
        if (mem == MAP_FAILED) fatal("cannot map a fiber stack");
        mprotect(mem, kGuard, PROT_NONE);   // a stack overflow faults instead of corrupting
        f.stack_lo = (char*)mem + kGuard;
        f.stack_size = kStackSize;
#if CUH_TSAN
        f.tsan = __tsan_create_fiber(0);   // named in run_block, after its CUDA thread
#endif
    }
}

// x86-64 frame consumed by cuh_switch: [mxcsr|fpucw] r15 r14 r13 r12 rbx rbp ret
CUH_NO_TSAN void prepare(Fiber& f) {
    auto* top = (unsigned long long*)(f.stack_lo + f.stack_size - 64);
    auto* frame = top - 8;
    unsigned mxcsr; unsigned short fpucw;
    asm volatile("stmxcsr %0" : "=m"(mxcsr));
    asm volatile("fnstcw %0" : "=m"(fpucw));
    frame[0] = (unsigned long long)mxcsr | ((unsigned long long)fpucw << 32);
    frame[1] = frame[2] = frame[3] = 0;                 // r15 r14 r13
    frame[4] = (unsigned long long)&f;                  // r12 -> cuh_fiber_main's argument
    frame[5] = frame[6] = 0;                            // rbx, rbp (0 ends frame-pointer walks)
    frame[7] = (unsigned long long)&cuh_fiber_start;    // ret
    f.sp = frame;
}

CUH_NO_TSAN void resume(Fiber& f) {
    S.cur = &f;
    threadIdx = f.tid;
#if CUH_ASAN
    __sanitizer_start_switch_fiber(&S.sched_fake, f.stack_lo, f.stack_size);
#endif
#if CUH_TSAN
    __tsan_switch_to_fiber(f.tsan, 0);   // synchronising: the fiber sees the scheduler's writes
#endif
    cuh_switch(&S.sched_sp, f.sp);
#if CUH_ASAN
    __sanitizer_finish_switch_fiber(S.sched_fake, nullptr, nullptr);
#endif
    S.cur = nullptr;
}

// Called on the fiber: park (the state is already set) until the scheduler resumes it.
CUH_NO_TSAN void park() {
    Fiber* f = S.cur;
#if CUH_ASAN
    __sanitizer_start_switch_fiber(f->state == DONE ? nullptr : &f->fake_stack,
                                   S.sched_stack_bottom, S.sched_stack_size);
#endif
#if CUH_TSAN
    __tsan_switch_to_fiber(S.tsan_sched, __tsan_switch_to_fiber_no_sync);   // orders nothing
#endif
    cuh_switch(&f->sp, S.sched_sp);
#if CUH_ASAN
    __sanitizer_finish_switch_fiber(f->fake_stack, &S.sched_stack_bottom, &S.sched_stack_size);
#endif
}

CUH_NO_TSAN void find_shared_memory() {
    if (S.tls_lo) return;
    volatile unsigned char* touch = cuh_dyn_smem;   // make sure this thread's TLS block exists
    S.dyn = (unsigned char*)touch;
    Dl_info self{};
    if (!dladdr((void*)&find_shared_memory, &self)) fatal("dladdr failed on the module");
    struct Query { const void* base; unsigned char* lo; size_t size; } q{self.dli_fbase, nullptr, 0};
    dl_iterate_phdr([](dl_phdr_info* info, size_t, void* data) -> int {
        auto* q = (Query*)data;
        if ((const void*)info->dlpi_addr != q->base) return 0;
        for (int i = 0; i < info->dlpi_phnum; ++i)
            if (info->dlpi_phdr[i].p_type == PT_TLS) {
                q->lo = (unsigned char*)info->dlpi_tls_data;
                q->size = info->dlpi_phdr[i].p_memsz;
            }
        return 1;
    }, &q);
    if (!q.lo || S.dyn < q.lo || S.dyn + CUH_DYN_SMEM_CAPACITY > q.lo + q.size)
        fatal("could not locate the module's shared-memory (TLS) block");
    S.tls_lo = q.lo;
    S.tls_size = q.size;
}

// Every block starts with garbage in shared memory, as on a GPU: NaN for floats, -1 for ints.
CUH_NO_TSAN void poison_shared(unsigned dyn_bytes) {
    std::memset(S.tls_lo, 0xff, (size_t)(S.dyn - S.tls_lo));
    unsigned char* dyn_end = S.dyn + CUH_DYN_SMEM_CAPACITY;
    std::memset(dyn_end, 0xff, (size_t)(S.tls_lo + S.tls_size - dyn_end));
    std::memset(S.dyn, 0xff, dyn_bytes);
}

CUH_NO_TSAN unsigned live_lanes(int warp) {
    unsigned m = 0;
    const Fiber* fb = S.fb;   // may run on a fiber (__activemask): no vector call
    for (int l = 0; l < 32; ++l) {
        int t = warp * 32 + l;
        if (t < S.nthreads && fb[t].state != DONE) m |= 1u << l;
    }
    return m;
}

#if CUH_TSAN
// The n threads in who[] synchronise with one another, as a barrier they all reached does:
// each releases into a fresh sync object, then each acquires it. The scheduler does it in
// each thread's TSan context at the moment the barrier opens, so a thread that runs ahead
// afterwards cannot pass on what it did next. Raw arrays only: a libstdc++ call from this
// uninstrumented code would be instrumented and record the harness's own accesses.
Fiber* tsan_who[kMaxThreads];
CUH_NO_TSAN void tsan_sync_among(Fiber* const* who, int n) {
    void* obj = std::malloc(1);   // fresh: a reused object would carry earlier releases
    for (int i = 0; i < n; ++i) {
        __tsan_switch_to_fiber(who[i]->tsan, __tsan_switch_to_fiber_no_sync);
        __tsan_release(obj);
    }
    for (int i = 0; i < n; ++i) {
        __tsan_switch_to_fiber(who[i]->tsan, __tsan_switch_to_fiber_no_sync);
        __tsan_acquire(obj);
    }
    __tsan_switch_to_fiber(S.tsan_sched, __tsan_switch_to_fiber_no_sync);
    std::free(obj);
}

// The end of a block: everything its threads did happens before what the scheduler does
// next (shared-memory poisoning, the next block, copying results back to the runner).
CUH_NO_TSAN void tsan_block_end(Fiber* fb, int n) {
    for (int t = 0; t < n; ++t) {
        __tsan_switch_to_fiber(fb[t].tsan, __tsan_switch_to_fiber_no_sync);
        __tsan_release(&S.tsan_block_end);
    }
    __tsan_switch_to_fiber(S.tsan_sched, __tsan_switch_to_fiber_no_sync);
    __tsan_acquire(&S.tsan_block_end);
}
#endif

CUH_NO_TSAN int source_lane(const Fiber& f) {
    int w = f.width, lane = f.lane;
    if (w <= 0 || w > 32 || (w & (w - 1))) fatal("%s with width %d (must be a power of 2 <= 32)", op_name(f.op), w);
    int seg = lane & ~(w - 1);
    switch (f.op) {
        case W_SHFL_IDX: return seg + (f.arg & (w - 1));
        case W_SHFL_UP: { int s = lane - f.arg; return s < seg ? lane : s; }
        case W_SHFL_DOWN: { int s = lane + f.arg; return s >= seg + w ? lane : s; }
        default: { int s = lane ^ f.arg; return s >= seg + w ? lane : s; }   // W_SHFL_XOR
    }
}

// Complete the warp operations whose lanes have all arrived. True if any fiber was released.
CUH_NO_TSAN bool resolve_warps() {
    bool progress = false;
    int nwarps = (S.nthreads + 31) / 32;
    for (int w = 0; w < nwarps; ++w) {
        Fiber* lanes = &S.fibers[w * 32];
        int nl = std::min(32, S.nthreads - w * 32);
        unsigned waiting = 0;
        for (int l = 0; l < nl; ++l)
            if (lanes[l].state == AT_WARP) waiting |= 1u << l;
        unsigned live = live_lanes(w);
        unsigned handled = 0;
        for (int l = 0; l < nl; ++l) {
            if (!((waiting & ~handled) >> l & 1)) continue;
            const Fiber& first = lanes[l];
            unsigned mask = first.mask;
            if (!(mask >> l & 1))
                fatal("lane %d of warp %d calls %s with mask 0x%08x, which does not name the lane itself",
                      l, w, op_name(first.op), mask);
            unsigned need = mask & live;
            if ((need & waiting) != need) continue;   // a participant has not arrived yet
            for (int j = 0; j < nl; ++j)
                if ((need >> j & 1) && (lanes[j].op != first.op || lanes[j].mask != mask))
                    fatal("warp %d: lane %d is in %s(mask 0x%08x) while lane %d is in %s(mask 0x%08x)",
                          w, l, op_name(first.op), mask, j, op_name(lanes[j].op), lanes[j].mask);
            unsigned long long agg = 0;   // ballot / reductions over the participants
            bool all = true, any = false, have = false;
            for (int j = 0; j < nl; ++j) {
                if (!(need >> j & 1)) continue;
                unsigned long long b = lanes[j].bits;
                switch (first.op) {
                    case W_BALLOT: if (b) agg |= 1ull << j; break;
                    case W_ALL: all = all && b; break;
                    case W_ANY: any = any || b; break;
                    case W_REDUCE_ADD: agg = (unsigned)(agg + b); break;
                    case W_REDUCE_AND: agg = have ? (agg & b) : b; break;
                    case W_REDUCE_OR: agg |= b; break;
                    case W_REDUCE_XOR: agg ^= b; break;
                    case W_REDUCE_MIN: case W_REDUCE_MAX: {
                        bool less = first.is_signed ? (int)(unsigned)b < (int)(unsigned)agg
                                                    : (unsigned)b < (unsigned)agg;
                        bool better = first.op == W_REDUCE_MIN ? less : (!less && b != agg);
                        if (!have || better) agg = b;
                        break;
                    }
                    default: break;
                }
                have = true;
            }
#if CUH_TSAN
            if (first.op == W_SYNC) {   // __syncwarp orders memory among its lanes; the others do not
                int n = 0;
                for (int j = 0; j < nl; ++j)
                    if (need >> j & 1) tsan_who[n++] = &lanes[j];
                tsan_sync_among(tsan_who, n);
            }
#endif
            for (int j = 0; j < nl; ++j) {
                if (!(need >> j & 1)) continue;
                Fiber& f = lanes[j];
                switch (first.op) {
                    case W_SHFL_IDX: case W_SHFL_UP: case W_SHFL_DOWN: case W_SHFL_XOR: {
                        int src = source_lane(f);
                        if (src >= 0 && src < 32 && (need >> src & 1)) {
                            f.result = lanes[src].bits;
                        } else {
                            f.result = kPoisonBits;
                            if (!S.warned_poison++)
                                std::fprintf(stderr,
                                    "cuda_harness: warning: lane %d of warp %d read lane %d in %s, which is not "
                                    "a live participant (exited, absent or outside the mask): returned poison "
                                    "(NaN / -1) [block (%u,%u,%u)]\n",
                                    j, w, src, op_name(f.op), blockIdx.x, blockIdx.y, blockIdx.z);
                        }
                        break;
                    }
                    case W_BALLOT: f.result = agg; break;
                    case W_ALL: f.result = all; break;
                    case W_ANY: f.result = any; break;
                    case W_SYNC: f.result = 0; break;
                    case W_MATCH_ANY: {
                        unsigned long long m = 0;
                        for (int k = 0; k < nl; ++k) if ((need >> k & 1) && lanes[k].bits == f.bits) m |= 1ull << k;
                        f.result = m;
                        break;
                    }
                    default: f.result = agg; break;
                }
                f.state = RUNNABLE;
            }
            handled |= need;
            progress = true;
        }
    }
    return progress;
}

[[noreturn]] CUH_NO_TSAN void deadlock() {
    int at_bar = 0, at_warp = 0, done = 0;
    std::string detail;
    for (int t = 0; t < S.nthreads; ++t) {
        const Fiber& f = S.fibers[t];
        if (f.state == AT_BARRIER) ++at_bar;
        else if (f.state == DONE) ++done;
        else if (f.state == AT_WARP) {
            if (at_warp++ < 4) {
                char buf[160];
                std::snprintf(buf, sizeof buf, " thread %d (warp %d lane %d) waits in %s(mask 0x%08x);",
                              t, f.warp, f.lane, op_name(f.op), f.mask);
                detail += buf;
            }
        }
    }
    fatal("deadlock: %d threads wait at __syncthreads, %d at warp operations, %d have exited;%s",
          at_bar, at_warp, done, detail.c_str());
}

CUH_NO_TSAN const char* barrier_name(int op) {
    static const char* names[] = {"__syncthreads", "__syncthreads_count", "__syncthreads_and", "__syncthreads_or"};
    return (op >= 0 && op < 4) ? names[op] : "?";
}

// Every thread waiting at a barrier must wait at the same one (file, line and kind): threads
// at two different __syncthreads are a barrier in divergent code, undefined in CUDA.
CUH_NO_TSAN void check_one_barrier() {
    const Fiber* first = nullptr;
    for (int t = 0; t < S.nthreads; ++t) {
        const Fiber& f = S.fb[t];
        if (f.state != AT_BARRIER) continue;
        if (!first) { first = &f; continue; }
        if (f.bar_line != first->bar_line || f.op != first->op || std::strcmp(f.bar_file, first->bar_file) != 0)
            fatal("divergent barrier: thread (%u,%u,%u) waits at %s (%s:%d) while thread (%u,%u,%u) waits at "
                  "%s (%s:%d); every thread of a block that reaches a barrier must reach the same one",
                  first->tid.x, first->tid.y, first->tid.z, barrier_name(first->op), first->bar_file,
                  first->bar_line, f.tid.x, f.tid.y, f.tid.z, barrier_name(f.op), f.bar_file, f.bar_line);
    }
}

CUH_NO_TSAN void run_block(unsigned long long block_seed) {
    int n = S.nthreads;
    for (int t = 0; t < n; ++t) {
        Fiber& f = S.fibers[t];
        f.tid = uint3{t % blockDim.x, (t / blockDim.x) % blockDim.y, t / (blockDim.x * blockDim.y)};
        f.lane = t % 32;
        f.warp = t / 32;
        f.state = RUNNABLE;
#if CUH_TSAN
        // A TSan fiber lives as long as the module: a finished thread waits in park() and
        // runs its next block from there (restarting it would grow TSan's shadow stack).
        if (!f.started) prepare(f);
        f.started = true;
        char name[64];   // what a race report calls the thread
        std::snprintf(name, sizeof name, "threadIdx (%u,%u,%u) of blockIdx (%u,%u,%u)",
                      f.tid.x, f.tid.y, f.tid.z, blockIdx.x, blockIdx.y, blockIdx.z);
        __tsan_set_fiber_name(f.tsan, name);
#else
        f.fake_stack = nullptr;
        prepare(f);
#endif
    }
    unsigned long long rng = block_seed;
    for (;;) {
        if (S.schedule == SCHEDULE_RANDOM) {
            for (int i = n - 1; i > 0; --i) std::swap(S.order[i], S.order[splitmix(rng) % (unsigned long long)(i + 1)]);
        }
        for (int i = 0; i < n; ++i) {
            Fiber& f = S.fibers[S.order[i]];
            if (f.state == RUNNABLE) resume(f);
        }
        if (resolve_warps()) continue;
        int done = 0, at_bar = 0, pred_count = 0;
        for (int t = 0; t < n; ++t) {
            const Fiber& f = S.fibers[t];
            if (f.state == DONE) ++done;
            else if (f.state == AT_BARRIER) { ++at_bar; pred_count += f.pred != 0; }
        }
        if (done == n) {
#if CUH_TSAN
            tsan_block_end(S.fb, n);
#endif
            return;
        }
        if (done + at_bar != n) deadlock();
        check_one_barrier();
#if CUH_TSAN
        {   // the barrier orders memory among the threads that reached it
            int k = 0;
            for (int t = 0; t < n; ++t)
                if (S.fb[t].state == AT_BARRIER) tsan_who[k++] = &S.fb[t];
            tsan_sync_among(tsan_who, k);
        }
#endif
        for (int t = 0; t < n; ++t) {   // the barrier opens
            Fiber& f = S.fibers[t];
            if (f.state != AT_BARRIER) continue;
            switch (f.op) {
                case B_COUNT: f.result = (unsigned)pred_count; break;
                case B_AND: f.result = pred_count == at_bar; break;
                case B_OR: f.result = pred_count > 0; break;
                default: f.result = 0;
            }
            f.state = RUNNABLE;
        }
    }
}

CUH_NO_TSAN int fail(char* err, size_t errlen, const char* msg) {
    std::snprintf(err, errlen, "%s", msg);
    return 1;
}

CUH_NO_TSAN int run_grid(const LaunchConfig& c, void (*body)(void**), void** args, char* err, size_t errlen) {
    char msg[256];
    for (int i = 0; i < 3; ++i)
        if (c.grid[i] == 0 || c.block[i] == 0) return fail(err, errlen, "invalid configuration: a zero grid or block dimension");
    if (c.grid[0] > 0x7fffffffu || c.grid[1] > 65535u || c.grid[2] > 65535u)
        return fail(err, errlen, "invalid configuration: grid dimension too large (max 2^31-1 x 65535 x 65535)");
    if (c.block[0] > 1024u || c.block[1] > 1024u || c.block[2] > 64u)
        return fail(err, errlen, "invalid configuration: block dimension too large (max 1024 x 1024 x 64)");
    unsigned long long nt = (unsigned long long)c.block[0] * c.block[1] * c.block[2];
    if (nt > (unsigned long long)kMaxThreads) {
        std::snprintf(msg, sizeof msg, "invalid configuration: %llu threads per block (max %d)", nt, kMaxThreads);
        return fail(err, errlen, msg);
    }
    if (c.shared_mem > CUH_DYN_SMEM_CAPACITY) {
        std::snprintf(msg, sizeof msg, "invalid configuration: %u bytes of dynamic shared memory (max %d)",
                      c.shared_mem, CUH_DYN_SMEM_CAPACITY);
        return fail(err, errlen, msg);
    }
    find_shared_memory();
    S.nthreads = (int)nt;
    ensure_stacks(S.nthreads);
    S.order.resize(S.nthreads);
    for (int i = 0; i < S.nthreads; ++i)
        S.order[i] = c.schedule == SCHEDULE_REVERSE ? S.nthreads - 1 - i : i;
    S.body = body;
    S.args = args;
#if CUH_TSAN
    S.tsan_sched = __tsan_get_current_fiber();
#endif
    S.schedule = c.schedule;
    S.warned_poison = 0;
    gridDim = dim3(c.grid[0], c.grid[1], c.grid[2]);
    blockDim = dim3(c.block[0], c.block[1], c.block[2]);
#if CUH_ASAN
    // Bytes past the launch's dynamic shared memory are off limits.
    ASAN_POISON_MEMORY_REGION(S.dyn + c.shared_mem, CUH_DYN_SMEM_CAPACITY - c.shared_mem);
#endif
    unsigned long long nblocks = (unsigned long long)c.grid[0] * c.grid[1] * c.grid[2];
    unsigned long long rng = c.seed;
    // Blocks in a seeded order too (a permutation i -> (a*i + b) mod n with a odd and coprime to n).
    unsigned long long a = 1, b = 0;
    if (c.schedule == SCHEDULE_RANDOM && nblocks > 1) {
        auto gcd = [](unsigned long long x, unsigned long long y) { while (y) { auto t = x % y; x = y; y = t; } return x; };
        do { a = (splitmix(rng) % nblocks) | 1; } while (gcd(a, nblocks) != 1);
        b = splitmix(rng) % nblocks;
    }
    for (unsigned long long i = 0; i < nblocks; ++i) {
        unsigned long long k = c.schedule == SCHEDULE_REVERSE ? nblocks - 1 - i
                             : (unsigned long long)(((unsigned __int128)a * i + b) % nblocks);
        blockIdx = uint3{(unsigned)(k % c.grid[0]), (unsigned)((k / c.grid[0]) % c.grid[1]),
                         (unsigned)(k / ((unsigned long long)c.grid[0] * c.grid[1]))};
        poison_shared(c.shared_mem);
        run_block(c.seed ^ (0x5851f42d4c957f2dull * (k + 1)));
    }
#if CUH_ASAN
    ASAN_UNPOISON_MEMORY_REGION(S.dyn, CUH_DYN_SMEM_CAPACITY);
#endif
    return 0;
}

// ------------------------------------------------------------------ parameter signatures
template <class T> std::string type_code() {
    using U = std::remove_cv_t<T>;
    if constexpr (std::is_pointer<U>::value) {
        using P = std::remove_pointer_t<U>;
        return std::string("*") + (std::is_const<P>::value ? "c" : "") + type_code<P>();
    } else if constexpr (std::is_void<U>::value) {
        return "v";
    } else if constexpr (std::is_same<U, bool>::value) {
        return "b1";
    } else if constexpr (std::is_floating_point<U>::value) {
        return "f" + std::to_string(sizeof(U));
    } else if constexpr (std::is_integral<U>::value) {
        return (std::is_signed<U>::value ? "i" : "u") + std::to_string(sizeof(U));
    } else {
        return "V" + std::to_string(sizeof(U));   // a struct passed by value
    }
}

template <auto K> struct Launcher;
template <class... P, void (*K)(P...)> struct Launcher<K> {
    template <size_t... I> static void call(void** args, std::index_sequence<I...>) {
        // Each CUDA thread gets its own copy of the parameters, read through args[i] as
        // cudaLaunchKernel does.
        K(*static_cast<std::remove_cv_t<P>*>(args[I])...);
    }
    static void body(void** args) { call(args, std::index_sequence_for<P...>{}); }
    static int launch(const LaunchConfig* cfg, void** args, char* err, size_t errlen) {
        return run_grid(*cfg, &body, args, err, errlen);
    }
    static std::string signature() {
        std::string s;
        ((s += (s.empty() ? "" : ","), s += type_code<P>()), ...);
        return s;
    }
};

}  // namespace

CUH_NO_TSAN int block_sync(int kind, int pred, const char* file, int line) {
    Fiber* f = S.cur;
    f->state = AT_BARRIER;
    f->op = kind;
    f->pred = pred;
    f->bar_file = file;
    f->bar_line = line;
    park();
    return (int)f->result;
}

CUH_NO_TSAN unsigned long long warp_op(int op, unsigned mask, unsigned long long bits, int arg, int width, int is_signed) {
    Fiber* f = S.cur;
    f->state = AT_WARP;
    f->op = op;
    f->mask = mask;
    f->bits = bits;
    f->arg = arg;
    f->width = width;
    f->is_signed = is_signed;
    park();
    return f->result;
}

CUH_NO_TSAN unsigned active_mask() { return live_lanes(S.cur->warp); }

CUH_NO_TSAN void trap(const char* what) { fatal("%s", what); }

CUH_NO_TSAN unsigned long long clock_ticks() {
    return (unsigned long long)std::chrono::steady_clock::now().time_since_epoch().count();
}

}  // namespace cuh

// The state is set through S.cur, the fiber being run, not through the argument: a larger
// launch may have moved the Fibers since this one started (CUH_TSAN keeps fibers alive).
extern "C" __attribute__((used)) CUH_NO_TSAN void cuh_fiber_main(void* /*fiber*/) {
#if CUH_ASAN
    __sanitizer_finish_switch_fiber(nullptr, &cuh::S.sched_stack_bottom, &cuh::S.sched_stack_size);
#endif
#if CUH_TSAN
    for (;;) {   // see run_block: parked after each block, resumed for the next
        cuh::S.body(cuh::S.args);
        cuh::S.cur->state = cuh::DONE;
        cuh::park();
    }
#else
    cuh::S.body(cuh::S.args);
    cuh::S.cur->state = cuh::DONE;
    cuh::park();
    __builtin_unreachable();
#endif
}

#define CUH_BEGIN_ENTRIES                                                                       \
    extern "C" __attribute__((visibility("default"))) const cuh::ModuleInfo* cuh_module_info() { \
        struct Row { const char* name; std::string (*sig)(); cuh::LaunchFn fn; };                 \
        static const Row rows[] = {
#define CUH_ENTRY(name, ...)                                                                    \
            {name, &cuh::Launcher<&__VA_ARGS__>::signature, &cuh::Launcher<&__VA_ARGS__>::launch},
#define CUH_END_ENTRIES                                                                         \
        };                                                                                      \
        static std::vector<std::string> sigs;                                                   \
        static std::vector<cuh::Entry> entries;                                                 \
        static cuh::ModuleInfo info{};                                                          \
        if (entries.empty()) {                                                                  \
            for (const Row& r : rows) sigs.push_back(r.sig());                                  \
            for (size_t i = 0; i < sizeof rows / sizeof rows[0]; ++i)                           \
                entries.push_back(cuh::Entry{rows[i].name, sigs[i].c_str(), rows[i].fn});      \
            info = cuh::ModuleInfo{cuh::kAbiVersion, (int)entries.size(), entries.data()};      \
        }                                                                                       \
        return &info;                                                                           \
    }
