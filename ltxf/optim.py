"""Optax-shaped optimizers on PyTorch kernels.

A ``GradientTransformation`` is a pair of functions ``init(params) -> opt_state`` and
``update(updates, opt_state, params) -> (updates, opt_state)``; ``chain`` composes them and
``apply_updates`` adds the final updates to the parameters. ``params``, ``updates`` and every per-parameter
part of an optimizer state are ``dict[str, Tensor]`` keyed by state-dict FQN (kept in sorted order, as
optree flattens them). Optimizer states are NamedTuples of tensors and dicts of tensors only, so they are
optree pytrees and ``torch.distributed.checkpoint`` can save them (see ``ltxf.state.state_to_dict``).

Donation. For memory, everything works in place, the way torchopt's ``inplace=True`` does and the way
``jax.jit(donate_argnums=...)`` lets XLA: ``update`` overwrites the incoming ``updates`` tensors (usually the
gradients) with the transformed updates and mutates the state tensors, and ``apply_updates`` mutates the
parameters. The returned objects are the ones to use; the ``updates`` and ``opt_state`` passed in are
donated and must not be read after the call. ``params`` passed to ``update`` are only read.

Everything accepts DTensor leaves (FSDP2 sharded parameters and gradients): the fp32 AdamW path is
``torch._foreach_*`` ops (DTensor implements them), the global norm is ``torch.nn.utils.get_total_norm``
(a partial norm all-reduced by ``full_tensor``), and the 8-bit path runs the bitsandbytes kernels on the
local shards and keeps its quantised moments as DTensors laid out like the parameter.

Step counters live on the CPU (as ``torch.optim.AdamW`` keeps its ``state_steps``) so reading them to
evaluate a schedule or a bias correction never synchronises with the accelerator.
"""

import logging
import math
from collections.abc import Callable
from typing import Any, NamedTuple

import torch
from torch import Tensor
from torch.distributed.tensor import DTensor, Replicate, Shard

logger = logging.getLogger(__name__)

__all__ = [
    "Params",
    "Updates",
    "OptState",
    "Schedule",
    "GradientTransformation",
    "EmptyState",
    "ClipByGlobalNormState",
    "ScaleByAdamState",
    "ScaleByAdam8bitState",
    "ScaleByScheduleState",
    "chain",
    "identity",
    "clip_by_global_norm",
    "scale_by_adam",
    "scale_by_adam_8bit",
    "add_decayed_weights",
    "scale_by_learning_rate",
    "adamw",
    "adamw_8bit",
    "apply_updates",
    "find_states",
    "last_grad_norm",
    "last_learning_rate",
    "constant_schedule",
    "linear_schedule",
    "cosine_schedule",
    "cosine_with_restarts_schedule",
    "polynomial_schedule",
    "step_schedule",
    "with_linear_warmup",
    "make_schedule",
    "SCHEDULES",
]

Params = dict[str, Tensor]
Updates = dict[str, Tensor]
OptState = Any  # a pytree of NamedTuples / tuples / dicts whose leaves are tensors
Schedule = Callable[[int | Tensor], float | Tensor]


class GradientTransformation(NamedTuple):
    """A pair of functions, as in optax.

    ``init(params) -> opt_state`` builds the state for ``params``. ``update(updates, opt_state, params)``
    returns ``(new_updates, new_opt_state)``; the ``updates`` and ``opt_state`` passed in are donated (see the
    module docstring). ``params`` may be ``None`` for transformations that do not read them.
    """

    init: Callable[[Params], OptState]
    update: Callable[[Updates, OptState, Params | None], tuple[Updates, OptState]]


class EmptyState(NamedTuple):
    """State of a transformation that keeps none."""


class ClipByGlobalNormState(NamedTuple):
    """``global_norm``: the pre-clip global L2 norm of the last update's input, float32 0-d tensor on the
    gradients' device (a plain tensor even for DTensor gradients). Read it for logging; it is overwritten
    in place on every update."""

    global_norm: Tensor


class ScaleByAdamState(NamedTuple):
    """``count``: per-parameter step, int64 0-d CPU tensors (one per parameter, as ``torch.optim.AdamW``'s
    ``state_steps``). ``mu`` / ``nu``: first and second moments, shaped, typed and placed like the parameter."""

    count: dict[str, Tensor]
    mu: dict[str, Tensor]
    nu: dict[str, Tensor]


