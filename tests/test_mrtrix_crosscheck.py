"""Independent cross-check of the package's FA against MRtrix3 (dwi2tensor + tensor2metric)."""

import shutil
import subprocess

import nibabel as nib
import numpy as np
import pytest

MRTRIX = ("dwi2tensor", "tensor2metric")


@pytest.mark.skipif(
    any(shutil.which(tool) is None for tool in MRTRIX),
    reason="MRtrix3 binaries (dwi2tensor, tensor2metric) not found; install the Debian package mrtrix3",
)
def test_fa_agrees_with_mrtrix_on_a_phantom(tmp_path):
    from qid2_diffusers.data.layouts import discover_subjects
    from qid2_diffusers.data.phantom import make_subject, write_subject
    from qid2_diffusers.tensor import fit_tensor

    write_subject(make_subject(3, slab=3), tmp_path, "phantom-003")
    subject = discover_subjects(tmp_path)[0]
    dwi = subject.load()
    ours = fit_tensor(np.asarray(dwi.data, dtype=np.float32), dwi.bvals, dwi.bvecs, dwi.mask).fa

    tensor, fa_path = tmp_path / "tensor.mif", tmp_path / "fa.nii"
    common = ["-quiet", "-force", "-nthreads", "1"]
    subprocess.run(
        [
            "dwi2tensor",
            str(subject.dwi),
            str(tensor),
            "-fslgrad",
            str(subject.bvecs),
            str(subject.bvals),
            "-mask",
            str(subject.mask),
            *common,
        ],
        check=True,
        capture_output=True,
        timeout=120,
    )
    subprocess.run(
        ["tensor2metric", str(tensor), "-fa", str(fa_path), *common], check=True, capture_output=True, timeout=120
    )
    theirs = np.asarray(nib.load(str(fa_path)).dataobj, dtype=np.float32)

    assert theirs.shape == ours.shape
    mask = dwi.mask
    difference = np.abs(ours[mask] - theirs[mask])
    assert np.median(difference) <= 0.01, f"median |FA - FA_mrtrix| = {np.median(difference):.4f}"
    # The maps are the same map, not merely close on average.
    assert np.corrcoef(ours[mask], theirs[mask])[0, 1] > 0.95
