"""
processor.py: from files to model inputs, exactly as the Qwen2.5-VL processor makes them.

Read top to bottom: tokenizer -> chat template -> images -> M-RoPE positions -> records (jsonl, ours or
ShareGPT/LLaVA) -> training examples (loss on assistant tokens only) -> prompts for generation ->
padding and packing.

    tok = Tokenizer(DEFAULT_TOKENIZER)                                # data/tokenizer.json, or Qwen's
    pixel_values, grid_thw = process_image("cat.png")                 # as Qwen2VLImageProcessor
    examples, skipped = load_sft_examples("data/demo/sft_train.jsonl", tok, skip_bad=True)
    batch = pad_batch(examples[:4], tok.pad_id)                       # input_ids, labels, attention_mask
    batch = collate_rows(pack_examples(examples, max_len=512))       # + position_ids, seq_ids

The references these functions are tested against (tests/test_processor.py): the published chat template
(shared/reference/qwen2_5_vl_chat_template.jinja), transformers' Qwen2VLImageProcessorPil for images and
Qwen2_5_VLModel.get_rope_index for positions.
"""
import json
import math
import os

import numpy as np
import torch
from PIL import Image

import model as qwen

DATA_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data")
DEFAULT_TOKENIZER = os.path.join(DATA_DIR, "tokenizer.json")
DEFAULT_SYSTEM = "You are a helpful assistant."
IGNORE = -100  # the label of tokens that carry no loss (torch's cross_entropy ignore_index)
IMAGE_PAD = "<|image_pad|>"
VISION = f"<|vision_start|>{IMAGE_PAD}<|vision_end|>"  # what the template writes for one image


class DataError(ValueError):
    """A bad record; the message starts with "file:line"."""


# -----------------------------------------------------------------------------
# Tokenizer


class Tokenizer:
    """A `tokenizers` tokenizer.json (Qwen's, or the tiny one in data/) with the chat tokens' ids as
    attributes. Text is always encoded without extra special tokens: the chat template writes them."""

    def __init__(self, path):
        from tokenizers import Tokenizer as HFTokenizer
        if not os.path.isfile(path):
            raise FileNotFoundError(f"tokenizer file {path} does not exist")
        self.tk = HFTokenizer.from_file(path)
        ids = {t: self.tk.token_to_id(t) for t in ("<|endoftext|>", "<|im_start|>", "<|im_end|>",
                                                    "<|vision_start|>", "<|vision_end|>", IMAGE_PAD)}
        missing = [t for t, i in ids.items() if i is None]
        if missing:
            raise ValueError(f"{path} lacks the chat tokens {missing}")
        self.pad_id = ids["<|endoftext|>"]       # Qwen pads with <|endoftext|>
        self.im_start_id = ids["<|im_start|>"]
        self.im_end_id = self.eos_id = ids["<|im_end|>"]  # the end of a turn ends generation
        self.vision_start_id, self.vision_end_id = ids["<|vision_start|>"], ids["<|vision_end|>"]
        self.image_pad_id = ids[IMAGE_PAD]
        self.think_start_id, self.think_end_id = self.tk.token_to_id("<think>"), self.tk.token_to_id("</think>")

    def encode(self, text):
        return self.tk.encode(text, add_special_tokens=False).ids

    def encode_with_offsets(self, text):
        """-> (ids, start) with start[i] the character where token i begins (the loss mask uses them)."""
        enc = self.tk.encode(text, add_special_tokens=False)
        return enc.ids, [a for a, _ in enc.offsets]

    def decode(self, ids, skip_special_tokens=False):
        return self.tk.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token):
        return self.tk.token_to_id(token)

    def __len__(self):
        return self.tk.get_vocab_size(with_added_tokens=True)

    def save(self, path):
        self.tk.save(path)


# -----------------------------------------------------------------------------
# Chat template: the published Qwen2-VL / Qwen2.5-VL one, in plain Python


def is_image(part):
    # the template's test, in its order: an image part, else a video part, else text
    return part.get("type") == "image" or "image" in part or "image_url" in part


