"""Train or fine-tune Sa2VA on FSDP2, with the official recipe, on your data.

    python train.py --model debug-internvl --data samples.jsonl --out runs/tiny --steps 50      # one process
    torchrun --nproc_per_node 8 train.py --model checkpoints/Sa2VA-1B --data mine.jsonl --out runs/ft
    torchrun --nnodes 2 --nproc_per_node 8 --rdzv-backend c10d --rdzv-endpoint HOST:29500 train.py ...
    torchrun --nproc_per_node 8 train.py --model ... --data data/ --recipe in30-8b --out runs/sa2va   # the paper's mixture

What is trained (projects/sa2va/configs, the released recipes): LoRA on the LLM's linear
layers (r 128, alpha 256, dropout 0.05), the token embeddings and LM head in full, the InternVL
projector (`mlp1`), SAM-2's mask decoder and `text_hidden_fcs`; the vision tower, the rest of
SAM-2 and the LLM's base weights are frozen. AdamW (lr 4e-5, weight decay 0.05, betas
0.9/0.999), linear warm-up over the first 5% of steps then cosine to 0, gradients clipped at 1.0.
Loss: next-token cross-entropy + 2.0 x mask BCE + 0.5 x dice on 12,544 sampled points.

Reads top to bottom: config -> distributed init -> the run folder (new, or resumed) -> the
model on the meta device -> freeze + LoRA -> activation checkpointing -> compile ->
fully_shard per block, then the root -> weights -> AdamW -> data -> resume -> the loop ->
checkpoints -> the export of final/ (LoRA merged, our format: `Sa2VA.from_pretrained` loads it,
`convert.py --to-official` turns it into the official layout).

From a base MLLM (an InternVL or Qwen-VL folder) and Meta's SAM-2 checkpoint (`--sam2`), the
Sa2VA tokens are added and the embeddings resized as the official training does
(convert.read_base); text_hidden_fcs starts from scratch.

Every --save-every steps and on SIGTERM a checkpoint (torch.distributed.checkpoint, sharded:
the trained weights and the optimizer state) goes to --out/checkpoints; running the same
command again resumes from the newest complete one and continues the loss curve exactly. The
randomness of a micro-batch (dropout, point sampling, data sampling) is seeded by the seed, the
step and the micro-batch's place in the global batch, so it does not depend on the number of
processes or on resumption. The global batch is --batch-size samples whatever the number of
processes; each process runs --batch-size / (processes x --micro-batch-size) micro-batches.
"""
import dataclasses
import json
import math
import os
import re
import shutil
import signal
import sys
import tempfile
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
import torch.distributed.checkpoint as dcp
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict, get_optimizer_state_dict,
                                                     set_model_state_dict, set_optimizer_state_dict)
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor
from tqdm import tqdm

import convert
import data
import debug_checkpoint
from cli import arg, check_output_folder, output_folder, parse, run
from model.checkpoint import SafetensorsReader, parse_dtype, write_safetensors
from model.config import Sa2VAConfig, preset, preset_names
from model.lora import apply_lora, lora_modules, merge_lora
from model.losses import loss_positions, lm_loss_at, mask_losses
from model.sa2va import ModelInputs, Sa2VAModel
from model.tokenizer import Tokenizer, load_official_tokenizer
from official_data import RECIPES, open_mixture

try:  # optional: TensorBoard event files beside metrics.jsonl when `tensorboard` is installed
    from torch.utils.tensorboard import SummaryWriter
except ImportError:
    SummaryWriter = None


