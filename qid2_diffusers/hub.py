"""Loading a QID² pipeline for inference: from a folder, the package or the Hub.

Every entry point (``qid2 upsample``, the example, the demo) loads its model
here, so a folder missing files, a model trained for another R, an unknown
sampler or an unavailable device give the same one-line error everywhere.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import torch

from .errors import QID2InputError
from .schedulers import SCHEDULERS, make_scheduler

__all__ = [
    "DEVICES",
    "DTYPES",
    "MODEL_FILES",
    "resolve_model",
    "model_num_references",
    "select_device",
    "select_dtype",
    "dtype_name",
    "native_bf16_cpu",
    "with_scheduler",
    "load_pipeline",
]

DEVICES = ("auto", "cpu", "cuda", "mps")
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
#: ``--dtype`` choices: ``auto`` (the default) is bf16 on a CPU that multiplies bf16 natively, else fp32.
DTYPE_CHOICES = ("auto", *DTYPES)

#: Files a saved QID² pipeline cannot load without; each model also needs its weights.
MODEL_FILES = (
    "model_index.json",
    "scheduler/scheduler_config.json",
    "unet/config.json",
    "direction_encoder/config.json",
)
_WEIGHT_NAMES = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def _dtype_keyword() -> str:
    # diffusers 0.42 renamed from_pretrained's ``torch_dtype`` to ``dtype`` (the old name warns).
    import diffusers
    from packaging.version import Version

    return "dtype" if Version(diffusers.__version__).release >= (0, 42) else "torch_dtype"


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise QID2InputError(path, f"unreadable model file ({exc.__class__.__name__})") from None


def _check_folder(folder: Path) -> None:
    missing = [name for name in MODEL_FILES if not (folder / name).is_file()]
    missing += [
        f"{part}/{_WEIGHT_NAMES[0]}"
        for part in ("unet", "direction_encoder")
        if not any((folder / part / w).is_file() for w in _WEIGHT_NAMES)
    ]
    if missing:
        raise QID2InputError(folder, f"not a complete QID² model folder: missing {', '.join(missing)}")
    name = _read_json(folder / "model_index.json").get("_class_name")
    if name != "QID2Pipeline":
        raise QID2InputError(folder / "model_index.json", f"is a {name} pipeline, not a QID2Pipeline")


def _download(repo_id: str) -> Path:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        HFValidationError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    try:
        # snapshot_download serves the cached snapshot when HF_HUB_OFFLINE=1
        # or when the Hub cannot be reached, so a cached model works offline.
        return Path(snapshot_download(repo_id))
    except LocalEntryNotFoundError:
        raise QID2InputError(
            repo_id, "no such model folder, and not in the Hugging Face cache (offline or the Hub unreachable)"
        ) from None
    except GatedRepoError:
        raise QID2InputError(repo_id, "gated Hub model: log in (hf auth login) with access to it") from None
    except (RepositoryNotFoundError, RevisionNotFoundError, HFValidationError):
        raise QID2InputError(repo_id, "no such model folder, and no such model on the Hugging Face Hub") from None


def model_num_references(folder) -> int:
    """R of a saved QID² pipeline, read from its direction encoder's config.

    Not from the U-Net's input channels: a physics-prior model has two more than 1 + R.
    """
    folder = Path(folder)
    return int(_read_json(folder / "direction_encoder" / "config.json")["num_references"])


def resolve_model(model: str | os.PathLike | None = None, num_references: int | None = None) -> Path:
    """The local folder of a QID² pipeline, checked to be complete and of the right R.

    Args:
        model (`str` or `os.PathLike`, *optional*):
            a folder written by ``save_pretrained``, or a Hub id ``org/name``
            (downloaded once, then read from the Hugging Face cache, also
            offline). Defaults to the model shipped for ``num_references``.
        num_references (`int`, *optional*):
            R the caller expects; defaults to 3 for the shipped model and to
            the model's own R otherwise.

    Raises:
        QID2InputError: a missing or incomplete folder, an unknown Hub id, or
            a model trained for another R.
    """
    if model is None:
        from .pretrained import default_model_path

        r = 3 if num_references is None else int(num_references)
        try:
            folder = default_model_path(r)
        except FileNotFoundError as exc:
            raise QID2InputError(None, f"{exc}; pass --model PATH_OR_HUB_ID") from None
    else:
        folder = Path(model).expanduser()
        if not folder.exists():
            if not _REPO_ID.match(str(model)):
                raise QID2InputError(model, "no such model folder")
            folder = _download(str(model))
        elif not folder.is_dir():
            raise QID2InputError(model, "is a file; a model is a folder written by save_pretrained")
    _check_folder(folder)
    r = model_num_references(folder)
    if num_references is not None and r != int(num_references):
        raise QID2InputError(folder, f"model was trained for R = {r} references, not R = {num_references}")
    return folder


def select_device(name: str | torch.device | None = "auto") -> torch.device:
    """The torch device to run on.

    ``auto`` (or `None`) picks CUDA, then Apple MPS, then the CPU; a named
    device (``cpu``, ``cuda``, ``cuda:1``, ``mps``, or a ``torch.device`` as
    Accelerate assigns one per process) must be available.
    """
    cuda = torch.cuda.is_available()
    mps = getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()
    if name is None or name == "auto":
        return torch.device("cuda" if cuda else "mps" if mps else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError):
        device = None
    if device is None or device.type not in DEVICES:
        raise QID2InputError(None, f"unknown device {name!r}; choose from {', '.join(DEVICES)}")
    if (device.type == "cuda" and not cuda) or (device.type == "mps" and not mps):
        raise QID2InputError(None, f"device {name} requested but not available on this machine")
    return device


def native_bf16_cpu() -> bool:
    """Whether this CPU multiplies bf16 natively (AVX-512 BF16 or AMX, as oneDNN checks it).

    Elsewhere bf16 is emulated and slower than fp32.
    """
    try:
        return bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):  # a build without oneDNN, or without the check
        return False


def select_dtype(name: str = "auto", device: str | torch.device | None = "cpu") -> torch.dtype:
    """The torch dtype for ``auto``, ``fp32``, ``fp16`` or ``bf16`` on ``device``.

    ``auto`` is bf16 on a CPU with native bf16 and fp32 elsewhere: on the validation phantoms bf16 left the
    FA error unchanged to the fifth decimal (held-out phantoms: ratios within 0.002; real scans: within 0.014)
    and cut the network's time by a fifth on such a CPU (BENCHMARK.md, "Speed"); on GPUs it was not
    measured, so they keep fp32 unless told.
    """
    if name not in DTYPE_CHOICES:
        raise QID2InputError(None, f"unknown dtype {name!r}; choose from {', '.join(DTYPE_CHOICES)}")
    if name == "auto":
        return torch.bfloat16 if select_device(device).type == "cpu" and native_bf16_cpu() else torch.float32
    return DTYPES[name]


def dtype_name(dtype: torch.dtype) -> str:
    """``fp32``, ``fp16`` or ``bf16`` for a torch dtype (what ``auto`` came out as, in summaries)."""
    return next((name for name, d in DTYPES.items() if d == dtype), str(dtype))


def with_scheduler(pipeline, name: str | None):
    """The pipeline with the sampler ``name`` (built from its training config).

    Returns a new pipeline sharing the weights, so callers holding the
    original (e.g. the demo's cache) keep their sampler. ``None`` keeps the
    saved one.
    """
    if name is None:
        return pipeline
    if name not in SCHEDULERS:
        raise QID2InputError(None, f"unknown scheduler {name!r}; choose from {', '.join(SCHEDULERS)}")
    swapped = type(pipeline)(
        unet=pipeline.unet,
        direction_encoder=pipeline.direction_encoder,
        scheduler=make_scheduler(name, pipeline.scheduler.config),
        default_num_inference_steps=pipeline.config.default_num_inference_steps,
        physics_prior=pipeline.physics_prior,
        default_adapt_steps=pipeline.config.default_adapt_steps,
    )
    # Where the weights came from, as from_pretrained records it.
    swapped.register_to_config(_name_or_path=pipeline.name_or_path)
    return swapped


def load_pipeline(
    model: str | os.PathLike | None = None,
    *,
    num_references: int | None = None,
    scheduler: str | None = None,
    device: str | torch.device = "auto",
    dtype: str = "auto",
    compile: bool = False,
):
    """A QID² pipeline ready to sample, on ``device`` in ``dtype``.

    Args:
        model (`str` or `os.PathLike`, *optional*): folder or Hub id, see
            :func:`resolve_model`; defaults to the shipped model.
        num_references (`int`, *optional*): R expected by the caller.
        scheduler (`str`, *optional*): one of ``SCHEDULERS``; defaults to the
            sampler saved with the model.
        device (`str` or `torch.device`, *optional*, defaults to `"auto"`):
            see :func:`select_device`.
        dtype (`str`, *optional*, defaults to `"auto"`): ``auto``, ``fp32``, ``fp16`` or ``bf16``;
            see :func:`select_dtype`.
        compile (`bool`, *optional*, defaults to `False`): ``torch.compile`` the
            U-Net (:func:`compile_unet`); for GPUs. The up-sampler then crops every slice to the volume's
            brain box (one input shape); on 2 CPU cores that was slower than eager with per-slice boxes.

    Example:

    ```py
    >>> from qid2_diffusers.hub import load_pipeline
    >>> pipe = load_pipeline(scheduler="ddim", device="cpu")  # doctest: +SKIP
    ```
    """
    from .pipelines import QID2Pipeline

    # Cheap checks first: a typo in a flag must not cost a model load.
    if scheduler is not None and scheduler not in SCHEDULERS:
        raise QID2InputError(None, f"unknown scheduler {scheduler!r}; choose from {', '.join(SCHEDULERS)}")
    dev = select_device(device)
    torch_dtype = select_dtype(dtype, dev)
    folder = resolve_model(model, num_references)
    pipe = QID2Pipeline.from_pretrained(str(folder), **{_dtype_keyword(): torch_dtype})
    pipe.set_progress_bar_config(disable=True)
    pipe = with_scheduler(pipe, scheduler).to(dev)
    return compile_unet(pipe) if compile else pipe


def compile_unet(pipe, **kwargs):
    """``torch.compile`` the pipeline's U-Net in place (the network is > 99% of the work) and return the pipeline.

    Shapes change only with the batch and the brain's bounding box, so a
    whole subject compiles a handful of graphs, once. ``kwargs`` go to
    ``torch.compile`` (e.g. ``mode="max-autotune"``; ``backend="eager"`` only traces).
    """
    pipe.unet = torch.compile(pipe.unet, **kwargs)
    return pipe
