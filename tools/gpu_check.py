"""GPU checks of issue 10 in one short run (under 8 minutes on one H100), printing one table and a JSON report.

1. ``mfu``: full-width LTX-2.3 with ``--blocks`` blocks (default 2), LoRA r32 on the attention projections, bf16:
   forward + backward time and model FLOPs utilisation (FLOPs counted by ``torch.utils.flop_counter``).
2. ``memory``: the same model with a none / fp8 / int8 / nf4 base, activation checkpointing on: the step's CUDA
   peak (``max_memory_allocated``, weights included) against ``tools/plan_memory.py``'s prediction for the same
   blocks and tokens (minus the CUDA context and the optimizer state, which the check does not allocate).
3. ``numerics``: quantizing a [4096, 16384] weight on the GPU gives the CPU reference's codes; SNR of each format;
   with fp8 tensor cores (capability >= 8.9) the ``torch._scaled_mm`` path against the dequantized one.
4. ``overlap``: pinned host-to-device copies of one block's frozen weights on a side stream, alone, next to the
   forward+backward, and both together (the overlap a block swap can get); then the trainer's block swap
   (``ltxf/block_swap.py``, nf4 base, checkpointing): step time with every block resident against the last block
   swapped, and its copy / prefetch counts.

Without a CUDA device it says so and exits 0. ``--device cpu --tiny`` runs every check on a tiny model on the CPU (a
smoke test of this script; the numbers mean nothing).

    python tools/gpu_check.py                 # on a GPU machine
    python tools/gpu_check.py --device cpu --tiny
"""

from __future__ import annotations

import argparse
import contextlib
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
from ltxf.memory_plan import GIB, Resolution, plan_memory, random_inputs, read_model_config  # noqa: E402
from ltxf.models.transformer import AVTransformer, TransformerConfig  # noqa: E402
from ltxf.parallel import apply_ac  # noqa: E402
from ltxf.quantization import (  # noqa: E402
    dequantize_weight,
    enable_fp8_scaled_mm,
    quantize_model_,
    quantize_weight,
    signal_to_noise_db,
)

DEFAULT_CONFIG = ROOT / "tests" / "data" / "ltx-2.3-22b-config.json"
PEAK_BF16_TFLOPS = {"H100": 989.4, "H200": 989.4, "H800": 989.4, "A100": 312.0, "L40S": 362.0, "B200": 2250.0,
                    "4090": 165.2, "5090": 209.5}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def build_model(config: dict, *, quantization: str, device: torch.device, checkpointing: bool) -> AVTransformer:
    """Random bf16 weights (N(0, 0.02)) made on the device, quantized there, LoRA r32 (fp32) on top."""
    tc = TransformerConfig.from_checkpoint_config(config["transformer"])
    with torch.device("meta"):
        model = AVTransformer(tc)
    model.to_empty(device=device).to(torch.bfloat16).requires_grad_(False)
    with torch.no_grad():
        for param in model.parameters():
            param.normal_(0.0, 0.02)
    if quantization != "none":
        quantize_model_(model, quantization)
    inject_lora(model, LoraConfig(rank=32, alpha=32), generator=torch.Generator(device).manual_seed(0),
                dtype=torch.float32)
    if checkpointing:
        apply_ac(model.transformer_blocks)
    return model


def step(model: AVTransformer, video, audio) -> None:
    with torch.autocast(video.latent.device.type, dtype=torch.bfloat16):
        out_v, out_a = model(video=video, audio=audio)
        loss = out_v.float().square().mean() + out_a.float().square().mean()
    loss.backward()
    for p in model.parameters():
        p.grad = None


def check_mfu(config: dict, device: torch.device, tokens: tuple[int, int, int], steps: int) -> dict:
    from torch.utils.flop_counter import FlopCounterMode

    model = build_model(config, quantization="none", device=device, checkpointing=False)
    video, audio = random_inputs(model.config, video_tokens=tokens[0], audio_tokens=tokens[1], text_tokens=tokens[2],
                                 device=device)
    step(model, video, audio)  # warm-up
    counter = FlopCounterMode(display=False)
    with counter:
        step(model, video, audio)
    flops = counter.get_total_flops()
    _sync(device)
    started = time.perf_counter()
    for _ in range(steps):
        step(model, video, audio)
    _sync(device)
    seconds = (time.perf_counter() - started) / steps
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    peak = next((v for k, v in PEAK_BF16_TFLOPS.items() if k in name), None)
    return {"device": name, "step_s": seconds, "tflops": flops / seconds / 1e12,
            "mfu": None if peak is None else flops / seconds / 1e12 / peak}


