"""Bad or odd input, as a careless or hostile user gives it: one row per case.

A user error ends the CLI with exit code 2 and one line on stderr that names the file or
argument and what to do (the API raises a ValueError with that line); cases that used to give
a silently wrong result now give the right one. Everything about --out and DST is checked
before any work, and an interrupted write leaves nothing behind.
"""
import base64
import json
import os
import re
import shutil
import subprocess
import sys
from collections import namedtuple

import numpy as np
import pytest
from PIL import Image
from safetensors.torch import load_file, save_file

import cli
import convert
import data
import sa2va
from debug_checkpoint import debug_checkpoint
from tests.conftest import H, W, drop_sa2va_tokens, frames

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
Env = namedtuple("Env", "root official ours qwen image model qwen_model")


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("bad")
    debug_checkpoint(str(root / "official"), "internvl", shards=2)
    convert.convert(str(root / "official"), str(root / "ours"))
    debug_checkpoint(str(root / "qwen-official"), "qwen2_5_vl")
    convert.convert(str(root / "qwen-official"), str(root / "qwen"))
    Image.fromarray(frames(1)[0]).save(root / "img.png")
    return Env(root, str(root / "official"), str(root / "ours"), str(root / "qwen"), str(root / "img.png"),
               sa2va.Sa2VA.from_pretrained(str(root / "ours")), sa2va.Sa2VA.from_pretrained(str(root / "qwen")))


# ----------------------------------------------------------------------------- helpers that break things

def copy(src, dst):
    shutil.copytree(src, dst)
    return str(dst)


def edit_json(path, fn):
    """Change a JSON file in place: fn edits the loaded object."""
    d = json.loads(open(path).read())
    fn(d)
    with open(path, "w") as f:
        json.dump(d, f)


def edit_tensors(folder, key_part, fn):
    """Change the first tensor whose key contains key_part, in whichever .safetensors file holds it."""
    for name in sorted(os.listdir(folder)):
        if name.endswith(".safetensors"):
            path = os.path.join(folder, name)
            sd = load_file(path)
            key = next((k for k in sd if key_part in k), None)
            if key is not None:
                sd[key] = fn(sd[key])
                save_file(sd, path)
                return
    raise KeyError(key_part)


def nan(t):
    t = t.clone()
    t.view(-1)[0] = float("nan")
    return t


def big_png(path, side=8200):
    Image.new("1", (side, side)).save(path)  # a few kB on disk, 67M pixels once decoded
    return str(path)


def frame_folder(path, sizes):
    path.mkdir()
    for t, (w, h) in enumerate(sizes):
        Image.new("RGB", (w, h), (20 * t, 0, 0)).save(path / f"{t:03d}.png")
    return str(path)


def text_file(path, text):
    path.write_text(text)
    return str(path)


def broken_frame_folder(path):
    frame_folder(path, [(40, 30)] * 2)
    (path / "001.png").write_bytes(b"\x89PNG no")
    return str(path)


def folder_with_a_file(path):
    path.mkdir()
    (path / "keep").write_text("x")
    return str(path)


def symlink(target, path):
    os.symlink(target, path)
    return str(path)


def loop(path):
    os.symlink(path, path)  # a symlink to itself
    return str(path)


# ----------------------------------------------------------------------------- the catalogue

def chat(env, tmp, *extra, model=None, image=True, prompt="Please segment it."):
    args = ["--model", model or env.ours, "--prompt", prompt, "--answer", "Sure, [SEG]."]
    return args + (["--image", env.image] if image else []) + list(extra)


def broken_ours(env, tmp, fn):
    folder = copy(env.ours, tmp / "m")
    fn(folder)
    return chat(env, tmp, model=folder)


def broken_official(env, tmp, fn):
    folder = copy(env.official, tmp / "src")
    fn(folder)
    return [folder, str(tmp / "dst")]


def truncated_png(tmp):
    path = tmp / "cut.png"
    Image.fromarray(frames(1)[0]).save(path)
    path.write_bytes(path.read_bytes()[:200])
    return str(path)


def read_only_dir(tmp):
    d = tmp / "ro"
    d.mkdir()
    d.chmod(0o555)
    return str(d / "out")


