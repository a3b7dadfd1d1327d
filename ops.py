"""
ops.py: token log-probs and the GRPO-family policy losses straight from final hidden states and the
lm_head weight, never holding the [tokens x vocab] logits of the whole batch.

    logp, entropy = token_logprobs(hidden, weight, targets)          # old / reference log-probs
    loss, metrics = policy_loss(hidden, weight, targets, adv, logp_old, mask, loss="cpgd")

The pure-PyTorch path below works chunk by chunk (one chunk of logits at a time, recomputed in the
backward), on any device; it is the CPU path and the oracle the CUDA kernels of csrc/ are tested
against. On a GPU, token_logprobs (and so policy_loss) runs the same chunks through csrc/grpo_loss.cu:
cuBLAS computes each chunk's logits into one reused buffer, the kernels do the vocabulary-wide work
in one pass and write d-logits in place (SAFELADDER_NO_KERNELS=1 forces the reference).
"""
import math
import os
import warnings

import torch

CHUNK = 4096  # tokens per chunk of logits: 4096 x 152064 fp32 is 2.5 GB at the largest


# -----------------------------------------------------------------------------
# Token log-probs and entropy, chunked


def _chunk_stats(h, w, t, temperature):
    z = h @ w.t()                                       # (n, V) logits of this chunk only
    z = z.to(torch.promote_types(z.dtype, torch.float32)) / temperature  # fp32 (fp64 for fp64 inputs)
    lse = torch.logsumexp(z, dim=-1)
    p = torch.softmax(z, dim=-1)
    logp = z.gather(1, t[:, None])[:, 0] - lse
    entropy = lse - (p * z).sum(-1)
    return z, p, logp, entropy


class _TokenLogprobs(torch.autograd.Function):
    """log p(target) and entropy of softmax(h W^T / T), with the backward recomputing each chunk:
    d logp / dz = onehot - p;  d H / dz = -p (log p + H)."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, temperature, chunk):
        dtype = torch.promote_types(hidden.dtype, torch.float32)
        logp = torch.empty(hidden.shape[0], dtype=dtype, device=hidden.device)
        ent = torch.empty_like(logp)
        for s in range(0, hidden.shape[0], chunk):
            _, _, logp[s:s + chunk], ent[s:s + chunk] = _chunk_stats(hidden[s:s + chunk], weight,
                                                                     targets[s:s + chunk], temperature)
        ctx.save_for_backward(hidden, weight, targets, ent)
        ctx.temperature, ctx.chunk = temperature, chunk
        return logp, ent

    @staticmethod
    def backward(ctx, d_logp, d_ent):
        hidden, weight, targets, ent = ctx.saved_tensors
        T, chunk = ctx.temperature, ctx.chunk
        d_hidden = torch.zeros_like(hidden) if ctx.needs_input_grad[0] else None
        d_weight = torch.zeros(weight.shape, dtype=ent.dtype, device=weight.device) \
            if ctx.needs_input_grad[1] else None
        d_logp = torch.zeros_like(ent) if d_logp is None else d_logp
        d_ent = torch.zeros_like(ent) if d_ent is None else d_ent
        for s in range(0, hidden.shape[0], chunk):
            h, t = hidden[s:s + chunk], targets[s:s + chunk]
            z, p, _, _ = _chunk_stats(h, weight, t, T)
            log_p = z - torch.logsumexp(z, dim=-1, keepdim=True)
            dz = -p * (d_logp[s:s + chunk, None] + d_ent[s:s + chunk, None] * (log_p + ent[s:s + chunk, None]))
            dz.scatter_add_(1, t[:, None], d_logp[s:s + chunk, None])
            dz = dz / T
            if d_hidden is not None:
                d_hidden[s:s + chunk] = (dz @ weight.to(dz.dtype)).to(hidden.dtype)
            if d_weight is not None:
                d_weight += dz.t() @ h.to(dz.dtype)
        return d_hidden, (d_weight.to(weight.dtype) if d_weight is not None else None), None, None, None


# -----------------------------------------------------------------------------
# CUDA path: the same chunks, logits GEMMs in cuBLAS, vocabulary-wide work in csrc/grpo_loss.cu

# Tokens per chunk of logits on the CUDA path (measured on an H100, benchmarks/NOTES_grpo_loss.md): the
# no-grad pass runs 633-652 TFLOP/s at 2048 (0.6 GB of bf16 logits at V 152064), 596-649 at 1024; with
# gradients, fewer chunks mean fewer passes over the fp32 d-weight, and 4096 stays under Liger's memory.
KERNEL_CHUNK, KERNEL_CHUNK_NO_GRAD = 4096, 2048
_EXT = None


def cuda_kernels():
    """csrc/'s extension, JIT-built (ninja + nvcc, cached by torch) on first use; None when it cannot be."""
    global _EXT
    if _EXT is None:
        try:
            from torch.utils.cpp_extension import load
            src = os.path.join(os.path.dirname(os.path.abspath(__file__)), "csrc")
            _EXT = load("safeladder_grpo_loss", [os.path.join(src, f) for f in ("bindings.cpp", "grpo_loss.cu")],
                        extra_include_paths=[src], extra_cflags=["-O3"], extra_cuda_cflags=["-O3"])
        except Exception as e:  # NOTE: a GPU machine without a working nvcc still trains, on the slow path
            warnings.warn(f"ops: CUDA kernels unavailable ({e}); using the PyTorch reference")
            _EXT = False
    return _EXT or None


