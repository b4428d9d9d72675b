"""Evaluate Sa2VA on its benchmarks, scored as the official evaluation scores them.

    python eval.py --model DIR --benchmark refcoco --split val --data data/ --out runs/eval/refcoco_val
    torchrun --nproc_per_node 8 eval.py --model DIR --benchmark mevis_u --data data/ --out runs/eval/mevis_u
    python eval.py --score runs/eval/refcoco_val/predictions.jsonl --benchmark refcoco --split val --data data/

Every query is one `predict` call (or a `predict_batch` of the queries of one image) with the
official prompt; each rank of torchrun takes every world-th query and appends its results to
`predictions.rank{r}.jsonl` as it goes, so a rerun with the same --out skips what is done;
rank 0 merges them into `predictions.jsonl` (one line per query: "id", "text", "masks": per
[SEG], a list of compressed RLE per frame) and scores it. `--score` rescores a predictions file
without a model. The protocols (projects/sa2va/evaluation/*, tools/eval/*, metrics_gcg.py, the
VLMEvalKit fork):

| benchmark | data (under --data) | query | metrics |
| --- | --- | --- | --- |
| refcoco, refcoco+, refcocog | ref_seg/NAME/{instances.json, refs(unc|umd).p}, glamm_data/images/coco2014/train2014 | every sentence of every ref of the split: "<image>\\n Please segment {sent} in this image." | cIoU, gIoU of the union of the answer's masks |
| davis17, mevis_u, revos, ref_sav | video_datas/davis17/..., video_datas/mevis/valid_u/..., video_datas/revos/..., ref_sav_eval/... | every expression, all frames: "<image>\\nPlease segment {exp}." ('?': "<image>\\n {exp} Please respond with a segmentation mask.") | J, F, J&F of the first mask track (ReVOS by type, with A and R; Ref-SAV long/short with A) |
| mevis, refytvos | video_datas/mevis/valid/..., video_datas/rvos/... | as above | none here: a submission archive in the servers' layout |
| gcg | glamm_data/images/grandf/val_test, glamm_data/annotations/gcg_val_test/{split}_gcg_coco_{mask,caption}_gt.json | "<image>\\nCould you please give me a brief description of the image? ..." | AP50, mIoU, recall (with --bert), CIDEr, METEOR (with Java and pycocoevalcap) |
| vqa | a VLMEvalKit TSV file (--data) | multiple choice or yes/no, the fork's prompts | accuracy (circular where the TSV has circular copies; MME's perception/cognition scores) |

Deviations: GCG captions are tokenized by pycocoevalcap's PTB tokenizer when Java and
pycocoevalcap are present (as the official scorer), else by metrics.ptb_tokenize (said in
results.json); VQA answers are matched by VLMEvalKit's exact rules only (no LLM judge).
"""
import base64
import dataclasses
import hashlib
import importlib.util
import io
import json
import os
import re
import shutil
import time
import zipfile
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist
from PIL import Image
from tqdm import tqdm

import data
import metrics
import official_data
from cli import arg, parse, run
from model.config import NUM_KEY_FRAMES
from model.sam2_bridge import ORIGINAL_SAM2_CONFIG

# ----------------------------------------------------------------------------- options

KEY_FRAME_MODES = data.KEY_FRAME_MODES  # (the options' `data` field shadows the module in the class body)
BENCHMARKS = ("refcoco", "refcoco+", "refcocog", "davis17", "mevis_u", "revos", "ref_sav", "mevis", "refytvos",
              "gcg", "vqa")


@dataclass
class EvalOptions:
    benchmark: str = arg(help="what to evaluate", choices=BENCHMARKS)
    data: str = arg(help="the data root in the official layout (see the table in eval.py), or the TSV file for vqa")
    model: str | None = arg(None, "the checkpoint folder (ours or official; default: the shipped model)")
    out: str | None = arg(None, "the run folder: predictions, results.json (rerun the same command to resume)")
    score: str | None = arg(None, "score this predictions.jsonl instead of running a model")
    split: str | None = arg(None, "the split (default: val; testA, testB, test for the RefCOCO family; test for gcg)")
    batch_size: int = arg(8, "image queries per predict_batch call")
    max_new_tokens: int = arg(2048, "answer length limit (the official evaluation: 2048)")
    key_frames: int = arg(NUM_KEY_FRAMES, "video key frames the MLLM sees and SAM-2 conditions on (official: 5)")
    key_frame_mode: str = arg("first", "which frames are the key frames: the first ones (official) or evenly spaced",
                              choices=KEY_FRAME_MODES)
    bert: str | None = arg(None, "a local bert-base-uncased folder, for the GCG recall")
    limit: int | None = arg(None, "evaluate the first N queries only (a quick look; not a benchmark number)")
    device: str | None = arg(None, "cuda, mps or cpu (default: the best available; each torchrun rank its own GPU)")
    dtype: str | None = arg(None, "bf16 or fp32 (default: bf16 on GPU and on CPUs with AMX or AVX512-BF16, else fp32)")
    compile: bool = arg(False, "torch.compile the vision tower, decoding and SAM-2 (pays off on GPU)")
    sam2_original: str | None = arg(None, "videos: propagate with Meta's original SAM-2 (sam2.1_hiera_large.pt), "
                                          "the key frames still decoded by the model (Sa2VA-i; not the official protocol)")
    sam2_original_config: str = arg(ORIGINAL_SAM2_CONFIG, "the hydra config of --sam2-original in the sam2 package")


