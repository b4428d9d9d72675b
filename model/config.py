"""Every number of a Sa2VA model: one small config dataclass per component, composed into
`Sa2VAConfig`, and the preset table (one literal entry per released checkpoint, plus a tiny
`debug-*` entry per family for tests and the self-check).

Presets carry the numbers of each release, read from its base models' config.json files (the
URL above each entry); a converted checkpoint always uses the numbers in its own config.json,
which convert.py reads from the release. Configs are frozen: derive variants with
`dataclasses.replace`.
"""
import dataclasses
import json
from dataclasses import KW_ONLY, dataclass
from typing import Union

# ImageNet statistics: InternViT's tile normalisation and SAM-2's frame normalisation.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# The Qwen2.5-VL image processor's (OpenAI CLIP) statistics; Qwen3-VL uses 0.5 / 0.5.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
HALF = (0.5, 0.5, 0.5)
# Frames of a video the MLLM sees and SAM-2 conditions on (official `predict_forward`: the first 5).
NUM_KEY_FRAMES = 5
FAMILIES = ("internvl", "qwen2_5_vl", "qwen3_vl")
LLM_ARCHS = ("qwen2", "internlm2", "qwen3")


def _tuple(obj, *names):
    # JSON round trips give lists; frozen dataclasses need object.__setattr__ to normalise them.
    for name in names:
        object.__setattr__(obj, name, tuple(getattr(obj, name)))


@dataclass(frozen=True)
class LLMConfig:
    vocab_size: int
    dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    intermediate_size: int
    head_dim: int = 0  # 0 means dim // n_heads
    norm_eps: float = 1e-6
    rope_theta: float = 1e6
    # InternLM2 "dynamic" NTK scaling: the base grows once a sequence passes max_position_embeddings.
    rope_dynamic_factor: float = 0.0  # 0 disables it
    max_position_embeddings: int = 32768
    # Multimodal RoPE, in frequency pairs (head_dim/2 in total): (t, h, w) sections.
    mrope_section: tuple[int, ...] = ()
    mrope_interleaved: bool = False  # Qwen3-VL interleaves t/h/w pairs; Qwen2.5-VL chunks them
    qkv_bias: bool = False
    qk_norm: bool = False
    tie_embeddings: bool = False
    # The official checkpoint's decoder ("qwen2", "internlm2" or "qwen3"): decides its key names.
    arch: str = "qwen2"

    def __post_init__(self):
        if self.head_dim == 0:
            object.__setattr__(self, "head_dim", self.dim // self.n_heads)
        _tuple(self, "mrope_section")
        if self.arch not in LLM_ARCHS:
            raise ValueError(f"unknown LLM arch {self.arch!r}; expected one of {LLM_ARCHS}")
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"n_heads={self.n_heads} is not a multiple of n_kv_heads={self.n_kv_heads}; fix the LLM config")
        if self.mrope_section and 2 * sum(self.mrope_section) != self.head_dim:
            raise ValueError(f"mrope_section {self.mrope_section} must cover head_dim/2={self.head_dim // 2} frequency pairs")

    @property
    def context_length(self) -> int | None:
        """Longest sequence the model was built for; None where dynamic-NTK RoPE stretches it."""
        return None if self.rope_dynamic_factor else self.max_position_embeddings


