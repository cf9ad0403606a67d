"""Training QID² (a UNet2DConditionModel + DirectionEncoder): the loss, the trainer, ``main``.

Runs on one CPU, one GPU or many (``accelerate launch``), resumes after a kill
with the same result as an uninterrupted run, validates on held-out subjects
and ends with a ``QID2Pipeline`` folder and its model card::

    qid2 phantom --out data/phantoms --subjects 17 --seed 0 --resolution 2.5
    python training/train_qid2.py --config small --data_dir data/phantoms --output_dir runs/qid2-small-r3
    python -m qid2_diffusers.training.qid2 --config small --data_dir data/phantoms --output_dir runs/qid2-small-r3
    accelerate launch --num_processes 2 training/train_qid2.py --config small \\
        --data_dir data/phantoms --output_dir runs/qid2-small-r3 --resume_from_checkpoint latest

Several processes on CPUs (gloo): ``accelerate launch --cpu`` starts them only
through mpirun; without MPI use
``ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes 2 ...``.
On a shared CPU set ``OMP_NUM_THREADS`` to the cores each process may use.

Settings come from ``--config`` (a YAML file, or ``small`` / ``paper`` /
``tiny`` from :data:`~qid2_diffusers.training.config.CONFIG_DIR`; ``--preset``
alone also picks its config); flags on the command line win. Outputs in
``--output_dir``: the pipeline (``model_index.json``, ``unet/``,
``direction_encoder/``, ``scheduler/``), ``README.md`` (the model card, from
``templates/model_card.md``), ``training_summary.json``, ``validation.png``,
``checkpoint-<step>/`` folders and TensorBoard ``logs/``.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from ..builder import build_pipeline
from ..errors import QID2InputError
from ..models.unet import ATTENTION, attention_of
from ..pipelines import QID2Pipeline, QID2Upsampler
from ..schedulers import SCHEDULERS, make_scheduler, training_scheduler
from ..pipelines.training_utils import QID2Denoiser, diffusion_loss
from .reporting import CARD_TAGS, MODEL_CARD_TEMPLATE, cast_for_saving, save_pretrained_atomic
from .trainer import Trainer
from .validation import VALIDATION_RESIDUAL_WEIGHT

__all__ = ["QID2Trainer", "make_pipeline", "main", "DEFAULT_LEARNING_RATE"]

#: Learning rate when neither the command line nor the config gives one
#: (diffusers' unconditional example; the paper's 2.5e-5 is in configs/paper.yaml).
DEFAULT_LEARNING_RATE = 1e-4


def make_pipeline(denoiser, training_scheduler, args) -> QID2Pipeline:
    """A pipeline around the live modules, with the sampler used for validation and saving."""
    return QID2Pipeline(
        unet=denoiser.unet,
        direction_encoder=denoiser.direction_encoder,
        scheduler=make_scheduler(args.inference_scheduler, training_scheduler.config),
        default_num_inference_steps=args.validation_num_inference_steps,
        physics_prior=args.physics_prior,
    )


class QID2Trainer(Trainer):
    """Trains a :class:`QID2Denoiser` on :func:`diffusion_loss` and saves a ``QID2Pipeline``.

    Args:
        args (`argparse.Namespace`): from :meth:`~Trainer.parse_args` or :meth:`~Trainer.training_args`.
        pipeline ([`QID2Pipeline`], *optional*): start from these networks (trained
            in place: pass a copy to keep the original) instead of a fresh preset or
            ``--pretrained_model_name_or_path``.
        kwargs: ``train_dataset``, ``validation_subjects`` (see [`Trainer`]).
    """

    description = "Train QID² for q-space up-sampling of diffusion MRI."
    script = "training/train_qid2.py"
    module = "qid2_diffusers.training.qid2"
    model_card_template = MODEL_CARD_TEMPLATE
    card_tags = (*CARD_TAGS, "diffusers")

    def __init__(self, args, *, pipeline: QID2Pipeline | None = None, **kwargs):
        super().__init__(args, **kwargs)
        self.pipeline = pipeline

    @classmethod
    def add_arguments(cls, parser) -> None:
        g = parser.add_argument_group("QID²")
        g.add_argument("--pretrained_model_name_or_path", type=str, default=None,
                       help="Start from a saved QID² pipeline (folder or Hub id) instead of random weights: fine-tuning.")
        g.add_argument("--prediction_type", type=str, default="v_prediction", choices=["epsilon", "v_prediction", "sample"],
                       help="What the U-Net predicts. The paper's epsilon gives poor few-step samples on small budgets.")
        g.add_argument("--inference_scheduler", type=str, default="ddim", choices=sorted(SCHEDULERS),
                       help="Sampler used for validation and saved with the pipeline.")
        g.add_argument("--validation_num_inference_steps", type=int, default=20,
                       help="Sampling steps for validation; also the saved pipeline's default.")
        g.add_argument("--physics_prior", action="store_true",
                       help="Condition on the tensor-fit prediction of the target from the kept directions and the "
                            "mean b0, and learn the residual target - prior (off: the paper's configuration).")
        g.add_argument("--attention", type=str, default="every", choices=list(ATTENTION),
                       help="U-Net levels whose blocks cross-attend to the direction tokens: every level (the paper), "
                            "or only the coarse ones, the tokens reaching the full-resolution blocks through the time "
                            "embedding (cheaper per pass on CPUs).")
        g.add_argument("--timestep_bias_portion", type=float, default=0.0,
                       help="Fraction of training timesteps drawn from the noisiest quarter of the schedule, where "
                            "few-step samplers start (0: uniform, as in the paper).")

    @classmethod
    def complete_args(cls, args, error):
        args = super().complete_args(args, error)
        if args.learning_rate is None:
            args.learning_rate = DEFAULT_LEARNING_RATE
        return args

    @property
    def project_name(self) -> str:
        return "qid2"

    def starting_pipeline(self) -> QID2Pipeline:
        """The networks to train: the given pipeline, a saved one to fine-tune, or a fresh preset."""
        args = self.args
        if self.pipeline is None and not args.pretrained_model_name_or_path:
            return build_pipeline(args.preset, args.R, args.prediction_type, seed=args.seed,
                                  physics_prior=args.physics_prior, bval_conditioning=args.bval_conditioning,
                                  attention=args.attention)
        # Float32 for training even if it was saved fp16; the training schedule is
        # rebuilt, so --prediction_type must match the one it was trained with.
        if self.pipeline is None:
            source, pipe = args.pretrained_model_name_or_path, QID2Pipeline.from_pretrained(
                args.pretrained_model_name_or_path, torch_dtype=torch.float32)
        else:
            source, pipe = "pipeline", self.pipeline
        if pipe.num_references != args.R:
            raise QID2InputError(source, f"was trained for R = {pipe.num_references}, not --R {args.R}")
        for flag in ("physics_prior", "bval_conditioning"):
            if getattr(pipe, flag) != getattr(args, flag):
                raise QID2InputError(source, f"has {flag} = {getattr(pipe, flag)}; set --{flag} to match")
        if pipe.scheduler.config.prediction_type != args.prediction_type:
            raise QID2InputError(
                source, f"predicts {pipe.scheduler.config.prediction_type}, not --prediction_type {args.prediction_type}"
            )
        pipe.scheduler = training_scheduler(args.prediction_type)
        return pipe

    def build_models(self) -> dict:
        pipe = self.starting_pipeline()
        self.noise_scheduler = pipe.scheduler
        return {"denoiser": QID2Denoiser(pipe.unet, pipe.direction_encoder)}

    def training_step(self, batch, generator):
        return diffusion_loss(self.models["denoiser"], self.noise_scheduler, batch, generator,
                              masked=not self.args.unmasked_loss, timestep_bias_portion=self.args.timestep_bias_portion)

    def make_upsampler(self):
        return QID2Upsampler(
            make_pipeline(self.model, self.noise_scheduler, self.args),
            num_inference_steps=self.args.validation_num_inference_steps,
            batch_size=self.args.validation_batch_size,
            seed=self.args.seed,
            progress=False,
            residual_weight=VALIDATION_RESIDUAL_WEIGHT,
        )

    def save(self, output_dir) -> None:
        pipeline = cast_for_saving(make_pipeline(self.model, self.noise_scheduler, self.args), self.args)
        save_pretrained_atomic(pipeline, output_dir, safe_serialization=True)

    def card_fields(self) -> dict:
        args = self.args
        return {
            "model_name": Path(args.output_dir).resolve().name,
            "model_path": args.hub_model_id if args.push_to_hub and args.hub_model_id else args.output_dir,
            "preset": f"{args.preset} (block_out_channels {list(self.model.unet.config.block_out_channels)})",
            "prediction_type": args.prediction_type,
            "inference_scheduler": args.inference_scheduler.upper(),
            "num_inference_steps": args.validation_num_inference_steps,
            "inputs": "noisy target + R reference slices as channels"
            + (" + the tensor fit's prediction of the target slice (from all acquired directions of its shell) and the "
               "mean b0 slice; the network models the residual target − prediction" if args.physics_prior else "")
            + ("; cross-attention on R + 1 direction tokens" if attention_of(self.model.unet) == "every" else
               "; cross-attention on R + 1 direction tokens at half resolution and below, the tokens also projected "
               "into the time embedding of every block")
            + " (sign-invariant direction features" + (", with b / 1000 s/mm²)" if args.bval_conditioning else ")"),
        }


def main(argv=None) -> int:
    """``python -m qid2_diffusers.training.qid2`` / ``training/train_qid2.py``."""
    return QID2Trainer.main(argv)


if __name__ == "__main__":
    sys.exit(main())
