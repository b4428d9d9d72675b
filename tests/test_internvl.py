"""InternViT + pixel shuffle + mlp1 + Qwen2 LLM against transformers' InternVL, through
convert.py's key map (HF-layout weights are first re-expressed in the official Sa2VA layout)."""
import pytest
import torch
from PIL import Image
from transformers import InternVLConfig, InternVLForConditionalGeneration

import convert
import data
from model.config import InternViTConfig, LLMConfig, Sa2VAConfig
from model.intern_vit import pixel_shuffle
from model.sa2va import Sa2VAModel
from tests.conftest import randomize

V, IMG_TOKEN, SEG_TOKEN = 300, 299, 298


def hf_to_official(sd: dict, n_vit_layers: int) -> dict:
    """transformers' InternVL layout -> the official Sa2VA (InternVL-Chat) layout."""
    out = {}
    vt, lm = "model.vision_tower.", "model.language_model."
    out["vision_model.embeddings.class_embedding"] = sd[vt + "embeddings.cls_token"]
    out["vision_model.embeddings.position_embedding"] = sd[vt + "embeddings.position_embeddings"]
    out["vision_model.embeddings.patch_embedding.weight"] = sd[vt + "embeddings.patch_embeddings.projection.weight"]
    out["vision_model.embeddings.patch_embedding.bias"] = sd[vt + "embeddings.patch_embeddings.projection.bias"]
    for i in range(n_vit_layers):
        s, o = f"{vt}encoder.layer.{i}.", f"vision_model.encoder.layers.{i}."
        out[o + "ls1"], out[o + "ls2"] = sd[s + "lambda_1"], sd[s + "lambda_2"]
        out[o + "attn.qkv.weight"] = torch.cat([sd[s + f"attention.{x}_proj.weight"] for x in "qkv"])
        if s + "attention.q_proj.bias" in sd:
            out[o + "attn.qkv.bias"] = torch.cat([sd[s + f"attention.{x}_proj.bias"] for x in "qkv"])
        for n in ("q_norm", "k_norm"):
            if s + f"attention.{n}.weight" in sd:
                out[o + f"attn.{n}.weight"] = sd[s + f"attention.{n}.weight"]
        for suffix in ("weight", "bias"):
            if s + f"attention.projection_layer.{suffix}" in sd:
                out[o + f"attn.proj.{suffix}"] = sd[s + f"attention.projection_layer.{suffix}"]
            for a, b in (("mlp.fc1", "mlp.fc1"), ("mlp.fc2", "mlp.fc2"), ("layernorm_before", "norm1"), ("layernorm_after", "norm2")):
                if s + f"{a}.{suffix}" in sd:
                    out[o + f"{b}.{suffix}"] = sd[s + f"{a}.{suffix}"]
    for a, b in (("layer_norm", "0"), ("linear_1", "1"), ("linear_2", "3")):
        for suffix in ("weight", "bias"):
            out[f"mlp1.{b}.{suffix}"] = sd[f"model.multi_modal_projector.{a}.{suffix}"]
    for k, v in sd.items():
        if k.startswith(lm):
            out["language_model.model." + k[len(lm):]] = v
    out["language_model.lm_head.weight"] = sd["lm_head.weight"]
    return out


def build_pair(six_b: bool):
    vit = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, image_size=[56, 56],
               patch_size=[14, 14], layer_scale_init_value=0.1, use_mask_token=False, use_absolute_position_embeddings=True,
               use_qk_norm=six_b, attention_bias=not six_b, norm_type="rms_norm" if six_b else "layer_norm")
    hf_cfg = InternVLConfig(vision_config=vit, text_config=dict(
        model_type="qwen2", hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        intermediate_size=128, vocab_size=V, rope_theta=1e6, rms_norm_eps=1e-6, tie_word_embeddings=False),
        downsample_ratio=0.5, image_token_id=IMG_TOKEN)
    hf = randomize(InternVLForConditionalGeneration(hf_cfg), std=0.1).eval()
    cfg = Sa2VAConfig("internvl",
                      InternViTConfig(hidden_size=32, n_layers=2, n_heads=4, intermediate_size=64, image_size=56,
                                      qkv_bias=not six_b, qk_norm=six_b, norm_type="rms_norm" if six_b else "layer_norm"),
                      LLMConfig(V, 64, 2, 4, 2, 128, norm_eps=1e-6, rope_theta=1e6, qkv_bias=True),
                      image_token_id=IMG_TOKEN, seg_token_id=SEG_TOKEN)
    ours = Sa2VAModel(cfg).eval()
    official = hf_to_official(hf.state_dict(), 2)
    official.update({f"text_hidden_fcs.{i}.{s}": v for i in (0, 2) for s, v in
                     (("weight", getattr(ours.text_hidden_fcs[i], "weight")), ("bias", getattr(ours.text_hidden_fcs[i], "bias")))})
    ours.load_state_dict(convert.apply_map(official, convert.key_map(cfg), cfg.llm), strict=True)
    return hf, ours


