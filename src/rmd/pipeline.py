"""``RMDPipeline``: a distilled cascade as one object, in the diffusers manner.

    pipe = RMDPipeline.from_pretrained("./runs/rmd")           # a run folder, or an exported pipeline
    pipe = pipe.to("cuda")
    images = pipe(["a red striped circle on the left on a black background"], seed=0).images

A pipeline folder is the generator with its LoRA merged (``export/generator_full``, written
by ``rmd distill``) plus ``rmd_cascade.json``: the stage plan (schedule), the sampling
settings (eta, gamma, guidance, upsampling) and the backbone family. ``save_pretrained``
writes such a folder; ``from_pretrained`` reads one, or a run folder (its export).

Image ``i`` depends only on (prompt ``i``, seed ``i``): seeds are ``seed + i`` unless given
one per image, so results do not depend on how prompts are batched.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from typing import Any, Optional, Sequence, Union

import torch

CASCADE_FILE = "rmd_cascade.json"


@dataclass
class RMDPipelineOutput:
    # PIL images (video: a list of PIL frames per video), or with output_type="pt" a tensor in [-1, 1],
    # (B, C, H, W) or for video (B, C, T, H, W)
    images: Union[list, torch.Tensor]


def cascade_info(cfg) -> dict[str, Any]:
    """What ``rmd_cascade.json`` records for a run config."""
    return {"format": 1, "backbone": cfg.backbone, "recipe": cfg.recipe, "method": cfg.method,
            "schedule": cfg.schedule.model_dump(mode="json"), "sampling": cfg.sampling.model_dump(mode="json"),
            "frames": cfg.frames}


def write_cascade_info(folder: str, cfg) -> None:
    with open(os.path.join(folder, CASCADE_FILE), "w", encoding="utf-8") as f:
        json.dump(cascade_info(cfg), f, indent=1)


class RMDPipeline:
    """The cascade sampler around one merged generator network, its text encoder and its plan."""

    def __init__(self, path: str, info: dict[str, Any], denoiser, encode, modules: Sequence[torch.nn.Module],
                 decode=None):
        from .recipes import SamplingConfig, ScheduleConfig

        self.path = path
        self.info = info
        self.schedule = ScheduleConfig(**info["schedule"])
        self.sampling = SamplingConfig(**info["sampling"])
        self.plan = self.schedule.plan()
        self.denoiser = denoiser
        self.encode = encode
        self.decode = decode
        self._modules = list(modules)

    # --- loading and saving ---------------------------------------------------------------

    @classmethod
    def from_pretrained(cls, path: str, device: Union[str, torch.device, None] = None) -> "RMDPipeline":
        from .cli import UserError

        folder = path
        if not os.path.isfile(os.path.join(folder, CASCADE_FILE)):
            exported = os.path.join(path, "export", "generator_full")
            if os.path.isfile(os.path.join(exported, CASCADE_FILE)):
                folder = exported
            else:
                raise UserError(f"{path} is neither a pipeline folder (no {CASCADE_FILE}) nor a finished `rmd distill` "
                                "run folder (no export/generator_full); finish the run, or point at its export")
        with open(os.path.join(folder, CASCADE_FILE), encoding="utf-8") as f:
            info = json.load(f)
        backbone = info.get("backbone")
        if backbone == "toy":
            from .toy.teacher import load_teacher

            try:
                teacher = load_teacher(folder)
            except (FileNotFoundError, ValueError) as e:
                raise UserError(str(e)) from None
            pipe = cls(folder, info, teacher.denoiser(), teacher.text.encode, [teacher.transformer, *teacher.text.modules])
        else:
            pipe = cls._from_family_folder(folder, info, backbone)
        return pipe.to(device) if device is not None else pipe

    @classmethod
    def _from_family_folder(cls, folder: str, info: dict[str, Any], backbone: str) -> "RMDPipeline":
        """A real family's pipeline folder: the stock diffusers pipeline's parts around the merged network."""
        from functools import partial

        from .cli import UserError
        from .families import FAMILIES, denoiser_factory, encode_prompts, load_pipeline, network_of
        from .vae import codec_from_vae

        if backbone not in FAMILIES:
            raise UserError(f"{folder}: {CASCADE_FILE} names backbone {backbone!r}; known: toy, {', '.join(FAMILIES)}")
        diffusers_pipe = load_pipeline(folder, backbone, hint=(
            "Load the complete folder that `rmd distill` exported (RUN/export/generator_full), with every "
            "component listed above."))
        net = network_of(diffusers_pipe, backbone)
        den = denoiser_factory(diffusers_pipe, backbone)()
        texts = [m for n, m in diffusers_pipe.components.items() if n.startswith("text_encoder") and m is not None]
        codec = codec_from_vae(diffusers_pipe.vae)
        pipe = cls(folder, info, den, partial(encode_prompts, diffusers_pipe, backbone),
                   [net, *texts, diffusers_pipe.vae], decode=codec.decode)
        pipe.diffusers_pipeline = diffusers_pipe
        return pipe

    def save_pretrained(self, path: str, overwrite: bool = False) -> None:
        """Copy the pipeline folder (weights, text encoder, tokenizer, ``rmd_cascade.json``) to ``path``.

        An existing non-empty ``path`` is replaced only with ``overwrite=True``, and never when it
        is (or holds) the folder this pipeline was loaded from.
        """
        from .cli import UserError

        src, dst = os.path.realpath(self.path), os.path.realpath(path)
        if dst == src or src.startswith(dst + os.sep):
            raise UserError(f"{path} is (or holds) the folder this pipeline was loaded from; save it elsewhere")
        if os.path.exists(path) and (not os.path.isdir(path) or os.listdir(path)) and not overwrite:
            raise UserError(f"{path} already exists and is not empty; pass overwrite=True or choose another folder")
        tmp = f"{path}.tmp{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(self.path, tmp)
        with open(os.path.join(tmp, CASCADE_FILE), "w", encoding="utf-8") as f:
            json.dump(self.info, f, indent=1)
        if os.path.isdir(path):
            shutil.rmtree(path)
        elif os.path.exists(path):
            os.remove(path)
        os.replace(tmp, path)

    def to(self, device: Union[str, torch.device, None] = None, dtype: Optional[torch.dtype] = None) -> "RMDPipeline":
        """Move every module to ``device``; ``dtype`` applies to the denoising network (the text encoder stays fp32)."""
        for i, m in enumerate(self._modules):
            kwargs = {k: v for k, v in (("device", device), ("dtype", dtype if i == 0 else None)) if v is not None}
            if kwargs:
                m.to(**kwargs)
        return self

    @property
    def device(self) -> torch.device:
        return next(self._modules[0].parameters()).device

    # --- sampling --------------------------------------------------------------------------

    @torch.no_grad()
    def __call__(self, prompt: Union[str, Sequence[str]], num_images_per_prompt: int = 1, seed: int = 0,
                 seeds: Optional[Sequence[int]] = None, output_type: str = "pil",
                 batch_size: Optional[int] = None) -> RMDPipelineOutput:
        from .sampler import sample_with

        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        if not prompts:
            raise ValueError("give at least one prompt")
        if num_images_per_prompt < 1:
            raise ValueError(f"num_images_per_prompt must be at least 1, got {num_images_per_prompt}")
        prompts = [p for p in prompts for _ in range(num_images_per_prompt)]
        seeds = list(seeds) if seeds is not None else [seed + i for i in range(len(prompts))]
        if len(seeds) != len(prompts):
            raise ValueError(f"{len(seeds)} seeds for {len(prompts)} images; give one seed per image")
        if output_type not in ("pil", "pt"):
            raise ValueError(f"output_type must be 'pil' or 'pt', got {output_type!r}")
        out = sample_with(self.denoiser, self.plan, self.sampling, self.encode, prompts, seeds,
                          num_frames=self.info.get("frames"), batch_size=batch_size, decode=self.decode,
                          device=self.device)
        if output_type == "pt":
            return RMDPipelineOutput(out)
        from .distill.train import image_grid

        if out.ndim == 5:  # video (B, C, T, H, W): a list of frames per video
            return RMDPipelineOutput([[image_grid(v[:, t][None]) for t in range(v.shape[1])] for v in out])
        return RMDPipelineOutput([image_grid(img[None]) for img in out])
