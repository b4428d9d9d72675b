"""SAM-2 side of Sa2VA: image features, [SEG]-prompted mask decoding and video propagation.

Reproduces the grounding encoder of the released Sa2VA HF remote code
(`projects/sa2va/hf/models/sam2.py`: `SAM2` + its `SAM2VideoPredictor.add_language_embd` /
`propagate_in_video`) on top of Meta's `sam2` package (SAM 2.0 Hiera-L, no hydra/yaml).
The SAM2 modules are Meta's classes, built here from the explicit numbers of a SAM2Config;
this file only adds the Sa2VA decoding and a bounded, batched video loop around them. Frames
arrive resized to S x S as uint8 (data.sam2_frames); `normalize` is the only pixel work here.

Deviations from the reference:
* Video: all N objects of a video run in one batched pass per frame (the reference runs one
  state per `[SEG]`); every conditioning frame is decoded and memory-encoded up front, so
  spread-out key frames are all in memory from the first frame (SAM2's consolidation
  semantics). Frames before the first conditioning frame are tracked forward from those
  memories (SAM2 would need a reverse pass). Only the memory entries that memory attention
  can still read are kept.
* No autocast: everything runs in the module's dtype; the dense prompt PE is computed in fp32
  and cast (the reference computes it under bf16 autocast). Mask logits are always fp32.
"""

import math
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Callable, Iterator, NamedTuple, Sequence

import torch
import torch.nn.functional as F
from hydra import compose
from hydra.errors import HydraException
from hydra.utils import instantiate
from omegaconf import OmegaConf
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

from model.config import BACKBONE_STRIDE, IMAGENET_MEAN, IMAGENET_STD, NUM_KEY_FRAMES, SAM2Config
from sam2.modeling.backbones.hieradet import Hiera
from sam2.modeling.backbones.image_encoder import FpnNeck, ImageEncoder
from sam2.modeling.memory_attention import MemoryAttention, MemoryAttentionLayer
from sam2.modeling.memory_encoder import CXBlock, Fuser, MaskDownSampler, MemoryEncoder
from sam2.modeling.position_encoding import PositionEmbeddingSine
from sam2.modeling.sam.mask_decoder import MaskDecoder
from sam2.modeling.sam.prompt_encoder import PromptEncoder
from sam2.modeling.sam.transformer import RoPEAttention, TwoWayTransformer
from sam2.modeling.sam2_base import SAM2Base

# SAM2VideoPredictor stores spatial memories in bf16 whatever the model dtype.
MEMORY_DTYPE = torch.bfloat16
# A video for track(): (T, 3, S, S), a sequence of (3, S, S) frames, or t -> (3, S, S); with
# several videos in one pass, t -> (V, 3, S, S), frame t of every video (see condition's owners)
Frames = Tensor | Sequence[Tensor] | Callable[[int], Tensor]


class _LinspaceOnCPU(TorchFunctionMode):
    # Hiera computes its drop-path schedule with torch.linspace(...).item(), which fails under a
    # meta default device; the schedule is Python floats, so compute it on CPU.
    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.linspace:
            kwargs["device"] = "cpu"
        return func(*args, **kwargs)


