"""The processors (one per family), collation and the config/CLI helpers they come with."""
import dataclasses
import json

import numpy as np
import pytest
import torch
from PIL import Image
from tokenizers import Tokenizer as Backend
from tokenizers import processors

import cli
import data
import debug_checkpoint
from model.config import Sa2VAConfig, debug_config, preset, preset_names
from model.llm import mrope_positions
from model.tokenizer import load_official_tokenizer
from tests.conftest import H, W, frames

FAMILIES = [("internvl", "qwen2"), ("internvl", "internlm2"), ("qwen2_5_vl", "qwen2"), ("qwen3_vl", "qwen2")]


@pytest.fixture(scope="module", params=FAMILIES, ids=["internvl-qwen2", "internvl-internlm2", "qwen2_5_vl", "qwen3_vl"])
def processor(request, tmp_path_factory):
    family, llm = request.param
    folder = tmp_path_factory.mktemp(family)
    debug_checkpoint.write_tokenizer(str(folder), family)
    if llm == "internlm2":  # InternLM2 tokenizers prepend a BOS: give the debug one a post-processor that does
        backend = Backend.from_file(str(folder / "tokenizer.json"))
        backend.post_processor = processors.TemplateProcessing(
            single="<|endoftext|>:0 $A:0", special_tokens=[("<|endoftext|>", backend.token_to_id("<|endoftext|>"))])
        backend.save(str(folder / "tokenizer.json"))
        config = json.loads((folder / "tokenizer_config.json").read_text())
        (folder / "tokenizer_config.json").write_text(json.dumps(config | {"bos_token": "<|endoftext|>"}))
    cfg = debug_config(family, llm)
    return data.make_processor(cfg, load_official_tokenizer(str(folder)))


def image():
    return Image.fromarray(frames(1)[0])


