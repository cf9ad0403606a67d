"""Scoring an up-sampled series on disk against a reference acquisition: the engine of ``qid2 evaluate``.

Volumes are matched by direction (either sign), not by position. Volumes of
the prediction that are bit-identical to the reference's are the acquired ones
carried over by the up-sampler: they enter the tensor fit but are left out of
the image metrics (unless every volume is such a copy, as when a file is
evaluated against itself).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..data.io import extract_shell, load_dwi, load_mask, shell_indices
from ..errors import QID2InputError
from .fid import FID_UNAVAILABLE, frechet_distance, inception_features, load_inception
from .metrics import HIGH_B
from .protocol import SubjectEvaluation

__all__ = ["resolve_prefix", "evaluate_files"]


def resolve_prefix(prefix) -> Path:
    """The NIfTI a ``PREFIX`` names: the path itself if it is an image, else ``PREFIX.nii.gz`` or ``PREFIX.nii``."""
    path = Path(prefix)
    if path.name.endswith((".nii", ".nii.gz")):
        return path
    for candidate in (path.with_name(path.name + ".nii.gz"), path.with_name(path.name + ".nii")):
        if candidate.is_file():
            return candidate
    raise QID2InputError(path.with_name(path.name + ".nii.gz"), "file not found (nor .nii)")


def _pred_shell(dwi, shell) -> np.ndarray:
    """Indices of the prediction's volumes on the evaluated shell."""
    if shell is not None:
        return shell_indices(dwi.bvals, shell, b0_threshold=dwi.b0_threshold, path=dwi.path)
    shells = dwi.shells
    if len(shells) != 1:
        listed = ", ".join(f"b={b}" for b in shells) or "none"
        raise QID2InputError(dwi.path, f"holds several shells ({listed}); choose one with --shell")
    return next(iter(shells.values()))


def evaluate_files(pred_prefix, ref_prefix, mask_path, *, shell=None, fid_weights=None) -> dict:
    """Load, validate, match and score an up-sampled series against a reference.

    Args:
        pred_prefix, ref_prefix (`str` or `os.PathLike`): see :func:`resolve_prefix`.
        mask_path (`str` or `os.PathLike`): brain mask on the reference's grid.
        shell (`float`, *optional*): the shell to score; defaults to the prediction's only shell.
        fid_weights (`str` or `os.PathLike`, *optional*): TorchScript feature extractor for FID.

    Returns:
        `dict`: the metrics against the reference (snake-case keys such as
        ``ssim``, ``psnr``, ``nrmse``, ``fa_mae``, ``fa_ssim``, ``md_mae``,
        ``angular_error_deg``, ``fid``; for b >= ``HIGH_B`` also ``acc_sh6``, ``acc_sh8``,
        ``csd_peak_error_deg``) and what was matched.
    """
    pred = load_dwi(resolve_prefix(pred_prefix))
    ref = load_dwi(resolve_prefix(ref_prefix))
    if pred.shape[:3] != ref.shape[:3]:
        raise QID2InputError(
            pred.path, f"grid {pred.shape[:3]} differs from the reference's {ref.shape[:3]} ({ref.path})"
        )
    if not np.allclose(pred.affine, ref.affine, atol=1e-3):
        raise QID2InputError(pred.path, f"affine differs from the reference's ({ref.path}): not the same grid")
    mask = load_mask(mask_path, ref.shape[:3])
    if not mask.any():
        raise QID2InputError(mask_path, "mask is empty")
    pred_dw = _pred_shell(pred, shell)
    shell = float(np.median(pred.bvals[pred_dw]))
    ref_shell = extract_shell(ref, shell)
    evaluation = SubjectEvaluation(np.asarray(ref_shell.data, dtype=np.float32), ref_shell.bvals, ref_shell.bvecs, mask,
                                   high_b=shell >= HIGH_B)

    try:
        idx = evaluation.volume_indices(pred.bvecs[pred_dw])
    except ValueError as exc:
        raise QID2InputError(pred.path, f"{exc} ({ref.path})") from None
    pred_data = np.asarray(pred.select(pred_dw).data, dtype=np.float32)
    copied = np.array([np.array_equal(pred_data[..., k], evaluation.data[..., i]) for k, i in enumerate(idx)])
    scored = ~copied if not copied.all() else np.ones_like(copied)
    # Carried-over acquired volumes are identical to the reference, so substituting all is the same fit.
    scores = evaluation.score(pred_data[..., scored], pred.bvecs[pred_dw][scored])["acquired"]

    result = {**scores, "fid": None, "fid_note": FID_UNAVAILABLE}
    if fid_weights is not None:
        model = load_inception(fid_weights)
        ref_values = evaluation.data[..., idx[scored]]
        data_range = float(ref_values[mask].max() - ref_values[mask].min())
        result["fid"] = frechet_distance(
            inception_features(model, pred_data[..., scored], mask, data_range),
            inception_features(model, ref_values, mask, data_range),
        )
        result["fid_note"] = None
    result.update(
        shell=shell,
        n_scored_volumes=int(scored.sum()),
        n_carried_over=int(copied.sum()) if not copied.all() else 0,
        n_reference_volumes=int(len(evaluation.dw)),
        pred=str(pred.path),
        ref=str(ref.path),
        mask=str(mask_path),
    )
    return result
