"""
Paged KV-cache sampler over the very modules of model.py: rollouts, judges and infer.py sample from the
same code the trainer differentiates, so a weight refresh is a copy inside the process and the
sampler-vs-trainer log-prob gap is an invariant the tests check.

    import model, sampler
    m = model.build("tiny")
    smp = sampler.Sampler(m, decode_fn=tokenizer.decode)      # decode_fn only for stop_strings
    params = [sampler.SamplingParams(temperature=1.0, top_p=0.95, max_tokens=64, seed=g) for g in range(8)]
    results = smp.generate([sampler.Request(prompt_ids, p) for p in params])  # 8 samples, one prompt prefill
    results[0].token_ids, results[0].logprobs, results[0].finish_reason       # "stop" | "length"

Read top to bottom (the design follows vLLM's PagedAttention, Kwon et al. SOSP'23; nano-vllm showed
how small such an engine can be; the code here is our own):
  kernels        pure-PyTorch references of the three ops (KV write, paged decode attention, sampling),
                 the CPU path and the tests' oracle; csrc/ holds their CUDA twins, JIT-built on a GPU
  block manager  the cache is cut into blocks of `block_size` tokens with reference counts; a sequence
                 owns a list of blocks (its block table), so it grows without reserving its maximum length
  cache          PagedKVCache is the `cache` model.py's attention calls: prefill writes K/V into the
                 sequences' slots and attends with the model's own SDPA; decode writes one token per
                 sequence and runs paged attention over the block tables
  scheduler      prefill-first continuous batching (new prompts join as soon as blocks and rows allow);
                 the G requests of one prompt are prefilled once (vision tower included) and share its
                 blocks, the partly filled last block copied on write (PagedAttention section 4.4); when
                 blocks run out the youngest sequence is preempted and later recomputed
  sampling       per-request counter-based randomness (Gumbel-max over hash(seed, step, token)), so a
                 request's tokens depend on its seed only, never on what else shares the batch
  generate       the loop; on CUDA each padded decode batch size is captured once as a CUDA graph
"""
import os
import time
import warnings
from collections import deque
from dataclasses import dataclass, field

import numpy as np
import torch

import model as model_lib

# -----------------------------------------------------------------------------
# Public API


@dataclass
class SamplingParams:
    temperature: float = 1.0   # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0             # 0 = off
    max_tokens: int = 256
    stop_token_ids: tuple = ()
    stop_strings: tuple = ()   # needs the Sampler's decode_fn
    seed: int | None = None    # the same seed gives the same tokens, whatever else is in the batch


@dataclass
class Request:
    prompt_ids: list[int]
    params: SamplingParams
    pixel_values: torch.Tensor | None = None    # processor.process_image output, the prompt's images concatenated
    image_grid_thw: torch.Tensor | None = None  # (n_img, 3)


@dataclass
class Result:
    token_ids: list[int]    # generated tokens, a stop token included
    logprobs: list[float]   # log softmax(logits / T) of each token before top-k/top-p (T = 0: of the logits)
    finish_reason: str      # "stop" | "length"


# -----------------------------------------------------------------------------
# Kernels: pure-PyTorch references (CPU path, test oracle); csrc/ has the CUDA versions, same signatures


def write_kv_ref(k, v, k_cache, v_cache, slot_mapping):
    """k, v (N, nkv, hd) -> k_cache, v_cache (num_blocks, nkv, bs, hd) at slot = block * bs + offset (>= 0)."""
    bs = k_cache.shape[2]
    block, offset = slot_mapping // bs, slot_mapping % bs
    k_cache[block, :, offset] = k
    v_cache[block, :, offset] = v