@dataclass
class TrainConfig:
    model: str = arg(help="a folder written by convert.py, an official Sa2VA folder, a base MLLM folder (InternVL, "
                          "Qwen-VL) with --sam2, or random weights: a debug-* preset or random:PRESET (e.g. random:Sa2VA-1B)")
    data: str = arg(help="training samples: a JSONL file, one sample a line (see the README), or a data root "
                         "laid out as the official data release (with --recipe)")
    out: str = arg(help="the run folder: checkpoints, metrics.jsonl, final/ (an existing run is resumed)")
    recipe: str | None = arg(None, "with a data root: the official mixture to train on (" + ", ".join(RECIPES) + ")")
    sam2: str | None = arg(None, "Meta's SAM-2 checkpoint (sam2_hiera_large.pt) when --model is a base MLLM")
    template: str | None = arg(None, "chat template of a base MLLM (default: qwen_chat, internlm2_chat for InternLM2)")
    tokenizer: str | None = arg(None, "with random:PRESET: the tokenizer folder to train with (default: a byte-level one)")
    full: bool = arg(False, "train every parameter, without LoRA (a model from scratch; the official recipe is LoRA)")
    steps: int = arg(1000, "optimizer steps")
    batch_size: int = arg(16, "samples per optimizer step, over all processes")
    micro_batch_size: int = arg(1, "samples per forward pass of a process")
    lr: float = arg(4e-5, "peak learning rate")
    weight_decay: float = arg(0.05, "AdamW weight decay (all trained parameters)")
    warmup_ratio: float = arg(0.05, "share of the steps with a linear warm-up")
    max_grad_norm: float = arg(1.0, "gradient clipping")
    phrase_warmup: int = arg(0, "first steps in which SAM-2 decodes a learned prompt per referring phrase (the "
                                "records' phrases) instead of the LLM's [SEG] prompts: SAM-2 from scratch learns "
                                "from prompts that differ from the start (needs --phrase-distill)")
    phrase_distill: float = arg(0.0, "weight of the squared error between each [SEG] prompt and its phrase's "
                                     "prompt, all run long (0: no phrase prompts)")
    dense_mask_loss: bool = arg(False, "mask losses over every pixel of the 4g x 4g logits instead of the official "
                                       "12,544 sampled points (for a SAM-2 from scratch)")
    text_warmup: int = arg(0, "first steps in which segmentation samples leave their visual tokens out of the "
                              "conversation (SAM-2 still sees the frames): an LLM from scratch learns to carry the "
                              "question into [SEG] several times faster without 64+ visual tokens in the way")
    lora_r: int = arg(128, "LoRA rank")
    lora_alpha: float = arg(256.0, "LoRA alpha (the update is scaled by alpha / r)")
    lora_dropout: float = arg(0.05, "dropout on the LoRA input")
    max_length: int = arg(8192, "samples with more tokens are skipped")
    save_every: int = arg(500, "steps between checkpoints")
    keep_checkpoints: int = arg(2, "checkpoints kept (the newest ones)")
    seed: int = arg(0, "seed of the LoRA init, the data order and every micro-batch's randomness")
    workers: int = arg(2, "data-loading processes per training process")
    param_dtype: str | None = arg(None, "compute dtype of the sharded weights (default: bf16 on GPU, fp32 on CPU)")
    activation_checkpointing: bool = arg(True, "recompute the LLM blocks in the backward pass")
    compile: bool = arg(False, "torch.compile every block")
    strict: bool = arg(False, "stop at the first bad sample instead of skipping it")
    export_dtype: str | None = arg(None, "cast final/'s floating tensors (bf16, fp16, fp32); default: as trained")


# Options that change nothing a run computes (a moved run folder, ...): a resumed run may differ in these.
RESUMABLE_CHANGES = ("out", "workers", "save_every", "keep_checkpoints", "strict", "export_dtype")


def main(argv=None):
    cfg = parse(TrainConfig, argv, __doc__.split("\n\n")[0], prog="train.py")
    run("train.py", lambda: train(cfg))


# ----------------------------------------------------------------------------- pieces of the run

def init_distributed() -> tuple[int, int, torch.device]:
    """torchrun's process group (NCCL on GPU, gloo on CPU), or a one-process group for `python train.py`."""
    cuda = torch.cuda.is_available()
    if "RANK" in os.environ:
        local = int(os.environ.get("LOCAL_RANK", 0))
        if cuda:
            torch.cuda.set_device(local)
        dist.init_process_group("nccl" if cuda else "gloo")
        device = torch.device("cuda", local) if cuda else torch.device("cpu")
    else:
        dist.init_process_group("nccl" if cuda else "gloo", store=dist.HashStore(), rank=0, world_size=1)
        device = torch.device("cuda", 0) if cuda else torch.device("cpu")
    return dist.get_rank(), dist.get_world_size(), device


def prepare_run_folder(cfg: TrainConfig, rank: int) -> bool:
    """A new run writes its config; an existing one must be the same run. Returns whether it resumes."""
    saved = os.path.join(cfg.out, "train_config.json")
    if os.path.isfile(saved):
        with open(saved) as f:
            before = json.load(f)
        now = dataclasses.asdict(cfg)
        changed = [k for k in now if k not in RESUMABLE_CHANGES and before.get(k) != now[k]]
        if changed:
            raise ValueError(f"--out {cfg.out} holds a run with other settings ({', '.join(changed)}); "
                             "give the same options to resume it, or a new --out")
        return True
    check_output_folder(cfg.out, "--out")  # new or empty (a run folder has train_config.json)
    dist.barrier()  # every process has looked before rank 0 creates it
    if rank == 0:
        os.makedirs(cfg.out, exist_ok=True)
        with open(saved + ".partial", "w") as f:
            json.dump(dataclasses.asdict(cfg), f, indent=2)
        os.replace(saved + ".partial", saved)
    dist.barrier()
    return False


