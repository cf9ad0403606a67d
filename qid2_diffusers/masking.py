"""Brain masks: dipy's ``median_otsu`` on the mean b0, the package's one mask.

Used by ``qid2 upsample`` when no ``--mask`` is given and by the demo.
"""

from __future__ import annotations

import numpy as np

__all__ = ["brain_mask"]

#: Median filter radius in millimetres: dipy's usual 4 voxels at HCP's 1.25 mm,
#: 2 voxels at 2.5 mm, so the filter sees the same anatomy at any resolution.
MEDIAN_RADIUS_MM = 5.0


def brain_mask(mean_b0, voxel_size=None, *, numpass: int = 1) -> np.ndarray:
    """Boolean brain mask of a mean b0 volume.

    Otsu thresholding after median filtering (dipy's ``median_otsu``), then
    the largest connected component, holes filled (``finalize_mask``). Where
    Otsu finds nothing (e.g. a constant crop), every voxel with signal is kept
    rather than silently up-sampling nothing.

    Args:
        mean_b0 (`np.ndarray` of shape `(X, Y, Z)`): mean of the b0 volumes.
        voxel_size (`tuple` of `float`, *optional*): voxel size in mm, from the
            NIfTI header; defaults to 2 mm. Sets the median filter radius.
        numpass (`int`, *optional*, defaults to 1): median filter passes.
    """
    from dipy.segment.mask import median_otsu

    b0 = np.asarray(mean_b0, dtype=np.float32)
    if b0.ndim != 3:
        raise ValueError(f"mean b0 must be a 3D volume, got shape {b0.shape}")
    b0 = np.nan_to_num(b0, nan=0.0, posinf=0.0, neginf=0.0)
    size = 2.0 if voxel_size is None else float(np.nanmean(np.asarray(voxel_size, dtype=np.float64)[:3]))
    radius = max(1, int(round(MEDIAN_RADIUS_MM / size))) if np.isfinite(size) and size > 0 else 2
    # Small crops keep the radius within the volume, or the filter sees only padding.
    radius = min(radius, max(1, min(b0.shape) // 2))
    _, mask = median_otsu(b0, median_radius=radius, numpass=numpass, finalize_mask=True)
    mask = np.asarray(mask, dtype=bool)
    if not mask.any():
        mask = b0 > 0
    return mask
