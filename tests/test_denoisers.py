"""Denoiser adapters, CFG, codecs and size checks against closed forms and diffusers itself.

The tiny models are the real diffusers classes with random weights (rmd.tiny); the
references call them the way the diffusers pipelines do, never through our adapters.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import math

import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler, FlowMatchEulerDiscreteScheduler

from rmd.denoisers import (
    CFGDenoiser,
    Conditioning,
    PixArtDenoiser,
    SD3Denoiser,
    SDXLDenoiser,
    SizeError,
    WanDenoiser,
    from_model,
    vp_schedule_from_config,
)
from rmd.schedules import t_from_alpha
from rmd.tiny import tiny_pixart, tiny_sd3, tiny_sdxl, tiny_wan
from rmd.vae import ImageVAECodec, PixelCodec, WanVAECodec, codec_from_vae


@functools.lru_cache(maxsize=None)
def get(name: str):
    return {
        "sdxl": lambda: tiny_sdxl(),
        "sdxl_v": lambda: tiny_sdxl(prediction_type="v_prediction"),
        "pixart": lambda: tiny_pixart(),
        "pixart_ac": lambda: tiny_pixart(use_additional_conditions=True),
        "sd3": lambda: tiny_sd3(),
        "wan": lambda: tiny_wan(),
    }[name]()


def latents(bundle, batch: int, size=32, frames=None, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    if bundle.denoiser.is_video and frames is None:
        frames = 5
    return torch.randn(batch, *bundle.denoiser.latent_shape(size, frames), generator=g)


def rf(t: torch.Tensor, ndim: int) -> torch.Tensor:
    return t.float().view(-1, *([1] * (ndim - 1)))


@contextlib.contextmanager
def capture(model: torch.nn.Module):
    """Record (args, kwargs) of every forward call of ``model``."""
    calls: list[tuple[tuple, dict]] = []
    handle = model.register_forward_pre_hook(lambda m, a, k: calls.append((a, k)), with_kwargs=True)
    try:
        yield calls
    finally:
        handle.remove()


def close(a: torch.Tensor, b: torch.Tensor, rel: float = 1e-4) -> bool:
    """Agreement to ``rel`` of the larger tensor's scale (outputs of random nets vary in size)."""
    scale = max(a.abs().max().item(), b.abs().max().item(), 1.0)
    return (a - b).abs().max().item() <= rel * scale


# --- the RF identity ----------------------------------------------------------------------

TIMES = [1.0, 0.999, 0.97, 0.75, 0.5, 0.3, 0.01, 0.0]  # 0.97 / 0.01 lie outside SDXL's VP range


@pytest.mark.parametrize("name", ["sdxl", "sdxl_v", "pixart", "sd3", "wan"])
def test_predictions_reconstruct_the_state(name):
    b = get(name)
    den = b.denoiser
    x = latents(b, len(TIMES))
    t = torch.tensor(TIMES)
    cond = b.make_cond(len(TIMES))
    with torch.no_grad():
        x0, eps = den(x, t, cond)
    assert x0.dtype == eps.dtype == torch.float32 and x0.shape == eps.shape == x.shape
    assert close((1 - rf(t, x.ndim)) * x0 + rf(t, x.ndim) * eps, x, 1e-5)
    # not trivially so: the predictions are not the input itself
    assert (x0[:-1] - x[:-1]).abs().max() > 1e-2 and (eps[1:] - x[1:]).abs().max() > 1e-2
    # per-sample times: each row equals a batch-1 call with a python-float time
    for i in (0, 3, 6):
        with torch.no_grad():
            x0_i, eps_i = den(x[i : i + 1], TIMES[i], cond.index(i))
        assert close(x0_i, x0[i : i + 1]) and close(eps_i, eps[i : i + 1])


# --- VP conversion against diffusers' DDIM ------------------------------------------------


