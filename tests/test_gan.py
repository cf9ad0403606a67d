"""qid2_diffusers.models.gan, baselines.gan and qid2_diffusers.training.gan: the cGAN and qGAN baselines."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import qid2_diffusers
from qid2_diffusers.baselines.gan import GANUpsampler
from qid2_diffusers.directions import uniform_directions
from qid2_diffusers.models.gan import (
    CGANGenerator,
    PatchDiscriminator,
    QGANGenerator,
    load_generator,
)
from qid2_diffusers.training.gan import GANTrainer

# PYTHONPATH: `python -m` in a subprocess imports the package these tests import.
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
       "PYTHONPATH": str(Path(qid2_diffusers.__file__).resolve().parents[1])}


def _inputs(b=2, r=3, h=20, w=24, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (
        torch.randn(b, r, h, w, generator=g),
        torch.nn.functional.normalize(torch.randn(b, 3, generator=g), dim=-1),
        torch.nn.functional.normalize(torch.randn(b, r, 3, generator=g), dim=-1),
    )


def _tiny(kind, r=3):
    torch.manual_seed(0)
    if kind == "cgan":
        return CGANGenerator(num_references=r, preset="tiny")
    return QGANGenerator(num_references=r, block_out_channels=(8, 8, 16), embed_dim=16, norm_num_groups=4)


@pytest.mark.parametrize("kind", ["cgan", "qgan"])
def test_generator_round_trip_gives_identical_outputs(kind, tmp_path):
    gen = _tiny(kind).eval()
    refs, tb, rb = _inputs()
    with torch.no_grad():
        before = gen(refs, tb, rb)
    gen.save_pretrained(tmp_path)
    assert (tmp_path / "config.json").is_file() and (tmp_path / "diffusion_pytorch_model.safetensors").is_file()
    loaded = load_generator(tmp_path).eval()
    assert type(loaded) is type(gen) and loaded.kind == kind
    with torch.no_grad():
        after = loaded(refs, tb, rb)
    assert before.shape == (2, 1, 20, 24) and torch.equal(before, after)


@pytest.mark.parametrize("kind", ["cgan", "qgan"])
def test_generators_condition_on_directions_antipodally(kind):
    gen = _tiny(kind)
    # qGAN's FiLM starts as the identity; give it weights so the directions matter.
    for module in gen.modules():
        if hasattr(module, "film"):
            torch.nn.init.normal_(module.film.weight, std=0.5)
    refs, tb, rb = _inputs()
    other = torch.nn.functional.normalize(torch.tensor([[1.0, 2.0, 0.5], [0.2, -1.0, 1.0]]), dim=-1)
    with torch.no_grad():
        out = gen(refs, tb, rb)
        assert not torch.allclose(out, gen(refs, other, rb), atol=1e-5)
        # b and -b are the same measurement: the same output.
        assert torch.allclose(out, gen(refs, -tb, -rb), atol=1e-5)


@pytest.mark.parametrize("conditioning", ["cross_attention", "projection"])
def test_discriminator_sees_directions_and_round_trips(conditioning, tmp_path):
    torch.manual_seed(0)
    disc = PatchDiscriminator(num_references=3, base_channels=8, direction_conditioning=conditioning, embed_dim=16, num_heads=2)
    refs, tb, rb = _inputs(h=32, w=32)
    target = torch.randn(2, 1, 32, 32)
    other = torch.nn.functional.normalize(torch.tensor([[1.0, 2.0, 0.5], [0.2, -1.0, 1.0]]), dim=-1)
    with torch.no_grad():
        logits = disc(refs, target, tb, rb)
        assert logits.shape == (2, 1, 4, 4)
        assert not torch.allclose(logits, disc(refs, target, other, rb), atol=1e-6)
    disc.save_pretrained(tmp_path)
    with torch.no_grad():
        assert torch.equal(PatchDiscriminator.from_pretrained(tmp_path)(refs, target, tb, rb), logits)


def test_gan_upsampler_masks_and_follows_the_reference_scale():
    bvecs = np.concatenate([np.zeros((2, 3)), uniform_directions(12, seed=1)])
    bvals = np.array([0, 0] + [1000] * 12, dtype=float)
    data = np.random.default_rng(0).uniform(20, 100, (14, 12, 3, 14)).astype(np.float32)
    mask = np.zeros((14, 12, 3), bool)
    mask[3:11, 2:10, :2] = True
    targets = uniform_directions(4, seed=5)
    up = GANUpsampler(_tiny("qgan"), batch_size=3, progress=False)
    pred = up.predict(data, bvals, bvecs, targets, mask)
    assert pred.shape == (14, 12, 3, 4) and pred.dtype == np.float32
    assert np.all(pred[~mask] == 0) and np.all(pred >= 0) and pred[mask].max() > 0
    # Intensities are normalised by a scale from the references only, so
    # scaling the acquisition scales the prediction.
    assert np.allclose(up.predict(10 * data, bvals, bvecs, targets, mask), 10 * pred, rtol=1e-4, atol=1e-3)


def test_train_gan_updates_discriminator_once_per_two_generator_steps(training_cohort, tmp_path):
    out = tmp_path / "qgan"
    run = subprocess.run(
        [sys.executable, "-m", "qid2_diffusers.training.gan", "--model", "qgan", "--config", "tiny",
         "--data_dir", str(training_cohort), "--output_dir", str(out), "--max_train_steps", "6", "--checkpointing_steps", "6"],
        env=ENV, capture_output=True, text=True, timeout=300,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    # Adam counts its own updates: the generator's optimiser (prepared first) and the discriminator's.
    ckpt = out / "checkpoint-6"
    steps = [
        {int(s["step"]) for s in torch.load(ckpt / name, weights_only=False)["state"].values()}
        for name in ("optimizer.bin", "optimizer_1.bin")
    ]
    assert steps == [{6}, {3}]
    summary = json.loads((out / "training_summary.json").read_text())
    assert summary["model"] == "qgan" and summary["learning_rate"] == "5e-05" and summary["global_step"] == 6
    assert 0 <= summary["validation"]["fa_mae"] < 1
    up = GANUpsampler.from_pretrained(out, progress=False)
    assert up.name == "qgan" and up.generator.dtype == torch.float32 and up.num_references == 3
    assert PatchDiscriminator.from_pretrained(out / "discriminator").config.direction_conditioning == "projection"
    card = (out / "README.md").read_text()
    assert "qGAN" in card and "λ_V = 100" in card and "--model qgan" in card
    assert card.startswith("---\nlibrary_name: diffusers\n") and "python -m qid2_diffusers.training.gan --model qgan" in card
    assert "| qgan (this model) |" in card and "| Interp (R=3) |" in card


def test_gan_arguments_from_python_take_the_papers_learning_rates_and_need_a_model(tmp_path):
    args = GANTrainer.training_args(output_dir=tmp_path, config="tiny", model="cgan")
    assert (args.learning_rate, args.preset, args.lambda_l1, args.discriminator_update_interval) == (2.5e-5, "tiny", 100.0, 2)
    assert GANTrainer.training_args(output_dir=tmp_path, model="qgan", learning_rate=1e-3).learning_rate == 1e-3
    with pytest.raises(ValueError, match="--model must be one of cgan, qgan"):
        GANTrainer.training_args(output_dir=tmp_path)
    with pytest.raises(ValueError, match="gradient_accumulation_steps must be 1"):
        GANTrainer.training_args(output_dir=tmp_path, model="qgan", gradient_accumulation_steps=2)
