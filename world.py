"""A synthetic world of coloured shapes, where every answer can be checked, written in the
official dataset layouts: the training and evaluation data of the shipped model.

    python world.py --out world/train --seed 0                 # training data (official layouts + custom.jsonl)
    python world.py --out world/eval --seed 1 --split eval     # held-out benchmarks for eval.py
    python world.py --out examples --split examples            # examples/: the example image and video

Images are 160-640 px a side, any aspect, on a flat, gradient or low-contrast noise background,
with 1-5 circles, squares and triangles in six colours, each 8-40% of the shorter side, drawn
with or without anti-aliasing and overlapping at most a little; videos are 8-32 frames of such
a scene with shapes moving at constant velocity (some still). The tasks use the official
conversation templates through the official readers:

| task | layout | example |
| --- | --- | --- |
| referring segmentation | ref_seg/refcoco (instances.json + refs(unc).p) | "red circle", "square on the left", "small blue triangle" -> [SEG] |
| video referring segmentation | video_datas/mevis/train (meta_expressions.json + mask_dict.json) | "circle moving right" |
| several objects, GCG, VQA, <vp> regions | custom.jsonl (the JSONL training format) | "<p> A red circle </p> [SEG]", "How many shapes are there?" -> "B" |

The evaluation split writes the same world, from another seed, as eval.py reads its benchmarks:
refcoco `val` (colour and shape alone) and `testA` (with spatial or size words), mevis `valid_u`,
gcg `val`, and a multiple-choice `vqa.tsv`.
"""
import base64
import io
import json
import math
import os
import pickle
import sys
from dataclasses import dataclass

import av
import numpy as np
from PIL import Image, ImageDraw

from tokenizers import Tokenizer, models, pre_tokenizers, trainers

import data
import debug_checkpoint
from cli import arg, check_output_folder, output_folder, parse, run
from model.config import SHAPES_TOKENIZER
from official_data import ANSWER_LIST, GCG_QUESTIONS, SEG_QUESTIONS, VP_QUESTIONS

COLORS = {"red": (215, 40, 40), "green": (40, 165, 60), "blue": (45, 85, 220), "yellow": (235, 205, 35),
          "purple": (140, 60, 185), "orange": (245, 135, 25)}
SHAPES = ("circle", "square", "triangle")
MCQ_SUFFIX = "\nAnswer with the option's letter from the given choices directly."
LETTERS = "ABCDEF"


# ----------------------------------------------------------------------------- scenes

@dataclass
class Shape:
    kind: str
    color: str
    x: float  # centre at frame 0
    y: float
    size: float  # side of the bounding square, px
    vx: float = 0.0  # px per frame
    vy: float = 0.0

    def at(self, t: int) -> tuple[float, float]:
        return self.x + self.vx * t, self.y + self.vy * t


@dataclass
class Scene:
    width: int
    height: int
    background: np.ndarray  # (H, W, 3) uint8
    shapes: list[Shape]
    antialias: bool
    frames: int = 1


def _background(rng: np.random.Generator, w: int, h: int) -> np.ndarray:
    """Flat, gradient or low-contrast noise, in low-saturation colours the shapes stand out from."""
    def muted():
        grey = rng.uniform(60, 200)
        return np.clip(grey + rng.normal(0, 12, 3), 0, 255)
    kind = rng.integers(3)
    if kind == 0:
        return np.broadcast_to(muted(), (h, w, 3)).astype(np.uint8)
    if kind == 1:
        a, b = muted(), muted()
        angle = rng.uniform(0, 2 * math.pi)
        yy, xx = np.mgrid[:h, :w]
        p = (xx * math.cos(angle) + yy * math.sin(angle))
        p = (p - p.min()) / max(p.max() - p.min(), 1)
        return (a + (b - a) * p[..., None]).astype(np.uint8)
    return np.clip(muted() + rng.normal(0, 8, (h, w, 3)), 0, 255).astype(np.uint8)


