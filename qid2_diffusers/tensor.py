"""Single-tensor fits (dipy), the one place tensors are fitted in this package.

Used by evaluation (FA, MD, principal direction), by the DTI-predict baseline
and by the command line's FA report.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .gradients import B0_THRESHOLD

__all__ = ["TensorMaps", "fit_tensor"]


@dataclass
class TensorMaps:
    """Tensor-derived maps; zero outside the mask.

    Args:
        fa (`np.ndarray` of shape `(X, Y, Z)`): fractional anisotropy.
        md (`np.ndarray` of shape `(X, Y, Z)`): mean diffusivity (mm²/s).
        evecs (`np.ndarray` of shape `(X, Y, Z, 3, 3)`): eigenvectors, columns
            sorted by decreasing eigenvalue; ``evecs[..., :, 0]`` is the
            principal direction.
        fit: the dipy ``TensorFit``, for predictions.
    """

    fa: np.ndarray
    md: np.ndarray
    evecs: np.ndarray
    fit: object

    @property
    def principal_direction(self) -> np.ndarray:
        return self.evecs[..., :, 0]


def fit_tensor(data, bvals, bvecs, mask=None, *, fit_method: str = "WLS") -> TensorMaps:
    """Fit a single tensor per voxel with dipy.

    Args:
        data (`array-like` of shape `(X, Y, Z, N)`): b0 and diffusion-weighted volumes.
        bvals (`array-like` of shape `(N,)`), bvecs (`array-like` of shape `(N, 3)`): the scheme.
        mask (`np.ndarray` of shape `(X, Y, Z)`, *optional*): voxels to fit.
        fit_method (`str`, *optional*, defaults to `"WLS"`): dipy's fit method.
    """
    from dipy.core.gradients import gradient_table
    from dipy.reconst.dti import TensorModel

    data = np.asarray(data, dtype=np.float32)
    bvals = np.asarray(bvals, dtype=np.float64)
    bvecs = np.asarray(bvecs, dtype=np.float64)
    if not np.any(bvals <= B0_THRESHOLD):
        raise ValueError("a tensor fit needs at least one b0 volume")
    gtab = gradient_table(bvals, bvecs=bvecs, b0_threshold=B0_THRESHOLD)
    # Negative or zero signal (noise floor, interpolation) breaks the log in the fit.
    data = np.maximum(data, 1e-6)
    fit = TensorModel(gtab, fit_method=fit_method).fit(data, mask=mask)
    fa = np.nan_to_num(fit.fa).astype(np.float32)
    md = np.nan_to_num(fit.md).astype(np.float32)
    evecs = np.nan_to_num(fit.evecs).astype(np.float32)
    if mask is not None:
        m = np.asarray(mask, dtype=bool)
        fa[~m] = 0
        md[~m] = 0
        evecs[~m] = 0
    return TensorMaps(fa=fa, md=md, evecs=evecs, fit=fit)