CHAT_CASES = [
    # (id, argv builder, message)
    ("no prompt", lambda e, t: ["--model", e.ours], r"--prompt is required"),
    ("image and video", lambda e, t: chat(e, t, "--video", e.image), r"give --image or --video, not both"),
    ("image missing", lambda e, t: chat(e, t, image=False) + ["--image", str(t / "no.png")], r"no.png does not exist"),
    ("image is a folder", lambda e, t: chat(e, t, image=False) + ["--image", str(t)], r"is a folder; give an image file"),
    ("image not an image", lambda e, t: chat(e, t, image=False) + ["--image", text_file(t / "x.jpg", "hello")],
     r"cannot decode image .*x.jpg"),
    ("image truncated", lambda e, t: chat(e, t, image=False) + ["--image", truncated_png(t)], r"cannot decode image .*cut.png.*damaged"),
    ("image too large", lambda e, t: chat(e, t, image=False) + ["--image", big_png(t / "big.png")], r"big.png is 8200x8200, more than"),
    ("video missing", lambda e, t: chat(e, t, image=False) + ["--video", str(t / "no.mp4")], r"video .*no.mp4 does not exist"),
    ("video not a video", lambda e, t: chat(e, t, image=False) + ["--video", text_file(t / "v.mp4", "no")],
     r"cannot decode video .*v.mp4"),
    ("video folder empty", lambda e, t: chat(e, t, image=False) + ["--video", str(t)], r"has no frames"),
    ("video frames of two sizes", lambda e, t: chat(e, t, image=False) + ["--video", frame_folder(t / "f", [(40, 30), (40, 30), (30, 40)])],
     r"frame 2 \(.*002.png\) is 30x40 but frame 0 is 40x30; give the frames of a video at one size"),
    ("video frame broken", lambda e, t: chat(e, t, image=False) + ["--video", broken_frame_folder(t / "f")],
     r"cannot decode image .*001.png"),
    ("model missing", lambda e, t: chat(e, t, model=str(t / "nothing")), r"model .*nothing is not a folder"),
    ("model is a file", lambda e, t: chat(e, t, model=e.image), r"model .*img.png is not a folder"),
    ("model without config", lambda e, t: broken_ours(e, t, lambda f: os.remove(f + "/config.json")), r"has no config.json"),
    ("model config not JSON", lambda e, t: broken_ours(e, t, lambda f: open(f + "/config.json", "w").write("{nope")),
     r"config.json is not valid JSON"),
    ("model config a list", lambda e, t: broken_ours(e, t, lambda f: open(f + "/config.json", "w").write("[1, 2]")),
     r"config has no known model family"),
    ("model config of another version", lambda e, t: broken_ours(e, t, lambda f: edit_json(f + "/config.json", lambda d: d.update(bogus=1))),
     r"does not match this version of sa2va.*re-run convert.py"),
    ("model without tokenizer", lambda e, t: broken_ours(e, t, lambda f: os.remove(f + "/tokenizer.json")),
     r"has no tokenizer.json; re-run convert.py"),
    ("model tokenizer corrupt", lambda e, t: broken_ours(e, t, lambda f: open(f + "/tokenizer.json", "w").write("{}")),
     r"tokenizer.json is not a tokenizer file"),
    ("model tokenizer meta corrupt", lambda e, t: broken_ours(e, t, lambda f: open(f + "/tokenizer_meta.json", "w").write("{}")),
     r"tokenizer_meta.json lacks or mistypes"),
    ("model weights missing", lambda e, t: broken_ours(e, t, lambda f: os.remove(f + "/model.safetensors")),
     r"model.safetensors is missing"),
    ("model weights truncated", lambda e, t: broken_ours(e, t, lambda f: open(f + "/model.safetensors", "r+b").truncate(5000)),
     r"model.safetensors is corrupt or not safetensors"),
    ("model weights a folder", lambda e, t: broken_ours(e, t, lambda f: (os.remove(f + "/model.safetensors"), os.mkdir(f + "/model.safetensors"))),
     r"model.safetensors is a folder"),
    ("model weights a symlink loop", lambda e, t: broken_ours(e, t, lambda f: (os.remove(f + "/model.safetensors"), loop(f + "/model.safetensors"))),
     r"model.safetensors cannot be opened"),
    ("model weights NaN", lambda e, t: broken_ours(e, t, lambda f: edit_tensors(f, "llm.layers.0.mlp.up_proj", nan)),
     r"1 tensor\(s\) hold NaN or inf: llm.layers.0.mlp.up_proj.weight"),
    ("model weights int32", lambda e, t: broken_ours(e, t, lambda f: edit_tensors(f, "text_hidden_fcs.0.bias", lambda x: x.int())),
     r"1 tensor\(s\) are not float tensors: text_hidden_fcs.0.bias \(int32\)"),
    ("model tokenizer of another size", lambda e, t: broken_ours(e, t, lambda f: edit_json(
        f + "/config.json", lambda d: d["llm"].update(vocab_size=d["llm"]["vocab_size"] + 3))),
     r"the model expects|tokenizer has \d+ tokens but the embedding has"),
    ("out has content", lambda e, t: chat(e, t, "--out", folder_with_a_file(t / "o")),
     r"--out .*o already exists and is not an empty folder"),
    ("out is a file", lambda e, t: chat(e, t, "--out", e.image), r"--out .*img.png already exists and is not a folder"),
    ("out parent is a file", lambda e, t: chat(e, t, "--out", e.image + "/out"), r"img.png is a file, not a folder"),
    ("out is a symlink", lambda e, t: chat(e, t, "--out", symlink(t, t / "link")), r"is a symbolic link"),
    ("out inside the model", lambda e, t: chat(e, t, "--out", e.ours + "/results"), r"--out .*results is inside"),
    pytest.param("out parent read-only", lambda e, t: chat(e, t, "--out", read_only_dir(t)), r"ro is not writable",
                 marks=pytest.mark.skipif(os.geteuid() == 0, reason="root may write anywhere")),
    ("device cuda without CUDA", lambda e, t: chat(e, t, "--device", "cuda"), r"device 'cuda' is not available here"),
    ("device unknown", lambda e, t: chat(e, t, "--device", "gpu7"), r"unknown device 'gpu7'; use cuda"),
    ("dtype unknown", lambda e, t: chat(e, t, "--dtype", "fp8"), r"unknown dtype 'fp8'"),
    ("max new tokens zero", lambda e, t: chat(e, t, "--max-new-tokens", "0"), r"max_new_tokens must be a whole number >= 1"),
    ("max new tokens negative", lambda e, t: chat(e, t, "--max-new-tokens", "-4"), r"max_new_tokens must be a whole number >= 1, got -4"),
    ("max new tokens fractional", lambda e, t: chat(e, t, "--max-new-tokens", "1.5"), r"argument --max-new-tokens: invalid int value"),
    ("point not X,Y", lambda e, t: chat(e, t, "--point", "3;4"), r"--point '3;4' is not X,Y \(2 numbers separated by commas\)"),
    ("box of three numbers", lambda e, t: chat(e, t, "--box", "1,2,3"), r"--box '1,2,3' is not X0,Y0,X1,Y1"),
    ("point on a video", lambda e, t: chat(e, t, "--point", "3,4", image=False) + ["--video", e.image],
     r"--point and --box mark regions of an image; give --image"),
    ("point outside (CLI)", lambda e, t: chat(e, t, "--point", "500,4"), r"point \(500.0, 4.0\) is outside the"),
    ("original SAM-2 on an image", lambda e, t: chat(e, t, "--sam2-original", e.image), r"--sam2-original changes video propagation; give --video"),
    ("original SAM-2 missing", lambda e, t: chat(e, t, "--sam2-original", "nope.pt", image=False) + ["--video", e.image],
     r"--sam2-original nope.pt is not a file"),
    ("original SAM-2 not a checkpoint", lambda e, t: chat(e, t, "--sam2-original", e.image, image=False) + ["--video", e.image],
     r"is not a SAM-2 checkpoint torch can read with weights_only=True"),
    ("key frame mode unknown", lambda e, t: chat(e, t, "--key-frame-mode", "random"), r"argument --key-frame-mode: invalid choice"),
    ("key frames zero", lambda e, t: chat(e, t, "--key-frames", "0"), r"--key-frames must be at least 1, got 0"),
    ("key frames not a number", lambda e, t: chat(e, t, "--key-frames", "all"), r"argument --key-frames: invalid int value"),
    ("answers and questions differ", lambda e, t: chat(e, t, "--answer", "a", "--answer", "b"),
     r"3 --answer for 1 question\(s\); give one --answer per question"),
    ("several questions, no media", lambda e, t: chat(e, t, "--prompt", "Hi.", "--answer", "Hello.", image=False),
     r"several questions are batched about one image or video; give --image or --video"),
    ("unknown flag", lambda e, t: chat(e, t, "--fast"), r"unrecognized arguments: --fast"),
    ("prompt not UTF-8", lambda e, t: chat(e, t, prompt=b"caf\xe9".decode("utf-8", "surrogateescape")),
     r"prompt is not valid UTF-8 text"),
    ("two image tags", lambda e, t: chat(e, t, prompt="<image> and <image>"), r"2 '<image>' tag\(s\)"),
    ("prompt past the context", lambda e, t: chat(e, t, prompt="a" * 40000), r"tokens but the model's context is 32768"),
]


