"""Test-time adaptation: fine-tune a copy of a QID² model on the scan being up-sampled.

A model trained on phantoms has never seen this scanner, this subject or this
noise. The scan itself holds examples of the task: each of its kept
directions can be left out and predicted from the others, exactly as a
missing direction is predicted from all of them. :func:`adapt_pipeline`
fine-tunes a copy of the networks on these leave-one-out examples (targets:
the scan's own kept directions; references: the nearest of the others; the
physics prior: a tensor fit that leaves the target out), with the training
loss, crops and optimiser settings of :mod:`qid2_diffusers.training`
(:mod:`~qid2_diffusers.pipelines.training_utils`). Only the scan's own kept
directions are used, so this is a method, not a leak of held-out data. The
pipeline given is left untouched.
"""

from __future__ import annotations

import copy
import time

import numpy as np
import torch
from tqdm.auto import tqdm

from ..directions import nearest_references, normalize_bvecs
from ..gradients import split_scheme
from ..image_processor import QID2ImageProcessor
from ..schedulers import training_scheduler
from ..tensor import TensorPrior
from ..upsampling import brain_bounding_box, brain_slices
from .training_utils import QID2Denoiser, diffusion_loss, random_crops

__all__ = ["adapt_pipeline", "leave_one_out_examples", "residual_weight", "gate_terms", "least_squares_weight", "ADAPTATION_DEFAULTS", "GATE_DEFAULTS",
           "WEIGHT_SIGNIFICANCE", "MIN_RESIDUAL_WEIGHT"]

#: Settings of the adaptation loop: those of the shipped training config
#: (Adam betas, gradient clipping, crops, timestep bias) at a fine-tuning
#: learning rate, on at most ``max_slices`` brain slices of the scan.
ADAPTATION_DEFAULTS = dict(
    learning_rate=1e-4, batch_size=8, crop_size=48, max_slices=16, timestep_bias_portion=0.5,
    adam_betas=(0.5, 0.999), max_grad_norm=1.0,
)


#: Settings of :func:`residual_weight`: how many of the scan's kept directions are left out in turn, on
#: how many brain slices (about a fifth of the sampling time of a 30 -> 90 up-sampling).
GATE_DEFAULTS = dict(max_slices=16, max_directions=12)


def _chosen_slices(mask: np.ndarray, max_slices: int) -> np.ndarray:
    """Up to ``max_slices`` brain slices, evenly spread (all of them when there are fewer)."""
    slices = brain_slices(mask)
    if len(slices) <= max_slices:
        return slices
    return slices[np.unique(np.linspace(0, len(slices) - 1, max_slices).round().astype(int))]