def content_text(content):
    """A message's content: a string, or a list of parts in which each image becomes VISION."""
    if isinstance(content, str):
        return content
    out = []
    for part in content:
        if is_image(part):
            out.append(VISION)
        elif part.get("type") == "video" or "video" in part:
            raise ValueError("video inputs are not supported")
        elif "text" in part:
            out.append(part["text"])
    return "".join(out)


def chat_pieces(messages, add_generation_prompt=False):
    """The template's output as (text, is_reply) pieces; `is_reply` marks an assistant turn's content and
    its <|im_end|>, the tokens a model learns to write (not the `<|im_start|>assistant\\n` header, which
    the prompt supplies, nor the newline after <|im_end|>, which generation never reaches)."""
    if messages and messages[0]["role"] != "system":
        yield f"<|im_start|>system\n{DEFAULT_SYSTEM}<|im_end|>\n", False
    for m in messages:
        yield f"<|im_start|>{m['role']}\n", False
        yield content_text(m["content"]) + "<|im_end|>", m["role"] == "assistant"
        yield "\n", False
    if add_generation_prompt:
        yield "<|im_start|>assistant\n", False


def chat_text(messages, add_generation_prompt=False):
    """ChatML text: `<|im_start|>role\\ncontent<|im_end|>\\n` per message, after a default system prompt
    when the first message is not one, and `<|im_start|>assistant\\n` when a reply is to be generated."""
    return "".join(piece for piece, _ in chat_pieces(messages, add_generation_prompt))


