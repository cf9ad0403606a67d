"""The denoising stage: what MP-PCA can do on a grid, that it lowers the error against a phantom's truth,
that it agrees with MRtrix3's dwidenoise, the engine's --denoise and the denoise-then-predict baselines."""

import shutil
import warnings

import numpy as np
import pytest

from qid2_diffusers.denoise import DENOISERS, denoise_series, plan_denoising
from qid2_diffusers.errors import QID2InputWarning
from qid2_diffusers.evaluation.metrics import tensor_metrics
from qid2_diffusers.tensor import fit_tensor


@pytest.fixture(scope="module")
def phantom():
    """A seeded 2.5 mm phantom, 40 x 40 x 10 central voxels, 18 b0 + 30 kept of its 90 b=1000 directions, with its truth."""
    from qid2_diffusers.data.io import split_acquired
    from qid2_diffusers.data.phantom import make_subject
    from qid2_diffusers.gradients import split_scheme

    s = make_subject(7, slab=10)
    b0, dw = split_scheme(s.bvals)
    keep = np.sort(np.concatenate([b0, dw[split_acquired(s.bvecs[dw], 30)[0]]]))
    cx, cy = s.dwi.shape[0] // 2, s.dwi.shape[1] // 2
    box = (slice(cx - 20, cx + 20), slice(cy - 20, cy + 20))  # the central 40 x 40 voxels: brain, a quick test
    return {"dwi": np.asarray(s.dwi[box][..., keep], dtype=np.float32),
            "signal": np.asarray(s.signal[box][..., keep]), "bvals": s.bvals[keep], "bvecs": s.bvecs[keep],
            "mask": np.asarray(s.mask[box], dtype=bool)}


def _fa_error(data, p):
    truth = fit_tensor(p["signal"], p["bvals"], p["bvecs"], p["mask"], fit_method="OLS")
    return tensor_metrics(fit_tensor(data, p["bvals"], p["bvecs"], p["mask"]), truth, p["mask"])["fa_mae"]


def test_plan_picks_cubes_then_in_plane_patches_then_nothing():
    bvals = np.r_[np.zeros(6), np.full(42, 1000.0)]  # 48 volumes
    cube = plan_denoising((40, 40, 20, 48), bvals)
    assert cube.method == "mppca" and cube.patch_radius == (2, 2, 2) and not cube.fell_back  # 125 > 48 voxels
    many = plan_denoising((40, 40, 20, 160), np.r_[np.zeros(10), np.full(150, 1000.0)])
    assert many.patch_radius == (3, 3, 3)  # 7^3 = 343 > 160 > 125
    thin = plan_denoising((40, 40, 2, 48), bvals)
    assert thin.method == "mppca" and thin.patch_radius == (3, 3, 0) and thin.fell_back  # 7x7 = 49 > 48
    assert "in-plane 7x7x1" in thin.note and "2 slice(s)" in thin.note
    tiny = plan_denoising((6, 8, 9, 28), bvals[:28])  # the real b=3000 crop: no grid two patches wide
    assert tiny.method == "none" and tiny.fell_back and len(tiny.volumes) == 0
    assert tiny.note.startswith("not denoised") and "6x8x9" in tiny.note and "\n" not in tiny.note
    # A single b0 is denoised with the rest (benchmarks/results/denoise/rules.txt: it helped every real case);
    # a thin single-b0 series gets in-plane patches, said in its note.
    one_b0 = plan_denoising((15, 15, 2, 18), np.r_[0.0, np.full(17, 2800.0)])
    assert one_b0.method == "mppca" and 0 in one_b0.volumes and one_b0.patch_radius == (2, 2, 0)
    assert "in-plane 5x5x1" in one_b0.note
    none = plan_denoising((40, 40, 20, 48), bvals, "none")
    assert none.method == "none" and not none.fell_back
    usable = np.ones(48, dtype=bool)
    usable[[3, 40]] = False
    assert 3 not in plan_denoising((40, 40, 20, 48), bvals, usable=usable).volumes
    with pytest.raises(ValueError, match="unknown denoiser"):
        plan_denoising((40, 40, 20, 48), bvals, "nlmeans")
    assert set(DENOISERS) == {"mppca", "dwidenoise", "patch2self", "none"}
    assert plan_denoising((40, 40, 20, 48), bvals, "dwidenoise").patch_radius == (2, 2, 2)  # the same patches


