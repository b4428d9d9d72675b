"""Chat with Sa2VA and segment what it talks about, in images and videos.

    python sa2va.py --model DIR --image cat.jpg --prompt "Please segment the cat." --out out/
    python sa2va.py --model DIR --video clip.mp4 --prompt "Please segment the running dog." --prompt "And the cat?"
    python sa2va.py --model DIR --image cat.jpg --prompt "What is region1?" --point 120,80
    python sa2va.py --self-check            # tiny random model, end to end (no checkpoint needed)

Python:
    model = Sa2VA.from_pretrained("checkpoints/Sa2VA-1B")   # ours, or an official HF folder
    out = model.predict(image="cat.jpg", text="<image>Please segment the cat.")
    out.text, out.masks[0].shape   # answer, (1, H, W) bool per [SEG]

`predict` is four public steps, which evaluation and benchmarks call on their own:
    conv = model.encode_media(image=...)              # the family's processor on the image or video
    inputs, samples = model.build_inputs([conv], [text])   # the conversation as model inputs
    (tokens, prompts), = model.run_llm(inputs, samples, [conv], generation)  # vision tower + LLM
    masks = model.segment(conv, prompts)              # SAM-2: image decode or video propagation

Reproduces the official `predict_forward` of both the InternVL and the Qwen-VL families
(`modeling_sa2va_chat.py`, `modeling_sa2va_qwen.py`): prompts, tiling / Qwen image
processing, greedy generation, `[SEG]` hidden states -> text_hidden_fcs -> SAM-2, video
propagation. Additions: teacher-forced answers (`answer=`, through the model's forward),
evenly spaced key frames for video, all objects of a video tracked in one batched SAM-2 pass,
conversation state kept for follow-up turns, batched image and video requests, a static-shape
decoding step that compiles (`compile=True`), bf16 by default on CPUs with bf16 units, points
and boxes as `<vp>` regions (through SAM-2), a streamed video session that takes objects while
it runs (`open_video`), and Sa2VA-i's propagation with Meta's original SAM-2 (`load_original_sam2`).
"""
import dataclasses
import json
import os
import re
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field

import av
import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

import convert
import data
from cli import arg, check_output_folder, output_folder, parse, run
from debug_checkpoint import self_check
from model.checkpoint import load_model, parse_dtype
from model.config import NUM_KEY_FRAMES
from model.generate import GenerationConfig, decode_step, generate
from model.sa2va import ModelInputs, Sa2VAModel, VisionOutput
from model.sam2_bridge import ORIGINAL_SAM2_CONFIG, OriginalSAM2
from model.tokenizer import Tokenizer


# The model this repository ships (README: "The shipped model"): what runs when no model is named.
SHIPPED_MODEL = os.path.join(os.path.dirname(os.path.abspath(__file__)), "weights", "sa2va-shapes")


@dataclass
class Conversation:
    """What a turn needs besides its text: the media, encoded once, and the formatted text so far."""
    text: str = ""  # the formatted earlier turns
    media: data.Media | None = None  # the processor's output for the image or the video's key frames
    vision: VisionOutput | None = None  # the vision tower's output for media (run_llm computes it once)
    image: Image.Image | None = None
    video: data.Video | None = None
    key_frames: list[int] = field(default_factory=list)
    owner: object = field(default=None, repr=False)  # the Sa2VA the conversation was held with


@dataclass
class Prediction:
    text: str  # the answer, special tokens kept ([SEG], <p>...), the final stop word removed
    masks: list[np.ndarray]  # one bool array (frames, H, W) per [SEG], in order
    phrases: list[str]  # GCG: the <p>phrase</p> before each [SEG] ('' when there is none)
    history: Conversation


def _mps_available() -> bool:
    return getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()


def default_device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda")
    if _mps_available():
        return torch.device("mps")
    return torch.device("cpu")


def resolve_device(device) -> torch.device:
    """A device the model can run on: CUDA, else MPS, else CPU when None; otherwise the one named, if present."""
    if device is None:
        return default_device()
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"unknown device {device!r}; use cuda, cuda:N, mps or cpu") from None
    if device.type == "cuda" and (not torch.cuda.is_available() or (device.index or 0) >= torch.cuda.device_count()):
        found = f"{torch.cuda.device_count()} CUDA device(s)" if torch.cuda.is_available() else "no CUDA device"
        raise ValueError(f"device {str(device)!r} is not available here ({found}); use --device cpu")
    if device.type == "mps" and not _mps_available():
        raise ValueError("device 'mps' is not available here; use --device cpu")
    if device.type not in ("cuda", "mps", "cpu"):
        raise ValueError(f"device {str(device)!r} is not supported; use cuda, mps or cpu")
    return device


def cpu_bf16_units() -> str | None:
    """The bf16 matrix instructions of this CPU ('amx_bf16' or 'avx512_bf16'), or None. With them a
    bf16 matmul runs 3-4x faster than fp32 (oneDNN); without them bf16 is emulated and slower."""
    caps = torch.cpu.get_capabilities() if hasattr(torch.cpu, "get_capabilities") else {}
    return next((name for name in ("amx_bf16", "avx512_bf16") if caps.get(name)), None)


def default_dtype(device: torch.device) -> torch.dtype:
    """bf16 on GPU and on CPUs with bf16 matrix units, else fp32."""
    if device.type == "cpu":
        return torch.bfloat16 if cpu_bf16_units() else torch.float32
    return torch.bfloat16


def gcg_phrases(text: str, n_masks: int) -> list[str]:
    """The phrase of each [SEG]: the text of a `<p>...</p>` right before it, else ''."""
    phrases = [m.group(1).strip() if m.group(1) is not None else ""
               for m in re.finditer(r"(?:<p>((?:(?!</?p>).)*)</p>\s*)?\[SEG\]", text, flags=re.S)]
    return phrases[:n_masks]


