// metal_shim_runtime.h: what the kernel translation unit and the fiber runtime share.
//
// The shim builds every kernel from two translation units linked into one
// shared library:
//   - the kernel (metal_shim.h + the generated signature + the body), compiled
//     by clang as C++ for OpenCL, so address spaces are checked as in MSL and
//     neither the C++ standard library nor libc is visible to kernel code;
//   - the runtime (metal_shim_runtime.cpp: fibers, barriers, SIMD exchange,
//     threadgroup memory, the grid loop), ordinary C++.
// This header holds the plain data both sides read and the C entry points of the
// runtime. It includes nothing and compiles in both language modes.

#pragma once

#if defined(__OPENCL_CPP_VERSION__)
// Function pointers (the collective's finish step, the kernel entry) are a clang
// extension in C++ for OpenCL; string literals live in the constant address space.
#pragma OPENCL EXTENSION __cl_clang_function_pointers : enable
#define MTLSHIM_CSTR __constant char
#else
#define MTLSHIM_CSTR char
#endif

namespace metal_shim {

// Largest value one lane may exchange in a collective, and the uniform result area
// (one value per quad for quad_*).
enum { kSlotBytes = 64, kResultBytes = 512 };

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

struct SimdGroup;
// Computes the uniform result of a collective once all live lanes have arrived.
typedef void (*FinishFn)(SimdGroup* s, int parity);

// Lane exchange area of one simdgroup. Two generations alternate so a lane
// that already moved on to the next collective cannot overwrite values that
// slower lanes of the previous one still read.
struct SimdGroup {
  int nlanes;             // lanes in this simdgroup (< 32 in a partial last group)
  int alive;              // lanes that have not returned
  int arrived;            // lanes waiting at the current collective
  unsigned gen;           // completed collectives
  const MTLSHIM_CSTR* tag;  // which collective the arrived lanes called
  FinishFn finish;        // computes the uniform result once all lanes arrived
  int width;              // reduction width of the pending collective
  unsigned mask[2];       // lanes that took part, per generation parity
  alignas(64) unsigned char slot[2][32][kSlotBytes];
  alignas(64) unsigned char result[2][kResultBytes];
};

typedef void (*BodyFn)(const Attrs* a, void* ctx);

}  // namespace metal_shim

extern "C" {
// Collective over the lanes of the calling thread's simdgroup: each lane stores
// `bytes` bytes of `value` in its slot; when the last live lane arrives, `finish`
// (may be null) runs once. Returns the generation parity to read slots/results from.
int mtlshim_simd_collective(const MTLSHIM_CSTR* tag, const void* value, unsigned long bytes,
                            metal_shim::FinishFn finish, int width);
// The calling thread's simdgroup and lane.
metal_shim::SimdGroup* mtlshim_simdgroup(void);
unsigned mtlshim_lane(void);
// Full execution barrier of the live threads of the threadgroup.
void mtlshim_threadgroup_barrier(void);
// Records an error (the launch stops and reports it); the calling thread waits forever.
void mtlshim_fail(const MTLSHIM_CSTR* msg);
// Threadgroup memory of declaration `site` (bytes, 16-byte aligned): one block per
// launch shared by all threads; not zeroed between threadgroups.
void* mtlshim_threadgroup_memory(int site, unsigned long bytes);
// Runs the grid (see metal_shim_runtime.cpp). Returns 0, or 1 with a message in err.
int mtlshim_launch(const unsigned* grid, const unsigned* tg, unsigned long stack_bytes, unsigned order,
                   metal_shim::BodyFn body, void* ctx, char* err, int errlen);
}
