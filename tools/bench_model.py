"""Benchmark ltxf's audio-video transformer against the reference (ltx-core) at the same config, weights and dtype.

Each implementation runs full fine-tuning steps (forward + backward, every parameter trainable, gradients freed
between steps) in its own fresh subprocess, so that neither pays for the other's allocations; the two are
interleaved over ``--rounds`` to even out load from other processes. Reported per implementation: the median
step time, the peak memory of the step, and on CUDA the model FLOPs utilisation.

Peak memory. CUDA: ``torch.cuda.max_memory_allocated()`` during the steps minus the memory allocated before
them (weights and inputs), i.e. the step's own peak (gradients + activations + temporaries). CPU: the growth of
the process's peak resident set (``VmHWM`` from /proc/self/status) during the steps over its resident set just
before them (weights made resident, inputs built), the same quantity as seen by the OS allocator.

ltx-core is the baseline; it is reached through ``tests/ltx_reference.py`` (the parity tests' oracle helpers) and
imported only by the worker that runs it (``pip install --no-deps ltx-core``).

Examples:
    python tools/bench_model.py --preset small
    python tools/bench_model.py --preset full-width --device cuda --dtype bfloat16 --steps 10
    python tools/bench_model.py --preset small --measure_load True   # also the host memory of checkpoint loading
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from ltxf.cli import parse_bool  # noqa: E402
from ltxf.models import checkpoint  # noqa: E402
from ltxf.models.transformer import (  # noqa: E402
    AVTransformer,
    Modality,
    TransformerConfig,
    load_transformer,
    save_transformer,
)

logger = logging.getLogger("bench_model")

# Dense bf16 peak of known accelerators, TFLOP/s, for MFU.
PEAK_TFLOPS = {"H100": 989.4, "H200": 989.4, "H800": 989.4, "A100": 312.0, "L40S": 362.0, "B200": 2250.0}


@dataclasses.dataclass(frozen=True, kw_only=True)
class Preset:
    config: TransformerConfig
    batch: int
    frames: int
    height: int
    width: int
    audio_tokens: int
    text_tokens: int
    dtype: str
    device: str


def _presets(version: str) -> dict[str, Preset]:
    switches = {"apply_gated_attention": True, "cross_attention_adaln": True} if version == "ltx-2.3" else {}
    tiny = TransformerConfig(version=version, num_layers=2, num_heads=2, head_dim=16, cross_attention_dim=32,
                             audio_num_heads=2, audio_head_dim=8, audio_cross_attention_dim=16, caption_channels=24,
                             **switches)
    small = TransformerConfig(version=version, num_layers=4, num_heads=8, head_dim=64, cross_attention_dim=512,
                              audio_num_heads=8, audio_head_dim=32, audio_cross_attention_dim=256,
                              caption_channels=512, **switches)
    full = TransformerConfig(version=version, num_layers=4, **switches)
    return {
        "tiny": Preset(config=tiny, batch=2, frames=3, height=4, width=6, audio_tokens=10, text_tokens=16,
                       dtype="float32", device="cpu"),
        "small": Preset(config=small, batch=1, frames=8, height=16, width=16, audio_tokens=50, text_tokens=128,
                        dtype="float32", device="cpu"),
        # 121 frames at 512 x 768 with 4.84 s of audio and 1024 text tokens, at the real widths.
        "full-width": Preset(config=full, batch=1, frames=16, height=16, width=24, audio_tokens=121,
                             text_tokens=1024, dtype="bfloat16", device="cuda"),
    }


# -------------------------------------------------------------------------------------------------------------
# Worker (one implementation, one fresh process)


def _positions(spec: dict, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Video [B, 3, T, 2] (seconds, pixels, pixels) and audio [B, 1, Ta, 2] (seconds) [start, end) bounds."""
    b, f, h, w, fps = spec["batch"], spec["frames"], spec["height"], spec["width"], 25.0
    k = torch.arange(f, dtype=torch.float32)
    t_bounds = torch.stack([(8 * k - 7).clamp(min=0), 8 * k + 1], -1) / fps
    i, j = torch.arange(h, dtype=torch.float32), torch.arange(w, dtype=torch.float32)
    h_bounds, w_bounds = torch.stack([32 * i, 32 * i + 32], -1), torch.stack([32 * j, 32 * j + 32], -1)
    grid = [g.reshape(-1, 2) for g in (t_bounds[:, None, None].expand(f, h, w, 2),
                                        h_bounds[None, :, None].expand(f, h, w, 2),
                                        w_bounds[None, None, :].expand(f, h, w, 2))]
    video = torch.stack(grid, 0)[None].expand(b, -1, -1, -1).contiguous()
    a = torch.arange(spec["audio_tokens"], dtype=torch.float32)
    audio = (torch.stack([(4 * a - 3).clamp(min=0), 4 * a + 1], -1) * 0.01)[None, None].expand(b, 1, -1, -1)
    return video.to(device), audio.contiguous().to(device)


