"""Writing results: strict JSON, the Markdown tables (the paper's Table 1 layout for phantoms, one row
per case and method for real scans) and figures."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

from ..data.io import atomic_write

__all__ = [
    "to_json",
    "write_json",
    "write_text",
    "format_mean_std",
    "results_table",
    "tests_table",
    "case_table",
    "pooled_table",
    "per_slice_table",
    "save_figure",
    "fa_figure",
    "slice_grid_figure",
    "sweep_figure",
    "ratio_figure",
]


def to_json(obj):
    """A JSON-ready copy: numpy scalars and arrays become Python values,
    non-finite floats become ``None`` (strict JSON has no NaN or infinity;
    a PSNR of identical images is infinite)."""
    if isinstance(obj, dict):
        return {str(k): to_json(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_json(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return to_json(obj.tolist())
    if isinstance(obj, (np.integer,)):
        return int(obj)
    if isinstance(obj, (float, np.floating)):
        return float(obj) if math.isfinite(obj) else None
    if isinstance(obj, Path):
        return str(obj)
    return obj


def write_text(path, text: str) -> Path:
    """Write a text file atomically (:func:`~qid2_diffusers.data.io.atomic_write`)."""
    return atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def write_json(path, obj) -> Path:
    """Write ``obj`` as strict, indented JSON atomically (see :func:`to_json`)."""
    return write_text(path, json.dumps(to_json(obj), indent=2, allow_nan=False) + "\n")


def save_figure(fig, path) -> Path:
    """Save a matplotlib figure as PNG atomically (:func:`~qid2_diffusers.data.io.atomic_write`)."""
    return atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=120, bbox_inches="tight", format="png"))


def format_mean_std(summary, digits: int = 3, scale: float = 1.0, bold: bool = False) -> str:
    """``"0.123 ± 0.004"`` from a :func:`~qid2_diffusers.evaluation.summarize` dict
    (the mean alone for one subject; ``"–"`` when empty)."""
    if not summary or summary.get("mean") is None:
        return "–"
    text = f"{summary['mean'] * scale:.{digits}f}"
    if summary.get("std") is not None:
        text += f" ± {summary['std'] * scale:.{digits}f}"
    return f"**{text}**" if bold else text


#: Table columns: header, (reference, metric), digits, scale, whether lower is better.
COLUMNS = [
    ("Image FID ↓", None, None, 2, 1.0, True),
    ("Image SSIM ↑", "acquired", "ssim", 3, 1.0, False),
    ("FA Error ↓", "acquired", "fa_mae", 3, 1.0, True),
    ("FA Map SSIM ↑", "acquired", "fa_ssim", 3, 1.0, False),
    ("PSNR (dB) ↑", "acquired", "psnr", 2, 1.0, False),
    ("NRMSE ↓", "acquired", "nrmse", 3, 1.0, True),
    ("MD Error (µm²/ms) ↓", "acquired", "md_mae", 3, 1e3, True),
    ("Angle Error (°) ↓", "acquired", "angular_error_deg", 2, 1.0, True),
    ("FA Error vs truth ↓", "truth", "fa_mae", 3, 1.0, True),
    ("FA Map SSIM vs truth ↑", "truth", "fa_ssim", 3, 1.0, False),
    ("Image SSIM vs truth ↑", "truth", "ssim", 3, 1.0, False),
]

#: Columns of the measures high-b users read; shown only when a row has them (shells of b >= 2000).
HIGH_B_COLUMNS = [
    ("ACC SH6 ↑", "acquired", "acc_sh6", 3, 1.0, False),
    ("ACC SH8 ↑", "acquired", "acc_sh8", 3, 1.0, False),
    ("CSD Peak Error (°) ↓", "acquired", "csd_peak_error_deg", 2, 1.0, True),
]


def results_table(rows, *, fid=None, has_truth: bool = True) -> str:
    """The Markdown results table.

    Args:
        rows (`list` of `(label, summary)`): ``summary[reference][metric]`` is a
            :func:`~qid2_diffusers.evaluation.summarize` dict, ``reference`` being
            ``"acquired"`` or ``"truth"``; a missing reference prints ``–``.
        fid (`dict` or `str`, *optional*): label -> FID value; a string (the
            reason, e.g. :data:`~qid2_diffusers.evaluation.FID_UNAVAILABLE`) prints n/a in every row.
        has_truth (`bool`, *optional*, defaults to `True`): include the columns against the truth.

    Best values of each column (among rows that have it) are bold, as in the paper.
    The :data:`HIGH_B_COLUMNS` appear when some row has them.
    """
    columns = [c for c in COLUMNS if has_truth or c[1] != "truth"] + [
        c for c in HIGH_B_COLUMNS if any(s.get(c[1], {}).get(c[2], {}).get("mean") is not None for _, s in rows)
    ]
    best = {}
    for header, ref, metric, _, _, lower in columns:
        if ref is None:
            values = {lab: v for lab, v in fid.items() if v is not None} if isinstance(fid, dict) else {}
        else:
            values = {
                lab: s[ref][metric]["mean"] for lab, s in rows if s.get(ref, {}).get(metric, {}).get("mean") is not None
            }
        if len(values) > 1:
            target = min(values.values()) if lower else max(values.values())
            best[header] = {lab for lab, v in values.items() if v == target}
    lines = [
        "| Methods | " + " | ".join(c[0] for c in columns) + " |",
        "|---|" + "---|" * len(columns),
    ]
    for label, summary in rows:
        cells = []
        for header, ref, metric, digits, scale, _ in columns:
            bold = label in best.get(header, ())
            if ref is None:
                value = fid.get(label) if isinstance(fid, dict) else None
                if value is None:
                    cells.append("n/a" if isinstance(fid, str) else "–")
                else:
                    cells.append(f"**{value:.2f}**" if bold else f"{value:.2f}")
            else:
                cells.append(format_mean_std(summary.get(ref, {}).get(metric), digits, scale, bold))
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


#: Column headers of the paired-test table, by ``"{reference}/{metric}"``.
TEST_HEADERS = {
    "acquired/ssim": "Image SSIM",
    "acquired/fa_mae": "FA Error",
    "acquired/fa_ssim": "FA Map SSIM",
    "truth/fa_mae": "FA Error vs truth",
}


def tests_table(tests, baseline_label: str, labels: dict) -> str:
    """Markdown table of paired-test p-values of every method against ``baseline_label``.

    Args:
        tests (`dict`): method key -> ``"{reference}/{metric}"`` -> a
            :func:`~qid2_diffusers.evaluation.paired_tests` dict.
        baseline_label (`str`): the method compared against.
        labels (`dict`): method key -> display label.
    """
    metrics = list(dict.fromkeys(m for per in tests.values() for m in per))
    if not metrics:
        return ""
    results = [t for per in tests.values() for t in per.values()]
    if all(t["t_pvalue"] is None for t in results):
        return f"Paired tests against {baseline_label}: not run ({results[0]['note']}).\n"
    lines = [
        f"Paired tests against {baseline_label} (p-values: t-test / Wilcoxon; one value per subject):",
        "",
        "| Methods | " + " | ".join(TEST_HEADERS.get(m, m) for m in metrics) + " |",
        "|---|" + "---|" * len(metrics),
    ]

    def cell(t):
        if t is None:
            return "–"
        if t["t_pvalue"] is None:
            return "n/a"
        return f"{t['t_pvalue']:.3g} / {t['wilcoxon_pvalue']:.3g}"

    for key, per in tests.items():
        lines.append(f"| {labels[key]} | " + " | ".join(cell(per.get(m)) for m in metrics) + " |")
    return "\n".join(lines) + "\n"


def _figure(n_rows: int, n_cols: int, panel: float = 2.2):
    # A bare Figure, not pyplot: no global backend or figure registry is touched.
    from matplotlib.figure import Figure

    fig = Figure(figsize=(panel * n_cols, panel * n_rows + 0.4))
    axes = fig.subplots(n_rows, n_cols, squeeze=False)
    for ax in axes.ravel():
        ax.set_xticks([])
        ax.set_yticks([])
    return fig, axes


def _show(ax, image, **kwargs):
    # Array axis 0 (x) across, axis 1 (y) up: the radiological-style view
    # every NIfTI viewer starts from.
    return ax.imshow(np.asarray(image).T, origin="lower", interpolation="nearest", **kwargs)


def fa_figure(fa_maps: dict, reference: str, mask, *, max_error: float = 0.3):
    """FA map (top row) and absolute FA error against ``fa_maps[reference]`` (bottom row) per method.

    Args:
        fa_maps (`dict`): label -> 2D FA slice, the reference among them.
        reference (`str`): label of the reference FA.
        mask (`np.ndarray`): 2D brain mask of the slice.
        max_error (`float`, *optional*, defaults to 0.3): top of the error colour scale.
    """
    labels = list(fa_maps)
    fig, axes = _figure(2, len(labels))
    ref = fa_maps[reference]
    for j, label in enumerate(labels):
        fa = np.where(mask, fa_maps[label], 0.0)
        im_fa = _show(axes[0, j], fa, cmap="gray", vmin=0.0, vmax=1.0)
        axes[0, j].set_title(label, fontsize=9)
        im_err = _show(
            axes[1, j], np.where(mask, np.abs(fa_maps[label] - ref), 0.0), cmap="magma", vmin=0.0, vmax=max_error
        )
        if label == reference:
            axes[1, j].set_title("(reference)", fontsize=8)
        else:
            err = float(np.abs(fa_maps[label] - ref)[mask].mean()) if mask.any() else float("nan")
            axes[1, j].set_title(f"|ΔFA| mean {err:.3f}", fontsize=8)
    axes[0, 0].set_ylabel("FA")
    axes[1, 0].set_ylabel(f"|FA − FA {reference}|")
    fig.colorbar(im_fa, ax=axes[0].tolist(), shrink=0.8, pad=0.01)
    fig.colorbar(im_err, ax=axes[1].tolist(), shrink=0.8, pad=0.01)
    return fig


def slice_grid_figure(panels: dict, title: str, *, vmax: float | None = None):
    """One row of DWI slices on one grey scale: the references, the target and each method's prediction.

    Args:
        panels (`dict`): panel title -> 2D slice, in display order.
        title (`str`): figure title (subject, slice, target direction).
        vmax (`float`, *optional*): top of the grey scale; defaults to the 99.5th percentile of all panels.
    """
    images = [np.asarray(v, dtype=np.float32) for v in panels.values()]
    if vmax is None:
        vmax = float(np.percentile(np.concatenate([im.ravel() for im in images]), 99.5)) or 1.0
    fig, axes = _figure(1, len(images))
    for ax, (label, image) in zip(axes[0], zip(panels, images)):
        _show(ax, image, cmap="gray", vmin=0.0, vmax=vmax)
        ax.set_title(label, fontsize=8)
    fig.suptitle(title, fontsize=9)
    return fig


def sweep_figure(sweep: dict, metrics: dict):
    """QID² quality against the number of sampling steps, one line per scheduler.

    Args:
        sweep (`dict`): scheduler -> steps -> metric -> value.
        metrics (`dict`): metric key -> axis label, one panel each.
    """
    from matplotlib.figure import Figure
    from matplotlib.ticker import NullFormatter, ScalarFormatter

    fig = Figure(figsize=(4.2 * len(metrics), 3.4))
    axes = fig.subplots(1, len(metrics), squeeze=False)
    for ax, (metric, label) in zip(axes[0], metrics.items()):
        for scheduler, by_steps in sweep.items():
            steps = sorted(by_steps, key=int)
            values = [by_steps[s].get(metric) for s in steps]
            ax.plot([int(s) for s in steps], [np.nan if v is None else v for v in values], marker="o", label=scheduler)
        ax.set_xscale("log")
        ax.set_xticks(sorted({int(s) for by_steps in sweep.values() for s in by_steps}))
        ax.xaxis.set_major_formatter(ScalarFormatter())
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_xlabel("sampling steps")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[0, 0].legend(fontsize=8)
    fig.tight_layout()
    return fig


def recommend_sampler(sweep: dict, reference: tuple, tolerance: float = 0.05) -> tuple:
    """The sampler setting the speed issue makes the default.

    Args:
        sweep (`dict`): ``{(scheduler, steps): {"fa_mae": ..., ...}}``, e.g. merged
            ``sweep.mean`` sections of ``qid2 benchmark`` runs.
        reference (`tuple`): ``(scheduler, steps)`` of the reference (DDPM-1000).
        tolerance (`float`, *optional*, defaults to 0.05): allowed relative FA-error excess.

    Returns:
        `tuple`: ``(scheduler, steps)`` with the fewest network passes (steps)
        whose FA error is at most ``(1 + tolerance)`` times the reference's;
        ties go to the lower FA error (to 4 decimals), then to the name in
        alphabetical order (one step from pure noise is the same x0 estimate for
        every sampler); the reference itself if nothing else qualifies.
    """
    bound = sweep[reference]["fa_mae"] * (1.0 + tolerance)
    ok = [key for key, v in sweep.items() if key != reference and v["fa_mae"] <= bound]
    return min(ok, key=lambda key: (key[1], round(sweep[key]["fa_mae"], 4), key[0])) if ok else reference


def sweep_table(sweep: dict, reference: tuple, tolerance: float = 0.05) -> str:
    """Markdown table of a steps sweep against its reference; the recommended row in bold, ✓ = within tolerance."""
    choice = recommend_sampler(sweep, reference, tolerance)
    ref = sweep[reference]["fa_mae"]
    lines = [
        f"| sampler | steps (network passes) | FA error | FA error / {reference[0].upper()}-{reference[1]} | image SSIM | FA error vs truth |",
        "|---|---|---|---|---|---|",
    ]
    for key in sorted(sweep, key=lambda k: (k != reference, k[0], k[1])):
        v = sweep[key]
        ratio = v["fa_mae"] / ref
        flag = "" if key == reference else (" ✓" if ratio <= 1 + tolerance else "")
        name = f"**{key[0]}**" if key == choice and key != reference else key[0]
        truth = f"{v['fa_mae_truth']:.4f}" if v.get("fa_mae_truth") is not None else "–"
        lines.append(f"| {name} | {key[1]} | {v['fa_mae']:.4f} | {ratio:.3f}{flag} | {v['ssim']:.3f} | {truth} |")
    return "\n".join(lines)


def _finite(value) -> bool:
    return value is not None and math.isfinite(value)


def _number(value, digits: int, scale: float = 1.0) -> str:
    return f"{value * scale:.{digits}f}" if _finite(value) else "–"


def _pvalues(test) -> str:
    """``"t / Wilcoxon (n = k)"`` of a :func:`~qid2_diffusers.evaluation.paired_tests` dict."""
    if test is None:
        return "–"
    if test["t_pvalue"] is None:
        return f"n/a (n = {test['n']})"
    return f"{test['t_pvalue']:.3g} / {test['wilcoxon_pvalue']:.3g} (n = {test['n']})"


def case_table(rows, baseline_label: str) -> str:
    """Markdown table of a real-scan run: one row per case and method, the FA-error ratio first.

    Args:
        rows (`list` of `dict`): ``case``, ``label``, ``scores`` (the method's entry of
            ``results.json``: ``{"acquired": metrics}`` or ``{"skipped": reason}``), ``ratio``
            (FA MAE over the baseline's, or ``None``) and ``test`` (paired tests over slices
            against the baseline, or ``None``).
        baseline_label (`str`): the ratio's denominator, e.g. ``"DTI-predict"``.

    The ratio is bold where it is below 1: the method beats the baseline on that case.
    Columns of :data:`HIGH_B_COLUMNS` appear when some row has them.
    """
    picked = ("fa_mae", "fa_ssim", "ssim", "nrmse", "angular_error_deg")
    columns = sorted((c for c in COLUMNS if c[1] == "acquired" and c[2] in picked), key=lambda c: picked.index(c[2]))
    columns += [c for c in HIGH_B_COLUMNS if any(_finite(r["scores"].get("acquired", {}).get(c[2])) for r in rows)]
    # One case's FA error is a single number, not a mean over subjects: one more digit.
    digits = {c[2]: c[3] + (c[2] == "fa_mae") for c in columns}
    lines = [
        f"| Case | Methods | FA Error / {baseline_label} ↓ | " + " | ".join(c[0] for c in columns)
        + f" | p vs {baseline_label}, slices (t / Wilcoxon) |",
        "|---|---|---|" + "---|" * len(columns) + "---|",
    ]
    for row in rows:
        metrics = row["scores"].get("acquired")
        if metrics is None:
            cells = ["n/a"] * (len(columns) + 1) + ["did not run (notes)"]
        else:
            ratio = row["ratio"]
            ratio_cell = "–" if ratio is None else (f"**{ratio:.3f}**" if ratio < 1 else f"{ratio:.3f}")
            cells = [ratio_cell] + [_number(metrics.get(c[2]), digits[c[2]], c[4]) for c in columns]
            cells.append(_pvalues(row["test"]))
        lines.append(f"| {row['case']} | {row['label']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def ratio_matrix_table(ratios: dict, labels: dict, baseline_label: str) -> str:
    """Markdown table of FA-error ratios, one row per method and one column per case (bold below 1).

    Args:
        ratios (`dict`): case -> method key -> ratio or `None`
            (:func:`~qid2_diffusers.evaluation.ratios.reference_ratios`).
        labels (`dict`): method key -> display label, in row order.
        baseline_label (`str`): the ratio's denominator.
    """
    cases = list(ratios)
    lines = [f"| Methods (FA Error / {baseline_label}) | " + " | ".join(cases) + " |", "|---" * (len(cases) + 1) + "|"]
    for key, label in labels.items():
        cells = []
        for case in cases:
            value = ratios[case].get(key)
            cells.append("–" if value is None else (f"**{value:.3f}**" if value < 1 else f"{value:.3f}"))
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def pooled_table(section: dict, labels: dict) -> str:
    """Markdown summary of a :func:`~qid2_diffusers.evaluation.ratios.ratio_section` over every case.

    One row per method: cases where it beats the baseline, the geometric mean of its
    ratios, and the paired tests over every slice of every case pooled.
    """
    base = labels[section["baseline"]]
    lines = [
        f"Over all cases (ratio = FA Error / {base}; tests pair each slice's FA Error with {base}'s, every slice "
        "of every case pooled):",
        "",
        f"| Methods | cases with ratio < 1 | geometric mean ratio | slices | mean FA Error − {base}'s | "
        "p (t / Wilcoxon) |",
        "|---|---|---|---|---|---|",
    ]
    for key, summary in section["summary"].items():
        test = section["tests"]["pooled"].get(key)
        g = summary["geometric_mean_ratio"]
        mean_cell = "–" if test is None or test["mean_difference"] is None else f"{test['mean_difference']:+.4f}"
        lines.append(
            f"| {labels[key]} | {summary['cases_below_1']} of {summary['cases']} | "
            + ("–" if g is None else (f"**{g:.3f}**" if g < 1 else f"{g:.3f}"))
            + f" | {'–' if test is None else test['n']} | {mean_cell} | "
            + ("–" if test is None else _pvalues(test).rsplit(" (n", 1)[0]) + " |"
        )
    return "\n".join(lines) + "\n"


def per_slice_table(section: dict, labels: dict) -> str:
    """Markdown table of the per-slice FA-error ratios of a
    :func:`~qid2_diffusers.evaluation.ratios.ratio_section`: one row per case and axial slice."""
    base = section["baseline"]
    keys = list(dict.fromkeys(k for per in section["per_slice"].values() for k in per["ratio"] if k != base))
    lines = [
        f"Per axial slice (FA Error of {labels[base]}, and each method's ratio to it):",
        "",
        f"| Case | slice | voxels | {labels[base]} FA Error | " + " | ".join(labels[k] for k in keys) + " |",
        "|---|---|---|---|" + "---|" * len(keys),
    ]
    for case, per in section["per_slice"].items():
        for i, z in enumerate(per["slice"]):
            cells = [_number(per["ratio"][k][i], 3) if k in per["ratio"] else "n/a" for k in keys]
            lines.append(f"| {case} | {z} | {per['n_voxels'][i]} | {per['fa_mae'][base][i]:.4f} | "
                         + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def ratio_figure(ratios: dict, baseline_label: str):
    """Grouped bars of the FA-error ratio to ``baseline_label``, one group per case, log scale; 1 is the baseline.

    Args:
        ratios (`dict`): case -> method label -> ratio (``None`` where the method did not run).
        baseline_label (`str`): the denominator, drawn as the line at 1 rather than as bars.
    """
    from matplotlib.figure import Figure
    from matplotlib.ticker import FixedLocator, NullFormatter, ScalarFormatter

    cases = list(ratios)
    labels = [lab for lab in dict.fromkeys(lab for per in ratios.values() for lab, v in per.items() if v is not None)
              if lab != baseline_label]
    values = [v for per in ratios.values() for v in per.values() if v is not None] or [1.0]
    fig = Figure(figsize=(max(6.0, 1.1 * len(cases) * max(1, len(labels)) / 4 + 2), 3.8))
    ax = fig.subplots()
    width = 0.8 / max(1, len(labels))
    x = np.arange(len(cases))
    for j, label in enumerate(labels):
        heights = [ratios[c].get(label) for c in cases]
        ax.bar(x + (j - (len(labels) - 1) / 2) * width, [np.nan if v is None else v for v in heights], width,
               label=label)
    ax.axhline(1.0, color="black", lw=1, ls="--")
    ax.set_yscale("log")
    low, high = min(min(values), 1.0) / 1.15, max(max(values), 1.0) * 1.15
    ax.set_ylim(low, high)
    ticks = [t for t in (0.1, 0.2, 0.3, 0.5, 0.7, 0.85, 1.0, 1.2, 1.5, 2.0, 3.0, 5.0, 10.0) if low <= t <= high]
    ax.yaxis.set_major_locator(FixedLocator(ticks))
    ax.yaxis.set_major_formatter(ScalarFormatter())
    ax.yaxis.set_minor_formatter(NullFormatter())
    ax.set_xticks(x)
    ax.set_xticklabels(cases, rotation=20, ha="right", fontsize=8)
    ax.set_ylabel(f"FA error / {baseline_label} (log)")
    ax.set_title(f"Below the dashed line: better FA than {baseline_label} on the same kept directions", fontsize=9)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=7, ncol=2, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    fig.tight_layout()
    return fig
