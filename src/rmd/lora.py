"""The distilled generator as a LoRA in diffusers' layout, and loading it into a stock pipeline.

    pipe = StableDiffusionXLPipeline.from_pretrained(teacher_folder)
    pipe.load_lora_weights("run/export/generator_lora")        # SDXL, SD3, Wan: diffusers does it
    rmd.lora.load_generator_lora(pipe, "run/export/generator_lora")  # any family, PixArt included

The file is ``pytorch_lora_weights.safetensors`` with keys ``<network>.<module>.lora_A/B.weight``
(``unet.`` for SDXL, ``transformer.`` otherwise) and the LoRA config (rank, alpha, targets) in its
metadata, as diffusers' own ``save_lora_weights`` writes it. ``PixArtSigmaPipeline`` has no LoRA
loader in diffusers (0.42), so :func:`load_generator_lora` gives its transformer diffusers' peft
methods first (:func:`rmd.distill.roles.with_adapter_methods`) and loads the same file.

A stock pipeline with the LoRA gives the distilled generator, not the cascade: sample it with
:class:`rmd.pipeline.RMDPipeline` (the exported full folder) to get the stage plan as trained.
"""

from __future__ import annotations

import os
from typing import Optional

import torch

LORA_WEIGHT_NAME = "pytorch_lora_weights.safetensors"  # diffusers' default file name

# pipeline class whose save_lora_weights writes each family's layout (None: written here)
_SAVERS = {"sdxl": "StableDiffusionXLPipeline", "sd3": "StableDiffusion3Pipeline", "wan": "WanPipeline",
           "toy": "StableDiffusion3Pipeline", "pixart-sigma": None}


def save_generator_lora(backbone: str, state: dict[str, torch.Tensor], metadata: dict, path: str) -> None:
    """Write a peft LoRA state dict (keys without the network prefix) in the family's diffusers layout."""
    import diffusers
    from diffusers.loaders.lora_base import LoraBaseMixin

    from .families import family

    prefix = "transformer" if backbone in ("toy", "pixart-sigma") else family(backbone).lora_prefix
    saver = _SAVERS[backbone]
    if saver is not None:
        getattr(diffusers, saver).save_lora_weights(
            path, weight_name=LORA_WEIGHT_NAME, **{f"{prefix}_lora_layers": state,
                                                   f"{prefix}_lora_adapter_metadata": metadata})
        return
    os.makedirs(path, exist_ok=True)
    LoraBaseMixin.write_lora_layers(
        state_dict=LoraBaseMixin.pack_weights(state, prefix), save_directory=path, is_main_process=True,
        weight_name=LORA_WEIGHT_NAME, save_function=None, safe_serialization=True,
        lora_adapter_metadata={f"{prefix}.{k}": v for k, v in metadata.items()})


def load_generator_lora(pipe, path: str, adapter_name: str = "rmd", scale: Optional[float] = None):
    """Load an exported generator LoRA into a stock diffusers pipeline of its family; returns ``pipe``."""
    from .distill.roles import with_adapter_methods

    if hasattr(pipe, "load_lora_weights"):
        pipe.load_lora_weights(path, weight_name=LORA_WEIGHT_NAME, adapter_name=adapter_name)
    else:  # PixArt: diffusers' peft methods on the transformer, the same file and metadata
        net = with_adapter_methods(pipe.transformer)
        net.load_lora_adapter(path, weight_name=LORA_WEIGHT_NAME, prefix="transformer", adapter_name=adapter_name)
    if scale is not None:
        net = getattr(pipe, "unet", None) or pipe.transformer
        net.set_adapters([adapter_name], weights=[scale])
    return pipe


__all__ = ["LORA_WEIGHT_NAME", "load_generator_lora", "save_generator_lora"]
