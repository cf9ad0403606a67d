"""``qid2 evaluate``: score an up-sampled DWI against a reference acquisition.

The command line of :func:`qid2_diffusers.evaluation.files.evaluate_files`.
"""

from __future__ import annotations

import numpy as np

__all__ = ["add_parser", "run"]


def add_parser(subparsers):
    p = subparsers.add_parser(
        "evaluate",
        help="score an up-sampled DWI against a fully acquired reference",
        description=(
            "Score an up-sampled DWI against a reference acquisition inside a brain mask: SSIM per slice, "
            "PSNR, NRMSE of the synthesised volumes, and FA / MD / principal-direction errors of a tensor fit "
            "on the up-sampled series against one on the reference."
        ),
    )
    p.add_argument(
        "--pred",
        required=True,
        metavar="PREFIX",
        help="the up-sampled DWI: PREFIX.nii.gz with PREFIX.bval/.bvec (or a .nii[.gz] path)",
    )
    p.add_argument(
        "--ref",
        required=True,
        metavar="PREFIX",
        help="the reference acquisition, same grid; sidecars PREFIX.bval/.bvec, or bvals/bvecs beside it",
    )
    p.add_argument("--mask", required=True, metavar="MASK", help="brain mask NIfTI of the same grid")
    p.add_argument("--out", metavar="JSON", help="write the metrics here (printed either way)")
    p.add_argument(
        "--shell",
        type=float,
        metavar="B",
        help="b-value of the up-sampled shell (default: the prediction's only shell)",
    )
    p.add_argument(
        "--fid-weights",
        metavar="PATH",
        help="TorchScript Inception-v3 feature extractor for FID (nothing is downloaded)",
    )
    p.set_defaults(run=run)
    return p


def _format(value) -> str:
    if value is None or np.isnan(value):
        return "n/a"
    return "inf" if np.isinf(value) else f"{value:.4g}"


def run(args) -> int:
    from ..evaluation.files import evaluate_files
    from ..evaluation.report import write_json

    result = evaluate_files(args.pred, args.ref, args.mask, shell=args.shell, fid_weights=args.fid_weights)
    if args.out:
        write_json(args.out, result)
    print(
        f"{result['n_scored_volumes']} volumes scored at b={result['shell']:g} "
        f"({result['n_carried_over']} carried over): "
        + ", ".join(
            f"{k} {_format(result[k])}"
            for k in ("ssim", "psnr", "nrmse", "fa_mae", "fa_ssim", "md_mae", "angular_error_deg", "acc_sh6",
                      "acc_sh8", "csd_peak_error_deg", "fid")
            if k in result
        )
    )
    if args.out:
        print(f"metrics written to {args.out}")
    return 0
