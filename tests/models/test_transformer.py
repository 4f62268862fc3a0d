"""Parity of ltxf's audio-video transformer with ltx-core 1.0.0 (the oracle) at tiny configs of both versions,
plus the training-facing properties (functional_call, FSDP2 + activation checkpointing, no in-place edits,
checkpoint I/O).

Tolerance: outputs and gradients must agree within 1e-5 absolute in float32 (parameter gradients: relative to
their largest entry). The two implementations do the same math in a different order: AdaLN is evaluated once
per distinct timestep instead of once per token (the GEMM has a different M, so the BLAS blocking and summation
order differ), the RMS norms (with and without modulation), the gated residual and RoPE are fused autograd
functions with hand-written backward passes (different reduction order, addcmul), the STG blend is a select
instead of a multiply-add.
Each is a ~1 ulp (6e-8 relative) difference that the blocks amplify; observed errors are ~1e-6 at output
magnitudes of ~3. Weights are drawn with std 0.1 (not ltx-core's 0.02) so that a wiring bug moves the outputs by
far more than the tolerance (e.g. the float32 RoPE grid instead of the float64 one moves them by ~2e-5, swapping
the RoPE layout by ~1e-1)."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from ltxf.models import checkpoint
from ltxf.models.transformer import (
    AVTransformer,
    BlockSkips,
    Modality,
    Perturbations,
    TransformerConfig,
    load_transformer,
    save_transformer,
)
from tests.ltx_reference import import_ltx_core, random_init_, tiny_transformer_config, write_official_checkpoint

ATOL = 1e-5
VERSIONS = ("ltx-2", "ltx-2.3")
B, F_, H, W, A, S = 2, 3, 4, 6, 10, 16
T = F_ * H * W

ref_model = import_ltx_core("ltx_core.model.transformer")
ref_perturb = import_ltx_core("ltx_core.guidance.perturbations")
ref_tools = import_ltx_core("ltx_core.tools")
ref_patch = import_ltx_core("ltx_core.components.patchifiers")
ref_types = import_ltx_core("ltx_core.types")


def _build_reference(version: str, seed: int = 0) -> torch.nn.Module:
    with torch.device("meta"):
        model = ref_model.LTXModelConfigurator.from_config({"transformer": tiny_transformer_config(version)})
    return random_init_(model.to_empty(device="cpu"), std=0.1, seed=seed)


@pytest.fixture(scope="module", params=VERSIONS)
def models(request, tmp_path_factory):
    """(version, reference, ltxf model loaded from an official-layout checkpoint of the reference's weights)."""
    version = request.param
    ref = _build_reference(version)
    path = tmp_path_factory.mktemp(version) / "model.safetensors"
    write_official_checkpoint(path, {"transformer": tiny_transformer_config(version)},
                              {checkpoint.TRANSFORMER_PREFIX: ref})
    return version, ref, load_transformer(path)


def _inputs(version: str, *, seed: int = 0, first_frame_clean: bool = False, left_padding: bool = True,
            attention_mask: bool = False, audio_enabled: bool = True) -> dict:
    """Keyword arguments shared by both Modality classes: {"video": {...}, "audio": {...}}."""
    g = torch.Generator().manual_seed(seed)
    vtools = ref_tools.VideoLatentTools(ref_patch.VideoLatentPatchifier(patch_size=1),
                                        ref_types.VideoLatentShape(B, 128, F_, H, W), fps=25.0)
    atools = ref_tools.AudioLatentTools(ref_patch.AudioPatchifier(patch_size=1),
                                        ref_types.AudioLatentShape(B, 8, A, 16))
    vpos = vtools.create_initial_state(torch.device("cpu"), torch.float32).positions
    apos = atools.create_initial_state(torch.device("cpu"), torch.float32).positions
    sigma = torch.tensor([0.83, 0.27])  # batch of 2 with different sigmas
    timesteps = sigma[:, None].expand(B, T).clone()
    if first_frame_clean:
        timesteps[:, : H * W] = 0.0
    ctx_v, ctx_a = (24, 24) if version == "ltx-2" else (32, 16)
    mask = None
    if left_padding:
        mask = torch.ones(B, S, dtype=torch.int64)
        mask[1, :5] = 0
    video = dict(latent=torch.randn(B, T, 128, generator=g), sigma=sigma, timesteps=timesteps, positions=vpos,
                 context=torch.randn(B, S, ctx_v, generator=g), context_mask=mask)
    if attention_mask:
        weights = torch.rand(B, T, T, generator=g)
        weights[weights < 0.3] = 0.0
        weights[:, torch.arange(T), torch.arange(T)] = 1.0
        video["attention_mask"] = weights
    audio_sigma = torch.tensor([0.61, 0.95])
    audio = dict(latent=torch.randn(B, A, 128, generator=g), sigma=audio_sigma,
                 timesteps=audio_sigma[:, None].expand(B, A), positions=apos,
                 context=torch.randn(B, S, ctx_a, generator=g), context_mask=mask, enabled=audio_enabled)
    return {"video": video, "audio": audio}


def _run_reference(ref, inputs: dict, perturbations=None):
    video = ref_model.Modality(**inputs["video"]) if inputs.get("video") else None
    audio = ref_model.Modality(**inputs["audio"]) if inputs.get("audio") else None
    perturbations = perturbations or ref_perturb.BatchedPerturbationConfig.empty(B)
    return ref(video, audio, perturbations)


def _run_ours(model, inputs: dict, perturbations=None):
    video = Modality(**inputs["video"]) if inputs.get("video") else None
    audio = Modality(**inputs["audio"]) if inputs.get("audio") else None
    return model(video=video, audio=audio, perturbations=perturbations)


def _assert_outputs_close(ours, ref) -> None:
    for name, a, b in zip(("video", "audio"), ours, ref, strict=True):
        if b is None:
            assert a is None, name
            continue
        assert a.shape == b.shape, name
        torch.testing.assert_close(a, b, atol=ATOL, rtol=0, msg=lambda m, n=name: f"{n}: {m}")


# ------------------------------------------------------------------------------------------------------------
# Forward parity


@pytest.mark.parametrize("case", ["plain", "first_frame_clean", "self_attention_mask", "audio_disabled",
                                  "video_disabled", "no_text_mask", "video_only", "audio_only"])
def test_forward_matches_reference(models, case):
    version, ref, ours = models
    inputs = _inputs(version, first_frame_clean=case == "first_frame_clean",
                     attention_mask=case == "self_attention_mask", audio_enabled=case != "audio_disabled",
                     left_padding=case != "no_text_mask")
    if case == "video_disabled":
        inputs["video"]["enabled"] = False
    if case == "video_only":
        inputs["audio"] = None
    if case == "audio_only":
        inputs["video"] = None
    with torch.no_grad():
        expected = _run_reference(ref, inputs)
        got = _run_ours(ours, inputs)
    _assert_outputs_close(got, expected)


def test_inputs_change_the_output(models):
    """Guards the parity tests against comparing constant outputs: each input case must move the result."""
    version, _, ours = models
    with torch.no_grad():
        base = _run_ours(ours, _inputs(version))
        for kwargs in ({"first_frame_clean": True}, {"attention_mask": True}, {"left_padding": False}):
            other = _run_ours(ours, _inputs(version, **kwargs))
            assert (other[0] - base[0]).abs().max() > 100 * ATOL, kwargs
        disabled = _run_ours(ours, _inputs(version, audio_enabled=False))
        assert (disabled[1] - base[1]).abs().max() > 100 * ATOL


@pytest.mark.parametrize("kind", ["video_self_attn", "audio_self_attn", "a2v", "v2a"])
def test_stg_perturbation_on_some_samples_matches_reference(models, kind):
    version, ref, ours = models
    ref_kind = {"video_self_attn": "SKIP_VIDEO_SELF_ATTN", "audio_self_attn": "SKIP_AUDIO_SELF_ATTN",
                "a2v": "SKIP_A2V_CROSS_ATTN", "v2a": "SKIP_V2A_CROSS_ATTN"}[kind]
    perturbation = ref_perturb.Perturbation(getattr(ref_perturb.PerturbationType, ref_kind), [1])
    ref_config = ref_perturb.BatchedPerturbationConfig(
        [ref_perturb.PerturbationConfig([perturbation]), ref_perturb.PerturbationConfig.empty()])
    ours_config = Perturbations.build(B, 2, skip=kind, blocks=[1], samples=[0])
    inputs = _inputs(version, first_frame_clean=True)
    with torch.no_grad():
        expected = _run_reference(ref, inputs, ref_config)
        got = _run_ours(ours, inputs, ours_config)
        unperturbed = _run_ours(ours, inputs)
    _assert_outputs_close(got, expected)
    # The perturbation acts on sample 0 only (and does act).
    changed = 0 if kind in ("video_self_attn", "a2v") else 1
    assert (got[changed][0] - unperturbed[changed][0]).abs().max() > 100 * ATOL
    torch.testing.assert_close(got[changed][1], unperturbed[changed][1], atol=0, rtol=0)


def test_stg_on_whole_batch_matches_reference(models):
    """The reference skips Q/K entirely when every sample is perturbed; the select path must agree."""
    version, ref, ours = models
    kinds = [ref_perturb.PerturbationType.SKIP_VIDEO_SELF_ATTN, ref_perturb.PerturbationType.SKIP_V2A_CROSS_ATTN]
    ref_config = ref_perturb.BatchedPerturbationConfig(
        [ref_perturb.PerturbationConfig([ref_perturb.Perturbation(k, None) for k in kinds])] * B)
    ours_config = Perturbations.build(B, 2, skip=["video_self_attn", "v2a"])
    inputs = _inputs(version)
    with torch.no_grad():
        _assert_outputs_close(_run_ours(ours, inputs, ours_config), _run_reference(ref, inputs, ref_config))


@pytest.mark.parametrize("timesteps", ["per_token", "uniform"])
def test_gradients_match_reference(models, timesteps):
    """Input and parameter gradients, through the per-token (first frame clean) and the broadcast AdaLN paths."""
    version, ref, ours = models
    inputs = _inputs(version, first_frame_clean=timesteps == "per_token", attention_mask=True)
    g = torch.Generator().manual_seed(3)
    weights_v, weights_a = torch.randn(B, T, 128, generator=g), torch.randn(B, A, 128, generator=g)

    def grads(model, run, uniform: bool):
        model.zero_grad(set_to_none=True)
        local = {k: dict(v) for k, v in inputs.items()}
        latents = {k: local[k]["latent"].clone().requires_grad_(True) for k in ("video", "audio")}
        for k in latents:
            local[k]["latent"] = latents[k]
            if uniform:  # [B] timesteps: one AdaLN row per sample, broadcast over the tokens
                local[k]["timesteps"] = local[k]["sigma"]
        video_out, audio_out = run(model, local)
        ((video_out * weights_v).sum() + (audio_out * weights_a).sum()).backward()
        params = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
        return {k: v.grad for k, v in latents.items()}, params

    ref_latent_grads, ref_param_grads = grads(ref, _run_reference, False)
    our_latent_grads, our_param_grads = grads(ours, _run_ours, timesteps == "uniform")
    for k in ("video", "audio"):
        torch.testing.assert_close(our_latent_grads[k], ref_latent_grads[k], atol=ATOL, rtol=0)
    assert set(our_param_grads) == set(ref_param_grads)
    for name, grad in ref_param_grads.items():
        # Parameter gradients are sums over tokens and batch, so compare them relative to their scale.
        scale = max(1.0, grad.abs().max().item())
        torch.testing.assert_close(our_param_grads[name], grad, atol=ATOL * scale, rtol=0,
                                   msg=lambda m, n=name: f"{n}: {m}")


def test_bfloat16_runs_close_to_float32(models):
    """The fused autograd functions accumulate in float32; bf16 must stay near the fp32 result (loose bound:
    bf16 has a 2^-8 relative step) and produce finite gradients of the right dtype."""
    version, _, ours = models
    model16 = AVTransformer(ours.config).to(torch.bfloat16)
    model16.load_state_dict(ours.state_dict())
    inputs = _inputs(version, first_frame_clean=True, attention_mask=True)
    with torch.no_grad():
        expected = _run_ours(ours, inputs)
    video, audio = _run_ours(model16, inputs)
    assert video.dtype == torch.bfloat16
    for got, want in zip((video, audio), expected, strict=True):
        assert (got.float() - want).abs().max() < 0.05 * want.abs().max()
    (video.float().square().mean() + audio.float().square().mean()).backward()
    for name, p in model16.named_parameters():
        assert p.grad is not None and p.grad.dtype == torch.bfloat16 and torch.isfinite(p.grad).all(), name


# ------------------------------------------------------------------------------------------------------------
# Per-distinct-timestep AdaLN


def test_distinct_timestep_paths_agree(models):
    """Uniform [B] timesteps, per-token [B, T] timesteps and the per-token (reference-style) path agree."""
    version, _, ours = models
    inputs = _inputs(version)
    per_token = AVTransformer(ours.config, max_distinct_timesteps=None)
    per_token.load_state_dict(ours.state_dict())
    with torch.no_grad():
        dedup = _run_ours(ours, inputs)
        reference_style = _run_ours(per_token, inputs)
        inputs["video"]["timesteps"] = inputs["video"]["sigma"]
        uniform = _run_ours(ours, inputs)
    _assert_outputs_close(dedup, reference_style)
    _assert_outputs_close(uniform, reference_style)


def test_positions_shared_across_the_batch(models):
    """[1, A, T, 2] positions broadcast (one set of RoPE tables) and give the per-sample result."""
    version, _, ours = models
    inputs = _inputs(version, first_frame_clean=True)
    with torch.no_grad():
        expected = _run_ours(ours, inputs)
        for k in ("video", "audio"):
            assert torch.equal(inputs[k]["positions"][0], inputs[k]["positions"][1])
            inputs[k]["positions"] = inputs[k]["positions"][:1]
        _assert_outputs_close(_run_ours(ours, inputs), expected)


def test_too_many_distinct_timesteps_is_an_error(models):
    version, _, ours = models
    capped = AVTransformer(ours.config, max_distinct_timesteps=2)
    capped.load_state_dict(ours.state_dict())
    inputs = _inputs(version, first_frame_clean=True)
    with torch.no_grad():
        _run_ours(capped, inputs)  # sigma and 0: two values, fine
        inputs["video"]["timesteps"][:, -5:] = 0.5
        with pytest.raises(ValueError, match="more than max_distinct_timesteps=2"):
            _run_ours(capped, inputs)


# ------------------------------------------------------------------------------------------------------------
# Training-facing properties


def test_functional_call_with_swapped_parameters_takes_effect(models):
    version, _, ours = models
    inputs = _inputs(version)
    video, audio = Modality(**inputs["video"]), Modality(**inputs["audio"])
    params = dict(ours.named_parameters())
    swapped = dict(params)
    swapped["patchify_proj.weight"] = torch.zeros_like(params["patchify_proj.weight"])
    with torch.no_grad():
        base = ours(video=video, audio=audio)
        via_call = torch.func.functional_call(ours, swapped, args=(), kwargs={"video": video, "audio": audio})
        same = torch.func.functional_call(ours, params, args=(), kwargs={"video": video, "audio": audio})
        edited = AVTransformer(ours.config)
        edited.load_state_dict({**ours.state_dict(), "patchify_proj.weight": swapped["patchify_proj.weight"]})
        expected = edited(video=video, audio=audio)
    torch.testing.assert_close(same[0], base[0], atol=0, rtol=0)
    assert (via_call[0] - base[0]).abs().max() > 1e-3
    torch.testing.assert_close(via_call[0], expected[0], atol=0, rtol=0)
    assert torch.equal(ours.patchify_proj.weight, params["patchify_proj.weight"])


def test_blocks_return_fresh_tensors_and_leave_inputs_alone(models):
    version, _, ours = models
    inputs = _inputs(version, first_frame_clean=True, attention_mask=True)
    video, audio = Modality(**inputs["video"]), Modality(**inputs["audio"])
    snapshot = {k: {n: v.clone() for n, v in d.items() if isinstance(v, torch.Tensor)} for k, d in inputs.items()}
    vx, v_in, _ = ours.prepare_stream("video", video, audio)
    ax, a_in, _ = ours.prepare_stream("audio", audio, video)
    vx_before, ax_before = vx.clone(), ax.clone()
    skips = Perturbations.build(B, 2, skip="video_self_attn", samples=[1]).for_block(0)
    assert isinstance(skips, BlockSkips)
    out_v, out_a = ours.transformer_blocks[0](vx, ax, v_in, a_in, skips)
    for out, inp in ((out_v, vx), (out_a, ax)):
        assert out._base is None, "a block output is a view"
        assert out.untyped_storage().data_ptr() != inp.untyped_storage().data_ptr()
    assert torch.equal(vx, vx_before) and torch.equal(ax, ax_before)
    ours(video=video, audio=audio)[0].sum().backward()
    ours.zero_grad(set_to_none=True)
    for k, d in snapshot.items():
        for n, v in d.items():
            assert torch.equal(inputs[k][n], v), f"{k}.{n} was modified"


_FSDP_SCRIPT = textwrap.dedent("""
    import copy, torch
    import torch.distributed as dist
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper
    from torch.distributed.fsdp import fully_shard
    from ltxf.models.transformer import AVTransformer, Modality, Perturbations, TransformerConfig
    from tests.ltx_reference import tiny_transformer_config

    dist.init_process_group("gloo", rank=0, world_size=1, init_method="tcp://127.0.0.1:0")
    config = TransformerConfig.from_checkpoint_config(tiny_transformer_config("ltx-2.3"))
    torch.manual_seed(0)
    plain = AVTransformer(config)
    state = copy.deepcopy(plain.state_dict())
    B, T, A, S = 2, 24, 6, 8
    sigma = torch.tensor([0.8, 0.3])
    timesteps = sigma[:, None].repeat(1, T)
    timesteps[:, :8] = 0.0
    start = torch.rand(B, 3, T, 1) * torch.tensor([2.0, 500.0, 500.0]).view(1, 3, 1, 1)
    audio_start = torch.rand(B, 1, A, 1) * 2
    inputs = {
        "video": dict(latent=torch.randn(B, T, 128), sigma=sigma, timesteps=timesteps,
                      positions=torch.cat([start, start + 1], -1), context=torch.randn(B, S, 32),
                      context_mask=torch.tensor([[1] * S, [0] * 3 + [1] * (S - 3)]),
                      attention_mask=torch.rand(B, T, T)),
        "audio": dict(latent=torch.randn(B, A, 128), sigma=sigma, timesteps=sigma, context=torch.randn(B, S, 16),
                      positions=torch.cat([audio_start, audio_start + 0.04], -1)),
    }
    perturbations = Perturbations.build(B, 2, skip="video_self_attn", blocks=[1], samples=[0])

    def loss_of(model, params=None):
        kwargs = dict(video=Modality(**inputs["video"]), audio=Modality(**inputs["audio"]),
                      perturbations=perturbations)
        if params is None:
            video, audio = model(**kwargs)
        else:
            video, audio = torch.func.functional_call(model, params, args=(), kwargs=kwargs)
        return video.square().mean() + audio.square().mean()

    loss = loss_of(plain)
    loss.backward()
    expected = {n: p.grad.clone() for n, p in plain.named_parameters()}

    sharded = AVTransformer(config)
    sharded.load_state_dict(state)
    for i, block in enumerate(sharded.transformer_blocks):
        sharded.transformer_blocks[i] = checkpoint_wrapper(block)
    for block in sharded.transformer_blocks:
        fully_shard(block)
    fully_shard(sharded)
    sharded_loss = loss_of(sharded)
    sharded_loss.backward()
    fsdp_diff = max((p.grad.full_tensor() - expected[n.replace("._checkpoint_wrapped_module", "")]).abs().max().item()
                    for n, p in sharded.named_parameters())
    dist.destroy_process_group()

    params = {n: p.detach() for n, p in plain.named_parameters()}
    grads = torch.func.grad(lambda p: loss_of(plain, p))(params)
    func_diff = max((grads[n] - expected[n]).abs().max().item() for n in grads)
    print(abs(sharded_loss.item() - loss.item()), fsdp_diff, func_diff)
""")


def test_fsdp2_per_block_with_checkpointing_and_func_grad():
    """fully_shard per block + per-block activation checkpointing + root (gloo, world size 1) gives the plain
    model's loss and gradients; torch.func.grad over functional_call does too (fresh process for the group)."""
    root = Path(__file__).resolve().parents[2]
    out = subprocess.run([sys.executable, "-c", _FSDP_SCRIPT], capture_output=True, text=True, cwd=root)
    assert out.returncode == 0, out.stderr
    assert "returned a view tensor" not in out.stderr
    loss_diff, fsdp_diff, func_diff = map(float, out.stdout.split())
    assert loss_diff == 0.0 and fsdp_diff == 0.0
    assert func_diff < 1e-6


def test_block_traces_into_one_graph(models):
    """torch.compile per block: dynamo captures a block whole (no graph breaks)."""
    version, _, ours = models
    inputs = _inputs(version, first_frame_clean=True, attention_mask=True)
    video, audio = Modality(**inputs["video"]), Modality(**inputs["audio"])
    vx, v_in, _ = ours.prepare_stream("video", video, audio)
    ax, a_in, _ = ours.prepare_stream("audio", audio, video)
    skips = Perturbations.build(B, 2, skip=["video_self_attn", "a2v"], samples=[0]).for_block(1)
    torch._dynamo.reset()
    try:
        explanation = torch._dynamo.explain(ours.transformer_blocks[1])(vx, ax, v_in, a_in, skips)
    finally:
        torch._dynamo.reset()
    assert explanation.graph_count == 1 and explanation.graph_break_count == 0, explanation.break_reasons


def test_config_round_trip(models):
    version, _, ours = models
    section = ours.config.to_checkpoint_config()
    assert TransformerConfig.from_checkpoint_config(section) == ours.config
    assert checkpoint.detect_text_version(section) == version
    # The reference builds the same architecture from what we write.
    ref = ref_model.LTXModelConfigurator.from_config({"transformer": section})
    assert {k: tuple(v.shape) for k, v in ref.state_dict().items()} == \
        {k: tuple(v.shape) for k, v in ours.state_dict().items()}


def test_save_load_round_trip_and_reference_reads_the_export(models, tmp_path):
    version, ref, ours = models
    config = {"transformer": tiny_transformer_config(version), "vae": {"note": "kept as is"}}
    path = save_transformer(ours, tmp_path / "export.safetensors", config)
    assert checkpoint.read_config(path) == config
    assert all(k.startswith(checkpoint.TRANSFORMER_PREFIX) for k in checkpoint.list_keys(path))
    again = load_transformer(path)
    for name, tensor in ours.state_dict().items():
        assert torch.equal(again.state_dict()[name], tensor), name
    # The official loader's key map (strip the prefix) reads our export into the reference model.
    state = checkpoint.read_tensors(path, checkpoint.strip_prefix(checkpoint.TRANSFORMER_PREFIX))
    reread = _build_reference(version, seed=1)
    reread.load_state_dict(state, strict=True)
    inputs = _inputs(version)
    with torch.no_grad():
        _assert_outputs_close(_run_reference(reread, inputs), _run_reference(ref, inputs))


def test_save_rejects_a_config_that_does_not_describe_the_model(models, tmp_path):
    version, _, ours = models
    section = dict(tiny_transformer_config(version), num_layers=3)
    with pytest.raises(ValueError, match="does not describe this model"):
        save_transformer(ours, tmp_path / "bad.safetensors", {"transformer": section})


def test_load_reads_only_transformer_tensors(tmp_path):
    version = "ltx-2.3"
    ref = _build_reference(version)
    extras = {
        checkpoint.VIDEO_CONNECTOR_PREFIX: {"transformer_1d_blocks.0.attn1.to_q.weight": torch.randn(4, 4)},
        checkpoint.AUDIO_CONNECTOR_PREFIX: {"learnable_registers": torch.randn(8, 4)},
        "model.diffusion_model.embeddings_connector.": {"x.weight": torch.randn(2)},
        checkpoint.TEXT_PROJECTION_PREFIX: {"video_aggregate_embed.weight": torch.randn(4, 4)},
        checkpoint.VIDEO_VAE_ENCODER_PREFIX: {"conv_in.weight": torch.randn(3, 3)},
        checkpoint.VOCODER_PREFIX: {"conv_pre.weight": torch.randn(2, 2)},
    }
    path = write_official_checkpoint(tmp_path / "full.safetensors", {"transformer": tiny_transformer_config(version)},
                                     {checkpoint.TRANSFORMER_PREFIX: ref, **extras})
    model = load_transformer(path, dtype=torch.bfloat16)
    keys = set(model.state_dict())
    assert keys == set(ref.state_dict())
    assert not any("connector" in k or "aggregate" in k or "conv_" in k for k in keys)
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())


