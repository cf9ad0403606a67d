"""Training settings: the argument groups every trainer takes, YAML configs, and
arguments built from Python without a command line."""

from __future__ import annotations

import argparse
import os
import shlex
import sys
from pathlib import Path

from ..data.dataset import TARGETS
from ..denoise import DENOISERS
from ..errors import QID2InputError

__all__ = [
    "CONFIG_DIR",
    "SCRIPT_SPECIFIC",
    "base_parser",
    "parse_args",
    "training_args",
    "number_list",
    "data_settings",
    "load_config",
    "command_line",
    "run",
    "dataloader_workers",
    "tracker_config",
]

#: The shipped configs: ``--config small`` (or ``--preset small`` alone) reads ``CONFIG_DIR/small.yaml``.
CONFIG_DIR = Path(__file__).resolve().parent / "configs"

#: Settings only one of the trainers takes: a config file may hold them and
#: the other ignores them, so one YAML can drive QID² and the GANs.
SCRIPT_SPECIFIC = {
    "prediction_type", "inference_scheduler", "validation_num_inference_steps",  # QID²
    "physics_prior", "timestep_bias_portion", "attention",  # QID²
    "model", "lambda_adversarial", "lambda_l1", "discriminator_update_interval",  # GANs
}


def base_parser(description: str) -> argparse.ArgumentParser:
    """The arguments every trainer takes; a trainer adds its own group to the returned parser."""
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    g = p.add_argument_group("configuration")
    g.add_argument("--config", type=str, default=None,
                   help="YAML file whose keys are argument names, or the name of a shipped one (small, paper, tiny); "
                   "flags given on the command line win.")
    g.add_argument("--preset", type=str, default="small", choices=["tiny", "small", "paper"],
                   help="Network size (qid2_diffusers.models.PRESETS); without --config, the shipped config of that name "
                   "also supplies the defaults ('paper': the paper's protocol). 'tiny' is for tests only.")
    g.add_argument("--bval_conditioning", action="store_true",
                   help="Direction tokens carry b, so one network learns and serves every shell of --shells.")

    g = p.add_argument_group("data")
    g.add_argument("--data_dir", type=str, default=None, help="HCP or BIDS root of the training subjects.")
    g.add_argument("--validation_data_dir", type=str, default=None,
                   help="Root of held-out subjects; without it the last --num_validation_subjects of --data_dir are held out.")
    g.add_argument("--num_validation_subjects", type=int, default=1)
    g.add_argument("--cache_dir", type=str, default=None, help="Preprocessed slice caches; defaults to OUTPUT_DIR/cache.")
    g.add_argument("--shell", type=float, default=1000.0, help="b-value of the shell to learn (see --shells).")
    g.add_argument("--shells", type=number_list(float), default=None,
                   help="Several shells to learn, e.g. 1000,2000,3000 (needs --bval_conditioning); overrides --shell.")
    g.add_argument("--n_acquired", type=number_list(int), default=[30],
                   help="Directions of the shell kept as acquired, the rest being targets; several values "
                        "(e.g. 10,15,20,30,45) train on each, so the model meets sparse and dense acquisitions.")
    g.add_argument("--validation_n_acquired", type=int, default=None,
                   help="Directions kept in validation; default: the first of --n_acquired.")
    g.add_argument("--R", type=int, default=3, help="Reference slices per target.")
    g.add_argument("--denoise", type=str, default="none", choices=DENOISERS,
                   help="Denoise each subject's b0s + kept directions before training and validation, as "
                        "`qid2 upsample --denoise` does at inference (cached with the training data); the prior "
                        "is fit on the denoised series. Train with the denoiser the model will be used after.")
    g.add_argument("--target", type=str, default="acquisition", choices=TARGETS,
                   help="What the target directions hold: the acquisition, or the noise-free signal that "
                        "`qid2 phantom` writes beside each subject (phantom cohorts only).")
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


def number_list(kind):
    """An argparse type for one number or a comma-separated list of them."""

    def parse(text):
        try:
            return [kind(v) for v in str(text).split(",") if v.strip()]
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected numbers separated by commas, got {text!r}") from None

    parse.__name__ = f"{kind.__name__} list"
    return parse


def data_settings(args) -> argparse.Namespace:
    """Shells and kept-direction counts as lists (one number or several, from the command line or YAML)."""
    as_list = lambda v: list(v) if isinstance(v, (list, tuple)) else [v]  # noqa: E731
    args.shells = [float(b) for b in as_list(args.shells if args.shells is not None else args.shell)]
    args.n_acquired = [int(n) for n in as_list(args.n_acquired)]
    if args.validation_n_acquired is None:
        args.validation_n_acquired = args.n_acquired[0]
    return args