class ScaleByAdam8bitState(NamedTuple):
    """8-bit Adam moments (bitsandbytes block-wise dynamic quantisation, 256-element blocks).

    ``count``: per-parameter step (int64 0-d, CPU). ``mu`` / ``nu``: uint8 codes shaped and placed like the
    parameter for quantised parameters, or float32 moments for the others (too small, or blocks that would
    straddle rows; see ``scale_by_adam_8bit``). ``mu_absmax`` / ``nu_absmax``: float32 block scales for the
    quantised parameters only, sharded like the parameter's rows: ``[rows, row_numel // 256]`` when a row
    holds whole blocks (LoRA A, weights), ``[rows // rows_per_block, 1]`` when a block holds whole rows
    (LoRA B: ``256 / rank`` rows per block). ``mu_qmap`` / ``nu_qmap``: the signed / unsigned 256-entry
    dynamic code books.
    """

    count: dict[str, Tensor]
    mu: dict[str, Tensor]
    nu: dict[str, Tensor]
    mu_absmax: dict[str, Tensor]
    nu_absmax: dict[str, Tensor]
    mu_qmap: Tensor
    nu_qmap: Tensor


class ScaleByScheduleState(NamedTuple):
    """``count``: number of updates done (int64 0-d, CPU); the next update uses ``schedule(count)``.
    ``learning_rate``: the learning rate the last update used (float64 0-d, CPU), for logging."""

    count: Tensor
    learning_rate: Tensor


# --------------------------------------------------------------------------------------------------------
# helpers


def _local(t: Tensor) -> Tensor:
    return t.to_local() if isinstance(t, DTensor) else t


def _check_keys(what: str, got: dict[str, Tensor], expected: dict[str, Tensor]) -> None:
    if got.keys() != expected.keys():
        missing = sorted(expected.keys() - got.keys())[:5]
        extra = sorted(got.keys() - expected.keys())[:5]
        raise ValueError(
            f"{what}: keys do not match the optimizer state (missing {missing}, unexpected {extra}); "
            "updates must have exactly the keys of the params the state was initialised with"
        )


def _state_device(params: Params) -> torch.device:
    for p in params.values():
        return _local(p).device
    return torch.device("cpu")


# --------------------------------------------------------------------------------------------------------
# combinators


def chain(*transforms: GradientTransformation) -> GradientTransformation:
    """Apply ``transforms`` in order; the state is the tuple of their states."""

    def init(params: Params) -> tuple[OptState, ...]:
        return tuple(tx.init(params) for tx in transforms)

    def update(
        updates: Updates, state: tuple[OptState, ...], params: Params | None = None
    ) -> tuple[Updates, tuple[OptState, ...]]:
        if len(state) != len(transforms):
            raise ValueError(f"chain: state has {len(state)} parts but the chain has {len(transforms)} transforms")
        new_states = []
        for tx, s in zip(transforms, state, strict=True):
            updates, s = tx.update(updates, s, params)
            new_states.append(s)
        return updates, tuple(new_states)

    return GradientTransformation(init, update)


def identity() -> GradientTransformation:
    """Leave updates unchanged."""
    return GradientTransformation(lambda params: EmptyState(), lambda updates, state, params=None: (updates, state))


def find_states(opt_state: OptState, state_type: type) -> list:
    """All sub-states of type ``state_type`` in ``opt_state`` (searching through nested tuples), in order."""
    if isinstance(opt_state, state_type):
        return [opt_state]
    if isinstance(opt_state, tuple) and not hasattr(opt_state, "_fields"):
        return [found for s in opt_state for found in find_states(s, state_type)]
    return []


def last_grad_norm(opt_state: OptState) -> Tensor | None:
    """The pre-clip global gradient norm of the last update (device tensor), or ``None`` without a clip."""
    found = find_states(opt_state, ClipByGlobalNormState)
    return found[0].global_norm if found else None


def last_learning_rate(opt_state: OptState) -> Tensor | None:
    """The learning rate of the last update (CPU float64 tensor), or ``None`` without a learning-rate scale."""
    found = find_states(opt_state, ScaleByScheduleState)
    return found[0].learning_rate if found else None


# --------------------------------------------------------------------------------------------------------
# clipping


def clip_by_global_norm(max_norm: float) -> GradientTransformation:
    """Scale updates by ``min(1, max_norm / (norm + 1e-6))``, ``norm`` being their global L2 norm.

    The same rule and epsilon as ``torch.nn.utils.clip_grad_norm_``. The norm is computed with foreach
    kernels (``torch.nn.utils.get_total_norm``); for DTensor gradients the partial norms are reduced across
    the mesh with ``full_tensor``. The pre-clip norm is stored in the state (``ClipByGlobalNormState``,
    ``last_grad_norm``) on the device, so logging it costs no host sync until it is read. Pass
    ``max_norm=math.inf`` to only measure. Non-finite gradients give a non-finite norm and non-finite
    updates; the step is expected to check the norm.
    """
    if not max_norm > 0:
        raise ValueError(f"clip_by_global_norm: max_norm must be > 0 (math.inf to only measure), got {max_norm}")

    def init(params: Params) -> ClipByGlobalNormState:
        return ClipByGlobalNormState(global_norm=torch.zeros((), dtype=torch.float32, device=_state_device(params)))

    @torch.no_grad()
    def update(
        updates: Updates, state: ClipByGlobalNormState, params: Params | None = None
    ) -> tuple[Updates, ClipByGlobalNormState]:
        grads = list(updates.values())
        if not grads:
            return updates, state
        norm = torch.nn.utils.get_total_norm(grads, norm_type=2.0, foreach=True)
        if isinstance(norm, DTensor):
            norm = norm.full_tensor()
        state.global_norm.copy_(norm)
        if math.isfinite(max_norm):
            coef = torch.clamp(max_norm / (norm.float() + 1e-6), max=1.0)
            by_device: dict[torch.device, list[Tensor]] = {}
            for g in grads:
                by_device.setdefault(_local(g).device, []).append(g)
            for device, group in by_device.items():
                torch._foreach_mul_(group, coef.to(device))
        return updates, state

    return GradientTransformation(init, update)


