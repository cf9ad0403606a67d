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
    assert "Trained on the b = 1000 s/mm² shell; its direction tokens carry no b-value" in card
    assert summary["bval_conditioning"] is False and not up.bval_conditioning


def test_gan_arguments_from_python_take_the_papers_learning_rates_and_need_a_model(tmp_path):
    args = GANTrainer.training_args(output_dir=tmp_path, config="tiny", model="cgan")
    assert (args.learning_rate, args.preset, args.lambda_l1, args.discriminator_update_interval) == (2.5e-5, "tiny", 100.0, 2)
    assert GANTrainer.training_args(output_dir=tmp_path, model="qgan", learning_rate=1e-3).learning_rate == 1e-3
    with pytest.raises(ValueError, match="--model must be one of cgan, qgan"):
        GANTrainer.training_args(output_dir=tmp_path)
    with pytest.raises(ValueError, match="gradient_accumulation_steps must be 1"):
        GANTrainer.training_args(output_dir=tmp_path, model="qgan", gradient_accumulation_steps=2)


REPO = Path(__file__).resolve().parents[1]


def _tiny_b(kind):
    torch.manual_seed(0)
    if kind == "cgan":
        gen = CGANGenerator(num_references=3, preset="tiny", bval_conditioning=True)
    else:
        gen = QGANGenerator(num_references=3, block_out_channels=(8, 8, 16), embed_dim=16, norm_num_groups=4,
                            bval_conditioning=True)
    # qGAN's FiLM starts as the identity; give it weights so the directions matter.
    for module in gen.modules():
        if hasattr(module, "film"):
            torch.nn.init.normal_(module.film.weight, std=0.5)
    return gen.eval()


def _shell(b, n=2, r=3):
    return torch.full((n,), float(b)), torch.full((n, r), float(b))


@pytest.mark.parametrize("kind", ["cgan", "qgan"])
def test_bval_conditioned_generator_follows_b_not_the_sign_and_round_trips(kind, tmp_path):
    gen = _tiny_b(kind)
    refs, tb, rb = _inputs()
    with torch.no_grad():
        out = gen(refs, tb, rb, *_shell(1000))
        assert not torch.allclose(out, gen(refs, tb, rb, *_shell(2000)), atol=1e-5)
        assert torch.allclose(out, gen(refs, -tb, -rb, *_shell(1000)), atol=1e-5)
        with pytest.raises(ValueError, match="b-conditioned: give target and reference b-values"):
            gen(refs, tb, rb)
    gen.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["bval_conditioning"] is True
    loaded = load_generator(tmp_path).eval()
    assert loaded.config.bval_conditioning and GANUpsampler(loaded, progress=False).bval_conditioning
    with torch.no_grad():
        assert torch.equal(loaded(refs, tb, rb, *_shell(1000)), out)


@pytest.mark.parametrize("conditioning", ["cross_attention", "projection"])
def test_bval_conditioned_discriminator_follows_b_and_round_trips(conditioning, tmp_path):
    torch.manual_seed(0)
    disc = PatchDiscriminator(num_references=3, base_channels=8, direction_conditioning=conditioning, embed_dim=16,
                              num_heads=2, bval_conditioning=True)
    refs, tb, rb = _inputs(h=32, w=32)
    target = torch.randn(2, 1, 32, 32)
    with torch.no_grad():
        logits = disc(refs, target, tb, rb, *_shell(1000))
        assert not torch.allclose(logits, disc(refs, target, tb, rb, *_shell(3000)), atol=1e-6)
    disc.save_pretrained(tmp_path)
    loaded = PatchDiscriminator.from_pretrained(tmp_path)
    assert loaded.config.bval_conditioning
    with torch.no_grad():
        assert torch.equal(loaded(refs, target, tb, rb, *_shell(1000)), logits)


@pytest.mark.parametrize("kind", ["cgan", "qgan"])
def test_configs_without_the_option_load_as_not_bval_conditioned(kind, tmp_path):
    # Baselines saved before the option existed (the paper-configuration GANs shipped until 2026-12-05) have
    # configs without the key: one of each kind, written here, the key removed.
    folder = tmp_path / kind
    _tiny(kind).save_pretrained(folder)
    PatchDiscriminator(num_references=3, base_channels=8, embed_dim=16, num_heads=2,
                       direction_conditioning="cross_attention" if kind == "cgan" else "projection",
                       ).save_pretrained(folder / "discriminator")
    for path in (folder / "config.json", folder / "discriminator" / "config.json"):
        config = json.loads(path.read_text())
        config.pop("bval_conditioning", None)
        path.write_text(json.dumps(config))
    gen = load_generator(folder).eval()
    assert gen.config.bval_conditioning is False and gen.direction_encoder.proj_in.in_features == 7
    assert not GANUpsampler(gen, progress=False).bval_conditioning
    disc = PatchDiscriminator.from_pretrained(folder / "discriminator")
    assert disc.config.bval_conditioning is False
    refs, tb, rb = _inputs(h=16, w=16)
    with torch.no_grad():
        # A single-shell model never learned b: given b-values, it ignores them.
        assert torch.equal(gen(refs, tb, rb), gen(refs, tb, rb, *_shell(3000)))


