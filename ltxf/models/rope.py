"""Rotary position embeddings (RoPE) as used by the LTX-2 / LTX-2.3 transformer and text connectors.

Positions are fractional coordinates per axis (video: time in seconds, height and width in pixels; audio and
text: a single axis). Each coordinate ``p`` of axis ``a`` is mapped to ``u = 2 * p / max_pos[a] - 1`` and
multiplied by a geometric frequency grid ``f_k = (pi / 2) * theta ** (k / (n - 1))``; the angles are laid out
frequency-major, axis-minor (``f0*u_t, f0*u_h, f0*u_w, f1*u_t, ...``) and padded at the front with zero angles
(cos 1, sin 0) up to the rotated width.

Two layouts exist, selected by the checkpoint's ``rope_type``:

* ``"split"`` (both official checkpoints): the angle list is cut into one contiguous block per head (low heads
  get low frequencies) and, inside a head of width ``d``, channel ``i`` rotates with channel ``i + d/2``.
  Tables have shape ``[B, T, H, d/2]``.
* ``"interleaved"``: every angle is repeated twice and channel pairs ``(2i, 2i+1)`` rotate across the whole inner
  width, ignoring heads. Tables have shape ``[B, T, D]``.

Everything here is a pure function of its inputs: nothing is cached and no input is modified in place, so the
tables can be rebuilt inside a traced or checkpointed region.

Shape legend: B batch, A position axes, T tokens, H heads, D inner width (H * d), K number of frequencies.
"""

from __future__ import annotations

import math
from typing import Literal

import torch

RopeType = Literal["split", "interleaved"]
ROPE_TYPES: tuple[RopeType, ...] = ("split", "interleaved")


def rope_frequencies(
    theta: float, num_freqs: int, *, double_precision: bool = True, device: torch.device | str | None = None
) -> torch.Tensor:
    """The frequency grid ``(pi / 2) * theta ** linspace(0, 1, num_freqs)`` as float32 ``[K]``.

    With ``double_precision`` (the checkpoints' ``frequencies_precision == "float64"``) the grid is computed in
    float64 and rounded once to float32; otherwise it is computed in float32 throughout, as the reference does
    for the other setting. A fresh tensor is returned on every call.
    """
    dtype = torch.float64 if double_precision else torch.float32
    exponents_K = torch.linspace(0.0, 1.0, num_freqs, dtype=dtype, device=device)
    # A Python-scalar base: no host-to-device copy when the grid is built on an accelerator.
    freqs_K = torch.pow(float(theta), exponents_K)
    return (freqs_K * math.pi / 2).to(torch.float32)


def rope_angles(
    positions: torch.Tensor,
    *,
    dim: int,
    max_pos: list[float] | tuple[float, ...],
    theta: float = 10000.0,
    use_middle_indices_grid: bool = True,
    double_precision: bool = True,
) -> torch.Tensor:
    """Rotation angles ``[B, T, K * A]`` (frequency-major, axis-minor), before any padding.

    ``positions`` is ``[B, A, T, 2]`` (``[start, end)`` bounds; the midpoint is used when
    ``use_middle_indices_grid``, else the start) or ``[B, A, T]`` (one coordinate per token). ``K`` is
    ``dim // (2 * A)``. The arithmetic runs in the positions' dtype up to the product with the float32 grid,
    matching the reference (bf16 positions are therefore quantised the same way).
    """
    if positions.ndim == 4:
        if positions.shape[-1] != 2:
            raise ValueError(f"positions must be [B, A, T, 2] bounds or [B, A, T]; got {tuple(positions.shape)}")
        positions_BAT = (positions[..., 0] + positions[..., 1]) / 2.0 if use_middle_indices_grid else positions[..., 0]
    elif positions.ndim == 3:
        if use_middle_indices_grid:
            raise ValueError("use_middle_indices_grid needs [B, A, T, 2] position bounds; got [B, A, T] positions")
        positions_BAT = positions
    else:
        raise ValueError(f"positions must be [B, A, T, 2] bounds or [B, A, T]; got {tuple(positions.shape)}")
    num_axes = positions_BAT.shape[1]
    if len(max_pos) != num_axes:
        raise ValueError(f"max_pos has {len(max_pos)} entries but positions have {num_axes} axes")
    freqs_K = rope_frequencies(theta, dim // (2 * num_axes), double_precision=double_precision,
                               device=positions.device)
    # u in [-1, 1] per axis; computed per axis with a Python divisor, like the reference, for bitwise parity.
    unit_BTA = torch.stack([positions_BAT[:, a] / max_pos[a] for a in range(num_axes)], dim=-1) * 2 - 1
    angles_BTAK = freqs_K * unit_BTA.unsqueeze(-1)
    return angles_BTAK.transpose(-1, -2).flatten(2)


