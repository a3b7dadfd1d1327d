// grpo_loss.cu: the vocabulary-wide work of token log-probs, entropy and their gradient over one
// chunk of logits, the part of the fused GRPO loss that is not a GEMM (ops.py runs the GEMMs through
// cuBLAS and calls these through bindings.cpp).
//
//   forward   one pass per row: online softmax (running max m, s = sum e^(x-m), a = sum e^(x-m)(x-m),
//             as in Milakov & Gimelshein 2018, "Online normalizer calculation for softmax"), then
//             lse = m + log s, entropy = log s - a / s, logp = x[target] - lse.
//   backward  d logits written in place over the same buffer, ready for the two GEMMs of d hidden and
//             d weight: dz = -p (g + e (log p + H)) / T; the target's one-hot g / T is added by the
//             caller in fp32 (it is the largest term of a row, and bf16 would round it).
//
// One block per row, 16-byte vector loads, fp32 math. Only CUDA runtime headers and ours: CI compiles
// this file with nvcc and no torch (DESIGN.md, Kernels).
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <math.h>
#include <stdint.h>

#include "grpo_loss.h"

namespace {

constexpr int kThreads = 512;
constexpr int kUnroll = 4;  // 16-byte loads in flight per thread

__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }
template <typename T> __device__ __forceinline__ T from_float(float x);
template <> __device__ __forceinline__ float from_float<float>(float x) { return x; }
template <> __device__ __forceinline__ __half from_float<__half>(float x) { return __float2half_rn(x); }
template <> __device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) {
  return __float2bfloat16_rn(x);
}

// Splits a row into a scalar head (up to the first 16-byte boundary), 16-byte vectors, scalar tail:
// rows of an odd vocabulary (32003) start anywhere.
template <typename T>
struct RowSplit {
  static constexpr int kVec = 16 / sizeof(T);
  int64_t head, nvec;
  __device__ RowSplit(const T* row, int64_t V) {
    head = (int64_t)((16 - (reinterpret_cast<uintptr_t>(row) & 15)) & 15) / (int64_t)sizeof(T);
    head = head < V ? head : V;
    nvec = (V - head) / kVec;
  }
};

// Online softmax statistics of the values one thread (then one block) has seen.
struct Stats {
  float m = -INFINITY, s = 0.f, a = 0.f;  // max, sum e^(x-m), sum e^(x-m) (x-m)

  __device__ __forceinline__ void rescale(float m_new) {  // m_new >= m
    if (s > 0.f) {
      const float d = m - m_new, c = __expf(d);
      a = (a + s * d) * c;
      s *= c;
    }
    m = m_new;
  }
  template <int N>
  __device__ __forceinline__ void add(const float (&x)[N]) {
    float mx = x[0];
#pragma unroll
    for (int k = 1; k < N; ++k) mx = fmaxf(mx, x[k]);
    if (mx > m) rescale(mx);
#pragma unroll
    for (int k = 0; k < N; ++k) {
      const float t = x[k] - m, e = __expf(t);
      s += e;
      a += e * t;
    }
  }
  __device__ __forceinline__ void merge(float om, float os, float oa) {
    if (os == 0.f) return;
    if (s == 0.f) { m = om; s = os; a = oa; return; }
    const float M = fmaxf(m, om), d1 = m - M, d2 = om - M, c1 = __expf(d1), c2 = __expf(d2);
    a = (a + s * d1) * c1 + (oa + os * d2) * c2;
    s = s * c1 + os * c2;
    m = M;
  }
};

template <typename T>
__device__ __forceinline__ void unpack(const uint4& raw, float inv_T, float (&x)[16 / sizeof(T)]) {
  const T* e = reinterpret_cast<const T*>(&raw);
#pragma unroll
  for (int k = 0; k < 16 / (int)sizeof(T); ++k) x[k] = to_float(e[k]) * inv_T;
}

template <typename T>
__global__ void __launch_bounds__(kThreads) logprob_forward_kernel(
    const T* __restrict__ logits, int64_t V, const int64_t* __restrict__ targets, float inv_T,
    float* __restrict__ logp, float* __restrict__ entropy, float* __restrict__ lse) {
  constexpr int kVec = 16 / sizeof(T);
  const int64_t r = blockIdx.x;
  const T* row = logits + r * V;
  const RowSplit<T> sp(row, V);
  const uint4* vec = reinterpret_cast<const uint4*>(row + sp.head);
  Stats st;
  for (int64_t i = threadIdx.x; i < sp.head; i += kThreads) st.add<1>({to_float(row[i]) * inv_T});
  for (int64_t i = threadIdx.x; i < sp.nvec; i += kUnroll * kThreads) {
    uint4 raw[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int64_t j = i + u * kThreads;
      if (j < sp.nvec) raw[u] = __ldcs(vec + j);  // streamed: each logit is read once
    }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      if (i + u * kThreads < sp.nvec) {
        float x[kVec];
        unpack<T>(raw[u], inv_T, x);
        st.add(x);
      }
    }
  }
  for (int64_t i = sp.head + sp.nvec * kVec + threadIdx.x; i < V; i += kThreads)
    st.add<1>({to_float(row[i]) * inv_T});

  // block reduction: warps by shuffles, then the first warp over the warps' results
  __shared__ float sm[3][kThreads / 32];
