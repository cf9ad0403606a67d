"""Evaluation of up-samplers: the paper's metrics and more, inside the brain mask.

:mod:`~qid2_diffusers.evaluation.benchmark` runs every method on held-out
subjects or the real scans (``qid2 benchmark``), each a
:class:`~qid2_diffusers.evaluation.cases.BenchmarkCase`, and
:mod:`~qid2_diffusers.evaluation.ratios` gives the real-scan judgement, the
FA-error ratio to a tensor fit; :func:`evaluate_files` scores files on disk
(``qid2 evaluate``); :mod:`~qid2_diffusers.evaluation.report` writes tables and figures.
"""

from .fid import FID_UNAVAILABLE, frechet_distance, inception_features, load_inception
from .metrics import (
    FIBRE_FA,
    HIGH_B,
    MIN_MASK_VOXELS,
    HighBReference,
    angular_correlation,
    fa_error_per_slice,
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
    "fa_error_per_slice",
    "HIGH_B",
    "angular_correlation",
    "HighBReference",
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