def big_config_edit(fn):
    return lambda e, t: broken_official(e, t, lambda f: edit_json(f + "/config.json", fn))


CONVERT_CASES = [
    ("src missing", lambda e, t: [str(t / "none"), str(t / "dst")], r"none is not a folder"),
    ("dst is src", lambda e, t: [e.official, e.official], r"DST .*official is the same as"),
    ("dst links to src", lambda e, t: [e.official, symlink(e.official, t / "link")], r"DST .*link is the same as"),
    ("dst inside src", lambda e, t: [e.official, e.official + "/ours"], r"DST .*ours is inside"),
    ("dst holds another model", lambda e, t: [e.official, e.ours], r"DST .*ours already exists and is not an empty folder"),
    ("dst is a file", lambda e, t: [e.official, e.image], r"already exists and is not a folder"),
    ("dst parent is a file", lambda e, t: [e.official, e.image + "/dst"], r"img.png is a file, not a folder"),
    ("config field missing", big_config_edit(lambda d: d["llm_config"].pop("hidden_size")), r"config.json has no llm_config.hidden_size"),
    ("config field mistyped", big_config_edit(lambda d: d["llm_config"].update(hidden_size="64")),
     r"llm_config.hidden_size is '64'; expected a whole number"),
    ("config section mistyped", big_config_edit(lambda d: d.update(vision_config=[1])), r"vision_config is \[1\]; expected a JSON object"),
    ("config not an object", lambda e, t: broken_official(e, t, lambda f: open(f + "/config.json", "w").write("[1]")),
     r"config.json: the file is not a JSON object"),
    ("config not JSON", lambda e, t: broken_official(e, t, lambda f: open(f + "/config.json", "w").write("{")), r"config.json is not valid JSON"),
    ("config of another model", big_config_edit(lambda d: d.pop("llm_config")), r"unknown architecture"),
    ("index without weight_map", lambda e, t: broken_official(e, t, lambda f: edit_json(f + "/model.safetensors.index.json", lambda d: d.pop("weight_map"))),
     r"has no weight_map"),
    ("shard is a folder", lambda e, t: broken_official(e, t, lambda f: (os.remove(f + "/model-00001-of-00002.safetensors"),
                                                                        os.mkdir(f + "/model-00001-of-00002.safetensors"))),
     r"model-00001-of-00002.safetensors is a folder"),
    ("shard is a symlink loop", lambda e, t: broken_official(e, t, lambda f: (os.remove(f + "/model-00002-of-00002.safetensors"),
                                                                              loop(f + "/model-00002-of-00002.safetensors"))),
     r"model-00002-of-00002.safetensors cannot be opened"),
    ("tokenizer corrupt", lambda e, t: broken_official(e, t, lambda f: open(f + "/tokenizer.json", "w").write("[]")),
     r"tokenizer.json is not a tokenizer file"),
    ("tokenizer config corrupt", lambda e, t: broken_official(e, t, lambda f: open(f + "/tokenizer_config.json", "w").write("{,")),
     r"tokenizer_config.json is not valid JSON"),
    ("tokenizer without [SEG]", lambda e, t: broken_official(e, t, lambda f: drop_sa2va_tokens(f)), r"the tokenizer has no \[SEG\]"),
    ("tensor int32", lambda e, t: broken_official(e, t, lambda f: edit_tensors(f, "mlp1.1.bias", lambda x: x.int())),
     r"mlp1.1.bias is int32, not a float tensor"),
    ("tensor NaN", lambda e, t: broken_official(e, t, lambda f: edit_tensors(f, "language_model.model.norm", nan)),
     r"1 tensor\(s\) hold NaN or inf: language_model.model.norm.weight"),
    ("like missing", lambda e, t: [e.ours, str(t / "dst"), "--to-official", "--like", str(t / "nowhere")],
     r"--like .*nowhere is not an official Sa2VA folder"),
    ("like without to-official", lambda e, t: [e.official, str(t / "dst"), "--like", e.official], r"--like goes with --to-official"),
    ("to-official of an official folder", lambda e, t: [e.official, str(t / "dst"), "--to-official"], r"config has no known model family"),
    ("dtype unknown", lambda e, t: [e.official, str(t / "dst"), "--dtype", "int4"], r"unknown dtype 'int4'"),
]


