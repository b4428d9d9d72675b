"""The official dataset layouts: each read from a tiny root written in the release's exact layout
(tests/official_layout.py) into records and samples that follow the official dataset classes'
rules; the restricted unpickler; the mixtures; `official_data.py check`; a training run on
all the layouts at once."""
import io
import json
import os
import pickle
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from pycocotools import mask as mask_utils

import data
import debug_checkpoint
import official_data as od
from model.config import preset
from model.tokenizer import load_official_tokenizer
from tests.official_layout import write_official_root

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    folder = tmp_path_factory.mktemp("data")
    return folder, write_official_root(folder)


@pytest.fixture(scope="module")
def processor(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tok")
    debug_checkpoint.write_tokenizer(str(folder), "internvl")
    return data.make_processor(preset("debug-internvl"), load_official_tokenizer(str(folder)))


def rng(seed=0):
    return np.random.default_rng(seed)


def coco_polygons(polys, h, w) -> np.ndarray:
    """The official decoding: each polygon through pycocotools, summed, any positive is foreground."""
    return sum(mask_utils.decode(mask_utils.frPyObjects([p], h, w))[..., 0].astype(int) for p in polys) > 0


def small(mask: np.ndarray, g: int) -> torch.Tensor:
    return F.interpolate(torch.from_numpy(mask)[None, None].float(), size=(g, g), mode="nearest")[0, 0] > 0


def frame_of(sample, f: int, spacing: int, base: int = 10) -> int:
    """Which video frame SAM-2 frame f of a sample is (the test videos' frame t is grey base + spacing t)."""
    return int(round((sample.media.sam2_frames[f].float().mean().item() - base) / spacing))


def questions_and_answers(record) -> list[tuple[str, str]]:
    c = record["conversations"]
    return [(c[i]["value"], c[i + 1]["value"]) for i in range(0, len(c), 2)]


def seg_questions(phrase: str) -> set[str]:
    return {t.format(class_name=phrase) for t in od.SEG_QUESTIONS}


# ----------------------------------------------------------------------------- pickles

class _Boom:
    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


class _Plain:
    pass


def test_the_restricted_unpickler_reads_plain_data_and_runs_nothing(tmp_path):
    plain = {"refs": [{"ref_id": 1, "sentences": [{"raw": "héllo"}], "bbox": (1.5, 2)}], "ids": {3, 4},
             "counts": b"ab\x00", "none": None, "flag": True}
    for protocol in range(pickle.HIGHEST_PROTOCOL + 1):
        path = tmp_path / f"plain{protocol}.p"
        path.write_bytes(pickle.dumps(plain, protocol=protocol))
        assert od.load_pickle(str(path)) == plain
    marker = tmp_path / "ran"
    _Boom.marker = marker
    evil = tmp_path / "evil.p"
    evil.write_bytes(pickle.dumps({"refs": [_Boom()]}))
    with pytest.raises(ValueError, match=r"evil.p is refused: it asks for (posix|os|nt)\.system"):
        od.load_pickle(str(evil))
    assert not marker.exists()  # nothing ran
    for payload in (pickle.dumps(_Plain()), pickle.dumps(np.zeros(3)), pickle.dumps(print)):
        evil.write_bytes(payload)
        with pytest.raises(ValueError, match="refused: it asks for"):
            od.load_pickle(str(evil))
    evil.write_bytes(b"\x80\x04not a pickle")
    with pytest.raises(ValueError, match="not a readable pickle"):
        od.load_pickle(str(evil))


# ----------------------------------------------------------------------------- masks

def test_masks_decode_as_pycocotools():
    r = np.random.default_rng(0)
    for h, w in ((17, 23), (64, 48), (5, 1)):
        m = r.random((h, w)) > 0.6
        coded = mask_utils.encode(np.asfortranarray(m.astype(np.uint8)))
        assert np.array_equal(data.rle_decode(coded), m)  # bytes counts, as pycocotools returns them
        assert np.array_equal(data.rle_decode({"size": [h, w], "counts": coded["counts"].decode()}), m)
        uncompressed = {"size": [h, w], "counts": data.rle_counts(coded)}
        assert np.array_equal(data.rle_decode(uncompressed), m)
        assert data.rle_encode(m)["counts"] == coded["counts"].decode()
        parts = [data.rle_encode(m), data.rle_encode(np.roll(m, 3, axis=1))]
        assert np.array_equal(data.decode_mask(parts, h, w), m | np.roll(m, 3, axis=1))  # parts OR-ed
    # several polygons of one object: pycocotools' sum, as foreground
    polys = [[2, 2, 20, 2, 20, 12], [10, 5, 30, 5, 30, 25, 10, 25], [1.5, 20.2, 8.7, 30.1, 3.3, 31.9]]
    assert np.array_equal(data.decode_mask(polys, 33, 35), coco_polygons(polys, 33, 35))
    for bad, why in (({"size": [2, 2], "counts": "0000"}, "corrupt"), ({"size": [2, 2], "counts": "\x7f"}, "alphabet"),
                     ({"size": [2, 2], "counts": [1, 2]}, "cover 3 pixels"), ({"size": [2, 2], "counts": [5, -1]}, "corrupt"),
                     ({"counts": "0"}, "'size' and 'counts'")):
        with pytest.raises(ValueError, match=why):
            data.rle_decode(bad)


# ----------------------------------------------------------------------------- one test per layout

def test_refcoco_layouts(root, processor):
    folder, facts = root
    for name in ("RefCOCO", "RefCOCO+", "RefCOCOg"):
        reader = od.open_dataset(str(folder), name, seed=1)
        f = facts[name]
        H, W = f["size"]
        assert len(reader) == 2  # one sample per train image; the val ref adds none
        used = {}  # ann_id -> phrase: one sentence per object, drawn at load
        for i in range(len(reader)):
            for draw in range(6):
                record = reader.record(i, rng(draw))
                image_id = int(os.path.basename(record["image"])[-16:-4])
                assert os.path.isfile(record["image"]) and len(record["masks"]) == 5
                for k, (q, a) in enumerate(questions_and_answers(record)):
                    assert a in od.ANSWER_LIST and q.startswith("<image>\n") == (k == 0)
                    ann = next(a for a in f["images"][image_id] if f["objects"][a][1] == record["masks"][k])
                    sentences = [s.lower()[:-1] if s.endswith(".") else s.lower() for s in f["objects"][ann][0]]
                    phrase = next(p for p in sentences if q.removeprefix("<image>\n") in seg_questions(p))
                    assert used.setdefault(ann, phrase) == phrase
        assert used[200] == "later ref"  # the ref that comes last for a shared annotation
        assert "val only" not in str(used) and set(used) == {100, 101, 200}
        sample = data.TrainingData(reader, processor)[0, 0]
        g = 4 * processor.cfg.sam2.grid
        record = reader.record(0, np.random.default_rng([0, 0, 0]))
        for (k, frame), target in zip(sample.mask_queries.tolist(), sample.mask_targets):
            assert frame == 0 and torch.equal(target, small(coco_polygons(record["masks"][k], H, W), g))


def test_referring_video_layouts(root, processor):
    folder, facts = root
    g = 4 * processor.cfg.sam2.grid
    revos = od.open_dataset(str(folder), "ReVOS")
    f = facts["ReVOS"]
    H, W = f["size"]
    assert len(revos) == 1
    record = revos.record(0, rng(3))
    assert record["video"] == f["frames"]  # sorted, whatever the file's order
    phrases = []
    for q, a in questions_and_answers(record):
        assert a in od.ANSWER_LIST
        q = q.removeprefix("<image>\n")
        phrases.append("which box moves? it is." if q == "which box moves? it is." else  # a question: as it is
                       next(p for p in ["the two boxes"] if q in seg_questions(p)))  # else period-free, lower-cased
    assert set(phrases) == {"the two boxes", "which box moves? it is."}  # 5 draws of 2 expressions
    for phrase, per_frame in zip(phrases, record["masks"]):
        assert len(per_frame) == 8
        for t, m in enumerate(per_frame):
            assert np.array_equal(data.decode_mask(m, H, W), f["expressions"][phrase][t])  # anno ids OR-ed
    ds = data.TrainingData(revos, processor)
    sample = ds[0, 0]
    record = revos.record(0, np.random.default_rng([0, 0, 0]))
    frames = [frame_of(sample, k, 20) for k in range(5)]
    assert frames == sorted(frames) and len(set(frames)) == 5  # 8 > 6 frames: 5 distinct
    for (k, fr), target in zip(sample.mask_queries.tolist(), sample.mask_targets):
        assert torch.equal(target, small(data.decode_mask(record["masks"][k][frames[fr]], H, W), g))

    mevis = od.open_dataset(str(folder), "MeViS")
    assert len(mevis) == 2
    sample = data.TrainingData(mevis, processor)[0, 1]
    assert len(sample.media.sam2_frames) == 5  # 4 frames: drawn with replacement
    assert [frame_of(sample, k, 30, base=0) for k in range(5)] == sorted(frame_of(sample, k, 30, base=0) for k in range(5))

    ytvos = od.open_dataset(str(folder), "Ref-YTVOS")
    assert len(ytvos) == 2
    for i in range(2):
        record = ytvos.record(i, rng(i))
        for (q, _), per_frame in zip(questions_and_answers(record), record["masks"]):
            phrase = next(p for p in facts["Ref-YTVOS"] if q.removeprefix("<image>\n") in seg_questions(p))
            height = facts["Ref-YTVOS"][phrase]  # the mask numbered by the expression's running count
            assert data.decode_mask(per_frame[0], 32, 48).sum() == 4 * height
        assert data.TrainingData(ytvos, processor)[0, i].mask_targets is not None  # bytes RLE from the pickle


def test_ref_sav_layout(root, processor):
    folder, facts = root
    reader = od.open_dataset(str(folder), "Ref-SAV")
    record = reader.record(0, rng(0))
    assert record["video"].endswith("video_datas/sam_v_full/sav_train/sav_000/sav_000001.mp4")  # the doubled folder dropped
    assert os.path.isfile(record["video"]) and record["frame_step"] == 4
    expected = facts["Ref-SAV"]["masks"]
    for (q, _), per_frame in zip(questions_and_answers(record), record["masks"]):
        formated = next(p for p in expected if q.removeprefix("<image>\n") in seg_questions(p))  # as written
        assert [data.decode_mask(m, 32, 48).tolist() for m in per_frame] == [m.tolist() for m in expected[formated]]
    sample = data.TrainingData(reader, processor)[0, 0]
    record = reader.record(0, np.random.default_rng([0, 0, 0]))
    g = 4 * processor.cfg.sam2.grid
    kept = [frame_of(sample, k, 20) for k in range(5)]  # 12 frames -> 0, 4, 8 kept; 3 <= 6: with replacement
    assert all(t % 4 == 0 for t in kept) and kept == sorted(kept)
    for (k, fr), target in zip(sample.mask_queries.tolist(), sample.mask_targets):
        assert torch.equal(target, small(data.decode_mask(record["masks"][k][kept[fr] // 4], 32, 48), g))


def test_chatunivi_layout(root, processor):
    folder, _ = root
    reader = od.open_dataset(str(folder), "ChatUniVi")
    record = reader.record(0, rng())
    assert record["video"].endswith("Activity_Videos/v_long.mp4")  # the .mkv it names is looked for as .mp4
    assert questions_and_answers(record) == [("<image>\nWhat happens?", "Someone runs."), ("Then?", "They stop.")]
    ds = data.TrainingData(reader, processor)
    edges = np.linspace(0, 12, 6, dtype=int)
    for epoch in range(3):
        sample = ds[epoch, 0]
        frames = [frame_of(sample, k, 20) for k in range(5)]
        assert all(edges[i] <= t < edges[i + 1] for i, t in enumerate(frames))  # one frame in each fifth
        assert sample.mask_queries is None
    short = ds[0, 1]
    assert [frame_of(short, k, 20) for k in range(len(short.media.sam2_frames))] == [0, 1, 2]  # all of a short one


def test_llava_layout(root, processor):
    folder, _ = root
    reader = od.open_dataset(str(folder), "LLaVA-665k")
    a, b = reader.record(0, rng()), reader.record(1, rng())
    assert questions_and_answers(a) == [("<image>\nWhat is it?Be brief.", "A grey picture."), ("Sure?", "Yes.")]
    assert "image" not in b and questions_and_answers(b) == [("Hello", "Hi.")]  # no image: '<image>' removed
    assert len(od.open_dataset(str(folder), "LLaVA-665k", recipe="qwen")) == 1  # pure text left out
    ds = data.TrainingData(reader, processor)
    assert ds[0, 0].media is not None and ds[0, 1].media is None


def test_gcg_layouts(root, processor):
    folder, facts = root
    f = facts["GCG"]
    refcocog = od.open_dataset(str(folder), "GCG-RefCOCOg").record(0, rng())
    q, answer = questions_and_answers(refcocog)[0]
    assert q.removeprefix("<image>\n") in od.GCG_QUESTIONS and q.startswith("<image>\n")
    assert answer == "<p> a dog </p> [SEG] chases <p> a ball </p> [SEG] in the park."  # lower-cased; 'a cat' absent
    assert [coco_polygons(m, 48, 64).sum() for m in refcocog["masks"]] == [coco_polygons([[0, 0, 10, 0, 10, 10, 0, 10]], 48, 64).sum(),
                                                                           coco_polygons([[20, 20, 50, 20, 50, 40, 20, 40]], 48, 64).sum()]
    for name in ("GCG-GranDf", "GCG-OpenPSG"):
        record = od.open_dataset(str(folder), name).record(0, rng())
        assert questions_and_answers(record)[0][1] == '"<p> Two men </p> [SEG] on <p> a bench </p> [SEG]."'
        assert np.array_equal(data.decode_mask(record["masks"][0], 48, 64), f["a2"])  # two RLE parts, OR-ed
        assert np.array_equal(data.decode_mask(record["masks"][1], 48, 64), f["b"])
    flickr = od.open_dataset(str(folder), "GCG-Flickr30k")
    assert len(flickr) == 1  # a 2-word caption and a 20-px image left out
    record = flickr.record(0, rng())
    assert questions_and_answers(record)[0][1] == "<p> A woman </p> [SEG] holds <p> an umbrella </p> [SEG]"
    assert [data.decode_mask(m, 48, 64).tolist() for m in record["masks"]] == [f["a"].tolist(), f["b"].tolist()]
    sample = data.TrainingData(flickr, processor)[0, 0]
    assert sample.num_seg == 2 and len(sample.mask_targets) == 5


def test_osprey_layouts(root, processor):
    folder, facts = root
    conv = od.open_dataset(str(folder), "Osprey-conversation")
    record = conv.record(0, rng())
    assert record["image"].endswith("osprey-724k/coco/train2017/000000000005.jpg")  # searched folder by folder
    assert questions_and_answers(record) == [("<image>What is in region1?", "A grey wall."), ("And region2?", "More wall.")]
    assert [data.decode_mask(m, 64, 64).tolist() for m in record["regions"]] == [m.tolist() for m in facts["Osprey"]["regions"]]
    ds = data.TrainingData(conv, processor)
    sample = ds[0, 0]
    assert "There are 2 part regions in the picture: region1<vp><IMG_CONTEXT>" in sample.text
    assert "</vp>.\nWhat is in region1?" in sample.text and sample.mask_queries is None
    tiny = ds[0, 1]
    assert isinstance(tiny, data.Skipped) and "under 4" in tiny.reason and "Osprey-conversation" in tiny.where
    short = od.open_dataset(str(folder), "Osprey-short").record(0, rng())
    assert [q for q, _ in questions_and_answers(short)] == ["<image>What is in region1?" + od.SHORT_ANSWER,
                                                            "And region2?" + od.SHORT_ANSWER]
    described = od.open_dataset(str(folder), "Osprey-description").record(0, rng(5))
    (q1, a1), (q2, a2) = questions_and_answers(described)
    assert (a1, a2) == ("Left half.", "Right half.")
    assert q1.removeprefix("<image>") in {t.replace("<region>", "region1") for t in od.VP_QUESTIONS} and q1.startswith("<image>")
    assert q2 in {t.replace("<region>", "region2") for t in od.VP_QUESTIONS}
    assert isinstance(data.TrainingData(od.open_dataset(str(folder), "Osprey-description"), processor)[0, 0], data.Sample)


def test_ref_davis17_eval_layout(root):
    folder, _ = root
    reader = od.open_dataset(str(folder), "Ref-DAVIS17")
    assert "Ref-DAVIS17" in od.found_datasets(str(folder)) and reader.problems(0) == reader.problems(1) == []
    bear = next(i for i in range(2) if reader.where(i).endswith("bear"))
    masks = reader.record(bear, rng())["masks"]
    assert masks[0][1] is None and data.decode_mask(masks[0][0], 16, 16).sum() == 16  # mask 0: bear sorts first


def test_qwen_training_images_and_frames_take_the_official_training_sizes(root, tmp_path):
    folder, _ = root
    debug_checkpoint.write_tokenizer(str(tmp_path), "qwen")
    cfg = preset("debug-qwen2_5_vl")
    qwen = data.make_processor(cfg, load_official_tokenizer(str(tmp_path)))
    factor = cfg.vision.patch_size * cfg.vision.spatial_merge_size
    video = data.TrainingData(od.open_dataset(str(folder), "ReVOS"), qwen)[0, 0]
    h, w = data.smart_resize(32, 48, factor, *data.TRAIN_VIDEO_PIXELS)  # Sa2VABaseDataset min/max_pixels_multi
    assert video.media.grid_thw.tolist() == [[1, h // cfg.vision.patch_size, w // cfg.vision.patch_size]] * 5
    image = data.TrainingData(od.open_dataset(str(folder), "GCG-Flickr30k"), qwen)[0, 0]
    h, w = data.smart_resize(48, 64, factor, data.SA2VA_MIN_PIXELS, data.SA2VA_MAX_PIXELS)  # no fetch_image first
    assert image.media.grid_thw.tolist() == [[1, h // cfg.vision.patch_size, w // cfg.vision.patch_size]]
    regions = data.TrainingData(od.open_dataset(str(folder), "Osprey-conversation"), qwen)[0, 0]
    assert isinstance(regions, data.Skipped) and "InternVL" in regions.reason


# ----------------------------------------------------------------------------- mixtures and check

def test_mixture_repeats_every_dataset_as_the_recipe_says(root):
    folder, _ = root
    mixture, missing = od.open_mixture(str(folder), "in30-8b", seed=4)
    assert missing == []
    sizes = {name: len(od.open_dataset(str(folder), name)) for name in od.RECIPES["in30-8b"]}
    assert len(mixture) == sum(int(n * od.RECIPES["in30-8b"][k]) for k, n in sizes.items())
    for part, index in zip(mixture.parts, mixture.maps):
        repeats = od.RECIPES["in30-8b"][part.name]
        counts = np.bincount(index, minlength=len(part))
        assert len(index) == int(len(part) * repeats) and counts.max() - counts.min() <= 1
    names = {mixture.where(i).split(" ")[0] for i in range(len(mixture))}
    assert names == set(od.RECIPES["in30-8b"])
    again, _ = od.open_mixture(str(folder), "in30-8b", seed=4)
    assert all(np.array_equal(a, b) for a, b in zip(mixture.maps, again.maps))
    half = od.Mixture([(od.open_dataset(str(folder), "GCG-GranDf"), 0.5), (od.open_dataset(str(folder), "MeViS"), 0.5)])
    assert len(half) == 1  # int(1 * 0.5) + int(2 * 0.5)
    assert set(od.RECIPES["qwen"]) == set(od.RECIPES["in30-8b"]) - {"Osprey-conversation", "Osprey-description"}


def report(folder, *extra) -> tuple[int, str]:
    out = io.StringIO()
    n = od.check(od.CheckOptions(command="check", root=str(folder), **dict(extra)), out)
    return n, out.getvalue()


def test_check_reports_what_is_there_and_what_is_wrong(root, processor, tmp_path):
    folder, _ = root
    n, text = report(folder, ("recipe", "in30-8b"))
    assert n == 0, text
    assert "20 of 20 datasets found" in text and "custom: 1 samples, no problems" in text and "RefCOCO: 2 samples, no problems" in text
    assert "GCG-Flickr30k: 1 samples" in text and "recipe in30-8b: " in text and "GCG-GranDf 1 x 50" in text
    broken = tmp_path / "broken"
    shutil.copytree(folder, broken)
    os.remove(broken / "ref_seg/refcoco/coco2014/train2014/COCO_train2014_000000000002.jpg")
    masks = json.loads((broken / "video_datas/revos/mask_dict.json").read_text())
    masks["11"] = masks["11"][:5]  # masks end before the video
    (broken / "video_datas/revos/mask_dict.json").write_text(json.dumps(masks))
    masks = json.loads((broken / "video_datas/mevis/train/mask_dict.json").read_text())
    masks["0"][2] = {"size": [32, 48], "counts": "garbage!"}
    (broken / "video_datas/mevis/train/mask_dict.json").write_text(json.dumps(masks))
    anno = json.loads((broken / "video_datas/sam_v_full/sav_train/sav_000/sav_000001_manual.json").read_text())
    anno["masklet"] = anno["masklet"][:2]  # the video has 3 annotated frames
    (broken / "video_datas/sam_v_full/sav_train/sav_000/sav_000001_manual.json").write_text(json.dumps(anno))
    os.remove(broken / "video_datas/chat_univi/Activity_Videos/v_short.mp4")
    n, text = report(broken)
    assert n == 6, text
    for line in ("RefCOCO: 2 samples, 1 problem(s)", "1 x missing image (e.g. RefCOCO image 2)",
                 "2 x masks end before the video (e.g. ReVOS video vidA)", "1 x broken RLE mask (e.g. MeViS video v0)",
                 "1 x masklet and video frame counts differ (e.g. Ref-SAV sav_000001)", "1 x missing video"):
        assert line in text, text
    sample = data.TrainingData(od.open_dataset(str(broken), "Ref-SAV"), processor)[0, 0]
    assert isinstance(sample, data.Skipped) and "masks for 2 frames but the video has 3 (every 4th of 12)" in sample.reason
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match="holds none of the official datasets"):
        report(empty)


def test_check_command_line(root, tmp_path):
    folder, _ = root
    ok = subprocess.run([sys.executable, "official_data.py", "check", str(folder), "--limit", "1"], cwd=ROOT,
                        capture_output=True, text=True, timeout=120)
    assert ok.returncode == 0 and "(1 checked)" in ok.stdout, ok.stderr
    bad = subprocess.run([sys.executable, "official_data.py", "check", str(tmp_path / "nope")], cwd=ROOT,
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "is not a folder" in bad.stderr


# ----------------------------------------------------------------------------- training on all of them

def test_training_on_a_mixture_of_every_layout(root, tmp_path):
    folder, _ = root
    out = tmp_path / "run"
    args = [sys.executable, os.path.join(ROOT, "train.py"), "--model", "debug-internvl", "--data", str(folder),
            "--recipe", "sa2va", "--out", str(out), "--workers", "0", "--steps", "5", "--batch-size", "16",
            "--micro-batch-size", "8", "--seed", "1"]
    assert len(od.open_mixture(str(folder), "sa2va")[0]) == 77  # 5 x 16 samples: the whole first epoch, every dataset
    done = subprocess.run(args, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = [json.loads(line) for line in open(out / "metrics.jsonl")]
    assert len(rows) == 5 and all(np.isfinite(r["loss"]) and r["loss_mask"] > 0 for r in rows)
    skipped = [json.loads(line) for line in open(out / "skipped_rank0.jsonl")]
    assert skipped and all(s["sample"].startswith("Osprey-conversation") and "under 4" in s["reason"]
                           for s in skipped), skipped  # the tiny region alone, as the official rule says
    no_recipe = subprocess.run(args[:6] + ["--out", str(tmp_path / "x")], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert no_recipe.returncode == 2 and "give --recipe" in no_recipe.stderr
