"""The weights shipped inside the package."""

import json

import numpy as np
import torch
from safetensors import safe_open

from qid2_diffusers import QID2Pipeline
from qid2_diffusers.pretrained import default_model_path, shipped_models
from qid2_diffusers.training.qid2 import QID2Trainer
from qid2_diffusers.training.reporting import render_model_card, template_fields


def test_shipped_model_is_small_fp16_safetensors_with_a_card():
    path = default_model_path(3)
    assert path in shipped_models()
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
    assert json.loads((path / "model_index.json").read_text())["_class_name"] == "QID2Pipeline"


def test_shipped_model_loads_offline_and_samples_in_input_units(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    pipe = QID2Pipeline.from_pretrained(QID2Pipeline.default_model_path())
    pipe.set_progress_bar_config(disable=True)
    assert pipe.num_references == 3 and pipe.unet.dtype == torch.float32
    assert pipe.scheduler.config.prediction_type == "v_prediction"
    # A uniform patch of tissue seen from three nearby directions: the target
    # direction sees about the same signal (an isotropic region).
    refs = np.full((3, 12, 12), 400.0, dtype=np.float32)
    dirs = np.array([[1.0, 0.05, 0.0], [1.0, -0.05, 0.02], [1.0, 0.0, -0.05]])
    out = pipe(refs, dirs, [1.0, 0.0, 0.0], num_inference_steps=10, generator=torch.manual_seed(0))
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
