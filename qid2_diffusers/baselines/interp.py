"""Interp, the paper's sanity-check baseline: direction-weighted blending of reference slices."""

from __future__ import annotations

import numpy as np

from ..directions import nearest_references, normalize_bvecs
from ..gradients import split_scheme
from ..upsampling import VolumeUpsampler

__all__ = ["InterpUpsampler", "interpolation_weights"]

#: A target this close (radians) to an acquired direction is that direction.
_SAME_DIRECTION = 1e-6


def interpolation_weights(target, reference_bvecs) -> np.ndarray:
    """Least-squares weights expressing ``target`` as a combination of the references.

    Each reference is first flipped into the target's hemisphere: ``b`` and
    ``-b`` measure the same signal, and a reference pointing the other way
    would otherwise enter with a negative weight. With more than three
    references the system is under-determined and the minimum-norm solution
    is used, so a target that coincides with a reference gets weight one on
    it directly rather than a blend of several.

    Args:
        target (`array-like` of shape `(3,)`): the target direction.
        reference_bvecs (`array-like` of shape `(R, 3)`): the reference directions.

    Returns:
        `np.ndarray` of shape `(R,)`: the weight of each reference.
    """
    target = normalize_bvecs(target)[0]
    refs = normalize_bvecs(reference_bvecs)
    cos = refs @ target
    weights = np.zeros(len(refs))
    exact = np.flatnonzero(np.arccos(np.clip(np.abs(cos), 0.0, 1.0)) < _SAME_DIRECTION)
    if len(exact):
        weights[exact[0]] = 1.0
        return weights
    aligned = refs * np.where(cos < 0, -1.0, 1.0)[:, None]
    weights, *_ = np.linalg.lstsq(aligned.T, target, rcond=None)
    return weights


class InterpUpsampler(VolumeUpsampler):
    """Interp (paper): each target volume is the weighted sum of its R nearest
    acquired volumes, with the weights of :func:`interpolation_weights`.

    Args:
        num_references (`int`, *optional*, defaults to 3): R, the references per target (the paper uses 3 and 6).
    """

    def __init__(self, num_references: int = 3):
        self.num_references = int(num_references)
        self.name = f"interp-r{self.num_references}"

    def predict_volumes(self, data, bvals, bvecs, target_bvecs, mask=None) -> np.ndarray:
        """See :meth:`VolumeUpsampler.predict`."""
        _, dw = split_scheme(bvals, bvecs)
        acquired = normalize_bvecs(np.asarray(bvecs, dtype=np.float64)[dw])
        targets = normalize_bvecs(target_bvecs)
        refs = nearest_references(targets, acquired, self.num_references)
        signal = np.asarray(data, dtype=np.float32)[..., dw]
        out = np.empty(signal.shape[:3] + (len(targets),), dtype=np.float32)
        for t, target in enumerate(targets):
            w = interpolation_weights(target, acquired[refs[t]])
            out[..., t] = np.tensordot(signal[..., refs[t]].astype(np.float64), w, axes=([3], [0]))
        if mask is not None:
            out[~np.asarray(mask, dtype=bool)] = 0.0
        return out