# --------------------------------------------------------------------------------------------------------
# Adam


def _adam_moments_and_direction_(
    grads: list[Tensor], mu: list[Tensor], nu: list[Tensor], steps: list[Tensor], b1: float, b2: float, eps: float
) -> None:
    """In place: advance steps and moments, then overwrite ``grads`` with mu_hat / (sqrt(nu_hat) + eps).

    The moment and denominator arithmetic is the one ``torch.optim.adam``'s foreach path uses.
    """
    if not grads:
        return
    torch._foreach_add_(steps, 1)
    torch._foreach_lerp_(mu, grads, 1.0 - b1)
    torch._foreach_mul_(nu, b2)
    torch._foreach_addcmul_(nu, grads, grads, 1.0 - b2)
    counts = [int(s) for s in steps]  # CPU tensors: no device sync
    bias_correction1 = [1.0 - b1**c for c in counts]
    bias_correction2_sqrt = [math.sqrt(1.0 - b2**c) for c in counts]
    denom = torch._foreach_sqrt(nu)
    torch._foreach_div_(denom, bias_correction2_sqrt)
    torch._foreach_add_(denom, eps)
    torch._foreach_mul_(denom, bias_correction1)
    # grads <- 0 + mu / denom: reuses the donated gradient buffers (DTensor has no _foreach_copy_ strategy).
    torch._foreach_zero_(grads)
    torch._foreach_addcdiv_(grads, mu, denom)


def _validate_adam(b1: float, b2: float, eps: float) -> None:
    for name, beta in (("b1", b1), ("b2", b2)):
        if not 0.0 <= beta < 1.0:
            raise ValueError(f"adam: {name} must be in [0, 1), got {beta}")
    if not eps >= 0.0:
        raise ValueError(f"adam: eps must be >= 0, got {eps}")


def scale_by_adam(b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8) -> GradientTransformation:
    """Replace updates by Adam's bias-corrected direction ``mu_hat / (sqrt(nu_hat) + eps)``.

    foreach kernels over the sorted FQN list, under ``no_grad``, in place: the incoming updates tensors
    receive the direction (donated) and the moments are updated in place (the state is donated). Moments
    have the parameters' dtype and placement (DTensor in, DTensor moments out); steps are per parameter.
    """
    _validate_adam(b1, b2, eps)

    def init(params: Params) -> ScaleByAdamState:
        with torch.no_grad():
            return ScaleByAdamState(
                count={k: torch.zeros((), dtype=torch.int64) for k in params},
                mu={k: torch.zeros_like(p, memory_format=torch.preserve_format) for k, p in params.items()},
                nu={k: torch.zeros_like(p, memory_format=torch.preserve_format) for k, p in params.items()},
            )

    @torch.no_grad()
    def update(updates: Updates, state: ScaleByAdamState, params: Params | None = None):
        _check_keys("scale_by_adam", updates, state.mu)
        keys = list(state.mu)
        _adam_moments_and_direction_(
            [updates[k] for k in keys],
            [state.mu[k] for k in keys],
            [state.nu[k] for k in keys],
            [state.count[k] for k in keys],
            b1,
            b2,
            eps,
        )
        return updates, state

    return GradientTransformation(init, update)


_BLOCKSIZE = 256  # bitsandbytes' block size for 8-bit optimizer states


