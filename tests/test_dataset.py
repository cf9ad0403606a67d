import json
import pickle

import numpy as np
import pytest
import torch

from qid2_diffusers.data.augment import rotate_bvecs, warp_slices
from qid2_diffusers.data.dataset import QID2Dataset, build_cache
from qid2_diffusers.data.io import DWI, save_dwi, shell_indices, split_acquired
from qid2_diffusers.data.layouts import discover_subjects
from qid2_diffusers.directions import nearest_references, uniform_directions
from qid2_diffusers.errors import QID2InputError
from qid2_diffusers.normalization import denormalize, reference_scale

SHAPE = (16, 20, 5)


def ellipse(h, w, angle_degrees, semi_major, semi_minor):
    """Boolean (h, w) ellipse whose major axis turns from rows towards columns by the angle."""
    a, b = np.meshgrid(np.arange(h) - (h - 1) / 2, np.arange(w) - (w - 1) / 2, indexing="ij")
    t = np.deg2rad(angle_degrees)
    along = a * np.cos(t) + b * np.sin(t)
    across = -a * np.sin(t) + b * np.cos(t)
    return (along / semi_major) ** 2 + (across / semi_minor) ** 2 <= 1.0


def orientation_degrees(mask: np.ndarray) -> float:
    """Major-axis angle of a 2D blob from its second moments, rows towards columns."""
    a, b = np.nonzero(mask)
    a, b = a - a.mean(), b - b.mean()
    return float(np.degrees(0.5 * np.arctan2(2 * np.mean(a * b), np.mean(a * a) - np.mean(b * b))))


def wrap180(angle):
    return (angle + 90.0) % 180.0 - 90.0


@pytest.fixture(scope="module")
def subject(scheme90):
    """3 b0 + 90 directions at b = 1000 + 6 at b = 2000, brain in slices 1..3."""
    rng = np.random.default_rng(0)
    bvals = np.r_[0, np.full(45, 1000.0), np.full(3, 2000.0), 5, np.full(45, 1000.0), np.full(3, 2000.0), 0]
    bvecs = np.zeros((len(bvals), 3))
    bvecs[bvals == 1000] = scheme90
    bvecs[bvals == 2000] = uniform_directions(6)
    mask = np.zeros(SHAPE, bool)
    mask[2:14, 3:17, 1:4] = ellipse(12, 14, 0, 6, 7)[..., None]
    s0 = np.where(mask, 800.0, 0.0) + 20.0
    att = np.where(bvals[None, None, None] > 50, rng.uniform(0.2, 0.6, (1, 1, 1, len(bvals))), 1.0)
    data = (s0[..., None] * att * rng.uniform(0.9, 1.1, SHAPE + (len(bvals),))).astype(np.float32)
    return DWI(data=data, bvals=bvals, bvecs=bvecs, affine=np.diag([-2.0, 2.0, 2.0, 1.0]), mask=mask, path=None)


@pytest.fixture(scope="module")
def cache(subject, tmp_path_factory):
    return build_cache(subject, tmp_path_factory.mktemp("cache"), subject_id="s1")


def test_cache_holds_the_shell_slice_by_slice(subject, cache, scheme90):
    members = shell_indices(subject.bvals, 1000)
    slices = np.load(cache / "slices.npy", mmap_mode="r")
    assert slices.dtype == np.float16 and slices.shape == (5, 90, 16, 20)
    expected = np.moveaxis(subject.data[..., members], (2, 3), (0, 1))
    np.testing.assert_allclose(slices, expected, rtol=1e-3)
    meta = json.loads((cache / "meta.json").read_text())
    acquired, targets = split_acquired(scheme90, 30)
    assert meta["acquired"] == acquired.tolist() and meta["targets"] == targets.tolist()
    assert len(meta["targets"]) == 60
    assert meta["brain_slices"] == [1, 2, 3]
    assert meta["unit"] == 1.0
    np.testing.assert_array_equal(np.load(cache / "mask.npy"), np.moveaxis(subject.mask, 2, 0))


