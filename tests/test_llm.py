"""The decoder against transformers' Qwen2 / Qwen3 / Llama (InternLM2 after unpacking wqkv),
through convert.py's tables, plus KV-cache and batching self-consistency."""
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM, Qwen3Config, Qwen3ForCausalLM

import convert
from model.generate import CACHE_MULTIPLE, GenerationConfig, decode_step, generate
from model.config import LLMConfig
from model.llm import LLM
from tests.conftest import ours_from_hf, randomize

V, D, LAYERS, H, KV, FFN = 300, 64, 2, 4, 2, 128


def ours_logits(llm: LLM, ids: torch.Tensor) -> torch.Tensor:
    pos = torch.arange(ids.shape[1])[None].expand(ids.shape[0], -1)
    h, _ = llm(llm.embed_tokens(ids), pos)
    return llm.logits(h)


@torch.no_grad()
def test_qwen2_logits_match_transformers():
    hf = randomize(Qwen2ForCausalLM(Qwen2Config(vocab_size=V, hidden_size=D, num_hidden_layers=LAYERS, num_attention_heads=H,
                                                num_key_value_heads=KV, intermediate_size=FFN, rope_theta=1e6,
                                                rms_norm_eps=1e-6, tie_word_embeddings=False))).eval()
    cfg = LLMConfig(V, D, LAYERS, H, KV, FFN, norm_eps=1e-6, rope_theta=1e6, qkv_bias=True)
    ours = ours_from_hf(hf, cfg, convert.QWEN_LLM, "lm_head.weight")
    ids = torch.randint(0, V, (2, 23))
    ref = hf(ids).logits
    assert ref.abs().max() > 1.0  # a meaningful comparison, not two near-zero tensors
    torch.testing.assert_close(ours_logits(ours, ids), ref, atol=1e-4, rtol=1e-4)


@torch.no_grad()
def test_qwen3_logits_match_transformers():
    hf = randomize(Qwen3ForCausalLM(Qwen3Config(vocab_size=V, hidden_size=D, num_hidden_layers=LAYERS, num_attention_heads=H,
                                                num_key_value_heads=KV, head_dim=32, intermediate_size=FFN,
                                                rope_theta=5e6, rms_norm_eps=1e-6, tie_word_embeddings=False))).eval()
    cfg = LLMConfig(V, D, LAYERS, H, KV, FFN, head_dim=32, norm_eps=1e-6, rope_theta=5e6, qk_norm=True)
    ours = ours_from_hf(hf, cfg, convert.QWEN_LLM, "lm_head.weight")
    ids = torch.randint(0, V, (2, 19))
    torch.testing.assert_close(ours_logits(ours, ids), hf(ids).logits, atol=1e-4, rtol=1e-4)


def pack_like_internlm2(q, k, v, n_heads, n_kv, hd):
    """wqkv written from the spec with explicit loops: per KV group g, its G query heads, then k_g, then v_g."""
    G = n_heads // n_kv
    rows = []
    for g in range(n_kv):
        for j in range(G):
            rows.append(q[(g * G + j) * hd:(g * G + j + 1) * hd])
        rows.append(k[g * hd:(g + 1) * hd])
        rows.append(v[g * hd:(g + 1) * hd])
    return torch.cat(rows)


def test_wqkv_packed_row_order():
    n_heads, n_kv, hd, dim = 8, 2, 3, 5
    G = n_heads // n_kv
    # Row r of the packed matrix is filled with the value r, so every output row names its source.
    packed = torch.arange((n_heads + 2 * n_kv) * hd, dtype=torch.float32)[:, None].expand(-1, dim).clone()
    cfg = LLMConfig(10, dim, 1, n_heads, n_kv, 4, head_dim=hd)
    q, k, v = convert.unpack_wqkv(packed, cfg)
    for h in range(n_heads):
        g, j = divmod(h, G)
        start = g * (G + 2) * hd + j * hd
        assert q[h * hd:(h + 1) * hd, 0].tolist() == list(range(start, start + hd))
    for g in range(n_kv):
        k_start = g * (G + 2) * hd + G * hd
        assert k[g * hd:(g + 1) * hd, 0].tolist() == list(range(k_start, k_start + hd))
        assert v[g * hd:(g + 1) * hd, 0].tolist() == list(range(k_start + hd, k_start + 2 * hd))
    torch.testing.assert_close(convert.pack_wqkv(q, k, v, cfg), packed, atol=0, rtol=0)


