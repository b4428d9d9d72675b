"""The official Sa2VA training data, read as the data release lays it out, into training records.

    python official_data.py check data/                     # datasets found, samples, problems
    python official_data.py check data/ --recipe in30-8b    # ... and the recipe's mixture
    torchrun --nproc_per_node 8 train.py --model ... --data data/ --recipe in30-8b --out runs/sa2va

Every layout of the release (the DATA_ROOT of `projects/sa2va/configs/*.py`) has a reader: a
`data.Records` whose `record(index, rng)` is one sample in the JSONL format of `data.TrainingData`,
drawn as the official dataset class draws it (`projects/sa2va/datasets/sa2va_data_0*.py`):

| reader | official class | one sample |
| --- | --- | --- |
| RefCOCO (+, g) | Sa2VA01RefSeg | an image; 5 of its referred objects drawn with replacement, one question each |
| LLaVA | LLaVADataset | a LLaVA-665k conversation |
| RefVOS (ReVOS, MeViS, Ref-YTVOS, Ref-DAVIS17) | Sa2VA03RefVOS | a video; 5 expressions with replacement, 5 frames |
| RefSAV | Sa2VA03RefVOS (refsav) | an SA-V video at 6 fps (every 4th frame); 5 objects, 5 frames |
| ChatUniVi | Sa2VA04VideoQA | a video conversation on 5 frames, one from each fifth of the video |
| GCG (RefCOCOg, GranDf, OpenPSG, Flickr30k) | Sa2VA05GCGDataset | a caption with `<p> phrase </p> [SEG]` |
| Osprey | Sa2VA06VPDataset | `<vp>` regions and a conversation or descriptions about them |

A reader's randomness at load time (RefCOCO's one sentence per object) comes from its seed,
per sample from the rng it is given, so a sample is a function of (seed, epoch, index).

Deviations, all deliberate:
  * a sample that cannot be built is skipped and reported (data.Skipped), where the official
    datasets draw another index at random or stop;
  * LLaVA samples without an image are left out at load when the recipe skips them (the official
    dataset keeps them in its length and replaces each by a random other sample);
  * parts of a mask are OR-ed where pycocotools users sum them (the same foreground);
  * SA-V videos are decoded with av, the official code uses OpenCV (both are FFmpeg);
  * pickles are read with a restricted unpickler (plain containers, strings, numbers only).
"""
import json
import math
import os
import pickle
import sys
from collections import Counter, defaultdict
from dataclasses import dataclass

import numpy as np
from PIL import Image, UnidentifiedImageError

from cli import arg, parse, run
from data import JsonlRecords, Records, rle_counts

# ----------------------------------------------------------------------------- templates
# projects/sa2va/datasets/common.py, verbatim (repeats included: they weigh the draw).

SEG_QUESTIONS = [
    "Can you segment the {class_name} in this image?",
    "Please segment {class_name} in this image.",
    "What is {class_name} in this image? Please respond with segmentation mask.",
    "What is {class_name} in this image? Please output segmentation mask.",

    "Can you segment the {class_name} in this image?",
    "Please segment {class_name} in this image.",
    "What is {class_name} in this image? Please respond with segmentation mask?",
    "What is {class_name} in this image? Please output segmentation mask?",

    "Could you provide a segmentation mask for the {class_name} in this image?",
    "Please identify and segment the {class_name} in this image.",
    "Where is the {class_name} in this picture? Please respond with a segmentation mask.",
    "Can you highlight the {class_name} in this image with a segmentation mask?",

    "Could you provide a segmentation mask for the {class_name} in this image?",
    "Please identify and segment the {class_name} in this image.",
    "Where is the {class_name} in this picture? Please respond with a segmentation mask.",
    "Can you highlight the {class_name} in this image with a segmentation mask?",
]

ANSWER_LIST = [
    "It is [SEG].",
    "Sure, [SEG].",
    "Sure, it is [SEG].",
    "Sure, the segmentation result is [SEG].",
    "[SEG].",
]

GCG_QUESTIONS = [
    "Could you please give me a detailed description of the image? Please respond with interleaved segmentation masks for the corresponding parts of the answer.",
    "Can you provide a thorough description of this image? Please output with interleaved segmentation masks for the corresponding phrases.",
    "Please describe in detail the contents of the image. Please respond with interleaved segmentation masks for the corresponding parts of the answer.",
    "Could you give a comprehensive explanation of what can be found within this picture? Please output with interleaved segmentation masks for the corresponding phrases.",
    "Could you give me an elaborate explanation of this picture? Please respond with interleaved segmentation masks for the corresponding phrases.",
    "Could you provide me with a detailed analysis of this photo? Please output with interleaved segmentation masks for the corresponding parts of the answer.",
]

VP_QUESTIONS = [
    "Can you provide me with a detailed description of the region in the picture marked by <region>?",
    "I'm curious about the region represented by <region> in the picture. Could you describe it in detail?",
    "What can you tell me about the region indicated by <region> in the image?",
    "What details can you give me about the region outlined by <region> in the photo?",
    "Please provide me with a comprehensive description of the region marked with <region> in the image.",
    "Can you give me a detailed account of the region labeled as <region> in the picture?",
    "I'm interested in learning more about the region represented by <region> in the photo. Can you describe it in detail?",
    "What is the region outlined by <region> in the picture like? Could you give me a detailed description?",
    "Please describe the region <region> in the image in detail.",
    "Can you offer a thorough analysis of the region <region> in the image?",
    "Could you elaborate on the region highlighted by <region> in the picture provided?",
    "Please share more information about the zone emphasized with <region> in the photo.",
    "What insights can you give about the area denoted by <region> in the image presented?",
    "Can you share a comprehensive rundown of the region denoted by <region> in the presented image?",
    "I'd like to know more about the region highlighted by <region> in the picture provided.",
    "Work through the important details of the area <region> in the image.",
    "Illustrate the area represented by <region> through a descriptive explanation.",
    "Examine the region <region> closely and share its details.",
]

NUM_OBJECTS = 5  # select_number / num_classes_per_sample of every segmentation dataset
SHORT_ANSWER = " Answer the question using a single word or phrase."  # Osprey short-form LIMIT


def pick(options: list, rng: np.random.Generator):
    """random.choice, from the sample's rng."""
    return options[int(rng.integers(len(options)))]