def build_sam2(cfg: SAM2Config) -> SAM2Base:
    """Meta's SAM2Base with every flag the Sa2VA release uses and every size from `cfg`.

    Works under `with torch.device("meta")`; the state_dict keys are those of the HF checkpoint
    minus `grounding_encoder.sam2_model.`, with `.g_weight` named `.gamma`.
    """
    d, g = cfg.d_model, cfg.grid
    with _LinspaceOnCPU():
        trunk = Hiera(embed_dim=cfg.embed_dim, num_heads=cfg.num_heads, q_pool=cfg.q_pool, stages=cfg.stages,
                      global_att_blocks=cfg.global_att_blocks, window_spec=cfg.window_spec,
                      window_pos_embed_bkg_spatial_size=cfg.window_pos_embed_bkg_spatial_size)
    neck = FpnNeck(position_encoding=PositionEmbeddingSine(d, warmup_cache=False), d_model=d,
                   backbone_channel_list=list(cfg.backbone_channel_list),
                   fpn_top_down_levels=list(cfg.fpn_top_down_levels), fpn_interp_model="nearest")

    def rope_attention(kv_in_dim=None):
        return RoPEAttention(embedding_dim=d, num_heads=cfg.memory_attention_heads, downsample_rate=1, dropout=0.1,
                             rope_theta=10000.0, feat_sizes=(g, g),
                             rope_k_repeat=kv_in_dim is not None, kv_in_dim=kv_in_dim)

    layer = MemoryAttentionLayer(
        activation="relu", self_attention=rope_attention(), cross_attention=rope_attention(cfg.mem_dim),
        d_model=d, dim_feedforward=cfg.memory_attention_ffn, dropout=0.1, pos_enc_at_attn=False,
        pos_enc_at_cross_attn_keys=True, pos_enc_at_cross_attn_queries=False)
    memory_encoder = MemoryEncoder(
        out_dim=cfg.mem_dim, in_dim=d,
        position_encoding=PositionEmbeddingSine(cfg.mem_dim, warmup_cache=False),
        mask_downsampler=MaskDownSampler(embed_dim=d, kernel_size=3, stride=2, padding=1,
                                         total_stride=BACKBONE_STRIDE),
        fuser=Fuser(CXBlock(dim=d, kernel_size=7, padding=3, layer_scale_init_value=1e-6,
                            use_dwconv=True), num_layers=cfg.fuser_layers))
    model = SAM2Base(
        image_encoder=ImageEncoder(trunk=trunk, neck=neck, scalp=1),
        memory_attention=MemoryAttention(d_model=d, pos_enc_at_input=True, layer=layer,
                                         num_layers=cfg.memory_attention_layers),
        memory_encoder=memory_encoder,
        num_maskmem=cfg.num_maskmem, image_size=cfg.image_size, backbone_stride=BACKBONE_STRIDE,
        sigmoid_scale_for_mem_enc=cfg.sigmoid_scale_for_mem_enc,
        sigmoid_bias_for_mem_enc=cfg.sigmoid_bias_for_mem_enc,
        binarize_mask_from_pts_for_mem_enc=False, use_mask_input_as_output_without_sam=True,
        max_cond_frames_in_attn=-1, directly_add_no_mem_embed=True,
        use_high_res_features_in_sam=True, multimask_output_in_sam=True,
        multimask_min_pt_num=0, multimask_max_pt_num=1, multimask_output_for_tracking=True,
        use_multimask_token_for_obj_ptr=True, iou_prediction_use_sigmoid=True,
        memory_temporal_stride_for_eval=1, non_overlap_masks_for_mem_enc=False,
        use_obj_ptrs_in_encoder=True, max_obj_ptrs_in_encoder=cfg.max_obj_ptrs_in_encoder,
        add_tpos_enc_to_obj_ptrs=False, only_obj_ptrs_in_the_past_for_eval=True,
        pred_obj_scores=True, pred_obj_scores_mlp=True, fixed_no_obj_ptr=True,
        soft_no_obj_ptr=False, use_mlp_for_obj_ptr_proj=True, compile_image_encoder=False)
    # SAM2Base._build_sam_heads hard-codes the heads' sizes (those of Hiera-L); build them again
    # from the config so any SAM-2 size is explicit, with the flags _build_sam_heads passes.
    model.sam_prompt_encoder = PromptEncoder(embed_dim=d, image_embedding_size=(g, g),
                                             input_image_size=(cfg.image_size, cfg.image_size),
                                             mask_in_chans=cfg.mask_in_chans)
    model.sam_mask_decoder = MaskDecoder(
        num_multimask_outputs=3, transformer_dim=d,
        transformer=TwoWayTransformer(depth=cfg.decoder_depth, embedding_dim=d, mlp_dim=cfg.decoder_mlp_dim,
                                      num_heads=cfg.decoder_heads),
        iou_head_depth=cfg.iou_head_depth, iou_head_hidden_dim=cfg.iou_head_hidden_dim, use_high_res_features=True,
        iou_prediction_use_sigmoid=True, pred_obj_scores=True, pred_obj_scores_mlp=True,
        use_multimask_token_for_obj_ptr=True,
        # HF-only; inactive because Sa2VA always decodes with multimask_output=True
        dynamic_multimask_via_stability=True, dynamic_multimask_stability_delta=0.05,
        dynamic_multimask_stability_thresh=0.98)
    # RoPE tables are plain attributes, not buffers: rebuild them on CPU so a model built on the
    # meta device and loaded with assign=True can run (forward moves them to the input device).
    with torch.device("cpu"):
        for m in model.modules():
            if isinstance(m, RoPEAttention):
                m.freqs_cis = m.compute_cis(end_x=g, end_y=g)
    return model


# Reference: SAM2Base.forward_image + _prepare_backbone_features (kept as BCHW maps).
@dataclass
class Features:
    s0: Tensor  # (B, d/8, 4g, 4g) stride-4 level after sam_mask_decoder.conv_s0
    s1: Tensor  # (B, d/4, 2g, 2g) stride-8 level after sam_mask_decoder.conv_s1
    embed: Tensor  # (B, d, g, g) stride-16 level: image embedding and memory-encoder input
    pos: Tensor  # (B, d, g, g) sine position encoding of the stride-16 level

    def __len__(self) -> int:
        return self.embed.shape[0]

    def expand(self, n: int) -> "Features":
        """The same frame's features for n objects (a view, no copy)."""
        if len(self) == n:
            return self
        if len(self) != 1:
            raise ValueError(f"features hold {len(self)} frames for {n} prompts; "
                             "pass 1 frame or one frame per prompt")
        return Features(*(x.expand(n, -1, -1, -1) for x in (self.s0, self.s1, self.embed, self.pos)))

    def select(self, frames: Tensor) -> "Features":
        """The features of frames[i] at row i (frames: (P,) long), e.g. one frame per mask query."""
        return Features(*(x[frames] for x in (self.s0, self.s1, self.embed, self.pos)))


