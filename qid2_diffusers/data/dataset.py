"""Training samples: a target slice, its R nearest acquired slices and their directions.

Decoding a NIfTI per sample would starve the GPU, so each subject is first
preprocessed by :func:`build_cache` into one memory-mapped float16 array
holding, slice by slice, every volume of one shell (and, for models with a
physics prior, the tensor-fit prediction of every target from the kept
directions, and the mean b0). :class:`QID2Dataset` then reads ``R + 1``
contiguous planes per sample.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import uuid
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from ..directions import nearest_references
from ..errors import QID2InputError
from ..image_processor import QID2ImageProcessor
from ..tensor import TensorPrior
from .augment import rotate_bvecs, warp_slices
from .io import DWI, bvec_voxel_signs, check_enough_directions, nifti_stem, shell_indices, split_acquired
from .layouts import SubjectPaths

__all__ = ["build_cache", "QID2Dataset", "collate_slices", "CACHE_VERSION", "TARGETS"]

#: Bumped whenever the cache format changes, so stale caches are rebuilt.
CACHE_VERSION = 2

_SLICES, _MASK, _META = "slices.npy", "mask.npy", "meta.json"
_PRIOR, _MEAN_B0 = "prior.npy", "mean_b0.npy"
_FLOAT16_MAX = float(np.finfo(np.float16).max)
#: What a cache's target directions hold: the acquisition (noisy, as a user's data) or, for
#: ``qid2 phantom`` subjects, the noise-free signal beside it.
TARGETS = ("acquisition", "truth")


def _fingerprint(dwi: DWI) -> dict:
    """What the cache was built from: the file's identity and a hash of the scheme and mask."""
    digest = hashlib.sha1(repr(dwi.shape).encode())
    # In-memory data has no file to date, so its content is hashed; a lazy
    # selection of a file's volumes is told apart by its indices.
    parts = [dwi.bvals, dwi.bvecs, dwi.mask, getattr(dwi.data, "indices", None)]
    if isinstance(dwi.data, np.ndarray):
        parts.append(dwi.data)
    for part in parts:
        if part is not None:
            digest.update(np.ascontiguousarray(part).tobytes())
    path = None
    if dwi.path is not None:
        stat = Path(dwi.path).stat()
        path = [str(Path(dwi.path).resolve()), stat.st_size, stat.st_mtime_ns]
    return {"sha1": digest.hexdigest(), "path": path}


def _read_meta(folder: Path) -> dict | None:
    try:
        return json.loads((folder / _META).read_text())
    except (OSError, ValueError):
        return None


def _brain_mask(dwi: DWI, mean_b0: np.ndarray) -> np.ndarray:
    if dwi.mask is not None:
        return dwi.mask
    from ..masking import brain_mask

    return brain_mask(mean_b0, dwi.header.get_zooms()[:3] if dwi.header is not None else None)


