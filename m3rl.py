"""
m3rl.py: Stage 2 of SafeLadder, M³-RL: multimodal, multitask, multi-objective RL.

    python m3rl.py                                  # tiny SFT checkpoint (built first if missing), demo data,
                                                    # oracle judges, CPU: held-out reward before -> after
    torchrun --nproc_per_node=2 m3rl.py             # the same with FSDP over gloo
    torchrun --nnodes=4 --nproc_per_node=8 m3rl.py --model=qwen2.5-vl-72b --init_from=CKPT \\
        --train_data=rl.jsonl --eval_data=rl_eval.jsonl --judges=judges.json --dtype=bfloat16 \\
        --activation_checkpointing --hsdp --max_new_tokens=8192 --lr=1e-6 --prompts_per_step=128

What it adds over the GRPO loop of rl.py (SPEC.md, "Stage 2"):
  - a multitask mixture: each prompt's label (safety, value, knowledge, math_rule, ...) is drawn by ratio;
  - the two-stage curriculum: (a) general capability (knowledge, general, rule-checked maths) from the
    SFT checkpoint, then (b) joint safety + value + knowledge + general, each with its mixture, length
    limit and reward recipe;
  - multi-principled rewards: R = F + sum_v w_v * score_v per label (verifiers.RECIPES), judged by
    generative verifiers (HTTP or in-process) or, on the demo, by rule oracles of the synthetic world;
  - safety constraints solved with Lagrange multipliers (OURS): unsafe rate <= eps and over-refusal
    rate <= eps; a multiplier rises while its constraint is violated and penalises the violating
    responses, and decays back to zero once it holds;
  - held-out evaluation every eval_every steps with the mean reward per label.
"""
import json
import os
import random
import subprocess
import sys
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

import model as qwen
import parallel
import processor
import rl
import verifiers


@dataclass
class Config(rl.RLConfig):
    init_from: str = "runs/sft/hf"          # the SFT export; built by `python sft.py` when missing
    run_dir: str = "runs/m3rl"
    train_data: str = "data/demo/rl_train.jsonl"
    eval_data: str = "data/demo/rl_eval.jsonl"
    eval_samples: int = 96                  # held-out prompts per evaluation
    skip_bad_records: bool = False          # skip (and count) malformed training records instead of stopping
    steps: int = 30
    lr: float = 2e-5                        # the tiny demo; the authors used 1e-6 at 7B-72B
    prompts_per_step: int = 16
    group_size: int = 8
    max_new_tokens: int = 48                # overridden by the stage limits below
    micro_batch_tokens: int = 1024          # packed tokens per forward: short rows keep CPU attention cheap
    eval_every: int = 10
    save_every: int = 15
    # curriculum: stage (a) for stage_a_steps, then stage (b)
    stage_a_steps: int = 10
    stage_a_mix: dict = field(default_factory=lambda: {"math_rule": 0.6, "general_rule": 0.2, "knowledge": 0.2})
    stage_b_mix: dict = field(default_factory=lambda: {"safety": 0.3, "value": 0.2, "knowledge": 0.15,
                                                       "math_rule": 0.25, "general_rule": 0.1})
    stage_a_max_new_tokens: int = 48        # the authors: 4096 (a) / 8192 (b)
    stage_b_max_new_tokens: int = 48
    recipe: str = ""                        # JSON file of recipe overrides {label: [[verifier, weight], ...]}
    judges: str = "oracle"                  # "oracle" (demo world), or a JSON file {verifier: {"url": ..} | {"checkpoint": ..}}
    # Lagrange safety constraints (negative epsilon disables one)
    unsafe_epsilon: float = 0.05
    over_refusal_epsilon: float = 0.10
    lagrange_lr: float = 1.0
    final_save: bool = True                 # checkpoint + HF export at the end (off for throughput runs)


# -----------------------------------------------------------------------------
# Data mixture and curriculum


def stage_of(cfg, step):
    return "a" if step < cfg.stage_a_steps else "b"


def draw_prompts(cfg, by_label, step, rank, world, round_=0):
    """This rank's share of the step's prompts: the global batch is drawn first (labels by the stage's
    mixture ratios, records uniformly within a label), seeded by (seed, step, round), then split over
    ranks; each record carries its global index, which seeds its rollouts. So the data position is the
    step itself (resuming needs no sampler state), and N ranks draw exactly what 1 rank draws."""
    mix = cfg.stage_a_mix if stage_of(cfg, step) == "a" else cfg.stage_b_mix
    labels = [lab for lab in mix if by_label.get(lab)]
    if not labels:
        raise ValueError(f"no training records for any label of the stage mixture {sorted(mix)}")
    rng = random.Random(hash((cfg.seed, step, round_)))
    picks = [rng.choice(by_label[lab]) for lab in rng.choices(labels, [mix[lab] for lab in labels],
                                                              k=cfg.prompts_per_step)]
    return [dict(rec, _index=k) for k, rec in enumerate(picks)][rank::world]


