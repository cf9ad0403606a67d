"""Reading, validating and writing diffusion-weighted images (NIfTI + FSL bvals/bvecs).

A :class:`DWI` keeps the image lazy: ``data`` is nibabel's ``dataobj`` proxy,
so ``dwi.data[..., k]`` or ``dwi.data[:, :, z, :]`` reads only that part of
the file. Every problem a user can fix in their input is raised as a one-line
:class:`~qid2_diffusers.errors.QID2InputError` naming the file.

B-vectors follow the FSL convention: one unit vector per volume in the voxel
frame of the image (x flipped when the affine has a positive determinant, see
:func:`~qid2_diffusers.orientation.bvec_voxel_signs`), zeros on the b0 volumes.
B-vectors whose norms are far from 1 scale their volume's b-value by the
squared norm, as MRtrix3 does (:data:`BVEC_NORM_TOLERANCE`).
"""

from __future__ import annotations

import gzip
import os
import re
import uuid
import warnings
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import nibabel as nib
import numpy as np
from nibabel.openers import Opener

from ..directions import complement, normalize_bvecs, uniform_subset
from ..errors import QID2InputError, QID2InputWarning
from ..gradients import B0_THRESHOLD
from ..orientation import bvec_voxel_signs
from .pgzip import ParallelGzipWriter

__all__ = [
    "DWI",
    "load_dwi",
    "load_mask",
    "group_shells",
    "shell_indices",
    "shell_label",
    "extract_shell",
    "split_acquired",
    "check_enough_directions",
    "nifti_stem",
    "BVEC_NORM_TOLERANCE",
    "bvec_voxel_signs",
    "save_dwi",
    "save_nifti",
    "atomic_write",
    "remove_temporaries",
]


#: B-vector norms further than this from 1 encode the b-value (b_effective = b |g|²,
#: MRtrix3's b-value scaling); closer ones are rounding in the file.
BVEC_NORM_TOLERANCE = 0.01


def _shell_tolerance(b: float) -> float:
    # Scanners jitter b-values by a few s/mm² (2999.998) and some schemes
    # round one direction differently (2950 in a 3000 shell): a shell spans up
    # to 5 % or 100 s/mm², whichever is smaller. The 10 s/mm² floor keeps two
    # shells from ever getting the same 10-rounded label.
    return max(10.0, min(100.0, 0.05 * float(b)))


# Not dipy's unique_bvals_tolerance: its tolerance is one gap for every shell,
# and no single gap both joins 2950 with 3000 and keeps b=200 apart from b=300
# (dipy 1.12 with tol=20 splits the first pair, with tol=100 joins the second),
# while this tolerance grows with b. It also returns one b-value per shell, not
# the shell's volumes.
def group_shells(bvals, *, b0_threshold: float = B0_THRESHOLD) -> dict[int, np.ndarray]:
    """Group the diffusion-weighted volumes into shells.

    Sorted b-values are split wherever two neighbours differ by more than
    ``min(100, 5 %)`` s/mm² (at least 10), so 2950, 2999.998 and 3000 form one
    shell. Each shell is labelled by its median b-value rounded to 10 s/mm².

    Args:
        bvals (`array-like` of shape `(N,)`): b-values in s/mm².
        b0_threshold (`float`, *optional*, defaults to :data:`~qid2_diffusers.gradients.B0_THRESHOLD`):
            b0 volumes (not in any shell).

    Returns:
        `dict[int, np.ndarray]`: shell label -> sorted volume indices, by increasing b.
    """
    bvals = np.asarray(bvals, dtype=np.float64).ravel()
    dw = np.flatnonzero(bvals > b0_threshold)
    if len(dw) == 0:
        return {}
    order = dw[np.argsort(bvals[dw], kind="stable")]
    sorted_b = bvals[order]
    gaps = np.diff(sorted_b)
    limits = np.array([_shell_tolerance(b) for b in sorted_b[1:]])
    cuts = np.flatnonzero(gaps > limits) + 1
    shells = {}
    for members in np.split(order, cuts):
        label = int(np.round(np.median(bvals[members]) / 10.0) * 10)
        shells[label] = np.sort(members)
    return shells


