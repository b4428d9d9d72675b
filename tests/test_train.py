"""Training: the losses and LoRA against their references, the JSONL data, and whole runs of
train.py (one process and two under torchrun on gloo, an exact resume after SIGKILL, bad data,
the final/ export)."""
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
import torch.distributed.checkpoint as dcp
import torch.nn.functional as F
from peft import LoraConfig, get_peft_model
from pycocotools import mask as mask_utils
from safetensors.torch import load_file, save_file
from transformers import Qwen2Config, Qwen2ForCausalLM

import convert
import data
import debug_checkpoint
import sa2va
from model.config import debug_config, preset
from model.lora import LoRALinear, apply_lora, lora_targets, merge_lora
from model.losses import (lm_loss, lm_loss_at, loss_positions, mask_losses, match_objects, point_sample,
                          uncertain_points)
from model.sa2va import Sa2VAModel
from model.tokenizer import load_official_tokenizer
from tests.conftest import drop_sa2va_tokens, ours_from_hf, randomize, write_box_dataset

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
V = 300


# ----------------------------------------------------------------------------- losses

def _tiny_qwen2():
    hf = Qwen2ForCausalLM(Qwen2Config(vocab_size=V, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                      num_key_value_heads=2, intermediate_size=128, rope_theta=1e6, rms_norm_eps=1e-6,
                                      tie_word_embeddings=False))
    return randomize(hf).eval()


@torch.no_grad()
def test_lm_loss_matches_transformers_qwen2():
    hf = _tiny_qwen2()
    cfg = debug_config("internvl", vocab_size=V, sam2=False).llm
    ours = ours_from_hf(hf, cfg, convert.QWEN_LLM, "lm_head.weight")
    ids = torch.randint(0, V, (2, 17))
    labels = ids.clone()
    labels[:, :9] = -100  # the prompt takes no loss
    labels[1, 14:] = -100
    ref = hf(input_ids=ids, labels=labels).loss
    h, _ = ours(ours.embed_tokens(ids), torch.arange(17)[None].expand(2, -1))
    torch.testing.assert_close(lm_loss(ours.logits(h), labels), ref, atol=1e-5, rtol=1e-5)
    # the training path: logits only where a label is predicted
    at = loss_positions(labels)
    assert int(at.sum()) == int((labels[:, 1:] != -100).sum())
    torch.testing.assert_close(lm_loss_at(ours.logits(h[at]), labels), ref, atol=1e-5, rtol=1e-5)


def _reference_mask_losses(logits, targets, seed, num_points):
    """Sa2VAModel.sample_points + mmdet CrossEntropyLoss(use_sigmoid, weight 2) + DiceLoss(naive, eps 1,
    weight 0.5), transcribed step by step (mmdet's get_uncertain_point_coords_with_randomness)."""
    gen = torch.Generator().manual_seed(seed)
    n = logits.shape[0]
    num_sampled = int(num_points * 3.0)
    coords = torch.rand(n, num_sampled, 2, generator=gen)
    point_logits = F.grid_sample(logits, 2 * coords[:, :, None] - 1, align_corners=False)[..., 0]
    uncertainty = -torch.abs(point_logits)
    k = int(0.75 * num_points)
    idx = torch.topk(uncertainty[:, 0, :], k=k, dim=1)[1] + num_sampled * torch.arange(n)[:, None]
    coords = torch.cat([coords.view(-1, 2)[idx.view(-1)].view(n, k, 2), torch.rand(n, num_points - k, 2, generator=gen)], 1)
    gt = F.grid_sample(targets[:, None].float(), 2 * coords[:, :, None] - 1, align_corners=False)[:, 0, :, 0]
    pred = F.grid_sample(logits, 2 * coords[:, :, None] - 1, align_corners=False)[:, 0, :, 0]
    bce = sum(float(F.binary_cross_entropy_with_logits(pred[i, j], gt[i, j])) for i in range(n) for j in range(num_points))
    loss_mask = 2.0 * bce / (n * num_points + 1e-4)
    dice = 0.0
    for i in range(n):
        p = pred[i].sigmoid()
        dice += 1 - (2 * float((p * gt[i]).sum()) + 1.0) / (float(p.sum()) + float(gt[i].sum()) + 1.0)
    return loss_mask, 0.5 * dice / (n + 1e-4)


def test_mask_losses_match_the_official_formulas():
    logits = torch.randn(3, 1, 16, 16) * 3
    targets = torch.rand(3, 16, 16) > 0.6
    got = mask_losses(logits, targets, torch.Generator().manual_seed(7), num_points=40)
    want = _reference_mask_losses(logits, targets, seed=7, num_points=40)
    torch.testing.assert_close(torch.stack(got), torch.tensor(want, dtype=torch.float32), atol=1e-5, rtol=1e-5)
    # the points: 75% from the most uncertain of 3x as many, then fresh uniform ones
    points = uncertain_points(logits, torch.Generator().manual_seed(0), num_points=40)
    assert points.shape == (3, 40, 2) and points.min() >= 0 and points.max() <= 1
    assert point_sample(logits, points[:, :30])[:, 0].abs().mean() < point_sample(logits, points[:, 30:])[:, 0].abs().mean()
    # no masks: zero, and still attached to the graph
    empty = torch.zeros(0, 1, 16, 16, requires_grad=True)
    loss_mask, loss_dice = mask_losses(empty, torch.zeros(0, 16, 16, dtype=torch.bool))
    assert float(loss_mask) == 0 and loss_mask.requires_grad and loss_dice.requires_grad


