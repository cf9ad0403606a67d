"""Domain randomisation of the brain phantom: what a scanner, a protocol and a brain may vary.

A model trained on one simulator's settings learns those settings. With
``make_subject(seed, randomize=True)`` each subject draws, from
``default_rng([seed, 2])`` (the anatomy keeps its own stream, so a seed keeps
its brain), the properties in :data:`RANGES`:

- white-matter microstructure (per subject, varied a little per fibre
  family): parallel and extra-axonal perpendicular diffusivities,
  intra-axonal fraction, and orientation dispersion (a Watson distribution
  around each population's direction);
- grey-matter, CSF and scalp diffusivities, and T2-like S0 contrast per tissue;
- the receive-coil bias field (its strength, then its shape);
- voxel size (the grid shrinks or grows over a head of fixed size), SNR;
- the point-spread function. The noise-free series is simulated on a grid
  twice as fine in-plane and each slice's spectrum cut to the target's
  matrix, as a 2D acquisition truncates k-space, before noise is added:
  partial volume is then what a scanner's point-spread function makes of
  sharp boundaries, not a voxel-sized step. Most subjects keep the Gibbs
  ringing of the truncation (a Tukey taper of 0-0.5 of the kept k-space
  softens it); the others are seen through a Hann window, as after a
  ringing filter. The truth's tissue fractions are the fine grid's through
  the Hann window (smooth, summing to at most 1); fibre truth and mask are
  those of the target grid.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import scipy.fft

from .anatomy import BIAS_SD, FAMILIES, Anatomy, anatomy_params
from .geometry import geometry
from .scheme import n_threads
from .signal import simulate

__all__ = ["RANGES", "GIBBS_PROBABILITY", "HANN", "RANDOMIZED_SHELLS", "PhantomRandomization", "draw_randomization",
           "randomize_anatomy", "acquire"]

#: Range of each drawn property (uniform; ``snr`` and ``kappa`` log-uniform;
#: the white-matter ones drawn once per subject, then varied by a few to 30 %
#: per fibre family within the range). Diffusivities in mm²/s, S0s relative
#: to white matter's.
RANGES = {
    "resolution": (1.25, 2.5),
    "snr": (10.0, 50.0),
    "d_par": (1.4e-3, 2.0e-3),
    "d_perp": (0.2e-3, 0.6e-3),
    "intra_fraction": (0.35, 0.7),
    "kappa": (2.0, 25.0),
    "gm_diffusivity": (0.65e-3, 1.0e-3),
    "csf_diffusivity": (2.6e-3, 3.2e-3),
    "scalp_diffusivity": (0.8e-3, 1.6e-3),
    "gm_s0": (1.1, 1.5),
    "csf_s0": (1.8, 4.0),
    "scalp_s0": (0.3, 1.0),
    "bias_scale": (0.5, 3.0),
    "kspace_window": (0.0, 0.5),
}
#: Share of subjects with Gibbs ringing; the others get :data:`HANN` as their window.
GIBBS_PROBABILITY = 0.7
#: The Tukey taper that is a Hann window: k-space apodised all the way, no visible ringing.
HANN = 1.0
#: Shells of a randomised subject unless given: HCP's.
RANDOMIZED_SHELLS = (1000.0, 2000.0, 3000.0)
# The fine grid of the ringing simulation is processed in slabs of about this
# many bytes of complex spectrum.
_SPECTRUM_BYTES = 256 * 2**20


@dataclass(frozen=True)
class PhantomRandomization:
    """The drawn properties of one randomised subject (see :data:`RANGES`).

    Args:
        resolution (`float`): isotropic voxel size (mm).
        snr (`float`): white-matter b0 SNR.
        shells (`tuple` of `float`): b-values (s/mm²).
        d_par, d_perp, intra_fraction, kappa (`tuple` of `float`): per entry of
            :data:`~.anatomy.FAMILIES`, the parallel and extra-axonal
            perpendicular diffusivities, the intra-axonal fraction and the
            Watson concentration of the orientation dispersion.
        diffusivity (`dict`), s0_relative (`dict`): ``gm``, ``csf`` and ``scalp`` values.
        bias_scale (`float`): strength of the bias field relative to the default phantom's.
        bias (`tuple` of `float`): the bias field's coefficients (:data:`~.anatomy.BIAS_SD`).
        gibbs (`bool`): keep the ringing of k-space truncation.
        kspace_window (`float`): Tukey taper of the kept k-space (0: plain
            truncation; :data:`HANN` where ``gibbs`` is off).
    """

    resolution: float
    snr: float
    shells: tuple
    d_par: tuple
    d_perp: tuple
    intra_fraction: tuple
    kappa: tuple
    diffusivity: dict
    s0_relative: dict
    bias_scale: float
    bias: tuple
    gibbs: bool
    kspace_window: float

    def to_params(self) -> dict:
        """JSON-ready copy (lists for tuples)."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}


