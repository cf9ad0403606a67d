"""Messy inputs through ``qid2 upsample``: each gets one line on stderr and an exit code, and nothing is lost."""

import nibabel as nib
import numpy as np
import pytest

from qid2_diffusers.baselines import DTIUpsampler, InterpUpsampler
from qid2_diffusers.cli import main
from qid2_diffusers.data.io import load_dwi
from qid2_diffusers.directions import uniform_directions
from qid2_diffusers.errors import QID2InputError
from qid2_diffusers.pipelines import QID2Upsampler

STEPS = ["--steps", "2", "--scheduler", "ddim"]
N_IN = 68  # volumes of the b3000 crop


@pytest.fixture(scope="module")
def crop(real_data_dir):
    """The real 6x8x9 b=3000 crop as float32 arrays, and 4 target directions."""
    img = nib.load(real_data_dir / "b3000.nii.gz")
    return {"data": np.asarray(img.dataobj, dtype=np.float32), "affine": img.affine,
            "bvals": np.loadtxt(real_data_dir / "b3000.bval"), "bvecs": np.loadtxt(real_data_dir / "b3000.bvec").T,
            "targets": uniform_directions(4, seed=5)}


def write(folder, data, bvals, bvecs, affine, targets=None):
    folder.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(np.asarray(data), affine), str(folder / "dwi.nii.gz"))
    np.savetxt(folder / "dwi.bval", np.atleast_2d(bvals), fmt="%.6f")
    np.savetxt(folder / "dwi.bvec", np.asarray(bvecs).T, fmt="%.10f")
    if targets is not None:
        np.savetxt(folder / "targets.bvec", np.asarray(targets).T)
    return folder / "dwi.nii.gz"


def upsample(path, model, *extra):
    # Input handling is tested on the series as read: not denoised (tests/test_denoise.py covers that stage).
    out = path.parent / "out" / "up"
    code = main(["upsample", "--dwi", str(path), "--out", str(out), "--model", str(model), *STEPS,
                 "--targets", str(path.parent / "targets.bvec"), "--denoise", "none", *extra])
    return code, out


def messages(capsys) -> tuple[list[str], str]:
    """The command's own stderr lines (tqdm's progress bars aside), and its stdout."""
    captured = capsys.readouterr()
    return [line for line in captured.err.splitlines() if line.startswith("qid2 upsample:")], captured.out


def read(prefix):
    return (np.asarray(nib.load(f"{prefix}.nii.gz").dataobj), np.loadtxt(f"{prefix}.bval"),
            np.loadtxt(f"{prefix}.bvec").T)


def test_nan_bvecs_on_b0_volumes_are_accepted_as_in_dipys_own_data(tmp_path, tiny_model_dir, capsys):
    from dipy.data import get_fnames

    dwi_path, bval_path, bvec_path = (str(p) for p in get_fnames(name="small_64D"))
    assert np.isnan(np.loadtxt(bvec_path)[0]).all()  # the b0 row, stored as NaN
    np.savetxt(tmp_path / "targets.bvec", uniform_directions(3, seed=1).T)
    out = tmp_path / "up"
    assert main(["upsample", "--dwi", dwi_path, "--bvals", bval_path, "--bvecs", bvec_path, "--out", str(out),
                 "--targets", str(tmp_path / "targets.bvec"), "--model", str(tiny_model_dir), "--denoise", "none",
                 *STEPS]) == 0
    lines, printed = messages(capsys)
    assert lines == [] and "3 targets synthesised" in printed and "(65 + 3 volumes)" in printed
    data, bvals, bvecs = read(out)
    src = nib.load(dwi_path)
    assert data.shape == (10, 10, 10, 65 + 3)
    np.testing.assert_array_equal(data[..., :65], np.asarray(src.dataobj, dtype=np.float32))
    np.testing.assert_allclose(nib.load(f"{out}.nii.gz").affine, src.affine)  # oblique P-L-S, kept
    np.testing.assert_array_equal(bvecs[0], 0.0)  # the NaN b0 row is written as "no direction"
    assert np.all(np.isfinite(data)) and np.abs(data[..., 65:]).max() > 0


