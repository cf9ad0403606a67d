"""Real evaluation scans: the committed MRtrix3 crops and the mdt wheel's Siemens scan."""

import zipfile

import numpy as np
import pytest

from qid2_diffusers.data.real import MDT_FILES, MIN_KEPT, fetch_mdt_example, kept_count, real_cases
from qid2_diffusers.errors import QID2InputError


def test_every_real_case_is_present_with_its_shell(real_data_dir):
    cases = {c.name: c for c in real_cases(real_data_dir)}
    assert set(cases) == {"mdt-b1000", "mdt-b2000", "mrtrix-msmt-b700", "mrtrix-msmt-b1200",
                          "mrtrix-msmt-b2800", "mrtrix-b3000"}
    mdt = cases["mdt-b2000"].load()
    assert mdt.shape == (104, 104, 2, 103)
    assert {b: len(i) for b, i in mdt.shells.items()} == {1000: 30, 2000: 60}
    assert len(mdt.b0_indices) == 13
    assert mdt.mask is not None and 5000 < mdt.mask.sum() < 104 * 104 * 2


def test_kept_count_is_a_third_but_enough_for_a_tensor():
    assert kept_count(30) == 10 and kept_count(60) == 20 and kept_count(50) == 17
    assert kept_count(16) == MIN_KEPT


def test_missing_scan_is_one_line_naming_the_fetch_command(tmp_path):
    with pytest.raises(QID2InputError, match="python -m qid2_diffusers.data.real"):
        real_cases(tmp_path)
    assert real_cases(tmp_path, require_all=False) == []


def _wheel(path, folder, tamper=False):
    with zipfile.ZipFile(path, "w") as zf:
        for name, (new, _) in MDT_FILES.items():
            data = (folder / new).read_bytes()
            zf.writestr(f"mdt/data/mdt_example_data/b1k_b2k/{name}", data + (b"x" if tamper else b""))
    return path


def test_fetch_extracts_checked_files_and_never_leaves_a_partial_folder(real_data_dir, tmp_path):
    source = real_data_dir / "mdt_b1k_b2k"
    good = fetch_mdt_example(tmp_path / "ok", wheel=_wheel(tmp_path / "good.whl", source))
    for _, (new, _) in MDT_FILES.items():
        assert (good / new).read_bytes() == (source / new).read_bytes()
    with pytest.raises(RuntimeError, match="SHA-256"):
        fetch_mdt_example(tmp_path / "bad", wheel=_wheel(tmp_path / "bad.whl", source, tamper=True))
    assert not any(p.name.startswith("mdt") for p in (tmp_path / "bad").iterdir())
    assert not list((tmp_path / "bad").glob(".*tmp"))
