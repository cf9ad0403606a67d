"""The benchmark: QID² and the baselines on held-out phantoms or real scans, the paper's protocol.

Both run on cases (:class:`~qid2_diffusers.evaluation.cases.BenchmarkCase`:
one shell of one scan, its mask, its kept/target split). For each case the
shell is split into acquired and target directions
(:func:`~qid2_diffusers.data.io.split_acquired`: 30 of 90 for the paper's
phantoms, :func:`~qid2_diffusers.data.real.kept_count` for real scans); every
method predicts the targets from b0 + the acquired volumes, and
:class:`~qid2_diffusers.evaluation.SubjectEvaluation` scores the prediction
against the full acquisition and, for phantoms, against the noise-free truth.
:func:`run_benchmark` writes ``results.json``, ``results.md`` and figures:
for phantoms the paper's Table 1 (mean ± std over subjects), for real scans
one row per case and method with the FA-error ratio to DTI-predict, per-slice
values and paired tests over slices
(:func:`~qid2_diffusers.evaluation.ratios.ratio_section`). ``qid2 benchmark`` is its command line.
"""

from __future__ import annotations

import os
import platform
import shlex
import time
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
from tqdm.auto import tqdm

from ..baselines import (
    DENOISED_METHODS,
    METHODS,
    MissingWeightsError,
    denoiser_label,
    make_upsampler,
    method_label,
    split_method,
    uses_references,
)
from ..data.io import save_dwi
from ..data.layouts import discover_subjects
from ..directions import nearest_references
from ..errors import QID2InputError
from ..upsampling import brain_bounding_box, brain_slices
from .cases import CaseSource, phantom_case, real_benchmark_case
from .fid import FID_UNAVAILABLE, frechet_distance, inception_features, load_inception
from .metrics import HIGH_B, MAX_CSD_VOXELS, fa_error_per_slice
from .protocol import SubjectEvaluation
from .ratios import BASELINE, ratio_section, reference_ratios
from .report import (
    case_table,
    fa_figure,
    per_slice_table,
    pooled_table,
    ratio_figure,
    ratio_matrix_table,
    results_table,
    save_figure,
    slice_grid_figure,
    sweep_figure,
    tests_table,
    write_json,
    write_text,
)
from .stats import paired_tests, summarize
from ..threads import cpu_name

__all__ = [
    "METRICS",
    "TESTED",
    "NOISE_FLOOR",
    "PHANTOM_METHODS",
    "BenchmarkConfig",
    "BenchmarkResults",
    "run_benchmark",
]

#: Metrics summarised and tested across subjects (the high-b ones only exist for shells of b >= 2000).
METRICS = ("ssim", "psnr", "nrmse", "fa_mae", "fa_ssim", "md_mae", "angular_error_deg", "acc_sh6", "acc_sh8",
           "csd_peak_error_deg")

#: Methods of a phantom run when none are named; a real-scan run takes every method.
PHANTOM_METHODS = ("qid2", "cgan", "qgan", "interp", "dti", "sh4")

#: (reference, metric) pairs tested between methods.
TESTED = (("acquired", "ssim"), ("acquired", "fa_mae"), ("acquired", "fa_ssim"), ("truth", "fa_mae"))

#: Row key of the full acquisition scored against the truth (the noise floor).
NOISE_FLOOR = "acquired-all"


