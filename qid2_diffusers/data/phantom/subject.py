"""One brain phantom subject: anatomy, geometry, signal, noise and truth, from a seed."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import numpy as np

from ...errors import QID2InputError
from .anatomy import draw_anatomy
from .geometry import geometry
from .randomize import PhantomRandomization, acquire, draw_randomization, randomize_anatomy
from .scheme import HCP_CENTRE_MM, HCP_FOV_MM, hcp_scheme, phantom_grid
from .signal import add_noise, dispersion_tables, simulate, tensor_fa

__all__ = ["PhantomSubject", "make_subject", "check_options", "subject_grid"]

#: Defaults of a subject that is not randomised.
DEFAULT_RESOLUTION = 2.5
DEFAULT_SNR = 25.0
DEFAULT_SHELLS = (1000.0,)


@dataclass
class PhantomSubject:
    """One phantom subject with its truth.

    Args:
        dwi (`np.ndarray` of shape `(X, Y, Z, N)`, float32): noisy series (Rician).
        bvals (`np.ndarray` of shape `(N,)`): b-values (s/mm²).
        bvecs (`np.ndarray` of shape `(N, 3)`): unit b-vectors in the voxel
            frame (= FSL convention for this affine), zeros on b0 volumes.
        affine (`np.ndarray` of shape `(4, 4)`): HCP-like voxel-to-world transform.
        mask (`np.ndarray` of shape `(X, Y, Z)`, bool): brain mask (tissue and
            the CSF around it, as a skull-stripping tool would give).
        signal (`np.ndarray` of shape `(X, Y, Z, N)`, float32): noise-free series.
        fa (`np.ndarray` of shape `(X, Y, Z)`, float32): true FA inside the mask
            (0 outside); for the brain phantom, the FA of a tensor
            (:func:`~qid2_diffusers.tensor.fit_tensor`, dipy, OLS) fitted to the
            noise-free b0 and lowest shell.
        peaks (`np.ndarray` of shape `(X, Y, Z, 3, 3)`, float32): true fibre
            directions (voxel frame), largest population first, zeros where absent.
        peak_fractions (`np.ndarray` of shape `(X, Y, Z, 3)`, float32): each
            population's share of the voxel's white-matter signal (sum 1 where
            there is white matter).
        n_fibres (`np.ndarray` of shape `(X, Y, Z)`, uint8): 0, 1, 2 or 3.
        tissue (`np.ndarray` of shape `(X, Y, Z, 3)`, float32): partial-volume
            fractions of white matter, grey matter and CSF.
        seed (`int`): the subject's seed.
        resolution (`float`): voxel size (mm).
        snr (`float`): b0 white-matter signal over the noise standard deviation.
        sigma (`float`): noise standard deviation (scanner units).
        params (`dict`): drawn scalar parameters (S0s, diffusivities, ...), JSON-ready.
    """

    dwi: np.ndarray
    bvals: np.ndarray
    bvecs: np.ndarray
    affine: np.ndarray
    mask: np.ndarray
    signal: np.ndarray
    fa: np.ndarray
    peaks: np.ndarray
    peak_fractions: np.ndarray
    n_fibres: np.ndarray
    tissue: np.ndarray
    seed: int
    resolution: float
    snr: float
    sigma: float
    params: dict = field(default_factory=dict)


def check_options(seed, resolution=None, snr=None, shells=None):
    """Raise :class:`~qid2_diffusers.errors.QID2InputError` for a bad seed, voxel size, SNR or shell list (`None`: not given)."""
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise QID2InputError(None, f"seed must be a non-negative integer, got {seed!r}")
    if resolution is not None and (not np.isfinite(resolution) or not 0.5 <= resolution <= 5.0):
        raise QID2InputError(None, f"resolution must be between 0.5 and 5 mm, got {resolution!r}")
    if snr is not None and not snr > 0:
        raise QID2InputError(None, f"snr must be positive (inf for no noise), got {snr!r}")
    if shells is not None:
        if not shells or any(not np.isfinite(b) or b < 100 or b > 20000 for b in shells):
            raise QID2InputError(None, f"shells must be b-values between 100 and 20000 s/mm², got {tuple(shells)}")
        if len(set(shells)) != len(shells):
            raise QID2InputError(None, f"shells must be distinct, got {tuple(shells)}")


def subject_grid(resolution: float, slab, *, fov=HCP_FOV_MM, centre=HCP_CENTRE_MM):
    """Shape, affine and first slice (in the full grid) of the ``slab`` central axial slices of
    :func:`~.scheme.phantom_grid` (`None`: all of them)."""
    full_shape, affine = phantom_grid(resolution, fov, centre)
    if slab is not None and (isinstance(slab, bool) or not isinstance(slab, (int, np.integer)) or not 1 <= slab <= full_shape[2]):
        raise QID2InputError(None, f"slab must be between 1 and {full_shape[2]} axial slices at {resolution:g} mm, got {slab!r}")
    k0 = 0 if slab is None else (full_shape[2] - int(slab)) // 2
    shape = full_shape if slab is None else (full_shape[0], full_shape[1], int(slab))
    affine = affine.copy()
    affine[:3, 3] += affine[:3, 2] * k0
    return shape, affine, k0


def _randomization(seed, randomize, resolution, snr, shells):
    if isinstance(randomize, PhantomRandomization):
        fixed = {"resolution": resolution, "snr": snr, "shells": shells}
        return dataclasses.replace(randomize, **{k: v for k, v in fixed.items() if v is not None})
    if randomize:
        return draw_randomization(seed, resolution=resolution, snr=snr, shells=shells)
    return None


def make_subject(seed: int, *, resolution: float | None = None, snr: float | None = None, shells=None,
                 slab: int | None = None, randomize: bool | PhantomRandomization = False) -> PhantomSubject:
    """Simulate one brain phantom subject.

    Args:
        seed (`int`): non-negative seed; the same seed gives the same subject.
        resolution (`float`, *optional*): voxel size in mm; 2.5 by default
            (1.25 is HCP's grid), drawn from 1.25-2.5 mm with ``randomize``.
        snr (`float`, *optional*): white-matter b0 signal over the noise
            standard deviation, ``float("inf")`` for no noise; 25 by default,
            drawn from 10-50 with ``randomize``.
        shells (`tuple` of `float`, *optional*): b-values of the
            diffusion-weighted shells, 90 directions each; ``(1000,)`` by
            default, ``(1000, 2000, 3000)`` with ``randomize``.
        slab (`int`, *optional*): keep only this many central axial slices
            (the affine says where they are); `None` keeps the whole volume.
        randomize (`bool` or `PhantomRandomization`, *optional*, defaults to `False`):
            domain randomisation (:mod:`~qid2_diffusers.data.phantom.randomize`):
            tissue properties, dispersion, contrast, bias, voxel size, SNR,
            smooth partial volume and Gibbs ringing drawn from the seed, or
            taken from the given :class:`PhantomRandomization`. Arguments
            given explicitly are kept. The anatomy is the same as without.

    Returns:
        :class:`PhantomSubject`; with ``randomize``, ``params["randomization"]`` holds the draws.

    Example:

    ```py
    >>> subject = make_subject(0, slab=8)
    >>> subject.dwi.shape
    (72, 87, 8, 108)
    ```
    """
    resolution = None if resolution is None else float(resolution)
    snr = None if snr is None else float(snr)
    shells = None if shells is None else tuple(float(b) for b in shells)
    check_options(seed, resolution, snr, shells)
    rand = _randomization(seed, randomize, resolution, snr, shells)
    if rand is not None:
        resolution, snr, shells = rand.resolution, rand.snr, rand.shells
    resolution = DEFAULT_RESOLUTION if resolution is None else resolution
    snr = DEFAULT_SNR if snr is None else snr
    shells = DEFAULT_SHELLS if shells is None else shells
    shape, affine, k0 = subject_grid(resolution, slab)

    bvals, bvecs = hcp_scheme(shells)
    anat = draw_anatomy(np.random.default_rng([int(seed), 0]))
    if rand is not None:
        randomize_anatomy(anat, rand)
    geo = geometry(anat, shape, affine, resolution)
    truth = _truth_maps(geo)
    if rand is None:
        signal = simulate(anat, geo, shape, bvals, bvecs)
        head = geo.head_grid
    else:
        tables = dispersion_tables(np.asarray(rand.kappa), anat.dpar, anat.fin, anat.dperp, bvals)
        signal, truth["tissue"] = acquire(anat, shape, affine, rand, bvals, bvecs, tables)
        head = signal.any(axis=-1)
    sigma = 0.0 if np.isinf(snr) else anat.s0_wm / snr
    params = dict(anat.params, sigma=sigma, snr=snr, shells=list(shells), resolution=resolution, seed=int(seed))
    if rand is not None:
        params["randomization"] = rand.to_params()
    return PhantomSubject(
        dwi=add_noise(signal, head, sigma, int(seed), k0), bvals=bvals, bvecs=bvecs, affine=affine,
        mask=geo.mask_grid, signal=signal, fa=tensor_fa(signal, geo.mask_grid, bvals, bvecs),
        **truth, seed=int(seed), resolution=resolution, snr=snr, sigma=float(sigma), params=params,
    )


def _truth_maps(geo) -> dict:
    """Fibre and tissue truth of the head's voxels, on the grid."""
    peaks = np.zeros((len(geo.head_flat), 3, 3), dtype=np.float32)
    fractions = np.zeros((len(geo.head_flat), 3), dtype=np.float32)
    peaks[geo.wm_rows] = geo.peaks
    fractions[geo.wm_rows] = geo.fractions
    return {
        "peaks": geo.to_grid(peaks),
        "peak_fractions": geo.to_grid(fractions),
        "n_fibres": geo.to_grid((fractions > 0).sum(axis=1).astype(np.uint8), np.uint8),
        "tissue": geo.to_grid(geo.tissue.astype(np.float32)),
    }