@pytest.mark.parametrize("given", [True, False], ids=["given", "computed"])
def test_an_empty_mask_is_exit_2_and_no_output(given, crop, tmp_path, tiny_prior_model_dir, capsys):
    data, extra = crop["data"].copy(), []
    if given:
        nib.save(nib.Nifti1Image(np.zeros((6, 8, 9), np.uint8), crop["affine"]), str(tmp_path / "mask.nii.gz"))
        extra = ["--mask", str(tmp_path / "mask.nii.gz")]
        problem = f"{tmp_path / 'mask.nii.gz'}: the mask is empty (no voxel above 0)"
    else:
        data[..., crop["bvals"] < 50] = -5.0  # no positive b0 signal anywhere: no brain to find
        problem = f"{tmp_path / 'in' / 'dwi.nii.gz'}: the brain mask computed from the mean b0 is empty; give a mask"
    path = write(tmp_path / "in", data, crop["bvals"], crop["bvecs"], crop["affine"], crop["targets"])
    code, out = upsample(path, tiny_prior_model_dir, *extra)
    assert code == 2
    assert messages(capsys)[0] == [f"qid2 upsample: error: {problem}"]
    assert not out.parent.exists()


def test_nan_and_inf_voxels_are_missing_and_the_output_is_finite(crop, tmp_path, tiny_prior_model_dir, capsys):
    data = crop["data"].copy()
    bad = [(2, 3, 4, 0), (2, 4, 4, 5), (3, 3, 5, 5), (1, 2, 3, 40)]  # an Inf in a b0, NaNs in two directions
    for i, j, k, v in bad:
        data[i, j, k, v] = np.inf if v == 0 else np.nan
    path = write(tmp_path / "in", data, crop["bvals"], crop["bvecs"], crop["affine"], crop["targets"])
    code, out = upsample(path, tiny_prior_model_dir)
    assert code == 0
    lines, printed = messages(capsys)
    assert "4 targets synthesised" in printed
    assert lines == [(f"qid2 upsample: warning: {path}: 4 voxels hold NaN or Inf (in volumes 0, 5, 40): "
                      "treated as missing, written as 0 and left out of the brain mask")]
    result, _, _ = read(out)
    assert np.all(np.isfinite(result))
    entries = tuple(np.array(bad).T)
    assert np.all(result[entries] == 0)  # the missing values are written as 0...
    assert np.all(result[entries[:3]][:, N_IN:] == 0)  # ...and nothing is synthesised in their voxels
    finite = np.ones(data.shape, bool)
    finite[entries] = False
    np.testing.assert_array_equal(result[..., :N_IN][finite], crop["data"][finite])
    assert (np.abs(result[..., N_IN:]).max(axis=-1) > 0).sum() > 100  # the rest of the brain is synthesised


def test_empty_volumes_are_kept_but_never_used(crop, tmp_path, tiny_prior_model_dir, capsys):
    data = crop["data"].copy()
    dropped = [1, 10]  # a b0 and a direction
    data[..., dropped] = 0.0
    path = write(tmp_path / "in", data, crop["bvals"], crop["bvecs"], crop["affine"], crop["targets"])
    code, out = upsample(path, tiny_prior_model_dir)
    assert code == 0
    assert messages(capsys)[0] == [
        f"qid2 upsample: warning: {path}: volumes 1, 10 (b=0, 3000) are empty (all zero): kept as they are in "
        "the output, never used as a reference or in the tensor fit"]
    with_empty, bvals, _ = read(out)
    np.testing.assert_array_equal(with_empty[..., :N_IN], data)
    assert len(bvals) == N_IN + 4

    # The same series without those volumes gives the same synthesised ones: they were not used.
    keep = np.setdiff1d(np.arange(N_IN), dropped)
    path = write(tmp_path / "without", crop["data"][..., keep], crop["bvals"][keep], crop["bvecs"][keep],
                 crop["affine"], crop["targets"])
    assert upsample(path, tiny_prior_model_dir)[0] == 0
    without, _, _ = read(path.parent / "out" / "up")
    np.testing.assert_allclose(with_empty[..., N_IN:], without[..., len(keep):], rtol=1e-5, atol=1e-3)
    assert np.abs(without[..., len(keep):]).max() > 0