@pytest.mark.parametrize("seq", [20, 90])  # 90 > max_position_embeddings: the dynamic-NTK base kicks in
@torch.no_grad()
def test_internlm2_matches_llama_after_unpacking(seq):
    hf = randomize(LlamaForCausalLM(LlamaConfig(
        vocab_size=V, hidden_size=D, num_hidden_layers=LAYERS, num_attention_heads=H, num_key_value_heads=KV,
        intermediate_size=FFN, rms_norm_eps=1e-5, max_position_embeddings=64, attention_bias=False,
        rope_parameters={"rope_type": "dynamic", "factor": 2.0, "rope_theta": 1e6}, tie_word_embeddings=False))).eval()
    hd = D // H
    # Re-express the Llama weights in the InternLM2 layout, as an official InternLM2 file has them.
    sd = hf.state_dict()
    official = {"model.tok_embeddings.weight": sd["model.embed_tokens.weight"], "model.norm.weight": sd["model.norm.weight"],
                "output.weight": sd["lm_head.weight"]}
    for i in range(LAYERS):
        p = f"model.layers.{i}."
        official[p + "attention.wqkv.weight"] = pack_like_internlm2(
            sd[p + "self_attn.q_proj.weight"], sd[p + "self_attn.k_proj.weight"], sd[p + "self_attn.v_proj.weight"], H, KV, hd)
        official[p + "attention.wo.weight"] = sd[p + "self_attn.o_proj.weight"]
        official[p + "feed_forward.w1.weight"] = sd[p + "mlp.gate_proj.weight"]
        official[p + "feed_forward.w3.weight"] = sd[p + "mlp.up_proj.weight"]
        official[p + "feed_forward.w2.weight"] = sd[p + "mlp.down_proj.weight"]
        official[p + "attention_norm.weight"] = sd[p + "input_layernorm.weight"]
        official[p + "ffn_norm.weight"] = sd[p + "post_attention_layernorm.weight"]
    cfg = LLMConfig(V, D, LAYERS, H, KV, FFN, norm_eps=1e-5, rope_theta=1e6, rope_dynamic_factor=2.0, max_position_embeddings=64)
    ours = LLM(cfg)
    kmap = convert.expand({"model." + k: v for k, v in convert.INTERNLM2_LLM.items()} | {"output.weight": "llm.lm_head.weight"},
                          {"llm": LAYERS}, {"llm." + k for k in ours.state_dict()})
    ours.load_state_dict({k[4:]: v for k, v in convert.apply_map(official, kmap, cfg).items()}, strict=True)
    ids = torch.randint(0, V, (1, seq))
    torch.testing.assert_close(ours_logits(ours.eval(), ids), hf(ids).logits, atol=1e-4, rtol=1e-4)


def tiny_llm(**kw) -> LLM:
    cfg = LLMConfig(V, D, LAYERS, H, KV, FFN, qkv_bias=True, **kw)
    return randomize(LLM(cfg)).eval()


@torch.no_grad()
@pytest.mark.parametrize("L", [11, CACHE_MULTIPLE - 3])  # the second one's answer crosses a cache-length step
def test_cached_decoding_equals_full_forward(L):
    llm = tiny_llm()
    prompt = torch.randint(0, V, (1, L))
    out = generate(llm, llm.embed_tokens(prompt), torch.arange(L)[None], None, GenerationConfig(max_new_tokens=8), eos_ids=set())[0]
    assert len(out.tokens) == 8
    full = torch.cat([prompt, torch.tensor([out.tokens])], dim=1)
    pos = torch.arange(full.shape[1])[None]
    h, _ = llm(llm.embed_tokens(full), pos)
    # Greedy tokens from the uncached forward are the same...
    assert llm.logits(h)[0, L - 1:].argmax(-1).tolist()[:8] == out.tokens
    # ...and so are the hidden states of the fed-back tokens (rows L.. of the full pass).
    torch.testing.assert_close(out.hidden, h[0, L:L + 7], atol=1e-5, rtol=1e-5)


