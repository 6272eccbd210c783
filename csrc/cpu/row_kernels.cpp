// Compiles row_kernels_impl.h once per instruction set and picks one at run time.
//
// Wheels are built for a portable baseline (-march=x86-64-v2, see setup.py); on
// x86-64 with GCC the same source is also compiled inside `#pragma GCC target`
// regions for AVX2+FMA and AVX-512, and __builtin_cpu_supports chooses. The
// kernels are memory-bound only when the exp() arithmetic is wide enough, hence
// the dispatch. Results may differ between instruction sets in the last bits
// (FMA contraction) but never between runs or batch layouts on one machine.
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>

#include "row_kernels.h"

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define FASTPO_X86_DISPATCH 1
#endif

#if FASTPO_X86_DISPATCH
#include <immintrin.h>

#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512dq,avx512vl,avx2,fma,f16c,bmi,bmi2,prefer-vector-width=512")
#define FASTPO_ISA avx512
#define FASTPO_STREAM_BYTES 64
#include "row_kernels_impl.h"
#undef FASTPO_STREAM_BYTES
#undef FASTPO_ISA
#pragma GCC pop_options

#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c,bmi,bmi2")
#define FASTPO_ISA avx2
#define FASTPO_STREAM_BYTES 32
#include "row_kernels_impl.h"
#undef FASTPO_STREAM_BYTES
#undef FASTPO_ISA
#pragma GCC pop_options

#define FASTPO_STREAM_BYTES 16  // SSE2 is part of x86-64
#endif

#define FASTPO_ISA baseline
#include "row_kernels_impl.h"
#undef FASTPO_ISA
#undef FASTPO_STREAM_BYTES

namespace fastpo {
namespace cpu {
namespace {

enum class Isa { kBaseline, kAvx2, kAvx512 };

Isa detect_isa() {
  Isa best = Isa::kBaseline;
#if FASTPO_X86_DISPATCH
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) best = Isa::kAvx2;
  if (best == Isa::kAvx2 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
      __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512vl"))
    best = Isa::kAvx512;
#endif
  // FASTPO_CPU_ISA can only lower the choice (never enable what the CPU lacks).
  const char* want = std::getenv("FASTPO_CPU_ISA");
  if (want != nullptr) {
    if (std::strcmp(want, "baseline") == 0) best = Isa::kBaseline;
    if (std::strcmp(want, "avx2") == 0 && best == Isa::kAvx512) best = Isa::kAvx2;
  }
  return best;
}

Isa chosen_isa() {
  static const Isa isa = detect_isa();
  return isa;
}

template <typename in_t>
RowKernels<in_t> pick() {
#if FASTPO_X86_DISPATCH
  switch (chosen_isa()) {
    case Isa::kAvx512: return avx512::table<in_t>();
    case Isa::kAvx2: return avx2::table<in_t>();
    default: break;
  }
#endif
  return baseline::table<in_t>();
}

}  // namespace

template <typename in_t>
const RowKernels<in_t>& row_kernels() {
  static const RowKernels<in_t> kernels = pick<in_t>();
  return kernels;
}

template const RowKernels<float>& row_kernels<float>();
template const RowKernels<double>& row_kernels<double>();
template const RowKernels<bf16>& row_kernels<bf16>();
template const RowKernels<f16>& row_kernels<f16>();

const char* row_kernels_isa() {
  switch (chosen_isa()) {
    case Isa::kAvx512: return "avx512";
    case Isa::kAvx2: return "avx2";
    default: return "baseline";
  }
}

}  // namespace cpu
}  // namespace fastpo
