"""Image, tensor and high-b metrics, computed inside the brain mask.

The one implementation of every number the evaluation reports: ``qid2
evaluate``, ``qid2 benchmark`` and the tests all call these functions. Shells
of b >= :data:`HIGH_B` are also scored with the measures high-b users read:
the angular correlation of SH fits and the CSD peak-direction error
(:class:`HighBReference`).
"""

from __future__ import annotations

import warnings
from contextlib import contextmanager

import numpy as np

from ..directions import normalize_bvecs
from ..gradients import B0_THRESHOLD, split_scheme

__all__ = [
    "MIN_MASK_VOXELS",
    "FIBRE_FA",
    "ssim_per_slice",
    "psnr",
    "nrmse",
    "image_metrics",
    "principal_angle_deg",
    "tensor_metrics",
    "fa_error_per_slice",
    "HIGH_B",
    "ACC_ORDERS",
    "angular_correlation",
    "HighBReference",
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


def fa_error_per_slice(pred_fa, ref_fa, mask=None, *, axis: int = 2) -> dict:
    """FA mean absolute error of each slice holding brain, and its brain-voxel count.

    The voxel-weighted mean of ``fa_mae`` is :func:`tensor_metrics`'s ``fa_mae``
    of the same maps: the per-slice values split that one number, they do not redefine it.

    Returns:
        `dict`: ``slice`` (indices along ``axis``), ``n_voxels`` and ``fa_mae``, one entry per slice.
    """
    mask = _mask_of(mask, np.shape(ref_fa))
    error = np.moveaxis(np.abs(np.asarray(pred_fa, np.float64) - np.asarray(ref_fa, np.float64)), axis, 0)
    mask = np.moveaxis(mask, axis, 0)
    counts = mask.sum(axis=(1, 2))
    kept = np.flatnonzero(counts)
    return {
        "slice": kept.tolist(),
        "n_voxels": counts[kept].tolist(),
        "fa_mae": [float(error[k][mask[k]].mean()) for k in kept],
    }


# ---------------------------------------------------------------------------
# The measures high-b users read: angular correlation of SH fits, CSD peaks

#: Shells at or above this b-value (s/mm²) are also scored with :class:`HighBReference`.
HIGH_B = 2000.0

#: SH orders of the angular correlation coefficient.
ACC_ORDERS = (6, 8)

#: Voxels above this FA (of the reference's tensor fit) give the CSD response, as dipy's ``auto_response_ssst``.
RESPONSE_FA = 0.7

#: Fewest response voxels; with fewer above :data:`RESPONSE_FA` (a small crop), the highest-FA voxels are used.
MIN_RESPONSE_VOXELS = 10

#: Most fibre voxels whose CSD peaks are compared, evenly spread over them: a few seconds per series.
MAX_CSD_VOXELS = 1000

#: Peaks are found on this dipy sphere (724 points, about 7 degrees apart); the fit, not the sphere, costs.
CSD_SPHERE = "repulsion724"


def _sh_coefficients(signal, bvecs, sh_order: int) -> np.ndarray:
    """Least-squares SH coefficients (``tournier07``, non-legacy: orthonormal) of signals ``(V, N)``."""
    from dipy.core.sphere import Sphere
    from dipy.reconst.shm import sf_to_sh

    return sf_to_sh(np.asarray(signal, dtype=np.float64), Sphere(xyz=normalize_bvecs(bvecs)),
                    sh_order_max=sh_order, basis_type="tournier07", legacy=False)


def _n_coefficients(sh_order: int) -> int:
    return (sh_order + 1) * (sh_order + 2) // 2


def _mean_acc(pred_signal, ref_sh, bvecs, sh_order: int) -> float:
    """Mean ACC of signals ``(V, N)`` against reference coefficients ``(V, K)``; the l = 0 term is left out."""
    u = _sh_coefficients(pred_signal, bvecs, sh_order)[:, 1:]
    v = ref_sh[:, 1:]
    norm = np.sqrt(np.sum(u * u, axis=1) * np.sum(v * v, axis=1))
    acc = np.sum(u * v, axis=1)[norm > 0] / norm[norm > 0]
    return float(acc.mean()) if acc.size else float("nan")


def angular_correlation(pred, ref, bvecs, mask=None, *, sh_order: int = 6) -> float:
    """Angular correlation coefficient (Anderson 2005) of two series on one shell, averaged over the mask.

    Each voxel's signal is fitted with even SH up to ``sh_order`` (dipy's
    ``sf_to_sh``, plain least squares); the ACC is the correlation of the two
    coefficient vectors without the l = 0 term, so it compares angular shape,
    not intensity: 1 for the same profile, 0 for unrelated ones.

    Args:
        pred, ref (`np.ndarray` of shape `(X, Y, Z, N)`): the diffusion-weighted volumes of one shell.
        bvecs (`array-like` of shape `(N, 3)`): their directions.
        mask (`np.ndarray` of shape `(X, Y, Z)`, *optional*): voxels averaged; defaults to all.
        sh_order (`int`, *optional*, defaults to 6): maximum even order.

    Returns:
        `float`: mean ACC over the voxels where it is defined; NaN when the
        shell has fewer directions than the fit has coefficients.
    """
    mask = _mask_of(mask, np.shape(ref)[:3])
    if len(bvecs) < _n_coefficients(sh_order):
        return float("nan")
    ref_sh = _sh_coefficients(np.asarray(ref)[mask], bvecs, sh_order)
    return _mean_acc(np.asarray(pred)[mask], ref_sh, bvecs, sh_order)


@contextmanager
def _quiet_csd():
    # dipy's CSD builds its matrices in the legacy SH basis (a PendingDeprecationWarning) and warns when
    # its iterations stop at the limit; neither changes what is compared.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", PendingDeprecationWarning)
        warnings.filterwarnings("ignore", message="maximum number of iterations")
        yield


def _max_sh_order(n_directions: int, cap: int = 8) -> int:
    order = cap
    while order > 2 and _n_coefficients(order) > n_directions:
        order -= 2
    return order


class HighBReference:
    """The full acquisition of a high-b shell, prepared once to score many up-sampled series.

    Holds its SH coefficients (orders :data:`ACC_ORDERS`) and the first CSD peak
    (dipy's ``ConstrainedSphericalDeconvModel``, response from
    ``response_from_mask_ssst`` on the reference's voxels with FA >
    :data:`RESPONSE_FA`, ``peaks_from_model``) in up to :data:`MAX_CSD_VOXELS`
    fibre voxels (FA > ``fibre_fa``), evenly spread; :meth:`score` repeats both
    on an up-sampled series with the same model and voxels.

    Args:
        reference (`np.ndarray` of shape `(X, Y, Z, N)`): b0 volumes and one full shell.
        bvals (`array-like` of shape `(N,)`), bvecs (`array-like` of shape `(N, 3)`): its scheme.
        mask (`np.ndarray` of shape `(X, Y, Z)`): brain mask.
        fa (`np.ndarray` of shape `(X, Y, Z)`): FA of the reference's tensor fit.
        fibre_fa (`float`, *optional*, defaults to :data:`FIBRE_FA`): FA above which peaks are compared.
        max_voxels (`int`, *optional*, defaults to :data:`MAX_CSD_VOXELS`): most voxels whose peaks are compared.
    """

    def __init__(self, reference, bvals, bvecs, mask, fa, *, fibre_fa: float = FIBRE_FA,
                 max_voxels: int = MAX_CSD_VOXELS):
        from dipy.core.gradients import gradient_table
        from dipy.reconst.csdeconv import ConstrainedSphericalDeconvModel, response_from_mask_ssst

        self.bvals = np.asarray(bvals, dtype=np.float64)
        self.bvecs = np.asarray(bvecs, dtype=np.float64)
        self.mask = _mask_of(mask, np.shape(reference)[:3])
        _, self.dw = split_scheme(self.bvals)
        reference = np.asarray(reference, dtype=np.float32)
        self.reference_sh = {
            order: _sh_coefficients(reference[self.mask][:, self.dw], self.bvecs[self.dw], order)
            for order in ACC_ORDERS
            if len(self.dw) >= _n_coefficients(order)
        }
        fa = np.where(self.mask, np.asarray(fa, dtype=np.float64), 0.0)
        fibres = np.argwhere(self.mask & (fa > fibre_fa))
        self.voxels = fibres[np.unique(np.linspace(0, len(fibres) - 1, min(len(fibres), max_voxels)).astype(int))]
        self.model, self.reference_peaks = None, None
        if len(self.voxels):
            gtab = gradient_table(self.bvals, bvecs=self.bvecs, b0_threshold=B0_THRESHOLD)
            response_mask = fa > RESPONSE_FA
            if response_mask.sum() < MIN_RESPONSE_VOXELS:
                response_mask = fa >= np.sort(fa[self.mask])[-min(MIN_RESPONSE_VOXELS, int(self.mask.sum()))]
            response, _ = response_from_mask_ssst(gtab, reference, (response_mask & self.mask).astype(np.uint8))
            with _quiet_csd():
                self.model = ConstrainedSphericalDeconvModel(gtab, response, sh_order_max=_max_sh_order(len(self.dw)))
            self.reference_peaks = self._first_peaks(reference)

    def _first_peaks(self, series) -> np.ndarray:
        """First CSD peak ``(V, 3)`` of :attr:`voxels` (zero where the ODF has no peak)."""
        from dipy.data import get_sphere
        from dipy.direction.peaks import peaks_from_model

        data = np.asarray(series, dtype=np.float64)[tuple(self.voxels.T)][:, None, None, :]
        with _quiet_csd():
            peaks = peaks_from_model(self.model, np.maximum(data, 1e-6), get_sphere(name=CSD_SPHERE),
                                     relative_peak_threshold=0.5, min_separation_angle=25,
                                     return_sh=False, npeaks=1)
        return peaks.peak_dirs[:, 0, 0, 0, :]

    def score(self, series) -> dict:
        """ACC and CSD peak error of an up-sampled series on the reference's scheme and grid.

        Returns:
            `dict`: ``acc_sh6``, ``acc_sh8`` (mean over the mask; NaN without
            enough directions), ``csd_peak_error_deg`` (mean angle between
            first peaks, either sign, over ``n_csd_voxels`` voxels where both
            series have a peak; NaN without fibre voxels).
        """
        series = np.asarray(series, dtype=np.float32)
        out = {}
        for order in ACC_ORDERS:
            ref_sh = self.reference_sh.get(order)
            out[f"acc_sh{order}"] = (
                float("nan") if ref_sh is None
                else _mean_acc(series[self.mask][:, self.dw], ref_sh, self.bvecs[self.dw], order)
            )
        angles = np.array([])
        if self.model is not None:
            peaks = self._first_peaks(series)
            both = (np.abs(peaks).sum(axis=1) > 0) & (np.abs(self.reference_peaks).sum(axis=1) > 0)
            angles = principal_angle_deg(peaks[both], self.reference_peaks[both]) if both.any() else angles
        out["csd_peak_error_deg"] = float(angles.mean()) if angles.size else float("nan")
        out["n_csd_voxels"] = int(angles.size)
        return out
