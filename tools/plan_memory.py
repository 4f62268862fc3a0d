"""Plan the device memory of a training run before starting it: no weights are read, no device is needed.

    python tools/plan_memory.py PRESET [train.py flags] --resolution WxHxF [--gpu-memory-gib G] [--json]
        [--model-config FILE] [--fps 25] [--num-processes N]

The model config comes from ``--model.checkpoint``'s header or from ``--model-config`` (e.g. the published
``ltx-2.3-22b-config.json``). Prints the components (see ``ltxf/memory_plan.py``), whether the total fits
``--gpu-memory-gib`` (default 24), and, when it does not, the cheapest flags that make it fit. ``--json`` prints
``{"total_gib": ..., "components": {name: gib}, "fits": ...}`` (plus the token counts and settings).

Example:
    python tools/plan_memory.py ltx2_av_lora_24gb --model-config ../shared/reference/configs/ltx-2.3-22b-config.json \\
        --resolution 768x512x49
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from ltxf.memory_plan import (  # noqa: E402
    GIB,
    Resolution,
    describe_changes,
    plan_memory,
    read_model_config,
    suggest_settings,
)
from train import parse_config  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                     add_help=False)
    parser.add_argument("--resolution", required=True, help="WxHxF in pixels and frames, e.g. 768x512x49")
    parser.add_argument("--gpu-memory-gib", type=float, default=24.0)
    parser.add_argument("--model-config", type=Path, default=None)
    parser.add_argument("--fps", type=float, default=25.0)
    parser.add_argument("--num-processes", type=int, default=1, help="processes (GPUs) of the run; FSDP divides by it")
    parser.add_argument("--json", action="store_true")
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__)
        return 0
    args, train_args = parser.parse_known_args(argv)
    cfg = parse_config(train_args)
    config = read_model_config(checkpoint=cfg.model.checkpoint, model_config=args.model_config)
    resolution = Resolution.parse(args.resolution)
    if args.num_processes < 1:
        raise ValueError(f"--num-processes must be >= 1, got {args.num_processes}")
    plan = plan_memory(cfg, config, resolution, fps=args.fps, num_processes=args.num_processes)
    fits = plan.fits(args.gpu_memory_gib)
    suggestion = None if fits else suggest_settings(cfg, config, resolution, args.gpu_memory_gib, fps=args.fps)
    if args.json:
        out = plan.to_json(args.gpu_memory_gib)
        if suggestion is not None:
            out["suggestion"] = {"flags": describe_changes(cfg, suggestion[0]),
                                 "total_gib": round(suggestion[1].total / GIB, 3)}
        print(json.dumps(out, indent=2))
        return 0
    s = plan.settings
    print(f"{resolution.width}x{resolution.height}x{resolution.frames}: {plan.video_tokens} video tokens, "
          f"{plan.audio_tokens} audio tokens, {plan.text_tokens} text tokens, batch {s['batch_size']}; "
          f"{s['training_mode']} (rank {s['lora_rank']}), base {s['quantization']}, {s['optimizer']}, "
          f"checkpointing {s['activation_checkpointing_blocks']} blocks, blocks_to_swap {s['blocks_to_swap']}")
    print(plan.table())
    print(f"{'fits' if fits else 'does NOT fit'} in {args.gpu_memory_gib:g} GiB")
    if not fits:
        if suggestion is None:
            print("no combination of checkpointing, 8-bit AdamW, quantization and block swap fits; lower the "
                  "resolution or the LoRA rank")
        else:
            print(f"cheapest settings that fit ({suggestion[1].total / GIB:.2f} GiB): "
                  + " ".join(describe_changes(cfg, suggestion[0])))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
