"""Convert an official Sa2VA Hugging Face checkpoint into ours, or ours back into it.

    python convert.py SRC DST [--dtype bf16]      # official HF folder -> our folder
    python convert.py SRC DST --to-official       # our folder -> official HF layout

The mapping is literal tables with a `{}` layer placeholder, plus named transforms:
  * unpack_wqkv / pack_wqkv: InternLM2 stores q, k and v in one `wqkv` matrix, grouped per KV
    head as [its queries, key, value] (modeling_internlm2.py: `InternLM2Attention.forward`'s
    rearrange); we keep three projections.
  * SAM-2's ConvNeXt LayerScale is `gamma` in Meta's code and `g_weight` in the HF files.
Every official key must be mapped and every model key produced; anything else is an error
naming the keys. Tensors stream one at a time, so peak memory stays near the largest tensor
of the largest shard rather than the model. `load_official` streams the same way straight into
a model (what `Sa2VA.from_pretrained` does with an official folder).
"""
import dataclasses
import json
import os
import re
import shutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from torch import nn

import data
from cli import arg, check_output_folder, output_folder, parse, run
from model.checkpoint import SafetensorsReader, check_keys, load_tensors, model_shapes, parse_dtype, write_safetensors
from model.config import (SAM2_HIERA_L, InternViTConfig, LLMConfig, Qwen25VisionConfig, Qwen3VisionConfig, SAM2Config,
                          Sa2VAConfig)
from model.sa2va import Sa2VAModel
from model.tokenizer import Tokenizer, load_official_tokenizer

SAM2_OFFICIAL, SAM2_OURS = "grounding_encoder.sam2_model.", "grounding.sam2."
QWEN_VISUAL = "model.model.visual."

INTERNVIT = {
    "vision_model.embeddings.class_embedding": "vision.vit.cls_token",
    "vision_model.embeddings.position_embedding": "vision.vit.pos_embed",
    "vision_model.embeddings.patch_embedding.weight": "vision.vit.patch_embed.weight",
    "vision_model.embeddings.patch_embedding.bias": "vision.vit.patch_embed.bias",
    "vision_model.encoder.layers.{}.ls1": "vision.vit.blocks.{}.ls1",
    "vision_model.encoder.layers.{}.ls2": "vision.vit.blocks.{}.ls2",
    "vision_model.encoder.layers.{}.attn.qkv.weight": "vision.vit.blocks.{}.attn.qkv.weight",
    "vision_model.encoder.layers.{}.attn.qkv.bias": "vision.vit.blocks.{}.attn.qkv.bias",
    "vision_model.encoder.layers.{}.attn.q_norm.weight": "vision.vit.blocks.{}.attn.q_norm.weight",
    "vision_model.encoder.layers.{}.attn.k_norm.weight": "vision.vit.blocks.{}.attn.k_norm.weight",
    "vision_model.encoder.layers.{}.attn.proj.weight": "vision.vit.blocks.{}.attn.proj.weight",
    "vision_model.encoder.layers.{}.attn.proj.bias": "vision.vit.blocks.{}.attn.proj.bias",
    "vision_model.encoder.layers.{}.mlp.fc1.weight": "vision.vit.blocks.{}.fc1.weight",
    "vision_model.encoder.layers.{}.mlp.fc1.bias": "vision.vit.blocks.{}.fc1.bias",
    "vision_model.encoder.layers.{}.mlp.fc2.weight": "vision.vit.blocks.{}.fc2.weight",
    "vision_model.encoder.layers.{}.mlp.fc2.bias": "vision.vit.blocks.{}.fc2.bias",
    "vision_model.encoder.layers.{}.norm1.weight": "vision.vit.blocks.{}.norm1.weight",
    "vision_model.encoder.layers.{}.norm1.bias": "vision.vit.blocks.{}.norm1.bias",
    "vision_model.encoder.layers.{}.norm2.weight": "vision.vit.blocks.{}.norm2.weight",
    "vision_model.encoder.layers.{}.norm2.bias": "vision.vit.blocks.{}.norm2.bias",
    "mlp1.0.weight": "vision.projector.norm.weight",
    "mlp1.0.bias": "vision.projector.norm.bias",
    "mlp1.1.weight": "vision.projector.fc1.weight",
    "mlp1.1.bias": "vision.projector.fc1.bias",
    "mlp1.3.weight": "vision.projector.fc2.weight",
    "mlp1.3.bias": "vision.projector.fc2.bias",
}

# Qwen2/Qwen2.5/Qwen3 decoders, relative to the LLM prefix.
QWEN_LLM = {
    "embed_tokens.weight": "llm.embed_tokens.weight",
    "layers.{}.self_attn.q_proj.weight": "llm.layers.{}.attn.q_proj.weight",
    "layers.{}.self_attn.q_proj.bias": "llm.layers.{}.attn.q_proj.bias",
    "layers.{}.self_attn.k_proj.weight": "llm.layers.{}.attn.k_proj.weight",
    "layers.{}.self_attn.k_proj.bias": "llm.layers.{}.attn.k_proj.bias",
    "layers.{}.self_attn.v_proj.weight": "llm.layers.{}.attn.v_proj.weight",
    "layers.{}.self_attn.v_proj.bias": "llm.layers.{}.attn.v_proj.bias",
    "layers.{}.self_attn.o_proj.weight": "llm.layers.{}.attn.o_proj.weight",
    "layers.{}.self_attn.q_norm.weight": "llm.layers.{}.attn.q_norm.weight",
    "layers.{}.self_attn.k_norm.weight": "llm.layers.{}.attn.k_norm.weight",
    "layers.{}.mlp.gate_proj.weight": "llm.layers.{}.mlp.gate_proj.weight",
    "layers.{}.mlp.up_proj.weight": "llm.layers.{}.mlp.up_proj.weight",
    "layers.{}.mlp.down_proj.weight": "llm.layers.{}.mlp.down_proj.weight",
    "layers.{}.input_layernorm.weight": "llm.layers.{}.attn_norm.weight",
    "layers.{}.post_attention_layernorm.weight": "llm.layers.{}.mlp_norm.weight",
    "norm.weight": "llm.norm.weight",
}

