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
from ltxf.optim import (
    ScaleByScheduleState,
    call_update,
    chain,
    clip_by_global_norm,
    find_states,
    global_norm,
    make_schedule,
    scale_by_learning_rate,
)
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
        assert torch.isfinite(metrics["loss"])
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
    torch.testing.assert_close(metrics_a["loss"], metrics_b["loss"], rtol=1e-6, atol=1e-7)
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
    moments = [t.clone() for t in _moments(state_skip)]
    state_skip, metrics = train_step(state_skip, [bad], ctx_skip)
    assert int(state_skip.step) == 1 and float(metrics["skipped"]) == 1.0
    for key in before:
        assert torch.equal(before[key], state_skip.params[key])
    assert all(torch.equal(a, b) for a, b in zip(moments, _moments(state_skip), strict=True))
    # The schedule advanced with the step: the next (good) step uses schedule(1), as in a run without the skip.
    (schedule_state,) = find_states(state_skip.opt_state, ScaleByScheduleState)
    assert int(schedule_state.count) == int(state_skip.step) == 1
    state_skip, metrics = train_step(state_skip, [collate([data[idx[2]], data[idx[3]]])], ctx_skip)
    o = ctx_skip.cfg.optim
    schedule = make_schedule(o.scheduler, o.learning_rate, o.steps, warmup_steps=o.warmup_steps)
    assert float(metrics["lr"]) == pytest.approx(schedule(1), rel=1e-6) and schedule(1) != schedule(0)
    assert int(schedule_state.count) == int(state_skip.step) == 2


def _moments(state) -> list[torch.Tensor]:
    """The optimizer state's tensors except the schedule's step counter."""
    tree = state_to_dict(state)["opt_state"]
    return [t for path, t in _tensors_with_paths(tree) if not path.endswith((".count", ".learning_rate"))]


def _tensors_with_paths(tree, path="") -> list[tuple[str, torch.Tensor]]:
    if isinstance(tree, torch.Tensor):
        return [(path, tree)]
    return [item for key in sorted(tree) for item in _tensors_with_paths(tree[key], f"{path}.{key}")]


def test_clipping_uses_the_norm_the_step_computed():
    """The step computes the global norm once and hands it to clip_by_global_norm through chain (optax's extra
    arguments); a transformation that does not declare grad_norm does not receive it."""
    grads = {"w": torch.full((4,), 3.0)}
    tx = chain(clip_by_global_norm(1.0), scale_by_learning_rate(1.0))
    state = tx.init(grads)
    updates, _ = call_update(tx, {"w": grads["w"].clone()}, state, grad_norm=torch.tensor(600.0))
    # Clipped with the given norm (600), not the true one (6): -1 * 3 / 600.
    torch.testing.assert_close(updates["w"], torch.full((4,), -3.0 / 600.0), rtol=1e-5, atol=0)
    assert float(global_norm(grads)) == pytest.approx(6.0)
    updates, _ = call_update(scale_by_learning_rate(1.0), {"w": grads["w"].clone()},
                             scale_by_learning_rate(1.0).init(grads), grad_norm=torch.tensor(600.0))
    torch.testing.assert_close(updates["w"], torch.full((4,), -3.0))


def _tensors(tree) -> list[torch.Tensor]:
    if isinstance(tree, torch.Tensor):
        return [tree]
    return [t for key in sorted(tree) for t in _tensors(tree[key])]


def _batch_and_key(data, idx, seed=0):
    from ltxf.rng import sample_keys

    return collate([data[idx[0]], data[idx[1]]]), sample_keys(seed, 3, 0, 2)


def _nonzero_lora(state):
    """Give B a value (it starts at zero, which would hide a wrong gradient for A)."""
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for p in state.params.values():
            p.copy_(torch.randn(p.shape, generator=g) * 0.05)


