"""Training presets: plain functions returning a :class:`~ltxf.config.TrainConfig`.

They mirror the official trainer 1.2's example configs: one preset per training mode of its flexible strategy
(:data:`MODE_PRESETS`, with the official LoRA targets), the older names (ltx2_av_lora, ltx2_v2v_ic_lora, now
flexible presets), a full fine-tune and the CPU demo. ``train.py PRESET --section.field value`` starts from one
and overrides fields; a new experiment is a new function (here or in its own file in experiments/) rather than a
long command line. Paths (``--model.checkpoint``, ``--data.root``) are given on the command line and checked when
the run starts.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

from ltxf.config import (
    CheckpointConfig,
    DataConfig,
    LogConfig,
    ModelConfig,
    OptimConfig,
    ParallelConfig,
    TrainConfig,
)
from ltxf.demo import DEMO_FPS, DEMO_PROMPT_FEATURES_FILE, DEMO_VALIDATION_PROMPT
from ltxf.lora import LoraConfig
from ltxf.strategies.flexible import ConditionConfig, FlexibleConfig, ModalityConfig
from ltxf.validation import ValidationConfig

ATTENTION_TARGETS = ("to_k", "to_q", "to_v", "to_out.0")
_PROJECTIONS = ATTENTION_TARGETS
# Official per-config LoRA targets (patterns match a module name's dotted suffix, so "attn1.to_k" is the video
# self-attention only, not audio_attn1).
VIDEO_ATTENTION_TARGETS = tuple(f"{m}.{p}" for m in ("attn1", "attn2") for p in _PROJECTIONS)
VIDEO_TARGETS = VIDEO_ATTENTION_TARGETS + ("ff.net.0.proj", "ff.net.2")
AUDIO_TARGETS = tuple(f"{m}.{p}" for m in ("audio_attn1", "audio_attn2") for p in _PROJECTIONS) + (
    "audio_ff.net.0.proj", "audio_ff.net.2")
V2A_TARGETS = AUDIO_TARGETS + tuple(f"video_to_audio_attn.{p}" for p in _PROJECTIONS)


def video(*conditions: ConditionConfig, generated: bool = True) -> ModalityConfig:
    """The video modality of a flexible preset (latents/)."""
    return ModalityConfig(is_generated=generated, latents_dir="latents", conditions=conditions)


def audio(*conditions: ConditionConfig, generated: bool = True) -> ModalityConfig:
    """The audio modality of a flexible preset (audio_latents/)."""
    return ModalityConfig(is_generated=generated, latents_dir="audio_latents", conditions=conditions)


def flexible_lora(
    name: str,
    *,
    video: ModalityConfig | None = None,
    audio: ModalityConfig | None = None,
    targets: tuple[str, ...] = ATTENTION_TARGETS,
    learning_rate: float = 1e-4,
    steps: int = 2000,
    rank: int = 32,
    optimizer: str = "adamw",
    **validation: Any,
) -> TrainConfig:
    """The common body of the official 1.2 configs: LoRA rank/alpha 32, AdamW 1e-4, 2000 steps, batch 1,
    activation checkpointing, bf16, shifted logit-normal sigmas; validation (off until prompts are given) at
    960x544x89, 24 fps, 30 steps, seed 42 with the 1.2 guidance defaults, ``validation`` overriding fields of it
    (which modalities are generated, a given modality's guidance turned off)."""
    return TrainConfig(
        model=ModelConfig(training_mode="lora", dtype="bfloat16"),
        lora=LoraConfig(rank=rank, alpha=rank, target_modules=targets),
        strategy=FlexibleConfig(video=video, audio=audio),
        optim=OptimConfig(learning_rate=learning_rate, steps=steps, batch_size=1, scheduler="linear",
                          optimizer=optimizer),
        parallel=ParallelConfig(data_parallel="auto", activation_checkpointing=True),
        checkpoints=CheckpointConfig(interval=250, keep_last_n=3),
        validation=ValidationConfig(**{"video_dims": (960, 544, 89), "frame_rate": 24.0, "inference_steps": 30,
                                       "seed": 42, **validation}),
        output_dir=Path("outputs") / name,
    )


# A given (frozen) modality is not guided; the official configs set its scales to the neutral values.
_NO_VIDEO_GUIDANCE = dict(guidance_scale=1.0, stg_scale=0.0, modality_guidance_scale=1.0)
_NO_AUDIO_GUIDANCE = dict(audio_guidance_scale=1.0, audio_stg_scale=0.0, audio_modality_guidance_scale=1.0)


def t2v_lora() -> TrainConfig:
    """Text-to-video with joint audio (official t2v_lora.yaml): both modalities generated, no condition."""
    return flexible_lora("t2v_lora", video=video(), audio=audio())


def t2v_lora_low_vram() -> TrainConfig:
    """Low-VRAM text-to-video (official t2v_lora_low_vram.yaml): rank 16, 8-bit AdamW, checkpointing."""
    return flexible_lora("t2v_lora_low_vram", video=video(), audio=audio(), rank=16, optimizer="adamw8bit",
                         video_dims=(576, 576, 49), offload_optimizer=True, text_encoder_8bit=True)


def i2v_lora() -> TrainConfig:
    """Image-to-video (official i2v_lora.yaml): the first latent frame clean for half the samples, joint audio."""
    return flexible_lora("i2v_lora", video=video(ConditionConfig(type="first_frame", probability=0.5)),
                         audio=audio())


def video_extend_lora() -> TrainConfig:
    """Video extension (official video_extend_lora.yaml): the first 8 latent frames given, joint audio."""
    return flexible_lora("video_extend_lora", video=video(ConditionConfig(type="prefix", temporal_boundary=8)),
                         audio=audio())


def video_suffix_lora() -> TrainConfig:
    """Backward video extension (official video_suffix_lora.yaml): the last 8 latent frames given, joint audio."""
    return flexible_lora("video_suffix_lora", video=video(ConditionConfig(type="suffix", temporal_boundary=8)),
                         audio=audio())


def v2v_ic_lora() -> TrainConfig:
    """IC-LoRA video-to-video (official v2v_ic_lora.yaml): reference_latents/ before the target, first frame
    p=0.2, video-only attn1/attn2/ff targets, lr 2e-4, 3000 steps."""
    return flexible_lora(
        "v2v_ic_lora",
        video=video(ConditionConfig(type="reference", latents_dir="reference_latents"),
                    ConditionConfig(type="first_frame", probability=0.2)),
        targets=VIDEO_TARGETS, learning_rate=2e-4, steps=3000, generate_audio=False, modality_guidance_scale=1.0,
    )


def a2v_lora() -> TrainConfig:
    """Audio-to-video (official a2v_lora.yaml): video generated from the clean audio track."""
    return flexible_lora("a2v_lora", video=video(), audio=audio(generated=False), generate_audio=False,
                         **_NO_AUDIO_GUIDANCE)


def v2a_lora() -> TrainConfig:
    """Video-to-audio / Foley (official v2a_lora.yaml): audio generated from the clean video; audio and
    video-to-audio attention targets."""
    return flexible_lora("v2a_lora", video=video(generated=False), audio=audio(), targets=V2A_TARGETS,
                         generate_video=False, **_NO_VIDEO_GUIDANCE)


def video_inpainting_lora() -> TrainConfig:
    """Video inpainting (official video_inpainting_lora.yaml): video_masks/ (> 0.5 kept) per sample, video only,
    attn1/attn2 targets."""
    return flexible_lora("video_inpainting_lora", video=video(ConditionConfig(type="mask", mask_dir="video_masks")),
                         targets=VIDEO_ATTENTION_TARGETS, generate_audio=False)


def video_outpainting_lora() -> TrainConfig:
    """Video outpainting (official video_outpainting_lora.yaml): the pixel region (0, 0, 288, 576) given, video
    only, attn1/attn2 targets."""
    return flexible_lora(
        "video_outpainting_lora",
        video=video(ConditionConfig(type="spatial_crop", spatial_region=(0, 0, 288, 576))),
        targets=VIDEO_ATTENTION_TARGETS, generate_audio=False,
    )


def t2a_lora() -> TrainConfig:
    """Text-to-audio (official t2a_lora.yaml): audio only, audio targets, lr 2e-4, 3000 steps."""
    return flexible_lora("t2a_lora", audio=audio(), targets=AUDIO_TARGETS, learning_rate=2e-4, steps=3000,
                         generate_video=False, audio_modality_guidance_scale=1.0)


def audio_extend_lora() -> TrainConfig:
    """Audio extension (official audio_extend_lora.yaml): the first 8 audio latent steps (0.32 s) given."""
    return flexible_lora("audio_extend_lora", audio=audio(ConditionConfig(type="prefix", temporal_boundary=8)),
                         generate_video=False)


def audio_suffix_lora() -> TrainConfig:
    """Backward audio extension (official audio_suffix_lora.yaml): the last 8 audio latent steps given."""
    return flexible_lora("audio_suffix_lora", audio=audio(ConditionConfig(type="suffix", temporal_boundary=8)),
                         generate_video=False)


def audio_inpainting_lora() -> TrainConfig:
    """Audio inpainting (official audio_inpainting_lora.yaml): audio_masks/ (> 0.5 kept) per sample."""
    return flexible_lora("audio_inpainting_lora",
                         audio=audio(ConditionConfig(type="mask", mask_dir="audio_masks")), generate_video=False)


def a2a_ic_lora() -> TrainConfig:
    """IC-LoRA audio-to-audio (official a2a_ic_lora.yaml): reference_audio_latents/ before the target."""
    return flexible_lora("a2a_ic_lora",
                         audio=audio(ConditionConfig(type="reference", latents_dir="reference_audio_latents")),
                         generate_video=False)


def av2av_ic_lora() -> TrainConfig:
    """IC-LoRA audio-video-to-audio-video (official av2av_ic_lora.yaml): a reference per modality, lr 2e-4,
    3000 steps, all attention targets."""
    return flexible_lora(
        "av2av_ic_lora",
        video=video(ConditionConfig(type="reference", latents_dir="reference_latents")),
        audio=audio(ConditionConfig(type="reference", latents_dir="reference_audio_latents")),
        learning_rate=2e-4, steps=3000,
    )


def ltx2_av_lora() -> TrainConfig:
    """Audio-video LoRA (the older official ltx2_av_lora.yaml, now on the flexible strategy): rank 32, lr 1e-4,
    2000 steps, first frame p=0.5, joint audio with its own sigma."""
    return replace(i2v_lora(), output_dir=Path("outputs/ltx2_av_lora"))


def ltx2_av_lora_low_vram() -> TrainConfig:
    """Low-VRAM audio-video LoRA (older ltx2_av_lora_low_vram.yaml, flexible): rank 16, 8-bit AdamW, first frame
    p=0.5."""
    cfg = t2v_lora_low_vram()
    return replace(cfg, strategy=replace(cfg.strategy, video=video(ConditionConfig(type="first_frame",
                                                                                   probability=0.5))),
                   output_dir=Path("outputs/ltx2_av_lora_low_vram"))


def ltx2_av_lora_24gb() -> TrainConfig:
    """Audio-video LoRA for a 24 GB card (RTX 4090): the official rank-32 LoRA on an nf4 base, 8-bit AdamW,
    checkpointing, text connectors streamed from the host; planned peak for LTX-2.3 at 768x512x49 with audio
    17.7 GiB (tools/plan_memory.py)."""
    cfg = ltx2_av_lora()
    return replace(cfg, model=replace(cfg.model, quantization="nf4"),
                   optim=replace(cfg.optim, optimizer="adamw8bit"),
                   parallel=replace(cfg.parallel, offload_text_connectors=True),
                   output_dir=Path("outputs/ltx2_av_lora_24gb"))


def ltx2_av_lora_16gb() -> TrainConfig:
    """Audio-video LoRA for a 16 GB card: ltx2_av_lora_24gb plus block swap (the frozen weights of the last 24 of
    the 48 blocks wait in host memory, two in flight); planned peak 13.2 GiB at 768x512x49 with audio."""
    cfg = ltx2_av_lora_24gb()
    return replace(cfg, parallel=replace(cfg.parallel, blocks_to_swap=24), output_dir=Path("outputs/ltx2_av_lora_16gb"))


def ltx2_v2v_ic_lora() -> TrainConfig:
    """IC-LoRA video-to-video (older ltx2_v2v_ic_lora.yaml): the same as v2v_ic_lora."""
    return replace(v2v_ic_lora(), output_dir=Path("outputs/ltx2_v2v_ic_lora"))


def ltx2_full() -> TrainConfig:
    """Full fine-tune of every transformer weight, FSDP2 across the processes (fp32 master weights, bf16
    compute, fp32 gradient reduction)."""
    return TrainConfig(
        model=ModelConfig(training_mode="full", dtype="bfloat16"),
        strategy=FlexibleConfig(video=video(ConditionConfig(type="first_frame", probability=0.1)),
                                audio=audio()),
        optim=OptimConfig(learning_rate=1e-5, steps=2000, batch_size=1, scheduler="cosine", warmup_steps=50),
        parallel=ParallelConfig(data_parallel="fsdp", activation_checkpointing=True),
        checkpoints=CheckpointConfig(interval=250, keep_last_n=2),
        output_dir=Path("outputs/ltx2_full"),
    )


def demo() -> TrainConfig:
    """CPU demo: a tiny random LTX-2.3-architecture model and a synthetic dataset written into the output
    directory, audio-video LoRA: 1500 steps of batch 4, about a minute on two idle cores (the loss falls from
    ~4.5 to ~3.6).

    Validation samples one prompt (features from the synthetic dataset, so no Gemma) at the dataset's size with
    CFG and STG and joint audio, at steps 0, 500, 1000 and 1500: ``samples/step_000500_1.mp4`` and TensorBoard.
    """
    return TrainConfig(
        model=ModelConfig(training_mode="lora", dtype="float32"),
        lora=LoraConfig(rank=16, alpha=16, target_modules=("to_k", "to_q", "to_v", "to_out.0", "ff.net.0.proj",
                                                         "ff.net.2")),
        strategy=FlexibleConfig(video=video(ConditionConfig(type="first_frame", probability=0.5)),
                                audio=audio()),
        optim=OptimConfig(learning_rate=5e-3, steps=1500, batch_size=4, scheduler="cosine", warmup_steps=50,
                          weight_decay=0.0),
        data=DataConfig(num_workers=0, text_length=None),
        parallel=ParallelConfig(data_parallel="auto", activation_checkpointing=False),
        checkpoints=CheckpointConfig(interval=500, keep_last_n=2, export_dtype="float32"),
        log=LogConfig(every=50, console_every_s=5.0),
        validation=ValidationConfig(
            prompts=(DEMO_VALIDATION_PROMPT,),
            # The run points this at its own demo_assets/ folder (see TrainConfig.demo_model).
            prompt_features_path=Path("outputs/demo/demo_assets") / DEMO_PROMPT_FEATURES_FILE,
            video_dims=(192, 128, 9), frame_rate=DEMO_FPS, inference_steps=4, interval=500,
            guidance_scale=4.0, stg_scale=1.0, stg_blocks=(1,), generate_audio=True,
        ),
        output_dir=Path("outputs/demo"),
        demo_model=True,
    )


def ltx25_av_lora() -> TrainConfig:
    """LTX-2.5 audio-video LoRA on a split pack: the ltx2_av_lora recipe, with the keyframe embedding trained as it
    is sampled (strategy.keyframes_mask 'first_frame') and the 2.5 validation defaults (STG on block 28). Give the
    pack: ``--model.checkpoint ltx-2.5-22b-dev-transformer-bf16.safetensors --model.text_encoder
    gemma4-12b-with-proj-ltx-2.5-bf16.safetensors --model.video_vae ltx-2.5-video-vae-conv-bf16.safetensors
    --model.audio_vae ltx-2.5-audio-vae-bf16.safetensors``."""
    base = ltx2_av_lora()
    return dataclasses.replace(
        base,
        strategy=dataclasses.replace(base.strategy, keyframes_mask="first_frame"),
        validation=dataclasses.replace(base.validation, stg_blocks=(28,), frame_rate=24.0),
        output_dir=Path("outputs/ltx25_av_lora"),
    )


def ltx25_full() -> TrainConfig:
    """LTX-2.5 full fine-tune (as ltx2_full); the export is a 2.5 transformer file (connectors and the pack's
    metadata included) that replaces the pack's transformer file."""
    base = ltx2_full()
    return dataclasses.replace(
        base,
        strategy=dataclasses.replace(base.strategy, keyframes_mask="first_frame"),
        validation=dataclasses.replace(base.validation, stg_blocks=(28,), frame_rate=24.0),
        output_dir=Path("outputs/ltx25_full"),
    )

# The 16 modes of the official trainer 1.2, one preset each (README: "Training modes").
MODE_PRESETS: dict[str, Callable[[], TrainConfig]] = {
    "t2v_lora": t2v_lora,
    "t2v_lora_low_vram": t2v_lora_low_vram,
    "i2v_lora": i2v_lora,
    "video_extend_lora": video_extend_lora,
    "video_suffix_lora": video_suffix_lora,
    "v2v_ic_lora": v2v_ic_lora,
    "a2v_lora": a2v_lora,
    "v2a_lora": v2a_lora,
    "video_inpainting_lora": video_inpainting_lora,
    "video_outpainting_lora": video_outpainting_lora,
    "t2a_lora": t2a_lora,
    "audio_extend_lora": audio_extend_lora,
    "audio_suffix_lora": audio_suffix_lora,
    "audio_inpainting_lora": audio_inpainting_lora,
    "a2a_ic_lora": a2a_ic_lora,
    "av2av_ic_lora": av2av_ic_lora,
}

PRESETS: dict[str, Callable[[], TrainConfig]] = {
    "demo": demo,
    **MODE_PRESETS,
    "ltx2_av_lora": ltx2_av_lora,
    "ltx2_av_lora_low_vram": ltx2_av_lora_low_vram,
    "ltx2_av_lora_24gb": ltx2_av_lora_24gb,
    "ltx2_av_lora_16gb": ltx2_av_lora_16gb,
    "ltx2_v2v_ic_lora": ltx2_v2v_ic_lora,
    "ltx2_full": ltx2_full,
    "ltx25_av_lora": ltx25_av_lora,
    "ltx25_full": ltx25_full,
}
