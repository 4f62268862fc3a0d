"""Benchmark the trainer: step time, samples/s, tokens/s and peak memory of real training steps, and the
trainer's overhead over the bare model forward + backward on the same inputs.

Both measurements use the same random official-layout checkpoint and the same LoRA, in one run:
- trainer: ``ltxf.train.main`` on a precomputed dataset written to a temporary folder (data loading, text
  connectors, noising, forward, loss, backward, gradient clipping, AdamW, metrics: everything a step does),
  timed by the trainer's own monitor (the first steps are excluded as warm-up);
- bare: the transformer's forward, the loss and the backward on one prepared batch, repeated.
The overhead is trainer_step_time / bare_step_time - 1 (target: <= 5%).

Examples:
    python tools/bench_train.py --preset small
    python tools/bench_train.py --preset full-width --device cuda --dtype bfloat16 --steps 20
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import statistics
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from experiments.presets import demo  # noqa: E402
from ltxf.config import CheckpointConfig, DataConfig, LogConfig, ModelConfig, OptimConfig, ParallelConfig  # noqa: E402
from ltxf.data import DummyDataset, write_precomputed_sample  # noqa: E402
from ltxf.demo import write_random_checkpoint  # noqa: E402
from ltxf.lora import LoraConfig  # noqa: E402
from ltxf.models.transformer import TransformerConfig  # noqa: E402
from ltxf.validation import ValidationConfig  # noqa: E402

logger = logging.getLogger("bench_train")


@dataclasses.dataclass(frozen=True, kw_only=True)
class Preset:
    transformer: TransformerConfig
    frames: int
    height: int
    width: int
    text_tokens: int
    batch_size: int


PRESETS = {
    # ~2k video tokens (4 x 16 x 32 latents = 25 frames at 512 x 1024), ~40 audio tokens, 4 blocks at width 512.
    "small": Preset(
        transformer=TransformerConfig(version="ltx-2.3", num_layers=4, num_heads=8, head_dim=64,
                                      cross_attention_dim=512, audio_num_heads=8, audio_head_dim=32,
                                      audio_cross_attention_dim=256, caption_channels=None,
                                      apply_gated_attention=True, cross_attention_adaln=True),
        frames=25, height=512, width=1024, text_tokens=128, batch_size=1,
    ),
    "tiny": Preset(
        transformer=TransformerConfig(version="ltx-2.3", num_layers=2, num_heads=4, head_dim=16,
                                      cross_attention_dim=64, audio_num_heads=4, audio_head_dim=8,
                                      audio_cross_attention_dim=32, caption_channels=None,
                                      apply_gated_attention=True, cross_attention_adaln=True),
        frames=9, height=128, width=192, text_tokens=32, batch_size=2,
    ),
    # Real widths, a few blocks, a realistic clip (121 x 512 x 768: 6144 video tokens); for a GPU.
    "full-width": Preset(
        transformer=TransformerConfig(version="ltx-2.3", num_layers=4, caption_channels=None,
                                      apply_gated_attention=True, cross_attention_adaln=True),
        frames=121, height=512, width=768, text_tokens=1024, batch_size=1,
    ),
}


def _connector_keys(t: TransformerConfig) -> dict:
    return dict(connector_num_layers=1, connector_num_attention_heads=t.num_heads,
                connector_attention_head_dim=t.head_dim, audio_connector_num_attention_heads=t.audio_num_heads,
                audio_connector_attention_head_dim=t.audio_head_dim, connector_num_learnable_registers=8,
                connector_apply_gated_attention=True, connector_positional_embedding_max_pos=[4096])


def write_dataset(root: Path, preset: Preset, num_samples: int) -> None:
    t = preset.transformer
    dummy = DummyDataset(num_samples, num_frames=preset.frames, height=preset.height, width=preset.width,
                         with_audio=True, text_length=preset.text_tokens, num_text_tokens=preset.text_tokens // 2,
                         video_embed_dim=t.inner_dim, audio_embed_dim=t.audio_inner_dim)
    for i in range(num_samples):
        s = dummy[i]
        write_precomputed_sample(root, f"clip_{i:03d}.mp4", latents=s["video_latents"], fps=float(s["fps"]),
                                 video_prompt_embeds=s["video_prompt_embeds"],
                                 audio_prompt_embeds=s["audio_prompt_embeds"],
                                 prompt_attention_mask=s["prompt_attention_mask"].long(),
                                 audio_latents=s["audio_latents"])


def trainer_config(preset: Preset, checkpoint: Path, data: Path, output: Path, args) -> object:
    cfg = demo()
    return replace(
        cfg,
        demo_model=False,
        model=ModelConfig(checkpoint=checkpoint, training_mode="lora", dtype=args.dtype),
        lora=LoraConfig(rank=32, alpha=32),
        strategy=replace(cfg.strategy, with_audio=True, first_frame_conditioning_p=0.0),
        optim=OptimConfig(learning_rate=1e-4, steps=args.steps, batch_size=preset.batch_size, scheduler="constant"),
        data=DataConfig(root=data, num_workers=args.num_workers, text_length=None),
        parallel=ParallelConfig(data_parallel="replicate", activation_checkpointing=False),
        checkpoints=CheckpointConfig(interval=None, keep_last_n=1, resume=False),
        log=LogConfig(every=1, console_every_s=30.0),
        validation=ValidationConfig(),
        output_dir=output,
    )


def bare_step_time(cfg, args) -> float:
    """Median forward + loss + backward time on one prepared batch (no data loading, no optimizer)."""
    from ltxf.data import PrecomputedDataset, collate
    from ltxf.lora import inject_lora
    from ltxf.models.text import load_embeddings_processor
    from ltxf.models.transformer import load_transformer
    from ltxf.rng import make_generator
    from ltxf.strategies.base import compute_losses
    from ltxf.strategies.text_to_video import prepare_text_to_video

    device = torch.device(args.device)
    dtype = torch.bfloat16 if args.dtype == "bfloat16" else torch.float32
    transformer = load_transformer(cfg.model.checkpoint, dtype=dtype, device=device)
    transformer.requires_grad_(False)
    inject_lora(transformer, cfg.lora)
    transformer.train()
    text = load_embeddings_processor(cfg.model.checkpoint, dtype=dtype, device=device, with_feature_extractor=False)
    data = PrecomputedDataset(cfg.data.root, sources=["latents", "conditions", "audio_latents"], text_length=None)
    batch = collate([data[i] for i in range(cfg.optim.batch_size)])
    batch = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
    with torch.no_grad():
        context = text(batch["video_prompt_embeds"].to(dtype), batch["audio_prompt_embeds"].to(dtype),
                       batch["prompt_attention_mask"])._replace(context_mask=None)
    generators = [make_generator(0, 0, i, "sample") for i in range(cfg.optim.batch_size)]
    inputs = prepare_text_to_video(batch, context, strategy=cfg.strategy, flow=cfg.flow, generators=generators,
                                   dtype=dtype)

    def step() -> None:
        video, audio = transformer(video=inputs.video, audio=inputs.audio)
        compute_losses(inputs, video, audio, 1.0).total_B.mean().backward()
        for p in transformer.parameters():
            p.grad = None
        if device.type == "cuda":
            torch.cuda.synchronize()

    times = []
    for i in range(args.steps):
        start = time.perf_counter()
        step()
        if i >= args.warmup:
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def trainer_step_time(cfg) -> dict[str, float]:
    """Run the trainer and read its own timing and throughput from TensorBoard (warm-up steps excluded)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from ltxf.train import main

    main(cfg)
    acc = EventAccumulator(str(Path(cfg.output_dir) / "tensorboard"), size_guidance={"scalars": 0})
    acc.Reload()
    last = {tag: acc.Scalars(tag)[-1].value for tag in acc.Tags()["scalars"]}
    return last


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=sorted(PRESETS), default="small", help="model and clip size")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu or cuda")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32", help="compute dtype")
    parser.add_argument("--steps", type=int, default=8, help="training steps (and bare repetitions)")
    parser.add_argument("--warmup", type=int, default=2, help="bare repetitions excluded from the timing")
    parser.add_argument("--num_workers", type=int, default=1, help="DataLoader workers for the trainer run")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    torch.manual_seed(0)
    preset = PRESETS[args.preset]
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        config = {"transformer": {**preset.transformer.to_checkpoint_config(), **_connector_keys(preset.transformer)}}
        checkpoint = write_random_checkpoint(tmp / "model.safetensors", config, seed=0)
        write_dataset(tmp / "data", preset, num_samples=max(4, preset.batch_size * 2))
        cfg = trainer_config(preset, checkpoint, tmp / "data", tmp / "run", args)
        bare = bare_step_time(cfg, args)
        trained = trainer_step_time(cfg)
    step_s = trained["time/step_s"]
    print(f"preset {args.preset} on {args.device} ({args.dtype}), batch {preset.batch_size}, "
          f"{preset.frames}x{preset.height}x{preset.width} clip, LoRA rank 32")
    print(f"  trainer step      {step_s * 1e3:9.1f} ms   {trained['throughput/samples_per_s']:.3f} samples/s   "
          f"{trained['throughput/tokens_per_s']:.0f} video tokens/s")
    print(f"  bare fwd+bwd      {bare * 1e3:9.1f} ms")
    print(f"  trainer overhead  {100 * (step_s / bare - 1):+8.1f} %   (target <= 5%)")
    for tag in ("memory/peak_gib", "memory/peak_reserved_gib", "memory/host_peak_rss_gib"):
        if tag in trained:
            print(f"  {tag:<24} {trained[tag]:9.3f} GiB")


if __name__ == "__main__":
    main()
