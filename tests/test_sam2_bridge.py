"""SAM2 bridge: parity with Meta's sam2 (image decode, video tracking), batching, bounds, I/O."""

import contextlib
import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import data
from model.config import SAM2_HIERA_L, SAM2Config
from model.sam2_bridge import SAM2Bridge, build_sam2
from tests.conftest import official_sam2_keys

CFG = SAM2Config.debug()
S = CFG.image_size


def _tiny_bridge(obj_score_bias: float) -> SAM2Bridge:
    torch.manual_seed(0)
    bridge = SAM2Bridge(CFG).eval()
    with torch.no_grad():
        # SAM2's init leaves LayerScales at 1e-6 and several embeddings near 0; jitter every
        # weight so that each path (fuser, memory, pointers) visibly moves the logits.
        for p in bridge.parameters():
            p.add_(0.02 * torch.randn_like(p))
        # Meta's SAM2 sets mask logits to -1024 where the object score is <= 0; Sa2VA does not.
        # A confident object-score head makes both agree so the parity tests compare the maths.
        bridge.sam2.sam_mask_decoder.pred_obj_score_head.layers[-1].bias.fill_(obj_score_bias)
    return bridge


@pytest.fixture(scope="module")
def bridge() -> SAM2Bridge:
    return _tiny_bridge(obj_score_bias=10.0)


def _frames(n: int, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, 3, S, S, generator=torch.Generator().manual_seed(seed))


def _prompts(n: int, seed: int = 2) -> torch.Tensor:
    return torch.randn(n, CFG.d_model, generator=torch.Generator().manual_seed(seed))


@contextlib.contextmanager
def language_prompt(sam2, lang):
    """Sa2VA's only SAM2 change: the prompt vector is appended to the sparse prompt tokens."""
    encoder = sam2.sam_prompt_encoder
    plain = encoder.forward

    def forward(*args, **kwargs):
        sparse, dense = plain(*args, **kwargs)
        return torch.cat([sparse, lang[:, None]], dim=1), dense

    encoder.forward = forward
    try:
        yield
    finally:
        del encoder.forward


def _meta_features(sam2, image, n):
    out = sam2.forward_image(image[None])
    out["backbone_fpn"] = [x.expand(n, -1, -1, -1) for x in out["backbone_fpn"]]
    out["vision_pos_enc"] = [x.expand(n, -1, -1, -1) for x in out["vision_pos_enc"]]
    _, feats, pos, sizes = sam2._prepare_backbone_features(out)
    return feats, pos, sizes  # lists of (HW, N, C) per level


def _meta_track(sam2, frames, prompts, cond_frames):
    """Meta SAM2's own tracking: track_step on each frame, memories stored like SAM2VideoPredictor."""
    num_frames, n = len(frames), len(prompts)
    output_dict = {"cond_frame_outputs": {}, "non_cond_frame_outputs": {}}

    def step(t, is_cond):
        feats, pos, sizes = _meta_features(sam2, frames[t], n)
        out = sam2.track_step(frame_idx=t, is_init_cond_frame=is_cond, current_vision_feats=feats,
                              current_vision_pos_embeds=pos, feat_sizes=sizes, point_inputs=None,
                              mask_inputs=None, output_dict=output_dict, num_frames=num_frames)
        # SAM2VideoPredictor keeps memories in bf16; round-trip so an fp32 model can read them
        out["maskmem_features"] = out["maskmem_features"].to(torch.bfloat16).float()
        return out

    with language_prompt(sam2, prompts):
        for t in sorted(cond_frames):
            output_dict["cond_frame_outputs"][t] = step(t, is_cond=True)
    logits = []
    for t in range(num_frames):
        if t not in output_dict["cond_frame_outputs"]:
            output_dict["non_cond_frame_outputs"][t] = step(t, is_cond=False)
        out = output_dict["cond_frame_outputs"].get(t) or output_dict["non_cond_frame_outputs"][t]
        logits.append(out["pred_masks"])
    return logits