def test_dwidenoise_without_mrtrix_is_a_one_line_error(monkeypatch, tmp_path):
    import qid2_diffusers.denoise as denoise
    from qid2_diffusers.errors import QID2InputError
    from qid2_diffusers.inference import upsample_dwi

    monkeypatch.setattr(denoise.shutil, "which", lambda name: None)
    assert "dwidenoise" not in denoise.available_denoisers() and "mppca" in denoise.available_denoisers()
    with pytest.raises(ValueError, match="needs MRtrix3's dwidenoise on the PATH"):
        denoise_series(np.ones((12, 12, 12, 20), np.float32), np.r_[0.0, np.full(19, 1000.0)], "dwidenoise")
    with pytest.raises(QID2InputError, match="needs MRtrix3's dwidenoise") as info:
        upsample_dwi(None, None, None, denoise="dwidenoise")  # said before the series is touched
    assert "\n" not in str(info.value)


def test_mppca_lowers_the_fa_error_against_the_truth(phantom):
    raw = _fa_error(phantom["dwi"], phantom)
    result = denoise_series(phantom["dwi"], phantom["bvals"], "mppca", mask=phantom["mask"])
    assert result.plan.method == "mppca" and result.data.shape == phantom["dwi"].shape
    den = _fa_error(result.data, phantom)
    assert den < 0.9 * raw, (den, raw)  # 0.0224 against 0.0256
    # MP-PCA's noise map: the phantom's noise level (the spread of acquired minus noise-free signal), within
    # 20 %, inside the brain (33.5 against 34.3 here).
    assert result.sigma is not None and result.sigma.shape == phantom["mask"].shape
    m, dw = phantom["mask"], phantom["bvals"] > 50
    noise = np.std((phantom["dwi"] - phantom["signal"])[m][:, dw])
    assert 0.8 < np.median(result.sigma[m]) / noise < 1.2
    # The input is not modified; the same call gives the same output.
    again = denoise_series(phantom["dwi"], phantom["bvals"], "mppca", mask=phantom["mask"])
    np.testing.assert_array_equal(result.data, again.data)
    assert not np.array_equal(result.data, phantom["dwi"])


def test_voxels_outside_the_brain_box_are_kept_as_acquired(phantom):
    mask = np.zeros_like(phantom["mask"])
    mask[15:25, 15:25, 3:7] = True
    data = phantom["dwi"]
    result = denoise_series(data, phantom["bvals"], "mppca", mask=mask)
    changed = np.any(result.data != data, axis=-1)
    assert changed[15:25, 15:25, 3:7].all()
    # The box is the mask's, widened by 7 voxels: nothing changes beyond it.
    assert not changed[:8].any() and not changed[32:].any() and not changed[:, :8].any() and not changed[:, 32:].any()


def test_mppca_on_the_brain_and_in_parallel_gives_the_whole_box_values(phantom, monkeypatch):
    """Patches centred on the mask (widened by the radius) and split over worker processes along z: every
    brain voxel gets exactly what one dipy run over the whole box gives it; voxels out of reach stay as acquired."""
    from dipy.denoise.localpca import mppca

    import qid2_diffusers.denoise as denoise

    data, m = phantom["dwi"], phantom["mask"].copy()
    m[:, :, :3] = False  # a brain that leaves some of the grid beyond the patches' reach
    m[:6] = False
    whole = mppca(data, patch_radius=2, return_sigma=True, suppress_warning=True)
    monkeypatch.setattr(denoise, "MIN_VOXELS_PER_WORKER", 100)  # this small grid split over 2 processes
    split = denoise.denoise_series(data, phantom["bvals"], "mppca", mask=m, workers=2)
    assert split.plan.patch_radius == (2, 2, 2)
    np.testing.assert_allclose(split.data[m], whole[0][m], rtol=1e-5, atol=1e-3)
    np.testing.assert_allclose(split.sigma[m], whole[1][m], rtol=1e-5, atol=1e-3)
    reach = denoise.patch_centres(m, (2, 2, 2))
    assert reach[:, :, 0].sum() == 0 and reach[:, :, 1].any()  # widened by 2 slices, no further
    np.testing.assert_array_equal(split.data[~reach], data[~reach])
    assert (split.sigma[~reach] == 0).all()
    one = denoise.denoise_series(data, phantom["bvals"], "mppca", mask=m, workers=1)
    np.testing.assert_array_equal(one.data, split.data)


@pytest.mark.slow  # two MP-PCA implementations, one of them a subprocess
@pytest.mark.skipif(shutil.which("dwidenoise") is None, reason="MRtrix3 is installed by scripts/setup.sh --test")
def test_dipy_mppca_agrees_with_mrtrix_dwidenoise(phantom):
    dipy = denoise_series(phantom["dwi"], phantom["bvals"], "mppca", mask=phantom["mask"])
    mrtrix = denoise_series(phantom["dwi"], phantom["bvals"], "dwidenoise", mask=phantom["mask"])
    assert mrtrix.plan.method == "dwidenoise" and "MRtrix3 dwidenoise" in mrtrix.plan.note
    m = phantom["mask"]
    # Same estimator (Veraart 2016, dwidenoise -estimator Exp1), two implementations: dipy averages the
    # overlapping patches' estimates of a voxel, dwidenoise keeps each patch's centre. Images agree within
    # 2 % of the signal; both lower the FA error against the truth, dipy's by more (0.0224 vs 0.0241 here,
    # the raw series 0.0256; sigma 33.5 in both), so dipy stays the default.
    rel = np.abs(dipy.data[m] - mrtrix.data[m]).mean() / np.abs(phantom["dwi"][m]).mean()
    assert rel < 0.02, rel
    raw, a, b = _fa_error(phantom["dwi"], phantom), _fa_error(dipy.data, phantom), _fa_error(mrtrix.data, phantom)
    assert a < b < 0.95 * raw, (a, b, raw)


