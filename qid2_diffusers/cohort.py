"""Up-sampling a cohort: every series of a BIDS or HCP dataset or of a list file, resumable, over processes.

The engine behind ``qid2 upsample --cohort``. Whole subjects are spread over
the processes of an ``accelerate launch`` (round robin over the global process
index, so the processes of several machines share the work as those of one do);
each subject is one :func:`~qid2_diffusers.inference.upsample_dwi` call on one
process with the run's seed, so it is the series a single-subject
``qid2 upsample --dwi`` writes, bit for bit.

Where the outputs go (:func:`output_prefix`): a BIDS dataset gives a BIDS
derivative (``sub-*/[ses-*/]dwi/<entities>_desc-qid2_dwi.nii.gz`` + ``.bval`` +
``.bvec`` and a ``dataset_description.json``); an HCP folder gives
``<subject>/T1w/Diffusion/data_qid2.*``; a list file mirrors the listed paths
below the folder they share, ``_qid2`` appended to each name.

A subject is finished once its done-marker (a hidden JSON file beside its
outputs, written last and atomically) names files that all exist; a rerun skips
it, refuses to mix in results made with other settings, and first deletes the
temporary files a killed run left (:func:`~qid2_diffusers.data.io.remove_temporaries`).
One subject's bad input is reported in the summary and the others go on.
"""

from __future__ import annotations

import json
import sys
import time
import traceback
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from .data.io import atomic_write, remove_temporaries
from .data.layouts import SubjectPaths, discover_subjects, read_subject_list
from .errors import QID2InputError, QID2InputWarning
from .denoise import DEFAULT_DENOISE
from .pipelines.upsampler_qid2 import DEFAULT_RESIDUAL_WEIGHT
from .inference import check_writable, upsample_dwi

__all__ = [
    "SUMMARY_NAME",
    "DESCRIPTION_NAME",
    "BIDS_VERSION",
    "CohortSubject",
    "Cohort",
    "SubjectOutcome",
    "CohortReport",
    "output_prefix",
    "find_cohort",
    "run_settings",
    "upsample_cohort",
]

#: The summary table every run writes in the output folder.
SUMMARY_NAME = "qid2_cohort_summary.tsv"
#: The BIDS derivative's description, written for a BIDS cohort.
DESCRIPTION_NAME = "dataset_description.json"
#: The BIDS version the derivative follows.
BIDS_VERSION = "1.10.0"
#: Statuses of a subject in a run.
STATUSES = ("done", "skipped", "failed")


@dataclass(frozen=True)
class CohortSubject:
    """One series of a cohort and the output prefix it is written to.

    Args:
        source ([`~qid2_diffusers.data.layouts.SubjectPaths`]): the input files.
        prefix (`Path`): output path without extension.
    """

    source: SubjectPaths
    prefix: Path

    @property
    def subject_id(self) -> str:
        return self.source.subject_id

    @property
    def image(self) -> Path:
        # The extension spelled out: a prefix with a dot in its name keeps it whole.
        return self.prefix.with_name(self.prefix.name + ".nii.gz")

    @property
    def marker(self) -> Path:
        """The done-marker, written after every output file."""
        return self.prefix.with_name(f".{self.prefix.name}.qid2-done.json")

    def outputs(self) -> list[Path]:
        """Every file a run of this subject may write, the marker first."""
        names = [f"{self.prefix.name}{ext}" for ext in (".nii.gz", ".bval", ".bvec", "_std.nii.gz")]
        return [self.marker, *(self.prefix.with_name(n) for n in names)]


@dataclass
class Cohort:
    """The subjects of a cohort, in subject-id order, and the output folder.

    Args:
        source (`Path`): the dataset folder or list file.
        out_dir (`Path`): the output folder.
        subjects (`list` of [`CohortSubject`]): every series found.
    """

    source: Path
    out_dir: Path
    subjects: list[CohortSubject]

    @property
    def bids(self) -> bool:
        return any(s.source.layout == "bids" for s in self.subjects)


