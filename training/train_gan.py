#!/usr/bin/env python
"""Train the paper's GAN baselines, cGAN (pix2pix) and qGAN, with 🤗 Accelerate.

Same data, validation, checkpoints and resume guarantees as ``train_qid2.py``
(shared in ``common.py``). The loss is the paper's
``λ_G · adversarial + λ_V · L1`` (λ_G = 1, λ_V = 100), the L1 inside the
brain mask unless ``--unmasked_loss``; the discriminator is updated once per
two generator updates. The output folder holds the generator
(``config.json`` + safetensors, loadable with
:func:`qid2_diffusers.models.gan.load_generator` or
``GANUpsampler.from_pretrained``) and the discriminator in ``discriminator/``::

    python training/train_gan.py --model qgan --preset small --data_dir data/phantoms \\
        --output_dir weights/qgan-small-r3 --max_train_steps 20000
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402
from qid2_diffusers.models import PRESETS  # noqa: E402
from qid2_diffusers.models.gan import CGANGenerator, GANUpsampler, PatchDiscriminator, QGANGenerator  # noqa: E402
from qid2_diffusers.image_processor import QID2ImageProcessor  # noqa: E402

#: The paper's learning rates (§2.4) when none is given.
DEFAULT_LEARNING_RATES = {"cgan": 2.5e-5, "qgan": 5e-5}


def parse_args(argv=None):
    parser = common.base_parser("Train a cGAN or qGAN baseline for q-space up-sampling of diffusion MRI.")
    g = parser.add_argument_group("GAN")
    g.add_argument("--model", type=str, required=True, choices=sorted(DEFAULT_LEARNING_RATES))
    g.add_argument("--lambda_adversarial", type=float, default=1.0, help="λ_G, weight of the adversarial term.")
    g.add_argument("--lambda_l1", type=float, default=100.0, help="λ_V, weight of the L1 term.")
    g.add_argument("--discriminator_update_interval", type=int, default=2,
                   help="Update the discriminator on one generator step in this many.")
    args = common.parse_args(parser, argv)
    if args.gradient_accumulation_steps != 1:
        parser.error("--gradient_accumulation_steps must be 1 for GAN training (two optimisers alternate)")
    if args.learning_rate is None:
        args.learning_rate = DEFAULT_LEARNING_RATES[args.model]
    return args


def build_models(model: str, preset: str, num_references: int, seed: int):
    """Generator and discriminator sized from a U-Net preset."""
    torch.manual_seed(seed)
    p = PRESETS[preset]
    if model == "cgan":
        generator = CGANGenerator(num_references=num_references, preset=preset)
    else:
        generator = QGANGenerator(
            num_references=num_references,
            block_out_channels=tuple(p["block_out_channels"]),
            embed_dim=p["cross_attention_dim"],
            norm_num_groups=p["norm_num_groups"],
        )
    discriminator = PatchDiscriminator(
        num_references=num_references,
        base_channels=p["block_out_channels"][0],
        direction_conditioning="cross_attention" if model == "cgan" else "projection",
        embed_dim=p["cross_attention_dim"],
        num_heads=p["attention_head_dim"],
    )
    return generator, discriminator


def adversarial_loss(logits: torch.Tensor, real: bool) -> torch.Tensor:
    """Binary cross-entropy of patch logits against all-real or all-fake labels."""
    return F.binary_cross_entropy_with_logits(logits.float(), torch.full_like(logits, float(real), dtype=torch.float32))


def main(args) -> int:
    accelerator = common.make_accelerator(args)
    logger = common.setup_logging(accelerator, "train_gan")
    # Data first: a bad input folder stops the run before anything is written.
    data = common.load_training_data(args, accelerator)
    if accelerator.is_main_process:
        os.makedirs(args.output_dir, exist_ok=True)
    generator, discriminator = build_models(args.model, args.preset, args.R, args.seed)
    processor = QID2ImageProcessor(generator.size_multiple)
    ema = common.make_ema(generator.parameters(), args) if args.use_ema else None

    dataloader = accelerator.prepare(data.dataloader)
    schedule = common.make_schedule(args, dataloader)
    optimizers, lr_schedulers = [], []
    for model in (generator, discriminator):
        opt = torch.optim.AdamW(
            model.parameters(),
            lr=args.learning_rate,
            betas=(args.adam_beta1, args.adam_beta2),
            weight_decay=args.adam_weight_decay,
            eps=args.adam_epsilon,
        )
        optimizers.append(opt)
        lr_schedulers.append(common.make_lr_scheduler(args, opt, schedule, accelerator))
    generator, discriminator, opt_g, opt_d, sched_g, sched_d = accelerator.prepare(
        generator, discriminator, *optimizers, *lr_schedulers
    )
    state = common.RunState()
    accelerator.register_for_checkpointing(state)
    if ema is not None:
        ema.to(accelerator.device)
        accelerator.register_for_checkpointing(ema)
    global_step = common.resume(accelerator, args, state)

    validator = None
    if accelerator.is_main_process:
        accelerator.init_trackers(args.model, config=common.tracker_config(args))
        if data.validation_subjects:
            validator = common.Validator(data.validation_subjects, args)
            logger.info("reference methods on the validation slices: %s", validator.baselines)
    gen = accelerator.unwrap_model(generator)

    def validate(step: int) -> None:
        if validator is None:
            return
        if ema is not None:
            ema.store(gen.parameters())
            ema.copy_to(gen.parameters())
        upsampler = GANUpsampler(gen, batch_size=args.validation_batch_size, progress=False)
        common.validate(accelerator, validator, upsampler, state, step, args)
        gen.train()
        if ema is not None:
            ema.restore(gen.parameters())

    logger.info(
        "%s: %d training samples from %d subject(s); %d steps of %d x %d process(es)",
        args.model, len(data.dataset), len(data.train_ids), schedule.max_train_steps, args.train_batch_size,
        accelerator.num_processes,
    )
    clock = common.Clock(state)
    progress = tqdm(total=schedule.max_train_steps, initial=global_step, desc="steps", disable=not accelerator.is_local_main_process)
    stop_reason = f"reached max_train_steps ({schedule.max_train_steps})"
    masked = not args.unmasked_loss
    d_loss = torch.zeros(())
    for epoch, batch_index, batch in common.batches(accelerator, data, dataloader, schedule, global_step, args):
        if global_step >= schedule.max_train_steps:
            break
        generator_rng = common.step_generator(args.seed, epoch, batch_index, accelerator.process_index)
        batch = common.random_crops(batch, args.crop_size, generator_rng)
        x, size = processor.pad(torch.cat([batch["target"], batch["references"]], dim=1))
        target, references = processor.crop(x[:, :1], size), processor.crop(x[:, 1:], size)
        tb, rb = batch["target_bvec"], batch["reference_bvecs"]
        fake = processor.crop(generator(x[:, 1:], tb, rb), size)

        if global_step % args.discriminator_update_interval == 0:
            # Real and fake in one call: one forward and one backward per update under DDP.
            logits = discriminator(
                torch.cat([references, references]), torch.cat([target, fake.detach()]),
                torch.cat([tb, tb]), torch.cat([rb, rb]),
            )
            real_logits, fake_logits = logits.chunk(2)
            d_loss = 0.5 * (adversarial_loss(real_logits, True) + adversarial_loss(fake_logits, False))
            accelerator.backward(d_loss)
            if args.max_grad_norm:
                accelerator.clip_grad_norm_(discriminator.parameters(), args.max_grad_norm)
            opt_d.step()
            sched_d.step()
            opt_d.zero_grad(set_to_none=True)

        adv = adversarial_loss(discriminator(references, fake, tb, rb), True)
        l1 = common.masked_mean((fake.float() - target.float()).abs(), batch["mask"] if masked else None)
        g_loss = args.lambda_adversarial * adv + args.lambda_l1 * l1
        accelerator.backward(g_loss)
        if args.max_grad_norm:
            accelerator.clip_grad_norm_(generator.parameters(), args.max_grad_norm)
        opt_g.step()
        sched_g.step()
        opt_g.zero_grad(set_to_none=True)
        # The generator's backward also filled the discriminator's gradients; they must not leak into its next update.
        opt_d.zero_grad(set_to_none=True)

        if ema is not None:
            ema.step(gen.parameters())
        global_step += 1
        state.global_step = global_step
        logs = {
            "loss": g_loss.detach().item(), "l1": l1.detach().item(), "adversarial": adv.detach().item(),
            "d_loss": d_loss.detach().item(), "lr": sched_g.get_last_lr()[0], "epoch": epoch,
        }
        progress.update(1)
        progress.set_postfix(l1=f"{logs['l1']:.4f}", d=f"{logs['d_loss']:.3f}", epoch=epoch)
        accelerator.log(logs, step=global_step)
        stop = common.end_of_step(accelerator, args, clock, global_step, schedule, validate)
        if stop:
            stop_reason = stop
            break
    progress.close()
    clock.update()
    accelerator.wait_for_everyone()

    if args.debug_dump_weights:
        common.dump_weights(accelerator, args, gen, ema)
    if accelerator.is_main_process:
        validate(global_step)
        if ema is not None:
            ema.copy_to(gen.parameters())
        common.save_pretrained_atomic(common.cast_for_saving(gen, args), args.output_dir, safe_serialization=True)
        disc = common.cast_for_saving(accelerator.unwrap_model(discriminator), args)
        disc_dir = Path(args.output_dir) / "discriminator"
        disc_dir.mkdir(exist_ok=True)
        common.save_pretrained_atomic(disc, disc_dir, safe_serialization=True)
        fields = common.run_fields(args, accelerator, data, state, schedule, stop_reason, validator,
                                   model_label=f"{args.model} (this model)")
        fields.update(model=args.model, preset=args.preset, learning_rate=f"{args.learning_rate:g}",
                      lambda_adversarial=args.lambda_adversarial, lambda_l1=args.lambda_l1,
                      discriminator_update_interval=args.discriminator_update_interval)
        common.write_json(Path(args.output_dir) / "training_summary.json", common.summary(fields, state, validator))
        common.write_text(Path(args.output_dir) / "README.md", gan_card(fields))
        if args.push_to_hub:
            logger.info("pushed to https://huggingface.co/%s", common.push_to_hub(args))
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return 0


def gan_card(f: dict) -> str:
    """A short README for a baseline's weights (the full template is QID²'s model card)."""
    name = {"cgan": "cGAN (pix2pix on the QID² U-Net)", "qgan": "qGAN (FiLM-modulated U-Net)"}[f["model"]]
    return f"""---
