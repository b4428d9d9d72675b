"""model/bert.py against transformers' BERT on a tiny random model saved as transformers saves it.

The model oracle is transformers `BertModel` / `BertForPreTraining`; the phrase oracle is the
official GCG metric's formula (`last_hidden_state.mean(dim=1)` of one phrase tokenized with
max_length + truncation, then sklearn-style cosine: unit rows, dot). The tokenizer oracles are
transformers' pure-Python `BertTokenizerLegacy` (the 4.x slow BertTokenizer) and its
tokenizers-backed `BertTokenizer` (= BertTokenizerFast).
"""
import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from tokenizers import Tokenizer
from transformers import BertConfig as HFBertConfig
from transformers import BertForPreTraining, BertModel, BertTokenizer
from transformers.models.bert.tokenization_bert_legacy import BertTokenizerLegacy

from model.bert import BertConfig, PhraseEncoder, load_bert, load_bert_tokenizer

VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]",
         "the", "a", "man", "woman", "dog", "cat", "red", "brown", "car", "street", "on", "in", "of", "and", "is",
         "cafe", "resume", "naive", "wear", "run", "jump", "big", "small", "tree", "near", "left", "person",
         "##s", "##ing", "##er", "##ed", "##e", "##a", "##n", "##t", "##r", "##d", "e", "n", "t", "r", "d", "s",
         ",", ".", "!", "?", "-", "'", "(", ")", "\"", ":", "狗", "猫"]
MAX_POS = 40
TEXTS = [
    "the dog",
    "A Brown DOG running near the Red Car.",
    "Café, résumé and NAÏVE: accents!",
    "the man's cat (left) - jumped?",
    "xylophone zebra quux",  # unknown words -> [UNK]
    "dogs\tand\ncats  on   the street",
    "狗和猫",  # CJK characters are split one by one
    "[MASK] is the [CLS] token, [mask] is not",
    "a " + "runnings " * 60,  # longer than MAX_POS: truncated
    "",
    "   ",
]
PHRASES = ["the dog", "a brown dog", "A Brown DOG running near the Red Car.", "the cat", "Café résumé",
           "a woman wearing a red dress near a big tree on the left of the street", "xylophone", "run " * 50]


def write_vocab(folder):
    folder.mkdir(exist_ok=True)
    (folder / "vocab.txt").write_text("".join(t + "\n" for t in VOCAB), encoding="utf-8")
    return folder


def hf_config(**kw):
    return HFBertConfig(vocab_size=len(VOCAB), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=64, max_position_embeddings=MAX_POS, type_vocab_size=2, **kw)


