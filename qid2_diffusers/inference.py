"""Up-sampling a DWI series: the engine behind ``qid2 upsample``, its example and the demo.

The functions here are the one up-sampling path: the command line, the
seeded example and the demo's download all go through :func:`upsample_dwi`
and :meth:`UpsampleResult.save`.

Every series is read once (:func:`~qid2_diffusers.data.series.read_series`:
empty volumes, NaN voxels and empty masks answered there) and up-sampled in the
orientation the models were trained in
(:class:`~qid2_diffusers.orientation.Reorientation`); the result is written back
in the file's orientation, affine, header and b-vector convention. Each shell is
up-sampled from the b0s and its own directions only (:func:`plan_shells`).

Under ``accelerate launch --num_processes N`` each shell's targets are split
across the processes (:func:`process_state`) and gathered on the main one,
which alone writes the output; each target keeps the noise of its index, so
any N gives the same volume.
"""

from __future__ import annotations

import tempfile
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .errors import QID2InputError, QID2InputWarning
from .gradients import split_scheme, target_directions
from .timing import add_timings, format_timings, timed

__all__ = [
    "TRAINED_SHELL",
    "BVAL_CONDITIONED_RANGE",
    "TARGET_SCHEMES",
    "CPU_BATCH_PIXELS",
    "DEVICE_BATCH_SIZE",
    "UpsampleResult",
    "ShellPlan",
    "read_targets",
    "choose_targets",
    "plan_shells",
    "shell_seed",
    "check_writable",
    "outside_training_shell",
    "training_shell_warning",
    "auto_batch_size",
    "process_state",
    "upsample_dwi",
]

#: b-value (s/mm²) the shipped models were trained at; other shells still run, with a warning.
TRAINED_SHELL = 1000.0
#: Shells (s/mm²) a b-conditioned model is trained on; outside them it runs with a warning.
BVAL_CONDITIONED_RANGE = (500.0, 3500.0)
#: Named target schemes for ``--scheme``.
TARGET_SCHEMES = ("hcp90",)
#: Pixels per network call on the CPU when the batch size is automatic: about
#: 6 slices of 68x80, one of 145x174. Larger batches are no faster on a CPU
#: (per slice they were slightly slower) and cost memory: a 1.25 mm subject
#: peaked at 2.0 GB with this cap (and channels_last input) against 3.3 GB with
#: 2^18 (BENCHMARK.md, speed).
CPU_BATCH_PIXELS = 2**15
#: Batch size on accelerators when automatic (their memory is not the host's).
DEVICE_BATCH_SIZE = 32


