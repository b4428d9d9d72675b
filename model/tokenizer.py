"""Sa2VA tokenizers on the `tokenizers` library (no transformers, no sentencepiece at runtime).

`Tokenizer` = `tokenizer.json` + `tokenizer_meta.json` (eos/bos and how HF decodes this family).
`load_official_tokenizer(dir)` reads a released checkpoint's tokenizer files:
* Qwen family, and InternLM2 checkpoints that ship a fast `tokenizer.json` (whose post-processor
  prepends `<s>`) instead of `tokenizer.model`: `tokenizer.json` as shipped. Every token of
  `added_tokens.json`, of `tokenizer_config.json["added_tokens_decoder"]` and of the special-token
  map must sit at its HF id
  (missing ones are appended, as HF does; any other id is an error). Decoding = the fast `decode`,
  which the slow Qwen2Tokenizer of InternVL-Qwen checkpoints matches unless skip_special_tokens=True
  (fast skips every added token flagged special, slow only the special-token map's).
* InternLM2 family (Sa2VA-8B/26B): the sentencepiece `tokenizer.model` is parsed by hand and rebuilt
  as a BPE that encodes like the official slow `InternLM2Tokenizer` under transformers 4.49-4.57:
  HF's added/special tokens are split off the raw text first (leftmost-longest, their lstrip/rstrip
  flags honoured), every remaining chunk is `sp.encode`d on its own, so each chunk gets the model's
  dummy prefix (InternLM2Tokenizer has no `legacy=False` path), and `<s>` is prepended. Decoding
  reproduces transformers 4.x slow `_decode` (non-special added tokens such as `[SEG]` are their own
  sub-texts, joined with " ") and InternLM2's `convert_tokens_to_string` (" " before a special-token
  run, sentencepiece decoding per run, an unconditional `clean_up_tokenization`).

Deviations, none reachable with a sentencepiece-trained BPE such as InternLM2's: sentencepiece
breaks ties between equal-score merges by position, HF's BPE by merge rank; a piece HF renames
(`added_tokens_decoder`) is only reachable by its new name; sentencepiece USER_DEFINED pieces that
HF does not register are split off the raw text, which is exact only without dummy prefix and
whitespace folding (otherwise, like unigram models, UNUSED pieces or no byte fallback: a loud error).
"""

import codecs
import json
import os
import struct

from tokenizers import AddedToken, Regex, decoders, normalizers, processors
from tokenizers import Tokenizer as _Backend
from tokenizers.models import BPE

_NORMAL, _UNKNOWN, _CONTROL, _USER_DEFINED, _UNUSED, _BYTE = 1, 2, 3, 4, 5, 6  # SentencePiece.Type
_SP_MODEL_TYPES = {1: "UNIGRAM", 2: "BPE", 3: "WORD", 4: "CHAR"}
_SPACE = "\u2581"  # sentencepiece's visible space "▁"
# sentencepiece turns each invalid byte of a byte-fallback run into one U+FFFD (Python's "replace"
# would merge a broken multi-byte sequence into one).
codecs.register_error("sa2va_sentencepiece", lambda err: ("\ufffd", err.start + 1))


