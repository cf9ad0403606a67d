"""One HCP-grid subject through ``qid2 upsample``'s engine, stage by stage (issue: speed at scale).

    python benchmarks/bench_gpu_volume.py --json gpu.json                  # the shipped model, on cuda
    python benchmarks/bench_gpu_volume.py --stand-in --adapt-steps 150     # the model being trained, adapting
    python benchmarks/bench_gpu_volume.py --stand-in --attention coarse --residual-weight 1   # the retrain's network
    python benchmarks/bench_gpu_volume.py --device cpu --threads 1 --slices 8 --json cpu.json
    python benchmarks/bench_gpu_volume.py --device cpu --resolution 5 --slab 3   # a toy run, to check the script
    python benchmarks/bench_gpu_volume.py --device cpu --denoise dwidenoise --json cpu-dwidenoise.json
    python benchmarks/bench_gpu_volume.py --device cpu --residual-weight 1 --slices 8   # the network on every target

The subject is the 1.25 mm brain phantom of seed ``--seed`` (145 x 174 x 145,
the HCP grid), 18 b0 + the 30 most uniform of its 90 b = 1000 directions,
written as a NIfTI with its bval/bvec; the 60 others are the targets. The
timed run is what ``qid2 upsample`` does after loading the model: open the
NIfTI, :func:`~qid2_diffusers.inference.upsample_dwi` with the model's
defaults (sampler, steps, ``default_adapt_steps``; the brain mask from
``brain_mask`` (median_otsu's mask, threaded), as without ``--mask``) and write the 108-volume output. Before
it, an untimed warm-up samples one slice (CUDA context, kernel choice; with
``--compile``, the compilation).

``--stand-in`` replaces the shipped model by a random one with the cost of
the model being trained: the ``small`` preset with the physics prior and
b-value tokens, cross-attention at ``--attention`` levels, DDIM, 1 step
(speed does not depend on the weights).

``--slices K`` times every stage on K brain slices spread evenly through the
brain and extrapolates to the whole brain, for machines where the whole
subject takes too long: the read, the write and the rest are measured whole
(the output's other slices are filled with input volumes first, so the gzip
write compresses realistic data, not zeros); the mask (``brain_mask``) and the
prior's tensor fit are timed on the whole volume, apart (a fit's fixed costs
do not scale with voxels); the per-slice stages (prior predictions, batching,
sampling) are scaled by the pixels the network sees (each brain slice's own box,
summed over the brain against the K slices); adaptation, which
uses at most 16 slices, is kept as measured (exact for K >= 16); denoising
(``--denoise``, the engine's default MP-PCA unless told) is timed on the whole
brain, apart. The JSON holds both the measured and the extrapolated stages.

Printed and written (``--json``): the warm-up's seconds (the one-off
compilation, with ``--compile``; not in the total), seconds per stage
(:data:`~qid2_diffusers.timing.STAGES`), total, (slice, target) pairs per
second, network passes and GFLOP per pass (FlopCounterMode, for
``benchmarks/bench_bound.py --stages``), peak GPU memory and peak resident
memory of the timed run.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode

from qid2_diffusers import build_pipeline
from qid2_diffusers.data.io import load_dwi
from qid2_diffusers.data.series import read_series
from qid2_diffusers.denoise import DEFAULT_DENOISE, DENOISERS, denoise_series
from qid2_diffusers.evaluation.report import write_json
from qid2_diffusers.example import make_example
from qid2_diffusers.hub import DTYPE_CHOICES, compile_unet, dtype_name, load_pipeline, select_device, select_dtype
from qid2_diffusers.inference import auto_batch_size, upsample_dwi
from qid2_diffusers.models.unet import ATTENTION, unet_forward
from qid2_diffusers.pipelines import QID2Upsampler
from qid2_diffusers.schedulers import make_scheduler
from qid2_diffusers.threads import cpu_name
from qid2_diffusers.timing import format_timings
from qid2_diffusers.upsampling import brain_bounding_box, brain_slices, fit_prior, network_pixels

#: Stages whose cost grows with the number of brain slices sampled.
PER_SLICE_STAGES = ("prior_predict", "batching", "sampling")


def peak_rss_gib() -> float:
    """Peak resident memory since :func:`reset_peak_rss` (Linux ``VmHWM``); NaN elsewhere."""
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmHWM")) / 2**20
    except (OSError, StopIteration):
        return float("nan")


def reset_peak_rss() -> None:
    """Start ``VmHWM`` afresh, so the phantom's simulation does not count (Linux >= 4.0)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def make_pipeline(args, device):
    if args.stand_in:
        pipe = build_pipeline("small", 3, physics_prior=True, bval_conditioning=True, default_num_inference_steps=1,
                              attention=args.attention)
        pipe.scheduler = make_scheduler("ddim", pipe.scheduler.config)
        pipe.set_progress_bar_config(disable=True)
        pipe = pipe.to(device, select_dtype(args.dtype, device))
        return compile_unet(pipe) if args.compile else pipe
    return load_pipeline(args.model, device=device, dtype=args.dtype, compile=args.compile)


