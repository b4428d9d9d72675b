"""Sa2VA-Qwen2.5-VL / Sa2VA-Qwen3-VL MLLM against transformers' Qwen2_5_VLForConditionalGeneration /
Qwen3VLForConditionalGeneration on tiny random configs (CPU, fp32), through convert.py.

The HF weights are put in the official Sa2VA layout (`model.` + the transformers key, plus
text_hidden_fcs), converted with convert.key_map/apply_map and loaded strictly. Compared: the
vision tower (and deepstack) outputs, the logits of an image prompt and of a video prompt (frames
fed as consecutive image blocks, as Sa2VA does), the `[SEG]` hidden state, and greedy generation.
"""
import functools

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import (Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, Qwen3VLConfig,
                          Qwen3VLForConditionalGeneration)

import convert
import data
from model.config import debug_config
from model.generate import GenerationConfig, generate
from model.llm import mrope_positions, rope_cos_sin
from model.sa2va import Sa2VAModel
from tests.conftest import randomize

FAMILIES = ["qwen2_5_vl", "qwen3_vl"]
V = 320
# Special tokens inside the tiny vocab; ordinary text uses ids below 300.
IMG, VID, VS, VE, IM_START, IM_END, SEG, USER, ASSISTANT, NL = range(310, 320)
# Small images keep the LLM sequences short; the Sa2VA pixel limits are tested in test_qwen_vit.py.
MIN_PIXELS, MAX_PIXELS = 8 * 28 * 28, 48 * 28 * 28
TOL = dict(atol=1e-4, rtol=1e-4)


def hf_config(cfg):
    """The transformers config whose dimensions equal our Sa2VAConfig."""
    v, lm = cfg.vision, cfg.llm
    qwen3 = cfg.family == "qwen3_vl"
    rope = {"rope_type": "default", "rope_theta": lm.rope_theta, "mrope_section": list(lm.mrope_section)}
    text = dict(vocab_size=lm.vocab_size, hidden_size=lm.dim, num_hidden_layers=lm.n_layers,
                num_attention_heads=lm.n_heads, num_key_value_heads=lm.n_kv_heads, intermediate_size=lm.intermediate_size,
                rms_norm_eps=lm.norm_eps, max_position_embeddings=lm.max_position_embeddings, tie_word_embeddings=False,
                rope_parameters=rope, bos_token_id=None, eos_token_id=None)
    vision = dict(depth=v.depth, hidden_size=v.hidden_size, num_heads=v.num_heads, intermediate_size=v.intermediate_size,
                  out_hidden_size=v.out_hidden_size, patch_size=v.patch_size, temporal_patch_size=v.temporal_patch_size,
                  spatial_merge_size=v.spatial_merge_size, in_channels=v.in_channels)
    if qwen3:
        rope["mrope_interleaved"] = True
        text["head_dim"] = lm.head_dim
        vision.update(num_position_embeddings=v.num_position_embeddings,
                      deepstack_visual_indexes=list(v.deepstack_visual_indexes))
    else:
        vision.update(window_size=v.window_size, fullatt_block_indexes=list(v.fullatt_block_indexes))
    cls = Qwen3VLConfig if qwen3 else Qwen2_5_VLConfig
    return cls(text_config=text, vision_config=vision, image_token_id=IMG, video_token_id=VID, vision_start_token_id=VS,
               vision_end_token_id=VE, tie_word_embeddings=False)


@functools.cache
def build_pair(family: str):
    torch.manual_seed(0)
    cfg = debug_config(family, vocab_size=V, sam2=False, image_token_id=IMG, seg_token_id=SEG)
    hf_cls = Qwen3VLForConditionalGeneration if family == "qwen3_vl" else Qwen2_5_VLForConditionalGeneration
    hf = randomize(hf_cls(hf_config(cfg)), std=0.15).eval()
    official = {"model." + k: v for k, v in hf.state_dict().items()}
    D = cfg.llm.dim
    heads = {"text_hidden_fcs.0.weight": torch.randn(D, D), "text_hidden_fcs.0.bias": torch.randn(D),
             "text_hidden_fcs.2.weight": torch.randn(cfg.seg_dim, D), "text_hidden_fcs.2.bias": torch.randn(cfg.seg_dim)}
    official.update(heads)
    ours = Sa2VAModel(cfg).eval()
    ours.load_state_dict(convert.apply_map(official, convert.key_map(cfg), cfg.llm), strict=True)
    for k, v in heads.items():
        assert torch.equal(ours.state_dict()[k], v)
    return cfg, hf, ours


def _image(h: int, w: int, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w]
    a = np.stack([x * 255 / w, y * 255 / h, (x * y + 31 * seed) % 89 * 2.8], -1) + rng.normal(0, 25, (h, w, 3))
    return Image.fromarray(np.clip(a, 0, 255).astype(np.uint8))