@dataclass
class SubjectOutcome:
    """What a run did with one subject.

    Args:
        subject_id (`str`): the subject.
        status (`str`): ``"done"``, ``"skipped"`` (already done) or ``"failed"``.
        seconds (`float`): wall time spent on it in this run.
        targets (`int`): synthesised volumes in its output (written by an earlier run when skipped).
        output (`str`): its up-sampled series, relative to the output folder; empty when failed.
        reason (`str`): why it failed (one line), or ``"already done"``.
    """

    subject_id: str
    status: str
    seconds: float = 0.0
    targets: int = 0
    output: str = ""
    reason: str = ""


@dataclass
class CohortReport:
    """Every subject's outcome, in subject-id order, and where the summary table was written.

    Args:
        outcomes (`list` of [`SubjectOutcome`]): one per subject.
        summary_path (`Path`): the TSV file (:data:`SUMMARY_NAME`).
        num_processes (`int`): processes the subjects were spread over.
    """

    outcomes: list[SubjectOutcome]
    summary_path: Path
    num_processes: int = 1

    def count(self, status: str) -> int:
        return sum(o.status == status for o in self.outcomes)

    @property
    def failed(self) -> bool:
        return self.count("failed") > 0

    def rows(self) -> list[list[str]]:
        """The summary table, header first: subject, status, seconds, targets, output, reason."""
        return [["subject", "status", "seconds", "targets", "output", "reason"]] + [
            [o.subject_id, o.status, f"{o.seconds:.1f}", str(o.targets), o.output, " ".join(o.reason.split())]
            for o in self.outcomes
        ]

    def table(self) -> str:
        """The summary table aligned for a terminal (without the output column)."""
        rows = [r[:4] + r[5:] for r in self.rows()]
        widths = [max(len(r[i]) for r in rows) for i in range(4)]
        align = [str.ljust, str.ljust, str.rjust, str.rjust]
        return "\n".join("  ".join([*(a(c, w) for a, c, w in zip(align, r, widths)), r[4]]).rstrip() for r in rows)


def _bids_derivative_name(prefix: str) -> str:
    # desc is the last entity before the suffix; an input's own desc (a
    # preprocessed derivative's desc-preproc) gives way, as each entity appears once.
    entities = [e for e in prefix.split("_") if not e.startswith("desc-")]
    return "_".join([*entities, "desc-qid2", "dwi"])


def output_prefix(subject: SubjectPaths, root, out_dir) -> Path:
    """Where a subject's up-sampled series goes (a path without extension).

    - BIDS: ``OUT/sub-*/[ses-*/]dwi/<entities>_desc-qid2_dwi``: the input's
      folder below ``root`` and its entities, ``desc-qid2`` added (replacing any desc).
    - HCP: ``OUT/<subject>/T1w/Diffusion/data_qid2``.
    - list: ``OUT/<subject id>_qid2``, the id being the listed path below the
      folder all entries share (:func:`~qid2_diffusers.data.layouts.read_subject_list`).

    Args:
        subject ([`~qid2_diffusers.data.layouts.SubjectPaths`]): the subject.
        root (`str` or `os.PathLike`): the dataset folder it was found in.
        out_dir (`str` or `os.PathLike`): the output folder.
    """
    out_dir = Path(out_dir)
    if subject.layout == "bids":
        folder = subject.dwi.parent.relative_to(root)
        return out_dir / folder / _bids_derivative_name(subject.subject_id)
    if subject.layout == "hcp":
        return out_dir / subject.subject_id / "T1w" / "Diffusion" / "data_qid2"
    return out_dir / f"{subject.subject_id}_qid2"


def _inside(path: Path, folder: Path) -> bool:
    path, folder = path.resolve(), folder.resolve()
    return path == folder or folder in path.parents