def flop_per_pass(pipe, crop) -> float:
    """FLOPs of one network pass on one slice of the brain box (the pipeline's padding included)."""
    r, device, dtype = pipe.num_references, pipe.device, pipe.unet.dtype
    x, _ = pipe.image_processor.pad(torch.zeros(1, pipe.unet.config.in_channels, *crop, device=device, dtype=dtype))
    tokens = pipe.direction_encoder(torch.ones(1, 3, device=device), torch.ones(1, r, 3, device=device),
                                    torch.full((1,), 1000.0, device=device), torch.full((1, r), 1000.0, device=device))
    unet = getattr(pipe.unet, "_orig_mod", pipe.unet)  # count the eager module, not a compiled graph
    with torch.inference_mode(), FlopCounterMode(display=False) as counter:
        unet_forward(unet, x, torch.tensor([999], device=device), tokens.to(dtype))
    return float(counter.get_total_flops())


def spread_slices(mask: np.ndarray, k: int) -> np.ndarray:
    """``mask`` kept on ``k`` of its brain slices, evenly spread from bottom to top."""
    zs = brain_slices(mask)
    keep = zs[np.unique(np.linspace(0, len(zs) - 1, min(k, len(zs))).round().astype(int))]
    cut = np.zeros_like(mask)
    cut[:, :, keep] = mask[:, :, keep]
    return cut