def test_objects_per_frame_rule():
    gen = torch.Generator().manual_seed(0)
    assert match_objects(2, 2, gen) == [0, 1, 0, 1, 0]  # fewer than 5: repeated cyclically
    assert match_objects(3, 1, gen) == [0] * 5  # counts differ: both cut to the shorter first
    many = match_objects(8, 9, gen)
    assert len(many) == 5 and len(set(many)) == 5 and max(many) < 8  # more than 5: 5 distinct, at random
    assert match_objects(0, 3, gen) == []
    assert match_objects(8, 8, torch.Generator().manual_seed(1)) == match_objects(8, 8, torch.Generator().manual_seed(1))


# ----------------------------------------------------------------------------- LoRA

def _ours_key(peft_key: str) -> str:
    # base_model.model.model.layers.0.self_attn.q_proj.lora_A.default.weight -> llm.layers.0.attn.q_proj.lora_A
    k = peft_key.removeprefix("base_model.model.model.").replace("self_attn.", "attn.")
    return "llm." + k.replace(".default.weight", "")


def test_lora_matches_peft():
    hf = _tiny_qwen2()
    cfg = debug_config("internvl", vocab_size=V, sam2=False)
    ours = Sa2VAModel(cfg)
    ours.llm.load_state_dict(ours_from_hf(hf, cfg.llm, convert.QWEN_LLM, "lm_head.weight").state_dict())
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    ref = get_peft_model(hf, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=targets, bias="none"))
    adapted = apply_lora(ours, r=4, alpha=8, dropout=0.0)
    assert len(adapted) == 2 * 7 == len(lora_targets(cfg))
    with torch.no_grad():
        for name, p in ref.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)  # peft starts B at 0; a non-zero B exercises the update
        ours_params = dict(ours.named_parameters())
        for name, p in ref.named_parameters():
            if "lora_" in name:
                ours_params[_ours_key(name)].copy_(p)
    ids = torch.randint(0, V, (2, 11))
    weight = torch.randn(2, 11, V)
    ref_logits = ref(input_ids=ids).logits
    h, _ = ours.llm(ours.llm.embed_tokens(ids), torch.arange(11)[None].expand(2, -1))
    our_logits = ours.llm.logits(h)
    torch.testing.assert_close(our_logits, ref_logits, atol=1e-5, rtol=1e-5)
    (ref_logits * weight).sum().backward()
    (our_logits * weight).sum().backward()
    for name, p in ref.named_parameters():
        if "lora_" in name:
            torch.testing.assert_close(ours_params[_ours_key(name)].grad, p.grad, atol=1e-4, rtol=1e-4)
    # merged for export: the plain model with W + (alpha / r) B A equals peft's merge_and_unload
    merged = merge_lora(ours.state_dict(), 8 / 4)
    plain = Sa2VAModel(cfg)
    plain.load_state_dict(merged, strict=True)
    with torch.no_grad():
        h, _ = plain.llm(plain.llm.embed_tokens(ids), torch.arange(11)[None].expand(2, -1))
        torch.testing.assert_close(plain.llm.logits(h), ref.merge_and_unload()(input_ids=ids).logits, atol=1e-5, rtol=1e-5)


def test_lora_targets_and_internlm2_quirks():
    cfg = preset("debug-internvl-internlm2")
    with torch.device("meta"):
        model = Sa2VAModel(cfg)
    names = apply_lora(model, 4, 8, 0.05)
    assert "llm.lm_head" in names and not any(n.startswith(("vision", "grounding")) for n in names)
    attn = model.llm.layers[0].attn
    assert attn.q_proj.lora_A is attn.k_proj.lora_A is attn.v_proj.lora_A  # one adapter input for the packed wqkv
    assert isinstance(model.llm.lm_head, LoRALinear)
    keys = set(model.state_dict())
    assert {"llm.layers.0.attn.q_proj.weight", "llm.layers.0.attn.q_proj.lora_A", "llm.layers.0.attn.q_proj.lora_B"} <= keys
    with torch.device("meta"):
        qwen = Sa2VAModel(preset("debug-qwen2_5_vl"))
    assert "llm.lm_head" not in apply_lora(qwen, 4, 8, 0.0)


# ----------------------------------------------------------------------------- data

