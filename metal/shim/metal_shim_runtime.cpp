// metal_shim_runtime.cpp: the fiber runtime of the Metal shim (ordinary C++).
//
// Every GPU thread of a threadgroup runs as a cooperative fiber on one OS
// thread; fibers switch only at synchronisation points (threadgroup_barrier,
// simdgroup_barrier, simd_* and quad_* collectives, simdgroup matrix ops), so:
//   - threadgroup memory is shared by the threadgroup's threads,
//   - barriers and SIMD collectives block until every live thread / lane of
//     the group arrives, exactly as on the GPU,
//   - divergent collectives (lanes waiting at different barriers or calling
//     different collectives) are reported as errors instead of hanging.
// Threadgroups run one after another. The kernel translation unit (metal_shim.h,
// compiled as C++ for OpenCL) reaches this file only through the C entry points
// declared in metal_shim_runtime.h; metal_shim.py compiles this file once and
// links it into every kernel library.

// Fibers switch with a few lines of assembly on x86-64 ELF (Linux); elsewhere
// (or with -DMTLSHIM_USE_UCONTEXT) with the slower POSIX ucontext calls.
#if !(defined(__x86_64__) && defined(__ELF__) && !defined(MTLSHIM_USE_UCONTEXT))
#define MTLSHIM_UCONTEXT 1
#if defined(__APPLE__) && !defined(_XOPEN_SOURCE)
#define _XOPEN_SOURCE 600
#endif
#endif

#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>

#ifdef MTLSHIM_UCONTEXT
#include <ucontext.h>
#endif

#include "metal_shim_runtime.h"