def image_token_counts(image_grid_thw, merge_size=2):
    """Tokens each image takes in the language model: its t*h*w patches, merged merge x merge."""
    return [] if image_grid_thw is None else [t * h * w // merge_size ** 2 for t, h, w in image_grid_thw.tolist()]


def expand_image_pads(text, image_grid_thw, merge_size=2):
    """Each <|image_pad|> becomes as many copies as its image gives features. Done on the text, before
    tokenising, as Qwen2VLProcessor.__call__ does (the pads are special tokens, so it is the same)."""
    pieces, counts = text.split(IMAGE_PAD), image_token_counts(image_grid_thw, merge_size)
    if len(pieces) - 1 != len(counts):
        raise ValueError(f"{len(pieces) - 1} image placeholders in the text but {len(counts)} images")
    return pieces[0] + "".join(IMAGE_PAD * n + piece for n, piece in zip(counts, pieces[1:]))


# -----------------------------------------------------------------------------
# Images: smart resize, rescale, normalise, patchify (transformers' Qwen2VLImageProcessor)

IMAGE_MEAN = np.array([0.48145466, 0.4578275, 0.40821073], dtype=np.float32)  # CLIP's (OPENAI_CLIP_MEAN)
IMAGE_STD = np.array([0.26862954, 0.26130258, 0.27577711], dtype=np.float32)
MAX_ASPECT_RATIO = 200


def smart_resize(height, width, factor=28, min_pixels=3136, max_pixels=12845056):
    """The size Qwen2-VL resizes to (as Qwen2VLImageProcessor's smart_resize): both sides multiples of
    factor (= patch * merge), the area within [min_pixels, max_pixels], the aspect ratio kept as closely
    as the rounding allows."""
    if max(height, width) / min(height, width) > MAX_ASPECT_RATIO:
        raise ValueError(f"aspect ratio {max(height, width) / min(height, width):.1f} exceeds {MAX_ASPECT_RATIO}")
    h, w = round(height / factor) * factor, round(width / factor) * factor
    if h * w > max_pixels:  # shrink by the area ratio, rounding down
        beta = math.sqrt(height * width / max_pixels)
        h = max(factor, math.floor(height / beta / factor) * factor)
        w = max(factor, math.floor(width / beta / factor) * factor)
    elif h * w < min_pixels:  # grow by the area ratio, rounding up
        beta = math.sqrt(min_pixels / (height * width))
        h, w = math.ceil(height * beta / factor) * factor, math.ceil(width * beta / factor) * factor
    return h, w


def load_image(path):
    """An image file, read fully, with errors that name the file: missing, corrupt, or so large that
    decoding it could exhaust memory (pillow's decompression-bomb limit)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"image {path} does not exist")
    try:
        with Image.open(path) as im:
            if im.width * im.height > (Image.MAX_IMAGE_PIXELS or math.inf):
                raise ValueError(f"{im.width}x{im.height} pixels is over the limit of {Image.MAX_IMAGE_PIXELS}")
            im.load()
            return im.copy()
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        raise ValueError(f"image {path} cannot be read: {e}") from None


def to_rgb(im):
    """RGB, with transparency composited onto white (as transformers' convert_to_rgb)."""
    if "A" in im.getbands() or "transparency" in im.info:
        im = im.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", im.size, (255, 255, 255, 255)), im).convert("RGB")
    return im.convert("RGB")


def process_image(image, min_pixels=3136, max_pixels=12845056, patch_size=14, merge_size=2, temporal_patch_size=2):
    """A PIL image or a path -> (pixel_values (grid_t*grid_h*grid_w, 3*temporal_patch_size*patch_size**2)
    float32, grid_thw (1, 3) int64), equal to Qwen2VLImageProcessor's pixel_values / image_grid_thw.

    Bicubic resize (pillow, on uint8) to smart_resize's size, rescale by 1/255, normalise with CLIP's
    mean/std, repeat the still image to temporal_patch_size frames, and flatten the patches so that the
    merge x merge patches of each merged token are consecutive, the order the vision tower's merger
    expects. A row is one patch: (C, temporal, patch, patch) flattened, as Conv3d weights are laid out."""
    name = "image"
    if isinstance(image, (str, os.PathLike)):
        name, image = os.fspath(image), load_image(image)
    im = to_rgb(image)
    try:
        h, w = smart_resize(im.height, im.width, patch_size * merge_size, min_pixels, max_pixels)
    except ValueError as e:
        raise ValueError(f"{name} ({im.width}x{im.height}): {e}") from None
    x = np.asarray(im.resize((w, h), Image.BICUBIC))                            # (H, W, C) uint8
    x = (x.astype(np.float64) * (1 / 255)).astype(np.float32)                  # rescale as transformers does
    x = (x - IMAGE_MEAN) / IMAGE_STD                                            # (H, W, C)
    gh, gw, m, p, C = h // patch_size, w // patch_size, merge_size, patch_size, x.shape[-1]
    x = x.reshape(gh // m, m, p, gw // m, m, p, C)
    x = x.transpose(0, 3, 1, 4, 6, 2, 5)                                        # (gh/m, gw/m, m, m, C, p, p)
    x = np.broadcast_to(x[:, :, :, :, :, None], (*x.shape[:5], temporal_patch_size, p, p))  # (.., C, tp, p, p)
    pixel_values = torch.from_numpy(x.reshape(gh * gw, C * temporal_patch_size * p * p).copy())
    return pixel_values, torch.tensor([[1, gh, gw]])


def resolve_image(path, base_dir):
    """A dataset's image path: relative to the dataset's folder, and not allowed to leave it (no `..`,
    absolute path or symlink pointing outside)."""
    base = os.path.realpath(base_dir)
    full = os.path.realpath(os.path.join(base, path))
    if os.path.commonpath([base, full]) != base:
        raise ValueError(f"image path {path!r} escapes the dataset folder {base_dir}")
    return full


def load_images(paths, base_dir, **image_kw):
    """Images of one sample -> (pixel_values (N, D), image_grid_thw (n_images, 3)), or (None, None).
    base_dir None: the paths are resolved already (a judge's images, see verifiers._judge_images)."""
    if not paths:
        return None, None
    out = [process_image(p if base_dir is None else resolve_image(p, base_dir), **image_kw) for p in paths]
    return torch.cat([px for px, _ in out]), torch.cat([g for _, g in out])


# -----------------------------------------------------------------------------
# M-RoPE positions of one sample (Qwen2_5_VLModel.get_rope_index, for images)


def rope_positions(input_ids, image_grid_thw, image_token_id, merge_size=2):
    """3-D positions (t, h, w) of one unpadded sample -> LongTensor (3, T), by the model's own
    model.sample_positions. Each sample starts at 0, so packed samples restart; every image of
    image_grid_thw must be used."""
    grids = [] if image_grid_thw is None else image_grid_thw.tolist()
    positions, used = qwen.sample_positions(torch.as_tensor(input_ids).tolist(), grids, image_token_id, merge_size)
    if used != len(grids):
        raise ValueError(f"{len(grids)} images in image_grid_thw but {used} runs of image tokens in input_ids")
    return positions


# -----------------------------------------------------------------------------
# Records: jsonl with errors naming file and line; our messages format or ShareGPT/LLaVA


# What a malformed record can raise on its way through our code (a wrong type where a list or dict
# belongs, a missing field, an unreadable image): all become "file:line: message".
RECORD_ERRORS = (ValueError, KeyError, TypeError, AttributeError, OSError)


def read_jsonl(path, parse=None, skip_bad=False, counts=None):
    """The records of a jsonl file, each tagged with `_source` ("file:line") and `_dir` (where its image
    paths start), passed through `parse(record)` when given. A malformed line, or one that `parse`
    rejects, raises a DataError naming file and line; with skip_bad it is skipped and counted in
    counts["skipped"] instead."""
    out = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec = _json_object(line)
                rec["_source"], rec["_dir"] = f"{path}:{n}", os.path.dirname(os.path.abspath(path))
                out.append(parse(rec) if parse else rec)
            except RECORD_ERRORS as e:
                if not skip_bad:
                    raise DataError(f"{path}:{n}: {f'missing field {e}' if isinstance(e, KeyError) else e}") from None
                if counts is not None:
                    counts["skipped"] = counts.get("skipped", 0) + 1
    return out


def _json_object(line):
    try:
        rec = json.loads(line)
    except json.JSONDecodeError as e:
        raise ValueError(f"malformed JSON ({e})") from None
    if not isinstance(rec, dict):
        raise ValueError(f"a record must be a JSON object, not {type(rec).__name__}")
    return rec


def image_parts(text, images):
    """Text with `<image>` tags (LLaVA, our RL prompts) -> content parts; each tag takes (pops) the next
    path of `images`."""
    pieces = text.split("<image>")
    if len(pieces) - 1 > len(images):
        raise ValueError(f"{len(pieces) - 1} <image> tags but only {len(images)} images")
    parts = []
    for k, piece in enumerate(pieces):
        if k:
            parts.append({"type": "image", "image": images.pop(0)})
            piece = piece.removeprefix("\n")  # LLaVA writes "<image>\nquestion"
        if piece:
            parts.append({"type": "text", "text": piece})
    return parts


SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}


def to_messages(rec):
    """Our {"messages": [...]}, or ShareGPT/LLaVA {"conversations": [{"from", "value"}], "image": path or
    [paths]} -> messages, images as content parts (paths relative to the record's file)."""
    if "messages" in rec:
        return rec["messages"]
    if "conversations" not in rec:
        raise ValueError("the record has neither 'messages' nor 'conversations'")
    images = rec.get("image") or rec.get("images") or []
    images = [images] if isinstance(images, str) else list(images)
    messages = []
    for turn in rec["conversations"]:
        if turn["from"] not in SHAREGPT_ROLES:
            raise ValueError(f"unknown speaker {turn['from']!r} (expected one of {sorted(SHAREGPT_ROLES)})")
        text = turn["value"]
        content = image_parts(text, images) if "<image>" in text else text
        messages.append({"role": SHAREGPT_ROLES[turn["from"]], "content": content})
    if images:
        raise ValueError(f"{len(images)} images without an <image> tag")
    return messages


def image_paths(messages):
    return [p.get("image") or p.get("image_url") for m in messages if not isinstance(m["content"], str)
            for p in m["content"] if is_image(p)]


# -----------------------------------------------------------------------------
# Training examples: input ids, with labels on the assistant replies only


def encode_conversation(messages, tok, base_dir=".", merge_size=2, **image_kw):
    """A conversation -> {input_ids, labels, pixel_values, image_grid_thw, position_ids (3, T)}.

    input_ids are the chat template's tokens, image pads expanded; labels equal input_ids on each
    assistant reply and its <|im_end|> (so the model learns to stop) and IGNORE elsewhere."""
    if not any(m["role"] == "assistant" for m in messages):
        raise ValueError("the conversation has no assistant turn")
    pixel_values, grids = load_images(image_paths(messages), base_dir, merge_size=merge_size, **image_kw)
    text, replies, k = "", [], 0  # replies: character spans of what the model learns to write; k: next image
    for piece, is_reply in chat_pieces(messages):
        n = piece.count(IMAGE_PAD)
        piece, k = expand_image_pads(piece, None if grids is None else grids[k:k + n], merge_size), k + n
        if is_reply:
            replies.append((len(text), len(text) + len(piece)))
        text += piece
    # One tokenisation of the whole text, so the ids are the template's exactly; a token is learned when
    # it starts inside a reply.
    ids, starts = tok.encode_with_offsets(text)
    learn = [any(a <= s < b for a, b in replies) and i != tok.image_pad_id for i, s in zip(ids, starts)]
    return {"input_ids": ids, "labels": [i if y else IGNORE for i, y in zip(ids, learn)],
            "pixel_values": pixel_values, "image_grid_thw": grids,
            "position_ids": rope_positions(ids, grids, tok.image_pad_id, merge_size)}


def load_sft_examples(path, tok, skip_bad=False, merge_size=2, max_len=None, **image_kw):
    """Training examples of a conversation jsonl -> (examples, n_skipped). A bad record (malformed line,
    missing, corrupt or escaping image, no assistant turn, longer than max_len) raises a DataError naming
    file and line, or with skip_bad is skipped and counted. Each example keeps its `source`."""
    def parse(rec):
        ex = encode_conversation(to_messages(rec), tok, rec["_dir"], merge_size, **image_kw)
        if max_len is not None and len(ex["input_ids"]) > max_len:
            raise ValueError(f"{len(ex['input_ids'])} tokens exceed max_len={max_len}")
        return {**ex, "source": rec["_source"]}

    counts = {"skipped": 0}
    examples = read_jsonl(path, parse, skip_bad, counts)
    return examples, counts["skipped"]


# -----------------------------------------------------------------------------
# Prompts for generation: RL records and held-out conversations


def prompt_messages(rec):
    """An RL record {"prompt": "... <image> ...", "images": [...]} or a conversation (its turns before
    the last assistant one) -> the messages a reply is generated for."""
    if "prompt" in rec:
        images = list(rec.get("images") or [])
        content = image_parts(rec["prompt"], images) if "<image>" in rec["prompt"] else rec["prompt"]
        if images:
            raise ValueError(f"{len(images)} images without an <image> tag in the prompt")
        return [{"role": "user", "content": content}]
    messages = to_messages(rec)
    replies = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    if not replies:
        raise ValueError("the conversation has no assistant turn")
    return messages[:replies[-1]]


def prompt_text(rec):
    """The question of a record, as plain text (for printing)."""
    return content_text(prompt_messages(rec)[-1]["content"])


def encode_prompt(rec, tok, merge_size=2, base_dir=None, **image_kw):
    """A record -> (prompt ids ending in `<|im_start|>assistant\\n`, pixel_values, image_grid_thw). Errors
    name the record's file and line when it came from read_jsonl."""
    try:
        messages = prompt_messages(rec)
        pixel_values, grids = load_images(image_paths(messages), base_dir or rec.get("_dir", "."),
                                          merge_size=merge_size, **image_kw)
        text = expand_image_pads(chat_text(messages, add_generation_prompt=True), grids, merge_size)
    except RECORD_ERRORS as e:
        raise DataError(f"{rec.get('_source', 'record')}: {e}") from None
    return tok.encode(text), pixel_values, grids


def load_prompts(path, skip_bad=False, **image_kw):
    """RL records of a jsonl file, checked up front (prompt present, images readable and inside the
    dataset folder) -> (records, n_skipped)."""
    def parse(rec):
        load_images(image_paths(prompt_messages(rec)), rec["_dir"], **image_kw)
        return rec

    counts = {"skipped": 0}
    records = read_jsonl(path, parse, skip_bad, counts)
    return records, counts["skipped"]


def think_length(ids, tok):
    """Tokens of the reasoning part of a response: up to and including the first `</think>` (0 if none)."""
    close = tok.encode("</think>")
    ids = list(ids)
    for i in range(len(ids) - len(close) + 1):
        if ids[i:i + len(close)] == close:
            return i + len(close)
    return 0


# -----------------------------------------------------------------------------
# Batches: padding, and packing several samples into one row


def _concat_images(items):
    px = [e["pixel_values"] for e in items if e["pixel_values"] is not None]
    grids = [e["image_grid_thw"] for e in items if e["image_grid_thw"] is not None]
    return (torch.cat(px), torch.cat(grids)) if px else (None, None)


def pad_batch(examples, pad_id):
    """Examples -> right-padded input_ids / labels / attention_mask (B, T), and the examples' images
    concatenated in order: pixel_values (N, D), image_grid_thw (n_images, 3)."""
    B, T = len(examples), max(len(e["input_ids"]) for e in examples)
    ids = torch.full((B, T), pad_id, dtype=torch.long)
    labels = torch.full((B, T), IGNORE, dtype=torch.long)
    mask = torch.zeros(B, T, dtype=torch.long)
    for b, e in enumerate(examples):
        n = len(e["input_ids"])
        ids[b, :n], labels[b, :n], mask[b, :n] = torch.tensor(e["input_ids"]), torch.tensor(e["labels"]), 1
    pixel_values, grids = _concat_images(examples)
    return {"input_ids": ids, "labels": labels, "attention_mask": mask, "pixel_values": pixel_values,
            "image_grid_thw": grids}


def pack_examples(examples, max_len):
    """Greedy first-fit packing: each example, in order, joins the first row with room for it. -> rows,
    each a dict of input_ids / labels / seq_ids (the sample's index in the row) lists, position_ids
    (3, T) restarting at 0 for every sample, and the row's images in order. collate_rows batches them.
    An example longer than max_len is an error naming its source."""
    rows, room = [], []
    for e in examples:
        n = len(e["input_ids"])
        if n > max_len:
            raise ValueError(f"{e.get('source', 'an example')}: {n} tokens do not fit max_len={max_len}")
        k = next((k for k, r in enumerate(room) if r >= n), len(rows))
        if k == len(rows):
            rows.append([])
            room.append(max_len)
        rows[k].append(e)
        room[k] -= n
    return [_pack_row(r) for r in rows]


def _pack_row(exs):
    pixel_values, grids = _concat_images(exs)
    return {"input_ids": [i for e in exs for i in e["input_ids"]], "labels": [y for e in exs for y in e["labels"]],
            "seq_ids": [k for k, e in enumerate(exs) for _ in e["input_ids"]],
            "position_ids": torch.cat([e["position_ids"] for e in exs], dim=1),
            "pixel_values": pixel_values, "image_grid_thw": grids}


def collate_rows(rows, pad_id=0):
    """Packed rows -> a right-padded batch: input_ids / labels / seq_ids (B, T) (padding: pad_id,
    IGNORE, -1), position_ids (3, B, T), and the rows' images concatenated in order. The model keeps
    attention inside each sample by seq_ids."""
    B, T = len(rows), max(len(r["input_ids"]) for r in rows)
    ids = torch.full((B, T), pad_id, dtype=torch.long)
    labels = torch.full((B, T), IGNORE, dtype=torch.long)
    seq_ids = torch.full((B, T), -1, dtype=torch.long)
    position_ids = torch.zeros(3, B, T, dtype=torch.long)
    for b, r in enumerate(rows):
        n = len(r["input_ids"])
        ids[b, :n], labels[b, :n] = torch.tensor(r["input_ids"]), torch.tensor(r["labels"])
        seq_ids[b, :n], position_ids[:, b, :n] = torch.tensor(r["seq_ids"]), r["position_ids"]
    pixel_values, grids = _concat_images(rows)
    return {"input_ids": ids, "labels": labels, "seq_ids": seq_ids, "position_ids": position_ids,
            "pixel_values": pixel_values, "image_grid_thw": grids}
