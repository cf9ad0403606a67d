"""Test-time adaptation on the scan's own kept directions (leave-one-out)."""

import numpy as np
import pytest
import torch

from qid2_diffusers import QID2Upsampler, build_pipeline
from qid2_diffusers.data.io import split_acquired
from qid2_diffusers.directions import nearest_references
from qid2_diffusers.image_processor import QID2ImageProcessor
from qid2_diffusers.pipelines.adaptation import adapt_pipeline, leave_one_out_examples
from qid2_diffusers.pipelines.training_utils import QID2Denoiser, diffusion_loss
from qid2_diffusers.schedulers import training_scheduler
from qid2_diffusers.tensor import TensorPrior


@pytest.fixture(scope="module")
def scan(scheme90):
    """b0 x 2 + 20 kept directions of a smooth tensor field with noise, brain in the middle."""
    rng = np.random.default_rng(0)
    kept, _ = split_acquired(scheme90, 20)
    bvecs = np.vstack([np.zeros((2, 3)), scheme90[kept]])
    bvals = np.r_[0.0, 0.0, np.full(len(kept), 1000.0)]
    shape = (14, 16, 5)
    x = np.linspace(0, np.pi, shape[0])[:, None, None] * np.ones(shape)
    e1 = np.stack([np.cos(x), np.sin(x), np.zeros(shape)], axis=-1)
    d = 0.0003 * np.eye(3) + 0.0014 * e1[..., :, None] * e1[..., None, :]
    data = 800 * np.exp(-bvals * np.einsum("ni,...ij,nj->...n", bvecs, d, bvecs))
    data = (data * rng.normal(1.0, 0.03, data.shape)).astype(np.float32)
    mask = np.zeros(shape, bool)
    mask[2:12, 3:13, 1:4] = True
    return data, bvals, bvecs, mask


def test_examples_leave_their_target_out(scan):
    data, bvals, bvecs, mask = scan
    ex = leave_one_out_examples(data, bvals, bvecs, mask, 3, physics_prior=True)
    n_dirs, n_slices = 20, 3
    assert ex["target"].shape == (n_dirs * n_slices, 1, 14, 16)
    assert ex["references"].shape == (n_dirs * n_slices, 3, 14, 16) and ex["prior"].shape == ex["target"].shape
    # Row i * n_slices + k: direction i, slice k; its references are the nearest of the OTHER directions.
    i = 7
    row = ex["reference_bvecs"][i * n_slices].numpy()
    others = np.delete(np.arange(20), i)
    expected = bvecs[2:][others[nearest_references(bvecs[2 + i][None], bvecs[2:][others], 3)[0]]]
    np.testing.assert_allclose(np.abs(row), np.abs(expected), atol=1e-6)
    # The prior of direction i is a tensor fit without it: corrupting volume i changes its target only.
    bad = data.copy()
    bad[..., 2 + i] *= 4.0
    ex_bad = leave_one_out_examples(bad, bvals, bvecs, mask, 3, physics_prior=True)
    rows = slice(i * n_slices, (i + 1) * n_slices)
    assert torch.equal(ex["prior"][rows], ex_bad["prior"][rows])
    assert not torch.allclose(ex["target"][rows], ex_bad["target"][rows])
    keep = np.r_[0, 1, 2 + others]
    fit = TensorPrior(data[..., keep], bvals[keep], bvecs[keep], mask).predict(bvecs[2 + i][None])
    prior = QID2ImageProcessor.denormalize(ex["prior"][rows], ex["scale"][rows])[:, 0].numpy()
    np.testing.assert_allclose(prior, np.moveaxis(fit[:, :, 1:4, 0], 2, 0), rtol=1e-4, atol=1e-2)


def test_adaptation_fits_the_scan_and_leaves_the_model_alone(scan):
    data, bvals, bvecs, mask = scan
    pipe = build_pipeline("tiny", 3, "sample", seed=0, physics_prior=True, bval_conditioning=True)
    before = {k: v.clone() for k, v in pipe.unet.state_dict().items()}
    adapted, seconds = adapt_pipeline(pipe, data, bvals, bvecs, mask, steps=40, seed=3, progress=False,
                                      learning_rate=2e-3, crop_size=None)
    assert seconds > 0 and adapted is not pipe
    assert all(torch.equal(before[k], v) for k, v in pipe.unet.state_dict().items())
    again, _ = adapt_pipeline(pipe, data, bvals, bvecs, mask, steps=40, seed=3, progress=False,
                              learning_rate=2e-3, crop_size=None)
    assert all(torch.equal(a, b) for a, b in zip(adapted.unet.parameters(), again.unet.parameters()))
    # The leave-one-out loss on the scan went down.
    ex = leave_one_out_examples(data, bvals, bvecs, mask, 3, physics_prior=True)
    scheduler = training_scheduler("sample")

    def loss(p):
        with torch.no_grad():
            return float(diffusion_loss(QID2Denoiser(p.unet, p.direction_encoder), scheduler, ex,
                                        torch.Generator().manual_seed(0)))

    assert loss(adapted) < 0.7 * loss(pipe)


def test_upsampler_adapts_per_scan_reproducibly(scan):
    data, bvals, bvecs, mask = scan
    pipe = build_pipeline("tiny", 3, "sample", seed=0, physics_prior=True, bval_conditioning=True)
    pipe.set_progress_bar_config(disable=True)
    targets = np.array([[1.0, 0.0, 0.0], [0.0, 0.6, 0.8]])
    # The network's correction kept whole: with "auto" a random network's is dropped and both are the prior.
    plain = QID2Upsampler(pipe, progress=False, num_inference_steps=1, residual_weight=1).predict(
        data, bvals, bvecs, targets, mask)
    ups = [QID2Upsampler(pipe, progress=False, num_inference_steps=1, adapt_steps=5, residual_weight=1,
                         adapt_settings={"learning_rate": 1e-3})
           for _ in range(2)]
    a, b = (u.predict(data, bvals, bvecs, targets, mask) for u in ups)
    np.testing.assert_array_equal(a, b)
    assert not np.allclose(a, plain) and ups[0].adaptation_seconds > 0
    assert np.all(a[~mask] == 0) and np.all(np.isfinite(a))


def test_the_models_default_adaptation_is_saved_and_used_unless_told(tmp_path):
    from qid2_diffusers import QID2Pipeline

    pipe = build_pipeline("tiny", 3, "sample", seed=0, physics_prior=True, bval_conditioning=True)
    assert QID2Upsampler(pipe).adapt_steps == 0
    pipe.register_to_config(default_adapt_steps=3)
    pipe.save_pretrained(tmp_path)
    loaded = QID2Pipeline.from_pretrained(tmp_path)
    assert loaded.config.default_adapt_steps == 3
    assert QID2Upsampler(loaded).adapt_steps == 3 and QID2Upsampler(loaded, adapt_steps=0).adapt_steps == 0
