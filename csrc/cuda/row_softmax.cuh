// Device building blocks shared by the CUDA ops: one thread block owns one row
// of V logits. Each thread folds its share of the row into an online softmax
// state (m, s, t) (common.h), the states are merged across the warp by
// shuffles and across warps through shared memory with the same merge(), and
// the backward streams the row once more, reading and writing each element in
// the same thread (so the gradient may overwrite the logits).
//
// Loads are 16 bytes wide for any V and any base: a row is split into a head
// (the < 16 / sizeof(T) elements before its first 16-byte boundary), a body of
// 16-byte packs and a tail (< one pack), and only the head and tail are read one
// element at a time (odd vocabularies such as 50257 or 32001, whose rows start
// at every alignment in turn, and misaligned views).
//
// Batch invariance, precisely: which elements a thread folds, and in which
// order, depends only on V, the block size (a function of V and the dtype) and
// the row's base address modulo 16 bytes. A row therefore gives bitwise the same
// result whatever the batch size, the other rows, the chunking and the run, as
// long as its start has the same alignment modulo 16 bytes. Two views of the
// same row whose starts differ in alignment (e.g. the same sequence at an even
// and at an odd row of a [N, 50257] bf16 tensor) may differ in the last bits of
// lse / entropy (fp32 rounding of a different summation order), never more.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <stdexcept>
#include <string>

#include "../common.h"

namespace fastpo {
namespace cuda {

template <typename T> struct AccOf { using type = float; };
template <> struct AccOf<double> { using type = double; };
template <typename T> using acc_of = typename AccOf<T>::type;

__device__ __forceinline__ float to_acc(float v) { return v; }
__device__ __forceinline__ double to_acc(double v) { return v; }
__device__ __forceinline__ float to_acc(__nv_bfloat16 v) { return __bfloat162float(v); }
__device__ __forceinline__ float to_acc(__half v) { return __half2float(v); }

template <typename T> __device__ __forceinline__ T from_acc(acc_of<T> v);
template <> __device__ __forceinline__ float from_acc<float>(float v) { return v; }
template <> __device__ __forceinline__ double from_acc<double>(double v) { return v; }
template <> __device__ __forceinline__ __nv_bfloat16 from_acc<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }
template <> __device__ __forceinline__ __half from_acc<__half>(float v) { return __float2half_rn(v); }

// Per-element exp: the ex2.approx based intrinsic in fp32 (~2 ulp near 0,
// where the terms that matter are), the libdevice exp in fp64.
__device__ __forceinline__ float fast_exp(float x) { return __expf(x); }
__device__ __forceinline__ double fast_exp(double x) { return exp(x); }

// x - m floored so that -inf logits (a masked vocabulary) give exp = 0 and
// exp * d = 0 rather than 0 * inf = NaN. A NaN passes through (and propagates).
template <typename acc_t>
__device__ __forceinline__ acc_t floor_diff(acc_t d) {
  return d < acc_t(-1e30) ? acc_t(-1e30) : d;
}

// 16 bytes of T, loaded and stored as one vector access.
template <typename T>
struct alignas(16) Pack {
  static constexpr int kN = 16 / sizeof(T);
  T v[kN];
};

// Packs in flight per thread (loop unroll): 4 for the read-only kernels, 2 for
// the fused policy kernel, which keeps more values live (issue 8, defect 9)
// (fp64: 2 and 1 — its packs are only 2 elements but its state takes twice the registers.)
template <typename T> constexpr int kUnrollRead = sizeof(T) == 8 ? 2 : 4;
template <typename T> constexpr int kUnrollPolicy = sizeof(T) == 8 ? 1 : 2;

// Fold kN elements into the thread's state: rescale once to the new max, then
// accumulate s += e, t += e d with d = x - m. The max ignores NaN (fmax); a NaN
// still reaches s through d = NaN - m, except while the state's max is -inf
// (everything seen so far -inf): then it is recorded in s directly, where it
// stays through every later rescale and merge (issue 8, defect 2).
template <int kN, typename T, typename acc_t>
__device__ __forceinline__ void absorb(SoftmaxState<acc_t>& st, const T* v, acc_t inv_tau) {
  acc_t x[kN];
  acc_t vmax = acc_t(-INFINITY);
#pragma unroll
  for (int k = 0; k < kN; ++k) {
    x[k] = to_acc(v[k]) * inv_tau;
    vmax = fmax(vmax, x[k]);
  }
  if (vmax > st.m) st.rescale(vmax);
  if (st.m == acc_t(-INFINITY)) {  // only -inf (and NaN) so far: rare
    bool nan = false;
#pragma unroll
    for (int k = 0; k < kN; ++k) nan |= x[k] != x[k];
    if (nan) st.s = st.t = acc_t(NAN);
    return;
  }
#pragma unroll
  for (int k = 0; k < kN; ++k) {
    const acc_t d = floor_diff(x[k] - st.m);
    const acc_t e = fast_exp(d);
    st.s += e;
    st.t += e * d;
  }
}

// A row's split: `head` elements before its first 16-byte boundary (fewer if V
// is smaller), then `n_packs` whole packs, then `vocab - head - n_packs kN` tail
// elements (< kN). Needs an element-aligned base (every torch tensor has one).
struct RowSplit {
  int64_t head, n_packs, body_end;
};

template <typename T>
__device__ __forceinline__ RowSplit split_row(const T* row, int64_t vocab) {
  constexpr int kN = Pack<T>::kN;
  const int mis = int(reinterpret_cast<uintptr_t>(row) % 16) / int(sizeof(T));
  const int64_t head = mis == 0 ? 0 : (kN - mis < vocab ? kN - mis : vocab);
  const int64_t n_packs = (vocab - head) / kN;
  return {head, n_packs, head + n_packs * kN};
}

// This thread's state over its elements of row[0:vocab]: head and tail element
// threadIdx.x (if any), then its packs of the body, kUnroll loads in flight.
template <typename T, int kUnroll>
__device__ SoftmaxState<acc_of<T>> thread_row_state(const T* __restrict__ row, int64_t vocab, acc_of<T> inv_tau) {
  constexpr int kN = Pack<T>::kN;
  SoftmaxState<acc_of<T>> st = SoftmaxState<acc_of<T>>::empty();
  const RowSplit sp = split_row(row, vocab);
  if (threadIdx.x < sp.head) absorb<1>(st, row + threadIdx.x, inv_tau);
  if (threadIdx.x < vocab - sp.body_end) absorb<1>(st, row + sp.body_end + threadIdx.x, inv_tau);
  const Pack<T>* __restrict__ packs = reinterpret_cast<const Pack<T>*>(row + sp.head);
  for (int64_t i = threadIdx.x; i < sp.n_packs; i += int64_t(kUnroll) * blockDim.x) {
    Pack<T> p[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u)
      if (i + u * blockDim.x < sp.n_packs) p[u] = packs[i + u * blockDim.x];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u)
      if (i + u * blockDim.x < sp.n_packs) absorb<kN>(st, p[u].v, inv_tau);
  }
  return st;
}

