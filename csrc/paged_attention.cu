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
// A second kernel below does the same on tensor cores (fp16/bf16, hd 64/128; opt-in, see there).
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

// The end of both attention kernels: each warp left its rows' (max, sum) in ml and its unnormalised
// outputs in acc; merge the warps' online softmaxes, then store the rows (or this split's partials).
template <typename T, int HD, int ROWS>
__device__ __forceinline__ void merge_warps_and_store(const PagedAttentionArgs& a, const float (*ml)[ROWS][2],
                                                      const float (*acc)[ROWS][HD], int nq, int b, int h0,
                                                      int split) {
  for (int i = threadIdx.x; i < nq * HD; i += kThreads) {
    const int g = i / HD, d = i % HD;
    float M = neg_inf();
#pragma unroll
    for (int w = 0; w < kWarps; ++w) M = fmaxf(M, ml[w][g][0]);
    float L = 0.f, o = 0.f;
    if (M != neg_inf())
#pragma unroll
      for (int w = 0; w < kWarps; ++w) {
        const float f = __expf(ml[w][g][0] - M);
        L += ml[w][g][1] * f;
        o += acc[w][g][d] * f;
      }
    const float y = L > 0.f ? o / L : 0.f;
    const size_t row = (size_t)b * a.nh + h0 + g;
    if (a.num_splits == 1) {
      Vec16<T>::store(static_cast<T*>(a.out) + row * HD + d, y);
    } else {
      const size_t part = row * a.num_splits + split;
      a.tmp_out[part * HD + d] = y;
      if (d == 0) { a.tmp_ml[part * 2] = M; a.tmp_ml[part * 2 + 1] = L; }
    }
  }
}

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

  merge_warps_and_store<T, HD, GMAX>(a, sm_ml, sm_acc, nq, b, h0, split);
}

// ---- Tensor-core variant: fp16 / bf16, head_dim 64 or 128, block_size 16 ----------------------------
// Written in a session without a GPU and not yet run: opt-in (PagedAttentionArgs::tensor_cores) until
// the GPU tests and benchmarks/bench_sampler.py have checked it against the kernel above.
//
// The CUDA-core kernel spends ~2 x 8 x hd FMAs and 16 shuffles per (token, kv head) on 512 bytes of
// K/V, so it is issue-bound well below the HBM bandwidth (benchmarks/NOTES_sampler.md). Here the GQA
// group is the M dimension of mma.sync.m16n8k16 (the idea of FlashInfer's decode kernels): the up to
// 16 query heads that share a kv head are 16 rows, and a block's 16 tokens are N of q.k^T and K of p.v.
// Each warp takes whole blocks with its own online softmax, as above, and the operands come straight
// from global memory in 16-byte loads through two permutations that leave the result unchanged:
//  * q.k^T sums over head dims in any order, so lane (g, t) loads dims [32s + 8t, 32s + 8t + 8) of its
//    token and feeds them to k-steps 2s and 2s + 1; q's fragments are loaded with the same order;
//  * p.v's output columns may be permuted (undone at the store): column n of n-tile nt is head dim
//    (nt / 8) * 64 + 8n + nt % 8, so lane g reads 8 consecutive dims of a token per 64.
// p is rounded to the storage type as hi + lo (two MMAs), which keeps it near fp32 precision.
// Fragment layouts: PTX ISA, "Matrix Fragments for mma.m16n8k16"; g = lane / 4 (groupID), t = lane % 4.