@dataclass
class UpsampleResult:
    """An up-sampled series: every input volume, then the synthesised ones, shell by shell.

    Everything is in the input file's orientation and b-vector convention, ready
    to be saved with its affine and header.

    Args:
        data (`np.ndarray` of shape `(X, Y, Z, N + T)`, float32): input volumes
            (b0s included, in file order, NaN and Inf written as 0) followed by
            the ``T`` synthesised ones, by increasing b.
        bvals (`np.ndarray` of shape `(N + T,)`), bvecs (`np.ndarray` of shape `(N + T, 3)`): the
            scheme; the input's as loaded, then each new volume's shell b-value
            and direction (FSL convention of the input file).
        n_input (`int`): ``N``.
        mask (`np.ndarray` of shape `(X, Y, Z)`): voxels that were synthesised.
        std (`np.ndarray` of shape `(X, Y, Z, T)`, *optional*): per-voxel standard
            deviation over samples, when more than one sample was drawn.
        adapt_steps (`int`, *optional*, defaults to 0): test-time adaptation steps per shell.
        timings (`dict`, *optional*): wall seconds per stage (:data:`~qid2_diffusers.timing.STAGES`),
            every shell together; :meth:`save` adds ``write``. Their sum is the run's wall time.
        denoise_note (`str`, *optional*): what the denoising stage did to the input volumes
            (:attr:`~qid2_diffusers.denoise.DenoisePlan.note`), one line.
        residual_weights (`dict`, *optional*): shell b-value -> weight of the network's residual over the
            tensor prior that was used (physics-prior models; see ``residual_weight``).
    """

    data: np.ndarray
    bvals: np.ndarray
    bvecs: np.ndarray
    n_input: int
    mask: np.ndarray
    std: np.ndarray | None = None
    adapt_steps: int = 0
    timings: dict = field(default_factory=dict)
    denoise_note: str = "not denoised (--denoise none)"
    residual_weights: dict = field(default_factory=dict)

    @property
    def adaptation_seconds(self) -> float:
        """Wall time of test-time adaptation, every shell together: the ``adaptation`` stage of :attr:`timings`."""
        return float(self.timings.get("adaptation", 0.0))

    @property
    def n_targets(self) -> int:
        return self.data.shape[3] - self.n_input

    @property
    def new_shells(self) -> dict[float, int]:
        """b-value -> number of synthesised volumes, by increasing b."""
        b, counts = np.unique(self.bvals[self.n_input :], return_counts=True)
        return {float(v): int(c) for v, c in zip(b, counts)}

    def save(self, prefix, affine, header=None) -> list[Path]:
        """Write ``PREFIX.nii.gz/.bval/.bvec`` (and ``PREFIX_std.nii.gz``), all or nothing."""
        from .data.io import nifti_stem, save_dwi, save_nifti

        prefix = Path(prefix)
        stem = nifti_stem(prefix)
        written = []
        with timed(self.timings, "write"):
            if self.std is not None:
                written.append(save_nifti(prefix.with_name(f"{stem}_std.nii.gz"), self.std, affine, header))
            try:
                written[:0] = save_dwi(prefix, self.data, self.bvals, self.bvecs, affine, header)
            except BaseException:
                for path in written:
                    path.unlink(missing_ok=True)
                raise
        return written

    def method_note(self) -> str:
        """One line: what was done to the input volumes and how much of the network's residual over the
        tensor prior was kept, per shell (0: the tensor fit's prediction; 1: the network as trained)."""
        note = f"input {self.denoise_note}"
        if self.residual_weights:
            kept = ", ".join(f"{w:.2f} at b={b:g}" for b, w in self.residual_weights.items())
            note += f"; network residual over the tensor prior kept {kept}"
        return note

    def format_timings(self) -> str:
        """:attr:`timings` as one line (:func:`~qid2_diffusers.timing.format_timings`)."""
        return format_timings(self.timings)


@dataclass(frozen=True)
class ShellPlan:
    """What :func:`upsample_dwi` does with one shell.

    Args:
        label (`int`): the shell's label (:func:`~qid2_diffusers.data.io.group_shells`).
        bval (`float`): b-value of its synthesised volumes, the median of its acquired ones.
        volumes (`np.ndarray` of `int`): input volumes it is up-sampled from, in
            file order: the usable b0s and the shell's usable directions.
        targets (`np.ndarray` of shape `(T, 3)`): directions to synthesise, working voxel frame.
    """

    label: int
    bval: float
    volumes: np.ndarray
    targets: np.ndarray


def read_targets(path) -> np.ndarray:
    """Target directions from an FSL bvec file (3 rows) or a 3-column text file.

    Zero-length rows (the b0 entries of a full bvec file) are skipped; a
    3 x 3 file is read the FSL way (one direction per column). The directions
    are returned as written: in the convention of the ``--bvecs`` they go with.

    Raises:
        QID2InputError: unreadable, non-numeric, wrongly shaped or empty.
    """
    from .directions import normalize_bvecs

    path = Path(path)
    if not path.is_file():
        raise QID2InputError(path, "targets file not found")
    try:
        arr = np.loadtxt(path, dtype=np.float64, ndmin=2)
    except ValueError as exc:
        raise QID2InputError(path, f"malformed targets file ({str(exc).splitlines()[0]})") from None
    if arr.shape[0] == 3:
        arr = arr.T
    elif arr.ndim != 2 or arr.shape[1] != 3:
        raise QID2InputError(path, f"malformed targets file: expected 3 rows (FSL bvec) or 3 columns, got shape {arr.shape}")
    if not np.all(np.isfinite(arr)):
        raise QID2InputError(path, "malformed targets file: contains NaN or Inf")
    arr = arr[np.linalg.norm(arr, axis=1) > 1e-6]
    if len(arr) == 0:
        raise QID2InputError(path, "targets file holds no non-zero direction")
    return normalize_bvecs(arr)


