import torch

from qid2_diffusers.normalization import SCALE_PERCENTILE, denormalize, normalize, reference_scale


def test_scale_is_the_reference_percentile():
    g = torch.Generator().manual_seed(0)
    for shape in [(3, 3, 6, 8), (2, 6, 40, 50)]:  # below and above the subsampling threshold
        refs = torch.rand(shape, generator=g) * 1000
        scale = reference_scale(refs)
        assert scale.shape == (shape[0], 1, 1, 1)
        flat = refs.flatten(1)
        if flat.shape[1] <= 8192:
            expected = torch.quantile(flat, SCALE_PERCENTILE / 100, dim=1)
            torch.testing.assert_close(scale.flatten(), expected)
        else:  # subsampled: within the spread of neighbouring percentiles
            lo, hi = torch.quantile(flat, 0.985, dim=1), torch.quantile(flat, 0.995, dim=1)
            assert torch.all((scale.flatten() >= lo) & (scale.flatten() <= hi))


def test_round_trip_and_empty_slices():
    refs = torch.rand(2, 3, 10, 12) * 300
    refs[1] = 0  # a slice outside the head
    scale = reference_scale(refs)
    assert scale[1].item() == 1.0
    x = torch.rand(2, 1, 10, 12) * 300
    torch.testing.assert_close(denormalize(normalize(x, scale), scale), x)
    n = normalize(refs, scale)
    assert n[0].max() > 0.9 and n[0].min() >= -1.0
