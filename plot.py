"""Draw a training run's loss curves as a PNG, with PIL alone (no plotting library needed).

    python plot.py runs/shapes/metrics.jsonl docs/loss.png

One line per loss term of train.py's metrics.jsonl (loss, loss_lm, loss_mask, loss_dice, and
loss_distill with --phrase-distill): the raw values faint, a moving average over 1% of the steps
on top; a log-scaled y axis.
"""
import json
import math
import os
import sys
from dataclasses import dataclass

from PIL import Image, ImageDraw, ImageFont

from cli import arg, parse, run

TERMS = (("loss", (30, 30, 30)), ("loss_lm", (31, 119, 180)), ("loss_mask", (214, 39, 40)), ("loss_dice", (44, 160, 44)),
         ("loss_distill", (148, 103, 189)))
W, H, LEFT, RIGHT, TOP, BOTTOM = 900, 480, 70, 150, 30, 50


def read_metrics(path: str) -> list[dict]:
    if not os.path.isfile(path):
        raise ValueError(f"{path} does not exist; give the metrics.jsonl of a train.py run folder")
    rows = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path} line {n} is not JSON ({e.msg}); is it train.py's metrics.jsonl?") from None
            if not isinstance(row, dict) or "step" not in row or "loss" not in row:
                raise ValueError(f"{path} line {n} has no step and loss; is it train.py's metrics.jsonl?")
            rows.append(row)
    if len(rows) < 2:
        raise ValueError(f"{path} has {len(rows)} step(s); a curve needs at least 2")
    return rows


def moving_average(values: list[float], window: int) -> list[float]:
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out


def draw(rows: list[dict], title: str = "") -> Image.Image:
    im = Image.new("RGB", (W, H), "white")
    d = ImageDraw.Draw(im)
    font = ImageFont.load_default()
    steps = [r["step"] for r in rows]
    # a term of 0 means the step had none of it (no mask in the batch): left out, not drawn at log(0)
    points = {k: [(r["step"], float(r[k])) for r in rows if k in r and float(r[k]) > 0] for k, _ in TERMS}
    points = {k: v for k, v in points.items() if len(v) >= 2}
    if "loss" not in points:
        raise ValueError("the run's loss is never above 0; nothing to draw on a log scale")
    curves = {k: [v for _, v in p] for k, p in points.items()}
    lo = math.floor(math.log10(min(min(v) for v in curves.values())))
    hi = math.ceil(math.log10(max(max(v) for v in curves.values())))
    hi = max(hi, lo + 1)
    x0, x1, y0, y1 = LEFT, W - RIGHT, TOP, H - BOTTOM

    def xy(step, value):
        x = x0 + (step - steps[0]) / max(steps[-1] - steps[0], 1) * (x1 - x0)
        y = y1 - (math.log10(value) - lo) / (hi - lo) * (y1 - y0)
        return x, y

    for e in range(lo, hi + 1):  # decades, with the 2x and 5x marks
        for m in (1, 2, 5):
            v = m * 10.0 ** e
            if 10.0 ** lo <= v <= 10.0 ** hi:
                y = xy(steps[0], v)[1]
                d.line([(x0, y), (x1, y)], fill=(225, 225, 225) if m > 1 else (190, 190, 190))
                d.text((x0 - 8, y), f"{v:g}", fill="black", font=font, anchor="rm")
    span = max(steps[-1] - steps[0], 1)
    tick = next(t * 10 ** e for e in range(12) for t in (1, 2, 5) if span / (t * 10 ** e) <= 8)
    for step in range(-(-steps[0] // tick) * tick, steps[-1] + 1, tick):  # round steps, at most 8 of them
        x = xy(step, 10.0 ** lo)[0]
        d.line([(x, y1), (x, y1 + 4)], fill="black")
        d.text((x, y1 + 8), f"{step}", fill="black", font=font, anchor="mt")
    d.rectangle([x0, y0, x1, y1], outline="black")
    d.text(((x0 + x1) / 2, H - 18), "optimizer step", fill="black", font=font, anchor="mm")
    if title:
        d.text(((x0 + x1) / 2, 14), title, fill="black", font=font, anchor="mm")
    window = max(1, len(rows) // 100)
    for n, (name, color) in enumerate((k, c) for k, c in TERMS if k in curves):
        faint = tuple(int(c + (255 - c) * 0.75) for c in color)
        at = [s for s, _ in points[name]]
        d.line([xy(s, v) for s, v in zip(at, curves[name])], fill=faint, width=1)
        smooth = moving_average(curves[name], window)
        d.line([xy(s, v) for s, v in zip(at, smooth)], fill=color, width=2)
        y = y0 + 12 + 18 * n
        d.line([(x1 + 14, y), (x1 + 34, y)], fill=color, width=2)
        d.text((x1 + 40, y), f"{name} {smooth[-1]:.3f}", fill="black", font=font, anchor="lm")
    return im


@dataclass
class PlotOptions:
    metrics: str = arg(help="a train.py run's metrics.jsonl", positional=True)
    png: str = arg(help="the PNG to write", positional=True)
    title: str = arg("", "a line above the plot")


def main(argv=None):
    opts = parse(PlotOptions, argv, __doc__.split("\n\n")[0], prog="plot.py")

    def body():
        if not opts.png.lower().endswith(".png"):
            raise ValueError(f"{opts.png} does not end in .png; give a PNG path")
        im = draw(read_metrics(opts.metrics), opts.title)
        os.makedirs(os.path.dirname(os.path.abspath(opts.png)), exist_ok=True)
        im.save(opts.png)
        print(f"plot.py: wrote {opts.png}", file=sys.stderr)
    run("plot.py", body)


if __name__ == "__main__":
    main()
