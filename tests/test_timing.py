"""Stage timings of an up-sampling run, ``qid2 upsample --timings`` and the HCP-grid speed script."""

import importlib.util
import json
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from qid2_diffusers.cli import main
from qid2_diffusers.data.io import load_dwi
from qid2_diffusers.inference import upsample_dwi
from qid2_diffusers.timing import STAGES, format_timings

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def _script(name):
    spec = importlib.util.spec_from_file_location(name, BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def one_step_prior_model(tmp_path_factory):
    """A tiny model of the kind to be shipped, with its defaults: prior, b tokens, DDIM 1 step, 1 adaptation step."""
    from qid2_diffusers import build_pipeline
    from qid2_diffusers.schedulers import make_scheduler

    pipe = build_pipeline("tiny", 3, seed=0, physics_prior=True, bval_conditioning=True, default_num_inference_steps=1)
    pipe.scheduler = make_scheduler("ddim", pipe.scheduler.config)
    pipe.register_to_config(default_adapt_steps=1)
    path = tmp_path_factory.mktemp("tiny-one-step")
    pipe.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def crop(real_data_dir):
    return {k: str(real_data_dir / f"b3000.{k}") for k in ("nii.gz", "bval", "bvec")}


def test_every_second_of_a_run_sits_in_its_stage(crop, one_step_prior_model, tmp_path, monkeypatch):
    from qid2_diffusers.hub import load_pipeline
    from qid2_diffusers.pipelines import QID2Upsampler
    from qid2_diffusers import upsampling

    # Known delays in two stages: each must land in its own stage, and only there.
    sample, batches = QID2Upsampler.predict_batch, []

    class SlowPrior(upsampling.TensorPrior):
        def __init__(self, *args, **kwargs):
            time.sleep(0.3)
            super().__init__(*args, **kwargs)

    def slow_batch(self, *args, **kwargs):
        batches.append(1)
        time.sleep(0.05)
        return sample(self, *args, **kwargs)

    monkeypatch.setattr(upsampling, "TensorPrior", SlowPrior)
    monkeypatch.setattr(QID2Upsampler, "predict_batch", slow_batch)
    pipe = load_pipeline(one_step_prior_model, device="cpu")
    dwi = load_dwi(crop["nii.gz"], crop["bval"], crop["bvec"])
    start = time.perf_counter()
    result = upsample_dwi(dwi, None, pipe, shells=3000, n_targets=12, batch_size=8, progress=False)
    assert set(result.timings) == set(STAGES) - {"write"}
    result.save(tmp_path / "up", dwi.affine, dwi.header)
    wall = time.perf_counter() - start
    timings = result.timings
    assert set(timings) == set(STAGES) and min(timings.values()) >= 0
    # The adaptation the model asks for (its default) runs and is timed on its own.
    assert result.adapt_steps == 1 and timings["adaptation"] > 0
    assert timings["prior_fit"] >= 0.3
    assert len(batches) > 1 and timings["sampling"] >= 0.05 * len(batches)
    assert timings["batching"] < timings["sampling"]
    # Stages do not overlap and nothing is left out: their sum is the wall time.
    assert sum(timings.values()) <= wall
    assert wall - sum(timings.values()) < 0.1 * wall
    line = format_timings(timings)
    assert line.startswith("timings: read ") and line.count(" s,") == len(STAGES) - 1 and "prior fit" in line


def test_adaptation_seconds_is_the_adaptation_stage_of_the_timings():
    """One record of the adaptation time: the result's figure follows its timings, 0 when none ran."""
    from qid2_diffusers.inference import UpsampleResult

    result = UpsampleResult(data=np.zeros((2, 2, 1, 3)), bvals=np.zeros(3), bvecs=np.zeros((3, 3)), n_input=2,
                            mask=np.ones((2, 2, 1), bool), timings={"read": 1.0, "sampling": 2.0})
    assert result.adaptation_seconds == 0.0
    result.timings["adaptation"] = 4.5
    assert result.adaptation_seconds == 4.5
    with pytest.raises(TypeError):
        UpsampleResult(data=result.data, bvals=result.bvals, bvecs=result.bvecs, n_input=2, mask=result.mask,
                       adaptation_seconds=1.0)


def test_cli_prints_the_timings_on_one_line(crop, one_step_prior_model, tmp_path, capsys):
    args = ["upsample", "--dwi", crop["nii.gz"], "--shell", "3000", "--n-targets", "12", "--adapt-steps", "0",
            "--model", str(one_step_prior_model), "--out", str(tmp_path / "up")]
    assert main(args) == 0
    plain = capsys.readouterr().out.strip().splitlines()
    assert main([*args, "--timings"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    # The summary, what was done to the input and the residual kept, then the timings.
    assert len(plain) == 2 and len(lines) == 3 and lines[0].startswith("qid2 upsample: 12 targets")
    assert lines[1].startswith("qid2 upsample: input not denoised: MP-PCA needs") and "residual" in lines[1]
    stages = dict(part.rsplit(" ", 2)[:2] for part in lines[2].removeprefix("timings: ").split("; ")[0].split(", "))
    # Every stage: the residual weight's leave-one-out predictions are the adaptation stage.
    assert set(stages) == {s.replace("_", " ") for s in STAGES}
    total = float(lines[2].rsplit("total ", 1)[1].removesuffix(" s"))
    assert total == pytest.approx(sum(float(v) for v in stages.values()), abs=0.01 * len(stages))


@pytest.mark.slow  # ~7 s: the HCP-grid benchmark script
def test_hcp_grid_script_reports_every_stage_and_extrapolates(one_step_prior_model, tmp_path, monkeypatch):
    bench = _script("bench_gpu_volume")
    out = tmp_path / "run.json"
    monkeypatch.setattr(sys, "argv", ["bench_gpu_volume.py", "--model", str(one_step_prior_model), "--device", "cpu",
                                      "--threads", "1", "--resolution", "5", "--slab", "6", "--slices", "2",
                                      "--residual-weight", "1", "--json", str(out)])
    bench.main()
    row = json.loads(out.read_text())
    assert set(row["timings"]) == set(STAGES) and set(row["measured"]["timings"]) == set(STAGES)
    assert all(v >= 0 for v in row["timings"].values()) and row["timings"]["sampling"] > 0
    assert (row["volumes_in"], row["volumes_out"], row["targets"], row["steps"], row["adapt_steps"]) == (48, 108, 60, 1, 1)
    assert row["device"].startswith("cpu") and row["peak_gpu_mem_gib"] is None and row["output_finite"] and row["warm_up_s"] > 0
    assert row["measured"]["slices"] == 2 and row["brain_slices"] > 2
    assert row["network_passes"] == row["brain_slices"] * 60 and row["gflop_per_pass"] > 0
    factors, measured = row["extrapolation_factors"], row["measured"]["timings"]
    # Per-slice stages scale with the pixels the network sees: each brain slice's own box, summed.
    assert factors["slices"] == pytest.approx(row["brain_slices"] / 2) and factors["pixels"] > 1
    for stage in ("sampling", "batching", "prior_predict"):
        assert row["timings"][stage] == pytest.approx(measured[stage] * factors["pixels"])
    # The prior's tensor fit is timed apart on the whole brain: its fixed costs do not scale with voxels.
    assert row["timings"]["prior_fit"] > 0 and set(factors) == {"slices", "pixels"}
    for stage in ("read", "write", "adaptation", "other"):
        assert row["timings"][stage] == measured[stage]
    assert row["total_s"] == pytest.approx(sum(row["timings"].values()))
    assert row["pairs_per_s"] == pytest.approx(row["brain_slices"] * 60 / row["total_s"])
    assert 0 < row["peak_rss_gib"] < 4 or np.isnan(row["peak_rss_gib"])


def test_bound_script_puts_each_stage_against_the_bound(capsys):
    bench = _script("bench_bound")
    stages = {"threads": 1, "network_passes": 100, "gflop_per_pass": 2.0, "timings": {"read": 1.0, "sampling": 8.0, "write": 1.0}}
    table = {r["stage"]: r for r in bench.stage_table(stages, {1: {"bound_gflops": 50.0}})}
    # 100 passes x 2 GFLOP at 50 GFLOP/s: 4 s at the bound.
    assert table["sampling"]["per_bound"] == pytest.approx(2.0) and table["total"]["per_bound"] == pytest.approx(2.5)
    assert table["read"]["share"] == pytest.approx(0.1) and list(table)[-1] == "total"
    assert "sampling runs at 50% of the bound; the whole run at 40%" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        bench.stage_table(dict(stages, threads=2), {1: {"bound_gflops": 50.0}})
