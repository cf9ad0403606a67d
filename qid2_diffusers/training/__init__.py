"""Training the package's networks: one :class:`Trainer` loop, hooks per model.

* :mod:`.config`: the argument groups, YAML configs (``configs/``), arguments from Python;
* :mod:`.data`: subject split, caches, the loader, resumable batch order, random crops;
* :mod:`.checkpoints`: run state, ``checkpoint-<step>`` folders, the wall-time budget;
* :mod:`.validation`: held-out slices scored beside Interp and DTI-predict;
* :mod:`.reporting`: weights, ``training_summary.json``, the model card (``templates/``), the Hub;
* :mod:`.trainer`: the loop; :mod:`.qid2` and :mod:`.gan`: the models' trainers and entry points;
  :mod:`.average_weights`: the mean of fine-tuned pipelines.

The scripts in the repository's ``training/`` folder are thin shells of these
modules (``python -m qid2_diffusers.training.qid2`` runs the same).
"""

from .checkpoints import RunState, checkpoints
from .config import CONFIG_DIR
from .data import EpochSampler, TrainingData
from .trainer import Trainer

__all__ = ["Trainer", "TrainingData", "EpochSampler", "RunState", "checkpoints", "CONFIG_DIR"]
