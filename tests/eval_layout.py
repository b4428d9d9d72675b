"""Tiny benchmark data in the official evaluation layouts (the paths of
projects/sa2va/evaluation/* and tools/eval/*), written by the tests; `write_eval_root(root)`
returns what the tests check against."""
import base64
import csv
import io
import pickle

import numpy as np
from PIL import Image

from tests.official_layout import box, rect_polygon, rle, save_image, write_json


def write_refcoco_eval(root) -> dict:
    """refcoco: val (2 images, one with 2 refs of 2 sentences), testA / testB refs; images under glamm_data."""
    folder = root / "ref_seg" / "refcoco"
    images_dir = root / "glamm_data" / "images" / "coco2014" / "train2014"
    H, W = 48, 64
    images, anns, refs = [], [], []
    for image_id, split in ((1, "val"), (2, "val"), (3, "testA"), (4, "testB")):
        file = f"COCO_train2014_{image_id:012d}.jpg"
        save_image(images_dir / file, H, W)
        images.append({"id": image_id, "file_name": file, "height": H, "width": W})
        for k in range(2 if image_id == 1 else 1):
            ann_id = 10 * image_id + k
            y0, x0 = 4 + 20 * k, 4 + 24 * k
            polys = [rect_polygon(y0, x0, y0 + 16, x0 + 20)]
            if image_id == 2:  # two overlapping parts: the overlap sums to 2
                polys.append(rect_polygon(y0 + 8, x0 + 10, y0 + 24, x0 + 30))
            anns.append({"id": ann_id, "image_id": image_id, "segmentation": polys, "area": 1.0, "iscrowd": 0,
                         "bbox": [x0, y0, 20, 16], "category_id": 1})
            refs.append({"ref_id": ann_id, "ann_id": ann_id, "image_id": image_id, "split": split, "category_id": 1,
                         "sentences": [{"raw": f"Thing {ann_id}.", "sent": f"thing {ann_id}"},
                                       {"raw": "Other", "sent": f"other {ann_id}"}]})
    write_json(folder / "instances.json", {"images": images, "annotations": anns, "categories": [{"id": 1}]})
    with open(folder / "refs(unc).p", "wb") as f:
        pickle.dump(refs, f, protocol=2)
    return {"size": (H, W), "val_queries": 6, "anns": {a["id"]: a for a in anns}}


def _frames(folder, vid, n, H=24, W=32):
    for t in range(n):
        save_image(folder / vid / f"{t:05d}.jpg", H, W, value=40 + 10 * t)
    return [f"{t:05d}" for t in range(n)]


def write_vos_eval(root) -> dict:
    H, W = 24, 32
    a, b = box(H, W, 2, 2, 12, 14), box(H, W, 10, 16, 22, 30)
    facts = {"a": a, "b": b, "size": (H, W)}
    # DAVIS: no anno ids; masks numbered over the sorted videos
    davis = root / "video_datas" / "davis17"
    videos = {}
    for vid in ("dog", "cat"):  # file order differs from sorted order
        videos[vid] = {"frames": _frames(davis / "valid" / "JPEGImages", vid, 3),
                       "expressions": {"1": {"exp": f"the {vid} on the left"}, "0": {"exp": f"a {vid}?"}}}
    write_json(davis / "meta_expressions" / "valid" / "meta_expressions.json", {"videos": videos})
    masks = {}  # cat/0 -> 0, cat/1 -> 1, dog/0 -> 2, dog/1 -> 3
    for k, m in enumerate((a, b, a | b, np.zeros_like(a))):
        masks[str(k)] = [rle(m, as_bytes=True)] * 3
    with open(davis / "valid" / "mask_dict.pkl", "wb") as f:
        pickle.dump(masks, f)
    facts["davis"] = {"cat/0": a, "cat/1": b, "dog/0": a | b, "dog/1": np.zeros_like(a)}
    # MeViS valid_u: anno ids, two objects in one expression
    mevis = root / "video_datas" / "mevis" / "valid_u"
    write_json(mevis / "meta_expressions.json", {"videos": {"v1": {
        "frames": _frames(mevis / "JPEGImages", "v1", 4),
        "expressions": {"0": {"exp": "both boxes", "anno_id": [5, 6]}, "1": {"exp": "the right box", "anno_id": [6]}}}}})
    write_json(mevis / "mask_dict.json", {"5": [rle(a)] * 4, "6": [rle(b), None, rle(b), rle(b)]})
    # ReVOS valid: type ids, height / width, foreground masks
    revos = root / "video_datas" / "revos"
    write_json(revos / "meta_expressions_valid_.json", {"videos": {"r1": {
        "frames": _frames(revos, "r1", 3), "height": H, "width": W,
        "expressions": {"0": {"exp": "the left box", "anno_id": [1], "type_id": 0},
                        "1": {"exp": "which box is bigger?", "anno_id": [2], "type_id": 1},
                        "2": {"exp": "nothing", "anno_id": [1], "type_id": 2}}}}})
    write_json(revos / "mask_dict.json", {"1": [rle(a)] * 3, "2": [rle(b)] * 3})
    write_json(revos / "mask_dict_foreground.json", {"r1": {"masks_rle": [rle(a | b)] * 3}})
    # Ref-SAV eval
    sav = root / "ref_sav_eval"
    write_json(sav / "meta_expressions_valid.json", {"videos": {"s1": {
        "frames": _frames(sav / "videos", "s1", 2), "height": H, "width": W,
        "expressions": {"0": {"exp": "a long description of the left box", "anno_id": [3], "type_id": 0},
                        "1": {"exp": "right box", "anno_id": [4], "type_id": 1}}}}})
    write_json(sav / "mask_dict.json", {"3": [rle(a)] * 2, "4": [rle(b)] * 2})
    # MeViS valid and Ref-YouTube-VOS valid: no masks (servers)
    mv = root / "video_datas" / "mevis" / "valid"
    write_json(mv / "meta_expressions.json", {"videos": {"m1": {"frames": _frames(mv / "JPEGImages", "m1", 2),
                                                               "expressions": {"0": {"exp": "a box"}}}}})
    yt = root / "video_datas" / "rvos"
    write_json(yt / "meta_expressions" / "valid" / "meta_expressions.json", {"videos": {"y1": {
        "frames": _frames(yt / "valid" / "JPEGImages", "y1", 2), "expressions": {"0": {"exp": "a box"}, "1": {"exp": "b"}}}}})
    return facts


