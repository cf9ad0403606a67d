"""Validation during and after training: an up-sampler scored on held-out
slices against the acquired volumes, beside Interp and DTI-predict, and the
figure of references, target, prediction and error."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from ..baselines import DTIUpsampler, InterpUpsampler
from ..data.dataset import build_cache
from ..data.io import atomic_write
from ..directions import nearest_references
from ..evaluation import SubjectEvaluation
from ..gradients import split_scheme

__all__ = ["VALIDATION_KEYS", "VALIDATION_RESIDUAL_WEIGHT", "Validator", "validate", "write_validation_figure"]

#: Validation figures reported in logs, the summary and the model card, in this order.
VALIDATION_KEYS = ("ssim", "psnr", "nrmse", "fa_mae", "fa_ssim", "md_mae", "angular_error_deg")

#: A physics-prior network is validated with its correction whole: validation chooses between networks,
#: and inference's ``"auto"`` weight, a per-scan choice that drops corrections it cannot show to help,
#: would score most checkpoints as the bare tensor fit (it did: every checkpoint equal to DTI-predict).
VALIDATION_RESIDUAL_WEIGHT = 1.0


class Validator:
    """Scores an up-sampler on a few axial slices of held-out subjects.

    For each subject, ``num_slices`` slices evenly spread over the middle of
    the brain are taken with every volume of b0 + the shell; the
    ``n_acquired`` directions of :func:`~qid2_diffusers.data.io.split_acquired`
    are the input (denoised first over the whole volume with ``args.denoise``, as the
    engine does) and the others the targets. Figures come from
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
        given = data
        denoise = getattr(args, "denoise", "none")
        if denoise != "none":
            # The inputs as the engine would give them: b0s + kept directions denoised over the whole
            # volume (a denoiser on two slices would see far fewer voxels); scored against the raw acquisition.
            from ..denoise import denoise_series

            kept = volumes[inputs]
            series = np.stack([np.asarray(dwi.volume(int(k)), dtype=np.float32) for k in kept], axis=-1)
            series = denoise_series(series, dwi.bvals[kept], denoise, mask=mask, out=series,
                                    b0_threshold=dwi.b0_threshold, what=f"{subject.subject_id}").data
            given = data.copy()
            given[..., inputs] = series[:, :, picks]
        return {
            "subject_id": subject.subject_id,
            "slices": picks.tolist(),
            "evaluation": SubjectEvaluation(data, bvals, bvecs, slab_mask),
            "inputs": (given[..., inputs], bvals[inputs], bvecs[inputs]),
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


def validate(accelerator, validator: Validator, upsampler, state, step: int, args) -> dict:
    """Score ``upsampler``, log the figures and image, keep them in ``state``
    (a :class:`~qid2_diffusers.training.checkpoints.RunState`) and ``output_dir/validation.png``."""
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
    """``output_dir/validation.png`` from a :meth:`Validator.run` figure (:func:`~qid2_diffusers.data.io.atomic_write`)."""
    from PIL import Image

    return atomic_write(Path(output_dir) / "validation.png", lambda tmp: Image.fromarray(figure).save(tmp, format="PNG"))
