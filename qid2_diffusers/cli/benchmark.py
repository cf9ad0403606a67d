"""``qid2 benchmark``: QID² and the baselines on held-out subjects or real scans, the paper's protocol.

The command line of :func:`qid2_diffusers.evaluation.benchmark.run_benchmark`.
"""

from __future__ import annotations

import argparse

__all__ = ["add_parser", "run"]


def _names(text: str) -> list[str]:
    return [name.strip() for name in text.split(",") if name.strip()]


def _int_list(text: str, smallest: int = 1) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or min(values) < smallest:
        raise argparse.ArgumentTypeError(f"expected integers of at least {smallest}, got {text!r}")
    return values


def _step_counts(text: str) -> list[int]:
    return _int_list(text, smallest=0)


def _labelled_paths(text: str) -> list[tuple[str, str]]:
    pairs = [item.partition("=") for item in _names(text)]
    if not pairs or any(not label or not sep or not path for label, sep, path in pairs):
        raise argparse.ArgumentTypeError(f"expected label=PATH[,label=PATH...], got {text!r}")
    return [(label.strip(), path.strip()) for label, _, path in pairs]


def add_parser(subparsers):
    from ..baselines import DENOISED_METHODS, METHODS
    from ..data.real import default_real_data_dir
    from ..evaluation.benchmark import PHANTOM_METHODS
    from ..schedulers import SCHEDULERS

    p = subparsers.add_parser(
        "benchmark",
        help="run QID² and the baselines on held-out subjects or real scans and write a report",
        description=(
            "Evaluate up-samplers with the paper's protocol on held-out subjects (--data: keep 30 of the b=1000 "
            "directions, predict the other 60; Table 1) or on the real scans (--real: per case, keep a uniform "
            "third of the shell, predict the rest; the FA-error ratio to DTI-predict per case and slice). Images "
            "and tensor maps are scored inside the mask against the full acquisition (and the noise-free truth of "
            "phantoms); shells of b >= 2000 also get SH angular correlation and CSD peak error. Writes "
            "results.json, results.md and figures."
        ),
    )
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument(
        "--data", metavar="DIR", help="dataset folder (HCP or BIDS layout, e.g. `qid2 phantom` output)"
    )
    source.add_argument(
        "--real",
        nargs="?",
        const=str(default_real_data_dir()),
        metavar="DIR",
        help="score the real scans instead (mdt Siemens b=1000/2000, MRtrix3 crops b=700/1200/2800 and 3000); "
        f"DIR defaults to {default_real_data_dir()} ($QID2_REAL_DATA)",
    )
    p.add_argument(
        "--cases",
        type=_names,
        metavar="NAME,...",
        help="with --real, only these cases, e.g. mrtrix-b3000,mdt-b1000 (default: all)",
    )
    p.add_argument(
        "--methods",
        type=_names,
        help=f"comma-separated methods from {', '.join(METHODS)}, each optionally prefixed by a denoiser "
        f"(mppca+dti: MP-PCA on the b0s and kept directions, then the method) (default: {','.join(PHANTOM_METHODS)} "
        f"with --data; all of them and {','.join(DENOISED_METHODS)} with --real, where dti is always added)",
    )
    p.add_argument(
        "--R",
        type=int,
        nargs="+",
        default=[3],
        metavar="R",
        help="reference counts for QID², the GANs and Interp (default: 3)",
    )
    p.add_argument(
        "--scheduler", choices=sorted(SCHEDULERS), help="QID² sampler (default: the one saved with the model)"
    )
    p.add_argument("--steps", type=int, help="QID² sampling steps (default: the model's default_num_inference_steps)")
    p.add_argument(
        "--model",
        nargs="+",
        metavar="PATH",
        help="QID² pipeline folder per R, in --R order (default: the shipped model for each R)",
    )
    p.add_argument("--cgan", nargs="+", metavar="PATH", help="cGAN generator folder per R, in --R order")
    p.add_argument("--qgan", nargs="+", metavar="PATH", help="qGAN generator folder per R, in --R order")
    p.add_argument(
        "--qid2-models",
        type=_labelled_paths,
        metavar="LABEL=PATH,...",
        help="QID² models to compare, one row each at its own R, e.g. paper=runs/a,prior=runs/b "
        "(without --model they replace the shipped model)",
    )
    p.add_argument(
        "--adapt-steps",
        type=_step_counts,
        metavar="N,N,...",
        help="QID² test-time adaptation steps on each scan's own kept directions; several values give one row "
        "each, e.g. 0,150 (default: the model's default_adapt_steps)",
    )
    p.add_argument(
        "--denoise",
        type=_names,
        metavar="NAME,...",
        help="run every method once per denoiser (none, mppca, patch2self), each a row of its own, e.g. none,mppca "
        "(default: as the methods are named)",
    )
    p.add_argument(
        "--residual-weight",
        type=_names,
        dest="residual_weights",
        metavar="W,...",
        help="QID²'s weight of its residual over the tensor prior: auto (chosen on each scan's own kept "
        "directions) or numbers in [0, 1]; several give one row each, e.g. auto,1 (default: auto)",
    )
    held = p.add_mutually_exclusive_group()
    held.add_argument(
        "--subjects",
        type=int,
        default=3,
        metavar="K",
        help="with --data, evaluate the last K subjects found (the held-out ones; default: %(default)s)",
    )
    held.add_argument("--subject-ids", nargs="+", metavar="ID", help="evaluate these subjects instead")
    p.add_argument(
        "--shell", type=float, default=1000, help="with --data, b-value of the shell to up-sample (default: %(default)g)"
    )
    p.add_argument(
        "--n-acquired", type=int, default=30, help="with --data, directions kept as acquired (default: %(default)s)"
    )
    p.add_argument(
        "--sweep-steps", type=_int_list, metavar="N,N,...", help="also sweep QID² sampling steps, e.g. 5,10,20,50"
    )
    p.add_argument(
        "--sweep-schedulers",
        type=_names,
        default="ddpm,ddim,dpm++,unipc",
        metavar="NAME,...",
        help="schedulers of the sweep (default: %(default)s)",
    )
    p.add_argument(
        "--sweep-subjects",
        type=int,
        default=1,
        metavar="K",
        help="subjects (or cases) the sweep runs on, the first K (default: %(default)s)",
    )
    p.add_argument(
        "--sweep-slices",
        type=int,
        metavar="K",
        help="run the sweep on the K central brain slices only (DDPM-1000 on a whole subject is hours on a CPU)",
    )
    p.add_argument(
        "--fid-weights",
        metavar="PATH",
        help="TorchScript Inception-v3 feature extractor for FID (nothing is downloaded)",
    )
    p.add_argument(
        "--save-predictions",
        action="store_true",
        help="also write each up-sampled series to OUT/predictions/<subject>/<method>.nii.gz/.bval/.bvec",
    )
    p.add_argument("--batch-size", type=int, default=32, help="slices per network call (default: %(default)s)")
    p.add_argument("--device", help="torch device for learned methods (default: cuda if available, else cpu)")
    p.add_argument("--dtype", default="auto", metavar="DTYPE",
                   help="QID²'s network precision: auto (bf16 on a CPU with native bf16, else fp32), fp32, fp16 or "
                        "bf16 (default: %(default)s; runs recorded before auto existed ran fp32)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (default: %(default)s)")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="hide progress bars")
    p.add_argument("--out", required=True, metavar="DIR", help="output folder")
    p.set_defaults(run=run)
    return p


