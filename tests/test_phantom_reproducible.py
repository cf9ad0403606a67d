"""The default phantom is the shipped model's training data: it must not drift.

The expected values below were recorded from ``make_subject`` as it was before
the generator became a package (the single-module ``data/phantom.py``). Two
checks per case:

- **bit for bit** (SHA-256 of every array and of the parameters JSON) where the
  platform is the one they were recorded on: numpy's float32 ``sin``/``cos``/``exp``
  dispatch on the CPU's SIMD level and OpenBLAS picks its matrix kernels per CPU
  at run time, so the last bit of a float may differ on another machine;
- **summary statistics** everywhere: sums, sums of squares and a fixed
  pseudo-random weighting of each array (to catch a permutation), within a
  relative tolerance of 1e-6 — a last-bit difference moves them by ~1e-7.
"""

import hashlib
import json
import platform

import numpy as np
import pytest
import scipy

from qid2_diffusers.data.phantom import make_subject

ARRAYS = ("dwi", "signal", "mask", "fa", "peaks", "peak_fractions", "n_fibres", "tissue", "bvals", "bvecs", "affine")

CASES = {
    "2.5mm-b1000": dict(seed=0, slab=4),
    "1.25mm-b1000": dict(seed=11, resolution=1.25, slab=3),
    "2.5mm-3shells-snr40": dict(seed=7, slab=3, shells=(1000, 2000, 3000), snr=40.0),
}


def platform_fingerprint() -> str:
    """What decides the last bit of the simulator's floats: library versions, SIMD level, CPU."""
    import dipy

    simd = np.show_config(mode="dicts")["SIMD Extensions"]["found"]
    cpu = ""
    try:
        with open("/proc/cpuinfo") as f:
            cpu = "".join(sorted({line for line in f if line.startswith(("model name", "flags"))}))
    except OSError:
        pass
    text = "|".join([np.__version__, scipy.__version__, dipy.__version__, platform.machine(), ",".join(simd), cpu])
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def digest(subject) -> dict:
    """SHA-256 and summary statistics of every output of ``make_subject``."""
    out = {"sha256": {}, "stats": {}}
    for name in ARRAYS:
        a = np.ascontiguousarray(getattr(subject, name))
        out["sha256"][name] = hashlib.sha256(a.tobytes() + str((a.dtype, a.shape)).encode()).hexdigest()
        x = a.astype(np.float64).reshape(-1)
        weights = np.random.default_rng(0).random(x.size)
        out["stats"][name] = [float(x.sum()), float(np.square(x).sum()), float(weights @ x)]
    params = json.dumps(subject.params, sort_keys=True).encode()
    out["sha256"]["params"] = hashlib.sha256(params).hexdigest()
    return out