INTERNLM2_LLM = {
    "tok_embeddings.weight": "llm.embed_tokens.weight",
    "layers.{}.attention.wqkv.weight": ("unpack_wqkv", "llm.layers.{}.attn.q_proj.weight",
                                        "llm.layers.{}.attn.k_proj.weight", "llm.layers.{}.attn.v_proj.weight"),
    "layers.{}.attention.wo.weight": "llm.layers.{}.attn.o_proj.weight",
    "layers.{}.feed_forward.w1.weight": "llm.layers.{}.mlp.gate_proj.weight",
    "layers.{}.feed_forward.w3.weight": "llm.layers.{}.mlp.up_proj.weight",
    "layers.{}.feed_forward.w2.weight": "llm.layers.{}.mlp.down_proj.weight",
    "layers.{}.attention_norm.weight": "llm.layers.{}.attn_norm.weight",
    "layers.{}.ffn_norm.weight": "llm.layers.{}.mlp_norm.weight",
    "norm.weight": "llm.norm.weight",
}

HEADS = {
    "text_hidden_fcs.0.weight": "text_hidden_fcs.0.weight",
    "text_hidden_fcs.0.bias": "text_hidden_fcs.0.bias",
    "text_hidden_fcs.2.weight": "text_hidden_fcs.2.weight",
    "text_hidden_fcs.2.bias": "text_hidden_fcs.2.bias",
}


# ----------------------------------------------------------------------------- transforms

def unpack_wqkv(w: torch.Tensor, cfg: LLMConfig) -> list[torch.Tensor]:
    """InternLM2 wqkv ((H + 2 KV) hd, D), rows grouped per KV head as [G queries, key, value]."""
    G, hd = cfg.n_heads // cfg.n_kv_heads, cfg.head_dim
    w = w.view(cfg.n_kv_heads, G + 2, hd, w.shape[-1])  # (KV, G+2, hd, D)
    return [w[:, :G].reshape(-1, w.shape[-1]), w[:, G].reshape(-1, w.shape[-1]), w[:, G + 1].reshape(-1, w.shape[-1])]


def pack_wqkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cfg: LLMConfig) -> torch.Tensor:
    G, hd, D = cfg.n_heads // cfg.n_kv_heads, cfg.head_dim, q.shape[-1]
    q = q.view(cfg.n_kv_heads, G, hd, D)
    k, v = k.view(cfg.n_kv_heads, 1, hd, D), v.view(cfg.n_kv_heads, 1, hd, D)
    return torch.cat([q, k, v], dim=1).reshape(-1, D)  # (KV (G+2) hd, D)


UNPACK = {"unpack_wqkv": unpack_wqkv}
PACK = {"unpack_wqkv": pack_wqkv}


# ----------------------------------------------------------------------------- configs

LLM_ARCHITECTURES = {"Qwen2ForCausalLM": "qwen2", "InternLM2ForCausalLM": "internlm2"}
_REQUIRED = object()
_KIND_NAMES = {int: "a whole number", float: "a number", bool: "true or false", str: "a string",
               tuple: "a list of whole numbers", list: "a list", dict: "a JSON object"}


class _Section:
    """Typed reads from one part of an official config.json: a missing or mistyped field is a
    one-line error naming it (the file can come from anywhere)."""

    def __init__(self, d, where: str):
        if not isinstance(d, dict):
            raise ValueError(f"config.json: {where or 'the file'} is not a JSON object; is this a Sa2VA config.json?")
        self.d, self.where = d, where

    def __contains__(self, key: str) -> bool:
        return self.d.get(key) is not None

    def __call__(self, key: str, kind: type, default=_REQUIRED):
        name = f"{self.where}.{key}" if self.where else key
        value = self.d.get(key)
        if value is None:
            if default is _REQUIRED:
                raise ValueError(f"config.json has no {name}; is it the config.json of a Sa2VA release?")
            return default
        number = isinstance(value, (int, float)) and not isinstance(value, bool)
        if kind is float and number:
            return float(value)
        if kind is tuple and isinstance(value, (list, tuple)) and all(isinstance(x, int) and not isinstance(x, bool) for x in value):
            return tuple(value)
        if kind is int and number and float(value).is_integer():
            return int(value)
        if kind not in (float, tuple, int) and isinstance(value, kind):
            return value
        raise ValueError(f"config.json: {name} is {value!r}; expected {_KIND_NAMES[kind]}")

    def section(self, key: str) -> "_Section":
        return _Section(self(key, dict), f"{self.where}.{key}" if self.where else key)


def config_from_official(hf: dict, *, image_token_id: int, seg_token_id: int, system_prompt: str = "",
                         pixel_stats: tuple | None = None) -> Sa2VAConfig:
    """Our config from an official Sa2VA config.json and the ids of its tokenizer.

    The release hard-codes SAM-2 Hiera-L and its config.json does not describe it; a
    `sam2_config` entry (written by our --to-official and test checkpoints for other sizes)
    overrides it. pixel_stats: (mean, std) of a Qwen-VL preprocessor_config.json.
    """
    top = _Section(hf, "")
    sam2 = SAM2_HIERA_L
    if "sam2_config" in top:
        try:
            sam2 = SAM2Config(**top("sam2_config", dict))
        except TypeError as e:
            raise ValueError(f"config.json: sam2_config does not describe a SAM-2 of this version ({e})") from None
    ids = dict(image_token_id=image_token_id, seg_token_id=seg_token_id)
    if "llm_config" in top and "vision_config" in top:
        return _internvl_config(top, sam2, ids)
    if "text_config" in top and "vision_config" in top:
        return _qwen_vl_config(top, sam2, ids, system_prompt, pixel_stats)
    raise ValueError(f"config.json names an unknown architecture {hf.get('architectures')}; expected a Sa2VA config "
                     "with llm_config (InternVL family) or text_config (Qwen-VL family)")