def run(args) -> int:
    from ..evaluation.benchmark import BenchmarkConfig, run_benchmark

    config = BenchmarkConfig(
        data=args.data,
        out=args.out,
        real=args.real,
        cases=args.cases,
        methods=args.methods,
        num_references=args.R,
        scheduler=args.scheduler,
        steps=args.steps,
        model=args.model,
        cgan=args.cgan,
        qgan=args.qgan,
        qid2_models=args.qid2_models,
        adapt_steps=args.adapt_steps,
        denoise=args.denoise,
        residual_weights=args.residual_weights,
        subjects=args.subjects,
        subject_ids=args.subject_ids,
        shell=args.shell,
        n_acquired=args.n_acquired,
        sweep_steps=args.sweep_steps,
        sweep_schedulers=args.sweep_schedulers,
        sweep_subjects=args.sweep_subjects,
        sweep_slices=args.sweep_slices,
        fid_weights=args.fid_weights,
        save_predictions=args.save_predictions,
        batch_size=args.batch_size,
        device=args.device,
        dtype=args.dtype,
        seed=args.seed,
        progress=args.progress,
    )
    report = run_benchmark(config, log=lambda message: print(f"qid2 benchmark: {message}"))
    print(report.table)
    print(f"results in {report.out} ({report.results['wall_time_s']:.1f} s)")
    return 0
