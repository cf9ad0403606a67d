"""Noise schedules: the training schedule and the samplers a user can swap in."""

from __future__ import annotations

from diffusers import (
    DDIMScheduler,
    DDPMScheduler,
    DPMSolverMultistepScheduler,
    EulerDiscreteScheduler,
    UniPCMultistepScheduler,
)

__all__ = ["SCHEDULERS", "training_scheduler", "make_scheduler"]

#: Command-line names of the samplers that work with a DDPM-trained model.
SCHEDULERS = {
    "ddpm": DDPMScheduler,
    "ddim": DDIMScheduler,
    "dpm++": DPMSolverMultistepScheduler,
    "unipc": UniPCMultistepScheduler,
    "euler": EulerDiscreteScheduler,
}


def training_scheduler(prediction_type: str = "v_prediction", num_train_timesteps: int = 1000) -> DDPMScheduler:
    """The paper's DDPM: 1000 steps, linear betas.

    ``clip_sample`` is off because intensities are scaled from the references
    only and a target may legitimately exceed their +1; "trailing" spacing
    makes few-step samplers start from pure noise (t = T - 1), which matters
    with v- or x0-prediction.
    """
    if prediction_type not in ("epsilon", "v_prediction", "sample"):
        raise ValueError(f"prediction_type must be epsilon, v_prediction or sample, got {prediction_type!r}")
    return DDPMScheduler(
        num_train_timesteps=num_train_timesteps,
        beta_schedule="linear",
        prediction_type=prediction_type,
        clip_sample=False,
        timestep_spacing="trailing",
    )


def make_scheduler(name: str, config) -> object:
    """A sampler by command-line name, built from a trained pipeline's scheduler config."""
    if name not in SCHEDULERS:
        raise ValueError(f"unknown scheduler {name!r}; choose from {', '.join(SCHEDULERS)}")
    return SCHEDULERS[name].from_config(config)
