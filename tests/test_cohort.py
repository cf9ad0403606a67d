"""``qid2 upsample --cohort``: spread over processes, equal to single-subject runs, resumable, robust to a bad subject."""

import csv
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from qid2_diffusers.cli import main
from qid2_diffusers.cohort import SUMMARY_NAME, find_cohort, output_prefix
from qid2_diffusers.data.io import save_dwi, save_nifti
from qid2_diffusers.data.layouts import discover_subjects, read_subject_list
from qid2_diffusers.directions import uniform_directions
from qid2_diffusers.errors import QID2InputError

REPO = Path(__file__).resolve().parents[1]
#: Subject id -> (offset of its 16 x 16 box in the phantom crop, with a mask file).
SUBJECTS = {"sub-01": ((4, 4), True), "sub-02_ses-1_run-1": ((14, 20), True), "sub-03": ((24, 30), False)}
OUTPUTS = {
    "sub-01": "sub-01/dwi/sub-01_desc-qid2_dwi",
    "sub-02_ses-1_run-1": "sub-02/ses-1/dwi/sub-02_ses-1_run-1_desc-qid2_dwi",
    "sub-03": "sub-03/dwi/sub-03_desc-qid2_dwi",
}


def _bids_folder(root: Path, prefix: str) -> Path:
    return root.joinpath(*[p for p in prefix.split("_") if p.startswith(("sub-", "ses-"))], "dwi")


@pytest.fixture(scope="module")
def cohort(tmp_path_factory, phantom_slab):
    """Three tiny BIDS subjects cut from one phantom (16 x 16 x 2, 2 b0 + 15 directions), and 4 target directions."""
    root = tmp_path_factory.mktemp("cohort")
    s = phantom_slab
    volumes = np.r_[np.flatnonzero(s["bvals"] < 50)[:2], np.flatnonzero(s["bvals"] > 50)[::6]]
    for prefix, ((x, y), with_mask) in SUBJECTS.items():
        folder = _bids_folder(root / "bids", prefix)
        box = (slice(x, x + 16), slice(y, y + 16))
        save_dwi(folder / f"{prefix}_dwi", s["dwi"][box][..., volumes], s["bvals"][volumes], s["bvecs"][volumes],
                 s["affine"])
        if with_mask:
            save_nifti(folder / f"{prefix}_desc-brain_mask.nii.gz", s["mask"][box].astype(np.uint8), s["affine"])
    (root / "bids" / "dataset_description.json").write_text('{"Name": "tiny phantoms", "BIDSVersion": "1.10.0"}')
    np.savetxt(root / "targets.bvec", uniform_directions(4, seed=1).T)
    return root


def _options(cohort, model, *extra, steps=2):
    return ["--model", str(model), "--targets", str(cohort / "targets.bvec"), "--steps", str(steps),
            "--scheduler", "ddim", "--seed", "3", *extra]


