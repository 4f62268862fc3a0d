"""Caption text clean-ups, and the captioning plumbing with a tiny random LLaVA built here (CLIP vision tower 28 px,
1 layer; Llama text model 2 layers, 32 wide; word-level tokenizer; a chat template). Frames reach it as a sequence
of images (LLaVA's processor has no video processor). The model's special tokens are suppressed in generation, so
greedy decoding always yields words; captions are noise, the test checks the plumbing.

Not covered here: processors with a video processor (Qwen2-VL family, LLaVA-OneVision) need torchvision, which
is not installed; processors that take audio (Qwen2.5-Omni) are too large to build tiny in a test.
"""

from __future__ import annotations

import json

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import (
    CLIPImageProcessorPil,
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
    PreTrainedTokenizerFast,
)

from ltxf import media
from ltxf.prep.captions import (
    AUDIO_VISUAL_INSTRUCTION,
    LLM_PREFIXES,
    VISUAL_INSTRUCTION,
    TransformersCaptioner,
    caption_media,
    clean_generated_caption,
    find_media,
    prepare_caption,
    remove_llm_prefix,
    sample_frames,
)
from ltxf.prep.dataset_file import read_records
from tests.prep.conftest import write_clip
from tests.prep.test_end_to_end import load_tool

WORDS = "a cat dog red square moves on grey screen sky runs jumps fast slow left right".split()
CHAT_TEMPLATE = (
    "{% for m in messages %}{{ m['role'] }}: {% for c in m['content'] %}{% if c['type'] == 'image' %}<image>"
    "{% elif c['type'] == 'text' %}{{ c['text'] }}{% endif %}{% endfor %}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant:{% endif %}"
)


def test_remove_llm_prefixes():
    assert len(LLM_PREFIXES) == 5 + 9 * 7
    assert remove_llm_prefix("  The video shows a cat. ") == "a cat."
    assert remove_llm_prefix("In this video clip, a dog runs") == "a dog runs"
    assert remove_llm_prefix("Caption: sunset") == "sunset"
    # Only the first match is removed, and matching is case-sensitive, as in the official script.
    assert remove_llm_prefix("This clip depicts This image shows x") == "This image shows x"
    assert remove_llm_prefix("the video shows a cat") == "the video shows a cat"
    assert prepare_caption("The clip features rain", lora_trigger=" TOK ", remove_llm_prefixes=True) == "TOK rain"
    assert prepare_caption(" The clip features rain", lora_trigger=None) == " The clip features rain"


def test_clean_generated_caption():
    text = "[VISUAL]: The video shows a cat on a mat.\nHuman: describe again\nHuman"
    assert clean_generated_caption(text) == "[VISUAL]: a cat on a mat."
    assert clean_generated_caption("A human walks.\nThe human body") == "A human walks.\nThe human body"
    assert "[SPEECH]" in AUDIO_VISUAL_INSTRUCTION and "[SOUNDS]" in AUDIO_VISUAL_INSTRUCTION
    assert "[SPEECH]" not in VISUAL_INSTRUCTION and "[TEXT]" in VISUAL_INSTRUCTION


@pytest.fixture(scope="module")
def llava_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("llava")
    vocab = {"<pad>": 0, "<eos>": 1, "<bos>": 2, "<unk>": 3, "<image>": 4, **{w: i + 5 for i, w in enumerate(WORDS)}}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<bos>", eos_token="<eos>",
                                        pad_token="<pad>", unk_token="<unk>",
                                        additional_special_tokens=["<image>"])
    processor = LlavaProcessor(
        image_processor=CLIPImageProcessorPil(size={"shortest_edge": 28}, crop_size={"height": 28, "width": 28}),
        tokenizer=tokenizer, patch_size=14, vision_feature_select_strategy="default", chat_template=CHAT_TEMPLATE,
        num_additional_image_tokens=1,
    )
    torch.manual_seed(0)
    config = LlavaConfig(
        vision_config=CLIPVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                       num_attention_heads=2, image_size=28, patch_size=14),
        text_config=LlamaConfig(vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                                pad_token_id=0, bos_token_id=2, eos_token_id=1),
        image_token_index=4, vision_feature_select_strategy="default", vision_feature_layer=-1,
    )
    model = LlavaForConditionalGeneration(config)
    model.generation_config.suppress_tokens = [0, 1, 2, 3, 4]
    model.generation_config.pad_token_id = 0
    model.save_pretrained(root)
    processor.save_pretrained(root)
    return root


