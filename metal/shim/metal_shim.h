// metal_shim.h: the Metal subset kernel bodies (mx.fast.metal_kernel style) may use,
// implemented for the CPU.
//
// The Python side (metal_shim.py) wraps a kernel body in the signature MLX
// would generate, places it after this header and compiles it with clang as
// C++ for OpenCL, whose address spaces and restrictions are close to MSL's:
//   device -> __global, threadgroup -> __local, constant -> __constant,
//   thread -> __private (what unqualified variables are).
// Mixing them (a threadgroup array assigned to a device pointer, a constant
// pointer passed where a device one is expected) fails to compile as in MSL;
// casts between them too. metal_shim.py adds what that language mode accepts
// but MSL does not: pointers and references without an address space, double,
// virtual functions, new, goto (see metal/README.md, "What the shim rejects").
// Exceptions, RTTI, default new/delete, thread_local and non-constant program
// scope variables are rejected by the language mode itself. Nothing of libc or
// the C++ standard library is visible (-nostdinc, no std::): kernels see only
// the metal:: names below.
//
// The threads run on the fiber runtime (metal_shim_runtime.cpp, ordinary C++,
// linked into the same library), reached through metal_shim_runtime.h.
// Everything the kernel can see lives in `namespace metal` (the kernel itself
// is compiled inside that namespace), so unqualified calls such as exp(x) or
// abs(i) resolve to the Metal versions below.

#pragma once

#include "metal_shim_runtime.h"

namespace metal_shim {
// Kernel-side spellings of the runtime's entry points.
inline int simd_collective(const MTLSHIM_CSTR* tag, const void* value, unsigned long bytes, FinishFn finish,
                           int width = 32) {
  return mtlshim_simd_collective(tag, value, bytes, finish, width);
}
inline SimdGroup& my_simdgroup() { return *mtlshim_simdgroup(); }
inline unsigned lane() { return mtlshim_lane(); }
inline void fail(const MTLSHIM_CSTR* msg) { mtlshim_fail(msg); }
}  // namespace metal_shim

// ---------------------------------------------------------------------------
// Address spaces. `threadgroup` declarations in the kernel body
// (`threadgroup float buf[N];`) are rewritten by the code generator into
// references to a block of the runtime's threadgroup memory (one per
// declaration, shared by the threadgroup's threads).
// ---------------------------------------------------------------------------
#define device __global
#define constant __constant
#define thread __private
#define threadgroup __local
#define MTLSHIM_TG_DECL(SITE, TYPE, NAME, DIMS) \
  threadgroup TYPE(&NAME) DIMS =               \
      *(threadgroup TYPE(*) DIMS)(__SIZE_TYPE__)mtlshim_threadgroup_memory(SITE, sizeof(TYPE DIMS))
#define METAL_FUNC inline
#define METAL_CONST static constant constexpr const
#define MLX_MTL_CONST static constant constexpr const
#define MLX_MTL_PRAGMA_UNROLL _Pragma("clang loop unroll(full)")
#define STEEL_CONST static constant constexpr const
#define STEEL_PRAGMA_UNROLL _Pragma("clang loop unroll(full)")

// Words that are keywords in C++ for OpenCL but ordinary names in MSL.
#define half mtlshim_half
#define global mtlshim_global
#define local mtlshim_local
#define private mtlshim_private
#define generic mtlshim_generic
#define pipe mtlshim_pipe
#define read_only mtlshim_read_only
#define write_only mtlshim_write_only
#define read_write mtlshim_read_write

