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

    Adapter compute dtype: the adapters compute in the dtype of their input (the activation dtype: bf16 when
    training on a bf16 base) and keep their own dtype as master weights (fp32 from ``train.py``): the small
    ``A`` / ``B`` are cast to the input's dtype on each call, the gradients flow back to the fp32 masters, and
    the optimizer updates those. This is the precision bf16 autocast (one process) and FSDP2's ``param_dtype``
    (several) gave the adapters before, without the fp32 copy of every adapter input that autocast then cast
    back to bf16 and kept for the backward (one token-sized bf16 tensor per adapter). The adapters never see
    an fp32 activation on a bf16 base; on an fp32 base everything stays fp32.

    Memory: the backward keeps only the adapter input itself (no copy when dropout is 0, so q/k/v adapters on
    one input share it), the rank-``r`` intermediate and the cast adapter weights. Callers with several
    adapters on one input pass one ``adapter_input(x)`` to all of them (one dropout draw, one saved tensor);
    :meth:`forward_heads` takes an attention output as heads and per-head gates and recomputes the gated product
    in the backward instead of keeping it.
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

    def adapter_input(self, x: Tensor) -> Tensor:
        """The adapters' input for base input ``x``: ``dropout(x)`` (``x`` itself without dropout)."""
        return self.lora_dropout(x)

    @property
    def adapter_input_key(self) -> tuple[float, bool]:
        """Adapters with equal keys accept one shared :meth:`adapter_input` (same dropout, same mode)."""
        p = self.lora_dropout.p if isinstance(self.lora_dropout, nn.Dropout) else 0.0
        return p, self.training

    def forward(self, x: Tensor, adapter_input: Tensor | None = None) -> Tensor:
        """``adapter_input``: a precomputed ``self.adapter_input(x)`` shared with other adapters on ``x``."""
        y = self.base_linear(x)
        adapter_in = self.adapter_input(x) if adapter_input is None else adapter_input
        return y + self._up(F.linear(adapter_in, self.lora_A.weight.to(adapter_in.dtype)), y.dtype)

    def forward_heads(self, heads_BTHd: Tensor, gate_BTH1: Tensor | None) -> Tensor:
        """The layer applied to ``(heads * gate)`` flattened to ``[B, T, H * d]`` (an attention output with
        optional per-head gates). The adapter keeps ``heads`` and ``gate`` (the attention keeps ``heads``
        already) and recomputes their product in the backward, rather than keeping the product."""
        merged_BTHd = heads_BTHd if gate_BTH1 is None else heads_BTHd * gate_BTH1
        merged_BTD = merged_BTHd.reshape(*merged_BTHd.shape[:-2], -1)
        if isinstance(self.lora_dropout, nn.Dropout) and self.training:
            return self(merged_BTD)  # the dropped input has to be kept anyway
        y = self.base_linear(merged_BTD)
        hidden = _MergedHeadsLinear.apply(heads_BTHd, gate_BTH1, self.lora_A.weight.to(heads_BTHd.dtype))
        return y + self._up(hidden, y.dtype)

    def base_linear(self, x: Tensor) -> Tensor:
        """The frozen base layer alone (a quantized base overrides it: ``ltxf.quantization``)."""
        return F.linear(x, self.weight, self.bias)

    def _up(self, hidden: Tensor, dtype: torch.dtype) -> Tensor:
        # The scaling is folded into the (small) cast of B instead of a pass over the output.
        return F.linear(hidden, (self.lora_B.weight * self.scaling).to(hidden.dtype)).to(dtype)

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


