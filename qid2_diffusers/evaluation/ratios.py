"""The figure a real-scan benchmark is judged by: each method's FA error over the tensor fit's.

On a real scan there is no truth, only the full acquisition; a method earns
its place where its FA error is below that of DTI-predict, a tensor fitted on
the same kept directions (ratio < 1). :func:`ratio_section` computes the ratio
per case and per axial slice, and paired tests of each method against
DTI-predict over the slices of each case and over all slices pooled.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from .stats import paired_tests

__all__ = ["BASELINE", "ratio_section", "reference_ratios"]

#: Method key of the ratio's denominator: DTI-predict.
BASELINE = "dti"


def _ratio(a, b):
    return None if a is None or b is None or not b else float(a) / float(b)


def _scored(entry) -> bool:
    return bool(entry) and "skipped" not in entry


def ratio_section(per_case: dict, keys: Sequence[str], baseline: str = BASELINE) -> dict:
    """FA-error ratios to ``baseline``, per case and per slice, with paired tests over slices.

    Args:
        per_case (`dict`): case -> method key -> ``{"acquired": {"fa_mae": ...}, "per_slice":
            {"slice", "n_voxels", "fa_mae"}}`` (as the benchmark scores a method;
            :func:`~qid2_diffusers.evaluation.metrics.fa_error_per_slice`), or
            ``{"skipped": reason}`` where a method could not run on a case.
        keys (`Sequence[str]`): the method keys, in table order.
        baseline (`str`, *optional*, defaults to :data:`BASELINE`): the denominator's key.

    Returns:
        `dict`: ``baseline``; ``ratio`` (case -> key -> FA MAE / the baseline's,
        ``None`` where either did not run); ``per_slice`` (case -> ``slice``,
        ``n_voxels``, ``fa_mae`` and ``ratio`` per key); ``tests`` (``per_case``:
        case -> key -> :func:`~qid2_diffusers.evaluation.paired_tests` of the
        key's per-slice FA MAE against the baseline's; ``pooled``: key -> the same
        over every slice of every case); ``summary`` (key -> ``cases`` scored,
        ``cases_below_1`` and ``geometric_mean_ratio`` over the cases).
    """
    section = {"baseline": baseline, "ratio": {}, "per_slice": {}, "tests": {"per_case": {}, "pooled": {}},
               "summary": {}}
    pooled = {key: ([], []) for key in keys if key != baseline}
    for case, methods in per_case.items():
        base = methods.get(baseline)
        if not _scored(base):
            continue
        slices = base["per_slice"]
        section["ratio"][case] = {
            key: _ratio(methods[key]["acquired"]["fa_mae"], base["acquired"]["fa_mae"]) if _scored(methods.get(key))
            else None
            for key in keys
        }
        scored = [key for key in keys if _scored(methods.get(key))]
        section["per_slice"][case] = {
            "slice": slices["slice"],
            "n_voxels": slices["n_voxels"],
            "fa_mae": {key: methods[key]["per_slice"]["fa_mae"] for key in scored},
            "ratio": {key: [_ratio(a, b) for a, b in zip(methods[key]["per_slice"]["fa_mae"], slices["fa_mae"])]
                      for key in scored},
        }
        section["tests"]["per_case"][case] = {}
        for key in scored:
            if key == baseline:
                continue
            values = methods[key]["per_slice"]["fa_mae"]
            section["tests"]["per_case"][case][key] = paired_tests(values, slices["fa_mae"])
            pooled[key][0].extend(values)
            pooled[key][1].extend(slices["fa_mae"])
    section["tests"]["pooled"] = {key: paired_tests(a, b) for key, (a, b) in pooled.items() if a}
    for key in keys:
        ratios = np.array([r[key] for r in section["ratio"].values() if r.get(key) is not None], dtype=np.float64)
        section["summary"][key] = {
            "cases": int(ratios.size),
            "cases_below_1": int(np.sum(ratios < 1)),
            "geometric_mean_ratio": float(np.exp(np.mean(np.log(ratios)))) if ratios.size else None,
        }
    return section


def reference_ratios(per_case: dict, keys: Sequence[str], reference: str, baseline: str = BASELINE) -> dict:
    """Case -> key -> FA MAE against ``reference`` (e.g. ``"denoised"``) over the baseline's against it;
    cases without that reference are left out, methods that did not run are ``None``."""
    out = {}
    for case, methods in per_case.items():
        base = methods.get(baseline)
        if not _scored(base) or reference not in base:
            continue
        out[case] = {key: _ratio(methods[key][reference]["fa_mae"], base[reference]["fa_mae"])
                     if _scored(methods.get(key)) else None for key in keys}
    return out