def test_loss_fn_is_a_function_of_its_arguments(assets):
    """loss_fn evaluates at the params it is given (frozen weights from the module, which stays untouched), is
    deterministic in (batch, key), and its torch.func.grad equals autograd on the module. Tolerance: fp32 on
    CPU, the two gradients run the same kernels in the same order, so 1e-6 relative covers any reassociation."""
    from ltxf.step import loss_fn

    ctx, state, data, idx = _setup(assets)
    _nonzero_lora(state)
    batch, key = _batch_and_key(data, idx)
    module_before = {k: v.clone() for k, v in ctx.transformer.state_dict().items()}
    params = state.params
    loss, aux = loss_fn(params, batch, key, ctx)
    assert torch.equal(loss_fn(params, batch, key, ctx)[0], loss)
    assert aux["loss_B"].shape == (2,) and torch.allclose(aux["loss_B"].mean(), loss)
    assert not torch.equal(loss_fn(params, batch, key + 1, ctx)[0], loss), "another key draws other noise"

    shifted = {k: (v + 0.05 * torch.ones_like(v)).detach() for k, v in params.items()}
    loss_shifted, _ = loss_fn(shifted, batch, key, ctx)
    assert abs(float(loss_shifted.detach()) - float(loss.detach())) > 1e-4
    for k, v in ctx.transformer.state_dict().items():
        assert torch.equal(v, module_before[k]), f"loss_fn changed the module ({k})"
    # The loss at `shifted` is the loss of a module that holds `shifted`.
    with torch.no_grad():
        for k, v in params.items():
            v.copy_(shifted[k])
    torch.testing.assert_close(loss_fn(params, batch, key, ctx)[0], loss_shifted, rtol=0, atol=0)

    grads = torch.func.grad(lambda p: loss_fn(p, batch, key, ctx)[0])({k: v.detach() for k, v in params.items()})
    loss_fn(params, batch, key, ctx)[0].backward()
    for k, p in params.items():
        torch.testing.assert_close(grads[k], p.grad, rtol=1e-6, atol=1e-9)
        p.grad = None
    assert any(g.abs().max() > 0 for g in grads.values())


def test_copied_state_trains_the_copy_or_is_refused_under_fsdp(assets):
    """The issue's copied state. Non-sharded: the state is the truth, so the copy trains (non-zero gradient
    norm) and the module's parameters stay as they were. FSDP2: the step cannot evaluate the model at other
    tensors, so it refuses the copy with a clear error; the real state trains and leaves no .grad."""
    from ltxf.parallel import build_mesh, parallelize, shutdown_distributed

    ctx, state, data, idx = _setup(assets)
    _nonzero_lora(state)
    module_before = {k: v.detach().clone() for k, v in state.params.items()}
    copied = init_state({k: v.detach().clone().requires_grad_() for k, v in state.params.items()}, ctx.tx)
    copy_before = {k: v.detach().clone() for k, v in copied.params.items()}
    copied, metrics = train_step(copied, [collate([data[idx[0]], data[idx[1]]])], ctx)
    assert float(metrics["grad_norm"]) > 0
    assert any(not torch.equal(copied.params[k], copy_before[k]) for k in copy_before)
    assert all(torch.equal(state.params[k], module_before[k]) for k in module_before)

    ctx, state, data, idx = _setup(assets)
    try:
        parallelize(ctx.transformer, mesh=build_mesh(1, 1, torch.device("cpu")), activation_checkpointing=False,
                    compile=False, param_dtype=None, reduce_dtype=torch.float32)
        ctx = replace(ctx, fsdp=True)
        state = init_state(lora_parameters(ctx.transformer), ctx.tx)
        foreign = init_state({k: v.detach().clone().requires_grad_() for k, v in state.params.items()}, ctx.tx)
        with pytest.raises(ValueError, match="not the model's own parameters"):
            train_step(foreign, [collate([data[idx[0]], data[idx[1]]])], ctx)
        state, metrics = train_step(state, [collate([data[idx[0]], data[idx[1]]])], ctx)
        assert float(metrics["grad_norm"]) > 0
        assert all(p.grad is None for p in ctx.transformer.parameters())
    finally:
        shutdown_distributed()