def test_perturbations_build_and_merge():
    p = Perturbations.build(3, 4, skip="a2v", blocks=[1, 3], samples=[0, 2])
    assert p.skip_video_self_attn is None and p.skip_v2a is None
    assert p.skip_a2v.tolist() == [[False, True, False, True], [False] * 4, [False, True, False, True]]
    q = p.merge(Perturbations.build(3, 4, skip=["a2v", "video_self_attn"], blocks=[0], samples=[1]))
    assert q.skip_a2v[:, 0].tolist() == [False, True, False] and q.skip_a2v[:, 1].tolist() == [True, False, True]
    assert q.skip_video_self_attn.sum() == 1
    assert q.for_block(1).a2v.tolist() == [True, False, True]
    with pytest.raises(ValueError, match="unknown perturbation kind"):
        Perturbations.build(3, 4, skip="text")
    with pytest.raises(ValueError, match="out of range for 4 blocks"):
        Perturbations.build(3, 4, skip="a2v", blocks=[4])
    with pytest.raises(ValueError, match="out of range for batch size 3"):
        Perturbations.build(3, 4, skip="a2v", samples=[3])
    with pytest.raises(ValueError, match="bool"):
        Perturbations(skip_a2v=torch.zeros(3, 4))


def test_bad_inputs_are_named(models):
    version, _, ours = models
    inputs = _inputs(version)
    with pytest.raises(ValueError, match="Modality.sigma"):
        Modality(**{**inputs["video"], "sigma": torch.ones(3)})
    with pytest.raises(ValueError, match="Modality.positions"):
        Modality(**{**inputs["video"], "positions": inputs["video"]["positions"][..., 0]})
    with pytest.raises(ValueError, match="Perturbations.skip_a2v must be"):
        _run_ours(ours, inputs, Perturbations.build(B, 3, skip="a2v"))
    with pytest.raises(ValueError, match="at least one"):
        ours()


def test_config_defaults_describe_the_full_models():
    """Parameter counts of the full-size configs, built on meta, against the reference's (architecture doc §3.1)."""
    for version, expected in (("ltx-2", 18_876_174_592), ("ltx-2.3", 18_988_838_144)):
        switches = {} if version == "ltx-2" else {"apply_gated_attention": True, "cross_attention_adaln": True}
        with torch.device("meta"):
            model = AVTransformer(TransformerConfig(version=version, **switches))
        assert sum(p.numel() for p in model.parameters()) == expected


def test_full_config_parses_with_reference_defaults():
    section = dict(tiny_transformer_config("ltx-2"))
    for key in ("rope_type", "av_ca_timestep_scale_multiplier", "frequencies_precision"):
        del section[key]
    config = TransformerConfig.from_checkpoint_config(section)
    # The reference's code defaults (not the checkpoint values) apply to absent keys.
    assert config.rope_type == "interleaved"
    assert config.av_ca_timestep_scale_multiplier == 1
    assert config.double_precision_rope is False
    assert dataclasses.replace(config, rope_type="split").rope_type == "split"
