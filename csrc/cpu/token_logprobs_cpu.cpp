// token_logprobs on CPU: per row of logits z [N, V] (or [R, C, V], RowLayout) with
// label y, x = z / tau,
//   forward   logp = x_y - lse,  H = log s - t / s          (one read of the row)
//   backward  grad_j = (1/tau)[g_lp (1[j=y] - p_j) - g_H p_j (log p_j + H)]
//                                                     (one read, one write)
// Ignored rows (y == ignore_index) are never read: logp = H = lse = 0 and a
// zero gradient row. A label outside [0, V) is never read either: NaN outputs
// and a NaN gradient row. Rows are independent (parallel_rows).
#include <cstdint>

#include "ops_cpu.h"

namespace fastpo {
namespace cpu {
namespace {

template <typename in_t>
void fwd_rows(const TokenFwdArgs& a, int num_threads) {
  using acc_t = acc_of<in_t>;
  const RowKernels<in_t>& k = row_kernels<in_t>();
  const in_t* logits = static_cast<const in_t*>(a.logits);
  acc_t* logp = static_cast<acc_t*>(a.logp);
  acc_t* entropy = static_cast<acc_t*>(a.entropy);
  acc_t* lse = static_cast<acc_t*>(a.lse);
  const acc_t inv_tau = acc_t(1.0 / a.temperature);  // in double on the host, then rounded once
  parallel_rows(a.n_rows, a.vocab, sizeof(in_t), num_threads, [&](int64_t i) {
    const int64_t y = a.labels[i];
    if (y == a.ignore_index) {
      logp[i] = entropy[i] = lse[i] = acc_t(0);
      return;
    }
    if (label_out_of_range(y, a.vocab)) {
      logp[i] = entropy[i] = lse[i] = acc_t(NAN);
      return;
    }
    const in_t* row = logits + a.layout.offset(i);
    const SoftmaxState<acc_t> st = k.stats(row, a.vocab, inv_tau);
    const acc_t row_lse = st.lse();
    lse[i] = row_lse;
    entropy[i] = st.entropy();
    logp[i] = load_acc<acc_t>(row[y]) * inv_tau - row_lse;
  });
}

template <typename in_t>
void bwd_rows(const TokenBwdArgs& a, int num_threads) {
  using acc_t = acc_of<in_t>;
  const RowKernels<in_t>& k = row_kernels<in_t>();
  const in_t* logits = static_cast<const in_t*>(a.logits);
  in_t* grad = static_cast<in_t*>(a.grad);
  const acc_t* lse = static_cast<const acc_t*>(a.lse);
  const acc_t* entropy = static_cast<const acc_t*>(a.entropy);
  const acc_t* grad_logp = static_cast<const acc_t*>(a.grad_logp);
  const acc_t* grad_entropy = static_cast<const acc_t*>(a.grad_entropy);
  const acc_t inv_tau = acc_t(1.0 / a.temperature);
  // (16-bit grads: streaming measured slower, their writes are cheap enough)
  const bool stream = sizeof(in_t) >= 4 && a.n_rows * a.vocab * int64_t(sizeof(in_t)) >= stream_min_bytes();
  parallel_rows(a.n_rows, a.vocab, sizeof(in_t), num_threads, [&](int64_t i) {
    const int64_t y = a.labels[i];
    in_t* grad_row = grad + a.grad_layout.offset(i);
    if (y == a.ignore_index) {
      zero_row(grad_row, a.vocab);
      return;
    }
    if (label_out_of_range(y, a.vocab)) {
      nan_row(grad_row, a.vocab);
      return;
    }
    RowGrad<acc_t> c;
    c.lse = lse[i];
    c.entropy = entropy[i];
    c.g_lp = grad_logp[i];
    c.g_H = grad_entropy != nullptr ? grad_entropy[i] : acc_t(0);
    c.inv_tau = inv_tau;
    c.label = y;
    c.stream = stream;
    c.has_entropy_grad = grad_entropy != nullptr;
    k.grad(logits + a.layout.offset(i), grad_row, a.vocab, c);
  });
}

}  // namespace

void token_logprobs_fwd(const TokenFwdArgs& args, int num_threads) {
  dispatch_dtype(args.dtype, [&](auto tag) { fwd_rows<decltype(tag)>(args, num_threads); });
}

void token_logprobs_bwd(const TokenBwdArgs& args, int num_threads) {
  dispatch_dtype(args.dtype, [&](auto tag) { bwd_rows<decltype(tag)>(args, num_threads); });
}

}  // namespace cpu
}  // namespace fastpo
