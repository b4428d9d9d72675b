"""BERT as the GCG benchmark's phrase scorer: bert-base-uncased's last hidden state, mean-pooled.

GLaMM's grounded-caption recall (Sa2VA's projects/sa2va/evaluation/metrics_gcg.py) matches a
predicted phrase to a ground-truth phrase only if their texts are alike: the cosine similarity of
`AutoModel("bert-base-uncased")(**tokenizer(text, max_length=512, truncation=True))
.last_hidden_state` averaged over every token, [CLS] and [SEP] included. This module reproduces
that with a hand-written encoder (transformers `BertModel` without its pooler) loaded strictly
from a local bert-base-uncased folder, and the WordPiece tokenizer on the `tokenizers` library:
the folder's tokenizer.json when it has one, else one built from vocab.txt as transformers'
`BertTokenizer` builds it.

Deviations: phrases are embedded in padded batches, each mean-pooled over its own tokens only, so
an embedding equals the one-phrase-at-a-time official value up to float rounding; sequences are
truncated at max_position_embeddings (512 for bert-base-uncased, the official max_length); the
weights always run in fp32, as the official `from_pretrained` default does. Only absolute position
embeddings, exact (erf) GELU and encoder-only configs are implemented; others are refused.
"""
import json
import os
import pickle
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from tokenizers import AddedToken, Tokenizer, normalizers, pre_tokenizers, processors
from tokenizers.models import WordPiece
from torch import nn

from model.checkpoint import SafetensorsReader, check_keys

GET_BERT = "pass the folder of a local bert-base-uncased download"
SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")  # BertTokenizer's defaults


@dataclass(frozen=True)
class BertConfig:
    # Defaults are transformers' BertConfig defaults, which are bert-base-uncased's numbers.
    vocab_size: int = 30522
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12
    hidden_act: str = "gelu"

    def __post_init__(self):
        if self.hidden_act != "gelu":
            raise ValueError(f"BERT hidden_act {self.hidden_act!r} is not implemented; only 'gelu' (exact erf GELU) is")
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(f"BERT hidden_size {self.hidden_size} is not a multiple of "
                             f"num_attention_heads {self.num_attention_heads}; fix config.json")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @classmethod
    def from_hf(cls, d: dict, what: str = "config.json") -> "BertConfig":
        """From a transformers BERT config.json dict; missing fields take transformers' defaults."""
        implemented = {"model_type": "bert", "position_embedding_type": "absolute", "is_decoder": False,
                       "add_cross_attention": False}
        for key, value in implemented.items():
            if d.get(key, value) != value:
                raise ValueError(f"{what}: {key}={d[key]!r} is not implemented here (only {value!r}); "
                                 "use a bert-base-uncased config")
        return cls(**{f: d[f] for f in cls.__dataclass_fields__ if f in d})

    @classmethod
    def load(cls, path: str) -> "BertConfig":
        return cls.from_hf(_read_json(path), path)


# Reference: transformers BertSelfAttention + BertSelfOutput.
class Attention(nn.Module):
    def __init__(self, cfg: BertConfig):
        super().__init__()
        self.cfg = cfg
        self.q = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.k = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.v = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.o = nn.Linear(cfg.hidden_size, cfg.hidden_size)

    def forward(self, x, mask):
        B, L, _ = x.shape
        q, k, v = (p(x).view(B, L, -1, self.cfg.head_dim).transpose(1, 2) for p in (self.q, self.k, self.v))  # (B, nh, L, hd)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.o(y.transpose(1, 2).reshape(B, L, -1))


# Reference: transformers BertLayer (post-LN: norm after each residual sum).
class Layer(nn.Module):
    def __init__(self, cfg: BertConfig):
        super().__init__()
        self.attn = Attention(cfg)
        self.attn_norm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.up = nn.Linear(cfg.hidden_size, cfg.intermediate_size)
        self.down = nn.Linear(cfg.intermediate_size, cfg.hidden_size)
        self.mlp_norm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)

    def forward(self, x, mask):
        x = self.attn_norm(x + self.attn(x, mask))
        return self.mlp_norm(x + self.down(F.gelu(self.up(x))))


