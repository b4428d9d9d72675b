"""Convert an official Sa2VA Hugging Face checkpoint into ours, or ours back into it.

    python convert.py SRC DST [--dtype bf16]      # official HF folder -> our folder
    python convert.py SRC DST --to-official       # our folder -> official HF layout

The mapping is literal tables with a `{}` layer placeholder, plus named transforms:
  * unpack_wqkv / pack_wqkv: InternLM2 stores q, k and v in one `wqkv` matrix, grouped per KV
    head (architecture.md §2.3); we keep three projections.
  * SAM-2's ConvNeXt LayerScale is `gamma` in Meta's code and `g_weight` in the HF files.
Every official key must be mapped and every model key produced; anything else is an error
naming the keys. Tensors stream one at a time, so peak memory stays near the largest tensor
of the largest shard rather than the model.
"""
import argparse
import json
import os

import torch

from model.checkpoint import check_keys, model_shapes, open_safetensors, parse_dtype, write_safetensors
from model.config import Sa2VAConfig
from model.intern_vit import InternViTConfig
from model.llm import LLMConfig

SAM2_OFFICIAL, SAM2_OURS = "grounding_encoder.sam2_model.", "grounding.sam2."

INTERNVIT = {
    "vision_model.embeddings.class_embedding": "vision.cls_token",
    "vision_model.embeddings.position_embedding": "vision.pos_embed",
    "vision_model.embeddings.patch_embedding.weight": "vision.patch_embed.weight",
    "vision_model.embeddings.patch_embedding.bias": "vision.patch_embed.bias",
    "vision_model.encoder.layers.{}.ls1": "vision.blocks.{}.ls1",
    "vision_model.encoder.layers.{}.ls2": "vision.blocks.{}.ls2",
    "vision_model.encoder.layers.{}.attn.qkv.weight": "vision.blocks.{}.attn.qkv.weight",
    "vision_model.encoder.layers.{}.attn.qkv.bias": "vision.blocks.{}.attn.qkv.bias",
    "vision_model.encoder.layers.{}.attn.q_norm.weight": "vision.blocks.{}.attn.q_norm.weight",
    "vision_model.encoder.layers.{}.attn.k_norm.weight": "vision.blocks.{}.attn.k_norm.weight",
    "vision_model.encoder.layers.{}.attn.proj.weight": "vision.blocks.{}.attn.proj.weight",
    "vision_model.encoder.layers.{}.attn.proj.bias": "vision.blocks.{}.attn.proj.bias",
    "vision_model.encoder.layers.{}.mlp.fc1.weight": "vision.blocks.{}.fc1.weight",
    "vision_model.encoder.layers.{}.mlp.fc1.bias": "vision.blocks.{}.fc1.bias",
    "vision_model.encoder.layers.{}.mlp.fc2.weight": "vision.blocks.{}.fc2.weight",
    "vision_model.encoder.layers.{}.mlp.fc2.bias": "vision.blocks.{}.fc2.bias",
    "vision_model.encoder.layers.{}.norm1.weight": "vision.blocks.{}.norm1.weight",
    "vision_model.encoder.layers.{}.norm1.bias": "vision.blocks.{}.norm1.bias",
    "vision_model.encoder.layers.{}.norm2.weight": "vision.blocks.{}.norm2.weight",
    "vision_model.encoder.layers.{}.norm2.bias": "vision.blocks.{}.norm2.bias",
    "mlp1.0.weight": "projector.norm.weight",
    "mlp1.0.bias": "projector.norm.bias",
    "mlp1.1.weight": "projector.fc1.weight",
    "mlp1.1.bias": "projector.fc1.bias",
    "mlp1.3.weight": "projector.fc2.weight",
    "mlp1.3.bias": "projector.fc2.bias",
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

def config_from_official(hf: dict) -> Sa2VAConfig:
    """Our config from an official Sa2VA config.json (InternVL family)."""
    if "llm_config" in hf and "vision_config" in hf:
        return _internvl_config(hf)
    raise ValueError("config.json is not a Sa2VA InternVL-family config (no llm_config/vision_config); "
                     "this converter knows the InternVL family")


def _internvl_config(hf: dict) -> Sa2VAConfig:
    from model.sam2_bridge import SAM2Config
    v, lm = hf["vision_config"], hf["llm_config"]
    if hf.get("ps_version", "v2") != "v2":
        raise ValueError(f"ps_version {hf['ps_version']!r} is not supported; Sa2VA checkpoints use 'v2'")
    vision = InternViTConfig(hidden_size=v["hidden_size"], n_layers=v["num_hidden_layers"],
                             n_heads=v["num_attention_heads"], intermediate_size=v["intermediate_size"],
                             image_size=hf.get("force_image_size") or v["image_size"], patch_size=v["patch_size"],
                             qkv_bias=v.get("qkv_bias", True), qk_norm=v.get("qk_normalization", False),
                             norm_type=v.get("norm_type", "layer_norm"), norm_eps=v.get("layer_norm_eps", 1e-6),
                             downsample_ratio=hf.get("downsample_ratio", 0.5))
    arch = (lm.get("architectures") or ["?"])[0]
    common = dict(vocab_size=lm["vocab_size"], dim=lm["hidden_size"], n_layers=lm["num_hidden_layers"],
                  n_heads=lm["num_attention_heads"], n_kv_heads=lm.get("num_key_value_heads", lm["num_attention_heads"]),
                  intermediate_size=lm["intermediate_size"], norm_eps=lm.get("rms_norm_eps", 1e-6),
                  rope_theta=lm.get("rope_theta", 10000.0), max_position_embeddings=lm.get("max_position_embeddings", 32768),
                  tie_embeddings=bool(lm.get("tie_word_embeddings", False)))
    if arch == "Qwen2ForCausalLM":
        llm = LLMConfig(**common, qkv_bias=True)
    elif arch == "InternLM2ForCausalLM":
        scaling = lm.get("rope_scaling") or {}
        kind = scaling.get("type", scaling.get("rope_type"))
        if kind not in (None, "dynamic"):
            raise ValueError(f"InternLM2 rope_scaling type {kind!r} is not supported; only 'dynamic' is")
        if lm.get("bias", False):
            raise ValueError("InternLM2 with bias=true is not supported; no Sa2VA checkpoint uses it")
        llm = LLMConfig(**common, rope_dynamic_factor=float(scaling.get("factor", 0.0)) if kind else 0.0)
    else:
        raise ValueError(f"unknown LLM architecture {arch!r} in llm_config; supported: Qwen2ForCausalLM, InternLM2ForCausalLM")
    return Sa2VAConfig("internvl", vision, llm, hf.get("template", "qwen_chat"), SAM2Config.hiera_large())


def _llm_arch(cfg: Sa2VAConfig) -> str:
    return "internlm2" if cfg.family == "internvl" and not cfg.llm.qkv_bias else "qwen"


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


def key_map(cfg: Sa2VAConfig) -> dict[str, tuple[str | None, tuple[str, ...]]]:
    """official key -> (transform or None, our keys) for a whole Sa2VA model of this config."""
    ours = model_shapes(cfg)
    if cfg.family != "internvl":
        raise ValueError(f"family {cfg.family!r} has no key map yet")
    internlm2 = _llm_arch(cfg) == "internlm2"
    table = dict(INTERNVIT)
    table.update({"language_model.model." + k: v for k, v in (INTERNLM2_LLM if internlm2 else QWEN_LLM).items()})
    table["language_model.output.weight" if internlm2 else "language_model.lm_head.weight"] = "llm.lm_head.weight"
    table.update(HEADS)
    out = expand(table, {"vision": cfg.vision.n_layers, "llm": cfg.llm.n_layers}, ours)
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


# ----------------------------------------------------------------------------- official -> ours

def _official_shards(src: str) -> dict[str, str]:
    """official key -> shard path, from model.safetensors.index.json or the single file."""
    index = os.path.join(src, "model.safetensors.index.json")
    if os.path.isfile(index):
        with open(index) as f:
            weight_map = json.load(f)["weight_map"]
        return {k: os.path.join(src, v) for k, v in weight_map.items()}
    single = os.path.join(src, "model.safetensors")
    if not os.path.isfile(single):
        raise ValueError(f"{src} has neither model.safetensors nor model.safetensors.index.json")
    return {k: single for k in open_safetensors(single).keys()}


def convert(src: str, dst: str, dtype: torch.dtype | None = None):
    from model.tokenizer import load_official_tokenizer
    with open(os.path.join(src, "config.json")) as f:
        hf = json.load(f)
    cfg = config_from_official(hf)
    where = _official_shards(src)
    shards = sorted(set(where.values()))
    handles = {p: open_safetensors(p) for p in shards}
    for p, h in handles.items():
        missing = {k for k, s in where.items() if s == p} - set(h.keys())
        if missing:
            raise ValueError(f"{p} lacks {len(missing)} tensors its index lists, e.g. {sorted(missing)[0]}; the shard is incomplete")
    # A checkpoint without an LM head ties it to the embeddings (checkpoints.md §6).
    head = "language_model.output.weight" if _llm_arch(cfg) == "internlm2" else "language_model.lm_head.weight"
    if head in where:
        cfg.llm.tie_embeddings = False
    elif not cfg.llm.tie_embeddings:
        raise ValueError(f"{src}: {head} is missing and llm_config.tie_word_embeddings is false; the checkpoint is incomplete")
    kmap = key_map(cfg)
    check_keys({k: () for k in kmap}, {k: () for k in where}, f"{src}: official keys")

    ours = model_shapes(cfg)
    plan = []  # (official key, transform, our keys), in shard order
    specs = []
    for p in shards:
        for k in sorted(k for k, s in where.items() if s == p):
            transform, targets = kmap[k]
            plan.append((k, transform, targets))
            sl = handles[p].get_slice(k)
            src_dtype = _st_dtype(sl.get_dtype())
            out_dtype = dtype if (dtype is not None and src_dtype.is_floating_point) else src_dtype
            for t in targets:
                specs.append((t, out_dtype, ours[t]))
            if transform is None and tuple(sl.get_shape()) != ours[targets[0]]:
                raise ValueError(f"{k} has shape {tuple(sl.get_shape())} but config.json implies {ours[targets[0]]}")

    def tensors():
        for k, transform, targets in plan:
            t = handles[where[k]].get_tensor(k)
            outs = UNPACK[transform](t, cfg.llm) if transform else [t]
            for name, o in zip(targets, outs):
                if tuple(o.shape) != ours[name]:
                    raise ValueError(f"{k} gives {name} of shape {tuple(o.shape)}, the config implies {ours[name]}")
                if dtype is not None and o.is_floating_point():
                    o = o.to(dtype)
                yield name, o

    os.makedirs(dst, exist_ok=True)
    write_safetensors(os.path.join(dst, "model.safetensors"), specs, tensors())
    cfg.save(os.path.join(dst, "config.json"))
    load_official_tokenizer(src).save(dst)
    return cfg


def _st_dtype(name: str) -> torch.dtype:
    table = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64,
             "I64": torch.int64, "I32": torch.int32, "U8": torch.uint8, "BOOL": torch.bool}
    if name not in table:
        raise ValueError(f"tensor dtype {name} is not supported")
    return table[name]


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("src", help="official Sa2VA Hugging Face folder")
    ap.add_argument("dst", help="output folder")
    ap.add_argument("--dtype", default=None, help="cast floating tensors (bf16, fp16, fp32); default keeps each tensor's dtype")
    args = ap.parse_args()
    try:
        cfg = convert(args.src, args.dst, parse_dtype(args.dtype))
    except ValueError as e:
        raise SystemExit(f"convert.py: {e}")
    print(f"wrote {args.dst} ({cfg.family}, LLM {cfg.llm.n_layers} layers x {cfg.llm.dim})")


if __name__ == "__main__":
    main()
