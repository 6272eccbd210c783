// Shared by the CPU (.cpp) and CUDA (.cu) kernels of fastpo:
//   * the dtype codes the Python launchers pass,
//   * the argument structs of every entry point (raw pointers, sizes, strides),
//   * the online softmax state (m, s, t) and the one merge of two states,
//   * portable bf16 / fp16 <-> fp32 conversions (bit manipulation, used on CPU).
// No torch headers: the modules build with g++/nvcc + pybind11 alone.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

#if defined(__CUDACC__)
#define FASTPO_HD __host__ __device__ __forceinline__
#else
#define FASTPO_HD inline __attribute__((always_inline))
#endif

namespace fastpo {

enum DtypeCode : int { kFloat32 = 0, kBFloat16 = 1, kFloat16 = 2, kFloat64 = 3 };

// ---------------------------------------------------------------- arguments
// Element strides; int64 everywhere (N * V can exceed 2^31). Outputs and the
// incoming gradients are contiguous fp32 (fp64 when dtype == kFloat64).

// Where row r of an [R, C, V] (or [N, V]) tensor starts: rows are numbered
// row-major, r = i C + j, at element offset i stride0 + j stride1 (any strides;
// the vocabulary dim is contiguous). A 2-D [N, V] tensor is C = 1. This is how
// the causal-LM shift `logits[:, :-1]` is read without a copy.
struct RowLayout {
  int64_t cols;              // C >= 1
  int64_t stride0, stride1;  // element strides of dims 0 and 1
  FASTPO_HD int64_t offset(int64_t r) const {
    return cols == 1 ? r * stride0 : (r / cols) * stride0 + (r % cols) * stride1;
  }
};

// A label outside [0, V) that is not ignore_index: the Python layer raises first,
// but a kernel never reads row[y] for one; it writes NaN for that row instead.
FASTPO_HD bool label_out_of_range(int64_t y, int64_t vocab) { return y < 0 || y >= vocab; }

struct TokenFwdArgs {
  const void* logits;     // [N, V] dtype, rows at `layout`, last dim contiguous
  const int64_t* labels;  // [N]
  void* logp;             // [N] out
  void* entropy;          // [N] out
  void* lse;              // [N] out, saved for the backward (0 on ignored rows)
  int64_t n_rows, vocab;
  RowLayout layout;
  int dtype;
  double temperature;
  int64_t ignore_index;
};

struct TokenBwdArgs {
  const void* logits;        // [N, V] dtype, rows at `layout`
  const int64_t* labels;     // [N]
  const void* lse;           // [N] from the forward
  const void* entropy;       // [N] from the forward
  const void* grad_logp;     // [N]
  const void* grad_entropy;  // [N] or nullptr (no entropy term)
  void* grad;                // [N, V] dtype, rows at `grad_layout`; may equal `logits`
  int64_t n_rows, vocab;
  RowLayout layout, grad_layout;
  int dtype;
  double temperature;
  int64_t ignore_index;
};

struct SeqFwdArgs {
  const void* logits;     // [B, T, V] dtype, strides (stride_b, stride_t, 1)
  const int64_t* labels;  // [B, T] contiguous
  void* out;              // [B] out: sum (or mean) over non-ignored t of logp
  void* lse;              // [B * T] out, saved for the backward (0 on ignored tokens)
  int64_t batch, seq_len, vocab, stride_b, stride_t;
  int dtype;
  double temperature;
  int64_t ignore_index;
  bool average;
};

struct SeqBwdArgs {
  const void* logits;     // [B, T, V] dtype
  const int64_t* labels;  // [B, T]
  const void* lse;        // [B * T] from the forward
  const void* grad_out;   // [B]
  void* scale;            // [B] scratch (accumulation type): grad_out_b / max(1, count_b), counted once
  void* grad;             // [B, T, V] dtype, strides (grad_stride_b, grad_stride_t, 1); may equal `logits`
  int64_t batch, seq_len, vocab, stride_b, stride_t, grad_stride_b, grad_stride_t;
  int dtype;
  double temperature;
  int64_t ignore_index;
  bool average;
};

// Hyper-parameters of the fused policy loss (fastpo.kernels.policy_args.PolicyKernelArgs);
// disabled limits are +inf. Per-token math: policy_math.h.
struct PolicyParams {
  int variant;  // 0 ppo, 2 cispo, 3 sapo, 4 pg
  double clip_low, clip_high, ratio_cap, dual_clip, logratio_clamp;
  int kl_kind;  // 0 none, 1 k1, 2 k2, 3 k3, 4 abs
  bool kl_straight;
  double kl_clamp, kl_coef, entropy_coef;
  double sapo_tau_pos, sapo_tau_neg;  // sapo: the gate's temperature where A > 0 resp. A <= 0
  bool kl_weighted;                   // the KL term times the ratio r
};

// Per-token inputs old / adv / ref / weight and the outputs are in the
// accumulation type (fp32, fp64 for fp64 logits).
struct PolicyFwdArgs {
  const void* logits;     // [N, V] dtype, rows at `layout`, last dim contiguous
  const int64_t* labels;  // [N]; masked tokens carry ignore_index
  const void* old_logp;   // [N]
  const void* adv;        // [N] per-token advantages
  const void* ref_logp;   // [N], or nullptr (read only when params.kl_kind != 0)
  const void* weight;     // [N] d loss / d per-token loss (aggregation weight)
  // Optional per-token weights, each [N] or nullptr (then 1, weight, weight): the policy
  // term's factor inside the per-token loss, and the weights of the KL and entropy
  // terms' gradients in place of `weight`.
  const void* policy_w;   // [N] L = policy_w S + ..., or nullptr (1)
  const void* kl_w;       // [N] gradient weight of the KL term, or nullptr (weight)
  const void* ent_w;      // [N] gradient weight of the entropy term, or nullptr (weight)
  void* loss;             // [N] out: per-token loss
  void* logp;             // [N] out
  void* entropy;          // [N] out
  void* grad;             // [N, V] dtype out, rows at `grad_layout`, or nullptr; may equal `logits`
  int64_t n_rows, vocab;
  RowLayout layout, grad_layout;
  int dtype;
  PolicyParams params;
  double temperature;
  int64_t ignore_index;
};

// ---------------------------------------------------------- online softmax
FASTPO_HD float acc_exp(float x) { return expf(x); }
FASTPO_HD double acc_exp(double x) { return exp(x); }
FASTPO_HD float acc_log(float x) { return logf(x); }
FASTPO_HD double acc_log(double x) { return log(x); }

// Statistics of a set of scaled logits x, relative to their running max m:
//   s = sum exp(x - m),   t = sum exp(x - m) (x - m).
// Then lse = m + log s and the entropy is H = log s - t / s: the shifted form
// has no cancellation when H is small. An empty set has s = 0 and m = -inf; a
// non-empty one has s >= 1 (its max contributes exp(0)).
template <typename acc_t>
struct SoftmaxState {
  acc_t m, s, t;

