"""
processor.py: from files to model inputs. The tokenizer (a `tokenizers` tokenizer.json), the Qwen
chat template, image preprocessing identical to the Qwen2.5-VL image processor, dataset readers that
name the file and line of every bad record, loss masks, padding and packing.

Read top to bottom: tokenizer -> chat template -> images -> records (jsonl, ShareGPT/LLaVA) ->
training examples (loss on assistant tokens) -> prompts for generation -> packing and collation.

    tok = Tokenizer(DEFAULT_TOKENIZER)
    pixel_values, grid_thw = process_image("cat.png")                # as Qwen2VLImageProcessor
    ex = encode_conversation(messages, tok, base_dir="data/demo")     # input_ids, labels, images
    rows = pack_examples([ex, ...], max_len=512); batch = collate_rows(rows)
"""
import json
import math
import os
from types import SimpleNamespace

import numpy as np
import torch
from PIL import Image

import model as qwen

DATA_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data")
DEFAULT_TOKENIZER = os.path.join(DATA_DIR, "tokenizer.json")
DEFAULT_SYSTEM = "You are a helpful assistant."
IGNORE = -100  # label of tokens without loss

# -----------------------------------------------------------------------------
# Tokenizer


class Tokenizer:
    """A tokenizer.json (Qwen's, or the tiny one in data/) with the chat tokens looked up by name."""

    def __init__(self, path):
        from tokenizers import Tokenizer as HFTokenizer
        if not os.path.exists(path):
            raise FileNotFoundError(f"tokenizer file {path} does not exist")
        self.path = path
        self.tk = HFTokenizer.from_file(path)
        ids = {name: self.tk.token_to_id(name) for name in
               ("<|im_start|>", "<|im_end|>", "<|endoftext|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>")}
        missing = [name for name, i in ids.items() if i is None]
        if missing:
            raise ValueError(f"{path} lacks the chat tokens {missing}")
        self.im_start_id, self.eos_id = ids["<|im_start|>"], ids["<|im_end|>"]  # a turn ends generation
        self.pad_id, self.image_pad_id = ids["<|endoftext|>"], ids["<|image_pad|>"]
        self.vision_start_id, self.vision_end_id = ids["<|vision_start|>"], ids["<|vision_end|>"]
        self.special_ids = {t.id if hasattr(t, "id") else i for i, t in self.tk.get_added_tokens_decoder().items()
                            if t.special}

    def encode(self, text):
        return self.tk.encode(text, add_special_tokens=False).ids

    def decode(self, ids, skip_special_tokens=False):
        return self.tk.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token):
        return self.tk.token_to_id(token)

    def __len__(self):
        return self.tk.get_vocab_size(with_added_tokens=True)

    def save(self, path):
        self.tk.save(path)


# -----------------------------------------------------------------------------
# Chat template: the Qwen2-VL / Qwen2.5-VL one (shared/reference/qwen2_5_vl_chat_template.jinja), in Python


def _content_text(content):
    """A message's content: a string, or a list of parts whose images become one image pad each."""
    if isinstance(content, str):
        return content
    out = []
    for part in content:
        if part.get("type") == "image" or "image" in part or "image_url" in part:
            out.append("<|vision_start|><|image_pad|><|vision_end|>")
        elif "text" in part:
            out.append(part["text"])
    return "".join(out)


def chat_text(messages, add_generation_prompt=False):
    """ChatML text: `<|im_start|>role\\ncontent<|im_end|>\\n` per message, a default system prompt when
    the first message is not one, and `<|im_start|>assistant\\n` when a reply is to be generated."""
    parts = []
    if not messages or messages[0]["role"] != "system":
        parts.append(f"<|im_start|>system\n{DEFAULT_SYSTEM}<|im_end|>\n")
    for m in messages:
        parts.append(f"<|im_start|>{m['role']}\n{_content_text(m['content'])}<|im_end|>\n")
    if add_generation_prompt:
        parts.append("<|im_start|>assistant\n")
    return "".join(parts)