def shipped_model() -> str:
    """The folder of the model used when none is named (weights/sa2va-shapes, trained by train.py
    on world.py's shapes); a clear error where this checkout has none."""
    if not os.path.isdir(SHIPPED_MODEL):
        raise ValueError(f"no model named, and this checkout has no shipped model ({SHIPPED_MODEL} is missing); "
                         "give --model (a converted or official Sa2VA folder), or run sa2va.py --self-check")
    return SHIPPED_MODEL


class Sa2VA:
    """Inference API around a Sa2VAModel, its tokenizer and its processor (kept apart from the nn.Module)."""

    def __init__(self, model: Sa2VAModel, tokenizer: Tokenizer):
        self.model = model
        self.tok = tokenizer
        self.cfg = model.cfg
        if len(tokenizer) != self.cfg.llm.vocab_size:
            raise ValueError(f"tokenizer has {len(tokenizer)} tokens but the embedding has {self.cfg.llm.vocab_size} rows; "
                             "the checkpoint folder is inconsistent, re-run convert.py")
        self.processor = data.make_processor(self.cfg, tokenizer)
        self._token = object()  # marks this model's conversations
        self.template = self.processor.template
        self.decode_step = decode_step  # compile() swaps in a compiled one
        self.original_sam2: OriginalSAM2 | None = None  # load_original_sam2(): Sa2VA-i video propagation
        self.eos_ids = {tokenizer.eos_id} | {i for w in self.template.stop_words
                                             if (i := tokenizer.token_id_or_none(w)) is not None}

    @classmethod
    def from_pretrained(cls, path: str | None = None, device=None, dtype=None, compile: bool = False) -> "Sa2VA":
        """Load a folder written by convert.py, or an official Hugging Face Sa2VA folder (converted
        while loading; `convert.py` keeps a converted copy); no path: the shipped model
        (SHIPPED_MODEL). Defaults: CUDA, else MPS, else CPU; dtype: default_dtype(device).
        The LLM's q/k/v and gate/up are packed into one matmul each (same outputs).
        compile: torch.compile the vision tower, the decoding step and SAM-2 (see compile())."""
        path = shipped_model() if path is None else path
        device = resolve_device(device)
        chosen = parse_dtype(dtype)
        if not os.path.isdir(path):
            raise ValueError(f"model {path} is not a folder; give a folder written by convert.py or an official "
                             "Sa2VA checkpoint folder")
        dtype = chosen or default_dtype(device)
        if convert.is_official(path):
            print(f"sa2va: {path} is an official checkpoint; converting it while loading "
                  f"(`python convert.py {path} DST` keeps a converted copy)", file=sys.stderr)
            model, tokenizer = convert.load_official(path, device=device, dtype=dtype)
        else:
            tokenizer = Tokenizer.load(path)  # small and quick: fail before the weights are read
            model = load_model(path, device=device, dtype=dtype)
        model.llm.fuse_projections()
        api = cls(model, tokenizer)
        return api.compile() if compile else api

    def load_original_sam2(self, path: str, config: str = ORIGINAL_SAM2_CONFIG, overrides=()) -> "Sa2VA":
        """Propagate video masks with Meta's original SAM-2 (`sam2.1_hiera_large.pt`, or a
        .safetensors of its state; `config` names its hydra config in the sam2 package), as
        Sa2VA-i does: the key frames are still decoded with this model's fine-tuned decoder and
        the [SEG] prompts, and their masks seed Meta's own video predictor. Costs a second SAM-2
        (its image encoder runs again on every frame). Returns self."""
        if self.cfg.sam2 is None:
            raise ValueError("this model has no SAM-2; there is no video propagation to replace")
        if not os.path.isfile(path):
            raise ValueError(f"original SAM-2 checkpoint {path} is not a file; give Meta's sam2.1_hiera_large.pt "
                             "(or a .safetensors of its state)")
        self.original_sam2 = OriginalSAM2(convert.read_meta_sam2(path), config, overrides, self.device, self.dtype)
        return self

    def compile(self) -> "Sa2VA":
        """torch.compile the vision tower, the LLM decoding step (one static-shape graph; CUDA
        graphs on GPU) and SAM-2's image encoder, memory attention and mask decoder. The first
        request of each new shape pays the compilation. Returns self."""
        mode = "reduce-overhead" if self.device.type == "cuda" else None
        self.decode_step = torch.compile(decode_step, mode=mode, fullgraph=True)
        self.model.vision.compile()
        if self.cfg.sam2 is not None:
            self.model.grounding.compile_parts()
        return self

    @property
    def device(self) -> torch.device:
        return self.model.llm.embed_tokens.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.llm.embed_tokens.weight.dtype

    # ------------------------------------------------------------------ the steps

    def encode_media(self, image=None, video=None, mask_prompts=None, key_frames: str = "first",
                     num_key_frames: int = NUM_KEY_FRAMES, points=None, boxes=None) -> Conversation:
        """A new conversation about an image (path, PIL image or uint8 array; optional `<vp>`
        regions: masks, points, boxes, see region_masks) or a video (file, frame folder or list of
        frames), with the processor's inputs for it (run_llm adds the vision tower's output, once
        for every turn that follows)."""
        if (image is None) == (video is None):
            raise ValueError("give an image or a video, not both or neither")
        visual_prompts = [v for v in (mask_prompts, points, boxes) if v is not None]
        if visual_prompts and (image is None or self.cfg.family != "internvl"):
            raise ValueError("mask_prompts, points and boxes (<vp> regions) need an image and an InternVL-family model")
        if not isinstance(num_key_frames, int) or num_key_frames < 1:
            raise ValueError(f"num_key_frames must be a positive integer, got {num_key_frames!r}")
        if key_frames not in data.KEY_FRAME_MODES:
            raise ValueError(f"unknown key-frame mode {key_frames!r}; use one of {', '.join(data.KEY_FRAME_MODES)}")
        if image is not None:
            image = data.load_image(image)
            regions = self._one_region_set(mask_prompts)
            if points is not None or boxes is not None:
                found = self.region_masks(image, points, boxes)
                regions = found if regions is None else np.concatenate([np.asarray(regions, bool), found])
            media = self.processor.media(image=image, regions=regions)
            keys = []
        else:
            video = video if isinstance(video, data.Video) else data.Video(video)
            keys = data.key_frame_indices(len(video), num_key_frames, key_frames)
            media = self.processor.media(frames=[video.frame(t, keep=True) for t in keys])
        return Conversation(media=media, image=image, video=video, key_frames=keys, owner=self._token)

    def build_inputs(self, convs: list[Conversation], texts: list[str],
                     answers: list[str] | None = None) -> tuple[ModelInputs, list[data.Sample]]:
        """One left-padded batch: each conversation's history plus a user turn (and, if given,
        its answer, teacher-forced). Returns the model inputs and the per-row samples."""
        samples = [self.processor([(text, None if answers is None else answers[i])], conv.media, history=conv.text)
                   for i, (conv, text) in enumerate(zip(convs, texts))]
        context = self.cfg.llm.context_length
        for s in samples:
            if context is not None and len(s.input_ids) >= context:
                raise ValueError(f"the prompt has {len(s.input_ids)} tokens but the model's context is {context}; "
                                 "use a shorter text, a smaller image or fewer frames")
        return data.collate(samples, pad="left").to(self.device, self.dtype), samples

    @torch.inference_mode()
    def run_llm(self, inputs: ModelInputs, samples: list[data.Sample], convs: list[Conversation],
                generation: GenerationConfig | None) -> list[tuple[list[int], torch.Tensor]]:
        """The LLM on one batch: generation (greedy or sampled) after each prompt, or, with
        generation=None, the model's forward over the teacher-forced answers in the inputs.
        Per row: the answer's tokens and the SAM-2 prompts (N, seg_dim) of its [SEG] tokens."""
        for conv in {id(c): c for c in convs}.values():  # the vision tower once per conversation
            if conv.media is not None and conv.vision is None:
                grid = None if conv.media.grid_thw is None else conv.media.grid_thw.to(self.device)
                conv.vision = self.model.vision(conv.media.pixel_values.to(self.device, self.dtype), grid)
        vision = self._batch_vision(convs)
        out = []
        if generation is None:
            prompts = self.model(inputs, vision=vision, logits=False).seg_prompts.split([s.num_seg for s in samples])
            for s, p in zip(samples, prompts):
                tokens = s.input_ids[s.answer[0]:s.answer[1]].tolist()
                out.append((tokens, p[len(p) - tokens.count(self.cfg.seg_token_id):]))  # the answer's are last
            return out
        longest = inputs.input_ids.shape[1]
        if self.cfg.llm.context_length is not None:
            generation = dataclasses.replace(generation, max_new_tokens=min(generation.max_new_tokens,
                                                                            self.cfg.llm.context_length - longest))
        embeds, deepstack, visual_mask = self.model.embed_inputs(inputs, vision)
        for g in generate(self.model.llm, embeds, inputs.positions, inputs.key_mask, generation, self.eos_ids,
                          decode=self.tok.decode, prenorm_hidden=self.cfg.seg_hidden_prenorm, deepstack=deepstack,
                          visual_mask=visual_mask, step=self.decode_step):
            fed = g.tokens[:-1]  # generation never feeds back its last token
            rows = [i for i, t in enumerate(fed) if t == self.cfg.seg_token_id]
            out.append((g.tokens, self.model.text_hidden_fcs(g.hidden[rows])))
        return out

    @torch.inference_mode()
    def region_masks(self, image, points=None, boxes=None) -> np.ndarray:
        """Visual prompts as region masks (n, H, W) bool, through SAM-2's own prompt encoder and
        mask decoder on the image (SAM2ImagePredictor's steps): one region per point (x, y),
        the best of SAM's 3 masks, then one per box (x0, y0, x1, y1), its single mask; in the
        image's pixels. The image is resized for SAM-2 as for the [SEG] masks (PIL bicubic)."""
        if self.cfg.sam2 is None:
            raise ValueError("point and box prompts need SAM-2; this model has none")
        image = data.load_image(image)
        W, H = image.size
        pts = self._coords(points, 2, "point", (W, H))
        bxs = self._coords(boxes, 4, "box", (W, H))
        if not len(pts) and not len(bxs):
            raise ValueError("give at least one point (x, y) or box (x0, y0, x1, y1)")
        bridge, S = self.model.grounding, self.cfg.sam2.image_size
        feats = bridge.image_features(bridge.normalize(data.sam2_frames([image], S).to(self.device)))
        scale = torch.tensor([S / W, S / H], device=self.device)  # SAM2Transforms.transform_coords
        logits = []
        if len(pts):
            xy = torch.tensor(pts, dtype=torch.float32, device=self.device) * scale
            logits.append(bridge.decode_with_points(feats, xy[:, None], torch.ones(len(pts), 1, device=self.device),
                                                    multimask=True))
        if len(bxs):
            xyxy = torch.tensor(bxs, dtype=torch.float32, device=self.device) * scale.repeat(2)
            logits.append(bridge.decode_with_points(feats, boxes=xyxy, multimask=False))
        logits = torch.nn.functional.interpolate(torch.cat(logits), size=(H, W), mode="bilinear", align_corners=False)
        return (logits[:, 0] > 0).cpu().numpy()  # SAM2Transforms.postprocess_masks, threshold 0

    @staticmethod
    def _coords(values, n: int, what: str, size: tuple[int, int]) -> list[tuple[float, ...]]:
        """Points or boxes as a list of n-tuples inside the image; one line naming a bad one."""
        if values is None:
            return []
        W, H = size
        out = []
        for v in values:
            try:
                v = tuple(float(c) for c in v)
            except (TypeError, ValueError):
                v = None
            if v is None or len(v) != n or not all(np.isfinite(v)):
                shape = "(x, y)" if n == 2 else "(x0, y0, x1, y1)"
                raise ValueError(f"a {what} must be {n} numbers {shape} in image pixels; got {values!r}")
            xs, ys = v[0::2], v[1::2]
            if min(xs) < 0 or max(xs) > W or min(ys) < 0 or max(ys) > H:
                raise ValueError(f"{what} {v} is outside the {W}x{H} image")
            if n == 4 and (v[2] <= v[0] or v[3] <= v[1]):
                raise ValueError(f"box {v} is empty; give (x0, y0, x1, y1) with x0 < x1 and y0 < y1")
            out.append(v)
        return out

    @torch.inference_mode()
    def segment(self, conv: Conversation, prompts: torch.Tensor, progress: bool = False) -> list[np.ndarray]:
        """Masks of the conversation's image or video for SAM-2 prompts (N, seg_dim): one bool
        array (T, H, W) per prompt, at the media's size."""
        if not len(prompts):
            return []
        bridge = self.model.grounding
        W, H = conv.media.size
        prompts = prompts.to(self.dtype)
        if conv.image is not None:
            logits = self._decode_frame(conv.media.sam2_frames[0], prompts)
            return [m[None] for m in bridge.postprocess(logits, (H, W)).cpu().numpy()]
        session = VideoSession(self, conv)
        session.add(prompts)
        masks = np.zeros((prompts.shape[0], len(conv.video), H, W), dtype=bool)
        steps = session.frames()
        if progress:
            steps = tqdm(steps, total=len(conv.video), desc="SAM-2 frames", unit="frame")
        for t, frame_masks in steps:
            masks[:, t] = frame_masks
        return list(masks)

    def _decode_frame(self, frame: torch.Tensor, prompts: torch.Tensor) -> torch.Tensor:
        """Every prompt (N, seg_dim) on one uint8 SAM-2 frame (3, S, S), without memory -> (N, 1, 4g, 4g) logits."""
        n = len(prompts)
        queries = torch.stack([torch.arange(n), torch.zeros(n, dtype=torch.long)], -1).to(self.device)
        return self.model.decode_masks(frame[None].to(self.device), prompts, queries)

    def open_video(self, video, key_frames: str = "first", num_key_frames: int = NUM_KEY_FRAMES) -> "VideoSession":
        """A VideoSession on a video (file, frame folder or list of frames): ask questions, add
        objects, and iterate over the frames as their masks are tracked."""
        return VideoSession(self, self.encode_media(video=video, key_frames=key_frames, num_key_frames=num_key_frames))

    def _sam2_frame(self, conv: Conversation, t: int) -> torch.Tensor:
        """Frame t of the conversation's video, uint8 (3, S, S): the key frames as the processor resized them."""
        if t in conv.key_frames:
            return conv.media.sam2_frames[conv.key_frames.index(t)]
        return data.sam2_frames([conv.video.frame(t)], self.cfg.sam2.image_size)[0]

    def _track(self, items: list[tuple[Conversation, torch.Tensor]], progress: bool = False) -> list[list[np.ndarray]]:
        """SAM-2 video propagation of the prompts of one or more videos that share their key frames,
        in one batched pass: frame t of every video is encoded in one call, and a shorter video is
        padded with its last frame, whose extra masks are dropped."""
        bridge = self.model.grounding
        convs = [c for c, _ in items]
        prompts = [p.to(self.dtype) for _, p in items]
        T = max(len(c.video) for c in convs)

        def frame(t: int) -> torch.Tensor:  # (3, S, S), or (V, 3, S, S): frame t of every video
            x = torch.stack([self._sam2_frame(c, min(t, len(c.video) - 1)) for c in convs])
            x = bridge.normalize(x.to(self.device))
            return x[0] if len(convs) == 1 else x
        owners = None
        if len(convs) > 1:
            owners = torch.cat([torch.full((len(p),), v) for v, p in enumerate(prompts)]).to(self.device)
        memory = bridge.condition(frame, torch.cat(prompts), cond_frames=convs[0].key_frames, num_frames=T, owners=owners)
        masks = [np.zeros((len(p), len(c.video), c.media.size[1], c.media.size[0]), dtype=bool)
                 for p, c in zip(prompts, convs)]
        rows = np.cumsum([0] + [len(p) for p in prompts])
        steps = bridge.propagate(frame, memory)
        if progress:
            steps = tqdm(steps, total=T, desc="SAM-2 propagation", unit="frame")
        for t, logits in steps:
            for v, c in enumerate(convs):
                if t < len(c.video):
                    W, H = c.media.size
                    masks[v][:, t] = bridge.postprocess(logits[rows[v]:rows[v + 1]], (H, W)).cpu().numpy()
        return [list(m) for m in masks]

    # ------------------------------------------------------------------ predict

    @torch.inference_mode()
    def predict(self, image=None, video=None, text: str = "", mask_prompts=None, answer: str | None = None,
                history: Conversation | None = None, max_new_tokens: int = 2048, temperature: float = 0.0,
                top_p: float = 1.0, seed: int | None = None, key_frames: str = "first",
                num_key_frames: int = NUM_KEY_FRAMES, progress: bool = False, points=None, boxes=None) -> Prediction:
        """Answer `text` about an image or a video and segment every `[SEG]` of the answer.

        text holds '<image>' where the visual tokens go. answer= skips generation and runs the
        given answer teacher-forced. history= continues a conversation (same image/video).
        key_frames: 'first' (official: the first num_key_frames frames) or 'uniform' (evenly spaced).
        mask_prompts, points, boxes: `<vp>` regions of the image (region1, region2, ... in that
        order); points and boxes become masks through SAM-2 (region_masks). The released models
        were trained with mask regions only.
        """
        generation = self._generation(max_new_tokens, temperature, top_p, seed)  # checked before any work
        if history is not None and not isinstance(history, Conversation):
            raise ValueError(f"history must be the Conversation of an earlier prediction (.history), got {type(history).__name__}")
        if history is not None and history.owner not in (None, self._token):
            raise ValueError("history comes from a conversation with another model; start a new conversation "
                             "(its image tokens and vision features belong to that model)")
        if history is not None and history.text and (image is not None or video is not None):
            raise ValueError("a follow-up turn reuses the conversation's image or video; start a new conversation for new media")
        if image is not None or video is not None:
            conv = self.encode_media(image, video, mask_prompts, key_frames, num_key_frames, points, boxes)
        elif mask_prompts is not None or points is not None or boxes is not None:
            raise ValueError("mask_prompts, points and boxes (<vp> regions) need an image and an InternVL-family model")
        else:
            conv = history if history is not None else Conversation()
        inputs, samples = self.build_inputs([conv], [text], None if answer is None else [answer])
        (tokens, prompts), = self.run_llm(inputs, samples, [conv], None if answer is not None else generation)
        pred = self._finish(conv, samples[0], tokens, prompts, teacher_forced=answer is not None)
        pred.masks = self.segment(conv, prompts, progress)
        return pred

    @torch.inference_mode()
    def predict_batch(self, images: list | None, texts: list[str], answers: list[str] | None = None,
                      max_new_tokens: int = 2048, videos: list | None = None, key_frames: str = "first",
                      num_key_frames: int = NUM_KEY_FRAMES) -> list[Prediction]:
        """Several requests, each about an image or a video, in one padded LLM batch (greedy).

        images[i] or videos[i] is the media of request i (the other None, or the whole list None).
        Requests that share an image or a video (the same object or path) share its encoding.
        SAM-2: once per distinct image for all its objects; the objects of all videos in one
        batched pass (one per set of key frames). Equal to calling predict() on each request.
        """
        generation = self._generation(max_new_tokens, 0.0, 1.0, None)
        if not texts:
            raise ValueError("predict_batch got no requests; give lists of one image and one text per request")
        images = [None] * len(texts) if images is None else images
        videos = [None] * len(texts) if videos is None else videos
        if len(images) != len(texts) or len(videos) != len(texts) or (answers is not None and len(answers) != len(texts)):
            raise ValueError(f"predict_batch got {len(images)} images, {len(texts)} texts"
                             f"{'' if answers is None else f', {len(answers)} answers'}"
                             f"{'' if not any(v is not None for v in videos) else f', {len(videos)} videos'}; "
                             "give one of each per request")
        started: dict[object, Conversation] = {}
        keys = []
        for image, video in zip(images, videos):
            if (image is None) == (video is None):
                raise ValueError("predict_batch needs an image or a video (not both) for every request; "
                                 "use predict() for text-only turns")
            media = image if image is not None else video
            key = media if isinstance(media, str) else id(media)
            if key not in started:
                started[key] = self.encode_media(image=image, video=video, key_frames=key_frames,
                                                 num_key_frames=num_key_frames)
            keys.append(key)
        convs = [started[k] for k in keys]
        inputs, samples = self.build_inputs(convs, texts, answers)
        outs = self.run_llm(inputs, samples, convs, None if answers is not None else generation)
        preds, by_media = [], {}
        for conv, sample, (tokens, prompts) in zip(convs, samples, outs):
            pred = self._finish(conv, sample, tokens, prompts, teacher_forced=answers is not None)
            preds.append(pred)
            by_media.setdefault(id(conv), (conv, []))[1].append((pred, prompts))
        groups = [(conv, items, torch.cat([p for _, p in items])) for conv, items in by_media.values()]
        tracked = [(conv, prompts) for conv, _, prompts in groups if conv.video is not None and len(prompts)]
        video_masks = iter(self.segment_videos(tracked))
        for conv, items, prompts in groups:  # one SAM-2 pass per image for all its objects
            if not len(prompts):
                masks = []
            elif conv.video is not None:
                masks = next(video_masks)
            else:
                masks = self.segment(conv, prompts)
            for pred, p in items:
                pred.masks, masks = masks[:len(p)], masks[len(p):]
        return preds

    @torch.inference_mode()
    def segment_videos(self, items: list[tuple[Conversation, torch.Tensor]]) -> list[list[np.ndarray]]:
        """segment() for several videos: the objects of all videos that share their key frames are
        tracked together in one batched SAM-2 pass."""
        out: list[list[np.ndarray] | None] = [None] * len(items)
        passes: dict[tuple[int, ...], list[int]] = {}
        for i, (conv, _) in enumerate(items):
            passes.setdefault(tuple(conv.key_frames), []).append(i)
        for members in passes.values():
            if self.cfg.video_memory and self.original_sam2 is None:
                results = self._track([items[i] for i in members])
            else:  # memory-less decoding, or Meta's predictor: one video at a time
                results = [self.segment(*items[i]) for i in members]
            for i, masks in zip(members, results):
                out[i] = masks
        return out

    # ------------------------------------------------------------------ helpers

    def _one_region_set(self, mask_prompts):
        if isinstance(mask_prompts, (list, tuple)):
            if len(mask_prompts) != 1:
                raise ValueError(f"mask_prompts has {len(mask_prompts)} entries; give one (n_regions, H, W) array for the one image")
            return mask_prompts[0]
        return mask_prompts

    def _batch_vision(self, convs: list[Conversation]) -> VisionOutput | None:
        """The vision outputs of a batch's conversations, concatenated in row order (as collate does)."""
        outs = [c.vision for c in convs if c.vision is not None]
        if not outs:
            return None
        return torch.cat([v for v, _ in outs]), [torch.cat(layer) for layer in zip(*(d for _, d in outs))]

    def _finish(self, conv: Conversation, sample: data.Sample, tokens: list[int], prompts: torch.Tensor,
                teacher_forced: bool) -> Prediction:
        """The answer text and the conversation for the next turn; prompts are dropped for a text-only turn."""
        text = self._strip_stop(self.tok.decode(tokens))
        history_text = sample.text if teacher_forced else sample.text + text + self.template.suffix + self.template.sep
        history = Conversation(history_text, conv.media, conv.vision, conv.image, conv.video, conv.key_frames, self._token)
        if conv.media is None:
            prompts = prompts[:0]  # text-only conversation: nothing to segment
        return Prediction(text, [], gcg_phrases(text, len(prompts)), history)

    def _generation(self, max_new_tokens, temperature, top_p, seed) -> GenerationConfig:
        return GenerationConfig(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                                stop_words=self.template.stop_words, seed=seed)

    def _strip_stop(self, text: str) -> str:
        for w in self.template.stop_words:
            if text.endswith(w):
                return text[: -len(w)]
        return text