def test_items_are_normalised_target_and_nearest_acquired_references(subject, cache, scheme90):
    ds = QID2Dataset([cache], num_references=3)
    assert len(ds) == 3 * 60
    members = shell_indices(subject.bvals, 1000)
    acquired, targets = split_acquired(scheme90, 30)
    for index in (0, 59, 60, 137, 179):
        item = ds[index]
        _, z, target = ds.locate(index)
        assert item["target"].shape == (1, 16, 20) and item["references"].shape == (3, 16, 20)
        assert all(v.dtype == torch.float32 for v in item.values())
        refs = acquired[nearest_references(scheme90[target], scheme90[acquired], 3)]
        assert target in targets and z in (1, 2, 3)
        np.testing.assert_allclose(item["target_bvec"], scheme90[target], atol=1e-6)
        np.testing.assert_allclose(item["reference_bvecs"], scheme90[refs], atol=1e-6)
        raw_refs = torch.from_numpy(subject.data[:, :, z, members[refs]]).permute(2, 0, 1)
        raw_target = torch.from_numpy(subject.data[:, :, z, members[target]])[None]
        np.testing.assert_allclose(item["scale"], reference_scale(raw_refs[None])[0], rtol=2e-3)
        np.testing.assert_allclose(denormalize(item["target"], item["scale"]), raw_target, rtol=2e-3, atol=1e-2)
        np.testing.assert_allclose(denormalize(item["references"], item["scale"]), raw_refs, rtol=2e-3, atol=1e-2)
        np.testing.assert_array_equal(item["mask"][0].numpy(), subject.mask[:, :, z])
    # The target never serves as its own reference, nor does any other target.
    assert not set(ds.subjects[0].references.ravel()) & set(targets)


def test_float16_overflow_is_avoided_with_a_power_of_two_unit(subject, tmp_path):
    bright = DWI(**{**subject.__dict__, "data": subject.data * 1e4})
    cache = build_cache(bright, tmp_path, subject_id="bright")
    meta = json.loads((cache / "meta.json").read_text())
    assert meta["unit"] > 1 and np.log2(meta["unit"]) == int(np.log2(meta["unit"]))
    assert np.isfinite(np.load(cache / "slices.npy")).all()
    item = QID2Dataset([cache], 3)[5]
    _, z, target = QID2Dataset([cache], 3).locate(5)
    raw = bright.data[:, :, z, shell_indices(bright.bvals, 1000)[target]]
    np.testing.assert_allclose(denormalize(item["target"], item["scale"])[0], raw, rtol=2e-3, atol=1.0)


def test_cache_is_reused_and_rebuilt_when_stale(subject, tmp_path):
    root = tmp_path / "hcp"
    d = root / "100307" / "T1w" / "Diffusion"
    save_dwi(d / "data", subject.data, subject.bvals, subject.bvecs, subject.affine)
    (d / "data.bval").rename(d / "bvals")
    (d / "data.bvec").rename(d / "bvecs")
    (sub,) = discover_subjects(root)
    first = build_cache(sub, tmp_path / "cache")
    assert first.name == "100307_b1000_acq30_axis2"
    stamp = (first / "slices.npy").stat().st_mtime_ns
    assert build_cache(sub, tmp_path / "cache") == first
    assert (first / "slices.npy").stat().st_mtime_ns == stamp
    other = build_cache(sub, tmp_path / "cache", n_acquired=20)
    assert other != first and len(json.loads((other / "meta.json").read_text())["acquired"]) == 20
    bvals = subject.bvals.copy()
    bvals[1] = 1001.0
    np.savetxt(d / "bvals", bvals[None])
    assert build_cache(sub, tmp_path / "cache") == first
    assert (first / "slices.npy").stat().st_mtime_ns != stamp
    assert json.loads((first / "meta.json").read_text())["shell_bvals"][0] == 1001.0
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == sorted([first.name, other.name])  # no temporaries
    # Without a mask file, the mask comes from the mean b0 (median_otsu).
    found = np.load(first / "mask.npy")[2]
    assert found[8, 10] == 1 and found[0, 0] == 0 and found[15, 19] == 0


