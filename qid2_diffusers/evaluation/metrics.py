"""Image and tensor metrics, computed inside the brain mask.

The one implementation of every number the evaluation reports: ``qid2
evaluate``, ``qid2 benchmark`` and the tests all call these functions.
"""

from __future__ import annotations

import numpy as np

from ..directions import normalize_bvecs

__all__ = [
    "MIN_MASK_VOXELS",
    "FIBRE_FA",
    "ssim_per_slice",
    "psnr",
    "nrmse",
    "image_metrics",
    "principal_angle_deg",
    "tensor_metrics",
]

#: Slices with fewer brain voxels than this are skipped by the per-slice SSIM:
#: a handful of voxels at the top of the head gives an SSIM dominated by edge effects.
MIN_MASK_VOXELS = 64

#: Principal directions are compared only where the reference FA exceeds this
#: (elsewhere the first eigenvector is noise).
FIBRE_FA = 0.2


def _mask_of(mask, shape) -> np.ndarray:
    m = np.ones(shape, dtype=bool) if mask is None else np.asarray(mask, dtype=bool)
    if m.shape != tuple(shape):
        raise ValueError(f"mask shape {m.shape} does not match the image's {tuple(shape)}")
    return m


def _reference_range(ref, mask) -> float:
    values = np.asarray(ref)[mask]
    return float(values.max() - values.min()) if values.size else 0.0


def ssim_per_slice(pred, ref, mask=None, *, data_range=None, axis: int = 2, min_mask_voxels: int = MIN_MASK_VOXELS):
    """SSIM of each slice of a 3D volume, averaged over the brain voxels of the slice.

    Both images are zeroed outside the mask, scikit-image's SSIM map is
    computed on the whole slice, and its mean over the slice's brain voxels is
    that slice's value, so background never counts.

    Args:
        pred (`np.ndarray` of shape `(X, Y, Z)`), ref (`np.ndarray` of shape `(X, Y, Z)`): the volumes.
        mask (`np.ndarray` of shape `(X, Y, Z)`, *optional*): brain mask; defaults to everything.
        data_range (`float`, *optional*): intensity range for SSIM's constants;
            defaults to the reference's range inside the mask.
        axis (`int`, *optional*, defaults to 2): slice axis (2 = axial, as the paper).
        min_mask_voxels (`int`, *optional*, defaults to :data:`MIN_MASK_VOXELS`):
            slices with fewer brain voxels are skipped.

    Returns:
        `np.ndarray`: one SSIM per kept slice (empty if none is kept).
    """
    from skimage.metrics import structural_similarity

    pred = np.asarray(pred, dtype=np.float64)
    ref = np.asarray(ref, dtype=np.float64)
    if pred.shape != ref.shape or pred.ndim != 3:
        raise ValueError(f"SSIM needs two 3D volumes of one shape, got {pred.shape} and {ref.shape}")
    mask = _mask_of(mask, ref.shape)
    if data_range is None:
        data_range = _reference_range(ref, mask)
    if data_range <= 0:
        raise ValueError("the reference is constant inside the mask; SSIM needs a data range")
    pred, ref, mask = (np.moveaxis(a, axis, 0) for a in (pred * mask, ref * mask, mask))
    values = []
    for p, r, m in zip(pred, ref, mask):
        if m.sum() < min_mask_voxels or min(m.shape) < 7:
            continue
        _, smap = structural_similarity(r, p, data_range=data_range, full=True)
        values.append(float(smap[m].mean()))
    return np.asarray(values)


def psnr(pred, ref, mask=None, *, data_range=None) -> float:
    """Peak signal-to-noise ratio in dB inside the mask; ``inf`` for identical images.

    ``data_range`` defaults to the reference's range inside the mask.
    """
    pred, ref = np.asarray(pred, dtype=np.float64), np.asarray(ref, dtype=np.float64)
    mask = _mask_of(mask, ref.shape[:3])
    if data_range is None:
        data_range = _reference_range(ref, mask)
    mse = float(np.mean((pred[mask] - ref[mask]) ** 2))
    if mse == 0:
        return float("inf")
    return float(10.0 * np.log10(data_range**2 / mse))


def nrmse(pred, ref, mask=None) -> float:
    """``||pred - ref|| / ||ref||`` over the brain voxels (scikit-image's Euclidean NRMSE)."""
    from skimage.metrics import normalized_root_mse

    pred, ref = np.asarray(pred, dtype=np.float64), np.asarray(ref, dtype=np.float64)
    mask = _mask_of(mask, ref.shape[:3])
    return float(normalized_root_mse(ref[mask], pred[mask], normalization="euclidean"))


