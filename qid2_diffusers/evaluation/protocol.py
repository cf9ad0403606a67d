"""The evaluation protocol: score predicted volumes of one subject against its references.

The paper's protocol: of a fully acquired shell (b0 + 90 directions), 30
directions are kept and 60 predicted. The prediction is scored image by
image against the acquired volumes at the same directions, and the tensors
fitted on b0 + 30 acquired + 60 predicted volumes are compared with those
fitted on b0 + all 90 acquired. A phantom also carries its noise-free signal
(the truth), against which the same numbers are computed, together with the
acquisition's own distance from the truth, its noise floor. A high-b shell
(b >= :data:`~qid2_diffusers.evaluation.metrics.HIGH_B`, ``high_b=True``) is
also scored by the angular correlation of SH fits and the CSD peak error of
the whole up-sampled series (:class:`~qid2_diffusers.evaluation.metrics.HighBReference`).
"""

from __future__ import annotations

from functools import cached_property

import numpy as np

from ..directions import angular_distance, normalize_bvecs
from ..tensor import fit_tensor
from ..gradients import split_scheme
from .metrics import FIBRE_FA, MIN_MASK_VOXELS, HighBReference, image_metrics, tensor_metrics

__all__ = ["match_volumes", "SubjectEvaluation", "MATCH_TOLERANCE_DEG"]

#: Two b-vectors within this angle (degrees, either sign) are the same direction.
MATCH_TOLERANCE_DEG = 1.0


def match_volumes(pred_bvecs, ref_bvecs, *, tol_deg: float = MATCH_TOLERANCE_DEG) -> np.ndarray:
    """For each predicted direction, the index of the same direction in ``ref_bvecs``.

    Directions match antipodally (``b`` and ``-b`` are one measurement), so
    the volumes of a prediction may come in any order and with any signs.

    Raises:
        ValueError: naming the first predicted direction with no reference
            within ``tol_deg``, or two predictions of one reference direction.
    """
    pred = normalize_bvecs(pred_bvecs)
    dist = np.degrees(np.atleast_2d(angular_distance(pred, normalize_bvecs(ref_bvecs))))
    idx = np.argmin(dist, axis=1)
    nearest = dist[np.arange(len(pred)), idx]
    missing = np.flatnonzero(nearest > tol_deg)
    if len(missing):
        k = int(missing[0])
        raise ValueError(
            f"{len(missing)} predicted direction(s) not in the reference, e.g. volume {k} "
            f"({', '.join(f'{c:.4f}' for c in pred[k])}), nearest reference {nearest[k]:.1f} degrees away"
        )
    values, counts = np.unique(idx, return_counts=True)
    if np.any(counts > 1):
        twice = np.flatnonzero(idx == values[counts > 1][0])
        raise ValueError(f"volumes {int(twice[0])} and {int(twice[1])} predict the same reference direction")
    return idx


