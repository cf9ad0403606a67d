"""qid2_diffusers.training and training/train_qid2.py: loss, configs, the Trainer's hooks, resume after a kill,
two processes, the model card, average_weights."""

import io
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import qid2_diffusers
from qid2_diffusers.training import average_weights
from qid2_diffusers.training.checkpoints import checkpoints
from qid2_diffusers.training.config import CONFIG_DIR
from qid2_diffusers.pipelines.training_utils import masked_mean, random_crops
from qid2_diffusers.training.data import EpochSampler, step_generator
from qid2_diffusers.pipelines.training_utils import QID2Denoiser, diffusion_loss
from qid2_diffusers.training.qid2 import QID2Trainer
from qid2_diffusers.training.reporting import MODEL_CARD_TEMPLATE, metrics_table, render_model_card, template_fields
from qid2_diffusers.training.trainer import Trainer

REPO = Path(__file__).resolve().parents[1]
TRAINING = REPO / "training"

# One thread per process: two training processes on two cores must not oversubscribe them.
# PYTHONPATH: the entry scripts import the same package as these tests, from any folder.
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1",
       "PYTHONPATH": str(Path(qid2_diffusers.__file__).resolve().parents[1])}


def _batch(b=4, r=3, h=16, w=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    mask = torch.zeros(b, 1, h, w)
    mask[..., 4:12, 3:13] = 1
    return {
        "target": torch.randn(b, 1, h, w, generator=g),
        "references": torch.randn(b, r, h, w, generator=g),
        "target_bvec": torch.nn.functional.normalize(torch.randn(b, 3, generator=g), dim=-1),
        "reference_bvecs": torch.nn.functional.normalize(torch.randn(b, r, 3, generator=g), dim=-1),
        "mask": mask,
    }


class _ConstantDenoiser(torch.nn.Module):
    """Predicts zero everywhere: the loss is then the target's own masked mean square."""

    def __init__(self):
        super().__init__()
        from qid2_diffusers import build_unet

        self.unet = build_unet("tiny", 3)

    def forward(self, noisy, references, timesteps, target_bvecs, reference_bvecs):
        return torch.zeros_like(noisy)


def test_masked_loss_ignores_background_and_unmasked_does_not():
    from qid2_diffusers.schedulers import training_scheduler

    scheduler = training_scheduler("sample")
    batch = _batch()
    changed = {**batch, "target": torch.where(batch["mask"].bool(), batch["target"], batch["target"] * 50 + 7)}

    def loss(b, masked):
        return diffusion_loss(_ConstantDenoiser(), scheduler, b, torch.Generator().manual_seed(1), masked=masked)

    expected = (batch["target"] ** 2)[batch["mask"].bool()].mean()
    assert torch.allclose(loss(batch, True), expected)
    assert torch.allclose(loss(changed, True), loss(batch, True))
    assert loss(changed, False) > 10 * loss(batch, False)


@pytest.mark.parametrize("prediction_type,attention", [("v_prediction", "every"), ("epsilon", "every"),
                                                       ("v_prediction", "coarse")])
def test_loss_decreases_on_a_fixed_batch(prediction_type, attention):
    from qid2_diffusers import build_pipeline

    pipe = build_pipeline("tiny", 3, prediction_type, seed=0, attention=attention)
    model = QID2Denoiser(pipe.unet, pipe.direction_encoder)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    batch = _batch(h=12, w=14)
    losses = []
    for _ in range(30):
        loss = diffusion_loss(model, pipe.scheduler, batch, torch.Generator().manual_seed(0))
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], losses


def test_epoch_sampler_order_depends_only_on_seed_and_epoch():
    a, b = EpochSampler(50, seed=3), EpochSampler(50, seed=3)
    a.set_epoch(2)
    b.set_epoch(2)
    assert list(a) == list(b) and sorted(a) == list(range(50))
    b.set_epoch(3)
    assert list(a) != list(b)
    g1 = step_generator(0, 1, 5, 0)
    g2 = step_generator(0, 1, 5, 0)
    assert torch.equal(torch.randn(4, generator=g1), torch.randn(4, generator=g2))
    assert not torch.equal(torch.randn(4, generator=step_generator(0, 1, 5, 1)), torch.randn(4, generator=g2))


