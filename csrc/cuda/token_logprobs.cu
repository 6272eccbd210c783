// token_logprobs on CUDA: one thread block per row of logits z [N, V] (or [R, C, V]:
// RowLayout), x = z / tau,
//   forward   logp = x_y - lse,  H = log s - t / s    (one read of the row)
//   backward  grad_j = (1/tau)[g_lp (1[j=y] - p_j) - g_H p_j (log p_j + H)]
//                                                   (one read, one write)
// One block per row (not a persistent grid): rows are independent and long
// (V >= thousands), so a block has plenty of work, two blocks per SM overlap one
// row's reduction with the next row's loads, the grid (N <= 2^31 - 1) balances
// itself, and a row's reduction order depends only on V and its alignment.
// Ignored rows (y == ignore_index) are not read: logp = H = lse = 0, zero grad.
// A label outside [0, V) is not read either: NaN outputs, a NaN gradient row.
#include "ops_cuda.h"
#include "row_softmax.cuh"

namespace fastpo {
namespace cuda {
namespace {

template <typename T>
__global__ void __launch_bounds__(kMaxThreads, kMinBlocks) token_logprobs_fwd_kernel(
    const T* __restrict__ logits,        // [N, V] T, rows at `layout`
    const int64_t* __restrict__ labels,  // [N]
    acc_of<T>* __restrict__ logp,        // [N] out
    acc_of<T>* __restrict__ entropy,     // [N] out
    acc_of<T>* __restrict__ lse,         // [N] out
    int64_t vocab, const RowLayout layout,
    acc_of<T> inv_tau, int64_t ignore_index) {
  using acc_t = acc_of<T>;
  const int64_t rowi = blockIdx.x;
  const int64_t y = labels[rowi];
  if (y == ignore_index || label_out_of_range(y, vocab)) {  // uniform over the block
    if (threadIdx.x == 0) logp[rowi] = entropy[rowi] = lse[rowi] = y == ignore_index ? acc_t(0) : acc_t(NAN);
    return;
  }
  const T* row = logits + layout.offset(rowi);
  const SoftmaxState<acc_t> st = block_merge(thread_row_state<T, kUnrollRead<T>>(row, vocab, inv_tau));
  if (threadIdx.x == 0) {
    const acc_t row_lse = st.lse();
    lse[rowi] = row_lse;
    entropy[rowi] = st.entropy();
    logp[rowi] = to_acc(row[y]) * inv_tau - row_lse;
  }
}

template <typename T, bool kHasEntropyGrad>
__global__ void __launch_bounds__(kMaxThreads, kMinBlocks) token_logprobs_bwd_kernel(
    const T* logits,                            // [N, V] T, rows at `layout` (may alias grad)
    const int64_t* __restrict__ labels,         // [N]
    const acc_of<T>* __restrict__ lse,          // [N]
    const acc_of<T>* __restrict__ entropy,      // [N]
    const acc_of<T>* __restrict__ grad_logp,    // [N]
    const acc_of<T>* __restrict__ grad_entropy, // [N] (unused unless kHasEntropyGrad)
    T* grad,                                    // [N, V] T, rows at `grad_layout`
    int64_t vocab, const RowLayout layout, const RowLayout grad_layout,
    acc_of<T> inv_tau, int64_t ignore_index) {
  using acc_t = acc_of<T>;
  const int64_t rowi = blockIdx.x;
  const int64_t y = labels[rowi];
  T* grad_row = grad + grad_layout.offset(rowi);
  if (y == ignore_index) {
    zero_row(grad_row, vocab);
    return;
  }
  if (label_out_of_range(y, vocab)) {
    nan_row(grad_row, vocab);
    return;
  }
  RowGrad<acc_t> c;
  c.inv_tau = inv_tau;
  c.lse = lse[rowi];
  c.entropy = entropy[rowi];
  c.g_lp = grad_logp[rowi] * inv_tau;
  c.g_H = kHasEntropyGrad ? grad_entropy[rowi] * inv_tau : acc_t(0);
  c.label = y;
  row_grad<T, kUnrollRead<T>, kHasEntropyGrad>(logits + layout.offset(rowi), grad_row, vocab, c);
}

template <typename T>
void launch_fwd(const TokenFwdArgs& a, cudaStream_t stream) {
  using acc_t = acc_of<T>;
  check_element_aligned(a.logits, sizeof(T), "token_logprobs_fwd");
  token_logprobs_fwd_kernel<T><<<grid_for(a.n_rows), threads_for(a.vocab, sizeof(T)), 0, stream>>>(
      static_cast<const T*>(a.logits), a.labels, static_cast<acc_t*>(a.logp), static_cast<acc_t*>(a.entropy),
      static_cast<acc_t*>(a.lse), a.vocab, a.layout, acc_t(1.0 / a.temperature) /* 1/tau in double, on the host */,
      a.ignore_index);
  check_launch("token_logprobs_fwd");
}

template <typename T>
void launch_bwd(const TokenBwdArgs& a, cudaStream_t stream) {
  using acc_t = acc_of<T>;
  check_element_aligned(a.logits, sizeof(T), "token_logprobs_bwd");
  check_element_aligned(a.grad, sizeof(T), "token_logprobs_bwd");
  auto kernel = a.grad_entropy != nullptr ? token_logprobs_bwd_kernel<T, true> : token_logprobs_bwd_kernel<T, false>;
  kernel<<<grid_for(a.n_rows), threads_for(a.vocab, sizeof(T)), 0, stream>>>(
      static_cast<const T*>(a.logits), a.labels, static_cast<const acc_t*>(a.lse),
      static_cast<const acc_t*>(a.entropy), static_cast<const acc_t*>(a.grad_logp),
      static_cast<const acc_t*>(a.grad_entropy), static_cast<T*>(a.grad), a.vocab, a.layout, a.grad_layout,
      acc_t(1.0 / a.temperature), a.ignore_index);
  check_launch("token_logprobs_bwd");
}

}  // namespace

void token_logprobs_fwd(const TokenFwdArgs& args, uintptr_t stream) {
  if (args.n_rows <= 0) return;
  dispatch_dtype(args.dtype, [&](auto tag) {
    launch_fwd<decltype(tag)>(args, reinterpret_cast<cudaStream_t>(stream));
  });
}

void token_logprobs_bwd(const TokenBwdArgs& args, uintptr_t stream) {
  if (args.n_rows <= 0) return;
  dispatch_dtype(args.dtype, [&](auto tag) {
    launch_bwd<decltype(tag)>(args, reinterpret_cast<cudaStream_t>(stream));
  });
}

}  // namespace cuda
}  // namespace fastpo
