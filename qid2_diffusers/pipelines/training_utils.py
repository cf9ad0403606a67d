"""What training and test-time adaptation share: the trainable denoiser, the loss, batch crops.

In the spirit of ``diffusers.training_utils``: the training package
(:mod:`qid2_diffusers.training`) and the adaptation of a model to the scan
being up-sampled (:mod:`qid2_diffusers.pipelines.adaptation`) both train with
these, so the two cannot drift apart.
"""

from __future__ import annotations

import torch
from torch import nn

from ..image_processor import QID2ImageProcessor
from ..models.unet import unet_forward

__all__ = ["QID2Denoiser", "sample_timesteps", "diffusion_loss", "masked_mean", "random_crops"]


class QID2Denoiser(nn.Module):
    """The U-Net and the direction encoder as one trainable module, called as the pipeline calls them."""

    def __init__(self, unet, direction_encoder):
        super().__init__()
        self.unet = unet
        self.direction_encoder = direction_encoder

    def forward(self, noisy, conditions, timesteps, target_bvecs, reference_bvecs, target_bvals=None,
                reference_bvals=None):
        tokens = self.direction_encoder(target_bvecs, reference_bvecs, target_bvals, reference_bvals).to(noisy.dtype)
        return unet_forward(self.unet, torch.cat([noisy, conditions], dim=1), timesteps, tokens)


def sample_timesteps(scheduler, n: int, generator: torch.Generator, bias_portion: float = 0.0) -> torch.Tensor:
    """Uniform training timesteps, a ``bias_portion`` of them from the noisiest quarter.

    A one-step sampler only ever evaluates the network at the last timestep,
    so part of the budget goes where it is used; the rest keeps every noise
    level trained, so multi-step sampling still works.
    """
    total = scheduler.config.num_train_timesteps
    t = torch.randint(0, total, (n,), generator=generator)
    if bias_portion > 0:
        late = torch.randint(total - total // 4, total, (n,), generator=generator)
        t = torch.where(torch.rand(n, generator=generator) < bias_portion, late, t)
    return t


def diffusion_loss(denoiser, scheduler, batch, generator: torch.Generator, *, masked: bool = True,
                   timestep_bias_portion: float = 0.0) -> torch.Tensor:
    """MSE between the denoiser's output and its target for the scheduler's prediction type.

    Target and conditions are padded together by the pipeline's
    :class:`~qid2_diffusers.image_processor.QID2ImageProcessor`, and the noise
    is drawn at the padded size, as at sampling time; the error is taken on the
    unpadded slice, inside the brain mask when ``masked``. With a physics
    prior in the batch (``prior``, ``b0``) the clean sample is the residual
    target - prior, as the pipeline adds the prior back after sampling.

    Args:
        denoiser (`QID2Denoiser`): possibly wrapped by Accelerate.
        scheduler (`DDPMScheduler`): the training schedule.
        batch (`dict`): a :class:`~qid2_diffusers.data.dataset.QID2Dataset` batch.
        generator (`torch.Generator`): CPU generator for the noise and timesteps.
        masked (`bool`, *optional*, defaults to `True`): restrict the mean to the brain mask.
        timestep_bias_portion (`float`, *optional*, defaults to 0): see :func:`sample_timesteps`.
    """
    processor = QID2ImageProcessor.for_unet(getattr(denoiser, "module", denoiser).unet)
    with_prior = "prior" in batch
    parts = [batch["target"], batch["references"]] + ([batch["prior"], batch["b0"]] if with_prior else [])
    x, size = processor.pad(torch.cat(parts, dim=1))
    clean, conditions = x[:, :1], x[:, 1:]
    if with_prior:
        clean = clean - conditions[:, batch["references"].shape[1] :][:, :1]
    noise = torch.randn(clean.shape, generator=generator).to(clean.device)
    timesteps = sample_timesteps(scheduler, clean.shape[0], generator, timestep_bias_portion).to(clean.device)
    noisy = scheduler.add_noise(clean, noise, timesteps)
    bvals = {k: batch[k] for k in ("target_bvals", "reference_bvals") if k in batch}
    pred = denoiser(noisy, conditions, timesteps, batch["target_bvec"], batch["reference_bvecs"], **bvals)
    kind = scheduler.config.prediction_type
    if kind == "epsilon":
        goal = noise
    elif kind == "v_prediction":
        goal = scheduler.get_velocity(clean, noise, timesteps)
    else:
        goal = clean
    err = (processor.crop(pred.float(), size) - processor.crop(goal.float(), size)) ** 2
    return masked_mean(err, batch["mask"] if masked else None)


def masked_mean(values: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Mean of ``values`` over the pixels where ``mask`` is set (all pixels when ``mask`` is None)."""
    if mask is None:
        return values.mean()
    mask = mask.to(values.dtype).expand_as(values)
    return (values * mask).sum() / mask.sum().clamp_min(1.0)


def random_crops(batch: dict, size: int | None, generator: torch.Generator) -> dict:
    """Per-sample ``size x size`` crops of every image of a batch, each centred
    (as far as the slice allows) on a brain pixel drawn with ``generator``.

    The images are the ``(B, C, H, W)`` tensors of the target's size (target,
    references, mask, and any other condition a dataset adds); direction
    tensors pass through.
    """
    h, w = batch["target"].shape[-2:]
    if size is None or (size >= h and size >= w):
        return batch
    ch, cw = min(size, h), min(size, w)
    crops = {k: [] for k, v in batch.items() if torch.is_tensor(v) and v.ndim == 4 and v.shape[-2:] == (h, w)}
    for i, m in enumerate(batch["mask"][:, 0]):
        brain = torch.nonzero(m > 0).cpu()
        y, x = brain[int(torch.randint(len(brain), (1,), generator=generator))].tolist() if len(brain) else (h // 2, w // 2)
        top, left = min(max(y - ch // 2, 0), h - ch), min(max(x - cw // 2, 0), w - cw)
        for k, v in crops.items():
            v.append(batch[k][i, :, top : top + ch, left : left + cw])
    return {**batch, **{k: torch.stack(v) for k, v in crops.items()}}