def seg_conversation(phrases: list[str], rng: np.random.Generator) -> list[dict]:
    """One segmentation question and answer per phrase; '<image>\\n' opens the first question."""
    conversation = []
    for i, question in enumerate(phrases):
        conversation.append({"from": "human", "value": ("<image>\n" if i == 0 else "") + question})
        conversation.append({"from": "gpt", "value": pick(ANSWER_LIST, rng)})
    return conversation


# ----------------------------------------------------------------------------- files

class _Refused(pickle.UnpicklingError):
    pass


class _PlainUnpickler(pickle.Unpickler):
    """Builds only what pickle's own opcodes build (lists, dicts, tuples, str, bytes, numbers,
    booleans, None) plus sets and protocol 2's bytes (`_codecs.encode`); any other global, so
    any object or function call, is refused before it is looked up."""
    ALLOWED = {("builtins", "set"), ("builtins", "frozenset"), ("__builtin__", "set"),
               ("__builtin__", "frozenset"), ("_codecs", "encode")}

    def find_class(self, module, name):
        if (module, name) in self.ALLOWED:
            return super().find_class(module, name)
        raise _Refused(f"it asks for {module}.{name}")

    def persistent_load(self, pid):
        raise _Refused("it holds a persistent reference")


def load_pickle(path: str):
    """A pickle of plain containers, strings and numbers (the RefCOCO refs, some mask dicts);
    anything else is refused with a one-line error, and nothing in the file runs."""
    try:
        with open(path, "rb") as f:
            return _PlainUnpickler(f, encoding="utf-8").load()
    except _Refused as e:
        raise ValueError(f"{path} is refused: {e}; only pickles of plain containers, strings and numbers are "
                         "read (convert it to JSON if it holds more)") from None
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, UnicodeDecodeError, IndexError, KeyError,
            AttributeError) as e:
        raise ValueError(f"{path} is not a readable pickle ({type(e).__name__}: {e})") from None


def load_json(path: str):
    try:
        with open(path, "rb") as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not JSON ({e})") from None


def load_annotations(path: str):
    """JSON, or a plain pickle for .pkl / .p."""
    if not os.path.isfile(path):
        raise ValueError(f"{path} does not exist")
    return load_pickle(path) if path.endswith((".pkl", ".p")) else load_json(path)


def _expect(value, kind, what: str):
    if not isinstance(value, kind):
        names = " or ".join(k.__name__ for k in (kind if isinstance(kind, tuple) else (kind,)))
        raise ValueError(f"{what} must be a {names}, got {type(value).__name__}")
    return value


def image_size(path: str) -> tuple[int, int]:
    """(W, H) from the file header; ValueError if it is missing or not an image."""
    try:
        with Image.open(path) as im:
            return im.size
    except FileNotFoundError:
        raise ValueError("missing image") from None
    except (UnidentifiedImageError, OSError):
        raise ValueError("unreadable image") from None


def mask_problem(mask, size: tuple[int, int] | None) -> str | None:
    """What is wrong with a MASK (RLE, polygons, or a list of RLEs) for an image of size (W, H), if anything."""
    parts = mask if isinstance(mask, list) and mask and all(isinstance(m, dict) for m in mask) else [mask]
    for m in parts:
        if isinstance(m, dict):
            try:
                rle_counts(m)
            except ValueError:
                return "broken RLE mask"
            if size is not None and list(m["size"]) != [size[1], size[0]]:
                return "mask size differs from the image"
        elif isinstance(m, list) and m and all(isinstance(p, list) for p in m):
            if any(len(p) < 6 or len(p) % 2 or not all(isinstance(v, (int, float)) for v in p) for p in m):
                return "broken polygon"
        else:
            return "mask of unknown format"
    return None


# ----------------------------------------------------------------------------- image referring segmentation

class RefCOCO(Records):
    """RefCOCO / RefCOCO+ / RefCOCOg (Sa2VA01RefSeg on mmdet's RefCocoDataset).

    folder holds instances.json (COCO) and the refs pickle (refs(unc).p, refs(umd).p): a list of
    {ref_id, ann_id, image_id, split, sentences: [{raw}]}. One sample per image of the split;
    each referred annotation keeps one of its sentences, drawn at load and lower-cased (text_mode
    'random'; refs sharing an annotation: the last one's sentences, as `ann.update(ref)` leaves them).
    """

    def __init__(self, folder: str, refs: str = "refs(unc).p", images: str = "coco2014/train2014",
                 split: str = "train", seed: int = 0, name: str = "RefCOCO"):
        self.name, self.images = name, os.path.join(folder, images)
        refs_path, ann_path = os.path.join(folder, refs), os.path.join(folder, "instances.json")
        splits = _expect(load_annotations(refs_path), list, f"{refs_path}")
        coco = _expect(load_annotations(ann_path), dict, f"{ann_path}")
        anns = {a["id"]: a for a in _expect(coco.get("annotations"), list, f"{ann_path} 'annotations'")}
        files = {im["id"]: im["file_name"] for im in _expect(coco.get("images"), list, f"{ann_path} 'images'")}
        by_ann, self.missing = {}, Counter()
        for ref in splits:
            if not isinstance(ref, dict) or not {"ann_id", "image_id", "split", "sentences"} <= ref.keys():
                raise ValueError(f"{refs_path}: a ref is not a dict with ann_id, image_id, split and sentences")
            if ref["split"] != split:
                continue
            if ref["ann_id"] not in anns:
                self.missing["ref's annotation not in instances.json"] += 1
                continue
            by_ann[ref["ann_id"]] = ref
        rng = np.random.default_rng(seed)
        per_image = defaultdict(list)
        for ann_id, ref in by_ann.items():
            texts = [s["raw"].lower() for s in ref["sentences"]]
            if not texts:
                self.missing["ref without sentences"] += 1
                continue
            per_image[ref["image_id"]].append((texts[int(rng.integers(len(texts)))], anns[ann_id]["segmentation"]))
        self.entries = []
        for image_id, objects in per_image.items():
            if image_id not in files:
                self.missing["ref's image not in instances.json"] += 1
                continue
            self.entries.append((files[image_id], image_id, objects))
        if not self.entries:
            raise ValueError(f"{refs_path} has no ref of split {split!r}")

    def __len__(self):
        return len(self.entries)

    def where(self, index):
        return f"{self.name} image {self.entries[index][1]}"

    def length(self, index):
        return 100  # Sa2VA01RefSeg.modality_length

    def record(self, index, rng):
        file, _, objects = self.entries[index]
        chosen = [objects[i] for i in rng.choice(len(objects), NUM_OBJECTS, replace=True)]
        questions, phrases = [], []
        for text, _ in chosen:
            phrase = text[:-1] if text.endswith(".") else text
            questions.append(pick(SEG_QUESTIONS, rng).format(class_name=phrase))
            phrases.append(phrase)
        return {"image": os.path.join(self.images, file), "conversations": seg_conversation(questions, rng),
                "masks": [segmentation for _, segmentation in chosen], "phrases": phrases}

    def problems(self, index):
        file, _, objects = self.entries[index]
        try:
            size = image_size(os.path.join(self.images, file))
        except ValueError as e:
            return [str(e)]
        return [p for _, m in objects if (p := mask_problem(m, size))]


