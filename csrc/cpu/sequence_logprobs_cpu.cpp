// sequence_logprobs on CPU: logits z [B, T, V], labels [B, T], x = z / tau,
//   out_b = sum_t keep_bt logp_bt            (average: divided by max(1, sum_t keep_bt))
//   grad  = g_b w_b (1[j = y] - p_j) / tau  on kept tokens, exactly 0 on ignored ones,
// with w_b = 1 (sum) or 1 / max(1, count_b) (average). A label outside [0, V)
// is never read: its sequence's value is NaN and its gradient row NaN. The
// forward first finds every token's lse in parallel over all B*T rows (one read each), then sums
// logp = x_y - lse per sequence in a fixed order (fp64 accumulator), so a
// sequence's value never depends on the batch or the thread count.
#include <cstdint>
#include <vector>

#include "ops_cpu.h"

namespace fastpo {
namespace cpu {
namespace {

template <typename in_t>
void seq_fwd(const SeqFwdArgs& a, int num_threads) {
  using acc_t = acc_of<in_t>;
  const RowKernels<in_t>& k = row_kernels<in_t>();
  const in_t* logits = static_cast<const in_t*>(a.logits);
  acc_t* out = static_cast<acc_t*>(a.out);
  acc_t* lse = static_cast<acc_t*>(a.lse);
  const acc_t inv_tau = acc_t(1.0 / a.temperature);  // in double on the host
  const int64_t T = a.seq_len;
  const RowLayout layout{T, a.stride_b, a.stride_t};
  parallel_rows(a.batch * T, a.vocab, sizeof(in_t), num_threads, [&](int64_t r) {
    const int64_t y = a.labels[r];
    if (y == a.ignore_index) {
      lse[r] = acc_t(0);
      return;
    }
    lse[r] = label_out_of_range(y, a.vocab) ? acc_t(NAN) : k.stats(logits + layout.offset(r), a.vocab, inv_tau).lse();
  });
  // One logit per kept token, summed in t order (a cache line each).
  parallel_rows(a.batch, T, 64, num_threads, [&](int64_t b) {
    double sum = 0.0;
    int64_t count = 0;
    for (int64_t t = 0; t < T; ++t) {
      const int64_t y = a.labels[b * T + t];
      if (y == a.ignore_index) continue;
      ++count;
      if (label_out_of_range(y, a.vocab)) {  // never read: the sequence's value is NaN
        sum = NAN;
        continue;
      }
      const in_t* row = logits + layout.offset(b * T + t);
      sum += double(load_acc<acc_t>(row[y]) * inv_tau - lse[b * T + t]);
    }
    out[b] = acc_t(a.average ? (count > 0 ? sum / double(count) : 0.0) : sum);
  });
}

template <typename in_t>
void seq_bwd(const SeqBwdArgs& a, int num_threads) {
  using acc_t = acc_of<in_t>;
  const RowKernels<in_t>& k = row_kernels<in_t>();
  const in_t* logits = static_cast<const in_t*>(a.logits);
  in_t* grad = static_cast<in_t*>(a.grad);
  const acc_t* lse = static_cast<const acc_t*>(a.lse);
  const acc_t* grad_out = static_cast<const acc_t*>(a.grad_out);
  const acc_t inv_tau = acc_t(1.0 / a.temperature);
  const int64_t T = a.seq_len;
  const RowLayout layout{T, a.stride_b, a.stride_t}, grad_layout{T, a.grad_stride_b, a.grad_stride_t};
  // Each sequence's weight once (O(B T)), not once per row.
  std::vector<acc_t> scale(size_t(a.batch > 0 ? a.batch : 0));
  for (int64_t b = 0; b < a.batch; ++b) {
    int64_t count = 0;
    for (int64_t t = 0; t < T; ++t) count += a.labels[b * T + t] != a.ignore_index;
    scale[b] = a.average ? grad_out[b] / acc_t(count > 0 ? count : 1) : grad_out[b];
  }
  // (16-bit grads: streaming measured slower, their writes are cheap enough)
  const bool stream = sizeof(in_t) >= 4 && a.batch * T * a.vocab * int64_t(sizeof(in_t)) >= stream_min_bytes();
  parallel_rows(a.batch * T, a.vocab, sizeof(in_t), num_threads, [&](int64_t r) {
    const int64_t y = a.labels[r];
    in_t* grad_row = grad + grad_layout.offset(r);
    if (y == a.ignore_index) {
      zero_row(grad_row, a.vocab);
      return;
    }
    if (label_out_of_range(y, a.vocab)) {
      nan_row(grad_row, a.vocab);
      return;
    }
    RowGrad<acc_t> c;
    c.lse = lse[r];
    c.entropy = acc_t(0);
    c.g_lp = scale[r / T];
    c.g_H = acc_t(0);
    c.inv_tau = inv_tau;
    c.label = y;
    c.stream = stream;
    c.has_entropy_grad = false;
    k.grad(logits + layout.offset(r), grad_row, a.vocab, c);
  });
}

}  // namespace

void sequence_logprobs_fwd(const SeqFwdArgs& args, int num_threads) {
  dispatch_dtype(args.dtype, [&](auto tag) { seq_fwd<decltype(tag)>(args, num_threads); });
}

void sequence_logprobs_bwd(const SeqBwdArgs& args, int num_threads) {
  dispatch_dtype(args.dtype, [&](auto tag) { seq_bwd<decltype(tag)>(args, num_threads); });
}

}  // namespace cpu
}  // namespace fastpo
