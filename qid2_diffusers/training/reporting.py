"""What a run leaves behind: the saved weights (cast, written atomically), the
facts of the run for ``training_summary.json`` and the model card, the card
itself (a ``huggingface_hub.ModelCard`` from a Jinja template shipped with the
package), weight digests, and the push to the Hub."""

from __future__ import annotations

import datetime
import json
import math
import os
import shutil
import uuid
from pathlib import Path

import diffusers
import torch

from .. import __version__
from ..baselines import method_label
from ..data.io import atomic_write
from ..threads import cpu_name
from .validation import VALIDATION_KEYS

__all__ = [
    "TEMPLATE_DIR",
    "MODEL_CARD_TEMPLATE",
    "GAN_MODEL_CARD_TEMPLATE",
    "CARD_TAGS",
    "run_fields",
    "summary",
    "write_json",
    "save_pretrained_atomic",
    "cast_for_saving",
    "tensors_digest",
    "dump_weights",
    "hardware",
    "format_duration",
    "metrics_table",
    "template_fields",
    "render_model_card",
    "write_model_card",
    "push_to_hub",
]

TEMPLATE_DIR = Path(__file__).resolve().parent / "templates"
#: The card of a QID² pipeline (Jinja2; its first comment lists the fields).
MODEL_CARD_TEMPLATE = TEMPLATE_DIR / "model_card.md"
#: The shorter card of a cGAN / qGAN baseline.
GAN_MODEL_CARD_TEMPLATE = TEMPLATE_DIR / "gan_model_card.md"
#: Hub tags of every card this package writes.
CARD_TAGS = ("diffusion-mri", "medical-imaging", "q-space-upsampling", "dwi")


def run_fields(args, accelerator, data, state, schedule, stop_reason: str, validator, model_label: str = "this model") -> dict:
    """The facts of a run, for the model card and ``training_summary.json``.

    Args:
        args: the trainer's arguments.
        accelerator (`accelerate.Accelerator`): processes and device.
        data ([`~qid2_diffusers.training.data.TrainingData`]): what it was trained on.
        state ([`~qid2_diffusers.training.checkpoints.RunState`]): steps, wall time, last validation.
        schedule ([`~qid2_diffusers.training.data.Schedule`]): the step budget.
        stop_reason (`str`): why the loop ended.
        validator ([`~qid2_diffusers.training.validation.Validator`] or `None`): the held-out slices, if any.
        model_label (`str`, *optional*): this model's row in the validation table.
    """
    command = args.command
    if accelerator.num_processes > 1:
        command = command.replace("python ", f"accelerate launch --num_processes {accelerator.num_processes} ", 1)
    if validator is not None and state.validation:
        rows = {model_label: state.validation}
        rows.update({method_label(k, args.R): v for k, v in validator.baselines.items()})
        slices = "; ".join(dict.fromkeys(f"{it['subject_id']}: axial slices {it['slices']}" for it in validator.items))
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
        "package_version": __version__,
        "diffusers_version": diffusers.__version__,
        "torch_version": torch.__version__,
    }


def summary(fields: dict, state, validator) -> dict:
    """``training_summary.json``: the card's facts, with the figures as numbers."""
    plain = {k: v for k, v in fields.items() if k not in ("validation_table", "validation_figure", "validation_description")}
    return {
        **plain,
        "elapsed_seconds": round(state.elapsed_seconds, 1),
        "validation": state.validation,
        "validation_reference_methods": validator.baselines if validator is not None else {},
        "validation_subject_slices": {it["subject_id"]: it["slices"] for it in validator.items} if validator else {},
    }


def write_json(path, obj) -> Path:
    """``obj`` as indented JSON (:func:`~qid2_diffusers.data.io.atomic_write`)."""
    text = json.dumps(obj, indent=2, sort_keys=True) + "\n"
    return atomic_write(path, lambda tmp: tmp.write_text(text))


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


def hardware(accelerator) -> str:
    """The machine in words, e.g. ``1 x NVIDIA H100 80GB HBM3`` or ``CPU (AMD EPYC (family 26, model 2), x86_64, 2 CPUs)``
    (:func:`~qid2_diffusers.threads.cpu_name`)."""
    if accelerator.device.type == "cuda":
        return f"{accelerator.num_processes} x {torch.cuda.get_device_name(accelerator.device)}"
    return f"CPU ({cpu_name()})"


def format_duration(seconds: float) -> str:
    """``1 h 02 min 03 s`` or ``2 min 03 s``."""
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


def template_fields(template_path) -> set[str]:
    """The names a Jinja model-card template uses (``card_data``, the YAML header, excepted)."""
    from jinja2 import Environment, meta

    return meta.find_undeclared_variables(Environment().parse(Path(template_path).read_text(encoding="utf-8"))) - {"card_data"}


def render_model_card(fields: dict, template_path=MODEL_CARD_TEMPLATE, *, tags=CARD_TAGS):
    """A ``huggingface_hub.ModelCard`` from a template and the fields of a run.

    The YAML header (library, licence, tags) is the card's ``ModelCardData``;
    every other ``{{ name }}`` of the template comes from ``fields``, and a
    name without a field is an error rather than an empty gap in the card.

    Args:
        fields (`dict`): :func:`run_fields` and the trainer's own card fields.
        template_path (`str` or `os.PathLike`, *optional*, defaults to :data:`MODEL_CARD_TEMPLATE`): a Jinja2 template.
        tags (`tuple` of `str`, *optional*, defaults to :data:`CARD_TAGS`): Hub tags.
    """
    from huggingface_hub import ModelCard, ModelCardData

    missing = sorted(template_fields(template_path) - set(fields))
    if missing:
        raise KeyError(f"{Path(template_path).name} needs fields: {', '.join(missing)}")
    card_data = ModelCardData(library_name="diffusers", license="apache-2.0", tags=list(tags))
    return ModelCard.from_template(card_data, template_path=str(template_path), **fields)


def write_model_card(output_dir, fields: dict, template_path=MODEL_CARD_TEMPLATE, **kwargs) -> Path:
    """``output_dir/README.md`` from :func:`render_model_card` (:func:`~qid2_diffusers.data.io.atomic_write`)."""
    text = str(render_model_card(fields, template_path, **kwargs)).rstrip("\n") + "\n"
    return atomic_write(Path(output_dir) / "README.md", lambda tmp: tmp.write_text(text, encoding="utf-8"))


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