class Tokenizer:
    """The checkpoint's HF tokenizer (InternLM2Tokenizer slow / Qwen2TokenizerFast): text <-> ids.

    `len()` is HF's `len(tokenizer)`, the LLM's embedding row count."""

    def __init__(self, backend: _Backend, meta: dict):
        self._backend, self.meta = backend, meta
        self.eos_token = meta["eos_token"]
        self.eos_id = self.token_to_id(meta["eos_token"])
        self.bos_id = None if meta["bos_token"] is None else self.token_to_id(meta["bos_token"])
        if meta["decode"] == "internlm2_slow":
            self._special = set(meta["special_tokens"])
            self._special_ids = {self.token_to_id(t) for t in self._special}
            self._legacy = set(meta["legacy_added_tokens"])
            sp = meta["sentencepiece"]
            self._control, self._byte = set(sp["control_ids"]), set(sp["byte_ids"])

    def __len__(self) -> int:
        # HF's len() counts distinct token names; ours has one name per id, so the counts agree.
        return self._backend.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, add_bos: bool = True) -> list[int]:
        # The post-processor prepends <s> where the family does; add_bos=False encodes a continuation.
        return self._backend.encode(text, add_special_tokens=add_bos).ids

    def token_id_or_none(self, token: str) -> int | None:
        return self._backend.token_to_id(token)

    def token_to_id(self, token: str) -> int:
        i = self._backend.token_to_id(token)
        if i is None:
            raise ValueError(f"token {token!r} is not in this tokenizer's vocabulary; check the checkpoint's tokens")
        return i

    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        ids = [int(i) for i in ids]
        if self.meta["decode"] == "fast":
            text = self._backend.decode(ids, skip_special_tokens=skip_special_tokens)
        else:
            text = self._decode_internlm2(ids, skip_special_tokens)
        return _clean_up_tokenization(text) if self.meta["clean_up_tokenization_spaces"] else text

    def add_tokens(self, tokens: list[str]) -> None:
        """Append tokens, as Sa2VA adds its own to a base MLLM's tokenizer (HF `add_tokens(...,
        special_tokens=True)`: split off the raw text, ids after the last one; HF's slow decode
        then writes them as sub-texts of their own, as for the converted releases)."""
        present = [t for t in tokens if self._backend.token_to_id(t) is not None]
        if present:
            raise ValueError(f"the tokenizer already has {', '.join(present)}; is it a Sa2VA tokenizer already?")
        self._backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in tokens])
        if self.meta["decode"] == "internlm2_slow":
            self.meta["legacy_added_tokens"] = sorted({*self.meta["legacy_added_tokens"], *tokens})
            self._legacy = set(self.meta["legacy_added_tokens"])

    def save(self, directory: str) -> None:
        os.makedirs(directory, exist_ok=True)
        self._backend.save(os.path.join(directory, "tokenizer.json"))
        with open(os.path.join(directory, "tokenizer_meta.json"), "w", encoding="utf-8") as f:
            json.dump(self.meta, f, ensure_ascii=False, indent=1)

    @classmethod
    def load(cls, directory: str) -> "Tokenizer":
        for name in ("tokenizer.json", "tokenizer_meta.json"):
            if not os.path.isfile(os.path.join(directory, name)):
                raise ValueError(f"{directory} has no {name}; re-run convert.py to write the tokenizer")
        meta = _read_json(os.path.join(directory, "tokenizer_meta.json"))
        try:
            return cls(_backend_from_file(os.path.join(directory, "tokenizer.json")), meta)
        except (KeyError, TypeError) as e:
            raise ValueError(f"{directory}/tokenizer_meta.json lacks or mistypes {e}; re-run convert.py") from None

    # transformers 4.x PreTrainedTokenizer._decode with spaces_between_special_tokens=True.
    def _decode_internlm2(self, ids, skip_special_tokens):
        skip = self._special_ids if skip_special_tokens else set()
        pairs = [(i, self._backend.id_to_token(i)) for i in ids if i not in skip]
        if any(tok is None for _, tok in pairs):
            raise ValueError(f"decode: ids {[i for i, t in pairs if t is None][:5]} are outside the vocabulary "
                             f"(size {len(self)})")
        sub_texts, run = [], []
        for i, tok in pairs:
            if tok in self._legacy:
                if run and (s := self._internlm2_tokens_to_string(run)):
                    sub_texts.append(s)
                run = []
                sub_texts.append(tok)
            else:
                run.append((i, tok))
        if run:
            sub_texts.append(self._internlm2_tokens_to_string(run))
        return " ".join(sub_texts)

    # InternLM2Tokenizer.convert_tokens_to_string; its prefix-space step is a no-op (it compares a
    # token string with a set of ids, so it always adds the " " that `[1:]` then removes).
    def _internlm2_tokens_to_string(self, run):
        out, pieces, prev_special = "", [], False
        for i, tok in run:
            if tok in self._special:
                out += ("" if prev_special else " ") + self._sp_decode(pieces) + tok
                pieces, prev_special = [], True
            else:
                pieces.append((i, tok))
                prev_special = False
        return _clean_up_tokenization(out + self._sp_decode(pieces))

    # sentencepiece's Decode (v0.2): controls vanish, byte runs become UTF-8 (U+FFFD per bad byte),
    # "▁" -> " ", and the leading "▁" is eaten (every leading one when whitespace is folded).
    def _sp_decode(self, pieces):
        sp = self.meta["sentencepiece"]
        text, raw, at_start, ate_ws = "", bytearray(), True, False
        for i, piece in pieces:
            if i in self._byte:
                raw.append(int(piece[3:5], 16))
                continue
            text += raw.decode("utf-8", "sa2va_sentencepiece")
            raw.clear()
            at_start = at_start and not ate_ws and not text
            ate_ws = False
            if i in self._control:
                continue
            if i == sp["unk_id"]:
                text += sp["unk_surface"]
                continue
            if at_start and sp["strip_leading"] != "none" and piece.startswith(_SPACE):
                piece, ate_ws = piece[1:], sp["strip_leading"] == "first"
            text += piece.replace(_SPACE, " ")
        return text + raw.decode("utf-8", "sa2va_sentencepiece")


