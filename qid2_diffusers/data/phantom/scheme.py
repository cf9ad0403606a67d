"""The acquisition both simulators share: HCP-like shells and HCP's field of view."""

from __future__ import annotations

import os

import numpy as np
from scipy.spatial.transform import Rotation

from ...directions import uniform_directions

__all__ = ["HCP_FOV_MM", "HCP_CENTRE_MM", "hcp_scheme", "phantom_grid", "n_threads"]

#: Field of view (mm) of HCP's 1.25 mm diffusion grid, 145×174×145 voxels.
HCP_FOV_MM = (181.25, 217.5, 181.25)
#: World position (mm) of that grid's centre; every resolution keeps it.
HCP_CENTRE_MM = (0.0, -17.875, 18.0)


def n_threads() -> int:
    """CPU cores this process may use (threads for the chunked, GIL-free numpy work)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:
        return max(1, os.cpu_count() or 1)


def hcp_scheme(shells=(1000,), n_b0: int = 18, n_directions: int = 90, seed: int = 0):
    """An HCP-like acquisition scheme: interleaved b0 volumes and uniform shells.

    The b0 volumes are spread evenly through the series (every 6th volume for
    one shell of 90, volumes 0, 6, 12, ...). Diffusion-weighted volumes cycle
    through the shells (shell of slot ``m`` is ``m % len(shells)``), as HCP
    interleaves its shells. Shell ``i`` uses
    ``uniform_directions(n_directions, seed=seed)`` turned by a fixed rotation
    drawn from ``(seed, i)`` (none for ``i = 0``): every shell is equally
    uniform but points elsewhere, as HCP's shells do, and the costly charge
    dispersion runs once.

    Args:
        shells (`tuple` of `float`, *optional*, defaults to `(1000,)`): b-values (s/mm²).
        n_b0 (`int`, *optional*, defaults to 18): number of b0 volumes.
        n_directions (`int`, *optional*, defaults to 90): directions per shell.
        seed (`int`, *optional*, defaults to 0): seed of the direction set.

    Returns:
        `(bvals, bvecs)`: float64 arrays of shape `(N,)` and `(N, 3)`, with
        ``N = n_b0 + n_directions * len(shells)`` and zero b-vectors on b0 rows.
    """
    shells = tuple(float(b) for b in shells)
    if not shells or any(not np.isfinite(b) or b <= 0 for b in shells):
        raise ValueError(f"shells must be positive b-values, got {shells}")
    if n_b0 < 1 or n_directions < 1:
        raise ValueError(f"need at least one b0 and one direction, got n_b0={n_b0}, n_directions={n_directions}")
    base = uniform_directions(n_directions, seed=seed)
    n_dw = n_directions * len(shells)
    total = n_b0 + n_dw
    b0_at = np.round(np.arange(n_b0) * total / n_b0).astype(int)
    dw_at = np.setdiff1d(np.arange(total), b0_at)
    bvals = np.zeros(total)
    bvecs = np.zeros((total, 3))
    slots = np.arange(n_dw)
    for i, b in enumerate(shells):
        turn = np.eye(3) if i == 0 else Rotation.random(rng=np.random.default_rng([seed, i])).as_matrix()
        mine = slots % len(shells) == i
        bvals[dw_at[mine]] = b
        bvecs[dw_at[mine]] = base @ turn.T
    return bvals, bvecs


def phantom_grid(resolution: float = 2.5, fov=HCP_FOV_MM, centre=HCP_CENTRE_MM) -> tuple[tuple[int, int, int], np.ndarray]:
    """Shape and affine of a field of view (by default HCP's) sampled at ``resolution`` mm.

    1.25 mm gives HCP's own 145×174×145 grid and affine; 2.5 mm gives 72×87×72
    with the same centre; any other size gives the grid that fills the same
    field of view (a head of fixed physical size). The x zoom is negative, as
    in HCP.

    Args:
        resolution (`float`, *optional*, defaults to 2.5): isotropic voxel size (mm).
        fov (`tuple` of `float`, *optional*): field of view (mm), HCP's by default.
        centre (`tuple` of `float`, *optional*): world position (mm) of the grid's centre.
    """
    shape = tuple(int(np.floor(f / resolution + 1e-6)) for f in fov)
    affine = np.diag([-resolution, resolution, resolution, 1.0])
    affine[:3, 3] = np.array(centre) - affine[:3, :3] @ ((np.array(shape) - 1) / 2.0)
    return shape, affine
