"""Inputs to Sa2VA: images and videos, their preprocessing, and the prompt text.

Reproduces the official inference preprocessing (inference.md §2-4, §9):
  * InternVL dynamic tiling (1-12 tiles of 448 px + a thumbnail, the reference tie-break),
    PIL bicubic resizes, ImageNet normalisation;
  * the chat templates named by `config.template` and the `<img><IMG_CONTEXT>*N</img>` string.
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
