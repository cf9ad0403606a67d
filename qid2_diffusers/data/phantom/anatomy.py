"""A subject's anatomy, drawn from its seed in template space (MNI-like millimetres).

Everything here is a parameter: curves, radii, wave fields, tissue properties.
:mod:`.geometry` evaluates them on a voxel grid. The draws happen in a fixed
order, so one seed always gives the same anatomy at every resolution.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np
from scipy.spatial.transform import Rotation

__all__ = ["FAMILIES", "MIN_FIBRE_FRACTION", "MERGE_ANGLE_DEG", "BIAS_SD", "Bundle", "Anatomy", "draw_anatomy", "anatomy_params"]

#: Fibre families, in the order of their indices in a subject's parameters.
FAMILIES = ("commissural", "projection", "association", "ventral_association", "cingulum", "radial", "u_fibre")

#: Fibre populations smaller than this fraction of a voxel's white matter are
#: dropped (signal and truth alike) so that ``n_fibres`` counts real crossings.
MIN_FIBRE_FRACTION = 0.1
#: Populations closer than this angle (degrees) are merged into one.
MERGE_ANGLE_DEG = 30.0
#: Standard deviations of the bias field's coefficients (linear, square and
#: cross terms of the world position in units of 100 mm; the field is their exponential).
BIAS_SD = (0.08, 0.08, 0.08, 0.04, 0.04, 0.04, 0.03, 0.03, 0.03)


@dataclass
class Bundle:
    points: np.ndarray  # (P, 3) centre-curve samples
    tangents: np.ndarray  # (P, 3) unit tangents
    radius: float | np.ndarray  # mm, scalar or one per point


@dataclass
class Anatomy:
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
    bundles: list  # per family: list of Bundle
    u_fibre_depth: float  # U-fibres fade out this deep (mm) below the cortex
    dpar: np.ndarray  # per entry of FAMILIES, mm²/s
    fin: np.ndarray
    dperp: np.ndarray
    density: np.ndarray
    s0_wm: float
    s0: dict  # relative S0 of gm, csf, scalp
    diffusivity: dict  # gm, csf, scalp
    bias: np.ndarray
    atrophy: float
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


def _jitter(rng, pts, sd=2.0):
    return np.asarray(pts, dtype=np.float64) + rng.normal(0.0, sd, size=np.shape(pts))


def _family_radius(rng, base):
    return base * rng.uniform(0.8, 1.25)


def _callosum_height(callosum, y):
    y_spl, y_genu, z_ends, arch, _ = callosum
    y_mid, half = (y_spl + y_genu) / 2, (y_genu - y_spl) / 2
    return z_ends + arch * (1 - ((y - y_mid) / half) ** 2)


def _commissural(rng, callosum) -> list:
    """The callosum crosses the midline flat, then its radiations fan out in each
    hemisphere from nearly horizontal to nearly vertical; the forceps and the
    pontine fibres of the middle cerebellar peduncle."""
    y_spl, y_genu, z_ends, _, r_cc = callosum
    y_mid = (y_spl + y_genu) / 2
    reach, fan = rng.uniform(45, 55), rng.uniform(0.5, 0.9)
    fam = []
    # Curves close enough (< 2 (radius - 1) mm apart) to merge into one sheet;
    # the tubes thicken as the radiations spread, so the sheet stays whole.
    for y_k in np.linspace(y_spl + 3, y_genu - 3, int(np.ceil((y_genu - y_spl - 6) / (2 * (r_cc - 1.0)))) + 1):
        for angle in np.radians([5, 17, 30, 43, 56, 68, 80]):
            out = np.array([[10.0, 0.0], [10 + 0.5 * reach * np.cos(angle), 0.4 * reach * np.sin(angle)],
                            [10 + reach * np.cos(angle), reach * np.sin(angle)]])
            xz = np.vstack([out[::-1] * [-1, 1], [[0.0, 0.0]], out])
            way = np.column_stack([xz[:, 0], y_mid + (y_k - y_mid) * (1 + fan * (xz[:, 0] / reach) ** 2),
                                   _callosum_height(callosum, y_k) + xz[:, 1]])
            way[:, 1:] = _jitter(rng, way[:, 1:], 1.0)
            pts, tans = _catmull_rom(way)
            fam.append(Bundle(pts, tans, r_cc * (1 + 0.8 * np.minimum(np.abs(pts[:, 0]) / reach, 1.0) ** 2)))
    # Forceps minor and major: U-shaped sheets from the genu and splenium to the poles.
    for y_end, sign in ((y_genu, 1.0), (y_spl, -1.0)):
        for spread in (14.0, 24.0, 34.0):
            for dz in (-8.0, 0.0, 8.0):
                out = np.array([[spread * 0.5, 5.0], [spread, 18.0], [spread * 1.05, 40.0]])
                xy = np.vstack([out[::-1] * [-1, 1], [[0.0, 0.0]], out])
                way = np.column_stack([xy[:, 0], y_end + sign * xy[:, 1], z_ends + dz * np.minimum(np.abs(xy[:, 0]) / 10, 1)])
                fam.append(Bundle(*_catmull_rom(_jitter(rng, way, 1.0)), r_cc))
    pons = np.array([[-38, -62, -38], [-24, -46, -33], [-10, -34, -30], [0, -31, -30], [10, -34, -30], [24, -46, -33], [38, -62, -38]], float)
    radius = _family_radius(rng, 4.0)
    fam += [Bundle(*_catmull_rom(_jitter(rng, pons + [0, 0, dz])), radius) for dz in (0.0, -6.0)]
    return fam


def _projection(rng) -> list:
    """Per hemisphere a fan from the brainstem through the internal capsule, and the thalamic radiations."""
    radius = _family_radius(rng, 6.5)
    fam = []
    for s in (-1, 1):
        for fx in np.linspace(2, 36, 4):
            for fy in np.linspace(-40, 36, 7):
                way = [[5, -38, -75], [7, -31, -45], [12, -22, -15], [18.5, -12 + 0.45 * fy, 5],
                       [21 + 0.4 * fx, -12 + 0.65 * fy, 26], [22 + 0.8 * fx, -12 + 0.9 * fy, 45], [22 + fx, -12 + fy, 62]]
                way = _jitter(rng, way, 1.5) * [s, 1, 1]
                fam.append(Bundle(*_catmull_rom(way), radius))
        # Anterior (to the frontal pole) and optic (to the occipital pole) radiations.
        for dz in (-6, 0, 6):
            way = [[10, -14, 4], [15, 2, 6 + dz], [20, 22, 8 + dz], [22, 45, 6 + dz], [20, 62, 2 + dz]]
            fam.append(Bundle(*_catmull_rom(_jitter(rng, way) * [s, 1, 1]), radius))
            way = [[20, -26, -2], [30, -32, 0 + dz / 2], [32, -52, 4 + dz], [28, -72, 6 + dz], [18, -92, 6 + dz]]
            fam.append(Bundle(*_catmull_rom(_jitter(rng, way) * [s, 1, 1]), radius))
    return fam


def _association(rng, base_radius, centre_line, offsets) -> list:
    """Per hemisphere, parallel copies of ``centre_line`` shifted by ``offsets`` (dx, dz) mm."""
    radius = _family_radius(rng, base_radius)
    fam = []
    for s in (-1, 1):
        for dx, dz in offsets:
            way = np.asarray(centre_line, dtype=np.float64) + [dx, 0, dz]
            fam.append(Bundle(*_catmull_rom(_jitter(rng, way) * [s, 1, 1]), radius))
    return fam


def _dorsal_association(rng) -> list:
    """Superior longitudinal fasciculus hooking into the arcuate."""
    line = [[28, 32, 26], [32, 8, 29], [34, -20, 29], [36, -42, 22], [40, -50, 6], [44, -38, -8], [46, -20, -14]]
    return _association(rng, 5.0, line, ((-4, 16), (0, 10), (3, 3), (6, -4), (9, -11), (-6, 4)))


def _ventral_association(rng) -> list:
    """Fronto-occipital and inferior longitudinal fasciculi through the temporal stem."""
    line = [[22, 48, -2], [28, 25, -6], [33, 2, -10], [37, -25, -8], [38, -55, -2], [30, -85, 4]]
    return _association(rng, 4.5, line, ((-6, 10), (-3, 5), (0, 0), (4, -6), (8, 2)))


def _cingulum(rng, callosum) -> list:
    """An arc just above the callosum, down into the parahippocampal gyrus."""
    y_spl, y_genu, _, _, r_cc = callosum
    y_mid = (y_spl + y_genu) / 2
    radius = _family_radius(rng, 3.5)
    above = r_cc + radius + 1.0

    def over(y):
        return _callosum_height(callosum, y) + above

    fam = []
    for s in (-1, 1):
        way = [[7, y_genu + 2, -6], [7, y_genu + 10, 14], [7, y_genu - 8, over(y_genu - 8)], [7, y_mid, over(y_mid)],
               [7, y_spl + 2, over(y_spl + 2)], [9, y_spl - 10, 6], [18, y_spl, -12], [25, y_spl + 18, -20]]
        fam.append(Bundle(*_catmull_rom(_jitter(rng, way, 1.0) * [s, 1, 1]), radius))
    return fam


def _fibre_properties(rng, n_fam):
    """Per family: parallel diffusivity, intra-axonal fraction, extra-axonal perpendicular diffusivity, density."""
    dpar = rng.uniform(1.6e-3, 1.9e-3, size=n_fam)
    fin = rng.uniform(0.45, 0.62, size=n_fam)
    fin[0] = rng.uniform(0.5, 0.65)
    fin[-2:] = rng.uniform(0.4, 0.5, size=2)
    # Beyond tortuosity, extra perpendicular diffusivity stands in for dispersion;
    # the fibres that fill between bundles are the least coherent.
    dperp = dpar * (1 - fin) * rng.uniform(1.0, 1.2, size=n_fam)
    dperp[-2:] = dpar[-2:] * (1 - fin[-2:]) * rng.uniform(1.1, 1.3, size=2)
    density = rng.uniform(0.6, 1.0, size=n_fam)
    return dpar, fin, dperp, density


def _ventricles(rng, callosum, atrophy):
    """Lateral ventricles (tubes of varying radius) and the third ventricle; they grow with atrophy."""
    y_spl, y_genu = callosum[:2]
    y_mid = (y_spl + y_genu) / 2
    vscale = 0.8 + 0.7 * atrophy
    vent_pts, vent_r = [], []
    for s in (-1, 1):
        way = np.array([[8, y_genu - 4, 8], [8, y_genu - 15, 11], [8.5, y_mid, 11], [11, y_spl + 15, 11],
                        [18, y_spl + 3, 9], [26, y_spl + 5, -4], [30, -20, -14], [30, -5, -20]], float)
        radii = np.array([4.5, 5.5, 5.0, 5.5, 6.0, 4.5, 3.5, 3.0]) * vscale
        way[:4, 0] = 2.0 + radii[:4]  # the septum stays between the two ventricles
        pts, _ = _catmull_rom(_jitter(rng, way, 1.0) * [s, 1, 1], step=0.5)
        arc = np.r_[0, np.cumsum(np.linalg.norm(np.diff(way, axis=0), axis=1))]
        along = np.r_[0, np.cumsum(np.linalg.norm(np.diff(pts, axis=0), axis=1))]
        vent_pts.append(pts)
        vent_r.append(np.interp(along / along[-1] * arc[-1], arc, radii))
    for z in (-6.0, -1.0, 4.0):  # third ventricle: a thin midline sheet
        pts, _ = _catmull_rom([[0, 2, z - 2], [0, -10, z + 2], [0, -22, z + 3]], step=0.5)
        vent_pts.append(pts)
        vent_r.append(np.full(len(pts), 1.4 * vscale))
    return np.vstack(vent_pts), np.concatenate(vent_r)


def _deep_grey_matter(rng) -> list:
    """Thalamus, putamen and caudate of each hemisphere as ellipsoids."""
    deep_gm = []
    for c, semi in (([10, -18, 6], [6, 12, 8]), ([26, 2, 1], [5, 14, 9]), ([13, 13, 10], [4.5, 8, 8])):
        for s in (-1, 1):
            deep_gm.append((_jitter(rng, c, 1.0) * [s, 1, 1], np.asarray(semi, float) * rng.uniform(0.9, 1.1, size=3)))
    return deep_gm


def draw_anatomy(rng: np.random.Generator) -> Anatomy:
    """Draw one subject's anatomy, fibres and tissue properties (fixed draw order)."""
    size = rng.uniform(0.92, 1.08)
    scale = size * rng.uniform(0.96, 1.04, size=3)
    rotation = Rotation.from_euler("xyz", rng.normal(0.0, [4.0, 2.0, 2.0]), degrees=True).as_matrix()
    shift = rng.normal(0.0, 2.0, size=3)
    atrophy = rng.uniform(0.0, 1.0)
    # Callosum first: the fissure floor, cingulum and ventricles are placed against it.
    y_spl, y_genu = -40.0 + rng.normal(0, 2), 30.0 + rng.normal(0, 2)
    z_ends, arch = 11.0 + rng.normal(0, 1.5), 9.0 + rng.normal(0, 1.5)
    callosum = (y_spl, y_genu, z_ends, arch, 4.0 * rng.uniform(0.85, 1.2))
    bundles = [_commissural(rng, callosum), _projection(rng), _dorsal_association(rng), _ventral_association(rng),
               _cingulum(rng, callosum)]
    dpar, fin, dperp, density = _fibre_properties(rng, len(bundles) + 2)  # and the radial and U-fibre fill
    ventricles = _ventricles(rng, callosum, atrophy)
    deep_gm = _deep_grey_matter(rng)
    fold = _random_waves(rng, 24, (10.0, 15.0))
    warp_k, warp_phase = _random_waves(rng, 12, (18.0, 30.0))
    depth_k, depth_phase = _random_waves(rng, 8, (50.0, 90.0))
    folia_k, folia_phase = _random_waves(rng, 16, (7.0, 10.0))
    shape_k = rng.normal(0.0, 2.5, size=(6, 3))
    shape_phase = rng.uniform(0, 2 * np.pi, size=6)
    s0 = {"gm": rng.uniform(1.2, 1.45), "csf": rng.uniform(2.4, 3.2), "scalp": rng.uniform(0.4, 0.8)}
    diffusivity = {"gm": rng.uniform(0.7e-3, 0.9e-3), "csf": rng.uniform(2.9e-3, 3.1e-3), "scalp": rng.uniform(1.0e-3, 1.4e-3)}
    s0_wm = rng.uniform(800.0, 1200.0)
    bias = rng.normal(0.0, BIAS_SD)
    anat = Anatomy(
        centre=np.array([0.0, -18.0, 16.0]), scale=scale, rotation=rotation, shift=shift,
        cerebrum_semi=np.array([68.0, 86.0, 60.0]), shape_k=shape_k, shape_phase=shape_phase, shape_amp=0.02,
        fold=fold,
        warp=(warp_k.reshape(3, 4, 3), warp_phase.reshape(3, 4), rng.uniform(3.0, 5.0)),
        fold_depth=(depth_k, depth_phase, rng.uniform(12.0, 16.0), rng.uniform(4.0, 7.0)),
        folia=(folia_k, folia_phase, rng.uniform(4.0, 7.0)),
        sulcal_halfwidth=0.4 + 0.8 * atrophy,
        cerebellum=(_jitter(rng, [0, -62, -33], 1.5), np.array([50.0, 32.0, 21.0]) * rng.uniform(0.92, 1.08, size=3)),
        brainstem=(np.array([0, -24, -8.0]), np.array([0, -42, -95.0]), rng.uniform(9.5, 11.5), rng.uniform(2.5, 4.0), 0.3),
        fissure=(rng.uniform(0.5, 2.0), 2 * np.pi / rng.uniform(40, 80), rng.uniform(0, 2 * np.pi), 0.8 + 0.8 * atrophy),
        callosum=callosum,
        tentorium_halfwidth=0.8 + 0.5 * atrophy,
        cortex=rng.uniform(2.4, 3.0),
        cerebellar_cortex=rng.uniform(5.0, 7.0),
        csf_layer=1.0 + 2.0 * atrophy,
        skull=rng.uniform(4.0, 7.0),
        scalp=rng.uniform(4.0, 7.0),
        ventricles=ventricles, deep_gm=deep_gm, bundles=bundles,
        u_fibre_depth=rng.uniform(5.0, 9.0),
        dpar=dpar, fin=fin, dperp=dperp, density=density, s0_wm=s0_wm, s0=s0, diffusivity=diffusivity, bias=bias,
        atrophy=atrophy, params={},
    )
    anat.params = anatomy_params(anat)
    return anat


def anatomy_params(anat: Anatomy) -> dict:
    """The drawn scalars of an anatomy, JSON-ready (floats, lists, dicts)."""
    params = {
        "s0_wm": anat.s0_wm,
        "s0_relative": anat.s0,
        "diffusivity": anat.diffusivity,
        "families": {
            name: {"d_par": anat.dpar[i], "intra_fraction": anat.fin[i], "d_perp_extra": anat.dperp[i], "density": anat.density[i]}
            for i, name in enumerate(FAMILIES)
        },
        "atrophy": anat.atrophy,
        "brain_scale": anat.scale.tolist(),
        "head_rotation_deg": Rotation.from_matrix(anat.rotation).as_euler("xyz", degrees=True).tolist(),
        "head_shift_mm": anat.shift.tolist(),
        "cortex_thickness_mm": anat.cortex,
        "min_fibre_fraction": MIN_FIBRE_FRACTION,
        "merge_angle_deg": MERGE_ANGLE_DEG,
    }
    return json.loads(json.dumps(params, default=float))
