"""Inputs to Sa2VA: images and videos, their preprocessing, and the prompt text.

Reproduces the official inference preprocessing (inference.md §2-4, §9):
  * InternVL dynamic tiling (1-12 tiles of 448 px + a thumbnail, the reference tie-break),
    PIL bicubic resizes, ImageNet normalisation;
  * the chat templates named by `config.template` and the `<img><IMG_CONTEXT>*N</img>` string;
  * the Qwen-VL user turn (`<|vision_start|><|image_pad|>*N<|vision_end|>` per image, then the
    text) and the image-processor settings per family (the processor itself: qwen_processing.py);
  * videos from files (decoded on demand with av), frame folders or frame lists, and the choice
    of key frames (the official first five, or evenly spaced ones).
"""
import os
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

IMG_START, IMG_END, IMG_CONTEXT = "<img>", "</img>", "<IMG_CONTEXT>"
SEG, P_START, P_END, VP_START, VP_END = "[SEG]", "<p>", "</p>", "<vp>", "</vp>"
SA2VA_TOKENS = (SEG, P_START, P_END, VP_START, VP_END)  # added by Sa2VA, in this order
QWEN_VISION_START, QWEN_VISION_END, QWEN_IMAGE_PAD = "<|vision_start|>", "<|vision_end|>", "<|image_pad|>"


# ----------------------------------------------------------------------------- images

def load_image(image) -> Image.Image:
    """A path, PIL image or HxWx3 uint8 array -> RGB PIL image."""
    if isinstance(image, Image.Image):
        return image.convert("RGB")
    if isinstance(image, np.ndarray):
        if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
            raise ValueError(f"image array must be HxWx3 uint8, got shape {image.shape} dtype {image.dtype}")
        return Image.fromarray(image)
    if isinstance(image, (str, os.PathLike)):
        try:
            with Image.open(image) as im:
                return im.convert("RGB")
        except FileNotFoundError:
            raise ValueError(f"image file {image} does not exist") from None
        except (UnidentifiedImageError, OSError) as e:
            raise ValueError(f"cannot decode image {image}: {e}; give a PNG/JPEG/... file") from None
    raise ValueError(f"unsupported image type {type(image).__name__}; give a path, PIL image or uint8 array")


def _tile_grid(width: int, height: int, image_size: int, min_num: int, max_num: int) -> tuple[int, int]:
    """(columns, rows) of the InternVL tiling for an image of this size."""
    aspect = width / height
    # The reference builds a set and sorts it by area; the set's order decides ties, so keep it.
    grids = sorted({(i, j) for n in range(min_num, max_num + 1) for i in range(1, n + 1)
                    for j in range(1, n + 1) if min_num <= i * j <= max_num}, key=lambda g: g[0] * g[1])
    best, best_diff = (1, 1), float("inf")
    for i, j in grids:
        diff = abs(aspect - i / j)
        if diff < best_diff:
            best, best_diff = (i, j), diff
        elif diff == best_diff and width * height > 0.5 * image_size * image_size * i * j:
            best = (i, j)  # on a tie a larger grid wins if the image has the pixels for it
    return best


