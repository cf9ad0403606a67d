"""Domain-randomised brain phantoms: seeded, within their ranges, and physically sensible."""

import dataclasses
import json

import numpy as np
import pytest

from qid2_diffusers.cli import main
from qid2_diffusers.data.phantom import (
    FAMILIES,
    HCP_CENTRE_MM,
    HCP_FOV_MM,
    draw_randomization,
    load_truth,
    make_subject,
    write_subject,
)
from qid2_diffusers.data.phantom.randomize import GIBBS_PROBABILITY, HANN, RANGES

SEED = 3


@pytest.fixture(scope="module")
def subject():
    """A randomised subject on the 2.5 mm grid (two slices, three shells)."""
    return make_subject(SEED, slab=2, randomize=True, resolution=2.5)


@pytest.fixture(scope="module")
def ringing():
    """The same noise-free subject with plain k-space truncation, and through a Hann window."""
    rand = draw_randomization(SEED, resolution=2.5)
    on = make_subject(SEED, slab=2, snr=float("inf"), randomize=dataclasses.replace(rand, gibbs=True, kspace_window=0.0))
    off = make_subject(SEED, slab=2, snr=float("inf"), randomize=dataclasses.replace(rand, gibbs=False, kspace_window=HANN))
    return on, off


def _within(value, name):
    low, high = RANGES[name]
    return low - 1e-12 <= value <= high + 1e-12


def test_draws_are_seeded_and_within_their_ranges():
    draws = [draw_randomization(seed) for seed in range(300)]
    assert draw_randomization(7) == draws[7]
    for r in draws:
        assert _within(r.resolution, "resolution") and _within(r.snr, "snr")
        assert r.shells == (1000.0, 2000.0, 3000.0)
        for name, values in (("d_par", r.d_par), ("d_perp", r.d_perp), ("intra_fraction", r.intra_fraction), ("kappa", r.kappa)):
            assert len(values) == len(FAMILIES) and all(_within(v, name) for v in values), name
        for tissue in ("gm", "csf", "scalp"):
            assert _within(r.diffusivity[tissue], f"{tissue}_diffusivity") and _within(r.s0_relative[tissue], f"{tissue}_s0")
        assert _within(r.bias_scale, "bias_scale")
        assert _within(r.kspace_window, "kspace_window") if r.gibbs else r.kspace_window == HANN
    # The draws cover their ranges, and most subjects ring.
    resolutions = [r.resolution for r in draws]
    assert min(resolutions) < 1.35 and max(resolutions) > 2.4
    snrs = [r.snr for r in draws]
    assert min(snrs) < 12 and max(snrs) > 45
    assert np.mean([r.gibbs for r in draws]) == pytest.approx(GIBBS_PROBABILITY, abs=0.08)
    # Fixing one property leaves the others as drawn.
    fixed = draw_randomization(7, resolution=2.0, snr=30.0, shells=(1000,))
    assert (fixed.resolution, fixed.snr, fixed.shells) == (2.0, 30.0, (1000.0,))
    assert dataclasses.replace(fixed, resolution=draws[7].resolution, snr=draws[7].snr, shells=draws[7].shells) == draws[7]


def test_same_seed_same_subject_other_seed_other_draws(subject):
    again = make_subject(SEED, slab=2, randomize=True, resolution=2.5)
    for name in ("dwi", "signal", "tissue", "peaks", "fa", "mask"):
        np.testing.assert_array_equal(getattr(again, name), getattr(subject, name))
    assert again.params == subject.params
    other = draw_randomization(SEED + 1).to_params()
    mine = subject.params["randomization"]
    for name in ("snr", "d_par", "d_perp", "intra_fraction", "kappa", "bias"):
        assert np.all(np.asarray(other[name]) != np.asarray(mine[name])), name
    # Opt-in: the default phantom of the same seed has no randomisation, and the same brain.
    plain = make_subject(SEED, slab=2)
    assert "randomization" not in plain.params
    np.testing.assert_array_equal(plain.mask, subject.mask)
    np.testing.assert_array_equal(plain.peaks, subject.peaks)


def test_three_shells_of_90_directions_and_the_drawn_properties_in_the_truth(subject, tmp_path):
    assert np.sum(subject.bvals == 0) == 18
    for b in (1000, 2000, 3000):
        dirs = subject.bvecs[subject.bvals == b]
        assert len(dirs) == 90
        np.testing.assert_allclose(np.linalg.norm(dirs, axis=1), 1.0)
    assert subject.dwi.shape == (72, 87, 2, 288)
    truth = load_truth(write_subject(subject, tmp_path, "r"))
    for name in ("signal", "fa", "peaks", "peak_fractions", "n_fibres", "tissue"):
        np.testing.assert_array_equal(truth[name], getattr(subject, name))
    drawn = truth["params"]["randomization"]
    assert drawn == json.loads(json.dumps(draw_randomization(SEED, resolution=2.5).to_params()))
    # The simulated tissue properties are the drawn ones.
    assert [truth["params"]["families"][f]["d_par"] for f in FAMILIES] == drawn["d_par"]
    assert truth["params"]["diffusivity"] == drawn["diffusivity"]
    assert truth["params"]["sigma"] == pytest.approx(truth["params"]["s0_wm"] / drawn["snr"])


