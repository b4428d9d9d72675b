"""The numbers Sa2VA is scored by, computed with numpy alone.

    j, f = j_and_f(pred_frames, gt_frames)              # one referring-video expression
    score = RefSegScore(); score.add(pred, gt); score.ciou, score.giou
    ap50(preds, gts), gcg_recall(...)    # GCG, one list entry per image; gcg_miou per image
    cider({k: [ptb_tokenize(r) for r in refs]}, {k: [ptb_tokenize(caption)]})

Reproduces:
  * DAVIS region J and boundary F per frame (`third_parts/revos/utils/metircs.py`: `db_eval_iou`,
    `db_eval_boundary` / `f_measure` / `_seg2bmap`, with skimage's `disk` and `cv2.dilate`), as
    `tools/eval/eval_{davis,mevis,revos,ref_sav}.py` call them: per expression, the mean over frames;
  * the ReVOS extras of the same file: per-frame pixel accuracy A (`get_r2vos_accuracy`) and
    robustness R (`get_r2vos_robustness`);
  * RefCOCO-family cIoU and gIoU (`projects/sa2va/evaluation/dataset/RES.py: RESDataset.evaluate`,
    `intersectionAndUnionGPU`);
  * GCG (`projects/sa2va/evaluation/metrics_gcg.py`): AP50 as pycocotools' `COCOeval('segm')`
    reports it (`stats[1]`) for the inputs that script builds, mIoU (`compute_miou`), recall
    (`find_best_matches`, `evaluate_recall_with_mapping`);
  * CIDEr-D of pycocoevalcap (`Cider().compute_score`), and an approximation of its Java
    `PTBTokenizer` step.

Deviations:
  * ReVOS A and R take the ground truth as a binary mask. The reference sums the instance masks of
    an expression into a uint8 array, so where two instances overlap the value is 2; its A then
    counts that pixel as wrong even when predicted, and its R weighs a predicted pixel there by
    255 (`1 - 2` wraps around in uint8). Pass the union of the instances here; the numbers agree
    wherever instances do not overlap.
  * cIoU and gIoU sums are exact (integers, float64); the reference accumulates float32 tensors,
    which moves the result by about 1e-6 relative on a full split.
  * Masks only: decode COCO RLE / polygons first (`data.rle_decode`, `data.decode_mask`). A
    prediction of another size than its ground truth is an error (pycocotools scores it -1).
  * `ptb_tokenize` is a rule-based stand-in for Stanford's tokenizer; see its docstring.
"""
import math
import re
from collections import Counter
from typing import Callable, Sequence

import numpy as np


def _binary(mask, name: str) -> np.ndarray:
    mask = np.asarray(mask)
    if mask.ndim != 2:
        raise ValueError(f"{name} must be an (H, W) mask, got shape {mask.shape}")
    return mask.astype(bool)


def _same_shape(a: np.ndarray, b: np.ndarray, what: str):
    if a.shape != b.shape:
        raise ValueError(f"{what}: prediction is {a.shape[0]}x{a.shape[1]}, ground truth {b.shape[0]}x{b.shape[1]}")


def _frames(pred_frames, gt_frames) -> list[tuple[np.ndarray, np.ndarray]]:
    if len(pred_frames) != len(gt_frames):
        raise ValueError(f"{len(pred_frames)} predicted frames for {len(gt_frames)} ground-truth frames")
    if len(gt_frames) == 0:
        raise ValueError("a video needs at least one frame")
    pairs = [(_binary(p, "predicted frame"), _binary(g, "ground-truth frame")) for p, g in zip(pred_frames, gt_frames)]
    for i, (p, g) in enumerate(pairs):
        _same_shape(p, g, f"frame {i}")
    return pairs


# ----------------------------------------------------------------------------- DAVIS J and F

def region_iou(pred, gt) -> float:
    """DAVIS J of one frame (`db_eval_iou`): |P ∩ G| / |P ∪ G|, 1 when both masks are empty."""
    pred, gt = _binary(pred, "prediction"), _binary(gt, "ground truth")
    _same_shape(pred, gt, "region_iou")
    union = np.count_nonzero(pred | gt)
    return 1.0 if union == 0 else np.count_nonzero(pred & gt) / union