@dataclass
class BenchmarkConfig:
    """What a benchmark runs; each field is the ``qid2 benchmark`` option of the same name.

    Give ``data`` (held-out subjects, e.g. phantoms) or ``real`` (the real
    scans of :func:`~qid2_diffusers.data.real.real_cases`), not both.

    Args:
        data (`str` or `os.PathLike`, *optional*): dataset folder (HCP or BIDS layout, e.g. ``qid2 phantom`` output).
        out (`str` or `os.PathLike`): output folder.
        real (`str` or `os.PathLike`, *optional*): folder of the real scans
            (:func:`~qid2_diffusers.data.real.default_real_data_dir`); each case
            keeps :func:`~qid2_diffusers.data.real.kept_count` of its shell's directions.
        cases (`Sequence[str]`, *optional*): with ``real``, only these cases (e.g. ``mdt-b1000``).
        methods (`Sequence[str]`, *optional*): names from :data:`~qid2_diffusers.baselines.METHODS`, each
            optionally prefixed by a denoiser (``mppca+dti``: :func:`~qid2_diffusers.baselines.split_method`);
            defaults to :data:`PHANTOM_METHODS` with ``data`` and to every method and
            :data:`~qid2_diffusers.baselines.DENOISED_METHODS` with ``real``, where DTI-predict,
            the denominator of the FA-error ratio, is always added.
        denoise (`Sequence[str]`, *optional*): run every method once per denoiser of
            :data:`~qid2_diffusers.denoise.DENOISERS` (``none``: as given), each a row of its own: the b0s
            and kept directions are denoised first and the scored series holds the denoised kept volumes.
        residual_weights (`Sequence`, *optional*): QID²'s weight of its residual over the tensor prior
            (``auto`` or numbers in [0, 1]), each value a row of its own; defaults to
            :data:`~qid2_diffusers.pipelines.upsampler_qid2.DEFAULT_RESIDUAL_WEIGHT`.
        num_references (`Sequence[int]`, *optional*, defaults to `(3,)`): R of QID², the GANs and Interp (``--R``).
        scheduler (`str`, *optional*): QID² sampler; defaults to the one saved with the model.
        steps (`int`, *optional*): QID² sampling steps; defaults to the model's.
        model, cgan, qgan (`Sequence`, *optional*): weights folder per R, in ``num_references`` order.
        qid2_models (`Sequence[tuple[str, str]]`, *optional*): ``(label, folder)`` of further QID² models, each
            a row of its own at its own R (``--qid2-models label=PATH,...``); without ``model`` they replace the
            shipped one.
        adapt_steps (`Sequence[int]`, *optional*): test-time adaptation steps of every QID² row
            (:func:`~qid2_diffusers.pipelines.adaptation.adapt_pipeline`), each value a row of its own;
            defaults to each model's ``default_adapt_steps``.
        subjects (`int`, *optional*, defaults to 3): evaluate the last ``subjects`` subjects found.
        subject_ids (`Sequence[str]`, *optional*): evaluate these subjects instead.
        shell (`float`, *optional*, defaults to 1000): b-value of the shell to up-sample (``data`` only).
        n_acquired (`int`, *optional*, defaults to 30): directions kept as acquired (``data`` only).
        sweep_steps (`Sequence[int]`, *optional*): also sweep QID² sampling steps.
        sweep_schedulers (`Sequence[str]`, *optional*): schedulers of the sweep.
        sweep_subjects (`int`, *optional*, defaults to 1): cases the sweep runs on, the first ones.
        sweep_slices (`int`, *optional*): run the sweep on this many central brain slices only.
        fid_weights (`str`, *optional*): TorchScript Inception-v3 feature extractor for FID.
        save_predictions (`bool`, *optional*, defaults to `False`): write each up-sampled series too.
        batch_size (`int`, *optional*, defaults to 32): slices per network call.
        device (`str`, *optional*): torch device of the learned methods; defaults to the best available.
        seed (`int`, *optional*, defaults to 0): sampling seed.
        progress (`bool`, *optional*, defaults to `True`): tqdm bars.
    """

    data: str | os.PathLike | None = None
    out: str | os.PathLike | None = None
    real: str | os.PathLike | None = None
    cases: Sequence[str] | None = None
    methods: Sequence[str] | None = None
    num_references: Sequence[int] = (3,)
    scheduler: str | None = None
    steps: int | None = None
    model: Sequence | None = None
    cgan: Sequence | None = None
    qgan: Sequence | None = None
    qid2_models: Sequence[tuple[str, str]] | None = None
    adapt_steps: Sequence[int] | None = None
    denoise: Sequence[str] | None = None
    residual_weights: Sequence | None = None
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
    dtype: str = "auto"
    seed: int = 0
    progress: bool = True

    def __post_init__(self):
        if (self.data is None) == (self.real is None):
            raise QID2InputError(None, "give either --data DIR (held-out subjects) or --real [DIR] (real scans)")
        if self.out is None:
            raise QID2InputError(None, "no output folder given (--out)")
        if self.cases and self.real is None:
            raise QID2InputError(None, "--cases selects real scans; it needs --real")
        methods = tuple(self.methods or (METHODS + DENOISED_METHODS if self.is_real else PHANTOM_METHODS))
        # The ratio every real-scan row is judged by needs the tensor fit on the same kept directions.
        self.methods = methods + (BASELINE,) if self.is_real and BASELINE not in methods else methods

    @property
    def is_real(self) -> bool:
        """Whether this run scores the real scans (``--real``) rather than held-out subjects."""
        return self.real is not None

    def command(self) -> str:
        """The ``qid2 benchmark`` command line that reproduces this run, every default spelled out."""
        if self.is_real:
            from ..data.real import default_real_data_dir

            # `--real` alone means the default folder: recorded so, rather than as this machine's path to it.
            default = Path(self.real).resolve() == default_real_data_dir().resolve()
            parts = ["qid2", "benchmark", "--real"] + ([] if default else [str(self.real)])
            parts += ["--cases", ",".join(self.cases)] if self.cases else []
        else:
            parts = ["qid2", "benchmark", "--data", str(self.data)]
        parts += ["--methods", ",".join(self.methods), "--R", *map(str, self.num_references)]
        parts += ["--scheduler", self.scheduler] if self.scheduler else []
        parts += ["--steps", str(self.steps)] if self.steps else []
        for flag in ("model", "cgan", "qgan"):
            if getattr(self, flag):
                parts += [f"--{flag}", *map(str, getattr(self, flag))]
        if self.qid2_models:
            parts += ["--qid2-models", ",".join(f"{label}={path}" for label, path in self.qid2_models)]
        if self.adapt_steps is not None:
            parts += ["--adapt-steps", ",".join(map(str, self.adapt_steps))]
        if self.denoise:
            parts += ["--denoise", ",".join(self.denoise)]
        if self.residual_weights:
            parts += ["--residual-weight", ",".join(map(str, self.residual_weights))]
        if not self.is_real:
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
        parts += ["--dtype", self.dtype] if self.dtype != "auto" else []
        return shlex.join(parts + ["--out", str(self.out)])


