"""``qid2 phantom``: simulate a phantom cohort (brain-like, randomised or multi-tensor) in the HCP layout."""

from __future__ import annotations

import math

from ..errors import QID2InputError


def add_parser(subparsers):
    p = subparsers.add_parser(
        "phantom",
        help="simulate a brain-like DWI phantom cohort (HCP layout, with truth)",
        description=(
            "Simulate brain-like diffusion MRI phantoms with known truth: DIR/phantom-000/T1w/Diffusion/"
            "{data.nii.gz, bvals, bvecs, nodif_brain_mask.nii.gz} and DIR/phantom-000/truth/ (noise-free "
            "signal, FA, fibre directions and fractions, tissue maps). 18 b0 + 90 directions per shell. "
            "--randomize draws tissue properties, dispersion, contrast, bias, voxel size, SNR, partial volume and "
            "Gibbs ringing per subject (training data that does not teach one simulator's settings); "
            "--simulator multitensor writes an independent multi-tensor slab phantom (for evaluation only)."
        ),
    )
    p.add_argument("--out", required=True, metavar="DIR", help="cohort folder (created if missing)")
    p.add_argument("--subjects", default="1", metavar="N", help="number of subjects (default 1)")
    p.add_argument("--seed", default="0", metavar="S", help="cohort seed (default 0)")
    p.add_argument("--resolution", default=None, metavar="MM",
                   help="voxel size: 1.25 (HCP, 145x174x145) or 2.5 (72x87x72; default; drawn from 1.25-2.5 with --randomize)")
    p.add_argument("--snr", default=None, help="white-matter b0 SNR (default 25, drawn from 10-50 with --randomize; 'inf' for no noise)")
    p.add_argument("--shells", default=None, metavar="B[,B...]",
                   help="b-values of the shells, e.g. 1000,2000,3000 (default 1000; 1000,2000,3000 with --randomize)")
    p.add_argument("--slab", default=None, metavar="K", help="keep only the K central axial slices (small, fast cohorts)")
    p.add_argument("--randomize", action="store_true", help="domain-randomised brain phantoms (options given explicitly are kept)")
    p.add_argument("--simulator", default="brain", metavar="NAME",
                   help="brain (default) or multitensor: dipy multi-tensor slab, 64x64x16 at 2.5 mm (evaluation only)")
    p.add_argument("--jobs", type=int, default=1, metavar="J", help="subjects simulated in parallel processes (default 1)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(run=run)
    return p


def _integer(value: str, flag: str, minimum: int) -> int:
    try:
        number = int(value)
    except ValueError:
        raise QID2InputError(flag, f"{value!r} is not an integer") from None
    if number < minimum:
        raise QID2InputError(flag, f"must be at least {minimum}, got {number}")
    return number


def _number(value: str, flag: str) -> float:
    try:
        number = float(value)
    except ValueError:
        raise QID2InputError(flag, f"{value!r} is not a number") from None
    if math.isnan(number):
        raise QID2InputError(flag, "must be a number, got nan")
    return number


def _n_slices(simulator: str, resolution: float) -> int:
    """Axial slices of the grid a slab is cut from."""
    from ..data.phantom import HCP_FOV_MM, phantom_grid
    from ..data.phantom.multitensor import FOV_MM

    return phantom_grid(resolution, FOV_MM if simulator == "multitensor" else HCP_FOV_MM)[0][2]


def run(args) -> int:
    from ..data.phantom import SIMULATORS, write_cohort

    n_subjects = _integer(args.subjects, "--subjects", 1)
    seed = _integer(args.seed, "--seed", 0)
    if args.simulator not in SIMULATORS:
        raise QID2InputError("--simulator", f"expected one of {', '.join(SIMULATORS)}, got {args.simulator!r}")
    if args.randomize and args.simulator != "brain":
        raise QID2InputError("--randomize", f"applies to the brain phantom, not --simulator {args.simulator}")
    resolution = snr = shells = None
    if args.resolution is not None:
        resolution = _number(args.resolution, "--resolution")
        if not 0.5 <= resolution <= 5.0:
            raise QID2InputError("--resolution", f"must be between 0.5 and 5 mm (1.25 and 2.5 are HCP-like), got {args.resolution}")
    if args.snr is not None:
        snr = _number(args.snr, "--snr")
        if snr <= 0:
            raise QID2InputError("--snr", f"must be positive (or inf), got {args.snr}")
    if args.shells is not None:
        parts = [s.strip() for s in args.shells.split(",")]
        shells = tuple(_number(s, "--shells") if s else math.nan for s in parts)
        if any(not 100 <= b <= 20000 for b in shells):
            raise QID2InputError("--shells", f"expected comma-separated b-values between 100 and 20000 s/mm², got {args.shells!r}")
        if len(set(shells)) != len(shells):
            raise QID2InputError("--shells", f"repeated b-value in {args.shells!r}")
    slab = None
    if args.slab is not None:
        # 2.5 mm: the default grid, and the coarsest a randomised subject draws.
        grid_mm = 2.5 if resolution is None else resolution
        n_slices = _n_slices(args.simulator, grid_mm)
        slab = _integer(args.slab, "--slab", 1)
        if slab > n_slices:
            raise QID2InputError("--slab", f"the {grid_mm:g} mm grid has only {n_slices} axial slices, got {slab}")
    paths = write_cohort(args.out, n_subjects, seed, resolution=resolution, snr=snr, shells=shells, slab=slab,
                         randomize=args.randomize, simulator=args.simulator, progress=not args.quiet, jobs=max(1, args.jobs))
    print(f"wrote {len(paths)} {args.simulator} phantom subject(s) to {args.out}")
    return 0