def draw_randomization(seed: int, *, resolution=None, snr=None, shells=None) -> PhantomRandomization:
    """Draw a subject's randomised properties from ``default_rng([seed, 2])``.

    Every property is drawn, in a fixed order, whether or not it is given, so
    fixing one (``resolution``, ``snr`` or ``shells``) leaves the others as they were.
    """
    rng = np.random.default_rng([int(seed), 2])
    n = len(FAMILIES)

    def uniform(name, size=None):
        return rng.uniform(*RANGES[name], size=size)

    def log_uniform(name, size=None):
        return np.exp(rng.uniform(*np.log(RANGES[name]), size=size))

    def per_family(name, centre, spread):
        # One value per subject, varied a little per family: white matter whose
        # properties jump at every family boundary would be a texture of its own.
        return np.clip(centre * np.exp(rng.normal(0.0, spread, size=n)), *RANGES[name])

    drawn_resolution, drawn_snr = uniform("resolution"), log_uniform("snr")
    d_par = per_family("d_par", uniform("d_par"), 0.05)
    d_perp = per_family("d_perp", uniform("d_perp"), 0.1)
    fin = per_family("intra_fraction", uniform("intra_fraction"), 0.1)
    kappa = per_family("kappa", log_uniform("kappa"), 0.3)
    diffusivity = {t: uniform(f"{t}_diffusivity") for t in ("gm", "csf", "scalp")}
    s0 = {t: uniform(f"{t}_s0") for t in ("gm", "csf", "scalp")}
    bias_scale = uniform("bias_scale")
    bias = rng.normal(0.0, bias_scale * np.asarray(BIAS_SD))
    gibbs = bool(rng.random() < GIBBS_PROBABILITY)
    window = uniform("kspace_window") if gibbs else HANN
    return PhantomRandomization(
        resolution=float(drawn_resolution if resolution is None else resolution),
        snr=float(drawn_snr if snr is None else snr),
        shells=tuple(float(b) for b in (RANDOMIZED_SHELLS if shells is None else shells)),
        d_par=tuple(d_par.tolist()), d_perp=tuple(d_perp.tolist()), intra_fraction=tuple(fin.tolist()),
        kappa=tuple(kappa.tolist()),
        diffusivity={k: float(v) for k, v in diffusivity.items()}, s0_relative={k: float(v) for k, v in s0.items()},
        bias_scale=float(bias_scale), bias=tuple(bias.tolist()), gibbs=gibbs,
        kspace_window=float(window),
    )


def randomize_anatomy(anat: Anatomy, rand: PhantomRandomization) -> None:
    """Give ``anat`` the drawn tissue properties (its shapes and fibre paths stay)."""
    anat.dpar = np.asarray(rand.d_par)
    anat.dperp = np.asarray(rand.d_perp)
    anat.fin = np.asarray(rand.intra_fraction)
    anat.diffusivity = dict(rand.diffusivity)
    anat.s0 = dict(rand.s0_relative)
    anat.bias = np.asarray(rand.bias)
    anat.params = anatomy_params(anat)


