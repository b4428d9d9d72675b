"""End to end on tiny random official-layout checkpoints: convert, load, predict, CLI."""
import dataclasses
import json
import os
import sys
import types

import av
import numpy as np
import pytest
import torch
from PIL import Image
from pycocotools import mask as mask_utils
from safetensors.torch import save_file
from sam2.build_sam import build_sam2_video_predictor

import convert
import data
import sa2va
from debug_checkpoint import debug_checkpoint, write_official_checkpoint
from model.config import debug_config
from model.generate import GenerationConfig, generate
from model.tokenizer import load_official_tokenizer
from tests.conftest import SP_VARIANTS, H, W, frames, train_sentencepiece, write_internlm2_folder


@pytest.fixture(scope="module", params=[("internvl", "qwen2"), ("internvl", "internlm2"), ("qwen2_5_vl", None), ("qwen3_vl", None)],
                ids=["internvl-qwen2", "internvl-internlm2", "qwen2_5_vl", "qwen3_vl"])
def checkpoint(request, tmp_path_factory):
    family, llm = request.param
    root = tmp_path_factory.mktemp(family)
    debug_checkpoint(root / "official", family, llm=llm or "qwen2", shards=2)
    convert.convert(str(root / "official"), str(root / "ours"))
    return str(root / "ours")


@pytest.fixture(scope="module")
def model(checkpoint):
    return sa2va.Sa2VA.from_pretrained(checkpoint, dtype="fp32")  # the parity tests need fp32 on any CPU


def test_image_masks_with_forced_answer(model):
    img = frames(1)[0]
    out = model.predict(image=img, text="<image>\nPlease segment the stripes.", answer="Sure, [SEG].")
    assert out.text == "Sure, [SEG]."
    assert len(out.masks) == 1 and out.masks[0].shape == (1, H, W) and out.masks[0].dtype == bool
    again = model.predict(image=Image.fromarray(img), text="<image>\nPlease segment the stripes.", answer="Sure, [SEG].")
    assert np.array_equal(out.masks[0], again.masks[0])  # teacher forcing is deterministic


def test_video_masks_several_objects(model):
    out = model.predict(video=frames(8), text="<image>\nPlease segment both.",
                        answer="<p>left</p> [SEG] and <p>right</p> [SEG].")
    assert [m.shape for m in out.masks] == [(8, H, W)] * 2
    assert out.phrases == ["left", "right"]
    uniform = model.predict(video=frames(8), text="<image>\nPlease segment both.", answer="Sure, [SEG].", key_frames="uniform")
    assert uniform.history.key_frames == [0, 1, 3, 5, 7] and uniform.masks[0].shape == (8, H, W)


class _Identity(torch.nn.Module):
    """Stands in for torchvision's transforms (not installed): SAM2ImagePredictor imports them."""

    def __init__(self, *args, **kwargs):
        super().__init__()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


class _Fixed(torch.nn.Module):
    def __init__(self, x: torch.Tensor):
        super().__init__()
        self.x = x

    def forward(self, image) -> torch.Tensor:
        return self.x


def image_predictor(monkeypatch, sam2_model, frame: torch.Tensor):
    """Meta's SAM2ImagePredictor on our SAM-2 module, fed `frame` (1, 3, S, S) as its resized and
    normalised image (its own resize is torchvision's; ours is Sa2VA's PIL bicubic)."""
    tv, tr = types.ModuleType("torchvision"), types.ModuleType("torchvision.transforms")
    tr.Normalize = tr.Resize = tr.ToTensor = _Identity
    tv.transforms = tr
    monkeypatch.setitem(sys.modules, "torchvision", tv)
    monkeypatch.setitem(sys.modules, "torchvision.transforms", tr)
    for name in ("sam2.utils.transforms", "sam2.sam2_image_predictor"):
        monkeypatch.delitem(sys.modules, name, raising=False)
    from sam2.sam2_image_predictor import SAM2ImagePredictor
    predictor = SAM2ImagePredictor(sam2_model)
    predictor._transforms.to_tensor = _Fixed(frame[0])
    predictor._transforms.transforms = _Identity()
    g = sam2_model.image_size // 16
    predictor._bb_feat_sizes = [(4 * g, 4 * g), (2 * g, 2 * g), (g, g)]  # it assumes 1024 px inputs
    return predictor


