"""The keyframe mask of LTX-2.5: what inference/validation and training pass to the transformer.

Inference and validation mark the target's first latent frame (the official ``create_initial_state``; the golden
transformer inputs hold exactly that mask). Training follows ``strategy.keyframes_mask``: 'first_frame' (default,
the same mask as inference) or 'none' (ltx-trainer 1.2). Reference tokens are never marked.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from ltxf.config import FlowConfig, StrategyConfig
from ltxf.generate import GenerationModels, GenerationRequest, sample
from ltxf.models.gemma import PromptFeatures
from ltxf.models.text import TextContext, load_embeddings_processor
from ltxf.models.transformer import load_transformer
from ltxf.sampling import GuidanceConfig, first_frame_keyframes_mask
from ltxf.strategies.base import training_keyframes_mask
from ltxf.strategies.text_to_video import prepare_text_to_video
from ltxf.strategies.video_to_video import prepare_video_to_video
from tests.models.golden_ltx25 import TRANSFORMER, golden


def test_inference_mask_is_the_official_one():
    """The golden inputs (B=2, 3 x 4 x 6 latent grid) carry the mask VideoLatentTools.create_initial_state made."""
    expected = golden("transformer")["inputs.video.keyframes_mask"]
    assert torch.equal(first_frame_keyframes_mask(2, 72, 24)[..., None], expected)


def test_sampling_marks_the_first_latent_frame():
    transformer = load_transformer(TRANSFORMER)
    seen = []
    transformer.register_forward_pre_hook(lambda module, args, kwargs: seen.append(kwargs["video"].keyframes_mask),
                                          with_kwargs=True)
    features = PromptFeatures(torch.randn(1, 1024, 32), torch.randn(1, 1024, 16), torch.ones(1, 1024, dtype=torch.long))
    models = GenerationModels(transformer=transformer,
                              text_processor=load_embeddings_processor(TRANSFORMER, with_feature_extractor=False),
                              video_decoder=nn.Identity())
    request = GenerationRequest(prompt_features=features, width=192, height=128, num_frames=9, num_inference_steps=2,
                                guidance=GuidanceConfig(cfg_scale=1.0, stg_scale=0.0), generate_audio=False)
    sample(models, request)
    assert len(seen) == 2
    for mask in seen:  # 2 latent frames of 4 x 6 tokens: the first 24 are the keyframe
        assert torch.equal(mask.reshape(-1), (torch.arange(48) < 24).float())


def _context(batch: int) -> TextContext:
    return TextContext(torch.randn(batch, 8, 32), torch.randn(batch, 8, 16), torch.ones(batch, 8, dtype=torch.long))


@pytest.mark.parametrize("policy", ["first_frame", "none"])
def test_training_policy(policy):
    strategy = StrategyConfig(name="text_to_video", first_frame_conditioning_p=0.0, keyframes_mask=policy)
    batch = {"video_latents": torch.randn(2, 4, 3, 2, 5), "fps": torch.full((2,), 24.0)}
    inputs = prepare_text_to_video(batch, _context(2), strategy=strategy, flow=FlowConfig(),
                                   generators=[torch.Generator().manual_seed(i) for i in range(2)],
                                   dtype=torch.float32)
    mask = inputs.video.keyframes_mask
    if policy == "none":
        assert mask is None
    else:
        assert mask.shape == (2, 30, 1) and torch.equal(mask[0, :, 0], (torch.arange(30) < 10).float())


def test_reference_tokens_are_never_marked():
    strategy = StrategyConfig(name="video_to_video", first_frame_conditioning_p=0.0)
    batch = {"video_latents": torch.randn(1, 4, 2, 2, 2), "reference_latents": torch.randn(1, 4, 2, 2, 2),
             "fps": torch.full((1,), 24.0)}
    inputs = prepare_video_to_video(batch, _context(1), strategy=strategy, flow=FlowConfig(),
                                    generators=[torch.Generator().manual_seed(0)], dtype=torch.float32)
    assert inputs.num_reference_tokens == 8
    assert inputs.video.keyframes_mask[0, :, 0].tolist() == [0.0] * 8 + [1.0] * 4 + [0.0] * 4
    with pytest.raises(ValueError, match="keyframes_mask"):
        training_keyframes_mask("all", 1, 8, 4)
    with pytest.raises(ValueError, match="strategy.keyframes_mask"):
        StrategyConfig(keyframes_mask="sometimes")
