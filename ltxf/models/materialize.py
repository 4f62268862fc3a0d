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

import json
import logging
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

import torch
from torch import nn
from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor

from ltxf.models import checkpoint

logger = logging.getLogger(__name__)

TensorTransform = Callable[[str, torch.Tensor], torch.Tensor]
"""``transform(name, tensor) -> tensor``: called on each tensor read from the file (after the dtype cast)."""

UnitCallback = Callable[[str, nn.Module], None]
"""``on_unit(unit_name, unit_module)``: called once each unit (a block, then the remainder ``""``) is loaded."""



# safetensors dtype names -> torch dtypes (the format's own table).
_SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2, "I64": torch.int64, "I32": torch.int32,
    "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool,
}


class TensorFile:
    """Reads single tensors, or row ranges of them, from a safetensors file with plain file reads into memory
    the returned tensor owns.

    Why not ``safe_open``: its tensors are views of a memory map of the file, so every page a load touches stays
    mapped into the process (counted in its RSS) while any tensor read from it lives, and a parameter assigned
    from one keeps the file mapped for the whole run. Reading into fresh tensors keeps a rank's memory at what it
    holds. The header has been validated by :mod:`ltxf.models.checkpoint` before this is used.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._file = open(path, "rb")  # noqa: SIM115 (closed by close() / the context manager)
        header_size = int.from_bytes(self._file.read(8), "little")
        self._header = json.loads(self._file.read(header_size))
        self._header.pop("__metadata__", None)
        self._data_start = 8 + header_size

    def __enter__(self) -> TensorFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._file.close()

    def read(self, key: str, rows: tuple[int, int] | None = None) -> torch.Tensor:
        """Tensor ``key``, or only its rows ``[start, stop)`` along dim 0 (contiguous in the file)."""
        entry = self._header[key]
        if entry["dtype"] not in _SAFETENSORS_DTYPES:
            raise ValueError(f"{self.path}: tensor {key} has the unsupported dtype {entry['dtype']}")
        dtype = _SAFETENSORS_DTYPES[entry["dtype"]]
        shape = list(entry["shape"])
        begin, end = entry["data_offsets"]
        if rows is not None:
            row_bytes = (end - begin) // shape[0] if shape and shape[0] else 0
            begin, end = begin + rows[0] * row_bytes, begin + rows[1] * row_bytes
            shape[0] = rows[1] - rows[0]
        data = torch.empty(end - begin, dtype=torch.uint8)
        self._file.seek(self._data_start + begin)
        if end > begin and self._file.readinto(data.numpy()) != end - begin:
            raise ValueError(f"{self.path} is truncated: tensor {key} ends past the end of the file")
        return data.view(dtype).reshape(shape)


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


def _local_rows(target: DTensor) -> tuple[int, int] | None:
    """Rows ``[start, stop)`` of the full tensor that this rank holds, when the placements shard dim 0 only
    (FSDP2's ``Shard(0)``, ``torch.chunk`` sizes) and replicate elsewhere; None for any other layout."""
    if target.ndim == 0:
        return None
    start, stop = 0, target.shape[0]
    for mesh_dim, placement in enumerate(target.placements):
        if isinstance(placement, Replicate):
            continue
        if not (isinstance(placement, Shard) and placement.dim == 0):
            return None
        num_shards, index = target.device_mesh.size(mesh_dim), target.device_mesh.get_local_rank(mesh_dim)
        length = stop - start
        chunk = -(-length // num_shards)
        start, stop = start + min(index * chunk, length), start + min((index + 1) * chunk, length)
    return start, stop


def _assign(module: nn.Module, key: str, target: torch.Tensor, value: torch.Tensor, *, is_buffer: bool) -> None:
    """Replace the meta tensor ``target`` at ``key`` by ``value`` (a parameter keeps ``requires_grad``)."""
    owner, leaf = _owner(module, key)
    if is_buffer:
        owner._buffers[leaf] = value
    else:
        setattr(owner, leaf, nn.Parameter(value, requires_grad=target.requires_grad))


def _read(file: TensorFile, file_key: str, key: str, target: torch.Tensor, transform: TensorTransform | None,
          rows: tuple[int, int] | None, source: str) -> torch.Tensor:
    """One tensor (or its ``rows``), cast to ``target``'s dtype, through ``transform`` (full tensors only)."""
    value = file.read(file_key, rows)
    if value.is_floating_point() and value.dtype != target.dtype:
        value = value.to(target.dtype)
    if transform is not None:
        value = transform(key, value)
        if tuple(value.shape) != tuple(target.shape):
            raise ValueError(f"{source}: the load transform changed {key} from shape {tuple(target.shape)} to "
                             f"{tuple(value.shape)}")
    return value


def _load_tensor(module: nn.Module, file: TensorFile, file_key: str, key: str, target: torch.Tensor, *,
                 device: torch.device, is_buffer: bool, transform: TensorTransform | None, source: str) -> None:
    if not isinstance(target, DTensor):
        value = _read(file, file_key, key, target, transform, None, source).to(device)
        if target.is_meta:
            _assign(module, key, target, value, is_buffer=is_buffer)
        else:
            target.detach().copy_(value)
        return
    local = target.to_local()
    rows = _local_rows(target) if transform is None else None
    if rows is not None and (rows[1] - rows[0], *target.shape[1:]) == tuple(local.shape):
        # Only this rank's rows are read from the file.
        local.copy_(_read(file, file_key, key, target, None, rows, source))
        return
    value = _read(file, file_key, key, target, transform, None, source)
    if value.dtype != target.dtype:
        raise ValueError(f"{source}: the load transform changed {key} to {value.dtype} on a sharded (FSDP2) module "
                         f"whose shard was allocated as {target.dtype}; sharded parameters keep their dtype")
    # Every rank read the same file: slice the local shard without communication, then drop the full tensor.
    shard = distribute_tensor(value.to(target.device), target.device_mesh, target.placements, src_data_rank=None)
    local.copy_(shard.to_local())


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
        select: ``select(official_key) -> module_key | None``, as for :func:`ltxf.models.checkpoint.read_tensors`
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
    # ``select`` sees official names (a ComfyUI-layout or bare file is renamed); the data is read by the file's key.
    official = checkpoint.official_names(path)
    names = {file_key: name for file_key, key in official.items() if (name := select(key)) is not None}
    file_keys = {name: file_key for file_key, name in names.items()}
    tensors = module.state_dict(keep_vars=True)
    buffers = {name for name, _ in module.named_buffers()}
    expected = {k: v for k, v in tensors.items() if not not_in_file(k)}
    shapes = checkpoint.read_tensor_shapes(path, [official[file_key] for file_key in names])
    file_shapes = {name: shapes[official[file_key]] for file_key, name in names.items()}
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
    with TensorFile(path) as file:
        for unit in order:
            for key in by_unit[unit]:
                target = tensors[key]
                if key in expected:
                    _load_tensor(module, file, file_keys[key], key, target, device=torch.device(device),
                                 is_buffer=key in buffers, transform=transform, source=source)
                    num_loaded += 1
                elif target.is_meta:
                    _assign(module, key, target, torch.empty(target.shape, dtype=target.dtype, device=device),
                            is_buffer=key in buffers)
            if on_unit is not None:
                on_unit(unit, module.get_submodule(unit) if unit else module)
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
