"""``qid2 benchmark``: QID² and the baselines on held-out subjects, the paper's protocol.

For each held-out subject the b=1000 shell is split into 30 acquired and 60
target directions (:func:`~qid2_diffusers.data.io.split_acquired`); every
method predicts the targets from b0 + the acquired volumes, and
:class:`~qid2_diffusers.evaluation.SubjectEvaluation` scores the prediction
against the acquisition and, for phantoms, against the noise-free truth.
Writes ``results.json``, ``results.md`` (Table 1 layout) and figures.
"""

from __future__ import annotations

import argparse
import os
import platform
import shlex
import time
from pathlib import Path

import numpy as np

from ..errors import QID2InputError

__all__ = ["add_parser", "run"]

#: Metrics summarised and tested across subjects.
METRICS = ("ssim", "psnr", "nrmse", "fa_mae", "fa_ssim", "md_mae", "angular_error_deg")

#: (reference, metric) pairs tested between methods.
TESTED = (("acquired", "ssim"), ("acquired", "fa_mae"), ("acquired", "fa_ssim"), ("truth", "fa_mae"))

#: Row key of the full acquisition scored against the truth (the noise floor).
NOISE_FLOOR = "acquired-all"


def _acquired_label(n_directions: int) -> str:
    return f"Acquired {n_directions}"


