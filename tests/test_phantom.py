"""The phantom is the project's training and benchmark data: check it against its own truth."""

import json

import nibabel as nib
import numpy as np
import pytest
from dipy.core.gradients import gradient_table
from dipy.reconst.dti import TensorModel

from qid2_diffusers.cli import main
from qid2_diffusers.data.io import load_dwi
from qid2_diffusers.data.phantom import (
    MIN_FIBRE_FRACTION,
    hcp_scheme,
    load_truth,
    make_subject,
    phantom_grid,
    subject_seed,
    write_cohort,
    write_subject,
)
from qid2_diffusers.directions import angular_distance, uniform_directions
from qid2_diffusers.errors import QID2InputError

SLAB = 8


@pytest.fixture(scope="module")
def subject():
    return make_subject(0, slab=SLAB)


@pytest.fixture(scope="module")
def small():
    return make_subject(0, slab=2)


@pytest.fixture(scope="module")
def tensor(subject):
    """Tensor fit (dipy's default WLS) of the noise-free signal in the tissue-pure voxels the tests use."""
    wm, gm, csf = np.moveaxis(subject.tissue, -1, 0)
    voxels = ((subject.n_fibres == 1) & (wm > 0.95)) | (gm > 0.9) | (csf > 0.9)
    fit = TensorModel(gradient_table(subject.bvals, bvecs=subject.bvecs)).fit(subject.signal[voxels])
    return voxels, fit


def test_hcp_scheme_single_shell():
    bvals, bvecs = hcp_scheme()
    assert bvals.shape == (108,) and bvecs.shape == (108, 3)
    b0 = np.flatnonzero(bvals == 0)
    np.testing.assert_array_equal(b0, np.arange(0, 108, 6))  # interleaved like HCP
    np.testing.assert_array_equal(bvecs[b0], 0.0)
    assert set(bvals[bvals > 0]) == {1000.0}
    np.testing.assert_allclose(bvecs[bvals > 0], uniform_directions(90, seed=0))


def test_hcp_scheme_multi_shell_directions_differ_per_shell():
    bvals, bvecs = hcp_scheme((1000, 2000, 3000))
    assert len(bvals) == 18 + 270 and np.sum(bvals == 0) == 18
    shells = [bvecs[bvals == b] for b in (1000, 2000, 3000)]
    for dirs in shells:
        assert len(dirs) == 90
        np.testing.assert_allclose(np.linalg.norm(dirs, axis=1), 1.0)
        # Each shell is a rotated copy of the uniform set: same nearest-neighbour spacing.
        d = angular_distance(dirs, dirs) + np.eye(90) * 9
        ref = angular_distance(shells[0], shells[0]) + np.eye(90) * 9
        np.testing.assert_allclose(np.sort(d.min(axis=1)), np.sort(ref.min(axis=1)), atol=1e-9)
    assert angular_distance(shells[0], shells[1]).min(axis=1).mean() > np.radians(2)
    # Shells are interleaved, not stacked.
    assert list(bvals[1:4]) == [1000, 2000, 3000]


def test_grid_matches_hcp():
    shape, affine = phantom_grid(1.25)
    assert shape == (145, 174, 145)
    np.testing.assert_allclose(affine, [[-1.25, 0, 0, 90], [0, 1.25, 0, -126], [0, 0, 1.25, -72], [0, 0, 0, 1]])
    shape, affine = phantom_grid(2.5)
    assert shape == (72, 87, 72)
    assert np.linalg.det(affine[:3, :3]) < 0  # FSL bvecs are then voxel-frame vectors


