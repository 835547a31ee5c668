"""rmd.upsample: the resize operator, its exact noise-variance correction, and Eq. 10.

Independent truths used here: the operator's impulse responses computed with the full 2-D
``F.interpolate`` (no separability assumed), Monte-Carlo variances of white noise, and
the hand-computed interior variance of 2x bilinear interpolation (0.75^2 + 0.25^2)^2.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from rmd.upsample import MODES, interp_matrix, noise_std_map, renoise, upsample, upsample_noise

# (input (h, w), output (H, W)): integer, non-integer (x1.5, as Wan 480p -> 720p), non-square
SIZE_PAIRS = [((8, 8), (16, 16)), ((16, 16), (24, 24)), ((6, 10), (9, 13)), ((4, 4), (16, 16))]


def _impulse_response_std(in_size, out_size, mode):
    """Per-position std of Up(white noise), by pushing every unit impulse through the 2-D op."""
    n = in_size[0] * in_size[1]
    impulses = torch.eye(n, dtype=torch.float64).reshape(n, 1, *in_size)
    align = None if mode == "nearest" else False
    resp = F.interpolate(impulses, size=out_size, mode=mode, align_corners=align)
    return resp.pow(2).sum(dim=0)[0].sqrt()  # Var(out_ij) = sum_k resp_k(ij)^2


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("in_size,out_size", SIZE_PAIRS)
def test_std_map_is_exact(mode, in_size, out_size):
    want = _impulse_response_std(in_size, out_size, mode)
    got = noise_std_map(in_size, out_size, mode, dtype=torch.float64)
    assert got.shape == out_size
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("mode", MODES)
def test_operator_is_the_separable_matrix_product(mode):
    # the premise of the cheap std map: Up(x) = W_h x W_w^T, with W from interpolating identities
    x = torch.randn(2, 3, 6, 10, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    wh, ww = interp_matrix(6, 9, mode), interp_matrix(10, 15, mode)
    torch.testing.assert_close(upsample(x, (9, 15), mode), wh @ x @ ww.T, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("shape,size", [((3, 4, 16, 16), (32, 32)), ((2, 3, 5, 7), (10, 14)),
                                        ((2, 3, 1, 4), (2, 8)), ((2, 3, 6, 5), (12, 5))])
def test_bilinear_2x_stencil_is_the_kernel(shape, size):
    # 2x bilinear takes a stencil on CPU: the kernel's values up to float32 rounding, the same
    # numbers with and without autograd, and per image independent of the rest of the batch
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(5))
    want = F.interpolate(x, size=size, mode="bilinear", align_corners=False)
    got = upsample(x, size)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
    assert got.is_contiguous()
    with_grad = upsample(x.clone().requires_grad_(), size)
    assert torch.equal(with_grad.detach(), got)
    assert torch.equal(upsample(x[1:2], size), got[1:2])
    x64 = x.double().requires_grad_()
    torch.testing.assert_close(upsample(x64, size), F.interpolate(x64, size=size, mode="bilinear",
                                                                  align_corners=False), rtol=1e-15, atol=1e-15)


def test_bilinear_2x_interior_variance_by_hand():
    # 2x bilinear, align_corners=False: interior outputs weigh two inputs by 0.75 / 0.25 per axis
    std = noise_std_map((8, 8), (16, 16), "bilinear", dtype=torch.float64)
    assert std[4:12, 4:12].pow(2).sub((0.75**2 + 0.25**2) ** 2).abs().max() < 1e-12  # 0.390625
    # the border rows copy the edge input along that axis (clamped), so they are noisier
    assert std[0, 8] ** 2 == pytest.approx(0.75**2 + 0.25**2, abs=1e-12)


def _white(n, shape, seed):
    return torch.randn(n, *shape, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("in_size,out_size", [((8, 8), (16, 16)), ((16, 16), (24, 24))])
def test_upsample_noise_is_unit_variance_per_element(mode, in_size, out_size):
    eps = _white(4000, (1, *in_size), seed=1)
    var = upsample_noise(eps, out_size, mode).var(dim=0)[0]  # per position, over 4000 samples
    # sampling std of a variance estimate from 4000 draws: sqrt(2/4000) = 0.022
    assert (var - 1).abs().max() < 0.11
    assert var.mean() == pytest.approx(1.0, abs=0.01)
    if mode == "nearest":
        torch.testing.assert_close(upsample_noise(eps[:2], out_size, mode), upsample(eps[:2], out_size, mode))


@pytest.mark.parametrize("mode,expected_mean_var", [("bilinear", 0.45), ("bicubic", 0.76)])
@pytest.mark.parametrize("in_size,out_size", [((8, 8), (16, 16)), ((16, 16), (24, 24))])
def test_plain_upsample_shrinks_noise_variance(mode, expected_mean_var, in_size, out_size):
    # the reason upsample_noise exists: plain interpolation of white noise is far from unit variance
    eps = _white(4000, (1, *in_size), seed=2)
    var = upsample(eps, out_size, mode).var(dim=0)[0]
    assert var.mean() == pytest.approx(expected_mean_var, abs=0.02)
    # and unevenly: bicubic even overshoots (> 1) at the clamped borders, its weights being signed
    assert var.max() - var.min() > 0.5
    # and the measured per-position variance is the one the std map predicts
    pred = noise_std_map(in_size, out_size, mode).pow(2)
    assert (var - pred).abs().max() < 0.08


def test_video_is_resized_frame_by_frame():
    x = torch.randn(2, 4, 3, 6, 8, generator=torch.Generator().manual_seed(3))  # (B, C, T, h, w)
    for mode in MODES:
        out = upsample(x, (9, 12), mode)
        assert out.shape == (2, 4, 3, 9, 12)
        for f in range(3):
            torch.testing.assert_close(out[:, :, f], upsample(x[:, :, f], (9, 12), mode), rtol=0, atol=0)
        noise = upsample_noise(x, (9, 12), mode)
        for f in range(3):
            torch.testing.assert_close(noise[:, :, f], upsample_noise(x[:, :, f], (9, 12), mode), rtol=0, atol=0)


def test_same_size_is_identity_and_bad_input_raises():
    x = torch.randn(1, 4, 8, 8)
    assert upsample(x, (8, 8), "bicubic") is x
    assert upsample_noise(x, 8, "bilinear") is x
    with pytest.raises(ValueError, match="mode"):
        upsample(x, (16, 16), "area")
    with pytest.raises(ValueError, match="shape"):
        upsample(torch.randn(4, 8, 8), (16, 16))


def test_gradients_flow_through_both_operators():
    x = torch.randn(1, 2, 3, 5, dtype=torch.float64, requires_grad=True)
    for mode in MODES:
        assert torch.autograd.gradcheck(lambda v: upsample(v, (5, 8), mode), (x,))
        assert torch.autograd.gradcheck(lambda v: upsample_noise(v, (5, 8), mode), (x,))
    # and through the 2x stencil that bilinear doubling takes on CPU
    assert torch.autograd.gradcheck(lambda v: upsample(v, (6, 10)), (x,))
    assert torch.autograd.gradcheck(lambda v: upsample_noise(v, (6, 5)), (x,))


def test_std_map_is_cached_per_key():
    a = noise_std_map((8, 8), (12, 12), "bilinear")
    assert noise_std_map((8, 8), (12, 12), "bilinear") is a
    assert noise_std_map((8, 8), (12, 12), "bilinear", dtype=torch.float64) is not a
    assert noise_std_map((8, 8), (12, 12), "bicubic") is not a


@pytest.mark.parametrize("gamma", [0.0, 0.2, 0.5, 0.9, 1.0])
def test_renoise_mixes_to_unit_variance_with_correlation_gamma(gamma):
    n = 200_000
    eps, z = _white(2, (n,), seed=4)
    x = renoise(torch.zeros(n), eps, 1.0, gamma, z)  # t = 1: x is the noise mixture itself
    assert x.var() == pytest.approx(1.0, abs=0.015)
    assert torch.corrcoef(torch.stack([x, eps]))[0, 1] == pytest.approx(gamma, abs=0.01)


def test_renoise_per_sample_times():
    x0, eps, z = (torch.full((2, 1, 2, 2), v) for v in (2.0, 3.0, 5.0))
    t = torch.tensor([0.25, 1.0])
    out = renoise(x0, eps, t, 0.6, z)
    e = 0.6 * 3.0 + 0.8 * 5.0  # sqrt(1 - 0.36) = 0.8
    torch.testing.assert_close(out[0], torch.full((1, 2, 2), 0.75 * 2.0 + 0.25 * e))
    torch.testing.assert_close(out[1], torch.full((1, 2, 2), e))
    with pytest.raises(ValueError):
        renoise(x0, eps, t, 1.1, z)
    assert math.isclose(renoise(x0, eps, 0.0, 0.0, z)[0, 0, 0, 0].item(), 2.0)


def test_renoise_without_fresh_noise_and_mixed_dtypes():
    x0, eps = torch.full((2, 1, 2, 2), 2.0), torch.full((2, 1, 2, 2), 3.0)
    t = torch.tensor([0.25, 0.5])
    # gamma = 1 gives z no weight, so it may be left out
    torch.testing.assert_close(renoise(x0, eps, t, 1.0, None)[:, 0, 0, 0], torch.tensor([2.25, 2.5]))
    with pytest.raises(ValueError, match="z is needed"):
        renoise(x0, eps, t, 0.9, None)
    with pytest.raises(ValueError, match="one shape"):
        renoise(x0, eps, t, 0.5, torch.zeros(2, 1, 2, 3))
    # bf16 latents with float32 noise promote to float32, as plain arithmetic does
    out = renoise(x0.bfloat16(), eps.bfloat16(), 0.5, 0.0, torch.full((2, 1, 2, 2), 5.0))
    assert out.dtype == torch.float32 and out.flatten()[0].item() == 3.5
