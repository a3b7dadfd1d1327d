"""
sft.py: Stage 1 of SafeLadder, chain-of-thought SFT: the cold start for long reasoning.

    python sft.py                                   # tiny model on the demo world, CPU, a few minutes
    torchrun --nproc_per_node=2 sft.py              # the same with FSDP over gloo (same losses)
    torchrun --nnodes=2 --nproc_per_node=8 sft.py --model=qwen2.5-vl-7b --init_from=Qwen2.5-VL-7B-Instruct \\
        --train_data=cot.jsonl --eval_data=cot_eval.jsonl --dtype=bfloat16 --lr=1e-5 --max_len=8192 \\
        --activation_checkpointing --hsdp

What it does (SPEC.md, "Stage 1"): next-token cross-entropy on the assistant tokens only, over
conversations whose assistant turns read `<think>reasoning</think> answer`; images in the user turns;
samples packed into rows of max_len tokens with attention confined to each sample and M-RoPE
positions restarting per sample; vision tower frozen by default; AdamW with warmup + cosine decay,
gradient accumulation and clipping; held-out loss; sharded checkpoints with exact resume; an HF export
that the next stage (m3rl.py) starts from.
"""
import math
import os
import random
import time
from dataclasses import dataclass

import torch

import model as qwen
import ops
import parallel
import processor
import verifiers


@dataclass
class Config:
    model: str = "tiny"                 # preset, used when init_from is empty (random init)
    init_from: str = ""                 # HF checkpoint directory to start from
    tokenizer: str = ""                 # tokenizer.json (default: init_from's, else data/tokenizer.json)
    train_data: str = "data/demo/sft_train.jsonl"
    eval_data: str = "data/demo/sft_eval.jsonl"
    skip_bad_records: bool = False      # skip (and count) malformed records instead of stopping
    run_dir: str = "runs/sft"
    max_len: int = 512                  # packed row length in tokens
    rows_per_step: int = 16             # global packed rows per optimizer step
    grad_accum: int = 1                 # micro-steps per optimizer step (rows_per_step is split across them)
    steps: int = 200
    lr: float = 3e-3                    # the tiny demo; real models: 1e-5 (OURS, SPEC.md)
    min_lr_ratio: float = 0.1
    warmup_ratio: float = 0.03
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    freeze_vision: bool = True
    dtype: str = "float32"              # float32 | bfloat16: compute dtype under FSDP (master weights stay fp32)
    activation_checkpointing: bool = False
    hsdp: bool = False                  # shard inside a node, replicate across nodes
    eval_every: int = 100
    save_every: int = 150
    resume: bool = False                # continue from the newest complete checkpoint in run_dir
    stop_at: int = 0                    # checkpoint and exit at this step (a job-length limit); 0: run to the end
    seed: int = 0
    samples_at_end: int = 6             # greedy answers printed at the end
    wandb: bool = False                 # offline unless WANDB_MODE / WANDB_API_KEY say otherwise


# -----------------------------------------------------------------------------
# Data


def load_rows(path, tokenizer, cfg, cfg_model):
    """Tokenise conversations (our jsonl or ShareGPT/LLaVA style) and pack them into rows."""
    examples, skipped = processor.load_sft_examples(path, tokenizer, skip_bad=cfg.skip_bad_records,
                                                    merge_size=cfg_model.vision.spatial_merge_size)
    rows = processor.pack_examples(examples, cfg.max_len)
    return rows, len(examples), skipped


def row_order(n_rows, epoch, seed):
    """The data order: a fresh seeded shuffle of the packed rows every epoch."""
    order = list(range(n_rows))
    random.Random(hash((seed, epoch))).shuffle(order)
    return order


def rows_for_step(rows, step, cfg, d):
    """This rank's rows for an optimizer step, split into grad_accum micro-batches. The position in
    the data is a pure function of the step, so a resumed run reads exactly what it would have."""
    per_step = cfg.rows_per_step
    first = step * per_step
    picked = []
    for k in range(first, first + per_step):
        epoch, i = divmod(k, len(rows))
        picked.append(rows[row_order(len(rows), epoch, cfg.seed)[i]])
    mine = picked[d.rank::d.world_size]
    n = max(1, len(mine) // cfg.grad_accum)
    return [mine[i:i + n] for i in range(0, len(mine), n)]


def lr_at(step, cfg):
    warmup = max(1, int(cfg.warmup_ratio * cfg.steps))
    if step < warmup:
        return cfg.lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, cfg.steps - warmup)
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