def test_subject_shapes_and_truth_consistency(subject):
    X, Y, Z, N = subject.dwi.shape
    assert (X, Y, Z, N) == (72, 87, SLAB, 108)
    assert subject.dwi.dtype == subject.signal.dtype == np.float32
    assert subject.signal.shape == subject.dwi.shape
    assert subject.peaks.shape == (X, Y, Z, 3, 3) and subject.peak_fractions.shape == (X, Y, Z, 3)
    assert subject.tissue.shape == (X, Y, Z, 3) and subject.mask.dtype == bool
    # The slab's affine places it at the grid's central slices.
    full_affine = phantom_grid(2.5)[1]
    np.testing.assert_allclose(subject.affine[:3, 3], full_affine[:3, 3] + full_affine[:3, 2] * (72 - SLAB) // 2)

    present = subject.peak_fractions > 0
    np.testing.assert_array_equal(present.sum(axis=-1), subject.n_fibres)
    norms = np.linalg.norm(subject.peaks, axis=-1)
    np.testing.assert_allclose(norms[present], 1.0, atol=1e-5)
    np.testing.assert_array_equal(norms[~present], 0.0)
    has = subject.n_fibres > 0
    np.testing.assert_allclose(subject.peak_fractions.sum(axis=-1)[has], 1.0, atol=1e-5)
    assert subject.peak_fractions[present].min() >= MIN_FIBRE_FRACTION - 1e-6
    # Fractions are sorted, largest first.
    assert np.all(np.diff(subject.peak_fractions, axis=-1) <= 1e-6)
    # Fibres live exactly where there is white matter.
    np.testing.assert_array_equal(has, subject.tissue[..., 0] > 0)
    total = subject.tissue.sum(axis=-1)
    assert total.max() <= 1 + 1e-6 and subject.tissue.min() >= 0
    assert np.all(total[subject.mask] > 0.5)
    # Partial volume at boundaries, not a binary segmentation.
    wm = subject.tissue[..., 0]
    assert np.mean((wm > 0.05) & (wm < 0.95)) > 0.01


def test_tissue_contrast_like_a_t2_weighted_b0(subject):
    b0 = subject.signal[..., subject.bvals == 0].mean(axis=-1)
    dw = subject.signal[..., subject.bvals > 0].mean(axis=-1)
    pure = [subject.tissue[..., t] > 0.95 for t in range(3)]
    s0 = [np.median(b0[p]) for p in pure]
    assert s0[0] < s0[1] < s0[2]  # WM < GM < CSF on b0
    assert s0[2] > 2 * s0[0]
    att = [np.median(dw[p] / b0[p]) for p in pure]
    assert att[2] < np.exp(-1000 * 2.5e-3)  # free water, ADC ~3e-3 mm²/s
    assert np.exp(-1000 * 1.0e-3) < att[1] < np.exp(-1000 * 0.6e-3)  # grey matter, ~0.8e-3
    assert np.exp(-1000 * 1.0e-3) < att[0] < np.exp(-1000 * 0.5e-3)  # white matter mean diffusivity


def test_tensor_fa_high_in_single_fibre_white_matter_low_in_grey_matter_and_csf(subject, tensor):
    voxels, fit = tensor
    fa = np.zeros(subject.mask.shape)
    fa[voxels] = fit.fa
    wm, gm, csf = np.moveaxis(subject.tissue, -1, 0)
    single = (subject.n_fibres == 1) & (wm > 0.95)
    assert single.sum() > 1000
    assert fa[single].min() > 0.5
    assert fa[gm > 0.9].max() < 0.15
    assert fa[csf > 0.9].max() < 0.15
    # The stored FA is the same quantity (an OLS fit), within fitting differences.
    assert np.median(np.abs(subject.fa[voxels] - fa[voxels])) < 0.02


def test_principal_direction_follows_the_true_fibre(subject, tensor):
    voxels, fit = tensor
    single = ((subject.n_fibres == 1) & (subject.tissue[..., 0] > 0.95))[voxels]
    truth = subject.peaks[voxels][single, 0]
    angle = np.degrees([angular_distance(a, b) for a, b in zip(fit.evecs[single, :, 0], truth)])
    assert np.median(angle) < 10.0
    assert np.percentile(angle, 90) < 15.0


def test_two_and_three_way_crossings_are_present_and_real(subject):
    wm = subject.tissue[..., 0] > 0.5
    counts = np.bincount(subject.n_fibres[wm], minlength=4)
    assert counts[1] > 1000 and counts[2] > 500 and counts[3] > 50
    two = (subject.n_fibres == 2) & wm
    angles = np.degrees(np.arccos(np.clip(np.abs(np.sum(subject.peaks[two][:, 0] * subject.peaks[two][:, 1], axis=-1)), 0, 1)))
    assert np.median(angles) > 45.0


def test_deterministic_per_seed_and_slab_is_a_subset():
    a = make_subject(5, slab=4)
    b = make_subject(5, slab=4)
    for name in ("dwi", "signal", "peaks", "peak_fractions", "tissue", "fa", "mask"):
        np.testing.assert_array_equal(getattr(a, name), getattr(b, name))
    wide = make_subject(5, slab=6)
    np.testing.assert_array_equal(wide.dwi[:, :, 1:5], a.dwi)
    np.testing.assert_array_equal(wide.peaks[:, :, 1:5], a.peaks)
    other = make_subject(6, slab=4)
    assert np.mean(np.abs(other.tissue - a.tissue) > 0.1) > 0.02
    assert a.params["s0_wm"] != other.params["s0_wm"]


def test_rician_noise_at_the_requested_snr():
    snr = 20.0
    s = make_subject(1, slab=4, snr=snr)
    assert s.sigma == pytest.approx(s.params["s0_wm"] / snr)
    b0 = s.bvals == 0
    wm = s.tissue[..., 0] > 0.95
    residual = (s.dwi - s.signal)[wm][:, b0]
    # High-SNR Rician noise is close to Gaussian of the same sigma.
    assert np.std(residual) == pytest.approx(s.sigma, rel=0.05)
    wm_b0 = s.signal[wm][:, b0].mean()
    assert wm_b0 / s.sigma == pytest.approx(snr, rel=0.15)  # the bias field moves the WM b0 a little
    # Background is Rayleigh: mean sigma * sqrt(pi / 2).
    background = s.dwi[s.signal[..., 0] == 0]
    assert background.mean() == pytest.approx(s.sigma * np.sqrt(np.pi / 2), rel=0.02)
    noise_free = make_subject(1, slab=4, snr=float("inf"))
    np.testing.assert_array_equal(noise_free.dwi, noise_free.signal)
    np.testing.assert_array_equal(noise_free.signal, s.signal)


def test_write_subject_round_trip(small, tmp_path):
    subject = small
    folder = write_subject(subject, tmp_path, "phantom-007")
    diffusion = folder / "T1w" / "Diffusion"
    img = nib.load(diffusion / "data.nii.gz")
    np.testing.assert_array_equal(np.asanyarray(img.dataobj), subject.dwi)
    np.testing.assert_allclose(img.affine, subject.affine)
    bvals = np.loadtxt(diffusion / "bvals")
    bvecs = np.loadtxt(diffusion / "bvecs")
    assert bvals.shape == (108,) and bvecs.shape == (3, 108)
    np.testing.assert_allclose(bvals, subject.bvals)
    np.testing.assert_allclose(bvecs.T, subject.bvecs, atol=1e-9)
    # The package's own reader accepts it as an HCP subject.
    dwi = load_dwi(diffusion / "data.nii.gz", diffusion / "bvals", diffusion / "bvecs", diffusion / "nodif_brain_mask.nii.gz")
    np.testing.assert_array_equal(dwi.mask, subject.mask)
    np.testing.assert_allclose(dwi.bvecs, subject.bvecs, atol=1e-9)

    truth = load_truth(folder)
    for name in ("signal", "fa", "peaks", "peak_fractions", "n_fibres", "tissue", "mask"):
        np.testing.assert_array_equal(truth[name], getattr(subject, name))
    assert truth["params"]["seed"] == 0 and truth["params"]["sigma"] == pytest.approx(subject.sigma)
    assert nib.load(folder / "truth" / "peaks.nii.gz").shape == (72, 87, 2, 9)
    assert "signal" not in load_truth(folder, signal=False)
    # No temporary files or folders are left behind, and rewriting replaces the subject.
    write_subject(subject, tmp_path, "phantom-007")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["phantom-007"]
    assert not [p for p in folder.rglob("*") if p.name.startswith(".")]


def test_load_truth_reports_missing_files(small, tmp_path):
    folder = write_subject(small, tmp_path, "s")
    (folder / "truth" / "fa.nii.gz").unlink()
    with pytest.raises(QID2InputError, match=r"fa\.nii\.gz: file not found"):
        load_truth(folder)


def test_cohort_seeds_are_derived_per_subject(tmp_path):
    paths = write_cohort(tmp_path, 2, 3, slab=1, progress=False)
    assert [p.name for p in paths] == ["phantom-000", "phantom-001"]
    seeds = [json.loads((p / "truth" / "phantom.json").read_text())["seed"] for p in paths]
    assert seeds == [subject_seed(3, 0), subject_seed(3, 1)] and seeds[0] != seeds[1]
    again = make_subject(subject_seed(3, 1), slab=1)
    np.testing.assert_array_equal(np.asanyarray(nib.load(paths[1] / "T1w" / "Diffusion" / "data.nii.gz").dataobj), again.dwi)


def test_cli_writes_the_hcp_layout(tmp_path):
    out = tmp_path / "cohort"
    assert main(["phantom", "--out", str(out), "--subjects", "1", "--seed", "2", "--slab", "1", "--shells", "1000,3000", "--snr", "30", "--quiet"]) == 0
    diffusion = out / "phantom-000" / "T1w" / "Diffusion"
    for name in ("data.nii.gz", "bvals", "bvecs", "nodif_brain_mask.nii.gz"):
        assert (diffusion / name).is_file()
    assert nib.load(diffusion / "data.nii.gz").shape == (72, 87, 1, 198)
    assert set(np.loadtxt(diffusion / "bvals")) == {0, 1000, 3000}
    truth = load_truth(out / "phantom-000", signal=False)
    assert truth["params"]["snr"] == 30 and truth["params"]["shells"] == [1000, 3000]


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--subjects", "0"], "--subjects: must be at least 1"),
        (["--seed", "x"], "--seed: 'x' is not an integer"),
        (["--resolution", "0"], "--resolution: must be between"),
        (["--snr", "-3"], "--snr: must be positive"),
        (["--shells", "1000,abc"], "--shells: 'abc' is not a number"),
        (["--shells", "1000,1000"], "--shells: repeated b-value"),
        (["--slab", "73"], "--slab: the 2.5 mm grid has only 72 axial slices"),
    ],
)
def test_cli_rejects_bad_values_in_one_line(tmp_path, capsys, flags, message):
    assert main(["phantom", "--out", str(tmp_path / "c"), "--quiet", *flags]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err
    assert not (tmp_path / "c").exists()


def test_library_rejects_bad_options():
    with pytest.raises(QID2InputError, match="seed"):
        make_subject(-1, slab=1)
    with pytest.raises(QID2InputError, match="slab"):
        make_subject(0, slab=0)
    with pytest.raises(QID2InputError, match="shells"):
        make_subject(0, slab=1, shells=())


def test_parallel_cohort_equals_serial(tmp_path):
    serial = write_cohort(tmp_path / "serial", 2, 5, slab=1, progress=False)
    parallel = write_cohort(tmp_path / "parallel", 2, 5, slab=1, progress=False, jobs=2)
    assert [p.name for p in parallel] == [p.name for p in serial]
    for a, b in zip(serial, parallel):
        np.testing.assert_array_equal(
            np.asanyarray(nib.load(a / "T1w" / "Diffusion" / "data.nii.gz").dataobj),
            np.asanyarray(nib.load(b / "T1w" / "Diffusion" / "data.nii.gz").dataobj),
        )
