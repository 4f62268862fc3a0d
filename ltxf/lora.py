"""LoRA adapters injected into ``nn.Linear`` layers, with PEFT's names, init and target matching.

``inject_lora`` swaps every targeted ``nn.Linear`` for a ``LoRALinear`` in place and freezes everything else.
A ``LoRALinear`` keeps the base layer's own ``weight`` / ``bias`` Parameter objects under the same names, so
the base state-dict keys are unchanged (``...to_q.weight``, ``...to_q.bias``) and official checkpoints load
strictly into an injected model; the adapters add ``...to_q.lora_A.weight`` ``[rank, in]`` and
``...to_q.lora_B.weight`` ``[out, rank]``, the key names PEFT (and so ltx-trainer's saved LoRAs) use.

Order of operations (style-anchors C.8): build the model (on ``meta`` if large), ``inject_lora`` (adapters
are created on the base weight's device, freezing happens here, before FSDP sees any parameter), activation
checkpointing, compile, ``fully_shard``, load base weights, then ``init_lora_parameters`` if the adapters
were created on ``meta`` and materialised with ``to_empty``. Injecting into an already sharded model is
refused: PEFT had to fix reading adapter sizes from local shards (huggingface/peft#3578).
"""

import logging
import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.distributed.tensor import DTensor, distribute_tensor

from ltxf.config import LoraConfig

logger = logging.getLogger(__name__)

__all__ = [
    "AUDIO_MODULE_PARTS",
    "LoraConfig",
    "LoRALinear",
    "inject_lora",
    "init_lora_parameters",
    "is_audio_module",
    "lora_parameters",
    "lora_state_dict",
    "load_lora_weights",
    "merge_lora",
]

AUDIO_MODULE_PARTS: tuple[str, ...] = (
    "audio_attn1",
    "audio_attn2",
    "audio_ff",
    "audio_to_video_attn",
    "video_to_audio_attn",
)
"""Per-block module names of the audio stream and of the audio<->video cross-attentions."""


def is_audio_module(name: str) -> bool:
    """Whether module ``name`` belongs to the audio stream or to the audio<->video coupling.

    True when a dotted component of the name is one of ``AUDIO_MODULE_PARTS``, starts with ``audio_``
    (``audio_patchify_proj``, ``audio_adaln_single``, ``audio_caption_projection``, ...) or with ``av_ca_``
    (the cross-modal AdaLN layers that only feed the audio<->video attentions).
    """
    return any(part in AUDIO_MODULE_PARTS or part.startswith(("audio_", "av_ca_")) for part in name.split("."))


class LoRALinear(nn.Linear):
    """``y = x W^T + b + scaling * B(A(dropout(x)))``, keeping the base ``weight``/``bias`` Parameters.

    The adapters may have their own dtype (e.g. fp32 adapters on a bf16 base): the adapter input is cast
    to it and the adapter output back to the base output's dtype.
    """

    def __init__(self, base: nn.Linear, *, rank: int, alpha: float, dropout: float, dtype: torch.dtype | None = None):
        nn.Module.__init__(self)  # not nn.Linear.__init__: the base weight is reused, never reallocated
        self.in_features = base.in_features
        self.out_features = base.out_features
        self.weight = base.weight
        self.register_parameter("bias", base.bias)
        factory = {"device": base.weight.device, "dtype": dtype or base.weight.dtype}
        self.lora_A = nn.Linear(base.in_features, rank, bias=False, **factory)
        self.lora_B = nn.Linear(rank, base.out_features, bias=False, **factory)
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.rank = rank
        self.alpha = alpha
        self.scaling = alpha / rank

    def forward(self, x: Tensor) -> Tensor:
        y = F.linear(x, self.weight, self.bias)
        adapter_in = self.lora_dropout(x).to(self.lora_A.weight.dtype)
        return y + (self.lora_B(self.lora_A(adapter_in)) * self.scaling).to(y.dtype)

    @torch.no_grad()
    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        """Re-initialise the adapters only (A Kaiming-uniform with a = sqrt(5), B zero, as PEFT); the base
        weight is pretrained and is left alone."""
        a_init = torch.empty(self.lora_A.weight.shape, dtype=torch.float32, device=_generator_device(generator))
        nn.init.kaiming_uniform_(a_init, a=math.sqrt(5), generator=generator)
        _fill_(self.lora_A.weight, a_init)
        self.lora_B.weight.zero_()

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}, alpha={self.alpha}"