RESUMABLE = ("out", "batch_size", "device", "score", "compile")  # options a resumed run may change


@dataclass
class Query:
    id: str
    prompt: str
    image: str | np.ndarray | None = None  # a path, or decoded pixels (VQA TSVs)
    frames: list | None = None  # video frame paths (or images)


# ----------------------------------------------------------------------------- referring segmentation (images)

REFCOCO = {"refcoco": "refs(unc).p", "refcoco+": "refs(unc).p", "refcocog": "refs(umd).p"}
REFCOCO_SPLITS = {"refcoco": ("val", "testA", "testB", "test"), "refcoco+": ("val", "testA", "testB", "test"),
                  "refcocog": ("val", "test")}
RES_PROMPT = "<image>\n Please segment {} in this image."  # the leading space is the official prompt's


def refer_split(refs: list[dict], split: str) -> list[dict]:
    """The refer toolkit's getRefIds(split=...): 'testA'/'testB' match any split holding that
    letter, 'test' every split holding 'test', 'train'/'val' exactly."""
    if split in ("testA", "testB", "testC"):
        return [r for r in refs if split[-1] in r["split"]]
    if split == "test":
        return [r for r in refs if "test" in r["split"]]
    return [r for r in refs if r["split"] == split]


class RefCOCOBench:
    """RESDataset + sa2va_eval_refcoco.py: per image of the split, every sentence ("sent") of
    every ref a query; the prediction is the union of the answer's masks if it has a [SEG]."""

    def __init__(self, root: str, name: str, split: str):
        if split not in REFCOCO_SPLITS[name]:
            raise ValueError(f"{name} has splits {', '.join(REFCOCO_SPLITS[name])}, not {split!r}")
        folder = os.path.join(root, "ref_seg", name)
        self.images_dir = os.path.join(root, "glamm_data", "images", "coco2014", "train2014")
        refs = official_data.load_annotations(os.path.join(folder, REFCOCO[name]))
        coco = official_data.load_annotations(os.path.join(folder, "instances.json"))
        self.anns = {a["id"]: a for a in coco["annotations"]}
        self.images = {im["id"]: im for im in coco["images"]}
        self.queries, self.truth = [], {}
        per_image: dict[int, list] = {}
        for ref in refer_split(refs, split):
            per_image.setdefault(ref["image_id"], []).append(ref)
        for image_id, image_refs in per_image.items():
            info = self.images[image_id]
            for ref in image_refs:
                for k, sent in enumerate(ref["sentences"]):
                    qid = f"{image_id}/{ref['ref_id']}/{k}"
                    self.queries.append(Query(qid, RES_PROMPT.format(sent["sent"]),
                                              image=os.path.join(self.images_dir, info["file_name"])))
                    self.truth[qid] = (ref["ann_id"], info["height"], info["width"])
        if not self.queries:
            raise ValueError(f"{name} has no ref in split {split!r}")

    def predict(self, model, queries: list[Query], opts: EvalOptions) -> list[dict]:
        return predict_images(model, queries, opts)

    def score(self, records: dict[str, dict], queries: list[Query], opts: EvalOptions) -> dict:
        score = metrics.RefSegScore()
        for q in queries:
            ann_id, h, w = self.truth[q.id]
            gt = coco_sum_map(self.anns[ann_id]["segmentation"], h, w)
            rec = records[q.id]
            masks = [data.rle_decode(m[0]) for m in rec["masks"]] if has_seg(rec["text"]) else []
            pred = np.logical_or.reduce(masks) if masks else np.zeros((h, w), bool)
            score.add(pred, gt)
        return {"cIoU": score.ciou, "gIoU": score.giou, "queries": len(queries)}


def has_seg(text: str) -> bool:
    return "[SEG]" in text.replace("<|im_end|>", "").replace("<|end|>", "").strip()


def coco_sum_map(segmentation, h: int, w: int) -> np.ndarray:
    """RESDataset.decode_mask: the annotation's parts decoded and summed as uint8 (overlaps give 2;
    the 2-bin histogram of the metric then counts those pixels as neither class)."""
    if isinstance(segmentation, dict):
        return data.decode_mask(segmentation, h, w).astype(np.uint8)
    if not segmentation:
        return np.zeros((h, w), np.uint8)
    parts = [data.polygon_mask(p, h, w) if isinstance(p, list) else data.decode_mask(p, h, w) for p in segmentation]
    return np.sum(parts, axis=0).astype(np.uint8)


def predict_images(model, queries: list[Query], opts: EvalOptions) -> list[dict]:
    """predict_batch over queries that share an image (each image decoded once), in order."""
    out, images = [], {}
    for q in queries:
        if id(q.image) not in images and isinstance(q.image, str):
            images[id(q.image)] = np.asarray(data.load_image(q.image, exif=False))  # read as the official datasets do
    pixels = [images.get(id(q.image), q.image) for q in queries]
    for i in range(0, len(queries), opts.batch_size):
        chunk = queries[i:i + opts.batch_size]
        preds = model.predict_batch(pixels[i:i + len(chunk)], [q.prompt for q in chunk], max_new_tokens=opts.max_new_tokens)
        out += [{"id": q.id, "text": p.text, "masks": [[data.rle_encode(m[0])] for m in p.masks]} for q, p in zip(chunk, preds)]
    return out


