"""End to end on tiny random official-layout checkpoints: convert, load, predict, CLI."""
import json
import os

import av
import numpy as np
import pytest
import torch
from PIL import Image

import convert
import data
import sa2va
from debug_checkpoint import debug_checkpoint
from model.sam2_bridge import SAM2Config

H, W = 90, 130  # not square, not a multiple of anything


@pytest.fixture(scope="module", params=[("internvl", "qwen2"), ("internvl", "internlm2"), ("qwen2_5_vl", None), ("qwen3_vl", None)],
                ids=["internvl-qwen2", "internvl-internlm2", "qwen2_5_vl", "qwen3_vl"])
def checkpoint(request, tmp_path_factory):
    family, llm = request.param
    root = tmp_path_factory.mktemp(family)
    debug_checkpoint(root / "official", family, llm=llm or "qwen2", shards=2)
    convert.convert(str(root / "official"), str(root / "ours"), sam2=SAM2Config.debug())
    return str(root / "ours")


@pytest.fixture(scope="module")
def model(checkpoint):
    return sa2va.Sa2VA.from_pretrained(checkpoint)


def frames(n=8):
    yy, xx = np.mgrid[:H, :W]
    return [np.stack([(xx * 2 + 9 * t) % 256, (yy * 3) % 256, np.full_like(xx, 60 + t)], -1).astype(np.uint8) for t in range(n)]


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
    regions[1, 50:, 70:] = True
    if model.qwen:
        with pytest.raises(ValueError, match="InternVL-family"):
            model.predict(image=frames(1)[0], text="<image>\nWhat is region1?", mask_prompts=[regions], answer="x")
        return
    out = model.predict(image=frames(1)[0], text="<image>\nWhat is in region1?", mask_prompts=[regions], answer="A [SEG].")
    assert "There are 2 part regions in the picture: region1<vp>" in out.history.text
    n_ctx = out.history.text.count("<IMG_CONTEXT>")
    assert n_ctx == out.history.visual.shape[0]
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


def decode_rle(rle):
    h, w = rle["size"]
    flat = np.zeros(h * w, np.uint8)
    pos, val = 0, 0
    for c in rle["counts"]:
        flat[pos:pos + c] = val
        pos, val = pos + c, 1 - val
    return flat.reshape((w, h)).T.astype(bool)


def test_rle_round_trip():
    m = np.random.default_rng(0).random((7, 5)) > 0.5
    m[0, 0] = True
    assert np.array_equal(decode_rle(sa2va.rle_encode(m)), m)
    assert sa2va.rle_encode(m)["counts"][0] == 0  # COCO RLE starts with a run of zeros


def test_cli_writes_outputs(checkpoint, tmp_path, capsys):
    img = tmp_path / "img.png"
    Image.fromarray(frames(1)[0]).save(img)
    out = tmp_path / "out"
    sa2va.main(["--model", checkpoint, "--image", str(img), "--prompt", "Please segment it.", "--answer", "Sure, [SEG].",
                "--out", str(out)])
    assert "Sure, [SEG]." in capsys.readouterr().out
    assert sorted(os.listdir(out)) == ["mask_0.png", "overlay.png", "result.json"]
    result = json.loads((out / "result.json").read_text())
    mask = np.asarray(Image.open(out / "mask_0.png")) > 0
    assert np.array_equal(decode_rle(result["objects"][0]["masks"][0]), mask)
    vid_out = tmp_path / "vid"
    sa2va.main(["--model", checkpoint, "--video", str(tmp_path), "--prompt", "Please segment it.", "--answer", "[SEG].",
                "--out", str(vid_out)])
    assert "overlay.mp4" in os.listdir(vid_out) and "mask_0_00000.png" in os.listdir(vid_out)


def test_cli_error_leaves_no_output(checkpoint, tmp_path):
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"\x89PNG broken")
    with pytest.raises(SystemExit, match="sa2va.py: cannot decode image"):
        sa2va.main(["--model", checkpoint, "--image", str(bad), "--prompt", "hi", "--out", str(tmp_path / "out")])
    assert not (tmp_path / "out").exists()
    assert not [n for n in os.listdir(tmp_path) if n.startswith(".sa2va-")]


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


def test_internlm2_checkpoint_with_only_a_sentencepiece_tokenizer(tmp_path):
    """Sa2VA-8B/26B ship tokenizer.model alone: convert turns it into tokenizer.json and predict runs."""
    from debug_checkpoint import write_official_checkpoint
    from model.config import debug_config
    from model.tokenizer import load_official_tokenizer
    from tests.test_tokenizer import SP_VARIANTS, _train_sentencepiece, _write_internlm2_folder
    tok_dir = _write_internlm2_folder(tmp_path / "tok", _train_sentencepiece(tmp_path / "sp", *SP_VARIANTS["sp_defaults"]))
    cfg = debug_config("internvl", "internlm2", vocab_size=len(load_official_tokenizer(str(tok_dir))))
    official = tmp_path / "official"
    write_official_checkpoint(str(official), cfg)
    for name in ("tokenizer.json", "tokenizer_config.json", "added_tokens.json", "special_tokens_map.json"):
        os.remove(official / name)
    for name in os.listdir(tok_dir):
        (official / name).write_bytes((tok_dir / name).read_bytes())
    convert.convert(str(official), str(tmp_path / "ours"), sam2=SAM2Config.debug())
    model = sa2va.Sa2VA.from_pretrained(str(tmp_path / "ours"))
    assert model.tok.bos_id == 1 and model.tok.token_to_id("<|im_end|>") in model.eos_ids
    out = model.predict(image=frames(1)[0], text="<image>\nPlease segment the dog.", answer="Sure, [SEG].")
    # transformers 4.x slow decoding joins added tokens with spaces; the official output reads so too.
    assert out.masks[0].shape == (1, H, W) and out.text == "Sure, [SEG] ."


def test_gcg_phrases():
    text = "<p> A man </p> [SEG] rides <p>a horse</p>[SEG] near <p>trees</p> and [SEG]."
    assert sa2va.gcg_phrases(text, 3) == ["A man", "a horse", ""]
    assert sa2va.gcg_phrases(text, 2) == ["A man", "a horse"]  # a trailing [SEG] that got no mask


def test_cli_never_overwrites_a_folder_with_content(checkpoint, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    with pytest.raises(SystemExit, match="already exists and is not an empty folder"):
        sa2va.main(["--model", checkpoint, "--video", str(tmp_path), "--prompt", "hi", "--out", str(out)])
    assert (out / "notes.txt").read_text() == "keep me"
