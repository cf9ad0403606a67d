"""Evaluation of up-samplers: the paper's metrics and more, inside the brain mask.

:mod:`~qid2_diffusers.evaluation.benchmark` runs every method on held-out
subjects (``qid2 benchmark``); :func:`evaluate_files` scores files on disk
(``qid2 evaluate``); :mod:`~qid2_diffusers.evaluation.report` writes tables and figures.
"""

from .fid import FID_UNAVAILABLE, frechet_distance, inception_features, load_inception
from .metrics import (
    FIBRE_FA,
    MIN_MASK_VOXELS,
    image_metrics,
    nrmse,
    principal_angle_deg,
    psnr,
    ssim_per_slice,
    tensor_metrics,
)
from .protocol import MATCH_TOLERANCE_DEG, SubjectEvaluation, match_volumes
from .stats import paired_tests, summarize
from .files import evaluate_files, resolve_prefix

__all__ = [
    "FIBRE_FA",
    "MIN_MASK_VOXELS",
    "MATCH_TOLERANCE_DEG",
    "FID_UNAVAILABLE",
    "ssim_per_slice",
    "psnr",
    "nrmse",
    "image_metrics",
    "principal_angle_deg",
    "tensor_metrics",
    "match_volumes",
    "SubjectEvaluation",
    "summarize",
    "paired_tests",
    "load_inception",
    "inception_features",
    "frechet_distance",
    "evaluate_files",
    "resolve_prefix",
]
