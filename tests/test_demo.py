"""demo.py in a real browser: headless Chromium, driven over its DevTools pipe, uploads the example
image, sends a question with an answer to segment, and the overlay on the page is checked in a
screenshot against the overlay the API draws. Skipped where gradio or Chromium is missing."""
import base64
import importlib.util
import io
import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request

import numpy as np
import pytest
from PIL import Image

import convert
import sa2va
from debug_checkpoint import debug_checkpoint

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CHROMIUM = next((shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome") if shutil.which(n)), None)
pytestmark = [
    pytest.mark.skipif(importlib.util.find_spec("gradio") is None, reason="gradio (an optional extra) is not installed"),
    pytest.mark.skipif(CHROMIUM is None, reason="no Chromium here (the Debian package chromium)"),
]
QUESTION, ANSWER = "Please segment the red circle.", "Sure, [SEG]."


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Browser:
    """Chromium with --remote-debugging-pipe: DevTools messages are NUL-terminated JSON on fd 3
    (to the browser) and fd 4 (from it). One page, attached with a flat session."""

    def __init__(self):
        to_r, self._to = os.pipe()
        self._from, from_w = os.pipe()

        def fds():  # runs in the child before it closes every other descriptor (pass_fds keeps 3 and 4)
            os.dup2(to_r, 3)
            os.dup2(from_w, 4)
        self.proc = subprocess.Popen([CHROMIUM, "--headless=new", "--no-sandbox", "--disable-gpu", "--no-first-run",
                                      "--remote-debugging-pipe", "--window-size=1400,1800", "about:blank"],
                                     preexec_fn=fds, pass_fds=(3, 4), stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL)
        os.close(to_r)
        os.close(from_w)
        self._buf, self._id = b"", 0
        target = self.send("Target.createTarget", {"url": "about:blank"})["targetId"]
        self.session = self.send("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]

    def send(self, method: str, params: dict | None = None, page: bool = False) -> dict:
        self._id += 1
        msg = {"id": self._id, "method": method, "params": params or {}}
        if page:
            msg["sessionId"] = self.session
        os.write(self._to, json.dumps(msg).encode() + b"\0")
        while True:
            while b"\0" not in self._buf:
                chunk = os.read(self._from, 1 << 20)
                if not chunk:
                    raise RuntimeError("Chromium closed its DevTools pipe")
                self._buf += chunk
            raw, self._buf = self._buf.split(b"\0", 1)
            reply = json.loads(raw)
            if reply.get("id") == self._id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply.get("result", {})

    def js(self, expression: str):
        out = self.send("Runtime.evaluate", {"expression": expression, "returnByValue": True}, page=True)
        return out["result"].get("value")

    def wait(self, expression: str, timeout: float = 120.0, what: str = ""):
        t0 = time.time()
        while time.time() - t0 < timeout:
            value = self.js(expression)
            if value:
                return value
            time.sleep(0.25)
        raise AssertionError(f"the page never showed {what or expression}")

    def close(self):
        self.proc.kill()
        self.proc.wait()


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    root = tmp_path_factory.mktemp("demo")
    debug_checkpoint(root / "official", "internvl")
    convert.convert(str(root / "official"), str(root / "ours"))
    port = free_port()
    server = subprocess.Popen([sys.executable, os.path.join(ROOT, "demo.py"), "--model", str(root / "ours"),
                               "--port", str(port), "--dtype", "fp32", "--max-new-tokens", "8"], cwd=ROOT,
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    url = f"http://127.0.0.1:{port}/"
    for _ in range(240):
        try:
            urllib.request.urlopen(url, timeout=1)
            break
        except OSError:
            if server.poll() is not None:
                raise AssertionError(f"demo.py exited: {server.stderr.read().decode()[-2000:]}")
            time.sleep(0.5)
    yield url, str(root / "ours")
    server.kill()
    server.wait()


def test_demo_page_segments_an_uploaded_image(served):
    url, checkpoint = served
    image_path = os.path.join(ROOT, "examples", "shapes.jpg")
    browser = Browser()
    try:
        browser.send("Page.enable", page=True)
        browser.send("Page.navigate", {"url": url}, page=True)
        browser.wait("document.querySelector('#image-input input[type=file]') !== null", what="the image input")
        node = browser.send("Runtime.evaluate", {"expression": "document.querySelector('#image-input input[type=file]')"},
                            page=True)["result"]["objectId"]
        browser.send("DOM.setFileInputFiles", {"files": [image_path], "objectId": node}, page=True)
        browser.wait("document.querySelector('#image-input img') !== null", what="the uploaded image")
        for elem, text in (("#image-question", QUESTION), ("#image-answer", ANSWER)):
            browser.js(f"""(() => {{ const t = document.querySelector('{elem} textarea');
                Object.getOwnPropertyDescriptor(HTMLTextAreaElement.prototype, 'value').set.call(t, {json.dumps(text)});
                t.dispatchEvent(new Event('input', {{bubbles: true}})); return true; }})()""")
        browser.js("document.querySelector('#image-run').click()")
        said = browser.wait(f"(() => {{ const t = document.querySelector('#image-text textarea');"
                            f" return t && t.value === {json.dumps(ANSWER)} ? t.value : null; }})()", what="the answer")
        assert said == ANSWER
        where = ("(() => { const i = document.querySelector('#image-overlay img');"
                 " return i && i.complete && i.naturalWidth ? JSON.stringify({...i.getBoundingClientRect().toJSON(),"
                 " nw: i.naturalWidth, nh: i.naturalHeight}) : null; })()")
        browser.wait(where, what="the overlay")
        shots = []  # until two screenshots in a row agree: the page has finished fading the image in
        for _ in range(40):
            time.sleep(0.25)
            shots.append(browser.send("Page.captureScreenshot", {"format": "png"}, page=True)["data"])
            if len(shots) > 1 and shots[-1] == shots[-2]:
                break
        shot = shots[-1]
        box = json.loads(browser.js(where))  # where the image is, in the screenshot that settled
    finally:
        browser.close()
    screen = Image.open(io.BytesIO(base64.b64decode(shot))).convert("RGB")
    # the image is drawn "contain"-fitted inside its element's box
    scale = min(box["width"] / box["nw"], box["height"] / box["nh"])
    w, h = round(box["nw"] * scale), round(box["nh"] * scale)
    x0, y0 = box["x"] + (box["width"] - w) / 2, box["y"] + (box["height"] - h) / 2
    shown = np.asarray(screen.crop((round(x0), round(y0), round(x0) + w, round(y0) + h)), np.float32)
    model = sa2va.Sa2VA.from_pretrained(checkpoint, dtype="fp32")
    pred = model.predict(image=image_path, text="<image>\n" + QUESTION, answer=ANSWER)
    plain = Image.open(image_path).convert("RGB")
    want = Image.fromarray(sa2va.overlay(np.asarray(plain), [m[0] for m in pred.masks]))
    want = np.asarray(want.resize((w, h), Image.BILINEAR), np.float32)
    raw = np.asarray(plain.resize((w, h), Image.BILINEAR), np.float32)
    assert (box["nw"], box["nh"]) == plain.size
    off_want, off_raw = np.abs(shown - want).mean(), np.abs(shown - raw).mean()
    assert off_want < 8 and off_raw > 3 * off_want, (off_want, off_raw)  # the overlay, not the bare image
