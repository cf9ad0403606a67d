"""Denoising the acquired series: the first step of every mainstream dMRI pipeline.

MP-PCA (Veraart et al. 2016; MRtrix3 ``dwidenoise``, dipy
:func:`~dipy.denoise.localpca.mppca`; QSIPrep runs it by default) followed by a
tensor fit is what a researcher compares an up-sampler against, so the engine
(:func:`~qid2_diffusers.inference.upsample_dwi`, ``qid2 upsample --denoise``),
the baselines (``mppca+dti``, ``mppca+sh4``, ``patch2self+dti``, ...) and the
benchmark all denoise here, with one rule for when MP-PCA can work.

MP-PCA needs patches holding more voxels than the series has volumes (the
Marchenko-Pastur fit of the noise eigenvalues is meaningless otherwise), and a
grid at least two patches wide along every patched axis: on a smaller crop every
patch is nearly the whole crop, its tissue contrast passes for signal components
and the noise estimate is wrong (on the 6x8x9 b = 3000 real crop dipy's default 5x5x5
MP-PCA made the tensor fit's FA error 1.18x worse). :func:`plan_denoising` picks the smallest
cubic patch that satisfies both (``dwidenoise``'s default is the smallest cube
with more voxels than volumes), else the smallest in-plane patch (thin scans,
e.g. two slices), else nothing, and says which in one line
(:attr:`DenoisePlan.note`). A single b0 is denoised with the rest: with only
one b0 kept, MP-PCA still lowered the FA error on every real case it could run on, thin
or not (``python benchmarks/denoise_rules.py``, ``benchmarks/results/denoise/rules.txt``).
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .gradients import B0_THRESHOLD
from .threads import z_blocks

__all__ = ["DENOISERS", "DEFAULT_DENOISE", "DenoisePlan", "DenoiseResult", "available_denoisers", "plan_denoising",
           "denoise_box", "patch_centres", "denoise_series"]

#: ``--denoise`` choices: MP-PCA by dipy, MP-PCA by MRtrix3's ``dwidenoise`` (C++, threaded; on the PATH), dipy's
#: Patch2Self (OLS), or none. Both MP-PCAs use the same patches (:func:`plan_denoising`) and estimator.
DENOISERS = ("mppca", "dwidenoise", "patch2self", "none")
#: The denoisers that are MP-PCA.
MPPCA = ("mppca", "dwidenoise")

#: The engine's default (``qid2 upsample``, the example, the demo, ``--cohort``), chosen on the
#: validation phantoms (BENCHMARK.md, "Denoise then up-sample").
DEFAULT_DENOISE = "mppca"

#: Smallest patch radius MP-PCA is used with (5 voxels across, dwidenoise's smallest default extent).
MIN_PATCH_RADIUS = 2
#: Largest patch radius tried: past this, patches mix tissues (15 voxels across is 37 mm at 2.5 mm).
MAX_PATCH_RADIUS = 7
#: dipy's MP-PCA is split over processes only when each gets at least this many patch centres: below it,
#: starting a process (importing dipy) costs more than it saves.
MIN_VOXELS_PER_WORKER = 20_000


@dataclass(frozen=True)
class DenoisePlan:
    """What :func:`denoise_series` does to one series.

    Args:
        method (`str`): one of :data:`DENOISERS` (what will run, after any fallback).
        requested (`str`): the method asked for.
        patch_radius (`tuple` of 3 `int`, *optional*): MP-PCA's patch radius per axis (0 along z: in-plane patches).
        volumes (`np.ndarray` of `int`): the volumes denoised (the others are kept as acquired).
        note (`str`): one line saying what is done and, after a fallback, why.
    """

    method: str
    requested: str
    patch_radius: tuple | None
    volumes: np.ndarray
    note: str

    @property
    def fell_back(self) -> bool:
        """Whether the plan is not what was asked for (another method, or MP-PCA on in-plane patches): the
        engine warns with :attr:`note` then."""
        return self.method != self.requested or self.patch_radius is not None and self.patch_radius[2] == 0


@dataclass
class DenoiseResult:
    """A denoised series.

    Args:
        data (`np.ndarray` of shape `(X, Y, Z, N)`, float32): the series, the planned volumes denoised.
        plan ([`DenoisePlan`]): what was done.
        sigma (`np.ndarray` of shape `(X, Y, Z)`, *optional*): MP-PCA's noise level per voxel, in signal units.
    """

    data: np.ndarray
    plan: DenoisePlan
    sigma: np.ndarray | None = None


def _smallest_radius(n_volumes: int, extents, in_plane: bool) -> int | None:
    """The smallest patch radius whose patch (a cube, or a square in-plane) holds more voxels than
    ``n_volumes`` and fits twice along each of ``extents``; `None` when none does."""
    dims = 2 if in_plane else 3
    return next((r for r in range(MIN_PATCH_RADIUS, MAX_PATCH_RADIUS + 1)
                 if (2 * r + 1) ** dims > n_volumes and 2 * (2 * r + 1) <= min(extents)), None)


def available_denoisers() -> tuple[str, ...]:
    """:data:`DENOISERS` that can run here (``dwidenoise`` only with MRtrix3 on the PATH)."""
    return tuple(d for d in DENOISERS if d != "dwidenoise" or shutil.which("dwidenoise"))


def check_denoiser(method: str) -> None:
    """Raise a one-line error for a denoiser that cannot run here.

    Raises:
        QID2InputError: (a ``ValueError``) an unknown method, or ``dwidenoise`` without MRtrix3 on the PATH.
    """
    from .errors import QID2InputError

    if method not in DENOISERS:
        raise QID2InputError(None, f"unknown denoiser {method!r}; choose from {', '.join(DENOISERS)}")
    if method not in available_denoisers():
        raise QID2InputError(None, "--denoise dwidenoise needs MRtrix3's dwidenoise on the PATH (e.g. conda install -c mrtrix3 "
                         "mrtrix3, or scripts/setup.sh --test); --denoise mppca is the same method in dipy")


def plan_denoising(shape, bvals, method: str = "mppca", *, usable=None, b0_threshold: float = B0_THRESHOLD,
                   what: str = "the series") -> DenoisePlan:
    """Choose what denoising can do for a series of ``shape`` ``(X, Y, Z, N)``.

    Args:
        shape (`tuple`): the series' shape (only its grid and volume count matter).
        bvals (`array-like` of shape `(N,)`): its b-values.
        method (`str`, *optional*, defaults to `"mppca"`): one of :data:`DENOISERS`.
        usable (`array-like` of `bool`, *optional*): volumes that hold signal; the others are never denoised.
        b0_threshold (`float`, *optional*): b0 cut-off.
        what (`str`, *optional*): how the note names the series.

    Raises:
        ValueError: an unknown method.
    """
    if method not in DENOISERS:
        raise ValueError(f"unknown denoiser {method!r}; choose from {', '.join(DENOISERS)}")
    bvals = np.asarray(bvals, dtype=np.float64)
    usable = np.ones(len(bvals), dtype=bool) if usable is None else np.asarray(usable, dtype=bool)
    volumes = np.flatnonzero(usable)
    if method == "none":
        return DenoisePlan("none", method, None, volumes[:0], "not denoised (--denoise none)")
    b0 = np.flatnonzero(usable & (bvals <= b0_threshold))
    n = len(volumes)
    if method == "patch2self":
        # Patch2Self regresses each volume on the others: it needs a few of them.
        if n < 10 or len(b0) == 0:
            return DenoisePlan("none", method, None, volumes[:0],
                               f"not denoised: Patch2Self needs a b0 and at least 10 volumes, {what} has {n}")
        return DenoisePlan("patch2self", method, None, volumes,
                           f"denoised {n} volumes of {what} with Patch2Self (dipy, OLS)")
    x, y, z = (int(s) for s in shape[:3])
    name = "MP-PCA" if method == "mppca" else "MP-PCA (MRtrix3 dwidenoise)"
    cube = _smallest_radius(n, (x, y, z), in_plane=False)
    if cube is not None:
        radius = (cube, cube, cube)
        return DenoisePlan(method, method, radius, volumes,
                           f"denoised {n} volumes of {what} with {name} ({_extent(radius)} patches)")
    flat = _smallest_radius(n, (x, y), in_plane=True)
    if flat is not None:
        radius = (flat, flat, 0)
        return DenoisePlan(method, method, radius, volumes,
                           f"denoised {n} volumes of {what} with {name} on in-plane {_extent(radius)} patches: "
                           f"its {z} slice(s) are too few for 3-D patches with more voxels than volumes")
    return DenoisePlan("none", method, None, volumes[:0],
                       f"not denoised: MP-PCA needs patches with more voxels than the {n} volumes and a grid two "
                       f"patches wide, and {what}'s {x}x{y}x{z} brain box is too small")


def _extent(radius) -> str:
    return "x".join(str(2 * r + 1) for r in radius)


def patch_centres(mask, radius) -> np.ndarray:
    """The voxels MP-PCA centres a patch on: the brain mask widened by the patch radius along each axis.

    A voxel's denoised value is the weighted mean of every patch that holds it, so centring patches on
    this set (not on the whole box) gives every brain voxel exactly the value a whole-box run gives it,
    at the cost of the brain and a rim only (a third of the HCP-grid box is outside it)."""
    from scipy.ndimage import binary_dilation

    structure = np.ones(tuple(2 * r + 1 for r in radius), dtype=bool)
    return binary_dilation(np.asarray(mask, dtype=bool), structure=structure)


def _dipy_mppca_part(block, centres, radius):
    """dipy's MP-PCA of one block (one worker's share), one BLAS thread: the workers are the parallelism."""
    from dipy.denoise.localpca import mppca
    from threadpoolctl import threadpool_limits

    with threadpool_limits(1), np.errstate(invalid="ignore"):
        return mppca(block, mask=centres, patch_radius=np.asarray(radius), return_sigma=True, suppress_warning=True)


def _dipy_mppca(block, centres, radius, workers: int):
    """dipy's MP-PCA of ``block``, split along z over ``workers`` processes (dipy's loop is pure Python,
    so one core each). Each worker gets its slices plus ``2 r`` on either side, so the patches centred
    within ``r`` of its slices are all its own and every voxel it returns equals a single run's."""
    r = int(radius[2])
    parts = workers if int(centres.sum()) >= MIN_VOXELS_PER_WORKER * 2 else 1
    # Halo 2 r: a voxel's value comes from the patches centred within r of it, which reach r further.
    blocks = z_blocks(block.shape[2], 2 * r, parts)
    if len(blocks) == 1:
        return _dipy_mppca_part(block, centres, radius)
    from concurrent.futures import ProcessPoolExecutor
    from multiprocessing import get_context

    den = np.empty(block.shape, dtype=np.float32)
    sigma = np.empty(block.shape[:3], dtype=np.float32)
    # spawn, not fork: the engine's process holds torch's OpenMP pool, which a forked child can deadlock on.
    with ProcessPoolExecutor(len(blocks), mp_context=get_context("spawn")) as pool:
        jobs = [pool.submit(_dipy_mppca_part, block[:, :, s0:s1], centres[:, :, s0:s1], radius)
                for _, _, s0, s1 in blocks]
        for (z0, z1, s0, _), job in zip(blocks, jobs):
            part_den, part_sigma = job.result()
            den[:, :, z0:z1] = part_den[:, :, z0 - s0: z1 - s0]
            sigma[:, :, z0:z1] = part_sigma[:, :, z0 - s0: z1 - s0]
    return den, sigma


