"""Every training mode of the official trainer 1.2 (experiments/presets.py MODE_PRESETS) trains on tiny data made
here: its data sources are read, its model inputs run through the tiny LTX-2.3 model, and its loss falls."""

import shutil
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from experiments.presets import MODE_PRESETS
from ltxf.checkpoint import load_lora_file
from ltxf.config import DataConfig, FlowConfig, LogConfig, ModelConfig, ParallelConfig, TrainConfig
from ltxf.data import write_precomputed_sample
from ltxf.demo import build_demo_checkpoint, demo_transformer_config, write_demo_condition_files
from ltxf.lora import LoraConfig
from ltxf.train import main

STEPS = 10
AUDIO_STEPS = 100
LEARNING_RATE = 1e-1  # a few steps of a rank-4 LoRA on a random tiny model must move the loss visibly


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    """The demo checkpoint and 2 clips of one bucket written here (every step trains on both, so the logged loss
    moves with training): smooth video latents [128, 2, 4, 6], 4 s of smooth audio latents (enough tokens that one
    step's noise draw moves the audio loss by ~1 %, less than a few training steps do), caption features, and
    half-size video references, audio references, and video / audio masks (the top half of each frame / the first
    half of the audio kept)."""
    root = tmp_path_factory.mktemp("modes")
    checkpoint = build_demo_checkpoint(root / "model.safetensors", seed=3)
    dataset = root / "data"
    widths = demo_transformer_config()
    generator = torch.Generator().manual_seed(0)
    t = torch.linspace(0, 1, 2)[:, None, None]
    y = torch.linspace(-1, 1, 4)[None, :, None]
    x = torch.linspace(-1, 1, 6)[None, None, :]
    basis = torch.stack([torch.sin(3 * x + 2 * t).expand(2, 4, 6), torch.cos(2 * y - t).expand(2, 4, 6),
                         (x * y).expand(2, 4, 6)])
    for index in range(2):
        name = f"clip_{index}.pt"
        mix = torch.randn(128, 3, generator=generator)
        latents = torch.einsum("ck,kfhw->cfhw", mix, basis) + 0.1 * torch.randn(128, 2, 4, 6, generator=generator)
        tone = torch.sin(torch.linspace(0, 12.0 * (index + 1), AUDIO_STEPS))
        audio = tone[None, :, None] * mix[:8, :1, None] + 0.1 * torch.randn(8, AUDIO_STEPS, 16, generator=generator)
        mask = torch.zeros(32, dtype=torch.int64)
        mask[-12:] = 1
        write_precomputed_sample(
            dataset, f"clip_{index}.mp4", latents=latents, fps=24.0,
            video_prompt_embeds=torch.randn(32, widths.inner_dim, generator=generator),
            audio_prompt_embeds=torch.randn(32, widths.audio_inner_dim, generator=generator),
            prompt_attention_mask=mask, audio_latents=audio, audio_duration=AUDIO_STEPS / 25.0,
        )
        write_demo_condition_files(dataset, name, latents, audio, AUDIO_STEPS / 25.0)
    return checkpoint, dataset


def _tiny(cfg: TrainConfig, checkpoint: Path, dataset: Path, output_dir: Path) -> TrainConfig:
    """The preset on the tiny model: fp32, a few steps at a high learning rate, a fixed sigma (so the logged loss
    moves with training, not with the sigma draw), temporal boundaries and the crop scaled to 2-frame clips."""
    strategy = cfg.strategy
    for name in ("video", "audio"):
        modality = getattr(strategy, name)
        if modality is None:
            continue
        conditions = []
        for c in modality.conditions:
            if c.temporal_boundary is not None:
                c = replace(c, temporal_boundary=1 if name == "video" else 3)
            if c.spatial_region is not None:
                c = replace(c, spatial_region=(0, 0, 128, 96))  # the left half of a 192-pixel-wide clip
            conditions.append(c)
        strategy = replace(strategy, **{name: replace(modality, conditions=tuple(conditions))})
    return replace(
        cfg,
        model=ModelConfig(checkpoint=checkpoint, training_mode="lora", dtype="float32"),
        lora=LoraConfig(rank=4, alpha=4, target_modules=cfg.lora.target_modules, exclude_audio=cfg.lora.exclude_audio),
        strategy=strategy,
        optim=replace(cfg.optim, steps=STEPS, batch_size=2, learning_rate=LEARNING_RATE, warmup_steps=0,
                      weight_decay=0.0, scheduler="constant"),
        flow=FlowConfig(timestep_sampling="uniform", uniform_min=0.9, uniform_max=0.91),
        data=DataConfig(root=dataset, num_workers=0, text_length=None),
        parallel=ParallelConfig(activation_checkpointing=False),
        checkpoints=replace(cfg.checkpoints, interval=None, export_dtype="float32"),
        log=LogConfig(every=1, console_every_s=60.0),
        output_dir=output_dir,
    )


@pytest.mark.parametrize("name", sorted(MODE_PRESETS))
def test_every_mode_trains_and_its_loss_falls(name, assets, tmp_path):
    checkpoint, dataset = assets
    result = main(_tiny(MODE_PRESETS[name](), checkpoint, dataset, tmp_path / name))
    losses = result.losses
    assert result.final_step == STEPS and len(losses) == STEPS
    assert all(torch.isfinite(torch.tensor(losses)))
    # Same clips and sigma every step: only the noise varies (about 1 % on these sizes), training moves it 5-12 %.
    first, last = sum(losses[:3]) / 3, sum(losses[-3:]) / 3
    assert last < 0.97 * first, f"{name}: loss {losses}"
    metadata = load_lora_file(result.export_path).metadata
    assert metadata["ltxf_strategy"] == "flexible"
    if name in ("v2v_ic_lora", "av2av_ic_lora"):  # half-size references: the official metadata keys
        assert metadata["reference_spatial_scale_factor"] == metadata["reference_downscale_factor"] == "2"
        assert "reference_temporal_scale_factor" not in metadata


def test_readme_has_one_line_per_mode_that_parses():
    """The README's mode table is runnable: one ``python train.py MODE $DEMO ...`` line per preset, whose flags
    parse into that preset on the demo model."""
    from train import parse_config

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    demo_flags = next(line for line in readme.splitlines() if line.startswith('DEMO="')).split('"')[1].split()
    lines = {line.split()[2]: line.split("#")[0].split() for line in readme.splitlines()
             if line.startswith("python train.py") and "$DEMO" in line}
    assert sorted(lines) == sorted(MODE_PRESETS)
    for name, words in lines.items():
        args = [w for w in words[2:] if w != "$DEMO"] + demo_flags
        cfg = parse_config(args)
        assert cfg.demo_model and cfg.strategy == MODE_PRESETS[name]().strategy, name


def test_text_to_audio_trains_on_an_audio_only_dataset(assets, tmp_path):
    """t2a reads only audio_latents/ and conditions/: a dataset without latents/ (as --audio_durations makes)."""
    checkpoint, dataset = assets
    audio_only = tmp_path / "audio_only"
    for folder in ("audio_latents", "conditions"):
        shutil.copytree(dataset / folder, audio_only / folder)
    cfg = _tiny(MODE_PRESETS["t2a_lora"](), checkpoint, audio_only, tmp_path / "run")
    result = main(replace(cfg, optim=replace(cfg.optim, steps=2)))
    assert result.final_step == 2 and all(torch.isfinite(torch.tensor(result.losses)))