def build_cache(
    subject: SubjectPaths | DWI,
    cache_dir,
    *,
    shell: float = 1000,
    n_acquired: int = 30,
    axis: int = 2,
    subject_id: str | None = None,
    prior: bool = False,
    denoise: str = "none",
    target: str = "acquisition",
) -> Path:
    """Preprocess one subject into a memory-mapped training cache (reused when up to date).

    The cache is a folder ``<cache_dir>/<subject>_b<shell>_acq<n>_axis<axis>`` with

    - ``slices.npy``: float16 ``(n_slices, N_shell, H, W)``, slices across
      voxel axis ``axis``, every volume of the shell (no b0), in units of
      ``meta["unit"]`` (a power of two, 1 unless the data would overflow float16);
    - ``mask.npy``: uint8 ``(n_slices, H, W)`` brain mask (the subject's, or
      :func:`~qid2_diffusers.masking.brain_mask` of the mean b0);
    - ``meta.json``: parameters, source fingerprint, the shell's bvals and
      bvecs, the acquired/target split (:func:`~qid2_diffusers.data.io.split_acquired`),
      the slices containing brain and the b-vector voxel signs;
    - with ``prior``: ``prior.npy``, float16 ``(n_slices, n_targets, H, W)``,
      the tensor fit of b0 + the acquired directions (never a target)
      predicted at each target (:class:`~qid2_diffusers.tensor.TensorPrior`),
      and ``mean_b0.npy``, float16 ``(n_slices, H, W)``, same unit.

    It is written under a temporary name and renamed, so an interrupted build
    never leaves a cache that looks valid.

    Args:
        subject (`SubjectPaths` or `DWI`): the subject.
        cache_dir (`str` or `os.PathLike`): parent folder of the caches.
        shell (`float`, *optional*, defaults to 1000): b-value of the shell.
        n_acquired (`int`, *optional*, defaults to 30): directions kept as acquired.
        axis (`int`, *optional*, defaults to 2): voxel axis across which slices are cut (2: axial).
        subject_id (`str`, *optional*): cache name; defaults to the subject's id
            or the image file's stem.
        prior (`bool`, *optional*, defaults to `False`): also store the physics prior.
        denoise (`str`, *optional*, defaults to `"none"`): one of :data:`~qid2_diffusers.denoise.DENOISERS`.
            The b0s and the kept directions are denoised together, as ``qid2 upsample --denoise``
            denoises what a scan acquired (the targets never take part: at inference they do not
            exist), and the kept directions and the prior come from the denoised series.
        target (`str`, *optional*, defaults to `"acquisition"`): one of :data:`TARGETS`; ``"truth"``
            stores the noise-free signal of a ``qid2 phantom`` subject at the target directions.

    Returns:
        `Path`: the cache folder, to pass to :class:`QID2Dataset`.
    """
    if axis not in (0, 1, 2):
        raise ValueError(f"axis must be 0, 1 or 2, got {axis}")
    if isinstance(subject, SubjectPaths):
        subject_id = subject_id or subject.subject_id
        dwi = subject.load()
    else:
        dwi = subject
        subject_id = subject_id or (nifti_stem(dwi.path) if dwi.path else "subject")
    params = {
        "version": CACHE_VERSION,
        "shell": float(shell),
        "n_acquired": int(n_acquired),
        "axis": int(axis),
        "prior": bool(prior),
        "source": _fingerprint(dwi),
    }
    if denoise != "none":
        from ..denoise import check_denoiser

        check_denoiser(denoise)
        params["denoise"] = denoise  # only when used: caches of raw data keep their key
    if target not in TARGETS:
        raise ValueError(f"target must be one of {TARGETS}, got {target!r}")
    truth = None
    if target == "truth":
        truth = _truth_signal(subject, dwi)
        params["target"] = target
    if dwi.mask is None:
        # Which computed mask the cache holds: caches from an older mask rule are rebuilt, given masks' are kept.
        params["mask"] = "brain_mask"
    cache_dir = Path(cache_dir)
    stem = f"{subject_id}_b{shell:g}_acq{n_acquired}_axis{axis}"
    stem += (f"_{denoise}" if denoise != "none" else "") + ("_truth" if truth is not None else "")
    folder = cache_dir / f"{stem}{'_prior' if prior else ''}"
    if _cache_matches(folder, params):
        return folder
    # A cache with the prior holds everything one without it does (the same
    # slices, split and mask): models without a prior read it as it is.
    if not prior and _cache_matches(cache_dir / f"{stem}_prior", {**params, "prior": True}):
        return cache_dir / f"{stem}_prior"

    members = shell_indices(dwi.bvals, shell, b0_threshold=dwi.b0_threshold, path=dwi.path)
    if n_acquired > len(members):
        raise QID2InputError(
            dwi.path, f"the b={shell:g} shell has {len(members)} directions; cannot keep {n_acquired} as acquired"
        )
    shell_bvecs = dwi.bvecs[members]
    acquired, targets = split_acquired(shell_bvecs, n_acquired)

    spatial = dwi.shape[:3]
    n_slices = spatial[axis]
    plane = tuple(s for d, s in enumerate(spatial) if d != axis)
    b0 = dwi.b0_indices
    tmp = cache_dir / f".{folder.name}.{uuid.uuid4().hex[:12]}.tmp"
    tmp.mkdir(parents=True)
    try:
        slices = np.lib.format.open_memmap(
            tmp / _SLICES, mode="w+", dtype=np.float16, shape=(n_slices, len(members), *plane)
        )
        column = {int(k): j for j, k in enumerate(members)}
        is_b0 = set(b0.tolist())
        b0_sum = np.zeros(spatial, dtype=np.float64)
        # b0s + acquired directions, in memory, for the prior's tensor fit and the denoiser.
        keep = prior or denoise != "none"
        fit_volumes = np.concatenate([b0, members[acquired]]) if keep else np.array([], dtype=np.intp)
        fit_column = {int(k): j for j, k in enumerate(fit_volumes)}
        fit_data = np.zeros(spatial + (len(fit_volumes),), dtype=np.float32) if keep else None
        target_volumes = set(members[targets].tolist())
        unit = None
        # One pass in file order: a .nii.gz is a stream, and going back means
        # decompressing from the start again.
        for k in np.union1d(b0, members):
            vol = np.nan_to_num(dwi.volume(k), nan=0.0, posinf=0.0, neginf=0.0)
            if unit is None:
                # The first volume (a b0 in practically every scheme) is the
                # brightest; 8x headroom, a power of two so float16 keeps its
                # relative precision.
                peak = float(np.abs(vol).max()) * 8.0
                unit = float(2.0 ** max(0, int(np.ceil(np.log2(max(peak, 1.0) / _FLOAT16_MAX)))))
            if int(k) in is_b0:
                b0_sum += vol
            if int(k) in fit_column:
                fit_data[..., fit_column[int(k)]] = vol
            if int(k) in column:
                if truth is not None and int(k) in target_volumes:
                    vol = np.asarray(truth[..., int(k)], dtype=np.float32)
                slices[:, column[int(k)]] = np.clip(np.moveaxis(vol, axis, 0) / unit, -_FLOAT16_MAX, _FLOAT16_MAX)
        brain = np.asarray(_brain_mask(dwi, (b0_sum / len(b0)).astype(np.float32)), dtype=bool)
        if denoise != "none":
            from ..denoise import denoise_series

            fit_data = denoise_series(fit_data, dwi.bvals[fit_volumes], denoise, mask=brain, out=fit_data,
                                      b0_threshold=dwi.b0_threshold, what=f"{subject_id} (b0 + {len(acquired)} kept at b={shell:g})").data
            for j, k in enumerate(members[acquired]):
                slices[:, column[int(k)]] = np.clip(np.moveaxis(fit_data[..., fit_column[int(k)]], axis, 0) / unit,
                                                    -_FLOAT16_MAX, _FLOAT16_MAX)
        slices.flush()
        del slices
        mask = np.moveaxis(brain, axis, 0).astype(np.uint8)
        np.save(tmp / _MASK, np.ascontiguousarray(mask))
        if prior:
            _write_prior(tmp, fit_data, dwi.bvals[fit_volumes], dwi.bvecs[fit_volumes], brain, shell_bvecs[targets],
                         axis, unit)
        meta = {
            "params": params,
            "subject_id": subject_id,
            "shell_bvals": dwi.bvals[members].tolist(),
            "shell_bvecs": shell_bvecs.tolist(),
            "volume_indices": members.tolist(),
            "acquired": acquired.tolist(),
            "targets": targets.tolist(),
            "brain_slices": np.flatnonzero(mask.reshape(n_slices, -1).any(axis=1)).tolist(),
            "unit": unit,
            "voxel_signs": bvec_voxel_signs(dwi.affine).tolist(),
            "affine": np.asarray(dwi.affine).tolist(),
        }
        (tmp / _META).write_text(json.dumps(meta))
        # Several training processes may build the same cache at once: the
        # first to finish wins, the others keep its folder; a stale cache is
        # moved aside in one rename, so no reader ever sees a half-replaced one.
        if not _cache_matches(folder, params):
            if folder.exists():
                stale = cache_dir / f".{folder.name}.{uuid.uuid4().hex[:12]}.stale"
                os.replace(folder, stale)
                shutil.rmtree(stale, ignore_errors=True)
            try:
                os.replace(tmp, folder)
            except OSError:
                if not _cache_matches(folder, params):
                    raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return folder


