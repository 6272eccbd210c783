// Entry points of the CPU module (bound in module_cpu.cpp). Each parallelises
// over rows with OpenMP (parallel_rows); num_threads <= 0 means the OpenMP default.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstdlib>
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

// Bytes of logits per OpenMP task (default 4 MiB, or FASTPO_CPU_TASK_BYTES; 0 = a
// static split into one block of rows per thread).
inline int64_t task_bytes() {
  const char* env = std::getenv("FASTPO_CPU_TASK_BYTES");
  return env != nullptr ? std::strtoll(env, nullptr, 10) : (int64_t(4) << 20);
}

// Calls f(i) for every row i in [0, n_rows), on num_threads OpenMP threads.
//
// Dynamic schedule over tasks of contiguous rows, about 4 MiB of logits each: a
// thread that the OS deschedules (2 cores shared with other processes) delays only
// the task it holds, where a static split made every call wait for the slowest
// thread's whole half. Tasks are not smaller because the gradient rows of one task
// then share 2 MiB huge pages with the next task's: two threads faulting the same
// fresh huge page serialise on it (measured: 256 KiB tasks made fp32 2048 x 32000
// fwd+bwd 30% slower). Which thread computes a row never changes the row's bits.
// Small calls run on the calling thread (waking the pool costs more than they do).
template <typename F>
void parallel_rows(int64_t n_rows, int64_t vocab, int64_t elem_size, int num_threads, F&& f) {
  const int nt = num_threads > 0 ? num_threads : omp_default_threads();
  const int64_t row_bytes = (vocab > 0 ? vocab : 1) * elem_size;
  if (nt <= 1 || n_rows < 2 || n_rows * row_bytes < (int64_t(1) << 17)) {
    for (int64_t i = 0; i < n_rows; ++i) f(i);
    return;
  }
  const int64_t want = task_bytes();
  const int64_t per_thread = (n_rows + nt - 1) / nt;
  int64_t task = want > 0 ? want / row_bytes : per_thread;
  task = task < 1 ? 1 : (task > per_thread ? per_thread : task);
  const int64_t n_tasks = (n_rows + task - 1) / task;
#pragma omp parallel for num_threads(nt) schedule(dynamic, 1)
  for (int64_t k = 0; k < n_tasks; ++k) {
    const int64_t end = (k + 1) * task < n_rows ? (k + 1) * task : n_rows;
    for (int64_t i = k * task; i < end; ++i) f(i);
  }
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