def _inputs(spec: dict, config: TransformerConfig, device: torch.device, dtype: torch.dtype) -> dict:
    g = torch.Generator().manual_seed(spec["seed"])
    b, num_video = spec["batch"], spec["frames"] * spec["height"] * spec["width"]
    per_frame = spec["height"] * spec["width"]
    sigma = torch.rand(b, generator=g)
    # First-frame conditioning: clean tokens with timestep 0, the rest at sigma (the trainer's common case).
    timesteps = sigma[:, None].expand(b, num_video).clone()
    timesteps[:, :per_frame] = 0.0
    ctx_v = config.caption_channels if config.has_caption_projection else config.inner_dim
    ctx_a = config.caption_channels if config.has_caption_projection else config.audio_inner_dim
    vpos, apos = _positions(spec, device)
    tensors = {
        "video": dict(latent=torch.randn(b, num_video, config.in_channels, generator=g), sigma=sigma,
                      timesteps=timesteps, positions=vpos,
                      context=torch.randn(b, spec["text_tokens"], ctx_v, generator=g)),
        "audio": dict(latent=torch.randn(b, spec["audio_tokens"], config.audio_in_channels, generator=g),
                      sigma=sigma, timesteps=sigma[:, None].expand(b, spec["audio_tokens"]).clone(), positions=apos,
                      context=torch.randn(b, spec["text_tokens"], ctx_a, generator=g)),
        "targets": (torch.randn(b, num_video, config.out_channels, generator=g),
                    torch.randn(b, spec["audio_tokens"], config.audio_out_channels, generator=g)),
    }
    for stream in ("video", "audio"):
        for key, value in tensors[stream].items():
            if key in ("latent", "context"):
                value = value.to(dtype)
            tensors[stream][key] = value.to(device)
    tensors["targets"] = tuple(t.to(device=device, dtype=dtype) for t in tensors["targets"])
    return tensors


def _status_mib() -> dict[str, float]:
    with open("/proc/self/status") as f:
        return {line.split(":")[0]: int(line.split()[1]) / 1024 for line in f if line.startswith(("VmRSS", "VmHWM"))}