def _use_kernels(hidden, weight):
    return (hidden.is_cuda and hidden.dtype in (torch.bfloat16, torch.float16, torch.float32)
            and weight.dtype == hidden.dtype and os.environ.get("SAFELADDER_NO_KERNELS") != "1"
            and cuda_kernels() is not None)


def _mm_fp32(a, b, acc=None):
    """a @ b with an fp32 result (bf16 operands stay on the tensor cores, fp32 accumulate), added in place
    into acc when given: one chunk's d-weight never passes through bf16."""
    if a.dtype == torch.float32:
        return a @ b if acc is None else acc.addmm_(a, b)
    if acc is None:
        return torch.mm(a, b, torch.float32)
    return torch.addmm(acc, a, b, torch.float32, out=acc)


class _TokenLogprobsCUDA(torch.autograd.Function):
    """_TokenLogprobs with each chunk's logits in one reused buffer of the input dtype; the kernels
    write lse, logp, entropy (forward) and d-logits over the buffer (backward). The target's one-hot
    gradient g / T is the largest term of a row, so it goes around the bf16 buffer, in fp32."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, temperature, chunk):
        ext, stream, (N, V) = cuda_kernels(), torch.cuda.current_stream().cuda_stream, (hidden.shape[0], weight.shape[0])
        logp, ent, lse = (torch.empty(N, dtype=torch.float32, device=hidden.device) for _ in range(3))
        z = torch.empty(min(chunk, N), V, dtype=hidden.dtype, device=hidden.device)  # (chunk, V) the one buffer
        for s in range(0, N, chunk):
            e = min(s + chunk, N)
            torch.mm(hidden[s:e], weight.t(), out=z[:e - s])
            ext.forward(z[:e - s], targets[s:e], 1.0 / temperature, logp[s:e], ent[s:e], lse[s:e], stream)
        ctx.save_for_backward(hidden, weight, targets, ent, lse)
        ctx.temperature, ctx.chunk = temperature, chunk
        ctx.z, ctx.z_start = z, (N - 1) // chunk * chunk  # the last chunk's logits: the backward starts there
        return logp, ent

    @staticmethod
    def backward(ctx, d_logp, d_ent):
        hidden, weight, targets, ent, lse = ctx.saved_tensors
        T, chunk, (N, V) = ctx.temperature, ctx.chunk, (hidden.shape[0], weight.shape[0])
        ext, stream = cuda_kernels(), torch.cuda.current_stream().cuda_stream
        g = torch.zeros_like(ent) if d_logp is None else d_logp.float().contiguous()
        e = torch.zeros_like(ent) if d_ent is None else d_ent.float().contiguous()
        d_hidden = torch.empty_like(hidden) if ctx.needs_input_grad[0] else None
        d_weight = None  # fp32, written by the first chunk's GEMM, then accumulated
        z, z_start = ctx.z, ctx.z_start
        if z is None:  # a second backward (retain_graph): the first one overwrote the buffer
            z, z_start = torch.empty(min(chunk, N), V, dtype=hidden.dtype, device=hidden.device), -1
        ctx.z = None
        for s in reversed(range(0, N, chunk)):
            h, t, dz, c = hidden[s:s + chunk], targets[s:s + chunk], z[:min(chunk, N - s)], g[s:s + chunk, None] / T
            if s != z_start:
                torch.mm(h, weight.t(), out=dz)                          # the forward's logits, recomputed
            ext.backward(dz, lse[s:s + chunk], ent[s:s + chunk], g[s:s + chunk], e[s:s + chunk], 1.0 / T, stream)
            if d_hidden is not None:
                d_hidden[s:s + chunk] = _mm_fp32(dz, weight) + c * weight[t].float()
            if ctx.needs_input_grad[1]:  # cuBLAS GEMM and a sort-based index_put_: deterministic
                d_weight = _mm_fp32(dz.t(), h, acc=d_weight)
                d_weight.index_put_((t,), c * h.float(), accumulate=True)
        del z, dz
        return d_hidden, (d_weight.to(weight.dtype) if d_weight is not None else None), None, None, None


def token_logprobs(hidden, weight, targets, temperature=1.0, chunk=None):
    """hidden (N, H), weight (V, H), targets (N,) -> fp32 (fp64 for fp64 inputs) log-probs (N,) and entropies (N,) of
    softmax(hidden @ weight.T / temperature). Differentiable in hidden and weight. chunk: tokens per chunk
    of logits (default CHUNK; on the CUDA path KERNEL_CHUNK, KERNEL_CHUNK_NO_GRAD without gradients)."""
    if _use_kernels(hidden, weight):
        if chunk is None:
            grad = torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad)
            chunk = KERNEL_CHUNK if grad else KERNEL_CHUNK_NO_GRAD
        return _TokenLogprobsCUDA.apply(hidden.contiguous(), weight.contiguous(), targets.long().contiguous(),
                                        float(temperature), int(chunk))
    return _TokenLogprobs.apply(hidden, weight, targets, float(temperature), int(chunk or CHUNK))


def token_logprobs_naive(hidden, weight, targets, temperature=1.0):
    """The same from fully materialised fp32 logits: the test oracle."""
    dtype = torch.promote_types(hidden.dtype, torch.float32)
    z = (hidden.to(dtype) @ weight.to(dtype).t()) / temperature
    log_p = torch.log_softmax(z, dim=-1)
    return log_p.gather(1, targets[:, None])[:, 0], -(log_p.exp() * log_p).sum(-1)


# -----------------------------------------------------------------------------
# Policy losses (per token), KL estimators, aggregation

LOSSES = ("cpgd", "ppo", "gspo")
KLS = ("k1", "k2", "k3")
AGGS = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm")


def _segment_sum(x, seq_ids, n):
    return torch.zeros(n, dtype=x.dtype, device=x.device).index_add_(0, seq_ids, x)


def aggregate(x, mask, seq_ids=None, agg="token-mean", norm_len=None):
    """Reduce per-token values to the loss (VeRL's loss_agg_mode names):
    token-mean               sum over all tokens / number of tokens (DAPO)
    seq-mean-token-mean      mean over sequences of each sequence's token mean (GRPO as published)
    seq-mean-token-sum       mean over sequences of each sequence's token sum
    seq-mean-token-sum-norm  token sums divided by one constant (norm_len, default the longest
                             sequence), mean over sequences: Dr.GRPO's unbiased form (arXiv 2503.20783)."""
    mask = mask.float()
    if agg == "token-mean":
        return (x * mask).sum() / mask.sum().clamp(min=1)
    if seq_ids is None:
        raise ValueError(f"agg={agg!r} needs seq_ids")
    ids, seq = torch.unique(seq_ids, return_inverse=True)
    n = len(ids)
    sums = _segment_sum(x * mask, seq, n)
    counts = _segment_sum(mask, seq, n)
    if agg == "seq-mean-token-mean":
        return (sums / counts.clamp(min=1)).mean()
    if agg == "seq-mean-token-sum":
        return sums.mean()
    if agg == "seq-mean-token-sum-norm":
        return (sums / (norm_len or counts.max().clamp(min=1))).mean()
    raise ValueError(f"unknown agg {agg!r}; choose one of {AGGS}")


def kl_penalty(logp, logp_ref, kind="k3"):
    """Estimators of KL(pi || pi_ref) from d = logp - logp_ref (Schulman, 'Approximating KL', 2020):
    k1 = d, k2 = d^2 / 2, k3 = exp(-d) - 1 + d (unbiased, always >= 0)."""
    d = logp - logp_ref
    if kind == "k1":
        return d
    if kind == "k2":
        return 0.5 * d * d
    if kind == "k3":
        return torch.exp(-d) - 1 + d
    raise ValueError(f"unknown kl {kind!r}; choose one of {KLS}")


def policy_terms(logp, logp_old, adv, *, seq_ids=None, loss="cpgd", eps_low=0.2, eps_high=0.2,
                 drift_coef=0.01, drift_clip=2.0):
    """Per-token policy loss and whether clipping was active.
    cpgd  CPGD (arXiv 2505.12504): the clipped log-ratio term Phi = min(l A, clip(l, ln(1-eps_low),
          ln(1+eps_high)) A), l = logp - logp_old, with no exponentiated ratio; plus the policy-drift
          term drift_coef * min(sg(exp(l)) - 1, drift_clip) * logp. loss = -Phi + drift.
    ppo   PPO-clip on the ratio r = exp(l): -min(r A, clip(r, 1-eps_low, 1+eps_high) A); eps_high >
          eps_low is DAPO's clip-higher (arXiv 2503.14476).
    gspo  GSPO (arXiv 2507.18071): one ratio per sequence, the geometric mean of its token ratios,
          clipped like PPO; each token carries it with the gradient of its own log-prob."""
    l = logp - logp_old
    if loss == "cpgd":
        clipped = l.clamp(math.log(1 - eps_low), math.log(1 + eps_high))
        pg = -torch.minimum(l * adv, clipped * adv)
        drift = torch.clamp(torch.exp(l).detach() - 1, max=drift_clip) * logp
        return pg + drift_coef * drift, (l * adv > clipped * adv)
    if loss == "ppo":
        r = torch.exp(l)
        clipped = r.clamp(1 - eps_low, 1 + eps_high)
        return -torch.minimum(r * adv, clipped * adv), (r * adv > clipped * adv)
    if loss == "gspo":
        if seq_ids is None:
            raise ValueError("loss='gspo' needs seq_ids")
        _, seq = torch.unique(seq_ids, return_inverse=True)
        n = int(seq.max()) + 1
        mean_l = _segment_sum(l, seq, n) / _segment_sum(torch.ones_like(l), seq, n)
        s = torch.exp(mean_l[seq].detach() + logp - logp.detach())  # value: sequence ratio; grad: d logp
        clipped = s.clamp(1 - eps_low, 1 + eps_high)
        return -torch.minimum(s * adv, clipped * adv), (s * adv > clipped * adv)
    raise ValueError(f"unknown loss {loss!r}; choose one of {LOSSES}")


def policy_loss(hidden, weight, targets, advantages, logp_old, mask, *, seq_ids=None, logp_ref=None,
                loss="cpgd", eps_low=0.2, eps_high=0.2, drift_coef=0.01, drift_clip=2.0, kl_coef=0.0, kl="k3",
                entropy_coef=0.0, agg="token-mean", temperature=1.0, norm_len=None, chunk=None):
    """The RL policy loss from hidden states. hidden (N, H), weight (V, H), targets / advantages /
    logp_old / mask / seq_ids / logp_ref (N,). Returns (loss, metrics): the loss adds kl_coef * KL to
    logp_ref (when given) and subtracts entropy_coef * entropy; metrics hold the clip fraction, the
    mean ratio, KL, entropy and the per-token log-probs (detached)."""
    logp, entropy = token_logprobs(hidden, weight, targets, temperature, chunk)
    token_loss, clipped = policy_terms(logp, logp_old, advantages, seq_ids=seq_ids, loss=loss, eps_low=eps_low,
                                       eps_high=eps_high, drift_coef=drift_coef, drift_clip=drift_clip)
    metrics = {}
    if logp_ref is not None:
        k = kl_penalty(logp, logp_ref, kl)
        metrics["kl"] = aggregate(k.detach(), mask, seq_ids, "token-mean")
        if kl_coef:
            token_loss = token_loss + kl_coef * k
    if entropy_coef:
        token_loss = token_loss - entropy_coef * entropy
    total = aggregate(token_loss, mask, seq_ids, agg, norm_len)
    with torch.no_grad():
        metrics.update(
            clip_frac=aggregate(clipped.float(), mask, seq_ids, "token-mean"),
            ratio_mean=aggregate(torch.exp(logp - logp_old), mask, seq_ids, "token-mean"),
            entropy=aggregate(entropy, mask, seq_ids, "token-mean"),
            logp=logp.detach())
    return total, metrics
