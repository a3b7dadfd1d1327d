"""
One worker for tests/test_parallel.py, run as a single process or under torchrun:

    python tests/dist_worker.py --mode=train --out=/tmp/ref                        # 1 process, plain model
    python -m torch.distributed.run --nproc_per_node=2 tests/dist_worker.py --mode=train --out=/tmp/fsdp
    python -m torch.distributed.run --nproc_per_node=2 tests/dist_worker.py --mode=load,tp --ckpt=DIR --out=/tmp/l

train: AdamW steps of the tiny model on random tokens drawn from the global torch / numpy / python RNGs
(so a resume must restore them), with a warmup + cosine LambdaLR; writes OUT.json (losses, extra) and
OUT.safetensors (final full weights, via parallel.iter_full_tensors).
load:  load_sharded from an HF directory through a safe_open that records what each rank read, then
export_hf; writes OUT.rank<r>.json (bytes and elements read) and OUT.safetensors (gathered weights).
tp:    logits of the tiny model (tied and untied) with apply_tp over all ranks vs the plain model, the
TP copy filled by copy_full_ (as a sampler refresh) and, given --ckpt, by load_sharded; writes OUT.json.
rollout: the sampler over a TP copy vs over the plain model, and rl.refresh_sampler after a training step
of the FSDP policy vs a sampler over the exported weights; writes OUT.rollout.rank<r>.json.
flat:  one rl.rl_step with dynamic sampling in which rank 1's groups are all flat; writes
OUT.flat<world>.safetensors (the weights after the step) and OUT.flat<world>.rank<r>.json (metrics).
"""
import json
import math
import os
import random
import sys
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed.checkpoint as dcp
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import model  # noqa: E402
import parallel  # noqa: E402


@dataclass
class WorkerConfig:
    mode: str = "train"          # train | load | tp | vlm | rollout | flat, or several: load,tp,vlm
    out: str = ""                # output path prefix
    steps: int = 4               # train: stop after this step
    total_steps: int = 8         # train: length of the LR schedule
    batch: int = 4               # global sequences per step (split over data-parallel ranks)
    seq: int = 32
    lr: float = 3e-3
    hsdp: bool = False
    gpus_per_node: int = 0
    ac: bool = False
    run_dir: str = ""
    save_every: int = 0
    resume: bool = False
    die_in_save_at: int = 0      # exit hard inside the save at this step: shards written, not renamed
    ckpt: str = ""               # load: a directory holding HF checkpoints tied/ and untied/


def tiny_config(untied=False, vocab=2048):
    cfg = model.get_config("tiny")
    cfg.tie_word_embeddings, cfg.vocab_size = not untied, vocab
    return cfg


# the load test's checkpoints; the odd vocabulary splits the embedding rows unevenly (1023 + 1022)
LOAD_VARIANTS = {"tied": tiny_config(), "untied": tiny_config(untied=True, vocab=2045)}


