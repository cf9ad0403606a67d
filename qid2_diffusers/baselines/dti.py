"""DTI-predict: fit a single tensor on the acquired directions, predict the targets."""

from __future__ import annotations

import numpy as np

from ..directions import normalize_bvecs
from ..gradients import B0_THRESHOLD, split_scheme
from ..tensor import fit_tensor
from ..upsampling import VolumeUpsampler

__all__ = ["DTIUpsampler"]


class DTIUpsampler(VolumeUpsampler):
    """Predicts each target volume from a per-voxel tensor (:func:`~qid2_diffusers.tensor.fit_tensor`)
    fitted on the b0 and acquired volumes: ``S = S0 exp(-b g^T D g)`` with ``S0`` the mean b0.

    Args:
        fit_method (`str`, *optional*, defaults to `"WLS"`): dipy's tensor fit method.
    """

    name = "dti"

    def __init__(self, fit_method: str = "WLS"):
        self.fit_method = fit_method

    def predict_volumes(self, data, bvals, bvecs, target_bvecs, mask=None) -> np.ndarray:
        """See :meth:`VolumeUpsampler.predict`."""
        from dipy.core.gradients import gradient_table

        data = np.asarray(data, dtype=np.float32)
        bvals = np.asarray(bvals, dtype=np.float64)
        b0, dw = split_scheme(bvals, bvecs)
        targets = normalize_bvecs(target_bvecs)
        maps = fit_tensor(data, bvals, bvecs, mask, fit_method=self.fit_method)
        # The targets lie on the acquired shell.
        target_gtab = gradient_table(
            np.full(len(targets), np.median(bvals[dw])), bvecs=targets, b0_threshold=B0_THRESHOLD
        )
        s0 = data[..., b0].mean(axis=-1)
        out = maps.fit.predict(target_gtab, S0=s0).astype(np.float32)
        out = np.nan_to_num(out, nan=0.0, posinf=0.0, neginf=0.0)
        if mask is not None:
            out[~np.asarray(mask, dtype=bool)] = 0.0
        return out
