"""``qid2 upsample``: output layout, targets, seeds, bad input, Accelerate split, and the example."""

import os
import shutil
import subprocess

import nibabel as nib
import numpy as np
import pytest

from qid2_diffusers.cli import main
from qid2_diffusers.inference import choose_targets, read_targets
from qid2_diffusers.directions import angular_distance, uniform_directions
from qid2_diffusers.errors import QID2InputError
from qid2_diffusers.hub import native_bf16_cpu
from qid2_diffusers.masking import brain_mask

STEPS = ["--steps", "2", "--scheduler", "ddim"]


@pytest.fixture(scope="module")
def crop(real_data_dir):
    """The real 6x8x9 b=3000 crop: integer data, interleaved b0s, a 2950 in the shell."""
    return {k: str(real_data_dir / f"b3000.{k}") for k in ("nii.gz", "bval", "bvec")}


def _upsample(crop, out, model, *extra):
    return main(["upsample", "--dwi", crop["nii.gz"], "--bvals", crop["bval"], "--bvecs", crop["bvec"],
                 "--shell", "3000", "--out", str(out), "--model", str(model), *STEPS, *extra])


def test_real_crop_keeps_every_input_volume_and_appends_targets(crop, tmp_path, tiny_model_dir, capsys):
    targets = uniform_directions(5, seed=3)
    np.savetxt(tmp_path / "targets.bvec", targets.T)  # FSL: 3 rows
    assert _upsample(crop, tmp_path / "out" / "up", tiny_model_dir, "--targets", str(tmp_path / "targets.bvec")) == 0
    captured = capsys.readouterr()
    warning = [line for line in captured.err.splitlines() if "warning" in line]
    # The crop is too small for MP-PCA (the default denoiser): said once, and the input kept as it is.
    assert len(warning) == 2 and "trained at b=1000" in warning[1] and "b=3000" in warning[1]
    assert "not denoised: MP-PCA needs patches" in warning[0] and "6x8x9" in warning[0]
    summary = captured.out.strip().splitlines()
    assert len(summary) == 2 and "5 targets" in summary[0] and "on cpu" in summary[0]
    # --dtype auto, the default, says what it came out as on this CPU
    assert f"on cpu ({'bf16' if native_bf16_cpu() else 'fp32'}, " in summary[0]
    assert summary[1].startswith("qid2 upsample: input not denoised")

    src = nib.load(crop["nii.gz"])
    out = nib.load(tmp_path / "out" / "up.nii.gz")
    data = np.asarray(out.dataobj)
    assert data.shape == (6, 8, 9, 68 + 5) and data.dtype == np.float32
    np.testing.assert_array_equal(data[..., :68], np.asarray(src.dataobj, dtype=np.float32))
    np.testing.assert_allclose(out.affine, src.affine)
    assert out.header.get_zooms()[:3] == src.header.get_zooms()[:3]
    bvals = np.loadtxt(tmp_path / "out" / "up.bval")
    bvecs = np.loadtxt(tmp_path / "out" / "up.bvec").T
    np.testing.assert_allclose(bvals[:68], np.loadtxt(crop["bval"]), rtol=1e-9)
    np.testing.assert_allclose(bvals[68:], 3000.0, atol=1.0)
    assert np.all(np.degrees(np.diag(angular_distance(bvecs[68:], targets))) < 1e-4)

    src_bvals = np.loadtxt(crop["bval"])
    mean_b0 = np.asarray(src.dataobj, dtype=np.float32)[..., src_bvals < 50].mean(-1)
    mask = brain_mask(mean_b0, src.header.get_zooms()[:3])
    synth = data[..., 68:]
    assert np.all(synth[~mask] == 0)
    assert np.all(synth[mask].mean(axis=0) > 0)
    assert not (tmp_path / "out" / "up_std.nii.gz").exists()


def test_same_seed_same_output_and_std_map(crop, tmp_path, tiny_model_dir, capsys):
    runs = {}
    for name, seed in (("a", "1"), ("b", "1"), ("c", "2")):
        prefix = tmp_path / name
        assert _upsample(crop, prefix, tiny_model_dir, "--n-targets", "12", "--num-samples", "2", "--seed", seed) == 0
        runs[name] = (np.asarray(nib.load(f"{prefix}.nii.gz").dataobj), np.asarray(nib.load(f"{prefix}_std.nii.gz").dataobj))
    (a, a_std), (b, b_std), (c, _) = runs["a"], runs["b"], runs["c"]
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(a_std, b_std)
    t = a.shape[3] - 68
    assert t == len(choose_targets(np.loadtxt(crop["bvec"]).T[np.loadtxt(crop["bval"]) > 50], n_targets=12))
    assert a_std.shape == (6, 8, 9, t)
    synthesised = a[..., 68:] > 0
    assert np.all(a_std[synthesised.any(axis=3)].max(axis=-1) > 0) and np.all(a_std[~synthesised] == 0)
    assert not np.array_equal(a[..., 68:], c[..., 68:])