def _clean_up_tokenization(s: str) -> str:
    for a, b in ((" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"), (" n't", "n't"),
                 (" 'm", "'m"), (" 's", "'s"), (" 've", "'ve"), (" 're", "'re")):
        s = s.replace(a, b)
    return s


# ---- official checkpoint folders -------------------------------------------------------------

def _read_json(path, required=True):
    if not required and not os.path.isfile(path):
        return {}
    if not os.path.isfile(path):
        raise ValueError(f"{path} is missing; the tokenizer files of the checkpoint are incomplete")
    with open(path, encoding="utf-8") as f:
        try:
            out = json.load(f)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"{path} is not valid JSON ({e}); re-download the tokenizer files") from None
    if not isinstance(out, dict):
        raise ValueError(f"{path} is not a JSON object; re-download the tokenizer files")
    return out


def _backend_from_file(path: str) -> _Backend:
    try:
        return _Backend.from_file(path)
    except Exception as e:  # the tokenizers library raises a bare Exception for any unreadable file
        raise ValueError(f"{path} is not a tokenizer file `tokenizers` can read ({' '.join(str(e).split())[:200]}); "
                         "re-download it (or re-run convert.py)") from None


def _hf_added_and_special(src):
    """HF's added tokens {id: AddedToken-fields} and special-token names, as `from_pretrained` merges them."""
    cfg = _read_json(os.path.join(src, "tokenizer_config.json"))
    added = {int(i): dict(d) for i, d in cfg.get("added_tokens_decoder", {}).items()}
    for content, i in _read_json(os.path.join(src, "added_tokens.json"), required=False).items():
        if added.setdefault(i, {"content": content})["content"] != content:
            raise ValueError(f"{src}: added_tokens.json gives id {i} to {content!r}, tokenizer_config.json "
                             f"to {added[i]['content']!r}")
    smap = {**cfg, **_read_json(os.path.join(src, "special_tokens_map.json"), required=False)}
    name = lambda t: t["content"] if isinstance(t, dict) else t  # noqa: E731
    named = {k: name(smap[k]) for k in ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token",
                                        "cls_token", "mask_token") if smap.get(k)}
    additional = [name(t) for t in smap.get("additional_special_tokens", [])]
    if "eos_token" not in named:
        raise ValueError(f"{src}: no eos_token in special_tokens_map.json or tokenizer_config.json")
    return cfg, added, named, additional


def _add_with_ids(backend, added, src):
    """Register every HF added token at its HF id (appending the ones the backend lacks, in id order)."""
    for i in sorted(added):
        d = added[i]  # normalized=False: HF splits added tokens off the raw text, before normalizing
        token = AddedToken(d["content"], single_word=d.get("single_word", False), lstrip=d.get("lstrip", False),
                           rstrip=d.get("rstrip", False), normalized=False, special=d.get("special", True))
        backend.add_special_tokens([token]) if token.special else backend.add_tokens([token])
        if backend.token_to_id(added[i]["content"]) != i:
            raise ValueError(f"{src}: added token {added[i]['content']!r} should have id {i} but lands on "
                             f"{backend.token_to_id(added[i]['content'])}; the tokenizer files disagree")


def load_official_tokenizer(src: str) -> Tokenizer:
    if os.path.isfile(os.path.join(src, "tokenizer.model")):
        return _load_internlm2(src)
    if not os.path.isfile(os.path.join(src, "tokenizer.json")):
        raise ValueError(f"{src} has neither tokenizer.json (Qwen) nor tokenizer.model (InternLM2); "
                                "pass the checkpoint folder")
    cfg, added, named, additional = _hf_added_and_special(src)
    backend = _backend_from_file(os.path.join(src, "tokenizer.json"))
    _add_with_ids(backend, added, src)
    for tok in [*named.values(), *additional]:
        if backend.token_to_id(tok) is None:
            raise ValueError(f"{src}: special token {tok!r} is in no vocabulary file")
    # What the post-processor puts around every input: nothing (Qwen), or the BOS alone (an
    # InternLM2 fast tokenizer, whose template prepends <s>).
    added = backend.encode("").ids
    bos = named.get("bos_token")
    if added and not (bos is not None and added == [backend.token_to_id(bos)]):
        raise ValueError(f"{src}: tokenizer.json adds {added} to every input; only a prepended bos_token "
                         f"({bos!r}) is supported")
    meta = {"decode": "fast", "eos_token": named["eos_token"], "bos_token": bos if added else None,
            "clean_up_tokenization_spaces": cfg.get("clean_up_tokenization_spaces", False)}
    return Tokenizer(backend, meta)


