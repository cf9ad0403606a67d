"""SH: a spherical-harmonic fit of the acquired shell, evaluated at the targets."""

from __future__ import annotations

import numpy as np

from ..directions import normalize_bvecs
from ..gradients import split_scheme
from ..upsampling import VolumeUpsampler

__all__ = ["SHUpsampler", "sh_resampling_matrix"]


def sh_resampling_matrix(acquired_bvecs, target_bvecs, sh_order: int, smooth: float = 0.0) -> np.ndarray:
    """Matrix ``M`` with ``signal_at_targets = signal_at_acquired @ M``.

    Even-order real SH in the ``tournier07`` basis (MRtrix3's convention,
    dipy's non-legacy definition): fit by (optionally Laplace-Beltrami
    regularised) least squares at the acquired directions, evaluated at the
    targets. Even orders only, so ``b`` and ``-b`` give the same value.

    Args:
        acquired_bvecs (`array-like` of shape `(N, 3)`): acquired directions.
        target_bvecs (`array-like` of shape `(T, 3)`): directions to evaluate.
        sh_order (`int`): maximum even order (2, 4, 6...); needs
            ``N >= (sh_order + 1)(sh_order + 2) / 2`` directions.
        smooth (`float`, *optional*, defaults to 0.0): Laplace-Beltrami
            regularisation weight (dipy's ``smooth``); 0 is a plain least-squares fit.

    Returns:
        `np.ndarray` of shape `(N, T)`.
    """
    from dipy.core.sphere import Sphere
    from dipy.reconst.shm import sh_to_sf_matrix

    if sh_order < 0 or sh_order % 2:
        raise ValueError(f"SH order must be even and non-negative, got {sh_order}")
    acquired = normalize_bvecs(acquired_bvecs)
    n_coef = (sh_order + 1) * (sh_order + 2) // 2
    if len(acquired) < n_coef:
        raise ValueError(f"an order-{sh_order} SH fit has {n_coef} coefficients but only {len(acquired)} directions")
    _, inv_acquired = sh_to_sf_matrix(
        Sphere(xyz=acquired), sh_order_max=sh_order, basis_type="tournier07", legacy=False, smooth=smooth
    )
    to_targets = sh_to_sf_matrix(
        Sphere(xyz=normalize_bvecs(target_bvecs)),
        sh_order_max=sh_order,
        basis_type="tournier07",
        legacy=False,
        return_inv=False,
    )
    return inv_acquired @ to_targets


class SHUpsampler(VolumeUpsampler):
    """Spherical-harmonic fit of the acquired shell (per voxel), evaluated at the targets.

    Args:
        sh_order (`int`, *optional*, defaults to 4): maximum even SH order (2, 4 or 6).
        smooth (`float`, *optional*, defaults to 0.0): Laplace-Beltrami
            regularisation; the default plain least-squares fit is what a
            practitioner would try first, and is exact on a band-limited signal.
    """

    def __init__(self, sh_order: int = 4, smooth: float = 0.0):
        self.sh_order = int(sh_order)
        self.smooth = float(smooth)
        self.name = f"sh{self.sh_order}"

    def predict_volumes(self, data, bvals, bvecs, target_bvecs, mask=None) -> np.ndarray:
        """See :meth:`VolumeUpsampler.predict`."""
        _, dw = split_scheme(bvals, bvecs)
        matrix = sh_resampling_matrix(np.asarray(bvecs)[dw], target_bvecs, self.sh_order, self.smooth)
        signal = np.asarray(data, dtype=np.float32)[..., dw]
        out = signal @ matrix.astype(np.float32)
        if mask is not None:
            out[~np.asarray(mask, dtype=bool)] = 0.0
        return out
