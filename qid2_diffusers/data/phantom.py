"""Brain-like diffusion MRI phantoms with known truth, in the HCP layout.

There is no HCP data in this project, so these phantoms are what models are
trained and benchmarked on. Each subject is drawn from its seed:

- **Anatomy** (MNI-like template millimetres, then scaled, rotated and shifted
  per subject as a head would sit in the scanner): a cerebrum, cerebellum and
  brainstem; a folded cortical ribbon of grey matter whose sulci are CSF
  sheets running perpendicular to the surface; the interhemispheric fissure
  and the tentorium; lateral and third ventricles; thalamus, putamen and
  caudate; a subarachnoid CSF layer, skull (no signal) and scalp. Every
  boundary is partial-volumed over one voxel.
- **Fibres**: five bundle families, each a set of tubes around smooth centre
  curves — commissural (corpus callosum with its forceps, and the pontine
  fibres of the middle cerebellar peduncle; left–right), projection
  (corticospinal tract and corona radiata; inferior–superior), dorsal
  association (superior longitudinal fasciculus and arcuate;
  anterior–posterior), ventral association (fronto-occipital and
  longitudinal fasciculi) and the cingulum (an arc over the corpus callosum
  into the temporal lobe). White matter that no bundle reaches carries radial
  fibres (towards the cortex; along the brainstem axis in the brainstem),
  crossed within a few millimetres of the cerebral cortex by U-fibres that run
  along the surface across the nearest sulcus.
  A voxel's fibre direction within a family is the tangent of the nearest
  centre-curve point; where tubes of different families overlap, the voxel
  holds a 2- or 3-way crossing. The three largest populations are kept,
  those below :data:`MIN_FIBRE_FRACTION` dropped, and populations closer
  than :data:`MERGE_ANGLE_DEG` merged, so ``n_fibres`` counts crossings a
  fibre-orientation method could hope to resolve.
- **Signal** per voxel: white matter as a sum over its fibre populations of
  an intra-axonal stick and a tortuous extra-axonal zeppelin; isotropic grey
  matter, free-water CSF and scalp; tissue-dependent S0 (T2 contrast: CSF
  brightest on b0), a smooth receive-coil bias field, and Rician noise of
  standard deviation ``S0_wm / snr`` (background voxels hold pure Rayleigh
  noise, as a magnitude scanner image does).

The scheme mirrors an HCP shell (:func:`hcp_scheme`): 18 interleaved b0 and
90 uniform directions per shell on a 145×174×145 grid at 1.25 mm (72×87×72 at
2.5 mm) with HCP's affine, whose negative x zoom makes FSL b-vectors equal to
voxel-frame directions; ``bvecs`` and ``peaks`` are both in that frame.

Everything is deterministic per seed: the anatomy comes from
``default_rng([seed, 0])`` (the same at every resolution) and the noise of
axial slice ``k`` from ``default_rng([seed, 1, k])``, so a ``slab`` subject is
exactly the matching slices of the full one.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from scipy.spatial import cKDTree
from scipy.spatial.transform import Rotation

from ..directions import uniform_directions
from ..errors import QID2InputError

__all__ = [
    "PhantomSubject",
    "hcp_scheme",
    "phantom_grid",
    "make_subject",
    "subject_seed",
    "write_subject",
    "write_cohort",
    "load_truth",
    "FAMILIES",
    "MIN_FIBRE_FRACTION",
    "MERGE_ANGLE_DEG",
]

#: Field of view (mm) of HCP's 1.25 mm diffusion grid, 145×174×145 voxels.
HCP_FOV_MM = (181.25, 217.5, 181.25)
#: World position (mm) of that grid's centre; every resolution keeps it.
HCP_CENTRE_MM = (0.0, -17.875, 18.0)

#: Fibre families, in the order of their indices in a subject's parameters.
FAMILIES = ("commissural", "projection", "association", "ventral_association", "cingulum", "radial", "u_fibre")

#: Fibre populations smaller than this fraction of a voxel's white matter are
#: dropped (signal and truth alike) so that ``n_fibres`` counts real crossings.
MIN_FIBRE_FRACTION = 0.1
#: Populations closer than this angle (degrees) are merged into one.
MERGE_ANGLE_DEG = 30.0

_TRUTH_FILES = {
    "signal": "signal_noisefree.nii.gz",
    "fa": "fa.nii.gz",
    "peaks": "peaks.nii.gz",
    "peak_fractions": "peak_fractions.nii.gz",
    "n_fibres": "n_fibres.nii.gz",
    "tissue": "tissue.nii.gz",
}
_PARAMS_FILE = "phantom.json"
_DIFFUSION_DIR = Path("T1w") / "Diffusion"
# Voxels per chunk of the signal computation (8 chunks for the tensor fit):
# bounds the temporaries to ~7 MB per float32 array at 108 volumes.
_CHUNK = 16384
# Fibre directions average the tangents of this many nearest centre-curve
# points, weighted by a Gaussian of this width (mm) beyond the nearest one.
_NEIGHBOURS = 12
_BLEND_MM = 2.0


# ---------------------------------------------------------------------------
# Scheme and grid


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


def phantom_grid(resolution: float = 2.5) -> tuple[tuple[int, int, int], np.ndarray]:
    """Shape and affine of the HCP field of view sampled at ``resolution`` mm.

    1.25 mm gives HCP's own 145×174×145 grid and affine; 2.5 mm gives 72×87×72
    with the same centre. The x zoom is negative, as in HCP.
    """
    shape = tuple(int(np.floor(f / resolution + 1e-6)) for f in HCP_FOV_MM)
    affine = np.diag([-resolution, resolution, resolution, 1.0])
    affine[:3, 3] = np.array(HCP_CENTRE_MM) - affine[:3, :3] @ ((np.array(shape) - 1) / 2.0)
    return shape, affine


# ---------------------------------------------------------------------------
# The subject


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
        fa (`np.ndarray` of shape `(X, Y, Z)`, float32): FA of a tensor
            (:func:`~qid2_diffusers.tensor.fit_tensor`, dipy, OLS) fitted to the
            noise-free b0 and lowest shell inside the mask (0 outside).
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


def _n_threads() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:
        return max(1, os.cpu_count() or 1)


def _check_options(seed, resolution, snr, shells):
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise QID2InputError(None, f"seed must be a non-negative integer, got {seed!r}")
    if not np.isfinite(resolution) or not 0.5 <= resolution <= 5.0:
        raise QID2InputError(None, f"resolution must be between 0.5 and 5 mm, got {resolution!r}")
    if not snr > 0:
        raise QID2InputError(None, f"snr must be positive (inf for no noise), got {snr!r}")
    if not shells or any(not np.isfinite(b) or b < 100 or b > 20000 for b in shells):
        raise QID2InputError(None, f"shells must be b-values between 100 and 20000 s/mm², got {tuple(shells)}")
    if len(set(shells)) != len(shells):
        raise QID2InputError(None, f"shells must be distinct, got {tuple(shells)}")


def make_subject(seed: int, *, resolution: float = 2.5, snr: float = 25.0, shells=(1000,), slab: int | None = None):
    """Simulate one phantom subject.

    Args:
        seed (`int`): non-negative seed; the same seed gives the same subject.
        resolution (`float`, *optional*, defaults to 2.5): voxel size in mm
            (1.25 is HCP's grid).
        snr (`float`, *optional*, defaults to 25.0): white-matter b0 signal over
            the noise standard deviation; ``float("inf")`` gives no noise.
        shells (`tuple` of `float`, *optional*, defaults to `(1000,)`): b-values
            of the diffusion-weighted shells, 90 directions each.
        slab (`int`, *optional*): keep only this many central axial slices
            (the affine says where they are); `None` keeps the whole volume.

    Returns:
        :class:`PhantomSubject`.

    Example:

    ```py
    >>> subject = make_subject(0, slab=8)
    >>> subject.dwi.shape
    (72, 87, 8, 108)
    ```
    """
    shells = tuple(float(b) for b in shells)
    snr = float(snr)
    resolution = float(resolution)
    _check_options(seed, resolution, snr, shells)
    full_shape, affine = phantom_grid(resolution)
    if slab is not None and (isinstance(slab, bool) or not isinstance(slab, (int, np.integer)) or not 1 <= slab <= full_shape[2]):
        raise QID2InputError(None, f"slab must be between 1 and {full_shape[2]} axial slices, got {slab!r}")
    k0 = 0 if slab is None else (full_shape[2] - int(slab)) // 2
    shape = full_shape if slab is None else (full_shape[0], full_shape[1], int(slab))
    affine = affine.copy()
    affine[:3, 3] += affine[:3, 2] * k0

    bvals, bvecs = hcp_scheme(shells)
    anat = _draw_anatomy(np.random.default_rng([int(seed), 0]))
    geo = _geometry(anat, shape, affine, resolution)
    signal = _simulate(anat, geo, shape, bvals, bvecs)
    sigma = 0.0 if np.isinf(snr) else anat.s0_wm / snr
    dwi = _add_noise(signal, geo.head_grid, sigma, int(seed), k0)
    fa = _tensor_fa(signal, geo.mask_grid, bvals, bvecs)

    def scatter(values, fill_shape, dtype):
        out = np.zeros(shape + fill_shape, dtype=dtype)
        out.reshape((-1,) + fill_shape)[geo.head_flat] = values
        return out

    peaks_vox = np.zeros((len(geo.head_flat), 3, 3), dtype=np.float32)
    fractions = np.zeros((len(geo.head_flat), 3), dtype=np.float32)
    peaks_vox[geo.wm_rows] = geo.peaks
    fractions[geo.wm_rows] = geo.fractions
    n_fibres = (fractions > 0).sum(axis=1).astype(np.uint8)
    params = dict(anat.params, sigma=sigma, snr=snr, shells=list(shells), resolution=resolution, seed=int(seed))
    return PhantomSubject(
        dwi=dwi,
        bvals=bvals,
        bvecs=bvecs,
        affine=affine,
        mask=geo.mask_grid,
        signal=signal,
        fa=fa,
        peaks=scatter(peaks_vox, (3, 3), np.float32),
        peak_fractions=scatter(fractions, (3,), np.float32),
        n_fibres=scatter(n_fibres, (), np.uint8),
        tissue=scatter(geo.tissue.astype(np.float32), (3,), np.float32),
        seed=int(seed),
        resolution=resolution,
        snr=snr,
        sigma=float(sigma),
        params=params,
    )


# ---------------------------------------------------------------------------
# Anatomy: drawn parameters (template space, MNI-like mm)


@dataclass
class _Bundle:
    points: np.ndarray  # (P, 3) centre-curve samples
    tangents: np.ndarray  # (P, 3) unit tangents
    radius: float | np.ndarray  # mm, scalar or one per point


@dataclass
class _Anatomy:
    centre: np.ndarray
    scale: np.ndarray
    rotation: np.ndarray
    shift: np.ndarray
    cerebrum_semi: np.ndarray
    shape_k: np.ndarray
    shape_phase: np.ndarray
    shape_amp: float
    fold: tuple  # (k, phase) of the sulcal wave field
    warp: tuple  # (k, phase, amplitude) of the displacement that makes sulci wander
    fold_depth: tuple  # (k, phase, mean, spread) of the sulcal depth field
    folia: tuple  # (k, phase, depth) of the cerebellar folia
    sulcal_halfwidth: float
    cerebellum: tuple  # (centre, semi)
    brainstem: tuple  # (top, bottom, radius, pons radius, pons position)
    fissure: tuple  # (amplitude, wavenumber, phase, halfwidth)
    callosum: tuple  # (y_splenium, y_genu, z_ends, arch, radius)
    tentorium_halfwidth: float
    cortex: float
    cerebellar_cortex: float
    csf_layer: float
    skull: float
    scalp: float
    ventricles: tuple  # (points, radii)
    deep_gm: list  # [(centre, semi)]
    bundles: list  # per family: list of _Bundle
    u_fibre_depth: float  # U-fibres fade out this deep (mm) below the cortex
    dpar: np.ndarray  # per entry of FAMILIES, mm²/s
    fin: np.ndarray
    dperp: np.ndarray
    density: np.ndarray
    s0_wm: float
    s0: dict  # relative S0 of gm, csf, scalp
    diffusivity: dict  # gm, csf, scalp
    bias: np.ndarray
    params: dict


def _catmull_rom(waypoints, step: float = 0.75) -> tuple[np.ndarray, np.ndarray]:
    """Sample a smooth curve through ``waypoints`` every ~``step`` mm, with unit tangents."""
    p = np.asarray(waypoints, dtype=np.float64)
    ext = np.vstack([2 * p[0] - p[1], p, 2 * p[-1] - p[-2]])
    pts, tans = [], []
    for i in range(len(p) - 1):
        p0, p1, p2, p3 = ext[i : i + 4]
        n = max(2, int(np.ceil(np.linalg.norm(p2 - p1) / step)))
        t = (np.arange(n) / n)[:, None]
        a, b, c = -p0 + p2, 2 * p0 - 5 * p1 + 4 * p2 - p3, -p0 + 3 * p1 - 3 * p2 + p3
        pts.append(0.5 * (2 * p1 + a * t + b * t**2 + c * t**3))
        tans.append(0.5 * (a + 2 * b * t + 3 * c * t**2))
    pts.append(p[-1:])
    tans.append(0.5 * (ext[-1:] - ext[-3:-2]))
    pts, tans = np.vstack(pts), np.vstack(tans)
    return pts, tans / np.linalg.norm(tans, axis=1, keepdims=True)


def _random_waves(rng, n: int, wavelength: tuple[float, float]):
    k = rng.normal(size=(n, 3))
    k *= (2 * np.pi / rng.uniform(*wavelength, size=n) / np.linalg.norm(k, axis=1))[:, None]
    return k, rng.uniform(0, 2 * np.pi, size=n)


def _draw_anatomy(rng: np.random.Generator) -> _Anatomy:
    """Draw one subject's anatomy, fibres and tissue properties (fixed draw order)."""
    centre = np.array([0.0, -18.0, 16.0])
    size = rng.uniform(0.92, 1.08)
    scale = size * rng.uniform(0.96, 1.04, size=3)
    rotation = Rotation.from_euler("xyz", rng.normal(0.0, [4.0, 2.0, 2.0]), degrees=True).as_matrix()
    shift = rng.normal(0.0, 2.0, size=3)
    atrophy = rng.uniform(0.0, 1.0)

    def jitter(pts, sd=2.0):
        return np.asarray(pts, dtype=np.float64) + rng.normal(0.0, sd, size=np.shape(pts))

    # Callosum first: the fissure floor, cingulum and ventricles are placed against it.
    y_spl, y_genu = -40.0 + rng.normal(0, 2), 30.0 + rng.normal(0, 2)
    z_ends, arch = 11.0 + rng.normal(0, 1.5), 9.0 + rng.normal(0, 1.5)
    r_cc = 4.0 * rng.uniform(0.85, 1.2)
    y_mid, half = (y_spl + y_genu) / 2, (y_genu - y_spl) / 2

    def z_cc(y):
        return z_ends + arch * (1 - ((y - y_mid) / half) ** 2)

    def family_radius(base):
        return base * rng.uniform(0.8, 1.25)

    bundles = []
    # Commissural: the callosum crosses the midline flat, then its radiations
    # fan out in each hemisphere from nearly horizontal to nearly vertical.
    reach, fan = rng.uniform(45, 55), rng.uniform(0.5, 0.9)
    fam = []
    # Curves close enough (< 2 (radius - 1) mm apart) to merge into one sheet;
    # the tubes thicken as the radiations spread, so the sheet stays whole.
    for y_k in np.linspace(y_spl + 3, y_genu - 3, int(np.ceil((y_genu - y_spl - 6) / (2 * (r_cc - 1.0)))) + 1):
        for angle in np.radians([5, 17, 30, 43, 56, 68, 80]):
            out = np.array([[10.0, 0.0], [10 + 0.5 * reach * np.cos(angle), 0.4 * reach * np.sin(angle)],
                            [10 + reach * np.cos(angle), reach * np.sin(angle)]])
            xz = np.vstack([out[::-1] * [-1, 1], [[0.0, 0.0]], out])
            way = np.column_stack([xz[:, 0], y_mid + (y_k - y_mid) * (1 + fan * (xz[:, 0] / reach) ** 2), z_cc(y_k) + xz[:, 1]])
            way[:, 1:] = jitter(way[:, 1:], 1.0)
            pts, tans = _catmull_rom(way)
            fam.append(_Bundle(pts, tans, r_cc * (1 + 0.8 * np.minimum(np.abs(pts[:, 0]) / reach, 1.0) ** 2)))
    # Forceps minor and major: U-shaped sheets from the genu and splenium to the poles.
    for y_end, sign in ((y_genu, 1.0), (y_spl, -1.0)):
        for spread in (14.0, 24.0, 34.0):
            for dz in (-8.0, 0.0, 8.0):
                out = np.array([[spread * 0.5, 5.0], [spread, 18.0], [spread * 1.05, 40.0]])
                xy = np.vstack([out[::-1] * [-1, 1], [[0.0, 0.0]], out])
                way = np.column_stack([xy[:, 0], y_end + sign * xy[:, 1], z_ends + dz * np.minimum(np.abs(xy[:, 0]) / 10, 1)])
                fam.append(_Bundle(*_catmull_rom(jitter(way, 1.0)), r_cc))
    pons = np.array([[-38, -62, -38], [-24, -46, -33], [-10, -34, -30], [0, -31, -30], [10, -34, -30], [24, -46, -33], [38, -62, -38]], float)
    radius = family_radius(4.0)
    fam += [_Bundle(*_catmull_rom(jitter(pons + [0, 0, dz])), radius) for dz in (0.0, -6.0)]
    bundles.append(fam)

    # Projection: per hemisphere a fan from the brainstem through the internal capsule.
    radius = family_radius(6.5)
    fam = []
    for s in (-1, 1):
        for fx in np.linspace(2, 36, 4):
            for fy in np.linspace(-40, 36, 7):
                way = [[5, -38, -75], [7, -31, -45], [12, -22, -15], [18.5, -12 + 0.45 * fy, 5],
                       [21 + 0.4 * fx, -12 + 0.65 * fy, 26], [22 + 0.8 * fx, -12 + 0.9 * fy, 45], [22 + fx, -12 + fy, 62]]
                way = jitter(way, 1.5) * [s, 1, 1]
                fam.append(_Bundle(*_catmull_rom(way), radius))
        # Thalamic radiations: anterior (to the frontal pole) and optic (to the occipital pole).
        for dz in (-6, 0, 6):
            way = [[10, -14, 4], [15, 2, 6 + dz], [20, 22, 8 + dz], [22, 45, 6 + dz], [20, 62, 2 + dz]]
            fam.append(_Bundle(*_catmull_rom(jitter(way) * [s, 1, 1]), radius))
            way = [[20, -26, -2], [30, -32, 0 + dz / 2], [32, -52, 4 + dz], [28, -72, 6 + dz], [18, -92, 6 + dz]]
            fam.append(_Bundle(*_catmull_rom(jitter(way) * [s, 1, 1]), radius))
    bundles.append(fam)

    # Dorsal association: superior longitudinal fasciculus hooking into the arcuate.
    radius = family_radius(5.0)
    fam = []
    for s in (-1, 1):
        for dx, dz in ((-4, 16), (0, 10), (3, 3), (6, -4), (9, -11), (-6, 4)):
            way = [[28 + dx, 32, 26 + dz], [32 + dx, 8, 29 + dz], [34 + dx, -20, 29 + dz], [36 + dx, -42, 22 + dz],
                   [40 + dx, -50, 6 + dz], [44 + dx, -38, -8 + dz], [46 + dx, -20, -14 + dz]]
            fam.append(_Bundle(*_catmull_rom(jitter(way) * [s, 1, 1]), radius))
    bundles.append(fam)

    # Ventral association: fronto-occipital / inferior longitudinal fasciculi through the temporal stem.
    radius = family_radius(4.5)
    fam = []
    for s in (-1, 1):
        for dx, dz in ((-6, 10), (-3, 5), (0, 0), (4, -6), (8, 2)):
            way = [[22 + dx, 48, -2 + dz], [28 + dx, 25, -6 + dz], [33 + dx, 2, -10 + dz], [37 + dx, -25, -8 + dz],
                   [38 + dx, -55, -2 + dz], [30 + dx, -85, 4 + dz]]
            fam.append(_Bundle(*_catmull_rom(jitter(way) * [s, 1, 1]), radius))
    bundles.append(fam)

    # Cingulum: an arc just above the callosum, down into the parahippocampal gyrus.
    radius = family_radius(3.5)
    above = r_cc + radius + 1.0
    fam = []
    for s in (-1, 1):
        way = [[7, y_genu + 2, -6], [7, y_genu + 10, 14], [7, y_genu - 8, z_cc(y_genu - 8) + above], [7, y_mid, z_cc(y_mid) + above],
               [7, y_spl + 2, z_cc(y_spl + 2) + above], [9, y_spl - 10, 6], [18, y_spl, -12], [25, y_spl + 18, -20]]
        fam.append(_Bundle(*_catmull_rom(jitter(way, 1.0) * [s, 1, 1]), radius))
    bundles.append(fam)

    n_fam = len(bundles) + 2  # and the radial and U-fibre fill
    dpar = rng.uniform(1.6e-3, 1.9e-3, size=n_fam)
    fin = rng.uniform(0.45, 0.62, size=n_fam)
    fin[0] = rng.uniform(0.5, 0.65)
    fin[-2:] = rng.uniform(0.4, 0.5, size=2)
    # Beyond tortuosity, extra perpendicular diffusivity stands in for dispersion;
    # the fibres that fill between bundles are the least coherent.
    dperp = dpar * (1 - fin) * rng.uniform(1.0, 1.2, size=n_fam)
    dperp[-2:] = dpar[-2:] * (1 - fin[-2:]) * rng.uniform(1.1, 1.3, size=2)
    density = rng.uniform(0.6, 1.0, size=n_fam)

    # Ventricles grow and sulci widen with atrophy.
    vscale = 0.8 + 0.7 * atrophy
    vent_pts, vent_r = [], []
    for s in (-1, 1):
        way = np.array([[8, y_genu - 4, 8], [8, y_genu - 15, 11], [8.5, y_mid, 11], [11, y_spl + 15, 11],
                        [18, y_spl + 3, 9], [26, y_spl + 5, -4], [30, -20, -14], [30, -5, -20]], float)
        radii = np.array([4.5, 5.5, 5.0, 5.5, 6.0, 4.5, 3.5, 3.0]) * vscale
        way[:4, 0] = 2.0 + radii[:4]  # the septum stays between the two ventricles
        pts, _ = _catmull_rom(jitter(way, 1.0) * [s, 1, 1], step=0.5)
        arc = np.r_[0, np.cumsum(np.linalg.norm(np.diff(way, axis=0), axis=1))]
        along = np.r_[0, np.cumsum(np.linalg.norm(np.diff(pts, axis=0), axis=1))]
        vent_pts.append(pts)
        vent_r.append(np.interp(along / along[-1] * arc[-1], arc, radii))
    for z in (-6.0, -1.0, 4.0):  # third ventricle: a thin midline sheet
        pts, _ = _catmull_rom([[0, 2, z - 2], [0, -10, z + 2], [0, -22, z + 3]], step=0.5)
        vent_pts.append(pts)
        vent_r.append(np.full(len(pts), 1.4 * vscale))
    ventricles = (np.vstack(vent_pts), np.concatenate(vent_r))

    deep_gm = []
    for c, semi in (([10, -18, 6], [6, 12, 8]), ([26, 2, 1], [5, 14, 9]), ([13, 13, 10], [4.5, 8, 8])):
        for s in (-1, 1):
            deep_gm.append((jitter(c, 1.0) * [s, 1, 1], np.asarray(semi, float) * rng.uniform(0.9, 1.1, size=3)))

    fold_k, fold_phase = _random_waves(rng, 24, (10.0, 15.0))
    warp_k, warp_phase = _random_waves(rng, 12, (18.0, 30.0))
    depth_k, depth_phase = _random_waves(rng, 8, (50.0, 90.0))
    folia_k, folia_phase = _random_waves(rng, 16, (7.0, 10.0))
    shape_k = rng.normal(0.0, 2.5, size=(6, 3))
    shape_phase = rng.uniform(0, 2 * np.pi, size=6)

    s0 = {"gm": rng.uniform(1.2, 1.45), "csf": rng.uniform(2.4, 3.2), "scalp": rng.uniform(0.4, 0.8)}
    diffusivity = {"gm": rng.uniform(0.7e-3, 0.9e-3), "csf": rng.uniform(2.9e-3, 3.1e-3), "scalp": rng.uniform(1.0e-3, 1.4e-3)}
    s0_wm = rng.uniform(800.0, 1200.0)
    bias = rng.normal(0.0, [0.08, 0.08, 0.08, 0.04, 0.04, 0.04, 0.03, 0.03, 0.03])

    anat = _Anatomy(
        centre=centre,
        scale=scale,
        rotation=rotation,
        shift=shift,
        cerebrum_semi=np.array([68.0, 86.0, 60.0]),
        shape_k=shape_k,
        shape_phase=shape_phase,
        shape_amp=0.02,
        fold=(fold_k, fold_phase),
        warp=(warp_k.reshape(3, 4, 3), warp_phase.reshape(3, 4), rng.uniform(3.0, 5.0)),
        fold_depth=(depth_k, depth_phase, rng.uniform(12.0, 16.0), rng.uniform(4.0, 7.0)),
        folia=(folia_k, folia_phase, rng.uniform(4.0, 7.0)),
        sulcal_halfwidth=0.4 + 0.8 * atrophy,
        cerebellum=(jitter([0, -62, -33], 1.5), np.array([50.0, 32.0, 21.0]) * rng.uniform(0.92, 1.08, size=3)),
        brainstem=(np.array([0, -24, -8.0]), np.array([0, -42, -95.0]), rng.uniform(9.5, 11.5), rng.uniform(2.5, 4.0), 0.3),
        fissure=(rng.uniform(0.5, 2.0), 2 * np.pi / rng.uniform(40, 80), rng.uniform(0, 2 * np.pi), 0.8 + 0.8 * atrophy),
        callosum=(y_spl, y_genu, z_ends, arch, r_cc),
        tentorium_halfwidth=0.8 + 0.5 * atrophy,
        cortex=rng.uniform(2.4, 3.0),
        cerebellar_cortex=rng.uniform(5.0, 7.0),
        csf_layer=1.0 + 2.0 * atrophy,
        skull=rng.uniform(4.0, 7.0),
        scalp=rng.uniform(4.0, 7.0),
        ventricles=ventricles,
        deep_gm=deep_gm,
        bundles=bundles,
        u_fibre_depth=rng.uniform(5.0, 9.0),
        dpar=dpar,
        fin=fin,
        dperp=dperp,
        density=density,
        s0_wm=s0_wm,
        s0=s0,
        diffusivity=diffusivity,
        bias=bias,
        params={},
    )
    anat.params = {
        "s0_wm": s0_wm,
        "s0_relative": s0,
        "diffusivity": diffusivity,
        "families": {
            name: {"d_par": dpar[i], "intra_fraction": fin[i], "d_perp_extra": dperp[i], "density": density[i]}
            for i, name in enumerate(FAMILIES)
        },
        "atrophy": atrophy,
        "brain_scale": scale.tolist(),
        "head_rotation_deg": Rotation.from_matrix(rotation).as_euler("xyz", degrees=True).tolist(),
        "head_shift_mm": shift.tolist(),
        "cortex_thickness_mm": anat.cortex,
        "min_fibre_fraction": MIN_FIBRE_FRACTION,
        "merge_angle_deg": MERGE_ANGLE_DEG,
    }
    anat.params = json.loads(json.dumps(anat.params, default=float))
    return anat


# ---------------------------------------------------------------------------
# Anatomy: evaluated on the voxel grid


def _f32(x):
    # numpy's float32 sin/cos are vectorised (SIMD), its float64 ones ~20x slower;
    # single precision is ample for phases of a few hundred radians.
    return np.asarray(x, dtype=np.float32)


def _ramp(x, width):
    """Partial-volume fraction of a voxel of size ``width`` whose centre is ``x`` mm inside a boundary."""
    return np.clip(x / width + 0.5, 0.0, 1.0)


def _smoothstep(x):
    x = np.clip(x, 0.0, 1.0)
    return x * x * (3 - 2 * x)


def _ellipsoid_depth(m, centre, semi):
    """Signed depth (mm, > 0 inside), normalised radius and outward unit normal of an ellipsoid."""
    v = (m - centre) / semi
    rho = np.maximum(np.sqrt((v * v).sum(axis=1)), 1e-9)
    grad = v / semi / rho[:, None]
    gnorm = np.maximum(np.linalg.norm(grad, axis=1), 1e-12)
    return (1 - rho) / gnorm, rho, grad / gnorm[:, None]


def _cerebrum_depth(anat, m):
    """Signed depth (mm) below a lobed ellipsoid: its radius swells by a few per cent along some rays."""
    v = (m - anat.centre) / anat.cerebrum_semi
    rho = np.maximum(np.sqrt((v * v).sum(axis=1)), 1e-9)
    gnorm = np.maximum(np.linalg.norm(v / anat.cerebrum_semi / rho[:, None], axis=1), 1e-12)
    bulge = 1 + anat.shape_amp * np.cos(_f32((v / rho[:, None]) @ anat.shape_k.T + anat.shape_phase)).sum(axis=1, dtype=np.float64)
    return (bulge - rho) / gnorm


def _brainstem_depth(anat, m):
    top, bottom, r0, r_pons, t_pons = anat.brainstem
    axis = bottom - top
    t = np.clip(((m - top) @ axis) / (axis @ axis), 0.0, 1.0)
    dist = np.linalg.norm(m - (top + t[:, None] * axis), axis=1)
    radius = r0 + r_pons * np.exp(-(((t - t_pons) / 0.12) ** 2))
    return radius - dist


def _envelope(anat, m):
    d_cer = _cerebrum_depth(anat, m)
    d_cb = _ellipsoid_depth(m, *anat.cerebellum)[0]
    d_bs = _brainstem_depth(anat, m)
    return d_cer, d_cb, d_bs


def _surface_waves(q, k, phase, normal):
    """A sum of plane waves at ``q`` and its gradient along the surface of unit ``normal``."""
    k32 = _f32(k)
    arg = _f32(q) @ k32.T + _f32(phase)
    g = np.cos(arg).sum(axis=1, dtype=np.float64)
    grad = -(np.sin(arg) @ k32).astype(np.float64)
    grad -= (grad * normal).sum(axis=1, keepdims=True) * normal
    return g, grad


def _sheet_distance(q, k, phase, normal, stretch):
    """Distance (mm) to the zero set of a wave field, measured along the surface of unit ``normal``.

    The field is evaluated at ``q`` (points projected onto a surface), so its
    zero set is a set of sheets perpendicular to that surface: sulci.
    ``stretch`` converts surface millimetres to millimetres at the voxel.
    """
    g, grad = _surface_waves(q, k, phase, normal)
    return np.minimum(stretch * np.abs(g) / np.maximum(np.linalg.norm(grad, axis=1), 1e-6), 50.0)


def _warp(anat, m):
    k, phase, amplitude = anat.warp
    arg = _f32(m) @ _f32(k.reshape(-1, 3)).T + _f32(phase.reshape(-1))
    return m + amplitude / 2.0 * np.sin(arg).reshape(len(m), 3, -1).sum(axis=2, dtype=np.float64)


def _pial_distance(sheet, halfwidth, depth, sulcal_depth):
    """Distance from tissue to the CSF of sulci that reach ``sulcal_depth`` below the surface."""
    lateral = sheet - halfwidth
    below = depth - sulcal_depth
    return np.where(below <= 0, lateral, np.hypot(np.maximum(lateral, 0.0), below))


@dataclass
class _Geometry:
    head_flat: np.ndarray  # flat indices of voxels with any signal
    head_grid: np.ndarray  # (X, Y, Z) bool
    mask_grid: np.ndarray  # (X, Y, Z) bool brain mask
    tissue: np.ndarray  # (H, 3) wm, gm, csf
    scalp: np.ndarray  # (H,)
    bias: np.ndarray  # (H,)
    wm_rows: np.ndarray  # rows of head voxels holding white matter
    peaks: np.ndarray  # (W, 3, 3) voxel-frame directions
    fractions: np.ndarray  # (W, 3)
    family: np.ndarray  # (W, 3) family index of each population


def _to_template(anat, world):
    return anat.centre + ((world - anat.centre - anat.shift) @ anat.rotation) / anat.scale


def _geometry(anat: _Anatomy, shape, affine, resolution) -> _Geometry:
    outer = anat.csf_layer + anat.skull + anat.scalp + resolution
    head_flat, env = [], []
    ij = np.stack(np.meshgrid(np.arange(shape[0]), np.arange(shape[1]), indexing="ij"), axis=-1).reshape(-1, 2)
    # Slab by slab over k so the whole-grid pass stays small at 1.25 mm.
    for k in range(shape[2]):
        ijk = np.column_stack([ij, np.full(len(ij), k)]).astype(np.float64)
        m = _to_template(anat, ijk @ affine[:3, :3].T + affine[:3, 3])
        d_cer, d_cb, d_bs = _envelope(anat, m)
        keep = np.maximum(np.maximum(d_cer, d_cb), d_bs) > -outer
        head_flat.append((ij[keep, 0] * shape[1] + ij[keep, 1]) * shape[2] + k)
        env.append(np.column_stack([m[keep], d_cer[keep], d_cb[keep], d_bs[keep]]))
    order = np.argsort(np.concatenate(head_flat), kind="stable")
    head_flat = np.concatenate(head_flat)[order]
    env = np.vstack(env)[order]
    m, d_cer, d_cb, d_bs = env[:, :3], env[:, 3], env[:, 4], env[:, 5]
    d_env = np.maximum(np.maximum(d_cer, d_cb), d_bs)

    in_bs = d_bs >= np.maximum(d_cer, d_cb)
    in_cb = ~in_bs & (d_cb > 0)
    in_cer = ~in_bs & ~in_cb

    pial = np.empty(len(m))
    thickness = np.empty(len(m))
    pial[in_bs] = d_bs[in_bs]
    thickness[in_bs] = 0.0

    # Cerebral cortex: sulci off the outer surface and off the medial wall of
    # the interhemispheric fissure, the fissure itself and the tentorium.
    c = in_cer
    mc = m[c]
    dk, dphase, dmean, dspread = anat.fold_depth
    amp, wavenumber, phase, halfwidth = anat.fissure
    y_spl, y_genu, z_ends, arch, r_cc = anat.callosum
    y_mid, half = (y_spl + y_genu) / 2, (y_genu - y_spl) / 2
    # The fissure reaches down to the callosum; beyond its ends the floor drops
    # steeply (but smoothly) to the base, separating frontal and occipital poles.
    beyond = np.maximum(np.abs(mc[:, 1] - y_mid) - half, 0.0)
    floor = z_ends + arch * (1 - np.clip((mc[:, 1] - y_mid) / half, -1, 1) ** 2) + r_cc + 2.0 - 0.6 * beyond**2
    x_mid = amp * np.sin(wavenumber * mc[:, 1] + phase)
    midline = np.abs(mc[:, 0] - x_mid)
    p = np.minimum(d_cer[c], _pial_distance(midline, halfwidth, floor - mc[:, 2], 0.0))
    # Sulci matter only where they can reach: near the outer surface and the medial wall.
    reach = dmean + dspread + anat.cortex + resolution + 1.0
    outer = d_cer[c] < reach
    medial = (midline < 0.6 * reach + halfwidth) & (mc[:, 2] > floor + 4.0)
    near = np.flatnonzero(outer | medial)
    warped = _warp(anat, mc[near])
    _, rho, normal = _ellipsoid_depth(warped, anat.centre, anat.cerebrum_semi)
    q = anat.centre + (warped - anat.centre) / rho[:, None]
    sulcal_depth = dmean + dspread * np.tanh(np.cos(_f32(q @ dk.T + dphase)).sum(axis=1, dtype=np.float64) / 2.0)
    o = outer[near]
    sheet = _sheet_distance(q[o], *anat.fold, normal[o], rho[o])
    p[near[o]] = np.minimum(p[near[o]], _pial_distance(sheet, anat.sulcal_halfwidth, d_cer[c][near[o]], sulcal_depth[o]))
    md = medial[near]
    side = np.sign(mc[near[md], 0] - x_mid[near[md]])
    medial_q = np.column_stack([side * 40.0, warped[md, 1], warped[md, 2]])
    medial_sheet = _sheet_distance(medial_q, *anat.fold, np.array([[1.0, 0.0, 0.0]]), 1.0)
    wall = midline[near[md]] - halfwidth
    p[near[md]] = np.minimum(p[near[md]], _pial_distance(medial_sheet, anat.sulcal_halfwidth, wall, 0.6 * sulcal_depth[md]))
    p = np.minimum(p, -d_cb[c] - anat.tentorium_halfwidth)
    pial[c] = p
    thickness[c] = anat.cortex

    # Cerebellar cortex: fine folia.
    c = in_cb
    centre_cb, semi_cb = anat.cerebellum
    _, rho, normal = _ellipsoid_depth(m[c], centre_cb, semi_cb)
    k, phase, depth = anat.folia
    sheet = _sheet_distance(centre_cb + (m[c] - centre_cb) / rho[:, None], k, phase, normal, rho)
    pial[c] = np.minimum(d_cb[c], _pial_distance(sheet, 0.3, d_cb[c], depth))
    thickness[c] = anat.cerebellar_cortex

    inside = _ramp(d_env + anat.csf_layer, resolution)
    tissue_frac = _ramp(pial, resolution)
    wm = _ramp(pial - thickness, resolution)
    gm = tissue_frac - wm
    csf = inside - tissue_frac
    vent_pts, vent_r = anat.ventricles
    dist, idx = cKDTree(vent_pts).query(m, distance_upper_bound=vent_r.max() + resolution, workers=_n_threads())
    hit = np.isfinite(dist)
    vent = np.zeros(len(m))
    vent[hit] = _ramp(vent_r[idx[hit]] - dist[hit], resolution)
    nuclei = np.zeros(len(m))
    for centre, semi in anat.deep_gm:
        near = np.flatnonzero(np.all(np.abs(m - centre) < semi + resolution, axis=1))
        nuclei[near] = np.maximum(nuclei[near], _ramp(_ellipsoid_depth(m[near], centre, semi)[0], resolution))
    csf = csf + (wm + gm) * vent
    gm = (gm + wm * nuclei) * (1 - vent)
    wm = wm * (1 - nuclei) * (1 - vent)
    scalp = _ramp(d_env + anat.csf_layer + anat.skull + anat.scalp, resolution) - _ramp(d_env + anat.csf_layer + anat.skull, resolution)
    tissue = np.column_stack([wm, gm, csf])

    keep = (inside > 0) | (scalp > 0)
    head_flat, m, tissue, scalp = head_flat[keep], m[keep], tissue[keep], scalp[keep]
    d_env, in_bs, in_cb = d_env[keep], in_bs[keep], in_cb[keep]
    wm_depth = (pial - thickness)[keep]
    head_grid = np.zeros(shape, dtype=bool)
    head_grid.reshape(-1)[head_flat] = True
    mask_grid = np.zeros(shape, dtype=bool)
    mask_grid.reshape(-1)[head_flat[d_env > -anat.csf_layer]] = True

    world = (m - anat.centre) * anat.scale @ anat.rotation.T + anat.centre + anat.shift
    r = (world - np.array(HCP_CENTRE_MM)) / 100.0
    terms = np.column_stack([r, r**2, r[:, [0]] * r[:, [1]], r[:, [1]] * r[:, [2]], r[:, [0]] * r[:, [2]]])
    bias = np.exp(terms @ anat.bias)

    wm_rows = np.flatnonzero(tissue[:, 0] > 0)
    peaks, fractions, family = _fibres(anat, m[wm_rows], in_bs[wm_rows], in_cb[wm_rows], wm_depth[wm_rows], affine)
    return _Geometry(head_flat, head_grid, mask_grid, tissue, scalp, bias, wm_rows, peaks, fractions, family)


def _fibres(anat, m, in_bs, in_cb, wm_depth, affine):
    """Fibre populations of white-matter voxels: directions (voxel frame), fractions, families."""
    n_fam = len(anat.bundles) + 2
    weight = np.zeros((len(m), n_fam))
    tangent = np.zeros((len(m), n_fam, 3))
    for f, family in enumerate(anat.bundles):
        points = np.vstack([b.points for b in family])
        tangents = np.vstack([b.tangents for b in family])
        radii = np.concatenate([np.broadcast_to(b.radius, len(b.points)) for b in family])
        edge = 1.5
        dist, idx = cKDTree(points).query(m, k=_NEIGHBOURS, distance_upper_bound=radii.max() + edge, workers=_n_threads())
        hit = np.isfinite(dist[:, 0])
        dist, idx = dist[hit], idx[hit]
        weight[hit, f] = _smoothstep((radii[idx[:, 0]] + edge - dist[:, 0]) / (2 * edge))
        # Blend the tangents of the nearest curve points, so that the direction
        # turns smoothly between neighbouring curves of a fanning family.
        near = np.isfinite(dist)
        t = np.zeros(idx.shape + (3,))
        t[near] = tangents[idx[near]]
        blend = np.where(near, np.exp(-(np.square(np.where(near, dist, 0.0)) - dist[:, :1] ** 2) / (2 * _BLEND_MM**2)), 0.0)
        blend *= np.sign((t * t[:, :1]).sum(axis=2))
        mean = (blend[:, :, None] * t).sum(axis=1)
        tangent[hit, f] = mean / np.linalg.norm(mean, axis=1, keepdims=True)
    # Radial fibres fill what the bundles leave: towards the cortex, or along
    # the brainstem. Within a few mm of the cerebral cortex U-fibres share the
    # fill, running along the surface across the nearest sulcus.
    fill = np.clip(1 - weight[:, :-2].sum(axis=1), 0.0, 1.0)
    radial = _ellipsoid_depth(m, anat.centre, anat.cerebrum_semi)[2]
    radial[in_cb] = _ellipsoid_depth(m[in_cb], *anat.cerebellum)[2]
    top, bottom = anat.brainstem[:2]
    radial[in_bs] = (bottom - top) / np.linalg.norm(bottom - top)
    tangent[:, -2] = radial
    share = np.where(in_bs | in_cb, 0.0, 0.5 * np.clip(1 - wm_depth / anat.u_fibre_depth, 0.0, 1.0))
    weight[:, -2] = fill * (1 - share)
    weight[:, -1] = fill * share
    shallow = np.flatnonzero(weight[:, -1] > 0)
    warped = _warp(anat, m[shallow])
    _, rho, normal = _ellipsoid_depth(warped, anat.centre, anat.cerebrum_semi)
    _, across = _surface_waves(anat.centre + (warped - anat.centre) / rho[:, None], *anat.fold, normal)
    norms = np.linalg.norm(across, axis=1)
    weight[shallow[norms < 1e-6], -1] = 0.0  # a gyral crown or sulcal fundus: no defined crossing direction
    tangent[shallow, -1] = across / np.maximum(norms, 1e-6)[:, None]
    weight *= anat.density

    order = np.argsort(-weight, axis=1, kind="stable")[:, :3]
    frac = np.take_along_axis(weight, order, axis=1)
    frac /= frac.sum(axis=1, keepdims=True)
    frac[frac < MIN_FIBRE_FRACTION] = 0.0
    frac /= frac.sum(axis=1, keepdims=True)
    # Template tangents to world (Jacobian R·S), then to the voxel frame of the affine.
    dirs = np.take_along_axis(tangent, order[:, :, None], axis=1)
    dirs = (dirs * anat.scale) @ anat.rotation.T @ np.linalg.inv(affine[:3, :3]).T
    dirs[frac == 0] = 0.0
    norms = np.linalg.norm(dirs, axis=2, keepdims=True)
    dirs /= np.where(norms > 0, norms, 1.0)
    # Nearly parallel populations (a bundle and the radial fill, two families
    # running together) are one fibre population, not a crossing: merge them
    # into the larger, along their fraction-weighted mean direction.
    for i, j in ((0, 1), (0, 2), (1, 2)):
        dot = (dirs[:, i] * dirs[:, j]).sum(axis=1)
        close = (frac[:, i] > 0) & (frac[:, j] > 0) & (np.abs(dot) > np.cos(np.radians(MERGE_ANGLE_DEG)))
        mean = frac[close, i, None] * dirs[close, i] + (frac[close, j] * np.sign(dot[close]))[:, None] * dirs[close, j]
        dirs[close, i] = mean / np.linalg.norm(mean, axis=1, keepdims=True)
        frac[close, i] += frac[close, j]
        frac[close, j] = 0.0
        dirs[close, j] = 0.0
    resort = np.argsort(-frac, axis=1, kind="stable")
    frac = np.take_along_axis(frac, resort, axis=1)
    dirs = np.take_along_axis(dirs, resort[:, :, None], axis=1)
    family = np.take_along_axis(order, resort, axis=1)
    return dirs.astype(np.float32), frac.astype(np.float32), family.astype(np.int8)


# ---------------------------------------------------------------------------
# Signal and noise


def _simulate(anat, geo, shape, bvals, bvecs):
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
            dpar, fin, dperp = params[geo.family[ws, slot]].T[:, :, None]
            bcos2 = np.square(geo.peaks[ws, slot] @ g.T)
            bcos2 *= b
            # Stick along the fibre plus a zeppelin sharing its parallel diffusivity.
            att = np.exp(-dpar * bcos2)
            att *= fin
            zeppelin = np.exp(-(dpar - dperp) * bcos2)
            zeppelin *= np.exp(-dperp * b)
            zeppelin *= 1 - fin
            att += zeppelin
            att *= geo.fractions[ws, slot][:, None]
            wm_att[on] += att
        out[has_wm] += geo.tissue[rows[has_wm], 0][:, None].astype(np.float32) * wm_att
        flat[geo.head_flat[rows]] = out * s0[rows, None]

    with ThreadPoolExecutor(_n_threads()) as pool:
        list(pool.map(chunk, range(0, len(geo.head_flat), _CHUNK)))
    return signal


def _add_noise(signal, head_grid, sigma, seed, k0):
    """Rician noise: the magnitude of the signal plus complex Gaussian noise.

    The noise is drawn in polar form (exact, and cheaper than two normals):
    radius ``sigma * sqrt(2 E)`` with ``E`` standard exponential (Rayleigh),
    phase uniform. Voxels without signal get the radius alone.
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

    with ThreadPoolExecutor(_n_threads()) as pool:
        list(pool.map(one_slice, range(signal.shape[2])))
    return dwi


def _tensor_fa(signal, mask, bvals, bvecs):
    """FA of an OLS tensor fit (the package's :func:`~qid2_diffusers.tensor.fit_tensor`) on b0 + lowest shell.

    OLS is exact enough on noise-free data and, unlike WLS, fast enough for a
    whole 1.25 mm brain; fitted in chunks of voxels to bound the memory.
    """
    from ..tensor import fit_tensor

    lowest = bvals[bvals > 0].min()
    keep = np.flatnonzero((bvals == 0) | (bvals == lowest))
    flat = signal.reshape(-1, signal.shape[3])
    voxels = np.flatnonzero(mask.reshape(-1))
    fa = np.zeros(mask.size, dtype=np.float32)

    def chunk(start):
        sel = voxels[start : start + 8 * _CHUNK]
        fa[sel] = fit_tensor(flat[sel][:, keep], bvals[keep], bvecs[keep], fit_method="OLS").fa

    with ThreadPoolExecutor(_n_threads()) as pool:
        list(pool.map(chunk, range(0, len(voxels), 8 * _CHUNK)))
    return fa.reshape(mask.shape)


# ---------------------------------------------------------------------------
# Files


def subject_seed(seed: int, index: int) -> int:
    """The seed of subject ``index`` of a cohort drawn with ``seed`` (numpy SeedSequence)."""
    return int(np.random.SeedSequence([int(seed), int(index)]).generate_state(1)[0])


def write_subject(subject: PhantomSubject, root, subject_id: str) -> Path:
    """Write a subject in the HCP layout, with its truth beside it.

    ``root/<subject_id>/T1w/Diffusion/{data.nii.gz, bvals, bvecs, nodif_brain_mask.nii.gz}``
    (FSL bvals one row, bvecs three rows) and ``root/<subject_id>/truth/``
    with ``signal_noisefree``, ``fa``, ``peaks`` (X, Y, Z, 9), ``peak_fractions``,
    ``n_fibres`` and ``tissue`` (``.nii.gz``) plus ``phantom.json`` (seed,
    noise sigma, drawn parameters). The subject folder is assembled under a
    temporary name and renamed into place, so it is never half-written; an
    existing folder of that name is replaced.

    Returns:
        `Path` of the subject folder.
    """
    import nibabel as nib

    from .io import save_nifti

    # A header with qform and sform both set (as HCP's files have) and units in mm.
    header = nib.Nifti1Image(np.zeros(subject.mask.shape, dtype=np.uint8), subject.affine).header
    header.set_qform(subject.affine, code="scanner")
    header.set_sform(subject.affine, code="scanner")
    header.set_xyzt_units("mm", "sec")
    root = Path(root)
    final = root / subject_id
    tmp = root / f".{subject_id}.{uuid.uuid4().hex[:12]}.tmp"
    diffusion = tmp / _DIFFUSION_DIR
    truth = tmp / "truth"
    try:
        diffusion.mkdir(parents=True)
        truth.mkdir()
        images = [
            (diffusion / "data.nii.gz", subject.dwi, np.float32),
            (truth / _TRUTH_FILES["signal"], subject.signal, np.float32),
            (diffusion / "nodif_brain_mask.nii.gz", subject.mask, np.uint8),
            (truth / _TRUTH_FILES["fa"], subject.fa, np.float32),
            (truth / _TRUTH_FILES["peaks"], subject.peaks.reshape(subject.peaks.shape[:3] + (9,)), np.float32),
            (truth / _TRUTH_FILES["peak_fractions"], subject.peak_fractions, np.float32),
            (truth / _TRUTH_FILES["n_fibres"], subject.n_fibres, np.uint8),
            (truth / _TRUTH_FILES["tissue"], subject.tissue, np.float32),
        ]
        # gzip releases the GIL: the two large series compress side by side.
        with ThreadPoolExecutor(_n_threads()) as pool:
            list(pool.map(lambda item: save_nifti(item[0], item[1], subject.affine, header, dtype=item[2]), images))
        np.savetxt(diffusion / "bvals", subject.bvals[None, :], fmt="%.10g")
        np.savetxt(diffusion / "bvecs", subject.bvecs.T, fmt="%.10f")
        (truth / _PARAMS_FILE).write_text(json.dumps(subject.params, indent=2, sort_keys=True) + "\n")
        old = None
        if final.exists():
            old = root / f".{subject_id}.{uuid.uuid4().hex[:12]}.old"
            os.replace(final, old)
        os.replace(tmp, final)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return final


def _write_one(job) -> Path:
    out_dir, i, seed, resolution, snr, shells, slab = job
    subject = make_subject(subject_seed(seed, i), resolution=resolution, snr=snr, shells=shells, slab=slab)
    return write_subject(subject, out_dir, f"phantom-{i:03d}")


def write_cohort(out_dir, n_subjects: int, seed: int, *, resolution: float = 2.5, snr: float = 25.0, shells=(1000,), slab=None, progress: bool = True, jobs: int = 1) -> list[Path]:
    """Simulate and write ``n_subjects`` phantoms ``phantom-000``, ``phantom-001``, ...

    Subject ``i`` is drawn with :func:`subject_seed` ``(seed, i)``, so a cohort
    grows without changing the subjects it already has.

    Args:
        out_dir (`str` or `os.PathLike`): cohort root (HCP layout under it).
        n_subjects (`int`): number of subjects, at least 1.
        seed (`int`): cohort seed.
        resolution (`float`, *optional*, defaults to 2.5): voxel size (mm).
        snr (`float`, *optional*, defaults to 25.0): white-matter b0 SNR.
        shells (`tuple` of `float`, *optional*, defaults to `(1000,)`): b-values.
        slab (`int`, *optional*): central axial slices only.
        progress (`bool`, *optional*, defaults to `True`): show a tqdm bar.
        jobs (`int`, *optional*, defaults to 1): subjects simulated in parallel
            processes; every subject is the same whatever the number.

    Returns:
        `list` of subject folders.
    """
    from tqdm.auto import tqdm

    if isinstance(n_subjects, bool) or not isinstance(n_subjects, (int, np.integer)) or n_subjects < 1:
        raise QID2InputError(None, f"number of subjects must be a positive integer, got {n_subjects!r}")
    _check_options(seed, float(resolution), float(snr), tuple(float(b) for b in shells))
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    work = [(out_dir, i, seed, resolution, snr, tuple(shells), slab) for i in range(n_subjects)]
    bar = dict(desc="phantom", unit="subject", total=n_subjects, disable=not progress)
    if jobs <= 1 or n_subjects == 1:
        return [_write_one(job) for job in tqdm(work, **bar)]
    import multiprocessing

    # Forked workers inherit the imported package and the cached scheme.
    hcp_scheme(shells=tuple(shells))
    with multiprocessing.get_context("fork").Pool(min(jobs, n_subjects)) as pool:
        return list(tqdm(pool.imap(_write_one, work), **bar))


def load_truth(subject_dir, *, signal: bool = True) -> dict:
    """Read a written phantom's truth back.

    Args:
        subject_dir (`str` or `os.PathLike`): the subject folder (``root/<subject_id>``).
        signal (`bool`, *optional*, defaults to `True`): also read the
            noise-free series (the largest file).

    Returns:
        `dict` with ``fa`` (X, Y, Z), ``peaks`` (X, Y, Z, 3, 3),
        ``peak_fractions`` (X, Y, Z, 3), ``n_fibres`` (X, Y, Z), ``tissue``
        (X, Y, Z, 3), ``mask`` (X, Y, Z) bool, ``bvals``, ``bvecs``, ``affine``,
        ``params`` (the JSON) and, if asked, ``signal`` (X, Y, Z, N).

    Raises:
        QID2InputError: if a file is missing or unreadable.
    """
    import nibabel as nib

    from .io import load_dwi

    subject_dir = Path(subject_dir)
    diffusion = subject_dir / _DIFFUSION_DIR
    dwi = load_dwi(diffusion / "data.nii.gz", diffusion / "bvals", diffusion / "bvecs", diffusion / "nodif_brain_mask.nii.gz")
    out = {"bvals": dwi.bvals, "bvecs": dwi.bvecs, "affine": dwi.affine, "mask": dwi.mask}
    for key, name in _TRUTH_FILES.items():
        if key == "signal" and not signal:
            continue
        path = subject_dir / "truth" / name
        if not path.is_file():
            raise QID2InputError(path, "file not found (not a phantom subject folder?)")
        try:
            out[key] = np.asanyarray(nib.load(str(path)).dataobj)
        except Exception as exc:  # nibabel raises several types for a damaged file
            raise QID2InputError(path, f"cannot be read as NIfTI ({type(exc).__name__})") from None
    out["peaks"] = out["peaks"].reshape(out["peaks"].shape[:3] + (3, 3))
    params = subject_dir / "truth" / _PARAMS_FILE
    if not params.is_file():
        raise QID2InputError(params, "file not found (not a phantom subject folder?)")
    out["params"] = json.loads(params.read_text())
    return out