def _full_scheme(n_targets=None, scheme=None) -> tuple[np.ndarray, str]:
    """The scheme whose missing directions are the targets, and how to name it."""
    from .directions import uniform_directions

    if n_targets is not None and scheme is not None:
        raise QID2InputError(None, "give at most one of --targets, --n-targets and --scheme")
    if scheme is not None:
        if scheme not in TARGET_SCHEMES:
            raise QID2InputError(None, f"unknown scheme {scheme!r}; choose from {', '.join(TARGET_SCHEMES)}")
        from .data.phantom import hcp_scheme

        bvals, bvecs = hcp_scheme(shells=(1000,), n_directions=90)
        return np.asarray(bvecs, dtype=np.float64)[split_scheme(bvals)[1]], f"the {scheme} scheme"
    n = 90 if n_targets is None else int(n_targets)
    if n < 1:
        raise QID2InputError(None, f"--n-targets must be positive, got {n}")
    return uniform_directions(n), f"a uniform {n}-direction scheme"


def choose_targets(acquired_bvecs, *, targets_path=None, n_targets=None, scheme=None) -> np.ndarray:
    """The directions to synthesise, ``(T, 3)``.

    Args:
        acquired_bvecs (`array-like` of shape `(N, 3)`): the shell's acquired directions.
        targets_path (`str`, *optional*): an FSL bvec file of targets, used as given.
        n_targets (`int`, *optional*): the directions of a uniform
            ``n_targets``-direction scheme not already acquired; the default
            when nothing is given is 90.
        scheme (`str`, *optional*): ``"hcp90"``, the phantom's 90-direction
            b=1000 scheme, minus the acquired directions.
    """
    from .directions import complement

    if targets_path is not None:
        if n_targets is not None or scheme is not None:
            raise QID2InputError(None, "give at most one of --targets, --n-targets and --scheme")
        return read_targets(targets_path)
    full, label = _full_scheme(n_targets, scheme)
    targets = full[complement(full, acquired_bvecs)]
    if len(targets) == 0:
        raise QID2InputError(None, f"every direction of {label} is already acquired: nothing to up-sample")
    return targets


def plan_shells(series, target_bvecs=None, *, shells=None, n_targets=None, scheme=None,
                num_references: int = 3) -> list[ShellPlan]:
    """One :class:`ShellPlan` per shell to up-sample, by increasing b.

    Args:
        series ([`~qid2_diffusers.data.series.WorkingSeries`]): the input.
        target_bvecs (`np.ndarray` of shape `(T, 3)`, *optional*): targets of every
            shell, working voxel frame; by default each shell's targets are
            :func:`choose_targets` of its usable directions (``n_targets`` / ``scheme``).
        shells (`list` of `float`, *optional*): b-values of the shells; `None`
            takes every shell, skipping (with a warning) those that cannot be
            up-sampled, unless none can.
        num_references (`int`, *optional*, defaults to 3): R; a shell needs at least R directions.

    Raises:
        QID2InputError: a requested shell is absent or cannot be up-sampled.
    """
    from .data.io import check_enough_directions

    if shells is None:
        labels = list(series.shells)
    else:
        labels = sorted({series.shell_label(float(b)) for b in shells})
    plans, skipped = [], []
    for label in labels:
        members = series.shells[label]
        dw = members[series.usable[members]]
        try:
            check_enough_directions(len(dw), num_references, series.path)
            targets = target_bvecs
            if targets is None:
                targets = choose_targets(series.bvecs[dw], n_targets=n_targets, scheme=scheme)
        except QID2InputError as exc:
            if shells is not None:
                raise
            skipped.append((label, exc))
            continue
        volumes = np.union1d(series.b0_indices, dw)
        bval = float(np.median(series.bvals[dw]))
        plans.append(ShellPlan(label, bval, volumes, np.asarray(targets, dtype=np.float64)))
    if not plans:
        raise skipped[0][1]
    for label, exc in skipped:
        warnings.warn(QID2InputWarning(exc.path, f"the b={label} shell is not up-sampled: {exc.problem}"), stacklevel=2)
    return plans


def shell_seed(seed: int, label: int, n_shells: int) -> int:
    """Base seed of one shell's noise.

    A series of one shell uses ``seed`` itself; in a multi-shell series the
    shell's label is mixed in, so each shell draws its own noise and up-sampling
    one shell gives the same volumes as up-sampling every shell.
    """
    if n_shells <= 1:
        return int(seed)
    return int(np.random.SeedSequence([int(seed), int(label)]).generate_state(1)[0])


