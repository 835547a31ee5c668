"""The trainer's :class:`~rmd.distill.train.Backbone` for a real diffusers model folder.

``rmd distill --recipe sdxl --model PATH --prompts FILE`` lands here. In order, before any
weight is loaded: the folder is checked (:func:`rmd.families.check_model_folder`) and the prompt
file is read and checked (:mod:`rmd.prompts`). Then:

1. the stock pipeline is loaded from the folder (never the hub), in bf16 when the run is;
2. the prompts (and "") are encoded once into the embedding cache (:mod:`rmd.embedding_cache`;
   on several processes, rank 0 builds it while the others wait), and the text encoders are
   dropped: training reads embeddings from the cache;
3. the VAE stays on the CPU and visits the model's device only to decode a sample grid.

The merged export is a complete diffusers pipeline folder: the other components are copied from
the teacher folder, the network is the merged generator, plus ``rmd_cascade.json``
(:class:`rmd.pipeline.RMDPipeline` reads it; ``DiffusionPipeline.from_pretrained`` ignores it).
"""

from __future__ import annotations

import os
import random
import shutil
from functools import partial
from typing import Any, Optional

import torch
from torch import nn

from .config import RunConfig


def _user_error(msg: str) -> Exception:
    from ..cli import UserError

    return UserError(msg)


def read_training_prompts(cfg: RunConfig) -> list[str]:
    from ..prompts import PromptFileError, read_prompt_file

    if not cfg.prompts:
        raise _user_error(f"backbone {cfg.backbone!r} distils from prompts alone (no images): give "
                          "--prompts FILE (.txt one per line, .jsonl or .csv) or set distill.prompts in the recipe")
    try:
        return read_prompt_file(cfg.prompts).prompts
    except PromptFileError as e:
        raise _user_error(f"--prompts: {e}") from None


def _text_components(pipe: Any) -> list[str]:
    return [n for n in ("text_encoder", "text_encoder_2", "text_encoder_3", "tokenizer", "tokenizer_2", "tokenizer_3")
            if getattr(pipe, n, None) is not None]


def _synchronised(build, is_main: bool) -> None:
    """Run ``build`` on rank 0 while the other ranks wait (one process: just run it). Call it on every rank.

    If the build fails on rank 0, every rank raises with rank 0's reason, instead of the others
    waiting at a barrier until the process group times out.
    """
    dist = torch.distributed
    multi = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
    if not multi:
        build()
        return
    outcome: list[Optional[str]] = [None]
    failure: Optional[BaseException] = None
    if is_main:
        try:
            build()
        except Exception as e:  # noqa: BLE001 - reported on every rank, re-raised here
            failure, outcome[0] = e, f"{type(e).__name__}: {e}"
    dist.broadcast_object_list(outcome, src=0)  # also the barrier
    if failure is not None:
        raise failure
    if outcome[0] is not None:
        raise RuntimeError(f"rank 0 could not build the embedding cache: {outcome[0]}")


