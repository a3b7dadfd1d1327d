// Paged decode attention and the KV-cache write, the hot path of sampler.py's decode step.
//
// Each sequence's keys and values live in fixed-size blocks of the cache, named by its row of a
// block table (PagedAttention, Kwon et al., SOSP'23, section 4.1), so sequences grow without
// reserving their maximum length and the G samples of a prompt can point at the same prompt blocks.
// Layout: k_cache / v_cache (num_blocks, nkv, block_size, hd): one (block, kv head) is a contiguous
// block_size x hd tile, so a warp streams it with coalesced 16-byte loads.
//
// Work split (one CTA per (sequence, kv head, context split)):
//  * GQA: the CTA computes all query heads that share the kv head (up to 8 per CTA), so each K/V byte
//    is read from memory once per group rather than once per query head.
//  * Split-K over the context (flash-decoding, Dao et al. 2023): with few sequences a CTA per
//    (sequence, head) cannot fill the GPU, so the context is cut into num_splits ranges whose partial
//    softmax results (max, sum, output) are merged by a second small kernel.
//  * Inside a CTA each warp takes whole blocks and keeps its own online softmax (running max and sum,
//    Milakov & Gimelshein 2018), so warps never wait for each other until the final merge.
//  * Inside a warp, TPT = hd / VEC lanes share one token (each holds VEC dims of q, k, v), so 32 / TPT
//    tokens are read side by side; kChunk tokens per lane group are loaded before any is used, which
//    keeps several 16-byte loads per lane in flight.
// Softmax and accumulation are fp32 whatever the storage dtype (fp32, fp16, bf16).
//
// The pure-PyTorch twins are sampler.paged_attention_ref and sampler.write_kv_ref.
#include <cuda_runtime.h>
#include <cuda_fp16.h>
#include <cuda_bf16.h>
#include <stdint.h>

#include "sampler_kernels.h"