# -----------------------------------------------------------------------------
# Loss


def batch_loss_sum(m, rows, device):
    """Sum of -log p(target) over the assistant tokens of packed rows, and their count. The fused
    ops.token_logprobs never materialises the [tokens x vocab] logits."""
    batch = processor.collate_rows(rows)
    labels = batch["labels"].to(device)                # (B, T), -100 where there is no loss
    where = (labels[:, 1:] != -100).nonzero()          # (N, 2): hidden state at t predicts label at t + 1
    targets = labels[:, 1:][labels[:, 1:] != -100]     # (N,)

    def head(h, w):
        return ops.token_logprobs(h[where[:, 0], where[:, 1]], w, targets)[0]

    logp = m(batch["input_ids"].to(device), _maybe(batch["pixel_values"], device),
             _maybe(batch["image_grid_thw"], device), position_ids=batch["position_ids"].to(device),
             seq_ids=batch["seq_ids"].to(device), head=head)
    return -logp.sum(), targets.numel()


def _maybe(t, device):
    return None if t is None else t.to(device)


@torch.no_grad()
def eval_loss(m, rows, cfg, d):
    """Mean held-out loss per assistant token. Every rank runs the same number of forwards (FSDP's
    collectives need it): a rank left without rows in the last batch reruns one and discards it."""
    total, count = 0.0, 0
    span = d.world_size * cfg.rows_per_step
    for start in range(0, len(rows), span):
        mine = rows[start:start + span][d.rank::d.world_size]
        s, n = batch_loss_sum(m, mine or rows[start:start + 1], d.device)
        if mine:
            total, count = total + s.item(), count + n
    return parallel.all_sum(float(total), d.device) / max(parallel.all_sum(float(count), d.device), 1)


# -----------------------------------------------------------------------------


