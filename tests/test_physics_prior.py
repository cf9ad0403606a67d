"""The physics prior (tensor-fit prediction + mean b0 as condition channels) and b-value tokens."""

import numpy as np
import pytest
import torch

from qid2_diffusers import QID2Pipeline, build_pipeline
from qid2_diffusers.baselines import DTIUpsampler
from qid2_diffusers.data.dataset import QID2Dataset, build_cache
from qid2_diffusers.data.io import DWI, shell_indices, split_acquired
from qid2_diffusers.directions import uniform_directions
from qid2_diffusers.models import DirectionEncoder, direction_features
from qid2_diffusers.normalization import denormalize
from qid2_diffusers.tensor import TensorPrior
from qid2_diffusers import QID2Upsampler


def _zero_output(pipe: QID2Pipeline) -> QID2Pipeline:
    """A network whose every prediction is 0: with x0-prediction it adds nothing to the prior."""
    torch.nn.init.zeros_(pipe.unet.conv_out.weight)
    torch.nn.init.zeros_(pipe.unet.conv_out.bias)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def prior_pipeline():
    return _zero_output(build_pipeline("tiny", 3, "sample", seed=0, physics_prior=True, bval_conditioning=True))


def _tensor_volume(scheme, shape=(10, 12, 4), seed=0):
    """b0 x 3 + one b = 1000 shell of a smooth anisotropic tensor field, a little noise."""
    rng = np.random.default_rng(seed)
    bvals = np.r_[0, 0, 0, np.full(len(scheme), 1000.0)]
    bvecs = np.vstack([np.zeros((3, 3)), scheme])
    x = np.linspace(0, np.pi, shape[0])[:, None, None]
    e1 = np.stack(np.broadcast_arrays(np.cos(x), np.sin(x), 0 * x), axis=-1).astype(float) * np.ones(shape + (1,))
    d = 0.0003 * np.eye(3) + 0.0014 * e1[..., :, None] * e1[..., None, :]
    adc = np.einsum("ni,...ij,nj->...n", bvecs, d, bvecs)
    data = 800 * np.exp(-bvals * adc) * rng.uniform(0.98, 1.02, shape + (len(bvals),))
    return data.astype(np.float32), bvals, bvecs


def test_bval_tokens_carry_b_and_stay_sign_invariant():
    rng = np.random.default_rng(0)
    tb, rb = torch.tensor(rng.normal(size=(2, 3))), torch.tensor(rng.normal(size=(2, 3, 3)))
    tv, rv = torch.tensor([1000.0, 3000.0]), torch.full((2, 3), 2000.0)
    feats = direction_features(tb, rb, tv, rv)
    assert feats.shape == (2, 4, 8)
    np.testing.assert_allclose(feats[:, :, -1].numpy(), [[1, 2, 2, 2], [3, 2, 2, 2]])
    assert torch.equal(feats, direction_features(-tb, -rb, tv, rv))
    enc = DirectionEncoder(3, 16, 32, bval_conditioning=True)
    assert not torch.allclose(enc(tb.float(), rb.float(), tv, rv), enc(tb.float(), rb.float(), tv * 2, rv))
    with pytest.raises(ValueError, match="b-conditioned"):
        enc(tb.float(), rb.float())


def test_zero_network_returns_exactly_the_prior(prior_pipeline):
    rng = np.random.default_rng(1)
    refs = (rng.random((2, 3, 13, 18)) * 500).astype(np.float32)
    prior = (rng.random((2, 13, 18)) * 300).astype(np.float32)
    b0 = (rng.random((2, 13, 18)) * 900).astype(np.float32)
    out = prior_pipeline(refs, rng.normal(size=(2, 3, 3)), rng.normal(size=(2, 3)), prior_images=prior, b0_images=b0,
                         target_bvals=1000, reference_bvals=1000, num_inference_steps=1, generator=torch.manual_seed(0))
    np.testing.assert_allclose(out.images, prior, rtol=1e-5, atol=1e-3)