def _internvl_config(hf: _Section, sam2: SAM2Config, ids: dict) -> Sa2VAConfig:
    v, lm = hf.section("vision_config"), hf.section("llm_config")
    if hf("ps_version", str, "v2") != "v2":
        raise ValueError(f"config.json: ps_version {hf('ps_version', str)!r} is not supported; Sa2VA checkpoints use 'v2'")
    vision = InternViTConfig(hidden_size=v("hidden_size", int), n_layers=v("num_hidden_layers", int),
                             n_heads=v("num_attention_heads", int), intermediate_size=v("intermediate_size", int),
                             image_size=hf("force_image_size", int, None) or v("image_size", int),
                             patch_size=v("patch_size", int), qkv_bias=v("qkv_bias", bool, True),
                             qk_norm=v("qk_normalization", bool, False), norm_type=v("norm_type", str, "layer_norm"),
                             norm_eps=v("layer_norm_eps", float, 1e-6), downsample_ratio=hf("downsample_ratio", float, 0.5))
    names = lm("architectures", list, ["?"])
    name = names[0] if names else "?"
    if name not in LLM_ARCHITECTURES:
        raise ValueError(f"unknown LLM architecture {name!r} in llm_config; supported: {', '.join(LLM_ARCHITECTURES)}")
    arch = LLM_ARCHITECTURES[name]
    heads = lm("num_attention_heads", int)
    common = dict(vocab_size=lm("vocab_size", int), dim=lm("hidden_size", int), n_layers=lm("num_hidden_layers", int),
                  n_heads=heads, n_kv_heads=lm("num_key_value_heads", int, heads),
                  intermediate_size=lm("intermediate_size", int), norm_eps=lm("rms_norm_eps", float, 1e-6),
                  rope_theta=lm("rope_theta", float, 10000.0),
                  max_position_embeddings=lm("max_position_embeddings", int, 32768),
                  tie_embeddings=lm("tie_word_embeddings", bool, False), arch=arch)
    if arch == "qwen2":
        llm = LLMConfig(**common, qkv_bias=True)
    else:
        scaling = lm.section("rope_scaling") if "rope_scaling" in lm else _Section({}, "llm_config.rope_scaling")
        kind = scaling("type", str, None) or scaling("rope_type", str, None)
        if kind not in (None, "dynamic"):
            raise ValueError(f"InternLM2 rope_scaling type {kind!r} is not supported; only 'dynamic' is")
        if lm("bias", bool, False):
            raise ValueError("InternLM2 with bias=true is not supported; no Sa2VA checkpoint uses it")
        llm = LLMConfig(**common, rope_dynamic_factor=scaling("factor", float, 0.0) if kind else 0.0)
    return Sa2VAConfig("internvl", vision, llm, sam2, hf("template", str, "qwen_chat"), **ids)


def _qwen_vl_family(v: _Section) -> str:
    kind = v("model_type", str, "")
    if kind.startswith("qwen3_vl") or "deepstack_visual_indexes" in v:
        return "qwen3_vl"
    if kind.startswith("qwen2_5_vl") or "fullatt_block_indexes" in v:
        return "qwen2_5_vl"
    raise ValueError(f"unknown vision architecture {kind!r} in vision_config; supported: qwen2_5_vl, qwen3_vl")


def _qwen_vl_config(hf: _Section, sam2: SAM2Config, ids: dict, system_prompt: str, pixel_stats) -> Sa2VAConfig:
    v, t = hf.section("vision_config"), hf.section("text_config")
    family = _qwen_vl_family(v)
    common = dict(depth=v("depth", int), hidden_size=v("hidden_size", int), num_heads=v("num_heads", int),
                  intermediate_size=v("intermediate_size", int), out_hidden_size=v("out_hidden_size", int),
                  patch_size=v("patch_size", int), temporal_patch_size=v("temporal_patch_size", int, 2),
                  spatial_merge_size=v("spatial_merge_size", int, 2))
    if pixel_stats is not None:
        common.update(pixel_mean=tuple(pixel_stats[0]), pixel_std=tuple(pixel_stats[1]))
    if family == "qwen2_5_vl":
        vision = Qwen25VisionConfig(**common, window_size=v("window_size", int, 112),
                                    fullatt_block_indexes=v("fullatt_block_indexes", tuple))
    else:
        vision = Qwen3VisionConfig(**common, num_position_embeddings=v("num_position_embeddings", int),
                                   deepstack_visual_indexes=v("deepstack_visual_indexes", tuple))
    rope_key = "rope_scaling" if "rope_scaling" in t else "rope_parameters"
    rope = t.section(rope_key) if rope_key in t else _Section({}, "text_config.rope_scaling")
    if "mrope_section" not in rope:
        raise ValueError("config.json: text_config.rope_scaling has no mrope_section; is this a Qwen-VL checkpoint?")
    head_dim = t("head_dim", int, None) or t("hidden_size", int) // t("num_attention_heads", int)
    qwen3 = family == "qwen3_vl"
    llm = LLMConfig(vocab_size=t("vocab_size", int), dim=t("hidden_size", int), n_layers=t("num_hidden_layers", int),
                    n_heads=t("num_attention_heads", int), n_kv_heads=t("num_key_value_heads", int),
                    intermediate_size=t("intermediate_size", int), head_dim=head_dim,
                    norm_eps=t("rms_norm_eps", float, 1e-6),
                    rope_theta=t("rope_theta", float, None) or rope("rope_theta", float, 1e6),
                    max_position_embeddings=t("max_position_embeddings", int, 128000),
                    mrope_section=rope("mrope_section", tuple), mrope_interleaved=rope("mrope_interleaved", bool, qwen3),
                    qkv_bias=not qwen3, qk_norm=qwen3, tie_embeddings=False, arch="qwen3" if qwen3 else "qwen2")
    # The released Sa2VA-Qwen3-VL reads [SEG] before the final norm (its transformers 4.57
    # hidden_states[-1] is the last layer's output); Sa2VA-Qwen2.5-VL after it.
    return Sa2VAConfig(family, vision, llm, sam2, hf("template", str, "qwen_chat"), system_prompt,
                       seg_hidden_prenorm=qwen3, **ids)


