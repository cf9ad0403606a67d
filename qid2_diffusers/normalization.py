"""Intensity normalisation shared by training and inference.

The scale comes from the reference slices alone, never from the target: at
inference time the target is what we are trying to produce, so a scale taken
from it (as the authors' scripts did) cannot be inverted. The target shell has
the same b-value as the references, so one scale suits both.
"""

from __future__ import annotations

import torch

__all__ = ["reference_scale", "normalize", "denormalize", "SCALE_PERCENTILE"]

#: Percentile of the reference intensities that is mapped to +1. A high
#: percentile rather than the maximum keeps one hot voxel from squashing the
#: rest of the slice.
SCALE_PERCENTILE = 99.0

# Slices without signal (outside the head) would otherwise divide by zero.
_MIN_SCALE = 1e-6

# The percentile is read from at most this many evenly spaced pixels: a
# 145x174 slice x 6 references is 150k values, and a full sort per sample
# would cap the training loader at a few hundred samples per second.
_MAX_VALUES = 8192


def reference_scale(reference_images: torch.Tensor) -> torch.Tensor:
    """Per-sample intensity scale of shape ``(B, 1, 1, 1)``.

    Args:
        reference_images (`torch.Tensor` of shape `(B, R, H, W)`):
            the R reference slices of each sample, in scanner units.
    """
    if reference_images.ndim != 4:
        raise ValueError(f"reference images must be (B, R, H, W), got {tuple(reference_images.shape)}")
    flat = reference_images.detach().float().flatten(1)
    if flat.shape[1] > _MAX_VALUES:
        idx = torch.linspace(0, flat.shape[1] - 1, _MAX_VALUES, device=flat.device).round().long()
        flat = flat[:, idx]
    # The percentile as torch.quantile defines it (linear interpolation between
    # two order statistics), but from a top-k instead of a full sort: 15x
    # faster, which is most of a training sample's cost.
    n = flat.shape[1]
    pos = SCALE_PERCENTILE / 100.0 * (n - 1)
    top = torch.topk(flat, n - int(pos), dim=1).values
    scale = torch.lerp(top[:, -1], top[:, max(-2, -top.shape[1])], pos - int(pos))
    scale = torch.where(scale > _MIN_SCALE, scale, torch.ones_like(scale))
    return scale.view(-1, 1, 1, 1)


def normalize(images: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Map ``[0, scale]`` to ``[-1, 1]``, the range the diffusion noise is sized for."""
    return images / scale * 2.0 - 1.0


def denormalize(images: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`normalize`."""
    return (images + 1.0) / 2.0 * scale