# ---- sentencepiece ModelProto, read by hand (field numbers: sentencepiece_model.proto) ----------

def _varint(buf, k):
    out = shift = 0
    while True:
        b = buf[k]
        out, k, shift = out | (b & 0x7F) << shift, k + 1, shift + 7
        if b < 0x80:
            return out, k


def _fields(buf):
    k = 0
    while k < len(buf):
        key, k = _varint(buf, k)
        wire = key & 7
        if wire == 0:
            val, k = _varint(buf, k)
        elif wire in (1, 5):
            size = 8 if wire == 1 else 4
            val, k = bytes(buf[k:k + size]), k + size
        elif wire == 2:
            n, k = _varint(buf, k)
            val, k = buf[k:k + n], k + n
        else:
            raise ValueError(f"protobuf wire type {wire} in a sentencepiece model; is it a tokenizer.model?")
        yield key >> 3, val


def read_sentencepiece_model(path: str) -> dict:
    """pieces [(piece, score, type)], and the trainer/normalizer fields we use (proto2 defaults)."""
    with open(path, "rb") as f:
        buf = f.read()
    m = {"pieces": [], "model_type": 1, "byte_fallback": False, "treat_whitespace_as_suffix": False,
         "unk_surface": " \u2047 ", "precompiled_charsmap": b"", "add_dummy_prefix": True,
         "remove_extra_whitespaces": True, "escape_whitespaces": True, "denormalizer": b""}
    for field, val in _fields(buf):
        if field == 1:
            p = {1: b"", 2: struct.pack("<f", 0.0), 3: _NORMAL} | dict(_fields(val))
            m["pieces"].append((bytes(p[1]).decode("utf-8"), struct.unpack("<f", p[2])[0], p[3]))
        elif field == 2:
            t = dict(_fields(val))
            m["model_type"] = t.get(3, 1)
            m["treat_whitespace_as_suffix"] = bool(t.get(24, 0))
            m["byte_fallback"] = bool(t.get(35, 0))
            m["unk_surface"] = bytes(t.get(44, m["unk_surface"].encode())).decode("utf-8")
        elif field == 3:
            n = dict(_fields(val))
            m["precompiled_charsmap"] = bytes(n.get(2, b""))
            m["add_dummy_prefix"], m["remove_extra_whitespaces"], m["escape_whitespaces"] = (
                bool(n.get(3, 1)), bool(n.get(4, 1)), bool(n.get(5, 1)))
        elif field == 5:
            m["denormalizer"] = bytes(dict(_fields(val)).get(2, b""))
    return m