def model_source(cfg: TrainConfig) -> tuple[Sa2VAConfig, Tokenizer, Callable[[], dict[str, torch.Tensor]]]:
    """(config, tokenizer, a function giving the full state dict) of --model; only rank 0 reads weights."""
    name = cfg.model
    if cfg.sam2 is not None:
        return convert.read_base(name, cfg.sam2, cfg.template, seed=cfg.seed)
    if cfg.template is not None:
        raise ValueError("--template goes with a base MLLM (--sam2); a Sa2VA checkpoint keeps its own")
    if cfg.tokenizer is not None and not name.startswith(("debug-", "random:")):
        raise ValueError("--tokenizer goes with random weights (random:PRESET); a checkpoint keeps its own")
    if name.startswith(("debug-", "random:")):  # random weights: a debug preset, or any preset's shapes
        shape = name.removeprefix("random:")
        if shape not in preset_names():
            raise ValueError(f"unknown preset {shape!r}; known: {', '.join(preset_names())}")
        model_cfg = preset(shape)
        if cfg.tokenizer is not None:
            tokenizer = load_official_tokenizer(cfg.tokenizer)
            if len(tokenizer) != model_cfg.llm.vocab_size:
                raise ValueError(f"--tokenizer {cfg.tokenizer} has {len(tokenizer)} tokens but {shape} has a vocabulary "
                                 f"of {model_cfg.llm.vocab_size}; give the tokenizer made for it")
        else:
            with tempfile.TemporaryDirectory() as tmp:  # the byte-level debug tokenizer, padded to the vocabulary
                debug_checkpoint.write_tokenizer(tmp, model_cfg.family, vocab_size=model_cfg.llm.vocab_size)
                tokenizer = load_official_tokenizer(tmp)
        model_cfg = dataclasses.replace(model_cfg, image_token_id=tokenizer.token_to_id(data.image_token(model_cfg.family)),
                                        seg_token_id=tokenizer.token_to_id(data.SEG))
        return model_cfg, tokenizer, lambda: debug_checkpoint.random_state(model_cfg)
    if not os.path.isdir(name):
        raise ValueError(f"--model {name} is not a folder or a debug-* preset")
    if convert.is_official(name):
        model_cfg, tokenizer, _, tensors = convert.read_official(name)
        return model_cfg, tokenizer, lambda: dict(tensors)
    model_cfg = Sa2VAConfig.load(os.path.join(name, "config.json"))
    tokenizer = Tokenizer.load(name)

    def ours():
        f = SafetensorsReader(os.path.join(name, "model.safetensors"))
        return {k: f.read(k) for k in f.keys()}
    return model_cfg, tokenizer, ours


def set_trainable(model: Sa2VAModel, full: bool = False):
    """The official split: LoRA adapters, embeddings + LM head, the InternVL projector, SAM-2's
    mask decoder and text_hidden_fcs are trained; everything else is frozen. full: everything
    (a model from scratch), but the heads that take no loss."""
    model.requires_grad_(full)
    trained = [model.llm.embed_tokens, model.text_hidden_fcs, model.grounding.sam2.sam_mask_decoder]
    if not model.cfg.llm.tie_embeddings:
        trained.append(model.llm.lm_head)
    if model.cfg.family == "internvl":
        trained.append(model.vision.projector)
    for module in trained:
        module.requires_grad_(True)
    # The mask decoder's IoU and object-score heads take no loss (the IoU prediction only picks
    # the best of 3 masks, the object score only gates a video memory's pointer): they get no
    # gradient, so AdamW would leave them as they are. Frozen, they stay out of its state.
    decoder = model.grounding.sam2.sam_mask_decoder
    decoder.iou_prediction_head.requires_grad_(False)
    decoder.pred_obj_score_head.requires_grad_(False)
    if full:  # likewise what the training forward never runs: SAM-2's video memory, its point and mask prompts
        sam2 = model.grounding.sam2
        for module in (sam2.memory_attention, sam2.memory_encoder, sam2.obj_ptr_proj, sam2.mask_downsample,
                       sam2.sam_prompt_encoder.point_embeddings,
                       sam2.sam_prompt_encoder.mask_downscaling):
            module.requires_grad_(False)
        for p in (sam2.maskmem_tpos_enc, sam2.no_mem_pos_enc, sam2.no_obj_ptr):
            p.requires_grad_(False)
    for lora in lora_modules(model).values():
        lora.lora_A.requires_grad_(True)
        lora.lora_B.requires_grad_(True)
        if lora is not getattr(model.llm, "lm_head", None):  # InternLM2's head is adapted and trained in full
            lora.weight.requires_grad_(False)
            if lora.bias is not None:
                lora.bias.requires_grad_(False)


FROZEN_HEADS = "grounding.sam2.sam_mask_decoder."


