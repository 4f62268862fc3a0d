"""Per-sample gradient norms of the LoRA adapters with ``torch.func.vmap(torch.func.grad(...))``.

``loss_fn(params, batch, key, ctx)`` is ``loss_from_inputs(params, model_inputs(params, batch, key, ctx), ctx)``.
The first part draws noise from per-sample ``torch.Generator`` s (which vmap cannot batch), so the inputs are
drawn once for the whole batch, then the gradient of the model-and-loss part is vmapped over the samples.
Run: ``python -m experiments.per_sample_grads`` (CPU, the demo's tiny model and data).
"""

from __future__ import annotations

import dataclasses
import sys
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from experiments.presets import demo
from ltxf.config import TrainConfig
from ltxf.data import collate
from ltxf.demo import prepare_demo
from ltxf.parallel import init_distributed
from ltxf.rng import sample_keys
from ltxf.step import StepContext, loss_from_inputs, model_inputs
from ltxf.strategies.base import ModelInputs
from ltxf.strategies.registry import build_strategy
from ltxf.train import build_data, build_model, build_optimizer, build_trainables, plan_run


def split_batch(obj: Any, batch_size: int, prefix: str = "") -> tuple[dict[str, torch.Tensor], Callable]:
    """The per-sample tensors of a (nested) dataclass as a flat dict (what vmap maps over), and a function that
    rebuilds the dataclass from such a dict (non-tensor fields and batch-shared tensors are kept as they are)."""
    if isinstance(obj, torch.Tensor) and obj.shape[:1] == (batch_size,):
        return {prefix: obj}, lambda flat: flat[prefix]
    if not dataclasses.is_dataclass(obj):
        return {}, lambda flat: obj
    parts = {f.name: split_batch(getattr(obj, f.name), batch_size, f"{prefix}.{f.name}")
             for f in dataclasses.fields(obj)}
    flat = {k: v for tensors, _ in parts.values() for k, v in tensors.items()}
    return flat, lambda values: dataclasses.replace(obj, **{n: rebuild(values) for n, (_, rebuild) in parts.items()})


def per_sample_grad_norms(params: dict[str, torch.Tensor], inputs: ModelInputs, ctx: StepContext) -> torch.Tensor:
    """[B] L2 norms of each sample's gradient with respect to ``params``."""
    batch_size = inputs.sigma_B.shape[0]
    flat, rebuild = split_batch(inputs, batch_size)

    def sample_loss(p: dict[str, torch.Tensor], sample: dict[str, torch.Tensor]) -> torch.Tensor:
        one = rebuild({k: v.unsqueeze(0) for k, v in sample.items()})  # a batch of one
        return loss_from_inputs(p, one, ctx)[0]

    grads = torch.func.vmap(torch.func.grad(sample_loss), in_dims=(None, 0))(params, flat)
    return torch.stack([g.flatten(1).pow(2).sum(1) for g in grads.values()]).sum(0).sqrt()


def setup(cfg: TrainConfig, batch_size: int) -> tuple[dict[str, torch.Tensor], ModelInputs, StepContext]:
    """The demo model with its adapters, one batch of prepared inputs (step 0's keys) and the step context."""
    plan = plan_run(cfg, init_distributed())
    model = build_model(plan)
    # The transformer deduplicates per-token timesteps with a host-side check, which vmap cannot run.
    model.transformer.max_distinct_timesteps = None
    strategy = build_strategy(cfg)
    ctx = StepContext(transformer=model.transformer, text_processor=model.text_processor, tx=build_optimizer(cfg),
                      cfg=cfg, strategy=strategy, dist=plan.dist, fsdp=plan.fsdp, compute_dtype=plan.compute_dtype)
    params = {k: v.detach() for k, v in build_trainables(plan, model).items()}
    generator = torch.Generator().manual_seed(cfg.seed)
    for value in params.values():  # B starts at zero: give the adapters values so every gradient is non-zero
        value.copy_(torch.randn(value.shape, generator=generator) * 0.02)
    data = build_data(plan, strategy).dataset
    first = data.samples[0].video_shape
    same_bucket = [i for i, info in enumerate(data.samples) if info.video_shape == first][:batch_size]
    batch = collate([data[i] for i in same_bucket])
    with torch.no_grad():
        inputs = model_inputs(params, batch, sample_keys(cfg.seed, 0, 0, len(same_bucket)), ctx)
    return params, inputs, ctx


if __name__ == "__main__":
    cfg = demo()
    cfg = prepare_demo(replace(cfg, output_dir=Path("outputs/per_sample_grads"),
                               validation=replace(cfg.validation, interval=None)))
    params, inputs, ctx = setup(cfg, int(sys.argv[1]) if len(sys.argv) > 1 else 8)
    norms = per_sample_grad_norms(params, inputs, ctx)
    for i, (norm, sigma) in enumerate(zip(norms.tolist(), inputs.sigma_B.tolist(), strict=True)):
        print(f"sample {i}: sigma {sigma:.3f}  gradient norm {norm:.4e}")