def _pipeline_style_call(name: str, model, x_vp, k: int, cond: Conditioning, size: int) -> torch.Tensor:
    """The raw model output as the diffusers SDXL / PixArt-Sigma pipelines obtain it."""
    ts = torch.tensor([k] * x_vp.shape[0])
    if name.startswith("sdxl"):
        time_ids = torch.tensor([[size, size, 0, 0, size, size]], dtype=torch.float32).repeat(x_vp.shape[0], 1)
        return model(x_vp, ts, encoder_hidden_states=cond.embeds,
                     added_cond_kwargs={"text_embeds": cond.pooled, "time_ids": time_ids}).sample
    out = model(x_vp, encoder_hidden_states=cond.embeds, encoder_attention_mask=cond.mask, timestep=ts,
                added_cond_kwargs={"resolution": None, "aspect_ratio": None}).sample
    return out.chunk(2, dim=1)[0]  # learned sigma, as the pipeline drops it


@pytest.mark.parametrize("name", ["sdxl", "sdxl_v", "pixart"])
def test_vp_adapter_matches_ddim(name):
    b = get(name)
    den = b.denoiser
    cfg = b.scheduler_config
    sched = DDIMScheduler(num_train_timesteps=cfg["num_train_timesteps"], beta_start=cfg["beta_start"],
                          beta_end=cfg["beta_end"], beta_schedule=cfg["beta_schedule"],
                          prediction_type=cfg["prediction_type"], clip_sample=False, set_alpha_to_one=False)
    sched.set_timesteps(10)
    cond = b.make_cond(2)
    g = torch.Generator().manual_seed(1)
    outputs = {}
    for k in [999, 901, 500, 101, 1]:
        a = sched.alphas_cumprod[k].double()
        x0 = torch.randn(2, 4, 4, 4, generator=g, dtype=torch.float64)
        noise = torch.randn(2, 4, 4, 4, generator=g, dtype=torch.float64)
        x_vp = (a.sqrt() * x0 + (1 - a).sqrt() * noise).float()
        x_rf = (x_vp.double() / (a.sqrt() + (1 - a).sqrt())).float()
        with torch.no_grad():
            out = _pipeline_style_call(name, den.model, x_vp, k, cond, 32)
            ref = sched.step(out, k, x_vp)
            x0_hat, eps_hat = den(x_rf, t_from_alpha(a).repeat(2), cond)
        assert close(x0_hat, ref.pred_original_sample), k
        # DDIM (eta = 0) re-noises with the predicted eps: this checks eps_hat as well
        prev = k - sched.config.num_train_timesteps // sched.num_inference_steps
        a_prev = sched.alphas_cumprod[prev] if prev >= 0 else sched.final_alpha_cumprod
        assert close(a_prev.sqrt() * x0_hat + (1 - a_prev).sqrt() * eps_hat, ref.prev_sample), k
        outputs[k] = out
    # the comparison is sensitive to the timestep: the raw outputs differ across k
    assert (outputs[999] - outputs[500]).abs().max() > 1e-3


def test_vp_times_outside_the_schedule_are_clamped():
    b = get("sdxl")
    den = b.denoiser
    a = den.alphas_cumprod
    t = torch.tensor([1.0, 0.99, float(t_from_alpha(a[500])), float(t_from_alpha(a[0])) / 2, 0.0], dtype=torch.float64)
    x = latents(b, 5)
    with capture(den.model) as calls, torch.no_grad():
        den(x, t, b.make_cond(5))
    x_in, timestep = calls[0][0]
    assert torch.allclose(timestep, torch.tensor([999.0, 999.0, 500.0, 0.0, 0.0]), atol=1e-3)
    # the input is scaled with the true t: at t = 1 the model sees the noise itself, as in a pipeline
    assert torch.equal(x_in[0], x[0]) and torch.equal(x_in[4], x[4])
    assert 0 < den.t_min < 0.05 and 0.9 < den.t_max < 0.95


# --- flow conversion against diffusers' flow-matching Euler scheduler ---------------------


