"""Summaries across subjects and paired tests between methods."""

from __future__ import annotations

import warnings

import numpy as np

__all__ = ["summarize", "paired_tests", "MIN_PAIRED"]

#: Fewest paired subjects for which a test is reported; below it the p-values are ``None``.
MIN_PAIRED = 3


def summarize(values) -> dict:
    """``mean``, ``std`` (sample, ``ddof=1``; ``None`` for a single value) and ``n`` of the finite values."""
    v = np.asarray([x for x in values if x is not None], dtype=np.float64)
    v = v[np.isfinite(v)]
    if v.size == 0:
        return {"mean": None, "std": None, "n": 0}
    return {"mean": float(v.mean()), "std": float(v.std(ddof=1)) if v.size > 1 else None, "n": int(v.size)}


def paired_tests(a, b) -> dict:
    """Paired t-test and Wilcoxon signed-rank test of ``a`` against ``b`` (one value per subject).

    Subjects where either value is missing or not finite are dropped. With
    fewer than :data:`MIN_PAIRED` pairs, or when every difference is zero,
    the statistics are ``None`` and ``note`` says why.

    Returns:
        `dict`: ``n``, ``mean_difference`` (a - b), ``t_statistic``,
        ``t_pvalue``, ``wilcoxon_statistic``, ``wilcoxon_pvalue``, ``note``.
    """
    from scipy import stats

    a = np.asarray([np.nan if x is None else x for x in a], dtype=np.float64)
    b = np.asarray([np.nan if x is None else x for x in b], dtype=np.float64)
    if a.shape != b.shape:
        raise ValueError(f"paired samples differ in length: {a.size} and {b.size}")
    keep = np.isfinite(a) & np.isfinite(b)
    a, b = a[keep], b[keep]
    out = {
        "n": int(a.size),
        "mean_difference": float(np.mean(a - b)) if a.size else None,
        "t_statistic": None,
        "t_pvalue": None,
        "wilcoxon_statistic": None,
        "wilcoxon_pvalue": None,
        "note": None,
    }
    if a.size < MIN_PAIRED:
        out["note"] = f"n = {a.size} paired subjects; tests need at least {MIN_PAIRED}"
        return out
    if np.all(a - b == 0):
        out["note"] = "identical values in every subject"
        return out
    with warnings.catch_warnings():
        # Small samples make scipy warn about exactness; the p-value is still the one to report.
        warnings.simplefilter("ignore")
        t = stats.ttest_rel(a, b)
        w = stats.wilcoxon(a, b)
    out.update(
        t_statistic=float(t.statistic),
        t_pvalue=float(t.pvalue),
        wilcoxon_statistic=float(w.statistic),
        wilcoxon_pvalue=float(w.pvalue),
    )
    return out
