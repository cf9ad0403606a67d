"""One training loop for every model of the package; what differs between models are hooks.

:class:`Trainer` owns what every run does the same way: the Accelerator, the
data, one AdamW optimiser and LR schedule per network, EMA weights
(``diffusers.training_utils.EMAModel``), resuming, the step loop with gradient
clipping, checkpoints, the wall-time budget, validation, and the final save,
model card, ``training_summary.json`` and push. A model subclasses it and
fills in, in the manner of ``transformers.Trainer``:

* :meth:`Trainer.build_models`: the networks, the first being the one trained
  by the ``"loss"`` of each step, averaged by EMA, validated and saved;
* :meth:`Trainer.training_step`: a batch to its losses; a model with other
  networks (a GAN's discriminator) updates them here with :meth:`Trainer.optimizer_step`;
* :meth:`Trainer.make_upsampler`: the volume up-sampler that validation scores;
* :meth:`Trainer.save` and :meth:`Trainer.card_fields`: the output folder and the card's facts;
* :meth:`Trainer.add_arguments` / :meth:`Trainer.complete_args`: its own options.

A run is driven from the command line (:meth:`Trainer.main`) or from Python,
with arguments from :meth:`Trainer.training_args` and, if wanted, an in-memory
dataset instead of ``--data_dir``::

    args = QID2Trainer.training_args(output_dir="runs/x", config="tiny", max_train_steps=20)
    trainer = QID2Trainer(args, train_dataset=dataset)
    trainer.train()
    trainer.model  # the trained (unwrapped) network
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..errors import QID2InputError
from ..pipelines.training_utils import masked_mean
from .checkpoints import Clock, RunState, resume, save_checkpoint
from .config import base_parser, command_line, data_settings, parse_args, run, tracker_config, training_args
from .data import TrainingData, batches, load_training_data, make_schedule, random_crops, step_generator
from .reporting import CARD_TAGS, dump_weights, push_to_hub, run_fields, summary, write_json, write_model_card
from .validation import Validator, validate

__all__ = ["Trainer", "make_accelerator", "make_ema", "make_lr_scheduler", "setup_logging", "progress_bar_wanted"]


def progress_bar_wanted(accelerator, stream=None) -> bool:
    """Whether to draw the step bar: on the main process, and only when ``stream`` (default
    ``sys.stderr``, where tqdm writes) is a terminal. Redirected to a log file, a bar is a
    carriage-return redraw per step, thousands of them on one line."""
    stream = sys.stderr if stream is None else stream
    isatty = getattr(stream, "isatty", None)
    return bool(accelerator.is_local_main_process and isatty is not None and isatty())


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


def setup_logging(accelerator, name: str = "qid2_diffusers.training"):
    """INFO for the trainer's own logger; libraries stay at WARNING, so checkpoints do not flood the log."""
    import logging

    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.WARNING)
    logger = logging.getLogger(name)
    logger.setLevel(logging.INFO if accelerator.is_local_main_process else logging.WARNING)
    return logger


def make_ema(parameters, args):
    """``diffusers.training_utils.EMAModel`` with warm-up, from ``--ema_max_decay``, ``--ema_power``, ``--ema_inv_gamma``."""
    from diffusers.training_utils import EMAModel

    return EMAModel(
        parameters,
        decay=args.ema_max_decay,
        use_ema_warmup=True,
        inv_gamma=args.ema_inv_gamma,
        power=args.ema_power,
    )


def make_lr_scheduler(args, optimizer, schedule, accelerator):
    """``diffusers.optimization.get_scheduler``; counts are per process step, as the prepared scheduler steps once per process."""
    from diffusers.optimization import get_scheduler

    return get_scheduler(
        args.lr_scheduler,
        optimizer=optimizer,
        num_warmup_steps=args.lr_warmup_steps * accelerator.num_processes,
        num_training_steps=schedule.max_train_steps * accelerator.num_processes,
    )


def _value_error(message: str):
    raise ValueError(message)


