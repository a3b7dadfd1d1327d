"""
Qwen2.5-VL written out by hand: vision tower + language model + the glue between them, and the
Hugging Face checkpoint format they load from and save to. One file, no distributed code.

Read it top to bottom, small parts first (as nanoGPT does):
  config + presets -> norm, rotary helpers -> text attention, MLP, block -> vision tower
  (patch embed, 2-D rotary, window attention, patch merger) -> M-RoPE positions -> the VLM ->
  a dense KV cache and `generate` -> checkpoint I/O through one name map -> command-line configuration.

Numerically the same model as `transformers`' Qwen2_5_VLForConditionalGeneration (tests/test_model.py
compares logits to fp32 precision). References: Qwen2-VL (arXiv 2409.12191) for M-RoPE and the
dynamic-resolution ViT, Qwen2.5-VL (arXiv 2502.13923) for window attention in the ViT.

    python model.py --model=qwen2.5-vl-72b      # shapes and parameter count, built on the meta device
    python -c "import model; m = model.build('qwen2.5-vl-72b', device='meta'); print(model.num_params(m))"
"""
import dataclasses
import difflib
import json
import os
import shutil
import sys
import types
import typing
from collections import defaultdict
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

# -----------------------------------------------------------------------------
# Config and presets


@dataclass
class VisionConfig:
    depth: int = 32                     # ViT blocks
    hidden_size: int = 1280
    intermediate_size: int = 3420       # gated SiLU MLP width
    num_heads: int = 16
    in_chans: int = 3
    out_hidden_size: int = 3584         # the language model's width (patch merger output)
    patch_size: int = 14
    spatial_merge_size: int = 2         # 2x2 patches merge into one language-model token
    temporal_patch_size: int = 2        # an image is repeated to 2 frames by the processor
    window_size: int = 112              # window attention span, in pixels
    fullatt_block_indexes: tuple = (7, 15, 23, 31)  # blocks that attend over the whole image
    tokens_per_second: int = 2          # video only (temporal M-RoPE spacing)


@dataclass
class ModelConfig:
    vocab_size: int = 152064
    hidden_size: int = 3584
    intermediate_size: int = 18944
    num_hidden_layers: int = 28
    num_attention_heads: int = 28
    num_key_value_heads: int = 4
    rope_theta: float = 1e6
    mrope_section: tuple = (16, 24, 24)  # rotary frequency pairs given to (t, h, w); sums to head_dim/2
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = False
    max_position_embeddings: int = 128000
    bos_token_id: int = 151643
    eos_token_id: int = 151645
    vision_start_token_id: int = 151652
    vision_end_token_id: int = 151653
    image_token_id: int = 151655
    video_token_id: int = 151656
    vision: VisionConfig = field(default_factory=VisionConfig)

    @property
    def head_dim(self):
        return self.hidden_size // self.num_attention_heads


def _qwen25vl(hidden, inter, layers, heads, kv, vocab=152064, tie=False, vis_inter=3420):
    return ModelConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                       num_attention_heads=heads, num_key_value_heads=kv, tie_word_embeddings=tie,
                       vision=VisionConfig(intermediate_size=vis_inter, out_hidden_size=hidden))


# Shapes of the published checkpoints (their config.json files). `tiny` runs every code path on a
# laptop CPU in seconds; its token ids are those of data/tokenizer.json (a test checks them).
PRESETS = {
    "tiny": ModelConfig(
        vocab_size=2048, hidden_size=128, intermediate_size=384, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, rope_theta=10000.0, mrope_section=(4, 6, 6), tie_word_embeddings=True,
        max_position_embeddings=4096, bos_token_id=2000, eos_token_id=2002, vision_start_token_id=2003,
        vision_end_token_id=2004, image_token_id=2006, video_token_id=2007,
        vision=VisionConfig(depth=2, hidden_size=64, intermediate_size=128, num_heads=2, out_hidden_size=128,
                            window_size=56, fullatt_block_indexes=(1,))),
    "qwen2.5-vl-3b": _qwen25vl(2048, 11008, 36, 16, 2, vocab=151936, tie=True),
    "qwen2.5-vl-7b": _qwen25vl(3584, 18944, 28, 28, 4),
    "qwen2.5-vl-32b": _qwen25vl(5120, 27648, 64, 40, 8, vis_inter=3456),
    "qwen2.5-vl-72b": _qwen25vl(8192, 29568, 80, 64, 8, vis_inter=3456),
}


def get_config(name):
    if name not in PRESETS:
        raise ValueError(f"unknown model preset {name!r}; choose one of {sorted(PRESETS)}")
    return dataclasses.replace(PRESETS[name], vision=dataclasses.replace(PRESETS[name].vision))


# -----------------------------------------------------------------------------
# Small parts: norm and rotary helpers


class RMSNorm(nn.Module):
    def __init__(self, dim, eps=1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        # normalise in fp32, scale in the weight's dtype (as the reference does, so bf16 matches too)
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


def rotate_half(x):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary(x, cos, sin):
    return x * cos + rotate_half(x) * sin


def inv_freq(dim, theta, device):
    """Rotary inverse frequencies for `dim` rotated channels (computed on the fly: no buffers to load)."""
    return 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.float32, device=device) / dim))


