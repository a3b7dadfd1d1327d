"""
rl.py: the GRPO loop every RL stage shares (m3rl.py, efficient_rl.py, search_rl.py).

One step, in the order the code runs it:
    rollout     G samples per prompt from sampler.py: same process, same model code as the trainer (a
                full copy per rank, or one tensor-parallel copy per group of rollout_tp ranks)
    score       the stage's reward function (verifiers.py): (rewards, metrics)
    advantages  group-normalised (GRPO), or without the std (Dr.GRPO); optional dynamic sampling that
                drops groups whose rewards are all equal and refills the batch
    log-probs   old and reference log-probs with ops.token_logprobs (no [tokens x vocab] logits)
    update      ops.policy_loss (CPGD by default; PPO-clip, DAPO clip-higher, GSPO) over packed
                micro-batches, gradients normalised over the global batch so N ranks == 1 rank
    refresh     copy the new weights into the rollout model and check the sampler-vs-trainer gap
    log         reward per verifier and label, KL, entropy, clip fraction, lengths, time split, MFU

A stage builds its Config on RLConfig, calls `setup(cfg)`, then `rl_step(state, samples, score_fn)`
in its loop, with `evaluate`, `save` and `resume` around it. No Trainer class: plain functions over
an `RLState` the stage can read.
"""
import math
import os
import time
import warnings
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

import model as qwen
import ops
import parallel
import processor
import sampler as sampling

# -----------------------------------------------------------------------------
# Configuration shared by the RL stages (each stage's Config extends it)


@dataclass
class RLConfig:
    # model and run
    model: str = "tiny"                 # preset, used when init_from is empty (random weights)
    init_from: str = ""                 # HF checkpoint directory of the previous stage
    tokenizer: str = ""                 # tokenizer.json; default: init_from's, else data/tokenizer.json
    run_dir: str = "runs/rl"
    seed: int = 0
    steps: int = 40
    resume: bool = False                # continue from the newest complete checkpoint in run_dir
    stop_at: int = 0                    # checkpoint and exit at this step (a job-length limit); 0: run to the end
    # rollout
    prompts_per_step: int = 16          # global batch of prompts (split over ranks)
    group_size: int = 8                 # G samples per prompt
    temperature: float = 1.0
    top_p: float = 1.0
    max_prompt_len: int = 4096
    max_new_tokens: int = 4096
    # advantages
    std_norm: bool = True               # False: Dr.GRPO (no division by the group's std)
    dynamic_sampling: bool = False      # drop groups whose rewards are all equal, refill the batch (DAPO)
    max_refills: int = 2                # extra rollout rounds dynamic sampling may spend per step
    # policy loss (ops.policy_loss)
    loss: str = "cpgd"                  # cpgd | ppo | gspo
    eps_low: float = 0.2
    eps_high: float = 0.2               # > eps_low: DAPO clip-higher
    drift_coef: float = 0.01            # CPGD policy-drift weight
    drift_clip: float = 2.0
    kl_coef: float = 0.0                # KL to the frozen reference model (0: no reference model at all)
    kl: str = "k3"
    entropy_coef: float = 0.0
    agg: str = "token-mean"
    # optimisation
    lr: float = 1e-6
    warmup_ratio: float = 0.03
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    mini_batches: int = 1               # policy updates per rollout batch (1 = on-policy, as the authors)
    micro_batch_tokens: int = 8192      # packed tokens per forward/backward
    freeze_vision: bool = True
    max_bad_steps: int = 5              # consecutive non-finite steps before stopping
    # scale
    dtype: str = "float32"              # float32 | bfloat16 (compute dtype of the FSDP policy and the sampler)
    activation_checkpointing: bool = False
    hsdp: bool = False                  # shard inside a node, replicate across nodes
    sampler_kv_bytes: int = 0           # KV-cache budget of the sampler (0: its default)
    rollout_tp: int = 1                 # tensor-parallel size of the rollout copy (ranks of one node); 1: full copies
    # logging
    eval_every: int = 10
    save_every: int = 20
    wandb: bool = False                 # offline unless WANDB_MODE / WANDB_API_KEY say otherwise


