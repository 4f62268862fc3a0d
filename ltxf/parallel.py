"""Process groups and the parallelisation of the transformer, applied in one fixed order.

``parallelize`` runs: activation checkpointing per block -> optional ``torch.compile`` per block -> FSDP2
``fully_shard`` per block, then the root. LoRA injection and freezing must already have happened (FSDP2 must see
the final trainable set; pytorch/pytorch#186998). Replicated data parallel (the LoRA default) shards nothing and
all-reduces the trainable gradients after backward.

Activation checkpointing uses the composable ``torch.distributed._composable.checkpoint``, which keeps parameter
names unchanged (``checkpoint_wrapper`` would insert ``._checkpoint_wrapped_module.`` into them).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

logger = logging.getLogger(__name__)


@dataclass(frozen=True, kw_only=True)
class DistInfo:
    """Where this process sits: ``rank`` of ``world_size`` processes, running on ``device``."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed() -> DistInfo:
    """Initialise the default process group from torchrun's environment (NCCL on CUDA, gloo on CPU).

    A plain ``python train.py`` run (no torchrun variables) is a world of one with no process group.
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo", device_id=device
                                if device.type == "cuda" else None)
    return DistInfo(rank=rank, world_size=world_size, local_rank=local_rank, device=device)


def shutdown_distributed() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def checkpointed_blocks(num_blocks: int, *, every: int = 1, first: int | None = None) -> list[int]:
    """Indices of the blocks to recompute: every ``every``-th block (0, k, 2k, ...), or the first ``first``."""
    if first is not None:
        return list(range(min(first, num_blocks)))
    return list(range(0, num_blocks, every))


def apply_ac(blocks: nn.ModuleList, indices: list[int] | None = None, *, for_compile: bool = False) -> None:
    """Recompute the blocks at ``indices`` (None: all) in backward (non-reentrant: no input needs a gradient).

    Eager: the composable ``checkpoint`` (hooks around each block's call; the recomputation calls the block
    again, so anything wrapped around its forward, e.g. ``ltxf.block_swap``, runs again too).

    ``for_compile=True``: the block's forward itself runs under ``torch.utils.checkpoint.checkpoint``, to be
    compiled afterwards (``apply_compile``). Order: checkpointing first, then compile, so that the checkpoint is
    inside the compiled region: dynamo turns it into a recomputation region the compiler sees, and the
    partitioner recomputes exactly those ops, fused, in the backward graph. Compiling first and checkpointing
    around it (hooks) would hide the recomputation from the compiler: it would pick saved activations that
    are then dropped and recompute the whole compiled forward in the backward.
    """
    from torch.distributed._composable import checkpoint

    selected = range(len(blocks)) if indices is None else indices
    for index in selected:
        block = blocks[index]
        if not for_compile:
            checkpoint(block)
            continue
        forward = block.forward

        def checkpointed_forward(*args, _forward=forward, **kwargs):
            return torch.utils.checkpoint.checkpoint(_forward, *args, use_reentrant=False, **kwargs)

        block.forward = checkpointed_forward  # an instance attribute: parameter names are unchanged


def apply_compile(blocks: nn.ModuleList) -> None:
    """``torch.compile`` each block in place (``nn.Module.compile`` keeps parameter names)."""
    for block in blocks:
        block.compile(fullgraph=False)


def apply_fsdp(
    model: nn.Module, blocks: nn.ModuleList, *, param_dtype: torch.dtype | None, reduce_dtype: torch.dtype
) -> None:
    """FSDP2: shard each block, then the root (which owns the embeddings, AdaLN and output heads)."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    policy = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=reduce_dtype)
    for i, block in enumerate(blocks):
        # The last block's parameters are needed again at once by backward: keep them gathered.
        fully_shard(block, mp_policy=policy, reshard_after_forward=i < len(blocks) - 1)
    fully_shard(model, mp_policy=policy)


def parallelize(
    model: nn.Module,
    *,
    fsdp: bool,
    activation_checkpointing: bool,
    compile: bool,
    checkpoint_blocks: list[int] | None = None,
    param_dtype: torch.dtype | None,
    reduce_dtype: torch.dtype,
) -> nn.Module:
    """Apply AC (to the blocks at ``checkpoint_blocks``, None: all), compile and FSDP2 (in that order) to a model
    with a ``transformer_blocks`` ModuleList."""
    blocks = model.transformer_blocks
    compiling = compile and torch.cuda.is_available()
    if compile and not compiling:
        logger.warning("parallel.compile is ignored on CPU")
    if activation_checkpointing:
        apply_ac(blocks, checkpoint_blocks, for_compile=compiling)
    if compiling:
        apply_compile(blocks)
    if fsdp:
        if not dist.is_initialized():
            # FSDP2 in a plain single-process run: a world of one needs no rendezvous.
            dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
        apply_fsdp(model, blocks, param_dtype=param_dtype, reduce_dtype=reduce_dtype)
    return model


def all_reduce_mean_(tensors: list[torch.Tensor]) -> None:
    """Average tensors across processes in place (replicated data parallel), in one flat bucket."""
    if not dist.is_initialized() or dist.get_world_size() == 1 or not tensors:
        return
    flat = torch.cat([t.reshape(-1).float() for t in tensors])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    flat /= dist.get_world_size()
    offset = 0
    for t in tensors:
        n = t.numel()
        t.copy_(flat[offset : offset + n].view_as(t))
        offset += n


def all_reduce_sum(values: torch.Tensor) -> torch.Tensor:
    """Sum a small metrics tensor across processes (returns a new tensor)."""
    out = values.clone()
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(out, op=dist.ReduceOp.SUM)
    return out
