"""How real do the domain-randomised phantoms look? A comparison with the real scans (compare only).

    python benchmarks/realism.py --out benchmarks/results/realism
    python benchmarks/realism.py --out runs/realism --seeds 0 1 --slab 6

The real scans are the judge, never the teacher: nothing here feeds back into
the generator, and no held-out direction of a real scan is used to fit
anything. Datasets: randomised phantoms (``make_subject(seed, randomize=True)``,
noisy series, ``--slab`` central slices), the default phantom for reference,
and every scan of :func:`qid2_diffusers.data.real.real_cases` (the mdt Siemens
scan, b = 1000/2000, 2 mm, with its mask; the MRtrix3 crops, b = 700/1200/2800
and 3000, masked by the package's ``brain_mask``). For each:

(a) FA inside the mask, from the package's tensor fit on the b0 volumes and the
    shell nearest b = 1000 (histogram and summary);
(b) mean S/S0 per shell and tissue class, the classes from that fit: white
    matter FA > 0.4, CSF MD > 2.0e-3 mm²/s, grey matter otherwise;
(c) radially averaged power spectra of the central axial slice of one b0 and
    one diffusion-weighted volume (the shell nearest 1000), in cycles/mm,
    normalised to unit power without the mean; the table gives the share of
    power between 0.1 and 0.2 cycles/mm (a band every voxel size here
    resolves), where noise and ringing live. Crops under 32 voxels in-plane
    are too small for a spectrum.

Writes ``realism.png`` and ``realism.md`` into ``--out`` and prints the tables.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

WM_FA, CSF_MD = 0.4, 2.0e-3
FA_BINS = np.linspace(0.0, 1.0, 41)
FREQ_BINS = np.arange(0.0, 0.4001, 0.0125)  # cycles/mm
BAND = (0.1, 0.2)
MIN_SPECTRUM_VOXELS = 32


@dataclass
class Dataset:
    name: str
    kind: str  # "randomised", "default" or "real"
    data: np.ndarray  # (X, Y, Z, N) float32
    bvals: np.ndarray
    bvecs: np.ndarray
    mask: np.ndarray
    zooms: np.ndarray  # voxel size (mm) per axis


def phantom(seed: int, slab: int, randomize: bool) -> Dataset:
    from qid2_diffusers.data.phantom import make_subject

    s = make_subject(seed, slab=slab, randomize=randomize)
    kind = "randomised" if randomize else "default"
    label = f"phantom {kind} seed {seed} ({s.resolution:.2f} mm, SNR {s.snr:.0f})"
    return Dataset(label, kind, s.dwi, s.bvals, s.bvecs, s.mask, np.full(3, s.resolution))


def real_scans() -> list[Dataset]:
    from qid2_diffusers.data.real import real_cases
    from qid2_diffusers.masking import brain_mask

    scans, seen = [], set()
    for case in real_cases():
        if case.dwi in seen:  # one scan, several shell cases
            continue
        seen.add(case.dwi)
        dwi = case.load()
        data = np.asarray(dwi.data, dtype=np.float32)
        zooms = np.linalg.norm(dwi.affine[:3, :3], axis=0)
        mask = dwi.mask if dwi.mask is not None else brain_mask(data[..., dwi.b0_indices].mean(axis=-1), zooms)
        name = case.name.rsplit("-b", 1)[0] if case.name.startswith("mdt") or "msmt" in case.name else case.name
        scans.append(Dataset(f"real {name}", "real", data, dwi.bvals, dwi.bvecs, np.asarray(mask, bool), zooms))
    return scans


def radial_spectrum(image: np.ndarray, zooms) -> np.ndarray:
    """Power of ``image`` (2D, mean removed) averaged over rings of spatial frequency, summing to 1."""
    power = np.abs(np.fft.fft2(image - image.mean())) ** 2
    fx, fy = (np.fft.fftfreq(n, d=z) for n, z in zip(image.shape, zooms))
    radius = np.hypot(*np.meshgrid(fx, fy, indexing="ij"))
    which = np.digitize(radius.ravel(), FREQ_BINS) - 1
    inside = (which >= 0) & (which < len(FREQ_BINS) - 1)
    total = np.bincount(which[inside], weights=power.ravel()[inside], minlength=len(FREQ_BINS) - 1)
    count = np.bincount(which[inside], minlength=len(FREQ_BINS) - 1)
    mean = np.where(count > 0, total / np.maximum(count, 1), np.nan)
    return mean / np.nansum(mean)


def summarise(ds: Dataset) -> dict:
    """FA histogram, S/S0 per shell and class, spectra of one b0 and one DW slice."""
    from qid2_diffusers.data.io import group_shells
    from qid2_diffusers.tensor import B0_THRESHOLD, fit_tensor

    shells = group_shells(ds.bvals)
    b0_vols = np.flatnonzero(ds.bvals <= B0_THRESHOLD)
    near = min(shells, key=lambda b: abs(b - 1000))
    keep = np.concatenate([b0_vols, shells[near]])
    maps = fit_tensor(ds.data[..., keep], ds.bvals[keep], ds.bvecs[keep], mask=ds.mask)
    b0 = ds.data[..., b0_vols].mean(axis=-1)
    valid = ds.mask & (b0 > 0)
    wm = valid & (maps.fa > WM_FA)
    csf = valid & ~wm & (maps.md > CSF_MD)
    classes = {"WM": wm, "GM": valid & ~wm & ~csf, "CSF": csf}
    ratios = {b: {c: float(np.mean(ds.data[m][:, vols].mean(axis=1) / b0[m])) if m.any() else np.nan
                  for c, m in classes.items()} for b, vols in shells.items()}
    out = {
        "fa": maps.fa[valid],
        "fa_shell": near,
        "ratios": ratios,
        "counts": {c: int(m.sum()) for c, m in classes.items()},
        "spectra": {},
    }
    if min(ds.data.shape[:2]) >= MIN_SPECTRUM_VOXELS:
        z = ds.data.shape[2] // 2
        for label, volume in (("b0", b0_vols[0]), ("dw", shells[near][0])):
            out["spectra"][label] = radial_spectrum(ds.data[:, :, z, volume], ds.zooms[:2])
    return out


def band_share(spectrum) -> float:
    centres = (FREQ_BINS[:-1] + FREQ_BINS[1:]) / 2
    return float(np.nansum(spectrum[(centres > BAND[0]) & (centres < BAND[1])]))


def tables(results) -> str:
    lines = [
        "| dataset | voxel (mm) | shells (s/mm²) | mask voxels | FA from b | FA mean | FA median | FA > 0.4 | "
        f"b0 power {BAND[0]:g}-{BAND[1]:g} c/mm | DW power {BAND[0]:g}-{BAND[1]:g} c/mm |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for ds, r in results:
        spectra = r["spectra"]
        power = [f"{band_share(spectra[k]):.3f}" if k in spectra else "—" for k in ("b0", "dw")]
        lines.append(
            f"| {ds.name} | {'×'.join(f'{z:.2f}' for z in ds.zooms)} | {', '.join(str(b) for b in r['ratios'])} | "
            f"{len(r['fa'])} | {r['fa_shell']} | {r['fa'].mean():.3f} | {np.median(r['fa']):.3f} | "
            f"{np.mean(r['fa'] > WM_FA):.2f} | {power[0]} | {power[1]} |"
        )
    lines += ["", "Mean S/S0 per shell and tissue class (voxels per class in brackets):", "",
              "| dataset | b (s/mm²) | WM | GM | CSF |", "|---|---|---|---|---|"]
    for ds, r in results:
        for b, per_class in r["ratios"].items():
            cells = [f"{per_class[c]:.3f} ({r['counts'][c]})" if r["counts"][c] else "—" for c in ("WM", "GM", "CSF")]
            lines.append(f"| {ds.name} | {b} | {' | '.join(cells)} |")
    return "\n".join(lines) + "\n"


def figure(results, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from qid2_diffusers.data.io import atomic_write

    style = {"randomised": dict(cmap=plt.cm.viridis, ls="-"), "default": dict(cmap=plt.cm.Greys, ls="--"),
             "real": dict(cmap=plt.cm.autumn, ls="-")}
    counts = {k: sum(ds.kind == k for ds, _ in results) for k in style}
    seen = dict.fromkeys(style, 0)
    fig, axes = plt.subplots(2, 3, figsize=(17, 9.5))
    centres = (FREQ_BINS[:-1] + FREQ_BINS[1:]) / 2
    for ds, r in results:
        s = style[ds.kind]
        colour = s["cmap"](0.15 + 0.6 * seen[ds.kind] / max(1, counts[ds.kind] - 1)) if ds.kind != "default" else "0.4"
        seen[ds.kind] += 1
        kw = dict(color=colour, ls=s["ls"], lw=1.8 if ds.kind == "real" else 1.2)
        hist, _ = np.histogram(r["fa"], bins=FA_BINS, density=True)
        axes[0, 0].plot((FA_BINS[:-1] + FA_BINS[1:]) / 2, hist, label=f"{ds.name} (b={r['fa_shell']})", **kw)
        for col, key in ((1, "b0"), (2, "dw")):
            if key in r["spectra"]:
                axes[0, col].semilogy(centres, r["spectra"][key], **kw)
        for col, cls in enumerate(("WM", "GM", "CSF")):
            b = np.array(list(r["ratios"]))
            y = np.array([r["ratios"][k][cls] for k in r["ratios"]])
            axes[1, col].plot(np.r_[0, b], np.r_[1, y], marker="o", **kw)
    axes[0, 0].set(xlabel="FA", ylabel="density", title="(a) FA inside the mask")
    axes[0, 0].legend(fontsize=7)
    for col, key in ((1, "one b0"), (2, "one DW volume (shell nearest b=1000)")):
        axes[0, col].set(xlabel="spatial frequency (cycles/mm)", ylabel="share of power", title=f"(c) power spectrum: {key}")
        axes[0, col].axvspan(*BAND, color="0.9", zorder=0)
    titles = {"WM": f"(b) WM: FA > {WM_FA}", "GM": "(b) GM: the rest", "CSF": f"(b) CSF: MD > {CSF_MD:g} mm²/s"}
    for col, cls in enumerate(titles):
        axes[1, col].set(xlabel="b (s/mm²)", ylabel="mean S/S0", yscale="log", title=titles[cls])
    fig.suptitle("Randomised phantoms (solid, green-blue), the default phantom (grey, dashed) and real scans (red-yellow)")
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=90, format="png"))
    plt.close(fig)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, type=Path, help="folder for realism.png and realism.md")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="randomised phantom seeds")
    parser.add_argument("--slab", type=int, default=8, help="central axial slices per phantom")
    args = parser.parse_args()

    from qid2_diffusers.data.io import atomic_write

    datasets = [phantom(seed, args.slab, True) for seed in args.seeds]
    datasets.append(phantom(args.seeds[0], args.slab, False))
    datasets += real_scans()
    results = [(ds, summarise(ds)) for ds in datasets]
    text = tables(results)
    header = ("# Realism: randomised phantoms against real scans\n\n"
              f"`python benchmarks/realism.py --out {args.out} --seeds {' '.join(map(str, args.seeds))} --slab {args.slab}`"
              " (see the script's docstring for the definitions). Compare only: nothing here tunes the generator.\n\n")
    atomic_write(args.out / "realism.md", lambda tmp: tmp.write_text(header + text))
    figure(results, args.out / "realism.png")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
