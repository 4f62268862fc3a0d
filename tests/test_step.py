"""train_step on the demo's tiny model: frozen base weights, gradient accumulation, non-finite handling."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from experiments.presets import demo
from ltxf.data import PrecomputedDataset, collate
from ltxf.demo import build_demo_assets
from ltxf.lora import init_lora_parameters, inject_lora, lora_parameters
from ltxf.models.text import load_embeddings_processor
from ltxf.models.transformer import load_transformer
from ltxf.optim import scale_by_learning_rate
from ltxf.parallel import DistInfo
from ltxf.rng import make_generator
from ltxf.state import init_state, state_to_dict
from ltxf.step import NonFiniteLossError, StepContext, train_step
from ltxf.strategies.registry import build_strategy
from ltxf.train import build_optimizer


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    return build_demo_assets(tmp_path_factory.mktemp("demo"), seed=0)


def _setup(assets, tx=None, **cfg_changes):
    checkpoint, dataset_dir = assets
    cfg = demo()
    cfg = replace(cfg, optim=replace(cfg.optim, warmup_steps=0), **cfg_changes)
    transformer = load_transformer(checkpoint)
    transformer.requires_grad_(False)
    inject_lora(transformer, cfg.lora)
    init_lora_parameters(transformer, make_generator(0, 0, 0, "lora_init"))
    text = load_embeddings_processor(checkpoint, with_feature_extractor=False)
    text.requires_grad_(False)
    tx = tx or build_optimizer(cfg)
    state = init_state(lora_parameters(transformer), tx)
    ctx = StepContext(transformer=transformer, text_processor=text, tx=tx, cfg=cfg, strategy=build_strategy(cfg),
                      dist=DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu")), fsdp=False,
                      compute_dtype=torch.float32)
    data = PrecomputedDataset(dataset_dir, sources=["latents", "conditions", "audio_latents"], text_length=None)
    same_shape = [i for i in range(len(data)) if data.samples[i].video_shape == data.samples[0].video_shape]
    return ctx, state, data, same_shape


def test_base_weights_stay_bit_identical_and_adapters_move(assets):
    ctx, state, data, idx = _setup(assets)
    base = {k: v.clone() for k, v in ctx.transformer.state_dict().items() if "lora_" not in k}
    before = {k: v.clone() for k, v in state.params.items()}
    for step in range(3):
        state, metrics = train_step(state, [collate([data[idx[2 * step]], data[idx[2 * step + 1]]])], ctx)
        assert torch.isfinite(metrics["loss_sum"])
    assert int(state.step) == 3
    for key, value in ctx.transformer.state_dict().items():
        if "lora_" not in key:
            assert torch.equal(value, base[key]), key
    assert any(not torch.equal(before[k], state.params[k]) for k in before)
    assert all(p.grad is None for p in state.params.values())


def test_gradient_accumulation_equals_one_large_batch(assets):
    """Two micro-batches of one sample give the update of one batch of two: each sample's noise and sigma are
    keyed by its index in the global batch, so both draw the same inputs."""
    # Plain SGD makes the parameter change proportional to the gradient (Adam's first step would divide each
    # gradient by its own magnitude and magnify rounding of near-zero gradients).
    ctx_a, state_a, data, idx = _setup(assets, tx=scale_by_learning_rate(1e-2))
    ctx_b, state_b, _, _ = _setup(assets, tx=scale_by_learning_rate(1e-2))
    before = {k: v.clone() for k, v in state_a.params.items()}
    s0, s1 = data[idx[0]], data[idx[1]]
    state_a, metrics_a = train_step(state_a, [collate([s0]), collate([s1])], ctx_a)
    state_b, metrics_b = train_step(state_b, [collate([s0, s1])], ctx_b)
    # fp32 on CPU; the two paths sum the same per-sample terms in a different order (tolerance: float rounding).
    torch.testing.assert_close(metrics_a["loss_sum"], metrics_b["loss_sum"], rtol=1e-6, atol=1e-7)
    for key in state_a.params:
        torch.testing.assert_close(state_a.params[key] - before[key], state_b.params[key] - before[key],
                                   rtol=1e-5, atol=1e-9)
    assert any((state_a.params[k] - before[k]).abs().max() > 1e-6 for k in before)


def test_nonfinite_loss_stop_and_skip(assets):
    ctx, state, data, idx = _setup(assets)
    bad = collate([data[idx[0]], data[idx[1]]])
    bad["video_latents"] = torch.full_like(bad["video_latents"], float("inf"))
    # One good step first, so the optimizer moments are non-zero and a wrong update would show.
    state, _ = train_step(state, [collate([data[idx[2]], data[idx[3]]])], ctx)
    before = {k: v.clone() for k, v in state.params.items()}
    moments = [t.clone() for t in _tensors(state_to_dict(state)["opt_state"])]
    with pytest.raises(NonFiniteLossError, match="parameters were not updated"):
        train_step(state, [bad], ctx)
    for key in before:
        assert torch.equal(before[key], state.params[key])
    assert all(torch.equal(a, b) for a, b in zip(moments, _tensors(state_to_dict(state)["opt_state"]), strict=True))

    ctx_skip, state_skip, _, _ = _setup(assets, nonfinite_loss="skip")
    before = {k: v.clone() for k, v in state_skip.params.items()}
    moments = [t.clone() for t in _tensors(state_to_dict(state_skip)["opt_state"])]
    state_skip, metrics = train_step(state_skip, [bad], ctx_skip)
    assert int(state_skip.step) == 1 and float(metrics["skipped"]) == 1.0
    for key in before:
        assert torch.equal(before[key], state_skip.params[key])
    assert all(torch.equal(a, b) for a, b in zip(moments, _tensors(state_to_dict(state_skip)["opt_state"]),
                                                  strict=True))


def _tensors(tree) -> list[torch.Tensor]:
    if isinstance(tree, torch.Tensor):
        return [tree]
    return [t for key in sorted(tree) for t in _tensors(tree[key])]