# ----------------------------------------------------------------------------- referring segmentation (videos)

VOS_PROMPT = "<image>\nPlease segment {}."
VOS_QUESTION_PROMPT = "<image>\n {} Please respond with a segmentation mask."


@dataclass(frozen=True)
class VOSLayout:
    frames: str  # folder of video folders of .jpg frames
    expressions: str
    masks: str | None  # None: scored by a server
    foreground: str | None = None  # ReVOS robustness
    ids: str = "anno_id"  # 'anno_id', or 'running': masks numbered by expression over sorted videos (DAVIS)
    groups: tuple[str, str] | None = None  # names of type_id 0 and 1 (ReVOS, Ref-SAV)


VOS = {  # sa2va_eval_ref_vos.py DATASETS_INFO, tools/eval/eval_{davis,mevis,revos,ref_sav}.py
    "davis17": VOSLayout("video_datas/davis17/valid/JPEGImages", "video_datas/davis17/meta_expressions/valid/meta_expressions.json",
                         "video_datas/davis17/valid/mask_dict.pkl", ids="running"),
    "mevis_u": VOSLayout("video_datas/mevis/valid_u/JPEGImages", "video_datas/mevis/valid_u/meta_expressions.json",
                         "video_datas/mevis/valid_u/mask_dict.json"),
    "revos": VOSLayout("video_datas/revos", "video_datas/revos/meta_expressions_valid_.json", "video_datas/revos/mask_dict.json",
                       foreground="video_datas/revos/mask_dict_foreground.json", groups=("referring", "reasoning")),
    "ref_sav": VOSLayout("ref_sav_eval/videos", "ref_sav_eval/meta_expressions_valid.json", "ref_sav_eval/mask_dict.json",
                         groups=("long", "short")),
    "mevis": VOSLayout("video_datas/mevis/valid/JPEGImages", "video_datas/mevis/valid/meta_expressions.json", None),
    "refytvos": VOSLayout("video_datas/rvos/valid/JPEGImages", "video_datas/rvos/meta_expressions/valid/meta_expressions.json", None),
}


