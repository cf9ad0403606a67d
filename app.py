"""QID² demo: up-sample diffusion MRI in the browser (Gradio Blocks).

Run ``python app.py`` (or ``gradio app.py``) and open the printed address.
Load a DWI series (NIfTI + FSL bval/bvec) or the seeded phantom example, pick
a shell, an axial slice and a target direction, and generate: the demo shows the
R reference slices the model sees, the synthesised slice, the truth when it is
known (the phantom), an uncertainty map when several samples are drawn, FA
before and after up-sampling on that slice, and offers the up-sampled series
(every shell, or one) for download. Slices are shown in the orientation the
model works in, whatever the file's. Every number comes from the package's own
functions, the same ones ``qid2 upsample`` runs.

The model is the shipped one unless ``QID2_DEMO_MODEL`` names a folder or a
Hugging Face Hub id (or ``build_demo(model=...)`` is called).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, replace
from functools import lru_cache
from pathlib import Path

import gradio as gr
import numpy as np

from qid2_diffusers import QID2Upsampler
from qid2_diffusers.data.io import DWI, load_dwi
from qid2_diffusers.data.series import WorkingSeries, read_series
from qid2_diffusers.denoise import DEFAULT_DENOISE, available_denoisers
from qid2_diffusers.directions import angular_distance, nearest_references, normalize_bvecs
from qid2_diffusers.errors import QID2InputError, QID2InputWarning
from qid2_diffusers.evaluation import tensor_metrics
from qid2_diffusers.example import make_example
from qid2_diffusers.gradients import split_scheme
from qid2_diffusers.hub import load_pipeline, model_num_references, resolve_model, with_scheduler
from qid2_diffusers.inference import (
    TRAINED_SHELL,
    ShellPlan,
    plan_shells,
    shell_seed,
    training_shell_warning,
    upsample_dwi,
)
from qid2_diffusers.schedulers import SCHEDULERS
from qid2_diffusers.tensor import TensorMaps, fit_tensor

__all__ = ["Session", "build_demo", "demo", "LAUNCH_KWARGS", "to_image"]

#: Largest upload accepted; a series this size already takes long on a CPU.
MAX_FILE_SIZE = "512mb"
#: Keyword arguments of every launch: the upload limit. No ``allowed_paths``:
#: the app serves only its uploads and the files it writes in its temp folder.
LAUNCH_KWARGS = {"max_file_size": MAX_FILE_SIZE}
#: Displayed slices are enlarged (nearest neighbour, whole pixels) to at least this many pixels.
DISPLAY_PIXELS = 288
SAVED_SCHEDULER = "saved with the model"
ALL_SHELLS = "all shells"


@dataclass
class Session:
    """One user's loaded series, read into memory in the working orientation.

    Args:
        dwi_path, bvals_path, bvecs_path (`str`): the series.
        series ([`~qid2_diffusers.data.series.WorkingSeries`]): the series read and checked.
        plan ([`~qid2_diffusers.inference.ShellPlan`]): the shell previewed and its targets.
        workdir (`str`): this session's folder for outputs.
        target_bvecs (`np.ndarray` of shape `(T, 3)`, *optional*): fixed targets in the
            file's FSL convention (the phantom's held-out directions); `None`
            completes each shell to 90 directions, as ``qid2 upsample`` does.
        truth (`np.ndarray` of shape `(X, Y, Z, T)`, *optional*): noise-free
            target volumes (phantom only).
        truth_tensor ([`~qid2_diffusers.tensor.TensorMaps`], *optional*): tensor
            maps of the noise-free series, the FA truth (phantom only).
        label (`str`): what was loaded, for messages.
    """

    dwi_path: str
    bvals_path: str
    bvecs_path: str
    series: WorkingSeries
    plan: ShellPlan
    workdir: str
    target_bvecs: np.ndarray | None = None
    truth: np.ndarray | None = None
    truth_tensor: TensorMaps | None = None
    label: str = ""

    @property
    def mask(self) -> np.ndarray:
        return self.series.mask

    @property
    def targets(self) -> np.ndarray:
        """The previewed shell's targets, working voxel frame."""
        return self.plan.targets

    @property
    def shell(self) -> float:
        return self.plan.bval

    @property
    def seed_shells(self) -> int:
        return len(self.series.shells)

    def dwi(self):
        return load_dwi(self.dwi_path, self.bvals_path, self.bvecs_path)

    def shell_dwi(self) -> DWI:
        """The previewed shell (usable b0s and directions) in the working orientation."""
        v = self.plan.volumes
        return DWI(data=self.series.volumes(v), bvals=self.series.bvals[v], bvecs=self.series.bvecs[v],
                   affine=self.series.orientation.working_affine, mask=self.mask, path=self.dwi_path,
                   b0_threshold=self.series.b0_threshold)

    def with_shell(self, b: float) -> "Session":
        """This session previewing the shell at ``b``."""
        return replace(self, plan=preview_plan(self.series, b, self.target_bvecs))