def _describe_shells(bvals, b0_threshold: float) -> str:
    shells = group_shells(bvals, b0_threshold=b0_threshold)
    n_b0 = int(np.sum(np.asarray(bvals) <= b0_threshold))
    listed = ", ".join(f"b={b} ({len(idx)} volumes)" for b, idx in shells.items()) or "none"
    return f"shells present: {listed}; {n_b0} b0 volumes"


def shell_indices(bvals, shell: float, *, b0_threshold: float = B0_THRESHOLD, path=None) -> np.ndarray:
    """Indices of the volumes of one shell.

    Args:
        bvals (`array-like` of shape `(N,)`): b-values in s/mm².
        shell (`float`): the shell's b-value, e.g. 1000; matched with the same
            tolerance as :func:`group_shells`. A value at or below
            ``b0_threshold`` selects the b0 volumes.
        b0_threshold (`float`, *optional*, defaults to :data:`~qid2_diffusers.gradients.B0_THRESHOLD`): b0 cut-off.
        path (`str`, *optional*): file named in the error message.

    Raises:
        QID2InputError: if no shell matches (the message lists the shells present).
    """
    bvals = np.asarray(bvals, dtype=np.float64).ravel()
    if shell <= b0_threshold:
        found = np.flatnonzero(bvals <= b0_threshold)
    else:
        found = np.array([], dtype=np.intp)
        tol = _shell_tolerance(shell)
        for members in group_shells(bvals, b0_threshold=b0_threshold).values():
            lo, hi = bvals[members].min(), bvals[members].max()
            if lo - tol <= shell <= hi + tol:
                found = members
                break
    if len(found) == 0:
        raise QID2InputError(path, f"no b={shell:g} shell; {_describe_shells(bvals, b0_threshold)}")
    return found


def shell_label(bvals, shell: float, *, b0_threshold: float = B0_THRESHOLD, path=None) -> int:
    """Label (the :func:`group_shells` key) of the shell at ``shell`` s/mm².

    Raises:
        QID2InputError: ``shell`` selects the b0 volumes, or no shell matches
            (the message lists the shells present).
    """
    if shell <= b0_threshold:
        raise QID2InputError(path, f"b={shell:g} selects the b0 volumes, not a diffusion-weighted shell")
    members = shell_indices(bvals, shell, b0_threshold=b0_threshold, path=path)
    return next(label for label, idx in group_shells(bvals, b0_threshold=b0_threshold).items()
                if np.array_equal(idx, members))


def check_enough_directions(n_acquired: int, num_references: int, path=None) -> None:
    """Raise unless ``n_acquired`` directions can supply ``num_references`` references."""
    if n_acquired < num_references:
        raise QID2InputError(
            path, f"only {n_acquired} acquired directions, fewer than the R = {num_references} references requested"
        )


def split_acquired(shell_bvecs, n_acquired: int = 30) -> tuple[np.ndarray, np.ndarray]:
    """Split one shell into the acquired directions and the targets to up-sample.

    The acquired subset is the most uniform ``n_acquired`` of the scheme
    (:func:`~qid2_diffusers.directions.uniform_subset`); the targets are the
    remaining directions (:func:`~qid2_diffusers.directions.complement`), so a
    repeated direction is never a target of itself.

    Args:
        shell_bvecs (`array-like` of shape `(N, 3)`): the shell's unit b-vectors.
        n_acquired (`int`, *optional*, defaults to 30): directions kept.

    Returns:
        `(acquired_idx, target_idx)`: sorted indices into ``shell_bvecs``.
    """
    shell_bvecs = normalize_bvecs(shell_bvecs)
    if not 1 <= n_acquired <= len(shell_bvecs):
        raise ValueError(f"cannot keep {n_acquired} of {len(shell_bvecs)} directions")
    acquired = uniform_subset(shell_bvecs, n_acquired)
    return acquired, complement(shell_bvecs, shell_bvecs[acquired])


