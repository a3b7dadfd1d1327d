"""sft.py end to end on the demo data: resume == no interruption (bit for bit), 2 gloo ranks == 1 rank,
and bad data stops with the file and line (or is skipped and counted when asked)."""
import json
import os
import socket
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMALL = ["--max_len=256", "--rows_per_step=4", "--eval_every=0", "--samples_at_end=0", "--lr=1e-3"]


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_sft(run_dir, *args, nproc=1, load=True):
    launcher = [sys.executable] if nproc == 1 else [
        sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", f"--master_port={free_port()}"]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    out = subprocess.run([*launcher, "sft.py", f"--run_dir={run_dir}", *SMALL, *args], cwd=ROOT,
                         env={**env, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return load_file(os.path.join(run_dir, "hf", "model.safetensors")) if load else None, out.stdout


def test_resume_equals_no_interruption(tmp_path):
    full, _ = run_sft(tmp_path / "full", "--steps=4", "--save_every=0")
    run_sft(tmp_path / "cut", "--steps=4", "--stop_at=2", "--save_every=0", load=False)  # stopped at step 2
    resumed, log = run_sft(tmp_path / "cut", "--steps=4", "--save_every=0", "--resume")
    assert "resumed from" in log
    for k in full:
        assert torch.equal(resumed[k], full[k]), k


def test_two_ranks_equal_one_rank(tmp_path):
    one, log1 = run_sft(tmp_path / "one", "--steps=2", "--save_every=0")
    two, log2 = run_sft(tmp_path / "two", "--steps=2", "--save_every=0", nproc=2)
    for k in one:
        torch.testing.assert_close(two[k], one[k], rtol=1e-4, atol=1e-5)  # Adam amplifies fp32 sum order
    loss = [line for line in log1.splitlines() if line.startswith("held-out loss")]
    assert loss and loss == [line for line in log2.splitlines() if line.startswith("held-out loss")]


def test_bad_record_names_file_and_line(tmp_path):
    import sft
    good = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "<think>x</think> yo"}]}
    path = tmp_path / "train.jsonl"
    path.write_text(json.dumps(good) + "\n" + json.dumps({"messages": [{"role": "user", "content": "q"}]}) + "\n")
    cfg = sft.Config(train_data=str(path), eval_data=str(path), run_dir=str(tmp_path / "run"), steps=1)
    with pytest.raises(ValueError, match=r"train\.jsonl:2: .*assistant"):
        sft.main(cfg)


def test_packed_equals_padded_loss_and_gradients():
    """The same conversations (one with an image) packed into one row, or one per padded row: the same
    loss sum and the same gradients."""
    import model
    import processor
    import sft
    tok = processor.Tokenizer(processor.DEFAULT_TOKENIZER)
    exs, _ = processor.load_sft_examples(os.path.join(processor.DATA_DIR, "demo", "sft_eval.jsonl"), tok)
    exs = [e for e in exs if e["pixel_values"] is not None][:1] + [e for e in exs if e["pixel_values"] is None][:3]
    packed = processor.pack_examples(exs, 1024)
    padded = [processor.pack_examples([e], 1024)[0] for e in exs]
    assert len(packed) == 1 and len(padded) == 4
    results = []
    for rows in (packed, padded):
        m = model.build("tiny", seed=2)
        loss, n = sft.batch_loss_sum(m, rows, "cpu")
        loss.backward()
        results.append((loss.item(), n, [p.grad.clone() for p in m.parameters()]))
    assert results[0][1] == results[1][1]
    assert abs(results[0][0] - results[1][0]) < 1e-4 * abs(results[1][0])
    for a, b in zip(results[0][2], results[1][2]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
