// metal_shim_simdgroup_matrix.h: simdgroup_matrix<T, 8, 8> for the Metal shim.
//
// As on Apple GPUs, each of the 32 lanes holds two elements of an 8x8 matrix
// (thread_elements()), at row fm = (q & 4) + (lane / 2) % 4, columns fn and
// fn + 1 with fn = (q & 2) * 2 + (lane % 2) * 2, q = lane / 4 (the layout
// MLX's steel kernels rely on). Loads and stores touch only the lane's own
// elements; multiplies exchange the fragments of all lanes (a simdgroup-wide
// collective, so every lane must call them, as on the GPU). Products
// accumulate in float, k = 0..7 in order, starting from the addend; 16-bit
// results are rounded once at the end. Hardware accumulation order is not
// documented, so expect last-bit differences from a GPU.

#pragma once

namespace metal {

template <typename T, int Cols, int Rows>
struct simdgroup_matrix {
  static_assert(Cols == 8 && Rows == 8, "the shim supports 8x8 simdgroup matrices only");
  vec<T, 2> e;  // this lane's two elements
  simdgroup_matrix() = default;
  // Metal: the scalar constructor makes a diagonal matrix.
  explicit simdgroup_matrix(T diag) {
    unsigned l = metal_shim::lane();
    unsigned q = l / 4, fm = (q & 4) + (l / 2) % 4, fn = (q & 2) * 2 + (l % 2) * 2;
    e.x = (fm == fn) ? diag : T(0);
    e.y = (fm == fn + 1) ? diag : T(0);
  }
  thread vec<T, 2>& thread_elements() { return e; }
  const thread vec<T, 2>& thread_elements() const { return e; }
};

typedef simdgroup_matrix<float, 8, 8> simdgroup_float8x8;
typedef simdgroup_matrix<half, 8, 8> simdgroup_half8x8;
typedef simdgroup_matrix<bfloat, 8, 8> simdgroup_bfloat8x8;

namespace detail {
inline void sg_coords(unsigned l, unsigned& fm, unsigned& fn) {
  unsigned q = l / 4;
  fm = (q & 4) + (l / 2) % 4;
  fn = (q & 2) * 2 + (l % 2) * 2;
}
inline unsigned sg_lane() { return metal_shim::lane(); }
}  // namespace detail

template <typename T, int C, int R>
inline simdgroup_matrix<T, C, R> make_filled_simdgroup_matrix(T value) {
  simdgroup_matrix<T, C, R> m;
  m.e.x = value;
  m.e.y = value;
  return m;
}

// d(r, c) = src[(origin.y + r) * elements_per_row + origin.x + c], or the
// transpose of that 8x8 block.
template <typename T, int C, int R, typename U>
inline void simdgroup_load(thread simdgroup_matrix<T, C, R>& d, const U* src, ulong elements_per_row = C,
                           ulong2 matrix_origin = ulong2(0, 0), bool transpose_matrix = false) {
  unsigned fm, fn;
  detail::sg_coords(detail::sg_lane(), fm, fn);
  for (unsigned j = 0; j < 2; j++) {
    unsigned r = fm, c = fn + j;
    ulong sr = transpose_matrix ? c : r, sc = transpose_matrix ? r : c;
    d.e[j] = static_cast<T>(src[(matrix_origin.y + sr) * elements_per_row + matrix_origin.x + sc]);
  }
}

template <typename T, int C, int R, typename U>
inline void simdgroup_store(const thread simdgroup_matrix<T, C, R>& m, U* dst, ulong elements_per_row = C,
                            ulong2 matrix_origin = ulong2(0, 0), bool transpose_matrix = false) {
  unsigned fm, fn;
  detail::sg_coords(detail::sg_lane(), fm, fn);
  for (unsigned j = 0; j < 2; j++) {
    unsigned r = fm, c = fn + j;
    ulong sr = transpose_matrix ? c : r, sc = transpose_matrix ? r : c;
    dst[(matrix_origin.y + sr) * elements_per_row + matrix_origin.x + sc] = static_cast<U>(m.e[j]);
  }
}

namespace detail {
// Fragments of a, b (and c) from all lanes, gathered into full 8x8 float matrices.
struct MmaSlot {
  float a[2], b[2], c[2];
};

template <typename TD, typename TA, typename TB, typename TC>
inline void mma(thread simdgroup_matrix<TD, 8, 8>& d, const simdgroup_matrix<TA, 8, 8>& a,
                const simdgroup_matrix<TB, 8, 8>& b, const simdgroup_matrix<TC, 8, 8>* c) {
  MmaSlot mine{{(float)a.e.x, (float)a.e.y}, {(float)b.e.x, (float)b.e.y},
               {c ? (float)c->e.x : 0.0f, c ? (float)c->e.y : 0.0f}};
  int p = metal_shim::simd_collective("simdgroup_multiply", &mine, sizeof(mine), nullptr);
  metal_shim::SimdGroup& s = metal_shim::my_simdgroup();
  if (s.mask[p] != 0xffffffffu) {
    metal_shim::fail("metal shim: simdgroup matrix op with inactive lanes");
  }
  float A[8][8], B[8][8];
  for (unsigned l = 0; l < 32; l++) {
    MmaSlot v;
    __builtin_memcpy(&v, s.slot[p][l], sizeof(v));
    unsigned fm, fn;
    sg_coords(l, fm, fn);
    A[fm][fn] = v.a[0];
    A[fm][fn + 1] = v.a[1];
    B[fm][fn] = v.b[0];
    B[fm][fn + 1] = v.b[1];
  }
  unsigned fm, fn;
  sg_coords(sg_lane(), fm, fn);
  for (unsigned j = 0; j < 2; j++) {
    float acc = mine.c[j];
    for (unsigned k = 0; k < 8; k++) acc += A[fm][k] * B[k][fn + j];
    d.e[j] = static_cast<TD>(acc);
  }
}
}  // namespace detail

// d = a * b
template <typename TD, typename TA, typename TB>
inline void simdgroup_multiply(thread simdgroup_matrix<TD, 8, 8>& d, const simdgroup_matrix<TA, 8, 8>& a,
                               const simdgroup_matrix<TB, 8, 8>& b) {
  detail::mma<TD, TA, TB, TD>(d, a, b, nullptr);
}

// d = a * b + c
template <typename TD, typename TA, typename TB, typename TC>
inline void simdgroup_multiply_accumulate(thread simdgroup_matrix<TD, 8, 8>& d, const simdgroup_matrix<TA, 8, 8>& a,
                                          const simdgroup_matrix<TB, 8, 8>& b, const simdgroup_matrix<TC, 8, 8>& c) {
  detail::mma<TD, TA, TB, TC>(d, a, b, &c);
}

}  // namespace metal
