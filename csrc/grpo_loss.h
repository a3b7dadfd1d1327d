// Launchers of the fused log-prob kernels (grpo_loss.cu), called by bindings.cpp. Plain C types only:
// nvcc includes this header without torch, and the torch-facing bindings include it without CUDA
// headers, so both sides compile on machines without a GPU. Launchers return nullptr on success, or
// the CUDA error string of the launch.
#pragma once
#include <stdint.h>

enum GrpoDType { kGrpoFloat32 = 0, kGrpoFloat16 = 1, kGrpoBFloat16 = 2 };

// logits (rows, V) of dtype -> logp, entropy, lse (rows,) fp32 of softmax(logits * inv_temperature)
const char* launch_logprob_forward(const void* logits, int dtype, int64_t rows, int64_t V,
                                   const int64_t* targets, float inv_temperature,
                                   float* logp, float* entropy, float* lse, void* stream);

// logits (rows, V) overwritten in place by d loss / d logits, without the target's one-hot term
const char* launch_logprob_backward(void* logits, int dtype, int64_t rows, int64_t V,
                                    const float* lse, const float* entropy, const float* d_logp,
                                    const float* d_ent, float inv_temperature, void* stream);
