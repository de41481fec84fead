// metal_shim.h: run Metal kernel BODIES (mx.fast.metal_kernel style) on the CPU.
//
// The Python side (metal_shim.py) wraps a kernel body in the signature MLX
// would generate, places it inside `namespace metal` after this header, and
// compiles it with g++ into a shared library. Every GPU thread of a
// threadgroup runs as a cooperative fiber on one OS thread; fibers switch only
// at synchronisation points (threadgroup_barrier, simdgroup_barrier, simd_*
// and quad_* collectives, simdgroup matrix ops), so:
//   - `threadgroup` variables are shared by the threadgroup's threads,
//   - barriers and SIMD collectives block until every live thread / lane of
//     the group arrives, exactly as on the GPU,
//   - divergent collectives (lanes waiting at different barriers or calling
//     different collectives) are reported as errors instead of hanging.
// Threadgroups run one after another. The supported Metal subset is listed in
// metal/README.md; keep kernels inside it.
//
// Everything the kernel can see lives in `namespace metal` (the kernel itself
// is compiled inside that namespace), so unqualified calls such as exp(x) or
// abs(i) resolve to the Metal versions below and never to libc's.

#pragma once

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
#include <type_traits>

#ifdef MTLSHIM_UCONTEXT
#include <ucontext.h>
#endif

