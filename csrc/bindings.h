// pybind11 bindings shared by fastpo._C_cpu and fastpo._C_cuda: the same five
// functions with the same argument names; tensors travel as raw addresses
// (Python ints from tensor.data_ptr()), sizes and element strides, so neither
// module needs torch headers. The last argument is the OpenMP thread count
// (CPU) or the CUDA stream (GPU). The GIL is released while a kernel runs.
#pragma once

#include <pybind11/pybind11.h>

#include <cstdint>
#include <stdexcept>

#include "common.h"

namespace fastpo {

template <typename Last>
struct OpTable {
  void (*token_fwd)(const TokenFwdArgs&, Last);
  void (*token_bwd)(const TokenBwdArgs&, Last);
  void (*seq_fwd)(const SeqFwdArgs&, Last);
  void (*seq_bwd)(const SeqBwdArgs&, Last);
  void (*policy_fwd)(const PolicyFwdArgs&, Last);
};

template <typename T>
T* as_ptr(uintptr_t address) {
  return reinterpret_cast<T*>(address);
}

// Rows of an [R, C, V] tensor (C = 1 for [N, V]); C < 1 is rejected.
inline RowLayout layout(int64_t n_cols, int64_t stride0, int64_t stride1) {
  if (n_cols < 1) throw std::invalid_argument("fastpo: n_cols must be >= 1");
  return RowLayout{n_cols, stride0, stride1};
}

template <typename Last>
void bind_ops(pybind11::module_& m, const OpTable<Last> ops, const char* last) {
  namespace py = pybind11;
  using u = uintptr_t;
  const auto nogil = py::call_guard<py::gil_scoped_release>();

  m.def(
      "token_logprobs_fwd",
      [ops](u logits, u labels, u logp, u entropy, u lse, int64_t n_rows, int64_t vocab, int64_t n_cols,
            int64_t stride0, int64_t stride1, int dtype, double temperature, int64_t ignore_index, Last last_arg) {
        ops.token_fwd(TokenFwdArgs{as_ptr<const void>(logits), as_ptr<const int64_t>(labels), as_ptr<void>(logp),
                                   as_ptr<void>(entropy), as_ptr<void>(lse), n_rows, vocab,
                                   layout(n_cols, stride0, stride1), dtype, temperature, ignore_index},
                      last_arg);
      },
      nogil, py::arg("logits_ptr"), py::arg("labels_ptr"), py::arg("logp_ptr"), py::arg("entropy_ptr"),
      py::arg("lse_ptr"), py::arg("n_rows"), py::arg("vocab"), py::arg("n_cols"), py::arg("logits_stride0"),
      py::arg("logits_stride1"), py::arg("dtype_code"), py::arg("temperature"), py::arg("ignore_index"),
      py::arg(last));

  m.def(
      "token_logprobs_bwd",
      [ops](u logits, u labels, u lse, u entropy, u grad_logp, u grad_entropy, u grad, int64_t n_rows,
            int64_t vocab, int64_t n_cols, int64_t stride0, int64_t stride1, int64_t grad_stride0,
            int64_t grad_stride1, int dtype, double temperature, int64_t ignore_index, Last last_arg) {
        ops.token_bwd(TokenBwdArgs{as_ptr<const void>(logits), as_ptr<const int64_t>(labels), as_ptr<const void>(lse),
                                   as_ptr<const void>(entropy), as_ptr<const void>(grad_logp),
                                   as_ptr<const void>(grad_entropy), as_ptr<void>(grad), n_rows, vocab,
                                   layout(n_cols, stride0, stride1), layout(n_cols, grad_stride0, grad_stride1),
                                   dtype, temperature, ignore_index},
                      last_arg);
      },
      nogil, py::arg("logits_ptr"), py::arg("labels_ptr"), py::arg("lse_ptr"), py::arg("entropy_ptr"),
      py::arg("grad_logp_ptr"), py::arg("grad_entropy_ptr"), py::arg("grad_ptr"), py::arg("n_rows"),
      py::arg("vocab"), py::arg("n_cols"), py::arg("logits_stride0"), py::arg("logits_stride1"),
      py::arg("grad_stride0"), py::arg("grad_stride1"), py::arg("dtype_code"), py::arg("temperature"),
      py::arg("ignore_index"), py::arg(last));

  m.def(
      "sequence_logprobs_fwd",
      [ops](u logits, u labels, u out, u lse, int64_t batch, int64_t seq_len, int64_t vocab, int64_t stride_b,
            int64_t stride_t, int dtype, double temperature, int64_t ignore_index, int average, Last last_arg) {
        ops.seq_fwd(SeqFwdArgs{as_ptr<const void>(logits), as_ptr<const int64_t>(labels), as_ptr<void>(out),
                               as_ptr<void>(lse), batch, seq_len, vocab, stride_b, stride_t, dtype, temperature,
                               ignore_index, average != 0},
                    last_arg);
      },
      nogil, py::arg("logits_ptr"), py::arg("labels_ptr"), py::arg("out_ptr"), py::arg("lse_ptr"), py::arg("batch"),
      py::arg("seq_len"), py::arg("vocab"), py::arg("stride_b"), py::arg("stride_t"), py::arg("dtype_code"),
      py::arg("temperature"), py::arg("ignore_index"), py::arg("average"), py::arg(last));

  m.def(
      "sequence_logprobs_bwd",
      [ops](u logits, u labels, u lse, u grad_out, u scale, u grad, int64_t batch, int64_t seq_len, int64_t vocab,
            int64_t stride_b, int64_t stride_t, int64_t grad_stride_b, int64_t grad_stride_t, int dtype,
            double temperature, int64_t ignore_index, int average, Last last_arg) {
        ops.seq_bwd(SeqBwdArgs{as_ptr<const void>(logits), as_ptr<const int64_t>(labels), as_ptr<const void>(lse),
                               as_ptr<const void>(grad_out), as_ptr<void>(scale), as_ptr<void>(grad), batch, seq_len, vocab, stride_b,
                               stride_t, grad_stride_b, grad_stride_t, dtype, temperature, ignore_index,
                               average != 0},
                    last_arg);
      },
      nogil, py::arg("logits_ptr"), py::arg("labels_ptr"), py::arg("lse_ptr"), py::arg("grad_out_ptr"),
      py::arg("scale_ptr"), py::arg("grad_ptr"), py::arg("batch"), py::arg("seq_len"), py::arg("vocab"), py::arg("stride_b"),
      py::arg("stride_t"), py::arg("grad_stride_b"), py::arg("grad_stride_t"), py::arg("dtype_code"),
      py::arg("temperature"), py::arg("ignore_index"), py::arg("average"), py::arg(last));

  // ref_ptr = 0: no KL term; grad_ptr = 0: no gradient; policy_w_ptr / kl_w_ptr / ent_w_ptr = 0:
  // policy weight 1, KL and entropy gradient weights = weight. The new arguments follow
  // ignore_index (before the last one) and have no defaults, like the others.
  m.def(
      "policy_loss_fwd",
      [ops](u logits, u labels, u old, u adv, u ref, u weight, u loss, u logp, u entropy, u grad, int64_t n_rows,
            int64_t vocab, int64_t n_cols, int64_t stride0, int64_t stride1, int64_t grad_stride0,
            int64_t grad_stride1, int dtype, int variant, double clip_low,
            double clip_high, double ratio_cap, double dual_clip, double logratio_clamp, int kl_kind,
            bool kl_straight, double kl_clamp, double kl_coef, double entropy_coef, double temperature,
            int64_t ignore_index, double sapo_tau_pos, double sapo_tau_neg, bool kl_weighted, u policy_w, u kl_w,
            u ent_w, Last last_arg) {
        const PolicyParams params{variant,  clip_low,    clip_high, ratio_cap, dual_clip,    logratio_clamp,
                                  kl_kind,  kl_straight, kl_clamp,  kl_coef,   entropy_coef, sapo_tau_pos,
                                  sapo_tau_neg, kl_weighted};
        ops.policy_fwd(PolicyFwdArgs{as_ptr<const void>(logits), as_ptr<const int64_t>(labels),
                                     as_ptr<const void>(old), as_ptr<const void>(adv), as_ptr<const void>(ref),
                                     as_ptr<const void>(weight), as_ptr<const void>(policy_w),
                                     as_ptr<const void>(kl_w), as_ptr<const void>(ent_w), as_ptr<void>(loss),
                                     as_ptr<void>(logp), as_ptr<void>(entropy), as_ptr<void>(grad), n_rows, vocab,
                                     layout(n_cols, stride0, stride1), layout(n_cols, grad_stride0, grad_stride1),
                                     dtype, params, temperature, ignore_index},
                       last_arg);
      },
      nogil, py::arg("logits_ptr"), py::arg("labels_ptr"), py::arg("old_ptr"), py::arg("adv_ptr"),
      py::arg("ref_ptr"), py::arg("weight_ptr"), py::arg("loss_ptr"), py::arg("logp_ptr"), py::arg("entropy_ptr"),
      py::arg("grad_ptr"), py::arg("n_rows"), py::arg("vocab"), py::arg("n_cols"), py::arg("logits_stride0"),
      py::arg("logits_stride1"), py::arg("grad_stride0"), py::arg("grad_stride1"), py::arg("dtype_code"),
      py::arg("variant"), py::arg("clip_low"),
      py::arg("clip_high"), py::arg("ratio_cap"), py::arg("dual_clip"), py::arg("logratio_clamp"),
      py::arg("kl_kind"), py::arg("kl_straight"), py::arg("kl_clamp"), py::arg("kl_coef"), py::arg("entropy_coef"),
      py::arg("temperature"), py::arg("ignore_index"), py::arg("sapo_tau_pos"), py::arg("sapo_tau_neg"),
      py::arg("kl_weighted"), py::arg("policy_w_ptr"), py::arg("kl_w_ptr"), py::arg("ent_w_ptr"), py::arg(last));
}

}  // namespace fastpo