def dynamic_tiles(image: Image.Image, image_size: int = 448, min_num: int = 1, max_num: int = 12,
                  use_thumbnail: bool = True) -> list[Image.Image]:
    """InternVL `dynamic_preprocess`: row-major tiles of image_size, then a thumbnail if >1 tile."""
    cols, rows = _tile_grid(image.width, image.height, image_size, min_num, max_num)
    resized = image.resize((cols * image_size, rows * image_size), Image.BICUBIC)
    tiles = [resized.crop(((k % cols) * image_size, (k // cols) * image_size,
                           (k % cols + 1) * image_size, (k // cols + 1) * image_size))
             for k in range(cols * rows)]
    if use_thumbnail and len(tiles) > 1:
        tiles.append(image.resize((image_size, image_size), Image.BICUBIC))
    return tiles


def to_tensor(images: list[Image.Image], size: int, mean=IMAGENET_MEAN, std=IMAGENET_STD) -> torch.Tensor:
    """PIL images -> (N, 3, size, size) float32, bicubic-resized to size (identity if already so)."""
    arrays = [np.asarray(im.resize((size, size), Image.BICUBIC) if im.size != (size, size) else im,
                         dtype=np.uint8) for im in images]
    x = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float() / 255.0  # (N, 3, S, S)
    mean = torch.tensor(mean).view(1, 3, 1, 1)
    std = torch.tensor(std).view(1, 3, 1, 1)
    return (x - mean) / std


# ----------------------------------------------------------------------------- prompts

@dataclass(frozen=True)
class Template:
    instruction: str  # with an `{input}` slot
    stop_words: tuple[str, ...]


# xtuner's templates as Sa2VA uses them (no system prompt).
TEMPLATES = {
    "qwen_chat": Template("<|im_start|>user\n{input}<|im_end|>\n<|im_start|>assistant\n",
                          ("<|im_end|>", "<|endoftext|>")),
    "internlm2_chat": Template("<|im_start|>user\n{input}<|im_end|>\n<|im_start|>assistant\n", ("<|im_end|>",)),
    "phi3_chat": Template("<|user|>\n{input}<|end|>\n<|assistant|>\n", ("<|end|>",)),
}


def get_template(name: str) -> Template:
    key = name.replace("-", "_")  # the official code normalises the name the same way
    if key not in TEMPLATES:
        raise ValueError(f"unknown chat template {name!r}; known: {', '.join(TEMPLATES)}")
    return TEMPLATES[key]


def image_token_string(n_tokens_per_image: list[int]) -> str:
    """'<img><IMG_CONTEXT>*n</img>' per image, joined by newlines (video frames) or alone (image)."""
    return "\n".join(IMG_START + IMG_CONTEXT * n + IMG_END for n in n_tokens_per_image)


def vp_string(region_token_counts: list[int]) -> str:
    """The text that introduces <vp> regions after the image (inference.md §9)."""
    regions = ", ".join(f"region{r + 1}{VP_START}{IMG_CONTEXT * k}{VP_END}" for r, k in enumerate(region_token_counts))
    return f"\nThere are {len(region_token_counts)} part regions in the picture: {regions}.\n"


def format_turn(template: str, text: str, image_tokens: str = "", past_text: str = "") -> str:
    """One user turn in the template, `<image>` replaced by the visual token string."""
    if image_tokens and "<image>" not in text:
        raise ValueError("the prompt has an image but no '<image>' placeholder; put '<image>' where it belongs")
    text = text.replace("<image>", image_tokens)
    return past_text + get_template(template).instruction.format(input=text)


def qwen_image_string(n_tokens: int) -> str:
    return QWEN_VISION_START + QWEN_IMAGE_PAD * n_tokens + QWEN_VISION_END


def format_qwen_turn(text: str, image_tokens: str = "", system_prompt: str | None = None) -> str:
    """A user turn as the Qwen-VL chat template renders it: images first, then the text.

    The official code deletes '<image>' and passes the images as separate message items.
    """
    head = f"<|im_start|>system\n{system_prompt}<|im_end|>\n" if system_prompt else ""
    return f"{head}<|im_start|>user\n{image_tokens}{text.replace('<image>', '')}<|im_end|>\n<|im_start|>assistant\n"


def qwen_image_spec(cfg):
    """The image-processor settings of a Qwen-VL config (mean/std per family)."""
    from qwen_processing import CLIP_MEAN, CLIP_STD, QwenImageSpec
    mean, std = (CLIP_MEAN, CLIP_STD) if cfg.family == "qwen2_5_vl" else ((0.5,) * 3, (0.5,) * 3)
    v = cfg.vision
    return QwenImageSpec(patch_size=v.patch_size, merge_size=v.spatial_merge_size,
                         temporal_patch_size=v.temporal_patch_size, mean=mean, std=std)


# ----------------------------------------------------------------------------- videos

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp")


class Video:
    """Frames of a video file (decoded with av), a folder of frame images, or a list of frames.

    Frames are produced on demand: `frame(t)` of a file decodes forward from the last position
    and keeps only frames asked for with `keep`, so a long video is never held whole in memory.
    """

    def __init__(self, source):
        self._list = None
        self._path = None
        if isinstance(source, (list, tuple)):
            self._list = list(source)
        elif isinstance(source, (str, os.PathLike)) and os.path.isdir(source):
            names = sorted(n for n in os.listdir(source) if n.lower().endswith(IMAGE_EXTENSIONS))
            self._list = [os.path.join(source, n) for n in names]
        elif isinstance(source, (str, os.PathLike)):
            if not os.path.isfile(source):
                raise ValueError(f"video {source} does not exist")
            self._path = str(source)
            self._n = self._count_frames()
        else:
            raise ValueError(f"unsupported video type {type(source).__name__}; give a file, a frame folder or a list of frames")
        if self._list is not None:
            self._n = len(self._list)
        if self._n == 0:
            raise ValueError(f"video {source if not isinstance(source, (list, tuple)) else '(list)'} has no frames")
        self._kept: dict[int, Image.Image] = {}
        self._decoder = None
        self._next = 0
        self.size = self.frame(0, keep=True).size  # (W, H) of the first frame

    def __len__(self) -> int:
        return self._n

    def _open(self):
        import av
        try:
            return av.open(self._path)
        except (av.error.InvalidDataError, av.error.FFmpegError, OSError) as e:
            raise ValueError(f"cannot decode video {self._path}: {e}") from None

    def _count_frames(self) -> int:
        import av
        with self._open() as c:
            if not c.streams.video:
                raise ValueError(f"{self._path} has no video stream")
            # Count decodable frames: container headers are often missing or wrong.
            try:
                return sum(1 for _ in c.decode(video=0))
            except av.error.FFmpegError as e:
                raise ValueError(f"cannot decode video {self._path}: {e}") from None

    def frame(self, t: int, keep: bool = False) -> Image.Image:
        if not 0 <= t < self._n:
            raise IndexError(f"frame {t} is outside the video's {self._n} frames")
        if t in self._kept:
            return self._kept[t]
        if self._list is not None:
            im = load_image(self._list[t])
        else:
            if self._decoder is None or t < self._next:
                self._container = self._open()
                self._decoder, self._next = self._container.decode(video=0), 0
            while True:
                im = next(self._decoder).to_image().convert("RGB")
                self._next += 1
                if self._next - 1 == t:
                    break
        if keep:
            self._kept[t] = im
        return im


def key_frame_indices(num_frames: int, k: int, mode: str) -> list[int]:
    """Frames the MLLM sees and SAM-2 conditions on.

    'first': frames 0..k-1, the official Sa2VA behaviour. 'uniform': k evenly spaced frames
    over the whole clip, as Sa2VA-i picks them (np.linspace(0, T-1, k) truncated to int; its
    repeats on clips shorter than k collapse), same weights, better on long videos.
    """
    if mode == "first":
        return list(range(min(k, num_frames)))
    if mode == "uniform":
        return sorted(set(np.linspace(0, num_frames - 1, k).astype(int).tolist()))
    raise ValueError(f"unknown key-frame mode {mode!r}; use 'first' or 'uniform'")
