"""The toy teacher: a small SD3Transformer2DModel trained with rectified flow on the toy world.

Pixel space, 3 channels, target 32 px, trained at 8, 16 and 32 px. Pixel space
because at 32 px a VAE would save little compute and would add a second trained
model whose errors blur exactly the fine textures the cascade must restore.
Patch size 4 (8x8 tokens at 32 px, 2x2 at 8 px) keeps a training step near half a
second on 2 CPU cores.

Training data follows the paper's account of real models: a share of the
low-resolution images are degraded (:func:`rmd.toy.world.training_batch`), the
full-resolution ones are clean. Caption dropout (empty prompt) trains the
unconditional branch for classifier-free guidance.

Loss: the flow-matching velocity MSE, ``|| v_theta(x_t, t) - (eps - x0) ||^2`` with
``x_t = (1 - t) x0 + t eps`` and t drawn logit-normal (SD3's default), except for a
share drawn uniformly: logit-normal alone almost never visits t < 0.05, and a model
untrained there leaves visible noise in the last Euler steps of a uniform-time sampler.
"""

from __future__ import annotations

import copy
import json
import math
import os
import random
import shutil
import sys
import time
from dataclasses import dataclass
from typing import Optional

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator

from .text import ContextResampler, ToyTextEncoder, ToyTokenizer, build_resampler, build_text_encoder
from .world import training_batch, vocabulary

ASSET_DIR = os.path.join(os.path.dirname(os.path.dirname(__file__)), "assets", "toy")
TEACHER_DIR = os.path.join(ASSET_DIR, "teacher")


class TeacherConfig(BaseModel):
    """Architecture and training settings of the toy teacher (validated; unknown keys are errors)."""

    model_config = ConfigDict(extra="forbid")

    target_resolution: int = 32
    resolutions: tuple[int, ...] = (8, 16, 32)
    resolution_weights: tuple[float, ...] = (0.2, 0.2, 0.6)
    degrade_share: float = Field(0.5, ge=0.0, le=1.0, description="share of degraded images below the target resolution")
    caption_dropout: float = Field(0.1, ge=0.0, lt=1.0)
    patch_size: int = 4
    num_layers: int = 6
    attention_head_dim: int = 32
    num_attention_heads: int = 4
    text_width: int = 64
    text_layers: int = 2
    context_tokens: Optional[int] = Field(
        2, ge=1, description="context tokens the prompt is compressed to (rmd.toy.text.ContextResampler); "
        "None feeds one token per word, as teachers trained before the resampler did")
    steps: int = Field(25000, ge=1, description="the shipped teacher's count: `rmd toy train-teacher --out DIR` reproduces it")
    batch_size: int = Field(48, ge=1)
    lr: float = Field(5e-4, gt=0)
    warmup: int = Field(200, ge=0)
    weight_decay: float = 0.01
    ema_decay: float = Field(0.999, ge=0.0, lt=1.0)
    ema_warmup: bool = Field(True, description="decay min(ema_decay, (1 + step) / (10 + step)): early weights fade fast")
    grad_clip: float = 1.0
    logit_normal_std: float = 1.0
    uniform_t_share: float = Field(0.25, ge=0.0, le=1.0, description="share of training times drawn uniformly in (0, 1)")
    seed: int = 0
    log_every: int = 50
    checkpoint_every: int = 250
    guidance_scale: float = Field(3.0, description="default CFG scale for sampling the teacher")
    # Speed settings. Both change the rounding, so a teacher trained with them is another teacher:
    # the shipped one was trained with neither. On the 2-core CPU the two together measured no
    # faster per step than eager fp32 over 400 steps (docs/RESULTS.md), after 3.5 min of compiling.
    compile: bool = Field(False, description="torch.compile the transformer for training (one graph per resolution; "
                          "minutes of compiling at the start)")
    bf16_resolutions: tuple[int, ...] = Field((), description="resolutions whose transformer forward and backward run "
                                              "under bf16 autocast (weights, optimiser and loss stay fp32)")

    @model_validator(mode="after")
    def _check(self):
        if len(self.resolutions) != len(self.resolution_weights):
            raise ValueError("resolutions and resolution_weights must have the same length")
        if max(self.resolutions) != self.target_resolution:
            raise ValueError("the largest training resolution must be the target resolution")
        for r in self.resolutions:
            if r % self.patch_size:
                raise ValueError(f"resolution {r} is not divisible by patch_size {self.patch_size}")
        unknown = sorted(set(self.bf16_resolutions) - set(self.resolutions))
        if unknown:
            raise ValueError(f"bf16_resolutions {unknown} are not training resolutions {list(self.resolutions)}")
        return self


