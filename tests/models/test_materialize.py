"""Filling a meta-built module from a safetensors file (ltxf/models/materialize.py), on one process.

The sharded path (FSDP2, each rank reading its rows) is exercised by tests/distributed (the load-memory test and
every multi-process training test, which would diverge from one process if a shard were loaded wrong).
"""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from ltxf.demo import build_demo_checkpoint
from ltxf.lora import LoraConfig, inject_lora, is_lora_key
from ltxf.models.checkpoint import TEXT_CONNECTOR_SUBPREFIXES, TRANSFORMER_PREFIX, write_checkpoint
from ltxf.models.materialize import TensorFile
from ltxf.models.transformer import build_transformer_on_meta, load_transformer_weights_


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return build_demo_checkpoint(tmp_path_factory.mktemp("materialize") / "demo.safetensors", seed=3)


def _file_weights(path) -> dict[str, torch.Tensor]:
    inside = {k.removeprefix(TRANSFORMER_PREFIX): v for k, v in load_file(str(path)).items()
              if k.startswith(TRANSFORMER_PREFIX)}
    return {k: v for k, v in inside.items() if not k.startswith(TEXT_CONNECTOR_SUBPREFIXES)}


def test_loads_every_tensor_cast_with_hooks_in_block_order(checkpoint):
    expected = _file_weights(checkpoint)
    model = build_transformer_on_meta(checkpoint).to(torch.bfloat16)
    inject_lora(model, LoraConfig(rank=2, alpha=2.0), dtype=torch.float32)
    seen: list[str] = []
    units: list[str] = []

    def transform(name: str, tensor: torch.Tensor) -> torch.Tensor:
        assert tensor.dtype == torch.bfloat16  # cast before the hook
        seen.append(name)
        # A hook may change the dtype of a plain (non-sharded) parameter: quantisation-on-load's shape of use.
        return tensor.float() if name.endswith("to_q.weight") else tensor

    def on_unit(name: str, module: torch.nn.Module) -> None:
        # Every tensor of the unit is loaded when the hook runs (adapters are left for the caller).
        assert not any(p.is_meta for key, p in module.named_parameters() if not is_lora_key("." + key))
        units.append(name)

    load_transformer_weights_(model, checkpoint, not_in_file=is_lora_key, transform=transform, on_unit=on_unit)
    assert units == ["transformer_blocks.0", "transformer_blocks.1", ""]
    assert sorted(seen) == sorted(expected)
    state = model.state_dict()
    for key, value in expected.items():
        want = value.to(torch.bfloat16).float() if key.endswith("to_q.weight") else value.to(torch.bfloat16)
        assert state[key].dtype == want.dtype and torch.equal(state[key], want), key
    assert not any(t.is_meta for t in state.values())
    # The adapters exist (uninitialised, for init_lora_parameters) in their own dtype, and stay trainable.
    adapters = {k: v for k, v in model.named_parameters() if is_lora_key(k)}
    assert adapters and all(p.dtype == torch.float32 and p.requires_grad for p in adapters.values())
    assert not any(p.requires_grad for k, p in model.named_parameters() if not is_lora_key(k))


def test_row_reads_and_errors(checkpoint, tmp_path):
    key = TRANSFORMER_PREFIX + "transformer_blocks.0.attn1.to_q.weight"
    full = load_file(str(checkpoint))[key]
    with TensorFile(checkpoint) as file:
        assert torch.equal(file.read(key), full)
        assert torch.equal(file.read(key, (3, 7)), full[3:7])

    model = build_transformer_on_meta(checkpoint)
    with pytest.raises(ValueError, match="changed transformer_blocks.0.attn1.to_q.weight from shape"):
        load_transformer_weights_(model, checkpoint, transform=lambda name, t: t.reshape(-1) if
                                  name == "transformer_blocks.0.attn1.to_q.weight" else t)

    weights = load_file(str(checkpoint))
    dropped = TRANSFORMER_PREFIX + "proj_out.bias"
    del weights[dropped]
    broken = write_checkpoint(tmp_path / "broken.safetensors", weights, {"transformer": {}})
    with pytest.raises(ValueError, match=r"(?s)broken.safetensors.*missing keys \(1\): proj_out.bias"):
        load_transformer_weights_(build_transformer_on_meta(checkpoint), broken)
