"""eval.py: the benchmarks' queries and scoring on tiny data in the official layouts
(tests/eval_layout.py), rescoring predictions files, and whole runs with a tiny model: one rank
and two under torchrun give the same table, a run killed half way resumes to the same table."""
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from PIL import Image
from safetensors.torch import load_file, save_file

import convert
import data
import debug_checkpoint
import eval as evaluation
from model.tokenizer import Tokenizer
from tests.eval_layout import write_eval_root

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    folder = tmp_path_factory.mktemp("bench")
    return folder, write_eval_root(folder)


def opts(folder, benchmark, **kw) -> evaluation.EvalOptions:
    return evaluation.EvalOptions(benchmark=benchmark, data=str(folder), **kw)


def write_predictions(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


def rescore(tmp_path, folder, benchmark, records, **kw):
    return evaluation.evaluate(opts(folder, benchmark, score=write_predictions(tmp_path / f"{benchmark}.jsonl", records), **kw))


# ----------------------------------------------------------------------------- queries and scoring

def test_refcoco_queries_and_scores(root, tmp_path):
    folder, facts = root
    bench = evaluation.open_benchmark(opts(folder, "refcoco"))
    assert [q.prompt for q in bench.queries][:2] == ["<image>\n Please segment thing 10 in this image.",
                                                     "<image>\n Please segment other 10 in this image."]
    assert len(bench.queries) == facts["refcoco"]["val_queries"]  # every sentence of every val ref
    assert len(evaluation.open_benchmark(opts(folder, "refcoco", split="testA")).queries) == 2
    H, W = facts["refcoco"]["size"]
    anns = facts["refcoco"]["anns"]

    def gt(qid):
        ann = anns[int(qid.split("/")[1])]
        return evaluation.coco_sum_map(ann["segmentation"], H, W)
    perfect = [{"id": q.id, "text": "Sure, [SEG].<|im_end|>", "masks": [[data.rle_encode(gt(q.id) > 0)]]}
               for q in bench.queries]
    got = rescore(tmp_path, folder, "refcoco", perfect)
    # the overlap of image 2's two parts sums to 2: the 2-bin histogram counts it as a wrong prediction
    overlap = int((gt(bench.queries[-1].id) == 2).sum())
    inter = sum(int((gt(q.id) == 1).sum()) for q in bench.queries)
    assert overlap > 0 and got["cIoU"] == pytest.approx(inter / (inter + 2 * overlap))
    no_seg = [{**r, "text": "I cannot."} for r in perfect]  # masks without a [SEG] in the text do not count
    assert rescore(tmp_path, folder, "refcoco", no_seg)["cIoU"] == 0.0
    union = [{**perfect[0], "masks": [[data.rle_encode(gt(perfect[0]["id"]) > 0)], [data.rle_encode(np.zeros((H, W), bool))]]}]
    first = rescore(tmp_path, folder, "refcoco", union + perfect[1:])
    assert first["cIoU"] == got["cIoU"]  # several masks: their union
    with pytest.raises(ValueError, match="lacks 1 of the 6 queries"):
        rescore(tmp_path, folder, "refcoco", perfect[1:])


def test_video_queries_and_scores(root, tmp_path):
    folder, facts = root
    v = facts["vos"]
    davis = evaluation.open_benchmark(opts(folder, "davis17"))
    assert [q.id for q in davis.queries] == ["dog/0", "dog/1", "cat/0", "cat/1"]
    assert davis.queries[0].prompt == "<image>\n a dog? Please respond with a segmentation mask."
    assert davis.queries[1].prompt == "<image>\nPlease segment the dog on the left."
    perfect = [{"id": q.id, "text": "[SEG]", "masks": [[data.rle_encode(v["davis"][q.id])] * 3]} for q in davis.queries]
    assert rescore(tmp_path, folder, "davis17", perfect) == {"J": 100.0, "F": 100.0, "J&F": 100.0, "expressions": 4}
    empty = [{"id": q.id, "text": "no", "masks": []} for q in davis.queries]
    got = rescore(tmp_path, folder, "davis17", empty)
    assert got["J"] == 25.0 and got["F"] == 25.0  # only dog/1 (an empty object) is right

    mevis = evaluation.open_benchmark(opts(folder, "mevis_u"))
    both = v["a"] | v["b"]
    preds = [{"id": "v1/0", "text": "", "masks": [[data.rle_encode(both)] * 4]},
             {"id": "v1/1", "text": "", "masks": [[data.rle_encode(v["b"])] * 4]}]
    got = rescore(tmp_path, folder, "mevis_u", preds)
    j0 = np.mean([1, data.decode_mask(data.rle_encode(v["a"]), 24, 32).sum() / both.sum(), 1, 1])  # frame 1: only anno 5
    j1 = np.mean([1, 0, 1, 1])  # frame 1 has no mask for anno 6
    assert got["J"] == round(100 * (j0 + j1) / 2, 2) and len(mevis.queries) == 2

    revos = [{"id": "r1/0", "text": "", "masks": [[data.rle_encode(v["a"])] * 3]},
             {"id": "r1/1", "text": "", "masks": [[data.rle_encode(v["a"])] * 3]},  # wrong box
             {"id": "r1/2", "text": "", "masks": []}]
    got = rescore(tmp_path, folder, "revos", revos)
    assert got["referring"]["J"] == 100.0 and got["referring"]["R"] == 100.0
    fg = (v["a"] | v["b"]).sum()
    assert got["reasoning"]["J"] == 0.0 and got["reasoning"]["R"] == pytest.approx(round(100 * (1 - v["a"].sum() / (fg + 1e-6)), 2))
    assert got["reasoning"]["A"] == pytest.approx(round(100 * np.mean(v["a"] == v["b"]), 2))
    assert got["overall"]["J&F"] == pytest.approx((got["referring"]["J&F"] + got["reasoning"]["J&F"]) / 2)
    sav = [{"id": "s1/0", "text": "", "masks": [[data.rle_encode(v["a"])] * 2]}, {"id": "s1/1", "text": "", "masks": []}]
    got = rescore(tmp_path, folder, "ref_sav", sav)
    assert got["long"]["J"] == 100.0 and got["short"]["J"] == 0.0 and "R" not in got["overall"]


def test_server_benchmarks_write_the_submission_archive(root, tmp_path):
    folder, facts = root
    track = np.zeros((24, 32), bool)
    track[3:9, 4:20] = True
    got = rescore(tmp_path, folder, "refytvos", [{"id": "y1/0", "text": "", "masks": [[data.rle_encode(track)] * 2]},
                                                 {"id": "y1/1", "text": "", "masks": []}])
    assert got["submission"].endswith("submission.zip") and os.path.isfile(got["submission"])
    png = tmp_path / "submission" / "Annotations" / "y1" / "0" / "00001.png"
    im = Image.open(png)
    assert im.mode == "P" and np.array_equal(np.array(im) == 255, track) and set(np.unique(np.array(im))) == {0, 255}
    assert np.array_equal(np.array(im.convert("L")) == 255, track)  # grey readers see 0 / 255 too
    assert not np.array(Image.open(tmp_path / "submission" / "Annotations" / "y1" / "1" / "00000.png")).any()


def test_gcg_scores(root, tmp_path):
    folder, facts = root
    a, b = facts["gcg"]["a"], facts["gcg"]["b"]
    bench = evaluation.open_benchmark(opts(folder, "gcg"))
    assert bench.queries[0].prompt.endswith("interleaved     segmentation masks for the corresponding parts of the answer.")
    preds = [{"id": "g_1", "text": "<p> A man </p> [SEG] and <p> a dog </p> [SEG].<|im_end|>",
              "masks": [[data.rle_encode(a)], [data.rle_encode(b)]]},
             {"id": "g_2", "text": "<p>A bench</p> [SEG] in a park.", "masks": [[data.rle_encode(b)]]}]
    got = rescore(tmp_path, folder, "gcg", preds)
    assert got["AP50"] == pytest.approx(1.0) and got["mIoU"] == 1.0 and got["recall"] is None and got["images"] == 2
    assert got["CIDEr"] > 1.0
    assert got["phrase_match"] == pytest.approx(3 / 3)  # "A man", "a dog", "A bench": same words, IoU 1
    # the official clean-up: tags and [SEG] dropped, spaces collapsed (the one before '.' stays)
    assert evaluation.gcg_caption_and_phrases(preds[0]["text"]) == ("A man and a dog .", ["A man", "a dog"])
    half = [preds[0], {**preds[1], "masks": []}]
    assert rescore(tmp_path, folder, "gcg", half)["mIoU"] == 0.5


def test_gcg_without_java_scores_cider_on_our_tokenizer(root, tmp_path, monkeypatch):
    folder, facts = root
    monkeypatch.setattr(evaluation, "java_and_pycocoevalcap", lambda: False)
    preds = [{"id": "g_1", "text": "<p> A man </p> [SEG] and <p> a dog </p> [SEG].", "masks": []},
             {"id": "g_2", "text": "A bench in a park.", "masks": []}]
    got = rescore(tmp_path, folder, "gcg", preds)
    assert got["METEOR"] is None and "Java" in got["METEOR_note"] and got["tokenizer"] == "metrics.ptb_tokenize"
    assert got["CIDEr"] > 1.0 and got["AP50"] == 0.0 and got["mIoU"] == 0.0


def test_vqa_prompts_matching_and_scores(root, tmp_path):
    folder, facts = root
    mcq, yorn = facts["vqa"]
    bench = evaluation.open_benchmark(opts(mcq, "vqa"))
    assert bench.queries[0].prompt == ("<image>\nLook.\nWhat colour?\nA. red\nB. grey\nC. blue"
                                       "\nAnswer with the option's letter from the given choices directly.")
    assert bench.queries[2].prompt.startswith("<image>\nShape?\nA. square\nB. circle\nAnswer")  # nan hint and option dropped
    assert bench.queries[1].image == bench.queries[0].image  # the row that names another row's image
    got = rescore(tmp_path, mcq, "vqa", [{"id": "0", "text": "B", "masks": []}, {"id": "1000000", "text": "B.", "masks": []},
                                          {"id": "1", "text": "The answer is square", "masks": []}])
    assert got["accuracy"] == pytest.approx(200 / 3) and got["circular_accuracy"] == 50.0
    assert evaluation.can_infer("(C) blue", {"A": "red", "B": "grey", "C": "blue"}) == "C"
    assert evaluation.can_infer("A or B", {"A": "x", "B": "y"}) is False
    assert evaluation.yorn("Yes, it is.") == "Yes" and evaluation.yorn("yes and no") == "Unknown"
    got = rescore(tmp_path, yorn, "vqa", [{"id": "0", "text": "Yes", "masks": []}, {"id": "1", "text": "No.", "masks": []},
                                           {"id": "2", "text": "yes", "masks": []}, {"id": "3", "text": "Yes", "masks": []}])
    # color: both right (acc 100 + acc+ 100); count: one of two (50 + 0)
    assert got["categories"] == {"color": 200.0, "count": 50.0} and got["perception"] == 250.0 and got["cognition"] == 0.0


# ----------------------------------------------------------------------------- whole runs

def chatty_model(folder) -> str:
    """The tiny random model made to answer [SEG] or stop: its last norm keeps one channel, whose
    sign picks [SEG] or <|im_end|>, so answers hold masks (and stop) on random weights."""
    official = str(folder) + "_official"
    debug_checkpoint.debug_checkpoint(official, "internvl")
    cfg = convert.convert(official, str(folder))
    path = os.path.join(folder, "model.safetensors")
    state = load_file(path)
    state["llm.norm.weight"].zero_()
    state["llm.norm.weight"][0] = 1.0
    head = state["llm.lm_head.weight"]
    head.zero_()
    head[cfg.seg_token_id, 0], head[Tokenizer.load(str(folder)).token_to_id("<|im_end|>"), 0] = 10.0, -10.0
    save_file(state, path, metadata={"format": "pt"})
    return str(folder)


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return chatty_model(tmp_path_factory.mktemp("model") / "ours")


def run_eval(*args, procs=1, timeout=300):
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(procs)] if procs > 1 else [sys.executable]
    return subprocess.run(launcher + [os.path.join(ROOT, "eval.py"), *args], capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT, env=dict(os.environ, OMP_NUM_THREADS="1"))