@pytest.fixture(scope="module")
def processor(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tok")
    debug_checkpoint.write_tokenizer(str(folder), "internvl")
    return data.make_processor(preset("debug-internvl"), load_official_tokenizer(str(folder)))


def test_full_training_trains_exactly_what_takes_a_gradient(processor, tmp_path):
    """--full: every trained parameter gets a gradient from the losses (an image and a video
    sample), every frozen one would get none; AdamW then holds state for all of them, which a
    resumed run needs."""
    import train as training
    model = Sa2VAModel(preset("debug-internvl"))
    training.set_trainable(model, full=True)
    ds = data.TrainingData(write_box_dataset(tmp_path, n_images=1), processor, seed=0)
    inputs = training.complete(data.collate([ds[0, 0], ds[0, 1]], pad="right"), model.cfg)
    out = model(inputs, logits=loss_positions(inputs.labels))
    loss_mask, loss_dice = mask_losses(out.mask_logits, inputs.mask_targets, torch.Generator().manual_seed(0))
    (lm_loss_at(out.logits, inputs.labels) + loss_mask + loss_dice).backward()
    trained = {n for n, p in model.named_parameters() if p.requires_grad}
    assert {n for n, p in model.named_parameters() if p.grad is not None} == trained
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    assert any(n.startswith("grounding.sam2.memory_encoder.") for n in frozen)
    model.requires_grad_(True)  # all of them: the frozen ones do take no gradient
    model.zero_grad(set_to_none=True)
    (lm_loss_at(model(inputs, logits=loss_positions(inputs.labels)).logits, inputs.labels)
     + sum(mask_losses(model(inputs).mask_logits, inputs.mask_targets, torch.Generator().manual_seed(0)))).backward()
    assert {n for n, p in model.named_parameters() if p.grad is not None} == trained


def test_polygons_decode_as_pycocotools():
    rng = np.random.default_rng(0)
    for trial in range(200):
        h, w = (int(x) for x in rng.integers(5, 70, 2))
        k = int(rng.integers(3, 9))
        xy = np.stack([rng.uniform(-3, w + 3, k), rng.uniform(-3, h + 3, k)], 1).flatten()
        xy = (np.round(xy) if trial % 3 == 0 else xy).tolist()  # vertices on and off the pixel grid
        ref = mask_utils.decode(mask_utils.frPyObjects([xy], h, w))[..., 0].astype(bool)
        assert np.array_equal(data.polygon_mask(xy, h, w), ref), (h, w, xy)
    two = [[2, 2, 10, 2, 10, 10], [20, 20, 30, 20, 25, 28]]  # one object, two polygons: OR-ed
    ref = mask_utils.decode(mask_utils.merge(mask_utils.frPyObjects(two, 32, 40))).astype(bool)
    assert np.array_equal(data.decode_mask(two, 32, 40), ref)


def test_training_samples_from_jsonl(processor, tmp_path):
    path = write_box_dataset(tmp_path, n_images=2)
    ds = data.TrainingData(path, processor, seed=3)
    g = 4 * processor.cfg.sam2.grid
    img = ds[0, 0]
    assert img.mask_queries.tolist() == [[0, 0]] * 5  # one object, repeated to five per frame
    assert img.mask_targets.shape == (5, g, g) and img.mask_targets.dtype == torch.bool
    record = json.loads(open(path).readline())
    full = data.rle_decode(record["masks"][0])
    small = F.interpolate(torch.from_numpy(full)[None, None].float(), size=(g, g), mode="nearest")[0, 0] > 0
    assert torch.equal(img.mask_targets[0], small)
    video = ds[0, 2]
    assert video.media.pixel_values.shape[0] == 5 and video.mask_queries.shape == (25, 2)
    assert sorted({f for _, f in video.mask_queries.tolist()}) == [0, 1, 2, 3, 4]
    frames = data.sample_frames(8, np.random.default_rng([3, 0, 2]))
    assert frames == sorted(frames) and len(set(frames)) == 5  # 8 > 6 frames: five distinct
    assert len(data.sample_frames(4, np.random.default_rng(0))) == 5  # short clips draw with replacement
    for f, t in enumerate(frames):  # frame 0 has no mask: an empty target
        assert bool(video.mask_targets[5 * f].any()) == (t != 0)
    assert torch.equal(ds[0, 2].mask_queries, video.mask_queries) and ds[1, 2].media is not None  # seeded per (epoch, index)


def test_bad_records_are_skipped_with_their_reason(processor, tmp_path):
    extra = [{"image": "nope.png", "conversations": [{"from": "human", "value": "<image>"}, {"from": "gpt", "value": "x"}]},
             {"image": "img0.png", "masks": [], "conversations": [{"from": "human", "value": "<image>"},
                                                                   {"from": "gpt", "value": "[SEG] [SEG]"}]},
             {"image": "img0.png", "masks": [{"size": [3, 3], "counts": "0"}], "conversations": [
                 {"from": "human", "value": "<image>"}, {"from": "gpt", "value": "[SEG]"}]},
             {"video": ["f0.png", "f1.png"], "masks": [[None]], "conversations": [
                 {"from": "human", "value": "<image>"}, {"from": "gpt", "value": "[SEG]"}]},
             {"conversations": [{"from": "gpt", "value": "no human turn"}, {"from": "human", "value": "?"}]},
             "a string"]
    path = write_box_dataset(tmp_path, n_images=1, extra=extra)  # an image, a video, then the broken ones
    with open(path, "a") as f:
        f.write("{not json\n")
    ds = data.TrainingData(path, processor)
    got = [ds[0, i] for i in range(len(ds))]
    assert isinstance(got[0], data.Sample) and isinstance(got[1], data.Sample)
    reasons = [(s.where, s.reason) for s in got[2:]]
    assert [where for where, _ in reasons] == [f"{path} line {n}" for n in range(3, 10)]
    for (line, reason), want in zip(reasons, ["nope.png does not exist", "2 [SEG] but it gives 0 masks",
                                              "has size [3, 3] but the image is", "masks for 1 frames but the video has 2",
                                              "not a human turn then a gpt turn", "not a JSON object", "not JSON"]):
        assert want in reason, (line, reason)


# ----------------------------------------------------------------------------- runs

def train(out, data_path, *extra, procs=1, timeout=240, env=None):
    args = ["--model", "debug-internvl", "--data", data_path, "--out", str(out), "--workers", "0", "--lr", "1e-3",
            "--batch-size", "2", *extra]
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(procs)] if procs > 1 else [sys.executable]
    return subprocess.run(launcher + [os.path.join(ROOT, "train.py"), *args], capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT, env=env)