@pytest.mark.parametrize("name", ["sd3", "wan"])
def test_flow_adapter_matches_flow_match_euler(name):
    b = get(name)
    den = b.denoiser
    shift = b.scheduler_config.get("shift", b.scheduler_config.get("flow_shift"))
    sched = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=shift)
    sched.set_timesteps(4)
    cond = b.make_cond(2)
    g = torch.Generator().manual_seed(2)
    shape = (2, *den.latent_shape(32, 5 if den.is_video else None))
    for i, ts in enumerate(sched.timesteps):
        sigma, sigma_next = sched.sigmas[i], sched.sigmas[i + 1]
        x0, noise = torch.randn(shape, generator=g), torch.randn(shape, generator=g)
        x = sched.scale_noise(x0, ts[None], noise)  # diffusers' own forward process
        with torch.no_grad():
            kw = dict(hidden_states=x, timestep=ts.expand(2), encoder_hidden_states=cond.embeds)
            if name == "sd3":
                kw["pooled_projections"] = cond.pooled
            v = den.model(**kw).sample
            ref_next = sched.step(v, ts, x).prev_sample
            x0_hat, eps_hat = den(x, sigma, cond)
        assert close(x0_hat, x - sigma * v)  # flow-matching definition of x0 with diffusers' sigma
        assert close((1 - sigma_next) * x0_hat + sigma_next * eps_hat, ref_next)  # = one Euler step


# --- backbone-specific conditioning ------------------------------------------------------


