"""A tiny data root in the official Sa2VA release's layout: every file name, key and nesting of
the real one (projects/sa2va/configs/*.py DATA_ROOT), a few samples per dataset.

`write_official_root(root)` writes it and returns the facts the tests check against.
"""
import json
import pickle

import av
import numpy as np
from PIL import Image
from pycocotools import mask as mask_utils


def box(h, w, y0, x0, y1, x1) -> np.ndarray:
    m = np.zeros((h, w), bool)
    m[y0:y1, x0:x1] = True
    return m


def rle(m: np.ndarray, as_bytes: bool = False) -> dict:
    r = mask_utils.encode(np.asfortranarray(m.astype(np.uint8)))
    return {"size": list(r["size"]), "counts": r["counts"] if as_bytes else r["counts"].decode()}


def rect_polygon(y0, x0, y1, x1) -> list[float]:
    return [x0, y0, x1, y0, x1, y1, x0, y1]


def save_image(path, h, w, value=90):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((h, w, 3), value, np.uint8)).save(path)


def write_video(path, frames: list[np.ndarray], rate=24):
    path.parent.mkdir(parents=True, exist_ok=True)
    h, w = frames[0].shape[:2]
    with av.open(str(path), "w") as c:
        s = c.add_stream("libx264", rate=rate)
        s.width, s.height, s.pix_fmt = w, h, "yuv420p"
        for f in frames:
            for p in s.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(f), format="rgb24")):
                c.mux(p)
        for p in s.encode():
            c.mux(p)


def grey_frames(n, h=32, w=48) -> list[np.ndarray]:
    """Frame t is flat grey 10 + 20 t: which frame a sample took shows in its pixels."""
    return [np.full((h, w, 3), 10 + 20 * t, np.uint8) for t in range(n)]


def write_json(path, obj):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj))


def write_refcoco(root, name, refs_file) -> dict:
    """Two train images (one with 2 referred objects, one with 1), a val ref, a ref sharing an annotation."""
    folder = root / "ref_seg" / name
    H, W = 64, 96
    images, anns, refs = [], [], []
    objects = {}  # ann_id -> (sentences, polygons)
    for image_id, n_obj in ((1, 2), (2, 1)):
        file = f"COCO_train2014_{image_id:012d}.jpg"
        save_image(folder / "coco2014" / "train2014" / file, H, W)
        images.append({"id": image_id, "file_name": file, "height": H, "width": W})
        for k in range(n_obj):
            ann_id = 100 * image_id + k
            y0, x0 = 8 + 24 * k, 8 + 40 * k
            polys = [rect_polygon(y0, x0, y0 + 16, x0 + 24), rect_polygon(y0 + 4, x0 + 4, y0 + 12, x0 + 30)]  # overlapping parts
            anns.append({"id": ann_id, "image_id": image_id, "segmentation": polys, "area": 400.0,
                         "bbox": [x0, y0, 30, 16], "iscrowd": 0, "category_id": 1})
            sentences = [f"The Object {image_id}-{k} left.", f"OBJECT {image_id}-{k} Second"]
            refs.append({"ref_id": len(refs), "ann_id": ann_id, "image_id": image_id, "split": "train",
                         "sentences": [{"raw": s, "sent": s.lower(), "tokens": s.split()} for s in sentences],
                         "category_id": 1, "file_name": file})
            objects[ann_id] = (sentences, polys)
    # a val ref (left out of train) and a second ref of annotation 200 (its sentences win)
    refs.append({"ref_id": 90, "ann_id": 101, "image_id": 1, "split": "val",
                 "sentences": [{"raw": "val only"}], "category_id": 1})
    refs.append({"ref_id": 91, "ann_id": 200, "image_id": 2, "split": "train",
                 "sentences": [{"raw": "Later Ref."}], "category_id": 1})
    objects[200] = (["Later Ref."], objects[200][1])
    write_json(folder / "instances.json", {"images": images, "annotations": anns, "categories": [{"id": 1, "name": "x"}]})
    with open(folder / refs_file, "wb") as f:
        pickle.dump(refs, f, protocol=2)  # the refer toolkit's pickles are old protocols
    return {"size": (H, W), "objects": objects, "images": {1: [100, 101], 2: [200]}}


