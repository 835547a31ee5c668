"""Latent codecs: images <-> the latents the denoisers work on.

Every codec has ``encode(images) -> latents`` and ``decode(latents) -> images in [-1, 1]``
(float32 in and out) and the attributes ``scale_factor`` (pixels per latent),
``temporal_factor`` (pixel frames per latent frame after the first; 1 for images),
``latent_channels`` and ``is_video``. Images are (B, 3, H, W); video is (B, 3, F, H, W).

* :class:`PixelCodec` -- identity, for pixel-space models.
* :class:`ImageVAECodec` -- ``AutoencoderKL`` (SD/SDXL/PixArt/SD3). Latents follow the
  pipelines' normalisation ``z = (mode(E(x)) - shift) * scaling_factor`` (SD3 has
  ``shift_factor``; VAEs with ``latents_mean``/``latents_std`` use
  ``z = (mode - mean) * scaling_factor / std``).
* :class:`WanVAECodec` -- ``AutoencoderKLWan``: ``z = (mode(E(x)) - latents_mean) / latents_std``
  per channel, the inverse of the Wan pipeline's ``z * std + mean`` before decoding.

Nothing here disables gradients; wrap calls in ``torch.no_grad()`` when none are needed.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import Tensor, nn

from .denoisers import SizeError


class LatentCodec(nn.Module):
    """Base class; see the module docstring for the contract."""

    scale_factor: int = 1
    temporal_factor: int = 1
    latent_channels: int = 3
    is_video: bool = False

    def encode(self, images: Tensor, generator: Optional[torch.Generator] = None) -> Tensor:
        raise NotImplementedError

    def decode(self, latents: Tensor) -> Tensor:
        raise NotImplementedError

    @property
    def dtype(self) -> torch.dtype:
        for p in self.parameters():
            return p.dtype
        return torch.float32


class PixelCodec(LatentCodec):
    """Identity codec for pixel-space models; ``decode`` clamps to [-1, 1]."""

    def __init__(self, channels: int = 3, is_video: bool = False) -> None:
        super().__init__()
        self.latent_channels = int(channels)
        self.is_video = bool(is_video)

    def encode(self, images: Tensor, generator: Optional[torch.Generator] = None) -> Tensor:
        return images.float()

    def decode(self, latents: Tensor) -> Tensor:
        return latents.float().clamp(-1.0, 1.0)


def _latent_dist_latents(dist, generator: Optional[torch.Generator]) -> Tensor:
    # the posterior mean is the deterministic choice; sample only when a generator is given
    return dist.mode() if generator is None else dist.sample(generator)


class ImageVAECodec(LatentCodec):
    """``AutoencoderKL`` with the pipelines' latent normalisation (see module docstring)."""

    def __init__(self, vae: nn.Module) -> None:
        super().__init__()
        cfg = vae.config
        self.vae = vae
        self.scale_factor = 2 ** (len(cfg.block_out_channels) - 1)
        self.latent_channels = int(cfg.latent_channels)
        self.scaling_factor = float(cfg.scaling_factor)
        self.shift_factor = float(getattr(cfg, "shift_factor", None) or 0.0)
        mean, std = getattr(cfg, "latents_mean", None), getattr(cfg, "latents_std", None)
        self._mean = _channel_vector(mean, self.latent_channels, 4) if mean is not None and std is not None else None
        self._std = _channel_vector(std, self.latent_channels, 4) if mean is not None and std is not None else None

    def _stats(self, like: Tensor) -> tuple[Tensor | float, Tensor | float]:
        if self._mean is None:
            return self.shift_factor, 1.0
        return self._mean.to(like.device), self._std.to(like.device)

    def encode(self, images: Tensor, generator: Optional[torch.Generator] = None) -> Tensor:
        if images.ndim != 4:
            raise ValueError(f"images must be (B, 3, H, W), got {tuple(images.shape)}")
        for v in images.shape[-2:]:
            if v % self.scale_factor:
                raise SizeError(f"image side {v} px is not a multiple of the VAE factor {self.scale_factor}")
        z = _latent_dist_latents(self.vae.encode(images.to(self.dtype)).latent_dist, generator).float()
        mean, std = self._stats(z)
        return (z - mean) * self.scaling_factor / std

    def decode(self, latents: Tensor) -> Tensor:
        mean, std = self._stats(latents)
        z = latents.float() * std / self.scaling_factor + mean
        return self.vae.decode(z.to(self.dtype), return_dict=False)[0].float().clamp(-1.0, 1.0)


class WanVAECodec(LatentCodec):
    """``AutoencoderKLWan`` (causal video VAE): F = 1 + k * temporal_factor frames <-> 1 + k latents."""

    is_video = True

    def __init__(self, vae: nn.Module) -> None:
        super().__init__()
        cfg = vae.config
        self.vae = vae
        self.latent_channels = int(cfg.z_dim)
        self.scale_factor = int(getattr(cfg, "scale_factor_spatial", None) or 2 ** len(cfg.temperal_downsample))
        self.temporal_factor = int(getattr(cfg, "scale_factor_temporal", None) or 2 ** sum(cfg.temperal_downsample))
        self._mean = _channel_vector(cfg.latents_mean, self.latent_channels, 5)
        self._std = _channel_vector(cfg.latents_std, self.latent_channels, 5)

    def encode(self, images: Tensor, generator: Optional[torch.Generator] = None) -> Tensor:
        if images.ndim != 5:
            raise ValueError(f"video must be (B, 3, F, H, W), got {tuple(images.shape)}")
        frames = images.shape[2]
        if (frames - 1) % self.temporal_factor:
            raise SizeError(f"{frames} frames is not {self.temporal_factor}k+1; the causal VAE needs 1 + "
                            f"{self.temporal_factor}k frames")
        for v in images.shape[-2:]:
            if v % self.scale_factor:
                raise SizeError(f"frame side {v} px is not a multiple of the VAE factor {self.scale_factor}")
        z = _latent_dist_latents(self.vae.encode(images.to(self.dtype)).latent_dist, generator).float()
        return (z - self._mean.to(z.device)) / self._std.to(z.device)

    def decode(self, latents: Tensor) -> Tensor:
        z = latents.float() * self._std.to(latents.device) + self._mean.to(latents.device)
        return self.vae.decode(z.to(self.dtype), return_dict=False)[0].float().clamp(-1.0, 1.0)


def _channel_vector(values: Sequence[float], channels: int, ndim: int) -> Tensor:
    v = torch.as_tensor(list(values), dtype=torch.float32)
    if v.numel() != channels:
        raise ValueError(f"expected {channels} per-channel latent statistics, got {v.numel()}")
    return v.view(1, channels, *([1] * (ndim - 2)))


def codec_from_vae(vae: Optional[nn.Module]) -> LatentCodec:
    """Pick the codec for a diffusers VAE; ``None`` gives the pixel-space identity."""
    if vae is None:
        return PixelCodec()
    from diffusers import AutoencoderKL, AutoencoderKLWan

    if isinstance(vae, AutoencoderKLWan):
        return WanVAECodec(vae)
    if isinstance(vae, AutoencoderKL):
        return ImageVAECodec(vae)
    raise TypeError(f"no codec for {type(vae).__name__}; supported: AutoencoderKL, AutoencoderKLWan, None (pixels)")


__all__ = ["ImageVAECodec", "LatentCodec", "PixelCodec", "WanVAECodec", "codec_from_vae"]
