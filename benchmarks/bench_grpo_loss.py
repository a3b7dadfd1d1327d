"""bench_grpo_loss.py: the fused GRPO loss (ops.policy_loss on the CUDA path) against plain PyTorch
(materialised logits) and Liger's LigerFusedLinearGRPOLoss, same run, same random inputs (GPU only).

    python benchmarks/bench_grpo_loss.py                  # 8x2048 and 8x4096 tokens, H 3584, V 152064
    python benchmarks/bench_grpo_loss.py --shapes=1x1024  # quick

fwd+bwd: PPO-clip + k3 KL (kl_coef 0.04), token-mean, grads to hidden and weight; median of CUDA-event
timings after warm-up; peak extra memory = peak allocated during one step minus what was allocated
before it (grads included). forward-only: log-probs + entropy under no_grad, TFLOP/s of 2NHV."""
import math
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import ops  # noqa: E402

H, V, EPS, BETA = 3584, 152064, 0.2, 0.04
GiB = 1 << 30


def timed(fn, warmup=2, reps=7):
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        torch.cuda.synchronize()
        times.append(a.elapsed_time(b))
    return sorted(times)[len(times) // 2]


def peak_extra(fn):
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / GiB


def plain_loss(h, w, t, adv, old, ref, mask):
    logp_all = torch.log_softmax((h @ w.t()).float(), dim=-1)  # (N, V) fp32, materialised
    logp = logp_all.gather(1, t[:, None])[:, 0]
    r = torch.exp(logp - old)
    pg = -torch.minimum(r * adv, r.clamp(1 - EPS, 1 + EPS) * adv)
    d = logp - ref
    x = pg + BETA * (torch.exp(-d) - 1 + d)
    return (x * mask).sum() / mask.sum()


def ours_loss(h, w, t, adv, old, ref, mask, chunk=None):
    return ops.policy_loss(h, w, t, adv, old, mask, logp_ref=ref, loss="ppo", eps_low=EPS, eps_high=EPS,
                           kl="k3", kl_coef=BETA, chunk=chunk)[0]


def liger_loss_fn(B, T):
    try:
        from liger_kernel.chunked_loss import LigerFusedLinearGRPOLoss
    except Exception as e:  # noqa: BLE001
        print(f"liger: not importable ({e})")
        return None
    mod = LigerFusedLinearGRPOLoss(beta=BETA, epsilon_low=EPS, epsilon_high=EPS, loss_type="dapo")

    def f(h, w, t, adv, old, ref, mask):
        out = mod(h.view(B, T, -1), w, t.view(B, T), mask.view(B, T), adv.view(B, T)[:, 0],
                  ref_per_token_logps=ref.view(B, T), old_per_token_logps=old.view(B, T))
        return out[0] if isinstance(out, tuple) else out
    return f


def step(loss_fn, h, w, *rest):
    h.grad = w.grad = None
    loss_fn(h, w, *rest).backward()


def main(shapes):
    print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}")
    rows, fwd_rows = [], []
    for B, T in shapes:
        N = B * T
        g = torch.Generator(device="cuda").manual_seed(0)
        h = torch.randn(N, H, device="cuda", generator=g).bfloat16().requires_grad_()
        w = (torch.randn(V, H, device="cuda", generator=g) / math.sqrt(H)).bfloat16().requires_grad_()
        t = torch.randint(0, V, (N,), device="cuda", generator=g)
        adv = torch.randn(B, device="cuda", generator=g).repeat_interleave(T)
        with torch.no_grad():
            logp = ops.token_logprobs(h, w, t)[0]
        old = logp + 0.1 * torch.randn(N, device="cuda", generator=g)
        ref = logp + 0.1 * torch.randn(N, device="cuda", generator=g)
        mask = (torch.rand(N, device="cuda", generator=g) > 0.1).float()
        args = (t, adv, old, ref, mask)
        flops = 2 * N * H * V

        # correctness first: ours vs plain PyTorch on these inputs (where plain fits)
        try:
            step(plain_loss, h, w, *args)
            pg = (h.grad.clone(), w.grad.clone())
            step(ours_loss, h, w, *args)
            errs = [((a.float() - b.float()).norm() / b.float().norm()).item() for a, b in zip((h.grad, w.grad), pg)]
            print(f"{B}x{T}: ours vs plain rel. err d_hidden {errs[0]:.2e}, d_weight {errs[1]:.2e}")
            del pg
        except torch.OutOfMemoryError:
            print(f"{B}x{T}: plain PyTorch OOM, no cross-check")
        h.grad = w.grad = None
        torch.cuda.empty_cache()

        methods = [("plain PyTorch", plain_loss), ("ours (auto chunk)", ours_loss)]
        methods += [(f"ours (chunk {c})", lambda *a, c=c: ours_loss(*a, chunk=c)) for c in (2048,)]
        lig = liger_loss_fn(B, T)
        if lig is not None:
            methods.append(("Liger GRPO", lig))
        for name, fn in methods:
            try:
                mem = peak_extra(lambda: step(fn, h, w, *args))
                ms = timed(lambda: step(fn, h, w, *args), reps=5 if "Liger" in name else 7)
                rows.append((f"{B}x{T}", name, f"{ms:.1f}", f"{mem:.2f}"))
            except torch.OutOfMemoryError:
                rows.append((f"{B}x{T}", name, "OOM", "OOM"))
            h.grad = w.grad = None
            torch.cuda.empty_cache()
            print(rows[-1], flush=True)

        # forward only: log-probs + entropy, no grad
        with torch.no_grad():
            hd, wd = h.detach(), w.detach()
            fwd = [(f"ours (chunk {c or 'auto'})", lambda c=c: ops.token_logprobs(hd, wd, t, chunk=c))
                   for c in (None, 2048, 4096)]
            fwd.append(("plain PyTorch", lambda: ops.token_logprobs_naive(hd, wd, t)))
            try:
                from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss
                flce = LigerFusedLinearCrossEntropyLoss(reduction="none")
                fwd.append(("Liger FLCE (logp only)", lambda: flce(wd, hd, t)))
            except Exception as e:  # noqa: BLE001
                print(f"liger FLCE: not importable ({e})")
            for name, fn in fwd:
                try:
                    mem = peak_extra(fn)
                    ms = timed(fn, warmup=3, reps=10)
                    fwd_rows.append((f"{B}x{T}", name, f"{ms:.1f}", f"{flops / ms / 1e9:.0f}", f"{mem:.3f}"))
                except torch.OutOfMemoryError:
                    fwd_rows.append((f"{B}x{T}", name, "OOM", "-", "OOM"))
                torch.cuda.empty_cache()
                print(fwd_rows[-1], flush=True)
        del h, w
        torch.cuda.empty_cache()

    print("\nfwd+bwd (PPO-clip + k3 KL, token-mean)\n| tokens | method | ms (median) | peak extra GiB |\n|---|---|---|---|")
    for r in rows:
        print("| " + " | ".join(r) + " |")
    print("\nforward only (logp + entropy; Liger FLCE: logp only)\n"
          "| tokens | method | ms (median) | TFLOP/s of 2NHV | peak extra GiB |\n|---|---|---|---|---|")
    for r in fwd_rows:
        print("| " + " | ".join(r) + " |")


if __name__ == "__main__":
    shapes = [(8, 2048), (8, 4096)]
    for a in sys.argv[1:]:
        if a.startswith("--shapes="):
            shapes = [tuple(int(x) for x in s.split("x")) for s in a.split("=", 1)[1].split(",")]
    main(shapes)
