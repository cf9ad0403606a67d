"""SliceUpsampler's batching: each slice cropped to its own brain box, batches within one slice."""

import numpy as np

from qid2_diffusers.directions import uniform_directions
from qid2_diffusers.upsampling import SliceUpsampler, brain_bounding_box, network_pixels


class MeanOfReferences(SliceUpsampler):
    """A pixel-wise stand-in network (the mean of the references plus the target's x), recording its batches."""

    def __init__(self, **kwargs):
        super().__init__(progress=False, **kwargs)
        self.batches = []

    @property
    def num_references(self) -> int:
        return 3

    def predict_batch(self, reference_images, reference_bvecs, target_bvecs, keys, **_):
        self.batches.append((reference_images.shape, sorted({z for _, z in keys})))
        return reference_images.mean(axis=1) + target_bvecs[:, :1, None], None


def test_each_slice_is_cropped_to_its_own_brain_box_with_the_same_values():
    rng = np.random.default_rng(0)
    shape = (40, 36, 5)
    x, y = np.meshgrid(np.arange(shape[0]), np.arange(shape[1]), indexing="ij")
    mask = np.zeros(shape, dtype=bool)
    for z, r in enumerate((0, 6, 14, 9, 3)):  # brain grows then shrinks; slice 0 holds none
        mask[..., z] = (x - 20) ** 2 / 1.2 + (y - 17) ** 2 < r * r
    bvecs = np.concatenate([np.zeros((2, 3)), uniform_directions(20)])
    bvals = np.r_[0.0, 0.0, np.full(20, 1000.0)]
    data = rng.uniform(100, 200, shape + (22,)).astype(np.float32)
    targets = uniform_directions(7, seed=3)

    per_slice = MeanOfReferences(batch_size=4)
    whole = MeanOfReferences(batch_size=4)
    whole.slice_boxes = False
    found = per_slice.predict(data, bvals, bvecs, targets, mask)
    expected = whole.predict(data, bvals, bvecs, targets, mask)
    np.testing.assert_array_equal(found, expected)  # a pixel-wise network: the crop changes nothing
    assert np.abs(found).sum() > 0 and (found[~mask] == 0).all()

    bx, by = brain_bounding_box(mask)
    pixels = 0
    for (b, r, h, w), zs in per_slice.batches:
        assert len(zs) == 1 and r == 3 and b <= 4  # one slice per batch, 7 targets as 4 + 3
        sx, sy = brain_bounding_box(mask[bx, by, zs[0]][..., None])
        assert (h, w) == (sx.stop - sx.start, sy.stop - sy.start)
        pixels += b * h * w
    assert sorted({zs[0] for _, zs in per_slice.batches}) == [1, 2, 3, 4]
    assert [s[0][0] for s in per_slice.batches[:2]] == [4, 3]
    whole_pixels = sum(s[0] * s[2] * s[3] for s, _ in whole.batches)
    assert pixels < 0.6 * whole_pixels
    # What the benchmarks count: the same pixels per target.
    assert (network_pixels(mask) * 7, network_pixels(mask, slice_boxes=False) * 7) == (pixels, whole_pixels)
