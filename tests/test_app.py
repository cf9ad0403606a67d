"""The Gradio demo: its functions, its API through gradio_client, and a real headless Chromium."""

import importlib.util
import io
import os
import shutil
import socket
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from PIL import Image

from qid2_diffusers.example import EXAMPLE_SLAB

gr = pytest.importorskip("gradio")

from qid2_diffusers import build_pipeline  # noqa: E402
from qid2_diffusers.inference import choose_targets  # noqa: E402
from qid2_diffusers.directions import nearest_references  # noqa: E402
from qid2_diffusers.hub import load_pipeline  # noqa: E402
from qid2_diffusers.schedulers import make_scheduler  # noqa: E402


def _import_app():
    # app.py sits at the top of the repository (where Hugging Face Spaces looks), outside the package.
    spec = importlib.util.spec_from_file_location("app", Path(__file__).resolve().parents[1] / "app.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["app"] = module
    spec.loader.exec_module(module)
    return module


app = _import_app()

CHROMIUM = "/usr/bin/chromium"


def _image_shown(elem_id: str) -> str:
    """JavaScript that is true once the image inside ``#elem_id`` has been decoded."""
    return f"(() => {{ const img = document.querySelector('#{elem_id} img'); return !!img && img.complete && img.naturalWidth > 0; }})()"

CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]


@pytest.fixture(scope="module")
def demo_model(tmp_path_factory):
    """A tiny random model saved with a 2-step DDIM default, as a shipped model saves its few-step default.

    ``QID2_DEMO_MODEL`` overrides it (e.g. to take the README screenshot with the shipped model).
    """
    if os.environ.get("QID2_DEMO_MODEL"):
        return os.environ["QID2_DEMO_MODEL"]
    pipe = build_pipeline("tiny", 3, seed=0, default_num_inference_steps=2)
    pipe.scheduler = make_scheduler("ddim", pipe.scheduler.config)
    path = tmp_path_factory.mktemp("demo-model")
    pipe.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def example(tmp_path_factory):
    from qid2_diffusers.example import make_example

    workdir = tmp_path_factory.mktemp("example")
    ex = make_example(workdir)
    return ex, app.example_session(ex, str(workdir))


@pytest.fixture(scope="module")
def example_session(example):
    return example[1]


def test_slice_fa_against_the_phantom_truth(example, demo_model):
    ex, s = example
    m = ex.subject.mask
    # The truth tensor is the phantom's own definition of its FA.
    np.testing.assert_allclose(s.truth_tensor.fa[m], ex.subject.fa[m], atol=1e-6)
    fa = app.slice_fa(s, 3, load_pipeline(demo_model, device="cpu"), steps=1, seed=0)
    assert fa["before"].fa.shape == fa["after"].fa.shape == (72, 87, 1)
    np.testing.assert_array_equal(fa["truth"].fa[:, :, 0], s.truth_tensor.fa[:, :, 3])
    before = fa["metrics"]["before"]
    assert before["fa_mae"] < 0.1 and before["fa_ssim"] > 0.7  # a 30-direction fit is close to the truth
    assert np.all(fa["after"].fa[~m[:, :, 3:4]] == 0)


def test_generate_slice_uses_nearest_references_and_is_seeded(example_session, demo_model):
    s = example_session
    pipe = load_pipeline(demo_model, device="cpu")
    z, k = 3, 5
    out = app.generate_slice(s, z, s.targets[k], k, pipe, steps=2, seed=7, samples=2)
    again = app.generate_slice(s, z, s.targets[k], k, pipe, steps=2, seed=7, samples=2)
    other = app.generate_slice(s, z, s.targets[k], k, pipe, steps=2, seed=8, samples=2)
    np.testing.assert_array_equal(out["generated"], again["generated"])
    assert not np.array_equal(out["generated"], other["generated"])

    sub = s.shell_dwi()
    dw = np.flatnonzero(sub.bvals > 50)
    refs = nearest_references(s.targets[k], sub.bvecs[dw], 3)
    np.testing.assert_array_equal(out["references"], np.asarray(sub.data[:, :, z, :])[..., dw[refs]].transpose(2, 0, 1))
    assert np.all(np.diff(out["angles"]) >= 0) and out["angles"][0] < 30
    mask = s.mask[:, :, z]
    assert out["generated"].shape == mask.shape == out["std"].shape
    assert np.all(out["generated"][~mask] == 0) and out["generated"][mask].std() > 0
    assert np.all(out["std"][~mask] == 0) and out["std"][mask].max() > 0