def check_memory(config: dict, device: torch.device, tokens: tuple[int, int, int]) -> dict:
    from experiments.presets import ltx2_av_lora

    results = {}
    for quantization in ("none", "fp8", "int8", "nf4"):
        if device.type == "cuda":
            torch.cuda.empty_cache()
        model = build_model(config, quantization=quantization, device=device, checkpointing=True)
        video, audio = random_inputs(model.config, video_tokens=tokens[0], audio_tokens=tokens[1],
                                     text_tokens=tokens[2], device=device)
        base = ltx2_av_lora()
        cfg = dataclasses.replace(base, model=dataclasses.replace(base.model, quantization=quantization))
        plan = plan_memory(cfg, config, Resolution(width=32, height=32, frames=1), tokens=tokens[:2],
                           text_tokens=tokens[2])
        predicted = plan.total - plan.components["CUDA context"] - plan.components["optimizer state"] \
            - plan.components["text connectors"]
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        step(model, video, audio)
        measured = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
        results[quantization] = {"predicted_gib": predicted / GIB,
                                 "measured_gib": None if measured is None else measured / GIB,
                                 "ratio": None if measured is None else predicted / measured}
        del model
    return results


def check_numerics(device: torch.device, shape: tuple[int, int]) -> dict:
    g = torch.Generator().manual_seed(0)
    weight = (torch.randn(*shape, generator=g) / shape[1] ** 0.5).bfloat16()
    x = torch.randn(256, shape[1], generator=g).bfloat16()
    reference = x.float() @ weight.float().T
    results = {}
    for kind in ("fp8", "int8", "nf4"):
        codes_cpu, scale_cpu = quantize_weight(weight, kind)
        codes, scale = quantize_weight(weight.to(device), kind)
        same = torch.equal(codes.cpu().view(torch.uint8), codes_cpu.view(torch.uint8)) and \
            torch.allclose(scale.cpu(), scale_cpu, rtol=1e-6, atol=0)
        out = (x.to(device) @ dequantize_weight(codes, scale, kind, torch.bfloat16).T).float().cpu()
        results[kind] = {"codes_match_cpu": bool(same), "snr_db": signal_to_noise_db(reference, out)}
    if device.type == "cuda" and torch.cuda.get_device_capability(device) >= (8, 9):
        from ltxf.quantization import QuantizedLinear

        layer = QuantizedLinear(shape[1], shape[0], kind="fp8", bias=False, device=device)
        codes, _ = quantize_weight(weight.to(device), "fp8")
        row_scale = weight.float().abs().amax(1, keepdim=True).to(device) / 448.0  # per-row: what scaled_mm takes
        layer.weight = (weight.to(device).float() / row_scale).to(torch.float8_e4m3fn)
        layer.weight_scale = row_scale.expand(-1, layer.weight_scale.shape[1]).contiguous()
        dequantized = layer(x.to(device)).float().cpu()
        enable_fp8_scaled_mm(layer)
        try:
            scaled = layer(x.to(device)).float().cpu()
            results["fp8_scaled_mm"] = {"snr_vs_dequantized_db": signal_to_noise_db(dequantized, scaled),
                                        "snr_vs_bf16_db": signal_to_noise_db(reference, scaled)}
        except RuntimeError as error:  # an unsupported layout / build: report, do not fail the other checks
            results["fp8_scaled_mm"] = {"error": str(error)[:200]}
    return results