def _meta_decoder_logits(sam2, image, prompts):
    """Image mode by hand: Meta's prompt encoder + mask decoder, prompt appended, best IoU."""
    n = len(prompts)
    feats, _, sizes = _meta_features(sam2, image, n)
    high_res = [x.permute(1, 2, 0).reshape(n, -1, *s) for x, s in zip(feats[:-1], sizes[:-1])]
    pix = (feats[-1] + sam2.no_mem_embed).permute(1, 2, 0).reshape(n, -1, *sizes[-1])
    sparse, dense = sam2.sam_prompt_encoder(
        points=(torch.zeros(n, 1, 2), -torch.ones(n, 1, dtype=torch.int32)), boxes=None, masks=None)
    masks, ious, _, _ = sam2.sam_mask_decoder(
        image_embeddings=pix, image_pe=sam2.sam_prompt_encoder.get_dense_pe(),
        sparse_prompt_embeddings=torch.cat([sparse, prompts[:, None]], dim=1),
        dense_prompt_embeddings=dense, multimask_output=True, repeat_image=False,
        high_res_features=high_res)
    return masks[torch.arange(n), ious.argmax(-1)][:, None]


def _assert_close(actual, expected):
    torch.testing.assert_close(actual, expected, atol=1e-5, rtol=0)


def test_hiera_large_keys_match_released_checkpoint():
    expected = {key.removeprefix("grounding_encoder.sam2_model.").replace(".g_weight", ".gamma"): shape
                for key, shape in official_sam2_keys().items()}
    with torch.device("meta"):
        model = build_sam2(SAM2_HIERA_L)
    ours = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert len(expected) == 900
    assert sorted(set(expected) ^ set(ours)) == []
    assert {k: v for k, v in ours.items() if expected[k] != v} == {}


def test_meta_device_build_loads_and_runs(bridge):
    with torch.device("meta"):
        lazy = SAM2Bridge(CFG)
    lazy.load_state_dict(bridge.state_dict(), assign=True, strict=True)
    lazy.eval()
    frames, prompts = _frames(8), _prompts(2)
    for (_, a), (_, b) in zip(lazy.track(frames, prompts), bridge.track(frames, prompts)):
        torch.testing.assert_close(a, b, atol=0, rtol=0)


@torch.no_grad()
def test_image_decode_matches_meta_decoder(bridge):
    image, prompts = _frames(1)[0], _prompts(3)
    ours = bridge.decode_with_prompt(bridge.image_features(image[None]), prompts)
    assert ours.logits.shape == (3, 1, 4 * CFG.grid, 4 * CFG.grid) and ours.logits.dtype == torch.float32
    _assert_close(ours.logits, _meta_decoder_logits(bridge.sam2, image, prompts))
    # mask choice and object pointer through Meta's own SAM head code
    feats, pos, sizes = _meta_features(bridge.sam2, image, 3)
    with language_prompt(bridge.sam2, prompts):
        ref = bridge.sam2.track_step(0, True, feats, pos, sizes, None, None, {}, 1, run_mem_encoder=False)
    _assert_close(ours.logits, ref["pred_masks"])
    _assert_close(ours.obj_ptr, ref["obj_ptr"])


@torch.no_grad()
def test_no_object_score_blanking():
    bridge = _tiny_bridge(obj_score_bias=-10.0)  # every object score < 0
    image, prompts = _frames(1)[0], _prompts(2)
    ours = bridge.decode_with_prompt(bridge.image_features(image[None]), prompts)
    assert (ours.object_score < 0).all()
    _assert_close(ours.logits, _meta_decoder_logits(bridge.sam2, image, prompts))
    assert ours.logits.min() > -1000  # Meta's SAM2Base would return -1024 everywhere here
    _assert_close(ours.obj_ptr, bridge.sam2.no_obj_ptr.expand(2, -1))


@pytest.mark.parametrize("cond_frames,num_frames", [(None, 9), ((2, 9, 17), 24)])
@torch.no_grad()
def test_video_matches_meta_track_step(bridge, cond_frames, num_frames):
    frames, prompts = _frames(num_frames), _prompts(2)
    ours = list(bridge.track(frames, prompts, cond_frames=cond_frames))
    assert [t for t, _ in ours] == list(range(num_frames))
    ref = _meta_track(bridge.sam2, frames, prompts, cond_frames or range(5))
    for t, (_, logits) in enumerate(ours):
        _assert_close(logits, ref[t])
    # the memory really matters: tracked frames differ from a memory-less decode
    alone = bridge.decode_with_prompt(bridge.image_features(frames[-1:]), prompts).logits
    assert (alone - ours[-1][1]).abs().max() > 1e-2


