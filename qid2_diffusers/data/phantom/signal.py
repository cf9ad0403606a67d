"""The brain phantom's signal model, its noise, and the FA it stores as truth.

White matter is a sum over its fibre populations of an intra-axonal stick and
an extra-axonal zeppelin sharing its parallel diffusivity; grey matter, CSF and
scalp are isotropic. With dispersion, each population's stick and zeppelin are
averaged over a Watson distribution of orientations around the population's
direction (:func:`dispersion_tables`) instead of pointing exactly along it.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np
from scipy.special import dawsn

from .scheme import n_threads

__all__ = ["simulate", "add_noise", "tensor_fa", "watson_directions", "dispersion_tables"]

# Voxels per chunk of the signal computation (8 chunks for the tensor fit):
# bounds the temporaries to ~7 MB per float32 array at 108 volumes.
_CHUNK = 16384
# A dispersed kernel is tabulated at this many values of |g·fibre| in [0, 1]
# (linear interpolation error < 1e-4), averaging this many orientations
# (quadrature error < 1e-4 of S0 at b = 3000 s/mm²).
_TABLE_POINTS = 513
_ORIENTATIONS = 2000


def watson_directions(kappa: float, n: int) -> np.ndarray:
    """``n`` orientations spread around the z axis like a Watson distribution of concentration ``kappa``.

    A deterministic quadrature, not a random sample: the cosines to the axis are
    the ``(i + 0.5) / n`` quantiles of the Watson marginal (density
    ``∝ exp(kappa t²)`` on ``t = cos θ ∈ [0, 1]``), the azimuths follow the
    golden angle.

    Returns:
        `np.ndarray` of shape `(n, 3)`: unit vectors.
    """
    t = np.linspace(0.0, 1.0, 4097)
    # erfi(√κ t) / erfi(√κ), through Dawson's function so that large κ does not overflow.
    root = np.sqrt(kappa)
    cdf = np.exp(kappa * (t**2 - 1)) * dawsn(root * t) / dawsn(root)
    cos = np.interp((np.arange(n) + 0.5) / n, cdf, t)
    phi = np.arange(n) * np.pi * (3 - np.sqrt(5))
    sin = np.sqrt(1 - cos**2)
    return np.column_stack([sin * np.cos(phi), sin * np.sin(phi), cos])


def _stick_zeppelin(directions, g, b, dpar, fin, dperp):
    """Attenuation of a stick plus a zeppelin along ``directions`` (R, 3), for b-vectors ``g`` (N, 3)."""
    bcos2 = np.square(directions @ g.T)
    bcos2 *= b
    att = np.exp(-dpar * bcos2)
    att *= fin
    zeppelin = np.exp(-(dpar - dperp) * bcos2)
    zeppelin *= np.exp(-dperp * b)
    zeppelin *= 1 - fin
    att += zeppelin
    return att


def dispersion_tables(kappa, dpar, fin, dperp, bvals) -> np.ndarray:
    """Attenuation of Watson-dispersed fibre populations, per family and volume, against ``|g·fibre|``.

    A dispersion pattern is symmetric about the population's direction, so its
    averaged kernel depends on the b-vector only through the cosine between
    the two; it is tabulated once per family and shell and looked up per voxel
    (smooth, exact to < 1e-4, and cheaper than the straight kernel).

    Args:
        kappa, dpar, fin, dperp (`np.ndarray` of shape `(F,)`): per family the
            Watson concentration, the parallel diffusivity (mm²/s), the
            intra-axonal fraction and the extra-axonal perpendicular diffusivity.
        bvals (`np.ndarray` of shape `(N,)`): b-values of the series.

    Returns:
        `np.ndarray` of shape `(F, N, 513)`, float32.
    """
    c = np.linspace(0.0, 1.0, _TABLE_POINTS)
    g = np.column_stack([np.sqrt(1 - c**2), np.zeros_like(c), c])
    tables = np.empty((len(kappa), len(bvals), _TABLE_POINTS), dtype=np.float32)
    for f in range(len(kappa)):
        orientations = watson_directions(kappa[f], _ORIENTATIONS)
        for b in np.unique(bvals):
            att = _stick_zeppelin(orientations, g, np.full(len(c), b), dpar[f], fin[f], dperp[f])
            tables[f, bvals == b] = att.mean(axis=0)
    return tables


def _population(peaks, family, g, b, params, tables):
    if tables is None:
        dpar, fin, dperp = params[family].T[:, :, None]
        return _stick_zeppelin(peaks, g, b, dpar, fin, dperp)
    # Linear interpolation in the tables, addressed by flat int32 indices (numpy's
    # take is ~7x faster than fancy indexing with three broadcast index arrays).
    n_volumes, points = tables.shape[1:]
    weight = np.abs(peaks @ g.T)
    weight *= np.float32(points - 1)
    index = weight.astype(np.int32)
    np.minimum(index, points - 2, out=index)
    weight -= index
    index += (family.astype(np.int32) * (n_volumes * points))[:, None]
    index += (np.arange(n_volumes, dtype=np.int32) * points)[None, :]
    flat = tables.reshape(-1)
    lower = flat.take(index)
    index += 1
    att = flat.take(index)
    att -= lower
    att *= weight
    att += lower
    return att


def simulate(anat, geo, shape, bvals, bvecs, *, dispersion=None) -> np.ndarray:
    """The noise-free series of a :class:`~.geometry.Geometry` (float32, ``shape + (N,)``).

    Args:
        anat (`Anatomy`): tissue properties (S0s, diffusivities, per-family fibre parameters).
        geo (`Geometry`): tissue fractions, bias field and fibre populations.
        shape (`tuple` of `int`): the grid.
        bvals (`np.ndarray` of shape `(N,)`), bvecs (`np.ndarray` of shape `(N, 3)`): the scheme.
        dispersion (`np.ndarray` of shape `(n_families, N, 513)`, *optional*):
            :func:`dispersion_tables` of the subject's families; `None` for
            straight fibres.
    """
    n = len(bvals)
    signal = np.zeros(shape + (n,), dtype=np.float32)
    flat = signal.reshape(-1, n)
    b = bvals.astype(np.float32)
    g = bvecs.astype(np.float32)
    iso_att = np.stack([anat.s0[t] * np.exp(-b * anat.diffusivity[t]) for t in ("gm", "csf", "scalp")])
    iso_coef = np.column_stack([geo.tissue[:, 1], geo.tissue[:, 2], geo.scalp]).astype(np.float32)
    s0 = (anat.s0_wm * geo.bias).astype(np.float32)
    wm_of_row = np.full(len(geo.head_flat), -1)
    wm_of_row[geo.wm_rows] = np.arange(len(geo.wm_rows))
    params = np.stack([anat.dpar, anat.fin, anat.dperp], axis=1).astype(np.float32)

    def chunk(start):
        rows = np.arange(start, min(start + _CHUNK, len(geo.head_flat)))
        out = iso_coef[rows] @ iso_att
        wm_idx = wm_of_row[rows]
        has_wm = wm_idx >= 0
        w = wm_idx[has_wm]
        wm_att = np.zeros((len(w), n), dtype=np.float32)
        for slot in range(3):
            on = geo.fractions[w, slot] > 0
            if not on.any():
                continue
            ws = w[on]
            att = _population(geo.peaks[ws, slot], geo.family[ws, slot], g, b, params, dispersion)
            att *= geo.fractions[ws, slot][:, None]
            wm_att[on] += att
        out[has_wm] += geo.tissue[rows[has_wm], 0][:, None].astype(np.float32) * wm_att
        flat[geo.head_flat[rows]] = out * s0[rows, None]

    with ThreadPoolExecutor(n_threads()) as pool:
        list(pool.map(chunk, range(0, len(geo.head_flat), _CHUNK)))
    return signal


def add_noise(signal, head_grid, sigma, seed, k0):
    """Rician noise: the magnitude of the signal plus complex Gaussian noise.

    The noise is drawn in polar form (exact, and cheaper than two normals):
    radius ``sigma * sqrt(2 E)`` with ``E`` standard exponential (Rayleigh),
    phase uniform. Voxels outside ``head_grid`` (no signal) get the radius
    alone. Axial slice ``k`` draws from ``default_rng([seed, 1, k0 + k])``.
    """
    if sigma == 0:
        return signal.copy()
    dwi = np.empty_like(signal)
    n = signal.shape[3]
    sigma2 = np.float32(2 * sigma**2)

    def one_slice(k):
        rng = np.random.default_rng([seed, 1, k0 + k])
        head = head_grid[:, :, k]
        out = np.empty(signal.shape[:2] + (n,), dtype=np.float32)
        s = signal[:, :, k][head]
        r = np.sqrt(sigma2 * rng.standard_exponential(s.shape, dtype=np.float32))
        cos = np.cos(np.float32(2 * np.pi) * rng.random(s.shape, dtype=np.float32))
        out[head] = np.sqrt(np.maximum(s * s + r * r + 2 * s * r * cos, 0.0))
        out[~head] = np.sqrt(sigma2 * rng.standard_exponential((int((~head).sum()), n), dtype=np.float32))
        dwi[:, :, k] = out

    with ThreadPoolExecutor(n_threads()) as pool:
        list(pool.map(one_slice, range(signal.shape[2])))
    return dwi


def tensor_fa(signal, mask, bvals, bvecs):
    """FA of an OLS tensor fit (the package's :func:`~qid2_diffusers.tensor.fit_tensor`) on b0 + lowest shell.

    OLS is exact enough on noise-free data and, unlike WLS, fast enough for a
    whole 1.25 mm brain; fitted in chunks of voxels to bound the memory.
    """
    from ...tensor import fit_tensor

    lowest = bvals[bvals > 0].min()
    keep = np.flatnonzero((bvals == 0) | (bvals == lowest))
    flat = signal.reshape(-1, signal.shape[3])
    voxels = np.flatnonzero(mask.reshape(-1))
    fa = np.zeros(mask.size, dtype=np.float32)

    def chunk(start):
        sel = voxels[start : start + 8 * _CHUNK]
        fa[sel] = fit_tensor(flat[sel][:, keep], bvals[keep], bvecs[keep], fit_method="OLS").fa

    with ThreadPoolExecutor(n_threads()) as pool:
        list(pool.map(chunk, range(0, len(voxels), 8 * _CHUNK)))
    return fa.reshape(mask.shape)
