"""Training data: the subject split, slice caches, the loader, and the resumable
order of batches.

Reproducibility contract (what makes a killed-and-resumed run end with the
same weights as an uninterrupted one): the data order is a function of
``(seed, epoch)`` only (:class:`EpochSampler`, plus the dataset's own
``(seed, epoch, index)`` augmentation), a resumed epoch skips exactly the
batches already consumed (:func:`batches`), and every random draw of a
training step comes from :func:`step_generator`, seeded by
``(seed, epoch, batch, process)``.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from ..data.dataset import QID2Dataset, build_cache, collate_slices
from ..data.layouts import discover_subjects
from ..errors import QID2InputError
from ..pipelines.training_utils import random_crops
from .config import dataloader_workers

__all__ = [
    "EpochSampler",
    "TrainingData",
    "Schedule",
    "split_subjects",
    "describe_data",
    "card_path",
    "load_training_data",
    "make_schedule",
    "batches",
    "step_generator",
]


class EpochSampler(Sampler):
    """A permutation of the dataset that depends only on ``(seed, epoch)``.

    Unlike a ``RandomSampler`` drawing from the global RNG, it gives the same
    order in a resumed run as in an uninterrupted one.
    """

    def __init__(self, num_samples: int, seed: int):
        self.num_samples = int(num_samples)
        self.seed = int(seed)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __iter__(self):
        rng = np.random.default_rng((self.seed, self.epoch))
        return iter(rng.permutation(self.num_samples).tolist())

    def __len__(self) -> int:
        return self.num_samples


@dataclass
class TrainingData:
    """The training set, its loader, and the held-out subjects.

    Build it from any map-style dataset of :class:`~qid2_diffusers.data.dataset.QID2Dataset`
    batches with :meth:`from_dataset` (an in-memory set for fine-tuning on one
    scan), or from ``--data_dir`` with :func:`load_training_data`.
    """

    dataset: Dataset
    sampler: EpochSampler
    dataloader: DataLoader
    train_ids: list
    validation_subjects: list = field(default_factory=list)
    description: str = "in-memory dataset"

    @classmethod
    def from_dataset(cls, dataset: Dataset, args, num_processes: int = 1, *, source=None, **kwargs) -> "TrainingData":
        """The loader of ``dataset``: :class:`EpochSampler` order, whole batches of ``--train_batch_size``.

        Args:
            dataset (`torch.utils.data.Dataset`): samples as dicts of tensors; a
                ``set_epoch(epoch)`` method, if it has one, is called every epoch.
            args: ``train_batch_size``, ``seed``, ``dataloader_num_workers``.
            num_processes (`int`, *optional*, defaults to 1): processes sharing each step.
            source (*optional*): what to name in the error when the dataset is
                smaller than one step's batches (defaults to ``--data_dir``).
            kwargs: the other fields (``train_ids``, ``validation_subjects``, ``description``).
        """
        per_step = args.train_batch_size * num_processes
        if len(dataset) < per_step:
            raise QID2InputError(
                source or args.data_dir,
                f"{len(dataset)} training samples, fewer than one batch of {args.train_batch_size} x {num_processes} process(es)",
            )
        sampler = EpochSampler(len(dataset), args.seed)
        workers = dataloader_workers(args)
        dataloader = DataLoader(
            dataset,
            batch_size=args.train_batch_size,
            sampler=sampler,
            num_workers=workers,
            drop_last=True,
            collate_fn=collate_slices,
            pin_memory=torch.cuda.is_available(),
            # Not persistent: each epoch's workers get a fresh copy of the dataset
            # carrying its set_epoch (the augmentation draw depends on it).
            persistent_workers=False,
            prefetch_factor=4 if workers else None,
        )
        kwargs.setdefault("train_ids", [])
        return cls(dataset=dataset, sampler=sampler, dataloader=dataloader, **kwargs)

    def set_epoch(self, epoch: int) -> None:
        # Set on the sampler and dataset directly: which of the two accelerate
        # forwards set_epoch to depends on how it wrapped the loader.
        self.sampler.set_epoch(epoch)
        if hasattr(self.dataset, "set_epoch"):
            self.dataset.set_epoch(epoch)


def split_subjects(args):
    """Training and held-out subjects (:func:`~qid2_diffusers.data.layouts.discover_subjects`)."""
    subjects = discover_subjects(args.data_dir)
    if args.validation_data_dir:
        return subjects, discover_subjects(args.validation_data_dir)
    n_val = max(0, int(args.num_validation_subjects))
    if n_val >= len(subjects):
        raise QID2InputError(
            args.data_dir, f"{len(subjects)} subject(s) found; cannot hold out {n_val} for validation and still train "
            "(pass --num_validation_subjects 0 or --validation_data_dir)"
        )
    return subjects[: len(subjects) - n_val], subjects[len(subjects) - n_val :]


def card_path(path) -> str:
    """A folder as a model card names it: as typed when relative, else relative to the working
    folder when inside it, else by its name. An absolute path of the training machine tells a
    reader nothing they can rerun, and says where the machine keeps its files."""
    path = Path(path)
    if not path.is_absolute():
        return str(path)
    try:
        return str(path.resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return path.name


def describe_data(args, train_subjects) -> str:
    """What the training data is, for the model card: ``--data_description`` or detected."""
    if args.data_description:
        return args.data_description
    # `qid2 phantom` stores each subject's noise-free truth beside its data.
    phantom = all((Path(s.dwi).parents[2] / "truth").is_dir() for s in train_subjects if s.layout == "hcp")
    kind = "synthetic brain-like phantom cohort (`qid2 phantom`)" if phantom and train_subjects[0].layout == "hcp" else "DWI data"
    text = f"{kind}: {len(train_subjects)} subject(s) from `{card_path(args.data_dir)}`"
    if getattr(args, "denoise", "none") != "none":
        text += f"; b0s and kept directions denoised with `{args.denoise}` first (`--denoise`), as at inference"
    if getattr(args, "target", "acquisition") == "truth":
        text += "; targets: the phantoms' noise-free signal (`--target truth`)"
    return text


def load_training_data(args, accelerator) -> TrainingData:
    """Discover subjects, build their caches (main process first) and the training loader."""
    from concurrent.futures import ThreadPoolExecutor

    train_subjects, validation_subjects = split_subjects(args)
    with accelerator.main_process_first():
        # Threads: decompressing NIfTI releases the GIL, and a cohort is cached in a fraction of the time.
        # One cache per subject, shell and kept-direction count.
        jobs = [(s, b, n) for s in train_subjects for b in args.shells for n in args.n_acquired]
        prior = getattr(args, "physics_prior", False)
        with ThreadPoolExecutor(max_workers=min(len(jobs), os.cpu_count() or 1, 8)) as pool:
            caches = list(pool.map(
                lambda job: build_cache(job[0], args.cache_dir, shell=job[1], n_acquired=job[2], prior=prior,
                                        denoise=getattr(args, "denoise", "none"),
                                        target=getattr(args, "target", "acquisition")), jobs
            ))
    dataset = QID2Dataset(caches, num_references=args.R, augment=args.augment, seed=args.seed, physics_prior=prior)
    return TrainingData.from_dataset(
        dataset, args, accelerator.num_processes,
        train_ids=[s.subject_id for s in train_subjects],
        validation_subjects=validation_subjects,
        description=describe_data(args, train_subjects),
    )


@dataclass
class Schedule:
    """Step bookkeeping: optimiser updates per epoch, the step budget, the epochs it spans."""

    updates_per_epoch: int
    max_train_steps: int
    num_epochs: int


def make_schedule(args, dataloader) -> Schedule:
    """Steps and epochs from ``--max_train_steps`` / ``--num_epochs`` (call after ``prepare``)."""
    per_epoch = math.ceil(len(dataloader) / args.gradient_accumulation_steps)
    max_steps = args.max_train_steps if args.max_train_steps is not None else args.num_epochs * per_epoch
    return Schedule(per_epoch, int(max_steps), math.ceil(max_steps / per_epoch))


def batches(accelerator, data: TrainingData, dataloader, schedule: Schedule, global_step: int, args):
    """Yield ``(epoch, batch_index, batch)`` from ``global_step`` on, skipping what a resumed run already consumed."""
    first_epoch = global_step // schedule.updates_per_epoch
    skip = (global_step % schedule.updates_per_epoch) * args.gradient_accumulation_steps
    for epoch in range(first_epoch, schedule.num_epochs):
        data.set_epoch(epoch)
        loader = dataloader
        offset = 0
        if epoch == first_epoch and skip:
            loader = accelerator.skip_first_batches(dataloader, skip)
            offset = skip
        loader.set_epoch(epoch)
        for i, batch in enumerate(loader):
            yield epoch, offset + i, batch


def step_generator(seed: int, epoch: int, batch_index: int, process_index: int) -> torch.Generator:
    """The CPU generator for every random draw of one training batch (crops, noise, timesteps)."""
    state = np.random.SeedSequence([seed, epoch, batch_index, process_index]).generate_state(1, dtype=np.uint64)
    return torch.Generator().manual_seed(int(state[0]))


