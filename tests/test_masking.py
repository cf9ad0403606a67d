"""The brain mask: dipy's median_otsu, with its median filter split over threads, must give dipy's mask exactly."""

import nibabel as nib
import numpy as np
import pytest
from dipy.segment.mask import median_otsu, multi_median

from qid2_diffusers.masking import brain_mask, median_filtered
from qid2_diffusers.threads import z_blocks


def _head(seed: int = 0, shape=(40, 44, 26)) -> np.ndarray:
    """A noisy ellipsoidal 'head' with a dark interior blob, on a noisy background."""
    rng = np.random.default_rng(seed)
    x, y, z = np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing="ij")
    head = (x / 0.8) ** 2 + (y / 0.85) ** 2 + (z / 0.9) ** 2 < 1
    blob = (x / 0.2) ** 2 + ((y - 0.1) / 0.3) ** 2 + (z / 0.3) ** 2 < 1
    volume = 800.0 * head - 500.0 * blob + rng.normal(0.0, 60.0, shape)
    return np.abs(volume).astype(np.float32)


def test_z_blocks_cover_every_slice_once_with_the_halo():
    blocks = z_blocks(26, 3, 4)  # at least 7 slices each: 3 blocks, not 4
    assert [(z0, z1) for z0, z1, _, _ in blocks] == [(0, 9), (9, 17), (17, 26)]
    assert [(s0, s1) for _, _, s0, s1 in blocks] == [(0, 12), (6, 20), (14, 26)]
    assert z_blocks(6, 3, 4) == [(0, 6, 0, 6)]  # thinner than 2 halo + 1 twice: one block


@pytest.mark.parametrize("radius,numpass,workers", [(2, 1, 2), (2, 3, 3), (4, 1, 2)])
def test_threaded_median_equals_dipys(radius, numpass, workers):
    volume = _head()
    assert np.array_equal(median_filtered(volume, radius, numpass, workers), multi_median(volume, radius, numpass))


def test_brain_mask_is_dipys_median_otsu_mask_on_a_phantom_and_a_real_crop(real_data_dir):
    volume = _head(1)
    # 2 mm voxels: radius round(5 / 2) = 2.
    expected = median_otsu(volume, median_radius=2, numpass=1, finalize_mask=True)[1]
    for workers in (1, 2, 3):
        found = brain_mask(volume, (2.0, 2.0, 2.0), workers=workers)
        assert found.dtype == bool and np.array_equal(found, expected)
    assert 0.2 < expected.mean() < 0.8  # a real split into brain and background, not all or nothing

    img = nib.load(real_data_dir / "msmt.nii.gz")
    data = np.asarray(img.dataobj, dtype=np.float32)
    b0 = data[..., np.loadtxt(real_data_dir / "msmt.bval") < 50].mean(axis=-1)
    # 2.5 mm voxels: radius 2; 11 slices make two blocks.
    assert len(z_blocks(b0.shape[2], 2, 2)) == 2
    expected = median_otsu(b0, median_radius=2, numpass=1, finalize_mask=True)[1]
    assert np.array_equal(brain_mask(b0, img.header.get_zooms()[:3], workers=2), expected)
