"""The one place slices are padded, normalised, cropped back and denormalised.

In the spirit of diffusers' ``VaeImageProcessor``: the pipeline, the GAN
up-sampler, both training scripts and the demo all go through
:class:`QID2ImageProcessor`, so the chain scanner units -> network space ->
scanner units is written once.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .normalization import denormalize, normalize, reference_scale

__all__ = ["QID2ImageProcessor", "MIN_SIZE"]

#: Slices are padded to at least this size (per side) before a network, so
#: crops smaller than its receptive field, like 6x8 real-scanner crops, still
#: pass through every level.
MIN_SIZE = 16


class QID2ImageProcessor:
    """Pads slices for a U-Net and maps intensities to and from its space.

    Intensities are normalised by one scale per sample taken from the
    reference slices alone (:func:`~qid2_diffusers.normalization.reference_scale`):
    the target is what is being produced, so a scale taken from it could not
    be inverted. Every other image of a sample (a physics prior, a mean b0)
    is normalised by the same scale.

    Args:
        size_multiple (`int`, *optional*, defaults to 4): padded height and
            width are multiples of this (``2 ** (levels - 1)`` for a U-Net).
        min_size (`int`, *optional*, defaults to :data:`MIN_SIZE`): smallest padded side.
    """

    def __init__(self, size_multiple: int = 4, min_size: int = MIN_SIZE):
        if size_multiple < 1:
            raise ValueError(f"size_multiple must be >= 1, got {size_multiple}")
        self.size_multiple = int(size_multiple)
        self.min_size = int(min_size)

    @classmethod
    def for_unet(cls, unet, **kwargs) -> "QID2ImageProcessor":
        """The processor for a diffusers U-Net: one halving per level below the first."""
        return cls(2 ** (len(unet.config.block_out_channels) - 1), **kwargs)

    def pad(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        """Pad the last two axes up to ``size_multiple`` and at least ``min_size``.

        Reflection keeps the padded border looking like tissue or background
        rather than inventing an edge; inputs too small to reflect are
        replicated. Returns the padded tensor and the ``(H, W)`` to crop back to.
        """
        h, w = x.shape[-2:]
        th = max(self.min_size, -(-h // self.size_multiple) * self.size_multiple)
        tw = max(self.min_size, -(-w // self.size_multiple) * self.size_multiple)
        ph, pw = th - h, tw - w
        if ph == 0 and pw == 0:
            return x, (h, w)
        pad = (pw // 2, pw - pw // 2, ph // 2, ph - ph // 2)
        mode = "reflect" if max(pad[0], pad[1]) < w and max(pad[2], pad[3]) < h else "replicate"
        return F.pad(x, pad, mode=mode), (h, w)

    @staticmethod
    def crop(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        """Undo :meth:`pad`: the centred ``size`` window of the last two axes."""
        h, w = size
        top = (x.shape[-2] - h) // 2
        left = (x.shape[-1] - w) // 2
        return x[..., top : top + h, left : left + w]

    @staticmethod
    def scale(reference_images: torch.Tensor) -> torch.Tensor:
        """Per-sample scale ``(B, 1, 1, 1)`` from ``(B, R, H, W)`` reference slices."""
        return reference_scale(reference_images)

    @staticmethod
    def normalize(images: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        return normalize(images, scale)

    @staticmethod
    def denormalize(images: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        return denormalize(images, scale)

    def preprocess(
        self, reference_images: torch.Tensor, conditions: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, tuple[int, int]]:
        """Scanner-unit slices -> the network's padded, normalised input.

        Args:
            reference_images (`torch.Tensor` of shape `(B, R, H, W)`): the scale comes from these.
            conditions (`torch.Tensor` of shape `(B, C, H, W)`, *optional*): other
                images of each sample, normalised by the same scale and appended
                after the references.

        Returns:
            `tuple` ``(x (B, R + C, H', W'), scale (B, 1, 1, 1), size (H, W))``.
        """
        refs = reference_images.float()
        scale = self.scale(refs)
        x = refs if conditions is None else torch.cat([refs, conditions.to(refs)], dim=1)
        x, size = self.pad(self.normalize(x, scale))
        return x, scale, size

    def postprocess(self, x: torch.Tensor, scale: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        """Network output ``(B, C, H', W')`` -> scanner units ``(B, C, H, W)``, cropped.

        Diffusion-weighted signal is a magnitude, so it is clamped at zero.
        """
        return self.denormalize(self.crop(x.float(), size), scale).clamp_min(0.0)
