"""tools/inference.py: its --help documents every flag (the ltxf.cli convention: underscores, valued booleans),
and in-process runs on the tiny checkpoint of
tests/test_generate.py write the expected files and reproduce ``ltxf.generate.generate`` exactly (float32, CPU)."""

from __future__ import annotations

import ast
import importlib.util
import re
import sys
from pathlib import Path

import pytest
import torch

from ltxf.checkpoint import export_lora
from ltxf.demo import DEMO_AUDIO_SAMPLE_RATE, build_demo_checkpoint
from ltxf.generate import generate
from ltxf.media import probe_video, read_audio, write_image, write_video
from tests.test_generate import (
    FPS,
    build_tiny_gemma,
    load_tiny_models,
    test_pattern_frames,
)

REPO = Path(__file__).resolve().parents[1]
TOOL = REPO / "tools" / "inference.py"

# The flags the official script has, plus ours.
EXPECTED_FLAGS = [
    "--checkpoint", "--text_encoder_path", "--lora_path", "--lora_strength", "--prompt", "--negative_prompt",
    "--height", "--width", "--num_frames", "--frame_rate", "--num_inference_steps", "--guidance_scale",
    "--stg_scale", "--stg_blocks", "--stg_mode", "--guidance_rescale", "--seed", "--condition_image",
    "--reference_video", "--reference_downscale_factor", "--include_reference_in_output", "--skip_audio",
    "--output", "--audio_output", "--device", "--dtype",
]  # fmt: skip


def _load_tool():
    spec = importlib.util.spec_from_file_location("ltxf_tools_inference", TOOL)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


tool = _load_tool()


def _field_docs() -> dict[str, str]:
    """Attribute docstrings of InferenceArgs, read from the source (the text tyro shows as help)."""
    tree = ast.parse(TOOL.read_text())
    cls = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "InferenceArgs")
    docs = {}
    for stmt, following in zip(cls.body, cls.body[1:] + [None], strict=True):
        if isinstance(stmt, ast.AnnAssign):
            is_doc = isinstance(following, ast.Expr) and isinstance(following.value, ast.Constant)
            docs[stmt.target.id] = following.value.value if is_doc else ""
    return docs


