"""metrics.py against the reference computations: the DAVIS J/F code re-created with cv2 and
skimage, pycocotools' COCOeval for AP50, metrics_gcg.py's mIoU/recall restated, pycocoevalcap's
CIDEr scorer and its Java PTB tokenizer."""
import contextlib
import io
import math
import os
import shutil

import cv2
import numpy as np
import pytest
from pycocoevalcap.cider.cider import Cider
from pycocoevalcap.tokenizer import ptbtokenizer
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval
from skimage.morphology import disk as sk_disk

import metrics


# ----------------------------------------------------------------------------- fixtures

def blob(rng, h, w, cells=None, fill=0.5) -> np.ndarray:
    """A random blobby mask: coarse noise upsampled to (h, w) and thresholded."""
    cells = cells or (max(1, h // 6), max(1, w // 6))
    coarse = rng.random(cells)
    up = cv2.resize(coarse, (w, h), interpolation=cv2.INTER_LINEAR)
    return up > np.quantile(up, 1 - fill)


def rect(h, w, y0, x0, y1, x1) -> np.ndarray:
    m = np.zeros((h, w), dtype=bool)
    m[y0:y1, x0:x1] = True
    return m


def jitter(rng, mask, p=0.15, shift=3) -> np.ndarray:
    """mask shifted by up to `shift` pixels with some pixels flipped: overlaps its source, imperfectly."""
    dy, dx = rng.integers(-shift, shift + 1, size=2)
    moved = np.roll(mask, (dy, dx), axis=(0, 1))
    return moved ^ (rng.random(mask.shape) < p * rng.random())


# ----------------------------------------------------------------------------- DAVIS reference

def ref_seg2bmap(seg):
    """`_seg2bmap` of third_parts/revos/utils/metircs.py at the mask's own size."""
    seg = seg.astype(bool)
    e, s, se = np.zeros_like(seg), np.zeros_like(seg), np.zeros_like(seg)
    e[:, :-1] = seg[:, 1:]
    s[:-1, :] = seg[1:, :]
    se[:-1, :-1] = seg[1:, 1:]
    b = seg ^ e | seg ^ s | seg ^ se
    b[-1, :] = seg[-1, :] ^ e[-1, :]
    b[:, -1] = seg[:, -1] ^ s[:, -1]
    b[-1, -1] = 0
    return b


def ref_iou(gt, pred):
    """`db_eval_iou` on one frame (no void pixels)."""
    gt, pred = gt.astype(bool), pred.astype(bool)
    inters, union = np.sum(pred & gt), np.sum(pred | gt)
    return 1 if np.isclose(union, 0) else inters / union


def ref_f(pred, gt, bound_th=0.008):
    """`f_measure(foreground_mask=pred, gt_mask=gt)`: cv2.dilate with skimage's disk."""
    bound_pix = bound_th if bound_th >= 1 else np.ceil(bound_th * np.linalg.norm(pred.shape))
    fg_boundary, gt_boundary = ref_seg2bmap(pred), ref_seg2bmap(gt)
    kernel = sk_disk(bound_pix).astype(np.uint8)
    fg_dil = cv2.dilate(fg_boundary.astype(np.uint8), kernel)
    gt_dil = cv2.dilate(gt_boundary.astype(np.uint8), kernel)
    gt_match, fg_match = gt_boundary * fg_dil, fg_boundary * gt_dil
    n_fg, n_gt = np.sum(fg_boundary), np.sum(gt_boundary)
    if n_fg == 0 and n_gt > 0:
        precision, recall = 1, 0
    elif n_fg > 0 and n_gt == 0:
        precision, recall = 0, 1
    elif n_fg == 0 and n_gt == 0:
        precision, recall = 1, 1
    else:
        precision, recall = np.sum(fg_match) / float(n_fg), np.sum(gt_match) / float(n_gt)
    return 0 if precision + recall == 0 else 2 * precision * recall / (precision + recall)


SHAPES = [(48, 64), (120, 90), (37, 201), (200, 31), (9, 9), (1, 12), (15, 1), (2, 2), (480, 854)]


def frame_pairs():
    rng = np.random.default_rng(0)
    for h, w in SHAPES:
        for fill in (0.1, 0.5, 0.9):
            gt = blob(rng, h, w, fill=fill)
            yield f"{h}x{w}/fill{fill}/near", jitter(rng, gt), gt
            yield f"{h}x{w}/fill{fill}/unrelated", blob(rng, h, w, fill=rng.uniform(0.05, 0.95)), gt
    h, w = 40, 50
    empty, full = np.zeros((h, w), bool), np.ones((h, w), bool)
    one = rect(h, w, 20, 20, 21, 21)
    corner = rect(h, w, 0, 0, 1, 1)
    yield "empty pred", empty, blob(rng, h, w)
    yield "empty gt", blob(rng, h, w), empty
    yield "both empty", empty, empty
    yield "full vs full", full, full
    yield "full vs blob", full, blob(rng, h, w)
    yield "single pixel, same", one, one
    yield "single pixel, apart", one, rect(h, w, 5, 30, 6, 31)
    yield "single pixel corners", corner, rect(h, w, h - 1, w - 1, h, w)
    yield "last row and column", rect(h, w, h - 1, 0, h, w), rect(h, w, 0, w - 1, h, w)
    yield "touching borders", rect(h, w, 0, 0, h, 10), rect(h, w, 0, 3, h, 14)
    yield "bottom-right block", rect(h, w, 30, 40, h, w), rect(h, w, 28, 38, h, w)


FRAME_PAIRS = list(frame_pairs())


@pytest.mark.parametrize("name,pred,gt", FRAME_PAIRS, ids=[name for name, _, _ in FRAME_PAIRS])
def test_j_and_f_match_the_davis_reference(name, pred, gt):
    assert metrics.region_iou(pred, gt) == pytest.approx(ref_iou(gt, pred), abs=1e-12)
    np.testing.assert_array_equal(metrics.seg2bmap(pred), ref_seg2bmap(pred))
    for bound_th in (0.008, 0.05, 2, 2.5):
        assert metrics.boundary_f(pred, gt, bound_th) == pytest.approx(ref_f(pred, gt, bound_th), abs=1e-12), bound_th


def test_boundary_f_special_cases():
    empty, m = np.zeros((20, 20), bool), rect(20, 20, 5, 5, 12, 12)
    assert metrics.boundary_f(empty, empty) == 1.0
    assert metrics.boundary_f(empty, m) == 0.0  # P=1, R=0
    assert metrics.boundary_f(m, empty) == 0.0  # P=0, R=1
    assert metrics.boundary_f(m, m) == 1.0
    # a mask filling the frame has no boundary: seg2bmap only marks changes inside the frame
    assert metrics.boundary_f(np.ones((20, 20), bool), m) == 0.0
    assert metrics.region_iou(empty, empty) == 1.0 and metrics.region_iou(m, empty) == 0.0


def test_j_and_f_average_frames():
    rng = np.random.default_rng(1)
    gts = [blob(rng, 30, 40) for _ in range(4)] + [np.zeros((30, 40), bool)]
    preds = [jitter(rng, g) for g in gts[:4]] + [np.zeros((30, 40), bool)]
    j, f = metrics.j_and_f(preds, gts)
    assert j == pytest.approx(np.mean([ref_iou(g, p) for p, g in zip(preds, gts)]), abs=1e-12)
    assert f == pytest.approx(np.mean([ref_f(p, g) for p, g in zip(preds, gts)]), abs=1e-12)
    with pytest.raises(ValueError, match="frames"):
        metrics.j_and_f(preds[:3], gts)


def test_disk_matches_skimage():
    for radius in [0, 1, 2, 3, 7, 8, 18, 25, 2.5, 4.0, 17.0]:
        ours, theirs = metrics.disk(radius), sk_disk(radius)
        assert ours.dtype == theirs.dtype == np.uint8
        np.testing.assert_array_equal(ours, theirs, err_msg=str(radius))


def test_dilate_matches_cv2_including_asymmetric_kernels():
    rng = np.random.default_rng(2)
    kernels = [sk_disk(r) for r in (0, 1, 4, 9)] + [np.ones((1, 5)), np.ones((4, 1)), sk_disk(2.5)]
    kernels += [(rng.random((kh, kw)) < 0.4) for kh, kw in [(3, 3), (4, 6), (5, 2), (2, 7)]]
    for kernel in kernels:
        kernel = kernel.astype(np.uint8)
        if not kernel.any():
            kernel[0, -1] = 1
        for h, w in [(30, 41), (1, 9), (7, 1), (3, 3)]:
            src = rng.random((h, w)) < 0.08
            src[0, 0] = src[-1, -1] = True  # make the border handling count
            expected = cv2.dilate(src.astype(np.uint8), kernel).astype(bool)
            np.testing.assert_array_equal(metrics.dilate(src, kernel), expected, err_msg=f"{kernel} on {h}x{w}")


# ----------------------------------------------------------------------------- ReVOS A and R

def test_pixel_accuracy_and_robustness_match_the_reference():
    rng = np.random.default_rng(3)
    for h, w in [(30, 40), (64, 17)]:
        gt = blob(rng, h, w, fill=0.3).astype(np.uint8)
        pred = jitter(rng, gt.astype(bool)).astype(np.uint8)
        fg = (gt | blob(rng, h, w, fill=0.3)).astype(np.uint8)
        assert metrics.pixel_accuracy(pred, gt) == pytest.approx(np.mean(gt == pred), abs=1e-12)
        neg, pos = ((1 - gt) * pred).sum(), fg.sum()  # get_r2vos_robustness
        assert metrics.robustness(pred, gt, fg) == pytest.approx(max(1 - neg / (pos + 1e-6), 0.0), abs=1e-12)
    empty = np.zeros((4, 4), bool)
    assert metrics.robustness(np.ones((4, 4), bool), empty, rect(4, 4, 0, 0, 1, 1)) == 0.0  # clipped at 0
    assert metrics.robustness(empty, empty, empty) == 1.0
    # the foreground is summed as given: a two-part foreground counts overlaps twice
    pred, gt = rect(4, 4, 0, 0, 1, 2), empty
    assert metrics.robustness(pred, gt, 2 * rect(4, 4, 0, 0, 2, 2).astype(np.uint8)) == pytest.approx(1 - 2 / 8)


# ----------------------------------------------------------------------------- cIoU / gIoU

def test_refseg_ciou_and_giou_by_hand():
    score = metrics.RefSegScore()
    score.add(rect(10, 10, 0, 0, 4, 5), rect(10, 10, 0, 0, 2, 5))  # I=10, U=20
    score.add(None, rect(10, 10, 0, 0, 3, 3))  # no mask: I=0, U=9
    score.add(np.zeros((10, 10), bool), np.zeros((10, 10), bool))  # empty union: IoU 1
    score.add(rect(10, 10, 0, 0, 10, 10), rect(10, 10, 0, 0, 10, 10))  # I=U=100
    assert (score.intersection, score.union, score.count) == (110, 129, 4)
    assert score.ciou == pytest.approx(110 / (129 + 1e-10), abs=1e-15)
    assert score.giou == pytest.approx((10 / (20 + 1e-5) + 0 + 1 + 100 / (100 + 1e-5)) / 4, abs=1e-15)

    empty_only = metrics.RefSegScore()
    empty_only.add(None, np.zeros((3, 3), bool))
    assert empty_only.ciou == 0.0 and empty_only.giou == 1.0
    with pytest.raises(ValueError, match="no queries"):
        _ = metrics.RefSegScore().ciou


# ----------------------------------------------------------------------------- GCG AP50

def coco_ap50(preds, gts, crowds):
    """COCOeval('segm').stats[1] for images 1..N, built the way metrics_gcg.py builds its inputs."""
    images, annotations, results = [], [], []
    for image_id, (dets, gt_masks, crowd) in enumerate(zip(preds, gts, crowds), start=1):
        h, w = gt_masks[0].shape if gt_masks else dets[0].shape if dets else (8, 8)
        images.append({"id": image_id, "height": h, "width": w})
        for m, c in zip(gt_masks, crowd):
            rle = mask_utils.encode(np.asfortranarray(m.astype(np.uint8)))
            rle["counts"] = rle["counts"].decode()
            annotations.append({"id": len(annotations) + 1, "image_id": image_id, "category_id": 1,
                                "segmentation": rle, "area": float(m.sum()), "iscrowd": int(c),
                                "bbox": list(mask_utils.toBbox(rle))})
        for m in dets:
            rle = mask_utils.encode(np.asfortranarray(m.astype(np.uint8)))
            rle["counts"] = rle["counts"].decode()
            results.append({"image_id": image_id, "category_id": 1, "segmentation": rle, "score": 1.0})
    with contextlib.redirect_stdout(io.StringIO()):
        coco_gt = COCO()
        coco_gt.dataset = {"images": images, "annotations": annotations, "categories": [{"id": 1, "name": "o"}],
                           "info": {}}
        coco_gt.createIndex()
        coco_dt = coco_gt.loadRes(results)
        ev = COCOeval(coco_gt, coco_dt, "segm")
        ev.params.catIds = [1]
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return ev.stats[1]


def gcg_fixture(seed):
    """Images with several GT and predicted masks: near copies, unrelated masks, images without
    predictions, images without ground truth, some crowd regions."""
    rng = np.random.default_rng(seed)
    preds, gts, crowds = [], [], []
    for k in range(int(rng.integers(4, 9))):
        h, w = int(rng.integers(12, 40)), int(rng.integers(12, 40))
        gt = [blob(rng, h, w, fill=rng.uniform(0.1, 0.4)) for _ in range(int(rng.integers(0, 5)))]
        crowd = [bool(rng.random() < 0.15) for _ in gt]
        dets = [jitter(rng, g, p=0.1, shift=1) for g in gt if rng.random() < 0.7]
        dets += [blob(rng, h, w, fill=rng.uniform(0.05, 0.4)) for _ in range(int(rng.integers(0, 3)))]
        if k == 0:
            dets = []  # an image with ground truth and no prediction
        if k == 1:
            gt, crowd = [], []  # an image with predictions and no ground truth
            dets = dets or [blob(rng, h, w)]
        rng.shuffle(dets)
        preds.append(dets)
        gts.append(gt)
        crowds.append(crowd)
    return preds, gts, crowds


@pytest.mark.parametrize("seed", range(8))
def test_ap50_matches_cocoeval(seed):
    preds, gts, crowds = gcg_fixture(seed)
    expected = coco_ap50(preds, gts, crowds)
    assert expected not in (-1.0, 0.0, 1.0)  # the fixture exercises the curve
    assert metrics.ap50(preds, gts, crowds) == pytest.approx(expected, abs=1e-12)


def test_ap50_edge_cases_match_cocoeval():
    m, other, big = rect(10, 10, 0, 0, 5, 5), rect(10, 10, 6, 6, 10, 10), rect(10, 10, 0, 0, 8, 8)
    cases = [
        ([[m]], [[m]], [[False]]),  # perfect
        ([[other, m]], [[m]], [[False]]),  # a false positive ranked first
        ([[m, other]], [[m]], [[False]]),  # ... and last
        ([[m, m]], [[m], ], [[False]]),  # a duplicate
        ([[m], [other]], [[m], [m]], [[False], [False]]),  # half the ground truth found
        ([[m, other]], [[m, other]], [[True, False]]),  # a detection on a crowd region is ignored
        ([[m]], [[big, m]], [[True, False]]),  # regular GT wins over a crowd region that covers it
        ([[other]], [[m]], [[False]]),  # nothing found
        ([[m]], [[m]], [[True]]),  # only crowd ground truth: -1
    ]
    for preds, gts, crowds in cases:
        assert metrics.ap50(preds, gts, crowds) == pytest.approx(coco_ap50(preds, gts, crowds), abs=1e-12)
    assert metrics.ap50([[m]], [[m]], [[True]]) == -1.0
    # a miss ranked first: precision 0 then 1/2, enveloped to 1/2 at every recall threshold;
    # ranked last it comes after full recall and costs nothing
    assert metrics.ap50([[other, m]], [[m]]) == pytest.approx(0.5, abs=1e-12)
    assert metrics.ap50([[m, other]], [[m]]) == pytest.approx(1.0, abs=1e-12)
    assert metrics.ap50([[m], [other]], [[m], [m]]) == pytest.approx(51 / 101, abs=1e-12)  # recall 1/2


def test_ap50_caps_detections_per_image():
    m = rect(20, 20, 0, 0, 10, 10)
    preds = [[rect(20, 20, 15, 15, 16, 16)] * 100 + [m]]  # the hit is the 101st detection
    assert metrics.ap50(preds, [[m]]) == coco_ap50(preds, [[m]], [[False]]) == 0.0


# ----------------------------------------------------------------------------- GCG mIoU and recall

def ref_iou_gcg(a, b):
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.sum(np.logical_and(a, b)) / np.sum(np.logical_or(a, b))


def ref_compute_miou(pred_masks, gt_masks):
    """metrics_gcg.py `compute_miou`, restated."""
    m = np.array([[ref_iou_gcg(p, g) for g in gt_masks] for p in pred_masks]).reshape(len(pred_masks), len(gt_masks))
    paired = []
    while m.size > 0 and np.max(m) > 0:
        i, j = np.unravel_index(np.argmax(m, axis=None), m.shape)
        paired.append(m[i, j])
        m = np.delete(np.delete(m, i, axis=0), j, axis=1)
    return np.mean(paired) if paired else 0.0


def ref_recall(gts, gt_labels, preds, pred_labels, sim):
    """metrics_gcg.py `find_best_matches` inside `evaluate_recall_with_mapping`'s try/except."""
    tp = actual = 0
    for gm, gl, pm, pl in zip(gts, gt_labels, preds, pred_labels):
        actual += len(gl)
        try:
            ious = np.array([[ref_iou_gcg(g, p) for p in pm] for g in gm]).reshape(len(gm), len(pm))
            sims = np.array([[sim(a, b) for b in pl] for a in gl]).reshape(len(gl), len(pl))
            found = []
            while ious.size > 0:
                idx = np.unravel_index(np.argmax(ious), ious.shape)
                if ious[idx] < 0.5 or sims[idx] < 0.5:
                    break
                found.append(idx)
                ious[idx[0], :] = 0
                ious[:, idx[1]] = 0
                sims[idx[0], :] = 0
                sims[:, idx[1]] = 0
            tp += len(found)
        except IndexError:
            pass
    return tp / actual if actual > 0 else 0


def toy_similarity(a: str, b: str) -> float:
    """A deterministic stand-in for the BERT cosine: high for labels that share their first word."""
    return 0.9 if a.split()[0] == b.split()[0] else 0.3


WORDS = ["man", "dog", "car", "tree", "sky"]


def recall_fixture(seed):
    """Per image: GT masks with labels, predictions near most of them (usually with a phrase of the
    same first word) plus unrelated ones; one image with empty masks on both sides (NaN IoU), one
    with fewer phrases than masks, one with a label without a mask."""
    rng = np.random.default_rng(seed)
    gts, gt_labels, preds, pred_labels = [], [], [], []
    for k in range(6):
        h, w = 24, 30
        gm = [blob(rng, h, w, fill=rng.uniform(0.1, 0.4)) for _ in range(int(rng.integers(1, 5)))]
        gl = [f"{rng.choice(WORDS)} {i}" for i in range(len(gm))]
        pm, pl = [], []
        for g, label in zip(gm, gl):
            if rng.random() < 0.8:
                pm.append(jitter(rng, g, p=0.1, shift=1))
                pl.append(label if rng.random() < 0.75 else f"{rng.choice(WORDS)} x")
        for _ in range(int(rng.integers(0, 2))):
            pm.append(blob(rng, h, w))
            pl.append(f"{rng.choice(WORDS)} y")
        order = rng.permutation(len(pm))
        pm, pl = [pm[i] for i in order], [pl[i] for i in order]
        if k == 2:
            gm, gl = gm + [np.zeros((h, w), bool)], gl + ["sky empty"]
            pm, pl = [np.zeros((h, w), bool)] + pm, ["sky empty"] + pl
        if k == 3:
            pl = pl[:max(0, len(pl) - 2)]  # fewer phrases than masks: the reference's IndexError path
        if k == 4:
            gl = gl + ["sky extra"]  # a label without a mask still counts
        gts.append(gm)
        gt_labels.append(gl)
        preds.append(pm)
        pred_labels.append(pl)
    return gts, gt_labels, preds, pred_labels


@pytest.mark.parametrize("seed", range(6))
def test_gcg_miou_and_recall_match_metrics_gcg(seed):
    gts, gt_labels, preds, pred_labels = recall_fixture(seed)
    for p, g in zip(preds, gts):
        assert metrics.gcg_miou(p, g) == pytest.approx(ref_compute_miou(p, g), abs=1e-12)
    expected = ref_recall(gts, gt_labels, preds, pred_labels, toy_similarity)
    assert 0 < expected < 1
    assert metrics.gcg_recall(gts, gt_labels, preds, pred_labels, toy_similarity) == pytest.approx(expected, abs=1e-12)


def test_gcg_by_hand():
    a, b = rect(10, 10, 0, 0, 5, 10), rect(10, 10, 5, 0, 10, 10)
    half_a = rect(10, 10, 0, 0, 5, 5)
    empty = np.zeros((10, 10), bool)
    # greedy pairing: (a, a) = 1 first, then (half_a, b) = 0 is not paired
    assert metrics.gcg_miou([half_a, a], [a, b]) == 1.0
    assert metrics.gcg_miou([half_a], [a]) == 0.5
    assert metrics.gcg_miou([], [a]) == 0.0 and metrics.gcg_miou([a], []) == 0.0
    # an empty prediction against an empty GT gives NaN, which stops the pairing at once
    assert metrics.gcg_miou([a, empty], [a, empty]) == 0.0
    # the top-IoU pair failing the phrase test ends the search, even though (b, b) would pass
    same = lambda x, y: 1.0 if x == y else 0.0
    assert metrics.gcg_matches([a, b], ["x", "y"], [a, b], ["q", "y"], same) == []
    assert metrics.gcg_matches([a, b], ["x", "y"], [b, a], ["y", "x"], same) == [(0, 1), (1, 0)]
    assert metrics.gcg_recall([[a, b]], [["x", "y", "z"]], [[b, a]], [["y", "x"]], same) == 2 / 3
    # more masks than phrases, and the winning pair points past the phrases: the image adds nothing
    assert metrics.gcg_matches([a, b], ["x", "y"], [empty, a], ["x"], same) == []


# ----------------------------------------------------------------------------- captions

CAPTIONS = {
    "img1": ["A man in a red shirt is riding a horse.", "A man rides a brown horse on the beach.",
             "The person is riding a horse near the water."],
    "img2": ["Two dogs play with a ball in the grass.", "Two dogs are playing in a grassy field.",
             "A pair of dogs chasing a ball."],
    "img3": ["A red car parked next to a tall tree.", "A car is parked on the street next to a tree."],
    "img4": ["A woman holding an umbrella walks down the street.", "A woman with an umbrella in the rain."],
    "img5": ["A plate of food with rice and vegetables.", "A plate of rice, vegetables and meat on a table."],
}
CANDIDATES = {
    "img1": ["a man riding a horse on the beach"],
    "img2": ["two dogs two dogs two dogs in the grass"],
    "img3": ["a red car parked next to a tree"],
    "img4": ["an umbrella"],
    "img5": [""],
}


def simple_tokens(s: str) -> str:
    return " ".join(s.lower().replace(".", " ").replace(",", " ").split())


def test_cider_matches_pycocoevalcap():
    gts = {k: [simple_tokens(r) for r in refs] for k, refs in CAPTIONS.items()}
    score, scores = metrics.cider(gts, CANDIDATES)
    expected, expected_scores = Cider().compute_score(gts, CANDIDATES)
    assert score == pytest.approx(expected, abs=1e-12)
    np.testing.assert_allclose(scores, expected_scores, rtol=0, atol=1e-12)
    assert len(set(np.round(scores, 6))) == len(scores)  # the captions score differently
    one = {"img3": gts["img3"]}
    assert metrics.cider(one, {"img3": CANDIDATES["img3"]})[0] == pytest.approx(
        Cider().compute_score(one, {"img3": CANDIDATES["img3"]})[0], abs=1e-12)
    with pytest.raises(ValueError, match="one caption"):
        metrics.cider(gts, {k: v * 2 for k, v in CANDIDATES.items()})


TYPICAL = [
    "A man in a red shirt is standing next to a white car.",
    "The dog's owner doesn't know; it's 5:30 p.m. (roughly) and \"cool\"!",
    "Two people, a man and a woman, are walking on a black-and-white street... in the U.S.",
    "A woman (wearing glasses) is sitting on a bench, holding a cup of coffee.",
    "A group of people standing on the beach,with surfboards; the sky is blue & clear.",
    "I can't see the children's toys -- they're in the kids' room, aren't they?",
    "Mr. Smith's 1,000 books cost $20 each: 50% off! A 5-year-old t-shirt, e-mail etc.",
    "A cat sits on a mat.\nThe mat is 'blue'. What?! It isn't green.",
    "A plate with food on it , including rice and vegetables .",
    "A man (left) [and] {right}.",
    "Gonna go, cannot stop... ok?!",
    "\u201cCurly\u201d \u2018quotes\u2019 \u2014 dashes \u2013 too\u2026",
]


@pytest.fixture(scope="module")
def java_tokens():
    """pycocoevalcap's PTBTokenizer (it runs Java in its own package folder) on TYPICAL."""
    if shutil.which("java") is None or not os.access(os.path.dirname(ptbtokenizer.__file__), os.W_OK):
        pytest.skip("the PTB oracle needs java (a Debian package) and a writable pycocoevalcap/tokenizer folder")
    out = ptbtokenizer.PTBTokenizer().tokenize({i: [{"caption": c}] for i, c in enumerate(TYPICAL)})
    return [out[i][0] for i in range(len(TYPICAL))]


def test_ptb_tokenize_matches_the_java_tokenizer(java_tokens):
    for caption, expected in zip(TYPICAL, java_tokens):
        assert metrics.ptb_tokenize(caption) == expected, caption


def test_ptb_tokenize_promises():
    """What the docstring promises, without Java (these agree with it, but the last)."""
    assert metrics.ptb_tokenize("A man (left) [and] {right}.") == "a man -lrb- left -rrb- -lsb- and -rsb- -lcb- right -rcb-"
    assert metrics.ptb_tokenize("Gonna go, cannot stop... ok?!") == "gon na go can not stop ok ?!"
    assert metrics.ptb_tokenize("“Curly” ‘quotes’ — dashes – too…") == "curly quotes dashes too"
    # by design: abbreviations outside the short list lose their period (the Java lexer keeps e.g. 'calif.')
    assert metrics.ptb_tokenize("Near Calif. Now") == "near calif now"


def test_cider_on_ptb_tokens_matches_the_coco_pipeline(java_tokens):
    gts = {i: [metrics.ptb_tokenize(r) for r in CAPTIONS[k]] for i, k in enumerate(CAPTIONS)}
    res = {i: [metrics.ptb_tokenize(c)] for i, c in enumerate(TYPICAL[:len(CAPTIONS)])}
    tokenizer = ptbtokenizer.PTBTokenizer()
    coco_gts = tokenizer.tokenize({i: [{"caption": r} for r in CAPTIONS[k]] for i, k in enumerate(CAPTIONS)})
    coco_res = {i: [java_tokens[i]] for i in res}
    assert gts == coco_gts
    assert metrics.cider(gts, res)[0] == pytest.approx(Cider().compute_score(coco_gts, coco_res)[0], abs=1e-12)
    assert not math.isclose(metrics.cider(gts, res)[0], 0.0)


def test_phrase_match_by_hand():
    a = np.zeros((8, 8), bool); a[:4] = True
    b = np.zeros((8, 8), bool); b[4:] = True
    half = a.copy(); half[:, 4:] = False  # IoU 0.5 with a
    # same words (article and case aside) and IoU 1: matched; the wrong words never match
    assert metrics.phrase_match([[a, b]], [["a red circle", "a blue square"]], [[a, b]],
                                [["The red circle", "a green square"]]) == 0.5
    # right words, IoU below 0.7: not matched; one prediction serves one phrase only
    assert metrics.phrase_match([[a]], [["a red circle"]], [[half]], [["a red circle"]]) == 0.0
    assert metrics.phrase_match([[a, a]], [["a red circle", "a red circle"]], [[a]], [["a red circle"]]) == 0.5
    # masks beyond the phrases (and phrases beyond the masks) pair with nothing
    assert metrics.phrase_match([[a, b]], [["x", "y"]], [[a, b]], [["x"]]) == 0.5
    with pytest.raises(ValueError, match="differ in length"):
        metrics.phrase_match([[a]], [["x"]], [], [])
