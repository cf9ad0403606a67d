import os
from pathlib import Path

import numpy as np
import pytest

# Tests never reach a hub: everything they load is local.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parents[1]
REAL_DATA = REPO.parent / "shared" / "data" / "real"


@pytest.fixture(scope="session")
def real_data_dir() -> Path:
    if not (REAL_DATA / "msmt.nii.gz").is_file():
        pytest.skip(f"real scanner fixtures not found at {REAL_DATA}")
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
