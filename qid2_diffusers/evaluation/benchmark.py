"""The benchmark: QID² and the baselines on held-out subjects, the paper's protocol.

For each held-out subject the shell is split into acquired and target
directions (:func:`~qid2_diffusers.data.io.split_acquired`, 30 of 90 in the
paper); every method predicts the targets from b0 + the acquired volumes, and
:class:`~qid2_diffusers.evaluation.SubjectEvaluation` scores the prediction
against the acquisition and, for phantoms, against the noise-free truth.
:func:`run_benchmark` writes ``results.json``, ``results.md`` (Table 1 layout)
and figures; ``qid2 benchmark`` is its command line.
"""

from __future__ import annotations

import os
import platform
import shlex
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
from tqdm.auto import tqdm

from ..baselines import METHODS, MissingWeightsError, make_upsampler, method_label, uses_references
from ..data.io import DWI, extract_shell, save_dwi, split_acquired
from ..data.layouts import discover_subjects
from ..data.phantom import load_truth
from ..directions import nearest_references
from ..errors import QID2InputError
from ..upsampling import brain_bounding_box, brain_slices
from .fid import FID_UNAVAILABLE, frechet_distance, inception_features, load_inception
from .protocol import SubjectEvaluation
from .report import (
    fa_figure,
    results_table,
    save_figure,
    slice_grid_figure,
    sweep_figure,
    tests_table,
    write_json,
    write_text,
)
from .stats import paired_tests, summarize

__all__ = ["METRICS", "TESTED", "NOISE_FLOOR", "BenchmarkConfig", "BenchmarkResults", "run_benchmark"]

#: Metrics summarised and tested across subjects.
METRICS = ("ssim", "psnr", "nrmse", "fa_mae", "fa_ssim", "md_mae", "angular_error_deg")

#: (reference, metric) pairs tested between methods.
TESTED = (("acquired", "ssim"), ("acquired", "fa_mae"), ("acquired", "fa_ssim"), ("truth", "fa_mae"))

#: Row key of the full acquisition scored against the truth (the noise floor).
NOISE_FLOOR = "acquired-all"


