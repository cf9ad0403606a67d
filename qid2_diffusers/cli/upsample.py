"""``qid2 upsample``: synthesise the missing gradient directions of a DWI series, or of a whole cohort.

The command line of :func:`qid2_diffusers.inference.upsample_dwi`; ``--cohort``
runs :func:`qid2_diffusers.cohort.upsample_cohort` and ``--example``
:func:`qid2_diffusers.example.run_example`.
"""

from __future__ import annotations

import shlex
import time
import warnings

from ..denoise import DEFAULT_DENOISE, DENOISERS
from ..errors import QID2InputError, QID2InputWarning
from ..inference import CPU_BATCH_PIXELS, DEVICE_BATCH_SIZE
from ..pipelines.upsampler_qid2 import check_residual_weight

__all__ = ["add_model_arguments", "add_parser", "run"]


def add_model_arguments(p) -> None:
    """The model and sampling options shared by ``qid2 upsample`` and its ``--example``."""
    g = p.add_argument_group("model and sampling")
    g.add_argument("--model", metavar="PATH_OR_HUB_ID", help="model folder or Hugging Face Hub id (default: the shipped model for --R)")
    g.add_argument("--R", type=int, default=None, dest="num_references", metavar="R",
                   help="reference slices per target; the model must be trained for it (default: the model's, 3 for the shipped one)")
    g.add_argument("--scheduler", metavar="NAME", help="sampler: ddpm, ddim, dpm++, unipc or euler (default: the one saved with the model)")
    g.add_argument("--steps", type=int, metavar="K", help="denoising steps (default: the model's default_num_inference_steps)")
    g.add_argument("--num-samples", type=int, default=1, metavar="S",
                   help="samples averaged per target; above 1 also writes PREFIX_std.nii.gz, an uncertainty map "
                        "that needs several --steps (samples of one step hardly differ) (default: 1)")
    g.add_argument("--adapt-steps", type=int, metavar="N",
                   help="before sampling, fine-tune a copy of the model for N steps on this scan's own directions "
                        "(each left out and predicted from the others); 0 turns it off (default: the model's "
                        "default_adapt_steps)")
    g.add_argument("--denoise", choices=DENOISERS, default=None,
                   help="denoise the input volumes first, b0s and every shell together: mppca (dipy's MP-PCA), "
                        "dwidenoise (the same method by MRtrix3, on the PATH: faster, a slightly higher FA error "
                        "here), patch2self, or none for a scan that arrives denoised; the output's "
                        f"input volumes are then the denoised ones (default: {DEFAULT_DENOISE})")
    g.add_argument("--residual-weight", default=None, metavar="auto|W",
                   help="how much of the network's correction to the tensor fit to keep: auto chooses it per shell "
                        "by predicting the scan's own kept directions from the others, a number in [0, 1] fixes it "
                        "(1: the network as trained, 0: the tensor fit) (default: auto)")
    g.add_argument("--batch-size", type=int, metavar="B",
                   help=f"(slice, target) pairs per network call (default: {DEVICE_BATCH_SIZE} on a GPU; on the CPU "
                        f"as many as fit {CPU_BATCH_PIXELS} pixels)")
    g.add_argument("--device", default="auto", metavar="DEVICE", help="auto, cpu, cuda or mps (default: auto)")
    g.add_argument("--dtype", default="auto", metavar="DTYPE",
                   help="auto (bf16 on a CPU with native bf16, AVX-512 BF16 or AMX; else fp32), fp32, fp16 or bf16 "
                        "(default: auto)")
    g.add_argument("--seed", type=int, default=0, metavar="N", help="base seed; same seed, same output (default: 0)")
    g.add_argument("--compile", action="store_true",
                   help="torch.compile the network, for GPUs: every slice is then cropped to the volume's brain box "
                        "(one shape, one graph); on 2 CPU cores it was slower than the default eager run with "
                        "per-slice boxes (BENCHMARK.md, Speed)")


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "upsample",
        help="synthesise missing gradient directions with QID²",
        description=(
            "Up-sample the shells of a DWI series (every shell, or those given with --shell), each from the b0s "
            "and its own directions: write the input's volumes, untouched, followed by each shell's volumes "
            "synthesised at the target directions, by increasing b (PREFIX.nii.gz, PREFIX.bval, PREFIX.bvec). "
            "Any stored orientation is handled: the series is up-sampled in the model's orientation and written "
            "back in its own, with its affine, header and b-vector convention. "
            "With --cohort, every series of a BIDS or HCP dataset or of a list file, resumably, written under "
            "--out-dir with a summary table (exit status 1 when a subject failed). "
            "Or run the seeded phantom example with --example."
        ),
    )
    g = p.add_argument_group("input and output")
    g.add_argument("--dwi", metavar="IN.nii.gz", help="4D NIfTI series (.nii or .nii.gz)")
    g.add_argument("--bvals", metavar="IN.bval", help="FSL bval file (default: next to --dwi)")
    g.add_argument("--bvecs", metavar="IN.bvec", help="FSL bvec file (default: next to --dwi)")
    g.add_argument("--mask", metavar="MASK.nii.gz", help="brain mask NIfTI (default: dipy median_otsu on the mean b0)")
    g.add_argument("--shell", type=float, action="append", dest="shells", metavar="B",
                   help="b-value of a shell to up-sample; repeat for several (default: every shell)")
    g.add_argument("--out", metavar="PREFIX", help="output prefix: writes PREFIX.nii.gz, PREFIX.bval, PREFIX.bvec")
    g.add_argument("--cohort", metavar="DIR_OR_LIST",
                   help="up-sample every series of a BIDS dataset (sub-*/[ses-*/]dwi/*_dwi.nii.gz), an HCP folder "
                        "(<subject>/T1w/Diffusion/data.nii.gz) or a list file (one .nii.gz path per line, bval/bvec "
                        "beside it) into --out-dir; instead of --dwi/--out. Finished subjects are skipped on a rerun; "
                        "under accelerate launch, whole subjects are spread over the processes")
    g.add_argument("--out-dir", metavar="DIR",
                   help="output folder of --cohort (a BIDS derivative for a BIDS dataset, plus "
                        "qid2_cohort_summary.tsv) or of --example (default for --example: the current folder)")
    g.add_argument("--timings", action="store_true",
                   help="also print, on one line, the wall seconds of each stage (read, mask, tensor prior, "
                        "adaptation, sampling, write, ...)")
    t = p.add_argument_group("target directions (at most one; default --n-targets 90)")
    t.add_argument("--targets", metavar="T.bvec",
                   help="FSL bvec file (3 rows, or 3 columns) of directions to synthesise in every shell, "
                        "in the same convention as --bvecs")
    t.add_argument("--n-targets", type=int, metavar="N",
                   help="synthesise, in each shell, a uniform N-direction scheme's directions not acquired")
    t.add_argument("--scheme", metavar="NAME",
                   help="named scheme to complete in each shell: hcp90 (the phantom's 90 directions)")
    add_model_arguments(p)
    e = p.add_argument_group("example")
    e.add_argument("--example", action="store_true",
                   help="make a seeded phantom with 30 directions, up-sample it to 90 and report FA errors")
    p.set_defaults(run=run)


