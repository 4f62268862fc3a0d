"""Weight-only quantization of the frozen transformer base (fp8, int8, nf4), LoRA on top, and official fp8 files.

A quantized layer is a :class:`QuantizedLinear`: the weight ``[out, in]`` is stored in a narrow format with one
float32 scale per block of ``block_size`` consecutive *input* features of each output row
(``weight_scale [out, in / block_size]``), and dequantized to the compute dtype inside the forward (and again in
the backward, for the input gradient; nothing of the weight is saved for backward but the quantized tensors
themselves). Biases, norms, AdaLN tables and every layer in :data:`HIGH_PRECISION_MODULES` stay in the model
dtype.

Formats (bytes per weight, scales included):

- ``fp8``: float8_e4m3fn codes, ``scale = absmax / 448`` per block of :data:`FP8_BLOCK_SIZE` = 128 (1.03 B).
  Block size: e4m3 is a float format, so its relative error (3 mantissa bits) hardly depends on the block, which
  only has to keep outliers local. Measured on [1024, 4096] weights (gaussian / Student-t(3) heavy-tailed): SNR
  32.0 / 33.6 dB at block 64, 31.8 / 33.1 at 128, 31.6 / 32.0 per row. 128 is the block of the official blockwise
  fp8 kernels (ltx-core 128x128; the 1x128 x 128x128 recipe of cuBLAS blockwise scaled-mm), divides every LTX
  width, and halves the scale storage of musubi's 64 (3 % instead of 6 %) for 0.2 dB.
- ``int8``: symmetric int8, ``scale = absmax / 127`` per block of :data:`INT8_BLOCK_SIZE` = 64 (1.06 B). An
  integer grid is sensitive to outliers: 44.5 / 39.2 dB at block 64 against 43.8 / 37.1 at 128 (under the 38 dB
  target on heavy tails).
- ``nf4``: the 16-value NormalFloat-4 codebook (QLoRA), two codes per byte, ``scale = absmax`` per block of
  :data:`NF4_BLOCK_SIZE` = 64 (0.56 B): 20.7 dB (gaussian), bitsandbytes' block; musubi's 32 gains 0.45 dB for
  11 % more bytes.

Why not bitsandbytes' kernels for int8 / nf4: bnb's 4-bit weights are a ``Params4bit`` tensor subclass whose
scales live in a Python ``QuantState`` attribute that FSDP2 sharding, ``to_empty`` and DCP do not carry, and its
8-bit ``Linear8bitLt`` is a different algorithm (outlier decomposition with activation quantization). Written in
torch, every quantized tensor is a plain buffer: it moves with ``.to()``, is replicated as a buffer under FSDP2,
recomputes under activation checkpointing, runs on CPU (the tested reference) and compiles. The dequantization
is one gather/convert and one multiply per layer, small next to the matmul.

On CUDA GPUs with fp8 tensor cores (compute capability >= 8.9), ``fp8`` layers whose scales are constant along
each row (the official per-tensor fp8 files) can run ``torch._scaled_mm`` with dynamically row-quantized
activations when :func:`enable_fp8_scaled_mm` is called (W8A8: faster, not bit-equal to the dequantized path;
off by default, checked by ``tools/gpu_check.py``).

Loading quantizes block by block (:func:`load_quantized_transformer`): the model is built on ``meta``, then the
file is read one transformer block at a time, each block's tensors are moved to the device, quantized there by
:func:`quantize_state_dict` (the per-block transform hook) and assigned; the device never holds more than one
bf16 block next to the quantized model, and neither does the host.

Official fp8 checkpoints (``*.weight`` in float8_e4m3fn with a per-tensor ``*.weight_scale`` and a static
``*.input_scale``, as ltx-core writes them) are recognised by :func:`is_fp8_checkpoint`: with ``fp8`` (or
``none``) their fp8 codes are used as they are (the per-tensor scale becomes a constant block scale: exact);
with ``int8`` / ``nf4``, or for layers kept in high precision, they are dequantized (and re-quantized).
``input_scale`` (an activation scale for static W8A8 inference) is not used by weight-only training.
"""

from __future__ import annotations