def _tukey(n: int, alpha: float) -> np.ndarray:
    """Tukey taper of the ``n`` frequencies an ``n``-point transform keeps, in FFT order."""
    r = np.abs(np.fft.fftfreq(n, 1.0 / n)) / (n / 2)
    if alpha <= 0:
        return np.ones(n)
    return np.where(r <= 1 - alpha, 1.0, 0.5 * (1 + np.cos(np.pi * np.clip(r - 1 + alpha, 0, alpha) / alpha)))


def _truncate_kspace(fine, shape, alpha):
    """Magnitude image of each fine slice's spectrum cut to the ``shape`` (X, Y) matrix and tapered.

    The object is real, so the half spectrum of ``rfft2`` holds it all; the
    kept frequencies are picked by index (no shifts of the large array).
    """
    workers = n_threads()
    nx, ny = shape
    spectrum = scipy.fft.rfft2(fine, axes=(0, 1), workers=workers)
    rows = np.fft.fftfreq(nx, 1.0 / nx).astype(np.intp) % fine.shape[0]
    kept = spectrum[rows, : ny // 2 + 1]
    window = np.outer(_tukey(nx, alpha), _tukey(ny, alpha)[: ny // 2 + 1]).astype(np.float32)
    kept *= window.reshape(window.shape + (1,) * (fine.ndim - 2))
    image = scipy.fft.irfft2(kept, s=(nx, ny), axes=(0, 1), workers=workers)
    return np.abs(image * np.float32(nx * ny / (fine.shape[0] * fine.shape[1]))).astype(np.float32)


def acquire(anat, shape, affine, rand: PhantomRandomization, bvals, bvecs, dispersion):
    """The noise-free series a 2D acquisition of the grid sees, and the tissue fractions of its smooth PSF.

    Simulated on a grid twice as fine in-plane (boundaries sharp at the target
    scale) in slabs of axial slices; each slice's spectrum is cut to the
    target's matrix, tapered by the subject's window and transformed back, so
    sharp edges ring as they do in a scanner's image. The fine tissue fractions
    go through the same cut with a Hann window. Target voxel ``i`` sits at fine
    voxel ``2 i``, where the discrete Fourier transform samples it.

    Returns:
        `(signal, tissue)`: float32 arrays of shape ``shape + (N,)`` and ``shape + (3,)``.
    """
    nx, ny, nz = shape
    fine_shape = (2 * nx, 2 * ny)
    fine_affine = affine.copy()
    fine_affine[:3, :2] /= 2
    n = len(bvals)
    per_slab = max(1, _SPECTRUM_BYTES // (fine_shape[0] * fine_shape[1] * n * 8))
    signal = np.empty(shape + (n,), dtype=np.float32)
    tissue = np.empty(shape + (3,), dtype=np.float32)
    for k0 in range(0, nz, per_slab):
        slab = fine_shape + (min(per_slab, nz - k0),)
        slab_affine = fine_affine.copy()
        slab_affine[:3, 3] += affine[:3, 2] * k0
        geo = geometry(anat, slab, slab_affine, rand.resolution / 2)
        fine = simulate(anat, geo, slab, bvals, bvecs, dispersion=dispersion)
        signal[:, :, k0 : k0 + slab[2]] = _truncate_kspace(fine, (nx, ny), rand.kspace_window)
        # The Hann window's faint side lobes may overshoot by a few per cent: keep fractions fractions.
        fractions = np.clip(_truncate_kspace(geo.to_grid(geo.tissue), (nx, ny), HANN), 0.0, 1.0)
        tissue[:, :, k0 : k0 + slab[2]] = fractions / np.maximum(fractions.sum(axis=-1, keepdims=True), 1.0)
    return signal, tissue
