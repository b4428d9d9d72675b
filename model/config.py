"""Sa2VA model configs: one dataclass per component, composed here, plus the preset table.

Presets carry the numbers of each released checkpoint (from the base models' configs; a
converted checkpoint always uses the numbers in its own config.json) and a tiny `debug-*`
entry per family for tests and the self-check.
"""
import dataclasses
import json
from dataclasses import dataclass

from model.intern_vit import InternViTConfig
from model.llm import LLMConfig

FAMILIES = ("internvl", "qwen2_5_vl", "qwen3_vl")


@dataclass
class Sa2VAConfig:
    family: str  # one of FAMILIES
    vision: InternViTConfig
    llm: LLMConfig
    template: str = "qwen_chat"  # the official `config.template`: prompt format and stop words
    sam2: object | None = None  # SAM2Config; None builds the MLLM alone
    seg_dim: int = 256  # SAM-2 prompt width that text_hidden_fcs projects to
    # Qwen-VL: the system turn the checkpoint's chat template adds when none is given
    # (stock Qwen2.5-VL: "You are a helpful assistant."; Qwen3-VL: none). Read by convert.py.
    system_prompt: str = ""

    def __post_init__(self):
        if self.family not in FAMILIES:
            raise ValueError(f"unknown model family {self.family!r}; expected one of {FAMILIES}")

    @property
    def seg_hidden_prenorm(self) -> bool:
        # The released Sa2VA-Qwen3-VL reads [SEG] states before the final norm (architecture.md §6).
        return self.family == "qwen3_vl"

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "Sa2VAConfig":
        d = dict(d)
        family = d.get("family")
        vision_cls = _vision_config_class(family)
        try:
            sam2 = d.pop("sam2", None)
            if sam2 is not None:
                from model.sam2_bridge import SAM2Config
                sam2 = SAM2Config(**sam2)
            return cls(vision=vision_cls(**d.pop("vision")), llm=LLMConfig(**d.pop("llm")), sam2=sam2, **d)
        except TypeError as e:
            raise ValueError(f"config does not match this version of sa2va ({e}); re-run convert.py") from None

    def save(self, path: str):
        with open(path, "w") as f:
            json.dump(self.to_dict(), f, indent=2)

    @classmethod
    def load(cls, path: str) -> "Sa2VAConfig":
        with open(path) as f:
            try:
                d = json.load(f)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path} is not valid JSON ({e}); re-run convert.py") from None
        return cls.from_dict(d)


def _vision_config_class(family):
    if family == "internvl":
        return InternViTConfig
    if family == "qwen2_5_vl":
        from model.qwen2_5_vit import Qwen25VisionConfig
        return Qwen25VisionConfig
    if family == "qwen3_vl":
        from model.qwen3_vit import Qwen3VisionConfig
        return Qwen3VisionConfig
    raise ValueError(f"unknown model family {family!r}; expected one of {FAMILIES}")


def _qwen25(vocab, dim, layers, heads, kv, ffn, tie=False) -> LLMConfig:
    return LLMConfig(vocab_size=vocab, dim=dim, n_layers=layers, n_heads=heads, n_kv_heads=kv,
                     intermediate_size=ffn, norm_eps=1e-6, rope_theta=1e6, qkv_bias=True, tie_embeddings=tie)


def _internlm25(dim, layers, heads, kv, ffn) -> LLMConfig:
    # internlm2_5 chat configs: eps 1e-5, theta 1e6, rope_scaling dynamic x2 (UNVERIFIED for 20B).
    return LLMConfig(vocab_size=92558, dim=dim, n_layers=layers, n_heads=heads, n_kv_heads=kv,
                     intermediate_size=ffn, norm_eps=1e-5, rope_theta=1e6, rope_dynamic_factor=2.0,
                     max_position_embeddings=32768)


VIT_300M = InternViTConfig()
VIT_6B = InternViTConfig(hidden_size=3200, n_layers=45, n_heads=25, intermediate_size=12800,
                         qkv_bias=False, qk_norm=True, norm_type="rms_norm")
QWEN_VOCAB = 151679  # 151665 base + 9 InternVL tokens + 5 Sa2VA tokens


def _qwen_vl_llm(vocab, dim, layers, heads, kv, ffn, qwen3=False) -> LLMConfig:
    if qwen3:  # Qwen3-VL text model: qk-norm, no qkv bias, interleaved mRoPE
        return LLMConfig(vocab, dim, layers, heads, kv, ffn, head_dim=128, rope_theta=5e6, qk_norm=True,
                         mrope_section=(24, 20, 20), mrope_interleaved=True, max_position_embeddings=262144)
    return LLMConfig(vocab, dim, layers, heads, kv, ffn, rope_theta=1e6, qkv_bias=True, mrope_section=(16, 24, 24),
                     max_position_embeddings=128000)


def _sam2_large():
    from model.sam2_bridge import SAM2Config
    return SAM2Config.hiera_large()