def test_image_media(processor):
    cfg = processor.cfg
    media = processor.media(image=image())
    assert media.size == (W, H) and media.sam2_frames.shape == (1, 3, cfg.sam2.image_size, cfg.sam2.image_size)
    assert media.sam2_frames.dtype == torch.uint8
    n_slots = media.token_string.count(processor.image_token)
    assert torch.equal(media.visual_rows, torch.arange(n_slots)) and media.num_vision_rows == n_slots
    if cfg.family == "internvl":
        cols, rows = data._tile_grid(W, H, cfg.vision.image_size, 1, 12)
        n_tiles = cols * rows + (cols * rows > 1)
        assert media.pixel_values.shape == (n_tiles, 3, cfg.vision.image_size, cfg.vision.image_size)
        assert media.grid_thw is None and media.token_string == data.image_token_string([n_tiles * cfg.vision.tokens_per_tile])
    else:
        pixels, grid = data.qwen_image_inputs([image()], cfg.vision)
        assert torch.equal(media.pixel_values, pixels) and torch.equal(media.grid_thw, grid)
        assert media.token_string == data.qwen_image_string(int(grid.prod()) // cfg.vision.spatial_merge_size ** 2)


def test_video_media_one_block_per_frame(processor):
    clip = [Image.fromarray(f) for f in frames(3)]
    media = processor.media(frames=clip)
    assert media.sam2_frames.shape[0] == 3
    if processor.cfg.family == "internvl":
        tpt = processor.cfg.vision.tokens_per_tile
        assert media.pixel_values.shape[0] == 3 and media.token_string == data.image_token_string([tpt] * 3)
        assert "</img>\n<img>" in media.token_string
    else:
        assert media.grid_thw.shape[0] == 3 and media.token_string.count(data.QWEN_VISION_START) == 3


def test_visual_prompt_rows(processor):
    regions = np.zeros((2, H, W), bool)
    regions[0, :40, :60] = True
    regions[1, 40:, 60:] = True  # covers a sampled cell of the tiny 2x2 token grid
    if processor.cfg.family != "internvl":
        with pytest.raises(ValueError, match="InternVL-family"):
            processor.media(image=image(), regions=regions)
        return
    media = processor.media(image=image(), regions=regions)
    tpt = processor.cfg.vision.tokens_per_tile
    n_tile_rows = media.pixel_values.shape[0] * tpt
    cells = processor.region_cells(regions, (W, H))
    # tiles first, then each region's cells of the last tile, in order
    assert torch.equal(media.visual_rows[:n_tile_rows], torch.arange(n_tile_rows))
    expected = torch.cat([n_tile_rows - tpt + torch.nonzero(c).flatten() for c in cells])
    assert torch.equal(media.visual_rows[n_tile_rows:], expected)
    assert media.token_string.count(data.IMG_CONTEXT) == len(media.visual_rows)
    assert f"There are 2 part regions in the picture: region1{data.VP_START}" in media.token_string


def test_conversation_ids_labels_and_positions(processor):
    tok, template = processor.tok, processor.template
    media = processor.media(image=image())
    turns = [("<image>\nPlease segment the cat.", "Sure, [SEG]."), ("And the dog?", "It is [SEG].")]
    s = processor(turns, media, decode_masks=True)
    ids, labels = s.input_ids.tolist(), s.labels.tolist()
    # loss on the answers and their suffix only (xtuner encode_fn): never the prompt, the BOS or the separator
    answered = [i for i, lab in zip(ids, labels) if lab != data.IGNORE]
    assert tok.decode(answered) == tok.decode(tok.encode("Sure, [SEG]." + template.suffix, add_bos=False)
                                              + tok.encode("It is [SEG]." + template.suffix, add_bos=False))
    assert labels[-1] == data.IGNORE and ids[-len(tok.encode(template.sep, add_bos=False)):] == tok.encode(template.sep, add_bos=False)
    if tok.bos_id is not None:
        assert ids[0] == tok.bos_id and labels[0] == data.IGNORE and ids.count(tok.bos_id) == 1
    assert s.num_seg == 2 and tok.decode(ids[s.answer[0]:s.answer[1]]) == "It is [SEG]." + template.suffix
    assert s.input_ids.eq(processor.image_token_id).sum() == len(media.visual_rows)
    assert s.mask_queries.tolist() == [[0, 0], [1, 0]]  # every [SEG] on the image's one SAM-2 frame
    # the text is the formatted conversation, ready for the next turn
    assert s.text.endswith("It is [SEG]." + template.suffix + template.sep) and "<image>" not in s.text
    if processor.cfg.family == "internvl":
        assert torch.equal(s.positions, torch.arange(len(ids)))
    else:
        ref, _ = mrope_positions(s.input_ids[None], media.grid_thw, processor.image_token_id, processor.vision_start_id,
                                 processor.cfg.vision.spatial_merge_size,
                                 image_temporal_stride=processor.cfg.vision.image_temporal_stride)
        assert s.positions.shape == (3, len(ids)) and torch.equal(s.positions, ref[:, 0])


def test_follow_up_turn_continues_the_history(processor):
    media = processor.media(image=image())
    first = processor([("<image>\nWhat is it?", "A pattern.")], media)
    second = processor([("And now?", None)], media, history=first.text)
    assert second.text.startswith(first.text)
    both = processor([("<image>\nWhat is it?", "A pattern."), ("And now?", None)], media)
    assert second.text == both.text
    if processor.cfg.family != "internvl" and processor.cfg.system_prompt:
        assert second.text.count("<|im_start|>system") == 1


def test_prompt_errors(processor):
    with pytest.raises(ValueError, match="no image or video was given"):
        processor([("<image>\nPlease segment the dog.", None)])
    with pytest.raises(ValueError, match="an answer is empty"):
        processor([("hi", "")])
    with pytest.raises(ValueError, match="only the last turn"):
        processor([("hi", None), ("there", "x")])


def test_collate_pads_and_renumbers(processor):
    a = processor([("<image>\nPlease segment the cat.", "Sure, [SEG].")], processor.media(image=image()), decode_masks=True)
    b = processor([("<image>\nSegment both, please, and tell me more.", "[SEG] and [SEG].")],
                  processor.media(frames=[Image.fromarray(f) for f in frames(2)]), decode_masks=True)
    for pad in ("left", "right"):
        batch = data.collate([a, b], pad=pad)
        L = max(len(a.input_ids), len(b.input_ids))
        assert batch.input_ids.shape == (2, L) and batch.key_mask.sum(1).tolist() == [len(a.input_ids), len(b.input_ids)]
        for row, s in enumerate((a, b)):
            real = batch.key_mask[row]
            assert torch.equal(batch.input_ids[row][real], s.input_ids) and torch.equal(batch.labels[row][real], s.labels)
            assert torch.equal(batch.positions[..., row, :][..., real], s.positions)
            assert real[-1] if pad == "left" else real[0]
        # b's visual rows, [SEG] numbers and frames come after a's
        n_a = a.media.num_vision_rows
        assert torch.equal(batch.visual_rows, torch.cat([a.media.visual_rows, b.media.visual_rows + n_a]))
        assert batch.mask_queries.tolist() == [[0, 0], [1, 1], [1, 2], [2, 1], [2, 2]]
        assert batch.sam2_frames.shape[0] == 3 and batch.pixel_values.shape[0] == len(a.media.pixel_values) + len(b.media.pixel_values)
    single = data.collate([a])
    assert single.key_mask is None  # nothing padded


def test_every_config_round_trips_through_json():
    for name in preset_names():
        cfg = preset(name)
        again = Sa2VAConfig.from_dict(json.loads(json.dumps(cfg.to_dict())))  # lists come back as lists
        assert again == cfg, name
    with pytest.raises(ValueError, match="re-run convert.py"):
        Sa2VAConfig.from_dict({"family": "internvl", "vision": {}, "llm": {}, "bogus": 1})
    with pytest.raises(dataclasses.FrozenInstanceError):
        preset("Sa2VA-1B").llm.n_layers = 3  # presets are shared: they cannot be changed in place
    assert preset("Sa2VA-Qwen3-VL-2B").seg_hidden_prenorm and not preset("Sa2VA-Qwen2_5-VL-3B").seg_hidden_prenorm
    assert preset("Sa2VA-8B").llm.arch == "internlm2" and preset("Sa2VA-1B").seg_dim == 256


@dataclasses.dataclass
class Options:
    src: str = cli.arg(help="input", positional=True)
    steps: int = cli.arg(3, "steps")
    lr: float = cli.arg(0.5, "rate")
    name: str | None = cli.arg(None, "a name")
    mode: str = cli.arg("a", "mode", choices=("a", "b"))
    fast: bool = cli.arg(False, "a flag")
    check: bool = cli.arg(True, "on by default")


def test_cli_from_dataclass(capsys):
    assert cli.parse(Options, ["in.txt"]) == Options("in.txt")
    got = cli.parse(Options, ["x", "--steps", "7", "--lr", "1e-3", "--name", "n", "--mode", "b", "--fast", "--no-check"])
    assert got == Options("x", 7, 1e-3, "n", "b", True, False)
    for bad in (["x", "--steps", "seven"], ["x", "--mode", "c"], []):
        with pytest.raises(SystemExit) as e:
            cli.parse(Options, bad)
        assert e.value.code == 2
    assert "steps (default: 3)" in cli.parser(Options).format_help()

    @dataclasses.dataclass
    class Unsupported:
        shape: tuple = cli.arg((1, 2), "no tuples")
    with pytest.raises(TypeError, match="unsupported command-line type"):
        cli.parser(Unsupported)


def test_a_generation_prompt_has_no_answer_span(processor):
    s = processor([("hi", "Hello."), ("and now?", None)])
    L = len(s.input_ids)
    assert s.answer == (L, L) and s.labels[-1] == data.IGNORE


@pytest.mark.parametrize("family", ["internvl", "qwen2_5_vl", "qwen3_vl"])
def test_debug_presets_match_the_debug_tokenizer(family, tmp_path):
    debug_checkpoint.write_tokenizer(str(tmp_path), family)
    tok = load_official_tokenizer(str(tmp_path))
    cfg = debug_config(family)
    assert (len(tok), tok.token_to_id(data.image_token(family)), tok.token_to_id(data.SEG)) == \
        (cfg.llm.vocab_size, cfg.image_token_id, cfg.seg_token_id)