// ---------------------------------------------------------------------------
// Fiber runtime
// ---------------------------------------------------------------------------
namespace metal_shim {

struct Fiber;
struct SimdGroup;
struct Group;

// Per-thread attribute values (the [[...]] kernel arguments).
struct Attrs {
  unsigned tpg[3];       // thread_position_in_grid
  unsigned tptg[3];      // thread_position_in_threadgroup
  unsigned tgpig[3];     // threadgroup_position_in_grid
  unsigned tptg_n[3];    // threads_per_threadgroup (actual size of this group)
  unsigned dtptg[3];     // dispatch_threads_per_threadgroup
  unsigned tgpg[3];      // threadgroups_per_grid
  unsigned tpgrid[3];    // threads_per_grid
  unsigned index_in_tg;  // thread_index_in_threadgroup
  unsigned lane;         // thread_index_in_simdgroup
  unsigned sg_index;     // simdgroup_index_in_threadgroup
  unsigned sg_count;     // simdgroups_per_threadgroup
  unsigned dsg_count;    // dispatch_simdgroups_per_threadgroup
};

// Lane exchange area of one simdgroup. Two generations alternate so a lane
// that already moved on to the next collective cannot overwrite values that
// slower lanes of the previous one still read.
constexpr int kSlotBytes = 64;     // largest value one lane may exchange
constexpr int kResultBytes = 512;  // uniform results (one per quad for quad_*)
struct SimdGroup;
typedef void (*FinishFn)(SimdGroup&, int parity);
struct SimdGroup {
  int nlanes = 0;        // lanes in this simdgroup (< 32 in a partial last group)
  int alive = 0;         // lanes that have not returned
  int arrived = 0;       // lanes waiting at the current collective
  unsigned gen = 0;      // completed collectives
  const char* tag = nullptr;  // which collective the arrived lanes called
  FinishFn finish = nullptr;  // computes the uniform result once all lanes arrived
  int width = 32;             // reduction width of the pending collective
  unsigned mask[2] = {0, 0};  // lanes that took part, per generation parity
  alignas(64) unsigned char slot[2][32][kSlotBytes];
  alignas(64) unsigned char result[2][kResultBytes];
};

// Completes the pending collective of `s` (all live lanes have arrived).
inline void complete(SimdGroup& s) {
  int p = s.gen & 1;
  if (s.finish) s.finish(s, p);
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
  void (*body)(const Attrs&, void*) = nullptr;
  void* body_ctx = nullptr;
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
  r->body(f->a, r->body_ctx);
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
inline int launch(const unsigned grid[3], const unsigned tg_in[3], size_t stack_bytes, unsigned order,
                  void (*body)(const Attrs&, void*), void* body_ctx, char* err, int errlen) {
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
  slot = prev;
  return rc;
}

}  // namespace metal_shim

// ---------------------------------------------------------------------------
// Address-space qualifiers and attributes: no-ops on the CPU. `threadgroup`
// declarations (`threadgroup float buf[N];`) are rewritten by the code
// generator into MTLSHIM_THREADGROUP declarations (one instance shared by all
// fibers; threadgroups run one at a time); `threadgroup` in pointer types
// simply disappears.
// ---------------------------------------------------------------------------
#define device
#define constant
#define thread
#define threadgroup
#define ray_data
#define object_data
#define MTLSHIM_THREADGROUP static thread_local
#define METAL_FUNC inline
#define METAL_CONST static constexpr const
#define MLX_MTL_CONST static constexpr const
#define MLX_MTL_PRAGMA_UNROLL
#define STEEL_CONST static constexpr const
#define STEEL_PRAGMA_UNROLL

namespace metal {

typedef unsigned int uint;
typedef unsigned short ushort;
typedef unsigned char uchar;
typedef unsigned long ulong;
using ::int8_t;
using ::int16_t;
using ::int32_t;
using ::int64_t;
using ::uint8_t;
using ::uint16_t;
using ::uint32_t;
using ::uint64_t;
using ::size_t;

// ---------------------------------------------------------------------------
// half and bfloat: 16-bit storage, every operation computed in float and
// rounded to nearest-even (exactly the correctly rounded 16-bit result for
// + - * / and sqrt, since float carries more than 2p+2 bits).
// ---------------------------------------------------------------------------
namespace detail {
inline uint32_t f2u(float f) { uint32_t u; std::memcpy(&u, &f, 4); return u; }
inline float u2f(uint32_t u) { float f; std::memcpy(&f, &u, 4); return f; }

inline uint16_t float_to_bf16(float f) {
  uint32_t u = f2u(f);
  if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40);  // quiet NaN
  u += 0x7fffu + ((u >> 16) & 1u);
  return (uint16_t)(u >> 16);
}
inline float bf16_to_float(uint16_t b) { return u2f((uint32_t)b << 16); }

inline uint16_t float_to_f16(float f) {
#if defined(__FLT16_MAX__)
  _Float16 h = (_Float16)f;
  uint16_t b;
  std::memcpy(&b, &h, 2);
  return b;
#else
  uint32_t x = f2u(f);
  uint32_t sign = (x >> 16) & 0x8000u;
  uint32_t ax = x & 0x7fffffffu;
  if (ax > 0x7f800000u) return (uint16_t)(sign | 0x7e00u);
  if (ax >= 0x47800000u) return (uint16_t)(sign | 0x7c00u);  // overflow (after rounding checked below)
  if (ax < 0x33000000u) return (uint16_t)sign;                // < half of the smallest subnormal
  int e = (int)(ax >> 23) - 127;
  uint32_t m = (ax & 0x7fffffu) | 0x800000u;
  int shift = (e < -14) ? (13 + (-14 - e)) : 13;
  uint32_t base = (e < -14) ? 0 : (uint32_t)(e + 15) << 10;
  uint32_t mant = m >> shift;
  uint32_t rem = m & ((1u << shift) - 1);
  uint32_t halfway = 1u << (shift - 1);
  uint32_t r = (e < -14) ? mant : (base | (mant & 0x3ffu));
  if (rem > halfway || (rem == halfway && (r & 1u))) r++;
  return (uint16_t)(sign | r);
#endif
}
inline float f16_to_float(uint16_t b) {
#if defined(__FLT16_MAX__)
  _Float16 h;
  std::memcpy(&h, &b, 2);
  return (float)h;
#else
  uint32_t sign = (uint32_t)(b & 0x8000u) << 16;
  uint32_t e = (b >> 10) & 0x1f, m = b & 0x3ffu;
  if (e == 0x1f) return u2f(sign | 0x7f800000u | (m << 13));
  if (e == 0) {
    float v = (float)m * 5.9604644775390625e-08f;
    return sign ? -v : v;
  }
  return u2f(sign | ((e + 112) << 23) | (m << 13));
#endif
}
}  // namespace detail

template <class Tag>
struct f16base;

struct half_tag {
  static uint16_t enc(float f) { return detail::float_to_f16(f); }
  static float dec(uint16_t b) { return detail::f16_to_float(b); }
};
struct bfloat_tag {
  static uint16_t enc(float f) { return detail::float_to_bf16(f); }
  static float dec(uint16_t b) { return detail::bf16_to_float(b); }
};

template <class Tag>
struct f16base {
  uint16_t bits;
  f16base() = default;
  f16base(float f) : bits(Tag::enc(f)) {}
  f16base(double f) : bits(Tag::enc((float)f)) {}
  template <class I, typename std::enable_if<std::is_integral<I>::value, int>::type = 0>
  f16base(I i) : bits(Tag::enc((float)i)) {}
  template <class O, typename std::enable_if<!std::is_same<O, Tag>::value, int>::type = 0>
  explicit f16base(f16base<O> o) : bits(Tag::enc((float)o)) {}
  operator float() const { return Tag::dec(bits); }
  f16base operator-() const { f16base r; r.bits = bits ^ 0x8000u; return r; }
  f16base operator+() const { return *this; }
};

typedef f16base<half_tag> half;
typedef f16base<bfloat_tag> bfloat;
typedef half float16_t;
typedef bfloat bfloat16_t;

template <class T>
struct is_f16 : std::false_type {};
template <class Tag>
struct is_f16<f16base<Tag>> : std::true_type {};

// Binary arithmetic: same 16-bit type -> that type; with float -> float; with
// an integer -> the 16-bit type (as Metal's usual arithmetic conversions).
#define MTLSHIM_F16_BINOP(OP)                                                                   \
  template <class Tag>                                                                          \
  inline f16base<Tag> operator OP(f16base<Tag> a, f16base<Tag> b) {                             \
    return f16base<Tag>((float)a OP(float) b);                                                  \
  }                                                                                             \
  template <class Tag>                                                                          \
  inline float operator OP(f16base<Tag> a, float b) { return (float)a OP b; }                   \
  template <class Tag>                                                                          \
  inline float operator OP(float a, f16base<Tag> b) { return a OP(float) b; }                   \
  template <class Tag>                                                                          \
  inline float operator OP(f16base<Tag> a, double b) { return (float)a OP(float) b; }           \
  template <class Tag>                                                                          \
  inline float operator OP(double a, f16base<Tag> b) { return (float)a OP(float) b; }           \
  template <class Tag, class I, typename std::enable_if<std::is_integral<I>::value, int>::type = 0> \
  inline f16base<Tag> operator OP(f16base<Tag> a, I b) {                                        \
    return f16base<Tag>((float)a OP(float) f16base<Tag>(b));                                    \
  }                                                                                             \
  template <class Tag, class I, typename std::enable_if<std::is_integral<I>::value, int>::type = 0> \
  inline f16base<Tag> operator OP(I a, f16base<Tag> b) {                                        \
    return f16base<Tag>((float)f16base<Tag>(a) OP(float) b);                                    \
  }
MTLSHIM_F16_BINOP(+)
MTLSHIM_F16_BINOP(-)
MTLSHIM_F16_BINOP(*)
MTLSHIM_F16_BINOP(/)
#undef MTLSHIM_F16_BINOP

#define MTLSHIM_F16_CMP(OP)                                                                      \
  template <class Tag>                                                                           \
  inline bool operator OP(f16base<Tag> a, f16base<Tag> b) { return (float)a OP(float) b; }       \
  template <class Tag>                                                                           \
  inline bool operator OP(f16base<Tag> a, float b) { return (float)a OP b; }                     \
  template <class Tag>                                                                           \
  inline bool operator OP(float a, f16base<Tag> b) { return a OP(float) b; }                     \
  template <class Tag>                                                                           \
  inline bool operator OP(f16base<Tag> a, double b) { return (float)a OP(float) b; }             \
  template <class Tag>                                                                           \
  inline bool operator OP(double a, f16base<Tag> b) { return (float)a OP(float) b; }             \
  template <class Tag, class I, typename std::enable_if<std::is_integral<I>::value, int>::type = 0> \
  inline bool operator OP(f16base<Tag> a, I b) { return (float)a OP(float) b; }                  \
  template <class Tag, class I, typename std::enable_if<std::is_integral<I>::value, int>::type = 0> \
  inline bool operator OP(I a, f16base<Tag> b) { return (float)a OP(float) b; }
MTLSHIM_F16_CMP(<)
MTLSHIM_F16_CMP(>)
MTLSHIM_F16_CMP(<=)
MTLSHIM_F16_CMP(>=)
MTLSHIM_F16_CMP(==)
MTLSHIM_F16_CMP(!=)
#undef MTLSHIM_F16_CMP

#define MTLSHIM_F16_ASSIGN(OP)                                                     \
  template <class Tag, class U>                                                    \
  inline f16base<Tag>& operator OP##=(f16base<Tag>& a, U b) {                      \
    a = f16base<Tag>((float)(a OP b));                                             \
    return a;                                                                      \
  }                                                                                \
  template <class Tag>                                                             \
  inline float& operator OP##=(float& a, f16base<Tag> b) {                         \
    a = a OP(float) b;                                                             \
    return a;                                                                      \
  }
