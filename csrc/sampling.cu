// Fused sampling from logits: temperature, top-k, top-p and the draw in one kernel, one CTA per row,
// with the log-prob of the drawn token under softmax(logits / T) before any filtering (what the
// trainer recomputes).
//
// Randomness is counter-based: the uniform of token i at step n of a request with seed s is a hash of
// (s, n, i), so a draw never depends on which other rows share the batch, or on thread scheduling. The
// draw is the Gumbel-max trick: argmax_i x_i - log(-log u_i) samples softmax(x) exactly (Gumbel 1954;
// the same "exponential race" vLLM and FlashInfer use), and needs no normalisation and no sort.
//
// Top-k / top-p without sorting the vocabulary: both are thresholds on the logit, found by a radix
// select (4 passes of a 256-bin histogram over the order-preserving bits of x): the k-th largest x
// for top-k; for top-p the largest x whose kept mass (x' >= x) reaches p of the top-k-kept mass.
// Ties at a threshold are all kept. With neither filter (the usual RL setting) the kernel makes one
// pass over the row: online max / sum-of-exp (Milakov & Gimelshein 2018) fused with the Gumbel argmax.
//
// The pure-PyTorch twin (same hash, same thresholds) is sampler.sample_ref.
#include <cuda_runtime.h>
#include <cuda_fp16.h>
#include <cuda_bf16.h>
#include <stdint.h>

#include "sampler_kernels.h"

namespace {

constexpr int kThreads = 1024;
constexpr unsigned kFull = 0xffffffffu;

__device__ __forceinline__ float neg_inf() { return __int_as_float(0xff800000); }
__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }

