"""Training speed and memory: train.py on random weights at real shapes, a few steps each.

    python benchmarks/train_speed.py                                        # debug-internvl, random:Sa2VA-1B
    python benchmarks/train_speed.py --models random:Sa2VA-1B,random:Sa2VA-4B --steps 6   # on a GPU

Each model runs as `python train.py --model MODEL ...` on a synthetic JSONL of 448x448 images
with one box to segment (one InternVL tile: 256 visual tokens, plus the text), batch 1, the
official LoRA (r 128) and everything train.py does (activation checkpointing, FSDP2 in one
process, the export at the end). Reported: the mean over the steps after the first (warm-up)
of the step time and of tokens/s, and the process's peak memory (VmHWM on CPU, CUDA memory
allocated on GPU). On a GPU also MFU: 6 x LLM parameters x tokens/s against --peak-tflops
(the H100/H200 dense bf16 peak by default); the vision tower and SAM-2 are left out of the
FLOPs, so it errs low. A model that does not fit is reported, not fatal.
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile

import numpy as np
import torch
from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import data  # noqa: E402
from model.config import preset  # noqa: E402
from model.llm import LLM  # noqa: E402


def synthetic_data(folder: str, n: int = 8) -> str:
    rng = np.random.default_rng(0)
    lines = []
    for i in range(n):
        img = rng.integers(0, 256, (448, 448, 3), dtype=np.uint8)
        mask = np.zeros((448, 448), bool)
        y, x = rng.integers(0, 300, 2)
        mask[y:y + 120, x:x + 140] = True
        img[mask] = (220, 30, 30)
        Image.fromarray(img).save(os.path.join(folder, f"{i}.png"))
        lines.append(json.dumps({"image": f"{i}.png", "masks": [data.rle_encode(mask)], "conversations": [
            {"from": "human", "value": "<image>\nPlease segment the red box."}, {"from": "gpt", "value": "Sure, [SEG]."}]}))
    path = os.path.join(folder, "train.jsonl")
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")
    return path


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default="debug-internvl,random:Sa2VA-1B")
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--peak-tflops", type=float, default=989.0, help="the device's dense bf16 peak, for MFU")
    args = ap.parse_args()
    gpu = torch.cuda.is_available()
    print(f"{'model':<24}{'LLM params':>11}{'step':>9}{'tokens/s':>10}{'peak mem':>10}{'MFU':>7}  device: "
          f"{torch.cuda.get_device_name() if gpu else f'CPU, {torch.get_num_threads()} threads'}")
    with tempfile.TemporaryDirectory() as tmp:
        path = synthetic_data(tmp)
        for name in args.models.split(","):
            cfg = preset(name.removeprefix("random:"))
            n_llm = sum(p.numel() for p in _llm_params(cfg))
            out = os.path.join(tmp, name.replace(":", "_"))
            cmd = [sys.executable, os.path.join(ROOT, "train.py"), "--model", name, "--data", path, "--out", out,
                   "--steps", str(args.steps), "--batch-size", "1", "--save-every", str(args.steps), "--workers", "1"]
            proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
            if proc.returncode != 0:
                lines = proc.stderr.strip().splitlines()
                why = lines[-1][:120] if lines else f"killed by signal {-proc.returncode} (out of memory?)"
                print(f"{name:<24}{n_llm / 1e9:>10.2f}B  did not run: {why}")
                continue
            rows = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))][1:] or \
                [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]
            step = np.mean([r["step_s"] for r in rows])
            tokens = np.mean([r["tokens_per_s"] for r in rows])
            peak = max(r["peak_memory_gib"] or 0 for r in rows)
            mfu = f"{6 * n_llm * tokens / (args.peak_tflops * 1e12):.1%}" if gpu else "-"
            print(f"{name:<24}{n_llm / 1e9:>10.2f}B{step:>8.2f}s{tokens:>10.0f}{peak:>8.1f}GiB{mfu:>7}", flush=True)


def _llm_params(cfg):
    with torch.device("meta"):
        return list(LLM(cfg.llm).parameters())


if __name__ == "__main__":
    main()
