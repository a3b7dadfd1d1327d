"""
parallel.py: everything distributed, applied to a finished model (model.py has no `dist`).

torchrun setup, rank-0 printing and the metrics log -> device meshes -> activation checkpointing ->
torch.compile per block -> FSDP2 / HSDP -> a tensor-parallel rollout copy -> per-rank loading from
safetensors -> full tensors for export and the sampler -> sharded checkpoints with exact resume -> the
memory planner.

A stage composes these in torchtitan's order (torchtitan/models/llama3/infra/parallelize.py:
apply_tp, apply_ac, apply_compile, apply_fsdp), each a plain function over the built model:

    d = parallel.init_distributed()                        # single process unless torchrun set RANK
    m = model.build("qwen2.5-vl-72b", device="meta")       # no memory touched
    parallel.apply_ac(m)
    parallel.apply_fsdp(m, parallel.make_mesh(d, hsdp=True))
    m.to_empty(device=d.device)
    parallel.load_sharded(m, "Qwen2.5-VL-72B-Instruct/")  # each rank reads only its own slices

Commands:
    python -m pytest -q tests/test_parallel.py            # the checks: torchrun over gloo, 2 CPU ranks
    python parallel.py --plan --model=qwen2.5-vl-72b --nodes=8 --gpus_per_node=8 --seq_len=8192 \\
        --micro_batch=1 --gpu_mem_gib=80 --rollout_tp=8                                     # memory plan
"""
import dataclasses
import json
import math
import os
import random
import re
import shutil
from collections import defaultdict
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from safetensors import safe_open
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import CPUOffloadPolicy, FSDPModule, MixedPrecisionPolicy, OffloadPolicy, fully_shard
from torch.distributed.tensor import DTensor, Replicate
from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module
from torch.utils.checkpoint import checkpoint

import model as qwen

# -----------------------------------------------------------------------------
# Process setup: torchrun's environment -> one Dist record


@dataclass
class Dist:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    is_main: bool


def init_distributed(backend=None):
    """Join the process group torchrun describes (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR); a single
    process when RANK is unset. GPU runs get NCCL for CUDA tensors and gloo for CPU ones (CPU-offloaded
    shards, DCP's object gathers); CPU runs get gloo. Safe to call twice."""
    cuda = torch.cuda.is_available()
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    if "RANK" not in os.environ and not dist.is_initialized():
        return Dist(0, 1, 0, device, True)
    if not dist.is_initialized():
        dist.init_process_group(backend or ("cpu:gloo,cuda:nccl" if cuda else "gloo"))
    rank = dist.get_rank()
    return Dist(rank, dist.get_world_size(), local_rank, device, rank == 0)


def print0(*args, **kw):
    if not dist.is_initialized() or dist.get_rank() == 0:
        print(*args, **kw, flush=True)


def _barrier():
    if dist.is_initialized():
        dist.barrier()


def all_sum(values, device):
    """Sum numbers over ranks (fp64; the numbers themselves when not distributed): global token counts,
    loss sums, constraint counts. A float for a float, a list for a list."""
    t = torch.tensor(values, dtype=torch.float64, device=device)
    if dist.is_initialized():
        dist.all_reduce(t)
    return t.tolist()


