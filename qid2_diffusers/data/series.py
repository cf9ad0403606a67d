"""A DWI series read for up-sampling: in memory, checked, and seen in the working orientation.

:func:`read_series` reads every volume once, in file order, and answers the
problems real series have, each with one warning line
(:class:`~qid2_diffusers.errors.QID2InputWarning`) or one error line:

- an empty volume (all zero: a volume the scanner or a QC step dropped) is kept
  in the output as it is, but is never a reference nor part of a tensor fit;
- NaN or Inf voxels are missing measurements: set to 0, and the voxel is left
  out of the brain mask (see :func:`read_series` for why);
- an empty brain mask, given or computed, is an error.

The result, a :class:`WorkingSeries`, keeps the data in the file's orientation
(the output's first volumes, untouched) and hands out working-orientation views
of it (:class:`~qid2_diffusers.orientation.Reorientation`): what the engine and
the demo sample from, one shell at a time
(:func:`~qid2_diffusers.inference.plan_shells` says which volumes).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np

from ..errors import QID2InputError, QID2InputWarning
from ..masking import brain_mask
from ..orientation import Reorientation
from ..timing import timed
from .io import DWI, group_shells, shell_label

__all__ = ["WorkingSeries", "read_series"]


def _index_list(indices, limit: int = 8) -> str:
    """``"3, 17"``, or the first ``limit`` indices ``"and N more"``: volume lists that fit one line."""
    indices = [int(i) for i in indices]
    shown = ", ".join(str(i) for i in indices[:limit])
    return shown if len(indices) <= limit else f"{shown} and {len(indices) - limit} more"


@dataclass
class WorkingSeries:
    """A series read by :func:`read_series`.

    Args:
        data (`np.ndarray` of shape `(X, Y, Z, N + extra)`, float32, Fortran order): the
            input volumes in the file's orientation, NaN and Inf set to 0, then
            ``extra`` zero volumes for the caller to fill (the synthesised ones).
        bvals (`np.ndarray` of shape `(N,)`): b-values (effective, see :func:`~qid2_diffusers.data.io.load_dwi`).
        fsl_bvecs (`np.ndarray` of shape `(N, 3)`): b-vectors as loaded, in the file's FSL convention.
        bvecs (`np.ndarray` of shape `(N, 3)`): the same directions in the working voxel frame.
        orientation ([`~qid2_diffusers.orientation.Reorientation`]): file <-> working orientation.
        mask (`np.ndarray` of shape `(X', Y', Z')`): brain mask in the working orientation.
        usable (`np.ndarray` of shape `(N,)`, bool): volumes that are not empty.
        b0_threshold (`float`): b0 cut-off.
        path (`str`, *optional*): the source file, named in messages.
    """

    data: np.ndarray
    bvals: np.ndarray
    fsl_bvecs: np.ndarray
    bvecs: np.ndarray
    orientation: Reorientation
    mask: np.ndarray
    usable: np.ndarray
    b0_threshold: float
    path: str | None = None

    @property
    def n_volumes(self) -> int:
        return len(self.bvals)

    @property
    def b0_indices(self) -> np.ndarray:
        """The usable b0 volumes."""
        return np.flatnonzero((self.bvals <= self.b0_threshold) & self.usable)

    @property
    def shells(self) -> dict[int, np.ndarray]:
        """Shell label -> its volumes, usable or not (:func:`~qid2_diffusers.data.io.group_shells`)."""
        return group_shells(self.bvals, b0_threshold=self.b0_threshold)

    @property
    def stored_mask(self) -> np.ndarray:
        """The brain mask in the file's orientation."""
        return np.ascontiguousarray(self.orientation.from_working(self.mask))

    def shell_label(self, b: float) -> int:
        """Label of the shell at ``b`` (raises, listing the shells present, if there is none)."""
        return shell_label(self.bvals, b, b0_threshold=self.b0_threshold, path=self.path)

    def volumes(self, indices) -> np.ndarray:
        """Input volumes ``indices`` in the working orientation (a view when they are consecutive)."""
        indices = np.asarray(indices, dtype=np.intp)
        if len(indices) and np.all(np.diff(indices) == 1):
            block = self.data[..., indices[0] : indices[-1] + 1]
        else:
            block = self.data[..., indices]
        return self.orientation.to_working(block)