@torch.no_grad()
def test_batched_objects_equal_single(bridge):
    frames, prompts = _frames(10), _prompts(3)
    feats = bridge.image_features(frames[:1])
    batched = bridge.decode_with_prompt(feats, prompts)
    video = [logits for _, logits in bridge.track(frames, prompts, cond_frames=(1, 6))]
    for i in range(3):
        single = bridge.decode_with_prompt(feats, prompts[i:i + 1])
        _assert_close(batched.logits[i:i + 1], single.logits)
        _assert_close(batched.obj_ptr[i:i + 1], single.obj_ptr)
        for t, (_, logits) in enumerate(bridge.track(frames, prompts[i:i + 1], cond_frames=(1, 6))):
            _assert_close(video[t][i:i + 1], logits)


@torch.no_grad()
def test_memory_attention_shares_the_frame_part_and_equals_meta(bridge):
    """attend_memory runs the first self-attention once per frame, not once per object; the
    result equals Meta's MemoryAttention on the frame repeated for every object."""
    g, d, m = CFG.grid, CFG.d_model, CFG.mem_dim
    gen = torch.Generator().manual_seed(3)
    curr, curr_pos = torch.randn(1, g * g, d, generator=gen), torch.randn(1, g * g, d, generator=gen)
    n, ptr_tokens = 3, 8
    memory, memory_pos = torch.randn(n, 2 * g * g + ptr_tokens, m, generator=gen), torch.randn(n, 2 * g * g + ptr_tokens, m, generator=gen)
    calls = []
    sa = bridge.sam2.memory_attention.layers[0].self_attn
    hook = sa.register_forward_hook(lambda mod, args, out: calls.append(out.shape[0]))
    try:
        ours = bridge.attend_memory(curr, curr_pos, memory, memory_pos, ptr_tokens)
    finally:
        hook.remove()
    assert calls == [1]  # one frame's worth, for 3 objects
    ref = bridge.sam2.memory_attention(curr=[curr.expand(n, -1, -1).transpose(0, 1)], curr_pos=[curr_pos.expand(n, -1, -1).transpose(0, 1)],
                                       memory=memory.transpose(0, 1), memory_pos=memory_pos.transpose(0, 1),
                                       num_obj_ptr_tokens=ptr_tokens).transpose(0, 1)
    assert ours.shape == (n, g * g, d)
    _assert_close(ours, ref)


@torch.no_grad()
def test_memory_bank_is_bounded_and_frames_read_once(bridge):
    num_frames, fetched = 40, []

    def get_frame(t):
        fetched.append(t)
        return _frames(1, seed=t)[0]

    memory = bridge.condition(get_frame, _prompts(2), num_frames=num_frames)
    bound = max(CFG.num_maskmem - 1, CFG.max_obj_ptrs_in_encoder - 1)
    for t, _ in bridge.propagate(get_frame, memory):
        assert len(memory.recent) <= bound
        assert sum(e.maskmem is not None for e in memory.recent.values()) <= CFG.num_maskmem - 1
        assert all(f > t - bound for f in memory.recent)
    assert len(memory.recent) == bound and len(memory.cond) == 5
    assert sorted(fetched) == list(range(num_frames))


def test_postprocess_two_step_resize(bridge):
    logits = torch.randn(4, 1, 4 * CFG.grid, 4 * CFG.grid)
    masks = bridge.postprocess(logits, (50, 70))
    assert masks.shape == (4, 50, 70) and masks.dtype == torch.bool
    up = F.interpolate(logits, size=(S, S), mode="bilinear", align_corners=False)
    manual = F.interpolate(up, size=(50, 70), mode="bilinear", align_corners=False)[:, 0] > 0
    assert torch.equal(masks, manual)


