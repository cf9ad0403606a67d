"""Phantom subjects on disk: the HCP layout with the truth beside it, cohorts, and reading the truth back.

Both simulators write through here, so a benchmark reads either the same way.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from ...errors import QID2InputError
from .multitensor import make_multitensor_subject
from .scheme import hcp_scheme, n_threads
from .subject import PhantomSubject, check_options, make_subject

__all__ = ["SIMULATORS", "subject_seed", "write_subject", "write_cohort", "load_truth", "truth_file"]

_MAKERS = {"brain": make_subject, "multitensor": make_multitensor_subject}
#: Simulators a cohort can be drawn from: the brain phantom (training and
#: evaluation) and an independent multi-tensor slab (evaluation only).
SIMULATORS = tuple(_MAKERS)

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

    from ..io import save_nifti

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
        with ThreadPoolExecutor(n_threads()) as pool:
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
    out_dir, i, seed, simulator, options = job
    return write_subject(_MAKERS[simulator](subject_seed(seed, i), **options), out_dir, f"phantom-{i:03d}")


def write_cohort(out_dir, n_subjects: int, seed: int, *, resolution: float | None = None, snr: float | None = None,
                 shells=None, slab=None, randomize: bool = False, simulator: str = "brain", progress: bool = True,
                 jobs: int = 1) -> list[Path]:
    """Simulate and write ``n_subjects`` phantoms ``phantom-000``, ``phantom-001``, ...

    Subject ``i`` is drawn with :func:`subject_seed` ``(seed, i)``, so a cohort
    grows without changing the subjects it already has.

    Args:
        out_dir (`str` or `os.PathLike`): cohort root (HCP layout under it).
        n_subjects (`int`): number of subjects, at least 1.
        seed (`int`): cohort seed.
        resolution (`float`, *optional*): voxel size (mm); the simulator's default when `None`.
        snr (`float`, *optional*): white-matter b0 SNR; the simulator's default when `None`.
        shells (`tuple` of `float`, *optional*): b-values; the simulator's default when `None`.
        slab (`int`, *optional*): central axial slices only.
        randomize (`bool`, *optional*, defaults to `False`): domain-randomised
            brain phantoms (:func:`~qid2_diffusers.data.phantom.make_subject`).
        simulator (`str`, *optional*, defaults to `"brain"`): one of :data:`SIMULATORS`.
        progress (`bool`, *optional*, defaults to `True`): show a tqdm bar.
        jobs (`int`, *optional*, defaults to 1): subjects simulated in parallel
            processes; every subject is the same whatever the number.

    Returns:
        `list` of subject folders.
    """
    from tqdm.auto import tqdm

    if isinstance(n_subjects, bool) or not isinstance(n_subjects, (int, np.integer)) or n_subjects < 1:
        raise QID2InputError(None, f"number of subjects must be a positive integer, got {n_subjects!r}")
    if simulator not in SIMULATORS:
        raise QID2InputError(None, f"simulator must be one of {', '.join(SIMULATORS)}, got {simulator!r}")
    if randomize and simulator != "brain":
        raise QID2InputError(None, f"randomize applies to the brain phantom, not the {simulator} simulator")
    resolution = None if resolution is None else float(resolution)
    snr = None if snr is None else float(snr)
    shells = None if shells is None else tuple(float(b) for b in shells)
    check_options(seed, resolution, snr, shells)
    options = {"resolution": resolution, "snr": snr, "shells": shells, "slab": slab}
    if randomize:
        options["randomize"] = True
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    work = [(out_dir, i, seed, simulator, options) for i in range(n_subjects)]
    bar = dict(desc="phantom", unit="subject", total=n_subjects, disable=not progress)
    if jobs <= 1 or n_subjects == 1:
        return [_write_one(job) for job in tqdm(work, **bar)]
    import multiprocessing

    # Forked workers inherit the imported package and the cached scheme.
    hcp_scheme(shells=shells or (1000.0,))
    with multiprocessing.get_context("fork").Pool(min(jobs, n_subjects)) as pool:
        return list(tqdm(pool.imap(_write_one, work), **bar))


def truth_file(subject_dir, key: str) -> Path:
    """Where a written phantom keeps one part of its truth (``key``: ``signal``, ``fa``, ``peaks``, ...)."""
    return Path(subject_dir) / "truth" / _TRUTH_FILES[key]


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

    from ..io import load_dwi

    subject_dir = Path(subject_dir)
    diffusion = subject_dir / _DIFFUSION_DIR
    dwi = load_dwi(diffusion / "data.nii.gz", diffusion / "bvals", diffusion / "bvecs", diffusion / "nodif_brain_mask.nii.gz")
    out = {"bvals": dwi.bvals, "bvecs": dwi.bvecs, "affine": dwi.affine, "mask": dwi.mask}
    for key in _TRUTH_FILES:
        if key == "signal" and not signal:
            continue
        path = truth_file(subject_dir, key)
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
