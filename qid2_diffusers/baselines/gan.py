"""cGAN and qGAN (the paper's GAN baselines) as volume up-samplers."""

from __future__ import annotations

import numpy as np
import torch

from ..image_processor import QID2ImageProcessor
from ..models.gan import load_generator
from ..upsampling import SliceUpsampler

__all__ = ["GANUpsampler"]


class GANUpsampler(SliceUpsampler):
    """Up-samples a volume slice by slice with a cGAN or qGAN generator.

    Same slice selection, bounding-box crop, batching and intensity
    normalisation as :class:`~qid2_diffusers.QID2Upsampler`; one
    deterministic forward pass per batch. A b-conditioned generator (trained on
    several shells) is told the b-value of the shell it up-samples.

    Args:
        generator ([`CGANGenerator`] or [`QGANGenerator`]): the trained generator.
        batch_size (`int`, *optional*, defaults to 32): (slice, target) pairs per network call.
        progress (`bool`, *optional*, defaults to `True`): show a tqdm bar over slices x targets.

    Example:

    ```py
    >>> from qid2_diffusers.baselines.gan import GANUpsampler
    >>> up = GANUpsampler.from_pretrained("weights/qgan-small-r3")  # doctest: +SKIP
    >>> pred = up.predict(data, bvals, bvecs, target_bvecs, mask)  # doctest: +SKIP
    ```
    """

    def __init__(self, generator, *, batch_size=32, progress=True):
        super().__init__(batch_size=batch_size, seed=0, progress=progress)
        self.generator = generator.eval()
        self.name = generator.kind
        self.image_processor = QID2ImageProcessor(generator.size_multiple)

    @classmethod
    def from_pretrained(cls, path, *, device="cpu", **kwargs) -> "GANUpsampler":
        """Load the generator saved in ``path`` on ``device``; float16-saved weights load as float32."""
        return cls(load_generator(path).to(device), **kwargs)

    @property
    def num_references(self) -> int:
        return int(self.generator.config.num_references)

    @property
    def bval_conditioning(self) -> bool:
        """Whether the generator's direction tokens carry b, so that it is told the shell's b-value."""
        return bool(self.generator.config.bval_conditioning)

    @torch.inference_mode()
    def predict_batch(self, reference_images, reference_bvecs, target_bvecs, keys, *, prior_images=None,
                      b0_images=None, target_bvals=None, reference_bvals=None):
        # The paper's GANs see the references and their directions only (and, b-conditioned, their b-values).
        device, dtype = self.generator.device, self.generator.dtype

        def as_tensor(a):
            return torch.as_tensor(np.asarray(a, dtype=np.float32), device=device)

        x, scale, size = self.image_processor.preprocess(as_tensor(reference_images))
        bvals = (as_tensor(target_bvals), as_tensor(reference_bvals)) if self.bval_conditioning else ()
        y = self.generator(x.to(dtype), as_tensor(target_bvecs), as_tensor(reference_bvecs), *bvals)
        return self.image_processor.postprocess(y, scale, size)[:, 0].cpu().numpy(), None
