"""Spatial upsampling of latents and of noise, and the cross-resolution re-noising of Eq. 10.

At a resolution switch the cascade (METHOD 4) and the training loss (METHOD 5, Eq. 4)
upsample the predicted clean latent ``x0_hat`` and the predicted noise ``eps_hat``, then
re-noise:

    x = (1 - t) Up(x0_hat) + t (gamma * Up_n(eps_hat) + sqrt(1 - gamma^2) z)      (Eq. 10)

``Up`` is plain interpolation (:func:`upsample`). Interpolation is a weighted average of
neighbouring inputs, so it shrinks the variance of white noise (2x bilinear: to 0.39 in the
interior), unevenly across positions. ``Up_n`` (:func:`upsample_noise`) divides the
interpolated noise, position by position, by the exact standard deviation the operator gives
to unit white noise, so ``Up_n(eps)`` has unit variance at every element and ``x`` keeps the
per-element statistics the model expects at time t. (The result is still spatially
correlated; only ``z`` brings white high-frequency noise back.)

Every mode here is linear and separable: ``Up(x) = W_h x W_w^T`` per channel and frame,
with 1-D matrices ``W_h`` (H x h) and ``W_w`` (W x w). The variance at output (i, j) of
unit white input is therefore ``(sum_k W_h[i, k]^2) (sum_l W_w[j, l]^2)``; the 1-D matrices
are obtained by interpolating identity matrices with the very operator used on the data.
"""

from __future__ import annotations

import functools
import math
from typing import Optional, Sequence, Union

import torch
import torch.nn.functional as F

MODES = ("bilinear", "bicubic", "nearest")

Number = Union[float, torch.Tensor]


def _check_mode(mode: str) -> None:
    if mode not in MODES:
        raise ValueError(f"upsample mode must be one of {MODES}, got {mode!r}")


def _as_size(size: Union[int, Sequence[int]]) -> tuple[int, int]:
    if isinstance(size, int):
        return (size, size)
    h, w = (int(s) for s in size)
    if h <= 0 or w <= 0:
        raise ValueError(f"target size must be positive, got {tuple(size)}")
    return (h, w)


def _bilinear_2x_axis(x: torch.Tensor, dim: int) -> torch.Tensor:
    """Bilinear 2x along ``dim`` (align_corners=False), as a two-tap stencil.

    Output 2i weighs inputs (i - 1, i) by (0.25, 0.75) and output 2i + 1 weighs (i, i + 1) by
    (0.75, 0.25); the missing neighbour at either border is the edge input itself (the clamp
    of ``F.interpolate``). Same operator as the kernel, rounded in a different order (about
    1e-7 relative in float32), and several times faster on CPU at the cascade's small sizes.
    Element-wise, so an image's result does not depend on the batch around it.
    """
    n = x.shape[dim]
    a, b = x * 0.75, x * 0.25  # 0.25 x is exact; both paths below add the same two roundings
    if n == 1:
        return torch.cat([a + b, a + b], dim)
    shape = list(x.shape)
    shape[dim:dim + 1] = [n, 2]
    if not (torch.is_grad_enabled() and x.requires_grad):
        # sampling: write even and odd outputs in place into the interleaved result
        out = x.new_empty(shape)
        even, odd = out.select(dim + 1, 0), out.select(dim + 1, 1)
        torch.add(a.narrow(dim, 1, n - 1), b.narrow(dim, 0, n - 1), out=even.narrow(dim, 1, n - 1))
        torch.add(a.narrow(dim, 0, 1), b.narrow(dim, 0, 1), out=even.narrow(dim, 0, 1))
        torch.add(a.narrow(dim, 0, n - 1), b.narrow(dim, 1, n - 1), out=odd.narrow(dim, 0, n - 1))
        torch.add(a.narrow(dim, n - 1, 1), b.narrow(dim, n - 1, 1), out=odd.narrow(dim, n - 1, 1))
        return out.flatten(dim, dim + 1)
    # training: the same sums, built from differentiable pieces
    prev = torch.cat([b.narrow(dim, 0, 1), b.narrow(dim, 0, n - 1)], dim)
    nxt = torch.cat([b.narrow(dim, 1, n - 1), b.narrow(dim, n - 1, 1)], dim)
    return torch.stack([a + prev, a + nxt], dim + 1).flatten(dim, dim + 1)