def build_rope(
    positions: torch.Tensor,
    *,
    dim: int,
    num_heads: int,
    max_pos: list[float] | tuple[float, ...],
    rope_type: RopeType,
    theta: float = 10000.0,
    use_middle_indices_grid: bool = True,
    double_precision: bool = True,
    dtype: torch.dtype = torch.float32,
) -> tuple[torch.Tensor, torch.Tensor]:
    """RoPE ``(cos, sin)`` tables for tokens at ``positions``, cast to ``dtype``.

    Args:
        positions: ``[B, A, T, 2]`` ``[start, end)`` bounds or ``[B, A, T]`` coordinates (see :func:`rope_angles`).
            ``B`` may be 1 to share the tables across a batch.
        dim: the rotated (attention inner) width ``D``.
        num_heads: heads the split layout spreads the angles across (ignored for ``"interleaved"``).
        max_pos: per-axis normaliser (video ``[20, 2048, 2048]``, audio ``[20]``).
        rope_type: ``"split"`` -> tables ``[B, T, H, D / (2 H)]``; ``"interleaved"`` -> tables ``[B, T, D]``.
        theta, use_middle_indices_grid, double_precision: the checkpoint's ``positional_embedding_theta``,
            ``use_middle_indices_grid`` and ``frequencies_precision == "float64"``.
        dtype: output dtype (the activation dtype).

    Returns:
        ``(cos, sin)``, for :func:`apply_rope`.
    """
    angles_BTN = rope_angles(positions, dim=dim, max_pos=max_pos, theta=theta,
                             use_middle_indices_grid=use_middle_indices_grid, double_precision=double_precision)
    batch, num_tokens, num_angles = angles_BTN.shape
    if rope_type == "split":
        if dim % (2 * num_heads):
            raise ValueError(f"split RoPE needs dim ({dim}) divisible by 2 * num_heads ({2 * num_heads})")
        pad = dim // 2 - num_angles
        cos_BTN, sin_BTN = _pad_front(angles_BTN.cos(), angles_BTN.sin(), pad)
        shape = (batch, num_tokens, num_heads, dim // (2 * num_heads))
        return cos_BTN.reshape(shape).to(dtype), sin_BTN.reshape(shape).to(dtype)
    if rope_type == "interleaved":
        cos_BTD = angles_BTN.cos().repeat_interleave(2, dim=-1)
        sin_BTD = angles_BTN.sin().repeat_interleave(2, dim=-1)
        cos_BTD, sin_BTD = _pad_front(cos_BTD, sin_BTD, dim - 2 * num_angles)
        return cos_BTD.to(dtype), sin_BTD.to(dtype)
    raise ValueError(f"rope_type must be one of {ROPE_TYPES}, got {rope_type!r}")


def _pad_front(cos: torch.Tensor, sin: torch.Tensor, pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    # Unused leading slots rotate by zero: cos 1, sin 0.
    if pad == 0:
        return cos, sin
    shape = (*cos.shape[:-1], pad)
    cos = torch.cat([cos.new_ones(shape), cos], dim=-1)
    sin = torch.cat([sin.new_zeros(shape), sin], dim=-1)
    return cos, sin


def apply_rope(x_BTD: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, rope_type: RopeType) -> torch.Tensor:
    """Rotate ``x_BTD`` ``[B, T, D]`` by the tables from :func:`build_rope`; returns a new ``[B, T, D]`` tensor.

    Split: per head, ``(x1, x2) -> (x1 cos - x2 sin, x2 cos + x1 sin)`` with ``x1``/``x2`` the head's halves.
    Interleaved: per channel pair, ``(a, b) -> (a cos - b sin, b cos + a sin)``.
    The backward pass is the inverse rotation of the incoming gradient, so only the tables are kept for it (the
    tables never need gradients).
    """
    if rope_type not in ROPE_TYPES:
        raise ValueError(f"rope_type must be one of {ROPE_TYPES}, got {rope_type!r}")
    return _Rotate.apply(x_BTD, cos, sin, rope_type)


def _rotate(x_BTD: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, rope_type: RopeType, inverse: bool
            ) -> torch.Tensor:
    batch, num_tokens, dim = x_BTD.shape
    if rope_type == "split":
        # [..., 2, d/2]: the two halves of every head; tables are [B, T, H, d/2].
        first, second = x_BTD.reshape(batch, num_tokens, cos.shape[-2], 2, cos.shape[-1]).unbind(-2)
        pair_axis = -2
    else:
        # [..., D/2, 2]: adjacent channel pairs; the tables repeat each angle twice, so every other entry suffices.
        first, second = x_BTD.reshape(batch, num_tokens, dim // 2, 2).unbind(-1)
        cos, sin = cos[..., ::2], sin[..., ::2]
        pair_axis = -1
    sign = -1.0 if inverse else 1.0
    out_first = (first * cos).addcmul_(second, sin, value=-sign)
    out_second = (second * cos).addcmul_(first, sin, value=sign)
    return torch.stack((out_first, out_second), dim=pair_axis).view(batch, num_tokens, dim)


class _Rotate(torch.autograd.Function):
    # torch.func.vmap runs forward/backward per sample (per-sample gradients in experiments/).
    generate_vmap_rule = True

    @staticmethod
    def forward(x_BTD, cos, sin, rope_type):
        return _rotate(x_BTD, cos, sin, rope_type, inverse=False)

    @staticmethod
    def setup_context(ctx, inputs, output):
        _, cos, sin, rope_type = inputs
        ctx.save_for_backward(cos, sin)
        ctx.rope_type = rope_type

    @staticmethod
    def backward(ctx, grad_BTD):
        cos, sin = ctx.saved_tensors
        return _rotate(grad_BTD.contiguous(), cos, sin, ctx.rope_type, inverse=True), None, None, None