def seg2bmap(mask) -> np.ndarray:
    """One-pixel boundaries of a mask (`_seg2bmap` at the mask's own size): a pixel is boundary if it
    differs from its right, bottom or bottom-right neighbour (pixels past the edge count as unset).
    On the last row only the right neighbour counts, on the last column only the bottom one, and
    the bottom-right corner is never boundary."""
    seg = _binary(mask, "mask")
    right, below, diagonal = (np.zeros_like(seg) for _ in range(3))
    right[:, :-1] = seg[:, 1:]
    below[:-1, :] = seg[1:, :]
    diagonal[:-1, :-1] = seg[1:, 1:]
    bmap = (seg ^ right) | (seg ^ below) | (seg ^ diagonal)
    bmap[-1, :] = seg[-1, :] ^ right[-1, :]
    bmap[:, -1] = seg[:, -1] ^ below[:, -1]
    bmap[-1, -1] = False
    return bmap


def disk(radius: float) -> np.ndarray:
    """skimage.morphology.disk: uint8 square of side len(arange(-r, r + 1)), 1 where x² + y² ≤ r².
    A non-integer radius keeps skimage's grid (offsets -r, -r + 1, ...), as the reference gets it
    for a fractional `bound_th` ≥ 1."""
    offsets = np.arange(-radius, radius + 1)
    x, y = np.meshgrid(offsets, offsets)
    return (x ** 2 + y ** 2 <= radius ** 2).astype(np.uint8)


def _runs(row: np.ndarray) -> list[tuple[int, int]]:
    """(first, last) column of every run of set elements in a 1-D bool array."""
    edges = np.diff(np.concatenate([[0], row.astype(np.int8), [0]]))
    return list(zip(np.flatnonzero(edges == 1), np.flatnonzero(edges == -1) - 1))


