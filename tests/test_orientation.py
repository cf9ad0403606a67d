"""Orientation: one anatomy stored in any orientation is up-sampled alike, and FSL b-vectors reach the working frame.

The stored copies are made here by hand (numpy flips and transposes, the
affine adjusted, the FSL b-vectors rewritten from FSL's definition), not with
the module under test.
"""

import nibabel as nib
import numpy as np
import pytest

from qid2_diffusers.cli import main
from qid2_diffusers.data.io import load_dwi, save_dwi, save_nifti, split_acquired
from qid2_diffusers.directions import uniform_directions
from qid2_diffusers.errors import QID2InputError
from qid2_diffusers.gradients import split_scheme
from qid2_diffusers.hub import load_pipeline
from qid2_diffusers.inference import upsample_dwi
from qid2_diffusers.orientation import WORKING_AXCODES, Reorientation
from qid2_diffusers.tensor import fit_tensor

STEPS = ["--steps", "2", "--scheduler", "ddim"]


def fsl_signs(affine):
    """FSL's convention, written out: x negated when the affine's determinant is positive."""
    return np.array([-1.0 if np.linalg.det(affine[:3, :3]) > 0 else 1.0, 1.0, 1.0])


class Storage:
    """A signed permutation of the voxel axes: stored index ``n`` holds original voxel ``Q n + c``."""

    def __init__(self, q, shape):
        self.q = np.asarray(q, dtype=float)
        self.shape = shape
        # Original axis of each stored axis, and whether it runs backwards.
        self.axes = [int(np.flatnonzero(self.q[:, j])[0]) for j in range(3)]
        self.flips = [self.q[self.axes[j], j] < 0 for j in range(3)]
        self.c = np.array([shape[i] - 1 if self.q[i, j] < 0 else 0 for j, i in enumerate(self.axes)], dtype=float)

    def store(self, array):
        out = np.transpose(array, self.axes + list(range(3, array.ndim)))
        for j, flip in enumerate(self.flips):
            if flip:
                out = np.flip(out, axis=j)
        return np.ascontiguousarray(out)

    def unstore(self, array):
        for j, flip in enumerate(self.flips):
            if flip:
                array = np.flip(array, axis=j)
        inverse = list(np.argsort(self.axes)) + list(range(3, array.ndim))
        return np.ascontiguousarray(np.transpose(array, inverse))

    def affine(self, affine):
        m = np.eye(4)
        m[:3, :3], m[:3, 3] = self.q, self.c
        return affine @ m

    def fsl_bvecs(self, fsl, affine):
        """The original image's FSL b-vectors, rewritten for the stored image."""
        voxel = fsl * fsl_signs(affine)  # original voxel frame
        return (voxel @ self.q) * fsl_signs(self.affine(affine))  # v_stored = Q^T v

    def original_bvecs(self, fsl_stored, affine):
        voxel = fsl_stored * fsl_signs(self.affine(affine))
        return (voxel @ self.q.T) * fsl_signs(affine)


STORAGES = {
    "as-is": [[1, 0, 0], [0, 1, 0], [0, 0, 1]],
    "x-flipped (det > 0)": [[-1, 0, 0], [0, 1, 0], [0, 0, 1]],
    "sagittal (Z, X, Y)": [[0, 1, 0], [0, 0, 1], [1, 0, 0]],
    "x and y swapped (det > 0)": [[0, 1, 0], [1, 0, 0], [0, 0, 1]],
}


@pytest.fixture(scope="module")
def acquisition(phantom_slab):
    """The slab with 30 of its 90 directions kept, and 6 target directions."""
    s = phantom_slab
    b0, dw = split_scheme(s["bvals"])
    kept, _ = split_acquired(s["bvecs"][dw], 30)
    keep = np.sort(np.concatenate([b0, dw[kept]]))
    return {"dwi": s["dwi"][..., keep], "bvals": s["bvals"][keep], "bvecs": s["bvecs"][keep], "mask": s["mask"],
            "affine": s["affine"], "targets": uniform_directions(6, seed=11)}


def write_stored(acq, name, folder):
    storage = Storage(STORAGES[name], acq["dwi"].shape[:3])
    affine = storage.affine(acq["affine"])
    prefix = folder / "dwi"
    save_dwi(prefix, storage.store(acq["dwi"]), acq["bvals"], storage.fsl_bvecs(acq["bvecs"], acq["affine"]), affine)
    save_nifti(folder / "mask.nii.gz", storage.store(acq["mask"]), affine, dtype=np.uint8)
    np.savetxt(folder / "targets.bvec", storage.fsl_bvecs(acq["targets"], acq["affine"]).T)
    return storage


def test_reorientation_maps_world_directions_and_positions():
    rng = np.random.default_rng(0)
    shape = (5, 6, 7)
    las = np.diag([-2.0, 2.0, 2.0, 1.0])
    world = rng.normal(size=(4, 3))
    for q in STORAGES.values():
        storage = Storage(q, shape)
        affine = storage.affine(las)
        r = Reorientation(affine, storage.store(np.zeros(shape)).shape)
        assert nib.aff2axcodes(r.working_affine) == WORKING_AXCODES and r.working_shape == shape
        np.testing.assert_allclose(r.working_affine, las, atol=1e-12)
        # A direction in the world, written as FSL b-vectors of this file, comes out as the
        # working voxel-frame vector of the same world direction.
        fsl = (world @ np.linalg.inv(affine[:3, :3]).T) * fsl_signs(affine)
        working = r.bvecs_to_working(fsl)
        np.testing.assert_allclose(working @ las[:3, :3].T, world, atol=1e-12)
        np.testing.assert_allclose(r.bvecs_from_working(working), fsl, atol=1e-12)
        array = rng.random(shape + (2,))
        stored = storage.store(array)
        np.testing.assert_array_equal(r.to_working(stored), array)
        np.testing.assert_array_equal(r.from_working(r.to_working(stored)), stored)
        r.to_working(stored)[1, 2, 3, 0] = -1.0  # a view: writes reach the stored array
        assert storage.unstore(stored)[1, 2, 3, 0] == -1.0
    with pytest.raises(QID2InputError, match="x.nii.gz: the affine has a degenerate axis"):
        Reorientation(np.diag([0.0, 2.0, 2.0, 1.0]), shape, path="x.nii.gz")