# Bit-for-bit runs need deterministic kernels: on CPU, one thread per process (torchrun's default;
# with more, FSDP2's collectives on gloo overlap the parallel reductions and can split them differently).
ONE_THREAD = dict(os.environ, OMP_NUM_THREADS="1")


def metrics(out) -> list[dict]:
    return [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]


def test_two_processes_give_the_losses_of_one(tmp_path):
    path = write_box_dataset(tmp_path / "data")
    one, two = train(tmp_path / "one", path, "--steps", "5"), train(tmp_path / "two", path, "--steps", "5", procs=2)
    assert one.returncode == 0 and two.returncode == 0, (one.stderr[-2000:], two.stderr[-2000:])
    assert "2 process(es) x 1 micro-batch(es)" in two.stderr and "1 process(es) x 2 micro-batch(es)" in one.stderr
    a, b = metrics(tmp_path / "one"), metrics(tmp_path / "two")
    assert [r["step"] for r in a] == [r["step"] for r in b] == [1, 2, 3, 4, 5]
    for ra, rb in zip(a, b):
        for key in ("loss", "loss_lm", "loss_mask", "loss_dice"):
            assert abs(ra[key] - rb[key]) < 1e-5, (ra["step"], key, ra[key], rb[key])
        assert abs(ra["grad_norm"] - rb["grad_norm"]) < 1e-5 * ra["grad_norm"]  # summed in another order


def test_resume_after_sigkill_continues_exactly(tmp_path):
    path = write_box_dataset(tmp_path / "data")
    args = ("--steps", "8", "--save-every", "2")
    whole = train(tmp_path / "whole", path, *args, env=ONE_THREAD)
    assert whole.returncode == 0, whole.stderr[-2000:]
    cmd = [sys.executable, os.path.join(ROOT, "train.py"), "--model", "debug-internvl", "--data", path, "--out",
           str(tmp_path / "cut"), "--workers", "0", "--lr", "1e-3", "--batch-size", "2", *args]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=ROOT, env=ONE_THREAD)
    checkpoint = tmp_path / "cut" / "checkpoints" / "step_00000002"
    deadline = time.time() + 120
    while not checkpoint.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL and not (tmp_path / "cut" / "final").exists()  # killed mid-run
    again = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=240, env=ONE_THREAD)
    assert again.returncode == 0 and "resuming after step" in again.stderr, again.stderr[-2000:]
    drop = ("tokens_per_s", "step_s", "peak_memory_gib")  # measurements, not results
    assert [{k: v for k, v in r.items() if k not in drop} for r in metrics(tmp_path / "cut")] == \
        [{k: v for k, v in r.items() if k not in drop} for r in metrics(tmp_path / "whole")]  # bit for bit
    assert (tmp_path / "cut" / "final" / "model.safetensors").read_bytes() == \
        (tmp_path / "whole" / "final" / "model.safetensors").read_bytes()


def resumed_from_step_2(tmp_path, path, args) -> tuple[dict, dict]:
    """The 4-step run in tmp_path/whole cut back to its step-2 checkpoint and resumed with the
    same args: (the resumed run's final weights, the uncut run's)."""
    cut = tmp_path / "cut"
    shutil.copytree(tmp_path / "whole", cut)
    shutil.rmtree(cut / "final")
    shutil.rmtree(cut / "checkpoints" / "step_00000004")
    again = train(cut, path, *args, env=ONE_THREAD)
    assert again.returncode == 0 and "resuming after step 2" in again.stderr, again.stderr[-2000:]
    return load_file(str(cut / "final" / "model.safetensors")), load_file(str(tmp_path / "whole" / "final" / "model.safetensors"))


