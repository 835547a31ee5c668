"""The four real model families: what a local diffusers folder must hold, loading it, encoding prompts.

A family is a diffusers pipeline class whose network the engine wraps (:func:`rmd.denoisers.from_model`).
``check_model_folder`` reads only ``model_index.json`` and the components' ``config.json`` files, so an
incomplete or mismatched folder fails in milliseconds, before any weight is loaded, with one message
that lists every problem (missing component, wrong class, missing weights, latent channels or text
widths that do not fit together).

Prompts are encoded with the pipeline's own ``encode_prompt``, so a distilled generator sees exactly
the conditioning the stock pipeline gives its teacher (token lengths, padding, pooled embeddings,
SDXL's zeroed empty prompt).
"""

from __future__ import annotations

import contextlib
import glob
import json
import os
from dataclasses import dataclass, field
from typing import Any, Iterator, Optional, Sequence

import torch

from .denoisers import Conditioning

CLIP_TOKENIZERS = ("CLIPTokenizer", "CLIPTokenizerFast")
T5_TOKENIZERS = ("T5Tokenizer", "T5TokenizerFast", "AutoTokenizer")


@dataclass(frozen=True)
class Family:
    """One diffusers pipeline family.

    ``components`` maps each required component to the class names accepted for it (empty:
    any class, e.g. schedulers); ``optional`` likewise for components the pipeline can run
    without (SD3's T5). ``network`` is the component the LoRA adapters go on, ``lora_prefix``
    the key prefix of its LoRA in the diffusers layout. ``max_sequence_length``: the prompt
    tokens the pipeline's T5 reads (None: CLIP's 77, fixed by the tokenizer).
    """

    backbone: str
    pipeline_class: str
    network: str
    components: dict[str, tuple[str, ...]]
    optional: dict[str, tuple[str, ...]] = field(default_factory=dict)
    max_sequence_length: Optional[int] = None
    video: bool = False

    @property
    def lora_prefix(self) -> str:
        return self.network


FAMILIES: dict[str, Family] = {
    "sdxl": Family(
        "sdxl", "StableDiffusionXLPipeline", "unet",
        {"unet": ("UNet2DConditionModel",), "vae": ("AutoencoderKL",), "text_encoder": ("CLIPTextModel",),
         "text_encoder_2": ("CLIPTextModelWithProjection",), "tokenizer": CLIP_TOKENIZERS,
         "tokenizer_2": CLIP_TOKENIZERS, "scheduler": ()},
    ),
    "pixart-sigma": Family(
        "pixart-sigma", "PixArtSigmaPipeline", "transformer",
        {"transformer": ("PixArtTransformer2DModel",), "vae": ("AutoencoderKL",), "text_encoder": ("T5EncoderModel",),
         "tokenizer": T5_TOKENIZERS, "scheduler": ()},
        max_sequence_length=300,
    ),
    "sd3": Family(
        "sd3", "StableDiffusion3Pipeline", "transformer",
        {"transformer": ("SD3Transformer2DModel",), "vae": ("AutoencoderKL",),
         "text_encoder": ("CLIPTextModelWithProjection",), "text_encoder_2": ("CLIPTextModelWithProjection",),
         "tokenizer": CLIP_TOKENIZERS, "tokenizer_2": CLIP_TOKENIZERS, "scheduler": ()},
        optional={"text_encoder_3": ("T5EncoderModel",), "tokenizer_3": T5_TOKENIZERS},
        max_sequence_length=256,
    ),
    "wan": Family(
        "wan", "WanPipeline", "transformer",
        {"transformer": ("WanTransformer3DModel",), "vae": ("AutoencoderKLWan",), "text_encoder": ("UMT5EncoderModel",),
         "tokenizer": T5_TOKENIZERS, "scheduler": ()},
        max_sequence_length=512,
        video=True,
    ),
}

_WHAT = {"unet": "the denoising UNet", "transformer": "the denoising transformer", "vae": "the autoencoder",
         "scheduler": "the noise schedule", "text_encoder": "text encoder 1", "text_encoder_2": "text encoder 2",
         "text_encoder_3": "text encoder 3 (T5)", "tokenizer": "tokenizer 1", "tokenizer_2": "tokenizer 2",
         "tokenizer_3": "tokenizer 3 (T5)"}


def family(backbone: str) -> Family:
    if backbone not in FAMILIES:
        raise KeyError(f"no real-model family {backbone!r}; known: {sorted(FAMILIES)}")
    return FAMILIES[backbone]


# --- folder checks ---------------------------------------------------------------------------


def _read_json(path: str) -> Optional[dict]:
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
        return data if isinstance(data, dict) else None
    except (OSError, ValueError):
        return None


def _has_weights(folder: str) -> bool:
    pats = ("*.safetensors", "*.bin", "*.safetensors.index.json", "*.bin.index.json")
    return any(glob.glob(os.path.join(folder, p)) for p in pats)


