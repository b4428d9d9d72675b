"""Qwen-VL vision towers, image processing and mRoPE indices against transformers (tiny random configs, CPU)."""
import numpy as np
import pytest
import torch
from PIL import Image
from transformers import Qwen2_5_VLConfig, Qwen3VLConfig
from transformers.models.qwen2_5_vl.configuration_qwen2_5_vl import Qwen2_5_VLVisionConfig
from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VisionTransformerPretrainedModel, Qwen2_5_VLModel
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil
from transformers.models.qwen3_vl.configuration_qwen3_vl import Qwen3VLVisionConfig
from transformers.models.qwen3_vl.modeling_qwen3_vl import Qwen3VLModel, Qwen3VLVisionModel

import data
from model.config import Qwen25VisionConfig, Qwen3VisionConfig, preset
from model.llm import mrope_positions
from model.qwen2_5_vit import Qwen25VisionTower
from model.qwen3_vit import Qwen3VisionTower

# Two images of different sizes and a 2-frame clip. 12x20 patches = 6x10 merged tokens, not a
# multiple of the 4x4-token window, so Qwen2.5-VL gets partial edge windows.
GRID = torch.tensor([[1, 12, 20], [1, 8, 8], [2, 4, 6]])


def _randomize(module: torch.nn.Module, std: float):
    with torch.no_grad():
        for p in module.parameters():
            p.normal_(0, std)


def _hf_config(hf_cls, cfg, **extra):
    c = hf_cls(depth=cfg.depth, hidden_size=cfg.hidden_size, num_heads=cfg.num_heads,
               intermediate_size=cfg.intermediate_size, out_hidden_size=cfg.out_hidden_size,
               patch_size=cfg.patch_size, temporal_patch_size=cfg.temporal_patch_size,
               spatial_merge_size=cfg.spatial_merge_size, in_channels=cfg.in_channels, **extra)
    c._attn_implementation = "sdpa"
    return c


def _per_image(tower, x, grid):
    """Run each image alone: batching must not let images see each other."""
    outs, start = [], 0
    for g in grid:
        n = int(g.prod())
        outs.append(tower(x[start:start + n], g[None]))
        start += n
    return outs


@torch.no_grad()
def test_qwen2_5_vision_tower_matches_transformers():
    cfg = Qwen25VisionConfig.debug()
    ref = Qwen2_5_VisionTransformerPretrainedModel(_hf_config(
        Qwen2_5_VLVisionConfig, cfg, window_size=cfg.window_size,
        fullatt_block_indexes=list(cfg.fullatt_block_indexes))).eval()
    _randomize(ref, 0.2)
    ours = Qwen25VisionTower(cfg).eval()
    ours.load_state_dict(ref.state_dict(), strict=True)  # official names under the tower, 1:1
    x = torch.randn(int(GRID.prod(-1).sum()), cfg.patch_dim)
    expected = ref(x, grid_thw=GRID).pooler_output
    got, deepstack = ours(x, GRID)
    assert got.shape == (x.shape[0] // 4, cfg.out_hidden_size) and deepstack == []
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=0)
    torch.testing.assert_close(torch.cat([a[0] for a in _per_image(ours, x, GRID)]), got, atol=1e-5, rtol=0)


@torch.no_grad()
def test_qwen3_vision_tower_matches_transformers():
    cfg = Qwen3VisionConfig.debug()
    ref = Qwen3VLVisionModel(_hf_config(
        Qwen3VLVisionConfig, cfg, num_position_embeddings=cfg.num_position_embeddings,
        deepstack_visual_indexes=list(cfg.deepstack_visual_indexes))).eval()
    _randomize(ref, 0.2)
    ours = Qwen3VisionTower(cfg).eval()
    ours.load_state_dict(ref.state_dict(), strict=True)
    x = torch.randn(int(GRID.prod(-1).sum()), cfg.patch_dim)
    out = ref(x, grid_thw=GRID)
    got, deepstack = ours(x, GRID)
    torch.testing.assert_close(got, out.pooler_output, atol=1e-4, rtol=0)
    assert len(deepstack) == len(out.deepstack_features) == 2
    for a, b in zip(deepstack, out.deepstack_features):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=0)
    alone = _per_image(ours, x, GRID)
    torch.testing.assert_close(torch.cat([a[0] for a in alone]), got, atol=1e-5, rtol=0)