def mrope_cos_sin(position_ids, cfg, dtype):
    """M-RoPE (Qwen2-VL §2.1): the head's frequency pairs are split into three sections that rotate by
    the temporal, height and width position of the token. Text tokens have t == h == w, which makes
    this ordinary 1-D RoPE. position_ids (3, B, T) -> cos, sin (B, 1, T, head_dim)."""
    freqs = position_ids[..., None].float() * inv_freq(cfg.head_dim, cfg.rope_theta, position_ids.device)
    # freqs (3, B, T, hd/2): take section i of the pairs from axis i (t, h, w)
    freqs = torch.cat([f[i] for i, f in enumerate(freqs.split(list(cfg.mrope_section), dim=-1))], dim=-1)
    emb = torch.cat((freqs, freqs), dim=-1)[:, None]  # (B, 1, T, hd)
    return emb.cos().to(dtype), emb.sin().to(dtype)


# -----------------------------------------------------------------------------
# Language model: attention with GQA and q/k/v bias, SwiGLU MLP, pre-norm block


def attend(q, k, v, mask):
    """q (B, nh, T, hd), k/v (B, nkv, S, hd) -> (B, nh, T, hd). mask None means plain causal;
    otherwise a bool (B, 1, T, S) mask of the keys each query may see."""
    if q.shape[1] != k.shape[1]:  # GQA: each group of nh/nkv query heads shares one k/v head
        rep = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
    if mask is None:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


class Attention(nn.Module):
    def __init__(self, cfg, layer_idx):
        super().__init__()
        self.layer_idx = layer_idx  # a KV cache keys its storage by it
        n_head, n_kv, self.hd = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        self.q_proj = nn.Linear(cfg.hidden_size, n_head * self.hd, bias=True)
        self.k_proj = nn.Linear(cfg.hidden_size, n_kv * self.hd, bias=True)
        self.v_proj = nn.Linear(cfg.hidden_size, n_kv * self.hd, bias=True)
        self.o_proj = nn.Linear(n_head * self.hd, cfg.hidden_size, bias=False)

    def forward(self, x, cos, sin, mask, cache=None):
        B, T, _ = x.shape
        # heads are counted from the projections' outputs (-1), so a tensor-parallel copy whose
        # projections hold a slice of the heads (parallel.apply_tp) runs this same code
        q = self.q_proj(x).view(B, T, -1, self.hd).transpose(1, 2)  # (B, nh, T, hd)
        k = self.k_proj(x).view(B, T, -1, self.hd).transpose(1, 2)  # (B, nkv, T, hd)
        v = self.v_proj(x).view(B, T, -1, self.hd).transpose(1, 2)  # (B, nkv, T, hd)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        # a cache (dense below, paged in sampler.py) stores k/v and attends over everything stored
        y = cache.attend(self.layer_idx, q, k, v) if cache is not None else attend(q, k, v, mask)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, -1))


class MLP(nn.Module):
    """Gated SiLU MLP (SwiGLU, Shazeer 2020): down(silu(gate(x)) * up(x))."""

    def __init__(self, dim, hidden, bias):
        super().__init__()
        self.gate_proj = nn.Linear(dim, hidden, bias=bias)
        self.up_proj = nn.Linear(dim, hidden, bias=bias)
        self.down_proj = nn.Linear(hidden, dim, bias=bias)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    def __init__(self, cfg, layer_idx):
        super().__init__()
        self.attn_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.attn = Attention(cfg, layer_idx)
        self.mlp_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg.hidden_size, cfg.intermediate_size, bias=False)

    def forward(self, x, cos, sin, mask, cache=None):
        x = x + self.attn(self.attn_norm(x), cos, sin, mask, cache)
        return x + self.mlp(self.mlp_norm(x))


class LanguageModel(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        # NOTE: passing _weight skips Embedding's normal_() init, whose first call on the meta device
        # imports torch's sympy-based decompositions (~1.5 s); init_weights initialises it instead.
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size,
                                         _weight=torch.empty(cfg.vocab_size, cfg.hidden_size))
        self.layers = nn.ModuleList(Block(cfg, i) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, x, position_ids, mask, cache=None):
        """x (B, T, H) input embeddings, position_ids (3, B, T) -> final normed hidden states (B, T, H)."""
        cos, sin = mrope_cos_sin(position_ids, self.cfg, x.dtype)
        for layer in self.layers:
            x = layer(x, cos, sin, mask, cache)
        return self.norm(x)


# -----------------------------------------------------------------------------
# Vision tower: patch embedding, 2-D rotary, window attention, 2x2 patch merger


class PatchEmbed(nn.Module):
    """A Conv3d whose kernel equals its stride is a matmul over flattened patches; the processor has
    already cut the image into patches, so we keep the Conv3d weight (the checkpoint's shape) and
    apply it as a linear layer."""

    def __init__(self, v):
        super().__init__()
        k = (v.temporal_patch_size, v.patch_size, v.patch_size)
        self.proj = nn.Conv3d(v.in_chans, v.hidden_size, kernel_size=k, stride=k, bias=False)

    def forward(self, pixel_values):  # (N, C*tp*p*p) -> (N, D)
        w = self.proj.weight
        return F.linear(pixel_values.to(w.dtype), w.view(w.shape[0], -1))


def varlen_attention(q, k, v, cu_seqlens):
    """Bidirectional attention confined to each segment [cu[i], cu[i+1]) of a packed sequence.
    q, k, v (N, nh, hd) -> (N, nh, hd). Segments of equal length (most windows are) share one SDPA call."""
    out = torch.empty_like(q)
    by_len = defaultdict(list)
    bounds = cu_seqlens.tolist()
    for start, end in zip(bounds[:-1], bounds[1:]):
        if end > start:
            by_len[end - start].append(start)
    for n, starts in by_len.items():
        idx = torch.tensor(starts, device=q.device)[:, None] + torch.arange(n, device=q.device)  # (S, n)
        y = F.scaled_dot_product_attention(*(t[idx].transpose(1, 2) for t in (q, k, v)))  # (S, nh, n, hd)
        out[idx] = y.transpose(1, 2).to(out.dtype)
    return out


