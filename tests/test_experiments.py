"""The research scripts in experiments/, run on the demo's tiny model with few steps: each checked against the
trainer itself (custom loop, LoRA sweep) or against a per-sample loop (per-sample gradients)."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
import torch

from experiments import custom_loop, lora_sweep, per_sample_grads
from experiments.presets import demo
from ltxf.checkpoint import load_lora_file
from ltxf.config import TrainConfig
from ltxf.demo import build_demo_assets
from ltxf.step import loss_from_inputs
from ltxf.train import build_optimizer, main


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    return build_demo_assets(tmp_path_factory.mktemp("demo_assets"), seed=0)


def demo_config(assets, output_dir: Path, *, steps: int = 3) -> TrainConfig:
    """The demo on shared assets, shortened: batch 2, no validation, a log and a checkpoint every step."""
    cfg = demo()
    return replace(cfg, demo_model=False, output_dir=output_dir,
                   model=replace(cfg.model, checkpoint=assets.checkpoint), data=replace(cfg.data, root=assets.dataset),
                   optim=replace(cfg.optim, steps=steps, warmup_steps=0, batch_size=2),
                   log=replace(cfg.log, every=1), validation=replace(cfg.validation, interval=None))


def test_custom_loop_trains_like_the_trainer(assets, tmp_path):
    """The 40-line loop over train_step, given the configured optimizer, gives the trainer's per-step losses
    exactly (same build steps, same data order and keys; CPU fp32)."""
    cfg = demo_config(assets, tmp_path / "custom")
    losses = custom_loop.run(cfg, 3, build_optimizer(cfg))
    reference = main(demo_config(assets, tmp_path / "main"))
    assert losses == list(reference.losses)
    assert len(Path(custom_loop.__file__).read_text().splitlines()) < 40


def test_per_sample_gradient_norms_match_a_loop(assets, tmp_path):
    """vmap(grad) over the samples equals grad on each sample alone, and the per-sample gradients average to the
    batch gradient. Tolerance: vmap batches the same fp32 kernels in another order: 1e-5 relative on the norms,
    and on the gradients 1e-5 relative plus 1e-6 of the largest entry (for entries that nearly cancel)."""
    params, inputs, ctx = per_sample_grads.setup(demo_config(assets, tmp_path / "run"), batch_size=3)
    norms = per_sample_grads.per_sample_grad_norms(params, inputs, ctx)
    flat, rebuild = per_sample_grads.split_batch(inputs, 3)
    looped, grads = [], []
    for b in range(3):
        one = rebuild({k: v[b : b + 1] for k, v in flat.items()})
        grad = torch.func.grad(lambda p, one=one: loss_from_inputs(p, one, ctx)[0])(params)
        grads.append(grad)
        looped.append(torch.stack([g.pow(2).sum() for g in grad.values()]).sum().sqrt())
    torch.testing.assert_close(norms, torch.stack(looped), rtol=1e-5, atol=0)
    assert norms.min() > 0 and len(set(norms.tolist())) == 3
    batch_grad = torch.func.grad(lambda p: loss_from_inputs(p, inputs, ctx)[0])(params)
    for key, value in batch_grad.items():
        torch.testing.assert_close(value, sum(g[key] for g in grads) / 3, rtol=1e-5,
                                   atol=1e-6 * float(value.abs().max()))


def test_lora_sweep_variants_equal_their_runs_alone(assets, tmp_path):
    """Three variants (another learning rate and rank; another seed) trained together on one base end with the
    losses and adapters of each config trained alone by the trainer: bit-identical on CPU (the same kernels on the
    same tensors; only the module holding the adapters differs)."""
    variants = [lora_sweep.Variant(learning_rate=5e-3, rank=16, seed=42),
                lora_sweep.Variant(learning_rate=2e-3, rank=8, seed=42),
                lora_sweep.Variant(learning_rate=5e-3, rank=16, seed=7)]
    cfg = demo_config(assets, tmp_path / "sweep")
    runs, figures = lora_sweep.sweep(cfg, variants, steps=3)
    assert figures["sweep_mib"] < figures["separate_mib"]
    assert len({run.losses[-1] for run in runs}) == 3
    for i, run in enumerate(runs):
        alone = main(replace(run.variant.config(cfg), output_dir=tmp_path / f"alone_{i}"))
        assert run.losses == list(alone.losses), i
        exported = load_lora_file(alone.export_path).tensors
        assert exported.keys() == run.state.params.keys()
        for key, value in run.state.params.items():
            assert torch.equal(value.detach(), exported[key]), (i, key)
