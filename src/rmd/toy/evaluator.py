"""The toy evaluator: a small CNN that reads every attribute of a toy image back.

It is the measuring instrument of the toy benchmark (:mod:`rmd.toy.metrics`), the
toy's stand-in for CLIP / HPS / Inception:

* one classification head per scene attribute (:data:`rmd.toy.world.ATTRIBUTES`:
  shape, colour, texture, position, background, count) -> prompt alignment;
* a "degraded" head (one logit: clean vs the image-level degradations "clutter" and
  "cast" of :func:`rmd.toy.world.render_one`) -> share of degraded generations.
  "wrong_colour" is a clean image of another colour; the colour head catches it;
* the penultimate ``feature_dim``-vector -> Frechet distance.

Input: ``(B, 3, H, W)`` images in [-1, 1]; any other size is bilinearly resized to
32 px first (:func:`prepare`).

Training data is rendered afresh for every step from :mod:`rmd.toy.world`, over *all*
attribute combinations (held-out (shape, colour) pairs included: the evaluator measures,
it does not generate). Each image is rendered at 8, 16 or 32 px and resized to 32, so a
low-resolution look is not mistaken for a degradation, and half of the images are
degraded. The texture label is used only for 32 px renders: the 4 px texture averages
to a flat tone at 16 px and 8 px, so a blurry image must not be credited with a texture
it does not show. Mild augmentation (Gaussian noise, slight Gaussian blur)
keeps generated images with small artifacts readable.

Entry point: :func:`train_evaluator` (``python -m rmd.toy.evaluator --out DIR``).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import sys
import time
from dataclasses import dataclass
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch import Tensor, nn

from .world import ATTRIBUTES, render, sample_scenes

ASSET_DIR = os.path.join(os.path.dirname(os.path.dirname(__file__)), "assets", "toy")
EVALUATOR_DIR = os.path.join(ASSET_DIR, "evaluator")
WEIGHTS_FILE, CONFIG_FILE, RECORD_FILE = "model.safetensors", "config.json", "training_record.json"
IMAGE_DEGRADATIONS = ("clutter", "cast")  # what the degraded head is trained to flag


class EvaluatorConfig(BaseModel):
    """Architecture, data and training settings of the toy evaluator (unknown keys are errors)."""

    model_config = ConfigDict(extra="forbid")

    size: int = 32
    channels: tuple[int, int, int] = (16, 32, 64)
    feature_dim: int = 128
    resolutions: tuple[int, ...] = (8, 16, 32)
    resolution_weights: tuple[float, ...] = (0.25, 0.25, 0.5)
    texture_min_resolution: int = Field(32, description="texture labels are used only for renders at >= this size")
    degrade_share: float = Field(0.5, ge=0.0, le=1.0)
    noise_max: float = Field(0.06, ge=0.0, description="per-image noise std drawn from U(0, noise_max), [-1, 1] units")
    blur_prob: float = Field(0.3, ge=0.0, le=1.0)
    blur_sigma: tuple[float, float] = (0.3, 0.6)
    steps: int = Field(1000, ge=1)
    batch_size: int = Field(128, ge=1)
    lr: float = Field(2e-3, gt=0)
    warmup: int = Field(50, ge=0)
    weight_decay: float = 1e-4
    seed: int = 0
    log_every: int = 50
    val_images: int = Field(1024, ge=0, description="fresh renders for the final accuracy check")

    @model_validator(mode="after")
    def _check(self):
        if len(self.resolutions) != len(self.resolution_weights):
            raise ValueError("resolutions and resolution_weights must have the same length")
        if self.size % 8:
            raise ValueError("size must be a multiple of 8 (three 2x poolings)")
        return self


# --- network -------------------------------------------------------------------------------


def _conv(c_in: int, c_out: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True))


class ToyEvaluator(nn.Module):
    """conv 32 px -> pool -> 16 px -> pool -> 8 px -> pool -> 4x4 grid -> flatten -> features -> heads.

    The last feature map is flattened rather than globally pooled, so the features keep
    *where* things are (the position and count heads need it).
    """

    def __init__(self, cfg: EvaluatorConfig):
        super().__init__()
        c1, c2, c3 = cfg.channels
        self.config = cfg
        self.trunk = nn.Sequential(
            _conv(3, c1), _conv(c1, c1), nn.MaxPool2d(2),
            _conv(c1, c2), _conv(c2, c2), nn.MaxPool2d(2),
            _conv(c2, c3), nn.MaxPool2d(2),
        )
        grid = cfg.size // 8
        self.embed = nn.Sequential(nn.Flatten(), nn.Linear(c3 * grid * grid, cfg.feature_dim), nn.ReLU(inplace=True))
        self.heads = nn.ModuleDict({name: nn.Linear(cfg.feature_dim, len(v)) for name, v in ATTRIBUTES.items()})
        self.degraded = nn.Linear(cfg.feature_dim, 1)

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        """Logits per attribute, ``"degraded"`` (B,) logit, ``"features"`` (B, feature_dim); x at 32 px."""
        feats = self.embed(self.trunk(x))
        out = {name: head(feats) for name, head in self.heads.items()}
        out["degraded"] = self.degraded(feats)[:, 0]
        out["features"] = feats
        return out

    @torch.no_grad()
    def read(self, images: Tensor, batch_size: int = 256) -> "Readout":
        """Predicted class per attribute, degraded probability and features of a batch of images."""
        was_training = self.training
        self.eval()
        parts = [self(prepare(images[i : i + batch_size], self.config.size)) for i in range(0, len(images), batch_size)]
        self.train(was_training)
        cat = {k: torch.cat([p[k] for p in parts]) for k in parts[0]} if parts else {}
        return Readout(
            labels={name: cat[name].argmax(1) for name in ATTRIBUTES},
            degraded_prob=torch.sigmoid(cat["degraded"]),
            features=cat["features"],
        )


@dataclass
class Readout:
    """What the evaluator reads from B images: class indices, P(degraded), features."""

    labels: dict[str, Tensor]  # attribute -> (B,) long, indices into ATTRIBUTES[attribute]
    degraded_prob: Tensor  # (B,)
    features: Tensor  # (B, feature_dim)


def prepare(images: Tensor, size: int = 32) -> Tensor:
    """Check a (B, 3, H, W) batch, cast to float32 and bilinearly resize it to ``size`` px."""
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"the evaluator takes (B, 3, H, W) RGB images in [-1, 1], got shape {tuple(images.shape)}")
    x = images.float()
    if tuple(x.shape[-2:]) != (size, size):
        # same operator as the cascade's upsampling (rmd.upsample): bilinear, pixel-centre grid;
        # antialias only matters (and only acts) when shrinking
        shrink = x.shape[-1] > size or x.shape[-2] > size
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=shrink)
    return x


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# --- saving and loading --------------------------------------------------------------------


def save_evaluator(out_dir: str, model: ToyEvaluator, record: Optional[dict] = None) -> None:
    from safetensors.torch import save_file

    os.makedirs(out_dir, exist_ok=True)
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    save_file(state, os.path.join(out_dir, WEIGHTS_FILE))
    os.chmod(os.path.join(out_dir, WEIGHTS_FILE), 0o644)  # safetensors writes 0600; this is package data
    with open(os.path.join(out_dir, CONFIG_FILE), "w") as f:
        json.dump(model.config.model_dump(mode="json"), f, indent=1)
    if record is not None:
        with open(os.path.join(out_dir, RECORD_FILE), "w") as f:
            json.dump(record, f, indent=1)


def load_evaluator(path: Optional[str] = None, device: str = "cpu") -> ToyEvaluator:
    """Load an evaluator folder (default: the one shipped in the package), in eval mode."""
    from safetensors.torch import load_file

    path = path or EVALUATOR_DIR
    missing = [n for n in (WEIGHTS_FILE, CONFIG_FILE) if not os.path.exists(os.path.join(path, n))]
    if missing:
        raise FileNotFoundError(
            f"toy evaluator folder {path!r} lacks {missing}; train one with "
            "`python -m rmd.toy.evaluator --out DIR` or reinstall the package to restore the shipped evaluator"
        )
    with open(os.path.join(path, CONFIG_FILE)) as f:
        cfg = EvaluatorConfig(**json.load(f))
    model = ToyEvaluator(cfg)
    model.load_state_dict(load_file(os.path.join(path, WEIGHTS_FILE)))
    return model.eval().requires_grad_(False).to(device)


# --- training data -------------------------------------------------------------------------


@dataclass
class LabelledBatch:
    images: Tensor  # (B, 3, size, size) in [-1, 1] (plus augmentation noise)
    labels: dict[str, Tensor]  # attribute -> (B,) long
    texture_known: Tensor  # (B,) bool: rendered at >= texture_min_resolution
    degraded: Tensor  # (B,) float 0/1
    resolution: Tensor  # (B,) long: the render size


def gaussian_blur(x: Tensor, sigma: Tensor) -> Tensor:
    """Blur image i of (B, C, H, W) with a 5-tap separable Gaussian of std ``sigma[i]`` px (reflect padding)."""
    b, c, h, w = x.shape
    taps = torch.arange(-2, 3, dtype=torch.float32)
    k = torch.exp(-0.5 * (taps[None] / sigma[:, None].clamp_min(1e-3)) ** 2)
    k = (k / k.sum(1, keepdim=True)).repeat_interleave(c, 0)  # (B*C, 5): one kernel per image channel
    y = F.pad(x.reshape(1, b * c, h, w), (2, 2, 2, 2), mode="reflect")
    y = F.conv2d(y, k[:, None, None, :], groups=b * c)
    y = F.conv2d(y, k[:, None, :, None], groups=b * c)
    return y.reshape(b, c, h, w)


def make_batch(n: int, seed: int, cfg: EvaluatorConfig, augment: bool = True,
               resolutions: Optional[Sequence[int]] = None, degrade_share: Optional[float] = None,
               split: str = "all") -> LabelledBatch:
    """n labelled images, a pure function of ``seed``: scenes over all pairs, mixed render sizes, degradations.

    ``resolutions``/``degrade_share``/``split`` override the training mix (used for validation).
    """
    rng = random.Random(seed)
    scenes = sample_scenes(n, rng.randrange(2**31), split=split)
    seeds = [rng.randrange(2**31) for _ in scenes]
    res_pool = list(resolutions) if resolutions is not None else list(cfg.resolutions)
    weights = None if resolutions is not None else list(cfg.resolution_weights)
    res = [rng.choices(res_pool, weights=weights)[0] for _ in scenes]
    share = cfg.degrade_share if degrade_share is None else degrade_share
    degr = [rng.choice(IMAGE_DEGRADATIONS) if rng.random() < share else None for _ in scenes]
    images = torch.empty(n, 3, cfg.size, cfg.size)
    for r in sorted(set(res)):
        idx = [i for i in range(n) if res[i] == r]
        imgs = render([scenes[i] for i in idx], r, [seeds[i] for i in idx], [degr[i] for i in idx])
        images[idx] = prepare(imgs, cfg.size)
    if augment:
        g = torch.Generator().manual_seed(rng.randrange(2**31))
        blur = torch.rand(n, generator=g) < cfg.blur_prob
        lo, hi = cfg.blur_sigma
        sigma = lo + (hi - lo) * torch.rand(n, generator=g)
        if blur.any():
            images[blur] = gaussian_blur(images[blur], sigma[blur])
        noise_std = cfg.noise_max * torch.rand(n, generator=g)
        images = images + noise_std[:, None, None, None] * torch.randn(images.shape, generator=g)
    labels = {name: torch.tensor([s.labels()[name] for s in scenes]) for name in ATTRIBUTES}
    res_t = torch.tensor(res)
    return LabelledBatch(images, labels, res_t >= cfg.texture_min_resolution,
                         torch.tensor([d is not None for d in degr], dtype=torch.float32), res_t)


# --- training ------------------------------------------------------------------------------


def _lr_at(step: int, cfg: EvaluatorConfig) -> float:
    """Linear warm-up, then cosine decay to zero."""
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    return cfg.lr * 0.5 * (1 + math.cos(math.pi * (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)))


def evaluator_loss(out: dict[str, Tensor], batch: LabelledBatch) -> tuple[Tensor, dict[str, float]]:
    """Sum of the attribute cross-entropies (texture only where it is visible) and the degraded BCE.

    Returns the loss and the batch accuracy of every head.
    """
    loss = out["degraded"].new_zeros(())
    acc: dict[str, float] = {}
    for name in ATTRIBUTES:
        logits, y = out[name], batch.labels[name]
        keep = batch.texture_known if name == "texture" else torch.ones_like(y, dtype=torch.bool)
        if keep.any():
            loss = loss + F.cross_entropy(logits[keep], y[keep])
            acc[name] = (logits[keep].argmax(1) == y[keep]).float().mean().item()
    loss = loss + F.binary_cross_entropy_with_logits(out["degraded"], batch.degraded)
    acc["degraded"] = ((out["degraded"] > 0).float() == batch.degraded).float().mean().item()
    return loss, acc


@torch.no_grad()
def validate(model: ToyEvaluator, cfg: EvaluatorConfig, n: int, seed: int) -> dict:
    """Accuracy on fresh, un-augmented renders (batch seeds that no training step uses).

    ``clean_32``: per-attribute accuracy on clean 32 px renders (``clean_32_heldout_pairs``: the
    same on the held-out (shape, colour) pairs only); ``degraded_head``: accuracy
    on a 50/50 clean/degraded mix at each render size; ``low_res``: per-attribute accuracy of
    clean 8 and 16 px renders resized to 32 (texture there is what the head *says*, not a target).
    """
    report: dict = {"num_images": n}
    clean = make_batch(n, seed, cfg, augment=False, resolutions=[cfg.size], degrade_share=0.0)
    r = model.read(clean.images)
    report["clean_32"] = {k: (r.labels[k] == clean.labels[k]).float().mean().item() for k in ATTRIBUTES}
    report["clean_32"]["mean"] = sum(report["clean_32"].values()) / len(ATTRIBUTES)
    report["clean_32_false_degraded"] = (r.degraded_prob > 0.5).float().mean().item()
    held = make_batch(n, seed + 50, cfg, augment=False, resolutions=[cfg.size], degrade_share=0.0, split="heldout")
    rh = model.read(held.images)
    report["clean_32_heldout_pairs"] = {k: (rh.labels[k] == held.labels[k]).float().mean().item() for k in ATTRIBUTES}
    report["degraded_head"] = {}
    report["low_res"] = {}
    for res in cfg.resolutions:
        mix = make_batch(n, seed + 1 + res, cfg, augment=False, resolutions=[res], degrade_share=0.5)
        rm = model.read(mix.images)
        report["degraded_head"][str(res)] = ((rm.degraded_prob > 0.5).float() == mix.degraded).float().mean().item()
        if res < cfg.size:
            low = make_batch(n, seed + 100 + res, cfg, augment=False, resolutions=[res], degrade_share=0.0)
            rl = model.read(low.images)
            report["low_res"][str(res)] = {k: (rl.labels[k] == low.labels[k]).float().mean().item() for k in ATTRIBUTES}
    return report


VALIDATION_SEED = 987_654_321  # far from every training seed (cfg.seed * 1_000_003 + step)


def train_evaluator(cfg: EvaluatorConfig, out_dir: str, progress: bool = True, command: Optional[str] = None) -> dict:
    """Train the toy evaluator from scratch and write it (weights, config, record) into ``out_dir``.

    Reproducible from ``cfg.seed``: the initialisation and the content of every batch
    are fixed by it. Returns the training record (also written as training_record.json);
    ``command`` is stored in it (default: this process's command line).
    """
    from tqdm.auto import tqdm

    torch.manual_seed(cfg.seed)
    model = ToyEvaluator(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    record: dict = {"command": command or " ".join(sys.argv), "config": cfg.model_dump(mode="json"),
                    "parameters": count_parameters(model), "threads": torch.get_num_threads(), "curve": []}
    window: list[tuple[float, dict[str, float]]] = []
    t0, cpu0 = time.time(), time.process_time()
    model.train()
    bar = tqdm(range(cfg.steps), disable=not progress, desc="evaluator")
    for step in bar:
        batch = make_batch(cfg.batch_size, cfg.seed * 1_000_003 + step, cfg)
        loss, acc = evaluator_loss(model(batch.images), batch)
        for group in opt.param_groups:
            group["lr"] = _lr_at(step, cfg)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        window.append((loss.item(), acc))
        if (step + 1) % cfg.log_every == 0 or step + 1 == cfg.steps:
            mean_acc = {k: round(sum(a[k] for _, a in window if k in a) / max(1, sum(k in a for _, a in window)), 4)
                        for k in window[-1][1]}
            record["curve"].append({"step": step + 1, "loss": round(sum(l for l, _ in window) / len(window), 4),
                                    "train_accuracy": mean_acc, "seconds": round(time.time() - t0, 1)})
            bar.set_postfix(loss=f"{record['curve'][-1]['loss']:.3f}")
            window = []
    record["steps"] = cfg.steps
    record["train_seconds"] = round(time.time() - t0, 1)
    record["train_cpu_seconds"] = round(time.process_time() - cpu0, 1)  # wall time depends on other jobs
    model.eval()
    if cfg.val_images:
        record["validation"] = validate(model, cfg, cfg.val_images, VALIDATION_SEED)
    record["wall_seconds"] = round(time.time() - t0, 1)
    record["cpu_seconds"] = round(time.process_time() - cpu0, 1)
    save_evaluator(out_dir, model, record)
    return record


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m rmd.toy.evaluator", description="train the toy evaluator (CPU)")
    p.add_argument("--out", required=True, help="output folder (model.safetensors, config.json, training_record.json)")
    p.add_argument("--steps", type=int)
    p.add_argument("--batch-size", type=int)
    p.add_argument("--seed", type=int)
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    overrides = {k: v for k, v in (("steps", args.steps), ("batch_size", args.batch_size), ("seed", args.seed))
                 if v is not None}
    command = "python -m rmd.toy.evaluator " + " ".join(sys.argv[1:] if argv is None else argv)
    record = train_evaluator(EvaluatorConfig(**overrides), args.out, command=command)
    val = record.get("validation", {}).get("clean_32", {})
    print(f"trained {record['steps']} steps in {record['wall_seconds'] / 60:.1f} min; final loss "
          f"{record['curve'][-1]['loss']:.4f}; clean 32 px accuracy {json.dumps(val)}; written to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