def write_refvos(root) -> dict:
    """ReVOS (two anno ids in one expression, None frames, a question), MeViS, Ref-YTVOS (running ids, a pickle)."""
    facts = {}
    H, W = 32, 48
    # ReVOS: one video of 8 frames, frames listed out of order
    revos = root / "video_datas" / "revos"
    names = [f"{t:05d}" for t in range(8)]
    for t, n in enumerate(names):
        save_image(revos / "vidA" / f"{n}.jpg", H, W, value=10 + 20 * t)
    a = [box(H, W, 2, 2, 12, 12) if t % 2 else None for t in range(8)]
    b = [box(H, W, 20, 30, 30, 44) for t in range(8)]
    write_json(revos / "meta_expressions_train_.json", {"videos": {"vidA": {
        "frames": list(reversed(names)),
        "expressions": {"1": {"exp": "The Two Boxes.", "anno_id": [10, 11], "obj_id": [0, 1]},
                        "0": {"exp": "which box moves? it is.", "anno_id": [11], "obj_id": [1]}}}}})
    write_json(revos / "mask_dict.json", {"10": [rle(m) if m is not None else None for m in a],
                                           "11": [rle(m) for m in b]})
    facts["ReVOS"] = {"frames": [str(revos / "vidA" / f"{n}.jpg") for n in names], "size": (H, W),
                      "expressions": {"the two boxes": [((x if x is not None else np.zeros((H, W), bool)) | y)
                                                        for x, y in zip(a, b)],
                                      "which box moves? it is.": b}}
    # MeViS: two videos, 4 frames (short: frames drawn with replacement)
    mevis = root / "video_datas" / "mevis" / "train"
    exps, masks = {}, {}
    for v in range(2):
        for t in range(4):
            save_image(mevis / "JPEGImages" / f"v{v}" / f"{t:05d}.jpg", H, W, value=30 * t)
        masks[str(v)] = [rle(box(H, W, 0, 0, 8 + v, 8)) for _ in range(4)]
        exps[f"v{v}"] = {"frames": [f"{t:05d}" for t in range(4)],
                         "expressions": {"0": {"exp": f"Cat {v}", "anno_id": [str(v)], "obj_id": [v]}}}
    write_json(mevis / "meta_expressions.json", {"videos": exps})
    write_json(mevis / "mask_dict.json", masks)
    # Ref-YTVOS: no anno_id; masks by running expression count, in a pickle with bytes counts
    rvos = root / "video_datas" / "rvos"
    exps, masks, count = {}, {}, 0
    for v in ("y1", "y0"):  # file order, not sorted, numbers the masks
        for t in range(3):
            save_image(rvos / "train" / "JPEGImages" / v / f"{t:05d}.jpg", H, W)
        exps[v] = {"frames": [f"{t:05d}" for t in range(3)], "expressions": {}}
        for e in ("1", "0"):
            exps[v]["expressions"][e] = {"exp": f"thing {v} {e}", "obj_id": "1"}
        for e in sorted(exps[v]["expressions"]):  # expression ids sorted within a video
            masks[str(count)] = [rle(box(H, W, 0, 0, 2 + count, 4), as_bytes=True)] * 3
            facts.setdefault("Ref-YTVOS", {})[f"thing {v} {e}"] = 2 + count
            count += 1
    write_json(rvos / "meta_expressions" / "train" / "meta_expressions.json", {"videos": exps})
    with open(rvos / "mask_dict.pkl", "wb") as f:
        pickle.dump(masks, f)
    return facts


def write_refsav(root) -> dict:
    """One SA-V video of 12 frames (3 annotated at every 4th), two objects; the doubled chunk folder."""
    sav = root / "video_datas" / "sam_v_full" / "sav_train" / "sav_000"
    H, W = 32, 48
    write_video(sav / "sav_000001.mp4", grey_frames(12, H, W))
    objs = [[box(H, W, 0, 0, 10, 10 + 4 * f), box(H, W, 16, 20, 30, 40)] for f in range(3)]
    write_json(sav / "sav_000001_manual.json", {"masklet": [[rle(m) for m in f] for f in objs],
                                                 "video_id": "sav_000001", "masklet_num": 2})
    write_json(root / "video_datas" / "Ref-SAV.json", {"sav_000001": {
        "video_path": "sav_000/sav_train/sav_000/sav_000001.mp4",
        "anno_path": "sav_000/sav_train/sav_000/sav_000001_manual.json",
        "objects": {"0": {"formated": "The first box, small.", "exp": "x"}, "1": {"formated": "the big box", "exp": "y"}}}})
    return {"masks": {"The first box, small.": [f[0] for f in objs], "the big box": [f[1] for f in objs]}}


