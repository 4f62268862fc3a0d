"""Sigma samplers and flow-matching helpers.

The ltx-trainer package (the reference) is not installed, so the formulas are pinned from its written
spec, reference/ltx-trainer-behaviour.md 1.4: an independent float64 NumPy recomputation from the same
random draws (taken from a cloned generator), the shift anchors, and the distribution's tail facts.
"""

import math

import numpy as np
import pytest
import torch

from ltxf.timesteps import (
    TimestepSamplerConfig,
    logit_normal_shift,
    noise_latents,
    sample_sigmas,
    shifted_logit_normal_sigmas,
    uniform_sigmas,
    velocity_target,
)


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _clone(gen: torch.Generator) -> torch.Generator:
    twin = torch.Generator()
    twin.set_state(gen.get_state())
    return twin


def test_shift_anchors():
    assert logit_normal_shift(1024) == pytest.approx(0.95, abs=1e-12)
    assert logit_normal_shift(4096) == pytest.approx(2.05, abs=1e-12)
    assert logit_normal_shift(8192) == pytest.approx(0.95 + 7168 * 1.1 / 3072, abs=1e-12)
    assert round(logit_normal_shift(8192), 3) == 3.517
    assert logit_normal_shift(100_000) > 30  # linear extrapolation, no clamp
    for bad in (0, -3, 2.5, True):
        with pytest.raises(ValueError, match="seq_len"):
            logit_normal_shift(bad)


def _numpy_reference(normal, fallback_u, choice_u, seq_len, std, eps, uniform_prob):
    """The spec's steps 1-5 in float64, written independently of the implementation."""
    m = (2.05 - 0.95) / (4096 - 1024)
    mu = m * seq_len + (0.95 - 1024 * m)
    sigmoid = lambda x: 1.0 / (1.0 + np.exp(-x))  # noqa: E731
    s = sigmoid(normal.astype(np.float64) * std + mu)
    hi, lo = sigmoid(mu + 3.0902 * std), sigmoid(mu - 2.5758 * std)
    z = (s - lo) / (hi - lo)
    z = np.clip(np.where(z < eps, 2 * eps - z, z), 0.0, 1.0)
    u = (1 - eps) * fallback_u.astype(np.float64) + eps
    return np.where(choice_u > uniform_prob, z, u)


@pytest.mark.parametrize(("seq_len", "std", "eps", "uniform_prob"), [(1024, 1.0, 1e-3, 0.1), (6000, 0.7, 0.01, 0.3)])
def test_shifted_logit_normal_matches_independent_recomputation(seq_len, std, eps, uniform_prob):
    batch = 4096
    gen = _gen(3)
    twin = _clone(gen)
    sigmas = shifted_logit_normal_sigmas(batch, seq_len, generator=gen, std=std, eps=eps, uniform_prob=uniform_prob)
    normal = torch.randn(batch, generator=twin).numpy()
    fallback_u = torch.rand(batch, generator=twin).numpy()
    choice_u = torch.rand(batch, generator=twin).numpy()
    expected = _numpy_reference(normal, fallback_u, choice_u, seq_len, std, eps, uniform_prob)
    assert sigmas.dtype == torch.float32 and sigmas.shape == (batch,)
    # float32 evaluation of the same formula vs float64: the stretch divides by (hi - lo) ~ 0.8
    np.testing.assert_allclose(sigmas.numpy(), expected, rtol=0, atol=2e-6)
    # the draws exercise the reflection below the 0.5th percentile and the clamp above the 99.9th
    assert (normal < -2.5758).sum() > 5 and (normal > 3.0902).sum() > 1


def test_tail_mass_and_uniform_branch_fractions():
    batch = 200_000
    sigmas = shifted_logit_normal_sigmas(batch, 2048, generator=_gen(1))
    assert sigmas.min() >= 0 and sigmas.max() <= 1
    # exactly 1.0 iff the normal lies above its 99.9th percentile and the uniform branch was not taken:
    # p = 0.001 * 0.9; allow 5 binomial standard deviations
    p = (1 - 0.5 * math.erfc(-3.0902 / math.sqrt(2))) * 0.9
    frac_one = (sigmas == 1.0).double().mean().item()
    assert abs(frac_one - p) < 5 * math.sqrt(p * (1 - p) / batch), frac_one
    # same draws with and without the fallback: they differ exactly where the fallback was chosen (~10%)
    no_fallback = shifted_logit_normal_sigmas(batch, 2048, generator=_gen(1), uniform_prob=0.0)
    frac_uniform = (sigmas != no_fallback).double().mean().item()
    assert abs(frac_uniform - 0.1) < 5 * math.sqrt(0.09 / batch), frac_uniform
    # the fallback values are uniform on [eps, 1)
    fallback = sigmas[sigmas != no_fallback]
    assert fallback.min() >= 1e-3 and fallback.max() < 1.0
    assert abs(fallback.mean().item() - (1 + 1e-3) / 2) < 0.01