def test_random_crops_are_reproducible_and_hold_brain():
    batch = _batch(b=6, h=30, w=26)
    batch["mask"][:] = 0
    batch["mask"][:, :, 20:24, 2:5] = 1  # brain only in one corner
    a = random_crops(batch, 8, torch.Generator().manual_seed(4))
    b = random_crops(batch, 8, torch.Generator().manual_seed(4))
    assert a["target"].shape == (6, 1, 8, 8) and a["references"].shape == (6, 3, 8, 8) and a["mask"].shape == (6, 1, 8, 8)
    assert all(torch.equal(a[k], b[k]) for k in ("target", "references", "mask"))
    assert torch.equal(a["target_bvec"], batch["target_bvec"])
    assert (a["mask"].flatten(1).sum(1) > 0).all()
    # Each crop is a window of its own sample.
    windows = batch["target"][0, 0].unfold(0, 8, 1).unfold(1, 8, 1).reshape(-1, 8, 8)
    assert any(torch.equal(w, a["target"][0, 0]) for w in windows)
    assert random_crops(batch, None, torch.Generator()) is batch


class _Slices(torch.utils.data.Dataset):
    """24 in-memory samples in QID2Dataset's format; ``set_epoch`` records the epochs asked for (several times each)."""

    def __init__(self):
        self.batch = _batch(b=24, h=12, w=12, seed=5)
        self.epochs = []

    def set_epoch(self, epoch):
        self.epochs.append(epoch)

    def __len__(self):
        return 24

    def __getitem__(self, i):
        return {k: v[i] for k, v in self.batch.items()}


class _LinearTrainer(Trainer):
    """A 1x1 convolution from the references to the target: the smallest model the hooks can train."""

    crash_at = None

    @classmethod
    def complete_args(cls, args, error):
        args = super().complete_args(args, error)
        args.learning_rate = args.learning_rate or 0.05
        return args

    def build_models(self):
        torch.manual_seed(0)
        return {"linear": torch.nn.Conv2d(3, 1, 1)}

    def training_step(self, batch, generator):
        if self.state.global_step == self.crash_at:
            raise KeyboardInterrupt("killed")
        noisy = batch["references"] + 0.1 * torch.randn(batch["references"].shape, generator=generator)
        error = (self.models["linear"](noisy) - batch["target"]) ** 2
        return {"loss": masked_mean(error, batch["mask"]), "unmasked": error.mean()}

    def save(self, output_dir):
        from safetensors.torch import save_file

        from qid2_diffusers.data.io import atomic_write

        atomic_write(Path(output_dir) / "linear.safetensors", lambda tmp: save_file(self.model.state_dict(), str(tmp)))


def test_trainer_hooks_train_checkpoint_and_resume_an_in_memory_model_to_the_same_weights(tmp_path):
    def trainer(out, **settings):
        # The shipped tiny config supplies batch size, step budget and trackers; settings override it.
        args = _LinearTrainer.training_args(output_dir=out, config="tiny", checkpointing_steps=3, crop_size=8, use_ema=True,
                                            ema_max_decay=0.9, dataloader_num_workers=0, **settings)
        return _LinearTrainer(args, train_dataset=_Slices())

    whole = trainer(tmp_path / "whole")
    assert (whole.args.train_batch_size, whole.args.max_train_steps, whole.args.learning_rate) == (4, 8, 0.05)
    with pytest.raises(TypeError, match="learning_rat"):
        _LinearTrainer.training_args(output_dir=tmp_path, learning_rat=1.0)
    assert whole.train() == 0
    # 6 steps per epoch: the run crosses into a second epoch, and stops at the tiny config's 8 steps.
    assert list(dict.fromkeys(whole.train_dataset.epochs)) == [0, 1] and whole.state.global_step == 8
    assert [p.name for p in checkpoints(tmp_path / "whole")] == ["checkpoint-3", "checkpoint-6", "checkpoint-8"]
    start = _LinearTrainer.build_models(whole)["linear"].state_dict()
    final = load_file(str(tmp_path / "whole" / "linear.safetensors"))
    assert max((final[k] - start[k]).abs().max().item() for k in start) > 1e-2

    killed = trainer(tmp_path / "killed")
    killed.crash_at = 5
    with pytest.raises(KeyboardInterrupt):
        killed.train()
    assert [p.name for p in checkpoints(tmp_path / "killed")] == ["checkpoint-3"]
    resumed = trainer(tmp_path / "killed", resume_from_checkpoint="latest")
    resumed.train()
    # Resumed in the middle of epoch 0: the three batches already consumed are skipped, not redrawn.
    assert list(dict.fromkeys(resumed.train_dataset.epochs)) == [0, 1] and resumed.state.global_step == 8
    again = load_file(str(tmp_path / "killed" / "linear.safetensors"))
    assert all(torch.equal(final[k], again[k]) for k in final)
    raw = [load_file(str(tmp_path / run / "checkpoint-8" / "model.safetensors")) for run in ("whole", "killed")]
    assert all(torch.equal(raw[0][k], raw[1][k]) for k in raw[0])
    summary = json.loads((tmp_path / "killed" / "training_summary.json").read_text())
    assert summary["global_step"] == 8 and summary["data_description"] == "in-memory dataset"
    assert summary["command"].startswith("_LinearTrainer.training_args(") and not (tmp_path / "killed" / "README.md").exists()