def _run_cli(main, argv, capsys):
    with pytest.raises(SystemExit) as e:
        main(argv)
    err = capsys.readouterr().err
    return e.value.code, err


@pytest.mark.parametrize("name, build, message", CHAT_CASES, ids=[c.values[0] if hasattr(c, "values") else c[0] for c in CHAT_CASES])
def test_chat_cli_user_errors(env, tmp_path, capsys, name, build, message):
    code, err = _run_cli(sa2va.main, build(env, tmp_path), capsys)
    assert code == 2, err
    assert err.count("\n") == 1 and "Traceback" not in err and err.startswith("sa2va.py: "), err
    assert re.search(message, err), err
    assert not [n for n in os.listdir(tmp_path) if ".partial-" in n]


@pytest.mark.parametrize("name, build, message", CONVERT_CASES, ids=[c[0] for c in CONVERT_CASES])
def test_convert_cli_user_errors(env, tmp_path, capsys, name, build, message):
    argv = build(env, tmp_path)
    before = {n: os.path.getmtime(os.path.join(env.official, n)) for n in os.listdir(env.official)}
    code, err = _run_cli(convert.main, argv, capsys)
    assert code == 2, err
    assert err.count("\n") == 1 and "Traceback" not in err and err.startswith("convert.py: "), err
    assert re.search(message, err), err
    assert not (tmp_path / "dst").exists() and not [n for n in os.listdir(tmp_path) if ".partial-" in n]
    assert {n: os.path.getmtime(os.path.join(env.official, n)) for n in os.listdir(env.official)} == before  # SRC untouched


