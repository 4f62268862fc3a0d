"""Block swap: the frozen weights of some transformer blocks live in (pinned) host memory and are copied to the
device one block ahead of their use, in the forward and in the backward's recomputation.

For a LoRA run on a card too small for the frozen base (``--parallel.blocks_to_swap N``). The frozen
Parameters of the last ``N`` blocks are moved to the host once (pinned when the device is CUDA) and stay there:
they are the truth, read by every forward, never written and never copied back. Each call of a swapped block
runs with device copies of them in place of the Parameters (swapped in for the call, restored after it, also
when the call ends by an exception such as checkpointing's early stop). Trainable parameters (the LoRA
adapters) are never swapped: they stay on the device as the optimizer holds them.

Schedule: when block ``i`` is called, the copy of the next swapped block in the current direction is issued on
a side stream (forward: ``i + 1``; backward recomputation, where blocks are called in reverse: ``i - 1``), so
the transfer overlaps block ``i``'s compute; a block whose copy was not prefetched (the first block the
recomputation calls, when it is swapped) is copied on demand. Block 0 always counts as a forward call, so the
end of a backward prefetches the first swapped block for the next step.

Memory: at most two swapped blocks are on the device at a time, plus whatever autograd keeps. With activation
checkpointing a block keeps nothing between its forward and its recomputation, so the device holds ``N - 2``
fewer blocks of frozen weights. Without checkpointing the forward keeps every block's weights for its
backward and swapping saves nothing (``train.py`` warns).

On the CPU the same schedule runs with host and device both the CPU (the copies are clones), so tests
exercise it and give bit-identical losses to no swap.

The same machinery keeps frozen text connectors off the device (``offload_text_connectors``,
``--parallel.offload_text_connectors``): all their blocks are swapped, and stream in once per step.

Restrictions (``ValueError``): not with FSDP2 (it owns the parameter storage) nor ``torch.compile`` (the
swap is host-side scheduling around the block call), and only for blocks that have frozen weights.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
from torch import nn

logger = logging.getLogger(__name__)

__all__ = ["BlockSwap", "apply_block_swap", "offload_text_connectors", "swap_blocks"]


@dataclass(eq=False)
class _Slot:
    """The device copies of one block's frozen weights, and the event after which they are complete."""

    tensors: list[torch.Tensor]
    ready: torch.cuda.Event | None


@dataclass(eq=False)
class BlockSwap:
    """The swap schedule of one ``transformer_blocks`` list (see the module docstring).

    ``owners[i]``: the ``(module, name)`` of every frozen parameter of block ``i`` (swapped blocks only);
    ``host[i]``: those parameters, on the host. ``copies`` counts host-to-device block copies (for tests and
    logs); ``prefetched`` how many of them were issued ahead of use.
    """

    blocks: nn.ModuleList
    device: torch.device
    owners: dict[int, list[tuple[nn.Module, str]]]
    host: dict[int, list[torch.Tensor]]
    copies: int = 0
    prefetched: int = 0
    _slots: dict[int, _Slot] = field(default_factory=dict)
    _last: int = -1
    _stream: torch.cuda.Stream | None = None

    def __post_init__(self) -> None:
        if self.device.type == "cuda":
            self._stream = torch.cuda.Stream(self.device)

    @property
    def swapped(self) -> list[int]:
        return sorted(self.owners)

    def _copy(self, index: int) -> _Slot:
        self.copies += 1
        host = self.host[index]
        if self._stream is None:  # the CPU: the same schedule, the copies are clones
            return _Slot([p.detach().clone() for p in host], None)
        # No wait on the compute stream: the host source is never written, and the copies' memory is handed to
        # the compute stream with record_stream, so the allocator cannot reuse it early.
        with torch.cuda.stream(self._stream):
            tensors = [p.detach().to(self.device, non_blocking=True) for p in host]
            ready = torch.cuda.Event()
            ready.record(self._stream)
        return _Slot(tensors, ready)

    def _take(self, index: int) -> list[torch.Tensor]:
        slot = self._slots.pop(index, None)
        if slot is None:
            slot = self._copy(index)
        if slot.ready is not None:
            stream = torch.cuda.current_stream(self.device)
            stream.wait_event(slot.ready)
            for tensor in slot.tensors:  # allocated on the side stream, used (and freed) on this one
                tensor.record_stream(stream)
        return slot.tensors

    def _prefetch(self, index: int) -> None:
        if index in self.owners and index not in self._slots:
            self._slots[index] = self._copy(index)
            self.prefetched += 1

    @contextlib.contextmanager
    def running(self, index: int) -> Iterator[None]:
        """Around block ``index``'s call: its frozen weights on the device (if swapped), the next one's copy
        issued, and the host Parameters back in place afterwards."""
        # The recomputation calls the blocks in reverse order; block 0 always starts a forward (so at the end of
        # a backward it prefetches the first swapped block for the next step's forward).
        backward = index != 0 and index <= self._last
        self._last = index
        tensors = self._take(index) if index in self.owners else None
        self._prefetch(index - 1 if backward else index + 1)
        if tensors is None:
            yield
            return
        owners = self.owners[index]
        for (module, name), tensor in zip(owners, tensors, strict=True):
            _holder(module, name)[name] = tensor
        try:
            yield
        finally:
            for (module, name), param in zip(owners, self.host[index], strict=True):
                _holder(module, name)[name] = param