def test_config_precedence_and_unknown_keys(tmp_path):
    args = QID2Trainer.parse_args(["--preset", "paper", "--data_dir", "d", "--output_dir", "o"])
    assert (args.prediction_type, args.learning_rate, args.unmasked_loss) == ("epsilon", 2.5e-5, True)
    assert (args.adam_beta1, args.adam_beta2) == (0.5, 0.999)
    args = QID2Trainer.parse_args(
        ["--config", str(CONFIG_DIR / "paper.yaml"), "--learning_rate", "1e-3", "--data_dir", "d", "--output_dir", "o"]
    )
    assert args.learning_rate == 1e-3 and args.prediction_type == "epsilon" and args.cache_dir == os.path.join("o", "cache")
    bad = tmp_path / "bad.yaml"
    bad.write_text("learning_rat: 0.1\n")
    with pytest.raises(ValueError, match="bad.yaml: unknown setting.*learning_rat"):
        QID2Trainer.parse_args(["--config", str(bad), "--data_dir", "d", "--output_dir", "o"])


def _card_fields(**given):
    """Every field the QID² card template names, as ``<name>`` unless given."""
    return {**{name: f"<{name}>" for name in template_fields(MODEL_CARD_TEMPLATE)}, **given}


def test_model_card_renders_command_metadata_and_validation_table_and_refuses_missing_fields():
    from huggingface_hub import ModelCard

    command = "python training/train_qid2.py --config tiny --data_dir d --output_dir o"
    table = metrics_table({"this model": {"fa_mae": 0.0123, "ssim": 0.9}, "Interp (R=3)": {"fa_mae": 0.0456}})
    card = str(render_model_card(_card_fields(command=command, validation_table=table, wall_time="1 min 02 s",
                                              hardware="CPU (x86_64, 2 cores)"), tags=("dwi", "diffusers")))
    assert card.startswith("---\nlibrary_name: diffusers\nlicense: apache-2.0\n")
    assert f"```bash\n{command}\n```" in card
    assert "| method | ssim | psnr | nrmse | fa_mae |" in card and "| this model | 0.9 | nan | nan | 0.0123 |" in card
    assert "| Interp (R=3) | nan | nan | nan | 0.0456 |" in card
    assert "Wall time: 1 min 02 s" in card and "Hardware: CPU (x86_64, 2 cores)" in card
    # The template's own comment and placeholders are gone; the header parses as Hub metadata.
    assert "{{" not in card and "{#" not in card and "Jinja2 template" not in card
    assert ModelCard(card).data.to_dict() == {"library_name": "diffusers", "license": "apache-2.0", "tags": ["dwi", "diffusers"]}
    fields = _card_fields()
    del fields["model_name"]
    with pytest.raises(KeyError, match="model_name"):
        render_model_card(fields)


