"""Inputs to Sa2VA: media and conversations turned into model inputs, one processor per family.

    processor = make_processor(cfg, tokenizer)            # InternVLProcessor or QwenVLProcessor
    media = processor.media(image=img)                     # pixels, visual-token string, SAM-2 frames
    sample = processor([("<image>\\nPlease segment the cat.", "Sure, [SEG].")], media)
    inputs = collate([sample])                             # a padded model.sa2va.ModelInputs

Reproduces the official preprocessing (HF remote code `modeling_sa2va_chat.py` /
`modeling_sa2va_qwen.py: predict_forward`, train code `projects/sa2va/datasets`):
  * InternVL dynamic tiling (`dynamic_preprocess`: 1-12 tiles of 448 px + a thumbnail, the
    reference tie-break), PIL bicubic resizes, the vision config's mean/std; video key frames
    one 448-px tile each; `<vp>` regions as the last tile's token rows;
  * the Qwen-VL image pipeline: qwen_vl_utils 0.0.14 `fetch_image`, then the image processor
    (`smart_resize`, bicubic resize, normalise, patchify) and its `<|image_pad|>` counts;
  * the chat templates named by `config.template` (xtuner's INSTRUCTION / SUFFIX / SEP), labels
    with -100 on everything but the answers and their suffix (xtuner `encode_fn`);
  * SAM-2's 1024-px frames (PIL bicubic, aspect ratio not kept) as uint8, normalised in the model;
  * videos from files (decoded on demand with av), frame folders or frame lists, and key frames;
  * COCO run-length encoding of masks (pycocotools' compressed string form).

Qwen-VL resize of the image processor: under transformers 4.57 with torchvision installed
(Sa2VA's code imports it), `AutoProcessor` loads the *fast* `Qwen2VLImageProcessorFast`, which
resizes the uint8 image with torch's antialiased bicubic; the slow processor uses PIL's. They
differ by up to 2 grey levels on under 1% of pixels; `resize="torch"` (default) reproduces the
fast path, `resize="pil"` the slow one. Normalisation is (x/255 - mean)/std in fp32 for both
(the fast processor fuses it; the results differ by ~1e-7).
"""
import dataclasses
import json
import math
import os
import re
from dataclasses import dataclass

import av
import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps, UnidentifiedImageError

from model.config import NUM_KEY_FRAMES, Qwen25VisionConfig, Qwen3VisionConfig, Sa2VAConfig
from model.llm import mrope_positions
from model.losses import match_objects
from model.sa2va import ModelInputs
from model.tokenizer import Tokenizer

IMG_START, IMG_END, IMG_CONTEXT = "<img>", "</img>", "<IMG_CONTEXT>"
SEG, P_START, P_END, VP_START, VP_END = "[SEG]", "<p>", "</p>", "<vp>", "</vp>"
SA2VA_TOKENS = (SEG, P_START, P_END, VP_START, VP_END)  # added by Sa2VA, in this order
QWEN_VISION_START, QWEN_VISION_END, QWEN_IMAGE_PAD = "<|vision_start|>", "<|vision_end|>", "<|image_pad|>"
IGNORE = -100  # label of a token that takes no loss


def image_token(family: str) -> str:
    """The token whose slots the vision tower's rows fill: <IMG_CONTEXT> (InternVL) or <|image_pad|> (Qwen-VL)."""
    return IMG_CONTEXT if family == "internvl" else QWEN_IMAGE_PAD


# ----------------------------------------------------------------------------- images

MAX_IMAGE_PIXELS = 8192 * 8192  # larger images are refused before they are decoded


def load_image(image, name: str = "image", exif: bool = True) -> Image.Image:
    """A path, PIL image or HxWx3 uint8 array -> RGB PIL image, as displayed: its EXIF orientation
    applied, 16-bit greyscale scaled to 8 bits. Refuses empty images and ones over MAX_IMAGE_PIXELS.

    exif=False keeps the stored pixel grid, as the official training datasets read images (their
    masks are annotated on it)."""
    transpose = ImageOps.exif_transpose if exif else (lambda im: im)
    if isinstance(image, Image.Image):
        _check_pixels(image.size, name)
        return _to_rgb(transpose(image), name)
    if isinstance(image, np.ndarray):
        if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
            raise ValueError(f"{name} array must be HxWx3 uint8, got shape {image.shape} dtype {image.dtype}")
        _check_pixels((image.shape[1], image.shape[0]), name)
        return Image.fromarray(image)
    if isinstance(image, (str, os.PathLike)):
        path = os.fspath(image)
        try:
            im = Image.open(path)
        except FileNotFoundError:
            raise ValueError(f"image file {path} does not exist") from None
        except IsADirectoryError:
            raise ValueError(f"image {path} is a folder; give an image file (a folder of frames is a --video)") from None
        except Image.DecompressionBombError:
            raise ValueError(f"image {path} has more than {MAX_IMAGE_PIXELS} pixels; resize it first") from None
        except (UnidentifiedImageError, OSError) as e:
            raise ValueError(f"cannot decode image {path}: {e}; give a PNG/JPEG/... file") from None
        with im:
            _check_pixels(im.size, f"image {path}")
            try:
                return _to_rgb(transpose(im), f"image {path}")
            except OSError as e:  # a truncated or corrupt file fails only when its pixels are read
                raise ValueError(f"cannot decode image {path}: {e}; the file is damaged") from None
    raise ValueError(f"unsupported {name} type {type(image).__name__}; give a path, PIL image or uint8 array")


def _check_pixels(size: tuple[int, int], name: str):
    w, h = size
    if w == 0 or h == 0:
        raise ValueError(f"{name} is empty ({w}x{h} pixels)")
    if w * h > MAX_IMAGE_PIXELS:
        raise ValueError(f"{name} is {w}x{h}, more than {MAX_IMAGE_PIXELS} pixels; resize it first")


def _to_rgb(im: Image.Image, name: str) -> Image.Image:
    if im.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):  # 16-bit greyscale (PIL opens such PNGs so)
        levels = np.clip(np.asarray(im, dtype=np.float64), 0, 65535) / 257  # 65535 -> 255
        grey = np.round(levels).astype(np.uint8)
        return Image.fromarray(np.repeat(grey[..., None], 3, axis=-1))
    if im.mode == "F":
        raise ValueError(f"{name} has 32-bit float pixels; save it as an 8- or 16-bit image")
    return im.convert("RGB")