class VideoSession:
    """A video to talk about and track, streamed, in the spirit of SAM-2's video predictor:

        session = model.open_video("clip.mp4")                      # its key frames encoded
        session.ask("<image>\nPlease segment the dog.")             # the answer's [SEG]s: objects 0, 1, ...
        for t, masks in session.frames():                           # (t, (objects, H, W) bool) as tracked
            if t == 99:
                session.ask("And the cat?")                         # more objects, in the masks from frame 100
        session.close()

    Frames are decoded on demand and SAM-2's memory keeps only what later frames read, so memory
    stays flat however long the video. An object added after frame N is first tracked alone over
    frames 0..N-1 (read again), so from N on its masks are those of tracking it from the start with
    the same key frames; then it joins the others in one batched pass. predict(video=...) is one
    question and one sweep of this.
    """

    def __init__(self, api: Sa2VA, conv: Conversation):
        if conv.video is None:
            raise ValueError("a video session needs a video")
        if api.cfg.sam2 is None:
            raise ValueError("this model has no SAM-2; it cannot track objects")
        self.api, self.history = api, conv  # history: the conversation so far
        self.size = conv.media.size  # (W, H)
        self.prompts = torch.zeros(0, api.cfg.seg_dim, device=api.device, dtype=api.dtype)  # every object's prompt
        self.t = 0  # the next frame frames() gives
        self._memory = None  # SAM-2's memory of all objects, up to frame t
        self._stream = None  # its propagation from frame t
        self._trackers = []  # with the original SAM-2: one propagation per group of objects added
        self.closed = False

    def __len__(self) -> int:
        return len(self.history.video)

    def __enter__(self) -> "VideoSession":
        return self

    def __exit__(self, *exc):
        self.close()

    def ask(self, text: str, answer: str | None = None, max_new_tokens: int = 2048, temperature: float = 0.0,
            top_p: float = 1.0, seed: int | None = None) -> Prediction:
        """One turn about the video (its key frames); the answer's [SEG]s become new objects,
        numbered after the ones already tracked. The Prediction's masks stay empty: frames() gives them."""
        self._check_open()
        api = self.api
        generation = api._generation(max_new_tokens, temperature, top_p, seed)
        inputs, samples = api.build_inputs([self.history], [text], None if answer is None else [answer])
        (tokens, prompts), = api.run_llm(inputs, samples, [self.history], None if answer is not None else generation)
        pred = api._finish(self.history, samples[0], tokens, prompts, teacher_forced=answer is not None)
        self.history = pred.history
        self.add(prompts)
        return pred

    @torch.inference_mode()
    def add(self, prompts: torch.Tensor) -> None:
        """Track more objects, given as SAM-2 prompts (N, seg_dim), from frame self.t on."""
        self._check_open()
        if not len(prompts):
            return
        prompts = prompts.to(self.api.device, self.api.dtype)
        if self.api.original_sam2 is not None:  # Sa2VA-i: fine-tuned key-frame masks, Meta's propagation
            tracker = self.api.original_sam2.propagate(self._original_frame, len(self), self.size[::-1],
                                                        self._key_frame_masks(prompts))
            for _ in range(self.t):
                next(tracker)
            self._trackers.append(tracker)
        elif self.api.cfg.video_memory:
            bridge, conv = self.api.model.grounding, self.history
            new = bridge.condition(self._frame, prompts, cond_frames=conv.key_frames, num_frames=len(self))
            catch_up = bridge.propagate(self._frame, new)
            for _ in range(self.t):
                next(catch_up)
            self._memory = new if self._memory is None else self._memory.merge(new)
            self._stream = None
        self.prompts = torch.cat([self.prompts, prompts])

    @torch.inference_mode()
    def frames(self) -> Iterator[tuple[int, np.ndarray]]:
        """(t, masks (objects, H, W) bool) for frame t = self.t, self.t + 1, ... to the end; objects
        added between two frames are in the masks of the next."""
        self._check_open()
        bridge = self.api.model.grounding
        W, H = self.size
        while self.t < len(self):
            t = self.t
            if not len(self.prompts):
                masks = np.zeros((0, H, W), dtype=bool)
            elif self._trackers:
                masks = np.concatenate([next(tracker)[1].cpu().numpy() for tracker in self._trackers])
            elif self.api.cfg.video_memory:
                if self._stream is None:
                    self._stream = bridge.propagate(self._frame, self._memory, start=t)
                _, logits = next(self._stream)
                masks = bridge.postprocess(logits, (H, W)).cpu().numpy()
            else:  # every frame decoded with the prompts alone, as the model was trained
                logits = self.api._decode_frame(self.api._sam2_frame(self.history, t), self.prompts)
                masks = bridge.postprocess(logits, (H, W)).cpu().numpy()
            self.t = t + 1
            yield t, masks

    def close(self) -> None:
        """Drop the memory and the decoder; the session answers no more."""
        self._memory = self._stream = None
        self._trackers = []
        self.closed = True

    def _frame(self, t: int) -> torch.Tensor:
        x = self.api._sam2_frame(self.history, t)[None].to(self.api.device)
        return self.api.model.grounding.normalize(x)[0]

    def _key_frame_masks(self, prompts: torch.Tensor) -> dict[int, torch.Tensor]:
        """Each key frame decoded with the prompts alone by the fine-tuned decoder -> {t: (N, H, W)
        bool} at the video's size (Sa2VA-i: language_embd_inference, then one resize and > 0)."""
        W, H = self.size
        out = {}
        for i, t in enumerate(self.history.key_frames):
            logits = self.api._decode_frame(self.history.media.sam2_frames[i], prompts)
            out[t] = torch.nn.functional.interpolate(logits, size=(H, W), mode="bilinear", align_corners=False)[:, 0] > 0
        return out

    def _original_frame(self, t: int) -> torch.Tensor:
        """Frame t for Meta's predictor: resized to its size (PIL bicubic, as its frame loader)."""
        return data.sam2_frames([self.history.video.frame(t)], self.api.original_sam2.image_size)[0]

    def _check_open(self):
        if self.closed:
            raise ValueError("this video session is closed; open a new one with open_video()")


