"""Block swap on the CPU (host and device both the CPU): the same schedule as on CUDA, bit-identical training."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from experiments.presets import demo
from ltxf.block_swap import apply_block_swap, offload_text_connectors
from ltxf.data import PrecomputedDataset, collate
from ltxf.demo import build_demo_assets
from ltxf.lora import init_lora_parameters, inject_lora, lora_parameters
from ltxf.models.text import load_embeddings_processor
from ltxf.models.transformer import load_transformer
from ltxf.parallel import DistInfo, apply_ac
from ltxf.rng import make_generator
from ltxf.state import init_state
from ltxf.step import StepContext, train_step


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    return build_demo_assets(tmp_path_factory.mktemp("demo"), seed=0)


def _train(assets, *, blocks_to_swap: int, checkpointing: bool, offload_text: bool = False, steps: int = 3):
    checkpoint, dataset_dir = assets
    cfg = demo()
    cfg = replace(cfg, optim=replace(cfg.optim, warmup_steps=0))
    transformer = load_transformer(checkpoint)
    transformer.requires_grad_(False)
    inject_lora(transformer, cfg.lora)
    swap = apply_block_swap(transformer, blocks_to_swap, "cpu")
    init_lora_parameters(transformer, make_generator(0, 0, 0, "lora_init"))
    if checkpointing:
        apply_ac(transformer.transformer_blocks)
    text = load_embeddings_processor(checkpoint, with_feature_extractor=False)
    text.requires_grad_(False)
    text_swaps = offload_text_connectors(text, "cpu") if offload_text else []
    from ltxf.train import build_optimizer

    tx = build_optimizer(cfg)
    state = init_state(lora_parameters(transformer), tx)
    ctx = StepContext(transformer=transformer, text_processor=text, tx=tx, cfg=cfg, strategy=_strategy(cfg),
                      dist=DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu")), fsdp=False,
                      compute_dtype=torch.float32)
    data = PrecomputedDataset(dataset_dir, sources=["latents", "conditions", "audio_latents"], text_length=None)
    same = [i for i in range(len(data)) if data.samples[i].video_shape == data.samples[0].video_shape]
    losses = []
    for step in range(steps):
        state, metrics = train_step(state, [collate([data[same[2 * step]], data[same[2 * step + 1]]])], ctx)
        losses.append(metrics["loss_sum"].clone())
    return losses, state, transformer, swap, text_swaps


def _strategy(cfg):
    from ltxf.strategies.registry import build_strategy

    return build_strategy(cfg)


@pytest.mark.parametrize("checkpointing", [True, False])
def test_block_swap_trains_bit_identically_and_copies_only_host_to_device(assets, checkpointing):
    reference, ref_state, _, _, _ = _train(assets, blocks_to_swap=0, checkpointing=checkpointing)
    num_blocks = 1  # of the demo's 2: block 0 stays resident and prefetches block 1
    losses, state, transformer, swap, _ = _train(assets, blocks_to_swap=num_blocks, checkpointing=checkpointing)
    for ours, ref in zip(losses, reference, strict=True):
        assert torch.equal(ours, ref)
    for key, value in ref_state.params.items():
        assert torch.equal(state.params[key], value), key

    blocks = transformer.transformer_blocks
    swapped = list(range(len(blocks) - num_blocks, len(blocks)))
    assert swap.swapped == swapped
    # The host Parameters are back in place after every call, frozen, and never written (never copied back).
    for index in swapped:
        for (module, name), host in zip(swap.owners[index], swap.host[index], strict=True):
            assert module._parameters[name] is host and not host.requires_grad
    # The adapters are never swapped: the state holds the module's own Parameters.
    adapters = lora_parameters(transformer)
    assert all(adapters[k] is state.params[k] for k in adapters)
    # Without checkpointing: in each forward the resident block 0 prefetches block 1 (3 copies, all ahead). With
    # it, the recomputation also needs block 1, first in its (reverse) order, so on demand; recomputing block 0
    # then prefetches block 1 for the next step's forward (the last one unused): 7 copies, 4 ahead.
    assert (swap.copies, swap.prefetched) == ((7, 4) if checkpointing else (3, 3))

def test_block_swap_errors():
    from ltxf.models.transformer import AVTransformer, TransformerConfig
    from tests.ltx_reference import tiny_transformer_config

    model = AVTransformer(TransformerConfig.from_checkpoint_config(tiny_transformer_config("ltx-2.3")))
    with pytest.raises(ValueError, match="blocks_to_swap must be an integer in"):
        apply_block_swap(model, len(model.transformer_blocks) + 1, "cpu")
    with pytest.raises(ValueError, match="no frozen weights"):  # full fine-tuning: everything trains
        apply_block_swap(model, 1, "cpu")


def test_offloaded_text_connectors_give_identical_losses(assets):
    """Frozen connectors on the host, streamed block by block once per step: the same training."""
    reference, _, _, _, _ = _train(assets, blocks_to_swap=0, checkpointing=True)
    losses, _, _, _, text_swaps = _train(assets, blocks_to_swap=0, checkpointing=True, offload_text=True)
    assert all(torch.equal(ours, ref) for ours, ref in zip(losses, reference, strict=True))
    for swap in text_swaps:  # video and audio connector: every block, one copy per step
        assert swap.swapped == list(range(len(swap.blocks)))
        assert swap.copies == 3 * len(swap.blocks)
        for index in swap.swapped:
            for (module, name), host in zip(swap.owners[index], swap.host[index], strict=True):
                assert module._parameters[name] is host
