"""Real scanner data for evaluation: what ships inside public packages, and the cases scored on it.

Real scans are the judge, never the teacher: nothing here is used to train
or to choose shipped weights. Two sources, both reachable from a fresh
machine without a download at run time of tests or the demo:

- the MRtrix3 crops committed under ``tests/data/real/`` (``msmt``: shells
  700/1200/2800; ``b3000``: one b = 3000 shell);
- the Siemens Prisma scan inside the ``mdt`` wheel on PyPI
  (``mdt/data/mdt_example_data/b1k_b2k/``: 104 x 104 x 2, 2 mm, 13 b0 + 30
  directions at b = 1000 + 60 at b = 2000, with a mask), fetched once by
  :func:`fetch_mdt_example` (``scripts/setup.sh --test`` does it). The wheel
  is only read as a zip: mdt itself needs OpenCL and is never imported or
  installed.

Each :class:`RealCase` is one shell of one scan: one third of its directions
(a uniform subset, at least :data:`MIN_KEPT`) are kept as the acquisition, the
rest are the targets, scored against the full acquisition.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import uuid
import zipfile
from dataclasses import dataclass
from pathlib import Path

__all__ = [
    "MDT_VERSION",
    "MDT_FILES",
    "MIN_KEPT",
    "RealCase",
    "real_cases",
    "fetch_mdt_example",
    "default_real_data_dir",
    "kept_count",
]

MDT_VERSION = "1.2.7"
_MDT_PREFIX = "mdt/data/mdt_example_data/b1k_b2k/"
#: Files taken from the wheel, renamed to the package's NIfTI + sidecar convention,
#: with their SHA-256 (the wheel's own content, checked after extraction).
MDT_FILES = {
    "b1k_b2k_example_slices_24_38.nii.gz": ("dwi.nii.gz", "993bd917b680805eb5fab213917d9960adff905f6cfd9286c3a748782a81daa4"),
    "b1k_b2k.bval": ("dwi.bval", "896cc6413582001c083504df232f6c79ddb04762cbec67cd9ee4f81fc6d3f945"),
    "b1k_b2k.bvec": ("dwi.bvec", "40b5ee294762eae4e2d4182260e04193e3788ab43cf4d90c7dda414add8f1e61"),
    "b1k_b2k_example_slices_24_38_mask.nii.gz": ("mask.nii.gz", "18886f0e2ac0105bd9bc01434771315dfabf79607825eb34cdf00cbc66befde0"),
}
#: Fewest directions kept per shell: a tensor has six unknowns besides S0.
MIN_KEPT = 6
_MDT_FOLDER = "mdt_b1k_b2k"


def default_real_data_dir() -> Path:
    """``$QID2_REAL_DATA``, else ``tests/data/real`` of a source checkout."""
    env = os.environ.get("QID2_REAL_DATA")
    if env:
        return Path(env)
    return Path(__file__).resolve().parents[2] / "tests" / "data" / "real"


def kept_count(n_directions: int) -> int:
    """Directions kept as the acquisition: one third, but never fewer than :data:`MIN_KEPT`."""
    return min(n_directions - 1, max(MIN_KEPT, round(n_directions / 3)))


@dataclass(frozen=True)
class RealCase:
    """One shell of one real scan, up-sampled from a third of its directions.

    Args:
        name (`str`): label in tables, e.g. ``"mdt-b2000"``.
        dwi (`Path`), bvals (`Path`), bvecs (`Path`): the scan (FSL sidecars).
        mask (`Path`, *optional*): its brain mask; without one every voxel counts.
        shell (`float`): b-value of the shell.
        source (`str`): provenance, one line.
    """

    name: str
    dwi: Path
    bvals: Path
    bvecs: Path
    mask: Path | None
    shell: float
    source: str

    def load(self):
        """The whole scan as a :class:`~qid2_diffusers.data.io.DWI` (mask attached when there is one)."""
        from .io import load_dwi

        return load_dwi(self.dwi, self.bvals, self.bvecs, self.mask)


_MRTRIX = "MRtrix3 test_data crop (github.com/MRtrix3/test_data)"
_MDT = f"Siemens Prisma scan in the mdt {MDT_VERSION} wheel (PyPI), mdt_example_data/b1k_b2k"
_CASES = (
    ("mdt-b1000", _MDT_FOLDER, "dwi", "mask.nii.gz", 1000, _MDT),
    ("mdt-b2000", _MDT_FOLDER, "dwi", "mask.nii.gz", 2000, _MDT),
    ("mrtrix-msmt-b700", ".", "msmt", None, 700, _MRTRIX),
    ("mrtrix-msmt-b1200", ".", "msmt", None, 1200, _MRTRIX),
    ("mrtrix-msmt-b2800", ".", "msmt", None, 2800, _MRTRIX),
    ("mrtrix-b3000", ".", "b3000", None, 3000, _MRTRIX),
)


def real_cases(root=None, *, require_all: bool = True) -> list[RealCase]:
    """The real evaluation cases found under ``root`` (default :func:`default_real_data_dir`).

    Args:
        root (`str` or `os.PathLike`, *optional*): folder holding the MRtrix3
            crops and the ``mdt_b1k_b2k/`` folder written by :func:`fetch_mdt_example`.
        require_all (`bool`, *optional*, defaults to `True`): raise when a scan
            is missing, naming the command that fetches it; otherwise skip it.
    """
    from ..errors import QID2InputError

    root = Path(root) if root is not None else default_real_data_dir()
    cases = []
    for name, folder, stem, mask, shell, source in _CASES:
        base = root / folder
        dwi = base / f"{stem}.nii.gz"
        if not dwi.is_file():
            if require_all:
                raise QID2InputError(dwi, "real scan not found (fetch it with: python -m qid2_diffusers.data.real "
                                          f"{root})")
            continue
        cases.append(RealCase(name, dwi, base / f"{stem}.bval", base / f"{stem}.bvec",
                              base / mask if mask else None, float(shell), source))
    return cases


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def fetch_mdt_example(root=None, *, wheel: str | os.PathLike | None = None) -> Path:
    """Put the mdt wheel's b1k_b2k scan in ``root/mdt_b1k_b2k/`` (kept when already there).

    Downloads the wheel with ``pip download --no-deps`` (or reads ``wheel``),
    extracts only the four data files, and renames the folder into place in
    one step, so an interrupted fetch never leaves a partial scan.

    Returns:
        `Path`: the folder holding ``dwi.nii.gz``, ``dwi.bval``, ``dwi.bvec`` and ``mask.nii.gz``.
    """
    root = Path(root) if root is not None else default_real_data_dir()
    dest = root / _MDT_FOLDER
    if all((dest / new).is_file() for new, _ in MDT_FILES.values()):
        return dest
    root.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="qid2-mdt-") as tmp:
        if wheel is None:
            subprocess.run(
                [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--disable-pip-version-check",
                 f"mdt=={MDT_VERSION}", "-d", tmp],
                check=True,
            )
            wheel = next(Path(tmp).glob("mdt-*.whl"))
        staging = root / f".{_MDT_FOLDER}.{uuid.uuid4().hex[:12]}.tmp"
        staging.mkdir()
        try:
            with zipfile.ZipFile(wheel) as zf:
                for name, (new, digest) in MDT_FILES.items():
                    with zf.open(_MDT_PREFIX + name) as src, open(staging / new, "wb") as dst:
                        shutil.copyfileobj(src, dst)
                    if _sha256(staging / new) != digest:
                        raise RuntimeError(f"{wheel}: {name} is not the file this package was written for "
                                           f"(SHA-256 differs from mdt {MDT_VERSION}'s)")
            (staging / "README.md").write_text(
                f"# {_MDT}\n\nExtracted by `python -m qid2_diffusers.data.real` from "
                f"`pip download --no-deps mdt=={MDT_VERSION}` (the wheel read as a zip; mdt is never installed).\n"
                "Original names: " + ", ".join(f"{k} -> {v[0]}" for k, v in MDT_FILES.items()) + ".\n"
                "For evaluation only: never train on it or choose shipped weights with it.\n"
            )
            if dest.exists():
                shutil.rmtree(dest)
            os.replace(staging, dest)
        finally:
            if staging.exists():
                shutil.rmtree(staging)
    return dest


def _main(argv=None) -> int:
    import argparse

    p = argparse.ArgumentParser(prog="python -m qid2_diffusers.data.real",
                                description="Fetch the real evaluation scan shipped in the mdt wheel.")
    p.add_argument("root", nargs="?", default=None, help="folder for mdt_b1k_b2k/ (default: tests/data/real)")
    p.add_argument("--wheel", default=None, help="a downloaded mdt wheel instead of pip download")
    args = p.parse_args(argv)
    print(fetch_mdt_example(args.root, wheel=args.wheel))
    return 0


if __name__ == "__main__":
    raise SystemExit(_main())