class _MergedHeadsLinear(torch.autograd.Function):
    """``(heads * gate).flatten(-2) @ A^T``, keeping ``heads`` and ``gate`` (not their product) for the backward.

    ``heads`` ``[..., H, d]``, ``gate`` ``[..., H, 1]`` or None, ``A`` ``[r, H * d]``.
    """

    # torch.func.vmap runs forward/backward per sample (per-sample gradients), like the model's own functions.
    generate_vmap_rule = True

    @staticmethod
    def forward(heads, gate, weight):
        merged = heads if gate is None else heads * gate
        return F.linear(merged.reshape(*heads.shape[:-2], -1), weight)

    @staticmethod
    def setup_context(ctx, inputs, output):
        heads, gate, weight = inputs
        ctx.save_for_backward(heads, gate, weight)

    @staticmethod
    def backward(ctx, grad_hidden):
        heads, gate, weight = ctx.saved_tensors
        need_heads, need_gate, need_weight = ctx.needs_input_grad
        dtype = grad_hidden.dtype  # the forward's compute dtype (autocast may have chosen it)
        grad_heads = grad_gate = grad_weight = None
        if need_weight:
            merged = heads if gate is None else heads * gate
            grad_weight = (grad_hidden.flatten(0, -2).T @ merged.reshape(-1, weight.shape[1]).to(dtype))
            grad_weight = grad_weight.to(weight.dtype)
        if need_heads or need_gate:
            grad_merged = (grad_hidden @ weight.to(dtype)).view(heads.shape)
            if need_heads:
                grad_heads = (grad_merged if gate is None else grad_merged * gate).to(heads.dtype)
            if need_gate:
                grad_gate = (grad_merged * heads).sum(-1, keepdim=True, dtype=torch.float32).to(gate.dtype)
        return grad_heads, grad_gate, grad_weight


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
        if _adapter_class(module) is not None:
            linear_names.append(name)
        if not name or not _matches(name, cfg.target_modules):
            continue
        if cfg.exclude_audio and is_audio_module(name):
            continue
        if _adapter_class(module) is None:
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
        adapted = _adapter_class(base)(base, rank=cfg.rank, alpha=cfg.alpha, dropout=cfg.dropout, dtype=dtype)
        if not adapted.lora_A.weight.is_meta:
            adapted.reset_parameters(generator)
        setattr(parent, child_name, adapted)
    logger.info("inject_lora: %d adapters of rank %d (alpha %s)", len(targets), cfg.rank, cfg.alpha)
    return targets


def _adapter_class(module: nn.Module) -> type[LoRALinear] | None:
    """The adapter for a target: ``LoRALinear`` on an ``nn.Linear``, ``QuantizedLoRALinear`` on a quantized frozen
    base layer (``ltxf.quantization``), None for anything else."""
    from ltxf.quantization import QuantizedLinear, QuantizedLoRALinear

    if isinstance(module, QuantizedLinear):
        return QuantizedLoRALinear
    return LoRALinear if isinstance(module, nn.Linear) and not isinstance(module, LoRALinear) else None


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


def is_lora_key(key: str) -> bool:
    """True for the state-dict key of an adapter weight (what a base checkpoint does not hold)."""
    return key.endswith(_LORA_SUFFIXES)


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


def check_lora_tensors(
    expected: dict[str, tuple[int, ...]], tensors: dict[str, Tensor], *, source: str
) -> None:
    """A ``ValueError`` starting with ``source`` (e.g. ``--model.init_lora FILE``) when ``tensors`` do not fit the
    model's adapters (``expected`` shapes, keys as :func:`lora_parameters`): it names the first mismatching key
    with both shapes (and both ranks), or the first module only one side has."""
    for key in sorted(expected.keys() & tensors.keys()):
        found, wanted = tuple(tensors[key].shape), tuple(expected[key])
        if found != wanted:
            rank_dim = 0 if key.endswith(".lora_A.weight") else 1
            ranks = ""
            if len(found) == len(wanted) == 2 and found[1 - rank_dim] == wanted[1 - rank_dim]:
                ranks = f" (the file has rank {found[rank_dim]}, this run --lora.rank {wanted[rank_dim]})"
            raise ValueError(f"{source}: {key} has shape {found} in the file, this run expects {wanted}{ranks}")
    missing, unexpected = sorted(expected.keys() - tensors.keys()), sorted(tensors.keys() - expected.keys())
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"{len(missing)} adapter tensor(s) of this run are not in the file (first: {missing[0]})")
        if unexpected:
            parts.append(f"{len(unexpected)} tensor(s) of the file have no adapter in this run (first: "
                         f"{unexpected[0]})")
        raise ValueError(f"{source}: {'; '.join(parts)}; compare --lora.target_modules and --lora.exclude_audio "
                         "with the run that wrote the file")


@torch.no_grad()
def merge_lora(model: nn.Module) -> list[str]:
    """Fold each adapter into its base weight (``W += scaling * B @ A``, computed in fp32) and put back a
    plain ``nn.Linear`` holding the same weight/bias Parameters, so the model has the base state-dict keys
    only (for export or inference). Run it on an unsharded model. Returns the sorted names of the merged
    modules."""
    merged = []
    for name, module in _lora_modules(model):
        if not module.weight.is_floating_point() or module.weight.element_size() == 1:
            raise ValueError(f"merge_lora: {name} has a quantized base weight ({module.weight.dtype}); merge into "
                             "the high-precision base instead (the exported LoRA targets it unchanged)")
        delta = module.scaling * (module.lora_B.weight.float() @ module.lora_A.weight.float())
        module.weight.copy_((module.weight.float() + delta).to(module.weight.dtype))
        plain = nn.Linear(module.in_features, module.out_features, bias=module.bias is not None, device="meta")
        plain.weight = module.weight
        plain.bias = module.bias
        parent_name, _, child_name = name.rpartition(".")
        setattr(model.get_submodule(parent_name), child_name, plain)
        merged.append(name)
    return merged