def _find(source: Path, out_dir: Path) -> Cohort:
    check_writable(out_dir / SUMMARY_NAME)
    if source.is_file():
        subjects = read_subject_list(source)
    elif source.is_dir():
        if _inside(source, out_dir):
            raise QID2InputError(out_dir, "holds the cohort itself; write the outputs elsewhere, e.g. DIR/derivatives/qid2")
        # A previous run's outputs inside the dataset (DIR/derivatives/...) are not subjects.
        subjects = [s for s in discover_subjects(source, check_sidecars=False) if not _inside(s.dwi, out_dir)]
    else:
        raise QID2InputError(source, "no such folder or list file")
    if not subjects:
        raise QID2InputError(source, f"no subjects found outside {out_dir}")
    root = source if source.is_dir() else source.parent
    cohort = Cohort(source, out_dir, [CohortSubject(s, output_prefix(s, root, out_dir)) for s in subjects])
    seen = {}
    for item in cohort.subjects:
        other = seen.setdefault(item.prefix, item.subject_id)
        if other != item.subject_id:
            raise QID2InputError(item.image, f"would be written for both {other} and {item.subject_id}")
    if out_dir.is_dir():
        remove_temporaries(out_dir)
    return cohort


def _from_main(state, compute):
    """``compute()`` run by the main process alone, its result (or input error) shared with every process.

    One process reads and cleans the output folder, so the processes cannot
    see it in different states, and none waits forever for a main process that failed.
    """
    if state is None or state.num_processes == 1:
        return compute()
    from accelerate.utils import broadcast_object_list

    payload = [None]
    if state.is_main_process:
        try:
            payload = [("ok", compute())]
        except QID2InputError as exc:
            payload = [("input", (exc.path, exc.problem))]
        except Exception as exc:
            payload = [("error", f"{type(exc).__name__}: {exc}")]
            broadcast_object_list(payload)
            raise
    broadcast_object_list(payload)
    kind, value = payload[0]
    if kind == "input":
        raise QID2InputError(*value)
    if kind == "error":
        raise RuntimeError(f"the main process failed: {value}")
    return value


def find_cohort(source, out_dir, *, state=None) -> Cohort:
    """The subjects of a dataset folder or list file and where their outputs go; cleans the output folder.

    Args:
        source (`str` or `os.PathLike`): a BIDS or HCP folder
            (:func:`~qid2_diffusers.data.layouts.discover_subjects`; a series
            inside ``out_dir`` is not a subject), or a list file
            (:func:`~qid2_diffusers.data.layouts.read_subject_list`).
        out_dir (`str` or `os.PathLike`): the output folder, created when needed;
            the temporary files a killed run left there are deleted.
        state (`accelerate.PartialState`, *optional*): the main process does the
            work, every process gets the result.

    Raises:
        QID2InputError: no subject found, an output folder that cannot be
            written or holds the cohort, two subjects with one output.
    """
    return _from_main(state, lambda: _find(Path(source).expanduser(), Path(out_dir).expanduser()))


def run_settings(pipeline, target_bvecs=None, **options) -> dict:
    """What makes a subject's output what it is, as JSON: the model, the sampler and the options.

    Recorded in each done-marker, so a rerun with other settings does not mix
    its results with the earlier ones. The device, batch size and compilation
    change results by float rounding only and are left out.

    Args:
        pipeline ([`QID2Pipeline`]): the sampler.
        target_bvecs (`np.ndarray` of shape `(T, 3)`, *optional*): the targets, as given.
        options: :func:`~qid2_diffusers.inference.upsample_dwi`'s keyword arguments.
    """
    model = pipeline.name_or_path
    if model and Path(model).exists():
        model = str(Path(model).resolve())
    shells = options.get("shells")
    settings = {
        "model": model,
        "scheduler": type(pipeline.scheduler).__name__,
        "steps": options.get("num_inference_steps") or pipeline.config.default_num_inference_steps,
        "adapt_steps": (options["adapt_steps"] if options.get("adapt_steps") is not None
                        else pipeline.config.default_adapt_steps),
        "denoise": options.get("denoise") or DEFAULT_DENOISE,
        "residual_weight": options.get("residual_weight") or DEFAULT_RESIDUAL_WEIGHT,
        "num_samples": options.get("num_samples", 1),
        "seed": options.get("seed", 0),
        "dtype": str(pipeline.dtype).removeprefix("torch."),
        "shells": None if shells is None else sorted(float(b) for b in np.atleast_1d(shells)),
        "targets": None if target_bvecs is None else np.asarray(target_bvecs, dtype=np.float64).tolist(),
        "n_targets": options.get("n_targets"),
        "scheme": options.get("scheme"),
    }
    return json.loads(json.dumps(settings, default=lambda v: v.item()))


