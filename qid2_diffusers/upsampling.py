"""The up-sampler interface: acquired DWI + target directions -> synthesised volumes.

:class:`VolumeUpsampler` is the one interface shared by QID², the baselines,
evaluation, the command line and the demo. Inputs are a 4D array holding the
b0 volumes and ONE diffusion-weighted shell (the acquired directions), the
scheme (``bvals, bvecs`` or a dipy ``GradientTable``), and the target
directions; the output holds one volume per target, at the shell's b-value.
:class:`SliceUpsampler` adds the slice-by-slice loop of the learned methods.
"""

from __future__ import annotations

import time

import numpy as np
from tqdm.auto import tqdm

from .data.io import group_shells
from .directions import nearest_references, normalize_bvecs
from .errors import QID2InputError
from .gradients import as_bvals_bvecs, is_gradient_table, split_scheme, target_directions
from .tensor import TensorPrior
from .timing import timed

__all__ = ["VolumeUpsampler", "SliceUpsampler", "brain_slices", "brain_bounding_box", "brain_slice_box", "network_pixels", "fit_prior", "sample_seed"]


class VolumeUpsampler:
    """Predicts the DWI volumes at target directions from an acquired shell.

    Subclasses implement :meth:`predict_volumes`; ``name`` labels result tables.
    """

    name = "upsampler"

    def predict(self, data, bvals, bvecs=None, target_bvecs=None, mask=None, **kwargs) -> np.ndarray:
        """Predicted volumes, float32 of shape ``(X, Y, Z, T)``, zero outside ``mask``.

        Called as ``predict(data, bvals, bvecs, target_bvecs, mask)`` or, as
        dipy users pass a scheme, ``predict(data, gtab, target_bvecs, mask)``.

        Args:
            data (`array-like` of shape `(X, Y, Z, N)`): b0 volumes and one
                diffusion-weighted shell; may be a lazy nibabel ``dataobj``.
            bvals (`array-like` of shape `(N,)` or `dipy.core.gradients.GradientTable`):
                the b-values, or the whole scheme as a gradient table.
            bvecs (`array-like` of shape `(N, 3)`): the b-vectors (not with a gradient table).
            target_bvecs (`array-like` of shape `(T, 3)` or `GradientTable`): directions
                to synthesise; of a gradient table, its diffusion-weighted directions.
            mask (`np.ndarray` of shape `(X, Y, Z)`, *optional*): brain mask.
            kwargs: options of the method's :meth:`predict_volumes`.

        Raises:
            QID2InputError: the data hold several shells (the message names them).
        """
        if is_gradient_table(bvals) and bvecs is not None:
            # predict(data, gtab, target_bvecs[, mask]): the arguments sit one place earlier.
            if target_bvecs is not None and mask is not None:
                raise TypeError("with a GradientTable, pass data, gtab, target_bvecs and mask")
            bvecs, target_bvecs, mask = None, bvecs, mask if target_bvecs is None else target_bvecs
        if target_bvecs is None:
            raise TypeError("predict() needs the target directions (target_bvecs)")
        bvals, bvecs = as_bvals_bvecs(bvals, bvecs)
        shells = group_shells(bvals)
        if len(shells) > 1:
            # A method predicts one shell from its own directions; which one is the caller's choice.
            raise QID2InputError(
                None, f"the data hold {len(shells)} shells (b={', '.join(str(b) for b in shells)}): give the b0s and "
                      f"one shell (qid2_diffusers.data.io.extract_shell), or up-sample every shell with "
                      f"qid2_diffusers.inference.upsample_dwi")
        return self.predict_volumes(data, bvals, bvecs, target_directions(target_bvecs), mask, **kwargs)

    def predict_volumes(self, data, bvals, bvecs, target_bvecs, mask=None) -> np.ndarray:
        """:meth:`predict` on arrays: ``bvals`` (N,), ``bvecs`` (N, 3) and ``target_bvecs`` (T, 3)."""
        raise NotImplementedError


