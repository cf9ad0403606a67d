"""What ``train_qid2.py`` and ``train_gan.py`` share: arguments, data, resumable
iteration, checkpoints, validation, and the files written at the end.

Reproducibility contract (what makes a killed-and-resumed run end with the
same weights as an uninterrupted one): the data order is a function of
``(seed, epoch)`` only (:class:`EpochSampler`, plus the dataset's own
``(seed, epoch, index)`` augmentation), a resumed epoch skips exactly the
batches already consumed, and every random draw of a training step comes
from :func:`step_generator`, seeded by ``(seed, epoch, batch, process)``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import re
import shlex
import shutil
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Sampler

from qid2_diffusers.baselines import DTIUpsampler, InterpUpsampler
from qid2_diffusers.data.dataset import QID2Dataset, build_cache
from qid2_diffusers.data.layouts import discover_subjects
from qid2_diffusers.directions import nearest_references
from qid2_diffusers.errors import QID2InputError
from qid2_diffusers.evaluation import SubjectEvaluation
from qid2_diffusers.upsampling import split_scheme

CONFIG_DIR = Path(__file__).resolve().parent / "configs"
REPO_ROOT = Path(__file__).resolve().parents[1]
MODEL_CARD_TEMPLATE = REPO_ROOT / "model_card.md"

#: Validation figures reported in logs, the summary and the model card, in this order.
VALIDATION_KEYS = ("ssim", "psnr", "nrmse", "fa_mae", "fa_ssim", "md_mae", "angular_error_deg")

#: Settings only one of the scripts takes: a config file may hold them and
#: the other script ignores them, so one YAML can drive QID² and the GANs.
SCRIPT_SPECIFIC = {
    "prediction_type", "inference_scheduler", "validation_num_inference_steps",  # train_qid2.py
    "model", "lambda_adversarial", "lambda_l1", "discriminator_update_interval",  # train_gan.py
}

_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")
_PLACEHOLDER = re.compile(r"\{\{\s*(\w+)\s*\}\}")


# ---------------------------------------------------------------------------
# Arguments


def base_parser(description: str) -> argparse.ArgumentParser:
    """The arguments both scripts take; a script adds its own to the returned parser."""
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    g = p.add_argument_group("configuration")
    g.add_argument("--config", type=str, default=None,
                   help="YAML file whose keys are argument names (e.g. training/configs/small.yaml); flags given on the command line win.")
    g.add_argument("--preset", type=str, default="small", choices=["tiny", "small", "paper"],
                   help="Network size (qid2_diffusers.models.PRESETS); without --config, training/configs/PRESET.yaml "
                   "also supplies the defaults ('paper': the paper's protocol). 'tiny' is for tests only.")

    g = p.add_argument_group("data")
    g.add_argument("--data_dir", type=str, default=None, help="HCP or BIDS root of the training subjects.")
    g.add_argument("--validation_data_dir", type=str, default=None,
                   help="Root of held-out subjects; without it the last --num_validation_subjects of --data_dir are held out.")
    g.add_argument("--num_validation_subjects", type=int, default=1)
    g.add_argument("--cache_dir", type=str, default=None, help="Preprocessed slice caches; defaults to OUTPUT_DIR/cache.")
    g.add_argument("--shell", type=float, default=1000.0, help="b-value of the shell to learn (see --shells).")
    g.add_argument("--shells", type=_numbers(float), default=None,
                   help="Several shells to learn, e.g. 1000,2000,3000 (with --bval_conditioning); overrides --shell.")
    g.add_argument("--n_acquired", type=_numbers(int), default=[30],
                   help="Directions of the shell kept as acquired, the rest being targets; several values "
                        "(e.g. 10,15,20,30,45) train on each, so the model meets sparse and dense acquisitions.")
    g.add_argument("--validation_n_acquired", type=int, default=None,
                   help="Directions kept in validation; default: the first of --n_acquired.")
    g.add_argument("--R", type=int, default=3, help="Reference slices per target.")
    g.add_argument("--augment", dest="augment", action="store_true", default=True,
                   help="Random in-plane rotation (±15°) and scaling (0.9-1.1), b-vectors rotated along.")
    g.add_argument("--no_augment", dest="augment", action="store_false")
    g.add_argument("--crop_size", type=int, default=None,
                   help="Train on random SIZE x SIZE crops centred on brain pixels instead of whole slices: several "
                   "times faster on CPUs; the networks are convolutional and still sample whole slices.")
    g.add_argument("--dataloader_num_workers", type=int, default=None,
                   help="Loader processes; default: 0 on machines with 2 cores or fewer, else min(8, cores // 2).")
    g.add_argument("--data_description", type=str, default=None,
                   help="What the training data is, for the model card; default: detected (phantom cohort or the folder).")

    g = p.add_argument_group("optimisation")
    g.add_argument("--train_batch_size", type=int, default=32, help="Per process.")
    g.add_argument("--max_train_steps", type=int, default=None, help="Optimiser steps; overrides --num_epochs.")
    g.add_argument("--num_epochs", type=int, default=10)
    g.add_argument("--max_train_time_minutes", type=float, default=None,
                   help="Stop cleanly (checkpoint + final model) once this much wall time has been spent, resumed runs included.")
    g.add_argument("--learning_rate", type=float, default=None)
    g.add_argument("--adam_beta1", type=float, default=0.5)
    g.add_argument("--adam_beta2", type=float, default=0.999)
    g.add_argument("--adam_weight_decay", type=float, default=0.0)
    g.add_argument("--adam_epsilon", type=float, default=1e-8)
    g.add_argument("--lr_scheduler", type=str, default="constant",
                   choices=["linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup"],
                   help="diffusers.optimization.get_scheduler name.")
    g.add_argument("--lr_warmup_steps", type=int, default=0)
    g.add_argument("--max_grad_norm", type=float, default=1.0)
    g.add_argument("--gradient_accumulation_steps", type=int, default=1)
    g.add_argument("--mixed_precision", type=str, default="no", choices=["no", "fp16", "bf16"])
    g.add_argument("--allow_tf32", action="store_true", help="TF32 matmuls on Ampere+ GPUs (faster, slightly less exact).")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--unmasked_loss", action="store_true",
                   help="Average the loss over every pixel, as the paper; by default only brain-mask pixels count.")
    g.add_argument("--use_ema", action="store_true", help="Keep an exponential moving average of the weights and save it.")
    g.add_argument("--ema_max_decay", "--ema_decay", dest="ema_max_decay", type=float, default=0.9999)
    g.add_argument("--ema_power", type=float, default=0.75, help="EMA warm-up: decay = 1 - (1 + step / inv_gamma) ** -power.")
    g.add_argument("--ema_inv_gamma", type=float, default=1.0)

    g = p.add_argument_group("checkpoints and output")
    g.add_argument("--output_dir", type=str, default=None)
    g.add_argument("--checkpointing_steps", type=int, default=500)
    g.add_argument("--checkpoints_total_limit", type=int, default=None, help="Keep at most this many checkpoints.")
    g.add_argument("--resume_from_checkpoint", type=str, default=None, help="'latest' or a checkpoint folder.")
    g.add_argument("--save_dtype", type=str, default="fp16", choices=["fp16", "fp32"],
                   help="Dtype of the final weights (they load in float32 either way).")

    g = p.add_argument_group("validation")
    g.add_argument("--validation_steps", type=int, default=500, help="Validate every N steps (and always at the end).")
    g.add_argument("--validation_num_slices", type=int, default=2, help="Axial slices per held-out subject.")
    g.add_argument("--validation_batch_size", type=int, default=64)

    g = p.add_argument_group("logging and hub")
    g.add_argument("--report_to", type=str, default="tensorboard", help="Accelerate tracker, or 'none'.")
    g.add_argument("--logging_dir", type=str, default="logs", help="Relative to --output_dir.")
    g.add_argument("--debug_dump_weights", action="store_true",
                   help="Each process writes a SHA-256 of its final weights to OUTPUT_DIR/debug_weights_rank<k>.json.")
    g.add_argument("--push_to_hub", action="store_true")
    g.add_argument("--hub_model_id", type=str, default=None)
    g.add_argument("--hub_token", type=str, default=None)
    g.add_argument("--hub_private_repo", action="store_true")
    return p


def _numbers(kind):
    """An argparse type for one number or a comma-separated list of them."""

    def parse(text):
        try:
            return [kind(v) for v in str(text).split(",") if v.strip()]
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected numbers separated by commas, got {text!r}") from None

    parse.__name__ = f"{kind.__name__} list"
    return parse


def _as_list(value) -> list:
    return list(value) if isinstance(value, (list, tuple)) else [value]


def parse_args(parser: argparse.ArgumentParser, argv=None) -> argparse.Namespace:
    """Parse ``argv`` over the defaults of ``--config`` (a YAML file of argument names).

    Precedence: command line, then the config file, then the parser's defaults.
    """
    argv = sys.argv[1:] if argv is None else list(argv)
    pre, _ = parser.parse_known_args(argv)
    config = pre.config
    if config is None and any(a == "--preset" or a.startswith("--preset=") for a in argv):
        config = CONFIG_DIR / f"{pre.preset}.yaml"
    if config:
        parser.set_defaults(**load_config(config, parser))
    args = parser.parse_args(argv)
    args.command = command_line(argv)
    for name in ("data_dir", "output_dir"):
        if getattr(args, name) is None:
            parser.error(f"--{name} is required (on the command line or in --config)")
    if args.gradient_accumulation_steps < 1 or args.train_batch_size < 1:
        parser.error("--train_batch_size and --gradient_accumulation_steps must be >= 1")
    args.cache_dir = args.cache_dir or os.path.join(args.output_dir, "cache")
    # One number or a list, from the command line or YAML alike.
    args.shells = [float(b) for b in _as_list(args.shells if args.shells is not None else args.shell)]
    args.n_acquired = [int(n) for n in _as_list(args.n_acquired)]
    if args.validation_n_acquired is None:
        args.validation_n_acquired = args.n_acquired[0]
    if len(args.shells) > 1 and not getattr(args, "bval_conditioning", True):
        parser.error("several --shells need --bval_conditioning: the model must know which shell it is up-sampling")
    return args


def load_config(path, parser: argparse.ArgumentParser) -> dict:
    """Settings of a YAML config file, checked against the parser's argument names."""
    import yaml

    path = Path(path)
    for candidate in (CONFIG_DIR / path.name, CONFIG_DIR / f"{path.name}.yaml"):
        if not path.is_file() and candidate.is_file():
            path = candidate
    if not path.is_file():
        raise QID2InputError(path, "config file not found")
    try:
        settings = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise QID2InputError(path, f"not valid YAML ({str(exc).splitlines()[0]})") from None
    if not isinstance(settings, dict):
        raise QID2InputError(path, "expected a mapping of argument names to values")
    known = {a.dest for a in parser._actions}
    unknown = sorted(set(settings) - known - SCRIPT_SPECIFIC - {"config"})
    if unknown:
        raise QID2InputError(path, f"unknown setting(s): {', '.join(unknown)}")
    return {k: v for k, v in settings.items() if k in known}


