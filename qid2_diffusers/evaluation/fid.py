"""Fréchet inception distance of DWI slices, given a local Inception-v3 feature extractor.

No weights ship with the package and nothing is downloaded: pass a TorchScript
Inception-v3 feature extractor (for example NVIDIA's
``inception-2015-12-05.pt`` used by StyleGAN and clean-fid) and FID is
computed; otherwise the FID column reads :data:`FID_UNAVAILABLE`.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np

from ..errors import QID2InputError
from .metrics import MIN_MASK_VOXELS

__all__ = ["FID_UNAVAILABLE", "load_inception", "inception_features", "frechet_distance"]

#: What the FID column says when no feature extractor was given.
FID_UNAVAILABLE = "n/a: no Inception-v3 weights (no network here); pass --fid-weights"

_INPUT_SIZE = 299


def load_inception(path):
    """Load a TorchScript Inception-v3 feature extractor.

    It maps images ``(N, 3, 299, 299)`` with values in ``[0, 255]`` to features
    ``(N, 2048)``, called as ``model(x, return_features=True)`` when its
    ``forward`` takes that flag (NVIDIA's detector) and ``model(x)`` otherwise.
    """
    import torch

    path = Path(path)
    if not path.is_file():
        raise QID2InputError(path, "file not found")
    try:
        with warnings.catch_warnings():
            # torch deprecates TorchScript, but the published Inception-v3 FID extractors are TorchScript files.
            warnings.simplefilter("ignore", DeprecationWarning)
            model = torch.jit.load(str(path), map_location="cpu").eval()
    except Exception as exc:  # torch raises several types for a file that is not TorchScript
        raise QID2InputError(path, f"not a TorchScript feature extractor ({type(exc).__name__})") from None
    return model


def inception_features(
    model, volumes, mask, data_range: float, *, batch_size: int = 32, min_mask_voxels: int = MIN_MASK_VOXELS
) -> np.ndarray:
    """Features of every axial brain slice of ``volumes`` ``(X, Y, Z, T)``.

    Slices are zeroed outside the mask, mapped from ``[0, data_range]`` to
    ``[0, 255]``, repeated to three channels and resized to 299 x 299; slices
    with fewer than ``min_mask_voxels`` brain voxels are skipped, as for SSIM.
    """
    import torch
    import torch.nn.functional as F

    volumes = np.asarray(volumes, dtype=np.float32)
    mask = np.asarray(mask, dtype=bool)
    keep = np.flatnonzero(mask.sum(axis=(0, 1)) >= min_mask_voxels)
    slices = np.moveaxis(volumes * mask[..., None], (2, 3), (0, 1))[keep].reshape(-1, *volumes.shape[:2])
    images = np.clip(slices / max(data_range, 1e-12) * 255.0, 0.0, 255.0)
    takes_flag = "return_features" in str(model.forward.schema)
    feats = []
    with torch.inference_mode():
        for start in range(0, len(images), batch_size):
            x = torch.from_numpy(images[start : start + batch_size])[:, None].repeat(1, 3, 1, 1)
            x = F.interpolate(x, size=(_INPUT_SIZE, _INPUT_SIZE), mode="bilinear", align_corners=False)
            f = model(x, return_features=True) if takes_flag else model(x)
            feats.append(f.reshape(len(x), -1).double().numpy())
    return np.concatenate(feats) if feats else np.zeros((0, 0))


def frechet_distance(features_a, features_b) -> float:
    """``|mu_a - mu_b|^2 + tr(S_a + S_b - 2 (S_a S_b)^(1/2))`` of two feature sets ``(N, D)``."""
    from scipy import linalg

    a, b = np.asarray(features_a, dtype=np.float64), np.asarray(features_b, dtype=np.float64)
    if len(a) < 2 or len(b) < 2:
        raise ValueError("FID needs at least two images on each side")
    mu_a, mu_b = a.mean(axis=0), b.mean(axis=0)
    cov_a, cov_b = np.atleast_2d(np.cov(a, rowvar=False)), np.atleast_2d(np.cov(b, rowvar=False))
    with warnings.catch_warnings():
        # Fewer images than feature dimensions leaves the product singular: scipy
        # warns, and a tiny ridge (as in pytorch-fid) is used when the root is not finite.
        warnings.simplefilter("ignore", linalg.LinAlgWarning)
        covmean = linalg.sqrtm(cov_a @ cov_b)
        if not np.all(np.isfinite(covmean)):
            ridge = np.eye(len(mu_a)) * 1e-6
            covmean = linalg.sqrtm((cov_a + ridge) @ (cov_b + ridge))
    covmean = np.real(covmean)
    return float(np.sum((mu_a - mu_b) ** 2) + np.trace(cov_a) + np.trace(cov_b) - 2.0 * np.trace(covmean))