# Reference: transformers BertModel (embeddings + encoder; no pooler, no dropout).
class BertModel(nn.Module):
    def __init__(self, cfg: BertConfig):
        super().__init__()
        self.cfg = cfg
        self.word_embeddings = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.position_embeddings = nn.Embedding(cfg.max_position_embeddings, cfg.hidden_size)
        self.token_type_embeddings = nn.Embedding(cfg.type_vocab_size, cfg.hidden_size)
        self.embed_norm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.layers = nn.ModuleList([Layer(cfg) for _ in range(cfg.num_hidden_layers)])

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                token_type_ids: torch.Tensor | None = None) -> torch.Tensor:
        """input_ids (B, L), attention_mask (B, L) with 1 on real tokens -> last hidden state (B, L, H)."""
        B, L = input_ids.shape
        if L > self.cfg.max_position_embeddings:
            raise ValueError(f"{L} tokens exceed BERT's {self.cfg.max_position_embeddings} positions; truncate the input")
        if token_type_ids is None:
            token_type_ids = torch.zeros_like(input_ids)
        positions = torch.arange(L, device=input_ids.device)
        x = self.word_embeddings(input_ids) + self.token_type_embeddings(token_type_ids) + self.position_embeddings(positions)
        x = self.embed_norm(x)
        mask = None if attention_mask is None else attention_mask.bool()[:, None, None, :]  # (B, 1, 1, L): keys to attend
        for layer in self.layers:
            x = layer(x, mask)
        return x


# HF BertModel names (after the optional "bert." prefix) -> ours; {} is the layer index.
HF_KEYS = {
    "embeddings.word_embeddings.weight": "word_embeddings.weight",
    "embeddings.position_embeddings.weight": "position_embeddings.weight",
    "embeddings.token_type_embeddings.weight": "token_type_embeddings.weight",
    "embeddings.LayerNorm.weight": "embed_norm.weight",
    "embeddings.LayerNorm.bias": "embed_norm.bias",
    "encoder.layer.{}.attention.self.query.weight": "layers.{}.attn.q.weight",
    "encoder.layer.{}.attention.self.query.bias": "layers.{}.attn.q.bias",
    "encoder.layer.{}.attention.self.key.weight": "layers.{}.attn.k.weight",
    "encoder.layer.{}.attention.self.key.bias": "layers.{}.attn.k.bias",
    "encoder.layer.{}.attention.self.value.weight": "layers.{}.attn.v.weight",
    "encoder.layer.{}.attention.self.value.bias": "layers.{}.attn.v.bias",
    "encoder.layer.{}.attention.output.dense.weight": "layers.{}.attn.o.weight",
    "encoder.layer.{}.attention.output.dense.bias": "layers.{}.attn.o.bias",
    "encoder.layer.{}.attention.output.LayerNorm.weight": "layers.{}.attn_norm.weight",
    "encoder.layer.{}.attention.output.LayerNorm.bias": "layers.{}.attn_norm.bias",
    "encoder.layer.{}.intermediate.dense.weight": "layers.{}.up.weight",
    "encoder.layer.{}.intermediate.dense.bias": "layers.{}.up.bias",
    "encoder.layer.{}.output.dense.weight": "layers.{}.down.weight",
    "encoder.layer.{}.output.dense.bias": "layers.{}.down.bias",
    "encoder.layer.{}.output.LayerNorm.weight": "layers.{}.mlp_norm.weight",
    "encoder.layer.{}.output.LayerNorm.bias": "layers.{}.mlp_norm.bias",
}
# Weights the phrase embedding does not use (the official metric reads last_hidden_state only).
POOLER_KEYS = ("pooler.dense.weight", "pooler.dense.bias")
HEADS_PREFIX = "cls."  # BertForPreTraining / BertForMaskedLM heads
# transformers < 4.31 saved this buffer; it is arange(max_position_embeddings), checked, not loaded.
POSITION_IDS_KEY = "embeddings.position_ids"
# TF-era names, as in bert-base-uncased's own files; transformers renames them on load too.
OLD_NORM_NAMES = {"LayerNorm.gamma": "LayerNorm.weight", "LayerNorm.beta": "LayerNorm.bias"}


def hf_key_map(cfg: BertConfig) -> dict[str, str]:
    """Every HF name (without the "bert." prefix) -> our name, for cfg's layer count."""
    out = {}
    for hf, ours in HF_KEYS.items():
        for i in range(cfg.num_hidden_layers) if "{}" in hf else [None]:
            out[hf.format(i)] = ours.format(i)
    return out


def _read_weights(folder: str) -> tuple[str, dict[str, torch.Tensor]]:
    st, bin_ = os.path.join(folder, "model.safetensors"), os.path.join(folder, "pytorch_model.bin")
    if os.path.isfile(st):
        f = SafetensorsReader(st)
        return st, {k: f.read(k) for k in f.keys()}
    if os.path.isfile(bin_):
        try:
            sd = torch.load(bin_, map_location="cpu", weights_only=True)
        except (pickle.UnpicklingError, RuntimeError, EOFError, OSError) as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise ValueError(f"{bin_} cannot be read as a weights-only PyTorch file ({first}); re-download it") from None
        if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
            raise ValueError(f"{bin_} does not hold a dict of tensors; re-download it")
        return bin_, sd
    raise ValueError(f"{folder} has neither model.safetensors nor pytorch_model.bin; {GET_BERT}")