@dataclass
class RLState:
    cfg: RLConfig
    dist: parallel.Dist
    policy: torch.nn.Module             # trained, FSDP-sharded when distributed
    rollout_model: torch.nn.Module      # the copy the sampler runs (full, or TP-sharded), refreshed after every update
    ref: torch.nn.Module | None         # frozen initial policy for the KL term (None when kl_coef == 0)
    sampler: sampling.Sampler
    tokenizer: processor.Tokenizer
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    checkpointer: parallel.Checkpointer
    logger: parallel.MetricsLogger
    tp_group: dist.ProcessGroup | None = None  # the ranks sharing a TP rollout copy (None: full copies)
    step: int = 0
    bad_steps: int = 0
    extra: dict = field(default_factory=dict)  # stage state saved with checkpoints (data position, ...)


def _dtype(name):
    return {"float32": torch.float32, "bfloat16": torch.bfloat16}[name]


# -----------------------------------------------------------------------------
# Setup


def build_rollout_copy(model_cfg, device, dtype, tp_mesh=None):
    """The sampler's copy in the compute dtype, uninitialised (refresh_sampler fills it from the
    policy, like every later refresh): a full copy, or with tp_mesh a tensor-parallel copy shared by
    the mesh's ranks (large models)."""
    m = qwen.build(model_cfg, device="meta", dtype=dtype).eval()
    if tp_mesh is not None:
        parallel.apply_tp(m, tp_mesh)
    m.requires_grad_(False).to_empty(device=device)
    m.tie_weights()
    return m


def setup(cfg):
    """Policy (+ FSDP), frozen reference, rollout copy + sampler, optimizer, scheduler, logger."""
    d = parallel.init_distributed()
    torch.manual_seed(cfg.seed)
    dtype = _dtype(cfg.dtype)

    def build(**kw):
        return parallel.build_for_training(d, cfg.model, cfg.init_from, param_dtype=dtype, hsdp=cfg.hsdp,
                                           seed=cfg.seed, **kw)

    policy = build(ac=cfg.activation_checkpointing, freeze_vision=cfg.freeze_vision)
    ref = build(freeze_vision=True).requires_grad_(False).eval() if cfg.kl_coef > 0 else None
    tp_mesh = parallel.make_mesh(d, tp=cfg.rollout_tp) if cfg.rollout_tp > 1 else None
    if cfg.rollout_tp > int(os.environ.get("LOCAL_WORLD_SIZE", d.world_size)):
        warnings.warn(f"rollout_tp={cfg.rollout_tp} spans nodes: every decode step all-reduces over the network")
    rollout_model = build_rollout_copy(policy.cfg, d.device, dtype, tp_mesh)

    tok_path = cfg.tokenizer or (os.path.join(cfg.init_from, "tokenizer.json")
                                 if cfg.init_from and os.path.exists(os.path.join(cfg.init_from, "tokenizer.json"))
                                 else processor.DEFAULT_TOKENIZER)
    tokenizer = processor.Tokenizer(tok_path)
    kv = {"kv_cache_bytes": cfg.sampler_kv_bytes} if cfg.sampler_kv_bytes else {}
    smp = sampling.Sampler(rollout_model, decode_fn=tokenizer.decode, **kv)

    params = [p for p in policy.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.999),
                                  fused=d.device.type == "cuda")
    warmup = max(1, int(cfg.warmup_ratio * cfg.steps))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / warmup))
    st = RLState(cfg, d, policy, rollout_model, ref, smp, tokenizer, optimizer, scheduler,
                 parallel.Checkpointer(cfg.run_dir), parallel.MetricsLogger(cfg.run_dir, d, cfg, cfg.wandb),
                 tp_mesh.get_group() if tp_mesh is not None else None)
    refresh_sampler(st)
    return st


# -----------------------------------------------------------------------------
# Rollout


@dataclass
class Sequence:
    """One sampled response and everything the update needs about it."""
    sample: dict                       # the dataset record (prompt, reference, label, ...)
    group: int                         # index of its prompt in the step
    prompt_ids: list
    response_ids: list
    sampler_logp: list                 # the sampler's log-prob of each response token
    finish_reason: str
    text: str = ""                     # decoded response (what verifiers read)
    pixel_values: torch.Tensor | None = None
    image_grid_thw: torch.Tensor | None = None
    reward: float = 0.0
    advantage: float = 0.0


