"""Finding subjects in a dataset folder: HCP and BIDS layouts.

- HCP: ``<root>/<subject>/T1w/Diffusion/{data.nii.gz, bvals, bvecs, nodif_brain_mask.nii.gz}``
  (``<root>`` may also be one subject's folder).
- BIDS: ``<root>/sub-*/[ses-*/]dwi/*_dwi.nii[.gz]`` with ``.bval`` / ``.bvec``
  beside it and an optional ``*_desc-brain_mask`` or ``*_mask`` image.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..errors import QID2InputError
from .io import DWI, load_dwi

__all__ = ["SubjectPaths", "discover_subjects"]

_HCP_DIR = Path("T1w") / "Diffusion"


@dataclass
class SubjectPaths:
    """Where one subject's diffusion data lives.

    Args:
        subject_id (`str`): HCP subject folder name, or the BIDS file prefix
            (``sub-01_ses-1_run-1``), unique within a root.
        dwi (`Path`): the 4D series.
        bvals (`Path`): FSL b-values.
        bvecs (`Path`): FSL b-vectors.
        mask (`Path`, *optional*): brain mask.
        layout (`str`): ``"hcp"`` or ``"bids"``.
    """

    subject_id: str
    dwi: Path
    bvals: Path
    bvecs: Path
    mask: Path | None
    layout: str

    def load(self, **kwargs) -> DWI:
        """Open the subject with :func:`~qid2_diffusers.data.io.load_dwi` (kwargs pass through)."""
        return load_dwi(self.dwi, self.bvals, self.bvecs, self.mask, **kwargs)


def _require(path: Path) -> Path:
    if not path.is_file():
        raise QID2InputError(path, "file not found")
    return path


def _hcp_subject(folder: Path) -> SubjectPaths | None:
    diffusion = folder / _HCP_DIR
    dwi = diffusion / "data.nii.gz"
    if not dwi.is_file():
        return None
    mask = diffusion / "nodif_brain_mask.nii.gz"
    return SubjectPaths(
        subject_id=folder.name,
        dwi=dwi,
        bvals=_require(diffusion / "bvals"),
        bvecs=_require(diffusion / "bvecs"),
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


def _bids_subjects(root: Path) -> list[SubjectPaths]:
    found = []
    for dwi_dir in sorted([*root.glob("sub-*/dwi"), *root.glob("sub-*/ses-*/dwi")]):
        for dwi in sorted([*dwi_dir.glob("*_dwi.nii.gz"), *dwi_dir.glob("*_dwi.nii")]):
            prefix = dwi.name[: -len("_dwi.nii.gz")] if dwi.name.endswith(".gz") else dwi.name[: -len("_dwi.nii")]
            found.append(
                SubjectPaths(
                    subject_id=prefix,
                    dwi=dwi,
                    bvals=_require(dwi_dir / f"{prefix}_dwi.bval"),
                    bvecs=_require(dwi_dir / f"{prefix}_dwi.bvec"),
                    mask=_bids_mask(dwi_dir, prefix),
                    layout="bids",
                )
            )
    return found


def discover_subjects(root) -> list[SubjectPaths]:
    """All HCP and BIDS subjects under ``root``, sorted by subject id.

    Args:
        root (`str` or `os.PathLike`): dataset folder (or a single HCP subject folder).

    Raises:
        QID2InputError: if ``root`` is missing, holds no subject, or a found
            series lacks its bval/bvec file.
    """
    root = Path(root)
    if not root.is_dir():
        raise QID2InputError(root, "folder not found")
    subjects = [s for s in (_hcp_subject(root), *(_hcp_subject(d) for d in sorted(root.iterdir()) if d.is_dir())) if s]
    subjects += _bids_subjects(root)
    if not subjects:
        expected = "HCP <subject>/T1w/Diffusion/data.nii.gz or BIDS sub-*/[ses-*/]dwi/*_dwi.nii.gz"
        raise QID2InputError(root, f"no subjects found (expected {expected})")
    ids = [s.subject_id for s in subjects]
    duplicates = sorted({i for i in ids if ids.count(i) > 1})
    if duplicates:
        raise QID2InputError(root, f"subject ids found twice: {', '.join(duplicates)}")
    return sorted(subjects, key=lambda s: s.subject_id)
