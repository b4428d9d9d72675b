"""model/tokenizer.py against the official tokenizers, on tiny models trained here.

InternLM2: the oracle is sentencepiece itself driven the way the official slow InternLM2Tokenizer is
under transformers 4.49-4.57 (added tokens split off with transformers' own Trie, sp.encode per
chunk, <s> prepended; 4.x `_decode` + InternLM2's `convert_tokens_to_string` around sp.decode).
Qwen: the oracle is transformers' AutoTokenizer on the same folder.
"""

import json
import random
import shutil

import pytest
import sentencepiece as spm
from sentencepiece import sentencepiece_model_pb2
from tokenizers import Regex, decoders, models, pre_tokenizers, processors, trainers
from tokenizers import Tokenizer as Backend
from transformers import AutoTokenizer
from transformers.tokenization_python import Trie

from model.tokenizer import Tokenizer, load_official_tokenizer, read_sentencepiece_model
from tests.conftest import (ADDITIONAL, CHAT, CORPUS, INTERNVL_TOKENS, SA2VA_TOKENS, SP_VARIANTS, train_sentencepiece,
                            write_internlm2_folder)

TEXTS = [
    "hello world",
    "Hello, World! It's a test.",
    " leading space",
    "   three leading spaces",
    "trailing space ",
    "multiple   inner    spaces",
    "line one\nline two\n\nline four\n",
    "tabs\there\t\tand there",
    "\n starts with a newline",
    "今天天气很好，请分割图中的狗。",
    "emoji 🐶🦊 and a rare char ∮ plus 𝔘",
    "<|im_start|>user\n<img><IMG_CONTEXT><IMG_CONTEXT></img>\nPlease segment the dog.<|im_end|>\n"
    "<|im_start|>assistant\n",
    "<|im_start|>user\n<image>\nPlease segment the dog.<|im_end|>\n<|im_start|>assistant\nSure, [SEG].<|im_end|>",
    "It is [SEG].",
    "the dog[SEG]and the cat [SEG] ",
    "<p> phrase </p> [SEG]",
    "<p>A brown dog</p> [SEG] is running on <p> the grass </p>[SEG].",
    "<s>literal bos</s> and <unk> in text",
    "control <|action_start|> and user <|plugin|> symbols, <|plugin|>x",
    "▁a typed ▁ lower-block",
    "",
    "   ",
    "<img>",
    "[SEG][SEG] [SEG]",
]

class SlowInternLM2:
    """The official InternLM2Tokenizer under transformers 4.49-4.57 slow PreTrainedTokenizer, condensed."""

    def __init__(self, folder):
        self.sp = spm.SentencePieceProcessor(model_file=str(folder / "tokenizer.model"))
        config = json.loads((folder / "tokenizer_config.json").read_text())
        self.added = {int(i): d for i, d in config["added_tokens_decoder"].items()}
        self.encoder = {d["content"]: i for i, d in self.added.items()}
        self.all_special_tokens = ["<s>", "</s>", "<unk>", *ADDITIONAL]  # bos, eos, unk, pad (= eos), additional
        self.trie = Trie()
        for t in self.encoder:
            self.trie.add(t)

    def tokenize(self, text):
        tokens = self.trie.split(text)
        for i, tok in enumerate(tokens):
            if tok in self.encoder:
                flags = self.added[self.encoder[tok]]
                if flags["rstrip"] and i + 1 < len(tokens) and tokens[i + 1]:
                    tokens[i + 1] = tokens[i + 1].lstrip()
                if flags["lstrip"] and i > 0 and tokens[i - 1]:
                    tokens[i - 1] = tokens[i - 1].rstrip()
        out = []
        for tok in tokens:
            if tok:
                out += [tok] if tok in self.encoder else self.sp.encode(tok, out_type=str)
        return out

    def encode(self, text):
        return [self.sp.bos_id()] + [self.encoder.get(t, self.sp.piece_to_id(t)) for t in self.tokenize(text)]

    def __len__(self):
        names = {self.added[i]["content"] if i in self.added else self.sp.id_to_piece(i)
                 for i in range(self.sp.get_piece_size())}
        return len(names | set(self.encoder))  # HF: len(get_vocab()), i.e. distinct names

    def _tokens_to_string(self, tokens):  # InternLM2Tokenizer.convert_tokens_to_string
        out, sub, prev_special = "", [], False
        for tok in tokens:
            if tok in self.all_special_tokens:
                if not prev_special:
                    out += " "
                out += self.sp.decode(sub) + tok
                prev_special, sub = True, []
            else:
                sub.append(tok)
                prev_special = False
        out += self.sp.decode(sub)
        for a, b in ((" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"), (" n't", "n't"),
                     (" 'm", "'m"), (" 's", "'s"), (" 've", "'ve"), (" 're", "'re")):
            out = out.replace(a, b)
        return (" " + out)[1:]

    def decode(self, ids, skip_special_tokens=False):  # transformers 4.x PreTrainedTokenizer._decode
        special_ids = {self.encoder[t] for t in self.all_special_tokens}
        tokens = [self.added[i]["content"] if i in self.added else self.sp.id_to_piece(i)
                  for i in ids if not (skip_special_tokens and i in special_ids)]
        legacy = set(self.encoder) - set(self.all_special_tokens)
        legacy |= {t for t in ADDITIONAL if self.encoder[t] >= self.sp.get_piece_size()}
        sub_texts, current = [], []
        for tok in tokens:
            if tok in legacy:
                if current:
                    s = self._tokens_to_string(current)
                    if len(s) > 0:
                        sub_texts.append(s)
                    current = []
                sub_texts.append(tok)
            else:
                current.append(tok)
        if current:
            sub_texts.append(self._tokens_to_string(current))
        return " ".join(sub_texts)