# Key patterns and shapes of the released checkpoints (tests/data/keys_mllm_patterns.txt), minus `model.model.visual.`.
QWEN25_3B_KEYS = """patch_embed.proj.weight (1280,3,2,14,14)
blocks.{i}.norm1.weight (1280,)|blocks.{i}.norm2.weight (1280,)
blocks.{i}.attn.qkv.weight (3840,1280)|blocks.{i}.attn.qkv.bias (3840,)
blocks.{i}.attn.proj.weight (1280,1280)|blocks.{i}.attn.proj.bias (1280,)
blocks.{i}.mlp.gate_proj.weight (3420,1280)|blocks.{i}.mlp.gate_proj.bias (3420,)
blocks.{i}.mlp.up_proj.weight (3420,1280)|blocks.{i}.mlp.up_proj.bias (3420,)
blocks.{i}.mlp.down_proj.weight (1280,3420)|blocks.{i}.mlp.down_proj.bias (1280,)
merger.ln_q.weight (1280,)|merger.mlp.0.weight (5120,5120)|merger.mlp.0.bias (5120,)
merger.mlp.2.weight (2048,5120)|merger.mlp.2.bias (2048,)"""
QWEN3_4B_KEYS = """patch_embed.proj.weight (1024,3,2,16,16)|patch_embed.proj.bias (1024,)|pos_embed.weight (2304,1024)
blocks.{i}.norm1.weight (1024,)|blocks.{i}.norm1.bias (1024,)|blocks.{i}.norm2.weight (1024,)|blocks.{i}.norm2.bias (1024,)
blocks.{i}.attn.qkv.weight (3072,1024)|blocks.{i}.attn.qkv.bias (3072,)
blocks.{i}.attn.proj.weight (1024,1024)|blocks.{i}.attn.proj.bias (1024,)
blocks.{i}.mlp.linear_fc1.weight (4096,1024)|blocks.{i}.mlp.linear_fc1.bias (4096,)
blocks.{i}.mlp.linear_fc2.weight (1024,4096)|blocks.{i}.mlp.linear_fc2.bias (1024,)
merger.norm.weight (1024,)|merger.norm.bias (1024,)|merger.linear_fc1.weight (4096,4096)|merger.linear_fc1.bias (4096,)
merger.linear_fc2.weight (2560,4096)|merger.linear_fc2.bias (2560,)
deepstack_merger_list.{k}.norm.weight (4096,)|deepstack_merger_list.{k}.norm.bias (4096,)
deepstack_merger_list.{k}.linear_fc1.weight (4096,4096)|deepstack_merger_list.{k}.linear_fc1.bias (4096,)
deepstack_merger_list.{k}.linear_fc2.weight (2560,4096)|deepstack_merger_list.{k}.linear_fc2.bias (2560,)"""


def _expand(patterns: str, depth: int, n_deepstack: int = 0) -> dict:
    out = {}
    for item in patterns.replace("\n", "|").split("|"):
        name, shape = item.split()
        shape = tuple(int(s) for s in shape.strip("(,)").split(","))
        for i in range(depth if "{i}" in name else 1):
            for k in range(n_deepstack if "{k}" in name else 1):
                out[name.format(i=i, k=k)] = shape
    return out


@pytest.mark.parametrize("tower, cfg, patterns", [
    (Qwen25VisionTower, preset("Sa2VA-Qwen2_5-VL-3B").vision, QWEN25_3B_KEYS),
    (Qwen3VisionTower, preset("Sa2VA-Qwen3-VL-4B").vision, QWEN3_4B_KEYS)])