# ----------------------------------------------------------------------------- image QA

def llava_conversation(messages: list, has_image: bool) -> list[dict]:
    """Sa2VABaseDataset._process_conversations_for_encoding on a LLaVA conversation: leading gpt
    messages dropped, consecutive human messages joined, '<image>' only in the first message (and
    removed without an image), the message holding it and every answer stripped, a trailing
    question dropped."""
    _expect(messages, list, "conversations")
    while messages and isinstance(messages[0], dict) and messages[0].get("from") == "gpt":
        messages = messages[1:]
    out, text = [], ""
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("from") not in ("human", "gpt") or not isinstance(m.get("value"), str):
            raise ValueError(f"message {i} is not {{'from': 'human' or 'gpt', 'value': text}}")
        value = m["value"]
        if m["from"] == "gpt":
            out += [{"from": "human", "value": text}, {"from": "gpt", "value": value.strip()}]
            text = ""
            continue
        if "<image>" in value:
            if has_image and i != 0:
                raise ValueError(f"'<image>' is in message {i}; it belongs in the first")
            value = value.strip() if has_image else value.replace("<image>", "")
        text += value
    return out


class LLaVA(Records):
    """LLaVA-665k (LLaVADataset): [{id, image?, conversations: [{from, value}]}], images under `images`.

    skip_pure_text (the Qwen recipes): samples without an image are left out."""

    def __init__(self, path: str, images: str, skip_pure_text: bool = False, name: str = "LLaVA-665k"):
        self.name, self.images = name, images
        items = _expect(load_annotations(path), list, path)
        self.items = [x for x in items if not (skip_pure_text and isinstance(x, dict) and x.get("image") is None)]

    def __len__(self):
        return len(self.items)

    def where(self, index):
        item = self.items[index]
        return f"{self.name} {item.get('id', index) if isinstance(item, dict) else index}"

    def length(self, index):
        return 100  # LLaVADataset.modality_length

    def record(self, index, rng):
        item = _expect(self.items[index], dict, "a sample")
        record = {"conversations": llava_conversation(item.get("conversations"), item.get("image") is not None)}
        if item.get("image") is not None:
            record["image"] = os.path.join(self.images, _expect(item["image"], str, "image"))
        return record

    def problems(self, index):
        try:
            record = self.record(index, np.random.default_rng(0))
        except ValueError as e:
            return [f"bad conversation ({e})" if "message" in str(e) else "bad sample"]
        if "image" in record and not os.path.isfile(record["image"]):
            return ["missing image"]
        return [] if record["conversations"] else ["no question and answer"]


# ----------------------------------------------------------------------------- referring video segmentation

def refvos_question(expression: str, rng: np.random.Generator) -> str:
    """Sa2VA03RefVOS.dataset_map_fn: a question is asked as it is; anything else goes into a
    template with its periods removed, stripped and lower-cased."""
    if "?" in expression:
        return expression
    return pick(SEG_QUESTIONS, rng).format(class_name=expression.replace(".", "").strip().lower())


class RefVOS(Records):
    """ReVOS, MeViS, Ref-YouTube-VOS, Ref-DAVIS17 (Sa2VA03RefVOS 'default' / 'refytvos').

    expressions: {"videos": {vid: {"frames": [...], "expressions": {exp_id: {"exp", "anno_id": [...],
    "obj_id": [...]}}}}}; masks (JSON or pickle): {anno_id: [RLE or None per frame]}; frames are
    `frames/vid/frame.jpg`. running_ids (Ref-YTVOS, whose expressions have no anno_id): expression
    k of the file, counted over all videos in order (expression ids sorted), has mask entry
    str(k); "sorted": counted over the videos sorted by name (Ref-DAVIS17, as
    tools/eval/eval_davis.py `get_meta_exp` numbers them). One sample per video.
    """

    def __init__(self, expressions: str, masks: str, frames: str, running_ids: bool | str = False, name: str = "ReVOS"):
        self.name, self.frames = name, frames
        videos = _expect(_expect(load_annotations(expressions), dict, expressions).get("videos"), dict,
                         f"{expressions} 'videos'")
        self.masks = _expect(load_annotations(masks), dict, masks)
        self.entries, count = [], 0
        for vid, info in (sorted(videos.items()) if running_ids == "sorted" else videos.items()):
            _expect(info, dict, f"{expressions} video {vid}")
            frame_ids = sorted(_expect(info.get("frames"), list, f"{expressions} video {vid} 'frames'"))
            exps = []
            for exp_id in sorted(_expect(info.get("expressions"), dict, f"{expressions} video {vid} 'expressions'")):
                e = _expect(info["expressions"][exp_id], dict, f"{expressions} video {vid} expression {exp_id}")
                if running_ids:
                    ids = [str(count)]
                elif "anno_id" in e:
                    ids = [str(a) for a in e["anno_id"]]
                else:
                    raise ValueError(f"{expressions} video {vid} expression {exp_id} has no anno_id; "
                                     "Ref-YouTube-VOS's layout numbers its masks by expression (running ids)")
                count += 1
                exps.append((exp_id, _expect(e.get("exp"), str, f"{expressions} video {vid} expression {exp_id} 'exp'"), ids))
            if exps:
                self.entries.append((vid, frame_ids, exps))
        if not self.entries:
            raise ValueError(f"{expressions} has no video with expressions")

    def __len__(self):
        return len(self.entries)

    def where(self, index):
        return f"{self.name} video {self.entries[index][0]}"

    def length(self, index):
        return 10000  # Sa2VA03RefVOS.modality_length

    def object_masks(self, vid: str, exp_id: str, ids: list[str], T: int) -> list:
        """The expression's mask on every frame: the RLEs of its annotations there (OR-ed), or None."""
        tracks = []
        for a in ids:
            if a not in self.masks:
                raise ValueError(f"expression {exp_id} of video {vid}: mask {a} is not in the mask file")
            track = _expect(self.masks[a], list, f"mask {a}")
            if len(track) < T:
                raise ValueError(f"expression {exp_id} of video {vid}: mask {a} covers {len(track)} frames of {T}")
            tracks.append(track)
        return [[t[f] for t in tracks if t[f] is not None] or None for f in range(T)]

    def record(self, index, rng):
        vid, frame_ids, exps = self.entries[index]
        chosen = [exps[i] for i in rng.choice(len(exps), NUM_OBJECTS, replace=True)]
        questions = [refvos_question(exp, rng) for _, exp, _ in chosen]
        return {"video": [os.path.join(self.frames, vid, f + ".jpg") for f in frame_ids],
                "conversations": seg_conversation(questions, rng), "phrases": [exp for _, exp, _ in chosen],
                "masks": [self.object_masks(vid, exp_id, ids, len(frame_ids)) for exp_id, _, ids in chosen]}

    def problems(self, index):
        vid, frame_ids, exps = self.entries[index]
        paths = [os.path.join(self.frames, vid, f + ".jpg") for f in frame_ids]
        missing = sum(not os.path.isfile(p) for p in paths)
        found = ["missing frame"] * missing
        try:
            size = image_size(paths[0]) if not missing else None
        except ValueError:
            found.append("unreadable frame")
            size = None
        for exp_id, _, ids in exps:
            try:
                per_frame = self.object_masks(vid, exp_id, ids, len(frame_ids))
            except ValueError as e:
                found.append("mask not in the mask file" if "not in" in str(e) else "masks end before the video")
                continue
            problem = next((p for m in per_frame if m is not None and (p := mask_problem(m, size))), None)
            if problem:
                found.append(problem)
        return found