def test_a_full_run_from_scratch_resumes_exactly(tmp_path):
    """--full on random weights: the heads that take no loss start deciding nothing (IoU head:
    the first multimask output; object score: present) and stay so; a run resumed from its
    step-2 checkpoint ends with the same final/ as the run that never stopped."""
    path = write_box_dataset(tmp_path / "data", n_images=3, video=True)
    args = ("--full", "--steps", "4", "--save-every", "2", "--keep-checkpoints", "2")
    whole = train(tmp_path / "whole", path, *args, env=ONE_THREAD)
    assert whole.returncode == 0 and "parameters trained" in whole.stderr, whole.stderr[-2000:]
    a, b = resumed_from_step_2(tmp_path, path, args)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    head = "grounding.sam2.sam_mask_decoder."
    depth = preset("debug-internvl").sam2.iou_head_depth
    assert torch.equal(a[head + f"iou_prediction_head.layers.{depth - 1}.bias"], torch.tensor([0.0, 1.0, 0.0, 0.0]))
    assert not a[head + f"iou_prediction_head.layers.{depth - 1}.weight"].any()
    assert a[head + "pred_obj_score_head.layers.2.bias"].item() > 5


def test_bad_samples_are_counted_or_fatal_with_strict(tmp_path):
    extra = [{"image": "gone.png", "conversations": [{"from": "human", "value": "<image>\nHi"}, {"from": "gpt", "value": "Ho."}]}]
    path = write_box_dataset(tmp_path / "data", n_images=3, video=False, extra=extra)
    ok = train(tmp_path / "run", path, "--steps", "2")
    assert ok.returncode == 0, ok.stderr[-2000:]
    assert sum(r["skipped"] for r in metrics(tmp_path / "run")) == 1 and "epoch 0: 1 sample(s) skipped" in ok.stderr
    report = [json.loads(line) for line in open(tmp_path / "run" / "skipped_rank0.jsonl")]
    assert report[0]["sample"].endswith("train.jsonl line 4") and "gone.png does not exist" in report[0]["reason"]
    strict = train(tmp_path / "strict", path, "--steps", "2", "--strict")
    assert strict.returncode == 2 and "line 4: image file" in strict.stderr and "--strict" in strict.stderr
    assert "Traceback" not in strict.stderr


def test_a_run_folder_resumes_only_the_same_run(tmp_path):
    path = write_box_dataset(tmp_path / "data", n_images=2, video=False)
    assert train(tmp_path / "run", path, "--steps", "1").returncode == 0
    other = train(tmp_path / "run", path, "--steps", "1", "--lora-r", "8")
    assert other.returncode == 2 and "holds a run with other settings (lora_r)" in other.stderr
    fp32 = load_file(str(tmp_path / "run" / "final" / "model.safetensors"))
    again = train(tmp_path / "run", path, "--steps", "1", "--export-dtype", "bf16")  # the finished run, exported again
    assert again.returncode == 0 and "resuming after step 1" in again.stderr, again.stderr[-2000:]
    bf16 = load_file(str(tmp_path / "run" / "final" / "model.safetensors"))
    assert bf16.keys() == fp32.keys() and all(
        (v.dtype == torch.bfloat16 and torch.equal(v, fp32[k].bfloat16())) if fp32[k].is_floating_point() else torch.equal(v, fp32[k])
        for k, v in bf16.items())
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "notes.txt").write_text("mine")
    clash = train(busy, path, "--steps", "1")
    assert clash.returncode == 2 and "not an empty folder" in clash.stderr and (busy / "notes.txt").exists()
    odd = train(tmp_path / "odd", path, "--steps", "1", "--batch-size", "3", "--micro-batch-size", "2")
    assert odd.returncode == 2 and "is not a multiple of 1 processes x --micro-batch-size 2" in odd.stderr


