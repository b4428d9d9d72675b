"""The Qwen3-VL vision tower (ViT, patch merger and deepstack mergers), as used by Sa2VA-Qwen3-VL-4B.

Reproduces transformers' `Qwen3VLVisionModel` (4.57, the version the Sa2VA checkpoint was made
with): Conv3d patch embedding with bias, a learned 48x48 position table bilinearly resampled
to each image's patch grid, 2-D rotary embedding, full attention within each image, LayerNorm
blocks with GELU-tanh MLPs, the final 2x2 merger (norm before the shuffle) and one deepstack
merger (norm after the shuffle) per layer in `deepstack_visual_indexes`.

Parameter names equal the official ones under `model.model.visual.`, so the converter maps
them with a prefix change only.

Deviations: as in qwen2_5_vit.py (patch embedding as a matmul, SDPA per image instead of
flash-attention's varlen kernel). The position-table resampling follows 4.57: interpolation
weights are cast to the table's dtype before the weighted sum (transformers 5 keeps them in
fp32), which only matters in bf16.
"""
import torch
import torch.nn.functional as F
from torch import nn

from model.config import Qwen3VisionConfig
from model.qwen2_5_vit import PatchEmbed, VisionAttention, check_patches, rope_2d, segment_groups, vision_positions


# Matches Qwen3VLVisionMLP (gelu_pytorch_tanh).
class VisionMLP(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.linear_fc1 = nn.Linear(dim, hidden)
        self.linear_fc2 = nn.Linear(hidden, dim)

    def forward(self, x):
        return self.linear_fc2(F.gelu(self.linear_fc1(x), approximate="tanh"))


# Matches Qwen3VLVisionBlock.
class Qwen3VisionBlock(nn.Module):
    def __init__(self, cfg: Qwen3VisionConfig):
        super().__init__()
        self.norm1 = nn.LayerNorm(cfg.hidden_size, eps=cfg.norm_eps)
        self.norm2 = nn.LayerNorm(cfg.hidden_size, eps=cfg.norm_eps)
        self.attn = VisionAttention(cfg.hidden_size, cfg.num_heads)
        self.mlp = VisionMLP(cfg.hidden_size, cfg.intermediate_size)

    def forward(self, x, cos, sin, groups: list[torch.Tensor]):
        x = x + self.attn(self.norm1(x), cos, sin, groups)
        return x + self.mlp(self.norm2(x))


# Matches Qwen3VLVisionPatchMerger; `postshuffle_norm` selects the deepstack variant.
class Qwen3PatchMerger(nn.Module):
    def __init__(self, cfg: Qwen3VisionConfig, postshuffle_norm: bool):
        super().__init__()
        merged = cfg.hidden_size * cfg.spatial_merge_size ** 2
        self.postshuffle_norm = postshuffle_norm
        self.norm = nn.LayerNorm(merged if postshuffle_norm else cfg.hidden_size, eps=cfg.norm_eps)
        self.linear_fc1 = nn.Linear(merged, merged)
        self.linear_fc2 = nn.Linear(merged, cfg.out_hidden_size)

    def forward(self, x):
        merged = self.linear_fc1.in_features
        if self.postshuffle_norm:
            x = self.norm(x.view(-1, merged))  # (L, C) -> (L/4, 4C): 4 patches of a block, then norm
        else:
            x = self.norm(x).view(-1, merged)
        return self.linear_fc2(F.gelu(self.linear_fc1(x)))


def interpolated_positions(table: torch.Tensor, grid_thw: torch.Tensor, merge: int) -> torch.Tensor:
    """Learned (side*side, C) position table resampled to every patch, in merge-block order (L, C).

    Bilinear with align_corners=True semantics: rows/cols sampled at linspace(0, side-1, h/w).
    Weights are cast to the table dtype and the four taps summed in it, as transformers 4.57 does.
    """
    side = round(table.shape[0] ** 0.5)
    out = []
    for t, h, w in grid_thw.tolist():
        taps = []
        for n in (h, w):
            pos = torch.linspace(0, side - 1, n)
            lo = pos.long()  # truncation == floor for these non-negative positions
            hi = (lo + 1).clamp(max=side - 1)
            frac = pos - lo
            taps.append((lo, hi, frac))
        (r0, r1, fr), (c0, c1, fc) = taps
        idx = torch.stack([r0[:, None] * side + c0, r0[:, None] * side + c1,
                           r1[:, None] * side + c0, r1[:, None] * side + c1]).flatten(1)  # (4, h*w)
        wts = torch.stack([(1 - fr)[:, None] * (1 - fc), (1 - fr)[:, None] * fc,
                           fr[:, None] * (1 - fc), fr[:, None] * fc]).flatten(1)
        emb = table[idx.to(table.device)] * wts.to(table)[..., None]  # (4, h*w, C)
        emb = emb[0] + emb[1] + emb[2] + emb[3]
        # raster (h, w) -> (h/m, w/m, m, m) merge-block order, repeated for each frame
        emb = emb.view(h // merge, merge, w // merge, merge, -1).permute(0, 2, 1, 3, 4).reshape(h * w, -1)
        out.append(emb.repeat(t, 1))
    return torch.cat(out)


# Matches Qwen3VLVisionModel.
class Qwen3VisionTower(nn.Module):
    def __init__(self, cfg: Qwen3VisionConfig):
        super().__init__()
        self.cfg = cfg
        self.patch_embed = PatchEmbed(cfg, bias=True)
        self.pos_embed = nn.Embedding(cfg.num_position_embeddings, cfg.hidden_size)
        self.blocks = nn.ModuleList(Qwen3VisionBlock(cfg) for _ in range(cfg.depth))
        self.merger = Qwen3PatchMerger(cfg, postshuffle_norm=False)
        self.deepstack_merger_list = nn.ModuleList(
            Qwen3PatchMerger(cfg, postshuffle_norm=True) for _ in cfg.deepstack_visual_indexes)

    def forward(self, pixel_values: torch.Tensor, grid_thw: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Flattened patches (L, C*t*p*p) + grid_thw (n_images, 3) ->
        (merged tokens (L/4, out_hidden_size), deepstack features: one (L/4, out_hidden_size) per index).

        Tokens come out image by image, each in row-major order of its 2x2-merged grid.
        """
        cfg, m = self.cfg, self.cfg.spatial_merge_size
        check_patches(pixel_values, grid_thw, cfg.patch_dim, m)
        x = self.patch_embed(pixel_values)
        x = x + interpolated_positions(self.pos_embed.weight, grid_thw, m).to(x.dtype)
        cos, sin = rope_2d(vision_positions(grid_thw, m).to(x.device), cfg.head_dim, cfg.rope_theta)
        frame_lens = (grid_thw[:, 1] * grid_thw[:, 2]).repeat_interleave(grid_thw[:, 0]).tolist()
        groups = segment_groups(frame_lens, x.device)
        deepstack = []
        for i, blk in enumerate(self.blocks):
            x = blk(x, cos, sin, groups)
            if i in cfg.deepstack_visual_indexes:
                deepstack.append(self.deepstack_merger_list[cfg.deepstack_visual_indexes.index(i)](x))
        return self.merger(x), deepstack