class _VolumeSubset:
    """Lazy view of some volumes (last axis) of a 4D array or proxy."""

    def __init__(self, source, indices):
        self.source = source
        self.indices = np.asarray(indices, dtype=np.intp)

    @property
    def shape(self):
        return tuple(self.source.shape[:-1]) + (len(self.indices),)

    @property
    def ndim(self):
        return len(self.shape)

    @property
    def dtype(self):
        return self.source.dtype

    def __array__(self, dtype=None, copy=None):
        out = self[...]
        return out.astype(dtype, copy=False) if dtype is not None else out

    def __getitem__(self, key):
        key = key if isinstance(key, tuple) else (key,)
        if any(k is Ellipsis for k in key):
            at = next(i for i, k in enumerate(key) if k is Ellipsis)
            fill = (slice(None),) * (4 - len(key) + 1)
            key = key[:at] + fill + key[at + 1 :]
        key = key + (slice(None),) * (4 - len(key))
        if len(key) != 4:
            raise IndexError(f"too many indices for a 4D image: {key}")
        spatial, wanted = key[:3], self.indices[key[3]]
        if np.ndim(wanted) == 0:
            return np.asarray(self.source[spatial + (int(wanted),)])
        if len(wanted) == 0:
            return np.asarray(self.source[spatial + (slice(0, 0),)])
        lo, hi = int(wanted.min()), int(wanted.max())
        # One contiguous read of the span is far cheaper than one read per
        # volume through a gzip stream.
        block = np.asarray(self.source[spatial + (slice(lo, hi + 1),)])
        if np.array_equal(wanted, np.arange(lo, hi + 1)):
            return block
        return block[..., wanted - lo]


@dataclass
class DWI:
    """A diffusion-weighted series with its gradient scheme.

    Args:
        data (`array-like` of shape `(X, Y, Z, N)`): nibabel ``dataobj`` proxy
            (lazy) or an ndarray.
        bvals (`np.ndarray` of shape `(N,)`): b-values, float64.
        bvecs (`np.ndarray` of shape `(N, 3)`): unit b-vectors, zeros on b0 volumes.
        affine (`np.ndarray` of shape `(4, 4)`): voxel-to-world transform.
        header (`nibabel.Nifti1Header`, *optional*): the source header.
        mask (`np.ndarray` of shape `(X, Y, Z)`, *optional*): brain mask, bool.
        path (`str`, *optional*): the source file.
        b0_threshold (`float`, *optional*, defaults to :data:`~qid2_diffusers.gradients.B0_THRESHOLD`): b0 cut-off.
    """

    data: object
    bvals: np.ndarray
    bvecs: np.ndarray
    affine: np.ndarray
    header: object = None
    mask: np.ndarray | None = None
    path: str | None = None
    b0_threshold: float = field(default=B0_THRESHOLD)

    @property
    def shape(self) -> tuple[int, int, int, int]:
        return tuple(int(s) for s in self.data.shape)

    @property
    def n_volumes(self) -> int:
        return self.shape[3]

    @property
    def b0_indices(self) -> np.ndarray:
        return np.flatnonzero(self.bvals <= self.b0_threshold)

    @property
    def shells(self) -> dict[int, np.ndarray]:
        """Shell label (rounded b-value) -> volume indices; see :func:`group_shells`."""
        return group_shells(self.bvals, b0_threshold=self.b0_threshold)

    @property
    def gtab(self):
        """The scheme as a dipy ``GradientTable``."""
        from dipy.core.gradients import gradient_table

        return gradient_table(self.bvals, bvecs=self.bvecs, b0_threshold=self.b0_threshold)

    def volume(self, index: int) -> np.ndarray:
        """One volume as a float32 ``(X, Y, Z)`` array, read on its own."""
        return np.asarray(self.data[..., int(index)], dtype=np.float32)

    def mean_b0(self) -> np.ndarray:
        """Mean of the b0 volumes, float32 ``(X, Y, Z)``, read one volume at a time."""
        total = np.zeros(self.shape[:3], dtype=np.float64)
        for k in self.b0_indices:
            total += self.volume(k)
        return (total / max(len(self.b0_indices), 1)).astype(np.float32)

    def select(self, indices) -> DWI:
        """A DWI with only the volumes ``indices`` (still lazy if this one is)."""
        indices = np.asarray(indices, dtype=np.intp).ravel()
        if isinstance(self.data, np.ndarray):
            data = self.data[..., indices]
        elif isinstance(self.data, _VolumeSubset):
            data = _VolumeSubset(self.data.source, self.data.indices[indices])
        else:
            data = _VolumeSubset(self.data, indices)
        return DWI(
            data=data,
            bvals=self.bvals[indices].copy(),
            bvecs=self.bvecs[indices].copy(),
            affine=self.affine,
            header=self.header,
            mask=self.mask,
            path=self.path,
            b0_threshold=self.b0_threshold,
        )