def test_sdxl_time_ids_follow_the_resolution():
    b = get("sdxl")
    cond = b.make_cond(2)
    seen = {}
    for size in [(32, 32), (64, 64), (32, 64)]:
        x = torch.randn(2, 4, size[0] // 8, size[1] // 8)
        with capture(b.model) as calls, torch.no_grad():
            b.denoiser(x, 0.5, cond)
        added = calls[0][1]["added_cond_kwargs"]
        h, w = size
        assert added["time_ids"].tolist() == [[h, w, 0, 0, h, w]] * 2
        assert torch.equal(added["text_embeds"], cond.pooled)
        seen[size] = added["time_ids"]
    # and the UNet does react to them (so passing stale ids would change the prediction)
    x = torch.randn(1, 4, 4, 4)
    with torch.no_grad():
        outs = [b.model(x, 500, encoder_hidden_states=cond.embeds[:1],
                        added_cond_kwargs={"text_embeds": cond.pooled[:1], "time_ids": seen[s][:1]}).sample
                for s in [(32, 32), (64, 64)]]
    assert (outs[0] - outs[1]).abs().max() > 1e-4


def test_pixart_drops_learned_sigma_and_passes_its_mask():
    b = get("pixart")
    den = b.denoiser
    assert den.model.config.out_channels == 2 * den.latent_channels
    x, cond = latents(b, 2), b.make_cond(2)
    assert (cond.mask == 0).any()  # the factory gives padded prompts
    raw = []
    handle = den.model.register_forward_hook(lambda m, a, out: raw.append(out[0]))
    try:
        with capture(den.model) as calls, torch.no_grad():
            x0, eps = den(x, 0.3, cond)  # t < 1/2 inside the schedule: eps_hat is the raw eps channels
    finally:
        handle.remove()
    assert raw[0].shape[1] == 8 and eps.shape[1] == 4
    assert close(eps, raw[0][:, :4].float(), 1e-6) and not close(eps, raw[0][:, 4:].float(), 1e-2)
    assert torch.equal(calls[0][1]["encoder_attention_mask"], cond.mask)
    assert calls[0][1]["added_cond_kwargs"] is None


@pytest.mark.parametrize("name", ["sdxl", "pixart"])
def test_masked_tokens_are_ignored(name):
    b = get(name)
    den = b.denoiser
    assert den.supports_mask
    x, cond = latents(b, 2), b.make_cond(2)
    mask = (torch.arange(b.seq_len) < torch.tensor([[3], [5]])).float()
    keep = mask.bool()[..., None]
    junk = torch.randn_like(cond.embeds) * 10
    with torch.no_grad():
        ref = den(x, 0.3, Conditioning(cond.embeds, cond.pooled, mask))[0]
        masked_changed = den(x, 0.3, Conditioning(torch.where(keep, cond.embeds, junk), cond.pooled, mask))[0]
        kept_changed = den(x, 0.3, Conditioning(torch.where(keep, junk, cond.embeds), cond.pooled, mask))[0]
    assert close(masked_changed, ref, 1e-5) and not close(kept_changed, ref, 1e-3)


def test_pixart_additional_conditions_follow_the_resolution():
    b = get("pixart_ac")
    assert b.model.use_additional_conditions
    x = torch.randn(2, 4, 4, 8)  # 32 x 64 px
    with capture(b.model) as calls, torch.no_grad():
        b.denoiser(x, 0.5, b.make_cond(2))
    added = calls[0][1]["added_cond_kwargs"]
    assert added["resolution"].tolist() == [[32.0, 64.0]] * 2
    assert added["aspect_ratio"].tolist() == [[0.5]] * 2


def test_wan_mask_zeroes_padded_tokens_as_the_pipeline_does():
    b = get("wan")
    cond = b.make_cond(1)
    masked = Conditioning(cond.embeds, None, (torch.arange(b.seq_len) < 3).float()[None])
    zeroed = Conditioning(torch.cat([cond.embeds[:, :3], torch.zeros_like(cond.embeds[:, 3:])], 1))
    x = latents(b, 1)
    with torch.no_grad():
        assert close(b.denoiser(x, 0.6, masked)[0], b.denoiser(x, 0.6, zeroed)[0], 1e-6)
        assert not close(b.denoiser(x, 0.6, masked)[0], b.denoiser(x, 0.6, cond)[0], 1e-3)


@pytest.mark.parametrize("frames,latent_frames", [(1, 1), (5, 2), (9, 3)])
def test_wan_frame_counts(frames, latent_frames):
    b = get("wan")
    den = b.denoiser
    assert den.latent_shape((32, 64), frames) == (4, latent_frames, 4, 8)
    x = torch.randn(2, 4, latent_frames, 4, 8)
    t = torch.tensor([0.9, 0.4])
    with torch.no_grad():
        x0, eps = den(x, t, b.make_cond(2))
        video = b.codec.decode(x0)
        z = b.codec.encode(video)
    assert x0.shape == x.shape and close((1 - rf(t, 5)) * x0 + rf(t, 5) * eps, x, 1e-5)
    assert video.shape == (2, 3, frames, 32, 64) and video.abs().max() <= 1
    assert z.shape == x.shape


# --- classifier-free guidance -------------------------------------------------------------


@pytest.mark.parametrize("name", ["sdxl", "pixart", "sd3", "wan"])
def test_cfg_is_batched_and_equals_the_manual_combination(name):
    b = get(name)
    den, w = b.denoiser, 3.0
    x, cond, t = latents(b, 2), b.make_cond(2), torch.tensor([0.8, 0.35])
    with capture(den.model) as calls, torch.no_grad():
        x0, eps = CFGDenoiser(den, b.uncond, w)(x, t, cond)
    assert len(calls) == 1  # one forward for both halves (PixArt's shorter uncond is padded with a mask)
    with torch.no_grad():
        x0_u, eps_u = den(x, t, b.uncond.expand(2))
        x0_c, eps_c = den(x, t, cond)
    assert close(x0, x0_u + w * (x0_c - x0_u)) and close(eps, eps_u + w * (eps_c - eps_u))
    assert not close(x0, x0_c, 1e-3)  # guidance did something
    assert close((1 - rf(t, x.ndim)) * x0 + rf(t, x.ndim) * eps, x, 1e-5)  # weights sum to one


def test_cfg_scale_one_is_the_plain_denoiser_in_one_pass():
    b = get("sdxl")
    x, cond = latents(b, 2), b.make_cond(2)
    with capture(b.model) as calls, torch.no_grad():
        guided = CFGDenoiser(b.denoiser, b.uncond, 1.0)(x, 0.5, cond)
    with torch.no_grad():
        plain = b.denoiser(x, 0.5, cond)
    assert len(calls) == 1 and calls[0][0][0].shape[0] == 2
    assert torch.equal(guided[0], plain[0]) and torch.equal(guided[1], plain[1])
    # the wrapper exposes the wrapped denoiser's interface
    cfg = CFGDenoiser(b.denoiser, b.uncond, 7.5)
    assert cfg.model is b.model and cfg.latent_shape(64) == (4, 8, 8) and cfg.vae_scale_factor == 8
    with pytest.raises(SizeError):
        cfg.check_size(36)


def test_cfg_per_sample_scale_and_unequal_lengths_without_mask():
    b = get("sd3")  # SD3 takes no mask: an uncond of another length must run as a separate pass
    den = b.denoiser
    uncond = b.make_cond(1, 99, seq_len=b.seq_len + 3)
    x, cond = latents(b, 2), b.make_cond(2)
    w = torch.tensor([1.0, 4.0])
    with capture(den.model) as calls, torch.no_grad():
        x0, eps = CFGDenoiser(den, uncond, w)(x, 0.7, cond)
        x0_u, eps_u = den(x, 0.7, uncond.expand(2))
        x0_c, eps_c = den(x, 0.7, cond)
    assert len(calls) == 4  # two for CFG, two for the reference
    assert close(x0[:1], x0_c[:1]) and close(x0[1:], x0_u[1:] + 4 * (x0_c[1:] - x0_u[1:]))
    assert close(eps[1:], eps_u[1:] + 4 * (eps_c[1:] - eps_u[1:]))


def test_cfg_padding_with_mask_equals_separate_passes():
    b = get("pixart")
    den = b.denoiser
    assert b.uncond.seq_len < b.seq_len
    x, cond = latents(b, 2), b.make_cond(2)
    with torch.no_grad():
        x0, _ = CFGDenoiser(den, b.uncond, 2.0)(x, 0.6, cond)
        x0_u, _ = den(x, 0.6, b.uncond.expand(2))  # unpadded
        x0_c, _ = den(x, 0.6, cond)
    assert close(x0, x0_u + 2.0 * (x0_c - x0_u))


# --- size checks --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name,size,frames,message",
    [
        ("sdxl", (36, 32), None, r"height 36 px is not a multiple of 8 .*Use 32 or 40 px"),
        ("sdxl", (0, 32), None, r"must be positive"),
        ("sdxl", (32, 32), 5, r"image model; drop num_frames"),
        ("pixart", (32, 40), None, r"width 40 px is not a multiple of 16 .*silently crop.*Use 32 or 48 px"),
        ("sd3", (24, 32), None, r"not a multiple of 16"),
        ("sd3", (256, 64), None, r"pos_embed_max_size 8.*<= 128 px"),
        ("wan", (32, 32), 7, r"num_frames 7 is not 4k\+1.*Use 5 or 9"),
        ("wan", (32, 32), 0, r"num_frames 0 is not 4k\+1"),
        ("wan", (144, 32), 1, r"rope_max_seq_len 8.*<= 128 px"),
        ("wan", (32, 32), 33, r"rope_max_seq_len 8: use at most 29 frames"),
        ("wan", (40, 32), 5, r"height 40 px is not a multiple of 16"),
    ],
)
def test_size_errors_name_the_fix(name, size, frames, message):
    den = get(name).denoiser
    with pytest.raises(SizeError, match=message):
        den.check_size(size, frames)
    with pytest.raises(SizeError):
        den.latent_shape(size, frames)