template <typename T> struct Mma;
template <> struct Mma<__half> {
  __device__ static void run(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
                 "{%0,%1,%2,%3};\n"
                 : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
  __device__ static uint32_t pack(float lo, float hi, float2* rounded) {
    const __half2 h = __floats2half2_rn(lo, hi);
    *rounded = __half22float2(h);
    return *reinterpret_cast<const uint32_t*>(&h);
  }
};
template <> struct Mma<__nv_bfloat16> {
  __device__ static void run(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
                 "{%0,%1,%2,%3};\n"
                 : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
  __device__ static uint32_t pack(float lo, float hi, float2* rounded) {
    const __nv_bfloat162 h = __floats2bfloat162_rn(lo, hi);
    *rounded = __bfloat1622float2(h);
    return *reinterpret_cast<const uint32_t*>(&h);
  }
};

__device__ __forceinline__ uint32_t word(const uint4& v, int i) {  // i is a compile-time constant
  return i == 0 ? v.x : i == 1 ? v.y : i == 2 ? v.z : v.w;
}

template <typename T, int HD>
__global__ void __launch_bounds__(kThreads, 3) paged_attention_mma_kernel(PagedAttentionArgs a) {
  constexpr int KS = HD / 16;  // k-steps of q.k^T
  constexpr int NT = HD / 8;   // n-tiles of p.v
  constexpr int QL = HD / 32;  // 16-byte loads per row of q or k (each feeds two k-steps)
  constexpr int VL = HD / 64;  // 16-byte loads per token of v
  const int b = blockIdx.x, split = blockIdx.z;
  const int G = a.nh / a.nkv, hgroups = (G + 15) / 16;
  const int kvh = blockIdx.y / hgroups, g0 = (blockIdx.y % hgroups) * 16;
  const int nq = min(16, G - g0), h0 = kvh * G + g0;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int g = lane >> 2, t = lane & 3;

  const int ctx = a.context_lens[b];
  const int nblocks = (ctx + 15) / 16;
  const int per_split = (nblocks + a.num_splits - 1) / a.num_splits;
  const int blk_lo = split * per_split, blk_hi = min(nblocks, blk_lo + per_split);

  // q as A fragments of the k-steps: rows g and g + 8 are query heads h0 + g and h0 + g + 8 (0 past nq)
  uint32_t qa[KS][4];
  const T* qp = static_cast<const T*>(a.q) + ((size_t)b * a.nh + h0) * HD + 8 * t;
#pragma unroll
  for (int s = 0; s < QL; ++s) {
    const uint4 zero = make_uint4(0, 0, 0, 0);
    const uint4 r0 = g < nq ? *reinterpret_cast<const uint4*>(qp + g * HD + 32 * s) : zero;
    const uint4 r8 = g + 8 < nq ? *reinterpret_cast<const uint4*>(qp + (g + 8) * HD + 32 * s) : zero;
    qa[2 * s][0] = r0.x; qa[2 * s][1] = r8.x; qa[2 * s][2] = r0.y; qa[2 * s][3] = r8.y;
    qa[2 * s + 1][0] = r0.z; qa[2 * s + 1][1] = r8.z; qa[2 * s + 1][2] = r0.w; qa[2 * s + 1][3] = r8.w;
  }

  float o[NT][4], m[2] = {neg_inf(), neg_inf()}, l[2] = {0.f, 0.f};  // rows g (r = 0) and g + 8 (r = 1)
#pragma unroll
  for (int n = 0; n < NT; ++n) o[n][0] = o[n][1] = o[n][2] = o[n][3] = 0.f;

  const size_t head_stride = (size_t)16 * HD, block_stride = (size_t)a.nkv * head_stride;
  const T* kbase = static_cast<const T*>(a.k_cache) + kvh * head_stride;
  const T* vbase = static_cast<const T*>(a.v_cache) + kvh * head_stride;
  const int32_t* table = a.block_tables + (size_t)b * a.max_blocks;

  for (int j = blk_lo + warp; j < blk_hi; j += kWarps) {
    const T* kb = kbase + (size_t)table[j] * block_stride;
    const T* vb = vbase + (size_t)table[j] * block_stride;
    const int ntok = min(16, ctx - j * 16);
    // all loads first. k: tokens g and 8 + g (rows past ntok hold stale values, masked below);
    // v: tokens 2t, 2t + 1, 2t + 8, 2t + 9 (zeros past ntok: stale values could be NaN, and 0 * NaN is NaN)
    uint4 kr[2][QL], vr[4][VL];
#pragma unroll
    for (int n = 0; n < 2; ++n)
#pragma unroll
      for (int s = 0; s < QL; ++s) kr[n][s] = *reinterpret_cast<const uint4*>(kb + (8 * n + g) * HD + 32 * s + 8 * t);
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const int tok = 2 * t + (i & 1) + 8 * (i >> 1);
#pragma unroll
      for (int h = 0; h < VL; ++h)
        vr[i][h] = tok < ntok ? *reinterpret_cast<const uint4*>(vb + tok * HD + 64 * h + 8 * g) : make_uint4(0, 0, 0, 0);
    }

    // scores: s[n] holds rows g, g + 8 x tokens 8n + 2t, 8n + 2t + 1 (C fragment order c0..c3)
    float sc[2][4];
#pragma unroll
    for (int n = 0; n < 2; ++n) {
      sc[n][0] = sc[n][1] = sc[n][2] = sc[n][3] = 0.f;
#pragma unroll
      for (int s = 0; s < QL; ++s) {
        Mma<T>::run(sc[n], qa[2 * s], kr[n][s].x, kr[n][s].y);
        Mma<T>::run(sc[n], qa[2 * s + 1], kr[n][s].z, kr[n][s].w);
      }
#pragma unroll
      for (int e = 0; e < 4; ++e) sc[n][e] = 8 * n + 2 * t + (e & 1) < ntok ? sc[n][e] * a.scale : neg_inf();
    }

    // online softmax per row; the 4 lanes of a quad (same g) hold the row's 16 columns
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      float mx = fmaxf(fmaxf(sc[0][2 * r], sc[0][2 * r + 1]), fmaxf(sc[1][2 * r], sc[1][2 * r + 1]));
      mx = fmaxf(mx, __shfl_xor_sync(kFull, mx, 1));
      mx = fmaxf(mx, __shfl_xor_sync(kFull, mx, 2));
      const float mn = fmaxf(m[r], mx);  // finite: token 0 of every block is valid
      const float alpha = __expf(m[r] - mn);
      m[r] = mn;
      l[r] *= alpha;
#pragma unroll
      for (int n = 0; n < NT; ++n) { o[n][2 * r] *= alpha; o[n][2 * r + 1] *= alpha; }
#pragma unroll
      for (int n = 0; n < 2; ++n)
#pragma unroll
        for (int e = 2 * r; e < 2 * r + 2; ++e) { sc[n][e] = __expf(sc[n][e] - mn); l[r] += sc[n][e]; }
    }

    // p as A fragments (k = token): rows g / g + 8 x tokens 2t, 2t + 1 (n = 0) and 2t + 8, 2t + 9 (n = 1)
    uint32_t pa[4], pl[4];
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const float* p = &sc[i >> 1][2 * (i & 1)];
      float2 hi;
      pa[i] = Mma<T>::pack(p[0], p[1], &hi);
      pl[i] = Mma<T>::pack(p[0] - hi.x, p[1] - hi.y, &hi);
    }
    // o += p v: B fragment of n-tile n holds tokens (2t, 2t + 1) and (2t + 8, 2t + 9) of column g, i.e.
    // head dim (n / 8) * 64 + 8g + n % 8: element n % 8 of this lane's 16-byte load h = n / 8
#pragma unroll
    for (int n = 0; n < NT; ++n) {
      const int h = n / 8, w = (n % 8) / 2;
      const uint32_t sel = (n & 1) ? 0x7632 : 0x5410;  // high or low halves of the two words
      const uint32_t b0 = __byte_perm(word(vr[0][h], w), word(vr[1][h], w), sel);
      const uint32_t b1 = __byte_perm(word(vr[2][h], w), word(vr[3][h], w), sel);
      Mma<T>::run(o[n], pa, b0, b1);
      Mma<T>::run(o[n], pl, b0, b1);
    }
  }

