// SIMD packs for the CPU kernels, written with GCC/Clang vector extensions:
// one "pack" holds kLanes = 16 values and the compiler lowers each operation to
// whatever the enclosing function's target offers (one zmm, two ymm, four xmm).
// Loads and stores go through memcpy (unaligned, alias-safe, so grad may equal
// the logits). Tails are staged through a small zero-filled buffer, so nothing
// is read or written past the end of a row.
#pragma once

#include <cstdint>
#include <cstring>

#include "../common.h"

namespace fastpo {
namespace cpu {

constexpr int kLanes = 16;

typedef float f32xL __attribute__((vector_size(64)));
typedef uint32_t u32xL __attribute__((vector_size(64)));
typedef int32_t i32xL __attribute__((vector_size(64)));
typedef uint16_t u16xL __attribute__((vector_size(32)));
typedef double f64xL __attribute__((vector_size(128)));
typedef int64_t i64xL __attribute__((vector_size(128)));

// 16-bit storage types (distinct so templates can tell them apart).
struct bf16 { uint16_t bits; };
struct f16 { uint16_t bits; };

// Accumulation type: fp32, or fp64 for fp64 inputs; V its pack, I the integer
// pack of the same shape (lane masks, lane indices).
template <typename in_t> struct AccOf { using type = float; };
template <> struct AccOf<double> { using type = double; };
template <typename in_t> using acc_of = typename AccOf<in_t>::type;

template <typename acc_t> struct Simd;
template <> struct Simd<float> { using V = f32xL; using I = i32xL; };
template <> struct Simd<double> { using V = f64xL; using I = i64xL; };

}  // namespace cpu

template <> struct BitCast<cpu::f32xL> {
  using U = cpu::u32xL;
  static FASTPO_HD U bits(cpu::f32xL f) { return (U)f; }
  static FASTPO_HD cpu::f32xL from(U u) { return (cpu::f32xL)u; }
};

namespace cpu {

template <typename V, typename T>
FASTPO_HD V splat(T x) { return V{} + x; }

template <typename I>
FASTPO_HD I lane_index() {
  return I{0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15};
}

// Scalar element <-> accumulation type (the label's logit, zero rows).
template <typename acc_t> FASTPO_HD acc_t load_acc(float v) { return acc_t(v); }
template <typename acc_t> FASTPO_HD acc_t load_acc(double v) { return acc_t(v); }
template <typename acc_t> FASTPO_HD acc_t load_acc(bf16 v) { return bf16_to_f32(v.bits); }
template <typename acc_t> FASTPO_HD acc_t load_acc(f16 v) { return f16_to_f32(v.bits); }
FASTPO_HD void store_acc(float* p, float v) { *p = v; }
FASTPO_HD void store_acc(double* p, double v) { *p = v; }
FASTPO_HD void store_acc(bf16* p, float v) { p->bits = f32_to_bf16(v); }
FASTPO_HD void store_acc(f16* p, float v) { p->bits = f32_to_f16(v); }

// Storage bits of one pack of in_t.
template <typename in_t> struct RawOf { using type = u16xL; };  // bf16, f16
template <> struct RawOf<float> { using type = f32xL; };
template <> struct RawOf<double> { using type = f64xL; };

// Pack<in_t>: kLanes elements of in_t <-> one pack of the accumulation type.
template <typename in_t>
struct PackIo {
  using V = typename Simd<acc_of<in_t>>::V;
  using Raw = typename RawOf<in_t>::type;
  static FASTPO_HD V load(const in_t* p);
  static FASTPO_HD Raw encode(V v);  // to storage bits
  static FASTPO_HD void store(in_t* p, V v) { store_bits(p, encode(v)); }
  static FASTPO_HD void store_bits(in_t* p, Raw r) { std::memcpy(p, &r, sizeof r); }
  static FASTPO_HD V load_partial(const in_t* p, int n) {
    in_t tmp[kLanes] = {};
    std::memcpy(tmp, p, size_t(n) * sizeof(in_t));
    return load(tmp);
  }
  static FASTPO_HD void store_partial(in_t* p, V v, int n) {
    in_t tmp[kLanes];
    store(tmp, v);
    std::memcpy(p, tmp, size_t(n) * sizeof(in_t));
  }
};

template <typename V, typename T>
FASTPO_HD V load_raw(const T* p) {
  V v;
  std::memcpy(&v, p, sizeof v);
  return v;
}

typedef uint16_t u16x2L __attribute__((vector_size(64)));

// u16 -> u32 lanes (zero-extend) and back (keep the low or the high halves), by shuffles.
FASTPO_HD u32xL widen(u16xL h) {
  const u16x2L wide = __builtin_shufflevector(h, u16xL{}, 0, 16, 1, 16, 2, 16, 3, 16, 4, 16, 5, 16, 6, 16, 7, 16,
                                              8, 16, 9, 16, 10, 16, 11, 16, 12, 16, 13, 16, 14, 16, 15, 16);
  return (u32xL)wide;
}
FASTPO_HD u16xL narrow(u32xL u) {
  const u16x2L halves = (u16x2L)u;
  return __builtin_shufflevector(halves, halves, 0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
}
FASTPO_HD u16xL narrow_high(u32xL u) {
  const u16x2L halves = (u16x2L)u;
  return __builtin_shufflevector(halves, halves, 1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31);
}

template <> FASTPO_HD f32xL PackIo<float>::load(const float* p) { return load_raw<f32xL>(p); }
template <> FASTPO_HD f32xL PackIo<float>::encode(f32xL v) { return v; }
template <> FASTPO_HD f64xL PackIo<double>::load(const double* p) { return load_raw<f64xL>(p); }
template <> FASTPO_HD f64xL PackIo<double>::encode(f64xL v) { return v; }
template <> FASTPO_HD f32xL PackIo<bf16>::load(const bf16* p) {
  return bf16_to_f32_t<f32xL>(widen(load_raw<u16xL>(p)));
}
template <> FASTPO_HD u16xL PackIo<bf16>::encode(f32xL v) { return narrow_high(f32_to_bf16_high_t(v)); }
template <> FASTPO_HD f32xL PackIo<f16>::load(const f16* p) {
  return f16_to_f32_t<f32xL>(widen(load_raw<u16xL>(p)));
}
template <> FASTPO_HD u16xL PackIo<f16>::encode(f32xL v) { return narrow(f32_to_f16_t(v)); }

}  // namespace cpu
}  // namespace fastpo