def _boxes_overlap(a: Shape, b: Shape, ta: tuple, tb: tuple) -> float:
    """Intersection of two shapes' boxes over the smaller box."""
    (ax, ay), (bx, by) = ta, tb
    ix = max(0.0, min(ax + a.size / 2, bx + b.size / 2) - max(ax - a.size / 2, bx - b.size / 2))
    iy = max(0.0, min(ay + a.size / 2, by + b.size / 2) - max(ay - a.size / 2, by - b.size / 2))
    return ix * iy / min(a.size, b.size) ** 2


def sample_scene(rng: np.random.Generator, frames: int = 1, max_shapes: int = 5) -> Scene:
    w, h = (int(v) for v in rng.integers(160, 641, 2))
    side = min(w, h)
    shapes: list[Shape] = []
    for _ in range(int(rng.integers(1, max_shapes + 1))):
        for _attempt in range(60):
            size = float(rng.uniform(0.08, 0.4) * side)
            x0, y0 = rng.uniform(size / 2, w - size / 2), rng.uniform(size / 2, h - size / 2)
            vx = vy = 0.0
            if frames > 1 and rng.random() < 0.7:  # moving: a straight path that stays inside the frame
                x1, y1 = rng.uniform(size / 2, w - size / 2), rng.uniform(size / 2, h - size / 2)
                vx, vy = (x1 - x0) / (frames - 1), (y1 - y0) / (frames - 1)
            s = Shape(str(rng.choice(SHAPES)), str(rng.choice(list(COLORS))), float(x0), float(y0), size, float(vx), float(vy))
            if all(_boxes_overlap(s, o, s.at(t), o.at(t)) < 0.15 for o in shapes for t in range(frames)):
                shapes.append(s)
                break
    return Scene(w, h, _background(rng, w, h), shapes, bool(rng.random() < 0.5), frames)


def _draw(draw: ImageDraw.ImageDraw, s: Shape, t: int, scale: float, fill):
    x, y = s.at(t)
    r = s.size / 2
    box = [(x - r) * scale, (y - r) * scale, (x + r) * scale, (y + r) * scale]
    if s.kind == "circle":
        draw.ellipse(box, fill=fill)
    elif s.kind == "square":
        draw.rectangle(box, fill=fill)
    else:
        draw.polygon([(x * scale, (y - r) * scale), ((x + r) * scale, (y + r) * scale), ((x - r) * scale, (y + r) * scale)],
                     fill=fill)


def render(scene: Scene, t: int = 0) -> tuple[np.ndarray, list[np.ndarray]]:
    """Frame t: the (H, W, 3) image and each shape's visible mask (later shapes cover earlier ones)."""
    w, h = scene.width, scene.height
    scale = 4 if scene.antialias else 1
    im = Image.fromarray(np.ascontiguousarray(scene.background)).resize((w * scale, h * scale), Image.NEAREST)
    draw = ImageDraw.Draw(im)
    full = []
    for s in scene.shapes:
        _draw(draw, s, t, scale, COLORS[s.color])
        m = Image.new("L", (w, h), 0)
        _draw(ImageDraw.Draw(m), s, t, 1, 255)
        full.append(np.asarray(m) > 127)
    if scale > 1:
        im = im.resize((w, h), Image.LANCZOS)
    visible = []
    for i, m in enumerate(full):
        above = np.zeros_like(m)
        for later in full[i + 1:]:
            above |= later
        visible.append(m & ~above)
    return np.asarray(im.convert("RGB")), visible


# ----------------------------------------------------------------------------- what can be said about a shape

