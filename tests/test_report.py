"""The rule that sets the default sampler, and the speed issue's table script."""

import importlib.util
import json
from pathlib import Path

import pytest

from qid2_diffusers.evaluation.report import recommend_sampler, sweep_table

REF = ("ddpm", 1000)


def _rows(**fa):
    rows = {REF: {"fa_mae": 0.030, "ssim": 0.9, "fa_mae_truth": 0.04}}
    for key, value in fa.items():
        name, steps = key.rsplit("_", 1)
        rows[(name.replace("dpmpp", "dpm++"), int(steps))] = {"fa_mae": value, "ssim": 0.9, "fa_mae_truth": None}
    return rows


def test_fewest_passes_within_tolerance_wins():
    # 0.0315 is the 5% bound: ddim 2 is just outside, ddim 5 and unipc 5 inside; dpm++ 10 is best but costs more.
    rows = _rows(ddim_2=0.0316, ddim_5=0.0314, unipc_5=0.0312, dpmpp_10=0.029)
    assert recommend_sampler(rows, REF, 0.05) == ("unipc", 5)  # tie on passes: lower FA error
    assert recommend_sampler(rows, REF, 0.06) == ("ddim", 2)
    # Better than the reference counts as within.
    assert recommend_sampler(_rows(ddim_1=0.020, ddim_5=0.025), REF) == ("ddim", 1)


def test_reference_when_nothing_qualifies():
    assert recommend_sampler(_rows(ddim_5=0.040, unipc_10=0.033), REF, 0.05) == REF


def test_table_marks_rows_and_choice():
    table = sweep_table(_rows(ddim_2=0.0316, ddim_5=0.0314, unipc_5=0.0312), REF, 0.05)
    lines = table.splitlines()
    assert lines[2].startswith("| ddpm | 1000 | 0.0300 | 1.000 |")  # the reference first
    assert "| **unipc** | 5 | 0.0312 | 1.040 ✓ |" in table
    assert "| ddim | 2 | 0.0316 | 1.053 |" in table  # outside: no tick
    assert table.count("✓") == 2 and table.count("**") == 2


def test_steps_table_script_merges_runs(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("steps_table", Path(__file__).parents[1] / "benchmarks" / "steps_table.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    fast, slow = tmp_path / "fast", tmp_path / "slow"
    for folder, mean in ((fast, {"ddim": {"1": {"fa_mae": 0.021, "ssim": 0.9}, "5": {"fa_mae": 0.022, "ssim": 0.89}}}),
                         (slow, {"ddpm": {"1000": {"fa_mae": 0.0205, "ssim": 0.88}}})):
        folder.mkdir()
        (folder / "results.json").write_text(json.dumps({"sweep": {"subjects": ["s"], "slices": 1, "mean": mean}}))
    assert module.main([str(fast), str(slow), "--figure", str(tmp_path / "sweep.png")]) == 0
    assert (tmp_path / "sweep.png").read_bytes()[:4] == b"\x89PNG"
    printed = capsys.readouterr().out
    assert "| **ddim** | 1 | 0.0210 | 1.024 ✓ |" in printed
    assert "ddim, 1 steps (FA error 0.0210 vs 0.0205)" in printed
    with pytest.raises(SystemExit, match="ddpm:1000 is in none of the sweeps"):
        module.main([str(fast)])
    with pytest.raises(SystemExit, match="not a qid2 benchmark result"):
        module.main([str(tmp_path)])


def test_equal_one_step_samplers_resolve_by_name():
    rows = _rows(unipc_1=0.0237, dpmpp_1=0.0237, ddim_1=0.02370001, ddim_5=0.025)
    assert recommend_sampler(rows, REF) == ("ddim", 1)
