"""Chat with Sa2VA and segment what it talks about, in images and videos.

    python sa2va.py --model DIR --image cat.jpg --prompt "<image>Please segment the cat." --out out/
    python sa2va.py --model DIR --video clip.mp4 --prompt "<image>Please segment the running dog."
    python sa2va.py --self-check            # tiny random model, end to end (no checkpoint needed)

Python:
    model = Sa2VA.from_pretrained("checkpoints/Sa2VA-1B")
    out = model.predict(image="cat.jpg", text="<image>Please segment the cat.")
    out.text, out.masks[0].shape   # answer, (1, H, W) bool per [SEG]

Reproduces the official `predict_forward` (inference.md) of both the InternVL and the Qwen-VL
families: prompts, tiling / Qwen image processing, greedy generation, `[SEG]` hidden states ->
text_hidden_fcs -> SAM-2, video propagation.
Additions: teacher-forced answers (`answer=`), evenly spaced key frames for video, all objects
of a video tracked in one batched SAM-2 pass, conversation state kept for follow-up turns.
"""
import argparse
import dataclasses
import json
import os
import re
import shutil
import sys
import tempfile
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

import data
from model.checkpoint import load_model, parse_dtype
from model.generate import GenerationConfig, generate
from model.sa2va import Sa2VAModel
from model.tokenizer import Tokenizer

NUM_VIDEO_KEY_FRAMES = 5  # frames of a video the MLLM sees (official: the first five)


@dataclass
class Conversation:
    """What a follow-up turn needs: the formatted text so far, its visual rows and the media."""
    text: str = ""
    visual: torch.Tensor | None = None  # (N_ctx, D) rows for every visual token in `text`
    deepstack: list[torch.Tensor] = field(default_factory=list)  # Qwen3-VL: per-layer extra rows
    grid_thw: torch.Tensor | None = None  # Qwen-VL: (n_images, 3) patch grids, for mRoPE positions
    image: object = None  # PIL image of this conversation, or None
    video: data.Video | None = None
    key_frames: list[int] = field(default_factory=list)


@dataclass
class Prediction:
    text: str  # the answer, special tokens kept ([SEG], <p>...), the final stop word removed
    masks: list[np.ndarray]  # one bool array (frames, H, W) per [SEG], in order
    phrases: list[str]  # GCG: the <p>phrase</p> before each [SEG] ('' when there is none)
    history: Conversation


def default_device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def gcg_phrases(text: str, n_masks: int) -> list[str]:
    """The phrase of each [SEG]: the text of a `<p>...</p>` right before it, else ''."""
    phrases = [m.group(1).strip() if m.group(1) is not None else ""
               for m in re.finditer(r"(?:<p>((?:(?!</?p>).)*)</p>\s*)?\[SEG\]", text, flags=re.S)]
    return phrases[:n_masks]


