"""Selective activation checkpointing (which blocks) and its order with torch.compile (checkpoint inside the
compiled region). Identical losses in every mode, through the trainer, are in tests/test_train.py."""

from __future__ import annotations

import copy
import shutil

import pytest
import torch
from torch import nn

from ltxf.lora import LoraConfig, inject_lora
from ltxf.parallel import apply_ac, apply_compile, checkpointed_blocks


def test_checkpointed_blocks_every_k_or_first_n():
    assert checkpointed_blocks(8) == list(range(8))
    assert checkpointed_blocks(8, every=3) == [0, 3, 6]
    assert checkpointed_blocks(8, first=3) == [0, 1, 2]
    assert checkpointed_blocks(8, first=20) == list(range(8))
    assert checkpointed_blocks(8, first=0) == []


class _Block(nn.Module):
    def __init__(self, dim: int = 16) -> None:
        super().__init__()
        self.to_q = nn.Linear(dim, 2 * dim)
        self.to_out = nn.Linear(2 * dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hidden = nn.functional.gelu(self.to_q(nn.functional.rms_norm(x, (x.shape[-1],))), approximate="tanh")
        return x + self.to_out(hidden)


class _Model(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.transformer_blocks = nn.ModuleList([_Block(), _Block()])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.transformer_blocks:
            x = block(x)
        return x


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("g++") is None and shutil.which("cc") is None,
                    reason="torch.compile's CPU backend (inductor) needs a C++ compiler (g++ or cc) on PATH")
def test_compiled_checkpointed_blocks_match_eager_and_recompute_inside_the_graph():
    """Checkpoint then compile (``apply_ac(..., for_compile=True)``, ``apply_compile``): the same loss and LoRA
    gradients as eager checkpointing (fp32; tolerance for the compiler's fusion order), and the compiled block
    keeps only its input for the backward: the recomputation is part of the compiled graph. A toy two-block
    model with LoRA stands in for the transformer: compiling the real block takes minutes on CPU (it was run
    by hand: loss equal, gradients within 4e-8 on the tiny LTX-2.3 model)."""
    torch.manual_seed(0)
    base = _Model()
    base.requires_grad_(False)
    inject_lora(base, LoraConfig(rank=4, alpha=4, target_modules=("to_q", "to_out")))
    for name, param in base.named_parameters():
        if name.endswith("lora_B.weight"):
            nn.init.normal_(param)
    eager, compiled = copy.deepcopy(base), copy.deepcopy(base)
    apply_ac(eager.transformer_blocks)
    apply_ac(compiled.transformer_blocks, for_compile=True)
    apply_compile(compiled.transformer_blocks)

    x = torch.randn(2, 8, 16)
    results = []
    for model in (eager, compiled):
        weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
        saved: dict[int, tuple[int, ...]] = {}

        def pack(tensor, weights=weights, saved=saved):
            if tensor.untyped_storage().data_ptr() not in weights:
                saved[tensor.untyped_storage().data_ptr()] = tuple(tensor.shape)
            return tensor

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
            out = model(x)
        loss = out.square().mean()
        trainable = [p for p in model.parameters() if p.requires_grad]
        results.append((loss, *torch.autograd.grad(loss, trainable)))
        if model is compiled:  # token-sized saved tensors: the inputs of the two blocks, nothing recomputable
            activations = [shape for shape in saved.values() if len(shape) == 3 and shape[:2] == (2, 8)]
            assert activations == [(2, 8, 16), (2, 8, 16)], saved
    for ours, reference in zip(results[1], results[0], strict=True):
        torch.testing.assert_close(ours, reference, rtol=1e-5, atol=1e-6)
