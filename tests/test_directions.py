import numpy as np
import pytest

from qid2_diffusers.directions import (
    angular_distance,
    complement,
    electrostatic_energy,
    nearest_references,
    normalize_bvecs,
    uniform_directions,
    uniform_subset,
)


def test_normalize_and_errors():
    out = normalize_bvecs([[2, 0, 0], [0, 0, -5]])
    np.testing.assert_allclose(out, [[1, 0, 0], [0, 0, -1]])
    with pytest.raises(ValueError, match="zero length"):
        normalize_bvecs([[0, 0, 0]])
    with pytest.raises(ValueError, match="NaN"):
        normalize_bvecs([[np.nan, 0, 1]])
    with pytest.raises(ValueError, match=r"\(N, 3\)"):
        normalize_bvecs(np.ones((4, 2)))
    np.testing.assert_array_equal(normalize_bvecs([[0, 0, 0]], allow_zero=True), [[0, 0, 0]])


def test_angular_distance_is_antipodally_symmetric():
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(5, 3)), rng.normal(size=(7, 3))
    d = angular_distance(a, b)
    assert d.shape == (5, 7)
    np.testing.assert_allclose(d, angular_distance(-a, b), atol=1e-12)
    np.testing.assert_allclose(d, angular_distance(a, -b), atol=1e-12)
    assert np.all((d >= 0) & (d <= np.pi / 2 + 1e-12))
    assert angular_distance([1, 0, 0], [-1, 0, 0]) == pytest.approx(0.0)
    assert angular_distance([1, 0, 0], [0, 1, 0]) == pytest.approx(np.pi / 2)
    assert angular_distance([1, 0, 0], [1, 1, 0]) == pytest.approx(np.pi / 4)


def test_nearest_references_hand_made():
    acquired = np.array([[1, 0, 0], [0, 1, 0], [0, 0, 1], [1, 1, 0], [-1, 0.05, 0]], dtype=float)
    # The antipode of acquired[4] is almost the target: it ranks first.
    idx, dist = nearest_references([1, 0, 0.01], acquired, 3, return_distances=True)
    assert list(idx) == [0, 4, 3]
    assert np.all(np.diff(dist) >= 0)
    # Exact tie between x and y for a target on the diagonal: lower index wins.
    assert list(nearest_references([1, 1, 0.0], acquired[:3], 2)) == [0, 1]
    assert list(nearest_references([-1, -1, 0.0], acquired[:3], 2)) == [0, 1]
    many = nearest_references(np.eye(3), acquired, 1)
    assert many.shape == (3, 1) and list(many[:, 0]) == [0, 1, 2]


def test_nearest_references_sign_flip_gives_same_choice(scheme90):
    acquired = scheme90[:30]
    targets = scheme90[30:]
    flips = np.where(np.random.default_rng(1).random((30, 1)) < 0.5, -1.0, 1.0)
    np.testing.assert_array_equal(
        nearest_references(targets, acquired, 6), nearest_references(-targets, acquired * flips, 6)
    )


def test_nearest_references_bad_r():
    with pytest.raises(ValueError, match="larger than the 2 acquired"):
        nearest_references([1, 0, 0], np.eye(3)[:2], 3)
    with pytest.raises(ValueError, match="positive"):
        nearest_references([1, 0, 0], np.eye(3), 0)


def test_uniform_directions_deterministic_and_unit():
    a, b = uniform_directions(30, seed=3), uniform_directions(30, seed=3)
    np.testing.assert_array_equal(a, b)
    np.testing.assert_allclose(np.linalg.norm(a, axis=1), 1.0)
    assert not np.allclose(a, uniform_directions(30, seed=4))


def test_uniform_subset_quality(scheme90):
    chosen = uniform_subset(scheme90, 30)
    assert len(chosen) == 30 and len(set(chosen)) == 30
    np.testing.assert_array_equal(chosen, uniform_subset(scheme90, 30))
    energy = electrostatic_energy(scheme90[chosen])
    optimum = electrostatic_energy(uniform_directions(30, seed=1))  # independently optimised
    assert energy <= 1.02 * optimum
    rng = np.random.default_rng(0)
    random_energies = [electrostatic_energy(scheme90[rng.choice(90, 30, replace=False)]) for _ in range(100)]
    assert energy < min(random_energies)


def test_uniform_subset_sign_invariant(scheme90):
    flips = np.where(np.random.default_rng(2).random((90, 1)) < 0.5, -1.0, 1.0)
    np.testing.assert_array_equal(uniform_subset(scheme90, 30), uniform_subset(scheme90 * flips, 30))


def test_complement(scheme90):
    acquired = uniform_subset(scheme90, 30)
    targets = complement(scheme90, -scheme90[acquired])
    assert len(targets) == 60
    assert set(targets).isdisjoint(acquired)
    assert set(targets) | set(acquired) == set(range(90))
