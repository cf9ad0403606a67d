import os
import socket
import sys
from pathlib import Path

import numpy as np
import pytest

# Tests never reach a hub: everything they load is local.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parents[1]
REAL_DATA = REPO / "tests" / "data" / "real"


@pytest.fixture(autouse=True)
def one_thread():
    # Tiny networks on a 2-core machine: a second OpenMP thread waiting for a
    # core busy with another process makes every op many times slower.
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def real_data_dir() -> Path:
    # Committed crops (always there) and the mdt scan that `scripts/setup.sh --test` fetches.
    assert (REAL_DATA / "msmt.nii.gz").is_file(), f"{REAL_DATA}: real crops missing from the checkout"
    return REAL_DATA


@pytest.fixture(scope="session")
def scheme90() -> np.ndarray:
    from qid2_diffusers.directions import uniform_directions

    return uniform_directions(90)


@pytest.fixture(scope="session")
def tiny_pipeline():
    from qid2_diffusers import build_pipeline

    pipe = build_pipeline("tiny", 3, seed=0)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tiny_pipeline) -> Path:
    path = tmp_path_factory.mktemp("tiny-qid2")
    tiny_pipeline.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_prior_model_dir(tmp_path_factory) -> Path:
    """A tiny random model of the kind to be shipped next: physics prior and b-conditioned tokens."""
    from qid2_diffusers import build_pipeline

    path = tmp_path_factory.mktemp("tiny-qid2-prior")
    build_pipeline("tiny", 3, seed=0, physics_prior=True, bval_conditioning=True).save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def phantom_slab():
    """Seeded 2-slice phantom (LAS, 18 b0 + 90 directions at b=1000), cropped to 40 x 48 voxels (brain and background)."""
    from qid2_diffusers.data.phantom import make_subject

    s = make_subject(0, slab=2)
    box = (slice(2, 42), slice(4, 52))
    return {"dwi": np.ascontiguousarray(s.dwi[box]), "mask": np.ascontiguousarray(s.mask[box]),
            "fa": np.ascontiguousarray(s.fa[box]), "bvals": s.bvals, "bvecs": s.bvecs, "affine": s.affine}


def _write_cohort(root: Path, shells=None) -> Path:
    """Two tiny HCP-layout subjects: the four central axial slices of one 2.5 mm
    phantom (``shells``, b=1000 by default), cropped to the middle 24 x 24
    voxels (all brain), split into subjects of two slices each."""
    from qid2_diffusers.data.io import save_dwi, save_nifti
    from qid2_diffusers.data.phantom import make_subject

    s = make_subject(0, slab=4, shells=shells)
    cx, cy = s.dwi.shape[0] // 2, s.dwi.shape[1] // 2
    box = (slice(cx - 12, cx + 12), slice(cy - 12, cy + 12))
    data, mask = np.asarray(s.dwi)[box], np.asarray(s.mask)[box]
    for i, z in enumerate((slice(0, 2), slice(2, 4))):
        folder = root / f"sub-{i:02d}" / "T1w" / "Diffusion"
        folder.mkdir(parents=True)
        save_dwi(folder / "data", data[:, :, z], s.bvals, s.bvecs, s.affine)
        (folder / "data.bval").rename(folder / "bvals")
        (folder / "data.bvec").rename(folder / "bvecs")
        save_nifti(folder / "nodif_brain_mask.nii.gz", mask[:, :, z].astype(np.uint8), s.affine)
    return root


@pytest.fixture(scope="session")
def written_phantom(tmp_path_factory) -> Path:
    """One 6-slice brain phantom written by the package (HCP layout, truth beside it); returns its subject folder."""
    from qid2_diffusers.data.phantom import make_subject
    from qid2_diffusers.data.phantom.writing import write_subject

    return write_subject(make_subject(5, slab=6), tmp_path_factory.mktemp("written-phantom"), "phantom-000")


@pytest.fixture(scope="session")
def training_cohort(tmp_path_factory) -> Path:
    """Two tiny HCP-layout subjects for the training scripts, b=1000 (see :func:`_write_cohort`)."""
    return _write_cohort(tmp_path_factory.mktemp("training-cohort"))


@pytest.fixture(scope="session")
def multishell_training_cohort(tmp_path_factory) -> Path:
    """The same two subjects with shells b=1000 and b=2000 (90 directions each)."""
    return _write_cohort(tmp_path_factory.mktemp("multishell-training-cohort"), shells=(1000, 2000))


def _free_port() -> int:
    """A local TCP port free at the time of the call (for a process group's rendezvous)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def free_port() -> int:
    return _free_port()


@pytest.fixture(scope="session")
def accelerate_launch():
    """A function giving ``accelerate launch`` of two CPU processes running ``python -m qid2_diffusers.cli``
    (arguments to append), on a port free at the time of the call.

    ``--multi_gpu`` is what makes accelerate start several processes on a machine without GPUs.
    """

    def command() -> list[str]:
        port = _free_port()
        return [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                "--main_process_port", str(port), "-m", "qid2_diffusers.cli"]

    return command
