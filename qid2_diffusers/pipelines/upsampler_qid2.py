"""QID2Upsampler: a whole DWI volume, slice by slice, through a :class:`QID2Pipeline`."""

from __future__ import annotations

import time

import numpy as np
import torch

from ..upsampling import SliceUpsampler, sample_seed
from .adaptation import adapt_pipeline, residual_weight

__all__ = ["QID2Upsampler", "DEFAULT_RESIDUAL_WEIGHT"]

#: ``residual_weight`` of a physics-prior model when none is given: chosen per shell on the scan's own kept
#: directions (:func:`~qid2_diffusers.pipelines.adaptation.residual_weight`), on the validation phantoms'
#: evidence (BENCHMARK.md, "Denoise then up-sample").
DEFAULT_RESIDUAL_WEIGHT = "auto"


def check_residual_weight(value) -> str | float:
    """``"auto"`` or a float in [0, 1] (a one-line error otherwise)."""
    if value is None or value == "auto":
        return "auto" if value is not None else DEFAULT_RESIDUAL_WEIGHT
    try:
        w = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"residual weight must be 'auto' or a number in [0, 1], got {value!r}") from None
    if not 0.0 <= w <= 1.0:
        raise ValueError(f"residual weight must be 'auto' or a number in [0, 1], got {value!r}")
    return w


