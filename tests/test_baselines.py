"""Baselines recover what they should exactly: Interp at acquired directions,
DTI-predict on a single-tensor signal, SH on a band-limited signal."""

import numpy as np
import pytest

from qid2_diffusers.baselines import (
    METHODS,
    DTIUpsampler,
    InterpUpsampler,
    MissingWeightsError,
    SHUpsampler,
    interpolation_weights,
    make_upsampler,
    method_label,
)
from qid2_diffusers.directions import complement, uniform_subset
from qid2_diffusers.upsampling import VolumeUpsampler

N_B0 = 2


@pytest.fixture(scope="module")
def scheme(scheme90):
    acquired = uniform_subset(scheme90, 30)
    targets = complement(scheme90, scheme90[acquired])
    bvals = np.r_[np.zeros(N_B0), np.full(30, 1000.0)]
    bvecs = np.r_[np.zeros((N_B0, 3)), scheme90[acquired]]
    return bvals, bvecs, scheme90[targets]


def _tensor_signal(bvals, bvecs, shape=(5, 4, 3), s0=1000.0):
    """A different tensor in every voxel, ``S = S0 exp(-b g^T D g)``."""
    rng = np.random.default_rng(3)
    n = int(np.prod(shape))
    rot = np.linalg.qr(rng.normal(size=(n, 3, 3)))[0]
    evals = np.stack([rng.uniform(1.2e-3, 2.0e-3, n), rng.uniform(0.2e-3, 0.6e-3, n), np.full(n, 0.2e-3)], axis=1)
    tensors = np.einsum("nij,nj,nkj->nik", rot, evals, rot)

    def signal(bv, bvec):
        adc = np.einsum("mi,nij,mj->nm", bvec, tensors, bvec)
        return (s0 * np.exp(-np.asarray(bv)[None] * adc)).reshape(*shape, len(bv)).astype(np.float32)

    return signal(bvals, bvecs), signal


def test_interp_returns_the_reference_slice_at_an_acquired_direction(scheme):
    bvals, bvecs, _ = scheme
    rng = np.random.default_rng(0)
    data = rng.uniform(10, 500, size=(6, 5, 3, len(bvals))).astype(np.float32)
    acquired = bvecs[N_B0:]
    # Each acquired direction as a target, half of them flipped to the antipode.
    targets = acquired * np.where(np.arange(30) % 2, -1.0, 1.0)[:, None]
    for r in (3, 6):
        pred = InterpUpsampler(r).predict(data, bvals, bvecs, targets)
        np.testing.assert_array_equal(pred, data[..., N_B0:])


def test_interp_weights_reproduce_the_target_direction(scheme):
    _, bvecs, targets = scheme
    from qid2_diffusers.directions import nearest_references

    acquired = bvecs[N_B0:]
    target = targets[0]
    refs = acquired[nearest_references(target, acquired, 3)]
    flipped = refs * np.array([-1.0, 1.0, -1.0])[:, None]  # signs must not matter
    w = interpolation_weights(target, flipped)
    aligned = flipped * np.sign(flipped @ target)[:, None]
    np.testing.assert_allclose(w @ aligned, target, atol=1e-12)
    assert np.all(w > 0)
    np.testing.assert_allclose(w, interpolation_weights(target, refs), atol=1e-12)


def test_interp_is_the_weighted_sum_of_the_nearest_references(scheme):
    bvals, bvecs, targets = scheme
    from qid2_diffusers.directions import nearest_references

    rng = np.random.default_rng(1)
    data = rng.uniform(10, 500, size=(4, 4, 2, len(bvals))).astype(np.float32)
    mask = np.zeros((4, 4, 2), bool)
    mask[1:3, 1:3] = True
    pred = InterpUpsampler(6).predict(data, bvals, bvecs, targets[:5], mask)
    for t in range(5):
        refs = nearest_references(targets[t], bvecs[N_B0:], 6)
        w = interpolation_weights(targets[t], bvecs[N_B0:][refs])
        expected = (data[..., N_B0:][..., refs] * w).sum(-1)
        np.testing.assert_allclose(pred[..., t][mask], expected[mask], rtol=1e-5)
    assert np.all(pred[~mask] == 0)


def test_dti_predict_is_exact_on_a_noise_free_single_tensor(scheme):
    bvals, bvecs, targets = scheme
    data, signal = _tensor_signal(bvals, bvecs)
    pred = DTIUpsampler().predict(data, bvals, bvecs, targets)
    expected = signal(np.full(len(targets), 1000.0), targets)
    assert pred.shape == expected.shape and pred.dtype == np.float32
    np.testing.assert_allclose(pred, expected, rtol=1e-4)


def test_sh_is_exact_on_a_band_limited_signal(scheme):
    from dipy.core.geometry import cart2sphere
    from dipy.reconst.shm import real_sh_tournier

    bvals, bvecs, targets = scheme
    rng = np.random.default_rng(2)

    def basis(dirs, order):
        _, theta, phi = cart2sphere(*np.asarray(dirs).T)
        return real_sh_tournier(order, theta, phi, legacy=False)[0]

    for fit_order, signal_order in ((2, 2), (4, 4), (6, 4)):
        coefs = rng.normal(size=(3, 2, 1, basis(targets[:1], signal_order).shape[1]))
        coefs[..., 0] = 40.0  # keep the function positive
        data = np.concatenate(
            [np.full((3, 2, 1, N_B0), 100.0), coefs @ basis(bvecs[N_B0:], signal_order).T], axis=-1
        ).astype(np.float32)
        pred = SHUpsampler(fit_order).predict(data, bvals, bvecs, targets)
        np.testing.assert_allclose(pred, coefs @ basis(targets, signal_order).T, rtol=1e-4, atol=1e-3)
    # Order 4 cannot represent an order-6 signal: the fit must not be exact there.
    coefs = rng.normal(size=(1, 1, 1, basis(targets[:1], 6).shape[1]))
    data = np.concatenate([np.full((1, 1, 1, N_B0), 100.0), coefs @ basis(bvecs[N_B0:], 6).T], axis=-1)
    pred = SHUpsampler(4).predict(data, bvals, bvecs, targets)
    assert np.abs(pred - coefs @ basis(targets, 6).T).max() > 1e-2