@pytest.mark.slow  # ~8 s: adaptation end to end, three times (test_adaptation.py covers it quickly)
def test_adaptation_to_the_scan_is_reported_reproducible_and_leaves_inputs_alone(crop, tmp_path, capsys):
    from qid2_diffusers import build_pipeline

    model = tmp_path / "prior-model"
    build_pipeline("tiny", 3, seed=0, physics_prior=True, bval_conditioning=True).save_pretrained(model)
    runs = {}
    for name, extra in (("plain", []), ("a", ["--adapt-steps", "3"]), ("b", ["--adapt-steps", "3"])):
        assert _upsample(crop, tmp_path / name, model, "--n-targets", "12", *extra) == 0
        runs[name] = np.asarray(nib.load(tmp_path / f"{name}.nii.gz").dataobj)
        summary = capsys.readouterr().out.strip().splitlines()[0]  # then the line on denoising and the residual
        assert ("adapted to the scan in" in summary and "(3 steps)" in summary) == bool(extra)
    np.testing.assert_array_equal(runs["a"], runs["b"])
    np.testing.assert_array_equal(runs["a"][..., :68], runs["plain"][..., :68])
    assert not np.array_equal(runs["a"][..., 68:], runs["plain"][..., 68:])


def test_target_choices(tmp_path):
    scheme = uniform_directions(90)
    acquired = scheme[::3]
    complement = choose_targets(acquired)
    assert len(complement) == 60
    assert np.degrees(angular_distance(complement, acquired).min()) > 1.0
    assert len(choose_targets(acquired, n_targets=90)) == 60
    hcp = choose_targets(acquired, scheme="hcp90")  # the phantom's scheme is uniform_directions(90)
    np.testing.assert_allclose(hcp, complement)
    np.savetxt(tmp_path / "rows.bvec", complement[:7].T)
    np.savetxt(tmp_path / "cols.txt", np.vstack([np.zeros(3), complement[:7] * 2]))  # b0 row, unnormalised
    np.testing.assert_allclose(read_targets(tmp_path / "rows.bvec"), complement[:7], atol=1e-9)
    np.testing.assert_allclose(read_targets(tmp_path / "cols.txt"), complement[:7], atol=1e-9)
    with pytest.raises(QID2InputError, match="every direction of a uniform 90-direction scheme is already acquired"):
        choose_targets(scheme)
    with pytest.raises(QID2InputError, match="at most one"):
        choose_targets(acquired, n_targets=90, scheme="hcp90")


def _bad_cases(tmp_path, tiny_model_dir):
    broken = tmp_path / "broken-model"
    shutil.copytree(tiny_model_dir, broken)
    (broken / "direction_encoder" / "diffusion_pytorch_model.safetensors").unlink()
    (tmp_path / "bad.bvec").write_text("0.1 0.2\n0.3 abc\n")
    (tmp_path / "two_rows.bvec").write_text("1 0 0 1\n0 1 0 1\n")
    (tmp_path / "a_file").write_text("")
    return {
        "scheduler": (["--scheduler", "plms"], "unknown scheduler 'plms'"),
        "model files": (["--model", str(broken)], "missing direction_encoder/diffusion_pytorch_model.safetensors"),
        "model R": (["--R", "6"], "trained for R = 3 references, not R = 6"),
        "targets text": (["--targets", str(tmp_path / "bad.bvec")], "malformed targets file"),
        "targets shape": (["--targets", str(tmp_path / "two_rows.bvec")], "expected 3 rows (FSL bvec) or 3 columns"),
        "output folder": (["--out", str(tmp_path / "a_file" / "sub" / "up")], "is a file, so the output folder cannot be created"),
        "shell": (["--shell", "1000"], "no b=1000 shell; shells present: b=3000 (60 volumes)"),
        "samples": (["--num-samples", "0"], "--num-samples must be at least 1"),
        "adaptation": (["--adapt-steps", "-1"], "--adapt-steps must be at least 0"),
    }


@pytest.mark.parametrize("case", ["scheduler", "model files", "model R", "targets text", "targets shape",
                                  "output folder", "shell", "samples", "adaptation"])
