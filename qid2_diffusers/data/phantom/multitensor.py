"""An independent second simulator: a multi-tensor slab built on dipy's ``multi_tensor``.

For evaluation off the training distribution only, never for training: a
model that learned the brain phantom should be judged on data it has never
seen the like of. Nothing of the brain phantom's anatomy or signal model is
used here; only the acquisition (:func:`~.scheme.hcp_scheme`), the subject
record and the HCP-layout writer are shared.

The slab (160 x 160 x 40 mm, 64 x 64 x 16 voxels at 2.5 mm) holds, drawn per seed:

- an elliptical "brain" of isotropic grey-matter-like tissue, with a CSF rim
  and a CSF "ventricle";
- two straight in-plane bundles crossing at 50-90 degrees, a curved in-plane
  bundle (a circular arc) through their crossing, and a bundle running nearly
  through-plane across the first: 2- and 3-way crossings (where all four
  overlap, the truth keeps the 3 largest);
- each bundle one cylindrically-asymmetric Gaussian tensor; every compartment's
  signal is ``dipy.sims.voxel.multi_tensor`` of that tensor, mixed by the
  voxel's volume fractions (from 3 x 3 x 3 sub-samples per voxel); Rician noise
  from ``dipy.sims.voxel.add_noise``.

Truth: volume fractions, bundle directions, and FA of the fraction-weighted
mean diffusion tensor (exactly the FA a tensor fit finds in a voxel of one
bundle); bundles below :data:`MIN_SHARE` of a voxel's white matter are left
out of ``peaks`` (they stay in the signal).
"""

from __future__ import annotations

import json

import numpy as np

from .scheme import hcp_scheme
from .subject import PhantomSubject, check_options, subject_grid

__all__ = ["FOV_MM", "MIN_SHARE", "make_multitensor_subject"]

#: Field of view (mm) of the full slab.
FOV_MM = (160.0, 160.0, 40.0)
#: A bundle's share of a voxel's white matter below which it is not a truth peak.
MIN_SHARE = 0.1
_BUNDLES = ("straight_a", "straight_b", "arc", "through_plane")
_SUBSAMPLES = 3


def _draw_layout(rng) -> dict:
    """Positions, sizes and tensors of the slab's structures (mm, voxel frame, origin at the slab centre).

    The two straight bundles and the arc all pass through one point (a 3-way
    crossing); the through-plane bundle crosses the first straight bundle 25 mm away.
    """
    semi = rng.uniform([60.0, 55.0], [72.0, 68.0])
    crossing = rng.uniform(-8, 8, size=2)
    theta_a = rng.uniform(0, np.pi)
    theta_b = theta_a + rng.choice([-1, 1]) * np.radians(rng.uniform(50, 90))
    curvature, towards = rng.uniform(30, 45), rng.uniform(0, 2 * np.pi)
    tilt, azimuth = np.radians(rng.uniform(0, 25)), rng.uniform(0, 2 * np.pi)
    layout = {
        "brain_semi_mm": semi,
        "csf_rim_mm": rng.uniform(2.0, 4.0),
        "ventricle": {"centre": rng.uniform([-30, 15], [-15, 30]), "semi": rng.uniform([6, 10], [10, 16])},
        "straight_a": {"point": crossing, "direction": [np.cos(theta_a), np.sin(theta_a), 0.0]},
        "straight_b": {"point": crossing, "direction": [np.cos(theta_b), np.sin(theta_b), 0.0]},
        "arc": {"centre": crossing + curvature * np.array([np.cos(towards), np.sin(towards)]), "radius_of_curvature": curvature},
        "through_plane": {"point": crossing + 25 * np.array([np.cos(theta_a), np.sin(theta_a)]),
                          "direction": [np.sin(tilt) * np.cos(azimuth), np.sin(tilt) * np.sin(azimuth), np.cos(tilt)]},
        "diffusivity": {"gm": rng.uniform(0.7e-3, 0.9e-3), "csf": rng.uniform(2.8e-3, 3.1e-3)},
        "s0_relative": {"gm": rng.uniform(1.1, 1.4), "csf": rng.uniform(2.0, 3.0)},
        "s0_wm": rng.uniform(800.0, 1200.0),
    }
    for name in _BUNDLES:
        l1, l2 = rng.uniform(1.5e-3, 2.0e-3), rng.uniform(0.25e-3, 0.5e-3)
        layout[name]["evals"] = [l1, l2, l2 * rng.uniform(0.8, 1.0)]
        layout[name]["radius_mm"] = rng.uniform(6.0, 10.0)
    return layout