def _script(name, *args):
    return [sys.executable, str(TRAINING / name), *args]


def _tiny_args(cohort, out, cache, *extra):
    return ["--config", "tiny", "--data_dir", str(cohort), "--output_dir", str(out), "--cache_dir", str(cache), *extra]


def _unet_and_encoder(folder):
    return {
        **load_file(str(folder / "unet" / "diffusion_pytorch_model.safetensors")),
        **{f"enc.{k}": v for k, v in load_file(str(folder / "direction_encoder" / "diffusion_pytorch_model.safetensors")).items()},
    }


def _max_diff(a, b):
    assert a.keys() == b.keys()
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)


@pytest.mark.slow  # ~1 min: three training runs in subprocesses
def test_resume_after_kill_gives_the_same_weights(training_cohort, tmp_path):
    # 240 samples, 20 steps per epoch: the resumed run crosses an epoch boundary.
    extra = ["--num_validation_subjects", "0", "--train_batch_size", "12", "--max_train_steps", "24",
             "--checkpointing_steps", "2", "--checkpoints_total_limit", "2", "--use_ema", "--ema_max_decay", "0.9"]
    cache = tmp_path / "cache"
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    subprocess.run(_script("train_qid2.py", *_tiny_args(training_cohort, whole, cache, *extra)), env=ENV, check=True,
                   capture_output=True, timeout=300)

    log = open(tmp_path / "killed.log", "w")
    proc = subprocess.Popen(_script("train_qid2.py", *_tiny_args(training_cohort, killed, cache, *extra)), env=ENV,
                            stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 240
    while not checkpoints(killed):
        assert proc.poll() is None, (tmp_path / "killed.log").read_text()[-2000:]
        assert time.monotonic() < deadline
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert not (killed / "model_index.json").exists()
    first = checkpoints(killed)[-1].name

    resumed = subprocess.run(
        _script("train_qid2.py", *_tiny_args(training_cohort, killed, cache, *extra, "--resume_from_checkpoint", "latest")),
        env=ENV, capture_output=True, text=True, timeout=300,
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resuming from {killed / first}" in resumed.stdout + resumed.stderr

    # Raw weights at the end, and the saved (EMA) pipeline weights.
    assert [p.name for p in checkpoints(killed)] == ["checkpoint-22", "checkpoint-24"]
    assert _max_diff(load_file(str(whole / "checkpoint-24" / "model.safetensors")),
                     load_file(str(killed / "checkpoint-24" / "model.safetensors"))) < 1e-5
    ema_whole, ema_killed = _unet_and_encoder(whole), _unet_and_encoder(killed)
    assert _max_diff(ema_whole, ema_killed) < 1e-5
    # ... and training did move the weights (the comparison is not between two untouched initialisations).
    from qid2_diffusers import build_pipeline

    init = build_pipeline("tiny", 3, seed=0)
    assert max((p.detach() - ema_whole[k]).abs().max().item() for k, p in init.unet.state_dict().items()) > 1e-3
    summary = json.loads((killed / "training_summary.json").read_text())
    assert summary["global_step"] == 24 and summary["elapsed_seconds"] > 0


def test_entry_script_runs_from_another_folder_with_the_shipped_config(training_cohort, tmp_path):
    # Nothing of the checkout is in the working folder: the config and the card template come from the package.
    run = subprocess.run(
        _script("train_qid2.py", "--config", "tiny", "--data_dir", str(training_cohort), "--output_dir", "out",
                "--max_train_steps", "2", "--num_validation_subjects", "0", "--validation_steps", "0",
                "--attention", "coarse"),
        cwd=tmp_path, env=ENV, capture_output=True, text=True, timeout=300,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    out = tmp_path / "out"
    summary = json.loads((out / "training_summary.json").read_text())
    # tiny.yaml's preset and batch size, the command line's step budget.
    assert summary["global_step"] == 2 and summary["train_batch_size"] == 4
    assert summary["preset"] == "tiny (block_out_channels [8, 8, 16])" and [p.name for p in checkpoints(out)] == ["checkpoint-2"]
    card = (out / "README.md").read_text()
    assert card.startswith("---\nlibrary_name: diffusers\n") and "python training/train_qid2.py --config tiny" in card
    assert "No held-out subject: no validation figures." in card and (out / "model_index.json").is_file()
    # --attention coarse: said in the card, and the saved network is that design.
    from qid2_diffusers import QID2Pipeline
    from qid2_diffusers.models.unet import attention_of

    assert "at half resolution and below" in card and attention_of(QID2Pipeline.from_pretrained(out).unet) == "coarse"
    # The data folder lies outside the working folder: the card's data line names it, not where this machine
    # keeps it (the command line stays as typed).
    assert summary["data_description"].endswith(f"subject(s) from `{training_cohort.name}`")
    assert f"subject(s) from `{training_cohort.name}`" in card
    # Output to a pipe (a log file): no step bar, whose every redraw would be a carriage return in the log.
    assert "\r" not in run.stdout + run.stderr and "steps:" not in run.stderr


def test_step_bar_only_on_a_terminal_of_the_main_process():
    from types import SimpleNamespace

    from qid2_diffusers.training.trainer import progress_bar_wanted

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    main, other = SimpleNamespace(is_local_main_process=True), SimpleNamespace(is_local_main_process=False)
    assert progress_bar_wanted(main, Terminal())
    assert not progress_bar_wanted(main, io.StringIO())  # a file or pipe
    assert not progress_bar_wanted(main, object())  # a stream replaced by something without isatty
    assert not progress_bar_wanted(other, Terminal())


def test_card_names_data_folders_relative_to_the_working_folder(tmp_path, monkeypatch):
    from qid2_diffusers.training.data import card_path

    monkeypatch.chdir(tmp_path)
    assert card_path("../data/rnd-train") == "../data/rnd-train"  # as typed
    assert card_path(tmp_path / "data" / "rnd-train") == "data/rnd-train"
    assert card_path(tmp_path.parent / "elsewhere" / "rnd-train") == "rnd-train"


def test_card_data_line_says_how_the_inputs_and_targets_were_made(written_phantom):
    import argparse

    from qid2_diffusers.data.layouts import discover_subjects
    from qid2_diffusers.training.data import describe_data

    subjects = discover_subjects(written_phantom.parent)
    args = argparse.Namespace(data_description=None, data_dir="rnd-train", denoise="none", target="acquisition")
    plain = describe_data(args, subjects)
    assert plain == "synthetic brain-like phantom cohort (`qid2 phantom`): 1 subject(s) from `rnd-train`"
    args.denoise, args.target = "mppca", "truth"
    assert describe_data(args, subjects) == (plain + "; b0s and kept directions denoised with `mppca` first "
                                             "(`--denoise`), as at inference; targets: the phantoms' noise-free "
                                             "signal (`--target truth`)")


def test_an_unknown_config_is_one_line_and_exit_status_2(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert QID2Trainer.main(["--config", "huge", "--data_dir", "d", "--output_dir", "o"]) == 2
    assert capsys.readouterr().err == "error: huge: config file not found (shipped configs: paper, small, tiny)\n"
    assert not (tmp_path / "o").exists()


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow  # ~15 s: two Accelerate processes
def test_two_processes_hold_identical_weights_and_the_output_loads(training_cohort, tmp_path):
    out = tmp_path / "ddp"
    # `accelerate launch --cpu` starts several CPU processes only through mpirun;
    # torchrun's launcher (--multi_gpu) with ACCELERATE_USE_CPU gives gloo processes without it.
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
              "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(_free_port())]
    run = subprocess.run(
        launch + [str(TRAINING / "train_qid2.py"),
                  # A wall-time budget far below 100 steps: both processes must agree on when to stop.
                  *_tiny_args(training_cohort, out, tmp_path / "cache", "--max_train_steps", "100",
                              "--max_train_time_minutes", "0.02", "--checkpointing_steps", "1000", "--use_ema",
                              "--save_dtype", "fp16", "--debug_dump_weights", "--report_to", "tensorboard")],
        env={**ENV, "ACCELERATE_USE_CPU": "true"}, capture_output=True, text=True, timeout=300,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    rank0 = json.loads((out / "debug_weights_rank0.json").read_text())
    rank1 = json.loads((out / "debug_weights_rank1.json").read_text())
    assert rank0 == rank1 and set(rank0) == {"model", "ema"}

    # fp16 on disk, float32 after loading, and it samples reproducibly.
    from qid2_diffusers import QID2Pipeline

    assert all(t.dtype == torch.float16 for t in load_file(str(out / "unet" / "diffusion_pytorch_model.safetensors")).values())
    pipe = QID2Pipeline.from_pretrained(str(out))
    pipe.set_progress_bar_config(disable=True)
    assert pipe.unet.dtype == torch.float32 and pipe.scheduler.__class__.__name__ == "DDIMScheduler"
    rng = np.random.default_rng(0)
    refs = rng.uniform(50, 150, (2, 3, 20, 22)).astype(np.float32)
    rb = rng.normal(size=(2, 3, 3))
    tb = rng.normal(size=(2, 3))
    a = pipe(refs, rb, tb, generator=torch.manual_seed(0)).images
    b = pipe(refs, rb, tb, generator=torch.manual_seed(0)).images
    assert a.shape == (2, 20, 22) and np.isfinite(a).all() and np.array_equal(a, b)

    summary = json.loads((out / "training_summary.json").read_text())
    steps = summary["global_step"]
    assert summary["num_processes"] == 2 and 1 <= steps < 100 and summary["total_batch_size"] == 8
    assert "wall-time budget" in summary["stop_reason"] and [p.name for p in checkpoints(out)] == [f"checkpoint-{steps}"]
    assert summary["validation"]["step"] == steps and 0 <= summary["validation"]["fa_mae"] < 1
    assert set(summary["validation_reference_methods"]) == {"interp", "dti"}
    card = (out / "README.md").read_text()
    assert "{{" not in card and "accelerate launch --num_processes 2" in card and "sub-00" in card
    assert "| Interp (R=3) |" in card and (out / "validation.png").is_file()
    assert f"- Wall time: {summary['wall_time']}." in card and f"- Hardware: {summary['hardware']}; 2 process(es)" in card
    assert any((out / "logs").rglob("events.out.tfevents.*"))


def test_average_weights_is_the_mean_and_checks_its_inputs(tmp_path, training_cohort, capsys):
    from qid2_diffusers import QID2Pipeline, build_pipeline

    a, b = build_pipeline("tiny", 3, seed=1), build_pipeline("tiny", 3, seed=2)
    a.save_pretrained(tmp_path / "a")
    b.save_pretrained(tmp_path / "b")
    out = tmp_path / "soup"
    code = average_weights.main(["--inputs", str(tmp_path / "a"), str(tmp_path / "b"), "--output_dir", str(out),
                                 "--inference_scheduler", "ddim", "--default_num_inference_steps", "3",
                                 "--save_dtype", "fp32", "--validation_data_dir", str(training_cohort),
                                 "--cache_dir", str(tmp_path / "cache"), "--validation_num_slices", "1"])
    assert code == 0
    soup = QID2Pipeline.from_pretrained(out)
    for name in ("unet", "direction_encoder"):
        sa, sb, ss = (getattr(p, name).state_dict() for p in (a, b, soup))
        for key in sa:
            torch.testing.assert_close(ss[key], (sa[key] + sb[key]) / 2, rtol=0, atol=1e-6)
    assert type(soup.scheduler).__name__ == "DDIMScheduler" and soup.config.default_num_inference_steps == 3
    assert "_name_or_path" not in json.loads((out / "model_index.json").read_text())
    summary = json.loads((out / "average_summary.json").read_text())
    assert summary["command"].startswith("python training/average_weights.py --inputs")
    # Scored with the training script's validation, Interp and DTI-predict beside it.
    assert {"average", "interp", "dti"} <= set(summary["validation"])
    assert np.isfinite(summary["validation"]["average"]["fa_mae"])
    assert (out / "validation.png").read_bytes()[:4] == b"\x89PNG"

    build_pipeline("tiny", 6, seed=3).save_pretrained(tmp_path / "r6")
    capsys.readouterr()
    code = average_weights.main(["--inputs", str(tmp_path / "a"), str(tmp_path / "r6"), "--output_dir", str(tmp_path / "x")])
    err = capsys.readouterr().err
    # One line naming the input and the problem (after diffusers' loading bars), exit status 2, no traceback.
    assert code == 2 and "Traceback" not in err
    assert err.splitlines()[-1] == f"error: {tmp_path / 'r6'}: has another architecture than {tmp_path / 'a'}"
    assert not (tmp_path / "x" / "model_index.json").exists()

    # One input: re-saved with new defaults (how a run becomes a shipped model), weights and options kept.
    prior = build_pipeline("tiny", 3, seed=4, physics_prior=True, bval_conditioning=True)
    prior.save_pretrained(tmp_path / "prior")
    assert average_weights.main(["--inputs", str(tmp_path / "prior"), "--output_dir", str(tmp_path / "ship"),
                                 "--default_adapt_steps", "7", "--save_dtype", "fp32"]) == 0
    shipped = QID2Pipeline.from_pretrained(tmp_path / "ship")
    assert shipped.physics_prior and shipped.bval_conditioning and shipped.config.default_adapt_steps == 7
    for key, value in prior.unet.state_dict().items():
        torch.testing.assert_close(shipped.unet.state_dict()[key], value, rtol=0, atol=0)
    # A physics-prior network is validated with its correction whole (VALIDATION_RESIDUAL_WEIGHT), not with
    # inference's "auto" weight, which drops an unproven correction and would score the bare tensor fit.
    # (DDIM, 1 step: the fresh pipeline's own default is DDPM's 1000, minutes of sampling for nothing.)
    assert average_weights.main(["--inputs", str(tmp_path / "prior"), "--output_dir", str(tmp_path / "scored"),
                                 "--inference_scheduler", "ddim", "--default_num_inference_steps", "1",
                                 "--validation_data_dir", str(training_cohort), "--cache_dir", str(tmp_path / "cache"),
                                 "--validation_num_slices", "1"]) == 0
    scored = json.loads((tmp_path / "scored" / "average_summary.json").read_text())["validation"]
    assert abs(scored["average"]["fa_mae"] - scored["dti"]["fa_mae"]) > 1e-4


def test_validation_inputs_are_denoised_over_the_whole_volume_as_the_engine_does(written_phantom, tmp_path):
    import argparse

    import nibabel as nib

    from qid2_diffusers.data.layouts import discover_subjects
    from qid2_diffusers.data.phantom.writing import truth_file
    from qid2_diffusers.training.validation import Validator

    subject = discover_subjects(written_phantom.parent)[0]
    args = argparse.Namespace(cache_dir=tmp_path, R=3, validation_n_acquired=30, validation_num_slices=2)
    raw = Validator._prepare(subject, 1000.0, argparse.Namespace(**vars(args), denoise="none"))
    clean = Validator._prepare(subject, 1000.0, argparse.Namespace(**vars(args), denoise="mppca"))
    assert clean["slices"] == raw["slices"] and len(raw["slices"]) == 2
    # Same volumes in the same order; the targets (scored against) stay the acquisition.
    assert np.array_equal(clean["inputs"][1], raw["inputs"][1]) and np.array_equal(clean["truth"], raw["truth"])
    dwi = subject.load()
    truth = np.asarray(nib.load(truth_file(written_phantom, "signal")).dataobj, dtype=np.float32)[:, :, raw["slices"]]
    b0, shell = dwi.b0_indices, np.flatnonzero(np.abs(dwi.bvals - 1000) < 50)
    volumes = np.union1d(b0, shell)
    # Inputs are b0s then the kept directions, in the order of `volumes`: find each input's volume by its column.
    kept = [volumes[np.flatnonzero((raw["inputs"][0][..., j:j + 1] == raw["evaluation"].data).all(axis=(0, 1, 2)))[0]]
            for j in range(raw["inputs"][0].shape[-1])]
    reference = truth[..., kept]
    brain = raw["mask"]
    err = {k: float(np.abs(item["inputs"][0] - reference)[brain].mean()) for k, item in (("raw", raw), ("clean", clean))}
    assert err["clean"] < 0.8 * err["raw"]