class Sa2VA:
    """Inference API around a Sa2VAModel and its tokenizer (kept apart from the nn.Module)."""

    def __init__(self, model: Sa2VAModel, tokenizer: Tokenizer):
        self.model = model
        self.tok = tokenizer
        self.cfg = model.cfg
        if len(tokenizer) != self.cfg.llm.vocab_size:
            raise ValueError(f"tokenizer has {len(tokenizer)} tokens but the embedding has {self.cfg.llm.vocab_size} rows; "
                             "the checkpoint folder is inconsistent, re-run convert.py")
        self.template = data.get_template(self.cfg.template)
        self.seg_id = tokenizer.token_to_id(data.SEG)
        self.qwen = self.cfg.family != "internvl"
        self.visual_id = tokenizer.token_to_id(data.QWEN_IMAGE_PAD if self.qwen else data.IMG_CONTEXT)
        self.eos_ids = {tokenizer.eos_id} | {i for w in self.template.stop_words
                                             if (i := tokenizer.token_id_or_none(w)) is not None}

    @classmethod
    def from_pretrained(cls, path: str, device=None, dtype=None) -> "Sa2VA":
        """Load a folder written by convert.py. Defaults: CUDA, else MPS, else CPU; bf16 on GPU, fp32 on CPU."""
        device = torch.device(device) if device is not None else default_device()
        dtype = parse_dtype(dtype) or (torch.float32 if device.type == "cpu" else torch.bfloat16)
        tokenizer = Tokenizer.load(path)  # small and quick: fail before the weights are read
        return cls(load_model(path, device=device, dtype=dtype), tokenizer)

    @property
    def device(self) -> torch.device:
        return self.model.llm.embed_tokens.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.llm.embed_tokens.weight.dtype

    # ------------------------------------------------------------------ the MLLM side

    def _tiles(self, images) -> torch.Tensor:
        return data.to_tensor(images, self.cfg.vision.image_size).to(self.device, self.dtype)

    def _internvl_image(self, image, mask_prompts) -> tuple[str, torch.Tensor]:
        """(image token string, visual rows) for one image, with <vp> regions if given."""
        tiles = data.dynamic_tiles(image, self.cfg.vision.image_size)
        feats = self.model.encode_tiles(self._tiles(tiles))  # (n_tiles, tpt, D)
        token_str = data.image_token_string([feats.shape[0] * feats.shape[1]])
        rows = [feats.flatten(0, 1)]
        if mask_prompts is not None:
            regions = self._region_masks(mask_prompts, image.size)  # (n, side, side) bool
            token_str += data.vp_string(regions.flatten(1).sum(1).tolist())
            last = feats[-1]  # the thumbnail, or the only tile
            rows += [last[r.flatten()] for r in regions.to(self.device)]
        return token_str, torch.cat(rows)

    def _region_masks(self, mask_prompts, size) -> torch.Tensor:
        if isinstance(mask_prompts, (list, tuple)):
            if len(mask_prompts) != 1:
                raise ValueError(f"mask_prompts has {len(mask_prompts)} entries; give one (n_regions, H, W) array for the one image")
            mask_prompts = mask_prompts[0]
        m = np.asarray(mask_prompts)
        W, H = size
        if m.ndim == 2:
            m = m[None]
        if m.ndim != 3 or m.shape[0] == 0:
            raise ValueError(f"mask_prompts must be (n_regions, H, W), got shape {m.shape}")
        if m.shape[1:] != (H, W):
            raise ValueError(f"mask_prompts are {m.shape[1]}x{m.shape[2]} but the image is {H}x{W}; give masks of the image's size")
        side = self.cfg.vision.grid // 2
        # Nearest resize to the token grid, as the reference (F.interpolate 'nearest').
        small = F.interpolate(torch.from_numpy(m.astype(np.float32))[None], size=(side, side), mode="nearest")[0]
        return small > 0

    def _qwen_images(self, images) -> tuple[str, torch.Tensor, list[torch.Tensor], torch.Tensor]:
        """Qwen-VL: each image a <|vision_start|><|image_pad|>*n<|vision_end|> block (frames too)."""
        from qwen_processing import qwen_image_inputs
        pixels, grid = qwen_image_inputs([data.load_image(im) for im in images], data.qwen_image_spec(self.cfg))
        visual, deepstack = self.model.encode_qwen(pixels.to(self.device, self.dtype), grid.to(self.device))
        merge = self.cfg.vision.spatial_merge_size ** 2
        token_str = "".join(data.qwen_image_string(int(n) // merge) for n in grid.prod(-1))
        return token_str, visual, deepstack, grid

    def _start_turn(self, image, video, mask_prompts, key_frames) -> tuple[Conversation, str]:
        """A new conversation for this image or video and its visual token string."""
        if image is not None:
            image = data.load_image(image)
            if self.qwen:
                token_str, visual, deepstack, grid = self._qwen_images([image])
                return Conversation(visual=visual, deepstack=deepstack, grid_thw=grid, image=image), token_str
            token_str, visual = self._internvl_image(image, mask_prompts)
            return Conversation(visual=visual, image=image), token_str
        video = video if isinstance(video, data.Video) else data.Video(video)
        keys = data.key_frame_indices(len(video), NUM_VIDEO_KEY_FRAMES, key_frames)
        frames = [video.frame(t, keep=True) for t in keys]
        if self.qwen:
            token_str, visual, deepstack, grid = self._qwen_images(frames)
            return Conversation(visual=visual, deepstack=deepstack, grid_thw=grid, video=video, key_frames=keys), token_str
        feats = self.model.encode_tiles(self._tiles(frames))  # (K, tpt, D)
        token_str = data.image_token_string([feats.shape[1]] * len(frames))
        return Conversation(visual=feats.flatten(0, 1), video=video, key_frames=keys), token_str

    # ------------------------------------------------------------------ predict

    def _turn(self, text, image, video, mask_prompts, key_frames, history) -> tuple[Conversation, str]:
        """The conversation this turn belongs to and the full prompt text up to the answer."""
        if image is not None and video is not None:
            raise ValueError("give an image or a video, not both")
        if mask_prompts is not None and (image is None or self.qwen):
            raise ValueError("mask_prompts (<vp> regions) need an image and an InternVL-family model")
        if history is not None and history.text and (image is not None or video is not None):
            raise ValueError("a follow-up turn reuses the conversation's image or video; start a new conversation for new media")
        if "<image>" in text and image is None and video is None:
            raise ValueError("the prompt has '<image>' but no image or video was given")
        if image is not None or video is not None:
            conv, token_str = self._start_turn(image, video, mask_prompts, key_frames)
            return conv, self._format(text, token_str, first_turn=True)
        conv = history if history is not None else Conversation()
        return conv, conv.text + self._format(text, "", first_turn=not conv.text)

    def _format(self, text: str, token_str: str, first_turn: bool) -> str:
        if self.qwen:
            return data.format_qwen_turn(text, token_str, self.cfg.system_prompt if first_turn else None)
        return data.format_turn(self.cfg.template, text, token_str)

    def _run_llm(self, prompts: list[str], convs: list[Conversation], answers: list[str] | None,
                 gen: GenerationConfig) -> list[tuple[list[int], torch.Tensor, torch.Tensor]]:
        """One left-padded LLM batch. Per row: (answer tokens, the tokens that were fed back, their
        hidden states); generation never feeds back its last token, teacher forcing feeds all."""
        rows = [self.tok.encode(p, add_bos=not self.qwen) for p in prompts]
        context = self.cfg.llm.context_length
        for r in rows:
            if context is not None and len(r) >= context:
                raise ValueError(f"the prompt has {len(r)} tokens but the model's context is {context}; "
                                 "use a shorter text, a smaller image or fewer frames")
        n_prompt = [len(r) for r in rows]
        if answers is not None:
            extra = [self.tok.encode(a, add_bos=False) for a in answers]
            if not all(extra):
                raise ValueError("an answer is empty; give the text to segment, e.g. 'Sure, [SEG].'")
            rows = [r + e for r, e in zip(rows, extra)]
        B, L = len(rows), max(len(r) for r in rows)
        if context is not None and answers is None:
            gen = dataclasses.replace(gen, max_new_tokens=min(gen.max_new_tokens, context - L))
        ids = torch.zeros(B, L, dtype=torch.long, device=self.device)
        key_mask = torch.zeros(B, L, dtype=torch.bool, device=self.device)
        for b, r in enumerate(rows):  # left padding: every row ends at the last column
            ids[b, L - len(r):] = torch.tensor(r, device=self.device)
            key_mask[b, L - len(r):] = True
        visual = [c.visual for c in convs if c.visual is not None]
        embeds = self.model.embed(ids, torch.cat(visual) if visual else None, self.visual_id)
        visual_mask = (ids == self.visual_id) & key_mask
        depth = max(len(c.deepstack) for c in convs)
        deepstack = [torch.cat([c.deepstack[k] for c in convs if c.deepstack]) for k in range(depth)] or None
        if self.qwen:
            from qwen_processing import qwen_rope_index
            grids = [c.grid_thw for c in convs if c.grid_thw is not None]
            pos, _ = qwen_rope_index(ids.cpu(), torch.cat(grids) if grids else None, self.visual_id,
                                     self.tok.token_to_id(data.QWEN_VISION_START), self.cfg.vision.spatial_merge_size,
                                     attention_mask=key_mask.cpu(), image_temporal_stride=int(self.cfg.family == "qwen3_vl"))
            pos = pos.to(self.device)
        else:
            pos = (key_mask.long().cumsum(-1) - 1).clamp(min=0)
        mask = None if bool(key_mask.all()) else key_mask
        prenorm = self.cfg.seg_hidden_prenorm
        out = []
        if answers is None:
            for g in generate(self.model.llm, embeds, pos, mask, gen, self.eos_ids, decode=self.tok.decode,
                              prenorm_hidden=prenorm, deepstack=deepstack, visual_mask=visual_mask):
                out.append((g.tokens, g.tokens[:-1], g.hidden))
        else:
            h_post, h_pre = self.model.llm(embeds, pos, mask, deepstack=deepstack, visual_mask=visual_mask)
            h = h_pre if prenorm else h_post
            for b, r in enumerate(rows):
                tokens = r[n_prompt[b]:]
                out.append((tokens, tokens, h[b, L - len(tokens):]))
        return out

    def _finish(self, prompt: str, conv: Conversation, tokens, fed, hidden) -> tuple[Prediction, torch.Tensor]:
        """The answer text, the next turn's history and the SAM-2 prompts of its [SEG] tokens."""
        answer_text = self._strip_stop(self.tok.decode(tokens))
        history = Conversation(prompt + answer_text + self.template.stop_words[0] + "\n", conv.visual, conv.deepstack,
                               conv.grid_thw, conv.image, conv.video, conv.key_frames)
        seg_rows = [i for i, t in enumerate(fed) if t == self.seg_id]
        if conv.image is None and conv.video is None:
            seg_rows = []  # text-only conversation: nothing to segment
        prompts = self.model.text_hidden_fcs(hidden[seg_rows]).to(self.dtype)  # (N, 256)
        return Prediction(answer_text, [], gcg_phrases(answer_text, len(seg_rows)), history), prompts

    def _generation(self, max_new_tokens, temperature, top_p, seed) -> GenerationConfig:
        return GenerationConfig(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                                stop_words=self.template.stop_words, seed=seed)

    @torch.inference_mode()
    def predict(self, image=None, video=None, text: str = "", mask_prompts=None, answer: str | None = None,
                history: Conversation | None = None, max_new_tokens: int = 2048, temperature: float = 0.0,
                top_p: float = 1.0, seed: int | None = None, key_frames: str = "first",
                progress: bool = False) -> Prediction:
        """Answer `text` about an image or a video and segment every `[SEG]` of the answer.

        text holds '<image>' where the visual tokens go. answer= skips generation and runs the
        given answer teacher-forced. history= continues a conversation (same image/video).
        key_frames: 'first' (official: the first 5 frames) or 'uniform' (5 evenly spaced).
        """
        conv, prompt = self._turn(text, image, video, mask_prompts, key_frames, history)
        (tokens, fed, hidden), = self._run_llm([prompt], [conv], None if answer is None else [answer],
                                               self._generation(max_new_tokens, temperature, top_p, seed))
        pred, prompts = self._finish(prompt, conv, tokens, fed, hidden)
        if len(prompts):
            pred.masks = self._segment(conv, prompts, progress)
        return pred

    @torch.inference_mode()
    def predict_batch(self, images: list, texts: list[str], answers: list[str] | None = None,
                      max_new_tokens: int = 2048) -> list[Prediction]:
        """Several image requests in one padded LLM batch (greedy); SAM-2 features once per distinct image.

        Requests that share an image (the same object, e.g. several referring expressions) share
        its vision encoding too. Equal to calling predict() on each request.
        """
        if len(images) != len(texts) or (answers is not None and len(answers) != len(texts)):
            raise ValueError(f"predict_batch got {len(images)} images, {len(texts)} texts"
                             f"{'' if answers is None else f', {len(answers)} answers'}; give one of each per request")
        started: dict[int, tuple[Conversation, str]] = {}
        turns = []
        for image, text in zip(images, texts):
            if image is None:
                raise ValueError("predict_batch needs an image for every request; use predict() for text-only turns")
            if id(image) not in started:
                started[id(image)] = self._start_turn(image, None, None, "first")
            conv, token_str = started[id(image)]
            turns.append((conv, self._format(text, token_str, first_turn=True)))
        outs = self._run_llm([p for _, p in turns], [c for c, _ in turns], answers, self._generation(max_new_tokens, 0.0, 1.0, None))
        preds, by_image = [], {}
        for (conv, prompt), (tokens, fed, hidden) in zip(turns, outs):
            pred, prompts = self._finish(prompt, conv, tokens, fed, hidden)
            preds.append(pred)
            by_image.setdefault(id(conv), (conv, []))[1].append((pred, prompts))
        for conv, items in by_image.values():  # one SAM-2 pass per image for all its objects
            prompts = torch.cat([p for _, p in items])
            if len(prompts):
                masks = self._segment(conv, prompts, progress=False)
                for pred, p in items:
                    pred.masks, masks = masks[:len(p)], masks[len(p):]
        return preds

    def _strip_stop(self, text: str) -> str:
        for w in self.template.stop_words:
            if text.endswith(w):
                return text[: -len(w)]
        return text

    # ------------------------------------------------------------------ the SAM-2 side

    def _segment(self, conv: Conversation, prompts: torch.Tensor, progress: bool) -> list[np.ndarray]:
        bridge = self.model.grounding
        if conv.image is not None:
            W, H = conv.image.size
            feats = bridge.image_features(bridge.preprocess([conv.image]))
            logits = bridge.decode_with_prompt(feats, prompts).logits  # (N, 1, h, w)
            return [m[None] for m in bridge.postprocess(logits, (H, W)).cpu().numpy()]
        video = conv.video
        W, H = video.size
        T = len(video)
        frame = lambda t: bridge.preprocess([video.frame(t)])[0]  # noqa: E731
        memory = bridge.condition(frame, prompts, cond_frames=conv.key_frames, num_frames=T)
        masks = np.zeros((prompts.shape[0], T, H, W), dtype=bool)
        steps = bridge.propagate(frame, memory)
        if progress:
            from tqdm import tqdm
            steps = tqdm(steps, total=T, desc="SAM-2 propagation", unit="frame")
        for t, logits in steps:
            masks[:, t] = bridge.postprocess(logits, (H, W)).cpu().numpy()
        return list(masks)


# ----------------------------------------------------------------------------- outputs

def rle_encode(mask: np.ndarray) -> dict:
    """COCO uncompressed RLE of a (H, W) bool mask: column-major runs, starting with zeros."""
    flat = np.asarray(mask, dtype=np.uint8).flatten(order="F")
    change = np.flatnonzero(np.diff(flat)) + 1
    bounds = np.concatenate([[0], change, [flat.size]])
    counts = np.diff(bounds).tolist()
    if flat.size and flat[0] == 1:
        counts = [0] + counts
    return {"size": list(mask.shape), "counts": counts}


COLORS = np.array([[230, 25, 75], [60, 180, 75], [255, 225, 25], [0, 130, 200], [245, 130, 48], [145, 30, 180]], np.uint8)


def overlay(frame: np.ndarray, masks: list[np.ndarray]) -> np.ndarray:
    out = frame.astype(np.float32)
    for k, m in enumerate(masks):
        out[m] = 0.5 * out[m] + 0.5 * COLORS[k % len(COLORS)]
    return out.astype(np.uint8)


def check_out_dir(out_dir: str):
    """An output folder must be new or empty: we never delete what is already there."""
    if os.path.exists(out_dir) and (not os.path.isdir(out_dir) or os.listdir(out_dir)):
        raise ValueError(f"--out {out_dir} already exists and is not an empty folder; choose a new folder")


def write_outputs(out_dir: str, pred: Prediction, image=None, video: data.Video | None = None):
    """Masks as PNGs, an overlay and result.json, written to a temporary folder then moved into place."""
    from PIL import Image
    parent = os.path.dirname(os.path.abspath(out_dir))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".sa2va-", dir=parent)
    try:
        result = {"text": pred.text, "objects": []}
        for k, m in enumerate(pred.masks):
            obj = {"phrase": pred.phrases[k] if k < len(pred.phrases) else "", "masks": [rle_encode(f) for f in m]}
            result["objects"].append(obj)
            for t, f in enumerate(m):
                name = f"mask_{k}.png" if image is not None else f"mask_{k}_{t:05d}.png"
                Image.fromarray(f.astype(np.uint8) * 255).save(os.path.join(tmp, name))
        if image is not None:
            Image.fromarray(overlay(np.asarray(image), [m[0] for m in pred.masks])).save(os.path.join(tmp, "overlay.png"))
        elif video is not None:
            _write_overlay_video(os.path.join(tmp, "overlay.mp4"), video, pred.masks)
        with open(os.path.join(tmp, "result.json"), "w") as f:
            json.dump(result, f)
        check_out_dir(out_dir)
        if os.path.isdir(out_dir):
            os.rmdir(out_dir)  # empty, checked above
        os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _write_overlay_video(path: str, video: data.Video, masks: list[np.ndarray]):
    import av
    W, H = video.size
    with av.open(path, "w") as c:
        s = c.add_stream("libx264", rate=10)
        s.width, s.height, s.pix_fmt = W - W % 2, H - H % 2, "yuv420p"  # yuv420p needs even sides
        for t in range(len(video)):
            frame = overlay(np.asarray(video.frame(t)), [m[t] for m in masks])[: s.height, : s.width]
            for packet in s.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(frame), format="rgb24")):
                c.mux(packet)
        for packet in s.encode():
            c.mux(packet)


