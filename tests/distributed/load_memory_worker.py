"""Host memory of loading a full fine-tune, run by tests/distributed/test_load_memory.py as one plain process or
under ``torchrun --nproc_per_node 2`` (gloo, CPU).

``python load_memory_worker.py CHECKPOINT OUT_DIR``: after the imports and one throw-away build on meta (which
loads torch's meta kernels), the process resets its RSS high-water mark (``/proc/self/clear_refs`` 5) and records
its RSS as the baseline, then runs ``ltxf.train.build_model`` for a full
fine-tune of CHECKPOINT (the pipeline of training: meta build -> AC -> FSDP2 on the mesh of the run -> block-by-
block load). It writes ``OUT_DIR/rank{R}.json`` with the baseline, the high-water mark after loading (``VmHWM``),
the bytes of the parameters it holds (its shards under FSDP2) and the number of parameters of the model.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from torch.distributed.tensor import DTensor

from ltxf.config import ModelConfig, ParallelConfig, TrainConfig
from ltxf.models.text import build_embeddings_processor_on_meta
from ltxf.models.transformer import build_transformer_on_meta
from ltxf.parallel import init_distributed, shutdown_distributed
from ltxf.train import RunPlan, build_data_parallel_mesh, build_model


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def main(checkpoint: Path, out_dir: Path) -> None:
    torch.set_num_threads(1)
    dist_info = init_distributed()
    cfg = TrainConfig(model=ModelConfig(checkpoint=checkpoint, training_mode="full", dtype="bfloat16"),
                      parallel=ParallelConfig(data_parallel="auto", activation_checkpointing=True))
    mesh = build_data_parallel_mesh(cfg, dist_info)
    # Building on meta the first time loads torch's meta kernels (about 30 MB, once per process, whatever the
    # model size): do it before the baseline so the peak measures the loading alone.
    build_embeddings_processor_on_meta(checkpoint, with_feature_extractor=False)
    build_transformer_on_meta(checkpoint)
    # Reset the high-water mark to the current RSS: the peak measured below is the loading's alone.
    Path("/proc/self/clear_refs").write_text("5")
    baseline = _status_kib("VmRSS")
    plan = RunPlan(cfg=cfg, dist=dist_info, output_dir=out_dir, config_dict={}, compute_dtype=torch.bfloat16,
                   full=True, mesh=mesh)
    model = build_model(plan)
    transformer, text_processor = model.transformer, model.text_processor
    peak = _status_kib("VmHWM")
    held = 0
    for module in (transformer, text_processor):
        for p in module.parameters():
            local = p.to_local() if isinstance(p, DTensor) else p
            held += local.numel() * local.element_size()
    record = {"rank": dist_info.rank, "world_size": dist_info.world_size, "baseline_kib": baseline,
              "peak_kib": peak, "held_bytes": held, "sharded": mesh is not None,
              "num_parameters": sum(p.numel() for p in transformer.parameters())}
    (out_dir / f"rank{dist_info.rank}.json").write_text(json.dumps(record))
    shutdown_distributed()


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]))