def test_point_and_box_regions_equal_sam2_image_predictor(model, monkeypatch):
    if model.cfg.family != "internvl" or model.cfg.llm.arch != "qwen2":
        pytest.skip("every debug model has the same SAM-2; checked once")
    img = frames(1)[0]
    bridge = model.model.grounding
    frame = bridge.normalize(data.sam2_frames([Image.fromarray(img)], model.cfg.sam2.image_size))
    predictor = image_predictor(monkeypatch, bridge.sam2, frame)
    predictor.set_image(img)
    points, boxes = [(30.0, 20.0), (101.5, 70.0)], [(10.0, 5.0, 80.0, 60.0)]
    ours = model.region_masks(img, points=points, boxes=boxes)
    assert ours.shape == (3, H, W) and ours.dtype == bool
    for k, (x, y) in enumerate(points):  # one click each, multimask: the best-scored of the 3 masks
        masks, scores, _ = predictor.predict(point_coords=np.array([[x, y]]), point_labels=np.array([1]))
        assert np.array_equal(ours[k], masks[scores.argmax()].astype(bool)), k
    both, scores, _ = predictor.predict(point_coords=np.array(points)[:, None], point_labels=np.ones((2, 1)))
    assert all(np.array_equal(ours[k], both[k][scores[k].argmax()].astype(bool)) for k in range(2))  # batched
    masks, _, _ = predictor.predict(box=np.array(boxes[0]), multimask_output=False)
    assert np.array_equal(ours[2], masks[0].astype(bool))
    assert 0 < ours.sum() < ours.size  # not a trivial mask
    # then the <vp> path as for mask regions, in order: masks, points, boxes
    regions = np.zeros((1, H, W), bool)
    regions[0, :40, :60] = True
    text, answer = "<image>\nWhat are region1, region2, region3 and region4?", "[SEG] [SEG]."
    got = model.predict(image=img, text=text, answer=answer, mask_prompts=regions, points=points, boxes=boxes)
    want = model.predict(image=img, text=text, answer=answer, mask_prompts=np.concatenate([regions, ours]))
    assert all(np.array_equal(a, b) for a, b in zip(got.masks, want.masks)) and len(got.masks) == 2
    assert got.history.text == want.history.text and "There are 4 part regions" in got.history.text


def test_answer_without_seg_gives_no_masks(model):
    out = model.predict(image=frames(1)[0], text="<image>\nWhat is this?", answer="A test pattern.")
    assert out.masks == [] and out.phrases == []


def test_generation_and_follow_up_turn(model):
    first = model.predict(image=frames(1)[0], text="<image>\nWhat is this?", max_new_tokens=4)
    assert first.history.text.endswith("<|im_end|>\n") and "What is this?" in first.history.text
    second = model.predict(text="And now?", history=first.history, answer="It is [SEG].")
    assert second.history.text.startswith(first.history.text)
    assert len(second.masks) == 1 and second.masks[0].shape == (1, H, W)  # the conversation's image


def test_video_file_and_frame_folder(model, tmp_path):
    clip = frames(6)
    path = str(tmp_path / "clip.mp4")
    with av.open(path, "w") as c:
        s = c.add_stream("libx264", rate=5)
        s.width, s.height, s.pix_fmt = W, H - 2, "yuv420p"  # yuv420p needs even sides
        for f in clip:
            for p in s.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(f[: H - 2]), format="rgb24")):
                c.mux(p)
        for p in s.encode():
            c.mux(p)
    out = model.predict(video=path, text="<image>\nPlease segment it.", answer="[SEG].")
    assert out.masks[0].shape == (6, H - 2, W)
    folder = tmp_path / "frames"
    folder.mkdir()
    for t, f in enumerate(clip):
        Image.fromarray(f).save(folder / f"{t:03d}.png")
    assert model.predict(video=str(folder), text="<image>\nPlease segment it.", answer="[SEG].").masks[0].shape == (6, H, W)


def test_visual_prompts(model):
    regions = np.zeros((2, H, W), bool)
    regions[0, :40, :60] = True
    regions[1, 40:, 60:] = True  # covers a sampled cell of the tiny 2x2 token grid
    if model.cfg.family != "internvl":
        with pytest.raises(ValueError, match="InternVL-family"):
            model.predict(image=frames(1)[0], text="<image>\nWhat is region1?", mask_prompts=[regions], answer="x")
        return
    out = model.predict(image=frames(1)[0], text="<image>\nWhat is in region1?", mask_prompts=[regions], answer="A [SEG].")
    assert "There are 2 part regions in the picture: region1<vp>" in out.history.text
    n_ctx = out.history.text.count("<IMG_CONTEXT>")
    assert n_ctx == len(out.history.media.visual_rows)
    with pytest.raises(ValueError, match="mask_prompts has 2 entries"):
        model.predict(image=frames(1)[0], text="<image>\nWhat?", mask_prompts=[regions, regions], answer="x")
    with pytest.raises(ValueError, match="mask_prompts are 10x10 but the image is 90x130"):
        model.predict(image=frames(1)[0], text="<image>\nWhat?", mask_prompts=[np.ones((1, 10, 10), bool)], answer="x")


def test_bad_inputs(model, tmp_path):
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"not an image")
    with pytest.raises(ValueError, match="cannot decode image"):
        model.predict(image=str(bad), text="<image>\nhi", answer="x")
    with pytest.raises(ValueError, match="does not exist"):
        model.predict(image=str(tmp_path / "nope.png"), text="<image>\nhi", answer="x")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="has no frames"):
        model.predict(video=str(tmp_path / "empty"), text="<image>\nhi", answer="x")
    with pytest.raises(ValueError, match="cannot decode video"):
        model.predict(video=str(bad), text="<image>\nhi", answer="x")
    with pytest.raises(ValueError, match="no image or video was given"):
        model.predict(text="<image>\nPlease segment the dog.")
    if model.cfg.llm.context_length is not None:
        with pytest.raises(ValueError, match="the model's context is"):
            model.predict(text="a" * (model.cfg.llm.context_length + 10))