def test_bad_requests_name_the_problem(subject, cache, tmp_path):
    with pytest.raises(QID2InputError, match=r"no b=3000 shell; shells present: b=1000 \(90 volumes\), b=2000"):
        build_cache(subject, tmp_path, shell=3000)
    with pytest.raises(QID2InputError, match="the b=2000 shell has 6 directions; cannot keep 30"):
        build_cache(subject, tmp_path, shell=2000)
    with pytest.raises(QID2InputError) as info:
        QID2Dataset([cache], num_references=31)
    assert str(info.value).startswith(f"{cache}: only 30 acquired directions, fewer than the R = 31")
    with pytest.raises(QID2InputError, match="not a QID2 training cache"):
        QID2Dataset([tmp_path], 3)


def test_augmentation_is_reproducible_and_keeps_directions_unit(cache):
    plain = QID2Dataset([cache], 3)
    aug = QID2Dataset([cache], 3, augment=True, seed=0)
    again = QID2Dataset([cache], 3, augment=True, seed=0)
    other = QID2Dataset([cache], 3, augment=True, seed=1)
    a, b, c, p = aug[17], again[17], other[17], plain[17]
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0)
    assert not torch.equal(a["target"], c["target"])
    assert not torch.equal(a["target"], p["target"])
    aug.set_epoch(1)
    assert not torch.equal(aug[17]["target"], a["target"])
    # A rotation keeps lengths and the angles between target and references.
    np.testing.assert_allclose(torch.linalg.norm(a["reference_bvecs"], dim=1), 1.0, atol=1e-6)
    cosines = [d["reference_bvecs"] @ d["target_bvec"] for d in (a, p)]
    np.testing.assert_allclose(*cosines, atol=1e-6)
    assert set(np.unique(a["mask"].numpy())) <= {0.0, 1.0}


def test_dataset_pickles_without_the_data(cache):
    ds = QID2Dataset([cache], 3, augment=True)
    ds[0]  # maps the arrays in this process
    blob = pickle.dumps(ds)
    assert len(blob) < 100_000
    clone = pickle.loads(blob)
    for key, value in ds[42].items():
        torch.testing.assert_close(clone[42][key], value, rtol=0, atol=0)


@pytest.mark.parametrize("axis,det_sign", [(2, -1.0), (2, 1.0), (0, -1.0), (1, 1.0)])
def test_augmented_images_and_bvecs_turn_together(axis, det_sign, scheme90, tmp_path):
    h, w, n = 64, 76, 2
    plane = ellipse(h, w, 30.0, 27, 9)
    mask = np.moveaxis(np.repeat(plane[..., None], n, axis=2), 2, axis)
    bvals = np.r_[0.0, 0.0, np.full(90, 1000.0)]
    bvecs = np.r_[np.zeros((2, 3)), scheme90]
    data = np.random.default_rng(0).uniform(100, 200, mask.shape + (92,)).astype(np.float32)
    affine = np.diag([2.0 * det_sign, 2.0, 2.0, 1.0])
    cache = build_cache(DWI(data=data, bvals=bvals, bvecs=bvecs, affine=affine, mask=mask), tmp_path, axis=axis)
    plain = QID2Dataset([cache], 3)
    aug = QID2Dataset([cache], 3, augment=True, seed=3)
    signs = np.array([-det_sign, 1.0, 1.0])  # FSL flips x when det > 0
    in_plane = [d for d in range(3) if d != axis]
    turns = []
    for index in np.random.default_rng(1).choice(len(plain), 6, replace=False):
        p, a = plain[int(index)], aug[int(index)]
        assert a["mask"].shape == (1, h, w)
        image_turn = wrap180(orientation_degrees(a["mask"][0].numpy()) - orientation_degrees(p["mask"][0].numpy()))
        before = torch.cat([p["target_bvec"][None], p["reference_bvecs"]]).numpy() * signs
        after = torch.cat([a["target_bvec"][None], a["reference_bvecs"]]).numpy() * signs
        np.testing.assert_allclose(after[:, axis], before[:, axis], atol=1e-6)  # about the slice normal
        k = int(np.argmax(np.linalg.norm(before[:, in_plane], axis=1)))
        (x0, y0), (x1, y1) = before[k, in_plane], after[k, in_plane]
        bvec_turn = np.degrees(np.arctan2(x0 * y1 - y0 * x1, x0 * x1 + y0 * y1))
        assert abs(image_turn - bvec_turn) < 2.0, (image_turn, bvec_turn)
        assert abs(bvec_turn) <= 15.0 + 1e-6
        turns.append(bvec_turn)
    assert np.ptp(turns) > 5.0  # the angles really vary


