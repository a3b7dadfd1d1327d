"""
Sampler throughput on Qwen2.5-7B text shapes (random bf16 weights, model.build on cuda), with
transformers' generate (sdpa, dynamic cache) in the same run as the anchor. GPU only.

    python benchmarks/bench_sampler.py                       # every row
    python benchmarks/bench_sampler.py --hf=false --batches=64
    python benchmarks/bench_sampler.py --device=cpu --model=tiny --batches=4 --prompt=16 --new=8 --groups=2 --samples=2
                                                             # smoke run of the script itself, no GPU

Rows: 64 and 256 sequences, prompt 256, 256 new tokens, T=1 (tokens/s end to end, prefill included);
32 prompts x 8 samples sharing prefixes; the decode step against the HBM roofline (all weights read
once plus the K/V so far, at the device-to-device copy bandwidth measured here); the captured decode
forward alone (graph replay), which separates device time from the engine's host work; the paged
attention kernel alone against the same bandwidth. Outputs are compared before anything is timed:
greedy sampler tokens vs the model's own dense-cache greedy decode, and sampler log-probs vs a full
forward (the trainer's view).
"""
import os
import statistics
import sys
import time
from dataclasses import dataclass

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import model  # noqa: E402
import sampler  # noqa: E402


@dataclass
class BenchConfig:
    model: str = "qwen2.5-vl-7b"   # preset whose text shapes are used
    batches: str = "64,256"        # sequences per run
    prompt: int = 256
    new: int = 256
    groups: int = 32               # shared-prefix row: `groups` prompts x `samples` samples
    samples: int = 8
    kv_gb: float = 16.0            # KV cache of the sampler
    hf: bool = True                # transformers generate rows (skipped when not installed)
    attention: bool = True         # paged attention kernel alone
    seed: int = 0
    device: str = "cuda"           # cpu: a smoke run of this script (timings meaningless)


