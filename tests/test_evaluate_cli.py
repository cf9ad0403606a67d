"""`qid2 evaluate` and `qid2 benchmark` end to end on tiny data."""

import json

import numpy as np
import pytest

from qid2_diffusers.cli import main
from qid2_diffusers.data.io import save_dwi, save_nifti
from qid2_diffusers.directions import uniform_directions

SHAPE = (16, 16, 4)


@pytest.fixture(scope="module")
def acquisition(tmp_path_factory):
    """A 2 b0 + 90 direction single-tensor DWI with noise, its mask and a prediction of 60 targets."""
    root = tmp_path_factory.mktemp("evaluate")
    rng = np.random.default_rng(0)
    bvals = np.r_[0.0, 0.0, np.full(90, 1000.0)]
    bvecs = np.r_[np.zeros((2, 3)), uniform_directions(90)]
    n = int(np.prod(SHAPE))
    rot = np.linalg.qr(rng.normal(size=(n, 3, 3)))[0]
    evals = np.stack([rng.uniform(1e-3, 2e-3, n), np.full(n, 0.4e-3), np.full(n, 0.3e-3)], axis=1)
    d = np.einsum("nij,nj,nkj->nik", rot, evals, rot)
    signal = 1000 * np.exp(-bvals[None] * np.einsum("mi,nij,mj->nm", bvecs, d, bvecs))
    data = (signal.reshape(*SHAPE, -1) + rng.normal(0, 15, SHAPE + (92,))).astype(np.float32)
    mask = np.zeros(SHAPE, bool)
    mask[2:14, 2:14] = True
    affine = np.diag([2.0, 2.0, 2.0, 1.0])
    save_dwi(root / "ref", data, bvals, bvecs, affine)
    save_nifti(root / "mask.nii.gz", mask, affine, dtype=np.uint8)
    targets = np.arange(32, 92)
    pred = data.copy()
    # An imperfect prediction of 60 volumes: biased and noisier.
    pred[..., targets] = data[..., targets] * 0.9 + 20 + rng.normal(0, 40, SHAPE + (60,)).astype(np.float32)
    save_dwi(root / "pred", pred, bvals, bvecs, affine)
    return {
        "root": root,
        "data": data,
        "pred": pred,
        "bvals": bvals,
        "bvecs": bvecs,
        "mask": mask,
        "affine": affine,
        "targets": targets,
    }


def _evaluate(root, pred, ref="ref", mask="mask.nii.gz", out="m.json"):
    argv = ["evaluate", "--pred", str(root / pred), "--ref", str(root / ref), "--mask", str(root / mask)]
    if out:
        argv += ["--out", str(root / out)]
    return main(argv)


def test_identical_data_is_perfect(acquisition):
    root = acquisition["root"]
    assert _evaluate(root, "ref", out="same.json") == 0
    m = json.loads((root / "same.json").read_text())
    assert m["ssim"] == pytest.approx(1.0) and m["fa_mae"] == 0.0 and m["fa_ssim"] == pytest.approx(1.0)
    assert m["md_mae"] == 0.0 and m["nrmse"] == 0.0
    assert m["psnr"] is None  # infinite; strict JSON has no infinity
    assert m["n_scored_volumes"] == 90 and m["fid"] is None and "pass --fid-weights" in m["fid_note"]


def test_volumes_are_matched_by_direction_not_position(acquisition):
    from qid2_diffusers.evaluation import SubjectEvaluation

    a = acquisition
    root = a["root"]
    assert _evaluate(root, "pred", out="in_order.json") == 0
    in_order = json.loads((root / "in_order.json").read_text())
    # Only the 60 predictions: 2 b0s + the target volumes, shuffled, half of them sign-flipped.
    order = np.random.default_rng(1).permutation(a["targets"])
    flip = np.where(np.arange(60) % 2, -1.0, 1.0)[:, None]
    save_dwi(
        root / "shuffled",
        np.concatenate([a["pred"][..., :2], a["pred"][..., order]], axis=-1),
        np.r_[0.0, 0.0, a["bvals"][order]],
        np.r_[np.zeros((2, 3)), a["bvecs"][order] * flip],
        a["affine"],
    )
    assert _evaluate(root, "shuffled", out="shuffled.json") == 0
    shuffled = json.loads((root / "shuffled.json").read_text())
    assert in_order["n_scored_volumes"] == shuffled["n_scored_volumes"] == 60
    assert in_order["n_carried_over"] == 30 and shuffled["n_carried_over"] == 0
    for key in ("ssim", "psnr", "nrmse", "fa_mae", "fa_ssim", "md_mae", "angular_error_deg"):
        assert shuffled[key] == pytest.approx(in_order[key], rel=1e-6), key
    direct = SubjectEvaluation(a["data"], a["bvals"], a["bvecs"], a["mask"]).score(
        a["pred"][..., a["targets"]], a["bvecs"][a["targets"]]
    )["acquired"]
    assert shuffled["fa_mae"] == pytest.approx(direct["fa_mae"], rel=1e-6) and direct["fa_mae"] > 0.005
    assert shuffled["ssim"] == pytest.approx(direct["ssim"], rel=1e-6) and direct["ssim"] < 0.99