def check_overlap(config: dict, device: torch.device, tokens: tuple[int, int, int], repeats: int) -> dict:
    """Copy one block's frozen weights host->device on a side stream while the block computes."""
    model = build_model(config, quantization="none", device=device, checkpointing=False)
    video, audio = random_inputs(model.config, video_tokens=tokens[0], audio_tokens=tokens[1], text_tokens=tokens[2],
                                 device=device)
    block = model.transformer_blocks[0]
    host = [t.detach().cpu().pin_memory() if device.type == "cuda" else t.detach().cpu()
            for t in block.state_dict().values()]
    dest = [torch.empty_like(t, device=device) for t in host]
    side = torch.cuda.Stream(device) if device.type == "cuda" else None

    def copy() -> None:
        with torch.cuda.stream(side) if side is not None else contextlib.nullcontext():
            for h, d in zip(host, dest, strict=True):
                d.copy_(h, non_blocking=True)

    def timed(fn) -> float:
        fn()
        _sync(device)
        started = time.perf_counter()
        for _ in range(repeats):
            fn()
        _sync(device)
        return (time.perf_counter() - started) / repeats

    compute_s = timed(lambda: step(model, video, audio))
    copy_s = timed(copy)
    both_s = timed(lambda: (copy(), step(model, video, audio)))
    hidden = (compute_s + copy_s - both_s) / copy_s if copy_s > 0 else 0.0
    num_bytes = sum(t.numel() * t.element_size() for t in host)
    result = {"block_gib": num_bytes / GIB, "copy_gbps": num_bytes / copy_s / 1e9, "compute_s": compute_s,
              "copy_s": copy_s, "together_s": both_s, "copy_hidden_fraction": hidden}

    # The trainer's own block swap (ltxf/block_swap.py), checkpointing on: step time resident vs last block swapped.
    from ltxf.block_swap import apply_block_swap

    times = {}
    for swapped in (0, 1):
        model = build_model(config, quantization="nf4", device=device, checkpointing=False)
        swap = apply_block_swap(model, swapped, device)
        if swap is None:
            model.to(device)
        apply_ac(model.transformer_blocks)
        times[swapped] = timed(lambda model=model: step(model, video, audio))
        if swap is not None:
            result["swap_copies_prefetched"] = [swap.copies, swap.prefetched]
    result["nf4_step_s_resident"], result["nf4_step_s_last_block_swapped"] = times[0], times[1]
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    parser.add_argument("--tiny", action="store_true", help="tiny model and sizes (smoke test, CPU)")
    parser.add_argument("--model-config", type=Path, default=DEFAULT_CONFIG)
    parser.add_argument("--blocks", type=int, default=2)
    parser.add_argument("--video-tokens", type=int, default=2688, help="768x512x49: 2688")
    parser.add_argument("--audio-tokens", type=int, default=49)
    parser.add_argument("--text-tokens", type=int, default=1024)
    parser.add_argument("--json-out", type=Path, default=None)
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("gpu_check: no CUDA device here; nothing was checked (run it on a GPU machine, or "
              "`--device cpu --tiny` for a smoke run)")
        return 0
    device = torch.device(args.device)
    config = read_model_config(model_config=args.model_config)
    section = {**config["transformer"], "num_layers": args.blocks}
    tokens = (args.video_tokens, args.audio_tokens, args.text_tokens)
    shape = (4096, 16384)
    if args.tiny:
        section.update(num_attention_heads=2, attention_head_dim=32, cross_attention_dim=64,
                       audio_num_attention_heads=2, audio_attention_head_dim=16, audio_cross_attention_dim=32,
                       connector_num_attention_heads=2, connector_attention_head_dim=32,
                       audio_connector_num_attention_heads=2, audio_connector_attention_head_dim=16)
        tokens, shape = (48, 8, 16), (64, 256)
    config = {**config, "transformer": section}
    started = time.perf_counter()
    report = {"blocks": args.blocks, "tokens": dict(zip(("video", "audio", "text"), tokens, strict=True))}
    report["mfu"] = check_mfu(config, device, tokens, steps=2 if args.tiny else 5)
    report["memory"] = check_memory(config, device, tokens)
    report["numerics"] = check_numerics(device, shape)
    report["overlap"] = check_overlap(config, device, tokens, repeats=2 if args.tiny else 5)
    report["seconds"] = time.perf_counter() - started
    print(json.dumps(report, indent=2))
    if args.json_out is not None:
        args.json_out.write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