@pytest.fixture(scope="module", params=list(SP_VARIANTS))
def internlm2_folder(request, tmp_path_factory):
    root = tmp_path_factory.mktemp(request.param)
    model_file = train_sentencepiece(root / "sp", *SP_VARIANTS[request.param])
    return write_internlm2_folder(root / "ckpt", model_file)


def test_hand_parser_matches_protobuf(internlm2_folder):
    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString((internlm2_folder / "tokenizer.model").read_bytes())
    ours = read_sentencepiece_model(str(internlm2_folder / "tokenizer.model"))
    assert ours["pieces"] == [(p.piece, p.score, p.type) for p in proto.pieces]
    norm, trainer = proto.normalizer_spec, proto.trainer_spec
    assert (ours["add_dummy_prefix"], ours["remove_extra_whitespaces"], ours["precompiled_charsmap"]) == (
        norm.add_dummy_prefix, norm.remove_extra_whitespaces, norm.precompiled_charsmap)
    assert (ours["model_type"], ours["byte_fallback"], ours["unk_surface"]) == (
        trainer.model_type, trainer.byte_fallback, trainer.unk_surface)


def test_internlm2_encode_matches_slow_tokenizer(internlm2_folder):
    ours, ref = load_official_tokenizer(str(internlm2_folder)), SlowInternLM2(internlm2_folder)
    for text in TEXTS + CORPUS:
        assert ours.encode(text) == ref.encode(text), repr(text)
    ids = ours.encode(TEXTS[11])
    assert ids[0] == 1 and ids[1] == ours.token_to_id("<|im_start|>")
    assert ours.encode(TEXTS[11], add_bos=False) == ids[1:]
    assert ids.count(ours.token_to_id("<IMG_CONTEXT>")) == 2


def test_internlm2_added_token_strip_flags(internlm2_folder, tmp_path):
    folder = tmp_path / "ckpt"
    shutil.copytree(internlm2_folder, folder)
    config = json.loads((folder / "tokenizer_config.json").read_text())
    for d in config["added_tokens_decoder"].values():
        d["lstrip"], d["rstrip"] = d["content"] in ("[SEG]", "</p>"), d["content"] in ("<p>", "<|im_start|>")
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    ours, ref = load_official_tokenizer(str(folder)), SlowInternLM2(folder)
    texts = TEXTS + _random_texts(100, seed=2)
    for text in texts:
        assert ours.encode(text) == ref.encode(text), repr(text)
    if not internlm2_folder.parent.name.startswith("sp_defaults"):  # whitespace folding hides the flags
        unflagged = SlowInternLM2(internlm2_folder)
        assert any(ref.encode(text) != unflagged.encode(text) for text in texts)


def test_internlm2_ids_len_and_specials(internlm2_folder):
    ours, ref = load_official_tokenizer(str(internlm2_folder)), SlowInternLM2(internlm2_folder)
    base = ref.sp.get_piece_size()
    for k, tok in enumerate(INTERNVL_TOKENS + SA2VA_TOKENS):
        assert ours.token_to_id(tok) == base + k
    assert len(ours) == len(ref) == base + 14
    assert (ours.bos_id, ours.eos_id) == (1, 2)
    assert ours.token_to_id("<|im_start|>") == ref.sp.piece_to_id("[UNUSED_TOKEN_146]")
    assert ours.eos_token == "</s>" and ours.token_id_or_none("<not-a-token>") is None
    with pytest.raises(ValueError, match="not in this tokenizer"):
        ours.token_to_id("<not-a-token>")