def extract_shell(dwi: DWI, shell: float = 1000) -> DWI:
    """Keep the b0 volumes and one shell, in acquisition order.

    Raises:
        QID2InputError: if the shell is absent (the message lists those present).
    """
    members = shell_indices(dwi.bvals, shell, b0_threshold=dwi.b0_threshold, path=dwi.path)
    return dwi.select(np.union1d(dwi.b0_indices, members))


# ---------------------------------------------------------------------------
# Reading


def nifti_stem(path) -> str:
    """The file name without ``.nii.gz`` or ``.nii`` (any other name: without its last suffix)."""
    path = Path(path)
    name = path.name
    for suffix in (".nii.gz", ".nii"):
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return path.stem


def _default_sidecar(dwi_path: Path, kind: str) -> Path:
    # BIDS / dcm2niix name sidecars after the image; FSL and HCP use bare
    # ``bvals`` / ``bvecs`` in the same folder.
    stem = nifti_stem(dwi_path)
    candidates = [dwi_path.with_name(name) for name in (f"{stem}.{kind}", f"{stem}.{kind}s", f"{kind}s")]
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    others = ", ".join(c.name for c in candidates[1:])
    raise QID2InputError(candidates[0], f"file not found (also looked for {others} in {dwi_path.parent})")


def _require_file(path: Path) -> None:
    if not path.exists():
        raise QID2InputError(path, "file not found")
    if not path.is_file():
        raise QID2InputError(path, "is not a file")


def _gzip_intact(path: Path, expected: int) -> bool:
    # The gzip trailer stores the uncompressed size mod 2**32: a matching value
    # proves the stream is complete without decompressing gigabytes. Only on a
    # mismatch (truncation, or multi-member files) is the stream read through.
    with open(path, "rb") as fh:
        fh.seek(0, os.SEEK_END)
        if fh.tell() < 18:
            return False
        fh.seek(-4, os.SEEK_END)
        if int.from_bytes(fh.read(4), "little") == expected % 2**32:
            return True
    total = 0
    try:
        with gzip.open(path, "rb") as fh:
            while chunk := fh.read(1 << 24):
                total += len(chunk)
    except (EOFError, OSError, zlib.error):
        return False
    return total >= expected


