"""InternViT and the InternVL projector (pixel shuffle + `mlp1`), composed as the InternVL vision path.

Reproduces OpenGVLab's `InternVisionModel` (modeling_intern_vit.py) in the two shapes Sa2VA
ships: InternViT-300M (LayerNorm, qkv bias) and InternViT-6B (RMSNorm, qk-norm over the whole
width, no qkv bias; Sa2VA-26B), and InternVL-Chat's `pixel_shuffle` (ps_version v2) + `mlp1`.
Deviation: no drop-path and no flash-attention branch; SDPA computes the same attention.
"""
import torch
import torch.nn.functional as F
from torch import nn

from model.config import InternViTConfig
from model.llm import RMSNorm


def _norm(cfg: InternViTConfig, dim: int) -> nn.Module:
    if cfg.norm_type == "rms_norm":
        return RMSNorm(dim, cfg.norm_eps)
    return nn.LayerNorm(dim, eps=cfg.norm_eps)


# Matches InternAttention (modeling_intern_vit.py).
class ViTAttention(nn.Module):
    def __init__(self, cfg: InternViTConfig):
        super().__init__()
        C = cfg.hidden_size
        self.n_heads = cfg.n_heads
        self.qkv = nn.Linear(C, 3 * C, bias=cfg.qkv_bias)
        self.qk_norm = cfg.qk_norm
        if cfg.qk_norm:  # over all heads at once (C wide), not per head
            self.q_norm = RMSNorm(C, cfg.norm_eps)
            self.k_norm = RMSNorm(C, cfg.norm_eps)
        self.proj = nn.Linear(C, C)

    def forward(self, x):
        B, N, C = x.shape
        q, k, v = self.qkv(x).view(B, N, 3, C).unbind(2)  # each (B, N, C)
        if self.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k, v = (t.view(B, N, self.n_heads, -1).transpose(1, 2) for t in (q, k, v))  # (B, nh, N, hd)
        y = F.scaled_dot_product_attention(q, k, v)
        return self.proj(y.transpose(1, 2).reshape(B, N, C))


# Matches InternVisionEncoderLayer.
class ViTBlock(nn.Module):
    def __init__(self, cfg: InternViTConfig):
        super().__init__()
        C = cfg.hidden_size
        self.norm1 = _norm(cfg, C)
        self.attn = ViTAttention(cfg)
        self.ls1 = nn.Parameter(torch.ones(C))
        self.norm2 = _norm(cfg, C)
        self.fc1 = nn.Linear(C, cfg.intermediate_size)
        self.fc2 = nn.Linear(cfg.intermediate_size, C)
        self.ls2 = nn.Parameter(torch.ones(C))

    def forward(self, x):
        x = x + self.ls1 * self.attn(self.norm1(x))
        return x + self.ls2 * self.fc2(F.gelu(self.fc1(self.norm2(x))))


# Matches InternVisionModel (embeddings + encoder; select_layer -1, no final norm).
class InternViT(nn.Module):
    def __init__(self, cfg: InternViTConfig):
        super().__init__()
        self.cfg = cfg
        C = cfg.hidden_size
        self.patch_embed = nn.Conv2d(3, C, kernel_size=cfg.patch_size, stride=cfg.patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, C))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + cfg.grid ** 2, C))
        self.blocks = nn.ModuleList(ViTBlock(cfg) for _ in range(cfg.n_layers))

    def _patch_pos_embed(self, gh: int, gw: int, dtype):
        g = self.cfg.grid
        pos = self.pos_embed[:, 1:]
        if (gh, gw) == (g, g):  # the reference's bicubic resize is an identity at the native grid
            return pos.to(dtype)
        pos = pos.float().reshape(1, g, g, -1).permute(0, 3, 1, 2)  # (1, C, g, g)
        pos = F.interpolate(pos, size=(gh, gw), mode="bicubic", align_corners=False)
        return pos.flatten(2).transpose(1, 2).to(dtype)  # (1, gh*gw, C)

    def forward(self, pixels):
        """pixels (N, 3, H, W) normalised tiles -> patch features (N, H/14 * W/14, C), CLS dropped."""
        x = self.patch_embed(pixels.to(self.patch_embed.weight.dtype))  # (N, C, gh, gw)
        gh, gw = x.shape[-2:]
        x = x.flatten(2).transpose(1, 2)  # (N, gh*gw, C)
        cls = self.cls_token.expand(x.shape[0], -1, -1).to(x.dtype)
        pos = torch.cat([self.pos_embed[:, :1].to(x.dtype), self._patch_pos_embed(gh, gw, x.dtype)], dim=1)
        x = torch.cat([cls, x], dim=1) + pos
        for blk in self.blocks:
            x = blk(x)
        return x[:, 1:]


def pixel_shuffle(x: torch.Tensor) -> torch.Tensor:
    """InternVL's pixel_shuffle, ps_version v2, ratio 0.5: (N, g*g, C) -> (N, g/2 * g/2, 4C).

    Output token (i, j) concatenates patches (2i, 2j), (2i, 2j+1), (2i+1, 2j), (2i+1, 2j+1).
    """
    N, T, C = x.shape
    g = int(T ** 0.5)
    if g * g != T or g % 2:
        raise ValueError(f"pixel shuffle needs an even square patch grid, got {T} tokens")
    x = x.view(N, g // 2, 2, g // 2, 2, C)  # (N, i, dr, j, dc, C)
    x = x.permute(0, 1, 3, 2, 4, 5)  # (N, i, j, dr, dc, C)
    return x.reshape(N, (g // 2) ** 2, 4 * C)


# Matches InternVLChatModel.mlp1.
class InternVLProjector(nn.Module):
    def __init__(self, vit_dim: int, llm_dim: int):
        super().__init__()
        self.norm = nn.LayerNorm(4 * vit_dim)  # default eps 1e-5, unlike the ViT's norms
        self.fc1 = nn.Linear(4 * vit_dim, llm_dim)
        self.fc2 = nn.Linear(llm_dim, llm_dim)

    def forward(self, x):
        x = pixel_shuffle(x)
        return self.fc2(F.gelu(self.fc1(self.norm(x))))


# Matches InternVLChatModel.extract_feature (ViT, CLS dropped, pixel shuffle, mlp1).
class InternVLVision(nn.Module):
    def __init__(self, cfg: InternViTConfig, llm_dim: int):
        super().__init__()
        self.cfg = cfg
        self.vit = InternViT(cfg)
        self.projector = InternVLProjector(cfg.hidden_size, llm_dim)

    def forward(self, pixel_values: torch.Tensor, grid_thw: torch.Tensor | None = None) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Normalised tiles (N, 3, S, S) -> LLM-space tokens (N * tokens_per_tile, D), tile by tile.

        The signature of every vision tower: grid_thw is the Qwen towers' and must be None here;
        InternVL has no deepstack features, so the list is empty.
        """
        if grid_thw is not None:
            raise ValueError("InternVL tiles take no grid_thw; pass pixel_values from the InternVL processor")
        return self.projector(self.vit(pixel_values)).flatten(0, 1), []