def test_rle_round_trip_and_pycocotools():
    m = np.random.default_rng(0).random((7, 5)) > 0.5
    m[0, 0] = True
    rle = data.rle_encode(m)
    assert isinstance(rle["counts"], str)  # compressed COCO RLE
    assert np.array_equal(data.rle_decode(rle), m)
    big = np.zeros((300, 200), bool)  # long runs: multi-character counts and negative deltas
    big[40:260, 30:170] = True
    big[100:120, :] = False
    for mask in (m, big, np.zeros((4, 6), bool), np.ones((4, 6), bool)):
        rle = data.rle_encode(mask)
        assert np.array_equal(mask_utils.decode({"size": rle["size"], "counts": rle["counts"].encode()}).astype(bool), mask)
        assert rle["counts"] == mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))["counts"].decode()
        assert np.array_equal(data.rle_decode(rle), mask)


def coco_decode(rle: dict) -> np.ndarray:
    """pycocotools' decode of an RLE exactly as result.json stores it (its counts a str)."""
    return mask_utils.decode(rle).astype(bool)


def test_cli_writes_outputs(checkpoint, tmp_path, capsys):
    img = tmp_path / "img.png"
    Image.fromarray(frames(1)[0]).save(img)
    out = tmp_path / "out"
    sa2va.main(["--model", checkpoint, "--image", str(img), "--prompt", "Please segment it.", "--answer", "Sure, [SEG].",
                "--out", str(out)])
    assert "Sure, [SEG]." in capsys.readouterr().out
    assert sorted(os.listdir(out)) == ["mask_0.png", "overlay.png", "palette", "result.json"]
    result = json.loads((out / "result.json").read_text())
    mask = np.asarray(Image.open(out / "mask_0.png")) > 0
    assert np.array_equal(data.rle_decode(result["objects"][0]["masks"][0]), mask)
    assert np.array_equal(coco_decode(result["objects"][0]["masks"][0]), mask)
    if "qwen" not in checkpoint:  # a click and a box as <vp> regions (InternVL family): as the API gives them
        question = "<image>\nWhat are region1 and region2?"
        argv = ["--model", checkpoint, "--image", str(img), "--prompt", question, "--point", "30,20",
                "--box", "10,5,80,60", "--answer", "[SEG].", "--dtype", "fp32", "--out", str(tmp_path / "vp")]
        api = sa2va.Sa2VA.from_pretrained(checkpoint, dtype="fp32")
        try:  # a random SAM-2 may draw a region too thin for the <vp> grid: then both refuse alike
            want = api.predict(image=str(img), text=question, points=[(30, 20)], boxes=[(10, 5, 80, 60)], answer="[SEG].")
        except ValueError as e:
            with pytest.raises(SystemExit):
                sa2va.main(argv)
            assert str(e) in capsys.readouterr().err
        else:
            sa2va.main(argv)
            got = json.loads((tmp_path / "vp" / "result.json").read_text())["objects"]
            assert len(got) == 1 and np.array_equal(coco_decode(got[0]["masks"][0]), want.masks[0][0])
    vid_out = tmp_path / "vid"
    sa2va.main(["--model", checkpoint, "--video", str(tmp_path), "--prompt", "Please segment it.", "--answer", "[SEG].",
                "--out", str(vid_out)])
    assert "overlay.mp4" in os.listdir(vid_out) and "mask_0_00000.png" in os.listdir(vid_out)
    result = json.loads((vid_out / "result.json").read_text())
    for k, obj in enumerate(result["objects"]):  # every mask of every object, as pycocotools reads it
        assert len(obj["masks"]) == 1  # the one frame (img.png) of the folder
        for t, rle in enumerate(obj["masks"]):
            png = np.asarray(Image.open(vid_out / f"mask_{k}_{t:05d}.png")) > 0
            assert np.array_equal(coco_decode(rle), png)