def main(cfg):
    # ---- setup
    d = parallel.init_distributed()
    torch.manual_seed(cfg.seed)
    # ---- model: built, wrapped (FSDP, activation checkpointing) and loaded per rank by parallel.py
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[cfg.dtype]
    m = parallel.build_for_training(d, cfg.model, cfg.init_from, param_dtype=dtype, hsdp=cfg.hsdp,
                                    ac=cfg.activation_checkpointing, freeze_vision=cfg.freeze_vision, seed=cfg.seed)
    tok_path = cfg.tokenizer or (os.path.join(cfg.init_from, "tokenizer.json") if cfg.init_from
                                 else processor.DEFAULT_TOKENIZER)
    tokenizer = processor.Tokenizer(tok_path)
    logger = parallel.MetricsLogger(cfg.run_dir, d, cfg, cfg.wandb)

    params = [p for p in m.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, fused=d.device.type == "cuda")
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_at(s, cfg) / cfg.lr)

    # ---- data
    if cfg.rows_per_step % (d.world_size * cfg.grad_accum):
        raise SystemExit(f"rows_per_step={cfg.rows_per_step} must be a multiple of world size x grad_accum "
                         f"({d.world_size} x {cfg.grad_accum}): every rank runs the same micro-batches")
    train_rows, n_train, skipped = load_rows(cfg.train_data, tokenizer, cfg, m.cfg)
    eval_rows, n_eval, skipped_eval = load_rows(cfg.eval_data, tokenizer, cfg, m.cfg)
    parallel.print0(f"{n_train} training conversations in {len(train_rows)} rows of {cfg.max_len} tokens, "
                    f"{n_eval} held out" + (f"; skipped {skipped + skipped_eval} bad records" if skipped +
                                            skipped_eval else ""))

    checkpointer = parallel.Checkpointer(cfg.run_dir)
    step = 0
    if cfg.resume and (path := checkpointer.latest()):
        step = checkpointer.load(path, m, optimizer, scheduler)["step"]
        parallel.print0(f"resumed from {path} at step {step}")
    first_eval = eval_loss(m, eval_rows, cfg, d)
    parallel.print0(f"step {step}: held-out loss {first_eval:.4f}")

    # ---- loop
    t_start, tokens_seen = time.time(), 0
    while step < cfg.steps:
        if cfg.stop_at and step == cfg.stop_at:
            checkpointer.save(step, m, optimizer, scheduler, {"step": step})
            parallel.print0(f"stopping at step {step} (stop_at); continue with --resume")
            logger.close()
            return first_eval, None
        t0 = time.time()
        micro = rows_for_step(train_rows, step, cfg, d)
        n_local = sum(sum(1 for x in r["labels"][1:] if x != -100) for mb in micro for r in mb)
        n_tokens = parallel.all_sum(float(n_local), d.device)
        loss_sum = 0.0
        for mb in micro:
            s, _ = batch_loss_sum(m, mb, d.device)
            # normalise by the global token count; times world size because FSDP averages gradients
            (s * d.world_size / n_tokens).backward()
            loss_sum += s.item()
        loss = parallel.all_sum(loss_sum, d.device) / n_tokens
        grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        grad_norm = float(grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm)
        if math.isfinite(grad_norm):
            optimizer.step()
        else:  # skip the update, count it (DESIGN.md reliability rules)
            logger.count("skipped_steps")
        optimizer.zero_grad(set_to_none=True)
        scheduler.step()
        step += 1
        dt = time.time() - t0
        tokens_seen += sum(len(r["input_ids"]) for mb in micro for r in mb) * d.world_size
        eta = (time.time() - t_start) / max(step, 1) * (cfg.steps - step)
        logger.log(step, {"loss": loss, "grad_norm": grad_norm, "lr": scheduler.get_last_lr()[0],
                          "tok_s": tokens_seen / (time.time() - t_start)})
        if step % 10 == 0 or step == cfg.steps:
            parallel.print0(f"step {step:5d} | loss {loss:.4f} | lr {scheduler.get_last_lr()[0]:.2e} | "
                            f"{tokens_seen / (time.time() - t_start):,.0f} tok/s | {dt:.2f}s/step | "
                            f"ETA {eta / 60:.1f} min")
        if cfg.eval_every and step % cfg.eval_every == 0 and step < cfg.steps:
            ev = eval_loss(m, eval_rows, cfg, d)
            logger.log(step, {"eval_loss": ev})
            parallel.print0(f"step {step}: held-out loss {ev:.4f}")
        if cfg.save_every and step % cfg.save_every == 0:
            checkpointer.save(step, m, optimizer, scheduler, {"step": step})

    # ---- eval, samples, save
    final_eval = eval_loss(m, eval_rows, cfg, d)
    logger.log(step, {"eval_loss": final_eval})
    parallel.print0(f"held-out loss {first_eval:.4f} -> {final_eval:.4f}")
    checkpointer.save(step, m, optimizer, scheduler, {"step": step})
    export = os.path.join(cfg.run_dir, "hf")
    parallel.export_hf(m, export, d)
    if d.is_main:
        tokenizer.save(os.path.join(export, "tokenizer.json"))
        show_samples(export, cfg)
    logger.close()
    return first_eval, final_eval


def show_samples(export, cfg):
    """Greedy answers of the exported model to a few held-out prompts, with the format rate."""
    m = qwen.load_pretrained(export).eval()
    tokenizer = processor.Tokenizer(os.path.join(export, "tokenizer.json"))
    records = processor.read_jsonl(cfg.eval_data)[:cfg.samples_at_end]
    ok = 0
    for rec in records:
        ids, px, grid = processor.encode_prompt(rec, tokenizer, merge_size=m.cfg.vision.spatial_merge_size,
                                                base_dir=os.path.dirname(cfg.eval_data))
        out = qwen.generate(m, torch.tensor([ids]), pixel_values=px, image_grid_thw=grid, max_new_tokens=64,
                            eos_token_id=tokenizer.eos_id)
        text = tokenizer.decode(out[0].tolist(), skip_special_tokens=True)
        ok += verifiers.format_reward(text) > 0
        parallel.print0(f"  Q: {processor.prompt_text(rec)[:70]!r}\n  A: {text[:110]!r}")
    parallel.print0(f"format <think>...</think> answer: {ok}/{len(records)}")


if __name__ == "__main__":
    main(qwen.configure(Config()))