namespace {

constexpr int kWarps = 4;
constexpr int kThreads = kWarps * 32;
constexpr int kChunk = 4;       // tokens each lane group loads before using them
constexpr int kMaxGroup = 8;    // query heads per CTA (larger GQA groups take several CTAs)
constexpr unsigned kFull = 0xffffffffu;

__device__ __forceinline__ float neg_inf() { return __int_as_float(0xff800000); }

// 16 bytes of T <-> floats
template <typename T> struct Vec16;
template <> struct Vec16<float> {
  static constexpr int N = 4;
  __device__ static void to_float(const uint4& r, float* f) {
    f[0] = __uint_as_float(r.x); f[1] = __uint_as_float(r.y);
    f[2] = __uint_as_float(r.z); f[3] = __uint_as_float(r.w);
  }
  __device__ static void store(float* p, float y) { *p = y; }
};
template <> struct Vec16<__half> {
  static constexpr int N = 8;
  __device__ static void to_float(const uint4& r, float* f) {
    const __half2* h = reinterpret_cast<const __half2*>(&r);
#pragma unroll
    for (int i = 0; i < 4; ++i) { const float2 t = __half22float2(h[i]); f[2 * i] = t.x; f[2 * i + 1] = t.y; }
  }
  __device__ static void store(__half* p, float y) { *p = __float2half_rn(y); }
};
template <> struct Vec16<__nv_bfloat16> {
  static constexpr int N = 8;
  __device__ static void to_float(const uint4& r, float* f) {
    const __nv_bfloat162* h = reinterpret_cast<const __nv_bfloat162*>(&r);
#pragma unroll
    for (int i = 0; i < 4; ++i) { const float2 t = __bfloat1622float2(h[i]); f[2 * i] = t.x; f[2 * i + 1] = t.y; }
  }
  __device__ static void store(__nv_bfloat16* p, float y) { *p = __float2bfloat16_rn(y); }
};

template <typename T, int HD, int GMAX>
__global__ void __launch_bounds__(kThreads) paged_attention_kernel(PagedAttentionArgs a) {
  using V16 = Vec16<T>;
  constexpr int VEC = V16::N;
  constexpr int TPT = HD / VEC;  // lanes per token
  constexpr int NTG = 32 / TPT;  // tokens a warp reads side by side
  static_assert(HD % VEC == 0 && TPT >= 1 && TPT <= 32 && 32 % TPT == 0, "unsupported head_dim");

  const int b = blockIdx.x, split = blockIdx.z;
  const int G = a.nh / a.nkv;                       // query heads per kv head
  const int hgroups = (G + GMAX - 1) / GMAX;        // CTAs per kv head
  const int kvh = blockIdx.y / hgroups;
  const int g0 = (blockIdx.y % hgroups) * GMAX;
  const int nq = min(GMAX, G - g0);                 // query heads of this CTA
  const int h0 = kvh * G + g0;                      // first of them, as a global head index
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int tg = lane / TPT, dl = lane % TPT;       // token slot in the warp, dims slice of the lane

  const int ctx = a.context_lens[b], bs = a.block_size;
  const int nblocks = (ctx + bs - 1) / bs;
  const int per_split = (nblocks + a.num_splits - 1) / a.num_splits;
  const int blk_lo = split * per_split, blk_hi = min(nblocks, blk_lo + per_split);

  // this lane's VEC dims of each query head, pre-scaled by the softmax scale
  float q[GMAX][VEC];
  const T* qp = static_cast<const T*>(a.q) + ((size_t)b * a.nh + h0) * HD + dl * VEC;
#pragma unroll
  for (int g = 0; g < GMAX; ++g) {
    if (g < nq) {
      V16::to_float(*reinterpret_cast<const uint4*>(qp + g * HD), q[g]);
#pragma unroll
      for (int e = 0; e < VEC; ++e) q[g][e] *= a.scale;
    } else {
#pragma unroll
      for (int e = 0; e < VEC; ++e) q[g][e] = 0.f;
    }
  }

  float m[GMAX], l[GMAX], acc[GMAX][VEC];  // per-warp online softmax state
#pragma unroll
  for (int g = 0; g < GMAX; ++g) {
    m[g] = neg_inf(); l[g] = 0.f;
#pragma unroll
    for (int e = 0; e < VEC; ++e) acc[g][e] = 0.f;
  }

  const size_t head_stride = (size_t)bs * HD, block_stride = (size_t)a.nkv * head_stride;
  const T* kbase = static_cast<const T*>(a.k_cache) + kvh * head_stride + dl * VEC;
  const T* vbase = static_cast<const T*>(a.v_cache) + kvh * head_stride + dl * VEC;
  const int32_t* table = a.block_tables + (size_t)b * a.max_blocks;

  for (int j = blk_lo + warp; j < blk_hi; j += kWarps) {
    const size_t off = (size_t)table[j] * block_stride;
    const int ntok = min(bs, ctx - j * bs);
    for (int t0 = 0; t0 < ntok; t0 += NTG * kChunk) {
      uint4 kr[kChunk], vr[kChunk];
      bool valid[kChunk];
#pragma unroll
      for (int c = 0; c < kChunk; ++c) {  // issue all loads first
        const int t = t0 + c * NTG + tg;
        valid[c] = t < ntok;
        kr[c] = vr[c] = make_uint4(0, 0, 0, 0);
        if (valid[c]) {
          kr[c] = *reinterpret_cast<const uint4*>(kbase + off + (size_t)t * HD);
          vr[c] = *reinterpret_cast<const uint4*>(vbase + off + (size_t)t * HD);
        }
      }
      float s[kChunk][GMAX];  // scores q.k, reduced over the TPT lanes of each token
#pragma unroll
      for (int c = 0; c < kChunk; ++c) {
        float kf[VEC];
        V16::to_float(kr[c], kf);
#pragma unroll
        for (int g = 0; g < GMAX; ++g) {
          float d = 0.f;
#pragma unroll
          for (int e = 0; e < VEC; ++e) d = fmaf(q[g][e], kf[e], d);
#pragma unroll
          for (int o = TPT / 2; o > 0; o >>= 1) d += __shfl_xor_sync(kFull, d, o);
          s[c][g] = d;
        }
      }
#pragma unroll
      for (int g = 0; g < GMAX; ++g) {
        float cm = neg_inf();  // chunk max over the whole warp: the running max stays warp-uniform
#pragma unroll
        for (int c = 0; c < kChunk; ++c) if (valid[c]) cm = fmaxf(cm, s[c][g]);
#pragma unroll
        for (int o = TPT; o < 32; o <<= 1) cm = fmaxf(cm, __shfl_xor_sync(kFull, cm, o));
        const float mn = fmaxf(m[g], cm);  // finite: token t0 of the chunk is always valid
        const float alpha = __expf(m[g] - mn);
        m[g] = mn;
        if (alpha != 1.f) {
          l[g] *= alpha;
#pragma unroll
          for (int e = 0; e < VEC; ++e) acc[g][e] *= alpha;
        }
#pragma unroll
        for (int c = 0; c < kChunk; ++c) {
          const float p = valid[c] ? __expf(s[c][g] - mn) : 0.f;
          s[c][g] = p;
          l[g] += p;
        }
      }
#pragma unroll
      for (int c = 0; c < kChunk; ++c) {
        float vf[VEC];
        V16::to_float(vr[c], vf);  // zeros for invalid tokens, whose p is 0
#pragma unroll
        for (int g = 0; g < GMAX; ++g)
#pragma unroll
          for (int e = 0; e < VEC; ++e) acc[g][e] = fmaf(s[c][g], vf[e], acc[g][e]);
      }
    }
  }

  // sum l and acc over the token slots of the warp (lanes with equal dl), then merge the warps
#pragma unroll
  for (int g = 0; g < GMAX; ++g)
#pragma unroll
    for (int o = TPT; o < 32; o <<= 1) {
      l[g] += __shfl_xor_sync(kFull, l[g], o);
#pragma unroll
      for (int e = 0; e < VEC; ++e) acc[g][e] += __shfl_xor_sync(kFull, acc[g][e], o);
    }
  __shared__ float sm_ml[kWarps][GMAX][2];
  __shared__ float sm_acc[kWarps][GMAX][HD];
  if (lane == 0)
#pragma unroll
    for (int g = 0; g < GMAX; ++g) { sm_ml[warp][g][0] = m[g]; sm_ml[warp][g][1] = l[g]; }
  if (tg == 0)
#pragma unroll
    for (int g = 0; g < GMAX; ++g)
#pragma unroll
      for (int e = 0; e < VEC; ++e) sm_acc[warp][g][dl * VEC + e] = acc[g][e];
  __syncthreads();

  for (int i = threadIdx.x; i < nq * HD; i += kThreads) {
    const int g = i / HD, d = i % HD;
    float M = neg_inf();
#pragma unroll
    for (int w = 0; w < kWarps; ++w) M = fmaxf(M, sm_ml[w][g][0]);
    float L = 0.f, o = 0.f;
    if (M != neg_inf())
#pragma unroll
      for (int w = 0; w < kWarps; ++w) {
        const float f = __expf(sm_ml[w][g][0] - M);
        L += sm_ml[w][g][1] * f;
        o += sm_acc[w][g][d] * f;
      }
    const float y = L > 0.f ? o / L : 0.f;
    const size_t row = (size_t)b * a.nh + h0 + g;
    if (a.num_splits == 1) {
      V16::store(static_cast<T*>(a.out) + row * HD + d, y);
    } else {
      const size_t part = row * a.num_splits + split;
      a.tmp_out[part * HD + d] = y;
      if (d == 0) { a.tmp_ml[part * 2] = M; a.tmp_ml[part * 2 + 1] = L; }
    }
  }
}

// Merge the splits of one (sequence, query head): weights l_s * exp(m_s - max m).
template <typename T>
__global__ void paged_attention_reduce_kernel(PagedAttentionArgs a) {
  const size_t row = blockIdx.x;
  const int S = a.num_splits;
  const float* ml = a.tmp_ml + row * S * 2;
  float M = neg_inf();
  for (int s = 0; s < S; ++s) if (ml[2 * s + 1] > 0.f) M = fmaxf(M, ml[2 * s]);
  for (int d = threadIdx.x; d < a.hd; d += blockDim.x) {
    float L = 0.f, o = 0.f;
    for (int s = 0; s < S; ++s) {
      if (ml[2 * s + 1] > 0.f) {
        const float f = __expf(ml[2 * s] - M) * ml[2 * s + 1];
        L += f;
        o += f * a.tmp_out[(row * S + s) * a.hd + d];
      }
    }
    Vec16<T>::store(static_cast<T*>(a.out) + row * a.hd + d, L > 0.f ? o / L : 0.f);
  }
}

template <typename T, int HD, int GMAX>
void launch(const PagedAttentionArgs& a, cudaStream_t stream) {
  const int G = a.nh / a.nkv;
  const dim3 grid(a.B, a.nkv * ((G + GMAX - 1) / GMAX), a.num_splits);
  paged_attention_kernel<T, HD, GMAX><<<grid, kThreads, 0, stream>>>(a);
  if (a.num_splits > 1) paged_attention_reduce_kernel<T><<<a.B * a.nh, 128, 0, stream>>>(a);
}

template <typename T, int HD>
void launch_group(const PagedAttentionArgs& a, cudaStream_t stream) {
  const int G = a.nh / a.nkv;
  if (G <= 1) launch<T, HD, 1>(a, stream);
  else if (G <= 2) launch<T, HD, 2>(a, stream);
  else if (G <= 4) launch<T, HD, 4>(a, stream);
  else launch<T, HD, kMaxGroup>(a, stream);
}

template <typename T>
bool launch_dtype(const PagedAttentionArgs& a, cudaStream_t stream) {
  switch (a.hd) {
    case 32: launch_group<T, 32>(a, stream); return true;
    case 64: launch_group<T, 64>(a, stream); return true;
    case 128: launch_group<T, 128>(a, stream); return true;
    default: return false;
  }
}

__global__ void write_kv_kernel(const uint4* k, const uint4* v, uint4* k_cache, uint4* v_cache,
                                const int64_t* slots, int64_t total, int nkv, int vecs, int bs) {
  const int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
  if (i >= total) return;
  const int vi = (int)(i % vecs);
  const int64_t nh = i / vecs;
  const int h = (int)(nh % nkv);
  const int64_t slot = slots[nh / nkv];
  if (slot < 0) return;
  const int64_t dst = (((slot / bs) * nkv + h) * bs + slot % bs) * vecs + vi;
  k_cache[dst] = k[i];
  v_cache[dst] = v[i];
}

const char* last_error() {
  const cudaError_t e = cudaGetLastError();
  return e == cudaSuccess ? nullptr : cudaGetErrorString(e);
}

}  // namespace