IMAGES = [_image(150, 210, 0), _image(170, 95, 1)]  # two sizes: different grids and token counts
FRAMES = [_image(120, 160, s) for s in (2, 3, 4)]  # a 3-frame clip, all frames the same size


def visual_inputs(cfg, images):
    return data.qwen_image_inputs(images, cfg.vision, min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS)


def prompt_ids(grid: torch.Tensor, merge: int, seed: int) -> torch.Tensor:
    """Qwen chat prompt with one <|vision_start|><|image_pad|>*n<|vision_end|> block per image, then a
    teacher-forced answer holding a [SEG] (as Sa2VA builds image and video prompts)."""
    g = torch.Generator().manual_seed(seed)
    text = lambda n: torch.randint(0, 300, (n,), generator=g).tolist()  # noqa: E731
    ids = [IM_START, USER, NL]
    for t, h, w in grid.tolist():
        ids += [VS] + [IMG] * (t * h * w // merge ** 2) + [VE]
    ids += text(6) + [IM_END, NL, IM_START, ASSISTANT, NL] + text(3) + [SEG] + text(2)
    return torch.tensor([ids])


def ours_forward(cfg, ours, ids, pixels, grid):
    """Our path as sa2va.py runs it: vision tower, token splice, 3-D positions, decoder (+ deepstack)."""
    visual, deepstack = ours.vision(pixels, grid)
    pos = rope_positions(cfg, ids, grid)
    x = ours.embed(ids, visual)
    h_post, h_pre = ours.llm(x, pos, deepstack=deepstack or None, visual_mask=ids == IMG)
    return ours.llm.logits(h_post), h_post, h_pre


def rope_positions(cfg, ids, grid):
    pos, _ = mrope_positions(ids, grid, IMG, VS, cfg.vision.spatial_merge_size,
                             image_temporal_stride=cfg.vision.image_temporal_stride)
    return pos


def hf_inputs(ids, pixels, grid):
    return dict(input_ids=ids, pixel_values=pixels, image_grid_thw=grid, mm_token_type_ids=(ids == IMG).int())


@pytest.mark.parametrize("family", FAMILIES)
def test_config_from_official(family):
    cfg, hf, _ = build_pair(family)
    ids = dict(image_token_id=IMG, seg_token_id=SEG)
    via_ours = convert.config_from_official(convert.config_to_official(cfg), **ids)
    hf_dict = hf.config.to_dict() | {"template": cfg.template}  # transformers 5 layout: rope_parameters
    via_hf = convert.config_from_official(hf_dict, **ids)
    for got in (via_ours, via_hf):
        assert (got.family, got.template) == (cfg.family, cfg.template)
        assert got.llm == cfg.llm
        assert got.vision == cfg.vision
    # transformers 4.57 wrote rope_theta at the top and the sections under rope_scaling (the released config.json files).
    text = dict(hf_dict["text_config"])
    rope = dict(text.pop("rope_parameters"))
    text["rope_theta"] = rope.pop("rope_theta")
    old = hf_dict | {"text_config": text | {"rope_scaling": rope}}
    assert convert.config_from_official(old, **ids).llm == cfg.llm


@pytest.mark.parametrize("family", FAMILIES)
@torch.no_grad()
def test_mrope_tables_match_transformers(family):
    """cos/sin per (t, h, w) position triple. Large, unrelated t/h/w values make every frequency pair's
    axis visible: with theta 5e6 the interleaved layout's last pairs turn too slowly to show in a prompt."""
    cfg, hf, ours = build_pair(family)
    positions = torch.randint(0, 50_000, (3, 2, 40))
    x = torch.zeros(2, 40, cfg.llm.dim)
    ref_cos, ref_sin = hf.model.language_model.rotary_emb(x, positions)
    cos, sin = rope_cos_sin(ours.llm.cfg, positions, 40, torch.float32)
    torch.testing.assert_close(cos, ref_cos, atol=1e-5, rtol=0)
    torch.testing.assert_close(sin, ref_sin, atol=1e-5, rtol=0)


@pytest.mark.parametrize("family", FAMILIES)
@torch.no_grad()
def test_vision_features_match_transformers(family):
    cfg, hf, ours = build_pair(family)
    pixels, grid = visual_inputs(cfg, IMAGES)
    assert grid[0].tolist() != grid[1].tolist()
    ref = hf.model.get_image_features(pixel_values=pixels, image_grid_thw=grid)
    visual, deepstack = ours.vision(pixels, grid)
    torch.testing.assert_close(visual, torch.cat(ref.pooler_output), **TOL)
    if family == "qwen3_vl":
        assert len(deepstack) == len(ref.deepstack_features) == len(cfg.vision.deepstack_visual_indexes)
        for a, b in zip(deepstack, ref.deepstack_features):
            torch.testing.assert_close(a, torch.cat(b), **TOL)
    else:
        assert deepstack == []


@pytest.mark.parametrize("media", ["image", "video"])
@pytest.mark.parametrize("family", FAMILIES)
@torch.no_grad()
def test_logits_match_transformers(family, media):
    cfg, hf, ours = build_pair(family)
    pixels, grid = visual_inputs(cfg, IMAGES if media == "image" else FRAMES)
    if media == "video":
        assert grid.shape[0] == 3 and (grid == grid[0]).all()  # three equal frames, each its own image block
    ids = prompt_ids(grid, cfg.vision.spatial_merge_size, seed=1)
    ref = hf(**hf_inputs(ids, pixels, grid)).logits
    logits, _, _ = ours_forward(cfg, ours, ids, pixels, grid)
    torch.testing.assert_close(logits, ref, **TOL)


@pytest.mark.parametrize("family", FAMILIES)
@torch.no_grad()
def test_seg_hidden_state(family):
    """[SEG] reads post-norm states for Qwen2.5-VL and the last decoder layer's output (pre-norm) for
    Qwen3-VL (measured by running the official pipeline with transformers 4.57, whose Qwen3-VL CausalLM forward
    collected the layer outputs itself and had no last_hidden_state to tie the last one to).
    transformers 5 returns the post-norm state as hidden_states[-1] for both families, so the
    pre-norm reference is hooked off the last decoder layer."""
    cfg, hf, ours = build_pair(family)
    pixels, grid = visual_inputs(cfg, IMAGES)
    ids = prompt_ids(grid, cfg.vision.spatial_merge_size, seed=2)
    last_layer = {}
    hook = hf.model.language_model.layers[-1].register_forward_hook(lambda m, a, out: last_layer.update(h=out))
    try:
        out = hf(**hf_inputs(ids, pixels, grid), output_hidden_states=True)
    finally:
        hook.remove()
    _, h_post, h_pre = ours_forward(cfg, ours, ids, pixels, grid)
    assert len(out.hidden_states) == cfg.llm.n_layers + 1
    torch.testing.assert_close(h_post, out.hidden_states[-1], **TOL)
    torch.testing.assert_close(h_pre, last_layer["h"], **TOL)
    assert (h_pre - h_post).abs().max() > 0.1  # the choice matters
    assert cfg.seg_hidden_prenorm == (family == "qwen3_vl")
    seg = ids[0] == SEG
    expected = (last_layer["h"] if family == "qwen3_vl" else out.hidden_states[-1])[0, seg]
    torch.testing.assert_close((h_pre if cfg.seg_hidden_prenorm else h_post)[0, seg], expected, **TOL)


@pytest.mark.parametrize("family", FAMILIES)
@torch.no_grad()
def test_cached_generation_matches_transformers_and_uncached(family):
    cfg, hf, ours = build_pair(family)
    pixels, grid = visual_inputs(cfg, FRAMES[:2])
    ids = prompt_ids(grid, cfg.vision.spatial_merge_size, seed=3)
    n_new = 5
    ref = hf.generate(**hf_inputs(ids, pixels, grid), do_sample=False, max_new_tokens=n_new, pad_token_id=0,
                      output_logits=True, return_dict_in_generate=True)
    ref_tokens = ref.sequences[0, ids.shape[1]:].tolist()

    visual, deepstack = ours.vision(pixels, grid)
    embeds = ours.embed(ids, visual)
    out = generate(ours.llm, embeds, rope_positions(cfg, ids, grid), None, GenerationConfig(max_new_tokens=n_new),
                   eos_ids=set(), prenorm_hidden=cfg.seg_hidden_prenorm, deepstack=deepstack or None,
                   visual_mask=ids == IMG)[0]
    assert out.tokens == ref_tokens
    assert not {IMG, VS} & set(out.tokens)  # else the uncached rerun below would see extra image tokens

    # Uncached: the whole sequence at once, decode positions continuing from the prompt's largest + 1.
    full = torch.cat([ids, torch.tensor([out.tokens])], dim=1)
    logits, h_post, h_pre = ours_forward(cfg, ours, full, pixels, grid)
    L = ids.shape[1]
    # HF's per-step logits come from its cached decode with positions continuing from max + 1.
    torch.testing.assert_close(logits[0, L - 1:-1], torch.cat(ref.logits), **TOL)
    assert logits[0, L - 1:-1].argmax(-1).tolist() == out.tokens
    fed = (h_pre if cfg.seg_hidden_prenorm else h_post)[0, L:-1]
    torch.testing.assert_close(out.hidden, fed, **TOL)
