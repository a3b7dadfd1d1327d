"""processor.py and data/ against the references: transformers' Qwen2-VL image processor (PIL version),
the published chat template (shared/reference, rendered with jinja2), transformers' get_rope_index;
plus loss masks, padding, packing, the demo world and the errors bad input gets."""
import importlib.util
import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

import model
import processor
from processor import IGNORE

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TEMPLATE = os.path.join(os.path.dirname(ROOT), "shared", "reference", "qwen2_5_vl_chat_template.jinja")
DEMO = os.path.join(processor.DATA_DIR, "demo")


@pytest.fixture(scope="module")
def tok():
    return processor.Tokenizer(processor.DEFAULT_TOKENIZER)


def _noise(h, w, mode="RGB", seed=0):
    channels = {"RGB": 3, "RGBA": 4, "LA": 2, "L": 1}[mode]
    x = np.random.default_rng(seed).integers(0, 256, (h, w, channels), dtype=np.uint8)
    return Image.fromarray(x[..., 0] if channels == 1 else x, mode)


def _picture(path, w, h, colour=(200, 30, 30)):
    Image.new("RGB", (w, h), colour).save(path)
    return os.path.basename(path)


# -----------------------------------------------------------------------------
# Tokenizer


def test_tiny_tokenizer_layout(tok):
    assert tok.tk.get_vocab_size(with_added_tokens=False) == 2000  # ids 0..1999: regular BPE
    names = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|vision_pad|>",
             "<|image_pad|>", "<|video_pad|>", "<think>", "</think>"]
    assert [tok.token_to_id(n) for n in names] == list(range(2000, 2010)) and len(tok) == 2010
    specials = {t.content for t in tok.tk.get_added_tokens_decoder().values() if t.special}
    assert specials == set(names[:8])  # <think> / </think> are not special: they survive decoding
    cfg = model.get_config("tiny")     # the preset hard-codes the layout
    assert (cfg.image_token_id, cfg.vision_start_token_id, cfg.vision_end_token_id, cfg.eos_token_id) == \
        (tok.image_pad_id, tok.vision_start_id, tok.vision_end_id, tok.eos_id) and len(tok) <= cfg.vocab_size
    text = "<think>17 + 25 = 42</think> \\boxed{42}\n\tÜnïcode ✓ e\u0301 🙂"
    assert tok.decode(tok.encode(text)) == text  # byte-level: any text round-trips
    ids = tok.encode("<|im_start|>assistant\n" + text + "<|im_end|>")
    assert tok.decode(ids, skip_special_tokens=True) == "assistant\n" + text
    assert tok.encode("1942") == [tok.token_to_id(d) for d in "1942"]  # digits one by one, as in Qwen


def test_tokenizer_json_is_what_make_data_trains():
    spec = importlib.util.spec_from_file_location("make_data", os.path.join(processor.DATA_DIR, "make_data.py"))
    make_data = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(make_data)
    records = [json.loads(line) for f in ("sft_train.jsonl", "sft_eval.jsonl") for line in open(os.path.join(DEMO, f))]
    texts = [t for r in records for t in make_data.texts_of(r)]
    texts += [json.loads(line)["text"] for line in open(os.path.join(DEMO, "corpus.jsonl"))]
    retrained = json.loads(make_data.train_tokenizer(texts).to_str())
    assert retrained == json.load(open(processor.DEFAULT_TOKENIZER))


