"""qid2_diffusers.gradients: the one b0 threshold, the b0 / diffusion-weighted split, dipy gradient tables."""

import numpy as np
import pytest
from dipy.core.gradients import gradient_table

from qid2_diffusers.directions import uniform_directions
from qid2_diffusers.gradients import B0_THRESHOLD, as_bvals_bvecs, split_scheme, target_directions


def test_split_scheme_at_the_threshold_and_with_a_gradient_table():
    bvals = np.array([0.0, 5.0, B0_THRESHOLD, B0_THRESHOLD + 1e-3, 1000.0, 995.0])
    bvecs = np.r_[np.zeros((3, 3)), uniform_directions(3)]
    b0, dw = split_scheme(bvals)
    np.testing.assert_array_equal(b0, [0, 1, 2])
    np.testing.assert_array_equal(dw, [3, 4, 5])
    for got, want in zip(split_scheme(gradient_table(bvals, bvecs=bvecs)), (b0, dw)):
        np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(split_scheme(bvals, b0_threshold=10.0)[1], [2, 3, 4, 5])
    with pytest.raises(ValueError, match="6 b-values but b-vectors of shape"):
        split_scheme(bvals, bvecs[:4])


def test_gradient_table_and_arrays_give_the_same_scheme():
    bvals = np.r_[0.0, np.full(6, 1000.0)]
    bvecs = np.r_[np.zeros((1, 3)), uniform_directions(6)]
    from_table = as_bvals_bvecs(gradient_table(bvals, bvecs=bvecs))
    from_arrays = as_bvals_bvecs(list(bvals), bvecs.tolist())
    for a, b in zip(from_table, from_arrays):
        np.testing.assert_array_equal(a, b)
        assert a.dtype == np.float64
    with pytest.raises(ValueError, match="not both"):
        as_bvals_bvecs(gradient_table(bvals, bvecs=bvecs), bvecs)
    with pytest.raises(ValueError, match="bvecs are needed"):
        as_bvals_bvecs(bvals)


def test_target_directions_of_a_table_are_its_diffusion_weighted_rows():
    dirs = uniform_directions(5)
    table = gradient_table(np.r_[0.0, np.full(5, 1000.0), 0.0], bvecs=np.r_[np.zeros((1, 3)), dirs, np.zeros((1, 3))])
    np.testing.assert_array_equal(target_directions(table), dirs)
    np.testing.assert_array_equal(target_directions(dirs.tolist()), dirs)