@dataclass
class BenchmarkConfig:
    """What a benchmark runs; each field is the ``qid2 benchmark`` option of the same name.

    Args:
        data (`str` or `os.PathLike`): dataset folder (HCP or BIDS layout, e.g. ``qid2 phantom`` output).
        out (`str` or `os.PathLike`): output folder.
        methods (`Sequence[str]`, *optional*): names from :data:`~qid2_diffusers.baselines.METHODS`.
        num_references (`Sequence[int]`, *optional*, defaults to `(3,)`): R of QID², the GANs and Interp (``--R``).
        scheduler (`str`, *optional*): QID² sampler; defaults to the one saved with the model.
        steps (`int`, *optional*): QID² sampling steps; defaults to the model's.
        model, cgan, qgan (`Sequence`, *optional*): weights folder per R, in ``num_references`` order.
        subjects (`int`, *optional*, defaults to 3): evaluate the last ``subjects`` subjects found.
        subject_ids (`Sequence[str]`, *optional*): evaluate these subjects instead.
        shell (`float`, *optional*, defaults to 1000): b-value of the shell to up-sample.
        n_acquired (`int`, *optional*, defaults to 30): directions kept as acquired.
        sweep_steps (`Sequence[int]`, *optional*): also sweep QID² sampling steps.
        sweep_schedulers (`Sequence[str]`, *optional*): schedulers of the sweep.
        sweep_subjects (`int`, *optional*, defaults to 1): held-out subjects the sweep runs on, the first ones.
        sweep_slices (`int`, *optional*): run the sweep on this many central brain slices only.
        fid_weights (`str`, *optional*): TorchScript Inception-v3 feature extractor for FID.
        save_predictions (`bool`, *optional*, defaults to `False`): write each up-sampled series too.
        batch_size (`int`, *optional*, defaults to 32): slices per network call.
        device (`str`, *optional*): torch device of the learned methods; defaults to the best available.
        seed (`int`, *optional*, defaults to 0): sampling seed.
        progress (`bool`, *optional*, defaults to `True`): tqdm bars.
    """

    data: str | os.PathLike
    out: str | os.PathLike
    methods: Sequence[str] = ("qid2", "cgan", "qgan", "interp", "dti", "sh4")
    num_references: Sequence[int] = (3,)
    scheduler: str | None = None
    steps: int | None = None
    model: Sequence | None = None
    cgan: Sequence | None = None
    qgan: Sequence | None = None
    subjects: int = 3
    subject_ids: Sequence[str] | None = None
    shell: float = 1000
    n_acquired: int = 30
    sweep_steps: Sequence[int] | None = None
    sweep_schedulers: Sequence[str] = ("ddpm", "ddim", "dpm++", "unipc")
    sweep_subjects: int = 1
    sweep_slices: int | None = None
    fid_weights: str | None = None
    save_predictions: bool = False
    batch_size: int = 32
    device: str | None = None
    seed: int = 0
    progress: bool = True

    def command(self) -> str:
        """The ``qid2 benchmark`` command line that reproduces this run, every default spelled out."""
        parts = ["qid2", "benchmark", "--data", str(self.data), "--methods", ",".join(self.methods),
                 "--R", *map(str, self.num_references)]
        parts += ["--scheduler", self.scheduler] if self.scheduler else []
        parts += ["--steps", str(self.steps)] if self.steps else []
        for flag in ("model", "cgan", "qgan"):
            if getattr(self, flag):
                parts += [f"--{flag}", *map(str, getattr(self, flag))]
        parts += ["--subject-ids", *self.subject_ids] if self.subject_ids else ["--subjects", str(self.subjects)]
        parts += ["--shell", f"{self.shell:g}", "--n-acquired", str(self.n_acquired)]
        if self.sweep_steps:
            parts += ["--sweep-steps", ",".join(map(str, self.sweep_steps)),
                      "--sweep-schedulers", ",".join(self.sweep_schedulers),
                      "--sweep-subjects", str(self.sweep_subjects)]
            parts += ["--sweep-slices", str(self.sweep_slices)] if self.sweep_slices else []
        parts += ["--fid-weights", str(self.fid_weights)] if self.fid_weights else []
        parts += ["--save-predictions"] if self.save_predictions else []
        parts += ["--batch-size", str(self.batch_size), "--seed", str(self.seed)]
        parts += ["--device", self.device] if self.device else []
        return shlex.join(parts + ["--out", str(self.out)])


@dataclass
class BenchmarkResults:
    """What :func:`run_benchmark` wrote.

    Args:
        results (`dict`): the content of ``results.json``.
        table (`str`): the Markdown results table (Table 1 layout).
        out (`Path`): the output folder.
    """

    results: dict
    table: str
    out: Path


def run_benchmark(config: BenchmarkConfig, *, log: Callable[[str], None] = print) -> BenchmarkResults:
    """Run every method on the held-out subjects, score them and write the report.

    Args:
        config ([`BenchmarkConfig`]): what to run.
        log (`Callable[[str], None]`, *optional*, defaults to `print`): receives
            the one-line notes of the run (a method skipped for lack of weights).

    Raises:
        QID2InputError: bad options or data, in one line, before anything is written.
    """
    return _Benchmark(config, log).run()


def _acquired_label(n_directions: int) -> str:
    return f"Acquired {n_directions}"


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
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def _method_rows(config: BenchmarkConfig) -> list[dict]:
    """One row per (method, R): key, method name, R, display label and weights path."""
    names = list(config.methods)
    unknown = [m for m in names if m not in METHODS]
    if unknown or not names:
        raise QID2InputError(
            None, f"unknown method(s) {', '.join(unknown) or '(none given)'}; choose from {', '.join(METHODS)}"
        )
    for flag in ("model", "cgan", "qgan"):
        paths = getattr(config, flag)
        if paths and len(paths) != len(config.num_references):
            raise QID2InputError(
                None, f"--{flag} takes one folder per R, in --R order ({len(config.num_references)}), got {len(paths)}"
            )
    rows = []
    for name in dict.fromkeys(names):
        for i, r in enumerate(config.num_references if uses_references(name) else [None]):
            flag = {"qid2": "model", "cgan": "cgan", "qgan": "qgan"}.get(name)
            paths = getattr(config, flag) if flag else None
            rows.append({"key": f"{name}-r{r}" if r else name, "method": name, "R": r,
                         "label": method_label(name, r), "weights": str(paths[i]) if paths else None})
    return rows