def _vp(model, regions):
    return model.predict(image=frames(1)[0], text="<image>\nWhat is region1?", mask_prompts=[regions], answer="A [SEG].")


def _pts(model, points=None, boxes=None):
    return model.predict(image=frames(1)[0], text="<image>\nWhat is region1?", points=points, boxes=boxes, answer="A.")


def _region(y0, y1, x0, x1):
    m = np.zeros((1, H, W), bool)
    m[0, y0:y1, x0:x1] = True
    return m


API_CASES = [
    ("predict_batch empty", lambda e: e.model.predict_batch([], []), r"predict_batch got no requests"),
    ("predict_batch lengths", lambda e: e.model.predict_batch([frames(1)[0]], ["a", "b"]), r"got 1 images, 2 texts"),
    ("temperature negative", lambda e: e.model.predict(text="hi", temperature=-1.0), r"temperature must be a number >= 0"),
    ("temperature NaN", lambda e: e.model.predict(text="hi", temperature=float("nan")), r"temperature must be a number >= 0 \(0 is greedy\), got nan"),
    ("top_p zero", lambda e: e.model.predict(text="hi", temperature=1.0, top_p=0.0), r"top_p must be in \(0, 1\]"),
    ("top_p above one", lambda e: e.model.predict(text="hi", top_p=1.5), r"top_p must be in \(0, 1\] \(1 keeps every token\), got 1.5"),
    ("max_new_tokens fractional", lambda e: e.model.predict(text="hi", max_new_tokens=2.5), r"max_new_tokens must be a whole number"),
    ("max_new_tokens negative", lambda e: e.model.predict(text="hi", max_new_tokens=-1), r"max_new_tokens must be a whole number"),
    ("seed not a number", lambda e: e.model.predict(text="hi", temperature=1.0, seed="x"), r"seed must be a whole number"),
    ("image 0x0", lambda e: e.model.predict(image=np.zeros((0, 0, 3), np.uint8), text="<image>hi"), r"image is empty \(0x0 pixels\)"),
    ("image float array", lambda e: e.model.predict(image=np.zeros((4, 4, 3)), text="<image>hi"), r"HxWx3 uint8, got shape \(4, 4, 3\) dtype float64"),
    ("image grey array", lambda e: e.model.predict(image=np.zeros((4, 4), np.uint8), text="<image>hi"), r"HxWx3 uint8"),
    ("image of a strange type", lambda e: e.model.predict(image=42, text="<image>hi"), r"unsupported image type int"),
    ("image and video", lambda e: e.model.predict(image=frames(1)[0], video=frames(2), text="<image>"), r"give an image or a video, not both"),
    ("history of another model", lambda e: e.qwen_model.predict(text="and?", history=e.model.predict(
        image=frames(1)[0], text="<image>hi", answer="x").history), r"history comes from a conversation with another model"),
    ("history not a conversation", lambda e: e.model.predict(text="and?", history="earlier text"), r"history must be the Conversation"),
    ("new media in a follow-up", lambda e: e.model.predict(image=frames(1)[0], text="<image>x", history=e.model.predict(
        image=frames(1)[0], text="<image>hi", answer="x").history), r"a follow-up turn reuses the conversation's image"),
    ("image tag in a follow-up", lambda e: e.model.predict(text="<image> again", history=e.model.predict(
        image=frames(1)[0], text="<image>hi", answer="x").history), r"after its first turn"),
    ("image tag without media", lambda e: e.model.predict(text="<image>\nPlease segment the dog."), r"no image or video was given"),
    ("two image tags (Qwen)", lambda e: e.qwen_model.predict(image=frames(1)[0], text="<image> vs <image>", answer="x"),
     r"2 '<image>' tag\(s\)"),
    ("two image tags (InternVL)", lambda e: e.model.predict(image=frames(1)[0], text="<image><image>", answer="x"), r"2 '<image>' tag\(s\)"),
    ("prompt not text", lambda e: e.model.predict(image=frames(1)[0], text=["<image>hi"]), r"the prompt must be text, got list"),
    ("answer empty", lambda e: e.model.predict(image=frames(1)[0], text="<image>hi", answer=""), r"an answer is empty"),
    ("vp region empty", lambda e: _vp(e.model, np.zeros((1, H, W), bool)), r"region 1 covers no cell of the 2x2 token grid"),
    ("vp region under a cell", lambda e: _vp(e.model, _region(1, 20, 1, 20)), r"region 1 covers no cell"),
    ("vp regions of the wrong size", lambda e: _vp(e.model, np.ones((1, 10, 10), bool)), r"mask_prompts are 10x10 but the image is 90x130"),
    ("vp on a Qwen model", lambda e: _vp(e.qwen_model, _region(0, 60, 0, 60)), r"need an image and an InternVL-family model"),
    ("vp on a video", lambda e: e.model.predict(video=frames(2), text="<image>", mask_prompts=[_region(0, 9, 0, 9)]),
     r"need an image and an InternVL-family model"),
    ("point outside the image", lambda e: _pts(e.model, points=[(10, 95)]), r"point \(10.0, 95.0\) is outside the 130x90 image"),
    ("point of three numbers", lambda e: _pts(e.model, points=[(1, 2, 3)]), r"a point must be 2 numbers \(x, y\) in image pixels"),
    ("point not numbers", lambda e: _pts(e.model, points=["here"]), r"a point must be 2 numbers"),
    ("point NaN", lambda e: _pts(e.model, points=[(float("nan"), 3)]), r"a point must be 2 numbers"),
    ("box empty", lambda e: _pts(e.model, boxes=[(50, 10, 20, 40)]), r"box \(50.0, 10.0, 20.0, 40.0\) is empty"),
    ("box outside the image", lambda e: _pts(e.model, boxes=[(0, 0, 200, 40)]), r"is outside the 130x90 image"),
    ("points on a Qwen model", lambda e: _pts(e.qwen_model, points=[(3, 3)]), r"need an image and an InternVL-family model"),
    ("points without media", lambda e: e.model.predict(text="hi", points=[(3, 3)], answer="x"),
     r"need an image and an InternVL-family model"),
    ("no points and no boxes", lambda e: e.model.region_masks(frames(1)[0], points=[], boxes=[]),
     r"give at least one point \(x, y\) or box"),
    ("key frames unknown", lambda e: e.model.predict(video=frames(2), text="<image>", answer="x", key_frames="random"),
     r"unknown key-frame mode 'random'"),
    ("video frames of two sizes", lambda e: e.model.predict(video=[frames(1)[0], frames(1)[0][:40]], text="<image>", answer="x"),
     r"frame 1 \(in the list\) is 130x40 but frame 0 is 130x90"),
]


