"""Peak memory of converting and loading a real-shape Sa2VA checkpoint, against its size on disk.

    python benchmarks/memory.py                          # Sa2VA-1B, temp dir deleted at the end
    python benchmarks/memory.py --preset Sa2VA-4B --workdir /tmp/mem --keep

Writes an official-layout folder with random weights one tensor at a time (never the whole
model): two shards + model.safetensors.index.json, `vision_model.*` in bf16 and the rest in fp32
as the release (`convert_to_hf` saves without a global cast), config.json and a tokenizer padded to the real vocab. Then
each step runs in a fresh Python process that reports its own VmHWM (peak RSS). Not ru_maxrss:
Linux carries the forking parent's high-water mark across exec, so a child of this (large)
process would report at least the parent's peak. A thread in the child samples
/proc/self/status to split the peak into anonymous memory (tensors we own) and file-backed
pages (the naive reference's safetensors >= 0.4 returns zero-copy views of a whole-file mmap:
the pages count in RSS once touched and stay while the file is open; convert.py and load_model
read with pread instead, so only the tensors they keep count); it samples every few ms, so those
two columns are approximate. The load steps touch every tensor, as a first forward pass would.
Needs ~3x the checkpoint size on disk (Sa2VA-1B: ~12 GB) and no network.
"""
import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import convert  # noqa: E402
import debug_checkpoint  # noqa: E402
from model.checkpoint import write_safetensors  # noqa: E402
from model.config import preset  # noqa: E402

GB = 1e9

# Each step is the literal code a child runs; SRC, OUT, OUT_BF16 are folders.
STEPS = {
    "import torch (baseline)": "import torch",
    "import convert (imports)": "import convert, model.checkpoint",
    "convert": "import convert; convert.convert(SRC, OUT)",
    "convert dtype=bf16": "import convert, torch; convert.convert(SRC, OUT_BF16, dtype=torch.bfloat16)",
    "load_model (ours)": "from model.checkpoint import load_model; sd = load_model(OUT).state_dict()",
    # what Sa2VA.from_pretrained does with an official folder: convert while streaming, nothing written
    "load_official (official)": "import convert; model, tok = convert.load_official(SRC); sd = model.state_dict()",
    # what Sa2VA.from_pretrained does on CPU: fp32, so the bf16 ViT is copied
    "load_model dtype=fp32": "from model.checkpoint import load_model; import torch\n"
                             "sd = load_model(OUT, dtype=torch.float32).state_dict()",
    "naive load_file (official)": (
        "import glob; from safetensors.torch import load_file\n"
        "sd = {}\n"
        "for p in sorted(glob.glob(SRC + '/*.safetensors')): sd.update(load_file(p))"),
}
TOUCH = "\nfor t in sd.values(): t.sum()"  # page in every weight, as a first forward would

CHILD = r"""
import json, sys, threading, time
sys.path.insert(0, {root!r})
SRC, OUT, OUT_BF16 = {src!r}, {out!r}, {out_bf16!r}
peak = {{"anon": 0, "file": 0}}
stop = False

def sample():
    while not stop:
        with open("/proc/self/status") as f:
            kb = {{k: int(v.split()[0]) for k, v in (line.split(":", 1) for line in f) if k in ("RssAnon", "RssFile")}}
        peak["anon"] = max(peak["anon"], kb["RssAnon"] * 1024)
        peak["file"] = max(peak["file"], kb["RssFile"] * 1024)
        time.sleep(0.002)

thread = threading.Thread(target=sample, daemon=True)
thread.start()
exec({code!r})
stop = True
thread.join()
with open("/proc/self/status") as f:
    peak["peak"] = next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) * 1024
print("PEAK " + json.dumps(peak))
"""


def measure(code: str, src: str, out: str, out_bf16: str) -> dict:
    """Run `code` in a fresh interpreter; its peak RSS and the sampled anon / file-backed maxima."""
    prog = CHILD.format(root=ROOT, src=src, out=out, out_bf16=out_bf16, code=code)
    proc = subprocess.run([sys.executable, "-c", prog], stdout=subprocess.PIPE, text=True, cwd=ROOT)
    if proc.returncode != 0:
        raise SystemExit(f"memory.py: step failed (exit {proc.returncode}):\n{code}")
    line = next(ln for ln in proc.stdout.splitlines() if ln.startswith("PEAK "))
    return json.loads(line[5:])


