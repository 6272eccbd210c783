// Entry points of the CPU module (bound in module_cpu.cpp). Each parallelises
// over rows with OpenMP; num_threads <= 0 means the OpenMP default.
#pragma once

#include <stdexcept>
#include <string>

#ifdef _OPENMP
#include <omp.h>
#endif

#include "../common.h"
#include "row_kernels.h"

namespace fastpo {
namespace cpu {

void token_logprobs_fwd(const TokenFwdArgs& args, int num_threads);
void token_logprobs_bwd(const TokenBwdArgs& args, int num_threads);
void sequence_logprobs_fwd(const SeqFwdArgs& args, int num_threads);
void sequence_logprobs_bwd(const SeqBwdArgs& args, int num_threads);
void policy_loss_fwd(const PolicyFwdArgs& args, int num_threads);

inline int omp_default_threads() {
#ifdef _OPENMP
  return omp_get_max_threads();
#else
  return 1;
#endif
}

// Calls f(in_t{}) with the storage type of a dtype code.
template <typename F>
void dispatch_dtype(int dtype, F&& f) {
  switch (dtype) {
    case kFloat32: f(float{}); break;
    case kBFloat16: f(bf16{}); break;
    case kFloat16: f(f16{}); break;
    case kFloat64: f(double{}); break;
    default: throw std::invalid_argument("fastpo: unknown dtype code " + std::to_string(dtype));
  }
}

}  // namespace cpu
}  // namespace fastpo