def dilate(mask, structure) -> np.ndarray:
    """cv2.dilate(mask, structure) with the default anchor (the kernel's centre, (kh // 2, kw // 2))
    and border (outside pixels never set): out[y, x] = any src[y + i - kh // 2, x + j - kw // 2]
    over the set kernel elements (i, j). Computed per kernel row and run with prefix sums."""
    src = _binary(mask, "mask")
    kernel = np.asarray(structure).astype(bool)
    if kernel.ndim != 2 or not kernel.any():
        raise ValueError(f"structure must be a 2-D kernel with a set element, got shape {kernel.shape}")
    kh, kw = kernel.shape
    h, w = src.shape
    padded = np.zeros((h + kh - 1, w + kw - 1), dtype=bool)  # padded[y + i, x + j] = src[y + i - ay, x + j - ax]
    padded[kh // 2:kh // 2 + h, kw // 2:kw // 2 + w] = src
    prefix = np.zeros((padded.shape[0], padded.shape[1] + 1), dtype=np.int64)
    prefix[:, 1:] = np.cumsum(padded, axis=1)  # prefix[r, c] = set pixels in padded[r, :c]
    out = np.zeros((h, w), dtype=bool)
    for i in range(kh):
        for first, last in _runs(kernel[i]):
            rows = prefix[i:i + h]
            out |= rows[:, last + 1:last + 1 + w] > rows[:, first:first + w]
    return out


def boundary_f(pred, gt, bound_th: float = 0.008) -> float:
    """DAVIS boundary F-measure of one frame (`f_measure`). Boundaries match within a disk of radius
    ceil(bound_th · ‖(H, W)‖₂) pixels (bound_th < 1) or bound_th pixels. Precision = predicted
    boundary pixels near the ground-truth boundary / predicted boundary pixels, recall the other
    way round; no predicted boundary: P=1, R=0 (P=R=1 if neither has one); no ground-truth
    boundary: P=0, R=1. F = 2PR / (P + R), 0 when P + R = 0."""
    pred, gt = _binary(pred, "prediction"), _binary(gt, "ground truth")
    _same_shape(pred, gt, "boundary_f")
    radius = bound_th if bound_th >= 1 else math.ceil(bound_th * math.hypot(*pred.shape))
    pred_edge, gt_edge = seg2bmap(pred), seg2bmap(gt)
    n_pred, n_gt = np.count_nonzero(pred_edge), np.count_nonzero(gt_edge)
    if n_pred == 0 or n_gt == 0:
        precision, recall = float(n_pred == 0), float(n_gt == 0)
    else:
        kernel = disk(radius)
        precision = np.count_nonzero(pred_edge & dilate(gt_edge, kernel)) / n_pred
        recall = np.count_nonzero(gt_edge & dilate(pred_edge, kernel)) / n_gt
    return 0.0 if precision + recall == 0 else 2 * precision * recall / (precision + recall)


def j_and_f(pred_frames, gt_frames) -> tuple[float, float]:
    """(J, F) of one expression: region IoU and boundary F averaged over its frames. A benchmark's
    J&F is (mean J + mean F) / 2 with the means over expressions."""
    pairs = _frames(pred_frames, gt_frames)
    j = float(np.mean([region_iou(p, g) for p, g in pairs]))
    f = float(np.mean([boundary_f(p, g) for p, g in pairs]))
    return j, f


# ----------------------------------------------------------------------------- ReVOS A and R

def pixel_accuracy(pred, gt) -> float:
    """ReVOS A of one frame (`get_r2vos_accuracy`): the share of pixels where prediction and ground
    truth agree."""
    pred, gt = _binary(pred, "prediction"), _binary(gt, "ground truth")
    _same_shape(pred, gt, "pixel_accuracy")
    return float(np.mean(pred == gt))


def robustness(pred, gt, foreground) -> float:
    """ReVOS R of one frame (`get_r2vos_robustness`): max(1 - |P \\ G| / (Σ foreground + 1e-6), 0),
    where foreground is the frame of the video's foreground mask (`mask_dict_foreground.json`),
    summed as given: the reference sums a multi-part foreground over its parts, so overlapping parts
    count once per part."""
    pred, gt = _binary(pred, "prediction"), _binary(gt, "ground truth")
    foreground = np.asarray(foreground)
    _same_shape(pred, gt, "robustness")
    _same_shape(pred, foreground, "robustness (foreground)")
    false_positives = np.count_nonzero(pred & ~gt)
    return max(1 - false_positives / (foreground.sum(dtype=np.int64) + 1e-6), 0.0)


# ----------------------------------------------------------------------------- referring segmentation

class RefSegScore:
    """RefCOCO-family cIoU and gIoU over queries (`RESDataset.evaluate` in
    projects/sa2va/evaluation/dataset/RES.py); one `add` per referring sentence.

    cIoU = Σ|P ∩ G| / (Σ|P ∪ G| + 1e-10) (the reported "Acc"); gIoU = mean over queries of
    |P ∩ G| / (|P ∪ G| + 1e-5), a query whose union is empty scoring 1."""

    def __init__(self):
        self.intersection = 0
        self.union = 0
        self.iou_sum = 0.0
        self.count = 0

    def add(self, pred, gt):
        """One query; pred None means no mask was predicted (scored as an empty mask).

        gt may be the reference's decoding: the annotation's parts summed as uint8. Its 2-bin
        histogram (`intersectionAndUnionGPU`, K=2) counts only value 1 as foreground, so where
        two parts overlap (value 2) a predicted pixel is in the union but not the intersection
        and an unpredicted one is in neither; a binary gt is the plain IoU."""
        gt = np.asarray(gt)
        if gt.ndim != 2:
            raise ValueError(f"ground truth must be an (H, W) mask, got shape {gt.shape}")
        fg = gt == 1
        pred = np.zeros_like(fg) if pred is None else _binary(pred, "prediction")
        _same_shape(pred, fg, "RefSegScore.add")
        intersection = np.count_nonzero(pred & fg)
        union = np.count_nonzero(pred) + np.count_nonzero(fg) - intersection
        self.intersection += intersection
        self.union += union
        self.iou_sum += 1.0 if union == 0 else intersection / (union + 1e-5)
        self.count += 1

    def _check(self):
        if self.count == 0:
            raise ValueError("no queries were added")

    @property
    def ciou(self) -> float:
        self._check()
        return self.intersection / (self.union + 1e-10)

    @property
    def giou(self) -> float:
        self._check()
        return self.iou_sum / self.count


# ----------------------------------------------------------------------------- GCG

def _masks(masks, name: str) -> list[np.ndarray]:
    return [_binary(m, name) for m in masks]


def _iou_matrix(rows: list[np.ndarray], cols: list[np.ndarray]) -> np.ndarray:
    """(len(rows), len(cols)) IoUs as metrics_gcg.py's `compute_iou`: NaN where both are empty."""
    ious = np.zeros((len(rows), len(cols)))
    for i, a in enumerate(rows):
        for j, b in enumerate(cols):
            _same_shape(a, b, "GCG masks")
            with np.errstate(invalid="ignore"):
                ious[i, j] = np.float64(np.count_nonzero(a & b)) / np.count_nonzero(a | b)
    return ious


def gcg_miou(pred_masks: Sequence, gt_masks: Sequence) -> float:
    """One image's GCG mIoU term (`compute_miou`); the split's mIoU is the mean over its images
    (`evaluate_mask_miou`). Repeatedly pair the predicted and ground-truth mask with the highest
    remaining IoU, one-to-one, while that IoU is > 0; the mean paired IoU, 0 with no pair. As in the
    reference, a NaN IoU (both masks empty) in the remaining matrix ends the pairing (NumPy's max
    of it is NaN, and NaN > 0 is false)."""
    ious = _iou_matrix(_masks(pred_masks, "predicted mask"), _masks(gt_masks, "ground-truth mask"))
    paired = []
    while ious.size > 0 and np.max(ious) > 0:
        i, j = np.unravel_index(np.argmax(ious), ious.shape)
        paired.append(ious[i, j])
        ious = np.delete(np.delete(ious, i, axis=0), j, axis=1)
    return float(np.mean(paired)) if paired else 0.0


def gcg_matches(gt_masks: Sequence, gt_labels: Sequence[str], pred_masks: Sequence, pred_labels: Sequence[str],
                similarity: Callable[[str, str], float], iou_threshold: float = 0.5,
                similarity_threshold: float = 0.5) -> list[tuple[int, int]]:
    """One image's (gt, pred) matches of GCG recall (`find_best_matches`). Greedy by IoU: take the
    highest remaining ground-truth/prediction IoU; stop unless it is ≥ iou_threshold and the
    similarity of the GT label and the predicted phrase with the same indices is ≥
    similarity_threshold (a top pair that fails ends the search, as in the reference); else match
    it and zero its row and column. similarity(gt_label, phrase) is the reference's BERT cosine.

    Labels pair with masks by index. If a pair that passes the IoU test has an index beyond the
    labels, the reference's lookup raises IndexError, which its caller catches: the image then
    adds no match (its labels still count), so this returns []."""
    ious = _iou_matrix(_masks(gt_masks, "ground-truth mask"), _masks(pred_masks, "predicted mask"))
    used_gt, used_pred, matches = set(), set(), []
    while ious.size > 0:
        g, p = (int(k) for k in np.unravel_index(np.argmax(ious), ious.shape))
        if ious[g, p] < iou_threshold:
            break
        if g >= len(gt_labels) or p >= len(pred_labels):
            return []
        # the reference zeroes a matched row and column of its similarity matrix too
        sim = 0.0 if g in used_gt or p in used_pred else similarity(gt_labels[g], pred_labels[p])
        if sim < similarity_threshold:
            break
        matches.append((g, p))
        used_gt.add(g)
        used_pred.add(p)
        ious[g, :] = 0
        ious[:, p] = 0
    return matches


def gcg_recall(gt_masks: Sequence[Sequence], gt_labels: Sequence[Sequence[str]], pred_masks: Sequence[Sequence],
               pred_labels: Sequence[Sequence[str]], similarity: Callable[[str, str], float],
               iou_threshold: float = 0.5, similarity_threshold: float = 0.5) -> float:
    """GCG recall (`evaluate_recall_with_mapping`): matches (`gcg_matches`) over all images divided
    by the number of ground-truth labels over all images; 0 with no labels. One entry per image in
    every sequence."""
    n = len(gt_masks)
    if not len(gt_labels) == len(pred_masks) == len(pred_labels) == n:
        raise ValueError(f"per-image inputs differ in length: {n} GT mask lists, {len(gt_labels)} GT label "
                         f"lists, {len(pred_masks)} predicted mask lists, {len(pred_labels)} phrase lists")
    matched = sum(len(gcg_matches(gm, gl, pm, pl, similarity, iou_threshold, similarity_threshold))
                  for gm, gl, pm, pl in zip(gt_masks, gt_labels, pred_masks, pred_labels))
    labels = sum(len(gl) for gl in gt_labels)
    return matched / labels if labels > 0 else 0.0


def _phrase_words(text: str) -> list[str]:
    words = re.findall(r"[a-z0-9]+", text.lower())
    return words[1:] if words[:1] in (["a"], ["an"], ["the"]) else words


def phrase_match(gt_masks: Sequence[Sequence], gt_labels: Sequence[Sequence[str]], pred_masks: Sequence[Sequence],
                 pred_labels: Sequence[Sequence[str]], iou_threshold: float = 0.7) -> float:
    """Ours, not a published protocol: the fraction of ground-truth phrases matched, one to one, to a
    predicted phrase with the same words (case, punctuation and a leading article aside) whose mask
    has IoU >= iou_threshold with the phrase's mask; pairs are taken greedily by IoU. It needs
    labels that name the objects exactly, as a generated world's do. One entry per image in every
    sequence; labels pair with masks by index."""
    n = len(gt_masks)
    if not len(gt_labels) == len(pred_masks) == len(pred_labels) == n:
        raise ValueError(f"per-image inputs differ in length: {n} GT mask lists, {len(gt_labels)} GT label "
                         f"lists, {len(pred_masks)} predicted mask lists, {len(pred_labels)} phrase lists")
    matched = labels = 0
    for gm, gl, pm, pl in zip(gt_masks, gt_labels, pred_masks, pred_labels):
        if len(gl) != len(gm):
            raise ValueError(f"{len(gl)} ground-truth phrases for {len(gm)} masks in one image")
        labels += len(gl)
        ious = _iou_matrix(_masks(gm, "ground-truth mask"), _masks(pm[:len(pl)], "predicted mask"))
        same = np.array([[_phrase_words(g) == _phrase_words(p) for p in pl[:len(pm)]] for g in gl], dtype=bool)
        ious = np.where(same.reshape(ious.shape) & (np.nan_to_num(ious) >= iou_threshold), np.nan_to_num(ious), -1.0)
        while ious.size > 0 and ious.max() >= 0:
            g, p = np.unravel_index(np.argmax(ious), ious.shape)
            matched += 1
            ious[g, :] = -1.0
            ious[:, p] = -1.0
    return matched / labels if labels > 0 else 0.0


MAX_DETECTIONS = 100  # COCOeval's maxDets[-1]
RECALL_THRESHOLDS = np.linspace(0.0, 1.0, 101)  # COCOeval's recThrs, built the same way


def _coco_ious(dets: list[np.ndarray], gts: list[np.ndarray], crowd: list[bool]) -> np.ndarray:
    """(n_det, n_gt) mask IoUs as pycocotools' `maskUtils.iou`: 0 without overlap; against a crowd
    ground truth, |D ∩ G| / |D|."""
    ious = np.zeros((len(dets), len(gts)))
    for i, d in enumerate(dets):
        for j, g in enumerate(gts):
            _same_shape(d, g, "GCG masks")
            inter = np.count_nonzero(d & g)
            if inter:
                ious[i, j] = inter / (np.count_nonzero(d) if crowd[j] else np.count_nonzero(d | g))
    return ious


def _match_image(dets: list[np.ndarray], gts: list[np.ndarray], crowd: list[bool]) -> tuple[np.ndarray, np.ndarray]:
    """COCOeval.evaluateImg at IoU 0.5, area 'all': (matched, ignored) flags per detection, in order."""
    order = np.argsort(np.asarray(crowd, dtype=bool), kind="mergesort")  # regular ground truth first
    gts, crowd = [gts[k] for k in order], [bool(crowd[k]) for k in order]
    ious = _coco_ious(dets, gts, crowd)
    gt_taken = np.zeros(len(gts), dtype=bool)
    matched = np.zeros(len(dets), dtype=bool)
    ignored = np.zeros(len(dets), dtype=bool)
    for d in range(len(dets)):
        best_iou, m = min(0.5, 1 - 1e-10), -1
        for g in range(len(gts)):
            if gt_taken[g] and not crowd[g]:
                continue
            if m > -1 and not crowd[m] and crowd[g]:  # matched a regular one; the rest are ignored ones
                break
            if ious[d, g] < best_iou:
                continue
            best_iou, m = ious[d, g], g
        if m == -1:
            continue
        matched[d], ignored[d] = True, crowd[m]  # a crowd region is ignore ground truth
        gt_taken[m] = True
    return matched, ignored


def ap50(pred_masks: Sequence[Sequence], gt_masks: Sequence[Sequence],
         gt_iscrowd: Sequence[Sequence[bool]] | None = None) -> float:
    """GCG AP50: what pycocotools' COCOeval(iouType='segm').stats[1] reports for metrics_gcg.py's
    inputs (every prediction category 1 with score 1.0; the ground truth's iscrowd; maxDets 100;
    area 'all'; 101-point interpolated precision at IoU 0.5); -1 without non-crowd ground truth.

    One entry per ground-truth image, in the order COCOeval visits them: ascending image id (the
    GCG ids are file names, sorted as strings). With all scores equal that order, and the order of
    an image's predictions, break the ties of the precision-recall curve, so they change AP.
    Ground-truth annotation ids are taken to be non-zero (pycocotools reads a match to id 0 as no
    match). Area ranges never exclude here: 'all' spans 0..1e10 pixels."""
    if len(pred_masks) != len(gt_masks):
        raise ValueError(f"predictions for {len(pred_masks)} images, ground truth for {len(gt_masks)}")
    if gt_iscrowd is None:
        gt_iscrowd = [[False] * len(g) for g in gt_masks]
    matched, ignored, n_regular = [], [], 0
    for dets, gts, crowd in zip(pred_masks, gt_masks, gt_iscrowd):
        if len(crowd) != len(gts):
            raise ValueError(f"{len(crowd)} iscrowd flags for {len(gts)} ground-truth masks")
        dets = _masks(dets, "predicted mask")[:MAX_DETECTIONS]
        m, i = _match_image(dets, _masks(gts, "ground-truth mask"), list(crowd))
        matched.append(m)
        ignored.append(i)
        n_regular += sum(not c for c in crowd)
    if n_regular == 0:
        return -1.0
    # COCOeval.accumulate: a stable sort of equal scores keeps images and detections in order
    matched, ignored = np.concatenate(matched), np.concatenate(ignored)
    tp = np.cumsum(matched & ~ignored).astype(float)
    fp = np.cumsum(~matched & ~ignored).astype(float)
    recall = tp / n_regular
    precision = (tp / (fp + tp + np.spacing(1))).tolist()
    for k in range(len(precision) - 1, 0, -1):  # the precision envelope
        precision[k - 1] = max(precision[k - 1], precision[k])
    at = np.searchsorted(recall, RECALL_THRESHOLDS, side="left")
    sampled = [precision[k] if k < len(precision) else 0.0 for k in at]  # unreached recall scores 0
    return float(np.mean(sampled))


# ----------------------------------------------------------------------------- captions

def _ngram_counts(sentence: str, n: int) -> Counter:
    """pycocoevalcap's `precook`: counts of the 1..n-grams of a whitespace-split sentence,
    inserted shortest first, left to right (the order the scorer sums in)."""
    words = sentence.split()
    counts = Counter()
    for k in range(1, n + 1):
        for i in range(len(words) - k + 1):
            counts[tuple(words[i:i + k])] += 1
    return counts


def cider(gts: dict, res: dict, n: int = 4, sigma: float = 6.0) -> tuple[float, list[float]]:
    """CIDEr-D as pycocoevalcap's `Cider().compute_score(gts, res)` on tokenized strings: (mean,
    per-key scores in the order of gts). gts[k] is a non-empty list of references, res[k] a list
    of one candidate.

    An n-gram weighs tf · (log N - log max(1, df)), df counting the keys whose references hold it,
    N the number of keys. Per n: Σ_g min(c_g, r_g) · r_g / (‖c‖ ‖r‖) (no division when a norm is
    0), times exp(-δ² / (2σ²)), δ the length difference of candidate and reference (the scorer
    counts bigrams, which gives the word difference unless a sentence is empty, and an empty
    sentence scores 0 anyway). The image score is 10 × the mean over n, averaged over references."""
    if gts.keys() != res.keys():
        raise ValueError("gts and res must have the same keys")
    if not gts:
        raise ValueError("no captions to score")
    keys = list(gts)
    for k in keys:
        if not isinstance(res[k], list) or len(res[k]) != 1:
            raise ValueError(f"res[{k!r}] must be a list of one caption")
        if not isinstance(gts[k], list) or len(gts[k]) == 0:
            raise ValueError(f"gts[{k!r}] must be a non-empty list of references")
    refs = [[_ngram_counts(r, n) for r in gts[k]] for k in keys]
    cands = [_ngram_counts(res[k][0], n) for k in keys]
    doc_freq = Counter()
    for image_refs in refs:
        doc_freq.update({g for counts in image_refs for g in counts})
    log_n = np.log(float(len(keys)))

    def tfidf(counts: Counter):
        vec, norm, length = [{} for _ in range(n)], [0.0] * n, 0
        for gram, tf in counts.items():
            k = len(gram) - 1
            vec[k][gram] = float(tf) * (log_n - np.log(max(1.0, doc_freq[gram])))
            norm[k] += vec[k][gram] ** 2
            if k == 1:
                length += tf
        return vec, [np.sqrt(v) for v in norm], length

    def similarity(cand, ref) -> np.ndarray:
        (vc, nc, lc), (vr, nr, lr) = cand, ref
        penalty = np.e ** (-(float(lc - lr) ** 2) / (2 * sigma ** 2))
        val = np.zeros(n)
        for k in range(n):
            for gram, w in vc[k].items():
                r = vr[k].get(gram, 0.0)
                val[k] += min(w, r) * r  # clipped: a repeated n-gram earns no more than the reference has
            if nc[k] != 0 and nr[k] != 0:
                val[k] /= nc[k] * nr[k]
            val[k] *= penalty
        return val

    scores = []
    for cand, image_refs in zip(cands, refs):
        c = tfidf(cand)
        total = np.zeros(n)
        for r in image_refs:
            total += similarity(c, tfidf(r))
        scores.append(float(np.mean(total) / len(image_refs) * 10.0))
    return float(np.mean(scores)), scores


# Tokens pycocoevalcap's PTBTokenizer drops after tokenizing. Its list also has -LRB-, -RRB-, -LCB-,
# -RCB-, but the Java tool runs with -lowerCase, so brackets come out as -lrb- etc. and stay.
PTB_DROPPED = {"''", "'", "``", "`", "-LRB-", "-RRB-", "-LCB-", "-RCB-", ".", "?", "!", ",", ":", "-", "--", "...", ";"}
_BRACKETS = {"(": " -lrb- ", ")": " -rrb- ", "[": " -lsb- ", "]": " -rsb- ", "{": " -lcb- ", "}": " -rcb- "}
_BRACKET_TOKENS = {t.strip() for t in _BRACKETS.values()}
_UNICODE = {'"': " '' ", "\u201c": " '' ", "\u201d": " '' ", "\u2018": " ` ", "\u2019": "'",  # quotes as PTB's
            "\u2014": " -- ", "\u2013": " -- ", "\u2026": " ... "}
# words whose final period the tokenizer keeps (checked against CoreNLP 3.4.1)
_ABBREVIATIONS = {"mr", "mrs", "ms", "dr", "prof", "st", "jr", "sr", "vs", "etc", "inc", "co", "corp", "ltd", "bros",
                  "ave", "mt", "col", "gen", "ft", "sgt", "capt", "sen", "gov", "dept", "jan"}
_SPLIT_WORDS = {"cannot": ["can", "not"], "gonna": ["gon", "na"], "gotta": ["got", "ta"], "wanna": ["wan", "na"],
                "lemme": ["lem", "me"], "gimme": ["gim", "me"], "'tis": ["'t", "is"], "'twas": ["'t", "was"]}
_CLITIC = re.compile(r"^(.*[a-z])('s|'d|'ll|'ve|'m|'re)$")


def _keeps_period(word: str, next_word: str) -> bool:
    """Whether a word ending in '.' keeps it: single letters and acronyms (j., u.s., p.m., e.g.),
    listed abbreviations, and 'no.' before a number."""
    stem = word[:-1]
    if re.fullmatch(r"(?:[a-z]\.)*[a-z]", stem):
        return True
    return stem in _ABBREVIATIONS or (stem == "no" and next_word[:1].isdigit())


def _split_chunk(chunk: str, next_chunk: str) -> list[str]:
    """PTB tokens of one whitespace-free piece (brackets, quotes and most punctuation already apart)."""
    if chunk in _BRACKET_TOKENS:
        return [chunk]
    head, tail = [], []
    while len(chunk) > 1 and (chunk[0] == "'" and not re.match(r"'(?:\d\ds|n'?$|tis$|twas$)", chunk)
                              or chunk[0] == "-" and chunk[1].isalpha()):
        head.append(chunk[0])  # opening quote, or a dash before a word (not the sign of -1)
        chunk = chunk[1:]
    while len(chunk) > 1:
        if chunk[-1] in "'-" and not chunk.endswith("'n'"):
            tail.insert(0, chunk[-1])  # closing quote, possessive s', or a trailing dash
        elif chunk[-1] == "." and not _keeps_period(chunk, next_chunk):
            tail.insert(0, ".")
        else:
            break
        chunk = chunk[:-1]
    if chunk in _SPLIT_WORDS:
        return head + _SPLIT_WORDS[chunk] + tail
    clitics = []
    while m := _CLITIC.match(chunk):
        chunk, clitics = m.group(1), [m.group(2)] + clitics
    if len(chunk) > 3 and chunk.endswith("n't"):
        chunk, clitics = chunk[:-3], ["n't"] + clitics
    return head + [chunk] + clitics + tail


def ptb_tokenize(text: str) -> str:
    """Approximates pycocoevalcap's PTBTokenizer on one caption (Stanford CoreNLP 3.4.1
    `PTBTokenizer -preserveLines -lowerCase`, then the PTB_DROPPED tokens removed, tokens joined by
    one space): lower case; punctuation split from words (not the '.', ',' or ':' inside numbers
    and words such as 3.5, 1,000, 5:30, u.s.); clitics split (dog 's, do n't, ca n't, can not,
    gon na); brackets spelled -lrb- -rrb- -lsb- -rsb- -lcb- -rcb- (kept, since the Java output is
    lower case and the drop list upper case); quotes, . , : ; ? ! - -- ... dropped; runs such as
    ?! or !!! kept; $ % + * = etc. their own tokens; hyphenated and slashed words whole.

    Where it can differ from the Java tokenizer: abbreviations outside a short list keep no
    period (the Java lexer knows many more); URLs, e-mail addresses and emoticons are split;
    currency symbols other than $ are not normalised (Java writes € as $, £ as #); SGML/HTML
    entities and tags are not recognised; rare apostrophe forms (rock'n'roll, y'all) and odd dot
    runs (a..., two..dots) are tokenized differently."""
    text = text.replace("\n", " ")
    for old, new in _UNICODE.items():
        text = text.replace(old, new)
    text = text.lower()
    for old, new in _BRACKETS.items():
        text = text.replace(old, new)
    text = re.sub(r"[`;$%*+=~^|\\]", r" \g<0> ", text)
    text = re.sub(r"[?!]+", r" \g<0> ", text)
    text = re.sub(r"\.{3,}", " ... ", text)
    text = re.sub(r"(?<!\.)\.\.(?!\.)", " . . ", text)
    text = re.sub(r"-{2,}", " -- ", text)
    text = re.sub(r",(?!\d)|(?<!\d),", " , ", text)
    text = re.sub(r":(?!\d)|(?<!\d):", " : ", text)
    chunks = text.split()
    tokens = []
    for k, chunk in enumerate(chunks):
        tokens += _split_chunk(chunk, chunks[k + 1] if k + 1 < len(chunks) else "")
    return " ".join(t for t in tokens if t not in PTB_DROPPED)