def config_to_official(cfg: Sa2VAConfig) -> dict:
    """The official config.json fields our converter reads, for a config of ours."""
    if not cfg.video_memory or (cfg.family == "internvl" and cfg.vision.max_tiles != 12):
        raise ValueError("this model tiles images to at most "
                         f"{cfg.vision.max_tiles if cfg.family == 'internvl' else 12} tiles or decodes video frames "
                         "without SAM-2 memory, which the official code cannot express; keep it in our format")
    official = _qwen_vl_config_to_official(cfg) if cfg.family != "internvl" else _internvl_config_to_official(cfg)
    if cfg.sam2 is not None and cfg.sam2 != SAM2_HIERA_L:  # releases are Hiera-L; say which SAM-2 any other has
        official["sam2_config"] = dataclasses.asdict(cfg.sam2)
    return official


def _internvl_config_to_official(cfg: Sa2VAConfig) -> dict:
    v, lm = cfg.vision, cfg.llm
    llm = dict(vocab_size=lm.vocab_size, hidden_size=lm.dim, num_hidden_layers=lm.n_layers, num_attention_heads=lm.n_heads,
               num_key_value_heads=lm.n_kv_heads, intermediate_size=lm.intermediate_size, rms_norm_eps=lm.norm_eps,
               rope_theta=lm.rope_theta, max_position_embeddings=lm.max_position_embeddings,
               tie_word_embeddings=lm.tie_embeddings)
    if lm.arch == "internlm2":
        llm.update(architectures=["InternLM2ForCausalLM"], model_type="internlm2", bias=False,
                   rope_scaling={"type": "dynamic", "factor": lm.rope_dynamic_factor} if lm.rope_dynamic_factor else None)
    else:
        llm.update(architectures=["Qwen2ForCausalLM"], model_type="qwen2")
    return {
        "architectures": ["Sa2VAChatModel"], "model_type": "sa2va_chat", "template": cfg.template,
        "downsample_ratio": v.downsample_ratio, "force_image_size": v.image_size, "ps_version": "v2", "select_layer": -1,
        "hidden_size": lm.dim, "tie_word_embeddings": False,
        "vision_config": dict(architectures=["InternVisionModel"], model_type="intern_vit_6b", hidden_size=v.hidden_size,
                              num_hidden_layers=v.n_layers, num_attention_heads=v.n_heads,
                              intermediate_size=v.intermediate_size, image_size=v.image_size, patch_size=v.patch_size,
                              qkv_bias=v.qkv_bias, qk_normalization=v.qk_norm, norm_type=v.norm_type,
                              layer_norm_eps=v.norm_eps, hidden_act="gelu"),
        "llm_config": llm,
    }


def _qwen_vl_config_to_official(cfg: Sa2VAConfig) -> dict:
    v, lm = dataclasses.asdict(cfg.vision), cfg.llm
    for ours in ("pixel_mean", "pixel_std", "image_temporal_stride"):  # the processor's, not the config's
        v.pop(ours)
    v["model_type"] = cfg.family
    text = dict(model_type=cfg.family + "_text", vocab_size=lm.vocab_size, hidden_size=lm.dim,
                num_hidden_layers=lm.n_layers, num_attention_heads=lm.n_heads, num_key_value_heads=lm.n_kv_heads,
                intermediate_size=lm.intermediate_size, head_dim=lm.head_dim, rms_norm_eps=lm.norm_eps,
                rope_theta=lm.rope_theta, max_position_embeddings=lm.max_position_embeddings, tie_word_embeddings=False,
                rope_scaling={"rope_type": "default", "mrope_section": list(lm.mrope_section),
                              **({"mrope_interleaved": True} if lm.mrope_interleaved else {})})
    return {"architectures": ["Sa2VAChatModelQwen"], "model_type": "sa2va_chat", "template": cfg.template,
            "tie_word_embeddings": False, "image_token_id": cfg.image_token_id, "vision_config": v, "text_config": text}


def preprocessor_to_official(cfg: Sa2VAConfig) -> dict:
    """The image-processor settings (preprocessor_config.json) of a Qwen-VL config of ours."""
    v = cfg.vision
    return {"image_processor_type": "Qwen2VLImageProcessor", "patch_size": v.patch_size,
            "merge_size": v.spatial_merge_size, "temporal_patch_size": v.temporal_patch_size,
            "image_mean": list(v.pixel_mean), "image_std": list(v.pixel_std)}


# ----------------------------------------------------------------------------- key map