def _load_internlm2(src):
    path = os.path.join(src, "tokenizer.model")
    sp = read_sentencepiece_model(path)
    cfg, added, named, additional = _hf_added_and_special(src)
    unsupported = {
        f"model type {_SP_MODEL_TYPES.get(sp['model_type'], sp['model_type'])} (only BPE)": sp["model_type"] != 2,
        "no byte_fallback": not sp["byte_fallback"], "treat_whitespace_as_suffix": sp["treat_whitespace_as_suffix"],
        "escape_whitespaces=false": not sp["escape_whitespaces"], "a denormalizer": bool(sp["denormalizer"]),
        "UNUSED pieces": _UNUSED in {t for _, _, t in sp["pieces"]},
        "single_word added tokens": any(d.get("single_word") for d in added.values())}
    for what, bad in unsupported.items():
        if bad:
            raise ValueError(f"{path}: sentencepiece tokenizer with {what} is not supported by this converter")
    vocab = [p for p, _, _ in sp["pieces"]]
    for i, d in added.items():  # HF's name wins for ids inside the sentencepiece vocab, as in the slow class
        if i < len(vocab):
            vocab[i] = d["content"]
    if len(set(vocab)) != len(vocab):
        raise ValueError(f"{src}: the sentencepiece vocab plus HF's added-token names has duplicate strings")
    ids = {p: i for i, p in enumerate(vocab)}
    hf_names = {d["content"] for d in added.values()}
    for tok in [*named.values(), *additional]:  # slow tokenizers add every special token to the split trie
        if tok not in hf_names and tok not in ids:
            raise ValueError(f"{src}: special token {tok!r} is neither a sentencepiece piece nor an added token")
        if tok not in hf_names:
            added[ids[tok]] = {"content": tok, "special": True}

    # sentencepiece merges a symbol pair when the concatenation is a NORMAL piece, best score first.
    unk_id = next(i for i, (_, _, t) in enumerate(sp["pieces"]) if t == _UNKNOWN)
    normal = {p: i for i, (p, _, t) in enumerate(sp["pieces"]) if t == _NORMAL and i not in added}
    merges = sorted(((-sp["pieces"][i][1], i, normal[p[:k]], p[:k], p[k:]) for p, i in normal.items()
                     for k in range(1, len(p)) if p[:k] in normal and p[k:] in normal))
    backend = _Backend(BPE(ids, [(a, b) for *_, a, b in merges], unk_token=vocab[unk_id], byte_fallback=True))

    # Normalizer = sentencepiece's, run per chunk between added tokens (HF runs sp.encode per chunk).
    steps = [normalizers.Precompiled(sp["precompiled_charsmap"])] if sp["precompiled_charsmap"] else []
    if sp["remove_extra_whitespaces"]:
        steps += [normalizers.Replace(Regex(" {2,}"), " "), normalizers.Replace(Regex(r"\A "), "")]
    steps.append(normalizers.Replace(" ", _SPACE))
    if sp["remove_extra_whitespaces"]:
        steps.append(normalizers.Replace(Regex(_SPACE + r"+\z"), ""))  # sp strips trailing "▁", typed ones too
    if sp["add_dummy_prefix"]:
        steps.append(normalizers.Prepend(_SPACE))  # Prepend skips empty chunks, as sentencepiece does
    backend.normalizer = normalizers.Sequence(steps)
    strip = "all" if sp["remove_extra_whitespaces"] else "first" if sp["add_dummy_prefix"] else "none"
    backend.decoder = decoders.Sequence([decoders.Replace(_SPACE, " "), decoders.ByteFallback(), decoders.Fuse()]
                                        + ([decoders.Strip(" ", 1, 0)] if strip != "none" else []))
    _add_with_ids(backend, added, src)
    extra_user = [p for i, (p, _, t) in enumerate(sp["pieces"]) if t == _USER_DEFINED and i not in added]
    if extra_user and strip != "none":
        raise ValueError(f"{path}: USER_DEFINED pieces {extra_user[:3]} with a dummy prefix or whitespace folding "
                         "cannot be reproduced; register them as added tokens in tokenizer_config.json")
    backend.add_tokens([AddedToken(p, normalized=False, special=False) for p in extra_user])

    add_bos, add_eos = cfg.get("add_bos_token", True), cfg.get("add_eos_token", False)  # InternLM2Tokenizer's defaults
    bos, eos = named.get("bos_token"), named["eos_token"]
    if add_bos and bos is None:
        raise ValueError(f"{src}: add_bos_token is true but no bos_token is named")
    single = " ".join([f"{bos}:0"] * add_bos + ["$A:0"] + [f"{eos}:0"] * add_eos)
    backend.post_processor = processors.TemplateProcessing(
        single=single, special_tokens=[(t, backend.token_to_id(t)) for t in {bos, eos} if t])
    # HF decodes "legacy added tokens" (added, not special; or special beyond the base vocab) apart.
    special = sorted(set(named.values()) | set(additional))
    legacy = {d["content"] for d in added.values()} - set(special)
    legacy |= {t for t in additional if backend.token_to_id(t) >= len(vocab)}
    types = [t for _, _, t in sp["pieces"]]
    meta = {"decode": "internlm2_slow", "eos_token": eos, "bos_token": bos if add_bos else None,
            "clean_up_tokenization_spaces": cfg.get("clean_up_tokenization_spaces", False),
            "special_tokens": special, "legacy_added_tokens": sorted(legacy),
            "sentencepiece": {"control_ids": [i for i, t in enumerate(types) if t == _CONTROL],
                              "byte_ids": [i for i, t in enumerate(types) if t == _BYTE], "unk_id": unk_id,
                              "unk_surface": sp["unk_surface"], "strip_leading": strip}}
    return Tokenizer(backend, meta)