# ----------------------------------------------------------------------------- outputs

COLORS = np.array([[230, 25, 75], [60, 180, 75], [255, 225, 25], [0, 130, 200], [245, 130, 48], [145, 30, 180]], np.uint8)


def overlay(frame: np.ndarray, masks: list[np.ndarray]) -> np.ndarray:
    out = frame.astype(np.float32)
    for k, m in enumerate(masks):
        out[m] = 0.5 * out[m] + 0.5 * COLORS[k % len(COLORS)]
    return out.astype(np.uint8)


def davis_palette() -> list[int]:
    """The DAVIS / PASCAL VOC colour map (index i -> the bits of i spread over r, g, b), flattened
    for PIL's putpalette: the palette DAVIS's and SAM-2's tools write and read."""
    palette = []
    for i in range(256):
        r = g = b = 0
        c = i
        for j in range(8):
            r |= ((c >> 0) & 1) << (7 - j)
            g |= ((c >> 1) & 1) << (7 - j)
            b |= ((c >> 2) & 1) << (7 - j)
            c >>= 3
        palette += [r, g, b]
    return palette


DAVIS_PALETTE = davis_palette()


def palette_frame(masks: list[np.ndarray]) -> Image.Image:
    """One frame's objects as a DAVIS-style palette PNG image: 0 background, object k -> index k+1
    (where objects overlap, the later one)."""
    if len(masks) > 255:
        raise ValueError(f"{len(masks)} objects do not fit one palette image (at most 255)")
    index = np.zeros(masks[0].shape, dtype=np.uint8)
    for k, m in enumerate(masks):
        index[m] = k + 1
    im = Image.fromarray(index, mode="P")
    im.putpalette(DAVIS_PALETTE)
    return im