@torch.no_grad()
def test_fused_projections_give_the_same_outputs():
    llm = tiny_llm(qk_norm=True)
    ids = torch.randint(0, V, (2, 9))
    ref = ours_logits(llm, ids)
    gen = generate(llm, llm.embed_tokens(ids[:1]), torch.arange(9)[None], None, GenerationConfig(max_new_tokens=6), set())[0]
    llm.fuse_projections()
    names = {k for k in llm.state_dict() if k.startswith("layers.0.")}
    assert "layers.0.attn.qkv_proj.weight" in names and "layers.0.mlp.gate_up_proj.weight" in names
    assert not any(f".{p}." in k for k in names for p in ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj"))
    torch.testing.assert_close(ours_logits(llm, ids), ref, atol=1e-6, rtol=1e-6)
    fused = generate(llm, llm.embed_tokens(ids[:1]), torch.arange(9)[None], None, GenerationConfig(max_new_tokens=6), set())[0]
    assert fused.tokens == gen.tokens


@pytest.mark.slow
@torch.no_grad()
def test_compiled_decode_step_equals_eager():
    """torch.compile(decode_step, fullgraph=True): one graph over the static cache, the same
    tokens, hidden states within float rounding; a second request with a longer prompt reuses it."""
    llm = tiny_llm()
    step = torch.compile(decode_step, fullgraph=True)
    for L in (11, 40):
        prompt = torch.randint(0, V, (2, L))
        emb, pos = llm.embed_tokens(prompt), torch.arange(L)[None].expand(2, -1)
        cfg = GenerationConfig(max_new_tokens=8)
        eager = generate(llm, emb, pos, None, cfg, eos_ids=set())
        compiled = generate(llm, emb, pos, None, cfg, eos_ids=set(), step=step)
        for a, b in zip(eager, compiled):
            assert a.tokens == b.tokens
            torch.testing.assert_close(a.hidden, b.hidden, atol=1e-5, rtol=1e-5)


@torch.no_grad()
def test_batch_of_two_equals_each_alone():
    llm = tiny_llm()
    a, b = torch.randint(0, V, (7,)), torch.randint(0, V, (13,))
    L = 13
    ids = torch.zeros(2, L, dtype=torch.long)
    ids[0, L - 7:], ids[1] = a, b  # left padding
    key_mask = ids.new_zeros(2, L, dtype=torch.bool)
    key_mask[0, L - 7:] = True
    key_mask[1] = True
    pos = (key_mask.long().cumsum(-1) - 1).clamp(min=0)
    cfg = GenerationConfig(max_new_tokens=6)
    both = generate(llm, llm.embed_tokens(ids), pos, key_mask, cfg, eos_ids=set())
    for seq, got in zip((a, b), both):
        alone = generate(llm, llm.embed_tokens(seq[None]), torch.arange(len(seq))[None], None, cfg, eos_ids=set())[0]
        assert got.tokens == alone.tokens
        torch.testing.assert_close(got.hidden, alone.hidden, atol=1e-5, rtol=1e-5)


@torch.no_grad()
def test_stop_words_eos_and_sampling():
    llm = tiny_llm()
    prompt = torch.randint(0, V, (1, 5))
    emb, pos = llm.embed_tokens(prompt), torch.arange(5)[None]
    greedy = generate(llm, emb, pos, None, GenerationConfig(max_new_tokens=6), eos_ids=set())[0].tokens
    # EOS stops right after the token is produced; it is returned but not fed back.
    stopped = generate(llm, emb, pos, None, GenerationConfig(max_new_tokens=6), eos_ids={greedy[2]})[0]
    assert stopped.tokens == greedy[:greedy.index(greedy[2]) + 1]
    assert stopped.hidden.shape[0] == len(stopped.tokens) - 1
    # A stop word matched on the decoded text (newlines ignored) stops too.
    decode = lambda ids: "".join(f"<{i}>\n" for i in ids)  # noqa: E731
    by_word = generate(llm, emb, pos, None, GenerationConfig(max_new_tokens=6, stop_words=(f"<{greedy[1]}>",)),
                       eos_ids=set(), decode=decode)[0]
    assert by_word.tokens == greedy[:greedy.index(greedy[1]) + 1]
    # Sampling is reproducible with a seed and differs from greedy at a high temperature.
    s1 = generate(llm, emb, pos, None, GenerationConfig(max_new_tokens=6, temperature=5.0, seed=1), eos_ids=set())[0]
    s2 = generate(llm, emb, pos, None, GenerationConfig(max_new_tokens=6, temperature=5.0, seed=1), eos_ids=set())[0]
    assert s1.tokens == s2.tokens and s1.tokens != greedy
    # top_p close to 0 keeps only the best token: sampling becomes greedy.
    s3 = generate(llm, emb, pos, None, GenerationConfig(max_new_tokens=6, temperature=5.0, top_p=1e-6, seed=1), eos_ids=set())[0]
    assert s3.tokens == greedy