def test_to_image_orients_and_enlarges():
    a = np.zeros((72, 87), np.float32)
    a[0, -1] = 10.0  # first x, last y (anterior): top-left after display
    img = app.to_image(a, vmax=10.0)
    k = -(-app.DISPLAY_PIXELS // 87)
    assert img.shape == (87 * k, 72 * k) and img.dtype == np.uint8
    assert img[0, 0] == 255 and img[-1, -1] == 0 and img.sum() == 255 * k * k


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def served(demo_model):
    blocks = app.build_demo(demo_model)
    port = _free_port()
    blocks.queue().launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True,
                          **app.LAUNCH_KWARGS)
    yield blocks, f"http://127.0.0.1:{port}/"
    blocks.close()


def _png(path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("L"))


def test_api_example_then_generate(served):
    from gradio_client import Client

    blocks, url = served
    assert blocks.max_file_size == 512 * 1024**2
    client = Client(url, verbose=False)
    status, z, target = client.predict(api_name="/example")
    assert "phantom example" in status and z["maximum"] == EXAMPLE_SLAB - 1 and len(target["choices"]) == 60
    gallery, generated, truth, std, info = client.predict(
        int(z["value"]), 4, False, 0, 0, 3, "ddim", 2, 1, 2, api_name="/generate"
    )
    k = -(-app.DISPLAY_PIXELS // 87)
    for path in [generated, truth, std, *(item["image"] for item in gallery)]:
        img = _png(path)
        assert img.shape == (87 * k, 72 * k) and img.std() > 0
    assert len(gallery) == 3 and "from target" in gallery[0]["caption"]
    assert "2 sample(s)" in info

    fa_before, fa_after, fa_truth, fa_info = client.predict(int(z["value"]), 3, "ddim", 1, 0, api_name="/fa")
    assert all(_png(p).std() > 0 for p in (fa_before, fa_after, fa_truth))
    assert "FA error against the truth" in fa_info


def test_api_upload_real_crop_and_bad_upload(served, real_data_dir, tmp_path):
    from gradio_client import Client, handle_file
    from gradio_client.exceptions import AppError

    _, url = served
    client = Client(url, verbose=False)
    files = [handle_file(str(real_data_dir / f"b3000.{ext}")) for ext in ("nii.gz", "bval", "bvec")]
    status, z, target = client.predict(*files, api_name="/upload")
    bvals, bvecs = np.loadtxt(real_data_dir / "b3000.bval"), np.loadtxt(real_data_dir / "b3000.bvec").T
    expected = choose_targets(bvecs[bvals > 50])  # the CLI's default targets
    assert "60 directions at b=3000" in status and z["maximum"] == 8
    assert [c[0].split(": ")[1] for c in target["choices"]] == [f"({v[0]:+.2f}, {v[1]:+.2f}, {v[2]:+.2f})" for v in expected]
    files = client.predict(3, "ddim", 1, 0, 1, api_name="/volume")
    assert sorted(Path(f).name for f in files) == ["b3000_upsampled.bval", "b3000_upsampled.bvec", "b3000_upsampled.nii.gz"]

    short = tmp_path / "short.bval"
    short.write_text("0 1000 1000\n")
    with pytest.raises(AppError, match="short.bval: has 3 b-values but b3000.nii.gz has 68 volumes"):
        client.predict(handle_file(str(real_data_dir / "b3000.nii.gz")), handle_file(str(short)),
                       handle_file(str(real_data_dir / "b3000.bvec")), api_name="/upload")


@pytest.mark.slow  # ~8 s: headless Chromium
@pytest.mark.browser
def test_browser_runs_the_example(served, tmp_path):
    if not Path(CHROMIUM).is_file():
        pytest.skip(f"{CHROMIUM} not installed (Debian package: chromium)")
    from playwright.sync_api import sync_playwright

    _, url = served
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1100})
            page.goto(url, wait_until="load", timeout=60_000)
            page.wait_for_selector("#example-button", timeout=60_000)
            page.click("#example-button")
            page.wait_for_function("document.querySelector('#status')?.innerText.includes('Loaded')", timeout=90_000)
            # The shell dropdown is filled from the loaded series.
            page.wait_for_function("document.querySelector('#shell input')?.value === 'b=1000'", timeout=30_000)
            samples = page.locator("#samples input[type=number]")
            samples.fill("2")
            samples.press("Enter")
            page.click("#generate-button")
            page.wait_for_function(_image_shown("generated"), timeout=120_000)
            page.wait_for_function(_image_shown("std"), timeout=30_000)
            image = page.locator("#generated img")
            assert image.evaluate("img => img.naturalWidth") > 0
            shown = np.asarray(Image.open(io.BytesIO(image.screenshot())).convert("L"))
            assert shown.std() > 0
            page.click("#fa-button")
            page.wait_for_function(_image_shown("fa-after"), timeout=180_000)
            shot = tmp_path / "demo.png"
            page.screenshot(path=str(shot), full_page=True)
        finally:
            browser.close()
    assert Image.open(shot).size[0] >= 1000
    if os.environ.get("QID2_SCREENSHOT"):
        shutil.copyfile(shot, os.environ["QID2_SCREENSHOT"])


