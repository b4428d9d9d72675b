"""The Sa2VA network: vision tower + LLM + `[SEG]` projector + SAM-2 bridge, and its forward.

Reproduces `Sa2VAChatModel` / `Sa2VAChatModelQwen` (official HF remote code) as one composed
module, and the official training forward (`projects/sa2va/models/sa2va.py: Sa2VAModel.forward`
with `sam2_train.py: SAM2TrainRunner.inject_language_embd`): a teacher-forced MLLM pass, the
`[SEG]` states through `text_hidden_fcs`, and every requested (`[SEG]`, frame) pair decoded by
SAM-2 without memory. Losses, the 5-objects-per-frame rule and video propagation live outside.

Parameter names are ours; convert.py maps the official ones. Inputs come from the processors in
data.py; prompts, generation and mask post-processing live in sa2va.py.

Deviation: SAM-2 frames are normalised with the bf16-rounded mean/std of the HF remote code in
training as well (the train code uses the exact constants; std differs by 0.2% at most).
"""
from dataclasses import dataclass, fields

import torch
from torch import Tensor, nn

from model.config import Sa2VAConfig
from model.intern_vit import InternVLVision
from model.llm import LLM
from model.qwen2_5_vit import Qwen25VisionTower
from model.qwen3_vit import Qwen3VisionTower
from model.sam2_bridge import SAM2Bridge

VISION_TOWERS = {"internvl": InternVLVision, "qwen2_5_vl": Qwen25VisionTower, "qwen3_vl": Qwen3VisionTower}
# What a vision tower returns: tokens (N, D) and per-layer deepstack features (Qwen3-VL), each (N, D).
VisionOutput = tuple[Tensor, list[Tensor]]


@dataclass
class ModelInputs:
    """A padded batch as the model takes it; data.collate builds it from processor samples."""
    input_ids: Tensor  # (B, L) long
    positions: Tensor  # (B, L) RoPE positions, or (3, B, L) multimodal RoPE
    key_mask: Tensor | None = None  # (B, L) bool, False on padding; None when nothing is padded
    # Vision-tower inputs for every sample in order: InternVL normalised tiles (N, 3, S, S);
    # Qwen-VL flattened patches (N_patches, C*t*p*p) with grid_thw (N_images, 3).
    pixel_values: Tensor | None = None
    grid_thw: Tensor | None = None
    # For every visual-token slot of input_ids, in order: the row of the vision tower's output that
    # fills it (tiles in order, then InternVL's <vp> region rows picked from the last tile).
    visual_rows: Tensor | None = None  # (N_slots,) long
    sam2_frames: Tensor | None = None  # (F, 3, S, S) uint8, resized for SAM-2
    # (P, 2) long: decode [SEG] number i (counted over the batch, row by row) on frame f of
    # sam2_frames. None: no SAM-2 work. Empty (0, 2): a training batch without masks; SAM-2
    # decodes a stand-in so that every parameter takes part (the same graph on every process).
    mask_queries: Tensor | None = None
    labels: Tensor | None = None  # (B, L) long, -100 where no loss (training)
    mask_targets: Tensor | None = None  # (P, 4g, 4g) bool: the ground truth of each mask query (training)

    def to(self, device, dtype: torch.dtype | None = None) -> "ModelInputs":
        """Move every tensor to device; floating ones (pixel values) also to dtype."""
        def move(t):
            if t is None:
                return None
            return t.to(device, dtype) if dtype is not None and t.is_floating_point() else t.to(device)
        return ModelInputs(**{f.name: move(getattr(self, f.name)) for f in fields(self)})


@dataclass
class ModelOutput:
    logits: Tensor | None  # (B, L, V) next-token logits, (N, V) at the positions asked for, or None
    hidden: Tensor  # (B, L, D) the hidden state [SEG] reads (pre- or post-norm, per config)
    seg_prompts: Tensor  # (N_seg, seg_dim): text_hidden_fcs of every [SEG] input token, row by row
    mask_logits: Tensor | None  # (P, 1, 4g, 4g) fp32 low-res logits, one per mask query (P may be 0)


