"""DTI-predict: fit a single tensor on the acquired directions, predict the targets."""

from __future__ import annotations

import numpy as np

from ..directions import normalize_bvecs
from ..tensor import TensorPrior
from ..upsampling import VolumeUpsampler

__all__ = ["DTIUpsampler"]


class DTIUpsampler(VolumeUpsampler):
    """Predicts each target volume from a per-voxel tensor fitted on the b0 and acquired
    volumes (:class:`~qid2_diffusers.tensor.TensorPrior`): ``S = S0 exp(-b g^T D g)`` with
    ``S0`` the mean b0.

    Args:
        fit_method (`str`, *optional*, defaults to `"WLS"`): dipy's tensor fit method.
    """

    name = "dti"

    def __init__(self, fit_method: str = "WLS"):
        self.fit_method = fit_method

    def predict_volumes(self, data, bvals, bvecs, target_bvecs, mask=None) -> np.ndarray:
        """See :meth:`VolumeUpsampler.predict`."""
        # The targets lie on the acquired shell.
        prior = TensorPrior(data, bvals, bvecs, mask, fit_method=self.fit_method)
        return prior.predict(normalize_bvecs(target_bvecs))
