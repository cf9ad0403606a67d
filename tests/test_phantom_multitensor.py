"""The multi-tensor slab: an independent simulator whose truth a tensor fit recovers."""

import ast
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage

from qid2_diffusers.cli import main
from qid2_diffusers.data.phantom import load_truth, make_multitensor_subject
from qid2_diffusers.data.phantom import multitensor as multitensor_module
from qid2_diffusers.tensor import fit_tensor


@pytest.fixture(scope="module")
def noise_free():
    return make_multitensor_subject(1, snr=float("inf"), slab=6)


def test_tensor_fit_recovers_the_true_fa_in_single_fibre_voxels(noise_free):
    s = noise_free
    # One bundle only, in the voxel and all its neighbours: no hidden minor population.
    single = ndimage.binary_erosion((s.n_fibres == 1) & (s.tissue[..., 0] > 0.999), np.ones((3, 3, 1)))
    assert single.sum() > 200
    fit = fit_tensor(s.signal, s.bvals, s.bvecs, mask=single)
    np.testing.assert_allclose(fit.fa[single], s.fa[single], atol=1e-4)
    assert s.fa[single].min() > 0.5
    angle = np.degrees(np.arccos(np.clip(np.abs(np.sum(fit.evecs[single][:, :, 0] * s.peaks[single][:, 0], axis=-1)), 0, 1)))
    assert angle.max() < 0.1
    # Isotropic tissue: FA 0.
    iso = (s.tissue[..., 1] > 0.999) | (s.tissue[..., 2] > 0.999)
    assert s.fa[iso & s.mask].max() < 1e-6


def test_crossings_and_truth_consistency(noise_free):
    s = noise_free
    counts = np.bincount(s.n_fibres[s.mask].ravel(), minlength=4)
    assert counts[1] > 500 and counts[2] > 100 and counts[3] > 20
    present = s.peak_fractions > 0
    np.testing.assert_array_equal(present.sum(axis=-1), s.n_fibres)
    np.testing.assert_allclose(np.linalg.norm(s.peaks, axis=-1)[present], 1.0, atol=1e-5)
    np.testing.assert_allclose(s.peak_fractions.sum(axis=-1)[s.n_fibres > 0], 1.0, atol=1e-5)
    total = s.tissue.sum(axis=-1)
    assert total.max() <= 1 + 1e-6
    np.testing.assert_allclose(total[ndimage.binary_erosion(s.mask, np.ones((3, 3, 1)))], 1.0, atol=1e-6)
    assert total[~s.mask].max() < 0.5  # partial volume at the brain's edge only
    # b-values decay: CSF darkest at b = 1000, on b0 the brightest.
    csf = s.tissue[..., 2] > 0.999
    b0, dw = s.signal[..., s.bvals == 0].mean(-1), s.signal[..., s.bvals > 0].mean(-1)
    assert np.median(b0[csf]) > np.median(b0[s.tissue[..., 0] > 0.999])
    assert np.median(dw[csf] / b0[csf]) < np.exp(-1000 * 2.5e-3)


def test_seeded_slab_is_a_subset_and_noise_is_rician():
    a = make_multitensor_subject(2, slab=2, snr=20.0)
    b = make_multitensor_subject(2, slab=2, snr=20.0)
    np.testing.assert_array_equal(a.dwi, b.dwi)
    wide = make_multitensor_subject(2, slab=4, snr=float("inf"))
    np.testing.assert_array_equal(wide.signal[:, :, 1:3], a.signal)
    np.testing.assert_array_equal(wide.peaks[:, :, 1:3], a.peaks)
    assert make_multitensor_subject(3, slab=2).params["layout"] != a.params["layout"]
    background = a.dwi[~a.mask & (a.signal[..., 0] == 0)]
    assert background.mean() == pytest.approx(a.sigma * np.sqrt(np.pi / 2), rel=0.03)
    wm = a.tissue[..., 0] > 0.999
    assert np.std((a.dwi - a.signal)[wm][:, a.bvals == 0]) == pytest.approx(a.sigma, rel=0.1)


def test_shares_no_code_with_the_brain_phantom_signal_model():
    tree = ast.parse(Path(multitensor_module.__file__).read_text())
    relative = {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.level == 1}
    assert relative <= {"scheme", "subject"}  # the acquisition and the record, not anatomy/geometry/signal
    dipy = {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("dipy.sims")}
    assert dipy == {"dipy.sims.voxel"}


def test_cli_writes_a_loadable_multitensor_subject(tmp_path, capsys):
    out = tmp_path / "mt"
    assert main(["phantom", "--out", str(out), "--simulator", "multitensor", "--slab", "2", "--shells", "1000,2000", "--quiet"]) == 0
    truth = load_truth(out / "phantom-000")
    assert truth["signal"].shape == (64, 64, 2, 198) and truth["params"]["simulator"] == "multitensor"
    assert nib.load(out / "phantom-000" / "T1w" / "Diffusion" / "data.nii.gz").shape == (64, 64, 2, 198)
    assert truth["mask"].sum() > 2000 and (truth["n_fibres"] == 3).any()
    capsys.readouterr()
    for flags, message in ((["--randomize"], "--randomize: applies to the brain phantom"), (["--slab", "17"], "--slab: the 2.5 mm grid has only 16")):
        assert main(["phantom", "--out", str(tmp_path / "bad"), "--simulator", "multitensor", "--quiet", *flags]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and message in err
    assert main(["phantom", "--out", str(tmp_path / "bad"), "--simulator", "tensor", "--quiet"]) == 2
    assert "--simulator: expected one of brain, multitensor" in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()