def _run_example(args) -> int:
    from ..example import run_example

    run_example(
        args.out_dir or ".",
        model=args.model,
        num_references=args.num_references,
        scheduler=args.scheduler,
        steps=args.steps,
        num_samples=args.num_samples,
        adapt_steps=args.adapt_steps,
        denoise=args.denoise,
        residual_weight=args.residual_weight,
        batch_size=args.batch_size,
        device=args.device,
        dtype=args.dtype,
        seed=args.seed,
        compile=args.compile,
    )
    return 0


def _run_cohort(args) -> int:
    from ..cohort import find_cohort, upsample_cohort
    from ..hub import load_pipeline
    from ..inference import process_state, read_targets

    given = [f"--{name}" for name in ("dwi", "bvals", "bvecs", "mask", "out") if getattr(args, name) is not None]
    if given:
        raise QID2InputError(None, f"--cohort finds each subject's files: drop {', '.join(given)}")
    if args.out_dir is None:
        raise QID2InputError(None, "--cohort needs --out-dir, the folder the outputs go to")
    state = process_state(args.device)
    cohort = find_cohort(args.cohort, args.out_dir, state=state)
    targets = read_targets(args.targets) if args.targets is not None else None
    device = state.device if state is not None and args.device == "auto" else args.device
    pipe = load_pipeline(args.model, num_references=args.num_references, scheduler=args.scheduler, device=device,
                         dtype=args.dtype, compile=args.compile)
    report = upsample_cohort(cohort, pipe, targets, state=state, command=shlex.join(["qid2", *args.argv]),
                             shells=args.shells, n_targets=args.n_targets, scheme=args.scheme,
                             num_inference_steps=args.steps, num_samples=args.num_samples,
                             adapt_steps=args.adapt_steps, denoise=args.denoise,
                             residual_weight=args.residual_weight, batch_size=args.batch_size, seed=args.seed)
    if state is None or state.is_main_process:
        processes = f"{report.num_processes} process{'es' if report.num_processes > 1 else ''}"
        print(f"qid2 upsample: {len(report.outcomes)} subjects on {processes}: {report.count('done')} done, "
              f"{report.count('skipped')} skipped (already done), {report.count('failed')} failed "
              f"-> {report.summary_path}")
        print(report.table())
    return 1 if report.failed else 0