def paged_attention_ref(q, k_cache, v_cache, block_tables, context_lens, scale):
    """One query token per sequence attends over the first context_lens[b] (>= 1) tokens of its blocks.
    q (B, nh, hd); caches (num_blocks, nkv, bs, hd); block_tables (B, max_blocks) int32 -> (B, nh, hd).
    GQA: query head h reads kv head h // (nh / nkv). Softmax in fp32 (fp64 for fp64 inputs)."""
    B, nh, hd = q.shape
    nkv, ct = k_cache.shape[1], torch.promote_types(q.dtype, torch.float32)
    tables = block_tables.long()
    k = k_cache[tables].transpose(1, 2).reshape(B, nkv, -1, hd)  # (B, nkv, max_blocks * bs, hd)
    v = v_cache[tables].transpose(1, 2).reshape(B, nkv, -1, hd)
    s = torch.einsum("bkgd,bksd->bkgs", q.view(B, nkv, nh // nkv, hd).to(ct), k.to(ct)) * scale
    beyond = torch.arange(k.shape[2], device=q.device) >= context_lens[:, None]  # (B, S)
    p = torch.softmax(s.masked_fill(beyond[:, None, None], float("-inf")), dim=-1)  # (B, nkv, G, S)
    return torch.einsum("bkgs,bksd->bkgd", p, v.to(ct)).reshape(B, nh, hd).to(q.dtype)


M32 = 0xFFFFFFFF


def _mul32(x, c):
    """x * c mod 2^32 for int64 tensors x < 2^32, in 16-bit halves so no product overflows int64."""
    return ((x & 0xFFFF) * c + ((((x >> 16) * c) & 0xFFFF) << 16)) & M32


def _hash32(x):
    """lowbias32 (C. Wellons, 2018), bit-exact with csrc/sampling.cu's hash32."""
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def gumbel_noise(seed, step, V):
    """Gumbel(0, 1) noise of every token for each row's (seed, step): seed, step (B,) int64 -> (B, V) fp32.
    Counter-based: a pure function of (seed, step, token), so draws never depend on the batch."""
    key = _hash32(_hash32(_hash32(seed & M32) ^ ((seed >> 32) & M32)) ^ (step & M32))  # (B,)
    r = _hash32(key[:, None] ^ _hash32(torch.arange(V, device=seed.device))[None])
    u = ((r >> 9).float() + 0.5) * 2.0 ** -23  # 23 bits, exact in fp32, never 0 or 1
    return -torch.log(-torch.log(u))


def sample_ref(logits, temperature, top_k, top_p, seed, step):
    """logits (B, V); per row: temperature (0 = greedy), top_k (0 = off), top_p (1 = off), seed, step ->
    tokens (B,) int64 and logprobs (B,) fp32 = log softmax(logits / T)[token], before any filtering.
    Kept tokens: x >= the k-th largest x (x = logits / T), then x >= the largest threshold whose kept
    softmax mass reaches top_p; ties at a threshold are kept. Draw: argmax over kept of x + Gumbel."""
    B, V = logits.shape
    greedy = temperature <= 0
    x = logits.float() / torch.where(greedy, torch.ones_like(temperature), temperature)[:, None]
    logp = torch.log_softmax(x, dim=-1)
    key = x + gumbel_noise(seed, step, V)
    if bool(((top_k > 0) & (top_k < V)).any() or (top_p < 1).any()):  # sort only when some row filters
        xs = x.sort(dim=-1, descending=True).values
        k = torch.where((top_k > 0) & (top_k < V), top_k, V).long()
        thr = xs.gather(1, k[:, None] - 1)                              # top-k threshold (B, 1)
        cum = (torch.exp(xs - xs[:, :1]) * (xs >= thr)).cumsum(-1)      # kept mass, largest x first
        first = (cum < top_p[:, None] * cum[:, -1:]).sum(-1, keepdim=True).clamp(max=V - 1)
        thr = torch.where(top_p[:, None] < 1, torch.maximum(thr, xs.gather(1, first)), thr)
        key = key.masked_fill(x < thr, float("-inf"))
    tok = torch.where(greedy, x.argmax(-1), key.argmax(-1))
    return tok, logp.gather(1, tok[:, None])[:, 0]


class RefOps:
    """The references as the op set the engine calls (the CPU path, and the fallback on a GPU)."""
    write_kv = staticmethod(write_kv_ref)
    paged_attention = staticmethod(paged_attention_ref)
    sample = staticmethod(sample_ref)


_EXT = None


def cuda_kernels():
    """csrc/'s extension, JIT-built (ninja + nvcc) on first use; raises when it cannot be built."""
    global _EXT
    if _EXT is None:
        from torch.utils.cpp_extension import load
        src = os.path.join(os.path.dirname(os.path.abspath(__file__)), "csrc")
        files = ["sampler_bindings.cpp", "paged_attention.cu", "sampling.cu"]
        _EXT = load("safeladder_sampler", [os.path.join(src, f) for f in files], extra_include_paths=[src],
                    extra_cflags=["-O3"], extra_cuda_cflags=["-O3"])
    return _EXT


def _stream():  # the current CUDA stream as an integer (the bindings need no CUDA header)
    return torch.cuda.current_stream().cuda_stream


class KernelOps:
    """csrc/'s kernels behind the references' signatures. Outputs are allocated here, through torch's
    allocator, so a CUDA graph capture records them like any other op."""

    def __init__(self, ext, head_dim, dtype):
        self.ext, self.attention_ok = ext, ext.supported(head_dim, torch.empty(0, dtype=dtype))
        self.tensor_cores = os.environ.get("SAFELADDER_MMA_ATTENTION") == "1"  # NOTE: not yet run on a GPU: opt-in

    def write_kv(self, k, v, k_cache, v_cache, slot_mapping):
        self.ext.write_kv(k.contiguous(), v.contiguous(), k_cache, v_cache, slot_mapping, _stream())

    def paged_attention(self, q, k_cache, v_cache, block_tables, context_lens, scale):
        if not self.attention_ok:
            return paged_attention_ref(q, k_cache, v_cache, block_tables, context_lens, scale)
        B, nh, hd = q.shape
        S = self.ext.num_splits(B, nh, k_cache.shape[1], block_tables.shape[1], self.tensor_cores)
        out = torch.empty_like(q)
        tmp_out = torch.empty((B, nh, S, hd) if S > 1 else (0,), device=q.device, dtype=torch.float32)
        tmp_ml = torch.empty(B, nh, S, 2, device=q.device, dtype=torch.float32)
        self.ext.paged_attention(out, q.contiguous(), k_cache, v_cache, block_tables, context_lens, tmp_out, tmp_ml,
                                 scale, self.tensor_cores, _stream())
        return out

    def sample(self, logits, temperature, top_k, top_p, seed, step):
        tok, logp = (torch.empty(logits.shape[0], dtype=t, device=logits.device) for t in (torch.long, torch.float32))
        c = [t.contiguous() for t in (temperature.float(), top_k.int(), top_p.float(), seed.long(), step.long())]
        self.ext.sample(logits.contiguous(), *c, tok, logp, _stream())
        return tok, logp


def select_ops(device, dtype, head_dim):
    """CUDA kernels on a GPU (unless SAFELADDER_KERNELS=0), else the references."""
    if device.type != "cuda" or os.environ.get("SAFELADDER_KERNELS", "1") == "0":
        return RefOps()
    try:
        return KernelOps(cuda_kernels(), head_dim, dtype)
    except Exception as e:  # NOTE: a machine without a working nvcc still samples, on the slow path
        warnings.warn(f"sampler: CUDA kernels unavailable ({e}); using the PyTorch references")
        return RefOps()


# -----------------------------------------------------------------------------
# Block manager


class BlockManager:
    """Free list and reference counts over the cache's blocks. A block shared by n sequences (the G
    samples of a prompt) has ref n and returns to the free list when the last of them lets go."""

    def __init__(self, num_blocks):
        self.num_blocks = num_blocks
        self.ref = np.zeros(num_blocks + 1, dtype=np.int32)  # + the cache's scratch block, never handed out
        self.free = list(range(num_blocks - 1, -1, -1))  # pop() hands out low ids first
        self.peak = 0                                    # most blocks in use at once (tests count sharing)

    @property
    def used(self):
        return self.num_blocks - len(self.free)

    def alloc(self):
        b = self.free.pop()
        self.ref[b] = 1
        self.peak = max(self.peak, self.used)
        return b

    def share(self, blocks):
        np.add.at(self.ref, blocks, 1)  # a block may appear several times

    def release(self, blocks):
        for b in blocks:
            self.ref[b] -= 1
            if self.ref[b] == 0:
                self.free.append(b)


# -----------------------------------------------------------------------------
# Paged KV cache: the object model.py's attention calls


class PagedKVCache:
    """K/V of every layer in fixed-size blocks: kv (L, 2, num_blocks + 1, nkv, block_size, hd). The extra
    last block is scratch: padding rows write there, so no step ever needs a data-dependent mask.
    Before each forward the engine sets `decode` and the step's slots (and, to decode, the block tables
    and context lengths); model.Attention then calls attend(layer, q, k, v) in every layer."""

    def __init__(self, n_layers, num_blocks, block_size, n_kv, head_dim, device, dtype, ops):
        self.kv = torch.zeros(n_layers, 2, num_blocks + 1, n_kv, block_size, head_dim, device=device, dtype=dtype)
        self.block_size, self.null_block, self.ops, self.scale = block_size, num_blocks, ops, head_dim ** -0.5
        self.next_pos = None  # model.forward reads it only without position_ids; the engine always gives them
        self.decode, self.slots, self.tables, self.ctx = False, None, None, None

    def add_tokens(self, attention_mask, T):
        pass  # model.forward's hook; lengths and positions are the engine's

    def copy_blocks(self, pairs):
        """Copy-on-write: block dst becomes a copy of block src in every layer."""
        src, dst = (torch.tensor(c, device=self.kv.device) for c in zip(*pairs))
        self.kv[:, :, dst] = self.kv[:, :, src]

    def attend(self, layer, q, k, v):
        kc, vc = self.kv[layer, 0], self.kv[layer, 1]  # (num_blocks + 1, nkv, bs, hd)
        if self.decode:  # q (B, nh, 1, hd), k/v (B, nkv, 1, hd): one new token per sequence
            self.ops.write_kv(k[:, :, 0], v[:, :, 0], kc, vc, self.slots)
            y = self.ops.paged_attention(q[:, :, 0].contiguous(), kc, vc, self.tables, self.ctx, self.scale)
            return y[:, :, None]
        # prefill: right-padded rows (B, T) that start from an empty cache, so the model's own causal
        # SDPA over the fresh K/V is exact for every real token (and is what the trainer runs)
        B, nkv, T, hd = k.shape
        self.ops.write_kv(k.transpose(1, 2).reshape(B * T, nkv, hd), v.transpose(1, 2).reshape(B * T, nkv, hd),
                          kc, vc, self.slots)
        return model_lib.attend(q, k, v, None)


# -----------------------------------------------------------------------------
# Sequences and the scheduler's bookkeeping


@dataclass(eq=False)
class Sequence:
    """One request in flight. tokens = prompt + generated; the K/V of tokens[:n] are in `blocks`."""
    idx: int                     # position in generate()'s request list
    req: Request
    P: int                       # prompt length
    seed: int
    prompt_pos: torch.Tensor     # (3, P) M-RoPE positions of the prompt (shared by a group)
    pos_offset: int              # generated token i (i >= P) sits at position i + pos_offset
    limit: int                   # total length at which it stops ("length")
    tokens: list
    logprobs: list = field(default_factory=list)
    blocks: list = field(default_factory=list)
    n: int = 0
    row: int = -1                # row of the decode batch, -1 when not running
    finish: str | None = None


def _same_images(a, b):
    x, y = a.pixel_values, b.pixel_values
    if x is None or y is None:
        return x is None and y is None
    return x is y or (x.shape == y.shape and torch.equal(x, y))


def _cdiv(a, b):
    return -(-a // b)


# -----------------------------------------------------------------------------
# CUDA graphs for the decode step


class DecodeGraphs:
    """The decode forward captured once per padded batch size (torch.cuda.CUDAGraph): a 7B step is
    ~1,000 small kernels whose launch gaps would otherwise rival the step itself. Step inputs are
    copied into static buffers (one host-to-device copy each); padding rows write to the scratch block."""

    def __init__(self, smp, width):
        self.smp, self.width = smp, width
        self.cap, dev = _cdiv(smp.max_batch, 16) * 16, smp.device
        self.host_i64 = torch.zeros(3, self.cap, dtype=torch.long).pin_memory()              # ids, positions, slots
        self.host_i32 = torch.zeros(self.cap * (1 + width), dtype=torch.int32).pin_memory()  # context lens, tables
        self.i64 = torch.zeros(3, self.cap, dtype=torch.long, device=dev)
        self.i32 = torch.zeros(self.cap * (1 + width), dtype=torch.int32, device=dev)
        self.graphs, self.pool = {}, None
        self.param_ptrs = [p.data_ptr() for p in smp.model.parameters()]

    def bucket(self, B):
        return next(b for b in (1, 2, 4, 8) if B <= b) if B <= 8 else _cdiv(B, 16) * 16

    def _forward(self, b):
        cache = self.smp.cache
        cache.decode, cache.slots = True, self.i64[2, :b]
        cache.ctx, cache.tables = self.i32[:b], self.i32[self.cap:self.cap + b * self.width].view(b, self.width)
        pos = self.i64[1, :b][None, :, None].expand(3, b, 1)
        return self.smp._logits(self.i64[0, :b, None], pos)

    def __call__(self, ids, pos, slots, ctx, table):
        B, b = len(ids), self.bucket(len(ids))
        h64, null = self.host_i64.numpy(), self.smp.cache.null_block
        h32, h_table = self.host_i32[:self.cap].numpy(), self.host_i32[self.cap:].view(self.cap, self.width).numpy()
        h64[:2, B:b], h64[2, B:b], h32[B:b], h_table[B:b] = 0, null * self.smp.block_size, 1, null
        h64[0, :B], h64[1, :B], h64[2, :B], h32[:B], h_table[:B] = ids, pos, slots, ctx, table[:B]
        self.i64.copy_(self.host_i64, non_blocking=True)
        self.i32.copy_(self.host_i32, non_blocking=True)
        if b not in self.graphs:
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):  # warm-up outside the capture (cuBLAS workspaces, lazy inits)
                self._forward(b)
            torch.cuda.current_stream().wait_stream(side)
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g, pool=self.pool):
                out = self._forward(b)
            self.pool = g.pool()
            self.graphs[b] = (g, out)
        g, out = self.graphs[b]
        g.replay()
        return out[:B]


# -----------------------------------------------------------------------------
# The sampler


class Sampler:
    """Continuous-batching generation with a paged KV cache over `model` (model.py's Qwen2VL, or a
    parallel.apply_tp copy: it caches its local kv heads, and all ranks of the TP group call generate()
    with the same requests). Cache: num_blocks, else kv_cache_bytes, else 40% of the free GPU memory at
    the first generate() (256 MiB on CPU). decode_fn(ids) -> str is needed for stop_strings. `stats`:
    the last generate()'s counters (prefill, decode step times, preemptions, copies, peak blocks)."""

    def __init__(self, model, *, block_size=16, num_blocks=None, max_batch=256, kv_cache_bytes=None, decode_fn=None,
                 max_prefill_tokens=16384, cuda_graphs=None):
        self.model, self.cfg, self.decode_fn = model, model.cfg, decode_fn
        self.block_size, self.max_batch, self.max_prefill_tokens = block_size, max_batch, max_prefill_tokens
        p = next(model.parameters())
        self.device, self.dtype = p.device, p.dtype
        attn = model.llm.layers[0].attn
        w = attn.k_proj.weight
        self.tp = getattr(w, "device_mesh", None) is not None  # a parallel.apply_tp copy: DTensor parameters
        self.n_kv, self.head_dim = (w.to_local() if self.tp else w).shape[0] // attn.hd, attn.hd  # local kv heads
        self.block_bytes = 2 * self.cfg.num_hidden_layers * self.n_kv * block_size * self.head_dim * p.element_size()
        self.num_blocks, self.kv_cache_bytes = num_blocks, kv_cache_bytes
        # NOTE: a TP copy in CUDA graphs (captured NCCL all-reduces) is not yet verified on GPUs: opt-in
        self.use_graphs = self.device.type == "cuda" and (not self.tp if cuda_graphs is None else cuda_graphs)
        self.cache = self.bm = self.graphs = None
        self.stats = {}

    def weights_updated(self):
        """Call after the model's weights change. No K/V outlives a generate() call, and graphs read the
        parameters in place (rl.py's refresh copies into them), so only moved parameters force a recapture."""
        if self.graphs is not None and self.graphs.param_ptrs != [p.data_ptr() for p in self.model.parameters()]:
            self.graphs = None

    def _ensure_cache(self):
        if self.cache is not None:
            return
        if self.num_blocks is None:
            budget = self.kv_cache_bytes
            if budget is None:
                budget = int(0.4 * torch.cuda.mem_get_info(self.device)[0]) if self.device.type == "cuda" else 256 << 20
            self.num_blocks = max(1, budget // self.block_bytes)
        self.bm = BlockManager(self.num_blocks)
        ops = select_ops(self.device, self.dtype, self.head_dim)
        self.cache = PagedKVCache(self.cfg.num_hidden_layers, self.num_blocks, self.block_size, self.n_kv,
                                  self.head_dim, self.device, self.dtype, ops)
        self.max_len = min(self.num_blocks * self.block_size, self.cfg.max_position_embeddings)

    # ---- requests -> groups of sequences sharing a prompt

    def _make_groups(self, requests):
        """One Sequence per request, and groups of those with identical prompts (token ids and images):
        each group is prefilled once. Returns (sequences, groups)."""
        seqs, groups, by_key = [], [], {}
        for i, r in enumerate(requests):
            p, P = r.params, len(r.prompt_ids)
            if not r.prompt_ids:
                raise ValueError(f"request {i}: empty prompt")
            if p.temperature < 0 or not 0 < p.top_p <= 1 or p.top_k < 0:
                raise ValueError(f"request {i}: need temperature >= 0, 0 < top_p <= 1, top_k >= 0; got {p}")
            if p.stop_strings and self.decode_fn is None:
                raise ValueError(f"request {i}: stop_strings need Sampler(decode_fn=...)")
            if self.tp and p.seed is None and p.temperature > 0:  # every rank of the group must draw alike
                raise ValueError(f"request {i}: a tensor-parallel sampler needs a seed for each sampled request")
            if P >= self.max_len:
                raise ValueError(f"request {i}: prompt of {P} tokens does not fit the KV cache "
                                 f"({self.max_len} tokens); raise num_blocks / kv_cache_bytes")
            seed = int(torch.randint(0, 2 ** 62, ())) if p.seed is None else p.seed & (2 ** 63 - 1)
            grid = None if r.image_grid_thw is None else tuple(r.image_grid_thw.flatten().tolist())
            key = (tuple(r.prompt_ids), grid)
            group = next((g for g in by_key.get(key, []) if len(g) < self.max_batch and _same_images(g[0].req, r)),
                         None)
            if group is None:
                pos, next_pos = self._prompt_positions(i, r)
            else:
                pos, next_pos = group[0].prompt_pos, group[0].pos_offset + group[0].P
            s = Sequence(i, r, P, seed, pos, next_pos - P, min(P + p.max_tokens, self.max_len), list(r.prompt_ids))
            seqs.append(s)
            if p.max_tokens <= 0:
                s.finish = "length"
            elif group is None:
                groups.append([s])
                by_key.setdefault(key, []).append(groups[-1])
            else:
                group.append(s)
        return seqs, groups

    def _prompt_positions(self, i, r):
        """(3, P) M-RoPE positions of a prompt and the position of the first generated token."""
        ids = torch.tensor([r.prompt_ids])
        n_img = int((ids == self.cfg.image_token_id).sum())
        grid = r.image_grid_thw
        n_feat = 0 if grid is None else int(grid.prod(-1).sum()) // self.cfg.vision.spatial_merge_size ** 2
        if (r.pixel_values is None) != (grid is None) or n_img != n_feat:
            raise ValueError(f"request {i}: {n_img} <|image_pad|> tokens in the prompt but images (image_grid_thw "
                             f"{None if grid is None else grid.tolist()}) for {n_feat}")
        try:
            pos, next_pos = model_lib.rope_positions(ids, grid, None, self.cfg)
        except ValueError as e:
            raise ValueError(f"request {i}: {e}") from None
        return pos[:, 0], int(next_pos[0])

    def _positions(self, s, n):
        """(3, n) M-RoPE positions of tokens[:n]: the prompt's, then generated text continuing from them."""
        gen = torch.arange(s.P, n) + s.pos_offset
        return torch.cat([s.prompt_pos, gen.expand(3, -1)], dim=1)

    def _prefill_len(self, s):
        """Tokens to recompute in one prefill: all of them, except that a response holding <|image_pad|>
        ids (which model.embed would take for image slots) is replayed through decode steps instead."""
        return s.P if self.cfg.image_token_id in s.tokens[s.P:] else len(s.tokens)

    # ---- scheduler: admission, prefill, decode, preemption

    def _add_row(self, s):
        """s joins the decode batch: its block table and sampling parameters get the next row."""
        s.row, p = len(self.running), s.req.params
        self.running.append(s)
        self.table[s.row] = self.cache.null_block
        self.table[s.row, :len(s.blocks)] = s.blocks
        self.row_f32[s.row] = p.temperature, p.top_p
        self.row_i64[s.row] = p.top_k, s.seed, s.P

    def _drop_rows(self, gone):
        """Remove sequences from the decode batch, keeping the others in order (and their rows)."""
        keep = [i for i, s in enumerate(self.running) if s not in gone]
        for a in (self.table, self.row_f32, self.row_i64):
            a[:len(keep)] = a[keep]
        self.running = [self.running[i] for i in keep]
        for r, s in enumerate(self.running):
            s.row = r
        for s in gone:
            s.row = -1

    def _admit(self, waiting):
        """Prefill-first admission: take waiting groups while batch rows, prefill tokens and free blocks
        allow. The blocks are allocated here; each admitted sequence also keeps one block in reserve for
        its next decode step, so admission never forces an immediate preemption."""
        batch, rows, longest = [], len(self.running), 0
        while waiting:
            group = waiting[0]
            n = self._prefill_len(group[0])
            need = _cdiv(n, self.block_size)
            if rows + len(group) > self.max_batch:
                break
            if batch and (len(batch) + 1) * max(longest, n) > self.max_prefill_tokens:
                break
            idle = not self.running and not batch
            if need + (0 if idle else rows + len(group)) > len(self.bm.free):
                if idle:
                    raise RuntimeError(f"KV cache of {self.bm.num_blocks} blocks cannot hold request {group[0].idx}")
                break
            waiting.popleft()
            blocks = [self.bm.alloc() for _ in range(need)]
            for s in group:
                s.blocks = list(blocks)
            self.bm.share(blocks * (len(group) - 1))
            batch.append((group, n))
            rows, longest = rows + len(group), max(longest, n)
        return batch

    def _prefill(self, batch):
        """One forward over right-padded prompts (vision tower included); each group's last logits give
        the first token of each of its sequences."""
        B, T, bs = len(batch), max(n for _, n in batch), self.block_size
        ids = torch.zeros(B, T, dtype=torch.long)
        pos = torch.zeros(3, B, T, dtype=torch.long)
        slots = torch.full((B, T), self.cache.null_block * bs, dtype=torch.long)
        images = []
        for b, (group, n) in enumerate(batch):
            s = group[0]
            ids[b, :n] = torch.tensor(s.tokens[:n])
            pos[:, b, :n] = self._positions(s, n)
            i = torch.arange(n)
            slots[b, :n] = torch.tensor(s.blocks)[i // bs] * bs + i % bs
            if s.req.pixel_values is not None:
                images.append(s.req)
        px = torch.cat([r.pixel_values for r in images]).to(self.device) if images else None
        grid = torch.cat([r.image_grid_thw for r in images]).to(self.device) if images else None
        self.cache.decode, self.cache.slots = False, slots.view(-1).to(self.device)
        h = self.model(ids.to(self.device), px, grid, position_ids=pos.to(self.device), cache=self.cache,
                       return_hidden=True)
        last = torch.tensor([n - 1 for _, n in batch], device=self.device)
        logits = self.model.lm_head(h[torch.arange(B, device=self.device), last])  # (B, V)
        self.stats["prefill_tokens"] += sum(n for _, n in batch)
        rows, fresh = [], []
        for b, (group, n) in enumerate(batch):
            for s in group:
                s.n = n
                self._add_row(s)
                if n == len(s.tokens):  # else the rest of a recomputed response is replayed by decode
                    rows.append(b)
                    fresh.append(s)
        if fresh:
            self._sample(logits[torch.tensor(rows, device=self.device)], fresh)
        self._retire()

    def _reserve_slot(self, s, copies):
        """A writable slot for token n: a new block at a block boundary, or a private copy of a shared,
        partly filled block (copy-on-write). False when no block is free."""
        j = s.n // self.block_size
        if j < len(s.blocks) and self.bm.ref[s.blocks[j]] == 1:
            return True
        if not self.bm.free:
            return False
        new = self.bm.alloc()
        if j == len(s.blocks):
            s.blocks.append(new)
        else:
            copies.append((s.blocks[j], new))
            self.bm.release([s.blocks[j]])
            s.blocks[j] = new
        self.table[s.row, j] = new
        return True

    def _preempt(self, s, waiting):
        """Free all of s's blocks; it waits (first in line) to be recomputed from its tokens."""
        self.bm.release(s.blocks)
        s.blocks, s.n = [], 0
        self._drop_rows([s])
        waiting.appendleft([s])
        self.stats["preemptions"] += 1

    def _decode(self, waiting):
        """One token for every running sequence."""
        t0 = time.perf_counter()
        B, bs, copies = len(self.running), self.block_size, []
        n = np.array([s.n for s in self.running])
        # rows whose next token starts a block or lands in a shared one; oldest first, and the youngest
        # sequence is preempted while blocks run out
        for r in np.flatnonzero((n % bs == 0) | (self.bm.ref[self.table[np.arange(B), n // bs]] > 1)).tolist():
            while r < len(self.running) and not self._reserve_slot(self.running[r], copies):
                self._preempt(self.running[-1], waiting)
        if not self.running:
            return
        if copies:
            self.cache.copy_blocks(copies)
            self.stats["cow_copies"] += len(copies)
        B, n = len(self.running), n[:len(self.running)]
        ids = [s.tokens[s.n] for s in self.running]
        pos = [s.n + s.pos_offset for s in self.running]
        slots = self.table[np.arange(B), n // bs].astype(np.int64) * bs + n % bs
        if self.graphs is not None:
            logits = self.graphs(ids, pos, slots, n + 1, self.table)
        else:
            dev, c = self.device, self.cache
            c.decode, c.slots = True, torch.from_numpy(slots).to(dev)
            c.ctx, c.tables = torch.from_numpy(n + 1).int().to(dev), torch.from_numpy(self.table[:B]).to(dev)
            p = torch.tensor(pos, device=dev)[None, :, None].expand(3, B, 1)
            logits = self._logits(torch.tensor(ids, device=dev)[:, None], p)
        fresh, rows = [], []
        for r, s in enumerate(self.running):
            s.n += 1
            if s.n == len(s.tokens):  # not replaying a recomputed response: draw the next token
                fresh.append(s)
                rows.append(r)
        if fresh:
            self._sample(logits if len(rows) == B else logits[torch.tensor(rows, device=self.device)], fresh)
        self._retire()
        self.stats["decode_steps"] += 1
        self.stats["decode_step_s"].append(time.perf_counter() - t0)

    def _logits(self, ids, pos):
        h = self.model(ids, position_ids=pos, cache=self.cache, return_hidden=True)  # (B, 1, H)
        return self.model.lm_head(h[:, -1])  # (B, V)

    def _retire(self):
        done = [s for s in self.running if s.finish is not None]
        for s in done:
            self.bm.release(s.blocks)
            s.blocks = []
        if done:
            self._drop_rows(done)

    # ---- sampling

    def _sample(self, logits, seqs):
        """Draw one token per sequence from its logits row, append it, and apply the stop rules."""
        rows = np.array([s.row for s in seqs])
        f32, i64 = self.row_f32[rows], self.row_i64[rows]
        i64[:, 2] = np.array([len(s.tokens) for s in seqs]) - i64[:, 2]  # step: tokens generated so far
        f32, i64 = torch.from_numpy(f32).to(self.device), torch.from_numpy(i64).to(self.device)
        tok, logp = self.cache.ops.sample(logits, f32[:, 0], i64[:, 0], f32[:, 1], i64[:, 1], i64[:, 2])
        tok, logp = torch.stack([tok.double(), logp.double()]).cpu().tolist()  # one device-to-host copy
        for s, t, lp in zip(seqs, tok, logp):
            p, t = s.req.params, int(t)
            s.tokens.append(t)
            s.logprobs.append(lp)
            if t in p.stop_token_ids or (p.stop_strings and self._stop_string_done(s, p.stop_strings)):
                s.finish = "stop"
            elif len(s.tokens) >= s.limit:
                s.finish = "length"

    def _stop_string_done(self, s, stops):
        """Does the response now contain a stop string? Only the tail can hold a new match (earlier
        matches would have stopped it), so only the last few tokens are decoded."""
        tail = self.decode_fn(s.tokens[max(s.P, len(s.tokens) - max(map(len, stops)) - 8):])
        return any(x in tail for x in stops)

    # ---- generate

    @torch.inference_mode()
    def generate(self, requests: list[Request]) -> list[Result]:
        """Sample a response for every request; results in request order."""
        if not requests:
            return []
        self._ensure_cache()
        self.stats = dict(prefill_tokens=0, prefill_s=0.0, decode_steps=0, decode_step_s=[], preemptions=0,
                          cow_copies=0)
        self.bm.peak = self.bm.used
        seqs, groups = self._make_groups(requests)
        width = _cdiv(max(s.limit for s in seqs), self.block_size)  # block-table columns the longest needs
        if self.use_graphs:  # power-of-two widths, so later calls reuse the captured graphs
            width = min(1 << (width - 1).bit_length(), _cdiv(self.max_len, self.block_size))
            if self.graphs is None or self.graphs.width < width:
                self.graphs = DecodeGraphs(self, width)
            width = self.graphs.width
        # host mirrors of the decode batch, one row per running sequence: block table, sampling parameters
        self.table = np.full((self.max_batch, width), self.cache.null_block, dtype=np.int32)
        self.row_f32 = np.zeros((self.max_batch, 2), dtype=np.float32)  # temperature, top_p
        self.row_i64 = np.zeros((self.max_batch, 3), dtype=np.int64)    # top_k, seed, prompt length
        self.running = []
        waiting = deque(groups)
        while waiting or self.running:
            batch = self._admit(waiting)
            if batch:
                t0 = time.perf_counter()
                self._prefill(batch)
                self.stats["prefill_s"] += time.perf_counter() - t0
            else:
                self._decode(waiting)
        self.stats["peak_blocks"] = self.bm.peak
        return [Result(s.tokens[s.P:], s.logprobs, s.finish) for s in seqs]  # seqs are in request order