def check_writable(prefix) -> Path:
    """Check, before the long run, that ``PREFIX.*`` can be written; returns the prefix.

    Writes (then removes) a probe file in the output folder, or in its
    nearest existing parent when the folder is still to be created; nothing
    is created here, so a run that fails later leaves nothing behind.
    """
    prefix = Path(prefix).expanduser()
    if prefix.is_dir():
        raise QID2InputError(prefix, "is a folder; --out takes a file prefix such as out/sub-01_upsampled")
    existing = prefix.absolute().parent
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise QID2InputError(existing, "is a file, so the output folder cannot be created there")
    try:
        with tempfile.NamedTemporaryFile(dir=existing, prefix=".qid2-probe-"):
            pass
    except OSError as exc:
        raise QID2InputError(existing, f"output folder is not writable ({exc.strerror or exc.__class__.__name__})") from None
    return prefix


def outside_training_shell(b: float, bval_conditioning: bool = False) -> bool:
    """Whether a shell at ``b`` s/mm² lies more than 5 % outside the b-values a model was trained on:
    :data:`TRAINED_SHELL`, or :data:`BVAL_CONDITIONED_RANGE` for a b-conditioned model."""
    lo, hi = BVAL_CONDITIONED_RANGE if bval_conditioning else (TRAINED_SHELL, TRAINED_SHELL)
    return not 0.95 * lo <= float(b) <= 1.05 * hi


def training_shell_warning(b: float, bval_conditioning: bool = False) -> str | None:
    """The one-line warning for a shell outside the model's training b-values, or `None`."""
    if not outside_training_shell(b, bval_conditioning):
        return None
    if bval_conditioning:
        lo, hi = BVAL_CONDITIONED_RANGE
        trained = f"on shells from b={lo:g} to b={hi:g}"
    else:
        trained = f"at b={TRAINED_SHELL:g}"
    return f"the model was trained {trained}; up-sampling the b={b:g} shell is outside its training data"


