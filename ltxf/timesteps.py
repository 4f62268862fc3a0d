"""Flow-matching sigma samplers and the rectified-flow noising / velocity target.

Pure functions of an explicit ``torch.Generator`` (derive it with ``ltxf.rng.make_generator``): the same
generator state gives the same sigmas, on the generator's device. The math is the reference trainer's
(ltx-trainer ``timestep_samplers.py``, as written down in reference/ltx-trainer-behaviour.md 1.4; the
ltx-trainer package itself is not installed here, so the tests pin the formulas from that spec):

- ``uniform``: sigma = U(0, 1) * (max - min) + min.
- ``shifted_logit_normal``: n ~ N(mu(L), std^2) with the sequence-length shift mu(L) = m * L + b
  (m = 1.1 / 3072, b = 0.95 - 1024 m: 0.95 at 1024 tokens, 2.05 at 4096, extrapolated beyond, no clamp);
  s = sigmoid(n) stretched so that the 0.5th..99.9th normal percentiles map to [0, 1]; values below
  ``eps`` reflected about ``eps``; clamped to [0, 1] (so about 0.1% of the logit-normal draws are exactly
  1.0); and with probability ``uniform_prob`` replaced by a uniform draw in [eps, 1).

Noising: x_sigma = (1 - sigma) x0 + sigma eps; target velocity v = eps - x0.

Shape legend: B batch, T tokens, C channels.
"""

import math
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

__all__ = [
    "SHIFT_SLOPE",
    "SHIFT_INTERCEPT",
    "TimestepSamplerConfig",
    "logit_normal_shift",
    "uniform_sigmas",
    "shifted_logit_normal_sigmas",
    "sample_sigmas",
    "noise_latents",
    "velocity_target",
]

# Anchors of the reference shift: 0.95 at 1024 tokens, 2.05 at 4096 tokens (not configurable there either).
SHIFT_SLOPE = (2.05 - 0.95) / (4096 - 1024)
SHIFT_INTERCEPT = 0.95 - 1024 * SHIFT_SLOPE
_Z_999 = 3.0902  # 99.9th percentile of N(0, 1): the upper stretch point
_Z_005 = 2.5758  # minus the 0.5th percentile of N(0, 1): the lower stretch point


def _sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x)) if x >= 0 else math.exp(x) / (1.0 + math.exp(x))


def _check_batch(batch_size: int) -> None:
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an integer >= 1, got {batch_size!r}")


def logit_normal_shift(seq_len: int) -> float:
    """The mean mu of the logit-normal for a sequence of ``seq_len`` tokens: ``SHIFT_SLOPE * seq_len +
    SHIFT_INTERCEPT`` (0.95 at 1024, 2.05 at 4096, about 3.517 at 8192)."""
    if isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len < 1:
        raise ValueError(f"seq_len must be an integer >= 1 (the target token count), got {seq_len!r}")
    return SHIFT_SLOPE * seq_len + SHIFT_INTERCEPT


def uniform_sigmas(
    batch_size: int, *, generator: torch.Generator, min_value: float = 0.0, max_value: float = 1.0
) -> Tensor:
    """``sigma_B = U(0, 1) * (max_value - min_value) + min_value``, float32 on the generator's device."""
    _check_batch(batch_size)
    if not 0.0 <= min_value < max_value <= 1.0:
        raise ValueError(f"uniform sigmas need 0 <= min_value < max_value <= 1, got {min_value}, {max_value}")
    u_B = torch.rand(batch_size, generator=generator, device=generator.device)
    return u_B * (max_value - min_value) + min_value


def shifted_logit_normal_sigmas(
    batch_size: int,
    seq_len: int,
    *,
    generator: torch.Generator,
    std: float = 1.0,
    eps: float = 1e-3,
    uniform_prob: float = 0.1,
) -> Tensor:
    """The reference's shifted, stretched logit-normal with a uniform fallback (module docstring).

    ``seq_len`` is the token count the shift is computed from (for IC-LoRA the target tokens only).
    Draws, in this order from ``generator``: B normals, B uniforms for the fallback value, B uniforms for
    the fallback choice. Returns float32 ``sigma_B`` in [0, 1] on the generator's device.
    """
    _check_batch(batch_size)
    mu = logit_normal_shift(seq_len)
    if not std > 0:
        raise ValueError(f"shifted_logit_normal: std must be > 0, got {std}")
    if not 0.0 < eps < 0.5:
        raise ValueError(f"shifted_logit_normal: eps must be in (0, 0.5), got {eps}")
    if not 0.0 <= uniform_prob <= 1.0:
        raise ValueError(f"shifted_logit_normal: uniform_prob must be in [0, 1], got {uniform_prob}")
    device = generator.device
    normal_B = torch.randn(batch_size, generator=generator, device=device) * std + mu
    fallback_B = (1.0 - eps) * torch.rand(batch_size, generator=generator, device=device) + eps
    choice_B = torch.rand(batch_size, generator=generator, device=device)

    # z = (sigmoid(n) - p_lo) / (p_hi - p_lo), evaluated through the complements 1 - sigmoid(x) = sigmoid(-x)
    # in float64: the same value, but long sequences (mu above ~17) neither collapse to sigma = 1 in float32
    # nor divide 0 by 0.
    q_lo = _sigmoid(-(mu - _Z_005 * std))  # 1 - p_lo
    q_hi = _sigmoid(-(mu + _Z_999 * std))  # 1 - p_hi
    if not q_lo - q_hi > 0:
        raise ValueError(f"shifted_logit_normal: seq_len {seq_len} gives a shift of {mu:.1f}, beyond float64 range")
    z_B = (q_lo - torch.sigmoid(-normal_B.double())) / (q_lo - q_hi)
    z_B = torch.where(z_B < eps, 2.0 * eps - z_B, z_B).clamp(0.0, 1.0).float()
    return torch.where(choice_B > uniform_prob, z_B, fallback_B)