# -----------------------------------------------------------------------------
# Judges: oracles of the demo world, HTTP endpoints, or judge checkpoints run in-process


def in_process_judge(path, dist_):
    """A LocalJudge running a judge checkpoint (e.g. SafeWork-RM-Safety-7B) through model.py and our
    sampler: greedy text, and the candidate words' first-token probabilities from one forward. A judge
    that sees images (the safety judge) gets them before the text in its user turn."""
    import sampler as sampling
    judge = qwen.load_pretrained(path, device=dist_.device,
                                 dtype=torch.bfloat16 if dist_.device.type == "cuda" else torch.float32).eval()
    tok = processor.Tokenizer(os.path.join(path, "tokenizer.json"))
    engine = sampling.Sampler(judge, decode_fn=tok.decode)

    def encode(prompt, paths):  # -> (ids, pixel_values, image_grid_thw) of the judge's chat turn
        merge = judge.cfg.vision.spatial_merge_size
        content = ([*({"type": "image", "image": p} for p in paths), {"type": "text", "text": prompt}] if paths
                   else prompt)
        px, grid = processor.load_images(paths, None, merge_size=merge)
        text = processor.chat_text([{"role": "user", "content": content}], add_generation_prompt=True)
        return tok.encode(processor.expand_image_pads(text, grid, merge)), px, grid

    @torch.no_grad()
    def generate_fn(prompts, max_new_tokens, candidates, images=None):
        asks = [encode(p, images[k] if images else []) for k, p in enumerate(prompts)]
        params = sampling.SamplingParams(temperature=0.0, max_tokens=max_new_tokens, stop_token_ids=(tok.eos_id,))
        texts = [tok.decode(r.token_ids, skip_special_tokens=True)
                 for r in engine.generate([sampling.Request(i, params, px, grid) for i, px, grid in asks])]
        if not candidates:
            return texts
        first = [tok.encode(c)[0] for c in candidates]
        out = []
        for (i, px, grid), text in zip(asks, texts):
            px, grid = (None, None) if px is None else (px.to(dist_.device), grid.to(dist_.device))
            p = torch.softmax(judge(torch.tensor([i], device=dist_.device), px, grid)[0, -1].float(), -1)
            out.append((text, {c: p[t].item() for c, t in zip(candidates, first)}))
        return out

    return verifiers.LocalJudge(generate_fn, sees_images=True)


def build_judges(cfg, samples, dist_):
    if cfg.judges == "oracle":
        return verifiers.oracle_judges(samples)
    with open(cfg.judges) as f:
        spec = json.load(f)
    judges = {}
    for name, s in spec.items():
        judges[name] = (verifiers.HTTPJudge(s["url"], model=s.get("model", "judge"), api_key_env=s.get("api_key_env"),
                                            sees_images=s.get("images", True))  # false: a text-only endpoint
                        if "url" in s else in_process_judge(s["checkpoint"], dist_))
    return judges


# -----------------------------------------------------------------------------
# Rewards


def make_score_fn(recipe, judges, constraints=None, device="cpu"):
    """score_fn for rl.rl_step / rl.evaluate: sets each Sequence's reward and returns the metrics
    (per verifier, per label, failure counters, and the constraints' rates and multipliers)."""
    def score(seqs):
        rewards, metrics = verifiers.score_batch([s.sample for s in seqs], [s.text for s in seqs], recipe, judges)
        per_sample = metrics.pop("per_sample")
        if constraints:
            rewards, cm = verifiers.apply_constraints(constraints, rewards, per_sample,
                                                      all_reduce=lambda pair: parallel.all_sum(pair, device))
            metrics.update(cm)
        for s, r in zip(seqs, rewards):
            s.reward = float(r)
        return metrics
    return score


# -----------------------------------------------------------------------------


