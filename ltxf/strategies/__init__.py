"""Training strategies: how a batch of precomputed latents becomes model inputs, targets and a loss.

A strategy is a pair of pure functions, ``prepare_inputs(batch, context, generator) -> ModelInputs`` and
``compute_losses(inputs, video_pred, audio_pred) -> per-sample losses``. All randomness comes from the explicit
generator, so a step is reproducible from (seed, step, rank) alone.
"""

from ltxf.strategies.base import ModelInputs, StepLosses, compute_losses, masked_mse_per_sample
from ltxf.strategies.text_to_video import prepare_text_to_video
from ltxf.strategies.video_to_video import prepare_video_to_video

__all__ = [
    "ModelInputs",
    "StepLosses",
    "compute_losses",
    "masked_mse_per_sample",
    "prepare_text_to_video",
    "prepare_video_to_video",
]