def warm_up(pipe, data, dwi, mask, targets, batch_size) -> None:
    """One slice, one batch of targets, no adaptation: first-call costs (and compilation) stay out of the timing."""
    one = np.zeros_like(mask)
    z = brain_slices(mask)[len(brain_slices(mask)) // 2]
    one[:, :, z] = mask[:, :, z]
    up = QID2Upsampler(pipe, batch_size=batch_size, progress=False, adapt_steps=0)
    up.predict(data, dwi.bvals, dwi.bvecs, targets[:batch_size], one)


def timed_run(pipe, paths, target_bvecs, out_prefix, args, full_mask, cut_mask):
    """The timed part: open, up-sample, write. Returns the result and its timings."""
    dwi = load_dwi(paths[0], paths[1], paths[2])
    result = upsample_dwi(dwi, target_bvecs, pipe, mask=cut_mask, adapt_steps=args.adapt_steps,
                          batch_size=args.batch_size, seed=0, progress=False, denoise=args.denoise,
                          residual_weight=args.residual_weight)
    if cut_mask is not None:
        # Slices not sampled get input volumes, so the write compresses realistic data, not zeros.
        n_in, skipped = result.n_input, ~cut_mask.any(axis=(0, 1))
        for t in range(result.n_targets):
            result.data[:, :, skipped, n_in + t] = result.data[:, :, skipped, n_in - 1 - t % (n_in // 2)]
    result.save(out_prefix, dwi.affine, dwi.header)
    return result


def extrapolate(timings: dict, full_mask, cut_mask, whole_volume: dict, slice_boxes: bool = True) -> tuple[dict, dict]:
    """Whole-brain stages from a run on some slices, and the factors used.

    Per-slice stages scale with the pixels the network sees: the sum over brain slices of each
    slice's own box, or of the volume's box when the upsampler crops every slice to it (``slice_boxes``
    `False`: a compiled network; :func:`~qid2_diffusers.upsampling.network_pixels`);
    ``whole_volume`` holds the stages timed apart on the whole brain (mask, prior fit).
    """
    factors = dict(slices=len(brain_slices(full_mask)) / len(brain_slices(cut_mask)),
                   pixels=network_pixels(full_mask, slice_boxes) / network_pixels(cut_mask, slice_boxes))
    whole = dict(timings)
    for stage in PER_SLICE_STAGES:
        if stage in whole:
            whole[stage] *= factors["pixels"]
    whole.update(whole_volume)
    return whole, factors


def prior_fit_seconds(data, dwi, mask) -> float:
    """Seconds of the physics prior's tensor fit on the whole brain, as the run makes it (``data`` already read)."""
    start = time.perf_counter()
    fit_prior(data, dwi.bvals, dwi.bvecs, mask, brain_bounding_box(mask))
    return time.perf_counter() - start


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="model folder or Hub id (default: the shipped model)")
    ap.add_argument("--stand-in", action="store_true", help="a random model with the cost of the one being trained")
    ap.add_argument("--attention", default="every", choices=ATTENTION,
                    help="the stand-in's cross-attention levels (train_qid2.py --attention; default: %(default)s)")
    ap.add_argument("--adapt-steps", type=int, help="test-time adaptation steps (default: the model's default)")
    ap.add_argument("--device", default="auto", help="auto, cpu, cuda or mps (default: auto)")
    ap.add_argument("--dtype", default="auto", choices=DTYPE_CHOICES, help="as qid2 upsample --dtype (default: auto)")
    ap.add_argument("--batch-size", type=int, help="pairs per network call (default: qid2 upsample's automatic choice)")
    ap.add_argument("--compile", action="store_true", help="torch.compile the U-Net (compiled in the warm-up)")
    ap.add_argument("--threads", type=int, help="torch threads (default: torch's choice)")
    ap.add_argument("--resolution", type=float, default=1.25, help="phantom voxel size in mm (default: 1.25, HCP)")
    ap.add_argument("--slab", type=int, help="keep only this many central axial slices of the phantom (toy runs)")
    ap.add_argument("--seed", type=int, default=4000, help="phantom seed (default: %(default)s)")
    ap.add_argument("--slices", type=int, metavar="K", help="time K brain slices and extrapolate (see above)")
    ap.add_argument("--denoise", choices=DENOISERS, help=f"as qid2 upsample --denoise (default: {DEFAULT_DENOISE})")
    ap.add_argument("--residual-weight", help="as qid2 upsample --residual-weight (default: auto; 1 always runs "
                    "the network)")
    ap.add_argument("--json", help="write the figures here")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = select_device(args.device)

    with tempfile.TemporaryDirectory(prefix="qid2-bench-") as tmp:
        start = time.perf_counter()
        example = make_example(tmp, seed=args.seed, slab=args.slab, resolution=args.resolution)
        paths, targets, shape = example.paths, example.target_bvecs, example.subject.dwi.shape
        del example  # the phantom's truth: GiBs at 1.25 mm that the run does not need
        print(f"wrote a {'x'.join(map(str, shape[:3]))} phantom, {shape[3]} volumes, in {time.perf_counter() - start:.0f} s")
        pipe = make_pipeline(args, device)

        # The brain mask the run computes (``brain_mask``), in the file's orientation: it sets the
        # crop and the warm-up's slice, and in --slices mode the slices kept and the mask's time.
        probe = {}
        dwi = load_dwi(paths[0], paths[1], paths[2])
        full_mask = read_series(dwi, timings=probe).stored_mask
        cut_mask = spread_slices(full_mask, args.slices) if args.slices else None
        bx, by = brain_bounding_box(full_mask)
        crop = (int(bx.stop - bx.start), int(by.stop - by.start))
        volumes_in = dwi.n_volumes
        batch = args.batch_size or auto_batch_size(pipe, full_mask)
        data = np.asarray(dwi.data[...], dtype=np.float32)  # read once, for the warm-up and the prior fit
        start = time.perf_counter()
        warm_up(pipe, data, dwi, full_mask, targets, batch)
        warm_up_s = time.perf_counter() - start
        whole_volume = dict(mask=probe["mask"])
        if cut_mask is not None and pipe.config.get("physics_prior", False):
            whole_volume["prior_fit"] = prior_fit_seconds(data, dwi, full_mask)
        if cut_mask is not None:
            # Denoising patches are centred on the mask: on K slices it would cost a fraction of the brain's.
            start = time.perf_counter()
            denoise_series(data, dwi.bvals, args.denoise or DEFAULT_DENOISE, mask=full_mask)
            whole_volume["denoise"] = time.perf_counter() - start
        del dwi, data

        if device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        reset_peak_rss()
        result = timed_run(pipe, paths, targets, Path(tmp) / "up", args, full_mask, cut_mask)
        timings = dict(result.timings)
        denoise_note, residual_weights = result.denoise_note, result.residual_weights
        peak_rss = peak_rss_gib()
        output_finite = bool(np.isfinite(result.data).all())
        n_volumes = int(result.data.shape[3])
        del result

    measured_slices = len(brain_slices(full_mask if cut_mask is None else cut_mask))
    row = dict(
        device=torch.cuda.get_device_name() if device.type == "cuda" else f"cpu, {torch.get_num_threads()} thread(s)",
        cpu=cpu_name(),
        threads=torch.get_num_threads(), model=f"stand-in (small, prior, b tokens, attention {args.attention}, DDIM 1 step)" if args.stand_in
        else str(args.model or "shipped"), dtype=dtype_name(pipe.unet.dtype), compiled=bool(args.compile),
        shape=list(shape[:3]), volumes_in=volumes_in, volumes_out=n_volumes, targets=int(len(targets)),
        brain_slices=len(brain_slices(full_mask)), crop=list(crop), batch_size=int(batch),
        scheduler=type(pipe.scheduler).__name__, steps=int(pipe.config.default_num_inference_steps),
        adapt_steps=int(pipe.config.get("default_adapt_steps", 0) if args.adapt_steps is None else args.adapt_steps),
        gflop_per_pass=flop_per_pass(pipe, crop) / 1e9, peak_rss_gib=peak_rss,
        peak_gpu_mem_gib=torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None,
        output_finite=output_finite, warm_up_s=warm_up_s, denoise=denoise_note, residual_weights=residual_weights,
    )
    pairs = row["brain_slices"] * row["targets"]
    row["network_passes"] = pairs * row["steps"]
    if cut_mask is not None:
        row["measured"] = dict(slices=measured_slices, timings=timings)
        timings, row["extrapolation_factors"] = extrapolate(timings, full_mask, cut_mask, whole_volume,
                                                            slice_boxes=QID2Upsampler(pipe).slice_boxes)
    row["timings"] = timings
    row["total_s"] = sum(timings.values())
    row["pairs_per_s"] = pairs / row["total_s"]
    # No sampling at all where the residual weight came out at 0 (the network's passes are skipped).
    row["sampling_pairs_per_s"] = pairs / timings["sampling"] if timings.get("sampling") else None
    row["label"] = (f"{'x'.join(map(str, row['shape']))}, {row['targets']} targets, {row['model']}"
                    + (f", {measured_slices} of {row['brain_slices']} slices timed, extrapolated" if cut_mask is not None else ""))
    for k, v in row.items():
        if k not in ("timings", "measured"):
            print(f"{k:>22}: {v}")
    print(format_timings(timings))
    if args.json:
        write_json(args.json, row)


if __name__ == "__main__":
    main()