# ----------------------------------------------------------------------------- CLI

def self_check(out_dir: str | None = None, family: str = "internvl"):
    """The main job until trained weights are at hand: a tiny random-weight checkpoint in the
    official layout goes through convert.py, loading and predict() on an image and a video."""
    import time

    import convert
    from debug_checkpoint import debug_checkpoint
    from model.sam2_bridge import SAM2Config
    print(f"self-check: a tiny RANDOM-weight Sa2VA ({family} family); its answers and masks are noise, the plumbing is real")
    with tempfile.TemporaryDirectory() as tmp:
        official, ours = os.path.join(tmp, "official"), os.path.join(tmp, "ours")
        debug_checkpoint(official, family, shards=2)
        convert.convert(official, ours, sam2=SAM2Config.debug())
        model = Sa2VA.from_pretrained(ours)
        yy, xx = np.mgrid[:240, :320]
        frames = [np.stack([(xx + 8 * t) % 256, yy % 256, np.full_like(xx, 128)], -1).astype(np.uint8) for t in range(8)]
        t0 = time.perf_counter()
        chat = model.predict(image=frames[0], text="<image>\nWhat is in the image?", max_new_tokens=16)
        print(f"  chat ({time.perf_counter() - t0:.2f}s): {chat.text!r}")
        t0 = time.perf_counter()
        img = model.predict(image=frames[0], text="<image>\nPlease segment the stripes.", answer="Sure, [SEG].")
        assert len(img.masks) == 1 and img.masks[0].shape == (1, 240, 320), [m.shape for m in img.masks]
        print(f"  image ({time.perf_counter() - t0:.2f}s): {len(img.masks)} mask of shape {img.masks[0].shape}")
        t0 = time.perf_counter()
        vid = model.predict(video=frames, text="<image>\nPlease segment both stripes.", answer="<p>one</p> [SEG] and <p>two</p> [SEG].")
        assert len(vid.masks) == 2 and all(m.shape == (8, 240, 320) for m in vid.masks), [m.shape for m in vid.masks]
        print(f"  video ({time.perf_counter() - t0:.2f}s): {len(vid.masks)} objects {vid.phrases}, masks {vid.masks[0].shape}")
        if out_dir:
            write_outputs(out_dir, vid, video=vid.history.video)
            print(f"  wrote {out_dir}")
    print("self-check passed")