MTLSHIM_F16_ASSIGN(+)
MTLSHIM_F16_ASSIGN(-)
MTLSHIM_F16_ASSIGN(*)
MTLSHIM_F16_ASSIGN(/)
#undef MTLSHIM_F16_ASSIGN

// ---------------------------------------------------------------------------
// Vector types: vec<T, N> with .x .y .z .w (no swizzles), operator[],
// element-wise arithmetic with vectors and scalars. float3 is 16 bytes, as in
// Metal.
// ---------------------------------------------------------------------------
template <class T, int N>
struct vec;

#define MTLSHIM_VEC_COMMON(N)                                                          \
  T& operator[](int i) { return (&x)[i]; }                                             \
  const T& operator[](int i) const { return (&x)[i]; }                                 \
  template <class U, typename std::enable_if<!std::is_same<U, T>::value, int>::type = 0> \
  explicit vec(const vec<U, N>& o) {                                                   \
    for (int i = 0; i < N; i++) (*this)[i] = static_cast<T>(o[i]);                     \
  }

template <class T>
struct vec<T, 2> {
  T x, y;
  vec() = default;
  vec(T v) : x(v), y(v) {}
  vec(T a, T b) : x(a), y(b) {}
  MTLSHIM_VEC_COMMON(2)
};
template <class T>
struct alignas(4 * sizeof(T)) vec<T, 3> {
  T x, y, z;
  vec() = default;
  vec(T v) : x(v), y(v), z(v) {}
  vec(T a, T b, T c) : x(a), y(b), z(c) {}
  vec(vec<T, 2> a, T c) : x(a.x), y(a.y), z(c) {}
  vec(T a, vec<T, 2> b) : x(a), y(b.x), z(b.y) {}
  MTLSHIM_VEC_COMMON(3)
};
template <class T>
struct vec<T, 4> {
  T x, y, z, w;
  vec() = default;
  vec(T v) : x(v), y(v), z(v), w(v) {}
  vec(T a, T b, T c, T d) : x(a), y(b), z(c), w(d) {}
  vec(vec<T, 2> a, vec<T, 2> b) : x(a.x), y(a.y), z(b.x), w(b.y) {}
  vec(vec<T, 3> a, T d) : x(a.x), y(a.y), z(a.z), w(d) {}
  vec(vec<T, 2> a, T c, T d) : x(a.x), y(a.y), z(c), w(d) {}
  MTLSHIM_VEC_COMMON(4)
};
#undef MTLSHIM_VEC_COMMON

#define MTLSHIM_VEC_BINOP(OP)                                                                          \
  template <class T, int N>                                                                            \
  inline vec<T, N> operator OP(const vec<T, N>& a, const vec<T, N>& b) {                               \
    vec<T, N> r;                                                                                       \
    for (int i = 0; i < N; i++) r[i] = a[i] OP b[i];                                                   \
    return r;                                                                                          \
  }                                                                                                    \
  template <class T, int N, class S, typename std::enable_if<!std::is_class<S>::value || is_f16<S>::value, int>::type = 0> \
  inline vec<T, N> operator OP(const vec<T, N>& a, S b) {                                              \
    vec<T, N> r;                                                                                       \
    for (int i = 0; i < N; i++) r[i] = a[i] OP static_cast<T>(b);                                      \
    return r;                                                                                          \
  }                                                                                                    \
  template <class T, int N, class S, typename std::enable_if<!std::is_class<S>::value || is_f16<S>::value, int>::type = 0> \
  inline vec<T, N> operator OP(S a, const vec<T, N>& b) {                                              \
    vec<T, N> r;                                                                                       \
    for (int i = 0; i < N; i++) r[i] = static_cast<T>(a) OP b[i];                                      \
    return r;                                                                                          \
  }                                                                                                    \
  template <class T, int N, class U>                                                                   \
  inline vec<T, N>& operator OP##=(vec<T, N>& a, const U& b) {                                         \
    a = a OP b;                                                                                        \
    return a;                                                                                          \
  }
MTLSHIM_VEC_BINOP(+)
MTLSHIM_VEC_BINOP(-)
MTLSHIM_VEC_BINOP(*)
MTLSHIM_VEC_BINOP(/)
MTLSHIM_VEC_BINOP(&)
MTLSHIM_VEC_BINOP(|)
MTLSHIM_VEC_BINOP(^)
MTLSHIM_VEC_BINOP(<<)
MTLSHIM_VEC_BINOP(>>)
MTLSHIM_VEC_BINOP(%)
#undef MTLSHIM_VEC_BINOP

template <class T, int N>
inline vec<T, N> operator-(const vec<T, N>& a) {
  vec<T, N> r;
  for (int i = 0; i < N; i++) r[i] = -a[i];
  return r;
}

#define MTLSHIM_VEC_TYPES(T, NAME) \
  typedef vec<T, 2> NAME##2;       \
  typedef vec<T, 3> NAME##3;       \
  typedef vec<T, 4> NAME##4;
