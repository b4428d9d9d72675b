"""Latency breakdown of an image and a video request on a real-shape random Sa2VA model.

    python benchmarks/latency.py                                   # Sa2VA-1B, fp32 on CPU
    python benchmarks/latency.py --preset Sa2VA-Qwen3-VL-4B --parts image
    python benchmarks/latency.py --preset debug-internvl           # tiny model, seconds
    python benchmarks/latency.py --parts frames --frames-preset debug-internvl

No checkpoint: the model is built on the meta device, `to_empty` and filled with N(0, 0.02)
(norm weights 1, biases of norms 0; the buffers, i.e. SAM-2's prompt PE matrix, N(0, 1); SAM-2's
RoPE tables are plain CPU attributes that build_sam2 computes, untouched by to_empty). The
tokenizer is the debug byte-level one padded to the model's vocab, and EOS is switched off so
generation always runs the tokens asked for.
Random weights: answers and masks mean nothing, the work done is real.
Inputs are synthetic and seeded: a 448x448 image (one InternVL tile) and 320x240 frames.

Parts (--parts, comma separated):
  image   vision encode, LLM prefill, decode tokens/s (16 tokens, no EOS), SAM-2 image features
          and mask decode for 1 and 3 prompts, and the whole `predict(image=...)`.
  video   an 8-frame `predict(video=..., answer=...)` with 1 vs 3 [SEG] objects, plus the same
          request without [SEG] (MLLM only). Target at real shapes: 3 objects <= 1.3x one (image
          features once per frame, objects batched); debug models are all per-object overhead.
  frames  peak RSS of a 30- vs a 300-frame video request, each in its own process, frames read
          from files on demand; on --frames-preset (Hiera-L at 1024^2 is very slow on CPU).
time.perf_counter (CUDA synchronised). Each component is timed after one warm-up call; whole
requests run once, after those (image) or after a 2-frame SAM-2 tracking warm-up (video).
"""
import argparse
import dataclasses
import json
import os
import subprocess
import sys
import tempfile
import time

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import data  # noqa: E402
import debug_checkpoint  # noqa: E402
from model.checkpoint import build_model, parse_dtype  # noqa: E402
from model.config import preset  # noqa: E402
from model.generate import GenerationConfig  # noqa: E402
from model.tokenizer import load_official_tokenizer  # noqa: E402
from sa2va import Sa2VA  # noqa: E402

PROMPT = "<image>Please segment the red square."
ONE, THREE = "Sure, [SEG].", "Sure, [SEG], [SEG] and [SEG]."


def random_sa2va(name: str, device: torch.device, dtype: torch.dtype, seed: int = 0) -> Sa2VA:
    with tempfile.TemporaryDirectory() as tmp:
        debug_checkpoint.write_tokenizer(tmp, preset(name).family, vocab_size=preset(name).llm.vocab_size)
        tok = load_official_tokenizer(tmp)
    # the padded debug tokenizer has its own ids for the visual slot and [SEG]
    cfg = dataclasses.replace(preset(name), image_token_id=tok.token_to_id(data.image_token(preset(name).family)),
                              seg_token_id=tok.token_to_id(data.SEG))
    torch.manual_seed(seed)
    model = build_model(cfg, "meta").to_empty(device=device)
    with torch.no_grad():
        for mod in model.modules():
            is_norm = "Norm" in type(mod).__name__  # LayerNorm, RMSNorm, SAM-2's LayerNorm2d
            for pname, p in mod.named_parameters(recurse=False):
                if is_norm:
                    p.fill_(1.0 if pname == "weight" else 0.0)
                else:
                    p.normal_(0, 0.02)
        for b in model.buffers():  # to_empty leaves buffers as they were in memory (SAM-2's PE matrix: N(0, 1))
            b.normal_(0, 1)
    model = model.to(dtype).eval()
    s = Sa2VA(model, tok)
    s.eos_ids = set()  # random weights may pick <|im_end|>; decode timing needs all its tokens
    return s


def synthetic_image(seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (448, 448, 3), dtype=np.uint8)


def synthetic_frames(n: int, seed: int = 0) -> list[np.ndarray]:
    """n 320x240 frames: fixed noise background, a red square moving right."""
    bg = np.random.default_rng(seed).integers(0, 256, (240, 320, 3), dtype=np.uint8)
    frames = []
    for t in range(n):
        f = bg.copy()
        x = (20 + 3 * t) % 240
        f[90:150, x:x + 60] = (255, 0, 0)
        frames.append(f)
    return frames


