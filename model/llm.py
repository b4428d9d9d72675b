"""The decoder-only LLM of every Sa2VA family, one implementation with flags.

Reproduces, in one module:
  * Qwen2 / Qwen2.5 (transformers `Qwen2ForCausalLM`): q/k/v bias, plain RoPE.
  * InternLM2 / InternLM2.5 (InternLM's remote `InternLM2ForCausalLM`): no biases, dynamic-NTK
    RoPE; its packed `wqkv` is unpacked into q/k/v by convert.py, so no special layer here.
  * Qwen3 (transformers `Qwen3ForCausalLM`): per-head RMSNorm on q and k before RoPE.
  * the Qwen-VL text models: multimodal RoPE (3-D positions, `mrope_positions` as transformers'
    `get_rope_index`), Qwen2.5-VL's chunked sections or Qwen3-VL's interleaved layout, and
    Qwen3-VL's deepstack feature injection.

RMSNorm, rotate-half RoPE, GQA through SDPA, SwiGLU. A static KV cache, as gpt-fast's: the
prefill writes it and `decode` reads it whole under a mask, so a decoding step has the same
shapes at every position and compiles to one graph. Batches are left padded and carry a
key-padding mask. q/k/v and gate/up can be packed into one matmul each for inference.
Single-device code: sharding and compile come from outside.
"""
import torch
import torch.nn.functional as F
from torch import nn

from model.config import LLMConfig