MTLSHIM_VEC_TYPES(float, float)
MTLSHIM_VEC_TYPES(half, half)
MTLSHIM_VEC_TYPES(bfloat, bfloat)
MTLSHIM_VEC_TYPES(int, int)
MTLSHIM_VEC_TYPES(uint, uint)
MTLSHIM_VEC_TYPES(short, short)
MTLSHIM_VEC_TYPES(ushort, ushort)
MTLSHIM_VEC_TYPES(char, char)
MTLSHIM_VEC_TYPES(uchar, uchar)
MTLSHIM_VEC_TYPES(bool, bool)
MTLSHIM_VEC_TYPES(long, long)
MTLSHIM_VEC_TYPES(ulong, ulong)
#undef MTLSHIM_VEC_TYPES

template <class T, int N>
inline T dot(const vec<T, N>& a, const vec<T, N>& b) {
  T r = a[0] * b[0];
  for (int i = 1; i < N; i++) r = r + a[i] * b[i];
  return r;
}

// ---------------------------------------------------------------------------
// Math (scalar float / half / bfloat, element-wise on vectors). Only functions
// that Metal has: no log1p, expm1, erf, ... on purpose.
// ---------------------------------------------------------------------------
#define MTLSHIM_UNARY(NAME, EXPR)                                                       \
  inline float NAME(float x) { return EXPR; }                                          \
  inline half NAME(half h) { float x = h; return half(EXPR); }                          \
  inline bfloat NAME(bfloat h) { float x = h; return bfloat(EXPR); }                    \
  template <class T, int N>                                                             \
  inline vec<T, N> NAME(const vec<T, N>& v) {                                           \
    vec<T, N> r;                                                                        \
    for (int i = 0; i < N; i++) r[i] = NAME(v[i]);                                      \
    return r;                                                                           \
  }

#define MTLSHIM_MATH_UNARY_LIST                                                 \
  MTLSHIM_UNARY(exp, __builtin_expf(x))                                         \
  MTLSHIM_UNARY(exp2, __builtin_exp2f(x))                                       \
  MTLSHIM_UNARY(exp10, __builtin_powf(10.0f, x))                                \
  MTLSHIM_UNARY(log, __builtin_logf(x))                                         \
  MTLSHIM_UNARY(log2, __builtin_log2f(x))                                       \
  MTLSHIM_UNARY(log10, __builtin_log10f(x))                                     \
  MTLSHIM_UNARY(sqrt, __builtin_sqrtf(x))                                       \
  MTLSHIM_UNARY(rsqrt, 1.0f / __builtin_sqrtf(x))                               \
  MTLSHIM_UNARY(sin, __builtin_sinf(x))                                         \
  MTLSHIM_UNARY(cos, __builtin_cosf(x))                                         \
  MTLSHIM_UNARY(tan, __builtin_tanf(x))                                         \
  MTLSHIM_UNARY(asin, __builtin_asinf(x))                                       \
  MTLSHIM_UNARY(acos, __builtin_acosf(x))                                       \
  MTLSHIM_UNARY(atan, __builtin_atanf(x))                                       \
  MTLSHIM_UNARY(sinh, __builtin_sinhf(x))                                       \
  MTLSHIM_UNARY(cosh, __builtin_coshf(x))                                       \
  MTLSHIM_UNARY(tanh, __builtin_tanhf(x))                                       \
  MTLSHIM_UNARY(asinh, __builtin_asinhf(x))                                     \
  MTLSHIM_UNARY(acosh, __builtin_acoshf(x))                                     \
  MTLSHIM_UNARY(atanh, __builtin_atanhf(x))                                     \
  MTLSHIM_UNARY(sinpi, __builtin_sinf(x * 3.14159265358979323846f))             \
  MTLSHIM_UNARY(cospi, __builtin_cosf(x * 3.14159265358979323846f))             \
  MTLSHIM_UNARY(tanpi, __builtin_tanf(x * 3.14159265358979323846f))             \
  MTLSHIM_UNARY(fabs, __builtin_fabsf(x))                                       \
  MTLSHIM_UNARY(floor, __builtin_floorf(x))                                     \
  MTLSHIM_UNARY(ceil, __builtin_ceilf(x))                                       \
  MTLSHIM_UNARY(round, __builtin_roundf(x))                                     \
  MTLSHIM_UNARY(rint, __builtin_rintf(x))                                       \
  MTLSHIM_UNARY(trunc, __builtin_truncf(x))                                     \
  MTLSHIM_UNARY(fract, __builtin_fminf(x - __builtin_floorf(x), 0x1.fffffep-1f)) \
  MTLSHIM_UNARY(saturate, __builtin_fminf(__builtin_fmaxf(x, 0.0f), 1.0f))     \
  MTLSHIM_UNARY(sign, (x > 0.0f ? 1.0f : (x < 0.0f ? -1.0f : (x != x ? 0.0f : x))))

#define MTLSHIM_BINARY(NAME, EXPR)                                                          \
  inline float NAME(float x, float y) { return EXPR; }                                     \
  inline half NAME(half a, half b) { float x = a, y = b; return half(EXPR); }               \
  inline bfloat NAME(bfloat a, bfloat b) { float x = a, y = b; return bfloat(EXPR); }       \
  template <class T, int N>                                                                 \
  inline vec<T, N> NAME(const vec<T, N>& a, const vec<T, N>& b) {                           \
    vec<T, N> r;                                                                            \
    for (int i = 0; i < N; i++) r[i] = NAME(a[i], b[i]);                                    \
    return r;                                                                               \
  }

#define MTLSHIM_MATH_BINARY_LIST                               \
  MTLSHIM_BINARY(pow, __builtin_powf(x, y))                    \
  MTLSHIM_BINARY(powr, __builtin_powf(x, y))                   \
  MTLSHIM_BINARY(atan2, __builtin_atan2f(x, y))                \
  MTLSHIM_BINARY(fmod, __builtin_fmodf(x, y))                  \
  MTLSHIM_BINARY(fmax, __builtin_fmaxf(x, y))                  \
  MTLSHIM_BINARY(fmin, __builtin_fminf(x, y))                  \
  MTLSHIM_BINARY(fdim, __builtin_fdimf(x, y))                  \
  MTLSHIM_BINARY(copysign, __builtin_copysignf(x, y))          \
  MTLSHIM_BINARY(step, (y < x ? 0.0f : 1.0f))                  \
  MTLSHIM_BINARY(divide, x / y)

