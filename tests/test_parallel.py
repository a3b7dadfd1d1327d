"""parallel.py on CPU over gloo, each check an invariance (STYLE.md 8): 2 ranks == 1 rank (FSDP2, with
activation checkpointing), two "nodes" with HSDP == 1 rank, resume == no interruption (bit for bit,
surviving a crash mid-save), per-rank loading reads only owned slices and round-trips through an HF
export, TP=2 == TP=1, and the planner's measured 72B shards add up to the parameter count.
The distributed runs are tests/dist_worker.py under torchrun (subprocesses with timeouts)."""
import json
import os
import signal
import socket
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

import model
import parallel
from dist_worker import LOAD_VARIANTS

pytestmark = pytest.mark.slow
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORKER = os.path.join(ROOT, "tests", "dist_worker.py")
STEPS = 8


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def env():
    e = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR")}
    return {**e, "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT}


def launch(args, nproc=None, extra=(), background=False):
    """The worker alone (nproc None) or under torchrun with nproc local ranks."""
    cmd = [sys.executable, WORKER, *args] if nproc is None else [
        sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", *extra,
        *([] if extra else [f"--master_port={free_port()}"]), WORKER, *args]
    p = subprocess.Popen(cmd, cwd=ROOT, env=env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                         start_new_session=True)  # its own process group: a timeout kills the workers too
    return p if background else finish(p)


def finish(p, timeout=150):
    try:
        out, _ = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)
        out, _ = p.communicate()
        raise AssertionError(f"timed out after {timeout} s:\n{out[-4000:]}") from None
    return p.returncode, out


def check(result):
    rc, out = result
    assert rc == 0, out[-4000:]


def results(prefix):
    with open(prefix + ".json") as f:
        return json.load(f), load_file(prefix + ".safetensors")


@pytest.fixture(scope="module")
def ref(tmp_path_factory):
    """One process, plain model (no FSDP), global batch of 4."""
    out = str(tmp_path_factory.mktemp("ref") / "ref")
    check(launch([f"--out={out}", f"--steps={STEPS}", f"--total_steps={STEPS}"]))
    return results(out)


@pytest.fixture(scope="module")
def fsdp(tmp_path_factory):
    """Two ranks, FSDP2 + activation checkpointing, each rank half of the same global batch."""
    out = str(tmp_path_factory.mktemp("fsdp") / "fsdp")
    check(launch([f"--out={out}", f"--steps={STEPS}", f"--total_steps={STEPS}", "--ac"], nproc=2))
    return results(out)


def assert_same_training(a, b, loss_rtol=1e-6, weight_atol=5e-5):
    # fp32 everywhere; only the order of the gradient sums differs between layouts (measured: 1e-7
    # relative on the losses, 8e-6 on weights of std 0.02 after 8 AdamW steps of lr 3e-3)
    (ja, wa), (jb, wb) = a, b
    assert torch.allclose(torch.tensor(ja["losses"]), torch.tensor(jb["losses"]), rtol=loss_rtol, atol=0)
    assert wa.keys() == wb.keys() and len(wa) == len(dict(model.build("tiny").named_parameters()))
    for k in wa:
        assert (wa[k] - wb[k]).abs().max() <= weight_atol, k


def test_two_ranks_match_one_rank(ref, fsdp):
    assert len(ref[0]["losses"]) == STEPS
    assert max(ref[0]["losses"]) - min(ref[0]["losses"]) > 1e-3  # it trained: the weights moved
    assert_same_training(ref, fsdp)


def test_hsdp_two_nodes_match_one_rank(ref, tmp_path):
    """Two torchrun commands on one machine, one process each, c10d rendezvous: mesh (2 replicate, 1 shard)."""
    out, port = str(tmp_path / "hsdp"), free_port()
    nodes = [launch([f"--out={out}", f"--steps={STEPS}", f"--total_steps={STEPS}", "--hsdp", "--gpus_per_node=1"],
                    nproc=1, background=True,
                    extra=["--nnodes=2", f"--node_rank={r}", "--rdzv_backend=c10d",
                           f"--rdzv_endpoint=127.0.0.1:{port}", "--rdzv_id=hsdp"]) for r in (0, 1)]
    for p in nodes:
        check(finish(p))
    hsdp = results(out)
    assert hsdp[0]["mesh"] == {"shape": [2, 1], "names": ["replicate", "shard"]}
    assert_same_training(ref, hsdp)