def _fit_band(angle, scale, bvec_angle, signs_in_data, signs_assumed):
    """Rotate a slice holding a fibre band, fit tensors, return (band axis, fitted fibre angle) in degrees."""
    from dipy.core.gradients import gradient_table
    from dipy.reconst.dti import TensorModel

    size, band_angle = 40, 20.0
    bvecs = np.r_[np.zeros((1, 3)), uniform_directions(30)]
    bvals = np.r_[0.0, np.full(30, 1000.0)]
    band = ellipse(size, size, band_angle, 100, 5)
    t = np.deg2rad(band_angle)
    fibre = np.array([np.cos(t), np.sin(t), 0.0])  # voxel frame, in-plane
    d_band = 0.3e-3 * np.eye(3) + 1.4e-3 * np.outer(fibre, fibre)
    g = bvecs * signs_in_data  # the file's bvecs are FSL; the tissue lives in voxels
    adc = np.where(band[..., None], np.einsum("ni,ij,nj->n", g, d_band, g), 0.8e-3)
    signal = 1000.0 * np.exp(-bvals * adc)
    warped, _ = warp_slices(torch.from_numpy(signal).permute(2, 0, 1).float(), angle, scale)
    warped = warped.permute(1, 2, 0).numpy()[:, :, None, :]
    turned = rotate_bvecs(bvecs, bvec_angle, axis=2, voxel_signs=signs_assumed)
    fit = TensorModel(gradient_table(bvals, bvecs=turned)).fit(warped)
    inside = ellipse(size, size, 0, 12, 12) & (fit.fa[:, :, 0] > 0.5)
    e1 = fit.evecs[:, :, 0, :, 0][inside] * signs_in_data
    fitted = np.median(wrap180(np.degrees(np.arctan2(e1[:, 1], e1[:, 0]))))
    return orientation_degrees(inside), fitted


@pytest.mark.parametrize("signs", [np.array([1.0, 1.0, 1.0]), np.array([-1.0, 1.0, 1.0])])
def test_rotation_keeps_tensor_fit_consistent(signs):
    geometry, fitted = _fit_band(15.0, 1.0, 15.0, signs, signs)
    assert abs(wrap180(geometry - 35.0)) < 3.0  # the band turned by +15 degrees from 20
    assert abs(wrap180(fitted - 35.0)) < 3.0  # and so did the fitted fibre direction
    geometry, fitted = _fit_band(-12.0, 1.08, -12.0, signs, signs)
    assert abs(wrap180(fitted - 8.0)) < 3.0 and abs(wrap180(geometry - 8.0)) < 3.0
    # Turning the b-vectors the wrong way leaves fibres 30 degrees off their band.
    geometry, fitted = _fit_band(15.0, 1.0, -15.0, signs, signs)
    assert abs(wrap180(fitted - geometry)) > 25.0
    if signs[0] < 0:  # ignoring FSL's x flip on a neurological image is the same mistake
        geometry, fitted = _fit_band(15.0, 1.0, 15.0, signs, np.ones(3))
        assert abs(wrap180(fitted - geometry)) > 25.0


def test_concurrent_builders_of_one_cache_agree(subject, tmp_path):
    # Training processes launched together build the same cache at once.
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(4) as pool:
        folders = list(pool.map(lambda _: build_cache(subject, tmp_path / "cache", subject_id="s"), range(4)))
    assert len(set(folders)) == 1
    assert [p.name for p in (tmp_path / "cache").iterdir()] == [folders[0].name]  # no temporaries left
    ds = QID2Dataset([folders[0]], num_references=3)
    assert torch.isfinite(ds[0]["target"]).all()