def train(cfg, d):
    torch.manual_seed(0)
    np.random.seed(0)
    random.seed(0)
    m, mesh = model.build("tiny", seed=0), None
    m.vision_every_forward = True  # the tower is trained (as build_for_training sets it, plain or FSDP)
    if d.world_size > 1:  # one process is the reference: the plain model
        if cfg.ac:
            parallel.apply_ac(m)
        mesh = parallel.make_mesh(d, hsdp=cfg.hsdp, gpus_per_node=cfg.gpus_per_node or None)
        parallel.apply_fsdp(m, mesh, param_dtype=torch.float32)  # fp32 compute: exact comparisons
    opt = torch.optim.AdamW(m.parameters(), lr=cfg.lr, weight_decay=0.1)
    warm = 2
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min((s + 1) / warm, 0.5 * (1 + math.cos(
        math.pi * min(s, cfg.total_steps) / cfg.total_steps))))
    ckpt = parallel.Checkpointer(cfg.run_dir) if cfg.run_dir else None
    step, losses, extra = 0, [], {}
    if cfg.resume:
        path = ckpt.latest()
        extra = ckpt.load(path, m, opt, sched)
        step, losses = extra["step"], list(extra["losses"])
        parallel.print0(f"resumed from {path} at step {step}")
    if cfg.die_in_save_at:  # simulate a crash after the shards are written, before the rename
        real_save = dcp.save

        def dying_save(*a, **kw):
            real_save(*a, **kw)
            if step == cfg.die_in_save_at:
                os._exit(3)
        dcp.save = dying_save
    per_rank = cfg.batch // d.world_size
    while step < cfg.steps:
        # every rank draws the same global batch, then takes its rows
        ids = torch.randint(0, 1900, (cfg.batch, cfg.seq + 1))
        ids = (ids + random.randrange(7) + int(np.random.randint(0, 7))) % 1900
        ids = ids[d.rank * per_rank:(d.rank + 1) * per_rank]
        logits = m(ids[:, :-1])
        loss = F.cross_entropy(logits.flatten(0, 1).float(), ids[:, 1:].flatten())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(m.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        sched.step()
        step += 1
        global_loss = loss.detach().clone()
        if torch.distributed.is_initialized():
            torch.distributed.all_reduce(global_loss)
            global_loss /= d.world_size
        losses.append(global_loss.item())
        if ckpt and cfg.save_every and step % cfg.save_every == 0:
            ckpt.save(step, m, opt, sched, {"step": step, "losses": losses, "stage": "a", "duals": [0.25, step]})
    weights = {n: t.clone() for n, t in parallel.iter_full_tensors(m)}
    if d.is_main:
        from safetensors.torch import save_file
        save_file(weights, cfg.out + ".safetensors")
        with open(cfg.out + ".json", "w") as f:
            json.dump({"losses": losses, "extra": extra, "lr": sched.get_last_lr(), "optimizer_states": len(opt.state),
                       "mesh": mesh and {"shape": list(mesh.shape), "names": list(mesh.mesh_dim_names)}}, f)


class RecordingSafeOpen:
    """safetensors.safe_open that records every read: get_tensor is refused, get_slice reads are
    counted, so the test can check that each rank touched only its own rows."""
    log = {"bytes": 0, "elements": 0, "slices": []}

    def __init__(self, *a, **kw):
        self.f = parallel_safe_open(*a, **kw)

    def __enter__(self):
        self.f.__enter__()
        return self

    def __exit__(self, *exc):
        return self.f.__exit__(*exc)

    def get_tensor(self, name):
        raise AssertionError(f"load_sharded read the whole tensor {name}")

    def get_slice(self, name):
        sl, log = self.f.get_slice(name), self.log

        class Slice:
            def get_shape(self):
                return sl.get_shape()

            def __getitem__(self, index):
                t = sl[index]
                log["bytes"] += t.numel() * t.element_size()
                log["elements"] += t.numel()
                log["slices"].append([name, str(index)])
                return t
        return Slice()


parallel_safe_open = parallel.safe_open


def load(cfg, d):
    """For each of DIR/tied and DIR/untied: meta -> FSDP -> to_empty -> load_sharded -> export_hf."""
    for variant in ("tied", "untied"):
        out, ckpt = f"{cfg.out}.{variant}", os.path.join(cfg.ckpt, variant)
        m = model.build(LOAD_VARIANTS[variant], device="meta")
        parallel.apply_fsdp(m, parallel.make_mesh(d), param_dtype=torch.float32)
        m.to_empty(device=d.device)
        RecordingSafeOpen.log = {"bytes": 0, "elements": 0, "slices": []}
        parallel.safe_open = RecordingSafeOpen
        n = parallel.load_sharded(m, ckpt)
        parallel.safe_open = parallel_safe_open
        local = sum(p.to_local().numel() for p in m.parameters())
        with open(f"{out}.rank{d.rank}.json", "w") as f:
            json.dump({"returned_bytes": n, "local_elements": local, **RecordingSafeOpen.log}, f)
        weights = {name: t.clone() for name, t in parallel.iter_full_tensors(m)}
        parallel.export_hf(m, out + ".export", d)
        if d.is_main:
            from safetensors.torch import save_file
            save_file(weights, out + ".safetensors")


def tp(cfg, d):
    mesh = parallel.make_mesh(d, tp=d.world_size)
    ids = torch.randint(0, 1900, (2, 24), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[1, :5] = 0  # left padding: the masked SDPA path
    report = {}
    for untied in (False, True):
        ref = model.build(tiny_config(untied), seed=0)
        with torch.no_grad():
            want = ref(ids, attention_mask=mask)
        # the rollout copy: built on meta, sharded, then filled from the reference's full tensors
        m = parallel.apply_tp(model.build(tiny_config(untied), device="meta"), mesh)
        m.to_empty(device=d.device)
        m.tie_weights()
        params = dict(m.named_parameters())
        for name, t in parallel.iter_full_tensors(ref):
            parallel.copy_full_(params[name], t)
        with torch.no_grad():
            got = m(ids, attention_mask=mask)
        local_q = m.llm.layers[0].attn.q_proj.weight.to_local().shape[0]
        report["untied" if untied else "tied"] = {
            "max_err": (got - want).abs().max().item(), "scale": want.abs().max().item(),
            "local_q_rows": local_q, "tied": m.lm_head.weight is m.llm.embed_tokens.weight}
    if cfg.ckpt:  # the rollout copy can also read its TP slices straight from an HF checkpoint
        path = os.path.join(cfg.ckpt, "tied")
        m = parallel.apply_tp(model.build(LOAD_VARIANTS["tied"], device="meta"), mesh)
        m.to_empty(device=d.device)
        parallel.load_sharded(m, path)
        with torch.no_grad():
            want, got = model.load_pretrained(path)(ids, attention_mask=mask), m(ids, attention_mask=mask)
        report["tied_from_checkpoint"] = {"max_err": (got - want).abs().max().item(), "scale": want.abs().max().item(),
                                          "local_q_rows": m.llm.layers[0].attn.q_proj.weight.to_local().shape[0],
                                          "tied": m.lm_head.weight is m.llm.embed_tokens.weight}
    if d.is_main:
        with open(cfg.out + ".json", "w") as f:
            json.dump(report, f)


def vlm(cfg, d):
    """An image only in rank 0's row: one SGD step under FSDP equals the plain model's step on the
    whole batch (FSDP needs every rank to run the same units; see apply_fsdp), with the vision tower
    frozen (OUT.vlm.json) and trained (OUT.vlm_trained.json: rank 1 runs it on a dummy image)."""
    for trained in (False, True):
        vlm_step(cfg, d, trained)


def vlm_step(cfg, d, trained):
    tiny, g = model.get_config("tiny"), torch.Generator().manual_seed(0)
    pixels, grid = torch.randn(16, 3 * 2 * 14 * 14, generator=g), torch.tensor([[1, 4, 4]])  # 4 merged tokens
    text = torch.randint(0, 1900, (2, 26), generator=g)
    image = torch.tensor([tiny.vision_start_token_id] + [tiny.image_token_id] * 4 + [tiny.vision_end_token_id])
    ids = torch.stack([torch.cat([text[0, :10], image, text[0, 10:20]]), text[1]])  # (2, 26)

    def step(m, rows, px, thw):
        m.visual.requires_grad_(trained)
        opt = torch.optim.SGD([p for p in m.parameters() if p.requires_grad], lr=1.0)  # weights - grads
        loss = F.cross_entropy(m(ids[rows, :-1], px, thw).flatten(0, 1), ids[rows, 1:].flatten())
        loss.backward()
        opt.step()
        return dict(parallel.iter_full_tensors(m))

    want = step(model.build("tiny", seed=0), slice(0, 2), pixels, grid)
    m = model.build("tiny", seed=0)
    m.visual.requires_grad_(trained)
    parallel.apply_fsdp(m, parallel.make_mesh(d), param_dtype=torch.float32)
    has_image = d.rank == 0
    got = step(m, slice(d.rank, d.rank + 1), pixels if has_image else None, grid if has_image else None)
    start = dict(model.build("tiny").named_parameters())
    if d.is_main:
        with open(cfg.out + (".vlm_trained.json" if trained else ".vlm.json"), "w") as f:
            json.dump({"max_err": max((got[k] - want[k]).abs().max().item() for k in want),
                       "moved": max((want[k] - v).abs().max().item() for k, v in start.items()),
                       "vision_moved": max((want[k] - v).abs().max().item() for k, v in start.items()
                                           if k.startswith("visual."))}, f)


def sampler_requests(sampling):
    """Greedy text, a group of 4 seeded samples sharing a prompt (top-p), and an image prompt (top-k)."""
    tiny, g = model.get_config("tiny"), torch.Generator().manual_seed(3)
    text = torch.randint(0, 1900, (3, 12), generator=g).tolist()
    image = [tiny.vision_start_token_id] + [tiny.image_token_id] * 4 + [tiny.vision_end_token_id]
    pixels, grid = torch.randn(16, 3 * 2 * 14 * 14, generator=g), torch.tensor([[1, 4, 4]])
    P = sampling.SamplingParams
    return ([sampling.Request(text[0], P(temperature=0.0, max_tokens=20))]
            + [sampling.Request(text[1][:7], P(top_p=0.9, max_tokens=24, seed=s)) for s in range(4)]
            + [sampling.Request(text[2][:5] + image + text[2][5:], P(temperature=0.8, top_k=50, max_tokens=16, seed=9),
                                pixels, grid)])


def rollout(cfg, d):
    """Each generate's results as {tokens, logprobs} lists. tp_copy / plain: the same weights in a TP
    copy over all ranks and in a plain model, twice for the TP copy with a cache so small that sequences
    are preempted. after the policy's AdamW step: refreshed TP copy, refreshed full copy, and a plain
    model loaded from export_hf of the policy; before: the TP copy before the step."""
    import types
    import rl
    import sampler as sampling

    def run(smp):
        return [{"tokens": r.token_ids, "logprobs": r.logprobs} for r in smp.generate(sampler_requests(sampling))]

    def tp_copy():
        return rl.build_rollout_copy(model.get_config("tiny"), d.device, torch.float32,
                                     parallel.make_mesh(d, tp=d.world_size))

    report = {}
    plain = model.build("tiny", seed=4).requires_grad_(False)
    tp = tp_copy()
    rl.refresh_sampler(types.SimpleNamespace(policy=plain, rollout_model=tp, sampler=sampling.Sampler(tp)))
    report["plain"], report["tp_copy"] = run(sampling.Sampler(plain)), run(sampling.Sampler(tp))
    small = sampling.Sampler(tp, num_blocks=5)
    report["tp_copy_preempted"], report["tp_preemptions"] = run(small), small.stats["preemptions"]
    try:  # unseeded sampling would let the ranks of a TP group draw different tokens
        sampling.Sampler(tp).generate([sampling.Request([1, 2, 3], sampling.SamplingParams(max_tokens=2))])
    except ValueError as e:
        report["unseeded"] = str(e)

    policy = parallel.build_for_training(d, "tiny", param_dtype=torch.float32, seed=7)
    copies = {"tp": tp_copy(), "full": rl.build_rollout_copy(model.get_config("tiny"), d.device, torch.float32)}
    states = {k: types.SimpleNamespace(policy=policy, rollout_model=m, sampler=sampling.Sampler(m))
              for k, m in copies.items()}
    for st in states.values():
        rl.refresh_sampler(st)
    report["before_tp"] = run(states["tp"].sampler)
    ids = torch.randint(0, 1900, (2 * d.world_size, 20), generator=torch.Generator().manual_seed(5))
    ids = ids[d.rank::d.world_size]  # this rank's rows of the training batch
    opt = torch.optim.AdamW(policy.parameters(), lr=1e-2)
    F.cross_entropy(policy(ids[:, :-1]).flatten(0, 1), ids[:, 1:].flatten()).backward()
    opt.step()
    for k, st in states.items():
        rl.refresh_sampler(st)
        report[f"after_{k}"] = run(st.sampler)
    parallel.export_hf(policy, cfg.out + ".export", d)
    report["after_reload"] = run(sampling.Sampler(model.load_pretrained(cfg.out + ".export")))
    with open(f"{cfg.out}.rollout.rank{d.rank}.json", "w") as f:
        json.dump(report, f)


def flat(cfg, d):
    """Rank 0 scores its 2 prompts with rewards that vary inside each group; rank 1's 2 prompts get
    reward 1 everywhere, so dynamic sampling drops them, the refill round (rank 0 with no new prompts)
    is flat again, and rank 1 ends with no sequences, yet must join every FSDP collective of the
    update. On 1 rank (rank 0's prompts alone) the weights after the step must be the same."""
    import processor
    import rl
    from safetensors.torch import save_file
    out = f"{cfg.out}.flat{d.world_size}"
    rcfg = rl.RLConfig(run_dir=out, prompts_per_step=2 * d.world_size, group_size=4, max_new_tokens=6, lr=1e-3,
                       dynamic_sampling=True, max_refills=1)
    st = rl.setup(rcfg)
    prompts = processor.load_prompts(os.path.join(os.path.dirname(__file__), "..", "data/demo/rl_train.jsonl"))[0]
    mine = [dict(p, _index=2 * d.rank + i) for i, p in enumerate(prompts[2 * d.rank:2 * d.rank + 2])]

    def score(seqs):
        for k, s in enumerate(seqs):
            s.reward = float(k % rcfg.group_size) if d.rank == 0 else 1.0
        return {"scored": float(len(seqs))}

    metrics = rl.rl_step(st, mine, score, next_samples=lambda: mine)
    weights = {k: v.clone() for k, v in parallel.iter_full_tensors(st.policy)}
    with open(f"{out}.rank{d.rank}.json", "w") as f:
        json.dump(metrics, f)
    if d.is_main:
        save_file(weights, out + ".safetensors")


if __name__ == "__main__":
    cfg = model.configure(WorkerConfig())
    d = parallel.init_distributed()
    for mode in cfg.mode.split(","):
        {"train": train, "load": load, "tp": tp, "vlm": vlm, "rollout": rollout, "flat": flat}[mode](cfg, d)
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