def test_resume_is_exact_and_survives_a_crash_mid_save(fsdp, tmp_path):
    run, half = str(tmp_path / "run"), STEPS // 2
    common = [f"--steps={STEPS}", f"--total_steps={STEPS}", "--ac", f"--run_dir={run}", f"--save_every={half // 2}"]
    # checkpoints at 2 and 4, then the process dies inside the save at 6: shards written, never renamed
    rc, out = launch([f"--out={tmp_path / 'crash'}", f"--die_in_save_at={half + half // 2}", *common], nproc=2)
    assert rc != 0
    assert sorted(os.listdir(run)) == ["step_00000002", "step_00000004", "step_00000006.tmp"]
    assert parallel.Checkpointer(run).latest() == os.path.join(run, "step_00000004")
    # a new launch resumes from step 4 and runs to the end: identical to the uninterrupted run
    check(launch([f"--out={tmp_path / 'resumed'}", "--resume", *common], nproc=2))
    (j, w), (jf, wf) = results(str(tmp_path / "resumed")), fsdp
    assert j["losses"] == jf["losses"] and j["lr"] == jf["lr"]
    assert all(torch.equal(w[k], wf[k]) for k in wf)
    assert j["extra"] == {"step": 4, "losses": jf["losses"][:4], "stage": "a", "duals": [0.25, 4]}
    assert j["optimizer_states"] == jf["optimizer_states"]  # none invented for never-updated params
    assert sorted(os.listdir(run)) == ["step_00000006", "step_00000008"]  # keep=2, no .tmp left


def test_apply_ac_keeps_names_and_gradients_and_drops_block_activations():
    """Checkpointed blocks keep their parameter names (the HF map, DCP keys), give the same gradients,
    and leave only their inputs saved for backward."""
    ids = torch.randint(0, 2000, (2, 64), generator=torch.Generator().manual_seed(0))

    def run(ac):
        m = model.build("tiny", seed=0)
        if ac:
            parallel.apply_ac(m)
        saved = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t, lambda t: t):
            loss = m(ids).float().logsumexp(-1).mean()
        loss.backward()
        return m, sum(saved)

    (plain, n_plain), (ac, n_ac) = run(False), run(True)
    assert [n for n, _ in plain.named_parameters()] == [n for n, _ in ac.named_parameters()]
    for (n, p), q in zip(plain.named_parameters(), ac.parameters()):
        assert (p.grad is None and q.grad is None) or torch.equal(p.grad, q.grad), n
    assert n_ac < 0.5 * n_plain


def test_checkpointer_single_process(tmp_path):
    """No process group at all: DCP still saves/loads, RNG and scheduler come back, .tmp is ignored."""
    torch.manual_seed(0)
    m = model.build("tiny")
    opt = torch.optim.AdamW(m.parameters(), lr=1e-3)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1 / (s + 1))
    ids = torch.randint(0, 2000, (1, 9))
    m(ids).sum().backward()
    opt.step()
    sched.step()
    ck = parallel.Checkpointer(str(tmp_path), keep=1)
    ck.save(1, m, opt, sched, {"data_pos": 17})
    expect_rng, expect = torch.rand(3), {k: v.clone() for k, v in m.state_dict().items()}
    os.makedirs(tmp_path / "step_00000009.tmp")       # a crashed save
    os.makedirs(tmp_path / "step_00000008")           # a directory without state.json
    assert ck.latest() == str(tmp_path / "step_00000001")
    m2 = model.build("tiny", seed=1)
    opt2 = torch.optim.AdamW(m2.parameters(), lr=1e-3)
    sched2 = torch.optim.lr_scheduler.LambdaLR(opt2, lambda s: 1 / (s + 1))
    assert ck.load(ck.latest(), m2, opt2, sched2) == {"data_pos": 17}
    assert torch.equal(torch.rand(3), expect_rng)
    assert all(torch.equal(v, expect[k]) for k, v in m2.state_dict().items())
    assert sched2.last_epoch == 1 and opt2.param_groups[0]["lr"] == opt.param_groups[0]["lr"]
    s1, s2 = opt.state_dict()["state"], opt2.state_dict()["state"]  # only params that had gradients
    assert s1.keys() == s2.keys() and all(torch.equal(s1[i][k], s2[i][k]) for i in s1 for k in s1[i])


def test_metrics_logger(tmp_path):
    log = parallel.MetricsLogger(str(tmp_path), parallel.init_distributed(), None, use_wandb=False)
    log.count("skipped_steps")
    log.log(1, {"loss": torch.tensor(2.5), "lr": 1e-3})
    log.log(2, {"loss": 2.0})
    log.close()
    rows = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    assert rows == [{"step": 1, "loss": 2.5, "lr": 1e-3, "skipped_steps": 1},
                    {"step": 2, "loss": 2.0, "skipped_steps": 1}]


