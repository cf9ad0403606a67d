"""Up-samplers to compare QID² with, and one factory that builds any method by name.

Every method is a :class:`~qid2_diffusers.upsampling.VolumeUpsampler`, so
evaluation, the command line and the demo treat QID² and the baselines alike;
the learned ones load their weights through :mod:`qid2_diffusers.hub` and
:func:`~qid2_diffusers.models.gan.load_generator`.
"""

from __future__ import annotations

from pathlib import Path

from .dti import DTIUpsampler
from .interp import InterpUpsampler, interpolation_weights
from .sh import SHUpsampler, sh_resampling_matrix

__all__ = [
    "DTIUpsampler",
    "InterpUpsampler",
    "SHUpsampler",
    "interpolation_weights",
    "sh_resampling_matrix",
    "METHODS",
    "DENOISED_METHODS",
    "MissingWeightsError",
    "split_method",
    "denoiser_label",
    "make_upsampler",
    "method_label",
    "uses_references",
]

#: Method names accepted by :func:`make_upsampler`, in the order tables list them.
METHODS = ("qid2", "cgan", "qgan", "interp", "dti", "sh2", "sh4", "sh6")

#: Denoise-then-predict methods (``DENOISER+METHOD``, any denoiser of
#: :data:`~qid2_diffusers.denoise.DENOISERS` and any of :data:`METHODS`): the
#: b0s and kept directions are denoised first and the method predicts from them,
#: as a practitioner runs ``dwidenoise`` before fitting. These are the ones
#: listed by default on real scans.
DENOISED_METHODS = ("mppca+dti", "mppca+sh2", "mppca+sh4", "patch2self+dti")

_DENOISER_LABELS = {"mppca": "MP-PCA", "dwidenoise": "dwidenoise", "patch2self": "Patch2Self"}


def denoiser_label(denoiser: str) -> str:
    """Display name of a denoiser: ``"mppca"`` -> ``"MP-PCA"``."""
    return _DENOISER_LABELS[denoiser]


def split_method(name: str) -> tuple[str | None, str]:
    """``"mppca+dti"`` -> ``("mppca", "dti")``; a plain method -> ``(None, name)``.

    Raises:
        ValueError: an unknown denoiser or method.
    """
    denoiser, plus, base = name.rpartition("+")
    if base not in METHODS or plus and denoiser not in _DENOISER_LABELS:
        known = ", ".join(METHODS)
        raise ValueError(f"unknown method {name!r}; choose from {known}, each optionally prefixed by "
                         f"{' or '.join(d + '+' for d in _DENOISER_LABELS)}")
    return (denoiser or None), base


class MissingWeightsError(FileNotFoundError):
    """A learned method was asked for but its weights are not available."""


def uses_references(name: str) -> bool:
    """Whether the method works from the R nearest references (so R matters)."""
    return name in ("qid2", "cgan", "qgan", "interp")


def method_label(name: str, num_references: int | None = None) -> str:
    """Display name for tables and figures, e.g. ``"QID² (R=3)"``, ``"SH (order 4)"`` or
    ``"MP-PCA + DTI-predict"``."""
    denoiser, name = split_method(name)
    if denoiser is not None:
        return f"{denoiser_label(denoiser)} + {method_label(name, num_references)}"
    base = {"qid2": "QID²", "cgan": "cGAN", "qgan": "qGAN", "interp": "Interp", "dti": "DTI-predict"}
    if name.startswith("sh"):
        return f"SH (order {name[2:]})"
    label = base.get(name, name)
    return f"{label} (R={num_references})" if uses_references(name) and num_references else label


def _weights_folder(path, what: str, flag: str) -> Path:
    if path is None:
        raise MissingWeightsError(f"no {what} weights given (pass {flag} PATH)")
    path = Path(path)
    if not path.is_dir():
        raise MissingWeightsError(f"{path}: no {what} weights folder there")
    return path