def test_size_limits_are_inclusive_and_latents_are_checked():
    assert issubclass(SizeError, ValueError)
    get("sd3").denoiser.check_size(128)
    get("wan").denoiser.check_size((128, 128), 29)
    sd3, wan = get("sd3"), get("wan")
    cond = sd3.make_cond(1)
    with pytest.raises(SizeError, match=r"latent shape \(1, 4, 5, 4\).*height 40 px"):
        sd3.denoiser(torch.randn(1, 4, 5, 4), 0.5, cond)  # diffusers would drop the odd row
    with pytest.raises(SizeError, match=r"expected 4 latent channels"):
        sd3.denoiser(torch.randn(1, 3, 4, 4), 0.5, cond)
    with pytest.raises(SizeError, match=r"\(B, C, T, h, w\)"):
        wan.denoiser(torch.randn(1, 4, 4, 4), 0.5, wan.make_cond(1))
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        sd3.denoiser(torch.randn(1, 4, 4, 4), 500.0, cond)


# --- factory, dtype, gradients ------------------------------------------------------------


def test_from_model_picks_the_adapter_and_reads_the_scheduler_config():
    sdxl, pixart = get("sdxl"), get("pixart")
    cfg = {**sdxl.scheduler_config, "prediction_type": "v_prediction"}
    den = from_model(sdxl.model, cfg)
    assert isinstance(den, SDXLDenoiser) and den.prediction_type == "v_prediction"
    ref = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012).alphas_cumprod
    assert torch.equal(den.alphas_cumprod.float(), ref)
    den = from_model(pixart.model)  # PixArt's default linear schedule
    assert isinstance(den, PixArtDenoiser) and torch.equal(den.alphas_cumprod.float(), DDPMScheduler().alphas_cumprod)
    assert isinstance(from_model(get("sd3").model), SD3Denoiser)
    wan = from_model(get("wan").model, vae_temporal_factor=4)
    assert isinstance(wan, WanDenoiser) and wan.is_video and wan.vae_temporal_factor == 4
    with pytest.raises(TypeError, match="no denoiser adapter for Linear"):
        from_model(torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match="flow-matching scheduler"):
        from_model(sdxl.model, get("sd3").scheduler_config)