template <typename acc_t>
__device__ __forceinline__ SoftmaxState<acc_t> warp_merge(SoftmaxState<acc_t> st) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) {
    const SoftmaxState<acc_t> other{__shfl_xor_sync(0xffffffffu, st.m, offset),
                                    __shfl_xor_sync(0xffffffffu, st.s, offset),
                                    __shfl_xor_sync(0xffffffffu, st.t, offset)};
    st = merge(st, other);  // symmetric: every lane ends with the same bits
  }
  return st;
}

// The row's state, in every thread. blockDim.x must be a multiple of 32.
template <typename acc_t>
__device__ SoftmaxState<acc_t> block_merge(SoftmaxState<acc_t> st) {
  __shared__ acc_t shared[3][32];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, n_warps = blockDim.x >> 5;
  st = warp_merge(st);
  if (lane == 0) {
    shared[0][warp] = st.m;
    shared[1][warp] = st.s;
    shared[2][warp] = st.t;
  }
  __syncthreads();
  if (warp == 0) {
    st = lane < n_warps ? SoftmaxState<acc_t>{shared[0][lane], shared[1][lane], shared[2][lane]}
                        : SoftmaxState<acc_t>::empty();
    st = warp_merge(st);
    if (lane == 0) {
      shared[0][0] = st.m;
      shared[1][0] = st.s;
      shared[2][0] = st.t;
    }
  }
  __syncthreads();
  return SoftmaxState<acc_t>{shared[0][0], shared[1][0], shared[2][0]};
}

// Per-row coefficients of the backward, already divided by tau:
//   grad_j = g_lp (1[j = y] - p_j) - g_H p_j (log p_j + H),  p_j = exp(x_j - lse).
template <typename acc_t>
struct RowGrad {
  acc_t inv_tau, lse, entropy, g_lp, g_H;
  int64_t label;
};

template <bool kHasEntropyGrad, typename acc_t>
__device__ __forceinline__ acc_t grad_elem(acc_t z, bool is_label, const RowGrad<acc_t>& c) {
  const acc_t d = floor_diff(z * c.inv_tau - c.lse);  // log p
  const acc_t p = fast_exp(d);
  acc_t g = is_label ? c.g_lp * (acc_t(1) - p) : -c.g_lp * p;
  if (kHasEntropyGrad) g -= c.g_H * (p * (d + c.entropy));
  return g;
}