namespace metal {

typedef unsigned int uint;
typedef unsigned short ushort;
typedef unsigned char uchar;
typedef unsigned long ulong;
typedef __INT8_TYPE__ int8_t;
typedef __INT16_TYPE__ int16_t;
typedef __INT32_TYPE__ int32_t;
typedef __INT64_TYPE__ int64_t;
typedef __UINT8_TYPE__ uint8_t;
typedef __UINT16_TYPE__ uint16_t;
typedef __UINT32_TYPE__ uint32_t;
typedef __UINT64_TYPE__ uint64_t;
typedef __SIZE_TYPE__ size_t;
typedef __PTRDIFF_TYPE__ ptrdiff_t;

// The type traits MSL's <metal_type_traits> provides (the subset the shim and
// kernels use); there is no std:: in Metal code.
template <class T, T v>
struct integral_constant {
  static constexpr constant T value = v;
  constexpr operator T() const { return v; }
};
template <bool B>
using bool_constant = integral_constant<bool, B>;
typedef integral_constant<bool, true> true_type;
typedef integral_constant<bool, false> false_type;
template <bool B, class T = void>
struct enable_if {};
template <class T>
struct enable_if<true, T> { typedef T type; };
template <bool B, class T = void>
using enable_if_t = typename enable_if<B, T>::type;
template <bool B, class T, class F>
struct conditional { typedef T type; };
template <class T, class F>
struct conditional<false, T, F> { typedef F type; };
template <bool B, class T, class F>
using conditional_t = typename conditional<B, T, F>::type;
template <class T, class U>
struct is_same : false_type {};
template <class T>
struct is_same<T, T> : true_type {};
template <class T>
struct remove_cv { typedef T type; };
template <class T>
struct remove_cv<const T> { typedef T type; };
template <class T>
struct remove_cv<volatile T> { typedef T type; };
template <class T>
struct remove_cv<const volatile T> { typedef T type; };
template <class T>
using remove_cv_t = typename remove_cv<T>::type;
template <class T>
struct is_integral : integral_constant<bool, __is_integral(T)> {};
template <class T>
struct is_floating_point : integral_constant<bool, __is_floating_point(T)> {};
template <class T>
struct is_class : integral_constant<bool, __is_class(T)> {};
template <class T>
struct is_arithmetic : integral_constant<bool, __is_arithmetic(T)> {};
template <class T>
struct is_signed : integral_constant<bool, __is_signed(T)> {};
template <class T>
struct is_unsigned : integral_constant<bool, __is_unsigned(T)> {};
#define MTLSHIM_TRAIT_V(NAME) \
  template <class T>          \
  constexpr constant bool NAME##_v = NAME<T>::value;
MTLSHIM_TRAIT_V(is_integral)
MTLSHIM_TRAIT_V(is_floating_point)
MTLSHIM_TRAIT_V(is_class)
MTLSHIM_TRAIT_V(is_arithmetic)
MTLSHIM_TRAIT_V(is_signed)
MTLSHIM_TRAIT_V(is_unsigned)
#undef MTLSHIM_TRAIT_V
template <class T, class U>
constexpr constant bool is_same_v = is_same<T, U>::value;

// ---------------------------------------------------------------------------
// half and bfloat: 16-bit storage, every operation computed in float and
// rounded to nearest-even (exactly the correctly rounded 16-bit result for
// + - * / and sqrt, since float carries more than 2p+2 bits).
// ---------------------------------------------------------------------------
namespace detail {
inline uint32_t f2u(float f) { uint32_t u; __builtin_memcpy(&u, &f, 4); return u; }
inline float u2f(uint32_t u) { float f; __builtin_memcpy(&f, &u, 4); return f; }

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
  __builtin_memcpy(&b, &h, 2);
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
  __builtin_memcpy(&h, &b, 2);
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
  template <class I, typename enable_if<is_integral<I>::value, int>::type = 0>
  f16base(I i) : bits(Tag::enc((float)i)) {}
  template <class O, typename enable_if<!is_same<O, Tag>::value, int>::type = 0>
  explicit f16base(f16base<O> o) : bits(Tag::enc((float)o)) {}
  // Values in the constant address space (which does not convert to the generic one
  // the other members take): copied and read as in MSL.
  f16base(const f16base&) = default;
  f16base& operator=(const f16base&) = default;
  f16base(const constant f16base& o) : bits(o.bits) {}
  operator float() const { return Tag::dec(bits); }
  operator float() const constant { return Tag::dec(bits); }
  f16base operator-() const { f16base r; r.bits = bits ^ 0x8000u; return r; }
  f16base operator+() const { return *this; }
};

typedef f16base<half_tag> half;
typedef f16base<bfloat_tag> bfloat;
typedef half float16_t;
typedef bfloat bfloat16_t;

template <class T>
struct is_f16 : false_type {};
template <class Tag>
struct is_f16<f16base<Tag>> : true_type {};

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
  template <class Tag, class I, typename enable_if<is_integral<I>::value, int>::type = 0> \
  inline f16base<Tag> operator OP(f16base<Tag> a, I b) {                                        \
    return f16base<Tag>((float)a OP(float) f16base<Tag>(b));                                    \
  }                                                                                             \
  template <class Tag, class I, typename enable_if<is_integral<I>::value, int>::type = 0> \
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
  template <class Tag, class I, typename enable_if<is_integral<I>::value, int>::type = 0> \
  inline bool operator OP(f16base<Tag> a, I b) { return (float)a OP(float) b; }                  \
  template <class Tag, class I, typename enable_if<is_integral<I>::value, int>::type = 0> \
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
  const constant T& operator[](int i) const constant { return (&x)[i]; }               \
  vec(const vec&) = default;                                                           \
  vec& operator=(const vec&) = default;                                                \
  vec(const constant vec& o) {                                                         \
    for (int i = 0; i < N; i++) (*this)[i] = o[i];                                     \
  }                                                                                    \
  template <class U, typename enable_if<!is_same<U, T>::value, int>::type = 0> \
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
  template <class T, int N, class S, typename enable_if<!is_class<S>::value || is_f16<S>::value, int>::type = 0> \
  inline vec<T, N> operator OP(const vec<T, N>& a, S b) {                                              \
    vec<T, N> r;                                                                                       \
    for (int i = 0; i < N; i++) r[i] = a[i] OP static_cast<T>(b);                                      \
    return r;                                                                                          \
  }                                                                                                    \
  template <class T, int N, class S, typename enable_if<!is_class<S>::value || is_f16<S>::value, int>::type = 0> \
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
  __builtin_memcpy(&t, &u, sizeof(T));
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
inline void threadgroup_barrier(mem_flags) { mtlshim_threadgroup_barrier(); }
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
  __builtin_memcpy(&v, slots[l], sizeof(T));
  return v;
}