def _load_nifti(path) -> nib.Nifti1Image:
    """Open a NIfTI lazily after checking it is complete."""
    path = Path(path)
    _require_file(path)
    try:
        # Keeping the file open lets successive forward reads of a .nii.gz
        # continue the stream instead of decompressing from the start.
        img = nib.load(str(path), keep_file_open=True)
    except Exception as exc:  # nibabel raises many types for unreadable files
        detail = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise QID2InputError(path, f"not a readable NIfTI image ({detail})") from None
    if not isinstance(img, (nib.Nifti1Image, nib.Nifti2Image)):
        raise QID2InputError(path, f"not a NIfTI image (nibabel reads it as {type(img).__name__})")
    header = img.header
    # The proxy's offset, not the header's vox_offset: nibabel reports 0 there
    # for single files whose data start right after the 352-byte header.
    expected = int(img.dataobj.offset) + int(np.prod(img.shape)) * np.dtype(header.get_data_dtype()).itemsize
    if path.name.endswith(".gz"):
        if not _gzip_intact(path, expected):
            raise QID2InputError(path, "truncated or corrupt gzip stream: the image data is incomplete")
    elif path.stat().st_size < expected:
        raise QID2InputError(path, f"truncated: {path.stat().st_size} bytes, the header promises {expected}")
    return img


def _read_numbers(path: Path, *, finite: bool = True) -> np.ndarray:
    _require_file(path)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # numpy warns on empty files; we report it below
            arr = np.loadtxt(path, dtype=np.float64, ndmin=2)
    except ValueError as exc:
        raise QID2InputError(path, f"cannot parse numbers ({str(exc).splitlines()[0]})") from None
    if arr.size == 0:
        raise QID2InputError(path, "is empty")
    if finite and not np.all(np.isfinite(arr)):
        raise QID2InputError(path, "contains NaN or Inf")
    return arr


def _read_bvals(path: Path, n_volumes: int, image: Path) -> np.ndarray:
    arr = _read_numbers(path)
    if min(arr.shape) != 1:
        raise QID2InputError(path, f"expected one row or column of b-values, got shape {arr.shape}")
    bvals = arr.ravel()
    if len(bvals) != n_volumes:
        raise QID2InputError(path, f"has {len(bvals)} b-values but {image.name} has {n_volumes} volumes")
    if np.any(bvals < 0):
        raise QID2InputError(path, f"negative b-value at volume {int(np.flatnonzero(bvals < 0)[0])}")
    return bvals


def _read_bvecs(path: Path, n_volumes: int, image: Path) -> np.ndarray:
    # NaN is checked per volume by the caller: on a b0 volume it means "no direction" (dipy's own data).
    arr = _read_numbers(path, finite=False)
    if arr.shape[0] == 3 and arr.shape[1] == n_volumes:  # FSL: 3 rows
        return arr.T.copy()
    if arr.shape[1] == 3 and arr.shape[0] == n_volumes:
        return arr
    if 3 not in arr.shape:
        raise QID2InputError(path, f"expected 3 rows (FSL) or 3 columns of b-vectors, got shape {arr.shape}")
    count = arr.shape[1] if arr.shape[0] == 3 else arr.shape[0]
    raise QID2InputError(path, f"has {count} b-vectors but {image.name} has {n_volumes} volumes")


def load_mask(mask_path, shape) -> np.ndarray:
    """Read a brain mask and check it matches a 3D ``shape``; returns bool ``(X, Y, Z)``."""
    img = _load_nifti(mask_path)
    mask_shape = tuple(img.shape)
    if len(mask_shape) == 4 and mask_shape[3] == 1:
        mask_shape = mask_shape[:3]
    if mask_shape != tuple(shape):
        raise QID2InputError(mask_path, f"mask shape {mask_shape} does not match the image's {tuple(shape)}")
    mask = np.asarray(img.dataobj).reshape(mask_shape) > 0
    if not mask.any():
        raise QID2InputError(mask_path, "the mask is empty (no voxel above 0)")
    return mask


