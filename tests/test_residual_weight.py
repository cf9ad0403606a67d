"""The residual weight: how much of a physics-prior network's correction to the tensor fit is kept, chosen on
the scan's own kept directions (``--residual-weight auto``) or fixed."""

import numpy as np
import torch
import pytest

from qid2_diffusers.pipelines import QID2Upsampler
from qid2_diffusers.pipelines.adaptation import least_squares_weight, residual_weight
from qid2_diffusers.pipelines.upsampler_qid2 import check_residual_weight


def test_least_squares_weight_recovers_a_known_share_and_clips():
    rng = np.random.default_rng(0)
    r = rng.normal(size=(40, 16, 16))
    mask = np.ones_like(r)
    assert least_squares_weight(r, 0.3 * r + 0.05 * rng.normal(size=r.shape), mask) == pytest.approx(0.3, abs=0.01)
    assert least_squares_weight(r, -r, mask) == 0.0  # a correction that points the wrong way is dropped
    assert least_squares_weight(r, 2 * r, mask) == 1.0  # never more than the network as trained
    assert least_squares_weight(np.zeros_like(r), r, mask) == 1.0  # nothing to weigh
    outside = mask.copy()
    outside[:, :8] = 0  # voxels outside the mask do not count
    e = np.where(outside > 0, 0.5 * r, -10 * r)
    assert least_squares_weight(r, e, outside) == pytest.approx(0.5)


def test_a_weight_within_the_noise_of_the_left_out_directions_is_dropped():
    rng = np.random.default_rng(1)
    r = rng.normal(size=(48, 16, 16))
    mask = np.ones_like(r)
    groups = np.repeat(np.arange(12), 4)  # 12 left-out directions x 4 slices
    # Each direction's error holds a share of the residual that varies from direction to direction
    # (0.03 on average, +-0.15: jackknife standard error 0.045).
    share = np.repeat(0.03 + 0.15 * np.tile([1.0, -1.0], 6), 4)[:, None, None]
    noisy = share * r + 0.05 * rng.normal(size=r.shape)
    plain = least_squares_weight(r, noisy, mask)
    assert 0 < plain < 0.1  # a small weight the directions disagree on...
    assert least_squares_weight(r, noisy, mask, groups=groups) == 0.0  # ...is not kept
    steady = 0.3 * r + 0.05 * rng.normal(size=r.shape)  # the same share in every direction: kept
    assert least_squares_weight(r, steady, mask, groups=groups) == pytest.approx(0.3, abs=0.01)
    tiny = 0.02 * r + 0.001 * rng.normal(size=r.shape)  # significant, but below MIN_RESIDUAL_WEIGHT (0.05): dropped
    assert least_squares_weight(r, tiny, mask) == pytest.approx(0.02, abs=0.002)
    assert least_squares_weight(r, tiny, mask, groups=groups) == 0.0


def test_check_residual_weight():
    assert check_residual_weight(None) == "auto" and check_residual_weight("0.25") == 0.25
    for bad in ("1.5", "-0.1", "half"):
        with pytest.raises(ValueError, match="'auto' or a number in \\[0, 1\\]"):
            check_residual_weight(bad)


@pytest.fixture(scope="module")
def scan(phantom_slab):
    p = phantom_slab
    b0, dw = np.flatnonzero(p["bvals"] < 50), np.flatnonzero(p["bvals"] > 50)
    keep = np.r_[b0, dw[:30]]
    return p["dwi"][..., keep], p["bvals"][keep], p["bvecs"][keep], p["bvecs"][dw[30:36]], p["mask"]


def test_the_output_is_the_prior_plus_the_weighted_residual(scan, tiny_prior_model_dir, tiny_pipeline):
    from qid2_diffusers.baselines import DTIUpsampler
    from qid2_diffusers.hub import load_pipeline

    data, bvals, bvecs, targets, mask = scan
    pipe = load_pipeline(tiny_prior_model_dir, scheduler="ddim")
    run = {w: QID2Upsampler(pipe, num_inference_steps=1, progress=False, residual_weight=w)
           for w in ("auto", 0.0, 1.0)}
    out = {w: up.predict(data, bvals, bvecs, targets, mask) for w, up in run.items()}
    # Weight 0 is the tensor fit's prediction (DTI-predict) exactly; the network's output is weight 1.
    np.testing.assert_allclose(out[0.0], DTIUpsampler().predict(data, bvals, bvecs, targets, mask), rtol=1e-5,
                               atol=1e-3)
    assert run[0.0].timings["sampling"] == 0.0 and run[1.0].timings["sampling"] > 0  # weight 0: no network pass
    w = run["auto"].applied_residual_weight
    assert 0.0 <= w <= 1.0 and run[1.0].applied_residual_weight == 1.0
    np.testing.assert_allclose(out["auto"], out[0.0] + np.float32(w) * (out[1.0] - out[0.0]), rtol=1e-4,
                               atol=1e-3 * np.abs(out[1.0]).max())
    # Choosing it is seeded and counts as adaptation to the scan.
    assert residual_weight(pipe, data, bvals, bvecs, mask, seed=0, num_inference_steps=1) == pytest.approx(w)
    assert run["auto"].timings["adaptation"] > 0 and "adaptation" not in run[1.0].timings
    # A model without the prior has no residual to weigh.
    with pytest.raises(ValueError, match="physics-prior"):
        residual_weight(tiny_pipeline, data, bvals, bvecs, mask)


def test_gate_terms_score_the_residual_against_the_reference_given(scan, tiny_prior_model_dir):
    """``gate_terms`` is ``residual_weight``'s least squares; with ``reference`` the error is taken against another
    series' left-out volumes (``benchmarks/gate_reference.py``: raw against denoised)."""
    from qid2_diffusers.hub import load_pipeline
    from qid2_diffusers.pipelines.adaptation import GATE_DEFAULTS, gate_terms, leave_one_out_examples

    data, bvals, bvecs, _, mask = scan
    pipe = load_pipeline(tiny_prior_model_dir, scheduler="ddim")
    examples = leave_one_out_examples(data, bvals, bvecs, mask, 3, physics_prior=True, **GATE_DEFAULTS)
    residual, error, weights, groups = gate_terms(pipe, examples, num_inference_steps=1)
    assert residual.shape == error.shape == weights.shape and len(np.unique(groups)) == GATE_DEFAULTS["max_directions"]
    assert least_squares_weight(residual, error, weights, groups=groups) == pytest.approx(
        residual_weight(pipe, data, bvals, bvecs, mask, num_inference_steps=1))
    # A reference whose left-out volumes are the prior plus 0.4 of the network's residual: weight 0.4 exactly.
    prior = examples["prior"][:, 0].numpy()
    made = {**examples, "target": examples["target"].clone()}
    made["target"][:, 0] = torch.from_numpy(prior + 0.4 * residual)
    again, against, _, _ = gate_terms(pipe, examples, reference=made, num_inference_steps=1)
    np.testing.assert_array_equal(again, residual)  # the prediction never sees the reference
    assert least_squares_weight(again, against, weights, groups=groups) == pytest.approx(0.4, abs=1e-4)