def displayed_size(im: Image.Image) -> tuple[int, int]:
    """(W, H) of an opened image as shown: EXIF orientations 5-8 turn it by 90 degrees."""
    w, h = im.size
    return (h, w) if im.getexif().get(0x0112, 1) in (5, 6, 7, 8) else (w, h)


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


def to_tensor(images: list[Image.Image], size: int, mean: tuple[float, ...], std: tuple[float, ...]) -> torch.Tensor:
    """PIL images -> (N, 3, size, size) float32, bicubic-resized to size (identity if already so), normalised."""
    arrays = [np.asarray(im.resize((size, size), Image.BICUBIC) if im.size != (size, size) else im,
                         dtype=np.uint8) for im in images]
    x = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float() / 255.0  # (N, 3, S, S)
    return (x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)


def sam2_frames(images: list[Image.Image], size: int) -> torch.Tensor:
    """SAM-2's input: each image resized to size x size (PIL bicubic, aspect ratio not kept) -> (T, 3, S, S) uint8."""
    return torch.stack([torch.from_numpy(np.asarray(im.convert("RGB").resize((size, size), Image.BICUBIC)).copy())
                        .permute(2, 0, 1) for im in images])


# ----------------------------------------------------------------------------- Qwen-VL images

QwenVisionConfig = Qwen25VisionConfig | Qwen3VisionConfig
MAX_ASPECT = 200  # both smart_resize versions reject more elongated images
# Sa2VA's processor call limits (modeling_sa2va_qwen.py: predict_forward), the same for both families.
SA2VA_MIN_PIXELS = 512 * 28 * 28
SA2VA_MAX_PIXELS = 2048 * 28 * 28
TRAIN_VIDEO_PIXELS = (128 * 28 * 28, 512 * 28 * 28)  # Sa2VABaseDataset min/max_pixels_multi: video frames in training


def _check_aspect(height: int, width: int):
    if max(height, width) / min(height, width) > MAX_ASPECT:
        raise ValueError(f"image {width}x{height} is more elongated than {MAX_ASPECT}:1; crop it first")


def fetch_smart_resize(height: int, width: int, factor: int = 28, min_pixels: int = 4 * 28 * 28,
                       max_pixels: int = 16384 * 28 * 28) -> tuple[int, int]:
    """qwen_vl_utils' smart_resize: sides rounded to `factor` (at least one factor), then scaled into the pixel range."""
    _check_aspect(height, width)
    h = max(factor, round(height / factor) * factor)
    w = max(factor, round(width / factor) * factor)
    if h * w > max_pixels:
        beta = math.sqrt(height * width / max_pixels)
        h, w = math.floor(height / beta / factor) * factor, math.floor(width / beta / factor) * factor
    elif h * w < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h, w = math.ceil(height * beta / factor) * factor, math.ceil(width * beta / factor) * factor
    return h, w


def smart_resize(height: int, width: int, factor: int, min_pixels: int, max_pixels: int) -> tuple[int, int]:
    """The image processor's smart_resize (differs from qwen_vl_utils' in where sides are kept >= factor)."""
    _check_aspect(height, width)
    h, w = round(height / factor) * factor, round(width / factor) * factor
    if h * w > max_pixels:
        beta = math.sqrt(height * width / max_pixels)
        h = max(factor, math.floor(height / beta / factor) * factor)
        w = max(factor, math.floor(width / beta / factor) * factor)
    elif h * w < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h, w = math.ceil(height * beta / factor) * factor, math.ceil(width * beta / factor) * factor
    return h, w


def fetch_image(image: Image.Image) -> Image.Image:
    """qwen_vl_utils `fetch_image` for a PIL image with default settings: to RGB, then resize to multiples of 28."""
    if not isinstance(image, Image.Image):
        raise ValueError(f"expected a PIL image, got {type(image).__name__}; open files with PIL first")
    if image.mode == "RGBA":  # qwen_vl_utils composites transparency onto white
        rgb = Image.new("RGB", image.size, (255, 255, 255))
        rgb.paste(image, mask=image.split()[3])
        image = rgb
    else:
        image = image.convert("RGB")
    h, w = fetch_smart_resize(image.height, image.width)
    return image.resize((w, h), Image.BICUBIC)


def resize_uint8(image: torch.Tensor, height: int, width: int, resize: str = "torch") -> torch.Tensor:
    """Bicubic resize of a uint8 (3, H, W) image as the fast ("torch") or slow ("pil") processor does it."""
    if resize not in ("torch", "pil"):
        raise ValueError(f"unknown resize {resize!r}; use 'torch' (fast processor) or 'pil' (slow processor)")
    if tuple(image.shape[-2:]) == (height, width):
        return image  # both processors leave an image of the target size untouched
    if resize == "pil":
        pil = Image.fromarray(image.permute(1, 2, 0).numpy()).resize((width, height), Image.BICUBIC)
        return torch.from_numpy(np.asarray(pil).copy()).permute(2, 0, 1)
    # torchvision's uint8 CPU path: torch's native antialiased bicubic, uint8 in and out.
    return F.interpolate(image[None], size=(height, width), mode="bicubic", align_corners=False, antialias=True)[0]


