#!/usr/bin/env python
"""When MP-PCA helps a tensor fit on the real scans: every b0, or a single one; every slice, or two.

For each real case (a uniform third of each shell kept, as ``qid2 benchmark --real``), the FA error of a
tensor fit on the kept series, denoised by :func:`qid2_diffusers.denoise.denoise_series` (the engine's rule
for patches), over that of the plain fit; against the fit of the full acquisition. The rows back the rules
of :mod:`qid2_diffusers.denoise`: a grid too small for two patches is not denoised (the b = 3000 crop), a
single b0 is denoised with the rest::

    python benchmarks/denoise_rules.py [--real tests/data/real] > benchmarks/results/denoise/rules.txt
"""

from __future__ import annotations

import argparse
import warnings

import numpy as np


def main(argv=None) -> int:
    from qid2_diffusers.data.real import default_real_data_dir, real_cases
    from qid2_diffusers.denoise import denoise_series
    from qid2_diffusers.evaluation.cases import real_benchmark_case
    from qid2_diffusers.evaluation.metrics import tensor_metrics
    from qid2_diffusers.tensor import fit_tensor

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--real", default=str(default_real_data_dir()), help="folder of the real scans")
    args = p.parse_args(argv)
    warnings.simplefilter("ignore")
    from dipy.denoise.localpca import mppca

    print("case | slices | b0s | kept series | MP-PCA + fit / fit | dipy's default 5x5x5 patches, any grid | "
          "what was done")
    for rc in real_cases(args.real, require_all=False):
        case = real_benchmark_case(rc)
        b0s = case.shell.b0_indices
        slabs = [("all", slice(None))] + ([("2 central", slice(4, 6))] if case.data.shape[2] > 6 else [])
        for name, zs in slabs:
            data, mask = case.data[:, :, zs], case.mask[:, :, zs]
            full = fit_tensor(data, case.shell.bvals, case.shell.bvecs, mask)
            for n_b0 in dict.fromkeys((len(b0s), 1)):
                keep = np.sort(np.r_[b0s[:n_b0], case.acquired])
                d, bvals, bvecs = data[..., keep], case.shell.bvals[keep], case.shell.bvecs[keep]
                plain = tensor_metrics(fit_tensor(d, bvals, bvecs, mask), full, mask)["fa_mae"]
                result = denoise_series(d, bvals, "mppca", mask=mask, what="it")
                denoised = tensor_metrics(fit_tensor(result.data, bvals, bvecs, mask), full, mask)["fa_mae"]
                cube = "–"
                if min(d.shape[:3]) >= 5:  # what mppca(data) alone does, whatever the grid
                    forced = mppca(d, patch_radius=2, suppress_warning=True)
                    cube = f"{tensor_metrics(fit_tensor(forced, bvals, bvecs, mask), full, mask)['fa_mae'] / plain:.2f}"
                print(f"{rc.name} | {name} | {n_b0} | {'x'.join(map(str, d.shape))} | {denoised / plain:.2f} | "
                      f"{cube} | {result.plan.note}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