def test_a_multi_shell_prediction_is_scored_on_the_chosen_shell(acquisition, capsys):
    a = acquisition
    root = a["root"]
    # As `qid2 upsample` writes it: every input volume (here another shell too), then the synthesised ones.
    save_dwi(
        root / "multi",
        np.concatenate([a["pred"], a["data"][..., 2:12]], axis=-1),
        np.r_[a["bvals"], np.full(10, 2000.0)],
        np.r_[a["bvecs"], a["bvecs"][2:12]],
        a["affine"],
    )
    _one_line_error(
        capsys,
        _evaluate(root, "multi", out="multi.json"),
        "multi.nii.gz",
        "several shells (b=1000, b=2000); choose one with --shell",
    )
    assert (
        main(
            [
                "evaluate",
                "--pred",
                str(root / "multi"),
                "--ref",
                str(root / "ref"),
                "--mask",
                str(root / "mask.nii.gz"),
                "--shell",
                "1000",
                "--out",
                str(root / "multi.json"),
            ]
        )
        == 0
    )
    assert _evaluate(root, "pred", out="in_order.json") == 0
    multi = json.loads((root / "multi.json").read_text())
    assert multi == {**json.loads((root / "in_order.json").read_text()), "pred": str(root / "multi.nii.gz")}


def _one_line_error(capsys, code, *fragments):
    assert code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    for fragment in fragments:
        assert fragment in err, err
    return err


def test_bad_input_is_one_line(acquisition, capsys):
    a = acquisition
    root = a["root"]
    other = a["pred"][:, :15]
    save_dwi(root / "small", other, a["bvals"], a["bvecs"], a["affine"])
    _one_line_error(capsys, _evaluate(root, "small", out="bad1.json"), "small.nii.gz", "grid (16, 15, 4) differs")

    tilted = a["bvecs"].copy()
    tilted[40] = [0.0, 0.6, 0.8] if abs(tilted[40] @ [0.0, 0.6, 0.8]) < 0.9 else [0.6, 0.8, 0.0]
    save_dwi(root / "tilted", a["pred"], a["bvals"], tilted, a["affine"])
    _one_line_error(capsys, _evaluate(root, "tilted", out="bad2.json"), "tilted.nii.gz", "not in the reference")

    save_nifti(root / "mask_small.nii.gz", a["mask"][:, :, :3], a["affine"], dtype=np.uint8)
    _one_line_error(
        capsys,
        _evaluate(root, "pred", mask="mask_small.nii.gz", out="bad3.json"),
        "mask_small.nii.gz",
        "mask shape (16, 16, 3)",
    )

    _one_line_error(capsys, _evaluate(root, "absent", out="bad4.json"), "absent.nii.gz", "file not found")
    assert not any((root / f"bad{i}.json").exists() for i in range(1, 5))


@pytest.fixture(scope="module")
def phantom_data(tmp_path_factory):
    """One 2-slice phantom subject in the HCP layout, its mask cut to a 24 x 24 patch of brain
    so that the network's work stays small."""
    from qid2_diffusers.data.phantom import make_subject, write_subject

    data = tmp_path_factory.mktemp("phantoms")
    subject = make_subject(0, slab=2)
    diffusion = write_subject(subject, data, "phantom-000") / "T1w" / "Diffusion"
    centre = np.argwhere(subject.mask).mean(axis=0).astype(int)
    mask = np.zeros_like(subject.mask)
    mask[centre[0] - 12 : centre[0] + 12, centre[1] - 12 : centre[1] + 12] = True
    save_nifti(diffusion / "nodif_brain_mask.nii.gz", mask & subject.mask, subject.affine, dtype=np.uint8)
    return data