@pytest.mark.slow  # ~35 s: three volume downloads of the 102-volume real series
def test_api_multishell_upload_previews_one_shell_and_downloads_every_shell(served, real_data_dir):
    from gradio_client import Client, handle_file

    blocks, url = served
    client = Client(url, verbose=False)
    files = [handle_file(str(real_data_dir / f"msmt.{ext}")) for ext in ("nii.gz", "bval", "bvec")]
    status, _, target = client.predict(*files, api_name="/upload")
    assert "shells b=700, b=1200, b=2800" in status and "30 directions at b=1200" in status  # nearest to b=1000
    status, _, target = client.predict(2800, api_name="/shell")
    bvals, bvecs = np.loadtxt(real_data_dir / "msmt.bval"), np.loadtxt(real_data_dir / "msmt.bvec").T
    expected = choose_targets(bvecs[np.abs(bvals - 2800) < 50])  # the CLI's default targets for that shell
    assert "50 directions at b=2800" in status and len(target["choices"]) == len(expected)
    gallery, generated, *_ = client.predict(5, 0, False, 0, 0, 3, "ddim", 1, 0, 1, api_name="/generate")
    assert len(gallery) == 3 and _png(generated).std() > 0
    files = client.predict(3, "ddim", 1, 0, 1, "700", api_name="/volume")
    out_bvals = np.loadtxt(next(f for f in files if f.endswith(".bval")))
    assert len(out_bvals) > 102 and set(out_bvals[102:]) == {700.0}
    # The download follows the engine: MP-PCA first by default, the series as uploaded with "none".
    source = np.asarray(nib.load(real_data_dir / "msmt.nii.gz").dataobj)
    denoised = np.asarray(nib.load(next(f for f in files if f.endswith(".nii.gz"))).dataobj)[..., :102]
    files = client.predict(3, "ddim", 1, 0, 1, "700", 0, "none", api_name="/volume")
    as_given = np.asarray(nib.load(next(f for f in files if f.endswith(".nii.gz"))).dataobj)[..., :102]
    np.testing.assert_array_equal(as_given, source)
    assert not np.array_equal(denoised, source)


def test_shell_choices_follow_the_loaded_series(real_data_dir, tmp_path):
    paths = [str(real_data_dir / f"msmt.{ext}") for ext in ("nii.gz", "bval", "bvec")]
    session = app.open_upload(*paths, str(tmp_path))
    preview, download = app._shell_choices(session)
    assert preview.choices == [("b=700", 700), ("b=1200", 1200), ("b=2800", 2800)] and preview.value == 1200
    assert download.value == app.ALL_SHELLS
    assert [c[1] for c in download.choices] == [app.ALL_SHELLS, "700", "1200", "2800"]
    other = session.with_shell(700)
    sub = other.shell_dwi()
    assert other.plan.label == 700 and np.all(np.isin(sub.bvals, [0.5, 700]))
    np.testing.assert_array_equal(other.mask, session.mask)