def write_chatunivi(root):
    folder = root / "video_datas" / "chat_univi"
    write_video(folder / "Activity_Videos" / "v_long.mp4", grey_frames(12))
    write_video(folder / "Activity_Videos" / "v_short.mp4", grey_frames(3))
    write_json(folder / "video_chat.json", [
        {"video": "v_long.mkv", "conversations": [
            {"from": "human", "value": "<video>\nWhat happens? "}, {"from": "gpt", "value": " Someone runs. "},
            {"from": "human", "value": "Then?"}, {"from": "gpt", "value": "They stop."}]},
        {"video": "v_short.mp4", "conversations": [
            {"from": "human", "value": "<video>\nDescribe it."}, {"from": "gpt", "value": "Grey."}]}])


def write_llava(root):
    folder = root / "llava_data"
    save_image(folder / "llava_images" / "coco" / "train2017" / "000000000009.jpg", 40, 60)
    write_json(folder / "LLaVA-Instruct-150K" / "llava_v1_5_mix665k.json", [
        {"id": "a", "image": "coco/train2017/000000000009.jpg", "conversations": [
            {"from": "gpt", "value": "dropped"},
            {"from": "human", "value": " <image>\nWhat is it? "}, {"from": "human", "value": "Be brief."},
            {"from": "gpt", "value": "  A grey picture. "}, {"from": "human", "value": "Sure?"},
            {"from": "gpt", "value": "Yes."}, {"from": "human", "value": "a trailing question"}]},
        {"id": "b", "conversations": [{"from": "human", "value": "<image>Hello"}, {"from": "gpt", "value": "Hi."}]}])


def write_gcg(root) -> dict:
    g = root / "glamm_data"
    H, W = 48, 64
    for sub, file in (("coco2014/train2014", "COCO_train2014_000000000001.jpg"), ("grandf/train", "g1.jpg"),
                      ("coco2017", "p1.jpg"), ("flickr30k/Flickr30K", "10.jpg"), ("flickr30k/Flickr30K", "11.jpg")):
        save_image(g / "images" / sub / file, H, W)
    save_image(g / "images" / "flickr30k" / "Flickr30K" / "12.jpg", 20, 64)
    ann = g / "annotations"
    a, b = box(H, W, 0, 0, 10, 10), box(H, W, 20, 20, 40, 50)
    write_json(ann / "RefCOCOg_GCG_train.json", [{"1": {
        "img_file_name": "COCO_train2014_000000000001.jpg", "caption": '"A Dog chases a ball in the park."',
        "refs": [{"sentence": "a ball", "segmentation": [rect_polygon(20, 20, 40, 50)]},
                 {"sentence": "A dog", "segmentation": [rect_polygon(0, 0, 10, 10)]},
                 {"sentence": "a cat", "segmentation": [rect_polygon(0, 0, 5, 5)]}]}}])
    generic = {"file_name": "g1.jpg", "caption": ' "Two men on a bench." ',
               "groundings": {"a bench": {"token_positives": [12, 19], "rle_masks": [rle(b)]},
                              "Two men": {"token_positives": [1, 8], "rle_masks": [rle(a), rle(box(H, W, 5, 5, 15, 15))]}}}
    write_json(ann / "GranDf_HA_GCG_train.json", [generic])
    write_json(ann / "OpenPsgGCG_train.json", [{**generic, "file_name": "p1.jpg"}])
    caption = "A woman holds an umbrella"
    write_json(ann / "flickr_mergedGT_GCG_train.json", {
        "images": [{"id": 1, "file_name": "10.jpg", "height": H, "width": W, "caption": caption},
                   {"id": 2, "file_name": "11.jpg", "height": H, "width": W, "caption": "Two words"},
                   {"id": 3, "file_name": "12.jpg", "height": 20, "width": 64, "caption": "too small an image"}],
        "annotations": [
            {"id": 1, "image_id": 1, "bbox": [20, 20, 30, 20], "area": 600, "tokens_positive": [[14, 25]], "sam_mask": rle(b)},
            {"id": 2, "image_id": 1, "bbox": [0, 0, 10, 10], "area": 100, "tokens_positive": [[0, 7]], "sam_mask": rle(a)},
            {"id": 3, "image_id": 1, "bbox": [100, 100, 5, 5], "area": 25, "tokens_positive": [[8, 13]], "sam_mask": rle(a)},
            {"id": 4, "image_id": 1, "bbox": [0, 0, 5, 5], "area": 25, "tokens_positive": [[8, 13]], "sam_mask": rle(a),
             "ignore": True}],
        "categories": [{"id": 1, "name": "object"}]})
    return {"a": a, "b": b, "a2": a | box(H, W, 5, 5, 15, 15)}