def test_zero_terminal_snr_v_prediction_is_finite_at_t_one():
    b = get("sdxl")
    ac, pred = vp_schedule_from_config({**b.scheduler_config, "rescale_betas_zero_snr": True,
                                        "prediction_type": "v_prediction"})
    assert ac[-1] == 0 and pred == "v_prediction"
    den = SDXLDenoiser(b.model, ac, pred)
    assert den.t_max > 0.999
    x = latents(b, 2)
    with torch.no_grad():
        x0, eps = den(x, torch.tensor([1.0, 0.5]), b.make_cond(2))
    assert torch.isfinite(x0).all() and torch.equal(eps[0], x[0])


@pytest.mark.parametrize("name", ["sd3", "pixart"])
def test_low_precision_models_give_float32(name):
    b = get(name)
    den = b.denoiser
    model = copy.deepcopy(den.model).to(torch.bfloat16)
    half = SD3Denoiser(model) if name == "sd3" else PixArtDenoiser(model, den.alphas_cumprod)
    assert half.model_dtype == torch.bfloat16
    x, cond = latents(b, 2), b.make_cond(2)
    with torch.no_grad():
        x0_h, eps_h = half(x, 0.4, cond)
        x0, _ = den(x, 0.4, cond)
    assert x0_h.dtype == eps_h.dtype == torch.float32
    assert close(x0_h, x0, 0.1)


@pytest.mark.parametrize("name", ["sdxl", "sd3"])
def test_gradients_are_finite_at_the_ends(name):
    b = get(name)
    x = latents(b, 3).requires_grad_(True)
    x0, eps = b.denoiser(x, torch.tensor([1.0, 0.5, 0.0]), b.make_cond(3))
    (x0.square().mean() + eps.square().mean()).backward()
    grads = [p.grad for p in b.model.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads) and torch.isfinite(x.grad).all()
    b.model.zero_grad(set_to_none=True)


# --- conditioning -------------------------------------------------------------------------


def test_conditioning_helpers():
    e = torch.arange(2 * 3 * 2, dtype=torch.float32).view(2, 3, 2)
    c = Conditioning(e, torch.ones(2, 4))
    assert len(c) == 2 and c.seq_len == 3
    assert torch.equal(c.index(1).embeds, e[1:2]) and torch.equal(c.index(-1).embeds, e[1:2])
    assert torch.equal(c[0:1].embeds, e[:1]) and torch.equal(c.index([1, 0]).embeds, e.flip(0))
    short = Conditioning(torch.ones(1, 1, 2), torch.zeros(1, 4), torch.ones(1, 1))
    both = Conditioning.cat([short, c])
    assert both.embeds.shape == (3, 3, 2) and both.mask.tolist() == [[1, 0, 0], [1, 1, 1], [1, 1, 1]]
    assert torch.equal(both.embeds[0, 1:], torch.zeros(2, 2)) and torch.equal(both.embeds[1:], e)
    assert torch.equal(short.expand(3).embeds, torch.ones(3, 1, 2))
    assert torch.equal(c.repeat(2).embeds, e[[0, 0, 1, 1]])
    half = both.to(dtype=torch.bfloat16)
    assert half.embeds.dtype == half.pooled.dtype == torch.bfloat16 and half.mask.dtype == both.mask.dtype
    with pytest.raises(ValueError, match="cannot expand"):
        c.expand(3)
    with pytest.raises(ValueError, match="with and without pooled"):
        Conditioning.cat([c, Conditioning(e)])
    with pytest.raises(ValueError, match=r"mask must be \(B=2, L=3\)"):
        Conditioning(e, mask=torch.ones(2, 2))


