"""A custom training loop over ``ltxf.step.train_step``: the build steps of ``ltxf.train``, your own loop
and optimizer. Run: ``python -m experiments.custom_loop 200`` (CPU, the demo's tiny model and data)."""
import sys
from dataclasses import replace
from pathlib import Path

from experiments.presets import demo
from ltxf.config import TrainConfig
from ltxf.demo import prepare_demo
from ltxf.optim import GradientTransformation, adamw, chain, clip_by_global_norm
from ltxf.parallel import init_distributed
from ltxf.state import init_state
from ltxf.step import StepContext, train_step
from ltxf.strategies.registry import build_strategy
from ltxf.train import build_data, build_model, build_trainables, plan_run


def run(cfg: TrainConfig, steps: int, tx: GradientTransformation) -> list[float]:
    plan = plan_run(cfg, init_distributed())
    model = build_model(plan)
    state = init_state(build_trainables(plan, model), tx)
    strategy = build_strategy(cfg)
    ctx = StepContext(transformer=model.transformer, text_processor=model.text_processor, tx=tx, cfg=cfg,
                      strategy=strategy, dist=plan.dist, fsdp=plan.fsdp, compute_dtype=plan.compute_dtype)
    batches, losses = iter(build_data(plan, strategy).loader), []
    for _ in range(steps):
        state, metrics = train_step(state, [next(batches)], ctx)
        losses.append(float(metrics["loss"]))
        print(f"step {int(state.step):4d}  loss {losses[-1]:.4f}  grad norm {float(metrics['grad_norm']):.3f}")
    return losses


if __name__ == "__main__":
    cfg = demo()
    cfg = prepare_demo(replace(cfg, output_dir=Path("outputs/custom_loop"), validation=replace(cfg.validation,
                                                                                             interval=None)))
    run(cfg, int(sys.argv[1]) if len(sys.argv) > 1 else 200, chain(clip_by_global_norm(1.0), adamw(2e-3)))