def test_cli_several_prompts_one_pass(checkpoint, tmp_path, capsys):
    """Repeated --prompt (and --gcg): one batch about one video; every object in result.json, the
    mask PNGs and the DAVIS palette PNGs (object k -> index k+1, the later object on top)."""
    folder = tmp_path / "clip"
    folder.mkdir()
    for t, f in enumerate(frames(3)):
        Image.fromarray(f).save(folder / f"{t}.png")
    out = tmp_path / "out"
    sa2va.main(["--model", checkpoint, "--video", str(folder), "--prompt", "Please segment it.", "--answer", "[SEG].",
                "--prompt", "And those?", "--answer", "Sure, [SEG] and [SEG].", "--gcg", "--answer", "<p>A thing</p> [SEG].",
                "--key-frames", "2", "--dtype", "fp32", "--out", str(out)])
    result = json.loads((out / "result.json").read_text())
    assert [a["text"] for a in result["answers"]] == ["[SEG].", "Sure, [SEG] and [SEG].", "<p>A thing</p> [SEG]."]
    assert result["answers"][2]["prompt"] == "<image>\n" + data.GCG_QUESTION
    assert [o["answer"] for o in result["objects"]] == [0, 1, 1, 2] and result["objects"][3]["phrase"] == "A thing"
    palette = sa2va.davis_palette()
    assert palette[3:9] == [128, 0, 0, 0, 128, 0]  # DAVIS: object 1 dark red, object 2 dark green
    assert sorted(os.listdir(out / "palette")) == ["00000.png", "00001.png", "00002.png"]
    for t in range(3):
        im = Image.open(out / "palette" / f"{t:05d}.png")
        assert im.mode == "P" and im.getpalette()[:12] == palette[:12]
        expected = np.zeros((H, W), np.uint8)
        for k, obj in enumerate(result["objects"]):
            m = np.asarray(Image.open(out / f"mask_{k}_{t:05d}.png")) > 0
            assert np.array_equal(coco_decode(obj["masks"][t]), m)
            expected[m] = k + 1
        assert np.array_equal(np.asarray(im), expected)
    # the same objects as asked alone (up to the padding's rounding in the batched LLM, as predict_batch)
    model = sa2va.Sa2VA.from_pretrained(checkpoint, dtype="fp32")
    alone = model.predict(video=str(folder), text="<image>\nAnd those?", answer="Sure, [SEG] and [SEG].", num_key_frames=2)
    for k in (1, 2):
        assert (coco_decode(result["objects"][k]["masks"][1]) == alone.masks[k - 1][1]).mean() > 0.999


def test_cli_error_leaves_no_output(checkpoint, tmp_path, capsys):
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"\x89PNG broken")
    with pytest.raises(SystemExit) as e:
        sa2va.main(["--model", checkpoint, "--image", str(bad), "--prompt", "hi", "--out", str(tmp_path / "out")])
    assert e.value.code == 2 and capsys.readouterr().err.startswith("sa2va.py: cannot decode image")
    assert sorted(os.listdir(tmp_path)) == ["bad.png"]  # no output folder, no temporary one


def test_key_frame_indices():
    assert data.key_frame_indices(3, 5, "first") == [0, 1, 2]
    assert data.key_frame_indices(100, 5, "first") == [0, 1, 2, 3, 4]
    assert data.key_frame_indices(100, 5, "uniform") == [0, 24, 49, 74, 99]  # Sa2VA-i's linspace, truncated
    assert data.key_frame_indices(3, 5, "uniform") == [0, 1, 2]
    with pytest.raises(ValueError, match="unknown key-frame mode"):
        data.key_frame_indices(10, 5, "random")


def test_bf16_runs_and_agrees_with_fp32(checkpoint, model):
    half = sa2va.Sa2VA.from_pretrained(checkpoint, dtype="bf16")
    assert half.dtype == torch.bfloat16 and half.model.grounding.sam2.no_mem_embed.dtype == torch.bfloat16
    args = dict(video=frames(3), text="<image>\nPlease segment it.", answer="Sure, [SEG].")
    a, b = model.predict(**args).masks[0], half.predict(**args).masks[0]
    assert a.shape == b.shape == (3, H, W)
    assert (a == b).mean() > 0.8  # random weights: bf16 rounding flips some pixels, not most


def test_cpu_default_dtype_follows_the_bf16_units(checkpoint, monkeypatch):
    """bf16 by default on a CPU with AMX or AVX512-BF16, fp32 without; an explicit dtype wins."""
    cpu = torch.device("cpu")
    monkeypatch.setattr(torch.cpu, "get_capabilities", lambda: {"avx512_bf16": True, "amx_bf16": False})
    assert sa2va.default_dtype(cpu) == torch.bfloat16
    assert sa2va.cpu_bf16_units() == "avx512_bf16"
    assert sa2va.Sa2VA.from_pretrained(checkpoint, device="cpu").dtype == torch.bfloat16
    assert sa2va.Sa2VA.from_pretrained(checkpoint, device="cpu", dtype="fp32").dtype == torch.float32
    monkeypatch.setattr(torch.cpu, "get_capabilities", lambda: {"avx512_bf16": False, "amx_bf16": False})
    assert sa2va.default_dtype(cpu) == torch.float32
    assert sa2va.Sa2VA.from_pretrained(checkpoint, device="cpu").dtype == torch.float32