def _holder(module: nn.Module, name: str) -> dict:
    return module._parameters if name in module._parameters else module._buffers


def apply_block_swap(transformer: nn.Module, num_blocks: int, device: torch.device | str) -> BlockSwap | None:
    """Keep the frozen weights of the last ``num_blocks`` of ``transformer.transformer_blocks`` on the host and
    swap them in per call; move everything else to ``device``. Returns the schedule (None for 0 blocks).

    Call it after freezing and LoRA injection (the adapters must already exist: only parameters with
    ``requires_grad=False`` are swapped), on a model loaded on the host or on the device, before activation
    checkpointing or after it (the recomputation calls the block again, through the swap), never with FSDP2
    or ``torch.compile``.
    """
    blocks = transformer.transformer_blocks
    if not isinstance(num_blocks, int) or not 0 <= num_blocks <= len(blocks):
        raise ValueError(f"parallel.blocks_to_swap must be an integer in [0, {len(blocks)}] (the number of "
                         f"transformer blocks), got {num_blocks!r}")
    if num_blocks == 0:
        return None
    return swap_blocks(transformer, blocks, range(len(blocks) - num_blocks, len(blocks)), device,
                       what="parallel.blocks_to_swap")


def offload_text_connectors(text_processor: nn.Module, device: torch.device | str) -> list[BlockSwap]:
    """Frozen text connectors off the device: every connector block's weights live on the host and stream to
    the device one block ahead of use (two connector blocks on the device at a time instead of all of them:
    about 3.4 of the 22B's 3.8 GiB stay on the host). The connectors run under ``no_grad`` once per step, so
    their weights are freed after each block; the transfer costs one host-to-device copy of the connectors per
    step, overlapped with their compute on CUDA. Everything else of ``text_processor`` moves to ``device``."""
    swaps = []
    for connector in (text_processor.video_connector, text_processor.audio_connector):
        blocks = connector.transformer_1d_blocks
        swaps.append(swap_blocks(text_processor, blocks, range(len(blocks)), device,
                                 what="parallel.offload_text_connectors"))
    return swaps


def swap_blocks(root: nn.Module, blocks: nn.ModuleList, indices: range | list[int], device: torch.device | str,
                *, what: str = "block swap") -> BlockSwap:
    """Swap the frozen weights of ``blocks[i]`` for ``i`` in ``indices`` (see the module docstring) and move
    every other parameter and buffer of ``root`` (which contains ``blocks``) to ``device``."""
    device = torch.device(device)
    from torch.distributed.tensor import DTensor

    if any(isinstance(p, DTensor) for p in root.parameters()):
        raise ValueError(f"{what} does not work with FSDP2-sharded parameters; use "
                         "parallel.data_parallel='replicate' (LoRA) or switch it off")
    if any(getattr(block, "_compiled_call_impl", None) is not None for block in blocks):
        raise ValueError(f"{what} does not work with parallel.compile; disable one of them")

    pin = device.type == "cuda"
    owners: dict[int, list[tuple[nn.Module, str]]] = {}
    host: dict[int, list[torch.Tensor]] = {}
    swapped_ids: set[int] = set()
    for index in indices:
        owners[index], host[index] = [], []
        for module in blocks[index].modules():
            # Frozen Parameters, and buffers: a quantized base (ltxf.quantization) keeps its codes and scales there.
            frozen = [(name, p) for name, p in module._parameters.items() if p is not None and not p.requires_grad]
            frozen += [(name, b) for name, b in module._buffers.items() if b is not None]
            for name, tensor in frozen:
                on_host = tensor.detach().to("cpu")
                if pin:
                    on_host = on_host.pin_memory()
                if name in module._parameters:
                    on_host = module._parameters[name] = nn.Parameter(on_host, requires_grad=False)
                else:
                    module._buffers[name] = on_host
                owners[index].append((module, name))
                host[index].append(on_host)
                swapped_ids.add(id(on_host))
        if not owners[index]:
            raise ValueError(f"{what}: block {index} has no frozen weights to swap (they all train); switch it off")
    # Everything else (resident blocks, the other layers, every adapter) goes to the device.
    for module in root.modules():
        for name, param in module._parameters.items():
            if param is not None and id(param) not in swapped_ids and param.device != device:
                module._parameters[name] = nn.Parameter(param.detach().to(device), requires_grad=param.requires_grad)
        for name, buffer in module._buffers.items():
            if buffer is not None and id(buffer) not in swapped_ids and buffer.device != device:
                module._buffers[name] = buffer.to(device)

    swap = BlockSwap(blocks=blocks, device=device, owners=owners, host=host)
    for index, block in enumerate(blocks):
        _wrap_forward(block, swap, index)
    swapped_bytes = sum(p.numel() * p.element_size() for params in host.values() for p in params)
    logger.info("%s: frozen weights of %d blocks (%.2f GiB) live on the host%s", what, len(owners),
                swapped_bytes / 2**30, " (pinned)" if pin else "")
    return swap


def _wrap_forward(block: nn.Module, swap: BlockSwap, index: int) -> None:
    """Run ``block``'s forward inside ``swap.running(index)``; every block is wrapped, so that a resident block
    issues the copy of the swapped block after it. The instance attribute keeps parameter names unchanged."""
    forward = block.forward

    def swapped_forward(*args, **kwargs):
        with swap.running(index):
            return forward(*args, **kwargs)

    block.forward = swapped_forward