def _in_bundles(layout, p):
    """Membership of points ``p`` (..., 3) in each bundle, stacked on the last axis."""
    out = []
    for name in ("straight_a", "straight_b"):
        u = np.asarray(layout[name]["direction"][:2])
        d = p[..., :2] - layout[name]["point"]
        out.append(np.abs(d[..., 0] * u[1] - d[..., 1] * u[0]) < layout[name]["radius_mm"])
    arc = layout["arc"]
    rho = np.linalg.norm(p[..., :2] - arc["centre"], axis=-1)
    out.append(np.abs(rho - arc["radius_of_curvature"]) < arc["radius_mm"])
    tp = layout["through_plane"]
    u = np.asarray(tp["direction"])
    axis = tp["point"] + p[..., 2:3] * u[:2] / u[2]
    out.append(np.linalg.norm(p[..., :2] - axis, axis=-1) < tp["radius_mm"])
    return np.stack(out, axis=-1)


def _fractions(layout, points):
    """Volume fractions (bundles..., gm, csf) of voxels whose sub-samples are ``points`` (V, S, 3)."""
    brain = np.sum((points[..., :2] / layout["brain_semi_mm"]) ** 2, axis=-1) <= 1
    inner = np.sum((points[..., :2] / (layout["brain_semi_mm"] - layout["csf_rim_mm"])) ** 2, axis=-1) <= 1
    vent = layout["ventricle"]
    ventricle = np.sum(((points[..., :2] - vent["centre"]) / vent["semi"]) ** 2, axis=-1) <= 1
    csf = brain & (~inner | ventricle)
    tissue = brain & ~csf
    member = _in_bundles(layout, points) & tissue[..., None]
    count = member.sum(axis=-1, keepdims=True)
    share = np.where(count > 0, member / np.maximum(count, 1), 0.0)
    gm = tissue & (count[..., 0] == 0)
    return np.concatenate([share.mean(axis=1), gm.mean(axis=1)[:, None], csf.mean(axis=1)[:, None]], axis=1)


def _directions(layout, centres):
    """Each bundle's unit direction at voxel ``centres`` (V, 3): (V, n_bundles, 3)."""
    dirs = np.empty((len(centres), len(_BUNDLES), 3))
    for b, name in enumerate(_BUNDLES):
        if name == "arc":
            r = centres[:, :2] - layout["arc"]["centre"]
            t = np.column_stack([-r[:, 1], r[:, 0], np.zeros(len(r))])
            dirs[:, b] = t / np.maximum(np.linalg.norm(t, axis=1, keepdims=True), 1e-9)
        else:
            dirs[:, b] = np.asarray(layout[name]["direction"]) / np.linalg.norm(layout[name]["direction"])
    return dirs


def _kernel(gtab, evals, direction):
    from dipy.sims.voxel import multi_tensor

    return multi_tensor(gtab, np.asarray([evals]), S0=1.0, angles=[direction], fractions=[100], snr=None)[0]


def _signal_and_tensor(layout, gtab, fractions, dirs):
    """Per voxel, the noise-free signal (dipy multi-tensor compartments mixed by the volume
    fractions) and the fraction-weighted mean diffusion tensor.

    A bundle's compartment is simulated once per distinct direction (once for a
    straight bundle, once per in-plane position for the arc).
    """
    from dipy.sims.voxel import all_tensor_evecs

    iso = {t: _kernel(gtab, [layout["diffusivity"][t]] * 3, [0.0, 0.0, 1.0]) * layout["s0_relative"][t] for t in ("gm", "csf")}
    signal = fractions[:, -2:-1] * iso["gm"] + fractions[:, -1:] * iso["csf"]
    mean_d = fractions[:, -2] * layout["diffusivity"]["gm"] + fractions[:, -1] * layout["diffusivity"]["csf"]
    tensor = mean_d[:, None, None] * np.eye(3)
    for b, name in enumerate(_BUNDLES):
        voxels = np.flatnonzero(fractions[:, b] > 0)
        unique, inverse = np.unique(np.round(dirs[voxels, b], 9), axis=0, return_inverse=True)
        inverse = inverse.reshape(-1)
        kernels = np.stack([_kernel(gtab, layout[name]["evals"], d) for d in unique])
        evecs = np.stack([all_tensor_evecs(d) for d in unique])
        tensors = (evecs * layout[name]["evals"]) @ evecs.transpose(0, 2, 1)
        signal[voxels] += fractions[voxels, b, None] * kernels[inverse]
        tensor[voxels] += fractions[voxels, b, None, None] * tensors[inverse]
    return layout["s0_wm"] * signal, tensor


def _fa(tensor):
    from dipy.reconst.dti import fractional_anisotropy

    return np.nan_to_num(fractional_anisotropy(np.linalg.eigvalsh(tensor))).astype(np.float32)


