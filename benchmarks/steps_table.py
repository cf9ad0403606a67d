"""The speed issue's table: QID² quality per sampler and step count, against DDPM-1000.

    python benchmarks/steps_table.py SWEEP_DIR [SWEEP_DIR ...] [--reference ddpm:1000] [--tolerance 0.05]

Reads the ``sweep`` section of each ``qid2 benchmark --sweep-steps ...``
output (``results.json``; runs of one model on the same held-out slices,
e.g. the fast samplers and the slow DDPM-1000 reference run side by side)
and prints a Markdown table: FA error and image SSIM per (sampler, steps),
the FA error relative to the reference and whether it is within the
tolerance, with the recommended default in bold: the fewest network passes
per slice and target whose FA error is at most ``(1 + tolerance)`` times the
reference's (:func:`qid2_diffusers.evaluation.report.recommend_sampler`).
Nothing here is timed: the passes are the cost. ``--figure PNG`` draws the
merged sweep (one line per sampler, the reference as its own point).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from qid2_diffusers.evaluation.report import recommend_sampler, save_figure, sweep_figure, sweep_table


def load_sweeps(paths) -> tuple[dict, list]:
    """``{(scheduler, steps): means}`` merged over runs, and ``(path, subjects)`` of each run."""
    merged, sources = {}, []
    for given in paths:
        path = Path(given) / "results.json" if Path(given).is_dir() else Path(given)
        try:
            sweep = json.loads(path.read_text())["sweep"]
            means = sweep["mean"]
        except (OSError, ValueError, KeyError, TypeError) as exc:
            sys.exit(f"{path}: not a qid2 benchmark result with a steps sweep ({exc})")
        sources.append((str(path), sweep.get("subjects"), sweep.get("slices")))
        for scheduler, by_steps in means.items():
            for steps, values in by_steps.items():
                merged[(scheduler, int(steps))] = values
    return merged, sources


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("sweeps", nargs="+", help="qid2 benchmark output folders (or their results.json)")
    ap.add_argument("--reference", default="ddpm:1000", help="SCHEDULER:STEPS of the reference (default: %(default)s)")
    ap.add_argument("--tolerance", type=float, default=0.05, help="allowed relative FA-error excess (default: %(default)s)")
    ap.add_argument("--figure", help="also save the merged sweep as this PNG")
    args = ap.parse_args(argv)
    sweep, sources = load_sweeps(args.sweeps)
    name, _, steps = args.reference.partition(":")
    reference = (name, int(steps or 0))
    if reference not in sweep:
        have = ", ".join(f"{s}:{n}" for s, n in sorted(sweep))
        sys.exit(f"the reference {args.reference} is in none of the sweeps (they have {have})")
    for path, subjects, slices in sources:
        print(f"<!-- {path}: subjects {subjects}, central slices {slices} -->")
    print(sweep_table(sweep, reference, args.tolerance))
    choice = recommend_sampler(sweep, reference, args.tolerance)
    if args.figure:
        nested = {}
        for (name, steps), values in sweep.items():
            nested.setdefault(name, {})[str(steps)] = values
        metrics = {"fa_mae": "FA error (vs acquisition)", "ssim": "image SSIM (vs acquisition)"}
        if all(v.get("fa_mae_truth") is not None for v in sweep.values()):
            metrics["fa_mae_truth"] = "FA error (vs truth)"
        save_figure(sweep_figure(nested, metrics), args.figure)
    print(f"\nFewest passes within {args.tolerance:.0%} of {args.reference}'s FA error: {choice[0]}, {choice[1]} steps "
          f"(FA error {sweep[choice]['fa_mae']:.4f} vs {sweep[reference]['fa_mae']:.4f}).")
    return 0


if __name__ == "__main__":
    sys.exit(main())
