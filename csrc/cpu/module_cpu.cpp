// fastpo._C_cpu: the CPU kernels (OpenMP over rows). See csrc/bindings.h for the
// calling convention and fastpo/kernels/cpp.py for the Python launchers.
#include "../bindings.h"
#include "ops_cpu.h"

PYBIND11_MODULE(_C_cpu, m) {
  m.doc() = "fastpo CPU kernels (C++/OpenMP); raw-pointer bindings used by fastpo.kernels.cpp";
  fastpo::bind_ops<int>(m,
                        {&fastpo::cpu::token_logprobs_fwd, &fastpo::cpu::token_logprobs_bwd,
                         &fastpo::cpu::sequence_logprobs_fwd, &fastpo::cpu::sequence_logprobs_bwd,
                         &fastpo::cpu::policy_loss_fwd},
                        "num_threads");
  m.def("isa", &fastpo::cpu::row_kernels_isa, "instruction set of the row kernels chosen for this CPU");
}