class MetricsLogger:
    """Rank 0 appends each step's numbers to run_dir/metrics.jsonl and, when asked, to wandb (offline
    unless WANDB_MODE or WANDB_API_KEY say otherwise; never required). Counters (skipped steps, bad
    records, ...) accumulate and ride along with every row."""

    def __init__(self, run_dir, d, config=None, use_wandb=False):
        self.counters, self.file, self.wandb = {}, None, None
        if not d.is_main:
            return
        os.makedirs(run_dir, exist_ok=True)
        self.file = open(os.path.join(run_dir, "metrics.jsonl"), "a")
        if use_wandb:
            try:
                import wandb
                os.environ.setdefault("WANDB_MODE", "online" if os.environ.get("WANDB_API_KEY") else "offline")
                self.wandb = wandb.init(project="safeladder", dir=run_dir,
                                        config=dataclasses.asdict(config) if config is not None else None)
            except Exception as e:  # logging must never stop training
                print0(f"wandb disabled: {e}")

    def count(self, name, n=1):
        self.counters[name] = self.counters.get(name, 0) + n

    def log(self, step, metrics):
        row = {"step": step, **{k: float(v) for k, v in metrics.items()
                                if isinstance(v, (int, float)) or (torch.is_tensor(v) and v.numel() == 1)},
               **self.counters}
        if self.file is not None:
            self.file.write(json.dumps(row) + "\n")
            self.file.flush()
        if self.wandb is not None:
            self.wandb.log(row, step=step)

    def close(self):
        if self.file is not None:
            self.file.close()
        if self.wandb is not None:
            self.wandb.finish()