def test_predict_batch_equals_one_by_one(model):
    a, b = frames(2)
    a2 = a[:, ::-1].copy()
    images = [a, a, b, a2]  # two requests share image a (one vision encoding, one SAM-2 pass)
    texts = ["<image>\nPlease segment the left part.", "<image>\nWhat is it?", "<image>\nPlease segment it.", "<image>\nHi"]
    answers = ["Sure, [SEG].", "It is [SEG] and [SEG].", "No mask here.", "[SEG]"]
    batch = model.predict_batch(images, texts, answers)
    for img, text, ans, got in zip(images, texts, answers, batch):
        alone = model.predict(image=img, text=text, answer=ans)
        assert got.text == alone.text and len(got.masks) == len(alone.masks)
        for m1, m2 in zip(got.masks, alone.masks):
            assert m1.shape == m2.shape == (1, H, W) and (m1 == m2).mean() > 0.999
    generated = model.predict_batch(images[:3], texts[:3], max_new_tokens=5)
    for img, text, got in zip(images, texts, generated):
        assert got.text == model.predict(image=img, text=text, max_new_tokens=5).text
    with pytest.raises(ValueError, match="predict_batch got 2 images, 3 texts"):
        model.predict_batch(images[:2], texts[:3])


def test_video_session_adds_objects_as_if_tracked_from_the_start(model):
    """Objects added after frame 5 have, from frame 6 on, the masks of tracking them from frame 0
    (same key frames, same conversation); the first object is untouched; predict() agrees."""
    video, q1, q2 = frames(12), "<image>\nPlease segment the stripes.", "And the rest?"

    def run(add_at: int):
        session = model.open_video(video, key_frames="uniform", num_key_frames=3)
        session.ask(q1, answer="Sure, [SEG].")
        if add_at == 0:
            session.ask(q2, answer="[SEG] and [SEG].")
        out = {}
        for t, masks in session.frames():
            out[t] = masks
            if t == add_at - 1:
                assert session.ask(q2, answer="[SEG] and [SEG].").masks == []
        session.close()
        return out
    late, early = run(add_at=6), run(add_at=0)
    assert [late[t].shape[0] for t in range(12)] == [1] * 6 + [3] * 6
    for t in range(12):
        want = early[t] if t >= 6 else early[t][:1]
        assert late[t].shape == want.shape == (late[t].shape[0], H, W)
        assert np.array_equal(late[t], want), t
    alone = model.predict(video=video, text=q1, answer="Sure, [SEG].", key_frames="uniform", num_key_frames=3)
    assert np.array_equal(alone.masks[0], np.stack([early[t][0] for t in range(12)]))


def test_video_session_refuses_when_closed_or_not_a_video(model):
    session = model.open_video(frames(3))
    assert [m.shape for _, m in session.frames()] == [(0, H, W)] * 3  # no objects yet: empty masks, nothing run
    session.close()
    with pytest.raises(ValueError, match="this video session is closed; open a new one"):
        session.ask("<image>\nhi", answer="x")
    with pytest.raises(ValueError, match="a video session needs a video"):
        sa2va.VideoSession(model, model.encode_media(image=frames(1)[0]))


ORIGINAL_TINY = ("configs/sam2.1/sam2.1_hiera_t.yaml", ["++model.image_size=128"])  # Hiera-T at 128 px


@pytest.fixture(scope="module")
def original_sam2(tmp_path_factory):
    """A random Meta SAM-2.1 (Hiera-T at 128 px) written as Meta ships it (.pt) and as .safetensors."""
    torch.manual_seed(0)
    model = build_sam2_video_predictor(ORIGINAL_TINY[0], device="cpu", hydra_overrides_extra=ORIGINAL_TINY[1])
    state = {k: v.clone() for k, v in model.state_dict().items()}
    for k, v in state.items():  # the init leaves some tables at zero; any weights will do
        if v.dtype.is_floating_point and not v.any():
            v.normal_(0, 0.02)
    root = tmp_path_factory.mktemp("sam21")
    torch.save({"model": state}, root / "sam2.1_hiera_tiny.pt")
    save_file(state, str(root / "sam2.1_hiera_tiny.safetensors"))
    return root