def test_preprocess_matches_manual(bridge):
    rng = np.random.default_rng(0)
    arrays = [rng.integers(0, 256, shape, dtype=np.uint8) for shape in ((40, 60, 3), (30, 20, 3))]
    frames = data.sam2_frames([Image.fromarray(a) for a in arrays], S)  # resized uint8, as the model takes them
    assert frames.shape == (2, 3, S, S) and frames.dtype == torch.uint8
    x = bridge.normalize(frames)
    assert x.shape == (2, 3, S, S) and x.dtype == torch.float32
    resized = np.asarray(Image.fromarray(arrays[1]).resize((S, S), Image.BICUBIC)).astype(np.float32) / 255
    for bf16_stats, std_r in ((False, 0.229), (True, 0.228515625)):  # 0.229 rounded to bf16
        y = bridge.normalize(frames[1:], bf16_stats=bf16_stats)[0]
        mean_r = float(torch.tensor(0.485, dtype=torch.bfloat16)) if bf16_stats else 0.485
        np.testing.assert_allclose(y[0].numpy(), (resized[..., 0] - mean_r) / std_r, atol=1e-5)
    assert torch.equal(x[1], bridge.normalize(frames[1:])[0])


def test_bad_inputs_raise(bridge):
    frames = _frames(3)
    with pytest.raises(ValueError, match="prompts"):
        bridge.decode_with_prompt(bridge.image_features(frames[:1]), torch.zeros(2, 128))
    with pytest.raises(ValueError, match="no frames"):
        bridge.normalize(torch.zeros(0, 3, S, S, dtype=torch.uint8))
    with pytest.raises(ValueError, match="uint8"):
        bridge.normalize(torch.zeros(1, 3, S, S))
    with pytest.raises(ValueError, match="cond_frames"):
        bridge.track(frames, _prompts(1), cond_frames=[5])
    with pytest.raises(ValueError, match="num_frames"):
        bridge.track(lambda t: frames[t], _prompts(1))
    with pytest.raises(ValueError, match="frame 0"):
        bridge.track(torch.zeros(3, 3, 64, 64), _prompts(1))
    with pytest.raises(ValueError, match="eval"):
        copy.deepcopy(bridge).train().track(frames, _prompts(1))


@torch.no_grad()
def test_bf16_module_runs(bridge):
    half = copy.deepcopy(bridge).to(torch.bfloat16)
    frames, prompts = _frames(8), _prompts(2)
    outs = list(half.track(frames.bfloat16(), prompts, cond_frames=(0, 3)))
    assert all(logits.dtype == torch.float32 and torch.isfinite(logits).all() for _, logits in outs)
    reference = list(bridge.track(frames, prompts, cond_frames=(0, 3)))
    for (_, low), (_, full) in zip(outs, reference):
        assert ((low > 0) == (full > 0)).float().mean() > 0.9 and (low - full).abs().max() < 0.1


def test_training_decode_and_its_gradients_match_meta_heads():
    """The training path (memory-less decode of one prompt per (frame, object), as the official
    inject_language_embd) against Meta's prompt encoder + mask decoder by hand: logits, and the
    gradients of a loss on them for the mask decoder's weights and for the prompts."""
    bridge = _tiny_bridge(obj_score_bias=10.0)
    frames = _frames(2)
    prompts = _prompts(3).requires_grad_(True)
    feats = bridge.image_features(frames)
    which = torch.tensor([0, 1, 1])  # prompt i decoded on frame which[i]
    ours = bridge.decode_with_prompt(feats.select(which), prompts).logits
    weight = torch.randn_like(ours)
    (ours * weight).sum().backward()
    our_grads = {n: p.grad.clone() for n, p in bridge.sam2.sam_mask_decoder.named_parameters() if p.grad is not None}
    our_prompt_grad = prompts.grad.clone()
    bridge.zero_grad()
    prompts.grad = None
    ref = torch.cat([_meta_decoder_logits(bridge.sam2, frames[f], prompts[i:i + 1]) for i, f in enumerate(which.tolist())])
    (ref * weight).sum().backward()
    _assert_close(ours.detach(), ref.detach())
    ref_grads = {n: p.grad for n, p in bridge.sam2.sam_mask_decoder.named_parameters() if p.grad is not None}
    assert our_grads.keys() == ref_grads.keys() and "output_upscaling.0.weight" in our_grads
    for n in our_grads:
        torch.testing.assert_close(our_grads[n], ref_grads[n], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(our_prompt_grad, prompts.grad, atol=1e-5, rtol=1e-4)