def _int_list(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def add_parser(subparsers):
    from ..baselines import METHODS
    from ..schedulers import SCHEDULERS

    p = subparsers.add_parser(
        "benchmark",
        help="run QID² and the baselines on held-out subjects and write a Table-1 report",
        description=(
            "Evaluate up-samplers with the paper's protocol on held-out subjects: keep 30 of the b=1000 "
            "directions, predict the other 60, score images and tensor maps inside the brain mask against the "
            "acquisition (and the noise-free truth of phantoms). Writes results.json, results.md and figures."
        ),
    )
    p.add_argument(
        "--data", required=True, metavar="DIR", help="dataset folder (HCP or BIDS layout, e.g. `qid2 phantom` output)"
    )
    p.add_argument(
        "--methods",
        default="qid2,cgan,qgan,interp,dti,sh4",
        help=f"comma-separated methods from {', '.join(METHODS)} (default: %(default)s)",
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
    held = p.add_mutually_exclusive_group()
    held.add_argument(
        "--subjects",
        type=int,
        default=3,
        metavar="K",
        help="evaluate the last K subjects found (the held-out ones; default: %(default)s)",
    )
    held.add_argument("--subject-ids", nargs="+", metavar="ID", help="evaluate these subjects instead")
    p.add_argument("--shell", type=float, default=1000, help="b-value of the shell to up-sample (default: %(default)g)")
    p.add_argument("--n-acquired", type=int, default=30, help="directions kept as acquired (default: %(default)s)")
    p.add_argument(
        "--sweep-steps", type=_int_list, metavar="N,N,...", help="also sweep QID² sampling steps, e.g. 5,10,20,50"
    )
    p.add_argument(
        "--sweep-schedulers",
        default="ddpm,ddim,dpm++,unipc",
        metavar="NAME,...",
        help="schedulers of the sweep (default: %(default)s)",
    )
    p.add_argument(
        "--sweep-subjects",
        type=int,
        default=1,
        metavar="K",
        help="held-out subjects the sweep runs on, the first K (default: %(default)s)",
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
    p.add_argument("--seed", type=int, default=0, help="sampling seed (default: %(default)s)")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="hide progress bars")
    p.add_argument("--out", required=True, metavar="DIR", help="output folder")
    p.set_defaults(run=run)
    return p


def _command(args) -> str:
    """The command line that reproduces this run, every default spelled out."""
    parts = [
        "qid2",
        "benchmark",
        "--data",
        str(args.data),
        "--methods",
        args.methods,
        "--R",
        *map(str, args.R),
        *(["--scheduler", args.scheduler] if args.scheduler else []),
        *(["--steps", str(args.steps)] if args.steps else []),
    ]
    for flag in ("model", "cgan", "qgan"):
        if getattr(args, flag):
            parts += [f"--{flag}", *map(str, getattr(args, flag))]
    parts += ["--subject-ids", *args.subject_ids] if args.subject_ids else ["--subjects", str(args.subjects)]
    parts += ["--shell", f"{args.shell:g}", "--n-acquired", str(args.n_acquired)]
    if args.sweep_steps:
        parts += [
            "--sweep-steps",
            ",".join(map(str, args.sweep_steps)),
            "--sweep-schedulers",
            args.sweep_schedulers,
            "--sweep-subjects",
            str(args.sweep_subjects),
            *(["--sweep-slices", str(args.sweep_slices)] if args.sweep_slices else []),
        ]
    if args.fid_weights:
        parts += ["--fid-weights", str(args.fid_weights)]
    if args.save_predictions:
        parts.append("--save-predictions")
    parts += ["--batch-size", str(args.batch_size), "--seed", str(args.seed)]
    if args.device:
        parts += ["--device", args.device]
    parts += ["--out", str(args.out)]
    return shlex.join(parts)


def _machine(device) -> dict:
    import torch

    info = {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "device": str(device),
    }
    if str(device).startswith("cuda") and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(torch.device(device))
    return info


def _rows(args) -> list[dict]:
    """One row per (method, R): key, method name, R, display label and weights path."""
    from ..baselines import METHODS, method_label, uses_references

    names = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in names if m not in METHODS]
    if unknown or not names:
        raise QID2InputError(
            None, f"unknown method(s) {', '.join(unknown) or '(none given)'}; choose from {', '.join(METHODS)}"
        )
    for flag in ("model", "cgan", "qgan"):
        paths = getattr(args, flag)
        if paths and len(paths) != len(args.R):
            raise QID2InputError(
                None,
                f"--{flag} takes one folder per R, in --R order ({len(args.R)}), got {len(paths)}",
            )
    rows = []
    for name in dict.fromkeys(names):
        for i, r in enumerate(args.R if uses_references(name) else [None]):
            flag = {"qid2": "model", "cgan": "cgan", "qgan": "qgan"}.get(name)
            paths = getattr(args, flag) if flag else None
            rows.append(
                {
                    "key": f"{name}-r{r}" if r else name,
                    "method": name,
                    "R": r,
                    "label": method_label(name, r),
                    "weights": str(paths[i]) if paths else None,
                }
            )
    return rows


def _held_out(args):
    from ..data.layouts import discover_subjects

    subjects = discover_subjects(args.data)
    if args.subject_ids:
        by_id = {s.subject_id: s for s in subjects}
        missing = [i for i in args.subject_ids if i not in by_id]
        if missing:
            raise QID2InputError(args.data, f"subject(s) {', '.join(missing)} not found (found: {', '.join(by_id)})")
        return [by_id[i] for i in args.subject_ids]
    if args.subjects < 1 or args.subjects > len(subjects):
        raise QID2InputError(args.data, f"{len(subjects)} subjects found, cannot hold out the last {args.subjects}")
    return subjects[-args.subjects :]


def _truth_signal(subject, dwi, shell):
    """The phantom's noise-free signal on the subject's shell, or ``None`` for real data."""
    from ..data.io import DWI, extract_shell
    from ..data.phantom import load_truth

    subject_dir = Path(subject.dwi).parents[2] if subject.layout == "hcp" else None
    if subject_dir is None or not (subject_dir / "truth").is_dir():
        return None
    signal = load_truth(subject_dir)["signal"]
    noise_free = DWI(
        data=np.asarray(signal), bvals=dwi.bvals, bvecs=dwi.bvecs, affine=dwi.affine, path=str(subject_dir)
    )
    return np.asarray(extract_shell(noise_free, shell).data, dtype=np.float32)


def _prepare(subject, args):
    """Load one subject and split its shell into acquired and target directions."""
    from ..data.io import extract_shell, split_acquired
    from ..evaluation import SubjectEvaluation

    dwi = subject.load()
    if dwi.mask is None:
        raise QID2InputError(subject.dwi, "no brain mask found beside it; every metric is taken inside the mask")
    shell = extract_shell(dwi, args.shell)
    data = np.asarray(shell.data, dtype=np.float32)
    b0 = shell.b0_indices
    dw = np.setdiff1d(np.arange(shell.n_volumes), b0)
    try:
        acquired, targets = split_acquired(shell.bvecs[dw], args.n_acquired)
    except ValueError as exc:
        raise QID2InputError(subject.dwi, str(exc)) from None
    if len(targets) == 0:
        raise QID2InputError(subject.dwi, f"all {len(dw)} directions of the b={args.shell:g} shell would be acquired")
    low = np.sort(np.r_[b0, dw[acquired]])
    evaluation = SubjectEvaluation(
        data, shell.bvals, shell.bvecs, dwi.mask, truth=_truth_signal(subject, dwi, args.shell)
    )
    return {
        "dwi": shell,
        "data": data,
        "low": low,
        "acquired": dw[acquired],
        "targets": shell.bvecs[dw[targets]],
        "evaluation": evaluation,
    }


def _figure_slices(prep, maps, pred, label, panels, r_first):
    """Keep the middle brain slice of the first subject for the figures."""
    from ..directions import nearest_references
    from ..upsampling import brain_bounding_box, brain_slices

    ev = prep["evaluation"]
    if not panels:
        z = int(brain_slices(ev.mask)[len(brain_slices(ev.mask)) // 2])
        bx, by = brain_bounding_box(ev.mask)
        crop = (bx, by, z)
        t0 = 0
        target_volume = ev.volume_indices(prep["targets"][t0 : t0 + 1])[0]
        acquired = prep["acquired"]
        refs = acquired[nearest_references(prep["targets"][t0], ev.bvecs[acquired], r_first)]
        panels.update(
            crop=crop, mask=ev.mask[crop], fa={_acquired_label(len(ev.dw)): ev.reference_maps.fa[crop]}, slices={}
        )
        if ev.truth is not None:
            panels["fa"]["Truth"] = ev.truth_maps.fa[crop]
        for k, v in enumerate(refs):
            panels["slices"][f"reference {k + 1}"] = ev.data[crop + (v,)]
        panels["slices"]["target (acquired)"] = ev.data[crop + (target_volume,)]
        if ev.truth is not None:
            panels["slices"]["target (truth)"] = ev.truth[crop + (target_volume,)]
        panels["title"] = (
            f"slice z={z}, target direction ({', '.join(f'{c:.2f}' for c in prep['targets'][t0])}), R={r_first}"
        )
    crop = panels["crop"]
    panels["fa"][label] = maps.fa[crop]
    panels["slices"][label] = pred[crop + (0,)]


def _central_slab(ev, k: int):
    """The same subject's evaluation restricted to its ``k`` central brain slices."""
    from ..evaluation import SubjectEvaluation
    from ..upsampling import brain_slices

    zs = brain_slices(ev.mask)
    zs = zs[max(0, (len(zs) - k) // 2) :][:k]
    return SubjectEvaluation(
        ev.data[:, :, zs],
        ev.bvals,
        ev.bvecs,
        ev.mask[:, :, zs],
        truth=None if ev.truth is None else ev.truth[:, :, zs],
        min_mask_voxels=ev.min_mask_voxels,
        fibre_fa=ev.fibre_fa,
    )


def _sweep(pipeline, prep, args, sweep, progress):
    """QID² at every (scheduler, steps) of the sweep on one subject; appends to ``sweep``."""
    from tqdm.auto import tqdm

    from ..hub import with_scheduler
    from ..pipelines import QID2Upsampler

    schedulers = [s.strip() for s in args.sweep_schedulers.split(",") if s.strip()]
    ev, low = prep["evaluation"], prep["low"]
    if args.sweep_slices:
        ev = _central_slab(ev, args.sweep_slices)
    jobs = [(s, n) for s in schedulers for n in args.sweep_steps]
    for scheduler, steps in tqdm(jobs, desc="steps sweep", unit="run", disable=not progress, leave=False):
        # A pipeline of its own shares the networks and leaves the main run's scheduler alone.
        up = QID2Upsampler(with_scheduler(pipeline, scheduler), num_inference_steps=steps, batch_size=args.batch_size, seed=args.seed, progress=False)
        pred = up.predict(ev.data[..., low], ev.bvals[low], ev.bvecs[low], prep["targets"], ev.mask)
        scores = ev.score(pred, prep["targets"])
        entry = sweep.setdefault(scheduler, {}).setdefault(str(steps), {"fa_mae": [], "ssim": [], "fa_mae_truth": []})
        entry["fa_mae"].append(scores["acquired"]["fa_mae"])
        entry["ssim"].append(scores["acquired"]["ssim"])
        if "truth" in scores:
            entry["fa_mae_truth"].append(scores["truth"]["fa_mae"])


def _fid_values(features, reference_features):
    from ..evaluation import frechet_distance

    ref = np.concatenate(reference_features)
    return {key: frechet_distance(np.concatenate(f), ref) for key, f in features.items()}


def _load_methods(rows, args) -> dict:
    """Build each row's up-sampler; a learned method without weights is skipped with a message."""
    from ..baselines import MissingWeightsError, make_upsampler

    upsamplers = {}
    for row in rows:
        try:
            upsamplers[row["key"]] = make_upsampler(
                row["method"],
                num_references=row["R"] or 3,
                model_path=row["weights"],
                scheduler=args.scheduler if row["method"] == "qid2" else None,
                num_inference_steps=args.steps,
                batch_size=args.batch_size,
                seed=args.seed,
                device=args.device,
                progress=args.progress,
            )
            row["status"] = "ok"
        except MissingWeightsError as exc:
            row["status"] = f"skipped: {exc}"
            print(f"qid2 benchmark: skipping {row['label']}: {exc}")
        except ValueError as exc:
            raise QID2InputError(None, str(exc)) from None
    if not upsamplers:
        raise QID2InputError(None, "no method could run (see the skipping messages above)")
    return upsamplers


def _summaries(per_subject, table_rows, ran, references):
    """Mean ± std of every metric per row, and paired tests of every method against the baseline."""
    from ..evaluation import paired_tests, summarize

    def values(key, ref, metric):
        return [per_subject[s].get(key, {}).get(ref, {}).get(metric) for s in per_subject]

    summary = {
        row["key"]: {ref: {m: summarize(values(row["key"], ref, m)) for m in METRICS} for ref in references}
        for row in table_rows
    }
    # QID² is the method under test; without it, the first method that ran.
    baseline = next((r for r in ran if r["method"] == "qid2"), ran[0])
    tests = {
        row["key"]: {
            f"{ref}/{m}": paired_tests(values(baseline["key"], ref, m), values(row["key"], ref, m))
            for ref, m in TESTED
            if ref in references
        }
        for row in ran
        if row is not baseline
    }
    return summary, baseline, tests


def _write_figures(out, panels, subject_id, sweep_means, has_truth) -> dict:
    from ..evaluation.report import fa_figure, save_figure, slice_grid_figure, sweep_figure

    figures = {}
    if panels:
        figures["fa_maps"] = save_figure(
            fa_figure(panels["fa"], next(iter(panels["fa"])), panels["mask"]), out / "fa_maps.png"
        )
        figures["slice_grid"] = save_figure(
            slice_grid_figure(panels["slices"], f"{subject_id}: {panels['title']}"), out / "slice_grid.png"
        )
    if sweep_means:
        metrics = {"fa_mae": "FA error (vs acquisition)", "ssim": "image SSIM (vs acquisition)"}
        if has_truth:
            metrics["fa_mae_truth"] = "FA error (vs truth)"
        figures["steps_sweep"] = save_figure(sweep_figure(sweep_means, metrics), out / "steps_sweep.png")
    return {k: v.name for k, v in figures.items()}


def _markdown(table, notes, tests_md, command, wall) -> str:
    return "\n".join(
        [
            "# Benchmark",
            "",
            table,
            *[f"- {n}" for n in notes],
            "",
            tests_md,
            f"Command: `{command}`  ",
            f"Wall time: {wall:.1f} s",
            "",
        ]
    )


def run(args) -> int:
    from tqdm.auto import tqdm

    from ..hub import select_device
    from ..data.io import save_dwi
    from ..evaluation import FID_UNAVAILABLE, inception_features, load_inception, summarize
    from ..evaluation.report import results_table, tests_table, write_json, write_text
    from ..schedulers import SCHEDULERS

    started = time.perf_counter()
    out = Path(args.out)
    rows = _rows(args)
    if args.sweep_steps:
        unknown = [s for s in args.sweep_schedulers.split(",") if s.strip() and s.strip() not in SCHEDULERS]
        if unknown:
            raise QID2InputError(
                None, f"unknown sweep scheduler(s) {', '.join(unknown)}; choose from {', '.join(SCHEDULERS)}"
            )
    held = _held_out(args)
    fid_model = load_inception(args.fid_weights) if args.fid_weights else None
    upsamplers = _load_methods(rows, args)
    ran = [row for row in rows if row["status"] == "ok"]
    sweep_pipeline = next((upsamplers[r["key"]].pipeline for r in ran if r["method"] == "qid2"), None)
    if args.sweep_steps and sweep_pipeline is None:
        print("qid2 benchmark: no QID² model ran, so no steps sweep")
    # The sampler QID² ran with: the flags, else what was saved with the (first) model.
    sampler = {"scheduler": args.scheduler, "steps": args.steps}
    if sweep_pipeline is not None:
        saved = next((n for n, cls in SCHEDULERS.items() if type(sweep_pipeline.scheduler) is cls), None)
        sampler = {"scheduler": args.scheduler or saved,
                   "steps": args.steps or sweep_pipeline.config.default_num_inference_steps}
    r_first = next((r["R"] for r in ran if r["R"]), args.R[0])

    per_subject, panels, sweep = {}, {}, {}
    features = {row["key"]: [] for row in ran}
    reference_features = []
    has_truth, floor_label = False, None
    for s_index, subject in enumerate(tqdm(held, desc="subjects", unit="subject", disable=not args.progress)):
        prep = _prepare(subject, args)
        ev, low, targets = prep["evaluation"], prep["low"], prep["targets"]
        has_truth = has_truth or ev.truth is not None
        results = per_subject.setdefault(subject.subject_id, {})
        if fid_model is not None:
            ref_values = ev.data[..., ev.volume_indices(targets)]
            data_range = float(ref_values[ev.mask].max() - ref_values[ev.mask].min())
            reference_features.append(inception_features(fid_model, ref_values, ev.mask, data_range))
        for row in tqdm(ran, desc=subject.subject_id, unit="method", leave=False, disable=not args.progress):
            tic = time.perf_counter()
            try:
                pred = upsamplers[row["key"]].predict(
                    prep["data"][..., low], ev.bvals[low], ev.bvecs[low], targets, ev.mask
                )
            except ValueError as exc:  # e.g. more SH coefficients or references than acquired directions
                raise QID2InputError(subject.dwi, f"{row['label']}: {exc}") from None
            elapsed = time.perf_counter() - tic
            scores, maps = ev.score(pred, targets, return_maps=True)
            results[row["key"]] = {**scores, "time_s": elapsed}
            if fid_model is not None:
                features[row["key"]].append(inception_features(fid_model, pred, ev.mask, data_range))
            if args.save_predictions:
                shell = prep["dwi"]
                save_dwi(
                    out / "predictions" / subject.subject_id / row["key"],
                    ev.combine(pred, targets),
                    shell.bvals,
                    shell.bvecs,
                    shell.affine,
                    shell.header,
                )
            if s_index == 0:
                _figure_slices(prep, maps, pred, row["label"], panels, row["R"] or r_first)
        if ev.truth is not None:
            results[NOISE_FLOOR] = {"truth": ev.score_acquisition(targets)}
            floor_label = f"{_acquired_label(len(ev.dw))} (noise floor, vs truth)"
        if args.sweep_steps and sweep_pipeline is not None and s_index < args.sweep_subjects:
            _sweep(sweep_pipeline, prep, args, sweep, args.progress)
        del prep

    table_rows = ran + ([{"key": NOISE_FLOOR, "label": floor_label}] if has_truth else [])
    labels = {row["key"]: row["label"] for row in table_rows}
    summary, baseline, tests = _summaries(
        per_subject, table_rows, ran, ("acquired", "truth") if has_truth else ("acquired",)
    )
    fid = _fid_values(features, reference_features) if fid_model is not None else None
    sweep_means = {
        sched: {steps: {m: summarize(v)["mean"] for m, v in vals.items()} for steps, vals in by_steps.items()}
        for sched, by_steps in sweep.items()
    }
    figures = _write_figures(out, panels, held[0].subject_id, sweep_means, has_truth)

    wall = time.perf_counter() - started
    command = _command(args)
    table = results_table(
        [(labels[k], summary[k]) for k in labels],
        fid={labels[k]: v for k, v in fid.items()} if fid is not None else FID_UNAVAILABLE,
        has_truth=has_truth,
    )
    notes = [
        f"Held-out subjects ({len(per_subject)}): {', '.join(per_subject)}. Mean ± std over subjects; every metric "
        f"inside the brain mask. b={args.shell:g} shell, {args.n_acquired} directions acquired, the rest predicted.",
        "Image metrics compare the predicted volumes with the acquired ones at the same directions (SSIM per axial "
        "slice); FA, MD and angle compare a tensor fit on b0 + acquired + predicted volumes with one on b0 + all "
        "acquired volumes" + (" (or, vs truth, on the noise-free signal)." if has_truth else "."),
        f"QID²: {sampler['scheduler']}, {sampler['steps']} steps, seed {args.seed}.",
        f"FID: {FID_UNAVAILABLE}" if fid is None else "FID: pooled over the held-out subjects' brain slices.",
    ]
    notes += [f"{row['label']}: {row['status']}" for row in rows if row["status"] != "ok"]
    results = {
        "command": command,
        "wall_time_s": wall,
        "machine": _machine(select_device(args.device)),
        "settings": {
            "shell": args.shell,
            "n_acquired": args.n_acquired,
            "R": args.R,
            "scheduler": sampler["scheduler"],
            "steps": sampler["steps"],
            "seed": args.seed,
        },
        "subjects": list(per_subject),
        "methods": rows,
        "per_subject": per_subject,
        "summary": summary,
        "paired_tests": {"baseline": baseline["key"], "tests": tests},
        "fid": fid if fid is not None else {"note": FID_UNAVAILABLE},
        "sweep": {
            "R": sweep_pipeline.num_references,
            "subjects": list(per_subject)[: args.sweep_subjects],
            "slices": args.sweep_slices,
            "mean": sweep_means,
            "per_subject": sweep,
        }
        if sweep_means
        else None,
        "figures": figures,
    }
    write_json(out / "results.json", results)
    write_text(
        out / "results.md", _markdown(table, notes, tests_table(tests, baseline["label"], labels), command, wall)
    )
    print(table)
    print(f"results in {out} ({wall:.1f} s)")
    return 0
