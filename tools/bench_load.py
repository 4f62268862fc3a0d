"""Benchmark the host memory of loading a full fine-tune: 1 process vs N processes (create on meta, shard, load).

Writes a random official-layout fp32 checkpoint (the benchmarks' random writer) of the chosen size, then loads it
with ``ltxf.train.build_model`` for a full fine-tune, in one plain process (no mesh: the plain model filled
tensor by tensor) and under ``torchrun --nproc_per_node N`` (FSDP2: each rank allocates its shards and reads only
its rows). Each process resets its RSS high-water mark just before loading (``/proc/self/clear_refs``, after one
throw-away build on meta that loads torch's meta kernels) and reports the peak above that baseline and the bytes
of the parameters it holds. Also prints, counted on the meta device, what a rank holds for the real LTX-2.3
transformer (fp32 master weights) at 1, N and 8 processes.

Examples:
    python tools/bench_load.py                       # about 350 MB, 1 vs 2 processes
    python tools/bench_load.py --layers 12 --nproc 4 --json /tmp/load.json
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
from dataclasses import replace
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from ltxf.demo import demo_checkpoint_config, demo_transformer_config, write_random_checkpoint  # noqa: E402

MIB = 1024 * 1024


def write_checkpoint(path: Path, *, num_layers: int, num_heads: int) -> Path:
    """A random fp32 checkpoint: ``num_layers`` blocks, video width ``num_heads`` x 64, audio width 256."""
    widths = replace(demo_transformer_config(), num_layers=num_layers, num_heads=num_heads, head_dim=64,
                     cross_attention_dim=num_heads * 64, audio_num_heads=8, audio_head_dim=32,
                     audio_cross_attention_dim=256)
    config = demo_checkpoint_config()
    section = dict(config["transformer"], **widths.to_checkpoint_config())
    section.update(connector_num_attention_heads=num_heads, connector_attention_head_dim=64,
                   audio_connector_num_attention_heads=8, audio_connector_attention_head_dim=32)
    return write_random_checkpoint(path, {**config, "transformer": section}, seed=0)


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def worker(checkpoint: Path, out_dir: Path) -> None:
    """One process of a measurement: writes ``out_dir/rank{R}.json``."""
    from torch.distributed.tensor import DTensor

    from ltxf.config import ModelConfig, ParallelConfig, TrainConfig
    from ltxf.models.text import build_embeddings_processor_on_meta
    from ltxf.models.transformer import build_transformer_on_meta
    from ltxf.parallel import init_distributed, shutdown_distributed
    from ltxf.train import RunPlan, build_data_parallel_mesh, build_model

    torch.set_num_threads(1)
    dist_info = init_distributed()
    cfg = TrainConfig(model=ModelConfig(checkpoint=checkpoint, training_mode="full", dtype="bfloat16"),
                      parallel=ParallelConfig(data_parallel="auto", activation_checkpointing=True))
    mesh = build_data_parallel_mesh(cfg, dist_info)
    # Building on meta the first time loads torch's meta kernels (about 30 MB once per process, whatever the
    # model size): do it before the baseline so the peak measures the loading alone.
    build_embeddings_processor_on_meta(checkpoint, with_feature_extractor=False)
    build_transformer_on_meta(checkpoint)
    Path("/proc/self/clear_refs").write_text("5")  # the high-water mark restarts from the current RSS
    baseline = _status_kib("VmRSS")
    plan = RunPlan(cfg=cfg, dist=dist_info, output_dir=out_dir, config_dict={}, compute_dtype=torch.bfloat16,
                   full=True, mesh=mesh)
    model = build_model(plan)
    peak = _status_kib("VmHWM")
    held = 0
    for module in (model.transformer, model.text_processor):
        for p in module.parameters():
            local = p.to_local() if isinstance(p, DTensor) else p
            held += local.numel() * local.element_size()
    record = {"rank": dist_info.rank, "world_size": dist_info.world_size, "peak_bytes": (peak - baseline) * 1024,
              "held_bytes": held, "sharded": mesh is not None,
              "num_parameters": sum(p.numel() for p in model.transformer.parameters())}
    (out_dir / f"rank{dist_info.rank}.json").write_text(json.dumps(record))
    shutdown_distributed()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def measure(checkpoint: Path, out_dir: Path, nproc: int) -> list[dict]:
    """Load ``checkpoint`` in ``nproc`` processes (1: a plain process; more: torchrun, gloo); per-rank records."""
    out_dir.mkdir(parents=True)
    script = [str(Path(__file__).resolve()), "--worker", str(checkpoint), str(out_dir)]
    if nproc > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_addr",
               "127.0.0.1", "--master_port", str(_free_port()), *script]
    else:
        cmd = [sys.executable, *script]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stdout[-3000:]}{proc.stderr[-3000:]}")
    return [json.loads((out_dir / f"rank{rank}.json").read_text()) for rank in range(nproc)]


def real_width_per_rank(nprocs: list[int]) -> list[str]:
    """What a rank holds for the real LTX-2.3 transformer in fp32, counted on the meta device."""
    from ltxf.models.transformer import AVTransformer, TransformerConfig

    config = TransformerConfig(version="ltx-2.3", caption_channels=None, apply_gated_attention=True,
                               cross_attention_adaln=True)
    with torch.device("meta"):
        model = AVTransformer(config)
    sizes = [p.numel() * 4 for p in model.parameters()]
    total, largest = sum(sizes), max(sizes)
    lines = [f"real LTX-2.3 transformer: {sum(p.numel() for p in model.parameters()) / 1e9:.2f} B parameters, "
             f"{total / 2**30:.1f} GiB in fp32, largest tensor {largest / MIB:.0f} MiB"]
    for n in nprocs:
        lines.append(f"  {n} process(es): each holds {total / n / 2**30:.1f} GiB (+ one tensor's rows in flight)")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--heads", type=int, default=12, help="video heads of 64 channels (width = 64 x heads)")
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("--json", type=Path, help="also write the per-rank records here")
    parser.add_argument("--worker", nargs=2, type=Path, metavar=("CHECKPOINT", "OUT_DIR"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(*args.worker)
        return
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = write_checkpoint(Path(tmp) / "model.safetensors", num_layers=args.layers,
                                      num_heads=args.heads)
        size = checkpoint.stat().st_size
        one = measure(checkpoint, Path(tmp) / "one", 1)
        many = measure(checkpoint, Path(tmp) / "many", args.nproc)
    print(f"checkpoint: {size / MIB:.0f} MiB fp32, {one[0]['num_parameters'] / 1e6:.1f} M transformer parameters")
    print("processes  rank  peak above baseline (MiB)  held (MiB)  peak / 1-process peak")
    for record in one + many:
        print(f"{record['world_size']:>9}  {record['rank']:>4}  {record['peak_bytes'] / MIB:>25.1f}  "
              f"{record['held_bytes'] / MIB:>10.1f}  {record['peak_bytes'] / one[0]['peak_bytes']:>21.2f}")
    print(f"1-process peak / its held weights: {one[0]['peak_bytes'] / one[0]['held_bytes']:.2f}")
    for line in real_width_per_rank(sorted({1, args.nproc, 8})):
        print(line)
    if args.json:
        args.json.write_text(json.dumps({"checkpoint_bytes": size, "one": one, "many": many}))


if __name__ == "__main__":
    main()
