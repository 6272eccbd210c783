// Entry points of the CUDA module (bound in module_cuda.cpp, compiled by the
// host C++ compiler; the kernels are in the .cu files, compiled by nvcc). The
// stream travels as an integer (torch.cuda.current_stream().cuda_stream), so
// this header needs no CUDA headers. Errors are thrown as std::runtime_error.
#pragma once

#include <cstdint>

#include "../common.h"

namespace fastpo {
namespace cuda {

void token_logprobs_fwd(const TokenFwdArgs& args, uintptr_t stream);
void token_logprobs_bwd(const TokenBwdArgs& args, uintptr_t stream);
void sequence_logprobs_fwd(const SeqFwdArgs& args, uintptr_t stream);
void sequence_logprobs_bwd(const SeqBwdArgs& args, uintptr_t stream);
void policy_loss_fwd(const PolicyFwdArgs& args, uintptr_t stream);

}  // namespace cuda
}  // namespace fastpo
