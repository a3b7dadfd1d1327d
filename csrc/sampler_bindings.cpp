// Torch-facing glue of the sampler's kernels (paged_attention.cu, sampling.cu): shape and dtype
// checks, then raw pointers to the launchers of sampler_kernels.h. Outputs are allocated by the caller
// (sampler.py), so the ops run unchanged inside a CUDA graph capture. The CUDA stream arrives as an
// integer (torch.cuda.current_stream().cuda_stream), so this file needs no CUDA or c10/cuda header and
// also compiles against a CPU-only torch.
#include <torch/extension.h>

#include "sampler_kernels.h"

namespace {

int dtype_code(const torch::Tensor& t) {
  switch (t.scalar_type()) {
    case torch::kFloat: return kFloat32;
    case torch::kHalf: return kFloat16;
    case torch::kBFloat16: return kBFloat16;
    default: TORCH_CHECK(false, "sampler kernels: unsupported dtype ", t.scalar_type());
  }
  return -1;
}

void check_launch(const char* err) { TORCH_CHECK(err == nullptr, "sampler kernel: ", err ? err : ""); }

void check_cuda(const torch::Tensor& t, const char* name, torch::ScalarType dtype) {
  TORCH_CHECK(t.is_cuda() && t.is_contiguous(), name, " must be a contiguous CUDA tensor");
  TORCH_CHECK(t.scalar_type() == dtype, name, " must be ", dtype, ", got ", t.scalar_type());
}

void* stream_ptr(int64_t stream) { return reinterpret_cast<void*>(static_cast<intptr_t>(stream)); }

// out, q (B, nh, hd); k_cache, v_cache (num_blocks, nkv, bs, hd); block_tables (B, max_blocks) int32;
// context_lens (B,) int32; tmp_out (B, nh, S, hd) and tmp_ml (B, nh, S, 2) fp32, S = number of splits.
void paged_attention(torch::Tensor out, torch::Tensor q, torch::Tensor k_cache, torch::Tensor v_cache,
                     torch::Tensor block_tables, torch::Tensor context_lens, torch::Tensor tmp_out,
                     torch::Tensor tmp_ml, double scale, bool tensor_cores, int64_t stream) {
  const auto dt = q.scalar_type();
  check_cuda(q, "q", dt);
  check_cuda(out, "out", dt);
  check_cuda(k_cache, "k_cache", dt);
  check_cuda(v_cache, "v_cache", dt);
  check_cuda(block_tables, "block_tables", torch::kInt);
  check_cuda(context_lens, "context_lens", torch::kInt);
  check_cuda(tmp_out, "tmp_out", torch::kFloat);
  check_cuda(tmp_ml, "tmp_ml", torch::kFloat);
  TORCH_CHECK(q.dim() == 3 && k_cache.dim() == 4 && k_cache.sizes() == v_cache.sizes(), "bad shapes");
  TORCH_CHECK(out.sizes() == q.sizes() && k_cache.size(3) == q.size(2), "q/out/cache head_dim mismatch");
  TORCH_CHECK(block_tables.dim() == 2 && block_tables.size(0) == q.size(0) && context_lens.numel() == q.size(0),
              "block_tables / context_lens must have one row per sequence");
  TORCH_CHECK(tmp_ml.dim() == 4 && tmp_ml.size(0) == q.size(0) && tmp_ml.size(1) == q.size(1) && tmp_ml.size(3) == 2,
              "tmp_ml must be (B, nh, splits, 2)");
  PagedAttentionArgs a;
  a.out = out.data_ptr();
  a.q = q.data_ptr();
  a.k_cache = k_cache.data_ptr();
  a.v_cache = v_cache.data_ptr();
  a.block_tables = block_tables.data_ptr<int32_t>();
  a.context_lens = context_lens.data_ptr<int32_t>();
  a.tmp_out = tmp_out.data_ptr<float>();
  a.tmp_ml = tmp_ml.data_ptr<float>();
  a.B = (int)q.size(0);
  a.nh = (int)q.size(1);
  a.hd = (int)q.size(2);
  a.nkv = (int)k_cache.size(1);
  a.block_size = (int)k_cache.size(2);
  a.max_blocks = (int)block_tables.size(1);
  a.num_splits = (int)tmp_ml.size(2);
  a.scale = (float)scale;
  a.tensor_cores = tensor_cores ? 1 : 0;
  TORCH_CHECK(a.num_splits == 1 || tmp_out.numel() == (int64_t)a.B * a.nh * a.num_splits * a.hd, "tmp_out size");
  check_launch(launch_paged_attention(a, dtype_code(q), stream_ptr(stream)));
}

int64_t num_splits(int64_t B, int64_t nh, int64_t nkv, int64_t max_blocks, bool tensor_cores) {
  return paged_attention_num_splits((int)B, (int)nh, (int)nkv, (int)max_blocks, tensor_cores ? 1 : 0);
}

bool supported(int64_t hd, torch::Tensor like) {
  const auto s = like.scalar_type();
  if (s != torch::kFloat && s != torch::kHalf && s != torch::kBFloat16) return false;
  return paged_attention_supported((int)hd, dtype_code(like));
}

// k, v (N, nkv, hd) -> caches (num_blocks, nkv, bs, hd) at slot_mapping (N,) int64 (negative: skipped)
void write_kv(torch::Tensor k, torch::Tensor v, torch::Tensor k_cache, torch::Tensor v_cache,
              torch::Tensor slot_mapping, int64_t stream) {
  const auto dt = k_cache.scalar_type();
  check_cuda(k, "k", dt);
  check_cuda(v, "v", dt);
  check_cuda(k_cache, "k_cache", dt);
  check_cuda(v_cache, "v_cache", dt);
  check_cuda(slot_mapping, "slot_mapping", torch::kLong);
  TORCH_CHECK(k.dim() == 3 && k.sizes() == v.sizes() && k.size(0) == slot_mapping.numel(), "k/v must be (N, nkv, hd)");
  TORCH_CHECK(k_cache.dim() == 4 && k.size(1) == k_cache.size(1) && k.size(2) == k_cache.size(3), "cache shape");
  check_launch(launch_write_kv(k.data_ptr(), v.data_ptr(), k_cache.data_ptr(), v_cache.data_ptr(),
                               slot_mapping.data_ptr<int64_t>(), (int)k.size(0), (int)k.size(1), (int)k.size(2),
                               (int)k_cache.size(2), (int)k.element_size(), stream_ptr(stream)));
}

// logits (B, V) with unit stride along V; per-row params; outputs token (B,) int64, logprob (B,) fp32
void sample(torch::Tensor logits, torch::Tensor temperature, torch::Tensor top_k, torch::Tensor top_p,
            torch::Tensor seed, torch::Tensor step, torch::Tensor token, torch::Tensor logprob, int64_t stream) {
  TORCH_CHECK(logits.is_cuda() && logits.dim() == 2 && logits.stride(1) == 1, "logits must be (B, V), unit stride in V");
  check_cuda(temperature, "temperature", torch::kFloat);
  check_cuda(top_k, "top_k", torch::kInt);
  check_cuda(top_p, "top_p", torch::kFloat);
  check_cuda(seed, "seed", torch::kLong);
  check_cuda(step, "step", torch::kLong);
  check_cuda(token, "token", torch::kLong);
  check_cuda(logprob, "logprob", torch::kFloat);
  const int64_t B = logits.size(0);
  for (const auto& t : {temperature, top_k, top_p, seed, step, token, logprob})
    TORCH_CHECK(t.numel() == B, "per-row tensors must have B elements");
  SampleArgs a;
  a.logits = logits.data_ptr();
  a.temperature = temperature.data_ptr<float>();
  a.top_k = top_k.data_ptr<int32_t>();
  a.top_p = top_p.data_ptr<float>();
  a.seed = seed.data_ptr<int64_t>();
  a.step = step.data_ptr<int64_t>();
  a.token = token.data_ptr<int64_t>();
  a.logprob = logprob.data_ptr<float>();
  a.B = (int)B;
  a.V = (int)logits.size(1);
  a.stride = logits.stride(0);
  check_launch(launch_sample(a, dtype_code(logits), stream_ptr(stream)));
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("paged_attention", &paged_attention, "paged decode attention (GQA, split-K) into out");
  m.def("num_splits", &num_splits, "context splits paged_attention uses for a batch");
  m.def("supported", &supported, "paged_attention has a kernel for this head_dim and dtype");
  m.def("write_kv", &write_kv, "write k, v into the paged cache at slot_mapping");
  m.def("sample", &sample, "fused temperature / top-k / top-p sampling with log-probs");
}