def write_outputs(out_dir: str, preds: Prediction | list[Prediction], image=None, video: data.Video | None = None,
                  prompts: list[str] | None = None):
    """The objects of one or more answers about the same media: masks as PNGs (numbered across the
    answers), DAVIS-style palette PNGs per frame (`palette/00000.png`, object k -> index k+1), an
    overlay and result.json (each answer's text; masks as compressed COCO RLE), written whole
    (cli.output_folder: nothing is left behind on an error or a signal)."""
    preds = [preds] if isinstance(preds, Prediction) else preds
    with output_folder(out_dir) as tmp:
        result = {"text": "\n".join(p.text for p in preds), "answers": [], "objects": []}
        masks = []
        for i, pred in enumerate(preds):
            result["answers"].append({"prompt": prompts[i] if prompts else None, "text": pred.text})
            for k, m in enumerate(pred.masks):
                result["objects"].append({"answer": i, "phrase": pred.phrases[k] if k < len(pred.phrases) else "",
                                          "masks": [data.rle_encode(f) for f in m]})
                masks.append(m)
        for k, m in enumerate(masks):
            for t, f in enumerate(m):
                name = f"mask_{k}.png" if image is not None else f"mask_{k}_{t:05d}.png"
                Image.fromarray(f.astype(np.uint8) * 255).save(os.path.join(tmp, name))
        if masks:
            os.mkdir(os.path.join(tmp, "palette"))
            for t in range(masks[0].shape[0]):
                palette_frame([m[t] for m in masks]).save(os.path.join(tmp, "palette", f"{t:05d}.png"))
        if image is not None:
            Image.fromarray(overlay(np.asarray(image), [m[0] for m in masks])).save(os.path.join(tmp, "overlay.png"))
        elif video is not None:
            _write_overlay_video(os.path.join(tmp, "overlay.mp4"), video, masks)
        with open(os.path.join(tmp, "result.json"), "w") as f:
            json.dump(result, f)