def referring_expressions(scene: Scene, i: int, t: int = 0) -> dict[str, list[str]]:
    """Expressions that pick out shape i alone: 'plain' (colour and/or shape) and 'spatial'
    (left/right/top/bottom, small/big), plus 'motion' in a video."""
    s, others = scene.shapes[i], [o for k, o in enumerate(scene.shapes) if k != i]
    out = {"plain": [], "spatial": [], "motion": []}
    same_kind = [o for o in others if o.kind == s.kind]
    same_both = [o for o in same_kind if o.color == s.color]
    if not same_both:
        out["plain"].append(f"{s.color} {s.kind}")
    if not same_kind:
        out["plain"].append(s.kind)
    if not [o for o in others if o.color == s.color]:
        out["plain"].append(f"{s.color} shape")
    x, y = s.at(t)
    for group, name in ((same_both, f"{s.color} {s.kind}"), (same_kind, s.kind)):
        if not group:
            continue
        xs, ys = [o.at(t)[0] for o in group], [o.at(t)[1] for o in group]
        gap = 0.1 * scene.width
        if x < min(xs) - gap:
            out["spatial"].append(f"{name} on the left")
        if x > max(xs) + gap:
            out["spatial"].append(f"{name} on the right")
        if y < min(ys) - 0.1 * scene.height:
            out["spatial"].append(f"{name} at the top")
        if y > max(ys) + 0.1 * scene.height:
            out["spatial"].append(f"{name} at the bottom")
        sizes = [o.size for o in group]
        if s.size < min(sizes) / 1.5:
            out["spatial"].append(f"small {name}")
        if s.size > max(sizes) * 1.5:
            out["spatial"].append(f"big {name}")
    if scene.frames > 1:
        d = motion(scene, s)
        if d not in [motion(scene, o) for o in same_kind]:
            out["motion"].append(f"{s.kind} standing still" if d == "still" else f"{s.kind} moving {d}")
    return out


def motion(scene: Scene, s: Shape) -> str:
    """'still' (moves under 15% of the shorter side over the clip), else the main direction."""
    dx, dy = s.vx * (scene.frames - 1), s.vy * (scene.frames - 1)
    if math.hypot(dx, dy) < 0.15 * min(scene.width, scene.height):
        return "still"
    return ("right" if dx > 0 else "left") if abs(dx) > abs(dy) else ("down" if dy > 0 else "up")


def article(phrase: str) -> str:
    return f"a {phrase}" if phrase[0] not in "aeiou" else f"an {phrase}"


def description(scene: Scene, order: list[int]) -> str:
    """A GCG caption naming the shapes in `order`, each '<p> a red circle </p> [SEG]'."""
    parts = [f"<p> {article(scene.shapes[i].color + ' ' + scene.shapes[i].kind)} </p> [SEG]" for i in order]
    if len(parts) == 1:
        return f"There is {parts[0]}."
    text = f"{', '.join(parts[:-1])} and {parts[-1]}."
    return text[:4] + text[4].upper() + text[5:]  # '<p> A red circle ...'


# ----------------------------------------------------------------------------- writing

def _jpeg(path: str, pixels: np.ndarray):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(pixels).save(path, quality=95)


def example_scenes() -> tuple[Scene, Scene]:
    """The example image and video (examples/shapes.jpg, examples/shapes.mp4): fixed scenes, so
    their ground truth is known; neither is in the training data (seed 0)."""
    bg = np.broadcast_to(np.array([178, 172, 160], np.uint8), (320, 480, 3))
    image = Scene(480, 320, bg, [Shape("circle", "red", 110, 110, 110), Shape("square", "blue", 330, 90, 90),
                                 Shape("triangle", "green", 240, 235, 120), Shape("circle", "yellow", 400, 240, 80)],
                  antialias=True)
    frames = 16
    video = Scene(480, 320, bg.copy(), [Shape("circle", "red", 80, 90, 90, vx=280 / (frames - 1)),
                                        Shape("triangle", "blue", 380, 230, 100),
                                        Shape("square", "green", 150, 260, 80, vy=-150 / (frames - 1))],
                  antialias=True, frames=frames)
    return image, video


def write_examples(folder: str):
    """examples/shapes.jpg and examples/shapes.mp4 (H.264, 10 fps) from example_scenes()."""
    image, video = example_scenes()
    _jpeg(os.path.join(folder, "shapes.jpg"), render(image)[0])
    with av.open(os.path.join(folder, "shapes.mp4"), "w") as c:
        s = c.add_stream("libx264", rate=10)
        s.width, s.height, s.pix_fmt = video.width, video.height, "yuv420p"
        s.options = {"crf": "18"}
        for t in range(video.frames):
            for packet in s.encode(av.VideoFrame.from_ndarray(render(video, t)[0], format="rgb24")):
                c.mux(packet)
        for packet in s.encode():
            c.mux(packet)


def _nonempty(masks: list[np.ndarray]) -> list[int]:
    return [i for i, m in enumerate(masks) if m.sum() >= 16]