// Butterfly reduction over groups of `s.width` consecutive lanes (32 for
// simd_*, 4 for quad_*): level m combines lane l with lane l^m, m = 1, 2, 4...
// Lanes that returned are skipped (their partner's value passes through).
// Writes one value per group into the generation's uniform result.
template <class T, class Op>
inline void butterfly_finish(metal_shim::SimdGroup* sp, int p) {
  metal_shim::SimdGroup& s = *sp;
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
    if (have[l]) __builtin_memcpy(s.result[p] + g * sizeof(T), &v[l], sizeof(T));
  }
}

inline unsigned my_lane() { return metal_shim::lane(); }

template <class T, class Op>
inline T reduce(const MTLSHIM_CSTR* tag, T x, unsigned width) {
  static_assert(sizeof(T) <= (size_t)metal_shim::kSlotBytes, "type too large for a simd reduction");
  static_assert(sizeof(T) * 8 <= (size_t)metal_shim::kResultBytes, "type too large for a quad reduction");
  int p = metal_shim::simd_collective(tag, &x, sizeof(T), &butterfly_finish<T, Op>, (int)width);
  T r;
  __builtin_memcpy(&r, metal_shim::my_simdgroup().result[p] + (my_lane() / width) * sizeof(T), sizeof(T));
  return r;
}

// Reads lane `src` of the exchange (own value when src is not a live lane).
template <class T>
inline T shuffle(const MTLSHIM_CSTR* tag, T x, int src) {
  int p = metal_shim::simd_collective(tag, &x, sizeof(T), nullptr);
  metal_shim::SimdGroup& s = metal_shim::my_simdgroup();
  if (src < 0 || src >= 32 || !((s.mask[p] >> src) & 1u)) return x;
  return lane_value<T>(s.slot[p], (unsigned)src);
}

template <class T>
inline T prefix(const MTLSHIM_CSTR* tag, T x, bool inclusive, bool product) {
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