def expand(table: dict, n_layers: dict[str, int], ours) -> dict[str, tuple[str | None, tuple[str, ...]]]:
    """Expand a `{}` table into official key -> (transform or None, our keys) for every layer.

    n_layers maps the first component of our key ('vision', 'llm') to its layer count. Entries
    whose targets the model lacks (biases, qk-norms of other variants) are dropped.
    """
    out = {}
    for off, spec in table.items():
        transform, targets = (spec[0], spec[1:]) if isinstance(spec, tuple) else (None, (spec,))
        layers = range(n_layers[targets[0].split(".")[0]]) if "{}" in off else [None]
        for i in layers:
            tk = tuple(t.format(i) if i is not None else t for t in targets)
            if all(t in ours for t in tk):
                out[off.format(i) if i is not None else off] = (transform, tk)
    return out


def key_map(cfg: Sa2VAConfig, ours: dict[str, tuple] | None = None) -> dict[str, tuple[str | None, tuple[str, ...]]]:
    """official key -> (transform or None, our keys) for a whole Sa2VA model of this config.

    ours: the model's key -> shape (model_shapes(cfg)), when the caller has it already.
    """
    ours = ours or model_shapes(cfg)
    if cfg.family != "internvl":
        table = {"model.model.language_model." + k: v for k, v in QWEN_LLM.items()}
        table["model.lm_head.weight"] = "llm.lm_head.weight"
        table.update(HEADS)
        out = expand(table, {"llm": cfg.llm.n_layers}, ours)
        # The Qwen towers keep the official parameter names under `vision.`.
        out.update({QWEN_VISUAL + k[len("vision."):]: (None, (k,)) for k in ours if k.startswith("vision.")})
        return _with_sam2(out, ours)
    internlm2 = cfg.llm.arch == "internlm2"
    table = dict(INTERNVIT)
    table.update({"language_model.model." + k: v for k, v in (INTERNLM2_LLM if internlm2 else QWEN_LLM).items()})
    table["language_model.output.weight" if internlm2 else "language_model.lm_head.weight"] = "llm.lm_head.weight"
    table.update(HEADS)
    out = expand(table, {"vision": cfg.vision.n_layers, "llm": cfg.llm.n_layers}, ours)
    return _with_sam2(out, ours)


def _with_sam2(out: dict, ours: dict) -> dict:
    for k in ours:
        if k.startswith(SAM2_OURS):
            out[SAM2_OFFICIAL + k[len(SAM2_OURS):].replace(".gamma", ".g_weight")] = (None, (k,))
    produced = {t for _, tk in out.values() for t in tk}
    check_keys({k: () for k in ours}, {k: () for k in produced}, "key map does not cover the model (a bug in convert.py)")
    return out


def apply_map(official: dict[str, torch.Tensor], kmap: dict, llm_cfg: LLMConfig) -> dict[str, torch.Tensor]:
    """In-memory conversion of a whole official state dict (tests, small models)."""
    check_keys({k: () for k in kmap}, {k: () for k in official}, "official keys")
    out = {}
    for k, (transform, targets) in kmap.items():
        outs = UNPACK[transform](official[k], llm_cfg) if transform else [official[k]]
        out.update(zip(targets, outs))
    return out


def official_shapes(cfg: Sa2VAConfig, kmap: dict | None = None) -> dict[str, tuple]:
    """Shape of every official tensor for this config (meta tensors: no memory, no download)."""
    ours = model_shapes(cfg)
    out = {}
    for off, (transform, targets) in (kmap or key_map(cfg, ours)).items():
        shape = ours[targets[0]]
        out[off] = (sum(ours[t][0] for t in targets), *shape[1:]) if transform else shape
    return out


def unapply_map(ours: dict[str, torch.Tensor], kmap: dict, llm_cfg: LLMConfig) -> dict[str, torch.Tensor]:
    """In-memory inverse of apply_map: our state dict -> the official one."""
    return {off: PACK[transform](*(ours[t] for t in targets), llm_cfg) if transform else ours[targets[0]]
            for off, (transform, targets) in kmap.items()}


# ----------------------------------------------------------------------------- official -> ours

def _official_shards(src: str) -> dict[str, str]:
    """official key -> shard path, from model.safetensors.index.json or the single file."""
    index = os.path.join(src, "model.safetensors.index.json")
    if os.path.isfile(index):
        with open(index) as f:
            try:
                weight_map = json.load(f).get("weight_map")
            except (json.JSONDecodeError, AttributeError, UnicodeDecodeError) as e:
                raise ValueError(f"{index} is not a JSON index ({e}); re-download it") from None
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise ValueError(f"{index} has no weight_map of tensor -> shard file; re-download it")
        return {k: os.path.join(src, v) for k, v in weight_map.items()}
    single = os.path.join(src, "model.safetensors")
    if not os.path.isfile(single):
        raise ValueError(f"{src} has neither model.safetensors nor model.safetensors.index.json")
    return {k: single for k in SafetensorsReader(single).keys()}


def is_official(path: str) -> bool:
    """Whether a folder holds an official Sa2VA checkpoint (rather than one of ours)."""
    cfg_path = os.path.join(path, "config.json")
    if not os.path.isfile(cfg_path):
        return False
    with open(cfg_path) as f:
        try:
            d = json.load(f)
        except json.JSONDecodeError:
            return False
    return isinstance(d, dict) and "family" not in d and ("llm_config" in d or "text_config" in d)


def official_config(src: str, tokenizer: Tokenizer) -> Sa2VAConfig:
    """Our config of an official folder: config.json, plus what only its other files say (the
    tokenizer's ids, the chat template's system turn, the image processor's mean/std)."""
    cfg_path = os.path.join(src, "config.json")
    if not os.path.isfile(cfg_path):
        raise ValueError(f"{src} has no config.json; give the folder of an official Sa2VA checkpoint")
    with open(cfg_path) as f:
        try:
            hf = json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"{cfg_path} is not valid JSON ({e})") from None
    return official_config_from(hf, src, tokenizer)


