"""QID2Pipeline: sample a target-direction DWI slice from R reference slices."""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
from diffusers import DiffusionPipeline, SchedulerMixin, UNet2DConditionModel
from diffusers.utils import BaseOutput
from diffusers.utils.torch_utils import randn_tensor

from ..image_processor import QID2ImageProcessor
from ..models.direction_encoder import DirectionEncoder
from ..models.unet import PRIOR_CHANNELS, unet_forward

__all__ = ["QID2Pipeline", "QID2PipelineOutput"]


@dataclass
class QID2PipelineOutput(BaseOutput):
    """Output of :class:`QID2Pipeline`.

    Args:
        images (`np.ndarray` or `torch.Tensor` of shape `(B, H, W)`):
            generated target slices in the references' intensity units (the
            mean over samples when ``num_samples > 1``).
        samples (`np.ndarray` or `torch.Tensor` of shape `(B, S, H, W)`):
            every sample, when ``num_samples > 1``; otherwise `None`.
        std (`np.ndarray` or `torch.Tensor` of shape `(B, H, W)`):
            per-pixel standard deviation over samples (an uncertainty map)
            when ``num_samples > 1``; otherwise `None`.
    """

    images: np.ndarray | torch.Tensor
    samples: np.ndarray | torch.Tensor | None = None
    std: np.ndarray | torch.Tensor | None = None


def _as_tensor(x, name: str) -> torch.Tensor:
    if x is None:
        raise ValueError(f"{name} are required by this model")
    if isinstance(x, (list, tuple)) and len({tuple(np.shape(v)) for v in x}) > 1:
        raise ValueError(f"{name} have different shapes: {sorted({tuple(np.shape(v)) for v in x})}")
    t = x if isinstance(x, torch.Tensor) else torch.as_tensor(np.asarray(x, dtype=np.float32))
    if not torch.is_floating_point(t):
        t = t.float()
    if not torch.all(torch.isfinite(t)):
        raise ValueError(f"{name} contain NaN or Inf")
    return t