// ---------------------------------------------------------------------------
// Fiber runtime
// ---------------------------------------------------------------------------
namespace metal_shim {

// Completes the pending collective of `s` (all live lanes have arrived).
inline void complete(SimdGroup& s) {
  int p = s.gen & 1;
  if (s.finish) s.finish(&s, p);
  s.arrived = 0;
  s.gen++;
}

struct Group {
  int nthreads = 0;
  int alive = 0;
  int arrived = 0;
  unsigned gen = 0;
  SimdGroup* sg = nullptr;
  int nsg = 0;
};

struct Fiber {
  void* sp = nullptr;
  char* stack_lo = nullptr;
  bool done = false;
  bool started = false;
  Attrs a;
#ifdef MTLSHIM_UCONTEXT
  ucontext_t uc;
#endif
};

struct Runtime {
  Group group;
  Fiber* fibers = nullptr;
  int nfibers_cap = 0;
  char* stacks = nullptr;
  size_t stack_bytes = 0;
  Fiber* cur = nullptr;
  void* sched_sp = nullptr;
#ifdef MTLSHIM_UCONTEXT
  ucontext_t sched_uc;
#endif
  unsigned long long events = 0;  // progress counter for deadlock detection
  bool failed = false;
  char err[1024] = {0};
  BodyFn body = nullptr;
  void* body_ctx = nullptr;
  // Threadgroup memory, one block per declaration site (see mtlshim_threadgroup_memory).
  enum { kMaxSites = 64 };
  void* tg_mem[kMaxSites] = {nullptr};
  unsigned long tg_bytes[kMaxSites] = {0};
};

inline Runtime*& rt() {
  static thread_local Runtime* r = nullptr;
  return r;
}

inline void fail(const char* msg) {
  Runtime* r = rt();
  if (!r->failed) {
    r->failed = true;
    const Attrs& a = r->cur->a;
    snprintf(r->err, sizeof(r->err),
             "%s (thread_position_in_grid=(%u,%u,%u), threadgroup_position_in_grid=(%u,%u,%u))",
             msg, a.tpg[0], a.tpg[1], a.tpg[2], a.tgpig[0], a.tgpig[1], a.tgpig[2]);
  }
}

#ifndef MTLSHIM_UCONTEXT
// Minimal x86-64 SysV context switch: save callee-saved registers plus the
// SSE/x87 control words on the current stack, store the stack pointer in
// *save, load `load` and restore from there.
extern "C" void mtlshim_swap(void** save, void* load);
extern "C" void mtlshim_fiber_entry();
asm(R"(
.text
.p2align 4
.hidden mtlshim_swap
.globl mtlshim_swap
.type mtlshim_swap,@function
mtlshim_swap:
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
.size mtlshim_swap,.-mtlshim_swap
.p2align 4
.hidden mtlshim_fiber_entry
.globl mtlshim_fiber_entry
.type mtlshim_fiber_entry,@function
mtlshim_fiber_entry:
  movq %r12, %rdi
  call mtlshim_fiber_main
  ud2
.size mtlshim_fiber_entry,.-mtlshim_fiber_entry
)");
#endif

// Runs one GPU thread; never returns (switches back to the scheduler).
extern "C" __attribute__((used, visibility("hidden"))) void mtlshim_fiber_main(Fiber* f);

inline void switch_to_scheduler() {
  Runtime* r = rt();
  Fiber* f = r->cur;
#ifdef MTLSHIM_UCONTEXT
  swapcontext(&f->uc, &r->sched_uc);
#else
  mtlshim_swap(&f->sp, r->sched_sp);
#endif
}

// Called by a fiber waiting for other threads; after an error the threadgroup
// is abandoned, so waiting fibers are never resumed.
inline void yield() { switch_to_scheduler(); }

inline SimdGroup& my_simdgroup() {
  Runtime* r = rt();
  return r->group.sg[r->cur->a.sg_index];
}

// A lane leaves its simdgroup/threadgroup (returned from the kernel): the
// collectives and barriers it will never reach complete without it.
inline void thread_exit() {
  Runtime* r = rt();
  Group& g = r->group;
  SimdGroup& s = my_simdgroup();
  s.alive--;
  if (s.arrived > 0 && s.arrived == s.alive) complete(s);
  g.alive--;
  if (g.arrived > 0 && g.arrived == g.alive) {
    g.arrived = 0;
    g.gen++;
  }
  r->events++;
}

extern "C" __attribute__((used, visibility("hidden"))) inline void mtlshim_fiber_main(Fiber* f) {
  Runtime* r = rt();
  r->body(&f->a, r->body_ctx);
  f->done = true;
  thread_exit();
  switch_to_scheduler();
  __builtin_trap();
}

#ifdef MTLSHIM_UCONTEXT
inline void ucontext_entry() { mtlshim_fiber_main(rt()->cur); }
#endif

inline void threadgroup_barrier_impl() {
  Runtime* r = rt();
  Group& g = r->group;
  unsigned gen = g.gen;
  g.arrived++;
  r->events++;
  if (g.arrived == g.alive) {
    g.arrived = 0;
    g.gen++;
    return;
  }
  while (g.gen == gen) {
    yield();
  }
}

// Collective over the lanes of the calling thread's simdgroup. Each lane
// stores `bytes` bytes of `value` in its slot; when the last live lane
// arrives (or the last missing one returns), `finish` runs once to fill the
// uniform result, and every lane then reads that generation's slots/result.
// Returns the generation parity to read from.
inline int simd_collective(const char* tag, const void* value, size_t bytes, FinishFn finish, int width = 32) {
  Runtime* r = rt();
  SimdGroup& s = my_simdgroup();
  unsigned lane = r->cur->a.lane;
  unsigned gen = s.gen;
  int p = gen & 1;
  if (bytes > (size_t)kSlotBytes) {
    fail("metal shim: value too large for a simd collective");
    while (true) yield();
  }
  if (s.arrived == 0) {
    s.tag = tag;
    s.finish = finish;
    s.width = width;
    s.mask[p] = 0;
  } else if (s.tag != tag && std::strcmp(s.tag, tag) != 0) {
    static thread_local char msg[256];
    snprintf(msg, sizeof(msg),
             "metal shim: divergent simdgroup collectives: lanes wait in %s and %s (lane %u)",
             s.tag, tag, lane);
    fail(msg);
    while (true) yield();
  }
  if (bytes) std::memcpy(s.slot[p][lane], value, bytes);
  s.mask[p] |= 1u << lane;
  s.arrived++;
  r->events++;
  if (s.arrived == s.alive) {
    complete(s);
    return p;
  }
  while (s.gen == gen) {
    yield();
  }
  return p;
}

// Executes the whole grid. Returns 0 on success, 1 on error (message in err).
// order: 0 = threads of a group start in index order, 1 = reverse order,
// other values = a pseudo-random order seeded by `order` (to expose kernels
// that read threadgroup memory written by other threads without a barrier).
inline int launch(const unsigned grid[3], const unsigned tg_in[3], size_t stack_bytes, unsigned order, BodyFn body,
                  void* body_ctx, char* err, int errlen) {
  Runtime R;
  Runtime*& slot = rt();
  Runtime* prev = slot;
  slot = &R;
  R.body = body;
  R.body_ctx = body_ctx;
  unsigned tg[3], ntg[3];
  for (int d = 0; d < 3; d++) {
    if (grid[d] == 0 || tg_in[d] == 0) {
      snprintf(err, errlen, "metal shim: grid and threadgroup sizes must be positive");
      slot = prev;
      return 1;
    }
    tg[d] = tg_in[d] < grid[d] ? tg_in[d] : grid[d];  // as MLX: min(threadgroup, grid)
    ntg[d] = (grid[d] + tg[d] - 1) / tg[d];
  }
  unsigned tg_total = tg[0] * tg[1] * tg[2];
  if (tg_total > 1024) {
    snprintf(err, errlen, "metal shim: threadgroup of %u threads exceeds the 1024 allowed by Metal", tg_total);
    slot = prev;
    return 1;
  }
  stack_bytes = (stack_bytes + 4095) & ~(size_t)4095;
  R.stack_bytes = stack_bytes;
  R.fibers = new Fiber[tg_total];
  R.stacks = (char*)std::malloc(stack_bytes * tg_total);
  int max_sg = (tg_total + 31) / 32;
  SimdGroup* sgs = new SimdGroup[max_sg];
  unsigned* perm = new unsigned[tg_total];
  unsigned long long rng = 0x9E3779B97F4A7C15ull * (order | 1);
  int rc = 0;
  if (!R.stacks) {
    snprintf(err, errlen, "metal shim: cannot allocate %zu bytes of fiber stacks", stack_bytes * tg_total);
    rc = 1;
  }
  const unsigned kCanary = 0xC0FFEE11u;

  for (unsigned gz = 0; gz < ntg[2] && !rc; gz++)
    for (unsigned gy = 0; gy < ntg[1] && !rc; gy++)
      for (unsigned gx = 0; gx < ntg[0] && !rc; gx++) {
        unsigned gpos[3] = {gx, gy, gz};
        unsigned n[3];
        for (int d = 0; d < 3; d++) {
          unsigned start = gpos[d] * tg[d];
          n[d] = grid[d] - start < tg[d] ? grid[d] - start : tg[d];  // non-uniform edge groups
        }
        unsigned nthreads = n[0] * n[1] * n[2];
        int nsg = (nthreads + 31) / 32;
        Group& G = R.group;
        G.nthreads = nthreads;
        G.alive = nthreads;
        G.arrived = 0;
        G.gen = 0;
        G.sg = sgs;
        G.nsg = nsg;
        for (int s = 0; s < nsg; s++) {
          SimdGroup& S = sgs[s];
          S.nlanes = (s == nsg - 1) ? (int)(nthreads - 32 * s) : 32;
          S.alive = S.nlanes;
          S.arrived = 0;
          S.gen = 0;
          S.tag = nullptr;
          S.mask[0] = S.mask[1] = 0;
        }
        for (unsigned i = 0; i < nthreads; i++) {
          Fiber& f = R.fibers[i];
          f.done = false;
          f.started = false;
          unsigned lx = i % n[0], ly = (i / n[0]) % n[1], lz = i / (n[0] * n[1]);
          Attrs& a = f.a;
          unsigned l[3] = {lx, ly, lz};
          for (int d = 0; d < 3; d++) {
            a.tptg[d] = l[d];
            a.tgpig[d] = gpos[d];
            a.tpg[d] = gpos[d] * tg[d] + l[d];
            a.tptg_n[d] = n[d];
            a.dtptg[d] = tg[d];
            a.tgpg[d] = ntg[d];
            a.tpgrid[d] = grid[d];
          }
          a.index_in_tg = i;
          a.lane = i % 32;
          a.sg_index = i / 32;
          a.sg_count = nsg;
          a.dsg_count = (tg_total + 31) / 32;
          f.stack_lo = R.stacks + (size_t)i * stack_bytes;
          std::memcpy(f.stack_lo, &kCanary, sizeof(kCanary));
          char* top = f.stack_lo + stack_bytes;  // 4096-aligned
#ifdef MTLSHIM_UCONTEXT
          getcontext(&f.uc);
          f.uc.uc_stack.ss_sp = f.stack_lo;
          f.uc.uc_stack.ss_size = stack_bytes;
          f.uc.uc_link = nullptr;
          makecontext(&f.uc, (void (*)())ucontext_entry, 0);
#else
          // Initial frame popped by mtlshim_swap: control words, r15..r12, rbx,
          // rbp, then the return address (the entry stub). r12 holds the fiber.
          uint64_t* sp = (uint64_t*)top;
          *--sp = (uint64_t)(void*)&mtlshim_fiber_entry;  // return address, at top-8
          *--sp = 0;                  // rbp
          *--sp = 0;                  // rbx
          *--sp = (uint64_t)&f;       // r12
          *--sp = 0;                  // r13
          *--sp = 0;                  // r14
          *--sp = 0;                  // r15
          uint32_t mxcsr;
          uint16_t fcw;
          asm volatile("stmxcsr %0" : "=m"(mxcsr));
          asm volatile("fnstcw %0" : "=m"(fcw));
          uint64_t cw = (uint64_t)mxcsr | ((uint64_t)fcw << 32);
          *--sp = cw;
          f.sp = sp;
#endif
        }
        // Order in which fibers are visited each round.
        for (unsigned i = 0; i < nthreads; i++) perm[i] = (order == 1) ? nthreads - 1 - i : i;
        if (order > 1) {
          for (unsigned i = nthreads - 1; i > 0; i--) {
            rng ^= rng << 13; rng ^= rng >> 7; rng ^= rng << 17;
            unsigned j = (unsigned)(rng % (i + 1));
            unsigned t = perm[i]; perm[i] = perm[j]; perm[j] = t;
          }
        }
        // Round-robin until every thread of the group has returned.
        while (G.alive > 0 && !R.failed) {
          unsigned long long before = R.events;
          for (unsigned k = 0; k < nthreads && !R.failed; k++) {
            Fiber& f = R.fibers[perm[k]];
            if (f.done) continue;
            R.cur = &f;
            f.started = true;
#ifdef MTLSHIM_UCONTEXT
            swapcontext(&R.sched_uc, &f.uc);
#else
            mtlshim_swap(&R.sched_sp, f.sp);
#endif
          }
          if (!R.failed && R.events == before && G.alive > 0) {
            snprintf(R.err, sizeof(R.err),
                     "metal shim: deadlock in threadgroup (%u,%u,%u): threads wait at different "
                     "barriers/collectives (a barrier or simd op in divergent control flow?)",
                     gx, gy, gz);
            R.failed = true;
          }
        }
        for (unsigned i = 0; i < nthreads && !R.failed; i++) {
          unsigned c;
          std::memcpy(&c, R.fibers[i].stack_lo, sizeof(c));
          if (c != kCanary) {
            snprintf(R.err, sizeof(R.err),
                     "metal shim: a thread overflowed its %zu-byte stack; pass a larger stack_kb", stack_bytes);
            R.failed = true;
          }
        }
        if (R.failed) {
          snprintf(err, errlen, "%s", R.err);
          rc = 1;
        }
      }
  delete[] perm;
  delete[] sgs;
  std::free(R.stacks);
  delete[] R.fibers;
  for (int i = 0; i < Runtime::kMaxSites; i++) std::free(R.tg_mem[i]);
  slot = prev;
  return rc;
}

// One block per threadgroup declaration, made on first use and kept for the
// launch: threadgroups run one after another, so they take turns with it, and
// (as uninitialised GPU memory would) it starts as all-ones bytes (NaN for floats)
// and keeps what earlier threadgroups wrote.
inline void* threadgroup_memory(int site, unsigned long bytes) {
  Runtime* r = rt();
  if (site < 0 || site >= Runtime::kMaxSites) {
    fail("metal shim: too many threadgroup declarations (at most 64 per kernel)");
    while (true) yield();
  }
  if (!r->tg_mem[site]) {
    r->tg_mem[site] = std::aligned_alloc(64, (bytes + 63) & ~63ul);
    std::memset(r->tg_mem[site], 0xFF, bytes);
    r->tg_bytes[site] = bytes;
  }
  return r->tg_mem[site];
}

}  // namespace metal_shim

// ---------------------------------------------------------------------------
// The C entry points the kernel translation unit calls (metal_shim_runtime.h).
// ---------------------------------------------------------------------------
extern "C" {
int mtlshim_simd_collective(const char* tag, const void* value, unsigned long bytes, metal_shim::FinishFn finish,
                            int width) {
  return metal_shim::simd_collective(tag, value, bytes, finish, width);
}
metal_shim::SimdGroup* mtlshim_simdgroup(void) { return &metal_shim::my_simdgroup(); }
unsigned mtlshim_lane(void) { return metal_shim::rt()->cur->a.lane; }
void mtlshim_threadgroup_barrier(void) { metal_shim::threadgroup_barrier_impl(); }
void mtlshim_fail(const char* msg) {
  metal_shim::fail(msg);
  while (true) metal_shim::yield();
}
void* mtlshim_threadgroup_memory(int site, unsigned long bytes) {
  return metal_shim::threadgroup_memory(site, bytes);
}
int mtlshim_launch(const unsigned* grid, const unsigned* tg, unsigned long stack_bytes, unsigned order,
                   metal_shim::BodyFn body, void* ctx, char* err, int errlen) {
  return metal_shim::launch(grid, tg, stack_bytes, order, body, ctx, err, errlen);
}
}
