"""The decoder-only LLM of every Sa2VA family, one implementation with flags.

Reproduces, in one module:
  * Qwen2 / Qwen2.5 (transformers `Qwen2ForCausalLM`): q/k/v bias, plain RoPE.
  * InternLM2 / InternLM2.5 (InternLM's remote `InternLM2ForCausalLM`): no biases, dynamic-NTK
    RoPE; its packed `wqkv` is unpacked into q/k/v by convert.py, so no special layer here.
  * Qwen3 (transformers `Qwen3ForCausalLM`): per-head RMSNorm on q and k before RoPE.
  * the Qwen-VL text models: multimodal RoPE (3-D positions), Qwen2.5-VL's chunked sections or
    Qwen3-VL's interleaved layout, and Qwen3-VL's deepstack feature injection.

RMSNorm, rotate-half RoPE, GQA through SDPA, SwiGLU. A preallocated KV cache; batches are left
padded and carry a key-padding mask. Single-device code: sharding and compile come from outside.
"""
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
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

    @property
    def context_length(self) -> int | None:
        """Longest sequence the model was built for; None where dynamic-NTK RoPE stretches it."""
        return None if self.rope_dynamic_factor else self.max_position_embeddings

    def __post_init__(self):
        if self.head_dim == 0:
            self.head_dim = self.dim // self.n_heads
        self.mrope_section = tuple(self.mrope_section)
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"n_heads={self.n_heads} is not a multiple of n_kv_heads={self.n_kv_heads}; fix the LLM config")
        if self.mrope_section and 2 * sum(self.mrope_section) != self.head_dim:
            raise ValueError(f"mrope_section {self.mrope_section} must cover head_dim/2={self.head_dim // 2} frequency pairs")


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        # Normalise in fp32 and cast back before the weight, as every reference model does.
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


