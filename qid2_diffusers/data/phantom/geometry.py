"""An anatomy evaluated on a voxel grid: tissue fractions, brain mask, bias field, fibre populations.

Boundaries are partial-volumed by a linear ramp over ``edge_width`` mm (the
voxel size of the grid, or half of it where a randomised subject is simulated
on a finer grid before its point-spread function is applied).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.spatial import cKDTree

from .anatomy import MERGE_ANGLE_DEG, MIN_FIBRE_FRACTION, Anatomy
from .scheme import HCP_CENTRE_MM, n_threads

__all__ = ["Geometry", "geometry"]

# Fibre directions average the tangents of this many nearest centre-curve
# points, weighted by a Gaussian of this width (mm) beyond the nearest one.
_NEIGHBOURS = 12
_BLEND_MM = 2.0


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
class Geometry:
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

    def to_grid(self, values, dtype=np.float32) -> np.ndarray:
        """Per-head-voxel ``values`` of shape `(H, ...)` on the grid, zeros elsewhere."""
        out = np.zeros(self.head_grid.shape + values.shape[1:], dtype=dtype)
        out.reshape((-1,) + values.shape[1:])[self.head_flat] = values
        return out


def _to_template(anat, world):
    return anat.centre + ((world - anat.centre - anat.shift) @ anat.rotation) / anat.scale


def _head_voxels(anat, shape, affine, margin):
    """Flat indices, template positions and envelope depths (cerebrum, cerebellum, brainstem) of the head's voxels."""
    outer = anat.csf_layer + anat.skull + anat.scalp + margin
    head_flat, env = [], []
    ij = np.stack(np.meshgrid(np.arange(shape[0]), np.arange(shape[1]), indexing="ij"), axis=-1).reshape(-1, 2)
    # Slab by slab over k so the whole-grid pass stays small at 1.25 mm.
    for k in range(shape[2]):
        ijk = np.column_stack([ij, np.full(len(ij), k)]).astype(np.float64)
        m = _to_template(anat, ijk @ affine[:3, :3].T + affine[:3, 3])
        d_cer = _cerebrum_depth(anat, m)
        d_cb = _ellipsoid_depth(m, *anat.cerebellum)[0]
        d_bs = _brainstem_depth(anat, m)
        keep = np.maximum(np.maximum(d_cer, d_cb), d_bs) > -outer
        head_flat.append((ij[keep, 0] * shape[1] + ij[keep, 1]) * shape[2] + k)
        env.append(np.column_stack([m[keep], d_cer[keep], d_cb[keep], d_bs[keep]]))
    order = np.argsort(np.concatenate(head_flat), kind="stable")
    env = np.vstack(env)[order]
    return np.concatenate(head_flat)[order], env[:, :3], env[:, 3], env[:, 4], env[:, 5]


def _cerebral_pial(anat, mc, d_cer, d_cb, margin):
    """Distance (mm) to the pial CSF of cerebral voxels: sulci off the outer surface and off the
    medial wall of the interhemispheric fissure, the fissure itself and the tentorium."""
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
    p = np.minimum(d_cer, _pial_distance(midline, halfwidth, floor - mc[:, 2], 0.0))
    # Sulci matter only where they can reach: near the outer surface and the medial wall.
    reach = dmean + dspread + anat.cortex + margin + 1.0
    outer = d_cer < reach
    medial = (midline < 0.6 * reach + halfwidth) & (mc[:, 2] > floor + 4.0)
    near = np.flatnonzero(outer | medial)
    warped = _warp(anat, mc[near])
    _, rho, normal = _ellipsoid_depth(warped, anat.centre, anat.cerebrum_semi)
    q = anat.centre + (warped - anat.centre) / rho[:, None]
    sulcal_depth = dmean + dspread * np.tanh(np.cos(_f32(q @ dk.T + dphase)).sum(axis=1, dtype=np.float64) / 2.0)
    o = outer[near]
    sheet = _sheet_distance(q[o], *anat.fold, normal[o], rho[o])
    p[near[o]] = np.minimum(p[near[o]], _pial_distance(sheet, anat.sulcal_halfwidth, d_cer[near[o]], sulcal_depth[o]))
    md = medial[near]
    side = np.sign(mc[near[md], 0] - x_mid[near[md]])
    medial_q = np.column_stack([side * 40.0, warped[md, 1], warped[md, 2]])
    medial_sheet = _sheet_distance(medial_q, *anat.fold, np.array([[1.0, 0.0, 0.0]]), 1.0)
    wall = midline[near[md]] - halfwidth
    p[near[md]] = np.minimum(p[near[md]], _pial_distance(medial_sheet, anat.sulcal_halfwidth, wall, 0.6 * sulcal_depth[md]))
    return np.minimum(p, -d_cb - anat.tentorium_halfwidth)


def _cerebellar_pial(anat, m, d_cb):
    """Distance (mm) to the pial CSF of cerebellar voxels: fine folia."""
    centre_cb, semi_cb = anat.cerebellum
    _, rho, normal = _ellipsoid_depth(m, centre_cb, semi_cb)
    k, phase, depth = anat.folia
    sheet = _sheet_distance(centre_cb + (m - centre_cb) / rho[:, None], k, phase, normal, rho)
    return np.minimum(d_cb, _pial_distance(sheet, 0.3, d_cb, depth))


