"""Denoisers: one k-diffusion-style interface over diffusers backbones (METHOD.md 1, CONVENTIONS).

Every adapter is called as ``x0_hat, eps_hat = denoiser(x, t, cond)`` with ``x`` the
rectified-flow (RF) state

    x = (1 - t) x0 + t eps,   t in [0, 1]                                   (METHOD Eq. 1 frame)

and always returns float32 predictions that satisfy that identity exactly (up to
rounding). Two parameterisation adapters do the frame conversion:

* :class:`FlowDenoiser` -- the model predicts the velocity ``v = eps - x0`` from
  ``(x, 1000 t)``; ``x0 = x - t v``, ``eps = x + (1 - t) v``.
* :class:`VPDenoiser` -- the model was trained on VP states
  ``x_VP = sqrt(a) x0 + sqrt(1 - a) eps`` at discrete ``a = alphas_cumprod[k]``.
  The RF state with the same logSNR is ``x_VP / (sqrt(a) + sqrt(1 - a))``, so the
  input is ``x_VP = vp_scale(t) x`` and the timestep is the (fractional) index ``k``
  whose logSNR equals ``lambda(t)`` (:func:`rmd.schedules.vp_timestep_from_t`).

The backbone adapters (:class:`SDXLDenoiser`, :class:`PixArtDenoiser`,
:class:`SD3Denoiser`, :class:`WanDenoiser`) only know how to call their diffusers
class; :func:`from_model` picks one. :class:`CFGDenoiser` adds classifier-free guidance.
The wrapped network is kept as ``self.model`` so LoRA adapters can be attached to it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Optional, Sequence, Union

import torch
from torch import Tensor, nn

from .schedules import alpha_from_t, t_from_alpha, vp_scale, vp_timestep_from_t

TimeLike = Union[float, Tensor]
SizeLike = Union[int, Sequence[int]]


class SizeError(ValueError):
    """A pixel size / frame count the backbone cannot take; the message names the fix."""


# --- conditioning -------------------------------------------------------------------------


@dataclass
class Conditioning:
    """Text conditioning for a batch.

    ``embeds``: (B, L, D) token embeddings; ``pooled``: optional (B, P) pooled embedding
    (SDXL ``text_embeds``, SD3 ``pooled_projections``); ``mask``: optional (B, L), 1 = keep.
    """

    embeds: Tensor
    pooled: Optional[Tensor] = None
    mask: Optional[Tensor] = None

    def __post_init__(self) -> None:
        if self.embeds.ndim != 3:
            raise ValueError(f"embeds must be (B, L, D), got shape {tuple(self.embeds.shape)}")
        b, l = self.embeds.shape[:2]
        if self.pooled is not None and (self.pooled.ndim != 2 or self.pooled.shape[0] != b):
            raise ValueError(f"pooled must be (B={b}, P), got shape {tuple(self.pooled.shape)}")
        if self.mask is not None and tuple(self.mask.shape) != (b, l):
            raise ValueError(f"mask must be (B={b}, L={l}), got shape {tuple(self.mask.shape)}")

    def __len__(self) -> int:
        return self.embeds.shape[0]

    @property
    def seq_len(self) -> int:
        return self.embeds.shape[1]

    def _map(self, fn) -> "Conditioning":
        return Conditioning(
            fn(self.embeds),
            None if self.pooled is None else fn(self.pooled),
            None if self.mask is None else fn(self.mask),
        )

    def index(self, idx: Union[int, slice, Sequence[int], Tensor]) -> "Conditioning":
        """Sub-batch; an int keeps the batch dimension (``cond.index(2)`` has length 1)."""
        if isinstance(idx, int):
            idx = slice(idx, idx + 1) if idx != -1 else slice(-1, None)
        elif not isinstance(idx, (slice, Tensor)):
            idx = torch.as_tensor(list(idx), dtype=torch.long)
        return self._map(lambda v: v[idx])

    __getitem__ = index

    def to(self, device: Union[str, torch.device, None] = None, dtype: Optional[torch.dtype] = None) -> "Conditioning":
        """Move to ``device``; ``dtype`` applies to embeds/pooled only (the mask keeps its dtype)."""
        return Conditioning(
            self.embeds.to(device=device, dtype=dtype),
            None if self.pooled is None else self.pooled.to(device=device, dtype=dtype),
            None if self.mask is None else self.mask.to(device=device),
        )

    def expand(self, batch: int) -> "Conditioning":
        """Broadcast a batch-1 conditioning to ``batch`` rows (a no-op if already that size)."""
        if len(self) == batch:
            return self
        if len(self) != 1:
            raise ValueError(f"cannot expand a conditioning of batch {len(self)} to {batch}; give batch 1 or {batch}")
        return self._map(lambda v: v.expand(batch, *v.shape[1:]))

    def repeat(self, n: int) -> "Conditioning":
        """Repeat every row ``n`` times in place (row i -> rows i*n .. i*n+n-1), like num_images_per_prompt."""
        return self._map(lambda v: v.repeat_interleave(n, dim=0))

    def pad_to(self, length: int) -> "Conditioning":
        """Zero-pad the token axis to ``length``; the mask marks the padding with 0."""
        b, l, d = self.embeds.shape
        if length < l:
            raise ValueError(f"cannot pad {l} tokens down to {length}")
        mask = self.mask if self.mask is not None else torch.ones(b, l, device=self.embeds.device)
        if length == l:
            return Conditioning(self.embeds, self.pooled, mask)
        embeds = torch.cat([self.embeds, self.embeds.new_zeros(b, length - l, d)], dim=1)
        mask = torch.cat([mask, mask.new_zeros(b, length - l)], dim=1)
        return Conditioning(embeds, self.pooled, mask)

    @classmethod
    def cat(cls, conds: Sequence["Conditioning"]) -> "Conditioning":
        """Concatenate along the batch. Different token counts are zero-padded with a mask."""
        conds = list(conds)
        if not conds:
            raise ValueError("Conditioning.cat needs at least one conditioning")
        if len({c.pooled is None for c in conds}) > 1:
            raise ValueError("cannot concatenate conditionings with and without pooled embeddings")
        length = max(c.seq_len for c in conds)
        if any(c.seq_len != length for c in conds) or len({c.mask is None for c in conds}) > 1:
            conds = [c.pad_to(length) for c in conds]  # every part now carries a mask
        return cls(
            torch.cat([c.embeds for c in conds]),
            None if conds[0].pooled is None else torch.cat([c.pooled for c in conds]),
            None if conds[0].mask is None else torch.cat([c.mask for c in conds]),
        )


# --- the interface ------------------------------------------------------------------------


def _as_size(size: SizeLike) -> tuple[int, int]:
    if isinstance(size, int):
        return size, size
    h, w = (int(v) for v in size)
    return h, w


def _nearest_multiples(n: int, m: int) -> str:
    lo, hi = (n // m) * m, (n // m + 1) * m
    return f"{hi}" if lo <= 0 else f"{lo} or {hi}"


def _bcast(coef: Tensor, ndim: int) -> Tensor:
    """(B,) -> (B, 1, ..., 1) with ``ndim`` dims, float32."""
    return coef.float().view(-1, *([1] * (ndim - 1)))


class Denoiser(nn.Module):
    """Base class: ``forward(x, t, cond) -> (x0_hat, eps_hat)`` in the RF frame.

    Subclasses implement :meth:`run_model` (one call of the wrapped network on its
    native input, returning its raw output) and inherit the size bookkeeping.

    Attributes: ``parameterization`` ("flow" or "eps"; "eps" names the VP family, whose
    ``prediction_type`` may also be "v_prediction" or "sample"), ``latent_channels``,
    ``vae_scale_factor`` (pixels per latent, 1 in pixel space), ``vae_temporal_factor``
    (video: pixel frames per latent frame after the first), ``patch_size`` (spatial) and
    ``temporal_patch_size``, ``is_video``, ``supports_mask`` (the backbone takes a
    text attention mask), ``model`` (the wrapped network).
    """

    parameterization: str = "flow"
    supports_mask: bool = False

    def __init__(
        self,
        model: nn.Module,
        *,
        latent_channels: int,
        vae_scale_factor: int = 1,
        patch_size: int = 1,
        is_video: bool = False,
        vae_temporal_factor: int = 1,
        temporal_patch_size: int = 1,
    ) -> None:
        super().__init__()
        self.model = model
        self.latent_channels = int(latent_channels)
        self.vae_scale_factor = int(vae_scale_factor)
        self.patch_size = int(patch_size)
        self.is_video = bool(is_video)
        self.vae_temporal_factor = int(vae_temporal_factor) if is_video else 1
        self.temporal_patch_size = int(temporal_patch_size) if is_video else 1

    # -- sizes --

    @property
    def model_dtype(self) -> torch.dtype:
        for p in self.model.parameters():
            return p.dtype
        return torch.float32

    def latent_shape(self, size: SizeLike, num_frames: Optional[int] = None) -> tuple[int, ...]:
        """(C, h, w) for images, (C, T, h, w) for video, from pixel size (H, W) and pixel frames.

        Video: ``T = (num_frames - 1) / vae_temporal_factor + 1`` (a causal video VAE keeps
        the first frame on its own); ``num_frames=None`` means one frame.
        """
        self.check_size(size, num_frames)
        h, w = _as_size(size)
        shape = (self.latent_channels, h // self.vae_scale_factor, w // self.vae_scale_factor)
        if not self.is_video:
            return shape
        frames = 1 if num_frames is None else int(num_frames)
        return (shape[0], (frames - 1) // self.vae_temporal_factor + 1, *shape[1:])

    def check_size(self, size: SizeLike, num_frames: Optional[int] = None) -> None:
        """Raise :class:`SizeError` if the backbone cannot take pixel ``size`` (and ``num_frames``).

        diffusers truncates sizes that are not multiples of the patch grid without a
        word; we refuse them instead.
        """
        h, w = _as_size(size)
        if h <= 0 or w <= 0:
            raise SizeError(f"pixel size {h}x{w} must be positive")
        m = self.vae_scale_factor * self.patch_size
        for name, v in (("height", h), ("width", w)):
            if v % m:
                raise SizeError(
                    f"{name} {v} px is not a multiple of {m} (VAE factor {self.vae_scale_factor} x patch "
                    f"{self.patch_size}); diffusers would silently crop it. Use {_nearest_multiples(v, m)} px"
                )
        latent_frames = 1
        if self.is_video:
            frames = 1 if num_frames is None else int(num_frames)
            k = self.vae_temporal_factor
            if frames < 1 or (frames - 1) % k:
                raise SizeError(
                    f"num_frames {frames} is not {k}k+1: the video VAE maps 1 + {k}k frames to 1 + k latent "
                    f"frames. Use {_frames_hint(frames, k)}"
                )
            latent_frames = (frames - 1) // k + 1
            if latent_frames % self.temporal_patch_size:
                raise SizeError(
                    f"num_frames {frames} gives {latent_frames} latent frames, not a multiple of the temporal "
                    f"patch {self.temporal_patch_size}; pick a frame count whose latent count is a multiple of it"
                )
        elif num_frames not in (None, 1):
            raise SizeError(f"{type(self).__name__} is an image model; drop num_frames={num_frames} (or pass 1)")
        self._check_limits(h // m, w // m, latent_frames // self.temporal_patch_size)

    def _check_limits(self, h_patches: int, w_patches: int, t_patches: int) -> None:
        """Backbone-specific limits on the token grid (positional-embedding tables)."""

    def check_latent(self, x: Tensor) -> None:
        """Check a latent batch: rank, channels, and that its implied pixel size is allowed."""
        want = 5 if self.is_video else 4
        if x.ndim != want:
            layout = "(B, C, T, h, w)" if self.is_video else "(B, C, h, w)"
            raise SizeError(f"{type(self).__name__} takes {layout} latents, got shape {tuple(x.shape)}")
        if x.shape[1] != self.latent_channels:
            raise SizeError(f"expected {self.latent_channels} latent channels, got {x.shape[1]} (shape {tuple(x.shape)})")
        f = self.vae_scale_factor
        frames = (x.shape[2] - 1) * self.vae_temporal_factor + 1 if self.is_video else None
        try:
            self.check_size((x.shape[-2] * f, x.shape[-1] * f), frames)
        except SizeError as e:
            raise SizeError(f"latent shape {tuple(x.shape)}: {e}") from None

    # -- calling --

    def _times(self, t: TimeLike, x: Tensor) -> Tensor:
        """Native times as a float64 (B,) tensor on x's device (floats and 0-dim tensors broadcast)."""
        t = torch.as_tensor(t, dtype=torch.float64, device=x.device)
        if t.ndim == 0 or t.numel() == 1:
            t = t.reshape(1).expand(x.shape[0])
        if t.shape != (x.shape[0],):
            raise ValueError(f"t must be a float or a (B={x.shape[0]},) tensor, got shape {tuple(t.shape)}")
        if not torch.compiler.is_compiling() and bool(((t < 0) | (t > 1)).any()):
            raise ValueError(f"native times must lie in [0, 1] (the model timestep is 1000 t), got {t.tolist()}")
        return t

    def run_model(self, x_in: Tensor, timestep: Tensor, cond: Conditioning) -> Tensor:
        """One call of the wrapped network: native input, (B,) float timestep -> raw output.

        The default treats ``model`` as a callable ``model(x, timestep, cond)``; backbone
        adapters override it to speak their diffusers class's forward signature.
        """
        return self.model(x_in, timestep, cond)

    def forward(self, x: Tensor, t: TimeLike, cond: Conditioning) -> tuple[Tensor, Tensor]:
        raise NotImplementedError


