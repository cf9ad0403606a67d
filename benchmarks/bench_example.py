"""Time and memory of ``qid2 upsample``: the README's main job, whole phantom subjects, the naive loop.

    python benchmarks/bench_example.py                               # qid2 upsample --example, shipped model
    python benchmarks/bench_example.py --model DIR --steps 10        # another model / step count
    python benchmarks/bench_example.py --phantom 2.5 --naive-pairs 120
        # a whole 2.5 mm phantom subject (b0 + 30 -> + 60) with default settings,
        # and its ratio to the naive loop
    python benchmarks/bench_example.py --phantom 1.25 --phantom-slices 4   # HCP grid: peak RSS

Each job runs as a fresh ``qid2`` process (imports and model loading
included, as a user would see it); the figures are its wall time and peak
resident memory (the child's own ``VmHWM``). ``--threads N`` pins torch's
thread count (OMP_NUM_THREADS) to compare with an N-core machine.

``--phantom RES`` writes one whole phantom subject (seed ``--seed``, not a
training seed) at RES mm with its 18 b0 and the 30 most uniform of its 90
directions, and up-samples it back to the 90-direction scheme
(``--scheme hcp90``): default settings, so the brain mask comes from
median_otsu and only brain slices are sampled. ``--phantom-slices K`` instead
passes the phantom's mask cut to K central slices: memory does not depend on
how many slices are sampled (the input and output series dominate it), so a
1.25 mm memory figure does not need the hour a whole 1.25 mm subject takes on
a CPU.

``--naive-pairs N`` then times the loop a naive implementation would run:
one (slice, target) pair per network call, the whole uncropped slice, every
slice whether it holds brain or not. N pairs drawn at random (seeded) are
timed in this process with the same model, sampler, steps and thread count,
and the mean is extrapolated to all slices x targets (each pair costs the
same: no pair is skipped or cropped); the ratio is that estimate over the
measured end-to-end time of ``qid2 upsample``.
"""

from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from qid2_diffusers.threads import cpu_name


#: The child reports its own peak RSS (VmHWM, Linux) at exit. ru_maxrss from
#: wait4 would also count the moment between fork and exec, when the child is
#: a copy of this process, which holds the phantom (4 GiB at 1.25 mm).
CHILD = """
import atexit, sys

def _peak():
    try:
        with open("/proc/self/status") as f:
            kib = next(int(line.split()[1]) for line in f if line.startswith("VmHWM"))
        sys.stderr.write(f"QID2_PEAK_KIB {kib}\\n")
    except (OSError, StopIteration):
        pass

atexit.register(_peak)
from qid2_diffusers.cli import main
sys.exit(main(sys.argv[1:]))
"""


def run_child(argv, threads=None) -> tuple[float, float, str]:
    """Wall seconds, peak RSS (GiB) and stdout of ``qid2 *argv`` in a fresh process."""
    env = dict(os.environ)
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", CHILD, *argv], env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        sys.exit(f"qid2 {' '.join(argv)} failed:\n{done.stderr[-3000:]}")
    peaks = [int(line.split()[1]) for line in done.stderr.splitlines() if line.startswith("QID2_PEAK_KIB ")]
    if not peaks:
        sys.exit("the child did not report its peak memory (/proc/self/status has no VmHWM on this system)")
    return seconds, peaks[-1] / 2**20, done.stdout