def leave_one_out_examples(data, bvals, bvecs, mask, num_references: int, *, physics_prior: bool,
                           max_slices: int = 16, max_directions: int | None = None) -> dict[str, torch.Tensor]:
    """Training examples from one scan: every kept direction predicted from the others.

    Args:
        data (`array-like` of shape `(X, Y, Z, N)`): b0 volumes and one shell's kept directions.
        bvals (`array-like` of shape `(N,)`), bvecs (`array-like` of shape `(N, 3)`): their scheme.
        mask (`np.ndarray` of shape `(X, Y, Z)`): brain mask.
        num_references (`int`): R.
        physics_prior (`bool`): add ``prior`` (a tensor fit on b0 + the other
            kept directions, predicted at the left-out one) and ``b0``.
        max_slices (`int`, *optional*, defaults to 16): brain slices used.
        max_directions (`int`, *optional*): leave out only this many kept directions, evenly spread over
            their order (all of them by default).

    Returns:
        `dict` of tensors shaped like a :class:`~qid2_diffusers.data.dataset.QID2Dataset`
        batch, one row per (kept direction, slice), normalised by the references'
        scale (``scale``, in the data's units).
    """
    bvals = np.asarray(bvals, dtype=np.float64)
    bvecs = np.asarray(bvecs, dtype=np.float64)
    mask = np.asarray(mask, dtype=bool)
    b0, dw = split_scheme(bvals, bvecs)
    if len(dw) < num_references + 1:
        raise ValueError(f"adaptation leaves one of {len(dw)} directions out and needs R = {num_references} others")
    bx, by = brain_bounding_box(mask)
    zs = _chosen_slices(mask, max_slices)
    # One read per slice; the examples only ever see these slices.
    slab = np.stack([np.asarray(data[bx, by, int(z), :], dtype=np.float32) for z in zs], axis=2)
    slab_mask = mask[bx, by][:, :, zs]
    directions = normalize_bvecs(bvecs[dw])
    rows = {k: [] for k in ("images", "target_bvec", "reference_bvecs", "target_bvals", "reference_bvals")}
    left_out = np.arange(len(dw))
    if max_directions is not None and max_directions < len(dw):
        left_out = np.unique(np.linspace(0, len(dw) - 1, max_directions).round().astype(int))
    for i in left_out:
        others = np.delete(np.arange(len(dw)), i)
        refs = others[nearest_references(directions[i : i + 1], directions[others], num_references)[0]]
        planes = [slab[..., dw[[i]]], slab[..., dw[refs]]]
        if physics_prior:
            # The left-out direction never enters its own prior.
            keep = np.concatenate([b0, dw[others]])
            fit = TensorPrior(slab[..., keep], bvals[keep], bvecs[keep], slab_mask)
            planes += [fit.predict(directions[i : i + 1], bval=bvals[dw[i]]), fit.mean_b0[..., None]]
        # (h, w, k, C) -> (k, C, h, w): one example per slice.
        rows["images"].append(np.moveaxis(np.concatenate(planes, axis=-1), (2, 3), (0, 1)))
        for k in range(len(zs)):
            rows["target_bvec"].append(directions[i])
            rows["reference_bvecs"].append(directions[refs])
            rows["target_bvals"].append(bvals[dw[i]])
            rows["reference_bvals"].append(bvals[dw[refs]])
    images = torch.from_numpy(np.concatenate(rows["images"]).astype(np.float32))
    r = num_references
    scale = QID2ImageProcessor.scale(images[:, 1 : 1 + r])
    images = QID2ImageProcessor.normalize(images, scale)
    examples = {
        "scale": scale,
        "target": images[:, :1],
        "references": images[:, 1 : 1 + r],
        "mask": torch.from_numpy(np.tile(np.moveaxis(slab_mask, 2, 0), (len(left_out), 1, 1))[:, None]
                                 .astype(np.float32)),
        **{k: torch.from_numpy(np.asarray(v, dtype=np.float32)) for k, v in rows.items() if k != "images"},
    }
    if physics_prior:
        examples["prior"], examples["b0"] = images[:, 1 + r : 2 + r], images[:, 2 + r :]
    return examples