class Trainer:
    """Trains the networks of :meth:`build_models` with 🤗 Accelerate; subclass it per model.

    Runs on one CPU, one GPU or many (``accelerate launch``), and a run killed
    and resumed with ``--resume_from_checkpoint latest`` ends with the same
    weights as an uninterrupted one (see :mod:`qid2_diffusers.training.data`).

    Args:
        args (`argparse.Namespace`): from :meth:`parse_args` or :meth:`training_args`.
        train_dataset (`torch.utils.data.Dataset`, *optional*): samples as
            :class:`~qid2_diffusers.data.dataset.QID2Dataset` gives them; without
            it, the subjects of ``--data_dir`` are cached and loaded.
        validation_subjects (`list`, *optional*): held-out subjects
            (:class:`~qid2_diffusers.data.layouts.SubjectPaths`) for a ``train_dataset``.

    Attributes:
        accelerator (`accelerate.Accelerator`), data ([`TrainingData`]), schedule ([`Schedule`]),
        state ([`RunState`]): set up by :meth:`train`.
        models, optimizers, lr_schedulers (`dict`): prepared, by the names :meth:`build_models` gave.
        model (`torch.nn.Module`): the first network, unwrapped (EMA weights once training is over).
    """

    #: The parser's description.
    description = "Train a network for q-space up-sampling of diffusion MRI."
    #: The entry script in a checkout and the module ``python -m`` runs, for the command recorded in the card.
    script: str | None = None
    module: str | None = None
    #: Jinja2 template of ``OUTPUT_DIR/README.md``, or `None` for no card; and its Hub tags.
    model_card_template: Path | None = None
    card_tags = CARD_TAGS

    def __init__(self, args, *, train_dataset=None, validation_subjects=()):
        self.args = args
        self.train_dataset = train_dataset
        self.validation_subjects = list(validation_subjects)
        self.accelerator = None
        self.data = None
        self.schedule = None
        self.state = RunState()
        self.models: dict = {}
        self.optimizers: dict = {}
        self.lr_schedulers: dict = {}
        self.model = None
        self.ema = None
        self.validator = None

    # -- arguments ---------------------------------------------------------

    @classmethod
    def add_arguments(cls, parser) -> None:
        """Add the model's own argument group to ``parser``."""

    @classmethod
    def complete_args(cls, args, error):
        """Check ``args`` and fill defaults that depend on other arguments; ``error(message)`` does not return."""
        if args.gradient_accumulation_steps < 1 or args.train_batch_size < 1:
            error("--train_batch_size and --gradient_accumulation_steps must be >= 1")
        args = data_settings(args)
        if len(args.shells) > 1 and not args.bval_conditioning:
            error("several --shells need --bval_conditioning: the model must know which shell it up-samples")
        return args

    @classmethod
    def parser(cls):
        """The command line: :func:`~qid2_diffusers.training.config.base_parser` and :meth:`add_arguments`."""
        parser = base_parser(cls.description)
        cls.add_arguments(parser)
        return parser

    @classmethod
    def parse_args(cls, argv=None):
        """Arguments from the command line (``sys.argv[1:]`` by default), over ``--config``, over the defaults."""
        parser = cls.parser()
        argv = sys.argv[1:] if argv is None else list(argv)
        args = parse_args(parser, argv)
        args.command = command_line(argv, cls.script, cls.module)
        # One line and exit status 2, like an input error (run): the usage text would bury the reason.
        return cls.complete_args(args, lambda message: parser.exit(2, f"error: {message}\n"))

    @classmethod
    def training_args(cls, *, output_dir, config=None, **settings):
        """Arguments for a run driven from Python (see :func:`~qid2_diffusers.training.config.training_args`)."""
        args = training_args(cls.parser(), output_dir=output_dir, config=config, **settings)
        shown = ", ".join(f"{k}={v!r}" for k, v in {"config": config, **settings}.items() if v is not None)
        args.command = f"{cls.__name__}.training_args(output_dir=..., {shown})"
        return cls.complete_args(args, _value_error)

    @classmethod
    def main(cls, argv=None) -> int:
        """Parse the command line and train; an input error ends it with one line and exit status 2."""
        return run(lambda a: cls(cls.parse_args(a)).train(), argv)

    # -- hooks ---------------------------------------------------------------

    @property
    def project_name(self) -> str:
        """The tracker's project name."""
        return "qid2-diffusers"

    @property
    def model_label(self) -> str:
        """This model's row in the validation table."""
        return "this model"

    def build_models(self) -> dict:
        """The networks to train, by name, the first being the main one (float32, on the CPU)."""
        raise NotImplementedError

    def make_optimizer(self, model: torch.nn.Module) -> torch.optim.Optimizer:
        """The optimiser of one network: AdamW with the ``--adam_*`` settings and ``--learning_rate``."""
        return torch.optim.AdamW(
            model.parameters(),
            lr=self.args.learning_rate,
            betas=(self.args.adam_beta1, self.args.adam_beta2),
            weight_decay=self.args.adam_weight_decay,
            eps=self.args.adam_epsilon,
        )

    def training_step(self, batch: dict, generator: torch.Generator):
        """The losses of one batch: a tensor, or a dict whose ``"loss"`` trains the main network.

        Every random draw must come from ``generator`` (seeded by seed, epoch,
        batch and process), so that a resumed run repeats it. Other networks
        are updated here with :meth:`optimizer_step`; the other values of the
        dict are only logged.
        """
        raise NotImplementedError

    def make_upsampler(self):
        """A :class:`~qid2_diffusers.upsampling.VolumeUpsampler` around :attr:`model`, for validation."""
        raise NotImplementedError

    def save(self, output_dir) -> None:
        """Write the trained networks to ``output_dir`` (:attr:`model` holds the EMA weights by then)."""
        raise NotImplementedError

    def card_fields(self) -> dict:
        """The model's own fields for the card and ``training_summary.json``."""
        return {}

    # -- the run -------------------------------------------------------------

    def optimizer_step(self, name: str, loss: torch.Tensor) -> None:
        """Backward ``loss`` and update the network ``name``: clip, step, LR step, zero its gradients."""
        accelerator = self.accelerator
        accelerator.backward(loss)
        if accelerator.sync_gradients and self.args.max_grad_norm:
            accelerator.clip_grad_norm_(self.models[name].parameters(), self.args.max_grad_norm)
        self.optimizers[name].step()
        self.lr_schedulers[name].step()
        self.optimizers[name].zero_grad(set_to_none=True)

    def load_data(self) -> TrainingData:
        """The ``train_dataset`` given, else the subjects of ``--data_dir``."""
        if self.train_dataset is None:
            if self.args.data_dir is None:
                raise QID2InputError(None, "no training data: give --data_dir or a train_dataset")
            return load_training_data(self.args, self.accelerator)
        return TrainingData.from_dataset(
            self.train_dataset, self.args, self.accelerator.num_processes, source="train_dataset",
            validation_subjects=self.validation_subjects,
            description=self.args.data_description or "in-memory dataset",
        )

    def setup(self) -> None:
        """Accelerator, data, networks, optimisers and schedules prepared, EMA, resumed state, validator."""
        args = self.args
        self.accelerator = accelerator = make_accelerator(args)
        self.logger = setup_logging(accelerator)
        # Data first: a bad input folder stops the run before anything is written.
        self.data = self.load_data()
        if accelerator.is_main_process:
            os.makedirs(args.output_dir, exist_ok=True)
        models = self.build_models()
        for module in models.values():
            module.train()
        names = list(models)
        self.ema = make_ema(models[names[0]].parameters(), args) if args.use_ema else None

        self.dataloader = accelerator.prepare(self.data.dataloader)
        self.schedule = make_schedule(args, self.dataloader)
        optimizers = [self.make_optimizer(m) for m in models.values()]
        lr_schedulers = [make_lr_scheduler(args, opt, self.schedule, accelerator) for opt in optimizers]
        # One call, networks then optimisers then schedules: the checkpoint's file names follow this order.
        prepared = accelerator.prepare(*models.values(), *optimizers, *lr_schedulers)
        n = len(names)
        self.models = dict(zip(names, prepared[:n]))
        self.optimizers = dict(zip(names, prepared[n : 2 * n]))
        self.lr_schedulers = dict(zip(names, prepared[2 * n :]))
        accelerator.register_for_checkpointing(self.state)
        if self.ema is not None:
            self.ema.to(accelerator.device)
            accelerator.register_for_checkpointing(self.ema)
        resume(accelerator, args, self.state)

        if accelerator.is_main_process:
            accelerator.init_trackers(self.project_name, config=tracker_config(args))
            if self.data.validation_subjects:
                self.validator = Validator(self.data.validation_subjects, args)
                self.logger.info("reference methods on the validation slices: %s", self.validator.baselines)
        self.model = accelerator.unwrap_model(self.models[names[0]])

    def validate(self, step: int) -> None:
        """Score :meth:`make_upsampler` (with the EMA weights) on the held-out slices (main process)."""
        if self.validator is None:
            return
        if self.ema is not None:
            self.ema.store(self.model.parameters())
            self.ema.copy_to(self.model.parameters())
        self.model.eval()
        validate(self.accelerator, self.validator, self.make_upsampler(), self.state, step, self.args)
        self.model.train()
        if self.ema is not None:
            self.ema.restore(self.model.parameters())

    def end_of_step(self, clock: Clock) -> str:
        """After an optimiser step: validate and checkpoint when due; returns why to stop, or ``""``.

        A stopping run always leaves a checkpoint, so it can be resumed or extended.
        """
        args, accelerator, step = self.args, self.accelerator, self.state.global_step
        stop = ""
        if step >= self.schedule.max_train_steps:
            stop = f"reached max_train_steps ({self.schedule.max_train_steps})"
        elif clock.out_of_time(accelerator, args.max_train_time_minutes):
            stop = f"wall-time budget of {args.max_train_time_minutes:g} min spent (--max_train_time_minutes)"
        if args.validation_steps and step % args.validation_steps == 0 and not stop:
            if accelerator.is_main_process:
                self.validate(step)
            accelerator.wait_for_everyone()
        if stop or (args.checkpointing_steps and step % args.checkpointing_steps == 0):
            clock.update()
            save_checkpoint(accelerator, args, step)
        return stop

    def loop(self) -> str:
        """Optimiser steps until the step or time budget is spent; returns why it stopped."""
        args, accelerator, state, schedule = self.args, self.accelerator, self.state, self.schedule
        names = list(self.models)
        self.logger.info(
            "%s: %d training samples from %d subject(s); %d steps of %d x %d process(es), %d update(s) per epoch",
            self.project_name, len(self.data.dataset), len(self.data.train_ids), schedule.max_train_steps,
            args.train_batch_size, accelerator.num_processes, schedule.updates_per_epoch,
        )
        clock = Clock(state)
        progress = tqdm(total=schedule.max_train_steps, initial=state.global_step, desc="steps",
                        disable=not progress_bar_wanted(accelerator))
        stop_reason = f"reached max_train_steps ({schedule.max_train_steps})"
        for epoch, batch_index, batch in batches(accelerator, self.data, self.dataloader, schedule, state.global_step, args):
            if state.global_step >= schedule.max_train_steps:
                break
            with accelerator.accumulate(self.models[names[0]]):
                generator = step_generator(args.seed, epoch, batch_index, accelerator.process_index)
                batch = random_crops(batch, args.crop_size, generator)
                losses = self.training_step(batch, generator)
                losses = {"loss": losses} if torch.is_tensor(losses) else losses
                self.optimizer_step(names[0], losses["loss"])
                # The main loss also filled the gradients of the other networks
                # (a discriminator under the adversarial term): they must not leak into their next update.
                for name in names[1:]:
                    self.optimizers[name].zero_grad(set_to_none=True)
            if not accelerator.sync_gradients:
                continue
            if self.ema is not None:
                self.ema.step(self.model.parameters())
            state.global_step += 1
            logs = {k: v.detach().item() for k, v in losses.items()}
            progress.update(1)
            progress.set_postfix({k: f"{v:.4f}" for k, v in logs.items()}, epoch=epoch)
            logs.update(lr=self.lr_schedulers[names[0]].get_last_lr()[0], epoch=epoch)
            if self.ema is not None:
                logs["ema_decay"] = self.ema.cur_decay_value
            accelerator.log(logs, step=state.global_step)
            stop = self.end_of_step(clock)
            if stop:
                stop_reason = stop
                break
        progress.close()
        clock.update()
        self.accelerator.wait_for_everyone()
        return stop_reason

    def finish(self, stop_reason: str) -> None:
        """Final validation, EMA weights into :attr:`model`, :meth:`save`, summary, card and push."""
        args, accelerator = self.args, self.accelerator
        if args.debug_dump_weights:
            dump_weights(accelerator, args, self.model, self.ema)
        if accelerator.is_main_process:
            self.validate(self.state.global_step)
            if self.ema is not None:
                self.ema.copy_to(self.model.parameters())
            self.save(args.output_dir)
            fields = run_fields(args, accelerator, self.data, self.state, self.schedule, stop_reason, self.validator,
                                model_label=self.model_label)
            fields.update(self.card_fields())
            write_json(Path(args.output_dir) / "training_summary.json", summary(fields, self.state, self.validator))
            if self.model_card_template is not None:
                write_model_card(args.output_dir, fields, self.model_card_template, tags=self.card_tags)
            if args.push_to_hub:
                self.logger.info("pushed to https://huggingface.co/%s", push_to_hub(args))
        accelerator.wait_for_everyone()
        accelerator.end_training()

    def train(self) -> int:
        """:meth:`setup`, :meth:`loop`, :meth:`finish`; returns 0."""
        self.setup()
        self.finish(self.loop())
        return 0