library_name: diffusers
license: apache-2.0
tags:
- diffusion-mri
- medical-imaging
- q-space-upsampling
- dwi
---

# {name} baseline, R = {f['num_references']}

A GAN baseline of the QID² paper, trained with `training/train_gan.py` of qid2-diffusers to compare
against QID². **Research use only; not for clinical use.** Trained on: {f['data_description']}.

```python
from qid2_diffusers.models.gan import GANUpsampler
up = GANUpsampler.from_pretrained("path/to/this/folder")
predicted = up.predict(data, bvals, bvecs, target_bvecs, mask)  # (X, Y, Z, T)
```

## Training

- Preset `{f['preset']}`; loss λ_G = {f['lambda_adversarial']:g} (adversarial) + λ_V = {f['lambda_l1']:g} (L1 over
  {f['loss_region']}); discriminator updated once per {f['discriminator_update_interval']} generator updates;
  Adam(W) learning rate {f['learning_rate']}, betas {f['adam_betas']}; EMA: {f['ema']}.
- {f['global_step']} steps of batch {f['total_batch_size']}; stopped because: {f['stop_reason']}.
- Hardware: {f['hardware']}; wall time {f['wall_time']}.
- Command: `{f['command']}`

## Validation

{f['validation_description']}

{f['validation_table']}

{f['validation_figure']}
"""


if __name__ == "__main__":
    sys.exit(common.run(main, parse_args))
