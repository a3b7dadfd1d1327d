"""
Training-step speed of our model through parallel.py on one GPU, beside transformers' Qwen2ForCausalLM.

Qwen2.5-1.5B text shapes (hidden 1536, 28 layers, 12 heads / 2 kv heads, vocab 151936, tied), a batch of
2 x 4096 tokens, fp32 master weights with bf16 compute and fp32 gradient reduction, fused AdamW:

    python benchmarks/bench_train.py                        # one GPU: ours, then transformers
    python benchmarks/bench_train.py --hidden=256 --inter=512 --layers=2 --heads=4 --kv_heads=2 \\
        --vocab=4096 --seq=256 --steps=2 --warmup=1 --compile=false    # CPU smoke run

Ours: model.build -> parallel.apply_compile (per block) -> parallel.apply_fsdp (world size 1), the loss
through the model's `head=` hook as a fused linear cross-entropy (no [tokens x vocab] logits kept).
transformers: the same shapes, fp32 weights under bf16 autocast, SDPA attention, full logits + fp32 CE.
MFU = (6 N + 12 L H T) tokens/s / peak, N = the matmul parameters (blocks + lm_head), the second
term the attention scores and values (PaLM, arXiv 2204.02311 appendix B; torchtitan counts the same).
Results and the command go to benchmarks/NOTES_train.md by hand; only measured numbers.
"""
import gc
import json
import os
import sys
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import model  # noqa: E402
import parallel  # noqa: E402


@dataclass
class BenchConfig:
    hidden: int = 1536
    inter: int = 8960
    layers: int = 28
    heads: int = 12
    kv_heads: int = 2
    vocab: int = 151936
    batch: int = 2
    seq: int = 4096
    steps: int = 10              # timed steps
    warmup: int = 3              # untimed steps first (compilation, allocator)
    compile: bool = True         # torch.compile each block (parallel.apply_compile) and the loss
    ac: bool = False             # activation checkpointing (not needed at this size)
    loss_chunk: int = 8192       # tokens per chunk of the fused cross-entropy
    reshard: bool = False        # FSDP reshard_after_forward; one GPU has nothing to free, True re-gathers
                                 # every block in backward (~15-20 ms more per step, NOTES_train.md)
    peak_tflops: float = 989.0   # H100 SXM dense bf16
    hf: bool = True              # also time transformers' Qwen2ForCausalLM (skipped if not installed)
    out: str = ""                # optional json file for the results
    profile: str = ""            # write a torch.profiler kernel table of 2 more steps of ours here


def _ce_and_grad(logits, y, n):
    """Cross-entropy summed over a chunk / n, and its gradient wrt the logits (softmax - onehot) / n."""
    x = logits.float()
    lse = x.logsumexp(-1, keepdim=True)
    onehot = torch.arange(x.shape[-1], device=x.device) == y[:, None]
    loss = (lse[:, 0] - (x * onehot).sum(-1)).sum() / n
    return loss, ((x - lse).exp() - onehot.float()).div(n).to(logits.dtype)


class FusedLinearCE(torch.autograd.Function):
    """mean CE(h @ w.T, y) that never holds all the logits: each chunk's logits become the loss and
    the gradients wrt h and w at once, in forward (the idea of Liger-Kernel's fused linear
    cross-entropy). h (N, H), w (V, H), y (N,) -> scalar."""

    @staticmethod
    def forward(ctx, h, w, y, chunk, ce):
        n, gh, gw = h.shape[0], torch.empty_like(h), torch.zeros(w.shape, dtype=torch.float32, device=w.device)
        loss = torch.zeros((), dtype=torch.float32, device=h.device)
        for s in range(0, n, chunk):
            hc = h[s:s + chunk]
            l, g = ce(hc @ w.T, y[s:s + chunk], n)  # g (chunk, V)
            loss += l
            gh[s:s + chunk] = g @ w
            gw += (g.T @ hc).float()
        ctx.save_for_backward(gh, gw.to(w.dtype))
        return loss

    @staticmethod
    def backward(ctx, go):
        gh, gw = ctx.saved_tensors
        return gh * go, gw * go, None, None, None


def check_fused_ce(dev, ce):
    """Validate before timing: the fused loss and its gradients against plain cross-entropy (fp32)."""
    g = torch.Generator(device=dev).manual_seed(0)
    h = torch.randn(300, 64, device=dev, generator=g, requires_grad=True)
    w = torch.randn(1000, 64, device=dev, generator=g, requires_grad=True)
    y = torch.randint(0, 1000, (300,), device=dev, generator=g)
    F.cross_entropy(h @ w.T, y).backward()
    want = (h.grad, w.grad)
    h.grad = w.grad = None
    FusedLinearCE.apply(h, w, y, 128, ce).backward()
    for a, b in zip((h.grad, w.grad), want):
        assert ((a - b).norm() / b.norm()).item() < 1e-4, "fused cross-entropy disagrees with F.cross_entropy"