def test_tokenizer_finds_chat_tokens_by_name(tmp_path):
    """Any tokenizer.json with Qwen's chat tokens works (Qwen's own puts them at 151643...)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer, tk.decoder = pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel()
    tk.train_from_iterator(["hello world"] * 5, trainers.BpeTrainer(
        vocab_size=300, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    path = str(tmp_path / "tokenizer.json")
    tk.add_special_tokens(["<|im_end|>", "<|image_pad|>", "<|im_start|>", "<|vision_end|>", "<|vision_start|>"])
    tk.save(path)
    with pytest.raises(ValueError, match="lacks the chat tokens.*endoftext"):
        processor.Tokenizer(path)
    tk.add_special_tokens(["<|endoftext|>"])
    tk.save(path)
    t = processor.Tokenizer(path)
    assert (t.eos_id, t.image_pad_id, t.pad_id, t.think_end_id) == (tk.token_to_id("<|im_end|>"),
                                                                    tk.token_to_id("<|image_pad|>"),
                                                                    tk.token_to_id("<|endoftext|>"), None)
    assert processor.think_length(t.encode("ab</think> c"), t) == len(t.encode("ab</think>"))


# -----------------------------------------------------------------------------
# Images


@pytest.mark.parametrize("h,w,min_pixels,max_pixels,mode", [
    (57, 91, 3136, 12845056, "RGB"),     # odd sizes, rounded to multiples of 28
    (13, 17, 3136, 12845056, "RGB"),     # tiny: scaled up to min_pixels
    (5, 5, 4 * 3136, 12845056, "RGB"),
    (13, 2000, 3136, 12845056, "RGB"),   # one side rounds to 0 before the min_pixels rule
    (300, 41, 3136, 20000, "RGB"),       # tall, scaled down to max_pixels
    (500, 333, 3136, 100000, "RGBA"),    # transparency composited onto white
    (77, 1001, 3136, 1000000, "LA"),
    (2000, 1500, 3136, 500000, "L"),     # large, grey
    (28, 28, 3136, 12845056, "RGB"),
])
def test_process_image_equals_reference(h, w, min_pixels, max_pixels, mode):
    pil = pytest.importorskip("transformers.models.qwen2_vl.image_processing_pil_qwen2_vl")
    im = _noise(h, w, mode, seed=h * w)
    ref = pil.Qwen2VLImageProcessorPil(min_pixels=min_pixels, max_pixels=max_pixels)(images=[im], return_tensors="pt")
    pixel_values, grid = processor.process_image(im, min_pixels=min_pixels, max_pixels=max_pixels)
    assert grid.dtype == torch.long and grid.tolist() == ref["image_grid_thw"].tolist()
    assert pixel_values.dtype == torch.float32 and pixel_values.shape == ref["pixel_values"].shape
    assert (pixel_values - ref["pixel_values"]).abs().max().item() <= 1e-6  # in practice bit-identical


def test_process_image_reads_paths_and_names_them_in_errors(tmp_path, monkeypatch):
    _noise(40, 70).save(tmp_path / "ok.png")
    a, b = processor.process_image(str(tmp_path / "ok.png")), processor.process_image(_noise(40, 70))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    (tmp_path / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    Image.new("RGB", (1, 250)).save(tmp_path / "thin.png")
    for name, message in [("missing.png", "does not exist"), ("corrupt.png", "cannot be read"),
                          ("thin.png", "aspect ratio 250.0 exceeds 200")]:
        with pytest.raises((ValueError, OSError), match=rf"{name}.*{message}"):
            processor.process_image(str(tmp_path / name))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # pillow's decompression-bomb limit, made small
    with pytest.raises(ValueError, match=r"ok\.png.*(over the limit|decompression bomb)"):
        processor.process_image(str(tmp_path / "ok.png"))


# -----------------------------------------------------------------------------
# Chat template


def _reference_ids(messages, tok, grids, add_generation_prompt):
    """The published template rendered the way transformers renders it, tokenised, then each image pad
    expanded at the id level."""
    jinja2 = pytest.importorskip("jinja2")
    env = jinja2.Environment(trim_blocks=True, lstrip_blocks=True)
    text = env.from_string(open(TEMPLATE).read()).render(messages=messages, add_generation_prompt=add_generation_prompt)
    counts, out = iter([t * h * w // 4 for t, h, w in grids]), []
    for i in tok.encode(text):
        out += [i] * next(counts) if i == tok.image_pad_id else [i]
    assert next(counts, None) is None
    return out


def test_chat_template_equals_reference(tok, tmp_path):
    a, b = _picture(tmp_path / "a.png", 60, 90), _picture(tmp_path / "b.png", 130, 50)
    messages = [{"role": "user", "content": [{"type": "image", "image": a}, {"type": "text", "text": "Compare"},
                                             {"image_url": b}, {"type": "text", "text": " these.\n"}]},
                {"role": "assistant", "content": [{"type": "text", "text": "<think>red vs blue</think> Different."}]},
                {"role": "user", "content": "  Sure?\n\n"}]
    grids = [processor.process_image(str(tmp_path / p))[1][0].tolist() for p in (a, b)]
    ids, _, image_grid_thw = processor.encode_prompt({"messages": messages + [{"role": "assistant", "content": "x"}]},
                                                     tok, base_dir=str(tmp_path))
    assert image_grid_thw.tolist() == grids and ids == _reference_ids(messages, tok, grids, True)
    ex = processor.encode_conversation(messages[:2], tok, base_dir=str(tmp_path))
    assert ex["input_ids"] == _reference_ids(messages[:2], tok, grids, False)
    with_system = [{"role": "system", "content": "Be brief."}, messages[2]]
    assert tok.encode(processor.chat_text(with_system, True)) == _reference_ids(with_system, tok, [], True)
    rl = processor.encode_prompt({"prompt": "<image>Compare<image> these.\n", "images": [a, b]}, tok,
                                 base_dir=str(tmp_path))
    assert rl[0] == _reference_ids(messages[:1], tok, grids, True)


# -----------------------------------------------------------------------------
# Training examples


def test_loss_mask_covers_exactly_the_assistant_replies(tok, tmp_path):
    pic = _picture(tmp_path / "p.png", 56, 84)
    replies = ["<think>greet</think> Hello", "Goodbye,\n\nfriend  "]
    messages = [{"role": "user", "content": [{"type": "image", "image": pic}, {"type": "text", "text": "Hi"}]},
                {"role": "assistant", "content": replies[0]}, {"role": "user", "content": "Bye"},
                {"role": "assistant", "content": replies[1]}]
    ex = processor.encode_conversation(messages, tok, str(tmp_path))
    assert len(ex["labels"]) == len(ex["input_ids"])
    assert all(y in (IGNORE, i) for i, y in zip(ex["input_ids"], ex["labels"]))
    learned = [y for y in ex["labels"] if y != IGNORE]
    assert learned == tok.encode(replies[0]) + [tok.eos_id] + tok.encode(replies[1]) + [tok.eos_id]
    assert tok.decode(learned) == f"{replies[0]}<|im_end|>{replies[1]}<|im_end|>"
    assert ex["input_ids"].count(tok.image_pad_id) == 6 and ex["image_grid_thw"].tolist() == [[1, 6, 4]]
    with pytest.raises(ValueError, match="no assistant turn"):
        processor.encode_conversation(messages[:1], tok, str(tmp_path))


def test_sharegpt_records_read_like_ours(tok, tmp_path):
    pic = _picture(tmp_path / "x.png", 56, 56)
    ours = {"messages": [{"role": "user", "content": [{"type": "image", "image": pic},
                                                      {"type": "text", "text": "What is it?"}]},
                         {"role": "assistant", "content": "A square."}]}
    llava = {"conversations": [{"from": "human", "value": "<image>\nWhat is it?"},
                               {"from": "gpt", "value": "A square."}], "image": pic}
    a = processor.encode_conversation(processor.to_messages(ours), tok, str(tmp_path))
    b = processor.encode_conversation(processor.to_messages(llava), tok, str(tmp_path))
    assert a["input_ids"] == b["input_ids"] and a["labels"] == b["labels"]
    assert torch.equal(a["pixel_values"], b["pixel_values"])
    for bad, message in [({**llava, "image": [pic, pic]}, "1 images without an <image> tag"),
                         ({**llava, "image": []}, "1 <image> tags but only 0 images"),
                         ({"conversations": [{"from": "robot", "value": "hi"}]}, "unknown speaker 'robot'")]:
        with pytest.raises(ValueError, match=message):
            processor.to_messages(bad)


def test_rope_positions_equal_transformers_get_rope_index():
    transformers = pytest.importorskip("transformers")
    from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VLModel
    cfg = transformers.Qwen2_5_VLConfig(
        text_config=dict(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1),
        vision_config=dict(depth=1, hidden_size=16, intermediate_size=32, num_heads=2, out_hidden_size=16),
        image_token_id=60, video_token_id=61, vision_start_token_id=58, vision_end_token_id=59)
    reference = Qwen2_5_VLModel(cfg)
    grids = torch.tensor([[1, 6, 4], [1, 4, 10]])  # 3x2 and 2x5 merged grids: non-square both ways
    ids = torch.tensor([1, 2, 58] + [60] * 6 + [59, 3, 4, 5, 58] + [60] * 10 + [59, 6, 7])
    expected, _ = reference.get_rope_index(ids[None], (ids[None] == 60).int(), image_grid_thw=grids)
    assert torch.equal(processor.rope_positions(ids, grids, 60, merge_size=2), expected[:, 0])
    text = torch.arange(7)
    expected, _ = reference.get_rope_index(text[None], torch.zeros(1, 7, dtype=torch.int))
    assert torch.equal(processor.rope_positions(text, None, 60), expected[:, 0])
    with pytest.raises(ValueError, match=r"image 1 of grid \[1, 4, 10\] needs 10 consecutive image tokens"):
        processor.rope_positions(ids[:-6], grids, 60)
    with pytest.raises(ValueError, match="2 images in image_grid_thw but 1 runs"):
        processor.rope_positions(ids[:12], grids, 60)


def _examples(tok, tmp_path):
    pics = [_picture(tmp_path / "i.png", 84, 56), _picture(tmp_path / "j.png", 56, 140, (0, 0, 255))]
    convs = [[{"role": "user", "content": [{"type": "image", "image": pics[0]}, {"type": "text", "text": "Colour?"}]},
              {"role": "assistant", "content": "<think>dark</think> Red."}],
             [{"role": "user", "content": "What is 2 + 2? Think about it for a while before you answer."},
              {"role": "assistant", "content": "<think>2 + 2 = 4</think> \\boxed{4}"}],
             [{"role": "user", "content": [{"type": "image", "image": pics[1]}, {"type": "text", "text": "Shape?"}]},
              {"role": "assistant", "content": "<think>tall</think> A rectangle."}]]
    return [{**processor.encode_conversation(c, tok, str(tmp_path)), "source": f"conv{k}"} for k, c in enumerate(convs)]


def test_pad_batch(tok, tmp_path):
    exs = _examples(tok, tmp_path)
    batch = processor.pad_batch(exs, tok.pad_id)
    lengths = [len(e["input_ids"]) for e in exs]
    assert batch["input_ids"].shape == batch["labels"].shape == batch["attention_mask"].shape == (3, max(lengths))
    assert batch["attention_mask"].sum(1).tolist() == lengths
    for b, e in enumerate(exs):
        n = lengths[b]
        assert batch["input_ids"][b, :n].tolist() == e["input_ids"] and batch["labels"][b, :n].tolist() == e["labels"]
        assert (batch["input_ids"][b, n:] == tok.pad_id).all() and (batch["labels"][b, n:] == IGNORE).all()
    assert torch.equal(batch["pixel_values"], torch.cat([exs[0]["pixel_values"], exs[2]["pixel_values"]]))
    assert batch["image_grid_thw"].tolist() == [[1, 4, 6], [1, 10, 4]]


def test_packing_restarts_positions_per_sample(tok, tmp_path):
    exs = _examples(tok, tmp_path)
    n = [len(e["input_ids"]) for e in exs]
    assert n[1] > n[0] and n[1] > n[2]
    rows = processor.pack_examples(exs, max_len=n[0] + n[2])  # first fit: 0 opens a row, 1 a second, 2 joins 0
    batch = processor.collate_rows(rows, pad_id=tok.pad_id)
    assert batch["input_ids"].shape == (2, max(n[0] + n[2], n[1])) and batch["position_ids"].shape[:2] == (3, 2)
    assert batch["seq_ids"][0].tolist() == [0] * n[0] + [1] * n[2]
    assert batch["seq_ids"][1].tolist() == [0] * n[1] + [-1] * (n[0] + n[2] - n[1])
    assert batch["input_ids"][0].tolist() == exs[0]["input_ids"] + exs[2]["input_ids"]
    assert batch["labels"][0].tolist() == exs[0]["labels"] + exs[2]["labels"]
    for row, start, e in [(0, 0, exs[0]), (0, n[0], exs[2]), (1, 0, exs[1])]:
        got = batch["position_ids"][:, row, start:start + len(e["input_ids"])]
        assert torch.equal(got, e["position_ids"])  # each sample's own positions, starting at 0
        assert torch.equal(got, processor.rope_positions(e["input_ids"], e["image_grid_thw"], tok.image_pad_id))
    assert torch.equal(batch["pixel_values"], torch.cat([exs[0]["pixel_values"], exs[2]["pixel_values"]]))
    assert batch["image_grid_thw"].tolist() == [[1, 4, 6], [1, 10, 4]]
    with pytest.raises(ValueError, match=rf"conv1: {n[1]} tokens do not fit max_len={n[1] - 1}"):
        processor.pack_examples(exs, max_len=n[1] - 1)


# -----------------------------------------------------------------------------
# Bad records


def _write(path, lines):
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def test_bad_records_name_file_and_line_or_are_skipped_and_counted(tok, tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    _picture(data / "ok.png", 56, 56)
    _picture(tmp_path / "outside.png", 56, 56)
    (data / "corrupt.png").write_bytes(b"not a png")
    os.symlink(tmp_path / "outside.png", data / "link.png")

    def conv(image):
        return json.dumps({"messages": [{"role": "user", "content": [{"type": "image", "image": image}]},
                                        {"role": "assistant", "content": "x"}]})
    good = conv("ok.png")
    bad = {
        "{not json": "malformed JSON",
        "[1, 2]": "must be a JSON object",
        conv("missing.png"): "missing.png does not exist",
        conv("../outside.png"): "escapes the dataset folder",
        conv(str(tmp_path / "outside.png")): "escapes the dataset folder",
        conv("link.png"): "escapes the dataset folder",
        conv("corrupt.png"): "corrupt.png cannot be read",
        json.dumps({"messages": [{"role": "user", "content": "only a question"}]}): "no assistant turn",
        json.dumps({"conversations": [{"from": "human"}]}): "missing field 'value'",
        json.dumps({"text": "hi"}): "neither 'messages' nor 'conversations'",
    }
    for k, (line, message) in enumerate(bad.items()):
        path = _write(data / f"d{k}.jsonl", [good, "", line])
        with pytest.raises(processor.DataError, match=rf"d{k}\.jsonl:3: .*{message}"):
            processor.load_sft_examples(path, tok)
    path = _write(data / "mixed.jsonl", [good, *bad, good])
    examples, skipped = processor.load_sft_examples(path, tok, skip_bad=True)
    assert (len(examples), skipped) == (2, len(bad)) and examples[1]["source"] == f"{path}:{len(bad) + 2}"
    examples, skipped = processor.load_sft_examples(path, tok, skip_bad=True, max_len=5)
    assert (len(examples), skipped) == (0, len(bad) + 2)
    with pytest.raises(processor.DataError, match=r"mixed\.jsonl:1: .*exceed max_len=5"):
        processor.load_sft_examples(path, tok, max_len=5)

    prompts = [json.dumps({"prompt": "<image>Hi", "images": ["ok.png"], "label": "general_rule"}),
               json.dumps({"prompt": "<image>Hi", "images": ["../outside.png"]}),
               json.dumps({"prompt": "Hi", "images": ["ok.png"]})]
    path = _write(data / "rl.jsonl", prompts)
    with pytest.raises(processor.DataError, match=r"rl\.jsonl:2: .*escapes the dataset folder"):
        processor.load_prompts(path)
    records, skipped = processor.load_prompts(path, skip_bad=True)
    assert (len(records), skipped) == (1, 2)
    with pytest.raises(processor.DataError, match=r"rl\.jsonl:3: 1 images without an <image> tag"):
        processor.encode_prompt(processor.read_jsonl(path)[2], tok)


# -----------------------------------------------------------------------------
# The demo world


def test_demo_world_is_complete_and_reads_cleanly(tok):
    size = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(processor.DATA_DIR) for f in fs)
    assert size < 3e6
    examples, skipped = processor.load_sft_examples(os.path.join(DEMO, "sft_eval.jsonl"), tok)
    assert skipped == 0 and any(e["pixel_values"] is not None for e in examples)
    for e in examples:
        reply = tok.decode([y for y in e["labels"] if y != IGNORE])
        assert reply.startswith("<think>") and "</think> " in reply and reply.endswith("<|im_end|>")
    corpus = " ".join(json.loads(line)["text"] for line in open(os.path.join(DEMO, "corpus.jsonl")))
    for split in ("rl_train", "rl_eval"):
        records, skipped = processor.load_prompts(os.path.join(DEMO, f"{split}.jsonl"))
        assert skipped == 0
        assert {r["label"] for r in records} == {"math_rule", "safety", "value", "general_rule", "knowledge"}
        assert {r["harmful"] for r in records if r["label"] == "safety"} == {True, False}
        assert all("reference" in r for r in records if r["label"] != "safety")
        assert all(r["reference"] in corpus for r in records if r["label"] == "knowledge")  # search can find it
    for rec in records[:30]:
        ids, pixel_values, grid = processor.encode_prompt(rec, tok)
        tail = tok.encode("<|im_start|>assistant\n")
        assert ids[-len(tail):] == tail and (pixel_values is None) == (not rec.get("images"))