def test_real_presets_have_the_checkpoint_keys(tower, cfg, patterns):
    with torch.device("meta"):
        sd = tower(cfg).state_dict()
    n_ds = len(getattr(cfg, "deepstack_visual_indexes", ()))
    assert {k: tuple(v.shape) for k, v in sd.items()} == _expand(patterns, cfg.depth, n_ds)


def test_tower_rejects_mismatched_grid():
    cfg = Qwen25VisionConfig.debug()
    tower = Qwen25VisionTower(cfg)
    x = torch.randn(96, cfg.patch_dim)
    with pytest.raises(ValueError, match="describes 100 patches"):
        tower(x, torch.tensor([[1, 10, 10]]))
    with pytest.raises(ValueError, match="multiples of 2"):
        tower(torch.randn(99, cfg.patch_dim), torch.tensor([[1, 9, 11]]))
    with pytest.raises(ValueError, match="pixel_values must be"):
        tower(torch.randn(96, 10), torch.tensor([[1, 8, 12]]))


def _image(h: int, w: int, seed: int) -> Image.Image:
    """A smooth gradient with noise, so resizes have real structure to get wrong."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w]
    a = np.stack([x * 255 / w, y * 255 / h, (x + y) % 97 * 2.6], -1) + rng.normal(0, 20, (h, w, 3))
    return Image.fromarray(np.clip(a, 0, 255).astype(np.uint8))


IMAGES = [_image(333, 517, 0), _image(1201, 907, 1), _image(90, 700, 2)]  # below, above and inside the pixel range


@pytest.mark.parametrize("spec", [Qwen25VisionConfig(), Qwen3VisionConfig()], ids=["qwen2_5_vl", "qwen3_vl"])
def test_processing_matches_transformers_processor(spec):
    ref = Qwen2VLImageProcessorPil(min_pixels=data.SA2VA_MIN_PIXELS, max_pixels=data.SA2VA_MAX_PIXELS,
                                   patch_size=spec.patch_size, merge_size=spec.spatial_merge_size,
                                   temporal_patch_size=spec.temporal_patch_size,
                                   image_mean=list(spec.pixel_mean), image_std=list(spec.pixel_std))
    fetched = [data.fetch_image(im) for im in IMAGES]
    expected = ref(images=fetched, return_tensors="pt")
    pixel_values, grid = data.qwen_image_inputs(IMAGES, spec, resize="pil")
    assert grid.tolist() == expected["image_grid_thw"].tolist()
    torch.testing.assert_close(pixel_values, expected["pixel_values"], atol=1e-5, rtol=0)
    # The processor alone, on sizes that are not multiples of the factor.
    for im in IMAGES:
        patches, g = data.process_image(im, spec, resize="pil")
        exp = ref(images=[im], return_tensors="pt")
        assert list(g) == exp["image_grid_thw"][0].tolist()
        torch.testing.assert_close(patches, exp["pixel_values"], atol=1e-5, rtol=0)
    # The fast processor's torch resize differs from PIL's by at most 2 grey levels on a few pixels.
    fast, fast_grid = data.qwen_image_inputs(IMAGES, spec, resize="torch")
    assert torch.equal(fast_grid, grid)
    levels = (fast - pixel_values).abs() * min(spec.pixel_std) * 255
    assert levels.max() <= 2.01 and (levels > 0.5).float().mean() < 0.02


def test_fetch_resize_follows_qwen_vl_utils():
    assert data.fetch_smart_resize(333, 517) == (336, 504)
    # qwen_vl_utils keeps a rounded side >= 28 before the pixel check; the processor's version does not.
    assert data.fetch_smart_resize(10, 2000) == (28, 1988)
    assert data.smart_resize(10, 2000, 28, 4 * 28 * 28, 16384 * 28 * 28) == (28, 812)
    rgba = Image.new("RGBA", (40, 30), (255, 0, 0, 0))  # fully transparent red -> white
    assert np.asarray(data.fetch_image(rgba)).min() == 255
    with pytest.raises(ValueError, match="elongated"):
        data.fetch_smart_resize(10, 2500)


def _rope_model(cls, cfg_cls, rope):
    text = dict(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                num_key_value_heads=1, rope_parameters=rope)
    vision = dict(depth=1, hidden_size=16, num_heads=2, intermediate_size=16, out_hidden_size=16)
    return cls(cfg_cls(text_config=text, vision_config=vision, image_token_id=IMG, video_token_id=61,
                       vision_start_token_id=VS))


IMG, VS, VE, PAD = 60, 62, 63, 0


@pytest.mark.parametrize("family", ["qwen2_5_vl", "qwen3_vl"])
def test_rope_index_matches_transformers(family):
    if family == "qwen2_5_vl":
        model = _rope_model(Qwen2_5_VLModel, Qwen2_5_VLConfig, {"rope_type": "default", "rope_theta": 1e6,
                                                                  "mrope_section": [2, 1, 1]})
    else:
        model = _rope_model(Qwen3VLModel, Qwen3VLConfig, {"rope_type": "default", "rope_theta": 1e6,
                                                          "mrope_section": [2, 1, 1], "mrope_interleaved": True})
    # Row 0: text, an 8x12-patch image, a 12x4-patch image, text. Row 1: left-padded, one image.
    row0 = [5, 6, 7, VS] + [IMG] * 24 + [VE, VS] + [IMG] * 12 + [VE, 8, 9, 10]
    row1 = [PAD] * 33 + [11, VS] + [IMG] * 6 + [VE, 12, 13, 14, 15]
    ids = torch.tensor([row0, row1])
    mask = (ids != PAD).long()
    grid = torch.tensor([[1, 8, 12], [1, 12, 4], [1, 4, 6]])
    expected, exp_delta = model.get_rope_index(ids, (ids == IMG).int(), image_grid_thw=grid, attention_mask=mask)
    got, delta = mrope_positions(ids, grid, IMG, VS, 2, attention_mask=mask,
                                 image_temporal_stride=0 if family == "qwen2_5_vl" else 1)
    assert torch.equal(got[:, mask.bool()], expected[:, mask.bool()])
    assert torch.equal(got[:, ~mask.bool()], torch.ones_like(got[:, ~mask.bool()]))  # 4.57 pads with 1
    assert delta[0].item() == exp_delta[0].item()  # no padding: both conventions agree
    # transformers 5 measures row 1's delta against the unpadded length, 4.57 against the padded one.
    assert delta[1].item() == exp_delta[1].item() - mask[1].eq(0).sum().item()


def test_rope_index_multi_frame_image_and_errors():
    ids = torch.tensor([[1, VS] + [IMG] * 8 + [VE]])
    grid = torch.tensor([[2, 4, 4]])  # two temporal patches of 2x2 merged tokens
    pos25, _ = mrope_positions(ids, grid, IMG, VS, image_temporal_stride=0)
    pos3, _ = mrope_positions(ids, grid, IMG, VS, image_temporal_stride=1)
    assert pos25[0, 0, 2:10].tolist() == [2] * 8
    assert pos3[0, 0, 2:10].tolist() == [2] * 4 + [3] * 4
    assert pos25[:, 0, -1].tolist() == [4, 4, 4] and pos3[:, 0, -1].tolist() == [4, 4, 4]
    with pytest.raises(ValueError, match="consecutive image tokens"):
        mrope_positions(ids, torch.tensor([[1, 4, 6]]), IMG, VS)
    with pytest.raises(ValueError, match="has 2 rows"):
        mrope_positions(ids, torch.tensor([[2, 4, 4], [1, 2, 2]]), IMG, VS)
