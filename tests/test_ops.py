"""ops.py: the chunked reference against float64 math on awkward sizes, every loss, KL and aggregation
mode; CPGD's zero gradient outside the clip band; a GRPO step with the fused loss equals the naive
materialised-logits step on the tiny model."""
import math
import zlib

import pytest
import torch

import model
import ops


def inputs(N, H, V, seed=0, n_seq=3, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    h = (torch.randn(N, H, generator=g, dtype=dtype) / math.sqrt(H)).requires_grad_()
    w = torch.randn(V, H, generator=g, dtype=dtype).requires_grad_()
    t = torch.randint(0, V, (N,), generator=g)
    seq = torch.sort(torch.randint(0, n_seq, (N,), generator=g)).values
    adv = torch.randn(n_seq, generator=g, dtype=dtype)[seq]
    return h, w, t, seq, adv, g


def float64_oracle(h, w, t, adv, logp_old, mask, seq, logp_ref, loss, eps_low, eps_high, kl, kl_coef, ent_coef,
                   agg, temperature, drift_coef=0.01, drift_clip=2.0):
    """The losses written out once more, plainly, from full float64 logits."""
    logits = (h @ w.t()) / temperature
    logp_all = torch.log_softmax(logits, -1)
    logp = logp_all.gather(1, t[:, None])[:, 0]
    ent = -(logp_all.exp() * logp_all).sum(-1)
    l = logp - logp_old
    if loss == "cpgd":
        pg = -torch.minimum(l * adv, l.clamp(math.log(1 - eps_low), math.log(1 + eps_high)) * adv)
        pg = pg + drift_coef * torch.clamp(l.exp().detach() - 1, max=drift_clip) * logp
    elif loss == "ppo":
        r = l.exp()
        pg = -torch.minimum(r * adv, r.clamp(1 - eps_low, 1 + eps_high) * adv)
    else:  # gspo
        s = torch.stack([l[seq == i].mean() for i in seq.tolist()])
        s = torch.exp(s.detach() + logp - logp.detach())
        pg = -torch.minimum(s * adv, s.clamp(1 - eps_low, 1 + eps_high) * adv)
    d = logp - logp_ref
    k = {"k1": d, "k2": d * d / 2, "k3": torch.exp(-d) - 1 + d}[kl]
    x = (pg + kl_coef * k - ent_coef * ent) * mask
    seqs = sorted(set(seq.tolist()))
    if agg == "token-mean":
        return x.sum() / mask.sum()
    sums = torch.stack([x[seq == i].sum() for i in seqs])
    counts = torch.stack([mask[seq == i].sum() for i in seqs])
    if agg == "seq-mean-token-mean":
        return (sums / counts).mean()
    if agg == "seq-mean-token-sum":
        return sums.mean()
    return (sums / counts.max()).mean()


@pytest.mark.parametrize("N,H,V", [(37, 64, 1000), (23, 64, 32003), (5, 3584, 1000), (3, 64, 152064)])
def test_token_logprobs_equal_float64(N, H, V):
    h, w, t, _, _, g = inputs(N, H, V)
    d_logp, d_ent = torch.randn(N, generator=g, dtype=torch.float64), torch.randn(N, generator=g, dtype=torch.float64)
    logp, ent = ops.token_logprobs(h, w, t, temperature=0.7, chunk=8)  # N not a multiple of the chunk
    ((logp * d_logp).sum() + (ent * d_ent).sum()).backward()
    grads = h.grad.clone(), w.grad.clone()
    h.grad = w.grad = None
    ref_logp, ref_ent = ops.token_logprobs_naive(h, w, t, temperature=0.7)
    ((ref_logp * d_logp).sum() + (ref_ent * d_ent).sum()).backward()
    torch.testing.assert_close(logp, ref_logp, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(ent, ref_ent, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(grads[0], h.grad, rtol=1e-9, atol=1e-10)
    torch.testing.assert_close(grads[1], w.grad, rtol=1e-9, atol=1e-10)
    assert (logp <= 0).all()


@pytest.mark.parametrize("loss", ops.LOSSES)
@pytest.mark.parametrize("agg", ops.AGGS)
@pytest.mark.parametrize("kl", ops.KLS)
def test_policy_loss_equals_float64(loss, agg, kl):
    N, H, V = 29, 16, 101
    h, w, t, seq, adv, g = inputs(N, H, V, seed=zlib.crc32(f"{loss}{agg}{kl}".encode()))
    with torch.no_grad():
        logp_now = ops.token_logprobs_naive(h, w, t, 0.9)[0]
    logp_old = logp_now + 0.3 * torch.randn(N, generator=g, dtype=torch.float64)  # some tokens outside the band
    logp_ref = logp_now + 0.2 * torch.randn(N, generator=g, dtype=torch.float64)
    mask = (torch.rand(N, generator=g) > 0.2).double()
    kw = dict(loss=loss, eps_low=0.2, eps_high=0.28, kl=kl, kl_coef=0.05, entropy_coef=0.01, agg=agg, temperature=0.9)
    got, metrics = ops.policy_loss(h, w, t, adv, logp_old, mask, seq_ids=seq, logp_ref=logp_ref, chunk=7, **kw)
    got.backward()
    grads = h.grad.clone(), w.grad.clone()
    h.grad = w.grad = None
    ref = float64_oracle(h, w, t, adv, logp_old, mask, seq, logp_ref, loss, 0.2, 0.28, kl, 0.05, 0.01, agg, 0.9)
    ref.backward()
    torch.testing.assert_close(got, ref, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(grads[0], h.grad, rtol=1e-8, atol=1e-12)
    torch.testing.assert_close(grads[1], w.grad, rtol=1e-8, atol=1e-12)
    assert 0 <= metrics["clip_frac"] < 1 and (loss == "gspo" or metrics["clip_frac"] > 0)
    assert kl != "k3" or metrics["kl"] > 0
    torch.testing.assert_close(metrics["logp"], ops.token_logprobs_naive(h, w, t, 0.9)[0].detach())


def test_cpgd_gives_no_policy_gradient_outside_the_clip_band():
    N, H, V = 8, 16, 50
    h, w, t, seq, _, _ = inputs(N, H, V)
    with torch.no_grad():
        logp = ops.token_logprobs_naive(h, w, t)[0]
    adv = torch.tensor([1.0, 1.0, -1.0, -1.0] * 2, dtype=torch.float64)
    # l = logp - logp_old: far above the band for A > 0, far below it for A < 0 -> clipped, no gradient
    logp_old = logp - torch.tensor([1.0, 1.0, -1.0, -1.0] * 2, dtype=torch.float64)
    loss, m = ops.policy_loss(h, w, t, adv, logp_old, torch.ones(N, dtype=torch.float64), loss="cpgd",
                              drift_coef=0.0)
    loss.backward()
    assert m["clip_frac"] == 1.0 and h.grad.abs().max() == 0 and w.grad.abs().max() == 0
    # inside the band the same tokens do get a gradient
    h.grad = w.grad = None
    ops.policy_loss(h, w, t, adv, logp.clone(), torch.ones(N, dtype=torch.float64), drift_coef=0.0)[0].backward()
    assert h.grad.abs().max() > 0


def test_dr_grpo_norm_is_a_constant():
    N, H, V = 12, 8, 30
    h, w, t, seq, adv, _ = inputs(N, H, V)
    with torch.no_grad():
        logp = ops.token_logprobs_naive(h, w, t)[0]
    mask = torch.ones(N, dtype=torch.float64)
    a = ops.policy_loss(h, w, t, adv, logp, mask, seq_ids=seq, agg="seq-mean-token-sum-norm", norm_len=100)[0]
    b = ops.policy_loss(h, w, t, adv, logp, mask, seq_ids=seq, agg="seq-mean-token-sum")[0]
    torch.testing.assert_close(a * 100, b)


def test_fused_grpo_step_equals_naive_step():
    """One optimizer step of the tiny model with ops.policy_loss through model(head=...) equals the
    same step with materialised logits and torch's log_softmax."""
    torch.manual_seed(0)
    ids = torch.randint(0, 2000, (2, 17))
    where = torch.arange(5, 16)
    adv = torch.tensor([1.5, -0.5]).repeat_interleave(len(where))
    seq = torch.arange(2).repeat_interleave(len(where))
    results = []
    for fused in (True, False):
        m = model.build("tiny", seed=1)
        opt = torch.optim.SGD(m.parameters(), lr=0.1)
        targets = ids[:, where + 1].reshape(-1)
        if fused:
            def head(h, w):
                return ops.policy_loss(h[:, where].reshape(-1, h.shape[-1]), w, targets, adv, old, torch.ones_like(adv),
                                       seq_ids=seq, loss="ppo")[0]
            with torch.no_grad():
                old = m(ids, head=lambda h, w: ops.token_logprobs(h[:, where].reshape(-1, h.shape[-1]), w, targets)[0])
            loss = m(ids, head=head)
        else:
            logits = m(ids)[:, where].reshape(-1, m.cfg.vocab_size).float()
            logp = torch.log_softmax(logits, -1).gather(1, targets[:, None])[:, 0]
            old = logp.detach()
            r = torch.exp(logp - old)
            loss = (-torch.minimum(r * adv, r.clamp(0.8, 1.2) * adv)).mean()
        loss.backward()
        opt.step()
        results.append((loss.item(), [p.detach().clone() for p in m.parameters()]))
    assert abs(results[0][0] - results[1][0]) < 1e-6
    for a, b in zip(results[0][1], results[1][1]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


# -----------------------------------------------------------------------------
# CUDA kernels (csrc/grpo_loss.cu) against the reference: both measured against float64, the kernel's
# error at most twice the reference's own in the same precision (flash-attention's rule)

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def rel_err(x, ref):
    return ((x.double() - ref).norm() / ref.norm()).item()


def run_logprobs(h, w, t, d_logp, d_ent, temperature, chunk, kernels, monkeypatch):
    """logp, entropy, d hidden, d weight through ops.token_logprobs, kernels on or off."""
    monkeypatch.setenv("SAFELADDER_NO_KERNELS", "0" if kernels else "1")
    h, w = h.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
    logp, ent = ops.token_logprobs(h, w, t, temperature, chunk)
    ((logp * d_logp).sum() + (ent * d_ent).sum()).backward()
    return logp.detach(), ent.detach(), h.grad, w.grad


@cuda
@pytest.mark.parametrize("N,H,V,dtype", [(37, 64, 1000, torch.bfloat16), (300, 64, 32003, torch.bfloat16),
                                         (77, 3584, 152064, torch.bfloat16), (200, 64, 152064, torch.bfloat16),
                                         (45, 64, 32003, torch.float32), (45, 64, 32003, torch.float16)])
def test_cuda_token_logprobs_within_reference_error(N, H, V, dtype, monkeypatch):
    assert ops.cuda_kernels() is not None, "the CUDA extension did not build"
    g = torch.Generator(device="cuda").manual_seed(N * V)
    h = torch.randn(N, H, device="cuda", generator=g) / math.sqrt(H)
    w = torch.randn(V, H, device="cuda", generator=g) * 2
    t = torch.randint(0, V, (N,), device="cuda", generator=g)
    d_logp, d_ent = torch.randn(2, N, device="cuda", generator=g)
    h, w = h.to(dtype), w.to(dtype)
    oracle = run_logprobs(h.double(), w.double(), t, d_logp.double(), d_ent.double(), 0.8, 1 << 30, False, monkeypatch)
    ref = run_logprobs(h, w, t, d_logp, d_ent, 0.8, 64, False, monkeypatch)
    got = run_logprobs(h, w, t, d_logp, d_ent, 0.8, 64, True, monkeypatch)  # N not a multiple of 64
    for name, x, r, o in zip(("logp", "entropy", "d_hidden", "d_weight"), got, ref, oracle):
        assert x.dtype == r.dtype and x.shape == r.shape, name
        err, ref_err = rel_err(x, o), rel_err(r, o)
        assert err <= 2 * ref_err + 1e-5, f"{name}: kernel error {err:.2e}, reference error {ref_err:.2e}"
    assert (got[0] <= 0).all() and (got[1] >= 0).all()


@cuda
def test_cuda_weight_grad_is_deterministic(monkeypatch):
    monkeypatch.setenv("SAFELADDER_NO_KERNELS", "0")
    g = torch.Generator(device="cuda").manual_seed(0)
    N, H, V = 3000, 128, 1000  # many tokens share a target: exercises the one-hot scatter
    h = (torch.randn(N, H, device="cuda", generator=g) / math.sqrt(H)).bfloat16()
    w = torch.randn(V, H, device="cuda", generator=g).bfloat16()
    t = torch.randint(0, V, (N,), device="cuda", generator=g)
    d_logp, d_ent = torch.randn(2, N, device="cuda", generator=g)
    first = run_logprobs(h, w, t, d_logp, d_ent, 1.0, 512, True, monkeypatch)
    for _ in range(3):
        again = run_logprobs(h, w, t, d_logp, d_ent, 1.0, 512, True, monkeypatch)
        assert all(torch.equal(a, b) for a, b in zip(first, again))


@cuda
@pytest.mark.parametrize("loss", ops.LOSSES)
def test_cuda_policy_loss_within_reference_error(loss, monkeypatch):
    N, H, V = 150, 64, 32003
    h, w, t, seq, adv, gen = inputs(N, H, V, seed=1, dtype=torch.float32)
    with torch.no_grad():
        logp_now = ops.token_logprobs_naive(h, w, t)[0]
    logp_old, logp_ref = (logp_now + 0.2 * torch.randn(N, generator=gen) for _ in range(2))
    mask = (torch.rand(N, generator=gen) > 0.2).float()
    kw = dict(seq_ids=seq, logp_ref=logp_ref, loss=loss, kl_coef=0.05, entropy_coef=0.01, agg="seq-mean-token-mean")
    results = []
    for dtype, kernels in ((torch.float64, False), (torch.bfloat16, False), (torch.bfloat16, True)):
        monkeypatch.setenv("SAFELADDER_NO_KERNELS", "0" if kernels else "1")
        hc, wc = (x.detach().to("cuda", dtype).requires_grad_() for x in (h, w))
        args = [x.to("cuda", torch.float64 if dtype == torch.float64 else torch.float32) for x in (adv, logp_old, mask)]
        kw_dev = {k: (v.cuda() if torch.is_tensor(v) else v) for k, v in kw.items()}
        out, metrics = ops.policy_loss(hc, wc, t.cuda(), *args, chunk=64, **kw_dev)
        out.backward()
        results.append((out.detach(), hc.grad, wc.grad))
        assert (metrics["logp"] <= 0).all()
    oracle, ref, got = results
    for name, x, r, o, slack in zip(("loss", "d_hidden", "d_weight"), got, ref, oracle, (1e-3, 1e-5, 1e-5)):
        err, ref_err = rel_err(x, o), rel_err(r, o)  # a scalar's error can vanish by chance: more slack
        assert err <= 2 * ref_err + slack, f"{name}: kernel error {err:.2e}, reference error {ref_err:.2e}"


def test_grpo_loss_cu_compiles_with_nvcc(tmp_path):
    """What CI checks: the .cu builds with nvcc alone (no GPU, no torch headers)."""
    import os
    import shutil
    import subprocess
    if shutil.which("nvcc") is None:
        pytest.skip("nvcc not installed")
    src = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "csrc", "grpo_loss.cu")
    r = subprocess.run(["nvcc", "-c", "-arch=sm_90", "-o", str(tmp_path / "grpo_loss.o"), src],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