def _hf_names(sd: dict[str, torch.Tensor], what: str) -> dict[str, torch.Tensor]:
    """The file's encoder tensors under HF BertModel names: the "bert." prefix stripped, TF-era
    LayerNorm names renamed, the pretraining heads, the pooler and position_ids dropped by name."""
    body = {k: t for k, t in sd.items() if not k.startswith(HEADS_PREFIX)}
    prefixed = [k.startswith("bert.") for k in body]
    if any(prefixed) and not all(prefixed):
        bare = next(k for k in body if not k.startswith("bert."))
        raise ValueError(f"{what}: keys with and without the 'bert.' prefix are mixed (e.g. {bare}); re-download it")
    out = {}
    for key, t in body.items():
        name = key.removeprefix("bert.")
        for old, new in OLD_NORM_NAMES.items():
            if name.endswith(old):
                name = name.removesuffix(old) + new
        if name in out:
            raise ValueError(f"{what}: {key} and another key both name {name}; the file is ambiguous, re-download it")
        if name in POOLER_KEYS:
            continue
        if name == POSITION_IDS_KEY:
            if not torch.equal(t.reshape(-1).long(), torch.arange(t.numel())):
                raise ValueError(f"{what}: {key} is not 0, 1, 2, ...; this BERT numbers positions differently")
            continue
        out[name] = t
    return out


def load_bert(folder: str, device="cpu") -> BertModel:
    """BertModel from a local HF folder (config.json + model.safetensors or pytorch_model.bin):
    built on the meta device, every tensor cast to fp32 and assigned strictly."""
    _check_folder(folder)
    cfg_path = os.path.join(folder, "config.json")
    if not os.path.isfile(cfg_path):
        raise ValueError(f"{folder} has no config.json; {GET_BERT}")
    cfg = BertConfig.load(cfg_path)
    what, sd = _read_weights(folder)
    got = _hf_names(sd, what)
    kmap = hf_key_map(cfg)
    with torch.device("meta"):
        model = BertModel(cfg)
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    check_keys({hf: shapes[ours] for hf, ours in kmap.items()}, {k: tuple(v.shape) for k, v in got.items()}, what)
    bad = [k for k, t in got.items() if not t.is_floating_point()]
    if bad:
        raise ValueError(f"{what}: {', '.join(sorted(bad)[:5])} are not float tensors; the file is damaged, re-download it")
    model.load_state_dict({kmap[k]: t.to(device=device, dtype=torch.float32) for k, t in got.items()},
                          strict=True, assign=True)
    return model.eval()


def _check_folder(folder: str):
    if not os.path.isdir(folder):
        raise ValueError(f"BERT folder {folder} does not exist or is not a folder; {GET_BERT}")


def _read_json(path: str) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            d = json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON ({e}); re-download it") from None
    if not isinstance(d, dict):
        raise ValueError(f"{path} does not hold a JSON object; re-download it")
    return d


def wordpiece_from_vocab(vocab_path: str, lowercase: bool = True, strip_accents: bool | None = None,
                         tokenize_chinese_chars: bool = True) -> Tokenizer:
    """The tokenizer transformers' BertTokenizer builds from vocab.txt: BERT normalisation (clean
    text, CJK spacing, lower-casing, accent stripping, which follows lowercase when None), split on
    whitespace and punctuation, greedy longest-match WordPiece with "##", [CLS] ... [SEP]."""
    with open(vocab_path, encoding="utf-8") as f:
        tokens = [line.rstrip("\n") for line in f]  # BertTokenizer's load_vocab: one token per line, as is
    vocab = {}
    for i, tok in enumerate(tokens):
        if tok in vocab:
            raise ValueError(f"{vocab_path}: token {tok!r} appears on lines {vocab[tok] + 1} and {i + 1}; re-download it")
        vocab[tok] = i
    missing = [t for t in SPECIAL_TOKENS if t not in vocab]
    if missing:
        raise ValueError(f"{vocab_path} lacks {', '.join(missing)}; it is not a BERT vocabulary, {GET_BERT}")
    tok = Tokenizer(WordPiece(vocab, unk_token="[UNK]", continuing_subword_prefix="##", max_input_chars_per_word=100))
    tok.normalizer = normalizers.BertNormalizer(clean_text=True, handle_chinese_chars=tokenize_chinese_chars,
                                                strip_accents=strip_accents, lowercase=lowercase)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS]:0 $A:0 [SEP]:0", pair="[CLS]:0 $A:0 [SEP]:0 $B:1 [SEP]:1",
        special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])])
    # Typed special tokens stay whole, as BertTokenizer's never-split list keeps them.
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    return tok


# tokenizer_config.json option -> the BertNormalizer field it sets
NORMALIZER_OPTIONS = {"do_lower_case": "lowercase", "strip_accents": "strip_accents",
                      "tokenize_chinese_chars": "handle_chinese_chars"}