def mrope_positions(input_ids: torch.Tensor, image_grid_thw: torch.Tensor | None, image_token_id: int,
                    vision_start_token_id: int, spatial_merge_size: int = 2,
                    attention_mask: torch.Tensor | None = None,
                    image_temporal_stride: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """3-D mRoPE position ids (3, B, L) and per-row deltas (B, 1), as transformers 4.57 `get_rope_index`.

    Text tokens get t = h = w = a running index. An image with a (t, h, w) patch grid occupies
    t*(h/m)*(w/m) consecutive `image_token_id` tokens (right after a `vision_start` token); its
    merged token at (frame, row, col) gets t = s + stride*frame, h = s + row, w = s + col, where
    s is the next free index; text after it restarts at the image's largest index + 1. `image_temporal_stride` only matters
    for t > 1, which the processor never emits for images: 0 reproduces Qwen2.5-VL (a still image
    has zero seconds per grid), 1 Qwen3-VL. Images are consumed in order across the batch.
    Padding (attention_mask == 0) is skipped and gets position 1. delta = largest index + 1 -
    row length, so a token appended at absolute index i has position i + delta. (transformers 5
    finds images through mm_token_type_ids, pads with 0 and measures delta against the unpadded
    length; positions of real tokens are the same.)
    """
    B, L = input_ids.shape
    mask = torch.ones_like(input_ids, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
    grids = [] if image_grid_thw is None else image_grid_thw.tolist()
    position_ids = torch.ones(3, B, L, dtype=torch.long, device=input_ids.device)
    deltas, next_image = [], 0
    for b in range(B):
        ids = input_ids[b][mask[b]].tolist()
        if not ids:
            raise ValueError(f"row {b} of the batch is all padding; drop it before computing positions")
        pieces, start, pos = [], 0, 0  # start: next unread token, pos: next free position index
        n_images = sum(1 for i in range(len(ids) - 1) if ids[i] == vision_start_token_id and ids[i + 1] == image_token_id)
        for _ in range(n_images):
            if next_image >= len(grids):
                raise ValueError(f"the prompts hold more images than image_grid_thw ({len(grids)} rows); "
                                 "pass the grid of every image in prompt order")
            t, h, w = grids[next_image]
            next_image += 1
            gh, gw = h // spatial_merge_size, w // spatial_merge_size
            at = ids.index(image_token_id, start)
            end = at
            while end < len(ids) and ids[end] == image_token_id:
                end += 1
            n = t * gh * gw
            if end - at != n:
                raise ValueError(f"image {next_image - 1} of grid {(t, h, w)} needs {n} consecutive image tokens, "
                                 f"the prompt has {end - at}; build the prompt from image_grid_thw")
            pieces.append(torch.arange(at - start).expand(3, -1) + pos)
            pos += at - start
            tt, hh, ww = torch.meshgrid(torch.arange(t) * image_temporal_stride, torch.arange(gh), torch.arange(gw),
                                        indexing="ij")
            pieces.append(torch.stack([tt, hh, ww]).view(3, -1) + pos)
            pos = int(pieces[-1].max()) + 1
            start = at + n
        pieces.append(torch.arange(len(ids) - start).expand(3, -1) + pos)
        positions = torch.cat(pieces, dim=1)  # (3, n_unmasked)
        position_ids[:, b, mask[b]] = positions.to(position_ids.device)
        deltas.append(int(positions.max()) + 1 - L)
    if next_image != len(grids):
        raise ValueError(f"image_grid_thw has {len(grids)} rows but the prompts hold {next_image} images; "
                         "give one grid row per image")
    return position_ids, torch.tensor(deltas, device=input_ids.device)[:, None]


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
    """Static keys/values for one layer, (B, n_kv, max_len, hd): written in place at given
    positions and read whole, so a decode step has the same shapes at every position."""

    def __init__(self, batch: int, n_kv: int, max_len: int, head_dim: int, dtype, device):
        super().__init__()
        shape = (batch, n_kv, max_len, head_dim)
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)

    def write(self, input_pos: torch.Tensor, k, v) -> tuple[torch.Tensor, torch.Tensor]:
        """Store k, v (B, n_kv, L, hd) at cache positions input_pos (L,); return the whole cache."""
        self.k.index_copy_(2, input_pos, k)
        self.v.index_copy_(2, input_pos, v)
        return self.k, self.v


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

    def fuse(self):
        """Inference: q, k and v as one matmul (`qkv_proj`), the same numbers as three."""
        self.qkv_proj = _fused([self.q_proj, self.k_proj, self.v_proj])
        del self.q_proj, self.k_proj, self.v_proj

    def forward(self, x, cos, sin, mask, cache: KVCache | None = None, input_pos: torch.Tensor | None = None,
                read_cache: bool = False):
        """x (B, L, D). With a cache, k/v are written at input_pos (L,); read_cache=True (decoding)
        attends over the whole cache, under mask, instead of over this call's keys."""
        B, L, _ = x.shape
        hd, nh, nkv = self.cfg.head_dim, self.cfg.n_heads, self.cfg.n_kv_heads
        if hasattr(self, "qkv_proj"):
            q, k, v = self.qkv_proj(x).split([nh * hd, nkv * hd, nkv * hd], dim=-1)
        else:
            q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        q, k, v = q.view(B, L, nh, hd), k.view(B, L, nkv, hd), v.view(B, L, nkv, hd)
        if self.cfg.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # (B, nh, L, hd)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:
            cached = cache.write(input_pos, k, v)
            if read_cache:
                k, v = cached
        causal = mask is None and L > 1
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, enable_gqa=True)
        return self.o_proj(y.transpose(1, 2).reshape(B, L, -1))


def _fused(linears: list[nn.Linear]) -> nn.Linear:
    """One Linear whose output is the concatenation of the given ones' (no LoRA adapters)."""
    if any(type(m) is not nn.Linear for m in linears):
        raise ValueError("fusing projections needs plain Linear layers; merge LoRA adapters first")
    w = torch.cat([m.weight for m in linears])
    out = nn.Linear(w.shape[1], w.shape[0], bias=linears[0].bias is not None, device=w.device, dtype=w.dtype)
    with torch.no_grad():
        out.weight.copy_(w)
        if out.bias is not None:
            out.bias.copy_(torch.cat([m.bias for m in linears]))
    return out