def _frames_hint(frames: int, k: int) -> str:
    lo = max(1, (frames - 1) // k * k + 1)
    hi = ((frames - 1) // k + 1) * k + 1
    return f"{lo} or {hi}" if lo != hi and lo < frames else f"{hi}"


class FlowDenoiser(Denoiser):
    """Rectified-flow (velocity) parameterisation, METHOD 1.

    The model sees ``(x, 1000 t)`` and predicts ``v = eps - x0``; then
    ``x0 = x - t v`` and ``eps = x + (1 - t) v``, so ``(1 - t) x0 + t eps = x`` holds
    for every t including 0 and 1.
    """

    parameterization = "flow"

    def forward(self, x: Tensor, t: TimeLike, cond: Conditioning) -> tuple[Tensor, Tensor]:
        self.check_latent(x)
        t64 = self._times(t, x)
        cond = cond.to(device=x.device, dtype=self.model_dtype)
        v = self.run_model(x.to(self.model_dtype), (1000.0 * t64).float(), cond).float()
        v = v[:, : self.latent_channels]
        x32, tb = x.float(), _bcast(t64, x.ndim)
        return x32 - tb * v, x32 + (1 - tb) * v


class VPDenoiser(Denoiser):
    """Variance-preserving parameterisation (epsilon / v / sample prediction), METHOD 1.

    At equal logSNR the VP state is ``x_VP = vp_scale(t) x`` with ``a = alpha_from_t(t)``,
    and the model timestep is the fractional index ``k`` with ``lambda(a_k) = lambda(t)``
    (exact at integer k). With the model output ``o``:

        epsilon:       eps = o,                        x0 = (x_VP - sqrt(1-a) eps) / sqrt(a)
        v_prediction:  x0 = sqrt(a) x_VP - sqrt(1-a) o, eps = sqrt(1-a) x_VP + sqrt(a) o
        sample:        x0 = o,                         eps = (x_VP - sqrt(a) x0) / sqrt(1-a)

    Clamping: a VP model was never trained beyond ``alphas_cumprod[-1]`` (nor before
    ``[0]``), so the time used for the timestep and for ``a`` is clamped into
    ``[t_min, t_max] = [t_from_alpha(a[0]), t_from_alpha(a[-1])]``. The input is still
    scaled with the true t (``vp_scale(t) x`` has the unit variance the model saw; at
    t = 1 it is the pure noise a diffusers pipeline feeds at its first step). The two
    predictions are then made consistent with the true t by keeping the one the state
    constrains least and solving ``x = (1 - t) x0 + t eps`` for the other:
    for t >= 1/2 keep x0 and set ``eps = (x - (1 - t) x0) / t``; for t < 1/2 keep eps and
    set ``x0 = (x - t eps) / (1 - t)``. Inside [t_min, t_max] this changes nothing (the
    pair already satisfies the identity); it only divides by coefficients >= 1/2.
    """

    parameterization = "eps"

    def __init__(self, model: nn.Module, alphas_cumprod: Tensor, prediction_type: str = "epsilon", **kw: Any) -> None:
        super().__init__(model, **kw)
        if prediction_type not in ("epsilon", "v_prediction", "sample"):
            raise ValueError(f"prediction_type {prediction_type!r} not supported; use epsilon, v_prediction or sample")
        a = torch.as_tensor(alphas_cumprod).detach().to("cpu", torch.float64).clone()
        if a.ndim != 1 or a.numel() < 2 or bool((a[:-1] <= 0).any() or (a > 1).any() or a[-1] < 0):
            raise ValueError("alphas_cumprod must be a 1-D schedule in (0, 1] (the last entry may be 0)")
        if a[-1] <= 0:
            # zero-terminal-SNR schedules: diffusers' DDIM/Euler schedulers use 2**-24 for the same reason
            a[-1] = 2.0**-24
        # kept out of the module's buffers so that .to(dtype) never rounds the schedule
        self._alphas_cumprod = a
        self.prediction_type = prediction_type
        self.t_min = float(t_from_alpha(a[0]))
        self.t_max = float(t_from_alpha(a[-1]))

    @property
    def alphas_cumprod(self) -> Tensor:
        return self._alphas_cumprod

    def forward(self, x: Tensor, t: TimeLike, cond: Conditioning) -> tuple[Tensor, Tensor]:
        self.check_latent(x)
        t64 = self._times(t, x)
        tc = t64.clamp(self.t_min, self.t_max)
        timestep = vp_timestep_from_t(tc, self._alphas_cumprod.to(x.device)).float()
        a = alpha_from_t(tc)
        sa, s1a = _bcast(a.sqrt(), x.ndim), _bcast((1 - a).sqrt(), x.ndim)

        x32 = x.float()
        x_vp = _bcast(vp_scale(t64), x.ndim) * x32
        cond = cond.to(device=x.device, dtype=self.model_dtype)
        out = self.run_model(x_vp.to(self.model_dtype), timestep, cond).float()
        # learned-variance models (PixArt, DeepFloyd) output [prediction, variance]: keep the prediction
        out = out[:, : self.latent_channels]

        if self.prediction_type == "epsilon":
            eps_m, x0_m = out, (x_vp - s1a * out) / sa
        elif self.prediction_type == "v_prediction":
            x0_m, eps_m = sa * x_vp - s1a * out, s1a * x_vp + sa * out
        else:
            x0_m, eps_m = out, (x_vp - sa * out) / s1a

        hi = _bcast(t64 >= 0.5, x.ndim).bool()
        tb = _bcast(t64, x.ndim)
        # safe denominators: torch.where would otherwise back-propagate NaN from the unused branch
        t_den = torch.where(hi, tb, torch.ones_like(tb))
        s_den = torch.where(hi, torch.ones_like(tb), 1 - tb)
        x0 = torch.where(hi, x0_m, (x32 - tb * eps_m) / s_den)
        eps = torch.where(hi, (x32 - (1 - tb) * x0_m) / t_den, eps_m)
        return x0, eps


# --- backbone adapters --------------------------------------------------------------------


class SDXLDenoiser(VPDenoiser):
    """``UNet2DConditionModel`` (SDXL; also SD 1.x/2.x UNets without added conditioning).

    SDXL's added conditioning (``addition_embed_type == "text_time"``):
    ``text_embeds = cond.pooled`` and ``time_ids = (orig_h, orig_w, crop_top, crop_left,
    target_h, target_w)`` = ``(H, W, 0, 0, H, W)`` for the CURRENT pixel size
    ``H = h * vae_scale_factor`` -- a low-resolution stage is told it renders a
    low-resolution image, as the SDXL pipeline does for its default sizes.
    The UNet takes ``encoder_attention_mask``, so ``cond.mask`` is passed through.
    """

    supports_mask = True
    default_scheduler_config = {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012,
                                "num_train_timesteps": 1000, "prediction_type": "epsilon"}

    def __init__(self, model: nn.Module, alphas_cumprod: Tensor, prediction_type: str = "epsilon",
                 vae_scale_factor: int = 8) -> None:
        # UNets accept any size and forward upsample sizes for odd ones, so the patch is 1.
        super().__init__(model, alphas_cumprod, prediction_type, latent_channels=model.config.in_channels,
                         vae_scale_factor=vae_scale_factor, patch_size=1)

    def added_cond_kwargs(self, x: Tensor, cond: Conditioning) -> Optional[dict[str, Tensor]]:
        if self.model.config.addition_embed_type != "text_time":
            return None
        if cond.pooled is None:
            raise ValueError("SDXL needs cond.pooled (the pooled text embedding used as added text_embeds)")
        h, w = x.shape[-2] * self.vae_scale_factor, x.shape[-1] * self.vae_scale_factor
        time_ids = torch.tensor([h, w, 0, 0, h, w], dtype=cond.pooled.dtype, device=x.device)
        return {"text_embeds": cond.pooled, "time_ids": time_ids.expand(x.shape[0], 6)}

    def run_model(self, x_in: Tensor, timestep: Tensor, cond: Conditioning) -> Tensor:
        return self.model(
            x_in,
            timestep,
            encoder_hidden_states=cond.embeds,
            added_cond_kwargs=self.added_cond_kwargs(x_in, cond),
            encoder_attention_mask=cond.mask,
            return_dict=False,
        )[0]


class PixArtDenoiser(VPDenoiser):
    """``PixArtTransformer2DModel`` (PixArt-alpha / -Sigma), epsilon prediction.

    The model learns sigma and outputs 2C channels; only the first C (eps) are kept.
    ``cond.mask`` goes to ``encoder_attention_mask``. When the model uses additional
    conditions (``model.use_additional_conditions``, resolved by diffusers from the config
    and sample_size), ``resolution = (H, W)`` and ``aspect_ratio = H / W`` of the current
    pixel size are passed, as in the PixArt-alpha pipeline; otherwise None.
    """

    supports_mask = True
    default_scheduler_config = {"beta_schedule": "linear", "beta_start": 0.0001, "beta_end": 0.02,
                                "num_train_timesteps": 1000, "prediction_type": "epsilon"}

    def __init__(self, model: nn.Module, alphas_cumprod: Tensor, prediction_type: str = "epsilon",
                 vae_scale_factor: int = 8) -> None:
        super().__init__(model, alphas_cumprod, prediction_type, latent_channels=model.config.in_channels,
                         vae_scale_factor=vae_scale_factor, patch_size=model.config.patch_size)

    def added_cond_kwargs(self, x: Tensor) -> Optional[dict[str, Tensor]]:
        if not getattr(self.model, "use_additional_conditions", False):
            return None
        b = x.shape[0]
        h, w = x.shape[-2] * self.vae_scale_factor, x.shape[-1] * self.vae_scale_factor
        resolution = torch.tensor([h, w], dtype=x.dtype, device=x.device).expand(b, 2)
        aspect_ratio = torch.tensor([h / w], dtype=x.dtype, device=x.device).expand(b, 1)
        return {"resolution": resolution, "aspect_ratio": aspect_ratio}

    def run_model(self, x_in: Tensor, timestep: Tensor, cond: Conditioning) -> Tensor:
        return self.model(
            x_in,
            encoder_hidden_states=cond.embeds,
            timestep=timestep,
            added_cond_kwargs=self.added_cond_kwargs(x_in),
            encoder_attention_mask=cond.mask,
            return_dict=False,
        )[0]


class SD3Denoiser(FlowDenoiser):
    """``SD3Transformer2DModel`` (SD3 / SD3.5), rectified flow; ``pooled_projections = cond.pooled``.

    SD3 attends to every text token (it was trained on padded CLIP+T5 sequences without a
    mask), so ``cond.mask`` is ignored. Its positional table covers at most
    ``pos_embed_max_size`` patches per side; larger sizes are refused.
    """

    def __init__(self, model: nn.Module, vae_scale_factor: int = 8) -> None:
        super().__init__(model, latent_channels=model.config.in_channels, vae_scale_factor=vae_scale_factor,
                         patch_size=model.config.patch_size)

    def _check_limits(self, h_patches: int, w_patches: int, t_patches: int) -> None:
        limit = self.model.config.pos_embed_max_size
        if limit and max(h_patches, w_patches) > limit:
            side = limit * self.patch_size * self.vae_scale_factor
            raise SizeError(
                f"{h_patches}x{w_patches} patches exceed the SD3 pos_embed_max_size {limit}: the largest side this "
                f"transformer takes is {side} px; generate at <= {side} px per side"
            )

    def run_model(self, x_in: Tensor, timestep: Tensor, cond: Conditioning) -> Tensor:
        if cond.pooled is None:
            raise ValueError("SD3 needs cond.pooled (pooled_projections)")
        return self.model(
            hidden_states=x_in,
            encoder_hidden_states=cond.embeds,
            pooled_projections=cond.pooled,
            timestep=timestep,
            return_dict=False,
        )[0]


class WanDenoiser(FlowDenoiser):
    """``WanTransformer3DModel`` (Wan2.1 text-to-video), rectified flow, latents (B, C, T, h, w).

    Frame counts must be ``vae_temporal_factor * k + 1``. The rotary table holds
    ``rope_max_seq_len`` positions per axis (latent frames / patch, h / patch, w / patch);
    larger grids are refused. Wan takes no text mask: its pipeline zeroes the embeddings
    past each prompt's length, so a given ``cond.mask`` is applied the same way.
    """

    def __init__(self, model: nn.Module, vae_scale_factor: int = 8, vae_temporal_factor: int = 4) -> None:
        cfg = model.config
        if cfg.in_channels != cfg.out_channels:
            raise ValueError("image-to-video Wan (in_channels != out_channels) is not supported; use a T2V model")
        p_t, p_h, p_w = cfg.patch_size
        if p_h != p_w:
            raise ValueError(f"non-square spatial patch {cfg.patch_size} is not supported")
        super().__init__(model, latent_channels=cfg.in_channels, vae_scale_factor=vae_scale_factor, patch_size=p_h,
                         is_video=True, vae_temporal_factor=vae_temporal_factor, temporal_patch_size=p_t)

    def _check_limits(self, h_patches: int, w_patches: int, t_patches: int) -> None:
        limit = self.model.config.rope_max_seq_len
        if max(h_patches, w_patches) > limit:
            side = limit * self.patch_size * self.vae_scale_factor
            raise SizeError(
                f"{h_patches}x{w_patches} patches exceed the Wan rope_max_seq_len {limit}: the largest side this "
                f"transformer takes is {side} px; generate at <= {side} px per side"
            )
        if t_patches > limit:
            frames = (limit * self.temporal_patch_size - 1) * self.vae_temporal_factor + 1
            raise SizeError(
                f"{t_patches} latent frame patches exceed the Wan rope_max_seq_len {limit}: use at most {frames} frames"
            )

    def run_model(self, x_in: Tensor, timestep: Tensor, cond: Conditioning) -> Tensor:
        embeds = cond.embeds if cond.mask is None else cond.embeds * cond.mask[..., None].to(cond.embeds.dtype)
        return self.model(hidden_states=x_in, timestep=timestep, encoder_hidden_states=embeds, return_dict=False)[0]


# --- factory ------------------------------------------------------------------------------

_VP_KEYS = ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "trained_betas", "rescale_betas_zero_snr")


def vp_schedule_from_config(config: Union[Mapping[str, Any], Any]) -> tuple[Tensor, str]:
    """(alphas_cumprod float64, prediction_type) from a DDPM/DDIM/EulerDiscrete-style scheduler config.

    ``alphas_cumprod`` comes from ``DDPMScheduler.from_config`` so it matches diffusers
    bit for bit (its float32 betas and cumprod included).
    """
    from diffusers import DDPMScheduler

    cfg = dict(getattr(config, "config", config))
    name = str(cfg.get("_class_name", ""))
    if name.startswith("FlowMatch"):
        raise ValueError(f"{name} is a flow-matching scheduler; a VP backbone needs a DDPM/DDIM/Euler config")
    sched = DDPMScheduler.from_config({k: cfg[k] for k in _VP_KEYS if k in cfg})
    return sched.alphas_cumprod.double(), str(cfg.get("prediction_type", "epsilon"))


def from_model(
    model: nn.Module,
    scheduler_config: Union[Mapping[str, Any], Any, None] = None,
    *,
    vae_scale_factor: int = 8,
    vae_temporal_factor: int = 4,
    prediction_type: Optional[str] = None,
) -> Denoiser:
    """Wrap a diffusers backbone in its adapter.

    ``scheduler_config`` (a dict, a diffusers config or a scheduler) supplies
    ``alphas_cumprod`` and ``prediction_type`` for VP backbones; without it the family
    default is used (SDXL: scaled_linear 0.00085..0.012; PixArt: linear 0.0001..0.02).
    ``prediction_type`` overrides the config's. Flow backbones ignore the config.
    """
    from diffusers import PixArtTransformer2DModel, SD3Transformer2DModel, UNet2DConditionModel, WanTransformer3DModel

    if isinstance(model, SD3Transformer2DModel):
        return SD3Denoiser(model, vae_scale_factor=vae_scale_factor)
    if isinstance(model, WanTransformer3DModel):
        return WanDenoiser(model, vae_scale_factor=vae_scale_factor, vae_temporal_factor=vae_temporal_factor)
    vp_cls = {UNet2DConditionModel: SDXLDenoiser, PixArtTransformer2DModel: PixArtDenoiser}
    for cls, adapter in vp_cls.items():
        if isinstance(model, cls):
            ac, pred = vp_schedule_from_config(scheduler_config or adapter.default_scheduler_config)
            return adapter(model, ac, prediction_type or pred, vae_scale_factor=vae_scale_factor)
    raise TypeError(
        f"no denoiser adapter for {type(model).__name__}; supported: UNet2DConditionModel, "
        "PixArtTransformer2DModel, SD3Transformer2DModel, WanTransformer3DModel "
        "(or subclass FlowDenoiser / VPDenoiser and implement run_model)"
    )


# --- classifier-free guidance -------------------------------------------------------------


class CFGDenoiser(nn.Module):
    """Classifier-free guidance: ``out = out_u + w (out_c - out_u)`` for both x0 and eps.

    Guiding (x0, eps) equals guiding the raw model output: at fixed (x, t) both are
    affine in the output with the same coefficients for the two passes, and the weights
    ``(1 - w) + w = 1`` sum to one, so the guided pair still satisfies
    ``x = (1 - t) x0 + t eps``.

    The cond and uncond passes run as one batch of 2B. ``uncond`` may have batch 1
    (expanded) or B. If the token counts differ, the shorter one is zero-padded with a
    mask when the backbone takes a mask; otherwise the two passes run separately.
    ``scale == 1`` skips the uncond pass. ``scale`` may be a float or a (B,) tensor.
    Attributes and methods not defined here (``latent_shape``, ``check_size``, ``model``,
    ``vae_scale_factor``, ...) are those of the wrapped denoiser.
    """

    def __init__(self, denoiser: Denoiser, uncond: Conditioning, scale: Union[float, Tensor]) -> None:
        super().__init__()
        self.denoiser = denoiser
        self.uncond = uncond
        self.scale = scale

    def __getattr__(self, name: str) -> Any:
        # everything else (model, latent_shape, check_size, vae_scale_factor, ...) is the wrapped denoiser's
        try:
            return super().__getattr__(name)
        except AttributeError:
            inner = self.__dict__.get("_modules", {}).get("denoiser")
            if inner is None:
                raise
            return getattr(inner, name)

    def forward(self, x: Tensor, t: TimeLike, cond: Conditioning,
                scale: Union[float, Tensor, None] = None) -> tuple[Tensor, Tensor]:
        w = self.scale if scale is None else scale
        if not isinstance(w, Tensor) and float(w) == 1.0:
            return self.denoiser(x, t, cond)
        b = x.shape[0]
        t = self.denoiser._times(t, x)
        uncond = self.uncond.to(device=cond.embeds.device).expand(b)
        if uncond.seq_len != cond.seq_len and not self.denoiser.supports_mask:
            x0_u, eps_u = self.denoiser(x, t, uncond)
            x0_c, eps_c = self.denoiser(x, t, cond)
        else:
            both = Conditioning.cat([uncond, cond])
            x0, eps = self.denoiser(torch.cat([x, x]), torch.cat([t, t]), both)
            (x0_u, x0_c), (eps_u, eps_c) = x0.chunk(2), eps.chunk(2)
        w = torch.as_tensor(w, dtype=torch.float32, device=x.device)
        w = w.view(-1, *([1] * (x.ndim - 1))) if w.ndim else w
        return x0_u + w * (x0_c - x0_u), eps_u + w * (eps_c - eps_u)


__all__ = [
    "CFGDenoiser",
    "Conditioning",
    "Denoiser",
    "FlowDenoiser",
    "PixArtDenoiser",
    "SD3Denoiser",
    "SDXLDenoiser",
    "SizeError",
    "VPDenoiser",
    "WanDenoiser",
    "from_model",
    "vp_schedule_from_config",
]

