"""The flexible strategy: for every condition, the model inputs (noisy latent, per-token timesteps, loss mask,
positions, sequence order) equal the official 1.2 formulas, written out independently here."""

import pytest
import torch

from ltxf.config import FlowConfig, StrategyConfig, TrainConfig
from ltxf.models.text import TextContext
from ltxf.rng import fold_in, sample_keys
from ltxf.strategies.flexible import (
    ConditionConfig,
    FlexibleConfig,
    ModalityConfig,
    compute_flexible_losses,
    data_sources,
    prepare_flexible,
)
from ltxf.strategies.registry import build_strategy

B, F, H, W, T = 4, 3, 4, 6, 10  # video latent grid and audio steps


def official_video_positions(num_frames, height, width, fps):
    """get_pixel_coords with causal_fix, time / fps: [3, F*H*W, 2] (frame-major tokens)."""
    rows = []
    for f in range(num_frames):
        t0, t1 = max(f * 8 + 1 - 8, 0) / fps, max(f * 8 + 8 + 1 - 8, 0) / fps
        for h in range(height):
            for w in range(width):
                rows.append([[t0, t1], [h * 32, (h + 1) * 32], [w * 32, (w + 1) * 32]])
    return torch.tensor(rows, dtype=torch.float64).permute(1, 0, 2).float()


def official_audio_positions(num_steps):
    """AudioPatchifier bounds in seconds: start max(0, 4i-3)*160/16000, end max(0, 4(i+1)-3)*0.01."""
    return torch.tensor([[[max(0, 4 * i - 3) * 0.01, max(0, 4 * (i + 1) - 3) * 0.01] for i in range(num_steps)]])


