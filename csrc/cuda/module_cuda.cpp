// fastpo._C_cuda: the CUDA kernels (one block per row). Compiled by the host C++
// compiler (pybind11 stays away from nvcc); the kernels come from the .cu files.
// See csrc/bindings.h for the calling convention and fastpo/kernels/cpp.py.
#include "../bindings.h"
#include "ops_cuda.h"

PYBIND11_MODULE(_C_cuda, m) {
  m.doc() = "fastpo CUDA kernels; raw-pointer bindings used by fastpo.kernels.cpp";
  fastpo::bind_ops<uintptr_t>(m,
                              {&fastpo::cuda::token_logprobs_fwd, &fastpo::cuda::token_logprobs_bwd,
                               &fastpo::cuda::sequence_logprobs_fwd, &fastpo::cuda::sequence_logprobs_bwd,
                               &fastpo::cuda::policy_loss_fwd},
                              "stream");
}
