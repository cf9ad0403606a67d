"""The weights shipped inside the package."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open

from qid2_diffusers import QID2Pipeline
from qid2_diffusers.pretrained import default_model_path, shipped_models
from qid2_diffusers.training.qid2 import QID2Trainer
from qid2_diffusers.training.reporting import render_model_card, template_fields


@pytest.mark.parametrize("num_references", [3, 6])
def test_shipped_model_is_small_fp16_safetensors_with_a_card(num_references):
    path = default_model_path(num_references)
    assert path in shipped_models()
    config = json.loads((path / "unet" / "config.json").read_text())
    assert config["in_channels"] == 1 + num_references + 2  # noisy target, references, tensor prior, mean b0
    files = list(path.rglob("*.safetensors"))
    assert {f.parent.name for f in files} == {"unet", "direction_encoder"}
    for f in files:
        assert f.stat().st_size < 20_000_000
        with safe_open(f, "pt") as st:
            assert {st.get_tensor(k).dtype for k in st.keys()} == {torch.float16}
    assert not list(path.rglob("*.bin")) and not list(path.rglob("checkpoint-*"))
    card = (path / "README.md").read_text()
    assert card.startswith("---\nlibrary_name: diffusers") and "python training/train_qid2.py" in card
    # Every stage's command is in the card, and the saved sampler is the one it names.
    assert "python training/average_weights.py --inputs" in card
    index = json.loads((path / "model_index.json").read_text())
    assert f"DDIM with {index['default_num_inference_steps']} step" in card and index["scheduler"][1] == "DDIMScheduler"
    assert index["_class_name"] == "QID2Pipeline" and index["physics_prior"] is True
    # The card states the saved test-time adaptation default.
    assert f"default_adapt_steps {index['default_adapt_steps']}" in card.replace("`", "").replace("=", " ")


def test_paper_configuration_is_kept_beside_the_shipped_models():
    """The paper's configuration (no prior, b = 1000 only) stays loadable: the `paper` row of every table."""
    paper = QID2Pipeline.from_pretrained(Path(__file__).resolve().parents[1] / "weights" / "qid2-paper-small-r3")
    assert paper.num_references == 3 and not paper.physics_prior
    assert paper.unet.config.in_channels == 1 + 3
    assert QID2Pipeline.from_pretrained(QID2Pipeline.default_model_path(6)).num_references == 6


def test_shipped_model_loads_offline_and_samples_in_input_units(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    pipe = QID2Pipeline.from_pretrained(QID2Pipeline.default_model_path())
    pipe.set_progress_bar_config(disable=True)
    assert pipe.num_references == 3 and pipe.unet.dtype == torch.float32 and pipe.physics_prior
    assert pipe.scheduler.config.prediction_type == "v_prediction"
    # A uniform patch of tissue seen from three nearby directions: the target
    # direction sees about the same signal (an isotropic region), and so does the tensor prior.
    refs = np.full((3, 12, 12), 400.0, dtype=np.float32)
    dirs = np.array([[1.0, 0.05, 0.0], [1.0, -0.05, 0.02], [1.0, 0.0, -0.05]])
    out = pipe(refs, dirs, [1.0, 0.0, 0.0], prior_images=np.full((12, 12), 400.0), b0_images=np.full((12, 12), 1000.0),
               target_bvals=1000.0, reference_bvals=1000.0,
               num_inference_steps=10, generator=torch.manual_seed(0))
    assert out.images.shape == (1, 12, 12)
    assert 200 < np.median(out.images) < 600


def test_shipped_card_has_the_trainers_metadata_and_every_section_of_its_template():
    from huggingface_hub import ModelCard

    shipped = ModelCard((default_model_path(3) / "README.md").read_text())
    fields = {name: f"<{name}>" for name in template_fields(QID2Trainer.model_card_template)}
    rendered = render_model_card(fields, QID2Trainer.model_card_template, tags=QID2Trainer.card_tags)
    assert shipped.data.to_dict() == rendered.data.to_dict()
    assert rendered.data.library_name == "diffusers" and "dwi" in rendered.data.tags

    def sections(card):
        return [line for line in card.text.splitlines() if line.startswith("## ")]

    assert sections(rendered) and set(sections(rendered)) <= set(sections(shipped))


def test_model_card_at_the_top_is_the_default_models_hub_card():
    """``model_card.md`` beside pyproject.toml is the card the default model carries, byte for byte:
    one card, written once (by the trainer's template, then the packaging notes), copied to the top."""
    top = Path(__file__).resolve().parents[1] / "model_card.md"
    shipped = default_model_path() / "README.md"
    assert top.read_bytes() == shipped.read_bytes(), (
        f"model_card.md differs from the default model's card; refresh it with "
        f"`cp qid2_diffusers/pretrained/{shipped.parent.name}/README.md model_card.md`"
    )