def test_benchmark_end_to_end_on_a_phantom(phantom_data, tmp_path, tiny_model_dir, capsys):
    data = phantom_data
    diffusion = data / "phantom-000" / "T1w" / "Diffusion"
    from qid2_diffusers.models.gan import QGANGenerator

    out = tmp_path / "bench"
    QGANGenerator(num_references=3, block_out_channels=(8, 16), embed_dim=8, norm_num_groups=4).save_pretrained(
        tmp_path / "qgan"
    )
    code = main(
        [
            "benchmark",
            "--data",
            str(data),
            "--methods",
            "qid2,cgan,qgan,interp,dti,sh4",
            "--R",
            "3",
            "--model",
            str(tiny_model_dir),
            "--qgan",
            str(tmp_path / "qgan"),
            "--scheduler",
            "ddim",
            "--steps",
            "2",
            "--subjects",
            "1",
            "--n-acquired",
            "80",
            "--save-predictions",
            "--no-progress",
            "--out",
            str(out),
            "--sweep-steps",
            "2",
            "--sweep-schedulers",
            "ddim,unipc",
        ]
    )
    assert code == 0
    printed = capsys.readouterr().out
    assert "skipping cGAN (R=3): no cgan weights given (pass --cgan PATH)" in printed
    assert "| Methods | Image FID ↓ | Image SSIM ↑ | FA Error ↓ | FA Map SSIM ↑" in printed
    results = json.loads((out / "results.json").read_text())
    assert results["command"].startswith("qid2 benchmark --data") and results["wall_time_s"] > 0
    # 80 kept as acquired leaves 10 targets, which keeps the untrained network's work small.
    assert results["settings"]["n_acquired"] == 80
    assert (results["settings"]["scheduler"], results["settings"]["steps"]) == ("ddim", 2)
    assert results["sweep"]["slices"] is None  # --sweep-slices not given: the whole subject
    scores = results["per_subject"]["phantom-000"]
    assert set(scores) == {"qid2-r3", "qgan-r3", "interp-r3", "dti", "sh4", "acquired-all"}
    for key in ("qid2-r3", "qgan-r3", "interp-r3", "dti", "sh4"):
        for ref in ("acquired", "truth"):
            for metric in ("ssim", "psnr", "nrmse", "fa_mae", "fa_ssim", "md_mae", "angular_error_deg"):
                assert np.isfinite(scores[key][ref][metric]), (key, ref, metric)
    assert np.isfinite(scores["acquired-all"]["truth"]["fa_mae"])
    # The classical fits beat an untrained network.
    assert scores["dti"]["acquired"]["fa_mae"] < scores["qid2-r3"]["acquired"]["fa_mae"]
    table = (out / "results.md").read_text()
    for label in (
        "QID² (R=3)",
        "qGAN (R=3)",
        "Interp (R=3)",
        "DTI-predict",
        "SH (order 4)",
        "Acquired 90 (noise floor, vs truth)",
    ):
        assert f"| {label}" in table
    # The sweep's DDIM 2-step run is the main run again: same seed, same numbers.
    sweep = results["sweep"]["mean"]
    assert set(sweep) == {"ddim", "unipc"} and set(sweep["unipc"]) == {"2"}
    assert sweep["ddim"]["2"]["fa_mae"] == scores["qid2-r3"]["acquired"]["fa_mae"]
    assert sweep["ddim"]["2"]["fa_mae_truth"] == scores["qid2-r3"]["truth"]["fa_mae"]
    for name in ("fa_maps.png", "slice_grid.png", "steps_sweep.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # One metric implementation: `qid2 evaluate` on the saved prediction gives the benchmark's numbers.
    assert (
        main(
            [
                "evaluate",
                "--pred",
                str(out / "predictions" / "phantom-000" / "interp-r3"),
                "--ref",
                str(diffusion / "data.nii.gz"),
                "--mask",
                str(diffusion / "nodif_brain_mask.nii.gz"),
                "--out",
                str(tmp_path / "interp.json"),
            ]
        )
        == 0
    )
    evaluated = json.loads((tmp_path / "interp.json").read_text())
    for metric, value in scores["interp-r3"]["acquired"].items():
        assert evaluated[metric] == pytest.approx(value, rel=1e-9), metric


def test_benchmark_rejects_bad_options(phantom_data, tmp_path, capsys):
    argv = ["benchmark", "--data", str(phantom_data), "--out", str(tmp_path / "o"), "--no-progress"]
    _one_line_error(capsys, main(argv + ["--methods", "interp,sh5"]), "unknown method 'sh5'")
    _one_line_error(capsys, main(argv + ["--methods", "interp", "--subjects", "2"]), "1 subjects found")
    _one_line_error(capsys, main(argv + ["--methods", "interp", "--subject-ids", "phantom-9"]), "phantom-9 not found")
    assert not (tmp_path / "o").exists()


def test_benchmark_scores_a_lower_precision_network(phantom_data, tmp_path, tiny_model_dir, capsys):
    """--dtype runs QID²'s network in bf16 (what CPU speed-ups would cost in accuracy); the command records it."""
    argv = ["benchmark", "--data", str(phantom_data), "--methods", "qid2", "--R", "3", "--model", str(tiny_model_dir),
            "--scheduler", "ddim", "--steps", "1", "--subjects", "1", "--n-acquired", "80", "--no-progress"]
    fa = {}
    for dtype in ("fp32", "bf16"):
        assert main(argv + ["--dtype", dtype, "--out", str(tmp_path / dtype)]) == 0
        results = json.loads((tmp_path / dtype / "results.json").read_text())
        assert ("--dtype bf16" in results["command"]) == (dtype == "bf16")
        fa[dtype] = results["per_subject"]["phantom-000"]["qid2-r3"]["acquired"]["fa_mae"]
    # Same seed and noise: bf16 rounding moves the FA error a little, not a lot.
    assert np.isfinite(fa["bf16"]) and fa["bf16"] != fa["fp32"]
    assert fa["bf16"] == pytest.approx(fa["fp32"], rel=0.2)
    capsys.readouterr()
    _one_line_error(capsys, main(argv + ["--dtype", "fp8", "--out", str(tmp_path / "o")]), "unknown dtype 'fp8'")
    assert not (tmp_path / "o").exists()