def test_slices_of_other_sizes_batch_together_with_masked_padding(scheme90, tmp_path):
    from torch.utils.data import DataLoader

    from qid2_diffusers.data.dataset import collate_slices

    caches = []
    for name, shape in (("small", (10, 12, 3)), ("large", (16, 20, 3))):
        rng = np.random.default_rng(1)
        bvals = np.r_[0, np.full(90, 1000.0)]
        bvecs = np.vstack([np.zeros(3), scheme90])
        data = rng.uniform(100, 200, shape + (91,)).astype(np.float32)
        mask = np.ones(shape, bool)
        caches.append(build_cache(DWI(data=data, bvals=bvals, bvecs=bvecs, affine=np.eye(4), mask=mask, path=None),
                                  tmp_path, subject_id=name))
    dataset = QID2Dataset(caches, num_references=3)
    small, large = dataset[0], dataset[len(dataset) - 1]
    batch = collate_slices([small, large])
    assert batch["target"].shape == (2, 1, 16, 20) and batch["references"].shape == (2, 3, 16, 20)
    assert torch.equal(batch["target"][0, :, :10, :12], small["target"])
    assert torch.all(batch["target"][0, :, 10:] == -1) and torch.all(batch["mask"][0, :, :, 12:] == 0)
    assert batch["mask"][0].sum() == 10 * 12 and torch.equal(batch["target"][1], large["target"])
    assert batch["target_bvec"].shape == (2, 3)
    # A loader over both subjects batches without error.
    loader = DataLoader(dataset, batch_size=8, shuffle=True, collate_fn=collate_slices,
                        generator=torch.Generator().manual_seed(0))
    assert next(iter(loader))["target"].shape[0] == 8


def test_a_cache_with_the_prior_serves_models_without_it(subject, tmp_path):
    with_prior = build_cache(subject, tmp_path, subject_id="s1", prior=True)
    assert build_cache(subject, tmp_path, subject_id="s1") == with_prior
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.startswith(".")) == [with_prior.name]
    plain, prior = QID2Dataset(with_prior, num_references=3), QID2Dataset(with_prior, num_references=3, physics_prior=True)
    assert "prior" not in plain[0] and torch.equal(plain[0]["target"], prior[0]["target"])


def test_cache_of_denoised_inputs_and_noise_free_targets(written_phantom, tmp_path):
    """``denoise``: the kept directions (and the prior fit on them) come from the MP-PCA of b0s + kept
    directions, so they lie nearer the phantom's truth; ``target="truth"``: the targets are the truth."""
    import nibabel as nib

    from qid2_diffusers.data.phantom.writing import truth_file

    folder = written_phantom
    subject = discover_subjects(folder.parent)[0]
    raw = build_cache(subject, tmp_path / "cache", prior=True)
    clean = build_cache(subject, tmp_path / "cache", prior=True, denoise="mppca", target="truth")
    assert clean.name == raw.name.replace("_prior", "_mppca_truth_prior")
    meta = json.loads((clean / "meta.json").read_text())
    assert meta["params"]["denoise"] == "mppca" and meta["params"]["target"] == "truth"
    assert "denoise" not in json.loads((raw / "meta.json").read_text())["params"]  # raw caches keep their key
    truth = np.moveaxis(np.asarray(nib.load(truth_file(folder, "signal")).dataobj, dtype=np.float32), 2, 0)
    volumes, unit = np.asarray(meta["volume_indices"]), meta["unit"]
    brain = np.load(clean / "mask.npy").astype(bool)
    acquired, targets = np.asarray(meta["acquired"]), np.asarray(meta["targets"])

    def error(cache, columns, reference):
        planes = np.load(cache / "slices.npy")[:, columns].astype(np.float32) * unit
        return float(np.abs(np.moveaxis(planes, 1, -1) - reference)[brain].mean())

    signal = float(truth[brain].mean())
    kept_truth = truth[..., volumes[acquired]]
    assert error(clean, acquired, kept_truth) < 0.8 * error(raw, acquired, kept_truth)
    assert error(clean, targets, truth[..., volumes[targets]]) < 2e-3 * signal  # float16 rounding only
    assert error(raw, targets, truth[..., volumes[targets]]) > 0.02 * signal  # the acquisition is noisy
    prior_error = {c: float(np.abs(np.moveaxis(np.load(c / "prior.npy").astype(np.float32) * unit, 1, -1)
                                   - truth[..., volumes[targets]])[brain].mean()) for c in (raw, clean)}
    assert prior_error[clean] < prior_error[raw]
    with pytest.raises(QID2InputError, match="needs a subject folder written by `qid2 phantom`"):
        build_cache(subject.load(), tmp_path / "cache", target="truth")
