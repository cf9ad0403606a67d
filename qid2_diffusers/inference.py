"""Up-sampling a DWI series: the engine behind ``qid2 upsample``, its example and the demo.

The functions here are the one up-sampling path: the command line, the
seeded example and the demo's download all go through :func:`upsample_dwi`
and :meth:`UpsampleResult.save`.

Under ``accelerate launch --num_processes N`` the targets are split across the
processes (:func:`process_state`) and gathered on the main one, which alone
writes the output; each target keeps the noise of its global index, so any N
gives the same volume.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import QID2InputError
from .gradients import split_scheme, target_directions

__all__ = [
    "TRAINED_SHELL",
    "TARGET_SCHEMES",
    "CPU_BATCH_PIXELS",
    "DEVICE_BATCH_SIZE",
    "UpsampleResult",
    "read_targets",
    "choose_targets",
    "check_writable",
    "outside_training_shell",
    "auto_batch_size",
    "process_state",
    "upsample_dwi",
]

#: b-value (s/mm²) the shipped models were trained at; other shells still run, with a warning.
TRAINED_SHELL = 1000.0
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
    """An up-sampled series: every input volume, then the synthesised ones.

    Args:
        data (`np.ndarray` of shape `(X, Y, Z, N + T)`, float32): input volumes
            (b0s included, in file order) followed by the ``T`` synthesised ones.
        bvals (`np.ndarray` of shape `(N + T,)`), bvecs (`np.ndarray` of shape `(N + T, 3)`): the scheme.
        n_input (`int`): ``N``.
        mask (`np.ndarray` of shape `(X, Y, Z)`): voxels that were synthesised.
        std (`np.ndarray` of shape `(X, Y, Z, T)`, *optional*): per-voxel standard
            deviation over samples, when more than one sample was drawn.
    """

    data: np.ndarray
    bvals: np.ndarray
    bvecs: np.ndarray
    n_input: int
    mask: np.ndarray
    std: np.ndarray | None = None

    @property
    def n_targets(self) -> int:
        return self.data.shape[3] - self.n_input

    def save(self, prefix, affine, header=None) -> list[Path]:
        """Write ``PREFIX.nii.gz/.bval/.bvec`` (and ``PREFIX_std.nii.gz``), all or nothing."""
        from .data.io import nifti_stem, save_dwi, save_nifti

        prefix = Path(prefix)
        stem = nifti_stem(prefix)
        written = []
        if self.std is not None:
            written.append(save_nifti(prefix.with_name(f"{stem}_std.nii.gz"), self.std, affine, header))
        try:
            written[:0] = save_dwi(prefix, self.data, self.bvals, self.bvecs, affine, header)
        except BaseException:
            for path in written:
                path.unlink(missing_ok=True)
            raise
        return written


def read_targets(path) -> np.ndarray:
    """Target directions from an FSL bvec file (3 rows) or a 3-column text file.

    Zero-length rows (the b0 entries of a full bvec file) are skipped; a
    3 x 3 file is read the FSL way (one direction per column).

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
    from .directions import complement, uniform_directions

    given = [x is not None for x in (targets_path, n_targets, scheme)]
    if sum(given) > 1:
        raise QID2InputError(None, "give at most one of --targets, --n-targets and --scheme")
    if targets_path is not None:
        return read_targets(targets_path)
    if scheme is not None:
        if scheme not in TARGET_SCHEMES:
            raise QID2InputError(None, f"unknown scheme {scheme!r}; choose from {', '.join(TARGET_SCHEMES)}")
        from .data.phantom import hcp_scheme

        bvals, bvecs = hcp_scheme(shells=(1000,), n_directions=90)
        full = np.asarray(bvecs, dtype=np.float64)[split_scheme(bvals)[1]]
        label = f"the {scheme} scheme"
    else:
        n = 90 if n_targets is None else int(n_targets)
        if n < 1:
            raise QID2InputError(None, f"--n-targets must be positive, got {n}")
        full = uniform_directions(n)
        label = f"a uniform {n}-direction scheme"
    targets = full[complement(full, acquired_bvecs)]
    if len(targets) == 0:
        raise QID2InputError(None, f"every direction of {label} is already acquired: nothing to up-sample")
    return targets


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


def outside_training_shell(b: float) -> bool:
    """Whether a shell at ``b`` s/mm² is more than 5 % away from :data:`TRAINED_SHELL`."""
    return abs(float(b) - TRAINED_SHELL) > 0.05 * TRAINED_SHELL


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