def patchify(pixels: torch.Tensor, vision: QwenVisionConfig) -> tuple[torch.Tensor, tuple[int, int, int]]:
    """Normalised still image (C, H, W) -> flattened patches (gh*gw, C*tp*p*p) and its grid (1, gh, gw).

    Patches are listed in 2x2 merge-block order (block row, block col, row in block, col in
    block); each patch is (C, tp, p, p) flattened, the image repeated tp times in time.
    """
    C, H, W = pixels.shape
    p, m, tp = vision.patch_size, vision.spatial_merge_size, vision.temporal_patch_size
    if H % (p * m) or W % (p * m):
        raise ValueError(f"image {W}x{H} is not a multiple of {p * m}; resize it with smart_resize first")
    gh, gw = H // p, W // p
    x = pixels.view(C, gh // m, m, p, gw // m, m, p)
    x = x.permute(1, 4, 2, 5, 0, 3, 6)  # (gh/m, gw/m, m, m, C, p, p)
    x = x[:, :, :, :, :, None].expand(-1, -1, -1, -1, -1, tp, -1, -1)  # (..., C, tp, p, p)
    return x.reshape(gh * gw, C * tp * p * p), (1, gh, gw)


def process_image(image: Image.Image, vision: QwenVisionConfig, min_pixels: int = SA2VA_MIN_PIXELS,
                  max_pixels: int = SA2VA_MAX_PIXELS, resize: str = "torch") -> tuple[torch.Tensor, tuple[int, int, int]]:
    """The image processor alone: RGB PIL image -> patches (L, C*tp*p*p) float32 and (1, gh, gw)."""
    x = torch.from_numpy(np.asarray(image.convert("RGB")).copy()).permute(2, 0, 1)  # (3, H, W) uint8
    h, w = smart_resize(x.shape[1], x.shape[2], vision.patch_size * vision.spatial_merge_size, min_pixels, max_pixels)
    x = resize_uint8(x, h, w, resize).float() / 255
    x = (x - torch.tensor(vision.pixel_mean)[:, None, None]) / torch.tensor(vision.pixel_std)[:, None, None]
    return patchify(x, vision)


def qwen_image_inputs(images: list[Image.Image], vision: QwenVisionConfig, min_pixels: int = SA2VA_MIN_PIXELS,
                      max_pixels: int = SA2VA_MAX_PIXELS, resize: str = "torch",
                      fetch: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Sa2VA's full pipeline (fetch_image, then the processor) for images or video frames fed as images.

    Returns pixel_values (sum of L_i, C*tp*p*p) float32 and image_grid_thw (n_images, 3) long;
    image i takes gh*gw/merge**2 `<|image_pad|>` tokens. fetch=False: the processor alone, as
    the official training datasets call it.
    """
    if not images:
        raise ValueError("no images given; pass at least one PIL image")
    prepare = fetch_image if fetch else (lambda im: im.convert("RGB"))
    patches, grids = zip(*(process_image(prepare(im), vision, min_pixels, max_pixels, resize) for im in images))
    return torch.cat(patches), torch.tensor(grids, dtype=torch.long)


# ----------------------------------------------------------------------------- prompts

@dataclass(frozen=True)
class Template:
    instruction: str  # a user turn, with an `{input}` slot, up to the assistant's answer
    suffix: str  # ends an answer (takes loss; the first stop word)
    stop_words: tuple[str, ...]
    sep: str = "\n"  # between turns, no loss


# xtuner's templates as Sa2VA uses them (no system prompt).
TEMPLATES = {
    "qwen_chat": Template("<|im_start|>user\n{input}<|im_end|>\n<|im_start|>assistant\n", "<|im_end|>",
                          ("<|im_end|>", "<|endoftext|>")),
    "internlm2_chat": Template("<|im_start|>user\n{input}<|im_end|>\n<|im_start|>assistant\n", "<|im_end|>",
                               ("<|im_end|>",)),
    "phi3_chat": Template("<|user|>\n{input}<|end|>\n<|assistant|>\n", "<|end|>", ("<|end|>",)),
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
    """The text that introduces <vp> regions after the image (modeling_sa2va_chat.py: predict_forward)."""
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
            names = sorted((n for n in os.listdir(source) if n.lower().endswith(IMAGE_EXTENSIONS)), key=natural_key)
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
        if self._list is not None:  # masks come back at one size: refuse a mix before any work
            for t, item in enumerate(self._list):
                size = self._frame_size(item)
                if size != self.size:
                    raise ValueError(f"frame {t} ({item if isinstance(item, (str, os.PathLike)) else 'in the list'}) is "
                                     f"{size[0]}x{size[1]} but frame 0 is {self.size[0]}x{self.size[1]}; "
                                     "give the frames of a video at one size")

    def __len__(self) -> int:
        return self._n

    @staticmethod
    def _frame_size(item) -> tuple[int, int]:
        """(W, H) of a listed frame as load_image will return it, reading only the header of a file."""
        if isinstance(item, Image.Image):
            return displayed_size(item)
        if isinstance(item, (str, os.PathLike)):
            try:
                with Image.open(item) as im:
                    return displayed_size(im)
            except OSError:
                pass  # load_image says what is wrong with the file
        return load_image(item).size

    def _open(self):
        try:
            return av.open(self._path)
        except (av.error.InvalidDataError, av.error.FFmpegError, OSError) as e:
            raise ValueError(f"cannot decode video {self._path}: {e}") from None

    def _count_frames(self) -> int:
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
            im = load_image(self._list[t], f"frame {t}")
        else:
            if self._decoder is None or t < self._next:  # (re)start at the first frame
                if self._decoder is not None:
                    self._container.close()
                self._container = self._open()
                self._decoder, self._next = self._container.decode(video=0), 0
            while True:
                im = next(self._decoder).to_image().convert("RGB")
                self._next += 1
                if self._next - 1 == t:
                    break
            if t and im.size != self.size:
                raise ValueError(f"frame {t} of {self._path} is {im.size[0]}x{im.size[1]} but frame 0 is "
                                 f"{self.size[0]}x{self.size[1]}; the video changes resolution, re-encode it at one size")
        if keep:
            self._kept[t] = im
        return im


def natural_key(name: str) -> list:
    """Sort key that orders frame_2 before frame_10 (numbers compared as numbers)."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


KEY_FRAME_MODES = ("first", "uniform")
# The grounded-caption question of the official GCG evaluation (sa2va_eval_gcg.py); the line break
# in its source leaves the run of spaces after "interleaved".
GCG_QUESTION = ("Could you please give me a brief description of the image? Please respond with interleaved "
                "    segmentation masks for the corresponding parts of the answer.")


def key_frame_indices(num_frames: int, k: int = NUM_KEY_FRAMES, mode: str = "first") -> list[int]:
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


# ----------------------------------------------------------------------------- processors

@dataclass
class Media:
    """An image, or a video's key frames, prepared for the model (the processor's first half)."""
    pixel_values: torch.Tensor  # InternVL (N_tiles, 3, S, S) normalised; Qwen-VL (N_patches, C*t*p*p)
    grid_thw: torch.Tensor | None  # Qwen-VL (N_images, 3); None for InternVL
    token_string: str  # replaces '<image>' in the first user turn
    visual_rows: torch.Tensor  # (N_slots,) long: the vision-output row behind each visual token, in order
    num_vision_rows: int  # rows the vision tower returns for pixel_values
    sam2_frames: torch.Tensor | None  # (F, 3, S, S) uint8 SAM-2 inputs of the same frames (None without SAM-2)
    size: tuple[int, int]  # (W, H) of the image or first frame


@dataclass
class Sample:
    """One conversation as model inputs, unpadded (collate pads a batch of them)."""
    input_ids: torch.Tensor  # (L,) long
    labels: torch.Tensor  # (L,) long, IGNORE where no loss
    positions: torch.Tensor  # (L,), or (3, L) multimodal RoPE
    text: str  # the formatted conversation, for the next turn
    answer: tuple[int, int]  # [start, end) of the last answer's tokens, suffix included; (L, L) if none
    num_seg: int  # [SEG] tokens in input_ids
    media: Media | None = None
    mask_queries: torch.Tensor | None = None  # (P, 2) ([SEG] index in the sample, SAM-2 frame)
    mask_targets: torch.Tensor | None = None  # (P, 4g, 4g) bool ground truth of each query (training)
    phrases: list[str | None] | None = None  # training: the referring phrase of each [SEG], where the record names it


Turns = list[tuple[str, str | None]]  # (user text, answer or None for the generation prompt)


class Processor:
    """Shared text half of the processors: templating, tokenising and labels (xtuner `encode_fn`).

    The first chunk is the history (already formatted turns) plus the first user turn, encoded
    as one string as `predict_forward` does; each answer (with its suffix) and each separator is
    encoded on its own, as xtuner's `encode_fn` does, so the labels line up with the answers.
    """

    def __init__(self, cfg: Sa2VAConfig, tokenizer: Tokenizer):
        self.cfg, self.tok = cfg, tokenizer
        self.template = get_template(cfg.template)
        self.image_token = image_token(cfg.family)
        self.image_token_id = tokenizer.token_to_id(self.image_token)
        self.seg_id = tokenizer.token_to_id(SEG)
        if (self.image_token_id, self.seg_id) != (cfg.image_token_id, cfg.seg_token_id):
            raise ValueError(f"the tokenizer gives {self.image_token} id {self.image_token_id} and [SEG] id {self.seg_id}, "
                             f"the config {cfg.image_token_id} and {cfg.seg_token_id}; the checkpoint folder is "
                             "inconsistent, re-run convert.py")

    def media(self, image: Image.Image | None = None, frames: list[Image.Image] | None = None,
              regions: np.ndarray | None = None, training: bool = False) -> Media:
        """training: prepare pixels as the official training datasets do (differs for Qwen-VL)."""
        raise NotImplementedError

    def user_turn(self, text: str, media: Media | None, first: bool) -> str:
        raise NotImplementedError

    def positions(self, ids: torch.Tensor, media: Media | None) -> torch.Tensor:
        raise NotImplementedError

    def __call__(self, turns: Turns, media: Media | None = None, history: str = "", decode_masks: bool = False) -> Sample:
        """A conversation -> Sample. history: formatted earlier turns (their media is `media`).

        decode_masks: also ask for every [SEG] decoded on every SAM-2 frame of the media (the
        official training's video expansion: a video's prompts apply to each of its frames).
        """
        if not turns:
            raise ValueError("a conversation needs at least one turn")
        for user, reply in turns:
            for what, value in (("prompt", user), ("answer", reply)):
                if value is not None and not isinstance(value, str):
                    raise ValueError(f"the {what} must be text, got {type(value).__name__}")
                if value is not None and _has_surrogates(value):
                    raise ValueError(f"the {what} is not valid UTF-8 text; pass a str of real characters")
        tags = sum(user.count("<image>") for user, _ in turns)
        if tags and media is None:
            raise ValueError("the prompt has '<image>' but no image or video was given")
        if tags > 1 or (tags and history):
            raise ValueError(f"the conversation has {tags} '<image>' tag(s){' after its first turn' if history else ''}; "
                             "the one image or video goes in one place, in the first turn")
        ids, labels, text = [], [], history
        answer = None
        for k, (user, reply) in enumerate(turns):
            prompt = self.user_turn(user, media if k == 0 and not history else None, first=k == 0 and not history)
            chunk = self.tok.encode((history if k == 0 else "") + prompt, add_bos=k == 0)
            ids += chunk
            labels += [IGNORE] * len(chunk)
            text += prompt
            if reply is None:
                if k != len(turns) - 1:
                    raise ValueError(f"turn {k} has no answer; only the last turn may be left for generation")
                answer = None  # the conversation ends in a prompt to generate from
                break
            if not reply:
                raise ValueError("an answer is empty; give the text to segment, e.g. 'Sure, [SEG].'")
            full = self.tok.encode(reply + self.template.suffix, add_bos=False)
            sep = self.tok.encode(self.template.sep, add_bos=False)
            answer = (len(ids), len(ids) + len(full))
            ids += full + sep
            labels += full + [IGNORE] * len(sep)
            text += reply + self.template.suffix + self.template.sep
        input_ids = torch.tensor(ids, dtype=torch.long)
        num_seg = int((input_ids == self.seg_id).sum())
        queries = None
        if decode_masks and media is not None and media.sam2_frames is not None:
            seg, frame = torch.meshgrid(torch.arange(num_seg), torch.arange(len(media.sam2_frames)), indexing="ij")
            queries = torch.stack([seg.flatten(), frame.flatten()], -1)
        L = len(ids)
        return Sample(input_ids, torch.tensor(labels, dtype=torch.long), self.positions(input_ids, media), text,
                      answer or (L, L), num_seg, media, queries)


def _has_surrogates(text: str) -> bool:
    # str from undecodable bytes (os.fsdecode, surrogateescape) holds lone surrogates
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


class InternVLProcessor(Processor):
    """InternVL family: dynamic 448-px tiles for an image, one tile per video key frame, `<vp>` regions."""

    def media(self, image: Image.Image | None = None, frames: list[Image.Image] | None = None,
              regions: np.ndarray | None = None, training: bool = False) -> Media:
        v = self.cfg.vision
        if (image is None) == (frames is None):
            raise ValueError("give an image or the frames of a video, not both or neither")
        if frames is not None and regions is not None:
            raise ValueError("<vp> regions need an image, not a video")
        images = dynamic_tiles(image, v.image_size, max_num=v.max_tiles) if image is not None else frames
        tiles = to_tensor(images, v.image_size, v.pixel_mean, v.pixel_std)
        tpt = v.tokens_per_tile
        # an image is one <img> block of all its tiles; a video one block per frame
        token_string = image_token_string([len(images) * tpt] if image is not None else [tpt] * len(images))
        rows = [torch.arange(len(images) * tpt)]
        if regions is not None:
            cells = self.region_cells(regions, image.size)  # (n, side*side) bool
            side = self.cfg.vision.grid // 2
            for r, n in enumerate(cells.sum(1).tolist()):
                if n == 0:  # it would get no <vp> tokens at all
                    raise ValueError(f"mask_prompts region {r + 1} covers no cell of the {side}x{side} token grid "
                                     "(it is empty or thinner than a cell of the image); draw it larger")
            token_string += vp_string(cells.sum(1).tolist())
            # Each region's rows are the last tile's (the thumbnail, or the only tile) cells it covers.
            rows += [(len(images) - 1) * tpt + torch.nonzero(c).flatten() for c in cells]
        sam2 = sam2_frames([image] if image is not None else frames, self.cfg.sam2.image_size) if self.cfg.sam2 else None
        return Media(tiles, None, token_string, torch.cat(rows), len(images) * tpt, sam2,
                     (image if image is not None else frames[0]).size)

    def region_cells(self, regions: np.ndarray, size: tuple[int, int]) -> torch.Tensor:
        """(n, H, W) region masks -> (n, side*side) bool token cells of a tile, side = grid / 2."""
        m = np.asarray(regions)
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
        return small.flatten(1) > 0

    def user_turn(self, text: str, media: Media | None, first: bool) -> str:
        return format_turn(self.cfg.template, text, media.token_string if media is not None else "")

    def positions(self, ids: torch.Tensor, media: Media | None) -> torch.Tensor:
        return torch.arange(len(ids))


class QwenVLProcessor(Processor):
    """Qwen2.5-VL / Qwen3-VL: the Qwen image pipeline per image (video key frames are images too)."""

    def __init__(self, cfg: Sa2VAConfig, tokenizer: Tokenizer):
        super().__init__(cfg, tokenizer)
        self.vision_start_id = tokenizer.token_to_id(QWEN_VISION_START)

    def media(self, image: Image.Image | None = None, frames: list[Image.Image] | None = None,
              regions: np.ndarray | None = None, training: bool = False, resize: str = "torch") -> Media:
        """training: the processor alone (no fetch_image), video frames at 128-512 x 28^2 pixels
        (Sa2VABaseDataset._process_multiple_images); inference takes fetch_image's sizes."""
        if (image is None) == (frames is None):
            raise ValueError("give an image or the frames of a video, not both or neither")
        if regions is not None:
            raise ValueError("mask_prompts (<vp> regions) need an InternVL-family model")
        images = [image] if image is not None else frames
        limits = TRAIN_VIDEO_PIXELS if training and frames is not None else (SA2VA_MIN_PIXELS, SA2VA_MAX_PIXELS)
        pixels, grid = qwen_image_inputs(images, self.cfg.vision, *limits, resize=resize, fetch=not training)
        counts = (grid.prod(-1) // self.cfg.vision.spatial_merge_size ** 2).tolist()
        sam2 = sam2_frames(images, self.cfg.sam2.image_size) if self.cfg.sam2 else None
        return Media(pixels, grid, "".join(qwen_image_string(n) for n in counts), torch.arange(sum(counts)),
                     sum(counts), sam2, images[0].size)

    def user_turn(self, text: str, media: Media | None, first: bool) -> str:
        return format_qwen_turn(text, media.token_string if media is not None else "",
                                self.cfg.system_prompt if first else None)

    def positions(self, ids: torch.Tensor, media: Media | None) -> torch.Tensor:
        pos, _ = mrope_positions(ids[None], media.grid_thw if media is not None else None, self.image_token_id,
                                 self.vision_start_id, self.cfg.vision.spatial_merge_size,
                                 image_temporal_stride=self.cfg.vision.image_temporal_stride)
        return pos[:, 0]  # (3, L)


def make_processor(cfg: Sa2VAConfig, tokenizer: Tokenizer) -> Processor:
    return InternVLProcessor(cfg, tokenizer) if cfg.family == "internvl" else QwenVLProcessor(cfg, tokenizer)


def collate(samples: list[Sample], pad: str = "right") -> ModelInputs:
    """Pad samples into one batch ("left" for generation, "right" for training) and concatenate
    their media in order, renumbering visual rows, [SEG] indices and frames."""
    if pad not in ("left", "right"):
        raise ValueError(f"unknown padding {pad!r}; use 'left' or 'right'")
    B, L = len(samples), max(len(s.input_ids) for s in samples)
    mrope = samples[0].positions.dim() == 2
    ids = torch.zeros(B, L, dtype=torch.long)
    labels = torch.full((B, L), IGNORE, dtype=torch.long)
    key_mask = torch.zeros(B, L, dtype=torch.bool)
    positions = torch.zeros((3, B, L) if mrope else (B, L), dtype=torch.long)
    pixels, grids, rows, frames, queries, targets = [], [], [], [], [], []
    n_rows = n_seg = n_frames = 0
    for b, s in enumerate(samples):
        n = len(s.input_ids)
        span = slice(L - n, L) if pad == "left" else slice(0, n)
        ids[b, span], labels[b, span], key_mask[b, span] = s.input_ids, s.labels, True
        positions[..., b, span] = s.positions
        if s.media is not None:
            pixels.append(s.media.pixel_values)
            if s.media.grid_thw is not None:
                grids.append(s.media.grid_thw)
            rows.append(s.media.visual_rows + n_rows)
            n_rows += s.media.num_vision_rows
        if s.mask_queries is not None:
            queries.append(s.mask_queries + torch.tensor([n_seg, n_frames]))
            if s.mask_targets is not None:
                targets.append(s.mask_targets)
        if s.media is not None and s.media.sam2_frames is not None:
            frames.append(s.media.sam2_frames)
            n_frames += len(s.media.sam2_frames)
        n_seg += s.num_seg
    return ModelInputs(ids, positions, None if bool(key_mask.all()) else key_mask,
                       torch.cat(pixels) if pixels else None, torch.cat(grids) if grids else None,
                       torch.cat(rows) if rows else None, torch.cat(frames) if frames else None,
                       torch.cat(queries) if queries else None, labels,
                       torch.cat(targets) if targets and len(targets) == len(queries) else None)


# ----------------------------------------------------------------------------- training data

@dataclass
class Skipped:
    """A record that cannot become a training sample, and why (reported, or fatal with --strict)."""
    where: str  # the record: "data.jsonl line 3", "RefCOCO image 1234", ...
    reason: str


class Records:
    """A source of training records: dicts in the JSONL format below, with absolute paths.

    `record(index, rng)` builds one (a dataset that draws objects or questions per sample
    draws them from rng) and may raise ValueError / OSError / KeyError for a broken one;
    `where(index)` names it in reports; `length(index)` is a rough token count for grouping
    samples of similar length into batches. The JSONL file and every official dataset layout
    (official_data.py) are Records.
    """
    name = "records"

    def __len__(self) -> int:
        raise NotImplementedError

    def record(self, index: int, rng: np.random.Generator) -> dict:
        raise NotImplementedError

    def where(self, index: int) -> str:
        return f"{self.name} sample {index}"

    def length(self, index: int) -> int:
        return 1000


class JsonlRecords(Records):
    """One record a line of a JSONL file; paths are relative to the file."""

    def __init__(self, path: str):
        self.path, self.root = path, os.path.dirname(os.path.abspath(path))
        self.name = path
        self.records: list[dict | ValueError] = []  # a record, or why its line is not one
        self.lines: list[int] = []
        with open(path, encoding="utf-8") as f:
            for line, text in enumerate(f, 1):
                if not text.strip():
                    continue
                try:
                    record = json.loads(text)
                except json.JSONDecodeError as e:
                    record = ValueError(f"not JSON ({e})")
                if not isinstance(record, (dict, ValueError)):
                    record = ValueError("not a JSON object")
                self.records.append(record)
                self.lines.append(line)
        if not self.records:
            raise ValueError(f"{path} holds no samples; give one JSON object a line (see the README)")

    def __len__(self) -> int:
        return len(self.records)

    def where(self, index: int) -> str:
        return f"{self.path} line {self.lines[index]}"

    def length(self, index: int) -> int:
        r = self.records[index]
        if isinstance(r, ValueError):
            return 0
        text = sum(len(str(t.get("value", ""))) for t in r.get("conversations", []) if isinstance(t, dict))
        return text // 3 + (5000 if "video" in r else 1000 if "image" in r else 0)

    def record(self, index: int, rng: np.random.Generator) -> dict:
        r = self.records[index]
        if isinstance(r, ValueError):
            raise r
        r = dict(r)
        for key in ("image", "video"):
            if key in r:
                r[key] = [self._path(p) for p in r[key]] if key == "video" and isinstance(r[key], list) else self._path(r[key])
        return r

    def _path(self, p) -> str:
        if not isinstance(p, str):
            raise ValueError(f"a path must be a string, got {type(p).__name__}")
        return os.path.join(self.root, p)

    def problems(self, index: int) -> list[str]:
        """What `official_data.py check` reports for a line: not a sample, or its files missing."""
        try:
            r = self.record(index, np.random.default_rng(0))
        except ValueError:
            return ["line is not a sample"]
        video = r.get("video", [])
        paths = ([r["image"]] if "image" in r else []) + (video if isinstance(video, list) else [video])
        return ["missing image or video"] if any(not os.path.exists(p) for p in paths) else []


def sample_frames(num_frames: int, rng: np.random.Generator, k: int = NUM_KEY_FRAMES) -> list[int]:
    """The k training frames of a video, sorted (Sa2VA03RefVOS): distinct ones from a clip of more
    than k + 1 frames, else drawn with replacement."""
    if num_frames > k + 1:
        return sorted(rng.choice(num_frames, k, replace=False).tolist())
    return sorted(rng.choice(num_frames, k, replace=True).tolist())


def segment_frames(num_frames: int, rng: np.random.Generator, k: int = NUM_KEY_FRAMES) -> list[int]:
    """The video-QA frames (Sa2VA04VideoQA `_get_rawvideo_dec`): every frame of a clip of at most
    k, else one random frame in each of k equal segments."""
    if num_frames <= k:
        return list(range(num_frames))
    edges = np.linspace(0, num_frames, k + 1, dtype=int)
    return [int(rng.integers(edges[i], edges[i + 1])) for i in range(k)]


FRAME_SAMPLING = {"distinct": sample_frames, "segments": segment_frames}
MIN_REGION_CELLS = 4  # Sa2VA06VPDataset._get_region_infos drops samples with a region under 4 cells of a 16x16 grid


def vp_grid_cells(regions: np.ndarray) -> list[int]:
    """(n, H, W) bool <vp> regions -> the cells of the 16x16 grid each covers, as the official rule counts them."""
    small = F.interpolate(torch.from_numpy(regions).float()[None], size=(16, 16), mode="nearest")[0]
    return small.flatten(1).sum(1).int().tolist()


class TrainingData:
    """Training samples from Records (a JSONL file, or official_data's readers), LLaVA-style:

        {"image": "a.jpg", "conversations": [{"from": "human", "value": "<image>\\nPlease segment the cat."},
         {"from": "gpt", "value": "Sure, [SEG]."}], "masks": [MASK, ...]}

    masks follow the [SEG] tokens of the answers in order. A video is "video": "clip.mp4" or a
    list of frame files, with "masks": [[MASK or null for every frame], ...] per object; its
    training frames are drawn as the official video datasets do ("frame_sampling": "distinct",
    the referring-VOS rule, or "segments", the video-QA one); "frame_step": k keeps every k-th
    frame of the video first (the masks then cover the kept frames). "regions": [MASK, ...]
    are <vp> region prompts (InternVL family; a region must cover 4 cells of a 16x16 grid, the
    token grid of the released models). MASK is COCO RLE (compressed or not), a list of polygons, or a list of RLEs (parts
    of one object, OR-ed).

    `data[epoch, index]` is a Sample (with mask queries and targets: per frame, the objects the
    official 5-per-frame rule keeps) or a Skipped; each sample's randomness (objects, questions,
    frames) comes from (seed, epoch, index), so it does not depend on workers, ranks or resumption.
    """

    def __init__(self, source: "str | Records", processor: Processor, seed: int = 0, max_length: int = 8192):
        self.source = JsonlRecords(source) if isinstance(source, str) else source
        self.processor, self.seed, self.max_length = processor, seed, max_length
        sam2 = processor.cfg.sam2
        self.mask_size = 4 * sam2.grid if sam2 is not None else None

    def __len__(self) -> int:
        return len(self.source)

    def length(self, index: int) -> int:
        return self.source.length(index)

    def __getitem__(self, key: tuple[int, int] | tuple[int, int, bool]) -> Sample | Skipped:
        """key: (epoch, index), or (epoch, index, text_only) for train.py's --text-warmup."""
        epoch, index, text_only = key if len(key) == 3 else (*key, False)
        rng = np.random.default_rng([self.seed, epoch, index])
        try:
            return self.sample(self.source.record(index, rng), rng, text_only)
        except (ValueError, OSError, IndexError, KeyError, TypeError) as e:
            reason = f"missing key {e}" if isinstance(e, KeyError) else _one_line(e)
            return Skipped(self.source.where(index), reason)

    def sample(self, record: dict, rng: np.random.Generator, text_only: bool = False) -> Sample:
        """One record -> Sample; raises ValueError (or OSError for files) when it cannot be one.

        text_only: a sample with masks keeps its frames for SAM-2 but leaves its visual tokens
        out of the conversation ('<image>' becomes nothing): the LLM reads the question alone.
        """
        turns = _turns(record.get("conversations"))
        if "image" in record and "video" in record:
            raise ValueError("has both image and video; give one")
        media, masks = None, np.zeros((0, 1, 1, 1), dtype=bool)  # (objects, frames, H, W)
        if "image" in record:
            image = load_image(_path(record["image"]), exif=False)
            W, H = image.size
            regions = record.get("regions")
            regions = np.stack([decode_mask(m, H, W) for m in regions]) if regions else None
            if regions is not None:
                cells = vp_grid_cells(regions)
                if min(cells) < MIN_REGION_CELLS:
                    raise ValueError(f"region {cells.index(min(cells)) + 1} covers {min(cells)} cell(s) of the 16x16 "
                                     f"grid, under {MIN_REGION_CELLS}")
            media = self.processor.media(image=image, regions=regions, training=True)
            given = record.get("masks") or []
            masks = np.stack([decode_mask(m, H, W) for m in given])[:, None] if given else np.zeros((0, 1, H, W), bool)
        elif "video" in record:
            source = record["video"]
            video = Video([_path(p) for p in source] if isinstance(source, list) else _path(source))
            step = record.get("frame_step", 1)
            if not isinstance(step, int) or step < 1:
                raise ValueError(f"frame_step must be a positive integer, got {step!r}")
            T, (W, H) = -(-len(video) // step), video.size  # frames kept
            sampling = record.get("frame_sampling", "distinct")
            if sampling not in FRAME_SAMPLING:
                raise ValueError(f"unknown frame_sampling {sampling!r}; use one of {', '.join(FRAME_SAMPLING)}")
            chosen = FRAME_SAMPLING[sampling](T, rng)
            media = self.processor.media(frames=[video.frame(t * step) for t in chosen], training=True)
            objects = []
            for k, per_frame in enumerate(record.get("masks", [])):
                if not isinstance(per_frame, list) or len(per_frame) != T:
                    n = len(per_frame) if isinstance(per_frame, list) else "no list of"
                    raise ValueError(f"object {k} has masks for {n} frames but the video has {T}"
                                     + (f" (every {step}th of {len(video)})" if step > 1 else ""))
                objects.append(np.stack([decode_mask(per_frame[t], H, W) if per_frame[t] is not None
                                         else np.zeros((H, W), bool) for t in chosen]))
            if objects:
                masks = np.stack(objects)
        elif record.get("masks") or record.get("regions"):
            raise ValueError("has masks but no image or video")
        if text_only and len(masks) and media is not None:
            media = dataclasses.replace(media, token_string="", visual_rows=torch.zeros(0, dtype=torch.long))
        sample = self.processor(turns, media)
        if sample.num_seg != len(masks):
            raise ValueError(f"its answers hold {sample.num_seg} [SEG] but it gives {len(masks)} masks")
        phrases = record.get("phrases")
        if phrases is not None:
            if not isinstance(phrases, list) or len(phrases) != len(masks) or \
                    not all(p is None or isinstance(p, str) for p in phrases):
                raise ValueError(f"phrases must be a list of {len(masks)} strings (or nulls), one per mask")
            # a phrase that names two different objects here picks out neither: left unnamed
            sample.phrases = [None if p is not None and any(q == p and not np.array_equal(masks[k], masks[j])
                                                            for j, q in enumerate(phrases)) else p
                              for k, p in enumerate(phrases)]
        if len(sample.input_ids) > self.max_length:
            raise ValueError(f"it is {len(sample.input_ids)} tokens, more than max_length {self.max_length}")
        if len(masks) and self.mask_size is not None:
            gen = torch.Generator().manual_seed(int(rng.integers(2**62)))
            queries, targets = [], []
            small = F.interpolate(torch.from_numpy(masks).float(), size=(self.mask_size,) * 2, mode="nearest") > 0
            for f in range(masks.shape[1]):  # official check_obj_number, frame by frame
                for k in match_objects(sample.num_seg, len(masks), gen):
                    queries.append((k, f))
                    targets.append(small[k, f])
            sample.mask_queries = torch.tensor(queries, dtype=torch.long)
            sample.mask_targets = torch.stack(targets)
        return sample


def _path(p) -> str:
    if not isinstance(p, str):
        raise ValueError(f"a path must be a string, got {type(p).__name__}")
    return p


def _turns(conversations) -> Turns:
    """LLaVA conversations [{"from": "human", "value"}, {"from": "gpt", "value"}, ...] -> turns."""
    if not isinstance(conversations, list) or not conversations:
        raise ValueError("has no conversations list")
    if len(conversations) % 2:
        raise ValueError(f"has {len(conversations)} conversation entries; give human/gpt pairs")
    turns = []
    for i in range(0, len(conversations), 2):
        human, gpt = conversations[i], conversations[i + 1]
        if not (isinstance(human, dict) and isinstance(gpt, dict) and human.get("from") == "human"
                and gpt.get("from") == "gpt"):
            raise ValueError(f"conversation entries {i} and {i + 1} are not a human turn then a gpt turn")
        turns.append((human.get("value"), gpt.get("value")))
    return turns


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split()) or type(e).__name__


# ----------------------------------------------------------------------------- masks

def rle_encode(mask: np.ndarray) -> dict:
    """COCO RLE of a (H, W) bool mask in pycocotools' compressed form ({"size", "counts": str}).

    Column-major runs starting with zeros; each run (minus the run two before it, from the
    fourth on) written as a little-endian base-32 number in 6-bit characters from '0' (48).
    """
    flat = np.asarray(mask, dtype=np.uint8).flatten(order="F")
    change = np.flatnonzero(np.diff(flat)) + 1
    counts = np.diff(np.concatenate([[0], change, [flat.size]])).tolist()
    if flat.size and flat[0] == 1:
        counts = [0] + counts
    out = []
    for i, c in enumerate(counts):
        x = c - counts[i - 2] if i > 2 else c
        while True:
            ch, x = x & 0x1F, x >> 5
            more = x != -1 if ch & 0x10 else x != 0
            out.append(chr(48 + (ch | 0x20 if more else ch)))
            if not more:
                break
    return {"size": list(mask.shape), "counts": "".join(out)}


def _runs_to_mask(counts: list[int], h: int, w: int) -> np.ndarray:
    if sum(counts) != h * w:
        raise ValueError(f"RLE counts cover {sum(counts)} pixels but size {h}x{w} has {h * w}; the mask is corrupt")
    flat = np.repeat(np.arange(len(counts)) % 2 == 1, counts)  # runs alternate 0s and 1s, from 0s
    return flat.reshape(w, h).T


def polygon_mask(xy: list[float], h: int, w: int) -> np.ndarray:
    """One COCO polygon [x0, y0, x1, y1, ...] -> (h, w) bool, pixel for pixel as pycocotools'
    `frPyObjects` + `decode` (maskApi.c `rleFrPoly`): the outline is walked at 5x resolution,
    its crossings of pixel columns give the run boundaries."""
    pts = np.asarray(xy, dtype=np.float64).reshape(-1, 2)
    k, scale = len(pts), 5.0
    x = np.append((scale * pts[:, 0] + 0.5).astype(np.int64), 0)  # C's (int) truncates toward zero
    y = np.append((scale * pts[:, 1] + 0.5).astype(np.int64), 0)
    x[k], y[k] = x[0], y[0]
    us, vs = [], []
    for j in range(k):  # dense integer points along each edge, walked from its lower end
        xs, xe, ys, ye = int(x[j]), int(x[j + 1]), int(y[j]), int(y[j + 1])
        dx, dy = abs(xe - xs), abs(ys - ye)
        flip = (dx >= dy and xs > xe) or (dx < dy and ys > ye)
        if flip:
            xs, xe, ys, ye = xe, xs, ye, ys
        if dx >= dy:
            slope = (ye - ys) / dx if dx else 0.0
            t = np.arange(dx + 1)
            t = dx - t if flip else t
            us.append(t + xs)
            vs.append((ys + slope * t + 0.5).astype(np.int64))  # truncation toward zero, as C's (int)
        else:
            slope = (xe - xs) / dy
            t = np.arange(dy + 1)
            t = dy - t if flip else t
            vs.append(t + ys)
            us.append((xs + slope * t + 0.5).astype(np.int64))
    u, v = np.concatenate(us), np.concatenate(vs)
    # where the outline moves to another column: a boundary point of that column, downsampled
    change = np.flatnonzero(u[1:] != u[:-1]) + 1
    xd = np.where(u[change] < u[change - 1], u[change], u[change] - 1).astype(np.float64)
    xd = (xd + 0.5) / scale - 0.5
    keep = (np.floor(xd) == xd) & (xd >= 0) & (xd <= w - 1)
    yd = np.minimum(v[change], v[change - 1]).astype(np.float64)
    yd = np.ceil(np.clip((yd + 0.5) / scale - 0.5, 0, h))
    a = np.sort(np.append(xd[keep].astype(np.int64) * h + yd[keep].astype(np.int64), h * w))
    a = np.diff(np.concatenate([[0], a]))
    counts, j = [int(a[0])], 1
    while j < len(a):  # zero-length runs merge their neighbours (rleFrPoly's last loop)
        if a[j] > 0:
            counts.append(int(a[j]))
            j += 1
        else:
            j += 1
            if j < len(a):
                counts[-1] += int(a[j])
                j += 1
    return _runs_to_mask(counts, h, w)


def decode_mask(mask, h: int, w: int) -> np.ndarray:
    """A mask as datasets give it -> (h, w) bool: COCO RLE (compressed or a list of counts, of
    size h x w), a list of polygons, or a list of RLEs (parts of one object); parts are OR-ed.

    pycocotools users sum the parts' uint8 maps (Sa2VA01RefSeg, the GCG datasets); where parts
    overlap that gives 2, which every consumer treats as foreground, so the union is the same mask.
    """
    if isinstance(mask, dict):
        if list(mask.get("size", [])) != [h, w]:
            raise ValueError(f"an RLE mask has size {mask.get('size')} but the image is {h}x{w}")
        return rle_decode(mask)
    if isinstance(mask, list) and mask and all(isinstance(p, dict) for p in mask):
        out = np.zeros((h, w), dtype=bool)
        for p in mask:
            out |= decode_mask(p, h, w)
        return out
    if isinstance(mask, list) and mask and all(isinstance(p, list) for p in mask):
        if any(len(p) < 6 or len(p) % 2 for p in mask):
            raise ValueError("a polygon needs at least 3 (x, y) points")
        out = np.zeros((h, w), dtype=bool)
        for p in mask:
            out |= polygon_mask(p, h, w)
        return out
    raise ValueError("a mask must be COCO RLE ({'size', 'counts'}), a list of polygons or a list of RLEs, "
                     f"got {type(mask).__name__}")


def rle_counts(rle: dict) -> list[int]:
    """The run lengths of a COCO RLE: its list of counts, or its compressed string (or bytes,
    as pycocotools returns it) decoded. Checks they cover the mask exactly."""
    if not isinstance(rle, dict) or "counts" not in rle or "size" not in rle:
        raise ValueError("an RLE mask must be a dict with 'size' and 'counts'")
    size, counts = rle["size"], rle["counts"]
    if not (isinstance(size, (list, tuple)) and len(size) == 2 and all(isinstance(n, int) and n >= 0 for n in size)):
        raise ValueError(f"an RLE mask has size {size!r}; give [height, width]")
    if isinstance(counts, str):
        counts = counts.encode("utf-8")  # a non-ASCII character fails the alphabet check below
    if isinstance(counts, bytes):
        runs, x, k = [], 0, 0
        for ch in counts:
            c = ch - 48
            if not 0 <= c < 64:
                raise ValueError("an RLE mask's counts string has a character outside pycocotools' alphabet; the mask is corrupt")
            x |= (c & 0x1F) << (5 * k)
            k += 1
            if c & 0x20:
                continue
            if c & 0x10:
                x |= -1 << (5 * k)  # sign-extend
            runs.append(x + runs[-2] if len(runs) > 2 else x)
            x, k = 0, 0
        counts = runs
    elif not (isinstance(counts, list) and all(isinstance(c, int) for c in counts)):
        raise ValueError(f"an RLE mask's counts must be a string or a list of integers, got {type(counts).__name__}")
    h, w = size
    if any(c < 0 for c in counts) or sum(counts) != h * w:
        raise ValueError(f"RLE counts cover {sum(counts)} pixels but size {h}x{w} has {h * w}; the mask is corrupt")
    return counts


def rle_decode(rle: dict) -> np.ndarray:
    """A COCO RLE (compressed string or uncompressed list of counts) -> (H, W) bool mask."""
    h, w = rle["size"] if isinstance(rle, dict) and "size" in rle else (0, 0)
    return _runs_to_mask(rle_counts(rle), h, w)