def official_config_from(hf: dict, src: str, tokenizer: Tokenizer) -> Sa2VAConfig:
    """official_config for a config.json already read (from the folder src)."""
    qwen = isinstance(hf, dict) and "text_config" in hf
    image_token = data.image_token("qwen2_5_vl" if qwen else "internvl")
    stats = None
    if qwen and os.path.isfile(os.path.join(src, "preprocessor_config.json")):
        with open(os.path.join(src, "preprocessor_config.json")) as f:
            pre = json.load(f)
        stats = (pre["image_mean"], pre["image_std"])
    return config_from_official(hf, image_token_id=tokenizer.token_to_id(image_token),
                                seg_token_id=tokenizer.token_to_id(data.SEG),
                                system_prompt=qwen_default_system_prompt(src) if qwen else "", pixel_stats=stats)


def read_official(src: str, dtype: torch.dtype | None = None) -> tuple[Sa2VAConfig, Tokenizer, list, Iterator]:
    """Open an official folder: (our config, tokenizer, [(our key, dtype, shape)], a generator of
    (our key, tensor) in that order). Everything but the values is checked before the first tensor
    is read; the generator streams one tensor at a time, cast to dtype (floating ones) if given,
    and fails at the end naming every tensor that holds NaN or inf."""
    if not os.path.isdir(src):
        raise ValueError(f"{src} is not a folder; give the folder of an official Sa2VA checkpoint")
    tokenizer = load_official_tokenizer(src)  # before any output is written: fail early
    missing = [t for t in (*data.SA2VA_TOKENS, data.IMG_CONTEXT) if tokenizer.token_id_or_none(t) is None]
    if tokenizer.token_id_or_none(data.QWEN_IMAGE_PAD) is not None:  # a Qwen-VL tokenizer has no InternVL tokens
        missing = [t for t in missing if t != data.IMG_CONTEXT]
    if missing:
        raise ValueError(f"{src}: the tokenizer has no {', '.join(missing)}; a Sa2VA checkpoint adds them to its "
                         "base model's tokenizer (a base MLLM trains with train.py --sam2 SAM2_CHECKPOINT)")
    cfg = official_config(src, tokenizer)
    if len(tokenizer) != cfg.llm.vocab_size:
        raise ValueError(f"{src}: the tokenizer has {len(tokenizer)} tokens but the config says vocab_size="
                         f"{cfg.llm.vocab_size}; the folder mixes files of different checkpoints")
    where = _official_shards(src)
    shards = sorted(set(where.values()))
    handles = {p: SafetensorsReader(p) for p in shards}
    for p, h in handles.items():
        missing = {k for k, s in where.items() if s == p} - set(h.keys())
        if missing:
            raise ValueError(f"{p} lacks {len(missing)} tensors its index lists, e.g. {sorted(missing)[0]}; the shard is incomplete")
    # Without an LM head the embeddings are tied (the loader rule of convert_to_hf's output):
    # a stored head is always untied, a missing one needs tie_word_embeddings.
    head = {"internvl": "language_model.output.weight" if cfg.llm.arch == "internlm2" else "language_model.lm_head.weight"
            }.get(cfg.family, "model.lm_head.weight")
    if head in where:
        cfg = dataclasses.replace(cfg, llm=dataclasses.replace(cfg.llm, tie_embeddings=False))
    elif not cfg.llm.tie_embeddings:
        raise ValueError(f"{src}: {head} is missing and llm_config.tie_word_embeddings is false; the checkpoint is incomplete")
    ours = model_shapes(cfg)
    kmap = key_map(cfg, ours)
    check_keys({k: () for k in kmap}, {k: () for k in where}, f"{src}: official keys")

    plan = []  # (official key, transform, our keys), in shard order
    specs = []
    for p in shards:
        for k in sorted(k for k, s in where.items() if s == p):
            transform, targets = kmap[k]
            plan.append((k, transform, targets))
            src_dtype, src_shape = handles[p].dtype(k), handles[p].shape(k)
            if not src_dtype.is_floating_point:
                raise ValueError(f"{p}: {k} is {str(src_dtype).removeprefix('torch.')}, not a float tensor; "
                                 "the checkpoint is damaged or not a Sa2VA release")
            out_dtype = dtype if dtype is not None else src_dtype
            for t in targets:
                specs.append((t, out_dtype, ours[t]))
            if transform is None and src_shape != ours[targets[0]]:
                raise ValueError(f"{k} has shape {src_shape} but config.json implies {ours[targets[0]]}")

    def tensors():
        broken = []
        for k, transform, targets in plan:
            t = handles[where[k]].read(k)
            if not bool(torch.isfinite(t).all()):
                broken.append(k)
            outs = UNPACK[transform](t, cfg.llm) if transform else [t]
            del t
            for name in targets:
                o = outs.pop(0)
                if tuple(o.shape) != ours[name]:
                    raise ValueError(f"{k} gives {name} of shape {tuple(o.shape)}, the config implies {ours[name]}")
                if dtype is not None:
                    o = o.to(dtype)
                yield name, o
                del o  # hold one tensor at a time (the consumer drops its reference too)
        if broken:
            raise ValueError(f"{src}: {len(broken)} tensor(s) hold NaN or inf: {', '.join(broken[:5])}"
                             f"{' ...' if len(broken) > 5 else ''}; the checkpoint is damaged, re-download it")

    return cfg, tokenizer, specs, tensors()