def _check_sweep(config: BenchmarkConfig) -> None:
    from ..schedulers import SCHEDULERS

    unknown = [s for s in config.sweep_schedulers if s not in SCHEDULERS]
    if config.sweep_steps and unknown:
        raise QID2InputError(
            None, f"unknown sweep scheduler(s) {', '.join(unknown)}; choose from {', '.join(SCHEDULERS)}"
        )


def _held_out(config: BenchmarkConfig) -> list:
    subjects = discover_subjects(config.data)
    if config.subject_ids:
        by_id = {s.subject_id: s for s in subjects}
        missing = [i for i in config.subject_ids if i not in by_id]
        if missing:
            raise QID2InputError(config.data, f"subject(s) {', '.join(missing)} not found (found: {', '.join(by_id)})")
        return [by_id[i] for i in config.subject_ids]
    if config.subjects < 1 or config.subjects > len(subjects):
        raise QID2InputError(config.data, f"{len(subjects)} subjects found, cannot hold out the last {config.subjects}")
    return subjects[-config.subjects :]


def _truth_signal(subject, dwi, shell):
    """The phantom's noise-free signal on the subject's shell, or ``None`` for real data."""
    subject_dir = Path(subject.dwi).parents[2] if subject.layout == "hcp" else None
    if subject_dir is None or not (subject_dir / "truth").is_dir():
        return None
    signal = load_truth(subject_dir)["signal"]
    noise_free = DWI(
        data=np.asarray(signal), bvals=dwi.bvals, bvecs=dwi.bvecs, affine=dwi.affine, path=str(subject_dir)
    )
    return np.asarray(extract_shell(noise_free, shell).data, dtype=np.float32)


def _prepare(subject, config: BenchmarkConfig) -> dict:
    """Load one subject and split its shell into acquired and target directions."""
    dwi = subject.load()
    if dwi.mask is None:
        raise QID2InputError(subject.dwi, "no brain mask found beside it; every metric is taken inside the mask")
    shell = extract_shell(dwi, config.shell)
    data = np.asarray(shell.data, dtype=np.float32)
    b0 = shell.b0_indices
    dw = np.setdiff1d(np.arange(shell.n_volumes), b0)
    try:
        acquired, targets = split_acquired(shell.bvecs[dw], config.n_acquired)
    except ValueError as exc:
        raise QID2InputError(subject.dwi, str(exc)) from None
    if len(targets) == 0:
        raise QID2InputError(subject.dwi, f"all {len(dw)} directions of the b={config.shell:g} shell would be acquired")
    evaluation = SubjectEvaluation(
        data, shell.bvals, shell.bvecs, dwi.mask, truth=_truth_signal(subject, dwi, config.shell)
    )
    return {
        "dwi": shell,
        "data": data,
        "low": np.sort(np.r_[b0, dw[acquired]]),
        "acquired": dw[acquired],
        "targets": shell.bvecs[dw[targets]],
        "evaluation": evaluation,
    }