def run(args) -> int:
    from diffusers.utils import logging as diffusers_logging

    from ..data.io import load_dwi
    from ..hub import dtype_name, load_pipeline
    from ..inference import check_writable, process_state, read_targets, upsample_dwi

    diffusers_logging.disable_progress_bar()
    for name, smallest in (("steps", 1), ("num_samples", 1), ("batch_size", 1), ("adapt_steps", 0)):
        value = getattr(args, name)
        if value is not None and value < smallest:
            raise QID2InputError(None, f"--{name.replace('_', '-')} must be at least {smallest}, got {value}")
    try:
        check_residual_weight(args.residual_weight)
    except ValueError as exc:
        raise QID2InputError(None, f"--residual-weight: {exc}") from None
    if args.example:
        return _run_example(args)
    if args.cohort is not None:
        return _run_cohort(args)
    if args.dwi is None or args.out is None:
        raise QID2InputError(None, "--dwi and --out are required (or --cohort DIR --out-dir OUT, or --example)")

    state = process_state(args.device)
    if state is not None and not state.is_main_process:
        warnings.simplefilter("ignore", QID2InputWarning)  # the main process reports them
    dwi = load_dwi(args.dwi, args.bvals, args.bvecs, args.mask)
    targets = read_targets(args.targets) if args.targets is not None else None
    device = state.device if state is not None and args.device == "auto" else args.device
    pipe = load_pipeline(args.model, num_references=args.num_references, scheduler=args.scheduler, device=device,
                         dtype=args.dtype, compile=args.compile)
    prefix = check_writable(args.out)

    start = time.perf_counter()
    result = upsample_dwi(dwi, targets, pipe, shells=args.shells, n_targets=args.n_targets, scheme=args.scheme,
                          num_inference_steps=args.steps, num_samples=args.num_samples, adapt_steps=args.adapt_steps,
                          denoise=args.denoise, residual_weight=args.residual_weight, batch_size=args.batch_size,
                          seed=args.seed, state=state)
    if result is None:
        return 0
    paths = result.save(prefix, dwi.affine, dwi.header)
    seconds = time.perf_counter() - start
    steps = args.steps or pipe.config.default_num_inference_steps
    shells = result.new_shells
    where = (f"at b={next(iter(shells)):g}" if len(shells) == 1
             else "(" + ", ".join(f"b={b:g}: {n}" for b, n in shells.items()) + ")")
    print(
        f"qid2 upsample: {result.n_targets} targets synthesised {where} "
        f"({result.n_input} + {result.n_targets} volumes) in {seconds:.1f} s on {pipe.device.type} "
        f"({dtype_name(pipe.unet.dtype)}, {type(pipe.scheduler).__name__}, {steps} steps"
        f"{f', {state.num_processes} processes' if state is not None else ''}"
        f"{f', adapted to the scan in {result.adaptation_seconds:.1f} s ({result.adapt_steps} steps)' if result.adapt_steps else ''}"
        f") -> {paths[0]}"
    )
    print(f"qid2 upsample: {result.method_note()}")
    if args.timings:
        print(result.format_timings())
    return 0