def parse_args(parser: argparse.ArgumentParser, argv=None) -> argparse.Namespace:
    """Parse ``argv`` over the defaults of ``--config`` (a YAML file of argument names).

    Precedence: command line, then the config file, then the parser's defaults.
    ``--data_dir`` and ``--output_dir`` are required, on the command line or in the config.
    """
    argv = sys.argv[1:] if argv is None else list(argv)
    pre, _ = parser.parse_known_args(argv)
    config = pre.config
    if config is None and any(a == "--preset" or a.startswith("--preset=") for a in argv):
        config = CONFIG_DIR / f"{pre.preset}.yaml"
    if config:
        parser.set_defaults(**load_config(config, parser))
    args = parser.parse_args(argv)
    for name in ("data_dir", "output_dir"):
        if getattr(args, name) is None:
            parser.error(f"--{name} is required (on the command line or in --config)")
    if args.gradient_accumulation_steps < 1 or args.train_batch_size < 1:
        parser.error("--train_batch_size and --gradient_accumulation_steps must be >= 1")
    args.cache_dir = args.cache_dir or os.path.join(args.output_dir, "cache")
    return args


def training_args(parser: argparse.ArgumentParser, *, output_dir, config=None, **settings) -> argparse.Namespace:
    """Arguments for a trainer driven from Python, without a command line.

    Precedence as for :func:`parse_args`: ``settings``, then ``config``, then
    the parser's defaults; a required option of the command line (e.g. a GAN's
    ``--model``) is a setting like any other here, and ``data_dir`` may stay
    unset when the trainer is given an in-memory dataset.

    Args:
        parser (`argparse.ArgumentParser`): the trainer's parser (it is not parsed, only read).
        output_dir (`str` or `os.PathLike`): checkpoints and final outputs.
        config (`str` or `os.PathLike`, *optional*): a shipped config name or a YAML file.
        settings: argument names and values (e.g. ``max_train_steps=100``); an unknown name is a `TypeError`.

    Example:

    ```py
    >>> from qid2_diffusers.training.qid2 import QID2Trainer
    >>> args = QID2Trainer.training_args(output_dir="runs/tta", config="tiny", max_train_steps=20)
    >>> args.max_train_steps, args.preset
    (20, 'tiny')
    ```
    """
    defaults = {a.dest: a.default for a in parser._actions if a.dest != "help"}
    unknown = sorted(set(settings) - set(defaults))
    if unknown:
        raise TypeError(f"unknown training setting(s): {', '.join(unknown)}")
    if config is None and "preset" in settings:
        config = CONFIG_DIR / f"{settings['preset']}.yaml"
    if config is not None:
        defaults.update(load_config(config, parser))
    args = argparse.Namespace(**{**defaults, **settings, "config": config and str(config), "output_dir": str(output_dir)})
    args.cache_dir = args.cache_dir or os.path.join(args.output_dir, "cache")
    return args


def load_config(path, parser: argparse.ArgumentParser) -> dict:
    """Settings of a YAML config file (a path, or the name of one in :data:`CONFIG_DIR`), checked against the parser's argument names."""
    import yaml

    path = Path(path)
    for candidate in (CONFIG_DIR / path.name, CONFIG_DIR / f"{path.name}.yaml"):
        if not path.is_file() and candidate.is_file():
            path = candidate
    if not path.is_file():
        raise QID2InputError(path, f"config file not found (shipped configs: {', '.join(sorted(p.stem for p in CONFIG_DIR.glob('*.yaml')))})")
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


def command_line(argv, script: str | None = None, module: str | None = None) -> str:
    """The command that ran, as a user would retype it.

    ``python -m MODULE ...`` when the package module itself was run, else
    ``python SCRIPT ...`` with the entry script's path in a checkout (e.g.
    ``training/train_qid2.py``), also when a script is called from Python;
    without either, the program as it was started.
    """
    ran = Path(sys.argv[0]).resolve() if sys.argv and sys.argv[0] else None
    if module and ran is not None and ran.parent == Path(__file__).resolve().parent:
        invocation = ["-m", module]
    else:
        invocation = [script or (sys.argv[0] if sys.argv and sys.argv[0] else "train.py")]
    return " ".join(shlex.quote(a) for a in ["python", *invocation, *argv])


def run(main, argv=None) -> int:
    """``main(argv)``, with an input error ending it with one line on stderr and exit status 2."""
    try:
        return main(argv)
    except QID2InputError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


def dataloader_workers(args) -> int:
    """``--dataloader_num_workers``, or a default from the number of cores."""
    if args.dataloader_num_workers is not None:
        return args.dataloader_num_workers
    cores = os.cpu_count() or 1
    return 0 if cores <= 2 else min(8, cores // 2)


def tracker_config(args) -> dict:
    """Hyper-parameters as TensorBoard can store them (scalars and strings only)."""
    return {k: v for k, v in vars(args).items() if isinstance(v, (int, float, str, bool)) and k != "hub_token"}
