"""FID: the Frechet distance between Gaussians fitted to Inception-v3 pool features.

Features come from torch-fidelity's ``FeatureExtractorInceptionV3`` (the TF 2015-12-05 FID
Inception graph ported to PyTorch, 2048-d pool3 features, images given as uint8 and resized to
299x299 inside the network with TF1-compatible bilinear interpolation). torch-fidelity takes the
weights as a local file (``feature_extractor_weights_path``) and downloads only when that is
None, which never happens here. The distance is computed by :func:`frechet_distance` (scipy
``sqrtm``, float64), checked in the tests against the closed form and against torch-fidelity's
own ``fid_statistics_to_metric`` where torch-fidelity is importable.

Any callable mapping a uint8 ``(N, 3, H, W)`` tensor to ``(N, D)`` features can stand in for the
Inception network (:func:`folder_features`); the tests use that seam with a tiny network.
"""

from __future__ import annotations

import warnings
from typing import Callable, Sequence

import numpy as np
import torch

FID_SCALING = ("||mu1 - mu2||^2 + Tr(S1 + S2 - 2 (S1 S2)^(1/2)) on 2048-d pool3 features, unscaled; "
               "covariances with N-1 normalisation; lower is better; biased upwards for small N")


def gaussian_stats(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    f = np.asarray(features, dtype=np.float64)
    if f.ndim != 2 or f.shape[0] < 2:
        raise ValueError(f"need at least 2 feature vectors for a covariance, got shape {f.shape}")
    return f.mean(0), np.cov(f, rowvar=False)


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray,
                     eps: float = 1e-6) -> float:
    """d^2 = |mu1 - mu2|^2 + Tr(S1) + Tr(S2) - 2 Tr((S1 S2)^(1/2)), the 2-Wasserstein distance squared."""
    from scipy import linalg

    mu1, mu2 = np.atleast_1d(mu1).astype(np.float64), np.atleast_1d(mu2).astype(np.float64)
    s1, s2 = np.atleast_2d(sigma1).astype(np.float64), np.atleast_2d(sigma2).astype(np.float64)
    if mu1.shape != mu2.shape or s1.shape != s2.shape or s1.shape != (mu1.size, mu1.size):
        raise ValueError(f"shapes do not match: mu {mu1.shape} {mu2.shape}, sigma {s1.shape} {s2.shape}")
    diff = mu1 - mu2
    with warnings.catch_warnings():  # singular products (fewer images than dimensions) are handled here
        warnings.simplefilter("ignore", linalg.LinAlgWarning)
        covmean = linalg.sqrtm(s1 @ s2)
        if not np.isfinite(covmean).all():  # regularise, as pytorch-fid / TTUR do
            offset = np.eye(s1.shape[0]) * eps
            covmean = linalg.sqrtm((s1 + offset) @ (s2 + offset))
    if np.iscomplexobj(covmean):
        covmean = covmean.real  # imaginary parts are numerical noise for PSD inputs
    return float(diff @ diff + np.trace(s1) + np.trace(s2) - 2.0 * np.trace(covmean))


def fidelity_import_message(e: ImportError) -> str:
    if e.name == "torch_fidelity":
        return "FID needs the torch-fidelity package: pip install 'rmd[eval]'"
    return f"torch-fidelity could not be imported ({e}); pip install 'rmd[eval]' (with a matching torchvision)"


def load_inception(weights_path: str, device: str | torch.device = "cpu"):
    """torch-fidelity's FID Inception-v3, from a local weights file (no download possible)."""
    try:
        from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3
    except ImportError as e:
        raise ImportError(fidelity_import_message(e)) from None
    except Exception as e:  # torch-fidelity imports torchvision, which may be built for another torch
        raise ImportError(f"torch-fidelity could not be imported ({type(e).__name__}: {e}); it needs a "
                          "torchvision built for the installed torch") from None
    net = FeatureExtractorInceptionV3("inception-v3-compat", ["2048"], feature_extractor_weights_path=weights_path)
    net = net.to(device).eval()

    @torch.no_grad()
    def extract(x: torch.Tensor) -> torch.Tensor:
        (feats,) = net(x.to(device))
        return feats.float().cpu()

    return extract


def _to_uint8(image) -> torch.Tensor:
    arr = np.asarray(image.convert("RGB"), dtype=np.uint8)
    return torch.from_numpy(arr.copy()).permute(2, 0, 1)


def folder_features(paths: Sequence[str], extractor: Callable[[torch.Tensor], torch.Tensor],
                    batch_size: int = 16) -> np.ndarray:
    """Features of the images at ``paths``; consecutive images of one size are batched together."""
    from PIL import Image

    out, batch = [], []

    def flush():
        if batch:
            out.append(extractor(torch.stack(batch)).double().numpy())
            batch.clear()

    for p in paths:
        with Image.open(p) as im:
            x = _to_uint8(im)
        if batch and (x.shape != batch[0].shape or len(batch) >= batch_size):
            flush()
        batch.append(x)
    flush()
    return np.concatenate(out, 0)


def fid_from_features(a: np.ndarray, b: np.ndarray) -> float:
    return frechet_distance(*gaussian_stats(a), *gaussian_stats(b))