def cuda_time(fn, reps=20, warmup=3):
    """Median milliseconds of fn() between CUDA events (wall clock on CPU)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        if not torch.cuda.is_available():
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
            continue
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b))
    return statistics.median(times)


def sync(dev):
    if dev.type == "cuda":
        torch.cuda.synchronize()


def peak_gib(dev):
    return torch.cuda.max_memory_allocated() / 2 ** 30 if dev.type == "cuda" else float("nan")


def copy_bandwidth(dev):
    x = torch.randn(1 << 29 if dev.type == "cuda" else 1 << 24, device=dev, dtype=torch.bfloat16)  # 1 GiB on GPU
    y = torch.empty_like(x)
    ms = cuda_time(lambda: y.copy_(x))
    return 2 * x.numel() * 2 / (ms * 1e-3)  # bytes read + written per second


def requests(n, cfg, prompt, new, samples=1, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        ids = torch.randint(0, cfg.vocab_size - 1000, (prompt,), generator=g).tolist()
        out += [sampler.Request(ids, sampler.SamplingParams(temperature=1.0, max_tokens=new, seed=i * samples + j))
                for j in range(samples)]
    return out


def main(c):
    torch.manual_seed(c.seed)
    dev = torch.device(c.device)
    print(f"device: {torch.cuda.get_device_name() if dev.type == 'cuda' else 'cpu'}, torch {torch.__version__}")
    bw = copy_bandwidth(dev)
    print(f"device-to-device copy: {bw / 1e12:.2f} TB/s (read + write)")

    # ---- model and correctness before timing
    m = model.build(c.model, device=dev, dtype=torch.bfloat16).eval()
    cfg = m.cfg
    weight_bytes = sum(p.numel() * p.element_size() for n, p in m.named_parameters()
                       if not n.startswith("visual.") and n != "llm.embed_tokens.weight")
    if cfg.tie_word_embeddings:
        weight_bytes += m.lm_head.weight.numel() * m.lm_head.weight.element_size()
    kv_per_token = 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * cfg.head_dim * 2
    smp = sampler.Sampler(m, kv_cache_bytes=int(c.kv_gb * 2 ** 30), max_batch=max(256, c.groups * c.samples))
    smp._ensure_cache()
    print(f"kernels: {type(smp.cache.ops).__name__}; KV cache {smp.num_blocks} blocks of {smp.block_size}")

    g = torch.Generator().manual_seed(1)
    prompts = torch.randint(0, cfg.vocab_size - 1000, (4, 64), generator=g)
    dense = model.generate(m, prompts.to(dev), max_new_tokens=32)
    greedy = smp.generate([sampler.Request(p.tolist(), sampler.SamplingParams(temperature=0, max_tokens=32))
                           for p in prompts])
    agree = []
    for row, r in zip(dense.tolist(), greedy):
        agree.append(next((i for i, (a, b) in enumerate(zip(row, r.token_ids)) if a != b), len(row)))
    print(f"greedy vs model.generate (dense cache), 4 x 32 tokens: identical prefix lengths {agree}")
    sampled = smp.generate(requests(8, cfg, 64, 32, seed=2))
    gaps = []
    for req, r in zip(requests(8, cfg, 64, 32, seed=2), sampled):
        with torch.no_grad():
            logits = m(torch.tensor([req.prompt_ids + r.token_ids], device=dev))[0, 63:-1].float()
        lp = torch.log_softmax(logits, -1).gather(1, torch.tensor(r.token_ids, device=dev)[:, None])[:, 0]
        gaps.append((torch.tensor(r.logprobs, device=dev) - lp).abs())
    gaps = torch.cat(gaps)
    print(f"log-prob gap sampler vs full forward (bf16), 8 x 32 sampled tokens: mean {gaps.mean():.4f} "
          f"max {gaps.max():.4f}")

    # ---- throughput rows
    def profile_replay(graph, reps=3):
        """Kernels inside one captured decode step: how many, and where the device time goes."""
        try:
            from torch.profiler import ProfilerActivity, profile
            with profile(activities=[ProfilerActivity.CUDA]) as prof:
                for _ in range(reps):
                    graph.replay()
                torch.cuda.synchronize()
            ev = prof.key_averages()
            n = sum(e.count for e in ev) / reps
            total = sum(e.device_time_total for e in ev) / reps
            print(f"  one decode step: {n:.0f} kernels, {total / 1e3:.2f} ms of kernel time; top kernels:")
            for e in sorted(ev, key=lambda e: -e.device_time_total)[:10]:
                print(f"    {e.device_time_total / reps / 1e3:7.3f} ms  {e.count // reps:5d}x  {e.key[:90]}")
        except Exception as e:  # the profile is a diagnosis, never a reason to lose the numbers
            print(f"  (profile failed: {e})")

    def run(name, reqs, shared=False, profile=False):
        n_seqs = len(reqs)
        smp.generate([sampler.Request(r.prompt_ids, sampler.SamplingParams(temperature=1.0, max_tokens=4, seed=1))
                      for r in reqs])  # warm-up: graph capture for this batch size
        sync(dev)
        if dev.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        res = smp.generate(reqs)
        sync(dev)
        dt = time.perf_counter() - t0
        new, st = sum(len(r.token_ids) for r in res), smp.stats
        step = statistics.median(st["decode_step_s"])
        gen = c.new / 2 + 1  # mean generated tokens in the cache over the decode steps
        prompts = c.groups if shared else n_seqs  # shared prompts are stored (and ideally read) once
        floor = (weight_bytes + (c.prompt * prompts + gen * n_seqs) * kv_per_token) / bw
        replay, graph = float("nan"), None
        if smp.graphs is not None and smp.graphs.bucket(n_seqs) in smp.graphs.graphs:
            graph = smp.graphs.graphs[smp.graphs.bucket(n_seqs)][0]
            replay = cuda_time(graph.replay) * 1e-3
        print(f"{name:30s} {new / dt:7.0f} tok/s ({new} tokens in {dt:.2f} s, prefill {st['prefill_s']:.2f} s) | "
              f"decode step {step * 1e3:.2f} ms, graph replay alone {replay * 1e3:.2f} ms, "
              f"roofline {floor * 1e3:.2f} ms "
              f"-> step at {floor / step:.0%} of roofline (replay {floor / replay:.0%}) | "
              f"peak KV {st['peak_blocks'] * smp.block_bytes / 2 ** 30:.2f} GiB, peak memory "
              f"{peak_gib(dev):.1f} GiB, preemptions {st['preemptions']}")
        if profile and graph is not None:
            profile_replay(graph)
        return new / dt

    ours = {}
    for B in [int(x) for x in c.batches.split(",")]:
        ours[B] = run(f"ours, {B} seqs", requests(B, cfg, c.prompt, c.new, seed=10 + B), profile=True)
    run(f"ours, {c.groups} prompts x {c.samples} shared", requests(c.groups, cfg, c.prompt, c.new, c.samples, 3), True)

    # ---- paged attention kernel alone
    if c.attention and isinstance(smp.cache.ops, sampler.KernelOps):
        ops, nkv, nh, hd = smp.cache.ops, cfg.num_key_value_heads, cfg.num_attention_heads, cfg.head_dim
        for B, ctx in ((64, 1024), (64, 4096), (256, 1024)):
            width = ctx // 16
            sets = []
            for _ in range(2):  # two cache sets, so repeated calls do not read from L2
                kc = torch.randn(B * width + 1, nkv, 16, hd, device=dev, dtype=torch.bfloat16)
                tables = torch.randperm(B * width, device=dev, dtype=torch.int32).view(B, width)
                sets.append((torch.randn(B, nh, hd, device=dev, dtype=torch.bfloat16), kc, kc.clone(), tables))
            lens = torch.full((B,), ctx, device=dev, dtype=torch.int32)
            i = [0]

            def call():
                i[0] ^= 1
                q, kc, vc, t = sets[i[0]]
                ops.paged_attention(q, kc, vc, t, lens, hd ** -0.5)
            chosen = ops.tensor_cores
            for ops.tensor_cores in (False, True):  # CUDA-core kernel, tensor-core (mma.sync) kernel
                q, kc, vc, t = sets[0]
                want = sampler.paged_attention_ref(q, kc, vc, t, lens, hd ** -0.5)
                ops.paged_attention(q, kc, vc, t, lens, hd ** -0.5)  # warm-up, and a check before timing
                err = (ops.paged_attention(q, kc, vc, t, lens, hd ** -0.5).float() - want.float()).abs().max().item()
                ms = cuda_time(call, reps=50)
                gb = B * ctx * nkv * hd * 2 * 2
                print(f"paged attention alone ({'tensor cores' if ops.tensor_cores else 'CUDA cores'}), {B} seqs x "
                      f"{ctx} ctx: {ms * 1e3:.1f} us, {gb / (ms * 1e-3) / 1e12:.2f} TB/s = {gb / (ms * 1e-3) / bw:.0%} "
                      f"of copy bandwidth (splits {ops.ext.num_splits(B, nh, nkv, width, ops.tensor_cores)}, "
                      f"max |err| vs reference {err:.1e})")
            ops.tensor_cores = chosen  # the engine's choice, for what follows
            del sets

    # ---- transformers generate, same shapes
    del smp
    if c.hf and dev.type == "cuda":
        try:
            import transformers
        except ImportError:
            print("transformers not installed: skipping its rows")
            return
        del m
        torch.cuda.empty_cache()
        hcfg = transformers.Qwen2Config(
            vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
            num_hidden_layers=cfg.num_hidden_layers, num_attention_heads=cfg.num_attention_heads,
            num_key_value_heads=cfg.num_key_value_heads, rope_theta=cfg.rope_theta, max_position_embeddings=32768,
            tie_word_embeddings=cfg.tie_word_embeddings, attn_implementation="sdpa")
        torch.set_default_dtype(torch.bfloat16)
        with torch.device(dev):
            hf = transformers.Qwen2ForCausalLM(hcfg).eval()
        torch.set_default_dtype(torch.float32)
        print(f"transformers {transformers.__version__}")
        for B in ours:
            ids = torch.randint(0, cfg.vocab_size - 1000, (B, c.prompt), device=dev)
            kw = dict(do_sample=True, temperature=1.0, top_k=0, top_p=1.0, pad_token_id=0, eos_token_id=None)
            with torch.no_grad():
                hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=4, **kw)
                sync(dev)
                torch.cuda.reset_peak_memory_stats()
                t0 = time.perf_counter()
                out = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=c.new, **kw)
                sync(dev)
            dt = time.perf_counter() - t0
            new = (out.shape[1] - c.prompt) * B
            print(f"transformers generate, {B} seqs       {new / dt:9.0f} tok/s  ({new} tokens in {dt:.2f} s) | "
                  f"ours / theirs = {ours[B] / (new / dt):.2f}x | peak memory "
                  f"{peak_gib(dev):.1f} GiB")


if __name__ == "__main__":
    main(model.configure(BenchConfig()))