def initial_state(model: Sa2VAModel, weights: dict[str, torch.Tensor], seed: int,
                  from_scratch: bool = False) -> dict[str, torch.Tensor]:
    """The full state to start from: the checkpoint's weights and fresh LoRA adapters (A uniform
    as peft inits it, B zero), drawn in a fixed order from the seed.

    from_scratch: the two heads that never take a loss are set so that they decide nothing: the
    IoU head always picks the first of the 3 mask outputs (a random head would pick by noise,
    training each output a little), the object score always says present."""
    state = dict(weights)
    if from_scratch:
        iou = FROZEN_HEADS + f"iou_prediction_head.layers.{model.cfg.sam2.iou_head_depth - 1}."
        state[iou + "weight"] = torch.zeros_like(state[iou + "weight"])
        state[iou + "bias"] = torch.tensor([0.0, 1.0, 0.0, 0.0])  # output 0 is the single-mask token
        obj = FROZEN_HEADS + "pred_obj_score_head.layers.2."
        state[obj + "weight"] = torch.zeros_like(state[obj + "weight"])
        state[obj + "bias"] = torch.full_like(state[obj + "bias"], 10.0)
    gen = torch.Generator().manual_seed(seed)
    drawn = {}  # InternLM2's q/k/v share one lora_A parameter: one draw for it
    for name, lora in sorted(lora_modules(model).items()):
        if id(lora.lora_A) not in drawn:
            bound = 1 / math.sqrt(lora.in_features)
            drawn[id(lora.lora_A)] = torch.empty(lora.r, lora.in_features).uniform_(-bound, bound, generator=gen)
        state[name + ".lora_A"] = drawn[id(lora.lora_A)]
        state[name + ".lora_B"] = torch.zeros(lora.out_features, lora.r)
    return state


def shard(model: Sa2VAModel, param_dtype: torch.dtype, activation_checkpointing: bool, compile_blocks: bool):
    """Activation checkpointing and compile per LLM block, then fully_shard per block (LLM, vision
    tower, SAM-2's image encoder) and the root, weights in param_dtype for the computation and
    gradients reduced in fp32 (torchtitan's recipe)."""
    if activation_checkpointing:
        for i, block in enumerate(model.llm.layers):
            model.llm.layers[i] = checkpoint_wrapper(block)  # keeps the RNG state: dropout recomputes the same
    blocks = list(model.llm.layers)
    blocks += list(model.vision.vit.blocks if model.cfg.family == "internvl" else model.vision.blocks)
    if compile_blocks:
        for block in blocks:
            block.compile()
    policy = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32)
    # SAM-2's mask decoder stays in the root: SAM2Base.forward_image calls its conv_s0/conv_s1
    # directly, past the decoder's own forward (where a unit of its own would gather them).
    for module in [*blocks, model.grounding.sam2.image_encoder]:
        fully_shard(module, mp_policy=policy)
    fully_shard(model, mp_policy=policy)


def training_records(cfg: TrainConfig, rank: int) -> data.Records:
    """--data as Records: a JSONL file, or a data root in the official layout mixed per --recipe."""
    if os.path.isdir(cfg.data):
        if cfg.recipe is None:
            raise ValueError(f"--data {cfg.data} is a folder; give --recipe ({', '.join(RECIPES)}) to train on the "
                             "official mixture of the datasets in it, or a JSONL file")
        records, missing = open_mixture(cfg.data, cfg.recipe, cfg.seed)
        if rank == 0 and missing:
            print(f"train.py: {cfg.data} lacks {', '.join(missing)} of the {cfg.recipe} recipe; training on the rest",
                  file=sys.stderr)
        return records
    if cfg.recipe is not None:
        raise ValueError(f"--recipe {cfg.recipe} needs --data to be a data root (a folder), not a file")
    return data.JsonlRecords(cfg.data)


def lr_at(step: int, cfg: TrainConfig) -> float:
    """mmengine LinearLR (from 1e-5 of the peak) over the warm-up steps, then CosineAnnealingLR to 0."""
    warm = max(1, int(cfg.warmup_ratio * cfg.steps))
    if step < warm:
        return cfg.lr * (1e-5 + (1 - 1e-5) * step / warm)
    return cfg.lr * 0.5 * (1 + math.cos(math.pi * (step - warm) / max(1, cfg.steps - warm)))


def epoch_order(dataset: data.TrainingData, epoch: int, seed: int, group: int) -> list[int]:
    """A shuffle of the samples in which each run of `group` (a global batch) is sorted by
    length, so a micro-batch holds samples of similar length (xtuner LengthGroupedSampler)."""
    perm = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed * 100003 + epoch)).tolist()
    return [i for k in range(0, len(perm), group)
            for i in sorted(perm[k:k + group], key=dataset.length, reverse=True)]


def micro_batches(dataset, cfg: TrainConfig, start_step: int, rank: int, world: int, accum: int):
    """The (epoch, index, text_only) keys of this process's micro-batches, step by step from start_step:
    micro-batch a of step s is global slot a * world + rank of that step's batch."""
    n, orders = len(dataset), {}
    for step in range(start_step, cfg.steps):
        for a in range(accum):
            first = step * cfg.batch_size + (a * world + rank) * cfg.micro_batch_size
            keys = []
            for p in range(first, first + cfg.micro_batch_size):
                epoch = p // n
                if epoch not in orders:
                    orders = {epoch: epoch_order(dataset, epoch, cfg.seed, cfg.batch_size)}
                keys.append((epoch, orders[epoch][p % n], step < cfg.text_warmup))
            yield keys