RECORDED_ON = '2180bfb86e73e143'
EXPECTED = {
    '2.5mm-b1000': {
        "sha256": {
            "dwi": "3ffb17e9fcf8891c285ee8d71f820f82a6ed11efe835d1a137aec98b7d0a97bb",
            "signal": "4cdbb059641c0b3ba502bf6cc628537d6e69eb30d8967b8ef5e7928892f02509",
            "mask": "e565c529e68a584877ddae46ade02981dc22684df921c35f7f3daee9ee0b8ff9",
            "fa": "d5b481cf0f26a8c24cd6d3cff6573a3ebf53774bfc8cdca413eafad566917dc9",
            "peaks": "c5b3c8998c0a38c14361996fa318b21662fc84d3706dc645a1d0d335d3926b38",
            "peak_fractions": "1c70271eefa6e7d4b6f205479bbe857a2914e962c0468e06e2a5c9cf7e5058bf",
            "n_fibres": "d86bfe22711461430c9837a4a2604fdd7db9b0a5ca64dcd15ae9e5233d9d43e4",
            "tissue": "51f908a571c1d3eb49d15dc89736d316ed2c3e6048fad2a1bc75774efe4a6dcc",
            "bvals": "6fb8ceeae3104df9e8edbb9b70c79ca36de457e08f2c69658444196ad03c8ba6",
            "bvecs": "185b3bade43ed0dbf3a910b98d2c9c51459495a197a0ae8353069498aba3e60c",
            "affine": "e970eef951c28e408cfd4c37aa3dcfe6a848f7e85e6be893be222e9e7bb8adbb",
            "params": "2899d82928358412bfc7682729dbc2c496b1a4cd722cf7de3160e5f8c25c6fba",
        },
        "stats": {
            "dwi": [1118248713.480829, 1114125095743.4011, 559210766.5574031],
            "signal": [1052382723.7844055, 1101856537752.0415, 526288389.58912253],
            "mask": [13040.0, 13040.0, 6564.969227694733],
            "fa": [5105.004914354822, 3507.2368434336104, 2566.6611433614016],
            "peaks": [-5580.504014223699, 14576.999992253059, -2796.8288959073625],
            "peak_fractions": [8738.999987788498, 6285.354212095581, 4417.266350734553],
            "n_fibres": [14577.0, 27615.0, 7368.247557884519],
            "tissue": [13026.661596453312, 10842.423030266378, 6585.220415056946],
            "bvals": [90000.0, 90000000.0, 49954.77891687181],
            "bvecs": [47.41113922865193, 90.0, 22.09590978426677],
            "affine": [-18.875, 23818.265625, -87.05000582199017],
        },
    },
    '1.25mm-b1000': {
        "sha256": {
            "dwi": "6f7ea89124572bddd620ad4e3d86a8eef366135c59df0c8c8169566ab29cdc68",
            "signal": "5c56339cc0f0a925deeb0f27c5e10b0ff86127061837d5f839de6243dcbb497e",
            "mask": "7478a6505cc7b3115eb5aac76579deccac783c5bdf1568d80b692c5777647536",
            "fa": "99c6ae39eeb393f960eef9c9e1ede01ad59acc303fe6178939f25fe78b05faf5",
            "peaks": "f8f3e54bcd6dfa919f2ee3454867d0bdba3a3eb26136f3b580b59c9a4009aeb6",
            "peak_fractions": "655f9337861e3d5f9adb605b4b6c99e58a0adc5740c45a85fcabbe21e3a18e7b",
            "n_fibres": "ac338356856b1735d7b1e09f9bededdfe7ddf1fea0b94134183e6bb2a75cfad2",
            "tissue": "f7eb7e2b6eab977475a61086f05879e43208e24e5e19e17001c870f3c3f12367",
            "bvals": "6fb8ceeae3104df9e8edbb9b70c79ca36de457e08f2c69658444196ad03c8ba6",
            "bvecs": "185b3bade43ed0dbf3a910b98d2c9c51459495a197a0ae8353069498aba3e60c",
            "affine": "8717a20f4172bb330867ebc674d6ffe25308c685a6c260be004d9bcf5ab1113a",
            "params": "28837dd13b83659a0fa4c1257226ef065c85430ab9c0e314b08ba42c23933110",
        },
        "stats": {
            "dwi": [2992415850.5970936, 2976725212904.1475, 1494857250.6410048],
            "signal": [2752073665.999277, 2941024284949.649, 1374631964.5986156],
            "mask": [32894.0, 32894.0, 16446.792660047213],
            "fa": [11234.50034307711, 7130.858120962441, 5622.292479378131],
            "peaks": [-15244.854242009897, 34479.000002593515, -7568.808334559884],
            "peak_fractions": [19549.999997854233, 13609.278563381635, 9760.889909558562],
            "n_fibres": [34479.0, 69591.0, 17164.764316042303],
            "tissue": [32894.72666246012, 29746.145172515095, 16387.743601050235],
            "bvals": [90000.0, 90000000.0, 49954.77891687181],
            "bvecs": [47.41113922865193, 90.0, 22.09590978426677],
            "affine": [-17.0, 24262.25, -88.8429946828664],
        },
    },
    '2.5mm-3shells-snr40': {
        "sha256": {
            "dwi": "9b1eef7eea660fa458bff230737047718b654dbda88b41d93cd8030f8f3bc93b",
            "signal": "3112bb5c637951e4cd91fc1445ae9434616d22e0df19efc922a7bad5eb4fc278",
            "mask": "5338488a9e300172f674e9092c4de8b2668e3d29d3a3c12a336dddc65cf84367",
            "fa": "2ada85a7fe716b031820f3dd7f773311119213f949e13895b4144b70107f407a",
            "peaks": "bdda5e395f1f0c09badd90dd1023f1fbaeb26b442b730467a014d38d34b1a1f9",
            "peak_fractions": "6f21339ca5afa043f0ebf6c42d6a21b01dd18c16a1e4e25be8aacd999a0d57be",
            "n_fibres": "b172928ff353bf7e68ff51518cb072b1c73088103424e40a13cffe4b89d3e940",
            "tissue": "2defbf07ba9495ab6f5ebe1cc855d190cbe45d3b32809cb74a4cef55873ee4dd",
            "bvals": "9a17cc6787be957a2bc1fa67c27f6e96029fa2304e23bcec8cbda52f79a3fcea",
            "bvecs": "82d8190ba5aeedcd42d319a696349aa40e719d934d8bdca420d01003314d4d87",
            "affine": "e970eef951c28e408cfd4c37aa3dcfe6a848f7e85e6be893be222e9e7bb8adbb",
            "params": "24b51dd556132e49f2ba0ac48edc0c30066e73e4795bb15c9a38e15a734a968b",
        },
        "stats": {
            "dwi": [989198520.4708979, 521606733820.32886, 494643217.8316691],
            "signal": [922483825.3217268, 516597964599.5631, 461288247.7560275],
            "mask": [9980.0, 9980.0, 5001.846389796971],
            "fa": [4317.946549163309, 3159.8822153178544, 2159.011508447114],
            "peaks": [-5020.866745561924, 10699.000001372942, -2566.3635908551514],
            "peak_fractions": [6872.000006787479, 5212.142987843454, 3479.5053148122593],
            "n_fibres": [10699.0, 18807.0, 5347.276829520095],
            "tissue": [9966.827042229532, 8201.231067297704, 5017.5413799570915],
            "bvals": [540000.0, 1260000000.0, 294096.24405300093],
            "bvecs": [194.69510543426819, 270.0, 97.37469488710326],
            "affine": [-18.875, 23818.265625, -87.05000582199017],
        },
    },
}


@pytest.fixture(scope="module", params=sorted(CASES))
def case(request):
    name = request.param
    return name, digest(make_subject(**CASES[name]))


def test_default_phantom_statistics_unchanged(case):
    name, got = case
    expected = EXPECTED[name]["stats"]
    for array, values in expected.items():
        np.testing.assert_allclose(got["stats"][array], values, rtol=1e-6, atol=1e-9, err_msg=f"{name}: {array}")


def test_default_phantom_bit_for_bit_on_the_recording_platform(case):
    if platform_fingerprint() != RECORDED_ON:
        pytest.skip("another CPU or library version: only the statistics test applies")
    name, got = case
    assert got["sha256"] == EXPECTED[name]["sha256"]