def build_transformer(cfg: TeacherConfig):
    from diffusers import SD3Transformer2DModel

    torch.manual_seed(cfg.seed)
    return SD3Transformer2DModel(
        sample_size=cfg.target_resolution,
        patch_size=cfg.patch_size,
        in_channels=3,
        out_channels=3,
        num_layers=cfg.num_layers,
        attention_head_dim=cfg.attention_head_dim,
        num_attention_heads=cfg.num_attention_heads,
        joint_attention_dim=cfg.text_width,
        caption_projection_dim=cfg.attention_head_dim * cfg.num_attention_heads,
        pooled_projection_dim=cfg.text_width,
        pos_embed_max_size=cfg.target_resolution // cfg.patch_size,
    )


@dataclass
class ToyTeacher:
    """The loaded toy model folder: transformer, text encoder, and the config it was trained with."""

    transformer: torch.nn.Module
    text: ToyTextEncoder
    config: TeacherConfig
    path: Optional[str] = None

    def denoiser(self):
        from ..denoisers import SD3Denoiser

        return SD3Denoiser(self.transformer, vae_scale_factor=1)


def save_teacher(out_dir: str, transformer, text: ToyTextEncoder, cfg: TeacherConfig) -> None:
    from diffusers import FlowMatchEulerDiscreteScheduler

    transformer.save_pretrained(os.path.join(out_dir, "transformer"))
    text.model.save_pretrained(os.path.join(out_dir, "text_encoder"))
    if text.resampler is not None:
        text.resampler.save(os.path.join(out_dir, "text_resampler"))
    text.tokenizer.save(os.path.join(out_dir, "tokenizer"))
    FlowMatchEulerDiscreteScheduler(shift=1.0).save_config(os.path.join(out_dir, "scheduler"))
    with open(os.path.join(out_dir, "toy_config.json"), "w") as f:
        json.dump(cfg.model_dump(mode="json"), f, indent=1)


def load_teacher(path: Optional[str] = None, device: str = "cpu") -> ToyTeacher:
    """Load a toy teacher folder (default: the one shipped in the package), offline."""
    from diffusers import SD3Transformer2DModel
    from transformers import CLIPTextModelWithProjection

    path = path or TEACHER_DIR
    needed = ["transformer", "text_encoder", "tokenizer/vocab.json", "toy_config.json"]
    missing = [n for n in needed if not os.path.exists(os.path.join(path, n))]
    if missing:
        raise FileNotFoundError(
            f"toy teacher folder {path!r} lacks {missing}; train one with `rmd toy train-teacher --out DIR` "
            "or reinstall the package to restore the shipped teacher"
        )
    with open(os.path.join(path, "transformer", "config.json")) as f:
        tcfg = json.load(f)
    if tcfg.get("_class_name") != "SD3Transformer2DModel":
        raise ValueError(f"{path}/transformer holds a {tcfg.get('_class_name')!r}; a toy teacher's transformer is an "
                         "SD3Transformer2DModel (rectified flow). Point --teacher at a folder `rmd toy train-teacher` "
                         "wrote")
    if (tcfg.get("in_channels"), tcfg.get("out_channels")) != (3, 3):
        raise ValueError(f"{path}/transformer has {tcfg.get('in_channels')} input / {tcfg.get('out_channels')} output "
                         "channels; the toy works in RGB pixel space (3 and 3). Point --teacher at a toy teacher folder")
    with open(os.path.join(path, "toy_config.json")) as f:
        data = json.load(f)
    data.setdefault("context_tokens", None)  # written before the resampler existed: one token per word
    cfg = TeacherConfig(**data)
    has_resampler = os.path.exists(os.path.join(path, "text_resampler", "model.safetensors"))
    if has_resampler != (cfg.context_tokens is not None):
        raise ValueError(f"{path}: toy_config.json says context_tokens={cfg.context_tokens} but the folder "
                         f"{'has' if has_resampler else 'lacks'} text_resampler/; the folder is incomplete or mixed. "
                         "Re-export it with `rmd toy train-teacher` or restore the shipped teacher")
    transformer = SD3Transformer2DModel.from_pretrained(os.path.join(path, "transformer"), local_files_only=True)
    encoder = CLIPTextModelWithProjection.from_pretrained(os.path.join(path, "text_encoder"), local_files_only=True)
    tok = ToyTokenizer.load(os.path.join(path, "tokenizer"))
    resampler = ContextResampler.load(os.path.join(path, "text_resampler")) if has_resampler else None
    text = ToyTextEncoder(tok, encoder, resampler)
    transformer.eval().requires_grad_(False).to(device)
    for m in text.modules:
        m.eval().requires_grad_(False).to(device)
    return ToyTeacher(transformer, text, cfg, path)