def adapt_pipeline(pipeline, data, bvals, bvecs, mask, *, steps: int, seed: int = 0, progress: bool = True,
                   **settings):
    """A copy of ``pipeline`` fine-tuned for ``steps`` steps on the scan's leave-one-out examples.

    Args:
        pipeline ([`QID2Pipeline`]): the trained model; not modified.
        data (`array-like` of shape `(X, Y, Z, N)`): b0 volumes and one shell's kept directions.
        bvals (`array-like` of shape `(N,)`), bvecs (`array-like` of shape `(N, 3)`): their scheme.
        mask (`np.ndarray` of shape `(X, Y, Z)`): brain mask; the loss is taken inside it.
        steps (`int`): optimiser steps (0 returns ``pipeline`` itself).
        seed (`int`, *optional*, defaults to 0): every random draw (batches, crops, noise, timesteps).
        progress (`bool`, *optional*, defaults to `True`): tqdm bar over steps.
        settings: overrides of :data:`ADAPTATION_DEFAULTS`.

    Returns:
        `tuple` ``(pipeline, seconds)``: the adapted copy (same sampler and
        defaults, in evaluation mode) and the wall time spent.
    """
    unknown = set(settings) - set(ADAPTATION_DEFAULTS)
    if unknown:
        raise TypeError(f"unknown adaptation setting(s): {', '.join(sorted(unknown))}")
    cfg = {**ADAPTATION_DEFAULTS, **settings}
    if steps <= 0:
        return pipeline, 0.0
    start = time.perf_counter()
    examples = leave_one_out_examples(data, bvals, bvecs, mask, pipeline.num_references,
                                      physics_prior=pipeline.physics_prior, max_slices=cfg["max_slices"])
    device = pipeline.device
    unet = copy.deepcopy(pipeline.unet).float().to(device)
    encoder = copy.deepcopy(pipeline.direction_encoder).float().to(device)
    denoiser = QID2Denoiser(unet, encoder).train()
    noise_scheduler = training_scheduler(pipeline.scheduler.config.prediction_type)
    optimizer = torch.optim.AdamW(denoiser.parameters(), lr=cfg["learning_rate"], betas=cfg["adam_betas"],
                                  weight_decay=0.0)
    generator = torch.Generator().manual_seed(int(seed))
    n = len(examples["target"])
    with torch.enable_grad():
        for _ in tqdm(range(steps), desc="adapting to the scan", unit="step", disable=not progress):
            rows = torch.randint(n, (min(cfg["batch_size"], n),), generator=generator)
            batch = random_crops({k: v[rows] for k, v in examples.items()}, cfg["crop_size"], generator)
            batch = {k: v.to(device) for k, v in batch.items()}
            loss = diffusion_loss(denoiser, noise_scheduler, batch, generator,
                                  timestep_bias_portion=cfg["timestep_bias_portion"])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(denoiser.parameters(), cfg["max_grad_norm"])
            optimizer.step()
    denoiser.eval()
    adapted = type(pipeline)(
        unet=unet.to(pipeline.unet.dtype),
        direction_encoder=encoder.to(pipeline.direction_encoder.dtype),
        scheduler=copy.deepcopy(pipeline.scheduler),
        default_num_inference_steps=pipeline.config.default_num_inference_steps,
        physics_prior=pipeline.physics_prior,
        default_adapt_steps=pipeline.config.get("default_adapt_steps", 0),
    )
    adapted.set_progress_bar_config(disable=True)
    return adapted, time.perf_counter() - start


def residual_weight(pipeline, data, bvals, bvecs, mask, *, seed: int = 0, num_inference_steps: int | None = None,
                    batch_size: int = 32, **settings) -> float:
    """How much of the network's residual over the tensor prior to keep on this scan, from its kept directions.

    A physics-prior model outputs ``prior + residual``. Each of some kept
    directions is left out and predicted from the others
    (:func:`leave_one_out_examples`, the prior fitted without it), and the
    weight ``w`` in ``prior + w * residual`` that best predicts the left-out
    volumes (least squares inside the mask) is returned, clipped to [0, 1]:
    1 keeps the network as trained, 0 returns the tensor fit's prediction.
    The left-out volume never enters its own prediction, so its noise does not
    pull ``w`` (in expectation); on a scan the network was not trained for (a
    denoised one, another scanner) a residual that does not help is dropped.

    Args:
        pipeline ([`QID2Pipeline`]): a ``physics_prior`` model.
        data, bvals, bvecs, mask: the scan's b0s and one shell's kept directions (:func:`adapt_pipeline`).
        seed (`int`, *optional*, defaults to 0): sampling seed.
        num_inference_steps (`int`, *optional*): sampling steps; the pipeline's default otherwise.
        batch_size (`int`, *optional*, defaults to 32): slices per network call.
        settings: overrides of :data:`GATE_DEFAULTS`.
    """
    if not pipeline.physics_prior:
        raise ValueError("a residual weight needs a physics-prior model (its output is prior + residual)")
    cfg = {**GATE_DEFAULTS, **settings}
    examples = leave_one_out_examples(data, bvals, bvecs, mask, pipeline.num_references, physics_prior=True,
                                      **cfg)
    residual, error, weights, groups = gate_terms(pipeline, examples, seed=seed,
                                                  num_inference_steps=num_inference_steps, batch_size=batch_size)
    return least_squares_weight(residual, error, weights, groups=groups)


