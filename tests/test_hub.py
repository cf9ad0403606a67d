"""Model loading (folder, Hub cache offline), sampler swap, device/dtype choice, and ``qid2 push``'s checks."""

import json
import os
import shutil
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler

from qid2_diffusers.cli import main
from qid2_diffusers.cli.push import files_to_upload
from qid2_diffusers.errors import QID2InputError
from qid2_diffusers.hub import compile_unet, load_pipeline, model_num_references, resolve_model, select_device, select_dtype, with_scheduler


@pytest.fixture()
def model_copy(tmp_path, tiny_model_dir):
    dst = tmp_path / "model"
    shutil.copytree(tiny_model_dir, dst)
    return dst


def test_resolve_model_reads_r_and_checks_it(tiny_model_dir):
    assert resolve_model(tiny_model_dir) == tiny_model_dir
    assert model_num_references(tiny_model_dir) == 3
    with pytest.raises(QID2InputError, match="trained for R = 3 references, not R = 6"):
        resolve_model(tiny_model_dir, num_references=6)


def test_a_prior_model_keeps_its_r_and_its_prior_when_the_sampler_changes(tmp_path):
    from qid2_diffusers import build_pipeline

    build_pipeline("tiny", 3, seed=0, physics_prior=True).save_pretrained(tmp_path / "prior")
    # Its U-Net takes 1 + R + 2 channels; R is the direction encoder's.
    assert model_num_references(tmp_path / "prior") == 3
    pipe = load_pipeline(tmp_path / "prior", scheduler="ddim", device="cpu")
    assert pipe.physics_prior and isinstance(pipe.scheduler, DDIMScheduler)


@pytest.mark.parametrize(
    "damage, message",
    [
        ("unet/diffusion_pytorch_model.safetensors", "missing unet/diffusion_pytorch_model.safetensors"),
        ("scheduler/scheduler_config.json", "missing scheduler/scheduler_config.json"),
        ("model_index.json", "missing model_index.json"),
    ],
)
def test_incomplete_model_folder_is_one_line_error(model_copy, damage, message):
    (model_copy / damage).unlink()
    with pytest.raises(QID2InputError, match=message) as err:
        load_pipeline(model_copy, device="cpu")
    assert "\n" not in str(err.value)


