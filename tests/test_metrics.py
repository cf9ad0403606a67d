"""Every metric against known values."""

import math

import numpy as np
import pytest

from qid2_diffusers.evaluation import (
    SubjectEvaluation,
    frechet_distance,
    image_metrics,
    match_volumes,
    nrmse,
    paired_tests,
    principal_angle_deg,
    psnr,
    ssim_per_slice,
    summarize,
    tensor_metrics,
)
from qid2_diffusers.evaluation.report import results_table, to_json
from qid2_diffusers.tensor import fit_tensor


def _volumes(shape=(20, 18, 3, 4), seed=0):
    rng = np.random.default_rng(seed)
    data = rng.uniform(100, 1000, size=shape).astype(np.float32)
    mask = np.zeros(shape[:3], bool)
    mask[2:18, 3:16] = True
    return data, mask


def test_identical_images_are_perfect():
    data, mask = _volumes()
    m = image_metrics(data, data, mask)
    assert m["ssim"] == pytest.approx(1.0) and m["ssim_std"] == pytest.approx(0.0)
    assert m["psnr"] == math.inf and m["nrmse"] == 0.0
    assert m["n_slices"] == 3 * 4


def test_known_psnr_and_nrmse():
    ref = np.full((10, 10, 2), 2.0)
    ref[0] = 0.0  # data range 2 inside the mask
    pred = ref + 0.1
    assert nrmse(pred, ref) == pytest.approx(math.sqrt(200 * 0.01) / math.sqrt(180 * 4))
    assert psnr(pred, ref) == pytest.approx(10 * math.log10(4 / 0.01))
    mask = np.zeros(ref.shape, bool)
    mask[1:] = True  # ref is 2 everywhere in the mask: NRMSE 0.1 / 2
    assert nrmse(pred, ref, mask) == pytest.approx(0.05)
    assert psnr(pred, ref, mask, data_range=1.0) == pytest.approx(20.0)


def test_ssim_only_sees_the_brain_and_skips_small_slices():
    data, mask = _volumes(shape=(20, 18, 3))
    noisy = data.copy()
    noisy[~mask] = 0.0  # a different background changes nothing
    assert ssim_per_slice(noisy, data, mask) == pytest.approx(np.ones(3))
    corrupted = data + np.random.default_rng(1).normal(0, 200, data.shape).astype(np.float32) * mask
    values = ssim_per_slice(corrupted, data, mask)
    assert values.shape == (3,) and np.all(values < 0.9)
    small = mask.copy()
    small[:, :, 1] = False
    small[5:8, 5:8, 1] = True  # 9 voxels: too few
    assert ssim_per_slice(corrupted, data, small).shape == (2,)
    assert ssim_per_slice(corrupted, data, small, min_mask_voxels=1).shape == (3,)


def test_ssim_matches_scikit_image_on_a_full_mask():
    from skimage.metrics import structural_similarity

    data, _ = _volumes(shape=(20, 18, 1))
    other = data * 0.8 + 50
    full = np.ones(data.shape, bool)
    _, smap = structural_similarity(data[..., 0], other[..., 0], data_range=900.0, full=True)
    assert ssim_per_slice(other, data, full, data_range=900.0)[0] == pytest.approx(smap.mean(), rel=1e-6)


def test_principal_angle_is_antipodal():
    v = np.array([[1.0, 0, 0], [0, 1, 0], [1, 1, 0]])
    w = np.array([[-1.0, 0, 0], [0, 0, 1], [1, 0, 0]])
    np.testing.assert_allclose(principal_angle_deg(v, w), [0.0, 90.0, 45.0], atol=1e-6)


