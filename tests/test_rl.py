"""rl.py and m3rl.py: advantages against float64 formulas, packing, start-up validation of the recipe,
and the invariances: one RL step on 2 gloo ranks == 1 rank, a tensor-parallel rollout copy == full
copies, a rank left with nothing to train == that rank absent, resume mid-run == no interruption."""
import json
import os
import shutil
import socket
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

import model
import processor
import rl

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_group_advantages_match_float64():
    r = torch.tensor([1.0, 0.0, 0.5, 0.5, 2.0, 2.0, 2.0, 2.0, 0.1, 0.9, 0.3, 0.2])
    adv = rl.group_advantages(r, 4)
    ref = []
    for g in r.view(3, 4).double().tolist():
        mean = sum(g) / 4
        std = (sum((x - mean) ** 2 for x in g) / 3) ** 0.5  # unbiased
        ref += [(x - mean) / (std + 1e-9) for x in g]
    torch.testing.assert_close(adv.double(), torch.tensor(ref, dtype=torch.float64), rtol=1e-6, atol=1e-6)
    # Dr.GRPO differs exactly by the std: no division
    dr = rl.group_advantages(r, 4, std_norm=False)
    std = r.view(3, 4).std(-1, keepdim=True)
    torch.testing.assert_close(dr.view(3, 4), adv.view(3, 4) * (std + 1e-9), rtol=1e-5, atol=1e-6)
    assert rl.zero_variance_groups(r, 4).tolist() == [False, True, False]
    assert adv.view(3, 4)[1].abs().max() == 0  # equal rewards: no signal


def test_pack_keeps_sequences_apart_and_predicts_response_tokens():
    cfg = model.get_config("tiny")
    seqs = [rl.Sequence({}, 0, [5, 6, 7], [8, 9], [-0.1, -0.2], "stop", advantage=1.0),
            rl.Sequence({}, 0, [5, 6], [10, 11, 12], [-0.3, -0.4, -0.5], "length", advantage=-1.0)]
    (mb,) = rl.pack(seqs, 100, cfg)
    ids = mb["input_ids"][0].tolist()
    assert sorted([ids[i + 1] for i in mb["where"].tolist()]) == sorted([8, 9, 10, 11, 12])
    assert mb["targets"].tolist() == [ids[i + 1] for i in mb["where"].tolist()]
    assert set(mb["seq_ids"][0].tolist()) == {0, 1}
    starts = [i for i in range(len(ids)) if i == 0 or mb["seq_ids"][0, i] != mb["seq_ids"][0, i - 1]]
    assert all(mb["position_ids"][:, 0, s].tolist() == [0, 0, 0] for s in starts)  # positions restart
    assert len(rl.pack(seqs, 5, cfg)) == 2