def upsample_dwi(
    dwi,
    target_bvecs,
    pipeline,
    *,
    shell: float = 1000,
    mask=None,
    num_inference_steps: int | None = None,
    num_samples: int = 1,
    batch_size: int | None = None,
    seed: int = 0,
    progress: bool = True,
    state=None,
) -> UpsampleResult | None:
    """Up-sample one shell of ``dwi`` to ``target_bvecs``.

    Builds the float32 output (every input volume, then the synthesised
    ones) and samples from it: the input is read once, volume by volume, and
    never held as float64; only slices with brain are sampled, in batches.
    A 145 x 174 x 145 series with 36 volumes peaks under 3 GB on a CPU.

    Args:
        dwi ([`~qid2_diffusers.data.io.DWI`]): the whole input series.
        target_bvecs (`array-like` of shape `(T, 3)` or `GradientTable`): directions to synthesise.
        pipeline ([`QID2Pipeline`]): sampler already chosen, on its device.
        shell (`float`, *optional*, defaults to 1000): b-value of the shell to up-sample.
        mask (`np.ndarray` of shape `(X, Y, Z)`, *optional*): brain mask;
            defaults to ``dwi.mask``, else :func:`qid2_diffusers.masking.brain_mask`.
        num_inference_steps (`int`, *optional*): defaults to the pipeline's default.
        num_samples (`int`, *optional*, defaults to 1): samples averaged per
            target; above 1 the result carries a standard-deviation map.
        batch_size (`int`, *optional*): (slice, target) pairs per network call;
            defaults to :func:`auto_batch_size`. Results depend on it only by float rounding.
        seed (`int`, *optional*, defaults to 0): base seed.
        progress (`bool`, *optional*, defaults to `True`): tqdm bar over slices x targets.
        state (`accelerate.PartialState`, *optional*): split the targets across
            its processes; only the main process gets the result (others get `None`).
    """
    from .data.io import check_enough_directions, extract_shell, shell_indices
    from .masking import brain_mask
    from .pipelines import QID2Upsampler

    sub = extract_shell(dwi, shell)
    _, dw = split_scheme(sub.bvals, sub.bvecs)
    check_enough_directions(len(dw), pipeline.num_references, dwi.path)
    targets = target_directions(target_bvecs)
    if mask is None:
        mask = dwi.mask if dwi.mask is not None else brain_mask(dwi.mean_b0(), _voxel_size(dwi))
    mask = np.asarray(mask, dtype=bool)
    main = state is None or state.is_main_process

    # The output holds every input volume anyway: read each once, in file
    # order (one pass through a .nii.gz), and sample from memory rather than
    # decompressing the file again for every slice. Synthesised volumes are
    # written straight into its tail (zero outside the mask), never copied.
    n_in, n_t = dwi.n_volumes, len(targets)
    out = np.zeros(dwi.shape[:3] + (n_in + (n_t if main else 0),), dtype=np.float32)
    for k in range(n_in):
        out[..., k] = dwi.volume(k)
    # The volumes extract_shell keeps; a single-shell series is one range, so a view, not a copy.
    keep = np.union1d(dwi.b0_indices, shell_indices(dwi.bvals, shell, b0_threshold=dwi.b0_threshold))
    shell_data = out[..., keep[0] : keep[-1] + 1] if np.all(np.diff(keep) == 1) else out[..., keep]

    upsampler = QID2Upsampler(
        pipeline,
        num_inference_steps=num_inference_steps,
        num_samples=num_samples,
        batch_size=batch_size or auto_batch_size(pipeline, mask, num_samples),
        seed=seed,
        progress=progress and main,
    )
    want_std = num_samples > 1

    def predict(indices):
        """Predictions ``(indices, volumes or None if written into out, std)`` of a contiguous run of targets."""
        if not indices:
            return indices, None, None
        into = out[..., n_in + indices[0] : n_in + indices[-1] + 1] if main else None
        result = upsampler.predict(shell_data, sub.bvals, sub.bvecs, targets[indices], mask,
                                   target_indices=indices, return_std=want_std, out=into)
        pred, std = result if want_std else (result, None)
        return indices, None if main else pred, std

    everything = list(range(n_t))
    if state is None or state.num_processes == 1:
        parts = [predict(everything)]
    else:
        from accelerate.utils import gather_object

        with state.split_between_processes(everything) as mine:
            part = predict(list(mine))
        parts = gather_object([part])
        if not main:
            return None

    std = None
    if want_std:
        std = parts[0][2] if len(parts) == 1 else np.zeros(dwi.shape[:3] + (n_t,), dtype=np.float32)
    for indices, pred, part_std in parts:
        if pred is not None:
            out[..., n_in + np.asarray(indices)] = pred
        if want_std and len(parts) > 1 and indices:
            std[..., indices] = part_std
    b = float(np.median(sub.bvals[dw]))
    return UpsampleResult(
        data=out,
        bvals=np.concatenate([dwi.bvals, np.full(n_t, b)]),
        bvecs=np.concatenate([dwi.bvecs, targets]),
        n_input=n_in,
        mask=mask,
        std=std,
    )


def _voxel_size(dwi):
    return dwi.header.get_zooms()[:3] if dwi.header is not None else None
