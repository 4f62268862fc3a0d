"""Config validation: bad values are ValueErrors that name the field; presets build; the CLI parses overrides."""

from pathlib import Path

import pytest

from experiments.presets import PRESETS
from ltxf.config import (
    DataConfig,
    ModelConfig,
    OptimConfig,
    StrategyConfig,
    TrainConfig,
    check_paths,
)


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
        (lambda: StrategyConfig(name="video_to_video", with_audio=True), "with_audio"),
        (lambda: ModelConfig(checkpoint=Path("https://example.com/x.safetensors")), "local file"),
        (lambda: DataConfig(num_workers=-1), "data.num_workers"),
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


def test_cli_overrides_and_help(capsys):
    from train import parse_config

    cfg = parse_config(
        ["ltx2_av_lora", "--optim.learning_rate", "3e-4", "--lora.rank", "8", "--strategy.with_audio", "False"],
    )
    assert cfg.optim.learning_rate == 3e-4 and cfg.lora.rank == 8 and not cfg.strategy.with_audio
    assert cfg.optim.steps == PRESETS["ltx2_av_lora"]().optim.steps
    with pytest.raises(SystemExit):
        parse_config(["demo", "--help"])
    help_text = capsys.readouterr().out
    # Every flag is explained: the attribute docstrings reach --help.
    assert "--optim.learning_rate" in help_text and "Peak learning rate" in help_text
    assert "--model.checkpoint" in help_text and "Official LTX-2" in help_text
