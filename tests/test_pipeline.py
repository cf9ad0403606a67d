import numpy as np
import pytest
import torch

from qid2_diffusers import QID2Pipeline, build_pipeline
from qid2_diffusers.schedulers import SCHEDULERS, make_scheduler


def _inputs(b=2, r=3, size=(13, 18), seed=0):
    rng = np.random.default_rng(seed)
    refs = (rng.random((b, r, *size)) * 500).astype(np.float32)
    return refs, rng.normal(size=(b, r, 3)), rng.normal(size=(b, 3))


def test_output_shape_units_and_dtype(tiny_pipeline):
    refs, rb, tb = _inputs()
    out = tiny_pipeline(refs, rb, tb, num_inference_steps=3, generator=torch.manual_seed(0))
    assert out.images.shape == (2, 13, 18) and out.images.dtype == np.float32
    assert out.samples is None and out.std is None
    assert np.all(out.images >= 0)
    # Scale comes from the references only: scaling them scales the output.
    out10 = tiny_pipeline(refs * 10, rb, tb, num_inference_steps=3, generator=torch.manual_seed(0))
    np.testing.assert_allclose(out10.images, out.images * 10, rtol=1e-4, atol=1e-3)
    pt = tiny_pipeline(refs, rb, tb, num_inference_steps=3, generator=torch.manual_seed(0), output_type="pt")
    assert isinstance(pt.images, torch.Tensor)
    np.testing.assert_allclose(pt.images.numpy(), out.images, rtol=0, atol=0)


def test_single_sample_unbatched_and_odd_sizes(tiny_pipeline):
    rng = np.random.default_rng(1)
    for size in [(145, 174), (6, 8)]:
        out = tiny_pipeline(rng.random((3, *size)) * 100, rng.normal(size=(3, 3)), rng.normal(size=3), num_inference_steps=2)
        assert out.images.shape == (1, *size)
        assert np.isfinite(out.images).all()


def test_determinism_and_generator_lists(tiny_pipeline):
    refs, rb, tb = _inputs(b=3)
    a = tiny_pipeline(refs, rb, tb, num_inference_steps=4, generator=torch.manual_seed(7)).images
    b = tiny_pipeline(refs, rb, tb, num_inference_steps=4, generator=torch.manual_seed(7)).images
    np.testing.assert_array_equal(a, b)
    c = tiny_pipeline(refs, rb, tb, num_inference_steps=4, generator=torch.manual_seed(8)).images
    assert not np.allclose(a, c)
    # One generator per sample: a sample does not depend on the rest of the batch.
    gens = lambda seeds: [torch.Generator().manual_seed(s) for s in seeds]  # noqa: E731
    full = tiny_pipeline(refs, rb, tb, num_inference_steps=4, generator=gens([1, 2, 3])).images
    part = tiny_pipeline(refs[1:], rb[1:], tb[1:], num_inference_steps=4, generator=gens([2, 3])).images
    np.testing.assert_allclose(full[1:], part, rtol=1e-5, atol=1e-4)


def test_sign_invariance_of_outputs(tiny_pipeline):
    refs, rb, tb = _inputs()
    a = tiny_pipeline(refs, rb, tb, num_inference_steps=3, generator=torch.manual_seed(0)).images
    b = tiny_pipeline(refs, -rb, -tb, num_inference_steps=3, generator=torch.manual_seed(0)).images
    np.testing.assert_array_equal(a, b)


def test_num_samples_mean_and_std(tiny_pipeline):
    refs, rb, tb = _inputs()
    out = tiny_pipeline(refs, rb, tb, num_inference_steps=3, num_samples=4, generator=torch.manual_seed(0))
    assert out.samples.shape == (2, 4, 13, 18) and out.std.shape == (2, 13, 18)
    np.testing.assert_allclose(out.images, out.samples.mean(axis=1), rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(out.std, out.samples.std(axis=1, ddof=1), rtol=1e-4, atol=1e-4)
    assert out.std.max() > 0


@pytest.mark.parametrize("name", sorted(SCHEDULERS))
def test_scheduler_swap(tiny_pipeline, name):
    pipe = QID2Pipeline(**tiny_pipeline.components, default_num_inference_steps=5)
    pipe.scheduler = make_scheduler(name, tiny_pipeline.scheduler.config)
    assert type(pipe.scheduler) is SCHEDULERS[name]
    refs, rb, tb = _inputs()
    out = pipe(refs, rb, tb, generator=torch.manual_seed(0))
    assert out.images.shape == (2, 13, 18) and np.isfinite(out.images).all()
    assert len(pipe.scheduler.timesteps) == 5 or name == "ddpm"


def test_callback_on_step_end(tiny_pipeline):
    seen = []
    refs, rb, tb = _inputs(b=1)
    tiny_pipeline(refs, rb, tb, num_inference_steps=3, callback_on_step_end=lambda p, i, t, kw: seen.append((i, kw["latents"].shape)))
    assert [i for i, _ in seen] == [0, 1, 2]
    assert seen[0][1] == (1, 1, 16, 20)


def test_save_load_round_trip_offline(tmp_path, tiny_pipeline, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    tiny_pipeline.save_pretrained(tmp_path)
    assert list(tmp_path.rglob("*.safetensors")) and not list(tmp_path.rglob("*.bin"))
    again = QID2Pipeline.from_pretrained(tmp_path)
    again.set_progress_bar_config(disable=True)
    assert again.num_references == 3
    assert again.scheduler.config.prediction_type == tiny_pipeline.scheduler.config.prediction_type
    refs, rb, tb = _inputs()
    a = tiny_pipeline(refs, rb, tb, num_inference_steps=3, generator=torch.manual_seed(0)).images
    b = again(refs, rb, tb, num_inference_steps=3, generator=torch.manual_seed(0)).images
    assert np.abs(a - b).max() == 0


def test_to_dtype(tiny_pipeline):
    pipe = QID2Pipeline(**tiny_pipeline.components).to("cpu", torch.bfloat16)
    assert pipe.unet.dtype == torch.bfloat16
    refs, rb, tb = _inputs(b=1)
    out = pipe(refs, rb, tb, num_inference_steps=2, generator=torch.manual_seed(0))
    assert np.isfinite(out.images).all()
    tiny_pipeline.to(torch.float32)


def test_bad_inputs(tiny_pipeline):
    refs, rb, tb = _inputs()
    with pytest.raises(ValueError, match="R = 3 reference images, got 2"):
        tiny_pipeline(refs[:, :2], rb[:, :2], tb)
    with pytest.raises(ValueError, match="reference b-vectors of shape"):
        tiny_pipeline(refs, rb[:, :2], tb)
    bad = rb.copy()
    bad[0, 1] = 0
    with pytest.raises(ValueError, match="zero length"):
        tiny_pipeline(refs, bad, tb)
    bad[0, 1] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        tiny_pipeline(refs, bad, tb)
    with pytest.raises(ValueError, match=r"\(R, H, W\)"):
        tiny_pipeline(refs[0, 0], rb, tb)
    with pytest.raises(ValueError, match="different shapes"):
        tiny_pipeline([np.zeros((13, 18)), np.zeros((13, 18)), np.zeros((12, 18))], rb[0], tb[0])


def test_r6_build_and_mismatch():
    pipe = build_pipeline("tiny", 6)
    assert pipe.num_references == 6
    other = build_pipeline("tiny", 3)
    with pytest.raises(ValueError, match="R = 3"):
        QID2Pipeline(unet=pipe.unet, direction_encoder=other.direction_encoder, scheduler=pipe.scheduler)
