"""model.py against transformers' Qwen2.5-VL on tiny random configs (fp32), plus the invariances:
KV-cache decode == full forward, packed == padded, save -> transformers -> same logits."""
import json
import os
import time

import pytest
import torch

import model

transformers = pytest.importorskip("transformers")
from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration  # noqa: E402

V, IMG, VSTART, VEND = 300, 290, 292, 293
PATCH_DIM = 3 * 2 * 14 * 14


def hf_config(tie=False, window=56, fullatt=(1,)):
    # head_dim 16: mrope (2, 3, 3) sums to 8; the vision head_dim 16 gives 4 frequencies per axis.
    # window 56 px = 2 merged tokens, so the grids below have ragged windows at their edges.
    return Qwen2_5_VLConfig(
        text_config=dict(vocab_size=V, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-6,
                         rope_parameters={"rope_type": "default", "mrope_section": [2, 3, 3], "rope_theta": 10000.0},
                         bos_token_id=0, eos_token_id=1, tie_word_embeddings=tie),
        vision_config=dict(depth=3, hidden_size=32, intermediate_size=48, num_heads=2, out_hidden_size=64,
                           fullatt_block_indexes=list(fullatt), window_size=window, patch_size=14,
                           spatial_merge_size=2, temporal_patch_size=2),
        image_token_id=IMG, video_token_id=291, vision_start_token_id=VSTART, vision_end_token_id=VEND,
        tie_word_embeddings=tie)


@pytest.fixture(scope="module", params=[False, True], ids=["untied", "tied"])
def pair(request, tmp_path_factory):
    """(hf model, our model loaded from the hf model's saved checkpoint)."""
    torch.manual_seed(0)
    hf = Qwen2_5_VLForConditionalGeneration(hf_config(tie=request.param)).eval()
    with torch.no_grad():  # the default init leaves biases and norms trivial; randomise everything
        for p in hf.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    path = str(tmp_path_factory.mktemp("hf"))
    hf.save_pretrained(path)
    return hf, model.load_pretrained(path).eval()