def write_gcg_eval(root) -> dict:
    H, W = 40, 48
    images = root / "glamm_data" / "images" / "grandf" / "val_test"
    gt = root / "glamm_data" / "annotations" / "gcg_val_test"
    a, b = box(H, W, 0, 0, 20, 20), box(H, W, 20, 24, 40, 48)
    ims, anns, caps = [], [], []
    for i, (name, objs, caption, labels) in enumerate((("g_1", [a, b], "A man and a dog.", ["A man", "a dog"]),
                                                       ("g_2", [b], "A bench in a park.", ["A bench"]))):
        save_image(images / f"{name}.jpg", H, W)
        ims.append({"id": name, "file_name": f"{name}.jpg", "height": H, "width": W})
        for m in objs:
            anns.append({"id": len(anns) + 1, "image_id": name, "category_id": 1, "segmentation": rle(m),
                         "area": int(m.sum()), "bbox": [0, 0, 1, 1], "iscrowd": 0})
        caps.append({"id": i + 1, "image_id": name, "caption": caption, "labels": labels})
    write_json(gt / "val_gcg_coco_mask_gt.json", {"images": ims, "annotations": anns, "categories": [{"id": 1, "name": "object"}]})
    write_json(gt / "val_gcg_coco_caption_gt.json", {"images": ims, "annotations": caps})
    return {"a": a, "b": b}


def _b64(value: int) -> str:
    buf = io.BytesIO()
    Image.fromarray(np.full((28, 28, 3), value, np.uint8)).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def write_vqa(root) -> tuple[str, str]:
    """An MMBench-style multiple-choice TSV (with a circular copy) and an MME-style yes/no TSV."""
    mcq = root / "mcq.tsv"
    rows = [{"index": "0", "question": "What colour?", "hint": "Look.", "A": "red", "B": "grey", "C": "blue",
             "answer": "B", "category": "color", "image": _b64(120)},
            {"index": "1000000", "question": "What colour?", "hint": "Look.", "A": "grey", "B": "red", "C": "blue",
             "answer": "A", "category": "color", "image": "0"},
            {"index": "1", "question": "Shape?", "hint": "nan", "A": "square", "B": "circle", "C": "nan",
             "answer": "A", "category": "shape", "image": _b64(30)}]
    yorn = root / "mme.tsv"
    yrows = [{"index": str(i), "question": q, "answer": ans, "category": cat, "image_path": img, "image": _b64(60 + i)}
             for i, (q, ans, cat, img) in enumerate((("Is it grey?", "Yes", "color", "a.jpg"), ("Is it red?", "No", "color", "a.jpg"),
                                                      ("Is there one?", "Yes", "count", "b.jpg"), ("Two?", "No", "count", "b.jpg")))]
    for path, data in ((mcq, rows), (yorn, yrows)):
        with open(path, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(data[0]), delimiter="\t")
            w.writeheader()
            w.writerows(data)
    return str(mcq), str(yorn)


def write_eval_root(root) -> dict:
    facts = {"refcoco": write_refcoco_eval(root), "vos": write_vos_eval(root), "gcg": write_gcg_eval(root)}
    facts["vqa"] = write_vqa(root)
    return facts