def write_osprey(root) -> dict:
    o = root / "osprey-724k"
    H, W = 64, 64
    save_image(o / "coco" / "train2017" / "000000000005.jpg", H, W)  # found in the third folder
    left, right = box(H, W, 0, 0, 64, 32), box(H, W, 0, 32, 64, 64)
    item = {"file_name": "000000000005.jpg", "height": H, "width": W,
            "annotation": [{"segmentation": [rect_polygon(0, 0, 64, 32)], "bbox": [0, 0, 32, 64]},
                           {"segmentation": rle(right), "bbox": [32, 0, 32, 64]}]}
    convo = [{"from": "human", "value": "What is in <region1>?"}, {"from": "gpt", "value": "A <grey> wall."},
             {"from": "human", "value": "And region2?"}, {"from": "gpt", "value": "More wall."}]
    tiny = {**item, "annotation": [{"segmentation": [rect_polygon(0, 0, 3, 3)]}]}  # under 4 cells of 16x16
    folder = o / "Osprey-724K"
    write_json(folder / "osprey_conversation.json", [{**item, "conversations": convo}, {**tiny, "conversations": convo}])
    write_json(folder / "osprey_detail_description.json", [{**item, "description": ["<Left> half.", "Right half."]}])
    write_json(folder / "osprey_short_form.json", [{**item, "conversations": convo}])
    write_json(folder / "osprey_part_level.json", [{**item, "conversations": convo}])
    write_json(folder / "osprey_lvis_positive_negative.json", [{**item, "conversations": convo}])
    return {"regions": [left, right]}


def write_davis(root):
    """Ref-DAVIS17 valid (an evaluation layout): no anno ids (masks numbered by expression over the
    sorted videos), a pickled mask dict."""
    folder = root / "video_datas" / "davis17"
    videos = {}
    for vid in ("zebra", "bear"):
        for t in range(2):
            save_image(folder / "valid" / "JPEGImages" / vid / f"{t:05d}.jpg", 16, 16)
        videos[vid] = {"frames": ["00000", "00001"], "expressions": {"0": {"exp": f"a {vid}", "obj_id": "1"}}}
    write_json(folder / "meta_expressions" / "valid" / "meta_expressions.json", {"videos": videos})
    with open(folder / "valid" / "mask_dict.pkl", "wb") as f:  # bear (sorted first) is 0
        pickle.dump({"0": [rle(box(16, 16, 0, 0, 4, 4), as_bytes=True), None],
                     "1": [rle(box(16, 16, 0, 0, 2, 2), as_bytes=True)] * 2}, f)


def write_official_root(root) -> dict:
    facts = {"RefCOCO": write_refcoco(root, "refcoco", "refs(unc).p"),
             "RefCOCO+": write_refcoco(root, "refcoco+", "refs(unc).p"),
             "RefCOCOg": write_refcoco(root, "refcocog", "refs(umd).p")}
    facts.update(write_refvos(root))
    facts["Ref-SAV"] = write_refsav(root)
    write_chatunivi(root)
    write_llava(root)
    facts["GCG"] = write_gcg(root)
    facts["Osprey"] = write_osprey(root)
    write_davis(root)
    (root / "custom.jsonl").write_text(json.dumps({  # your own samples beside the official data
        "image": "osprey-724k/coco/train2017/000000000005.jpg", "masks": [rle(facts["Osprey"]["regions"][0])],
        "conversations": [{"from": "human", "value": "<image>\nPlease segment the left half."},
                          {"from": "gpt", "value": "Sure, [SEG]."}]}) + "\n")
    return facts