def convert(src: str, dst: str, dtype: torch.dtype | None = None) -> Sa2VAConfig:
    """Official HF folder -> our folder (streamed, one tensor at a time). DST must be new or
    empty; it appears only once complete (cli.output_folder)."""
    check_output_folder(dst, "DST", not_inside=(src,))
    cfg, tokenizer, specs, tensors = read_official(src, dtype)
    with output_folder(dst) as tmp:
        write_safetensors(os.path.join(tmp, "model.safetensors"), specs, tensors)
        cfg.save(os.path.join(tmp, "config.json"))
        tokenizer.save(tmp)
    return cfg


def load_official(src: str, device="cpu", dtype: torch.dtype | None = None) -> tuple[Sa2VAModel, Tokenizer]:
    """An official folder straight into a model (converted while streaming; nothing written)."""
    cfg, tokenizer, _, tensors = read_official(src)
    return load_tensors(cfg, tensors, device, dtype, src), tokenizer


# A base MLLM's LLM architecture -> the xtuner template Sa2VA trains it with (projects/sa2va/configs).
BASE_TEMPLATES = {"qwen2": "qwen_chat", "internlm2": "internlm2_chat", "qwen3": "qwen_chat"}


def read_base(src: str, sam2_path: str, template: str | None = None,
              seed: int = 0) -> tuple[Sa2VAConfig, Tokenizer, Callable[[], dict[str, torch.Tensor]]]:
    """The start of a Sa2VA training from its parts: a base MLLM folder (InternVL as OpenGVLab
    ships it, or Qwen2.5-VL / Qwen3-VL saved by transformers >= 4.52) and Meta's SAM-2 checkpoint.

    As the official training builds it: the 5 Sa2VA tokens are added to the tokenizer and the
    embeddings and LM head resized to it (cut when the base has spare rows, new rows at the mean
    of the old ones otherwise: transformers' mean resizing, whose 1e-9-scaled noise we leave out);
    tied embeddings are untied (peft's modules_to_save trains a separate copy of each);
    text_hidden_fcs starts from nn.Linear's init drawn from `seed`. Returns (config, tokenizer,
    a function giving the full state dict in our names).
    """
    if not os.path.isfile(os.path.join(src, "config.json")):
        raise ValueError(f"--model {src} has no config.json; give the folder of a base MLLM (InternVL or Qwen-VL)")
    with open(os.path.join(src, "config.json")) as f:
        try:
            hf = json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"{src}/config.json is not valid JSON ({e})") from None
    tokenizer = load_official_tokenizer(src)
    base_len = len(tokenizer)
    tokenizer.add_tokens(list(data.SA2VA_TOKENS))
    qwen = isinstance(hf, dict) and "text_config" in hf
    if isinstance(hf, dict) and not qwen and "llm_config" not in hf and "vision_config" in hf:
        raise ValueError(f"{src}/config.json keeps the text model's fields at the top level (saved by transformers "
                         "< 4.52); load and save the model with a newer transformers first")
    section = "text_config" if qwen else "llm_config"
    hf = json.loads(json.dumps(hf))
    if isinstance(hf, dict) and isinstance(hf.get(section), dict):
        hf[section]["vocab_size"] = len(tokenizer)
        hf[section]["tie_word_embeddings"] = False
    cfg = official_config_from(hf, src, tokenizer)
    cfg = dataclasses.replace(cfg, template=template or BASE_TEMPLATES[cfg.llm.arch])
    data.get_template(cfg.template)  # a known one
    if not os.path.isfile(sam2_path):
        raise ValueError(f"--sam2 {sam2_path} is not a file; give Meta's SAM-2 checkpoint (sam2_hiera_large.pt)")
    where = _official_shards(src)
    ours = model_shapes(cfg)

    def weights() -> dict[str, torch.Tensor]:
        official = {}
        handles = {p: SafetensorsReader(p) for p in sorted(set(where.values()))}
        for k, p in where.items():
            official[_base_key(k, qwen)] = handles[p].read(k)
        kmap = key_map(cfg, ours)
        head_key = next(k for k, (_, t) in kmap.items() if t == ("llm.lm_head.weight",))
        embed_key = next(k for k, (_, t) in kmap.items() if t == ("llm.embed_tokens.weight",))
        if head_key not in official:  # a tied base: the head starts as a copy of the embeddings
            official[head_key] = official[embed_key].clone()
        for key in (embed_key, head_key):
            official[key] = _resize_rows(official[key], len(tokenizer), base_len)
        state = {}
        text_keys = {k for k in kmap if k.startswith("text_hidden_fcs.")}
        check_keys({k: () for k in kmap if k not in text_keys and not k.startswith(SAM2_OFFICIAL)},
                   {k: () for k in official}, f"{src}: base MLLM keys")
        for k, (transform, targets) in kmap.items():
            if k in official:
                state.update(zip(targets, UNPACK[transform](official[k], cfg.llm) if transform else [official[k]]))
        torch.manual_seed(seed)
        heads = nn.Sequential(nn.Linear(cfg.llm.dim, cfg.llm.dim), nn.ReLU(), nn.Linear(cfg.llm.dim, cfg.seg_dim))
        state.update({f"text_hidden_fcs.{k}": v for k, v in heads.state_dict().items()})
        state.update({SAM2_OURS + k: v for k, v in read_meta_sam2(sam2_path).items()})
        check_keys({k: ours[k] for k in ours}, {k: tuple(v.shape) for k, v in state.items()},
                   f"{src} + {sam2_path}")
        return state
    return cfg, tokenizer, weights


def _base_key(key: str, qwen: bool) -> str:
    """A base MLLM's key as it stands in a Sa2VA release (Qwen-VL releases nest the HF model one level deeper)."""
    return "model." + key if qwen and not key.startswith("model.model.") else key


