"""processor.py against the references: transformers' Qwen2-VL image processor (PIL version) and the
published chat template (shared/reference), plus loss masks, packing and bad-input errors."""
import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

import model
import processor

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TEMPLATE = os.path.join(os.path.dirname(ROOT), "shared", "reference", "qwen2_5_vl_chat_template.jinja")


@pytest.fixture(scope="module")
def tok():
    return processor.Tokenizer(processor.DEFAULT_TOKENIZER)


def test_tokenizer_ids_match_the_tiny_preset(tok):
    cfg = model.get_config("tiny")
    assert tok.token_to_id("<|image_pad|>") == cfg.image_token_id
    assert tok.token_to_id("<|vision_start|>") == cfg.vision_start_token_id
    assert tok.token_to_id("<|vision_end|>") == cfg.vision_end_token_id
    assert tok.token_to_id("<|im_end|>") == cfg.eos_token_id
    assert len(tok) <= cfg.vocab_size
    text = "<think>17 + 25 = 42</think> The answer is \\boxed{42}. Ünïcode ✓"
    assert tok.decode(tok.encode(text)) == text  # byte-level: everything round-trips


@pytest.mark.parametrize("h,w,min_pixels,max_pixels", [
    (57, 91, 3136, 12845056), (300, 41, 3136, 20000), (13, 17, 3136, 12845056), (500, 333, 3136, 100000),
    (1001, 77, 3136, 1000000), (28, 28, 3136, 12845056), (2000, 1500, 3136, 500000)])
def test_process_image_equals_reference(h, w, min_pixels, max_pixels):
    pil = pytest.importorskip("transformers.models.qwen2_vl.image_processing_pil_qwen2_vl")
    ref = pil.Qwen2VLImageProcessorPil()
    im = Image.fromarray(np.random.default_rng(h * w).integers(0, 256, (h, w, 3), dtype=np.uint8))
    out = ref.preprocess([im], size={"shortest_edge": min_pixels, "longest_edge": max_pixels}, return_tensors="pt")
    pixel_values, grid = processor.process_image(im, min_pixels=min_pixels, max_pixels=max_pixels)
    assert grid.tolist() == out["image_grid_thw"].tolist()
    assert torch.allclose(pixel_values, out["pixel_values"].float(), atol=1e-5)


def _reference_ids(messages, tok, grids, add_generation_prompt):
    jinja2 = pytest.importorskip("jinja2")
    text = jinja2.Template(open(TEMPLATE).read()).render(messages=messages, add_generation_prompt=add_generation_prompt)
    return processor.expand_image_pads(tok.encode(text), grids, tok)


def test_chat_template_equals_reference(tok, tmp_path):
    Image.new("RGB", (60, 90), (200, 10, 10)).save(tmp_path / "a.png")
    Image.new("RGB", (120, 50), (10, 10, 200)).save(tmp_path / "b.png")
    messages = [{"role": "user", "content": [{"type": "image", "image": "a.png"}, {"type": "text", "text": "Compare"},
                                             {"type": "image", "image": "b.png"}, {"type": "text", "text": " these."}]},
                {"role": "assistant", "content": "<think>red vs blue</think> Different."},
                {"role": "user", "content": "Sure?"}]
    ids, _, grids = processor.encode_prompt({"messages": messages + [{"role": "assistant", "content": "x"}]}, tok,
                                            base_dir=str(tmp_path))
    assert ids == _reference_ids(messages, tok, grids.tolist(), True)
    ex = processor.encode_conversation(messages[:2], tok, base_dir=str(tmp_path))
    assert ex["input_ids"] == _reference_ids(messages[:2], tok, grids.tolist(), False)
    with_system = [{"role": "system", "content": "Be brief."}, messages[2]]
    assert tok.encode(processor.chat_text(with_system, True)) == _reference_ids(with_system, tok, [], True)


def test_loss_mask_covers_exactly_the_assistant_turns(tok):
    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "<think>greet</think> Hello"},
                {"role": "user", "content": "Bye"}, {"role": "assistant", "content": "Goodbye"}]
    ex = processor.encode_conversation(messages, tok)
    learned = [i for i, l in zip(ex["input_ids"], ex["labels"]) if l != processor.IGNORE]
    assert all(l in (processor.IGNORE, i) for i, l in zip(ex["input_ids"], ex["labels"]))
    assert learned == tok.encode("<think>greet</think> Hello") + [tok.eos_id] + tok.encode("Goodbye") + [tok.eos_id]


