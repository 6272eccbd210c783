// The fused policy loss on CPU: per row of logits z [N, V] with label y, x = z / tau,
//   pass 1  (m, s, t) of the row -> lse, H, logp = x_y - lse          (row_stats)
//           per-token loss L and dL/dlogp                             (policy_math.h)
//   pass 2  grad_j = (1/tau)[g_lp (1[j=y] - p_j) - g_H p_j (log p_j + H)]  (row_grad)
//           with g_lp = w dS/dlogp + w_kl dK/dlogp (S the policy term times policy_w, K the
//           KL term times kl_coef) and g_H = -w_H entropy_coef, w the token's aggregation
//           weight and w_kl, w_H the optional KL / entropy weights (default w).
// Both passes run back to back on one row, so the second read mostly hits the
// cache. Ignored rows (y == ignore_index) are never read: L = logp = H = 0 and a
// zero gradient row; nor are rows whose label is outside [0, V): NaN, NaN gradient. Same row kernels as token_logprobs (row_kernels.h).
#include <cstdint>

#include "../policy_math.h"
#include "ops_cpu.h"

namespace fastpo {
namespace cpu {
namespace {

template <typename in_t>
void policy_rows(const PolicyFwdArgs& a, int num_threads) {
  using acc_t = acc_of<in_t>;
  const RowKernels<in_t>& k = row_kernels<in_t>();
  const in_t* logits = static_cast<const in_t*>(a.logits);
  const acc_t* old = static_cast<const acc_t*>(a.old_logp);
  const acc_t* adv = static_cast<const acc_t*>(a.adv);
  const acc_t* ref = static_cast<const acc_t*>(a.ref_logp);
  const acc_t* weight = static_cast<const acc_t*>(a.weight);
  const acc_t* policy_w = static_cast<const acc_t*>(a.policy_w);  // each nullptr or [N]
  const acc_t* kl_w = static_cast<const acc_t*>(a.kl_w);
  const acc_t* ent_w = static_cast<const acc_t*>(a.ent_w);
  acc_t* loss = static_cast<acc_t*>(a.loss);
  acc_t* logp = static_cast<acc_t*>(a.logp);
  acc_t* entropy = static_cast<acc_t*>(a.entropy);
  in_t* grad = static_cast<in_t*>(a.grad);
  PolicyCoefs<acc_t> coefs = PolicyCoefs<acc_t>::from(a.params);
  if (ref == nullptr) coefs.kl_kind = kKlNone;
  const acc_t inv_tau = acc_t(1.0 / a.temperature);  // in double on the host
  const bool has_entropy_grad = coefs.entropy_coef != acc_t(0);
  parallel_rows(a.n_rows, a.vocab, sizeof(in_t), num_threads, [&](int64_t i) {
    const int64_t y = a.labels[i];
    in_t* grad_row = grad != nullptr ? grad + a.grad_layout.offset(i) : nullptr;
    if (y == a.ignore_index) {
      loss[i] = logp[i] = entropy[i] = acc_t(0);
      if (grad_row != nullptr) zero_row(grad_row, a.vocab);
      return;
    }
    if (label_out_of_range(y, a.vocab)) {  // never read: NaN outputs, a NaN gradient row
      loss[i] = logp[i] = entropy[i] = acc_t(NAN);
      if (grad_row != nullptr) nan_row(grad_row, a.vocab);
      return;
    }
    const in_t* row = logits + a.layout.offset(i);
    const SoftmaxState<acc_t> st = k.stats(row, a.vocab, inv_tau);
    const acc_t row_lse = st.lse(), row_entropy = st.entropy();
    const acc_t lp = load_acc<acc_t>(row[y]) * inv_tau - row_lse;
    const PolicyToken<acc_t> tok =
        policy_token_loss(lp, row_entropy, old[i], adv[i], coefs.kl_kind != kKlNone ? ref[i] : acc_t(0),
                          policy_w != nullptr ? policy_w[i] : acc_t(1), coefs);
    loss[i] = tok.v;
    logp[i] = lp;
    entropy[i] = row_entropy;
    if (grad_row == nullptr) return;
    const acc_t w = weight[i];
    RowGrad<acc_t> c;
    c.lse = row_lse;
    c.entropy = row_entropy;
    c.g_lp = policy_grad_coef(tok, w, kl_w != nullptr, kl_w != nullptr ? kl_w[i] : w);
    c.g_H = -(ent_w != nullptr ? ent_w[i] : w) * coefs.entropy_coef;
    c.inv_tau = inv_tau;
    c.label = y;
    c.has_entropy_grad = has_entropy_grad;
    // Ordinary stores, unlike token_logprobs_bwd: measured (fp32, 2048 x 32000, 2 cores) on the
    // buffer policy_loss writes, a fresh allocation, streaming was slower (45-53 vs 39-45 ms):
    // the kernel has just zeroed those pages, so they are partly cached. (Only a reused,
    // already-faulted buffer gains from streaming: 20 vs 26 ms.)
    c.stream = false;
    k.grad(row, grad_row, a.vocab, c);
  });
}

}  // namespace

void policy_loss_fwd(const PolicyFwdArgs& args, int num_threads) {
  check_policy_params(args.params);
  dispatch_dtype(args.dtype, [&](auto tag) { policy_rows<decltype(tag)>(args, num_threads); });
}

}  // namespace cpu
}  // namespace fastpo
