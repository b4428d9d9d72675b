"""Image inputs and rotary position ids for the Qwen-VL families (Sa2VA-Qwen2.5-VL, Sa2VA-Qwen3-VL).

Reproduces what Sa2VA's official pipeline feeds the model (inference.md §4):
  1. qwen_vl_utils 0.0.14 `fetch_image` (called with its defaults by `process_vision_info`):
     RGBA pasted on white, other modes converted to RGB, then a PIL bicubic resize to its
     `smart_resize` (factor 28, 4..16384 tokens of 28x28 px);
  2. the checkpoint's image processor, called with min_pixels=512*28*28, max_pixels=2048*28*28:
     its own `smart_resize` (factor = patch*merge: 28 for Qwen2.5-VL, 32 for Qwen3-VL), a
     bicubic resize, rescale 1/255, normalise, duplicate the still image to the temporal patch
     size, and flatten into patches in transformers' order;
  3. `get_rope_index` (transformers 4.57) for the 3-D mRoPE position ids of a prompt.

The resize of step 2: under transformers 4.57 with torchvision installed (Sa2VA's code imports
torchvision), `AutoProcessor` loads the *fast* `Qwen2VLImageProcessorFast` whichever class name
the checkpoint saved (`FORCE_FAST_IMAGE_PROCESSOR` promotes the slow one). It resizes the uint8
image with torchvision, which on CPU runs torch's native uint8 antialiased bicubic. The slow
processor (and transformers 5's `Qwen2VLImageProcessorPil`) uses PIL's bicubic instead. The two
differ by up to 2 grey levels on under 1% of pixels; `resize="torch"` (default) reproduces the
fast path, `resize="pil"` the slow one. Step 1 is PIL in both.

Deviation: normalisation is computed as (x/255 - mean)/std in fp32 for both paths (the fast
processor fuses it into (x - 255*mean)/(255*std)); the results differ by ~1e-7.
"""
import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
MAX_ASPECT = 200  # both smart_resize versions reject more elongated images

# Sa2VA's processor call limits (modeling_sa2va_qwen.py), the same for both families.
SA2VA_MIN_PIXELS = 512 * 28 * 28
SA2VA_MAX_PIXELS = 2048 * 28 * 28


@dataclass(frozen=True)
class QwenImageSpec:
    """The image processor settings of one Qwen-VL family (its preprocessor_config.json)."""
    patch_size: int
    merge_size: int = 2
    temporal_patch_size: int = 2
    mean: tuple[float, float, float] = CLIP_MEAN
    std: tuple[float, float, float] = CLIP_STD

    @property
    def factor(self) -> int:  # side of one merged token in pixels
        return self.patch_size * self.merge_size


QWEN2_5_VL = QwenImageSpec(patch_size=14)
QWEN3_VL = QwenImageSpec(patch_size=16, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))


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