def folder_bytes(path: str) -> int:
    return sum(os.path.getsize(os.path.join(path, n)) for n in os.listdir(path) if n.endswith(".safetensors"))


def write_random_official(dst: str, cfg, seed: int = 0) -> int:
    """Official Sa2VA folder with random weights, streamed; returns the largest tensor's bytes."""
    specs = [(k, torch.bfloat16 if k.startswith("vision_model.") else torch.float32, shape)
             for k, shape in sorted(convert.official_shapes(cfg).items())]
    nbytes = [torch.Size(s).numel() * d.itemsize for _, d, s in specs]
    # two shards split at half the bytes, as HF's max_shard_size splitting does
    cum, cut = 0, len(specs)
    for i, n in enumerate(nbytes):
        cum += n
        if cum >= sum(nbytes) / 2:
            cut = i + 1
            break
    shards = [specs[:cut], specs[cut:]]
    names = [f"model-{i + 1:05d}-of-00002.safetensors" for i in range(2)]
    gen = torch.Generator().manual_seed(seed)
    os.makedirs(dst, exist_ok=True)
    for name, part in zip(names, shards):
        tensors = ((k, torch.empty(s, dtype=d).normal_(0, 0.02, generator=gen)) for k, d, s in part)
        write_safetensors(os.path.join(dst, name), part, tensors)
    with open(os.path.join(dst, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": sum(nbytes)},
                   "weight_map": {k: name for name, part in zip(names, shards) for k, _, _ in part}}, f)
    with open(os.path.join(dst, "config.json"), "w") as f:
        json.dump(convert.config_to_official(cfg), f, indent=2)
    debug_checkpoint.write_tokenizer(dst, cfg.family, vocab_size=cfg.llm.vocab_size)
    return max(nbytes)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="Sa2VA-1B", help="released checkpoint whose shapes to use")
    ap.add_argument("--workdir", default=None, help="where to write the checkpoints (default: a temp dir)")
    ap.add_argument("--keep", action="store_true", help="keep the written checkpoints")
    args = ap.parse_args()
    cfg = preset(args.preset)
    work = args.workdir or tempfile.mkdtemp(prefix="sa2va-mem-")
    src, out, out_bf16 = (os.path.join(work, n) for n in ("official", "ours", "ours-bf16"))
    try:
        largest = write_random_official(src, cfg)
        print(f"{args.preset}: wrote {src} ({folder_bytes(src) / GB:.2f} GB in 2 shards)", flush=True)
        results = {}
        for name, code in STEPS.items():
            results[name] = measure(code + (TOUCH if "load" in name else ""), src, out, out_bf16)
            print(f"  measured {name}: {results[name]['peak'] / GB:.2f} GB", flush=True)
        sizes = {"official": folder_bytes(src), "ours": folder_bytes(out), "ours bf16": folder_bytes(out_bf16)}
        disk = {"import torch (baseline)": None, "import convert (imports)": None, "convert": "official",
                "convert dtype=bf16": "official", "load_model (ours)": "ours", "load_official (official)": "official",
                "load_model dtype=fp32": "ours",
                "naive load_file (official)": "official"}
        base = results["import torch (baseline)"]["peak"]
        print("\nsize on disk: " + ", ".join(f"{k} {v / GB:.2f} GB" for k, v in sizes.items())
              + f"; largest tensor {largest / GB:.2f} GB")
        print(f"{'step':<28}{'peak RSS':>10}{'anon max':>10}{'file max':>10}  {'(peak - base) / disk':<24}")
        for name, r in results.items():
            ratio = "" if disk[name] is None else \
                f"{(r['peak'] - base) / sizes[disk[name]]:.2f} of {disk[name]}"
            print(f"{name:<28}{r['peak'] / GB:>8.2f}GB{r['anon'] / GB:>8.2f}GB{r['file'] / GB:>8.2f}GB  {ratio}")
        print("(anon/file: sampled maxima of RssAnon and RssFile; file = safetensors mmap pages)")
    finally:
        if not args.keep:
            for d in (src, out, out_bf16):
                shutil.rmtree(d, ignore_errors=True)
            if args.workdir is None:
                shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