def test_runs_on_one_and_two_ranks_give_the_same_table(root, model, tmp_path):
    folder, _ = root
    common = ["--model", model, "--data", str(folder), "--max-new-tokens", "4"]
    tables = {}
    for bench in ("refcoco", "mevis_u"):
        one = run_eval("--benchmark", bench, "--out", str(tmp_path / f"{bench}1"), *common)
        assert one.returncode == 0, one.stderr[-3000:]
        two = run_eval("--benchmark", bench, "--out", str(tmp_path / f"{bench}2"), *common, procs=2)
        assert two.returncode == 0, two.stderr[-3000:]
        assert one.stdout == two.stdout and f"| {bench} val |" in one.stdout
        results = json.loads((tmp_path / f"{bench}1" / "results.json").read_text())
        assert results["queries"] == len(evaluation.open_benchmark(opts(folder, bench)).queries)
        assert len(results["checkpoint_sha256"]) == 64 and results["protocol"]["official"] is False  # 4 new tokens
        preds = [json.loads(line) for line in open(tmp_path / f"{bench}1" / "predictions.jsonl")]
        assert any(p["masks"] for p in preds)  # the chatty model segments
        rescored = run_eval("--benchmark", bench, "--data", str(folder), "--score", str(tmp_path / f"{bench}2" / "predictions.jsonl"))
        assert "| protocol | key frames first x5, max 4 new tokens |" in one.stdout
        assert rescored.returncode == 0 and rescored.stdout == "".join(
            line for line in one.stdout.splitlines(keepends=True) if not line.startswith("| protocol"))
        tables[bench] = one.stdout
    assert "cIoU" in tables["refcoco"] and "J&F" in tables["mevis_u"]