class MaskOutput(NamedTuple):
    logits: Tensor  # (N, 1, 4g, 4g) fp32 low-res mask logits of the best-IoU mask
    obj_ptr: Tensor  # (N, d) object pointer (no_obj_ptr where the object score is <= 0)
    object_score: Tensor  # (N, 1) object-presence logit


class FrameMemory(NamedTuple):
    maskmem: Tensor | None  # (N, mem_dim, g, g) MEMORY_DTYPE; None once out of the memory window
    obj_ptr: Tensor  # (N, d)
    logits: Tensor | None  # (N, 1, 4g, 4g) fp32, kept for conditioning frames only


# Reference: SAM2VideoPredictor inference_state["output_dict"], bounded to what can still be read.
@dataclass
class VideoMemory:
    num_frames: int
    num_objects: int
    mem_window: int  # spatial memories read from non-conditioning frames t-1 .. t-mem_window
    ptr_window: int  # object pointers read from non-conditioning frames t-1 .. t-ptr_window
    cond: dict[int, FrameMemory] = field(default_factory=dict)
    recent: dict[int, FrameMemory] = field(default_factory=dict)
    maskmem_pos: Tensor | None = None  # (1, mem_dim, g, g), the same for every frame
    owners: Tensor | None = None  # (N,) the video of each object when several share the pass

    def merge(self, other: "VideoMemory") -> "VideoMemory":
        """The objects of both memories (self's first) as one: the same video tracked to the same
        frame, from the same conditioning frames. Objects are independent in SAM-2, so tracking
        them together from here equals tracking each set alone."""
        if (other.num_frames, sorted(other.cond), sorted(other.recent)) != (self.num_frames, sorted(self.cond),
                                                                            sorted(self.recent)):
            raise ValueError("these memories are not of the same video at the same frame with the same key frames")
        if self.owners is not None or other.owners is not None:
            raise ValueError("memories of several videos do not merge")

        def cat(a: Tensor | None, b: Tensor | None) -> Tensor | None:
            return None if a is None else torch.cat([a, b])

        def both(a: FrameMemory, b: FrameMemory) -> FrameMemory:
            return FrameMemory(cat(a.maskmem, b.maskmem), cat(a.obj_ptr, b.obj_ptr), cat(a.logits, b.logits))
        return VideoMemory(self.num_frames, self.num_objects + other.num_objects, self.mem_window, self.ptr_window,
                           cond={t: both(self.cond[t], other.cond[t]) for t in self.cond},
                           recent={t: both(self.recent[t], other.recent[t]) for t in self.recent},
                           maskmem_pos=self.maskmem_pos)

    def add_recent(self, t: int, entry: FrameMemory) -> None:
        """Store frame t's output and drop what frame t+1 and later can no longer read."""
        self.recent[t] = entry
        for f in list(self.recent):
            if f < t + 1 - self.ptr_window:
                del self.recent[f]
            elif f < t + 1 - self.mem_window and self.recent[f].maskmem is not None:
                self.recent[f] = self.recent[f]._replace(maskmem=None)


