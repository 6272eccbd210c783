// sequence_logprobs on CUDA: logits z [B, T, V], labels [B, T], x = z / tau,
//   out_b = sum_t keep_bt logp_bt           (average: divided by max(1, count_b))
//   grad  = g_b w_b (1[j = y] - p_j) / tau  on kept tokens, exactly 0 on ignored ones.
// Forward in two launches, both deterministic (no atomics): one block per token
// row writes its lse; then one block per sequence sums logp = x_y - lse (one
// logit per token) in fp64 with a fixed tree. Backward in two launches: one
// block per sequence writes its weight g_b w_b (counting its kept tokens once:
// O(B T), where counting in every row was O(B T^2)), then one block per token row.
// A label outside [0, V) is never read: NaN lse / sequence value / gradient row.
#include "ops_cuda.h"
#include "row_softmax.cuh"

namespace fastpo {
namespace cuda {
namespace {

constexpr int kSumThreads = 256;  // power of two (tree reduction)

template <typename T>
__global__ void __launch_bounds__(kMaxThreads, kMinBlocks) sequence_lse_kernel(
    const T* __restrict__ logits,        // [B, T, V] T, strides (stride_b, stride_t, 1)
    const int64_t* __restrict__ labels,  // [B * T]
    acc_of<T>* __restrict__ lse,         // [B * T] out
    int64_t seq_len, int64_t vocab, int64_t stride_b, int64_t stride_t,
    acc_of<T> inv_tau, int64_t ignore_index) {
  using acc_t = acc_of<T>;
  const int64_t r = blockIdx.x, b = r / seq_len, t = r % seq_len;
  const int64_t y = labels[r];
  if (y == ignore_index || label_out_of_range(y, vocab)) {  // uniform over the block
    if (threadIdx.x == 0) lse[r] = y == ignore_index ? acc_t(0) : acc_t(NAN);
    return;
  }
  const T* row = logits + b * stride_b + t * stride_t;
  const SoftmaxState<acc_t> st = block_merge(thread_row_state<T, kUnrollRead<T>>(row, vocab, inv_tau));
  if (threadIdx.x == 0) lse[r] = st.lse();
}

template <typename T>
__global__ void __launch_bounds__(kSumThreads) sequence_sum_kernel(
    const T* __restrict__ logits,         // [B, T, V]
    const int64_t* __restrict__ labels,   // [B * T]
    const acc_of<T>* __restrict__ lse,    // [B * T]
    acc_of<T>* __restrict__ out,          // [B] out
    int64_t seq_len, int64_t vocab, int64_t stride_b, int64_t stride_t,
    acc_of<T> inv_tau, int64_t ignore_index, bool average) {
  using acc_t = acc_of<T>;
  __shared__ double sums[kSumThreads];
  __shared__ long long counts[kSumThreads];
  const int64_t b = blockIdx.x;
  double sum = 0.0;
  long long count = 0;
  for (int64_t t = threadIdx.x; t < seq_len; t += kSumThreads) {
    const int64_t y = labels[b * seq_len + t];
    if (y == ignore_index) continue;
    ++count;
    if (label_out_of_range(y, vocab)) {  // never read: the sequence's value is NaN
      sum = double(NAN);
      continue;
    }
    const acc_t x_y = to_acc(logits[b * stride_b + t * stride_t + y]) * inv_tau;
    sum += double(x_y - lse[b * seq_len + t]);
  }
  sums[threadIdx.x] = sum;
  counts[threadIdx.x] = count;
  __syncthreads();
  for (int w = kSumThreads / 2; w > 0; w >>= 1) {
    if (threadIdx.x < w) {
      sums[threadIdx.x] += sums[threadIdx.x + w];
      counts[threadIdx.x] += counts[threadIdx.x + w];
    }
    __syncthreads();
  }
  if (threadIdx.x == 0) {
    const double total = sums[0];
    const long long n = counts[0];
    out[b] = acc_t(average ? (n > 0 ? total / double(n) : 0.0) : total);
  }
}

// scale_b = grad_out_b (sum) or grad_out_b / max(1, count_b) (average): once per sequence.
template <typename acc_t>
__global__ void __launch_bounds__(kSumThreads) sequence_scale_kernel(
    const int64_t* __restrict__ labels,      // [B * T]
    const acc_t* __restrict__ grad_out,      // [B]
    acc_t* __restrict__ scale,               // [B] out
    int64_t seq_len, int64_t ignore_index, bool average) {
  const int64_t b = blockIdx.x;
  int count = 0;
  if (average)
    for (int64_t t0 = 0; t0 < seq_len; t0 += kSumThreads) {
      const int64_t t = t0 + threadIdx.x;
      count += __syncthreads_count(t < seq_len && labels[b * seq_len + t] != ignore_index);
    }
  if (threadIdx.x == 0) scale[b] = average ? grad_out[b] / acc_t(count > 0 ? count : 1) : grad_out[b];
}

template <typename T>
__global__ void __launch_bounds__(kMaxThreads, kMinBlocks) sequence_bwd_kernel(
    const T* logits,                          // [B, T, V] T (may alias grad)
    const int64_t* __restrict__ labels,       // [B * T]
    const acc_of<T>* __restrict__ lse,        // [B * T]
    const acc_of<T>* __restrict__ scale,      // [B] from sequence_scale_kernel
    T* grad,                                  // [B, T, V] T, strides (grad_stride_b, grad_stride_t, 1)
    int64_t seq_len, int64_t vocab, int64_t stride_b, int64_t stride_t,
    int64_t grad_stride_b, int64_t grad_stride_t,
    acc_of<T> inv_tau, int64_t ignore_index) {
  using acc_t = acc_of<T>;
  const int64_t r = blockIdx.x, b = r / seq_len, t = r % seq_len;
  const int64_t y = labels[r];
  T* grad_row = grad + b * grad_stride_b + t * grad_stride_t;
  if (y == ignore_index) {  // uniform over the block
    zero_row(grad_row, vocab);
    return;
  }
  if (label_out_of_range(y, vocab)) {
    nan_row(grad_row, vocab);
    return;
  }
  RowGrad<acc_t> c;
  c.inv_tau = inv_tau;
  c.lse = lse[r];
  c.entropy = acc_t(0);
  c.g_lp = scale[b] * inv_tau;
  c.g_H = acc_t(0);
  c.label = y;
  row_grad<T, kUnrollRead<T>, false>(logits + b * stride_b + t * stride_t, grad_row, vocab, c);
}

template <typename T>
void launch_fwd(const SeqFwdArgs& a, cudaStream_t stream) {
  using acc_t = acc_of<T>;
  const acc_t inv_tau = acc_t(1.0 / a.temperature);
  const T* logits = static_cast<const T*>(a.logits);
  check_element_aligned(a.logits, sizeof(T), "sequence_logprobs_fwd");
  sequence_lse_kernel<T><<<grid_for(a.batch * a.seq_len), threads_for(a.vocab, sizeof(T)), 0, stream>>>(
      logits, a.labels, static_cast<acc_t*>(a.lse), a.seq_len, a.vocab, a.stride_b, a.stride_t, inv_tau,
      a.ignore_index);
  check_launch("sequence_logprobs_fwd (lse)");
  sequence_sum_kernel<T><<<grid_for(a.batch), kSumThreads, 0, stream>>>(
      logits, a.labels, static_cast<const acc_t*>(a.lse), static_cast<acc_t*>(a.out), a.seq_len, a.vocab,
      a.stride_b, a.stride_t, inv_tau, a.ignore_index, a.average);
  check_launch("sequence_logprobs_fwd (sum)");
}

template <typename T>
void launch_bwd(const SeqBwdArgs& a, cudaStream_t stream) {
  using acc_t = acc_of<T>;
  check_element_aligned(a.logits, sizeof(T), "sequence_logprobs_bwd");
  check_element_aligned(a.grad, sizeof(T), "sequence_logprobs_bwd");
  if (a.scale == nullptr) throw std::invalid_argument("fastpo sequence_logprobs_bwd: scale scratch is required");
  sequence_scale_kernel<acc_t><<<grid_for(a.batch), kSumThreads, 0, stream>>>(
      a.labels, static_cast<const acc_t*>(a.grad_out), static_cast<acc_t*>(a.scale), a.seq_len, a.ignore_index,
      a.average);
  check_launch("sequence_logprobs_bwd (scale)");
  sequence_bwd_kernel<T><<<grid_for(a.batch * a.seq_len), threads_for(a.vocab, sizeof(T)), 0, stream>>>(
      static_cast<const T*>(a.logits), a.labels, static_cast<const acc_t*>(a.lse),
      static_cast<const acc_t*>(a.scale), static_cast<T*>(a.grad), a.seq_len, a.vocab, a.stride_b, a.stride_t,
      a.grad_stride_b, a.grad_stride_t, acc_t(1.0 / a.temperature), a.ignore_index);
  check_launch("sequence_logprobs_bwd");
}

}  // namespace

void sequence_logprobs_fwd(const SeqFwdArgs& args, uintptr_t stream) {
  if (args.batch <= 0) return;
  if (args.seq_len <= 0) {  // no tokens: every sequence sums to 0
    const size_t bytes = size_t(args.batch) * (args.dtype == kFloat64 ? sizeof(double) : sizeof(float));
    if (cudaMemsetAsync(args.out, 0, bytes, reinterpret_cast<cudaStream_t>(stream)) != cudaSuccess)
      check_launch("sequence_logprobs_fwd (memset)");
    return;
  }
  dispatch_dtype(args.dtype, [&](auto tag) {
    launch_fwd<decltype(tag)>(args, reinterpret_cast<cudaStream_t>(stream));
  });
}

void sequence_logprobs_bwd(const SeqBwdArgs& args, uintptr_t stream) {
  if (args.batch <= 0 || args.seq_len <= 0) return;
  dispatch_dtype(args.dtype, [&](auto tag) {
    launch_bwd<decltype(tag)>(args, reinterpret_cast<cudaStream_t>(stream));
  });
}

}  // namespace cuda
}  // namespace fastpo