def make_upsampler(
    name: str,
    *,
    num_references: int = 3,
    model_path=None,
    scheduler: str | None = None,
    num_inference_steps: int | None = None,
    num_samples: int = 1,
    adapt_steps: int | None = None,
    residual_weight=None,
    batch_size: int = 32,
    seed: int = 0,
    device=None,
    dtype: str = "auto",
    progress: bool = True,
):
    """Build an up-sampler by method name.

    Args:
        name (`str`): one of :data:`METHODS`: ``qid2``, ``cgan``, ``qgan``,
            ``interp``, ``dti``, ``sh2``, ``sh4``, ``sh6``.
        num_references (`int`, *optional*, defaults to 3): R, for the methods
            that use references (QID², the GANs, Interp).
        model_path (`str` or `os.PathLike`, *optional*): weights folder of a
            learned method; for ``qid2`` defaults to the shipped model
            (:func:`~qid2_diffusers.pretrained.default_model_path`).
        scheduler (`str`, *optional*): QID² sampler name (see
            :data:`~qid2_diffusers.schedulers.SCHEDULERS`); defaults to the saved one.
        num_inference_steps (`int`, *optional*): QID² sampling steps.
        num_samples (`int`, *optional*, defaults to 1): QID² samples averaged per target.
        adapt_steps (`int`, *optional*): QID² test-time adaptation steps on each scan; defaults to the model's.
        residual_weight (`str` or `float`, *optional*): QID²'s weight of its residual over the tensor prior
            (``"auto"`` or a number in [0, 1]; :class:`~qid2_diffusers.pipelines.QID2Upsampler`).
        batch_size (`int`, *optional*, defaults to 32): slices per network call (learned methods).
        seed (`int`, *optional*, defaults to 0): sampling seed.
        device (`str` or `torch.device`, *optional*): see
            :func:`~qid2_diffusers.hub.select_device`; defaults to the best available.
        dtype (`str`, *optional*, defaults to `"auto"`): QID²'s network precision, ``auto``, ``fp32``, ``fp16`` or
            ``bf16`` (:func:`~qid2_diffusers.hub.select_dtype`).
        progress (`bool`, *optional*, defaults to `True`): tqdm bars.

    Raises:
        MissingWeightsError: a learned method whose weights are absent.
        ValueError: an unknown name, or weights trained for another R.
    """
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; choose from {', '.join(METHODS)}")
    if name == "interp":
        return InterpUpsampler(num_references)
    if name == "dti":
        return DTIUpsampler()
    if name.startswith("sh"):
        return SHUpsampler(int(name[2:]))
    if name == "qid2":
        return _make_qid2(model_path, num_references, scheduler, num_inference_steps, num_samples, adapt_steps,
                          residual_weight, batch_size, seed, device, dtype, progress)
    return _make_gan(name, model_path, num_references, batch_size, device, progress)


def _make_qid2(model_path, num_references, scheduler, steps, num_samples, adapt_steps, residual_weight, batch_size,
               seed, device, dtype, progress):
    from ..hub import load_pipeline, model_num_references
    from ..pipelines import QID2Upsampler

    if model_path is None:
        from ..pretrained import default_model_path

        try:
            model_path = default_model_path(num_references)
        except FileNotFoundError as exc:
            raise MissingWeightsError(str(exc)) from None
    path = _weights_folder(model_path, "QID²", "--model")
    if not (path / "model_index.json").is_file():
        raise MissingWeightsError(f"{path}: not a QID² pipeline folder (no model_index.json)")
    if model_num_references(path) != num_references:
        raise ValueError(f"{path}: this QID² model takes R = {model_num_references(path)}, not R = {num_references}")
    pipe = load_pipeline(path, scheduler=scheduler, device=device, dtype=dtype)
    upsampler = QID2Upsampler(pipe, num_inference_steps=steps, num_samples=num_samples, batch_size=batch_size,
                              seed=seed, progress=progress, adapt_steps=adapt_steps, residual_weight=residual_weight)
    upsampler.name = f"qid2-r{num_references}"
    return upsampler


def _make_gan(name, model_path, num_references, batch_size, device, progress):
    from ..hub import select_device
    from .gan import GANUpsampler

    path = _weights_folder(model_path, name, f"--{name}")
    if not (path / "config.json").is_file():
        raise MissingWeightsError(f"{path}: not a saved {name} generator (no config.json)")
    upsampler = GANUpsampler.from_pretrained(
        path, batch_size=batch_size, device=select_device(device), progress=progress
    )
    if upsampler.generator.kind != name:
        raise ValueError(f"{path}: holds a {upsampler.generator.kind} generator, not a {name}")
    if upsampler.num_references != num_references:
        raise ValueError(f"{path}: this {name} takes R = {upsampler.num_references}, not R = {num_references}")
    upsampler.name = f"{name}-r{num_references}"
    return upsampler