@dataclass
class WorldOptions:
    out: str = arg(help="the folder to write (new or empty)")
    seed: int = arg(0, "the world's seed (the README: 0 for training, 1 for evaluation)")
    split: str = arg("train", "train: training layouts; eval: eval.py's benchmark layouts; examples: the "
                              "example image and video", choices=("train", "eval", "examples"))
    images: int = arg(3000, "images (referring segmentation; each also gives GCG, VQA or <vp> samples)")
    videos: int = arg(300, "videos")


def write_world(opts: WorldOptions, root: str):
    rng = np.random.default_rng(opts.seed)
    train = opts.split == "train"
    ref_dir = os.path.join(root, "ref_seg", "refcoco")
    image_dir = os.path.join(ref_dir, "coco2014", "train2014") if train else \
        os.path.join(root, "glamm_data", "images", "coco2014", "train2014")
    images, anns, refs, custom = [], [], [], []
    gcg_images, gcg_anns, gcg_caps, tsv = [], [], [], []
    for n in range(opts.images):
        scene = sample_scene(rng)
        pixels, masks = render(scene)
        keep = _nonempty(masks)
        if not keep:
            continue
        image_id = n + 1
        file = f"COCO_train2014_{image_id:012d}.jpg"
        _jpeg(os.path.join(image_dir, file), pixels)
        images.append({"id": image_id, "file_name": file, "height": scene.height, "width": scene.width})
        for i in keep:
            exps = referring_expressions(scene, i)
            ann_id = image_id * 10 + i
            anns.append({"id": ann_id, "image_id": image_id, "segmentation": data.rle_encode(masks[i]), "iscrowd": 0,
                         "area": int(masks[i].sum()), "bbox": [0, 0, 0, 0], "category_id": 1})
            if train:
                sentences = exps["plain"] + exps["spatial"]
                if sentences:
                    refs.append(_ref(len(refs), ann_id, image_id, "train", sentences))
            else:  # val: colour and shape words only; testA: spatial or size words
                if exps["plain"]:
                    refs.append(_ref(len(refs), ann_id, image_id, "val", [exps["plain"][0]]))
                if exps["spatial"]:
                    refs.append(_ref(len(refs), ann_id, image_id, "testA", [str(rng.choice(exps["spatial"]))]))
        order = sorted(keep, key=lambda i: scene.shapes[i].at(0)[0])
        caption = description(scene, order)
        if train:
            custom += _custom_samples(rng, scene, masks, keep, order, caption, os.path.relpath(os.path.join(image_dir, file), root))
        else:
            gcg_images.append({"id": str(image_id), "file_name": file, "height": scene.height, "width": scene.width})
            for i in order:
                gcg_anns.append({"id": len(gcg_anns) + 1, "image_id": str(image_id), "category_id": 1, "iscrowd": 0,
                                 "segmentation": data.rle_encode(masks[i]), "area": int(masks[i].sum()), "bbox": [0, 0, 1, 1]})
            labels = [f"{article(scene.shapes[i].color + ' ' + scene.shapes[i].kind)}" for i in order]
            gcg_caps.append({"id": len(gcg_caps) + 1, "image_id": str(image_id), "labels": labels,
                             "caption": " ".join(caption.replace("<p> ", "").replace(" </p> [SEG]", "").split())})
            _jpeg(os.path.join(root, "glamm_data", "images", "grandf", "val_test", f"{image_id}.jpg"), pixels)
            tsv.append(_vqa_row(rng, scene, keep, pixels, image_id))
    with open_json(os.path.join(ref_dir, "instances.json")) as f:
        json.dump({"images": images, "annotations": anns, "categories": [{"id": 1, "name": "shape"}]}, f)
    with open(os.path.join(ref_dir, "refs(unc).p"), "wb") as f:
        pickle.dump(refs, f, protocol=2)
    _write_videos(opts, rng, root, train)
    if train:
        with open(os.path.join(root, "custom.jsonl"), "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in custom)
        texts = [c["value"] for r in custom for c in r["conversations"]]
        texts += [q.format(class_name=s["raw"]) for r in refs for s in r["sentences"] for q in SEG_QUESTIONS[:12]]
        texts += ANSWER_LIST + VP_QUESTIONS + ["user\n", "assistant\n", "system\n"]
        write_tokenizer(os.path.join(root, "tokenizer"), texts)
    else:
        gt = os.path.join(root, "glamm_data", "annotations", "gcg_val_test")
        with open_json(os.path.join(gt, "val_gcg_coco_mask_gt.json")) as f:
            json.dump({"images": gcg_images, "annotations": gcg_anns, "categories": [{"id": 1, "name": "object"}]}, f)
        with open_json(os.path.join(gt, "val_gcg_coco_caption_gt.json")) as f:
            json.dump({"images": gcg_images, "annotations": gcg_caps}, f)
        _write_tsv(os.path.join(root, "vqa.tsv"), tsv)


def write_tokenizer(folder: str, texts: list[str]):
    """The shipped model's tokenizer: a byte-level BPE learned on the world's texts, padded to the
    preset's vocabulary, with the InternVL and Sa2VA tokens after it (config.SHAPES_TOKENIZER)."""
    vocab_size, image_id, seg_id = SHAPES_TOKENIZER
    n_bpe = vocab_size - len(debug_checkpoint.added_tokens("internvl"))
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=n_bpe, show_progress=False,
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    model = json.loads(tok.to_str())["model"]
    vocab, merges = model["vocab"], [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in model["merges"]]
    vocab.update({f"<|dummy_{i}|>": i for i in range(len(vocab), n_bpe)})  # a small corpus learns fewer merges
    debug_checkpoint.write_tokenizer(folder, "internvl", bpe=models.BPE(vocab=vocab, merges=merges))
    written = Tokenizer.from_file(os.path.join(folder, "tokenizer.json"))
    if (written.get_vocab_size(), written.token_to_id("<IMG_CONTEXT>"), written.token_to_id("[SEG]")) != SHAPES_TOKENIZER:
        raise RuntimeError("the shapes tokenizer does not have the preset's ids")


def open_json(path: str):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    return open(path, "w")


def _ref(ref_id: int, ann_id: int, image_id: int, split: str, sentences: list[str]) -> dict:
    return {"ref_id": ref_id, "ann_id": ann_id, "image_id": image_id, "split": split, "category_id": 1,
            "sentences": [{"raw": s, "sent": s} for s in sentences]}


def _vqa_question(rng: np.random.Generator, scene: Scene, keep: list[int]) -> tuple[str, list[str], str]:
    """A multiple-choice question: how many shapes, the colour of a shape, or the shape of a colour."""
    shapes = [scene.shapes[i] for i in keep]
    kinds = [s.kind for s in shapes]
    colors = [s.color for s in shapes]
    choice = rng.integers(3)
    unique_kind = [k for k in SHAPES if kinds.count(k) == 1]
    unique_color = [c for c in COLORS if colors.count(c) == 1]
    if choice == 1 and unique_kind:
        k = str(rng.choice(unique_kind))
        options = [str(c) for c in rng.permutation(list(COLORS))[:4]]
        right = colors[kinds.index(k)]
        if right not in options:
            options[int(rng.integers(4))] = right
        return f"What color is the {k}?", options, right
    if choice == 2 and unique_color:
        c = str(rng.choice(unique_color))
        return f"What shape is the {c} one?", list(SHAPES), kinds[colors.index(c)]
    return "How many shapes are there?", ["1", "2", "3", "4", "5"], str(len(shapes))


def _mcq(question: str, options: list[str]) -> str:
    return question + "".join(f"\n{LETTERS[k]}. {o}" for k, o in enumerate(options)) + MCQ_SUFFIX


def _vqa_row(rng, scene, keep, pixels, image_id) -> dict:
    question, options, right = _vqa_question(rng, scene, keep)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    row = {"index": str(image_id), "question": question, "hint": "nan", "answer": LETTERS[options.index(right)],
           "category": question.split(" ")[1], "image": base64.b64encode(buf.getvalue()).decode()}
    row.update({LETTERS[k]: o for k, o in enumerate(options)})
    return row


def _write_tsv(path: str, rows: list[dict]):
    import csv
    columns = ["index", "question", "hint", *LETTERS[:5], "answer", "category", "image"]
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=columns, delimiter="\t", restval="nan")
        w.writeheader()
        w.writerows(rows)


