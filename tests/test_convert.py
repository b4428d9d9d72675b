"""convert.py: coverage of every preset against the official key lists (meta tensors, real
shapes), exact round trips, streaming output, and loud errors on broken checkpoints."""
import json
import os

import pytest
import torch
from safetensors import safe_open

import convert
import sa2va
from debug_checkpoint import debug_checkpoint
from model.checkpoint import load_model, write_safetensors
from model.config import preset, preset_names, release_names
from tests.conftest import official_mllm_patterns, official_sam2_keys

# Preset -> (section of keys_mllm_patterns.txt, whether that section lists this preset's own dims).
SECTIONS = {
    "Sa2VA-1B": ("internvl + Qwen2 LLM", True), "Sa2VA-4B": ("internvl + Qwen2 LLM", False),
    "Sa2VA-InternVL3-2B": ("internvl + Qwen2 LLM", False), "Sa2VA-InternVL3-8B": ("internvl + Qwen2 LLM", False),
    "Sa2VA-InternVL3-14B": ("internvl + Qwen2 LLM", False), "Sa2VA-8B": ("internvl + InternLM2 LLM", True),
    "Sa2VA-26B": ("internvl 6B ViT + InternLM2 LLM", True), "Sa2VA-Qwen2_5-VL-3B": ("Qwen2.5-VL", True),
    "Sa2VA-Qwen2_5-VL-7B": ("Qwen2.5-VL", False), "Sa2VA-Qwen3-VL-4B": ("Qwen3-VL", True),
    "Sa2VA-Qwen3-VL-2B": ("Qwen3-VL", False),
}


def official_expected(cfg, patterns: dict[str, tuple]) -> dict[str, tuple]:
    n_vit = getattr(cfg.vision, "n_layers", None) or cfg.vision.depth
    out = {}
    for key, shape in patterns.items():
        if "{i}" not in key:
            out[key] = shape
            continue
        n = n_vit if ("vision" in key or "visual" in key) else cfg.llm.n_layers
        out.update({key.format(i=i): shape for i in range(n)})
    out.update(official_sam2_keys())
    return out


@pytest.mark.parametrize("name", release_names())
def test_preset_maps_one_to_one_onto_official_keys(name):
    cfg = preset(name)
    section, own_dims = SECTIONS[name]
    expected = official_expected(cfg, official_mllm_patterns()[section])
    got = convert.official_shapes(cfg)  # built on the meta device: real shapes, no memory
    assert set(got) == set(expected), (sorted(set(expected) - set(got))[:5], sorted(set(got) - set(expected))[:5])
    vocab_rows = {k for k in got if k.endswith(("embed_tokens.weight", "tok_embeddings.weight", "lm_head.weight", "output.weight"))}
    for k in got:
        if k.startswith("grounding_encoder.") or (own_dims and k not in vocab_rows):
            assert got[k] == expected[k], (k, got[k], expected[k])
        if k in vocab_rows:
            assert got[k] == (cfg.llm.vocab_size, cfg.llm.dim)


def test_every_release_and_family_has_a_preset():
    names = preset_names()
    assert set(SECTIONS) == set(release_names()) == {n for n in names if not n.startswith("debug-")} - {"sa2va-shapes"}
    assert {preset(n).family for n in names if n.startswith("debug-")} == {"internvl", "qwen2_5_vl", "qwen3_vl"}


def tensors(path: str) -> dict[str, torch.Tensor]:
    files = [os.path.join(path, n) for n in sorted(os.listdir(path)) if n.endswith(".safetensors")]
    out = {}
    for fn in files:
        with safe_open(fn, "pt") as f:
            out.update({k: f.get_tensor(k) for k in f.keys()})
    return out


@pytest.mark.parametrize("family,llm,shards", [("internvl", "qwen2", 3), ("internvl", "internlm2", 1),
                                                ("qwen2_5_vl", "qwen2", 2), ("qwen3_vl", "qwen3", 1)])
def test_round_trip_official_ours_official_is_exact(tmp_path, family, llm, shards):
    debug_checkpoint(tmp_path / "official", family, llm=llm, shards=shards)
    cfg = convert.convert(str(tmp_path / "official"), str(tmp_path / "ours"))
    model = load_model(str(tmp_path / "ours"))  # strict: every key present, none extra
    assert model.cfg == cfg
    convert.to_official(str(tmp_path / "ours"), str(tmp_path / "back"))
    a, b = tensors(str(tmp_path / "official")), tensors(str(tmp_path / "back"))
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k
    with open(tmp_path / "back" / "config.json") as f:
        ids = dict(image_token_id=cfg.image_token_id, seg_token_id=cfg.seg_token_id)
        assert convert.config_from_official(json.load(f), **ids) == cfg


def test_dtype_option_casts_floating_tensors(tmp_path):
    debug_checkpoint(tmp_path / "official")
    convert.convert(str(tmp_path / "official"), str(tmp_path / "ours"), dtype=torch.bfloat16)
    assert {t.dtype for t in tensors(str(tmp_path / "ours")).values() if t.is_floating_point()} == {torch.bfloat16}