def _env():
    # Same thread count as the tests' own process (conftest): identical float sums, identical bits.
    path = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)
    return dict(os.environ, CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1", PYTHONPATH=path)


def _summary(out: Path) -> dict[str, dict]:
    with open(out / SUMMARY_NAME, newline="") as fh:
        return {row["subject"]: row for row in csv.DictReader(fh, delimiter="\t")}


def _series(prefix: Path) -> dict[str, object]:
    images = {s: np.asarray(nib.load(f"{prefix}{s}").dataobj) for s in (".nii.gz", "_std.nii.gz")
              if Path(f"{prefix}{s}").exists()}
    return {**images, **{s: Path(f"{prefix}{s}").read_text() for s in (".bval", ".bvec")}}


def _leftovers(out: Path) -> list[str]:
    """Files that are neither an output, a done-marker nor the summary/description."""
    allowed = (".nii.gz", ".bval", ".bvec", ".qid2-done.json", SUMMARY_NAME, "dataset_description.json")
    return sorted(p.name for p in out.rglob("*") if p.is_file() and (".tmp" in p.name or not p.name.endswith(allowed)))


@pytest.fixture(scope="module")
def two_processes(cohort, tiny_model_dir, accelerate_launch):
    """The cohort up-sampled by two Accelerate processes on the CPU."""
    out = cohort / "two-processes"
    args = ["upsample", "--cohort", str(cohort / "bids"), "--out-dir", str(out),
            *_options(cohort, tiny_model_dir, "--num-samples", "2")]
    done = subprocess.run([*accelerate_launch(), *args], env=_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return out, done


@pytest.mark.slow  # ~8 s: two Accelerate processes
def test_two_processes_write_what_single_subject_runs_write_bit_for_bit(two_processes, cohort, tiny_model_dir,
                                                                        tmp_path, capsys):
    out, done = two_processes
    assert done.stdout.count("3 subjects on 2 processes: 3 done, 0 skipped (already done), 0 failed") == 1
    # Round robin over the global process index: sub-01 and sub-03 on the first process, sub-02 on the second.
    assert "[process 2/2] sub-02_ses-1_run-1: done" in done.stderr
    assert "[process 1/2] sub-01: done" in done.stderr and "[process 1/2] sub-03: done" in done.stderr
    summary = _summary(out)
    assert list(summary) == list(SUBJECTS)
    for subject, prefix in OUTPUTS.items():
        row = summary[subject]
        assert (row["status"], row["targets"], row["output"], row["reason"]) == ("done", "4", f"{prefix}.nii.gz", "")
        folder = _bids_folder(cohort / "bids", subject)
        mask = ["--mask", str(folder / f"{subject}_desc-brain_mask.nii.gz")] if SUBJECTS[subject][1] else []
        assert main(["upsample", "--dwi", str(folder / f"{subject}_dwi.nii.gz"), *mask, "--out", str(tmp_path / subject),
                     *_options(cohort, tiny_model_dir, "--num-samples", "2")]) == 0
        single, from_cohort = _series(tmp_path / subject), _series(out / prefix)
        assert sorted(from_cohort) == [".bval", ".bvec", ".nii.gz", "_std.nii.gz"] == sorted(single)
        assert from_cohort[".nii.gz"].shape == (16, 16, 2, 17 + 4) and np.abs(from_cohort[".nii.gz"][..., 17:]).max() > 0
        for key, value in single.items():
            np.testing.assert_array_equal(from_cohort[key], value, err_msg=f"{subject}{key}")
    capsys.readouterr()


def test_bids_derivative_names_and_description(two_processes, cohort):
    out, _ = two_processes
    written = sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file())
    expected = [f"{prefix}{ext}" for prefix in OUTPUTS.values() for ext in (".bval", ".bvec", ".nii.gz", "_std.nii.gz")]
    markers = [str(Path(p).with_name(f".{Path(p).name}.qid2-done.json")) for p in OUTPUTS.values()]
    assert written == sorted([*expected, *markers, "dataset_description.json", SUMMARY_NAME])
    description = json.loads((out / "dataset_description.json").read_text())
    generated = description["GeneratedBy"]
    assert description["DatasetType"] == "derivative" and description["BIDSVersion"] == "1.10.0"
    assert description["Name"] == "tiny phantoms: q-space up-sampling with QID²"
    assert len(generated) == 1 and generated[0]["Name"] == "qid2-diffusers" and generated[0]["Version"] == "0.1.0"
    assert generated[0]["Description"].startswith(f"qid2 upsample --cohort {cohort / 'bids'} --out-dir {out} ")
    assert description["SourceDatasets"] == [{"URL": (cohort / "bids").resolve().as_uri()}]
    # The derivative reads back as a BIDS dataset of the same series (the done-markers are hidden files).
    assert [s.subject_id for s in discover_subjects(out)] == [f"{s}_desc-qid2" for s in SUBJECTS]


def _marker(out: Path, subject: str) -> Path:
    prefix = Path(OUTPUTS[subject])
    return out / prefix.with_name(f".{prefix.name}.qid2-done.json")


@pytest.mark.slow  # ~9 s: a run killed in a subprocess, then resumed
def test_killed_run_resumes_and_leaves_no_temporary(cohort, tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "killed"
    # 50 steps: a second or more per subject, time enough to kill the run between the first and the last.
    options = _options(cohort, tiny_model_dir, "--num-samples", "2", steps=50)
    args = ["upsample", "--cohort", str(cohort / "bids"), "--out-dir", str(out), *options]
    run = subprocess.Popen([sys.executable, "-m", "qid2_diffusers.cli", *args], env=_env(),
                           stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 240
        while not _marker(out, "sub-01").exists():
            assert run.poll() is None, run.stderr.read()[-3000:]
            assert time.monotonic() < deadline, "the first subject never finished"
            time.sleep(0.02)
        run.send_signal(signal.SIGKILL)
    finally:
        run.kill()
        run.wait()
    assert not _marker(out, "sub-03").exists(), "the run finished before it could be killed"
    # What a kill in the middle of writing leaves: a temporary, and a std map whose series never came.
    stale = out / "sub-03" / "dwi" / ".sub-03_desc-qid2_dwi.nii.gz.0123456789ab.tmp.nii.gz"
    stale.parent.mkdir(parents=True, exist_ok=True)
    stale.write_bytes(b"\x1f\x8b half")
    shutil.copy(out / f"{OUTPUTS['sub-01']}_std.nii.gz", out / f"{OUTPUTS['sub-03']}_std.nii.gz")

    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "3 subjects on 1 process:" in printed and "1 skipped (already done)" in printed
    statuses = {k: (row["status"], row["reason"], row["targets"]) for k, row in _summary(out).items()}
    assert statuses["sub-01"] == ("skipped", "already done", "4")
    assert statuses["sub-02_ses-1_run-1"][0] == "done" and statuses["sub-03"] == ("done", "", "4")
    assert _leftovers(out) == []
    assert all(_marker(out, s).exists() and Path(f"{out / p}_std.nii.gz").exists() for s, p in OUTPUTS.items())
    # The subject whose leftovers were there is what an uninterrupted run writes.
    assert main(["upsample", "--dwi", str(cohort / "bids" / "sub-03" / "dwi" / "sub-03_dwi.nii.gz"),
                 "--out", str(tmp_path / "sub-03"), *options]) == 0
    capsys.readouterr()
    resumed, fresh = _series(out / OUTPUTS["sub-03"]), _series(tmp_path / "sub-03")
    assert sorted(resumed) == sorted(fresh)
    for key, value in fresh.items():
        np.testing.assert_array_equal(resumed[key], value, err_msg=key)

    # A rerun with other settings must not mix its results in.
    assert main([*args, "--seed", "4"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "made with other settings (seed 3 then, 4 now)" in err[0], err


def test_a_broken_subject_is_reported_and_the_others_are_written(cohort, tiny_model_dir, tmp_path, capsys):
    bids = tmp_path / "bids"
    shutil.copytree(cohort / "bids", bids)
    # sub-04 is sub-01 again: same input, same seed, same output.
    shutil.copytree(bids / "sub-01", bids / "sub-04")
    for path in (bids / "sub-04" / "dwi").iterdir():
        path.rename(path.with_name(path.name.replace("sub-01", "sub-04")))
    broken = _bids_folder(bids, "sub-02_ses-1_run-1") / "sub-02_ses-1_run-1_dwi.nii.gz"
    broken.write_bytes(broken.read_bytes()[:-40])
    bval = bids / "sub-03" / "dwi" / "sub-03_dwi.bval"
    bval.write_text(" ".join(bval.read_text().split()[:-1]) + "\n")
    out = tmp_path / "out"

    assert main(["upsample", "--cohort", str(bids), "--out-dir", str(out), *_options(cohort, tiny_model_dir)]) == 1
    printed = capsys.readouterr().out
    assert "4 subjects on 1 process: 2 done, 0 skipped (already done), 2 failed" in printed
    reasons = {
        "sub-02_ses-1_run-1": f"{broken}: truncated or corrupt gzip stream: the image data is incomplete",
        "sub-03": f"{bval}: has 16 b-values but sub-03_dwi.nii.gz has 17 volumes",
    }
    summary = _summary(out)
    assert list(summary) == ["sub-01", "sub-02_ses-1_run-1", "sub-03", "sub-04"]
    for subject, reason in reasons.items():
        assert (summary[subject]["status"], summary[subject]["reason"], summary[subject]["output"]) == ("failed", reason, "")
        assert reason in printed
        assert not list(out.glob(f"{subject.split('_')[0]}/**/*.*"))
    assert [summary[s]["status"] for s in ("sub-01", "sub-04")] == ["done", "done"]
    one, four = _series(out / OUTPUTS["sub-01"]), _series(out / "sub-04" / "dwi" / "sub-04_desc-qid2_dwi")
    np.testing.assert_array_equal(one[".nii.gz"], four[".nii.gz"])
    assert _leftovers(out) == []


def test_list_and_hcp_layouts(cohort, tmp_path):
    listed = tmp_path / "subjects.txt"
    bids = cohort / "bids"
    listed.write_text(f"# two series\n\n{bids}/sub-01/dwi/sub-01_dwi.nii.gz\n"
                      f"{os.path.relpath(bids / 'sub-03' / 'dwi' / 'sub-03_dwi.nii.gz', tmp_path)}  # relative\n")
    found = find_cohort(listed, tmp_path / "out")
    assert [(s.subject_id, s.prefix.relative_to(tmp_path / "out").as_posix()) for s in found.subjects] == [
        ("sub-01/dwi/sub-01_dwi", "sub-01/dwi/sub-01_dwi_qid2"), ("sub-03/dwi/sub-03_dwi", "sub-03/dwi/sub-03_dwi_qid2")]
    assert [s.source.mask.name if s.source.mask else None for s in found.subjects] == ["sub-01_desc-brain_mask.nii.gz",
                                                                                       None]
    assert not found.bids
    dwi = found.subjects[0].source.load()
    assert dwi.shape == (16, 16, 2, 17) and dwi.mask is not None

    listed.write_text(f"{bids}/sub-01/dwi/sub-01_dwi.nii.gz\n{bids}/sub-01/dwi/../dwi/sub-01_dwi.nii.gz\n")
    with pytest.raises(QID2InputError, match="line 2: .* is listed twice"):
        read_subject_list(listed)
    listed.write_text("# nothing\n")
    with pytest.raises(QID2InputError, match="names no series"):
        read_subject_list(listed)

    hcp = tmp_path / "hcp" / "100307" / "T1w" / "Diffusion"
    hcp.mkdir(parents=True)
    shutil.copy(bids / "sub-01" / "dwi" / "sub-01_dwi.nii.gz", hcp / "data.nii.gz")
    found = find_cohort(tmp_path / "hcp", tmp_path / "out")
    (subject,) = found.subjects
    assert subject.prefix == output_prefix(subject.source, tmp_path / "hcp", tmp_path / "out")
    assert subject.prefix == tmp_path / "out" / "100307" / "T1w" / "Diffusion" / "data_qid2"
    # A subject without its bvals is that subject's failure, not the cohort's.
    with pytest.raises(QID2InputError, match="Diffusion/bvals: file not found"):
        subject.source.load()


@pytest.mark.parametrize("case", ["no subjects", "out is a file", "out holds the cohort", "with --dwi", "no --out-dir"])
def test_bad_cohort_arguments_exit_2_before_any_work(case, cohort, tiny_model_dir, tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    (tmp_path / "a_file").write_text("")
    source, out, extra, message = {
        "no subjects": (tmp_path / "empty", tmp_path / "out", [], "no subjects found"),
        "out is a file": (cohort / "bids", tmp_path / "a_file", [], "is a file, so the output folder cannot be created"),
        "out holds the cohort": (cohort / "bids", cohort, [], "holds the cohort itself"),
        "with --dwi": (cohort / "bids", tmp_path / "out", ["--dwi", "x.nii.gz"], "--cohort finds each subject's files: drop --dwi"),
        "no --out-dir": (cohort / "bids", None, [], "--cohort needs --out-dir"),
    }[case]
    before = set(tmp_path.rglob("*"))
    argv = ["upsample", "--cohort", str(source), *(["--out-dir", str(out)] if out else []), *extra]
    assert main([*argv, *_options(cohort, tiny_model_dir)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("qid2 upsample: error:") and message in err[0], err
    assert set(tmp_path.rglob("*")) == before