def test_make_cond_rows_depend_only_on_their_seed():
    b = get("pixart")
    two, one = b.make_cond(2, seed=5), b.make_cond(1, seed=6)
    assert torch.equal(two.index(1).embeds, one.embeds) and torch.equal(two.index(1).mask, one.mask)
    assert not torch.equal(two.index(0).embeds, one.embeds)


# --- codecs -------------------------------------------------------------------------------


def test_image_vae_codec_uses_scaling_and_shift():
    b = get("sd3")
    codec, vae = b.codec, b.codec.vae
    assert isinstance(codec, ImageVAECodec) and codec.scale_factor == 8 and codec.latent_channels == 4
    assert isinstance(codec_from_vae(vae), ImageVAECodec)
    images = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(3)) * 2 - 1
    with torch.no_grad():
        z = codec.encode(images)
        ref_z = (vae.encode(images).latent_dist.mode() - 0.0609) * 1.5305
        out = codec.decode(z)
        ref_out = vae.decode(z / 1.5305 + 0.0609).sample.clamp(-1, 1)
    assert z.shape == (1, 4, 4, 4) and close(z, ref_z, 1e-6) and close(out, ref_out, 1e-6)
    assert out.shape == images.shape and out.abs().max() <= 1


def test_wan_codec_uses_latent_mean_and_std():
    b = get("wan")
    codec, vae = b.codec, b.codec.vae
    assert isinstance(codec_from_vae(vae), WanVAECodec)
    assert (codec.scale_factor, codec.temporal_factor, codec.latent_channels) == (8, 4, 4)
    video = torch.rand(1, 3, 5, 32, 32, generator=torch.Generator().manual_seed(4)) * 2 - 1
    mean = torch.tensor([0.1, -0.2, 0.3, 0.0]).view(1, 4, 1, 1, 1)
    std = torch.tensor([1.5, 2.0, 0.8, 1.2]).view(1, 4, 1, 1, 1)
    with torch.no_grad():
        z = codec.encode(video)
        ref = (vae.encode(video).latent_dist.mode() - mean) / std
        out = codec.decode(z)
        ref_out = vae.decode(z * std + mean).sample
    assert z.shape == (1, 4, 2, 4, 4) and close(z, ref, 1e-6) and close(out, ref_out, 1e-6)
    with pytest.raises(SizeError, match="4k\\+1"):
        codec.encode(video[:, :, :4])


def test_pixel_codec_is_identity_and_clamps():
    codec = codec_from_vae(None)
    assert isinstance(codec, PixelCodec) and codec.scale_factor == 1 and codec.latent_channels == 3
    x = torch.linspace(-2, 2, 48).view(1, 3, 4, 4)
    assert torch.equal(codec.encode(x), x) and torch.equal(codec.decode(x), x.clamp(-1, 1))
    assert math.isclose(float(codec.decode(x).max()), 1.0)


def test_tiny_builders_are_seeded_and_leave_the_global_rng_alone():
    state = torch.random.get_rng_state()
    a, b, c = tiny_sd3(seed=0), tiny_sd3(seed=0), tiny_sd3(seed=1)
    assert torch.equal(torch.random.get_rng_state(), state)
    sa, sb, sc = a.model.state_dict(), b.model.state_dict(), c.model.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not all(torch.equal(sa[k], sc[k]) for k in sa)
    assert torch.equal(a.uncond.embeds, b.uncond.embeds) and len(a.uncond) == 1