@pytest.mark.parametrize("six_b", [False, True], ids=["vit300m", "vit6b"])
@torch.no_grad()
def test_internvl_matches_transformers(six_b):
    hf, ours = build_pair(six_b)
    pixels = torch.randn(3, 3, 56, 56)  # three tiles
    hf_vis = hf.model.get_image_features(pixel_values=pixels, vision_feature_layer=-1,
                                         vision_feature_select_strategy="default").pooler_output
    our_vis = ours.vision(pixels)[0].unflatten(0, (3, -1))  # per tile
    assert our_vis.shape == (3, 4, 64)
    torch.testing.assert_close(our_vis, hf_vis, atol=1e-4, rtol=1e-4)
    # Whole forward: text, 12 image-context tokens, text.
    ids = torch.cat([torch.randint(0, 250, (5,)), torch.full((12,), IMG_TOKEN), torch.randint(0, 250, (4,))])[None]
    ref = hf(input_ids=ids, pixel_values=pixels).logits
    x = ours.embed(ids, our_vis.flatten(0, 1))
    h, _ = ours.llm(x, torch.arange(ids.shape[1])[None])
    torch.testing.assert_close(ours.llm.logits(h), ref, atol=1e-4, rtol=1e-4)


def test_visual_token_count_mismatch_is_loud():
    _, ours = build_pair(False)
    ids = torch.full((1, 5), IMG_TOKEN)
    with pytest.raises(ValueError, match="5 image-context tokens but the vision tower gave 4"):
        ours.embed(ids, torch.zeros(4, 64))


def test_pixel_shuffle_channel_layout():
    # Token (i, j) = concat(x[2i,2j], x[2i,2j+1], x[2i+1,2j], x[2i+1,2j+1]) (InternVL `pixel_shuffle`, v2).
    g, C = 4, 3
    x = torch.randn(2, g * g, C)
    y = pixel_shuffle(x)
    grid = x.view(2, g, g, C)
    for i in range(g // 2):
        for j in range(g // 2):
            expect = torch.cat([grid[:, 2 * i, 2 * j], grid[:, 2 * i, 2 * j + 1], grid[:, 2 * i + 1, 2 * j], grid[:, 2 * i + 1, 2 * j + 1]], -1)
            torch.testing.assert_close(y[:, i * (g // 2) + j], expect, atol=0, rtol=0)


def reference_grid(w, h, image_size=448, min_num=1, max_num=12):
    """InternVL's find_closest_aspect_ratio (modeling_sa2va_chat.py), restated."""
    ratios = set((i, j) for n in range(min_num, max_num + 1) for i in range(1, n + 1) for j in range(1, n + 1)
                 if min_num <= i * j <= max_num)
    ratios = sorted(ratios, key=lambda x: x[0] * x[1])
    best_diff, best = float("inf"), (1, 1)
    for r in ratios:
        d = abs(w / h - r[0] / r[1])
        if d < best_diff:
            best_diff, best = d, r
        elif d == best_diff and w * h > 0.5 * image_size * image_size * r[0] * r[1]:
            best = r
    return best


@pytest.mark.parametrize("size", [(448, 448), (1000, 500), (500, 1000), (2000, 2000), (640, 480), (1280, 320), (300, 301), (100, 1200)])
def test_dynamic_tiling(size):
    w, h = size
    im = Image.new("RGB", size, (10, 200, 30))
    tiles = data.dynamic_tiles(im)
    cols, rows = reference_grid(w, h)
    assert data._tile_grid(w, h, 448, 1, 12) == (cols, rows)
    assert len(tiles) == cols * rows + (1 if cols * rows > 1 else 0)
    assert all(t.size == (448, 448) for t in tiles)


def test_tiles_are_row_major_crops():
    im = Image.new("RGB", (896, 448))
    im.paste((255, 0, 0), (0, 0, 448, 448))  # left half red
    tiles = data.dynamic_tiles(im)
    assert len(tiles) == 3  # 2x1 grid + thumbnail
    assert tiles[0].getpixel((200, 200)) == (255, 0, 0) and tiles[1].getpixel((200, 200)) == (0, 0, 0)


def test_prompt_strings():
    s = data.format_turn("qwen_chat", "<image>\nPlease segment the dog.", data.image_token_string([2]))
    assert s == "<|im_start|>user\n<img><IMG_CONTEXT><IMG_CONTEXT></img>\nPlease segment the dog.<|im_end|>\n<|im_start|>assistant\n"
    assert data.image_token_string([1, 1]) == "<img><IMG_CONTEXT></img>\n<img><IMG_CONTEXT></img>"
    assert data.format_turn("phi3-chat", "hi") == "<|user|>\nhi<|end|>\n<|assistant|>\n"
    with pytest.raises(ValueError, match="unknown chat template"):
        data.format_turn("vicuna", "hi")