def _human_gpt(question: str, answer: str) -> list[dict]:
    return [{"from": "human", "value": question}, {"from": "gpt", "value": answer}]


def _custom_samples(rng, scene, masks, keep, order, caption, image) -> list[dict]:
    """JSONL samples of one image: several objects in one answer, a GCG caption, a VQA question, a <vp> region."""
    out = []
    if len(keep) >= 2:
        chosen = [int(i) for i in rng.choice(keep, 2, replace=False)]
        names = [referring_expressions(scene, i)["plain"] for i in chosen]
        if all(names):
            q = f"<image>\nPlease segment the {names[0][0]} and the {names[1][0]}."
            out.append({"image": image, "masks": [data.rle_encode(masks[i]) for i in chosen],
                        "phrases": [names[0][0], names[1][0]], "conversations": _human_gpt(q, "Sure, [SEG] and [SEG].")})
    question = data.GCG_QUESTION if rng.random() < 0.5 else str(rng.choice(GCG_QUESTIONS))
    out.append({"image": image, "masks": [data.rle_encode(masks[i]) for i in order],
                "phrases": [f"{scene.shapes[i].color} {scene.shapes[i].kind}" for i in order],
                "conversations": _human_gpt("<image>\n" + question, caption)})
    q, options, right = _vqa_question(rng, scene, keep)
    out.append({"image": image, "conversations": _human_gpt("<image>\n" + _mcq(q, options), LETTERS[options.index(right)])})
    cells = data.vp_grid_cells(np.stack([masks[i] for i in keep]))
    big = [i for i, n in zip(keep, cells) if n >= data.MIN_REGION_CELLS]  # what the <vp> rule admits
    if not big:
        return out
    regions = [int(i) for i in rng.choice(big, min(len(big), int(rng.integers(1, 3))), replace=False)]
    k = int(rng.integers(len(regions)))
    s = scene.shapes[regions[k]]
    out.append({"image": image, "regions": [data.rle_encode(masks[i]) for i in regions],
                "conversations": _human_gpt(f"<image>\nWhat is region{k + 1}?", f"{article(s.color + ' ' + s.kind).capitalize()}.")})
    return out