#define MTLSHIM_TERNARY(NAME, EXPR)                                                                 \
  inline float NAME(float x, float y, float z) { return EXPR; }                                    \
  inline half NAME(half a, half b, half c) { float x = a, y = b, z = c; return half(EXPR); }        \
  inline bfloat NAME(bfloat a, bfloat b, bfloat c) { float x = a, y = b, z = c; return bfloat(EXPR); } \
  template <class T, int N>                                                                         \
  inline vec<T, N> NAME(const vec<T, N>& a, const vec<T, N>& b, const vec<T, N>& c) {               \
    vec<T, N> r;                                                                                    \
    for (int i = 0; i < N; i++) r[i] = NAME(a[i], b[i], c[i]);                                      \
    return r;                                                                                       \
  }

#define MTLSHIM_MATH_TERNARY_LIST                                         \
  MTLSHIM_TERNARY(fma, __builtin_fmaf(x, y, z))                           \
  MTLSHIM_TERNARY(mix, x + (y - x) * z)                                   \
  MTLSHIM_TERNARY(fmax3, __builtin_fmaxf(__builtin_fmaxf(x, y), z))       \
  MTLSHIM_TERNARY(fmin3, __builtin_fminf(__builtin_fminf(x, y), z))       \
  MTLSHIM_TERNARY(smoothstep, ([&] { float t = __builtin_fminf(__builtin_fmaxf((z - x) / (y - x), 0.0f), 1.0f); return t * t * (3.0f - 2.0f * t); }()))

MTLSHIM_MATH_UNARY_LIST
MTLSHIM_MATH_BINARY_LIST
MTLSHIM_MATH_TERNARY_LIST

// metal::fast:: and metal::precise:: carry the same functions (the shim has
// one accuracy: libm's).
namespace fast {
MTLSHIM_MATH_UNARY_LIST
MTLSHIM_MATH_BINARY_LIST
MTLSHIM_MATH_TERNARY_LIST
}  // namespace fast
namespace precise {
MTLSHIM_MATH_UNARY_LIST
MTLSHIM_MATH_BINARY_LIST
MTLSHIM_MATH_TERNARY_LIST
}  // namespace precise

#undef MTLSHIM_UNARY
#undef MTLSHIM_BINARY
#undef MTLSHIM_TERNARY

// abs/max/min/clamp for floating and integer scalars and vectors.
inline float abs(float x) { return __builtin_fabsf(x); }
inline half abs(half x) { return half(__builtin_fabsf((float)x)); }
inline bfloat abs(bfloat x) { return bfloat(__builtin_fabsf((float)x)); }
inline int abs(int x) { return x < 0 ? -x : x; }
inline long abs(long x) { return x < 0 ? -x : x; }
inline short abs(short x) { return x < 0 ? -x : x; }
inline char abs(char x) { return x < 0 ? -x : x; }
inline uint abs(uint x) { return x; }

#define MTLSHIM_MINMAX(T)                                                              \
  inline T max(T a, T b) { return a > b ? a : b; }                                     \
  inline T min(T a, T b) { return a < b ? a : b; }                                     \
  inline T clamp(T x, T lo, T hi) { return min(max(x, lo), hi); }                      \
  inline T max3(T a, T b, T c) { return max(max(a, b), c); }                          \
  inline T min3(T a, T b, T c) { return min(min(a, b), c); }                           \
  inline T median3(T a, T b, T c) { return max(min(a, b), min(max(a, b), c)); }
MTLSHIM_MINMAX(int)
MTLSHIM_MINMAX(uint)
MTLSHIM_MINMAX(long)
MTLSHIM_MINMAX(ulong)
MTLSHIM_MINMAX(short)
MTLSHIM_MINMAX(ushort)
MTLSHIM_MINMAX(char)
MTLSHIM_MINMAX(uchar)
#undef MTLSHIM_MINMAX
// Floating max/min follow fmax/fmin (a NaN operand yields the other one).
inline float max(float a, float b) { return __builtin_fmaxf(a, b); }
inline float min(float a, float b) { return __builtin_fminf(a, b); }
inline half max(half a, half b) { return half(__builtin_fmaxf(a, b)); }
inline half min(half a, half b) { return half(__builtin_fminf(a, b)); }
inline bfloat max(bfloat a, bfloat b) { return bfloat(__builtin_fmaxf(a, b)); }
inline bfloat min(bfloat a, bfloat b) { return bfloat(__builtin_fminf(a, b)); }
inline float clamp(float x, float lo, float hi) { return __builtin_fminf(__builtin_fmaxf(x, lo), hi); }
inline half clamp(half x, half lo, half hi) { return half(clamp((float)x, (float)lo, (float)hi)); }
inline bfloat clamp(bfloat x, bfloat lo, bfloat hi) { return bfloat(clamp((float)x, (float)lo, (float)hi)); }

template <class T, int N>
inline vec<T, N> abs(const vec<T, N>& a) {
  vec<T, N> r;
  for (int i = 0; i < N; i++) r[i] = abs(a[i]);
  return r;
}
template <class T, int N>
inline vec<T, N> max(const vec<T, N>& a, const vec<T, N>& b) {
  vec<T, N> r;
  for (int i = 0; i < N; i++) r[i] = max(a[i], b[i]);
  return r;
}
template <class T, int N>
inline vec<T, N> min(const vec<T, N>& a, const vec<T, N>& b) {
  vec<T, N> r;
  for (int i = 0; i < N; i++) r[i] = min(a[i], b[i]);
  return r;
}
template <class T, int N>
inline vec<T, N> clamp(const vec<T, N>& x, const vec<T, N>& lo, const vec<T, N>& hi) {
  vec<T, N> r;
  for (int i = 0; i < N; i++) r[i] = clamp(x[i], lo[i], hi[i]);
  return r;
}