@pytest.mark.slow
def test_a_tiny_model_overfits_and_final_predicts_the_same_masks(tmp_path):
    """8 samples learnt by heart; final/ (LoRA merged) loads with Sa2VA.from_pretrained and
    segments them as the trained model (LoRA unmerged, from the last checkpoint) does."""
    path = write_box_dataset(tmp_path / "data", n_images=8, video=False)
    run = train(tmp_path / "run", path, "--steps", "150", "--batch-size", "4", "--lr", "2e-3", "--save-every", "150",
                "--warmup-ratio", "0.02", timeout=900)
    assert run.returncode == 0, run.stderr[-3000:]
    rows = metrics(tmp_path / "run")
    assert np.mean([r["loss_lm"] for r in rows[-10:]]) < 0.05, rows[-1]
    final = sa2va.Sa2VA.from_pretrained(str(tmp_path / "run" / "final"), dtype="fp32")
    # the trained model as it ended, adapters unmerged: the start weights plus the last checkpoint
    cfg = preset("debug-internvl")
    trained = Sa2VAModel(cfg)
    trained.load_state_dict(debug_checkpoint.random_state(cfg))
    apply_lora(trained, 128, 256, 0.05)
    checkpoint = str(sorted((tmp_path / "run" / "checkpoints").iterdir())[-1])
    saved = [k[len("model."):] for k in dcp.FileSystemReader(checkpoint).read_metadata().state_dict_metadata
             if k.startswith("model.")]
    params = trained.state_dict()  # shares the parameters' storage: dcp.load fills them in place
    dcp.load({"model": {k: params[k] for k in saved}}, checkpoint_id=checkpoint)
    unmerged = sa2va.Sa2VA(trained.eval(), final.tok)
    ious = []
    for record in map(json.loads, open(path)):
        image = str(tmp_path / "data" / record["image"])
        pred = final.predict(image=image, text=record["conversations"][0]["value"], answer="Sure, [SEG].")
        truth = data.rle_decode(record["masks"][0])
        ious.append((pred.masks[0][0] & truth).sum() / (pred.masks[0][0] | truth).sum())
        same = unmerged.predict(image=image, text=record["conversations"][0]["value"], answer="Sure, [SEG].")
        assert (same.masks[0] == pred.masks[0]).mean() > 0.999
    assert min(ious) > 0.9, ious
    assert final.predict(image=image, text=record["conversations"][0]["value"], max_new_tokens=8).text == "Sure, [SEG]."
    # bf16 (the CPU default where bf16 units exist) on a trained model: masks agree with fp32
    half = sa2va.Sa2VA.from_pretrained(str(tmp_path / "run" / "final"), dtype="bf16")
    for record in map(json.loads, open(path)):
        args = dict(image=str(tmp_path / "data" / record["image"]), text=record["conversations"][0]["value"],
                    answer="Sure, [SEG].")
        assert (half.predict(**args).masks[0] == final.predict(**args).masks[0]).mean() >= 0.995


# ----------------------------------------------------------------------------- from a base MLLM

def write_base_mllm(folder, tied: bool = False) -> tuple[str, str, dict]:
    """An InternVL base MLLM folder as OpenGVLab ships it (no SAM-2, no text_hidden_fcs, no Sa2VA
    tokens; its own template name) and Meta's SAM-2 .pt beside it, cut from a debug Sa2VA release."""
    official = debug_checkpoint.write_official_checkpoint(str(folder / "release"), preset("debug-internvl"))
    base_len = preset("debug-internvl").llm.vocab_size - 5
    base = {k: v for k, v in official.items() if not k.startswith(("grounding_encoder.", "text_hidden_fcs."))}
    for key in ("language_model.model.embed_tokens.weight", "language_model.lm_head.weight"):
        base[key] = base[key][:base_len].clone()
    if tied:
        del base["language_model.lm_head.weight"]
    (folder / "base").mkdir()
    for name in ("tokenizer.json", "tokenizer_config.json", "added_tokens.json", "special_tokens_map.json"):
        (folder / "base" / name).write_bytes((folder / "release" / name).read_bytes())
    drop_sa2va_tokens(str(folder / "base"))
    config = json.loads((folder / "release" / "config.json").read_text())
    config["template"] = "internvl2_5"  # InternVL's own conversation template, which Sa2VA does not use
    config["llm_config"].update(vocab_size=base_len, tie_word_embeddings=tied)
    (folder / "base" / "config.json").write_text(json.dumps(config))
    save_file(base, str(folder / "base" / "model.safetensors"))
    sam2 = {k[len("grounding_encoder.sam2_model."):].replace(".g_weight", ".gamma"): v
            for k, v in official.items() if k.startswith("grounding_encoder.")}
    torch.save({"model": sam2}, folder / "sam2_hiera_large.pt")
    return str(folder / "base"), str(folder / "sam2_hiera_large.pt"), base


@pytest.mark.parametrize("tied", [False, True])
def test_start_from_a_base_mllm_and_meta_sam2(tmp_path, tied):
    base_dir, sam2_path, base = write_base_mllm(tmp_path, tied)
    cfg, tok, weights = convert.read_base(base_dir, sam2_path)
    assert cfg.template == "qwen_chat" and not cfg.llm.tie_embeddings and cfg.llm.vocab_size == len(tok) == 273
    assert tok.token_to_id("[SEG]") == cfg.seg_token_id == 268 and tok.token_to_id("</vp>") == 272
    state = weights()
    model = Sa2VAModel(cfg)
    model.load_state_dict(state, strict=True)
    emb = base["language_model.model.embed_tokens.weight"]
    assert torch.equal(state["llm.embed_tokens.weight"][:268], emb)
    assert torch.allclose(state["llm.embed_tokens.weight"][268:], emb.mean(0).expand(5, -1))  # mean resizing
    head = emb if tied else base["language_model.lm_head.weight"]
    assert torch.equal(state["llm.lm_head.weight"][:268], head)  # a tied base's head starts as the embeddings
    assert torch.equal(state["grounding.sam2.memory_encoder.fuser.layers.0.gamma"],
                       torch.load(sam2_path, weights_only=True)["model"]["memory_encoder.fuser.layers.0.gamma"])
    args = ["--model", base_dir, "--data", write_box_dataset(tmp_path / "data", n_images=2, video=False), "--out",
            str(tmp_path / "run"), "--workers", "0", "--batch-size", "2", "--steps", "1"]
    cmd = [sys.executable, os.path.join(ROOT, "train.py"), *args]
    alone = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    assert alone.returncode == 2 and "train.py --sam2" in alone.stderr  # a base needs its SAM-2
    done = subprocess.run(cmd + ["--sam2", sam2_path], capture_output=True, text=True, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-2000:]
    assert sa2va.Sa2VA.from_pretrained(str(tmp_path / "run" / "final")).tok.token_to_id("[SEG]") == 268