// lowbias32 (C. Wellons, "Prospecting for hash functions", 2018): a cheap full-avalanche 32-bit mix.
__device__ __forceinline__ uint32_t hash32(uint32_t x) {
  x ^= x >> 16; x *= 0x7feb352du; x ^= x >> 15; x *= 0x846ca68bu; x ^= x >> 16;
  return x;
}
__device__ __forceinline__ uint32_t stream_key(int64_t seed, int64_t step) {
  return hash32(hash32(hash32((uint32_t)seed) ^ (uint32_t)((uint64_t)seed >> 32)) ^ (uint32_t)step);
}
// Gumbel noise of token i: u in (0, 1) from 23 hash bits, exact in fp32 (the reference computes the same)
__device__ __forceinline__ float gumbel(uint32_t key, int i) {
  const uint32_t r = hash32(key ^ hash32((uint32_t)i));
  const float u = ((float)(r >> 9) + 0.5f) * (1.0f / 8388608.0f);
  return -logf(-logf(u));
}
// float -> uint32 with the same order (negative floats flip all bits, positive ones the sign bit)
__device__ __forceinline__ uint32_t order_key(float x) {
  const uint32_t u = __float_as_uint(x);
  return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

struct MaxSum { float m, s; };  // running max and sum of exp(x - m)
struct ArgMax { float v; int i; };

struct CombineMaxSum {
  __device__ MaxSum operator()(MaxSum a, MaxSum b) const {
    const float M = fmaxf(a.m, b.m);
    if (M == neg_inf()) return {M, 0.f};
    return {M, a.s * expf(a.m - M) + b.s * expf(b.m - M)};
  }
};
struct Better {  // larger value wins, ties go to the lower index (as torch.argmax)
  __device__ ArgMax operator()(ArgMax a, ArgMax b) const {
    return (b.v > a.v || (b.v == a.v && b.i < a.i)) ? b : a;
  }
};
struct Sum {
  __device__ float operator()(float a, float b) const { return a + b; }
};

__device__ __forceinline__ float shfl(float v, int o) { return __shfl_xor_sync(kFull, v, o); }
__device__ __forceinline__ MaxSum shfl(MaxSum v, int o) { return {shfl(v.m, o), shfl(v.s, o)}; }
__device__ __forceinline__ ArgMax shfl(ArgMax v, int o) { return {shfl(v.v, o), __shfl_xor_sync(kFull, v.i, o)}; }

template <typename T, typename Op>
__device__ T block_reduce(T v, Op op) {
  __shared__ T buf[32];
  for (int o = 16; o > 0; o >>= 1) v = op(v, shfl(v, o));
  if (threadIdx.x % 32 == 0) buf[threadIdx.x / 32] = v;
  __syncthreads();
  if (threadIdx.x == 0) {
    for (int w = 1; w < (int)blockDim.x / 32; ++w) v = op(v, buf[w]);
    buf[0] = v;
  }
  __syncthreads();
  v = buf[0];
  __syncthreads();  // buf is reused by the next call
  return v;
}

// Largest key K such that at least k elements have order_key(x) >= K: the k-th largest x.
template <typename T>
__device__ uint32_t select_top_k(const T* row, int V, float t, int k) {
  __shared__ uint32_t hist[256];
  __shared__ uint32_t sel;
  uint32_t prefix = 0, mask = 0, rem = (uint32_t)k;
  for (int shift = 24; shift >= 0; shift -= 8) {
    for (int i = threadIdx.x; i < 256; i += blockDim.x) hist[i] = 0;
    __syncthreads();
    for (int i = threadIdx.x; i < V; i += blockDim.x) {
      const uint32_t u = order_key(to_float(row[i]) / t);
      if ((u & mask) == prefix) atomicAdd(&hist[(u >> shift) & 255u], 1u);
    }
    __syncthreads();
    if (threadIdx.x == 0) {  // the bin holding the rem-th largest, scanning from the top
      uint32_t above = 0;
      int bin = 255;
      for (; bin > 0; --bin) {
        if (above + hist[bin] >= rem) break;
        above += hist[bin];
      }
      rem -= above;
      sel = (uint32_t)bin;
    }
    __syncthreads();
    prefix |= sel << shift;
    mask |= 255u << shift;
  }
  return prefix;
}

// Largest key K such that the softmax mass of {x : order_key(x) >= K} among the tokens kept so far
// (order_key >= floor) reaches p of their total mass. m is the row max (exp(x - m) is the weight).
template <typename T>
__device__ uint32_t select_top_p(const T* row, int V, float t, uint32_t floor, float m, float p) {
  __shared__ float hist[256];
  __shared__ uint32_t sel;
  float z = 0.f;
  for (int i = threadIdx.x; i < V; i += blockDim.x) {
    const float x = to_float(row[i]) / t;
    if (order_key(x) >= floor) z += expf(x - m);
  }
  z = block_reduce(z, Sum());
  float rem = p * z;
  uint32_t prefix = 0, mask = 0;
  for (int shift = 24; shift >= 0; shift -= 8) {
    for (int i = threadIdx.x; i < 256; i += blockDim.x) hist[i] = 0.f;
    __syncthreads();
    for (int i = threadIdx.x; i < V; i += blockDim.x) {
      const float x = to_float(row[i]) / t;
      const uint32_t u = order_key(x);
      if (u >= floor && (u & mask) == prefix) atomicAdd(&hist[(u >> shift) & 255u], expf(x - m));
    }
    __syncthreads();
    if (threadIdx.x == 0) {
      float above = 0.f;
      int bin = 255, lowest = 0;
      for (; bin >= 0; --bin) {
        if (hist[bin] > 0.f) {
          lowest = bin;
          if (above + hist[bin] >= rem) break;
          above += hist[bin];
        }
      }
      if (bin < 0) {  // rounding left the target above the total: keep everything (lowest bin)
        bin = lowest;
        rem = __int_as_float(0x7f800000);
      } else {
        rem -= above;
      }
      sel = (uint32_t)bin;
    }
    __syncthreads();
    prefix |= sel << shift;
    mask |= 255u << shift;
  }
  return prefix;
}

template <typename T>
__global__ void __launch_bounds__(kThreads) sample_kernel(SampleArgs a) {
  const int b = blockIdx.x, V = a.V;
  const T* row = static_cast<const T*>(a.logits) + (int64_t)b * a.stride;
  const float temp = a.temperature[b];
  const bool greedy = !(temp > 0.f);
  const float t = greedy ? 1.f : temp;
  const int k = a.top_k[b];
  const float p = a.top_p[b];
  const bool use_k = !greedy && k > 0 && k < V;
  const bool use_p = !greedy && p < 1.f;
  const uint32_t key = stream_key(a.seed[b], a.step[b]);

  // pass 1: softmax statistics; fused with the draw when nothing is filtered
  MaxSum ms{neg_inf(), 0.f};
  ArgMax best{neg_inf(), 0x7fffffff};
  for (int i = threadIdx.x; i < V; i += blockDim.x) {
    const float x = to_float(row[i]) / t;
    if (x > ms.m) { ms.s = ms.s * expf(ms.m - x) + 1.f; ms.m = x; }
    else if (x > neg_inf()) ms.s += expf(x - ms.m);
    if (!use_k && !use_p) best = Better()(best, {greedy ? x : x + gumbel(key, i), i});
  }
  ms = block_reduce(ms, CombineMaxSum());

  if (use_k || use_p) {  // thresholds, then the draw among the kept tokens
    uint32_t thr = use_k ? select_top_k(row, V, t, k) : 0u;
    if (use_p) thr = select_top_p(row, V, t, thr, ms.m, p);
    for (int i = threadIdx.x; i < V; i += blockDim.x) {
      const float x = to_float(row[i]) / t;
      if (order_key(x) >= thr) best = Better()(best, {x + gumbel(key, i), i});
    }
  }
  best = block_reduce(best, Better());
  if (threadIdx.x == 0) {
    a.token[b] = best.i;
    a.logprob[b] = to_float(row[best.i]) / t - ms.m - logf(ms.s);
  }
}

}  // namespace

const char* launch_sample(const SampleArgs& a, int dtype, void* stream) {
  if (a.B == 0) return nullptr;
  const cudaStream_t s = static_cast<cudaStream_t>(stream);
  if (dtype == kFloat32) sample_kernel<float><<<a.B, kThreads, 0, s>>>(a);
  else if (dtype == kFloat16) sample_kernel<__half><<<a.B, kThreads, 0, s>>>(a);
  else if (dtype == kBFloat16) sample_kernel<__nv_bfloat16><<<a.B, kThreads, 0, s>>>(a);
  else return "sample: unsupported dtype";
  const cudaError_t e = cudaGetLastError();
  return e == cudaSuccess ? nullptr : cudaGetErrorString(e);
}