# Reference: Sa2VA `SAM2` (grounding_encoder) + the SAM2VideoPredictor paths it uses.
class SAM2Bridge(nn.Module):
    def __init__(self, cfg: SAM2Config):
        super().__init__()
        self.cfg = cfg
        self.sam2 = build_sam2(cfg)

    @property
    def _param(self) -> Tensor:
        return self.sam2.no_mem_embed

    def normalize(self, frames: Tensor, bf16_stats: bool = True) -> Tensor:
        """uint8 frames (T, 3, S, S), already resized to S x S (data.sam2_frames) -> normalised, in the module dtype.

        /255, then the config's mean/std (ImageNet). bf16_stats=True reproduces the HF remote code,
        whose mean/std tensors are built in bf16 (so e.g. std 0.229 becomes 0.2285); False gives the
        exact constants of the train code.
        """
        s = self.cfg.image_size
        if len(frames) == 0:
            raise ValueError("SAM-2 got no frames; pass at least one image")
        if frames.dtype != torch.uint8 or frames.ndim != 4 or frames.shape[1:] != (3, s, s):
            raise ValueError(f"SAM-2 frames are {frames.dtype} {tuple(frames.shape)}; expected uint8 (T, 3, {s}, {s}) "
                             "from data.sam2_frames")
        stats = torch.tensor([self.cfg.pixel_mean, self.cfg.pixel_std], device=frames.device)
        if bf16_stats:
            stats = stats.to(torch.bfloat16).float()
        x = frames.float() / 255.0
        x = (x - stats[0, :, None, None]) / stats[1, :, None, None]
        return x.to(device=self._param.device, dtype=self._param.dtype)

    def image_features(self, images: Tensor) -> Features:
        """(B, 3, S, S) frames from normalize() -> backbone features (compute once per frame)."""
        s = self.cfg.image_size
        if images.ndim != 4 or images.shape[1:] != (3, s, s):
            raise ValueError(f"images have shape {tuple(images.shape)}; "
                             f"expected (B, 3, {s}, {s}) from normalize()")
        dtype = self._param.dtype
        out = self.sam2.forward_image(images.to(dtype))
        s0, s1, embed = out["backbone_fpn"]  # scalp=1 dropped stride 32; conv_s0/s1 applied
        # FpnNeck upsamples in fp32, so top-down levels come back fp32 in a bf16 module
        pos = out["vision_pos_enc"][-1]
        return Features(s0=s0, s1=s1, embed=embed.to(dtype), pos=pos.to(dtype))

    def decode_with_prompt(self, features: Features, prompts: Tensor) -> MaskOutput:
        """Sa2VA's memory-less decode: one mask per 256-d `[SEG]` prompt (Sa2VA `SAM2.inject_language_embd`).

        `features` holds either one frame (shared by all prompts) or one frame per prompt.
        """
        d = self.cfg.d_model
        self._check_prompts(prompts)
        feats = features.expand(prompts.shape[0])
        pix = feats.embed + self.sam2.no_mem_embed.reshape(1, d, 1, 1)  # directly_add_no_mem_embed
        return self._decode(pix, feats, prompts.to(pix.dtype))

    def decode_with_points(self, features: Features, points: Tensor | None = None, labels: Tensor | None = None,
                           boxes: Tensor | None = None, multimask: bool = True) -> Tensor:
        """SAM-2's own prompts on one frame, as SAM2ImagePredictor._predict: N prompts of points
        (N, P, 2) with labels (N, P) (1 foreground, 0 background) and/or boxes (N, 4) as (x0, y0,
        x1, y1), in the S x S input's pixels -> (N, 1, 4g, 4g) fp32 logits: the best of the 3 masks
        by predicted IoU with multimask, else the single-mask output (with the decoder's
        stability fallback)."""
        d = self.cfg.d_model
        if len(features) != 1:
            raise ValueError(f"point and box prompts decode on one frame; got features of {len(features)}")
        coords, kinds = [], []
        if boxes is not None:  # a box is two corner points, labels 2 and 3, before any clicks
            coords.append(boxes.reshape(-1, 2, 2))
            kinds.append(torch.tensor([[2, 3]], dtype=torch.int, device=boxes.device).expand(len(boxes), 2))
        if points is not None:
            coords.append(points)
            kinds.append(labels.to(torch.int))
        if not coords:
            raise ValueError("give points or boxes to decode")
        coords = torch.cat(coords, dim=1).to(self._param.device, torch.float32)
        kinds = torch.cat(kinds, dim=1).to(self._param.device)
        n, g = len(coords), self.cfg.grid
        pix = features.embed + self.sam2.no_mem_embed.reshape(1, d, 1, 1)  # directly_add_no_mem_embed
        sparse = self._embed_points(coords, kinds).to(pix.dtype)
        dense = self.sam2.sam_prompt_encoder.no_mask_embed.weight.reshape(1, d, 1, 1).expand(n, d, g, g)
        masks, ious, _, _ = self.sam2.sam_mask_decoder(
            image_embeddings=pix, image_pe=self._dense_pe(pix.dtype), sparse_prompt_embeddings=sparse,
            dense_prompt_embeddings=dense, multimask_output=multimask, repeat_image=n > 1,
            high_res_features=[features.s0, features.s1])
        best = ious.argmax(dim=-1)
        return masks[torch.arange(n, device=masks.device), best][:, None].float()

    def postprocess(self, logits: Tensor, size: tuple[int, int]) -> Tensor:
        """(T, 1, 4g, 4g) low-res logits -> (T, H, W) bool masks.

        Two bilinear steps as the reference (logits -> S x S, the SAM2 state's "video
        resolution", then -> (H, W)); a direct resize differs slightly.
        """
        if logits.ndim != 4 or logits.shape[1] != 1:
            raise ValueError(f"logits have shape {tuple(logits.shape)}; expected (T, 1, h, w)")
        s = self.cfg.image_size
        x = F.interpolate(logits.float(), size=(s, s), mode="bilinear", align_corners=False)
        x = F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=False)
        return x[:, 0] > 0  # sigmoid > 0.5

    def track(self, frames: Frames, prompts: Tensor, cond_frames: Sequence[int] | None = None,
              num_frames: int | None = None) -> Iterator[tuple[int, Tensor]]:
        """Video masks for N prompts: yields (t, (N, 1, 4g, 4g) fp32 logits) for t = 0..T-1.

        frames: (T, 3, S, S) tensor, a sequence of (3, S, S) frames, or a callable t -> (3, S, S)
        (with num_frames) so long videos are decoded on demand. Conditioning frames (default
        0..min(5, T)-1, as Sa2VA) are decoded with the prompts now; the rest are propagated
        lazily as the iterator is consumed.
        """
        memory = self.condition(frames, prompts, cond_frames, num_frames)
        return self.propagate(frames, memory)

    @torch.no_grad()
    def condition(self, frames: Frames, prompts: Tensor, cond_frames: Sequence[int] | None = None,
                  num_frames: int | None = None, owners: Tensor | None = None) -> VideoMemory:
        """Decode every conditioning frame with the prompts and encode its memory.

        owners: several videos in one pass. frames(t) then gives (V, 3, S, S), frame t of each
        video, and owners (N,) long names the video of each prompt. Every video is tracked as if
        alone; they share the conditioning frames, and a shorter video is padded by the caller
        (e.g. with its last frame), whose extra outputs it drops.
        """
        if self.training:
            raise ValueError("video tracking is inference-only; call .eval() first")
        self._check_prompts(prompts)
        get_frame, num_frames = self._frame_source(frames, num_frames)
        if cond_frames is None:
            cond_frames = range(min(NUM_KEY_FRAMES, num_frames))
        cond_frames = sorted(cond_frames)
        if not cond_frames or len(set(cond_frames)) < len(cond_frames) or not (
                0 <= cond_frames[0] and cond_frames[-1] < num_frames):
            raise ValueError(f"cond_frames {cond_frames} must be a non-empty set of frame indices "
                             f"in [0, {num_frames})")
        memory = VideoMemory(num_frames=num_frames, num_objects=prompts.shape[0],
                             mem_window=self.cfg.num_maskmem - 1,
                             ptr_window=min(num_frames, self.cfg.max_obj_ptrs_in_encoder) - 1, owners=owners)
        for t in cond_frames:
            feats = self._object_features(self._frame_features(get_frame(t)), memory)
            out = self.decode_with_prompt(feats, prompts)
            maskmem, memory.maskmem_pos = self._encode_memory(feats, out.logits)
            memory.cond[t] = FrameMemory(maskmem, out.obj_ptr, out.logits)
        return memory

    @torch.no_grad()
    def propagate(self, frames: Frames, memory: VideoMemory, start: int = 0) -> Iterator[tuple[int, Tensor]]:
        """Forward sweep from frame `start` (the memory holds frames before it): conditioning
        frames give their stored logits, the others are tracked."""
        if self.training:
            raise ValueError("video tracking is inference-only; call .eval() first")
        get_frame, _ = self._frame_source(frames, memory.num_frames)
        for t in range(start, memory.num_frames):
            if t in memory.cond:
                yield t, memory.cond[t].logits
                continue
            frame_feats = self._frame_features(get_frame(t))
            feats = self._object_features(frame_feats, memory)
            out = self._decode(self._condition_on_memory(frame_feats, feats, t, memory), feats, None)
            maskmem, _ = self._encode_memory(feats, out.logits)
            memory.add_recent(t, FrameMemory(maskmem, out.obj_ptr, None))
            yield t, out.logits

    def _frame_features(self, frame: Tensor) -> Features:
        return self.image_features(frame[None] if frame.ndim == 3 else frame)

    @staticmethod
    def _object_features(frame_feats: Features, memory: VideoMemory) -> Features:
        """The frame features of every object: its video's row, or the one frame for all."""
        if memory.owners is None:
            return frame_feats.expand(memory.num_objects)
        return frame_feats.select(memory.owners)

    def _check_prompts(self, prompts: Tensor) -> None:
        d = self.cfg.d_model
        if prompts.ndim != 2 or prompts.shape[0] == 0 or prompts.shape[1] != d:
            raise ValueError(f"prompts have shape {tuple(prompts.shape)}; "
                             f"expected (N>0, {d}) projected [SEG] states")

    def _frame_source(self, frames: Frames, num_frames: int | None) -> tuple[Callable[[int], Tensor], int]:
        s = self.cfg.image_size
        if callable(frames):
            if num_frames is None:
                raise ValueError("num_frames is required when frames is a callable")
            fetch = frames
        else:
            if num_frames is not None and num_frames != len(frames):
                raise ValueError(f"num_frames={num_frames} but {len(frames)} frames were given")
            num_frames, fetch = len(frames), frames.__getitem__
        if num_frames < 1:
            raise ValueError("the video has no frames; pass at least one frame")

        def get_frame(t: int) -> Tensor:
            x = fetch(t)
            if not isinstance(x, Tensor) or x.shape[-3:] != (3, s, s) or x.ndim not in (3, 4):
                raise ValueError(f"frame {t} is not a (3, {s}, {s}) tensor (or (V, 3, {s}, {s}) for V videos); "
                                 "produce frames with normalize()")
            return x
        return get_frame, num_frames

    def _embed_points(self, coords: Tensor, labels: Tensor) -> Tensor:
        # PromptEncoder._embed_points, with the random-feature encoding in fp32 (as _dense_pe) so
        # that a bf16 module works outside autocast: (N, P, 2) input pixels -> (N, P[+1], d).
        enc = self.sam2.sam_prompt_encoder
        coords = coords.float() + 0.5  # pixel centres
        # one padding point: PromptEncoder.forward pads whenever boxes=None, which is how SAM-2
        # calls it (a box comes as two corner points)
        coords = torch.cat([coords, torch.zeros_like(coords[:, :1])], dim=1)
        labels = torch.cat([labels, -torch.ones_like(labels[:, :1])], dim=1)
        gauss = enc.pe_layer.positional_encoding_gaussian_matrix.float()
        proj = (2 * math.pi) * ((2 * coords / self.cfg.image_size - 1) @ gauss)
        pe = torch.cat([proj.sin(), proj.cos()], dim=-1)
        pe = torch.where((labels == -1)[..., None], torch.zeros_like(pe), pe)
        table = [enc.not_a_point_embed.weight] + [e.weight for e in enc.point_embeddings]  # labels -1, 0, 1, 2, 3
        for label, weight in zip(range(-1, 4), table):
            pe = pe + (labels == label)[..., None] * weight.float()
        return pe

    def _dense_pe(self, dtype: torch.dtype) -> Tensor:
        # PromptEncoder.get_dense_pe() multiplies an fp32 grid by the stored Gaussian matrix and so
        # fails for a bf16 module outside autocast: same maths in fp32, result cast.
        g = self.cfg.grid
        gauss = self.sam2.sam_prompt_encoder.pe_layer.positional_encoding_gaussian_matrix.float()
        c = (torch.arange(g, device=gauss.device, dtype=torch.float32) + 0.5) / g  # pixel centres
        xy = torch.stack(torch.meshgrid(c, c, indexing="xy"), dim=-1)  # (g, g, 2) as (x, y)
        proj = (2 * math.pi) * ((2 * xy - 1) @ gauss)  # (g, g, d/2)
        pe = torch.cat([proj.sin(), proj.cos()], dim=-1)  # (g, g, d)
        return pe.permute(2, 0, 1)[None].to(dtype)  # (1, d, g, g)

    def _decode(self, pix: Tensor, feats: Features, lang: Tensor | None) -> MaskOutput:
        # Reference: Sa2VA SAM2Base._forward_sam_heads with no points, no mask input and
        # multimask_output=True, minus the NO_OBJ_SCORE blanking (commented out in Sa2VA).
        n, d, g = pix.shape[0], self.cfg.d_model, self.cfg.grid
        prompt_encoder = self.sam2.sam_prompt_encoder
        # no points: the padded dummy point and the "no box" pad both embed as not_a_point
        sparse = prompt_encoder.not_a_point_embed.weight.expand(n, 2, d)  # (N, 2, d)
        if lang is not None:
            sparse = torch.cat([sparse, lang[:, None]], dim=1)  # (N, 3, d)
        dense = prompt_encoder.no_mask_embed.weight.reshape(1, d, 1, 1).expand(n, d, g, g)
        masks, ious, tokens, score = self.sam2.sam_mask_decoder(
            image_embeddings=pix, image_pe=self._dense_pe(pix.dtype),
            sparse_prompt_embeddings=sparse, dense_prompt_embeddings=dense, multimask_output=True,
            repeat_image=False, high_res_features=[feats.s0, feats.s1],
        )  # masks (N, 3, 4g, 4g), ious (N, 3), tokens (N, 3, d): the 3 multimask outputs
        best = ious.argmax(dim=-1)
        rows = torch.arange(n, device=pix.device)
        logits = masks[rows[:, None], best[:, None]].float()  # (N, 1, 4g, 4g), a new tensor (not a view)
        ptr = self.sam2.obj_ptr_proj(tokens[rows, best])  # (N, d)
        is_obj = (score > 0).to(ptr.dtype)  # (N, 1)
        ptr = is_obj * ptr + (1 - is_obj) * self.sam2.no_obj_ptr  # fixed_no_obj_ptr
        return MaskOutput(logits, ptr, score)

    def _encode_memory(self, feats: Features, logits: Tensor) -> tuple[Tensor, Tensor]:
        # Reference: SAM2Base._encode_new_memory on the S x S upsampled logits.
        s, dtype = self.cfg.image_size, feats.embed.dtype
        high_res = F.interpolate(logits, size=(s, s), mode="bilinear", align_corners=False)
        cfg = self.cfg
        mask = torch.sigmoid(high_res) * cfg.sigmoid_scale_for_mem_enc + cfg.sigmoid_bias_for_mem_enc
        out = self.sam2.memory_encoder(feats.embed, mask.to(dtype), skip_mask_sigmoid=True)
        return out["vision_features"].to(MEMORY_DTYPE), out["vision_pos_enc"][0][:1]

    def _condition_on_memory(self, frame_feats: Features, feats: Features, t: int, memory: VideoMemory) -> Tensor:
        # Reference: SAM2Base._prepare_memory_conditioned_features, eval mode, Sa2VA flags.
        n, d, g, dtype = len(feats), self.cfg.d_model, self.cfg.grid, feats.embed.dtype
        num_maskmem, mem_dim = self.cfg.num_maskmem, self.cfg.mem_dim
        tpos = self.sam2.maskmem_tpos_enc  # (num_maskmem, 1, 1, mem_dim)
        spatial_pos = memory.maskmem_pos.flatten(2).permute(2, 0, 1)  # (g*g, 1, mem_dim)
        tokens, pos = [], []

        def add(maskmem: Tensor, t_pos: int) -> None:
            tokens.append(maskmem.to(dtype).flatten(2).permute(2, 0, 1))  # (g*g, N, mem_dim)
            pos.append((spatial_pos + tpos[num_maskmem - 1 - t_pos]).expand(-1, n, -1))

        for f in sorted(memory.cond):  # every conditioning frame, t_pos 0
            add(memory.cond[f].maskmem, 0)
        for t_pos in range(1, num_maskmem):  # frame t - (num_maskmem - t_pos): t-6 first, t-1 last
            prev = memory.recent.get(t - (num_maskmem - t_pos))
            if prev is not None:
                add(prev.maskmem, t_pos)
        # object pointers: conditioning frames not in the future, then recent frames t-1, t-2, ...
        ptrs = [memory.cond[f].obj_ptr for f in sorted(memory.cond) if f <= t]
        ptrs += [memory.recent[f].obj_ptr for f in range(t - 1, t - 1 - memory.ptr_window, -1)
                 if f in memory.recent]
        num_ptr_tokens = 0
        if ptrs:
            # each d-wide pointer becomes d/mem_dim tokens of width mem_dim
            ptr = torch.stack(ptrs).to(dtype).reshape(len(ptrs), n, d // mem_dim, mem_dim)
            ptr = ptr.permute(0, 2, 1, 3).flatten(0, 1)  # (P * d/mem_dim, N, mem_dim)
            num_ptr_tokens = ptr.shape[0]
            tokens.append(ptr)
            pos.append(ptr.new_zeros(ptr.shape))  # add_tpos_enc_to_obj_ptrs=False
        out = self.attend_memory(frame_feats.embed.flatten(2).transpose(1, 2), frame_feats.pos.flatten(2).transpose(1, 2),
                                 torch.cat(tokens).transpose(0, 1), torch.cat(pos).transpose(0, 1), num_ptr_tokens,
                                 memory.owners)
        return out.transpose(1, 2).reshape(n, d, g, g)  # (N, g*g, d) -> (N, d, g, g)

    def attend_memory(self, curr: Tensor, curr_pos: Tensor, memory: Tensor, memory_pos: Tensor,
                      num_obj_ptr_tokens: int, owners: Tensor | None = None) -> Tensor:
        """SAM-2's memory attention for N objects: curr, curr_pos (V, g*g, d) the features of the
        frame (V = 1: shared by every object) or of V videos' frames, owners (N,) the row of each
        object; memory, memory_pos (N, M, mem_dim). -> (N, g*g, d).

        Reference: MemoryAttention.forward and MemoryAttentionLayer.forward (eval, batch first),
        with one change of order: the first layer's self-attention, whose input is the same for
        every object of a frame, runs once per frame and is then given to each of its objects.
        """
        ma = self.sam2.memory_attention
        x = curr + 0.1 * curr_pos if ma.pos_enc_at_input else curr
        for i, layer in enumerate(ma.layers):
            x = layer._forward_sa(x, curr_pos)
            if i == 0:
                x = x.expand(memory.shape[0], -1, -1) if owners is None else x[owners]
                curr_pos = curr_pos.expand(memory.shape[0], -1, -1) if owners is None else curr_pos[owners]
            x = layer._forward_ca(x, memory, curr_pos, memory_pos, num_obj_ptr_tokens)
            x = x + layer.dropout3(layer.linear2(layer.dropout(layer.activation(layer.linear1(layer.norm3(x))))))
        return ma.norm(x)

    def compile_parts(self, **options) -> None:
        """torch.compile the image encoder, the memory attention and the mask decoder."""
        self.sam2.image_encoder.compile(**options)
        self.sam2.sam_mask_decoder.compile(**options)
        self.attend_memory = torch.compile(self.attend_memory, **options)


# ----------------------------------------------------------------------------- Meta's SAM-2 for propagation

ORIGINAL_SAM2_CONFIG = "configs/sam2.1/sam2.1_hiera_l.yaml"  # sam2.1_hiera_large.pt


class _LazyFrames:
    """inference_state["images"] read frame by frame (as SAM-2's asynchronous frame loader is)."""

    def __init__(self, frames: Callable[[int], Tensor], num_frames: int):
        self.frames, self.num_frames = frames, num_frames

    def __len__(self) -> int:
        return self.num_frames

    def __getitem__(self, t: int) -> Tensor:
        return self.frames(t)


class OriginalSAM2:
    """Meta's SAM-2 video predictor with its own released weights, tracking key-frame masks
    through a video: Sa2VA-i's propagation with the original SAM-2 (kumuji/Sa2VA-i
    modeling_sa2va_chat.py predict_forward -> sam2.py SAM2.train_postprocess: the fine-tuned
    decoder's key-frame masks go in through add_new_mask, then propagate_in_video).

    Built as sam2.build_sam.build_sam2_video_predictor builds it (the same hydra config and
    post-processing overrides), from a state dict. Frames are read on demand, and each object's
    outputs are dropped once no later frame reads them (upstream keeps every frame's), so memory
    stays bounded. Runs under autocast when the dtype is not fp32, as upstream does."""

    def __init__(self, state: dict[str, Tensor], config: str = ORIGINAL_SAM2_CONFIG, overrides: Sequence[str] = (),
                 device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32):
        overrides = ["++model._target_=sam2.sam2_video_predictor.SAM2VideoPredictor",
                     "++model.sam_mask_decoder_extra_args.dynamic_multimask_via_stability=true",
                     "++model.sam_mask_decoder_extra_args.dynamic_multimask_stability_delta=0.05",
                     "++model.sam_mask_decoder_extra_args.dynamic_multimask_stability_thresh=0.98",
                     "++model.binarize_mask_from_pts_for_mem_enc=true", "++model.fill_hole_area=8", *overrides]
        try:
            cfg = compose(config_name=config, overrides=overrides)
        except HydraException as e:
            raise ValueError(f"SAM-2 config {config!r}: {' '.join(str(e).split())[:200]}") from None
        OmegaConf.resolve(cfg)
        with _LinspaceOnCPU():
            model = instantiate(cfg.model, _recursive_=True)
        missing, unexpected = set(model.state_dict()) - set(state), set(state) - set(model.state_dict())
        if missing or unexpected:
            raise ValueError(f"these weights are not a SAM-2 of {config}: {len(missing)} missing (e.g. "
                             f"{sorted(missing)[:2]}), {len(unexpected)} unexpected (e.g. {sorted(unexpected)[:2]})")
        model.load_state_dict(state)
        self.predictor = model.to(device).eval()
        self.dtype = dtype

    @property
    def image_size(self) -> int:
        return self.predictor.image_size

    @torch.inference_mode()
    def propagate(self, frames: Callable[[int], Tensor], num_frames: int, size: tuple[int, int],
                  key_masks: dict[int, Tensor]) -> Iterator[tuple[int, Tensor]]:
        """frames(t): uint8 (3, S, S) frame t resized to this model's size; key_masks: {frame:
        (N, H, W) bool} at the video's size (H, W) -> yields (t, (N, H, W) bool) from the first key
        frame on."""
        p, device = self.predictor, self.predictor.device
        mean = torch.tensor(IMAGENET_MEAN, device=device)[:, None, None]
        std = torch.tensor(IMAGENET_STD, device=device)[:, None, None]

        def frame(t: int) -> Tensor:  # as SAM-2's frame loader: /255, then its mean and std
            return (frames(t).to(device).float() / 255.0 - mean) / std
        state = self._init_state(_LazyFrames(frame, num_frames), num_frames, size)
        autocast = torch.autocast(device.type, dtype=self.dtype, enabled=self.dtype != torch.float32)
        with autocast:
            for t in sorted(key_masks):
                for k, mask in enumerate(key_masks[t]):
                    p.add_new_mask(state, t, k, mask)
            keep = max(p.num_maskmem, p.max_obj_ptrs_in_encoder)  # what _prepare_memory_conditioned_features reads
            for t, _, masks in p.propagate_in_video(state):
                for out in state["output_dict_per_obj"].values():
                    out["non_cond_frame_outputs"].pop(t - keep, None)
                yield t, masks[:, 0] > 0

    def _init_state(self, images, num_frames: int, size: tuple[int, int]) -> dict:
        # SAM2VideoPredictor.init_state (sam2 1.1.0) with `images` given instead of read from a path
        device = self.predictor.device
        H, W = size
        return {"images": images, "num_frames": num_frames, "offload_video_to_cpu": False,
                "offload_state_to_cpu": False, "video_height": H, "video_width": W, "device": device,
                "storage_device": device, "point_inputs_per_obj": {}, "mask_inputs_per_obj": {},
                "cached_features": {}, "constants": {}, "obj_id_to_idx": OrderedDict(), "obj_idx_to_id": OrderedDict(),
                "obj_ids": [], "output_dict_per_obj": {}, "temp_output_dict_per_obj": {}, "frames_tracked_per_obj": {}}