// Relational / classification.
inline bool isnan(float x) { return x != x; }
inline bool isnan(half x) { return (float)x != (float)x; }
inline bool isnan(bfloat x) { return (float)x != (float)x; }
inline bool isinf(float x) { return __builtin_isinf(x); }
inline bool isinf(half x) { return __builtin_isinf((float)x); }
inline bool isinf(bfloat x) { return __builtin_isinf((float)x); }
inline bool isfinite(float x) { return __builtin_isfinite(x); }
inline bool isfinite(half x) { return __builtin_isfinite((float)x); }
inline bool isfinite(bfloat x) { return __builtin_isfinite((float)x); }
inline bool signbit(float x) { return __builtin_signbit(x); }
template <class T>
inline T select(T a, T b, bool c) { return c ? b : a; }
inline bool all(bool b) { return b; }
inline bool any(bool b) { return b; }
template <int N>
inline bool all(const vec<bool, N>& v) {
  for (int i = 0; i < N; i++) if (!v[i]) return false;
  return true;
}
template <int N>
inline bool any(const vec<bool, N>& v) {
  for (int i = 0; i < N; i++) if (v[i]) return true;
  return false;
}

// Integer helpers.
inline uint popcount(uint x) { return __builtin_popcount(x); }
inline int popcount(int x) { return __builtin_popcount((uint)x); }
inline ulong popcount(ulong x) { return __builtin_popcountl(x); }
inline uint clz(uint x) { return x ? __builtin_clz(x) : 32; }
inline uint ctz(uint x) { return x ? __builtin_ctz(x) : 32; }
inline uint mulhi(uint a, uint b) { return (uint)(((uint64_t)a * b) >> 32); }
inline int mulhi(int a, int b) { return (int)(((int64_t)a * b) >> 32); }

template <class T, int N>
inline T length(const vec<T, N>& v) { return sqrt(dot(v, v)); }
template <class T, int N>
inline T length_squared(const vec<T, N>& v) { return dot(v, v); }
template <class T, int N>
inline vec<T, N> normalize(const vec<T, N>& v) { return v * rsqrt(dot(v, v)); }

// as_type<T>(x): bit reinterpretation between types of the same size.
template <class T, class U>
inline T as_type(const U& u) {
  static_assert(sizeof(T) == sizeof(U), "as_type needs types of the same size");
  T t;
  std::memcpy(&t, &u, sizeof(T));
  return t;
}

// numeric_limits, the subset Metal kernels use.
template <class T>
struct numeric_limits;
template <>
struct numeric_limits<float> {
  static constexpr float max() { return 3.40282347e+38f; }
  static constexpr float min() { return 1.17549435e-38f; }
  static constexpr float lowest() { return -3.40282347e+38f; }
  static constexpr float epsilon() { return 1.1920929e-07f; }
  static constexpr float infinity() { return __builtin_inff(); }
  static constexpr float quiet_NaN() { return __builtin_nanf(""); }
};
template <>
struct numeric_limits<half> {
  static half max() { return half(65504.0f); }
  static half lowest() { return half(-65504.0f); }
  static half min() { return half(6.103515625e-05f); }
  static half epsilon() { return half(0.0009765625f); }
  static half infinity() { return half(__builtin_inff()); }
};
template <>
struct numeric_limits<bfloat> {
  static bfloat max() { bfloat b; b.bits = 0x7f7f; return b; }
  static bfloat lowest() { bfloat b; b.bits = 0xff7f; return b; }
  static bfloat min() { bfloat b; b.bits = 0x0080; return b; }
  static bfloat epsilon() { return bfloat(0.0078125f); }
  static bfloat infinity() { bfloat b; b.bits = 0x7f80; return b; }
};
#define MTLSHIM_INT_LIMITS(T, LO, HI)                       \
  template <>                                               \
  struct numeric_limits<T> {                                \
    static constexpr T max() { return HI; }                 \
    static constexpr T min() { return LO; }                 \
    static constexpr T lowest() { return LO; }              \
  };
MTLSHIM_INT_LIMITS(int, (-2147483647 - 1), 2147483647)
MTLSHIM_INT_LIMITS(uint, 0u, 4294967295u)
MTLSHIM_INT_LIMITS(short, (short)-32768, (short)32767)
MTLSHIM_INT_LIMITS(ushort, (ushort)0, (ushort)65535)
MTLSHIM_INT_LIMITS(long, (-9223372036854775807L - 1), 9223372036854775807L)
#undef MTLSHIM_INT_LIMITS

#define INFINITY __builtin_inff()
#define NAN __builtin_nanf("")
#define MAXFLOAT 3.40282347e+38f
#define FLT_MAX 3.40282347e+38f
#define HUGE_VALF __builtin_inff()

// ---------------------------------------------------------------------------
// Synchronisation.
// ---------------------------------------------------------------------------
enum class mem_flags : unsigned {
  mem_none = 0,
  mem_device = 1,
  mem_threadgroup = 2,
  mem_texture = 4,
  mem_threadgroup_imageblock = 8,
  mem_object_data = 16,
};
inline mem_flags operator|(mem_flags a, mem_flags b) { return (mem_flags)((unsigned)a | (unsigned)b); }

// Every flag combination is a full execution barrier of the threadgroup
// (memory is always coherent: all fibers share one OS thread).
inline void threadgroup_barrier(mem_flags) { metal_shim::threadgroup_barrier_impl(); }
inline void simdgroup_barrier(mem_flags) {
  metal_shim::simd_collective("simdgroup_barrier", nullptr, 0, nullptr);
}