def _generator_device(generator: torch.Generator | None) -> torch.device:
    return generator.device if generator is not None else torch.device("cpu")


def _fill_(param: Tensor, full: Tensor) -> None:
    """Copy the full-size ``full`` into ``param``, a plain tensor or a DTensor (each rank takes its shard;
    every rank computed the same ``full`` from the same generator, so no communication is needed)."""
    if isinstance(param, DTensor):
        full = distribute_tensor(full.to(param.device), param.device_mesh, param.placements, src_data_rank=None)
    param.copy_(full)


def _matches(name: str, patterns: tuple[str, ...]) -> bool:
    return any(name == p or name.endswith("." + p) for p in patterns)


def inject_lora(
    model: nn.Module, cfg: LoraConfig, *, generator: torch.Generator | None = None, dtype: torch.dtype | None = None
) -> list[str]:
    """Replace the ``nn.Linear`` layers ``cfg`` targets by ``LoRALinear`` in place; freeze all other parameters.

    Adapters are created on the base weight's device with ``dtype`` (default: the base weight's dtype) and
    initialised from ``generator`` (A Kaiming-uniform a = sqrt(5), B zero, so the model's output is
    unchanged), in sorted module-name order, unless they are on ``meta``: then call
    ``init_lora_parameters`` after ``to_empty``. Must run before any FSDP sharding. Returns the sorted names
    of the adapted modules. Raises ``ValueError`` if nothing matches (listing Linear names that exist), if a
    matching module is not an ``nn.Linear``, if adapters are already present or the model is sharded.
    """
    if any(isinstance(m, LoRALinear) for m in model.modules()):
        raise ValueError("inject_lora: the model already has LoRA adapters")
    if any(isinstance(p, DTensor) for p in model.parameters()):
        raise ValueError("inject_lora: the model has DTensor (sharded) parameters; inject LoRA before fully_shard")

    targets: list[str] = []
    linear_names: list[str] = []
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear):
            linear_names.append(name)
        if not name or not _matches(name, cfg.target_modules):
            continue
        if cfg.exclude_audio and is_audio_module(name):
            continue
        if not isinstance(module, nn.Linear):
            raise ValueError(
                f"inject_lora: module {name!r} matches target_modules {cfg.target_modules} but is a "
                f"{type(module).__name__}, not an nn.Linear; target its Linear children instead"
            )
        targets.append(name)
    if not targets:
        shown = ", ".join(linear_names[:12]) + (f", ... ({len(linear_names)} in all)" if len(linear_names) > 12 else "")
        raise ValueError(
            f"inject_lora: no nn.Linear matches target_modules {cfg.target_modules}"
            f"{' outside the audio modules' if cfg.exclude_audio else ''}; Linear modules available: "
            f"{shown or 'none'}"
        )

    model.requires_grad_(False)
    targets.sort()
    for name in targets:
        parent_name, _, child_name = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        base = parent.get_submodule(child_name)
        adapted = LoRALinear(base, rank=cfg.rank, alpha=cfg.alpha, dropout=cfg.dropout, dtype=dtype)
        if not adapted.lora_A.weight.is_meta:
            adapted.reset_parameters(generator)
        setattr(parent, child_name, adapted)
    logger.info("inject_lora: %d adapters of rank %d (alpha %s)", len(targets), cfg.rank, cfg.alpha)
    return targets


