"""Config validation: bad values are ValueErrors that name the field; presets build; the CLI parses overrides."""

from dataclasses import replace
from pathlib import Path

import pytest

from experiments.presets import PRESETS
from ltxf.config import (
    DataConfig,
    ModelConfig,
    OptimConfig,
    ParallelConfig,
    StrategyConfig,
    TrainConfig,
    check_paths,
)
from ltxf.faults import FlagError
from ltxf.validation import ValidationConfig


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_presets_build(name):
    cfg = PRESETS[name]()
    assert isinstance(cfg, TrainConfig)
    assert cfg.to_dict()["optim"]["steps"] == cfg.optim.steps


@pytest.mark.parametrize(
    ("build", "message"),
    [
        (lambda: OptimConfig(steps=0), "optim.steps"),
        (lambda: OptimConfig(learning_rate=-1.0), "optim.learning_rate"),
        (lambda: OptimConfig(betas=(0.9, 1.5)), "optim.betas"),
        (lambda: OptimConfig(steps=10, warmup_steps=10), "optim.warmup_steps"),
        (lambda: StrategyConfig(first_frame_conditioning_p=1.5), "first_frame_conditioning_p"),
        (lambda: TrainConfig(strategy=StrategyConfig(name="video_to_video", with_audio=True)), "with_audio"),
        (lambda: TrainConfig(strategy=StrategyConfig(name="image_to_video")), "unknown strategy 'image_to_video'"),
        (lambda: ModelConfig(checkpoint=Path("https://example.com/x.safetensors")), "local file"),
        (lambda: DataConfig(num_workers=-1), "data.num_workers"),
        (lambda: ParallelConfig(checkpoint_every=0), "parallel.checkpoint_every"),
        (lambda: ParallelConfig(checkpoint_first=-1), "parallel.checkpoint_first"),
        (lambda: ParallelConfig(checkpoint_first=2, checkpoint_every=2), "set only one of them"),
        (lambda: ParallelConfig(blocks_to_swap=-1), "parallel.blocks_to_swap"),
        (lambda: TrainConfig(model=ModelConfig(training_mode="full"),
                             strategy=StrategyConfig(name="video_to_video")), "training_mode='lora'"),
    ],
)
def test_invalid_values_name_the_field(build, message):
    with pytest.raises(ValueError, match=message.replace(".", r"\.").replace("(", r"\(")):
        build()


def test_check_paths_names_missing_things(tmp_path):
    with pytest.raises(ValueError, match="model.checkpoint is required"):
        check_paths(TrainConfig())
    ckpt = tmp_path / "model.safetensors"
    with pytest.raises(ValueError, match="file not found"):
        check_paths(TrainConfig(model=ModelConfig(checkpoint=ckpt), data=DataConfig(root=tmp_path)))
    ckpt.write_bytes(b"x")
    (tmp_path / "data" / "latents").mkdir(parents=True)
    cfg = TrainConfig(model=ModelConfig(checkpoint=ckpt), data=DataConfig(root=tmp_path / "data"),
                      strategy=StrategyConfig(with_audio=True))
    with pytest.raises(ValueError, match=r"missing the folder\(s\) \['conditions', 'audio_latents'\]"):
        check_paths(cfg)


def test_validation_is_off_by_default_and_its_files_are_checked_at_run_time(tmp_path):
    assert not TrainConfig().validation.enabled
    assert PRESETS["demo"]().validation.enabled  # the demo samples; real presets need prompts from the user
    assert not any(PRESETS[name]().validation.enabled for name in PRESETS if name != "demo")
    ckpt = tmp_path / "model.safetensors"
    ckpt.write_bytes(b"x")
    for name in ("latents", "conditions"):
        (tmp_path / "data" / name).mkdir(parents=True)
    validation = ValidationConfig(prompts=("a cat",), prompt_features_path=tmp_path / "missing.pt")
    cfg = TrainConfig(model=ModelConfig(checkpoint=ckpt), data=DataConfig(root=tmp_path / "data"),
                      validation=validation)
    with pytest.raises(ValueError, match=r"validation\.prompt_features_path: file not found"):
        check_paths(cfg)
    # Not checked when validation is off.
    check_paths(replace(cfg, validation=replace(validation, interval=None)))


def test_cli_validation_flags(capsys):
    from train import parse_config

    cfg = parse_config(["ltx2_av_lora", "--validation.prompts", "a cat", "a dog", "--validation.text_encoder_path",
                        "/models/gemma", "--validation.interval", "50", "--validation.stg_blocks", "1", "2"])
    assert cfg.validation.prompts == ("a cat", "a dog") and cfg.validation.interval == 50
    assert cfg.validation.text_encoder_path == Path("/models/gemma") and cfg.validation.stg_blocks == (1, 2)
    assert not parse_config(["demo", "--validation.interval", "None"]).validation.enabled
    # tyro reports the config's ValueError; train.py turns it into one "error:" line (exit 2, ltxf.faults)
    with pytest.raises(FlagError, match="validation.text_encoder_path"):
        parse_config(["ltx2_av_lora", "--validation.prompts", "a cat"])


def test_cli_overrides_and_help(capsys):
    from train import parse_config

    cfg = parse_config(
        ["ltx2_av_lora", "--optim.learning_rate", "3e-4", "--lora.rank", "8", "--strategy.audio.is_generated",
         "False"],
    )
    assert cfg.optim.learning_rate == 3e-4 and cfg.lora.rank == 8 and not cfg.strategy.audio.is_generated
    assert cfg.strategy.video.conditions[0].type == "first_frame"  # the rest of the preset is kept
    assert cfg.optim.steps == PRESETS["ltx2_av_lora"]().optim.steps
    # A config's own check, reported under the user's flag as one line (train.py prints it as "error: ..." and
    # exits 2), no tyro internals.
    with pytest.raises(FlagError) as error:
        parse_config(["demo", "--optim.steps", "0"])
    assert "optim.steps must be >= 1" in str(error.value) and "__tyro" not in str(error.value)
    with pytest.raises(SystemExit):
        parse_config(["demo", "--help"])
    help_text = capsys.readouterr().out
    # Every flag is explained: the attribute docstrings reach --help.
    assert "--optim.learning_rate" in help_text and "Peak learning rate" in help_text
    assert "--checkpoints.interval" in help_text and "exported once, at the end" in help_text
    assert "--model.checkpoint" in help_text and "Official LTX-2" in help_text
    assert "--validation.prompts" in help_text and "empty disables validation" in help_text


def test_importing_the_config_loads_no_torch_model_or_media_module():
    """``train.py --help`` and presets stay light: ``import ltxf.config`` pulls in no torch, model, VAE or PyAV."""
    import subprocess
    import sys

    code = "import sys, ltxf.config; print(' '.join(sorted(sys.modules)))"
    repo = Path(__file__).resolve().parents[1]
    out = subprocess.run([sys.executable, "-c", code], cwd=repo, capture_output=True, text=True, check=True).stdout
    loaded = out.split()
    heavy = [m for m in loaded if m.split(".")[0] in ("torch", "av", "numpy", "safetensors", "transformers")
             or m.startswith(("ltxf.models", "ltxf.media", "ltxf.strategies"))]
    assert heavy == []


def test_an_unprepared_demo_config_says_how_to_prepare_it():
    with pytest.raises(ValueError, match=r"ltxf\.demo\.prepare_demo"):
        check_paths(PRESETS["demo"]())