def make_mesh(d, hsdp=False, gpus_per_node=None, tp=1):
    """The device mesh a parallelism runs over (torch.distributed.device_mesh, torchtitan's ParallelDims).
    Default: 1-D ("shard",) over all ranks, for FSDP. hsdp: 2-D ("replicate", "shard") with nodes x
    gpus_per_node: parameters are sharded inside a node (fast NVLink all-gathers) and replicated across
    nodes (one gradient all-reduce over the slow network). tp > 1: the 1-D ("tp",) mesh of this rank's
    group of `tp` consecutive ranks (inside a node), for the rollout copy's apply_tp."""
    if not dist.is_initialized():  # one process: a group of one, so FSDP code paths stay the same
        dist.init_process_group("nccl" if d.device.type == "cuda" else "gloo", store=dist.HashStore(),
                                rank=0, world_size=1)
    kind, n = d.device.type, d.world_size
    if tp > 1:
        if n % tp:
            raise ValueError(f"world size {n} is not a multiple of the tensor-parallel size {tp}")
        return init_device_mesh(kind, (n // tp, tp), mesh_dim_names=("dp", "tp"))["tp"]
    if not hsdp:
        return init_device_mesh(kind, (n,), mesh_dim_names=("shard",))
    per_node = gpus_per_node or int(os.environ.get("LOCAL_WORLD_SIZE", 1))
    if n % per_node:
        raise ValueError(f"world size {n} is not a multiple of gpus_per_node {per_node}")
    return init_device_mesh(kind, (n // per_node, per_node), mesh_dim_names=("replicate", "shard"))


# -----------------------------------------------------------------------------
# Wrapping a finished model: activation checkpointing, compile, FSDP2, tensor parallel


def _blocks(model):
    return [*model.llm.layers, *model.visual.blocks]


def apply_ac(model):
    """Activation checkpointing per transformer block (language and vision): a block keeps only its
    input and recomputes its insides during backward, trading ~1/3 more compute for activation memory
    that no longer grows with depth (Chen et al. 2016; torchtitan's full AC). The block's forward is
    replaced in place, so parameter names (the HF map, DCP keys) stay as they were, unlike
    checkpoint_wrapper's `_checkpoint_wrapped_module.` prefix. Blocks have no dropout, so the RNG
    state need not be replayed."""
    for block in _blocks(model):
        # NOTE: a closure, not functools.partial: torch.compile traces through this into its checkpoint
        # operator, while a partial of `checkpoint` made dynamo skip the whole block silently
        def forward(*args, _forward=block.forward, **kw):
            return checkpoint(_forward, *args, use_reentrant=False, preserve_rng_state=False, **kw)
        block.forward = forward
    return model


def apply_compile(model):
    """torch.compile each language block in place (names unchanged; torchtitan's apply_compile): the
    blocks are identical, so they share one compiled graph, and FSDP's hooks stay outside it. The
    vision blocks loop over windows with data-dependent sizes and stay eager."""
    for block in model.llm.layers:
        block.compile()
    return model


def apply_fsdp(model, mesh, param_dtype=torch.bfloat16, reduce_dtype=torch.float32, cpu_offload=False,
               reshard_after_forward=True):
    """FSDP2 (torch.distributed.fsdp.fully_shard; Zhao et al. 2023, torchtitan's apply_fsdp): every
    parameter becomes a DTensor sharded on dim 0 over the mesh's "shard" dim (replicated over
    "replicate" for HSDP): fp32 parameters, gradients and AdamW states are 1/N per rank. Each unit
    all-gathers its parameters in `param_dtype` just before its forward and backward and frees them
    after; gradients are reduce-scattered in `reduce_dtype`. Units: each language block, each vision
    block and the vision tower (when trained), the embedding (when untied), the root (lm_head, which
    Qwen2VL.forward hands to the fused loss `head=` outside lm_head's own forward, the final norm and
    the rest). Works on a model still on the meta device (then `to_empty` + `load_sharded`)."""
    kw = dict(mesh=mesh, mp_policy=MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=reduce_dtype),
              offload_policy=CPUOffloadPolicy(pin_memory=torch.cuda.is_available()) if cpu_offload else OffloadPolicy())
    layers = model.llm.layers
    for i, block in enumerate(layers):
        # the last block runs first in backward: keep it gathered instead of re-gathering (torchtitan)
        fully_shard(block, reshard_after_forward=reshard_after_forward and i < len(layers) - 1, **kw)
    # NOTE: FSDP needs every rank to run the same units in the same order, and the vision tower runs
    # only for micro-batches with images. Frozen, it joins the root unit (gathered on every rank, no
    # gradients to reduce); trained, it gets its own units and the model runs it in every forward
    # (a dummy image, its features times 0, when a micro-batch has none: gradients of 0 to reduce).
    if any(p.requires_grad for p in model.visual.parameters()):
        for block in model.visual.blocks:
            fully_shard(block, reshard_after_forward=reshard_after_forward, **kw)
        fully_shard(model.visual, reshard_after_forward=reshard_after_forward, **kw)
        model.vision_every_forward = True
    if not model.cfg.tie_word_embeddings:  # tied: embedding and lm_head are one parameter, in the root
        fully_shard(model.llm.embed_tokens, reshard_after_forward=reshard_after_forward, **kw)
    fully_shard(model, reshard_after_forward=reshard_after_forward, **kw)
    return model


def apply_tp(model, tp_mesh):
    """Megatron-style tensor parallelism for the rollout copy (Shoeybi et al. 2019; PyTorch's
    torch.distributed.tensor.parallel tutorial). Column-parallel q/k/v and gate/up give each rank
    n_heads/tp query heads, n_kv/tp kv heads and intermediate/tp MLP channels; row-parallel o/down
    all-reduce the partial sums. The embedding and lm_head split the vocabulary (logits all-gathered).
    Modules see plain local tensors, and model.Attention counts heads from its projections, so the model
    code runs unchanged; norms and the vision tower stay replicated; tied embeddings are re-tied (same
    Shard(0) rows). Works on the meta device too (then to_empty, model.tie_weights(), load_sharded)."""
    cfg, tp = model.cfg, tp_mesh.size()
    for what in ("num_attention_heads", "num_key_value_heads", "intermediate_size", "vocab_size"):
        if getattr(cfg, what) % tp:
            raise ValueError(f"{what} = {getattr(cfg, what)} is not divisible by the tensor-parallel size {tp}")
    plan = {"llm.embed_tokens": RowwiseParallel(input_layouts=Replicate()),  # rows = vocab entries
            "lm_head": ColwiseParallel(output_layouts=Replicate())}         # (B, T, V) on every rank
    for i in range(cfg.num_hidden_layers):
        p = f"llm.layers.{i}."
        plan.update({p + name: ColwiseParallel() for name in
                     ("attn.q_proj", "attn.k_proj", "attn.v_proj", "mlp.gate_proj", "mlp.up_proj")})
        plan.update({p + "attn.o_proj": RowwiseParallel(), p + "mlp.down_proj": RowwiseParallel()})
    parallelize_module(model, tp_mesh, plan)
    model.tie_weights()
    return model


# -----------------------------------------------------------------------------
# Moving weights in and out of a sharded model, one tensor at a time


def _owned_slice(p):
    """(local tensor, index into the full tensor) of the part of parameter `p` this rank holds. FSDP2
    and TP split a dim like torch.chunk: ceil(n / k) rows per rank, the last ranks short or empty."""
    if not isinstance(p, DTensor):
        return p, (slice(None),)
    local, index = p.to_local(), [slice(None)] * p.ndim
    shards = [(i, pl.dim) for i, pl in enumerate(p.placements) if pl.is_shard()]
    if len(shards) > 1:
        raise NotImplementedError("a parameter sharded over two mesh dims (FSDP + TP) is not supported")
    for mesh_dim, dim in shards:
        chunk = math.ceil(p.shape[dim] / p.device_mesh.size(mesh_dim))
        start = min(chunk * p.device_mesh.get_local_rank(mesh_dim), p.shape[dim])
        index[dim] = slice(start, start + local.shape[dim])
    return local, tuple(index)


@torch.no_grad()
def copy_full_(param, full):
    """Copy a full tensor into a parameter that may be sharded (FSDP or TP): each rank keeps its slice.
    The sampler refresh into a TP rollout copy is `copy_full_(p, t)` over iter_full_tensors."""
    local, index = _owned_slice(param)
    local.copy_(full[index])


@torch.no_grad()
def load_sharded(model, path):
    """Fill a model (FSDP- or TP-sharded, materialised with to_empty) from a Hugging Face checkpoint
    directory: every rank memory-maps the safetensors files and reads only the rows it owns
    (safe_open(...).get_slice(name)[rows]), so no rank ever holds a full 72B state. Names go through
    model.hf_name_map; a tied lm_head is the embedding. Returns the bytes this rank read."""
    if model.cfg.tie_word_embeddings and model.lm_head.weight is not model.llm.embed_tokens.weight:
        model.tie_weights()  # a plain to_empty unties (FSDP's to_empty keeps the tie)
    files = qwen.checkpoint_files(path)
    ours_to_hf = qwen.match_checkpoint(model.cfg, files, path)
    by_file = defaultdict(list)
    for name, p in model.named_parameters():
        by_file[files[ours_to_hf[name]]].append((ours_to_hf[name], name, p))
    n_read = 0
    for file, items in by_file.items():
        with safe_open(file, "pt") as f:
            for hf, name, p in items:
                sl = f.get_slice(hf)
                if list(sl.get_shape()) != list(p.shape):
                    raise ValueError(f"{file}: {hf} has shape {sl.get_shape()}, the model expects "
                                     f"{list(p.shape)} for {name}")
                local, index = _owned_slice(p)
                t = sl[index]
                local.copy_(t)
                n_read += t.numel() * t.element_size()
    return n_read


@torch.no_grad()
def iter_full_tensors(model):
    """Yield (our_name, full tensor) for every parameter, all-gathering one DTensor at a time, so the
    peak extra memory is the largest single tensor. Every rank must run the loop to the end (each
    step is a collective). Names are model.py's; tied weights appear once."""
    for name, p in model.named_parameters():
        if isinstance(p, DTensor):
            # NOTE: CPU-offloaded shards move to the mesh's device first, so the gather runs on NCCL
            local = p.to_local().to(p.device_mesh.device_type)
            p = DTensor.from_local(local, p.device_mesh, p.placements, shape=p.shape, stride=p.stride())
            yield name, p.full_tensor()
        else:
            yield name, p.detach()


def export_hf(model, path, d, dtype=None):
    """Write a Hugging Face directory (model.save_pretrained's format) from a sharded model: rank 0
    streams the gathered tensors into model.write_hf_checkpoint while the other ranks take part in the
    all-gathers. dtype: the saved dtype (None keeps the parameters' dtype; bf16 halves the size)."""
    hf_name = {ours: hf for hf, ours in qwen.hf_name_map(model.cfg).items()}
    tensors = ((hf_name[n], t if dtype is None else t.to(dtype)) for n, t in iter_full_tensors(model))
    if d.is_main:
        qwen.write_hf_checkpoint(model.cfg, tensors, path, dtype or next(model.parameters()).dtype)
    else:
        for _ in tensors:
            pass
    _barrier()


def build_for_training(d, model="tiny", init_from="", *, param_dtype=torch.bfloat16, hsdp=False, ac=False,
                       freeze_vision=True, seed=0):
    """The model a stage trains, at any scale. One CPU process: a plain model. Under torchrun or on a
    GPU: FSDP-wrapped, and when loading a checkpoint it is built on the meta device, wrapped, then
    filled by load_sharded, so no rank ever holds the whole checkpoint. Master weights stay fp32."""
    plain = d.world_size == 1 and d.device.type == "cpu"
    if plain and init_from:
        m = qwen.load_pretrained(init_from, device=d.device)
    else:
        m = qwen.build(qwen.load_config(init_from) if init_from else model, "meta" if init_from else d.device,
                       seed=seed)
    m.visual.requires_grad_(not freeze_vision)  # before FSDP: a frozen tower joins the root unit
    # a trained tower runs in every forward (a dummy image when there is none), on 1 rank as on N under
    # FSDP, where each rank must run every unit: its weight decay then acts on image-free steps too
    m.vision_every_forward = not freeze_vision
    if plain:
        return m
    if ac:
        apply_ac(m)
    apply_fsdp(m, make_mesh(d, hsdp=hsdp), param_dtype=param_dtype)
    if init_from:
        m.to_empty(device=d.device)
        load_sharded(m, init_from)
    return m


# -----------------------------------------------------------------------------
# Sharded checkpoints with exact resume (torch.distributed.checkpoint)


def _rng_state():
    np_state = np.random.get_state()
    return {"torch": torch.get_rng_state().tolist(),
            "cuda": torch.cuda.get_rng_state().tolist() if torch.cuda.is_available() else None,
            "numpy": [np_state[0], np_state[1].tolist(), *np_state[2:]],
            "python": random.getstate()}


def _set_rng_state(s):
    torch.set_rng_state(torch.tensor(s["torch"], dtype=torch.uint8))
    if s["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(torch.tensor(s["cuda"], dtype=torch.uint8))
    np.random.set_state((s["numpy"][0], np.array(s["numpy"][1], dtype=np.uint32), *s["numpy"][2:]))
    random.setstate((s["python"][0], tuple(s["python"][1]), s["python"][2]))


class Checkpointer:
    """run_dir/step_00000100/ holds DCP shards of the model and optimizer states (each rank writes its
    own; DCP reshards on load, so a run may resume on another world size), rng/rank_<r>.json (torch,
    CUDA, numpy, python), state.json (step, scheduler, optimizer hyper-parameters, the caller's `extra`:
    data position, curriculum stage, dual variables as JSON). All is written into step_XXXX.tmp, then
    renamed: a crash mid-save leaves the previous checkpoint the newest complete one. NOTE: DCP's index
    `.metadata` is a pickle: load only checkpoints you wrote. Multi-node: run_dir on a shared filesystem."""

    def __init__(self, run_dir, keep=2):
        self.run_dir, self.keep = run_dir, keep

    def _complete(self):
        found = []
        for name in os.listdir(self.run_dir) if os.path.isdir(self.run_dir) else []:
            m = re.fullmatch(r"step_(\d+)", name)
            if m and os.path.exists(os.path.join(self.run_dir, name, "state.json")):
                found.append((int(m[1]), os.path.join(self.run_dir, name)))
        return [path for _, path in sorted(found)]

    def latest(self):
        """The newest complete checkpoint directory, or None."""
        return (self._complete() or [None])[-1]

    def save(self, step, model, optimizer, scheduler, extra):
        final = os.path.join(self.run_dir, f"step_{step:08d}")
        tmp, rank = final + ".tmp", dist.get_rank() if dist.is_initialized() else 0
        if rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)  # left by a crash
            os.makedirs(os.path.join(tmp, "rng"))
        _barrier()
        model_sd, optim_sd = get_state_dict(model, optimizer)
        # tensors only through DCP; param_groups go to state.json, so no load unpickles values
        dcp.save({"model": model_sd, "optim": optim_sd["state"]}, checkpoint_id=tmp, no_dist=not dist.is_initialized())
        with open(os.path.join(tmp, "rng", f"rank_{rank}.json"), "w") as f:
            json.dump(_rng_state(), f)
        _barrier()  # every rank's shards and RNG file are on disk
        if rank == 0:
            state = {"step": step, "scheduler": scheduler.state_dict() if scheduler else None,
                     "param_groups": optim_sd["param_groups"], "extra": extra}
            with open(os.path.join(tmp, "state.json"), "w") as f:
                json.dump(state, f)
            shutil.rmtree(final, ignore_errors=True)
            os.rename(tmp, final)  # the commit point
            for old in self._complete()[:-self.keep]:
                shutil.rmtree(old, ignore_errors=True)
        _barrier()

    def load(self, path, model, optimizer, scheduler):
        """Restore model, optimizer, scheduler and this rank's RNG states; returns `extra`."""
        model_sd, optim_sd = get_state_dict(model, optimizer)  # the target layout (and optimizer states)
        # NOTE: AdamW holds no state for parameters that never had a gradient (a vision tower in a
        # text-only run); get_state_dict invents zeros for them, so keep only the ones that were saved
        saved = dcp.FileSystemReader(path).read_metadata().state_dict_metadata
        state = {"model": model_sd, "optim": {fqn: s for fqn, s in optim_sd["state"].items()
                                              if any(f"optim.{fqn}.{k}" in saved for k in s)}}
        dcp.load(state, checkpoint_id=path, no_dist=not dist.is_initialized())
        with open(os.path.join(path, "state.json")) as f:
            meta = json.load(f)
        set_state_dict(model, optimizer, model_state_dict=state["model"],
                       optim_state_dict={"state": state["optim"], "param_groups": meta["param_groups"]},
                       options=StateDictOptions(strict=False))  # dcp.load above checked the model keys
        if scheduler is not None:
            scheduler.load_state_dict(meta["scheduler"])
        rank = dist.get_rank() if dist.is_initialized() else 0
        rng_file = os.path.join(path, "rng", f"rank_{rank}.json")
        if os.path.exists(rng_file):  # absent when resumed on more ranks than saved: fresh streams
            with open(rng_file) as f:
                _set_rng_state(json.load(f))
        return meta["extra"]


# -----------------------------------------------------------------------------
# Memory planner: per-GPU bytes of a training + rollout setup, with the shard sizes measured


@dataclass
class PlanConfig:
    plan: bool = False                 # the --plan switch that selects this mode
    model: str = "qwen2.5-vl-72b"      # preset name
    nodes: int = 8
    gpus_per_node: int = 8
    gpu_mem_gib: float = 80.0
    hsdp: bool = False                 # shard inside a node, replicate across nodes
    seq_len: int = 8192                # tokens per training sequence
    micro_batch: int = 1               # sequences per GPU per forward/backward
    ac: bool = True                    # activation checkpointing per block
    freeze_vision: bool = True         # no gradients or optimizer states for the vision tower
    cpu_offload: bool = False          # apply_fsdp(cpu_offload=True): fp32 shards + AdamW live in host RAM
    loss_chunk: int = 1024             # tokens per chunk of ops.py's fused loss; 0: full logits
    rollout_tp: int = 1                # 1: a full bf16 copy per GPU; N: tensor parallel over N GPUs
    rollout_batch: int = 64            # sequences resident in one rollout engine's KV cache
    rollout_len: int = 8192            # prompt + response tokens per rollout sequence
    reserve_gib: float = 4.0           # CUDA context, NCCL buffers, allocator fragmentation


def measure_shards(cfg, world_size, rank=0, gpus_per_node=0, rollout_tp=1, freeze_vision=True):
    """Build the model on the meta device, apply_fsdp over a fake process group of the real world size
    (torch's `fake` backend: collectives are no-ops, sharding is real) and read this rank's local
    shard sizes; with rollout_tp > 1 also apply_tp to a second copy. gpus_per_node > 0 means HSDP.
    Needs a process without a process group; tears its own down. Returns element counts."""
    from torch.testing._internal.distributed.fake_pg import FakeStore
    if dist.is_initialized():
        raise RuntimeError("measure_shards needs a process without a process group (run it in a subprocess)")
    dist.init_process_group("fake", store=FakeStore(), rank=rank, world_size=world_size)
    try:
        d = Dist(rank, world_size, rank % (gpus_per_node or world_size), torch.device("cpu"), rank == 0)
        m = qwen.build(cfg, device="meta")
        m.visual.requires_grad_(not freeze_vision)  # a frozen tower joins the root unit
        apply_fsdp(m, make_mesh(d, hsdp=gpus_per_node > 0, gpus_per_node=gpus_per_node))
        names = sorted((n for n, mod in m.named_modules() if isinstance(mod, FSDPModule)), key=len)
        units, out = defaultdict(lambda: defaultdict(int)), defaultdict(int)
        for name, p in m.named_parameters():
            unit = [u for u in names if u == "" or name.startswith(u + ".")][-1]  # innermost unit
            units[unit]["full"] += p.numel()
            units[unit]["trainable"] += p.numel() * p.requires_grad
            out["full"] += p.numel()
            out["local"] += p.to_local().numel()
            out["local_trainable"] += p.to_local().numel() * p.requires_grad
        out["units"] = {u: dict(v) for u, v in units.items()}
        if rollout_tp > 1:
            r = apply_tp(qwen.build(cfg, device="meta"), make_mesh(d, tp=rollout_tp))
            out["rollout_local"] = sum(_owned_slice(p)[0].numel() for p in r.parameters())
        return dict(out)
    finally:
        dist.destroy_process_group()


def plan(pc):
    """Per-GPU bytes by component. Parameter, gradient, optimizer and rollout-weight sizes come from
    measure_shards; activations and KV cache from the formulas in the comments (text tokens; a frozen
    vision tower's activations are transient and not counted)."""
    cfg, world = qwen.get_config(pc.model), pc.nodes * pc.gpus_per_node
    # rank 0 holds the largest shards (torch.chunk gives the ceil-sized pieces first)
    s = measure_shards(cfg, world, 0, pc.gpus_per_node if pc.hsdp else 0, pc.rollout_tp, pc.freeze_vision)
    root = s["units"][""]
    others = sorted((u for n, u in s["units"].items() if n), key=lambda u: u["full"], reverse=True)
    H, I, L, V = cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers, cfg.vocab_size
    kv_dim, tokens, GiB = cfg.num_key_value_heads * cfg.head_dim, pc.micro_batch * pc.seq_len, 2 ** 30
    # One block's saved activations per token, bf16, read off model.py's Block: two RMSNorms keep an
    # fp32 and a bf16 copy of their input (2 x 6H); SDPA keeps q, GQA-repeated k and v, its output and
    # o_proj's input (10H); the SwiGLU MLP keeps gate, silu(gate), up and their product (8I).
    per_block = tokens * (22 * H + 8 * I)
    kv_seq = pc.rollout_len * L * 2 * kv_dim * 2 // pc.rollout_tp  # K and V, bf16, kv heads split by TP
    top = max((u["trainable"] for u in others), default=0)
    host = " [host RAM]" if pc.cpu_offload else ""
    rows = {
        "parameters (fp32 master shard)" + host: 4 * s["local"],
        "gradients (fp32 shard)" + host: 4 * s["local_trainable"],
        "AdamW m + v (fp32 shards)" + host: 8 * s["local_trainable"],
        # the root stays gathered through backward; one unit computes while the next is prefetched
        "bf16 gathered params (root + 2 units)": 2 * (root["full"] + sum(u["full"] for u in others[:2])),
        # gathered bf16 grads, cast to fp32 for the reduce-scatter (the root's are reduced last)
        "bf16 grads + fp32 reduce buffer": max(2 * root["trainable"] + 6 * top, 6 * root["trainable"]),
        "activations" + (" (AC: block inputs + 1 block)" if pc.ac else " (no AC)"):
            L * tokens * 2 * H + per_block if pc.ac else L * per_block,
        "logits" + (f" (fused loss, {pc.loss_chunk}-token chunks)" if pc.loss_chunk else " (full, bf16+fp32+grad)"):
            pc.loss_chunk * V * 8 if pc.loss_chunk else tokens * V * 10,
        "rollout weights (bf16" + (f", TP={pc.rollout_tp})" if pc.rollout_tp > 1 else ", full copy)"):
            2 * (s["rollout_local"] if pc.rollout_tp > 1 else s["full"]),
        f"KV cache ({pc.rollout_batch} seqs x {pc.rollout_len} tokens)": pc.rollout_batch * kv_seq,
        "reserve (CUDA context, NCCL, fragmentation)": int(pc.reserve_gib * GiB),
    }
    total = sum(b for name, b in rows.items() if not name.endswith("[host RAM]"))
    kv_room = int((pc.gpu_mem_gib * GiB - total) // kv_seq) + pc.rollout_batch  # sequences that would fit
    return {"rows": rows, "total": total, "kv_room": max(kv_room, 0), "shards": s, "world": world}


def print_plan(pc):
    p, GiB = plan(pc), 2 ** 30
    s, world, shard_ranks = p["shards"], p["world"], pc.gpus_per_node if pc.hsdp else p["world"]
    mesh = f"HSDP: replicate x{pc.nodes}, shard x{pc.gpus_per_node}" if pc.hsdp else f"FSDP over {world}"
    print(f"{pc.model}: {s['full'] / 1e9:.2f}B parameters | {pc.nodes} node(s) x {pc.gpus_per_node} GPUs, {mesh}"
          f" | {pc.micro_batch} x {pc.seq_len} tokens per GPU, AC {'on' if pc.ac else 'off'}, vision "
          f"{'frozen' if pc.freeze_vision else 'trained'} | rollout TP={pc.rollout_tp}")
    print(f"measured on rank 0 of a fake {world}-rank group: {s['local'] / 1e9:.4f}B parameters local "
          f"(formula {s['full'] / 1e9:.2f}B / {shard_ranks} = {s['full'] / shard_ranks / 1e9:.4f}B)"
          + (f", rollout TP shard {s['rollout_local'] / 1e9:.3f}B" if pc.rollout_tp > 1 else ""))
    print(f"| {'per GPU':<52} | {'GiB':>7} |\n|{'-' * 54}|{'-' * 9}|")
    for name, b in p["rows"].items():
        print(f"| {name:<52} | {b / GiB:7.2f} |")
    total, cap = p["total"] / GiB, pc.gpu_mem_gib
    print(f"| {'total on the GPU':<52} | {total:7.2f} |")
    print(f"fits in {cap:g} GiB: " + (f"yes ({cap - total:.1f} GiB spare)" if total <= cap else
                                     f"NO ({total - cap:.1f} GiB over)")
          + f"; the KV cache has room for {p['kv_room']} sequences of {pc.rollout_len} tokens")
    return p


if __name__ == "__main__":
    pc = qwen.configure(PlanConfig())
    if not pc.plan:
        raise SystemExit("usage: python parallel.py --plan --model=qwen2.5-vl-72b --nodes=8 --gpus_per_node=8 ...")
    print_plan(pc)