def auto_batch_size(pipeline, mask, num_samples: int = 1) -> int:
    """(slice, target) pairs per network call: bounded by :data:`CPU_BATCH_PIXELS` on the CPU."""
    from .upsampling import brain_bounding_box

    if pipeline.device.type != "cpu":
        return DEVICE_BATCH_SIZE
    bx, by = brain_bounding_box(mask)
    pixels = (bx.stop - bx.start) * (by.stop - by.start) * max(1, int(num_samples))
    return int(np.clip(CPU_BATCH_PIXELS // max(pixels, 1), 1, DEVICE_BATCH_SIZE))


def process_state(device="auto"):
    """Accelerate's process state when launched as several processes, else `None`.

    ``cpu=True`` is passed on a CPU-only run: Accelerate otherwise sees no
    accelerator and falls back to one process per launch, each doing all the work.
    """
    from accelerate.utils import get_int_from_env

    if get_int_from_env(["WORLD_SIZE", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE"], 1) <= 1:
        return None
    from accelerate import PartialState

    from .hub import select_device

    state = PartialState(cpu=select_device(device).type == "cpu")
    return state if state.num_processes > 1 else None


def _max_new_volumes(dwi, shells, targets, n_targets, scheme) -> int:
    """Most volumes the shells can get: the output is allocated once, before the input is read."""
    from .data.io import group_shells

    n_shells = len(shells) if shells is not None else len(group_shells(dwi.bvals, b0_threshold=dwi.b0_threshold))
    per_shell = len(targets) if targets is not None else len(_full_scheme(n_targets, scheme)[0])
    return n_shells * per_shell


def upsample_dwi(
    dwi,
    target_bvecs,
    pipeline,
    *,
    shells=None,
    n_targets: int | None = None,
    scheme: str | None = None,
    mask=None,
    num_inference_steps: int | None = None,
    num_samples: int = 1,
    adapt_steps: int | None = None,
    denoise: str | None = None,
    residual_weight=None,
    batch_size: int | None = None,
    seed: int = 0,
    progress: bool = True,
    state=None,
) -> UpsampleResult | None:
    """Up-sample the shells of ``dwi``: every shell by default, each from the b0s and its own directions.

    The input is read once (:func:`~qid2_diffusers.data.series.read_series`),
    into the float32 output that then receives the synthesised volumes; only
    slices with brain are sampled, in batches, in the working orientation. A
    145 x 174 x 145 series with 36 volumes peaks under 3 GB on a CPU.

    Args:
        dwi ([`~qid2_diffusers.data.io.DWI`]): the whole input series.
        target_bvecs (`array-like` of shape `(T, 3)`, `GradientTable` or `None`): directions
            to synthesise in every shell, in the FSL convention of ``dwi.bvecs``;
            `None` completes each shell to the ``n_targets`` / ``scheme`` scheme
            (:func:`choose_targets`).
        pipeline ([`QID2Pipeline`]): sampler already chosen, on its device.
        shells (`float` or `list` of `float`, *optional*): b-values of the shells to
            up-sample; defaults to every shell.
        n_targets (`int`, *optional*), scheme (`str`, *optional*): see :func:`choose_targets`.
        mask (`np.ndarray` of shape `(X, Y, Z)`, *optional*): brain mask;
            defaults to ``dwi.mask``, else :func:`qid2_diffusers.masking.brain_mask`.
        num_inference_steps (`int`, *optional*): defaults to the pipeline's default.
        num_samples (`int`, *optional*, defaults to 1): samples averaged per
            target; above 1 the result carries a standard-deviation map.
        adapt_steps (`int`, *optional*): test-time adaptation steps per shell on
            the scan's own directions (:func:`~qid2_diffusers.pipelines.adaptation.adapt_pipeline`);
            defaults to the model's ``default_adapt_steps``. The time spent is
            in the result's ``adaptation_seconds``.
        denoise (`str`, *optional*): denoise the input volumes first, b0s and every shell together
            (:func:`~qid2_diffusers.denoise.denoise_series`): ``"mppca"``, ``"dwidenoise"``, ``"patch2self"``
            or ``"none"``;
            defaults to :data:`~qid2_diffusers.denoise.DEFAULT_DENOISE`. The output's input volumes are
            then the denoised ones, and the tensor prior and the references are taken from them. Where
            the requested method cannot work on this grid, the plan says what was done instead, in one
            warning line.
        residual_weight (`str` or `float`, *optional*): for a physics-prior model, ``"auto"`` (each shell's
            weight of the network's residual chosen on its own kept directions,
            :func:`~qid2_diffusers.pipelines.adaptation.residual_weight`) or a number in [0, 1];
            defaults to :data:`~qid2_diffusers.pipelines.upsampler_qid2.DEFAULT_RESIDUAL_WEIGHT`.
        batch_size (`int`, *optional*): (slice, target) pairs per network call;
            defaults to :func:`auto_batch_size`. Results depend on it only by float rounding.
        seed (`int`, *optional*, defaults to 0): base seed (see :func:`shell_seed`).
        progress (`bool`, *optional*, defaults to `True`): tqdm bar over slices x targets.
        state (`accelerate.PartialState`, *optional*): split the targets across
            its processes; only the main process gets the result (others get `None`).

    Returns:
        [`UpsampleResult`], whose ``timings`` say where the wall time went (read,
        mask, tensor prior, adaptation, sampling, ...; :mod:`~qid2_diffusers.timing`).

    Warns:
        QID2InputWarning: a shell outside the b-values the model was trained on,
            a shell skipped, empty volumes, NaN voxels (one line each).
    """
    from .data.io import shell_label
    from .data.series import read_series
    from .directions import normalize_bvecs

    start_time, timings = time.perf_counter(), {}
    main = state is None or state.is_main_process
    if denoise is not None:
        from .denoise import check_denoiser

        check_denoiser(denoise)  # before the series is read: an unknown denoiser or a missing dwidenoise
    if shells is not None:
        # Checked before the series is read: a missing shell is known from the b-values alone.
        shells = sorted({shell_label(dwi.bvals, float(b), b0_threshold=dwi.b0_threshold, path=dwi.path)
                         for b in np.atleast_1d(shells)})
    fsl_targets = None
    if target_bvecs is not None:
        if n_targets is not None or scheme is not None:
            raise QID2InputError(None, "give at most one of --targets, --n-targets and --scheme")
        fsl_targets = normalize_bvecs(target_directions(target_bvecs))
    extra = _max_new_volumes(dwi, shells, fsl_targets, n_targets, scheme) if main else 0
    series = read_series(dwi, mask=mask, extra_volumes=extra, timings=timings)
    denoise_note = _denoise(series, denoise, timings)
    targets = None if fsl_targets is None else series.orientation.bvecs_to_working(fsl_targets)
    plans = plan_shells(series, targets, shells=shells, n_targets=n_targets, scheme=scheme,
                        num_references=pipeline.num_references)
    for plan in plans:
        message = training_shell_warning(plan.bval, pipeline.bval_conditioning)
        if message:
            warnings.warn(QID2InputWarning(None, message), stacklevel=2)

    n_in, n_new = series.n_volumes, sum(len(p.targets) for p in plans)
    out = series.data[..., : n_in + (n_new if main else 0)]
    std = np.zeros(dwi.shape[:3] + (n_new,), dtype=np.float32, order="F") if num_samples > 1 and main else None
    batch_size = batch_size or auto_batch_size(pipeline, series.mask, num_samples)
    start, weights = n_in, {}
    for plan in plans:
        upsampler = _upsampler(pipeline, num_inference_steps, num_samples, adapt_steps, residual_weight, batch_size,
                               shell_seed(seed, plan.label, len(series.shells)), progress and main)
        tail = slice(start, start + len(plan.targets))
        _upsample_shell(series, plan, upsampler, out[..., tail] if main else None,
                        std[..., tail.start - n_in : tail.stop - n_in] if std is not None else None,
                        num_samples > 1, state)
        start = tail.stop
        if pipeline.physics_prior:
            weights[plan.bval] = upsampler.applied_residual_weight
        add_timings(timings, upsampler.timings)
    if not main:
        return None
    new_bvals = [np.full(len(p.targets), p.bval) for p in plans]
    new_bvecs = [series.orientation.bvecs_from_working(p.targets) for p in plans]
    return UpsampleResult(
        data=out,
        bvals=np.concatenate([series.bvals, *new_bvals]),
        bvecs=np.concatenate([series.fsl_bvecs, *new_bvecs]),
        n_input=n_in,
        mask=series.stored_mask,
        std=std,
        adapt_steps=upsampler.adapt_steps if plans else 0,
        timings={**timings, "other": time.perf_counter() - start_time - sum(timings.values())},
        denoise_note=denoise_note,
        residual_weights=weights,
    )


def _denoise(series, method, timings) -> str:
    """Denoise the series' input volumes in place (working orientation, so patches lie in axial slices)."""
    from .denoise import DEFAULT_DENOISE, denoise_series

    method = DEFAULT_DENOISE if method is None else method
    with timed(timings, "denoise"):
        working = series.orientation.to_working(series.data[..., : series.n_volumes])
        what = Path(series.path).name if series.path else "the series"
        plan = denoise_series(working, series.bvals, method, mask=series.mask, usable=series.usable,
                              b0_threshold=series.b0_threshold, what=what, out=working).plan
    if plan.fell_back:
        warnings.warn(QID2InputWarning(series.path, plan.note), stacklevel=3)
    return plan.note


def _upsampler(pipeline, steps, num_samples, adapt_steps, residual_weight, batch_size, seed, progress):
    from .pipelines import QID2Upsampler

    return QID2Upsampler(pipeline, num_inference_steps=steps, num_samples=num_samples, batch_size=batch_size,
                         seed=seed, progress=progress, adapt_steps=adapt_steps, residual_weight=residual_weight)


def _upsample_shell(series, plan: ShellPlan, upsampler, into, std_into, want_std: bool, state) -> None:
    """Synthesise one shell's targets into ``into`` (its tail of the output, file orientation).

    Only the main process has ``into``; the others return their share of the
    targets through Accelerate's gather.
    """
    to_working = series.orientation.to_working
    data, bvals, bvecs = series.volumes(plan.volumes), series.bvals[plan.volumes], series.bvecs[plan.volumes]

    def predict(indices):
        """``(indices, volumes or None if written into the output, std)`` of a contiguous run of targets."""
        if not indices:
            return indices, None, None
        part = slice(indices[0], indices[-1] + 1)
        result = upsampler.predict(data, bvals, bvecs, plan.targets[part], series.mask, target_indices=indices,
                                   return_std=want_std, out=None if into is None else to_working(into[..., part]))
        pred, std = result if want_std else (result, None)
        return indices, None if into is not None else pred, std

    everything = list(range(len(plan.targets)))
    if state is None or state.num_processes == 1:
        parts = [predict(everything)]
    else:
        from accelerate.utils import gather_object

        with state.split_between_processes(everything) as mine:
            part = predict(list(mine))
        parts = gather_object([part])
        if into is None:
            return
    for indices, pred, part_std in parts:
        if not indices:
            continue
        part = slice(indices[0], indices[-1] + 1)
        if pred is not None:
            to_working(into[..., part])[...] = pred
        if std_into is not None:
            to_working(std_into[..., part])[...] = part_std