def brain_slices(mask: np.ndarray, axis: int = 2) -> np.ndarray:
    """Indices of the slices along ``axis`` that contain brain."""
    other = tuple(a for a in range(3) if a != axis)
    return np.flatnonzero(np.asarray(mask, dtype=bool).any(axis=other))


def brain_bounding_box(mask: np.ndarray, margin: int = 4) -> tuple[slice, slice]:
    """In-plane (x, y) box around the brain in every slice, widened by ``margin``.

    One box for the whole volume, so slices of the same subject batch together.
    """
    m = np.asarray(mask, dtype=bool)
    if not m.any():
        return slice(0, m.shape[0]), slice(0, m.shape[1])
    xs = np.flatnonzero(m.any(axis=(1, 2)))
    ys = np.flatnonzero(m.any(axis=(0, 2)))
    return (
        slice(max(0, xs[0] - margin), min(m.shape[0], xs[-1] + 1 + margin)),
        slice(max(0, ys[0] - margin), min(m.shape[1], ys[-1] + 1 + margin)),
    )


def brain_slice_box(mask: np.ndarray, z: int) -> tuple[slice, slice]:
    """The box of slice ``z``'s brain (widened as :func:`brain_bounding_box`), relative to the volume's box:
    what :class:`SliceUpsampler` crops each slice to."""
    bx, by = brain_bounding_box(mask)
    return brain_bounding_box(np.asarray(mask, dtype=bool)[bx, by, z][..., None])


def network_pixels(mask: np.ndarray, slice_boxes: bool = True) -> int:
    """Pixels a :class:`SliceUpsampler` feeds the network per target: over the brain slices, each slice's
    own box (:func:`brain_slice_box`), or the volume's box for every slice when ``slice_boxes`` is `False`."""
    bx, by = brain_bounding_box(mask)
    width, height = range(bx.stop - bx.start), range(by.stop - by.start)
    slices = brain_slices(mask)
    if not slice_boxes:
        return len(slices) * len(width) * len(height)
    return sum(len(width[sx]) * len(height[sy]) for sx, sy in (brain_slice_box(mask, z) for z in slices))


def sample_seed(seed: int, target_index: int, slice_index: int, sample_index: int = 0) -> int:
    """Seed of one (target, slice, sample): independent of batching and of how
    targets are split across processes, so any split gives the same volume."""
    return int(np.random.SeedSequence([seed, target_index, slice_index, sample_index]).generate_state(1)[0])


def fit_prior(data, bvals, bvecs, mask, box) -> TensorPrior:
    """The physics prior of a volume: one tensor fit of its b0s and diffusion-weighted
    volumes inside ``box`` (the brain's bounding box ``(bx, by)``), voxels in ``mask``."""
    bx, by = box
    b0, dw = split_scheme(bvals, bvecs)
    keep = np.concatenate([b0, dw])
    return TensorPrior(np.asarray(data[bx, by], dtype=np.float32)[..., keep], np.asarray(bvals, dtype=np.float64)[keep],
                       np.asarray(bvecs, dtype=np.float64)[keep], np.asarray(mask, dtype=bool)[bx, by])


