"""benchmarks/decision_table.py: ratios to DTI-predict read from qid2 benchmark results, runs merged by label."""

import importlib.util
import json
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "decision_table.py"


def _module():
    spec = importlib.util.spec_from_file_location("decision_table", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _phantom_run(folder, methods):
    """A results.json as qid2 benchmark --data writes it: FA MAE per subject, method and reference."""
    per_subject = {
        subject: {key: {"truth": {"fa_mae": fa * scale}, "acquired": {"fa_mae": fa * scale + 0.01}}
                  for key, (_, fa) in methods.items()}
        for subject, scale in (("phantom-000", 1.0), ("phantom-001", 2.0))
    }
    results = {"methods": [{"key": k, "label": label, "status": "ok"} for k, (label, _) in methods.items()],
               "per_subject": per_subject}
    folder.mkdir()
    (folder / "results.json").write_text(json.dumps(results))
    return folder


def test_runs_with_one_label_share_a_column_and_ratios_are_to_dti(tmp_path, capsys):
    table = _module()
    paper = _phantom_run(tmp_path / "paper", {"qid2": ("paper", 0.03), "dti": ("DTI-predict", 0.02)})
    new = _phantom_run(tmp_path / "new", {"qid2": ("QID² new", 0.015), "dti": ("DTI-predict", 0.02)})
    real = tmp_path / "real"
    real.mkdir()
    (real / "results.json").write_text(json.dumps({
        "methods": [{"key": "qid2", "label": "QID² new"}, {"key": "dti", "label": "DTI-predict"}],
        "fa_ratio": {"ratio": {"mdt-b1000": {"qid2": 0.9, "dti": 1.0}, "mdt-b2000": {"qid2": 1.2, "dti": 1.0}}},
    }))
    assert table.main(["--phantoms", f"b=1000={paper}", f"b=1000={new}", "--real", str(real),
                       "--out", str(tmp_path / "table.md")]) == 0
    lines = (tmp_path / "table.md").read_text().splitlines()
    assert lines[0] == "| method | b=1000 (vs truth) | mdt-b1000 | mdt-b2000 |"
    rows = {line.split(" | ")[0][2:]: line.split(" | ")[1:] for line in lines[2:]}
    assert rows["paper"] == ["1.500", "–", "– |"]
    assert rows["QID² new"] == ["**0.750**", "**0.900**", "1.200 |"]  # below 1 in bold
    assert rows["DTI-predict"][0] == "1.000"
    # Against the acquisition, the +0.01 offset changes the ratios.
    assert table.phantom_ratios(json.loads((new / "results.json").read_text()), "acquired")["QID² new"] == pytest.approx(
        (0.025 + 0.04) / (0.03 + 0.05))
    assert capsys.readouterr().out.startswith("| method |")


def test_ratios_to_denoise_then_fit_and_the_denoised_reference(tmp_path):
    table = _module()
    run = _phantom_run(tmp_path / "p", {"qid2": ("QID²", 0.018), "dti": ("DTI-predict", 0.027),
                                        "mppca+dti": ("MP-PCA + DTI-predict", 0.016)})
    real = {"methods": [{"key": k, "label": v} for k, v in (("qid2", "QID²"), ("dti", "DTI-predict"),
                                                            ("mppca+dti", "MP-PCA + DTI-predict"))],
            "fa_ratio": {"ratio": {"mdt-b1000": {"qid2": 0.9, "dti": 1.0, "mppca+dti": 0.8}}},
            "fa_ratio_denoised": {"mdt-b1000": {"qid2": 0.95, "dti": 1.0, "mppca+dti": 0.76}}}
    raw = _phantom_run(tmp_path / "raw", {"qid2": ("QID² raw", 0.024)})  # no baseline of its own: the column's
    text = table.decision_table([("b=1000", json.loads((run / "results.json").read_text())),
                                 ("b=1000", json.loads((raw / "results.json").read_text()))], real,
                                baseline="mppca+dti")
    lines = text.splitlines()
    assert lines[0] == "| method | b=1000 (vs truth) | mdt-b1000 | mdt-b1000 (vs denoised) |"
    rows = {line.split(" | ")[0][2:]: line.split(" | ")[1:] for line in lines[2:]}
    assert rows["QID²"] == ["1.125", "1.125", "1.250 |"]  # 0.018 / 0.016, 0.9 / 0.8, 0.95 / 0.76
    assert rows["MP-PCA + DTI-predict"] == ["1.000", "1.000", "1.000 |"]
    assert rows["DTI-predict"][0] == "1.688"
    assert rows["QID² raw"] == ["1.500", "–", "– |"]  # 0.024 / 0.016