@pytest.fixture(scope="module")
def captioner(llava_dir):
    return TransformersCaptioner(llava_dir, device="cpu", max_new_tokens=6)


@pytest.fixture()
def media_dir(tmp_path):
    write_clip(tmp_path / "a.mp4", num_frames=12, height=32, width=48, fps=12.0)
    write_clip(tmp_path / "sub" / "b.mp4", num_frames=6, height=32, width=32, fps=12.0, audio=False)
    media.write_image(tmp_path / "c.png", torch.full((30, 40, 3), 200, dtype=torch.uint8))
    (tmp_path / "broken.mp4").write_bytes(b"x" * 10)
    (tmp_path / "notes.txt").write_text("not media")
    return tmp_path


def test_sample_frames(media_dir):
    sample = sample_frames(media_dir / "a.mp4", fps=3.0, max_frames=32)
    # 1 s at 12 fps sampled at 3 fps: 3 frames, every 4th.
    assert sample.frames.shape == (3, 32, 48, 3) and sample.fps == pytest.approx(3.0) and not sample.is_image
    assert sample_frames(media_dir / "a.mp4", fps=24.0, max_frames=5).frames.shape[0] == 5
    image = sample_frames(media_dir / "c.png", fps=3.0, max_frames=8)
    assert image.is_image and image.frames.shape == (1, 30, 40, 3)


def test_captioner_is_greedy_and_takes_frames_as_images(captioner, media_dir):
    assert not captioner.takes_video and not captioner.supports_audio
    sample = sample_frames(media_dir / "a.mp4", fps=3.0, max_frames=4)
    inputs = captioner._inputs(sample, "describe")
    # Three frames, four image tokens each, in the prompt; three images for the vision tower.
    assert int((inputs["input_ids"] == 4).sum()) == 12 and inputs["pixel_values"].shape[0] == 3
    first = captioner.caption(sample, instruction="describe")
    assert first == captioner.caption(sample, instruction="describe")
    assert len(first.split()) == 6 and set(first.split()) <= set(WORDS)


@pytest.mark.parametrize("suffix", [".json", ".jsonl", ".csv", ".txt"])
def test_caption_media_resumes_and_overrides(captioner, media_dir, suffix):
    files = find_media(media_dir, extensions=("mp4", "png"), recursive=True)
    assert [p.relative_to(media_dir).as_posix() for p in files] == ["a.mp4", "broken.mp4", "c.png", "sub/b.mp4"]
    output = media_dir / f"dataset{suffix}"
    summary = caption_media(files, captioner, output, fps=3.0, save_every=1)
    assert sorted(summary.captioned) == ["a.mp4", "c.png", "sub/b.mp4"]
    assert [name for name, _ in summary.failed] == ["broken.mp4"]
    rows = {r.values["media_path"]: r.values["caption"] for r in read_records(output)}
    assert set(rows) == {"a.mp4", "c.png", "sub/b.mp4"} and all(rows.values())

    again = caption_media(files, captioner, output, fps=3.0)
    assert sorted(again.kept) == ["a.mp4", "c.png", "sub/b.mp4"] and not again.captioned
    redone = caption_media(files[:1], captioner, output, fps=3.0, override=True)
    assert redone.captioned == ["a.mp4"]
    assert {r.values["media_path"]: r.values["caption"] for r in read_records(output)} == rows


def test_caption_videos_tool(llava_dir, media_dir):
    code = load_tool("caption_videos").main([str(media_dir / "a.mp4"), "--model_path", str(llava_dir),
                                            "--max_new_tokens", "3", "--device", "cpu"])
    assert code == 0
    rows = json.loads((media_dir / "a.mp4.dataset.json").read_text())
    assert [r["media_path"] for r in rows] == ["a.mp4"] and len(rows[0]["caption"].split()) == 3
    assert load_tool("caption_videos").main([str(media_dir / "nothing"), "--model_path", str(llava_dir)]) == 2
