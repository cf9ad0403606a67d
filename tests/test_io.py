import gzip
import os
import shutil
import tracemalloc
import warnings
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from qid2_diffusers.data import io as dio
from qid2_diffusers.data.io import (
    DWI,
    bvec_voxel_signs,
    check_enough_directions,
    extract_shell,
    group_shells,
    atomic_write,
    load_dwi,
    remove_temporaries,
    shell_label,
    save_dwi,
    save_nifti,
    shell_indices,
    split_acquired,
)
from qid2_diffusers.directions import uniform_directions
from qid2_diffusers.errors import QID2InputError

AFFINE = np.diag([-2.0, 2.0, 2.0, 1.0])


def scheme(n_b0=2, n_dirs=8, b=1000.0):
    bvals = np.r_[np.zeros(n_b0), np.full(n_dirs, b)]
    bvecs = np.r_[np.zeros((n_b0, 3)), uniform_directions(n_dirs)]
    return bvals, bvecs


def write_case(folder, name="dwi", shape=(4, 5, 3), bvals=None, bvecs=None, data=None, ext=".nii.gz"):
    """Write a small DWI by hand (nibabel + text files), independent of save_dwi."""
    if bvals is None:
        bvals, bvecs = scheme()
    n = len(bvals)
    if data is None:
        data = np.random.default_rng(0).random(shape + (n,)).astype(np.float32)
    path = folder / f"{name}{ext}"
    nib.save(nib.Nifti1Image(data, AFFINE), str(path))
    np.savetxt(folder / f"{name}.bval", np.atleast_2d(bvals), fmt="%.6f")
    np.savetxt(folder / f"{name}.bvec", np.asarray(bvecs).T, fmt="%.8f")
    return path, data


def error_of(fn, *args, **kwargs) -> str:
    with pytest.raises(QID2InputError) as info:
        fn(*args, **kwargs)
    message = str(info.value)
    assert "\n" not in message
    return message


# ---------------------------------------------------------------------------
# Real scanner fixtures


def test_msmt_fixture_loads_with_half_b0_and_three_shells(real_data_dir):
    dwi = load_dwi(real_data_dir / "msmt.nii.gz")
    assert dwi.shape == (15, 15, 11, 102)
    assert not isinstance(dwi.data, np.ndarray)  # lazy proxy
    assert np.all(dwi.bvals[dwi.b0_indices] == 0.5)
    assert len(dwi.b0_indices) == 6
    assert {b: len(idx) for b, idx in dwi.shells.items()} == {700: 16, 1200: 30, 2800: 50}
    norms = np.linalg.norm(dwi.bvecs, axis=1)
    assert np.allclose(norms[dwi.b0_indices], 0.0)
    assert np.allclose(np.delete(norms, dwi.b0_indices), 1.0)
    assert dwi.gtab.b0s_mask.sum() == 6

    b1200 = extract_shell(dwi, 1200)
    assert b1200.n_volumes == 36
    assert set(np.round(b1200.bvals).tolist()) == {0.0, 1200.0}
    full = np.asarray(dwi.data)
    wanted = np.union1d(dwi.b0_indices, dwi.shells[1200])
    np.testing.assert_array_equal(np.asarray(b1200.data), full[..., wanted])
    np.testing.assert_array_equal(b1200.data[:, :, 4, :], full[:, :, 4, wanted])
    np.testing.assert_array_equal(b1200.data[..., 7], full[..., wanted[7]])

    message = error_of(extract_shell, dwi, 1000)
    assert "msmt.nii.gz" in message and "no b=1000 shell" in message
    assert "b=700 (16 volumes)" in message and "b=2800 (50 volumes)" in message


