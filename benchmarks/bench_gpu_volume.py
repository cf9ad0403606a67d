"""Full-volume throughput of QID² up-sampling (issue: speed).

    python benchmarks/bench_gpu_volume.py                   # paper preset, 145x174x145, 60 targets, on cuda
    python benchmarks/bench_gpu_volume.py --shape 24 28 6   # a toy size, e.g. to check the script on a CPU

Speed does not depend on the weights, so the network is randomly
initialised; the input is an HCP-sized volume with an ellipsoidal brain mask
(about the brain's share of the field of view), 18 b0 + 30 acquired
directions, and the 60 complementary targets of a 90-direction scheme. The
sampler and step count are the package defaults (the shipped pipeline's).
Prints total seconds, slices/s, peak GPU memory and the achieved fraction of
the GPU's dense bf16 peak, from a FLOP count of one network pass.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode

from qid2_diffusers import QID2Pipeline, QID2Upsampler, build_pipeline
from qid2_diffusers.directions import complement, uniform_directions, uniform_subset
from qid2_diffusers.evaluation.report import write_json
from qid2_diffusers.hub import compile_unet, select_device
from qid2_diffusers.schedulers import SCHEDULERS, make_scheduler
from qid2_diffusers.upsampling import brain_bounding_box, brain_slices

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def ellipsoid_mask(shape) -> np.ndarray:
    grid = np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing="ij")
    radii = (0.8, 0.85, 0.8)
    return sum((g / r) ** 2 for g, r in zip(grid, radii)) <= 1.0


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="paper")
    ap.add_argument("--R", type=int, default=3)
    ap.add_argument("--shape", type=int, nargs=3, default=(145, 174, 145))
    ap.add_argument("--device", default="auto", help="auto, cpu, cuda or mps (default: auto)")
    ap.add_argument("--dtype", default="bf16", choices=DTYPES)
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--scheduler-from", help="a pipeline folder whose scheduler and default steps to use "
                    "(default: the shipped model's, if any)")
    ap.add_argument("--scheduler", choices=sorted(SCHEDULERS), help="override the sampler")
    ap.add_argument("--steps", type=int, help="override the step count")
    ap.add_argument("--peak-tflops", type=float, default=989.0, help="dense bf16 peak (H100/H200 SXM: 989)")
    ap.add_argument("--compile", action="store_true", help="torch.compile the U-Net (compiled in the untimed warm-up)")
    ap.add_argument("--json")
    args = ap.parse_args()

    device = select_device(args.device)
    dtype = DTYPES[args.dtype] if device.type == "cuda" else torch.float32
    pipe = build_pipeline(args.preset, args.R)
    try:
        trained = QID2Pipeline.from_pretrained(args.scheduler_from or QID2Pipeline.default_model_path(args.R))
        pipe.scheduler, steps = trained.scheduler, trained.config.default_num_inference_steps
    except FileNotFoundError:
        steps = None
    if args.scheduler:
        pipe.scheduler = make_scheduler(args.scheduler, pipe.scheduler.config)
    steps = args.steps or steps or 10
    pipe.register_to_config(default_num_inference_steps=steps)
    pipe.to(device, dtype)
    if args.compile:
        compile_unet(pipe, dynamic=True)

    rng = np.random.default_rng(0)
    scheme = uniform_directions(90)
    acquired = uniform_subset(scheme, 30)
    targets = scheme[complement(scheme, scheme[acquired])]
    bvals = np.r_[np.zeros(18), np.full(30, 1000.0)]
    bvecs = np.r_[np.zeros((18, 3)), scheme[acquired]]
    mask = ellipsoid_mask(args.shape)
    data = (rng.random((*args.shape, 48), dtype=np.float32) * 1000) * mask[..., None]

    zs = brain_slices(mask)
    bx, by = brain_bounding_box(mask)
    crop = (bx.stop - bx.start, by.stop - by.start)
    with torch.inference_mode():
        x = torch.zeros(1, 1 + args.R, *crop, device=device, dtype=dtype)
        x, _ = pipe.image_processor.pad(x)
        tokens = pipe.direction_encoder(torch.ones(1, 3, device=device), torch.ones(1, args.R, 3, device=device)).to(dtype)
        with FlopCounterMode(display=False) as counter:
            pipe.unet(x, torch.tensor([500], device=device), encoder_hidden_states=tokens)
    flop_per_pass = counter.get_total_flops()
    passes = len(zs) * len(targets) * steps

    up = QID2Upsampler(pipe, batch_size=args.batch_size, seed=0, progress=False)
    # Untimed warm-up on two slices (kernel selection, allocator; with --compile the
    # compilation: dynamic shapes, so the timed run's other batch sizes reuse it).
    warm = np.zeros_like(mask)
    warm[:, :, zs[len(zs) // 2]] = mask[:, :, zs[len(zs) // 2]]
    up.predict(data, bvals, bvecs, targets[:2], warm)
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    out = up.predict(data, bvals, bvecs, targets, mask)
    if device.type == "cuda":
        torch.cuda.synchronize()
    total = time.perf_counter() - t0
    peak_mem = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan")
    tflops = flop_per_pass * passes / total / 1e12
    row = dict(
        device=torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
        preset=args.preset, R=args.R, dtype=str(dtype).replace("torch.", ""), shape=list(args.shape),
        brain_slices=int(len(zs)), crop=list(crop), targets=int(len(targets)),
        scheduler=type(pipe.scheduler).__name__, steps=int(steps), batch_size=args.batch_size,
        network_passes=int(passes), gflop_per_pass=flop_per_pass / 1e9, total_s=total,
        slices_per_s=len(zs) * len(targets) / total, peak_gpu_mem_gib=peak_mem, achieved_tflops=tflops,
        percent_of_bf16_peak=100 * tflops / args.peak_tflops if device.type == "cuda" else None,
        compiled=bool(args.compile), output_finite=bool(np.isfinite(out).all()),
    )
    for k, v in row.items():
        print(f"{k:>22}: {v}")
    if args.json:
        write_json(args.json, row)


if __name__ == "__main__":
    main()