def family_backbone(cfg: RunConfig, sampling: bool = False):
    """The Backbone of ``cfg.teacher``; ``sampling=True``: encode any prompt with the text encoders (no cache)."""
    from ..families import check_model_folder, denoiser_factory, encode_prompts, family, load_pipeline, network_of
    from ..lora import save_generator_lora
    from ..vae import codec_from_vae
    from .train import Backbone

    fam = family(cfg.backbone)
    # a finished run (rmd sample) reaches its teacher through config.yaml, not through --model
    hint = ("The run's generator is a LoRA on this teacher: put the complete folder back there, or set "
            "`teacher:` in the run's config.yaml to where it now is.") if sampling else None
    check_model_folder(cfg.teacher, cfg.backbone, hint)
    prompts = [] if sampling else read_training_prompts(cfg)
    dtype = torch.bfloat16 if cfg.mixed_precision == "bf16" else None
    pipe = load_pipeline(cfg.teacher, cfg.backbone, dtype=dtype, hint=hint)
    model = network_of(pipe, cfg.backbone)
    make_denoiser = denoiser_factory(pipe, cfg.backbone)

    vae = pipe.vae
    codec = codec_from_vae(vae)
    if sampling:
        text_modules = [getattr(pipe, n) for n in _text_components(pipe) if n.startswith("text_encoder")]
        encode = partial(encode_prompts, pipe, cfg.backbone)
    else:
        text_modules = []
        encode = _cached_encoder(cfg, pipe, prompts, cache_dtype=torch.bfloat16 if dtype is not None else torch.float32)
        del pipe  # the text encoders go with it: training reads the cache

    @torch.no_grad()
    def decode(latents: torch.Tensor) -> torch.Tensor:
        if sampling:  # the VAE moves with the model (extra_modules)
            return codec.decode(latents)
        vae.to(latents.device)  # in training the VAE lives on the CPU between sample grids
        try:
            return codec.decode(latents)
        finally:
            vae.to("cpu")

    def train_prompts(n: int, rng: random.Random) -> list[str]:
        return [prompts[rng.randrange(len(prompts))] for _ in range(n)]

    def sample_prompts(n: int) -> list[str]:
        return [prompts[i % len(prompts)] for i in range(n)] if prompts else [""] * n  # fixed across the run

    def save_full(merged: nn.Module, path: str) -> None:
        copy_components(cfg.teacher, path, skip=(fam.network,))
        merged.save_pretrained(os.path.join(path, fam.network), safe_serialization=True)

    def save_lora(state: dict[str, torch.Tensor], metadata: dict, path: str) -> None:
        save_generator_lora(cfg.backbone, state, metadata, path)

    return Backbone(
        name=cfg.backbone,
        model=model,
        make_denoiser=make_denoiser,
        encode=encode,
        train_prompts=train_prompts,
        sample_prompts=sample_prompts,
        save_full=save_full,
        save_lora=save_lora,
        lora_prefix=fam.lora_prefix,
        decode=decode,
        extra_modules=text_modules + ([vae] if sampling else []),
        # named before FSDP; in the live network's dtype, so a sharded run exports what an unsharded one does
        fresh_model=partial(_load_network, cfg.teacher, fam.network, type(model).__name__, dtype),
    )


def _cached_encoder(cfg: RunConfig, pipe: Any, prompts: list[str], cache_dtype: torch.dtype):
    """``encode`` reading the embedding cache of (model, prompts), built first if missing."""
    from ..embedding_cache import EmbeddingCache, build_cache, cache_digest, cache_root
    from ..families import encode_prompts, family

    texts = _text_components(pipe)
    digest = cache_digest(cfg.teacher, texts, prompts, backbone=cfg.backbone, dtype=str(cache_dtype),
                          max_sequence_length=family(cfg.backbone).max_sequence_length)
    folder = os.path.join(cache_root(), f"{cfg.backbone}-{digest}")
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")

    def build() -> None:
        if os.path.isfile(os.path.join(folder, "index.json")):
            return
        for name in texts:
            if name.startswith("text_encoder"):
                getattr(pipe, name).to(device)
        os.makedirs(cache_root(), exist_ok=True)
        build_cache(folder, prompts, lambda p: encode_prompts(pipe, cfg.backbone, p, device), dtype=cache_dtype)

    # every rank enters (and leaves) together, whether or not the cache exists: rank 0 may finish
    # building before another rank has even looked, and a barrier only some ranks reach hangs
    _synchronised(build, int(os.environ.get("RANK", "0")) == 0)
    return EmbeddingCache(folder).encode


def _load_network(folder: str, subfolder: str, class_name: str, dtype: Optional[torch.dtype] = None) -> nn.Module:
    """The family's network alone from the teacher folder, a fresh unsharded copy (in ``dtype`` if given)."""
    import diffusers

    kwargs = {"torch_dtype": dtype} if dtype is not None else {}
    return getattr(diffusers, class_name).from_pretrained(folder, subfolder=subfolder, local_files_only=True, **kwargs)


def copy_components(src: str, dst: str, skip: tuple[str, ...] = ()) -> None:
    """Copy a diffusers pipeline folder's files except the ``skip`` components."""
    os.makedirs(dst, exist_ok=True)
    for name in os.listdir(src):
        if name in skip:
            continue
        s, d = os.path.join(src, name), os.path.join(dst, name)
        if os.path.isdir(s):
            shutil.copytree(s, d)
        else:
            shutil.copy2(s, d)
