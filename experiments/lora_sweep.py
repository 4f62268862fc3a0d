"""Train K LoRA variants (learning rate, rank, seed) on ONE frozen base, loaded once, in one process.

Each variant is its own :class:`~ltxf.state.TrainState` (adapters + AdamW moments) with its own optimizer, data
order and noise (all derived from its seed); the base weights are shared and only read. ``train_step`` evaluates
each variant at its own state through ``torch.func.functional_call``, so the adapters held by the model are never
used. Every variant trains exactly as the same config would alone (``tests/test_experiments.py``).

Memory is base + K x (adapters + optimizer state) + one variant's activations (the variants step in turn), against
K x (base + adapters + optimizer + activations) for K separate runs side by side. The table reports the tensor
bytes of each part (activations: the bytes autograd saves for backward in one step) and the process's peak RSS.
Alpha follows the rank (alpha = rank, scale 1), as the demo preset.

Run: ``python -m experiments.lora_sweep --steps 100`` (CPU, the demo's tiny model and data);
``--compare-separate`` then trains each variant alone with ``ltxf.train.main`` in its own process (loading the base
each time, as K separate runs do) and prints their time and peak RSS.
"""

from __future__ import annotations

import argparse
import math
import resource
import subprocess
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from torch import nn

from experiments.presets import demo
from ltxf.config import TrainConfig
from ltxf.demo import prepare_demo
from ltxf.lora import LoRALinear
from ltxf.parallel import init_distributed
from ltxf.pytree import leaves
from ltxf.rng import make_generator
from ltxf.state import TrainState, init_state
from ltxf.step import StepContext, train_step
from ltxf.strategies.registry import build_strategy
from ltxf.train import Model, RunPlan, build_data, build_model, build_optimizer, plan_run

MIB = 2**20


@dataclass(frozen=True, kw_only=True)
class Variant:
    learning_rate: float
    rank: int
    seed: int

    def config(self, base: TrainConfig) -> TrainConfig:
        """The run config of this variant alone (what ``train.py`` would train)."""
        return replace(base, seed=self.seed, lora=replace(base.lora, rank=self.rank, alpha=self.rank),
                       optim=replace(base.optim, learning_rate=self.learning_rate))


@dataclass(kw_only=True)
class VariantRun:
    variant: Variant
    ctx: StepContext
    state: TrainState
    batches: object
    losses: list[float]
    activation_bytes: int = 0


def init_adapters(transformer: nn.Module, rank: int, seed: int) -> dict[str, torch.Tensor]:
    """Fresh fp32 adapters of ``rank`` for every LoRA module of ``transformer``, keyed like ``lora_parameters``,
    drawn as ``init_lora_parameters`` draws them (A Kaiming-uniform from the run's ``lora_init`` stream, in
    sorted module order; B zero)."""
    generator = make_generator(seed, 0, 0, "lora_init")
    params = {}
    for name, module in sorted((n, m) for n, m in transformer.named_modules() if isinstance(m, LoRALinear)):
        a = torch.empty(rank, module.in_features, dtype=torch.float32)
        nn.init.kaiming_uniform_(a, a=math.sqrt(5), generator=generator)
        params[f"{name}.lora_A.weight"] = a.requires_grad_()
        params[f"{name}.lora_B.weight"] = torch.zeros(module.out_features, rank, requires_grad=True)
    return params


def start_variant(plan: RunPlan, model: Model, variant: Variant) -> VariantRun:
    cfg = variant.config(plan.cfg)
    variant_plan = replace(plan, cfg=cfg)
    strategy = build_strategy(cfg)
    tx = build_optimizer(cfg)
    ctx = StepContext(transformer=model.transformer, text_processor=model.text_processor, tx=tx, cfg=cfg,
                      strategy=strategy, dist=plan.dist, fsdp=plan.fsdp, compute_dtype=plan.compute_dtype)
    state = init_state(init_adapters(model.transformer, variant.rank, variant.seed), tx)
    return VariantRun(variant=variant, ctx=ctx, state=state, batches=iter(build_data(variant_plan, strategy).loader),
                      losses=[])


def step_variant(run: VariantRun) -> None:
    """One optimizer step of one variant, counting the bytes autograd saves for backward."""
    saved: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        run.state, metrics = train_step(run.state, [next(run.batches)], run.ctx)
    run.losses.append(float(metrics["loss"]))
    run.activation_bytes = max(run.activation_bytes, sum(saved.values()))


