"""sampler.py and csrc/{paged_attention,sampling}.cu: the engine against repeated full forwards of
model.py, each kernel against its pure-PyTorch reference, sampling against the distribution it
promises. CPU tests run everywhere in seconds; CUDA tests run when a GPU is present; the nvcc compile
check runs when nvcc is on PATH."""
import dataclasses
import os
import shutil
import subprocess

import pytest
import torch
import torch.nn.functional as F

import model
import sampler
from sampler import Request, SamplingParams

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def odd_model(std=0.2, device="cpu"):
    """A small model with awkward sizes (vocab 1000, head_dim 24, 6 query heads over 2 kv heads) and
    weights large enough that greedy decoding does not collapse into one repeated token."""
    c = model.get_config("tiny")
    cfg = dataclasses.replace(
        c, vocab_size=1000, hidden_size=144, intermediate_size=200, num_hidden_layers=3, num_attention_heads=6,
        num_key_value_heads=2, mrope_section=(4, 4, 4), bos_token_id=989, eos_token_id=990,
        vision_start_token_id=991, vision_end_token_id=992, image_token_id=993, video_token_id=994,
        vision=dataclasses.replace(c.vision, out_hidden_size=144))
    m = model.build(cfg, device=device)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model.init_weights(m, std=std)
    return m.eval()


@pytest.fixture(scope="module")
def m():
    return odd_model()


def image_prompt(cfg, text_before, text_after, grid=(1, 4, 6), seed=0):
    """Prompt ids with one image between two runs of text, and its random pixel_values / grid."""
    g = torch.Generator().manual_seed(seed)
    t, h, w = grid
    v = cfg.vision
    n_tok = t * h * w // v.spatial_merge_size ** 2
    ids = (text_before + [cfg.vision_start_token_id] + [cfg.image_token_id] * n_tok + [cfg.vision_end_token_id]
           + text_after)
    px = torch.randn(t * h * w, v.in_chans * v.temporal_patch_size * v.patch_size ** 2, generator=g)
    return ids, px, torch.tensor([grid])


def full_forward_greedy(m, req, n):
    """The oracle: n greedy tokens, each from a full forward of model.py over prompt + tokens so far.
    NOTE: stops early after an <|image_pad|> id, which a full forward with images cannot take as text."""
    ids, out, logps = list(req.prompt_ids), [], []
    dev = next(m.parameters()).device
    px = None if req.pixel_values is None else req.pixel_values.to(dev)
    grid = None if req.image_grid_thw is None else req.image_grid_thw.to(dev)
    with torch.no_grad():
        for _ in range(n):
            logits = m(torch.tensor([ids + out], device=dev), px, grid)[0, -1].float()
            out.append(int(logits.argmax()))
            logps.append(float(torch.log_softmax(logits, -1)[out[-1]]))
            if out[-1] == m.cfg.image_token_id and px is not None:
                break
    return out, logps


def assert_greedy_matches(m, reqs, results, atol=1e-4):
    for req, res in zip(reqs, results):
        want, want_logp = full_forward_greedy(m, req, req.params.max_tokens)
        k = len(want)
        assert res.token_ids[:k] == want and (k < req.params.max_tokens or res.finish_reason == "length")
        torch.testing.assert_close(torch.tensor(res.logprobs[:k]), torch.tensor(want_logp), atol=atol, rtol=0)