// ---------------------------------------------------------------------------
// SIMD-group collectives (32 lanes). Reductions combine the live lanes with
// the ascending butterfly (xor 1, 2, 4, 8, 16), the order MLX's kernels assume
// simd_sum lowers to; lanes that returned contribute the identity.
// Shuffles reading a lane that returned give the caller's own value
// (undefined on the GPU).
// ---------------------------------------------------------------------------
namespace detail {
template <class T>
struct Add { T operator()(T a, T b) const { return a + b; } };
template <class T>
struct Mul { T operator()(T a, T b) const { return a * b; } };
template <class T>
struct Max { T operator()(T a, T b) const { return max(a, b); } };
template <class T>
struct Min { T operator()(T a, T b) const { return min(a, b); } };
template <class T>
struct And { T operator()(T a, T b) const { return a & b; } };
template <class T>
struct Or { T operator()(T a, T b) const { return a | b; } };
template <class T>
struct Xor { T operator()(T a, T b) const { return a ^ b; } };

template <class T>
inline T lane_value(unsigned char (*slots)[metal_shim::kSlotBytes], unsigned l) {
  T v;
  std::memcpy(&v, slots[l], sizeof(T));
  return v;
}

// Butterfly reduction over groups of `s.width` consecutive lanes (32 for
// simd_*, 4 for quad_*): level m combines lane l with lane l^m, m = 1, 2, 4...
// Lanes that returned are skipped (their partner's value passes through).
// Writes one value per group into the generation's uniform result.
template <class T, class Op>
inline void butterfly_finish(metal_shim::SimdGroup& s, int p) {
  unsigned width = (unsigned)s.width, mask = s.mask[p];
  T v[32];
  bool have[32];
  for (unsigned l = 0; l < 32; l++) {
    have[l] = (mask >> l) & 1u;
    if (have[l]) v[l] = lane_value<T>(s.slot[p], l);
  }
  Op op;
  for (unsigned m = 1; m < width; m <<= 1) {
    T nv[32];
    bool nh[32];
    for (unsigned l = 0; l < 32; l++) {
      unsigned o = l ^ m;
      if (have[l] && have[o]) nv[l] = op(v[l], v[o]);
      else if (have[l]) nv[l] = v[l];
      else if (have[o]) nv[l] = v[o];
      nh[l] = have[l] || have[o];
    }
    for (unsigned l = 0; l < 32; l++) {
      if (nh[l]) v[l] = nv[l];
      have[l] = nh[l];
    }
  }
  for (unsigned g = 0; g < 32 / width; g++) {
    unsigned l = g * width;
    if (have[l]) std::memcpy(s.result[p] + g * sizeof(T), &v[l], sizeof(T));
  }
}

inline unsigned my_lane() { return metal_shim::rt()->cur->a.lane; }

template <class T, class Op>
inline T reduce(const char* tag, T x, unsigned width) {
  static_assert(sizeof(T) <= (size_t)metal_shim::kSlotBytes, "type too large for a simd reduction");
  static_assert(sizeof(T) * 8 <= (size_t)metal_shim::kResultBytes, "type too large for a quad reduction");
  int p = metal_shim::simd_collective(tag, &x, sizeof(T), &butterfly_finish<T, Op>, (int)width);
  T r;
  std::memcpy(&r, metal_shim::my_simdgroup().result[p] + (my_lane() / width) * sizeof(T), sizeof(T));
  return r;
}

// Reads lane `src` of the exchange (own value when src is not a live lane).
template <class T>
inline T shuffle(const char* tag, T x, int src) {
  int p = metal_shim::simd_collective(tag, &x, sizeof(T), nullptr);
  metal_shim::SimdGroup& s = metal_shim::my_simdgroup();
  if (src < 0 || src >= 32 || !((s.mask[p] >> src) & 1u)) return x;
  return lane_value<T>(s.slot[p], (unsigned)src);
}

template <class T>
inline T prefix(const char* tag, T x, bool inclusive, bool product) {
  int p = metal_shim::simd_collective(tag, &x, sizeof(T), nullptr);
  metal_shim::SimdGroup& s = metal_shim::my_simdgroup();
  unsigned me = my_lane();
  T acc = product ? T(1) : T(0);
  for (unsigned l = 0; l < me + (inclusive ? 1u : 0u); l++) {
    if ((s.mask[p] >> l) & 1u) {
      T v = lane_value<T>(s.slot[p], l);
      acc = product ? T(acc * v) : T(acc + v);
    }
  }
  return acc;
}
}  // namespace detail

template <class T> inline T simd_sum(T x) { return detail::reduce<T, detail::Add<T>>("simd_sum", x, 32); }
template <class T> inline T simd_product(T x) { return detail::reduce<T, detail::Mul<T>>("simd_product", x, 32); }
template <class T> inline T simd_max(T x) { return detail::reduce<T, detail::Max<T>>("simd_max", x, 32); }
template <class T> inline T simd_min(T x) { return detail::reduce<T, detail::Min<T>>("simd_min", x, 32); }
template <class T> inline T simd_and(T x) { return detail::reduce<T, detail::And<T>>("simd_and", x, 32); }
template <class T> inline T simd_or(T x) { return detail::reduce<T, detail::Or<T>>("simd_or", x, 32); }
template <class T> inline T simd_xor(T x) { return detail::reduce<T, detail::Xor<T>>("simd_xor", x, 32); }
template <class T> inline T quad_sum(T x) { return detail::reduce<T, detail::Add<T>>("quad_sum", x, 4); }
template <class T> inline T quad_max(T x) { return detail::reduce<T, detail::Max<T>>("quad_max", x, 4); }
template <class T> inline T quad_min(T x) { return detail::reduce<T, detail::Min<T>>("quad_min", x, 4); }