def _tensor_phantom(shape=(12, 12, 2), seed=0):
    """Noise-free signal of a random tensor per voxel on a 2 b0 + 90 direction shell."""
    from qid2_diffusers.directions import uniform_directions

    rng = np.random.default_rng(seed)
    n = int(np.prod(shape))
    bvecs = np.r_[np.zeros((2, 3)), uniform_directions(90)]
    bvals = np.r_[0.0, 0.0, np.full(90, 1000.0)]
    rot = np.linalg.qr(rng.normal(size=(n, 3, 3)))[0]
    evals = np.stack([rng.uniform(0.9e-3, 2e-3, n), rng.uniform(0.2e-3, 0.8e-3, n), np.full(n, 0.2e-3)], axis=1)
    d = np.einsum("nij,nj,nkj->nik", rot, evals, rot)
    sig = 1000 * np.exp(-bvals[None] * np.einsum("mi,nij,mj->nm", bvecs, d, bvecs))
    return sig.reshape(*shape, -1).astype(np.float32), bvals, bvecs


def test_tensor_metrics_zero_for_identical_fits_and_known_for_a_shift():
    data, bvals, bvecs = _tensor_phantom()
    mask = np.ones(data.shape[:3], bool)
    maps = fit_tensor(data, bvals, bvecs, mask)
    m = tensor_metrics(maps, maps, mask, min_mask_voxels=1)
    assert m["fa_mae"] == 0.0 and m["md_mae"] == 0.0 and m["fa_ssim"] == pytest.approx(1.0)
    assert m["angular_error_deg"] == pytest.approx(0.0, abs=1e-3) and m["n_fibre_voxels"] > 0
    shifted = type(maps)(fa=maps.fa + 0.05, md=maps.md * 1.1, evecs=maps.evecs, fit=None)
    m = tensor_metrics(shifted, maps, mask, min_mask_voxels=1)
    assert m["fa_mae"] == pytest.approx(0.05, rel=1e-4)
    assert m["md_mae"] == pytest.approx(0.1 * maps.md.mean(), rel=1e-3)
    assert m["fa_ssim"] < 1.0


def test_subject_evaluation_of_the_true_volumes_is_perfect():
    data, bvals, bvecs = _tensor_phantom()
    mask = np.ones(data.shape[:3], bool)
    truth = data.copy()
    noisy = data + np.random.default_rng(2).normal(0, 20, data.shape).astype(np.float32)
    ev = SubjectEvaluation(noisy, bvals, bvecs, mask, truth=truth, min_mask_voxels=1)
    targets = bvecs[2:62]
    idx = np.arange(2, 62)
    # Shuffled, sign-flipped targets still land on their own volumes.
    order = np.random.default_rng(3).permutation(60)
    scores = ev.score(noisy[..., idx][..., order], -targets[order])
    assert scores["acquired"]["fa_mae"] == 0.0 and scores["acquired"]["ssim"] == pytest.approx(1.0)
    assert scores["truth"]["fa_mae"] > 0.0
    floor = ev.score_acquisition(targets)
    assert floor["fa_mae"] == pytest.approx(scores["truth"]["fa_mae"])
    perfect = ev.score(truth[..., idx], targets)["truth"]
    assert perfect["ssim"] == pytest.approx(1.0) and perfect["psnr"] == math.inf
    assert perfect["fa_mae"] > 0  # the 30 kept volumes are still noisy


def test_match_volumes_is_antipodal_and_rejects_missing_directions():
    from qid2_diffusers.directions import uniform_directions

    ref = uniform_directions(20)
    order = np.array([5, 0, 19, 3])
    np.testing.assert_array_equal(match_volumes(-ref[order], ref), order)
    # 5 degrees away from a direction of a 20-direction scheme (about 25 degrees apart).
    perp = np.cross(ref[0], [0.0, 0.0, 1.0])
    off = np.cos(np.radians(5)) * ref[0] + np.sin(np.radians(5)) * perp / np.linalg.norm(perp)
    with pytest.raises(ValueError, match="not in the reference, e.g. volume 1 .* 5.0 degrees away"):
        match_volumes(np.stack([ref[3], off]), ref)
    with pytest.raises(ValueError, match="same reference direction"):
        match_volumes(ref[[2, 2]], ref)


