"""The Qwen2.5-VL vision tower (ViT + patch merger), as used by Sa2VA-Qwen2_5-VL-3B/-7B.

Reproduces transformers' `Qwen2_5_VisionTransformerPretrainedModel` (4.57, the version the
Sa2VA checkpoints were made with): Conv3d patch embedding, 2-D rotary embedding, window
attention with a few full-attention blocks, RMSNorm, SwiGLU MLPs with biases, and the 2x2
patch merger. Inputs are the flattened patches and `grid_thw` from qwen_processing.py.

Parameter names equal the official ones under `model.model.visual.`, so the converter maps
them with a prefix change only.

Deviations: the patch embedding runs as a matmul (same weights, same result up to float
rounding); attention batches equal-length windows into one SDPA call instead of
flash-attention's varlen kernel. Images (and video frames) never attend to each other.
"""
import torch
import torch.nn.functional as F
from torch import nn

from model.config import Qwen25VisionConfig
from model.llm import RMSNorm


def vision_positions(grid_thw: torch.Tensor, merge: int) -> torch.Tensor:
    """(row, col) patch coordinates (L, 2), patches listed in 2x2 merge-block order per frame."""
    out = []
    for t, h, w in grid_thw.tolist():
        rows = torch.arange(h).view(h // merge, merge, 1, 1).expand(-1, -1, w // merge, merge)
        cols = torch.arange(w).view(1, 1, w // merge, merge).expand(h // merge, merge, -1, -1)
        # (h/m, m, w/m, m) -> (h/m, w/m, m, m): the merge-block order the processor emits
        rc = torch.stack([rows, cols], -1).permute(0, 2, 1, 3, 4).reshape(h * w, 2)
        out.append(rc.repeat(t, 1))
    return torch.cat(out)


def rope_2d(positions: torch.Tensor, head_dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin (L, head_dim) in fp32: each half of head_dim is (row freqs || col freqs)."""
    dim = head_dim // 2  # rows and columns each get head_dim/4 frequencies
    inv_freq = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.float) / dim))
    freqs = (positions.float()[..., None] * inv_freq).flatten(1)  # (L, 2, dim/2) -> (L, dim)
    emb = torch.cat([freqs, freqs], -1)
    return emb.cos(), emb.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate-half RoPE in fp32 on x (L, nh, hd); cos/sin (L, hd)."""
    x32 = x.float()
    x1, x2 = x32.chunk(2, -1)
    rotated = torch.cat([-x2, x1], -1)
    return (x32 * cos[:, None] + rotated * sin[:, None]).to(x.dtype)


def segment_groups(seqlens: list[int], device) -> list[torch.Tensor]:
    """Token indices of consecutive segments, grouped by length: one (n_segments, length) tensor per length."""
    starts = torch.tensor([0] + seqlens[:-1]).cumsum(0)
    lengths = torch.tensor(seqlens)
    return [(starts[lengths == n][:, None] + torch.arange(n)).to(device) for n in sorted(set(seqlens))]


def segment_attention(q, k, v, groups: list[torch.Tensor]) -> torch.Tensor:
    """Bidirectional attention within segments; q, k, v (L, nh, hd) -> (L, nh, hd).

    Segments of equal length are batched into one SDPA call (`groups` from segment_groups).
    """
    out = torch.empty_like(q)
    for idx in groups:
        qs, ks, vs = (t[idx].transpose(1, 2) for t in (q, k, v))  # (segments, nh, length, hd)
        out[idx] = F.scaled_dot_product_attention(qs, ks, vs).transpose(1, 2)
    return out


def check_patches(pixel_values: torch.Tensor, grid_thw: torch.Tensor, patch_dim: int, merge: int):
    """Raise a ValueError when the patches and grid_thw do not describe the same images."""
    if grid_thw.ndim != 2 or grid_thw.shape[1] != 3:
        raise ValueError(f"grid_thw must be (n_images, 3), got {tuple(grid_thw.shape)}")
    if pixel_values.ndim != 2 or pixel_values.shape[1] != patch_dim:
        raise ValueError(f"pixel_values must be (L, {patch_dim}), got {tuple(pixel_values.shape)}; "
                         "build them with qwen_processing.py for this model family")
    if bool((grid_thw[:, 1:] % merge).any()):
        raise ValueError(f"grid heights/widths {grid_thw[:, 1:].tolist()} must be multiples of {merge}")
    n = int(grid_thw.prod(-1).sum())
    if n != pixel_values.shape[0]:
        raise ValueError(f"grid_thw describes {n} patches but pixel_values has {pixel_values.shape[0]}; "
                         "pass the grid_thw that came with these pixel_values")


# Matches Qwen2_5_VLVisionAttention (Qwen3VLVisionAttention is the same).
class VisionAttention(nn.Module):
    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x, cos, sin, groups: list[torch.Tensor]):
        L, C = x.shape
        q, k, v = self.qkv(x).view(L, 3, self.num_heads, -1).unbind(1)  # each (L, nh, hd)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        return self.proj(segment_attention(q, k, v, groups).reshape(L, C))


# Matches Qwen2_5_VLMLP (bias=True, silu).
class SwiGLU(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.gate_proj = nn.Linear(dim, hidden)
        self.up_proj = nn.Linear(dim, hidden)
        self.down_proj = nn.Linear(hidden, dim)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


# Matches Qwen2_5_VLVisionBlock.
class Qwen25VisionBlock(nn.Module):
    def __init__(self, cfg: Qwen25VisionConfig):
        super().__init__()
        self.norm1 = RMSNorm(cfg.hidden_size, cfg.norm_eps)
        self.norm2 = RMSNorm(cfg.hidden_size, cfg.norm_eps)
        self.attn = VisionAttention(cfg.hidden_size, cfg.num_heads)
        self.mlp = SwiGLU(cfg.hidden_size, cfg.intermediate_size)

    def forward(self, x, cos, sin, groups: list[torch.Tensor]):
        x = x + self.attn(self.norm1(x), cos, sin, groups)
        return x + self.mlp(self.norm2(x))


# Matches Qwen2_5_VLPatchMerger.
class Qwen25PatchMerger(nn.Module):
    def __init__(self, cfg: Qwen25VisionConfig):
        super().__init__()
        merged = cfg.hidden_size * cfg.spatial_merge_size ** 2
        self.ln_q = RMSNorm(cfg.hidden_size, cfg.norm_eps)
        self.mlp = nn.Sequential(nn.Linear(merged, merged), nn.GELU(), nn.Linear(merged, cfg.out_hidden_size))

    def forward(self, x):
        x = self.ln_q(x)
        return self.mlp(x.view(-1, self.mlp[0].in_features))  # (L, C) -> (L/4, 4C): 4 patches of a block


# Matches Qwen2_5_VisionPatchEmbed / Qwen3VLVisionPatchEmbed: Conv3d, kernel == stride, bias in Qwen3-VL only.
class PatchEmbed(nn.Module):
    def __init__(self, cfg, bias: bool):
        super().__init__()
        k = (cfg.temporal_patch_size, cfg.patch_size, cfg.patch_size)
        self.proj = nn.Conv3d(cfg.in_channels, cfg.hidden_size, kernel_size=k, stride=k, bias=bias)

    def forward(self, x):
        # Each patch is one conv window, so the conv is a matmul over the flattened (C, t, p, p)
        # patch; Conv3d here hits very slow cuDNN paths on some GPUs (transformers#45750).
        w = self.proj.weight
        return F.linear(x.to(w.dtype), w.flatten(1), self.proj.bias)  # (L, C*t*p*p) -> (L, D)


def window_order(grid_thw: torch.Tensor, merge: int, window: int) -> tuple[torch.Tensor, list[int]]:
    """Permutation of merged tokens into window order, and the window lengths in patches.

    Per frame, the (h/m, w/m) grid of merged tokens is cut into window x window tiles from the
    top-left (edge tiles are smaller); tiles are listed row-major, tokens row-major inside.
    """
    order, seqlens, base = [], [], 0
    for t, h, w in grid_thw.tolist():
        gh, gw = h // merge, w // merge
        for _ in range(t):
            grid = torch.arange(gh * gw).view(gh, gw) + base
            for r in range(0, gh, window):
                for c in range(0, gw, window):
                    tile = grid[r:r + window, c:c + window].flatten()
                    order.append(tile)
                    seqlens.append(tile.numel() * merge * merge)
            base += gh * gw
    return torch.cat(order), seqlens


# Matches Qwen2_5_VisionTransformerPretrainedModel.
class Qwen25VisionTower(nn.Module):
    def __init__(self, cfg: Qwen25VisionConfig):
        super().__init__()
        self.cfg = cfg
        self.patch_embed = PatchEmbed(cfg, bias=False)
        self.blocks = nn.ModuleList(Qwen25VisionBlock(cfg) for _ in range(cfg.depth))
        self.merger = Qwen25PatchMerger(cfg)

    def forward(self, pixel_values: torch.Tensor, grid_thw: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Flattened patches (L, C*t*p*p) + grid_thw (n_images, 3) -> merged tokens (L/4, out_hidden_size)
        and no deepstack features (the signature every vision tower shares).

        Tokens come out image by image, each in row-major order of its 2x2-merged grid.
        """
        cfg, m = self.cfg, self.cfg.spatial_merge_size
        check_patches(pixel_values, grid_thw, cfg.patch_dim, m)
        unit = m * m  # patches per merged token
        order, window_lens = window_order(grid_thw, m, cfg.window_tokens)
        order = order.to(pixel_values.device)
        frame_lens = (grid_thw[:, 1] * grid_thw[:, 2]).repeat_interleave(grid_thw[:, 0]).tolist()
        full, windowed = segment_groups(frame_lens, order.device), segment_groups(window_lens, order.device)

        x = self.patch_embed(pixel_values)
        L = x.shape[0]
        x = x.view(L // unit, unit, -1)[order].view(L, -1)  # patches regrouped window by window
        cos, sin = rope_2d(vision_positions(grid_thw, m).to(x.device), cfg.head_dim, cfg.rope_theta)
        cos, sin = (t.view(L // unit, unit, -1)[order].view(L, -1) for t in (cos, sin))
        for i, blk in enumerate(self.blocks):
            x = blk(x, cos, sin, full if i in cfg.fullatt_block_indexes else windowed)
        return self.merger(x)[torch.argsort(order)], []