import fnmatch
import logging
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from safetensors import safe_open
from torch import Tensor, nn

from ltxf.lora import LoRALinear
from ltxf.models import checkpoint
from ltxf.models.transformer import (
    DEFAULT_MAX_DISTINCT_TIMESTEPS,
    AVTransformer,
    TransformerConfig,
    _cross_check_weights,
    _transformer_select,
)

logger = logging.getLogger(__name__)

__all__ = [
    "HIGH_PRECISION_MODULES",
    "QUANTIZATION_KINDS",
    "QuantizationKind",
    "QuantizedLinear",
    "QuantizedLoRALinear",
    "bytes_per_weight",
    "dequantize_weight",
    "enable_fp8_scaled_mm",
    "is_fp8_checkpoint",
    "load_quantized_transformer",
    "load_quantized_weights_",
    "quantize_model_",
    "quantize_state_dict",
    "quantize_unit_",
    "quantize_weight",
    "quantized_module_names",
    "signal_to_noise_db",
]

QuantizationKind = Literal["none", "fp8", "int8", "nf4"]
QUANTIZATION_KINDS: tuple[str, ...] = ("none", "fp8", "int8", "nf4")

FP8_BLOCK_SIZE = 128
INT8_BLOCK_SIZE = 64
NF4_BLOCK_SIZE = 64
BLOCK_SIZES: dict[str, int] = {"fp8": FP8_BLOCK_SIZE, "int8": INT8_BLOCK_SIZE, "nf4": NF4_BLOCK_SIZE}
STORAGE_DTYPES: dict[str, torch.dtype] = {"fp8": torch.float8_e4m3fn, "int8": torch.int8, "nf4": torch.uint8}
FP8_MAX = 448.0
INT8_MAX = 127.0

HIGH_PRECISION_MODULES: tuple[str, ...] = (
    # Input and output projections of both streams: few parameters, every token passes through them, and the
    # output head sets the velocity's scale directly (official trainer, ltx-core and musubi all exclude them).
    "patchify_proj", "audio_patchify_proj", "proj_out", "audio_proj_out",
    # The AdaLN timestep MLPs (incl. the LTX-2.3 prompt AdaLN and the audio<->video av_ca_* ones): they produce
    # every block's scale/shift/gate, and an error there is multiplied into all tokens of all blocks.
    "*adaln_single*", "av_ca_*",
    # Caption projections (LTX-2 keeps them in the transformer).
    "caption_projection*", "audio_caption_projection*",
    # LTX-2.3 per-head attention gates: [heads, D] matrices (32 rows), a gate error scales a whole head.
    "*.to_gate_logits",
)
"""Names (fnmatch patterns against the module's full name) of ``nn.Linear`` layers never quantized. Every other
``nn.Linear`` of the transformer is quantized: the q/k/v/out projections of all attentions and the two
feed-forward matrices of each block, 99.6 % of the weights. Norm weights, biases and the AdaLN scale-shift tables
are not ``nn.Linear`` weights and always stay in the model dtype. Informed by what the official trainer
(``patchify_proj, proj_out, *adaln*, time_proj, timestep_embedder*, caption_projection*, *norm*`` and audio
equivalents) and musubi (the same plus ``to_gate_logits``) keep in bf16."""


def quantized_module_names(model: nn.Module) -> list[str]:
    """Names of the ``nn.Linear`` layers of ``model`` that quantization replaces (sorted)."""
    return sorted(name for name, module in model.named_modules()
                  if isinstance(module, nn.Linear) and name and not _keep_high_precision(name))


def _keep_high_precision(name: str) -> bool:
    return any(fnmatch.fnmatchcase(name, pattern) or fnmatch.fnmatchcase(name, "*." + pattern)
               for pattern in HIGH_PRECISION_MODULES)


# -------------------------------------------------------------------------------------------------------------
# Formats


