"""Autoregressive decoding with a static KV cache: prefill once, then one token per step.

Matches what the official `predict_forward` asks of `generate`: greedy by default, stop on EOS
or when the decoded text ends with a stop word (after deleting '\\r' and '\\n', as the official
StopWordStoppingCriteria does), and keep the last-layer hidden state of every fed token so the
`[SEG]` bridge can read it. Adds what the official path lacks: sampling and batches.

The loop is gpt-fast's: `prefill` fills a cache of fixed length (rounded up to CACHE_MULTIPLE) and
`decode_step` is one function with the same shapes at every step, so
`torch.compile(decode_step, mode="reduce-overhead", fullgraph=True)` turns it into one graph (CUDA
graphs on GPU) that `generate(step=...)` takes. Sampling, the stop checks and the RoPE angles
(InternLM2's dynamic base depends on the length so far) stay outside it.
"""
import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from model.llm import LLM, rope_cos_sin

STOP_WINDOW = 16  # tokens decoded to look for a stop word at the end of the answer
CACHE_MULTIPLE = 256  # cache lengths are rounded up to this, so a compiled step sees few shapes


@dataclass
class GenerationConfig:
    max_new_tokens: int = 2048
    temperature: float = 0.0  # 0 means greedy
    top_p: float = 1.0
    stop_words: tuple[str, ...] = ()
    seed: int | None = None

    def __post_init__(self):
        if isinstance(self.max_new_tokens, bool) or not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be a whole number >= 1, got {self.max_new_tokens!r}")
        if not isinstance(self.temperature, (int, float)) or not math.isfinite(self.temperature) or self.temperature < 0:
            raise ValueError(f"temperature must be a number >= 0 (0 is greedy), got {self.temperature!r}")
        if not isinstance(self.top_p, (int, float)) or not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1] (1 keeps every token), got {self.top_p!r}")
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int)):
            raise ValueError(f"seed must be a whole number or None, got {self.seed!r}")


@dataclass
class Generated:
    tokens: list[int]  # new tokens, including the one that stopped generation
    # Hidden state (D,) of every new token that was fed back, i.e. all tokens but the last one:
    # row i is the state computed with tokens[i] as input (what [SEG] extraction needs).
    hidden: torch.Tensor = field(repr=False)


def _sample(logits: torch.Tensor, cfg: GenerationConfig, gen: torch.Generator | None) -> torch.Tensor:
    """logits (B, V) -> next token ids (B,)."""
    if cfg.temperature <= 0:
        return logits.argmax(-1)
    probs = torch.softmax(logits.float() / cfg.temperature, dim=-1)
    if cfg.top_p < 1.0:
        sorted_p, idx = probs.sort(dim=-1, descending=True)
        # Keep the smallest prefix whose mass reaches top_p (the top token always stays).
        drop = (sorted_p.cumsum(-1) - sorted_p) >= cfg.top_p
        sorted_p = sorted_p.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter(-1, idx, sorted_p)
    return torch.multinomial(probs, 1, generator=gen).squeeze(-1)


def decode_step(llm: LLM, token: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, input_pos: torch.Tensor,
                mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """token (B,) -> next-token logits (B, V) and the (post-norm, pre-norm) hidden states (B, D).

    The one function a compiler sees: fixed shapes (LLM.decode), no host sync, no Python branch
    on data.
    """
    h_post, h_pre = llm.decode(llm.embed_tokens(token)[:, None], cos, sin, input_pos, mask)
    return llm.logits(h_post[:, 0]), h_post[:, 0], h_pre[:, 0]


@torch.inference_mode()
def generate(llm: LLM, embeds: torch.Tensor, positions: torch.Tensor, key_mask: torch.Tensor | None,
             cfg: GenerationConfig, eos_ids: set[int], decode: Callable[[list[int]], str] | None = None,
             prenorm_hidden: bool = False, deepstack: list[torch.Tensor] | None = None,
             visual_mask: torch.Tensor | None = None, step: Callable = decode_step) -> list[Generated]:
    """Generate for a left-padded batch.

    embeds (B, L, D) prompt embeddings; positions (B, L) or (3, B, L); key_mask (B, L) bool with
    False on left padding, or None for an unpadded batch. decode(ids) -> str is needed for stop words.
    prenorm_hidden selects the last decoder layer's output instead of the final-norm output.
    step: decode_step, or a compiled version of it.
    """
    B, L, _ = embeds.shape
    if cfg.stop_words and decode is None:
        raise ValueError("stop words need a decode function")
    gen = None
    if cfg.temperature > 0 and cfg.seed is not None:
        gen = torch.Generator(device=embeds.device).manual_seed(cfg.seed)
    max_len = -(-(L + cfg.max_new_tokens) // CACHE_MULTIPLE) * CACHE_MULTIPLE
    llm.setup_cache(B, max_len)
    try:
        h_post, _ = llm(embeds, positions, key_mask, fill_cache=True, deepstack=deepstack, visual_mask=visual_mask)
        next_pos = positions.amax(dim=(0, -1) if positions.dim() == 3 else -1) + 1  # (B,)
        # The cache positions each row may read: its prompt (not the padding), then every new token.
        readable = torch.zeros(B, 1, 1, max_len, dtype=torch.bool, device=embeds.device)
        readable[:, 0, 0, :L] = True if key_mask is None else key_mask
        tokens = [[] for _ in range(B)]
        hidden = [[] for _ in range(B)]
        done = [False] * B
        logits = llm.logits(h_post[:, -1])
        for i in range(cfg.max_new_tokens):
            nxt = _sample(logits, cfg, gen)
            for b, t in enumerate(nxt.tolist()):  # one device sync per step
                if done[b]:
                    continue
                tokens[b].append(t)
                # Decoding only the tail keeps the check O(1) per step; stop words span a few tokens.
                if t in eos_ids or (cfg.stop_words and _ends_with_stop(decode(tokens[b][-STOP_WINDOW:]), cfg.stop_words)):
                    done[b] = True
            if all(done) or i == cfg.max_new_tokens - 1:
                break
            pos = next_pos[:, None] + i  # (B, 1)
            if positions.dim() == 3:
                pos = pos[None].expand(3, -1, -1)
            cos, sin = rope_cos_sin(llm.cfg, pos, L + i + 1, embeds.dtype)
            readable[:, 0, 0, L + i] = True
            input_pos = torch.tensor([L + i], device=embeds.device)
            logits, h_post, h_pre = step(llm, nxt, cos, sin, input_pos, readable)
            # A CUDA-graph step hands out the same output buffers at every replay: keep copies.
            logits, h = logits.clone(), (h_pre if prenorm_hidden else h_post).clone()
            for b in range(B):
                if not done[b]:
                    hidden[b].append(h[b])
    finally:
        llm.caches = None  # free the cache memory
    D = embeds.shape[-1]
    return [Generated(tokens[b], torch.stack(hidden[b]) if hidden[b] else embeds.new_zeros(0, D))
            for b in range(B)]


def _ends_with_stop(text: str, stop_words) -> bool:
    text = text.replace("\r", "").replace("\n", "")
    return any(text.endswith(w) for w in stop_words)