class VOSBench:
    """RefVOSDataset + sa2va_eval_ref_vos.py: every expression of every video, all its frames
    (sorted); the first mask track of the answer, all-zero without one."""

    def __init__(self, root: str, name: str, split: str):
        if split != "val":
            raise ValueError(f"{name} has one split here, val (the layout names it); got {split!r}")
        self.name, self.layout = name, VOS[name]
        lay = self.layout
        meta_path = os.path.join(root, lay.expressions)
        self.videos = official_data.load_annotations(meta_path)["videos"]
        self.frames_dir = os.path.join(root, lay.frames)
        self.queries, self.meta = [], {}
        for vid, info in self.videos.items():
            frames = sorted(info["frames"])
            for exp_id in sorted(info["expressions"]):
                exp = info["expressions"][exp_id]["exp"]
                prompt = (VOS_QUESTION_PROMPT if "?" in exp else VOS_PROMPT).format(exp)
                qid = f"{vid}/{exp_id}"
                self.queries.append(Query(qid, prompt, frames=[os.path.join(self.frames_dir, vid, f + ".jpg") for f in frames]))
                self.meta[qid] = (vid, exp_id, frames)
        if not self.queries:
            raise ValueError(f"{meta_path} has no expression")
        self.root = root

    def predict(self, model, queries: list[Query], opts: EvalOptions) -> list[dict]:
        out = []
        for q in queries:
            pred = model.predict(video=q.frames, text=q.prompt, max_new_tokens=opts.max_new_tokens,
                                 key_frames=opts.key_frame_mode, num_key_frames=opts.key_frames)
            out.append({"id": q.id, "text": pred.text,
                        "masks": [[data.rle_encode(f) for f in track] for track in pred.masks[:1]]})
        return out

    def track(self, record: dict, n: int, size: tuple[int, int]) -> np.ndarray:
        if record["masks"]:
            return np.stack([data.rle_decode(r) for r in record["masks"][0]]).astype(np.uint8)
        return np.zeros((n, *size), np.uint8)

    def score(self, records: dict[str, dict], queries: list[Query], opts: EvalOptions) -> dict:
        lay = self.layout
        if lay.masks is None:
            return self.submission(records, queries, opts)
        masks = official_data.load_annotations(os.path.join(self.root, lay.masks))
        foreground = official_data.load_annotations(os.path.join(self.root, lay.foreground)) if lay.foreground else None
        running = running_ids(self.videos) if lay.ids == "running" else None
        rows = []
        for q in queries:
            vid, exp_id, frames = self.meta[q.id]
            info = self.videos[vid]
            rec = records[q.id]
            ids = running[q.id] if running is not None else info["expressions"][exp_id]["anno_id"]
            T = len(info["frames"])
            if lay.groups:  # tools/eval/eval_revos.py / eval_ref_sav.py take the size from the meta
                size = (info["height"], info["width"])
            else:  # eval_davis.py / eval_mevis.py from the prediction
                size = tuple(rec["masks"][0][0]["size"]) if rec["masks"] else frame_size(q.frames[0])
            pred = self.track(rec, T, size)
            gt = np.zeros((T, *size), np.uint8)
            for t in range(T):  # the GT indexed by the meta's frame order, as the official scripts do
                for a in ids:
                    m = masks[str(a)][t]
                    if m:
                        gt[t] += data.rle_decode(m).astype(np.uint8)
            row = {"J": float(np.mean([metrics.region_iou(p, g) for p, g in zip(pred, gt)])),
                   "F": float(np.mean([metrics.boundary_f(p, g) for p, g in zip(pred, gt)]))}
            if lay.groups:
                row["A"] = float(np.mean([metrics.pixel_accuracy(p, g > 0) for p, g in zip(pred, gt)]))
                row["type"] = info["expressions"][exp_id].get("type_id")
            if foreground is not None:
                fg = [data.decode_mask(r, *size) if isinstance(r, (dict, list)) else np.zeros(size, bool)
                      for r in foreground[vid]["masks_rle"]]
                row["R"] = float(np.mean([metrics.robustness(p, g > 0, f) for p, g, f in zip(pred, gt, fg)]))
            rows.append(row)
        if not lay.groups:  # eval_davis.py / eval_mevis.py: means over expressions, x100, 2 decimals
            J, F = np.mean([r["J"] for r in rows]), np.mean([r["F"] for r in rows])
            return {"J": round(100 * J, 2), "F": round(100 * F, 2), "J&F": round(100 * (J + F) / 2, 2),
                    "expressions": len(rows)}
        # eval_revos.py / eval_ref_sav.py: per expression x100 rounded to 2 decimals, means per type_id
        keys = ["J", "F", "A"] + (["R"] if foreground is not None else [])
        out = {}
        for type_id, group in enumerate(lay.groups):
            chosen = [r for r in rows if r["type"] == type_id]
            means = {k: float(np.mean([round(100 * r[k], 2) for r in chosen])) if chosen else float("nan") for k in keys}
            means["J&F"] = (means["J"] + means["F"]) / 2
            out[group] = means
        out["overall"] = {k: (out[lay.groups[0]][k] + out[lay.groups[1]][k]) / 2 for k in keys + ["J&F"]}
        out["expressions"] = len(rows)
        return out

    def submission(self, records: dict[str, dict], queries: list[Query], opts: EvalOptions) -> dict:
        """Annotations/{video}/{exp_id}/{frame}.png (0 / 255) zipped, as the MeViS and Ref-YouTube-VOS servers take it."""
        folder = os.path.join(os.path.dirname(os.path.abspath(opts.score or os.path.join(opts.out, "x"))), "submission")
        if os.path.exists(folder):
            shutil.rmtree(folder)
        palette = [0, 0, 0] * 255 + [255, 255, 255]  # index 255 white: read as grey or as indices, 0 / 255
        for q in queries:
            vid, exp_id, frames = self.meta[q.id]
            track = self.track(records[q.id], len(frames), frame_size(q.frames[0]))
            os.makedirs(os.path.join(folder, "Annotations", vid, exp_id), exist_ok=True)
            for name, m in zip(frames, track):
                im = Image.fromarray(m.astype(np.uint8) * 255, mode="P")
                im.putpalette(palette)
                im.save(os.path.join(folder, "Annotations", vid, exp_id, name + ".png"))
        archive = folder + ".zip"
        with zipfile.ZipFile(archive, "w", zipfile.ZIP_DEFLATED) as z:
            for base, _, files in sorted(os.walk(folder)):
                for f in sorted(files):
                    path = os.path.join(base, f)
                    z.write(path, os.path.relpath(path, folder))
        return {"submission": archive, "expressions": len(queries), "note": "scored by the benchmark's server"}


def running_ids(videos: dict) -> dict[str, list[int]]:
    """eval_davis.py get_meta_exp: expression k over the sorted videos (sorted expression ids) has mask k."""
    ids, k = {}, 0
    for vid in sorted(videos):
        for exp_id in sorted(videos[vid]["expressions"]):
            ids[f"{vid}/{exp_id}"] = [k]
            k += 1
    return ids


def frame_size(path: str) -> tuple[int, int]:
    with Image.open(path) as im:
        return im.size[1], im.size[0]


# ----------------------------------------------------------------------------- grounded captions

GCG_PROMPT = "<image>\n" + data.GCG_QUESTION


def gcg_caption_and_phrases(text: str) -> tuple[str, list[str]]:
    """sa2va_eval_gcg.py process_and_save_output: the caption without tags and [SEG], and the <p> phrases."""
    text = text.replace("<s>", "").replace("\n", "").replace("  ", " ")
    text = text.split("ASSISTANT: ")[-1]
    phrases = [p.strip() for p in re.findall(r"<p>(.*?)</p>", text)]
    caption = re.sub(r"<.*?>", "", text).replace("[SEG]", "")
    return " ".join(caption.split()).strip("'").strip(), phrases