def _build(impl: str, spec: dict, config: TransformerConfig, dtype: torch.dtype, device: torch.device):
    """The model and a ``step(inputs) -> (loss, video_out, audio_out)`` closure."""
    path = Path(spec["checkpoint"])
    if impl == "ltxf":
        model = load_transformer(path, dtype=dtype, device=device)

        def run(inputs):
            return model(video=Modality(**inputs["video"]), audio=Modality(**inputs["audio"]))
    else:
        try:
            # The reference (ltx-core) is reached only through the test suite's oracle helpers.
            from tests.ltx_reference import build_reference_transformer
        except ImportError as exc:
            raise SystemExit(f"the reference baseline needs ltx-core installed (pip install --no-deps "
                             f"ltx-core==1.0.0 einops scipy): {exc}") from exc
        state = checkpoint.read_tensors(path, checkpoint.strip_prefix(checkpoint.TRANSFORMER_PREFIX), dtype=dtype,
                                        device=device)
        model, run = build_reference_transformer({"transformer": config.to_checkpoint_config()}, state,
                                                 batch_size=spec["batch"])
    model.train()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0)  # make every weight resident (weights load lazily from the mapped file)

    def step(inputs):
        model.zero_grad(set_to_none=True)
        video_out, audio_out = run(inputs)
        target_v, target_a = inputs["targets"]
        loss = torch.nn.functional.mse_loss(video_out.float(), target_v.float()) + \
            torch.nn.functional.mse_loss(audio_out.float(), target_a.float())
        loss.backward()
        return loss, video_out.detach(), audio_out.detach()

    return model, step


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _allocator_peak_mib(step, inputs) -> float:
    """Peak of live torch allocations during one step, minus what was live before it, from the profiler's memory
    timeline (independent of how the C allocator returns memory to the OS)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=True, with_stack=True) as prof:
        step(inputs)
    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
        # export_memory_timeline is marked deprecated in favour of a CUDA-only API; it is the CPU one we have.
        warnings.simplefilter("ignore", FutureWarning)
        path = Path(tmp) / "timeline.json"
        prof.export_memory_timeline(str(path), device="cpu")
        _, sizes = json.loads(path.read_text())
    totals = [sum(s) for s in sizes]
    return (max(totals) - totals[0]) / 2**20


def worker(spec: dict) -> dict:
    device, dtype = torch.device(spec["device"]), getattr(torch, spec["dtype"])
    if spec["threads"]:
        torch.set_num_threads(spec["threads"])
    config = TransformerConfig(**{**spec["config"], "positional_embedding_max_pos": tuple(
        spec["config"]["positional_embedding_max_pos"]), "audio_positional_embedding_max_pos": tuple(
        spec["config"]["audio_positional_embedding_max_pos"])})
    torch.manual_seed(0)
    model, step = _build(spec["impl"], spec, config, dtype, device)
    inputs = _inputs(spec, config, device, dtype)

    _sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        base_mem = torch.cuda.memory_allocated(device)
    else:
        base_mem = _status_mib()["VmRSS"]
    times = []
    first = None
    for i in range(spec["warmup"] + spec["steps"]):
        _sync(device)
        start = time.perf_counter()
        loss, video_out, audio_out = step(inputs)
        _sync(device)
        if i >= spec["warmup"]:
            times.append(time.perf_counter() - start)
        if first is None:
            first = (float(loss), video_out.float().cpu(), audio_out.float().cpu())
    if device.type == "cuda":
        peak_mib = (torch.cuda.max_memory_allocated(device) - base_mem) / 2**20
    else:
        peak_mib = _status_mib()["VmHWM"] - base_mem
    torch.save({"video": first[1], "audio": first[2]}, spec["outputs"])
    allocator_mib = _allocator_peak_mib(step, inputs) if spec["allocator_peak"] and device.type == "cpu" else None

    flops = None
    if spec["count_flops"]:
        from torch.utils.flop_counter import FlopCounterMode

        counter = FlopCounterMode(display=False)
        with counter:
            step(inputs)
        flops = counter.get_total_flops()
    return {"impl": spec["impl"], "median_s": statistics.median(times), "times_s": times, "peak_mib": peak_mib,
            "allocator_mib": allocator_mib, "loss": first[0], "flops": flops,
            "params": sum(p.numel() for p in model.parameters())}


# -------------------------------------------------------------------------------------------------------------
# Driver


def _run_worker(spec: dict) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker_spec", json.dumps(spec)]
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    if out.returncode != 0:
        raise SystemExit(f"{spec['impl']} worker failed:\n{out.stdout}\n{out.stderr}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def _peak_tflops(device: str, override: float | None) -> float | None:
    if override:
        return override
    if not device.startswith("cuda") or not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name(torch.device(device))
    return next((v for k, v in PEAK_TFLOPS.items() if k in name), None)


def _measure_load(path: Path, dtype: str) -> tuple[float, float]:
    code = (
        "import sys, torch\n"
        f"sys.path.insert(0, {str(ROOT)!r})\n"
        "from ltxf.models import checkpoint\n"
        "from ltxf.models.transformer import AVTransformer, TransformerConfig, load_transformer\n"
        "def status():\n"
        "    with open('/proc/self/status') as f:\n"
        "        return {l.split(':')[0]: int(l.split()[1]) / 1024 for l in f if l.startswith(('VmRSS', 'VmHWM'))}\n"
        f"path = {str(path)!r}\n"
        "cfg = TransformerConfig.from_checkpoint_config(checkpoint.read_config(path)['transformer'])\n"
        "with torch.device('meta'):\n    AVTransformer(cfg)\n"
        "checkpoint.read_tensors(path, lambda k: None)\n"
        "before = status()['VmRSS']\n"
        f"model = load_transformer(path, dtype=torch.{dtype})\n"
        "with torch.no_grad():\n    [p.sum() for p in model.parameters()]\n"
        "size = sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20\n"
        "print(status()['VmHWM'] - before, size)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    growth, size = map(float, out.stdout.split())
    return growth, size


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=["tiny", "small", "full-width"], default="small")
    parser.add_argument("--version", choices=["ltx-2", "ltx-2.3"], default="ltx-2.3")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default=None,
                        help="default: float32 for tiny/small, bfloat16 for full-width")
    parser.add_argument("--device", default=None, help="default: cpu for tiny/small, cuda for full-width")
    parser.add_argument("--steps", type=int, default=5, help="timed steps per round")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps before the timed ones")
    parser.add_argument("--rounds", type=int, default=2, help="interleaved (reference, ltxf) process pairs")
    parser.add_argument("--num_layers", type=int, default=None, help="override the preset's block count")
    parser.add_argument("--frames", type=int, default=None, help="override the preset's latent frames")
    parser.add_argument("--impl", choices=["both", "ltxf", "reference"], default="both")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads per worker (default: torch's choice); 1 is steadier on a busy host")
    parser.add_argument("--peak_tflops", type=float, default=None, help="device peak for MFU (default: by name)")
    parser.add_argument("--measure_load", type=parse_bool, default=False, metavar="{True,False}",
                        help="also measure peak host memory of load_transformer (same dtype and float32 from bf16)")
    parser.add_argument("--allocator_peak", type=parse_bool, default=True, metavar="{True,False}",
                        help="on CPU, also measure the torch allocator peak of one extra profiled step")
    parser.add_argument("--worker_spec", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.worker_spec is not None:
        print(json.dumps(worker(json.loads(args.worker_spec))))
        return
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    preset = _presets(args.version)[args.preset]
    config = preset.config if args.num_layers is None else dataclasses.replace(preset.config,
                                                                               num_layers=args.num_layers)
    dtype = args.dtype or preset.dtype
    device = args.device or preset.device
    frames = args.frames or preset.frames
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit(f"--device {device} requested but CUDA is not available (use --device cpu)")
    num_video = frames * preset.height * preset.width

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        with torch.device("meta"):
            model = AVTransformer(config)
        model = model.to_empty(device="cpu")
        generator = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name.endswith("norm.weight"):
                    p.fill_(1.0)
                else:
                    p.copy_(torch.randn(p.shape, generator=generator) * 0.02)
        ckpt = save_transformer(model.to(getattr(torch, dtype)), tmp / "weights.safetensors",
                                {"transformer": config.to_checkpoint_config()})
        num_params = sum(p.numel() for p in model.parameters())
        del model

        base = {
            "config": dataclasses.asdict(config), "checkpoint": str(ckpt), "batch": preset.batch, "frames": frames,
            "height": preset.height, "width": preset.width, "audio_tokens": preset.audio_tokens,
            "text_tokens": preset.text_tokens, "dtype": dtype, "device": device, "steps": args.steps,
            "warmup": args.warmup, "seed": 0, "threads": args.threads,
            "allocator_peak": args.allocator_peak,
        }
        impls = ["reference", "ltxf"] if args.impl == "both" else [args.impl]
        results: dict[str, list[dict]] = {impl: [] for impl in impls}
        for r in range(args.rounds):
            for impl in impls:
                spec = dict(base, impl=impl, outputs=str(tmp / f"{impl}.pt"),
                            count_flops=device.startswith("cuda") and r == 0)
                results[impl].append(_run_worker(spec))
                logger.info("round %d %-9s median %.1f ms  peak %.0f MiB", r + 1, impl,
                            1e3 * results[impl][-1]["median_s"], results[impl][-1]["peak_mib"])

        logger.info("")
        logger.info("preset=%s version=%s dtype=%s device=%s: %d blocks, video %dx%d, audio %dx%d, %.1fM params; "
                    "B=%d, %d video tokens (first frame clean), %d audio tokens, %d text tokens; %d rounds x %d steps; "
                    "%s CPU threads",
                    args.preset, args.version, dtype, device, config.num_layers, config.num_heads, config.head_dim,
                    config.audio_num_heads, config.audio_head_dim, num_params / 1e6, preset.batch, num_video,
                    preset.audio_tokens, preset.text_tokens, args.rounds, args.steps,
                    args.threads or torch.get_num_threads())
        if device.startswith("cuda"):
            logger.info("memory: torch.cuda.max_memory_allocated over the steps minus the allocation before them")
        else:
            logger.info("memory: 'peak' = growth of the peak RSS (VmHWM) during the steps over the RSS before them, "
                        "in a fresh process per run (includes C-allocator fragmentation); 'allocator' = peak of live "
                        "torch allocations in one profiled step minus those live before it (profiler memory "
                        "timeline)")
        summary = {}
        peak = _peak_tflops(device, args.peak_tflops)
        for impl in impls:
            median = statistics.median(t for res in results[impl] for t in res["times_s"])
            memory = statistics.median(res["peak_mib"] for res in results[impl])
            allocator = results[impl][0]["allocator_mib"]
            summary[impl] = (median, memory, allocator)
            line = f"  {impl:<9} fwd+bwd {1e3 * median:9.1f} ms   peak {memory:9.1f} MiB"
            if allocator is not None:
                line += f"   allocator {allocator:9.1f} MiB"
            flops = results[impl][0]["flops"]
            if flops:
                line += f"   {flops / 1e12:.2f} TFLOP/step"
                if peak:
                    line += f"   MFU {100 * flops / median / (peak * 1e12):.1f}% (peak {peak:g} TFLOP/s)"
            logger.info(line)
        if len(impls) == 2:
            outputs = {impl: torch.load(tmp / f"{impl}.pt") for impl in impls}
            diff = max((outputs["ltxf"][k] - outputs["reference"][k]).abs().max().item()
                       / outputs["reference"][k].abs().max().item() for k in ("video", "audio"))
            (t_ref, m_ref, a_ref), (t_ours, m_ours, a_ours) = summary["reference"], summary["ltxf"]
            allocator_ratio = f"   allocator peak {a_ours / a_ref:.3f}" if a_ref and a_ours else ""
            logger.info("ratios (ltxf/reference): time %.3f   peak memory %.3f%s   "
                        "(max |output diff| / max |output| %.1e)",
                        t_ours / t_ref, m_ours / m_ref if m_ref > 0 else math.nan, allocator_ratio, diff)

        if args.measure_load:
            for file_dtype, load_dtype in ((dtype, dtype), ("bfloat16", "float32")):
                path = ckpt
                if file_dtype != dtype:
                    reloaded = load_transformer(ckpt, dtype=getattr(torch, file_dtype))
                    path = save_transformer(reloaded, tmp / f"{file_dtype}.safetensors",
                                            {"transformer": config.to_checkpoint_config()})
                    del reloaded
                growth, size = _measure_load(path, load_dtype)
                logger.info("load_transformer %s file -> %s: peak RSS growth %.0f MiB for %.0f MiB of weights "
                            "(%.2fx)", file_dtype, load_dtype, growth, size, growth / size)


if __name__ == "__main__":
    main()