@dataclass(frozen=True)
class InternViTConfig:
    hidden_size: int = 1024
    n_layers: int = 24
    n_heads: int = 16
    intermediate_size: int = 4096
    image_size: int = 448
    patch_size: int = 14
    qkv_bias: bool = True
    qk_norm: bool = False
    norm_type: str = "layer_norm"  # "layer_norm" (300M) or "rms_norm" (6B)
    norm_eps: float = 1e-6
    downsample_ratio: float = 0.5
    max_tiles: int = 12  # dynamic tiling's max_num (every release: 12, hard-coded in the official inference)
    pixel_mean: tuple[float, float, float] = IMAGENET_MEAN  # tile normalisation
    pixel_std: tuple[float, float, float] = IMAGENET_STD

    def __post_init__(self):
        _tuple(self, "pixel_mean", "pixel_std")
        if self.norm_type not in ("layer_norm", "rms_norm"):
            raise ValueError(f"unknown InternViT norm_type {self.norm_type!r}; use 'layer_norm' or 'rms_norm'")
        if self.downsample_ratio != 0.5:
            raise ValueError(f"downsample_ratio {self.downsample_ratio} is unsupported; every Sa2VA checkpoint uses 0.5")

    @property
    def grid(self) -> int:  # patches per side of a tile
        return self.image_size // self.patch_size

    @property
    def tokens_per_tile(self) -> int:  # LLM tokens per tile after the 2x2 pixel shuffle
        return (self.grid // 2) ** 2


def _check_vision_heads(hidden_size: int, num_heads: int):
    if hidden_size % num_heads or (hidden_size // num_heads) % 4:
        raise ValueError(f"head_dim {hidden_size}/{num_heads} must be a multiple of 4 "
                         "(the 2-D rotary embedding splits it into row/column halves of cos/sin pairs)")


@dataclass(frozen=True)
class Qwen25VisionConfig:
    depth: int = 32
    hidden_size: int = 1280
    num_heads: int = 16
    intermediate_size: int = 3420
    out_hidden_size: int = 2048  # the LLM width: 2048 (3B) or 3584 (7B)
    patch_size: int = 14
    temporal_patch_size: int = 2
    spatial_merge_size: int = 2
    window_size: int = 112  # in pixels: 112 / 14 / 2 = 4x4 merged tokens per window
    fullatt_block_indexes: tuple[int, ...] = (7, 15, 23, 31)
    in_channels: int = 3
    rope_theta: float = 10000.0
    norm_eps: float = 1e-6
    pixel_mean: tuple[float, float, float] = CLIP_MEAN  # the image processor's normalisation
    pixel_std: tuple[float, float, float] = CLIP_STD
    # mRoPE time step between the temporal patches of one image: a still image has zero
    # seconds per grid step in Qwen2.5-VL's get_rope_index (only matters when t > 1).
    image_temporal_stride: int = 0

    def __post_init__(self):
        _tuple(self, "fullatt_block_indexes", "pixel_mean", "pixel_std")
        _check_vision_heads(self.hidden_size, self.num_heads)
        if self.window_size % (self.patch_size * self.spatial_merge_size):
            raise ValueError(f"window_size {self.window_size} must be a multiple of patch_size*spatial_merge_size")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def patch_dim(self) -> int:  # length of one flattened input patch
        return self.in_channels * self.temporal_patch_size * self.patch_size ** 2

    @property
    def window_tokens(self) -> int:  # merged tokens per window side
        return self.window_size // (self.patch_size * self.spatial_merge_size)

    @classmethod
    def debug(cls) -> "Qwen25VisionConfig":
        """Tiny random-weight tower for tests; real patch and window sizes so windows are exercised."""
        return cls(depth=4, hidden_size=32, num_heads=2, intermediate_size=48, out_hidden_size=24,
                   fullatt_block_indexes=(1, 3))


@dataclass(frozen=True)
class Qwen3VisionConfig:
    depth: int = 24
    hidden_size: int = 1024
    num_heads: int = 16
    intermediate_size: int = 4096
    out_hidden_size: int = 2560  # the LLM width
    patch_size: int = 16
    temporal_patch_size: int = 2
    spatial_merge_size: int = 2
    num_position_embeddings: int = 2304  # a learned 48x48 grid
    deepstack_visual_indexes: tuple[int, ...] = (5, 11, 17)
    in_channels: int = 3
    rope_theta: float = 10000.0
    norm_eps: float = 1e-6
    pixel_mean: tuple[float, float, float] = HALF
    pixel_std: tuple[float, float, float] = HALF
    image_temporal_stride: int = 1  # Qwen3-VL's get_rope_index steps t by one per temporal patch

    def __post_init__(self):
        _tuple(self, "deepstack_visual_indexes", "pixel_mean", "pixel_std")
        _check_vision_heads(self.hidden_size, self.num_heads)
        if round(self.num_position_embeddings ** 0.5) ** 2 != self.num_position_embeddings:
            raise ValueError(f"num_position_embeddings {self.num_position_embeddings} must be a square (a side x side grid)")
        if any(not 0 <= i < self.depth for i in self.deepstack_visual_indexes):
            raise ValueError(f"deepstack_visual_indexes {self.deepstack_visual_indexes} must lie in [0, depth={self.depth})")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def patch_dim(self) -> int:  # length of one flattened input patch
        return self.in_channels * self.temporal_patch_size * self.patch_size ** 2

    @property
    def pos_grid(self) -> int:  # side of the learned position grid
        return round(self.num_position_embeddings ** 0.5)

    @classmethod
    def debug(cls) -> "Qwen3VisionConfig":
        """Tiny random-weight tower for tests (a 6x6 position grid, two deepstack layers)."""
        return cls(depth=3, hidden_size=32, num_heads=2, intermediate_size=48, out_hidden_size=24,
                   num_position_embeddings=36, deepstack_visual_indexes=(0, 2))


BACKBONE_STRIDE = 16  # SAM-2's image embedding is 1/16 of the input side (64x64 at 1024)


# Reference: sam2_hiera_l.yaml and SAM2Base._build_sam_heads (facebookresearch/sam2), the sizes
# Sa2VA's `SAM2.build_*` pass to each module.
@dataclass(frozen=True)
class SAM2Config:
    embed_dim: int  # Hiera stage-1 width; doubles every stage
    num_heads: int  # Hiera stage-1 heads; doubles every stage
    stages: tuple[int, ...]  # blocks per stage
    global_att_blocks: tuple[int, ...]
    window_spec: tuple[int, ...]  # window size per stage
    window_pos_embed_bkg_spatial_size: tuple[int, int]
    q_pool: int = 3  # stages that halve the resolution
    fpn_top_down_levels: tuple[int, ...] = (2, 3)
    d_model: int = 256  # neck / decoder / memory-attention width; the [SEG] prompt width
    mem_dim: int = 64  # memory-encoder output width; a pointer becomes d_model // mem_dim tokens
    memory_attention_layers: int = 4
    memory_attention_heads: int = 1
    memory_attention_ffn: int = 2048
    fuser_layers: int = 2  # ConvNeXt blocks fusing the mask into the memory
    decoder_depth: int = 2  # two-way transformer of the mask decoder
    decoder_heads: int = 8
    decoder_mlp_dim: int = 2048
    iou_head_depth: int = 3
    iou_head_hidden_dim: int = 256
    mask_in_chans: int = 16  # prompt encoder's mask-input downscaler
    num_maskmem: int = 7  # 1 conditioning slot + 6 previous frames
    max_obj_ptrs_in_encoder: int = 16
    image_size: int = 1024
    sigmoid_scale_for_mem_enc: float = 20.0
    sigmoid_bias_for_mem_enc: float = -10.0
    pixel_mean: tuple[float, float, float] = IMAGENET_MEAN
    pixel_std: tuple[float, float, float] = IMAGENET_STD

    def __post_init__(self):
        _tuple(self, "stages", "global_att_blocks", "window_spec", "window_pos_embed_bkg_spatial_size",
               "fpn_top_down_levels", "pixel_mean", "pixel_std")
        if self.d_model % self.mem_dim:
            raise ValueError(f"SAM-2 d_model {self.d_model} must be a multiple of mem_dim {self.mem_dim}")

    @property
    def backbone_channel_list(self) -> tuple[int, ...]:
        # Hiera doubles the width per stage; the neck lists them deepest first
        return tuple(self.embed_dim * 2**i for i in reversed(range(len(self.stages))))

    @property
    def grid(self) -> int:
        return self.image_size // BACKBONE_STRIDE

    @classmethod
    def debug(cls) -> "SAM2Config":
        # 128 px input -> 8x8 embedding, 32x32 mask logits; d_model/mem_dim as released. The global
        # block must not open a stage: Hiera cannot q-pool a global-attention block.
        return cls(embed_dim=8, num_heads=1, stages=(1, 1, 2, 1), global_att_blocks=(3,),
                   window_spec=(8, 4, 4, 2), window_pos_embed_bkg_spatial_size=(4, 4),
                   memory_attention_layers=2, memory_attention_ffn=128, decoder_mlp_dim=64,
                   iou_head_hidden_dim=32, image_size=128)


VisionConfig = Union[InternViTConfig, Qwen25VisionConfig, Qwen3VisionConfig]
VISION_CONFIGS = {"internvl": InternViTConfig, "qwen2_5_vl": Qwen25VisionConfig, "qwen3_vl": Qwen3VisionConfig}


@dataclass(frozen=True)
class Sa2VAConfig:
    family: str  # one of FAMILIES
    vision: VisionConfig
    llm: LLMConfig
    sam2: SAM2Config | None = None  # None builds the MLLM alone
    template: str = "qwen_chat"  # the official `config.template`: prompt format and stop words
    # Qwen-VL: the system turn the checkpoint's chat template adds when none is given
    # (stock Qwen2.5-VL: "You are a helpful assistant."; Qwen3-VL: none). Read by convert.py.
    system_prompt: str = ""
    # Which hidden state `[SEG]` reads: the last decoder layer's output before the final norm
    # (the released Sa2VA-Qwen3-VL, whose transformers 4.57 hidden_states[-1] is pre-norm) or
    # after it (every other release).
    seg_hidden_prenorm: bool = False
    # Video masks: SAM-2's memory carries the key frames' prompts to the other frames (every
    # release); False decodes each frame with the [SEG] prompts alone (the shipped shapes model,
    # trained from scratch without the memory path, which Sa2VA's losses never train).
    video_memory: bool = True
    _: KW_ONLY
    # Tokenizer ids the model itself needs: the visual-token slot and [SEG]. Set from the
    # checkpoint's tokenizer by convert.py.
    image_token_id: int
    seg_token_id: int

    def __post_init__(self):
        if self.family not in FAMILIES:
            raise ValueError(f"unknown model family {self.family!r}; expected one of {FAMILIES}")
        if not isinstance(self.vision, VISION_CONFIGS[self.family]):
            raise ValueError(f"a {self.family} model needs a {VISION_CONFIGS[self.family].__name__}, "
                             f"got {type(self.vision).__name__}")

    @property
    def seg_dim(self) -> int:
        """Width of the SAM-2 prompt text_hidden_fcs projects to: SAM-2's d_model (256 when built without SAM-2)."""
        return self.sam2.d_model if self.sam2 is not None else 256

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "Sa2VAConfig":
        if not isinstance(d, dict) or d.get("family") not in FAMILIES:
            raise ValueError(f"config has no known model family (expected one of {FAMILIES}); re-run convert.py")
        d = dict(d)
        try:
            sam2 = d.pop("sam2", None)
            return cls(vision=VISION_CONFIGS[d["family"]](**d.pop("vision")), llm=LLMConfig(**d.pop("llm")),
                       sam2=SAM2Config(**sam2) if sam2 is not None else None, **d)
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


# ----------------------------------------------------------------------------- presets

# https://huggingface.co/facebook/sam2-hiera-large (SAM 2.0, sam2_hiera_l.yaml): every release's grounding encoder.
SAM2_HIERA_L = SAM2Config(embed_dim=144, num_heads=2, stages=(2, 6, 36, 4), global_att_blocks=(23, 33, 43),
                          window_spec=(8, 4, 16, 8), window_pos_embed_bkg_spatial_size=(7, 7))
# https://huggingface.co/OpenGVLab/InternViT-300M-448px-V2_5/blob/main/config.json
INTERNVIT_300M = InternViTConfig(hidden_size=1024, n_layers=24, n_heads=16, intermediate_size=4096)
# https://huggingface.co/OpenGVLab/InternViT-6B-448px-V2_5/blob/main/config.json (45 layers UNVERIFIED)
INTERNVIT_6B = InternViTConfig(hidden_size=3200, n_layers=45, n_heads=25, intermediate_size=12800, qkv_bias=False,
                               qk_norm=True, norm_type="rms_norm")
# Sa2VA's Qwen tokenizers: 151665 base + 9 InternVL tokens + 5 Sa2VA tokens (InternVL family);
# Qwen-VL: the base tokenizer + 5 (UNVERIFIED against the hub files: convert.py reads the real size).
INTERNVL_QWEN_VOCAB = 151679
INTERNVL_IMAGE_ID, INTERNVL_SEG_ID = 151667, 151674  # <IMG_CONTEXT>, [SEG] (UNVERIFIED)
QWEN_IMAGE_PAD_ID = 151655  # <|image_pad|>, `image_token_id` of the Qwen-VL configs

PRESETS: dict[str, Sa2VAConfig] = {
    # https://huggingface.co/OpenGVLab/InternVL2_5-1B/blob/main/config.json (Qwen2.5-0.5B-Instruct)
    "Sa2VA-1B": Sa2VAConfig(
        family="internvl", vision=INTERNVIT_300M, sam2=SAM2_HIERA_L, template="qwen_chat",
        llm=LLMConfig(vocab_size=INTERNVL_QWEN_VOCAB, dim=896, n_layers=24, n_heads=14, n_kv_heads=2,
                      intermediate_size=4864, norm_eps=1e-6, rope_theta=1e6, qkv_bias=True, arch="qwen2"),
        image_token_id=INTERNVL_IMAGE_ID, seg_token_id=INTERNVL_SEG_ID),
    # https://huggingface.co/OpenGVLab/InternVL2_5-4B/blob/main/config.json (Qwen2.5-3B-Instruct).
    # The original training config says phi3_chat; the hub config.json decides (UNVERIFIED).
    "Sa2VA-4B": Sa2VAConfig(
        family="internvl", vision=INTERNVIT_300M, sam2=SAM2_HIERA_L, template="phi3_chat",
        llm=LLMConfig(vocab_size=INTERNVL_QWEN_VOCAB, dim=2048, n_layers=36, n_heads=16, n_kv_heads=2,
                      intermediate_size=11008, norm_eps=1e-6, rope_theta=1e6, qkv_bias=True, arch="qwen2"),
        image_token_id=INTERNVL_IMAGE_ID, seg_token_id=INTERNVL_SEG_ID),
    # https://huggingface.co/OpenGVLab/InternVL2_5-8B/blob/main/config.json (internlm2_5-7b-chat)
    "Sa2VA-8B": Sa2VAConfig(
        family="internvl", vision=INTERNVIT_300M, sam2=SAM2_HIERA_L, template="internlm2_chat",
        llm=LLMConfig(vocab_size=92558, dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, intermediate_size=14336,
                      norm_eps=1e-5, rope_theta=1e6, rope_dynamic_factor=2.0, max_position_embeddings=32768,
                      arch="internlm2"),
        image_token_id=92546, seg_token_id=92553),
    # https://huggingface.co/OpenGVLab/InternVL2_5-26B/blob/main/config.json (internlm2_5-20b-chat; rope UNVERIFIED)
    "Sa2VA-26B": Sa2VAConfig(
        family="internvl", vision=INTERNVIT_6B, sam2=SAM2_HIERA_L, template="internlm2_chat",
        llm=LLMConfig(vocab_size=92558, dim=6144, n_layers=48, n_heads=48, n_kv_heads=8, intermediate_size=16384,
                      norm_eps=1e-5, rope_theta=1e6, rope_dynamic_factor=2.0, max_position_embeddings=32768,
                      arch="internlm2"),
        image_token_id=92546, seg_token_id=92553),
    # https://huggingface.co/OpenGVLab/InternVL3-2B/blob/main/config.json (Qwen2.5-1.5B)
    "Sa2VA-InternVL3-2B": Sa2VAConfig(
        family="internvl", vision=INTERNVIT_300M, sam2=SAM2_HIERA_L, template="qwen_chat",
        llm=LLMConfig(vocab_size=INTERNVL_QWEN_VOCAB, dim=1536, n_layers=28, n_heads=12, n_kv_heads=2,
                      intermediate_size=8960, norm_eps=1e-6, rope_theta=1e6, qkv_bias=True, arch="qwen2"),
        image_token_id=INTERNVL_IMAGE_ID, seg_token_id=INTERNVL_SEG_ID),
    # https://huggingface.co/OpenGVLab/InternVL3-8B/blob/main/config.json (Qwen2.5-7B)
    "Sa2VA-InternVL3-8B": Sa2VAConfig(
        family="internvl", vision=INTERNVIT_300M, sam2=SAM2_HIERA_L, template="qwen_chat",
        llm=LLMConfig(vocab_size=INTERNVL_QWEN_VOCAB, dim=3584, n_layers=28, n_heads=28, n_kv_heads=4,
                      intermediate_size=18944, norm_eps=1e-6, rope_theta=1e6, qkv_bias=True, arch="qwen2"),
        image_token_id=INTERNVL_IMAGE_ID, seg_token_id=INTERNVL_SEG_ID),
    # https://huggingface.co/OpenGVLab/InternVL3-14B/blob/main/config.json (Qwen2.5-14B)
    "Sa2VA-InternVL3-14B": Sa2VAConfig(
        family="internvl", vision=INTERNVIT_300M, sam2=SAM2_HIERA_L, template="qwen_chat",
        llm=LLMConfig(vocab_size=INTERNVL_QWEN_VOCAB, dim=5120, n_layers=48, n_heads=40, n_kv_heads=8,
                      intermediate_size=13824, norm_eps=1e-6, rope_theta=1e6, qkv_bias=True, arch="qwen2"),
        image_token_id=INTERNVL_IMAGE_ID, seg_token_id=INTERNVL_SEG_ID),
    # https://huggingface.co/Qwen/Qwen2.5-VL-3B-Instruct/blob/main/config.json
    "Sa2VA-Qwen2_5-VL-3B": Sa2VAConfig(
        family="qwen2_5_vl", vision=Qwen25VisionConfig(out_hidden_size=2048), sam2=SAM2_HIERA_L,
        llm=LLMConfig(vocab_size=151670, dim=2048, n_layers=36, n_heads=16, n_kv_heads=2, intermediate_size=11008,
                      rope_theta=1e6, qkv_bias=True, mrope_section=(16, 24, 24), max_position_embeddings=128000,
                      arch="qwen2"),
        image_token_id=QWEN_IMAGE_PAD_ID, seg_token_id=151665),
    # https://huggingface.co/Qwen/Qwen2.5-VL-7B-Instruct/blob/main/config.json
    "Sa2VA-Qwen2_5-VL-7B": Sa2VAConfig(
        family="qwen2_5_vl", vision=Qwen25VisionConfig(out_hidden_size=3584), sam2=SAM2_HIERA_L,
        llm=LLMConfig(vocab_size=151670, dim=3584, n_layers=28, n_heads=28, n_kv_heads=4, intermediate_size=18944,
                      rope_theta=1e6, qkv_bias=True, mrope_section=(16, 24, 24), max_position_embeddings=128000,
                      arch="qwen2"),
        image_token_id=QWEN_IMAGE_PAD_ID, seg_token_id=151665),
    # https://huggingface.co/Qwen/Qwen3-VL-2B-Instruct/blob/main/config.json (Qwen3-1.7B text model)
    "Sa2VA-Qwen3-VL-2B": Sa2VAConfig(
        family="qwen3_vl", vision=Qwen3VisionConfig(out_hidden_size=2048), sam2=SAM2_HIERA_L, seg_hidden_prenorm=True,
        llm=LLMConfig(vocab_size=151674, dim=2048, n_layers=28, n_heads=16, n_kv_heads=8, intermediate_size=6144,
                      head_dim=128, rope_theta=5e6, qk_norm=True, mrope_section=(24, 20, 20), mrope_interleaved=True,
                      max_position_embeddings=262144, arch="qwen3"),
        image_token_id=QWEN_IMAGE_PAD_ID, seg_token_id=151669),
    # https://huggingface.co/Qwen/Qwen3-VL-4B-Instruct/blob/main/config.json
    "Sa2VA-Qwen3-VL-4B": Sa2VAConfig(
        family="qwen3_vl", vision=Qwen3VisionConfig(out_hidden_size=2560), sam2=SAM2_HIERA_L, seg_hidden_prenorm=True,
        llm=LLMConfig(vocab_size=151674, dim=2560, n_layers=36, n_heads=32, n_kv_heads=8, intermediate_size=9728,
                      head_dim=128, rope_theta=5e6, qk_norm=True, mrope_section=(24, 20, 20), mrope_interleaved=True,
                      max_position_embeddings=262144, arch="qwen3"),
        image_token_id=QWEN_IMAGE_PAD_ID, seg_token_id=151669),
}

# The size of debug_checkpoint.write_tokenizer's tokenizer and the ids it gives the visual-token
# slot and [SEG]: 256 byte tokens, 3 Qwen specials, then 9 InternVL tokens or 5 Qwen-VL vision
# tokens, then the 5 Sa2VA tokens.
DEBUG_TOKENIZER = {"internvl": (273, 261, 268), "qwen2_5_vl": (269, 262, 264), "qwen3_vl": (269, 262, 264)}


def debug_config(family: str = "internvl", llm: str = "qwen2", vocab_size: int | None = None, sam2: bool = True,
                 image_token_id: int | None = None, seg_token_id: int | None = None) -> Sa2VAConfig:
    """A tiny random-weight model of a family for tests and the self-check (not a released model).

    The vocabulary and token ids default to those of debug_checkpoint's tokenizer.
    """
    if family not in FAMILIES:
        raise ValueError(f"unknown family {family!r}; expected one of {FAMILIES}")
    default_vocab, default_image, default_seg = DEBUG_TOKENIZER[family]
    vocab_size = default_vocab if vocab_size is None else vocab_size
    ids = dict(image_token_id=default_image if image_token_id is None else image_token_id,
               seg_token_id=default_seg if seg_token_id is None else seg_token_id)
    tiny_sam2 = SAM2Config.debug() if sam2 else None
    if family == "internvl":
        if llm == "qwen2":
            lm = LLMConfig(vocab_size, 64, 2, 4, 2, 128, qkv_bias=True, arch="qwen2")
        elif llm == "internlm2":
            lm = LLMConfig(vocab_size, 64, 2, 4, 2, 128, norm_eps=1e-5, rope_dynamic_factor=2.0,
                           max_position_embeddings=64, arch="internlm2")
        else:
            raise ValueError(f"unknown debug LLM {llm!r} for the InternVL family; use qwen2 or internlm2")
        vit = InternViTConfig(hidden_size=32, n_layers=2, n_heads=4, intermediate_size=64, image_size=56)
        return Sa2VAConfig("internvl", vit, lm, tiny_sam2, "internlm2_chat" if llm == "internlm2" else "qwen_chat", **ids)
    if family == "qwen2_5_vl":
        lm = LLMConfig(vocab_size, 64, 2, 4, 2, 128, qkv_bias=True, mrope_section=(2, 3, 3), arch="qwen2")
        vit = dataclasses.replace(Qwen25VisionConfig.debug(), out_hidden_size=64)
        return Sa2VAConfig("qwen2_5_vl", vit, lm, tiny_sam2, **ids)
    lm = LLMConfig(vocab_size, 64, 3, 4, 2, 128, head_dim=32, qk_norm=True, rope_theta=5e6,
                   mrope_section=(6, 5, 5), mrope_interleaved=True, arch="qwen3")
    vit = dataclasses.replace(Qwen3VisionConfig.debug(), out_hidden_size=64)
    return Sa2VAConfig("qwen3_vl", vit, lm, tiny_sam2, seg_hidden_prenorm=True, **ids)


def shapes_config() -> Sa2VAConfig:
    """The shipped model (world.py's shapes, trained from scratch by train.py): an InternVL-family
    Sa2VA at toy sizes. One 224-px tile (64 visual tokens) per image, a 6-layer Qwen2-style LLM on
    its own byte-level BPE, a Hiera SAM-2 at 256 px (16x16 features, 64x64 mask logits)."""
    vocab, image_id, seg_id = SHAPES_TOKENIZER
    vit = InternViTConfig(hidden_size=192, n_layers=4, n_heads=3, intermediate_size=576, image_size=224, max_tiles=1)
    lm = LLMConfig(vocab, 256, 6, 4, 2, 768, qkv_bias=True, arch="qwen2")
    sam2 = SAM2Config(embed_dim=24, num_heads=1, stages=(1, 2, 4, 1), global_att_blocks=(5,), window_spec=(8, 4, 8, 4),
                      window_pos_embed_bkg_spatial_size=(4, 4), d_model=128, mem_dim=64, memory_attention_layers=2,
                      memory_attention_ffn=512, decoder_heads=4, decoder_mlp_dim=512, iou_head_hidden_dim=64, image_size=256)
    return Sa2VAConfig("internvl", vit, lm, sam2, "qwen_chat", video_memory=False, image_token_id=image_id,
                       seg_token_id=seg_id)


# (vocabulary size, <IMG_CONTEXT> id, [SEG] id) of world.py's tokenizer for the shipped model
SHAPES_TOKENIZER = (512, 500, 507)

# Tiny random-weight models, one per family (tests, self-check, quick benchmarks).
PRESETS.update({
    "debug-internvl": debug_config("internvl", "qwen2"),
    "debug-internvl-internlm2": debug_config("internvl", "internlm2"),
    "debug-qwen2_5_vl": debug_config("qwen2_5_vl"),
    "debug-qwen3_vl": debug_config("qwen3_vl"),
    "sa2va-shapes": shapes_config(),
})


def preset(name: str) -> Sa2VAConfig:
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; known: {', '.join(PRESETS)}")
    return PRESETS[name]


def preset_names() -> list[str]:
    return list(PRESETS)


def release_names() -> list[str]:
    """The presets of released checkpoints (not the debug models, not our shipped shapes model)."""
    return [n for n in PRESETS if not n.startswith("debug-") and n != "sa2va-shapes"]