def test_to_official_like_copies_release_files(tmp_path):
    debug_checkpoint(tmp_path / "official", shards=2)
    (tmp_path / "official" / "modeling_sa2va_chat.py").write_text("# remote code\n")
    convert.convert(str(tmp_path / "official"), str(tmp_path / "ours"))
    convert.to_official(str(tmp_path / "ours"), str(tmp_path / "back"), like=str(tmp_path / "official"))
    names = set(os.listdir(tmp_path / "back"))
    assert {"modeling_sa2va_chat.py", "tokenizer.json", "config.json", "model.safetensors"} <= names
    assert not any(n.startswith("model-000") or n.endswith("index.json") for n in names)


# ----------------------------------------------------------------------------- broken inputs

@pytest.fixture
def official(tmp_path):
    debug_checkpoint(tmp_path / "official", shards=2)
    return tmp_path / "official"


def run(official, tmp_path):
    return convert.convert(str(official), str(tmp_path / "ours"))


def edit_config(official, fn):
    path = official / "config.json"
    cfg = json.loads(path.read_text())
    fn(cfg)
    path.write_text(json.dumps(cfg))


def test_missing_shard(official, tmp_path):
    os.remove(official / "model-00002-of-00002.safetensors")
    with pytest.raises(ValueError, match="model-00002-of-00002.safetensors is missing"):
        run(official, tmp_path)


def test_corrupt_shard(official, tmp_path):
    path = official / "model-00001-of-00002.safetensors"
    path.write_bytes(path.read_bytes()[:1000])
    with pytest.raises(ValueError, match="corrupt or not safetensors"):
        run(official, tmp_path)
    assert not (tmp_path / "ours" / "model.safetensors").exists()


def test_failure_while_writing_leaves_no_partial_file(tmp_path):
    def tensors():
        yield "a", torch.zeros(2)
        raise ValueError("source shard went away")

    specs = [("a", torch.float32, (2,)), ("b", torch.float32, (3,))]
    with pytest.raises(ValueError, match="went away"):
        write_safetensors(str(tmp_path / "model.safetensors"), specs, tensors())
    assert os.listdir(tmp_path) == []


def test_tokenizer_must_match_the_embedding(official, tmp_path):
    edit_config(official, lambda c: c["llm_config"].update(vocab_size=c["llm_config"]["vocab_size"] + 1))
    with pytest.raises(ValueError, match="the tokenizer has 273 tokens but the config says vocab_size=274"):
        run(official, tmp_path)
    assert not (tmp_path / "ours").exists()


def test_unknown_llm_architecture(official, tmp_path):
    edit_config(official, lambda c: c["llm_config"].update(architectures=["MistralForCausalLM"]))
    with pytest.raises(ValueError, match="unknown LLM architecture 'MistralForCausalLM'"):
        run(official, tmp_path)


def test_unknown_model_config(official, tmp_path):
    edit_config(official, lambda c: c.pop("llm_config"))
    with pytest.raises(ValueError, match="unknown architecture"):
        run(official, tmp_path)


def test_shape_mismatch_names_the_tensor(official, tmp_path):
    edit_config(official, lambda c: c["vision_config"].update(intermediate_size=72))
    with pytest.raises(ValueError, match=r"fc1.weight has shape \(64, 32\) but config.json implies \(72, 32\)"):
        run(official, tmp_path)


def test_unexpected_keys_are_named(official, tmp_path):
    edit_config(official, lambda c: c["llm_config"].update(num_hidden_layers=1))  # the file has 2 layers
    with pytest.raises(ValueError, match=r"official keys: unexpected \d+: language_model.model.layers.1"):
        run(official, tmp_path)


def test_missing_keys_are_named(official, tmp_path):
    index = official / "model.safetensors.index.json"
    wm = json.loads(index.read_text())
    del wm["weight_map"]["mlp1.1.bias"]
    index.write_text(json.dumps(wm))
    with pytest.raises(ValueError, match=r"official keys: missing 1: mlp1.1.bias"):
        run(official, tmp_path)


def test_missing_lm_head_needs_tied_embeddings(official, tmp_path):
    index = official / "model.safetensors.index.json"
    wm = json.loads(index.read_text())
    del wm["weight_map"]["language_model.lm_head.weight"]
    index.write_text(json.dumps(wm))
    with pytest.raises(ValueError, match="lm_head.weight is missing and llm_config.tie_word_embeddings is false"):
        run(official, tmp_path)
    edit_config(official, lambda c: c["llm_config"].update(tie_word_embeddings=True))
    cfg = run(official, tmp_path)
    assert cfg.llm.tie_embeddings and "llm.lm_head.weight" not in tensors(str(tmp_path / "ours"))


def test_loading_is_strict(official, tmp_path):
    run(official, tmp_path)
    cfg_path = tmp_path / "ours" / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["llm"]["n_layers"] = 1
    cfg_path.write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"unexpected \d+: llm.layers.1"):
        load_model(str(tmp_path / "ours"))


def test_missing_tokenizer_files(official, tmp_path):
    run(official, tmp_path)
    os.remove(tmp_path / "ours" / "tokenizer.json")
    with pytest.raises(ValueError, match="has no tokenizer.json; re-run convert.py"):
        sa2va.Sa2VA.from_pretrained(str(tmp_path / "ours"))
    os.remove(official / "tokenizer.json")
    with pytest.raises(ValueError, match="has neither tokenizer.json"):
        convert.convert(str(official), str(tmp_path / "again"))
