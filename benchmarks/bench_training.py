"""Training throughput of QID²: optimiser steps per second on phantom slices.

    python benchmarks/bench_training.py                                  # small, R=3, batch 32, 2.5 mm (72x87), CPU
    python benchmarks/bench_training.py --device cuda --mixed_precision bf16 --steps 50 --workers 4

Runs the trainer's own loss (``qid2_diffusers.pipelines.training_utils.diffusion_loss``)
on batches from a :class:`~qid2_diffusers.data.dataset.QID2Dataset` cache of a
2.5 mm phantom slab, with AdamW, and prints steps/s, samples/s and the share of
time spent waiting for data. The first ``--warmup`` steps are not timed.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import platform
import tempfile
import time

import torch
from torch.utils.data import DataLoader

from qid2_diffusers import build_pipeline
from qid2_diffusers.data.dataset import QID2Dataset, build_cache
from qid2_diffusers.data.phantom import make_subject
from qid2_diffusers.pipelines.training_utils import random_crops
from qid2_diffusers.training.data import EpochSampler
from qid2_diffusers.pipelines.training_utils import QID2Denoiser, diffusion_loss


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="small")
    ap.add_argument("--R", type=int, default=3)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--steps", type=int, default=5, help="timed steps")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--slab", type=int, default=4, help="axial slices of the 2.5 mm phantom")
    ap.add_argument("--prediction_type", default="v_prediction")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--mixed_precision", default="no", choices=["no", "fp16", "bf16"])
    ap.add_argument("--workers", type=int, default=0)
    ap.add_argument("--crop_size", type=int, default=None, help="train on random crops (the trainers' --crop_size)")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)

    subject = make_subject(0, slab=args.slab)
    with tempfile.TemporaryDirectory() as tmp:
        from qid2_diffusers.data.io import DWI

        dwi = DWI(data=subject.dwi, bvals=subject.bvals, bvecs=subject.bvecs, affine=subject.affine, mask=subject.mask)
        cache = build_cache(dwi, tmp, subject_id="bench")
        dataset = QID2Dataset([cache], num_references=args.R, augment=True, seed=0)
        loader = DataLoader(dataset, batch_size=args.batch, sampler=EpochSampler(len(dataset), 0),
                            num_workers=args.workers, drop_last=True)
        pipe = build_pipeline(args.preset, args.R, args.prediction_type, seed=0)
        model = QID2Denoiser(pipe.unet, pipe.direction_encoder).to(device).train()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.5, 0.999))
        dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(args.mixed_precision)
        autocast = torch.autocast(device.type, dtype=dtype) if dtype else contextlib.nullcontext()

        def sync():
            if device.type == "cuda":
                torch.cuda.synchronize()

        batches = iter(loader)
        total = waiting = 0.0
        timed = 0
        for step in range(args.warmup + args.steps):
            t0 = time.perf_counter()
            try:
                batch = next(batches)
            except StopIteration:
                batches = iter(loader)
                batch = next(batches)
            batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
            t1 = time.perf_counter()
            generator = torch.Generator().manual_seed(step)
            batch = random_crops(batch, args.crop_size, generator)
            with autocast:
                loss = diffusion_loss(model, pipe.scheduler, batch, generator)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            sync()
            t2 = time.perf_counter()
            if step >= args.warmup:
                total += t2 - t0
                waiting += t1 - t0
                timed += 1
        h, w = batch["target"].shape[-2:]
        result = {
            "preset": args.preset, "R": args.R, "batch": args.batch, "slice": f"{h}x{w}",
            "device": torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU {platform.machine()}",
            "threads": torch.get_num_threads(), "mixed_precision": args.mixed_precision,
            "steps_per_s": round(timed / total, 4), "s_per_step": round(total / timed, 3),
            "samples_per_s": round(timed * args.batch / total, 1), "data_wait_share": round(waiting / total, 3),
        }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