def _finished(item: CohortSubject, out_dir: Path, settings: dict) -> SubjectOutcome | None:
    """The outcome of a subject an earlier run finished, or `None`."""
    try:
        record = json.loads(item.marker.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    files = record.get("files") or []
    if not files or not all((item.marker.parent / name).is_file() for name in files):
        return None
    if record.get("settings") != settings:
        before = record.get("settings") or {}
        changed = ", ".join(k if isinstance(v, list) or isinstance(before.get(k), list)
                            else f"{k} {before.get(k)} then, {v} now"
                            for k, v in settings.items() if before.get(k) != v)
        raise QID2InputError(out_dir, f"holds {item.subject_id} made with other settings ({changed}); "
                                      "write to another --out-dir, or delete it to redo it")
    return SubjectOutcome(item.subject_id, "skipped", targets=int(record.get("targets", 0)),
                          output=item.image.relative_to(out_dir).as_posix(), reason="already done")


def _describe(cohort: Cohort, command: str | None) -> None:
    """Write the BIDS derivative's ``dataset_description.json``."""
    from . import __version__

    name = cohort.source.name
    try:
        name = json.loads((cohort.source / DESCRIPTION_NAME).read_text(encoding="utf-8"))["Name"]
    except (OSError, ValueError, KeyError, TypeError):
        pass
    generated_by = {"Name": "qid2-diffusers", "Version": __version__}
    if command:
        generated_by["Description"] = command
    description = {
        "Name": f"{name}: q-space up-sampling with QID²",
        "BIDSVersion": BIDS_VERSION,
        "DatasetType": "derivative",
        "GeneratedBy": [generated_by],
        "SourceDatasets": [{"URL": cohort.source.resolve().as_uri()}],
    }
    atomic_write(cohort.out_dir / DESCRIPTION_NAME,
                 lambda tmp: tmp.write_text(json.dumps(description, indent=2, ensure_ascii=False) + "\n", encoding="utf-8"))


def _previous_outcomes(cohort: Cohort, settings: dict, command: str | None) -> dict[str, SubjectOutcome]:
    finished = {}
    for item in cohort.subjects:
        outcome = _finished(item, cohort.out_dir, settings)
        if outcome is not None:
            finished[item.subject_id] = outcome
    if cohort.bids:
        _describe(cohort, command)
    return finished


@contextmanager
def _subject_warnings(subject_id: str):
    """Name the subject in its input warnings that name no file: processes report theirs side by side."""
    caught = []
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            yield
    finally:
        for w in caught:
            message = w.message
            if isinstance(message, QID2InputWarning) and message.path is None:
                message = QID2InputWarning(subject_id, message.problem)
            warnings.warn_explicit(message, w.category, w.filename, w.lineno)


def _upsample_subject(item: CohortSubject, out_dir: Path, pipeline, target_bvecs, settings: dict, options: dict,
                      progress: bool) -> SubjectOutcome:
    """Up-sample and save one subject, then its done-marker; a failure is its outcome, not an exception."""
    from . import __version__

    start = time.perf_counter()
    try:
        # An interrupted run's files (a std map without its series, ...): never part of the result.
        for path in item.outputs():
            path.unlink(missing_ok=True)
        with _subject_warnings(item.subject_id):
            dwi = item.source.load()
            result = upsample_dwi(dwi, target_bvecs, pipeline, progress=progress, **options)
            paths = result.save(item.image, dwi.affine, dwi.header)
        seconds = time.perf_counter() - start
        record = {"subject": item.subject_id, "source": str(item.source.dwi), "files": [p.name for p in paths],
                  "targets": result.n_targets, "seconds": round(seconds, 3), "settings": settings,
                  "version": __version__}
        atomic_write(item.marker, lambda tmp: tmp.write_text(json.dumps(record, indent=1) + "\n", encoding="utf-8"))
    except QID2InputError as exc:
        return SubjectOutcome(item.subject_id, "failed", time.perf_counter() - start, reason=str(exc))
    except Exception as exc:
        # Not the input's fault (memory, a full disk, a bug): shown in full, and the cohort goes on.
        traceback.print_exc()
        first = (str(exc).splitlines() or [""])[0]
        return SubjectOutcome(item.subject_id, "failed", time.perf_counter() - start,
                              reason=f"{type(exc).__name__}: {first}".rstrip(": "))
    return SubjectOutcome(item.subject_id, "done", seconds, result.n_targets,
                          output=item.image.relative_to(out_dir).as_posix())


def _write_summary(report: CohortReport) -> None:
    text = "".join("\t".join(row) + "\n" for row in report.rows())
    atomic_write(report.summary_path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def upsample_cohort(cohort: Cohort, pipeline, target_bvecs=None, *, state=None, progress: bool = True,
                    command: str | None = None, **options) -> CohortReport:
    """Up-sample every unfinished subject of a cohort, spread over the processes, and write the summary.

    Each process takes every ``num_processes``-th unfinished subject from its
    global index on and up-samples it alone
    (:func:`~qid2_diffusers.inference.upsample_dwi` with ``state=None``), so a
    subject's output does not depend on the number of processes or machines.
    Outcomes are gathered on every process; the main one writes
    :data:`SUMMARY_NAME` (and, for a BIDS cohort, :data:`DESCRIPTION_NAME`).

    Args:
        cohort ([`Cohort`]): from :func:`find_cohort`.
        pipeline ([`QID2Pipeline`]): sampler already chosen, on this process's device.
        target_bvecs (`np.ndarray` of shape `(T, 3)`, *optional*): the same
            targets for every subject, in the FSL convention of each subject's bvecs.
        state (`accelerate.PartialState`, *optional*): the processes to spread over.
        progress (`bool`, *optional*, defaults to `True`): on the main process, a
            bar over its subjects and each subject's bar; on every process, a
            line per finished subject (stderr).
        command (`str`, *optional*): the command line, recorded in the BIDS description.
        options: :func:`~qid2_diffusers.inference.upsample_dwi`'s options
            (``shells``, ``n_targets``, ``scheme``, ``num_inference_steps``,
            ``num_samples``, ``adapt_steps``, ``denoise``, ``residual_weight``, ``batch_size``, ``seed``), the same for every subject.

    Raises:
        QID2InputError: the output folder holds subjects finished with other settings (:func:`run_settings`).
    """
    settings = run_settings(pipeline, target_bvecs, **options)
    finished = _from_main(state, lambda: _previous_outcomes(cohort, settings, command))
    index, count = (0, 1) if state is None else (state.process_index, state.num_processes)
    main = index == 0
    pending = [s for s in cohort.subjects if s.subject_id not in finished]
    mine = pending[index::count]
    where = f"[process {index + 1}/{count}] " if count > 1 else ""
    outcomes = []
    bar = tqdm(mine, desc=f"{where}subjects ({len(pending)} to do, {len(finished)} done before)", unit="subject",
               disable=not (progress and main))
    for item in bar:
        outcome = _upsample_subject(item, cohort.out_dir, pipeline, target_bvecs, settings, options, progress and main)
        outcomes.append(outcome)
        if progress:
            detail = outcome.reason if outcome.status == "failed" else f"{outcome.targets} targets -> {outcome.output}"
            tqdm.write(f"{where}{item.subject_id}: {outcome.status} in {outcome.seconds:.1f} s, {detail}", file=sys.stderr)
    if count > 1:
        from accelerate.utils import gather_object

        outcomes = gather_object(outcomes)
    by_id = {**finished, **{o.subject_id: o for o in outcomes}}
    report = CohortReport([by_id[s.subject_id] for s in cohort.subjects], cohort.out_dir / SUMMARY_NAME, count)
    if main:
        _write_summary(report)
    return report