def expand_image_pads(ids, grids, tok, merge_size=2):
    """Each <|image_pad|> becomes t*h*w/merge^2 copies, the number of features its image gives."""
    counts = [int(t * h * w) // merge_size ** 2 for t, h, w in grids]
    n_pads = sum(1 for i in ids if i == tok.image_pad_id)
    if n_pads != len(counts):
        raise ValueError(f"{n_pads} image placeholders but {len(counts)} images")
    out, k = [], 0
    for i in ids:
        if i == tok.image_pad_id:
            out += [i] * counts[k]
            k += 1
        else:
            out.append(i)
    return out


# -----------------------------------------------------------------------------
# Images: smart resize, rescale, normalise, patchify (Qwen2VLImageProcessor, transformers)

IMAGE_MEAN = np.array([0.48145466, 0.4578275, 0.40821073], dtype=np.float32)  # CLIP's
IMAGE_STD = np.array([0.26862954, 0.26130258, 0.27577711], dtype=np.float32)
MAX_ASPECT_RATIO = 200


def smart_resize(height, width, factor=28, min_pixels=3136, max_pixels=12845056):
    """The size Qwen2-VL resizes to: both sides multiples of factor (patch * merge), the area within
    [min_pixels, max_pixels], the aspect ratio kept as closely as rounding allows."""
    if max(height, width) / min(height, width) > MAX_ASPECT_RATIO:
        raise ValueError(f"aspect ratio {max(height, width) / min(height, width):.0f} exceeds {MAX_ASPECT_RATIO}")
    h = max(factor, round(height / factor) * factor)
    w = max(factor, round(width / factor) * factor)
    if h * w > max_pixels:
        beta = math.sqrt(height * width / max_pixels)
        h = max(factor, math.floor(height / beta / factor) * factor)
        w = max(factor, math.floor(width / beta / factor) * factor)
    elif h * w < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h = math.ceil(height * beta / factor) * factor
        w = math.ceil(width * beta / factor) * factor
    return h, w


def open_image(path):
    """An RGB PIL image, with errors that name the file (missing, corrupt, decompression bomb)."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"image {path} does not exist")
    try:
        with Image.open(path) as im:
            im.load()
            return im.convert("RGB")
    except (OSError, Image.DecompressionBombError, ValueError) as e:
        raise ValueError(f"image {path} cannot be read: {e}") from None


def process_image(image, min_pixels=3136, max_pixels=12845056, patch_size=14, merge_size=2, temporal_patch_size=2):
    """PIL image or path -> (pixel_values (grid_t*grid_h*grid_w, 3*tp*p*p) float32, grid_thw (1, 3)),
    equal to the Qwen2.5-VL image processor: bicubic resize to smart_resize's size, rescale by 1/255,
    normalise with CLIP's mean/std, repeat to temporal_patch_size frames, and flatten patches so that
    each 2x2 merge group is contiguous (the order the vision tower's merger expects)."""
    im = open_image(image) if isinstance(image, (str, os.PathLike)) else image.convert("RGB")
    h, w = smart_resize(im.height, im.width, patch_size * merge_size, min_pixels, max_pixels)
    x = np.asarray(im.resize((w, h), Image.BICUBIC), dtype=np.float32) / 255.0
    x = ((x - IMAGE_MEAN) / IMAGE_STD).transpose(2, 0, 1)              # (C, H, W)
    x = np.repeat(x[None], temporal_patch_size, axis=0)                # (tp, C, H, W)
    gh, gw, C = h // patch_size, w // patch_size, x.shape[1]
    x = x.reshape(1, temporal_patch_size, C, gh // merge_size, merge_size, patch_size,
                  gw // merge_size, merge_size, patch_size)
    x = x.transpose(0, 3, 6, 4, 7, 2, 1, 5, 8)                         # (t, gh/m, gw/m, m, m, C, tp, p, p)
    x = x.reshape(gh * gw, C * temporal_patch_size * patch_size * patch_size)
    return torch.from_numpy(np.ascontiguousarray(x)), torch.tensor([[1, gh, gw]])


def resolve_image(path, base_dir):
    """A dataset's image path, relative to the dataset's folder, which it may not escape."""
    base = os.path.realpath(base_dir)
    full = os.path.realpath(os.path.join(base, path))
    if os.path.commonpath([base, full]) != base:
        raise ValueError(f"image path {path!r} escapes the dataset folder {base_dir}")
    return full


# -----------------------------------------------------------------------------
# Records: jsonl with errors naming file and line, our messages format or ShareGPT/LLaVA


class DataError(ValueError):
    pass


def read_jsonl(path, skip_bad=False, check=None):
    """Records of a jsonl file, each with `_source` ("file:line") and `_dir` (for relative image paths).
    A malformed line, or one `check(record)` rejects, raises a DataError naming file and line; with
    skip_bad it is skipped and counted instead (read_jsonl.skipped[path])."""
    records, skipped = [], 0
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
                if not isinstance(rec, dict):
                    raise ValueError("a record must be a JSON object")
                rec["_source"], rec["_dir"] = f"{path}:{n}", os.path.dirname(os.path.abspath(path))
                if check is not None:
                    check(rec)
                records.append(rec)
            except (ValueError, KeyError, TypeError, OSError) as e:
                if not skip_bad:
                    raise DataError(f"{path}:{n}: {e}") from None
                skipped += 1
    read_jsonl.skipped[path] = skipped
    return records


read_jsonl.skipped = {}


def to_messages(rec):
    """Our {"messages": [...]} or ShareGPT/LLaVA {"conversations": [{"from", "value"}], "image": ...}
    -> messages with image parts (paths relative to the record's file)."""
    if "messages" in rec:
        return rec["messages"]
    if "conversations" not in rec:
        raise ValueError("record has neither 'messages' nor 'conversations'")
    images = rec.get("image") or rec.get("images") or []
    images = [images] if isinstance(images, str) else list(images)
    roles = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}
    messages = []
    for turn in rec["conversations"]:
        role, text = roles[turn["from"]], turn["value"]
        if "<image>" not in text:
            messages.append({"role": role, "content": text})
            continue
        parts, pieces = [], text.split("<image>")
        for k, piece in enumerate(pieces):
            if k:
                if not images:
                    raise ValueError("more <image> tags than images")
                parts.append({"type": "image", "image": images.pop(0)})
            if piece.strip("\n"):
                parts.append({"type": "text", "text": piece.strip("\n") if k else piece.rstrip("\n")})
        messages.append({"role": role, "content": parts})
    return messages


def _images_of(messages):
    return [p.get("image") or p.get("image_url") for m in messages if not isinstance(m["content"], str)
            for p in m["content"] if p.get("type") == "image" or "image" in p or "image_url" in p]


def _load_images(paths, base_dir, image_kw):
    if not paths:
        return None, None
    out = [process_image(resolve_image(p, base_dir), **image_kw) for p in paths]
    return torch.cat([o[0] for o in out]), torch.cat([o[1] for o in out])


# -----------------------------------------------------------------------------
# Training examples: input ids with labels on the assistant tokens only


def encode_conversation(messages, tok, base_dir=".", merge_size=2, **image_kw):
    """-> {input_ids, labels, pixel_values, image_grid_thw}. Labels are the assistant contents and
    their <|im_end|> (so the model learns to stop), IGNORE elsewhere, including the
    `<|im_start|>assistant\\n` headers."""
    if not any(m["role"] == "assistant" for m in messages):
        raise ValueError("conversation has no assistant turn")
    pixel_values, grids = _load_images(_images_of(messages), base_dir, {"merge_size": merge_size, **image_kw})
    grid_iter = iter(grids.tolist() if grids is not None else [])
    ids, labels = [], []
    if messages[0]["role"] != "system":
        messages = [{"role": "system", "content": DEFAULT_SYSTEM}] + list(messages)
    for m in messages:
        head = tok.encode(f"<|im_start|>{m['role']}\n")
        body = tok.encode(_content_text(m["content"]))
        body = expand_image_pads(body, [next(grid_iter) for _ in range(body.count(tok.image_pad_id))], tok,
                                 merge_size)
        tail = [tok.eos_id] + tok.encode("\n")
        ids += head + body + tail
        learn = m["role"] == "assistant"
        labels += [IGNORE] * len(head) + (body + [tok.eos_id] if learn else [IGNORE] * (len(body) + 1)) + \
            [IGNORE] * (len(tail) - 1)
    return {"input_ids": ids, "labels": labels, "pixel_values": pixel_values, "image_grid_thw": grids,
            "position_ids": positions(ids, grids, tok, merge_size)}


def positions(ids, grids, tok, merge_size=2):
    """M-RoPE positions (3, T) of one sample, computed by the model's own rope_positions."""
    cfg = SimpleNamespace(image_token_id=tok.image_pad_id, vision=SimpleNamespace(spatial_merge_size=merge_size))
    return qwen.rope_positions(torch.tensor([ids]), grids, None, cfg)[0][:, 0]


def load_sft_examples(path, tok, skip_bad=False, merge_size=2, max_len=None, **image_kw):
    """Training examples of a conversation jsonl; bad records (malformed, missing or escaping image,
    no assistant turn, longer than max_len) raise naming file and line, or are skipped and counted."""
    examples = []

    def check(rec):
        ex = encode_conversation(to_messages(rec), tok, rec["_dir"], merge_size, **image_kw)
        if max_len is not None and len(ex["input_ids"]) > max_len:
            raise ValueError(f"{len(ex['input_ids'])} tokens exceed max_len={max_len}")
        examples.append(ex)

    read_jsonl(path, skip_bad, check)
    return examples, read_jsonl.skipped[path]


# -----------------------------------------------------------------------------
# Prompts for generation (RL records and held-out conversations)


def prompt_messages(rec):
    """An RL record {"prompt": "... <image> ...", "images": [...]} or a conversation (its turns up to
    the last assistant one) -> the messages to answer."""
    if "prompt" in rec:
        images = list(rec.get("images") or [])
        pieces, parts = rec["prompt"].split("<image>"), []
        for k, piece in enumerate(pieces):
            if k:
                if not images:
                    raise ValueError(f"{rec.get('_source', '?')}: more <image> tags than images")
                parts.append({"type": "image", "image": images.pop(0)})
            if piece:
                parts.append({"type": "text", "text": piece})
        return [{"role": "user", "content": parts if len(pieces) > 1 else rec["prompt"]}]
    messages = to_messages(rec)
    last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
    return messages[:last]


def prompt_text(rec):
    return _content_text(prompt_messages(rec)[-1]["content"])


def encode_prompt(rec, tok, merge_size=2, base_dir=None, **image_kw):
    """-> (prompt ids ending in `<|im_start|>assistant\\n`, pixel_values, image_grid_thw)."""
    messages = prompt_messages(rec)
    pixel_values, grids = _load_images(_images_of(messages), base_dir or rec.get("_dir", "."),
                                       {"merge_size": merge_size, **image_kw})
    ids = tok.encode(chat_text(messages, add_generation_prompt=True))
    ids = expand_image_pads(ids, grids.tolist() if grids is not None else [], tok, merge_size)
    return ids, pixel_values, grids


def think_length(ids, tok):
    """Tokens of the reasoning part of a response: up to and including the first `</think>`."""
    close = tok.encode("</think>")
    for i in range(len(ids) - len(close) + 1):
        if list(ids[i:i + len(close)]) == close:
            return i + len(close)
    return 0


# -----------------------------------------------------------------------------
# Packing and collation


def pack_examples(examples, max_len):
    """First-fit-decreasing packing into rows of at most max_len tokens. Each row keeps its samples'
    M-RoPE positions (restarting per sample, images included) and seq_ids so attention never crosses
    a sample boundary. An example longer than max_len is an error."""
    order = sorted(range(len(examples)), key=lambda i: -len(examples[i]["input_ids"]))
    bins, room = [], []
    for i in order:
        n = len(examples[i]["input_ids"])
        if n > max_len:
            raise ValueError(f"example of {n} tokens does not fit max_len={max_len}")
        k = next((b for b, r in enumerate(room) if r >= n), None)
        if k is None:
            bins.append([])
            room.append(max_len)
            k = len(bins) - 1
        bins[k].append(i)
        room[k] -= n
    return [_pack_row([examples[i] for i in sorted(b)]) for b in bins]


def _pack_row(exs):
    px = [e["pixel_values"] for e in exs if e["pixel_values"] is not None]
    grids = [e["image_grid_thw"] for e in exs if e["image_grid_thw"] is not None]
    return {"input_ids": sum((e["input_ids"] for e in exs), []), "labels": sum((e["labels"] for e in exs), []),
            "position_ids": torch.cat([e["position_ids"] for e in exs], dim=1),
            "seq_ids": sum(([k] * len(e["input_ids"]) for k, e in enumerate(exs)), []),
            "pixel_values": torch.cat(px) if px else None, "image_grid_thw": torch.cat(grids) if grids else None}


def collate_rows(rows, pad_id=0):
    """Right-pad packed rows into a batch: input_ids / labels / seq_ids (B, T) (padding: pad_id, IGNORE,
    -1), position_ids (3, B, T), and the rows' images concatenated in order."""
    T = max(len(r["input_ids"]) for r in rows)
    B = len(rows)
    ids = torch.full((B, T), pad_id, dtype=torch.long)
    labels = torch.full((B, T), IGNORE, dtype=torch.long)
    seq = torch.full((B, T), -1, dtype=torch.long)
    pos = torch.zeros(3, B, T, dtype=torch.long)
    for b, r in enumerate(rows):
        n = len(r["input_ids"])
        ids[b, :n], labels[b, :n], seq[b, :n] = torch.tensor(r["input_ids"]), torch.tensor(r["labels"]), \
            torch.tensor(r["seq_ids"])
        pos[:, b, :n] = r["position_ids"]
    px = [r["pixel_values"] for r in rows if r["pixel_values"] is not None]
    grids = [r["image_grid_thw"] for r in rows if r["image_grid_thw"] is not None]
    return {"input_ids": ids, "labels": labels, "seq_ids": seq, "position_ids": pos,
            "pixel_values": torch.cat(px) if px else None, "image_grid_thw": torch.cat(grids) if grids else None}