class QID2Upsampler(SliceUpsampler):
    """Up-samples a volume slice by slice with a :class:`~qid2_diffusers.QID2Pipeline`.

    Only slices containing brain are sampled, each cropped to the brain's
    bounding box; (slice, target) pairs are batched together.

    Args:
        pipeline ([`QID2Pipeline`]): the trained pipeline (scheduler already chosen).
        num_inference_steps (`int`, *optional*): defaults to the pipeline's default.
        num_samples (`int`, *optional*, defaults to 1): samples averaged per target.
        batch_size (`int`, *optional*, defaults to 32): (slice, target) pairs per network call.
        seed (`int`, *optional*, defaults to 0): base seed.
        progress (`bool`, *optional*, defaults to `True`): show a tqdm bar over slices x targets.
        adapt_steps (`int`, *optional*): before sampling a volume, fine-tune a
            copy of the model for this many steps on the scan's own kept
            directions (:func:`~qid2_diffusers.pipelines.adaptation.adapt_pipeline`);
            ``pipeline`` itself is never modified. Defaults to the pipeline's
            ``default_adapt_steps``. The time spent is kept in :attr:`adaptation_seconds`
            and in :attr:`timings` (``adaptation``).
        adapt_settings (`dict`, *optional*): overrides of
            :data:`~qid2_diffusers.pipelines.adaptation.ADAPTATION_DEFAULTS`.
        residual_weight (`str` or `float`, *optional*): for a physics-prior model, how much of the
            network's residual over the tensor prior is kept: ``"auto"`` chooses it per volume from the
            scan's own kept directions (:func:`~qid2_diffusers.pipelines.adaptation.residual_weight`),
            a number in [0, 1] fixes it (1: the network as trained, 0: the tensor fit). Defaults to
            :data:`DEFAULT_RESIDUAL_WEIGHT`. The weight used is :attr:`applied_residual_weight`; the
            time spent choosing it counts as adaptation.

    Example:

    ```py
    >>> from qid2_diffusers import QID2Pipeline, QID2Upsampler
    >>> pipe = QID2Pipeline.from_pretrained(QID2Pipeline.default_model_path())  # doctest: +SKIP
    >>> volumes = QID2Upsampler(pipe, seed=0).predict(data, gtab, target_bvecs, mask)  # doctest: +SKIP
    ```
    """

    name = "qid2"

    def __init__(self, pipeline, *, num_inference_steps=None, num_samples=1, batch_size=32, seed=0, progress=True,
                 adapt_steps: int | None = None, adapt_settings: dict | None = None, residual_weight=None):
        super().__init__(batch_size=batch_size, seed=seed, progress=progress)
        self.pipeline = pipeline
        self.num_inference_steps = num_inference_steps
        self.num_samples = int(num_samples)
        self.adapt_steps = int(pipeline.config.get("default_adapt_steps", 0) if adapt_steps is None else adapt_steps)
        self.adapt_settings = dict(adapt_settings or {})
        self._scan_pipeline = None
        self.residual_weight = check_residual_weight(residual_weight)
        pipeline.set_progress_bar_config(disable=True)

    def predict_volumes(self, data, bvals, bvecs, target_bvecs, mask=None, **options):
        """See :meth:`SliceUpsampler.predict_volumes`; adapts the model to this scan first when ``adapt_steps``,
        and chooses the residual weight on the scan when it is ``"auto"``."""
        gate = self.physics_prior and self.residual_weight == "auto"
        self.applied_residual_weight = 1.0 if not self.physics_prior or gate else float(self.residual_weight)
        if not self.adapt_steps and not gate:
            return super().predict_volumes(data, bvals, bvecs, target_bvecs, mask, **options)
        start = time.perf_counter()
        axis = options.get("axis", 2)
        scan, brain = data, (np.ones(np.shape(data)[:3], dtype=bool) if mask is None else np.asarray(mask, dtype=bool))
        if axis != 2:
            scan, brain = np.moveaxis(np.asarray(data), axis, 2), np.moveaxis(brain, axis, 2)
        self._scan_pipeline, _ = adapt_pipeline(
            self.pipeline, scan, bvals, bvecs, brain, steps=self.adapt_steps, seed=self.seed, progress=self.progress,
            **self.adapt_settings,
        )
        try:
            if gate:
                self.applied_residual_weight = residual_weight(
                    self._scan_pipeline, scan, bvals, bvecs, brain, seed=self.seed,
                    num_inference_steps=self.num_inference_steps, batch_size=self.batch_size)
            seconds = time.perf_counter() - start
            out = super().predict_volumes(data, bvals, bvecs, target_bvecs, mask, **options)
        finally:
            self._scan_pipeline = None
        # After the base class's predict_volumes, which starts timings afresh; the residual weight's
        # leave-one-out predictions count as adaptation to the scan.
        self.timings["adaptation"] = seconds
        return out

    @property
    def adaptation_seconds(self) -> float:
        """Wall time of the last :meth:`predict_volumes`' adaptation: the ``adaptation`` stage of :attr:`timings`."""
        return float(self.timings.get("adaptation", 0.0))

    @property
    def slice_boxes(self) -> bool:
        """Per-slice brain boxes, except for a ``torch.compile``'d U-Net: every slice's box is another input
        shape, and a compiled graph per shape cost far more than the pixels saved (on the HCP-grid phantom,
        2 cores, fp32: sampling 1410 s compiled with per-slice boxes against 308 s eager; BENCHMARK.md), so a
        compiled network sees the volume's box, one shape."""
        return not hasattr(self.pipeline.unet, "_orig_mod")

    @property
    def num_references(self) -> int:
        return self.pipeline.num_references

    @property
    def physics_prior(self) -> bool:
        return self.pipeline.physics_prior

    def predict_batch(self, reference_images, reference_bvecs, target_bvecs, keys, *, prior_images=None,
                      b0_images=None, target_bvals=None, reference_bvals=None):
        gens = [
            torch.Generator().manual_seed(sample_seed(self.seed, target_index, slice_index, k))
            for target_index, slice_index in keys
            for k in range(self.num_samples)
        ]
        pipeline = self.pipeline if self._scan_pipeline is None else self._scan_pipeline
        result = pipeline(
            reference_images,
            reference_bvecs,
            target_bvecs,
            prior_images=prior_images,
            b0_images=b0_images,
            target_bvals=target_bvals,
            reference_bvals=reference_bvals,
            num_inference_steps=self.num_inference_steps,
            generator=gens,
            num_samples=self.num_samples,
            output_type="np",
        )
        return result.images, result.std