@dataclass
class BenchmarkResults:
    """What :func:`run_benchmark` wrote.

    Args:
        results (`dict`): the content of ``results.json``.
        table (`str`): the Markdown results table (Table 1 layout; one row per case and method for real scans).
        out (`Path`): the output folder.
    """

    results: dict
    table: str
    out: Path


def run_benchmark(config: BenchmarkConfig, *, log: Callable[[str], None] = print) -> BenchmarkResults:
    """Run every method on the held-out subjects or the real scans, score them and write the report.

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
        "processor": cpu_name(),
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "device": str(device),
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def _method_rows(config: BenchmarkConfig) -> list[dict]:
    """One row per (method, R) and per labelled QID² model: key, method name, R, display label and weights path."""
    names = list(config.methods)
    if not names:
        raise QID2InputError(None, f"no method given; choose from {', '.join(METHODS)}")
    from ..denoise import check_denoiser

    for name in names:
        try:
            denoiser, _ = split_method(name)
        except ValueError as exc:
            raise QID2InputError(None, str(exc)) from None
        if denoiser:
            check_denoiser(denoiser)  # dwidenoise+dti without MRtrix3: said now, not case by case
    for flag in ("model", "cgan", "qgan"):
        paths = getattr(config, flag)
        if paths and len(paths) != len(config.num_references):
            raise QID2InputError(
                None, f"--{flag} takes one folder per R, in --R order ({len(config.num_references)}), got {len(paths)}"
            )
    if config.qid2_models and "qid2" not in names:
        raise QID2InputError(None, "--qid2-models needs qid2 among --methods")
    rows = []
    for full in dict.fromkeys(names):
        denoiser, name = split_method(full)
        if name == "qid2" and config.qid2_models and not config.model:
            rows += _denoised(_labelled_qid2_rows(config.qid2_models), denoiser)
            continue
        for i, r in enumerate(config.num_references if uses_references(name) else [None]):
            flag = {"qid2": "model", "cgan": "cgan", "qgan": "qgan"}.get(name)
            paths = getattr(config, flag) if flag else None
            rows.append({"key": f"{full}-r{r}" if r else full, "method": name, "R": r, "denoise": denoiser,
                         "label": method_label(full, r), "weights": str(paths[i]) if paths else None})
        if name == "qid2":
            rows += _denoised(_labelled_qid2_rows(config.qid2_models or ()), denoiser)
    rows = _with_denoising(_with_weights(_with_adaptation(rows, config.adapt_steps), config.residual_weights),
                           config.denoise)
    keys = [row["key"] for row in rows]
    if len(set(keys)) != len(keys):
        raise QID2InputError(None, f"two rows would share a name ({', '.join(keys)}); rename a --qid2-models label")
    return rows


def _with_adaptation(rows, adapt_steps) -> list[dict]:
    """Each QID² row once per test-time adaptation setting (0: the model as trained; None: its default)."""
    if adapt_steps is None:
        return rows
    if any(n < 0 for n in adapt_steps) or not adapt_steps:
        raise QID2InputError(None, f"--adapt-steps takes non-negative step counts, got {list(adapt_steps)}")
    out = []
    for row in rows:
        if row["method"] != "qid2":
            out.append(row)
            continue
        for n in dict.fromkeys(int(n) for n in adapt_steps):
            out.append({**row, "adapt_steps": n} if n == 0 else
                       {**row, "key": f"{row['key']}-tta{n}", "label": f"{row['label']} + adaptation ({n} steps)",
                        "adapt_steps": n})
    return out


def _with_weights(rows, weights) -> list[dict]:
    """Each QID² row once per residual weight; the default (``auto``) keeps the row's name, others get ``-wW``
    and ", residual weight W" in the label, so a label means one setting across runs."""
    from ..pipelines.upsampler_qid2 import DEFAULT_RESIDUAL_WEIGHT, check_residual_weight

    if not weights:
        return rows
    try:
        weights = list(dict.fromkeys(check_residual_weight(w) for w in weights))
    except ValueError as exc:
        raise QID2InputError(None, f"--residual-weight: {exc}") from None
    out = []
    for row in rows:
        if row["method"] != "qid2":
            out.append(row)
            continue
        for w in weights:
            out.append({**row, "residual_weight": w} if w == DEFAULT_RESIDUAL_WEIGHT else
                       {**row, "key": f"{row['key']}-w{w}", "label": f"{row['label']}, residual weight {w}",
                        "residual_weight": w})
    return out


def _denoised(rows, denoiser) -> list[dict]:
    """``rows`` preceded by ``denoiser`` (e.g. ``mppca``): key ``mppca+KEY``, label ``MP-PCA + LABEL``."""
    if denoiser is None:
        return rows
    return [{**row, "key": f"{denoiser}+{row['key']}", "label": f"{denoiser_label(denoiser)} + {row['label']}",
             "denoise": denoiser}
            for row in rows]


def _with_denoising(rows, denoisers) -> list[dict]:
    """Each row once per denoiser of ``--denoise`` (``none``: as it is)."""
    from ..denoise import check_denoiser

    if not denoisers:
        return rows
    for denoiser in denoisers:
        check_denoiser(denoiser)
    # A method named with its denoiser (mppca+dti) keeps it; the others run once per denoiser.
    return [new for row in rows
            for new in ([row] if row.get("denoise") else
                        [r for d in dict.fromkeys(denoisers) for r in ([row] if d == "none" else _denoised([row], d))])]


def _labelled_qid2_rows(models) -> list[dict]:
    """Rows of ``--qid2-models``: given explicitly, so a folder that is not a model is an error, not a skip."""
    from ..hub import model_num_references

    rows, seen = [], set()
    for label, path in models:
        if not label or label in seen:
            raise QID2InputError(None, f"--qid2-models labels must be unique and non-empty, got {label!r}")
        seen.add(label)
        if not (Path(path) / "model_index.json").is_file():
            raise QID2InputError(path, "not a QID² pipeline folder (no model_index.json)")
        r = model_num_references(path)
        rows.append({"key": f"qid2-{label}", "method": "qid2", "R": r, "label": f"QID² {label} (R={r})",
                     "weights": str(path), "required": True, "denoise": None})
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


def _real_sources(config: BenchmarkConfig) -> list[CaseSource]:
    """The real cases asked for (all by default; every scan must then be present)."""
    from ..data.real import real_cases

    found = {c.name: c for c in real_cases(config.real, require_all=not config.cases)}
    wanted = list(dict.fromkeys(config.cases or found))
    missing = [name for name in wanted if name not in found]
    if missing:
        raise QID2InputError(config.real, f"real case(s) {', '.join(missing)} not found (found: "
                                          f"{', '.join(found) or 'none'}; the mdt scan is fetched by: "
                                          f"python -m qid2_diffusers.data.real {config.real})")
    return [CaseSource(name, partial(real_benchmark_case, found[name])) for name in wanted]


def _case_sources(config: BenchmarkConfig) -> list[CaseSource]:
    """What the run scores: the real cases, or the held-out subjects' shell (figures of the first)."""
    if config.is_real:
        return _real_sources(config)
    return [
        CaseSource(s.subject_id, partial(phantom_case, s, config.shell, config.n_acquired, figures=i == 0))
        for i, s in enumerate(_held_out(config))
    ]