class VisionAttention(nn.Module):
    def __init__(self, v):
        super().__init__()
        self.n_head, self.hd = v.num_heads, v.hidden_size // v.num_heads
        self.qkv = nn.Linear(v.hidden_size, 3 * v.hidden_size, bias=True)
        self.proj = nn.Linear(v.hidden_size, v.hidden_size, bias=True)

    def forward(self, x, cos, sin, cu_seqlens):
        N = x.shape[0]
        q, k, v = self.qkv(x).view(N, 3, self.n_head, self.hd).unbind(1)  # each (N, nh, hd)
        # the reference rotates the vision q/k in fp32 even under bf16
        q = apply_rotary(q.float(), cos, sin).to(v.dtype)
        k = apply_rotary(k.float(), cos, sin).to(v.dtype)
        return self.proj(varlen_attention(q, k, v, cu_seqlens).reshape(N, -1))


class VisionBlock(nn.Module):
    def __init__(self, v):
        super().__init__()
        self.attn_norm = RMSNorm(v.hidden_size, 1e-6)
        self.attn = VisionAttention(v)
        self.mlp_norm = RMSNorm(v.hidden_size, 1e-6)
        self.mlp = MLP(v.hidden_size, v.intermediate_size, bias=True)

    def forward(self, x, cos, sin, cu_seqlens):
        x = x + self.attn(self.attn_norm(x), cos, sin, cu_seqlens)
        return x + self.mlp(self.mlp_norm(x))


class PatchMerger(nn.Module):
    """Concatenates each 2x2 group of neighbouring patch features (adjacent in the processor's order)
    and projects them to the language model's width with a GELU MLP."""

    def __init__(self, v):
        super().__init__()
        self.unit = v.spatial_merge_size ** 2
        self.norm = RMSNorm(v.hidden_size, 1e-6)
        self.fc1 = nn.Linear(v.hidden_size * self.unit, v.hidden_size * self.unit)
        self.fc2 = nn.Linear(v.hidden_size * self.unit, v.out_hidden_size)

    def forward(self, x):  # (N, D) -> (N / unit, out)
        x = self.norm(x).view(-1, self.fc1.in_features)
        return self.fc2(F.gelu(self.fc1(x)))