def qwen_config(c):
    cfg = model.ModelConfig(vocab_size=c.vocab, hidden_size=c.hidden, intermediate_size=c.inter,
                            num_hidden_layers=c.layers, num_attention_heads=c.heads, num_key_value_heads=c.kv_heads,
                            tie_word_embeddings=True)
    hd = c.hidden // c.heads  # M-RoPE sections over head_dim / 2 pairs, Qwen's 1:1.5:1.5 split
    cfg.mrope_section = (hd // 8, hd * 3 // 16, hd // 2 - hd // 8 - hd * 3 // 16)
    # the text benchmark never calls the vision tower: make it small and frozen
    cfg.vision = model.VisionConfig(depth=1, hidden_size=64, intermediate_size=64, num_heads=1,
                                    out_hidden_size=c.hidden)
    return cfg


def time_steps(step, c, dev):
    for _ in range(c.warmup):
        step()
    if dev.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    losses = [step() for _ in range(c.steps)]
    loss = float(losses[-1])  # reading it waits for the GPU
    if dev.type == "cuda":
        torch.cuda.synchronize()
    dt = (time.perf_counter() - t0) / c.steps
    mem = torch.cuda.max_memory_allocated() / 2 ** 30 if dev.type == "cuda" else 0.0
    return dt, loss, mem


def bench_ours(c, d, ids):
    m = model.build(qwen_config(c), device=d.device)  # fp32 master weights
    m.visual.requires_grad_(False)
    if c.ac:
        parallel.apply_ac(m)
    if c.compile:
        parallel.apply_compile(m)
    parallel.apply_fsdp(m, parallel.make_mesh(d), param_dtype=torch.bfloat16, reduce_dtype=torch.float32,
                        reshard_after_forward=c.reshard)
    params = [p for p in m.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.1, fused=d.device.type == "cuda")
    ce = torch.compile(_ce_and_grad, dynamic=False) if c.compile else _ce_and_grad
    check_fused_ce(d.device, ce)
    x, y = ids[:, :-1], ids[:, 1:].flatten()

    def head(h, w):  # inside forward: w is lm_head's gathered bf16 weight
        return FusedLinearCE.apply(h.flatten(0, 1), w, y, c.loss_chunk, ce)

    def step():
        loss = m(x, head=head)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.detach()

    n_matmul = sum(p.numel() for p in m.llm.layers.parameters()) + c.vocab * c.hidden
    result = time_steps(step, c, d.device)
    if c.profile:
        from torch.profiler import ProfilerActivity, profile
        cuda = d.device.type == "cuda"
        with profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])) as prof:
            for _ in range(2):
                float(step())
        with open(c.profile, "w") as f:
            f.write(prof.key_averages().table(sort_by="cuda_time_total" if cuda else "cpu_time_total",
                                              row_limit=60, max_name_column_width=90))
    del m, opt
    return result, n_matmul


def bench_hf(c, dev, ids):
    from transformers import Qwen2Config, Qwen2ForCausalLM
    cfg = Qwen2Config(vocab_size=c.vocab, hidden_size=c.hidden, intermediate_size=c.inter,
                      num_hidden_layers=c.layers, num_attention_heads=c.heads, num_key_value_heads=c.kv_heads,
                      tie_word_embeddings=True, rope_theta=1e6, max_position_embeddings=32768)
    cfg._attn_implementation = "sdpa"
    hf = Qwen2ForCausalLM(cfg).to(dev)  # fp32 weights, bf16 autocast
    opt = torch.optim.AdamW(hf.parameters(), lr=1e-4, weight_decay=0.1, fused=dev.type == "cuda")
    x = ids[:, :-1]

    def step():
        with torch.autocast(dev.type, dtype=torch.bfloat16):
            logits = hf(input_ids=x).logits
        loss = F.cross_entropy(logits.flatten(0, 1).float(), ids[:, 1:].flatten())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(hf.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.detach()

    result = time_steps(step, c, dev)
    del hf, opt
    return result


def main(c):
    d = parallel.init_distributed()
    torch.manual_seed(0)
    ids = torch.randint(0, c.vocab, (c.batch, c.seq + 1), device=d.device)
    tokens = c.batch * c.seq
    rows = []
    (dt, loss, mem), n = bench_ours(c, d, ids)
    flops = (6 * n + 12 * c.layers * c.hidden * c.seq) * tokens
    label = f"ours: {'apply_compile + ' if c.compile else ''}apply_fsdp (reshard {c.reshard}), CE chunk {c.loss_chunk}"
    rows.append((label, dt, loss, mem))
    gc.collect()
    if d.device.type == "cuda":
        torch.cuda.empty_cache()
    if c.hf:
        try:
            rows.append(("transformers Qwen2ForCausalLM, autocast bf16, sdpa", *bench_hf(c, d.device, ids)))
        except ImportError:
            print("transformers is not installed: its row is skipped")
    name = torch.cuda.get_device_name() if d.device.type == "cuda" else "cpu"
    print(f"\n{name}, torch {torch.__version__}; {c.batch} x {c.seq} tokens, {c.layers} layers, hidden {c.hidden}, "
          f"N = {n / 1e9:.3f}B matmul params, {flops / tokens / 1e9:.2f} GFLOP/token, peak {c.peak_tflops} TFLOP/s")
    print(f"| {'run':<52} | {'ms/step':>8} | {'tokens/s':>9} | {'MFU':>6} | {'peak GiB':>8} | {'loss':>7} |")
    print(f"|{'-' * 54}|{'-' * 10}|{'-' * 11}|{'-' * 8}|{'-' * 10}|{'-' * 9}|")
    results = []
    for label, dt, loss, mem in rows:
        mfu = flops / dt / (c.peak_tflops * 1e12)
        print(f"| {label:<52} | {dt * 1e3:8.1f} | {tokens / dt:9.0f} | {mfu:6.1%} | {mem:8.1f} | {loss:7.3f} |")
        results.append({"run": label, "ms_per_step": dt * 1e3, "tokens_per_s": tokens / dt, "mfu": mfu,
                        "peak_gib": mem, "loss": loss})
    if c.out:
        with open(c.out, "w") as f:
            json.dump({"device": name, "torch": torch.__version__, "config": vars(c), "results": results}, f, indent=1)


if __name__ == "__main__":
    main(model.configure(BenchConfig()))