def test_other_pipeline_class_and_bad_paths(model_copy, tmp_path):
    index = json.loads((model_copy / "model_index.json").read_text())
    index["_class_name"] = "DDPMPipeline"
    (model_copy / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(QID2InputError, match="DDPMPipeline pipeline, not a QID2Pipeline"):
        resolve_model(model_copy)
    with pytest.raises(QID2InputError, match="no such model folder"):
        resolve_model(tmp_path / "does" / "not" / "exist")
    a_file = tmp_path / "weights.safetensors"
    a_file.write_bytes(b"x")
    with pytest.raises(QID2InputError, match="is a file"):
        resolve_model(a_file)


def test_unknown_hub_id_offline_is_clear(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(QID2InputError, match="not in the Hugging Face cache"):
        resolve_model("nobody/no-such-qid2-model")


def test_scheduler_swap_shares_weights_and_keeps_original(tiny_model_dir):
    pipe = load_pipeline(tiny_model_dir, device="cpu")
    assert isinstance(pipe.scheduler, DDPMScheduler)
    ddim = with_scheduler(pipe, "ddim")
    assert isinstance(ddim.scheduler, DDIMScheduler) and isinstance(pipe.scheduler, DDPMScheduler)
    assert ddim.unet is pipe.unet
    # The model's other defaults and its origin stay with it.
    pipe.register_to_config(default_adapt_steps=7)
    kept = with_scheduler(pipe, "ddim")
    assert kept.config.default_adapt_steps == 7 and kept.name_or_path == pipe.name_or_path == str(tiny_model_dir)
    # The sampler inherits the training schedule (prediction type, betas).
    assert ddim.scheduler.config.prediction_type == pipe.scheduler.config.prediction_type
    dpm = load_pipeline(tiny_model_dir, scheduler="dpm++", device="cpu")
    assert isinstance(dpm.scheduler, DPMSolverMultistepScheduler)
    with pytest.raises(QID2InputError, match="unknown scheduler 'plms'"):
        load_pipeline(tiny_model_dir, scheduler="plms", device="cpu")


def test_device_and_dtype_choice(tiny_model_dir):
    assert select_device("cpu") == torch.device("cpu")
    expected = "cuda" if torch.cuda.is_available() else None
    if expected is None and not torch.backends.mps.is_available():
        assert select_device("auto").type == "cpu"
        with pytest.raises(QID2InputError, match="device cuda requested but not available"):
            select_device("cuda")
    with pytest.raises(QID2InputError, match="unknown device 'tpu'"):
        select_device("tpu")
    assert select_dtype("bf16") is torch.bfloat16
    with pytest.raises(QID2InputError, match="unknown dtype 'fp8'"):
        select_dtype("fp8")
    pipe = load_pipeline(tiny_model_dir, device="cpu", dtype="bf16")
    assert pipe.unet.dtype == torch.bfloat16
    out = pipe(np.ones((3, 12, 10), np.float32) * 100, np.eye(3), np.array([1.0, 1.0, 0.0]),
               num_inference_steps=2, generator=torch.manual_seed(0))
    assert out.images.dtype == np.float32 and np.isfinite(out.images).all()


def test_auto_dtype_is_bf16_only_on_a_cpu_with_native_bf16(tiny_model_dir, monkeypatch):
    import qid2_diffusers.hub as hub

    for native, expected in ((True, torch.bfloat16), (False, torch.float32)):
        monkeypatch.setattr(hub, "native_bf16_cpu", lambda native=native: native)
        assert select_dtype("auto", "cpu") is expected
        assert load_pipeline(tiny_model_dir, device="cpu").unet.dtype == expected  # auto is load_pipeline's default
        assert select_dtype("fp32", "cpu") is torch.float32  # a named dtype is kept
    with pytest.raises(QID2InputError, match="unknown dtype 'fp8'; choose from auto, fp32, fp16, bf16"):
        load_pipeline(tiny_model_dir, device="cpu", dtype="fp8")


def test_from_pretrained_hub_id_from_offline_cache(tmp_path, tiny_model_dir):
    """A pipeline in the Hugging Face cache layout loads by Hub id with HF_HUB_OFFLINE=1, identical to the folder."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / "models--qid2-org--qid2-tiny"
    shutil.copytree(tiny_model_dir, repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    script = textwrap.dedent(
        f"""
        import numpy as np, torch
        from qid2_diffusers import QID2Pipeline
        from qid2_diffusers.hub import load_pipeline
        refs = np.random.default_rng(0).uniform(50, 150, (2, 3, 14, 11)).astype(np.float32)
        rb = np.random.default_rng(1).normal(size=(2, 3, 3)); tb = np.random.default_rng(2).normal(size=(2, 3))
        def sample(pipe):
            return pipe(refs, rb, tb, num_inference_steps=3, generator=torch.manual_seed(0)).images
        by_id = QID2Pipeline.from_pretrained("qid2-org/qid2-tiny")
        by_folder = QID2Pipeline.from_pretrained({str(tiny_model_dir)!r})
        ours = load_pipeline("qid2-org/qid2-tiny", device="cpu", dtype="fp32")  # from_pretrained loads fp32
        a, b, c = sample(by_id), sample(by_folder), sample(ours)
        assert np.array_equal(a, b) and np.array_equal(a, c), "outputs differ"
        assert str(ours.name_or_path).startswith({str(repo)!r}), ours.name_or_path
        print("OK", a.shape, float(a.std()))
        """
    )
    env = dict(os.environ, HF_HUB_CACHE=str(tmp_path / "hub"), HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "home"))
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.startswith("OK (2, 14, 11)")


def test_push_dry_run_lists_model_files(model_copy, capsys):
    (model_copy / ".model_index.json.tmp").write_text("{}")  # a leftover temporary write
    (model_copy / "README.md").write_text("---\nlibrary_name: diffusers\n---\n")
    assert main(["push", "--model", str(model_copy), "--repo-id", "qid2-org/qid2-tiny", "--dry-run"]) == 0
    out = capsys.readouterr().out
    listed = [line.split()[0] for line in out.splitlines()[1:]]
    assert listed == [f.as_posix() for f in files_to_upload(model_copy)]
    assert set(listed) == {
        "README.md", "model_index.json", "scheduler/scheduler_config.json", "unet/config.json",
        "unet/diffusion_pytorch_model.safetensors", "direction_encoder/config.json",
        "direction_encoder/diffusion_pytorch_model.safetensors",
    }
    assert "would upload 7 files" in out and "public model repo qid2-org/qid2-tiny" in out


@pytest.mark.parametrize(
    "args, message",
    [
        (["--repo-id", "no slash allowed here"], "not a Hub repository id"),
        (["--repo-id", "justaname"], "give the repository as ORG/NAME"),
        (["--repo-id", "org/name", "--model", "/nonexistent/qid2"], "no such model folder"),
    ],
)
def test_push_rejects_bad_arguments(tiny_model_dir, capsys, args, message):
    argv = ["push", "--model", str(tiny_model_dir), *args, "--dry-run"]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1


@pytest.mark.slow  # ~6 s: torch.compile
def test_compiled_unet_samples_as_the_eager_one(tiny_model_dir, tmp_path):
    # backend="eager" traces with dynamo without generating code: it checks that the
    # pipeline works through torch.compile's wrapper (config, dtype, device lookups)
    # in seconds; inductor's kernels are the GPU benchmark's business.
    eager = load_pipeline(tiny_model_dir, device="cpu")
    compiled = compile_unet(load_pipeline(tiny_model_dir, device="cpu"), backend="eager")
    assert compiled.unet is not eager.unet and hasattr(compiled.unet, "_orig_mod")
    refs = np.random.default_rng(0).random((2, 3, 14, 11)).astype(np.float32) * 500
    bvecs = np.stack([np.eye(3), np.eye(3)[::-1]])
    targets = np.array([[1.0, 1.0, 0.0], [0.0, 1.0, 1.0]])
    kwargs = dict(num_inference_steps=3, output_type="np")
    a = eager(refs, bvecs, targets, generator=[torch.Generator().manual_seed(k) for k in (1, 2)], **kwargs).images
    b = compiled(refs, bvecs, targets, generator=[torch.Generator().manual_seed(k) for k in (1, 2)], **kwargs).images
    np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-4)
    assert np.abs(a).max() > 0
    # Saving a compiled pipeline writes the plain network, which loads back.
    compiled.save_pretrained(tmp_path / "saved")
    again = load_pipeline(tmp_path / "saved", device="cpu")
    assert type(again.unet).__name__ == "UNet2DConditionModel"
    c = again(refs, bvecs, targets, generator=[torch.Generator().manual_seed(k) for k in (1, 2)], **kwargs).images
    np.testing.assert_array_equal(c, a)
    # Up-sampling a volume: the eager network sees each slice's own brain box, the compiled one the volume's
    # box on every slice (one input shape, one graph: a graph per slice shape cost 4.6x the eager sampling).
    from qid2_diffusers.pipelines import QID2Upsampler

    assert QID2Upsampler(eager).slice_boxes and not QID2Upsampler(compiled).slice_boxes
    mask = np.zeros((40, 40, 3), bool)  # three slices whose boxes pad to three shapes
    mask[2:34, 2:34, 0], mask[4:12, 3:11, 1], mask[3:20, 1:39, 2] = True, True, True
    shapes = {}
    for name, pipe in (("eager", eager), ("compiled", compiled)):
        seen = shapes[name] = set()
        hook = getattr(pipe.unet, "_orig_mod", pipe.unet).register_forward_pre_hook(
            lambda module, args, seen=seen: seen.add(tuple(args[0].shape[-2:])))
        data = np.random.default_rng(1).uniform(100, 200, (40, 40, 3, 8)).astype(np.float32)
        QID2Upsampler(pipe, num_inference_steps=1, progress=False).predict(
            data, np.r_[0.0, np.full(7, 1000.0)], np.vstack([np.zeros(3), np.eye(3), -np.eye(3), [[0.6, 0.8, 0.0]]]),
            np.array([[0.0, 0.6, 0.8]]), mask)
        hook.remove()
    assert len(shapes["eager"]) == 3 and len(shapes["compiled"]) == 1
