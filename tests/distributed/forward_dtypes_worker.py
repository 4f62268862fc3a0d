"""The dtypes of the forward inputs inside the model under FSDP2, run by tests/distributed/test_data_parallel.py
under ``torchrun --nproc_per_node 2`` (gloo, CPU).

``python forward_dtypes_worker.py CHECKPOINT OUT_DIR``: builds a full fine-tune of CHECKPOINT with
``ltxf.train.build_model`` (bf16 compute, FSDP2 over both ranks) and, as a control, the same transformer under
``fully_shard`` with FSDP2's default ``MixedPrecisionPolicy`` (which casts floating-point forward inputs to the
param dtype). A forward pre-hook registered after ``fully_shard`` (so it runs after FSDP's own) records the dtypes
of ``positions``, ``timesteps`` and ``sigma`` of both streams as the model receives them, then stops the forward.
Writes ``OUT_DIR/rank{R}.json``: ``{"ltxf": {...}, "default_policy": {...}}``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

from ltxf.config import ModelConfig, ParallelConfig, TrainConfig
from ltxf.models.transformer import Modality, build_transformer_on_meta
from ltxf.parallel import init_distributed, shutdown_distributed
from ltxf.train import RunPlan, build_data_parallel_mesh, build_model

FIELDS = ("positions", "timesteps", "sigma")


class _Seen(Exception):
    """Raised by the probe: the inputs were recorded, the forward need not run."""


def record_inputs(model: torch.nn.Module) -> dict[str, dict[str, str]]:
    seen: dict[str, dict[str, str]] = {}

    def probe(module, args, kwargs):
        for stream in ("video", "audio"):
            seen[stream] = {field: str(getattr(kwargs[stream], field).dtype) for field in FIELDS}
        raise _Seen

    handle = model.register_forward_pre_hook(probe, with_kwargs=True)
    config = model.config
    num_tokens, num_text = 4, 3

    def modality(channels: int, width: int, axes: int) -> Modality:
        return Modality(latent=torch.randn(1, num_tokens, channels), sigma=torch.full((1,), 0.5),
                        timesteps=torch.full((1, num_tokens), 0.5), positions=torch.rand(1, axes, num_tokens, 2),
                        context=torch.randn(1, num_text, width))

    try:
        model(video=modality(config.in_channels, config.inner_dim, 3),
              audio=modality(config.audio_in_channels, config.audio_inner_dim, 1))
    except _Seen:
        pass
    handle.remove()
    return seen


def main(checkpoint: Path, out_dir: Path) -> None:
    torch.set_num_threads(1)
    dist_info = init_distributed()
    cfg = TrainConfig(model=ModelConfig(checkpoint=checkpoint, training_mode="full", dtype="bfloat16"),
                      parallel=ParallelConfig(data_parallel="fsdp", activation_checkpointing=False))
    mesh = build_data_parallel_mesh(cfg, dist_info)
    plan = RunPlan(cfg=cfg, dist=dist_info, output_dir=out_dir, config_dict={}, compute_dtype=torch.bfloat16,
                   full=True, mesh=mesh)
    model = build_model(plan)
    transformer = model.transformer
    control = build_transformer_on_meta(checkpoint)
    fully_shard(control, mesh=mesh, mp_policy=MixedPrecisionPolicy(param_dtype=torch.bfloat16))
    control.to_empty(device="cpu")
    record = {"ltxf": record_inputs(transformer), "default_policy": record_inputs(control)}
    (out_dir / f"rank{dist_info.rank}.json").write_text(json.dumps(record))
    shutdown_distributed()


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]))