@pytest.mark.parametrize("name, call, message", API_CASES, ids=[c[0] for c in API_CASES])
def test_api_user_errors(env, name, call, message):
    with pytest.raises(ValueError, match=message) as e:
        call(env)
    assert "\n" not in str(e.value)


# ----------------------------------------------------------------------------- formerly silently wrong

def test_exif_orientation_is_honoured(env, tmp_path):
    stored = np.zeros((40, 60, 3), np.uint8)  # 60 wide, 40 high as stored
    stored[:, :30] = 255  # left half white
    exif = Image.Exif()
    exif[0x0112] = 6  # shown rotated 90 degrees clockwise: 40 wide, 60 high, white on top
    Image.fromarray(stored).save(tmp_path / "photo.jpg", exif=exif, quality=100)
    loaded = np.asarray(data.load_image(str(tmp_path / "photo.jpg")))
    assert loaded.shape == (60, 40, 3) and loaded[:30].mean() > 200 and loaded[30:].mean() < 50
    pred = env.model.predict(image=str(tmp_path / "photo.jpg"), text="<image>\nPlease segment it.", answer="Sure, [SEG].")
    assert pred.masks[0].shape == (1, 60, 40) and pred.history.image.size == (40, 60)
    clip = frame_folder(tmp_path / "f", [])
    for t in range(2):
        Image.fromarray(stored).save(os.path.join(clip, f"{t}.jpg"), exif=exif)
    assert env.model.predict(video=clip, text="<image>", answer="[SEG]").masks[0].shape == (2, 60, 40)