def test_sharegpt_records_read_like_ours(tok, tmp_path):
    Image.new("RGB", (56, 56)).save(tmp_path / "x.png")
    ours = {"messages": [{"role": "user", "content": [{"type": "image", "image": "x.png"},
                                                      {"type": "text", "text": "What is it?"}]},
                         {"role": "assistant", "content": "A square."}]}
    llava = {"conversations": [{"from": "human", "value": "<image>\nWhat is it?"}, {"from": "gpt", "value": "A square."}],
             "image": "x.png"}
    a = processor.encode_conversation(processor.to_messages(ours), tok, str(tmp_path))
    b = processor.encode_conversation(processor.to_messages(llava), tok, str(tmp_path))
    assert a["input_ids"] == b["input_ids"] and torch.equal(a["pixel_values"], b["pixel_values"])


def test_packing_restarts_positions_and_matches_single_examples(tok, tmp_path):
    Image.new("RGB", (84, 56), (1, 2, 3)).save(tmp_path / "i.png")
    convs = [[{"role": "user", "content": [{"type": "image", "image": "i.png"}, {"type": "text", "text": "Colour?"}]},
              {"role": "assistant", "content": "<think>dark</think> Black."}],
             [{"role": "user", "content": "What is 2 + 2?"}, {"role": "assistant", "content": "<think>2+2=4</think> 4"}]]
    exs = [processor.encode_conversation(c, tok, str(tmp_path)) for c in convs]
    rows = processor.pack_examples(exs, max_len=1000)
    assert len(rows) == 1
    batch = processor.collate_rows(rows)
    n0 = len(exs[0]["input_ids"])
    assert torch.equal(batch["position_ids"][:, 0, :n0], exs[0]["position_ids"])
    assert batch["position_ids"][0, 0, n0].item() == 0  # the second sample starts again at 0
    assert batch["seq_ids"][0].tolist() == [0] * n0 + [1] * len(exs[1]["input_ids"])
    # positions are the model's own: image tokens get (t, h, w) coordinates
    img = torch.tensor(exs[0]["input_ids"]) == tok.image_pad_id
    assert exs[0]["position_ids"][1, img].tolist() != exs[0]["position_ids"][2, img].tolist()
    with pytest.raises(ValueError, match="does not fit"):
        processor.pack_examples(exs, max_len=10)


def _write(path, lines):
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def test_bad_records_name_file_and_line(tok, tmp_path):
    Image.new("RGB", (56, 56)).save(tmp_path / "ok.png")
    (tmp_path / "corrupt.png").write_bytes(b"not a png")
    good = json.dumps({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]})
    bad = {
        "{not json": "Expecting",
        json.dumps({"messages": [{"role": "user", "content": [{"type": "image", "image": "missing.png"}]},
                                 {"role": "assistant", "content": "x"}]}): "does not exist",
        json.dumps({"messages": [{"role": "user", "content": [{"type": "image", "image": "../../etc/passwd"}]},
                                 {"role": "assistant", "content": "x"}]}): "escapes the dataset folder",
        json.dumps({"messages": [{"role": "user", "content": [{"type": "image", "image": "corrupt.png"}]},
                                 {"role": "assistant", "content": "x"}]}): "cannot be read",
        json.dumps({"messages": [{"role": "user", "content": "only a question"}]}): "no assistant turn",
    }
    for k, (line, message) in enumerate(bad.items()):
        path = _write(tmp_path / f"d{k}.jsonl", [good, line])
        with pytest.raises(processor.DataError, match=rf"d{k}\.jsonl:2: .*{message}"):
            processor.load_sft_examples(path, tok)
    path = _write(tmp_path / "mixed.jsonl", [good, *bad, good])
    examples, skipped = processor.load_sft_examples(path, tok, skip_bad=True)
    assert (len(examples), skipped) == (2, len(bad))


def test_demo_data_reads_cleanly(tok):
    examples, skipped = processor.load_sft_examples(os.path.join(processor.DATA_DIR, "demo", "sft_eval.jsonl"), tok)
    assert skipped == 0 and any(e["pixel_values"] is not None for e in examples)
    for rec in processor.read_jsonl(os.path.join(processor.DATA_DIR, "demo", "rl_eval.jsonl"))[:20]:
        ids, px, grid = processor.encode_prompt(rec, tok)
        tail = tok.encode("<|im_start|>assistant\n")
        assert ids[-len(tail):] == tail
        assert (px is None) == (not rec.get("images"))