def test_meta_sam2_checkpoints_are_read_without_unpickling_code(tmp_path):
    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {tmp_path / 'pwned'}",))
    torch.save({"model": Payload()}, tmp_path / "evil.pt")
    with pytest.raises(ValueError, match="weights_only=True"):
        convert.read_meta_sam2(str(tmp_path / "evil.pt"))
    assert not (tmp_path / "pwned").exists()
    torch.save({"model": {"a": torch.zeros(2)}, "step": 3}, tmp_path / "ok.pt")
    assert list(convert.read_meta_sam2(str(tmp_path / "ok.pt"))) == ["a"]


def test_sigterm_checkpoints_the_step_and_the_run_resumes(tmp_path):
    path = write_box_dataset(tmp_path / "data", n_images=4, video=False)
    cmd = [sys.executable, os.path.join(ROOT, "train.py"), "--model", "debug-internvl", "--data", path, "--out",
           str(tmp_path / "run"), "--workers", "1", "--batch-size", "2", "--steps", "40", "--save-every", "100"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, cwd=ROOT)
    log = tmp_path / "run" / "metrics.jsonl"
    deadline = time.time() + 120
    while (not log.exists() or not log.read_text().strip()) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGTERM)  # mid-run: between --save-every checkpoints
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err[-2000:]
    done = [int(r["step"]) for r in metrics(tmp_path / "run")]
    saved = sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir())
    assert saved == [f"step_{done[-1]:08d}"] and done[-1] < 40 and not (tmp_path / "run" / "final").exists()
    again = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=240)
    assert again.returncode == 0 and f"resuming after step {done[-1]}" in again.stderr, again.stderr[-2000:]
    assert [r["step"] for r in metrics(tmp_path / "run")] == list(range(1, 41))
    convert.to_official(str(tmp_path / "run" / "final"), str(tmp_path / "official"))  # the official layout
    assert sorted(os.listdir(tmp_path / "official")) == ["config.json", "model.safetensors"]


# ----------------------------------------------------------------------------- from scratch: the shipped model's curriculum

def test_dense_mask_losses_read_every_pixel():
    logits = torch.randn(3, 1, 16, 16) * 3
    targets = torch.rand(3, 16, 16) > 0.6
    loss_mask, loss_dice = mask_losses(logits, targets, dense=True)
    x, t = logits[:, 0], targets.float()
    torch.testing.assert_close(loss_mask, 2.0 * F.binary_cross_entropy_with_logits(x, t), atol=1e-5, rtol=1e-5)
    p = x.sigmoid()
    dice = 1 - (2 * (p * t).sum((1, 2)) + 1) / (p.sum((1, 2)) + t.sum((1, 2)) + 1)
    torch.testing.assert_close(loss_dice, 0.5 * dice.mean(), atol=1e-5, rtol=1e-5)
    assert not torch.equal(loss_mask, mask_losses(logits, targets, torch.Generator().manual_seed(0), num_points=40)[0])


def test_phrase_prompts_are_built_word_by_word():
    import train as training
    table = training.PhraseTable(8, seed=0)
    got, named = table(["red circle", "Circle  red", "red", None, "circle"])
    assert named.tolist() == [True, True, True, False, True]
    torch.testing.assert_close(got[0], got[1])  # a bag of words: order and case do not matter
    torch.testing.assert_close(got[0], (got[2] + got[4]) / 2 ** 0.5)
    assert not got[3].any()
    torch.testing.assert_close(training.PhraseTable(8, seed=0)(["red circle"])[0], got[:1])  # the same on every process