def _preset_table() -> dict:
    from model.qwen2_5_vit import Qwen25VisionConfig
    from model.qwen3_vit import Qwen3VisionConfig
    sam2 = _sam2_large()
    return {
        "Sa2VA-1B": Sa2VAConfig("internvl", VIT_300M, _qwen25(QWEN_VOCAB, 896, 24, 14, 2, 4864), "qwen_chat", sam2),
        # The original training config says phi3_chat; the hub config.json decides (UNVERIFIED).
        "Sa2VA-4B": Sa2VAConfig("internvl", VIT_300M, _qwen25(QWEN_VOCAB, 2048, 36, 16, 2, 11008), "phi3_chat", sam2),
        "Sa2VA-8B": Sa2VAConfig("internvl", VIT_300M, _internlm25(4096, 32, 32, 8, 14336), "internlm2_chat", sam2),
        "Sa2VA-26B": Sa2VAConfig("internvl", VIT_6B, _internlm25(6144, 48, 48, 8, 16384), "internlm2_chat", sam2),
        "Sa2VA-InternVL3-2B": Sa2VAConfig("internvl", VIT_300M, _qwen25(QWEN_VOCAB, 1536, 28, 12, 2, 8960), "qwen_chat", sam2),
        "Sa2VA-InternVL3-8B": Sa2VAConfig("internvl", VIT_300M, _qwen25(QWEN_VOCAB, 3584, 28, 28, 4, 18944), "qwen_chat", sam2),
        "Sa2VA-InternVL3-14B": Sa2VAConfig("internvl", VIT_300M, _qwen25(QWEN_VOCAB, 5120, 48, 40, 8, 13824), "qwen_chat", sam2),
        # Vocab sizes = base tokenizer + 5 Sa2VA tokens (UNVERIFIED against the hub files).
        "Sa2VA-Qwen2_5-VL-3B": Sa2VAConfig("qwen2_5_vl", Qwen25VisionConfig.qwen2_5_vl(2048),
                                           _qwen_vl_llm(151670, 2048, 36, 16, 2, 11008), "qwen_chat", sam2),
        "Sa2VA-Qwen2_5-VL-7B": Sa2VAConfig("qwen2_5_vl", Qwen25VisionConfig.qwen2_5_vl(3584),
                                           _qwen_vl_llm(151670, 3584, 28, 28, 4, 18944), "qwen_chat", sam2),
        "Sa2VA-Qwen3-VL-4B": Sa2VAConfig("qwen3_vl", Qwen3VisionConfig.qwen3_vl_4b(),
                                         _qwen_vl_llm(151674, 2560, 36, 32, 8, 9728, qwen3=True), "qwen_chat", sam2),
        # Tiny random-weight models, one per family (tests, self-check, quick benchmarks).
        "debug-internvl": debug_config("internvl", "qwen2"),
        "debug-internvl-internlm2": debug_config("internvl", "internlm2"),
        "debug-qwen2_5_vl": debug_config("qwen2_5_vl"),
        "debug-qwen3_vl": debug_config("qwen3_vl"),
    }


def debug_config(family: str = "internvl", llm: str = "qwen2", vocab_size: int = 512, sam2: bool = True) -> Sa2VAConfig:
    """A tiny random-weight model of a family for tests and the self-check (not a released model)."""
    tiny_sam2 = None
    if sam2:
        from model.sam2_bridge import SAM2Config
        tiny_sam2 = SAM2Config.debug()
    if llm == "qwen2":
        lm = LLMConfig(vocab_size, 64, 2, 4, 2, 128, qkv_bias=True)
    elif llm == "internlm2":
        lm = LLMConfig(vocab_size, 64, 2, 4, 2, 128, norm_eps=1e-5, rope_dynamic_factor=2.0, max_position_embeddings=64)
    elif llm == "qwen3":
        lm = LLMConfig(vocab_size, 64, 2, 4, 2, 128, head_dim=32, qk_norm=True)
    else:
        raise ValueError(f"unknown debug LLM {llm!r}; use qwen2, internlm2 or qwen3")
    if family == "internvl":
        vit = InternViTConfig(hidden_size=32, n_layers=2, n_heads=4, intermediate_size=64, image_size=56)
        return Sa2VAConfig("internvl", vit, lm, "internlm2_chat" if llm == "internlm2" else "qwen_chat", tiny_sam2)
    if family == "qwen2_5_vl":
        from model.qwen2_5_vit import Qwen25VisionConfig
        lm = LLMConfig(vocab_size, 64, 2, 4, 2, 128, qkv_bias=True, mrope_section=(2, 3, 3))
        vit = dataclasses.replace(Qwen25VisionConfig.debug(), out_hidden_size=64)
        return Sa2VAConfig("qwen2_5_vl", vit, lm, "qwen_chat", tiny_sam2)
    if family == "qwen3_vl":
        from model.qwen3_vit import Qwen3VisionConfig
        lm = LLMConfig(vocab_size, 64, 3, 4, 2, 128, head_dim=32, qk_norm=True, rope_theta=5e6,
                       mrope_section=(6, 5, 5), mrope_interleaved=True)
        vit = dataclasses.replace(Qwen3VisionConfig.debug(), out_hidden_size=64)
        return Sa2VAConfig("qwen3_vl", vit, lm, "qwen_chat", tiny_sam2)
    raise ValueError(f"unknown family {family!r}; expected one of {FAMILIES}")


def preset(name: str) -> Sa2VAConfig:
    table = _preset_table()
    if name not in table:
        raise ValueError(f"unknown preset {name!r}; known: {', '.join(table)}")
    return table[name]


def preset_names() -> list[str]:
    return list(_preset_table())
