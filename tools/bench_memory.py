"""Bytes one transformer block saves for the backward pass, per video token and per audio token, at real width.

Builds the transformer of a published config (default: LTX-2.3 22B) with ONE block, on the CPU in bfloat16, and
counts what the block's forward saves for backward through ``torch.autograd.graph.saved_tensors_hooks``: every
saved tensor's storage, counted once however many ops save it (unique storages; a saved view holds its whole
storage). Not counted: parameter storages and the per-forward inputs every block shares (``StreamInputs``:
modulation, RoPE tables, masks, context), which are allocated once per forward, not once per block.

Measured at two video token counts (and two audio token counts), so that ``per video token`` is the slope
``d bytes / d video tokens`` (the per-block constants, e.g. text-length tensors and cast adapter weights, drop
out; they are reported as ``constant``). The modes:

* ``floor``: no LoRA, every weight frozen; only the block input needs a gradient (a block in the middle of a
  LoRA model). The least any LoRA can save.
* ``lora``: LoRA adapters (fp32 master weights, as ``train.py`` makes them) on the attention projections
  (``to_q``, ``to_k``, ``to_v``, ``to_out.0``) of a frozen bf16 base, under bf16 autocast as one process trains.
* ``full``: every weight of the block and the AdaLN / modulation inputs trainable (bf16 compute weights, as FSDP2
  mixed precision gives them).

The block takes first-frame conditioning (two distinct timesteps per sample), as the trainer mostly does.

Examples:
    python tools/bench_memory.py                       # LTX-2.3 22B, LoRA rank 32, table
    python tools/bench_memory.py --json                # machine-readable, for tools/plan_memory.py
    python tools/bench_memory.py --rank 64 --modes lora
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from ltxf.lora import LoraConfig, inject_lora  # noqa: E402
from ltxf.models.transformer import AVTransformer, Modality, TransformerConfig  # noqa: E402

DEFAULT_CONFIG = ROOT.parent / "shared" / "reference" / "configs" / "ltx-2.3-22b-config.json"
MODES = ("floor", "lora", "full")


def load_config(path: Path, num_layers: int = 1) -> TransformerConfig:
    """The transformer config of a published model config JSON (``{"transformer": {...}, ...}``)."""
    if not path.is_file():
        raise ValueError(f"--model-config {path}: no such file (expected a model config JSON such as "
                         "ltx-2.3-22b-config.json)")
    try:
        section = json.loads(path.read_text())["transformer"]
    except (json.JSONDecodeError, KeyError, TypeError) as exc:
        raise ValueError(f"--model-config {path}: expected a JSON object with a 'transformer' section") from exc
    config = TransformerConfig.from_checkpoint_config(section, path=path)
    return dataclasses.replace(config, num_layers=num_layers)


def build_model(config: TransformerConfig, mode: str, rank: int, seed: int = 0) -> AVTransformer:
    """A bf16 model on the CPU, weights drawn from N(0, 0.02) (values do not change what is saved)."""
    with torch.device("meta"):
        model = AVTransformer(config)
    model.to_empty(device="cpu")
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            param.copy_(torch.randn(param.shape, generator=generator) * 0.02)
    model.to(torch.bfloat16)
    model.requires_grad_(mode == "full")
    if mode == "lora":
        inject_lora(model, LoraConfig(rank=rank, alpha=rank), generator=generator, dtype=torch.float32)
        with torch.no_grad():  # a trained-looking B (inject_lora starts it at zero), so nothing is special-cased
            for name, param in model.named_parameters():
                if name.endswith("lora_B.weight"):
                    param.normal_(0.0, 0.02, generator=generator)
    return model


def _modality(config: TransformerConfig, kind: str, num_tokens: int, text_tokens: int, generator: torch.Generator
              ) -> Modality:
    video = kind == "video"
    width = config.inner_dim if video else config.audio_inner_dim
    if config.has_caption_projection:
        width = config.caption_channels
    sigma = torch.full((1,), 0.6)
    timesteps = sigma[:, None].expand(1, num_tokens).clone()
    if video:
        timesteps[:, : max(1, num_tokens // 8)] = 0.0  # first-frame conditioning: two distinct timesteps
    start = torch.arange(num_tokens, dtype=torch.float32)
    bounds = torch.stack([start, start + 1], -1)
    positions = bounds[None, None].expand(1, 3 if video else 1, num_tokens, 2).contiguous()
    channels = config.in_channels if video else config.audio_in_channels
    return Modality(latent=torch.randn(1, num_tokens, channels, generator=generator), sigma=sigma,
                    timesteps=timesteps, positions=positions,
                    context=torch.randn(1, text_tokens, width, generator=generator))


def saved_bytes(model: AVTransformer, mode: str, video_tokens: int, audio_tokens: int, text_tokens: int) -> int:
    """Bytes of the unique storages block 0 saves for backward (parameters and shared stream inputs excluded)."""
    generator = torch.Generator().manual_seed(1)
    video = _modality(model.config, "video", video_tokens, text_tokens, generator)
    audio = _modality(model.config, "audio", audio_tokens, text_tokens, generator)
    excluded = {p.untyped_storage().data_ptr() for p in model.parameters()}
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=mode == "lora")
    with autocast:
        vx, v_in, _ = model.prepare_stream("video", video, audio)
        ax, a_in, _ = model.prepare_stream("audio", audio, video)
        for stream in (v_in, a_in):
            excluded.update(t.untyped_storage().data_ptr() for t in stream if isinstance(t, torch.Tensor))
        # The block input of a block in the middle of the model needs a gradient in every mode.
        vx, ax = vx.detach().requires_grad_(), ax.detach().requires_grad_()
        excluded.update({vx.untyped_storage().data_ptr(), ax.untyped_storage().data_ptr()})
        storages: dict[int, int] = {}

        def pack(tensor: torch.Tensor) -> torch.Tensor:
            storage = tensor.untyped_storage()
            if storage.data_ptr() not in excluded:
                storages[storage.data_ptr()] = storage.nbytes()
            return tensor

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
            out_v, out_a = model.transformer_blocks[0](vx, ax, v_in, a_in)
    del out_v, out_a
    # The block inputs are saved by the block (its first norms); count them once, as part of the block.
    return sum(storages.values()) + vx.untyped_storage().nbytes() + ax.untyped_storage().nbytes()


def measure(config: TransformerConfig, modes: tuple[str, ...], rank: int, video_tokens: tuple[int, int],
            audio_tokens: tuple[int, int], text_tokens: int) -> dict:
    results = {}
    for mode in modes:
        started = time.perf_counter()
        model = build_model(config, mode, rank)
        base = saved_bytes(model, mode, video_tokens[0], audio_tokens[0], text_tokens)
        more_video = saved_bytes(model, mode, video_tokens[1], audio_tokens[0], text_tokens)
        more_audio = saved_bytes(model, mode, video_tokens[0], audio_tokens[1], text_tokens)
        del model
        per_video = (more_video - base) / (video_tokens[1] - video_tokens[0])
        per_audio = (more_audio - base) / (audio_tokens[1] - audio_tokens[0])
        constant = base - per_video * video_tokens[0] - per_audio * audio_tokens[0]
        results[mode] = {"per_video_token": per_video, "per_audio_token": per_audio, "constant": constant,
                         "seconds": round(time.perf_counter() - started, 1)}
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-config", type=Path, default=DEFAULT_CONFIG,
                        help="published model config JSON (default: the LTX-2.3 22B config)")
    parser.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    parser.add_argument("--rank", type=int, default=32, help="LoRA rank (alpha = rank)")
    parser.add_argument("--video-tokens", type=int, nargs=2, default=(64, 128), metavar=("T1", "T2"))
    parser.add_argument("--audio-tokens", type=int, nargs=2, default=(16, 48), metavar=("T1", "T2"))
    parser.add_argument("--text-tokens", type=int, default=32)
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    args = parser.parse_args(argv)
    if args.video_tokens[0] >= args.video_tokens[1] or args.audio_tokens[0] >= args.audio_tokens[1]:
        raise ValueError("--video-tokens / --audio-tokens: give two increasing token counts T1 < T2")
    if args.rank < 1:
        raise ValueError(f"--rank must be >= 1, got {args.rank}")
    config = load_config(args.model_config)
    results = measure(config, tuple(args.modes), args.rank, tuple(args.video_tokens), tuple(args.audio_tokens),
                      args.text_tokens)
    report = {"model_config": str(args.model_config), "version": config.version, "dtype": "bfloat16",
              "lora_rank": args.rank, "unit": "bytes saved for backward per block", "modes": results}
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    floor = results.get("floor")
    print(f"{config.version}, one block at width {config.inner_dim} (audio {config.audio_inner_dim}), bf16, CPU; "
          f"LoRA rank {args.rank} on to_q/to_k/to_v/to_out.0")
    print(f"{'mode':<8}{'per video token':>18}{'per audio token':>18}{'constant':>14}"
          f"{'vs floor (video)':>18}")
    for mode, r in results.items():
        ratio = f"{r['per_video_token'] / floor['per_video_token']:.3f}x" if floor else "-"
        print(f"{mode:<8}{r['per_video_token']:>18,.0f}{r['per_audio_token']:>18,.0f}{r['constant']:>14,.0f}"
              f"{ratio:>18}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