def rollout(st, samples, round_seed):
    """G responses for each prompt. Seeds derive from (run seed, step, round, prompt, sample), so a
    rerun, a resumed run, or the same batch split over more ranks draws exactly the same responses.
    The ranks of a tensor-parallel rollout copy sample together: each brings its prompts, all of them
    generate the group's prompts, and each keeps the responses to its own."""
    cfg, G = st.cfg, st.cfg.group_size
    everyone, first = [samples], 0
    if st.tp_group is not None:
        everyone = [None] * dist.get_world_size(st.tp_group)
        dist.all_gather_object(everyone, samples, group=st.tp_group)
        first = sum(len(s) for s in everyone[:dist.get_rank(st.tp_group)])
    requests, prompts = [], []
    for i, sample in enumerate(s for part in everyone for s in part):
        ids, px, grid = processor.encode_prompt(sample, st.tokenizer, st.rollout_model.cfg.vision.spatial_merge_size)
        if len(ids) > cfg.max_prompt_len:
            raise ValueError(f"prompt of {len(ids)} tokens exceeds max_prompt_len={cfg.max_prompt_len}: "
                             f"{sample.get('_source', '?')}")
        prompts.append((sample, ids, px, grid))
        for g in range(G):  # the prompt's global index keeps the seeds rank-independent
            seed = hash((cfg.seed, st.step, round_seed, sample.get("_index", i), g)) & 0x7FFFFFFF
            params = sampling.SamplingParams(temperature=cfg.temperature, top_p=cfg.top_p,
                                             max_tokens=cfg.max_new_tokens, seed=seed,
                                             stop_token_ids=(st.tokenizer.eos_id,))
            requests.append(sampling.Request(ids, params, px, grid))
    results = st.sampler.generate(requests)[first * G:(first + len(samples)) * G]
    seqs = []
    for k, r in enumerate(results):
        sample, ids, px, grid = prompts[first + k // G]
        seqs.append(Sequence(sample, k // G, ids, list(r.token_ids), list(r.logprobs), r.finish_reason,
                             st.tokenizer.decode(r.token_ids, skip_special_tokens=True), px, grid))
    return seqs


# -----------------------------------------------------------------------------
# Advantages


def group_advantages(rewards, group_size, std_norm=True, eps=1e-9):
    """GRPO (DeepSeekMath, arXiv 2402.03300): A = (R - mean_G R) / (std_G R + eps), unbiased std,
    one scalar per response. std_norm=False is Dr.GRPO (arXiv 2503.20783): A = R - mean_G R.
    rewards (n_prompts * G,) -> advantages (n_prompts * G,)."""
    if rewards.numel() == 0:  # a rank whose groups were all dropped by dynamic sampling
        return rewards.float()
    r = rewards.view(-1, group_size).double()
    adv = r - r.mean(-1, keepdim=True)
    if std_norm:
        adv = adv / (r.std(-1, keepdim=True, unbiased=True) + eps)
    return adv.view(-1).float()


def zero_variance_groups(rewards, group_size):
    """(n_prompts,) True where every response of the prompt got the same reward: no learning signal."""
    r = rewards.view(-1, group_size)
    return (r == r[:, :1]).all(-1)


# -----------------------------------------------------------------------------
# Packing responses into micro-batches


def pack(seqs, max_tokens, cfg_model):
    """Concatenate prompt+response sequences into rows of at most max_tokens (one row per micro-batch,
    B = 1, no padding). Attention stays inside each sequence (seq_ids) and M-RoPE positions restart.
    Each micro-batch lists the flat positions whose next token is a response token, with that token,
    the response's advantage and the sampler's log-prob."""
    batches, row = [], []
    for s in sorted(range(len(seqs)), key=lambda i: -len(seqs[i].prompt_ids) - len(seqs[i].response_ids)):
        n = len(seqs[s].prompt_ids) + len(seqs[s].response_ids)
        if row and sum(len(seqs[j].prompt_ids) + len(seqs[j].response_ids) for j in row) + n > max_tokens:
            batches.append(row)
            row = []
        row.append(s)
    if row:
        batches.append(row)
    return [_micro_batch([seqs[i] for i in b], b, cfg_model) for b in batches]


def _micro_batch(seqs, seq_index, cfg_model):
    ids, pos, sid, px, grids = [], [], [], [], []
    where, targets, adv, slogp, tok_seq = [], [], [], [], []
    for k, s in enumerate(seqs):
        full = s.prompt_ids + s.response_ids
        start = len(ids)
        p, _ = qwen.rope_positions(torch.tensor([full]), s.image_grid_thw, None, cfg_model)
        ids += full
        pos.append(p)
        sid += [k] * len(full)
        if s.pixel_values is not None:
            px.append(s.pixel_values)
            grids.append(s.image_grid_thw)
        P = len(s.prompt_ids)
        # the hidden state at position t predicts token t + 1: response token j sits at P + j
        where += range(start + P - 1, start + len(full) - 1)
        targets += s.response_ids
        adv += [s.advantage] * len(s.response_ids)
        slogp += s.sampler_logp
        tok_seq += [seq_index[k]] * len(s.response_ids)
    return dict(
        input_ids=torch.tensor([ids]), position_ids=torch.cat(pos, dim=2), seq_ids=torch.tensor([sid]),
        pixel_values=torch.cat(px) if px else None, image_grid_thw=torch.cat(grids) if grids else None,
        where=torch.tensor(where, dtype=torch.long), targets=torch.tensor(targets, dtype=torch.long),
        advantages=torch.tensor(adv, dtype=torch.float32), sampler_logp=torch.tensor(slogp, dtype=torch.float32),
        token_seq=torch.tensor(tok_seq, dtype=torch.long))


def _to(mb, device):
    return {k: (v.to(device) if torch.is_tensor(v) else v) for k, v in mb.items()}


def _forward(m, mb, head):
    return m(mb["input_ids"], mb["pixel_values"], mb["image_grid_thw"], position_ids=mb["position_ids"],
             seq_ids=mb["seq_ids"], head=head)


@torch.no_grad()
def token_logprobs(m, mb, temperature):
    """Log-probs (N,) of the micro-batch's response tokens under model m (fused: no full logits)."""
    def head(h, w):
        return ops.token_logprobs(h[0, mb["where"]], w, mb["targets"], temperature=temperature)[0]
    return _forward(m, mb, head)


# -----------------------------------------------------------------------------
# Policy update


def _count(mb, by_tokens):
    """A micro-batch's share of the loss: its tokens or its sequences; 0 for a padding repeat."""
    return mb["weight"] * (len(mb["targets"]) if by_tokens else len(set(mb["token_seq"].tolist())))


def even_out(micro_batches, device, weight=1):
    """FSDP runs collectives inside every forward and backward, so all ranks must run the same number
    of micro-batches: a rank with fewer repeats its last one with weight 0 (no loss, no gradient)."""
    n = torch.tensor(len(micro_batches), device=device)
    if dist.is_initialized():
        dist.all_reduce(n, op=dist.ReduceOp.MAX)
    return [{**mb, "weight": weight} for mb in micro_batches] + \
        [{**micro_batches[-1], "weight": 0} for _ in range(int(n) - len(micro_batches))]


def policy_update(st, micro_batches):
    """One optimizer step per mini-batch. Each micro-batch's loss is weighted by its share of the
    global batch (tokens, or sequences for the seq-mean modes), times the world size because FSDP
    averages gradients over ranks: the sum over micro-batches and ranks is then exactly the loss of
    the whole batch, so 2 ranks == 1 rank and micro-batch size never changes the gradient."""
    cfg, dev = st.cfg, st.dist.device
    by_tokens = cfg.agg == "token-mean"
    chunks = [micro_batches[i::cfg.mini_batches] for i in range(cfg.mini_batches)]
    stats, n_stats = {}, 0
    for mbs in chunks:
        if not mbs:
            continue
        local = sum(_count(mb, by_tokens) for mb in mbs)
        total = parallel.all_sum(float(local), dev)
        st.optimizer.zero_grad(set_to_none=True)
        for mb in mbs:
            mb = _to(mb, dev)
            count = _count(mb, by_tokens)

            def head(h, w, mb=mb):
                return ops.policy_loss(
                    h[0, mb["where"]], w, mb["targets"], mb["advantages"], mb["logp_old"],
                    torch.ones_like(mb["advantages"]), seq_ids=mb["token_seq"], logp_ref=mb.get("logp_ref"),
                    loss=cfg.loss, eps_low=cfg.eps_low, eps_high=cfg.eps_high, drift_coef=cfg.drift_coef,
                    drift_clip=cfg.drift_clip, kl_coef=cfg.kl_coef, kl=cfg.kl, entropy_coef=cfg.entropy_coef,
                    agg=cfg.agg, temperature=cfg.temperature, norm_len=cfg.max_new_tokens)

            loss, m = _forward(st.policy, mb, head)
            (loss * count * st.dist.world_size / total).backward()
            for k, v in m.items():
                if torch.is_tensor(v) and v.numel() == 1:
                    stats[k] = stats.get(k, 0.0) + float(v) * count / total
        grad_norm = torch.nn.utils.clip_grad_norm_(
            [p for p in st.policy.parameters() if p.requires_grad], cfg.grad_clip)
        grad_norm = float(grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm)
        if not math.isfinite(grad_norm):  # skip the step, count it, stop if it keeps happening
            st.bad_steps += 1
            st.optimizer.zero_grad(set_to_none=True)
            if st.bad_steps >= cfg.max_bad_steps:
                raise RuntimeError(f"{st.bad_steps} consecutive non-finite gradients: stopping (lower lr?)")
            stats["skipped_updates"] = stats.get("skipped_updates", 0) + 1
            continue
        st.bad_steps = 0
        st.optimizer.step()
        stats["grad_norm"] = stats.get("grad_norm", 0.0) + grad_norm / len(chunks)
        n_stats += 1
    st.scheduler.step()
    return stats


@torch.no_grad()
def refresh_sampler(st):
    """Copy the updated policy into the rollout model, one tensor at a time (parallel.iter_full_tensors
    all-gathers FSDP shards), and drop KV computed with the old weights."""
    params = dict(st.rollout_model.named_parameters())
    for name, t in parallel.iter_full_tensors(st.policy):
        parallel.copy_full_(params[name], t)  # a tensor-parallel rollout copy keeps only its slice
    st.sampler.weights_updated()


# -----------------------------------------------------------------------------
# One RL step


def rl_step(st, samples, score_fn, next_samples=None):
    """Rollout -> score -> advantages -> old/ref log-probs -> update -> refresh. `score_fn(seqs)` sets
    each Sequence's reward and returns metrics; `next_samples()` gives more prompts for dynamic
    sampling. Returns the step's metrics."""
    cfg, dev, G = st.cfg, st.dist.device, st.cfg.group_size
    t0 = time.time()
    seqs, metrics, t_score, want = [], {}, 0.0, len(samples) * G
    for round_ in range(1 + (cfg.max_refills if cfg.dynamic_sampling else 0)):
        new = rollout(st, samples, round_)
        t1 = time.time()
        round_metrics = score_fn(new)  # called by every rank every round: constraints all-reduce inside
        if new:
            metrics.update(round_metrics)
        t_score += time.time() - t1
        rewards = torch.tensor([s.reward for s in new])
        flat = zero_variance_groups(rewards, G)
        if round_ == 0:
            metrics["zero_variance_groups"] = flat.float().mean().item()
            metrics["reward"] = rewards.mean().item()
        if cfg.dynamic_sampling:  # keep only groups that carry a learning signal
            new = [s for s in new if not flat[s.group]]
        for s in new:
            s.group += len(seqs) // G
        seqs += new
        # every rank runs the same rounds (a TP group samples together, collectives inside score_fn);
        # a rank whose batch is full takes part with no prompts of its own
        if not cfg.dynamic_sampling or next_samples is None or parallel.all_sum(float(len(seqs) < want), dev) == 0:
            break
        samples = next_samples()
        samples = samples if len(seqs) < want else []
    if parallel.all_sum(float(len(seqs)), dev) == 0:
        return {**metrics, "skipped": 1.0}
    seqs = seqs[:want]
    rewards = torch.tensor([s.reward for s in seqs])
    adv = group_advantages(rewards, G, cfg.std_norm)
    for s, a in zip(seqs, adv.tolist()):
        s.advantage = a
    t_rollout = time.time() - t0 - t_score

    t2 = time.time()
    # a rank left with no sequences (all its groups flat) still joins every FSDP forward and backward,
    # on a one-token filler of weight 0
    filler = [Sequence({}, 0, [st.tokenizer.eos_id], [st.tokenizer.eos_id], [0.0], "stop")]
    mbs = even_out(pack(seqs or filler, cfg.micro_batch_tokens, st.rollout_model.cfg), dev, weight=int(bool(seqs)))
    mismatch, n_tok = 0.0, 0
    for mb in mbs:
        mbd = _to(mb, dev)
        mb["logp_old"] = token_logprobs(st.policy, mbd, cfg.temperature).float().cpu()
        if st.ref is not None:
            mb["logp_ref"] = token_logprobs(st.ref, mbd, cfg.temperature).float().cpu()
        mismatch += mb["weight"] * (mb["logp_old"] - mb["sampler_logp"]).abs().sum().item()
        n_tok += mb["weight"] * len(mb["targets"])
    train_stats = policy_update(st, mbs)
    t_train = time.time() - t2
    t3 = time.time()
    refresh_sampler(st)
    t_sync = time.time() - t3

    resp = [len(s.response_ids) for s in seqs] or [0]
    think = [processor.think_length(s.response_ids, st.tokenizer) for s in seqs] or [0]
    n_train_tokens = sum(len(s.prompt_ids) + len(s.response_ids) for s in seqs)
    metrics.update({
        "adv_mean": adv.mean().item() if len(adv) else 0.0, "adv_std": adv.std().item() if len(adv) > 1 else 0.0,
        "response_len": sum(resp) / len(resp), "think_len": sum(think) / len(think),
        "answer_len": (sum(resp) - sum(think)) / len(resp),
        "truncated": sum(s.finish_reason == "length" for s in seqs) / max(len(seqs), 1),
        "logp_mismatch": mismatch / max(n_tok, 1),
        "rollout_tok_s": sum(resp) / max(t_rollout, 1e-9), "train_tok_s": n_train_tokens / max(t_train, 1e-9),
        "mfu": _mfu(st, n_train_tokens, t_train),
        "time_rollout": t_rollout, "time_verify": t_score, "time_train": t_train, "time_sync": t_sync,
        "lr": st.scheduler.get_last_lr()[0], **train_stats})
    if dev.type == "cuda":
        metrics["peak_mem_gib"] = torch.cuda.max_memory_allocated(dev) / 2**30
    st.step += 1
    return metrics


def _mfu(st, tokens, seconds):
    """Model FLOPs utilisation of the update (6 * params * tokens for forward + backward, plus the
    old/ref forwards at 2 * params * tokens each), against the GPU's bf16 peak; 0 on CPU."""
    if st.dist.device.type != "cuda":
        return 0.0
    n = sum(p.numel() for p in st.rollout_model.llm.parameters())
    flops = tokens * n * (6 + 2 + (2 if st.ref is not None else 0))
    return flops / max(seconds, 1e-9) / 989e12


# -----------------------------------------------------------------------------
# Evaluation, checkpoints


@torch.no_grad()
def evaluate(st, samples, score_fn, max_new_tokens=None):
    """Greedy responses to held-out prompts, scored by the stage's reward function. Returns metrics
    with the mean reward overall and per label."""
    cfg = st.cfg
    requests, seqs = [], []
    for sample in samples:
        ids, px, grid = processor.encode_prompt(sample, st.tokenizer, st.rollout_model.cfg.vision.spatial_merge_size)
        params = sampling.SamplingParams(temperature=0.0, max_tokens=max_new_tokens or cfg.max_new_tokens,
                                         stop_token_ids=(st.tokenizer.eos_id,))
        requests.append(sampling.Request(ids, params, px, grid))
    # each data-parallel rank (a TP group counts as one) generates every dp-th prompt; all ranks then
    # share the results and score the whole set, so the means are exact whatever the split
    tp = dist.get_world_size(st.tp_group) if st.tp_group is not None else 1
    dp, results = st.dist.world_size // tp, [None] * len(requests)
    mine = st.sampler.generate(requests[st.dist.rank // tp::dp])
    parts = [mine] * st.dist.world_size  # each rank's results (all equal when dp == 1)
    if dp > 1:
        dist.all_gather_object(parts, mine)
    for rank, part in enumerate(parts):
        results[rank // tp::dp] = part
    for sample, r, req in zip(samples, results, requests):
        seqs.append(Sequence(sample, 0, req.prompt_ids, list(r.token_ids), list(r.logprobs), r.finish_reason,
                             st.tokenizer.decode(r.token_ids, skip_special_tokens=True)))
    metrics = score_fn(seqs)
    by_label = {}
    for s in seqs:
        by_label.setdefault(s.sample.get("label", "?"), []).append(s.reward)
    out = {f"eval/{k}": v for k, v in metrics.items() if isinstance(v, (int, float))}
    out["eval/reward"] = sum(s.reward for s in seqs) / max(len(seqs), 1)
    out.update({f"eval/reward/{k}": sum(v) / len(v) for k, v in sorted(by_label.items())})
    out["eval/response_len"] = sum(len(s.response_ids) for s in seqs) / max(len(seqs), 1)
    return out


def save(st):
    st.checkpointer.save(st.step, st.policy, st.optimizer, st.scheduler, {"step": st.step, **st.extra})


def resume(st):
    """Restore the newest complete checkpoint; returns True when one was found."""
    path = st.checkpointer.latest()
    if path is None:
        return False
    extra = st.checkpointer.load(path, st.policy, st.optimizer, st.scheduler)
    st.step = extra.pop("step")
    st.extra = extra
    refresh_sampler(st)
    return True