def image_metrics(pred, ref, mask=None, *, min_mask_voxels: int = MIN_MASK_VOXELS) -> dict:
    """SSIM (per slice, as the paper), PSNR and NRMSE of predicted volumes.

    Args:
        pred (`np.ndarray` of shape `(X, Y, Z, T)`): predicted volumes.
        ref (`np.ndarray` of shape `(X, Y, Z, T)`): the reference volumes at the same directions.
        mask (`np.ndarray` of shape `(X, Y, Z)`, *optional*): brain mask.
        min_mask_voxels (`int`, *optional*, defaults to :data:`MIN_MASK_VOXELS`): see :func:`ssim_per_slice`.

    Returns:
        `dict`: ``ssim`` (mean over every kept slice of every volume),
        ``ssim_std`` (spread over those slices), ``psnr``, ``nrmse`` and
        ``n_slices``. One data range (the reference's, inside the mask,
        over all volumes) serves every volume, so methods are scored on one scale.
    """
    pred = np.asarray(pred, dtype=np.float32)
    ref = np.asarray(ref, dtype=np.float32)
    if pred.shape != ref.shape or pred.ndim != 4:
        raise ValueError(f"predicted and reference volumes differ in shape: {pred.shape} vs {ref.shape}")
    mask = _mask_of(mask, ref.shape[:3])
    data_range = _reference_range(ref, mask)
    ssims = np.concatenate(
        [
            ssim_per_slice(pred[..., t], ref[..., t], mask, data_range=data_range, min_mask_voxels=min_mask_voxels)
            for t in range(ref.shape[3])
        ]
    )
    return {
        "ssim": float(ssims.mean()) if ssims.size else float("nan"),
        "ssim_std": float(ssims.std()) if ssims.size else float("nan"),
        "psnr": psnr(pred, ref, mask, data_range=data_range),
        "nrmse": nrmse(pred, ref, mask),
        "n_slices": int(ssims.size),
    }


def principal_angle_deg(v1, v2) -> np.ndarray:
    """Angle in degrees between paired axes ``v1[i]`` and ``v2[i]``, in ``[0, 90]``.

    Element-wise form of :func:`~qid2_diffusers.directions.angular_distance`:
    an eigenvector's sign is arbitrary, so ``v`` and ``-v`` are the same axis.
    """
    u, w = normalize_bvecs(v1), normalize_bvecs(v2)
    return np.degrees(np.arccos(np.clip(np.abs(np.sum(u * w, axis=1)), 0.0, 1.0)))


def tensor_metrics(
    pred_maps, ref_maps, mask=None, *, fibre_fa: float = FIBRE_FA, min_mask_voxels: int = MIN_MASK_VOXELS
) -> dict:
    """Compare two tensor fits (:class:`~qid2_diffusers.tensor.TensorMaps`) inside the mask.

    Args:
        pred_maps, ref_maps (`TensorMaps`): fits of the up-sampled and the reference data.
        mask (`np.ndarray` of shape `(X, Y, Z)`, *optional*): brain mask.
        fibre_fa (`float`, *optional*, defaults to :data:`FIBRE_FA`): angular
            errors are taken where the reference FA exceeds it.
        min_mask_voxels (`int`, *optional*, defaults to :data:`MIN_MASK_VOXELS`): see :func:`ssim_per_slice`.

    Returns:
        `dict`: ``fa_mae``, ``fa_ssim`` (per axial slice, FA's range of 1, as
        the paper), ``md_mae`` (mm²/s), ``angular_error_deg`` (mean over
        ``n_fibre_voxels``; NaN when there are none).
    """
    mask = _mask_of(mask, ref_maps.fa.shape)
    fa_ssim = ssim_per_slice(pred_maps.fa, ref_maps.fa, mask, data_range=1.0, min_mask_voxels=min_mask_voxels)
    fibres = mask & (ref_maps.fa > fibre_fa)
    angles = (
        principal_angle_deg(pred_maps.principal_direction[fibres], ref_maps.principal_direction[fibres])
        if fibres.any()
        else np.array([])
    )
    return {
        "fa_mae": float(np.mean(np.abs(pred_maps.fa[mask] - ref_maps.fa[mask]))),
        "fa_ssim": float(fa_ssim.mean()) if fa_ssim.size else float("nan"),
        "md_mae": float(np.mean(np.abs(pred_maps.md[mask].astype(np.float64) - ref_maps.md[mask]))),
        "angular_error_deg": float(angles.mean()) if angles.size else float("nan"),
        "n_fibre_voxels": int(fibres.sum()),
    }