def test_a_killed_run_resumes_to_the_same_table(root, model, tmp_path):
    folder, _ = root
    args = ["--benchmark", "davis17", "--model", model, "--data", str(folder), "--max-new-tokens", "4"]
    whole = run_eval(*args, "--out", str(tmp_path / "whole"))
    assert whole.returncode == 0, whole.stderr[-3000:]
    cut = tmp_path / "cut"
    proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "eval.py"), *args, "--out", str(cut)], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    shard = cut / "predictions.rank0.jsonl"
    deadline = time.time() + 120
    while proc.poll() is None and time.time() < deadline and not (shard.exists() and shard.read_text().count("\n") >= 2):
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = shard.read_text().count("\n")
    assert 2 <= done < 4, done  # killed with queries left
    with open(shard, "a") as f:
        f.write('{"id": "cat/1", "te')  # as if killed mid-line
    again = run_eval(*args, "--out", str(cut))
    assert again.returncode == 0, again.stderr[-3000:]
    assert again.stdout == whole.stdout
    assert (cut / "predictions.jsonl").read_text() == (tmp_path / "whole" / "predictions.jsonl").read_text()
    other = run_eval(*args[:-2], "--max-new-tokens", "5", "--out", str(cut))
    assert other.returncode == 2 and "other settings (max_new_tokens)" in other.stderr