template <class T> inline T simd_shuffle(T x, ushort lane) { return detail::shuffle("simd_shuffle", x, (int)lane); }
template <class T> inline T simd_broadcast(T x, ushort lane) { return detail::shuffle("simd_broadcast", x, (int)lane); }
template <class T> inline T simd_shuffle_xor(T x, ushort mask) {
  return detail::shuffle("simd_shuffle_xor", x, (int)(detail::my_lane() ^ (mask & 31u)));
}
template <class T> inline T simd_shuffle_down(T x, ushort delta) {
  return detail::shuffle("simd_shuffle_down", x, (int)(detail::my_lane() + delta));
}
template <class T> inline T simd_shuffle_up(T x, ushort delta) {
  return detail::shuffle("simd_shuffle_up", x, (int)detail::my_lane() - (int)delta);
}
template <class T> inline T simd_shuffle_rotate_down(T x, ushort delta) {
  return detail::shuffle("simd_shuffle_rotate_down", x, (int)((detail::my_lane() + delta) & 31u));
}
template <class T> inline T simd_shuffle_rotate_up(T x, ushort delta) {
  return detail::shuffle("simd_shuffle_rotate_up", x, (int)((detail::my_lane() + 32u - (delta & 31u)) & 31u));
}
template <class T> inline T quad_shuffle_xor(T x, ushort mask) {
  return detail::shuffle("quad_shuffle_xor", x, (int)(detail::my_lane() ^ (mask & 3u)));
}
template <class T> inline T quad_broadcast(T x, ushort lane) {
  return detail::shuffle("quad_broadcast", x, (int)((detail::my_lane() & ~3u) | (lane & 3u)));
}
template <class T> inline T simd_broadcast_first(T x) {
  int p = metal_shim::simd_collective("simd_broadcast_first", &x, sizeof(T), nullptr);
  metal_shim::SimdGroup& s = metal_shim::my_simdgroup();
  return detail::lane_value<T>(s.slot[p], (unsigned)__builtin_ctz(s.mask[p]));
}
template <class T> inline T simd_prefix_inclusive_sum(T x) { return detail::prefix("simd_prefix_inclusive_sum", x, true, false); }
template <class T> inline T simd_prefix_exclusive_sum(T x) { return detail::prefix("simd_prefix_exclusive_sum", x, false, false); }
template <class T> inline T simd_prefix_inclusive_product(T x) { return detail::prefix("simd_prefix_inclusive_product", x, true, true); }
template <class T> inline T simd_prefix_exclusive_product(T x) { return detail::prefix("simd_prefix_exclusive_product", x, false, true); }

// simd_ballot returns a simd_vote; only its integer value is supported.
struct simd_vote {
  typedef uint64_t vote_t;
  vote_t v;
  explicit operator vote_t() const { return v; }
  bool any() const { return v != 0; }
};
inline simd_vote simd_ballot(bool b) {
  int p = metal_shim::simd_collective("simd_ballot", &b, sizeof(bool), nullptr);
  metal_shim::SimdGroup& s = metal_shim::my_simdgroup();
  uint64_t v = 0;
  for (unsigned l = 0; l < 32; l++)
    if (((s.mask[p] >> l) & 1u) && detail::lane_value<bool>(s.slot[p], l)) v |= 1ull << l;
  return simd_vote{v};
}
inline bool simd_all(bool b) { return detail::reduce<int, detail::And<int>>("simd_all", b ? -1 : 0, 32) != 0; }
inline bool simd_any(bool b) { return detail::reduce<int, detail::Or<int>>("simd_any", b ? 1 : 0, 32) != 0; }
inline bool simd_is_first() {
  char dummy = 0;
  int p = metal_shim::simd_collective("simd_is_first", &dummy, 1, nullptr);
  return (unsigned)__builtin_ctz(metal_shim::my_simdgroup().mask[p]) == detail::my_lane();
}

// ---------------------------------------------------------------------------
// Atomics (device/threadgroup atomic<T>, the *_explicit free functions).
// Fibers never switch inside these, so plain read-modify-write is atomic.
// ---------------------------------------------------------------------------
enum memory_order { memory_order_relaxed, memory_order_acquire, memory_order_release, memory_order_acq_rel, memory_order_seq_cst };
template <class T>
struct atomic {
  T v;
};
typedef atomic<int> atomic_int;
typedef atomic<uint> atomic_uint;
typedef atomic<float> atomic_float;
typedef atomic<bool> atomic_bool;
template <class T, class U> inline void atomic_store_explicit(atomic<T>* a, U v, memory_order) { a->v = (T)v; }
template <class T> inline T atomic_load_explicit(const atomic<T>* a, memory_order) { return a->v; }
template <class T, class U> inline T atomic_exchange_explicit(atomic<T>* a, U v, memory_order) { T o = a->v; a->v = (T)v; return o; }
template <class T, class U> inline T atomic_fetch_add_explicit(atomic<T>* a, U v, memory_order) { T o = a->v; a->v = o + (T)v; return o; }
template <class T, class U> inline T atomic_fetch_sub_explicit(atomic<T>* a, U v, memory_order) { T o = a->v; a->v = o - (T)v; return o; }
template <class T, class U> inline T atomic_fetch_max_explicit(atomic<T>* a, U v, memory_order) { T o = a->v; a->v = max(o, (T)v); return o; }
template <class T, class U> inline T atomic_fetch_min_explicit(atomic<T>* a, U v, memory_order) { T o = a->v; a->v = min(o, (T)v); return o; }
template <class T, class U> inline T atomic_fetch_and_explicit(atomic<T>* a, U v, memory_order) { T o = a->v; a->v = o & (T)v; return o; }
template <class T, class U> inline T atomic_fetch_or_explicit(atomic<T>* a, U v, memory_order) { T o = a->v; a->v = o | (T)v; return o; }
template <class T, class U> inline T atomic_fetch_xor_explicit(atomic<T>* a, U v, memory_order) { T o = a->v; a->v = o ^ (T)v; return o; }
template <class T, class U>
inline bool atomic_compare_exchange_weak_explicit(atomic<T>* a, T* expected, U desired, memory_order, memory_order) {
  if (a->v == *expected) { a->v = (T)desired; return true; }
  *expected = a->v;
  return false;
}

// elem_to_loc from MLX's utils.h, for kernels made with ensure_row_contiguous=False.
template <typename IdxT = int64_t>
inline IdxT elem_to_loc(IdxT elem, const int* shape, const int64_t* strides, int ndim) {
  IdxT loc = 0;
  for (int i = ndim - 1; i >= 0 && elem > 0; --i) {
    loc += (elem % shape[i]) * IdxT(strides[i]);
    elem /= shape[i];
  }
  return loc;
}

}  // namespace metal


#include "metal_shim_simdgroup_matrix.h"
