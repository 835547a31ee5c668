"""Tiny, complete diffusers pipelines of the four real families, built offline, for tests.

``save_tiny_pipeline("sdxl", path)`` writes a folder that ``StableDiffusionXLPipeline.from_pretrained``
(and ``rmd distill --recipe sdxl --model path``) loads without a hub: the tiny network and VAE of
:mod:`rmd.tiny`, tiny randomly initialised text encoders of the real transformers classes
(CLIP, CLIP with projection, T5, UMT5) and tokenizers built from a character vocabulary.

The text towers are sized so that their outputs have exactly the shapes the tiny networks read:

=========  ===========================================  ==============================
family     text towers                                  network input
=========  ===========================================  ==============================
sdxl       CLIP 16 + CLIP-with-projection 16 (proj 16)  tokens 32 (16 + 16), pooled 16
pixart     T5 d_model 32                                caption_channels 32 (+ mask)
sd3        CLIP 16 (proj 8) + CLIP 16 (proj 8) + T5 32  joint 32, pooled 16 (8 + 8)
wan        UMT5 d_model 32                              text_dim 32
=========  ===========================================  ==============================
"""

from __future__ import annotations

import os
import string
from typing import Any

from .tiny import _seeded

CHARS = string.ascii_lowercase + string.digits + ".,;:!?'-"
CLIP_MAX_TOKENS = 64  # the real towers read 77 BPE tokens; these are characters


def clip_tokenizer():
    """A character-level CLIP BPE tokenizer (no merges): every word is its letters."""
    from transformers import CLIPTokenizer

    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for c in CHARS:
        vocab[c] = len(vocab)
        vocab[c + "</w>"] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=CLIP_MAX_TOKENS)


def t5_tokenizer():
    """A character-level unigram T5 tokenizer (no sentencepiece file needed)."""
    from transformers import T5Tokenizer

    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
    vocab += [(c, -3.0) for c in CHARS] + [("\u2581" + c, -3.5) for c in CHARS]
    return T5Tokenizer(vocab=vocab, extra_ids=0)


def clip_text(seed: int, hidden: int, projection: int = 0):
    """CLIPTextModel (``projection`` 0) or CLIPTextModelWithProjection."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    cfg = CLIPTextConfig(vocab_size=2 + 2 * len(CHARS), hidden_size=hidden, intermediate_size=2 * hidden,
                         num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=CLIP_MAX_TOKENS,
                         projection_dim=projection or hidden, bos_token_id=0, eos_token_id=1, pad_token_id=1)
    cls = CLIPTextModelWithProjection if projection else CLIPTextModel
    return _seeded(seed, lambda: cls(cfg))


def t5_text(seed: int, d_model: int, umt5: bool = False):
    from transformers import T5Config, T5EncoderModel, UMT5Config, UMT5EncoderModel

    kw: dict[str, Any] = dict(vocab_size=4 + 2 * len(CHARS), d_model=d_model, d_kv=8, d_ff=2 * d_model, num_layers=2,
                              num_heads=2, relative_attention_num_buckets=8, pad_token_id=0, eos_token_id=1)
    if umt5:
        return _seeded(seed, lambda: UMT5EncoderModel(UMT5Config(**kw)))
    return _seeded(seed, lambda: T5EncoderModel(T5Config(**kw)))


def tiny_pipeline(family: str, seed: int = 0):
    """A stock diffusers pipeline of ``family`` (``sdxl``, ``pixart``, ``sd3``, ``wan``) with tiny parts."""
    from diffusers import (DPMSolverMultistepScheduler, EulerDiscreteScheduler, FlowMatchEulerDiscreteScheduler,
                           PixArtSigmaPipeline, StableDiffusion3Pipeline, StableDiffusionXLPipeline,
                           UniPCMultistepScheduler, WanPipeline)

    from .tiny import tiny

    bundle = tiny(family, seed)
    net, vae = bundle.model, bundle.codec.vae
    sched_cfg = {k: v for k, v in bundle.scheduler_config.items() if k != "_class_name"}
    if family == "sdxl":
        return StableDiffusionXLPipeline(
            vae=vae, unet=net, scheduler=EulerDiscreteScheduler(**sched_cfg),
            text_encoder=clip_text(seed + 10, 16), tokenizer=clip_tokenizer(),
            text_encoder_2=clip_text(seed + 11, 16, projection=16), tokenizer_2=clip_tokenizer(),
        )
    if family == "pixart":
        return PixArtSigmaPipeline(vae=vae, transformer=net, scheduler=DPMSolverMultistepScheduler(**sched_cfg),
                                   text_encoder=t5_text(seed + 10, 32), tokenizer=t5_tokenizer())
    if family == "sd3":
        return StableDiffusion3Pipeline(
            vae=vae, transformer=net, scheduler=FlowMatchEulerDiscreteScheduler(**sched_cfg),
            text_encoder=clip_text(seed + 10, 16, projection=8), tokenizer=clip_tokenizer(),
            text_encoder_2=clip_text(seed + 11, 16, projection=8), tokenizer_2=clip_tokenizer(),
            text_encoder_3=t5_text(seed + 12, 32), tokenizer_3=t5_tokenizer(),
        )
    if family == "wan":
        return WanPipeline(vae=vae, transformer=net, scheduler=UniPCMultistepScheduler(**sched_cfg),
                           text_encoder=t5_text(seed + 10, 32, umt5=True), tokenizer=t5_tokenizer())
    raise KeyError(f"unknown family {family!r}; choose sdxl, pixart, sd3 or wan")


def save_tiny_pipeline(family: str, path: str, seed: int = 0) -> str:
    """Write ``tiny_pipeline(family, seed)`` as a diffusers folder; returns ``path``."""
    os.makedirs(path, exist_ok=True)
    tiny_pipeline(family, seed).save_pretrained(path, safe_serialization=True)
    return path


__all__ = ["clip_text", "clip_tokenizer", "save_tiny_pipeline", "t5_text", "t5_tokenizer", "tiny_pipeline"]
