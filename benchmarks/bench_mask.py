"""The brain mask's cost on the HCP grid: dipy's ``median_otsu`` against the package's ``brain_mask``.

    python benchmarks/bench_mask.py                    # HCP grid (1.25 mm), phantom seed 4000, 1 and 2 workers
    python benchmarks/bench_mask.py --workers 1,2,4 --repeat 3

The mean b0 is that of the brain phantom ``bench_gpu_volume.py`` up-samples (seed ``--seed``, 145 x 174 x 145).
Printed: seconds (best of ``--repeat``) of dipy's ``median_otsu`` with the package's settings (radius
5 mm / voxel size, one pass, ``finalize_mask``) and of ``brain_mask`` with each worker count, the speed-up
over dipy, and whether the masks are identical (they must be: the median filter is split along z with a
halo, nothing is approximated); then the pixels the network sees per target on that mask, with one box for
the volume and with each slice cropped to its own box (what ``SliceUpsampler`` does).
"""

from __future__ import annotations

import argparse
import time

import numpy as np


def best_of(repeat: int, fn):
    times, result = [], None
    for _ in range(repeat):
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
    return min(times), result


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seed", type=int, default=4000, help="phantom seed (default: %(default)s, bench_gpu_volume's)")
    ap.add_argument("--resolution", type=float, default=1.25, help="voxel size in mm (default: 1.25, HCP)")
    ap.add_argument("--workers", type=str, default="1,2", help="worker threads to time, comma-separated")
    ap.add_argument("--repeat", type=int, default=1, help="runs per setting; the best is printed")
    args = ap.parse_args()

    from dipy.segment.mask import median_otsu

    from qid2_diffusers.data.phantom import make_subject
    from qid2_diffusers.gradients import split_scheme
    from qid2_diffusers.masking import MEDIAN_RADIUS_MM, brain_mask
    from qid2_diffusers.upsampling import brain_slices, network_pixels

    start = time.perf_counter()
    subject = make_subject(args.seed, resolution=args.resolution, slab=None)
    b0 = np.asarray(subject.dwi[..., split_scheme(subject.bvals)[0]], dtype=np.float32).mean(axis=-1)
    del subject
    print(f"mean b0 of a {'x'.join(map(str, b0.shape))} phantom (seed {args.seed}) in {time.perf_counter() - start:.0f} s")
    radius = max(1, int(round(MEDIAN_RADIUS_MM / args.resolution)))
    voxel = (args.resolution,) * 3

    dipy_s, expected = best_of(args.repeat, lambda: median_otsu(b0, median_radius=radius, numpass=1,
                                                                 finalize_mask=True)[1])
    print(f"dipy median_otsu (radius {radius}): {dipy_s:.1f} s, {int(expected.sum())} brain voxels")
    for workers in (int(w) for w in args.workers.split(",")):
        seconds, mask = best_of(args.repeat, lambda: brain_mask(b0, voxel, workers=workers))
        print(f"brain_mask, {workers} worker(s): {seconds:.1f} s, {dipy_s / seconds:.2f}x dipy's speed, "
              f"mask identical: {bool(np.array_equal(mask, expected))}")

    volume_box, per_slice = network_pixels(expected, slice_boxes=False), network_pixels(expected)
    print(f"network pixels per target over {len(brain_slices(expected))} brain slices: volume box {volume_box}, per-slice boxes "
          f"{per_slice} ({1 - per_slice / volume_box:.0%} fewer)")


if __name__ == "__main__":
    main()