def gate_terms(pipeline, examples, *, reference=None, seed: int = 0, num_inference_steps: int | None = None,
               batch_size: int = 32):
    """``(residual, error, mask, groups)`` of :func:`residual_weight`'s least squares: the network's residual over
    the prior for each of ``examples`` (:func:`leave_one_out_examples`), the left-out volume minus the prior, the
    brain mask, and each example's left-out direction (the jackknife's groups). ``reference``: examples with the
    same slices and directions whose left-out volumes the error is taken against instead (e.g. the raw series'
    when ``examples`` come from a denoised one; ``benchmarks/gate_reference.py``)."""
    from ..upsampling import sample_seed

    reference = examples if reference is None else reference
    # The examples are in reference-scale units; the pipeline normalises by the same scale (1 here),
    # so its output comes back in these units too.
    residual, error, weights = [], [], []
    for start in range(0, len(examples["target"]), batch_size):
        rows = slice(start, start + batch_size)
        # Seeds of their own (a target index no up-sampling reaches): the gate never shares a target's noise.
        gens = [torch.Generator().manual_seed(sample_seed(seed, 2**31 - 1, start + k)) for k in
                range(len(examples["target"][rows]))]
        out = pipeline(examples["references"][rows].numpy(), examples["reference_bvecs"][rows].numpy(),
                       examples["target_bvec"][rows].numpy(), prior_images=examples["prior"][rows, 0].numpy(),
                       b0_images=examples["b0"][rows, 0].numpy(), target_bvals=examples["target_bvals"][rows].numpy(),
                       reference_bvals=examples["reference_bvals"][rows].numpy(),
                       num_inference_steps=num_inference_steps, generator=gens, output_type="np").images
        prior = examples["prior"][rows, 0].numpy()
        residual.append(out - prior)
        error.append(reference["target"][rows, 0].numpy() - prior)
        weights.append(examples["mask"][rows, 0].numpy())
    # Examples come direction by direction (every slice of one left-out direction, then the next): the
    # directions are the independent units of the jackknife.
    directions = examples["target_bvec"].numpy()
    groups = np.r_[0, np.cumsum(np.any(directions[1:] != directions[:-1], axis=1))]
    return (*(np.concatenate(v) for v in (residual, error, weights)), groups)


#: A residual weight is kept only when it exceeds this many jackknife standard errors (over the left-out
#: directions): a weight that noise alone could give is set to 0, and the network's passes are skipped.
WEIGHT_SIGNIFICANCE = 2.0
#: ...and only when it is at least this large: a smaller share of the correction moves the output by a few
#: per cent of the network's residual, while its passes over every target cost most of the run (on the
#: HCP-grid phantom a weight of 0.008 took 1048 of 1370 s).
MIN_RESIDUAL_WEIGHT = 0.05


def least_squares_weight(residual, error, mask, groups=None) -> float:
    """``w`` in [0, 1] minimising ``sum(mask * (error - w * residual)^2)``; 1 when the residual is zero
    (nothing to weigh: the network's output is the prior).

    With ``groups`` (one label per example, e.g. its left-out direction), ``w`` is set to 0 unless it is at
    least :data:`MIN_RESIDUAL_WEIGHT` and above :data:`WEIGHT_SIGNIFICANCE` jackknife standard errors, the
    groups left out in turn: a small weight, or one the scan's noise could give, buys nothing measurable and
    costs every network pass over the targets."""
    r, e, m = (np.asarray(v, dtype=np.float64) for v in (residual, error, mask))
    axes = tuple(range(1, r.ndim))
    num, power = np.sum(m * r * e, axis=axes), np.sum(m * r * r, axis=axes)  # per example
    if power.sum() <= 0:
        return 1.0
    w = float(np.clip(num.sum() / power.sum(), 0.0, 1.0))
    labels = np.unique(groups) if groups is not None else ()
    if groups is not None and w < MIN_RESIDUAL_WEIGHT:
        return 0.0
    if w > 0 and len(labels) > 2:
        keep = [np.asarray(groups) != g for g in labels]
        partial = np.array([num[k].sum() / power[k].sum() if power[k].sum() > 0 else w for k in keep])
        n = len(labels)
        stderr = float(np.sqrt((n - 1) / n * np.sum((partial - partial.mean()) ** 2)))
        if w <= WEIGHT_SIGNIFICANCE * stderr:
            return 0.0
    return w