def naive_seconds(dwi_path, bval, bvec, target_bvecs, args) -> tuple[float, int, float]:
    """Estimated seconds of the naive loop over every (slice, target), from ``args.naive_pairs`` timed pairs.

    Returns ``(estimate, pairs in the whole loop, mean seconds per pair)``.
    """
    import torch

    from qid2_diffusers.data.io import load_dwi
    from qid2_diffusers.directions import nearest_references, normalize_bvecs
    from qid2_diffusers.gradients import split_scheme
    from qid2_diffusers.hub import load_pipeline

    if args.threads:
        torch.set_num_threads(args.threads)
    pipe = load_pipeline(args.model, scheduler=args.scheduler, device=args.device, dtype=args.dtype)
    pipe.set_progress_bar_config(disable=True)
    dwi = load_dwi(dwi_path, bval, bvec)
    data = np.asarray(dwi.data[...], dtype=np.float32)
    _, dw = split_scheme(dwi.bvals, dwi.bvecs)
    acquired = normalize_bvecs(dwi.bvecs[dw])
    targets = normalize_bvecs(target_bvecs)
    refs = nearest_references(targets, acquired, pipe.num_references)
    n_slices, n_targets = data.shape[2], len(targets)
    rng = np.random.default_rng(args.seed)
    pairs = rng.choice(n_slices * n_targets, size=min(args.naive_pairs, n_slices * n_targets), replace=False)
    times = []
    for k, pair in enumerate(pairs):
        z, t = divmod(int(pair), n_targets)
        references = np.moveaxis(data[:, :, z, dw[refs[t]]], -1, 0)[None]
        tic = time.perf_counter()
        pipe(references, acquired[refs[t]][None], targets[t][None], num_inference_steps=args.steps,
             generator=torch.Generator().manual_seed(k), output_type="np")
        times.append(time.perf_counter() - tic)
    per_pair = float(np.mean(times[1:] if len(times) > 1 else times))  # the first call warms up
    return per_pair * n_slices * n_targets, n_slices * n_targets, per_pair


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="model folder or Hub id (default: the shipped model)")
    ap.add_argument("--steps", type=int, help="denoising steps (default: the model's)")
    ap.add_argument("--scheduler", help="sampler (default: the model's)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="auto", help="auto, fp32, fp16 or bf16 (as qid2 upsample --dtype)")
    ap.add_argument("--threads", type=int, help="torch threads in the child (default: torch's choice)")
    ap.add_argument("--phantom", type=float, metavar="RES", help="a whole phantom subject at RES mm (2.5 or 1.25)")
    ap.add_argument("--phantom-slices", type=int, metavar="K",
                    help="pass the phantom's mask cut to K central slices instead of the default median_otsu mask")
    ap.add_argument("--naive-pairs", type=int, default=0, metavar="N",
                    help="with --phantom: time N random pairs of the naive loop and report the ratio")
    ap.add_argument("--seed", type=int, default=2024, help="phantom and naive-pair seed (default: %(default)s)")
    args = ap.parse_args()

    extra = ["--device", args.device, "--dtype", args.dtype]
    for flag, value in (("--model", args.model), ("--steps", args.steps), ("--scheduler", args.scheduler)):
        if value is not None:
            extra += [flag, str(value)]
    print(f"# {cpu_name()}"
          f"{f', OMP_NUM_THREADS={args.threads}' if args.threads else ''}, python {platform.python_version()}")
    with tempfile.TemporaryDirectory(prefix="qid2-bench-") as tmp:
        tmp = Path(tmp)
        if args.phantom:
            from qid2_diffusers.example import make_example

            t0 = time.perf_counter()
            example = make_example(tmp, seed=args.seed, slab=None, resolution=args.phantom)
            dwi, bval, bvec, mask = (str(p) for p in example.paths)
            shape = example.subject.dwi.shape[:3]
            print(f"wrote a {'x'.join(map(str, shape))} phantom at {args.phantom:g} mm "
                  f"(18 b0 + 30 of 90 directions) in {time.perf_counter() - t0:.0f} s")
            argv = ["upsample", "--dwi", dwi, "--bvals", bval, "--bvecs", bvec, "--scheme", "hcp90",
                    "--out", str(tmp / "up"), *extra]
            where = "median_otsu mask"
            if args.phantom_slices:
                import nibabel as nib

                img = nib.load(mask)
                cut = np.asarray(img.dataobj).astype(bool)
                keep = np.zeros(shape[2], dtype=bool)
                z0 = shape[2] // 2 - args.phantom_slices // 2
                keep[z0 : z0 + args.phantom_slices] = True
                nib.save(nib.Nifti1Image((cut & keep).astype(np.uint8), img.affine), tmp / "cut_mask.nii.gz")
                argv += ["--mask", str(tmp / "cut_mask.nii.gz")]
                where = f"phantom mask cut to {args.phantom_slices} central slices"
            label = f"qid2 upsample, {args.phantom:g} mm phantom, 18 b0 + 30 -> +60 ({where})"
            target_bvecs = example.target_bvecs
            del example  # free the phantom (GiBs at 1.25 mm) before the child runs
        else:
            argv = ["upsample", "--example", "--out-dir", str(tmp), *extra]
            label = "qid2 upsample --example"
        seconds, peak, out = run_child(argv, args.threads)
        print(out.rstrip())
        print(f"{label}: {seconds:.1f} s wall, peak RSS {peak:.2f} GiB")
        if args.phantom and args.naive_pairs:
            estimate, n_pairs, per_pair = naive_seconds(dwi, bval, bvec, target_bvecs, args)
            print(f"naive loop (1 slice x 1 target per call, whole {shape[0]}x{shape[1]} slice, all {shape[2]} slices): "
                  f"{per_pair * 1e3:.0f} ms per pair from {args.naive_pairs} timed pairs x {n_pairs} pairs "
                  f"= {estimate:.0f} s estimated")
            print(f"ratio naive / qid2 upsample: {estimate / seconds:.1f}x")


if __name__ == "__main__":
    main()