def _normal_float_codebook() -> Tensor:
    """The NF4 codebook: quantiles of N(0, 1) normalised to [-1, 1], with an exact zero (QLoRA, Dettmers et al.
    2023, appendix E: 8 positive quantiles from ``linspace(0.9677, 0.5, 9)``, 7 negative ones from
    ``linspace(0.9677, 0.5, 8)``). Checked against bitsandbytes' table in the tests."""
    offset = 0.9677083
    positive = torch.special.ndtri(torch.linspace(offset, 0.5, 9, dtype=torch.float64)[:-1])
    negative = -torch.special.ndtri(torch.linspace(offset, 0.5, 8, dtype=torch.float64)[:-1])
    values = torch.cat([positive, torch.zeros(1, dtype=torch.float64), negative]).sort().values
    return (values / values.abs().max()).float()


NF4_CODEBOOK: Tensor = _normal_float_codebook()


def bytes_per_weight(kind: str) -> float:
    """Storage per quantized weight element, float32 block scales included (``none`` is not a format)."""
    codes = {"fp8": 1.0, "int8": 1.0, "nf4": 0.5}[kind]
    return codes + 4.0 / BLOCK_SIZES[kind]


def _block_size_for(kind: str, in_features: int) -> int:
    """The format's block, or the whole row when the input width is not a multiple of it (never for LTX)."""
    block = BLOCK_SIZES[kind]
    if kind == "nf4" and in_features % 2:
        raise ValueError(f"nf4 needs an even input width, got {in_features}")
    return block if in_features % block == 0 else in_features