def test_summary_and_paired_tests():
    assert summarize([1.0, 2.0, 3.0, None, float("nan")]) == {"mean": 2.0, "std": 1.0, "n": 3}
    assert summarize([]) == {"mean": None, "std": None, "n": 0}
    a = [0.10, 0.12, 0.11, 0.13, 0.09]
    b = [0.20, 0.25, 0.19, 0.24, 0.18]
    t = paired_tests(a, b)
    from scipy import stats

    assert t["n"] == 5 and t["t_pvalue"] == pytest.approx(stats.ttest_rel(a, b).pvalue)
    assert t["wilcoxon_pvalue"] == pytest.approx(stats.wilcoxon(a, b).pvalue)
    small = paired_tests(a[:2], b[:2])
    assert small["t_pvalue"] is None and "at least 3" in small["note"]
    assert paired_tests(a, a)["note"] == "identical values in every subject"


def test_frechet_distance_known_values():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(4000, 3))
    assert frechet_distance(x, x) == pytest.approx(0.0, abs=1e-6)
    shift = np.array([1.0, 2.0, 0.0])
    assert frechet_distance(x, x + shift) == pytest.approx(5.0, rel=1e-6)
    # Two Gaussians N(0, I) and N(0, 4I) in 3D: 3 * (1 + 4 - 2*2) = 3.
    assert frechet_distance(x, 2 * rng.normal(size=(4000, 3))) == pytest.approx(3.0, rel=0.1)


def test_json_and_table_formatting():
    assert to_json({"psnr": math.inf, "x": np.float32(0.5), "n": np.int64(3)}) == {"psnr": None, "x": 0.5, "n": 3}
    rows = [
        ("A", {"acquired": {"fa_mae": summarize([0.02, 0.04])}}),
        ("B", {"acquired": {"fa_mae": summarize([0.05, 0.05])}}),
    ]
    table = results_table(rows, fid="n/a: reason", has_truth=False)
    lines = table.splitlines()
    assert lines[0].startswith("| Methods | Image FID ↓ | Image SSIM ↑ | FA Error ↓ | FA Map SSIM ↑")
    assert "| A | n/a | – | **0.030 ± 0.014** |" in lines[2]
    assert "| B | n/a | – | 0.050 ± 0.000 |" in lines[3]


def test_fid_with_a_torchscript_feature_extractor(tmp_path):
    import torch

    from qid2_diffusers.evaluation import inception_features, load_inception

    class Features(torch.nn.Module):
        """Stands in for Inception-v3: any TorchScript image -> feature vector model is used the same way."""

        def forward(self, x):
            return torch.nn.functional.adaptive_avg_pool2d(x, 2).flatten(1)

    path = tmp_path / "features.pt"
    with pytest.warns(DeprecationWarning):
        torch.jit.script(Features()).save(str(path))
    model = load_inception(path)
    data, mask = _volumes(shape=(20, 18, 3, 8))
    feats = inception_features(model, data, mask, data_range=1000.0)
    assert feats.shape == (3 * 8, 12)
    assert frechet_distance(feats, feats) == pytest.approx(0.0, abs=1e-3)
    darker = inception_features(model, data * 0.3, mask, data_range=1000.0)
    assert frechet_distance(darker, feats) > 100.0


def _fibres(angles, shape=(6, 6, 2)):
    """dipy ``multi_tensor`` signal of one fibre per voxel (``angles``: (theta, phi) in degrees), 2 b0 + 60 at b=3000."""
    from dipy.core.gradients import gradient_table
    from dipy.sims.voxel import multi_tensor

    from qid2_diffusers.directions import uniform_directions

    bvecs = np.r_[np.zeros((2, 3)), uniform_directions(60)]
    bvals = np.r_[0.0, 0.0, np.full(60, 3000.0)]
    gtab = gradient_table(bvals, bvecs=bvecs)
    evals = np.array([[1.7e-3, 0.3e-3, 0.3e-3]])
    signal = [multi_tensor(gtab, evals, S0=100, angles=[tuple(a)], fractions=[100], snr=None)[0] for a in angles]
    return np.stack(signal).reshape(*shape, -1).astype(np.float32), bvals, bvecs