def rand_ids(n, seed, vocab=980):
    return torch.randint(0, vocab, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def mixed_requests(m, max_tokens=10):
    cfg = m.cfg
    greedy = SamplingParams(temperature=0.0, max_tokens=max_tokens)
    reqs = [Request(rand_ids(n, seed=n), greedy) for n in (1, 6, 23, 40)]
    ids, px, grid = image_prompt(cfg, rand_ids(5, 1), rand_ids(4, 2))
    reqs.append(Request(ids, SamplingParams(temperature=0.0, max_tokens=max_tokens), px, grid))
    ids, px, grid = image_prompt(cfg, rand_ids(3, 3), [], grid=(1, 6, 4), seed=1)  # ends with the image
    reqs.append(Request(ids, SamplingParams(temperature=0.0, max_tokens=max_tokens - 3), px, grid))
    return reqs


# -----------------------------------------------------------------------------
# Engine: greedy through the sampler == greedy by repeated full forwards


def test_greedy_matches_full_forward(m):
    reqs = mixed_requests(m)
    smp = sampler.Sampler(m, block_size=4)
    assert_greedy_matches(m, reqs, smp.generate(reqs))
    assert smp.stats["preemptions"] == 0


def test_preemption_recomputes_exactly(m):
    reqs = mixed_requests(m, max_tokens=14)
    free = sampler.Sampler(m, block_size=4).generate(reqs)
    tight = sampler.Sampler(m, block_size=4, num_blocks=24)  # far fewer blocks than the batch needs
    results = tight.generate(reqs)
    assert tight.stats["preemptions"] > 0
    assert [r.token_ids for r in results] == [r.token_ids for r in free]
    for a, b in zip(results, free):
        torch.testing.assert_close(torch.tensor(a.logprobs), torch.tensor(b.logprobs), atol=1e-4, rtol=0)
    assert tight.bm.used == 0  # every block returned


def test_preempted_image_sequence_replays_image_pad_tokens():
    """A recomputed response that holds <|image_pad|> ids cannot go through one prefill (model.embed
    would take them for image slots); the engine prefills the prompt and replays the response through
    decode steps. Sampled results equal the unpreempted run."""
    m = odd_model()
    cfg = m.cfg
    with torch.no_grad():
        m.lm_head.weight[cfg.image_token_id] *= 6  # make <|image_pad|> a frequent output
    ids, px, grid = image_prompt(cfg, rand_ids(4, 5), rand_ids(2, 6))
    reqs = [Request(ids, SamplingParams(temperature=1.0, max_tokens=16, seed=g), px, grid) for g in range(3)]
    reqs += [Request(rand_ids(9, 9), SamplingParams(temperature=1.0, max_tokens=16, seed=9))]
    roomy = sampler.Sampler(m, block_size=4).generate(reqs)
    assert any(cfg.image_token_id in r.token_ids for r in roomy)
    tight = sampler.Sampler(m, block_size=4, num_blocks=16)
    prefill_len, replays = tight._prefill_len, []
    tight._prefill_len = lambda s: replays.append(prefill_len(s) < len(s.tokens)) or prefill_len(s)
    results = tight.generate(reqs)
    assert tight.stats["preemptions"] > 0 and any(replays)
    assert [r.token_ids for r in results] == [r.token_ids for r in roomy]


# -----------------------------------------------------------------------------
# Prefix sharing: one copy of the prompt's blocks, identical results


def test_prefix_sharing_counts_blocks_and_matches_independent(m):
    P, G, bs, new = 37, 4, 16, 8
    prompt = rand_ids(P, 11)
    reqs = [Request(prompt, SamplingParams(temperature=1.0, top_k=50, max_tokens=new, seed=100 + g)) for g in range(G)]
    smp = sampler.Sampler(m, block_size=bs)
    shared = smp.generate(reqs)
    # full prompt blocks once; per sample the copy of the partly filled block holding its new tokens
    per_sample = -(-(P + new - 1) // bs) - P // bs
    assert smp.stats["peak_blocks"] == P // bs + G * per_sample
    assert smp.stats["prefill_tokens"] == P
    assert smp.stats["cow_copies"] == G - 1
    alone = [smp.generate([r])[0] for r in reqs]
    assert smp.stats["peak_blocks"] == -(-(P + new - 1) // bs)
    assert [r.token_ids for r in shared] == [r.token_ids for r in alone]
    for a, b in zip(shared, alone):
        torch.testing.assert_close(torch.tensor(a.logprobs), torch.tensor(b.logprobs), atol=1e-4, rtol=0)
    assert len({tuple(r.token_ids) for r in shared}) > 1  # different seeds, different samples


def test_prefix_sharing_runs_vision_once(m):
    ids, px, grid = image_prompt(m.cfg, rand_ids(5, 7), rand_ids(3, 8))
    calls = []
    hook = m.visual.register_forward_hook(lambda mod, args, out: calls.append(args[1].shape[0]))
    try:
        reqs = [Request(ids, SamplingParams(temperature=1.0, max_tokens=5, seed=g), px.clone(), grid) for g in range(5)]
        smp = sampler.Sampler(m, block_size=4)
        results = smp.generate(reqs)
    finally:
        hook.remove()
    assert calls == [1]  # one vision forward over the one image
    assert smp.stats["prefill_tokens"] == len(ids)
    assert all(len(r.token_ids) == 5 for r in results)


# -----------------------------------------------------------------------------
# Sampling: seeds, log-prob invariant, stop rules


def test_same_seed_same_tokens_whatever_the_batch(m):
    p = SamplingParams(temperature=0.9, top_p=0.9, max_tokens=8, seed=1234)
    req = Request(rand_ids(9, 21), p)
    smp = sampler.Sampler(m, block_size=4)
    alone = smp.generate([req])[0]
    others = [Request(rand_ids(n, n), SamplingParams(temperature=1.0, max_tokens=6, seed=n)) for n in (3, 30)]
    in_batch = smp.generate(others[:1] + [req] + others[1:])[1]
    assert alone.token_ids == in_batch.token_ids
    again = smp.generate([req, req])  # two identical requests with the same seed draw the same tokens
    assert again[0].token_ids == again[1].token_ids == alone.token_ids


def test_logprobs_equal_trainer_logprobs(m):
    """The sampler's log-prob of each sampled token == log_softmax(full forward logits / T) at it, the
    quantity the trainer recomputes (before top-k/top-p)."""
    cfg = m.cfg
    ids, px, grid = image_prompt(cfg, rand_ids(4, 31), rand_ids(6, 32))
    reqs = [Request(rand_ids(12, 30), SamplingParams(temperature=0.7, top_k=40, top_p=0.9, max_tokens=12, seed=5)),
            Request(ids, SamplingParams(temperature=1.3, max_tokens=10, seed=6), px, grid)]
    for req, res in zip(reqs, sampler.Sampler(m, block_size=4).generate(reqs)):
        with torch.no_grad():
            logits = m(torch.tensor([req.prompt_ids + res.token_ids]), req.pixel_values, req.image_grid_thw)[0]
        P, T = len(req.prompt_ids), req.params.temperature
        logp = torch.log_softmax(logits[P - 1:-1].float() / T, -1).gather(1, torch.tensor(res.token_ids)[:, None])[:, 0]
        torch.testing.assert_close(torch.tensor(res.logprobs), logp, atol=1e-4, rtol=0)


def test_stop_rules(m):
    smp = sampler.Sampler(m, block_size=4, decode_fn=lambda ids: "".join(chr(97 + t % 26) for t in ids))
    prompt = rand_ids(7, 41)
    free = smp.generate([Request(prompt, SamplingParams(temperature=0.0, max_tokens=12))])[0].token_ids
    stop_tok, text = free[4], "".join(chr(97 + t % 26) for t in free)
    r_tok, r_str, r_len, r_zero = smp.generate([
        Request(prompt, SamplingParams(temperature=0.0, max_tokens=12, stop_token_ids=(stop_tok,))),
        Request(prompt, SamplingParams(temperature=0.0, max_tokens=12, stop_strings=(text[5:7],))),
        Request(prompt, SamplingParams(temperature=0.0, max_tokens=3)),
        Request(prompt, SamplingParams(temperature=0.0, max_tokens=0))])
    k = free.index(stop_tok)
    assert (r_tok.token_ids, r_tok.finish_reason) == (free[:k + 1], "stop")  # the stop token is kept
    j = text.index(text[5:7]) + 2
    assert (r_str.token_ids, r_str.finish_reason) == (free[:j], "stop")
    assert (r_len.token_ids, r_len.finish_reason) == (free[:3], "length")
    assert (r_zero.token_ids, r_zero.finish_reason) == ([], "length")
    with pytest.raises(ValueError, match="stop_strings"):
        sampler.Sampler(m).generate([Request(prompt, SamplingParams(stop_strings=("x",)))])
    with pytest.raises(ValueError, match="request 0"):
        ids, px, grid = image_prompt(m.cfg, [1], [2])
        sampler.Sampler(m).generate([Request(ids, SamplingParams(), None, None)])


def _filtered_probs(x, k, p):
    """The distribution top-k then top-p promise, computed the textbook way (sort, cumsum)."""
    probs = torch.softmax(x.double(), -1)
    order = probs.argsort(descending=True)
    keep = torch.zeros_like(probs, dtype=torch.bool)
    keep[order[:k if k > 0 else len(x)]] = True
    q = probs * keep / (probs * keep).sum()
    cum = q[order].cumsum(0)
    n = int((cum < p).sum()) + 1 if p < 1 else len(x)
    keep2 = torch.zeros_like(keep)
    keep2[order[:n]] = True
    q = q * keep2
    return q / q.sum()


@pytest.mark.parametrize("T,k,p", [(1.0, 0, 1.0), (0.8, 25, 1.0), (1.3, 0, 0.8), (0.7, 30, 0.9)])
def test_sampling_distribution_chi_square(T, k, p):
    V, N = 40, 20000
    x = torch.randn(V, generator=torch.Generator().manual_seed(3)) * 1.5
    want = _filtered_probs(x / T, k, p)
    ones = torch.ones(N)
    # half the draws vary the seed, half the step: both must be fresh randomness
    seed = torch.cat([torch.arange(N // 2), torch.full((N // 2,), 7)])
    step = torch.cat([torch.zeros(N // 2, dtype=torch.long), torch.arange(N // 2)])
    tok, logp = sampler.sample_ref(x.expand(N, V), ones * T, torch.full((N,), k), ones * p, seed, step)
    counts = torch.bincount(tok, minlength=V).double()
    assert counts[want == 0].sum() == 0  # nothing outside the kept set
    e = want[want > 0] * N
    stat = ((counts[want > 0] - e) ** 2 / e).sum()
    p_value = torch.special.gammaincc(torch.tensor((len(e) - 1) / 2.0), stat / 2)
    assert p_value > 1e-4, (stat, len(e))
    torch.testing.assert_close(logp, torch.log_softmax(x / T, -1)[tok], atol=1e-5, rtol=0)


def test_sample_ref_greedy_and_seeds():
    logits = torch.randn(6, 50)
    zeros = torch.zeros(6)
    tok, logp = sampler.sample_ref(logits, zeros, torch.zeros(6, dtype=torch.long), zeros + 1,
                                   torch.arange(6), torch.zeros(6, dtype=torch.long))
    assert torch.equal(tok, logits.argmax(-1))
    torch.testing.assert_close(logp, torch.log_softmax(logits, -1).max(-1).values)
    args = (logits, zeros + 1, torch.zeros(6, dtype=torch.long), zeros + 1)
    a = sampler.sample_ref(*args, torch.full((6,), 9), torch.arange(6))[0]
    b = sampler.sample_ref(*args, torch.full((6,), 9), torch.arange(6))[0]
    c = sampler.sample_ref(*args, torch.full((6,), 10), torch.arange(6))[0]
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_hash_matches_uint32_arithmetic():
    """_hash32 (int64 tensor ops) is bit-exact with the 32-bit unsigned C code of csrc/sampling.cu."""
    def c_hash(x):
        x ^= x >> 16
        x = (x * 0x7FEB352D) & 0xFFFFFFFF
        x ^= x >> 15
        x = (x * 0x846CA68B) & 0xFFFFFFFF
        return x ^ (x >> 16)
    xs = [0, 1, 2, 12345, 0x7FFFFFFF, 0x80000000, 0xDEADBEEF, 0xFFFFFFFF]
    assert sampler._hash32(torch.tensor(xs)).tolist() == [c_hash(x) for x in xs]


# -----------------------------------------------------------------------------
# Paged attention reference vs SDPA over the gathered cache


def gathered_sdpa(q, k_cache, v_cache, tables, ctx, scale):
    out = []
    for b in range(q.shape[0]):
        n = int(ctx[b])
        k = k_cache[tables[b].long()].transpose(0, 1).flatten(1, 2)[:, :n]  # (nkv, n, hd)
        v = v_cache[tables[b].long()].transpose(0, 1).flatten(1, 2)[:, :n]
        rep = q.shape[1] // k.shape[0]
        y = F.scaled_dot_product_attention(q[b][:, None], k.repeat_interleave(rep, 0), v.repeat_interleave(rep, 0),
                                           scale=scale)
        out.append(y[:, 0])
    return torch.stack(out)


def random_paged(B, nkv, group, hd, bs, lens, dtype=torch.float32, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    width = max(-(-n // bs) for n in lens)
    num_blocks = B * width + 3
    kc = torch.randn(num_blocks, nkv, bs, hd, generator=g).to(dtype)
    vc = torch.randn(num_blocks, nkv, bs, hd, generator=g).to(dtype)
    q = torch.randn(B, nkv * group, hd, generator=g).to(dtype)
    tables = torch.randperm(num_blocks, generator=g)[:B * width].view(B, width).int()  # scattered, unshared
    ctx = torch.tensor(lens, dtype=torch.int32)
    return [t.to(device) for t in (q, kc, vc, tables, ctx)]


@pytest.mark.parametrize("group", [1, 4, 7])
@pytest.mark.parametrize("bs", [16, 5])
def test_paged_attention_ref_matches_sdpa(group, bs):
    q, kc, vc, tables, ctx = random_paged(5, 2, group, 24, bs, [1, 7, 16, 33, 61])
    got = sampler.paged_attention_ref(q, kc, vc, tables, ctx, 24 ** -0.5)
    torch.testing.assert_close(got, gathered_sdpa(q, kc, vc, tables, ctx, 24 ** -0.5), atol=1e-5, rtol=1e-5)


def test_write_kv_ref_round_trip():
    kc, vc = torch.zeros(6, 2, 4, 8), torch.zeros(6, 2, 4, 8)
    k, v = torch.randn(5, 2, 8), torch.randn(5, 2, 8)
    slots = torch.tensor([0, 5, 23, 9, 14])
    sampler.write_kv_ref(k, v, kc, vc, slots)
    for n, s in enumerate(slots.tolist()):
        assert torch.equal(kc[s // 4, :, s % 4], k[n]) and torch.equal(vc[s // 4, :, s % 4], v[n])


# -----------------------------------------------------------------------------
# CUDA kernels vs references (GPU only)


@needs_gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("hd", [32, 64, 128])
@pytest.mark.parametrize("nkv,group", [(3, 1), (2, 4), (2, 7), (1, 16)])
@pytest.mark.parametrize("B", [5, 133])
@pytest.mark.parametrize("tensor_cores", [False, True])  # the mma kernel covers fp16/bf16 at hd 64 and 128
def test_paged_attention_kernel(dtype, hd, nkv, group, B, tensor_cores):
    ops = sampler.KernelOps(sampler.cuda_kernels(), hd, dtype)
    ops.tensor_cores = tensor_cores
    lens = [[1, 17, 300, 1000, 63][b % 5] + b % 3 for b in range(B)]
    q, kc, vc, tables, ctx = random_paged(B, nkv, group, hd, 16, lens, dtype, "cuda", seed=hd + B)
    out = ops.paged_attention(q, kc, vc, tables, ctx, hd ** -0.5)
    exact = sampler.paged_attention_ref(q.double(), kc.double(), vc.double(), tables, ctx, hd ** -0.5)
    ref = sampler.paged_attention_ref(q, kc, vc, tables, ctx, hd ** -0.5)  # fp32 math, output in dtype
    err, err_ref = (out.double() - exact).abs().max(), (ref.double() - exact).abs().max()
    assert out.isfinite().all() and err <= 2 * err_ref + 1e-5, (float(err), float(err_ref))


@needs_gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_write_kv_kernel(dtype):
    ops = sampler.KernelOps(sampler.cuda_kernels(), 64, dtype)
    kc, vc = torch.zeros(2, 9, 3, 16, 64, dtype=dtype, device="cuda")
    kr, vr = kc.clone(), vc.clone()
    k, v = torch.randn(2, 37, 3, 64, device="cuda").to(dtype)
    slots = torch.randperm(9 * 16, device="cuda")[:37]
    ops.write_kv(k, v, kc, vc, slots)
    sampler.write_kv_ref(k, v, kr, vr, slots)
    assert torch.equal(kc, kr) and torch.equal(vc, vr)


@needs_gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_sample_kernel(dtype):
    ops = sampler.KernelOps(sampler.cuda_kernels(), 64, dtype)
    B, V = 256, 5003
    g = torch.Generator().manual_seed(0)
    logits = (torch.randn(B, V, generator=g) * 3).to(dtype).cuda()
    i = torch.arange(B)
    temperature = torch.tensor([0.0, 0.7, 1.0, 1.3])[i % 4].cuda()
    top_k = torch.tensor([0, 1, 50, V, 7])[i % 5].cuda()
    top_p = torch.tensor([1.0, 0.9, 0.5])[i % 3].cuda()
    seed, step = (i * 7919).cuda(), (i % 11).cuda()
    tok, logp = ops.sample(logits, temperature, top_k, top_p, seed, step)
    tok_r, logp_r = sampler.sample_ref(logits, temperature, top_k, top_p, seed, step)
    same = tok == tok_r
    assert same[temperature == 0].all()
    assert same.float().mean() >= 0.98, int((~same).sum())
    torch.testing.assert_close(logp[same], logp_r[same], atol=1e-4, rtol=0)
    tok2, _ = ops.sample(logits, temperature, top_k, top_p, seed, step)
    assert torch.equal(tok, tok2)


@needs_gpu
def test_sampler_on_gpu_matches_full_forward():
    m = model.build("tiny", device="cuda")  # head_dim 32: the kernels' path, fp32
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model.init_weights(m, std=0.2)
    reqs = mixed_requests(m)
    for kw in (dict(kv_cache_bytes=1 << 28), dict(num_blocks=24, block_size=4)):  # roomy, then preempting
        smp = sampler.Sampler(m, **kw)
        smp._ensure_cache()
        assert isinstance(smp.cache.ops, sampler.KernelOps)
        assert_greedy_matches(m, reqs, smp.generate(reqs), atol=1e-3)
    assert smp.stats["preemptions"] > 0


@needs_gpu
def test_sampler_bf16_logprob_gap():
    m = model.build("tiny", device="cuda", dtype=torch.bfloat16)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model.init_weights(m, std=0.2)
    reqs = [Request(rand_ids(n, n, 2000), SamplingParams(temperature=1.0, max_tokens=16, seed=n)) for n in (5, 30, 77)]
    for req, res in zip(reqs, sampler.Sampler(m, kv_cache_bytes=1 << 28).generate(reqs)):
        with torch.no_grad():
            logits = m(torch.tensor([req.prompt_ids + res.token_ids], device="cuda"))[0]
        P = len(req.prompt_ids)
        tok = torch.tensor(res.token_ids, device="cuda")[:, None]
        logp = torch.log_softmax(logits[P - 1:-1].float(), -1).gather(1, tok)[:, 0]
        gap = (torch.tensor(res.logprobs, device="cuda") - logp).abs()
        assert gap.mean() < 0.02 and gap.max() < 0.1, gap


# -----------------------------------------------------------------------------
# The .cu files compile with nvcc alone (as CI does, without a GPU or torch's CUDA headers)


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc not on PATH")
def test_cuda_sources_compile(tmp_path):
    csrc = os.path.join(ROOT, "csrc")
    procs = [subprocess.Popen(["nvcc", "-c", "-arch=sm_90", "-I", csrc, "-o", str(tmp_path / f"{name}.o"),
                               os.path.join(csrc, f"{name}.cu")], stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
             for name in ("paged_attention", "sampling")]
    for p in procs:
        out = p.communicate(timeout=300)[0].decode()
        assert p.returncode == 0, out


@pytest.mark.skipif(shutil.which("g++") is None, reason="needs g++")
def test_sampler_bindings_compile():
    """The torch glue of the kernels, checked where no GPU can build the whole extension (CI)."""
    import sysconfig
    from torch.utils.cpp_extension import include_paths
    inc = [f"-I{p}" for p in [*include_paths(), sysconfig.get_paths()["include"], os.path.join(ROOT, "csrc")]]
    p = subprocess.run(["g++", "-std=c++17", "-fsyntax-only", "-w", "-DTORCH_EXTENSION_NAME=sampler_bindings", *inc,
                        os.path.join(ROOT, "csrc", "sampler_bindings.cpp")], capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