def _peaks(fractions, dirs):
    """Truth peaks: bundles holding at least :data:`MIN_SHARE` of the voxel's white matter, largest first."""
    wm = fractions[:, : len(_BUNDLES)]
    share = wm / np.maximum(wm.sum(axis=1, keepdims=True), 1e-12)
    share[share < MIN_SHARE] = 0.0
    order = np.argsort(-share, axis=1, kind="stable")[:, :3]
    kept = np.take_along_axis(share, order, axis=1)
    kept /= np.maximum(kept.sum(axis=1, keepdims=True), 1e-12)
    peaks = np.take_along_axis(dirs, order[:, :, None], axis=1) * (kept > 0)[:, :, None]
    return peaks.astype(np.float32), kept.astype(np.float32), (kept > 0).sum(axis=1).astype(np.uint8)


def _grid(resolution, slab):
    shape, affine, _ = subject_grid(resolution, slab, fov=FOV_MM, centre=(0.0, 0.0, 0.0))
    ijk = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"), axis=-1).reshape(-1, 3)
    # Voxel centres in voxel-frame millimetres about the full slab's centre (world
    # millimetres with x flipped back): directions here are voxel-frame directions,
    # and a slab is the matching slices of the full one.
    centres = (ijk @ affine[:3, :3].T + affine[:3, 3]) * [-1.0, 1.0, 1.0]
    return shape, affine, centres


def make_multitensor_subject(seed: int, *, resolution: float | None = None, snr: float | None = None, shells=None,
                             slab: int | None = None) -> PhantomSubject:
    """Simulate one multi-tensor slab subject (see the module's description).

    Args:
        seed (`int`): non-negative seed; the same seed gives the same subject.
        resolution (`float`, *optional*): voxel size in mm (2.5 by default).
        snr (`float`, *optional*): white-matter b0 signal over the noise
            standard deviation (25 by default; ``float("inf")``: no noise).
        shells (`tuple` of `float`, *optional*): b-values, 90 directions each (``(1000,)`` by default).
        slab (`int`, *optional*): keep only this many central axial slices.

    Returns:
        :class:`~qid2_diffusers.data.phantom.PhantomSubject`, the brain phantom's record.
    """
    from dipy.core.gradients import gradient_table
    from dipy.sims.voxel import add_noise

    resolution = 2.5 if resolution is None else float(resolution)
    snr = 25.0 if snr is None else float(snr)
    shells = (1000.0,) if shells is None else tuple(float(b) for b in shells)
    check_options(seed, resolution, snr, shells)
    shape, affine, centres = _grid(resolution, slab)
    layout = _draw_layout(np.random.default_rng([int(seed), 100]))
    bvals, bvecs = hcp_scheme(shells)
    offsets = (np.stack(np.meshgrid(*[np.arange(_SUBSAMPLES)] * 3, indexing="ij"), axis=-1).reshape(-1, 3) + 0.5) / _SUBSAMPLES - 0.5
    fractions = np.concatenate([_fractions(layout, c[:, None, :] + offsets * resolution) for c in np.array_split(centres, max(1, len(centres) // 8192))])
    dirs = _directions(layout, centres)
    signal, tensor = _signal_and_tensor(layout, gradient_table(bvals, bvecs=bvecs), fractions, dirs)
    signal = signal.astype(np.float32)
    mask = (np.sum((centres[:, :2] / layout["brain_semi_mm"]) ** 2, axis=1) <= 1).reshape(shape)
    sigma = 0.0 if np.isinf(snr) else layout["s0_wm"] / snr
    noisy = signal if sigma == 0 else add_noise(signal, snr, layout["s0_wm"], noise_type="rician", rng=np.random.default_rng([int(seed), 101]))
    peaks, peak_fractions, n_fibres = _peaks(fractions, dirs)
    fa = np.where(mask.reshape(-1), _fa(tensor), 0.0)
    n = len(bvals)
    params = {"simulator": "multitensor", "seed": int(seed), "snr": snr, "sigma": float(sigma), "shells": list(shells),
              "resolution": resolution,
              "layout": json.loads(json.dumps(layout, default=lambda x: x.tolist() if isinstance(x, np.ndarray) else float(x)))}
    return PhantomSubject(
        dwi=noisy.astype(np.float32).reshape(shape + (n,)), bvals=bvals, bvecs=bvecs, affine=affine, mask=mask,
        signal=signal.reshape(shape + (n,)), fa=fa.astype(np.float32).reshape(shape),
        peaks=peaks.reshape(shape + (3, 3)), peak_fractions=peak_fractions.reshape(shape + (3,)),
        n_fibres=n_fibres.reshape(shape),
        tissue=np.column_stack([fractions[:, : len(_BUNDLES)].sum(axis=1), fractions[:, -2], fractions[:, -1]]).astype(np.float32).reshape(shape + (3,)),
        seed=int(seed), resolution=resolution, snr=snr, sigma=float(sigma), params=params,
    )