def randomize(model):
    """Weights far from the near-zero HF init, so a wrong op changes the hidden states visibly."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(1 + 0.2 * torch.randn_like(p) if "LayerNorm.weight" in name else 0.3 * torch.randn_like(p))
    return model.eval()


def hf_folder(tmp_path, kind="model", name="bert"):
    """A tiny random transformers BERT saved as a local folder; returns (folder, hf BertModel)."""
    folder = write_vocab(tmp_path / name)
    if kind == "pretraining":  # "bert."-prefixed keys plus the cls.* heads and the pooler
        full = randomize(BertForPreTraining(hf_config()))
        full.save_pretrained(folder)
        return folder, full.bert
    hf = randomize(BertModel(hf_config()))
    hf.save_pretrained(folder)
    if kind == "bin":  # bert-base-uncased's own layout: pytorch_model.bin with TF-era LayerNorm names
        sd = load_file(folder / "model.safetensors")
        (folder / "model.safetensors").unlink()
        old = {k.replace("LayerNorm.weight", "LayerNorm.gamma").replace("LayerNorm.bias", "LayerNorm.beta"): v
               for k, v in sd.items()}
        assert any(k.endswith("gamma") for k in old)
        torch.save({"bert." + k: v for k, v in old.items()}, folder / "pytorch_model.bin")
    return folder, hf


def hf_tokenizer(folder):
    return BertTokenizer(vocab=str(folder / "vocab.txt"))


def one_line_error(excinfo, *words):
    msg = str(excinfo.value)
    assert "\n" not in msg, msg
    for w in words:
        assert w in msg, msg


@pytest.mark.parametrize("kind", ["model", "pretraining", "bin"])
@torch.no_grad()
def test_last_hidden_state_matches_transformers(tmp_path, kind):
    folder, hf = hf_folder(tmp_path, kind)
    ours = load_bert(str(folder))
    enc = hf_tokenizer(folder)(PHRASES[:6], padding=True, return_tensors="pt")
    assert enc["attention_mask"].float().mean() < 0.8  # a batch with real padding
    ref = hf(**enc).last_hidden_state
    assert ref.abs().max() > 1.0
    got = ours(enc["input_ids"], enc["attention_mask"], enc["token_type_ids"])
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)
    # Token type ids are used: type 1 changes the result, and still matches.
    types = enc["attention_mask"] * (torch.arange(enc["input_ids"].shape[1]) % 2)
    torch.testing.assert_close(ours(enc["input_ids"], enc["attention_mask"], types),
                               hf(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"],
                                  token_type_ids=types).last_hidden_state, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(ours(enc["input_ids"], enc["attention_mask"], types), got, atol=1e-3)


@pytest.mark.parametrize("kind", ["pretraining", "bin"])
@torch.no_grad()
def test_phrase_embeddings_match_official_formula(tmp_path, kind):
    folder, hf = hf_folder(tmp_path, kind)
    tok = hf_tokenizer(folder)
    ref = torch.cat([hf(**tok(p, return_tensors="pt", max_length=MAX_POS, truncation=True)).last_hidden_state.mean(dim=1)
                     for p in PHRASES])
    enc = PhraseEncoder.from_folder(str(folder), batch_size=3)  # several batches, each padded
    got = enc.embed(PHRASES)
    assert got.shape == (len(PHRASES), 32)
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)
    assert enc.embed([]).shape == (0, 32)

    r = ref.numpy().astype(np.float64)
    r /= np.linalg.norm(r, axis=1, keepdims=True)
    cos = r @ r.T  # sklearn cosine_similarity: unit rows, then dot
    assert cos.min() < 0.9  # the phrases are told apart
    np.testing.assert_allclose(enc.similarity_matrix(PHRASES[:3], PHRASES), cos[:3], atol=1e-5)
    assert enc.similarity(PHRASES[1], PHRASES[4]) == pytest.approx(cos[1, 4], abs=1e-5)
    assert enc.similarity(PHRASES[0], PHRASES[0]) == pytest.approx(1.0, abs=1e-5)


def test_tokenizer_ids_match_transformers(tmp_path):
    vocab_only = write_vocab(tmp_path / "vocab_only")
    with_json = write_vocab(tmp_path / "with_json")
    hf_tokenizer(with_json).save_pretrained(with_json)  # tokenizer.json + tokenizer_config.json
    saved = Tokenizer.from_file(str(with_json / "tokenizer.json"))
    saved.enable_padding(length=MAX_POS + 5)  # a file saved with padding/truncation on: both are overridden
    saved.enable_truncation(4)
    saved.save(str(with_json / "tokenizer.json"))
    (with_json / "vocab.txt").write_text("[PAD]\n")  # a wrong vocab.txt: tokenizer.json must be the one read
    slow = BertTokenizerLegacy(vocab_file=str(vocab_only / "vocab.txt"))
    fast = hf_tokenizer(vocab_only)
    for folder in (vocab_only, with_json):
        ours = load_bert_tokenizer(str(folder), max_length=MAX_POS)
        for text in TEXTS:
            want = slow(text, max_length=MAX_POS, truncation=True)["input_ids"]
            assert fast(text, max_length=MAX_POS, truncation=True)["input_ids"] == want, text
            assert ours.encode(text).ids == want, (folder.name, text)
    assert 1 in ours.encode(TEXTS[4]).ids and len(ours.encode(TEXTS[8]).ids) == MAX_POS  # [UNK]s, truncation


def test_tokenizer_config_options_are_honoured(tmp_path):
    folder = write_vocab(tmp_path / "cased")
    (folder / "tokenizer_config.json").write_text(json.dumps({"do_lower_case": False}))
    slow = BertTokenizerLegacy(vocab_file=str(folder / "vocab.txt"), do_lower_case=False)
    ours = load_bert_tokenizer(str(folder))
    for text in TEXTS[:4]:
        assert ours.encode(text).ids == slow(text)["input_ids"], text
    assert ours.encode("The Dog").ids != load_bert_tokenizer(str(write_vocab(tmp_path / "uncased"))).encode("The Dog").ids


def test_missing_files_are_named(tmp_path):
    with pytest.raises(ValueError) as e:
        PhraseEncoder.from_folder(str(tmp_path / "nowhere"))
    one_line_error(e, "nowhere", "bert-base-uncased")
    folder, _ = hf_folder(tmp_path)
    (folder / "model.safetensors").unlink()
    with pytest.raises(ValueError) as e:
        load_bert(str(folder))
    one_line_error(e, "model.safetensors", "pytorch_model.bin", "bert-base-uncased")
    (folder / "config.json").unlink()
    with pytest.raises(ValueError) as e:
        load_bert(str(folder))
    one_line_error(e, "config.json", "bert-base-uncased")
    (folder / "vocab.txt").unlink()
    with pytest.raises(ValueError) as e:
        load_bert_tokenizer(str(folder))
    one_line_error(e, "tokenizer.json", "vocab.txt", "bert-base-uncased")


def _edit_weights(folder, fn):
    sd = load_file(folder / "model.safetensors")
    fn(sd)
    save_file(sd, folder / "model.safetensors")


def test_unexpected_missing_and_ambiguous_keys_are_named(tmp_path):
    cases = {
        "unexpected": (lambda sd: sd.update({"bert.encoder.layer.0.attention.self.rel.weight": torch.zeros(2)}),
                       ["unexpected", "encoder.layer.0.attention.self.rel.weight"]),
        "missing": (lambda sd: sd.pop("bert.encoder.layer.1.output.dense.bias"),
                    ["missing", "encoder.layer.1.output.dense.bias"]),
        "a third layer": (lambda sd: sd.update({"bert.encoder.layer.2.output.dense.bias": torch.zeros(32)}),
                          ["unexpected", "encoder.layer.2.output.dense.bias"]),
        "mis-shaped": (lambda sd: sd.update({"bert.embeddings.word_embeddings.weight": torch.zeros(7, 32)}),
                       ["wrong shape", "embeddings.word_embeddings.weight"]),
        "mixed prefix": (lambda sd: sd.update({"embeddings.LayerNorm.bias": sd.pop("bert.embeddings.LayerNorm.bias")}),
                         ["prefix", "embeddings.LayerNorm.bias"]),
        "old and new name": (lambda sd: sd.update({"bert.embeddings.LayerNorm.gamma": torch.ones(32)}),
                             ["embeddings.LayerNorm.weight", "ambiguous"]),
        "a head outside cls.": (lambda sd: sd.update({"bert.predictions.bias": torch.zeros(len(VOCAB))}),
                                ["unexpected", "predictions.bias"]),
    }
    for what, (edit, words) in cases.items():
        folder, _ = hf_folder(tmp_path, "pretraining", name=what.replace(" ", "_"))
        _edit_weights(folder, edit)
        with pytest.raises(ValueError) as e:
            load_bert(str(folder))
        one_line_error(e, *words)


def test_old_position_ids_buffer_is_checked_not_loaded(tmp_path):
    folder, hf = hf_folder(tmp_path, "pretraining")
    _edit_weights(folder, lambda sd: sd.update({"bert.embeddings.position_ids": torch.arange(MAX_POS)[None]}))
    ids = torch.tensor([[2, 5, 9, 3]])
    torch.testing.assert_close(load_bert(str(folder))(ids), hf(ids).last_hidden_state, atol=1e-5, rtol=1e-5)
    _edit_weights(folder, lambda sd: sd.update({"bert.embeddings.position_ids": torch.arange(MAX_POS)[None] + 1}))
    with pytest.raises(ValueError) as e:
        load_bert(str(folder))
    one_line_error(e, "position_ids")


@pytest.mark.parametrize("change, words", [
    ({"position_embedding_type": "relative_key"}, ["position_embedding_type", "relative_key"]),
    ({"hidden_act": "gelu_new"}, ["hidden_act", "gelu_new"]),
    ({"is_decoder": True}, ["is_decoder"]),
    ({"model_type": "roberta"}, ["model_type", "roberta"]),
    ({"num_attention_heads": 5}, ["num_attention_heads"]),
])
def test_unsupported_config_is_refused(tmp_path, change, words):
    folder, _ = hf_folder(tmp_path)
    cfg = json.loads((folder / "config.json").read_text())
    assert BertConfig.from_hf(cfg).hidden_size == 32
    (folder / "config.json").write_text(json.dumps(cfg | change))
    with pytest.raises(ValueError) as e:
        load_bert(str(folder))
    one_line_error(e, *words)


def test_tokenizer_files_that_disagree_or_are_not_bert_are_refused(tmp_path):
    folder = write_vocab(tmp_path / "disagree")
    hf_tokenizer(folder).save_pretrained(folder)
    (folder / "tokenizer_config.json").write_text(json.dumps({"do_lower_case": False}))
    with pytest.raises(ValueError) as e:
        load_bert_tokenizer(str(folder))
    one_line_error(e, "do_lower_case", "tokenizer.json")
    (folder / "tokenizer_config.json").unlink()
    d = json.loads((folder / "tokenizer.json").read_text())
    (folder / "tokenizer.json").write_text(json.dumps(d | {"post_processor": None}))  # no [CLS] ... [SEP]
    with pytest.raises(ValueError) as e:
        load_bert_tokenizer(str(folder))
    one_line_error(e, "[CLS] ... [SEP]")
    folder = tmp_path / "not_bert"
    folder.mkdir()
    (folder / "vocab.txt").write_text("hello\nworld\n")
    with pytest.raises(ValueError) as e:
        load_bert_tokenizer(str(folder))
    one_line_error(e, "[CLS]", "vocab.txt")


def test_embed_refuses_a_bare_string(tmp_path):
    folder, _ = hf_folder(tmp_path)
    with pytest.raises(ValueError) as e:
        PhraseEncoder.from_folder(str(folder)).embed("the dog")
    one_line_error(e, "list")


def test_unreadable_weight_files_are_refused(tmp_path):
    folder, hf = hf_folder(tmp_path, "bin")
    (folder / "pytorch_model.bin").write_bytes(b"not a pickle at all")
    with pytest.raises(ValueError) as e:
        load_bert(str(folder))
    one_line_error(e, "pytorch_model.bin", "weights-only")
    torch.save({"bert.embeddings.word_embeddings.weight": 3}, folder / "pytorch_model.bin")
    with pytest.raises(ValueError) as e:
        load_bert(str(folder))
    one_line_error(e, "pytorch_model.bin", "dict of tensors")
    sd = {k: v.to(torch.int64) if k.endswith("bias") else v for k, v in hf.state_dict().items()}
    save_file(sd, folder / "model.safetensors")  # preferred over the .bin once present
    with pytest.raises(ValueError) as e:
        load_bert(str(folder))
    one_line_error(e, "model.safetensors", "not float")
