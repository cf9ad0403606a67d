"""Assemble a fresh (untrained) QID² pipeline from a preset."""

from __future__ import annotations

import torch

from .models import DirectionEncoder, build_unet
from .models.unet import PRESETS
from .pipelines import QID2Pipeline
from .schedulers import training_scheduler

__all__ = ["build_pipeline"]


def build_pipeline(
    preset: str = "small",
    num_references: int = 3,
    prediction_type: str = "v_prediction",
    seed: int | None = 0,
    default_num_inference_steps: int = 1000,
    *,
    physics_prior: bool = False,
    bval_conditioning: bool = False,
    attention: str = "every",
) -> QID2Pipeline:
    """A randomly initialised pipeline; ``seed`` makes the initial weights reproducible.

    ``physics_prior`` and ``bval_conditioning`` off, ``attention="every"``, is the paper's configuration
    (``attention``: :data:`~qid2_diffusers.models.unet.ATTENTION`).
    """
    if seed is not None:
        torch.manual_seed(seed)
    unet = build_unet(preset, num_references, physics_prior=physics_prior, attention=attention)
    encoder = DirectionEncoder(num_references=num_references, embed_dim=PRESETS[preset]["cross_attention_dim"],
                               bval_conditioning=bval_conditioning)
    return QID2Pipeline(
        unet=unet,
        direction_encoder=encoder,
        scheduler=training_scheduler(prediction_type),
        default_num_inference_steps=default_num_inference_steps,
        physics_prior=physics_prior,
    )