# --- training ------------------------------------------------------------------------------


def _lr_at(step: int, cfg: TeacherConfig) -> float:
    """Linear warm-up, then cosine decay to 10% of the peak."""
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    progress = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    return cfg.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def _atomic_save(obj, path: str) -> None:
    tmp = path + ".tmp"
    torch.save(obj, tmp)
    os.replace(tmp, path)


def flow_matching_loss(model_out: torch.Tensor, x0: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """Per-sample velocity MSE: mean over pixels of (v_theta - (eps - x0))^2."""
    return (model_out.float() - (eps - x0)).pow(2).flatten(1).mean(1)


def _carry_word_vectors(prev: ToyTextEncoder, tok: ToyTokenizer, fresh) -> dict:
    """The earlier encoder's weights, re-indexed to this tokenizer's vocabulary.

    Words both vocabularies know keep their trained vectors; a word new to the world
    keeps the fresh unit-scale vector of ``fresh``; words the world no longer uses are
    dropped. So a later training phase may follow a change of the world's vocabulary.
    """
    if prev.tokenizer.max_length != tok.max_length:
        raise ValueError(f"--init-from: its tokenizer takes {prev.tokenizer.max_length} tokens, this one "
                         f"{tok.max_length}; the position embeddings cannot be carried over")
    state = dict(prev.model.state_dict())
    key = "text_model.embeddings.token_embedding.weight"
    table = fresh.state_dict()[key].clone()
    for word, i in tok.index.items():
        j = prev.tokenizer.index.get(word)
        if j is not None:
            table[i] = state[key][j]
    state[key] = table
    return state


def train_teacher(cfg: TeacherConfig, out_dir: str, resume: bool = True, progress: bool = True,
                  init_from: Optional[str] = None) -> dict:
    """Train the toy teacher; writes the model folder and ``training_record.json`` into ``out_dir``.

    Reproducible: batch contents, times and noise come from generators seeded by
    (seed, step), so a resumed run continues the same stream. ``init_from`` starts
    from the weights of an earlier teacher folder (a second training phase with a
    fresh optimiser and learning-rate schedule); that folder's record is kept
    inside the new one, so the whole history stays reproducible.
    """
    from tqdm.auto import tqdm

    os.makedirs(out_dir, exist_ok=True)
    tok = ToyTokenizer(vocabulary())
    encoder = build_text_encoder(tok, cfg.text_width, cfg.text_layers, seed=cfg.seed)
    transformer = build_transformer(cfg)
    resampler = build_resampler(cfg.context_tokens, cfg.text_width, seed=cfg.seed) if cfg.context_tokens else None
    previous = None
    if init_from is not None:
        prev = load_teacher(init_from)
        arch = ("patch_size", "num_layers", "attention_head_dim", "num_attention_heads", "text_width", "text_layers",
                "target_resolution")
        if any(getattr(prev.config, k) != getattr(cfg, k) for k in arch):
            raise ValueError(f"--init-from {init_from}: its architecture differs from this config in {arch}")
        transformer.load_state_dict(prev.transformer.state_dict())
        encoder.load_state_dict(_carry_word_vectors(prev.text, tok, encoder))
        # a resampler of the same size carries over; one new to this phase starts fresh, and the
        # transformer learns to read the compressed context instead of the words
        if resampler is not None and prev.text.resampler is not None:
            if prev.text.resampler.num_tokens == resampler.num_tokens:
                resampler.load_state_dict(prev.text.resampler.state_dict())
        if resampler is None and prev.text.resampler is not None:
            raise ValueError(f"--init-from {init_from}: that teacher compresses prompts to "
                             f"{prev.config.context_tokens} context tokens; this config feeds one per word "
                             "(context_tokens None). Set context_tokens to continue from it")
        with open(os.path.join(init_from, "training_record.json")) as f:
            previous = json.load(f)
    # the encoder's networks train and average as one module list
    text_nets = torch.nn.ModuleList([encoder] + ([resampler] if resampler is not None else []))
    params = list(transformer.parameters()) + list(text_nets.parameters())
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.99))
    ema_t, ema_e = copy.deepcopy(transformer).requires_grad_(False), copy.deepcopy(text_nets).requires_grad_(False)
    record = {"command": " ".join(sys.argv), "config": cfg.model_dump(mode="json"), "loss_curve": [], "wall_seconds": 0.0,
              "init_from": previous}
    start = 0
    window: list[float] = []  # losses since the last logged mean; checkpointed, so a resumed run logs the same means
    ckpt_path = os.path.join(out_dir, "checkpoint.pt")
    if resume and os.path.exists(ckpt_path):
        state = torch.load(ckpt_path, weights_only=False)
        if state["config"] != cfg.model_dump(mode="json"):
            raise ValueError(f"{ckpt_path} was written with a different config; use another --out or delete it")
        transformer.load_state_dict(state["transformer"])
        text_nets.load_state_dict(state["encoder"])
        ema_t.load_state_dict(state["ema_transformer"])
        ema_e.load_state_dict(state["ema_encoder"])
        opt.load_state_dict(state["optimizer"])
        record = state["record"]
        start = state["step"]
        window = state.get("window", [])
    transformer.train()
    text_nets.train()
    # the compiled module shares the transformer's parameters: state dicts, EMA and export use the plain one
    net = torch.compile(transformer, dynamic=False) if cfg.compile else transformer
    res_rng_weights = list(cfg.resolution_weights)
    t_begin = time.time() - record["wall_seconds"]
    bar = tqdm(range(start, cfg.steps), initial=start, total=cfg.steps, disable=not progress, desc="teacher")
    for step in bar:
        rng = random.Random(cfg.seed * 1_000_003 + step)
        res = rng.choices(cfg.resolutions, weights=res_rng_weights)[0]
        share = cfg.degrade_share if res < cfg.target_resolution else 0.0
        batch = training_batch(cfg.batch_size, res, rng.randrange(2**31), degrade_share=share)
        prompts = ["" if rng.random() < cfg.caption_dropout else p for p in batch.prompts]
        g = torch.Generator().manual_seed(rng.randrange(2**31))
        x0 = batch.images
        eps = torch.randn(x0.shape, generator=g)
        t = torch.sigmoid(torch.randn(x0.shape[0], generator=g) * cfg.logit_normal_std)
        uniform = torch.rand(x0.shape[0], generator=g) < cfg.uniform_t_share
        t = torch.where(uniform, torch.rand(x0.shape[0], generator=g), t)
        xt = (1 - t)[:, None, None, None] * x0 + t[:, None, None, None] * eps
        ids, mask = tok(prompts)
        enc = encoder(input_ids=ids, attention_mask=mask)
        context = enc.last_hidden_state if resampler is None else resampler(enc.last_hidden_state, mask)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=res in cfg.bf16_resolutions):
            out = net(hidden_states=xt, encoder_hidden_states=context,
                      pooled_projections=enc.text_embeds, timestep=1000 * t).sample
        loss = flow_matching_loss(out, x0, eps).mean()
        for group in opt.param_groups:
            group["lr"] = _lr_at(step, cfg)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        opt.step()
        decay = min(cfg.ema_decay, (1 + step) / (10 + step)) if cfg.ema_warmup else cfg.ema_decay
        with torch.no_grad():
            for ema, live in ((ema_t, transformer), (ema_e, text_nets)):
                for pe, pl in zip(ema.parameters(), live.parameters()):
                    pe.lerp_(pl, 1 - decay)
        window.append(loss.item())
        if (step + 1) % cfg.log_every == 0 or step + 1 == cfg.steps:
            record["loss_curve"].append({"step": step + 1, "loss": sum(window) / len(window),
                                         "seconds": round(time.time() - t_begin, 1)})
            bar.set_postfix(loss=f"{sum(window) / len(window):.4f}")
            window = []
        if (step + 1) % cfg.checkpoint_every == 0 and step + 1 < cfg.steps:
            record["wall_seconds"] = time.time() - t_begin
            _atomic_save({"step": step + 1, "config": cfg.model_dump(mode="json"), "transformer": transformer.state_dict(),
                          "encoder": text_nets.state_dict(), "ema_transformer": ema_t.state_dict(),
                          "ema_encoder": ema_e.state_dict(), "optimizer": opt.state_dict(), "record": record,
                          "window": window}, ckpt_path)
    record["wall_seconds"] = round(time.time() - t_begin, 1)
    record["threads"] = torch.get_num_threads()
    # write the finished model next to the checkpoint, then swap it in: never a half-written folder
    staging = os.path.join(out_dir, ".staging")
    shutil.rmtree(staging, ignore_errors=True)
    ema_e.eval()
    save_teacher(staging, ema_t.eval(), ToyTextEncoder(tok, ema_e[0], ema_e[1] if resampler is not None else None), cfg)
    with open(os.path.join(staging, "training_record.json"), "w") as f:
        json.dump(record, f, indent=1)
    for name in os.listdir(staging):
        dst = os.path.join(out_dir, name)
        if os.path.isdir(dst):
            shutil.rmtree(dst)
        os.replace(os.path.join(staging, name), dst)
    shutil.rmtree(staging, ignore_errors=True)
    if os.path.exists(ckpt_path):
        os.remove(ckpt_path)
    return record
