"""Training presets: plain functions returning a :class:`~ltxf.config.TrainConfig`.

They mirror the official trainer's example configs (audio-video LoRA, low-VRAM LoRA, IC-LoRA, full fine-tune)
plus the CPU demo. ``train.py PRESET --section.field value`` starts from one and overrides fields; a new
experiment is a new function (here or in its own file in experiments/) rather than a long command line.
Paths (``--model.checkpoint``, ``--data.root``) are given on the command line and checked when the run starts.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path

from ltxf.config import (
    CheckpointConfig,
    DataConfig,
    LogConfig,
    ModelConfig,
    OptimConfig,
    ParallelConfig,
    StrategyConfig,
    TrainConfig,
)
from ltxf.demo import DEMO_FPS, DEMO_PROMPT_FEATURES_FILE, DEMO_VALIDATION_PROMPT
from ltxf.lora import LoraConfig
from ltxf.validation import ValidationConfig

ATTENTION_TARGETS = ("to_k", "to_q", "to_v", "to_out.0")


def ltx2_av_lora() -> TrainConfig:
    """Audio-video LoRA (official ltx2_av_lora.yaml): rank 32, lr 1e-4, 2000 steps, first frame p=0.5."""
    return TrainConfig(
        model=ModelConfig(training_mode="lora", dtype="bfloat16"),
        lora=LoraConfig(rank=32, alpha=32, target_modules=ATTENTION_TARGETS),
        strategy=StrategyConfig(name="text_to_video", first_frame_conditioning_p=0.5, with_audio=True),
        optim=OptimConfig(learning_rate=1e-4, steps=2000, batch_size=1, scheduler="linear"),
        parallel=ParallelConfig(data_parallel="auto", activation_checkpointing=True),
        checkpoints=CheckpointConfig(interval=250, keep_last_n=3),
        output_dir=Path("outputs/ltx2_av_lora"),
    )


def ltx2_av_lora_low_vram() -> TrainConfig:
    """Low-VRAM audio-video LoRA (official ltx2_av_lora_low_vram.yaml): rank 16, 8-bit AdamW, checkpointing."""
    return TrainConfig(
        model=ModelConfig(training_mode="lora", dtype="bfloat16"),
        lora=LoraConfig(rank=16, alpha=16, target_modules=ATTENTION_TARGETS),
        strategy=StrategyConfig(name="text_to_video", first_frame_conditioning_p=0.5, with_audio=True),
        optim=OptimConfig(learning_rate=1e-4, steps=2000, batch_size=1, optimizer="adamw8bit"),
        parallel=ParallelConfig(data_parallel="auto", activation_checkpointing=True),
        checkpoints=CheckpointConfig(interval=250, keep_last_n=3),
        output_dir=Path("outputs/ltx2_av_lora_low_vram"),
    )


def ltx2_v2v_ic_lora() -> TrainConfig:
    """IC-LoRA video-to-video (official ltx2_v2v_ic_lora.yaml): lr 2e-4, 3000 steps, p=0.2, attn1/attn2/ff."""
    return TrainConfig(
        model=ModelConfig(training_mode="lora", dtype="bfloat16"),
        lora=LoraConfig(rank=32, alpha=32, target_modules=("attn1.to_k", "attn1.to_q", "attn1.to_v",
                                                           "attn1.to_out.0", "attn2.to_k", "attn2.to_q",
                                                           "attn2.to_v", "attn2.to_out.0", "ff.net.0.proj",
                                                           "ff.net.2"),
                        exclude_audio=True),
        strategy=StrategyConfig(name="video_to_video", first_frame_conditioning_p=0.2),
        optim=OptimConfig(learning_rate=2e-4, steps=3000, batch_size=1),
        parallel=ParallelConfig(data_parallel="auto", activation_checkpointing=True),
        checkpoints=CheckpointConfig(interval=250, keep_last_n=3),
        output_dir=Path("outputs/ltx2_v2v_ic_lora"),
    )


def ltx2_full() -> TrainConfig:
    """Full fine-tune of every transformer weight, FSDP2 across the processes (fp32 master weights, bf16
    compute, fp32 gradient reduction)."""
    return TrainConfig(
        model=ModelConfig(training_mode="full", dtype="bfloat16"),
        strategy=StrategyConfig(name="text_to_video", first_frame_conditioning_p=0.1, with_audio=True),
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
        strategy=StrategyConfig(name="text_to_video", first_frame_conditioning_p=0.5, with_audio=True),
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


PRESETS: dict[str, Callable[[], TrainConfig]] = {
    "demo": demo,
    "ltx2_av_lora": ltx2_av_lora,
    "ltx2_av_lora_low_vram": ltx2_av_lora_low_vram,
    "ltx2_v2v_ic_lora": ltx2_v2v_ic_lora,
    "ltx2_full": ltx2_full,
    "ltx25_av_lora": ltx25_av_lora,
    "ltx25_full": ltx25_full,
}
