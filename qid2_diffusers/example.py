"""The seeded example: a phantom acquired with 30 directions, up-sampled to 90.

``qid2 upsample --example`` and the demo's "phantom example" button both
start here. The phantom's truth is known, so the example ends with the
number that matters: the FA error of the up-sampled series against the
truth, next to the tensor fit on the 30 acquired directions alone.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

__all__ = ["EXAMPLE_SEED", "EXAMPLE_SLAB", "EXAMPLE_PREFIX", "Example", "make_example", "run_example"]

#: Phantom seed of the example. Training cohorts draw their subjects' seeds
#: with ``subject_seed``, so this subject is not one the model has seen.
EXAMPLE_SEED = 2024
#: Central axial slices kept: enough to see anatomy, few enough that 60 targets x 6
#: slices run in well under 3 minutes on 2 CPU cores even at 10 DDIM steps (the
#: shipped default is 1 step).
EXAMPLE_SLAB = 6
#: File name prefix of everything the example writes.
EXAMPLE_PREFIX = "qid2_example"


@dataclass
class Example:
    """A phantom split into an acquired series and held-out targets.

    Args:
        subject ([`~qid2_diffusers.data.phantom.PhantomSubject`]): the full
            phantom (18 b0 + 90 directions at b = 1000) with its truth.
        input_volumes (`np.ndarray` of `int`): volumes of ``subject`` kept as
            the acquisition (every b0, then the 30 acquired directions in
            series order).
        target_volumes (`np.ndarray` of `int`): volumes of ``subject`` held out;
            their directions are the targets.
        paths (`tuple` of `Path`): the written input ``(nii.gz, bval, bvec, mask)``.
    """

    subject: object
    input_volumes: np.ndarray
    target_volumes: np.ndarray
    paths: tuple

    @property
    def target_bvecs(self) -> np.ndarray:
        return self.subject.bvecs[self.target_volumes]

    @property
    def shell_volumes(self) -> np.ndarray:
        """Every b0 and all 90 directions, in series order."""
        return np.sort(np.concatenate([self.input_volumes, self.target_volumes]))

    def truth_tensor(self):
        """Tensor maps of the noise-free series: the truth every FA error is measured against.

        The phantom defines its true FA as an OLS fit of the noise-free
        signal in its mask; this is that fit, with MD and directions too.
        """
        from .tensor import fit_tensor

        s, v = self.subject, self.shell_volumes
        return fit_tensor(s.signal[..., v], s.bvals[v], s.bvecs[v], s.mask, fit_method="OLS")

    @property
    def dwi_path(self) -> Path:
        return self.paths[0]

    @property
    def mask_path(self) -> Path:
        return self.paths[3]


def make_example(
    out_dir, *, seed: int = EXAMPLE_SEED, slab: int | None = EXAMPLE_SLAB, n_acquired: int = 30, resolution: float = 2.5
) -> Example:
    """Simulate the example phantom and write its 30-direction acquisition.

    Writes ``qid2_example_input.{nii.gz,bval,bvec}`` and the phantom's brain
    mask ``qid2_example_mask.nii.gz`` to ``out_dir``.

    Args:
        out_dir (`str` or `os.PathLike`): output folder (created if needed).
        seed (`int`, *optional*, defaults to :data:`EXAMPLE_SEED`): phantom seed.
        slab (`int`, *optional*, defaults to :data:`EXAMPLE_SLAB`): central axial
            slices; `None` keeps the whole volume (the benchmarks' full subject).
        n_acquired (`int`, *optional*, defaults to 30): directions kept, the
            most uniform subset (:func:`~qid2_diffusers.data.io.split_acquired`).
        resolution (`float`, *optional*, defaults to 2.5): voxel size in mm (1.25 is HCP's grid).
    """
    from .data.io import save_dwi, save_nifti, split_acquired
    from .data.phantom import make_subject
    from .gradients import split_scheme

    out_dir = Path(out_dir)
    subject = make_subject(seed, resolution=resolution, slab=slab)
    b0, dw = split_scheme(subject.bvals)
    acquired, targets = split_acquired(subject.bvecs[dw], n_acquired)
    keep = np.sort(np.concatenate([b0, dw[acquired]]))
    prefix = out_dir / f"{EXAMPLE_PREFIX}_input"
    nii, bval, bvec = save_dwi(prefix, subject.dwi[..., keep], subject.bvals[keep], subject.bvecs[keep], subject.affine)
    mask = save_nifti(out_dir / f"{EXAMPLE_PREFIX}_mask.nii.gz", subject.mask, subject.affine, dtype=np.uint8)
    return Example(subject=subject, input_volumes=keep, target_volumes=dw[targets], paths=(nii, bval, bvec, mask))


def run_example(
    out_dir=".",
    *,
    model=None,
    num_references: int | None = None,
    scheduler: str | None = None,
    steps: int | None = None,
    num_samples: int = 1,
    adapt_steps: int | None = None,
    denoise: str | None = None,
    residual_weight=None,
    batch_size: int | None = None,
    device: str = "auto",
    dtype: str = "auto",
    compile: bool = False,
    seed: int = 0,
    slab: int = EXAMPLE_SLAB,
    progress: bool = True,
    verbose: bool = True,
) -> dict:
    """Make the example, up-sample it to 90 directions and compare FA with the truth.

    Writes ``qid2_example_input.*``, ``qid2_example_mask.nii.gz`` and
    ``qid2_example_upsampled.{nii.gz,bval,bvec}`` (the same files and code
    path as ``qid2 upsample --dwi qid2_example_input.nii.gz --mask
    qid2_example_mask.nii.gz --scheme hcp90``) and prints the FA errors.

    Args:
        out_dir (`str` or `os.PathLike`, *optional*, defaults to `"."`): where files go.
        model, num_references, scheduler, device, dtype, compile: see
            :func:`qid2_diffusers.hub.load_pipeline`; the defaults take the
            shipped model with its saved sampler.
        steps (`int`, *optional*): denoising steps; defaults to the model's
            ``default_num_inference_steps``.
        num_samples, adapt_steps, denoise, residual_weight, batch_size, seed: see :func:`qid2_diffusers.inference.upsample_dwi`.
        slab (`int`, *optional*, defaults to :data:`EXAMPLE_SLAB`): central axial slices.
        progress (`bool`, *optional*, defaults to `True`): show the progress bar.
        verbose (`bool`, *optional*, defaults to `True`): print the report.

    Returns:
        `dict`: ``fa`` (method -> :func:`~qid2_diffusers.evaluation.tensor_metrics`
        dict), ``seconds``, ``paths`` and ``n_targets``.
    """
    from .inference import check_writable, upsample_dwi
    from .data.io import load_dwi
    from .evaluation import tensor_metrics
    from .denoise import denoise_series
    from .hub import load_pipeline
    from .tensor import fit_tensor

    start = time.perf_counter()
    out_dir = Path(out_dir)
    prefix = check_writable(out_dir / f"{EXAMPLE_PREFIX}_upsampled")
    # Load (and so validate) the model before spending time on the phantom.
    pipe = load_pipeline(
        model, num_references=num_references, scheduler=scheduler, device=device, dtype=dtype, compile=compile
    )
    example = make_example(out_dir, slab=slab)
    dwi = load_dwi(example.dwi_path, example.paths[1], example.paths[2], example.mask_path)
    result = upsample_dwi(
        dwi,
        example.target_bvecs,
        pipe,
        num_inference_steps=steps,
        num_samples=num_samples,
        adapt_steps=adapt_steps,
        denoise=denoise,
        residual_weight=residual_weight,
        batch_size=batch_size,
        seed=seed,
        progress=progress,
    )
    paths = result.save(prefix, dwi.affine, dwi.header)

    subject, mask, shell = example.subject, example.subject.mask, example.shell_volumes
    truth = example.truth_tensor()
    inputs = dwi.data[...]
    # What a practitioner runs instead: MP-PCA (as dwidenoise) on the 30, then the same fit.
    denoised = denoise_series(inputs, dwi.bvals, "mppca", mask=mask).data
    fits = {
        "QID² (b0 + 30 + 60 synthesised)": fit_tensor(result.data, result.bvals, result.bvecs, mask),
        "tensor fit on the 30 acquired": fit_tensor(inputs, dwi.bvals, dwi.bvecs, mask),
        "MP-PCA + tensor fit on the 30": fit_tensor(denoised, dwi.bvals, dwi.bvecs, mask),
        "all 90 acquired (reference)": fit_tensor(subject.dwi[..., shell], subject.bvals[shell], subject.bvecs[shell], mask),
    }
    fa = {name: tensor_metrics(maps, truth, mask) for name, maps in fits.items()}
    seconds = time.perf_counter() - start
    if verbose:
        width = max(len(name) for name in fa)
        print(f"qid2 example: FA against the phantom's truth ({int(mask.sum())} brain voxels, {slab} slices at 2.5 mm)")
        print(f"  {'':{width}}  FA MAE  FA SSIM")
        for name, m in fa.items():
            print(f"  {name:{width}}  {m['fa_mae']:.4f}  {m['fa_ssim']:.4f}")
        steps_used = steps or pipe.config.default_num_inference_steps
        adapted = (f", adapted to the scan in {result.adaptation_seconds:.1f} s ({result.adapt_steps} steps)"
                   if result.adapt_steps else "")
        print(
            f"qid2 example: {result.n_targets} targets, {type(pipe.scheduler).__name__} {steps_used} steps{adapted}, "
            f"{seconds:.1f} s on {pipe.device.type}; wrote {paths[0]}"
        )
        print(f"qid2 example: QID²'s {result.method_note()}")
    return {"fa": fa, "seconds": seconds, "paths": [*example.paths, *paths], "n_targets": result.n_targets}