# ---------------------------------------------------------------------------
# Loading


@lru_cache(maxsize=1)
def _root() -> Path:
    return Path(tempfile.mkdtemp(prefix="qid2-demo-"))


def _workdir(request: gr.Request | None) -> str:
    name = getattr(request, "session_hash", None) or "local"
    path = _root() / name
    path.mkdir(parents=True, exist_ok=True)
    return str(path)


def _remove_workdir(session: Session | None) -> None:
    if session is not None:
        shutil.rmtree(session.workdir, ignore_errors=True)


def _file_path(upload) -> str | None:
    if upload is None:
        return None
    return str(getattr(upload, "name", upload))


@contextmanager
def notices():
    """Show the package's input warnings (dropped volumes, NaN voxels, ...) as Gradio notices."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", QID2InputWarning)
        yield
    for w in caught:
        if issubclass(w.category, QID2InputWarning):
            path = w.message.path
            gr.Warning(f"{Path(path).name}: {w.message.problem}" if path else w.message.problem)
        else:
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)


def preview_plan(series: WorkingSeries, b: float | None, target_bvecs=None) -> ShellPlan:
    """The plan of the shell at ``b`` (default: the one nearest the trained b-value) for the preview."""
    if b is None:
        b = min(series.shells, key=lambda label: abs(label - TRAINED_SHELL))
    targets = None if target_bvecs is None else series.orientation.bvecs_to_working(target_bvecs)
    return plan_shells(series, targets, shells=[b], num_references=1)[0]


def open_upload(dwi_file, bvals_file, bvecs_file, workdir: str, shell: float | None = None) -> Session:
    """A session for an uploaded series (validated by ``load_dwi``, read by ``read_series``)."""
    paths = [_file_path(f) for f in (dwi_file, bvals_file, bvecs_file)]
    missing = [name for name, p in zip(("NIfTI series", "bval file", "bvec file"), paths) if p is None]
    if missing:
        raise QID2InputError(None, f"upload the {', '.join(missing)} too")
    dwi = load_dwi(*paths)
    series = read_series(dwi)
    plan = preview_plan(series, shell)
    shells = ", ".join(f"b={label}" for label in series.shells)
    return Session(*paths, series=series, plan=plan, workdir=workdir,
                   label=f"{Path(paths[0]).name}: {series.orientation.working_shape} voxels, shells {shells}")


def open_example(workdir: str) -> Session:
    """A session for the seeded phantom example (truth known)."""
    return example_session(make_example(workdir), workdir)


def example_session(ex, workdir: str) -> Session:
    """The session of a made [`~qid2_diffusers.example.Example`]."""
    subject = ex.subject
    series = read_series(load_dwi(*ex.paths))
    return Session(
        str(ex.paths[0]), str(ex.paths[1]), str(ex.paths[2]), series=series,
        plan=preview_plan(series, 1000.0, ex.target_bvecs), workdir=workdir, target_bvecs=ex.target_bvecs,
        truth=subject.signal[..., ex.target_volumes], truth_tensor=ex.truth_tensor(),
        label=f"phantom example: {subject.dwi.shape[:3]} voxels, 30 of 90 directions acquired",
    )


# ---------------------------------------------------------------------------
# Model


@lru_cache(maxsize=4)
def _base_pipeline(model: str | None, num_references: int):
    return load_pipeline(model, num_references=num_references, device="auto")


def get_pipeline(model: str | None, num_references: int, scheduler: str):
    """The (cached) model with the chosen sampler; weights are loaded once."""
    pipe = _base_pipeline(model, int(num_references))
    return with_scheduler(pipe, None if scheduler == SAVED_SCHEDULER else scheduler)


# ---------------------------------------------------------------------------
# Computation: the package's functions, slice by slice


def direction_from_angles(azimuth_deg: float, elevation_deg: float) -> np.ndarray:
    """Unit vector from azimuth (in the x-y plane, from x) and elevation (towards z), in degrees.

    In the working voxel frame (x towards the left, y anterior, z superior), whatever the file's orientation.
    """
    az, el = np.radians(azimuth_deg), np.radians(elevation_deg)
    return np.array([np.cos(el) * np.cos(az), np.cos(el) * np.sin(az), np.sin(el)])


def _slice_mask(mask: np.ndarray, z: int) -> np.ndarray:
    only = np.zeros_like(mask, dtype=bool)
    only[:, :, z] = mask[:, :, z]
    return only


def generate_slice(session: Session, z: int, target: np.ndarray, target_index: int, pipe, *,
                   steps: int | None, seed: int, samples: int) -> dict:
    """Synthesise one target direction on slice ``z``.

    Noise is seeded by (seed, shell, target index, slice), as ``qid2 upsample`` seeds it.

    Returns:
        `dict` with ``references`` (R, X, Y), ``reference_bvecs`` (R, 3),
        ``angles`` (R,) degrees, ``generated`` (X, Y), ``std`` (X, Y) or `None`.
    """
    sub = session.shell_dwi()
    _, dw = split_scheme(sub.bvals, sub.bvecs)
    acquired = sub.bvecs[dw]
    refs = nearest_references(target, acquired, pipe.num_references)
    slab = np.asarray(sub.data[:, :, z, :], dtype=np.float32)[..., dw]
    upsampler = QID2Upsampler(pipe, num_inference_steps=steps, num_samples=samples,
                              seed=shell_seed(seed, session.plan.label, session.seed_shells))
    out = upsampler.predict(sub.data, sub.bvals, sub.bvecs, target[None], _slice_mask(session.mask, z),
                            target_indices=[target_index], return_std=samples > 1)
    pred, std = out if samples > 1 else (out, None)
    return {
        "references": np.moveaxis(slab[..., refs], -1, 0),
        "reference_bvecs": acquired[refs],
        "angles": np.degrees(angular_distance(acquired[refs], target)),
        "generated": pred[:, :, z, 0],
        "std": None if std is None else std[:, :, z, 0],
    }


def _one_slice(maps: TensorMaps, z: int) -> TensorMaps:
    return TensorMaps(fa=maps.fa[:, :, z : z + 1], md=maps.md[:, :, z : z + 1], evecs=maps.evecs[:, :, z : z + 1], fit=None)


def slice_fa(session: Session, z: int, pipe, *, steps: int | None, seed: int) -> dict:
    """Tensor fits of slice ``z``: acquired shell only, and after synthesising every target there.

    Returns:
        `dict` of [`TensorMaps`] of shape `(X, Y, 1)`: ``before``, ``after``
        and, for the phantom, ``truth``; plus ``metrics`` (label ->
        :func:`~qid2_diffusers.evaluation.tensor_metrics`) against the truth.
    """
    sub = session.shell_dwi()
    mask = _slice_mask(session.mask, z)
    upsampler = QID2Upsampler(pipe, num_inference_steps=steps,
                              seed=shell_seed(seed, session.plan.label, session.seed_shells))
    pred = upsampler.predict(sub.data, sub.bvals, sub.bvecs, session.targets, mask)[:, :, z : z + 1]
    acquired = np.asarray(sub.data[:, :, z : z + 1, :], dtype=np.float32)
    m = mask[:, :, z : z + 1]
    _, dw = split_scheme(sub.bvals, sub.bvecs)
    bvals = np.concatenate([sub.bvals, np.full(len(session.targets), np.median(sub.bvals[dw]))])
    out = {
        "before": fit_tensor(acquired, sub.bvals, sub.bvecs, m),
        "after": fit_tensor(np.concatenate([acquired, pred], axis=3), bvals, np.concatenate([sub.bvecs, session.targets]), m),
        "truth": None if session.truth_tensor is None else _one_slice(session.truth_tensor, z),
        "metrics": {},
    }
    if out["truth"] is not None and m.any():
        out["metrics"] = {k: tensor_metrics(out[k], out["truth"], m) for k in ("before", "after")}
    return out


# ---------------------------------------------------------------------------
# Display


def to_image(slice2d, vmax: float | None = None) -> np.ndarray:
    """An axial slice as an 8-bit grey image, anterior up, enlarged by whole pixels.

    Args:
        slice2d (`np.ndarray` of shape `(X, Y)`): the slice.
        vmax (`float`, *optional*): white level; defaults to the slice's 99.5th percentile.
    """
    a = np.nan_to_num(np.asarray(slice2d, dtype=np.float32))
    if vmax is None:
        vmax = float(np.percentile(a, 99.5)) if a.size else 1.0
    img = np.clip(a / max(vmax, 1e-12), 0.0, 1.0)
    img = np.rot90(img)
    k = max(1, -(-DISPLAY_PIXELS // max(img.shape)))
    return np.round(np.kron(img, np.ones((k, k))) * 255).astype(np.uint8)


def _error(exc: Exception) -> gr.Error:
    # QID2InputError already reads "file: problem"; uploads live under random
    # names, so show the base name only.
    text = str(exc)
    if isinstance(exc, QID2InputError) and exc.path:
        text = f"{Path(exc.path).name}: {exc.problem}"
    return gr.Error(text)


def _status(session: Session) -> str:
    plan = session.plan
    n_dirs = len(plan.volumes) - len(session.series.b0_indices)
    return (f"**Loaded** {session.label}. Previewing the b={plan.label} shell: {n_dirs} directions at "
            f"b={plan.label}; {len(plan.targets)} target directions.")


def _targets(session: Session):
    choices = [(f"#{k}: ({v[0]:+.2f}, {v[1]:+.2f}, {v[2]:+.2f})", k) for k, v in enumerate(session.targets)]
    return gr.Dropdown(choices=choices, value=0)


def _loaded(session: Session):
    n_slices = int(session.mask.shape[2])
    with_brain = np.flatnonzero(session.mask.any(axis=(0, 1)))
    z = int(with_brain[len(with_brain) // 2]) if len(with_brain) else n_slices // 2
    return session, _status(session), gr.Slider(minimum=0, maximum=n_slices - 1, value=z, step=1), _targets(session)


def _shell_choices(session: Session | None):
    """The shell dropdowns of a loaded session: the previewed shell, and the shells of the download."""
    if session is None:
        return gr.Dropdown(), gr.Dropdown()
    shells = list(session.series.shells)
    preview = gr.Dropdown(choices=[(f"b={label}", label) for label in shells], value=session.plan.label)
    download = [(ALL_SHELLS, ALL_SHELLS), *[(f"b={label} only", str(label)) for label in shells]]
    return preview, gr.Dropdown(choices=download, value=ALL_SHELLS)


def _bvalue(text) -> float:
    try:
        return float(text)
    except (TypeError, ValueError):
        raise gr.Error(f"{text!r} is not a b-value (s/mm²).") from None


def _warn_training_shell(session: Session, pipe) -> None:
    message = training_shell_warning(session.shell, pipe.bval_conditioning)
    if message:
        gr.Warning(message[0].upper() + message[1:] + ".")


def _model_defaults(folder) -> tuple[int, int]:
    """The sampling steps and test-time adaptation steps a saved model asks for."""
    index = json.loads((Path(folder) / "model_index.json").read_text())
    return int(index.get("default_num_inference_steps", 10)), int(index.get("default_adapt_steps", 0))


def build_demo(model: str | None = None) -> gr.Blocks:
    """The demo's Blocks, not launched.

    Args:
        model (`str`, *optional*): model folder or Hub id; defaults to
            ``$QID2_DEMO_MODEL``, else the shipped models.
    """
    from qid2_diffusers.pretrained import shipped_models

    model = model or os.environ.get("QID2_DEMO_MODEL") or None
    folders = [resolve_model(model)] if model is not None else shipped_models()
    r_choices = sorted(model_num_references(p) for p in folders) or [3]
    # The sliders start at the model's own few-step and adaptation defaults.
    default_steps, default_adapt = _model_defaults(folders[0]) if folders else (10, 0)

    def pipeline_for(r, scheduler):
        try:
            return get_pipeline(model, int(r), scheduler)
        except QID2InputError as exc:
            raise _error(exc) from None

    def on_example(request: gr.Request, progress=gr.Progress()):
        progress(0.1, desc="simulating the phantom")
        return _loaded(open_example(_workdir(request)))

    def on_upload(dwi_file, bvals_file, bvecs_file, request: gr.Request):
        try:
            with notices():
                return _loaded(open_upload(dwi_file, bvals_file, bvecs_file, _workdir(request)))
        except QID2InputError as exc:
            raise _error(exc) from None

    def on_shell(session, shell):
        if session is None:
            raise gr.Error("Load a series or the phantom example first.")
        try:
            with notices():
                return _loaded(session.with_shell(_bvalue(shell)))
        except QID2InputError as exc:
            raise _error(exc) from None

    def target_of(session, choice, use_angles, azimuth, elevation):
        if use_angles:
            return normalize_bvecs(direction_from_angles(azimuth, elevation))[0], len(session.targets), None
        if choice is None:
            raise gr.Error("Choose a target direction.")
        k = int(choice)
        return session.targets[k], k, k

    def on_generate(session, z, choice, use_angles, azimuth, elevation, r, scheduler, steps, seed, samples,
                    progress=gr.Progress(track_tqdm=True)):
        if session is None:
            raise gr.Error("Load a series or the phantom example first.")
        z, samples = int(z), int(samples)
        target, index, listed = target_of(session, choice, use_angles, azimuth, elevation)
        pipe = pipeline_for(r, scheduler)
        _warn_training_shell(session, pipe)
        try:
            out = generate_slice(session, z, target, index, pipe, steps=int(steps), seed=int(seed), samples=samples)
        except (QID2InputError, ValueError) as exc:
            raise _error(exc) from None
        vmax = float(np.percentile(out["references"], 99.5)) or 1.0
        gallery = [
            (to_image(img, vmax), f"reference {i + 1}: {angle:.1f}° from target")
            for i, (img, angle) in enumerate(zip(out["references"], out["angles"]))
        ]
        truth = None
        if session.truth is not None and listed is not None:
            truth = to_image(session.truth[:, :, z, listed], vmax)
        std = None if out["std"] is None else to_image(out["std"])
        if not session.mask[:, :, z].any():
            gr.Warning(f"Slice {z} has no brain in the mask: nothing was synthesised.")
        info = (f"Target ({target[0]:+.3f}, {target[1]:+.3f}, {target[2]:+.3f}) on slice {z}; "
                f"R = {pipe.num_references}, {type(pipe.scheduler).__name__}, "
                f"{int(steps)} steps, seed {int(seed)}, {samples} sample(s).")
        return gallery, to_image(out["generated"], vmax), truth, std, info

    def on_fa(session, z, r, scheduler, steps, seed, progress=gr.Progress(track_tqdm=True)):
        if session is None:
            raise gr.Error("Load a series or the phantom example first.")
        pipe = pipeline_for(r, scheduler)
        _warn_training_shell(session, pipe)
        fa = slice_fa(session, int(z), pipe, steps=int(steps), seed=int(seed))
        text = f"FA on slice {int(z)}: acquired directions, then with the {len(session.targets)} synthesised ones added."
        if fa["metrics"]:
            before, after = fa["metrics"]["before"], fa["metrics"]["after"]
            text += (f" FA error against the truth (mean absolute): acquired only {before['fa_mae']:.3f}, "
                     f"up-sampled {after['fa_mae']:.3f}.")
        images = [None if fa[k] is None else to_image(fa[k].fa[:, :, 0], 1.0) for k in ("before", "after", "truth")]
        return (*images, text)

    def on_volume(session, r, scheduler, steps, seed, samples, shells=ALL_SHELLS, adapt_steps=None, denoise=None,
                  progress=gr.Progress(track_tqdm=True)):
        if session is None:
            raise gr.Error("Load a series or the phantom example first.")
        pipe = pipeline_for(r, scheduler)
        dwi = session.dwi()
        try:
            with notices():
                result = upsample_dwi(dwi, session.target_bvecs, pipe, mask=session.series.stored_mask,
                                      shells=None if shells in (None, ALL_SHELLS) else [_bvalue(shells)],
                                      num_inference_steps=int(steps), num_samples=int(samples), seed=int(seed),
                                      adapt_steps=None if adapt_steps is None else int(adapt_steps),
                                      denoise=denoise)
        except QID2InputError as exc:
            raise _error(exc) from None
        prefix = Path(session.workdir) / f"{Path(session.dwi_path).name.split('.')[0]}_upsampled"
        return [str(p) for p in result.save(prefix, dwi.affine, dwi.header)]

    model_label = model or "the shipped model"
    with gr.Blocks(title="QID² q-space up-sampling", delete_cache=(3600, 3600)) as blocks:
        session = gr.State(None, delete_callback=_remove_workdir)
        gr.Markdown(
            "# QID²: q-space up-sampling of diffusion MRI\n"
            "An image-conditioned diffusion model synthesises the diffusion-weighted slice of a gradient "
            "direction that was not acquired, from the R acquired slices nearest to it. "
            f"Model: `{model_label}`."
        )
        with gr.Row():
            with gr.Column(scale=1):
                example_btn = gr.Button("Phantom example", variant="primary", elem_id="example-button")
                with gr.Accordion("Upload a series (NIfTI + FSL bval + bvec)", open=False):
                    dwi_file = gr.File(label="DWI series (.nii or .nii.gz)", file_types=[".nii", ".gz"])
                    bvals_file = gr.File(label="bvals")
                    bvecs_file = gr.File(label="bvecs")
                    upload_btn = gr.Button("Load upload")
                status = gr.Markdown("Load the phantom example or upload a series.", elem_id="status")
                # Custom values: the choices arrive with the series, and the handlers check the value.
                shell = gr.Dropdown(choices=[], value=None, allow_custom_value=True,
                                    label="Shell (b-value, s/mm²) of the preview", elem_id="shell")
                z = gr.Slider(0, 1, value=0, step=1, label="Axial slice")
                target = gr.Dropdown(choices=[], value=None, label="Target direction (not acquired)")
                use_angles = gr.Checkbox(False, label="Use azimuth / elevation instead")
                with gr.Row():
                    azimuth = gr.Slider(-180, 180, value=45, step=1, label="Azimuth (°)")
                    elevation = gr.Slider(-90, 90, value=30, step=1, label="Elevation (°)")
                r = gr.Dropdown(choices=r_choices, value=r_choices[0], label="R (reference slices)")
                scheduler = gr.Dropdown(choices=[SAVED_SCHEDULER, *SCHEDULERS], value=SAVED_SCHEDULER, label="Sampler")
                steps = gr.Slider(1, 1000, value=default_steps, step=1, label="Denoising steps")
                seed = gr.Number(value=0, precision=0, label="Seed")
                samples = gr.Slider(1, 16, value=1, step=1, label="Samples (above 1: uncertainty map)", elem_id="samples")
                generate_btn = gr.Button("Generate slice", variant="primary", elem_id="generate-button")
                fa_btn = gr.Button("FA before / after on this slice", elem_id="fa-button")
                volume_shells = gr.Dropdown(choices=[ALL_SHELLS], value=ALL_SHELLS, allow_custom_value=True,
                                            label="Shells to up-sample (download)")
                adapt = gr.Slider(0, 500, value=default_adapt, step=10, elem_id="adapt-steps",
                                  label="Adaptation steps on this scan before up-sampling (download; 0: off)")
                denoise = gr.Dropdown(choices=list(available_denoisers()), value=DEFAULT_DENOISE, elem_id="denoise",
                                      label="Denoise the input first (download; none: it arrives denoised)")
                volume_btn = gr.Button("Up-sample the whole series (download)")
            with gr.Column(scale=2):
                references = gr.Gallery(label="Reference slices (acquired)", columns=3, rows=1, height=300,
                                        object_fit="contain", format="png", elem_id="references")
                with gr.Row():
                    generated = gr.Image(label="Generated", format="png", elem_id="generated", interactive=False)
                    truth = gr.Image(label="Truth (phantom, noise-free)", format="png", interactive=False)
                    std = gr.Image(label="Uncertainty (std over samples)", format="png", interactive=False, elem_id="std")
                info = gr.Markdown()
                with gr.Row():
                    fa_before = gr.Image(label="FA, acquired directions only", format="png", interactive=False)
                    fa_after = gr.Image(label="FA, after up-sampling", format="png", interactive=False, elem_id="fa-after")
                    fa_truth = gr.Image(label="FA, truth (phantom)", format="png", interactive=False)
                fa_info = gr.Markdown()
                download = gr.File(label="Up-sampled series", file_count="multiple", interactive=False)

        loaded = [session, status, z, target]
        example_btn.click(on_example, None, loaded, api_name="example").then(
            _shell_choices, session, [shell, volume_shells], api_name=False)
        upload_btn.click(on_upload, [dwi_file, bvals_file, bvecs_file], loaded, api_name="upload").then(
            _shell_choices, session, [shell, volume_shells], api_name=False)
        shell.input(on_shell, [session, shell], loaded, api_name="shell")
        generate_btn.click(
            on_generate,
            [session, z, target, use_angles, azimuth, elevation, r, scheduler, steps, seed, samples],
            [references, generated, truth, std, info],
            api_name="generate",
        )
        fa_btn.click(on_fa, [session, z, r, scheduler, steps, seed], [fa_before, fa_after, fa_truth, fa_info],
                     api_name="fa")
        volume_btn.click(on_volume, [session, r, scheduler, steps, seed, samples, volume_shells, adapt, denoise], download,
                         api_name="volume")
    return blocks


demo = build_demo()

if __name__ == "__main__":
    demo.queue().launch(**LAUNCH_KWARGS)