def timed(fn, device: torch.device, warmup: bool = True):
    """(seconds, result) of fn(), after one untimed warm-up call."""
    if warmup:
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    out = fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t0, out


@torch.inference_mode()
def bench_image(s: Sa2VA, dev: torch.device, rows: list):
    image = data.load_image(synthetic_image())
    t_pre_vis, conv = timed(lambda: s.encode_media(image=image), dev)
    pixels = conv.media.pixel_values.to(dev, s.dtype)
    grid = None if conv.media.grid_thw is None else conv.media.grid_thw.to(dev)
    t_vis, conv.vision = timed(lambda: s.model.vision(pixels, grid), dev)
    rows.append(("image preprocessing (processor, SAM-2 resize)", t_pre_vis, ""))
    rows.append(("vision tower (ViT + projector)", t_vis, ""))
    inputs, samples = s.build_inputs([conv], [PROMPT])  # as Sa2VA.predict builds them
    n_prompt = inputs.input_ids.shape[1]

    def run(n_new):  # no stop words and no EOS: exactly n_new tokens (1 = prefill only)
        (tokens, _), = s.run_llm(inputs, samples, [conv], GenerationConfig(max_new_tokens=n_new))
        if len(tokens) != n_new:
            raise RuntimeError(f"generated {len(tokens)} tokens, asked for {n_new}")
    t_pre, _ = timed(lambda: run(1), dev)
    t_gen, _ = timed(lambda: run(17), dev)
    rows.append((f"LLM prefill ({n_prompt} tokens)", t_pre, f"{n_prompt / t_pre:.0f} tok/s"))
    rows.append(("LLM decode (16 tokens)", t_gen - t_pre, f"{16 / (t_gen - t_pre):.1f} tok/s"))

    bridge = s.model.grounding
    frames = data.sam2_frames([image], s.cfg.sam2.image_size).to(dev)
    t_feat, feats = timed(lambda: bridge.image_features(bridge.normalize(frames)), dev)
    prompts = torch.randn(3, s.cfg.seg_dim, generator=torch.Generator().manual_seed(0)).to(dev, s.dtype)
    t_dec1, _ = timed(lambda: bridge.postprocess(bridge.decode_with_prompt(feats, prompts[:1]).logits, (448, 448)), dev)
    t_dec3, _ = timed(lambda: bridge.postprocess(bridge.decode_with_prompt(feats, prompts).logits, (448, 448)), dev)
    rows.append(("SAM-2 image features (1 frame)", t_feat, ""))
    rows.append(("SAM-2 decode + postprocess, 1 object", t_dec1, ""))
    rows.append(("SAM-2 decode, per extra object", (t_dec3 - t_dec1) / 2, "from 3 objects"))
    t_all, pred = timed(lambda: s.predict(image=image, text=PROMPT, answer=ONE), dev, warmup=False)
    rows.append(("predict(image=..., answer=1 [SEG]) total", t_all, f"mask {pred.masks[0].shape}"))


@torch.inference_mode()
def bench_video(s: Sa2VA, dev: torch.device, rows: list, n_frames: int = 8):
    frames = synthetic_frames(n_frames)
    bridge = s.model.grounding
    # warm-up: one conditioning + one tracked frame
    warm = bridge.normalize(data.sam2_frames([Image.fromarray(f) for f in frames[:2]], s.cfg.sam2.image_size).to(dev))
    list(bridge.track(warm, torch.zeros(1, s.cfg.seg_dim, device=dev, dtype=s.dtype), cond_frames=[0]))
    t_mllm, _ = timed(lambda: s.predict(video=frames, text=PROMPT, answer="Sure."), dev, warmup=False)
    t1, p1 = timed(lambda: s.predict(video=frames, text=PROMPT, answer=ONE), dev, warmup=False)
    t3, p3 = timed(lambda: s.predict(video=frames, text=PROMPT, answer=THREE), dev, warmup=False)
    if len(p1.masks) != 1 or len(p3.masks) != 3 or p3.masks[0].shape != (n_frames, 240, 320):
        raise RuntimeError(f"unexpected masks: {len(p1.masks)} and {len(p3.masks)} x {p3.masks[0].shape}")
    rows.append((f"video {n_frames} frames, no [SEG] (MLLM only)", t_mllm, ""))
    rows.append((f"video {n_frames} frames, 1 object", t1, f"SAM-2 part {t1 - t_mllm:.2f} s"))
    rows.append((f"video {n_frames} frames, 3 objects", t3, f"SAM-2 part {t3 - t_mllm:.2f} s"))
    verdict = "ok" if t3 / t1 <= 1.3 else "MISSES target 1.3"
    rows.append(("ratio 3 objects / 1 object (total)", t3 / t1, f"{verdict}; SAM-2 part "
                 f"{(t3 - t_mllm) / (t1 - t_mllm):.2f}x"))