def _write_overlay_video(path: str, video: data.Video, masks: list[np.ndarray]):
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

@dataclass
class ChatOptions:
    model: str | None = arg(None, "folder written by convert.py, or an official Sa2VA folder (default: the shipped "
                                  "model, weights/sa2va-shapes)")
    image: str | None = arg(None, "image file")
    video: str | None = arg(None, "video file or folder of frames")
    prompt: tuple[str, ...] = arg((), "question; '<image>' is prepended when missing. Repeatable: the answers about "
                                      "the same image or video are batched, and all their objects segmented together")
    gcg: bool = arg(False, "also ask the official grounded-caption question (phrases with a mask each)")
    answer: tuple[str, ...] = arg((), "skip generation and segment this answer (teacher-forced); one per question")
    point: tuple[str, ...] = arg((), "a <vp> region from a click at X,Y (image pixels), through SAM-2; repeatable: "
                                     "region1, region2, ... (InternVL family, --image)", metavar="X,Y")
    box: tuple[str, ...] = arg((), "a <vp> region from the box X0,Y0,X1,Y1 (image pixels), through SAM-2; repeatable, "
                                   "numbered after the points", metavar="X0,Y0,X1,Y1")
    out: str | None = arg(None, "folder for masks, palette PNGs, overlay and result.json")
    device: str | None = arg(None, "cuda, mps or cpu (default: best available)")
    dtype: str | None = arg(None, "bf16, fp16 or fp32 (default: bf16 on GPU and on CPUs with AMX or AVX512-BF16, "
                                  "else fp32)")
    compile: bool = arg(False, "torch.compile the vision tower, decoding and SAM-2 (pays off on GPU; see README)")
    max_new_tokens: int = arg(2048, "longest answer in tokens")
    key_frames: int = arg(NUM_KEY_FRAMES, "video frames the MLLM sees and SAM-2 is conditioned on (official: 5)")
    key_frame_mode: str = arg("first", "which video frames are the key frames: the first ones (official) or evenly "
                                       "spaced", choices=data.KEY_FRAME_MODES)
    sam2_original: str | None = arg(None, "video: propagate with Meta's original SAM-2 (sam2.1_hiera_large.pt or a "
                                          ".safetensors of it), the key frames still decoded by the model (Sa2VA-i)")
    sam2_original_config: str = arg(ORIGINAL_SAM2_CONFIG, "the hydra config of --sam2-original in the sam2 package")
    self_check: bool = arg(False, "run end to end on a tiny random checkpoint built on the fly")


