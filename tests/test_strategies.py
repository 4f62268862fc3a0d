"""Training strategies: inputs, targets, masks and losses built from a batch, checked element by element."""

import pytest
import torch

from ltxf.config import FlowConfig, StrategyConfig
from ltxf.latents import audio_positions, patchify_audio, patchify_video, video_positions
from ltxf.models.text import TextContext
from ltxf.rng import make_generator
from ltxf.strategies.base import compute_losses, masked_mse_per_sample
from ltxf.strategies.text_to_video import prepare_text_to_video
from ltxf.strategies.video_to_video import prepare_video_to_video, reference_downscale_factor

B, F, H, W = 3, 3, 2, 4


def _batch(with_audio=False, with_reference=False, ref_scale=2):
    g = torch.Generator().manual_seed(1)
    batch = {
        "video_latents": torch.randn(B, 128, F, H * ref_scale, W * ref_scale, generator=g).to(torch.bfloat16),
        "fps": torch.tensor([24.0, 25.0, 30.0]),
    }
    if with_audio:
        batch["audio_latents"] = torch.randn(B, 8, 7, 16, generator=g)
    if with_reference:
        batch["reference_latents"] = torch.randn(B, 128, F, H, W, generator=g).to(torch.bfloat16)
    return batch


def _context():
    return TextContext(torch.randn(B, 5, 32), torch.randn(B, 5, 16), None)


def _generators(seed=0):
    return [make_generator(seed, 7, i, "sample") for i in range(B)]


def test_text_to_video_noising_targets_and_first_frame():
    batch = _batch(with_audio=True, ref_scale=1)
    strategy = StrategyConfig(first_frame_conditioning_p=0.5, with_audio=True)
    inputs = prepare_text_to_video(batch, _context(), strategy=strategy, flow=FlowConfig(),
                                   generators=_generators(), dtype=torch.float32)
    x0 = patchify_video(batch["video_latents"].float())
    target = inputs.video_target_BTC
    noise = target + x0
    sigma = inputs.video.timesteps
    # x_t = (1 - sigma) x0 + sigma * noise with the per-token sigma, and target = noise - x0.
    torch.testing.assert_close(inputs.video.latent, (1 - sigma[..., None]) * x0 + sigma[..., None] * noise)
    cond = ~inputs.video_loss_mask_BT
    frame0 = torch.arange(F * H * W) < H * W
    for b in range(B):
        if cond[b].any():
            assert torch.equal(cond[b], frame0), "conditioning covers exactly the first latent frame"
            assert torch.all(inputs.video.timesteps[b, frame0] == 0)
            torch.testing.assert_close(inputs.video.latent[b, frame0], x0[b, frame0])
        assert torch.all(inputs.video.timesteps[b, ~cond[b]] == inputs.sigma_B[b])
    # p = 0.5 over 3 samples with these seeds conditions some but not all (checks the draw is per sample).
    assert 0 < int(cond.any(dim=1).sum()) < B

    # Positions: time in seconds at each sample's own fps, pixels on H and W.
    expected = video_positions(B, F, H, W, fps=1.0)
    expected = torch.cat([expected[:, :1] / batch["fps"][:, None, None, None], expected[:, 1:]], dim=1)
    torch.testing.assert_close(inputs.video.positions, expected)

    # Audio shares sigma, has no conditioning and its own target.
    a0 = patchify_audio(batch["audio_latents"])
    assert torch.equal(inputs.audio.sigma, inputs.sigma_B)
    assert torch.all(inputs.audio.timesteps == inputs.sigma_B[:, None])
    audio_noise = inputs.audio_target_BTC + a0
    s = inputs.sigma_B[:, None, None]
    torch.testing.assert_close(inputs.audio.latent, (1 - s) * a0 + s * audio_noise)
    torch.testing.assert_close(inputs.audio.positions, audio_positions(B, 7))


def test_sample_draws_do_not_depend_on_batch_composition():
    """A sample's noise and sigma depend on its own generator only: the same sample drawn alone or in a batch."""
    batch = _batch(ref_scale=1)
    strategy = StrategyConfig(first_frame_conditioning_p=0.0)
    full = prepare_text_to_video(batch, _context(), strategy=strategy, flow=FlowConfig(), generators=_generators(),
                                 dtype=torch.float32)
    single_batch = {k: v[1:2] for k, v in batch.items()}
    single_ctx = TextContext(_context().video_context[1:2], _context().audio_context[1:2], None)
    single = prepare_text_to_video(single_batch, single_ctx, strategy=strategy, flow=FlowConfig(),
                                   generators=_generators()[1:2], dtype=torch.float32)
    torch.testing.assert_close(single.video.latent[0], full.video.latent[1])
    torch.testing.assert_close(single.sigma_B[0], full.sigma_B[1])


