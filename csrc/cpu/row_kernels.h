// One-row CPU kernels shared by the CPU ops (token_logprobs, sequence_logprobs).
//
// The ops parallelise over rows with OpenMP and call, per row, a kernel from a
// table picked once for this CPU (AVX-512, AVX2 or the portable x86-64-v2 /
// generic build; see row_kernels.cpp). FASTPO_CPU_ISA=baseline|avx2 lowers the
// choice (tests use it to check every variant).
#pragma once

#include <cstdint>
#include <cstdlib>
#include <cstring>

#include "../common.h"
#include "simd.h"

namespace fastpo {
namespace cpu {

// Per-row coefficients of the backward:
//   grad_j = inv_tau [ g_lp (1[j = y] - p_j) - g_H p_j (log p_j + H) ],  p_j = exp(x_j - lse).
template <typename acc_t>
struct RowGrad {
  acc_t lse, entropy, g_lp, g_H, inv_tau;
  int64_t label;
  bool has_entropy_grad;
  bool stream;  // write grad with non-temporal stores (large out-of-place outputs)
};

// Out-of-place gradients at least this large (default 64 MiB, or
// FASTPO_CPU_STREAM_MIN_BYTES, read on every call: tests lower it) are written
// with non-temporal stores: they cannot stay in cache anyway, and skipping the
// read-for-ownership saves a third of the backward's memory traffic.
inline int64_t stream_min_bytes() {
  const char* env = std::getenv("FASTPO_CPU_STREAM_MIN_BYTES");
  return env != nullptr ? std::strtoll(env, nullptr, 10) : (int64_t(64) << 20);
}

template <typename in_t>
struct RowKernels {
  using acc_t = acc_of<in_t>;
  // (m, s, t) of x = row * inv_tau over row[0:vocab]: one read of the row.
  SoftmaxState<acc_t> (*stats)(const in_t* row, int64_t vocab, acc_t inv_tau);
  // grad[0:vocab] from row[0:vocab]: one read, one write; grad may equal row.
  void (*grad)(const in_t* row, in_t* grad, int64_t vocab, const RowGrad<acc_t>& c);
};

// The kernels for this CPU (chosen on first use, thread-safe).
template <typename in_t> const RowKernels<in_t>& row_kernels();
// Name of the chosen instruction set: "avx512", "avx2" or "baseline".
const char* row_kernels_isa();

// Ignored positions get an exactly zero gradient row (all-zero bits are +0.0
// in every float format) and their logits are never read.
template <typename in_t>
inline void zero_row(in_t* grad, int64_t vocab) {
  std::memset(static_cast<void*>(grad), 0, size_t(vocab) * sizeof(in_t));
}

// A row of NaN (a label outside [0, V): a second signal after the Python check).
template <typename in_t>
inline void nan_row(in_t* grad, int64_t vocab) {
  const acc_of<in_t> nan = NAN;
  for (int64_t j = 0; j < vocab; ++j) store_acc(grad + j, nan);
}

}  // namespace cpu
}  // namespace fastpo
