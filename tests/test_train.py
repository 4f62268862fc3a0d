"""End-to-end training runs on the demo's tiny model: outputs, TensorBoard, exports, validation samples, exact
resume after a kill, Ctrl-C, non-finite loss and activation checkpointing."""

from __future__ import annotations

import json
import logging
import os
import shutil
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
from tests.processes import wait_for_line

REPO = Path(__file__).resolve().parents[1]


def small_demo(output_dir: Path, *, steps: int = 4, validation_interval: int | None = None, log_every: int = 1,
               **optim) -> TrainConfig:
    """The demo, shortened; validation off unless ``validation_interval`` is given."""
    cfg = demo()
    return prepare_demo(replace(
        cfg,
        output_dir=output_dir,
        optim=replace(cfg.optim, steps=steps, warmup_steps=0, batch_size=2, **optim),
        log=replace(cfg.log, every=log_every),
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
    assert lora.metadata["ltxf_lora_rank"] == str(demo().lora.rank)
    with safe_open(str(result.export_path), "pt") as f:
        keys = list(f.keys())
    assert all(k.startswith("diffusion_model.transformer_blocks.") for k in keys)
    assert any(k.endswith(".attn1.to_q.lora_A.weight") for k in keys)
    assert any(k.endswith(".audio_attn1.to_q.lora_B.weight") for k in keys)
    assert not any(k.endswith(".alpha") for k in keys)  # diffusers refuses files with alpha keys


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
    """All, none, every k-th and the first N blocks checkpointed, and all with the last block's frozen weights
    and the text connectors streamed from the host (ltxf.block_swap): the same losses and adapters, bit for
    bit."""
    import ltxf.parallel

    calls = []
    real_apply_ac = ltxf.parallel.apply_ac

    def recording_apply_ac(blocks, indices=None, **kwargs):
        calls.append(list(range(len(blocks))) if indices is None else list(indices))
        return real_apply_ac(blocks, indices, **kwargs)

    monkeypatch.setattr(ltxf.parallel, "apply_ac", recording_apply_ac)
    modes = {"all": {}, "none": {"activation_checkpointing": False}, "every_2": {"checkpoint_every": 2},
             "first_1": {"checkpoint_first": 1},
             "all_with_block_swap": {"blocks_to_swap": 1, "offload_text_connectors": True}}
    runs = {name: main(replace(small_demo(tmp_path / name, steps=3),
                               parallel=replace(demo().parallel, **{"activation_checkpointing": True, **changes})))
            for name, changes in modes.items()}
    assert demo_transformer_config().num_layers == 2
    assert calls == [[0, 1], [0], [0], [0, 1]], "checkpointing was applied once per run, to the selected blocks"
    exported = {name: load_lora_file(run.export_path) for name, run in runs.items()}
    for name, run in runs.items():
        assert run.losses == runs["none"].losses, name
        for key, value in exported["none"].tensors.items():
            assert torch.equal(exported[name].tensors[key], value), (name, key)


def _run_cli(output_dir: Path, *extra: str, new_session: bool = False) -> subprocess.Popen:
    """The demo preset from the command line, shortened; its validation stays on (a sample at step 0)."""
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    return subprocess.Popen(
        [sys.executable, str(REPO / "train.py"), "demo", "--output_dir", str(output_dir), "--optim.steps", "6",
         "--optim.warmup_steps", "0", "--optim.batch_size", "2", "--log.every", "1", "--checkpoints.interval", "2",
         *extra],
        cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        start_new_session=new_session,
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


def loss_scalars(run_dir: Path) -> dict[str, dict[int, float]]:
    """Every logged loss scalar (train, video, audio, per sigma bucket), read back from the event files."""
    acc = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: {e.step: e.value for e in acc.Scalars(tag)} for tag in acc.Tags()["scalars"]
            if tag.startswith(("loss/", "grad/", "lr", "train/skipped"))}


def test_killed_run_resumes_to_the_same_losses_and_weights(tmp_path):
    """SIGKILL a real training process after a checkpoint, resume, and compare with an uninterrupted run: every
    logged loss scalar read back from the TensorBoard files (windows of 3 steps, checkpoints every 2, so the
    resume point falls inside a window), the losses returned and the final LoRA weights are identical (CPU).
    The killed run samples a validation clip at step 0 and the others do not: that changes nothing either."""
    steps = 20
    reference = main(small_demo(tmp_path / "reference", steps=steps, log_every=3))

    killed_dir = tmp_path / "killed"
    proc = _run_cli(killed_dir, "--optim.steps", str(steps), "--log.every", "3", "--checkpoints.keep_last_n", "0")
    _wait_for(killed_dir / "checkpoints" / "step_00000004" / "metadata.json", proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    # The process may have gone on past step 4: drop its later checkpoints, so the resume point is step 4, inside
    # the logging window 4..6 (its TensorBoard events after step 4 are purged by the resumed run).
    for later in (killed_dir / "checkpoints").glob("step_*"):
        if int(later.name.split("_")[1]) > 4:
            shutil.rmtree(later)
    resume_from = latest_checkpoint(killed_dir)
    assert resume_from.name == "step_00000004"
    assert len(json.loads((resume_from / "metadata.json").read_text())["extra"]["log_window"]) == 1
    assert (killed_dir / "samples" / "step_000000_1.mp4").is_file()

    resumed = main(small_demo(killed_dir, steps=steps, log_every=3))
    start = int(resume_from.name.split("_")[1])
    assert start < steps, "the kill landed after the last step: nothing was resumed"
    assert resumed.final_step == steps
    logged_steps = [s for s in range(1, steps + 1) if s % 3 == 0 or s == steps]
    assert len(reference.losses) == len(logged_steps)
    assert resumed.losses == reference.losses[-len(resumed.losses):]
    expected, got = loss_scalars(tmp_path / "reference"), loss_scalars(killed_dir)
    assert sorted(expected["loss/train"]) == logged_steps
    assert expected == got
    a, b = load_lora_file(reference.export_path), load_lora_file(resumed.export_path)
    assert a.tensors.keys() == b.tensors.keys()
    for key in a.tensors:
        assert torch.equal(a.tensors[key], b.tensors[key]), key


def test_ctrl_c_saves_a_checkpoint_and_exits(tmp_path):
    """Ctrl-C in a terminal: SIGINT to the whole process group (a DataLoader worker too). The run saves, says it
    was interrupted (not "run finished") and exits 75 (ltxf.faults.EXIT_INTERRUPTED)."""
    run = tmp_path / "run"
    proc = _run_cli(run, "--checkpoints.interval", "100", "--optim.steps", "1000", "--data.num_workers", "1",
                    new_session=True)
    seen = wait_for_line(proc.stdout, "step 1/1000")
    os.killpg(proc.pid, signal.SIGINT)
    out, _ = proc.communicate(timeout=120)
    out = "".join(seen) + out
    assert proc.returncode == 75, out
    saved = latest_checkpoint(run)
    assert saved is not None and 0 < int(saved.name.split("_")[1]) < 1000, out
    assert "SIGINT received" in out and "run INTERRUPTED (SIGINT)" in out
    assert "run finished" not in out


def test_nonfinite_loss_stops_and_keeps_the_last_checkpoint(tmp_path):
    run = tmp_path / "run"
    first = main(small_demo(run, steps=2))
    assert latest_checkpoint(run).name == "step_00000002"
    # Poison every latent file (still valid files): the next step's loss is NaN.
    for path in (run / "demo_assets" / "dataset" / "latents").glob("*.pt"):
        data = torch.load(path, weights_only=True)
        data["latents"] = torch.full_like(data["latents"], float("nan"))
        torch.save(data, path)
    cfg = small_demo(run, steps=4)
    with pytest.raises(NonFiniteLossError, match="non-finite") as caught:
        main(replace(cfg, data=replace(cfg.data, check_finite=False)))  # the loss, not the loader, finds the NaN
    # The message names the samples of the failing micro-batch and their files.
    latents_dir = run / "demo_assets" / "dataset" / "latents"
    named = caught.value.sample_ids
    assert named and all(f"{latents_dir / sample}.pt" in str(caught.value) for sample in named)
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
    """A LoRA run's trained connectors go to their own file, with a warning at start that only ltxf reads it."""
    from ltxf.models.text import load_embeddings_processor

    cfg = small_demo(tmp_path / "run", steps=2)
    warnings: list[str] = []
    handler = logging.Handler(logging.WARNING)  # on the logger itself: main() resets the root handlers
    handler.emit = lambda record: warnings.append(record.getMessage())
    logging.getLogger("ltxf.train").addHandler(handler)
    try:
        result = main(replace(cfg, model=replace(cfg.model, train_connectors=True)))
    finally:
        logging.getLogger("ltxf.train").removeHandler(handler)
    assert any("model.train_connectors with a LoRA" in w and "only ltxf reads" in w for w in warnings)
    exported = result.output_dir / "exports" / "text_connectors_step_000002.safetensors"
    trained = load_embeddings_processor(exported, with_feature_extractor=False)
    base = load_embeddings_processor(result.output_dir / "demo_assets" / "demo_model.safetensors",
                                     with_feature_extractor=False)
    changed = [k for k, v in trained.state_dict().items() if not torch.equal(v, base.state_dict()[k])]
    assert changed, "the connectors were trained and exported"


def test_full_fine_tune_exports_a_whole_checkpoint(tmp_path):
    """Full fine-tuning with trained connectors: the export is the base file with the trained transformer and
    connectors in place (in the export dtype), every other tensor and the metadata unchanged."""
    from safetensors.torch import load_file

    from ltxf.models.checkpoint import TRANSFORMER_PREFIX, read_metadata

    cfg = small_demo(tmp_path / "run", steps=2)
    result = main(replace(cfg, model=replace(cfg.model, training_mode="full", train_connectors=True)))
    base_path = result.output_dir / "demo_assets" / "demo_model.safetensors"
    base, exported = load_file(str(base_path)), load_file(str(result.export_path))
    assert result.export_path.name == "model_weights_step_000002.safetensors"
    assert set(exported) == set(base) and read_metadata(result.export_path) == read_metadata(base_path)
    assert not (result.output_dir / "exports" / "text_connectors_step_000002.safetensors").exists()
    changed = {k for k in base if not torch.equal(exported[k].float(), base[k].float())}
    assert any(k.startswith(TRANSFORMER_PREFIX + "transformer_blocks.") for k in changed)
    assert any(k.startswith(TRANSFORMER_PREFIX + "video_embeddings_connector.") for k in changed)
    assert all(k.startswith(TRANSFORMER_PREFIX) for k in changed)
    export_dtype = getattr(torch, cfg.checkpoints.export_dtype)
    assert all(exported[k].dtype == export_dtype for k in changed)
    for key in base:
        if not key.startswith(TRANSFORMER_PREFIX):
            assert exported[key].dtype == base[key].dtype and torch.equal(exported[key], base[key]), key


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