def _truth_signal(subject, dwi: DWI):
    """The noise-free series of a ``qid2 phantom`` subject (lazy, read volume by volume), checked against the data."""
    import nibabel as nib

    from .phantom.writing import truth_file

    if not isinstance(subject, SubjectPaths):
        raise QID2InputError(dwi.path, "target 'truth' needs a subject folder written by `qid2 phantom`")
    path = truth_file(Path(subject.dwi).parents[2], "signal")
    if not path.is_file():
        raise QID2InputError(path, "file not found: target 'truth' needs a `qid2 phantom` subject")
    truth = nib.load(path).dataobj
    if tuple(truth.shape) != dwi.shape:
        raise QID2InputError(path, f"shape {tuple(truth.shape)} does not match the data's {dwi.shape}")
    return truth


def _write_prior(folder: Path, fit_data, bvals, bvecs, mask, target_bvecs, axis: int, unit: float) -> None:
    """``prior.npy`` and ``mean_b0.npy`` of a cache (see :func:`build_cache`)."""
    fit = TensorPrior(fit_data, bvals, bvecs, mask)
    n_slices = fit_data.shape[axis]
    plane = tuple(s for d, s in enumerate(fit_data.shape[:3]) if d != axis)
    out = np.lib.format.open_memmap(folder / _PRIOR, mode="w+", dtype=np.float16,
                                    shape=(n_slices, len(target_bvecs), *plane))
    for z in range(n_slices):
        index = tuple(z if d == axis else slice(None) for d in range(3))
        out[z] = np.clip(np.moveaxis(fit.predict(target_bvecs, index), -1, 0) / unit, 0, _FLOAT16_MAX)
    out.flush()
    del out
    np.save(folder / _MEAN_B0, np.clip(np.moveaxis(fit.mean_b0, axis, 0) / unit, 0, _FLOAT16_MAX).astype(np.float16))


