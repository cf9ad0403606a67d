"""What the benchmark scores: a case is one shell of one scan, its mask and its kept/target split.

Held-out phantom subjects (:func:`phantom_case`) and real scans
(:func:`real_benchmark_case`) become the same :class:`BenchmarkCase`, so one
engine (:func:`~qid2_diffusers.evaluation.benchmark.run_benchmark`) predicts
and scores both: the shell's directions are split into kept and target ones
(:func:`~qid2_diffusers.data.io.split_acquired`), every method predicts the
targets from b0 + kept, and
:class:`~qid2_diffusers.evaluation.SubjectEvaluation` scores the prediction
against the full acquisition of the shell (and a phantom's noise-free truth).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Callable

import numpy as np

from ..data.io import DWI, extract_shell, split_acquired
from ..data.phantom import load_truth
from ..data.real import kept_count
from ..errors import QID2InputError
from .metrics import HIGH_B
from .protocol import SubjectEvaluation

__all__ = ["FIGURE_MIN_INPLANE", "BenchmarkCase", "CaseSource", "phantom_case", "real_benchmark_case"]

#: Real cases at least this many voxels across in-plane get FA-map figures; the MRtrix3 crops (15 and 6) do not.
FIGURE_MIN_INPLANE = 32


@dataclass
class BenchmarkCase:
    """One shell of one scan, ready to be up-sampled and scored.

    Args:
        name (`str`): row label: the subject id of a phantom, e.g. ``"mdt-b2000"`` for a real scan.
        path (`str` or `Path`): the file that error messages name.
        shell ([`~qid2_diffusers.data.io.DWI`]): the b0 volumes and the shell, loaded into memory.
        mask (`np.ndarray` of shape `(X, Y, Z)`): voxels every metric is taken in.
        n_acquired (`int`): directions kept as the acquisition (a uniform subset); the rest are targets.
        truth (`np.ndarray` of shape `(X, Y, Z, N)`, *optional*): noise-free signal on the shell's scheme (phantoms).
        mask_note (`str`, *optional*): where the mask came from, for the report's notes.
        source (`str`, *optional*): provenance, one line.
        figures (`bool`, *optional*, defaults to `False`): draw this case's FA maps.
        denoised_reference (`bool`, *optional*, defaults to `False`): also score against the MP-PCA-denoised
            full acquisition (real scans: the reference a practitioner who denoises would trust).
    """

    name: str
    path: str | Path
    shell: DWI
    mask: np.ndarray
    n_acquired: int
    truth: np.ndarray | None = None
    mask_note: str | None = None
    source: str | None = None
    figures: bool = False
    denoised_reference: bool = False
    #: denoiser -> the one-line note of what it did to this case's kept series (:meth:`kept_data`).
    denoise_notes: dict = field(default_factory=dict, init=False, repr=False)
    _kept: dict = field(default_factory=dict, init=False, repr=False)

    @property
    def bval(self) -> float:
        """b-value of the shell (median of its diffusion-weighted volumes)."""
        return float(np.median(self.shell.bvals[self.dw]))

    @cached_property
    def data(self) -> np.ndarray:
        return np.asarray(self.shell.data, dtype=np.float32)

    @cached_property
    def dw(self) -> np.ndarray:
        return np.setdiff1d(np.arange(self.shell.n_volumes), self.shell.b0_indices)

    @cached_property
    def split(self) -> tuple[np.ndarray, np.ndarray]:
        """``(acquired, targets)``: volume indices (into :attr:`shell`) of the kept and the target directions."""
        try:
            acquired, targets = split_acquired(self.shell.bvecs[self.dw], self.n_acquired)
        except ValueError as exc:
            raise QID2InputError(self.path, str(exc)) from None
        if len(targets) == 0:
            raise QID2InputError(self.path, f"all {len(self.dw)} directions of the b={self.bval:g} shell would be "
                                            "acquired")
        return self.dw[acquired], self.dw[targets]

    @property
    def acquired(self) -> np.ndarray:
        return self.split[0]

    @property
    def low(self) -> np.ndarray:
        """Volumes the methods see: every b0 and the kept directions, in acquisition order."""
        return np.sort(np.r_[self.shell.b0_indices, self.acquired])

    @property
    def targets(self) -> np.ndarray:
        """Target directions ``(T, 3)``."""
        return self.shell.bvecs[self.split[1]]

    def kept_data(self, denoiser: str | None = None) -> np.ndarray:
        """The volumes the methods see (:attr:`low`: b0s and kept directions), denoised first by
        ``denoiser`` (:func:`~qid2_diffusers.denoise.denoise_series`) unless it is `None` or ``"none"``."""
        from ..denoise import denoise_series

        if denoiser in (None, "none"):
            return self.data[..., self.low]
        if denoiser not in self._kept:
            result = denoise_series(self.data[..., self.low], self.shell.bvals[self.low], denoiser, mask=self.mask,
                                    b0_threshold=self.shell.b0_threshold, what=f"{self.name}'s kept series")
            self._kept[denoiser] = result.data
            self.denoise_notes[denoiser] = result.plan.note
        return self._kept[denoiser]

    @cached_property
    def evaluation(self) -> SubjectEvaluation:
        """Scores predictions against the full shell; high-b measures from b >= :data:`~.metrics.HIGH_B`."""
        denoised = None
        if self.denoised_reference:
            from ..denoise import denoise_series

            denoised = denoise_series(self.data, self.shell.bvals, "mppca", mask=self.mask,
                                      b0_threshold=self.shell.b0_threshold).data
        return SubjectEvaluation(self.data, self.shell.bvals, self.shell.bvecs, self.mask, truth=self.truth,
                                 denoised=denoised, high_b=self.bval >= HIGH_B)

    def describe(self) -> dict:
        """The case as ``results.json`` records it."""
        return {
            "source": self.source or str(self.path),
            "shell": self.bval,
            "shape": list(self.data.shape[:3]),
            "n_b0": int(len(self.shell.b0_indices)),
            "n_directions": int(len(self.dw)),
            "n_acquired": int(len(self.acquired)),
            "n_targets": int(len(self.targets)),
            "acquired_volumes": self.acquired.tolist(),
            "mask_voxels": int(self.mask.sum()),
            "mask": self.mask_note,
            "denoise": self.denoise_notes,
        }


@dataclass(frozen=True)
class CaseSource:
    """A case not yet read: its name (known up front, for checks and progress) and how to load it."""

    name: str
    load: Callable[[], BenchmarkCase]


def _truth_signal(subject, dwi: DWI, shell: float):
    """The phantom's noise-free signal on the subject's shell, or ``None`` for real data."""
    subject_dir = Path(subject.dwi).parents[2] if subject.layout == "hcp" else None
    if subject_dir is None or not (subject_dir / "truth").is_dir():
        return None
    signal = load_truth(subject_dir)["signal"]
    noise_free = DWI(
        data=np.asarray(signal), bvals=dwi.bvals, bvecs=dwi.bvecs, affine=dwi.affine, path=str(subject_dir)
    )
    return np.asarray(extract_shell(noise_free, shell).data, dtype=np.float32)


def phantom_case(subject, shell: float, n_acquired: int, *, figures: bool = False) -> BenchmarkCase:
    """A held-out subject (HCP or BIDS layout, e.g. ``qid2 phantom`` output) as a case; it must have a mask.

    Args:
        subject ([`~qid2_diffusers.data.layouts.SubjectPaths`]): the subject.
        shell (`float`): b-value of the shell to up-sample.
        n_acquired (`int`): directions kept.
        figures (`bool`, *optional*, defaults to `False`): draw its figures.
    """
    dwi = subject.load()
    if dwi.mask is None:
        raise QID2InputError(subject.dwi, "no brain mask found beside it; every metric is taken inside the mask")
    return BenchmarkCase(
        name=subject.subject_id,
        path=subject.dwi,
        shell=_loaded(extract_shell(dwi, shell)),
        mask=dwi.mask,
        n_acquired=n_acquired,
        truth=_truth_signal(subject, dwi, shell),
        figures=figures,
    )


def _loaded(dwi: DWI) -> DWI:
    return DWI(data=np.asarray(dwi.data, dtype=np.float32), bvals=dwi.bvals, bvecs=dwi.bvecs, affine=dwi.affine,
               header=dwi.header, mask=dwi.mask, path=dwi.path, b0_threshold=dwi.b0_threshold)


def real_benchmark_case(case) -> BenchmarkCase:
    """A real scan's shell (:class:`~qid2_diffusers.data.real.RealCase`) as a case.

    Keeps :func:`~qid2_diffusers.data.real.kept_count` of the shell's
    directions. A scan without a mask of its own is one of the small crops
    taken inside the brain: every voxel with signal is scored. (median_otsu on
    a crop that is almost all brain keeps its grey matter and CSF and drops the
    white matter, where FA errors matter most.) The mask note says which.
    """
    dwi = case.load()
    shell = _loaded(extract_shell(dwi, case.shell))
    n_directions = shell.n_volumes - len(shell.b0_indices)
    mask = dwi.mask
    if mask is not None:
        note = f"the scan's own mask ({Path(case.mask).name}, {int(mask.sum())} voxels)"
    else:
        mask = shell.data[..., shell.b0_indices].mean(axis=-1) > 0
        note = f"a crop inside the brain, no mask of its own: every voxel with signal ({int(mask.sum())} of {mask.size})"
    return BenchmarkCase(
        name=case.name,
        path=case.dwi,
        shell=shell,
        mask=np.asarray(mask, dtype=bool),
        n_acquired=kept_count(n_directions),
        mask_note=note,
        source=case.source,
        figures=min(shell.data.shape[:2]) >= FIGURE_MIN_INPLANE,
        denoised_reference=True,
    )