def test_original_sam2_propagation_equals_sam2s_own_tracking(checkpoint, model, original_sam2, tmp_path):
    """Sa2VA-i's path: key frames decoded by the fine-tuned decoder, their masks tracked by Meta's
    SAM2VideoPredictor with its own weights. Equal to that predictor run by hand (init_state on
    the JPEG folder, add_new_mask on every key frame, propagate_in_video); .pt and .safetensors alike;
    an object added later equals tracking it from the start."""
    if model.cfg.family != "internvl" or model.cfg.llm.arch != "qwen2":
        pytest.skip("the SAM-2 side is the same for every family; checked once")
    folder = tmp_path / "jpg"
    folder.mkdir()
    for t, f in enumerate(frames(7)):
        Image.fromarray(f).save(folder / f"{t:05d}.jpg", quality=95)
    text, answer = "<image>\nPlease segment both.", "[SEG] and [SEG]."
    config, overrides = ORIGINAL_TINY
    api = sa2va.Sa2VA.from_pretrained(checkpoint, dtype="fp32")
    api.load_original_sam2(str(original_sam2 / "sam2.1_hiera_tiny.pt"), config, overrides)
    got = api.predict(video=str(folder), text=text, answer=answer, key_frames="uniform", num_key_frames=3)
    conv = api.encode_media(video=str(folder), key_frames="uniform", num_key_frames=3)
    inputs, samples = api.build_inputs([conv], [text], [answer])
    (_, prompts), = api.run_llm(inputs, samples, [conv], None)
    key_masks = sa2va.VideoSession(api, conv)._key_frame_masks(prompts)
    assert sorted(key_masks) == [0, 3, 6]
    ref = build_sam2_video_predictor(config, str(original_sam2 / "sam2.1_hiera_tiny.pt"), device="cpu",
                                     hydra_overrides_extra=overrides)
    state = ref.init_state(str(folder))
    for t, masks in key_masks.items():
        for k, m in enumerate(masks):
            ref.add_new_mask(state, t, k, m)
    want = {t: (m[:, 0] > 0).numpy() for t, _, m in ref.propagate_in_video(state)}
    assert sorted(want) == list(range(7))
    for k in range(2):
        got_k = got.masks[k]
        want_k = np.stack([want[t][k] for t in range(7)])
        assert (got_k == want_k).mean() > 0.999 and 0 < want_k.sum() < want_k.size, k  # JPEG loader rounding only
    api.load_original_sam2(str(original_sam2 / "sam2.1_hiera_tiny.safetensors"), config, overrides)
    again = api.predict(video=str(folder), text=text, answer=answer, key_frames="uniform", num_key_frames=3)
    assert all(np.array_equal(a, b) for a, b in zip(got.masks, again.masks))
    session = api.open_video(str(folder), key_frames="uniform", num_key_frames=3)
    session.ask(text, answer="[SEG].")
    late = {}
    for t, masks in session.frames():
        late[t] = masks
        if t == 3:
            session.ask("And the other?", answer="[SEG].")
    early = api.open_video(str(folder), key_frames="uniform", num_key_frames=3)
    early.ask(text, answer="[SEG].")
    early.ask("And the other?", answer="[SEG].")
    for t, masks in early.frames():
        assert np.array_equal(late[t], masks if t > 3 else masks[:1]), t
    with pytest.raises(ValueError, match="these weights are not a SAM-2 of configs/sam2.1/sam2.1_hiera_l.yaml"):
        api.load_original_sam2(str(original_sam2 / "sam2.1_hiera_tiny.pt"))
    with pytest.raises(ValueError, match="original SAM-2 checkpoint .*missing.pt is not a file"):
        api.load_original_sam2(str(tmp_path / "missing.pt"))


@pytest.mark.slow
def test_video_session_memory_is_flat_over_2000_frames(tmp_path):
    """2,000 frames of a video file streamed through a session: SAM-2's memory holds a bounded
    number of frames, the video keeps only its key frames, and the process's memory stops growing."""
    root = tmp_path / "m"
    debug_checkpoint(root / "official", "internvl")
    convert.convert(str(root / "official"), str(root / "ours"))
    model = sa2va.Sa2VA.from_pretrained(str(root / "ours"), dtype="fp32")
    path = str(tmp_path / "long.mp4")
    rng = np.random.default_rng(0)
    with av.open(path, "w") as c:
        stream = c.add_stream("libx264", rate=25)
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
        for _ in range(2000):
            for packet in stream.encode(av.VideoFrame.from_ndarray(rng.integers(0, 255, (48, 64, 3), dtype=np.uint8))):
                c.mux(packet)
        for packet in stream.encode():
            c.mux(packet)
    session = model.open_video(path)
    session.ask("<image>\nPlease segment it.", answer="[SEG] and [SEG].")
    rss, held = {}, []
    for t, masks in session.frames():
        assert masks.shape == (2, 48, 64)
        if t % 100 == 99:
            rss[t] = _rss_mb()
            mem = session._memory
            held.append((len(mem.cond), len(mem.recent), sum(r.maskmem is not None for r in mem.recent.values()),
                         len(session.history.video._kept)))
    assert set(held[1:]) == {(5, 15, 6, 5)}  # 5 key frames; 15 recent pointers, 6 of them with spatial memory
    assert rss[1999] - rss[299] < 25, rss  # MB; a leak of one mask memory a frame would be ~3 MB here, a frame ~9


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def test_predict_batch_videos_in_one_sam2_pass(model, monkeypatch):
    """Videos of different lengths and an image in one batch: each request's masks equal predict()
    alone, and the objects of both videos (three) are tracked in one SAM-2 pass."""
    va, vb = frames(7), [f[::-1].copy() for f in frames(9)]
    videos = [va, vb, None, va]
    images = [None, None, frames(1)[0], None]
    texts = ["<image>\nPlease segment it.", "<image>\nWhat moves?", "<image>\nPlease segment it.", "<image>\nAnd that?"]
    answers = ["Sure, [SEG].", "[SEG] and [SEG].", "Sure, [SEG].", "No mask."]
    bridge = model.model.grounding
    passes = []
    condition = bridge.condition
    monkeypatch.setattr(bridge, "condition", lambda *a, **k: passes.append(len(a[1])) or condition(*a, **k))
    batch = model.predict_batch(images, texts, answers, videos=videos)
    assert passes == ([3] if model.cfg.video_memory else [])
    monkeypatch.setattr(bridge, "condition", condition)
    for img, vid, text, ans, got in zip(images, videos, texts, answers, batch):
        alone = model.predict(image=img, video=vid, text=text, answer=ans)
        assert got.text == alone.text and len(got.masks) == len(alone.masks)
        for m1, m2 in zip(got.masks, alone.masks):
            assert m1.shape == m2.shape and (m1 == m2).mean() > 0.999
    assert [m.shape[0] for m in batch[1].masks] == [9, 9] and batch[0].masks[0].shape[0] == 7