def test_b3000_fixture_groups_2950_into_the_3000_shell(real_data_dir):
    dwi = load_dwi(real_data_dir / "b3000.nii.gz")
    assert dwi.shape == (6, 8, 9, 68)
    assert dwi.data.dtype == np.uint16
    assert list(dwi.shells) == [3000]
    shell = dwi.shells[3000]
    assert len(shell) == 60 and 2 in shell and dwi.bvals[2] == pytest.approx(2950.000935)
    np.testing.assert_array_equal(shell_indices(dwi.bvals, 2950), shell)
    np.testing.assert_array_equal(shell_indices(dwi.bvals, 3000), shell)

    full = np.asarray(dwi.data, dtype=np.float32)
    mean_b0 = dwi.mean_b0()
    assert mean_b0.dtype == np.float32
    np.testing.assert_allclose(mean_b0, full[..., dwi.b0_indices].mean(axis=-1), rtol=1e-6)

    acquired, targets = split_acquired(dwi.bvecs[shell], 30)
    assert len(acquired) == 30 and len(targets) == 30
    assert not set(acquired) & set(targets)
    check_enough_directions(len(acquired), 6, dwi.path)
    message = error_of(check_enough_directions, 3, 6, dwi.path)
    assert "b3000.nii.gz" in message and "fewer than the R = 6" in message