def _has_tokenizer(folder: str) -> bool:
    names = ("tokenizer.json", "vocab.json", "spiece.model", "tokenizer_config.json")
    return any(os.path.isfile(os.path.join(folder, n)) for n in names)


def _component_problems(path: str, name: str, entry: Any, accepted: tuple[str, ...]) -> list[str]:
    what = _WHAT.get(name, name)
    if not (isinstance(entry, (list, tuple)) and len(entry) == 2 and entry[1]):
        return [f"{name} ({what}): missing from model_index.json"]
    cls = entry[1]
    if accepted and cls not in accepted:
        return [f"{name} ({what}): model_index.json names {cls}, expected {' or '.join(accepted)}"]
    sub = os.path.join(path, name)
    if not os.path.isdir(sub):
        return [f"{name} ({what}): the folder {name}/ is missing"]
    if name == "scheduler":
        return [] if os.path.isfile(os.path.join(sub, "scheduler_config.json")) else \
            [f"{name} ({what}): {name}/scheduler_config.json is missing"]
    if name.startswith("tokenizer"):
        return [] if _has_tokenizer(sub) else [f"{name} ({what}): {name}/ holds no tokenizer files"]
    problems = []
    if not os.path.isfile(os.path.join(sub, "config.json")):
        problems.append(f"{name} ({what}): {name}/config.json is missing")
    if not _has_weights(sub):
        problems.append(f"{name} ({what}): {name}/ holds no weights (*.safetensors or *.bin)")
    return problems


def _config(path: str, name: str) -> dict:
    return _read_json(os.path.join(path, name, "config.json")) or {}


def _fit_problems(path: str, fam: Family, present: set[str]) -> list[str]:
    """Widths that must agree between the parts (only between parts that are present and readable)."""
    net = _config(path, fam.network)
    vae = _config(path, "vae") if "vae" in present else {}
    problems = []
    latent = vae.get("z_dim", vae.get("latent_channels"))
    if net and latent is not None and net.get("in_channels") not in (None, latent):
        problems.append(f"{fam.network}.in_channels is {net['in_channels']} but the vae makes {latent}-channel latents")

    def hidden(name: str, key: str = "hidden_size") -> Optional[int]:
        return _config(path, name).get(key) if name in present else None

    def want(label: str, got: Optional[int], expected: Optional[int], source: str) -> None:
        if got is not None and expected is not None and got != expected:
            problems.append(f"{label} is {got} but {source} gives {expected}")

    if fam.backbone == "sdxl":
        h1, h2 = hidden("text_encoder"), hidden("text_encoder_2")
        if h1 and h2:
            want("unet.cross_attention_dim", net.get("cross_attention_dim"), h1 + h2,
                 "text_encoder + text_encoder_2 (hidden sizes)")
    elif fam.backbone == "pixart-sigma":
        want("transformer.caption_channels", net.get("caption_channels"), hidden("text_encoder", "d_model"),
             "text_encoder.d_model")
    elif fam.backbone == "sd3":
        p1, p2 = hidden("text_encoder", "projection_dim"), hidden("text_encoder_2", "projection_dim")
        if p1 and p2:
            want("transformer.pooled_projection_dim", net.get("pooled_projection_dim"), p1 + p2,
                 "text_encoder + text_encoder_2 (projection dims)")
        want("transformer.joint_attention_dim", net.get("joint_attention_dim"), hidden("text_encoder_3", "d_model"),
             "text_encoder_3.d_model")
    elif fam.backbone == "wan":
        want("transformer.text_dim", net.get("text_dim"), hidden("text_encoder", "d_model"), "text_encoder.d_model")
    return problems


def model_folder_problems(path: str, backbone: str) -> list[str]:
    """Everything wrong with ``path`` as a ``backbone`` model folder (empty: loadable)."""
    fam = family(backbone)
    if not os.path.isdir(path):
        return [f"{path} is not a folder"]
    index = _read_json(os.path.join(path, "model_index.json"))
    if index is None:
        return [f"{path} has no readable model_index.json: it is not a diffusers pipeline folder "
                f"(write one with `{fam.pipeline_class}.from_pretrained(...).save_pretrained(path)`)"]
    problems: list[str] = []
    present: set[str] = set()
    for name, accepted in fam.components.items():
        found = _component_problems(path, name, index.get(name), accepted)
        problems += found
        if not found:
            present.add(name)
    for name, accepted in fam.optional.items():
        entry = index.get(name)
        if isinstance(entry, (list, tuple)) and len(entry) == 2 and entry[1]:
            found = _component_problems(path, name, entry, accepted)
            problems += found
            if not found:
                present.add(name)
    if fam.network in present:
        problems += _fit_problems(path, fam, present)
    return problems