def read_series(dwi: DWI, *, mask=None, extra_volumes: int = 0, timings: dict | None = None) -> WorkingSeries:
    """Read ``dwi`` into memory, check it and give it a working orientation.

    Each volume is read once, in file order (one pass through a ``.nii.gz``).

    NaN and Inf voxels are missing measurements (a failed reconstruction, a
    division by zero in preprocessing). Filling them from neighbours would
    invent signal, and keeping them would poison the tensor fit and the
    intensity scale of every slice they sit in; so, like a voxel outside the
    brain, such a voxel is left out of the mask (nothing is synthesised there)
    and written as 0, the value dMRI tools read as "no signal", so the output
    stays finite for every tool downstream.

    Args:
        dwi ([`~qid2_diffusers.data.io.DWI`]): the series (lazy or in memory).
        mask (`np.ndarray` of shape `(X, Y, Z)`, *optional*): brain mask in the
            file's orientation; defaults to ``dwi.mask``, else
            :func:`~qid2_diffusers.masking.brain_mask` of the mean usable b0.
        extra_volumes (`int`, *optional*, defaults to 0): zero volumes allocated
            after the input ones. Pages never written cost no memory.
        timings (`dict`, *optional*): receives the seconds of the ``read`` and
            ``mask`` stages (:mod:`~qid2_diffusers.timing`).

    Raises:
        QID2InputError: every b0 volume is empty, or the brain mask is empty.
    """
    with timed(timings, "read"):
        orientation = Reorientation(dwi.affine, dwi.shape, path=dwi.path)
        data, usable, missing, b0_sum = _read_volumes(dwi, extra_volumes)
    n_b0 = int(np.sum(usable & (dwi.bvals <= dwi.b0_threshold)))
    if n_b0 == 0:
        raise QID2InputError(dwi.path, "every b0 volume is empty (all zero or NaN): there is no b0 signal to work with")
    with timed(timings, "mask"):
        mean_b0 = orientation.to_working((b0_sum / n_b0).astype(np.float32))
        working_mask = _working_mask(dwi, orientation, mask, mean_b0, orientation.to_working(missing))
    return WorkingSeries(
        data=data,
        bvals=np.asarray(dwi.bvals, dtype=np.float64),
        fsl_bvecs=np.asarray(dwi.bvecs, dtype=np.float64),
        bvecs=orientation.bvecs_to_working(dwi.bvecs),
        orientation=orientation,
        mask=working_mask,
        usable=usable,
        b0_threshold=dwi.b0_threshold,
        path=dwi.path,
    )


def _read_volumes(dwi: DWI, extra_volumes: int):
    """``(data, usable, missing, b0_sum)``: every volume read once, in file order, and reported on."""
    n = dwi.n_volumes
    # Fortran order: each volume is one contiguous block, as in the NIfTI file.
    data = np.zeros(dwi.shape[:3] + (n + int(extra_volumes),), dtype=np.float32, order="F")
    is_b0 = dwi.bvals <= dwi.b0_threshold
    usable = np.ones(n, dtype=bool)
    missing = np.zeros(dwi.shape[:3], dtype=bool)
    nonfinite_volumes = []
    b0_sum = np.zeros(dwi.shape[:3], dtype=np.float64)
    for k in range(n):
        vol = dwi.volume(k)
        finite = np.isfinite(vol)
        if not finite.all():
            vol = np.where(finite, vol, np.float32(0))
        data[..., k] = vol
        if not vol.any():
            usable[k] = False
            continue
        if not finite.all():
            missing |= ~finite
            nonfinite_volumes.append(k)
        if is_b0[k]:
            b0_sum += vol
    _report(dwi, usable, missing, nonfinite_volumes)
    return data, usable, missing, b0_sum


def _report(dwi: DWI, usable, missing, nonfinite_volumes) -> None:
    empty = np.flatnonzero(~usable)
    if len(empty):
        which = f"volume {empty[0]}" if len(empty) == 1 else f"volumes {_index_list(empty)}"
        b = ", ".join(f"{v:g}" for v in np.unique(dwi.bvals[empty]))
        warnings.warn(QID2InputWarning(
            dwi.path, f"{which} (b={b}) {'is' if len(empty) == 1 else 'are'} empty (all zero): kept as "
                      f"{'it is' if len(empty) == 1 else 'they are'} in the output, never used as a reference "
                      f"or in the tensor fit"), stacklevel=4)
    if nonfinite_volumes:
        warnings.warn(QID2InputWarning(
            dwi.path, f"{int(missing.sum())} voxels hold NaN or Inf (in volume"
                      f"{'s' if len(nonfinite_volumes) > 1 else ''} {_index_list(nonfinite_volumes)}): treated as "
                      f"missing, written as 0 and left out of the brain mask"), stacklevel=4)


def _working_mask(dwi: DWI, orientation: Reorientation, mask, mean_b0, missing) -> np.ndarray:
    if mask is None:
        mask = dwi.mask
    if mask is None:
        zooms = dwi.header.get_zooms()[:3] if dwi.header is not None else None
        working = brain_mask(mean_b0, zooms)
        if not working.any():
            raise QID2InputError(dwi.path, "the brain mask computed from the mean b0 is empty; give a mask")
    else:
        mask = np.asarray(mask, dtype=bool)
        if mask.shape != dwi.shape[:3]:
            raise QID2InputError(None, f"mask shape {mask.shape} does not match the image's {dwi.shape[:3]}")
        if not mask.any():
            raise QID2InputError(None, "the brain mask is empty")
        working = np.array(orientation.to_working(mask))
    working &= ~missing
    if not working.any():
        raise QID2InputError(dwi.path, "no brain voxel left: every voxel of the mask holds NaN or Inf in some volume")
    return working