def test_bad_invocations_are_one_line_errors(root, tmp_path):
    folder, _ = root
    for args, why in ((["--benchmark", "refcoco", "--data", str(tmp_path / "nope"), "--score", "x"], "is not a folder"),
                      (["--benchmark", "refcoco", "--data", str(folder), "--split", "testC", "--score", "x"], "has splits"),
                      (["--benchmark", "refcoco", "--data", str(folder)], "give --out to evaluate"),
                      (["--benchmark", "vqa", "--data", str(folder), "--score", "x"], "must be a VLMEvalKit TSV")):
        got = run_eval(*args)
        assert got.returncode == 2 and why in got.stderr and got.stderr.count("\n") == 1, got.stderr


def test_every_benchmark_runs_end_to_end(root, model, tmp_path):
    folder, facts = root
    mcq, yorn = facts["vqa"]
    for bench, where, split in (("refcoco", folder, "testB"), ("revos", folder, None), ("ref_sav", folder, None),
                                ("mevis", folder, None), ("refytvos", folder, None), ("gcg", folder, "val"),
                                ("vqa", mcq, None), ("vqa", yorn, None)):
        out = tmp_path / f"{bench}_{os.path.basename(str(where))}"
        summary = evaluation.evaluate(opts(where, bench, model=model, out=str(out), split=split, max_new_tokens=3))
        saved = json.loads((out / "results.json").read_text())
        assert saved["metrics"] == json.loads(json.dumps(summary["metrics"])) and saved["queries"] > 0
        lines = (out / "predictions.jsonl").read_text().splitlines()
        assert len(lines) == saved["queries"] and all(json.loads(line)["id"] for line in lines)
        if bench in ("mevis", "refytvos"):
            assert saved["metrics"]["submission"] == str(out / "submission.zip") and os.path.isfile(out / "submission.zip")
