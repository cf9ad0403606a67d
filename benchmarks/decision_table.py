#!/usr/bin/env python
"""The table that decides: FA error of every method as a ratio to DTI-predict's, across benchmark runs.

DTI-predict is a tensor fit on the same kept directions, predicting the
missing ones: the one-second answer a researcher would otherwise use. A ratio
below 1 means a method beats it. This script only reads the ``results.json``
of ``qid2 benchmark`` runs (held-out phantoms with ``--data``, real scans with
``--real``) and lays their ratios side by side; every number comes from those
runs::

    python benchmarks/decision_table.py \\
        --phantoms "randomised b=1000"=results/rnd-b1000 "randomised b=2000"=results/rnd-b2000 \\
        --real results/real --out results/decision.md

For phantoms the ratio is taken against the noise-free truth (``--reference
truth``, the default) or against the full acquisition (``acquired``); for
real scans there is no truth: against the full acquisition, and, where the run
scored it (``qid2 benchmark --real``), against the MP-PCA-denoised full
acquisition too (a column ``CASE (vs denoised)``). ``--baseline mppca+dti``
divides by MP-PCA + DTI-predict instead (the practitioner's denoise-then-fit):
below 1, a method beats it.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

BASELINE = "dti"


def _load(folder) -> dict:
    path = Path(folder) / "results.json"
    if not path.is_file():
        raise SystemExit(f"{path}: no results.json (run qid2 benchmark first)")
    return json.loads(path.read_text())


def _labels(results: dict) -> dict:
    return {m["key"]: m["label"] for m in results["methods"] if m.get("status", "ok") == "ok"}


def phantom_means(results: dict, reference: str = "truth") -> dict:
    """Method key -> mean FA MAE over subjects against ``reference``."""
    subjects = results["per_subject"].values()
    means = {}
    for key in _labels(results):
        values = [s[key][reference]["fa_mae"] for s in subjects if key in s and reference in s[key]]
        if values:
            means[key] = sum(values) / len(values)
    return means


def phantom_ratios(results: dict, reference: str = "truth", baseline: str = BASELINE, base: float | None = None) -> dict:
    """Method label -> mean FA MAE over subjects / ``baseline``'s, against ``reference``; ``base``, the
    baseline's mean from another run on the same subjects, serves a run without that method."""
    labels, means = _labels(results), phantom_means(results, reference)
    base = means.get(baseline, base)
    return {labels[key]: value / base for key, value in means.items() if base}


def real_ratios(results: dict, baseline: str = BASELINE) -> dict:
    """(column, method label) -> FA MAE / ``baseline``'s on that case: columns ``CASE`` (against the full
    acquisition) and ``CASE (vs denoised)`` (against its MP-PCA-denoised version, where scored)."""
    labels = _labels(results)
    out = {}
    sections = [("", results["fa_ratio"]["ratio"]), (" (vs denoised)", results.get("fa_ratio_denoised") or {})]
    for suffix, ratios in sections:
        for case, row in ratios.items():
            base = row.get(baseline)
            if not base:
                continue
            for key, value in row.items():
                if key in labels and value is not None:
                    out[(f"{case}{suffix}", labels[key])] = value / base  # both are ratios to DTI-predict
    return out


def decision_table(phantoms: list[tuple[str, dict]], real: dict | list[dict] | None, reference: str = "truth",
                   baseline: str = BASELINE) -> str:
    """Markdown table, one column per phantom label and real case; runs given the same label
    (say, the paper model and the new one, benchmarked separately on the same subjects) share a column."""
    columns, cells, bases = [], {}, {}
    for name, results in phantoms:  # runs sharing a label score the same subjects: one baseline serves them
        if baseline in phantom_means(results, reference):
            bases.setdefault(name, phantom_means(results, reference)[baseline])
    for name, results in phantoms:
        column = f"{name} (vs {reference})"
        if column not in columns:
            columns.append(column)
        for label, ratio in phantom_ratios(results, reference, baseline, bases.get(name)).items():
            cells[(label, column)] = ratio
    for results in [real] if isinstance(real, dict) else real or []:
        for (case, label), ratio in real_ratios(results, baseline).items():
            if case not in columns:
                columns.append(case)
            cells[(label, case)] = ratio
    rows = list(dict.fromkeys(label for label, _ in cells))
    lines = ["| method | " + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|"]
    for label in rows:
        shown = []
        for column in columns:
            value = cells.get((label, column))
            # Bold where it reads below 1 at the digits shown (0.9997 is a tie, not a win).
            shown.append("–" if value is None else (f"**{value:.3f}**" if round(value, 3) < 1 else f"{value:.3f}"))
        lines.append(f"| {label} | " + " | ".join(shown) + " |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--phantoms", nargs="*", default=[], metavar="LABEL=DIR", help="phantom benchmark runs")
    p.add_argument("--real", nargs="*", default=[], metavar="DIR", help="qid2 benchmark --real runs")
    p.add_argument("--reference", choices=["truth", "acquired"], default="truth",
                   help="what phantom FA errors are measured against (default: truth)")
    p.add_argument("--baseline", default=BASELINE, metavar="KEY",
                   help="the denominator's method key, e.g. mppca+dti (default: dti, DTI-predict)")
    p.add_argument("--out", metavar="FILE.md", help="also write the table here")
    args = p.parse_args(argv)
    phantoms = []
    for item in args.phantoms:
        label, sep, folder = item.rpartition("=")
        if not sep:
            p.error(f"expected LABEL=DIR, got {item!r}")
        phantoms.append((label, _load(folder)))
    table = decision_table(phantoms, [_load(folder) for folder in args.real], args.reference, args.baseline)
    print(table)
    if args.out:
        from qid2_diffusers.data.io import atomic_write

        atomic_write(args.out, lambda tmp: tmp.write_text(table))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