@dataclass(frozen=True, kw_only=True)
class TimestepSamplerConfig:
    """How training sigmas are drawn (the reference's ``flow_matching`` section)."""

    mode: Literal["shifted_logit_normal", "uniform"] = "shifted_logit_normal"
    """The reference default is the shifted logit-normal."""
    std: float = 1.0
    """shifted_logit_normal: standard deviation of the normal before the sigmoid."""
    eps: float = 1e-3
    """shifted_logit_normal: reflection point near 0 and lower end of the uniform fallback."""
    uniform_prob: float = 0.1
    """shifted_logit_normal: probability of replacing a draw by U[eps, 1)."""
    min_value: float = 0.0
    """uniform: lower end."""
    max_value: float = 1.0
    """uniform: upper end."""

    def __post_init__(self) -> None:
        if self.mode not in ("shifted_logit_normal", "uniform"):
            raise ValueError(
                f"TimestepSamplerConfig.mode must be 'shifted_logit_normal' or 'uniform', got {self.mode!r}"
            )
        if not self.std > 0:
            raise ValueError(f"TimestepSamplerConfig.std must be > 0, got {self.std}")
        if not 0.0 < self.eps < 0.5:
            raise ValueError(f"TimestepSamplerConfig.eps must be in (0, 0.5), got {self.eps}")
        if not 0.0 <= self.uniform_prob <= 1.0:
            raise ValueError(f"TimestepSamplerConfig.uniform_prob must be in [0, 1], got {self.uniform_prob}")
        if not 0.0 <= self.min_value < self.max_value <= 1.0:
            raise ValueError(
                "TimestepSamplerConfig needs 0 <= min_value < max_value <= 1, "
                f"got min_value={self.min_value}, max_value={self.max_value}"
            )


def sample_sigmas(cfg: TimestepSamplerConfig, batch_size: int, seq_len: int, generator: torch.Generator) -> Tensor:
    """One sigma per batch element (float32 ``sigma_B``) with the sampler ``cfg`` selects; ``seq_len`` is
    only used by the shifted logit-normal."""
    if cfg.mode == "uniform":
        return uniform_sigmas(batch_size, generator=generator, min_value=cfg.min_value, max_value=cfg.max_value)
    return shifted_logit_normal_sigmas(
        batch_size, seq_len, generator=generator, std=cfg.std, eps=cfg.eps, uniform_prob=cfg.uniform_prob
    )


def _broadcast_sigma(sigma: Tensor, x: Tensor) -> Tensor:
    if sigma.dim() > x.dim() or tuple(sigma.shape) != tuple(x.shape[: sigma.dim()]):
        raise ValueError(
            f"sigma of shape {tuple(sigma.shape)} must be a leading part of the latents' shape {tuple(x.shape)} "
            "(sigma_B per sample or sigma_BT per token)"
        )
    return sigma.reshape(*sigma.shape, *([1] * (x.dim() - sigma.dim())))


def noise_latents(x0: Tensor, noise: Tensor, sigma: Tensor) -> Tensor:
    """``x_sigma = (1 - sigma) * x0 + sigma * noise``.

    ``sigma`` is per sample (``sigma_B``) or per token (``sigma_BT``, e.g. 0 on clean conditioning tokens)
    and is broadcast over the trailing dims of ``x0`` (e.g. ``x0_BTC``). The result dtype follows torch's
    type promotion (float32 for bf16 latents with float32 sigma).
    """
    if noise.shape != x0.shape:
        raise ValueError(f"noise shape {tuple(noise.shape)} differs from the latents' shape {tuple(x0.shape)}")
    s = _broadcast_sigma(sigma, x0)
    return (1.0 - s) * x0 + s * noise


def velocity_target(x0: Tensor, noise: Tensor) -> Tensor:
    """The rectified-flow velocity the transformer is trained to predict: ``noise - x0``."""
    if noise.shape != x0.shape:
        raise ValueError(f"noise shape {tuple(noise.shape)} differs from the latents' shape {tuple(x0.shape)}")
    return noise - x0
