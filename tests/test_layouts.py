import nibabel as nib
import numpy as np
import pytest

from qid2_diffusers.data.layouts import SubjectPaths, discover_subjects
from qid2_diffusers.directions import uniform_directions
from qid2_diffusers.errors import QID2InputError

AFFINE = np.diag([-2.0, 2.0, 2.0, 1.0])
SHAPE = (4, 5, 3)


def write_series(dwi_path, bval_path, bvec_path, value, mask_path=None):
    bvals = np.r_[0.0, np.full(6, 1000.0)]
    bvecs = np.r_[np.zeros((1, 3)), uniform_directions(6)]
    dwi_path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(np.full(SHAPE + (7,), value, np.float32), AFFINE), str(dwi_path))
    np.savetxt(bval_path, bvals[None])
    np.savetxt(bvec_path, bvecs.T)
    if mask_path is not None:
        mask = np.zeros(SHAPE, np.uint8)
        mask[1:3, 1:4, 1] = 1
        nib.save(nib.Nifti1Image(mask, AFFINE), str(mask_path))


def hcp_subject(root, name, value, mask=True):
    d = root / name / "T1w" / "Diffusion"
    write_series(d / "data.nii.gz", d / "bvals", d / "bvecs", value, d / "nodif_brain_mask.nii.gz" if mask else None)


def bids_series(root, prefix, value, mask_suffix="_desc-brain_mask"):
    parts = prefix.split("_")
    folder = root.joinpath(*[p for p in parts if p.startswith(("sub-", "ses-"))], "dwi")
    write_series(
        folder / f"{prefix}_dwi.nii.gz",
        folder / f"{prefix}_dwi.bval",
        folder / f"{prefix}_dwi.bvec",
        value,
        folder / f"{prefix}{mask_suffix}.nii.gz" if mask_suffix else None,
    )
    return folder


def test_hcp_layout(tmp_path):
    hcp_subject(tmp_path, "200109", 2.0)
    hcp_subject(tmp_path, "100307", 1.0, mask=False)
    (tmp_path / "README").write_text("not a subject")
    subjects = discover_subjects(tmp_path)
    assert [s.subject_id for s in subjects] == ["100307", "200109"]
    assert all(s.layout == "hcp" for s in subjects)
    first, second = subjects
    assert first.mask is None
    assert second.mask == tmp_path / "200109" / "T1w" / "Diffusion" / "nodif_brain_mask.nii.gz"
    dwi = second.load()
    assert dwi.shape == SHAPE + (7,) and dwi.mask.sum() == 6
    assert float(np.asarray(dwi.data).mean()) == 2.0
    # A single subject's folder is a root too.
    assert [s.subject_id for s in discover_subjects(tmp_path / "100307")] == ["100307"]


def test_bids_layout_with_sessions_runs_and_masks(tmp_path):
    bids_series(tmp_path, "sub-02_ses-1", 3.0)
    bids_series(tmp_path, "sub-01", 1.0, mask_suffix=None)
    folder = bids_series(tmp_path, "sub-02_ses-2_run-1", 4.0, mask_suffix="_mask")
    bids_series(tmp_path, "sub-02_ses-2_run-2", 5.0, mask_suffix="_mask")
    # Derivative masks carry more entities; a lone mask in the folder is the series'.
    bids_series(tmp_path, "sub-03", 6.0, mask_suffix="_space-dwi_desc-brain_mask")
    (folder / "sub-02_ses-2_run-1_dwi.json").write_text("{}")
    subjects = discover_subjects(tmp_path)
    ids = ["sub-01", "sub-02_ses-1", "sub-02_ses-2_run-1", "sub-02_ses-2_run-2", "sub-03"]
    assert [s.subject_id for s in subjects] == ids
    assert all(s.layout == "bids" for s in subjects)
    assert subjects[0].mask is None
    assert subjects[1].mask.name == "sub-02_ses-1_desc-brain_mask.nii.gz"
    assert subjects[3].mask.name == "sub-02_ses-2_run-2_mask.nii.gz"
    assert subjects[3].bvals.name == "sub-02_ses-2_run-2_dwi.bval"
    assert subjects[4].mask.name == "sub-03_space-dwi_desc-brain_mask.nii.gz"
    values = [float(np.asarray(s.load().data).mean()) for s in subjects]
    assert values == [1.0, 3.0, 4.0, 5.0, 6.0]


def test_mixed_root_is_sorted_by_id(tmp_path):
    hcp_subject(tmp_path, "100307", 1.0)
    bids_series(tmp_path, "sub-01", 2.0)
    subjects = discover_subjects(tmp_path)
    assert [(s.subject_id, s.layout) for s in subjects] == [("100307", "hcp"), ("sub-01", "bids")]
    assert isinstance(subjects[0], SubjectPaths)


def test_empty_or_missing_root(tmp_path):
    (tmp_path / "sub-01" / "anat").mkdir(parents=True)
    with pytest.raises(QID2InputError) as info:
        discover_subjects(tmp_path)
    assert str(info.value).startswith(f"{tmp_path}: no subjects found")
    with pytest.raises(QID2InputError, match="folder not found"):
        discover_subjects(tmp_path / "absent")


def test_missing_sidecar_is_named(tmp_path):
    folder = bids_series(tmp_path, "sub-01", 1.0)
    (folder / "sub-01_dwi.bvec").unlink()
    with pytest.raises(QID2InputError) as info:
        discover_subjects(tmp_path)
    assert str(info.value) == f"{folder / 'sub-01_dwi.bvec'}: file not found"
    hcp_subject(tmp_path / "hcp", "100307", 1.0)
    (tmp_path / "hcp" / "100307" / "T1w" / "Diffusion" / "bvals").unlink()
    with pytest.raises(QID2InputError, match=r"Diffusion/bvals: file not found"):
        discover_subjects(tmp_path / "hcp")