def complete(inputs: ModelInputs, model_cfg: Sa2VAConfig) -> ModelInputs:
    """Give a batch what every process needs to run the same graph: a blank image for the vision
    tower when it has none (no visual token reads it) and empty mask queries when it has none
    (the forward then decodes a stand-in)."""
    if inputs.pixel_values is None:
        if model_cfg.family == "internvl":
            s = model_cfg.vision.image_size
            inputs.pixel_values, inputs.grid_thw = torch.zeros(1, 3, s, s), None
        else:
            m = model_cfg.vision.spatial_merge_size
            inputs.pixel_values = torch.zeros(m * m, model_cfg.vision.patch_dim)
            inputs.grid_thw = torch.tensor([[1, m, m]])
        inputs.visual_rows = torch.zeros(0, dtype=torch.long)
    if inputs.mask_queries is None:
        g = 4 * model_cfg.sam2.grid
        inputs.mask_queries = torch.zeros(0, 2, dtype=torch.long)
        inputs.mask_targets = torch.zeros(0, g, g, dtype=torch.bool)
    return inputs


def micro_seed(cfg: TrainConfig, step: int, slot: int) -> int:
    return (cfg.seed * 1_000_003 + step) * 4099 + slot


class PhraseTable(torch.nn.Module):
    """A SAM-2 prompt per referring phrase, built from learned word vectors (--phrase-warmup,
    --phrase-distill): the sum of the phrase's word vectors over sqrt(words), so 'red circle'
    and 'red square' share 'red' and the [SEG] state can learn the phrase word by word.

    A word's row is its CRC-32 modulo the table size, the same on every process without a
    vocabulary to agree on (two words share a row about once in 32k pairs). Rows start far
    apart (std 1), as a from-scratch SAM-2 needs. Not part of the exported model.
    """
    ROWS = 1 << 15

    def __init__(self, dim: int, seed: int):
        super().__init__()
        gen = torch.Generator().manual_seed(seed + 7)
        self.weight = torch.nn.Parameter(torch.randn(self.ROWS, dim, generator=gen))

    @staticmethod
    def words(phrase: str) -> list[int]:
        return [zlib.crc32(w.encode()) % PhraseTable.ROWS for w in re.findall(r"[\w']+", phrase.lower())]

    def forward(self, phrases: list[str | None]) -> tuple[torch.Tensor, torch.Tensor]:
        """(N, dim) prompts and (N,) bool: which phrases have words (the others' rows are 0)."""
        words = [self.words(p) if p else [] for p in phrases]
        rows = torch.tensor([w for ws in words for w in ws], dtype=torch.long, device=self.weight.device)
        owner = torch.tensor([i for i, ws in enumerate(words) for _ in ws], dtype=torch.long, device=rows.device)
        counts = torch.tensor([len(ws) for ws in words], dtype=torch.float, device=rows.device)
        out = torch.zeros(len(phrases), self.weight.shape[1], device=rows.device).index_add(0, owner, self.weight[rows])
        return out / counts.clamp(min=1).sqrt()[:, None], counts > 0


def seg_phrases(samples: list[data.Sample]) -> list[str | None]:
    """The phrase of every [SEG] of a batch, in the model's row-major [SEG] order (None: unnamed).
    A video's [SEG]s stay unnamed: SAM-2 decodes its frames one by one, and a phrase may name
    motion that no single frame shows ('the circle moving right')."""
    def named(s):
        video = s.media is not None and s.media.sam2_frames is not None and len(s.media.sam2_frames) > 1
        return s.phrases if s.phrases is not None and not video else [None] * s.num_seg
    return [p for s in samples for p in named(s)]


def checkpoints(out: str) -> list[tuple[int, str]]:
    """Complete checkpoints of a run, oldest first (a checkpoint appears by rename when complete)."""
    folder = os.path.join(out, "checkpoints")
    if not os.path.isdir(folder):
        return []
    found = [(int(n.split("_")[1]), os.path.join(folder, n)) for n in os.listdir(folder) if n.startswith("step_")]
    return sorted(found)


def trained_state(model, names: set[str]) -> dict:
    return {k: v for k, v in get_model_state_dict(model).items() if k in names}