@pytest.fixture(scope="module")
def fibre_voxels():
    rng = np.random.default_rng(0)
    angles = np.c_[np.degrees(np.arccos(rng.uniform(-1, 1, 72))), rng.uniform(0, 360, 72)]
    ref, bvals, bvecs = _fibres(angles)
    turned, _, _ = _fibres(np.c_[angles[:, 0], angles[:, 1] + 40])  # every fibre turned 40 degrees about z
    return ref, turned, bvals, bvecs


def test_angular_correlation_is_one_for_the_same_profile_and_lower_for_a_rotated_one(fibre_voxels):
    from qid2_diffusers.evaluation.metrics import angular_correlation

    ref, turned, _, bvecs = fibre_voxels
    mask = np.ones(ref.shape[:3], bool)
    for order in (6, 8):
        assert angular_correlation(ref[..., 2:], ref[..., 2:], bvecs[2:], mask, sh_order=order) == pytest.approx(1.0)
        # The l = 0 term is left out: a scaled profile is the same profile.
        assert angular_correlation(3 * ref[..., 2:], ref[..., 2:], bvecs[2:], mask, sh_order=order) == pytest.approx(1.0)
        assert angular_correlation(turned[..., 2:], ref[..., 2:], bvecs[2:], mask, sh_order=order) < 0.7
    assert np.isnan(angular_correlation(ref[..., 2:20], ref[..., 2:20], bvecs[2:20], mask, sh_order=6))


def test_csd_peak_error_is_zero_for_the_full_series_and_large_for_scrambled_directions(fibre_voxels):
    from qid2_diffusers.evaluation.metrics import HighBReference

    ref, turned, bvals, bvecs = fibre_voxels
    mask = np.ones(ref.shape[:3], bool)
    reference = HighBReference(ref, bvals, bvecs, mask, fit_tensor(ref, bvals, bvecs, mask).fa)
    same = reference.score(ref)
    assert same["csd_peak_error_deg"] == pytest.approx(0.0, abs=1e-6) and same["n_csd_voxels"] == 72
    assert same["acc_sh6"] == pytest.approx(1.0) and same["acc_sh8"] == pytest.approx(1.0)
    scrambled = ref.copy()
    scrambled[..., 2:] = ref[..., 2 + np.random.default_rng(1).permutation(60)]
    far = reference.score(scrambled)
    assert far["csd_peak_error_deg"] > 40 and far["acc_sh6"] < 0.3
    # A 40-degree turn about z moves the first peak by 40 degrees times sin(theta): on average about 31.
    assert 20 < reference.score(turned)["csd_peak_error_deg"] < 40
    few = HighBReference(ref, bvals, bvecs, mask, fit_tensor(ref, bvals, bvecs, mask).fa, max_voxels=10)
    assert few.score(scrambled)["n_csd_voxels"] == 10


def test_per_slice_fa_error_splits_the_case_value():
    from qid2_diffusers.evaluation.metrics import fa_error_per_slice

    rng = np.random.default_rng(0)
    ref = rng.uniform(0, 1, (5, 4, 3))
    pred = ref + rng.normal(0, 0.1, ref.shape)
    mask = np.ones(ref.shape, bool)
    mask[:, :, 1] = False  # a slice without brain is left out
    mask[0, 0, 2] = False
    per = fa_error_per_slice(pred, ref, mask)
    assert per["slice"] == [0, 2] and per["n_voxels"] == [20, 19]
    assert per["fa_mae"][0] == pytest.approx(np.abs(pred - ref)[:, :, 0].mean())
    assert np.average(per["fa_mae"], weights=per["n_voxels"]) == pytest.approx(np.abs(pred - ref)[mask].mean())