@pytest.fixture(scope="module")
def load_tp(tmp_path_factory):
    """HF checkpoints of the tiny model, tied and untied (the untied one with an odd vocabulary, so
    the embedding rows split unevenly: 1023 + 1022), then one 2-rank launch of modes load, tp, vlm, rollout."""
    d = tmp_path_factory.mktemp("load")
    originals = {}
    for variant in ("tied", "untied"):
        m = model.build(LOAD_VARIANTS[variant], seed=5)
        model.save_pretrained(m, str(d / "hf" / variant))
        originals[variant] = {k: v.clone() for k, v in m.named_parameters()}
    out = str(d / "out")
    check(launch(["--mode=load,tp,vlm,rollout", f"--ckpt={d / 'hf'}", f"--out={out}"], nproc=2))
    return d, out, originals


@pytest.mark.parametrize("variant", ["tied", "untied"])
def test_load_sharded_reads_only_owned_slices(load_tp, variant):
    d, out, originals = load_tp
    ckpt = load_file(str(d / "hf" / variant / "model.safetensors"))
    total = sum(t.numel() for t in ckpt.values())
    ranks = [json.load(open(f"{out}.{variant}.rank{r}.json")) for r in (0, 1)]
    for r in ranks:
        # the wrapped safe_open refused get_tensor; what was sliced is exactly this rank's shards
        assert r["elements"] == r["local_elements"] and r["returned_bytes"] == r["bytes"] == 4 * r["elements"]
        assert r["elements"] < 0.51 * total
    assert sum(r["elements"] for r in ranks) == total  # every element read once, by one rank
    if variant == "untied":
        assert ["model.embed_tokens.weight", "(slice(1023, 2045, None), slice(None, None, None))"] in ranks[1]["slices"]
    gathered = load_file(f"{out}.{variant}.safetensors")  # iter_full_tensors after load_sharded
    assert gathered.keys() == originals[variant].keys()
    assert all(torch.equal(gathered[k], originals[variant][k]) for k in gathered)
    exported = model.load_pretrained(f"{out}.{variant}.export")  # export_hf -> model.load_pretrained
    assert all(torch.equal(p, originals[variant][k]) for k, p in exported.named_parameters())
    assert (exported.lm_head.weight is exported.llm.embed_tokens.weight) == (variant == "tied")


def test_tensor_parallel_matches_single_device(load_tp):
    """TP=2 logits == TP=1 logits: weights copied in with copy_full_ (the sampler refresh), tied and
    untied, and read by load_sharded straight from a checkpoint (each rank its column/row slices)."""
    _, out, _ = load_tp
    with open(out + ".json") as f:
        report = json.load(f)
    assert sorted(report) == ["tied", "tied_from_checkpoint", "untied"]
    for variant, r in report.items():
        assert r["local_q_rows"] == 64  # 4 heads x 32 over 2 ranks: each rank runs 2 heads (1 kv head)
        assert r["tied"] == (variant != "untied")
        assert r["max_err"] <= 1e-5 * r["scale"], (variant, r)  # fp32: only the all-reduce order differs


@pytest.mark.parametrize("tower", ["frozen", "trained"])
def test_image_on_one_rank_only(load_tp, tower):
    """The image is on rank 0 only; FSDP must not deadlock or diverge: one step == the plain model on
    both rows. Frozen, the tower is part of the root unit; trained, it has its own units and rank 1
    runs it on a dummy image whose features count 0 (its gradients are rank 0's alone)."""
    _, out, _ = load_tp
    with open(out + (".vlm.json" if tower == "frozen" else ".vlm_trained.json")) as f:
        r = json.load(f)
    assert r["moved"] > 1e-2 and r["max_err"] < 1e-5 * r["moved"], r
    assert (r["vision_moved"] > 1e-3) == (tower == "trained"), r


def same_results(a, b, atol):
    """Sampler results (lists of {tokens, logprobs}): identical tokens, log-probs within atol."""
    assert [x["tokens"] for x in a] == [y["tokens"] for y in b]
    err = max(abs(p - q) for x, y in zip(a, b) for p, q in zip(x["logprobs"], y["logprobs"]))
    assert err <= atol, err


def test_sampler_on_tensor_parallel_copy(load_tp):
    """TP=2 == TP=1 through the sampler: a TP copy over 2 ranks (each rank caches 1 of the 2 kv heads)
    samples the plain model's tokens, greedy and seeded, text and image, a shared-prompt group, and with
    preemption forced by a 5-block cache; both ranks return the same results. Unseeded sampling is refused."""
    _, out, _ = load_tp
    ranks = [json.load(open(f"{out}.rollout.rank{r}.json")) for r in (0, 1)]
    assert ranks[0] == ranks[1]
    r = ranks[0]
    assert [len(x["tokens"]) for x in r["plain"]] == [20, 24, 24, 24, 24, 16]  # no early stop: all tokens compared
    assert r["tp_preemptions"] > 0
    assert "needs a seed" in r["unseeded"]
    same_results(r["tp_copy"], r["plain"], 1e-5)
    same_results(r["tp_copy_preempted"], r["plain"], 1e-5)