def load_dwi(
    dwi_path,
    bvals_path=None,
    bvecs_path=None,
    mask_path=None,
    *,
    b0_threshold: float = B0_THRESHOLD,
) -> DWI:
    """Open a 4D NIfTI with its FSL bvals/bvecs (and optional mask), validated and lazy.

    Args:
        dwi_path (`str` or `os.PathLike`): the 4D ``.nii`` / ``.nii.gz`` series.
        bvals_path (`str` or `os.PathLike`, *optional*): defaults to ``<stem>.bval``
            next to the image, else ``<stem>.bvals``, else ``bvals`` (FSL/HCP).
        bvecs_path (`str` or `os.PathLike`, *optional*): same, for ``.bvec`` / ``bvecs``;
            3 rows (FSL) or 3 columns, normalised to unit length. NaN or zero
            rows are accepted on b0 volumes; norms further than
            :data:`BVEC_NORM_TOLERANCE` from 1 scale that volume's b-value by
            ``|g|²`` (MRtrix3's b-value scaling), with a ``QID2InputWarning``.
        mask_path (`str` or `os.PathLike`, *optional*): brain mask of the image's shape.
        b0_threshold (`float`, *optional*, defaults to :data:`~qid2_diffusers.gradients.B0_THRESHOLD`): b-values at or
            below it are b0 volumes (their b-vectors are set to zero).

    Raises:
        QID2InputError: one line naming the file and the problem.

    Example:

    ```py
    >>> dwi = load_dwi("sub-01_dwi.nii.gz")
    >>> axial = dwi.data[:, :, 40, :]  # reads one slice of every volume
    >>> b1000 = extract_shell(dwi, 1000)
    ```
    """
    dwi_path = Path(dwi_path)
    _require_file(dwi_path)
    bvals_path = Path(bvals_path) if bvals_path is not None else _default_sidecar(dwi_path, "bval")
    bvecs_path = Path(bvecs_path) if bvecs_path is not None else _default_sidecar(dwi_path, "bvec")
    img = _load_nifti(dwi_path)
    if img.ndim != 4:
        raise QID2InputError(
            dwi_path, f"is a {img.ndim}D image of shape {tuple(img.shape)}; expected a 4D DWI series (X, Y, Z, volumes)"
        )
    n = int(img.shape[3])
    bvals = _read_bvals(bvals_path, n, dwi_path)
    bvals, bvecs = _gradient_scheme(bvals, _read_bvecs(bvecs_path, n, dwi_path), bvals_path, bvecs_path, b0_threshold)
    mask = load_mask(mask_path, img.shape[:3]) if mask_path is not None else None
    return DWI(
        data=img.dataobj,
        bvals=bvals,
        bvecs=bvecs,
        affine=img.affine.copy(),
        header=img.header,
        mask=mask,
        path=str(dwi_path),
        b0_threshold=b0_threshold,
    )


def _gradient_scheme(bvals, bvecs, bvals_path, bvecs_path, b0_threshold):
    """Effective b-values and unit b-vectors (zero on b0 volumes) of a scheme read from files."""
    b0 = bvals <= b0_threshold
    if not np.any(b0):
        raise QID2InputError(bvals_path, f"no b0 volume (every b-value is above {b0_threshold:g} s/mm²)")
    bad = ~np.all(np.isfinite(bvecs), axis=1) & ~b0
    if np.any(bad):
        k = int(np.flatnonzero(bad)[0])
        raise QID2InputError(bvecs_path, f"NaN or Inf b-vector on volume {k} (b={bvals[k]:g}), which is not a b0")
    bvecs = np.where(b0[:, None], 0.0, bvecs)
    norms = np.linalg.norm(bvecs, axis=1)
    zero = (norms < 1e-6) & ~b0
    if np.any(zero):
        k = int(np.flatnonzero(zero)[0])
        raise QID2InputError(bvecs_path, f"zero-length b-vector on volume {k} (b={bvals[k]:g}), which is not a b0")
    off = ~b0 & (np.abs(norms - 1.0) > BVEC_NORM_TOLERANCE)
    if np.any(off):
        # Scanners encode several shells in one nominal b-value through the
        # gradient amplitude; MRtrix3 reads b |g|² as the volume's b-value.
        bvals = np.where(b0, bvals, bvals * norms**2)
        warnings.warn(QID2InputWarning(
            bvecs_path, f"{int(off.sum())} b-vectors have norms far from 1 ({norms[off].min():.3g} to "
                        f"{norms[off].max():.3g}): their b-values are scaled by |g|² as MRtrix3 does "
                        f"(effective b from {bvals[off].min():g} to {bvals[off].max():g})"), stacklevel=3)
        b0 = bvals <= b0_threshold
    bvecs = normalize_bvecs(np.where(b0[:, None], 0.0, bvecs), allow_zero=True)
    return bvals, bvecs