def vision_rope_positions(grid_thw, merge):
    """(h, w) patch coordinates in the processor's patch order, where each 2x2 merge group is
    contiguous. grid_thw (n_img, 3) -> (N, 2)."""
    pos = []
    for t, h, w in grid_thw.tolist():
        hh, ww = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
        hw = torch.stack([hh, ww], dim=-1).view(h // merge, merge, w // merge, merge, 2)
        pos.append(hw.permute(0, 2, 1, 3, 4).reshape(-1, 2).repeat(t, 1))
    return torch.cat(pos)


def vision_windows(grid_thw, merge, window):
    """Window attention layout (Qwen2.5-VL §2.1): the merged-token grid of each frame is tiled by
    window x window squares (row-major, ragged at the right and bottom edges). Returns the order in
    which merge groups are visited window by window, (N / merge^2,), and the patch-level boundaries of
    the windows in that order (cu_seqlens, n_windows + 1)."""
    order, cu, offset = [], [0], 0
    for t, h, w in grid_thw.tolist():
        gh, gw = h // merge, w // merge
        ids = torch.arange(t * gh * gw).view(t, gh, gw) + offset
        for frame in ids:
            for r in range(0, gh, window):
                for c in range(0, gw, window):
                    win = frame[r:r + window, c:c + window].flatten()
                    order.append(win)
                    cu.append(cu[-1] + win.numel() * merge * merge)
        offset += t * gh * gw
    return torch.cat(order), torch.tensor(cu)


class VisionTower(nn.Module):
    def __init__(self, v):
        super().__init__()
        self.v = v
        self.patch_embed = PatchEmbed(v)
        self.blocks = nn.ModuleList(VisionBlock(v) for _ in range(v.depth))
        self.merger = PatchMerger(v)

    def forward(self, pixel_values, grid_thw):
        """pixel_values (N, C*tp*p*p) and grid_thw (n_img, 3) as the Qwen2.5-VL processor makes them ->
        merged image features (N / merge^2, out_hidden_size), images in order."""
        v, dev = self.v, pixel_values.device
        unit = v.spatial_merge_size ** 2
        x = self.patch_embed(pixel_values)  # (N, D)
        N, D = x.shape
        # 2-D rotary: half the rotated pairs follow the row, half the column
        freqs = vision_rope_positions(grid_thw, v.spatial_merge_size).to(dev)[..., None].float() * \
            inv_freq(D // v.num_heads // 2, 10000.0, dev)      # (N, 2, hd/4)
        emb = torch.cat([freqs.flatten(1)] * 2, dim=-1)[:, None]  # (N, 1, hd)
        cos, sin = emb.cos(), emb.sin()

        # visit merge groups window by window so that each window is a contiguous segment
        order, cu_windows = vision_windows(grid_thw, v.spatial_merge_size,
                                           v.window_size // v.spatial_merge_size // v.patch_size)
        order = order.to(dev)

        def reorder(t):
            return t.reshape(N // unit, unit, *t.shape[1:])[order].reshape(t.shape)

        x, cos, sin = reorder(x), reorder(cos), reorder(sin)
        frame_sizes = torch.repeat_interleave(grid_thw[:, 1] * grid_thw[:, 2], grid_thw[:, 0])
        cu_frames = F.pad(frame_sizes.cumsum(0), (1, 0))  # full attention stays inside each frame
        for i, block in enumerate(self.blocks):
            x = block(x, cos, sin, cu_frames if i in v.fullatt_block_indexes else cu_windows)
        return self.merger(x)[torch.argsort(order)]  # (N / unit, out), back in image order


# -----------------------------------------------------------------------------
# M-RoPE positions: where every token sits in (t, h, w)


def sample_positions(ids, grids, image_token_id, merge):
    """3-D positions of one unpadded sample, as Qwen2-VL assigns them: text advances all three axes by
    one per token; an image's tokens get (start + t, start + row, start + col) over its merged grid; the
    text after the image continues from start + max(rows, cols). ids: list of token ids; grids: the
    (t, h, w) of the images still to place, in order. Returns (positions (3, T), images used)."""
    parts, p, i, k = [], 0, 0, 0
    while i < len(ids):
        if ids[i] != image_token_id:  # a run of text
            j = i
            while j < len(ids) and ids[j] != image_token_id:
                j += 1
            parts.append(torch.arange(p, p + j - i).expand(3, -1))
            p, i = p + j - i, j
            continue
        if k == len(grids):
            raise ValueError(f"image tokens at {i} but only {len(grids)} images in image_grid_thw")
        t, h, w = grids[k][0], grids[k][1] // merge, grids[k][2] // merge
        n = t * h * w
        if ids[i:i + n] != [image_token_id] * n:
            raise ValueError(f"image {k} of grid {list(grids[k])} needs {n} consecutive image tokens at {i}")
        tt, hh, ww = torch.meshgrid(torch.arange(t), torch.arange(h), torch.arange(w), indexing="ij")
        parts.append(torch.stack([tt, hh, ww]).reshape(3, n) + p)
        p, i, k = p + max(h, w), i + n, k + 1
    return (torch.cat(parts, dim=1) if parts else torch.zeros(3, 0, dtype=torch.long)), k


def rope_positions(input_ids, image_grid_thw, attention_mask, cfg):
    """M-RoPE positions of a batch (sample_positions per row; padding, attention_mask 0, is skipped and
    gets 0). Returns position_ids (3, B, T) and next_pos (B,), the position the next token takes."""
    B, T = input_ids.shape
    dev = input_ids.device
    valid = attention_mask.bool() if attention_mask is not None else torch.ones(B, T, dtype=torch.bool, device=dev)
    if image_grid_thw is None or not (input_ids == cfg.image_token_id).any():
        pos = (valid.long().cumsum(-1) - 1).clamp(min=0)  # text only: plain 1-D positions
        return pos[None].expand(3, B, T).contiguous(), pos.max(-1).values + 1
    grids = image_grid_thw.tolist()
    position_ids = torch.zeros(3, B, T, dtype=torch.long, device=dev)
    next_pos = torch.zeros(B, dtype=torch.long, device=dev)
    for b in range(B):  # the images are in row order: each row takes the next ones
        row, used = sample_positions(input_ids[b][valid[b]].tolist(), grids, cfg.image_token_id,
                                     cfg.vision.spatial_merge_size)
        grids = grids[used:]
        position_ids[:, b, valid[b]] = row.to(dev)
        next_pos[b] = row.max() + 1 if row.numel() else 0
    return position_ids, next_pos


# -----------------------------------------------------------------------------
# The vision-language model


class Qwen2VL(nn.Module):
    """Vision tower + language model + lm_head. Call it like the transformers model:
    model(input_ids, pixel_values=None, image_grid_thw=None, attention_mask=None) -> logits (B, T, V)."""

    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        self.visual = VisionTower(cfg.vision)
        self.llm = LanguageModel(cfg)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        # True for a trained tower (parallel.build_for_training, apply_fsdp): under FSDP every rank must
        # run it in every forward, images or not
        self.vision_every_forward = False
        self.tie_weights()

    def tie_weights(self):
        if self.cfg.tie_word_embeddings:
            self.lm_head.weight = self.llm.embed_tokens.weight

    def embed(self, input_ids, pixel_values=None, image_grid_thw=None):
        """Token embeddings with each image's features scattered into its <|image_pad|> positions."""
        x = self.llm.embed_tokens(input_ids)  # (B, T, H)
        if pixel_values is None and self.vision_every_forward:  # one 2x2-patch image, its features x 0
            v = self.cfg.vision
            dummy = torch.zeros(4, v.in_chans * v.temporal_patch_size * v.patch_size ** 2, device=x.device)
            return x + 0 * self.visual(dummy, torch.tensor([[1, 2, 2]], device=x.device)).sum().to(x.dtype)
        if pixel_values is None:
            return x
        feats = self.visual(pixel_values, image_grid_thw)  # (n_image_tokens, H)
        is_image = input_ids == self.cfg.image_token_id
        if int(is_image.sum()) != feats.shape[0]:
            raise ValueError(f"input_ids hold {int(is_image.sum())} <|image_pad|> tokens but the images "
                             f"(image_grid_thw {image_grid_thw.tolist()}) give {feats.shape[0]} features: "
                             "each image needs t*h*w/merge^2 pad tokens")
        return x.masked_scatter(is_image[..., None], feats.to(x.dtype))

    def forward(self, input_ids, pixel_values=None, image_grid_thw=None, attention_mask=None, *,
                position_ids=None, seq_ids=None, cache=None, return_hidden=False, head=None):
        """input_ids (B, T); attention_mask (B, T) 1/0 padding mask; position_ids (3, B, T) override the
        computed M-RoPE positions (packing); seq_ids (B, T) mark packed samples (attention stays within
        equal ids, -1 is padding); cache: a KV cache (below, or sampler.py's paged one).
        Returns logits (B, T, V); the final hidden states (B, T, H) when return_hidden; or
        head(hidden, lm_head.weight) when a head function is given: the fused log-prob and loss kernels
        of ops.py apply lm_head themselves chunk by chunk, and inside forward they see the whole
        weight even when FSDP shards it between calls."""
        x = self.embed(input_ids, pixel_values, image_grid_thw)
        if position_ids is None:
            if cache is not None and cache.next_pos is not None:  # decoding: continue from the prompt
                position_ids = (cache.next_pos[:, None] + torch.arange(input_ids.shape[1], device=x.device))
                position_ids = position_ids[None].expand(3, -1, -1)
                cache.next_pos = cache.next_pos + input_ids.shape[1]
            else:
                position_ids, next_pos = rope_positions(input_ids, image_grid_thw, attention_mask, self.cfg)
                if cache is not None:
                    cache.next_pos = next_pos
        if cache is not None:
            cache.add_tokens(attention_mask, input_ids.shape[1])
        mask = None if cache is not None else causal_mask(attention_mask, seq_ids)  # a cache masks itself
        h = self.llm(x, position_ids, mask, cache)
        if head is not None:
            return head(h, self.lm_head.weight)
        return h if return_hidden else self.lm_head(h)


def causal_mask(attention_mask, seq_ids):
    """Bool (B, 1, T, T) mask, or None when plain causal attention is exact (no padding, no packing).
    Every query also sees itself, so fully padded rows stay finite."""
    if seq_ids is None and (attention_mask is None or bool(attention_mask.all())):
        return None
    ref = seq_ids if seq_ids is not None else attention_mask
    T, dev = ref.shape[1], ref.device
    causal = torch.ones(T, T, dtype=torch.bool, device=dev).tril()
    if seq_ids is not None:
        mask = causal & (seq_ids[:, :, None] == seq_ids[:, None, :])  # packed: stay inside the sample
    else:
        mask = causal & attention_mask.bool()[:, None, :]              # padded: never look at padding
    return (mask | torch.eye(T, dtype=torch.bool, device=dev))[:, None]


def init_weights(model, std=0.02):
    """Random init for training from scratch (the tiny demo) and tests: normal(0, std) matrices and
    embeddings, zero biases, unit norms."""
    for m in model.modules():
        if isinstance(m, (nn.Linear, nn.Conv3d, nn.Embedding)):
            nn.init.normal_(m.weight, std=std)
            if getattr(m, "bias", None) is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, RMSNorm):
            nn.init.ones_(m.weight)


def build(cfg="tiny", device="cpu", dtype=torch.float32, seed=0):
    """A model from a preset name or a ModelConfig. On the meta device no memory is touched (a 72B
    model builds in milliseconds); elsewhere the weights are randomly initialised (seeded)."""
    cfg = get_config(cfg) if isinstance(cfg, str) else cfg
    with torch.device("meta"):
        model = Qwen2VL(cfg).to(dtype)
    if str(device) != "meta":
        model.to_empty(device=device)
        model.tie_weights()  # to_empty replaces parameters one module at a time, which unties them
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            init_weights(model)
    return model


def num_params(model):
    return sum(p.numel() for p in model.parameters())


# -----------------------------------------------------------------------------
# KV cache and a plain generate (the fast engine is sampler.py; this one is the readable reference)


class KVCache:
    """Contiguous per-layer K/V buffers for a batch of left-padded prompts."""

    def __init__(self, cfg, batch, max_len, device, dtype):
        shape = (cfg.num_hidden_layers, batch, cfg.num_key_value_heads, max_len, cfg.head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.valid = torch.zeros(batch, max_len, dtype=torch.bool, device=device)  # False at padding
        self.length = 0        # tokens stored so far
        self.next_pos = None   # (B,) M-RoPE position of the next token, set by the prefill

    def add_tokens(self, attention_mask, T):
        s = self.length
        self.valid[:, s:s + T] = True if attention_mask is None else attention_mask.bool()

    def attend(self, layer, q, k, v):
        s, T = self.length, q.shape[2]
        self.k[layer, :, :, s:s + T] = k
        self.v[layer, :, :, s:s + T] = v
        S = s + T
        q_pos = torch.arange(s, S, device=q.device)[:, None]
        k_pos = torch.arange(S, device=q.device)[None]
        mask = ((k_pos <= q_pos) & self.valid[:, None, :S]) | (k_pos == q_pos)  # (B, T, S)
        y = attend(q, self.k[layer, :, :, :S], self.v[layer, :, :, :S], mask[:, None])
        if layer == self.k.shape[0] - 1:  # the last layer closes this forward
            self.length += T
        return y


@torch.no_grad()
def generate(model, input_ids, attention_mask=None, pixel_values=None, image_grid_thw=None,
             max_new_tokens=32, temperature=0.0, eos_token_id=None, generator=None):
    """Decode from left-padded prompts with a dense KV cache. temperature 0 is greedy.
    Returns new tokens (B, n); rows that finished early are filled with eos."""
    B, T = input_ids.shape
    p = next(model.parameters())
    cache = KVCache(model.cfg, B, T + max_new_tokens, p.device, p.dtype)
    logits = model(input_ids, pixel_values, image_grid_thw, attention_mask, cache=cache)[:, -1]
    out, done = [], torch.zeros(B, dtype=torch.bool, device=input_ids.device)
    for _ in range(max_new_tokens):
        if temperature > 0:
            probs = torch.softmax(logits.float() / temperature, dim=-1)
            tok = torch.multinomial(probs, 1, generator=generator)[:, 0]
        else:
            tok = logits.argmax(-1)
        if eos_token_id is not None:
            tok = torch.where(done, torch.full_like(tok, eos_token_id), tok)
            done |= tok == eos_token_id
        out.append(tok)
        if bool(done.all()):
            break
        logits = model(tok[:, None], cache=cache)[:, -1]
    return torch.stack(out, dim=1)


# -----------------------------------------------------------------------------
# Hugging Face checkpoints: config.json (flat or nested layout) and safetensors through one name map


def hf_name_map(cfg):
    """The one explicit table: Hugging Face checkpoint name -> our parameter name."""
    table = {"model.embed_tokens.weight": "llm.embed_tokens.weight",
             "model.norm.weight": "llm.norm.weight",
             "visual.patch_embed.proj.weight": "visual.patch_embed.proj.weight",
             "visual.merger.ln_q.weight": "visual.merger.norm.weight",
             "visual.merger.mlp.0.weight": "visual.merger.fc1.weight",
             "visual.merger.mlp.0.bias": "visual.merger.fc1.bias",
             "visual.merger.mlp.2.weight": "visual.merger.fc2.weight",
             "visual.merger.mlp.2.bias": "visual.merger.fc2.bias"}
    if not cfg.tie_word_embeddings:
        table["lm_head.weight"] = "lm_head.weight"
    for i in range(cfg.num_hidden_layers):
        hf, ours = f"model.layers.{i}.", f"llm.layers.{i}."
        table[hf + "input_layernorm.weight"] = ours + "attn_norm.weight"
        table[hf + "post_attention_layernorm.weight"] = ours + "mlp_norm.weight"
        for proj in ("q_proj", "k_proj", "v_proj"):
            table[hf + f"self_attn.{proj}.weight"] = ours + f"attn.{proj}.weight"
            table[hf + f"self_attn.{proj}.bias"] = ours + f"attn.{proj}.bias"
        table[hf + "self_attn.o_proj.weight"] = ours + "attn.o_proj.weight"
        for proj in ("gate_proj", "up_proj", "down_proj"):
            table[hf + f"mlp.{proj}.weight"] = ours + f"mlp.{proj}.weight"
    for i in range(cfg.vision.depth):
        hf, ours = f"visual.blocks.{i}.", f"visual.blocks.{i}."
        table[hf + "norm1.weight"] = ours + "attn_norm.weight"
        table[hf + "norm2.weight"] = ours + "mlp_norm.weight"
        for name in ("attn.qkv", "attn.proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"):
            table[hf + name + ".weight"] = ours + name + ".weight"
            table[hf + name + ".bias"] = ours + name + ".bias"
    return table


# transformers 4.5x saved some checkpoints with its internal module names; read those too
_HF_PREFIX_ALIASES = (("model.language_model.", "model."), ("model.visual.", "visual."))


def canonical_hf_name(name):
    for alias, canonical in _HF_PREFIX_ALIASES:
        if name.startswith(alias):
            return canonical + name[len(alias):]
    return name


def config_from_hf(d):
    """ModelConfig from a config.json dict: the flat layout of the published checkpoints
    (rope_scaling with mrope_section at top level) or the nested one newer transformers writes
    (text_config with rope_parameters)."""
    if d.get("model_type") not in ("qwen2_5_vl", None):
        raise ValueError(f"config.json model_type {d.get('model_type')!r} is not supported (need qwen2_5_vl)")
    text = {**d, **d.get("text_config", {})}
    rope = text.get("rope_parameters") or text.get("rope_scaling") or {}
    if text.get("use_sliding_window"):
        raise ValueError("sliding-window attention is not supported (no Qwen2.5-VL checkpoint uses it)")
    v = d["vision_config"]
    vision = VisionConfig(
        depth=v["depth"], hidden_size=v["hidden_size"], intermediate_size=v["intermediate_size"],
        num_heads=v["num_heads"], in_chans=v.get("in_chans", v.get("in_channels", 3)),
        out_hidden_size=v.get("out_hidden_size", text["hidden_size"]), patch_size=v.get("patch_size", 14),
        spatial_merge_size=v.get("spatial_merge_size", 2), temporal_patch_size=v.get("temporal_patch_size", 2),
        window_size=v.get("window_size", 112), fullatt_block_indexes=tuple(v.get("fullatt_block_indexes", ())),
        tokens_per_second=v.get("tokens_per_second", 2))
    eos = text.get("eos_token_id", 151645)
    return ModelConfig(
        vocab_size=text["vocab_size"], hidden_size=text["hidden_size"], intermediate_size=text["intermediate_size"],
        num_hidden_layers=text["num_hidden_layers"], num_attention_heads=text["num_attention_heads"],
        num_key_value_heads=text.get("num_key_value_heads", text["num_attention_heads"]),
        rope_theta=float(rope.get("rope_theta", text.get("rope_theta", 1e6))),
        mrope_section=tuple(rope.get("mrope_section", (16, 24, 24))),
        rms_norm_eps=text.get("rms_norm_eps", 1e-6),
        tie_word_embeddings=bool(d.get("tie_word_embeddings", text.get("tie_word_embeddings", False))),
        max_position_embeddings=text.get("max_position_embeddings", 128000),
        bos_token_id=text.get("bos_token_id", 151643), eos_token_id=eos[0] if isinstance(eos, list) else eos,
        vision_start_token_id=d.get("vision_start_token_id", 151652),
        vision_end_token_id=d.get("vision_end_token_id", 151653),
        image_token_id=d.get("image_token_id", 151655), video_token_id=d.get("video_token_id", 151656),
        vision=vision)


def config_to_hf(cfg, dtype=torch.float32):
    """The flat config.json layout of the published Qwen2.5-VL checkpoints (read by every version of
    transformers and vLLM)."""
    v = cfg.vision
    return {
        "architectures": ["Qwen2_5_VLForConditionalGeneration"], "model_type": "qwen2_5_vl",
        "vocab_size": cfg.vocab_size, "hidden_size": cfg.hidden_size, "intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": cfg.num_hidden_layers, "num_attention_heads": cfg.num_attention_heads,
        "num_key_value_heads": cfg.num_key_value_heads, "hidden_act": "silu", "rms_norm_eps": cfg.rms_norm_eps,
        "rope_theta": cfg.rope_theta, "rope_scaling": {"type": "mrope", "mrope_section": list(cfg.mrope_section)},
        "max_position_embeddings": cfg.max_position_embeddings, "tie_word_embeddings": cfg.tie_word_embeddings,
        "use_sliding_window": False, "attention_dropout": 0.0,
        "bos_token_id": cfg.bos_token_id, "eos_token_id": cfg.eos_token_id,
        "vision_start_token_id": cfg.vision_start_token_id, "vision_end_token_id": cfg.vision_end_token_id,
        "image_token_id": cfg.image_token_id,
        "video_token_id": cfg.video_token_id, "torch_dtype": str(dtype).removeprefix("torch."),
        "vision_config": {
            "depth": v.depth, "hidden_size": v.hidden_size, "intermediate_size": v.intermediate_size,
            "num_heads": v.num_heads, "in_chans": v.in_chans, "out_hidden_size": v.out_hidden_size,
            "patch_size": v.patch_size, "spatial_merge_size": v.spatial_merge_size,
            "temporal_patch_size": v.temporal_patch_size, "window_size": v.window_size,
            "fullatt_block_indexes": list(v.fullatt_block_indexes), "tokens_per_second": v.tokens_per_second,
            "hidden_act": "silu", "model_type": "qwen2_5_vl"},
    }


def checkpoint_files(path):
    """{hf_name: safetensors file} for a checkpoint directory, single-file or sharded with an index."""
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.exists(index):
        with open(index) as f:
            weight_map = json.load(f)["weight_map"]
        return {name: os.path.join(path, file) for name, file in weight_map.items()}
    single = os.path.join(path, "model.safetensors")
    if not os.path.exists(single):
        raise FileNotFoundError(f"{path}: neither model.safetensors nor model.safetensors.index.json")
    from safetensors import safe_open
    with safe_open(single, "pt") as f:
        return {name: single for name in f.keys()}


def match_checkpoint(cfg, hf_names, path=""):
    """{our_name: hf_name} for every parameter; fails loudly naming missing and unexpected weights."""
    table = hf_name_map(cfg)
    found, unexpected = {}, []
    for name in hf_names:
        ours = table.get(canonical_hf_name(name))
        if ours is None:
            if not (cfg.tie_word_embeddings and name == "lm_head.weight"):  # tied: lm_head is the embedding
                unexpected.append(name)
        else:
            found[ours] = name
    missing = sorted(set(table.values()) - set(found))
    if missing or unexpected:
        raise ValueError(f"checkpoint {path} does not match the model: {len(missing)} missing "
                         f"{missing[:8]}, {len(unexpected)} unexpected {sorted(unexpected)[:8]}")
    return found


def load_config(path):
    with open(os.path.join(path, "config.json")) as f:
        return config_from_hf(json.load(f))


def load_pretrained(path, device="cpu", dtype=torch.float32):
    """Read a Hugging Face Qwen2.5-VL directory (config.json + model.safetensors, or shards with
    model.safetensors.index.json). Tensors are memory-mapped and copied one at a time."""
    from safetensors import safe_open
    cfg = load_config(path)
    files = checkpoint_files(path)
    ours_to_hf = match_checkpoint(cfg, files, path)
    model = build(cfg, device="meta", dtype=dtype)
    model.to_empty(device=device)
    model.tie_weights()
    params = dict(model.named_parameters())
    by_file = defaultdict(list)
    for ours, hf in ours_to_hf.items():
        by_file[files[hf]].append((ours, hf))
    with torch.no_grad():
        for file, names in by_file.items():
            with safe_open(file, "pt") as f:
                for ours, hf in names:
                    t = f.get_tensor(hf)
                    if t.shape != params[ours].shape:
                        raise ValueError(f"{file}: {hf} has shape {tuple(t.shape)}, the model expects "
                                         f"{tuple(params[ours].shape)} for {ours}")
                    params[ours].copy_(t)
    return model


def save_pretrained(model, path, max_shard_bytes=5 << 30):
    """Write a directory transformers loads (Qwen2_5_VLForConditionalGeneration.from_pretrained) with
    identical logits: flat config.json + safetensors (sharded with an index above max_shard_bytes)."""
    ours_to_hf = {ours: hf for hf, ours in hf_name_map(model.cfg).items()}
    state = model.state_dict()
    tensors = ((ours_to_hf[name], t) for name, t in state.items() if name in ours_to_hf)
    write_hf_checkpoint(model.cfg, tensors, path, next(iter(state.values())).dtype, max_shard_bytes)


def write_hf_checkpoint(cfg, named_tensors, path, dtype, max_shard_bytes=5 << 30):
    """Stream (hf_name, tensor) pairs into safetensors shards, then swap the finished directory into
    place, so a crash mid-write never leaves a half-written checkpoint at `path`."""
    from safetensors.torch import save_file
    tmp = path.rstrip("/") + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    shards, shard, size = [], {}, 0

    def flush():
        if shard:
            name = f"model-{len(shards) + 1:05d}.safetensors"
            save_file(dict(shard), os.path.join(tmp, name), metadata={"format": "pt"})
            shards.append((name, list(shard)))
            shard.clear()

    for name, t in named_tensors:
        t = t.detach().to("cpu").contiguous()
        if size + t.numel() * t.element_size() > max_shard_bytes:
            flush()
            size = 0
        shard[name] = t
        size += t.numel() * t.element_size()
    flush()
    if len(shards) == 1:
        os.rename(os.path.join(tmp, shards[0][0]), os.path.join(tmp, "model.safetensors"))
    else:
        total = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
        weight_map = {}
        for (old, names), new in zip(shards, total):
            os.rename(os.path.join(tmp, old), os.path.join(tmp, new))
            weight_map.update({n: new for n in names})
        with open(os.path.join(tmp, "model.safetensors.index.json"), "w") as f:
            json.dump({"metadata": {}, "weight_map": weight_map}, f, indent=2)
    with open(os.path.join(tmp, "config.json"), "w") as f:
        json.dump(config_to_hf(cfg, dtype), f, indent=2)
    old = path.rstrip("/") + ".old"
    if os.path.exists(path):
        os.rename(path, old)
    os.rename(tmp, path)
    shutil.rmtree(old, ignore_errors=True)


# -----------------------------------------------------------------------------
# Command-line configuration shared by every script: `--key=value` onto a dataclass, type-checked


def _parse_value(text, typ, key):
    origin, args = typing.get_origin(typ), typing.get_args(typ)
    if origin in (typing.Union, types.UnionType) and type(None) in args:
        if text.lower() in ("none", "null"):
            return None
        typ = next(a for a in args if a is not type(None))
        origin, args = typing.get_origin(typ), typing.get_args(typ)
    if typ is bool:
        if text.lower() in ("1", "true", "yes", "on"):
            return True
        if text.lower() in ("0", "false", "no", "off"):
            return False
        raise ValueError(f"--{key} expects a bool (true/false), got {text!r}")
    if typ in (int, float, str):
        try:
            return typ(text)
        except ValueError:
            raise ValueError(f"--{key} expects {typ.__name__}, got {text!r}") from None
    if typ in (list, tuple) or origin in (list, tuple, dict) or typ is dict:
        try:
            value = json.loads(text)
        except json.JSONDecodeError:  # allow a bare comma list: --labels=safety,value
            value = [s for s in text.split(",") if s]
        return tuple(value) if (typ is tuple or origin is tuple) else value
    raise ValueError(f"--{key}: cannot parse values of type {typ}")


def configure(cfg, argv=None):
    """Apply overrides to a Config dataclass instance, as nanoGPT's configurator does but without
    exec: `--key=value` (typed by the field; a bare `--flag` sets a bool), `--config=FILE.json` (a dict
    of overrides, applied where it appears). An unknown key is an error naming the closest valid key."""
    argv = sys.argv[1:] if argv is None else argv
    hints = typing.get_type_hints(type(cfg))
    for arg in argv:
        if not arg.startswith("--"):
            raise SystemExit(f"unexpected argument {arg!r}: use --key=value")
        key, eq, text = arg[2:].partition("=")
        if key == "config":
            with open(text) as f:
                overrides = json.load(f)
            configure(cfg, [f"--{k}={v if isinstance(v, str) else json.dumps(v)}" for k, v in overrides.items()])
            continue
        if key not in hints:
            close = difflib.get_close_matches(key, list(hints), n=1)
            raise SystemExit(f"unknown config key --{key}" + (f"; did you mean --{close[0]}?" if close else ""))
        if not eq:
            if hints[key] is not bool:
                raise SystemExit(f"--{key} needs a value: --{key}=...")
            text = "true"
        try:
            setattr(cfg, key, _parse_value(text, hints[key], key))
        except ValueError as e:
            raise SystemExit(str(e)) from None
    return cfg


# -----------------------------------------------------------------------------
# `python model.py --model=NAME`: a preset's shapes and parameter count, built on the meta device


@dataclass
class ShowConfig:
    model: str = "qwen2.5-vl-72b"   # preset name


if __name__ == "__main__":
    import time

    cfg = configure(ShowConfig())
    t0 = time.time()
    m = build(cfg.model, device="meta")
    vision = sum(p.numel() for p in m.visual.parameters())
    print(f"{cfg.model}: {num_params(m):,} parameters ({vision:,} in the vision tower), "
          f"built on the meta device in {time.time() - t0:.2f}s")
    print(m.cfg)