class GCGBench:
    """GranD-f GCG val/test (sa2va_eval_gcg.py + metrics_gcg.py)."""

    def __init__(self, root: str, name: str, split: str):
        if split not in ("val", "test"):
            raise ValueError(f"gcg has splits val and test, not {split!r}")
        gt = os.path.join(root, "glamm_data", "annotations", "gcg_val_test")
        self.masks_gt = official_data.load_annotations(os.path.join(gt, f"{split}_gcg_coco_mask_gt.json"))
        self.caps_gt = official_data.load_annotations(os.path.join(gt, f"{split}_gcg_coco_caption_gt.json"))
        images = os.path.join(root, "glamm_data", "images", "grandf", "val_test")
        self.queries = [Query(str(im["id"]), GCG_PROMPT, image=os.path.join(images, im["file_name"]))
                        for im in self.caps_gt["images"]]

    def predict(self, model, queries: list[Query], opts: EvalOptions) -> list[dict]:
        return predict_images(model, queries, opts)

    def score(self, records: dict[str, dict], queries: list[Query], opts: EvalOptions) -> dict:
        gt_masks: dict[str, list] = {q.id: [] for q in queries}
        for a in self.masks_gt["annotations"]:
            gt_masks.setdefault(str(a["image_id"]), []).append(data.rle_decode(a["segmentation"]))
        gt_caps = {str(a["image_id"]): a for a in self.caps_gt["annotations"]}
        preds, captions, phrases = {}, {}, {}
        for q in queries:
            rec = records[q.id]
            preds[q.id] = [data.rle_decode(m[0]) for m in rec["masks"]]
            captions[q.id], phrases[q.id] = gcg_caption_and_phrases(rec["text"])
        ids = sorted(q.id for q in queries)  # COCOeval's image order, which breaks the ties of the equal scores
        out = {"AP50": metrics.ap50([preds[i] for i in ids], [gt_masks[i] for i in ids]),
               "mIoU": float(np.mean([metrics.gcg_miou(preds[i], gt_masks[i]) for i in ids]))}
        out["phrase_match"] = metrics.phrase_match([gt_masks[i] for i in ids], [gt_caps[i]["labels"] for i in ids],
                                                   [preds[i] for i in ids], [phrases[i] for i in ids])
        if opts.bert:
            from model.bert import PhraseEncoder
            encoder = PhraseEncoder.from_folder(opts.bert)
            out["recall"] = metrics.gcg_recall([gt_masks[i] for i in ids], [gt_caps[i]["labels"] for i in ids],
                                               [preds[i] for i in ids], [phrases[i] for i in ids], encoder.similarity)
        else:
            out["recall"] = None
            out["recall_note"] = "needs --bert (a local bert-base-uncased folder)"
        out.update(caption_scores({q.id: [gt_caps[q.id]["caption"]] for q in queries},
                                  {q.id: [captions[q.id]] for q in queries}))
        out["images"] = len(queries)
        return out


def java_and_pycocoevalcap() -> bool:
    """METEOR and the official caption tokenizer need both (an optional extra, never required)."""
    return shutil.which("java") is not None and importlib.util.find_spec("pycocoevalcap") is not None


def caption_scores(gts: dict[str, list[str]], res: dict[str, list[str]]) -> dict:
    """CIDEr (ours) and METEOR (pycocoevalcap's Java scorer, when it can run) of the captions."""
    if java_and_pycocoevalcap():
        from pycocoevalcap.meteor.meteor import Meteor
        from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer
        tok = PTBTokenizer()
        gts_t = tok.tokenize({k: [{"caption": c} for c in v] for k, v in gts.items()})
        res_t = tok.tokenize({k: [{"caption": c} for c in v] for k, v in res.items()})
        meteor, _ = Meteor().compute_score(gts_t, res_t)
        cider, _ = metrics.cider(gts_t, res_t)
        return {"CIDEr": cider, "METEOR": meteor, "tokenizer": "pycocoevalcap PTBTokenizer"}
    gts_t = {k: [metrics.ptb_tokenize(c) for c in v] for k, v in gts.items()}
    res_t = {k: [metrics.ptb_tokenize(c) for c in v] for k, v in res.items()}
    cider, _ = metrics.cider(gts_t, res_t)
    return {"CIDEr": cider, "METEOR": None, "METEOR_note": "needs Java and pycocoevalcap",
            "tokenizer": "metrics.ptb_tokenize"}


# ----------------------------------------------------------------------------- image VQA (VLMEvalKit TSV)

MCQ_SUFFIX = "\nAnswer with the option's letter from the given choices directly."
YORN_SUFFIX = " Answer the question using a single word or phrase."
MME_GROUPS = {"perception": ("OCR", "artwork", "celebrity", "color", "count", "existence", "landmark", "position",
                             "posters", "scene"),
              "cognition": ("code_reasoning", "commonsense_reasoning", "numerical_calculation", "text_translation")}
OPTIONS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"


