"""Time and peak memory of simulating one phantom subject, per resolution.

Each measurement runs in a fresh Python process, so its peak resident memory
(``ru_maxrss``) is that subject's alone. Reported per run:

- ``import``: importing the package (torch and diffusers come with it);
- ``scheme``: the first ``hcp_scheme()`` of a process (dipy's charge dispersion
  for the 90 directions; cached afterwards, so a cohort pays it once);
- ``subject``: ``make_subject`` itself, the figure the targets refer to
  (1.25 mm <= 60 s and <= 6 GB, 2.5 mm <= 10 s, on 2 cores; a randomised
  2.5 mm subject of three shells and 24 slices well under a minute on one);
- ``write``: ``write_subject`` (gzip NIfTI), with ``--write``;
- peak RSS of the process, and its growth during ``make_subject``.

Usage::

    python benchmarks/bench_phantom.py                  # 2.5 and 1.25 mm, seed 0
    python benchmarks/bench_phantom.py --resolutions 2.5 --repeats 3 --write
    python benchmarks/bench_phantom.py --randomize --resolutions 2.5 1.25 --slab 24 --shells 1000 2000 3000

With ``--randomize`` the subject is domain-randomised (the voxel size and
shells given, the rest drawn from the seed); its series is simulated on a grid
twice as fine in-plane before the k-space cut, so it costs more than a default one.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

CHILD = r"""
import json, resource, sys, tempfile, time
t = time.perf_counter()
from qid2_diffusers.data.phantom import hcp_scheme, make_subject, write_subject
out = {"import": time.perf_counter() - t}
rss = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 ** 2  # GiB (ru_maxrss is KiB)
options = json.loads(sys.argv[4])
t = time.perf_counter(); hcp_scheme(options["shells"]); out["scheme"] = time.perf_counter() - t
before = rss()
t = time.perf_counter()
subject = make_subject(int(sys.argv[2]), resolution=float(sys.argv[1]), **options)
out["subject"] = time.perf_counter() - t
out["rss_peak"] = rss()
out["rss_growth"] = out["rss_peak"] - before
out["shape"] = list(subject.dwi.shape)
out["mask_voxels"] = int(subject.mask.sum())
if sys.argv[3] == "1":
    with tempfile.TemporaryDirectory() as tmp:
        t = time.perf_counter(); write_subject(subject, tmp, "bench"); out["write"] = time.perf_counter() - t
print(json.dumps(out))
"""


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--resolutions", type=float, nargs="+", default=[2.5, 1.25])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--repeats", type=int, default=1, help="fresh processes per resolution")
    parser.add_argument("--write", action="store_true", help="also time write_subject")
    parser.add_argument("--slab", type=int, default=None, help="central axial slices only")
    parser.add_argument("--shells", type=float, nargs="+", default=[1000.0], help="b-values")
    parser.add_argument("--randomize", action="store_true", help="domain-randomised subjects")
    args = parser.parse_args()
    options = json.dumps({"slab": args.slab, "shells": args.shells, "randomize": args.randomize})

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    load = os.getloadavg() if hasattr(os, "getloadavg") else (float("nan"),) * 3
    print(f"# {cores} cores; load average {load[0]:.1f} {load[1]:.1f} {load[2]:.1f} (other work on the machine inflates times)")
    header = f"{'res mm':>6} {'shape':>20} {'import s':>8} {'scheme s':>8} {'subject s':>9} {'peak GiB':>8} {'growth GiB':>10}"
    print(header + (f" {'write s':>7}" if args.write else ""))
    for resolution in args.resolutions:
        for _ in range(args.repeats):
            proc = subprocess.run(
                [sys.executable, "-c", CHILD, str(resolution), str(args.seed), "1" if args.write else "0", options],
                capture_output=True,
                text=True,
                check=False,
            )
            if proc.returncode != 0:
                print(proc.stderr, file=sys.stderr)
                return proc.returncode
            r = json.loads(proc.stdout.strip().splitlines()[-1])
            shape = "x".join(map(str, r["shape"]))
            line = f"{resolution:>6g} {shape:>20} {r['import']:>8.1f} {r['scheme']:>8.1f} {r['subject']:>9.1f} {r['rss_peak']:>8.2f} {r['rss_growth']:>10.2f}"
            print(line + (f" {r['write']:>7.1f}" if args.write else ""), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
