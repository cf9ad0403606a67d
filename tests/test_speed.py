"""Speed changes that must not change results: the parallel gzip writer, the threaded tensor fit, thread counts."""

import gzip
import zlib

import nibabel as nib
import numpy as np
import pytest

from qid2_diffusers.data.io import load_dwi, save_dwi, save_nifti
from qid2_diffusers.data.pgzip import ParallelGzipWriter
from qid2_diffusers.tensor import TensorPrior, fit_tensor
from qid2_diffusers.threads import cpu_workers


@pytest.fixture(scope="module")
def series():
    rng = np.random.default_rng(0)
    # Values that compress a little, like a DWI series: noise on a smooth signal.
    smooth = np.linspace(0, 1000, 20 * 21 * 22, dtype=np.float32).reshape(20, 21, 22, 1)
    return np.asfortranarray(smooth + rng.normal(0, 10, size=(20, 21, 22, 30)).astype(np.float32))


@pytest.mark.parametrize("workers", [1, 3])
def test_parallel_gzip_is_one_standard_member_holding_the_bytes_written(tmp_path, workers):
    rng = np.random.default_rng(1)
    payload = [rng.integers(0, 40, size=n, dtype=np.uint8).tobytes() for n in (5, 70_000, 1, 130_000, 0, 9_000)]
    with open(tmp_path / "x.gz", "wb") as raw, ParallelGzipWriter(raw, workers=workers, chunk_bytes=16_384) as gz:
        for part in payload:
            assert gz.write(part) == len(part)
        assert gz.tell() == sum(map(len, payload))
        gz.seek(gz.tell())  # nibabel's check before the image data
        with pytest.raises(OSError):
            gz.seek(0)
    stream = (tmp_path / "x.gz").read_bytes()
    reader = zlib.decompressobj(31)
    assert reader.decompress(stream) == b"".join(payload)  # gzip checks the CRC and size in the trailer
    assert reader.eof and reader.unused_data == b""  # one member, nothing after it
    assert gzip.decompress(stream) == b"".join(payload)
    assert int.from_bytes(stream[-4:], "little") == sum(map(len, payload))


def test_chunks_and_threads_do_not_change_the_compressed_file(tmp_path):
    data = np.random.default_rng(2).integers(0, 9, size=300_000, dtype=np.uint8).tobytes()
    files = []
    for i, workers in enumerate((1, 2, 4)):
        with open(tmp_path / f"{i}.gz", "wb") as raw, ParallelGzipWriter(raw, workers=workers, chunk_bytes=50_000) as gz:
            gz.write(data)
        files.append((tmp_path / f"{i}.gz").read_bytes())
    assert files[0] == files[1] == files[2]


def test_nifti_written_in_parallel_equals_nibabels_byte_for_byte(series, tmp_path, monkeypatch):
    from qid2_diffusers.data import pgzip

    monkeypatch.setattr(pgzip, "CHUNK_BYTES", 100_000)  # several chunks even for a small image
    affine = np.diag([2.0, 2.0, 2.0, 1.0])
    save_nifti(tmp_path / "ours.nii.gz", series, affine)
    reference = nib.load(tmp_path / "ours.nii.gz")
    nib.save(nib.Nifti1Image(series, affine, reference.header), tmp_path / "nibabel.nii.gz")
    ours = gzip.decompress((tmp_path / "ours.nii.gz").read_bytes())
    assert len(ours) > 3 * 100_000
    assert ours == gzip.decompress((tmp_path / "nibabel.nii.gz").read_bytes())
    np.testing.assert_array_equal(np.asarray(reference.dataobj), series)

    bvals = np.r_[0.0, np.full(29, 1000.0)]
    bvecs = np.r_[np.zeros((1, 3)), np.tile(np.eye(3), (10, 1))[:29]]
    paths = save_dwi(tmp_path / "dwi", series, bvals, bvecs, affine)
    dwi = load_dwi(*paths)  # load_dwi checks the gzip trailer's size against the header's
    np.testing.assert_array_equal(np.asarray(dwi.data[..., 7]), series[..., 7])


@pytest.fixture(scope="module")
def phantom():
    from qid2_diffusers.data.phantom import make_subject

    return make_subject(0, slab=5)


# WLS: ~9 s on 2 cores (its iterations); OLS checks the same threading quickly.
@pytest.mark.parametrize("method", [pytest.param("WLS", marks=pytest.mark.slow), "OLS"])
def test_threaded_tensor_fit_is_bit_identical(phantom, method, monkeypatch):
    s = phantom
    one = fit_tensor(s.dwi, s.bvals, s.bvecs, s.mask, fit_method=method, workers=1)
    for workers in (2, 3, 8):  # 8 threads for 5 slices: some get none
        many = fit_tensor(s.dwi, s.bvals, s.bvecs, s.mask, fit_method=method, workers=workers)
        np.testing.assert_array_equal(many.fit.model_params, one.fit.model_params)
        np.testing.assert_array_equal(many.fa, one.fa)
        np.testing.assert_array_equal(many.evecs, one.evecs)
    assert one.fa[s.mask].mean() > 0.1 and np.all(one.fa[~s.mask] == 0)
    priors = []
    for threads in ("1", "3"):  # the prior's fit takes its threads from OMP_NUM_THREADS
        monkeypatch.setenv("OMP_NUM_THREADS", threads)
        priors.append(TensorPrior(s.dwi, s.bvals, s.bvecs, s.mask, fit_method=method))
    serial, threaded = priors
    targets, z = s.bvecs[s.bvals > 50][:5], (slice(None), slice(None), 2)
    np.testing.assert_array_equal(serial.predict(targets, z), threaded.predict(targets, z))


def test_cpu_workers_obeys_omp_num_threads(monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert cpu_workers() == 3
    for unset in ("", "0", "many"):
        monkeypatch.setenv("OMP_NUM_THREADS", unset)
        assert cpu_workers() >= 1
    monkeypatch.delenv("OMP_NUM_THREADS")
    assert cpu_workers() >= 1


def test_cpu_name_names_the_model_its_generation_and_the_cpus(monkeypatch, tmp_path):
    """Benchmark figures name the CPU: 'AMD EPYC' alone covers generations 2x apart in speed, so the family
    and model numbers from /proc/cpuinfo's first block follow the name."""
    import builtins
    import platform

    from qid2_diffusers import threads

    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nvendor_id\t: AuthenticAMD\ncpu family\t: 26\nmodel\t\t: 2\n"
                       "model name\t: AMD EPYC\n\nprocessor\t: 1\nmodel name\t: something else\n")
    real_open = builtins.open
    monkeypatch.setattr(builtins, "open", lambda f, *a, **k: real_open(cpuinfo if f == "/proc/cpuinfo" else f, *a, **k))
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert threads.cpu_name() == f"AMD EPYC (family 26, model 2), {platform.machine()}, 3 CPUs"
    cpuinfo.write_text("")  # no cpuinfo fields (not Linux, or an unusual kernel): the platform's word for it
    assert threads.cpu_name().endswith(f"{platform.machine()}, 3 CPUs")