def _mppca(block, radius, method, centres, workers: int = 1):
    """``(denoised, sigma)`` of a 4-D block, patches centred on ``centres`` only, with dipy, or with MRtrix3's
    dwidenoise (C++, threaded), told to use Veraart et al.'s original noise cut-off (``Exp1``), the one dipy
    implements, not its default ``Exp2``. Voxels outside ``centres`` come back as NaN."""
    if method == "mppca":
        den, sigma = _dipy_mppca(block, centres, radius, workers)  # float32: dipy keeps the block's dtype
    else:
        import nibabel as nib

        with tempfile.TemporaryDirectory(prefix="qid2-dwidenoise-") as tmp:
            tmp = Path(tmp)
            nib.save(nib.Nifti1Image(block.astype(np.float32), np.eye(4)), tmp / "in.nii")
            nib.save(nib.Nifti1Image(centres.astype(np.uint8), np.eye(4)), tmp / "mask.nii")
            extent = ",".join(str(2 * r + 1) for r in radius)
            subprocess.run(["dwidenoise", str(tmp / "in.nii"), str(tmp / "out.nii"), "-noise", str(tmp / "sigma.nii"),
                            "-mask", str(tmp / "mask.nii"), "-extent", extent, "-estimator", "Exp1",
                            "-nthreads", str(workers), "-quiet", "-force"], check=True, capture_output=True)
            den = np.asarray(nib.load(tmp / "out.nii").dataobj, dtype=np.float32)
            sigma = np.asarray(nib.load(tmp / "sigma.nii").dataobj, dtype=np.float32)
    den[~centres] = np.nan
    sigma[~centres] = np.nan
    return den, sigma