def save_checkpoint(cfg: TrainConfig, model, optimizer, step: int, names: set[str], rank: int, table=None):
    folder = os.path.join(cfg.out, "checkpoints")
    final, tmp = os.path.join(folder, f"step_{step:08d}"), os.path.join(folder, f".step_{step:08d}.partial")
    if rank == 0:
        os.makedirs(folder, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
    dist.barrier()
    dcp.save({"model": trained_state(model, names), "optim": get_optimizer_state_dict(model, optimizer)},
             checkpoint_id=tmp)
    dist.barrier()
    if rank == 0:
        with open(os.path.join(tmp, "trainer.json"), "w") as f:
            json.dump({"step": step}, f)
        if table is not None:  # replicated on every process: rank 0's copy
            torch.save({"table": table[0].state_dict(), "optim": table[1].state_dict()}, os.path.join(tmp, "phrases.pt"))
        os.replace(tmp, final)
        for _, old in checkpoints(cfg.out)[:-cfg.keep_checkpoints]:
            shutil.rmtree(old, ignore_errors=True)
    dist.barrier()


def load_checkpoint(path: str, model, optimizer, names: set[str], table=None) -> int:
    state = {"model": trained_state(model, names), "optim": get_optimizer_state_dict(model, optimizer)}
    dcp.load(state, checkpoint_id=path)
    # A checkpoint holds the trained weights only (the frozen ones come from --model again):
    # exactly those may be missing, nothing else.
    result = set_model_state_dict(model, state["model"], options=StateDictOptions(strict=False))
    frozen = set(get_model_state_dict(model)) - names
    missing = {k.replace("_checkpoint_wrapped_module.", "") for k in result.missing_keys}  # module paths
    if result.unexpected_keys or missing != frozen:
        raise ValueError(f"checkpoint {path} does not fit this model (unexpected {sorted(result.unexpected_keys)[:3]}, "
                         f"missing {sorted(missing - frozen)[:3]}); is it from another run?")
    set_optimizer_state_dict(model, optimizer, state["optim"])
    if table is not None:
        saved = os.path.join(path, "phrases.pt")
        if not os.path.exists(saved):
            raise ValueError(f"checkpoint {path} has no phrase prompts (phrases.pt) but this run uses --phrase-distill; "
                             "resume with the options the run started with")
        saved = torch.load(saved, weights_only=True)
        table[0].load_state_dict(saved["table"])
        table[1].load_state_dict(saved["optim"])
    with open(os.path.join(path, "trainer.json")) as f:
        return json.load(f)["step"]


def export_final(cfg: TrainConfig, model, model_cfg: Sa2VAConfig, tokenizer: Tokenizer, rank: int):
    """final/: LoRA merged into the weights, in our format (config.json, model.safetensors, tokenizer)."""
    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if rank != 0:
        return
    merged = merge_lora(state, cfg.lora_alpha / cfg.lora_r)
    dtype = parse_dtype(cfg.export_dtype)
    if dtype is not None:
        merged = {k: v.to(dtype) if v.is_floating_point() else v for k, v in merged.items()}
    dst = os.path.join(cfg.out, "final")
    if os.path.isdir(dst):
        shutil.rmtree(dst)  # our own export of an earlier, shorter run of this folder
    with output_folder(dst) as tmp:
        specs = [(k, v.dtype, tuple(v.shape)) for k, v in merged.items()]
        write_safetensors(os.path.join(tmp, "model.safetensors"), specs, iter(merged.items()))
        model_cfg.save(os.path.join(tmp, "config.json"))
        tokenizer.save(tmp)


# ----------------------------------------------------------------------------- the run

def train(cfg: TrainConfig):
    for name in ("steps", "batch_size", "micro_batch_size", "lora_r", "save_every", "keep_checkpoints"):
        if getattr(cfg, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(cfg, name)}")
    if cfg.phrase_warmup and cfg.phrase_distill <= 0:
        raise ValueError("--phrase-warmup needs phrase prompts to warm up with: give --phrase-distill (e.g. 1)")
    if not os.path.exists(cfg.data):
        raise ValueError(f"--data {cfg.data} does not exist; give a JSONL file of samples or an official data root")
    parse_dtype(cfg.export_dtype)  # a bad value fails now, not after training
    rank, world, device = init_distributed()
    try:
        _train(cfg, rank, world, device)
    finally:
        dist.destroy_process_group()


def _train(cfg: TrainConfig, rank: int, world: int, device: torch.device):
    if cfg.batch_size % (world * cfg.micro_batch_size):
        raise ValueError(f"--batch-size {cfg.batch_size} is not a multiple of {world} processes x "
                         f"--micro-batch-size {cfg.micro_batch_size}")
    accum = cfg.batch_size // (world * cfg.micro_batch_size)
    param_dtype = parse_dtype(cfg.param_dtype) or (torch.bfloat16 if device.type == "cuda" else torch.float32)
    # The model: built on meta, frozen per the recipe, LoRA, then sharded; weights come last.
    model_cfg, tokenizer, read_weights = model_source(cfg)
    if model_cfg.sam2 is None:
        raise ValueError(f"--model {cfg.model} has no SAM-2; training needs the whole Sa2VA")
    processor = data.make_processor(model_cfg, tokenizer)
    dataset = data.TrainingData(training_records(cfg, rank), processor, seed=cfg.seed, max_length=cfg.max_length)
    resuming = prepare_run_folder(cfg, rank)  # after every check of the inputs: a failed start leaves nothing
    with torch.device("meta"):
        model = Sa2VAModel(model_cfg)
    if not cfg.full:
        apply_lora(model, cfg.lora_r, cfg.lora_alpha, cfg.lora_dropout)
    set_trainable(model, cfg.full)
    names = {n for n, p in model.named_parameters(remove_duplicate=False) if p.requires_grad}
    scratch = cfg.full and cfg.model.startswith(("debug-", "random:"))
    state = initial_state(model, read_weights(), cfg.seed, from_scratch=scratch) if rank == 0 else {}
    shard(model, param_dtype, cfg.activation_checkpointing, cfg.compile)
    model.to_empty(device=device)
    set_model_state_dict(model, state, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
    del state
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, betas=(0.9, 0.999), weight_decay=cfg.weight_decay)
    table = None  # (PhraseTable, its optimizer) with --phrase-distill
    if cfg.phrase_distill > 0:
        phrases = PhraseTable(model_cfg.seg_dim, cfg.seed).to(device)
        table = (phrases, torch.optim.AdamW(phrases.parameters(), lr=cfg.lr, weight_decay=0.0))

    start = 0
    found = checkpoints(cfg.out) if resuming else []
    if found:
        start = load_checkpoint(found[-1][1], model, optimizer, names, table)
    if rank == 0:
        _trim_log(os.path.join(cfg.out, "metrics.jsonl"), start)
        print(f"train.py: {cfg.model} ({model_cfg.family}), {sum(p.numel() for p in params) / 1e6:.1f}M of "
              f"{sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters trained, {world} process(es) x "
              f"{accum} micro-batch(es) of {cfg.micro_batch_size}, {len(dataset)} samples; "
              + (f"resuming after step {start}" if start else "from the start"), file=sys.stderr)
    if start >= cfg.steps:
        export_final(cfg, model, model_cfg, tokenizer, rank)
        return

    plan = list(micro_batches(dataset, cfg, start, rank, world, accum))  # the (epoch, index, text_only) keys
    loader = torch.utils.data.DataLoader(dataset, batch_sampler=plan, collate_fn=list, num_workers=cfg.workers,
                                         worker_init_fn=_ignore_sigterm)
    batches = zip(plan, loader)
    stop = torch.zeros(1)
    previous = signal.signal(signal.SIGTERM, lambda *_: stop.fill_(1))  # checkpoint at the end of the step
    metrics_file = open(os.path.join(cfg.out, "metrics.jsonl"), "a") if rank == 0 else None
    board = SummaryWriter(os.path.join(cfg.out, "tensorboard")) if SummaryWriter is not None and rank == 0 else None
    epoch = (start * cfg.batch_size) // len(dataset)
    epoch_skipped = torch.zeros(1)  # this process's skipped samples of the current epoch
    skipped_file = open(os.path.join(cfg.out, f"skipped_rank{rank}.jsonl"), "a")
    bar = tqdm(total=cfg.steps, initial=start, desc="train", unit="step", disable=rank != 0)
    try:
        for step in range(start, cfg.steps):
            t0 = time.perf_counter()
            for group in optimizer.param_groups + (table[1].param_groups if table else []):
                group["lr"] = lr_at(step, cfg)
            totals = torch.zeros(7, dtype=torch.float64)  # loss, lm, mask, dice, tokens, skipped, distill
            for a in range(accum):
                keys, items = next(batches)
                samples = [s for s in items if isinstance(s, data.Sample)]
                for (item_epoch, *_), bad in zip(keys, items):
                    if not isinstance(bad, data.Skipped):
                        continue
                    if cfg.strict:
                        raise ValueError(f"{bad.where}: {bad.reason} (--strict)")
                    skipped_file.write(json.dumps({"step": step + 1, "epoch": item_epoch, "sample": bad.where,
                                                   "reason": bad.reason}) + "\n")
                    totals[5] += 1
                    epoch_skipped += 1
                weight = 1.0 if samples else 0.0  # an all-skipped micro-batch runs a stand-in, counted for nothing
                if not samples:
                    samples = [processor([("hi", "Hello.")])]
                inputs = complete(data.collate(samples, pad="right"), model_cfg).to(device, param_dtype)
                slot = a * world + rank
                torch.manual_seed(micro_seed(cfg, step, slot))  # dropout
                points = torch.Generator(device=device).manual_seed(micro_seed(cfg, step, slot) + 1)
                decode, loss_distill = None, torch.zeros((), device=device)
                if table:
                    phrase_prompts, named = table[0](seg_phrases(samples))
                    phrase_prompts = phrase_prompts.to(param_dtype)
                    if step < cfg.phrase_warmup:  # SAM-2 decodes the phrase prompts; unnamed [SEG]s take no mask loss
                        decode = (phrase_prompts, named)
                out = model(inputs, logits=loss_positions(inputs.labels), decode=decode)
                if table and bool(named.any()):
                    loss_distill = cfg.phrase_distill * F.mse_loss(out.seg_prompts[named].float(),
                                                                   phrase_prompts[named].detach().float())
                loss_lm = lm_loss_at(out.logits, inputs.labels)
                mask_logits, mask_targets = out.mask_logits, inputs.mask_targets
                if decode is not None:  # the warm-up: SAM-2 learns from the phrase prompts only
                    keep = named[inputs.mask_queries[:, 0]]
                    mask_logits, mask_targets = mask_logits[keep], mask_targets[keep]
                loss_mask, loss_dice = mask_losses(mask_logits, mask_targets, points, dense=cfg.dense_mask_loss)
                loss = loss_lm + loss_mask + loss_dice + loss_distill
                (loss * (weight / accum)).backward()
                with torch.no_grad():
                    totals[:4] += torch.stack([loss, loss_lm, loss_mask, loss_dice]).double().cpu() * weight
                    totals[6] += float(loss_distill) * weight
                    totals[4] += float(inputs.input_ids.numel() if inputs.key_mask is None else inputs.key_mask.sum())
            grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
            grad_norm = grad_norm.full_tensor() if isinstance(grad_norm, DTensor) else grad_norm
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if table and step < cfg.phrase_warmup:  # after the warm-up the table takes no gradient
                if world > 1 and table[0].weight.grad is not None:
                    dist.all_reduce(table[0].weight.grad, op=dist.ReduceOp.AVG)
                table[1].step()
            if table:
                table[1].zero_grad(set_to_none=True)
            dist.all_reduce(totals)
            dist.all_reduce(stop, op=dist.ReduceOp.MAX)
            seconds = time.perf_counter() - t0
            counted = world * accum
            row = {"step": step + 1, "loss": totals[0].item() / counted, "loss_lm": totals[1].item() / counted,
                   "loss_mask": totals[2].item() / counted, "loss_dice": totals[3].item() / counted,
                   "lr": lr_at(step, cfg), "grad_norm": float(grad_norm),
                   "tokens_per_s": totals[4].item() / seconds, "step_s": seconds, "peak_memory_gib": peak_memory_gib(device),
                   "skipped": int(totals[5].item())}
            if table:
                row["loss_distill"] = totals[6].item() / counted
            if metrics_file:
                metrics_file.write(json.dumps(row) + "\n")
                metrics_file.flush()
            if board:
                for key, value in row.items():
                    if key != "step":
                        board.add_scalar(key, value, step + 1)
            next_epoch = ((step + 1) * cfg.batch_size) // len(dataset)
            if next_epoch > epoch or step + 1 == cfg.steps:  # the same step on every process
                dist.all_reduce(epoch_skipped)
                if rank == 0 and epoch_skipped.item():
                    bar.write(f"train.py: epoch {epoch}: {int(epoch_skipped.item())} sample(s) skipped; which ones "
                              f"and why is in {os.path.join(cfg.out, 'skipped_rank*.jsonl')}", file=sys.stderr)
                epoch, epoch_skipped = next_epoch, torch.zeros(1)
            bar.update(1)
            bar.set_postfix(loss=f"{row['loss']:.4f}")
            last = step + 1 == cfg.steps
            if (step + 1) % cfg.save_every == 0 or last or stop.item():
                save_checkpoint(cfg, model, optimizer, step + 1, names, rank, table)
            if stop.item() and not last:
                raise SystemExit(128 + signal.SIGTERM)  # checkpointed: the same command resumes here
    finally:
        signal.signal(signal.SIGTERM, previous)
        bar.close()
        skipped_file.close()
        if metrics_file:
            metrics_file.close()
        if board:
            board.close()
    export_final(cfg, model, model_cfg, tokenizer, rank)
    if rank == 0:
        print(f"train.py: wrote {os.path.join(cfg.out, 'final')}", file=sys.stderr)


def peak_memory_gib(device: torch.device) -> float | None:
    """This process's peak: CUDA memory allocated on a GPU, peak resident memory (VmHWM) on a Linux CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) / 2**20
    except OSError:
        return None


def _ignore_sigterm(worker_id: int):
    # A SIGTERM to the whole process group (a cluster's preemption) must reach the trainer alone,
    # which checkpoints at the end of the step; its data workers end with it.
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def _trim_log(path: str, step: int):
    """Drop the metrics of steps after the checkpoint a resumed run continues from."""
    if not os.path.isfile(path):
        return
    with open(path) as f:
        rows = [line for line in f if line.strip() and json.loads(line)["step"] <= step]
    with open(path, "w") as f:
        f.writelines(rows)


if __name__ == "__main__":
    main()
