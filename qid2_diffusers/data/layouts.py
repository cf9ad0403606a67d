"""Finding subjects in a dataset folder (HCP and BIDS layouts) or a list file.

- HCP: ``<root>/<subject>/T1w/Diffusion/{data.nii.gz, bvals, bvecs, nodif_brain_mask.nii.gz}``
  (``<root>`` may also be one subject's folder).
- BIDS: ``<root>/sub-*/[ses-*/]dwi/*_dwi.nii[.gz]`` with ``.bval`` / ``.bvec``
  beside it and an optional ``*_desc-brain_mask`` or ``*_mask`` image.
- A list file: one series per line (:func:`read_subject_list`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from ..errors import QID2InputError
from .io import DWI, load_dwi, nifti_stem

__all__ = ["SubjectPaths", "discover_subjects", "read_subject_list"]

_HCP_DIR = Path("T1w") / "Diffusion"


@dataclass
class SubjectPaths:
    """Where one subject's diffusion data lives.

    Args:
        subject_id (`str`): HCP subject folder name, or the BIDS file prefix
            (``sub-01_ses-1_run-1``), unique within a root.
        dwi (`Path`): the 4D series.
        bvals (`Path`): FSL b-values; `None` for the sidecar next to the image
            that :func:`~qid2_diffusers.data.io.load_dwi` looks for.
        bvecs (`Path`): FSL b-vectors; `None` as for ``bvals``.
        mask (`Path`, *optional*): brain mask.
        layout (`str`): ``"hcp"``, ``"bids"`` or ``"list"``.
    """

    subject_id: str
    dwi: Path
    bvals: Path | None
    bvecs: Path | None
    mask: Path | None
    layout: str

    def load(self, **kwargs) -> DWI:
        """Open the subject with :func:`~qid2_diffusers.data.io.load_dwi` (kwargs pass through)."""
        return load_dwi(self.dwi, self.bvals, self.bvecs, self.mask, **kwargs)


def _require(path: Path, check: bool = True) -> Path:
    if check and not path.is_file():
        raise QID2InputError(path, "file not found")
    return path


def _hcp_subject(folder: Path, check: bool = True) -> SubjectPaths | None:
    diffusion = folder / _HCP_DIR
    dwi = diffusion / "data.nii.gz"
    if not dwi.is_file():
        return None
    mask = diffusion / "nodif_brain_mask.nii.gz"
    return SubjectPaths(
        subject_id=folder.name,
        dwi=dwi,
        bvals=_require(diffusion / "bvals", check),
        bvecs=_require(diffusion / "bvecs", check),
        mask=mask if mask.is_file() else None,
        layout="hcp",
    )


def _bids_mask(dwi_dir: Path, prefix: str) -> Path | None:
    for name in (f"{prefix}_desc-brain_mask", f"{prefix}_mask", f"{prefix}_dwi_mask"):
        for ext in (".nii.gz", ".nii"):
            if (dwi_dir / (name + ext)).is_file():
                return dwi_dir / (name + ext)
    # A single mask in the folder belongs to the folder's series.
    masks = sorted(p for p in dwi_dir.iterdir() if p.name.endswith(("_mask.nii.gz", "_mask.nii")))
    return masks[0] if len(masks) == 1 else None


def _bids_subjects(root: Path, check: bool = True) -> list[SubjectPaths]:
    found = []
    for dwi_dir in sorted([*root.glob("sub-*/dwi"), *root.glob("sub-*/ses-*/dwi")]):
        for dwi in sorted([*dwi_dir.glob("*_dwi.nii.gz"), *dwi_dir.glob("*_dwi.nii")]):
            prefix = dwi.name[: -len("_dwi.nii.gz")] if dwi.name.endswith(".gz") else dwi.name[: -len("_dwi.nii")]
            found.append(
                SubjectPaths(
                    subject_id=prefix,
                    dwi=dwi,
                    bvals=_require(dwi_dir / f"{prefix}_dwi.bval", check),
                    bvecs=_require(dwi_dir / f"{prefix}_dwi.bvec", check),
                    mask=_bids_mask(dwi_dir, prefix),
                    layout="bids",
                )
            )
    return found


def discover_subjects(root, *, check_sidecars: bool = True) -> list[SubjectPaths]:
    """All HCP and BIDS subjects under ``root``, sorted by subject id.

    Args:
        root (`str` or `os.PathLike`): dataset folder (or a single HCP subject folder).
        check_sidecars (`bool`, *optional*, defaults to `True`): raise here when a
            found series lacks its bval/bvec file; `False` leaves it to the
            subject's :meth:`SubjectPaths.load`, so one incomplete subject does
            not stop a whole cohort.

    Raises:
        QID2InputError: if ``root`` is missing, holds no subject, or a found
            series lacks its bval/bvec file.
    """
    root = Path(root)
    if not root.is_dir():
        raise QID2InputError(root, "folder not found")
    folders = [root, *(d for d in sorted(root.iterdir()) if d.is_dir())]
    subjects = [s for s in (_hcp_subject(d, check_sidecars) for d in folders) if s]
    subjects += _bids_subjects(root, check_sidecars)
    if not subjects:
        expected = "HCP <subject>/T1w/Diffusion/data.nii.gz or BIDS sub-*/[ses-*/]dwi/*_dwi.nii.gz"
        raise QID2InputError(root, f"no subjects found (expected {expected})")
    ids = [s.subject_id for s in subjects]
    duplicates = sorted({i for i in ids if ids.count(i) > 1})
    if duplicates:
        raise QID2InputError(root, f"subject ids found twice: {', '.join(duplicates)}")
    return sorted(subjects, key=lambda s: s.subject_id)


def _listed_mask(dwi: Path) -> Path | None:
    # Named after the image only: in a flat folder of many series, a lone mask
    # is not necessarily this series' (unlike a BIDS dwi/ folder).
    stem = nifti_stem(dwi)
    names = [f"{stem}_mask", f"{stem}_brain_mask"]
    if stem.endswith("_dwi"):
        names += [f"{stem[: -len('_dwi')]}_desc-brain_mask", f"{stem[: -len('_dwi')]}_mask"]
    if stem == "data":
        names.append("nodif_brain_mask")
    return next((dwi.with_name(n + ext) for n in names for ext in (".nii.gz", ".nii")
                 if dwi.with_name(n + ext).is_file()), None)


def read_subject_list(path) -> list[SubjectPaths]:
    """The series named in a list file, one per line, in the file's order.

    Each line is a ``.nii`` / ``.nii.gz`` path, relative to the list file's
    folder unless absolute; ``#`` starts a comment, blank lines are skipped.
    The bval/bvec files are the ones :func:`~qid2_diffusers.data.io.load_dwi`
    finds next to the image; a mask named ``<stem>_mask``, ``<stem>_brain_mask``,
    the BIDS ``*_desc-brain_mask`` / ``*_mask`` of a ``*_dwi`` image or HCP's
    ``nodif_brain_mask`` beside ``data`` is used. A subject's id is its path below
    the folder all listed series share, without the extension
    (``sub-01/dwi`` for ``/data/sub-01/dwi.nii.gz`` listed with ``/data/sub-02/dwi.nii.gz``).
    Missing images are not checked here: they fail when loaded.

    Raises:
        QID2InputError: if the list cannot be read, names no series, names a
            file that is not NIfTI, or names one series twice.
    """
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise QID2InputError(path, f"cannot read the list file ({getattr(exc, 'strerror', None) or exc})") from None
    entries = []
    for number, line in enumerate(lines, start=1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        dwi = Path(line).expanduser()
        dwi = Path(os.path.normpath(dwi if dwi.is_absolute() else path.absolute().parent / dwi))
        if not dwi.name.endswith((".nii", ".nii.gz")):
            raise QID2InputError(path, f"line {number}: {line} is not a .nii or .nii.gz file")
        if dwi in entries:
            raise QID2InputError(path, f"line {number}: {line} is listed twice")
        entries.append(dwi)
    if not entries:
        raise QID2InputError(path, "the list file names no series (one .nii.gz path per line)")
    common = Path(os.path.commonpath([d.parent for d in entries]))
    return [SubjectPaths(subject_id=(d.parent / nifti_stem(d)).relative_to(common).as_posix(), dwi=d, bvals=None,
                         bvecs=None, mask=_listed_mask(d), layout="list") for d in entries]