def rss_child(args):
    """Child process: one video request of args.child_frames frames read from files."""
    dev, dtype = torch.device(args.device), parse_dtype(args.dtype)
    s = random_sa2va(args.preset, dev, dtype)
    paths = sorted(os.path.join(args.frames_dir, n) for n in os.listdir(args.frames_dir))[:args.child_frames]
    with open("/proc/self/status") as f:
        before = next(int(line.split()[1]) for line in f if line.startswith("VmRSS:")) * 1024
    t0 = time.perf_counter()
    pred = s.predict(video=data.Video(paths), text=PROMPT, answer=ONE)
    elapsed = time.perf_counter() - t0
    with open("/proc/self/status") as f:
        peak = next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) * 1024
    print(json.dumps({"before": before, "peak": peak, "masks": sum(m.nbytes for m in pred.masks), "s": elapsed}))


def bench_frames(args, counts=(30, 300)):
    print(f"\nPeak RSS of one video request (1 object), model {args.frames_preset}, {args.dtype} on {args.device}:")
    print(f"{'frames':>7}{'peak RSS':>11}{'model only':>12}{'request':>10}{'masks out':>11}{'time':>9}")
    with tempfile.TemporaryDirectory() as tmp:
        for t, f in enumerate(synthetic_frames(max(counts))):
            Image.fromarray(f).save(os.path.join(tmp, f"{t:05d}.png"))
        for n in counts:
            cmd = [sys.executable, os.path.abspath(__file__), "--preset", args.frames_preset, "--device", args.device,
                   "--dtype", args.dtype, "--child-frames", str(n), "--frames-dir", tmp]
            out = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, check=True).stdout
            r = json.loads(out.strip().splitlines()[-1])
            mb = lambda x: f"{x / 2**20:.0f} MiB"  # noqa: E731
            print(f"{n:>7}{mb(r['peak']):>11}{mb(r['before']):>12}{mb(r['peak'] - r['before']):>10}"
                  f"{mb(r['masks']):>11}{r['s']:>8.1f}s", flush=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="Sa2VA-1B", help="a released preset, or debug-internvl / debug-qwen3_vl / ...")
    ap.add_argument("--frames-preset", default=None, help="model for the 30/300-frame RSS part (default: --preset)")
    ap.add_argument("--parts", default="image,video,frames", help="comma-separated subset of image,video,frames")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default=None, help="fp32 / bf16 / fp16 (default: bf16 on CUDA, fp32 otherwise)")
    ap.add_argument("--child-frames", type=int, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--frames-dir", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    args.dtype = args.dtype or ("bf16" if args.device.startswith("cuda") else "fp32")
    if args.child_frames is not None:
        return rss_child(args)
    parts = set(args.parts.split(","))
    if parts - {"image", "video", "frames"}:
        raise SystemExit(f"latency.py: unknown parts {sorted(parts - {'image', 'video', 'frames'})}")
    dev, dtype = torch.device(args.device), parse_dtype(args.dtype)
    if parts & {"image", "video"}:
        t0 = time.perf_counter()
        s = random_sa2va(args.preset, dev, dtype)
        n = sum(p.numel() for p in s.model.parameters())
        print(f"{args.preset}: {n / 1e9:.2f} B params, {args.dtype} on {args.device}, "
              f"{torch.get_num_threads()} threads (built in {time.perf_counter() - t0:.0f} s)", flush=True)
        rows = []
        if "image" in parts:
            bench_image(s, dev, rows)
        if "video" in parts:
            bench_video(s, dev, rows)
        print(f"\n{'step':<56}{'time':>10}  note")
        for what, sec, note in rows:
            print(f"{what:<56}{sec:>9.3f}{'x' if what.startswith('ratio') else 's'}  {note}")
        del s
    if "frames" in parts:
        args.frames_preset = args.frames_preset or args.preset
        bench_frames(args)


if __name__ == "__main__":
    main()