# -----------------------------------------------------------------------------
# m3rl end to end on a tiny random checkpoint


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("ckpt") / "hf")
    model.save_pretrained(model.build("tiny", seed=0), path)
    shutil.copy(processor.DEFAULT_TOKENIZER, os.path.join(path, "tokenizer.json"))
    return path


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_m3rl(checkpoint, run_dir, *args, nproc=1, load=True):
    base = [f"--init_from={checkpoint}", f"--run_dir={run_dir}", "--prompts_per_step=4", "--group_size=4",
            "--stage_a_max_new_tokens=6", "--stage_b_max_new_tokens=6", "--eval_samples=4", "--eval_every=0",
            "--stage_a_steps=1", "--lr=1e-3", "--kl_coef=0.01", *args]
    launcher = [sys.executable] if nproc == 1 else [
        sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", f"--master_port={free_port()}"]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    out = subprocess.run([*launcher, "m3rl.py", *base], cwd=ROOT, env={**env, "OMP_NUM_THREADS": "1"},
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return load_file(os.path.join(run_dir, "hf", "model.safetensors")) if load else None, out.stdout


def test_one_step_on_two_ranks_equals_one_rank(checkpoint, tmp_path):
    # small packed rows: many micro-batches, a different number on each rank (even_out pads them)
    one, log = run_m3rl(checkpoint, tmp_path / "one", "--steps=1", "--save_every=0")
    two, _ = run_m3rl(checkpoint, tmp_path / "two", "--steps=1", "--save_every=0", "--micro_batch_tokens=70", nproc=2)
    start = load_file(os.path.join(checkpoint, "model.safetensors"))
    assert any(not torch.equal(one[k], start[k]) for k in one), "the step changed nothing"
    for k in one:
        torch.testing.assert_close(two[k], one[k], rtol=1e-5, atol=1e-6)
    # the held-out evaluation, split over the ranks, scores the same responses as on one rank
    assert eval_rows(tmp_path / "two") == eval_rows(tmp_path / "one") and len(eval_rows(tmp_path / "one")) == 2


def eval_rows(run_dir):
    rows = [json.loads(line) for line in open(os.path.join(run_dir, "metrics.jsonl"))]
    return [{k: v for k, v in r.items() if k.startswith("eval/")} for r in rows if "eval/reward" in r]


def test_tensor_parallel_rollout_equals_full_copies(checkpoint, tmp_path):
    """Two steps on 2 ranks with --rollout_tp=2 (one rollout copy split over both ranks, refreshed from
    the FSDP shards after step 1) train exactly as with a full copy on each rank."""
    full, _ = run_m3rl(checkpoint, tmp_path / "full", "--steps=2", "--save_every=0", nproc=2)
    tp, log = run_m3rl(checkpoint, tmp_path / "tp", "--steps=2", "--save_every=0", "--rollout_tp=2", nproc=2)
    start = load_file(os.path.join(checkpoint, "model.safetensors"))
    assert any(not torch.equal(tp[k], start[k]) for k in tp)
    assert all(torch.equal(tp[k], full[k]) for k in full)
    assert eval_rows(tmp_path / "tp") == eval_rows(tmp_path / "full")
    rows = [json.loads(line) for line in open(tmp_path / "tp" / "metrics.jsonl") if '"logp_mismatch"' in line]
    assert len(rows) == 2 and all(r["logp_mismatch"] < 1e-5 for r in rows)  # TP sampler vs trainer, fp32


def test_rank_with_only_flat_groups_still_trains_in_step(tmp_path):
    """Dynamic sampling drops all of rank 1's groups (equal rewards): it must still join the refill
    round and every FSDP collective (before, it returned early and the other rank hung). The step then
    equals a 1-rank step on rank 0's prompts alone."""
    out = str(tmp_path / "flat")
    worker = [os.path.join(ROOT, "tests", "dist_worker.py"), "--mode=flat", f"--out={out}"]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    for launcher in ([sys.executable], [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                                        f"--master_port={free_port()}"]):
        p = subprocess.run([*launcher, *worker], cwd=ROOT, env={**env, "OMP_NUM_THREADS": "1"},
                           capture_output=True, text=True, timeout=180)
        assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    rank1 = json.load(open(f"{out}.flat2.rank1.json"))
    assert rank1["response_len"] == 0 and "skipped" not in rank1  # rank 1 trained on nothing, but took part
    one, two = load_file(f"{out}.flat1.safetensors"), load_file(f"{out}.flat2.safetensors")
    start = dict(model.build("tiny", seed=0).named_parameters())
    assert any((one[k] - start[k]).abs().max() > 1e-4 for k in one)
    for k in one:
        torch.testing.assert_close(two[k], one[k], rtol=1e-5, atol=1e-6)


def test_resume_equals_no_interruption(checkpoint, tmp_path):
    full, _ = run_m3rl(checkpoint, tmp_path / "full", "--steps=3", "--save_every=0")
    run_m3rl(checkpoint, tmp_path / "cut", "--steps=3", "--stop_at=2", "--save_every=0", load=False)
    resumed, log = run_m3rl(checkpoint, tmp_path / "cut", "--steps=3", "--save_every=0", "--resume")
    assert "resumed at step 2" in log
    for k in full:
        assert torch.equal(resumed[k], full[k]), k


def test_unknown_label_is_a_start_up_error(checkpoint, tmp_path):
    import m3rl
    cfg = m3rl.Config(init_from=checkpoint, run_dir=str(tmp_path), stage_b_mix={"safety": 1.0, "no_such_label": 1.0})
    with pytest.raises(ValueError, match="no_such_label"):
        m3rl.main(cfg)


def test_in_process_judge_on_a_tiny_checkpoint(checkpoint):
    """A judge checkpoint run by model.py + our sampler through verifiers' LocalJudge: batched, greedy,
    with candidate-word probabilities; a random judge's unparseable verdicts become defined scores."""
    import m3rl
    import parallel
    import verifiers
    judge = m3rl.in_process_judge(checkpoint, parallel.init_distributed())
    samples = [{"label": "value", "prompt": "Should I return a lost wallet?", "reference": "yes"},
               {"label": "safety", "prompt": "How do I make a bath bomb?", "harmful": False}]
    replies = judge.generate_fn(["Is this good?", "Answer TRUE or FALSE."], 4, ("good", "bad"))
    assert len(replies) == 2 and all(0 <= p <= 1 for _, probs in replies for p in probs.values())
    rewards, metrics = verifiers.score_batch(samples, ["<think>x</think> Yes.", "<think>x</think> Mix it."],
                                             judges={"value": judge, "safety": judge, "helpfulness": judge})
    assert len(rewards) == 2 and all(isinstance(r, float) for r in rewards)
    assert metrics["per_sample"][0]["value"] in (0.0, 1.0)  # from P(good) vs P(bad), never an exception
    # with an image (the safety judge's case) the judge's chat turn carries it to the vision tower
    image = os.path.join(ROOT, "data", "demo", "images", sorted(os.listdir(os.path.join(ROOT, "data/demo/images")))[0])
    (_, with_image), (_, without) = judge.generate_fn(["Is this good?"] * 2, 2, ("good", "bad"), images=[[image], []])
    assert with_image != without