def test_internlm2_decode_matches_slow_tokenizer(internlm2_folder):
    ours, ref = load_official_tokenizer(str(internlm2_folder)), SlowInternLM2(internlm2_folder)
    for text in TEXTS + CORPUS:
        ids = ref.encode(text)
        for skip in (False, True):
            assert ours.decode(ids, skip_special_tokens=skip) == ref.decode(ids, skip), repr(text)
        assert ours.decode(ids[1:]) == ref.decode(ids[1:]), repr(text)
    generated = ref.encode("Sure, the dog is [SEG].<|im_end|>")[1:]
    assert ours.decode(generated) == ref.decode(generated)
    byte_ids = [ref.sp.piece_to_id(f"<0x{b:02X}>") for b in "🐶".encode()]
    word = ref.encode("dog")[1:]
    for cut in ([byte_ids[0]], byte_ids[:3], byte_ids[1:], byte_ids + byte_ids[:2], byte_ids[:2] + word):  # bad UTF-8
        assert ours.decode(cut) == ref.decode(cut)


def test_internlm2_decode_arbitrary_ids(internlm2_folder):
    # generated ids need not look like encoded text: leading "▁" runs, controls, stray bytes, specials
    ours, ref = load_official_tokenizer(str(internlm2_folder)), SlowInternLM2(internlm2_folder)
    rng, size = random.Random(1), len(ref)
    space, control = ref.sp.piece_to_id("\u2581"), ref.sp.piece_to_id("<|action_start|>")
    starts = [[space, space], [control, space], [2, space], [ref.sp.piece_to_id("<0x41>"), space], []]
    for k in range(300):
        ids = rng.choice(starts) + [rng.randrange(size) for _ in range(rng.randint(0, 8))]
        for skip in (False, True):
            assert ours.decode(ids, skip_special_tokens=skip) == ref.decode(ids, skip), ids


def test_internlm2_plain_text_round_trip(internlm2_folder):
    ours = load_official_tokenizer(str(internlm2_folder))
    for text in ["hello world", "今天天气很好。请分割图中的狗", "emoji 🐶🦊 ∮", "Please segment the dog."]:
        assert ours.decode(ours.encode(text), skip_special_tokens=True) == text


def _random_texts(n, seed=0):
    rng = random.Random(seed)
    parts = [*" ".join(CORPUS).split(" "), " ", "  ", "\n", "\t", "[SEG]", "<p>", "</p>", "<|im_end|>",
             "<|im_start|>", "<IMG_CONTEXT>", "<s>", "🐶", "狗", "\u2581", "é", "<|plugin|>", "'s", " ."]
    return ["".join(rng.choice(parts) + rng.choice(["", " "]) for _ in range(rng.randint(1, 12))) for _ in range(n)]


def test_internlm2_random_mixtures(internlm2_folder):
    ours, ref = load_official_tokenizer(str(internlm2_folder)), SlowInternLM2(internlm2_folder)
    for text in _random_texts(300):
        ids = ref.encode(text)
        assert ours.encode(text) == ids, repr(text)
        assert ours.decode(ids) == ref.decode(ids), repr(text)


def test_save_load_round_trip(internlm2_folder, tmp_path):
    ours = load_official_tokenizer(str(internlm2_folder))
    ours.save(str(tmp_path / "ours"))
    again = Tokenizer.load(str(tmp_path / "ours"))
    for text in TEXTS:
        assert again.encode(text) == ours.encode(text)
        assert again.decode(ours.encode(text)) == ours.decode(ours.encode(text))
    assert len(again) == len(ours) and (again.bos_id, again.eos_id) == (ours.bos_id, ours.eos_id)


def test_unsupported_sentencepiece_models_fail_loudly(tmp_path):
    unigram = train_sentencepiece(tmp_path / "uni", "identity", False, False, [], model_type="unigram")
    with pytest.raises(ValueError, match="UNIGRAM"):
        load_official_tokenizer(str(write_internlm2_folder(tmp_path / "a", unigram)))
    dummy_user = train_sentencepiece(tmp_path / "du", "identity", True, False, ["<|plugin|>"])
    with pytest.raises(ValueError, match="USER_DEFINED"):
        load_official_tokenizer(str(write_internlm2_folder(tmp_path / "b", dummy_user)))


