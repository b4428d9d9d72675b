"""A small web page for Sa2VA: chat about an image or a video and see what it segments.

    pip install gradio                       # an optional extra, not a runtime requirement
    python demo.py                           # the shipped model, http://127.0.0.1:7860
    python demo.py --model DIR --port 8000   # any converted (or official) checkpoint

Image tab: a question, the official grounded-caption question (GCG), or `<vp>` regions from
clicks on the image (each click a region, through SAM-2) and boxes; an answer can also be
given to segment it as is (teacher-forced). Video tab: a question or GCG over the key frames.
Each run shows the overlay and the answer, and offers the masks as a zip (mask PNGs, DAVIS
palette PNGs, result.json with RLE), as `sa2va.py --out` writes them.
"""
import os
import sys
import tempfile
import zipfile
from dataclasses import dataclass

import numpy as np

import data
import sa2va
from cli import arg, parse, run
from model.config import NUM_KEY_FRAMES

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # no calls home
try:
    import gradio as gr
except ImportError:
    sys.exit("demo.py needs gradio, an optional extra: pip install gradio")

MODES = ("Question", "Grounded caption (GCG)", "Visual prompt (click the image)")


@dataclass
class DemoOptions:
    model: str | None = arg(None, "folder written by convert.py, or an official Sa2VA folder (default: the shipped model)")
    host: str = arg("127.0.0.1", "address to serve on (0.0.0.0: every interface)")
    port: int = arg(7860, "port to serve on")
    device: str | None = arg(None, "cuda, mps or cpu (default: best available)")
    dtype: str | None = arg(None, "bf16, fp16 or fp32 (default as sa2va.py)")
    max_new_tokens: int = arg(512, "longest answer in tokens")


def _question(text: str, mode: str) -> str:
    text = data.GCG_QUESTION if mode == MODES[1] else (text or "").strip()
    if not text:
        raise gr.Error("Write a question (or pick the grounded-caption mode).")
    return text if "<image>" in text else "<image>\n" + text


def _boxes(text: str) -> list[tuple[float, ...]] | None:
    boxes = []
    for part in (text or "").replace(";", "\n").splitlines():
        if part.strip():
            try:
                boxes.append(sa2va.parse_numbers(part.strip(), 4, "box", "X0,Y0,X1,Y1"))
            except ValueError as e:
                raise gr.Error(str(e))
    return boxes or None


def _write(pred: sa2va.Prediction, image=None, video=None) -> tuple[str, str]:
    """The outputs as sa2va.py --out writes them: (their folder, a zip of it for download)."""
    tmp = tempfile.mkdtemp(prefix="sa2va-demo-")
    folder = os.path.join(tmp, "masks")
    sa2va.write_outputs(folder, pred, image=image, video=video)
    path = os.path.join(tmp, "masks.zip")
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as z:
        for root, _, files in os.walk(folder):
            for name in sorted(files):
                z.write(os.path.join(root, name), os.path.relpath(os.path.join(root, name), folder))
    return folder, path


def build(model: sa2va.Sa2VA, max_new_tokens: int = 512) -> "gr.Blocks":
    def segment_image(image, question, mode, answer, points, boxes):
        if image is None:
            raise gr.Error("Upload an image first.")
        visual = mode == MODES[2]
        points, boxes = (points or None, _boxes(boxes)) if visual else (None, None)
        if visual and not points and not boxes:
            raise gr.Error("Click the image (or give a box) to mark region1, region2, ...")
        try:
            pred = model.predict(image=image, text=_question(question, mode), answer=answer or None,
                                 max_new_tokens=max_new_tokens, points=points, boxes=boxes)
        except ValueError as e:
            raise gr.Error(str(e))
        shown = sa2va.overlay(np.asarray(pred.history.image), [m[0] for m in pred.masks])
        return shown, pred.text, _write(pred, image=pred.history.image)[1]

    def segment_video(video, question, mode, key_frames):
        if not video:
            raise gr.Error("Upload a video first.")
        try:
            pred = model.predict(video=video, text=_question(question, mode), max_new_tokens=max_new_tokens,
                                 num_key_frames=int(key_frames))
            folder, archive = _write(pred, video=pred.history.video)
        except ValueError as e:
            raise gr.Error(str(e))
        return os.path.join(folder, "overlay.mp4"), pred.text, archive

    def click(points, evt: gr.SelectData):
        points = (points or []) + [tuple(float(v) for v in evt.index)]
        return points, ", ".join(f"region{i + 1} ({x:.0f}, {y:.0f})" for i, (x, y) in enumerate(points))

    with gr.Blocks(title="Sa2VA") as page:
        gr.Markdown("# Sa2VA\nAsk about an image or a video; every `[SEG]` of the answer is segmented.")
        with gr.Tab("Image"):
            points = gr.State([])
            with gr.Row():
                with gr.Column():
                    image = gr.Image(type="pil", label="Image", elem_id="image-input")
                    mode = gr.Radio(list(MODES), value=MODES[0], label="Mode", elem_id="image-mode")
                    question = gr.Textbox(label="Question", value="Please segment the red circle.", elem_id="image-question")
                    clicked = gr.Textbox(label="Clicked regions", interactive=False)
                    boxes = gr.Textbox(label="Boxes as regions (X0,Y0,X1,Y1, one per line)")
                    answer = gr.Textbox(label="Answer to segment as given (optional; teacher-forced)",
                                        elem_id="image-answer")
                    with gr.Row():
                        go = gr.Button("Run", variant="primary", elem_id="image-run")
                        clear = gr.Button("Clear clicks")
                with gr.Column():
                    shown = gr.Image(label="Overlay", elem_id="image-overlay", interactive=False, format="png")
                    said = gr.Textbox(label="Answer", elem_id="image-text")
                    masks = gr.File(label="Masks (zip)")
            image.select(click, [points], [points, clicked])
            clear.click(lambda: ([], ""), None, [points, clicked])
            go.click(segment_image, [image, question, mode, answer, points, boxes], [shown, said, masks])
        with gr.Tab("Video"):
            with gr.Row():
                with gr.Column():
                    video = gr.Video(label="Video", elem_id="video-input")
                    vmode = gr.Radio(list(MODES[:2]), value=MODES[0], label="Mode")
                    vquestion = gr.Textbox(label="Question", value="Please segment the moving circle.")
                    key_frames = gr.Slider(1, 16, value=NUM_KEY_FRAMES, step=1, label="Key frames")
                    vgo = gr.Button("Run", variant="primary")
                with gr.Column():
                    vshown = gr.Video(label="Overlay")
                    vsaid = gr.Textbox(label="Answer")
                    vmasks = gr.File(label="Masks (zip)")
            vgo.click(segment_video, [video, vquestion, vmode, key_frames], [vshown, vsaid, vmasks])
    return page


def main(argv=None):
    opts = parse(DemoOptions, argv, "A web page to chat with Sa2VA and see its masks.", prog="demo.py")

    def body():
        if not 0 < opts.port < 65536:
            raise ValueError(f"--port {opts.port} is not a port number (1-65535)")
        model = sa2va.Sa2VA.from_pretrained(opts.model, device=opts.device, dtype=opts.dtype)
        build(model, opts.max_new_tokens).launch(server_name=opts.host, server_port=opts.port, show_error=True)
    run("demo.py", body)


if __name__ == "__main__":
    main()
