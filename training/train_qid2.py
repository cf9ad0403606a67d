#!/usr/bin/env python
"""Train QID² (a UNet2DConditionModel + DirectionEncoder) with 🤗 Accelerate.

Runs on one CPU, one GPU or many (``accelerate launch``), resumes after a kill
with the same result as an uninterrupted run, validates on held-out subjects
and ends with a ``QID2Pipeline`` folder and its model card::

    qid2 phantom --out data/phantoms --subjects 17 --seed 0 --resolution 2.5
    python training/train_qid2.py --config training/configs/small.yaml \\
        --data_dir data/phantoms --output_dir runs/qid2-small-r3
    accelerate launch --num_processes 2 training/train_qid2.py --config training/configs/small.yaml \\
        --data_dir data/phantoms --output_dir runs/qid2-small-r3 --resume_from_checkpoint latest

Several processes on CPUs (gloo): ``accelerate launch --cpu`` starts them only
through mpirun; without MPI use
``ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes 2 ...``.
On a shared CPU set ``OMP_NUM_THREADS`` to the cores each process may use.

Settings come from ``--config`` (or ``training/configs/<preset>.yaml`` when
only ``--preset`` is given); flags on the command line win. Outputs in
``--output_dir``: the pipeline (``model_index.json``, ``unet/``,
``direction_encoder/``, ``scheduler/``), ``README.md`` (the model card, from
the top-level ``model_card.md``), ``training_summary.json``,
``validation.png``, ``checkpoint-<step>/`` folders and TensorBoard ``logs/``.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402
from qid2_diffusers import QID2Pipeline, build_pipeline  # noqa: E402
from qid2_diffusers.image_processor import QID2ImageProcessor  # noqa: E402
from qid2_diffusers.errors import QID2InputError  # noqa: E402
from qid2_diffusers.schedulers import SCHEDULERS, make_scheduler, training_scheduler  # noqa: E402
from qid2_diffusers.upsampling import QID2Upsampler  # noqa: E402

#: Learning rate when neither the command line nor the config gives one
#: (diffusers' unconditional example; the paper's 2.5e-5 is in configs/paper.yaml).
DEFAULT_LEARNING_RATE = 1e-4


def parse_args(argv=None):
    parser = common.base_parser("Train QID² for q-space up-sampling of diffusion MRI.")
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
                   help="Condition on the tensor-fit prediction of the target from the kept directions and the mean "
                        "b0, and learn the residual target - prior (off: the paper's configuration).")
    g.add_argument("--bval_conditioning", action="store_true",
                   help="Direction tokens carry b, so one model serves every shell in --shells.")
    g.add_argument("--timestep_bias_portion", type=float, default=0.0,
                   help="Fraction of training timesteps drawn from the noisiest quarter of the schedule, where "
                        "few-step samplers start (0: uniform, as in the paper).")
    args = common.parse_args(parser, argv)
    if args.learning_rate is None:
        args.learning_rate = DEFAULT_LEARNING_RATE
    return args


class QID2Denoiser(nn.Module):
    """The U-Net and the direction encoder as one trainable module, called as the pipeline calls them."""

    def __init__(self, unet, direction_encoder):
        super().__init__()
        self.unet = unet
        self.direction_encoder = direction_encoder

    def forward(self, noisy, conditions, timesteps, target_bvecs, reference_bvecs, target_bvals=None, reference_bvals=None):
        tokens = self.direction_encoder(target_bvecs, reference_bvecs, target_bvals, reference_bvals).to(noisy.dtype)
        return self.unet(torch.cat([noisy, conditions], dim=1), timesteps, encoder_hidden_states=tokens).sample


def sample_timesteps(scheduler, n: int, generator: torch.Generator, bias_portion: float = 0.0) -> torch.Tensor:
    """Uniform training timesteps, a ``bias_portion`` of them from the noisiest quarter.

    A one-step sampler only ever evaluates the network at the last timestep,
    so part of the budget goes where it is used; the rest keeps every noise
    level trained, so multi-step sampling still works.
    """
    total = scheduler.config.num_train_timesteps
    t = torch.randint(0, total, (n,), generator=generator)
    if bias_portion > 0:
        late = torch.randint(total - total // 4, total, (n,), generator=generator)
        pick = torch.rand(n, generator=generator) < bias_portion
        t = torch.where(pick, late, t)
    return t


def diffusion_loss(denoiser, scheduler, batch, generator: torch.Generator, *, masked: bool = True,
                   timestep_bias_portion: float = 0.0) -> torch.Tensor:
    """MSE between the denoiser's output and its target for the scheduler's prediction type.

    Target and conditions are padded together with the pipeline's
    :class:`~qid2_diffusers.image_processor.QID2ImageProcessor`, and the noise
    is drawn at the padded size, as at sampling time; the error is taken on
    the unpadded slice, inside the brain mask when ``masked``. With a physics
    prior in the batch (``prior``, ``b0``) the clean sample is the residual
    target - prior, as the pipeline adds the prior back after sampling.

    Args:
        denoiser (`QID2Denoiser`): possibly wrapped by Accelerate.
        scheduler (`DDPMScheduler`): the training schedule.
        batch (`dict`): a :class:`~qid2_diffusers.data.dataset.QID2Dataset` batch.
        generator (`torch.Generator`): CPU generator for the noise and timesteps.
        masked (`bool`, *optional*, defaults to `True`): restrict the mean to the brain mask.
        timestep_bias_portion (`float`, *optional*, defaults to 0): see :func:`sample_timesteps`.
    """
    unet = getattr(denoiser, "module", denoiser).unet
    processor = QID2ImageProcessor.for_unet(unet)
    parts = [batch["target"], batch["references"]]
    if "prior" in batch:
        parts += [batch["prior"], batch["b0"]]
    x, size = processor.pad(torch.cat(parts, dim=1))
    clean, conditions = x[:, :1], x[:, 1:]
    if "prior" in batch:
        r = batch["references"].shape[1]
        clean = clean - conditions[:, r : r + 1]
    noise = torch.randn(clean.shape, generator=generator).to(clean.device)
    timesteps = sample_timesteps(scheduler, clean.shape[0], generator, timestep_bias_portion).to(clean.device)
    noisy = scheduler.add_noise(clean, noise, timesteps)
    bvals = {k: batch[k] for k in ("target_bvals", "reference_bvals") if k in batch}
    pred = denoiser(noisy, conditions, timesteps, batch["target_bvec"], batch["reference_bvecs"], **bvals)
    kind = scheduler.config.prediction_type
    if kind == "epsilon":
        goal = noise
    elif kind == "v_prediction":
        goal = scheduler.get_velocity(clean, noise, timesteps)
    else:
        goal = clean
    err = (processor.crop(pred.float(), size) - processor.crop(goal.float(), size)) ** 2
    return common.masked_mean(err, batch["mask"] if masked else None)


def make_pipeline(denoiser, training_scheduler, args) -> QID2Pipeline:
    """A pipeline around the live modules, with the sampler used for validation and saving."""
    return QID2Pipeline(
        unet=denoiser.unet,
        direction_encoder=denoiser.direction_encoder,
        scheduler=make_scheduler(args.inference_scheduler, training_scheduler.config),
        default_num_inference_steps=args.validation_num_inference_steps,
        physics_prior=args.physics_prior,
    )


def main(args) -> int:
    accelerator = common.make_accelerator(args)
    logger = common.setup_logging(accelerator, "train_qid2")
    # Data first: a bad input folder stops the run before anything is written.
    data = common.load_training_data(args, accelerator)
    if accelerator.is_main_process:
        os.makedirs(args.output_dir, exist_ok=True)
    if args.pretrained_model_name_or_path:
        # Fine-tuning: the networks start from a saved pipeline (float32 for
        # training even if it was saved fp16); the training schedule is rebuilt
        # so --prediction_type must match the one it was trained with.
        pipe = QID2Pipeline.from_pretrained(args.pretrained_model_name_or_path, torch_dtype=torch.float32)
        if pipe.num_references != args.R:
            raise QID2InputError(args.pretrained_model_name_or_path, f"was trained for R = {pipe.num_references}, not --R {args.R}")
        for flag in ("physics_prior", "bval_conditioning"):
            if getattr(pipe, flag) != getattr(args, flag):
                raise QID2InputError(args.pretrained_model_name_or_path,
                                     f"has {flag} = {getattr(pipe, flag)}; pass --{flag} accordingly")
        if pipe.scheduler.config.prediction_type != args.prediction_type:
            raise QID2InputError(
                args.pretrained_model_name_or_path,
                f"predicts {pipe.scheduler.config.prediction_type}, not --prediction_type {args.prediction_type}",
            )
        pipe.scheduler = training_scheduler(args.prediction_type)
    else:
        pipe = build_pipeline(args.preset, args.R, args.prediction_type, seed=args.seed,
                              physics_prior=args.physics_prior, bval_conditioning=args.bval_conditioning)
    noise_scheduler = pipe.scheduler
    denoiser = QID2Denoiser(pipe.unet, pipe.direction_encoder)
    denoiser.train()
    ema = common.make_ema(denoiser.parameters(), args) if args.use_ema else None

    dataloader = accelerator.prepare(data.dataloader)
    schedule = common.make_schedule(args, dataloader)
    optimizer = torch.optim.AdamW(
        denoiser.parameters(),
        lr=args.learning_rate,
        betas=(args.adam_beta1, args.adam_beta2),
        weight_decay=args.adam_weight_decay,
        eps=args.adam_epsilon,
    )
    lr_scheduler = common.make_lr_scheduler(args, optimizer, schedule, accelerator)
    denoiser, optimizer, lr_scheduler = accelerator.prepare(denoiser, optimizer, lr_scheduler)
    state = common.RunState()
    accelerator.register_for_checkpointing(state)
    if ema is not None:
        ema.to(accelerator.device)
        accelerator.register_for_checkpointing(ema)
    global_step = common.resume(accelerator, args, state)

    validator = None
    if accelerator.is_main_process:
        accelerator.init_trackers("qid2", config=common.tracker_config(args))
        if data.validation_subjects:
            validator = common.Validator(data.validation_subjects, args)
            logger.info("reference methods on the validation slices: %s", validator.baselines)
    unwrapped = accelerator.unwrap_model(denoiser)

    def validate(step: int) -> None:
        if validator is None:
            return
        if ema is not None:
            ema.store(unwrapped.parameters())
            ema.copy_to(unwrapped.parameters())
        unwrapped.eval()
        upsampler = QID2Upsampler(
            make_pipeline(unwrapped, noise_scheduler, args),
            num_inference_steps=args.validation_num_inference_steps,
            batch_size=args.validation_batch_size,
            seed=args.seed,
            progress=False,
        )
        common.validate(accelerator, validator, upsampler, state, step, args)
        unwrapped.train()
        if ema is not None:
            ema.restore(unwrapped.parameters())

    logger.info(
        "%d training samples from %d subject(s); %d steps of %d x %d process(es), %d update(s) per epoch",
        len(data.dataset), len(data.train_ids), schedule.max_train_steps, args.train_batch_size,
        accelerator.num_processes, schedule.updates_per_epoch,
    )
    clock = common.Clock(state)
    progress = tqdm(total=schedule.max_train_steps, initial=global_step, desc="steps", disable=not accelerator.is_local_main_process)
    stop_reason = f"reached max_train_steps ({schedule.max_train_steps})"
    for epoch, batch_index, batch in common.batches(accelerator, data, dataloader, schedule, global_step, args):
        if global_step >= schedule.max_train_steps:
            break
        with accelerator.accumulate(denoiser):
            generator = common.step_generator(args.seed, epoch, batch_index, accelerator.process_index)
            batch = common.random_crops(batch, args.crop_size, generator)
            loss = diffusion_loss(denoiser, noise_scheduler, batch, generator, masked=not args.unmasked_loss,
                                  timestep_bias_portion=args.timestep_bias_portion)
            accelerator.backward(loss)
            if accelerator.sync_gradients and args.max_grad_norm:
                accelerator.clip_grad_norm_(denoiser.parameters(), args.max_grad_norm)
            optimizer.step()
            lr_scheduler.step()
            optimizer.zero_grad(set_to_none=True)
        if not accelerator.sync_gradients:
            continue
        if ema is not None:
            ema.step(unwrapped.parameters())
        global_step += 1
        state.global_step = global_step
        logs = {"loss": loss.detach().item(), "lr": lr_scheduler.get_last_lr()[0], "epoch": epoch}
        if ema is not None:
            logs["ema_decay"] = ema.cur_decay_value
        progress.update(1)
        progress.set_postfix(loss=f"{logs['loss']:.4f}", epoch=epoch)
        accelerator.log(logs, step=global_step)
        stop = common.end_of_step(accelerator, args, clock, global_step, schedule, validate)
        if stop:
            stop_reason = stop
            break
    progress.close()
    clock.update()
    accelerator.wait_for_everyone()

    if args.debug_dump_weights:
        common.dump_weights(accelerator, args, unwrapped, ema)
    if accelerator.is_main_process:
        validate(global_step)
        if ema is not None:
            ema.copy_to(unwrapped.parameters())
        pipeline = common.cast_for_saving(make_pipeline(unwrapped, noise_scheduler, args), args)
        common.save_pretrained_atomic(pipeline, args.output_dir, safe_serialization=True)
        fields = common.run_fields(args, accelerator, data, state, schedule, stop_reason, validator)
        fields.update(
            model_name=Path(args.output_dir).resolve().name,
            model_path=args.hub_model_id if args.push_to_hub and args.hub_model_id else args.output_dir,
            preset=f"{args.preset} (block_out_channels {list(unwrapped.unet.config.block_out_channels)})",
            prediction_type=args.prediction_type,
            inference_scheduler=args.inference_scheduler.upper(),
            num_inference_steps=args.validation_num_inference_steps,
        )
        common.write_json(Path(args.output_dir) / "training_summary.json", common.summary(fields, state, validator))
        common.write_model_card(args.output_dir, fields)
        if args.push_to_hub:
            logger.info("pushed to https://huggingface.co/%s", common.push_to_hub(args))
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return 0


if __name__ == "__main__":
    sys.exit(common.run(main, parse_args))