#pragma unroll
  for (int r = 0; r < 2; ++r) {  // a row's sum is spread over the quad
    l[r] += __shfl_xor_sync(kFull, l[r], 1);
    l[r] += __shfl_xor_sync(kFull, l[r], 2);
  }
  __shared__ float sm_ml[kWarps][16][2];
  __shared__ float sm_acc[kWarps][16][HD];
  if (t == 0)
#pragma unroll
    for (int r = 0; r < 2; ++r) { sm_ml[warp][g + 8 * r][0] = m[r]; sm_ml[warp][g + 8 * r][1] = l[r]; }
#pragma unroll
  for (int n = 0; n < NT; ++n)
#pragma unroll
    for (int e = 0; e < 4; ++e)  // C fragment: row g + 8 (e / 2), column 2t + e % 2 of n-tile n
      sm_acc[warp][g + 8 * (e >> 1)][(n / 8) * 64 + 8 * (2 * t + (e & 1)) + n % 8] = o[n][e];
  __syncthreads();
  merge_warps_and_store<T, HD, 16>(a, sm_ml, sm_acc, nq, b, h0, split);
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

// The tensor-core kernel's cases (and CTAs per (sequence, kv head): one per 16 query heads).
bool use_mma(const PagedAttentionArgs& a, int dtype) {
  return a.tensor_cores && dtype != kFloat32 && (a.hd == 64 || a.hd == 128) && a.block_size == 16;
}

template <typename T, int HD>
void launch_mma(const PagedAttentionArgs& a, cudaStream_t stream) {
  const dim3 grid(a.B, a.nkv * ((a.nh / a.nkv + 15) / 16), a.num_splits);
  paged_attention_mma_kernel<T, HD><<<grid, kThreads, 0, stream>>>(a);
  if (a.num_splits > 1) paged_attention_reduce_kernel<T><<<a.B * a.nh, 128, 0, stream>>>(a);
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

int paged_attention_num_splits(int B, int nh, int nkv, int max_blocks, int tensor_cores) {
  static int sms = 0;
  if (sms == 0) {
    int dev = 0;
    if (cudaGetDevice(&dev) != cudaSuccess ||
        cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev) != cudaSuccess || sms <= 0)
      sms = 108;
  }
  const int G = nh / nkv;
  const int gmax = tensor_cores ? 16 : G <= 1 ? 1 : G <= 2 ? 2 : G <= 4 ? 4 : kMaxGroup;
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
  if (use_mma(a, dtype)) {
    if (dtype == kFloat16) a.hd == 64 ? launch_mma<__half, 64>(a, s) : launch_mma<__half, 128>(a, s);
    else a.hd == 64 ? launch_mma<__nv_bfloat16, 64>(a, s) : launch_mma<__nv_bfloat16, 128>(a, s);
    return last_error();
  }
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