def test_factory_builds_every_classical_method():
    for name, cls in (("interp", InterpUpsampler), ("dti", DTIUpsampler), ("sh2", SHUpsampler), ("sh6", SHUpsampler)):
        up = make_upsampler(name, num_references=6)
        assert isinstance(up, cls) and isinstance(up, VolumeUpsampler)
    assert make_upsampler("interp", num_references=6).num_references == 6
    assert make_upsampler("sh6").sh_order == 6
    assert method_label("qid2", 3) == "QID² (R=3)" and method_label("sh4") == "SH (order 4)"
    assert set(METHODS) == {"qid2", "cgan", "qgan", "interp", "dti", "sh2", "sh4", "sh6"}
    with pytest.raises(ValueError, match="unknown method"):
        make_upsampler("sh3")


def test_factory_loads_qid2_and_reports_missing_weights(tiny_model_dir, tmp_path):
    from qid2_diffusers import QID2Upsampler

    up = make_upsampler(
        "qid2",
        num_references=3,
        model_path=tiny_model_dir,
        scheduler="ddim",
        num_inference_steps=2,
        progress=False,
        device="cpu",
    )
    assert isinstance(up, QID2Upsampler)
    assert type(up.pipeline.scheduler).__name__ == "DDIMScheduler" and up.num_inference_steps == 2
    with pytest.raises(ValueError, match="R = 3, not R = 6"):
        make_upsampler("qid2", num_references=6, model_path=tiny_model_dir)
    with pytest.raises(MissingWeightsError, match="--cgan"):
        make_upsampler("cgan")
    with pytest.raises(MissingWeightsError, match="no qgan weights folder"):
        make_upsampler("qgan", model_path=tmp_path / "absent")
    with pytest.raises(MissingWeightsError, match="model_index.json"):
        make_upsampler("qid2", model_path=tmp_path)


def test_factory_loads_a_saved_gan_generator(tmp_path):
    from qid2_diffusers.baselines.gan import GANUpsampler
    from qid2_diffusers.models.gan import QGANGenerator

    QGANGenerator(num_references=3, block_out_channels=(8, 16), embed_dim=8, norm_num_groups=4).save_pretrained(
        tmp_path
    )
    up = make_upsampler("qgan", num_references=3, model_path=tmp_path, progress=False, device="cpu")
    assert isinstance(up, GANUpsampler) and up.num_references == 3
    with pytest.raises(ValueError, match="holds a qgan generator, not a cgan"):
        make_upsampler("cgan", model_path=tmp_path, device="cpu")


def test_every_method_takes_a_dipy_gradient_table(scheme, tiny_pipeline):
    """``predict(data, gtab, targets, mask)`` as dipy users call a model: the same volumes as with arrays."""
    import torch
    from dipy.core.gradients import gradient_table

    from qid2_diffusers import QID2Upsampler
    from qid2_diffusers.baselines.gan import GANUpsampler
    from qid2_diffusers.models.gan import QGANGenerator

    bvals, bvecs, targets = scheme
    targets = targets[:8]
    data, _ = _tensor_signal(bvals, bvecs, shape=(6, 5, 2))
    mask = np.ones(data.shape[:3], dtype=bool)
    mask[0] = False
    gtab = gradient_table(bvals, bvecs=bvecs)
    # A target table as dipy users write one: a b0 row, then the directions.
    target_gtab = gradient_table(np.r_[0.0, np.full(len(targets), 1000.0)], bvecs=np.r_[np.zeros((1, 3)), targets])
    torch.manual_seed(0)
    generator = QGANGenerator(num_references=3, block_out_channels=(8, 16), embed_dim=8, norm_num_groups=4)
    methods = [
        InterpUpsampler(3),
        DTIUpsampler(),
        SHUpsampler(4),
        QID2Upsampler(tiny_pipeline, num_inference_steps=1, progress=False),
        GANUpsampler(generator, progress=False),
    ]
    for up in methods:
        expected = up.predict(data, bvals, bvecs, targets, mask)
        assert expected.shape == data.shape[:3] + (len(targets),) and np.all(expected[~mask] == 0)
        assert np.abs(expected[mask]).max() > 0, up.name
        for got in (
            up.predict(data, gtab, targets, mask),
            up.predict(data, gtab, targets, mask=mask),
            up.predict(data, gtab, target_bvecs=target_gtab, mask=mask),
            up.predict(data, bvals, bvecs, target_gtab, mask),
        ):
            np.testing.assert_array_equal(got, expected, err_msg=up.name)
    with pytest.raises(TypeError, match="pass data, gtab, target_bvecs and mask"):
        methods[0].predict(data, gtab, bvecs, targets, mask)
    with pytest.raises(ValueError, match="bvecs are needed"):
        methods[0].predict(data, bvals, target_bvecs=targets)
