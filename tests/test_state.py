import dataclasses
import math
from pathlib import Path

import optree
import pytest
import torch
import torch.distributed.checkpoint as dcp
from torch import nn

from ltxf import optim, pytree
from ltxf.lora import LoraConfig, inject_lora, lora_parameters
from ltxf.state import TrainState, init_state, load_state_from_dict, state_to_dict, trainable_parameters
from tests.test_lora import ToyAVModel, _inputs


def _lora_model(seed: int) -> ToyAVModel:
    torch.manual_seed(seed)
    model = ToyAVModel()
    # to_k's lora_A is [4, 16]; ff.net.0.proj's is [4, 256]: 1024 elements, quantised with min_8bit_size=1024
    inject_lora(model, LoraConfig(rank=4, target_modules=("to_k", "ff.net.0.proj")))
    return model


def _wide_ff_model(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    model = nn.ModuleDict({"ff": nn.ModuleDict({"net": nn.ModuleList([nn.Linear(256, 32), nn.Linear(32, 256)])})})
    inject_lora(model, LoraConfig(rank=4, target_modules=("net.0", "net.1")))
    return model


def _tx(kind: str) -> optim.GradientTransformation:
    schedule = optim.make_schedule("cosine", 1e-2, 10, warmup_steps=2)
    if kind == "adamw":
        return optim.chain(optim.clip_by_global_norm(1.0), optim.adamw(schedule))
    return optim.chain(optim.clip_by_global_norm(1.0), optim.adamw_8bit(schedule, min_8bit_size=1024))


def _train(model: nn.Module, state: TrainState, tx: optim.GradientTransformation, num_steps: int) -> TrainState:
    for step in range(num_steps):
        if isinstance(model, ToyAVModel):
            v, a = model(*_inputs(step))
            loss = v.square().mean() + a.square().mean()
        else:
            x = torch.randn(3, 256, generator=torch.Generator().manual_seed(step))
            loss = model["ff"]["net"][1](model["ff"]["net"][0](x)).square().mean()
        loss.backward()
        grads = {k: p.grad for k, p in state.params.items()}
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        optim.apply_updates(state.params, updates)
        for p in state.params.values():
            p.grad = None
        state.step.add_(1)
        state = dataclasses.replace(state, opt_state=opt_state)
    return state


def test_pytree_round_trip_and_leaf_identity():
    model = _lora_model(0)
    params = lora_parameters(model)
    state = init_state(params, _tx("adamw"))
    leaves, spec = pytree.flatten(state)
    assert spec.namespace == "ltxf"
    # 1 clip norm + per param (count, mu, nu) + lr schedule (count, learning_rate) + params + step
    assert len(leaves) == 1 + 3 * len(params) + 2 + len(params) + 1
    rebuilt = pytree.unflatten(spec, leaves)
    assert isinstance(rebuilt, TrainState)
    assert all(a is b for a, b in zip(pytree.leaves(rebuilt), leaves, strict=True))
    # the params are the module's own Parameters, not copies
    module_params = dict(model.named_parameters())
    assert all(state.params[k] is module_params[k] for k in params)
    assert sum(any(leaf is p for leaf in leaves) for p in params.values()) == len(params)
    # outside the namespace the dataclass is opaque: nobody can flatten it by accident with another registry
    assert len(optree.tree_leaves(state)) == 1
    assert state.step.dtype == torch.int64 and state.step.dim() == 0


def test_init_state_rejects_frozen_and_sorts():
    model = _lora_model(0)
    params = lora_parameters(model)
    shuffled = dict(reversed(list(params.items())))
    assert list(init_state(shuffled, optim.adamw(1e-3)).params) == sorted(params)
    frozen = dict(params, **{"patchify_proj.weight": model.patchify_proj.weight})
    with pytest.raises(ValueError, match="patchify_proj.weight"):
        init_state(frozen, optim.adamw(1e-3))


def test_state_to_dict_holds_the_state_tensors():
    state = init_state(lora_parameters(_lora_model(0)), _tx("adamw_8bit"))
    d = state_to_dict(state)
    assert set(d) == {"params", "opt_state", "step"}
    assert d["step"] is state.step
    assert set(d["opt_state"]) == {"0", "1"} and set(d["opt_state"]["1"]) == {"0", "1", "2"}
    assert set(d["opt_state"]["1"]["0"]) == {"count", "mu", "nu", "mu_absmax", "nu_absmax", "mu_qmap", "nu_qmap"}
    flat = pytree.leaves(d)
    assert len(flat) == len(pytree.leaves(state))
    ids = {id(x) for x in pytree.leaves(state)}
    assert all(id(x) in ids for x in flat)


@pytest.mark.parametrize("kind", ["adamw", "adamw_8bit"])
def test_dcp_round_trip_is_bit_exact(tmp_path: Path, kind: str):
    make = _lora_model if kind == "adamw" else _wide_ff_model
    model = make(0)
    tx = _tx(kind)
    state = _train(model, init_state(lora_parameters(model), tx), tx, 3)
    if kind == "adamw_8bit":
        assert any(t.dtype == torch.uint8 for t in pytree.leaves(state.opt_state))
    dcp.save(state_to_dict(state), checkpoint_id=tmp_path)

    other = make(1)  # different adapters, fresh optimizer state
    # a resume loads the frozen base from the pretrained checkpoint; only trainables come from DCP
    base = {k: v for k, v in model.state_dict().items() if ".lora_" not in k}
    assert not other.load_state_dict(base, strict=False).unexpected_keys
    fresh = init_state(lora_parameters(other), tx)
    assert not any(torch.equal(fresh.params[k], state.params[k]) for k in state.params if k.endswith("lora_A.weight"))
    before = pytree.leaves(fresh)
    dcp.load(state_to_dict(fresh), checkpoint_id=tmp_path)
    after = pytree.leaves(fresh)
    assert all(a is b for a, b in zip(before, after, strict=True))  # filled in place
    for a, b in zip(after, pytree.leaves(state), strict=True):
        assert a.dtype == b.dtype and torch.equal(a, b)
    assert int(fresh.step) == 3
    # the module sees the restored adapters, and training continues identically
    named = dict(other.named_parameters())
    assert all(named[k] is p for k, p in fresh.params.items())
    cont_a = _train(model, state, tx, 2)
    cont_b = _train(other, fresh, tx, 2)
    for a, b in zip(pytree.leaves(cont_a), pytree.leaves(cont_b), strict=True):
        assert torch.equal(a, b)


def test_load_state_from_dict(tmp_path: Path):
    model = _lora_model(0)
    tx = _tx("adamw")
    state = _train(model, init_state(lora_parameters(model), tx), tx, 2)
    torch.save(state_to_dict(state), tmp_path / "state.pt")
    fresh = init_state(lora_parameters(_lora_model(1)), tx)
    loaded = load_state_from_dict(fresh, torch.load(tmp_path / "state.pt"))
    assert loaded is fresh
    assert all(torch.equal(a, b) for a, b in zip(pytree.leaves(fresh), pytree.leaves(state), strict=True))
    assert math.isclose(optim.last_learning_rate(fresh.opt_state).item(), optim.last_learning_rate(state.opt_state))

    d = state_to_dict(state)
    key = next(iter(d["params"]))
    with pytest.raises(ValueError, match="missing"):
        load_state_from_dict(fresh, {**d, "params": {k: v for k, v in d["params"].items() if k != key}})
    with pytest.raises(ValueError, match=f"params.{key} has shape"):
        load_state_from_dict(fresh, {**d, "params": {**d["params"], key: torch.zeros(1)}})


def test_trainable_parameters():
    model = _lora_model(0)
    assert trainable_parameters(model) == lora_parameters(model)
    tied = nn.ModuleDict({"a": nn.Linear(2, 2), "b": nn.Linear(2, 2)})
    tied["b"].weight = tied["a"].weight
    with pytest.raises(ValueError, match="tied"):
        trainable_parameters(tied)