def _figure_panels(prep, r_first: int) -> dict:
    """The middle brain slice of a subject: crop, FA of the references, reference and target slices."""
    ev, targets = prep["evaluation"], prep["targets"]
    z = int(brain_slices(ev.mask)[len(brain_slices(ev.mask)) // 2])
    bx, by = brain_bounding_box(ev.mask)
    crop = (bx, by, z)
    target_volume = ev.volume_indices(targets[:1])[0]
    acquired = prep["acquired"]
    refs = acquired[nearest_references(targets[0], ev.bvecs[acquired], r_first)]
    panels = {"crop": crop, "mask": ev.mask[crop], "fa": {_acquired_label(len(ev.dw)): ev.reference_maps.fa[crop]},
              "slices": {}}
    if ev.truth is not None:
        panels["fa"]["Truth"] = ev.truth_maps.fa[crop]
    for k, v in enumerate(refs):
        panels["slices"][f"reference {k + 1}"] = ev.data[crop + (v,)]
    panels["slices"]["target (acquired)"] = ev.data[crop + (target_volume,)]
    if ev.truth is not None:
        panels["slices"]["target (truth)"] = ev.truth[crop + (target_volume,)]
    panels["title"] = f"slice z={z}, target direction ({', '.join(f'{c:.2f}' for c in targets[0])}), R={r_first}"
    return panels


def _central_slab(ev, k: int):
    """The same subject's evaluation restricted to its ``k`` central brain slices."""
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


def _sweep(pipeline, prep, config: BenchmarkConfig, sweep: dict) -> None:
    """QID² at every (scheduler, steps) of the sweep on one subject; appends to ``sweep``."""
    from ..hub import with_scheduler
    from ..pipelines import QID2Upsampler

    ev, low = prep["evaluation"], prep["low"]
    if config.sweep_slices:
        ev = _central_slab(ev, config.sweep_slices)
    jobs = [(s, n) for s in config.sweep_schedulers for n in config.sweep_steps]
    for scheduler, steps in tqdm(jobs, desc="steps sweep", unit="run", disable=not config.progress, leave=False):
        # A pipeline of its own shares the networks and leaves the main run's scheduler alone.
        up = QID2Upsampler(with_scheduler(pipeline, scheduler), num_inference_steps=steps,
                           batch_size=config.batch_size, seed=config.seed, progress=False)
        pred = up.predict(ev.data[..., low], ev.bvals[low], ev.bvecs[low], prep["targets"], ev.mask)
        scores = ev.score(pred, prep["targets"])
        entry = sweep.setdefault(scheduler, {}).setdefault(str(steps), {"fa_mae": [], "ssim": [], "fa_mae_truth": []})
        entry["fa_mae"].append(scores["acquired"]["fa_mae"])
        entry["ssim"].append(scores["acquired"]["ssim"])
        if "truth" in scores:
            entry["fa_mae_truth"].append(scores["truth"]["fa_mae"])


def _load_methods(rows, config: BenchmarkConfig, device, log) -> dict:
    """Build each row's up-sampler; a learned method without weights is skipped with a note."""
    upsamplers = {}
    for row in rows:
        try:
            upsamplers[row["key"]] = make_upsampler(
                row["method"],
                num_references=row["R"] or 3,
                model_path=row["weights"],
                scheduler=config.scheduler if row["method"] == "qid2" else None,
                num_inference_steps=config.steps,
                batch_size=config.batch_size,
                seed=config.seed,
                device=device,
                progress=config.progress,
            )
            row["status"] = "ok"
        except MissingWeightsError as exc:
            row["status"] = f"skipped: {exc}"
            log(f"skipping {row['label']}: {exc}")
        except ValueError as exc:
            raise QID2InputError(None, str(exc)) from None
    if not upsamplers:
        raise QID2InputError(None, "no method could run (see the skipping messages above)")
    return upsamplers


def _summaries(per_subject, table_rows, ran, references):
    """Mean ± std of every metric per row, and paired tests of every method against the baseline."""
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
        ["# Benchmark", "", table, *[f"- {n}" for n in notes], "", tests_md, f"Command: `{command}`  ",
         f"Wall time: {wall:.1f} s", ""]
    )


@dataclass
class _Tally:
    """What the subjects loop gathers."""

    per_subject: dict = field(default_factory=dict)
    panels: dict = field(default_factory=dict)
    sweep: dict = field(default_factory=dict)
    features: dict = field(default_factory=dict)
    reference_features: list = field(default_factory=list)
    has_truth: bool = False
    floor_label: str | None = None


class _Benchmark:
    """One run of :func:`run_benchmark`: setup, the subjects loop, the report."""

    def __init__(self, config: BenchmarkConfig, log):
        from ..hub import select_device

        self.started = time.perf_counter()
        self.config, self.log, self.out = config, log, Path(config.out)
        self.device = select_device(config.device)
        self.rows = _method_rows(config)
        _check_sweep(config)
        self.held = _held_out(config)
        self.fid_model = load_inception(config.fid_weights) if config.fid_weights else None
        self.upsamplers = _load_methods(self.rows, config, self.device, log)
        self.ran = [row for row in self.rows if row["status"] == "ok"]
        self.sweep_pipeline = next(
            (self.upsamplers[r["key"]].pipeline for r in self.ran if r["method"] == "qid2"), None
        )
        if config.sweep_steps and self.sweep_pipeline is None:
            log("no QID² model ran, so no steps sweep")
        self.r_first = next((r["R"] for r in self.ran if r["R"]), config.num_references[0])
        self.tally = _Tally(features={row["key"]: [] for row in self.ran})

    def sampler(self) -> dict:
        """The sampler QID² ran with: the options, else what was saved with the (first) model."""
        from ..schedulers import SCHEDULERS

        config, pipe = self.config, self.sweep_pipeline
        if pipe is None:
            return {"scheduler": config.scheduler, "steps": config.steps}
        saved = next((n for n, cls in SCHEDULERS.items() if type(pipe.scheduler) is cls), None)
        steps = config.steps or pipe.config.default_num_inference_steps
        return {"scheduler": config.scheduler or saved, "steps": steps}

    def run(self) -> BenchmarkResults:
        subjects = tqdm(self.held, desc="subjects", unit="subject", disable=not self.config.progress)
        for index, subject in enumerate(subjects):
            self.score_subject(index, subject)
        return self.report()

    def score_subject(self, index: int, subject) -> None:
        config, tally = self.config, self.tally
        prep = _prepare(subject, config)
        ev, targets = prep["evaluation"], prep["targets"]
        tally.has_truth = tally.has_truth or ev.truth is not None
        results = tally.per_subject.setdefault(subject.subject_id, {})
        data_range = None
        if self.fid_model is not None:
            ref_values = ev.data[..., ev.volume_indices(targets)]
            data_range = float(ref_values[ev.mask].max() - ref_values[ev.mask].min())
            tally.reference_features.append(inception_features(self.fid_model, ref_values, ev.mask, data_range))
        for row in tqdm(self.ran, desc=subject.subject_id, unit="method", leave=False, disable=not config.progress):
            results[row["key"]] = self.score_method(row, subject, prep, data_range, first=index == 0)
        if ev.truth is not None:
            results[NOISE_FLOOR] = {"truth": ev.score_acquisition(targets)}
            tally.floor_label = f"{_acquired_label(len(ev.dw))} (noise floor, vs truth)"
        if config.sweep_steps and self.sweep_pipeline is not None and index < config.sweep_subjects:
            _sweep(self.sweep_pipeline, prep, config, tally.sweep)

    def score_method(self, row, subject, prep, data_range, *, first: bool) -> dict:
        """One method on one subject: predict, score, keep FID features, predictions and figure panels."""
        ev, low, targets = prep["evaluation"], prep["low"], prep["targets"]
        tic = time.perf_counter()
        try:
            upsampler = self.upsamplers[row["key"]]
            pred = upsampler.predict(prep["data"][..., low], ev.bvals[low], ev.bvecs[low], targets, ev.mask)
        except ValueError as exc:  # e.g. more SH coefficients or references than acquired directions
            raise QID2InputError(subject.dwi, f"{row['label']}: {exc}") from None
        elapsed = time.perf_counter() - tic
        scores, maps = ev.score(pred, targets, return_maps=True)
        if self.fid_model is not None:
            self.tally.features[row["key"]].append(inception_features(self.fid_model, pred, ev.mask, data_range))
        if self.config.save_predictions:
            shell = prep["dwi"]
            save_dwi(self.out / "predictions" / subject.subject_id / row["key"], ev.combine(pred, targets),
                     shell.bvals, shell.bvecs, shell.affine, shell.header)
        if first:
            panels = self.tally.panels
            if not panels:
                panels.update(_figure_panels(prep, row["R"] or self.r_first))
            panels["fa"][row["label"]] = maps.fa[panels["crop"]]
            panels["slices"][row["label"]] = pred[panels["crop"] + (0,)]
        return {**scores, "time_s": elapsed}

    def report(self) -> BenchmarkResults:
        config, tally = self.config, self.tally
        table_rows = self.ran + ([{"key": NOISE_FLOOR, "label": tally.floor_label}] if tally.has_truth else [])
        labels = {row["key"]: row["label"] for row in table_rows}
        references = ("acquired", "truth") if tally.has_truth else ("acquired",)
        summary, baseline, tests = _summaries(tally.per_subject, table_rows, self.ran, references)
        fid = self.fid()
        sweep_means = self.sweep_means()
        figures = _write_figures(self.out, tally.panels, self.held[0].subject_id, sweep_means, tally.has_truth)
        wall = time.perf_counter() - self.started
        command = config.command()
        table = results_table([(labels[k], summary[k]) for k in labels], has_truth=tally.has_truth,
                              fid={labels[k]: v for k, v in fid.items()} if fid is not None else FID_UNAVAILABLE)
        sampler = self.sampler()
        results = {
            "command": command,
            "wall_time_s": wall,
            "machine": _machine(self.device),
            "settings": {"shell": config.shell, "n_acquired": config.n_acquired, "R": list(config.num_references),
                         "scheduler": sampler["scheduler"], "steps": sampler["steps"], "seed": config.seed},
            "subjects": list(tally.per_subject),
            "methods": self.rows,
            "per_subject": tally.per_subject,
            "summary": summary,
            "paired_tests": {"baseline": baseline["key"], "tests": tests},
            "fid": fid if fid is not None else {"note": FID_UNAVAILABLE},
            "sweep": self.sweep_section(sweep_means),
            "figures": figures,
        }
        write_json(self.out / "results.json", results)
        tests_md = tests_table(tests, baseline["label"], labels)
        write_text(self.out / "results.md", _markdown(table, self.notes(sampler, fid), tests_md, command, wall))
        return BenchmarkResults(results=results, table=table, out=self.out)

    def fid(self) -> dict | None:
        """FID per method, pooled over the held-out subjects, or `None` without a feature extractor."""
        if self.fid_model is None:
            return None
        ref = np.concatenate(self.tally.reference_features)
        return {key: frechet_distance(np.concatenate(f), ref) for key, f in self.tally.features.items()}

    def sweep_means(self) -> dict:
        return {
            sched: {steps: {m: summarize(v)["mean"] for m, v in vals.items()} for steps, vals in by_steps.items()}
            for sched, by_steps in self.tally.sweep.items()
        }

    def sweep_section(self, sweep_means) -> dict | None:
        if not sweep_means:
            return None
        return {
            "R": self.sweep_pipeline.num_references,
            "subjects": list(self.tally.per_subject)[: self.config.sweep_subjects],
            "slices": self.config.sweep_slices,
            "mean": sweep_means,
            "per_subject": self.tally.sweep,
        }

    def notes(self, sampler, fid) -> list[str]:
        config, has_truth = self.config, self.tally.has_truth
        notes = [
            f"Held-out subjects ({len(self.tally.per_subject)}): {', '.join(self.tally.per_subject)}. Mean ± std over "
            f"subjects; every metric inside the brain mask. b={config.shell:g} shell, {config.n_acquired} directions "
            "acquired, the rest predicted.",
            "Image metrics compare the predicted volumes with the acquired ones at the same directions (SSIM per axial "
            "slice); FA, MD and angle compare a tensor fit on b0 + acquired + predicted volumes with one on b0 + all "
            "acquired volumes" + (" (or, vs truth, on the noise-free signal)." if has_truth else "."),
            f"QID²: {sampler['scheduler']}, {sampler['steps']} steps, seed {config.seed}.",
            f"FID: {FID_UNAVAILABLE}" if fid is None else "FID: pooled over the held-out subjects' brain slices.",
        ]
        return notes + [f"{row['label']}: {row['status']}" for row in self.rows if row["status"] != "ok"]