def read_tsv(path: str) -> list[dict]:
    """A VLMEvalKit TSV: a header row, then one row a question; images base64 (or the index of the row holding it)."""
    import csv
    csv.field_size_limit(1 << 31)
    try:
        with open(path, newline="", encoding="utf-8") as f:
            rows = list(csv.DictReader(f, delimiter="\t"))
    except UnicodeDecodeError:
        raise ValueError(f"{path} is not UTF-8 text; give a VLMEvalKit TSV (index, question, answer and image "
                         "columns)") from None
    if not rows or not {"index", "question", "answer"} <= rows[0].keys():
        raise ValueError(f"{path} is not a VLMEvalKit TSV (it needs index, question, answer and image columns)")
    return rows


def _blank(v) -> bool:
    return v is None or v == "" or v.lower() == "nan"


class VQABench:
    """The VLMEvalKit fork's Sa2VA prompts (vlmeval/vlm/sa2va_chat.py) and exact answer matching:
    multiple choice (`can_infer`, circular groups where the TSV holds copies with index + k x 1e6)
    or yes/no (`YOrN_Extraction`; MME's acc + acc+ per category when its categories are there)."""

    def __init__(self, root: str, name: str, split: str):
        self.rows = read_tsv(root)
        self.mcq = "A" in self.rows[0]
        self.by_index = by_index = {r["index"]: r for r in self.rows}
        self.queries = []
        for r in self.rows:
            image = r.get("image", "")
            while image in by_index and by_index[image] is not r:  # the row's image is another row's
                image = by_index[image].get("image", "")
            if _blank(image):
                raise ValueError(f"row {r['index']} of {root} has no image")
            self.queries.append(Query(r["index"], self.prompt(r), image=image))
        if not self.mcq and not all(r["answer"].strip().lower() in ("yes", "no") for r in self.rows):
            raise ValueError(f"{root} is neither multiple choice (columns A, B, ...) nor yes/no; open answers need a judge")

    def options(self, r: dict) -> dict[str, str]:
        return {c: r[c] for c in OPTIONS if c in r and not _blank(r[c])}

    def prompt(self, r: dict) -> str:
        if not self.mcq:
            return "<image>\n" + r["question"] + YORN_SUFFIX
        q = r["question"]
        if not _blank(r.get("hint")):
            q = r["hint"] + "\n" + q
        opts = self.options(r)
        for k, v in opts.items():
            q += f"\n{k}. {v}"
        cn = re.search(r"[\u4e00-\u9fff]", q) is not None
        q += ("\n请直接回答选项字母。" if cn else MCQ_SUFFIX) if opts else ("\n请直接回答问题。" if cn else "\nAnswer the question directly.")
        return "<image>\n" + q

    def predict(self, model, queries: list[Query], opts: EvalOptions) -> list[dict]:
        decoded = [Query(q.id, q.prompt, image=np.asarray(Image.open(io.BytesIO(base64.b64decode(q.image))).convert("RGB")))
                   for q in queries]
        out = predict_images(model, decoded, opts)
        for o in out:
            o["masks"] = []
            for w in ("<|end|>", "<|endoftext|>", "<|im_end|>"):
                o["text"] = o["text"].replace(w, "")
        return out

    def score(self, records: dict[str, dict], queries: list[Query], opts: EvalOptions) -> dict:
        rows = [self.by_index[q.id] for q in queries]
        right = {}
        for r in rows:
            answer = records[r["index"]]["text"]
            if self.mcq:
                right[r["index"]] = can_infer(answer, self.options(r)) == r["answer"].strip()
            else:
                right[r["index"]] = yorn(answer) == r["answer"].strip().capitalize()
        out = {"accuracy": 100 * float(np.mean(list(right.values()))), "questions": len(rows)}
        if self.mcq:
            groups: dict[int, list[bool]] = {}
            for r in rows:
                groups.setdefault(int(float(r["index"])) % 1_000_000, []).append(right[r["index"]])
            if any(len(g) > 1 for g in groups.values()):
                out["circular_accuracy"] = 100 * float(np.mean([all(g) for g in groups.values()]))
        elif "category" in rows[0] and {r["category"] for r in rows} <= set(sum(MME_GROUPS.values(), ())):
            out.update(mme_scores(rows, right))
        return out


def can_infer(answer: str, choices: dict[str, str]) -> str | bool:
    """vlmeval/utils/matching_util.py can_infer: the one option letter standing alone in the
    answer, else the one option whose text the answer contains."""
    for err in ("Sorry, I can't help with images of people yet.", "I can't process this file.",
                "I'm sorry, but without the image provided", "Cannot determine the answer"):
        if err in answer:
            return "Z"
    mod = answer
    for c in ".()[],:;!*#{}":
        mod = mod.replace(c, " ")
    splits = [x.strip() for x in mod.split()]
    found = [c for c in choices if c in splits]
    if len(found) == 1:
        return found[0]
    if not found and sum(c in splits for c in ("Z", "")) == 1:
        return "Z"
    lower = answer.lower()
    cands = [k for k, v in choices.items() if str(v).lower() in lower]
    return cands[0] if len(cands) == 1 else False


def process_punctuation(text: str) -> str:
    """vlmeval/smp/misc.py process_punctuation (its `re.UNICODE` lands in the count argument, kept)."""
    out = text
    comma = re.compile(r"(\d)(,)(\d)")
    period = re.compile(r"(?!<=\d)(\.)(?!\d)")
    for p in [";", r"/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?", "!"]:
        if (p + " " in text or " " + p in text) or re.search(comma, text) is not None:
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    return period.sub("", out, re.UNICODE)


