"""The Sa2VA network: vision tower + projector + LLM + `[SEG]` projector + SAM-2 bridge.

Reproduces `Sa2VAChatModel` / `Sa2VAChatModelQwen` (official HF remote code) as one composed
module. Parameter names are ours; convert.py maps the official ones. Inference orchestration
(prompts, generation, mask post-processing) lives in sa2va.py, not here.
"""
import torch
from torch import nn

from model.config import Sa2VAConfig
from model.intern_vit import InternViT, InternVLProjector
from model.llm import LLM


class Sa2VAModel(nn.Module):
    def __init__(self, cfg: Sa2VAConfig):
        super().__init__()
        self.cfg = cfg
        D = cfg.llm.dim
        if cfg.family == "internvl":
            self.vision = InternViT(cfg.vision)
            self.projector = InternVLProjector(cfg.vision.hidden_size, D)
        elif cfg.family == "qwen2_5_vl":
            from model.qwen2_5_vit import Qwen25VisionTower
            self.vision = Qwen25VisionTower(cfg.vision)
        else:
            from model.qwen3_vit import Qwen3VisionTower
            self.vision = Qwen3VisionTower(cfg.vision)
        self.llm = LLM(cfg.llm)
        # Official `text_hidden_fcs`: Linear, ReLU, Linear, Dropout(0.0); indices 0 and 2 hold weights.
        self.text_hidden_fcs = nn.Sequential(nn.Linear(D, D), nn.ReLU(), nn.Linear(D, cfg.seg_dim), nn.Dropout(0.0))
        if cfg.sam2 is not None:
            from model.sam2_bridge import SAM2Bridge
            self.grounding = SAM2Bridge(cfg.sam2)

    def encode_tiles(self, pixels: torch.Tensor) -> torch.Tensor:
        """InternVL: tiles (N, 3, S, S) -> LLM-space visual tokens (N, tokens_per_tile, D)."""
        return self.projector(self.vision(pixels))

    def encode_qwen(self, pixel_values: torch.Tensor, grid_thw: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Qwen-VL: flattened patches + grids -> visual tokens (N, D) and deepstack features (Qwen3-VL)."""
        out = self.vision(pixel_values, grid_thw)
        return out if self.cfg.family == "qwen3_vl" else (out, [])

    def embed(self, input_ids: torch.Tensor, visual: torch.Tensor | None, visual_token_id: int) -> torch.Tensor:
        """Token embeddings (B, L, D) with the visual-token rows replaced, in order, by `visual` (N, D)."""
        x = self.llm.embed_tokens(input_ids)
        slots = input_ids == visual_token_id
        n_slots = int(slots.sum())
        n_vis = 0 if visual is None else visual.shape[0]
        if n_slots != n_vis:
            raise ValueError(f"the prompt has {n_slots} image-context tokens but the vision tower gave {n_vis} "
                             "embeddings; build prompts with data.py so the two agree")
        if n_vis:
            x = x.masked_scatter(slots[..., None], visual.to(x.dtype))
        return x
