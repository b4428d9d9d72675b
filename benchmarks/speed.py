"""Where the time goes, and what precision and compilation buy: one run, every ratio side by side.

    python benchmarks/speed.py                           # Sa2VA-1B on this CPU (about 30 min on 2 cores)
    python benchmarks/speed.py --no-compile              # eager only: fp32 vs bf16 (about 12 min)
    python benchmarks/speed.py --preset debug-internvl   # a tiny model: a minute, numbers mean nothing
    python benchmarks/speed.py --device cuda --presets Sa2VA-1B,Sa2VA-4B   # the GPU script (< 5 min, H200)

Real-shape random weights (benchmarks/latency.py's `random_sa2va`, EOS off): the work is real,
answers and masks mean nothing. Each stage is timed as the median of --repeats calls after one
warm-up (which also compiles); whole requests once, after a warm-up request on a small input.

CPU (default): per stage -- vision tower (one 448^2 tile), LLM prefill (the one-tile prompt),
decode (16 tokens), SAM-2 image encoder (one frame), memory attention (3 objects, a full memory
bank), mask decoder (3 objects) -- eager vs compiled, fp32 vs bf16; then the two requests of
our speed targets, fp32 vs bf16 (eager): an image of 640x480 (13 InternVL tiles, one [SEG],
teacher-forced) and an 8-frame 320x240 video with 3 objects; and how far bf16 moves the outputs.

GPU (--device cuda, bf16, decoding and SAM-2 compiled): per preset, decode tokens/s at batch 1 against the HBM
roofline (bytes of weights and KV cache read per token / the device's bandwidth, measured with a
device copy), SAM-2 propagation frames/s, and time to first mask for an image and a 100-frame video.
"""
import argparse
import os
import statistics
import sys
import time

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import data  # noqa: E402
from benchmarks.latency import ONE, PROMPT, THREE, random_sa2va, synthetic_frames  # noqa: E402
from model.generate import GenerationConfig, decode_step, generate  # noqa: E402
from sa2va import Sa2VA, cpu_bf16_units  # noqa: E402

# Nominal HBM bandwidth (bytes/s) of common accelerators; others use the measured copy bandwidth.
NOMINAL_BANDWIDTH = {"H200": 4.8e12, "H100 SXM": 3.35e12, "H100 PCIe": 2.0e12, "A100-SXM4-80GB": 2.04e12,
                     "A100-SXM4-40GB": 1.555e12}