def _write_videos(opts: WorldOptions, rng, root: str, train: bool):
    folder = os.path.join(root, "video_datas", "mevis", "train" if train else "valid_u")
    videos, mask_dict = {}, {}
    for v in range(opts.videos):
        T = int(rng.integers(8, 33))
        scene = sample_scene(rng, frames=T, max_shapes=4)
        rendered = [render(scene, t) for t in range(T)]
        keep = [i for i in range(len(scene.shapes)) if all(m[i].sum() >= 4 for _, m in rendered)]
        if not keep:
            continue
        vid = f"video{v:05d}"
        names = [f"{t:05d}" for t in range(T)]
        for name, (pixels, _) in zip(names, rendered):
            _jpeg(os.path.join(folder, "JPEGImages", vid, name + ".jpg"), pixels)
        expressions = {}
        for i in keep:
            exps = referring_expressions(scene, i)
            said = exps["motion"] + exps["plain"] if train else (exps["motion"] or exps["plain"])[:1]
            anno = str(len(mask_dict))
            mask_dict[anno] = [data.rle_encode(m[i]) for _, m in rendered]
            for e in said:
                expressions[str(len(expressions))] = {"exp": e, "anno_id": [anno], "obj_id": [i]}
        if expressions:
            videos[vid] = {"frames": names, "expressions": expressions}
    with open_json(os.path.join(folder, "meta_expressions.json")) as f:
        json.dump({"videos": videos}, f)
    with open_json(os.path.join(folder, "mask_dict.json")) as f:
        json.dump(mask_dict, f)


def main(argv=None):
    opts = parse(WorldOptions, argv, __doc__.split("\n\n")[0], prog="world.py")

    def body():
        check_output_folder(opts.out, "--out")
        with output_folder(opts.out) as tmp:
            write_examples(tmp) if opts.split == "examples" else write_world(opts, tmp)
        print(f"world.py: wrote {opts.out} ({opts.split}, seed {opts.seed})", file=sys.stderr)
    run("world.py", body)


if __name__ == "__main__":
    main()