def ensure_sft_checkpoint(cfg):
    """The embedded default starts from the tiny SFT export; build it first when it is missing."""
    if cfg.init_from != Config.init_from or os.path.exists(os.path.join(cfg.init_from, "config.json")):
        return
    if int(os.environ.get("RANK", "0")) == 0:
        parallel.print0(f"{cfg.init_from} is missing: running `python sft.py` first")
        subprocess.run([sys.executable, "sft.py"], check=True, env={k: v for k, v in os.environ.items()
                                                                   if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")})
    if dist.is_initialized():
        dist.barrier()


def main(cfg):
    # ---- setup
    parallel.init_distributed()
    ensure_sft_checkpoint(cfg)
    st = rl.setup(cfg)
    d = st.dist
    train, skipped = processor.load_prompts(cfg.train_data, skip_bad=cfg.skip_bad_records)
    if skipped:
        parallel.print0(f"skipped {skipped} bad records of {cfg.train_data}")
    trained_labels = set(cfg.stage_a_mix) | set(cfg.stage_b_mix)  # evaluate what the curriculum trains
    held_out = [r for r in processor.load_prompts(cfg.eval_data)[0] if r["label"] in trained_labels][:cfg.eval_samples]
    by_label = {}
    for s in train:
        by_label.setdefault(s["label"], []).append(s)
    recipe = verifiers.load_recipe(cfg.recipe or None)
    judges = build_judges(cfg, train + held_out, d)
    verifiers.validate_recipe(recipe, trained_labels, judges)  # an unknown label stops us here, not as a silent 0
    constraints = [c for c in (
        verifiers.Constraint("unsafe", "unsafe", cfg.unsafe_epsilon, cfg.lagrange_lr),
        verifiers.Constraint("over_refusal", "over_refusal", cfg.over_refusal_epsilon, cfg.lagrange_lr),
    ) if c.epsilon >= 0]
    train_score = make_score_fn(recipe, judges, constraints, d.device)
    eval_score = make_score_fn(recipe, judges, device=d.device)
    if cfg.resume and rl.resume(st):
        for c in constraints:
            c.load_state_dict(st.extra["constraints"][c.name])
        parallel.print0(f"resumed at step {st.step}")

    def log_eval(tag):
        if not held_out:
            return {"eval/reward": float("nan")}
        m = rl.evaluate(st, held_out, eval_score, max_new_tokens=cfg.stage_b_max_new_tokens)
        st.logger.log(st.step, m)
        per_label = "  ".join(f"{k.split('/')[-1]} {v:.3f}" for k, v in m.items() if k.startswith("eval/reward/"))
        parallel.print0(f"[eval {tag}] step {st.step}: mean reward {m['eval/reward']:.3f} | {per_label}")
        return m

    # ---- loop
    before = log_eval("before")
    while st.step < cfg.steps:
        if cfg.stop_at and st.step == cfg.stop_at:
            rl.save(st)
            parallel.print0(f"stopping at step {st.step} (stop_at); continue with --resume")
            st.logger.close()
            return before, None
        step, stage = st.step, stage_of(cfg, st.step)
        st.cfg.max_new_tokens = cfg.stage_a_max_new_tokens if stage == "a" else cfg.stage_b_max_new_tokens
        rounds = iter(range(1, 1 + cfg.max_refills))
        metrics = rl.rl_step(st, draw_prompts(cfg, by_label, step, d.rank, d.world_size), train_score,
                             next_samples=lambda: draw_prompts(cfg, by_label, step, d.rank, d.world_size,
                                                               next(rounds, 0)))
        st.extra = {"stage": stage, "constraints": {c.name: c.state_dict() for c in constraints}}
        st.logger.log(step, {"stage_b": float(stage == "b"), **metrics})
        parallel.print0(f"step {step:4d} [{stage}] reward {metrics['reward']:.3f}  format "
                        f"{metrics.get('format', 0):.2f}  len {metrics['response_len']:.1f}  "
                        f"kl {metrics.get('kl', 0):.4f}  clip {metrics.get('clip_frac', 0):.3f}  "
                        f"mismatch {metrics['logp_mismatch']:.2e}  "
                        + "  ".join(f"λ_{c.name} {c.lam:.2f}" for c in constraints)
                        + f" | rollout {metrics['time_rollout']:.1f}s ({metrics['rollout_tok_s']:,.0f} tok/s)"
                        f" verify {metrics['time_verify']:.1f}s train {metrics['time_train']:.1f}s "
                        f"({metrics['train_tok_s']:,.0f} tok/s, MFU {metrics['mfu']:.1%}) sync {metrics['time_sync']:.1f}s"
                        + (f" peak {metrics['peak_mem_gib']:.1f} GiB" if "peak_mem_gib" in metrics else ""))
        if cfg.eval_every and st.step % cfg.eval_every == 0 and st.step < cfg.steps:
            log_eval("")
        if cfg.save_every and st.step % cfg.save_every == 0:
            rl.save(st)

    # ---- final eval, save, export
    after = log_eval("after")
    parallel.print0(f"held-out mean reward: {before['eval/reward']:.3f} -> {after['eval/reward']:.3f}")
    for k in sorted(after):
        if k.startswith("eval/score/") or k.startswith("eval/reward/"):
            parallel.print0(f"  {k[5:]:24s} {before.get(k, float('nan')):.3f} -> {after[k]:.3f}")
    if cfg.final_save:
        rl.save(st)
        parallel.export_hf(st.policy, os.path.join(cfg.run_dir, "hf"), d)
        if d.is_main:
            st.tokenizer.save(os.path.join(cfg.run_dir, "hf", "tokenizer.json"))
    st.logger.close()
    return before, after


if __name__ == "__main__":
    main(qwen.configure(Config()))