def denoise_box(mask, margin: int = MAX_PATCH_RADIUS) -> tuple[slice, slice, slice]:
    """The part of the grid that is denoised: the brain's box widened by ``margin`` voxels on every side,
    so brain voxels near its edge see whole patches (voxels outside are never up-sampled)."""
    from .upsampling import brain_bounding_box, brain_slices

    mask = np.asarray(mask, dtype=bool)
    bx, by = brain_bounding_box(mask, margin=margin)
    zs = brain_slices(mask)
    if not len(zs):
        return slice(0, mask.shape[0]), slice(0, mask.shape[1]), slice(0, mask.shape[2])
    return bx, by, slice(max(0, int(zs[0]) - margin), min(mask.shape[2], int(zs[-1]) + 1 + margin))


def denoise_series(data, bvals, method: str = "mppca", *, mask=None, usable=None, b0_threshold: float = B0_THRESHOLD,
                   workers: int | None = None, what: str = "the series", out=None) -> DenoiseResult:
    """Denoise the volumes of a DWI series (b0s and every shell together, as ``dwidenoise`` does).

    Only :func:`denoise_box` is denoised, and :func:`plan_denoising` plans on
    its shape; voxels outside it are kept as acquired: they are never
    up-sampled, and denoising them would cost most of the time on a whole-head grid.
    MP-PCA centres its patches on the mask widened by the patch radius
    (:func:`patch_centres`): brain voxels get exactly a whole-box run's values,
    voxels outside that rim are kept as acquired.

    Args:
        data (`array-like` of shape `(X, Y, Z, N)`): the series, axial slices along the third axis.
        bvals (`array-like` of shape `(N,)`): its b-values.
        method (`str`, *optional*, defaults to `"mppca"`): one of :data:`DENOISERS`.
        mask (`np.ndarray` of shape `(X, Y, Z)`, *optional*): brain mask; defaults to the whole grid.
        usable (`array-like` of `bool`, *optional*): volumes holding signal (empty ones are never denoised).
        b0_threshold (`float`, *optional*): b0 cut-off.
        workers (`int`, *optional*): processes for dipy's MP-PCA, threads for dwidenoise; defaults to
            :func:`~qid2_diffusers.threads.cpu_workers` (``OMP_NUM_THREADS``, else every CPU).
        what (`str`, *optional*): how the plan's note names the series.
        out (`np.ndarray`, *optional*): write the denoised volumes into this array (may be ``data`` itself);
            by default a float32 copy of ``data`` is made.

    Returns:
        [`DenoiseResult`]; its ``plan.note`` is the one line to show the user.
    """
    check_denoiser(method)
    shape = tuple(np.shape(data))
    mask = np.ones(shape[:3], dtype=bool) if mask is None else np.asarray(mask, dtype=bool)
    box = denoise_box(mask)
    box_shape = tuple(s.stop - s.start for s in box) + shape[3:]
    plan = plan_denoising(box_shape, bvals, method, usable=usable, b0_threshold=b0_threshold, what=what)
    result = np.array(data, dtype=np.float32, copy=True) if out is None else out
    if plan.method == "none":
        return DenoiseResult(result, plan)
    block = np.asarray(data[box], dtype=np.float32)[..., plan.volumes]
    sigma = None
    if plan.method in MPPCA:
        from .threads import cpu_workers

        den, box_sigma = _mppca(block, plan.patch_radius, plan.method, patch_centres(mask[box], plan.patch_radius),
                                cpu_workers() if workers is None else workers)
        # Outside the patches' reach: kept as acquired, noise level unknown (0).
        den = np.where(np.isfinite(den), den, block)
        sigma = np.zeros(shape[:3], dtype=np.float32)
        sigma[box] = np.nan_to_num(box_sigma, nan=0.0)
    else:
        from dipy.denoise.patch2self import patch2self

        bvals_used = np.asarray(bvals, dtype=np.float64)[plan.volumes]
        # The b0s are kept as acquired: regressing each b0 on the few others was far worse on the real
        # cases (mdt b=2000: FA error 0.223 with them denoised, 0.052 without; the plain fit 0.025).
        den = patch2self(block, bvals_used, model="ols", b0_threshold=b0_threshold, shift_intensity=True,
                         clip_negative_vals=False, b0_denoising=False, verbose=False).astype(np.float32)
    for j, k in enumerate(plan.volumes):
        result[box + (k,)] = den[..., j]
    return DenoiseResult(result, plan, sigma)
