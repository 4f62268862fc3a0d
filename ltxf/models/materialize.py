"""Fill a module built on the ``meta`` device from a safetensors file, one unit (block) at a time.

This is the second half of "create on meta, shard, then load": the module is built on ``meta`` (no memory),
LoRA is injected, activation checkpointing, ``torch.compile`` and FSDP2 ``fully_shard`` are applied, and only
then does any weight exist. :func:`materialize_` then walks the module unit by unit (each transformer block,
then what is left: embeddings, AdaLN, output heads) and, for every tensor of the unit:

1. reads that one tensor from the file (the whole tensor, never the whole model),
2. casts it to the dtype the module gives that parameter (e.g. fp32 master weights from a bf16 file),
3. passes it through the optional ``transform(name, tensor) -> tensor`` hook,
4. stores it: a plain parameter is replaced by a new one holding the tensor; a sharded (``DTensor``) parameter
   keeps only this rank's shard (``distribute_tensor`` with ``src_data_rank=None`` slices the local piece with
   no communication, since every rank read the same file) and the full tensor is freed at once.

Memory: a sharded module is first allocated with ``to_empty`` (FSDP2's supported way; it allocates this rank's
shards only), so a rank's peak is its shards plus one full tensor in flight. A non-sharded module is never
allocated up front: each parameter comes into existence as it is read, so the peak is one copy of the weights
plus one tensor, and a ``transform`` that shrinks tensors (quantisation) lowers the peak with it.

The hooks, for callers that change weights while loading (quantisation on load):

- ``transform(name, tensor) -> tensor`` sees every tensor read from the file, after the cast, with ``name`` the
  module's state-dict key (``transformer_blocks.3.attn1.to_q.weight``). It must return a tensor of the same
  shape. On a non-sharded module it may return another dtype (the parameter is then re-created with that dtype
  and the same ``requires_grad``); on a sharded module the dtype must stay, because FSDP2 allocated the shard.
- ``on_unit(unit_name, unit_module)`` runs after each unit is complete (every tensor of the block is loaded),
  e.g. to swap the block's ``nn.Linear`` modules for quantised ones and free the full-precision weights before
  the next block is read. On a sharded module it must not replace modules or parameters (FSDP2 holds them).

Tensors the file does not hold (LoRA adapters, ``not_in_file``) are materialised uninitialised for the caller to
initialise (``ltxf.lora.init_lora_parameters``). Loading is strict: every other key must be in the file with the
module's shape, and nothing may be left on ``meta``; otherwise a ``ValueError`` names the file and lists what
differs.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from torch import nn
from torch.distributed.tensor import DTensor, distribute_tensor

from ltxf.models import checkpoint

logger = logging.getLogger(__name__)

TensorTransform = Callable[[str, torch.Tensor], torch.Tensor]
"""``transform(name, tensor) -> tensor``: called on each tensor read from the file (after the dtype cast)."""

UnitCallback = Callable[[str, nn.Module], None]
"""``on_unit(unit_name, unit_module)``: called once each unit (a block, then the remainder ``""``) is loaded."""


def block_units(module: nn.Module, block_list: str) -> list[str]:
    """Unit names for :func:`materialize_`: one per child of the ``block_list`` ModuleList (``"transformer_blocks"``
    gives ``["transformer_blocks.0", ...]``)."""
    blocks = module.get_submodule(block_list)
    return [f"{block_list}.{name}" for name, _ in blocks.named_children()]


def is_sharded(module: nn.Module) -> bool:
    """True if any parameter is a ``DTensor`` (the module went through ``fully_shard``)."""
    return any(isinstance(p, DTensor) for p in module.parameters())


def _owner(module: nn.Module, key: str) -> tuple[nn.Module, str]:
    parent, _, leaf = key.rpartition(".")
    return (module.get_submodule(parent) if parent else module), leaf


def _unit_of(key: str, units: Sequence[str]) -> str:
    for unit in units:
        if key.startswith(unit + "."):
            return unit
    return ""


def _check_keys(
    expected: dict[str, torch.Tensor], file_shapes: dict[str, tuple[int, ...]], source: str
) -> None:
    missing = sorted(set(expected) - set(file_shapes))
    unexpected = sorted(set(file_shapes) - set(expected))
    mismatched = [
        f"{k}: checkpoint {file_shapes[k]} vs model {tuple(expected[k].shape)}"
        for k in sorted(set(expected) & set(file_shapes))
        if tuple(file_shapes[k]) != tuple(expected[k].shape)
    ]
    if missing or unexpected or mismatched:
        parts = [f"{source}: the weights do not match the model built from its config."]
        for label, items in (("missing keys", missing), ("unexpected keys", unexpected),
                             ("shape mismatches", mismatched)):
            if items:
                shown = ", ".join(items[:20]) + (f", ... ({len(items) - 20} more)" if len(items) > 20 else "")
                parts.append(f"{label} ({len(items)}): {shown}")
        raise ValueError("\n  ".join(parts))


def _store(module: nn.Module, key: str, target: torch.Tensor, value: torch.Tensor, *, device: torch.device,
           is_buffer: bool) -> None:
    """Put ``value`` (a full tensor) where ``target`` (the module's tensor for ``key``) is."""
    if isinstance(target, DTensor):
        if value.dtype != target.dtype:
            raise ValueError(f"{key}: a transform changed the dtype to {value.dtype} on a sharded (FSDP2) module "
                             f"whose shard was allocated as {target.dtype}; sharded parameters keep their dtype")
        # Every rank read the same file: slice the local shard without communication, then drop the full tensor.
        shard = distribute_tensor(value.to(target.device), target.device_mesh, target.placements,
                                  src_data_rank=None)
        target.detach().copy_(shard)
        return
    if not target.is_meta:
        target.detach().copy_(value)
        return
    owner, leaf = _owner(module, key)
    value = value.to(device)
    if is_buffer:
        owner._buffers[leaf] = value
    else:
        setattr(owner, leaf, nn.Parameter(value, requires_grad=target.requires_grad))


@torch.no_grad()
def materialize_(
    module: nn.Module,
    path: str | Path,
    select: Callable[[str], str | None],
    *,
    device: torch.device | str = "cpu",
    units: Sequence[str] = (),
    not_in_file: Callable[[str], bool] = lambda key: False,
    transform: TensorTransform | None = None,
    on_unit: UnitCallback | None = None,
    source: str | None = None,
) -> nn.Module:
    """Load ``module`` (built on ``meta``, possibly LoRA-injected, checkpointed, compiled and ``fully_shard``-ed)
    in place from the safetensors file ``path``, unit by unit; returns ``module``.

    Args:
        select: ``select(file_key) -> module_key | None``, as for :func:`ltxf.models.checkpoint.read_tensors`
            (None: the tensor belongs to another component and is never read).
        device: where plain parameters go (a sharded module's shards are allocated on its mesh's device).
        units: submodule names loaded one after another (:func:`block_units`); the rest of the module is the
            last unit, ``""``.
        not_in_file: module keys the file does not hold (LoRA adapters): materialised uninitialised.
        transform: per-tensor hook (module docstring); ``on_unit``: per-unit hook.
        source: how errors name the file (default: the path).
    """
    path = Path(path)
    source = source or str(path)
    names = {file_key: name for file_key in checkpoint.list_keys(path) if (name := select(file_key)) is not None}
    file_keys = {name: file_key for file_key, name in names.items()}
    tensors = module.state_dict(keep_vars=True)
    buffers = {name for name, _ in module.named_buffers()}
    expected = {k: v for k, v in tensors.items() if not not_in_file(k)}
    file_shapes = {names[file_key]: shape for file_key, shape in checkpoint.read_tensor_shapes(path, names).items()}
    _check_keys(expected, file_shapes, source)

    if is_sharded(module) and any(t.is_meta for t in tensors.values()):
        # FSDP2's way to give a meta module storage: allocates this rank's shards only (and pads them).
        module.to_empty(device=device)
        tensors = module.state_dict(keep_vars=True)

    order = list(units) + [""]
    by_unit: dict[str, list[str]] = {unit: [] for unit in order}
    for key in tensors:
        by_unit[_unit_of(key, units)].append(key)
    num_loaded = 0
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            for unit in order:
                for key in by_unit[unit]:
                    target = tensors[key]
                    if key not in expected:
                        if target.is_meta:
                            _store(module, key, target, torch.empty(target.shape, dtype=target.dtype),
                                   device=torch.device(device), is_buffer=key in buffers)
                        continue
                    value = f.get_tensor(file_keys[key])
                    if value.is_floating_point() and value.dtype != target.dtype:
                        value = value.to(target.dtype)
                    if transform is not None:
                        value = transform(key, value)
                        if tuple(value.shape) != tuple(target.shape):
                            raise ValueError(f"{source}: the load transform changed {key} from shape "
                                             f"{tuple(target.shape)} to {tuple(value.shape)}")
                    _store(module, key, target, value, device=torch.device(device), is_buffer=key in buffers)
                    del value
                    num_loaded += 1
                if on_unit is not None:
                    on_unit(unit, module.get_submodule(unit) if unit else module)
    except (SafetensorError, OSError) as exc:
        raise ValueError(f"{source} is not a readable safetensors file: {exc}") from exc
    _check_nothing_on_meta(module, source)
    logger.debug("materialised %d tensors from %s in %d units", num_loaded, source, len(order))
    return module


def _check_nothing_on_meta(module: nn.Module, source: str) -> None:
    left = [n for n, t in [*module.named_parameters(), *module.named_buffers()] if t.is_meta]
    if left:
        raise ValueError(f"{source}: these tensors were not loaded and are still on the meta device: "
                         f"{_first(left)}")


def _first(items: Iterable[str], limit: int = 20) -> str:
    items = list(items)
    return ", ".join(items[:limit]) + (f", ... ({len(items) - limit} more)" if len(items) > limit else "")