# ---------------------------------------------------------------------------
# Writing


#: Names :func:`_temp_sibling` gives: ``.<final name>.<12 hex digits>.tmp<suffix>``.
_TEMP_NAME = re.compile(r"^\..+\.[0-9a-f]{12}\.tmp(\.nii\.gz|\.[^.]+)?$")


def _temp_sibling(final: Path) -> Path:
    # Same folder so os.replace is an atomic rename; the real suffix last so
    # nibabel still picks the format (and gzip) from the name.
    suffix = ".nii.gz" if final.name.endswith(".nii.gz") else final.suffix
    return final.with_name(f".{final.name}.{uuid.uuid4().hex[:12]}.tmp{suffix}")


def remove_temporaries(folder) -> list[Path]:
    """Delete the temporary files a killed :func:`atomic_write` or :func:`save_dwi` left under ``folder``.

    A process killed between writing and renaming (``kill -9``, a lost node)
    cannot clean up after itself; a later run over the same folder can. Only
    names of this module's temporaries are touched. Call it while no other
    process writes there.

    Returns:
        `list[Path]`: the files removed.
    """
    found = [p for p in Path(folder).rglob(".*") if _TEMP_NAME.match(p.name) and p.is_file()]
    for path in found:
        path.unlink(missing_ok=True)
    return found


def _output_header(header, shape, dtype) -> nib.Nifti1Header:
    hdr = nib.Nifti1Header.from_header(header) if header is not None else nib.Nifti1Header()
    zooms = tuple(float(z) for z in hdr.get_zooms())
    hdr.set_data_shape(shape)
    hdr.set_data_dtype(dtype)
    spatial = list(zooms[:3]) + [1.0] * (3 - len(zooms[:3]))
    # Scanner-converted files sometimes carry a NaN or zero 4th zoom.
    extra = [z if np.isfinite(z) and z > 0 else 1.0 for z in zooms[3 : len(shape)]]
    extra += [1.0] * (len(shape) - 3 - len(extra))
    hdr.set_zooms(tuple(spatial[: len(shape)] + extra))
    hdr.set_slope_inter(None, None)
    hdr["cal_min"] = hdr["cal_max"] = 0
    return hdr


def _write_image(path: Path, data: np.ndarray, affine, header) -> None:
    hdr = _output_header(header, data.shape, data.dtype)
    img = nib.Nifti1Image(data, np.asarray(affine, dtype=np.float64), hdr)
    if header is not None:
        # Keep the source's qform/sform codes (scanner vs aligned space).
        qcode, scode = int(header["qform_code"]), int(header["sform_code"])
        img.set_qform(affine, code=qcode if qcode > 0 else "scanner")
        img.set_sform(affine, code=scode if scode > 0 else "aligned")
        # Setting the qform recomputes pixdim from the affine; keep the source's.
        img.header.set_zooms(hdr.get_zooms())
    if not str(path).endswith(".gz"):
        nib.save(img, str(path))
        return
    # The same bytes nib.save would gzip, deflated on every core (an HCP-grid output
    # is 1.6 GB that one core compresses at a few tens of MB/s).
    with open(path, "wb") as raw, ParallelGzipWriter(raw, level=Opener.default_compresslevel) as gz:
        img.to_file_map({"image": nib.FileHolder(fileobj=gz)})