def tensor_bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def sweep(cfg: TrainConfig, variants: list[Variant], steps: int) -> tuple[list[VariantRun], dict[str, float]]:
    """Train every variant for ``steps`` steps on one base; returns the runs and the memory / time figures."""
    start = time.perf_counter()
    plan = plan_run(replace(cfg, optim=replace(cfg.optim, steps=steps)), init_distributed())
    model = build_model(plan)  # the base, loaded once (its own adapters are never used)
    runs = [start_variant(plan, model, v) for v in variants]
    for _ in range(steps):
        for run in runs:
            step_variant(run)
    # The base: every tensor of the modules (their own, unused adapters included: they are in memory too).
    base = tensor_bytes(t for m in (model.transformer, model.text_processor) for t in m.state_dict().values())
    states = [tensor_bytes(leaves(run.state)) for run in runs]
    activations = max(run.activation_bytes for run in runs)
    figures = {"seconds": time.perf_counter() - start, "base_mib": base / MIB,
               "states_mib": sum(states) / MIB, "activations_mib": activations / MIB,
               "sweep_mib": (base + sum(states) + activations) / MIB,
               "separate_mib": sum(base + s + run.activation_bytes for s, run in zip(states, runs, strict=True)) / MIB,
               "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    return runs, figures


def print_table(runs: list[VariantRun], figures: dict[str, float]) -> None:
    print(f"{'variant':>8} {'lr':>9} {'rank':>5} {'seed':>5} {'final loss':>11} {'state MiB':>10} {'activ. MiB':>11}")
    for i, run in enumerate(runs):
        v = run.variant
        print(f"{i:>8} {v.learning_rate:>9.2e} {v.rank:>5} {v.seed:>5} {run.losses[-1]:>11.4f} "
              f"{tensor_bytes(leaves(run.state)) / MIB:>10.3f} {run.activation_bytes / MIB:>11.3f}")
    print(f"base {figures['base_mib']:.2f} MiB + {len(runs)} states {figures['states_mib']:.2f} MiB + activations "
          f"{figures['activations_mib']:.2f} MiB = {figures['sweep_mib']:.2f} MiB in one process "
          f"(K separate runs: {figures['separate_mib']:.2f} MiB); peak RSS {figures['peak_rss_mib']:.0f} MiB; "
          f"{figures['seconds']:.1f} s")


DEFAULT_VARIANTS = [Variant(learning_rate=lr, rank=rank, seed=seed)
                    for lr, rank, seed in [(5e-3, 16, 42), (2e-3, 16, 42), (5e-3, 8, 42), (5e-3, 16, 7)]]

def train_alone(cfg: TrainConfig, index: int, steps: int) -> None:
    """Variant ``index`` trained by ``ltxf.train.main`` (this process: one of K separate runs)."""
    from ltxf.train import main

    start = time.perf_counter()
    variant_cfg = DEFAULT_VARIANTS[index].config(cfg)
    result = main(replace(variant_cfg, output_dir=cfg.output_dir / f"alone_{index}",
                          optim=replace(variant_cfg.optim, steps=steps), log=replace(variant_cfg.log, every=1)))
    print(f"alone {index}: final loss {result.losses[-1]:.4f}, {time.perf_counter() - start:.1f} s, peak RSS "
          f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB", flush=True)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--output-dir", type=Path, default=Path("outputs/lora_sweep"))
    parser.add_argument("--compare-separate", action="store_true")
    parser.add_argument("--alone", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    base = demo()
    base = prepare_demo(replace(base, output_dir=args.output_dir, validation=replace(base.validation, interval=None),
                                optim=replace(base.optim, warmup_steps=0, steps=args.steps),
                                log=replace(base.log, every=args.steps)))
    if args.alone is not None:
        train_alone(base, args.alone, args.steps)
        sys.exit(0)
    print_table(*sweep(base, DEFAULT_VARIANTS, args.steps))
    if args.compare_separate:
        start = time.perf_counter()
        for i in range(len(DEFAULT_VARIANTS)):
            subprocess.run([sys.executable, "-m", "experiments.lora_sweep", "--alone", str(i), "--steps",
                            str(args.steps), "--output-dir", str(args.output_dir)], check=True)
        print(f"{len(DEFAULT_VARIANTS)} separate runs: {time.perf_counter() - start:.1f} s in all")