def rope_cos_sin(cfg: LLMConfig, positions: torch.Tensor, seq_len: int, dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin of shape (B, L, head_dim) for positions (B, L), or (3, B, L) with mRoPE.

    seq_len is the total attended length; it only matters for InternLM2's dynamic NTK base.
    """
    hd = cfg.head_dim
    base = cfg.rope_theta
    if cfg.rope_dynamic_factor and seq_len > cfg.max_position_embeddings:
        f = cfg.rope_dynamic_factor
        base = base * ((f * seq_len / cfg.max_position_embeddings) - (f - 1)) ** (hd / (hd - 2))
    inv_freq = 1.0 / (base ** (torch.arange(0, hd, 2, device=positions.device, dtype=torch.float32) / hd))
    if positions.dim() == 2:
        freqs = positions.float()[..., None] * inv_freq  # (B, L, hd/2)
    else:
        freqs3 = positions.float()[..., None] * inv_freq  # (3, B, L, hd/2): t, h, w angles
        if cfg.mrope_interleaved:
            # Qwen3-VL: pair i takes h if i%3==1, w if i%3==2 (within 3*section), else t.
            axis = torch.zeros(hd // 2, dtype=torch.long, device=positions.device)
            t_sec, h_sec, w_sec = cfg.mrope_section
            idx = torch.arange(hd // 2, device=positions.device)
            axis[(idx % 3 == 1) & (idx < 3 * h_sec)] = 1
            axis[(idx % 3 == 2) & (idx < 3 * w_sec)] = 2
        else:
            # Qwen2.5-VL: the first t_sec pairs take t, the next h_sec take h, the rest w.
            axis = torch.repeat_interleave(torch.arange(3, device=positions.device),
                                           torch.tensor(cfg.mrope_section, device=positions.device))
        freqs = freqs3.gather(0, axis.view(1, 1, 1, -1).expand(1, *freqs3.shape[1:])).squeeze(0)
    emb = torch.cat([freqs, freqs], dim=-1)  # (B, L, hd)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rope(x, cos, sin):
    # x (B, nh, L, hd); cos/sin (B, L, hd)
    cos, sin = cos[:, None], sin[:, None]
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat([-x2, x1], dim=-1) * sin


class KVCache(nn.Module):
    """Preallocated keys/values for one layer: (B, n_kv, max_len, hd)."""

    def __init__(self, batch: int, n_kv: int, max_len: int, head_dim: int, dtype, device):
        super().__init__()
        shape = (batch, n_kv, max_len, head_dim)
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)

    def update(self, start: int, k, v):
        end = start + k.shape[2]
        if end > self.k.shape[2]:
            raise ValueError(f"KV cache holds {self.k.shape[2]} positions, {end} needed; raise max_len")
        self.k[:, :, start:end] = k
        self.v[:, :, start:end] = v
        return self.k[:, :, :end], self.v[:, :, :end]


class Attention(nn.Module):
    def __init__(self, cfg: LLMConfig):
        super().__init__()
        self.cfg = cfg
        hd = cfg.head_dim
        self.q_proj = nn.Linear(cfg.dim, cfg.n_heads * hd, bias=cfg.qkv_bias)
        self.k_proj = nn.Linear(cfg.dim, cfg.n_kv_heads * hd, bias=cfg.qkv_bias)
        self.v_proj = nn.Linear(cfg.dim, cfg.n_kv_heads * hd, bias=cfg.qkv_bias)
        self.o_proj = nn.Linear(cfg.n_heads * hd, cfg.dim, bias=False)
        if cfg.qk_norm:
            self.q_norm = RMSNorm(hd, cfg.norm_eps)
            self.k_norm = RMSNorm(hd, cfg.norm_eps)

    def forward(self, x, cos, sin, mask, cache: KVCache | None, start: int):
        B, L, _ = x.shape
        hd = self.cfg.head_dim
        q = self.q_proj(x).view(B, L, -1, hd)  # (B, L, nh, hd)
        k = self.k_proj(x).view(B, L, -1, hd)
        v = self.v_proj(x).view(B, L, -1, hd)
        if self.cfg.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # (B, nh, L, hd)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:
            k, v = cache.update(start, k, v)
        causal = mask is None and L > 1
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, enable_gqa=True)
        return self.o_proj(y.transpose(1, 2).reshape(B, L, -1))


class MLP(nn.Module):
    def __init__(self, cfg: LLMConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.dim, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.dim, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.dim, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    def __init__(self, cfg: LLMConfig):
        super().__init__()
        self.attn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.attn = Attention(cfg)
        self.mlp_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x, cos, sin, mask, cache, start):
        x = x + self.attn(self.attn_norm(x), cos, sin, mask, cache, start)
        return x + self.mlp(self.mlp_norm(x))


class LLM(nn.Module):
    def __init__(self, cfg: LLMConfig):
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        if not cfg.tie_embeddings:
            self.lm_head = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        self.caches: nn.ModuleList | None = None

    def logits(self, h):
        w = self.embed_tokens.weight if self.cfg.tie_embeddings else self.lm_head.weight
        return F.linear(h, w)

    def setup_cache(self, batch: int, max_len: int):
        p = self.embed_tokens.weight
        self.caches = nn.ModuleList(
            KVCache(batch, self.cfg.n_kv_heads, max_len, self.cfg.head_dim, p.dtype, p.device)
            for _ in range(self.cfg.n_layers))

    def forward(self, x, positions, key_mask=None, start: int = 0, use_cache: bool = False,
                deepstack=None, visual_mask=None):
        """Run the decoder on embeddings x (B, L, D).

        positions: (B, L) or (3, B, L) RoPE positions. key_mask: (B, S) bool, False on padding,
        S = start + L (needed only when the batch is padded). start: cache offset of x[:, 0].
        deepstack: list of (N_vis, D) features added at visual_mask (B, L) after layers 0..k-1.
        Returns (hidden after the final norm, hidden before it), both (B, L, D).
        """
        B, L, _ = x.shape
        S = start + L
        cos, sin = rope_cos_sin(self.cfg, positions, S, x.dtype)
        mask = None
        if key_mask is not None:
            if key_mask.shape != (B, S):
                raise ValueError(f"key_mask has shape {tuple(key_mask.shape)}, expected {(B, S)}")
            q_idx = torch.arange(start, S, device=x.device)[:, None]
            k_idx = torch.arange(S, device=x.device)[None, :]
            # A padded query still sees itself, so no softmax row is empty (that would give NaN).
            mask = (k_idx <= q_idx) & (key_mask[:, None, :] | (k_idx == q_idx))  # (B, L, S)
            mask = mask[:, None]  # (B, 1, L, S)
        elif start > 0 and L > 1:
            mask = (torch.arange(S, device=x.device)[None, :] <= torch.arange(start, S, device=x.device)[:, None])
        if use_cache and self.caches is None:
            raise RuntimeError("use_cache=True needs setup_cache(batch, max_len) first")
        for i, layer in enumerate(self.layers):
            x = layer(x, cos, sin, mask, self.caches[i] if use_cache else None, start)
            if deepstack is not None and i < len(deepstack):  # Qwen3-VL: add ViT features after layer i
                x = x.index_put((visual_mask,), deepstack[i].to(x.dtype), accumulate=True)
        return self.norm(x), x