def test_text_only_samples_keep_the_frames_and_leave_out_the_visual_tokens(processor, tmp_path):
    extra = [{"image": "img0.png", "conversations": [{"from": "human", "value": "<image>\nWhat is it?"},
                                                     {"from": "gpt", "value": "A box."}]}]
    ds = data.TrainingData(write_box_dataset(tmp_path, n_images=1, extra=extra), processor, seed=0)
    image_id = processor.cfg.image_token_id
    for index in (0, 1):  # an image and a video to segment
        full, text = ds[0, index], ds[0, index, True]
        assert (full.input_ids == image_id).sum() > 0 and not (text.input_ids == image_id).any()
        assert torch.equal(full.media.sam2_frames, text.media.sam2_frames)
        assert torch.equal(full.mask_targets, text.mask_targets) and torch.equal(full.mask_queries, text.mask_queries)
        assert full.media.token_string in full.text and full.media.token_string not in text.text
    qa, qa_text = ds[0, 2], ds[0, 2, True]  # no masks: the question keeps its image
    assert torch.equal(qa.input_ids, qa_text.input_ids)
    # the inputs still run: the vision tower's rows are there, none is read
    import train as training
    model = Sa2VAModel(preset("debug-internvl"))
    out = model(training.complete(data.collate([ds[0, 0, True], qa_text]), model.cfg))
    assert out.mask_logits.shape[0] == 5


def test_phrases_follow_the_masks(processor, tmp_path):
    path = write_box_dataset(tmp_path, n_images=2, video=False)
    lines = [json.loads(line) for line in open(path)]
    lines[0]["phrases"] = ["red box"]
    lines[1]["phrases"] = ["red box", "blue box"]
    with open(path, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in lines)
    other = data.rle_encode(np.roll(data.rle_decode(lines[0]["masks"][0]), 8, axis=1))
    two = dict(lines[0], masks=lines[0]["masks"] + [other], phrases=["red box", "red box"],
               conversations=[{"from": "human", "value": "<image>\nPlease segment the red boxes."},
                              {"from": "gpt", "value": "Sure, [SEG] and [SEG]."}])
    same = dict(two, masks=lines[0]["masks"] * 2)
    with open(path, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in lines + [two, same])
    ds = data.TrainingData(path, processor, seed=0)
    assert ds[0, 0].phrases == ["red box"]
    bad = ds[0, 1]
    assert isinstance(bad, data.Skipped) and "phrases must be a list of 1" in bad.reason
    assert ds[0, 2].phrases == [None, None]  # one phrase for two objects names neither
    assert ds[0, 3].phrases == ["red box", "red box"]  # the same object twice
    import train as training
    assert training.seg_phrases([ds[0, 0], ds[0, 3]]) == ["red box"] * 3


def test_a_video_s_phrases_stay_unnamed(processor, tmp_path):
    path = write_box_dataset(tmp_path, n_images=1)
    lines = [dict(json.loads(line), phrases=["box"]) for line in open(path)]
    with open(path, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in lines)
    ds = data.TrainingData(path, processor, seed=0)
    import train as training
    assert ds[0, 1].phrases == ["box"] and training.seg_phrases([ds[0, 0], ds[0, 1]]) == ["box", None]


def test_decode_replaces_the_prompts_sam2_reads(processor, tmp_path):
    import train as training
    torch.manual_seed(0)
    model = Sa2VAModel(preset("debug-internvl")).eval()
    ds = data.TrainingData(write_box_dataset(tmp_path, n_images=2, video=False), processor, seed=0)
    inputs = training.complete(data.collate([ds[0, 0], ds[0, 1]]), model.cfg)
    with torch.no_grad():
        own = model(inputs)
        other = torch.randn_like(own.seg_prompts)
        use = torch.tensor([False, True])
        mixed = model(inputs, decode=(other, use))
        want = model.decode_masks(inputs.sam2_frames, torch.where(use[:, None], other, own.seg_prompts), inputs.mask_queries)
    torch.testing.assert_close(mixed.mask_logits, want)
    torch.testing.assert_close(mixed.seg_prompts, own.seg_prompts)
    assert not torch.allclose(mixed.mask_logits[5:], own.mask_logits[5:])
    torch.testing.assert_close(mixed.mask_logits[:5], own.mask_logits[:5])


def test_a_phrase_warmup_run_resumes_exactly(tmp_path):
    """--phrase-warmup/--phrase-distill/--text-warmup/--dense-mask-loss: the distillation is logged,
    the phrase prompts are checkpointed, and a resumed run ends as the one that never stopped."""
    path = write_box_dataset(tmp_path / "data", n_images=3, video=False)
    lines = [dict(json.loads(line), phrases=["red box"]) for line in open(path)]
    with open(path, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in lines)
    args = ("--full", "--steps", "4", "--save-every", "2", "--phrase-warmup", "3", "--phrase-distill", "1",
            "--text-warmup", "1", "--dense-mask-loss")
    whole = train(tmp_path / "whole", path, *args, env=ONE_THREAD)
    assert whole.returncode == 0, whole.stderr[-2000:]
    rows = metrics(tmp_path / "whole")
    assert all(r["loss_distill"] > 0 for r in rows)
    assert os.path.exists(tmp_path / "whole" / "checkpoints" / "step_00000002" / "phrases.pt")
    a, b = resumed_from_step_2(tmp_path, path, args)
    assert all(torch.equal(a[k], b[k]) for k in a)
    no_table = train(tmp_path / "bad", path, "--phrase-warmup", "2")
    assert no_table.returncode != 0 and "--phrase-warmup needs phrase prompts" in no_table.stderr
    assert "Traceback" not in no_table.stderr
