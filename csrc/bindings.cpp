// Torch-facing glue of the fused log-prob kernels (grpo_loss.cu): shape and dtype checks, then raw
// pointers to the launchers of grpo_loss.h. ops.py allocates every output and runs the GEMMs; the CUDA
// stream arrives as an integer (torch.cuda.current_stream().cuda_stream), so this file needs no CUDA
// or c10/cuda header and also compiles against a CPU-only torch (as sampler_bindings.cpp does).
#include <torch/extension.h>

#include "grpo_loss.h"

namespace {

int dtype_code(const torch::Tensor& t) {
  switch (t.scalar_type()) {
    case torch::kFloat: return kGrpoFloat32;
    case torch::kHalf: return kGrpoFloat16;
    case torch::kBFloat16: return kGrpoBFloat16;
    default: TORCH_CHECK(false, "grpo_loss kernels: unsupported logits dtype ", t.scalar_type());
  }
  return -1;
}

void check_launch(const char* err) { TORCH_CHECK(err == nullptr, "grpo_loss kernel: ", err ? err : ""); }

void check_vec(const torch::Tensor& t, const char* name, int64_t n, torch::ScalarType dtype) {
  TORCH_CHECK(t.is_cuda() && t.is_contiguous(), name, " must be a contiguous CUDA tensor");
  TORCH_CHECK(t.scalar_type() == dtype, name, " must be ", dtype, ", got ", t.scalar_type());
  TORCH_CHECK(t.dim() == 1 && t.size(0) == n, name, " must have shape (", n, ",)");
}

void check_logits(const torch::Tensor& z) {
  TORCH_CHECK(z.is_cuda() && z.is_contiguous() && z.dim() == 2, "logits must be a contiguous 2-D CUDA tensor");
}

void* stream_ptr(int64_t stream) { return reinterpret_cast<void*>(static_cast<intptr_t>(stream)); }

// logits (n, V) -> logp, entropy, lse (n,) fp32; targets (n,) int64
void forward(torch::Tensor logits, torch::Tensor targets, double inv_temperature, torch::Tensor logp,
             torch::Tensor entropy, torch::Tensor lse, int64_t stream) {
  check_logits(logits);
  const int64_t n = logits.size(0);
  check_vec(targets, "targets", n, torch::kLong);
  check_vec(logp, "logp", n, torch::kFloat);
  check_vec(entropy, "entropy", n, torch::kFloat);
  check_vec(lse, "lse", n, torch::kFloat);
  check_launch(launch_logprob_forward(logits.data_ptr(), dtype_code(logits), n, logits.size(1),
                                      targets.data_ptr<int64_t>(), (float)inv_temperature,
                                      logp.data_ptr<float>(), entropy.data_ptr<float>(), lse.data_ptr<float>(),
                                      stream_ptr(stream)));
}

// logits (n, V) overwritten by d loss / d logits (without the target one-hot); the rest (n,) fp32
void backward(torch::Tensor logits, torch::Tensor lse, torch::Tensor entropy, torch::Tensor d_logp,
              torch::Tensor d_ent, double inv_temperature, int64_t stream) {
  check_logits(logits);
  const int64_t n = logits.size(0);
  check_vec(lse, "lse", n, torch::kFloat);
  check_vec(entropy, "entropy", n, torch::kFloat);
  check_vec(d_logp, "d_logp", n, torch::kFloat);
  check_vec(d_ent, "d_ent", n, torch::kFloat);
  check_launch(launch_logprob_backward(logits.data_ptr(), dtype_code(logits), n, logits.size(1),
                                       lse.data_ptr<float>(), entropy.data_ptr<float>(), d_logp.data_ptr<float>(),
                                       d_ent.data_ptr<float>(), (float)inv_temperature, stream_ptr(stream)));
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("forward", &forward, "log-probs, entropies and log-sum-exps of one chunk of logits");
  m.def("backward", &backward, "d logits in place over one chunk of logits");
}