def atomic_write(path, write) -> Path:
    """Write one file so it is never seen half-written: ``write(tmp)`` on a
    temporary sibling of ``path`` (parents created), then one rename onto ``path``.

    The one atomic writer of the package: images, sidecars, JSON, figures and
    model cards all go through it (or through :func:`save_dwi` for several
    files that must appear together).

    Args:
        path (`str` or `os.PathLike`): the final file.
        write (`Callable[[Path], None]`): writes the content to the path it is given.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _commit([(path, write)])
    return path


def _commit(writes) -> None:
    """Run ``(final_path, writer)`` pairs to temporary names, then rename them all."""
    temps = []
    try:
        for final, writer in writes:
            tmp = _temp_sibling(final)
            temps.append((tmp, final))
            writer(tmp)
        for tmp, final in temps:
            os.replace(tmp, final)
    finally:
        for tmp, _ in temps:
            tmp.unlink(missing_ok=True)


def save_nifti(path, data, affine, header=None, *, dtype=np.float32) -> Path:
    """Write one image atomically (temporary name in the same folder, then rename).

    Args:
        path (`str` or `os.PathLike`): ``.nii`` or ``.nii.gz`` output.
        data (`array-like`): the image.
        affine (`np.ndarray` of shape `(4, 4)`): voxel-to-world transform.
        header (`nibabel.Nifti1Header`, *optional*): source header whose
            qform/sform codes, units and spatial zooms are kept.
        dtype (`np.dtype`, *optional*, defaults to `np.float32`): stored type.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    data = np.asarray(data, dtype=dtype)
    _commit([(path, lambda tmp: _write_image(tmp, data, affine, header))])
    return path


def save_dwi(prefix, data, bvals, bvecs, affine, header=None) -> tuple[Path, Path, Path]:
    """Write ``PREFIX.nii.gz``, ``PREFIX.bval`` and ``PREFIX.bvec`` (FSL, 3 rows) atomically.

    All three files are written to temporary names first and renamed only
    when every one succeeded, so a failure leaves no partial output.

    Args:
        prefix (`str` or `os.PathLike`): output path without extension (a
            trailing ``.nii`` / ``.nii.gz`` is dropped).
        data (`array-like` of shape `(X, Y, Z, N)`): stored as float32.
        bvals (`array-like` of shape `(N,)`): b-values.
        bvecs (`array-like` of shape `(N, 3)`): b-vectors.
        affine (`np.ndarray` of shape `(4, 4)`): voxel-to-world transform.
        header (`nibabel.Nifti1Header`, *optional*): source header to keep.

    Returns:
        `(nifti_path, bval_path, bvec_path)`.
    """
    prefix = Path(prefix)
    prefix = prefix.with_name(nifti_stem(prefix))
    data = np.asarray(data, dtype=np.float32)
    bvals = np.asarray(bvals, dtype=np.float64).ravel()
    bvecs = np.asarray(bvecs, dtype=np.float64)
    if data.ndim != 4 or len(bvals) != data.shape[3] or bvecs.shape != (data.shape[3], 3):
        raise ValueError(
            f"data {data.shape}, bvals {bvals.shape} and bvecs {bvecs.shape} do not describe the same volumes"
        )
    prefix.parent.mkdir(parents=True, exist_ok=True)
    paths = tuple(prefix.with_name(prefix.name + ext) for ext in (".nii.gz", ".bval", ".bvec"))
    _commit(
        [
            (paths[0], lambda tmp: _write_image(tmp, data, affine, header)),
            (paths[1], lambda tmp: np.savetxt(tmp, bvals[None, :], fmt="%.10g")),
            (paths[2], lambda tmp: np.savetxt(tmp, bvecs.T, fmt="%.10f")),
        ]
    )
    return paths