def _figure_panels(case, r_first: int) -> dict:
    """The middle brain slice of a case: crop, FA of the references, reference and target slices."""
    ev, targets = case.evaluation, case.targets
    z = int(brain_slices(ev.mask)[len(brain_slices(ev.mask)) // 2])
    bx, by = brain_bounding_box(ev.mask)
    crop = (bx, by, z)
    target_volume = ev.volume_indices(targets[:1])[0]
    acquired = case.acquired
    refs = acquired[nearest_references(targets[0], ev.bvecs[acquired], r_first)]
    panels = {"crop": crop, "z": z, "mask": ev.mask[crop], "fa": {_acquired_label(len(ev.dw)): ev.reference_maps.fa[crop]},
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


def _sweep(pipeline, case, config: BenchmarkConfig, sweep: dict) -> None:
    """QID² at every (scheduler, steps) of the sweep on one case; appends to ``sweep``."""
    from ..hub import with_scheduler
    from ..pipelines import QID2Upsampler

    ev, low = case.evaluation, case.low
    if config.sweep_slices:
        ev = _central_slab(ev, config.sweep_slices)
    jobs = [(s, n) for s in config.sweep_schedulers for n in config.sweep_steps]
    for scheduler, steps in tqdm(jobs, desc="steps sweep", unit="run", disable=not config.progress, leave=False):
        # A pipeline of its own shares the networks and leaves the main run's scheduler alone.
        up = QID2Upsampler(with_scheduler(pipeline, scheduler), num_inference_steps=steps,
                           batch_size=config.batch_size, seed=config.seed, progress=False)
        pred = up.predict(ev.data[..., low], ev.bvals[low], ev.bvecs[low], case.targets, ev.mask)
        scores = ev.score(pred, case.targets)
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
                adapt_steps=row.get("adapt_steps"),
                residual_weight=row.get("residual_weight"),
                batch_size=config.batch_size,
                seed=config.seed,
                device=device,
                dtype=config.dtype,
                progress=config.progress,
            )
            row["status"] = "ok"
        except MissingWeightsError as exc:
            if row.get("required"):
                raise QID2InputError(row["weights"], str(exc)) from None
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


def _write_figures(out, panels, sweep_means, has_truth, *, per_case: bool) -> dict:
    """FA maps of each case with panels (one file per case with ``per_case``, else the first subject's
    FA maps and slice grid) and the steps sweep."""
    figures = {}
    for name, p in panels.items():
        suffix = f"_{name}" if per_case else ""
        fig = fa_figure(p["fa"], next(iter(p["fa"])), p["mask"])
        if per_case:
            fig.suptitle(f"{name}: FA and |FA error| against the full acquisition, slice z={p['z']}", fontsize=9)
        figures[f"fa_maps{suffix}"] = save_figure(fig, out / f"fa_maps{suffix}.png")
        if not per_case:
            figures["slice_grid"] = save_figure(slice_grid_figure(p["slices"], f"{name}: {p['title']}"),
                                                out / "slice_grid.png")
    if sweep_means:
        metrics = {"fa_mae": "FA error (vs acquisition)", "ssim": "image SSIM (vs acquisition)"}
        if has_truth:
            metrics["fa_mae_truth"] = "FA error (vs truth)"
        figures["steps_sweep"] = save_figure(sweep_figure(sweep_means, metrics), out / "steps_sweep.png")
    return figures


def _markdown(body, notes, command, wall) -> str:
    return "\n".join(
        [f"# {body['title']}", "", body["table"], *[f"- {n}" for n in notes], "", *body["after"],
         f"Command: `{command}`  ", f"Wall time: {wall:.1f} s", ""]
    )


@dataclass
class _Tally:
    """What the cases loop gathers."""

    per_case: dict = field(default_factory=dict)
    cases: dict = field(default_factory=dict)
    panels: dict = field(default_factory=dict)
    sweep: dict = field(default_factory=dict)
    features: dict = field(default_factory=dict)
    reference_features: list = field(default_factory=list)
    has_truth: bool = False
    floor_label: str | None = None


class _Benchmark:
    """One run of :func:`run_benchmark`: setup, the cases loop, the report."""

    def __init__(self, config: BenchmarkConfig, log):
        from ..hub import select_device

        self.started = time.perf_counter()
        self.config, self.log, self.out = config, log, Path(config.out)
        self.device = select_device(config.device)
        self.rows = _method_rows(config)
        _check_sweep(config)
        self.sources = _case_sources(config)
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
        what = "cases" if self.config.is_real else "subjects"
        for index, source in enumerate(tqdm(self.sources, desc=what, unit="case", disable=not self.config.progress)):
            self.score_case(index, source)
        return self.report()

    def score_case(self, index: int, source: CaseSource) -> None:
        config, tally = self.config, self.tally
        case = source.load()
        ev, targets = case.evaluation, case.targets
        tally.has_truth = tally.has_truth or ev.truth is not None
        tally.cases[case.name] = case.describe()
        results = tally.per_case.setdefault(case.name, {})
        data_range = None
        if self.fid_model is not None:
            ref_values = ev.data[..., ev.volume_indices(targets)]
            data_range = float(ref_values[ev.mask].max() - ref_values[ev.mask].min())
            tally.reference_features.append(inception_features(self.fid_model, ref_values, ev.mask, data_range))
        for row in tqdm(self.ran, desc=case.name, unit="method", leave=False, disable=not config.progress):
            results[row["key"]] = self.score_method(row, case, data_range)
        if ev.truth is not None:
            results[NOISE_FLOOR] = {"truth": ev.score_acquisition(targets)}
            tally.floor_label = f"{_acquired_label(len(ev.dw))} (noise floor, vs truth)"
        if config.sweep_steps and self.sweep_pipeline is not None and index < config.sweep_subjects:
            _sweep(self.sweep_pipeline, case, config, tally.sweep)

    def score_method(self, row, case, data_range) -> dict:
        """One method on one case: predict, score, keep FID features, predictions and figure panels.

        A real scan's kept directions are fixed by the protocol, so a method they
        are too few for (SH order 6 from 10 directions) is skipped on that case;
        on held-out subjects the options chose them, and it is an error.
        """
        ev, low, targets = case.evaluation, case.low, case.targets
        denoiser = row.get("denoise")
        tic = time.perf_counter()
        kept = case.kept_data(denoiser)
        try:
            upsampler = self.upsamplers[row["key"]]
            pred = upsampler.predict(kept, ev.bvals[low], ev.bvecs[low], targets, ev.mask)
        except ValueError as exc:  # e.g. more SH coefficients or references than acquired directions
            if not self.config.is_real:
                raise QID2InputError(case.path, f"{row['label']}: {exc}") from None
            self.log(f"{row['label']} does not run on {case.name}: {exc}")
            return {"skipped": str(exc)}
        elapsed = time.perf_counter() - tic
        # A denoised method's series holds its denoised kept volumes, as the user's output would.
        scores, maps = ev.score(pred, targets, return_maps=True, kept=None if denoiser is None else (low, kept))
        if self.fid_model is not None:
            self.tally.features[row["key"]].append(inception_features(self.fid_model, pred, ev.mask, data_range))
        if self.config.save_predictions:
            shell = case.shell
            save_dwi(self.out / "predictions" / case.name / row["key"],
                     ev.combine(pred, targets, kept=None if denoiser is None else (low, kept)),
                     shell.bvals, shell.bvecs, shell.affine, shell.header)
        if case.figures:
            panels = self.tally.panels.setdefault(case.name, {})
            if not panels:
                panels.update(_figure_panels(case, row["R"] or self.r_first))
            panels["fa"][row["label"]] = maps.fa[panels["crop"]]
            panels["slices"][row["label"]] = pred[panels["crop"] + (0,)]
        per_slice = fa_error_per_slice(maps.fa, ev.reference_maps.fa, ev.mask)
        extra = {}
        if row["method"] == "qid2" and upsampler.physics_prior:
            extra["residual_weight"] = upsampler.applied_residual_weight
        return {**scores, "per_slice": per_slice, "time_s": elapsed, **extra}

    def report(self) -> BenchmarkResults:
        config, tally = self.config, self.tally
        fid = self.fid()
        sweep_means = self.sweep_means()
        figures = _write_figures(self.out, tally.panels, sweep_means, tally.has_truth, per_case=config.is_real)
        body = self.real_body(figures) if config.is_real else self.phantom_body(fid)
        wall = time.perf_counter() - self.started
        command = config.command()
        sampler = self.sampler()
        settings = {"R": list(config.num_references), "scheduler": sampler["scheduler"], "steps": sampler["steps"],
                    "seed": config.seed}
        if not config.is_real:
            settings = {"shell": config.shell, "n_acquired": config.n_acquired, **settings}
        results = {
            "command": command,
            "wall_time_s": wall,
            "machine": _machine(self.device),
            "settings": settings,
            **body["results"],
            "fid": fid if fid is not None else {"note": FID_UNAVAILABLE},
            "sweep": self.sweep_section(sweep_means),
            "figures": {k: v.name for k, v in figures.items()},
        }
        write_json(self.out / "results.json", results)
        notes = self.notes(sampler, fid) + body["notes"]
        write_text(self.out / "results.md", _markdown(body, notes, command, wall))
        return BenchmarkResults(results=results, table=body["table"], out=self.out)

    def phantom_body(self, fid) -> dict:
        """The paper's Table 1 over held-out subjects (mean ± std) and paired tests against QID²."""
        tally = self.tally
        table_rows = self.ran + ([{"key": NOISE_FLOOR, "label": tally.floor_label}] if tally.has_truth else [])
        labels = {row["key"]: row["label"] for row in table_rows}
        references = ("acquired", "truth") if tally.has_truth else ("acquired",)
        summary, baseline, tests = _summaries(tally.per_case, table_rows, self.ran, references)
        table = results_table([(labels[k], summary[k]) for k in labels], has_truth=tally.has_truth,
                              fid={labels[k]: v for k, v in fid.items()} if fid is not None else FID_UNAVAILABLE)
        return {
            "title": "Benchmark",
            "table": table,
            "after": [tests_table(tests, baseline["label"], labels)],
            "notes": [],
            "results": {
                "subjects": list(tally.per_case),
                "methods": self.rows,
                "per_subject": tally.per_case,
                "summary": summary,
                "paired_tests": {"baseline": baseline["key"], "tests": tests},
            },
        }

    def real_body(self, figures: dict) -> dict:
        """One row per case and method with the FA-error ratio to DTI-predict, pooled tests, per-slice values."""
        tally = self.tally
        keys = [row["key"] for row in self.ran]
        labels = {row["key"]: row["label"] for row in self.ran}
        section = ratio_section(tally.per_case, keys)
        rows = [
            {"case": case, "label": labels[key], "scores": methods[key], "ratio": section["ratio"].get(case, {}).get(key),
             "test": section["tests"]["per_case"].get(case, {}).get(key)}
            for case, methods in tally.per_case.items()
            for key in keys
        ]
        table = case_table(rows, labels[BASELINE])
        ratios = {case: {labels[k]: r for k, r in per.items()} for case, per in section["ratio"].items()}
        figures["fa_ratio"] = save_figure(ratio_figure(ratios, labels[BASELINE]), self.out / "fa_ratio.png")
        skipped = [f"{labels[key]} did not run on {case}: {methods[key]['skipped']}"
                   for case, methods in tally.per_case.items() for key in keys if "skipped" in methods[key]]
        denoised = reference_ratios(tally.per_case, keys, "denoised")
        after = [pooled_table(section, labels)]
        if denoised:
            after.append("Against the MP-PCA-denoised full acquisition (the reference of a practitioner who "
                         "denoises first):\n\n" + ratio_matrix_table(denoised, labels, labels[BASELINE]))
        return {
            "title": "Benchmark on real scans",
            "table": table,
            "after": [*after, per_slice_table(section, labels)],
            "notes": skipped,
            "results": {"cases": tally.cases, "methods": self.rows, "per_case": tally.per_case, "fa_ratio": section,
                        "fa_ratio_denoised": denoised},
        }

    def fid(self) -> dict | None:
        """FID per method, pooled over the cases, or `None` without a feature extractor."""
        if self.fid_model is None:
            return None
        ref = np.concatenate(self.tally.reference_features)
        return {key: frechet_distance(np.concatenate(f), ref) for key, f in self.tally.features.items() if f}

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
            "subjects": list(self.tally.per_case)[: self.config.sweep_subjects],
            "slices": self.config.sweep_slices,
            "mean": sweep_means,
            "per_subject": self.tally.sweep,
        }

    def notes(self, sampler, fid) -> list[str]:
        config, has_truth = self.config, self.tally.has_truth
        if config.is_real:
            notes = [
                f"Real scans ({len(self.tally.cases)} cases). Per case, one shell: a uniform third of its directions "
                "kept (kept_count), the rest predicted from b0 + kept and scored against the full acquisition of "
                "the shell, inside the mask. Ratio = FA MAE / DTI-predict's FA MAE on the same case (bold: < 1, "
                "the method beats a tensor fit on the same kept directions). FA, angle: tensor fit (dipy, WLS) of "
                "b0 + kept + predicted against the fit of b0 + all acquired; angle where FA > 0.2. Image SSIM per "
                "axial slice with at least 64 mask voxels and 7 voxels across (none on the smallest crop).",
                *[f"{name}: b={c['shell']:g}, {c['n_directions']} directions, {c['n_acquired']} kept -> "
                  f"{c['n_targets']} targets, grid {'x'.join(map(str, c['shape']))}; mask: {c['mask']}; "
                  f"{c['source']}." for name, c in self.tally.cases.items()],
            ]
        else:
            notes = [
                f"Held-out subjects ({len(self.tally.per_case)}): {', '.join(self.tally.per_case)}. Mean ± std over "
                f"subjects; every metric inside the brain mask. b={config.shell:g} shell, {config.n_acquired} "
                "directions acquired, the rest predicted.",
                "Image metrics compare the predicted volumes with the acquired ones at the same directions (SSIM per "
                "axial slice); FA, MD and angle compare a tensor fit on b0 + acquired + predicted volumes with one on "
                "b0 + all acquired volumes" + (" (or, vs truth, on the noise-free signal)." if has_truth else "."),
            ]
        notes += [f"{name}: {note}." for name, c in self.tally.cases.items()
                  for note in c.get("denoise", {}).values()]
        if any(c["shell"] >= HIGH_B for c in self.tally.cases.values()):
            notes.append(f"Shells of b >= {HIGH_B:g}: ACC = angular correlation (Anderson 2005) of order-6 and -8 SH "
                         "fits (dipy, least squares, l = 0 left out) of the up-sampled series against the full "
                         "acquisition, mean over the mask; CSD peak error = mean angle between the first peaks of "
                         "dipy's CSD (response from voxels with FA > 0.7 of the full acquisition) of the two "
                         f"series, in up to {MAX_CSD_VOXELS} voxels with FA > 0.2.")
        if self.sweep_pipeline is not None:
            from ..hub import dtype_name

            precision = dtype_name(self.sweep_pipeline.unet.dtype)  # what auto came out as
            precision = "" if precision == "fp32" else f", {precision}"
            notes.append(f"QID²: {sampler['scheduler']}, {sampler['steps']} steps{precision}, seed {config.seed}.")
        notes.append(f"FID: {FID_UNAVAILABLE}" if fid is None else "FID: pooled over the cases' brain slices.")
        return notes + [f"{row['label']}: {row['status']}" for row in self.rows if row["status"] != "ok"]
