"""In-plane rotation and scaling that keep images and b-vectors consistent.

Rotating the image content of a slice is only half of a rotation: the
diffusion signal at each voxel was measured along b-vectors fixed to the
scanner, so the b-vectors must turn with the content, about the slice normal
and by the same angle. Angles are in degrees throughout.

Convention: a slice taken across voxel axis ``axis`` is an ``(H, W)`` array
whose rows and columns run along the two other voxel axes ``(a, b)``, in
increasing order. A positive angle turns the content from ``a`` towards
``b``, and turns the ``(a, b)`` components of every voxel-frame b-vector the
same way.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

__all__ = ["in_plane_rotation", "rotate_bvecs", "warp_slices"]


def in_plane_rotation(angle_degrees: float, axis: int = 2) -> np.ndarray:
    """The ``(3, 3)`` voxel-frame rotation by ``angle_degrees`` about voxel axis ``axis``.

    It turns the first remaining axis towards the second (for the default
    axial slices: x towards y).
    """
    a, b = (d for d in range(3) if d != axis)
    theta = np.deg2rad(angle_degrees)
    rot = np.eye(3)
    rot[a, a] = rot[b, b] = np.cos(theta)
    rot[a, b] = -np.sin(theta)
    rot[b, a] = np.sin(theta)
    return rot


def rotate_bvecs(bvecs, angle_degrees: float, *, axis: int = 2, voxel_signs=(1.0, 1.0, 1.0)) -> np.ndarray:
    """Rotate b-vectors with slices warped by :func:`warp_slices` with the same angle.

    Args:
        bvecs (`array-like` of shape `(N, 3)` or `(3,)`): FSL b-vectors.
        angle_degrees (`float`): rotation angle in degrees.
        axis (`int`, *optional*, defaults to 2): voxel axis normal to the slices.
        voxel_signs (`array-like` of shape `(3,)`, *optional*, defaults to `(1, 1, 1)`):
            :func:`~qid2_diffusers.data.io.bvec_voxel_signs` of the image, so the
            rotation happens in the voxel frame even when FSL flips x.
    """
    signs = np.asarray(voxel_signs, dtype=np.float64)
    rot = in_plane_rotation(angle_degrees, axis)
    return (np.asarray(bvecs, dtype=np.float64) * signs) @ rot.T * signs


def warp_slices(images: torch.Tensor, angle_degrees: float, scale: float = 1.0, *, mask: torch.Tensor | None = None):
    """Rotate and scale slices about their centre, all channels in one pass.

    Args:
        images (`torch.Tensor` of shape `(C, H, W)`): interpolated bilinearly.
        angle_degrees (`float`): content rotation, in degrees (see the module's convention).
        scale (`float`, *optional*, defaults to 1.0): isotropic zoom; above 1 enlarges the content.
        mask (`torch.Tensor` of shape `(1, H, W)`, *optional*): warped with
            nearest-neighbour interpolation so it stays binary.

    Returns:
        `(images, mask)` warped; outside the field of view is zero.
    """
    _, h, w = images.shape
    theta = np.deg2rad(angle_degrees)
    c, s = np.cos(theta) / scale, np.sin(theta) / scale
    # Output pixel p samples the input at R(-theta) p / scale. The grid is in
    # (x = column, y = row) order and normalised per axis, so the off-diagonal
    # terms carry the aspect ratio of a non-square slice.
    affine = torch.tensor([[[c, -s * h / w, 0.0], [s * w / h, c, 0.0]]], dtype=images.dtype)
    grid = F.affine_grid(affine, [1, 1, h, w], align_corners=False)
    warped = F.grid_sample(images[None], grid, mode="bilinear", align_corners=False)[0]
    if mask is not None:
        mask = F.grid_sample(mask[None].to(images.dtype), grid, mode="nearest", align_corners=False)[0]
    return warped, mask