class QID2Pipeline(DiffusionPipeline):
    r"""Pipeline for q-space up-sampling of diffusion MRI with QID².

    For each target gradient direction the model denoises a target slice while
    seeing the R acquired slices whose directions are nearest to it (input
    channels) and the directions themselves (cross-attention tokens).

    Args:
        unet ([`UNet2DConditionModel`]): the denoiser, ``in_channels = 1 + R``.
        direction_encoder ([`DirectionEncoder`]): turns directions into R + 1 tokens.
        scheduler ([`SchedulerMixin`]): any diffusers scheduler compatible
            with DDPM training, e.g. [`DDPMScheduler`], [`DDIMScheduler`],
            [`DPMSolverMultistepScheduler`], [`UniPCMultistepScheduler`].
        default_num_inference_steps (`int`, *optional*, defaults to 1000):
            steps used when a call does not say.
        physics_prior (`bool`, *optional*, defaults to `False`): the U-Net also
            sees a tensor-fit prediction of each target slice (``prior_images``)
            and the mean b0 (``b0_images``), and models the residual
            target - prior: with nothing to add it returns the fit. `False` is
            the paper's configuration.
        default_adapt_steps (`int`, *optional*, defaults to 0): test-time
            adaptation steps a volume up-sampler uses when not told
            (:func:`~qid2_diffusers.pipelines.adaptation.adapt_pipeline`); set
            from measurements when a model is shipped.

    Example:

    ```py
    >>> from qid2_diffusers import QID2Pipeline
    >>> pipe = QID2Pipeline.from_pretrained(QID2Pipeline.default_model_path())  # doctest: +SKIP
    >>> out = pipe(reference_images, reference_bvecs, target_bvecs, generator=torch.manual_seed(0))  # doctest: +SKIP
    >>> out.images.shape  # doctest: +SKIP
    (1, 145, 174)
    ```
    """

    model_cpu_offload_seq = "direction_encoder->unet"

    def __init__(
        self,
        unet: UNet2DConditionModel,
        direction_encoder: DirectionEncoder,
        scheduler: SchedulerMixin,
        default_num_inference_steps: int = 1000,
        physics_prior: bool = False,
        default_adapt_steps: int = 0,
    ):
        super().__init__()
        r = direction_encoder.config.num_references
        expected = 1 + r + (PRIOR_CHANNELS if physics_prior else 0)
        if unet.config.in_channels != expected:
            prior = f" + {PRIOR_CHANNELS} prior channels" if physics_prior else ""
            raise ValueError(
                f"direction encoder is for R = {r}, so the U-Net should take 1 + {r}{prior} = {expected} "
                f"input channels; it takes {unet.config.in_channels}"
            )
        self.register_modules(unet=unet, direction_encoder=direction_encoder, scheduler=scheduler)
        self.register_to_config(default_num_inference_steps=default_num_inference_steps,
                                physics_prior=bool(physics_prior), default_adapt_steps=int(default_adapt_steps))
        self.image_processor = QID2ImageProcessor.for_unet(unet)

    @property
    def num_references(self) -> int:
        """R, the number of reference slices this model was trained with."""
        return int(self.direction_encoder.config.num_references)

    @property
    def physics_prior(self) -> bool:
        """Whether the model takes a tensor-fit prior and the mean b0 (see the class docstring)."""
        return bool(self.config.get("physics_prior", False))

    @property
    def bval_conditioning(self) -> bool:
        """Whether the direction tokens carry b-values (one model for every shell)."""
        return bool(self.direction_encoder.config.get("bval_conditioning", False))

    @staticmethod
    def default_model_path(num_references: int = 3) -> str:
        """Folder of the weights shipped inside the package."""
        from ..pretrained import default_model_path

        return str(default_model_path(num_references))

    def _prepare_inputs(self, reference_images, reference_bvecs, target_bvecs):
        refs = _as_tensor(reference_images, "reference images")
        if refs.ndim == 3:
            refs = refs[None]
        if refs.ndim != 4:
            raise ValueError(
                f"reference images must be (R, H, W) or (B, R, H, W) slices, got shape {tuple(refs.shape)}"
            )
        b, r = refs.shape[:2]
        if r != self.num_references:
            raise ValueError(f"this model takes R = {self.num_references} reference images, got {r}")
        rb = _as_tensor(reference_bvecs, "reference b-vectors")
        if rb.ndim == 2:
            rb = rb[None].expand(b, -1, -1)
        tb = _as_tensor(target_bvecs, "target b-vectors")
        if tb.ndim == 1:
            tb = tb[None].expand(b, -1)
        if rb.shape != (b, r, 3):
            raise ValueError(
                f"got {r} reference images but reference b-vectors of shape {tuple(rb.shape)} "
                f"(expected ({r}, 3) or ({b}, {r}, 3))"
            )
        if tb.shape != (b, 3):
            raise ValueError(f"target b-vectors must be (3,) or ({b}, 3), got {tuple(tb.shape)}")
        for name, v in (("reference", rb), ("target", tb)):
            if torch.any(v.norm(dim=-1) < 1e-8):
                raise ValueError(f"a {name} b-vector has zero length")
        return refs, rb, tb

    def _prepare_bvals(self, target_bvals, reference_bvals, b: int, r: int):
        if not self.bval_conditioning:
            return None, None
        if target_bvals is None or reference_bvals is None:
            raise ValueError("this model is b-conditioned: give target_bvals and reference_bvals (s/mm²)")
        tv = torch.as_tensor(np.asarray(target_bvals, dtype=np.float32)).reshape(-1)
        rv = torch.as_tensor(np.asarray(reference_bvals, dtype=np.float32))
        tv = tv.expand(b) if tv.numel() == 1 else tv
        rv = rv.reshape(1, 1).expand(b, r) if rv.numel() == 1 else (rv[None].expand(b, -1) if rv.ndim == 1 else rv)
        if tv.shape != (b,) or rv.shape != (b, r):
            raise ValueError(f"b-values must be scalars or of shape ({b},) and ({b}, {r}), got "
                             f"{tuple(tv.shape)} and {tuple(rv.shape)}")
        if not (torch.all(torch.isfinite(tv)) and torch.all(torch.isfinite(rv))) or torch.any(tv <= 0) or torch.any(rv <= 0):
            raise ValueError("b-values must be finite and positive")
        return tv, rv

    def _prepare_conditions(self, prior_images, b0_images, refs):
        if not self.physics_prior:
            return None
        b, _, h, w = refs.shape
        images = []
        for name, x in (("prior images", prior_images), ("b0 images", b0_images)):
            t = _as_tensor(x, name)
            t = t[None] if t.ndim == 2 else t
            if t.shape != (b, h, w):
                raise ValueError(f"{name} must be ({h}, {w}) or ({b}, {h}, {w}) like the references, got {tuple(t.shape)}")
            images.append(t)
        return torch.stack(images, dim=1)

    def prepare_extra_step_kwargs(self, generator, eta):
        # Schedulers differ in signature; passing the generator to step() is
        # what makes stochastic samplers (DDPM) reproducible from a seed.
        params = set(inspect.signature(self.scheduler.step).parameters)
        extra = {}
        if "eta" in params:
            extra["eta"] = eta
        if "generator" in params:
            extra["generator"] = generator
        return extra

    @torch.inference_mode()
    def __call__(
        self,
        reference_images,
        reference_bvecs,
        target_bvecs,
        prior_images=None,
        b0_images=None,
        target_bvals=None,
        reference_bvals=None,
        num_inference_steps: int | None = None,
        generator: torch.Generator | list[torch.Generator] | None = None,
        num_samples: int = 1,
        eta: float = 0.0,
        latents: torch.Tensor | None = None,
        output_type: str = "np",
        return_dict: bool = True,
        callback_on_step_end: Callable | None = None,
    ) -> QID2PipelineOutput | tuple:
        r"""Generate target-direction slices.

        Args:
            reference_images (`torch.Tensor` or `np.ndarray` of shape `(R, H, W)` or `(B, R, H, W)`):
                the acquired slices nearest to each target, nearest first
                (see :func:`qid2_diffusers.directions.nearest_references`), in
                scanner units. Any in-plane size: padding is internal.
            reference_bvecs (`array-like` of shape `(R, 3)` or `(B, R, 3)`): their directions.
            target_bvecs (`array-like` of shape `(3,)` or `(B, 3)`): the directions to synthesise.
            prior_images (`array-like` of shape `(H, W)` or `(B, H, W)`, *optional*):
                for a ``physics_prior`` model, the tensor-fit prediction of each
                target slice from every kept direction (never from the target
                itself), in scanner units; see :func:`qid2_diffusers.prior.tensor_prior`.
            b0_images (`array-like` of shape `(H, W)` or `(B, H, W)`, *optional*):
                for a ``physics_prior`` model, the mean b0 slice, in scanner units.
            target_bvals (`float` or `array-like` of shape `(B,)`, *optional*),
            reference_bvals (`float` or `array-like` of shape `(R,)` or `(B, R)`, *optional*):
                b-values (s/mm²), required by a b-conditioned model.
            num_inference_steps (`int`, *optional*):
                denoising steps; defaults to the pipeline's ``default_num_inference_steps``.
            generator (`torch.Generator` or `List[torch.Generator]`, *optional*):
                for reproducibility; a list needs ``B * num_samples`` generators,
                one per sample, which makes each sample independent of batching.
            num_samples (`int`, *optional*, defaults to 1):
                samples per target; their mean is returned with a std map.
            eta (`float`, *optional*, defaults to 0.0): DDIM's eta; ignored by other schedulers.
            latents (`torch.Tensor` of shape `(B * num_samples, 1, H', W')`, *optional*):
                starting noise at the padded size, instead of drawing it.
            output_type (`str`, *optional*, defaults to `"np"`): `"np"` or `"pt"`.
            return_dict (`bool`, *optional*, defaults to `True`):
                return a [`QID2PipelineOutput`] instead of a tuple.
            callback_on_step_end (`Callable`, *optional*):
                called as ``callback_on_step_end(pipe, step, timestep, {"latents": latents})``
                after each step; may return a dict with new ``latents``.

        Returns:
            [`QID2PipelineOutput`] or `tuple` ``(images, samples, std)``.
        """
        if output_type not in ("np", "pt"):
            raise ValueError(f"output_type must be 'np' or 'pt', got {output_type!r}")
        if num_samples < 1:
            raise ValueError(f"num_samples must be >= 1, got {num_samples}")
        steps = num_inference_steps or self.config.default_num_inference_steps
        device = self._execution_device
        dtype = self.unet.dtype

        refs, rb, tb = self._prepare_inputs(reference_images, reference_bvecs, target_bvecs)
        b, r = refs.shape[:2]
        tv, rv = self._prepare_bvals(target_bvals, reference_bvals, b, r)
        conditions = self._prepare_conditions(prior_images, b0_images, refs)
        x, scale, size = self.image_processor.preprocess(refs.to(device), None if conditions is None else conditions.to(device))
        scale = scale.to(device)
        tokens = self.direction_encoder(
            tb.to(device), rb.to(device), None if tv is None else tv.to(device), None if rv is None else rv.to(device)
        ).to(dtype)
        # The prior channel, in the network's units: the sample is the residual
        # to it, so the result is prior + sample.
        prior_n = x[:, r : r + 1].float() if self.physics_prior else None

        # Each sample is its own batch row, so a batch of B targets with S
        # samples is one network call per step.
        s = num_samples
        cond = x.to(dtype).repeat_interleave(s, dim=0)
        tokens = tokens.repeat_interleave(s, dim=0)
        shape = (b * s, 1, *cond.shape[-2:])
        if isinstance(generator, list) and len(generator) != b * s:
            raise ValueError(f"got {len(generator)} generators for {b} targets x {s} samples")
        # Latents and scheduler arithmetic stay in float32 whatever the
        # network's dtype: a 1000-step DDPM chain in bf16 drifts visibly.
        if latents is None:
            latents = randn_tensor(shape, generator=generator, device=device, dtype=torch.float32)
        elif tuple(latents.shape) != shape:
            raise ValueError(f"latents must have shape {shape}, got {tuple(latents.shape)}")
        latents = latents.to(device, torch.float32) * self.scheduler.init_noise_sigma

        self.scheduler.set_timesteps(steps, device=device)
        extra = self.prepare_extra_step_kwargs(generator, eta)
        for i, t in enumerate(self.progress_bar(self.scheduler.timesteps)):
            model_in = torch.cat([self.scheduler.scale_model_input(latents, t).to(dtype), cond], dim=1)
            # channels_last: the layout cuDNN's and oneDNN's convolution kernels prefer.
            model_in = model_in.contiguous(memory_format=torch.channels_last)
            pred = unet_forward(self.unet, model_in, t, tokens).float()
            latents = self.scheduler.step(pred, t, latents, **extra).prev_sample
            if callback_on_step_end is not None:
                out = callback_on_step_end(self, i, t, {"latents": latents}) or {}
                latents = out.get("latents", latents)

        out = latents.float()
        if prior_n is not None:
            out = out + prior_n.repeat_interleave(s, dim=0)
        x = self.image_processor.postprocess(out, scale.repeat_interleave(s, dim=0), size).view(b, s, *size)
        images = x.mean(dim=1)
        samples = x if s > 1 else None
        std = x.std(dim=1) if s > 1 else None
        if output_type == "np":
            images = images.cpu().numpy()
            samples = samples.cpu().numpy() if samples is not None else None
            std = std.cpu().numpy() if std is not None else None
        self.maybe_free_model_hooks()
        if not return_dict:
            return images, samples, std
        return QID2PipelineOutput(images=images, samples=samples, std=std)
