"""Image orientation: every series is up-sampled in the orientation the models were trained in.

The models learn from axial slices of images stored as the phantom generator
stores them, LAS (voxel axes towards Left, Anterior, Superior; negative
determinant), with b-vectors in that voxel frame. The same anatomy stored
x-flipped or sagittally has other voxel axes, so its slices and b-vectors look
different to a network. :class:`Reorientation` brings data, masks and FSL
b-vectors to the working orientation with nibabel's orientation tools and back,
so the engine, the demo and the benchmark see one orientation whatever the file's.

FSL b-vectors are in the image's voxel frame with x negated when the affine's
determinant is positive (FSL reads every image as radiologically stored):
:func:`bvec_voxel_signs`. In the working orientation (negative determinant) an
FSL b-vector is the voxel-frame vector itself.
"""

from __future__ import annotations

import nibabel as nib
import numpy as np
from nibabel.orientations import apply_orientation, axcodes2ornt, inv_ornt_aff, io_orientation, ornt_transform

from .errors import QID2InputError

__all__ = ["WORKING_AXCODES", "bvec_voxel_signs", "Reorientation"]

#: Orientation the models were trained in: the phantom generator's.
WORKING_AXCODES = ("L", "A", "S")


def bvec_voxel_signs(affine) -> np.ndarray:
    """Signs mapping FSL b-vectors to the stored voxel axes, shape ``(3,)``.

    FSL reads every image as radiologically stored: for an affine with a
    positive determinant its x axis runs against the voxel index ``i``, so an
    FSL b-vector's x component is flipped relative to the array axes. Multiply
    bvecs by these signs to move between the two frames (the map is its own
    inverse).
    """
    det = np.linalg.det(np.asarray(affine, dtype=np.float64)[:3, :3])
    return np.array([-1.0 if det > 0 else 1.0, 1.0, 1.0])


class Reorientation:
    """Maps an image's data, mask and FSL b-vectors to the working orientation (LAS) and back.

    Array maps return views (flips and transposes of the first three axes), so
    writing into the working view of an array writes into the array itself.

    Args:
        affine (`np.ndarray` of shape `(4, 4)`): the stored image's voxel-to-world affine.
        shape (`tuple` of `int`): its spatial shape ``(X, Y, Z)`` (more axes are ignored).
        path (`str`, *optional*): file named if the affine has no usable orientation.

    Example:

    ```py
    >>> r = Reorientation(dwi.affine, dwi.shape)  # doctest: +SKIP
    >>> data = r.to_working(array)  # (X', Y', Z', N): axial slices along the third axis  # doctest: +SKIP
    >>> bvecs = r.bvecs_to_working(dwi.bvecs)  # FSL b-vectors -> working voxel frame  # doctest: +SKIP
    >>> stored = r.from_working(data)  # back to the file's orientation  # doctest: +SKIP
    ```
    """

    def __init__(self, affine, shape, *, path=None):
        self.affine = np.asarray(affine, dtype=np.float64)
        self.shape = tuple(int(s) for s in tuple(shape)[:3])
        stored = io_orientation(self.affine)
        if np.isnan(stored).any():
            raise QID2InputError(path, "the affine has a degenerate axis: the image's orientation cannot be determined")
        #: stored -> working: stored axis ``i`` becomes working axis ``ornt[i, 0]``, flipped if ``ornt[i, 1] == -1``.
        self.ornt = ornt_transform(stored, axcodes2ornt(WORKING_AXCODES))
        self.inverse = ornt_transform(axcodes2ornt(WORKING_AXCODES), stored)

    @property
    def working_shape(self) -> tuple[int, int, int]:
        shape = [0, 0, 0]
        for i, (axis, _) in enumerate(self.ornt):
            shape[int(axis)] = self.shape[i]
        return tuple(shape)

    @property
    def working_affine(self) -> np.ndarray:
        """The affine of the working-orientation array (same world positions)."""
        return self.affine @ inv_ornt_aff(self.ornt, self.shape)

    def to_working(self, array) -> np.ndarray:
        """``array`` (stored orientation, any trailing axes) as a working-orientation view."""
        return apply_orientation(array, self.ornt)

    def from_working(self, array) -> np.ndarray:
        """A working-orientation ``array`` as a stored-orientation view."""
        return apply_orientation(array, self.inverse)

    def _signed_permutation(self) -> np.ndarray:
        # M with v_working = M @ v_stored (voxel frames).
        m = np.zeros((3, 3))
        for i, (axis, flip) in enumerate(self.ornt):
            m[int(axis), i] = flip
        return m

    def bvecs_to_working(self, bvecs) -> np.ndarray:
        """FSL b-vectors of the stored image ``(N, 3)`` -> vectors in the working voxel frame."""
        voxel = np.asarray(bvecs, dtype=np.float64).reshape(-1, 3) * bvec_voxel_signs(self.affine)
        return voxel @ self._signed_permutation().T

    def bvecs_from_working(self, bvecs) -> np.ndarray:
        """Working voxel-frame vectors ``(N, 3)`` -> FSL b-vectors of the stored image."""
        voxel = np.asarray(bvecs, dtype=np.float64).reshape(-1, 3) @ self._signed_permutation()
        return voxel * bvec_voxel_signs(self.affine)

    def __repr__(self) -> str:
        stored = "".join(nib.aff2axcodes(self.affine))
        return f"Reorientation({stored} {self.shape} -> {''.join(WORKING_AXCODES)} {self.working_shape})"
