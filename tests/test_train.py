"""End-to-end training runs on the demo's tiny model: outputs, TensorBoard, exports, validation samples, exact
resume after a kill, Ctrl-C, non-finite loss and activation checkpointing."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from experiments.presets import demo
from ltxf.checkpoint import latest_checkpoint, load_lora_file
from ltxf.config import TrainConfig
from ltxf.demo import DEMO_AUDIO_SAMPLE_RATE, build_demo_assets, demo_transformer_config, prepare_demo
from ltxf.media import probe_video, read_audio
from ltxf.step import NonFiniteLossError
from ltxf.train import main

REPO = Path(__file__).resolve().parents[1]


def small_demo(output_dir: Path, *, steps: int = 4, validation_interval: int | None = None, **optim) -> TrainConfig:
    """The demo, shortened; validation off unless ``validation_interval`` is given."""
    cfg = demo()
    return prepare_demo(replace(
        cfg,
        output_dir=output_dir,
        optim=replace(cfg.optim, steps=steps, warmup_steps=0, batch_size=2, **optim),
        log=replace(cfg.log, every=1),
        checkpoints=replace(cfg.checkpoints, interval=2),
        validation=replace(cfg.validation, interval=validation_interval),
    ))


def scalars(run_dir: Path, tag: str) -> dict[int, float]:
    acc = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"scalars": 0})
    acc.Reload()
    return {e.step: e.value for e in acc.Scalars(tag)}


@pytest.fixture(scope="module")
def plain_run(tmp_path_factory):
    """A 4-step demo run without validation."""
    return main(small_demo(tmp_path_factory.mktemp("plain") / "run"))


def test_demo_run_writes_checkpoints_tensorboard_and_lora(plain_run):
    result = plain_run
    run = result.output_dir
    assert result.final_step == 4 and len(result.losses) == 4
    assert (run / "config.json").is_file()
    assert latest_checkpoint(run).name == "step_00000004"
    losses = scalars(run, "loss/train")
    assert sorted(losses) == [1, 2, 3, 4]
    assert [losses[s] for s in sorted(losses)] == pytest.approx(list(result.losses), rel=1e-6)
    for tag in ("loss/video", "loss/audio", "lr", "grad/global_norm", "throughput/samples_per_s",
                "throughput/tokens_per_s", "time/step_s"):
        assert scalars(run, tag), tag
    scalar_tags = EventAccumulator(str(run / "tensorboard")).Reload().Tags()["scalars"]
    assert any(t.startswith("loss/sigma_") for t in scalar_tags)
    assert not (run / "samples").exists()

    lora = load_lora_file(result.export_path)
    assert lora.metadata["lora_rank"] == str(demo().lora.rank)
    with safe_open(str(result.export_path), "pt") as f:
        keys = list(f.keys())
    assert all(k.startswith("diffusion_model.transformer_blocks.") for k in keys)
    assert any(k.endswith(".attn1.to_q.lora_A.weight") for k in keys)
    assert any(k.endswith(".audio_attn1.to_q.alpha") for k in keys)


def test_validation_writes_samples_and_leaves_training_unchanged(plain_run, tmp_path):
    """The demo's validation (one prompt, 192x128x9 with audio, CFG + STG) at steps 0, 2 and 4: mp4 files with
    H.264 + AAC, TensorBoard video and audio; losses and LoRA weights identical to the run without validation. A
    resumed run samples at the next interval step only (not again at its start)."""
    cfg = small_demo(tmp_path / "run", validation_interval=2)
    cfg = replace(cfg, validation=replace(cfg.validation, offload_optimizer=True))
    result = main(cfg)
    run = result.output_dir
    assert result.losses == plain_run.losses
    a, b = load_lora_file(plain_run.export_path), load_lora_file(result.export_path)
    for key in a.tensors:
        assert torch.equal(a.tensors[key], b.tensors[key]), key

    samples = run / "samples"
    assert sorted(p.name for p in samples.iterdir()) == [f"step_00000{s}_1.mp4" for s in (0, 2, 4)]
    width, height, num_frames = cfg.validation.video_dims
    info = probe_video(samples / "step_000004_1.mp4")
    assert (info.num_frames, info.width, info.height, info.fps, info.has_audio) == (num_frames, width, height,
                                                                                     cfg.validation.frame_rate, True)
    audio = read_audio(samples / "step_000004_1.mp4")
    assert (audio.sample_rate, audio.num_channels) == (DEMO_AUDIO_SAMPLE_RATE, 2)
    # 9 frames at 24 fps -> 9 audio latents -> 4 * 9 - 3 = 33 mel frames at 100 / s; AAC keeps it to a frame.
    assert abs(audio.num_samples - 33 * DEMO_AUDIO_SAMPLE_RATE // 100) <= 1024
    assert audio.waveform.std() > 1e-3

    acc = EventAccumulator(str(run / "tensorboard"), size_guidance={"images": 0, "audio": 0})
    acc.Reload()
    assert [e.step for e in acc.Images("validation/sample_1")] == [0, 2, 4]
    assert [e.step for e in acc.Audio("validation/sample_1_audio")] == [0, 2, 4]
    assert (acc.Images("validation/sample_1")[0].width, acc.Images("validation/sample_1")[0].height) == (width, height)

    resumed = main(small_demo(run, steps=6, validation_interval=2))
    assert resumed.final_step == 6
    assert sorted(p.name for p in samples.iterdir()) == [f"step_00000{s}_1.mp4" for s in (0, 2, 4, 6)]
    acc = EventAccumulator(str(run / "tensorboard"), size_guidance={"images": 0, "audio": 0})
    acc.Reload()
    assert [e.step for e in acc.Images("validation/sample_1")] == [0, 2, 4, 6]


def test_activation_checkpointing_gives_identical_losses(tmp_path, monkeypatch):
    import ltxf.parallel

    calls = []
    real_apply_ac = ltxf.parallel.apply_ac
    monkeypatch.setattr(ltxf.parallel, "apply_ac", lambda blocks: (calls.append(len(blocks)), real_apply_ac(blocks)))
    on = main(replace(small_demo(tmp_path / "on", steps=3),
                      parallel=replace(demo().parallel, activation_checkpointing=True)))
    off = main(replace(small_demo(tmp_path / "off", steps=3),
                       parallel=replace(demo().parallel, activation_checkpointing=False)))
    assert calls == [demo_transformer_config().num_layers], "checkpointing was applied once, to every block"
    assert on.losses == off.losses
    a, b = load_lora_file(on.export_path), load_lora_file(off.export_path)
    for key in a.tensors:
        assert torch.equal(a.tensors[key], b.tensors[key]), key


def _run_cli(output_dir: Path, *extra: str) -> subprocess.Popen:
    """The demo preset from the command line, shortened; its validation stays on (a sample at step 0)."""
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    return subprocess.Popen(
        [sys.executable, str(REPO / "train.py"), "demo", "--output_dir", str(output_dir), "--optim.steps", "6",
         "--optim.warmup_steps", "0", "--optim.batch_size", "2", "--log.every", "1", "--checkpoints.interval", "2",
         *extra],
        cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )


def _wait_for(path: Path, proc: subprocess.Popen, timeout: float = 240.0) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if proc.poll() is not None:
            raise AssertionError(f"training exited early ({proc.returncode}):\n{proc.stdout.read()}")
        if time.monotonic() > deadline:
            proc.kill()
            raise AssertionError(f"{path} did not appear in {timeout} s")
        time.sleep(0.01)


def test_killed_run_resumes_to_the_same_losses_and_weights(tmp_path):
    """SIGKILL a real training process after its step-2 checkpoint, resume, and compare with an uninterrupted
    run: the per-step losses after the resume point and the final LoRA weights are identical (CPU). The killed
    run samples a validation clip at step 0 and the others do not: that changes nothing either."""
    steps = 20
    reference = main(small_demo(tmp_path / "reference", steps=steps))

    killed_dir = tmp_path / "killed"
    proc = _run_cli(killed_dir, "--optim.steps", str(steps))
    _wait_for(killed_dir / "checkpoints" / "step_00000002" / "metadata.json", proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    resume_from = latest_checkpoint(killed_dir)
    assert resume_from is not None
    assert (killed_dir / "samples" / "step_000000_1.mp4").is_file()

    resumed = main(small_demo(killed_dir, steps=steps))
    start = int(resume_from.name.split("_")[1])
    assert start < steps, "the kill landed after the last step: nothing was resumed"
    assert resumed.final_step == steps and len(resumed.losses) == steps - start
    assert resumed.losses == reference.losses[start:]
    a, b = load_lora_file(reference.export_path), load_lora_file(resumed.export_path)
    assert a.tensors.keys() == b.tensors.keys()
    for key in a.tensors:
        assert torch.equal(a.tensors[key], b.tensors[key]), key


def test_ctrl_c_saves_a_checkpoint_and_exits(tmp_path):
    run = tmp_path / "run"
    proc = _run_cli(run, "--checkpoints.interval", "100", "--optim.steps", "1000")
    seen = []
    # The progress line of step 1 is printed inside the loop, where the Ctrl-C handler is installed.
    for line in proc.stdout:
        seen.append(line)
        if "step 1/1000" in line:
            break
    else:
        raise AssertionError("training ended before its first step:\n" + "".join(seen))
    proc.send_signal(signal.SIGINT)
    out, _ = proc.communicate(timeout=120)
    out = "".join(seen) + out
    assert proc.returncode == 0, out
    saved = latest_checkpoint(run)
    assert saved is not None and 0 < int(saved.name.split("_")[1]) < 1000, out
    assert "interrupt received" in out


def test_nonfinite_loss_stops_and_keeps_the_last_checkpoint(tmp_path):
    run = tmp_path / "run"
    first = main(small_demo(run, steps=2))
    assert latest_checkpoint(run).name == "step_00000002"
    # Poison every latent file (still valid files): the next step's loss is NaN.
    for path in (run / "demo_assets" / "dataset" / "latents").glob("*.pt"):
        data = torch.load(path, weights_only=True)
        data["latents"] = torch.full_like(data["latents"], float("nan"))
        torch.save(data, path)
    with pytest.raises(NonFiniteLossError, match="non-finite"):
        main(small_demo(run, steps=4))
    assert latest_checkpoint(run).name == "step_00000002"
    assert first.final_step == 2


def test_demo_assets_are_official_layout(tmp_path):
    from ltxf.data import PrecomputedDataset
    from ltxf.models.audio_vae import load_audio_vae_decoder, load_audio_vae_encoder
    from ltxf.models.checkpoint import detect_version, read_config
    from ltxf.models.video_vae import load_video_vae_decoder, load_video_vae_encoder
    from ltxf.models.vocoder import load_vocoder
    from ltxf.validation import load_prompt_features

    assets = build_demo_assets(tmp_path, seed=0)
    checkpoint, dataset = assets
    config = read_config(checkpoint)
    assert detect_version(config) == "ltx-2.3"
    assert {"transformer", "vae", "audio_vae", "vocoder"} <= set(config)
    for load in (load_video_vae_encoder, load_video_vae_decoder, load_audio_vae_encoder, load_audio_vae_decoder,
                 load_vocoder):
        load(checkpoint)  # strict: every tensor of the component present, nothing left on meta
    assert checkpoint.stat().st_size < 16e6
    data = PrecomputedDataset(dataset, sources=["latents", "conditions", "audio_latents"], text_length=None)
    sample = data[0]
    assert sample["video_latents"].dtype == torch.bfloat16 and sample["video_latents"].shape[0] == 128
    assert sample["audio_latents"].shape[0] == 8 and sample["audio_latents"].shape[2] == 16

    features, negative = load_prompt_features(assets.prompt_features)
    assert len(features) == 1 and negative is not None
    clip_000 = data[[s.sample_id for s in data.samples].index("clip_000")]
    assert torch.equal(features[0].video_prompt_embeds[0], clip_000["video_prompt_embeds"])
    assert torch.equal(features[0].prompt_attention_mask[0].bool(), clip_000["prompt_attention_mask"])


def test_ic_lora_run_writes_reference_downscale_factor(tmp_path):
    """IC-LoRA (video_to_video) trains on references at half resolution; the factor lands in the LoRA file."""
    from ltxf.config import DataConfig, StrategyConfig
    from ltxf.data import write_precomputed_sample
    from ltxf.demo import build_demo_checkpoint

    checkpoint = build_demo_checkpoint(tmp_path / "model.safetensors", seed=0)
    generator = torch.Generator().manual_seed(0)
    for i in range(4):
        mask = torch.ones(16, dtype=torch.int64)
        write_precomputed_sample(
            tmp_path / "data", f"clip_{i}.mp4", latents=torch.randn(128, 2, 4, 6, generator=generator), fps=24.0,
            video_prompt_embeds=torch.randn(16, 64, generator=generator),
            audio_prompt_embeds=torch.randn(16, 32, generator=generator), prompt_attention_mask=mask,
            reference_latents=torch.randn(128, 2, 2, 3, generator=generator),
        )
    cfg = small_demo(tmp_path / "run", steps=2)
    cfg = replace(cfg, demo_model=False, model=replace(cfg.model, checkpoint=checkpoint),
                  data=DataConfig(root=tmp_path / "data", num_workers=0, text_length=None),
                  strategy=StrategyConfig(name="video_to_video", first_frame_conditioning_p=0.5))
    result = main(cfg)
    lora = load_lora_file(result.export_path)
    assert lora.metadata["reference_downscale_factor"] == "2"
    assert lora.metadata["ltxf_strategy"] == "video_to_video"
    assert all(torch.isfinite(torch.tensor(result.losses)))


def test_trained_connectors_are_exported_in_the_official_layout(tmp_path):
    from ltxf.models.text import load_embeddings_processor

    cfg = small_demo(tmp_path / "run", steps=2)
    result = main(replace(cfg, model=replace(cfg.model, train_connectors=True)))
    exported = result.output_dir / "exports" / "text_connectors_step_000002.safetensors"
    trained = load_embeddings_processor(exported, with_feature_extractor=False)
    base = load_embeddings_processor(result.output_dir / "demo_assets" / "demo_model.safetensors",
                                     with_feature_extractor=False)
    changed = [k for k, v in trained.state_dict().items() if not torch.equal(v, base.state_dict()[k])]
    assert changed, "the connectors were trained and exported"


def test_init_lora_keeps_the_files_effective_update(tmp_path):
    """A LoRA exported with alpha != rank, loaded into a run with another alpha, gives the same W + dW."""
    from ltxf.checkpoint import export_lora
    from ltxf.lora import LoraConfig, inject_lora, lora_state_dict
    from ltxf.train import apply_initial_lora

    layer = torch.nn.Sequential(torch.nn.Linear(8, 8))
    cfg_file = LoraConfig(rank=4, alpha=8, target_modules=("0",))
    inject_lora(layer, cfg_file)
    g = torch.Generator().manual_seed(0)
    tensors = {k: torch.randn(v.shape, generator=g) for k, v in lora_state_dict(layer).items()}
    path = export_lora(tmp_path / "l.safetensors", tensors, rank=4, alpha=8, dtype=torch.float32)
    expected = 8 / 4 * tensors["0.lora_B.weight"] @ tensors["0.lora_A.weight"]

    target = torch.nn.Sequential(torch.nn.Linear(8, 8))
    run_cfg = LoraConfig(rank=4, alpha=1, target_modules=("0",))
    inject_lora(target, run_cfg)
    apply_initial_lora(target, path, run_cfg)
    got = run_cfg.scaling * target[0].lora_B.weight @ target[0].lora_A.weight
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


def test_bf16_base_trains_fp32_adapters_and_connectors(tmp_path):
    """A bf16 base with trainable connectors: adapters and connectors train in fp32 (bf16 AdamW moments cannot
    decay), and the connectors take their inputs in their own dtype."""
    import torch.distributed.checkpoint as dcp

    cfg = small_demo(tmp_path / "run", steps=2)
    result = main(replace(cfg, model=replace(cfg.model, dtype="bfloat16", train_connectors=True)))
    assert all(torch.isfinite(torch.tensor(result.losses)))
    metadata = dcp.FileSystemReader(str(latest_checkpoint(result.output_dir))).read_metadata()
    dtypes = {key: meta.properties.dtype for key, meta in metadata.state_dict_metadata.items()
              if key.startswith(("params.", "opt_state.")) and hasattr(meta, "properties")}
    # Parameters and Adam moments (the per-parameter step counters are int64 by design).
    lora = [key for key in dtypes if ("lora_" in key or "text_processor." in key) and ".count." not in key]
    assert lora and all(dtypes[key] == torch.float32 for key in lora), {k: dtypes[k] for k in lora[:4]}


def test_single_process_fsdp_matches_replicated(tmp_path):
    """parallel.data_parallel='fsdp' in a plain one-process run (a world of one, no torchrun) trains like the
    replicated path: same losses to fp32 rounding (the sharded path reduces gradients in another order)."""
    cfg = small_demo(tmp_path / "fsdp", steps=2)
    fsdp = main(replace(cfg, parallel=replace(cfg.parallel, data_parallel="fsdp")))
    plain = main(small_demo(tmp_path / "plain", steps=2))
    assert fsdp.losses == pytest.approx(plain.losses, rel=1e-5)
