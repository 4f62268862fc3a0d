"""The training state: one explicit pytree (style-anchors C.2, C.9).

``TrainState(params, opt_state, step)`` is an optree dataclass in the ``ltxf`` namespace
(``ltxf.pytree.flatten(state)`` yields its tensors). ``params`` holds the TRAINABLE leaves only, keyed by
state-dict FQN and sorted; they are the model's own ``nn.Parameter`` objects (under FSDP2, its sharded
DTensor parameters), never copies, so updating them in place updates the model. Frozen weights stay in
the model, outside the state. RNG is not stored (``ltxf.rng`` derives it from ``step``).

Checkpointing: ``state_to_dict`` builds a plain nested dict whose leaves ARE the state's tensors. Pass it to
``torch.distributed.checkpoint.save``; to resume, build an initialised state the same way, and
``dcp.load(state_to_dict(state), ...)`` fills its tensors in place (DCP loads in place). Never use
``dataclasses.asdict``: it deep-copies tensors, so an in-place load would fill the copies.
"""

from typing import Any

import torch
from torch import Tensor, nn

from ltxf import pytree
from ltxf.optim import GradientTransformation, OptState

__all__ = ["TrainState", "init_state", "state_to_dict", "load_state_from_dict", "trainable_parameters"]


@pytree.dataclasses.dataclass(frozen=True, kw_only=True)
class TrainState:
    """Everything that changes during training.

    ``params``: trainable tensors keyed by state-dict FQN (the model's own Parameters). ``opt_state``: the
    optimizer state pytree (``GradientTransformation.init(params)``). ``step``: int64 0-d CPU tensor, the
    number of optimizer steps done.
    """

    params: dict[str, Tensor]
    opt_state: OptState
    step: Tensor


def trainable_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """The model's Parameters with ``requires_grad``, keyed by state-dict FQN, sorted; the objects
    themselves. State-dict FQNs are stable under ``fully_shard`` and activation-checkpoint wrappers
    (``named_parameters`` names are not). Raises ``ValueError`` for tied trainable parameters (one tensor
    under two names would be updated twice)."""
    found = model.state_dict(keep_vars=True)
    params = {k: found[k] for k in sorted(found) if isinstance(found[k], nn.Parameter) and found[k].requires_grad}
    seen: dict[int, str] = {}
    for k, p in params.items():
        if id(p) in seen:
            raise ValueError(f"trainable_parameters: {k!r} and {seen[id(p)]!r} are the same (tied) parameter")
        seen[id(p)] = k
    return params


def init_state(params: dict[str, Tensor], tx: GradientTransformation) -> TrainState:
    """A fresh state at step 0 over ``params`` (kept by reference, re-keyed in sorted order).

    ``params`` must be the trainable tensors themselves (``lora_parameters(model)`` or
    ``trainable_parameters(model)``): each must require grad.
    """
    frozen = [k for k, p in params.items() if not p.requires_grad]
    if frozen:
        raise ValueError(
            f"init_state: params must be trainable (requires_grad); {len(frozen)} are not, e.g. {frozen[:3]}"
        )
    params = {k: params[k] for k in sorted(params)}
    return TrainState(params=params, opt_state=tx.init(params), step=torch.zeros((), dtype=torch.int64))


def _plain(node: Any, where: str) -> Any:
    if isinstance(node, Tensor):
        return node
    if isinstance(node, tuple) and hasattr(node, "_fields"):  # NamedTuple
        return {f: _plain(getattr(node, f), f"{where}.{f}") for f in node._fields}
    if isinstance(node, tuple | list):
        return {str(i): _plain(v, f"{where}.{i}") for i, v in enumerate(node)}
    if isinstance(node, dict):
        return {str(k): _plain(v, f"{where}.{k}") for k, v in node.items()}
    raise ValueError(f"state_to_dict: {where} is a {type(node).__name__}; state leaves must be tensors")


def state_to_dict(state: TrainState) -> dict[str, Any]:
    """``{"params": {...}, "opt_state": {...}, "step": tensor}``: a plain nested dict of the state's own
    tensors (no copies), for ``torch.distributed.checkpoint.save`` / in-place ``load``.

    NamedTuples become dicts keyed by field name, tuples dicts keyed by position ("0", "1", ...).
    """
    return {
        "params": dict(state.params),
        "opt_state": _plain(state.opt_state, "opt_state"),
        "step": state.step,
    }


@torch.no_grad()
def _copy_into(dst: Any, src: Any, where: str) -> None:
    if isinstance(dst, Tensor):
        if not isinstance(src, Tensor):
            raise ValueError(f"load_state_from_dict: {where} should be a tensor, got {type(src).__name__}")
        if tuple(src.shape) != tuple(dst.shape):
            raise ValueError(f"load_state_from_dict: {where} has shape {tuple(src.shape)}, expected {tuple(dst.shape)}")
        dst.copy_(src)
        return
    if not isinstance(src, dict):
        raise ValueError(f"load_state_from_dict: {where} should be a dict, got {type(src).__name__}")
    missing, unexpected = sorted(dst.keys() - src.keys()), sorted(src.keys() - dst.keys())
    if missing or unexpected:
        raise ValueError(
            f"load_state_from_dict: keys under {where} do not match: missing {missing[:5]}, unexpected {unexpected[:5]}"
        )
    for k in dst:
        _copy_into(dst[k], src[k], f"{where}.{k}" if where else k)


def load_state_from_dict(state: TrainState, d: dict[str, Any]) -> TrainState:
    """Copy ``d`` (shaped like ``state_to_dict(state)``, e.g. from ``torch.load``) into ``state``'s tensors
    in place and return ``state``. With DCP this is unnecessary: ``dcp.load(state_to_dict(state))`` already
    writes in place. Raises ``ValueError`` naming the first mismatching key or shape."""
    _copy_into(state_to_dict(state), d, "")
    return state