def check_model_folder(path: str, backbone: str, hint: Optional[str] = None) -> None:
    """Raise :class:`rmd.cli.UserError` listing every problem of the folder, before anything is loaded.

    ``hint`` ends the message with what the caller's user should change (default: ``--model``).
    """
    problems = model_folder_problems(path, backbone)
    if problems:
        from .cli import UserError

        fam = family(backbone)
        lines = "\n".join(f"  - {p}" for p in problems)
        raise UserError(f"{path} is not a complete {fam.pipeline_class} folder for backbone {backbone!r}:\n{lines}\n"
                        + (hint or "Point --model at the folder `save_pretrained` wrote (or a hub snapshot "
                                   "downloaded beforehand), with every component listed above."))


# --- loading and prompt encoding ---------------------------------------------------------------


@contextlib.contextmanager
def _quiet_loading(progress: bool) -> Iterator[None]:
    """Hide diffusers' and transformers' loading bars for the duration (they bury the run's output)."""
    from diffusers.utils import logging as dlog
    from transformers.utils import logging as tlog

    was = [m.is_progress_bar_enabled() for m in (dlog, tlog)]
    if not progress:
        dlog.disable_progress_bar()
        tlog.disable_progress_bar()
    try:
        yield
    finally:
        for m, on in zip((dlog, tlog), was):
            if on:
                m.enable_progress_bar()


def load_pipeline(path: str, backbone: str, dtype: Optional[torch.dtype] = None, progress: bool = False,
                  hint: Optional[str] = None):
    """The stock diffusers pipeline of a checked local folder (never the hub); ``hint``: see check_model_folder."""
    import diffusers

    check_model_folder(path, backbone, hint)
    cls = getattr(diffusers, family(backbone).pipeline_class)
    kwargs: dict[str, Any] = {"local_files_only": True}
    if dtype is not None:
        kwargs["torch_dtype"] = dtype
    with _quiet_loading(progress):
        pipe = cls.from_pretrained(path, **kwargs)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def network_of(pipe, backbone: str) -> torch.nn.Module:
    return getattr(pipe, family(backbone).network)


def vae_factors(pipe: Any) -> tuple[int, int]:
    """(spatial, temporal) downsampling of the pipeline's VAE."""
    spatial = getattr(pipe, "vae_scale_factor_spatial", None) or getattr(pipe, "vae_scale_factor", 8)
    return int(spatial), int(getattr(pipe, "vae_scale_factor_temporal", 4) or 4)


def denoiser_factory(pipe, backbone: str):
    """``make()`` -> the :mod:`rmd.denoisers` adapter over the pipeline's network (its schedule and VAE
    factors); the factory keeps the network, not the pipeline, so the text encoders can be dropped."""
    from functools import partial

    from .denoisers import from_model

    spatial, temporal = vae_factors(pipe)
    return partial(from_model, network_of(pipe, backbone), dict(pipe.scheduler.config), vae_scale_factor=spatial,
                   vae_temporal_factor=temporal)


@torch.no_grad()
def encode_prompts(pipe, backbone: str, prompts: Sequence[str], device: Optional[torch.device] = None) -> Conditioning:
    """Prompts -> :class:`Conditioning` exactly as ``pipe`` conditions its network (on CPU, float32).

    The empty prompt is the pipeline's unconditional input: SDXL with ``force_zeros_for_empty_prompt``
    (its default) uses zeros there, the others encode "".
    """
    prompts = list(prompts)
    fam = family(backbone)
    device = device or pipe.device
    if backbone == "sdxl":
        embeds, _, pooled, _ = pipe.encode_prompt(prompts, device=device, num_images_per_prompt=1,
                                                  do_classifier_free_guidance=False)
        if pipe.config.force_zeros_for_empty_prompt:
            empty = torch.tensor([p == "" for p in prompts], device=embeds.device)
            embeds = torch.where(empty[:, None, None], torch.zeros_like(embeds), embeds)
            pooled = torch.where(empty[:, None], torch.zeros_like(pooled), pooled)
        cond = Conditioning(embeds, pooled)
    elif backbone == "pixart-sigma":
        embeds, mask, _, _ = pipe.encode_prompt(prompts, do_classifier_free_guidance=False, device=device,
                                                clean_caption=False, max_sequence_length=fam.max_sequence_length)
        cond = Conditioning(embeds, None, mask.float())
    elif backbone == "sd3":
        embeds, _, pooled, _ = pipe.encode_prompt(prompts, None, None, device=device, do_classifier_free_guidance=False,
                                                  max_sequence_length=fam.max_sequence_length)
        cond = Conditioning(embeds, pooled)
    elif backbone == "wan":
        embeds, _ = pipe.encode_prompt(prompts, do_classifier_free_guidance=False,
                                       max_sequence_length=fam.max_sequence_length, device=device)
        cond = Conditioning(embeds)
    else:
        raise KeyError(backbone)
    return cond.to("cpu", torch.float32)


__all__ = ["FAMILIES", "Family", "check_model_folder", "encode_prompts", "family", "load_pipeline",
           "model_folder_problems", "network_of"]