def sync(device: torch.device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def median_time(fn, device: torch.device, repeats: int) -> float:
    fn()  # warm-up (and compilation)
    times = []
    for _ in range(repeats):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def once(fn, device: torch.device):
    sync(device)
    t0 = time.perf_counter()
    out = fn()
    sync(device)
    return time.perf_counter() - t0, out


def image(w: int, h: int, seed: int = 0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


class Stages:
    """The six stages on fixed inputs, as callables of one Sa2VA."""

    def __init__(self, s: Sa2VA, n_objects: int = 3):
        self.s, dev, dt = s, s.device, s.dtype
        conv = s.encode_media(image=image(448, 448))
        self.pixels = conv.media.pixel_values.to(dev, dt)
        self.grid = None if conv.media.grid_thw is None else conv.media.grid_thw.to(dev)
        conv.vision = s.model.vision(self.pixels, self.grid)
        inputs, _ = s.build_inputs([conv], [PROMPT])
        self.embeds, _, _ = s.model.embed_inputs(inputs, conv.vision)
        self.positions = inputs.positions
        self.n_prompt = self.embeds.shape[1]
        bridge, c = s.model.grounding, s.cfg.sam2
        self.bridge = bridge
        self.frame = bridge.normalize(data.sam2_frames([image(448, 448)], c.image_size).to(dev))
        self.feats = bridge.image_features(self.frame)
        gen = torch.Generator().manual_seed(0)
        self.prompts = torch.randn(n_objects, s.cfg.seg_dim, generator=gen).to(dev, dt)
        g2, ptr_tokens = c.grid ** 2, c.max_obj_ptrs_in_encoder * (c.d_model // c.mem_dim)
        m = c.num_maskmem * g2 + ptr_tokens  # a full bank: 7 spatial memories and 16 pointers
        self.memory = (torch.randn(n_objects, m, c.mem_dim, generator=gen).to(dev, dt),
                       torch.randn(n_objects, m, c.mem_dim, generator=gen).to(dev, dt), ptr_tokens)
        self.curr = (self.feats.embed.flatten(2).transpose(1, 2), self.feats.pos.flatten(2).transpose(1, 2))

    def generate(self, n_new: int):
        return generate(self.s.model.llm, self.embeds, self.positions, None, GenerationConfig(max_new_tokens=n_new),
                        set(), step=self.s.decode_step)

    def table(self) -> dict:
        s, b = self.s, self.bridge
        return {
            "vision tower (1 tile)": lambda: s.model.vision(self.pixels, self.grid)[0],
            f"LLM prefill ({self.n_prompt} tokens)": lambda: s.model.llm(self.embeds, self.positions)[0],
            "LLM decode (16 tokens)": lambda: self.generate(17),  # the prefill is subtracted below
            "SAM-2 image encoder (1 frame)": lambda: b.image_features(self.frame).embed,
            f"memory attention ({len(self.prompts)} objects)": lambda: b.attend_memory(*self.curr, *self.memory),
            f"mask decoder ({len(self.prompts)} objects)": lambda: b.decode_with_prompt(self.feats, self.prompts).logits,
        }


def time_stages(s: Sa2VA, repeats: int) -> tuple[dict, dict]:
    """Median seconds per stage, and each stage's output (to compare variants)."""
    st = Stages(s)
    times, outs = {}, {}
    for name, fn in st.table().items():
        times[name] = median_time(fn, s.device, repeats)
        outs[name] = fn()
    prefill_and_first = median_time(lambda: st.generate(1), s.device, repeats)
    times["LLM decode (16 tokens)"] -= prefill_and_first
    outs["LLM decode (16 tokens)"] = outs["LLM decode (16 tokens)"][0].tokens
    return times, outs


def deviation(a, b) -> str:
    if isinstance(a, list):
        return "tokens equal" if a == b else f"tokens differ from #{next(i for i, (x, y) in enumerate(zip(a, b)) if x != y)}"
    a, b = a.float(), b.float()
    return f"rel. dev. {((a - b).norm() / a.norm()).item():.1e}"


def cpu_report(args):
    dev = torch.device("cpu")
    print(f"{args.preset} on this CPU: {torch.get_num_threads()} threads; bf16 matrix units: {cpu_bf16_units()}", flush=True)
    modes = ("eager", "compiled") if not args.no_compile else ("eager",)
    requests, stage_times, stage_outs = {}, {}, {}
    frames, big = synthetic_frames(8), image(640, 480)
    # One precision at a time, each built on its own (the same seed, so the same weights up to
    # rounding): requests and stages eager, then compiled in place and the stages again.
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        s = random_sa2va(args.preset, dev, dtype)
        s.model.llm.fuse_projections()
        if not args.no_requests:
            s.predict(image=image(160, 120), text=PROMPT, answer=ONE)  # warm-up
            t_img, p_img = once(lambda: s.predict(image=big, text=PROMPT, answer=ONE), dev)
            t_vid, p_vid = once(lambda: s.predict(video=frames, text=PROMPT, answer=THREE), dev)
            requests[name] = (t_img, t_vid, p_img, p_vid)
            tiles = len(p_img.history.media.pixel_values)
            print(f"  {name}: image {t_img:.1f} s, video {t_vid:.1f} s", flush=True)
        for mode in modes:
            if mode == "compiled":
                s.compile()
            t0 = time.perf_counter()
            stage_times[mode, name], stage_outs[mode, name] = time_stages(s, args.repeats)
            print(f"  stages {mode} {name}: {time.perf_counter() - t0:.0f} s", flush=True)
        s = None  # free this precision's model before the next

    print(f"\nPer stage, median of {args.repeats} (seconds; ratios > 1 mean faster):")
    header = f"{'stage':<34}{'fp32':>9}{'bf16':>9}{'fp32/bf16':>11}"
    if "compiled" in modes:
        header += f"{'fp32 comp':>11}{'bf16 comp':>11}{'eager/comp fp32':>17}{'eager/comp bf16':>17}"
    print(header)
    for stage in stage_times["eager", "fp32"]:
        e32, e16 = stage_times["eager", "fp32"][stage], stage_times["eager", "bf16"][stage]
        line = f"{stage:<34}{e32:>9.3f}{e16:>9.3f}{e32 / e16:>10.2f}x"
        if "compiled" in modes:
            c32, c16 = stage_times["compiled", "fp32"][stage], stage_times["compiled", "bf16"][stage]
            line += f"{c32:>11.3f}{c16:>11.3f}{e32 / c32:>16.2f}x{e16 / c16:>16.2f}x"
        print(line)
    print("\nOutputs, bf16 against fp32 (eager)" + (", and compiled against eager:" if "compiled" in modes else ":"))
    for stage in stage_outs["eager", "fp32"]:
        line = f"  {stage:<34}bf16: {deviation(stage_outs['eager', 'fp32'][stage], stage_outs['eager', 'bf16'][stage])}"
        if "compiled" in modes:
            line += (f";  compiled fp32: {deviation(stage_outs['eager', 'fp32'][stage], stage_outs['compiled', 'fp32'][stage])}"
                     f", bf16: {deviation(stage_outs['eager', 'bf16'][stage], stage_outs['compiled', 'bf16'][stage])}")
        print(line)
    if requests:
        (i32, v32, pi32, pv32), (i16, v16, pi16, pv16) = requests["fp32"], requests["bf16"]
        print("\nRequests (eager, once each):")
        print(f"{'request':<44}{'fp32':>9}{'bf16':>9}{'fp32/bf16':>11}")
        print(f"{f'image 640x480 ({tiles} tiles), 1 object':<44}{i32:>8.1f}s{i16:>8.1f}s{i32 / i16:>10.2f}x  (goal >= 2.5x)")
        print(f"{'video, 8 frames, 3 objects':<44}{v32:>8.1f}s{v16:>8.1f}s{v32 / v16:>10.2f}x  (goal >= 2x)")
        agree_img = np.mean([(a == b).mean() for a, b in zip(pi32.masks, pi16.masks)])
        agree_vid = np.mean([(a == b).mean() for a, b in zip(pv32.masks, pv16.masks)])
        print(f"mask pixels equal in bf16 and fp32: image {100 * agree_img:.1f}%, video {100 * agree_vid:.1f}% "
              "(random weights: logits hover near 0, so this is a floor, not the trained-model number)")


# ----------------------------------------------------------------------------- GPU

def bandwidth(device: torch.device) -> tuple[float, str]:
    """Bytes/s: the nominal figure of a known device, else a measured device-to-device copy."""
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    for key, bw in NOMINAL_BANDWIDTH.items():
        if key in name:
            return bw, f"{name}, nominal {bw / 1e12:.2f} TB/s"
    x = torch.empty(2 ** 30 // 4 if device.type == "cuda" else 2 ** 26, device=device)
    y = torch.empty_like(x)
    t = median_time(lambda: y.copy_(x), device, 5)
    bw = 2 * x.numel() * 4 / t  # a copy reads and writes every byte
    return bw, f"{name}, measured copy {bw / 1e9:.0f} GB/s"


def decode_roofline(s: Sa2VA, prompt_len: int, n_new: int, bw: float) -> str:
    """Decode tokens/s at batch 1 against bytes read per token / bandwidth."""
    llm, dev = s.model.llm, s.device
    cfg = llm.cfg
    embeds = torch.randn(1, prompt_len, cfg.dim, device=dev, dtype=s.dtype) * 0.02
    pos = torch.arange(prompt_len, device=dev)[None]
    if cfg.mrope_section:
        pos = pos[None].expand(3, -1, -1)
    run = lambda n: generate(llm, embeds, pos, None, GenerationConfig(max_new_tokens=n), set(), step=s.decode_step)  # noqa: E731
    t_prefill = median_time(lambda: run(1), dev, 3)
    t_all = median_time(lambda: run(n_new + 1), dev, 3)
    tok_s = n_new / (t_all - t_prefill)
    elt = torch.empty(0, dtype=s.dtype).element_size()
    weights = sum(p.numel() for n, p in llm.named_parameters() if not n.startswith("embed_tokens")) * elt
    weights += cfg.dim * elt  # one embedding row
    if cfg.tie_embeddings:
        weights += cfg.vocab_size * cfg.dim * elt  # the tied table is read whole as the LM head
    mean_len = prompt_len + n_new / 2
    kv = 2 * cfg.n_layers * cfg.n_kv_heads * cfg.head_dim * mean_len * elt
    roof = bw / (weights + kv)
    return (f"decode batch 1: {tok_s:.0f} tok/s; roofline {roof:.0f} tok/s ({(weights + kv) / 1e9:.2f} GB/token) "
            f"-> {100 * tok_s / roof:.0f}% (goal >= 70%)")


def gpu_report(args):
    dev = torch.device(args.device)
    bw, bw_note = bandwidth(dev)
    print(f"{bw_note}; bf16; decode step compiled into CUDA graphs, SAM-2 compiled", flush=True)
    for name in args.presets.split(","):
        t0 = time.perf_counter()
        s = random_sa2va(name, dev, torch.bfloat16)
        s.model.llm.fuse_projections()
        # what is measured here, compiled (the vision tower stays eager: its compile time is long)
        s.decode_step = torch.compile(decode_step, mode="reduce-overhead", fullgraph=True)
        s.model.grounding.compile_parts()
        print(f"\n{name}: built in {time.perf_counter() - t0:.0f} s", flush=True)
        print("  " + decode_roofline(s, prompt_len=512, n_new=128, bw=bw), flush=True)
        bridge, size = s.model.grounding, s.cfg.sam2.image_size
        frames = [Image.fromarray(f) for f in synthetic_frames(100)]
        x = bridge.normalize(data.sam2_frames(frames, size).to(dev))
        prompt = torch.randn(1, s.cfg.seg_dim, device=dev, dtype=s.dtype)
        list(bridge.track(x[:8], prompt))  # warm-up and compilation
        t, _ = once(lambda: list(bridge.track(x, prompt)), dev)
        print(f"  SAM-2 propagation, 100 frames, 1 object: {100 / t:.1f} frames/s (goal >= 40)", flush=True)
        s.predict(image=image(640, 480), text=PROMPT, answer=ONE)  # warm-up
        t_img, _ = once(lambda: s.predict(image=image(640, 480), text=PROMPT, answer=ONE), dev)
        print(f"  time to mask, image 640x480 (13 tiles): {t_img:.2f} s", flush=True)

        def first_video_mask():
            conv = s.encode_media(video=synthetic_frames(100))
            inputs, samples = s.build_inputs([conv], [PROMPT], [ONE])
            (_, prompts), = s.run_llm(inputs, samples, [conv], None)
            frame = lambda t: bridge.normalize(data.sam2_frames([conv.video.frame(t)], size).to(dev))[0]  # noqa: E731
            memory = bridge.condition(frame, prompts.to(s.dtype), cond_frames=conv.key_frames, num_frames=len(conv.video))
            return next(iter(bridge.propagate(frame, memory)))
        first_video_mask()
        t_vid, _ = once(first_video_mask, dev)
        print(f"  time to first mask, 100-frame video: {t_vid:.2f} s", flush=True)
        s = bridge = None  # free this model before the next
        torch.cuda.empty_cache()


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="Sa2VA-1B", help="the model shape on CPU (a released preset or debug-*)")
    ap.add_argument("--presets", default="Sa2VA-1B,Sa2VA-4B", help="model shapes on GPU, comma separated")
    ap.add_argument("--device", default="cpu", help="cpu (stages and requests) or cuda (roofline, frames/s)")
    ap.add_argument("--repeats", type=int, default=3, help="timed calls per stage (the median is shown)")
    ap.add_argument("--no-compile", action="store_true", help="eager only (compiling the stages takes minutes on CPU)")
    ap.add_argument("--no-requests", action="store_true", help="stages only")
    ap.add_argument("--report", choices=("cpu", "gpu"), default=None,
                    help="which report (default: gpu on cuda, else cpu); --report gpu on a CPU checks the script")
    args = ap.parse_args()
    with torch.inference_mode():
        if (args.report or ("gpu" if args.device.startswith("cuda") else "cpu")) == "gpu":
            gpu_report(args)
        else:
            cpu_report(args)


if __name__ == "__main__":
    main()