def _cache_matches(folder: Path, params: dict) -> bool:
    existing = _read_meta(folder)
    return existing is not None and existing.get("params") == params


class _Subject:
    """One cache folder, its metadata and per-target reference choice."""

    def __init__(self, folder: Path, num_references: int):
        meta = _read_meta(folder)
        if meta is None or meta.get("params", {}).get("version") != CACHE_VERSION:
            raise QID2InputError(folder, "not a QID2 training cache (run build_cache)")
        self.folder = folder
        self.axis = meta["params"]["axis"]
        self.unit = float(meta["unit"])
        self.voxel_signs = np.asarray(meta["voxel_signs"])
        self.bvecs = np.asarray(meta["shell_bvecs"], dtype=np.float64)
        self.bvals = np.asarray(meta["shell_bvals"], dtype=np.float64)
        self.has_prior = bool(meta["params"].get("prior", False))
        acquired = np.asarray(meta["acquired"], dtype=np.intp)
        self.targets = np.asarray(meta["targets"], dtype=np.intp)
        check_enough_directions(len(acquired), num_references, folder)
        # References come from the acquired directions only: at inference the
        # others do not exist.
        self.references = acquired[nearest_references(self.bvecs[self.targets], self.bvecs[acquired], num_references)]
        self.brain_slices = np.asarray(meta["brain_slices"], dtype=np.intp)
        self.n_samples = len(self.brain_slices) * len(self.targets)
        self._slices = self._mask = self._prior = self._mean_b0 = None

    def arrays(self):
        # Opened on first use, in the process that reads: DataLoader workers
        # then map the file themselves instead of receiving a pickled copy.
        if self._slices is None:
            self._slices = np.load(self.folder / _SLICES, mmap_mode="r")
            self._mask = torch.from_numpy(np.load(self.folder / _MASK))
            if self.has_prior:
                self._prior = np.load(self.folder / _PRIOR, mmap_mode="r")
                self._mean_b0 = np.load(self.folder / _MEAN_B0, mmap_mode="r")
        return self._slices, self._mask

    def conditions(self, z: int, t: int) -> np.ndarray:
        """The prior of target ``t`` (position in :attr:`targets`) and the mean b0 of slice ``z``, ``(2, H, W)``."""
        self.arrays()
        return np.stack([self._prior[z, t], self._mean_b0[z]])

    def __getstate__(self):
        return {**self.__dict__, "_slices": None, "_mask": None, "_prior": None, "_mean_b0": None}


