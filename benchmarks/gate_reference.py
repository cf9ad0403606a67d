"""The residual-weight gate scored against two references: the MP-PCA-denoised left-out volume (what
``--residual-weight auto`` does after ``--denoise mppca``) and the raw left-out volume.

    python benchmarks/gate_reference.py --data rnd-val8 --models shipped=qid2_diffusers/pretrained/qid2-small-r3,ft=runs/r3-ft-mppca-b1000

For each subject (HCP layout, e.g. ``qid2 phantom`` output) and model: b0 + the 30 most uniform directions of
the shell kept, MP-PCA on them (:func:`~qid2_diffusers.denoise.denoise_series`), the gate's leave-one-out
examples built from the denoised series (:func:`~qid2_diffusers.pipelines.adaptation.leave_one_out_examples`,
the engine's settings) and, with the same slices and directions, from the raw one; the network predicts each
left-out volume from the denoised others, and the least-squares weight of its residual over the prior is
printed against each reference, gated (:func:`~qid2_diffusers.pipelines.adaptation.least_squares_weight`) and
unclipped. The question it answers: does the gate drop a correction that helps the FA on a denoised series
because its reference was denoised with the volumes the prior is fitted on?
"""

from __future__ import annotations

import argparse

import numpy as np
import torch

from qid2_diffusers.data.layouts import discover_subjects
from qid2_diffusers.denoise import denoise_series
from qid2_diffusers.directions import uniform_subset
from qid2_diffusers.hub import load_pipeline
from qid2_diffusers.pipelines import adaptation


def weights(r, e, m, groups) -> tuple[float, float]:
    """(gated, unclipped) least-squares weight of the residual ``r`` against the error ``e`` inside ``m``."""
    r, e, m = (v.astype(np.float64) for v in (r, e, m))
    return adaptation.least_squares_weight(r, e, m, groups=groups), float(np.sum(m * r * e) / np.sum(m * r * r))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", required=True, help="HCP-layout folder of subjects")
    ap.add_argument("--models", required=True, help="LABEL=PATH,... of physics-prior QID² models")
    ap.add_argument("--shell", type=float, default=1000.0)
    ap.add_argument("--n-acquired", type=int, default=30)
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    pipes = {label: load_pipeline(path, device="cpu", dtype="fp32")
             for label, path in (item.split("=", 1) for item in args.models.split(","))}
    print(f"# gate weight against the denoised and the raw left-out volume; b = {args.shell:g}, {args.n_acquired} kept")
    for subject in discover_subjects(args.data):
        dwi = subject.load()
        data = np.asarray(dwi.data[...], dtype=np.float32)
        b0 = np.flatnonzero(dwi.bvals <= dwi.b0_threshold)
        shell = np.flatnonzero(np.abs(dwi.bvals - args.shell) < 50)
        keep = np.r_[b0, shell[uniform_subset(dwi.bvecs[shell], args.n_acquired)]]
        mask = dwi.mask if dwi.mask is not None else np.ones(data.shape[:3], dtype=bool)
        raw = data[..., keep]
        bvals, bvecs = dwi.bvals[keep], dwi.bvecs[keep]
        den = denoise_series(raw, bvals, "mppca", mask=mask).data
        built = {name: adaptation.leave_one_out_examples(series, bvals, bvecs, mask, 3, physics_prior=True,
                                                         **adaptation.GATE_DEFAULTS)
                 for name, series in (("denoised", den), ("raw", raw))}
        # The error against the denoised left-out volumes, in gate_terms' row order; the network runs once per
        # model (the engine's seeds and batches), its error taken against the raw left-out volumes.
        denoised_error = (built["denoised"]["target"][:, 0] - built["denoised"]["prior"][:, 0]).numpy()
        for label, pipe in pipes.items():
            r, raw_error, m, groups = adaptation.gate_terms(pipe, built["denoised"], reference=built["raw"])
            for name, e in (("denoised", denoised_error), ("raw", raw_error)):
                gated, free = weights(r, e, m, groups)
                print(f"{subject.subject_id} {label:8s} reference {name:8s}: gated weight {gated:.3f}, unclipped {free:+.3f}",
                      flush=True)


if __name__ == "__main__":
    main()