def yorn(answer: str) -> str:
    """vlmeval YOrN_Extraction."""
    words = process_punctuation(answer.lower()).split()
    if "yes" in words and "no" not in words:
        return "Yes"
    if "no" in words and "yes" not in words:
        return "No"
    return "Unknown"


def mme_scores(rows: list[dict], right: dict[str, bool]) -> dict:
    """MME_rating: per category acc + acc+ (both questions of an image right), x100; perception and cognition sums."""
    stats: dict[str, dict[str, list[bool]]] = {}
    for r in rows:
        stats.setdefault(r["category"], {}).setdefault(r.get("image_path") or r["image"][:64], []).append(right[r["index"]])
    scores = {c: 100 * float(np.mean(sum(v.values(), []))) + 100 * float(np.mean([all(x) for x in v.values()]))
              for c, v in stats.items()}
    out = {group: sum(scores.get(c, 0.0) for c in cats) for group, cats in MME_GROUPS.items()}
    return {**out, "categories": scores}


# ----------------------------------------------------------------------------- the run

def open_benchmark(opts: EvalOptions):
    split = opts.split or "val"
    if opts.benchmark == "vqa":
        if not os.path.isfile(opts.data):
            raise ValueError(f"--data {opts.data} must be a VLMEvalKit TSV file for vqa")
    elif not os.path.isdir(opts.data):
        raise ValueError(f"--data {opts.data} is not a folder; give the data root in the official layout")
    try:
        if opts.benchmark in REFCOCO:
            return RefCOCOBench(opts.data, opts.benchmark, split)
        if opts.benchmark in VOS:
            return VOSBench(opts.data, opts.benchmark, split)
        if opts.benchmark == "gcg":
            return GCGBench(opts.data, opts.benchmark, split)
        return VQABench(opts.data, opts.benchmark, split)
    except (KeyError, TypeError, IndexError) as e:
        raise ValueError(f"{opts.benchmark} under {opts.data}: the annotations do not have the official layout "
                         f"({type(e).__name__}: {e})") from None


def read_predictions(paths: list[str]) -> dict[str, dict]:
    """Records by query id from prediction files; a last line cut by a kill is ignored."""
    out = {}
    for path in paths:
        with open(path, encoding="utf-8") as f:
            lines = f.read().split("\n")
        for k, line in enumerate(lines):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                if k >= len(lines) - 2:  # the unfinished last line of an interrupted run
                    continue
                raise ValueError(f"{path} line {k + 1} is not JSON; the predictions file is damaged") from None
            out[rec["id"]] = rec
    return out


def checkpoint_hash(folder: str) -> str:
    """sha256 over the folder's config and weights files (sorted by name)."""
    h = hashlib.sha256()
    for name in sorted(os.listdir(folder)):
        if name.endswith((".safetensors", ".bin", ".pth")) or name == "config.json":
            h.update(name.encode())
            with open(os.path.join(folder, name), "rb") as f:
                for block in iter(lambda: f.read(1 << 24), b""):
                    h.update(block)
    return h.hexdigest()


def table(benchmark: str, split: str, result: dict) -> str:
    """The metrics as a markdown table, nested groups flattened ("referring J&F")."""
    lines = [f"| {benchmark} {split} | |", "| --- | --- |"]

    def walk(prefix: str, d: dict):
        for k, v in d.items():
            if k == "categories":
                continue
            if isinstance(v, dict):
                walk(f"{prefix}{k} ", v)
            else:
                lines.append(f"| {prefix}{k} | {f'{v:.4f}' if isinstance(v, float) else '-' if v is None else v} |")
    walk("", result)
    return "\n".join(lines)


def evaluate(opts: EvalOptions):
    if opts.batch_size < 1 or opts.max_new_tokens < 1 or opts.key_frames < 1:
        raise ValueError("--batch-size, --max-new-tokens and --key-frames must be at least 1")
    if opts.sam2_original and not os.path.isfile(opts.sam2_original):
        raise ValueError(f"--sam2-original {opts.sam2_original} is not a file; give Meta's sam2.1_hiera_large.pt")
    bench = open_benchmark(opts)
    split = opts.split or "val"
    queries = bench.queries[:opts.limit] if opts.limit else bench.queries
    if opts.score is not None:
        records = read_predictions([opts.score])
        missing = [q.id for q in queries if q.id not in records]
        if missing:
            raise ValueError(f"{opts.score} lacks {len(missing)} of the {len(queries)} queries (e.g. {missing[0]}); "
                             "finish the run that wrote it")
        result = bench.score(records, queries, opts)
        print(table(opts.benchmark, split, result))
        return result
    if opts.out is None:
        raise ValueError("give --out to evaluate a checkpoint (--model, default the shipped one), or --score "
                         "PREDICTIONS to rescore")
    if opts.model is None:
        from sa2va import shipped_model
        opts.model = shipped_model()
    rank, world = _init_distributed()
    try:
        return _run(opts, bench, queries, split, rank, world)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def _init_distributed() -> tuple[int, int]:
    if "RANK" not in os.environ:
        return 0, 1
    dist.init_process_group("gloo")  # a barrier and a broadcast; the model runs on each rank's own device
    return dist.get_rank(), dist.get_world_size()