class SubjectEvaluation:
    """Scores up-sampled volumes of one subject against the full acquisition and, optionally, the truth.

    Reference tensor fits are computed once per subject and shared by every method scored.

    Args:
        data (`array-like` of shape `(X, Y, Z, N)`): the full acquisition, b0
            volumes and one complete shell; the reference.
        bvals (`array-like` of shape `(N,)`), bvecs (`array-like` of shape `(N, 3)`): its scheme.
        mask (`np.ndarray` of shape `(X, Y, Z)`): brain mask; every metric is taken inside it.
        truth (`array-like` of shape `(X, Y, Z, N)`, *optional*): the noise-free
            signal on the same scheme (phantoms), a second reference.
        denoised (`array-like` of shape `(X, Y, Z, N)`, *optional*): the full acquisition denoised
            (MP-PCA, real scans), a reference of its own (``"denoised"`` in :meth:`score`).
        min_mask_voxels (`int`, *optional*, defaults to :data:`~qid2_diffusers.evaluation.metrics.MIN_MASK_VOXELS`):
            slices with fewer brain voxels are left out of the SSIMs.
        fibre_fa (`float`, *optional*, defaults to 0.2): FA above which principal directions are compared.
        high_b (`bool`, *optional*, defaults to `False`): also score ``acc_sh6``, ``acc_sh8`` and
            ``csd_peak_error_deg`` (:class:`~qid2_diffusers.evaluation.metrics.HighBReference`);
            a few seconds per series, so callers turn it on for shells of b >= ``HIGH_B``.
    """

    def __init__(
        self,
        data,
        bvals,
        bvecs,
        mask,
        truth=None,
        *,
        denoised=None,
        min_mask_voxels: int = MIN_MASK_VOXELS,
        fibre_fa: float = FIBRE_FA,
        high_b: bool = False,
    ):
        self.data = np.asarray(data, dtype=np.float32)
        self.bvals = np.asarray(bvals, dtype=np.float64)
        self.bvecs = np.asarray(bvecs, dtype=np.float64)
        self.mask = np.asarray(mask, dtype=bool)
        self.truth = None if truth is None else np.asarray(truth, dtype=np.float32)
        self.denoised = None if denoised is None else np.asarray(denoised, dtype=np.float32)
        if self.mask.shape != self.data.shape[:3]:
            raise ValueError(f"mask shape {self.mask.shape} does not match the data's {self.data.shape[:3]}")
        if self.truth is not None and self.truth.shape != self.data.shape:
            raise ValueError(f"truth shape {self.truth.shape} does not match the data's {self.data.shape}")
        self.min_mask_voxels = int(min_mask_voxels)
        self.fibre_fa = float(fibre_fa)
        self.high_b = bool(high_b)
        _, self.dw = split_scheme(self.bvals, self.bvecs)

    @cached_property
    def reference_maps(self):
        """Tensor fit of the full acquisition (b0 + every direction)."""
        return fit_tensor(self.data, self.bvals, self.bvecs, self.mask)

    @cached_property
    def truth_maps(self):
        """Tensor fit of the noise-free signal, or ``None`` without a truth."""
        return None if self.truth is None else fit_tensor(self.truth, self.bvals, self.bvecs, self.mask)

    @cached_property
    def denoised_maps(self):
        """Tensor fit of the denoised full acquisition, or ``None`` without one."""
        return None if self.denoised is None else fit_tensor(self.denoised, self.bvals, self.bvecs, self.mask)

    @cached_property
    def high_b_reference(self):
        """The full acquisition's SH fits and CSD peaks (:class:`~qid2_diffusers.evaluation.metrics.HighBReference`)."""
        return HighBReference(self.data, self.bvals, self.bvecs, self.mask, self.reference_maps.fa,
                              fibre_fa=self.fibre_fa)

    @cached_property
    def truth_high_b_reference(self):
        """The same of the noise-free signal, or ``None`` without a truth."""
        if self.truth is None:
            return None
        return HighBReference(self.truth, self.bvals, self.bvecs, self.mask, self.truth_maps.fa, fibre_fa=self.fibre_fa)

    def volume_indices(self, target_bvecs) -> np.ndarray:
        """Indices (into the full scheme) of the volumes at ``target_bvecs``, matched antipodally."""
        return self.dw[match_volumes(target_bvecs, self.bvecs[self.dw])]

    def combine(self, pred, target_bvecs, *, kept=None) -> np.ndarray:
        """The up-sampled series: the acquisition with the target volumes replaced by ``pred``.

        Args:
            kept (`tuple`, *optional*): ``(indices, volumes)``: the volumes a method
                replaced among the ones it was given (its denoised b0s and kept directions).
        """
        pred = np.asarray(pred, dtype=np.float32)
        if pred.shape[:3] != self.data.shape[:3] or pred.ndim != 4:
            raise ValueError(f"predicted volumes of shape {pred.shape} do not fit the grid {self.data.shape[:3]}")
        combined = self.data.copy()
        if kept is not None:
            combined[..., kept[0]] = kept[1]
        combined[..., self.volume_indices(target_bvecs)] = pred
        return combined

    def _scores(self, pred, reference, maps, reference_maps, series, high_b_reference) -> dict:
        scores = {
            **image_metrics(pred, reference, self.mask, min_mask_voxels=self.min_mask_voxels),
            **tensor_metrics(
                maps, reference_maps, self.mask, fibre_fa=self.fibre_fa, min_mask_voxels=self.min_mask_voxels
            ),
        }
        if self.high_b:
            scores.update(high_b_reference.score(series))
        return scores

    def score(self, pred, target_bvecs, *, kept=None, return_maps: bool = False):
        """Score predicted volumes.

        Args:
            pred (`np.ndarray` of shape `(X, Y, Z, T)`): predicted volumes.
            target_bvecs (`array-like` of shape `(T, 3)`): their directions, any
                order and sign; each must be a direction of the acquisition.
            kept (`tuple`, *optional*): ``(indices, volumes)`` of the method's own
                b0s and kept directions (denoised), as :meth:`combine` takes them.
            return_maps (`bool`, *optional*, defaults to `False`): also return
                the tensor fit of the up-sampled series.

        Returns:
            `dict`: ``{"acquired": metrics}`` plus ``"truth": metrics`` when a
            truth was given (and ``"denoised": metrics`` with a denoised reference); ``metrics`` holds the keys of
            :func:`~qid2_diffusers.evaluation.metrics.image_metrics` and
            :func:`~qid2_diffusers.evaluation.metrics.tensor_metrics`, and with
            ``high_b`` those of :meth:`~qid2_diffusers.evaluation.metrics.HighBReference.score`.
        """
        idx = self.volume_indices(target_bvecs)
        combined = self.combine(pred, target_bvecs, kept=kept)
        maps = fit_tensor(combined, self.bvals, self.bvecs, self.mask)
        pred = combined[..., idx]
        scores = {"acquired": self._scores(pred, self.data[..., idx], maps, self.reference_maps, combined,
                                           self.high_b and self.high_b_reference)}
        if self.truth is not None:
            scores["truth"] = self._scores(pred, self.truth[..., idx], maps, self.truth_maps, combined,
                                           self.high_b and self.truth_high_b_reference)
        if self.denoised is not None:
            # Tensor measures only: the high-b references are of the raw acquisition.
            scores["denoised"] = {
                **image_metrics(pred, self.denoised[..., idx], self.mask, min_mask_voxels=self.min_mask_voxels),
                **tensor_metrics(maps, self.denoised_maps, self.mask, fibre_fa=self.fibre_fa,
                                 min_mask_voxels=self.min_mask_voxels),
            }
        return (scores, maps) if return_maps else scores

    def score_acquisition(self, target_bvecs) -> dict:
        """The full acquisition scored against the truth: the noise floor no up-sampler can beat on average.

        Image metrics compare the acquired volumes at ``target_bvecs`` with
        the noise-free ones; tensor metrics compare the fit on every acquired
        volume with the fit on the truth.
        """
        if self.truth is None:
            raise ValueError("the noise floor needs the noise-free truth")
        idx = self.volume_indices(target_bvecs)
        return self._scores(self.data[..., idx], self.truth[..., idx], self.reference_maps, self.truth_maps,
                            self.data, self.high_b and self.truth_high_b_reference)
