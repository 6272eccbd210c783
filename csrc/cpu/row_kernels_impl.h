// Body of the one-row CPU kernels. NO include guard on purpose: row_kernels.cpp
// includes it once per instruction set, each time inside a `#pragma GCC target`
// region and with FASTPO_ISA naming the namespace, so the same source is
// compiled for AVX-512, AVX2 and the portable baseline.
//
// Determinism: the summation order is fixed by the code (element j in lane
// j % kLanes, chunks of kChunk from the row start, fixed reduction trees) and
// never by pointer alignment or the batch, so a row's result is the same
// bitwise wherever it sits. No -ffast-math: the compiler may not reorder.
#ifndef FASTPO_ISA
#error "define FASTPO_ISA before including row_kernels_impl.h"
#endif

namespace fastpo {
namespace cpu {
namespace FASTPO_ISA {

constexpr int kChunk = 1024;  // a chunk's scaled values stay in L1 between the two sweeps

// Logits are scaled and compared in natural units (x = z / tau, d = x - m, so
// the rounding errors are those of PyTorch's log_softmax), and each exp(d) is
// evaluated as exp2(d log2 e) by exp2_fast below.
constexpr double kLog2e = 1.4426950408889634;

// exp2(d) in fp32 for d <= 0: d = k + r with |r| <= 1/2, a degree-5 minimax
// polynomial for 2^r (relative error 7.5e-8; ~2 ulp after fp32 rounding), times
// 2^k. Adding 1.5 * 2^23 + 127 rounds d to an integer and leaves k + 127 in the
// low mantissa bits, so shifting those bits left by 23 gives 2^k directly. The
// callers floor the natural exponent at -88 (d < -126.5): then k + 127 = 0 and
// the result is exactly 0.
static FASTPO_HD f32xL exp2_fast(f32xL d) {
  using B = BitCast<f32xL>;
  const f32xL shift = splat<f32xL>(12583039.0f);  // 1.5 * 2^23 + 127
  const f32xL shifted = d + shift;
  const f32xL r = d - (shifted - shift);
  f32xL p = splat<f32xL>(1.327647245e-03f);
  p = p * r + 9.675540961e-03f;
  p = p * r + 5.550713092e-02f;
  p = p * r + 2.402212024e-01f;
  p = p * r + 6.931469440e-01f;
  p = p * r + 1.000000119e+00f;
  return p * B::from(B::bits(shifted) << 23);
}

static FASTPO_HD f64xL exp2_fast(f64xL d) {
  for (int l = 0; l < kLanes; ++l) d[l] = std::exp2(d[l]);
  return d;
}

// d = x - m is floored so that -inf entries (masked vocabulary, the -inf
// padding) give exp(d) = 0 and exp(d) * d = 0 instead of 0 * inf = NaN: in fp32
// -88 log2(e) < -126.5, where exp2_fast returns exactly 0. Written so that a NaN
// d passes through (the comparison is false) and propagates.
template <typename V, typename acc_t>
static FASTPO_HD V floor_diff(V d) {
  acc_t floor = sizeof(acc_t) == 4 ? acc_t(-88) : acc_t(-1000);
#if defined(__x86_64__) && defined(__GNUC__)
  __asm__("" : "+x"(floor));  // an opaque value: GCC then emits one maxps, not compare + blend
#endif
  const V f = splat<V>(floor);
  return f > d ? f : d;
}

// Fixed reduction trees over the kLanes = 16 lanes: lane l meets lane l + w
// for w = 8, 4, 2, 1 (by shuffles; the upper lanes' results are unused).
template <typename V>
static FASTPO_HD V lanes_down(V v, int w) {
  switch (w) {
    case 8: return __builtin_shufflevector(v, v, 8, 9, 10, 11, 12, 13, 14, 15, 0, 1, 2, 3, 4, 5, 6, 7);
    case 4: return __builtin_shufflevector(v, v, 4, 5, 6, 7, 0, 1, 2, 3, 4, 5, 6, 7, 0, 1, 2, 3);
    case 2: return __builtin_shufflevector(v, v, 2, 3, 0, 1, 2, 3, 0, 1, 2, 3, 0, 1, 2, 3, 0, 1);
    default: return __builtin_shufflevector(v, v, 1, 0, 1, 0, 1, 0, 1, 0, 1, 0, 1, 0, 1, 0, 1, 0);
  }
}

template <typename acc_t, typename V>
static FASTPO_HD acc_t lanes_max(V v) {
  for (int w = 8; w > 0; w /= 2) {
    const V u = lanes_down(v, w);
    v = u > v ? u : v;
  }
  return v[0];
}

template <typename acc_t, typename V>
static FASTPO_HD acc_t lanes_sum(V v) {
  for (int w = 8; w > 0; w /= 2) v = v + lanes_down(v, w);
  return v[0];
}

// Single pass over memory: each chunk is read once, scaled into an L1 buffer
// while taking its max, then swept again from L1 for (s, t) relative to that
// max; the chunk's state is merged into the row's running state.
template <typename in_t>
SoftmaxState<acc_of<in_t>> row_stats(const in_t* row, int64_t vocab, acc_of<in_t> inv_tau) {
  using acc_t = acc_of<in_t>;
  using V = typename Simd<acc_t>::V;
  using I = typename Simd<acc_t>::I;
  using Io = PackIo<in_t>;
  using State = SoftmaxState<acc_t>;
  const acc_t neg_inf = -INFINITY;
  State state = State::empty();
  V x[kChunk / kLanes];
  for (int64_t c0 = 0; c0 < vocab; c0 += kChunk) {
    const int n = int(vocab - c0 < kChunk ? vocab - c0 : kChunk);
    const in_t* src = row + c0;
    V vmax = splat<V>(neg_inf);
    int groups = 0, j = 0;
    for (; j + kLanes <= n; j += kLanes) {
      const V v = Io::load(src + j) * inv_tau;
      x[groups++] = v;
      vmax = v > vmax ? v : vmax;
    }
    if (j < n) {  // ragged end: the missing lanes become -inf (exp2 -> 0)
      V v = Io::load_partial(src + j, n - j) * inv_tau;
      v = lane_index<I>() < (n - j) ? v : splat<V>(neg_inf);
      x[groups++] = v;
      vmax = v > vmax ? v : vmax;
    }
    // The max skips NaN (a comparison with NaN is false); a NaN then reaches s
    // through d = NaN - m below, except in a chunk whose other entries are all
    // -inf: that chunk is empty but for its NaN, which must not be dropped.
    const acc_t m = lanes_max<acc_t>(vmax);
    if (m == neg_inf) {  // every entry -inf or NaN (rare: checked element by element)
      for (int g = 0; g < groups; ++g)
        for (int l = 0; l < kLanes; ++l)
          if (x[g][l] != x[g][l]) state.s = state.t = acc_t(NAN);  // sticky through merge()
      continue;
    }
    // While this chunk is swept from L1, prefetch the next one (a cache line per
    // group) so that memory and arithmetic overlap.
    const char* next = reinterpret_cast<const char*>(src + n);
    const int64_t next_bytes = (vocab - c0 - n < kChunk ? vocab - c0 - n : kChunk) * int64_t(sizeof(in_t));
    V s = V{}, t = V{};
    for (int g = 0; g < groups; ++g) {
      if (int64_t(g) * 64 < next_bytes) __builtin_prefetch(next + g * 64);
      const V d = floor_diff<V, acc_t>(x[g] - m);
      const V e = exp2_fast(d * acc_t(kLog2e));
      s += e;
      t += e * d;
    }
    state = merge(state, State{m, lanes_sum<acc_t>(s), lanes_sum<acc_t>(t)});
  }
  return state;
}

// Per-row constants of the backward.
template <typename acc_t>
struct GradConsts {
  acc_t inv_tau, lse;
  acc_t g_lp;  // g_lp / tau
  acc_t g_H;   // g_H / tau
  acc_t H;     // the row's entropy
};

// grad for one pack: -(g_lp/tau) p - (g_H/tau) p (log p + H), plus g_lp/tau on the label.
template <typename V, typename acc_t, bool kHasEntropyGrad, bool kIsLabel>
static FASTPO_HD V grad_pack(V z, const GradConsts<acc_t>& k) {
  const V lp = floor_diff<V, acc_t>(z * k.inv_tau - k.lse);  // log p (one FMA where available)
  const V p = exp2_fast(lp * acc_t(kLog2e));
  V g = kIsLabel ? k.g_lp * (acc_t(1) - p) : -k.g_lp * p;
  if (kHasEntropyGrad) g -= k.g_H * (p * (lp + k.H));
  return g;
}

#ifdef FASTPO_STREAM_BYTES
// One non-temporal store of kW bytes (dst aligned to kW).
template <int kW>
inline void stream_chunk(char* dst, const char* src) {
  if constexpr (kW == 64) {
    __m512i x;
    std::memcpy(&x, src, 64);
    _mm512_stream_si512(reinterpret_cast<__m512i*>(dst), x);
  } else if constexpr (kW == 32) {
    __m256i x;
    std::memcpy(&x, src, 32);
    _mm256_stream_si256(reinterpret_cast<__m256i*>(dst), x);
  } else {
    __m128i x;
    std::memcpy(&x, src, 16);
    _mm_stream_si128(reinterpret_cast<__m128i*>(dst), x);
  }
}

// grad[0:j) with non-temporal stores after an aligning head; returns j.
template <typename in_t, bool kHasEntropyGrad>
static int64_t grad_loop_stream(const in_t* row, in_t* grad, int64_t vocab, const GradConsts<acc_of<in_t>>& k) {
  using V = typename Simd<acc_of<in_t>>::V;
  using Io = PackIo<in_t>;
  using Raw = typename Io::Raw;
  constexpr int kW = int(sizeof(Raw)) < FASTPO_STREAM_BYTES ? int(sizeof(Raw)) : FASTPO_STREAM_BYTES;
  const uintptr_t addr = reinterpret_cast<uintptr_t>(grad);
  if (addr % sizeof(in_t) != 0) return 0;
  int64_t j = int64_t((kW - addr % kW) % kW / sizeof(in_t));
  if (j >= vocab) return 0;
  if (j > 0) Io::store_partial(grad, grad_pack<V, acc_of<in_t>, kHasEntropyGrad, false>(Io::load_partial(row, int(j)), k), int(j));
  for (; j + kLanes <= vocab; j += kLanes) {
    const Raw r = Io::encode(grad_pack<V, acc_of<in_t>, kHasEntropyGrad, false>(Io::load(row + j), k));
    for (int o = 0; o < int(sizeof(Raw)); o += kW)
      stream_chunk<kW>(reinterpret_cast<char*>(grad + j) + o, reinterpret_cast<const char*>(&r) + o);
  }
  _mm_sfence();  // the streamed lines are visible before the ordinary stores that follow
  return j;
}
#endif

// One read, one write. Each pack is loaded before it is stored, so grad == row
// (in place) is safe; the label's logit is read first and its gradient written last.
template <typename in_t, bool kHasEntropyGrad>
static void grad_loop(const in_t* row, in_t* grad, int64_t vocab, const RowGrad<acc_of<in_t>>& c) {
  using acc_t = acc_of<in_t>;
  using V = typename Simd<acc_t>::V;
  using Io = PackIo<in_t>;
  const GradConsts<acc_t> k{c.inv_tau, c.lse, c.g_lp * c.inv_tau, c.g_H * c.inv_tau, c.entropy};
  const V z_label = splat<V>(load_acc<acc_t>(row[c.label]));
  int64_t j = 0;
#ifdef FASTPO_STREAM_BYTES
  if (c.stream && static_cast<const void*>(row) != static_cast<const void*>(grad))
    j = grad_loop_stream<in_t, kHasEntropyGrad>(row, grad, vocab, k);
#endif
  for (; j + kLanes <= vocab; j += kLanes)
    Io::store(grad + j, grad_pack<V, acc_t, kHasEntropyGrad, false>(Io::load(row + j), k));
  if (j < vocab) {
    const int n = int(vocab - j);
    Io::store_partial(grad + j, grad_pack<V, acc_t, kHasEntropyGrad, false>(Io::load_partial(row + j, n), k), n);
  }
  Io::store_partial(grad + c.label, grad_pack<V, acc_t, kHasEntropyGrad, true>(z_label, k), 1);
}

template <typename in_t>
void row_grad(const in_t* row, in_t* grad, int64_t vocab, const RowGrad<acc_of<in_t>>& c) {
  if (c.has_entropy_grad)
    grad_loop<in_t, true>(row, grad, vocab, c);
  else
    grad_loop<in_t, false>(row, grad, vocab, c);
}

template <typename in_t>
RowKernels<in_t> table() {
  return RowKernels<in_t>{&row_stats<in_t>, &row_grad<in_t>};
}

}  // namespace FASTPO_ISA
}  // namespace cpu
}  // namespace fastpo