def test_denoised_baseline_scores_its_denoised_kept_volumes(phantom):
    from qid2_diffusers.baselines import DTIUpsampler, method_label, split_method
    from qid2_diffusers.evaluation import SubjectEvaluation

    assert split_method("mppca+dti") == ("mppca", "dti") and split_method("sh4") == (None, "sh4")
    assert method_label("mppca+qid2", 3) == "MP-PCA + QID² (R=3)"
    with pytest.raises(ValueError, match="unknown method"):
        split_method("nlm+dti")
    # --denoise expands the plain methods; one named with its denoiser is run once, as named.
    from qid2_diffusers.evaluation.benchmark import BenchmarkConfig, _method_rows

    rows = _method_rows(BenchmarkConfig(data="d", out="o", methods=["dti", "mppca+sh4"], denoise=["none", "mppca"]))
    assert [(r["key"], r["label"]) for r in rows] == [("dti", "DTI-predict"), ("mppca+dti", "MP-PCA + DTI-predict"),
                                                     ("mppca+sh4", "MP-PCA + SH (order 4)")]
    # Score a known split: 10 of the 30 kept directions are the targets here.
    p = phantom
    dw = np.flatnonzero(p["bvals"] > 50)
    targets, low = dw[::3], np.setdiff1d(np.arange(len(p["bvals"])), dw[::3])
    ev = SubjectEvaluation(p["dwi"], p["bvals"], p["bvecs"], p["mask"], truth=p["signal"])
    den = denoise_series(p["dwi"][..., low], p["bvals"][low], "mppca", mask=p["mask"]).data
    pred = DTIUpsampler().predict(den, p["bvals"][low], p["bvecs"][low], p["bvecs"][targets], p["mask"])
    with_kept = ev.score(pred, p["bvecs"][targets], kept=(low, den))["truth"]["fa_mae"]
    raw_kept = ev.score(pred, p["bvecs"][targets])["truth"]["fa_mae"]
    combined = ev.combine(pred, p["bvecs"][targets], kept=(low, den))
    np.testing.assert_array_equal(combined[..., low], den)
    assert with_kept < raw_kept


def test_engine_denoise_none_is_todays_path_and_mppca_changes_only_the_brain_box(tmp_path, tiny_prior_model_dir,
                                                                                 phantom_slab):
    from qid2_diffusers.data.io import DWI
    from qid2_diffusers.hub import load_pipeline
    from qid2_diffusers.inference import upsample_dwi

    p = phantom_slab
    keep = np.r_[np.flatnonzero(p["bvals"] < 50), np.flatnonzero(p["bvals"] > 50)[:30]]
    dwi = DWI(data=p["dwi"][..., keep], bvals=p["bvals"][keep], bvecs=p["bvecs"][keep], affine=p["affine"],
              mask=p["mask"])
    pipe = load_pipeline(tiny_prior_model_dir, scheduler="ddim")
    targets = p["bvecs"][np.flatnonzero(p["bvals"] > 50)[30:36]]
    kwargs = dict(num_inference_steps=1, seed=0, progress=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        none = upsample_dwi(dwi, targets, pipe, denoise="none", **kwargs)
        mppca = upsample_dwi(dwi, targets, pipe, denoise="mppca", **kwargs)
    # --denoise none: the input volumes are written untouched (today's path).
    np.testing.assert_array_equal(none.data[..., : none.n_input], dwi.data)
    assert none.denoise_note == "not denoised (--denoise none)"
    # mppca on a 2-slice slab: in-plane patches, said in one warning line and in the result.
    assert "in-plane" in mppca.denoise_note and mppca.denoise_note.startswith("denoised 48 volumes")
    lines = [str(w.message) for w in caught if issubclass(w.category, QID2InputWarning)]
    assert any("in-plane" in line for line in lines)
    assert not np.array_equal(mppca.data[..., : mppca.n_input], dwi.data)
    assert not np.array_equal(mppca.data[..., mppca.n_input :], none.data[..., none.n_input :])
    assert mppca.timings["denoise"] > 0