def _resize_rows(w: torch.Tensor, rows: int, base_len: int) -> torch.Tensor:
    """Embedding / head rows for `rows` tokens: cut spare rows, or append rows at the mean of the base's."""
    if w.shape[0] >= rows:
        return w[:rows].clone()
    mean = w[:base_len].float().mean(0, keepdim=True).to(w.dtype)
    return torch.cat([w, mean.expand(rows - w.shape[0], -1)])


def read_meta_sam2(path: str) -> dict[str, torch.Tensor]:
    """Meta's SAM-2 checkpoint (`sam2_hiera_large.pt`: {"model": state dict}, read with
    weights_only=True so nothing but tensors is ever unpickled; or a .safetensors of that state)."""
    if path.endswith(".safetensors"):
        f = SafetensorsReader(path)
        return {k: f.read(k) for k in f.keys()}
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises pickle, zip and runtime errors for a file it cannot read safely
        raise ValueError(f"{path} is not a SAM-2 checkpoint torch can read with weights_only=True ({_one_line(e)})") from None
    sd = ckpt.get("model", ckpt) if isinstance(ckpt, dict) else None
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise ValueError(f"{path} holds no SAM-2 state dict (expected {{'model': {{name: tensor}}}})")
    return sd


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split())[:300]


def to_official(src: str, dst: str, like: str | None = None, dtype: torch.dtype | None = None):
    """Our folder -> the official HF layout, so weights trained here run in the official code.

    Writes model.safetensors and config.json. With `like` (the official release folder the
    model came from), its config.json, tokenizer files and remote code are copied instead.
    DST must be new or empty; it appears only once complete.
    """
    if like is not None and not os.path.isfile(os.path.join(like, "config.json")):
        raise ValueError(f"--like {like} is not an official Sa2VA folder (it has no config.json); give the release "
                         "folder the model came from")
    check_output_folder(dst, "DST", not_inside=(src,))
    if not os.path.isfile(os.path.join(src, "config.json")):
        raise ValueError(f"{src} has no config.json; give a folder written by convert.py")
    cfg = Sa2VAConfig.load(os.path.join(src, "config.json"))
    f = SafetensorsReader(os.path.join(src, "model.safetensors"))
    ours = model_shapes(cfg)
    check_keys(ours, {k: f.shape(k) for k in f.keys()}, f"{src}/model.safetensors")
    kmap = key_map(cfg, ours)
    specs = []
    for off, shape in sorted(official_shapes(cfg, kmap).items()):
        src_dtype = f.dtype(kmap[off][1][0])
        out_dtype = dtype if (dtype is not None and src_dtype.is_floating_point) else src_dtype
        specs.append((off, out_dtype, shape))

    def tensors():
        for off, out_dtype, _ in specs:
            transform, targets = kmap[off]
            parts = [f.read(t) for t in targets]
            out = (PACK[transform](*parts, cfg.llm) if transform else parts[0]).to(out_dtype)
            del parts
            yield off, out
            del out

    with output_folder(dst) as tmp:
        write_safetensors(os.path.join(tmp, "model.safetensors"), specs, tensors())
        if like:
            for name in os.listdir(like):
                if not (name.endswith(".safetensors") or name == "model.safetensors.index.json") and \
                        os.path.isfile(os.path.join(like, name)):
                    shutil.copy2(os.path.join(like, name), os.path.join(tmp, name))
        else:
            with open(os.path.join(tmp, "config.json"), "w") as fh:
                json.dump(config_to_official(cfg), fh, indent=2)
            if cfg.family != "internvl":
                with open(os.path.join(tmp, "preprocessor_config.json"), "w") as fh:
                    json.dump(preprocessor_to_official(cfg), fh, indent=2)


def qwen_default_system_prompt(src: str) -> str:
    """The system turn a Qwen-VL chat template inserts when the messages bring none.

    Stock Qwen2.5-VL templates add "You are a helpful assistant."; Qwen3-VL's add nothing.
    We read the literal text instead of running the Jinja template.
    """
    template = ""
    for name in ("chat_template.jinja", "chat_template.json", "tokenizer_config.json"):
        path = os.path.join(src, name)
        if os.path.isfile(path):
            with open(path, encoding="utf-8") as f:
                text = f.read()
            template = text if name.endswith(".jinja") else json.loads(text).get("chat_template", "") or ""
            if template:
                break
    m = re.search(r"<\|im_start\|>system\n([^{}<]+)<\|im_end\|>", template)
    return m.group(1) if m else ""


@dataclass
class ConvertOptions:
    src: str = arg(help="official Sa2VA Hugging Face folder (our folder with --to-official)", positional=True)
    dst: str = arg(help="output folder: new or empty", positional=True)
    dtype: str | None = arg(None, "cast floating tensors (bf16, fp16, fp32); default keeps each tensor's dtype")
    to_official: bool = arg(False, "convert our folder SRC back to the official HF layout")
    like: str | None = arg(None, "with --to-official: the official folder whose config, tokenizer and code to copy")


def main(argv=None):
    opts = parse(ConvertOptions, argv, __doc__.split("\n\n")[0], prog="convert.py")

    def body():
        if opts.like and not opts.to_official:
            raise ValueError("--like goes with --to-official")
        dtype = parse_dtype(opts.dtype)
        if opts.to_official:
            to_official(opts.src, opts.dst, like=opts.like, dtype=dtype)
            print(f"wrote {opts.dst} (official Sa2VA layout)")
        else:
            cfg = convert(opts.src, opts.dst, dtype)
            print(f"wrote {opts.dst} ({cfg.family}, LLM {cfg.llm.n_layers} layers x {cfg.llm.dim})")
    run("convert.py", body)


if __name__ == "__main__":
    main()