def _pial_and_thickness(anat, m, d_cer, d_cb, d_bs, margin):
    in_bs = d_bs >= np.maximum(d_cer, d_cb)
    in_cb = ~in_bs & (d_cb > 0)
    in_cer = ~in_bs & ~in_cb
    pial = np.empty(len(m))
    thickness = np.empty(len(m))
    pial[in_bs] = d_bs[in_bs]
    thickness[in_bs] = 0.0
    pial[in_cer] = _cerebral_pial(anat, m[in_cer], d_cer[in_cer], d_cb[in_cer], margin)
    thickness[in_cer] = anat.cortex
    pial[in_cb] = _cerebellar_pial(anat, m[in_cb], d_cb[in_cb])
    thickness[in_cb] = anat.cerebellar_cortex
    return pial, thickness, in_bs, in_cb


def _tissue(anat, m, d_env, pial, thickness, width):
    """Partial-volume fractions (wm, gm, csf), the brain envelope and the scalp of each voxel."""

    def edge(x):
        return _ramp(x, width)

    inside = edge(d_env + anat.csf_layer)
    tissue_frac = edge(pial)
    wm = edge(pial - thickness)
    gm = tissue_frac - wm
    csf = inside - tissue_frac
    vent_pts, vent_r = anat.ventricles
    dist, idx = cKDTree(vent_pts).query(m, distance_upper_bound=vent_r.max() + width, workers=n_threads())
    hit = np.isfinite(dist)
    vent = np.zeros(len(m))
    vent[hit] = edge(vent_r[idx[hit]] - dist[hit])
    nuclei = np.zeros(len(m))
    for centre, semi in anat.deep_gm:
        near = np.flatnonzero(np.all(np.abs(m - centre) < semi + width, axis=1))
        nuclei[near] = np.maximum(nuclei[near], edge(_ellipsoid_depth(m[near], centre, semi)[0]))
    csf = csf + (wm + gm) * vent
    gm = (gm + wm * nuclei) * (1 - vent)
    wm = wm * (1 - nuclei) * (1 - vent)
    scalp = edge(d_env + anat.csf_layer + anat.skull + anat.scalp) - edge(d_env + anat.csf_layer + anat.skull)
    return np.column_stack([wm, gm, csf]), inside, scalp


def _bias_field(anat, m):
    """A smooth receive-coil bias: the exponential of a quadratic in world position."""
    world = (m - anat.centre) * anat.scale @ anat.rotation.T + anat.centre + anat.shift
    r = (world - np.array(HCP_CENTRE_MM)) / 100.0
    terms = np.column_stack([r, r**2, r[:, [0]] * r[:, [1]], r[:, [1]] * r[:, [2]], r[:, [0]] * r[:, [2]]])
    return np.exp(terms @ anat.bias)


def geometry(anat: Anatomy, shape, affine, edge_width: float) -> Geometry:
    """Evaluate ``anat`` on the grid ``shape``/``affine``.

    Args:
        anat (`Anatomy`): the drawn anatomy.
        shape (`tuple` of `int`), affine (`np.ndarray` of shape `(4, 4)`): the grid.
        edge_width (`float`): width (mm) of a boundary's partial-volume ramp
            (the voxel size: fractions are then those of the voxel's extent).
    """
    head_flat, m, d_cer, d_cb, d_bs = _head_voxels(anat, shape, affine, edge_width)
    d_env = np.maximum(np.maximum(d_cer, d_cb), d_bs)
    pial, thickness, in_bs, in_cb = _pial_and_thickness(anat, m, d_cer, d_cb, d_bs, edge_width)
    tissue, inside, scalp = _tissue(anat, m, d_env, pial, thickness, edge_width)

    keep = (inside > 0) | (scalp > 0)
    head_flat, m, tissue, scalp = head_flat[keep], m[keep], tissue[keep], scalp[keep]
    d_env, in_bs, in_cb = d_env[keep], in_bs[keep], in_cb[keep]
    wm_depth = (pial - thickness)[keep]
    head_grid = np.zeros(shape, dtype=bool)
    head_grid.reshape(-1)[head_flat] = True
    mask_grid = np.zeros(shape, dtype=bool)
    mask_grid.reshape(-1)[head_flat[d_env > -anat.csf_layer]] = True

    wm_rows = np.flatnonzero(tissue[:, 0] > 0)
    peaks, fractions, family = _fibres(anat, m[wm_rows], in_bs[wm_rows], in_cb[wm_rows], wm_depth[wm_rows], affine)
    return Geometry(head_flat, head_grid, mask_grid, tissue, scalp, _bias_field(anat, m), wm_rows, peaks, fractions, family)


def _bundle_weights(anat, m):
    """Weight (1 inside a family's tubes, fading over their edge) and blended tangent of each bundle family."""
    n_fam = len(anat.bundles) + 2
    weight = np.zeros((len(m), n_fam))
    tangent = np.zeros((len(m), n_fam, 3))
    for f, family in enumerate(anat.bundles):
        points = np.vstack([b.points for b in family])
        tangents = np.vstack([b.tangents for b in family])
        radii = np.concatenate([np.broadcast_to(b.radius, len(b.points)) for b in family])
        edge = 1.5
        dist, idx = cKDTree(points).query(m, k=_NEIGHBOURS, distance_upper_bound=radii.max() + edge, workers=n_threads())
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
    return weight, tangent


def _fill(anat, m, in_bs, in_cb, wm_depth, weight, tangent):
    """Radial fibres fill what the bundles leave: towards the cortex, or along the
    brainstem. Within a few mm of the cerebral cortex U-fibres share the fill,
    running along the surface across the nearest sulcus."""
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


def _fibres(anat, m, in_bs, in_cb, wm_depth, affine):
    """Fibre populations of white-matter voxels: directions (voxel frame), fractions, families."""
    weight, tangent = _bundle_weights(anat, m)
    _fill(anat, m, in_bs, in_cb, wm_depth, weight, tangent)
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