def test_frame_folder_in_natural_order(tmp_path):
    folder = tmp_path / "clip"
    folder.mkdir()
    for t in range(12):
        Image.new("RGB", (8, 8), (t * 20, 0, 0)).save(folder / f"frame_{t}.png")
    video = data.Video(str(folder))
    assert [video.frame(t).getpixel((0, 0))[0] for t in range(12)] == [t * 20 for t in range(12)]


def test_sixteen_bit_png_keeps_its_levels(tmp_path):
    levels = (np.arange(64 * 32).reshape(32, 64) * 32).astype(np.uint16)  # 0 .. 65504
    Image.fromarray(levels).save(tmp_path / "deep.png")
    assert Image.open(tmp_path / "deep.png").mode.startswith("I")
    rgb = np.asarray(data.load_image(str(tmp_path / "deep.png")))
    assert rgb.shape == (32, 64, 3) and (rgb[..., 0] == np.round(levels / 257)).all()
    assert (rgb > 250).mean() < 0.05  # was 99% white


def test_official_nan_checkpoint_loads_nowhere(env, tmp_path):
    folder = copy(env.official, tmp_path / "src")
    edit_tensors(folder, "mlp1.3.weight", nan)
    with pytest.raises(ValueError, match=r"hold NaN or inf: mlp1.3.weight"):
        sa2va.Sa2VA.from_pretrained(folder)


# ----------------------------------------------------------------------------- bugs, signals, permissions

def test_a_real_bug_keeps_its_traceback(env, tmp_path, monkeypatch):
    def broken(*args, **kwargs):
        raise KeyError("a bug, not a user error")
    monkeypatch.setattr(sa2va.Sa2VA, "predict", broken)
    with pytest.raises(KeyError, match="a bug"):
        sa2va.main(chat(env, tmp_path))


INTERRUPT = """
import os, signal, sys
sys.path.insert(0, {root!r})
from PIL import Image
import sa2va
signal.signal(signal.SIGINT, signal.default_int_handler)  # as in a terminal, even when the tests run in the background
saved, plain = [], Image.Image.save
def save(self, *a, **k):
    plain(self, *a, **k)
    saved.append(1)
    if len(saved) == 3:  # in the middle of writing --out
        os.kill(os.getpid(), signal.{sig})
Image.Image.save = save
sa2va.main({argv!r})
"""


@pytest.mark.parametrize("sig, code", [("SIGTERM", 143), ("SIGINT", 130)])
def test_a_signal_while_writing_out_leaves_nothing(env, tmp_path, sig, code):
    clip = frame_folder(tmp_path / "clip", [(40, 30)] * 6)
    out = tmp_path / "results" / "out"
    argv = ["--model", env.ours, "--video", clip, "--prompt", "hi", "--answer", "[SEG] and [SEG]", "--out", str(out)]
    proc = subprocess.run([sys.executable, "-c", INTERRUPT.format(root=ROOT, sig=sig, argv=argv)], capture_output=True,
                          text=True, cwd=tmp_path)
    assert proc.returncode == code, proc.stderr
    assert "Traceback" not in proc.stderr
    assert not out.exists() and os.listdir(tmp_path / "results") == []  # no output, no hidden partial folder