class MLP(nn.Module):
    def __init__(self, cfg: LLMConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.dim, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.dim, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.dim, bias=False)

    def fuse(self):
        """Inference: gate and up as one matmul (`gate_up_proj`), the same numbers as two."""
        self.gate_up_proj = _fused([self.gate_proj, self.up_proj])
        del self.gate_proj, self.up_proj

    def forward(self, x):
        if hasattr(self, "gate_up_proj"):
            gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        else:
            gate, up = self.gate_proj(x), self.up_proj(x)
        return self.down_proj(F.silu(gate) * up)


class Block(nn.Module):
    def __init__(self, cfg: LLMConfig):
        super().__init__()
        self.attn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.attn = Attention(cfg)
        self.mlp_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x, cos, sin, mask, cache=None, input_pos=None, read_cache=False):
        x = x + self.attn(self.attn_norm(x), cos, sin, mask, cache, input_pos, read_cache)
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

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        return F.linear(h, self.embed_tokens.weight) if self.cfg.tie_embeddings else self.lm_head(h)

    def setup_cache(self, batch: int, max_len: int):
        p = self.embed_tokens.weight
        self.caches = nn.ModuleList(
            KVCache(batch, self.cfg.n_kv_heads, max_len, self.cfg.head_dim, p.dtype, p.device)
            for _ in range(self.cfg.n_layers))

    def fuse_projections(self):
        """Inference only: pack q/k/v and gate/up of every layer into one matmul each (outputs
        unchanged; the state_dict then names `qkv_proj` and `gate_up_proj`, so save before this)."""
        for layer in self.layers:
            layer.attn.fuse()
            layer.mlp.fuse()

    def forward(self, x: torch.Tensor, positions: torch.Tensor, key_mask: torch.Tensor | None = None,
                fill_cache: bool = False, deepstack: list[torch.Tensor] | None = None,
                visual_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Run the decoder on embeddings x (B, L, D): training, teacher forcing, or the prefill.

        positions: (B, L) or (3, B, L) RoPE positions. key_mask: (B, L) bool, False on padding
        (needed only when the batch is padded). fill_cache: also store every layer's keys and
        values at cache positions 0..L-1 (setup_cache first), for decode() to continue from.
        deepstack: list of (N_vis, D) features added at visual_mask (B, L) after layers 0..k-1.
        Returns (hidden after the final norm, hidden before it), both (B, L, D).
        """
        B, L, _ = x.shape
        cos, sin = rope_cos_sin(self.cfg, positions, L, x.dtype)
        mask = None
        if key_mask is not None:
            if key_mask.shape != (B, L):
                raise ValueError(f"key_mask has shape {tuple(key_mask.shape)}, expected {(B, L)}")
            idx = torch.arange(L, device=x.device)
            # A padded query still sees itself, so no softmax row is empty (that would give NaN).
            mask = (idx[None, :] <= idx[:, None]) & (key_mask[:, None, :] | torch.eye(L, dtype=torch.bool, device=x.device))
            mask = mask[:, None]  # (B, 1, L, L)
        if fill_cache and self.caches is None:
            raise RuntimeError("fill_cache=True needs setup_cache(batch, max_len) first")
        input_pos = torch.arange(L, device=x.device) if fill_cache else None
        for i, layer in enumerate(self.layers):
            x = layer(x, cos, sin, mask, self.caches[i] if fill_cache else None, input_pos)
            if deepstack is not None and i < len(deepstack):  # Qwen3-VL: add ViT features after layer i
                x = x.index_put((visual_mask,), deepstack[i].to(x.dtype), accumulate=True)
        return self.norm(x), x

    def decode(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, input_pos: torch.Tensor,
               mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One decoding step over the static cache; every shape is the same at every step.

        x (B, 1, D) the new token's embedding; cos/sin (B, 1, head_dim) its rotation (rope_cos_sin);
        input_pos (1,) long, its cache position; mask (B, 1, 1, max_len) bool, True at the cache
        positions it may read (itself included). Returns (post-norm, pre-norm) hidden, (B, 1, D).
        """
        for i, layer in enumerate(self.layers):
            x = layer(x, cos, sin, mask, self.caches[i], input_pos, read_cache=True)
        return self.norm(x), x