@pytest.mark.slow  # ~7 s: a GAN training run (the one-shell run stays quick)
def test_train_gan_on_two_shells_gives_a_bval_conditioned_upsampler(multishell_training_cohort, tmp_path):
    from qid2_diffusers.data.io import extract_shell, load_dwi

    out = tmp_path / "cgan"
    run = subprocess.run(
        [sys.executable, "-m", "qid2_diffusers.training.gan", "--model", "cgan", "--config", "tiny",
         "--data_dir", str(multishell_training_cohort), "--output_dir", str(out), "--shells", "1000,2000",
         "--bval_conditioning", "--max_train_steps", "3", "--checkpointing_steps", "3"],
        env=ENV, capture_output=True, text=True, timeout=300,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    summary = json.loads((out / "training_summary.json").read_text())
    assert summary["global_step"] == 3 and summary["bval_conditioning"] is True and summary["shell"] == "1000, 2000"
    assert PatchDiscriminator.from_pretrained(out / "discriminator").config.bval_conditioning
    card = (out / "README.md").read_text()
    assert "b = 1000, 2000 s/mm² shells with b-conditioned direction tokens (`--bval_conditioning`)" in card

    up = GANUpsampler.from_pretrained(out, progress=False)
    assert up.name == "cgan" and up.bval_conditioning
    folder = multishell_training_cohort / "sub-01" / "T1w" / "Diffusion"
    dwi = extract_shell(load_dwi(folder / "data.nii.gz", folder / "bvals", folder / "bvecs"), 2000)
    data, mask = np.asarray(dwi.data, dtype=np.float32), np.ones(dwi.shape[:3], bool)
    mask[:4] = False
    targets = uniform_directions(3, seed=5)
    pred = up.predict(data, dwi.bvals, dwi.bvecs, targets, mask)
    assert pred.shape == dwi.shape[:3] + (3,) and np.all(pred[~mask] == 0) and pred[mask].max() > 0
    # The generator is told the shell: the same images labelled b=1000 give another prediction.
    relabelled = np.where(dwi.bvals > 0, 1000.0, dwi.bvals)
    assert not np.allclose(up.predict(data, relabelled, dwi.bvecs, targets, mask), pred, atol=1e-4)


def test_several_shells_without_bval_conditioning_is_a_one_line_error(tmp_path, capsys):
    argv = ["--model", "qgan", "--config", "tiny", "--data_dir", str(tmp_path), "--output_dir", str(tmp_path / "out"),
            "--shells", "1000,2000"]
    with pytest.raises(SystemExit) as exc:
        GANTrainer.main(argv)
    assert exc.value.code == 2
    assert capsys.readouterr().err == (
        "error: several --shells need --bval_conditioning: the model must know which shell it up-samples\n")
    assert not (tmp_path / "out").exists()
    with pytest.raises(ValueError, match="several --shells need --bval_conditioning"):
        GANTrainer.training_args(output_dir=tmp_path, model="qgan", shells=[1000, 2000])
    assert GANTrainer.training_args(output_dir=tmp_path, model="qgan", shells=[1000, 2000],
                                    bval_conditioning=True).shells == [1000.0, 2000.0]


@pytest.mark.parametrize("kind", ["qgan", "cgan"])
def test_shipped_gans_are_b_conditioned_small_and_beat_interpolation_on_a_phantom(kind, phantom_slab):
    """weights/{qgan,cgan}-small-r3 (retrained on the randomised multi-shell phantoms): fp16 safetensors under
    20 MB, b-value tokens, and on a phantom they were not trained on their 60 synthesised directions give a lower
    FA error against the phantom's truth than interpolating the nearest acquired ones."""
    from qid2_diffusers.baselines import make_upsampler
    from qid2_diffusers.evaluation.metrics import tensor_metrics
    from qid2_diffusers.tensor import fit_tensor

    folder = REPO / "weights" / f"{kind}-small-r3"
    config = json.loads((folder / "config.json").read_text())
    assert config["bval_conditioning"] is True
    assert (folder / "diffusion_pytorch_model.safetensors").stat().st_size < 20 * 2**20
    p = phantom_slab
    b0, dw = np.flatnonzero(p["bvals"] < 50), np.flatnonzero(p["bvals"] > 50)
    kept, targets = dw[::3], np.setdiff1d(dw, dw[::3])  # 30 of 90
    inputs = np.r_[b0, kept]
    order = np.r_[inputs, targets]
    errors = {}
    for name, path in ((kind, folder), ("interp", None)):
        up = make_upsampler(name, model_path=path, progress=False)
        pred = up.predict(p["dwi"][..., inputs], p["bvals"][inputs], p["bvecs"][inputs], p["bvecs"][targets],
                          p["mask"])
        assert pred.shape == p["mask"].shape + (len(targets),) and np.isfinite(pred).all()
        series = np.concatenate([p["dwi"][..., inputs], pred], axis=-1)
        fit = fit_tensor(series, p["bvals"][order], p["bvecs"][order], p["mask"])
        errors[name] = float(np.abs(fit.fa - p["fa"])[p["mask"]].mean())
    assert errors[kind] < errors["interp"], errors
