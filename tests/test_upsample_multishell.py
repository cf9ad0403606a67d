"""Multi-shell series: ``qid2 upsample`` completes every shell (or those given with ``--shell``), each from its own."""

import nibabel as nib
import numpy as np
import pytest

from qid2_diffusers.cli import main
from qid2_diffusers.data.io import group_shells
from qid2_diffusers.directions import angular_distance
from qid2_diffusers.inference import choose_targets

STEPS = ["--steps", "2", "--scheduler", "ddim", "--n-targets", "12"]
N_IN = 102


@pytest.fixture(scope="module")
def msmt(real_data_dir):
    """The real MRtrix3 crop: 6 b0 stored as 0.5, 16 x b=700, 30 x b=1200, 50 x b=2800, interleaved."""
    return {k: str(real_data_dir / f"msmt.{k}") for k in ("nii.gz", "bval", "bvec")}


def upsample(msmt, out, model, *extra):
    return main(["upsample", "--dwi", msmt["nii.gz"], "--out", str(out), "--model", str(model), *STEPS, *extra])


def read(prefix):
    return (np.asarray(nib.load(f"{prefix}.nii.gz").dataobj), np.loadtxt(f"{prefix}.bval"),
            np.loadtxt(f"{prefix}.bvec").T)


@pytest.fixture(scope="module")
def every_shell(msmt, tmp_path_factory, tiny_prior_model_dir):
    out = tmp_path_factory.mktemp("msmt") / "up"
    assert upsample(msmt, out, tiny_prior_model_dir) == 0
    return read(out)


def test_every_shell_is_completed_from_its_own_directions(msmt, every_shell, capsys):
    data, bvals, bvecs = every_shell
    src_bvals, src_bvecs = np.loadtxt(msmt["bval"]), np.loadtxt(msmt["bvec"]).T
    src = np.asarray(nib.load(msmt["nii.gz"]).dataobj)
    # The input volumes, in file order, MP-PCA-denoised (the default; b0s and the three shells together):
    # close to the acquisition, not equal to it.
    assert not np.array_equal(data[..., :N_IN], src)
    assert np.abs(data[..., :N_IN] - src).mean() < 0.1 * np.abs(src).mean()
    np.testing.assert_allclose(bvals[:N_IN], src_bvals, rtol=1e-9)  # b0 stored as 0.5 stays 0.5
    dw = src_bvals > 50
    np.testing.assert_allclose(bvecs[:N_IN][dw], src_bvecs[dw], atol=1e-6)
    np.testing.assert_array_equal(bvecs[:N_IN][~dw], 0.0)  # a b0 has no direction

    new_b, new_v = bvals[N_IN:], bvecs[N_IN:]
    assert list(new_b) == sorted(new_b)  # by increasing b
    start = 0
    for b, members in group_shells(src_bvals).items():
        expected = choose_targets(src_bvecs[members], n_targets=12)  # the complement within each shell
        assert 0 < len(expected) <= 12
        np.testing.assert_array_equal(new_b[start : start + len(expected)], b)
        assert np.degrees(np.diag(angular_distance(new_v[start : start + len(expected)], expected))).max() < 1e-4
        start += len(expected)
    assert start == len(new_b) == data.shape[3] - N_IN
    assert set(group_shells(bvals)) == {700, 1200, 2800}
    synthesised = data[..., N_IN:]
    assert np.all(np.isfinite(synthesised)) and np.all(np.abs(synthesised).max(axis=(0, 1, 2)) > 0)


def test_one_shell_with_shell_gives_that_shells_volumes(msmt, every_shell, tmp_path, tiny_prior_model_dir, capsys):
    capsys.readouterr()
    assert upsample(msmt, tmp_path / "up", tiny_prior_model_dir, "--shell", "1200") == 0
    captured = capsys.readouterr()
    assert "qid2 upsample:" not in captured.err  # a b-conditioned model is at home on 700-2800
    data, bvals, bvecs = read(tmp_path / "up")
    all_data, all_bvals, all_bvecs = every_shell
    at_1200 = np.flatnonzero(all_bvals[N_IN:] == 1200) + N_IN
    assert data.shape[3] == N_IN + len(at_1200) and np.all(bvals[N_IN:] == 1200)
    np.testing.assert_array_equal(data[..., :N_IN], all_data[..., :N_IN])
    np.testing.assert_allclose(bvecs[N_IN:], all_bvecs[at_1200], atol=1e-9)
    # Each shell draws its own noise, so one shell alone equals its part of the whole run.
    np.testing.assert_allclose(data[..., N_IN:], all_data[..., at_1200], rtol=1e-5, atol=1e-3)


@pytest.mark.slow  # ~30 s: three shells denoised and up-sampled again
def test_a_model_trained_at_one_b_warns_once_per_other_shell(msmt, tmp_path, tiny_model_dir, capsys):
    assert upsample(msmt, tmp_path / "up", tiny_model_dir, "--shell", "700", "--shell", "2800") == 0
    captured = capsys.readouterr()
    warnings = [line for line in captured.err.splitlines() if line.startswith("qid2 upsample:")]
    assert warnings == [f"qid2 upsample: warning: the model was trained at b=1000; up-sampling the b={b} shell is "
                        "outside its training data" for b in (700, 2800)]
    assert "(b=700: " in captured.out and "b=2800: " in captured.out
    assert set(np.loadtxt(tmp_path / "up.bval")[N_IN:]) == {700.0, 2800.0}