CONVERT_INTERRUPT = """
import os, signal, sys
sys.path.insert(0, {root!r})
import convert
from model import checkpoint
plain = checkpoint.write_safetensors
def write(*a, **k):
    os.kill(os.getpid(), signal.SIGTERM)
    plain(*a, **k)
checkpoint.write_safetensors = convert.write_safetensors = write
convert.main({argv!r})
"""


def test_sigterm_while_converting_leaves_nothing(env, tmp_path):
    proc = subprocess.run([sys.executable, "-c", CONVERT_INTERRUPT.format(root=ROOT, argv=[env.official, str(tmp_path / "dst")])],
                          capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == 143, proc.stderr
    assert os.listdir(tmp_path) == []


def test_results_keep_the_users_umask(env, tmp_path, capsys):
    previous = os.umask(0o027)
    try:
        sa2va.main(chat(env, tmp_path, "--out", str(tmp_path / "out")))
        convert.main([env.official, str(tmp_path / "dst")])
    finally:
        os.umask(previous)
    capsys.readouterr()
    assert (tmp_path / "out").stat().st_mode & 0o777 == 0o750
    assert (tmp_path / "dst").stat().st_mode & 0o777 == 0o750
    assert {n for n in os.listdir(tmp_path) if n.startswith(".")} == set()


def test_check_output_folder_happens_before_any_work(env, tmp_path, monkeypatch, capsys):
    calls = []
    monkeypatch.setattr(sa2va.Sa2VA, "from_pretrained", classmethod(lambda cls, *a, **k: calls.append(1)))
    (tmp_path / "o").mkdir()
    (tmp_path / "o" / "x").write_text("x")
    with pytest.raises(SystemExit):
        sa2va.main(chat(env, tmp_path, "--out", str(tmp_path / "o")))
    assert calls == [] and "not an empty folder" in capsys.readouterr().err
    with pytest.raises(ValueError, match="is inside"):
        cli.check_output_folder(str(tmp_path / "a" / "b"), "--out", not_inside=(str(tmp_path / "a"),))
    cli.check_output_folder(str(tmp_path / "new" / "deeper"), "--out")  # missing parents are fine


def test_no_model_named_without_a_shipped_model_is_a_one_line_error(tmp_path, monkeypatch, capsys):
    """sa2va.py, eval.py and from_pretrained() use the shipped model when none is named; a
    checkout without it says so (and eval.py leaves no --out behind)."""
    import eval as evaluation
    import sa2va
    monkeypatch.setattr(sa2va, "SHIPPED_MODEL", str(tmp_path / "weights" / "sa2va-shapes"))
    image = tmp_path / "a.png"
    Image.fromarray(frames(1)[0]).save(image)
    tsv = tmp_path / "q.tsv"
    tsv.write_text("index\tquestion\tanswer\tA\tB\timage\n1\tWhich?\tA\tyes\tno\t"
                   + base64.b64encode(image.read_bytes()).decode() + "\n")
    runs = [(sa2va.main, ["--image", str(image), "--prompt", "Please segment it.", "--out", str(tmp_path / "o1")]),
            (evaluation.main, ["--benchmark", "vqa", "--data", str(tsv), "--out", str(tmp_path / "o2")])]
    for main, argv in runs:
        with pytest.raises(SystemExit) as e:
            main(argv)
        err = capsys.readouterr().err.strip()
        assert e.value.code == 2 and len(err.splitlines()) == 1, err
        assert "no model named, and this checkout has no shipped model" in err and "Traceback" not in err
    assert not (tmp_path / "o1").exists() and not (tmp_path / "o2").exists()
    with pytest.raises(ValueError, match="no shipped model"):
        sa2va.Sa2VA.from_pretrained()
    with pytest.raises(SystemExit):  # and a file that is not a TSV is named as such
        evaluation.main(["--benchmark", "vqa", "--data", str(image), "--out", str(tmp_path / "o3")])
    assert "a.png is not UTF-8 text; give a VLMEvalKit TSV" in capsys.readouterr().err