def test_bad_input_one_line_error_and_no_output(case, crop, tmp_path, tiny_model_dir, capsys):
    extra, message = _bad_cases(tmp_path, tiny_model_dir)[case]
    out = tmp_path / "out"
    out.mkdir()
    before = set(tmp_path.rglob("*"))
    assert _upsample(crop, out / "up", tiny_model_dir, *extra) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("qid2 upsample: error:") and message in err[0], err
    assert set(tmp_path.rglob("*")) == before  # nothing written, no temporary left behind


@pytest.mark.slow  # ~15 s: two Accelerate processes
def test_two_accelerate_processes_match_one(crop, tmp_path, tiny_model_dir, accelerate_launch):
    args = ["upsample", "--dwi", crop["nii.gz"], "--bvals", crop["bval"], "--bvecs", crop["bvec"], "--shell", "3000",
            "--n-targets", "9", "--model", str(tiny_model_dir), *STEPS, "--num-samples", "2", "--seed", "5"]
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="")
    done = subprocess.run([*accelerate_launch(), *args, "--out", str(tmp_path / "two")], env=env, capture_output=True,
                          text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "2 processes" in done.stdout and done.stdout.count("targets synthesised") == 1
    assert main([*args, "--out", str(tmp_path / "one")]) == 0
    for suffix in (".nii.gz", "_std.nii.gz"):
        one = np.asarray(nib.load(tmp_path / f"one{suffix}").dataobj)
        two = np.asarray(nib.load(tmp_path / f"two{suffix}").dataobj)
        assert one.shape == two.shape and np.abs(one).max() > 0
        # Thread counts differ between the runs, so float sums may round differently.
        np.testing.assert_allclose(two, one, rtol=1e-5, atol=1e-3)
    for suffix in (".bval", ".bvec"):
        np.testing.assert_allclose(np.loadtxt(tmp_path / f"two{suffix}"), np.loadtxt(tmp_path / f"one{suffix}"))


def test_the_command_closes_an_accelerate_process_group_even_after_an_input_error(crop, tmp_path, tiny_model_dir,
                                                                                 free_port):
    """A launched worker must not leave gloo's threads to interpreter shutdown (they aborted a finished worker)."""
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port}", rank=0, world_size=1)
    try:
        assert _upsample(crop, tmp_path / "out", tiny_model_dir, "--num-samples", "0") == 2
        assert not dist.is_initialized()
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def test_example_recovers_truth_for_the_tensor_fits(tmp_path, tiny_model_dir, capsys):
    from qid2_diffusers.example import EXAMPLE_PREFIX, run_example

    report = run_example(tmp_path, model=tiny_model_dir, scheduler="ddim", steps=1, slab=2, progress=False)
    printed = capsys.readouterr().out
    assert "FA MAE" in printed and "QID²" in printed and "tensor fit on the 30 acquired" in printed
    assert "MP-PCA + tensor fit on the 30" in printed and "QID²'s input denoised 48 volumes" in printed
    fa = report["fa"]
    # Known truth: the 90-direction fit beats the 30-direction one, and both are close; denoising first
    # beats the plain fit.
    assert fa["all 90 acquired (reference)"]["fa_mae"] < fa["tensor fit on the 30 acquired"]["fa_mae"] < 0.1
    assert fa["MP-PCA + tensor fit on the 30"]["fa_mae"] < fa["tensor fit on the 30 acquired"]["fa_mae"]
    assert np.isfinite(fa["QID² (b0 + 30 + 60 synthesised)"]["fa_mae"])
    up = nib.load(tmp_path / f"{EXAMPLE_PREFIX}_upsampled.nii.gz")
    given = nib.load(tmp_path / f"{EXAMPLE_PREFIX}_input.nii.gz")
    assert given.shape == (72, 87, 2, 18 + 30) and up.shape == (72, 87, 2, 18 + 30 + 60)
    # The output's acquired volumes are the denoised ones (MP-PCA, the default), on the same grid.
    written, acquired = np.asarray(up.dataobj)[..., :48], np.asarray(given.dataobj)
    assert not np.array_equal(written, acquired)
    assert np.abs(written - acquired).mean() < 0.2 * np.abs(acquired).mean()
    # The example's targets are exactly what --scheme hcp90 gives for its input.
    bvals, bvecs = np.loadtxt(tmp_path / f"{EXAMPLE_PREFIX}_input.bval"), np.loadtxt(tmp_path / f"{EXAMPLE_PREFIX}_input.bvec").T
    np.testing.assert_allclose(np.loadtxt(tmp_path / f"{EXAMPLE_PREFIX}_upsampled.bvec").T[48:],
                               choose_targets(bvecs[bvals > 50], scheme="hcp90"), atol=1e-8)