def _run(opts: EvalOptions, bench, queries: list[Query], split: str, rank: int, world: int) -> dict | None:
    from sa2va import Sa2VA
    options = {k: v for k, v in dataclasses.asdict(opts).items() if k not in RESUMABLE}
    saved = os.path.join(opts.out, "options.json")
    if os.path.isfile(saved):
        with open(saved) as f:
            before = json.load(f)
        changed = [k for k in options if before.get(k) != options[k]]
        if changed:
            raise ValueError(f"--out {opts.out} holds an evaluation with other settings ({', '.join(changed)}); "
                             "give the same options to resume it, or a new --out")
    elif os.path.exists(opts.out) and os.listdir(opts.out):
        raise ValueError(f"--out {opts.out} exists and is not an evaluation folder; give a new or empty folder")
    if world > 1:
        dist.barrier()  # every rank has looked before rank 0 writes
    if rank == 0 and not os.path.isfile(saved):
        os.makedirs(opts.out, exist_ok=True)
        with open(saved + ".tmp", "w") as f:
            json.dump(options, f, indent=1)
        os.replace(saved + ".tmp", saved)
    if world > 1:
        dist.barrier()
    shards = sorted(os.path.join(opts.out, f) for f in os.listdir(opts.out) if re.fullmatch(r"predictions\.rank\d+\.jsonl", f))
    done = read_predictions(shards)
    mine = [q for i, q in enumerate(queries) if i % world == rank and q.id not in done]
    if mine:
        device = opts.device
        if device is None and torch.cuda.is_available() and world > 1:
            device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
        model = Sa2VA.from_pretrained(opts.model, device=device, dtype=opts.dtype, compile=opts.compile)
        if opts.sam2_original:
            model.load_original_sam2(opts.sam2_original, opts.sam2_original_config)
        path = os.path.join(opts.out, f"predictions.rank{rank}.jsonl")
        _drop_cut_line(path)
        step = opts.batch_size if isinstance(bench, (RefCOCOBench, GCGBench, VQABench)) else 1
        bar = tqdm(total=len(mine), desc=f"{opts.benchmark} rank {rank}", unit="query", disable=rank != 0 and world > 1)
        with open(path, "a", encoding="utf-8") as f:
            for i in range(0, len(mine), step):
                for rec in bench.predict(model, mine[i:i + step], opts):
                    f.write(json.dumps(rec) + "\n")
                f.flush()
                bar.update(len(mine[i:i + step]))
        bar.close()
    if world > 1:
        dist.barrier()
    if rank != 0:
        return None
    shards = sorted(os.path.join(opts.out, f) for f in os.listdir(opts.out) if re.fullmatch(r"predictions\.rank\d+\.jsonl", f))
    records = read_predictions(shards)
    with open(os.path.join(opts.out, "predictions.jsonl.tmp"), "w", encoding="utf-8") as f:
        for q in queries:
            f.write(json.dumps(records[q.id]) + "\n")
    os.replace(os.path.join(opts.out, "predictions.jsonl.tmp"), os.path.join(opts.out, "predictions.jsonl"))
    t0 = time.perf_counter()
    result = bench.score(records, queries, opts)
    summary = {"benchmark": opts.benchmark, "split": split, "metrics": result, "queries": len(queries),
               "model": opts.model, "checkpoint_sha256": checkpoint_hash(opts.model), "options": dataclasses.asdict(opts),
               "protocol": {"key_frame_mode": opts.key_frame_mode, "key_frames": opts.key_frames,
                            "sam2_original": opts.sam2_original is not None,
                            "official": opts.key_frame_mode == "first" and opts.key_frames == NUM_KEY_FRAMES
                            and opts.max_new_tokens == 2048 and not opts.limit and opts.sam2_original is None},
               "scoring_s": round(time.perf_counter() - t0, 3)}
    with open(os.path.join(opts.out, "results.json.tmp"), "w") as f:
        json.dump(summary, f, indent=1)
    os.replace(os.path.join(opts.out, "results.json.tmp"), os.path.join(opts.out, "results.json"))
    protocol = "official" if summary["protocol"]["official"] else (
        f"key frames {opts.key_frame_mode} x{opts.key_frames}, max {opts.max_new_tokens} new tokens"
        + (", original SAM-2 propagation" if opts.sam2_original else "")
        + (f", first {opts.limit} queries" if opts.limit else ""))
    print(table(opts.benchmark, split, {**result, "protocol": protocol}))
    return summary


def _drop_cut_line(path: str):
    """An interrupted run can leave half a line at the end of its shard: cut it before appending."""
    if not os.path.isfile(path):
        return
    with open(path, "rb") as f:
        content = f.read()
    end = content.rfind(b"\n") + 1
    if end != len(content):
        with open(path, "r+b") as f:
            f.truncate(end)


def main(argv=None):
    opts = parse(EvalOptions, argv, __doc__.split("\n\n")[0], prog="eval.py")
    run("eval.py", lambda: evaluate(opts))


if __name__ == "__main__":
    main()
