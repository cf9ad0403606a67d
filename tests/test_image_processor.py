"""QID2ImageProcessor: the one pad -> normalise -> crop -> denormalise chain."""

import pytest
import torch

from qid2_diffusers.image_processor import MIN_SIZE, QID2ImageProcessor
from qid2_diffusers.normalization import reference_scale


@pytest.mark.parametrize("size", [(145, 174), (13, 18), (6, 8), (16, 16)])
def test_pad_then_crop_is_identity(size):
    proc = QID2ImageProcessor(4)
    x = torch.randn(2, 3, *size)
    padded, kept = proc.pad(x)
    assert kept == size
    assert padded.shape[-2] % 4 == 0 and padded.shape[-1] % 4 == 0
    assert min(padded.shape[-2:]) >= MIN_SIZE
    assert torch.equal(proc.crop(padded, kept), x)


def test_preprocess_postprocess_round_trip_in_scanner_units():
    proc = QID2ImageProcessor(4)
    g = torch.Generator().manual_seed(0)
    refs = torch.rand(2, 3, 13, 18, generator=g) * 500
    prior = torch.rand(2, 2, 13, 18, generator=g) * 500
    x, scale, size = proc.preprocess(refs, prior)
    assert x.shape == (2, 5, 16, 20)
    # The scale comes from the references alone; the conditions share it.
    assert torch.allclose(scale, reference_scale(refs))
    back = proc.postprocess(x, scale, size)
    assert torch.allclose(back, torch.cat([refs, prior], dim=1), rtol=1e-5, atol=1e-3)


def test_postprocess_clamps_negative_magnitudes():
    proc = QID2ImageProcessor(1, min_size=1)
    scale = torch.full((1, 1, 1, 1), 100.0)
    out = proc.postprocess(torch.full((1, 1, 2, 2), -1.5), scale, (2, 2))
    assert torch.all(out == 0)


def test_for_unet_follows_the_levels():
    from qid2_diffusers.models.unet import build_unet

    assert QID2ImageProcessor.for_unet(build_unet("tiny", 3)).size_multiple == 4
