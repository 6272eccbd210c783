// The fused policy loss on CUDA: one thread block per row of logits z [N, V], x = z / tau,
//   pass 1  (m, s, t) of the row -> lse, H, logp = x_y - lse     (thread_row_state + block_merge)
//           per-token loss L and dL/dlogp, in every thread        (policy_math.h; no broadcast needed)
//   pass 2  grad_j = (1/tau)[g_lp (1[j=y] - p_j) - g_H p_j (log p_j + H)]      (row_grad)
//           with g_lp = w dS/dlogp + w_kl dK/dlogp (S the policy term times policy_w, K the
//           KL term times kl_coef) and g_H = -w_H entropy_coef, w the token's aggregation
//           weight and w_kl, w_H the optional KL / entropy weights (default w).
// The label's logit is read before block_merge, whose barrier orders that read
// before any thread overwrites the row (grad may equal the logits). Ignored rows
// (y == ignore_index) are not read: L = logp = H = 0 and a zero gradient row; nor
// are rows whose label is outside [0, V): NaN outputs and a NaN gradient row.
// Loops unrolled by kUnrollPolicy = 2 (not 4): at two 512-thread blocks per SM
// (<= 64 registers) the 16-bit variants spilled with 4 packs in flight.
#include "../policy_math.h"
#include "ops_cuda.h"
#include "row_softmax.cuh"

namespace fastpo {
namespace cuda {
namespace {

template <typename T, bool kWriteGrad, bool kHasEntropyGrad>
__global__ void __launch_bounds__(kMaxThreads, kMinBlocks) policy_loss_fwd_kernel(
    const T* logits,                         // [N, V] T, rows at `layout` (may alias grad)
    const int64_t* __restrict__ labels,      // [N]; masked tokens carry ignore_index
    const acc_of<T>* __restrict__ old,       // [N] old log-probs
    const acc_of<T>* __restrict__ adv,       // [N] advantages (per token)
    const acc_of<T>* __restrict__ ref,       // [N] reference log-probs (read when coefs.kl_kind != 0)
    const acc_of<T>* __restrict__ weight,    // [N] aggregation weight (read when kWriteGrad)
    const acc_of<T>* __restrict__ policy_w,  // [N] policy-term factor, or nullptr (1)
    const acc_of<T>* __restrict__ kl_w,      // [N] KL gradient weight, or nullptr (weight; read when kWriteGrad)
    const acc_of<T>* __restrict__ ent_w,     // [N] entropy gradient weight, or nullptr (weight; kWriteGrad)
    acc_of<T>* __restrict__ loss,            // [N] out
    acc_of<T>* __restrict__ logp,            // [N] out
    acc_of<T>* __restrict__ entropy,         // [N] out
    T* grad,                                 // [N, V] T out (kWriteGrad), rows at `grad_layout`
    int64_t vocab, const RowLayout layout, const RowLayout grad_layout,
    acc_of<T> inv_tau, int64_t ignore_index, const PolicyCoefs<acc_of<T>> coefs) {
  using acc_t = acc_of<T>;
  const int64_t rowi = blockIdx.x;
  const int64_t y = labels[rowi];
  if (y == ignore_index || label_out_of_range(y, vocab)) {  // uniform over the block
    const acc_t fill = y == ignore_index ? acc_t(0) : acc_t(NAN);
    if (threadIdx.x == 0) loss[rowi] = logp[rowi] = entropy[rowi] = fill;
    if (kWriteGrad) fill_row(grad + grad_layout.offset(rowi), vocab, fill);
    return;
  }
  const T* row = logits + layout.offset(rowi);
  const acc_t z_y = to_acc(row[y]);  // before block_merge's barrier: no thread has written yet
  const SoftmaxState<acc_t> st = block_merge(thread_row_state<T, kUnrollPolicy<T>>(row, vocab, inv_tau));
  const acc_t row_lse = st.lse(), row_entropy = st.entropy();
  const acc_t lp = z_y * inv_tau - row_lse;
  const PolicyToken<acc_t> tok =
      policy_token_loss(lp, row_entropy, old[rowi], adv[rowi], coefs.kl_kind != kKlNone ? ref[rowi] : acc_t(0),
                        policy_w != nullptr ? policy_w[rowi] : acc_t(1), coefs);
  if (threadIdx.x == 0) {
    loss[rowi] = tok.v;
    logp[rowi] = lp;
    entropy[rowi] = row_entropy;
  }
  if (kWriteGrad) {
    const acc_t w = weight[rowi];
    RowGrad<acc_t> c;
    c.inv_tau = inv_tau;
    c.lse = row_lse;
    c.entropy = row_entropy;
    c.g_lp = policy_grad_coef(tok, w, kl_w != nullptr, kl_w != nullptr ? kl_w[rowi] : w) * inv_tau;
    c.g_H = -(ent_w != nullptr ? ent_w[rowi] : w) * coefs.entropy_coef * inv_tau;
    c.label = y;
    row_grad<T, kUnrollPolicy<T>, kHasEntropyGrad>(row, grad + grad_layout.offset(rowi), vocab, c);
  }
}

template <typename T, bool kWriteGrad>
void launch(const PolicyFwdArgs& a, const PolicyCoefs<acc_of<T>>& coefs, cudaStream_t stream) {
  using acc_t = acc_of<T>;
  auto kernel = kWriteGrad && coefs.entropy_coef != acc_t(0) ? policy_loss_fwd_kernel<T, kWriteGrad, true>
                                                             : policy_loss_fwd_kernel<T, kWriteGrad, false>;
  kernel<<<grid_for(a.n_rows), threads_for(a.vocab, sizeof(T)), 0, stream>>>(
      static_cast<const T*>(a.logits), a.labels, static_cast<const acc_t*>(a.old_logp),
      static_cast<const acc_t*>(a.adv), static_cast<const acc_t*>(a.ref_logp), static_cast<const acc_t*>(a.weight),
      static_cast<const acc_t*>(a.policy_w), static_cast<const acc_t*>(a.kl_w), static_cast<const acc_t*>(a.ent_w),
      static_cast<acc_t*>(a.loss), static_cast<acc_t*>(a.logp), static_cast<acc_t*>(a.entropy),
      static_cast<T*>(a.grad), a.vocab, a.layout, a.grad_layout, acc_t(1.0 / a.temperature),
      a.ignore_index, coefs);
  check_launch("policy_loss_fwd");
}

template <typename T>
void launch_dtype(const PolicyFwdArgs& a, cudaStream_t stream) {
  PolicyCoefs<acc_of<T>> coefs = PolicyCoefs<acc_of<T>>::from(a.params);
  if (a.ref_logp == nullptr) coefs.kl_kind = kKlNone;
  check_element_aligned(a.logits, sizeof(T), "policy_loss_fwd");
  if (a.grad != nullptr) {
    check_element_aligned(a.grad, sizeof(T), "policy_loss_fwd");
    launch<T, true>(a, coefs, stream);
  } else {
    launch<T, false>(a, coefs, stream);
  }
}

}  // namespace

void policy_loss_fwd(const PolicyFwdArgs& args, uintptr_t stream) {
  check_policy_params(args.params);
  if (args.n_rows <= 0) return;
  dispatch_dtype(args.dtype, [&](auto tag) {
    launch_dtype<decltype(tag)>(args, reinterpret_cast<cudaStream_t>(stream));
  });
}

}  // namespace cuda
}  // namespace fastpo