def main(argv=None):
    ap = argparse.ArgumentParser(description="Chat with Sa2VA and segment images and videos.")
    ap.add_argument("--model", help="folder written by convert.py")
    src = ap.add_mutually_exclusive_group()
    src.add_argument("--image", help="image file")
    src.add_argument("--video", help="video file or folder of frames")
    ap.add_argument("--prompt", help="question; '<image>' is prepended when missing")
    ap.add_argument("--answer", help="skip generation and segment this answer (teacher-forced)")
    ap.add_argument("--out", help="folder for masks, overlay and result.json")
    ap.add_argument("--device", help="cuda, mps or cpu (default: best available)")
    ap.add_argument("--dtype", help="bf16, fp16 or fp32 (default: bf16 on GPU, fp32 on CPU)")
    ap.add_argument("--max-new-tokens", type=int, default=2048)
    ap.add_argument("--key-frames", default="first", choices=["first", "uniform"])
    ap.add_argument("--self-check", action="store_true", help="run end to end on a tiny random checkpoint built on the fly")
    args = ap.parse_args(argv)
    if args.self_check:
        return self_check(args.out)
    if not args.model or not args.prompt:
        ap.error("--model and --prompt are required (or --self-check to run on a tiny random model)")
    try:
        if args.out:
            check_out_dir(args.out)  # before the model runs, not after
        model = Sa2VA.from_pretrained(args.model, device=args.device, dtype=args.dtype)
        prompt = args.prompt
        if (args.image or args.video) and "<image>" not in prompt:
            prompt = "<image>\n" + prompt
        pred = model.predict(image=args.image, video=args.video, text=prompt, answer=args.answer,
                             max_new_tokens=args.max_new_tokens, key_frames=args.key_frames, progress=True)
        print(pred.text)
        for k, m in enumerate(pred.masks):
            print(f"object {k}: {pred.phrases[k]!r} {m.shape[0]} frame(s), {int(m.sum())} mask pixels")
        if args.out:
            write_outputs(args.out, pred, image=pred.history.image, video=pred.history.video)
            print(f"wrote {args.out}")
    except ValueError as e:
        sys.exit(f"sa2va.py: {e}")


if __name__ == "__main__":
    main()
