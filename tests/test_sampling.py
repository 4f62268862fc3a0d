"""ltxf.sampling against ltx-core's scheduler, Euler step, guiders and (with a tiny random model) a whole
denoising loop written here from ltx-core pieces."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from ltxf.sampling import (
    GuidanceConfig,
    LatentState,
    append_reference_video,
    condition_video_frame,
    denoise,
    euler_step,
    guide,
    init_latent_state,
    ltx2_sigma_schedule,
    noise_state,
)
from tests.ltx_reference import import_ltx_core

schedulers = import_ltx_core("ltx_core.components.schedulers")
diffusion_steps = import_ltx_core("ltx_core.components.diffusion_steps")
guiders = import_ltx_core("ltx_core.components.guiders")


# ---------------------------------------------------------------------------------------------------- schedule


@pytest.mark.parametrize("num_steps", [2, 4, 8, 20, 40])
@pytest.mark.parametrize("num_tokens", [18, 1024, 4096, 6144, 12288])
def test_sigma_schedule_matches_reference(num_steps, num_tokens):
    # ltx-core counts prod(latent.shape[2:]) tokens: an unpatchified [B, C, F, H, W] latent gives F*H*W.
    reference = schedulers.LTX2Scheduler().execute(steps=num_steps, latent=torch.empty(1, 128, num_tokens, 1, 1))
    ours = ltx2_sigma_schedule(num_steps, num_tokens)
    assert ours.dtype == torch.float32 and ours.shape == (num_steps + 1,)
    # ltx-core computes in float32 and loses up to ~1.3e-6 (12288 tokens) in the 1 - sigma cancellation of the
    # stretch; ours is computed in float64 and rounded once.
    torch.testing.assert_close(ours, reference, atol=2e-6, rtol=0)


def test_sigma_schedule_documented_example_and_options():
    expected = torch.tensor([1, 0.974, 0.940, 0.893, 0.827, 0.722, 0.534, 0.1, 0])
    torch.testing.assert_close(ltx2_sigma_schedule(8, 6144), expected, atol=6e-4, rtol=0)
    for kwargs in (dict(stretch=False), dict(terminal=0.05), dict(max_shift=1.5, base_shift=0.5)):
        ref = schedulers.LTX2Scheduler().execute(steps=6, latent=torch.empty(1, 1, 3000), **kwargs)
        torch.testing.assert_close(ltx2_sigma_schedule(6, 3000, **kwargs), ref, atol=2e-6, rtol=0)
    # the shift is not clamped: more tokens always push sigmas up
    assert (ltx2_sigma_schedule(8, 40000)[1:-2] > ltx2_sigma_schedule(8, 6144)[1:-2]).all()
    # one step has nothing to stretch (ltx-core returns NaN or 0.1 there, depending on rounding)
    assert ltx2_sigma_schedule(1, 6144).tolist() == [1.0, 0.0]
    with pytest.raises(ValueError, match="num_steps"):
        ltx2_sigma_schedule(0, 6144)
    with pytest.raises(ValueError, match="terminal"):
        ltx2_sigma_schedule(4, 6144, terminal=1.0)


# ---------------------------------------------------------------------------------------------------- euler


def test_euler_step_matches_reference():
    sigmas = ltx2_sigma_schedule(4, 100)
    x = torch.randn(2, 7, 128)
    denoised = torch.randn(2, 7, 128)
    stepper = diffusion_steps.EulerDiffusionStep()
    for i in range(4):
        ref = stepper.step(x, denoised, sigmas, i)
        ours = euler_step(x, denoised, sigmas[i], sigmas[i + 1])
        # same float32 formula; a tensor vs a Python-float sigma may round the quotient differently (1 ulp)
        torch.testing.assert_close(ours, ref, atol=1e-6, rtol=1e-6)
    # python floats work too, and the last step lands exactly on the estimate
    torch.testing.assert_close(euler_step(x, denoised, 0.5, 0.0), denoised, atol=1e-6, rtol=0)
    # bf16 samples: arithmetic in fp32, result in bf16
    out = euler_step(x.bfloat16(), denoised, sigmas[1], sigmas[2])
    assert out.dtype == torch.bfloat16


# ---------------------------------------------------------------------------------------------------- guidance


def test_guide_matches_cfg_and_stg_guiders():
    cond, uncond, perturbed = torch.randn(3, 2, 9, 128).unbind(0)
    config = GuidanceConfig(cfg_scale=4.0, stg_scale=1.5)
    expected = cond + guiders.CFGGuider(4.0).delta(cond, uncond) + guiders.STGGuider(1.5).delta(cond, perturbed)
    torch.testing.assert_close(guide(cond, uncond, perturbed, config), expected, atol=1e-6, rtol=0)
    # disabled terms need no prediction
    assert torch.equal(guide(cond, None, None, GuidanceConfig(cfg_scale=1.0, stg_scale=0.0)), cond)
    with pytest.raises(ValueError, match="unconditional"):
        guide(cond, None, perturbed, config)


@pytest.mark.parametrize("rescale", [0.0, 0.7, 1.0])
def test_guide_matches_multimodal_guider(rescale):
    cond, uncond, perturbed, isolated = torch.randn(4, 1, 11, 128).unbind(0)
    cond = cond * 2.0  # give cond and pred clearly different stds so the rescale matters
    params = guiders.MultiModalGuiderParams(cfg_scale=3.0, stg_scale=1.0, stg_blocks=[29], rescale_scale=rescale,
                                            modality_scale=3.0)
    expected = guiders.MultiModalGuider(params=params).calculate(cond, uncond, perturbed, isolated)
    config = GuidanceConfig(cfg_scale=3.0, stg_scale=1.0, guidance_rescale=rescale, modality_scale=3.0)
    ours = guide(cond, uncond, perturbed, config, isolated=isolated)
    torch.testing.assert_close(ours, expected, atol=1e-5, rtol=1e-6)


def test_guide_rescale_is_per_sample():
    # ltx-core takes one std over the whole batch; ours is per sample, so a sample's result does not depend on
    # what else is in the batch (and equals ltx-core's for that sample alone).
    cond, uncond, perturbed = torch.randn(3, 3, 5, 16).unbind(0)
    cond = cond * torch.tensor([0.5, 1.0, 3.0])[:, None, None]
    config = GuidanceConfig(cfg_scale=5.0, stg_scale=0.5, guidance_rescale=0.7)
    batched = guide(cond, uncond, perturbed, config)
    params = guiders.MultiModalGuiderParams(cfg_scale=5.0, stg_scale=0.5, rescale_scale=0.7)
    for i in range(3):
        one = guide(cond[i : i + 1], uncond[i : i + 1], perturbed[i : i + 1], config)
        torch.testing.assert_close(batched[i : i + 1], one, atol=1e-6, rtol=0)
        ref = guiders.MultiModalGuider(params=params).calculate(cond[i : i + 1], uncond[i : i + 1],
                                                                perturbed[i : i + 1], 0.0)
        torch.testing.assert_close(one, ref, atol=1e-5, rtol=1e-6)


def test_guidance_config_validation():
    assert GuidanceConfig(stg_blocks=[3, 5]).stg_blocks == (3, 5)
    with pytest.raises(ValueError, match="stg_mode"):
        GuidanceConfig(stg_mode="stg_x")
    with pytest.raises(ValueError, match="stg_blocks"):
        GuidanceConfig(stg_blocks=(-1,))


# ---------------------------------------------------------------------------------------------------- state


def test_latent_state_helpers():
    from ltxf.latents import patchify_video, video_positions

    clean = torch.zeros(2, 2 * 3 * 4, 128)
    state = init_latent_state(clean, video_positions(2, 2, 3, 4, 25.0))
    frame = torch.randn(2, 128, 1, 3, 4)
    cond = condition_video_frame(state, frame, strength=1.0)
    assert torch.equal(cond.clean_latent[:, :12], patchify_video(frame))
    assert torch.equal(cond.denoise_mask[:, :12], torch.zeros(2, 12))
    assert torch.equal(cond.denoise_mask[:, 12:], torch.ones(2, 12))
    noise = torch.randn_like(clean)
    noisy = noise_state(cond, noise)
    assert torch.equal(noisy.latent[:, :12], patchify_video(frame))  # conditioned tokens stay clean
    assert torch.equal(noisy.latent[:, 12:], noise[:, 12:])
    assert torch.equal(state.clean_latent, clean)  # inputs are not modified
    with pytest.raises(ValueError, match="denoise_mask"):
        dataclasses.replace(state, denoise_mask=torch.ones(2, 24, 1))
    with pytest.raises(ValueError, match="positions"):
        LatentState(latent=clean, denoise_mask=torch.ones(2, 24), positions=torch.zeros(2, 3, 23, 2),
                    clean_latent=clean)


# ---------------------------------------------------------------------------------------------------- full loop
#
# One whole denoising loop: ltxf's `denoise` driving ltxf's transformer (loaded from a checkpoint written from a
# random-initialised reference model) against a loop written here from ltx-core pieces (LTX2Scheduler, X0Model,
# EulerDiffusionStep, CFG/STG/MultiModal guiders, BatchedPerturbationConfig, latent tools, conditioning and
# noiser) on the reference model itself, with the same noise. Tolerance 1e-5 absolute on latents of magnitude
# up to ~4: both run in float32, but 4 steps x up to 4 passes of two different implementations (ours evaluates
# AdaLN per distinct timestep and reduces differently, and the schedules differ by <2e-6) accumulate float32
# rounding; the measured maximum is ~3e-6 (the assertion message prints it on failure).

FPS = 25.0
GRID = (3, 2, 3)  # latent frames, height, width
AUDIO_FRAMES = 17  # audio_latent_length(17 pixel frames, 25 fps)
CONTEXT_TOKENS = 8
LOOP_ATOL = 1e-5


def _ltx():
    names = ("model.transformer", "model.transformer.model", "guidance.perturbations", "tools", "types",
             "components.patchifiers", "components.noisers", "conditioning", "model.transformer.modality")
    return {n: import_ltx_core(f"ltx_core.{n}") for n in names}


@pytest.fixture(scope="module", params=["ltx-2", "ltx-2.3"])
def tiny_models(request, tmp_path_factory):
    """(version, reference LTXModel, ltxf AVTransformer loaded from the reference's checkpoint)."""
    from ltxf.models.transformer import load_transformer
    from tests.ltx_reference import random_init_, tiny_transformer_config, write_official_checkpoint

    version = request.param
    config = tiny_transformer_config(version)
    with torch.device("meta"):
        reference = _ltx()["model.transformer"].LTXModelConfigurator.from_config({"transformer": config})
    reference = random_init_(reference.to_empty(device="cpu"), std=0.05).eval()
    path = tmp_path_factory.mktemp("ckpt") / f"tiny-{version}.safetensors"
    write_official_checkpoint(path, {"transformer": config}, {"model.diffusion_model.": reference})
    ours = load_transformer(path, torch.float32, "cpu").eval()
    return version, reference, ours


def _contexts(version: str, batch_size: int, generator: torch.Generator):
    video_dim, audio_dim = (24, 24) if version == "ltx-2" else (32, 16)

    def draw(dim):
        return torch.randn(batch_size, CONTEXT_TOKENS, dim, generator=generator)

    return draw(video_dim), draw(audio_dim), draw(video_dim), draw(audio_dim)


REFERENCE_SCALE = 2
REFERENCE_CROSS_ATTENTION = 0.5


def _reference_states(batch_size: int, frame: torch.Tensor | None, with_audio: bool, seed: int,
                      reference: torch.Tensor | None = None):
    """ltx-core video/audio LatentStates, optionally first-frame conditioned and/or with IC-LoRA reference tokens
    (attention-masked), noised with GaussianNoiser."""
    ltx = _ltx()
    frames, height, width = GRID
    video_tools = ltx["tools"].VideoLatentTools(
        ltx["components.patchifiers"].VideoLatentPatchifier(patch_size=1),
        ltx["types"].VideoLatentShape(batch_size, 128, frames, height, width), fps=FPS)
    video = video_tools.create_initial_state(torch.device("cpu"), torch.float32)
    if frame is not None:
        item = ltx["conditioning"].VideoConditionByLatentIndex(latent=frame, strength=1.0, latent_idx=0)
        video = item.apply_to(video, video_tools)
    if reference is not None:
        item = ltx["conditioning"].ConditioningItemAttentionStrengthWrapper(
            ltx["conditioning"].VideoConditionByReferenceLatent(latent=reference, downscale_factor=REFERENCE_SCALE),
            attention_mask=REFERENCE_CROSS_ATTENTION)
        video = item.apply_to(video, video_tools)
    video = ltx["components.noisers"].GaussianNoiser(torch.Generator().manual_seed(seed))(video)
    audio = None
    if with_audio:
        audio_tools = ltx["tools"].AudioLatentTools(
            ltx["components.patchifiers"].AudioPatchifier(patch_size=1),
            ltx["types"].AudioLatentShape(batch_size, 8, AUDIO_FRAMES, 16))
        audio = audio_tools.create_initial_state(torch.device("cpu"), torch.float32)
        audio = ltx["components.noisers"].GaussianNoiser(torch.Generator().manual_seed(seed + 1))(audio)
    return video, audio


def _ltxf_states(batch_size: int, frame: torch.Tensor | None, with_audio: bool, seed: int,
                 reference: torch.Tensor | None = None):
    from ltxf.latents import audio_positions, video_positions

    frames, height, width = GRID
    num_tokens = frames * height * width
    video = init_latent_state(torch.zeros(batch_size, num_tokens, 128), video_positions(batch_size, *GRID, FPS))
    if frame is not None:
        video = condition_video_frame(video, frame, strength=1.0)
    if reference is not None:
        video = append_reference_video(video, reference, FPS, spatial_scale=REFERENCE_SCALE)
        # generated and reference tokens see each other with weight 0.5, themselves fully
        total = video.num_tokens
        mask = torch.full((batch_size, total, total), REFERENCE_CROSS_ATTENTION)
        mask[:, :num_tokens, :num_tokens] = 1.0
        mask[:, num_tokens:, num_tokens:] = 1.0
        video = dataclasses.replace(video, attention_mask=mask)
    video = noise_state(video, torch.randn(video.latent.shape, generator=torch.Generator().manual_seed(seed)))
    audio = None
    if with_audio:
        audio = init_latent_state(torch.zeros(batch_size, AUDIO_FRAMES, 128), audio_positions(batch_size, AUDIO_FRAMES))
        audio = noise_state(audio, torch.randn(audio.latent.shape, generator=torch.Generator().manual_seed(seed + 1)))
    return video, audio


def _reference_loop(model, video, audio, *, sigmas, contexts, guidance: GuidanceConfig):
    """The validation-sampler loop from ltx-core pieces: X0Model passes, guiders, re-masking, Euler."""
    from dataclasses import replace

    ltx = _ltx()
    ptb = ltx["guidance.perturbations"]
    guiders_mod = guiders
    x0_model = ltx["model.transformer.model"].X0Model(model)
    ctx_v, ctx_a, neg_v, neg_a = contexts
    batch_size = video.latent.shape[0]
    blocks = None if guidance.stg_blocks is None else list(guidance.stg_blocks)
    stg_list = [ptb.Perturbation(ptb.PerturbationType.SKIP_VIDEO_SELF_ATTN, blocks)]
    if guidance.stg_mode == "stg_av" and audio is not None:
        stg_list.append(ptb.Perturbation(ptb.PerturbationType.SKIP_AUDIO_SELF_ATTN, blocks))
    isolate_list = [ptb.Perturbation(ptb.PerturbationType.SKIP_A2V_CROSS_ATTN, None),
                    ptb.Perturbation(ptb.PerturbationType.SKIP_V2A_CROSS_ATTN, None)]

    def batched(items):
        return ptb.BatchedPerturbationConfig([ptb.PerturbationConfig(items) for _ in range(batch_size)])

    params = guiders_mod.MultiModalGuiderParams(
        cfg_scale=guidance.cfg_scale, stg_scale=guidance.stg_scale, stg_blocks=blocks,
        rescale_scale=guidance.guidance_rescale, modality_scale=guidance.modality_scale)
    use_multimodal = guidance.guidance_rescale != 0.0 or guidance.modality_scale != 1.0
    stepper = diffusion_steps.EulerDiffusionStep()
    Modality = ltx["model.transformer.modality"].Modality
    for i in range(len(sigmas) - 1):
        sigma = sigmas[i]

        def run(cv, ca, perturbations, video=video, audio=audio, sigma=sigma):
            v = Modality(latent=video.latent, sigma=sigma.expand(batch_size), timesteps=video.denoise_mask * sigma,
                         positions=video.positions, context=cv, attention_mask=video.attention_mask)
            a = None if audio is None else Modality(
                latent=audio.latent, sigma=sigma.expand(batch_size), timesteps=audio.denoise_mask * sigma,
                positions=audio.positions, context=ca)
            return x0_model(v, a, perturbations)

        cond = run(ctx_v, ctx_a, ptb.BatchedPerturbationConfig.empty(batch_size))
        uncond = run(neg_v, neg_a, ptb.BatchedPerturbationConfig.empty(batch_size))
        perturbed = run(ctx_v, ctx_a, batched(stg_list))
        isolated = run(ctx_v, ctx_a, batched(isolate_list)) if use_multimodal and audio is not None else (0.0, 0.0)
        new = []
        for k, state in enumerate((video, audio)):
            if state is None:
                new.append(None)
                continue
            if use_multimodal:
                hat = guiders_mod.MultiModalGuider(params=params).calculate(cond[k], uncond[k], perturbed[k],
                                                                            isolated[k])
            else:
                hat = (cond[k] + guiders_mod.CFGGuider(guidance.cfg_scale).delta(cond[k], uncond[k])
                       + guiders_mod.STGGuider(guidance.stg_scale).delta(cond[k], perturbed[k]))
            hat = hat * state.denoise_mask + state.clean_latent.float() * (1 - state.denoise_mask)
            new.append(replace(state, latent=stepper.step(state.latent, hat, sigmas, i)))
        video, audio = new
    return video.latent, None if audio is None else audio.latent


LOOP_CASES = {
    # name: (batch, first-frame conditioned, audio, IC-LoRA reference, guidance)
    "t2v_av_cfg_stg": (2, False, True, False, GuidanceConfig(cfg_scale=4.0, stg_scale=1.0, stg_blocks=(1,))),
    "i2v_av_stg_v": (2, True, True, False,
                     GuidanceConfig(cfg_scale=3.0, stg_scale=1.5, stg_blocks=(0,), stg_mode="stg_v")),
    "i2v_av_rescale_modality": (1, True, True, False, GuidanceConfig(
        cfg_scale=3.0, stg_scale=1.0, stg_blocks=None, guidance_rescale=0.7, modality_scale=3.0)),
    "i2v_video_only": (1, True, False, False, GuidanceConfig(cfg_scale=4.0, stg_scale=1.0, stg_blocks=(1,))),
    "ic_lora_av_masked": (2, False, True, True, GuidanceConfig(cfg_scale=4.0, stg_scale=1.0, stg_blocks=(1,))),
}


@pytest.mark.parametrize("case", list(LOOP_CASES))
def test_denoise_loop_matches_reference(tiny_models, case):
    from ltxf.latents import patchify_video

    version, reference, ours = tiny_models
    batch_size, first_frame, with_audio, with_reference, guidance = LOOP_CASES[case]
    generator = torch.Generator().manual_seed(7)
    contexts = _contexts(version, batch_size, generator)
    frame = torch.randn(batch_size, 128, 1, GRID[1], GRID[2], generator=generator) if first_frame else None
    ref_latents = torch.randn(batch_size, 128, 2, 1, 2, generator=generator) if with_reference else None
    num_tokens = GRID[0] * GRID[1] * GRID[2]
    ref_sigmas = schedulers.LTX2Scheduler().execute(steps=4, latent=torch.empty(1, 128, *GRID))
    sigmas = ltx2_sigma_schedule(4, num_tokens)

    ref_video, ref_audio = _reference_states(batch_size, frame, with_audio, seed=3, reference=ref_latents)
    video, audio = _ltxf_states(batch_size, frame, with_audio, seed=3, reference=ref_latents)
    for name in ("latent", "clean_latent", "positions", "attention_mask"):
        a, b = getattr(video, name), getattr(ref_video, name)
        assert (a is None and b is None) or torch.equal(a, b), name
    assert torch.equal(video.denoise_mask, ref_video.denoise_mask[..., 0])

    with torch.no_grad():
        expected_v, expected_a = _reference_loop(reference, ref_video, ref_audio, sigmas=ref_sigmas,
                                                 contexts=contexts, guidance=guidance)
        ctx_v, ctx_a, neg_v, neg_a = contexts
        kwargs = dict(sigmas=sigmas, video_context=ctx_v, audio_context=ctx_a if with_audio else None,
                      negative_video_context=neg_v, negative_audio_context=neg_a if with_audio else None,
                      guidance=guidance)
        results = {batched: denoise(ours, video, audio, batch_passes=batched, **kwargs) for batched in (True, False)}

    for batched, (out_v, out_a) in results.items():
        err_v = (out_v - expected_v).abs().max().item()
        assert err_v < LOOP_ATOL, f"{version} {case} batched={batched}: video max error {err_v:.2e}"
        if with_audio:
            err_a = (out_a - expected_a).abs().max().item()
            assert err_a < LOOP_ATOL, f"{version} {case} batched={batched}: audio max error {err_a:.2e}"
        else:
            assert out_a is None
    if first_frame:  # conditioned tokens never move
        assert torch.equal(results[True][0][:, : GRID[1] * GRID[2]], patchify_video(frame))
    if with_reference:
        assert torch.equal(results[True][0][:, num_tokens:], patchify_video(ref_latents))
    # the loop does real work: the sample moved away from the noise
    assert (results[True][0] - video.latent).abs().max() > 0.1


def test_guidance_terms_change_the_result(tiny_models):
    """CFG, STG and the modality term each move the sample far beyond the parity tolerance, so the parity test
    above would catch a pass that is silently dropped or mis-batched."""
    version, _, ours = tiny_models
    generator = torch.Generator().manual_seed(11)
    ctx_v, ctx_a, neg_v, neg_a = _contexts(version, 1, generator)
    video, audio = _ltxf_states(1, None, True, seed=5)
    sigmas = ltx2_sigma_schedule(3, 18)
    kwargs = dict(sigmas=sigmas, video_context=ctx_v, audio_context=ctx_a, negative_video_context=neg_v,
                  negative_audio_context=neg_a)
    base = GuidanceConfig(cfg_scale=1.0, stg_scale=0.0, stg_blocks=(0,))
    with torch.no_grad():
        plain = denoise(ours, video, audio, guidance=base, **kwargs)
        for change in (dict(cfg_scale=3.0), dict(stg_scale=1.0), dict(modality_scale=3.0)):
            out = denoise(ours, video, audio, guidance=dataclasses.replace(base, **change), **kwargs)
            assert (out[0] - plain[0]).abs().max() > 100 * LOOP_ATOL, change
            assert (out[1] - plain[1]).abs().max() > 100 * LOOP_ATOL, change


def test_denoise_bad_input(tiny_models):
    _, _, ours = tiny_models
    video, audio = _ltxf_states(1, None, True, seed=1)
    ctx = torch.zeros(1, CONTEXT_TOKENS, 24)
    sigmas = ltx2_sigma_schedule(2, 18)
    with pytest.raises(ValueError, match="negative_video_context"):
        denoise(ours, video, None, sigmas=sigmas, video_context=ctx,
                guidance=GuidanceConfig(cfg_scale=2.0, stg_blocks=(0,)))
    with pytest.raises(ValueError, match="audio_context"):
        denoise(ours, video, audio, sigmas=sigmas, video_context=ctx, guidance=GuidanceConfig(cfg_scale=1.0))
    with pytest.raises(ValueError, match="stg_blocks"):
        denoise(ours, video, None, sigmas=sigmas, video_context=ctx,
                guidance=GuidanceConfig(cfg_scale=1.0, stg_blocks=(5,)))
    with pytest.raises(ValueError, match="stg_blocks/stg_mode"):
        denoise(ours, video, audio, sigmas=sigmas, video_context=ctx, audio_context=ctx,
                guidance=GuidanceConfig(cfg_scale=1.0, stg_blocks=(0,)), audio_guidance=GuidanceConfig(cfg_scale=1.0))


def test_denoise_autocast_runs_in_bf16_and_keeps_float32_state(tiny_models):
    version, _, ours = tiny_models
    ctx_v, ctx_a, neg_v, neg_a = _contexts(version, 1, torch.Generator().manual_seed(2))
    video, audio = _ltxf_states(1, None, True, seed=2)
    kwargs = dict(sigmas=ltx2_sigma_schedule(2, 18), video_context=ctx_v, audio_context=ctx_a,
                  negative_video_context=neg_v, negative_audio_context=neg_a,
                  guidance=GuidanceConfig(cfg_scale=3.0, stg_scale=1.0, stg_blocks=(1,)))
    with torch.no_grad():
        full = denoise(ours, video, audio, **kwargs)
        mixed = denoise(ours, video, audio, autocast_dtype=torch.bfloat16, **kwargs)
    assert mixed[0].dtype == torch.float32 and mixed[1].dtype == torch.float32
    # bf16 matmuls: close to the float32 run, but not equal (so autocast really was on)
    err = max((m - f).abs().max().item() for m, f in zip(mixed, full, strict=True))
    assert 0 < err < 0.1, err


class _SyncGuard:
    """Make every host read-back of a tensor value raise (the loop must stay asynchronous on accelerators)."""

    names = ("item", "tolist", "__bool__", "__float__", "__int__")

    def __enter__(self):
        self.saved = {n: getattr(torch.Tensor, n) for n in self.names}

        def forbid(name):
            def raise_(*_args, **_kwargs):
                raise AssertionError(f"host sync: Tensor.{name} called inside denoise")
            return raise_

        for name in self.names:
            setattr(torch.Tensor, name, forbid(name))

    def __exit__(self, *exc):
        for name, fn in self.saved.items():
            setattr(torch.Tensor, name, fn)


def _velocity_model(video, audio, perturbations):
    """A small pure-torch stand-in for the transformer (it syncs nowhere), that depends on every input the
    sampler builds: latent, per-token timesteps, sigma, context and perturbations."""
    def velocity(m, skip):
        ctx = m.context.mean(dim=(1, 2))[:, None, None]
        v = m.latent * (1 - m.timesteps[..., None]) + ctx + m.sigma[:, None, None]
        return v if skip is None else v + skip.any(dim=1).float()[:, None, None]
    v = velocity(video, perturbations.skip_video_self_attn)
    a = None if audio is None else velocity(audio, perturbations.skip_audio_self_attn)
    return v, a


def test_denoise_never_reads_device_values_back():
    video, audio = _ltxf_states(2, torch.randn(2, 128, 1, 2, 3), True, seed=4)
    ctx = torch.randn(2, 4, 8)
    kwargs = dict(sigmas=ltx2_sigma_schedule(3, 18), video_context=ctx, audio_context=ctx,
                  negative_video_context=-ctx, negative_audio_context=-ctx, num_layers=2,
                  guidance=GuidanceConfig(cfg_scale=3.0, stg_scale=1.0, stg_blocks=(1,), guidance_rescale=0.5,
                                          modality_scale=2.0))
    expected = denoise(_velocity_model, video, audio, batch_passes=False, **kwargs)
    with _SyncGuard():
        out = denoise(_velocity_model, video, audio, **kwargs)
        with pytest.raises(AssertionError, match="host sync"):  # the guard itself works
            bool(out[0].sum() > 0)
    for o, e in zip(out, expected, strict=True):
        torch.testing.assert_close(o, e, atol=1e-6, rtol=1e-6)


def test_state_builders_carry_the_keyframes_mask():
    """Frozen streams keep their keyframe marks; conditioned tokens keep them; appended reference tokens are no
    keyframes (mask 0), as the official pipelines build every video state."""
    from ltxf.sampling import (
        append_reference_tokens,
        condition_tokens,
        first_frame_keyframes_mask,
        frozen_state,
        init_latent_state,
    )

    keyframes = first_frame_keyframes_mask(2, 6, 3)
    assert keyframes.tolist() == [[1, 1, 1, 0, 0, 0]] * 2
    positions = torch.zeros(2, 3, 6, 2)
    frozen = frozen_state(torch.ones(2, 6, 4), positions, keyframes_mask_BT=keyframes)
    assert frozen.frozen and torch.equal(frozen.keyframes_mask, keyframes)
    state = init_latent_state(torch.zeros(2, 6, 4), positions, keyframes_mask_BT=keyframes)
    held = condition_tokens(state, torch.ones(2, 6, 4), torch.tensor([[0, 0, 0, 1, 1, 1]] * 2))
    assert torch.equal(held.keyframes_mask, keyframes)
    appended = append_reference_tokens(held, torch.ones(2, 2, 4), torch.zeros(2, 3, 2, 2))
    assert appended.keyframes_mask.tolist() == [[1, 1, 1, 0, 0, 0, 0, 0]] * 2
    plain = append_reference_tokens(init_latent_state(torch.zeros(2, 6, 4), positions), torch.ones(2, 2, 4),
                                    torch.zeros(2, 3, 2, 2))
    assert plain.keyframes_mask is None and plain.num_tokens == 8
