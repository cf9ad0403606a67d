"""Average the weights of QID² pipelines fine-tuned from one start ("model soup").

Runs of ``train_qid2.py`` that start from the same ``--pretrained_model_name_or_path``
stay in one basin of the loss, so the mean of their weights is a model too,
usually better than each (Wortsman et al., *Model soups*, ICML 2022): two
fine-tunes on different views of the data (32x32 crops, whole slices) run
side by side on two cores, then average. The result is an ordinary
``QID2Pipeline`` folder; with ``--validation_data_dir`` it is scored with the
training validation (and Interp / DTI-predict on the same slices) and the
figures go to ``OUTPUT_DIR/average_summary.json`` and ``validation.png``::

    python training/average_weights.py --inputs runs/crops runs/slices --output_dir runs/soup \\
        --validation_data_dir data/val --cache_dir runs/cache --default_num_inference_steps 1

The inputs must share the architecture, R and prediction type (checked). One
input re-saves it with new defaults (sampler, steps, test-time adaptation
steps), scored the same way: how a run becomes a shipped model.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from ..denoise import DENOISERS
from ..errors import QID2InputError
from ..hub import resolve_model
from ..pipelines import QID2Pipeline
from ..schedulers import SCHEDULERS, make_scheduler
from .config import command_line, number_list, run
from .reporting import cast_for_saving, metrics_table, save_pretrained_atomic, write_json
from .validation import VALIDATION_RESIDUAL_WEIGHT, Validator, write_validation_figure

__all__ = ["average_pipelines", "parse_args", "average", "main"]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--inputs", nargs="+", required=True, help="QID² pipeline folders (train_qid2.py outputs)")
    p.add_argument("--output_dir", required=True)
    p.add_argument("--inference_scheduler", choices=sorted(SCHEDULERS), help="sampler to save (default: the first input's)")
    p.add_argument("--default_num_inference_steps", type=int, help="steps to save (default: the first input's)")
    p.add_argument("--default_adapt_steps", type=int,
                   help="test-time adaptation steps to save as the model's default (default: the first input's)")
    p.add_argument("--save_dtype", choices=["fp16", "fp32"], default="fp16")
    p.add_argument("--validation_data_dir", help="held-out subjects to score the average on (HCP or BIDS root)")
    p.add_argument("--cache_dir", help="slice caches of the validation subjects (default: OUTPUT_DIR/cache)")
    p.add_argument("--validation_num_slices", type=int, default=2)
    p.add_argument("--shells", type=number_list(float), default=[1000.0], help="shells to validate on (default 1000)")
    p.add_argument("--n_acquired", type=int, default=30, help="directions kept in validation (default 30)")
    p.add_argument("--denoise", choices=DENOISERS, default="none",
                   help="denoise the validation inputs first, as the inputs were denoised in training (train_qid2.py --denoise)")
    args = p.parse_args(argv)
    args.validation_n_acquired = args.n_acquired
    return args


def _architecture(module) -> dict:
    """A module's config without the bookkeeping keys (``_name_or_path``, ...) that differ between saves."""
    return {k: v for k, v in module.config.items() if not k.startswith("_")}


def average_pipelines(folders) -> QID2Pipeline:
    """The first pipeline with every U-Net and direction-encoder weight replaced by the mean over ``folders``."""
    # resolve_model: a missing or incomplete folder is a one-line error, not a traceback.
    pipes = [QID2Pipeline.from_pretrained(str(resolve_model(f)), torch_dtype=torch.float32) for f in folders]
    first = pipes[0]
    for folder, pipe in zip(folders[1:], pipes[1:]):
        if any(_architecture(getattr(pipe, n)) != _architecture(getattr(first, n)) for n in ("unet", "direction_encoder")):
            raise QID2InputError(folder, f"has another architecture than {folders[0]}")
        if pipe.scheduler.config.prediction_type != first.scheduler.config.prediction_type:
            raise QID2InputError(folder, f"predicts {pipe.scheduler.config.prediction_type}, "
                                         f"{folders[0]} {first.scheduler.config.prediction_type}")
    for name in ("unet", "direction_encoder"):
        states = [getattr(p, name).state_dict() for p in pipes]
        mean = {k: sum(s[k] for s in states) / len(states) if states[0][k].is_floating_point() else states[0][k]
                for k in states[0]}
        getattr(first, name).load_state_dict(mean)
    return first


def average(argv=None) -> int:
    """Average ``--inputs`` into ``--output_dir``, scored on ``--validation_data_dir`` when given."""
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    start = time.perf_counter()
    mean = average_pipelines(args.inputs)
    # A new pipeline object, so model_index.json does not name the first input's folder.
    pipe = QID2Pipeline(
        unet=mean.unet,
        direction_encoder=mean.direction_encoder,
        scheduler=make_scheduler(args.inference_scheduler, mean.scheduler.config) if args.inference_scheduler
        else mean.scheduler,
        default_num_inference_steps=args.default_num_inference_steps or mean.config.default_num_inference_steps,
        physics_prior=mean.physics_prior,
        default_adapt_steps=mean.config.get("default_adapt_steps", 0) if args.default_adapt_steps is None
        else args.default_adapt_steps,
    )
    pipe.set_progress_bar_config(disable=True)

    command = command_line(argv, "training/average_weights.py", "qid2_diffusers.training.average_weights")
    summary = {"inputs": [str(Path(f)) for f in args.inputs], "command": command,
               "scheduler": type(pipe.scheduler).__name__,
               "default_num_inference_steps": pipe.config.default_num_inference_steps,
               "default_adapt_steps": pipe.config.default_adapt_steps}
    if args.validation_data_dir:
        from ..data.layouts import discover_subjects
        from ..pipelines import QID2Upsampler

        args.R = pipe.num_references
        args.cache_dir = args.cache_dir or str(Path(args.output_dir) / "cache")
        validator = Validator(discover_subjects(args.validation_data_dir), args)
        metrics, figure = validator.run(QID2Upsampler(pipe, progress=False, residual_weight=VALIDATION_RESIDUAL_WEIGHT))
        summary["validation"] = {"slices": {i["subject_id"]: i["slices"] for i in validator.items},
                                 "average": metrics, **validator.baselines}
        print(metrics_table({"average": metrics, "Interp (R=%d)" % args.R: validator.baselines["interp"],
                             "DTI-predict": validator.baselines["dti"]}))
    summary["wall_time_s"] = time.perf_counter() - start

    for module in (pipe.unet, pipe.direction_encoder):
        cast_for_saving(module, args)
    save_pretrained_atomic(pipe, args.output_dir, safe_serialization=True)
    write_json(Path(args.output_dir) / "average_summary.json", summary)
    if args.validation_data_dir:
        write_validation_figure(args.output_dir, figure)
    print(json.dumps({k: v for k, v in summary.items() if k != "validation"}, indent=1))
    return 0


def main(argv=None) -> int:
    """:func:`average`, with an input error (e.g. pipelines of different R) as one line and exit status 2."""
    return run(average, argv)


if __name__ == "__main__":
    sys.exit(main())
