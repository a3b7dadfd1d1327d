// Launchers of the sampler's CUDA kernels (paged_attention.cu, sampling.cu), called by
// sampler_bindings.cpp. Plain C types only: this header is included by nvcc (no torch) and by the
// torch-facing bindings (no CUDA headers needed), so both sides compile on machines without a GPU.
// Every launcher returns nullptr on success, or the CUDA error string of the launch.
#pragma once
#include <stdint.h>

enum SamplerDType { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

// ---- paged_attention.cu -------------------------------------------------------------------------

struct PagedAttentionArgs {
  void* out;                 // (B, nh, hd)               dtype
  const void* q;             // (B, nh, hd)               dtype, contiguous
  const void* k_cache;       // (num_blocks, nkv, bs, hd) dtype
  const void* v_cache;       // (num_blocks, nkv, bs, hd) dtype
  const int32_t* block_tables;  // (B, max_blocks)
  const int32_t* context_lens;  // (B,) tokens each query attends over (its own included)
  float* tmp_out;            // (B, nh, num_splits, hd) fp32, read only when num_splits > 1
  float* tmp_ml;             // (B, nh, num_splits, 2)  fp32 (max, sum of exp) per split
  int B, nh, nkv, hd, block_size, max_blocks, num_splits;
  float scale;               // softmax scale, usually hd^-0.5
  int tensor_cores;          // 1: the mma.sync kernel where it applies (fp16/bf16, hd 64/128, block 16)
};

// Decode attention of one query token per sequence over its paged K/V (GQA, split-K).
const char* launch_paged_attention(const PagedAttentionArgs& a, int dtype, void* stream);

// How many splits of the context the kernel should use for this batch (fills the GPU's SMs).
int paged_attention_num_splits(int B, int nh, int nkv, int max_blocks, int tensor_cores);

// k, v (N, nkv, hd) -> k_cache/v_cache at slot_mapping[n] = block * bs + offset; slot < 0 is skipped.
const char* launch_write_kv(const void* k, const void* v, void* k_cache, void* v_cache,
                            const int64_t* slot_mapping, int N, int nkv, int hd, int block_size,
                            int elem_bytes, void* stream);

// True when launch_paged_attention has a kernel for this head_dim and dtype.
bool paged_attention_supported(int hd, int dtype);

// ---- sampling.cu --------------------------------------------------------------------------------

struct SampleArgs {
  const void* logits;        // (B, V) dtype, row stride `stride` elements
  const float* temperature;  // (B,) 0 = greedy
  const int32_t* top_k;      // (B,) 0 = off
  const float* top_p;        // (B,) 1 = off
  const int64_t* seed;       // (B,) per-request seed (>= 0)
  const int64_t* step;       // (B,) index of the token being drawn (the counter of the random stream)
  int64_t* token;            // (B,) out
  float* logprob;            // (B,) out: log softmax(logits / T) of the token, before top-k/top-p
  int B, V;
  int64_t stride;
};

const char* launch_sample(const SampleArgs& a, int dtype, void* stream);