def test_prior_model_demands_its_conditions_and_saves_the_option(prior_pipeline, tmp_path):
    rng = np.random.default_rng(2)
    refs, rb, tb = rng.random((3, 8, 8)), rng.normal(size=(3, 3)), rng.normal(size=3)
    with pytest.raises(ValueError, match="b-conditioned"):
        prior_pipeline(refs, rb, tb, prior_images=refs[0], b0_images=refs[0])
    with pytest.raises(ValueError, match="prior images are required"):
        prior_pipeline(refs, rb, tb, target_bvals=1000, reference_bvals=1000)
    with pytest.raises(ValueError, match="like the references"):
        prior_pipeline(refs, rb, tb, prior_images=refs[0, :4], b0_images=refs[0], target_bvals=1000, reference_bvals=1000)
    prior_pipeline.save_pretrained(tmp_path)
    loaded = QID2Pipeline.from_pretrained(tmp_path)
    assert loaded.physics_prior and loaded.bval_conditioning and loaded.num_references == 3
    assert loaded.unet.config.in_channels == 1 + 3 + 2
    paper = build_pipeline("tiny", 3, seed=0)
    assert not paper.physics_prior and paper.unet.config.in_channels == 4
    with pytest.raises(ValueError, match="input channels"):
        QID2Pipeline(unet=paper.unet, direction_encoder=loaded.direction_encoder, scheduler=paper.scheduler,
                     physics_prior=True)


def test_tensor_prior_recovers_held_out_directions(scheme90):
    data, bvals, bvecs = _tensor_volume(scheme90)
    kept, held = split_acquired(scheme90, 30)
    idx = np.r_[0, 1, 2, 3 + kept]
    fit = TensorPrior(data[..., idx], bvals[idx], bvecs[idx])
    pred = fit.predict(scheme90[held])
    np.testing.assert_allclose(pred, data[..., 3 + held], rtol=0.06)
    one_slice = fit.predict(scheme90[held], (slice(None), slice(None), 2))
    np.testing.assert_array_equal(one_slice, pred[:, :, 2])
    np.testing.assert_allclose(fit.mean_b0, data[..., :3].mean(-1), rtol=1e-6)


@pytest.mark.slow  # 5 min on 2 cores: DTI-predict over every slice and target
def test_upsampler_with_a_zero_network_is_dti_predict(prior_pipeline, scheme90):
    data, bvals, bvecs = _tensor_volume(scheme90)
    kept, held = split_acquired(scheme90, 30)
    idx = np.r_[0, 1, 2, 3 + kept]
    mask = np.zeros(data.shape[:3], bool)
    mask[1:9, 2:11, :] = True
    qid2 = QID2Upsampler(prior_pipeline, progress=False).predict(data[..., idx], bvals[idx], bvecs[idx],
                                                                scheme90[held], mask)
    dti = DTIUpsampler().predict(data[..., idx], bvals[idx], bvecs[idx], scheme90[held], mask)
    np.testing.assert_allclose(qid2, dti, rtol=1e-4, atol=1e-2)


def test_cached_prior_never_sees_its_target(scheme90, tmp_path):
    data, bvals, bvecs = _tensor_volume(scheme90)
    mask = np.ones(data.shape[:3], bool)
    kept, held = split_acquired(scheme90, 30)
    corrupted = data.copy()
    corrupted[..., 3 + held] *= 5.0  # the targets: a prior that saw them would change
    caches = [build_cache(DWI(data=d, bvals=bvals, bvecs=bvecs, affine=np.eye(4), mask=mask, path=None), tmp_path,
                          subject_id=name, n_acquired=30, prior=True)
              for name, d in (("clean", data), ("corrupted", corrupted))]
    clean, bad = (QID2Dataset(c, num_references=3, physics_prior=True) for c in caches)
    idx = np.r_[0, 1, 2, 3 + kept]
    expected = TensorPrior(data[..., idx], bvals[idx], bvecs[idx], mask).predict(scheme90[held])
    for i in (0, 7, len(clean) - 1):
        a, b = clean[i], bad[i]
        _, z, target = clean.locate(i)
        assert a["prior"].shape == (1,) + data.shape[:2] and a["b0"].shape == a["prior"].shape
        prior_a = denormalize(a["prior"], a["scale"])[0].numpy()
        prior_b = denormalize(b["prior"], b["scale"])[0].numpy()
        t = list(held).index(list(shell_indices(bvals, 1000)).index(3 + target) if False else target)
        np.testing.assert_allclose(prior_a, expected[:, :, z, t], rtol=2e-3, atol=0.5)
        np.testing.assert_allclose(prior_b, prior_a, rtol=2e-3, atol=0.5)
        assert a["target_bvals"] == 1000 and a["reference_bvals"].shape == (3,)
    with pytest.raises(Exception, match="no physics prior"):
        QID2Dataset(build_cache(DWI(data=data, bvals=bvals, bvecs=bvecs, affine=np.eye(4), mask=mask, path=None),
                                tmp_path, subject_id="plain", n_acquired=30), num_references=3, physics_prior=True)