  FASTPO_HD static SoftmaxState empty() { return {acc_t(-INFINITY), acc_t(0), acc_t(0)}; }

  // Re-express relative to new_m >= m: exp(x - new_m) = f exp(x - m) with
  // f = exp(d), d = m - new_m, and (x - new_m) = (x - m) + d.
  FASTPO_HD void rescale(acc_t new_m) {
    if (s != acc_t(0)) {
      const acc_t d = m - new_m;
      const acc_t f = acc_exp(d);
      t = f * (t + d * s);
      s *= f;
    }
    m = new_m;
  }

  FASTPO_HD acc_t lse() const { return m + acc_log(s); }
  FASTPO_HD acc_t entropy() const { return acc_log(s) - t / s; }
};

// The one combination of two partial states (chunks of a row, threads, warps).
// Symmetric: merge(a, b) and merge(b, a) are bitwise equal.
template <typename acc_t>
FASTPO_HD SoftmaxState<acc_t> merge(SoftmaxState<acc_t> a, SoftmaxState<acc_t> b) {
  const acc_t m = a.m > b.m ? a.m : b.m;
  a.rescale(m);
  b.rescale(m);
  return {m, a.s + b.s, a.t + b.t};
}

// ------------------------------------------ 16-bit floats, portable (CPU)
// Written once, generic over F = float or a SIMD vector of floats (GCC vector
// extension, csrc/cpu/simd.h adds its BitCast), with selects instead of
// branches: the scalar and vector paths and every instruction set convert
// bitwise the same way. U is the unsigned integer of F's width.
template <typename F> struct BitCast;
template <> struct BitCast<float> {
  using U = uint32_t;
  static FASTPO_HD U bits(float f) {
    U u;
    std::memcpy(&u, &f, sizeof u);
    return u;
  }
  static FASTPO_HD float from(U u) {
    float f;
    std::memcpy(&f, &u, sizeof f);
    return f;
  }
};

// bf16 -> fp32 is exact: the high half of the fp32 bits.
template <typename F>
FASTPO_HD F bf16_to_f32_t(typename BitCast<F>::U h) { return BitCast<F>::from(h << 16); }

// fp32 -> bf16, round to nearest even, a NaN stays a (quiet) NaN. The bf16 bits
// are the HIGH half of the result (a vector store then keeps the odd halves).
template <typename F>
FASTPO_HD typename BitCast<F>::U f32_to_bf16_high_t(F f) {
  using U = typename BitCast<F>::U;
  const U u = BitCast<F>::bits(f);
  const U rounded = u + 0x7fffu + ((u >> 16) & 1u);
  return f != f ? U(u | 0x00400000u) : rounded;
}

// fp16 bits (low half of U) -> fp32, exact.
template <typename F>
FASTPO_HD F f16_to_f32_t(typename BitCast<F>::U h) {
  using U = typename BitCast<F>::U;
  const U sign = (h & 0x8000u) << 16;
  const U em = h & 0x7fffu;  // exponent and mantissa
  // Put the 5+10 bits where fp32 keeps its exponent and mantissa: multiplying by
  // 2^112 rebiases the exponent (127 - 15) and normalises subnormals, exactly.
  const F finite = BitCast<F>::from(em << 13) * 0x1.0p112f;
  const F special = BitCast<F>::from((em << 13) | 0x7f800000u);  // inf / nan
  return BitCast<F>::from(BitCast<F>::bits(em >= 0x7c00u ? special : finite) | sign);
}

// fp32 -> fp16 bits: round to nearest even, overflow to inf, NaN to a quiet NaN.
template <typename F>
FASTPO_HD typename BitCast<F>::U f32_to_f16_t(F f) {
  using U = typename BitCast<F>::U;
  const U u = BitCast<F>::bits(f);
  const U sign = (u >> 16) & 0x8000u;
  const U a = u & 0x7fffffffu;
  // normal half: rebias the exponent (subtract 112 << 23), round 23 -> 10 mantissa bits
  const U v = a - 0x38000000u;
  const U normal = (v + 0xfffu + ((v >> 13) & 1u)) >> 13;
  // subnormal half (|f| < 2^-14): adding 0.5, whose ulp is 2^-24 (the half
  // subnormal step), lets the FPU round; a carry out gives 2^-14 exactly.
  const U subnormal = BitCast<F>::bits(BitCast<F>::from(a) + 0.5f) - 0x3f000000u;
  const U zero = U{};
  U h = a >= 0x38800000u ? normal : subnormal;
  h = a >= 0x477ff000u ? zero + 0x7c00u : h;  // >= 65520 rounds to inf
  h = a > 0x7f800000u ? zero + 0x7e00u : h;   // nan
  return sign | h;
}

FASTPO_HD float bf16_to_f32(uint16_t h) { return bf16_to_f32_t<float>(h); }
FASTPO_HD uint16_t f32_to_bf16(float f) { return uint16_t(f32_to_bf16_high_t(f) >> 16); }
FASTPO_HD float f16_to_f32(uint16_t h) { return f16_to_f32_t<float>(h); }
FASTPO_HD uint16_t f32_to_f16(float f) { return uint16_t(f32_to_f16_t(f)); }

}  // namespace fastpo