def test_b3000_round_trip_keeps_geometry_and_fixes_nan_zoom(real_data_dir, tmp_path):
    dwi = load_dwi(real_data_dir / "b3000.nii.gz")
    assert np.isnan(dwi.header.get_zooms()[3])
    sub = extract_shell(dwi, 3000)
    paths = save_dwi(tmp_path / "out", sub.data, sub.bvals, sub.bvecs, sub.affine, sub.header)
    assert [p.name for p in paths] == ["out.nii.gz", "out.bval", "out.bvec"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.bval", "out.bvec", "out.nii.gz"]
    back = load_dwi(paths[0])
    assert back.data.dtype == np.float32
    np.testing.assert_array_equal(np.asarray(back.data), np.asarray(dwi.data, dtype=np.float32))
    np.testing.assert_allclose(back.affine, dwi.affine, atol=1e-6)
    np.testing.assert_allclose(back.bvals, dwi.bvals, atol=1e-6)
    np.testing.assert_allclose(back.bvecs, dwi.bvecs, atol=1e-7)
    assert back.header.get_zooms()[:3] == dwi.header.get_zooms()[:3]
    assert back.header.get_zooms()[3] == 1.0
    assert int(back.header["qform_code"]) == int(dwi.header["qform_code"])
    assert int(back.header["sform_code"]) == int(dwi.header["sform_code"])
    assert np.loadtxt(paths[2]).shape == (3, 68)  # FSL: 3 rows


def test_real_fixtures_have_radiological_affines(real_data_dir):
    for name in ("msmt", "b3000"):
        dwi = load_dwi(real_data_dir / f"{name}.nii.gz")
        np.testing.assert_array_equal(bvec_voxel_signs(dwi.affine), [1, 1, 1])
    np.testing.assert_array_equal(bvec_voxel_signs(np.diag([2.0, 2.0, 2.0, 1.0])), [-1, 1, 1])


# ---------------------------------------------------------------------------
# Shells


def test_group_shells_tolerates_jitter_and_keeps_close_shells_apart():
    bvals = np.array([0, 5, 995, 1000, 1005, 2950, 2999.998, 3000, 1985, 2005, 0.5, 200, 300, 3400])
    shells = group_shells(bvals)
    assert list(shells) == [200, 300, 1000, 2000, 3000, 3400]
    np.testing.assert_array_equal(shells[3000], [5, 6, 7])
    np.testing.assert_array_equal(shells[2000], [8, 9])
    np.testing.assert_array_equal(shell_indices(bvals, 0), [0, 1, 10])
    np.testing.assert_array_equal(shell_indices(bvals, 990), [2, 3, 4])
    message = error_of(shell_indices, bvals, 1500, path="x.bval")
    assert message.startswith("x.bval: no b=1500 shell")
    # A higher b0 threshold moves b=200 into the b0 group.
    assert list(group_shells(bvals, b0_threshold=250)) == [300, 1000, 2000, 3000, 3400]


# ---------------------------------------------------------------------------
# Reading synthetic files


def test_bvecs_orientation_normalisation_and_b0_zeroing(tmp_path):
    bvals, bvecs = scheme(n_b0=2, n_dirs=5)
    bvecs = bvecs * np.array([1, 1, 1, 2.0, 0.5, 3, 1])[:, None]
    bvecs[0] = [1.0, 0.0, 0.0]  # scanners often store a direction on b0 volumes
    path, _ = write_case(tmp_path, bvals=bvals, bvecs=bvecs)
    rows = load_dwi(path)
    np.savetxt(tmp_path / "dwi.bvec", bvecs, fmt="%.8f")  # N x 3
    cols = load_dwi(path)
    np.testing.assert_allclose(rows.bvecs, cols.bvecs)
    expected = np.zeros_like(bvecs)
    expected[2:] = bvecs[2:] / np.linalg.norm(bvecs[2:], axis=1, keepdims=True)
    np.testing.assert_allclose(rows.bvecs, expected, atol=1e-8)


def test_nan_or_zero_bvecs_on_b0_volumes_mean_no_direction(tmp_path):
    bvals, bvecs = scheme(n_b0=3, n_dirs=6)
    bvecs[0] = np.nan  # dipy's small_64D stores its b0 row so
    bvecs[1] = [np.inf, 0, 0]
    path, _ = write_case(tmp_path, bvals=bvals, bvecs=bvecs)
    dwi = load_dwi(path)
    np.testing.assert_array_equal(dwi.bvecs[:3], 0.0)
    np.testing.assert_allclose(dwi.bvecs[3:], bvecs[3:], atol=1e-8)
    np.testing.assert_array_equal(dwi.bvals, bvals)


def test_bvec_norms_encode_the_b_value_as_in_mrtrix(tmp_path):
    bvals, bvecs = scheme(n_b0=1, n_dirs=6, b=3000.0)
    bvecs[1:4] *= np.sqrt(1 / 3)  # one nominal b=3000: three directions at b=1000, three at 3000
    bvecs[4] *= 1.004  # rounding in the file, not an encoding
    path, _ = write_case(tmp_path, bvals=bvals, bvecs=bvecs)
    norms = r"dwi.bvec: 3 b-vectors have norms far from 1 \(0.577 to 0.577\).*MRtrix3"
    with pytest.warns(UserWarning, match=norms) as caught:
        dwi = load_dwi(path)
    assert len(caught) == 1
    np.testing.assert_allclose(dwi.bvals, [0, 1000, 1000, 1000, 3000 * 1.004**2, 3000, 3000], rtol=1e-6)
    assert {b: len(i) for b, i in dwi.shells.items()} == {1000: 3, 3000: 3}
    np.testing.assert_allclose(np.linalg.norm(dwi.bvecs[1:], axis=1), 1.0)
    write_case(tmp_path, bvals=bvals, bvecs=scheme(n_b0=1, n_dirs=6)[1])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        load_dwi(path)  # unit vectors: nothing to say


def test_shell_label_names_the_shell_or_the_problem():
    bvals = np.array([0.5, 700, 1200, 2950, 2999.998, 3000, 1195])
    assert shell_label(bvals, 3000) == 3000 and shell_label(bvals, 2950) == 3000 and shell_label(bvals, 1190) == 1200
    assert error_of(shell_label, bvals, 0.5, path="x.bval") == (
        "x.bval: b=0.5 selects the b0 volumes, not a diffusion-weighted shell")
    assert "no b=2000 shell; shells present: b=700 (1 volumes), b=1200 (2 volumes), b=3000 (3 volumes)" in error_of(
        shell_label, bvals, 2000)


def test_bare_fsl_sidecars_are_found(tmp_path):
    path, data = write_case(tmp_path, name="data")
    (tmp_path / "data.bval").rename(tmp_path / "bvals")
    (tmp_path / "data.bvec").rename(tmp_path / "bvecs")
    dwi = load_dwi(path)
    assert dwi.n_volumes == data.shape[-1]
    (tmp_path / "bvals").unlink()
    message = error_of(load_dwi, path)
    assert "data.bval: file not found" in message and "bvals" in message


def test_lazy_slice_read_does_not_load_the_volume(tmp_path):
    bvals, bvecs = scheme(n_b0=2, n_dirs=38)
    data = np.random.default_rng(1).random((64, 64, 16, 40)).astype(np.float32)  # 10.5 MB
    path, _ = write_case(tmp_path, bvals=bvals, bvecs=bvecs, data=data)
    dwi = load_dwi(path)
    tracemalloc.start()
    axial = np.asarray(dwi.data[:, :, 7, :])
    volume = dwi.volume(3)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    np.testing.assert_array_equal(axial, data[:, :, 7, :])
    np.testing.assert_array_equal(volume, data[..., 3])
    assert peak < data.nbytes / 4
    sub = dwi.select([3, 5, 9])
    np.testing.assert_array_equal(sub.data[:, :, 2, 1], data[:, :, 2, 5])
    np.testing.assert_array_equal(sub.select([2]).data[..., 0], data[..., 9])


def test_mask_is_loaded_and_checked(tmp_path):
    path, _ = write_case(tmp_path)
    mask = np.zeros((4, 5, 3), dtype=np.uint8)
    mask[1:3, 1:4, 1] = 1
    nib.save(nib.Nifti1Image(mask, AFFINE), str(tmp_path / "mask.nii.gz"))
    dwi = load_dwi(path, mask_path=tmp_path / "mask.nii.gz")
    assert dwi.mask.dtype == bool and dwi.mask.sum() == 6
    nib.save(nib.Nifti1Image(0 * mask, AFFINE), str(tmp_path / "empty_mask.nii.gz"))
    assert error_of(load_dwi, path, mask_path=tmp_path / "empty_mask.nii.gz").endswith(
        "empty_mask.nii.gz: the mask is empty (no voxel above 0)")
    nib.save(nib.Nifti1Image(mask[:, :, :2], AFFINE), str(tmp_path / "bad_mask.nii.gz"))
    message = error_of(load_dwi, path, mask_path=tmp_path / "bad_mask.nii.gz")
    assert "bad_mask.nii.gz" in message and "(4, 5, 2) does not match the image's (4, 5, 3)" in message


def _truncate_gzip(path, folder):
    raw = path.read_bytes()
    path.write_bytes(raw[: len(raw) // 2])


def _not_gzip(path, folder):
    path.write_bytes(b"this is not an image\n" * 50)


def _truncate_nii(path, folder):
    raw = path.read_bytes()
    path.write_bytes(raw[: len(raw) - 100])


def _three_d(path, folder):
    nib.save(nib.Nifti1Image(np.zeros((4, 5, 3), np.float32), AFFINE), str(path))


def _short_bval(path, folder):
    bvals, _ = scheme()
    np.savetxt(folder / "dwi.bval", bvals[None, :-1])


def _short_bvec(path, folder):
    _, bvecs = scheme()
    np.savetxt(folder / "dwi.bvec", bvecs[:-1].T)


def _four_row_bvec(path, folder):
    np.savetxt(folder / "dwi.bvec", np.ones((4, 10)))


def _nan_bvec(path, folder):
    _, bvecs = scheme()
    bvecs[4, 1] = np.nan
    np.savetxt(folder / "dwi.bvec", bvecs.T)


def _inf_bval(path, folder):
    bvals, _ = scheme()
    bvals[3] = np.inf
    np.savetxt(folder / "dwi.bval", bvals[None])


def _zero_bvec(path, folder):
    _, bvecs = scheme()
    bvecs[5] = 0.0
    np.savetxt(folder / "dwi.bvec", bvecs.T)


def _no_b0(path, folder):
    np.savetxt(folder / "dwi.bval", np.full((1, 10), 1000.0))


def _garbage_bval(path, folder):
    (folder / "dwi.bval").write_text("0 0 1000 abc\n")


def _missing_bvec(path, folder):
    (folder / "dwi.bvec").unlink()


BROKEN = {
    "truncated gzip": (_truncate_gzip, "dwi.nii.gz", "truncated or corrupt gzip", ".nii.gz"),
    "not a nifti": (_not_gzip, "dwi.nii.gz", "not a readable NIfTI image", ".nii.gz"),
    "truncated nii": (_truncate_nii, "dwi.nii", "truncated", ".nii"),
    "3D image": (_three_d, "dwi.nii.gz", "is a 3D image of shape (4, 5, 3)", ".nii.gz"),
    "bval count": (_short_bval, "dwi.bval", "has 9 b-values but dwi.nii.gz has 10 volumes", ".nii.gz"),
    "bvec count": (_short_bvec, "dwi.bvec", "has 9 b-vectors but dwi.nii.gz has 10 volumes", ".nii.gz"),
    "bvec rows": (_four_row_bvec, "dwi.bvec", "expected 3 rows (FSL) or 3 columns", ".nii.gz"),
    "nan bvec": (_nan_bvec, "dwi.bvec", "NaN or Inf", ".nii.gz"),
    "inf bval": (_inf_bval, "dwi.bval", "NaN or Inf", ".nii.gz"),
    "zero bvec": (_zero_bvec, "dwi.bvec", "zero-length b-vector on volume 5 (b=1000)", ".nii.gz"),
    "no b0": (_no_b0, "dwi.bval", "no b0 volume", ".nii.gz"),
    "garbage bval": (_garbage_bval, "dwi.bval", "cannot parse numbers", ".nii.gz"),
    "missing bvec": (_missing_bvec, "dwi.bvec", "file not found", ".nii.gz"),
}


@pytest.mark.parametrize("case", list(BROKEN))
def test_broken_input_gives_one_line_naming_file_and_problem(tmp_path, case):
    breaker, culprit, problem, ext = BROKEN[case]
    path, _ = write_case(tmp_path, ext=ext)
    load_dwi(path)  # intact before we break it
    breaker(path, tmp_path)
    message = error_of(load_dwi, path)
    assert message.startswith(str(tmp_path / culprit) + ": "), message
    assert problem in message, message


def test_missing_image(tmp_path):
    message = error_of(load_dwi, tmp_path / "nothing.nii.gz")
    assert message == f"{tmp_path / 'nothing.nii.gz'}: file not found"


def test_truncated_gzip_check_reads_stream_when_trailer_disagrees(tmp_path):
    # A multi-member gzip has a trailer that describes only its last member.
    path, data = write_case(tmp_path)
    raw = gzip.decompress(path.read_bytes())
    path.write_bytes(gzip.compress(raw[:1000]) + gzip.compress(raw[1000:]))
    np.testing.assert_array_equal(np.asarray(load_dwi(path).data), data)


# ---------------------------------------------------------------------------
# Writing


def test_save_dwi_round_trip_and_prefix_handling(tmp_path):
    bvals, bvecs = scheme(n_b0=1, n_dirs=4)
    data = np.arange(3 * 4 * 2 * 5, dtype=np.int16).reshape(3, 4, 2, 5)
    header = nib.Nifti1Header()
    header.set_data_dtype(np.int16)
    header.set_data_shape(data.shape)
    header.set_zooms((1.5, 1.5, 2.0, 3.2))
    header.set_xyzt_units("mm", "sec")
    paths = save_dwi(tmp_path / "sub" / "pred.nii.gz", data, bvals, bvecs, AFFINE, header)
    assert paths[0] == tmp_path / "sub" / "pred.nii.gz"
    back = load_dwi(paths[0])
    assert back.data.dtype == np.float32
    np.testing.assert_array_equal(np.asarray(back.data), data.astype(np.float32))
    assert back.header.get_zooms() == (1.5, 1.5, 2.0, 3.2)
    assert back.header.get_xyzt_units() == ("mm", "sec")
    np.testing.assert_allclose(back.bvecs, bvecs, atol=1e-9)


def test_save_is_atomic_on_failure(tmp_path, monkeypatch):
    bvals, bvecs = scheme(n_b0=1, n_dirs=4)
    data = np.ones((3, 4, 2, 5), np.float32)
    save_dwi(tmp_path / "out", data, bvals, bvecs, AFFINE)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}

    real_savetxt = np.savetxt

    def failing_savetxt(fname, X, *args, **kwargs):
        if str(fname).endswith(".bvec"):
            raise OSError("disk full")
        return real_savetxt(fname, X, *args, **kwargs)

    monkeypatch.setattr(dio.np, "savetxt", failing_savetxt)
    with pytest.raises(OSError, match="disk full"):
        save_dwi(tmp_path / "out", 2 * data, bvals, bvecs, AFFINE)
    with pytest.raises(OSError, match="disk full"):
        save_dwi(tmp_path / "new", data, bvals, bvecs, AFFINE)
    after = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    assert after == before  # old outputs untouched, no partial new ones, no temporaries


def test_temporaries_a_killed_writer_leaves_are_removed_and_nothing_else(tmp_path, monkeypatch):
    bvals, bvecs = scheme(n_b0=1, n_dirs=4)
    left, real_replace = [], os.replace

    def replace_leaving_a_copy(src, dst):
        left.append(tmp_path / "sub" / Path(src).name)  # what a writer killed before its rename leaves
        left[-1].parent.mkdir(exist_ok=True)
        shutil.copy(src, left[-1])
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", replace_leaving_a_copy)
    save_dwi(tmp_path / "out", np.ones((3, 4, 2, 5), np.float32), bvals, bvecs, AFFINE)
    atomic_write(tmp_path / "table.tsv", lambda tmp: tmp.write_text("a\tb\n"))
    monkeypatch.undo()
    keep = [tmp_path / "sub" / name for name in (".out.qid2-done.json", ".hidden", "notes.tmp", ".x.tmp.nii.gz")]
    for path in keep:
        path.write_text("")
    assert len(left) == 4 and sorted(remove_temporaries(tmp_path)) == sorted(left)
    assert sorted((tmp_path / "sub").iterdir()) == sorted(keep)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.bval", "out.bvec", "out.nii.gz", "sub", "table.tsv"]


def test_save_nifti_map(tmp_path):
    fa = np.random.default_rng(2).random((5, 6, 7))
    path = save_nifti(tmp_path / "fa.nii.gz", fa, AFFINE)
    img = nib.load(str(path))
    assert img.get_data_dtype() == np.float32
    np.testing.assert_allclose(img.get_fdata(), fa.astype(np.float32))
    np.testing.assert_array_equal(img.affine, AFFINE)
    assert [p.name for p in tmp_path.iterdir()] == ["fa.nii.gz"]


def test_select_on_in_memory_dwi():
    bvals, bvecs = scheme(n_b0=2, n_dirs=6)
    data = np.random.default_rng(3).random((3, 3, 2, 8))
    dwi = DWI(data=data, bvals=bvals, bvecs=bvecs, affine=AFFINE)
    sub = extract_shell(dwi, 1000).select([0, 4])
    np.testing.assert_array_equal(sub.data, data[..., [0, 4]])
    np.testing.assert_array_equal(sub.bvals, [0.0, 1000.0])