def _block_rows(p: Tensor) -> tuple[int, int] | None:
    """``(rows_per_block, blocks_per_row)`` when 256-element blocks align with ``p``'s rows (a row holds
    whole blocks, or a block whole rows), else None."""
    if p.dim() == 0:
        return None
    row_numel = p.numel() // p.shape[0] if p.shape[0] else 0
    if row_numel and row_numel % _BLOCKSIZE == 0:
        return 1, row_numel // _BLOCKSIZE
    if row_numel and _BLOCKSIZE % row_numel == 0 and p.shape[0] % (_BLOCKSIZE // row_numel) == 0:
        return _BLOCKSIZE // row_numel, 1
    return None


def _quantisable(p: Tensor, min_8bit_size: int) -> bool:
    """Whether ``p`` gets 8-bit moments.

    Quantisation blocks must not straddle rows partially (a row holds whole blocks, or a block holds whole
    rows, e.g. LoRA B ``[out, rank]`` with rank dividing 256), so that the block scales shard exactly like the
    parameter's rows (FSDP2 shards dim 0): a DCP checkpoint of the 8-bit state then reshards to any world
    size. This is decided from the global shape alone, so every layout of the same model gets the same
    state; a sharded layout that would cut a multi-row block is refused (``ValueError`` at init).
    """
    if p.numel() < min_8bit_size or _block_rows(p) is None:
        return False
    if isinstance(p, DTensor):
        return all(isinstance(pl, Replicate) or (isinstance(pl, Shard) and pl.dim == 0) for pl in p.placements)
    return True


def _check_shard_alignment(name: str, p: Tensor, rows_per_block: int) -> None:
    """FSDP2 shards dim 0 in chunks of ``ceil(rows / n)`` rows; a multi-row block must not be cut by one."""
    if rows_per_block == 1 or not isinstance(p, DTensor):
        return
    rows = p.shape[0]
    for mesh_dim, placement in enumerate(p.placements):
        if isinstance(placement, Shard):
            chunk = -(-rows // p.device_mesh.size(mesh_dim))
            if chunk % rows_per_block:
                raise ValueError(
                    f"scale_by_adam_8bit: {name} {tuple(p.shape)} is sharded in chunks of {chunk} rows over "
                    f"{p.device_mesh.size(mesh_dim)} ranks, which cuts its 8-bit blocks of {rows_per_block} rows; "
                    "use a world size that divides its rows into multiples of that, or "
                    "parallel.data_parallel='replicate' for LoRA"
                )


def _like_param(local: Tensor, p: Tensor, shape: tuple[int, ...]) -> Tensor:
    """Wrap a per-rank tensor whose dim 0 is sharded like ``p``'s rows as a DTensor (plain if ``p`` is)."""
    if not isinstance(p, DTensor):
        return local
    stride = torch.empty(shape, device="meta").stride()
    return DTensor.from_local(local, p.device_mesh, p.placements, run_check=False, shape=shape, stride=stride)


_CHUNK_NUMEL = 1 << 23
"""Elements the 8-bit update processes with one set of kernels (its float32 temporaries: 32 MiB each)."""


def _chunks(keys: list[str], tensors: dict[str, Tensor], max_numel: int) -> list[list[str]]:
    """Consecutive runs of ``keys`` of at most ``max_numel`` elements (a larger tensor is a run of its own)."""
    runs: list[list[str]] = []
    size = max_numel
    for k in keys:
        numel = _local(tensors[k]).numel()
        if size + numel > max_numel:
            runs.append([])
            size = 0
        runs[-1].append(k)
        size += numel
    return runs


def _adam_8bit_chunk_(keys: list[str], updates: Updates, state: "ScaleByAdam8bitState", count: int, b1: float,
                      b2: float, eps: float, bnb_ops: Any) -> None:
    """One 8-bit Adam step of several parameters with one set of kernels (a multi-tensor update).

    Every parameter's blocks are whole (``_quantisable``), so quantising the concatenation block-wise is
    quantising each parameter block-wise: the codes are those of a per-parameter update, bit for bit.
    """
    grads = [_local(updates[k]) for k in keys]
    g32 = torch.cat([g.reshape(-1) for g in grads])
    if g32.dtype != torch.float32:
        g32 = g32.float()
    moments = []
    for codes, absmax, qmap in ((state.mu, state.mu_absmax, state.mu_qmap), (state.nu, state.nu_absmax,
                                                                             state.nu_qmap)):
        local_codes = [_local(codes[k]) for k in keys]
        local_absmax = [_local(absmax[k]) for k in keys]
        flat_codes = torch.cat([c.reshape(-1) for c in local_codes])
        flat_absmax = torch.cat([a.reshape(-1) for a in local_absmax])
        values = bnb_ops.dequantize_blockwise(flat_codes, flat_absmax, qmap, _BLOCKSIZE, torch.float32)
        moments.append((values, local_codes, local_absmax, qmap))
    m, v = moments[0][0], moments[1][0]
    # Same op sequence as bitsandbytes' 8-bit Adam, so the requantised codes match it bit for bit.
    m.mul_(b1).add_(g32, alpha=1.0 - b1)
    v.mul_(b2).addcmul_(g32, g32, value=1.0 - b2)
    denom = (v.sqrt() / math.sqrt(1.0 - b2**count)).add_(eps).mul_(1.0 - b1**count)
    torch.div(m, denom, out=g32)
    sizes = [g.numel() for g in grads]
    torch._foreach_copy_(grads, [d.view(g.shape) for d, g in zip(g32.split(sizes), grads, strict=True)])
    for values, local_codes, local_absmax, qmap in moments:
        new_codes, new_absmax = bnb_ops.quantize_blockwise(values, qmap, _BLOCKSIZE)
        torch._foreach_copy_(local_codes, [c.view(t.shape) for c, t in
                                           zip(new_codes.split(sizes), local_codes, strict=True)])
        block_sizes = [a.numel() for a in local_absmax]
        torch._foreach_copy_(local_absmax, [a.view(t.shape) for a, t in
                                            zip(new_absmax.split(block_sizes), local_absmax, strict=True)])


def scale_by_adam_8bit(
    b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8, *, min_8bit_size: int = 4096
) -> GradientTransformation:
    """Adam direction with 8-bit block-wise quantised moments (bitsandbytes kernels), as ``AdamW8bit``.

    A multi-tensor update: the quantised parameters that share a device and a step count are processed in
    chunks of up to 8 M elements, each with one fixed set of kernels whatever the number of parameters in
    it: concatenate the gradients, codes and block scales, dequantise ``mu``/``nu`` with
    ``bitsandbytes::dequantize_blockwise``, update them in fp32 with the arithmetic of bitsandbytes' own 8-bit
    Adam, requantise them with ``bitsandbytes::quantize_blockwise`` (new block scales), and copy codes, scales
    and ``mu_hat / (sqrt(nu_hat) + eps)`` back with ``_foreach_copy_`` (the updates are donated). About 20
    kernels per chunk: a LoRA block of the 22B (48 adapters, 4.5 M elements) takes a fraction of one chunk.
    Runs wherever bitsandbytes has these ops (CPU and CUDA).

    A parameter is quantised when it has at least ``min_8bit_size`` elements (bitsandbytes' default 4096)
    and its 256-element blocks align with its rows: each row (``numel // shape[0]``) a multiple of 256
    elements (weights, LoRA A), or 256 a multiple of the row with whole blocks of rows (LoRA B ``[out, r]``
    with ``r`` dividing 256). Others keep fp32 moments (biases, norms, odd shapes). For DTensor parameters
    (sharded on dim 0 or replicated) the kernels run on the local shard, and codes and block scales are
    DTensors sharded like the parameter's rows, so DCP saves them and can reshard them.

    With the same gradients the quantised moments are bit-identical to ``bitsandbytes.optim.AdamW8bit``'s
    (see tests/test_optim.py).
    """
    _validate_adam(b1, b2, eps)
    if min_8bit_size < 1:
        raise ValueError(f"scale_by_adam_8bit: min_8bit_size must be >= 1, got {min_8bit_size}")
    import bitsandbytes.functional as bnb_functional  # deferred: importing bitsandbytes probes backends

    bnb_ops = torch.ops.bitsandbytes

    def init(params: Params) -> ScaleByAdam8bitState:
        device = _state_device(params)
        mu, nu, mu_absmax, nu_absmax = {}, {}, {}, {}
        num_quantised = 0
        with torch.no_grad():
            for k, p in params.items():
                if _quantisable(p, min_8bit_size):
                    num_quantised += 1
                    rows_per_block, blocks_per_row = _block_rows(p)
                    _check_shard_alignment(k, p, rows_per_block)
                    local = _local(p)
                    mu[k] = _like_param(torch.zeros(local.shape, dtype=torch.uint8, device=local.device), p, p.shape)
                    nu[k] = _like_param(torch.zeros(local.shape, dtype=torch.uint8, device=local.device), p, p.shape)
                    scale_shape = (p.shape[0] // rows_per_block, blocks_per_row)
                    local_rows = local.shape[0] // rows_per_block if local.dim() else 0
                    for absmax in (mu_absmax, nu_absmax):
                        zeros = torch.zeros((local_rows, blocks_per_row), dtype=torch.float32, device=local.device)
                        absmax[k] = _like_param(zeros, p, scale_shape)
                else:
                    mu[k] = torch.zeros_like(p, dtype=torch.float32)
                    nu[k] = torch.zeros_like(p, dtype=torch.float32)
        logger.debug("scale_by_adam_8bit: %d of %d parameters get 8-bit moments", num_quantised, len(params))
        return ScaleByAdam8bitState(
            count={k: torch.zeros((), dtype=torch.int64) for k in params},
            mu=mu,
            nu=nu,
            mu_absmax=mu_absmax,
            nu_absmax=nu_absmax,
            mu_qmap=bnb_functional.create_dynamic_map(signed=True).to(device),
            nu_qmap=bnb_functional.create_dynamic_map(signed=False).to(device),
        )

    @torch.no_grad()
    def update(updates: Updates, state: ScaleByAdam8bitState, params: Params | None = None):
        _check_keys("scale_by_adam_8bit", updates, state.mu)
        full = [k for k in state.mu if k not in state.mu_absmax]
        # fp32 moments of low-precision params: run the foreach math on fp32 copies of those gradients
        work = [updates[k] if updates[k].dtype == torch.float32 else updates[k].float() for k in full]
        _adam_moments_and_direction_(
            work, [state.mu[k] for k in full], [state.nu[k] for k in full], [state.count[k] for k in full], b1, b2, eps
        )
        for k, w in zip(full, work, strict=True):
            if w is not updates[k]:
                updates[k].copy_(w)
        quantised = list(state.mu_absmax)
        if quantised:
            counts = [state.count[k] for k in quantised]
            torch._foreach_add_(counts, 1)
            groups: dict[tuple, list[str]] = {}
            for k, count in zip(quantised, torch.stack(counts).tolist(), strict=True):  # CPU: no device sync
                if _local(updates[k]).numel():  # an FSDP2 rank can hold an empty shard
                    groups.setdefault((_local(updates[k]).device, count), []).append(k)
            for (_, count), keys in groups.items():
                for chunk in _chunks(keys, updates, _CHUNK_NUMEL):
                    _adam_8bit_chunk_(chunk, updates, state, count, b1, b2, eps, bnb_ops)
        return updates, state

    return GradientTransformation(init, update)


# --------------------------------------------------------------------------------------------------------
# weight decay, learning rate


def add_decayed_weights(weight_decay: float) -> GradientTransformation:
    """``updates += weight_decay * params`` (decoupled weight decay, applied before the learning rate)."""
    if not weight_decay >= 0.0:
        raise ValueError(f"add_decayed_weights: weight_decay must be >= 0, got {weight_decay}")

    def init(params: Params) -> EmptyState:
        return EmptyState()

    @torch.no_grad()
    def update(updates: Updates, state: EmptyState, params: Params | None = None):
        if weight_decay == 0.0:
            return updates, state
        if params is None:
            raise ValueError("add_decayed_weights: update needs params (pass them to tx.update)")
        _check_keys("add_decayed_weights", updates, params)
        keys = list(updates)
        torch._foreach_add_([updates[k] for k in keys], [params[k] for k in keys], alpha=weight_decay)
        return updates, state

    return GradientTransformation(init, update)


def scale_by_learning_rate(learning_rate: float | Schedule) -> GradientTransformation:
    """``updates *= -lr``, with ``lr = learning_rate(count)`` for a schedule (count = updates done so far).

    The first update uses ``schedule(0)``, like ``torch.optim`` + ``lr_scheduler`` stepped after the
    optimizer. The schedule is evaluated on a Python int (the counter lives on the CPU).
    """
    schedule = learning_rate if callable(learning_rate) else constant_schedule(float(learning_rate))

    def init(params: Params) -> ScaleByScheduleState:
        return ScaleByScheduleState(
            count=torch.zeros((), dtype=torch.int64), learning_rate=torch.zeros((), dtype=torch.float64)
        )

    @torch.no_grad()
    def update(updates: Updates, state: ScaleByScheduleState, params: Params | None = None):
        lr = float(schedule(int(state.count)))
        if updates:
            torch._foreach_mul_(list(updates.values()), -lr)
        state.learning_rate.fill_(lr)
        state.count.add_(1)
        return updates, state

    return GradientTransformation(init, update)


def adamw(
    learning_rate: float | Schedule,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    weight_decay: float = 0.01,
) -> GradientTransformation:
    """AdamW with ``torch.optim.AdamW``'s defaults and semantics (decay scaled by the learning rate).

    ``chain(scale_by_adam, add_decayed_weights, scale_by_learning_rate)``; in place, state donated. Matches
    ``torch.optim.AdamW(foreach=True)`` to float32 rounding (see tests/test_optim.py).
    """
    return chain(scale_by_adam(b1, b2, eps), add_decayed_weights(weight_decay), scale_by_learning_rate(learning_rate))


def adamw_8bit(
    learning_rate: float | Schedule,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    weight_decay: float = 0.01,
    *,
    min_8bit_size: int = 4096,
) -> GradientTransformation:
    """AdamW with 8-bit quantised moments (``bitsandbytes.optim.AdamW8bit``'s algorithm and defaults).

    ``chain(scale_by_adam_8bit, add_decayed_weights, scale_by_learning_rate)``; in place, state donated.
    """
    return chain(
        scale_by_adam_8bit(b1, b2, eps, min_8bit_size=min_8bit_size),
        add_decayed_weights(weight_decay),
        scale_by_learning_rate(learning_rate),
    )


@torch.no_grad()
def apply_updates(params: Params, updates: Updates) -> Params:
    """``params += updates`` in place (foreach) and return ``params``.

    The parameter tensors keep their identity, so a module whose parameters these are sees the new values;
    ``updates`` may be freed afterwards.
    """
    _check_keys("apply_updates", updates, params)
    keys = list(params)
    if keys:
        torch._foreach_add_([params[k] for k in keys], [updates[k] for k in keys])
    return params


# --------------------------------------------------------------------------------------------------------
# schedules: pure functions step -> lr, on a Python int (returning float) or a 0-d tensor (returning a
# float64 0-d tensor on the step's device)


def _as_number(step: int | Tensor) -> float | Tensor:
    if isinstance(step, Tensor):
        if step.dim() != 0:
            raise ValueError(f"schedule: step must be an int or a 0-d tensor, got shape {tuple(step.shape)}")
        return step.to(torch.float64)
    return float(step)


def _clamp(x: float | Tensor, lo: float, hi: float) -> float | Tensor:
    return torch.clamp(x, lo, hi) if isinstance(x, Tensor) else min(max(x, lo), hi)


def _cos(x: float | Tensor) -> float | Tensor:
    return torch.cos(x) if isinstance(x, Tensor) else math.cos(x)


def _floor(x: float | Tensor) -> float | Tensor:
    return torch.floor(x) if isinstance(x, Tensor) else float(math.floor(x))


def _check_horizon(name: str, horizon: int) -> None:
    if horizon < 1:
        raise ValueError(f"{name} schedule: the decay horizon must be >= 1 step, got {horizon}")


def constant_schedule(value: float) -> Schedule:
    """``lr(t) = value``."""

    def schedule(step: int | Tensor) -> float | Tensor:
        t = _as_number(step)
        return t * 0.0 + value if isinstance(t, Tensor) else value

    return schedule


def linear_schedule(base_lr: float, total_steps: int, start_factor: float = 1.0, end_factor: float = 0.1) -> Schedule:
    """``torch.optim.lr_scheduler.LinearLR``: the factor goes linearly from ``start_factor`` to ``end_factor``
    over ``total_steps`` steps and then stays at ``end_factor``."""
    _check_horizon("linear", total_steps)
    if not (0.0 < start_factor <= 1.0 and 0.0 <= end_factor <= 1.0):
        raise ValueError(
            f"linear schedule: need 0 < start_factor <= 1 and 0 <= end_factor <= 1, got {start_factor}, {end_factor}"
        )

    def schedule(step: int | Tensor) -> float | Tensor:
        t = _clamp(_as_number(step), 0.0, total_steps)
        return base_lr * (start_factor + (end_factor - start_factor) * t / total_steps)

    return schedule


def cosine_schedule(base_lr: float, total_steps: int, eta_min: float = 0.0) -> Schedule:
    """``torch.optim.lr_scheduler.CosineAnnealingLR`` with ``T_max = total_steps``; stays at ``eta_min``
    after ``total_steps`` (torch's would rise again)."""
    _check_horizon("cosine", total_steps)

    def schedule(step: int | Tensor) -> float | Tensor:
        t = _clamp(_as_number(step), 0.0, total_steps)
        return eta_min + (base_lr - eta_min) * (1.0 + _cos(math.pi * t / total_steps)) / 2.0

    return schedule


def cosine_with_restarts_schedule(base_lr: float, t_0: int, t_mult: int = 1, eta_min: float = 5e-5) -> Schedule:
    """``torch.optim.lr_scheduler.CosineAnnealingWarmRestarts``: cosine from ``base_lr`` to ``eta_min`` over
    ``t_0`` steps, restarting; each cycle ``t_mult`` times longer than the last. Note the reference default
    ``eta_min = 5e-5`` lies above small base learning rates, which then rise instead of decaying."""
    if t_0 < 1 or t_mult < 1 or int(t_0) != t_0 or int(t_mult) != t_mult:
        raise ValueError(f"cosine_with_restarts schedule: need integers t_0 >= 1 and t_mult >= 1, got {t_0}, {t_mult}")

    def schedule(step: int | Tensor) -> float | Tensor:
        t = _clamp(_as_number(step), 0.0, math.inf)
        if t_mult == 1:
            t_cur, t_i = t - _floor(t / t_0) * t_0, float(t_0)
        else:
            log = torch.log if isinstance(t, Tensor) else math.log
            n = _floor(log(t / t_0 * (t_mult - 1) + 1.0) / math.log(t_mult))
            t_cur = t - t_0 * (t_mult**n - 1) / (t_mult - 1)
            t_i = t_0 * t_mult**n
        return eta_min + (base_lr - eta_min) * (1.0 + _cos(math.pi * t_cur / t_i)) / 2.0

    return schedule


def polynomial_schedule(base_lr: float, total_steps: int, power: float = 1.0) -> Schedule:
    """``torch.optim.lr_scheduler.PolynomialLR``: ``base_lr * (1 - t / total_steps) ** power``, 0 after."""
    _check_horizon("polynomial", total_steps)
    if not power > 0:
        raise ValueError(f"polynomial schedule: power must be > 0, got {power}")

    def schedule(step: int | Tensor) -> float | Tensor:
        t = _clamp(_as_number(step), 0.0, total_steps)
        return base_lr * (1.0 - t / total_steps) ** power

    return schedule


def step_schedule(base_lr: float, step_size: int, gamma: float = 0.1) -> Schedule:
    """``torch.optim.lr_scheduler.StepLR``: ``base_lr * gamma ** floor(t / step_size)``."""
    if step_size < 1 or int(step_size) != step_size:
        raise ValueError(f"step schedule: step_size must be an integer >= 1, got {step_size}")

    def schedule(step: int | Tensor) -> float | Tensor:
        t = _clamp(_as_number(step), 0.0, math.inf)
        return base_lr * gamma ** _floor(t / step_size)

    return schedule


def with_linear_warmup(schedule: Schedule, base_lr: float, warmup_steps: int) -> Schedule:
    """Linear warmup for ``warmup_steps`` steps, then ``schedule`` started afresh.

    ``lr(t) = base_lr * (t + 1) / warmup_steps`` for ``t < warmup_steps`` (the first update already moves;
    ``base_lr`` is reached at the end of warmup), then ``schedule(t - warmup_steps)``.
    """
    if warmup_steps < 0 or int(warmup_steps) != warmup_steps:
        raise ValueError(f"warmup_steps must be an integer >= 0, got {warmup_steps}")
    if warmup_steps == 0:
        return schedule

    def warmed(step: int | Tensor) -> float | Tensor:
        t = _as_number(step)
        if isinstance(t, Tensor):
            after = schedule(torch.clamp(t - warmup_steps, min=0.0))
            return torch.where(t < warmup_steps, base_lr * (t + 1.0) / warmup_steps, after)
        return base_lr * (t + 1.0) / warmup_steps if t < warmup_steps else schedule(int(t) - warmup_steps)

    return warmed


SCHEDULES: dict[str, tuple[str, ...]] = {
    "constant": (),
    "linear": ("start_factor", "end_factor"),
    "cosine": ("eta_min",),
    "cosine_with_restarts": ("t_0", "t_mult", "eta_min"),
    "polynomial": ("power",),
    "step": ("step_size", "gamma"),
}
"""Schedule names accepted by ``make_schedule`` and the extra parameters each accepts."""

_TORCH_PARAM_NAMES = {"T_0": "t_0", "T_mult": "t_mult"}  # the names ltx-trainer's scheduler_params use


def make_schedule(name: str, base_lr: float, total_steps: int, warmup_steps: int = 0, **params: Any) -> Schedule:
    """Build a named schedule with the reference trainer's defaults (ltx-trainer-behaviour.md 1.7).

    The decay horizon is ``total_steps - warmup_steps`` steps, after an optional linear warmup
    (``with_linear_warmup``). Defaults, per name:

    - ``constant``.
    - ``linear``: start_factor 1.0, end_factor 0.1 (LinearLR).
    - ``cosine``: eta_min 0 (CosineAnnealingLR).
    - ``cosine_with_restarts``: t_0 = horizon // 4, t_mult 1, eta_min 5e-5 (CosineAnnealingWarmRestarts);
      ``T_0`` / ``T_mult`` are accepted as aliases.
    - ``polynomial``: power 1.0 (PolynomialLR).
    - ``step``: step_size = horizon // 2, gamma 0.1 (StepLR).
    """
    if name not in SCHEDULES:
        raise ValueError(f"make_schedule: unknown schedule {name!r}; expected one of {sorted(SCHEDULES)}")
    params = {_TORCH_PARAM_NAMES.get(k, k): v for k, v in params.items()}
    unknown = sorted(set(params) - set(SCHEDULES[name]))
    if unknown:
        raise ValueError(
            f"make_schedule: unknown parameter(s) {unknown} for schedule {name!r}; "
            f"it accepts {list(SCHEDULES[name]) or 'none'}"
        )
    if not base_lr >= 0:
        raise ValueError(f"make_schedule: base_lr must be >= 0, got {base_lr}")
    if total_steps < 1:
        raise ValueError(f"make_schedule: total_steps must be >= 1, got {total_steps}")
    if not 0 <= warmup_steps < total_steps:
        raise ValueError(f"make_schedule: warmup_steps must be in [0, total_steps={total_steps}), got {warmup_steps}")
    horizon = total_steps - warmup_steps
    if name == "constant":
        schedule = constant_schedule(base_lr)
    elif name == "linear":
        schedule = linear_schedule(base_lr, horizon, **params)
    elif name == "cosine":
        schedule = cosine_schedule(base_lr, horizon, **params)
    elif name == "cosine_with_restarts":
        t_0 = params.pop("t_0", horizon // 4)
        if t_0 < 1:
            raise ValueError(
                f"make_schedule: cosine_with_restarts needs t_0 >= 1; the default horizon // 4 is {t_0} for "
                f"horizon {horizon}; pass t_0 explicitly"
            )
        schedule = cosine_with_restarts_schedule(base_lr, t_0, **params)
    elif name == "polynomial":
        schedule = polynomial_schedule(base_lr, horizon, **params)
    else:
        step_size = params.pop("step_size", horizon // 2)
        if step_size < 1:
            raise ValueError(
                f"make_schedule: step needs step_size >= 1; the default horizon // 2 is {step_size} for "
                f"horizon {horizon}; pass step_size explicitly"
            )
        schedule = step_schedule(base_lr, step_size, **params)
    return with_linear_warmup(schedule, base_lr, warmup_steps)