def test_internlm2_checkpoint_with_only_a_sentencepiece_tokenizer(tmp_path):
    """Sa2VA-8B/26B ship tokenizer.model alone: convert turns it into tokenizer.json and predict runs."""
    tok_dir = write_internlm2_folder(tmp_path / "tok", train_sentencepiece(tmp_path / "sp", *SP_VARIANTS["sp_defaults"]))
    tok = load_official_tokenizer(str(tok_dir))
    cfg = debug_config("internvl", "internlm2", vocab_size=len(tok), image_token_id=tok.token_to_id("<IMG_CONTEXT>"),
                       seg_token_id=tok.token_to_id("[SEG]"))
    official = tmp_path / "official"
    write_official_checkpoint(str(official), cfg)
    for name in ("tokenizer.json", "tokenizer_config.json", "added_tokens.json", "special_tokens_map.json"):
        os.remove(official / name)
    for name in os.listdir(tok_dir):
        (official / name).write_bytes((tok_dir / name).read_bytes())
    convert.convert(str(official), str(tmp_path / "ours"))
    model = sa2va.Sa2VA.from_pretrained(str(tmp_path / "ours"))
    assert model.tok.bos_id == 1 and model.tok.token_to_id("<|im_end|>") in model.eos_ids
    out = model.predict(image=frames(1)[0], text="<image>\nPlease segment the dog.", answer="Sure, [SEG].")
    # transformers 4.x slow decoding joins added tokens with spaces; the official output reads so too.
    assert out.masks[0].shape == (1, H, W) and out.text == "Sure, [SEG] ."


def test_gcg_phrases():
    text = "<p> A man </p> [SEG] rides <p>a horse</p>[SEG] near <p>trees</p> and [SEG]."
    assert sa2va.gcg_phrases(text, 3) == ["A man", "a horse", ""]
    assert sa2va.gcg_phrases(text, 2) == ["A man", "a horse"]  # a trailing [SEG] that got no mask