def test_fsl_bvecs_of_a_positive_determinant_file_give_the_same_tensors(acquisition, tmp_path):
    fits = {}
    for name in ("as-is", "x-flipped (det > 0)"):
        folder = tmp_path / name.split()[0]
        folder.mkdir()
        storage = write_stored(acquisition, name, folder)
        dwi = load_dwi(folder / "dwi.nii.gz")
        r = Reorientation(dwi.affine, dwi.shape)
        data = r.to_working(np.asarray(dwi.data))
        fits[name] = fit_tensor(data, dwi.bvals, r.bvecs_to_working(dwi.bvecs), acquisition["mask"])
    # The flipped file's FSL b-vectors are the original ones (FSL's x-flip undoes the storage flip);
    # read as plain voxel-frame vectors of the stored grid, they would give other tensors.
    assert np.linalg.det(dwi.affine[:3, :3]) > 0
    np.testing.assert_allclose(dwi.bvecs, acquisition["bvecs"], atol=1e-9)
    naive = fit_tensor(data, dwi.bvals, r.bvecs_to_working(dwi.bvecs * [-1, 1, 1]), acquisition["mask"])
    m = acquisition["mask"] & (fits["as-is"].fa > 0.3)
    assert m.sum() > 200
    e_ref = fits["as-is"].principal_direction[m]
    np.testing.assert_allclose(fits["x-flipped (det > 0)"].fa[m], fits["as-is"].fa[m], atol=1e-5)
    assert np.abs(np.sum(fits["x-flipped (det > 0)"].principal_direction[m] * e_ref, axis=1)).min() > 0.9999
    naive_dot = np.abs(np.sum(naive.principal_direction[m] * e_ref, axis=1))
    assert np.mean(naive_dot < 0.95) > 0.2  # oblique fibres point elsewhere without the conversion


def _load_output(prefix, storage, acq):
    img = nib.load(f"{prefix}.nii.gz")
    data = storage.unstore(np.asarray(img.dataobj))
    bvals = np.loadtxt(f"{prefix}.bval")
    bvecs = storage.original_bvecs(np.loadtxt(f"{prefix}.bvec").T, acq["affine"])
    return img, data, bvals, bvecs


@pytest.mark.parametrize("interface", ["cli", "python"])
def test_every_storage_gives_the_same_synthesised_volumes(interface, acquisition, tmp_path, tiny_model_dir,
                                                           tiny_prior_model_dir):
    model = tiny_prior_model_dir if interface == "cli" else tiny_model_dir
    outputs = {}
    for name in STORAGES:
        folder = tmp_path / name.split()[0]
        folder.mkdir()
        storage = write_stored(acquisition, name, folder)
        if interface == "cli":
            assert main(["upsample", "--dwi", str(folder / "dwi.nii.gz"), "--mask", str(folder / "mask.nii.gz"),
                         "--targets", str(folder / "targets.bvec"), "--out", str(folder / "up"),
                         "--model", str(model), *STEPS]) == 0
        else:
            dwi = load_dwi(folder / "dwi.nii.gz")
            pipe = load_pipeline(model, scheduler="ddim", device="cpu")
            targets = np.loadtxt(folder / "targets.bvec").T
            result = upsample_dwi(dwi, targets, pipe, num_inference_steps=2, denoise="none",
                                  progress=False)  # computed mask
            result.save(folder / "up", dwi.affine, dwi.header)
        img, data, bvals, bvecs = _load_output(folder / "up", storage, acquisition)
        src = nib.load(folder / "dwi.nii.gz")
        np.testing.assert_array_equal(img.affine, src.affine)  # written back in the file's own orientation
        if interface == "python":  # --denoise none: the input volumes are written as they were read
            np.testing.assert_array_equal(np.asarray(img.dataobj)[..., :48], np.asarray(src.dataobj))
        outputs[name] = data, bvals, bvecs

    ref_data, ref_bvals, ref_bvecs = outputs["as-is"]
    assert ref_data.shape == (40, 48, 2, 48 + 6)
    np.testing.assert_allclose(ref_bvecs[48:], acquisition["targets"], atol=1e-8)
    synthesised = ref_data[..., 48:]
    assert np.abs(synthesised).max() > 0
    for name, (data, bvals, bvecs) in outputs.items():
        np.testing.assert_array_equal(bvals, ref_bvals)
        np.testing.assert_allclose(bvecs, ref_bvecs, atol=1e-8, err_msg=name)
        np.testing.assert_allclose(data[..., 48:], synthesised, rtol=1e-5, atol=1e-3 * np.abs(synthesised).max(),
                                   err_msg=name)
        # The CLI's default MP-PCA runs in the working orientation: the same denoised inputs for every storage.
        np.testing.assert_allclose(data[..., :48], ref_data[..., :48], rtol=1e-4, atol=1e-4 * np.abs(ref_data).max(),
                                   err_msg=name)