def _lora_modules(model: nn.Module) -> list[tuple[str, LoRALinear]]:
    return sorted((n, m) for n, m in model.named_modules() if isinstance(m, LoRALinear))


@torch.no_grad()
def init_lora_parameters(model: nn.Module, generator: torch.Generator | None = None) -> None:
    """(Re)initialise every adapter: A Kaiming-uniform (a = sqrt(5)), B zero, in sorted module-name order.

    For adapters created on ``meta`` and materialised with ``to_empty``, possibly after ``fully_shard``
    (each rank draws the full A from ``generator`` and keeps its shard, so every rank must pass a
    generator in the same state). Gives the same values as ``inject_lora`` with an identical generator.
    """
    modules = _lora_modules(model)
    if not modules:
        raise ValueError("init_lora_parameters: the model has no LoRA adapters (call inject_lora first)")
    for name, module in modules:
        if module.lora_A.weight.is_meta:
            raise ValueError(f"init_lora_parameters: adapter {name!r} is on meta; materialise it with to_empty first")
        module.reset_parameters(generator)


_LORA_SUFFIXES = (".lora_A.weight", ".lora_B.weight")


def lora_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """The adapter Parameters keyed by state-dict FQN, sorted: the objects themselves (DTensors under FSDP2),
    not copies, so they can be the ``params`` of a ``TrainState``."""
    params = model.state_dict(keep_vars=True)
    return {k: params[k] for k in sorted(params) if k.endswith(_LORA_SUFFIXES)}


def lora_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """Detached adapter tensors keyed by state-dict FQN (PEFT names without PEFT's ``base_model.model.``
    prefix). DTensors stay DTensors; gather them with ``full_tensor()`` to export."""
    return {k: v.detach() for k, v in lora_parameters(model).items()}


@torch.no_grad()
def load_lora_weights(model: nn.Module, tensors: dict[str, Tensor], *, strength: float = 1.0) -> None:
    """Copy adapter weights into an injected model (keys exactly those of ``lora_state_dict(model)``).

    ``strength`` scales each adapter's contribution (applied to lora_B). Raises ``ValueError`` on missing,
    unexpected or mis-shaped keys.
    """
    params = lora_parameters(model)
    if not params:
        raise ValueError("load_lora_weights: the model has no LoRA adapters (call inject_lora first)")
    missing, unexpected = sorted(params.keys() - tensors.keys()), sorted(tensors.keys() - params.keys())
    if missing or unexpected:
        raise ValueError(
            f"load_lora_weights: key mismatch: {len(missing)} missing (e.g. {missing[:3]}), "
            f"{len(unexpected)} unexpected (e.g. {unexpected[:3]})"
        )
    for k, p in params.items():
        t = tensors[k]
        if tuple(t.shape) != tuple(p.shape):
            raise ValueError(f"load_lora_weights: {k} has shape {tuple(t.shape)}, expected {tuple(p.shape)}")
        if k.endswith(".lora_B.weight") and strength != 1.0:
            t = t.float() * strength
        _fill_(p, t.to(dtype=p.dtype))


@torch.no_grad()
def merge_lora(model: nn.Module) -> list[str]:
    """Fold each adapter into its base weight (``W += scaling * B @ A``, computed in fp32) and put back a
    plain ``nn.Linear`` holding the same weight/bias Parameters, so the model has the base state-dict keys
    only (for export or inference). Run it on an unsharded model. Returns the sorted names of the merged
    modules."""
    merged = []
    for name, module in _lora_modules(model):
        delta = module.scaling * (module.lora_B.weight.float() @ module.lora_A.weight.float())
        module.weight.copy_((module.weight.float() + delta).to(module.weight.dtype))
        plain = nn.Linear(module.in_features, module.out_features, bias=module.bias is not None, device="meta")
        plain.weight = module.weight
        plain.bias = module.bias
        parent_name, _, child_name = name.rpartition(".")
        setattr(model.get_submodule(parent_name), child_name, plain)
        merged.append(name)
    return merged