def test_cli_never_overwrites_a_folder_with_content(checkpoint, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    with pytest.raises(SystemExit) as e:
        sa2va.main(["--model", checkpoint, "--video", str(tmp_path), "--prompt", "hi", "--out", str(out)])
    assert e.value.code == 2 and "already exists and is not an empty folder" in capsys.readouterr().err
    assert (out / "notes.txt").read_text() == "keep me"


def _postprocess(model, logits, size):
    W_, H_ = size
    return model.model.grounding.postprocess(logits, (H_, W_)).numpy()


@torch.no_grad()
def test_forward_equals_teacher_forced_predict(model):
    """The training-style path (processor samples, a right-padded batch, Sa2VAModel.forward with
    mask queries, SAM-2 decoded per frame without memory) gives the masks predict(answer=...)
    gives: for the images, and for a video's key frames (decoded memory-less in both)."""
    proc, (a, b) = model.processor, [Image.fromarray(f) for f in frames(2)]
    clip = [Image.fromarray(f) for f in frames(6)]
    requests = [(dict(image=a), "<image>\nPlease segment the left part.", "Sure, [SEG]."),
                (dict(image=b), "<image>\nSegment both.", "<p>one</p> [SEG] and <p>two</p> [SEG]."),
                (dict(frames=clip[:5]), "<image>\nPlease segment it in the video.", "It is [SEG].")]
    samples = [proc([(text, answer)], proc.media(**media), decode_masks=True) for media, text, answer in requests]
    inputs = data.collate(samples, pad="right")
    out = model.model(inputs)
    V = model.cfg.llm.vocab_size
    assert out.logits.shape == (*inputs.input_ids.shape, V) and out.seg_prompts.shape == (4, model.cfg.seg_dim)
    assert out.mask_logits.shape[0] == len(inputs.mask_queries) == 1 + 2 + 5
    # row by row: the same logits as each sample alone (padding and batching change nothing),
    # except where dynamic-NTK RoPE (InternLM2) is past its base length: there the base follows
    # the padded length, as in the official remote code (debug models stretch from 64 tokens).
    llm = model.cfg.llm
    stretched = llm.rope_dynamic_factor and inputs.input_ids.shape[1] > llm.max_position_embeddings
    for row, s in enumerate(samples if not stretched else []):
        alone = model.model(data.collate([s]), logits=True)
        n = len(s.input_ids)
        torch.testing.assert_close(out.logits[row, :n], alone.logits[0], atol=1e-4, rtol=1e-4)
    logits = iter(out.mask_logits)
    for (media, text, answer), s in zip(requests, samples):
        if "image" in media:
            pred = model.predict(image=media["image"], text=text, answer=answer)
            assert len(pred.masks) == s.num_seg
            for m in pred.masks:
                ours = _postprocess(model, next(logits)[None], media["image"].size)
                assert (ours == m).mean() > 0.999
        else:
            pred = model.predict(video=clip, text=text, answer=answer)
            assert pred.history.key_frames == [0, 1, 2, 3, 4]
            ours = _postprocess(model, torch.stack([next(logits) for _ in range(5)]), clip[0].size)
            assert (ours == pred.masks[0][:5]).mean() > 0.999


@torch.no_grad()
def test_generation_and_teacher_forcing_share_the_forward(model):
    """Greedy generation's per-token hidden states (cached decoding) equal the forward's on the
    same tokens fed teacher-forced, and the forward's argmax reproduces the generated tokens."""
    conv = model.encode_media(image=frames(1)[0])
    conv.vision = model.model.vision(conv.media.pixel_values, conv.media.grid_thw)
    inputs, samples = model.build_inputs([conv], ["<image>\nWhat is this?"])
    llm, gen = model.cfg.llm, GenerationConfig(max_new_tokens=6)
    if llm.rope_dynamic_factor and inputs.input_ids.shape[1] + gen.max_new_tokens > llm.max_position_embeddings:
        pytest.skip("dynamic-NTK RoPE past its base length: each cached step rotates with the base of its own "
                    "length, as the official InternLM2 code does (test_llm checks that forward against the reference)")
    embeds, deepstack, visual_mask = model.model.embed_inputs(inputs, conv.vision)
    g, = generate(model.model.llm, embeds, inputs.positions, inputs.key_mask, gen, set(),
                  prenorm_hidden=model.cfg.seg_hidden_prenorm, deepstack=deepstack, visual_mask=visual_mask)
    prompt = samples[0]
    ids = torch.cat([prompt.input_ids, torch.tensor(g.tokens[:-1])])
    if model.cfg.family == "internvl":
        positions = torch.arange(len(ids))
    else:  # text after the prompt continues from its largest position
        positions = torch.cat([prompt.positions, prompt.positions.amax() + 1 + torch.arange(len(g.tokens) - 1).expand(3, -1)], 1)
    fed = dataclasses.replace(prompt, input_ids=ids, labels=torch.full_like(ids, data.IGNORE), positions=positions)
    out = model.model(data.collate([fed]), vision=conv.vision)
    L = len(prompt.input_ids)
    assert out.logits[0, L - 1:].argmax(-1).tolist() == g.tokens
    torch.testing.assert_close(out.hidden[0, L:], g.hidden, atol=1e-4, rtol=1e-4)


def test_official_folder_loads_and_predicts_like_its_converted_copy(checkpoint, model, capsys):
    official = sa2va.Sa2VA.from_pretrained(os.path.join(os.path.dirname(checkpoint), "official"), dtype="fp32")
    assert "converting it while loading" in capsys.readouterr().err
    assert official.cfg == model.cfg
    for k, v in model.model.state_dict().items():
        assert torch.equal(official.model.state_dict()[k], v), k
    args = dict(video=frames(3), text="<image>\nPlease segment it.", answer="Sure, [SEG] and [SEG].")
    for a, b in zip(official.predict(**args).masks, model.predict(**args).masks):
        assert np.array_equal(a, b)


@pytest.mark.slow
def test_compiled_model_gives_the_same_tokens_and_masks(tmp_path):
    """compile=True (vision tower, the static-shape decoding step, SAM-2 encoder, memory attention
    and mask decoder, all through torch.compile) against eager, fp32: the same answer, the same
    masks, on an image (generated and teacher-forced) and a tracked video."""
    debug_checkpoint(tmp_path / "official", "internvl", llm="qwen2")
    eager = sa2va.Sa2VA.from_pretrained(str(tmp_path / "official"), dtype="fp32")
    compiled = sa2va.Sa2VA.from_pretrained(str(tmp_path / "official"), dtype="fp32", compile=True)
    assert compiled.decode_step is not eager.decode_step
    requests = [dict(image=frames(1)[0], text="<image>\nWhat is it?", max_new_tokens=6),
                dict(image=frames(1)[0], text="<image>\nPlease segment it.", answer="Sure, [SEG] and [SEG]."),
                dict(video=frames(7), text="<image>\nPlease segment it.", answer="Sure, [SEG] and [SEG].")]
    for args in requests:
        a, b = eager.predict(**args), compiled.predict(**args)
        assert a.text == b.text and len(a.masks) == len(b.masks)
        for m1, m2 in zip(a.masks, b.masks):
            assert np.array_equal(m1, m2)
