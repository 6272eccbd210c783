// Device building blocks shared by the CUDA ops: one thread block owns one row
// of V logits. Each thread folds its share of the row into an online softmax
// state (m, s, t) (common.h), the states are merged across the warp by
// shuffles and across warps through shared memory with the same merge(), and
// the backward streams the row once more, reading and writing each element in
// the same thread (so the gradient may overwrite the logits).
//
// Loads are 16 bytes wide when the row start, the row stride and V allow it
// (kVec), else one element at a time. Each thread owns a fixed set of
// elements that depends only on V and the block size, and the block size only
// on V and the dtype: a row's result never depends on the batch.
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

constexpr int kUnroll = 4;  // packs in flight per thread

// Fold kN elements into the thread's state: rescale once to the new max, then
// accumulate s += e, t += e d with d = x - m.
template <int kN, typename T, typename acc_t>
__device__ __forceinline__ void absorb(SoftmaxState<acc_t>& st, const T* v, acc_t inv_tau) {
  acc_t x[kN];
  acc_t vmax = acc_t(-INFINITY);
#pragma unroll
  for (int k = 0; k < kN; ++k) {
    x[k] = to_acc(v[k]) * inv_tau;
    vmax = fmax(vmax, x[k]);  // ignores NaN; a NaN still reaches s through d
  }
  if (vmax > st.m) st.rescale(vmax);
  if (st.m == acc_t(-INFINITY)) return;  // only -inf so far
#pragma unroll
  for (int k = 0; k < kN; ++k) {
    const acc_t d = floor_diff(x[k] - st.m);
    const acc_t e = fast_exp(d);
    st.s += e;
    st.t += e * d;
  }
}

// This thread's state over its elements of row[0:vocab].
template <typename T, bool kVec>
__device__ SoftmaxState<acc_of<T>> thread_row_state(const T* __restrict__ row, int64_t vocab, acc_of<T> inv_tau) {
  SoftmaxState<acc_of<T>> st = SoftmaxState<acc_of<T>>::empty();
  if (kVec) {
    constexpr int kN = Pack<T>::kN;
    const Pack<T>* __restrict__ packs = reinterpret_cast<const Pack<T>*>(row);
    const int64_t n_packs = vocab / kN;
    for (int64_t i = threadIdx.x; i < n_packs; i += int64_t(kUnroll) * blockDim.x) {
      Pack<T> p[kUnroll];
#pragma unroll
      for (int u = 0; u < kUnroll; ++u)
        if (i + u * blockDim.x < n_packs) p[u] = packs[i + u * blockDim.x];
#pragma unroll
      for (int u = 0; u < kUnroll; ++u)
        if (i + u * blockDim.x < n_packs) absorb<kN>(st, p[u].v, inv_tau);
    }
  } else {
    for (int64_t j = threadIdx.x; j < vocab; j += blockDim.x) absorb<1>(st, row + j, inv_tau);
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
template <typename T, bool kVec, bool kHasEntropyGrad>
__device__ void row_grad(const T* row, T* grad, int64_t vocab, const RowGrad<acc_of<T>>& c) {
  if (kVec) {
    constexpr int kN = Pack<T>::kN;
    const Pack<T>* src = reinterpret_cast<const Pack<T>*>(row);
    Pack<T>* dst = reinterpret_cast<Pack<T>*>(grad);
    const int64_t n_packs = vocab / kN;
    for (int64_t i = threadIdx.x; i < n_packs; i += int64_t(kUnroll) * blockDim.x) {
      Pack<T> p[kUnroll];
#pragma unroll
      for (int u = 0; u < kUnroll; ++u)
        if (i + u * blockDim.x < n_packs) p[u] = src[i + u * blockDim.x];
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        const int64_t idx = i + u * blockDim.x;
        if (idx < n_packs) {
          const int64_t label_k = c.label - idx * kN;  // the label's slot in this pack, if any
#pragma unroll
          for (int k = 0; k < kN; ++k)
            p[u].v[k] = from_acc<T>(grad_elem<kHasEntropyGrad>(to_acc(p[u].v[k]), label_k == k, c));
          dst[idx] = p[u];
        }
      }
    }
  } else {
    for (int64_t j = threadIdx.x; j < vocab; j += blockDim.x)
      grad[j] = from_acc<T>(grad_elem<kHasEntropyGrad>(to_acc(row[j]), j == c.label, c));
  }
}

template <typename T>
__device__ __forceinline__ void zero_row(T* grad, int64_t vocab) {
  for (int64_t j = threadIdx.x; j < vocab; j += blockDim.x) grad[j] = from_acc<T>(acc_of<T>(0));
}

// ------------------------------------------------------------------- host side
// Threads per row: about 16 packs per thread, 64..1024, from V and the dtype only.
inline int threads_for(int64_t vocab, int elem_size) {
  const int64_t packs = (vocab * elem_size + 15) / 16;
  int threads = 64;
  while (threads < 1024 && threads * 16 < packs) threads *= 2;
  return threads;
}

inline bool aligned16(const void* ptr, int64_t row_stride, int64_t vocab, int elem_size) {
  return reinterpret_cast<uintptr_t>(ptr) % 16 == 0 && (row_stride * elem_size) % 16 == 0 &&
         (vocab * elem_size) % 16 == 0;
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