def test_refresh_after_a_step_equals_loading_the_new_weights(load_tp):
    """rl.refresh_sampler after an AdamW step of the 2-rank FSDP policy: the full rollout copy samples
    exactly (bit for bit) what a sampler over export_hf's checkpoint samples; the TP copy the same tokens
    (fp32, only the all-reduce order differs); and the step did change what is sampled."""
    _, out, _ = load_tp
    r = json.load(open(f"{out}.rollout.rank0.json"))
    same_results(r["after_full"], r["after_reload"], 0.0)
    same_results(r["after_tp"], r["after_reload"], 1e-5)
    with pytest.raises(AssertionError):
        same_results(r["before_tp"], r["after_reload"], 1e-3)


SWEEP = """
import collections, json, sys, torch, torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.testing._internal.distributed.fake_pg import FakeStore
import model, parallel
cfg = model.get_config("qwen2.5-vl-72b")
shapes = collections.Counter(tuple(p.shape) for p in model.build(cfg, device="meta").parameters())
out = {}
for world in (64, 48):
    local = []
    for r in range(world):  # fully_shard one parameter of each shape, rank by rank; x how many share it
        dist.init_process_group("fake", store=FakeStore(), rank=r, world_size=world)
        holder = torch.nn.ParameterList(torch.nn.Parameter(torch.empty(s, device="meta")) for s in shapes)
        fully_shard(holder, mesh=init_device_mesh("cpu", (world,)))
        local.append(sum(n * p.to_local().numel() for p, n in zip(holder, shapes.values())))
        dist.destroy_process_group()
    planner = [parallel.measure_shards(cfg, world, r)["local"] for r in (0, world - 1)]
    out[world] = {"local": local, "planner": planner}
print(json.dumps(out))
"""


def test_planner_measured_72b_shards_sum_to_parameter_count():
    """The planner's per-rank shards (apply_fsdp on the whole 72B model over a fake group) are checked
    at the first and last rank against a rank-by-rank sweep that shards one parameter of each of the
    model's distinct shapes with fully_shard (times the number of parameters of that shape; one
    whole-model apply_fsdp per rank would take a minute); over all ranks the sweep adds up to the
    parameter count exactly. 64 ranks split every dim evenly, 48 do not (8192 / 48)."""
    p = subprocess.run([sys.executable, "-c", SWEEP], cwd=ROOT, env=env(), capture_output=True, text=True, timeout=170)
    assert p.returncode == 0, p.stderr[-3000:]
    n = model.num_params(model.build("qwen2.5-vl-72b", device="meta"))
    assert 73.4e9 < n < 73.5e9
    for world, r in json.loads(p.stdout).items():
        assert sum(r["local"]) == n, world
        assert r["planner"] == [r["local"][0], r["local"][-1]], world
    uneven = json.loads(p.stdout)["48"]["local"]
    assert uneven[0] > uneven[-1]  # ceil-sized chunks first, the last rank short


def test_plan():
    """HSDP over 2 nodes x 2 GPUs shards inside a node: each rank holds half of the tiny model."""
    pc = parallel.PlanConfig(model="tiny", nodes=2, gpus_per_node=2, hsdp=True, rollout_tp=2)
    p = parallel.plan(pc)
    n = model.num_params(model.build("tiny"))
    assert p["shards"]["full"] == n and p["shards"]["local"] == n // 2 and p["shards"]["rollout_local"] < n
    assert p["total"] == sum(p["rows"].values()) and not torch.distributed.is_initialized()
    off = parallel.plan(parallel.PlanConfig(model="tiny", nodes=2, gpus_per_node=2, hsdp=True, rollout_tp=2,
                                            cpu_offload=True))
    host = [b for name, b in off["rows"].items() if name.endswith("[host RAM]")]
    assert len(host) == 3 and off["total"] == p["total"] - sum(host)  # shards + AdamW moved off the GPU
    cli = subprocess.run([sys.executable, "parallel.py", "--plan", "--model=tiny", "--nodes=1", "--gpus_per_node=2"],
                         cwd=ROOT, env=env(), capture_output=True, text=True, timeout=120)
    assert cli.returncode == 0 and "fits in 80 GiB: yes" in cli.stdout, cli.stderr[-3000:]
