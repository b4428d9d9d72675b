"""world.py: the synthetic shapes world is seeded, says only true things about its pictures, and
is read by the official readers (training) and eval.py's benchmarks (evaluation)."""
import filecmp
import json
import os

import numpy as np
import pytest
from PIL import Image

import data
import eval as evaluation
import official_data
import world
from model.config import SHAPES_TOKENIZER, preset
from model.tokenizer import load_official_tokenizer

COLOR_WORDS = tuple(world.COLORS)


@pytest.fixture(scope="module")
def worlds(tmp_path_factory):
    root = tmp_path_factory.mktemp("world")
    world.main(["--out", str(root / "train"), "--seed", "0", "--images", "12", "--videos", "3"])
    world.main(["--out", str(root / "eval"), "--seed", "1", "--split", "eval", "--images", "10", "--videos", "3"])
    return root


def test_the_world_is_seeded(worlds, tmp_path):
    world.main(["--out", str(tmp_path / "again"), "--seed", "0", "--images", "12", "--videos", "3"])
    for rel in ("custom.jsonl", "ref_seg/refcoco/instances.json", "video_datas/mevis/train/meta_expressions.json",
                "video_datas/mevis/train/mask_dict.json", "tokenizer/tokenizer.json"):
        assert filecmp.cmp(worlds / "train" / rel, tmp_path / "again" / rel, shallow=False), rel
    world.main(["--out", str(tmp_path / "other"), "--seed", "5", "--images", "12", "--videos", "3"])
    assert not filecmp.cmp(worlds / "train" / "custom.jsonl", tmp_path / "other" / "custom.jsonl", shallow=False)


def test_referring_expressions_pick_out_one_shape():
    bg = np.zeros((200, 400, 3), np.uint8)
    scene = world.Scene(400, 200, bg, [world.Shape("circle", "red", 60, 100, 60), world.Shape("circle", "red", 330, 100, 30),
                                       world.Shape("square", "blue", 200, 50, 40)], antialias=False)
    left, right, square = (world.referring_expressions(scene, i) for i in range(3))
    assert left["plain"] == [] and "red circle on the left" in left["spatial"] and "big red circle" in left["spatial"]
    assert "red circle on the right" in right["spatial"] and "small circle" in right["spatial"]
    assert square["plain"] == ["blue square", "square", "blue shape"] and "square at the top" not in square["spatial"]
    pixels, masks = world.render(scene)
    assert [int(m.sum()) > 0 for m in masks] == [True, True, True]
    assert np.abs(pixels[masks[2]].mean(0) - world.COLORS["blue"]).max() < 2  # drawn in its colour, no anti-aliasing
    moving = world.Scene(400, 200, bg, [world.Shape("circle", "red", 60, 100, 40, vx=10),
                                        world.Shape("circle", "green", 300, 100, 40)], antialias=True, frames=9)
    assert world.referring_expressions(moving, 0)["motion"] == ["circle moving right"]
    assert world.referring_expressions(moving, 1)["motion"] == ["circle standing still"]


def test_every_ref_names_its_shape(worlds):
    """eval.py's RefCOCO benchmark on the eval split: under each ref's mask the image has the
    colour the sentence names; the ground truth as a prediction scores cIoU 1."""
    root = str(worlds / "eval")
    for split in ("val", "testA"):
        bench = evaluation.open_benchmark(evaluation.EvalOptions(benchmark="refcoco", data=root, split=split))
        assert bench.queries
        records = {}
        for q in bench.queries:
            ann = bench.anns[bench.truth[q.id][0]]
            mask = data.rle_decode(ann["segmentation"])
            sentence = q.prompt.split("segment the ")[-1].lower()
            colors = [c for c in COLOR_WORDS if c in sentence]
            if colors:
                pixels = np.asarray(Image.open(q.image).convert("RGB"))[mask]
                assert np.abs(np.median(pixels, 0) - world.COLORS[colors[0]]).max() < 25, (q.id, sentence)
            if split == "testA":
                assert any(w in sentence for w in ("left", "right", "top", "bottom", "small", "big")), sentence
            records[q.id] = {"id": q.id, "text": "Sure, [SEG].", "masks": [[ann["segmentation"]]]}
        got = bench.score(records, bench.queries, evaluation.EvalOptions(benchmark="refcoco", data=root))
        assert got["cIoU"] == pytest.approx(1.0)


def test_eval_split_benchmarks_open_and_score_their_truth(worlds):
    root = str(worlds / "eval")
    gcg = evaluation.open_benchmark(evaluation.EvalOptions(benchmark="gcg", data=root))
    caps = {str(a["image_id"]): a for a in gcg.caps_gt["annotations"]}
    masks = {}
    for a in gcg.masks_gt["annotations"]:
        masks.setdefault(str(a["image_id"]), []).append(a["segmentation"])
    records = {q.id: {"id": q.id, "text": " and ".join(f"<p> {label} </p> [SEG]" for label in caps[q.id]["labels"]),
                      "masks": [[m] for m in masks[q.id]]} for q in gcg.queries}
    got = gcg.score(records, gcg.queries, evaluation.EvalOptions(benchmark="gcg", data=root))
    assert got["phrase_match"] == 1.0 and got["mIoU"] == pytest.approx(1.0)
    vqa = evaluation.open_benchmark(evaluation.EvalOptions(benchmark="vqa", data=os.path.join(root, "vqa.tsv")))
    assert len(vqa.queries) == len(gcg.queries) and vqa.queries[0].prompt.endswith(world.MCQ_SUFFIX)
    mevis = evaluation.open_benchmark(evaluation.EvalOptions(benchmark="mevis_u", data=root))
    assert mevis.queries and all(len(q.frames) >= 8 for q in mevis.queries)


def test_training_reads_the_world_through_the_official_readers(worlds):
    root = str(worlds / "train")
    records, missing = official_data.open_mixture(root, "shapes")
    assert missing == []
    tok = load_official_tokenizer(os.path.join(root, "tokenizer"))
    assert (len(tok), tok.token_to_id("<IMG_CONTEXT>"), tok.token_to_id("[SEG]")) == SHAPES_TOKENIZER
    ds = data.TrainingData(records, data.make_processor(preset("sa2va-shapes"), tok), seed=0)
    kinds = set()
    for i in range(len(ds)):
        s = ds[0, i]
        assert not isinstance(s, data.Skipped), s
        if s.mask_targets is not None and len(s.mask_targets):
            assert s.mask_targets.flatten(1).any(1).float().mean() > 0.5  # masks reach the grid
        kinds.add((s.media.pixel_values.shape[0] > 1, s.mask_targets is not None and len(s.mask_targets) > 0))
    assert kinds == {(False, True), (False, False), (True, True)}  # images with and without masks, videos
    lines = [json.loads(line) for line in open(os.path.join(root, "custom.jsonl"))]
    answers = [r["conversations"][1]["value"] for r in lines]
    assert any("</p> [SEG]" in a for a in answers) and any(a.startswith(("A ", "An ")) for a in answers)
    assert any("regions" in r for r in lines)


def test_the_examples_are_the_example_scenes(tmp_path):
    """examples/ is what `world.py --split examples` writes, so its ground truth is example_scenes()'s."""
    world.main(["--out", str(tmp_path / "ex"), "--split", "examples"])
    here = os.path.join(os.path.dirname(__file__), "..", "examples")
    for name in ("shapes.jpg", "shapes.mp4"):
        assert filecmp.cmp(tmp_path / "ex" / name, os.path.join(here, name), shallow=False), name
