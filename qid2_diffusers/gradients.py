"""The acquisition scheme: which volumes are b0, and dipy's ``GradientTable`` as an input.

A scheme travels through the package as ``bvals`` (N,) and ``bvecs`` (N, 3);
the up-samplers' ``predict`` also takes a dipy ``GradientTable`` in their
place, as dipy users pass a scheme (:func:`as_bvals_bvecs`). This module is
the one place the b0 cut-off is defined.
"""

from __future__ import annotations

import numpy as np

__all__ = ["B0_THRESHOLD", "is_gradient_table", "as_bvals_bvecs", "split_scheme", "target_directions"]

#: Volumes with a b-value at or below this (s/mm²) are b0 volumes; scanners
#: store them as 0, 0.5 or 5. dipy's ``gradient_table`` uses the same default.
B0_THRESHOLD = 50.0


def is_gradient_table(obj) -> bool:
    """Whether ``obj`` is a dipy ``GradientTable``."""
    from dipy.core.gradients import GradientTable

    return isinstance(obj, GradientTable)


def as_bvals_bvecs(gtab_or_bvals, bvecs=None) -> tuple[np.ndarray, np.ndarray]:
    """The scheme as float64 ``(bvals (N,), bvecs (N, 3))``.

    Args:
        gtab_or_bvals (`dipy.core.gradients.GradientTable` or `array-like` of shape `(N,)`):
            a gradient table, or the b-values.
        bvecs (`array-like` of shape `(N, 3)`, *optional*): the b-vectors; required
            with b-values, not allowed with a gradient table.

    Raises:
        ValueError: a gradient table with ``bvecs`` too, b-values without
            ``bvecs``, or counts that disagree.
    """
    if is_gradient_table(gtab_or_bvals):
        if bvecs is not None:
            raise ValueError("give either a GradientTable or bvals and bvecs, not both")
        bvals, bvecs = gtab_or_bvals.bvals, gtab_or_bvals.bvecs
    elif bvecs is None:
        raise ValueError("bvecs are needed with bvals (or pass a dipy GradientTable)")
    else:
        bvals = gtab_or_bvals
    bvals = np.asarray(bvals, dtype=np.float64).ravel()
    bvecs = np.asarray(bvecs, dtype=np.float64)
    if bvecs.shape != (len(bvals), 3):
        raise ValueError(f"{len(bvals)} b-values but b-vectors of shape {bvecs.shape} (expected ({len(bvals)}, 3))")
    return bvals, bvecs


def split_scheme(bvals, bvecs=None, *, b0_threshold: float = B0_THRESHOLD) -> tuple[np.ndarray, np.ndarray]:
    """Indices of the b0 volumes and of the diffusion-weighted volumes.

    Args:
        bvals (`array-like` of shape `(N,)` or `GradientTable`): the b-values, or a gradient table.
        bvecs (`array-like` of shape `(N, 3)`, *optional*): checked against the
            b-values when given; the split itself depends on the b-values only.
        b0_threshold (`float`, *optional*, defaults to :data:`B0_THRESHOLD`): b0 cut-off.
    """
    if is_gradient_table(bvals) or bvecs is not None:
        bvals, _ = as_bvals_bvecs(bvals, bvecs)
    bvals = np.asarray(bvals, dtype=np.float64).ravel()
    return np.flatnonzero(bvals <= b0_threshold), np.flatnonzero(bvals > b0_threshold)


def target_directions(targets) -> np.ndarray:
    """Target directions ``(T, 3)``: the array itself, or a gradient table's diffusion-weighted b-vectors.

    Only the directions of a gradient table are used: targets are synthesised
    at the b-value of the acquired shell they are predicted from.
    """
    if is_gradient_table(targets):
        bvals, bvecs = as_bvals_bvecs(targets)
        return bvecs[split_scheme(bvals)[1]]
    return np.asarray(targets, dtype=np.float64)