def command_line(argv) -> str:
    """The command that ran, as a user would retype it."""
    script = os.path.relpath(sys.argv[0], REPO_ROOT) if sys.argv and sys.argv[0] else "train.py"
    return " ".join(shlex.quote(a) for a in ["python", script, *argv])


def run(main, parse_args) -> int:
    """Run a training script's ``main``; input errors end it with one line and exit status 2."""
    try:
        return main(parse_args())
    except QID2InputError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


def dataloader_workers(args) -> int:
    if args.dataloader_num_workers is not None:
        return args.dataloader_num_workers
    cores = os.cpu_count() or 1
    return 0 if cores <= 2 else min(8, cores // 2)


# ---------------------------------------------------------------------------
# Accelerator


def make_accelerator(args):
    """An Accelerator with TensorBoard (if asked) under ``output_dir/logging_dir``."""
    from accelerate import Accelerator
    from accelerate.utils import ProjectConfiguration

    if args.allow_tf32 and torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    report_to = None if args.report_to in (None, "none") else args.report_to
    project = ProjectConfiguration(project_dir=args.output_dir, logging_dir=os.path.join(args.output_dir, args.logging_dir))
    return Accelerator(
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        mixed_precision=args.mixed_precision,
        log_with=report_to,
        project_config=project,
    )


def tracker_config(args) -> dict:
    """Hyper-parameters as TensorBoard can store them (scalars and strings only)."""
    return {k: v for k, v in vars(args).items() if isinstance(v, (int, float, str, bool)) and k != "hub_token"}


# ---------------------------------------------------------------------------
# Data


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
    """The training set and the held-out subjects."""

    dataset: QID2Dataset
    sampler: EpochSampler
    dataloader: DataLoader
    train_ids: list
    validation_subjects: list
    description: str


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


def describe_data(args, train_subjects) -> str:
    if args.data_description:
        return args.data_description
    # `qid2 phantom` stores each subject's noise-free truth beside its data.
    phantom = all((Path(s.dwi).parents[2] / "truth").is_dir() for s in train_subjects if s.layout == "hcp")
    kind = "synthetic brain-like phantom cohort (`qid2 phantom`)" if phantom and train_subjects[0].layout == "hcp" else "DWI data"
    return f"{kind}: {len(train_subjects)} subject(s) from `{args.data_dir}`"


def load_training_data(args, accelerator) -> TrainingData:
    """Discover subjects, build their caches (main process first) and the training loader."""
    from concurrent.futures import ThreadPoolExecutor

    train_subjects, validation_subjects = split_subjects(args)
    with accelerator.main_process_first():
        # Threads: decompressing NIfTI releases the GIL, and a cohort is cached in a fraction of the time.
        jobs = [(s, b, n) for s in train_subjects for b in args.shells for n in args.n_acquired]
        prior = getattr(args, "physics_prior", False)
        with ThreadPoolExecutor(max_workers=min(len(jobs), os.cpu_count() or 1, 8)) as pool:
            caches = list(pool.map(
                lambda job: build_cache(job[0], args.cache_dir, shell=job[1], n_acquired=job[2], prior=prior), jobs
            ))
    dataset = QID2Dataset(caches, num_references=args.R, augment=args.augment, seed=args.seed, physics_prior=prior)
    per_step = args.train_batch_size * accelerator.num_processes
    if len(dataset) < per_step:
        raise QID2InputError(
            args.data_dir, f"{len(dataset)} training samples, fewer than one batch of {args.train_batch_size} x {accelerator.num_processes} process(es)"
        )
    sampler = EpochSampler(len(dataset), args.seed)
    workers = dataloader_workers(args)
    dataloader = DataLoader(
        dataset,
        batch_size=args.train_batch_size,
        sampler=sampler,
        num_workers=workers,
        drop_last=True,
        pin_memory=torch.cuda.is_available(),
        # Not persistent: each epoch's workers get a fresh copy of the dataset
        # carrying its set_epoch (the augmentation draw depends on it).
        persistent_workers=False,
        prefetch_factor=4 if workers else None,
    )
    return TrainingData(
        dataset=dataset,
        sampler=sampler,
        dataloader=dataloader,
        train_ids=[s.subject_id for s in train_subjects],
        validation_subjects=validation_subjects,
        description=describe_data(args, train_subjects),
    )


@dataclass
class Schedule:
    """Step bookkeeping shared by the two scripts."""

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
        # Set on the sampler and dataset directly: which of the two accelerate
        # forwards set_epoch to depends on how it wrapped the loader.
        data.sampler.set_epoch(epoch)
        data.dataset.set_epoch(epoch)
        loader = dataloader
        offset = 0
        if epoch == first_epoch and skip:
            loader = accelerator.skip_first_batches(dataloader, skip)
            offset = skip
        loader.set_epoch(epoch)
        for i, batch in enumerate(loader):
            yield epoch, offset + i, batch


def step_generator(seed: int, epoch: int, batch_index: int, process_index: int) -> torch.Generator:
    """The CPU generator for every random draw of one training batch (noise, timesteps)."""
    state = np.random.SeedSequence([seed, epoch, batch_index, process_index]).generate_state(1, dtype=np.uint64)
    return torch.Generator().manual_seed(int(state[0]))


def random_crops(batch: dict, size: int | None, generator: torch.Generator) -> dict:
    """Per-sample ``size x size`` crops of every image of the batch (target, references,
    mask, and prior and b0 when present), each centred (as far as the slice
    allows) on a brain pixel drawn with ``generator``."""
    h, w = batch["target"].shape[-2:]
    if size is None or (size >= h and size >= w):
        return batch
    ch, cw = min(size, h), min(size, w)
    crops = {k: [] for k in ("target", "references", "mask", "prior", "b0") if k in batch}
    for i, m in enumerate(batch["mask"][:, 0]):
        brain = torch.nonzero(m > 0).cpu()
        y, x = brain[int(torch.randint(len(brain), (1,), generator=generator))].tolist() if len(brain) else (h // 2, w // 2)
        top, left = min(max(y - ch // 2, 0), h - ch), min(max(x - cw // 2, 0), w - cw)
        for k, v in crops.items():
            v.append(batch[k][i, :, top : top + ch, left : left + cw])
    return {**batch, **{k: torch.stack(v) for k, v in crops.items()}}


def masked_mean(values: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Mean of ``values`` over the pixels where ``mask`` is set (all pixels when ``mask`` is None)."""
    if mask is None:
        return values.mean()
    mask = mask.to(values.dtype).expand_as(values)
    return (values * mask).sum() / mask.sum().clamp_min(1.0)


def make_ema(parameters, args):
    from diffusers.training_utils import EMAModel

    return EMAModel(
        parameters,
        decay=args.ema_max_decay,
        use_ema_warmup=True,
        inv_gamma=args.ema_inv_gamma,
        power=args.ema_power,
    )


def make_lr_scheduler(args, optimizer, schedule: Schedule, accelerator):
    """``diffusers.optimization.get_scheduler``; counts are per process step, as the prepared scheduler steps once per process."""
    from diffusers.optimization import get_scheduler

    return get_scheduler(
        args.lr_scheduler,
        optimizer=optimizer,
        num_warmup_steps=args.lr_warmup_steps * accelerator.num_processes,
        num_training_steps=schedule.max_train_steps * accelerator.num_processes,
    )


# ---------------------------------------------------------------------------
# Checkpoints


class RunState:
    """Progress saved with every checkpoint: steps, wall time spent, last validation."""

    def __init__(self):
        self.global_step = 0
        self.elapsed_seconds = 0.0
        self.validation: dict = {}

    def state_dict(self) -> dict:
        return {"global_step": self.global_step, "elapsed_seconds": self.elapsed_seconds, "validation": self.validation}

    def load_state_dict(self, state: dict) -> None:
        self.global_step = int(state["global_step"])
        self.elapsed_seconds = float(state["elapsed_seconds"])
        self.validation = dict(state.get("validation", {}))


def checkpoints(output_dir) -> list[Path]:
    """Complete checkpoint folders, oldest first (half-written ones have a temporary name)."""
    root = Path(output_dir)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if p.is_dir() and (m := _CHECKPOINT.match(p.name))]
    return [p for _, p in sorted(found)]


def save_checkpoint(accelerator, args, global_step: int) -> Path:
    """``accelerator.save_state`` into ``output_dir/checkpoint-<step>``, written under a temporary name and renamed."""
    final = Path(args.output_dir) / f"checkpoint-{global_step}"
    tmp = Path(args.output_dir) / f".checkpoint-{global_step}.tmp"
    if accelerator.is_main_process:
        # Left by a run killed while saving.
        for stale in Path(args.output_dir).glob(".checkpoint-*.tmp"):
            shutil.rmtree(stale)
        existing = [p for p in checkpoints(args.output_dir) if p != final]
        if args.checkpoints_total_limit is not None and len(existing) >= args.checkpoints_total_limit:
            for old in existing[: len(existing) - args.checkpoints_total_limit + 1]:
                shutil.rmtree(old)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    accelerator.wait_for_everyone()
    return final


def resume(accelerator, args, state: RunState) -> int:
    """Load ``--resume_from_checkpoint`` (``latest`` or a folder) into the prepared objects; the step to continue from."""
    if not args.resume_from_checkpoint:
        return 0
    if args.resume_from_checkpoint == "latest":
        found = checkpoints(args.output_dir)
        if not found:
            accelerator.print(f"no checkpoint in {args.output_dir}; starting a new run")
            return 0
        path = found[-1]
    else:
        path = Path(args.resume_from_checkpoint)
        if not path.is_dir():
            raise QID2InputError(path, "checkpoint folder not found")
    accelerator.print(f"resuming from {path}")
    accelerator.load_state(str(path))
    return state.global_step


class Clock:
    """Wall time of this run plus what resumed checkpoints had already spent."""

    def __init__(self, state: RunState):
        self.state = state
        self.base = state.elapsed_seconds
        self.start = time.monotonic()

    def update(self) -> float:
        self.state.elapsed_seconds = self.base + time.monotonic() - self.start
        return self.state.elapsed_seconds

    def out_of_time(self, accelerator, budget_minutes) -> bool:
        """Whether the budget is spent; decided by the main process, so every process stops on the same step."""
        if budget_minutes is None:
            return False
        from accelerate.utils import broadcast

        flag = torch.tensor([float(self.update() >= budget_minutes * 60.0)], device=accelerator.device)
        if accelerator.num_processes > 1:
            flag = broadcast(flag, from_process=0)
        return bool(flag.item())


def should_stop(accelerator, args, clock: Clock, global_step: int, schedule: Schedule) -> str:
    """Why training must stop after this step, or ``""`` to go on."""
    if global_step >= schedule.max_train_steps:
        return f"reached max_train_steps ({schedule.max_train_steps})"
    if clock.out_of_time(accelerator, args.max_train_time_minutes):
        return f"wall-time budget of {args.max_train_time_minutes:g} min spent (--max_train_time_minutes)"
    return ""


def end_of_step(accelerator, args, clock: Clock, global_step: int, schedule: Schedule, validate) -> str:
    """After an optimiser step: validate and checkpoint when due; returns why to stop, or ``""``.

    A stopping run always leaves a checkpoint, so it can be resumed or extended.
    """
    stop = should_stop(accelerator, args, clock, global_step, schedule)
    if args.validation_steps and global_step % args.validation_steps == 0 and not stop:
        if accelerator.is_main_process:
            validate(global_step)
        accelerator.wait_for_everyone()
    if stop or (args.checkpointing_steps and global_step % args.checkpointing_steps == 0):
        clock.update()
        save_checkpoint(accelerator, args, global_step)
    return stop


def setup_logging(accelerator, name: str):
    """INFO for the script's own logger; libraries stay at WARNING, so checkpoints do not flood the log."""
    import logging

    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.WARNING)
    logger = logging.getLogger(name)
    logger.setLevel(logging.INFO if accelerator.is_local_main_process else logging.WARNING)
    return logger


def cast_for_saving(module, args):
    """Cast to ``--save_dtype`` before saving (the weights reload in float32 either way)."""
    from diffusers.utils import logging as diffusers_logging

    if args.save_dtype == "fp16":
        # diffusers warns on every dtype cast, even with no module to keep in float32.
        level = diffusers_logging.get_verbosity()
        diffusers_logging.set_verbosity_error()
        module.to(torch.float16)
        diffusers_logging.set_verbosity(level)
    return module


# ---------------------------------------------------------------------------
# Validation


class Validator:
    """Scores an up-sampler on a few axial slices of held-out subjects.

    For each subject, ``num_slices`` slices evenly spread over the middle of
    the brain are taken with every volume of b0 + the shell; the
    ``n_acquired`` directions of :func:`~qid2_diffusers.data.io.split_acquired`
    are the input and the others the targets. Figures come from
    :class:`~qid2_diffusers.evaluation.SubjectEvaluation` against the acquired
    volumes: image SSIM / PSNR / NRMSE over every target slice, and FA MAE,
    FA-SSIM, MD error and principal-direction error of a tensor fit on
    b0 + acquired + predicted against the fit on the full acquisition; means
    over subjects. Interp (same R) and DTI-predict are scored once on the same
    slices, for reference.

    Args:
        subjects (`list` of `SubjectPaths`): held-out subjects.
        args: the parsed arguments (``cache_dir``, ``shells``, ``validation_n_acquired``, ``R``,
            ``validation_num_slices``); every shell of every subject is scored.
        figure_targets (`int`, *optional*, defaults to 4): target rows in the figure.
    """

    def __init__(self, subjects, args, *, figure_targets: int = 4):
        self.num_references = args.R
        self.figure_targets = figure_targets
        self.items = [self._prepare(s, shell, args) for s in subjects for shell in args.shells]
        self.baselines = {
            "interp": self.run(InterpUpsampler(args.R))[0],
            "dti": self.run(DTIUpsampler())[0],
        }

    @staticmethod
    def _prepare(subject, shell, args) -> dict:
        cache = build_cache(subject, args.cache_dir, shell=shell, n_acquired=args.validation_n_acquired)
        meta = json.loads((cache / "meta.json").read_text())
        mask = np.moveaxis(np.load(cache / "mask.npy"), 0, 2).astype(bool)
        brain = np.asarray(meta["brain_slices"])
        k = max(1, min(args.validation_num_slices, len(brain)))
        picks = np.unique(np.quantile(brain, np.linspace(0.35, 0.65, k) if k > 1 else [0.5], method="nearest"))
        dwi = subject.load()
        shell_idx = np.asarray(meta["volume_indices"])
        volumes = np.union1d(dwi.b0_indices, shell_idx)
        # Slice by slice, in increasing order: a .nii.gz stream is read forwards once.
        data = np.stack([np.asarray(dwi.data[:, :, int(z), :], dtype=np.float32)[..., volumes] for z in picks], axis=2)
        bvals, bvecs = dwi.bvals[volumes], dwi.bvecs[volumes]
        column = {int(v): j for j, v in enumerate(volumes)}
        acquired = [column[int(shell_idx[i])] for i in meta["acquired"]]
        targets = [column[int(shell_idx[i])] for i in meta["targets"]]
        inputs = np.concatenate([np.flatnonzero(np.isin(volumes, dwi.b0_indices)), acquired])
        slab_mask = mask[:, :, picks]
        return {
            "subject_id": subject.subject_id,
            "slices": picks.tolist(),
            "evaluation": SubjectEvaluation(data, bvals, bvecs, slab_mask),
            "inputs": (data[..., inputs], bvals[inputs], bvecs[inputs]),
            "target_bvecs": bvecs[targets],
            "truth": data[..., targets],
            "mask": slab_mask,
        }

    def run(self, upsampler) -> tuple[dict, np.ndarray]:
        """Mean figures over subjects (keys :data:`VALIDATION_KEYS`) and a uint8 figure.

        The figure shows, for the first subject's middle slice and the first
        ``figure_targets`` targets, one row per target: the R references, the
        acquired target, the prediction and the absolute error, on one grey scale per row.
        """
        per_subject, figure = [], None
        for n, item in enumerate(self.items):
            data, bvals, bvecs = item["inputs"]
            pred = upsampler.predict(data, bvals, bvecs, item["target_bvecs"], item["mask"])
            per_subject.append(item["evaluation"].score(pred, item["target_bvecs"])["acquired"])
            if n == 0:
                figure = self._figure(item, pred)
        means = {k: float(np.nanmean([s[k] for s in per_subject])) for k in VALIDATION_KEYS}
        return means, figure

    def _figure(self, item, pred) -> np.ndarray:
        data, bvals, bvecs = item["inputs"]
        z = len(item["slices"]) // 2
        _, acquired = split_scheme(bvals, bvecs)
        n = min(self.figure_targets, pred.shape[-1])
        refs = nearest_references(item["target_bvecs"][:n], bvecs[acquired], self.num_references)
        rows = []
        for t in range(n):
            truth = item["truth"][:, :, z, t]
            panels = [data[:, :, z, acquired[j]] for j in refs[t]] + [truth, pred[:, :, z, t], np.abs(pred[:, :, z, t] - truth)]
            top = float(np.percentile(truth[item["mask"][:, :, z]], 99)) if item["mask"][:, :, z].any() else 1.0
            # Axial slices are stored (x, y): transpose and flip so anterior is up, as viewers show them.
            rows.append(np.concatenate([np.flipud(np.clip(p / max(top, 1e-6), 0, 1).T) for p in panels], axis=1))
        return (np.concatenate(rows, axis=0) * 255).astype(np.uint8)


def validate(accelerator, validator: Validator, upsampler, state: RunState, step: int, args) -> dict:
    """Score ``upsampler``, log the figures and image, keep them in ``state`` and ``output_dir/validation.png``."""
    metrics, figure = validator.run(upsampler)
    state.validation = {"step": int(step), **metrics}
    accelerator.log({f"validation/{k}": v for k, v in metrics.items()}, step=step)
    for tracker in accelerator.trackers:
        if tracker.name == "tensorboard":
            tracker.writer.add_image("validation/references_target_generated_error", figure, step, dataformats="HW")
    accelerator.print(f"step {step}: " + ", ".join(f"{k} {v:.4f}" for k, v in metrics.items()))
    write_validation_figure(args.output_dir, figure)
    return metrics


def write_validation_figure(output_dir, figure: np.ndarray) -> Path:
    """``output_dir/validation.png`` from a :meth:`Validator.run` figure, written under a temporary name and renamed."""
    from PIL import Image

    path = Path(output_dir) / "validation.png"
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp.png")
    Image.fromarray(figure).save(tmp, format="PNG")
    os.replace(tmp, path)
    return path


# ---------------------------------------------------------------------------
# Final outputs


def tensors_digest(tensors: dict) -> str:
    """SHA-256 of named tensors, in name order."""
    import hashlib

    h = hashlib.sha256()
    for name, tensor in sorted(tensors.items()):
        h.update(str(name).encode())
        h.update(tensor.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return h.hexdigest()


def dump_weights(accelerator, args, model: torch.nn.Module, ema=None) -> None:
    """``--debug_dump_weights``: every process records digests of its weights (and EMA weights)."""
    digests = {"model": tensors_digest(model.state_dict())}
    if ema is not None:
        digests["ema"] = tensors_digest({f"{i:05d}": p for i, p in enumerate(ema.shadow_params)})
    write_json(Path(args.output_dir) / f"debug_weights_rank{accelerator.process_index}.json", digests)


def run_fields(args, accelerator, data: TrainingData, state: RunState, schedule: Schedule, stop_reason: str,
               validator: Validator | None, model_label: str = "this model") -> dict:
    """The facts of a run, for the model card and ``training_summary.json``."""
    import datetime

    import diffusers

    import qid2_diffusers
    from qid2_diffusers.baselines import method_label

    command = args.command
    if accelerator.num_processes > 1:
        command = command.replace("python ", f"accelerate launch --num_processes {accelerator.num_processes} ", 1)
    if validator is not None and state.validation:
        rows = {model_label: state.validation}
        rows.update({method_label(k, args.R): v for k, v in validator.baselines.items()})
        slices = "; ".join(sorted({f"{it['subject_id']}: axial slices {it['slices']}" for it in validator.items}))
        shells = ", ".join(f"{b:g}" for b in args.shells)
        description = (
            f"Held-out subject(s), {slices}; b = {shells} s/mm². Each slice's {args.validation_n_acquired} acquired "
            "directions of a shell are the input and the other directions of the shell the targets. Image SSIM (per slice, inside the brain mask), PSNR and NRMSE "
            "compare the predicted with the acquired target volumes; FA MAE, FA-map SSIM, MD MAE (mm²/s) and "
            "principal-direction error (degrees, where FA > 0.2) compare a tensor fit on b0 + acquired + predicted with "
            f"one on the full acquisition (`qid2_diffusers.evaluation.SubjectEvaluation`). Step {state.validation['step']}, "
            "fixed seed. Interp and DTI-predict are computed on the same slices for reference."
        )
        table = metrics_table(rows)
        figure = ("![validation: references, target, generated, |error|](validation.png)\n\n"
                  "Rows: targets; columns: the R references, the acquired target, the generated slice, the absolute error.")
    else:
        description, table, figure = "No held-out subject: no validation figures.", "", ""
    return {
        "data_description": data.description,
        "train_subjects": ", ".join(data.train_ids),
        "validation_subjects": ", ".join(s.subject_id for s in data.validation_subjects) or "none",
        "augment": "random in-plane rotation in [-15°, 15°] and scaling in [0.9, 1.1], b-vectors rotated along"
        if args.augment else "none",
        "loss_region": "every pixel (--unmasked_loss)" if args.unmasked_loss else "the brain mask",
        "command": command,
        "num_processes": accelerator.num_processes,
        "hardware": hardware(accelerator),
        "mixed_precision": args.mixed_precision,
        "global_step": state.global_step,
        "max_train_steps": schedule.max_train_steps,
        "epochs": math.ceil(state.global_step / schedule.updates_per_epoch),
        "train_batch_size": args.train_batch_size,
        "total_batch_size": args.train_batch_size * accelerator.num_processes * args.gradient_accumulation_steps,
        "learning_rate": f"{args.learning_rate:g}",
        "lr_scheduler": args.lr_scheduler,
        "adam_betas": f"({args.adam_beta1:g}, {args.adam_beta2:g})",
        "ema": f"max decay {args.ema_max_decay:g}, power {args.ema_power:g}" if args.use_ema else "none",
        "max_grad_norm": f"{args.max_grad_norm:g}",
        "seed": args.seed,
        "stop_reason": stop_reason,
        "wall_time": format_duration(state.elapsed_seconds),
        "save_dtype": "float16" if args.save_dtype == "fp16" else "float32",
        "shell": ", ".join(f"{b:g}" for b in args.shells),
        "n_acquired": ", ".join(str(n) for n in args.n_acquired),
        "num_references": args.R,
        "validation_description": description,
        "validation_table": table,
        "validation_figure": figure,
        "date": datetime.date.today().isoformat(),
        "package_version": qid2_diffusers.__version__,
        "diffusers_version": diffusers.__version__,
        "torch_version": torch.__version__,
    }


def summary(fields: dict, state: RunState, validator: Validator | None) -> dict:
    """``training_summary.json``: the card's facts, with the figures as numbers."""
    plain = {k: v for k, v in fields.items() if k not in ("validation_table", "validation_figure", "validation_description")}
    return {
        **plain,
        "elapsed_seconds": round(state.elapsed_seconds, 1),
        "validation": state.validation,
        "validation_reference_methods": validator.baselines if validator is not None else {},
        "validation_subject_slices": {it["subject_id"]: it["slices"] for it in validator.items} if validator else {},
    }


def write_text(path, text: str) -> Path:
    """Write a file under a temporary name and rename it, so it is never seen half-written."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
    return path


def write_json(path, obj) -> Path:
    return write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def save_pretrained_atomic(obj, output_dir, **kwargs) -> None:
    """``obj.save_pretrained`` into ``output_dir`` via a temporary folder, so no
    component is ever left half-written next to the checkpoints and logs."""
    output_dir = Path(output_dir)
    tmp = output_dir / f".save-{uuid.uuid4().hex[:8]}.tmp"
    try:
        obj.save_pretrained(tmp, **kwargs)
        for entry in sorted(tmp.iterdir()):
            target = output_dir / entry.name
            if target.is_dir():
                shutil.rmtree(target)
            os.replace(entry, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def hardware(accelerator) -> str:
    """The machine in words, e.g. ``1 x NVIDIA H100 80GB HBM3`` or ``CPU: x86_64, 2 cores``."""
    if accelerator.device.type == "cuda":
        return f"{accelerator.num_processes} x {torch.cuda.get_device_name(accelerator.device)}"
    return f"CPU ({platform.machine()}, {os.cpu_count() or 1} cores)"


def format_duration(seconds: float) -> str:
    minutes, s = divmod(int(round(seconds)), 60)
    h, m = divmod(minutes, 60)
    return f"{h} h {m:02d} min {s:02d} s" if h else f"{m} min {s:02d} s"


def metrics_table(rows: dict) -> str:
    """A Markdown table of validation figures, one row per method."""
    header = "| method | " + " | ".join(VALIDATION_KEYS) + " |"
    lines = [header, "|" + "---|" * (len(VALIDATION_KEYS) + 1)]
    for name, m in rows.items():
        lines.append(f"| {name} | " + " | ".join(f"{m.get(k, float('nan')):.4g}" for k in VALIDATION_KEYS) + " |")
    return "\n".join(lines)


def fill_template(template: str, fields: dict) -> str:
    """Replace every ``{{ name }}`` of ``template``; a placeholder without a field is an error."""
    # The template's first HTML comment documents the placeholders for its editors.
    body = re.sub(r"<!--.*?-->\n?", "", template, count=1, flags=re.S)
    missing = sorted({m.group(1) for m in _PLACEHOLDER.finditer(body)} - set(fields))
    if missing:
        raise KeyError(f"model card template needs fields: {', '.join(missing)}")
    return _PLACEHOLDER.sub(lambda m: str(fields[m.group(1)]), body)


def write_model_card(output_dir, fields: dict, template_path=MODEL_CARD_TEMPLATE) -> Path:
    """``output_dir/README.md`` from the top-level ``model_card.md`` template."""
    return write_text(Path(output_dir) / "README.md", fill_template(Path(template_path).read_text(), fields))


def push_to_hub(args, ignore_patterns=("checkpoint-*", ".*", "cache/*", "logs/*", "debug_weights_*")) -> str:
    """Upload the output folder (not checkpoints, caches or logs) with huggingface_hub."""
    from huggingface_hub import create_repo, upload_folder

    repo_id = args.hub_model_id or Path(args.output_dir).name
    repo_id = create_repo(repo_id, exist_ok=True, token=args.hub_token, private=args.hub_private_repo).repo_id
    upload_folder(
        repo_id=repo_id,
        folder_path=args.output_dir,
        commit_message="Trained with qid2-diffusers",
        ignore_patterns=list(ignore_patterns),
        token=args.hub_token,
    )
    return repo_id