def prompt(*grids, text=5, seed=0):
    """Token ids: text, then for each image <vision_start> pads <vision_end> text."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(2, 280, (text,), generator=g).tolist()
    for t, h, w in grids:
        ids += [VSTART] + [IMG] * (t * h * w // 4) + [VEND] + torch.randint(2, 280, (3,), generator=g).tolist()
    return ids


def images(*grids, seed=0):
    g = torch.Generator().manual_seed(seed)
    n = sum(t * h * w for t, h, w in grids)
    return torch.randn(n, PATCH_DIM, generator=g), torch.tensor(grids)


def hf_logits(hf, ids, pixel_values=None, grid=None, attention_mask=None, position_ids=None):
    with torch.no_grad():
        return hf(input_ids=ids, pixel_values=pixel_values, image_grid_thw=grid, attention_mask=attention_mask,
                  position_ids=position_ids, mm_token_type_ids=(ids == IMG).int()).logits


def assert_close(ours, ref, rtol=1e-4):
    err = ((ours - ref).abs().max() / ref.abs().max()).item()
    assert err <= rtol, f"max relative error {err:.2e}"


def test_text_only(pair):
    hf, ours = pair
    ids = torch.tensor([prompt(text=17)])
    assert_close(ours(ids), hf_logits(hf, ids))


@pytest.mark.parametrize("grids", [[(1, 6, 8)], [(1, 6, 8), (1, 10, 4)], [(1, 4, 14), (1, 12, 6)]],
                         ids=["one_image", "two_images", "two_wide_tall"])
def test_images(pair, grids):
    hf, ours = pair
    ids = torch.tensor([prompt(*grids)])
    px, grid = images(*grids)
    assert_close(ours(ids, px, grid), hf_logits(hf, ids, px, grid))


def test_padded_batch_with_images(pair):
    hf, ours = pair
    rows = [prompt((1, 6, 8), seed=1), prompt((1, 4, 4), text=9, seed=2)]
    T = max(map(len, rows))
    ids = torch.tensor([[0] * (T - len(r)) + r for r in rows])  # left padding
    mask = torch.tensor([[0] * (T - len(r)) + [1] * len(r) for r in rows])
    px, grid = images((1, 6, 8), (1, 4, 4))
    ref, got = hf_logits(hf, ids, px, grid, mask), ours(ids, px, grid, mask)
    assert_close(got[mask.bool()], ref[mask.bool()])


def test_padded_text_batch(pair):
    hf, ours = pair
    rows = [prompt(text=12, seed=3), prompt(text=5, seed=4)]
    ids = torch.tensor([[0] * (12 - len(r)) + r for r in rows])
    mask = (torch.arange(12)[None] >= torch.tensor([[0], [7]])).long()
    pos = (mask.cumsum(-1) - 1).clamp(min=0)  # transformers' generate positions for left padding
    ref, got = hf_logits(hf, ids, attention_mask=mask, position_ids=pos), ours(ids, attention_mask=mask)
    assert_close(got[mask.bool()], ref[mask.bool()])


def test_greedy_tokens_match(pair):
    hf, ours = pair
    grids = [(1, 6, 8)]
    ids = torch.tensor([prompt(*grids)])
    px, grid = images(*grids)
    ref = hf.generate(input_ids=ids, pixel_values=px, image_grid_thw=grid, mm_token_type_ids=(ids == IMG).int(),
                      attention_mask=torch.ones_like(ids), max_new_tokens=12, do_sample=False,
                      eos_token_id=None, pad_token_id=0)[:, ids.shape[1]:]
    got = model.generate(ours, ids, pixel_values=px, image_grid_thw=grid, max_new_tokens=12)
    assert got.tolist() == ref.tolist()


def test_save_then_transformers_loads(pair, tmp_path):
    hf, ours = pair
    model.save_pretrained(ours, str(tmp_path / "ours"))
    cfg = json.load(open(tmp_path / "ours" / "config.json"))
    assert "text_config" not in cfg and cfg["rope_scaling"]["mrope_section"] == [2, 3, 3]  # published flat layout
    back = Qwen2_5_VLForConditionalGeneration.from_pretrained(str(tmp_path / "ours")).eval()
    grids = [(1, 6, 8), (1, 10, 4)]
    ids = torch.tensor([prompt(*grids)])
    px, grid = images(*grids)
    # the weights round-trip exactly: transformers gives bit-identical logits before and after
    assert torch.equal(hf_logits(back, ids, px, grid), hf_logits(hf, ids, px, grid))
    assert_close(ours(ids, px, grid), hf_logits(back, ids, px, grid))


def test_sharded_checkpoint_roundtrip(tmp_path):
    m = model.build("tiny", seed=3)
    model.save_pretrained(m, str(tmp_path / "c"), max_shard_bytes=1 << 20)
    assert os.path.exists(tmp_path / "c" / "model.safetensors.index.json")
    back = model.load_pretrained(str(tmp_path / "c"))
    ids = torch.randint(0, 2000, (2, 9))
    assert torch.equal(back(ids), m(ids))


def test_nested_and_flat_config_agree(pair, tmp_path):
    hf, _ = pair
    nested = hf.config.to_dict()  # transformers 5 writes text_config + rope_parameters
    flat = model.config_to_hf(model.config_from_hf(nested))
    assert "text_config" in nested and "text_config" not in flat
    assert model.config_from_hf(flat) == model.config_from_hf(nested)


def test_kv_cache_decode_equals_full_forward(pair):
    _, ours = pair
    grids = [(1, 6, 8)]
    ids = torch.tensor([prompt(*grids, seed=5)])
    px, grid = images(*grids)
    full = ours(ids, px, grid)
    cache = model.KVCache(ours.cfg, 1, ids.shape[1], "cpu", torch.float32)
    T0 = ids.shape[1] - 4  # prefill the prompt with its image, then feed the rest one token at a time
    steps = [ours(ids[:, :T0], px, grid, cache=cache)]
    steps += [ours(ids[:, t:t + 1], cache=cache) for t in range(T0, ids.shape[1])]
    assert_close(torch.cat(steps, 1), full, rtol=1e-5)


def test_packed_equals_padded(pair):
    _, ours = pair
    a, b = prompt((1, 6, 8), seed=6), prompt(text=7, seed=7)
    px, grid = images((1, 6, 8))
    # padded: one sample per row
    pad = torch.tensor([a, b + [0] * (len(a) - len(b))])
    mask = torch.tensor([[1] * len(a), [1] * len(b) + [0] * (len(a) - len(b))])
    ref = ours(pad, px, grid, mask)
    # packed: both samples in one row, positions restarting, attention confined to each
    pos_a, _ = model.rope_positions(torch.tensor([a]), grid, None, ours.cfg)
    pos_b, _ = model.rope_positions(torch.tensor([b]), None, None, ours.cfg)
    packed = ours(torch.tensor([a + b]), px, grid, position_ids=torch.cat([pos_a, pos_b], dim=2),
                  seq_ids=torch.tensor([[0] * len(a) + [1] * len(b)]))
    assert_close(packed[0, :len(a)], ref[0], rtol=1e-5)
    assert_close(packed[0, len(a):], ref[1, :len(b)], rtol=1e-5)


def test_image_token_count_mismatch_is_a_clear_error(pair):
    _, ours = pair
    ids = torch.tensor([prompt((1, 6, 8))])
    px, grid = images((1, 6, 10))  # 15 features for 12 pad tokens
    with pytest.raises(ValueError, match="image_grid_thw|<\\|image_pad\\|>"):
        ours(ids, px, grid)


def test_missing_and_unexpected_weights_are_named(tmp_path):
    from safetensors.torch import load_file, save_file
    m = model.build("tiny")
    model.save_pretrained(m, str(tmp_path / "c"))
    f = tmp_path / "c" / "model.safetensors"
    state = load_file(str(f))
    state.pop("model.layers.1.self_attn.k_proj.bias")
    state["model.layers.1.self_attn.extra.weight"] = torch.zeros(1)
    save_file(state, str(f))
    with pytest.raises(ValueError, match=r"k_proj\.bias.*extra\.weight"):
        model.load_pretrained(str(tmp_path / "c"))


def test_72b_on_meta_is_instant_and_real_sized():
    t = time.time()
    m = model.build("qwen2.5-vl-72b", device="meta")
    assert time.time() - t < 1.0
    assert all(p.is_meta for p in m.parameters())
    assert abs(model.num_params(m) / 1e9 - 73.4) < 0.05  # published size with the vision tower


def test_presets_match_published_7b():
    c = model.get_config("qwen2.5-vl-7b")
    assert (c.hidden_size, c.intermediate_size, c.num_hidden_layers, c.num_attention_heads,
            c.num_key_value_heads, c.vocab_size, c.mrope_section) == (3584, 18944, 28, 28, 4, 152064, (16, 24, 24))
    assert (c.vision.depth, c.vision.hidden_size, c.vision.intermediate_size, c.vision.fullatt_block_indexes) == \
        (32, 1280, 3420, (7, 15, 23, 31))


def test_configure_types_and_unknown_keys(tmp_path):
    from dataclasses import dataclass

    @dataclass
    class C:
        lr: float = 1e-5
        steps: int = 10
        name: str = "x"
        frozen: bool = False
        labels: tuple = ("a",)
        limit: int | None = None

    overrides = tmp_path / "o.json"
    overrides.write_text(json.dumps({"steps": 3, "labels": ["p", "q"]}))
    c = model.configure(C(), ["--lr=3e-4", f"--config={overrides}", "--frozen", "--name=y", "--limit=none"])
    assert (c.lr, c.steps, c.frozen, c.name, c.labels, c.limit) == (3e-4, 3, True, "y", ("p", "q"), None)
    with pytest.raises(SystemExit, match="did you mean --steps"):
        model.configure(C(), ["--step=3"])
    with pytest.raises(SystemExit, match="expects int"):
        model.configure(C(), ["--steps=1.5"])