class SliceUpsampler(VolumeUpsampler):
    """Base of the learned up-samplers that map R reference slices to one target slice.

    :meth:`predict` visits only slices containing brain, each cropped to the
    brain's bounding box, and batches (slice, target) pairs; a subclass
    (:class:`~qid2_diffusers.pipelines.QID2Upsampler`,
    :class:`~qid2_diffusers.baselines.gan.GANUpsampler`) supplies
    :meth:`predict_batch` and ``num_references``.

    After each :meth:`predict`, :attr:`timings` holds the wall seconds of its
    stages (``prior_fit``, ``prior_predict``, ``batching``, ``sampling``; see
    :mod:`~qid2_diffusers.timing`).

    Args:
        batch_size (`int`, *optional*, defaults to 32): (slice, target) pairs per network call.
        seed (`int`, *optional*, defaults to 0): base seed of stochastic models.
        progress (`bool`, *optional*, defaults to `True`): show a tqdm bar over slices x targets.
    """

    def __init__(self, *, batch_size=32, seed=0, progress=True):
        self.batch_size = int(batch_size)
        self.seed = int(seed)
        self.progress = progress
        self.timings: dict[str, float] = {}
        #: Weight of the network's residual over the physics prior in what is returned
        #: (``prior + w * (output - prior)``); 1 is the network's output as it is.
        self.applied_residual_weight = 1.0

    #: Crop each slice to its own brain box (the volume's box when `False`): fewer pixels per pass.
    slice_boxes = True

    def _target_chunks(self, t_count: int) -> list[np.ndarray]:
        """One slice's targets in near-equal batches of at most ``batch_size``."""
        return np.array_split(np.arange(t_count), max(1, -(-t_count // self.batch_size)))

    @property
    def num_references(self) -> int:
        raise NotImplementedError

    @property
    def physics_prior(self) -> bool:
        """Whether :meth:`predict_batch` wants the tensor-fit prior and the mean b0 of each slice."""
        return False

    def predict_batch(self, reference_images, reference_bvecs, target_bvecs, keys, *, prior_images=None,
                      b0_images=None, target_bvals=None, reference_bvals=None):
        """Target slices for one batch, in the references' intensity units.

        Args:
            reference_images (`np.ndarray` of shape `(B, R, H, W)`): nearest first.
            reference_bvecs (`np.ndarray` of shape `(B, R, 3)`), target_bvecs (`np.ndarray` of shape `(B, 3)`).
            keys (`list` of `(int, int)`): (global target index, slice index) of
                each row, from which a stochastic model draws its seeds.
            prior_images (`np.ndarray` of shape `(B, H, W)`, *optional*): the
                tensor-fit prediction of each target slice, when :attr:`physics_prior`.
            b0_images (`np.ndarray` of shape `(B, H, W)`, *optional*): the mean b0 slice, likewise.
            target_bvals (`np.ndarray` of shape `(B,)`), reference_bvals (`np.ndarray` of shape `(B, R)`):
                b-values in s/mm².

        Returns:
            `tuple` ``(images (B, H, W), std (B, H, W) or None)``.
        """
        raise NotImplementedError

    def predict_volumes(self, data, bvals, bvecs, target_bvecs, mask=None, *, target_indices=None, return_std=False,
                        axis=2, out=None):
        """See :meth:`VolumeUpsampler.predict`; these options pass through it.

        Args:
            target_indices (`array-like` of `int`, *optional*): global index of
                each target, used for seeding; set it when a job is split
                across processes so each target keeps its own noise.
            return_std (`bool`, *optional*, defaults to `False`): also return
                the per-voxel standard deviation over samples.
            axis (`int`, *optional*, defaults to 2): slice axis (2 = axial).
            out (`np.ndarray` of shape `(X, Y, Z, T)`, *optional*): zero-filled
                float32 array (or view, e.g. the tail of a whole output series)
                to write into instead of allocating one; it is returned.
        """
        if axis != 2:
            data = np.moveaxis(np.asarray(data), axis, 2)
            mask = None if mask is None else np.moveaxis(np.asarray(mask), axis, 2)
            out = None if out is None else np.moveaxis(out, axis, 2)
        shape = tuple(data.shape)
        if len(shape) != 4:
            raise ValueError(f"data must be 4D (X, Y, Z, N), got shape {shape}")
        _, dw = split_scheme(bvals, bvecs)
        acquired = normalize_bvecs(np.asarray(bvecs, dtype=np.float64)[dw])
        targets = normalize_bvecs(target_bvecs)
        r = self.num_references
        if len(dw) < r:
            raise ValueError(f"the model needs R = {r} acquired directions, the data has {len(dw)}")
        refs = nearest_references(targets, acquired, r)  # (T, R) into dw
        if target_indices is None:
            target_indices = np.arange(len(targets))
        mask = np.ones(shape[:3], dtype=bool) if mask is None else np.asarray(mask, dtype=bool)
        if mask.shape != shape[:3]:
            raise ValueError(f"mask shape {mask.shape} does not match the data's {shape[:3]}")

        t_count = len(targets)
        if out is None:
            out = np.zeros(shape[:3] + (t_count,), dtype=np.float32)
        elif out.shape != shape[:3] + (t_count,):
            raise ValueError(f"out has shape {out.shape}, expected {shape[:3] + (t_count,)}")
        std = np.zeros(shape[:3] + (t_count,), dtype=np.float32) if return_std else None
        bx, by = brain_bounding_box(mask)
        shell_b = np.asarray(bvals, dtype=np.float64)[dw]
        target_b = float(np.median(shell_b))
        timings = self.timings = {}
        prior = None
        if self.physics_prior:
            # One tensor fit per volume (inside the brain box), the prior of every
            # target; the prediction itself is made slice by slice, when needed.
            with timed(timings, "prior_fit"):
                prior = fit_prior(data, bvals, bvecs, mask, (bx, by))
        # Batches never straddle slices: each slice is cropped to its own brain box (inside the volume's),
        # which on a whole head holds far fewer pixels than the volume's box (28 % fewer on the HCP grid).
        zs = brain_slices(mask)
        plan = [(z, chunk) for z in zs for chunk in self._target_chunks(t_count)]
        boxes = {}
        bar = tqdm(total=len(zs) * t_count, desc="slices x targets", unit="slice",
                   disable=not self.progress)
        loaded_z, slab, prior_slab = None, None, None
        loop_start = time.perf_counter()
        for z, chunk in plan:
            batch = [(z, int(t)) for t in chunk]
            if z != loaded_z:
                sx, sy = boxes[z] = brain_slice_box(mask, z) if self.slice_boxes else (slice(None), slice(None))
                # One read per slice: a lazy NIfTI proxy decodes only this slice.
                slab = np.asarray(data[bx, by, z, :], dtype=np.float32)[sx, sy][..., dw]
                if prior is not None:
                    with timed(timings, "prior_predict"):
                        prior_slab = prior.predict(targets, (sx, sy, z), bval=target_b)
                    b0_slice = prior.mean_b0[sx, sy, z]
                loaded_z = z
            ref_imgs = [np.moveaxis(slab[..., refs[t]], -1, 0) for _, t in batch]
            prior_imgs = [prior_slab[..., t] for _, t in batch] if prior is not None else []
            b0_imgs = [b0_slice] * len(batch) if prior is not None else []
            t_idx = np.array([t for _, t in batch])
            inputs = dict(
                reference_images=np.stack(ref_imgs),
                reference_bvecs=acquired[refs[t_idx]],
                target_bvecs=targets[t_idx],
                keys=[(int(target_indices[t]), int(z)) for z, t in batch],
                prior_images=np.stack(prior_imgs) if prior is not None else None,
                b0_images=np.stack(b0_imgs) if prior is not None else None,
                target_bvals=np.full(len(batch), target_b),
                reference_bvals=shell_b[refs[t_idx]],
            )
            w = self.applied_residual_weight
            if prior is not None and w == 0.0:
                # None of the network's residual is kept: the answer is the prior's, exactly, without a pass.
                images, images_std = inputs["prior_images"], None
            else:
                with timed(timings, "sampling"):
                    images, images_std = self.predict_batch(**inputs)
            if prior is not None and 0.0 < w < 1.0:
                prior_batch = inputs["prior_images"]
                images = prior_batch + np.float32(w) * (images - prior_batch)
                images_std = None if images_std is None else np.float32(w) * images_std
            sx, sy = boxes[z]
            m = mask[bx, by, z][sx, sy]
            for i, (_, t) in enumerate(batch):
                out[bx, by, z, t][sx, sy] = np.where(m, images[i], 0.0)
                if return_std and images_std is not None:
                    std[bx, by, z, t][sx, sy] = np.where(m, images_std[i], 0.0)
            bar.update(len(batch))
        timings.setdefault("sampling", 0.0)  # none when no network pass was needed (residual weight 0)
        timings["batching"] = (time.perf_counter() - loop_start - timings.get("sampling", 0.0)
                               - timings.get("prior_predict", 0.0))
        bar.close()
        if axis != 2:
            out = np.moveaxis(out, 2, axis)
            std = None if std is None else np.moveaxis(std, 2, axis)
        return (out, std) if return_std else out