QWEN_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
              r"|\s*[\r\n]+|\s+(?!\S)|\s+")


def _write_qwen_folder(folder):
    backend = Backend(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN_SPLIT), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    backend.decoder = decoders.ByteLevel()
    backend.post_processor = processors.ByteLevel(trim_offsets=False)
    specials = ["<|endoftext|>", *CHAT]
    backend.train_from_iterator(CORPUS * 3, trainers.BpeTrainer(
        vocab_size=600, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False))
    folder.mkdir()
    backend.save(str(folder / "tokenizer.json"))  # like an InternVL base upload: no Sa2VA tokens yet
    base = backend.get_vocab_size(with_added_tokens=True)
    flags = {"lstrip": False, "rstrip": False, "single_word": False, "normalized": False, "special": True}
    decoder = {backend.token_to_id(t): t for t in specials}
    decoder.update({base + k: t for k, t in enumerate(INTERNVL_TOKENS + SA2VA_TOKENS)})
    config = {"added_tokens_decoder": {str(i): {"content": t, **flags} for i, t in decoder.items()},
              "additional_special_tokens": CHAT, "bos_token": None, "eos_token": "<|im_end|>",
              "pad_token": "<|endoftext|>", "clean_up_tokenization_spaces": False, "errors": "replace",
              "tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": 32768}
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    (folder / "added_tokens.json").write_text(json.dumps({t: i for i, t in decoder.items()}))
    (folder / "special_tokens_map.json").write_text(json.dumps(
        {"additional_special_tokens": CHAT, "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"}))
    return folder, base


def test_qwen_layout_matches_transformers(tmp_path):
    folder, base = _write_qwen_folder(tmp_path / "qwen")
    ours, ref = load_official_tokenizer(str(folder)), AutoTokenizer.from_pretrained(str(folder))
    assert len(ours) == len(ref) == base + 14
    assert ours.token_to_id("[SEG]") == ref.convert_tokens_to_ids("[SEG]") == base + 9
    assert ours.bos_id is None and ours.eos_id == ref.convert_tokens_to_ids("<|im_end|>")
    assert ours.encode(TEXTS[12], add_bos=False) == ours.encode(TEXTS[12])
    for text in TEXTS + CORPUS:
        ids = ref.encode(text)
        assert ours.encode(text) == ids, repr(text)
        for skip in (False, True):
            assert ours.decode(ids, skip_special_tokens=skip) == ref.decode(ids, skip_special_tokens=skip), repr(text)
    ours.save(str(tmp_path / "ours"))
    assert Tokenizer.load(str(tmp_path / "ours")).encode(TEXTS[12]) == ref.encode(TEXTS[12])


def test_qwen_conflicting_added_token_id_fails(tmp_path):
    folder, base = _write_qwen_folder(tmp_path / "qwen")
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config["added_tokens_decoder"][str(base + 20)] = config["added_tokens_decoder"].pop(str(base + 9))
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    (folder / "added_tokens.json").unlink()
    with pytest.raises(ValueError, match="should have id"):
        load_official_tokenizer(str(folder))


def test_internlm2_fast_tokenizer_json_converts(internlm2_folder, tmp_path):
    """An InternLM2 release that ships a fast tokenizer.json (its post-processor prepends <s>)
    instead of tokenizer.model loads, and encodes as the slow tokenizer does."""
    folder = tmp_path / "fast"
    shutil.copytree(internlm2_folder, folder)
    load_official_tokenizer(str(internlm2_folder))._backend.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer.model").unlink()
    fast, slow = load_official_tokenizer(str(folder)), SlowInternLM2(internlm2_folder)
    assert fast.meta["decode"] == "fast" and fast.bos_id == 1 and len(fast) == len(slow)
    for text in TEXTS:
        assert fast.encode(text) == slow.encode(text), repr(text)
        assert fast.encode(text, add_bos=False) == slow.encode(text)[1:], repr(text)
    # a post-processor that adds anything but the named BOS is refused
    backend = Backend.from_file(str(folder / "tokenizer.json"))
    backend.post_processor = processors.TemplateProcessing(single="<s>:0 $A:0 </s>:0", special_tokens=[("<s>", 1), ("</s>", 2)])
    backend.save(str(folder / "tokenizer.json"))
    with pytest.raises(ValueError, match=r"adds \[1, 2\] to every input; only a prepended bos_token"):
        load_official_tokenizer(str(folder))
