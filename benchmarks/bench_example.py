"""Time and memory of the README's main job, and of ``qid2 upsample`` on an HCP-sized series.

    python benchmarks/bench_example.py                          # qid2 upsample --example, shipped model
    python benchmarks/bench_example.py --model DIR --steps 10   # another model / step count
    python benchmarks/bench_example.py --hcp                    # 145x174x145 (6 b0 + 30) series, peak RSS

Each job runs as a fresh ``qid2`` process (imports and model loading
included, as a user would see it); the figures are its wall time and peak
resident memory (``ru_maxrss`` of the child). ``--threads N`` pins torch's
thread count (OMP_NUM_THREADS) to compare with an N-core machine.

``--hcp`` writes a synthetic 145x174x145 series with 6 b0 and 30 directions
(float32 .nii.gz, as HCP ships) and up-samples it to the 60 missing
directions of a 90-direction scheme. Memory does not depend on how many
slices are sampled, so by default only ``--hcp-slices`` central slices are in
the mask to keep the run short; ``--hcp-slices 0`` samples the whole brain.
"""

from __future__ import annotations

import argparse
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def run_child(argv, threads=None) -> tuple[float, float, str]:
    """Wall seconds, peak RSS (GiB) and stdout of ``qid2 *argv`` in a fresh process."""
    env = dict(os.environ)
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    code = "import sys; from qid2_diffusers.cli import main; sys.exit(main(sys.argv[1:]))"
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", code, *argv], env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        sys.exit(f"qid2 {' '.join(argv)} failed:\n{done.stderr[-3000:]}")
    # Linux reports ru_maxrss in KiB: the largest child so far, here the only one.
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2**20
    return seconds, peak, done.stdout


def synthetic_hcp(folder: Path, n_b0: int = 6, n_dirs: int = 30, slices: int = 8) -> list[str]:
    """A 145x174x145 series (float32 .nii.gz), its FSL bval/bvec and a mask of ``slices`` central slices."""
    import nibabel as nib

    from qid2_diffusers.data.phantom import phantom_grid
    from qid2_diffusers.directions import uniform_directions, uniform_subset

    shape, affine = phantom_grid(1.25)
    scheme = uniform_directions(90)
    bvecs = np.vstack([np.zeros((n_b0, 3)), scheme[uniform_subset(scheme, n_dirs)]])
    bvals = np.r_[np.zeros(n_b0), np.full(n_dirs, 1000.0)]
    grid = np.stack(np.meshgrid(*[np.linspace(-1, 1, s, dtype=np.float32) for s in shape], indexing="ij"))
    brain = (grid**2).sum(0) < 0.8
    rng = np.random.default_rng(0)
    data = np.empty(shape + (len(bvals),), dtype=np.float32)
    for k, (b, g) in enumerate(zip(bvals, bvecs)):
        # An anisotropic pattern so the volumes differ by direction, plus noise.
        signal = 1000.0 * np.exp(-b * 1e-3 * (0.5 + 0.4 * (g[0] * grid[0] + g[1] * grid[1]) ** 2))
        data[..., k] = brain * signal + rng.normal(0, 20, shape).astype(np.float32)
    img = nib.Nifti1Image(data, affine)
    nib.save(img, folder / "dwi.nii.gz")
    np.savetxt(folder / "dwi.bval", bvals[None], fmt="%g")
    np.savetxt(folder / "dwi.bvec", bvecs.T, fmt="%.8f")
    mask = brain.copy()
    if slices:
        keep = np.zeros(shape[2], dtype=bool)
        keep[shape[2] // 2 - slices // 2 : shape[2] // 2 - slices // 2 + slices] = True
        mask &= keep[None, None, :]
    nib.save(nib.Nifti1Image(mask.astype(np.uint8), affine), folder / "mask.nii.gz")
    return [str(folder / f) for f in ("dwi.nii.gz", "dwi.bval", "dwi.bvec", "mask.nii.gz")]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="model folder or Hub id (default: the shipped model)")
    ap.add_argument("--steps", type=int, help="denoising steps (default: the model's)")
    ap.add_argument("--scheduler", help="sampler (default: the model's)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="fp32", help="fp32, fp16 or bf16")
    ap.add_argument("--threads", type=int, help="torch threads in the child (default: torch's choice)")
    ap.add_argument("--hcp", action="store_true", help="benchmark a 145x174x145 series instead of the example")
    ap.add_argument("--hcp-slices", type=int, default=4, help="central slices in the --hcp mask; 0 = whole brain")
    args = ap.parse_args()

    extra = ["--device", args.device, "--dtype", args.dtype]
    for flag, value in (("--model", args.model), ("--steps", args.steps), ("--scheduler", args.scheduler)):
        if value is not None:
            extra += [flag, str(value)]
    print(f"# {platform.machine()} {platform.processor() or ''}, {os.cpu_count()} CPUs visible"
          f"{f', OMP_NUM_THREADS={args.threads}' if args.threads else ''}, python {platform.python_version()}")
    with tempfile.TemporaryDirectory(prefix="qid2-bench-") as tmp:
        tmp = Path(tmp)
        if args.hcp:
            t0 = time.perf_counter()
            dwi, bval, bvec, mask = synthetic_hcp(tmp, slices=args.hcp_slices)
            print(f"wrote the synthetic 145x174x145x36 series in {time.perf_counter() - t0:.0f} s")
            argv = ["upsample", "--dwi", dwi, "--bvals", bval, "--bvecs", bvec, "--mask", mask,
                    "--n-targets", "90", "--out", str(tmp / "up"), *extra]
            label = f"qid2 upsample, 145x174x145, 6 b0 + 30 -> +60 ({args.hcp_slices or 'all'} brain slices)"
        else:
            argv = ["upsample", "--example", "--out-dir", str(tmp), *extra]
            label = "qid2 upsample --example"
        seconds, peak, out = run_child(argv, args.threads)
    print(out.rstrip())
    print(f"{label}: {seconds:.1f} s wall, peak RSS {peak:.2f} GiB")


if __name__ == "__main__":
    main()