def _batch(*, ref_frames=F, ref_size=(H, W), ref_audio=7, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {
        "video_latents": torch.randn(B, 128, F, H, W, generator=g),
        "fps": torch.tensor([24.0, 25.0, 30.0, 24.0])[:B],
        "audio_latents": torch.randn(B, 8, T, 16, generator=g),
        "reference_latents": torch.randn(B, 128, ref_frames, *ref_size, generator=g),
        "reference_fps": torch.tensor([12.0, 12.5, 15.0, 12.0])[:B],
        "reference_audio_latents": torch.randn(B, 8, ref_audio, 16, generator=g),
        "video_mask": (torch.rand(B, F, H, W, generator=g) > 0.5).float(),
        "audio_mask": (torch.rand(B, T, generator=g) > 0.5).float(),
    }


def _context(batch_size=B):
    return TextContext(torch.randn(batch_size, 5, 32), torch.randn(batch_size, 5, 16), None)


def _prepare(strategy, batch, *, first=0, micro=0, step=3, seed=7, context=None):
    """The inputs as the training step builds them: per-sample keys by global index, the micro-batch's key."""
    batch_size = batch["video_latents"].shape[0]
    shared_key = torch.tensor([fold_in(seed, step, micro, "batch")])
    return prepare_flexible(batch, context or _context(batch_size), strategy=strategy, flow=FlowConfig(),
                            key=sample_keys(seed, step, first, batch_size), shared_key=shared_key,
                            dtype=torch.float32)


def _strategy(video=None, audio=None):
    return FlexibleConfig(video=video, audio=audio)


def _video(*conditions, generated=True):
    return ModalityConfig(is_generated=generated, latents_dir="latents", conditions=tuple(conditions))


def _audio(*conditions, generated=True):
    return ModalityConfig(is_generated=generated, latents_dir="audio_latents", conditions=tuple(conditions))


def check_generated(stream, clean_BTC, cond_BT, *, num_reference=0):
    """Official noising with a conditioning mask: noisy = (1-s)x + s*eps, latent = m*x + (1-m)*noisy,
    timesteps = s*(1-m), loss on m == 0, target = eps - x over the target tokens."""
    target = stream.modality.latent[:, num_reference:]
    eps = stream.target_BTC + clean_BTC
    s = stream.sigma_B[:, None, None]
    m = cond_BT[..., None]
    expected = m * clean_BTC + (1 - m) * ((1 - s) * clean_BTC + s * eps)
    torch.testing.assert_close(target, expected, rtol=1e-5, atol=1e-5)  # float32 rounding only
    torch.testing.assert_close(stream.modality.timesteps[:, num_reference:],
                               stream.sigma_B[:, None] * (1 - cond_BT))
    assert torch.equal(stream.loss_mask_BT, cond_BT == 0)
    assert stream.modality.sigma.shape == (clean_BTC.shape[0],)


def _video_tokens(x):
    return x.flatten(2).transpose(1, 2)


def _audio_tokens(x):
    return x.transpose(1, 2).flatten(2)


def test_text_to_audio_video_draws_one_sigma_per_modality_and_official_positions():
    batch = _batch()
    inputs = _prepare(_strategy(_video(), _audio()), batch)
    zeros_v = torch.zeros(B, F * H * W)
    check_generated(inputs.video_stream, _video_tokens(batch["video_latents"]), zeros_v)
    check_generated(inputs.audio_stream, _audio_tokens(batch["audio_latents"]), torch.zeros(B, T))
    assert not torch.equal(inputs.video_stream.sigma_B, inputs.audio_stream.sigma_B), "independent sigma per modality"
    for b, fps in enumerate(batch["fps"].tolist()):
        torch.testing.assert_close(inputs.video_stream.modality.positions[b], official_video_positions(F, H, W, fps))
    expected_audio = official_audio_positions(T)[None].expand(B, 1, T, 2)
    torch.testing.assert_close(inputs.audio_stream.modality.positions, expected_audio)
    assert inputs.video_stream.modality.positions.dtype == torch.float32


@pytest.mark.parametrize(
    ("condition", "expected_T"),
    [
        (ConditionConfig(type="first_frame"), [f == 0 for f in range(F) for _ in range(H * W)]),
        (ConditionConfig(type="prefix", temporal_boundary=2), [f < 2 for f in range(F) for _ in range(H * W)]),
        (ConditionConfig(type="suffix", temporal_boundary=1), [f == F - 1 for f in range(F) for _ in range(H * W)]),
        # y1=0, x1=40, y2=70, x2=200 -> rows [0, 2), cols [1, min(6, 6)) on every frame
        (ConditionConfig(type="spatial_crop", spatial_region=(0, 40, 70, 200)),
         [h < 2 and 1 <= w < 6 for _ in range(F) for h in range(H) for w in range(W)]),
    ],
    ids=["first_frame", "prefix", "suffix", "spatial_crop"],
)
def test_video_intrinsic_conditions(condition, expected_T):
    batch = _batch()
    inputs = _prepare(_strategy(_video(condition)), batch)
    cond_BT = torch.tensor(expected_T, dtype=torch.float32).expand(B, -1)
    check_generated(inputs.video_stream, _video_tokens(batch["video_latents"]), cond_BT)
    assert inputs.audio_stream is None


def test_video_mask_condition_is_the_mask_frame_major():
    batch = _batch()
    inputs = _prepare(_strategy(_video(ConditionConfig(type="mask", mask_dir="video_masks"))), batch)
    cond_BT = (batch["video_mask"].reshape(B, -1) > 0.5).float()
    assert 0 < cond_BT.mean() < 1
    check_generated(inputs.video_stream, _video_tokens(batch["video_latents"]), cond_BT)


@pytest.mark.parametrize("kind", ["prefix", "suffix", "mask"])
def test_audio_intrinsic_conditions(kind):
    batch = _batch()
    condition = {"prefix": ConditionConfig(type="prefix", temporal_boundary=3),
                 "suffix": ConditionConfig(type="suffix", temporal_boundary=2),
                 "mask": ConditionConfig(type="mask", mask_dir="audio_masks")}[kind]
    inputs = _prepare(_strategy(audio=_audio(condition)), batch)
    index = torch.arange(T)
    cond_T = {"prefix": index < 3, "suffix": index >= T - 2}.get(kind)
    cond_BT = (batch["audio_mask"] > 0.5).float() if kind == "mask" else cond_T.float().expand(B, -1)
    check_generated(inputs.audio_stream, _audio_tokens(batch["audio_latents"]), cond_BT)
    assert inputs.video_stream is None


def test_video_reference_with_spatial_and_temporal_scale():
    # Target F=3 (17 frames), reference F=2 kept every 2nd frame (9 frames) at half the size.
    batch = _batch(ref_frames=2, ref_size=(H // 2, W // 2))
    inputs = _prepare(_strategy(_video(ConditionConfig(type="reference", latents_dir="reference_latents"))), batch)
    stream = inputs.video_stream
    num_ref = 2 * (H // 2) * (W // 2)
    assert stream.num_reference_tokens == num_ref
    ref_tokens = _video_tokens(batch["reference_latents"])
    # Sequence order: [reference | target]; reference clean at timestep 0 and never in the loss.
    torch.testing.assert_close(stream.modality.latent[:, :num_ref], ref_tokens)
    assert torch.all(stream.modality.timesteps[:, :num_ref] == 0)
    check_generated(stream, _video_tokens(batch["video_latents"]), torch.zeros(B, F * H * W), num_reference=num_ref)
    for b in range(B):
        fps, ref_fps = batch["fps"][b].item(), batch["reference_fps"][b].item()
        ref = official_video_positions(2, H // 2, W // 2, ref_fps)
        ref[0] = (ref[0] - (2 - 1) * (1.0 / fps)).clamp_min(0)  # t -= (S-1) * t_target (end of frame 0)
        ref[1:] *= 2
        expected = torch.cat([ref, official_video_positions(F, H, W, fps)], dim=1)
        torch.testing.assert_close(stream.modality.positions[b], expected)


def test_audio_reference_and_av2av_order():
    batch = _batch()
    batch["reference_fps"] = batch["fps"]  # a same-length reference stored at the target's frame rate
    strategy = _strategy(_video(ConditionConfig(type="reference", latents_dir="reference_latents")),
                         _audio(ConditionConfig(type="reference", latents_dir="reference_audio_latents")))
    inputs = _prepare(strategy, batch)
    audio = inputs.audio_stream
    assert audio.num_reference_tokens == 7
    torch.testing.assert_close(audio.modality.latent[:, :7], _audio_tokens(batch["reference_audio_latents"]))
    assert torch.all(audio.modality.timesteps[:, :7] == 0)
    expected = torch.cat([official_audio_positions(7), official_audio_positions(T)], dim=1)  # no shift for audio
    torch.testing.assert_close(audio.modality.positions, expected[None].expand(B, 1, 7 + T, 2))
    check_generated(audio, _audio_tokens(batch["audio_latents"]), torch.zeros(B, T), num_reference=7)
    # Same-size video reference: positions identical to the target's.
    video = inputs.video_stream
    num_ref = F * H * W
    torch.testing.assert_close(video.modality.positions[:, :, :num_ref], video.modality.positions[:, :, num_ref:])


@pytest.mark.parametrize("given", ["audio", "video"])
def test_given_modality_is_clean_at_timestep_zero_with_no_loss(given):
    batch = _batch()
    conditions = (ConditionConfig(type="first_frame"),) if given == "video" else ()
    strategy = (_strategy(_video(), _audio(generated=False)) if given == "audio"
                else _strategy(_video(*conditions, generated=False), _audio()))
    inputs = _prepare(strategy, batch)
    stream = getattr(inputs, f"{given}_stream")
    clean = _audio_tokens(batch["audio_latents"]) if given == "audio" else _video_tokens(batch["video_latents"])
    torch.testing.assert_close(stream.modality.latent, clean)
    assert torch.all(stream.modality.timesteps == 0) and torch.all(stream.sigma_B == 0)
    assert stream.target_BTC is None and stream.loss_mask_BT is None
    other = inputs.video_stream if given == "audio" else inputs.audio_stream
    losses = compute_flexible_losses(inputs, torch.randn_like(inputs.video_stream.modality.latent),
                                     torch.randn_like(inputs.audio_stream.modality.latent))
    assert (losses.audio_B is None) == (given == "audio")
    assert other.is_generated


def test_loss_is_masked_mean_per_sample_summed_over_modalities():
    batch = _batch()
    strategy = _strategy(_video(ConditionConfig(type="prefix", temporal_boundary=1),
                                ConditionConfig(type="reference", latents_dir="reference_latents")),
                         _audio(ConditionConfig(type="mask", mask_dir="audio_masks")))
    inputs = _prepare(strategy, batch)
    video_pred = torch.randn_like(inputs.video_stream.modality.latent)
    audio_pred = torch.randn_like(inputs.audio_stream.modality.latent)
    losses = compute_flexible_losses(inputs, video_pred, audio_pred)
    expected = torch.zeros(B)
    for stream, pred in ((inputs.video_stream, video_pred), (inputs.audio_stream, audio_pred)):
        target_len = stream.target_BTC.shape[1]
        m = stream.loss_mask_BT.float()[..., None].expand(-1, -1, pred.shape[-1])
        sq = (pred[:, -target_len:] - stream.target_BTC) ** 2
        expected += (sq * m).mean(dim=(1, 2)) / m.mean(dim=(1, 2)).clamp_min(1e-8)
    torch.testing.assert_close(losses.total_B, expected)


def test_draws_are_per_sample_and_independent_of_the_process_split():
    strategy = _strategy(_video(ConditionConfig(type="first_frame", probability=0.5),
                                ConditionConfig(type="reference", latents_dir="reference_latents", probability=0.5)),
                         _audio(ConditionConfig(type="prefix", temporal_boundary=2, probability=0.5)))
    batch = _batch()
    whole = _prepare(strategy, batch)
    halves = [_prepare(strategy, {k: v[i * 2:(i + 1) * 2] for k, v in batch.items()}, first=2 * i)
              for i in range(2)]
    for name in ("video", "audio"):
        a = getattr(whole, f"{name}_stream")
        for key in ("latent", "timesteps", "positions"):
            joined = torch.cat([getattr(getattr(h, f"{name}_stream").modality, key) for h in halves])
            assert torch.equal(getattr(a.modality, key), joined), (name, key)
        assert torch.equal(a.sigma_B, torch.cat([getattr(h, f"{name}_stream").sigma_B for h in halves]))
    # Per-sample Bernoulli: each sample conditions all of frame 0 or none of it, and the draws differ.
    cond_B = (~whole.video_stream.loss_mask_BT).any(dim=1)
    many = _prepare(strategy, _batch(), step=4)
    cond_B2 = (~many.video_stream.loss_mask_BT).any(dim=1)
    assert 0 < int(cond_B.sum()) + int(cond_B2.sum()) < 2 * B
    # The reference is one draw per batch (the step's key): some steps have it, some do not.
    applied = {_prepare(strategy, batch, step=s).video_stream.num_reference_tokens > 0 for s in range(8)}
    assert applied == {True, False}


def test_seeds_of_video_do_not_depend_on_audio_or_other_conditions():
    batch = _batch()
    alone = _prepare(_strategy(_video()), batch)
    both = _prepare(_strategy(_video(), _audio(ConditionConfig(type="suffix", temporal_boundary=1))), batch)
    assert torch.equal(alone.video_stream.modality.latent, both.video_stream.modality.latent)


def test_first_frame_on_a_single_frame_clip_conditions_everything_and_loss_is_zero():
    batch = {k: v for k, v in _batch().items() if k in ("fps",)}
    batch["video_latents"] = torch.randn(B, 128, 1, H, W)
    inputs = _prepare(_strategy(_video(ConditionConfig(type="first_frame"))), batch)
    assert not inputs.video_stream.loss_mask_BT.any()
    losses = compute_flexible_losses(inputs, torch.randn_like(inputs.video_stream.modality.latent), None)
    assert torch.all(losses.total_B == 0)


def test_data_sources_match_the_official_names():
    strategy = _strategy(_video(ConditionConfig(type="reference", latents_dir="reference_latents"),
                                ConditionConfig(type="mask", mask_dir="video_masks")),
                         _audio(ConditionConfig(type="reference", latents_dir="reference_audio_latents"),
                                ConditionConfig(type="mask", mask_dir="audio_masks"), generated=False))
    names = ["latents", "audio_latents", "conditions", "reference_latents", "video_masks",
             "reference_audio_latents", "audio_masks"]
    assert data_sources(strategy) == {name: name for name in names}
    assert list(data_sources(_strategy(_video(generated=False), _audio())))[0] == "audio_latents"


@pytest.mark.parametrize(
    ("build", "message"),
    [
        (lambda: _strategy(_video(generated=False), _audio(generated=False)), "at least one"),
        (lambda: _strategy(audio=_audio(ConditionConfig(type="first_frame"))), "video-only condition"),
        (lambda: _strategy(audio=_audio(ConditionConfig(type="spatial_crop", spatial_region=(0, 0, 32, 32)))),
         "allows \\['prefix', 'suffix', 'mask', 'reference'\\]"),
        (lambda: ConditionConfig(type="prefix"), "needs the field 'temporal_boundary'"),
        (lambda: ConditionConfig(type="prefix", temporal_boundary=0), "temporal_boundary must be >= 1"),
        (lambda: ConditionConfig(type="first_frame", mask_dir="x"), "takes no field 'mask_dir'"),
        (lambda: ConditionConfig(type="crop"), "must be one of \\['first_frame', 'prefix'"),
        (lambda: _strategy(_video(ConditionConfig(type="mask", mask_dir="a"),
                                  ConditionConfig(type="mask", mask_dir="b"))), "at most one 'mask' condition"),
        (lambda: ConditionConfig(type="first_frame", probability=1.5), "probability must be in \\[0, 1\\]"),
        (lambda: TrainConfig(strategy=StrategyConfig(name="flexible")), "at least one of strategy.video"),
    ],
)
def test_config_errors_name_the_field_and_allowed_values(build, message):
    with pytest.raises(ValueError, match=message):
        build()


def test_reference_shape_mismatch_names_both_shapes():
    batch = _batch(ref_frames=2, ref_size=(3, 5))
    with pytest.raises(ValueError, match=r"reference latents \[F, H, W\] = \[2, 3, 5\]"):
        _prepare(_strategy(_video(ConditionConfig(type="reference", latents_dir="reference_latents"))), batch)


def test_registered_as_flexible_and_a_plain_section_becomes_its_config():
    cfg = TrainConfig(strategy=_strategy(_video(), _audio(generated=False)))
    strategy = build_strategy(cfg)
    assert strategy.name == "flexible" and strategy.data_sources() == {"latents": "latents",
                                                                        "audio_latents": "audio_latents",
                                                                        "conditions": "conditions"}
    key = sample_keys(0, 0, 0, B)
    with_shared = strategy.prepare_inputs(_batch(), _context(), key, dtype=torch.float32, shared_key=key[:1])
    without = strategy.prepare_inputs(_batch(), _context(), key, dtype=torch.float32)
    assert torch.equal(with_shared.video.latent, without.video.latent)


def test_each_generated_modality_draws_its_sigma_with_its_own_token_count():
    """The shifted logit-normal's shift grows with the token count (official: per modality, from its own latents):
    from the same keys a 4096-token video draws clearly larger sigmas than a 10-step audio track."""
    n = 32
    batch = {"video_latents": torch.zeros(n, 128, 1, 64, 64), "fps": torch.full((n,), 24.0),
             "audio_latents": torch.zeros(n, 8, T, 16)}
    inputs = prepare_flexible(batch, _context(n), strategy=_strategy(_video(), _audio()), flow=FlowConfig(),
                              key=sample_keys(0, 0, 0, n), shared_key=torch.tensor([1]), dtype=torch.float32)
    video_sigma, audio_sigma = inputs.video_stream.sigma_B, inputs.audio_stream.sigma_B
    assert video_sigma.median() > audio_sigma.median() + 0.15, (video_sigma.median(), audio_sigma.median())


def test_keyframes_mask_marks_the_target_first_frame_and_none_reproduces_the_official_trainer():
    """strategy.keyframes_mask 'first_frame' (default) marks the target's first latent frame in the video Modality,
    never the reference tokens before it, and nothing in audio; 'none' leaves it unset, as ltx-trainer 1.2."""
    batch = _batch(ref_frames=2, ref_size=(H // 2, W // 2))
    video = _video(ConditionConfig(type="reference", latents_dir="reference_latents"))
    inputs = _prepare(_strategy(video, _audio()), batch)
    num_ref = 2 * (H // 2) * (W // 2)
    expected_T = torch.cat([torch.zeros(num_ref), torch.ones(H * W), torch.zeros((F - 1) * H * W)])
    assert torch.equal(inputs.video_stream.modality.keyframes_mask, expected_T[None, :, None].expand(B, -1, 1))
    assert inputs.audio_stream.modality.keyframes_mask is None
    official = _prepare(FlexibleConfig(video=video, audio=_audio(), keyframes_mask="none"), batch)
    assert official.video_stream.modality.keyframes_mask is None
    torch.testing.assert_close(official.video_stream.modality.latent, inputs.video_stream.modality.latent)