def chat(opts: ChatOptions):
    """The command: every input and the --out folder are checked before the model loads."""
    if opts.out:
        check_output_folder(opts.out, "--out", not_inside=(opts.model,) if opts.model else ())
    if opts.self_check:
        vid = self_check(Sa2VA)
        if opts.out:
            write_outputs(opts.out, vid, video=vid.history.video)
            print(f"wrote {opts.out}")
        return
    prompts = list(opts.prompt) + ([data.GCG_QUESTION] if opts.gcg else [])
    if not prompts:
        raise ValueError("--prompt is required (or --gcg, or --self-check to run on a tiny random model)")
    if opts.answer and len(opts.answer) != len(prompts):
        raise ValueError(f"{len(opts.answer)} --answer for {len(prompts)} question(s); give one --answer per question")
    if opts.image and opts.video:
        raise ValueError("give --image or --video, not both")
    if len(prompts) > 1 and not (opts.image or opts.video):
        raise ValueError("several questions are batched about one image or video; give --image or --video")
    if opts.key_frames < 1:
        raise ValueError(f"--key-frames must be at least 1, got {opts.key_frames}")
    points = [parse_numbers(p, 2, "--point", "X,Y") for p in opts.point] or None
    boxes = [parse_numbers(b, 4, "--box", "X0,Y0,X1,Y1") for b in opts.box] or None
    if (points or boxes) and not opts.image:
        raise ValueError("--point and --box mark regions of an image; give --image")
    if (points or boxes) and len(prompts) > 1:
        raise ValueError("--point and --box go with one question; ask the others in separate runs")
    if opts.sam2_original and not opts.video:
        raise ValueError("--sam2-original changes video propagation; give --video")
    if opts.sam2_original and not os.path.isfile(opts.sam2_original):
        raise ValueError(f"--sam2-original {opts.sam2_original} is not a file; give Meta's sam2.1_hiera_large.pt")
    image = data.load_image(opts.image, f"--image {opts.image}") if opts.image else None
    video = data.Video(opts.video) if opts.video else None
    GenerationConfig(max_new_tokens=opts.max_new_tokens)  # a bad value fails now, not after loading
    model = Sa2VA.from_pretrained(opts.model, device=opts.device, dtype=opts.dtype, compile=opts.compile)
    if opts.sam2_original:
        model.load_original_sam2(opts.sam2_original, opts.sam2_original_config)
    if image or video:
        prompts = [p if "<image>" in p else "<image>\n" + p for p in prompts]
    answers = list(opts.answer) or None
    frames = dict(key_frames=opts.key_frame_mode, num_key_frames=opts.key_frames)
    if len(prompts) == 1:
        preds = [model.predict(image=image, video=video, text=prompts[0], answer=answers and answers[0],
                               max_new_tokens=opts.max_new_tokens, progress=True, points=points, boxes=boxes, **frames)]
    else:  # one batch, one encoding of the media, one SAM-2 pass for every object
        preds = model.predict_batch([image] * len(prompts) if image else None, prompts, answers, opts.max_new_tokens,
                                    videos=[video] * len(prompts) if video else None, **frames)
    k = 0
    for pred in preds:
        print(pred.text)
        for m, phrase in zip(pred.masks, pred.phrases):
            print(f"object {k}: {phrase!r} {m.shape[0]} frame(s), {int(m.sum())} mask pixels")
            k += 1
    if opts.out:
        write_outputs(opts.out, preds, image=preds[0].history.image, video=preds[0].history.video, prompts=prompts)
        print(f"wrote {opts.out}")


def parse_numbers(text: str, n: int, flag: str, form: str) -> tuple[float, ...]:
    """'12,34' -> (12.0, 34.0): n numbers separated by commas, else one line naming `flag` and `form`."""
    try:
        values = tuple(float(v) for v in text.split(","))
    except ValueError:
        values = ()
    if len(values) != n:
        raise ValueError(f"{flag} {text!r} is not {form} ({n} numbers separated by commas)")
    return values


def main(argv=None):
    opts = parse(ChatOptions, argv, "Chat with Sa2VA and segment images and videos.", prog="sa2va.py")
    run("sa2va.py", lambda: chat(opts))


if __name__ == "__main__":
    main()
