"""Tiny, seeded, randomly initialised instances of the real diffusers classes, for tests.

Each builder returns a :class:`TinyBundle`: the denoiser adapter (wrapping the real
diffusers backbone), a matching latent codec (a real tiny ``AutoencoderKL`` /
``AutoencoderKLWan``), the scheduler config, a batch-1 ``uncond`` and
``make_cond(batch, seed)``. A forward pass takes milliseconds on CPU. Same seed, same
weights; building does not disturb the global RNG.

Size constraints (every family uses a VAE factor of 8):

- ``tiny_sdxl``   UNet2DConditionModel: pixel sides multiples of 8 (32, 64, 32x64 tested).
- ``tiny_pixart`` PixArtTransformer2DModel: multiples of 16 (VAE 8 x patch 2).
- ``tiny_sd3``    SD3Transformer2DModel: multiples of 16, at most 128 (pos_embed_max_size 8).
- ``tiny_wan``    WanTransformer3DModel: multiples of 16, at most 128 (rope_max_seq_len 8);
  pixel frames 4k+1, at most 29 (1, 5, 9 tested).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional, Sequence

import torch
from torch import nn

from .denoisers import Conditioning, Denoiser, PixArtDenoiser, SD3Denoiser, SDXLDenoiser, WanDenoiser
from .denoisers import vp_schedule_from_config
from .vae import ImageVAECodec, LatentCodec, WanVAECodec

UNCOND_SEED = 2**31 - 1  # the "empty prompt": a fixed draw no make_cond seed range is likely to hit


@dataclass
class TinyBundle:
    """A tiny backbone with everything needed to sample from it.

    ``make_cond(batch, seed)`` draws row i from its own generator seeded with ``seed + i``
    (or ``seeds[i]``), so rows do not depend on the batch size (CONVENTIONS: per-image seeds).
    """

    name: str
    denoiser: Denoiser
    codec: LatentCodec
    scheduler_config: dict[str, Any]
    seq_len: int  # prompt tokens per make_cond row
    embed_dim: int
    pooled_dim: Optional[int] = None
    masked: bool = False  # make_cond gives masks (random prompt lengths)
    uncond_len: Optional[int] = None  # token count of the uncond (default seq_len)
    uncond: Optional[Conditioning] = None  # batch 1; drawn from UNCOND_SEED when not given
    sizes: tuple[int, ...] = (32, 64)  # pixel sides known to work
    frames: tuple[Optional[int], ...] = (None,)  # pixel frame counts known to work (video)
    guidance: float = 3.0  # a CFG scale for tests

    def __post_init__(self) -> None:
        if self.uncond is None:
            self.uncond = self.make_cond(1, UNCOND_SEED, seq_len=self.uncond_len)

    @property
    def model(self) -> nn.Module:
        return self.denoiser.model

    def make_cond(self, batch: int, seed: int = 0, *, seeds: Optional[Sequence[int]] = None,
                  seq_len: Optional[int] = None) -> Conditioning:
        seeds = list(seeds) if seeds is not None else [seed + i for i in range(batch)]
        if len(seeds) != batch:
            raise ValueError(f"{len(seeds)} seeds for a batch of {batch}")
        return Conditioning.cat([self._one_cond(s, seq_len or self.seq_len) for s in seeds])

    def _one_cond(self, seed: int, length: int) -> Conditioning:
        g = torch.Generator().manual_seed(seed)
        embeds = torch.randn(1, length, self.embed_dim, generator=g)
        pooled = torch.randn(1, self.pooled_dim, generator=g) if self.pooled_dim else None
        mask = None
        if self.masked:
            keep = int(torch.randint(max(1, length // 2), length + 1, (1,), generator=g))
            mask = (torch.arange(length) < keep).float()[None]
        return Conditioning(embeds, pooled, mask)


def _seeded(seed: int, build):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        module = build()
    return module.eval()


def _tiny_autoencoder_kl(seed: int, **overrides: Any) -> nn.Module:
    from diffusers import AutoencoderKL

    cfg = dict(
        block_out_channels=(8, 8, 8, 8),  # four levels -> scale factor 8, as in SD
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=4,
        sample_size=32,
        scaling_factor=0.13025,  # SDXL's
    )
    cfg.update(overrides)
    return _seeded(seed, lambda: AutoencoderKL(**cfg))


def tiny_sdxl(seed: int = 0, prediction_type: str = "epsilon") -> TinyBundle:
    """SDXL-style UNet (text_time added conditioning), eps (or v) prediction, VP schedule of SDXL.

    Any multiple of 8 px works (the UNet forwards upsample sizes for odd latent sides).
    """
    from diffusers import UNet2DConditionModel

    embed_dim, pooled_dim, time_dim = 32, 16, 4
    unet = _seeded(seed, lambda: UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        block_out_channels=(16, 32),
        layers_per_block=1,
        norm_num_groups=8,
        attention_head_dim=(2, 4),
        transformer_layers_per_block=1,
        cross_attention_dim=embed_dim,
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=time_dim,
        projection_class_embeddings_input_dim=pooled_dim + 6 * time_dim,
    ))
    sched = {"_class_name": "EulerDiscreteScheduler", "beta_schedule": "scaled_linear", "beta_start": 0.00085,
             "beta_end": 0.012, "num_train_timesteps": 1000, "prediction_type": prediction_type,
             "timestep_spacing": "leading", "steps_offset": 1}
    ac, pred = vp_schedule_from_config(sched)
    den = SDXLDenoiser(unet, ac, pred, vae_scale_factor=8)
    return TinyBundle("sdxl", den, ImageVAECodec(_tiny_autoencoder_kl(seed + 1)), sched, seq_len=8,
                      embed_dim=embed_dim, pooled_dim=pooled_dim, guidance=5.0)


def tiny_pixart(seed: int = 0, use_additional_conditions: bool = False) -> TinyBundle:
    """PixArt-Sigma-style transformer: eps prediction with learned sigma (8 output channels),
    text mask, linear VP schedule. Pixel sides: multiples of 16 (VAE 8 x patch 2).

    ``use_additional_conditions=True`` gives the PixArt-alpha variant that embeds the
    resolution and aspect ratio. ``make_cond`` draws masks (random prompt lengths) and the
    uncond is shorter than the prompts, as real negative prompts are, so CFG pads it.
    """
    from diffusers import PixArtTransformer2DModel

    embed_dim = 32
    model = _seeded(seed, lambda: PixArtTransformer2DModel(
        sample_size=8,
        num_layers=2,
        patch_size=2,
        attention_head_dim=8,
        num_attention_heads=3,  # inner dim 24: divisible by 3 for the size embeddings
        caption_channels=embed_dim,
        in_channels=4,
        out_channels=8,
        cross_attention_dim=24,
        norm_num_groups=1,
        use_additional_conditions=use_additional_conditions,
    ))
    sched = {"_class_name": "DPMSolverMultistepScheduler", "beta_schedule": "linear", "beta_start": 0.0001,
             "beta_end": 0.02, "num_train_timesteps": 1000, "prediction_type": "epsilon"}
    ac, pred = vp_schedule_from_config(sched)
    den = PixArtDenoiser(model, ac, pred, vae_scale_factor=8)
    return TinyBundle("pixart", den, ImageVAECodec(_tiny_autoencoder_kl(seed + 1)), sched, seq_len=10,
                      embed_dim=embed_dim, masked=True, uncond_len=6, guidance=3.5)


def tiny_sd3(seed: int = 0) -> TinyBundle:
    """SD3.5-style MMDiT, rectified flow, flow shift 3 in its scheduler config.

    Pixel sides: multiples of 16 up to 128 (pos_embed_max_size 8 patches x patch 2 x VAE 8).
    The VAE has SD3's scaling and shift factors.
    """
    from diffusers import SD3Transformer2DModel

    embed_dim, pooled_dim = 32, 16
    model = _seeded(seed, lambda: SD3Transformer2DModel(
        sample_size=8,
        patch_size=2,
        in_channels=4,
        out_channels=4,
        num_layers=2,
        attention_head_dim=8,
        num_attention_heads=2,
        joint_attention_dim=embed_dim,
        caption_projection_dim=16,  # = inner dim, as the joint attention requires
        pooled_projection_dim=pooled_dim,
        pos_embed_max_size=8,
    ))
    vae = _tiny_autoencoder_kl(seed + 1, scaling_factor=1.5305, shift_factor=0.0609,
                               use_quant_conv=False, use_post_quant_conv=False)
    sched = {"_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": 1000, "shift": 3.0}
    den = SD3Denoiser(model, vae_scale_factor=8)
    return TinyBundle("sd3", den, ImageVAECodec(vae), sched, seq_len=8, embed_dim=embed_dim, pooled_dim=pooled_dim,
                      guidance=4.5)


def tiny_wan(seed: int = 0) -> TinyBundle:
    """Wan2.1-style video transformer, rectified flow, flow shift 5 in its scheduler config.

    Latents (B, 4, T, h, w). Pixel sides: multiples of 16 up to 128 (rope_max_seq_len 8
    x patch 2 x VAE 8); frames 4k+1 up to 29 (8 latent frames), e.g. 1, 5, 9.
    """
    from diffusers import AutoencoderKLWan, WanTransformer3DModel

    embed_dim = 32
    model = _seeded(seed, lambda: WanTransformer3DModel(
        patch_size=(1, 2, 2),
        num_attention_heads=2,
        attention_head_dim=12,  # rope splits 12 into t/h/w = 4/4/4
        in_channels=4,
        out_channels=4,
        text_dim=embed_dim,
        freq_dim=32,
        ffn_dim=32,
        num_layers=2,
        rope_max_seq_len=8,
    ))
    vae = _seeded(seed + 1, lambda: AutoencoderKLWan(
        base_dim=4,
        z_dim=4,
        dim_mult=[1, 1, 1, 1],
        num_res_blocks=1,
        temperal_downsample=[False, True, True],
        latents_mean=[0.1, -0.2, 0.3, 0.0],
        latents_std=[1.5, 2.0, 0.8, 1.2],
    ))
    sched = {"_class_name": "UniPCMultistepScheduler", "num_train_timesteps": 1000, "flow_shift": 5.0,
             "prediction_type": "flow_prediction", "use_flow_sigmas": True}
    codec = WanVAECodec(vae)
    den = WanDenoiser(model, vae_scale_factor=codec.scale_factor, vae_temporal_factor=codec.temporal_factor)
    return TinyBundle("wan", den, codec, sched, seq_len=8, embed_dim=embed_dim, frames=(1, 5, 9), guidance=5.0)


BUILDERS = {"sdxl": tiny_sdxl, "pixart": tiny_pixart, "sd3": tiny_sd3, "wan": tiny_wan}


def tiny(name: str, seed: int = 0, **kw: Any) -> TinyBundle:
    """``tiny("sdxl")`` etc.; see the builders for the constraints of each."""
    if name not in BUILDERS:
        raise KeyError(f"unknown tiny backbone {name!r}; choose from {sorted(BUILDERS)}")
    return BUILDERS[name](seed, **kw)


__all__ = ["BUILDERS", "TinyBundle", "tiny", "tiny_pixart", "tiny_sd3", "tiny_sdxl", "tiny_wan"]
