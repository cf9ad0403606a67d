"""Training the paper's GAN baselines, cGAN (pix2pix) and qGAN: the networks, the loss, the trainer.

Same data, validation, checkpoints and resume guarantees as QID² (the shared
:class:`~qid2_diffusers.training.trainer.Trainer`). The loss is the paper's
``λ_G · adversarial + λ_V · L1`` (λ_G = 1, λ_V = 100), the L1 inside the
brain mask unless ``--unmasked_loss``; the discriminator is updated once per
two generator updates. The output folder holds the generator
(``config.json`` + safetensors, loadable with
:func:`qid2_diffusers.models.gan.load_generator` or
``GANUpsampler.from_pretrained``) and the discriminator in ``discriminator/``::

    python training/train_gan.py --model qgan --preset small --data_dir data/phantoms \\
        --output_dir weights/qgan-small-r3 --max_train_steps 20000

With ``--bval_conditioning`` both networks' direction tokens carry b (as
QID²'s do), so one generator learns every shell of ``--shells``; several
shells require it.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.nn.functional as F

from ..image_processor import QID2ImageProcessor
from ..models import PRESETS
from ..baselines.gan import GANUpsampler
from ..models.gan import CGANGenerator, PatchDiscriminator, QGANGenerator
from .reporting import GAN_MODEL_CARD_TEMPLATE, cast_for_saving, save_pretrained_atomic
from ..pipelines.training_utils import masked_mean
from .trainer import Trainer

__all__ = ["GANTrainer", "build_gan", "adversarial_loss", "main", "DEFAULT_LEARNING_RATES"]

#: The paper's learning rates (§2.4) when none is given.
DEFAULT_LEARNING_RATES = {"cgan": 2.5e-5, "qgan": 5e-5}


def build_gan(model: str, preset: str, num_references: int, seed: int, bval_conditioning: bool = False):
    """Generator and discriminator of ``model`` (``cgan`` or ``qgan``) sized from a U-Net preset,
    both b-conditioned or neither."""
    torch.manual_seed(seed)
    p = PRESETS[preset]
    if model == "cgan":
        generator = CGANGenerator(num_references=num_references, preset=preset, bval_conditioning=bval_conditioning)
    else:
        generator = QGANGenerator(
            num_references=num_references,
            block_out_channels=tuple(p["block_out_channels"]),
            embed_dim=p["cross_attention_dim"],
            norm_num_groups=p["norm_num_groups"],
            bval_conditioning=bval_conditioning,
        )
    discriminator = PatchDiscriminator(
        num_references=num_references,
        base_channels=p["block_out_channels"][0],
        direction_conditioning="cross_attention" if model == "cgan" else "projection",
        embed_dim=p["cross_attention_dim"],
        num_heads=p["attention_head_dim"],
        bval_conditioning=bval_conditioning,
    )
    return generator, discriminator


def adversarial_loss(logits: torch.Tensor, real: bool) -> torch.Tensor:
    """Binary cross-entropy of patch logits against all-real or all-fake labels."""
    return F.binary_cross_entropy_with_logits(logits.float(), torch.full_like(logits, float(real), dtype=torch.float32))


class GANTrainer(Trainer):
    """Trains a cGAN or qGAN generator against a patch discriminator.

    Each step updates the generator on ``λ_G · adversarial + λ_V · L1``; every
    ``--discriminator_update_interval`` steps, before that, the discriminator
    is updated on real and generated slices (in :meth:`training_step`).
    """

    description = "Train a cGAN or qGAN baseline for q-space up-sampling of diffusion MRI."
    script = "training/train_gan.py"
    module = "qid2_diffusers.training.gan"
    model_card_template = GAN_MODEL_CARD_TEMPLATE

    @classmethod
    def add_arguments(cls, parser) -> None:
        g = parser.add_argument_group("GAN")
        g.add_argument("--model", type=str, required=True, choices=sorted(DEFAULT_LEARNING_RATES))
        g.add_argument("--lambda_adversarial", type=float, default=1.0, help="λ_G, weight of the adversarial term.")
        g.add_argument("--lambda_l1", type=float, default=100.0, help="λ_V, weight of the L1 term.")
        g.add_argument("--discriminator_update_interval", type=int, default=2,
                       help="Update the discriminator on one generator step in this many.")

    @classmethod
    def complete_args(cls, args, error):
        args = super().complete_args(args, error)
        if args.model not in DEFAULT_LEARNING_RATES:
            error(f"--model must be one of {', '.join(sorted(DEFAULT_LEARNING_RATES))}")
        if args.gradient_accumulation_steps != 1:
            error("--gradient_accumulation_steps must be 1 for GAN training (two optimisers alternate)")
        if args.learning_rate is None:
            args.learning_rate = DEFAULT_LEARNING_RATES[args.model]
        return args

    @property
    def project_name(self) -> str:
        return self.args.model

    @property
    def model_label(self) -> str:
        return f"{self.args.model} (this model)"

    def build_models(self) -> dict:
        args = self.args
        generator, discriminator = build_gan(args.model, args.preset, args.R, args.seed, args.bval_conditioning)
        self.processor = QID2ImageProcessor(generator.size_multiple)
        # The last discriminator loss, logged on the steps that do not update it.
        self.d_loss = torch.zeros(())
        return {"generator": generator, "discriminator": discriminator}

    def training_step(self, batch, generator):
        args = self.args
        gen, disc = self.models["generator"], self.models["discriminator"]
        target, references = batch["target"], batch["references"]
        tb, rb = batch["target_bvec"], batch["reference_bvecs"]
        # The networks ignore b unless they are b-conditioned.
        bvals = {k: batch[k] for k in ("target_bvals", "reference_bvals") if k in batch}
        padded, size = self.processor.pad(references)
        fake = self.processor.crop(gen(padded, tb, rb, **bvals), size)

        if self.state.global_step % args.discriminator_update_interval == 0:
            # Real and fake in one call: one forward and one backward per update under DDP.
            logits = disc(
                torch.cat([references, references]), torch.cat([target, fake.detach()]),
                torch.cat([tb, tb]), torch.cat([rb, rb]), **{k: torch.cat([v, v]) for k, v in bvals.items()},
            )
            real_logits, fake_logits = logits.chunk(2)
            self.d_loss = 0.5 * (adversarial_loss(real_logits, True) + adversarial_loss(fake_logits, False))
            self.optimizer_step("discriminator", self.d_loss)

        adv = adversarial_loss(disc(references, fake, tb, rb, **bvals), True)
        l1 = masked_mean((fake.float() - target.float()).abs(), None if args.unmasked_loss else batch["mask"])
        loss = args.lambda_adversarial * adv + args.lambda_l1 * l1
        return {"loss": loss, "l1": l1, "adversarial": adv, "d_loss": self.d_loss}

    def make_upsampler(self):
        return GANUpsampler(self.model, batch_size=self.args.validation_batch_size, progress=False)

    def save(self, output_dir) -> None:
        save_pretrained_atomic(cast_for_saving(self.model, self.args), output_dir, safe_serialization=True)
        disc = cast_for_saving(self.accelerator.unwrap_model(self.models["discriminator"]), self.args)
        disc_dir = Path(output_dir) / "discriminator"
        disc_dir.mkdir(exist_ok=True)
        save_pretrained_atomic(disc, disc_dir, safe_serialization=True)

    def card_fields(self) -> dict:
        args = self.args
        return {
            "model": args.model, "preset": args.preset, "learning_rate": f"{args.learning_rate:g}",
            "lambda_adversarial": args.lambda_adversarial, "lambda_l1": args.lambda_l1,
            "discriminator_update_interval": args.discriminator_update_interval,
            "bval_conditioning": args.bval_conditioning,
        }


def main(argv=None) -> int:
    """``python -m qid2_diffusers.training.gan`` / ``training/train_gan.py``."""
    return GANTrainer.main(argv)


if __name__ == "__main__":
    sys.exit(main())