def test_video_to_video_reference_first_scaled_positions_no_loss():
    batch = _batch(with_reference=True, ref_scale=2)
    inputs = prepare_video_to_video(batch, _context(), strategy=StrategyConfig(name="video_to_video",
                                                                                first_frame_conditioning_p=0.0),
                                    flow=FlowConfig(), generators=_generators(), dtype=torch.float32)
    num_ref = F * H * W
    assert inputs.num_reference_tokens == num_ref
    ref = patchify_video(batch["reference_latents"].float())
    torch.testing.assert_close(inputs.video.latent[:, :num_ref], ref)
    assert torch.all(inputs.video.timesteps[:, :num_ref] == 0)
    assert inputs.video_target_BTC.shape[1] == F * (2 * H) * (2 * W)
    # Reference H and W positions are scaled by the downscale factor (2) onto the target's pixel grid.
    ref_pos = inputs.video.positions[:, :, :num_ref]
    plain = video_positions(B, F, H, W, fps=1.0)
    torch.testing.assert_close(ref_pos[:, 1:], plain[:, 1:] * 2)
    # The loss ignores the reference tokens: changing their prediction leaves it unchanged.
    pred = torch.randn(B, inputs.video.latent.shape[1], 128)
    pred2 = pred.clone()
    pred2[:, :num_ref] += 100
    a = compute_losses(inputs, pred, None, 1.0).total_B
    b = compute_losses(inputs, pred2, None, 1.0).total_B
    torch.testing.assert_close(a, b)


def test_reference_downscale_factor_errors():
    assert reference_downscale_factor((128, 3, 8, 12), (128, 3, 4, 6)) == 2
    with pytest.raises(ValueError, match="scaled down by one integer factor"):
        reference_downscale_factor((128, 3, 8, 12), (128, 3, 3, 6))


def test_masked_mse_per_sample_matches_manual():
    pred = torch.randn(2, 5, 4)
    target = torch.randn(2, 5, 4)
    mask = torch.tensor([[1, 1, 0, 0, 1], [0, 0, 0, 0, 0]], dtype=torch.bool)
    out = masked_mse_per_sample(pred, target, mask)
    manual0 = ((pred[0] - target[0]) ** 2).mean(-1)[mask[0]].mean()
    torch.testing.assert_close(out[0], manual0)
    assert out[1] == 0


def test_registry_maps_names_and_resolves_strategy_owned_config():
    """A strategy registered at run time owns its config section: a plain StrategyConfig naming it becomes its
    config class (shared fields kept), and build_strategy returns it; unknown names are a ValueError."""
    from dataclasses import dataclass

    from ltxf.config import TrainConfig
    from ltxf.strategies import registry
    from ltxf.strategies.text_to_video import TextToVideo
    from ltxf.strategies.video_to_video import VideoToVideo, VideoToVideoConfig

    @dataclass(frozen=True, kw_only=True)
    class EchoConfig(StrategyConfig):
        name: str = "echo_test"
        echo: int = 3

    class Echo(TextToVideo):
        name = "echo_test"
        config_type = EchoConfig

    assert registry.get_strategy("text_to_video") is TextToVideo
    assert registry.get_strategy("video_to_video") is VideoToVideo
    registry.register("echo_test", Echo)
    try:
        with pytest.raises(ValueError, match="already registered"):
            registry.register("echo_test", Echo)
        cfg = TrainConfig(strategy=StrategyConfig(name="echo_test", first_frame_conditioning_p=0.3))
        assert type(cfg.strategy) is EchoConfig and cfg.strategy.echo == 3
        assert cfg.strategy.first_frame_conditioning_p == 0.3
        strategy = registry.build_strategy(cfg)
        assert isinstance(strategy, Echo) and strategy.config is cfg.strategy
        assert "echo_test" in registry.strategy_names()
    finally:
        registry._registry.pop("echo_test")
    v2v = TrainConfig(strategy=StrategyConfig(name="video_to_video"))
    assert type(v2v.strategy) is VideoToVideoConfig
    assert registry.build_strategy(v2v).data_sources() == ("latents", "conditions", "reference_latents")
    with pytest.raises(ValueError,
                       match="unknown strategy 'nope'; registered: flexible, text_to_video, video_to_video"):
        registry.get_strategy("nope")


def test_no_strategy_name_is_compared_outside_the_registry():
    """The registry is the only place a name maps to a strategy: no ``strategy.name ==`` / ``!=`` in ltxf."""
    import re
    from pathlib import Path

    root = Path(__file__).resolve().parents[1] / "ltxf"
    pattern = re.compile(r"strategy\.name\s*(==|!=|in\b)|==\s*[\"'](text_to_video|video_to_video)[\"']")
    offenders = [f"{path.relative_to(root)}:{i}" for path in root.rglob("*.py")
                 for i, line in enumerate(path.read_text().splitlines(), 1) if pattern.search(line)]
    assert offenders == []