def _interp2d(x: torch.Tensor, size: tuple[int, int], mode: str) -> torch.Tensor:
    """Resize (N, C, h, w) to ``size``: ``F.interpolate`` with the project's fixed settings.

    Bilinear resizes whose every axis is kept or doubled (the cascades' usual 2x switch) take
    the equivalent stencil :func:`_bilinear_2x_axis` instead of the kernel (on CPU, in float32/64).
    """
    h, w = x.shape[-2:]
    # On a GPU the kernel is one launch against the stencil's several, so it stays there.
    if (mode == "bilinear" and x.device.type == "cpu" and x.dtype in (torch.float32, torch.float64)
            and size[0] in (h, 2 * h) and size[1] in (w, 2 * w)):
        # width first: its interleaved (stride-2) writes are then on the smaller tensor, and the
        # height pass writes whole contiguous rows
        if size[1] == 2 * w:
            x = _bilinear_2x_axis(x, x.dim() - 1)
        if size[0] == 2 * h:
            x = _bilinear_2x_axis(x, x.dim() - 2)
        return x
    # align_corners=False (pixel-centre grid, as diffusers' pipelines resize) and no antialias:
    # antialias would make the operator depend on the direction of the resize.
    align = None if mode == "nearest" else False
    return F.interpolate(x, size=size, mode=mode, align_corners=align, antialias=False)


def upsample(x: torch.Tensor, size: Union[int, Sequence[int]], mode: str = "bilinear") -> torch.Tensor:
    """Spatially resize latents: ``Up`` of Eq. 4 / Eq. 10.

    ``x`` is ``(B, C, h, w)`` (image) or ``(B, C, T, h, w)`` (video; each frame is resized,
    the frame count is unchanged). ``size`` is the target latent ``(H, W)``. Differentiable.
    Non-integer factors (e.g. 16 -> 24) are fine. Downsizing also works but is not
    antialiased.
    """
    _check_mode(mode)
    size = _as_size(size)
    if x.dim() == 4:
        if tuple(x.shape[-2:]) == size:
            return x  # every mode is the identity at scale 1; skip the kernel
        return _interp2d(x, size, mode)
    if x.dim() == 5:
        b, c, t, h, w = x.shape
        if (h, w) == size:
            return x
        frames = x.permute(0, 2, 1, 3, 4).reshape(b * t, c, h, w)
        out = _interp2d(frames, size, mode)
        return out.reshape(b, t, c, *size).permute(0, 2, 1, 3, 4).contiguous()
    raise ValueError(f"upsample expects (B, C, h, w) or (B, C, T, h, w), got shape {tuple(x.shape)}")


def interp_matrix(n_in: int, n_out: int, mode: str) -> torch.Tensor:
    """The 1-D matrix ``W`` (n_out x n_in, float64) of the interpolation along one axis.

    Column k is the interpolation of the k-th unit vector, computed with the same
    ``F.interpolate`` call as the data (the other axis is kept at size 1, where every mode
    is the identity).
    """
    _check_mode(mode)
    eye = torch.eye(n_in, dtype=torch.float64).reshape(n_in, 1, n_in, 1)
    cols = _interp2d(eye, (n_out, 1), mode)  # (n_in, 1, n_out, 1): the response to e_k
    return cols.reshape(n_in, n_out).T.contiguous()


@functools.lru_cache(maxsize=64)
def _std_map_cached(
    in_size: tuple[int, int], out_size: tuple[int, int], mode: str, dtype: torch.dtype, device: torch.device
) -> torch.Tensor:
    var_h = interp_matrix(in_size[0], out_size[0], mode).pow(2).sum(dim=1)  # (H,)
    var_w = interp_matrix(in_size[1], out_size[1], mode).pow(2).sum(dim=1)  # (W,)
    std = torch.sqrt(var_h[:, None] * var_w[None, :])  # separable: Var = var_h (x) var_w
    return std.to(dtype=dtype, device=device)