def test_bvec_norms_far_from_one_scale_the_b_values(crop, tmp_path, tiny_prior_model_dir, capsys):
    dw = crop["bvals"] > 50
    bvecs = crop["bvecs"].copy()
    bvecs[dw] *= 0.7  # b=3000 at 70 % gradient amplitude: b=1470
    path = write(tmp_path / "scaled", crop["data"], crop["bvals"], bvecs, crop["affine"], crop["targets"])
    code, out = upsample(path, tiny_prior_model_dir)
    assert code == 0
    lines, printed = messages(capsys)
    assert len(lines) == 1 and lines[0].startswith(f"qid2 upsample: warning: {tmp_path / 'scaled' / 'dwi.bvec'}: "
                                                   "60 b-vectors have norms far from 1 (0.7 to 0.7): their b-values "
                                                   "are scaled by |g|² as MRtrix3 does")
    assert "4 targets synthesised at b=1470" in printed
    scaled, bvals, out_bvecs = read(out)
    expected = np.where(dw, crop["bvals"] * 0.49, crop["bvals"])
    np.testing.assert_allclose(bvals[:N_IN], expected, rtol=1e-6)
    np.testing.assert_allclose(np.linalg.norm(out_bvecs[N_IN:], axis=1), 1.0, atol=1e-8)

    # It is the series written with its effective b-values and unit vectors.
    unit = crop["bvecs"] / np.maximum(np.linalg.norm(crop["bvecs"], axis=1, keepdims=True), 1e-12)
    path = write(tmp_path / "effective", crop["data"], expected, unit, crop["affine"], crop["targets"])
    assert upsample(path, tiny_prior_model_dir)[0] == 0
    effective, effective_bvals, _ = read(path.parent / "out" / "up")
    np.testing.assert_allclose(bvals, effective_bvals, rtol=1e-6)
    np.testing.assert_allclose(scaled, effective, rtol=1e-5, atol=1e-3)


def test_several_shells_given_to_a_volume_upsampler_name_them(real_data_dir, tiny_pipeline):
    dwi = load_dwi(real_data_dir / "msmt.nii.gz")
    data, targets = np.asarray(dwi.data), uniform_directions(3)
    for upsampler in (QID2Upsampler(tiny_pipeline, progress=False), InterpUpsampler(3), DTIUpsampler()):
        with pytest.raises(QID2InputError, match=r"the data hold 3 shells \(b=700, 1200, 2800\)"):
            upsampler.predict(data, dwi.bvals, dwi.bvecs, targets)
    with pytest.raises(QID2InputError, match="3 shells"):
        DTIUpsampler().predict(data, dwi.gtab, targets)


def test_a_shell_too_small_is_skipped_unless_asked_for(crop, tmp_path, tiny_prior_model_dir, capsys):
    bvals = crop["bvals"].copy()
    bvals[[3, 4]] = 1000.0  # a two-direction shell: too few for R = 3 references
    path = write(tmp_path / "in", crop["data"], bvals, crop["bvecs"], crop["affine"], crop["targets"])
    code, out = upsample(path, tiny_prior_model_dir)
    assert code == 0
    lines, printed = messages(capsys)
    assert lines == [f"qid2 upsample: warning: {path}: the b=1000 shell is not up-sampled: only 2 acquired "
                     "directions, fewer than the R = 3 references requested"]
    assert "4 targets synthesised at b=3000" in printed
    assert upsample(path, tiny_prior_model_dir, "--shell", "1000")[0] == 2
    assert messages(capsys)[0] == [f"qid2 upsample: error: {path}: only 2 acquired directions, fewer than the "
                                   "R = 3 references requested"]


def test_training_range_of_each_kind_of_model():
    from qid2_diffusers.inference import training_shell_warning

    assert training_shell_warning(1040) is None
    assert training_shell_warning(1200) == ("the model was trained at b=1000; up-sampling the b=1200 shell is "
                                            "outside its training data")
    assert training_shell_warning(500, True) is None and training_shell_warning(3500, True) is None
    assert "trained on shells from b=500 to b=3500; up-sampling the b=5000 shell" in training_shell_warning(5000, True)
    assert training_shell_warning(300, True) is not None