def quantized_shapes(kind: str, out_features: int, in_features: int) -> tuple[tuple[int, int], tuple[int, int]]:
    """Shapes of (codes, weight_scale) for a ``[out, in]`` weight."""
    block = _block_size_for(kind, in_features)
    codes_in = in_features // 2 if kind == "nf4" else in_features
    return (out_features, codes_in), (out_features, in_features // block)


@torch.no_grad()
def quantize_weight(weight: Tensor, kind: str) -> tuple[Tensor, Tensor]:
    """Quantize a ``[out, in]`` weight (computed in float32 on its device) to ``(codes, weight_scale)``."""
    out_features, in_features = weight.shape
    block = _block_size_for(kind, in_features)
    blocks = weight.detach().float().reshape(out_features, in_features // block, block)
    absmax = blocks.abs().amax(-1)
    # An all-zero block gets scale 1 (any scale reproduces it; avoids 0/0).
    absmax = torch.where(absmax > 0, absmax, torch.ones_like(absmax))
    if kind == "fp8":
        scale = absmax / FP8_MAX
        codes = (blocks / scale[..., None]).clamp_(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
        return codes.reshape(out_features, in_features), scale
    if kind == "int8":
        scale = absmax / INT8_MAX
        codes = (blocks / scale[..., None]).round_().clamp_(-INT8_MAX, INT8_MAX).to(torch.int8)
        return codes.reshape(out_features, in_features), scale
    if kind == "nf4":
        codebook = NF4_CODEBOOK.to(weight.device)
        normalised = (blocks / absmax[..., None]).reshape(out_features, in_features)
        # Nearest codebook entry: count the midpoints below each value.
        index = torch.bucketize(normalised, (codebook[1:] + codebook[:-1]) / 2).to(torch.uint8)
        packed = (index[:, 0::2] << 4) | index[:, 1::2]
        return packed, absmax
    raise ValueError(f"unknown quantization {kind!r}; expected one of {QUANTIZATION_KINDS[1:]}")


def dequantize_weight(codes: Tensor, weight_scale: Tensor, kind: str, dtype: torch.dtype) -> Tensor:
    """The ``[out, in]`` weight in ``dtype`` (codes converted to ``dtype``, times the block scale in ``dtype``:
    one rounding for bf16, exact for float32)."""
    out_features = codes.shape[0]
    if kind == "nf4":
        # One lookup per byte in a [256, 2] table of (high, low) code values: an int32 index (2 bytes per weight)
        # instead of an int64 one per code (8), the largest temporary of the dequantization.
        values = F.embedding(codes.int(), _nf4_pair_table(codes.device, dtype)).reshape(out_features, -1)
    elif kind in ("fp8", "int8"):
        values = codes.to(dtype)
    else:
        raise ValueError(f"unknown quantization {kind!r}; expected one of {QUANTIZATION_KINDS[1:]}")
    num_blocks = weight_scale.shape[1]
    values.view(out_features, num_blocks, -1).mul_(weight_scale.to(dtype)[..., None])
    return values


def _nf4_pair_table(device: torch.device, dtype: torch.dtype) -> Tensor:
    byte = torch.arange(256, device=device)
    return NF4_CODEBOOK.to(device=device, dtype=dtype)[torch.stack([byte >> 4, byte & 0x0F], dim=-1)]


def signal_to_noise_db(reference: Tensor, approximation: Tensor) -> float:
    """``10 log10(sum(ref^2) / sum((ref - approx)^2))`` in float64."""
    reference = reference.double()
    noise = (reference - approximation.double()).square().sum()
    return float(10 * torch.log10(reference.square().sum() / noise))


# -------------------------------------------------------------------------------------------------------------
# The layer


def _compute_dtype(x: Tensor) -> torch.dtype:
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return x.dtype


class _QuantizedLinearFunction(torch.autograd.Function):
    """``x W^T + b`` with ``W`` dequantized in the forward and again in the backward (for ``grad_x``): only the
    quantized codes and scales are kept for backward, never a dequantized copy. ``W`` and ``b`` are frozen."""

    @staticmethod
    def forward(ctx, x, codes, weight_scale, bias, kind, use_scaled_mm):
        dtype = _compute_dtype(x)
        ctx.kind, ctx.x_dtype = kind, x.dtype
        ctx.save_for_backward(codes, weight_scale)
        x = x.to(dtype)
        bias = None if bias is None else bias.to(dtype)
        with torch.autocast(x.device.type, enabled=False):
            if use_scaled_mm:
                return _fp8_scaled_mm(x, codes, weight_scale, bias)
            return F.linear(x, dequantize_weight(codes, weight_scale, kind, dtype), bias)

    @staticmethod
    def backward(ctx, grad_out):
        codes, weight_scale = ctx.saved_tensors
        grad_x = None
        if ctx.needs_input_grad[0]:
            grad_x = (grad_out @ dequantize_weight(codes, weight_scale, ctx.kind, grad_out.dtype)).to(ctx.x_dtype)
        grad_bias = grad_out.flatten(0, -2).sum(0) if ctx.needs_input_grad[3] else None
        return grad_x, None, None, grad_bias, None, None


def _fp8_scaled_mm(x: Tensor, codes: Tensor, weight_scale: Tensor, bias: Tensor | None) -> Tensor:
    """W8A8 on fp8 tensor cores: activations quantized per row on the fly, one weight scale per output row."""
    x_2d = x.reshape(-1, x.shape[-1])
    x_scale = (x_2d.abs().amax(-1, keepdim=True).float() / FP8_MAX).clamp_min_(1e-12)
    x_fp8 = (x_2d.float() / x_scale).clamp_(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    out = torch._scaled_mm(x_fp8, codes.t(), scale_a=x_scale, scale_b=weight_scale[:, :1].t().contiguous(),
                           bias=bias, out_dtype=x.dtype)
    return out.reshape(*x.shape[:-1], -1)


class QuantizedLinear(nn.Module):
    """A frozen ``nn.Linear`` stored quantized. State-dict keys: ``weight`` (the codes), ``weight_scale`` and
    ``bias`` (model dtype, frozen); ``in_features`` / ``out_features`` as ``nn.Linear``."""

    def __init__(self, in_features: int, out_features: int, *, kind: str, bias: bool = True,
                 dtype: torch.dtype = torch.bfloat16, device: torch.device | str | None = None) -> None:
        super().__init__()
        if kind not in BLOCK_SIZES:
            raise ValueError(f"QuantizedLinear: unknown quantization {kind!r}; expected one of {tuple(BLOCK_SIZES)}")
        self.in_features, self.out_features, self.kind = in_features, out_features, kind
        self.use_scaled_mm = False
        codes_shape, scale_shape = quantized_shapes(kind, out_features, in_features)
        self.register_buffer("weight", torch.empty(codes_shape, dtype=STORAGE_DTYPES[kind], device=device))
        self.register_buffer("weight_scale", torch.empty(scale_shape, dtype=torch.float32, device=device))
        self.bias = nn.Parameter(torch.empty(out_features, dtype=dtype, device=device), requires_grad=False) \
            if bias else None

    @classmethod
    def from_linear(cls, linear: nn.Linear, kind: str) -> QuantizedLinear:
        """Quantize a materialised ``nn.Linear`` (or make an empty one on ``meta``)."""
        weight = linear.weight
        module = cls(linear.in_features, linear.out_features, kind=kind, bias=linear.bias is not None,
                     dtype=weight.dtype, device=weight.device)
        if not weight.is_meta:
            codes, scale = quantize_weight(weight, kind)
            module.weight, module.weight_scale = codes, scale
            if linear.bias is not None:
                module.bias = nn.Parameter(linear.bias.detach(), requires_grad=False)
        return module

    def dequantized_weight(self, dtype: torch.dtype) -> Tensor:
        return dequantize_weight(self.weight, self.weight_scale, self.kind, dtype)

    def forward(self, x: Tensor) -> Tensor:
        return _QuantizedLinearFunction.apply(x, self.weight, self.weight_scale, self.bias, self.kind,
                                              self._scaled_mm_ready(x))

    def _scaled_mm_ready(self, x: Tensor) -> bool:
        return (self.use_scaled_mm and self.kind == "fp8" and x.is_cuda
                and bool((self.weight_scale == self.weight_scale[:, :1]).all()))

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, kind={self.kind}, "
                f"block_size={self.in_features // self.weight_scale.shape[1]}, bias={self.bias is not None}")


class QuantizedLoRALinear(LoRALinear):
    """LoRA on a :class:`QuantizedLinear` base: ``y = x dequant(W)^T + b + scaling * B(A(dropout(x)))``. Same keys
    as the base (``weight``, ``weight_scale``, ``bias``) plus ``lora_A.weight`` / ``lora_B.weight``, so the
    exported adapters are exactly those of a bf16 base. Only the base path differs from ``LoRALinear``
    (:meth:`base_linear`); the adapters' autograd (shared q/k/v input, recomputed gated heads) is LoRALinear's.
    Made by :func:`ltxf.lora.inject_lora`."""

    def __init__(self, base: QuantizedLinear, *, rank: int, alpha: float, dropout: float,
                 dtype: torch.dtype | None = None) -> None:
        nn.Module.__init__(self)  # the base tensors are reused, never reallocated
        self.in_features, self.out_features, self.kind = base.in_features, base.out_features, base.kind
        self.use_scaled_mm = base.use_scaled_mm
        self.register_buffer("weight", base.weight)
        self.register_buffer("weight_scale", base.weight_scale)
        self.register_parameter("bias", base.bias)
        default_dtype = base.bias.dtype if base.bias is not None else torch.float32
        factory = {"device": base.weight.device, "dtype": dtype or default_dtype}
        self.lora_A = nn.Linear(base.in_features, rank, bias=False, **factory)
        self.lora_B = nn.Linear(rank, base.out_features, bias=False, **factory)
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.rank, self.alpha, self.scaling = rank, alpha, alpha / rank

    @classmethod
    def from_lora(cls, module: LoRALinear, kind: str) -> QuantizedLoRALinear:
        """Quantize the base of a materialised ``LoRALinear``; the adapters (the same Parameter objects, so a
        ``TrainState`` holding them stays valid) move over unchanged."""
        base = QuantizedLinear.from_linear(module, kind)
        adapted = cls.__new__(cls)
        nn.Module.__init__(adapted)
        adapted.in_features, adapted.out_features, adapted.kind = base.in_features, base.out_features, kind
        adapted.use_scaled_mm = False
        adapted.register_buffer("weight", base.weight)
        adapted.register_buffer("weight_scale", base.weight_scale)
        adapted.register_parameter("bias", base.bias)
        adapted.lora_A, adapted.lora_B, adapted.lora_dropout = module.lora_A, module.lora_B, module.lora_dropout
        adapted.rank, adapted.alpha, adapted.scaling = module.rank, module.alpha, module.scaling
        adapted.train(module.training)
        return adapted

    _scaled_mm_ready = QuantizedLinear._scaled_mm_ready

    def base_linear(self, x: Tensor) -> Tensor:
        return _QuantizedLinearFunction.apply(x, self.weight, self.weight_scale, self.bias, self.kind,
                                              self._scaled_mm_ready(x))


def enable_fp8_scaled_mm(model: nn.Module, enabled: bool = True) -> int:
    """Let fp8 layers with per-row-constant scales use ``torch._scaled_mm`` on CUDA (see the module docstring).
    Returns how many layers could use it."""
    count = 0
    for module in model.modules():
        if isinstance(module, (QuantizedLinear, QuantizedLoRALinear)) and module.kind == "fp8":
            module.use_scaled_mm = enabled
            count += 1
    return count


def quantize_model_(model: nn.Module, kind: str) -> list[str]:
    """Replace every quantizable ``nn.Linear`` of ``model`` (see :data:`HIGH_PRECISION_MODULES`) by a
    :class:`QuantizedLinear` in place, block by block; on ``meta`` this only changes the structure (then load
    with :func:`quantize_state_dict`). Must run before LoRA injection. Returns the replaced names."""
    if kind not in BLOCK_SIZES:
        raise ValueError(f"quantize_model_: unknown quantization {kind!r}; expected one of {tuple(BLOCK_SIZES)}")
    names = quantized_module_names(model)
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, QuantizedLinear.from_linear(parent.get_submodule(child), kind))
    return names


@torch.no_grad()
def quantize_unit_(unit_name: str, unit: nn.Module, kind: str) -> list[str]:
    """Quantize, in place, the quantizable layers of one loaded unit (a transformer block, or ``""`` for the rest of
    the model) whose full names are ``unit_name + "." + child``: ``nn.Linear`` -> :class:`QuantizedLinear`,
    ``LoRALinear`` -> :class:`QuantizedLoRALinear` (adapters kept). The full-precision weights are dropped, so
    called after each unit of a block-by-block load (the ``on_unit`` hook of ``ltxf.models.materialize``) the
    peak stays one unit in high precision. Not for FSDP2-sharded units (it replaces modules). Returns the
    converted full names."""
    if kind not in BLOCK_SIZES:
        raise ValueError(f"quantize_unit_: unknown quantization {kind!r}; expected one of {tuple(BLOCK_SIZES)}")
    prefix = f"{unit_name}." if unit_name else ""
    converted = []
    modules = list(unit.named_modules())
    adapter_parts = {f"{n}.{c}" for n, m in modules if isinstance(m, LoRALinear) for c, _ in m.named_modules() if c}
    for name, module in modules:
        full_name = prefix + name
        if not name or name in adapter_parts or _keep_high_precision(full_name) \
                or isinstance(module, (QuantizedLinear, QuantizedLoRALinear)):
            continue
        if unit_name == "" and name.startswith("transformer_blocks."):
            continue  # the remainder unit: blocks are units of their own
        if isinstance(module, LoRALinear):
            replacement = QuantizedLoRALinear.from_lora(module, kind)
        elif isinstance(module, nn.Linear):
            replacement = QuantizedLinear.from_linear(module, kind)
        else:
            continue
        parent_name, _, child = name.rpartition(".")
        setattr(unit.get_submodule(parent_name) if parent_name else unit, child, replacement)
        converted.append(full_name)
    return converted


# -------------------------------------------------------------------------------------------------------------
# Loading


def is_fp8_checkpoint(keys: list[str] | set[str]) -> bool:
    """Whether a file's tensor names hold official per-tensor-scaled fp8 layers (``*.weight_scale``)."""
    return any(k.endswith(".weight_scale") for k in keys)


@torch.no_grad()
def quantize_state_dict(module: nn.Module, state: Mapping[str, Tensor], *, dtype: torch.dtype,
                        device: torch.device | str) -> dict[str, Tensor]:
    """The per-block transform hook: turn the file tensors of ``module`` (one transformer block, or the rest of the
    model), keyed relative to it, into its state dict on ``device``.

    For each :class:`QuantizedLinear` the bf16/fp32 weight is moved to ``device`` and quantized there; an official
    fp8 weight (with ``weight_scale``) is used as is by an fp8 layer (scale broadcast to the blocks), or
    dequantized for any other layer. ``input_scale`` tensors are dropped. Other floating-point tensors are cast to
    ``dtype``.
    """
    quantized = {name: m for name, m in module.named_modules() if isinstance(m, (QuantizedLinear, QuantizedLoRALinear))}
    out: dict[str, Tensor] = {}
    for key, tensor in state.items():
        prefix, _, leaf = key.rpartition(".")
        if leaf in ("weight_scale", "input_scale"):
            continue
        scale_key = f"{prefix}.weight_scale"
        layer = quantized.get(prefix) if leaf == "weight" else None
        if scale_key in state and leaf == "weight":
            scale = state[scale_key].to(device=device, dtype=torch.float32)
            if layer is not None and layer.kind == "fp8":
                out[key] = tensor.to(device)
                out[scale_key] = scale.reshape(-1, 1).expand(layer.weight_scale.shape).contiguous()
                continue
            tensor = tensor.to(device=device, dtype=torch.float32) * scale
        if layer is not None:
            out[key], out[scale_key] = quantize_weight(tensor.to(device), layer.kind)
            continue
        if tensor.is_floating_point() and tensor.dtype != dtype:
            tensor = tensor.to(dtype)
        out[key] = tensor.to(device)
    return out


def _block_groups(keys: list[str], prefix: str) -> dict[str, list[str]]:
    """File keys grouped by their module: ``transformer_blocks.<i>.`` groups, and ``""`` for the rest."""
    groups: dict[str, list[str]] = {}
    for key in keys:
        rest = key[len(prefix):]
        parts = rest.split(".", 2)
        group = f"{parts[0]}.{parts[1]}." if parts[0] == "transformer_blocks" else ""
        groups.setdefault(group, []).append(key)
    return groups


def load_quantized_transformer(
    path: str | Path,
    quantization: str,
    *,
    dtype: torch.dtype = torch.bfloat16,
    device: torch.device | str = "cpu",
    max_distinct_timesteps: int | None = DEFAULT_MAX_DISTINCT_TIMESTEPS,
    on_block: Callable[[str], None] | None = None,
    dequantize_fp8: bool = False,
):
    """Load an official transformer with a quantized frozen base, one block at a time.

    ``quantization`` is ``fp8``, ``int8``, ``nf4``, or ``none`` (only meaningful for an official fp8 file: its fp8
    layers are kept, everything else is loaded in ``dtype``). Builds the model on ``meta``, swaps the quantizable
    Linears for :class:`QuantizedLinear`, then reads each block's tensors, quantizes them on ``device`` with
    :func:`quantize_state_dict` and assigns them (strict). ``on_block(group)`` is called after each group.
    ``dequantize_fp8`` (with ``none``): an official fp8 file becomes a plain model in ``dtype`` (full fine-tuning).
    """
    if quantization not in QUANTIZATION_KINDS:
        raise ValueError(f"model.quantization must be one of {QUANTIZATION_KINDS}, got {quantization!r}")
    path = Path(path)
    config_dict = checkpoint.read_config(path)
    config = TransformerConfig.from_checkpoint_config(checkpoint.config_section(config_dict, "transformer", path),
                                                      path=path)
    _cross_check_weights(config, path)
    with torch.device("meta"):
        model = AVTransformer(config, max_distinct_timesteps=max_distinct_timesteps)
    kind = quantize_on_meta_(model, path, quantization, dequantize_fp8=dequantize_fp8)
    fp8_file = is_fp8_checkpoint(checkpoint.list_keys(path))
    load_quantized_weights_(model, path, dtype=dtype, device=device, on_block=on_block)
    checkpoint.check_nothing_on_meta(model, path)
    model.requires_grad_(False)
    logger.info("loaded %s transformer with a %s base (%d blocks, %.2f GiB of weights on %s) from %s%s",
                config.version, kind, config.num_layers, model_weight_bytes(model) / 2**30, device, path,
                " (official fp8 file)" if fp8_file else "")
    return model


def quantize_on_meta_(model: nn.Module, path: str | Path, quantization: str, *, dequantize_fp8: bool = False) -> str:
    """Give a transformer built on ``meta`` (not yet LoRA-injected) the quantized layers its base will have, before
    :func:`load_quantized_weights_` fills it from ``path``; returns the kind used. ``none`` with an official fp8
    file keeps exactly the layers the file stores in fp8 (a plain Linear for the rest), unless ``dequantize_fp8``
    (full fine-tuning: every layer becomes a plain Linear filled with the dequantized weights)."""
    if quantization not in QUANTIZATION_KINDS:
        raise ValueError(f"model.quantization must be one of {QUANTIZATION_KINDS}, got {quantization!r}")
    file_keys = checkpoint.list_keys(Path(path))
    fp8_file = is_fp8_checkpoint(file_keys)
    kind = "fp8" if quantization == "none" and fp8_file and not dequantize_fp8 else quantization
    if kind != "none":
        names = quantize_model_(model, kind)
        if quantization == "none":
            # Only the layers the file itself stores in fp8 stay fp8; a plain Linear for the rest.
            fp8_layers = {_transformer_select(k)[: -len(".weight_scale")] for k in file_keys
                          if k.endswith(".weight_scale") and _transformer_select(k) is not None}
            for name in names:
                if name not in fp8_layers:
                    module = model.get_submodule(name)
                    parent_name, _, child = name.rpartition(".")
                    setattr(model.get_submodule(parent_name), child,
                            nn.Linear(module.in_features, module.out_features, bias=module.bias is not None,
                                      device="meta"))
    return kind


@torch.no_grad()
def load_quantized_weights_(
    model: nn.Module,
    path: str | Path,
    *,
    dtype: torch.dtype,
    device: torch.device | str,
    on_block: Callable[[str], None] | None = None,
) -> None:
    """Fill a transformer built on ``meta`` and quantized there (:func:`quantize_model_`, after any dtype cast),
    possibly LoRA-injected and checkpointed, from an official file, one block at a time: each unit's tensors are
    read, quantized on ``device`` by :func:`quantize_state_dict` and assigned. Adapters (not in the file) are
    materialised uninitialised on ``device`` (``ltxf.lora.init_lora_parameters`` next). For a model that is not
    FSDP2-sharded (the quantized codes are buffers, replicated on every rank anyway). Strict: any missing or
    unexpected key is a ``ValueError`` naming the file."""
    path = Path(path)
    file_keys = checkpoint.list_keys(path)
    selected = {name: key for key in file_keys if (name := _transformer_select(key)) is not None}
    quantized_layers = [name for name, m in model.named_modules()
                        if isinstance(m, (QuantizedLinear, QuantizedLoRALinear))]
    # Scales come from the file (official fp8 layers) or from quantizing a high-precision weight here.
    provided = {n for n in selected if not n.endswith((".input_scale", ".weight_scale"))}
    provided |= {f"{name}.weight_scale" for name in quantized_layers if f"{name}.weight" in selected}
    expected = {k for k in model.state_dict() if ".lora_" not in k}
    missing, unexpected = sorted(expected - provided), sorted(provided - expected)
    if missing or unexpected:
        raise ValueError(f"{path}: the weights do not match the model built from its config: missing "
                         f"{missing[:10]} ({len(missing)}), unexpected {unexpected[:10]} ({len(unexpected)})")
    groups = _block_groups(sorted(selected), "")
    for group, names in groups.items():
        target = model.get_submodule(group.rstrip(".")) if group else model
        # The file is mapped per unit: its pages count in the process' memory while mapped, so keeping it open
        # for the whole load would hold the whole bf16 file by the end.
        with safe_open(str(path), framework="pt", device="cpu") as f:
            raw = {name[len(group):]: f.get_tensor(selected[name]).clone() for name in names}
        state = quantize_state_dict(target, raw, dtype=dtype, device=device)
        del raw
        target.load_state_dict(state, strict=False, assign=True)
        del state
        if on_block is not None:
            on_block(group)
    for module in model.modules():
        if isinstance(module, LoRALinear):
            for adapter in (module.lora_A, module.lora_B):
                if adapter.weight.is_meta:
                    adapter.to_empty(device=device)
    checkpoint.check_nothing_on_meta(model, path)


def model_weight_bytes(model: nn.Module) -> int:
    """Bytes of all parameters and buffers (quantized codes and scales included)."""
    return sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])
