"""LoRA on the LLM's linear layers, as Sa2VA trains it (peft `LoraConfig(r, lora_alpha,
lora_dropout=0.05, bias="none")`), written out: y = x W^T + b + (alpha / r) * B A dropout(x).

`apply_lora` turns each target `nn.Linear` into a `LoRALinear` in place: the base weight and
bias keep their names (`...q_proj.weight`), the adapter adds `...q_proj.lora_A` (r, in) and
`...q_proj.lora_B` (out, r), initialised as peft does (A Kaiming-uniform, B zero, so training
starts from the base model). `merge_lora` folds the adapters into the weights for export.

Targets per family (the official configs): every linear layer of the LLM's blocks: q/k/v/o
and gate/up/down (xtuner `find_all_linear_names` for InternVL, peft's `language_model` linears
for Qwen-VL), never the ViT; for InternLM2 also the LM head (`output`, which that filter does
not exclude; it is trained in full too, as in the official code).

Deviation: InternLM2 packs q, k and v into one `wqkv`, which peft adapts with one LoRA. Ours
keeps three projections; their adapters share one `lora_A` (the same (r, D) parameter), which
spans the same rank-r updates of the packed matrix; each draws its own dropout mask.
"""
import math

import torch
import torch.nn.functional as F
from torch import nn

from model.config import Sa2VAConfig

ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP = ("gate_proj", "up_proj", "down_proj")


# Reference: peft `tuners.lora.layer.Linear` (default adapter, no bias, no DoRA).
class LoRALinear(nn.Linear):
    def __init__(self, base: nn.Linear, r: int, alpha: float, dropout: float):
        nn.Module.__init__(self)
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight, self.bias = base.weight, base.bias  # the frozen base, same names
        self.r, self.scale = r, alpha / r
        self.dropout = nn.Dropout(dropout)
        kw = dict(device=base.weight.device, dtype=base.weight.dtype)
        self.lora_A = nn.Parameter(torch.empty(r, self.in_features, **kw))
        self.lora_B = nn.Parameter(torch.empty(self.out_features, r, **kw))
        self.reset_lora()

    def reset_lora(self, generator: torch.Generator | None = None):
        # peft: kaiming_uniform_(A, a=sqrt(5)) (nn.Linear's default), B = 0
        bound = 1 / math.sqrt(self.in_features)  # gain(a=sqrt(5)) * sqrt(3 / fan_in)
        with torch.no_grad():
            if self.lora_A.device.type != "meta":
                self.lora_A.uniform_(-bound, bound, generator=generator)
                self.lora_B.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        update = F.linear(F.linear(self.dropout(x), self.lora_A), self.lora_B)  # (.., out) through rank r
        return F.linear(x, self.weight, self.bias) + self.scale * update

    def merged_weight(self) -> torch.Tensor:
        return self.weight + self.scale * (self.lora_B @ self.lora_A)


def lora_targets(cfg: Sa2VAConfig) -> list[str]:
    """Our names of the linear layers that get an adapter."""
    names = [f"llm.layers.{i}.{part}.{p}" for i in range(cfg.llm.n_layers)
             for part, projs in (("attn", ATTENTION), ("mlp", MLP)) for p in projs]
    if cfg.llm.arch == "internlm2":
        names.append("llm.lm_head")
    return names


def apply_lora(model: nn.Module, r: int, alpha: float, dropout: float) -> list[str]:
    """Put an adapter on every target of model.cfg (works on the meta device); returns their names."""
    targets = lora_targets(model.cfg)
    for name in targets:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        setattr(parent, child, LoRALinear(getattr(parent, child), r, alpha, dropout))
    if model.cfg.llm.arch == "internlm2":  # one adapter input for the packed wqkv (module docstring)
        for layer in model.llm.layers:
            layer.attn.k_proj.lora_A = layer.attn.v_proj.lora_A = layer.attn.q_proj.lora_A
    return targets


def lora_modules(model: nn.Module) -> dict[str, LoRALinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, LoRALinear)}


def merge_lora(state: dict[str, torch.Tensor], alpha_over_r: float) -> dict[str, torch.Tensor]:
    """A state dict with adapters (`X.lora_A`, `X.lora_B` beside `X.weight`) -> the plain model's:
    each `X.weight` becomes W + (alpha / r) B A in fp32, cast back to W's dtype; adapters dropped."""
    out = {k: v for k, v in state.items() if not k.endswith((".lora_A", ".lora_B"))}
    for key in state:
        if key.endswith(".lora_A"):
            base = key[: -len(".lora_A")]
            w = state[base + ".weight"]
            delta = state[base + ".lora_B"].float() @ state[key].float()
            out[base + ".weight"] = (w.float() + alpha_over_r * delta).to(w.dtype)
    return out