def load_bert_tokenizer(folder: str, max_length: int = 512) -> Tokenizer:
    """The folder's WordPiece tokenizer: tokenizer.json if present, else built from vocab.txt with
    tokenizer_config.json's options. Encodings are [CLS] ... [SEP], truncated to max_length."""
    _check_folder(folder)
    tj, vt, tc = (os.path.join(folder, n) for n in ("tokenizer.json", "vocab.txt", "tokenizer_config.json"))
    options = _read_json(tc) if os.path.isfile(tc) else {}
    if os.path.isfile(tj):
        norm = _read_json(tj).get("normalizer") or {}
        for opt, field in NORMALIZER_OPTIONS.items():
            if norm.get("type") == "BertNormalizer" and opt in options and options[opt] != norm.get(field):
                raise ValueError(f"{folder}: tokenizer_config.json sets {opt}={options[opt]!r} but tokenizer.json's "
                                 f"normalizer has {field}={norm.get(field)!r}; {GET_BERT}")
        try:
            tok = Tokenizer.from_file(tj)
        except Exception as e:  # the Rust parser raises a bare Exception
            raise ValueError(f"{tj} cannot be read by the tokenizers library ({e}); re-download it") from None
    elif os.path.isfile(vt):
        tok = wordpiece_from_vocab(vt, lowercase=options.get("do_lower_case", True),
                                   strip_accents=options.get("strip_accents"),
                                   tokenize_chinese_chars=options.get("tokenize_chinese_chars", True))
    else:
        raise ValueError(f"{folder} has neither tokenizer.json nor vocab.txt; {GET_BERT}")
    tok.no_padding()  # a saved file may carry its own padding or truncation; phrases are padded by the caller
    tok.enable_truncation(max_length)
    ends = [tok.token_to_id(t) for t in ("[CLS]", "[SEP]")]
    ids = tok.encode("").ids
    if None in ends or ids != ends:
        raise ValueError(f"{folder}: the tokenizer does not wrap text in [CLS] ... [SEP]; it is not BERT's, {GET_BERT}")
    return tok


class PhraseEncoder:
    """Phrase embeddings and similarities of the GCG metric (inference only)."""

    def __init__(self, model: BertModel, tokenizer: Tokenizer, batch_size: int = 64):
        self.model, self.tokenizer, self.batch_size = model.eval(), tokenizer, batch_size
        self.device = model.word_embeddings.weight.device

    @classmethod
    def from_folder(cls, path: str, device="cpu", batch_size: int = 64) -> "PhraseEncoder":
        """From a local bert-base-uncased folder (config.json, model.safetensors or pytorch_model.bin,
        tokenizer.json or vocab.txt)."""
        model = load_bert(path, device)
        return cls(model, load_bert_tokenizer(path, model.cfg.max_position_embeddings), batch_size)

    @torch.no_grad()
    def embed(self, phrases: list[str]) -> torch.Tensor:
        """(N, H) fp32 on the model's device: each phrase's last hidden state averaged over its own
        tokens ([CLS] and [SEP] included, padding excluded)."""
        if isinstance(phrases, str) or not all(isinstance(p, str) for p in phrases):
            raise ValueError("embed takes a list of phrase strings; wrap a single phrase in a list")
        out = [torch.zeros(0, self.model.cfg.hidden_size, device=self.device)]
        for start in range(0, len(phrases), self.batch_size):
            enc = self.tokenizer.encode_batch(phrases[start:start + self.batch_size])
            L = max(len(e.ids) for e in enc)
            ids = torch.zeros(len(enc), L, dtype=torch.long)  # padded with 0 = [PAD]; masked anyway
            mask = torch.zeros(len(enc), L, dtype=torch.long)
            for i, e in enumerate(enc):
                ids[i, :len(e.ids)] = torch.tensor(e.ids)
                mask[i, :len(e.ids)] = 1
            ids, mask = ids.to(self.device), mask.to(self.device)
            h = self.model(ids, mask)  # (B, L, H)
            m = mask[..., None].float()
            out.append((h * m).sum(1) / m.sum(1))
        return torch.cat(out)

    def similarity_matrix(self, a: list[str], b: list[str]) -> torch.Tensor:
        """(len(a), len(b)) cosine similarities on the CPU, each distinct phrase embedded once."""
        uniq = list(dict.fromkeys([*a, *b]))
        emb = F.normalize(self.embed(uniq), dim=-1)  # as sklearn's cosine_similarity: unit rows, then dot
        row = {p: i for i, p in enumerate(uniq)}
        ea, eb = emb[[row[p] for p in a]], emb[[row[p] for p in b]]
        return (ea @ eb.T).cpu()

    def similarity(self, a: str, b: str) -> float:
        """Cosine similarity of two phrases' embeddings (the official text_similarity_bert)."""
        return float(self.similarity_matrix([a], [b])[0, 0])