class QID2Dataset(Dataset):
    """Samples for training an up-sampler: every target direction x every slice with brain.

    Each item is a dict of float32 tensors:

    - ``target`` `(1, H, W)` and ``references`` `(R, H, W)`, normalised by
      :class:`~qid2_diffusers.image_processor.QID2ImageProcessor` with one
      scale taken from the references alone (padding is left to the model's processor);
    - ``scale`` `(1, 1, 1)`: that scale in the source's intensity units, so
      ``denormalize(x, scale)`` gives scanner units back;
    - ``target_bvec`` `(3,)` and ``reference_bvecs`` `(R, 3)`: the references
      are the R acquired directions nearest the target
      (:func:`~qid2_diffusers.directions.nearest_references`);
    - ``mask`` `(1, H, W)`: brain mask, 0 or 1;
    - ``target_bvals`` `()` and ``reference_bvals`` `(R,)`: b-values (s/mm²);
    - with ``physics_prior``: ``prior`` `(1, H, W)`, the tensor-fit prediction
      of the target from the kept directions, and ``b0`` `(1, H, W)`, the mean
      b0, normalised by the references' scale (caches built with ``prior=True``).

    With ``augment``, every item is rotated in-plane by an angle drawn
    uniformly in ``[-rotation_degrees, rotation_degrees]`` degrees and scaled by
    a factor in ``scale_range``, images, mask and b-vectors alike
    (:mod:`~qid2_diffusers.data.augment`). The draw depends only on
    ``(seed, epoch, index)``, so a run is reproducible whatever the workers.

    Args:
        cache_paths (`list` of `str` or `os.PathLike`): folders made by :func:`build_cache`.
        num_references (`int`, *optional*, defaults to 3): R.
        augment (`bool`, *optional*, defaults to `False`): random rotation and scaling.
        seed (`int`, *optional*, defaults to 0): augmentation seed.
        rotation_degrees (`float`, *optional*, defaults to 15.0): largest rotation, in degrees.
        scale_range (`tuple[float, float]`, *optional*, defaults to `(0.9, 1.1)`): zoom range.
        physics_prior (`bool`, *optional*, defaults to `False`): add ``prior`` and ``b0``.
    """

    def __init__(
        self,
        cache_paths,
        num_references: int = 3,
        *,
        augment: bool = False,
        seed: int = 0,
        rotation_degrees: float = 15.0,
        scale_range: tuple[float, float] = (0.9, 1.1),
        physics_prior: bool = False,
    ):
        if isinstance(cache_paths, (str, os.PathLike)):
            cache_paths = [cache_paths]
        self.subjects = [_Subject(Path(p), num_references) for p in cache_paths]
        if not self.subjects:
            raise ValueError("no cache folders given")
        self.physics_prior = bool(physics_prior)
        for subject in self.subjects:
            if self.physics_prior and not subject.has_prior:
                raise QID2InputError(subject.folder, "cache has no physics prior (build_cache(..., prior=True))")
        self.num_references = num_references
        self.augment = augment
        self.seed = int(seed)
        self.rotation_degrees = float(rotation_degrees)
        self.scale_range = (float(scale_range[0]), float(scale_range[1]))
        self.epoch = 0
        self._offsets = np.cumsum([0] + [s.n_samples for s in self.subjects])

    def set_epoch(self, epoch: int) -> None:
        """Draw fresh augmentations for a new epoch (call before creating the epoch's iterator)."""
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return int(self._offsets[-1])

    def _position(self, index: int) -> tuple[int, int, int]:
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} samples")
        s = int(np.searchsorted(self._offsets, index, side="right") - 1)
        slice_pos, t = divmod(int(index - self._offsets[s]), len(self.subjects[s].targets))
        return s, slice_pos, t

    def locate(self, index: int) -> tuple[int, int, int]:
        """``(subject, slice, target volume)`` of a sample: indices into the cache
        list, along the cache's slice axis, and into the shell's volumes."""
        s, slice_pos, t = self._position(index)
        subject = self.subjects[s]
        return s, int(subject.brain_slices[slice_pos]), int(subject.targets[t])

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        s, slice_pos, t = self._position(index)
        subject = self.subjects[s]
        z = subject.brain_slices[slice_pos]
        volumes = np.concatenate([subject.targets[t : t + 1], subject.references[t]])
        slices, masks = subject.arrays()
        # torch converts float16 several times faster than numpy's astype.
        images = torch.from_numpy(slices[z, volumes]).float()
        n_planes = len(volumes)
        if self.physics_prior:
            images = torch.cat([images, torch.from_numpy(subject.conditions(z, t)).float()])
        mask = masks[z][None].float()
        bvecs = subject.bvecs[volumes]
        if self.augment:
            rng = np.random.default_rng((self.seed, self.epoch, int(index)))
            angle = rng.uniform(-self.rotation_degrees, self.rotation_degrees)
            zoom = rng.uniform(*self.scale_range)
            images, mask = warp_slices(images, angle, zoom, mask=mask)
            bvecs = rotate_bvecs(bvecs, angle, axis=subject.axis, voxel_signs=subject.voxel_signs)
        scale = QID2ImageProcessor.scale(images[None, 1:n_planes])[0]
        images = QID2ImageProcessor.normalize(images, scale)
        bvecs = torch.from_numpy(bvecs.astype(np.float32))
        bvals = torch.from_numpy(subject.bvals[volumes].astype(np.float32))
        item = {
            "target": images[:1],
            "references": images[1:n_planes],
            "scale": scale * subject.unit,
            "target_bvec": bvecs[0],
            "reference_bvecs": bvecs[1:],
            "target_bvals": bvals[0],
            "reference_bvals": bvals[1:],
            "mask": mask,
        }
        if self.physics_prior:
            item["prior"] = images[n_planes : n_planes + 1]
            item["b0"] = images[n_planes + 1 :]
        return item


def collate_slices(items: list[dict]) -> dict:
    """Batch :class:`QID2Dataset` items whose slices may differ in size.

    Subjects of other voxel sizes (domain-randomised phantoms, cohorts from
    several scanners) have other slice sizes: each image is padded at its
    bottom and right to the largest in the batch, with the normalised value of
    no signal (-1) and, in the mask, with 0, so the loss never sees the padding.
    """
    from torch.utils.data import default_collate

    h = max(item["target"].shape[-2] for item in items)
    w = max(item["target"].shape[-1] for item in items)
    padded = []
    for item in items:
        size = item["target"].shape[-2:]
        pad = (0, w - size[1], 0, h - size[0])
        padded.append({
            k: torch.nn.functional.pad(v, pad, value=0.0 if k == "mask" else -1.0)
            if torch.is_tensor(v) and v.ndim == 3 and v.shape[-2:] == size and pad != (0, 0, 0, 0) else v
            for k, v in item.items()
        })
    return default_collate(padded)
