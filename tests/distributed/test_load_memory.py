"""Create on meta, shard, then load: the host memory of loading a full fine-tune, 1 process vs 2 (real torchrun).

A random official-layout checkpoint of about 300 MB (fp32; 6 blocks of width 768, the benchmarks' random
writer) is loaded by ``ltxf.train.build_model`` for a full fine-tune in one plain process (no mesh: the plain
model, built on meta and filled tensor by tensor) and on 2 processes (FSDP2: each rank allocates its shards only
and keeps one full tensor at a time). Each process measures its RSS high-water mark after resetting it just
before loading (tests/distributed/load_memory_worker.py).

Bounds: the 1-process peak stays within 1.1 x its held weights + 32 MiB (one copy of the weights, plus the
largest tensor in flight and allocator slack); each of the 2 ranks peaks at most 0.6 x the 1-process peak (they
hold half the weights each; a design that loaded the whole model before sharding would peak near 1.0 x).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

from ltxf.demo import demo_checkpoint_config, demo_transformer_config, write_random_checkpoint

REPO = Path(__file__).resolve().parents[2]
WORKER = Path(__file__).with_name("load_memory_worker.py")
MIB = 1024 * 1024


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def write_large_checkpoint(path: Path) -> Path:
    """About 300 MB of fp32 weights: 6 blocks, video width 768 (12 heads x 64), audio width 256."""
    widths = replace(demo_transformer_config(), num_layers=6, num_heads=12, head_dim=64, cross_attention_dim=768,
                     audio_num_heads=8, audio_head_dim=32, audio_cross_attention_dim=256)
    config = demo_checkpoint_config()
    section = dict(config["transformer"], **widths.to_checkpoint_config())
    section.update(connector_num_attention_heads=12, connector_attention_head_dim=64,
                   audio_connector_num_attention_heads=8, audio_connector_attention_head_dim=32)
    return write_random_checkpoint(path, {**config, "transformer": section}, seed=0)


def _load(checkpoint: Path, out_dir: Path, nproc: int) -> list[dict]:
    out_dir.mkdir()
    if nproc > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_addr",
               "127.0.0.1", "--master_port", str(_free_port()), str(WORKER), str(checkpoint), str(out_dir)]
    else:
        cmd = [sys.executable, str(WORKER), str(checkpoint), str(out_dir)]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    return [json.loads((out_dir / f"rank{rank}.json").read_text()) for rank in range(nproc)]


def test_two_ranks_load_at_most_0_6_of_one(tmp_path):
    checkpoint = write_large_checkpoint(tmp_path / "model.safetensors")
    assert checkpoint.stat().st_size > 250 * MIB
    (one,) = _load(checkpoint, tmp_path / "one", 1)
    two = _load(checkpoint, tmp_path / "two", 2)

    one_peak = (one["peak_kib"] - one["baseline_kib"]) * 1024
    assert not one["sharded"] and all(r["sharded"] for r in two)
    # The plain path holds one fp32 copy of the transformer (plus the bf16 connectors) ...
    assert one["held_bytes"] > 0.9 * checkpoint.stat().st_size * (one["num_parameters"] * 4) / (
        one["num_parameters"] * 4 + 0.05 * checkpoint.stat().st_size)
    # ... and peaks close to it: one copy, not two.
    assert one_peak <= 1.1 * one["held_bytes"] + 32 * MIB, (one_peak / MIB, one["held_bytes"] / MIB)
    for rank in two:
        rank_peak = (rank["peak_kib"] - rank["baseline_kib"]) * 1024
        assert rank["held_bytes"] < 0.55 * one["held_bytes"]
        assert rank_peak <= 0.6 * one_peak, (rank["rank"], rank_peak / MIB, one_peak / MIB)