def test_voxel_size_and_grid_follow_the_affine_for_a_drawn_voxel_size():
    s = make_subject(4, slab=1, randomize=True, shells=(1000,))
    res = s.params["randomization"]["resolution"]
    assert 1.9 < res < 2.1 and s.resolution == res  # seed 4 draws ~2.0 mm: neither grid of the default phantom
    np.testing.assert_allclose(np.abs(np.diag(s.affine)[:3]), res)
    assert s.dwi.shape[:2] == tuple(int(np.floor(f / res + 1e-6)) for f in HCP_FOV_MM[:2])
    # A head of fixed physical size: the grid's in-plane centre stays HCP's.
    centre = s.affine @ np.r_[(np.array(s.dwi.shape[:3]) - 1) / 2.0, 1.0]
    np.testing.assert_allclose(centre[:2], HCP_CENTRE_MM[:2], atol=1e-9)
    # The brain fills about the same width in millimetres as at 2.5 mm.
    coarse = make_subject(4, slab=1, resolution=2.5)
    width = [m.any(axis=(1, 2)).sum() * r for m, r in ((s.mask, res), (coarse.mask, 2.5))]
    assert width[0] == pytest.approx(width[1], rel=0.05)


def test_signal_decays_with_b_in_white_matter(subject):
    wm = subject.tissue[..., 0] > 0.9
    assert wm.sum() > 300
    s0 = subject.signal[wm][:, subject.bvals == 0].mean(axis=1)
    means = [subject.signal[wm][:, subject.bvals == b].mean(axis=1) / s0 for b in (1000, 2000, 3000)]
    assert np.all(means[0] > means[1]) and np.all(means[1] > means[2])
    assert 0.3 < np.median(means[0]) < 0.8 and np.median(means[2]) > 0.05


def test_gibbs_ringing_oscillates_next_to_sharp_boundaries(ringing):
    on, off = ringing
    np.testing.assert_array_equal(on.tissue, off.tissue)  # the truth does not ring
    b0_on, b0_off = on.signal[..., 0], off.signal[..., 0]
    # Inside the ventricles' CSF plateau the ringing image over- and undershoots the smooth one...
    csf = on.tissue[..., 2] > 0.95
    assert csf.sum() > 50
    ratio = b0_on[csf] / b0_off[csf]
    assert ratio.max() > 1.04 and ratio.min() < 0.96
    # ...and the difference alternates in sign from voxel to voxel (a ~2-voxel ripple).
    diff = b0_on - b0_off
    pairs = on.mask[1:] & on.mask[:-1]
    assert np.mean(np.sign(diff[1:]) != np.sign(diff[:-1]), where=pairs) > 0.4
    curvature = np.abs(b0_on[2:] - 2 * b0_on[1:-1] + b0_on[:-2]) / (np.abs(b0_off[2:] - 2 * b0_off[1:-1] + b0_off[:-2]) + 1e-3)
    assert np.median(curvature[on.mask[1:-1]]) > 1.5


def test_partial_volume_changes_gradually_between_neighbours(subject):
    def largest_step(tissue):
        return max(np.abs(np.diff(tissue, axis=axis)).max() for axis in (0, 1))

    # A voxel-sized step, 0 to 1, sits somewhere in the default phantom...
    assert largest_step(make_subject(SEED, slab=2).tissue) > 0.95
    # ...and nowhere in a randomised one: every boundary spreads over more than two voxels.
    assert largest_step(subject.tissue) < 0.55
    total = subject.tissue.sum(axis=-1)
    assert subject.tissue.min() >= 0 and total.max() <= 1 + 1e-6
    assert np.mean((subject.tissue[..., 0] > 0.05) & (subject.tissue[..., 0] < 0.95), where=subject.mask) > 0.2


def test_cli_randomize_writes_loadable_subjects(tmp_path):
    out = tmp_path / "cohort"
    assert main(["phantom", "--out", str(out), "--randomize", "--slab", "1", "--resolution", "2.5", "--shells", "1000,2000", "--quiet"]) == 0
    truth = load_truth(out / "phantom-000")
    assert truth["signal"].shape == (72, 87, 1, 198)
    assert truth["params"]["randomization"]["resolution"] == 2.5 and truth["params"]["shells"] == [1000, 2000]
    assert 10 <= truth["params"]["snr"] <= 50


def test_bad_options_are_rejected_before_anything_is_drawn():
    from qid2_diffusers.errors import QID2InputError

    for options, message in ((dict(seed=-1), "seed"), (dict(seed=0, shells=(50,)), "shells"),
                             (dict(seed=0, snr=0.0), "snr"), (dict(seed=0, resolution=2.5, slab=73), "slab")):
        with pytest.raises(QID2InputError, match=message):
            make_subject(randomize=True, **options)


def test_watson_dispersion_tables():
    from qid2_diffusers.data.phantom.signal import dispersion_tables

    bvals = np.array([0.0, 1000.0, 3000.0])
    dpar, fin, dperp = np.full(3, 1.8e-3), np.full(3, 0.5), np.full(3, 0.4e-3)
    tables = dispersion_tables(np.array([2.0, 10.0, 1e3]), dpar, fin, dperp, bvals)
    assert tables.shape == (3, 3, 513)
    np.testing.assert_allclose(tables[:, 0], 1.0, rtol=1e-6)  # b0: no attenuation
    # Nearly no dispersion: the straight stick + zeppelin at every angle.
    c = np.linspace(0, 1, 513)
    straight = 0.5 * np.exp(-1.8e-3 * 3000 * c**2) + 0.5 * np.exp(-1.4e-3 * 3000 * c**2 - 0.4e-3 * 3000)
    np.testing.assert_allclose(tables[2, 2], straight, atol=5e-3)
    # More dispersion, less anisotropy: the signal along the fibre rises, across it falls.
    contrast = tables[:, 2, 0] - tables[:, 2, -1]
    assert contrast[0] < contrast[1] < contrast[2]
    assert np.all(np.diff(tables[:, 2], axis=-1) <= 1e-6)  # decays as the gradient turns towards the fibre
