"""Training loader throughput: samples/s for 145x174 slices with R = 6.

Builds a cache from an HCP-sized slab (145x174 x a few slices, 18 b0 + 90
directions at b = 1000) -- synthetic, or a 1.25 mm brain phantom slab with
``--phantom`` -- then times ``QID2Dataset.__getitem__`` in this process and
through a ``DataLoader`` with two workers, with and without augmentation.

    python benchmarks/bench_loader.py [--slices 8] [--samples 3000] [--phantom]
"""

from __future__ import annotations

import argparse
import tempfile
import time

import numpy as np
import torch
from torch.utils.data import DataLoader

from qid2_diffusers.data.dataset import QID2Dataset, build_cache
from qid2_diffusers.data.io import DWI
from qid2_diffusers.directions import uniform_directions


def synthetic_subject(n_slices: int, seed: int = 0) -> DWI:
    rng = np.random.default_rng(seed)
    shape = (145, 174, n_slices)
    x, y = np.meshgrid(np.linspace(-1, 1, 145), np.linspace(-1, 1, 174), indexing="ij")
    brain = (x / 0.8) ** 2 + (y / 0.9) ** 2 < 1.0
    mask = np.repeat(brain[:, :, None], n_slices, axis=2)
    bvals = np.r_[np.zeros(18), np.full(90, 1000.0)]
    bvecs = np.r_[np.zeros((18, 3)), uniform_directions(90)]
    s0 = 1000.0 * mask
    att = np.exp(-1000.0 * 0.0008 * (1 + 0.5 * rng.random(108)))
    att[:18] = 1.0
    data = (s0[..., None] * att + rng.normal(0, 20.0, shape + (108,))).astype(np.float32)
    return DWI(data=data, bvals=bvals, bvecs=bvecs, affine=np.diag([-1.25, 1.25, 1.25, 1.0]), mask=mask)


def rate_getitem(dataset: QID2Dataset, n: int) -> float:
    order = np.resize(np.random.default_rng(0).permutation(len(dataset)), n)
    dataset[int(order[0])]  # map the file
    start = time.perf_counter()
    for i in order:
        dataset[int(i)]
    return n / (time.perf_counter() - start)


def rate_loader(dataset: QID2Dataset, n: int, workers: int, batch_size: int = 32) -> float:
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=True, num_workers=workers,
                        persistent_workers=workers > 0, generator=torch.Generator().manual_seed(0))
    next(iter(loader))  # worker start-up is paid once per run, not per sample
    seen, start = 0, time.perf_counter()
    while seen < n:
        for batch in loader:
            seen += batch["target"].shape[0]
            if seen >= n:
                break
    return seen / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--slices", type=int, default=8)
    parser.add_argument("--samples", type=int, default=3000)
    parser.add_argument("--references", type=int, default=6)
    parser.add_argument("--phantom", action="store_true", help="use a qid2 phantom slab instead of synthetic data")
    args = parser.parse_args()
    torch.set_num_threads(1)
    if args.phantom:
        from qid2_diffusers.data.phantom import make_subject

        ph = make_subject(0, resolution=1.25, slab=args.slices)
        subject = DWI(data=ph.dwi, bvals=ph.bvals, bvecs=ph.bvecs, affine=ph.affine, mask=ph.mask)
    else:
        subject = synthetic_subject(args.slices)
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        cache = build_cache(subject, tmp, subject_id="bench")
        print(f"cache build: {time.perf_counter() - start:.2f} s for {subject.shape}")
        print(f"{len(QID2Dataset([cache], args.references))} samples, R = {args.references}")
        for augment in (False, True):
            dataset = QID2Dataset([cache], args.references, augment=augment)
            label = "with augmentation   " if augment else "without augmentation"
            print(f"{label}: {rate_getitem(dataset, args.samples):7.0f} samples/s  __getitem__, 1 process")
            rate = rate_loader(dataset, args.samples, workers=2)
            print(f"{label}: {rate:7.0f} samples/s  DataLoader, 2 workers, batch 32")


if __name__ == "__main__":
    main()