def test_extreme_lengths_stay_in_range_and_do_not_collapse():
    for seq_len in (1, 64, 1024, 50_000, 1_000_000):
        sigmas = shifted_logit_normal_sigmas(10_000, seq_len, generator=_gen(seq_len))
        assert sigmas.min() >= 0 and sigmas.max() <= 1, seq_len
        # the stretch makes the distribution independent of the shift: a naive float32 evaluation of
        # sigmoid(n) rounds to 1 for shifts above ~17 (about 46k tokens) and divides 0 by 0 further out
        assert (sigmas == 1.0).double().mean() < 0.005, seq_len
    with pytest.raises(ValueError, match="beyond float64"):
        shifted_logit_normal_sigmas(4, 3_000_000, generator=_gen(0))
    # longer sequences shift sigma up (more noise), as the reference intends
    short = shifted_logit_normal_sigmas(20_000, 1024, generator=_gen(0), uniform_prob=0.0).median()
    long = shifted_logit_normal_sigmas(20_000, 8192, generator=_gen(0), uniform_prob=0.0).median()
    assert long > short + 0.1


def test_uniform_sigmas():
    gen = _gen(5)
    twin = _clone(gen)
    sigmas = uniform_sigmas(1000, generator=gen, min_value=0.2, max_value=0.7)
    torch.testing.assert_close(sigmas, torch.rand(1000, generator=twin) * 0.5 + 0.2)
    assert sigmas.min() >= 0.2 and sigmas.max() < 0.7
    with pytest.raises(ValueError, match="min_value"):
        uniform_sigmas(4, generator=gen, min_value=0.5, max_value=0.5)
    with pytest.raises(ValueError, match="batch_size"):
        uniform_sigmas(0, generator=gen)


def test_config_and_dispatch():
    assert TimestepSamplerConfig().mode == "shifted_logit_normal"
    cfg = TimestepSamplerConfig(mode="uniform", min_value=0.1, max_value=0.9)
    assert torch.equal(
        sample_sigmas(cfg, 8, 1024, _gen(2)), uniform_sigmas(8, generator=_gen(2), min_value=0.1, max_value=0.9)
    )
    cfg = TimestepSamplerConfig(std=0.5, eps=0.01, uniform_prob=0.2)
    expected = shifted_logit_normal_sigmas(8, 3000, generator=_gen(2), std=0.5, eps=0.01, uniform_prob=0.2)
    assert torch.equal(sample_sigmas(cfg, 8, 3000, _gen(2)), expected)
    assert torch.equal(sample_sigmas(cfg, 8, 3000, _gen(2)), sample_sigmas(cfg, 8, 3000, _gen(2)))
    for kwargs, match in [
        ({"mode": "logit"}, "mode"),
        ({"std": 0.0}, "std"),
        ({"eps": 0.0}, "eps"),
        ({"uniform_prob": 1.5}, "uniform_prob"),
        ({"min_value": 0.8, "max_value": 0.2}, "min_value"),
    ]:
        with pytest.raises(ValueError, match=match):
            TimestepSamplerConfig(**kwargs)


def test_noise_latents_and_velocity():
    gen = _gen(0)
    x0_BTC = torch.randn(3, 5, 4, generator=gen)
    noise_BTC = torch.randn(3, 5, 4, generator=gen)
    sigma_B = torch.tensor([0.0, 0.25, 1.0])
    xt = noise_latents(x0_BTC, noise_BTC, sigma_B)
    assert torch.equal(xt[0], x0_BTC[0]) and torch.equal(xt[2], noise_BTC[2])
    torch.testing.assert_close(xt[1], 0.75 * x0_BTC[1] + 0.25 * noise_BTC[1])
    assert torch.equal(velocity_target(x0_BTC, noise_BTC), noise_BTC - x0_BTC)
    # per-token sigma (0 on conditioning tokens keeps them clean)
    sigma_BT = torch.full((3, 5), 0.5)
    sigma_BT[:, :2] = 0.0
    xt = noise_latents(x0_BTC, noise_BTC, sigma_BT)
    assert torch.equal(xt[:, :2], x0_BTC[:, :2])
    torch.testing.assert_close(xt[:, 2:], 0.5 * x0_BTC[:, 2:] + 0.5 * noise_BTC[:, 2:])
    # moving along the velocity from x_sigma by sigma lands on the clean latents
    torch.testing.assert_close(xt - sigma_BT[..., None] * velocity_target(x0_BTC, noise_BTC), x0_BTC)
    with pytest.raises(ValueError, match="leading part"):
        noise_latents(x0_BTC, noise_BTC, torch.ones(5))
    with pytest.raises(ValueError, match="noise shape"):
        noise_latents(x0_BTC, noise_BTC[:, :4], sigma_B)