def sam2_path_patch(video_path: str, anno_path: str) -> tuple[str, str]:
    """data_utils.sam2_path_patch: Ref-SAV.json paths repeat the chunk folder around sav_train
    (sav_000/sav_train/sav_000/...); the copy before sav_train is dropped from both paths."""
    parts = video_path.split("/")
    if parts.count("sav_train") == 1:
        i = parts.index("sav_train")
        if 0 < i < len(parts) - 1 and parts[i - 1] == parts[i + 1]:
            anno = anno_path.split("/")
            del parts[i - 1], anno[i - 1]
            return "/".join(parts), "/".join(anno)
    return video_path, anno_path


class RefSAV(Records):
    """Ref-SAV (Sa2VA03RefVOS 'refsav'): Ref-SAV.json {key: {video_path, anno_path, objects: {obj_id:
    {formated, ...}}}}, paths relative to the SA-V folder; each anno JSON's "masklet" holds, per
    annotated frame (SA-V annotates at 6 fps: every 4th frame of the 24 fps video), the RLE of every
    object, column int(obj_id). One sample per video; the question is the template on `formated`.
    """
    FRAME_STEP = 4

    def __init__(self, expressions: str, videos: str, name: str = "Ref-SAV"):
        self.name, self.videos = name, videos
        data = _expect(load_annotations(expressions), dict, expressions)
        self.entries = []
        for key, info in data.items():
            if not (isinstance(info, dict) and isinstance(info.get("objects"), dict) and info["objects"]
                    and isinstance(info.get("video_path"), str) and isinstance(info.get("anno_path"), str)):
                raise ValueError(f"{expressions} entry {key} is not {{video_path, anno_path, objects}}")
            self.entries.append((key, info))

    def __len__(self):
        return len(self.entries)

    def where(self, index):
        return f"{self.name} {self.entries[index][0]}"

    def length(self, index):
        return 20000  # Sa2VA03RefVOS.modality_length for Ref-SAV

    def paths(self, info: dict) -> tuple[str, str]:
        return sam2_path_patch(os.path.join(self.videos, info["video_path"]), os.path.join(self.videos, info["anno_path"]))

    def masklet(self, anno_path: str) -> list:
        if not os.path.isfile(anno_path):
            raise ValueError(f"annotation {anno_path} does not exist")
        return _expect(_expect(load_json(anno_path), dict, anno_path).get("masklet"), list, f"{anno_path} 'masklet'")

    def record(self, index, rng):
        _, info = self.entries[index]
        video, anno = self.paths(info)
        masklet = self.masklet(anno)
        ids = list(info["objects"])
        chosen = [ids[i] for i in rng.choice(len(ids), NUM_OBJECTS, replace=True)]
        questions = [pick(SEG_QUESTIONS, rng).format(class_name=_expect(info["objects"][o].get("formated"), str, "formated"))
                     for o in chosen]
        masks = []
        for o in chosen:
            column = int(o)
            if any(not isinstance(frame, list) or column >= len(frame) for frame in masklet):
                raise ValueError(f"object {o} has no column in {anno}'s masklet")
            masks.append([frame[column] for frame in masklet])
        return {"video": video, "frame_step": self.FRAME_STEP, "conversations": seg_conversation(questions, rng),
                "masks": masks}

    def problems(self, index):
        _, info = self.entries[index]
        video, anno = self.paths(info)
        if not os.path.isfile(video):
            return ["missing video"]
        try:
            masklet = self.masklet(anno)
        except ValueError as e:
            return ["missing annotation" if "does not exist" in str(e) else "broken annotation"]
        kept = -(-count_video_frames(video) // self.FRAME_STEP)
        found = [] if len(masklet) == kept else ["masklet and video frame counts differ"]
        if any(not o.isdigit() for o in info["objects"]):
            found.append("object id is not a number")
        elif any(not isinstance(f, list) or int(o) >= len(f) for f in masklet for o in info["objects"]):
            found.append("object has no masklet column")
        problem = next((p for f in masklet if isinstance(f, list) for m in f if (p := mask_problem(m, None))), None)
        return found + ([problem] if problem else [])


def count_video_frames(path: str) -> int:
    """Frames of a video file, counted from its packets (no decoding); 0 if it cannot be read."""
    import av
    try:
        with av.open(path) as c:
            return sum(1 for p in c.demux(video=0) if p.size)
    except (av.error.FFmpegError, OSError, IndexError):
        return 0


# ----------------------------------------------------------------------------- video QA

class ChatUniVi(Records):
    """ChatUniVi video QA (Sa2VA04VideoQA): [{video, conversations}] with '<video>' tags; a .mkv that
    is missing is looked for as .mp4. Questions and answers are paired in order, '<image>\\n' opens
    the first question; 5 frames, one from each fifth of the video (all of a shorter one)."""

    def __init__(self, path: str, videos: str, name: str = "ChatUniVi"):
        self.name, self.videos = name, videos
        self.items = _expect(load_annotations(path), list, path)

    def __len__(self):
        return len(self.items)

    def where(self, index):
        item = self.items[index]
        return f"{self.name} {item.get('video', index) if isinstance(item, dict) else index}"

    def length(self, index):
        return 10000  # Sa2VA04VideoQA.modality_length

    def video(self, item: dict) -> str:
        path = os.path.join(self.videos, _expect(item.get("video"), str, "video"))
        if not os.path.exists(path) and os.path.exists(path.replace("mkv", "mp4")):
            path = path.replace("mkv", "mp4")
        return path

    def record(self, index, rng):
        item = _expect(self.items[index], dict, "a sample")
        messages = _expect(item.get("conversations"), list, "conversations")
        questions = [m["value"].replace("<video>", "").strip() for m in messages if m.get("from") == "human"]
        answers = [m["value"] for m in messages if m.get("from") != "human"]
        if len(questions) != len(answers) or not questions:
            raise ValueError(f"has {len(questions)} questions and {len(answers)} answers")
        conversation = []
        for i, (q, a) in enumerate(zip(questions, answers)):
            conversation += [{"from": "human", "value": ("<image>\n" if i == 0 else "") + q},
                             {"from": "gpt", "value": a.strip()}]
        return {"video": self.video(item), "frame_sampling": "segments", "conversations": conversation}

    def problems(self, index):
        try:
            record = self.record(index, np.random.default_rng(0))
        except (ValueError, KeyError, AttributeError, TypeError):
            return ["bad conversation"]
        return [] if os.path.isfile(record["video"]) else ["missing video"]


# ----------------------------------------------------------------------------- grounded captions

def tag_caption(caption: str, spans: list[tuple[int, int]]) -> str:
    """Every grounded span [s, e) of the caption becomes '<p> span </p> [SEG]', the last first so
    the earlier offsets stay valid (Sa2VA05GCGDataset._create_gcg_conversation)."""
    for s, e in sorted(spans, key=lambda x: x[0], reverse=True):
        caption = f"{caption[:s]}<p> {caption[s:e]} </p> [SEG]{caption[e:]}"
    return caption


class GCG(Records):
    """Grounded caption datasets (Sa2VA05GCGDataset), one sample per image, one of GCG_QUESTIONS:

    kind 'refcocog': [{img_id: {img_file_name, caption, refs: [{sentence, segmentation}]}}]; the
      caption lower-cased, a ref grounded at the first occurrence of its sentence (if any);
    kind 'generic' (GranDf, OpenPSG): [{file_name, caption, groundings: {phrase: {token_positives:
      [s, e], rle_masks: [RLE, ...]}}}];
    kind 'flickr30k': COCO json, images with a caption (those of < 3 words or a side < 32 px left
      out), annotations with tokens_positive, bbox, area, sam_mask (RLE); boxes outside the image,
      empty or thinner than a pixel, and 'ignore' ones left out.
    Masks follow the spans in caption order; an image without one is skipped.
    """

    def __init__(self, path: str, images: str, kind: str, name: str):
        self.name, self.images, self.kind = name, images, kind
        data = load_annotations(path)
        if kind == "refcocog":
            items = _expect(data, list, path)
            self.items = [next(iter(x.values())) for x in items if isinstance(x, dict) and x]
        elif kind == "generic":
            self.items = _expect(data, list, path)
        elif kind == "flickr30k":
            self.items = self._flickr(_expect(data, dict, path), path)
        else:
            raise ValueError(f"unknown GCG kind {kind!r}")

    @staticmethod
    def _flickr(coco: dict, path: str) -> list[dict]:
        anns = defaultdict(list)
        ids = [a["id"] for a in _expect(coco.get("annotations"), list, f"{path} 'annotations'")]
        if len(set(ids)) != len(ids):
            raise ValueError(f"{path} has repeated annotation ids")
        for a in coco["annotations"]:
            anns[a["image_id"]].append(a)
        items = []
        for info in _expect(coco.get("images"), list, f"{path} 'images'"):
            if len(info["caption"].split(" ")) < 3 or min(int(info["width"]), int(info["height"])) < 32:
                continue
            items.append({**info, "annotations": anns[info["id"]]})
        return items

    def __len__(self):
        return len(self.items)

    def where(self, index):
        item = self.items[index]
        name = item.get("img_file_name") or item.get("file_name") if isinstance(item, dict) else None
        return f"{self.name} {name or index}"

    def length(self, index):
        return 100  # Sa2VA05GCGDataset.modality_length

    def grounded(self, item: dict) -> tuple[str, str, list, list]:
        """(image path, caption, spans, masks) in span order."""
        spans, masks = [], []
        if self.kind == "refcocog":
            file, caption = item["img_file_name"], item["caption"].strip('"').strip().lower()
            for ref in item.get("refs", []):
                phrase = ref["sentence"]
                if phrase.lower() in caption:
                    start = caption.find(phrase.lower())
                    spans.append((start, start + len(phrase)))
                    masks.append(ref["segmentation"])
        elif self.kind == "generic":
            file, caption = item["file_name"], item["caption"].strip('"').strip()
            for phrase, g in item.get("groundings", {}).items():
                if not g["rle_masks"]:
                    raise ValueError(f"phrase {phrase!r} has no mask")
                spans.append(tuple(g["token_positives"]))
                masks.append(list(g["rle_masks"]))
        else:
            file, caption = item["file_name"], item["caption"]
            for a in item["annotations"]:
                x, y, w, h = a["bbox"]
                inter_w = max(0, min(x + w, item["width"]) - max(x, 0))
                inter_h = max(0, min(y + h, item["height"]) - max(y, 0))
                if a.get("ignore", False) or inter_w * inter_h == 0 or a["area"] <= 0 or w < 1 or h < 1:
                    continue
                spans.append(tuple(a["tokens_positive"][0]))
                masks.append(a["sam_mask"])
        order = sorted(range(len(spans)), key=lambda i: spans[i][0])
        return os.path.join(self.images, file), caption, [spans[i] for i in order], [masks[i] for i in order]

    def record(self, index, rng):
        image, caption, spans, masks = self.grounded(_expect(self.items[index], dict, "a sample"))
        if not masks:
            raise ValueError("no phrase of the caption is grounded")
        question = "<image>\n" + pick(GCG_QUESTIONS, rng).strip()
        return {"image": image, "masks": masks,
                "conversations": [{"from": "human", "value": question},
                                  {"from": "gpt", "value": tag_caption(caption, spans)}]}

    def problems(self, index):
        try:
            image, _, spans, masks = self.grounded(self.items[index])
        except (ValueError, KeyError, TypeError, AttributeError, IndexError):
            return ["bad annotation"]
        try:
            size = image_size(image)
        except ValueError as e:
            return [str(e)]
        found = [p for m in masks if (p := mask_problem(m, size))]
        return found + ([] if masks else ["no grounded phrase"])


# ----------------------------------------------------------------------------- visual prompts

OSPREY_KINDS = ("conversation", "description", "short", "part", "positive_neg")


def _clean(text: str) -> str:
    return text.replace("<", "").replace(">", "")


class Osprey(Records):
    """Osprey-724K visual prompts (Sa2VA06VPDataset): [{file_name, height, width, annotation:
    [{segmentation}], conversations | description}]; the image is looked for in each folder in turn.

    Every annotation is a <vp> region (the processor writes "There are N part regions in the
    picture: region1<vp>...</vp>, ...." after the image); '<' and '>' are removed from the text;
    'short' adds " Answer the question using a single word or phrase." to each question; a
    'description' sample asks one of VP_QUESTIONS per description (region i); a region under 4
    cells of the 16x16 token grid skips the sample (data.TrainingData). No mask loss.
    """

    def __init__(self, path: str, images: list[str], kind: str, name: str):
        if kind not in OSPREY_KINDS:
            raise ValueError(f"unknown Osprey kind {kind!r}; use one of {', '.join(OSPREY_KINDS)}")
        self.name, self.images, self.kind = name, images, kind
        self.limit = SHORT_ANSWER if kind == "short" else ""
        self.items = _expect(load_annotations(path), list, path)

    def __len__(self):
        return len(self.items)

    def where(self, index):
        item = self.items[index]
        return f"{self.name} {item.get('file_name', index) if isinstance(item, dict) else index}"

    def length(self, index):
        return 100  # Sa2VA06VPDataset.modality_length

    def image(self, file: str) -> str:
        for folder in self.images:
            if os.path.exists(os.path.join(folder, file)):
                return os.path.join(folder, file)
        raise ValueError(f"{file} is in none of the image folders")

    def conversation(self, item: dict, rng: np.random.Generator) -> list[dict]:
        if self.kind == "description":
            descriptions = item.get("description", item.get("descriptions", []))
            out = []
            for i, d in enumerate(descriptions):
                q = pick(VP_QUESTIONS, rng).strip().replace("<region>", f"region{i + 1}") + self.limit
                out += [{"from": "human", "value": ("<image>" if i == 0 else "") + q}, {"from": "gpt", "value": _clean(d)}]
            return out
        messages = []
        for i, m in enumerate(_expect(item.get("conversations"), list, "conversations")):
            value = _clean(m["value"])
            if m["from"] == "human":
                value += self.limit
                if i == 0:
                    value = "<image>" + value  # where the official region prompt goes
            messages.append({"from": m["from"], "value": value})
        return llava_conversation(messages, has_image=True)

    def record(self, index, rng):
        item = _expect(self.items[index], dict, "a sample")
        image = self.image(item["file_name"])
        W, H = image_size(image)
        if (item["width"], item["height"]) != (W, H):
            raise ValueError(f"its annotation is for {item['width']}x{item['height']} but the image is {W}x{H}")
        regions = [a["segmentation"] for a in item["annotation"]]
        if not regions:
            raise ValueError("has no region")
        return {"image": image, "regions": regions, "conversations": self.conversation(item, rng)}

    def problems(self, index):
        item = self.items[index]
        try:
            image = self.image(item["file_name"])
        except ValueError:
            return ["missing image"]
        except (KeyError, TypeError):
            return ["bad annotation"]
        try:
            size = image_size(image)
            regions = [a["segmentation"] for a in item["annotation"]]
            convo = self.conversation(item, np.random.default_rng(0))
        except ValueError as e:
            return [str(e)]
        except (KeyError, TypeError, AttributeError):
            return ["bad annotation"]
        if (item.get("width"), item.get("height")) != size:
            return ["annotation size differs from the image"]
        found = [p for m in regions if (p := mask_problem(m, size))]
        return found + ([] if regions else ["no region"]) + ([] if convo else ["no question and answer"])


# ----------------------------------------------------------------------------- the release's layout and mixtures

def _in(root, *parts):
    return os.path.join(root, *parts)


OSPREY_IMAGES = ("osprey-724k/coco/train2014", "osprey-724k/coco/val2014", "osprey-724k/coco/train2017",
                 "osprey-724k/coco/val2017")

# name -> (annotation file under the data root, reader of the root). Paths: configs/sa2va_in30_8b.py.
DATASETS = {
    "RefCOCO": ("ref_seg/refcoco/refs(unc).p",
                lambda root, seed, **_: RefCOCO(_in(root, "ref_seg/refcoco"), "refs(unc).p", seed=seed, name="RefCOCO")),
    "RefCOCO+": ("ref_seg/refcoco+/refs(unc).p",
                 lambda root, seed, **_: RefCOCO(_in(root, "ref_seg/refcoco+"), "refs(unc).p", seed=seed, name="RefCOCO+")),
    "RefCOCOg": ("ref_seg/refcocog/refs(umd).p",
                 lambda root, seed, **_: RefCOCO(_in(root, "ref_seg/refcocog"), "refs(umd).p", seed=seed, name="RefCOCOg")),
    "LLaVA-665k": ("llava_data/LLaVA-Instruct-150K/llava_v1_5_mix665k.json",
                   lambda root, seed, skip_pure_text=False, **_: LLaVA(
                       _in(root, "llava_data/LLaVA-Instruct-150K/llava_v1_5_mix665k.json"),
                       _in(root, "llava_data/llava_images"), skip_pure_text)),
    "ReVOS": ("video_datas/revos/meta_expressions_train_.json",
              lambda root, seed, **_: RefVOS(_in(root, "video_datas/revos/meta_expressions_train_.json"),
                                             _in(root, "video_datas/revos/mask_dict.json"),
                                             _in(root, "video_datas/revos"), name="ReVOS")),
    "MeViS": ("video_datas/mevis/train/meta_expressions.json",
              lambda root, seed, **_: RefVOS(_in(root, "video_datas/mevis/train/meta_expressions.json"),
                                             _in(root, "video_datas/mevis/train/mask_dict.json"),
                                             _in(root, "video_datas/mevis/train/JPEGImages"), name="MeViS")),
    "Ref-YTVOS": ("video_datas/rvos/meta_expressions/train/meta_expressions.json",
                  lambda root, seed, **_: RefVOS(_in(root, "video_datas/rvos/meta_expressions/train/meta_expressions.json"),
                                                 _in(root, "video_datas/rvos/mask_dict.pkl"),
                                                 _in(root, "video_datas/rvos/train/JPEGImages"), running_ids=True,
                                                 name="Ref-YTVOS")),
    "Ref-SAV": ("video_datas/Ref-SAV.json",
                lambda root, seed, **_: RefSAV(_in(root, "video_datas/Ref-SAV.json"), _in(root, "video_datas/sam_v_full"))),
    "ChatUniVi": ("video_datas/chat_univi/video_chat.json",
                  lambda root, seed, **_: ChatUniVi(_in(root, "video_datas/chat_univi/video_chat.json"),
                                                    _in(root, "video_datas/chat_univi/Activity_Videos"))),
    "GCG-RefCOCOg": ("glamm_data/annotations/RefCOCOg_GCG_train.json",
                     lambda root, seed, **_: GCG(_in(root, "glamm_data/annotations/RefCOCOg_GCG_train.json"),
                                                 _in(root, "glamm_data/images/coco2014/train2014"), "refcocog", "GCG-RefCOCOg")),
    "GCG-GranDf": ("glamm_data/annotations/GranDf_HA_GCG_train.json",
                   lambda root, seed, **_: GCG(_in(root, "glamm_data/annotations/GranDf_HA_GCG_train.json"),
                                               _in(root, "glamm_data/images/grandf/train"), "generic", "GCG-GranDf")),
    "GCG-Flickr30k": ("glamm_data/annotations/flickr_mergedGT_GCG_train.json",
                      lambda root, seed, **_: GCG(_in(root, "glamm_data/annotations/flickr_mergedGT_GCG_train.json"),
                                                  _in(root, "glamm_data/images/flickr30k/Flickr30K"), "flickr30k",
                                                  "GCG-Flickr30k")),
    "GCG-OpenPSG": ("glamm_data/annotations/OpenPsgGCG_train.json",
                    lambda root, seed, **_: GCG(_in(root, "glamm_data/annotations/OpenPsgGCG_train.json"),
                                                _in(root, "glamm_data/images/coco2017"), "generic", "GCG-OpenPSG")),
}
for _kind, _file in (("conversation", "osprey_conversation"), ("description", "osprey_detail_description"),
                     ("short", "osprey_short_form"), ("part", "osprey_part_level"),
                     ("positive_neg", "osprey_lvis_positive_negative")):
    DATASETS[f"Osprey-{_kind}"] = (
        f"osprey-724k/Osprey-724K/{_file}.json",
        lambda root, seed, _k=_kind, _f=_file, **_: Osprey(_in(root, f"osprey-724k/Osprey-724K/{_f}.json"),
                                                           [_in(root, p) for p in OSPREY_IMAGES], _k, f"Osprey-{_k}"))

# Your own samples beside the official data: a JSONL file in the training format (README), at the root.
DATASETS["custom"] = ("custom.jsonl", lambda root, seed, **_: JsonlRecords(_in(root, "custom.jsonl")))

# Evaluation layouts the same readers take (not in any training mixture).
EVAL_DATASETS = {
    "Ref-DAVIS17": ("video_datas/davis17/meta_expressions/valid/meta_expressions.json",
                    lambda root, seed, **_: RefVOS(_in(root, "video_datas/davis17/meta_expressions/valid/meta_expressions.json"),
                                                   _in(root, "video_datas/davis17/valid/mask_dict.pkl"),
                                                   _in(root, "video_datas/davis17/valid/JPEGImages"), running_ids="sorted",
                                                   name="Ref-DAVIS17")),
}

_SEG = {"RefCOCO": 5, "RefCOCO+": 5, "RefCOCOg": 4, "LLaVA-665k": 1, "ReVOS": 10, "MeViS": 4, "Ref-YTVOS": 4,
        "Ref-SAV": 4, "ChatUniVi": 1}
# recipe -> {dataset: repeats}: configs/sa2va_in30_{2b,8b,14b}.py, sa2va_qwenvl25/*, sa2va_qwenvl3/* and the
# first release's projects/llava_sam2/configs/sa2va_{1b,4b,8b}.py. A sample count is int(len x repeats).
RECIPES = {
    "sa2va": {"RefCOCO": 4, "RefCOCO+": 4, "RefCOCOg": 4, "LLaVA-665k": 1, "ReVOS": 10, "MeViS": 4, "Ref-YTVOS": 4,
              "Ref-SAV": 4, "ChatUniVi": 1, "GCG-RefCOCOg": 1, "GCG-GranDf": 10, "GCG-Flickr30k": 1, "GCG-OpenPSG": 1,
              "Osprey-conversation": 1, "Osprey-description": 1, "Osprey-short": 1, "Osprey-part": 1,
              "Osprey-positive_neg": 1},
    "in30-2b": {**_SEG, "GCG-RefCOCOg": 5, "GCG-GranDf": 50, "GCG-Flickr30k": 5, "GCG-OpenPSG": 5,
                "Osprey-conversation": 1, "Osprey-description": 1},
    "in30-8b": {**_SEG, "GCG-RefCOCOg": 5, "GCG-GranDf": 50, "GCG-Flickr30k": 5, "GCG-OpenPSG": 5,
                "Osprey-conversation": 1, "Osprey-description": 1},
    "in30-14b": {**_SEG, "GCG-RefCOCOg": 10, "GCG-GranDf": 100, "GCG-Flickr30k": 10, "GCG-OpenPSG": 10,
                 "Osprey-conversation": 1, "Osprey-description": 1},
    "qwen": {**_SEG, "GCG-RefCOCOg": 10, "GCG-GranDf": 100, "GCG-Flickr30k": 10, "GCG-OpenPSG": 10},
}
# world.py's shapes (the shipped model): its RefCOCO-style images, MeViS-style videos and custom.jsonl.
RECIPES["shapes"] = {"RefCOCO": 1, "MeViS": 3, "custom": 1}
SKIP_PURE_TEXT = {"qwen"}  # recipes whose LLaVA data leaves out samples without an image


class Mixture(Records):
    """Datasets concatenated with repeat factors (Sa2VABaseDataset._get_index_mapping): a dataset
    of n samples and repeats r gives int(n * r) of them, a seeded permutation of its indices tiled
    ceil(r) times (r < 1: int(n * r) distinct ones)."""

    def __init__(self, parts: list[tuple[Records, float]], seed: int = 0):
        if not parts:
            raise ValueError("a mixture needs at least one dataset")
        self.parts, self.maps, self.offsets = [p for p, _ in parts], [], [0]
        for k, (records, repeats) in enumerate(parts):
            n, total = len(records), int(len(records) * repeats)
            rng = np.random.default_rng([seed, k])
            if repeats >= 1:
                index = rng.permutation(np.tile(np.arange(n), math.ceil(repeats)))[:total]
            else:
                index = rng.choice(n, size=total, replace=False)
            self.maps.append(index)
            self.offsets.append(self.offsets[-1] + total)
        self.name = "mixture"

    def __len__(self):
        return self.offsets[-1]

    def _locate(self, index: int) -> tuple[Records, int]:
        k = int(np.searchsorted(self.offsets, index, side="right")) - 1
        return self.parts[k], int(self.maps[k][index - self.offsets[k]])

    def record(self, index, rng):
        part, i = self._locate(index)
        return part.record(i, rng)

    def where(self, index):
        part, i = self._locate(index)
        return part.where(i)

    def length(self, index):
        part, i = self._locate(index)
        return part.length(i)


def found_datasets(root: str, names=None) -> list[str]:
    """The datasets whose annotation file is under root, in table order."""
    table = {**DATASETS, **EVAL_DATASETS}
    return [n for n in (names or table) if os.path.isfile(os.path.join(root, table[n][0]))]


def open_dataset(root: str, name: str, seed: int = 0, recipe: str | None = None) -> Records:
    table = {**DATASETS, **EVAL_DATASETS}
    if name not in table:
        raise ValueError(f"unknown dataset {name!r}; known: {', '.join(table)}")
    try:
        return table[name][1](root, seed, skip_pure_text=recipe in SKIP_PURE_TEXT)
    except (KeyError, TypeError, AttributeError, IndexError) as e:
        raise ValueError(f"{name} under {root}: the annotations do not have the official layout ({type(e).__name__}: {e})") from None


def open_mixture(root: str, recipe: str, seed: int = 0) -> tuple[Mixture, list[str]]:
    """The recipe's mixture of the datasets found under root (a data root in the release's layout),
    and the recipe's datasets that are not there."""
    if recipe not in RECIPES:
        raise ValueError(f"unknown recipe {recipe!r}; use one of {', '.join(RECIPES)}")
    if not os.path.isdir(root):
        raise ValueError(f"data root {root} is not a folder")
    present = found_datasets(root, RECIPES[recipe])
    if not present:
        raise ValueError(f"{root} holds none of the {recipe} recipe's datasets; it must be laid out as the official "
                         "data release (ref_seg/, llava_data/, video_datas/, glamm_data/, osprey-724k/); "
                         "see `python official_data.py check`")
    parts = [(open_dataset(root, n, seed, recipe), RECIPES[recipe][n]) for n in present]
    return Mixture(parts, seed), [n for n in RECIPES[recipe] if n not in present]


# ----------------------------------------------------------------------------- check

@dataclass
class CheckOptions:
    command: str = arg(help="check: walk a data root and report what is there and what is wrong",
                       choices=("check",), positional=True)
    root: str = arg(help="the data root, laid out as the official data release", positional=True)
    recipe: str | None = arg(None, f"also report the mixture of a recipe ({', '.join(RECIPES)})")
    limit: int | None = arg(None, "check at most this many samples of each dataset")
    examples: int = arg(2, "samples named for each kind of problem")


def check(opts: CheckOptions, out=sys.stdout) -> int:
    """Prints, per dataset found, its samples and problems (counted by kind, with examples);
    returns the number of problems. Reads annotations and file headers, no model."""
    if not os.path.isdir(opts.root):
        raise ValueError(f"data root {opts.root} is not a folder")
    if opts.recipe is not None and opts.recipe not in RECIPES:
        raise ValueError(f"unknown recipe {opts.recipe!r}; use one of {', '.join(RECIPES)}")
    names = found_datasets(opts.root)
    table = {**DATASETS, **EVAL_DATASETS}
    if not names:
        raise ValueError(f"{opts.root} holds none of the official datasets; lay it out as the data release "
                         f"(e.g. {table['RefCOCO'][0]}, {table['ReVOS'][0]}; see official_data.DATASETS)")
    print(f"{opts.root}: {len(names)} of {len(table)} datasets found"
          + (f"; missing: {', '.join(n for n in table if n not in names)}" if len(names) < len(table) else ""), file=out)
    total, sizes = 0, {}
    for name in names:
        try:
            records = open_dataset(opts.root, name, recipe=opts.recipe)
        except (ValueError, OSError) as e:
            print(f"  {name}: cannot be read: {e}", file=out)
            total += 1
            continue
        sizes[name] = len(records)
        n = len(records) if opts.limit is None else min(opts.limit, len(records))
        kinds, examples = Counter(getattr(records, "missing", {})), defaultdict(list)
        for i in range(n):
            for p in records.problems(i):
                kinds[p] += 1
                if len(examples[p]) < opts.examples and records.where(i) not in examples[p]:
                    examples[p].append(records.where(i))
        bad = sum(kinds.values())
        total += bad
        print(f"  {name}: {len(records)} samples" + (f" ({n} checked)" if n < len(records) else "")
              + (f", {bad} problem(s)" if bad else ", no problems"), file=out)
        for p, c in kinds.most_common():
            print(f"    {c} x {p}" + (f" (e.g. {'; '.join(examples[p])})" if examples[p] else ""), file=out)
    if opts.recipe is not None:
        mix = RECIPES[opts.recipe]
        got = {n: int(sizes[n] * r) for n, r in mix.items() if n in sizes}
        print(f"recipe {opts.recipe}: {sum(got.values())} samples an epoch from "
              + ", ".join(f"{n} {sizes[n]} x {mix[n]}" for n in got)
              + (f"; not found: {', '.join(n for n in mix if n not in sizes)}" if len(got) < len(mix) else ""), file=out)
    return total


def main(argv=None):
    opts = parse(CheckOptions, argv, __doc__.split("\n\n")[0], prog="official_data.py")
    run("official_data.py", lambda: sys.exit(1 if check(opts) else 0))


if __name__ == "__main__":
    main()