// One read and one write of the row; row and grad may be the same memory (no
// __restrict__, plain loads): each element is read, then written, by one thread.
// 16-byte loads and stores when row and grad share their alignment modulo 16
// (always for contiguous or in-place gradients); else one element at a time
// (an out-of-place gradient of a strided view with odd V: correct, slower).
template <typename T, int kUnroll, bool kHasEntropyGrad>
__device__ void row_grad(const T* row, T* grad, int64_t vocab, const RowGrad<acc_of<T>>& c) {
  constexpr int kN = Pack<T>::kN;
  if (reinterpret_cast<uintptr_t>(row) % 16 != reinterpret_cast<uintptr_t>(grad) % 16) {
    for (int64_t j = threadIdx.x; j < vocab; j += blockDim.x)
      grad[j] = from_acc<T>(grad_elem<kHasEntropyGrad>(to_acc(row[j]), j == c.label, c));
    return;
  }
  const RowSplit sp = split_row(row, vocab);
  if (threadIdx.x < sp.head) {
    const int64_t j = threadIdx.x;
    grad[j] = from_acc<T>(grad_elem<kHasEntropyGrad>(to_acc(row[j]), j == c.label, c));
  }
  if (threadIdx.x < vocab - sp.body_end) {
    const int64_t j = sp.body_end + threadIdx.x;
    grad[j] = from_acc<T>(grad_elem<kHasEntropyGrad>(to_acc(row[j]), j == c.label, c));
  }
  const Pack<T>* src = reinterpret_cast<const Pack<T>*>(row + sp.head);
  Pack<T>* dst = reinterpret_cast<Pack<T>*>(grad + sp.head);
  const int64_t label = c.label - sp.head;  // in body coordinates
  for (int64_t i = threadIdx.x; i < sp.n_packs; i += int64_t(kUnroll) * blockDim.x) {
    Pack<T> p[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u)
      if (i + u * blockDim.x < sp.n_packs) p[u] = src[i + u * blockDim.x];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int64_t idx = i + u * blockDim.x;
      if (idx < sp.n_packs) {
        const int64_t label_k = label - idx * kN;  // the label's slot in this pack, if any
#pragma unroll
        for (int k = 0; k < kN; ++k)
          p[u].v[k] = from_acc<T>(grad_elem<kHasEntropyGrad>(to_acc(p[u].v[k]), label_k == k, c));
        dst[idx] = p[u];
      }
    }
  }
}

template <typename T>
__device__ __forceinline__ void fill_row(T* grad, int64_t vocab, acc_of<T> value) {
  const T v = from_acc<T>(value);
  for (int64_t j = threadIdx.x; j < vocab; j += blockDim.x) grad[j] = v;
}

// Ignored rows: an exactly zero gradient.
template <typename T>
__device__ __forceinline__ void zero_row(T* grad, int64_t vocab) { fill_row(grad, vocab, acc_of<T>(0)); }

// Rows whose label is outside [0, V) (never read): a NaN gradient.
template <typename T>
__device__ __forceinline__ void nan_row(T* grad, int64_t vocab) { fill_row(grad, vocab, acc_of<T>(NAN)); }

// ------------------------------------------------------------------- host side
// Threads per row: about 16 packs per thread, 64..512, from V and the dtype only.
// At most 512 so that two blocks fit on an SM (kernels declare
// __launch_bounds__(kMaxThreads, 2), i.e. <= 64 registers): one block's row start
// and reduction tail overlap the other's streaming (issue 8, defect 9).
constexpr int kMaxThreads = 512;
constexpr int kMinBlocks = 2;

inline int threads_for(int64_t vocab, int elem_size) {
  const int64_t packs = (vocab * elem_size + 15) / 16;
  int threads = 64;
  while (threads < kMaxThreads && threads * 16 < packs) threads *= 2;
  return threads;
}

// Every torch tensor is element-aligned; the kernels' head/body/tail split relies on it.
inline void check_element_aligned(const void* ptr, int64_t elem_size, const char* what) {
  if (reinterpret_cast<uintptr_t>(ptr) % uintptr_t(elem_size) != 0)
    throw std::invalid_argument(std::string("fastpo ") + what + ": tensor not aligned to its element size");
}

inline void check_launch(const char* what) {
  const cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) throw std::runtime_error(std::string("fastpo ") + what + ": " + cudaGetErrorString(err));
}

inline unsigned grid_for(int64_t rows) {
  if (rows >= (int64_t(1) << 31)) throw std::invalid_argument("fastpo: too many rows for one launch (>= 2^31)");
  return unsigned(rows);
}

// Calls f(T{}) with the CUDA storage type of a dtype code.
template <typename F>
void dispatch_dtype(int dtype, F&& f) {
  switch (dtype) {
    case kFloat32: f(float{}); break;
    case kBFloat16: f(__nv_bfloat16{}); break;
    case kFloat16: f(__half{}); break;
    case kFloat64: f(double{}); break;
    default: throw std::invalid_argument("fastpo: unknown dtype code " + std::to_string(dtype));
  }
}

}  // namespace cuda
}  // namespace fastpo