#pragma unroll
  for (int off = 16; off > 0; off >>= 1)
    st.merge(__shfl_xor_sync(0xffffffffu, st.m, off), __shfl_xor_sync(0xffffffffu, st.s, off),
             __shfl_xor_sync(0xffffffffu, st.a, off));
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  if (lane == 0) { sm[0][warp] = st.m; sm[1][warp] = st.s; sm[2][warp] = st.a; }
  __syncthreads();
  if (warp != 0) return;
  st = Stats();
  if (lane < kThreads / 32) st.merge(sm[0][lane], sm[1][lane], sm[2][lane]);
#pragma unroll
  for (int off = 16; off > 0; off >>= 1)
    st.merge(__shfl_xor_sync(0xffffffffu, st.m, off), __shfl_xor_sync(0xffffffffu, st.s, off),
             __shfl_xor_sync(0xffffffffu, st.a, off));
  if (lane == 0) {
    const float log_s = logf(st.s), l = st.m + log_s;
    const int64_t t = targets[r];
    // logp <= 0 and entropy >= 0 hold exactly in the math; clamp away the last-bit rounding
    logp[r] = (t >= 0 && t < V) ? fminf(to_float(row[t]) * inv_T - l, 0.f) : NAN;
    entropy[r] = fmaxf(log_s - st.a / st.s, 0.f);
    lse[r] = l;
  }
}

template <typename T>
__device__ __forceinline__ T dlogit(T z, float inv_T, float l, float H, float g, float e) {
  const float lp = to_float(z) * inv_T - l;
  return from_float<T>(-__expf(lp) * (g + e * (lp + H)) * inv_T);
}

template <typename T>
__global__ void __launch_bounds__(kThreads) logprob_backward_kernel(
    T* __restrict__ logits, int64_t V, const float* __restrict__ lse, const float* __restrict__ entropy,
    const float* __restrict__ d_logp, const float* __restrict__ d_ent, float inv_T) {
  constexpr int kVec = 16 / sizeof(T);
  const int64_t r = blockIdx.x;
  T* row = logits + r * V;
  const float l = lse[r], H = entropy[r], g = d_logp[r], e = d_ent[r];
  const RowSplit<T> sp(row, V);
  uint4* vec = reinterpret_cast<uint4*>(row + sp.head);
  for (int64_t i = threadIdx.x; i < sp.head; i += kThreads) row[i] = dlogit(row[i], inv_T, l, H, g, e);
  for (int64_t i = threadIdx.x; i < sp.nvec; i += kUnroll * kThreads) {
    uint4 raw[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u)
      if (i + u * kThreads < sp.nvec) raw[u] = vec[i + u * kThreads];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      if (i + u * kThreads < sp.nvec) {
        T* z = reinterpret_cast<T*>(&raw[u]);
#pragma unroll
        for (int k = 0; k < kVec; ++k) z[k] = dlogit(z[k], inv_T, l, H, g, e);
        vec[i + u * kThreads] = raw[u];
      }
    }
  }
  for (int64_t i = sp.head + sp.nvec * kVec + threadIdx.x; i < V; i += kThreads)
    row[i] = dlogit(row[i], inv_T, l, H, g, e);
}

const char* last_error() {
  const cudaError_t err = cudaGetLastError();
  return err == cudaSuccess ? nullptr : cudaGetErrorString(err);
}

}  // namespace

const char* launch_logprob_forward(const void* logits, int dtype, int64_t rows, int64_t V,
                                   const int64_t* targets, float inv_temperature,
                                   float* logp, float* entropy, float* lse, void* stream) {
  if (rows == 0) return nullptr;
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  const dim3 grid((unsigned)rows);
  if (dtype == kGrpoBFloat16)
    logprob_forward_kernel<__nv_bfloat16><<<grid, kThreads, 0, s>>>(
        static_cast<const __nv_bfloat16*>(logits), V, targets, inv_temperature, logp, entropy, lse);
  else if (dtype == kGrpoFloat16)
    logprob_forward_kernel<__half><<<grid, kThreads, 0, s>>>(
        static_cast<const __half*>(logits), V, targets, inv_temperature, logp, entropy, lse);
  else if (dtype == kGrpoFloat32)
    logprob_forward_kernel<float><<<grid, kThreads, 0, s>>>(
        static_cast<const float*>(logits), V, targets, inv_temperature, logp, entropy, lse);
  else
    return "grpo_loss: unsupported logits dtype";
  return last_error();
}

const char* launch_logprob_backward(void* logits, int dtype, int64_t rows, int64_t V,
                                    const float* lse, const float* entropy, const float* d_logp,
                                    const float* d_ent, float inv_temperature, void* stream) {
  if (rows == 0) return nullptr;
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  const dim3 grid((unsigned)rows);
  if (dtype == kGrpoBFloat16)
    logprob_backward_kernel<__nv_bfloat16><<<grid, kThreads, 0, s>>>(
        static_cast<__nv_bfloat16*>(logits), V, lse, entropy, d_logp, d_ent, inv_temperature);
  else if (dtype == kGrpoFloat16)
    logprob_backward_kernel<__half><<<grid, kThreads, 0, s>>>(
        static_cast<__half*>(logits), V, lse, entropy, d_logp, d_ent, inv_temperature);
  else if (dtype == kGrpoFloat32)
    logprob_backward_kernel<float><<<grid, kThreads, 0, s>>>(
        static_cast<float*>(logits), V, lse, entropy, d_logp, d_ent, inv_temperature);
  else
    return "grpo_loss: unsupported logits dtype";
  return last_error();
}