def noise_std_map(
    in_size: Sequence[int],
    out_size: Sequence[int],
    mode: str = "bilinear",
    dtype: torch.dtype = torch.float32,
    device: Union[str, torch.device] = "cpu",
) -> torch.Tensor:
    """Exact per-position std ``(H, W)`` of :func:`upsample` applied to unit white noise.

    Cached per (sizes, mode, dtype, device); treat the returned tensor as read-only.
    """
    _check_mode(mode)
    return _std_map_cached(_as_size(in_size), _as_size(out_size), mode, dtype, torch.device(device))


def upsample_noise(eps: torch.Tensor, size: Union[int, Sequence[int]], mode: str = "bilinear") -> torch.Tensor:
    """``Up_n`` of Eq. 10: :func:`upsample`, then divided by :func:`noise_std_map`.

    For ``eps`` with i.i.d. unit-variance elements the result has unit variance at every
    element (its elements are correlated, however). Differentiable; same shapes as
    :func:`upsample`.
    """
    size = _as_size(size)
    up = upsample(eps, size, mode)
    if up is eps:
        return eps  # identity resize: the noise is already white and unit-variance
    std = noise_std_map(tuple(eps.shape[-2:]), size, mode, dtype=up.dtype, device=up.device)
    return up.div_(std)  # up is a fresh tensor; broadcasts over (B, C[, T]) leading dims


def _bcast_t(t: Number, like: torch.Tensor) -> Number:
    """A scalar time stays a scalar; a (B,) time is shaped (B, 1, ...) to broadcast against ``like``."""
    if isinstance(t, torch.Tensor) and t.dim() > 0:
        if t.shape[0] != like.shape[0]:
            raise ValueError(f"t has {t.shape[0]} entries for a batch of {like.shape[0]}")
        return t.to(dtype=like.dtype, device=like.device).reshape(-1, *([1] * (like.dim() - 1)))
    return t


def renoise(x0: torch.Tensor, eps: torch.Tensor, t: Number, gamma: float,
            z: Optional[torch.Tensor]) -> torch.Tensor:
    """Eq. 10 (and, with ``gamma`` = eta, the same-resolution step of Algorithm 2).

        x = (1 - t) x0 + t (gamma * eps + sqrt(1 - gamma^2) z)

    ``eps`` and ``z`` must be unit-variance per element for ``x`` to be at noise level t;
    give ``eps`` from :func:`upsample_noise` after a resolution switch. ``z`` is fresh
    noise drawn by the caller (the sampler draws it from per-image generators); it may be
    None when ``gamma`` = 1 gives it no weight. ``t`` is a float or a (B,) tensor.
    """
    if not (0.0 <= gamma <= 1.0):
        raise ValueError(f"noise mixing weight must be in [0, 1], got {gamma}")
    if z is None and gamma != 1.0:
        raise ValueError(f"z is needed: with gamma = {gamma} fresh noise has weight sqrt(1 - gamma^2) > 0")
    z_shape = x0.shape if z is None else z.shape
    if eps.shape != x0.shape or z_shape != x0.shape:
        raise ValueError(f"x0 {tuple(x0.shape)}, eps {tuple(eps.shape)} and z {tuple(z_shape)} must have one shape")
    tb = _bcast_t(t, x0)
    # A weight of exactly 0 or 1 skips its multiply and add (same values): on small, fast
    # networks these full-size element-wise passes are a large part of the sampler's own time.
    if gamma == 1.0:
        e = eps
    elif gamma == 0.0:
        e = z
    else:
        e = gamma * eps + math.sqrt(1.0 - gamma * gamma) * z  # unit variance if eps and z are, and independent
    # Plain multiplies and adds, not torch.lerp: lerp's vector and scalar code paths round
    # differently, so an image's result would depend on where it sits in the batch.
    return (1 - tb) * x0 + tb * e