def test_help_lists_every_flag_with_its_description(capsys):
    with pytest.raises(SystemExit) as exit_info:
        tool.main(["--help"])
    assert exit_info.value.code == 0
    text = re.sub(r"[│╭╮╰╯─]", " ", capsys.readouterr().out)
    text = " ".join(text.split())
    docs = _field_docs()
    flags = {"--" + name for name in docs}
    assert set(EXPECTED_FLAGS) <= flags, set(EXPECTED_FLAGS) - flags
    for name, doc in docs.items():
        flag = "--" + name
        assert doc.strip(), f"{flag} has no help text"
        assert re.search(re.escape(flag) + r"\b", text), f"{flag} missing from --help"
        first_words = " ".join(doc.split()[:5])
        assert first_words in text, f"the help of {flag} ({first_words!r}) is not shown"


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="module")
def assets(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("inference_tool")
    return {"checkpoint": build_demo_checkpoint(root / "tiny.safetensors", seed=5),
            "gemma": build_tiny_gemma(root / "gemma", seed=5)}


def _args(assets, output: Path, *extra: str) -> list[str]:
    return ["--checkpoint", str(assets["checkpoint"]), "--text_encoder_path", str(assets["gemma"]),
            "--prompt", "a red cat runs on the green grass", "--output", str(output),
            "--width", "64", "--height", "64", "--num_frames", "9", "--frame_rate", str(FPS),
            "--num_inference_steps", "2", "--stg_blocks", "1", "--guidance_scale", "3", "--seed", "11",
            "--device", "cpu", "--dtype", "float32", *extra]


def test_text_to_video_run_writes_mp4_and_wav_and_matches_generate(assets, tmp_path):
    output, wav = tmp_path / "out.mp4", tmp_path / "out.wav"
    result = tool.main(_args(assets, output, "--audio_output", str(wav)))
    assert result.output == output and result.audio_output == wav
    info = probe_video(output)
    assert (info.num_frames, info.width, info.height, info.fps, info.has_audio) == (9, 64, 64, FPS, True)
    audio = read_audio(wav)
    # 9 audio latents -> 33 mel frames at 100 / s -> 0.33 s at 48 kHz, written losslessly as 16-bit PCM
    assert (audio.sample_rate, audio.num_channels, audio.num_samples) == (DEMO_AUDIO_SAMPLE_RATE, 2, 33 * 480)
    # s16 written as round(x * 32767), read back as n / 32768: at most 0.5 + 1 steps of 1 / 32768 apart
    torch.testing.assert_close(audio.waveform, result.clip.audio, atol=1.5 / 32767, rtol=0)
    assert abs(read_audio(output).num_samples - 33 * 480) <= 1024

    # The tool's wiring adds nothing: the same request through generate() gives the same clip.
    models = load_tiny_models(assets["checkpoint"])
    again = generate(models, result.request)
    assert torch.equal(again.frames, result.clip.frames)
    assert torch.equal(again.audio, result.clip.audio)


def test_ic_lora_run_takes_the_downscale_factor_from_the_lora_metadata(assets, tmp_path):
    models = load_tiny_models(assets["checkpoint"])
    to_q = models.transformer.get_submodule("transformer_blocks.0.attn1.to_q")
    gen = torch.Generator().manual_seed(0)
    lora = export_lora(
        tmp_path / "ic_lora.safetensors",
        {"transformer_blocks.0.attn1.to_q.lora_A.weight": torch.randn(2, to_q.in_features, generator=gen),
         "transformer_blocks.0.attn1.to_q.lora_B.weight": torch.randn(to_q.out_features, 2, generator=gen)},
        rank=2, alpha=2.0, metadata={"reference_downscale_factor": "2"},
    )
    reference = tmp_path / "reference.mp4"
    write_video(reference, test_pattern_frames(9, 32, 32), FPS)
    image = tmp_path / "first.png"
    write_image(image, test_pattern_frames(1, 64, 64, seed=3)[0])
    output = tmp_path / "v2v.mp4"
    result = tool.main(_args(assets, output, "--lora_path", str(lora), "--reference_video", str(reference),
                             "--condition_image", str(image), "--include_reference_in_output", "True",
                             "--skip_audio", "True"))
    assert result.request.reference_downscale_factor == 2
    assert result.clip.frames.shape == (9, 64, 128, 3) and result.clip.audio is None
    info = probe_video(output)
    assert (info.num_frames, info.width, info.height, info.has_audio) == (9, 128, 64, False)

    explicit = tool.main(_args(assets, tmp_path / "v2v_n1.mp4", "--lora_path", str(lora), "--reference_video",
                               str(reference), "--reference_downscale_factor", "1", "--skip_audio", "True"))
    assert explicit.request.reference_downscale_factor == 1


def test_single_frame_png(assets, tmp_path):
    result = tool.main(_args(assets, tmp_path / "frame.png", "--num_frames", "1", "--skip_audio", "True"))
    info = probe_video(result.output)
    assert info.is_image and (info.width, info.height) == (64, 64)


@pytest.mark.parametrize(
    ("change", "match"),
    [
        ({"--checkpoint": "missing.safetensors"}, "--checkpoint: file not found"),
        ({"--text_encoder_path": "no_gemma"}, "--text_encoder_path: Gemma model directory or packed"),
        ({"--lora_path": "missing_lora.safetensors"}, "--lora_path: file not found"),
        ({"--condition_image": "missing.png"}, "--condition_image: file not found"),
        ({"--reference_video": "missing.mp4"}, "--reference_video: file not found"),
        ({"--output": "out.avi"}, "must end in .mp4 or .png"),
        ({"--output": "out.png"}, "holds one frame"),
        ({"--num_frames": "10"}, "num_frames must be 8k"),
        ({"--include_reference_in_output": "True"}, "needs --reference_video"),
        ({"--audio_output": "out.mp3"}, "must end in .wav"),
    ],
)
def test_bad_arguments_are_clear_errors(assets, tmp_path, change, match):
    argv = _args(assets, tmp_path / "out.mp4")
    for flag, value in change.items():
        resolved = value if value.isdigit() or value in ("True", "False") else str(tmp_path / value)
        if flag in argv:
            argv[argv.index(flag) + 1] = resolved
        else:
            argv += [flag, resolved]
    with pytest.raises(ValueError, match=re.escape(match)):
        tool.main(argv)


def test_a_lora_for_another_model_fails_before_gemma_runs(assets, tmp_path, monkeypatch):
    """The LoRA is matched against the transformer the checkpoint describes before the prompt is embedded."""
    def gemma_must_not_run(*args, **kwargs):
        raise AssertionError("Gemma ran before the LoRA was checked")

    monkeypatch.setattr(tool, "encode_prompts", gemma_must_not_run)
    wide = export_lora(tmp_path / "wide.safetensors",
                       {"transformer_blocks.0.attn1.to_q.lora_A.weight": torch.zeros(2, 999),
                        "transformer_blocks.0.attn1.to_q.lora_B.weight": torch.zeros(64, 2)}, rank=2, alpha=2.0)
    with pytest.raises(ValueError, match=r"--lora_path: .*wide\.safetensors: the LoRA does not fit this model"):
        tool.main(_args(assets, tmp_path / "out.mp4", "--lora_path", str(wide)))
    with pytest.raises(ValueError, match="--config_from: file not found"):
        tool.main(_args(assets, tmp_path / "out.mp4", "--config_from", str(tmp_path / "none.safetensors")))
def test_conditions_foley_and_text_to_audio_from_the_command_line(assets, tmp_path):
    """--video_to_audio freezes the given clip (it is the output's video); --skip_video True writes a .wav; an
    audio prefix holds the given audio's tokens."""
    from tests.test_generate import test_pattern_frames

    clip = tmp_path / "clip.mp4"
    write_video(clip, test_pattern_frames(9, 64, 64, seed=4), FPS)
    result = tool.main(_args(assets, tmp_path / "foley.mp4", "--video_to_audio", str(clip)))
    assert [c.type for c in result.request.conditions] == ["video_to_audio"]
    assert probe_video(result.output).has_audio and result.clip.frames.shape[0] == 9
    t2a = tool.main(_args(assets, tmp_path / "sound.wav", "--skip_video", "True", "--audio_guidance_scale", "7"))
    assert t2a.clip.frames is None and read_audio(t2a.output).num_samples == t2a.clip.audio.shape[1]
    assert t2a.request.audio_guidance.cfg_scale == 7.0 and t2a.request.guidance.cfg_scale == 3.0
    with pytest.raises(ValueError, match="--mask_video and --video_mask go together"):
        tool.main(_args(assets, tmp_path / "x.mp4", "--mask_video", str(clip)))
    with pytest.raises(ValueError, match="--output must end in .wav"):
        tool.main(_args(assets, tmp_path / "x.mp4", "--skip_video", "True"))
