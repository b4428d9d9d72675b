"""What the video options cost: key-frame count and Sa2VA-i's original-SAM-2 propagation,
measured side by side on a real-shape random Sa2VA (no checkpoint; see latency.py).

    python benchmarks/video_options.py                               # Sa2VA-1B, 12 frames, default dtype
    python benchmarks/video_options.py --preset debug-internvl --original-config configs/sam2.1/sam2.1_hiera_t.yaml

Each setting runs in its own process (peak memory: max RSS on CPU, max allocated on CUDA), with
one 2-object `predict(video=..., answer=...)` over the same synthetic frames:
  key frames 5 (official)   the first 5 frames condition SAM-2 and are what the MLLM sees
  key frames 10, uniform    10 evenly spaced frames (more visual tokens, more conditioning decodes)
  original SAM-2            key frames 5 decoded by the model, then Meta's SAM-2.1 video predictor
                            (random weights of --original-config) propagates their masks
Times are whole requests after a 2-frame warm-up request; the ratios are to the official setting.
"""
import argparse
import json
import os
import resource
import subprocess
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.latency import random_sa2va, synthetic_frames  # noqa: E402
from hydra import compose  # noqa: E402
from hydra.utils import instantiate  # noqa: E402
from model.checkpoint import parse_dtype  # noqa: E402
from model.sam2_bridge import ORIGINAL_SAM2_CONFIG, OriginalSAM2  # noqa: E402
from sa2va import default_dtype, resolve_device  # noqa: E402

SETTINGS = {"key5": ("key frames 5 (official)", "first", 5, False),
            "key10": ("key frames 10, uniform", "uniform", 10, False),
            "original": ("original SAM-2 propagation", "first", 5, True)}


def random_original(config: str, device, dtype) -> OriginalSAM2:
    torch.manual_seed(0)
    model = instantiate(compose(config_name=config).model, _recursive_=True)
    state = {}
    for name, v in model.state_dict().items():
        is_norm_weight = "norm" in name and name.endswith("weight")
        state[name] = torch.ones_like(v) if is_norm_weight else torch.randn_like(v) * 0.02
    return OriginalSAM2(state, config, device=device, dtype=dtype)


def child(args):
    device = resolve_device(args.device)
    dtype = parse_dtype(args.dtype) or default_dtype(device)
    label, mode, k, original = SETTINGS[args.child]
    s = random_sa2va(args.preset, device, dtype)
    if original:
        s.original_sam2 = random_original(args.original_config, device, dtype)
    frames = synthetic_frames(args.frames)

    def request(video, keys):
        return s.predict(video=video, text="<image>Please segment both.", answer="[SEG] and [SEG].",
                         key_frames=mode, num_key_frames=keys)
    request(frames[:2], 2)  # warm-up: every step once, on 2 frames
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    request(frames, k)
    if device.type == "cuda":
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() / 2**30
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB -> GiB
    print(json.dumps({"setting": args.child, "label": label, "s": time.perf_counter() - t0, "peak_gib": peak,
                      "device": str(device), "dtype": str(dtype).replace("torch.", "")}))


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="Sa2VA-1B")
    ap.add_argument("--frames", type=int, default=12)
    ap.add_argument("--original-config", default=ORIGINAL_SAM2_CONFIG)
    ap.add_argument("--device", default=None)
    ap.add_argument("--dtype", default=None)
    ap.add_argument("--child", choices=SETTINGS, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return child(args)
    rows = []
    for name in SETTINGS:
        cmd = [sys.executable, __file__, "--child", name] + sum(
            ([f"--{k.replace('_', '-')}", str(v)] for k, v in vars(args).items() if v is not None and k != "child"), [])
        out = subprocess.run(cmd, capture_output=True, text=True)
        if out.returncode:
            sys.exit(f"{name} failed:\n{out.stderr[-2000:]}")
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    base = rows[0]
    print(f"{args.preset}, {args.frames} frames, 2 objects, {base['device']} {base['dtype']}; "
          f"original SAM-2: {args.original_config}")
    print("| setting | request s | x official | peak GiB | x official |\n| --- | --- | --- | --- | --- |")
    for r in rows:
        print(f"| {r['label']} | {r['s']:.2f} | {r['s'] / base['s']:.2f} | {r['peak_gib']:.2f} | "
              f"{r['peak_gib'] / base['peak_gib']:.2f} |")


if __name__ == "__main__":
    main()