bool paged_attention_supported(int hd, int dtype) {
  return (hd == 32 || hd == 64 || hd == 128) && dtype >= kFloat32 && dtype <= kBFloat16;
}

int paged_attention_num_splits(int B, int nh, int nkv, int max_blocks) {
  static int sms = 0;
  if (sms == 0) {
    int dev = 0;
    if (cudaGetDevice(&dev) != cudaSuccess ||
        cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev) != cudaSuccess || sms <= 0)
      sms = 108;
  }
  const int G = nh / nkv;
  const int gmax = G <= 1 ? 1 : G <= 2 ? 2 : G <= 4 ? 4 : kMaxGroup;
  const int ctas = B * nkv * ((G + gmax - 1) / gmax);
  int s = (2 * sms + ctas - 1) / ctas;          // at least two CTAs per SM
  const int cap = max_blocks / (2 * kWarps);    // each split keeps >= 2 blocks per warp at full length
  s = s < cap ? s : cap;
  return s < 1 ? 1 : s;
}

const char* launch_paged_attention(const PagedAttentionArgs& a, int dtype, void* stream) {
  if (a.B == 0) return nullptr;
  if (a.nkv <= 0 || a.nh % a.nkv != 0) return "paged_attention: nh must be a multiple of nkv";
  const cudaStream_t s = static_cast<cudaStream_t>(stream);
  bool ok = false;
  if (dtype == kFloat32) ok = launch_dtype<float>(a, s);
  else if (dtype == kFloat16) ok = launch_dtype<__half>(a, s);
  else if (dtype == kBFloat16) ok = launch_dtype<__nv_bfloat16>(a, s);
  if (!ok) return "paged_attention: unsupported head_dim or dtype";
  return last_error();
}

const char* launch_write_kv(const void* k, const void* v, void* k_cache, void* v_cache,
                            const int64_t* slot_mapping, int N, int nkv, int hd, int block_size,
                            int elem_bytes, void* stream) {
  if ((hd * elem_bytes) % 16 != 0) return "write_kv: hd * element size must be a multiple of 16 bytes";
  const int vecs = hd * elem_bytes / 16;
  const int64_t total = (int64_t)N * nkv * vecs;
  if (total == 0) return nullptr;
  const int threads = 256;
  write_kv_kernel<<<(unsigned)((total + threads - 1) / threads), threads, 0, static_cast<cudaStream_t>(stream)>>>(
      static_cast<const uint4*>(k), static_cast<const uint4*>(v), static_cast<uint4*>(k_cache),
      static_cast<uint4*>(v_cache), slot_mapping, total, nkv, vecs, block_size);
  return last_error();
}
