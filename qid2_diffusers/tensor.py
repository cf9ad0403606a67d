"""Single-tensor fits (dipy), the one place tensors are fitted in this package.

Used by evaluation (FA, MD, principal direction), by the DTI-predict baseline,
by QID²'s physics prior (:class:`TensorPrior`, in training caches, at
inference and in test-time adaptation) and by the command line's FA report.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from .gradients import B0_THRESHOLD
from .threads import cpu_workers

__all__ = ["TensorMaps", "TensorPrior", "fit_tensor"]


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


def _fit_slabs(model, data, mask, workers: int):
    """dipy's fit, on ``workers`` threads each fitting a slab of slices (numpy's
    linear algebra releases the GIL); voxels are fitted independently, so the
    parameters are those of one fit of the whole volume, bit for bit."""
    from dipy.reconst.dti import TensorFit

    slabs = [z for z in np.array_split(np.arange(data.shape[2]), workers) if len(z)]
    if len(slabs) < 2:
        return model.fit(data, mask=mask)

    def params(z):
        return model.fit(data[:, :, z[0] : z[-1] + 1], mask=None if mask is None else mask[:, :, z[0] : z[-1] + 1]).model_params

    with ThreadPoolExecutor(len(slabs)) as pool:
        return TensorFit(model, np.concatenate(list(pool.map(params, slabs)), axis=2))


def fit_tensor(data, bvals, bvecs, mask=None, *, fit_method: str = "WLS", workers: int | None = None) -> TensorMaps:
    """Fit a single tensor per voxel with dipy.

    Args:
        data (`array-like` of shape `(X, Y, Z, N)`): b0 and diffusion-weighted volumes.
        bvals (`array-like` of shape `(N,)`), bvecs (`array-like` of shape `(N, 3)`): the scheme.
        mask (`np.ndarray` of shape `(X, Y, Z)`, *optional*): voxels to fit.
        fit_method (`str`, *optional*, defaults to `"WLS"`): dipy's fit method.
        workers (`int`, *optional*): threads, each fitting a slab of slices (the
            same parameters as one thread); defaults to
            :func:`~qid2_diffusers.threads.cpu_workers`.
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
    model = TensorModel(gtab, fit_method=fit_method)
    workers = cpu_workers() if workers is None else int(workers)
    fit = _fit_slabs(model, data, mask, workers) if data.ndim == 4 and workers > 1 else model.fit(data, mask=mask)
    fa = np.nan_to_num(fit.fa).astype(np.float32)
    md = np.nan_to_num(fit.md).astype(np.float32)
    evecs = np.nan_to_num(fit.evecs).astype(np.float32)
    if mask is not None:
        m = np.asarray(mask, dtype=bool)
        fa[~m] = 0
        md[~m] = 0
        evecs[~m] = 0
    return TensorMaps(fa=fa, md=md, evecs=evecs, fit=fit)


class TensorPrior:
    """A tensor fit of b0 + one shell that predicts any direction's signal, slice by slice.

    This is DTI-predict, the classical answer to q-space up-sampling, and the
    physics prior QID² refines: ``S = S0 exp(-b g^T D g)`` with ``S0`` the mean
    b0 (dipy's :func:`~dipy.reconst.dti.tensor_prediction`). Only the 12 tensor
    parameters per voxel are kept, so predicting 60 targets of a
    145 x 174 x 145 subject never holds 60 volumes at once.

    Args:
        data (`array-like` of shape `(X, Y, Z, N)`): b0 volumes and the kept
            directions of ONE shell (a target must not be among them).
        bvals (`array-like` of shape `(N,)`), bvecs (`array-like` of shape `(N, 3)`): their scheme.
        mask (`np.ndarray` of shape `(X, Y, Z)`, *optional*): voxels to fit; zero elsewhere.
        fit_method (`str`, *optional*, defaults to `"WLS"`): dipy's tensor fit method.
    """

    def __init__(self, data, bvals, bvecs, mask=None, *, fit_method: str = "WLS"):
        data = np.asarray(data, dtype=np.float32)
        bvals = np.asarray(bvals, dtype=np.float64)
        b0 = bvals <= B0_THRESHOLD
        if not np.any(~b0):
            raise ValueError("a tensor prior needs diffusion-weighted volumes besides the b0s")
        self.bval = float(np.median(bvals[~b0]))
        self.mean_b0 = data[..., b0].mean(axis=-1).astype(np.float32)
        maps = fit_tensor(data, bvals, bvecs, mask, fit_method=fit_method)
        self.params = np.nan_to_num(maps.fit.model_params).astype(np.float32)
        self.mask = None if mask is None else np.asarray(mask, dtype=bool)
        self.maps = maps

    def predict(self, target_bvecs, index=(), *, bval: float | None = None) -> np.ndarray:
        """Predicted signal ``(..., T)`` at ``target_bvecs`` ``(T, 3)`` for the voxels ``index`` selects.

        Args:
            target_bvecs (`array-like` of shape `(T, 3)`): unit directions.
            index (`tuple`, *optional*): numpy index into the first three axes,
                e.g. ``(slice(None), slice(None), z)`` for one axial slice.
            bval (`float`, *optional*): b-value of the targets; defaults to the fitted shell's.
        """
        from dipy.core.gradients import gradient_table
        from dipy.reconst.dti import tensor_prediction

        targets = np.asarray(target_bvecs, dtype=np.float64).reshape(-1, 3)
        b = self.bval if bval is None else float(bval)
        gtab = gradient_table(np.full(len(targets), b), bvecs=targets, b0_threshold=B0_THRESHOLD)
        params = self.params[index]
        s0 = self.mean_b0[index]
        with np.errstate(over="ignore", invalid="ignore"):
            out = tensor_prediction(params.astype(np.float64), gtab, s0.astype(np.float64))
        out = np.nan_to_num(out, nan=0.0, posinf=0.0, neginf=0.0).astype(np.float32)
        if self.mask is not None:
            out[~self.mask[index]] = 0.0
        return out
