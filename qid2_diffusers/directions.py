"""Q-space geometry: gradient directions on the antipodally symmetric sphere.

A diffusion signal measured along ``b`` equals the one measured along ``-b``,
so every function here treats a direction and its antipode as the same point.
This module is the single place where references are chosen for a target and
where acquired subsets are chosen from a scheme; training, inference,
evaluation and the demo all go through it.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np

__all__ = [
    "normalize_bvecs",
    "angular_distance",
    "nearest_references",
    "electrostatic_energy",
    "uniform_subset",
    "uniform_directions",
    "complement",
]


def normalize_bvecs(bvecs, *, allow_zero: bool = False) -> np.ndarray:
    """Return ``bvecs`` as an ``(N, 3)`` float64 array of unit vectors.

    Args:
        bvecs (`array-like` of shape `(N, 3)` or `(3,)`):
            Gradient directions, any non-zero length.
        allow_zero (`bool`, *optional*, defaults to `False`):
            Keep zero-length rows (b0 volumes) as zeros instead of raising.

    Raises:
        ValueError: on a wrong shape, NaN/Inf, or a zero-length vector when
            ``allow_zero`` is false.
    """
    arr = np.asarray(bvecs, dtype=np.float64)
    if arr.ndim == 1:
        arr = arr[None, :]
    if arr.ndim != 2 or arr.shape[1] != 3:
        raise ValueError(f"b-vectors must have shape (N, 3), got {arr.shape}")
    if not np.all(np.isfinite(arr)):
        raise ValueError("b-vectors contain NaN or Inf")
    norms = np.linalg.norm(arr, axis=1)
    zero = norms < 1e-8
    if np.any(zero) and not allow_zero:
        raise ValueError(f"b-vector {int(np.flatnonzero(zero)[0])} has zero length")
    out = np.zeros_like(arr)
    out[~zero] = arr[~zero] / norms[~zero, None]
    return out


def angular_distance(b1, b2) -> np.ndarray:
    """Antipodally symmetric angle ``arccos(|b1 . b2|)`` in radians, in ``[0, pi/2]``.

    Broadcasts like a matrix product: ``(N, 3)`` and ``(M, 3)`` give ``(N, M)``;
    single vectors give scalars.
    """
    u = normalize_bvecs(b1)
    v = normalize_bvecs(b2)
    d = np.arccos(np.clip(np.abs(u @ v.T), 0.0, 1.0))
    if np.ndim(b1) == 1 and np.ndim(b2) == 1:
        return d[0, 0]
    if np.ndim(b1) == 1:
        return d[0]
    if np.ndim(b2) == 1:
        return d[:, 0]
    return d


def nearest_references(target, acquired, R: int, *, return_distances: bool = False):
    """The ``R`` acquired directions closest to each target, nearest first.

    Distances are antipodally symmetric. Ties (equal distance to within
    1e-9 rad, as happens on symmetric schemes) are broken by the lower
    acquired index, so the choice never depends on floating-point noise.

    Args:
        target (`array-like` of shape `(3,)` or `(T, 3)`): target directions.
        acquired (`array-like` of shape `(N, 3)`): acquired directions.
        R (`int`): number of references, ``1 <= R <= N``.
        return_distances (`bool`, *optional*, defaults to `False`):
            also return the angles (radians) of the chosen references.

    Returns:
        `np.ndarray` of indices into ``acquired``, shape `(R,)` or `(T, R)`
        (and the matching distances if requested).
    """
    acquired = normalize_bvecs(acquired)
    single = np.ndim(target) == 1
    targets = normalize_bvecs(target)
    if not isinstance(R, (int, np.integer)) or R < 1:
        raise ValueError(f"R must be a positive integer, got {R!r}")
    if R > len(acquired):
        raise ValueError(f"R = {R} is larger than the {len(acquired)} acquired directions")
    dist = np.arccos(np.clip(np.abs(targets @ acquired.T), 0.0, 1.0))
    # Quantise before sorting so that ties are decided by index, not by rounding noise.
    keys = np.round(dist / 1e-9)
    idx = np.argsort(keys, axis=1, kind="stable")[:, :R]
    if single:
        idx = idx[0]
    if return_distances:
        d = np.take_along_axis(dist, np.atleast_2d(idx), axis=1)
        return idx, (d[0] if single else d)
    return idx


def _pair_potential(bvecs: np.ndarray) -> np.ndarray:
    u = normalize_bvecs(bvecs)
    diff = np.linalg.norm(u[:, None, :] - u[None, :, :], axis=-1)
    summ = np.linalg.norm(u[:, None, :] + u[None, :, :], axis=-1)
    eps = 1e-12
    pot = 1.0 / np.maximum(diff, eps) + 1.0 / np.maximum(summ, eps)
    np.fill_diagonal(pot, 0.0)
    return pot


def electrostatic_energy(bvecs) -> float:
    """Antipodally symmetric electrostatic energy ``sum_{i<j} 1/|bi-bj| + 1/|bi+bj|``."""
    return float(_pair_potential(np.asarray(bvecs)).sum() / 2.0)


def uniform_subset(bvecs, k: int) -> np.ndarray:
    """Choose ``k`` of the ``N`` directions that stay as uniform as possible.

    Minimises the antipodally symmetric electrostatic energy of the subset:
    greedy farthest-point construction from several deterministic starts,
    each refined by best-improvement swaps until no swap lowers the energy.

    Returns the sorted indices of the chosen directions (deterministic).
    """
    u = normalize_bvecs(bvecs)
    n = len(u)
    if not 1 <= k <= n:
        raise ValueError(f"cannot choose {k} of {n} directions")
    if k == n:
        return np.arange(n)
    pot = _pair_potential(u)
    best, best_energy = None, np.inf
    # A handful of starts costs milliseconds and avoids a poor local minimum.
    for start in range(min(n, 8)):
        chosen = np.zeros(n, dtype=bool)
        chosen[start] = True
        for _ in range(k - 1):
            added = pot[:, chosen].sum(axis=1)
            added[chosen] = np.inf
            chosen[int(np.argmin(added))] = True
        while True:
            load = pot @ chosen  # energy each point has with the current subset
            # delta[a, b]: energy change of swapping a (in) for b (out).
            delta = load[None, :] - pot - load[:, None]
            delta[~chosen, :] = np.inf
            delta[:, chosen] = np.inf
            a, b = np.unravel_index(int(np.argmin(delta)), delta.shape)
            if delta[a, b] >= -1e-10:
                break
            chosen[a], chosen[b] = False, True
        energy = float(pot[np.ix_(chosen, chosen)].sum() / 2.0)
        if energy < best_energy - 1e-12:
            best, best_energy = chosen.copy(), energy
    return np.flatnonzero(best)


@lru_cache(maxsize=16)
def _uniform_directions(n: int, seed: int) -> np.ndarray:
    from dipy.core.sphere import HemiSphere, disperse_charges

    rng = np.random.default_rng(seed)
    xyz = rng.normal(size=(n, 3))
    hemi = HemiSphere(xyz=xyz / np.linalg.norm(xyz, axis=1, keepdims=True))
    hemi, _ = disperse_charges(hemi, 5000)
    return np.ascontiguousarray(hemi.vertices)


def uniform_directions(n: int, *, seed: int = 0) -> np.ndarray:
    """A deterministic scheme of ``n`` directions spread uniformly over the half sphere.

    Electrostatic repulsion (dipy's ``disperse_charges``) from a seeded random
    start, as scanner vendors design their schemes; ``uniform_directions(90)``
    stands in for an HCP shell when no real scheme is at hand.
    """
    if n < 1:
        raise ValueError(f"n must be positive, got {n}")
    return _uniform_directions(int(n), int(seed)).copy()


def complement(scheme, acquired, *, tol_deg: float = 1.0) -> np.ndarray:
    """Indices of the ``scheme`` directions not present (up to sign) in ``acquired``.

    These are the target directions of an up-sampling job.
    """
    scheme = normalize_bvecs(scheme)
    acquired = normalize_bvecs(acquired)
    if len(acquired) == 0:
        return np.arange(len(scheme))
    d = np.degrees(np.arccos(np.clip(np.abs(scheme @ acquired.T), 0.0, 1.0)))
    return np.flatnonzero(d.min(axis=1) > tol_deg)