def patchify(pixels: torch.Tensor, spec: QwenImageSpec) -> tuple[torch.Tensor, tuple[int, int, int]]:
    """Normalised still image (C, H, W) -> flattened patches (gh*gw, C*tp*p*p) and its grid (1, gh, gw).

    Patches are listed in 2x2 merge-block order (block row, block col, row in block, col in
    block); each patch is (C, tp, p, p) flattened, the image repeated tp times in time.
    """
    C, H, W = pixels.shape
    p, m, tp = spec.patch_size, spec.merge_size, spec.temporal_patch_size
    if H % spec.factor or W % spec.factor:
        raise ValueError(f"image {W}x{H} is not a multiple of {spec.factor}; resize it with smart_resize first")
    gh, gw = H // p, W // p
    x = pixels.view(C, gh // m, m, p, gw // m, m, p)
    x = x.permute(1, 4, 2, 5, 0, 3, 6)  # (gh/m, gw/m, m, m, C, p, p)
    x = x[:, :, :, :, :, None].expand(-1, -1, -1, -1, -1, tp, -1, -1)  # (..., C, tp, p, p)
    return x.reshape(gh * gw, C * tp * p * p), (1, gh, gw)


def process_image(image: Image.Image, spec: QwenImageSpec, min_pixels: int = SA2VA_MIN_PIXELS,
                  max_pixels: int = SA2VA_MAX_PIXELS, resize: str = "torch") -> tuple[torch.Tensor, tuple[int, int, int]]:
    """The image processor alone (step 2): RGB PIL image -> patches (L, C*tp*p*p) float32 and (1, gh, gw)."""
    x = torch.from_numpy(np.asarray(image.convert("RGB")).copy()).permute(2, 0, 1)  # (3, H, W) uint8
    h, w = smart_resize(x.shape[1], x.shape[2], spec.factor, min_pixels, max_pixels)
    x = resize_uint8(x, h, w, resize).float() / 255
    x = (x - torch.tensor(spec.mean)[:, None, None]) / torch.tensor(spec.std)[:, None, None]
    return patchify(x, spec)


def qwen_image_inputs(images: list[Image.Image], spec: QwenImageSpec, min_pixels: int = SA2VA_MIN_PIXELS,
                      max_pixels: int = SA2VA_MAX_PIXELS, resize: str = "torch") -> tuple[torch.Tensor, torch.Tensor]:
    """Sa2VA's full pipeline (fetch_image, then the processor) for images or video frames fed as images.

    Returns pixel_values (sum of L_i, C*tp*p*p) float32 and image_grid_thw (n_images, 3) long;
    image i takes gh*gw/merge**2 `<|image_pad|>` tokens.
    """
    if not images:
        raise ValueError("no images given; pass at least one PIL image")
    patches, grids = zip(*(process_image(fetch_image(im), spec, min_pixels, max_pixels, resize) for im in images))
    return torch.cat(patches), torch.tensor(grids, dtype=torch.long)


def qwen_rope_index(input_ids: torch.Tensor, image_grid_thw: torch.Tensor | None, image_token_id: int,
                    vision_start_token_id: int, spatial_merge_size: int = 2,
                    attention_mask: torch.Tensor | None = None,
                    image_temporal_stride: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """3-D mRoPE position ids (3, B, L) and per-row deltas (B, 1), as transformers 4.57 `get_rope_index`.

    Text tokens get t = h = w = a running index. An image with a (t, h, w) patch grid occupies
    t*(h/m)*(w/m) consecutive `image_token_id` tokens (right after a `vision_start` token); its
    merged token at (frame, row, col) gets t = s + stride*frame, h = s + row, w = s + col, where
    s is the next free index; text after it restarts at the image's largest index + 1. `image_temporal_stride` only matters
    for t > 1, which the processor never emits for images: 0 reproduces Qwen2.5-VL (a still image
    has zero seconds per grid), 1 Qwen3-VL. Images are consumed in order across the batch.
    Padding (attention_mask == 0) is skipped and gets position 1. delta = largest index + 1 -
    row length, so a token appended at absolute index i has position i + delta. (transformers 5
    finds images through mm_token_type_ids, pads with 0 and measures delta against the unpadded
    length; positions of real tokens are the same.)
    """
    B, L = input_ids.shape
    mask = torch.ones_like(input_ids, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
    grids = [] if image_grid_thw is None else image_grid_thw.tolist()
    position_ids = torch.ones(3, B, L, dtype=torch.long, device=input_ids.device)
    deltas, next_image = [], 0
    for b in range(B):
        ids = input_ids[b][mask[b]].tolist()
        if not ids:
            raise ValueError(f"row {b} of the batch is all padding; drop it before computing positions")
        pieces, start, pos = [], 0, 0  # start: next unread token, pos: next free position index
        n_images = sum(1 for i in range(len(ids) - 1) if ids[i] == vision_start_token_id and ids[i + 1] == image_token_id)
        for _ in range(n_images):
            if next_image >= len(grids):
                raise ValueError(f"the prompts hold more images than image_grid_thw ({len(grids)} rows); "
                                 "pass the grid of every image in prompt order")
            t, h, w = grids[next_image]
            next_image += 1
            gh, gw = h // spatial_merge_size, w // spatial_merge_size
            at = ids.index(image_token_id, start)
            end = at
            while end < len(ids) and ids[end] == image_token_id:
                end += 1
            n = t * gh * gw
            if end - at != n:
                raise ValueError(f"image {next_image - 1} of grid {(t, h, w)} needs {n} consecutive image tokens, "
                                 f"the prompt has {end - at}; build the prompt from image_grid_thw")
            pieces.append(torch.arange(at - start).expand(3, -1) + pos)
            pos += at - start
            tt, hh, ww = torch.meshgrid(torch.arange(t) * image_temporal_stride, torch.arange(gh), torch.arange(gw),
                                        indexing="ij")
            pieces.append(torch.stack([tt, hh, ww]).view(3, -1) + pos)
            pos = int(pieces[-1].max()) + 1
            start = at + n
        pieces.append(torch.arange(len(ids) - start).expand(3, -1) + pos)
        positions = torch.cat(pieces, dim=1)  # (3, n_unmasked)
        position_ids[:, b, mask[b]] = positions.to(position_ids.device)
        deltas.append(int(positions.max()) + 1 - L)
    if next_image != len(grids):
        raise ValueError(f"image_grid_thw has {len(grids)} rows but the prompts hold {next_image} images; "
                         "give one grid row per image")
    return position_ids, torch.tensor(deltas, device=input_ids.device)[:, None]