class Sa2VAModel(nn.Module):
    def __init__(self, cfg: Sa2VAConfig):
        super().__init__()
        self.cfg = cfg
        D = cfg.llm.dim
        if cfg.family == "internvl":
            self.vision = InternVLVision(cfg.vision, D)
        else:
            self.vision = VISION_TOWERS[cfg.family](cfg.vision)
        self.llm = LLM(cfg.llm)
        # Official `text_hidden_fcs`: Linear, ReLU, Linear, Dropout(0.0); indices 0 and 2 hold weights.
        self.text_hidden_fcs = nn.Sequential(nn.Linear(D, D), nn.ReLU(), nn.Linear(D, cfg.seg_dim), nn.Dropout(0.0))
        if cfg.sam2 is not None:
            self.grounding = SAM2Bridge(cfg.sam2)

    def forward(self, inputs: ModelInputs, vision: VisionOutput | None = None,
                logits: bool | Tensor = True, decode: tuple[Tensor, Tensor] | None = None) -> ModelOutput:
        """Teacher-forced pass: LM logits, the [SEG] prompts and SAM-2 mask logits per mask query.

        vision: the vision tower's output for inputs.pixel_values when already computed (a
        conversation's follow-up turn). logits: True for (B, L, V), False for none (inference
        needs only [SEG]), or a (B, L) bool mask for (N, V) at those positions (training reads
        only the answers', see losses.loss_positions: the full (B, L, V) is the largest tensor).
        decode: (prompts (N_seg, seg_dim), use (N_seg,) bool): SAM-2 decodes those prompts instead
        of the [SEG] states' where `use` (train.py's --phrase-warmup); seg_prompts stay the model's.
        """
        if vision is None and inputs.pixel_values is not None:
            vision = self.vision(inputs.pixel_values, inputs.grid_thw)
        embeds, deepstack, visual_mask = self.embed_inputs(inputs, vision)
        h_post, h_pre = self.llm(embeds, inputs.positions, inputs.key_mask, deepstack=deepstack, visual_mask=visual_mask)
        hidden = h_pre if self.cfg.seg_hidden_prenorm else h_post
        seg = inputs.input_ids == self.cfg.seg_token_id
        if inputs.key_mask is not None:
            seg &= inputs.key_mask
        prompts = self.text_hidden_fcs(hidden[seg])  # (N_seg, seg_dim), row-major over the batch
        masks = None
        if inputs.mask_queries is not None and len(inputs.mask_queries):
            decoded = prompts
            if decode is not None:
                if decode[0].shape != prompts.shape:
                    raise ValueError(f"decode has shape {tuple(decode[0].shape)}, the [SEG] prompts {tuple(prompts.shape)}")
                decoded = torch.where(decode[1][:, None], decode[0].to(prompts.dtype), prompts)
            masks = self.decode_masks(inputs.sam2_frames, decoded, inputs.mask_queries)
        elif inputs.mask_queries is not None:  # a stand-in: a blank frame, the first token's state
            s = self.cfg.sam2.image_size
            blank = torch.zeros(1, 3, s, s, dtype=torch.uint8, device=hidden.device)
            stand_in = self.text_hidden_fcs(hidden[:1, 0])
            masks = self.decode_masks(blank, stand_in, torch.zeros(1, 2, dtype=torch.long, device=hidden.device))[:0].clone()
        if isinstance(logits, Tensor):
            out_logits = self.llm.logits(h_post[logits])
        else:
            out_logits = self.llm.logits(h_post) if logits else None
        return ModelOutput(out_logits, hidden, prompts, masks)

    def embed_inputs(self, inputs: ModelInputs, vision: VisionOutput | None) -> tuple[Tensor, list[Tensor] | None, Tensor]:
        """Token embeddings with the visual rows spliced in, the deepstack features for those
        slots (Qwen3-VL, else None) and the slot mask (B, L), ready for the LLM or generation."""
        visual, deepstack = (None, []) if vision is None else vision
        if visual is not None and inputs.visual_rows is not None:
            visual = visual[inputs.visual_rows]
            deepstack = [d[inputs.visual_rows] for d in deepstack]
        visual_mask = inputs.input_ids == self.cfg.image_token_id
        if inputs.key_mask is not None:
            visual_mask &= inputs.key_mask
        return self.embed(inputs.input_ids, visual, visual_mask), deepstack or None, visual_mask

    def embed(self, input_ids: Tensor, visual: Tensor | None, slots: Tensor | None = None) -> Tensor:
        """Token embeddings (B, L, D) with the visual-token slots replaced, in order, by `visual` (N, D).

        slots: (B, L) bool, default `input_ids == image_token_id`.
        """
        x = self.llm.embed_tokens(input_ids)
        if slots is None:
            slots = input_ids == self.cfg.image_token_id
        n_slots = int(slots.sum())
        n_vis = 0 if visual is None else visual.shape[0]
        if n_slots != n_vis:
            raise ValueError(f"the prompt has {n_slots} image-context tokens but the vision tower gave {n_vis} "
                             "embeddings; build prompts with data.py so the two agree")
        if visual is not None:  # also with no rows: a blank image still joins the graph (training)
            x = x.masked_scatter(slots[..., None], visual.to(x.dtype))
        return x

    def decode_masks(self, frames: Tensor, prompts: Tensor, queries: Tensor) -> Tensor:
        """SAM-2 without memory: frames (F, 3, S, S) uint8, prompts (N, seg_dim), queries (P, 2) of
        (prompt, frame) -> (P, 1, 4g, 4g) fp32 logits. Image features are computed once per frame."""
        if frames is None:
            raise ValueError("mask queries need sam2_frames; build the inputs with a processor given media")
        seg, frame = queries.unbind(-1)
        if len(prompts) <= int(seg.max()) or len(frames) <= int(frame.max()):
            raise ValueError(f"mask queries name [SEG] {int(seg.max())} and frame {int(frame.max())}, but the batch "
                             f"has {len(prompts)} [SEG] tokens and {len(frames)} SAM-2 frames")
        feats = self.grounding.image_features(self.grounding.normalize(frames))
        return self.grounding.decode_with_prompt(feats.select(frame), prompts[seg]).logits
