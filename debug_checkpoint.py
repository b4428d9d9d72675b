"""Write tiny random-weight Sa2VA checkpoints in the official Hugging Face layout, and the self-check.

No real checkpoint can be downloaded in tests or CI, so the tests and `sa2va.py --self-check`
build stand-ins: the official file names, config fields and tensor keys, at debug sizes, with a
byte-level tokenizer that carries the family's special tokens. Random weights: the masks and
answers mean nothing; the plumbing is real.
"""
import json
import os
import tempfile
import time

import numpy as np
import torch
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

import convert
from model.checkpoint import build_model, write_safetensors
from model.config import Sa2VAConfig, debug_config

QWEN_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
QWEN_VL_SPECIALS = ["<|vision_start|>", "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>"]
INTERNVL_TOKENS = ["<img>", "</img>", "<IMG_CONTEXT>", "<quad>", "</quad>", "<ref>", "</ref>", "<box>", "</box>"]
SA2VA_TOKENS = ["[SEG]", "<p>", "</p>", "<vp>", "</vp>"]


def added_tokens(family: str) -> list[str]:
    """Special tokens after the 256 byte tokens, in the order the real tokenizers append them."""
    base = QWEN_SPECIALS + (QWEN_VL_SPECIALS if family != "internvl" else INTERNVL_TOKENS)
    return base + SA2VA_TOKENS


def write_tokenizer(dst: str, family: str, vocab_size: int | None = None, bpe: models.BPE | None = None):
    """A Qwen-style byte-level BPE, saved as an official tokenizer folder with the family's tokens.

    bpe: a trained byte-level BPE (world.py's); default one without merges. vocab_size pads the
    vocab with unreachable dummy tokens so that len(tokenizer), added tokens included, matches a
    real-shape embedding (benchmarks); None keeps the 256 bytes only.
    """
    if bpe is None:
        vocab = {c: i for i, c in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
        if vocab_size is not None:
            base = len(vocab)
            n_pad = vocab_size - base - len(added_tokens(family))
            if n_pad < 0:
                raise ValueError(f"vocab_size {vocab_size} is below the {base + len(added_tokens(family))} "
                                 "tokens a debug tokenizer needs")
            # Multi-character entries: a BPE without merges can never produce them.
            vocab.update({f"<|dummy_{i}|>": base + i for i in range(n_pad)})
        bpe = models.BPE(vocab=vocab, merges=[])
    tok = Tokenizer(bpe)
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in added_tokens(family)])
    os.makedirs(dst, exist_ok=True)
    tok.save(os.path.join(dst, "tokenizer.json"))
    ids = {t: tok.token_to_id(t) for t in added_tokens(family)}
    with open(os.path.join(dst, "added_tokens.json"), "w") as f:
        json.dump(ids, f)
    with open(os.path.join(dst, "tokenizer_config.json"), "w") as f:
        json.dump({"tokenizer_class": "Qwen2Tokenizer", "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>",
                   "bos_token": None, "model_max_length": 32768, "clean_up_tokenization_spaces": False,
                   "added_tokens_decoder": {str(i): {"content": t, "special": True, "lstrip": False, "rstrip": False,
                                                     "normalized": False, "single_word": False} for t, i in ids.items()}}, f)
    with open(os.path.join(dst, "special_tokens_map.json"), "w") as f:
        json.dump({"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"}, f)


def random_state(cfg: Sa2VAConfig, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random weights for `cfg` (our names): each module's default init, plus the position
    tables, which that init leaves at zero."""
    torch.manual_seed(seed)
    model = build_model(cfg, device="cpu")
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("pos_embed", "cls_token")):
                p.normal_(0, 0.02)
    return model.state_dict()


def write_official_checkpoint(dst: str, cfg: Sa2VAConfig, seed: int = 0, shards: int = 1) -> dict[str, torch.Tensor]:
    """Random weights for `cfg` written as an official Sa2VA folder; returns the official state dict."""
    official = convert.unapply_map(random_state(cfg, seed), convert.key_map(cfg), cfg.llm)
    os.makedirs(dst, exist_ok=True)
    keys = sorted(official)
    parts = [keys[i::shards] for i in range(shards)]
    if shards == 1:
        names = ["model.safetensors"]
    else:
        names = [f"model-{i + 1:05d}-of-{shards:05d}.safetensors" for i in range(shards)]
        with open(os.path.join(dst, "model.safetensors.index.json"), "w") as f:
            json.dump({"metadata": {}, "weight_map": {k: names[i] for i, part in enumerate(parts) for k in part}}, f)
    for name, part in zip(names, parts):
        write_safetensors(os.path.join(dst, name), [(k, official[k].dtype, tuple(official[k].shape)) for k in part],
                          ((k, official[k]) for k in part))
    with open(os.path.join(dst, "config.json"), "w") as f:
        json.dump(convert.config_to_official(cfg), f, indent=2)
    if cfg.family != "internvl":  # the Qwen-VL releases ship their image processor's settings
        with open(os.path.join(dst, "preprocessor_config.json"), "w") as f:
            json.dump(convert.preprocessor_to_official(cfg), f, indent=2)
    write_tokenizer(dst, cfg.family)
    return official


def debug_checkpoint(dst: str, family: str = "internvl", llm: str = "qwen2", shards: int = 1, seed: int = 0) -> Sa2VAConfig:
    cfg = debug_config(family, llm=llm)
    write_official_checkpoint(dst, cfg, seed=seed, shards=shards)
    return cfg


def self_check(api, family: str = "internvl"):
    """The main job until trained weights are at hand: a tiny random-weight checkpoint in the
    official layout is loaded with `api.from_pretrained` (the Sa2VA class; converted while
    loading), then chats and segments an image and an 8-frame video. Returns the video prediction."""
    print(f"self-check: a tiny RANDOM-weight Sa2VA ({family} family); its answers and masks are noise, the plumbing is real")
    with tempfile.TemporaryDirectory() as tmp:
        debug_checkpoint(tmp, family, shards=2)
        model = api.from_pretrained(tmp)
    yy, xx = np.mgrid[:240, :320]
    frames = [np.stack([(xx + 8 * t) % 256, yy % 256, np.full_like(xx, 128)], -1).astype(np.uint8) for t in range(8)]
    t0 = time.perf_counter()
    chat = model.predict(image=frames[0], text="<image>\nWhat is in the image?", max_new_tokens=16)
    print(f"  chat ({time.perf_counter() - t0:.2f}s): {chat.text!r}")
    t0 = time.perf_counter()
    img = model.predict(image=frames[0], text="<image>\nPlease segment the stripes.", answer="Sure, [SEG].")
    if len(img.masks) != 1 or img.masks[0].shape != (1, 240, 320):
        raise RuntimeError(f"self-check failed: image masks {[m.shape for m in img.masks]}, expected one (1, 240, 320)")
    print(f"  image ({time.perf_counter() - t0:.2f}s): {len(img.masks)} mask of shape {img.masks[0].shape}")
    t0 = time.perf_counter()
    vid = model.predict(video=frames, text="<image>\nPlease segment both stripes.", answer="<p>one</p> [SEG] and <p>two</p> [SEG].")
    if len(vid.masks) != 2 or any(m.shape != (8, 240, 320) for m in vid.masks):
        raise RuntimeError(f"self-check failed: video masks {[m.shape for m in vid.masks]}, expected two (8, 240, 320)")
    print(f"  video ({time.perf_counter() - t0:.2f}s): {len(vid.masks)} objects {vid.phrases}, masks {vid.masks[0].shape}")
    print("self-check passed")
    return vid
